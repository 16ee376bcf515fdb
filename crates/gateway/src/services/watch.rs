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
//!   is in both comes twice, harmlessly. A live change that the replay
//!   already sent a newer version of is left out, so that no environment
//!   goes back to an older state on the stream.
//! - **Resume tokens.** Opaque to clients: base64url of `v1:<ms>`, a
//!   position on the orchestrator's clock such that every change stamped
//!   before it has been sent (less the slack: a resume looks back
//!   [`RESUME_SLACK`] for changes that committed late). Every message
//!   carries one: a listed or replayed environment the position of its own
//!   update (at most the start's: changes after it are still to come live),
//!   a live one the position before its feed batch (the batch's last, after
//!   it); a heartbeat (no environment) every [`HEARTBEAT`] carries a fresh
//!   one. A replay interrupted halfway resumes near where it stopped, not
//!   from its beginning. A malformed token is INVALID_ARGUMENT on
//!   `resume_token`; one older than `--watch-resume-retention-ms` is
//!   FAILED_PRECONDITION, reason `watch.resume_token_expired`: list again,
//!   then watch without a token.
//! - **Interruptions.** When the replica's feed breaks or starts over (an
//!   orchestrator restart), the stream ends UNAVAILABLE (reason
//!   `watch.feed_interrupted`); when the watcher falls behind (its client
//!   takes no message for `--watch-max-lag-ms`, the change it is about to
//!   send is that much older than the newest one, or it is more than the
//!   replica's backlog behind), ABORTED (reason `watch.fell_behind`). Either
//!   way the client watches again with the last token it received, and the
//!   replay fills the gap. An ending status goes ahead of the message still
//!   queued for the client (at most one): that message's token was not
//!   received, so the resume covers it.
//! - **Rights.** Re-checked every `--stream-recheck-ms`. A watch of one team
//!   ends PERMISSION_DENIED when the caller may no longer watch it; a watch
//!   of every team stops sending a team the caller has lost (and goes on
//!   with the others); either ends UNAUTHENTICATED when the token or its
//!   user is no longer valid. At most one message is queued for the client,
//!   and an ending status is sent ahead of it, as for every relayed stream.
//!   Each stream takes a share of the caller's streams
//!   (`--user-max-streams`).
//! - **Memory.** A watcher holds its subscription to the replica's shared,
//!   bounded backlog (changes it has not read stay there, shared with every
//!   other subscriber: the lag bound above limits how long), one replay
//!   page at a time and one message for the client; after a replay, the
//!   update time of each environment it sent that changed within the slack
//!   of the start (one entry per environment, dropped once a live version
//!   at least as new has been sent).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Request, Status};
use tonic_types::{ErrorDetails, StatusExt};
use vibebox_proto::authz::Resource;
use vibebox_proto::environment::{
    Environment, EnvironmentState, WatchEnvironmentsRequest, WatchEnvironmentsResponse,
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

/// How long the orchestrator's SQLite store lets a write wait for the
/// write lock (`vibebox_db::SQLITE_BUSY_TIMEOUT`, checked by a test: the
/// gateway does not link the database crate).
const STORE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A resume replays from this long before its token. A change's update
/// time is stamped when its statement is built, not when it commits: the
/// statement may wait up to [`STORE_BUSY_TIMEOUT`] for the write lock, then
/// run, commit and be read by the feed. A change stamped before a position
/// can thus reach the feed after it, by up to that wait plus the time to
/// commit and forward it: the slack is the busy timeout plus five seconds
/// for the rest. (PostgreSQL bounds no lock wait; a longer one there could
/// be missed by a resume: its stores keep writes short.)
pub(crate) const RESUME_SLACK: Duration = STORE_BUSY_TIMEOUT.saturating_add(Duration::from_secs(5));

/// A token this far ahead of the orchestrator's clock was not issued by
/// this platform.
const FUTURE_TOLERANCE: Duration = Duration::from_secs(60);

/// How long a new watch waits for the replica to be in sync.
const SYNC_PATIENCE: Duration = Duration::from_secs(5);

/// Environments per replay page.
const REPLAY_PAGE: i32 = 200;

/// Messages queued for the client at most: one, as for every relayed
/// stream, so that a caller whose rights are gone gets nothing queued
/// before the check (the ending status goes ahead of it), and a client that
/// does not read holds one message here.
const QUEUE: usize = 1;

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

/// Watches ended as fallen behind, by cause (`stalled`: the client took
/// nothing for the bound; `lagging`: the change about to be sent was older
/// than the newest by the bound; `backlog`: more than the replica's backlog
/// behind).
const FELL_BEHIND_TOTAL: &str = "vibebox_gateway_watch_fell_behind_total";

/// Ends a watch as fallen behind, counting it by `cause`.
fn fell_behind_because(cause: &'static str) -> End {
    tracing::debug!(cause, "watch fell behind");
    metrics::counter!(FELL_BEHIND_TOTAL, "cause" => cause).increment(1);
    End::Status(fell_behind())
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
    let (ending, ended) = oneshot::channel();
    let watcher = Watcher {
        gateway: gw.clone(),
        tx,
        ending: Some(ending),
        rights,
        last_allowed: Instant::now(),
        tick: recheck_interval(gw.stream_recheck),
        token: String::new(),
        start_position: start.server_time_ms,
        replayed: HashMap::new(),
    };
    let guard = StreamGuard::new(watcher.rights.call().info.method);
    tokio::spawn(async move {
        let _active = guard;
        watcher.run(first, start.changes).await;
    });
    Ok(Box::pin(outlet(rx, ended)))
}

/// The client's side of a watch: the queued messages, then the status that
/// ended the watcher. That status goes ahead of a message still queued:
/// the client resumes from the last token it received (the queued message
/// comes again), and a caller who lost its rights gets nothing more. A
/// watcher gone without a status (the gateway is stopping) ends the stream
/// as an interrupted feed: the client resumes.
fn outlet(
    rx: mpsc::Receiver<WatchEnvironmentsResponse>,
    ended: oneshot::Receiver<Status>,
) -> impl futures::Stream<Item = Result<WatchEnvironmentsResponse, Status>> + Send + 'static {
    futures::stream::unfold(Some((rx, ended)), |state| async move {
        let (mut rx, mut ended) = state?;
        tokio::select! {
            biased;
            status = &mut ended => Some((Err(status.unwrap_or_else(|_| interrupted())), None)),
            message = rx.recv() => match message {
                Some(message) => Some((Ok(message), Some((rx, ended)))),
                None => Some((Err(ended.try_recv().unwrap_or_else(|_| interrupted())), None)),
            },
        }
    })
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

/// The position a replayed environment updated at `update_ms` carries,
/// for a replay from the client's position `since` of a watch whose live
/// changes start at `start`.
///
/// The replay is ordered by update time: once the environment stamped `t`
/// is sent, every one stamped before `t` that the replay could see has
/// been, so `t` is covered. Ties need no care: a resume replays from its
/// position on (`>=`, less the slack), so an unsent environment stamped
/// `t` too comes again. One the replay could not see (a change committed
/// after the cursor passed its stamp) comes live, and so is stamped after
/// `start` less the commit delay the slack absorbs: the position never
/// passes `start` until the live changes are being sent. Nor does it go
/// back before the client's own position.
fn replayed_position(since: i64, update_ms: i64, start: i64) -> i64 {
    since.max(update_ms.min(start))
}

/// Whether a live change stamped `change_ms` comes too late for a watcher
/// that has been sending live changes since `live_since` (both on the
/// orchestrator's clock), the newest change being at `newest_ms`: the
/// watcher is more than `max_lag` behind the feed.
fn lags(newest_ms: i64, change_ms: i64, live_since: i64, max_lag: Duration) -> bool {
    newest_ms.saturating_sub(change_ms.max(live_since)) > millis(max_lag)
}

/// Whether a live change is older than the version of the environment the
/// replay sent (`replayed`: the feed read it before the replay did): it is
/// left out, lest the environment go back to an older state on the stream
/// and forward again. Update times order the versions of a record but for
/// one case: two writes of one record where the one stamped first waited
/// for the lock and committed last. Then the newest version is the
/// older-stamped one, and it is sent when it is the newest the replica
/// holds (`newest`: its update time there) or the record's deletion;
/// otherwise a newer version is still on its way and this one is skipped.
fn superseded(
    replayed: &mut HashMap<String, i64>,
    environment: &Environment,
    newest: impl FnOnce(&str) -> Option<i64>,
) -> bool {
    let Some(&sent) = replayed.get(&environment.id) else {
        return false;
    };
    let update_ms = update_time_ms(environment);
    if update_ms >= sent {
        // From here on the feed's order holds: later versions are newer.
        replayed.remove(&environment.id);
        return false;
    }
    environment.state() != EnvironmentState::Deleted && newest(&environment.id) != Some(update_ms)
}

struct Watcher {
    gateway: Arc<Gateway>,
    tx: mpsc::Sender<WatchEnvironmentsResponse>,
    /// Where the status that ends the stream goes (see [`outlet`]).
    ending: Option<oneshot::Sender<Status>>,
    rights: Rights,
    last_allowed: Instant,
    tick: tokio::time::Interval,
    /// The token of the last message sent (every change before its position
    /// has been sent).
    token: String,
    /// The orchestrator's clock the start reflects: every change after it is
    /// on the subscription.
    start_position: i64,
    /// Environments the replay sent that a live change may be older than
    /// (updated within [`RESUME_SLACK`] of the start or later), by id: the
    /// update time sent. Emptied as live versions at least as new are sent.
    replayed: HashMap<String, i64>,
}

impl Watcher {
    async fn run(mut self, first: First, changes: broadcast::Receiver<Arc<Change>>) {
        // The subscription goes with `stream`: what the watcher did not
        // read is no longer held for it.
        let result = self.stream(first, changes).await;
        if let Err(End::Status(status)) = result {
            tracing::debug!(code = ?status.code(), message = status.message(), "watch ended");
            if let Some(ending) = self.ending.take() {
                let _ = ending.send(status);
            }
            // The stream (and the caller's share of streams) lasts until the
            // client has the status or goes away.
            self.tx.closed().await;
        }
    }

    async fn stream(
        &mut self,
        first: First,
        mut changes: broadcast::Receiver<Arc<Change>>,
    ) -> Result<(), End> {
        let start_position = self.start_position;
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
                self.token = encode_token(since);
                self.replay(since).await?;
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
        // Changes waiting since before now were held by the replay, not by
        // this watcher falling behind.
        let live_since = self.gateway.replica.server_time_ms();
        let max_lag = self.gateway.watch_max_lag;
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
                            let newest = self.gateway.replica.server_time_ms();
                            if lags(newest, *server_time_ms, live_since, max_lag) {
                                return Err(fell_behind_because("lagging"));
                            }
                            let visible: Vec<&Environment> = environments
                                .iter()
                                .filter(|e| {
                                    self.rights.sees(e)
                                        && !superseded(&mut self.replayed, e, |id| {
                                            self.gateway.replica.update_time_of(id)
                                        })
                                })
                                .collect();
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
                    Err(RecvError::Lagged(_)) => return Err(fell_behind_because("backlog")),
                    Err(RecvError::Closed) => return Err(End::Status(interrupted())),
                },
            }
        }
    }

    /// Sends every environment of the visible teams updated at or after
    /// `since` less [`RESUME_SLACK`] (deleted ones included), oldest update
    /// first, a page at a time, each with the position it covers
    /// ([`replayed_position`]). The orchestrator's page tokens are keyset
    /// tokens (the last item's update time and id): an environment updated
    /// while the replay runs moves behind the cursor (or comes live) and
    /// cannot shift an unsent one out of the replay.
    async fn replay(&mut self, since: i64) -> Result<(), End> {
        let from = since.saturating_sub(millis(RESUME_SLACK)).max(0);
        // A live change is stamped at least this late (less than the slack
        // before the start): older replayed versions cannot be newer than
        // any live change.
        let superseding = self.start_position.saturating_sub(millis(RESUME_SLACK));
        let filter = format!("update_time >= \"{}\"", rfc3339(from));
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
                    let update_ms = update_time_ms(&environment);
                    let position = replayed_position(since, update_ms, self.start_position);
                    self.token = encode_token(position);
                    if update_ms >= superseding {
                        let known = self.replayed.entry(environment.id.clone()).or_default();
                        *known = (*known).max(update_ms);
                    }
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
    /// client does not read; a client that takes nothing for
    /// `--watch-max-lag-ms` ends the watch (fell behind: what it has not
    /// taken would otherwise pile up in the replica's backlog).
    async fn send(&mut self, message: WatchEnvironmentsResponse) -> Result<(), End> {
        let patience = tokio::time::sleep(self.gateway.watch_max_lag);
        tokio::pin!(patience);
        loop {
            tokio::select! {
                slot = self.tx.clone().reserve_owned() => {
                    let slot = slot.map_err(|_| End::Gone)?;
                    slot.send(message);
                    return Ok(());
                }
                _ = self.tick.tick() => self.recheck().await?,
                () = &mut patience => return Err(fell_behind_because("stalled")),
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
    fn the_resume_slack_outlasts_the_stores_busy_timeout() {
        assert_eq!(STORE_BUSY_TIMEOUT, vibebox_db::SQLITE_BUSY_TIMEOUT);
        assert!(
            RESUME_SLACK >= STORE_BUSY_TIMEOUT + Duration::from_secs(5),
            "{RESUME_SLACK:?}"
        );
    }

    #[test]
    fn a_replay_advances_its_position_up_to_the_start() {
        let (since, start) = (10_000, 50_000);
        // Environments older than the client's own position (within the
        // slack) leave it where it is.
        assert_eq!(replayed_position(since, 6_000, start), since);
        // Each one covers its own update time; an equal one after it is
        // replayed again by a resume (`>=`).
        assert_eq!(replayed_position(since, 20_000, start), 20_000);
        assert_eq!(replayed_position(since, 20_000, start), 20_000);
        // Never past the start: live changes after it are still to come.
        assert_eq!(replayed_position(since, 60_000, start), start);
        // A client position ahead of the start (clock skew within the
        // tolerance) is not moved back.
        assert_eq!(replayed_position(70_000, 60_000, start), 70_000);
    }

    #[test]
    fn a_watcher_lags_when_a_change_waits_longer_than_the_bound_since_it_went_live() {
        let bound = Duration::from_secs(10);
        assert!(!lags(100_000, 99_000, 0, bound));
        assert!(!lags(100_000, 90_000, 0, bound), "exactly the bound");
        assert!(lags(100_000, 89_999, 0, bound));
        // Changes held back by the replay count from when it went live.
        assert!(!lags(100_000, 10_000, 95_000, bound));
        assert!(lags(100_000, 10_000, 85_000, bound));
    }

    fn version(id: &str, update_ms: i64, state: EnvironmentState) -> Environment {
        Environment {
            id: id.into(),
            state: state as i32,
            update_time: Some(prost_types::Timestamp {
                seconds: update_ms / 1000,
                nanos: i32::try_from(update_ms % 1000).unwrap() * 1_000_000,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn live_versions_older_than_the_replayed_one_are_left_out() {
        use EnvironmentState::{Deleted, Running, Stopping};
        let mut replayed = HashMap::from([("x".to_owned(), 9_000)]);
        let nothing_newer = |_: &str| panic!("not asked");
        // Another environment, or none replayed: sent.
        assert!(!superseded(
            &mut replayed,
            &version("y", 1, Running),
            nothing_newer
        ));
        // Older than what the replay sent while the replica holds a newer
        // one (on its way here): left out.
        let older = version("x", 8_000, Stopping);
        assert!(superseded(&mut replayed, &older, |_| Some(9_500)));
        assert!(superseded(&mut replayed, &older, |_| None));
        // Older-stamped but the newest there is (a write that waited for the
        // lock committed last), or the deletion: sent.
        assert!(!superseded(&mut replayed, &older, |_| Some(8_000)));
        assert!(!superseded(
            &mut replayed,
            &version("x", 8_000, Deleted),
            |_| None
        ));
        // At least as new: sent, and from then on the feed's order holds.
        assert!(!superseded(
            &mut replayed,
            &version("x", 9_000, Running),
            nothing_newer
        ));
        assert!(replayed.is_empty());
        assert!(!superseded(&mut replayed, &older, nothing_newer));
    }

    #[tokio::test]
    async fn the_ending_status_goes_ahead_of_a_queued_message() {
        use futures::StreamExt;
        let message = |n: &str| WatchEnvironmentsResponse {
            resume_token: n.into(),
            ..Default::default()
        };
        // Messages flow; then the status, ahead of the queued message.
        let (tx, rx) = mpsc::channel(QUEUE);
        let (ending, ended) = oneshot::channel();
        let mut out = Box::pin(outlet(rx, ended));
        tx.send(message("1")).await.unwrap();
        assert_eq!(out.next().await.unwrap().unwrap().resume_token, "1");
        tx.send(message("2")).await.unwrap();
        assert!(
            tx.try_send(message("3")).is_err(),
            "one message queued at most"
        );
        ending.send(fell_behind()).unwrap();
        let status = out.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Aborted);
        assert!(out.next().await.is_none());
        assert!(
            tx.is_closed(),
            "the client side is gone once it has the status"
        );

        // A status while the client waits for a message wakes it.
        let (tx, rx) = mpsc::channel(QUEUE);
        let (ending, ended) = oneshot::channel();
        let mut out = Box::pin(outlet(rx, ended));
        let waiting = tokio::spawn(async move { out.next().await });
        tokio::task::yield_now().await;
        ending.send(interrupted()).unwrap();
        let status = waiting.await.unwrap().unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        drop(tx);

        // A watcher gone without a status: an interrupted feed (resume).
        let (tx, rx) = mpsc::channel(QUEUE);
        let (ending, ended) = oneshot::channel::<Status>();
        let mut out = Box::pin(outlet(rx, ended));
        drop((tx, ending));
        let status = out.next().await.unwrap().unwrap_err();
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            FEED_INTERRUPTED
        );
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
