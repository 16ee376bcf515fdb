//! The gateway's read replica of the installation's environments, fed by
//! the orchestrator's `WatchEnvironments` stream.
//!
//! Every environment call authorizes against the environment's team and
//! owner, and `GetEnvironment` returns the record: asking the orchestrator
//! each time would put a second mutual-TLS round trip and a database read
//! behind every call. The replica answers instead, and only when it is
//! sure to be current:
//!
//! - it serves nothing until the feed's snapshot is complete, and nothing
//!   once the feed is broken (the orchestrator is then asked, and its
//!   absence is reported as such, never papered over with old data);
//! - read-your-writes, and never backwards: every orchestrator response
//!   carries the feed position that reflects everything committed before it
//!   (`vibebox-change-mark`); until the replica has applied that position,
//!   reads go to the orchestrator. A state-changing call that ends without a
//!   mark (timed out, connection lost) sends every read to the orchestrator
//!   until the next mark. A mark from another orchestrator process than the
//!   one followed makes the replica subscribe again;
//! - the feed sends a heartbeat every second: a feed silent for three
//!   seconds counts as broken;
//! - it holds live environments only: a deleted or unknown id is always
//!   asked of the orchestrator.
//!
//! Changes made by the orchestrator alone (a container that died, a
//! reconcile) reach the replica as fast as the feed delivers them.
//!
//! Every change the replica applies while in sync is also broadcast
//! ([`Replica::subscribe`], [`Change`]): `WaitEnvironment` and
//! `WatchEnvironments` wait on it instead of asking the orchestrator. A feed
//! that breaks or starts over is broadcast as [`Change::Lost`]: what changed
//! in between is unknown here.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use vibebox_proto::environment::Environment;
use vibebox_proto::runtime::runtime_service_client::RuntimeServiceClient;
use vibebox_proto::runtime::{WatchEnvironmentsRequest, WatchEnvironmentsResponse};
use vibebox_server_kit::GrpcChannel;

/// Response header of the orchestrator's state-changing calls.
pub(crate) const CHANGE_MARK_HEADER: &str = "vibebox-change-mark";

const READS: &str = "vibebox_gateway_replica_reads_total";
const SYNCED: &str = "vibebox_gateway_replica_synced";

/// A feed that says nothing for this long (it sends a heartbeat every
/// second) is taken for broken.
const FEED_SILENCE: Duration = Duration::from_secs(3);

/// Changes kept for subscribers that have not read them yet (a subscriber
/// further behind is told it lagged). Each is one `Arc` that every
/// subscriber shares, dropped once all have read it: memory is held only for
/// the slowest subscriber, and a watcher that falls behind is ended after
/// `--watch-max-lag-ms` (WaitEnvironment reads as changes come).
const CHANGE_BACKLOG: usize = 1024;

/// The state-changing calls: one that ends without a change mark leaves the
/// replica unable to vouch for anything until the next mark.
const CHANGING_METHODS: [&str; 7] = [
    "/vibebox.internal.runtime.v1.RuntimeService/ExtendEnvironment",
    "/vibebox.internal.runtime.v1.RuntimeService/UpdateEnvironment",
    "/vibebox.internal.runtime.v1.RuntimeService/CreateEnvironment",
    "/vibebox.internal.runtime.v1.RuntimeService/StartEnvironment",
    "/vibebox.internal.runtime.v1.RuntimeService/StopEnvironment",
    "/vibebox.internal.runtime.v1.RuntimeService/RestartEnvironment",
    "/vibebox.internal.runtime.v1.RuntimeService/DeleteEnvironment",
];

/// A feed position (of one orchestrator process) the replica must reach
/// before it may answer.
#[derive(Debug, Clone, Copy)]
struct Floor {
    sequence: u64,
    /// When the gateway learned of it: a snapshot requested later reflects
    /// it, whichever process serves that snapshot.
    noted: Instant,
}

#[derive(Default)]
struct State {
    /// The snapshot is complete and the feed is up.
    synced: bool,
    epoch: String,
    /// Feed position applied.
    sequence: u64,
    /// When the current feed was requested.
    subscribed: Option<Instant>,
    /// The highest unmet mark of each orchestrator process.
    floors: HashMap<String, Floor>,
    /// A state-changing call ended without a mark.
    unmarked_change: bool,
    environments: HashMap<String, Environment>,
    /// The orchestrator's clock (Unix ms) of the last feed message applied:
    /// every change stamped earlier is reflected.
    server_time_ms: i64,
}

impl State {
    fn current(&self) -> bool {
        if !self.synced || self.unmarked_change {
            return false;
        }
        self.floors.iter().all(|(epoch, floor)| {
            if *epoch == self.epoch {
                self.sequence >= floor.sequence
            } else {
                // Another process: only a snapshot asked for after the mark
                // was noted reflects it.
                self.subscribed.is_some_and(|s| floor.noted < s)
            }
        })
    }
}

/// What the replica applied, as broadcast to its subscribers.
#[derive(Debug)]
pub(crate) enum Change {
    /// Environments one feed message changed, each as it is after the
    /// change (a deleted one once more, with state DELETED), in commit
    /// order; every change stamped before `server_time_ms` (the
    /// orchestrator's clock) is reflected once this is applied.
    Applied {
        server_time_ms: i64,
        environments: Vec<Environment>,
    },
    /// The feed broke or started over (a new snapshot): changes may have
    /// been missed.
    Lost,
}

/// A consistent start for a watcher: the changes after `environments`.
pub(crate) struct Start {
    pub(crate) changes: broadcast::Receiver<Arc<Change>>,
    /// The live environments the filter selected, oldest update first.
    pub(crate) environments: Vec<Environment>,
    /// The orchestrator's clock the environments reflect.
    pub(crate) server_time_ms: i64,
}

/// The replica (shared by every call of the gateway).
pub(crate) struct Replica {
    state: RwLock<State>,
    /// Asks the follower to subscribe again (a mark from another process).
    resubscribe: tokio::sync::Notify,
    /// Every change applied in sync, and every loss of the feed.
    changes: broadcast::Sender<Arc<Change>>,
}

impl Default for Replica {
    fn default() -> Self {
        Self {
            state: RwLock::default(),
            resubscribe: tokio::sync::Notify::default(),
            changes: broadcast::channel(CHANGE_BACKLOG).0,
        }
    }
}

impl Replica {
    /// The changes applied from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Whether the snapshot is complete and the feed is up.
    pub(crate) fn is_synced(&self) -> bool {
        self.state.read().unwrap_or_else(|e| e.into_inner()).synced
    }

    /// The live environments `select` keeps and the changes after them,
    /// taken together (no change falls between the two); `None` while the
    /// replica is not in sync.
    pub(crate) fn start(&self, select: impl Fn(&Environment) -> bool) -> Option<Start> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        if !state.synced {
            return None;
        }
        let changes = self.changes.subscribe();
        let mut environments: Vec<Environment> = state
            .environments
            .values()
            .filter(|e| select(e))
            .cloned()
            .collect();
        environments.sort_by(|a, b| {
            let key = |e: &Environment| {
                e.update_time
                    .as_ref()
                    .map(|t| (t.seconds, t.nanos))
                    .unwrap_or_default()
            };
            key(a).cmp(&key(b)).then_with(|| a.id.cmp(&b.id))
        });
        Some(Start {
            changes,
            environments,
            server_time_ms: state.server_time_ms,
        })
    }

    /// The orchestrator's clock the replica reflects, if `changes` (a
    /// subscription of this replica) holds nothing unread: then every change
    /// stamped earlier has been read from it. `None` while not in sync.
    pub(crate) fn position_after(&self, changes: &broadcast::Receiver<Arc<Change>>) -> Option<i64> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        (state.synced && changes.is_empty()).then_some(state.server_time_ms)
    }

    /// The orchestrator's clock of the last feed message applied (0 before
    /// the first).
    pub(crate) fn server_time_ms(&self) -> i64 {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .server_time_ms
    }

    /// The update time (Unix ms) of the newest version of a live environment
    /// the feed delivered, whether or not the replica may serve it now; `None`
    /// for one it does not hold (deleted, unknown, or the feed is down).
    pub(crate) fn update_time_of(&self, id: &str) -> Option<i64> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.environments.get(id).map(|e| {
            e.update_time.as_ref().map_or(0, |t| {
                t.seconds
                    .saturating_mul(1000)
                    .saturating_add(i64::from(t.nanos / 1_000_000))
            })
        })
    }

    /// The environment, when the replica can vouch for it being current.
    pub(crate) fn get(&self, id: &str) -> Option<Environment> {
        let found = self.lookup(id);
        let result = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!(READS, "result" => result).increment(1);
        found
    }

    fn lookup(&self, id: &str) -> Option<Environment> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        if !state.current() {
            return None;
        }
        state.environments.get(id).cloned()
    }

    /// Notes a change mark (`<epoch>:<sequence>`) from an orchestrator
    /// response.
    pub(crate) fn note_mark(&self, mark: &str) {
        let Some((epoch, sequence)) = mark.rsplit_once(':') else {
            return;
        };
        let Ok(sequence) = sequence.parse::<u64>() else {
            return;
        };
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        // Everything committed before this response is at or below the
        // mark: a change that went unmarked earlier is covered.
        state.unmarked_change = false;
        if epoch == state.epoch && state.synced && sequence <= state.sequence {
            return;
        }
        let noted = Instant::now();
        let floor = state
            .floors
            .entry(epoch.to_owned())
            .or_insert(Floor { sequence, noted });
        if sequence >= floor.sequence {
            *floor = Floor { sequence, noted };
        }
        if epoch != state.epoch && state.synced {
            // Another orchestrator process answered: the feed followed may
            // be a dead one's. A fresh snapshot settles it.
            self.resubscribe.notify_one();
        }
    }

    /// A state-changing call ended without a mark: it may have changed
    /// something the replica cannot know it must wait for.
    fn note_unmarked_change(&self) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.unmarked_change = true;
    }

    fn subscribing(&self) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.subscribed = Some(Instant::now());
    }

    fn broken(&self) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.synced {
            tracing::info!("environment feed lost; reads go to the orchestrator");
            let _ = self.changes.send(Arc::new(Change::Lost));
        }
        state.synced = false;
        state.environments.clear();
        metrics::gauge!(SYNCED).set(0.0);
    }

    fn apply(&self, message: WatchEnvironmentsResponse) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        // A change is broadcast only by a replica in sync before and after
        // it (a snapshot is not a change); the broadcast is sent under the
        // lock, so that `start` sees each change either in its snapshot or
        // on its subscription.
        let was_synced = state.synced && !message.reset && message.epoch == state.epoch;
        if state.synced && !was_synced {
            let _ = self.changes.send(Arc::new(Change::Lost));
        }
        if message.reset {
            state.synced = false;
            state.environments.clear();
            state.epoch = message.epoch.clone();
            // Marks of other processes noted before this snapshot was asked
            // for are reflected in it.
            if let Some(subscribed) = state.subscribed {
                let epoch = message.epoch.clone();
                state
                    .floors
                    .retain(|e, floor| *e == epoch || floor.noted >= subscribed);
            }
        } else if message.epoch != state.epoch {
            // Not the feed this replica follows: stay out of the way.
            state.synced = false;
            return;
        }
        state.sequence = state.sequence.max(message.sequence);
        if message.reset {
            state.sequence = message.sequence;
        }
        state.server_time_ms = state.server_time_ms.max(message.server_time_ms);
        if message.reset {
            state.server_time_ms = message.server_time_ms;
        }
        let changed = if was_synced
            && (!message.upserted.is_empty() || !message.deleted.is_empty())
            && self.changes.receiver_count() > 0
        {
            let mut changed = message.upserted.clone();
            changed.extend(message.deleted);
            Some(changed)
        } else {
            None
        };
        for id in message.removed {
            state.environments.remove(&id);
        }
        for environment in message.upserted {
            state
                .environments
                .insert(environment.id.clone(), environment);
        }
        if let Some(environments) = changed {
            let _ = self.changes.send(Arc::new(Change::Applied {
                server_time_ms: state.server_time_ms,
                environments,
            }));
        }
        let (epoch, sequence) = (state.epoch.clone(), state.sequence);
        state
            .floors
            .retain(|e, floor| !(*e == epoch && floor.sequence <= sequence));
        if message.synced && !state.synced {
            state.synced = true;
            metrics::gauge!(SYNCED).set(1.0);
            tracing::debug!(
                environments = state.environments.len(),
                "environment replica in sync"
            );
        }
    }

    /// Follows the orchestrator's feed until `stop`, resubscribing (with
    /// backoff) whenever it breaks.
    pub(crate) async fn follow(self: Arc<Self>, channel: GrpcChannel, stop: CancellationToken) {
        let mut backoff = resubscribe_delays();
        loop {
            let mut client = RuntimeServiceClient::new(channel.clone());
            self.subscribing();
            let subscribed = tokio::select! {
                () = stop.cancelled() => return,
                s = client.watch_environments(WatchEnvironmentsRequest {}) => s,
            };
            match subscribed {
                Ok(response) => {
                    let mut feed = response.into_inner();
                    loop {
                        let next = tokio::select! {
                            () = stop.cancelled() => {
                                self.broken();
                                return;
                            }
                            () = self.resubscribe.notified() => {
                                tracing::debug!("another orchestrator process answered; subscribing again");
                                break;
                            }
                            next = tokio::time::timeout(FEED_SILENCE, feed.next()) => next,
                        };
                        let Ok(next) = next else {
                            tracing::debug!("environment feed silent; subscribing again");
                            break;
                        };
                        match next {
                            Some(Ok(message)) => {
                                if message.synced {
                                    backoff = resubscribe_delays();
                                }
                                self.apply(message);
                            }
                            Some(Err(status)) => {
                                tracing::debug!(%status, "environment feed broke");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Err(status) => tracing::debug!(%status, "cannot follow the environment feed"),
            }
            self.broken();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next().unwrap_or(RESUBSCRIBE_MAX)) => {}
            }
        }
    }
}

const RESUBSCRIBE_MAX: Duration = Duration::from_secs(2);

/// The waits before subscribing to the feed again: from 100 ms doubling to
/// two seconds, jittered (every gateway loses the feed at the same moment
/// when the orchestrator restarts).
fn resubscribe_delays() -> impl Iterator<Item = Duration> + Send {
    vibebox_server_kit::retry::backoff(Duration::from_millis(100), RESUBSCRIBE_MAX)
}

/// The orchestrator channel as the gateway calls it: notes the change mark
/// of every response (success or error) in the replica before the caller
/// sees the response.
#[derive(Clone)]
pub(crate) struct MarkedChannel {
    inner: GrpcChannel,
    replica: Arc<Replica>,
}

impl MarkedChannel {
    pub(crate) fn new(inner: GrpcChannel, replica: Arc<Replica>) -> Self {
        Self { inner, replica }
    }
}

type Inner = GrpcChannel;
type InnerError = <Inner as tower::Service<http::Request<Body>>>::Error;
type InnerResponse = <Inner as tower::Service<http::Request<Body>>>::Response;

impl tower::Service<http::Request<Body>> for MarkedChannel {
    type Response = InnerResponse;
    type Error = InnerError;
    type Future = Pin<Box<dyn Future<Output = Result<InnerResponse, InnerError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let changing = CHANGING_METHODS.contains(&request.uri().path());
        let response = self.inner.call(request);
        // Fires unless a mark arrives: on an error without one, and when
        // the call is dropped before its answer (the client went away).
        let mut unmarked = UnmarkedGuard(changing.then(|| self.replica.clone()));
        let replica = self.replica.clone();
        Box::pin(async move {
            let response = response.await?;
            if let Some(mark) = response
                .headers()
                .get(CHANGE_MARK_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                replica.note_mark(mark);
                unmarked.disarm();
            }
            Ok(response)
        })
    }
}

/// Notes an unmarked change when dropped still armed.
struct UnmarkedGuard(Option<Arc<Replica>>);

impl UnmarkedGuard {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for UnmarkedGuard {
    fn drop(&mut self) {
        if let Some(replica) = self.0.take() {
            replica.note_unmarked_change();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(id: &str, name: &str) -> Environment {
        Environment {
            id: id.into(),
            name: name.into(),
            ..Default::default()
        }
    }

    fn message(epoch: &str, sequence: u64) -> WatchEnvironmentsResponse {
        WatchEnvironmentsResponse {
            epoch: epoch.into(),
            sequence,
            ..Default::default()
        }
    }

    #[test]
    fn serves_nothing_before_the_snapshot_is_complete() {
        let replica = Replica::default();
        replica.subscribing();
        replica.apply(WatchEnvironmentsResponse {
            reset: true,
            upserted: vec![env("a", "one")],
            ..message("e1", 5)
        });
        assert!(replica.lookup("a").is_none(), "snapshot still incomplete");
        replica.apply(WatchEnvironmentsResponse {
            synced: true,
            upserted: vec![env("b", "two")],
            ..message("e1", 5)
        });
        assert_eq!(replica.lookup("a").unwrap().name, "one");
        assert_eq!(replica.lookup("b").unwrap().name, "two");
        assert!(replica.lookup("c").is_none());
    }

    fn synced(epoch: &str, sequence: u64) -> Replica {
        let replica = Replica::default();
        replica.subscribing();
        replica.apply(WatchEnvironmentsResponse {
            reset: true,
            synced: true,
            upserted: vec![env("a", "one")],
            ..message(epoch, sequence)
        });
        replica
    }

    #[test]
    fn a_write_is_not_read_back_until_the_feed_reflects_it() {
        let replica = synced("e1", 5);
        replica.note_mark("e1:7");
        assert!(replica.lookup("a").is_none(), "feed at 5, write at 7");
        replica.apply(WatchEnvironmentsResponse {
            upserted: vec![env("a", "changed")],
            ..message("e1", 6)
        });
        assert!(replica.lookup("a").is_none(), "feed at 6, write at 7");
        replica.apply(message("e1", 7));
        assert_eq!(replica.lookup("a").unwrap().name, "changed");
        // An older mark changes nothing.
        replica.note_mark("e1:3");
        assert!(replica.lookup("a").is_some());
        // Garbage marks are ignored.
        replica.note_mark("nonsense");
        replica.note_mark("e1:x");
        assert!(replica.lookup("a").is_some());
    }

    #[test]
    fn removals_and_a_broken_feed_send_reads_to_the_orchestrator() {
        let replica = synced("e1", 5);
        replica.apply(WatchEnvironmentsResponse {
            removed: vec!["a".into()],
            ..message("e1", 6)
        });
        assert!(replica.lookup("a").is_none());
        let replica = synced("e1", 5);
        replica.broken();
        assert!(replica.lookup("a").is_none());
    }

    #[test]
    fn a_mark_from_another_orchestrator_process_waits_for_its_snapshot() {
        let replica = synced("e1", 5);
        // The orchestrator restarted; a write through the new process.
        replica.note_mark("e2:1");
        assert!(replica.lookup("a").is_none(), "replica still on e1");
        // A message of a feed this replica does not follow is ignored.
        replica.apply(message("e3", 9));
        assert!(replica.lookup("a").is_none());
        replica.subscribing();
        replica.apply(WatchEnvironmentsResponse {
            reset: true,
            synced: true,
            upserted: vec![env("a", "new")],
            ..message("e2", 1)
        });
        assert_eq!(replica.lookup("a").unwrap().name, "new");
    }

    #[test]
    fn a_change_without_a_mark_sends_reads_away_until_the_next_mark() {
        let replica = synced("e1", 5);
        replica.note_unmarked_change();
        assert!(replica.lookup("a").is_none());
        // The next answer's mark covers everything committed before it.
        replica.note_mark("e1:5");
        assert!(replica.lookup("a").is_some());
    }

    #[test]
    fn marks_of_each_process_are_kept_apart_and_a_foreign_one_resubscribes() {
        use futures::FutureExt;
        let replica = synced("e1", 5);
        assert!(replica.resubscribe.notified().now_or_never().is_none());
        replica.note_mark("e2:50");
        assert!(
            replica.resubscribe.notified().now_or_never().is_some(),
            "a mark of another process asks for a fresh snapshot"
        );
        // A late answer of the old process does not lower the new floor.
        replica.note_mark("e1:3");
        std::thread::sleep(Duration::from_millis(2));
        replica.subscribing();
        replica.apply(WatchEnvironmentsResponse {
            reset: true,
            synced: true,
            upserted: vec![env("a", "old")],
            ..message("e2", 48)
        });
        assert!(replica.lookup("a").is_none(), "e2 at 48, write at 50");
        replica.apply(WatchEnvironmentsResponse {
            upserted: vec![env("a", "new")],
            ..message("e2", 50)
        });
        assert_eq!(replica.lookup("a").unwrap().name, "new");
        // A late old-process mark noted after subscribing: not servable
        // until a snapshot asked for later.
        replica.note_mark("e1:9");
        assert!(replica.lookup("a").is_none());
        assert!(replica.resubscribe.notified().now_or_never().is_some());
        std::thread::sleep(Duration::from_millis(2));
        replica.subscribing();
        replica.apply(WatchEnvironmentsResponse {
            reset: true,
            synced: true,
            upserted: vec![env("a", "new")],
            ..message("e2", 50)
        });
        assert_eq!(replica.lookup("a").unwrap().name, "new");
    }

    fn applied(change: &Change) -> (i64, Vec<(&str, &str)>) {
        match change {
            Change::Applied {
                server_time_ms,
                environments,
            } => (
                *server_time_ms,
                environments
                    .iter()
                    .map(|e| (e.id.as_str(), e.name.as_str()))
                    .collect(),
            ),
            Change::Lost => panic!("a change was expected, the feed was lost"),
        }
    }

    #[test]
    fn changes_in_sync_are_broadcast_with_their_clock_and_losses_say_so() {
        let replica = Replica::default();
        let mut early = replica.subscribe();
        replica.subscribing();
        // A snapshot is not a change.
        replica.apply(WatchEnvironmentsResponse {
            reset: true,
            synced: true,
            upserted: vec![env("a", "one")],
            server_time_ms: 100,
            ..message("e1", 5)
        });
        assert!(early.try_recv().is_err());
        let mut rx = replica.subscribe();
        assert_eq!(replica.position_after(&rx), Some(100));
        replica.apply(WatchEnvironmentsResponse {
            upserted: vec![env("b", "two")],
            deleted: vec![Environment {
                state: vibebox_proto::environment::EnvironmentState::Deleted as i32,
                ..env("a", "one")
            }],
            removed: vec!["a".into()],
            server_time_ms: 150,
            ..message("e1", 6)
        });
        // A heartbeat moves the clock without a broadcast.
        replica.apply(WatchEnvironmentsResponse {
            server_time_ms: 160,
            ..message("e1", 6)
        });
        assert_eq!(
            replica.position_after(&rx),
            None,
            "a subscriber with an unread change is not at the replica's position"
        );
        let change = rx.try_recv().unwrap();
        assert_eq!(applied(&change), (150, vec![("b", "two"), ("a", "one")]));
        assert_eq!(replica.position_after(&rx), Some(160));
        assert!(rx.try_recv().is_err());

        // A watcher's start: the selected environments, then what follows.
        let start = replica.start(|e| e.id == "b").unwrap();
        assert_eq!(start.server_time_ms, 160);
        assert_eq!(
            start
                .environments
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );

        // Starting over (a new snapshot) and a broken feed are losses.
        replica.apply(WatchEnvironmentsResponse {
            reset: true,
            synced: true,
            server_time_ms: 200,
            ..message("e2", 1)
        });
        assert!(matches!(*rx.try_recv().unwrap(), Change::Lost));
        let mut watcher = start.changes;
        assert!(matches!(*watcher.try_recv().unwrap(), Change::Lost));
        replica.broken();
        assert!(matches!(*rx.try_recv().unwrap(), Change::Lost));
        assert!(replica.start(|_| true).is_none(), "no start out of sync");
        assert_eq!(replica.position_after(&rx), None);
    }

    #[test]
    fn an_old_process_mark_noted_before_subscribing_is_reflected_by_the_snapshot() {
        let replica = synced("e1", 5);
        replica.note_mark("e1:9");
        std::thread::sleep(Duration::from_millis(2));
        replica.subscribing();
        replica.apply(WatchEnvironmentsResponse {
            reset: true,
            synced: true,
            upserted: vec![env("a", "after restart")],
            ..message("e2", 0)
        });
        assert_eq!(replica.lookup("a").unwrap().name, "after restart");
    }
}
