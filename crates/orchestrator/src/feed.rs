//! The environment feed behind `WatchEnvironments`: a snapshot of the
//! installation's live environments, then every committed change in order.
//! The gateway keeps a read replica from it, so that reading an environment
//! (every environment call authorizes against its team and owner) costs no
//! round trip here.
//!
//! Changes are announced by id after they are committed ([`Changes`]); the
//! feed reads the record when it forwards the announcement, so what it sends
//! is never older than the announcement, and the sequence it sends with it
//! tells the gateway how far the replica has caught up.

use std::time::Duration;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use vibebox_proto::runtime::WatchEnvironmentsResponse;

use crate::grpc::environment_pb;
use crate::service::Orchestrator;
use crate::store::{Changes, State};

/// Environments per snapshot message (well below the 4 MiB message limit).
const SNAPSHOT_CHUNK: usize = 256;

/// Announcements folded into one message at most.
const MAX_BATCH: usize = 256;

/// An idle feed says so this often (the gateway takes a feed silent for
/// three seconds for broken).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Response header of state-changing calls: `<epoch>:<sequence>`.
pub const CHANGE_MARK_HEADER: &str = "vibebox-change-mark";

/// The mark of everything committed so far.
pub fn change_mark(changes: &Changes) -> String {
    format!("{}:{}", changes.epoch(), changes.sequence())
}

type Sink = mpsc::Sender<Result<WatchEnvironmentsResponse, Status>>;

/// Sends the feed into `sink` until the receiver goes away, the process
/// shuts down or the subscriber falls too far behind (then the stream ends
/// with ABORTED and the subscriber starts over).
pub async fn run(
    orchestrator: Orchestrator,
    sink: Sink,
    shutdown: CancellationToken,
    delay: Duration,
) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = sink.closed() => {}
        result = feed(&orchestrator, &sink, delay) => {
            if let Err(status) = result {
                let _ = sink.send(Err(status)).await;
            }
        }
    }
}

async fn feed(orchestrator: &Orchestrator, sink: &Sink, delay: Duration) -> Result<(), Status> {
    let store = &orchestrator.inner.store;
    let changes = store.changes();
    let epoch = changes.epoch().to_owned();
    // Subscribe before reading: a change committed after the read is
    // announced on the receiver, one before it is in the snapshot.
    let mut subscription = changes.subscribe();
    let snapshot_time = crate::store::now_ms();
    let live = store
        .live(orchestrator.installation())
        .await
        .map_err(|e| vibebox_server_kit::status::internal(&e))?;
    let mut chunks = live.chunks(SNAPSHOT_CHUNK).peekable();
    let mut first = true;
    loop {
        let chunk = chunks.next().unwrap_or_default();
        let message = WatchEnvironmentsResponse {
            epoch: epoch.clone(),
            sequence: subscription.sequence,
            reset: first,
            synced: chunks.peek().is_none(),
            upserted: chunk.iter().map(environment_pb).collect(),
            removed: Vec::new(),
            server_time_ms: snapshot_time,
            deleted: Vec::new(),
        };
        let done = message.synced;
        if sink.send(Ok(message)).await.is_err() {
            return Ok(());
        }
        first = false;
        if done {
            break;
        }
    }

    let mut forwarded = subscription.sequence;
    loop {
        let mut ids: Vec<String> = Vec::new();
        let received = tokio::time::timeout(HEARTBEAT, subscription.receiver.recv()).await;
        let mut sequence = match received {
            Err(_idle) => {
                let heartbeat = WatchEnvironmentsResponse {
                    epoch: epoch.clone(),
                    sequence: forwarded,
                    server_time_ms: crate::store::now_ms(),
                    ..Default::default()
                };
                if sink.send(Ok(heartbeat)).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            Ok(Ok((sequence, id))) => {
                ids.push(id);
                sequence
            }
            Ok(Err(RecvError::Closed)) => return Ok(()),
            Ok(Err(RecvError::Lagged(_))) => return Err(lagged()),
        };
        while ids.len() < MAX_BATCH {
            match subscription.receiver.try_recv() {
                Ok((s, id)) => {
                    sequence = s;
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Closed) => break,
                Err(TryRecvError::Lagged(_)) => return Err(lagged()),
            }
        }
        // Taken before the records are read: every change stamped earlier
        // and committed by now is in what follows.
        let mut message = WatchEnvironmentsResponse {
            epoch: epoch.clone(),
            sequence,
            server_time_ms: crate::store::now_ms(),
            ..Default::default()
        };
        for id in ids {
            match store.get(&id).await {
                Ok(Some(record)) if record.installation_id == orchestrator.installation() => {
                    if record.state == State::Deleted {
                        message.deleted.push(environment_pb(&record));
                        message.removed.push(id);
                    } else {
                        message.upserted.push(environment_pb(&record));
                    }
                }
                Ok(_) => message.removed.push(id),
                Err(e) => return Err(vibebox_server_kit::status::internal(&e)),
            }
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if sink.send(Ok(message)).await.is_err() {
            return Ok(());
        }
        forwarded = sequence;
    }
}

fn lagged() -> Status {
    Status::aborted("the environment feed fell behind; subscribe again for a fresh snapshot")
}
