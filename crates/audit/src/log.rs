//! The audit log: one writer task owns the chain head. It batches every
//! queued append into one transaction (idempotent by event id, sequences
//! assigned here), evaluates the alert rules, signs periodic checkpoints,
//! commits, and only then acknowledges and publishes the new events to
//! watchers.
//!
//! Invariant: only this task inserts rows, so the in-memory head always
//! equals the last committed event.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use vibebox_audit_chain::{Checkpoint, CheckpointSigner, Event, GENESIS_HASH};

use crate::alerts::{AlertConfig, AlertEngine};
use crate::store::{Store, StoreError};

/// Events written per transaction at most.
const BATCH_MAX: usize = 10_000;
/// Buffered events per watcher before it lags (and catches up from storage).
const WATCH_BUFFER: usize = 4096;

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A batch failed to commit (the cause is logged once by the writer).
    #[error("the audit store failed to commit")]
    CommitFailed,
    #[error("the audit log is shutting down")]
    Closed,
}

/// The chain head: last sequence (0 when empty) and its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub sequence: u64,
    pub hash: String,
}

type AppendReply = oneshot::Sender<Result<Vec<u64>, LogError>>;
type AppendRequest = (Vec<Event>, AppendReply);

enum Command {
    Append {
        events: Vec<Event>,
        reply: AppendReply,
    },
    CheckpointHead {
        reply: oneshot::Sender<Result<Option<Checkpoint>, LogError>>,
    },
}

/// A handle on the log (cheap to clone).
#[derive(Clone)]
pub struct Log {
    tx: mpsc::Sender<Command>,
    head: watch::Receiver<Head>,
    events: broadcast::Sender<Arc<Event>>,
    store: Store,
    signer: Arc<CheckpointSigner>,
}

struct Writer {
    store: Store,
    signer: Arc<CheckpointSigner>,
    alerts: AlertEngine,
    interval: u64,
    head: Head,
    last_checkpoint: u64,
    head_tx: watch::Sender<Head>,
    events: broadcast::Sender<Arc<Event>>,
}

impl Log {
    /// Loads the head, warms the alert windows up from the last hour and
    /// starts the writer. The task ends once every handle is dropped.
    pub async fn start(
        store: Store,
        signer: Arc<CheckpointSigner>,
        alerts: AlertConfig,
        checkpoint_interval: u64,
    ) -> Result<(Log, JoinHandle<()>), LogError> {
        let head = match store.head().await? {
            Some((sequence, hash)) => Head { sequence, hash },
            None => Head {
                sequence: 0,
                hash: GENESIS_HASH.to_owned(),
            },
        };
        let last_checkpoint = store.last_checkpoint().await?.map_or(0, |c| c.sequence);
        let mut engine = AlertEngine::new(alerts.clone());
        let since = chrono::Utc::now() - alerts.window;
        for e in store.since(&since).await? {
            // Replay only: alerts for these were raised when they arrived.
            let _ = engine.observe(&e);
        }
        let (head_tx, head_rx) = watch::channel(head.clone());
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let (tx, rx) = mpsc::channel(1024);
        let writer = Writer {
            store: store.clone(),
            signer: Arc::clone(&signer),
            alerts: engine,
            interval: checkpoint_interval.max(1),
            head,
            last_checkpoint,
            head_tx,
            events: events.clone(),
        };
        let task = tokio::spawn(writer.run(rx));
        Ok((
            Log {
                tx,
                head: head_rx,
                events,
                store,
                signer,
            },
            task,
        ))
    }

    /// Appends events (complete but unsealed) durably; returns each one's
    /// sequence, the original one for ids already recorded.
    pub async fn append(&self, events: Vec<Event>) -> Result<Vec<u64>, LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Append { events, reply })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// A signed checkpoint of the current head (signed now if needed);
    /// `None` while the log is empty.
    pub async fn checkpoint_head(&self) -> Result<Option<Checkpoint>, LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::CheckpointHead { reply })
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// The committed head.
    pub fn head(&self) -> Head {
        self.head.borrow().clone()
    }

    /// New events as they are committed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn signer(&self) -> &CheckpointSigner {
        &self.signer
    }
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.recv().await {
            let mut appends = Vec::new();
            let mut checkpoints = Vec::new();
            let mut queued = 0;
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Append { events, reply } => {
                        queued += events.len();
                        appends.push((events, reply));
                    }
                    Command::CheckpointHead { reply } => checkpoints.push(reply),
                }
                if queued < BATCH_MAX {
                    next = rx.try_recv().ok();
                }
            }
            if !appends.is_empty() {
                self.append_batch(appends).await;
            }
            for reply in checkpoints {
                let _ = reply.send(self.checkpoint_head().await);
            }
        }
    }

    async fn append_batch(&mut self, requests: Vec<AppendRequest>) {
        let ids: Vec<String> = requests
            .iter()
            .flat_map(|(events, _)| events.iter().map(|e| e.id.clone()))
            .collect();
        let mut known = match self.store.existing(&ids).await {
            Ok(known) => known,
            Err(e) => return fail_all(requests, e),
        };
        let mut sequence = self.head.sequence;
        let mut hash = self.head.hash.clone();
        let mut sealed: Vec<Event> = Vec::new();
        let mut checkpoints = Vec::new();
        let mut replies = Vec::with_capacity(requests.len());
        let interval = self.interval;
        let signer = Arc::clone(&self.signer);
        let mut seal =
            |mut e: Event, sealed: &mut Vec<Event>, checkpoints: &mut Vec<Checkpoint>| {
                sequence += 1;
                e.seal(sequence, &hash);
                hash.clone_from(&e.hash);
                if sequence.is_multiple_of(interval) {
                    checkpoints.push(signer.sign(sequence, &hash));
                }
                sealed.push(e);
                sequence
            };
        for (events, reply) in requests {
            let mut sequences = Vec::with_capacity(events.len());
            for e in events {
                if let Some(&seq) = known.get(&e.id) {
                    sequences.push(seq);
                    continue;
                }
                let id = e.id.clone();
                let seq = seal(e, &mut sealed, &mut checkpoints);
                known.insert(id, seq);
                sequences.push(seq);
                let trigger = sealed.last().cloned();
                if let Some(trigger) = trigger {
                    for alert in self.alerts.observe(&trigger) {
                        seal(alert, &mut sealed, &mut checkpoints);
                    }
                }
            }
            replies.push((sequences, reply));
        }
        if let Err(e) = self.store.append(&sealed, &checkpoints).await {
            tracing::error!(error = %e, "appending audit events failed");
            for (_, reply) in replies {
                let _ = reply.send(Err(LogError::CommitFailed));
            }
            return;
        }
        if let Some(last) = sealed.last() {
            self.head = Head {
                sequence: last.sequence,
                hash: last.hash.clone(),
            };
            self.head_tx.send_replace(self.head.clone());
        }
        if let Some(cp) = checkpoints.last() {
            self.last_checkpoint = cp.sequence;
        }
        metrics::counter!("vibebox_audit_events_appended_total").increment(sealed.len() as u64);
        for (sequences, reply) in replies {
            let _ = reply.send(Ok(sequences));
        }
        for e in sealed {
            let _ = self.events.send(Arc::new(e));
        }
    }

    async fn checkpoint_head(&mut self) -> Result<Option<Checkpoint>, LogError> {
        if self.head.sequence == 0 {
            return Ok(None);
        }
        if self.last_checkpoint == self.head.sequence
            && let Some(cp) = self.store.last_checkpoint().await?
            && cp.sequence == self.head.sequence
        {
            return Ok(Some(cp));
        }
        let cp = self.signer.sign(self.head.sequence, &self.head.hash);
        self.store.append(&[], std::slice::from_ref(&cp)).await?;
        self.last_checkpoint = cp.sequence;
        Ok(Some(cp))
    }
}

fn fail_all(requests: Vec<AppendRequest>, error: StoreError) {
    tracing::error!(%error, "reading audit event ids failed");
    for (_, reply) in requests {
        let _ = reply.send(Err(LogError::CommitFailed));
    }
}
