//! The producers' audit client: a durable local outbox delivered in order,
//! exactly once, to the audit service.
//!
//! [`AuditClient::record`] completes each event (id, time, source service,
//! trace id), appends it to an `fsync`ed outbox file and only then returns:
//! a mutating operation whose event cannot be written must fail (fail
//! closed). A background task delivers the outbox in order, in batches, to
//! `vibebox.internal.audit.v1.AuditIngestService.AppendEvents` over mTLS,
//! retrying with backoff while the audit service is unreachable. The service
//! ignores event ids it already holds, so redelivery after a crash never
//! duplicates: every event is recorded exactly once.
//!
//! Every acknowledgement carries each event's sequence and chain hash; the
//! highest is this producer's receipt, kept beside the outbox (see
//! [`receipt`](crate::receipt)), outside the audit database. The receipt is
//! checked against the log's head (`AuditReceiptService.CheckReceipt`) on
//! start, on the first success after the audit service was unreachable,
//! when an acknowledgement comes back at or below the receipt (the log went
//! backwards), and every `VIBEBOX_AUDIT_RECEIPT_CHECK_SECONDS` (default 30).
//! A contradiction (a cut or rewritten tail) is logged at ERROR here and
//! recorded, reported by `VerifyChain` and alerted by the audit service.

mod event;
mod outbox;
mod receipt;

pub use event::{Detail, EventBuilder, actor_kind};

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, mpsc, oneshot, watch};
use vibebox_proto::audit::AuditEvent;
use vibebox_proto::audit_ingest::audit_ingest_service_client::AuditIngestServiceClient;
use vibebox_proto::audit_ingest::audit_receipt_service_client::AuditReceiptServiceClient;
use vibebox_proto::audit_ingest::{AppendEventsRequest, CheckReceiptRequest};
use vibebox_server_kit::lockfile::{self, Claim};

use outbox::Pos;

/// Events per `AppendEvents` call.
const BATCH_MAX: usize = 500;
/// Encoded bytes per `AppendEvents` call (well under tonic's 4 MiB limit).
const BATCH_BYTES_MAX: u64 = 2 * 1024 * 1024;
/// Largest accepted event (encoded).
const EVENT_BYTES_MAX: u64 = 1024 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often [`AuditClient::open_waiting`] tries a locked outbox again.
const LOCKED_RETRY: Duration = Duration::from_millis(100);
/// How long a service waits for its outbox to be released at start.
pub const OPEN_PATIENCE: Duration = Duration::from_secs(15);
/// Seconds between receipt checks unless `VIBEBOX_AUDIT_RECEIPT_CHECK_SECONDS` says otherwise.
pub const DEFAULT_RECEIPT_CHECK_SECONDS: u64 = 30;

/// The receipt check period: `VIBEBOX_AUDIT_RECEIPT_CHECK_SECONDS` (at least 1), or 30 s.
fn receipt_check_interval() -> Duration {
    let seconds = std::env::var("VIBEBOX_AUDIT_RECEIPT_CHECK_SECONDS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_RECEIPT_CHECK_SECONDS)
        .max(1);
    Duration::from_secs(seconds)
}

/// The receipt shared by the delivery and check tasks.
struct Receipts {
    current: Mutex<receipt::Receipt>,
    /// Wakes the check task for an immediate check.
    check_now: Notify,
}

impl Receipts {
    fn current(&self) -> receipt::Receipt {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The audit service's address, as every producer flattens it into its
/// configuration (one declaration, one default).
#[derive(clap::Args, Debug, Clone)]
pub struct AuditArgs {
    /// URL of the audit service's ingest endpoint.
    #[arg(
        id = "audit_url",
        long = "audit-url",
        env = "VIBEBOX_AUDIT_URL",
        default_value = DEFAULT_AUDIT_URL
    )]
    pub url: String,
}

/// Where `vibebox up` and a default installation serve the audit service.
pub const DEFAULT_AUDIT_URL: &str = "https://127.0.0.1:7704";

impl Default for AuditArgs {
    fn default() -> Self {
        Self {
            url: DEFAULT_AUDIT_URL.to_owned(),
        }
    }
}

/// Where the outbox lives and where it is delivered.
#[derive(Clone)]
pub struct AuditClientConfig {
    /// Directory of this producer's outbox, e.g. `<data-dir>/outbox/<service>/`.
    /// Only one client may use a directory at a time.
    pub outbox_dir: PathBuf,
    /// URL of the audit service's ingest endpoint, e.g. `https://127.0.0.1:7704`.
    pub audit_url: String,
    /// This producer's mTLS material (its certificate is its identity).
    pub tls: vibebox_server_kit::TlsMaterial,
    /// Name recorded as `source_service` when an event leaves it empty.
    pub source_service: String,
}

/// Errors of the audit client.
#[derive(Debug, thiserror::Error)]
pub enum AuditClientError {
    /// The outbox directory could not be opened or recovered.
    #[error("cannot open the audit outbox {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    /// Another client (in this or another process) holds the outbox.
    #[error("the audit outbox {0} is in use by another client")]
    Locked(String),
    /// No tokio runtime to run the delivery task on.
    #[error("the audit client must be opened inside a tokio runtime")]
    NoRuntime,
    /// The channel to the audit service could not be set up.
    #[error("cannot set up the audit service channel: {0}")]
    Connect(String),
    /// The event is not acceptable (for example no action).
    #[error("invalid audit event: {0}")]
    InvalidEvent(&'static str),
    /// Writing the event to the outbox failed: the event is NOT recorded.
    #[error("cannot write the audit event to the outbox: {0}")]
    Write(std::io::Error),
    /// The outbox failed earlier (a failed fsync) and refuses further events.
    #[error("the audit outbox is unusable after an earlier write failure")]
    Poisoned,
    /// The audit service has been away so long that the undelivered outbox
    /// reached its limit: the event is NOT recorded (disk is finite; the
    /// platform stops acting rather than acting unrecorded).
    #[error(
        "the audit outbox holds {0} bytes the audit service has not accepted yet; refusing more until it catches up"
    )]
    Backlog(u64),
    /// `flush` did not see every event delivered in time.
    #[error("audit events still undelivered after {0:?}")]
    FlushTimeout(Duration),
}

/// Result alias of this crate.
pub type Result<T, E = AuditClientError> = std::result::Result<T, E>;

struct WriteRequest {
    record: Vec<u8>,
    reply: oneshot::Sender<Result<()>>,
}

/// Undelivered bytes beyond which new events are refused, by default.
pub const DEFAULT_BACKLOG_MAX: u64 = 512 * 1024 * 1024;

struct Inner {
    tx: mpsc::UnboundedSender<WriteRequest>,
    backlog_max: std::sync::atomic::AtomicU64,
    written: watch::Receiver<Pos>,
    delivered: watch::Receiver<Pos>,
    source_service: String,
    receipts: Arc<Receipts>,
}

/// A cheap-to-clone handle on a producer's audit outbox.
#[derive(Clone)]
pub struct AuditClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuditClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditClient")
            .field("source_service", &self.inner.source_service)
            .finish_non_exhaustive()
    }
}

impl AuditClient {
    /// Opens (creating or recovering) the outbox and starts delivering it.
    /// Must be called inside a tokio runtime. Events left undelivered by an
    /// earlier run are delivered first.
    pub fn open(config: AuditClientConfig) -> Result<AuditClient> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| AuditClientError::NoRuntime)?;
        let dir = config.outbox_dir.clone();
        let open_err = |source| AuditClientError::Open {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(open_err)?;
        let holder = format!("process {}", std::process::id());
        let lock = match lockfile::claim(&dir.join("LOCK"), &holder).map_err(open_err)? {
            Claim::Held(file) => Arc::new(file),
            Claim::Busy { .. } => {
                return Err(AuditClientError::Locked(dir.display().to_string()));
            }
        };
        let (writer, end, cursor) = outbox::Writer::open(&dir).map_err(open_err)?;
        let receipts = Arc::new(Receipts {
            current: Mutex::new(receipt::load_or_init(&dir).map_err(open_err)?),
            check_now: Notify::new(),
        });
        let channel = vibebox_server_kit::connect(&config.audit_url, &config.tls)
            .map_err(|e| AuditClientError::Connect(e.to_string()))?;

        let (tx, rx) = mpsc::unbounded_channel();
        let (written_tx, written) = watch::channel(end);
        let (delivered_tx, delivered) = watch::channel(cursor);
        let writer_lock = Arc::clone(&lock);
        std::thread::Builder::new()
            .name("audit-outbox".into())
            .spawn(move || write_loop(writer, rx, written_tx, writer_lock))
            .map_err(open_err)?;
        runtime.spawn(check_loop(
            dir.clone(),
            AuditReceiptServiceClient::new(channel.clone()),
            Arc::clone(&receipts),
            written.clone(),
            receipt_check_interval(),
        ));
        runtime.spawn(deliver_loop(
            dir,
            AuditIngestServiceClient::new(channel),
            written.clone(),
            delivered_tx,
            cursor,
            lock,
            Arc::clone(&receipts),
        ));
        Ok(AuditClient {
            inner: Arc::new(Inner {
                tx,
                backlog_max: std::sync::atomic::AtomicU64::new(DEFAULT_BACKLOG_MAX),
                written,
                delivered,
                source_service: config.source_service,
                receipts,
            }),
        })
    }

    /// [`open`](Self::open), waiting up to `patience` while the outbox is
    /// locked: a previous instance in this process (a restart) releases the
    /// lock shortly after its shutdown. Any other error returns at once.
    pub async fn open_waiting(
        config: AuditClientConfig,
        patience: Duration,
    ) -> Result<AuditClient> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match Self::open(config.clone()) {
                Err(AuditClientError::Locked(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(LOCKED_RETRY).await;
                }
                other => return other,
            }
        }
    }

    /// This producer's receipt: the highest sequence the audit service
    /// acknowledged for its events, and that event's chain hash (0 and
    /// empty before the first acknowledgement).
    pub fn receipt(&self) -> (u64, String) {
        let r = self.inner.receipts.current();
        (r.sequence, r.hash)
    }

    /// Completes `event` (a UUID v7 id, the current time, this producer's
    /// service name and the current trace id, where empty) and returns once
    /// it is durable in the outbox. An error means the event is NOT recorded
    /// and the operation it describes must fail.
    pub async fn record(&self, mut event: AuditEvent) -> Result<()> {
        // The audit service rejects what fails these checks, and a rejected
        // event would block the outbox: refuse it here instead.
        if event.action.is_empty() || event.action.len() > 128 {
            return Err(AuditClientError::InvalidEvent(
                "action must be 1 to 128 bytes",
            ));
        }
        if event.id.len() > 128 {
            return Err(AuditClientError::InvalidEvent(
                "id is longer than 128 bytes",
            ));
        }
        if vibebox_proto::audit::Outcome::try_from(event.outcome).is_err()
            || vibebox_proto::audit::Severity::try_from(event.severity).is_err()
        {
            return Err(AuditClientError::InvalidEvent(
                "unknown outcome or severity",
            ));
        }
        if event
            .time
            .as_ref()
            .is_some_and(|t| !(0..1_000_000_000).contains(&t.nanos))
        {
            return Err(AuditClientError::InvalidEvent("time is out of range"));
        }
        if event.id.is_empty() {
            event.id = uuid::Uuid::now_v7().to_string();
        }
        if event.time.is_none() {
            event.time = Some(prost_types::Timestamp::from(SystemTime::now()));
        }
        if event.source_service.is_empty() {
            event.source_service.clone_from(&self.inner.source_service);
        }
        if event.trace_id.is_empty() {
            event.trace_id = vibebox_server_kit::trace_id();
        }
        // The service assigns these.
        event.sequence = 0;
        event.hash.clear();
        event.prev_hash.clear();
        let mut record = Vec::new();
        outbox::encode_record(&event, &mut record);
        if record.len() as u64 > EVENT_BYTES_MAX {
            return Err(AuditClientError::InvalidEvent("event is larger than 1 MiB"));
        }
        let backlog = self.backlog();
        if backlog
            >= self
                .inner
                .backlog_max
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(AuditClientError::Backlog(backlog));
        }
        let (reply, done) = oneshot::channel();
        self.inner
            .tx
            .send(WriteRequest { record, reply })
            .map_err(|_| AuditClientError::Poisoned)?;
        done.await.map_err(|_| AuditClientError::Poisoned)?
    }

    /// Sets the undelivered bytes beyond which new events are refused
    /// ([`DEFAULT_BACKLOG_MAX`] unless set).
    pub fn set_backlog_limit(&self, bytes: u64) {
        self.inner
            .backlog_max
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes written to the outbox and not yet accepted by the audit service
    /// (segments count as full).
    pub fn backlog(&self) -> u64 {
        let written = *self.inner.written.borrow();
        let delivered = *self.inner.delivered.borrow();
        let segments = written.segment.saturating_sub(delivered.segment);
        (segments * outbox::SEGMENT_MAX + written.offset).saturating_sub(delivered.offset)
    }

    /// Waits until every event recorded before this call has been
    /// acknowledged by the audit service, or `timeout` passes.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let target = *self.inner.written.borrow();
        let mut delivered = self.inner.delivered.clone();
        tokio::time::timeout(timeout, delivered.wait_for(|pos| *pos >= target))
            .await
            .map_err(|_| AuditClientError::FlushTimeout(timeout))?
            .map(|_| ())
            .map_err(|_| AuditClientError::FlushTimeout(timeout))
    }

    /// Whether some recorded event still waits for the audit service's
    /// acknowledgement.
    pub fn has_pending(&self) -> bool {
        *self.inner.delivered.borrow() < *self.inner.written.borrow()
    }
}

/// The writer thread: group-commits whatever requests are queued with one
/// write and one fsync, then acknowledges them.
fn write_loop(
    mut writer: outbox::Writer,
    mut rx: mpsc::UnboundedReceiver<WriteRequest>,
    written: watch::Sender<Pos>,
    _lock: Arc<File>,
) {
    let mut poisoned = false;
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        if poisoned {
            for request in batch {
                let _ = request.reply.send(Err(AuditClientError::Poisoned));
            }
            continue;
        }
        let mut bytes = Vec::with_capacity(batch.iter().map(|r| r.record.len()).sum());
        for request in &batch {
            bytes.extend_from_slice(&request.record);
        }
        match writer.append(&bytes) {
            Ok(end) => {
                written.send_replace(end);
                for request in batch {
                    let _ = request.reply.send(Ok(()));
                }
            }
            Err(e) => {
                // After a failed write or fsync the file's state is unknown:
                // refuse everything from now on rather than guess.
                tracing::error!(error = %e, "audit outbox write failed; refusing further events");
                poisoned = true;
                let kind = e.kind();
                for request in batch {
                    let _ = request
                        .reply
                        .send(Err(AuditClientError::Write(std::io::Error::new(
                            kind,
                            e.to_string(),
                        ))));
                }
            }
        }
    }
}

/// The delivery task: sends durable, undelivered records in order and
/// advances the cursor after each acknowledged batch.
async fn deliver_loop(
    dir: PathBuf,
    mut client: AuditIngestServiceClient<vibebox_server_kit::GrpcChannel>,
    mut written: watch::Receiver<Pos>,
    delivered: watch::Sender<Pos>,
    mut cursor: Pos,
    _lock: Arc<File>,
    receipts: Arc<Receipts>,
) {
    let mut backoff = retry_delays();
    // Set while the audit service is unreachable: the first success after
    // it is a reconnection, and the receipt is checked at once.
    let mut unreachable = false;
    loop {
        let end = *written.borrow_and_update();
        if cursor >= end {
            if written.changed().await.is_err() {
                return; // every client handle is gone
            }
            continue;
        }
        let read_dir = dir.clone();
        let batch = tokio::task::spawn_blocking(move || {
            outbox::read_batch(&read_dir, cursor, end, BATCH_MAX, BATCH_BYTES_MAX)
        })
        .await;
        let (events, next) = match batch {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading the audit outbox failed");
                if wait_or_closed(&mut written, &mut backoff).await {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        if events.is_empty() {
            // Nothing readable before `end`: should not happen; avoid spinning.
            tracing::error!(
                ?cursor,
                ?end,
                "audit outbox has no readable record before its end"
            );
            if wait_or_closed(&mut written, &mut backoff).await {
                return;
            }
            continue;
        }
        let count = events.len();
        match client.append_events(AppendEventsRequest { events }).await {
            Ok(response) => {
                let response = response.into_inner();
                backoff = retry_delays();
                cursor = next;
                let current = receipts.current();
                let raised = receipt::raised(&current, &response.sequences, &response.hashes);
                if std::mem::take(&mut unreachable)
                    || receipt::suspicious(&current, &response.sequences, &response.hashes)
                {
                    receipts.check_now.notify_one();
                }
                let commit_dir = dir.clone();
                let keep = raised.clone();
                // The receipt is durable before the cursor moves past the
                // events it acknowledges.
                let committed = tokio::task::spawn_blocking(move || {
                    if let Some(r) = &keep {
                        receipt::store(&commit_dir, r)?;
                    }
                    outbox::commit_cursor(&commit_dir, next)
                })
                .await;
                if let Some(r) = raised {
                    *receipts.current.lock().unwrap_or_else(|e| e.into_inner()) = r;
                }
                match committed {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "saving the audit receipt or outbox cursor failed")
                    }
                    Err(_) => return,
                }
                delivered.send_replace(cursor);
                tracing::debug!(count, "delivered audit events");
            }
            Err(status) => {
                unreachable = true;
                tracing::warn!(code = ?status.code(), message = status.message(), count,
                    "audit service unavailable; will retry");
                if wait_or_closed(&mut written, &mut backoff).await {
                    return;
                }
            }
        }
    }
}

/// The check task: checks the receipt (and one kept after a contradiction)
/// against the audit log at start, when woken, and every `every`; retries
/// with backoff while the audit service is unreachable.
async fn check_loop(
    dir: PathBuf,
    mut client: AuditReceiptServiceClient<vibebox_server_kit::GrpcChannel>,
    receipts: Arc<Receipts>,
    mut written: watch::Receiver<Pos>,
    every: Duration,
) {
    let mut due = tokio::time::Instant::now();
    let mut backoff = retry_delays();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = receipts.check_now.notified() => {}
            changed = written.changed() => {
                if changed.is_err() {
                    return; // every client handle is gone
                }
                continue;
            }
        }
        let current = receipts.current();
        let kept_dir = dir.clone();
        let kept = match tokio::task::spawn_blocking(move || receipt::contradicted(&kept_dir)).await
        {
            Ok(Ok(kept)) => kept,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the contradicted audit receipt is unreadable");
                None
            }
            Err(_) => return,
        };
        let mut unreachable = false;
        for r in kept.into_iter().chain(Some(current)) {
            if r.sequence == 0 {
                continue;
            }
            let request = CheckReceiptRequest {
                producer_id: r.producer_id.clone(),
                sequence: r.sequence,
                hash: r.hash.clone(),
            };
            match client.check_receipt(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    if response.intact {
                        continue;
                    }
                    tracing::error!(
                        severity = "critical",
                        receipt_sequence = r.sequence,
                        head_sequence = response.head_sequence,
                        reason = %response.reason,
                        "the audit log contradicts this producer's receipt: its tail was cut or rewritten"
                    );
                    let keep_dir = dir.clone();
                    let kept = tokio::task::spawn_blocking(move || {
                        receipt::keep_contradicted(&keep_dir, &r)
                    })
                    .await;
                    if let Ok(Err(e)) = kept {
                        tracing::error!(error = %e, "cannot keep the contradicted audit receipt");
                    }
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::warn!("the audit service cannot check receipts (older version)");
                    break;
                }
                Err(status) => {
                    tracing::debug!(code = ?status.code(), "cannot check the audit receipt; will retry");
                    unreachable = true;
                    break;
                }
            }
        }
        let now = tokio::time::Instant::now();
        if unreachable {
            due = now + backoff.next().unwrap_or(BACKOFF_MAX);
        } else {
            due = now + every;
            backoff = retry_delays();
        }
    }
}

/// The waits between attempts while the audit service is away: from
/// `BACKOFF_MIN` doubling to `BACKOFF_MAX`, jittered.
fn retry_delays() -> impl Iterator<Item = Duration> + Send {
    vibebox_server_kit::retry::backoff(BACKOFF_MIN, BACKOFF_MAX)
}

/// Sleeps for the next backoff; true when every client handle is gone.
async fn wait_or_closed(
    written: &mut watch::Receiver<Pos>,
    backoff: &mut impl Iterator<Item = Duration>,
) -> bool {
    let delay = backoff.next().unwrap_or(BACKOFF_MAX);
    tokio::time::sleep(delay).await;
    written.has_changed().is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pki: &vibebox_server_kit::testing::TestPki, dir: PathBuf) -> AuditClientConfig {
        AuditClientConfig {
            outbox_dir: dir,
            // Nothing listens here: events must still be recorded.
            audit_url: "https://127.0.0.1:9".into(),
            tls: pki.material("orchestrator"),
            source_service: "orchestrator".into(),
        }
    }

    #[tokio::test]
    async fn open_waiting_takes_the_outbox_once_released_and_gives_up_after_its_patience() {
        let pki = vibebox_server_kit::testing::TestPki::new();
        let dir = tempfile::tempdir().unwrap();
        let first = AuditClient::open(config(&pki, dir.path().into())).unwrap();
        let started = tokio::time::Instant::now();
        let refused =
            AuditClient::open_waiting(config(&pki, dir.path().into()), Duration::from_millis(300))
                .await;
        assert!(
            matches!(refused, Err(AuditClientError::Locked(_))),
            "{refused:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
        let waiting = tokio::spawn(AuditClient::open_waiting(
            config(&pki, dir.path().into()),
            Duration::from_secs(10),
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("opened once released")
            .unwrap();
        assert!(second.is_ok(), "{second:?}");
    }

    #[tokio::test]
    async fn records_durably_without_a_service_and_locks_its_outbox() {
        let pki = vibebox_server_kit::testing::TestPki::new();
        let dir = pki.path().join("outbox");
        let client = AuditClient::open(config(&pki, dir.clone())).unwrap();
        client
            .record(AuditEvent {
                action: "environment.create".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(client.has_pending());
        assert!(matches!(
            AuditClient::open(config(&pki, dir.clone())),
            Err(AuditClientError::Locked(_))
        ));
        // The record is on disk, completed by the client.
        let end = *client.inner.written.borrow();
        let cursor = *client.inner.delivered.borrow();
        let (events, _) = outbox::read_batch(&dir, cursor, end, 10, u64::MAX).unwrap();
        assert_eq!(events.len(), 1);
        assert!(uuid::Uuid::parse_str(&events[0].id).is_ok());
        assert!(events[0].time.is_some());
        assert_eq!(events[0].source_service, "orchestrator");
    }

    #[tokio::test]
    async fn refuses_events_once_the_undelivered_backlog_is_full() {
        let pki = vibebox_server_kit::testing::TestPki::new();
        let client = AuditClient::open(config(&pki, pki.path().join("outbox"))).unwrap();
        client.set_backlog_limit(1024);
        let event = || AuditEvent {
            action: "environment.create".into(),
            details: Some(prost_types::Struct {
                fields: [(
                    "padding".to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue("x".repeat(200))),
                    },
                )]
                .into(),
            }),
            ..Default::default()
        };
        let mut recorded = 0;
        let refused = loop {
            match client.record(event()).await {
                Ok(()) => recorded += 1,
                Err(e) => break e,
            }
            assert!(recorded < 100, "never refused");
        };
        assert!(
            matches!(refused, AuditClientError::Backlog(b) if b >= 1024),
            "{refused:?}"
        );
        assert!(recorded >= 1);
        // Refused events are not written: the backlog stays where it was.
        let backlog = client.backlog();
        assert!(client.record(event()).await.is_err());
        assert_eq!(client.backlog(), backlog);
    }

    #[tokio::test]
    async fn fails_closed() {
        let pki = vibebox_server_kit::testing::TestPki::new();
        let file = pki.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            AuditClient::open(config(&pki, file.join("outbox"))),
            Err(AuditClientError::Open { .. })
        ));
        let client = AuditClient::open(config(&pki, pki.path().join("ok"))).unwrap();
        assert!(matches!(
            client.record(AuditEvent::default()).await,
            Err(AuditClientError::InvalidEvent(_))
        ));
    }
}
