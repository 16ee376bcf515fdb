//! The audit log: one writer task owns the chain head. It batches every
//! queued append into one transaction (idempotent by event id, sequences
//! assigned here), evaluates the alert rules, signs periodic checkpoints,
//! commits, and only then acknowledges and publishes the new events to
//! watchers.
//!
//! Invariant: only this task inserts rows, so the in-memory head always
//! equals the last committed event.
//!
//! After each commit the writer also records the head outside the database
//! (the head record, see [`crate::integrity`]); at start the record and every
//! receipt producers present later are checked against the log.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use vibebox_audit_chain::{Checkpoint, CheckpointSigner, Event, GENESIS_HASH, Receipt, TailError};

use crate::alerts::{AlertConfig, AlertEngine};
use crate::integrity::{HeadRecord, Integrity};
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

/// Sequence and chain hash of one appended event.
pub type Appended = (u64, String);

type AppendReply = oneshot::Sender<Result<Vec<Appended>, LogError>>;
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
    integrity: Arc<Integrity>,
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
    head_record: Option<HeadRecord>,
}

impl Log {
    /// Loads the head, warms the alert windows up from the last hour,
    /// checks the head record (when given) against the log and starts the
    /// writer. The task ends once every handle is dropped.
    pub async fn start(
        store: Store,
        signer: Arc<CheckpointSigner>,
        alerts: AlertConfig,
        checkpoint_interval: u64,
        head_record: Option<HeadRecord>,
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
            head_record: head_record.clone(),
        };
        let task = tokio::spawn(writer.run(rx));
        let log = Log {
            tx,
            head: head_rx,
            events,
            store,
            signer,
            integrity: Arc::new(Integrity::default()),
        };
        if let Some(record) = &head_record {
            log.check_head_record(record).await?;
        }
        Ok((log, task))
    }

    /// Checks the service's own head record, and one kept after an earlier
    /// contradiction, against the log; a contradicted record is kept.
    async fn check_head_record(&self, record: &HeadRecord) -> Result<(), LogError> {
        let kept = record.read_contradicted().unwrap_or_else(|e| {
            tracing::error!(error = %e, "the contradicted audit head record is unreadable");
            None
        });
        if let Some(kept) = kept {
            self.check_receipt(&kept).await?;
        }
        match record.read() {
            Ok(Some(receipt)) => {
                if self.check_receipt(&receipt).await?.1.is_some()
                    && let Err(e) = record.keep_contradicted(&receipt)
                {
                    tracing::error!(error = %e, "cannot keep the contradicted audit head record");
                }
            }
            Ok(None) => {
                if self.head().sequence > 0 {
                    tracing::warn!(
                        path = %record.path().display(),
                        "no audit head record beside a non-empty log; only producers' receipts can show a cut tail from before now"
                    );
                }
            }
            // Possibly torn by a crash while it was rewritten: the log is
            // not judged by it; producers' receipts still are.
            Err(e) => tracing::error!(error = %e, "the audit head record is unreadable"),
        }
        Ok(())
    }

    /// Checks a receipt against the log. A contradiction is recorded,
    /// logged and alerted (once per holder and sequence) and returned with
    /// the head it was checked against.
    pub async fn check_receipt(
        &self,
        receipt: &Receipt,
    ) -> Result<(Head, Option<TailError>), LogError> {
        let head = self.head();
        let hash_at = if receipt.sequence > 0 && receipt.sequence <= head.sequence {
            self.store.hash_at(receipt.sequence).await?
        } else {
            None
        };
        self.integrity.note_receipt(receipt);
        metrics::gauge!("vibebox_audit_receipt_holders").set(self.integrity.holders() as f64);
        match receipt.check(head.sequence, hash_at.as_deref()) {
            Ok(()) => Ok((head, None)),
            Err(failure) => {
                self.raise(&failure).await;
                Ok((head, Some(failure)))
            }
        }
    }

    /// Records an integrity failure and, the first time, logs and alerts it.
    async fn raise(&self, failure: &TailError) {
        if !self.integrity.record(failure) {
            return;
        }
        metrics::counter!("vibebox_audit_integrity_failures_total").increment(1);
        tracing::error!(
            severity = "critical",
            failure = %failure,
            "audit log integrity failure: events acknowledged earlier are no longer in the log"
        );
        if let Err(e) = self.append(vec![crate::alerts::tail_alert(failure)]).await {
            tracing::error!(error = %e, "cannot record the integrity alert");
        }
    }

    /// Integrity failures found since the process started.
    pub fn integrity_failures(&self) -> Vec<TailError> {
        self.integrity.failures()
    }

    /// Appends events (complete but unsealed) durably; returns each one's
    /// sequence and hash, the original ones for ids already recorded.
    pub async fn append(&self, events: Vec<Event>) -> Result<Vec<Appended>, LogError> {
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
                if let Some(appended) = known.get(&e.id) {
                    sequences.push(appended.clone());
                    continue;
                }
                let id = e.id.clone();
                let seq = seal(e, &mut sealed, &mut checkpoints);
                let appended = (
                    seq,
                    sealed.last().map(|e| e.hash.clone()).unwrap_or_default(),
                );
                known.insert(id, appended.clone());
                sequences.push(appended);
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
            self.write_head_record().await;
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

    /// Records the committed head outside the database (before anyone is
    /// acknowledged). A failure is logged, not fatal: the events are
    /// committed, and producers' receipts still cover them.
    async fn write_head_record(&self) {
        let Some(record) = self.head_record.clone() else {
            return;
        };
        let head = self.head.clone();
        let written =
            tokio::task::spawn_blocking(move || record.write(head.sequence, &head.hash)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot write the audit head record"),
            Err(e) => tracing::error!(error = %e, "writing the audit head record panicked"),
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
