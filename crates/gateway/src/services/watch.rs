//! `EnvironmentService/WatchEnvironments`: the environments a caller may
//! see, as they change, from the gateway's replica of the orchestrator's
//! feed.
//!
//! - **Visible set.** The request's team (authorized `environment.watch` on
//!   it), or every team the caller may see (`teams_allowed`, as
//!   `ListEnvironments` without a team), fixed when the stream starts: a
//!   team the caller joins later is not added (watch again to see it).
//! - **Start.** Without a resume token: the current environments of those
//!   teams (one message each), then `caught_up`, then live changes. With
//!   one: every environment of those teams updated since the token's
//!   position (less [`RESUME_SLACK`], for changes stamped before their
//!   commit) from the orchestrator's `ListEnvironments` (deleted ones
//!   included, oldest update first), then `caught_up`, then live changes.
//!   The change subscription is taken before the listing is read, so that
//!   nothing falls between the two; the watch is level-based (each message
//!   is the environment as it is at or after the change), so a change that
//!   is in both comes twice, harmlessly.
//! - **Resume tokens.** Opaque to clients: base64url of `v1:<ms>`, a
//!   position on the orchestrator's clock such that every change stamped
//!   before it has been sent. Every message carries one (a message that is
//!   not the last of its feed batch carries the position before the batch);
//!   a heartbeat (no environment) every [`HEARTBEAT`] carries a fresh one.
//!   A malformed token is INVALID_ARGUMENT on `resume_token`; one older than
//!   `--watch-resume-retention-ms` is FAILED_PRECONDITION, reason
//!   `watch.resume_token_expired`: list again, then watch without a token.
//! - **Interruptions.** When the replica's feed breaks or starts over (an
//!   orchestrator restart), the stream ends UNAVAILABLE (reason
//!   `watch.feed_interrupted`); when the watcher falls more than the
//!   replica's backlog behind (a client that does not read), ABORTED (reason
//!   `watch.fell_behind`). Either way the client watches again with the last
//!   token it received, and the replay fills the gap.
//! - **Rights.** Re-checked every `--stream-recheck-ms`. A watch of one team
//!   ends PERMISSION_DENIED when the caller may no longer watch it; a watch
//!   of every team stops sending a team the caller has lost (and goes on
//!   with the others); either ends UNAUTHENTICATED when the token or its
//!   user is no longer valid. Each stream takes a share of the caller's
//!   streams (`--user-max-streams`).
//! - **Memory.** A watcher holds its subscription to the replica's shared,
//!   bounded backlog, one replay page at a time and a few messages for the
//!   client: nothing grows with the number of changes or environments
//!   beyond one page and one feed batch.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tonic::{Code, Request, Status};
use tonic_types::{ErrorDetails, StatusExt};
use vibebox_proto::authz::Resource;
use vibebox_proto::environment::{
    Environment, WatchEnvironmentsRequest, WatchEnvironmentsResponse,
};
use vibebox_proto::runtime::ListEnvironmentsRequest;

use super::environment::redact;
use super::{MAX_UNCHECKED, ProxyStream, Recheck};
use crate::error::GatewayError;
use crate::gateway::{Call, Gateway, ORCHESTRATOR};
use crate::metrics::StreamGuard;
use crate::replica::{Change, Start};
use crate::validate;

/// A message (without an environment) at least this often.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// A resume replays from this long before its token: a change is stamped
/// before it commits, so one stamped a little before a position may reach
/// the feed after it.
pub(crate) const RESUME_SLACK: Duration = Duration::from_secs(5);

/// A token this far ahead of the orchestrator's clock was not issued by
/// this platform.
const FUTURE_TOLERANCE: Duration = Duration::from_secs(60);

/// How long a new watch waits for the replica to be in sync.
const SYNC_PATIENCE: Duration = Duration::from_secs(5);

/// Environments per replay page.
const REPLAY_PAGE: i32 = 200;

/// Messages queued for the client at most.
const QUEUE: usize = 16;

/// `ErrorInfo.reason` of a token older than the retention.
pub(crate) const TOKEN_EXPIRED: &str = "watch.resume_token_expired";
/// `ErrorInfo.reason` of a watch ended by an interrupted feed.
pub(crate) const FEED_INTERRUPTED: &str = "watch.feed_interrupted";
/// `ErrorInfo.reason` of a watch that fell too far behind.
pub(crate) const FELL_BEHIND: &str = "watch.fell_behind";

const TOKEN_PREFIX: &str = "v1:";

/// The resume token of position `ms` (Unix ms, orchestrator clock).
pub(crate) fn encode_token(ms: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{TOKEN_PREFIX}{ms}"))
}

/// The position of a resume token, if it is one.
pub(crate) fn decode_token(token: &str) -> Option<i64> {
    if token.len() > 64 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let digits = text.strip_prefix(TOKEN_PREFIX)?;
    if digits.is_empty() || digits.len() > 18 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// RFC 3339 with milliseconds, UTC (the orchestrator's filter syntax).
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn update_time_ms(environment: &Environment) -> i64 {
    environment.update_time.as_ref().map_or(0, |t| {
        t.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(t.nanos / 1_000_000))
    })
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn invalid_token() -> Status {
    vibebox_server_kit::status::invalid_field(
        "resume_token",
        "not a resume token of this platform: pass one from a WatchEnvironments message, or none",
    )
}

fn reasoned(code: Code, message: String, reason: &str, metadata: &[(&str, String)]) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        reason,
        vibebox_server_kit::status::ERROR_DOMAIN,
        metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<std::collections::HashMap<_, _>>(),
    );
    Status::with_error_details(code, message, details)
}

fn expired(retention: Duration) -> Status {
    reasoned(
        Code::FailedPrecondition,
        format!(
            "resume_token is older than the {} a watch resumes from: list the environments again, then watch without a token",
            humanize(retention)
        ),
        TOKEN_EXPIRED,
        &[("retention_ms", millis(retention).to_string())],
    )
}

fn interrupted() -> Status {
    reasoned(
        Code::Unavailable,
        "the environment feed was interrupted: watch again with the last resume_token received"
            .into(),
        FEED_INTERRUPTED,
        &[],
    )
}

fn fell_behind() -> Status {
    reasoned(
        Code::Aborted,
        "this watch fell too far behind the changes: watch again with the last resume_token received"
            .into(),
        FELL_BEHIND,
        &[],
    )
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s if s > 0 => format!("{s}s"),
        _ => format!("{}ms", d.as_millis()),
    }
}

/// Which environments the caller keeps seeing, re-checked while it watches.
enum Rights {
    /// One team, authorized on that team.
    Team { recheck: Recheck, team: String },
    /// Every team the caller may see; lost teams are dropped.
    Caller {
        gateway: Arc<Gateway>,
        call: Call,
        teams: BTreeSet<String>,
        /// When identity last listed the caller's teams.
        listed: Instant,
    },
}

/// A watch of every team asks identity for the caller's teams at most this
/// often (that answer is not cached; a team's decision is, for as long):
/// a lost team still stops being sent within two seconds.
const SCOPES_RECHECK: Duration = Duration::from_secs(1);

impl Rights {
    fn call(&self) -> &Call {
        match self {
            Rights::Team { recheck, .. } => &recheck.call,
            Rights::Caller { call, .. } => call,
        }
    }

    fn teams(&self) -> Vec<String> {
        match self {
            Rights::Team { team, .. } => vec![team.clone()],
            Rights::Caller { teams, .. } => teams.iter().cloned().collect(),
        }
    }

    fn sees(&self, environment: &Environment) -> bool {
        match self {
            Rights::Team { team, .. } => environment.team_id == *team,
            Rights::Caller { teams, .. } => teams.contains(&environment.team_id),
        }
    }

    /// Asks again; an error ends the stream.
    async fn still_allowed(&mut self, last_allowed: &mut Instant) -> Result<(), GatewayError> {
        match self {
            Rights::Team { recheck, .. } => recheck.still_allowed(last_allowed).await,
            Rights::Caller { listed, .. } if listed.elapsed() < SCOPES_RECHECK => Ok(()),
            Rights::Caller {
                gateway,
                call,
                teams,
                listed,
            } => match gateway.teams_allowed(call).await {
                Ok(allowed) => {
                    *listed = Instant::now();
                    teams.retain(|t| allowed.contains(t));
                    *last_allowed = Instant::now();
                    Ok(())
                }
                Err(GatewayError::InvalidToken(reason)) => Err(GatewayError::StreamRevoked(reason)),
                Err(GatewayError::Denied(_)) => Err(GatewayError::StreamWithdrawn {
                    operation: call.operation(),
                }),
                Err(error @ GatewayError::Unavailable { .. }) => {
                    if last_allowed.elapsed() < MAX_UNCHECKED {
                        tracing::debug!(%error, "cannot re-authorize a watch yet");
                        Ok(())
                    } else {
                        Err(error)
                    }
                }
                Err(other) => Err(other),
            },
        }
    }
}

/// Opens a watch (see the module docs).
pub(crate) async fn watch(
    gw: &Arc<Gateway>,
    request: Request<WatchEnvironmentsRequest>,
) -> Result<ProxyStream<WatchEnvironmentsResponse>, Status> {
    let call = gw.authenticate(gw.stream_info(&request)).await?;
    let req = request.into_inner();
    validate::optional_id("team_id", &req.team_id).map_err(GatewayError::from)?;
    let resume = if req.resume_token.is_empty() {
        None
    } else {
        Some(decode_token(&req.resume_token).ok_or_else(invalid_token)?)
    };
    let rights = if req.team_id.is_empty() {
        let teams = gw.teams_allowed(&call).await?.into_iter().collect();
        Rights::Caller {
            gateway: gw.clone(),
            call,
            teams,
            listed: Instant::now(),
        }
    } else {
        let resource = Resource {
            kind: "team".into(),
            team_id: req.team_id.clone(),
            id: req.team_id.clone(),
            ..Default::default()
        };
        gw.authorize(&call, resource.clone()).await?;
        Rights::Team {
            recheck: Recheck::new(gw.clone(), call, resource),
            team: req.team_id,
        }
    };
    let start = synced_start(gw, &rights, resume.is_none()).await?;
    let first = match resume {
        None => First::Listing(start.environments),
        Some(since) => {
            let now = start.server_time_ms;
            if since > now.saturating_add(millis(FUTURE_TOLERANCE)) {
                return Err(invalid_token());
            }
            if now.saturating_sub(since) > millis(gw.watch_retention) {
                return Err(expired(gw.watch_retention));
            }
            First::Replay(since)
        }
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    let watcher = Watcher {
        gateway: gw.clone(),
        tx,
        rights,
        last_allowed: Instant::now(),
        tick: recheck_interval(gw.stream_recheck),
        token: String::new(),
    };
    let guard = StreamGuard::new(watcher.rights.call().info.method);
    tokio::spawn(async move {
        let _active = guard;
        watcher
            .run(first, start.changes, start.server_time_ms)
            .await;
    });
    Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })))
}

fn recheck_interval(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// The replica's start for this watch (with the visible environments when
/// `listing`), waiting a little for it to be in sync (after an orchestrator
/// restart it is again within a few seconds).
async fn synced_start(gw: &Gateway, rights: &Rights, listing: bool) -> Result<Start, Status> {
    let patience = Instant::now() + SYNC_PATIENCE;
    loop {
        if let Some(start) = gw.replica.start(|e| listing && rights.sees(e)) {
            return Ok(start);
        }
        if Instant::now() >= patience {
            return Err(vibebox_server_kit::status::unavailable(
                "the environment feed",
                &"the gateway's replica is not in sync",
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a watch sends before `caught_up`.
enum First {
    /// The current environments (from the replica), oldest update first.
    Listing(Vec<Environment>),
    /// Every change after this position (the client's token), replayed from
    /// the orchestrator.
    Replay(i64),
}

/// Why a watcher stopped sending.
enum End {
    /// The client went away.
    Gone,
    /// The stream ends with this status.
    Status(Status),
}

impl From<GatewayError> for End {
    fn from(error: GatewayError) -> Self {
        End::Status(Status::from(error))
    }
}

struct Watcher {
    gateway: Arc<Gateway>,
    tx: mpsc::Sender<Result<WatchEnvironmentsResponse, Status>>,
    rights: Rights,
    last_allowed: Instant,
    tick: tokio::time::Interval,
    /// The token of the last message sent (every change before its position
    /// has been sent).
    token: String,
}

impl Watcher {
    async fn run(
        mut self,
        first: First,
        changes: broadcast::Receiver<Arc<Change>>,
        start_position: i64,
    ) {
        let result = self.stream(first, changes, start_position).await;
        if let Err(End::Status(status)) = result {
            tracing::debug!(code = ?status.code(), message = status.message(), "watch ended");
            let _ = self.tx.send(Err(status)).await;
        }
    }

    async fn stream(
        &mut self,
        first: First,
        mut changes: broadcast::Receiver<Arc<Change>>,
        start_position: i64,
    ) -> Result<(), End> {
        match first {
            First::Listing(environments) => {
                // Oldest update first: every environment updated before the
                // next one's update time has been sent, so that time is
                // where a resume must start (older than the retention: the
                // client lists again, which is what it was doing).
                let mut environments = environments.into_iter().peekable();
                while let Some(environment) = environments.next() {
                    let covered = environments.peek().map_or(start_position, |next| {
                        update_time_ms(next).min(start_position)
                    });
                    self.send_environment(environment, encode_token(covered))
                        .await?;
                }
            }
            First::Replay(since) => {
                // Until caught up, the client's own position stands.
                self.token = encode_token(since);
                self.replay(since.saturating_sub(millis(RESUME_SLACK)).max(0))
                    .await?;
            }
        }
        // Everything committed before the subscription is in the listing
        // (or the replay): the start's position is covered.
        self.token = encode_token(start_position);
        self.send(WatchEnvironmentsResponse {
            environment: None,
            resume_token: self.token.clone(),
            caught_up: true,
        })
        .await?;
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.tx.closed() => return Err(End::Gone),
                _ = self.tick.tick() => self.recheck().await?,
                _ = heartbeat.tick() => {
                    if let Some(position) = self.gateway.replica.position_after(&changes) {
                        self.token = encode_token(position);
                    }
                    self.send(WatchEnvironmentsResponse {
                        environment: None,
                        resume_token: self.token.clone(),
                        caught_up: false,
                    })
                    .await?;
                }
                change = changes.recv() => match change {
                    Ok(change) => match &*change {
                        Change::Applied { server_time_ms, environments } => {
                            let visible: Vec<&Environment> =
                                environments.iter().filter(|e| self.rights.sees(e)).collect();
                            let last = visible.len();
                            let after = encode_token(*server_time_ms);
                            for (i, environment) in visible.into_iter().enumerate() {
                                // Only the batch's last message covers the batch.
                                let token = if i + 1 == last {
                                    after.clone()
                                } else {
                                    self.token.clone()
                                };
                                self.send_environment(environment.clone(), token).await?;
                            }
                            self.token = after;
                        }
                        Change::Lost => return Err(End::Status(interrupted())),
                    },
                    Err(RecvError::Lagged(_)) => return Err(End::Status(fell_behind())),
                    Err(RecvError::Closed) => return Err(End::Status(interrupted())),
                },
            }
        }
    }

    /// Sends every environment of the visible teams updated at or after
    /// `since` (deleted ones included), oldest update first, a page at a
    /// time. The orchestrator's page tokens are keyset tokens (the last
    /// item's update time and id): an environment updated while the replay
    /// runs moves behind the cursor (or comes live) and cannot shift an
    /// unsent one out of the replay.
    async fn replay(&mut self, since: i64) -> Result<(), End> {
        let filter = format!("update_time >= \"{}\"", rfc3339(since));
        let mut page_token = String::new();
        loop {
            let teams = self.rights.teams();
            if teams.is_empty() {
                return Ok(());
            }
            let request = ListEnvironmentsRequest {
                team_ids: teams,
                page_size: REPLAY_PAGE,
                page_token,
                show_deleted: true,
                filter: filter.clone(),
                order_by: "update_time".into(),
            };
            let listed = self
                .gateway
                .runtime
                .clone()
                .list_environments(self.rights.call().forward(request))
                .await
                .map_err(GatewayError::upstream(ORCHESTRATOR))?
                .into_inner();
            for environment in listed.environments {
                if self.rights.sees(&environment) {
                    let token = self.token.clone();
                    self.send_environment(environment, token).await?;
                }
            }
            if listed.next_page_token.is_empty() {
                return Ok(());
            }
            page_token = listed.next_page_token;
        }
    }

    async fn recheck(&mut self) -> Result<(), End> {
        let mut last_allowed = self.last_allowed;
        let result = self.rights.still_allowed(&mut last_allowed).await;
        self.last_allowed = last_allowed;
        result.map_err(|error| {
            tracing::debug!(%error, "watch ended: rights re-checked");
            End::from(error)
        })
    }

    async fn send_environment(
        &mut self,
        environment: Environment,
        token: String,
    ) -> Result<(), End> {
        self.send(WatchEnvironmentsResponse {
            environment: Some(redact(environment)),
            resume_token: token,
            caught_up: false,
        })
        .await
    }

    /// Queues one message for the client, re-checking the rights while the
    /// client does not read.
    async fn send(&mut self, message: WatchEnvironmentsResponse) -> Result<(), End> {
        loop {
            tokio::select! {
                slot = self.tx.clone().reserve_owned() => {
                    let slot = slot.map_err(|_| End::Gone)?;
                    slot.send(Ok(message));
                    return Ok(());
                }
                _ = self.tick.tick() => self.recheck().await?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_nothing_else_decodes() {
        for ms in [0, 1, 1_767_225_600_123, i64::from(i32::MAX) * 1000] {
            let token = encode_token(ms);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{token}"
            );
            assert_eq!(decode_token(&token), Some(ms));
        }
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for garbage in [
            String::new(),
            "not a token".into(),
            "djE6MTIz=".into(),
            b64("v2:123"),
            b64("v1:"),
            b64("v1:-5"),
            b64("v1:+5"),
            b64("v1:12a"),
            b64("v1:99999999999999999999"),
            b64("v1:1 "),
            "A".repeat(100),
        ] {
            assert_eq!(decode_token(&garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn filter_times_are_rfc3339_with_milliseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
        let env = Environment {
            update_time: Some(prost_types::Timestamp {
                seconds: 1_767_225_600,
                nanos: 123_456_789,
            }),
            ..Default::default()
        };
        assert_eq!(update_time_ms(&env), 1_767_225_600_123);
    }

    #[test]
    fn refusals_carry_their_reasons() {
        let s = expired(Duration::from_secs(86_400));
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("24h"), "{}", s.message());
        let info = s.get_details_error_info().expect("error info");
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            (TOKEN_EXPIRED, vibebox_server_kit::status::ERROR_DOMAIN)
        );
        assert_eq!(interrupted().code(), Code::Unavailable);
        assert_eq!(fell_behind().code(), Code::Aborted);
        let s = invalid_token();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.get_details_bad_request().unwrap().field_violations[0].field,
            "resume_token"
        );
    }
}
