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
//! - read-your-writes: every orchestrator response that may have changed an
//!   environment carries the feed position reflecting that change
//!   (`vibebox-change-mark`); until the replica has applied that position,
//!   reads go to the orchestrator;
//! - it holds live environments only: a deleted or unknown id is always
//!   asked of the orchestrator.
//!
//! Changes made by the orchestrator alone (a container that died, a
//! reconcile) reach the replica as fast as the feed delivers them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
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

/// A feed position the replica must reach before it may answer.
#[derive(Debug, Clone)]
struct Floor {
    epoch: String,
    sequence: u64,
    /// When the gateway learned of it: a snapshot requested later from a
    /// newer orchestrator process reflects it.
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
    floor: Option<Floor>,
    environments: HashMap<String, Environment>,
}

/// The replica (shared by every call of the gateway).
#[derive(Default)]
pub(crate) struct Replica {
    state: RwLock<State>,
}

impl Replica {
    /// The environment, when the replica can vouch for it being current.
    pub(crate) fn get(&self, id: &str) -> Option<Environment> {
        let found = self.lookup(id);
        let result = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!(READS, "result" => result).increment(1);
        found
    }

    fn lookup(&self, id: &str) -> Option<Environment> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        if !state.synced {
            return None;
        }
        if let Some(floor) = &state.floor
            && (floor.epoch != state.epoch || state.sequence < floor.sequence)
        {
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
        let higher = match &state.floor {
            Some(floor) if floor.epoch == epoch => sequence > floor.sequence,
            _ => true,
        };
        if higher {
            state.floor = Some(Floor {
                epoch: epoch.to_owned(),
                sequence,
                noted: Instant::now(),
            });
        }
    }

    fn subscribing(&self) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.subscribed = Some(Instant::now());
    }

    fn broken(&self) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.synced {
            tracing::info!("environment feed lost; reads go to the orchestrator");
        }
        state.synced = false;
        state.environments.clear();
        metrics::gauge!(SYNCED).set(0.0);
    }

    fn apply(&self, message: WatchEnvironmentsResponse) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if message.reset {
            state.synced = false;
            state.environments.clear();
            state.epoch = message.epoch.clone();
            // A floor from an earlier orchestrator process, noted before
            // this snapshot was asked for, is reflected in it.
            if let (Some(floor), Some(subscribed)) = (&state.floor, state.subscribed)
                && floor.epoch != message.epoch
                && floor.noted < subscribed
            {
                state.floor = None;
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
        for id in message.removed {
            state.environments.remove(&id);
        }
        for environment in message.upserted {
            state
                .environments
                .insert(environment.id.clone(), environment);
        }
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
        let mut backoff = Duration::from_millis(100);
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
                            next = feed.next() => next,
                        };
                        match next {
                            Some(Ok(message)) => {
                                if message.synced {
                                    backoff = Duration::from_millis(100);
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
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
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
        let response = self.inner.call(request);
        let replica = self.replica.clone();
        Box::pin(async move {
            let response = response.await?;
            if let Some(mark) = response
                .headers()
                .get(CHANGE_MARK_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                replica.note_mark(mark);
            }
            Ok(response)
        })
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
