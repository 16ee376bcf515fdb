//! gRPC adapters: `AuditIngestService` for producers and `AuditService`
//! for the gateway. They convert wire types, check the caller and map
//! errors to statuses; the work happens in [`crate::log`] and
//! [`crate::service`].

use std::pin::Pin;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use vibebox_audit_chain::{Event, EventError, Receipt, Report};
use vibebox_proto::audit as pb;
use vibebox_proto::audit::audit_service_server::AuditService;
use vibebox_proto::audit_ingest::audit_ingest_service_server::AuditIngestService;
use vibebox_proto::audit_ingest::audit_receipt_service_server::AuditReceiptService;
use vibebox_proto::audit_ingest::{
    AppendEventsRequest, AppendEventsResponse, CheckReceiptRequest, CheckReceiptResponse,
};

use crate::filter::{Filter, FilterError};
use crate::log::{Log, LogError};
use crate::service::{self, ReadError};
use crate::store::StoreError;

/// Events accepted in one `AppendEvents` call.
const MAX_EVENTS_PER_CALL: usize = 5000;

/// Callers allowed to append.
pub const INGEST_CALLERS: &[&str] = &["identity", "policy", "orchestrator", "gateway"];
/// Callers allowed to read (the gateway re-serves `AuditService` publicly).
pub const READ_CALLERS: &[&str] = &["gateway"];

/// Errors of the gRPC surface.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{caller} may not call {service}")]
    CallerNotAllowed {
        caller: String,
        service: &'static str,
    },
    #[error("events[{index}]: {source}")]
    InvalidEvent { index: usize, source: EventError },
    #[error("too many events in one call (at most {MAX_EVENTS_PER_CALL})")]
    TooManyEvents,
    #[error("invalid receipt: {field} {reason}")]
    InvalidReceipt {
        field: &'static str,
        reason: &'static str,
    },
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        use vibebox_server_kit::status;
        match e {
            ApiError::CallerNotAllowed { .. } => Status::permission_denied(e.to_string()),
            ApiError::InvalidEvent { index, ref source } => {
                let EventError::InvalidField { field, reason } = source;
                let field = format!("events[{index}].{field}");
                status::bad_request(&e.to_string(), &[(&field, reason)])
            }
            ApiError::TooManyEvents => {
                status::bad_request(&e.to_string(), &[("events", "too many")])
            }
            ApiError::InvalidReceipt { field, reason } => status::invalid_field(field, reason),
            ApiError::Filter(FilterError { field, reason }) => {
                status::bad_request(&e.to_string(), &[(&format!("filter.{field}"), reason)])
            }
            ApiError::Read(ReadError::BadPageToken) => {
                status::invalid_field("page_token", "not a token this service issued")
            }
            ApiError::Read(ReadError::Store(StoreError::Db(ref err)))
            | ApiError::Read(ReadError::Log(LogError::Store(StoreError::Db(ref err))))
            | ApiError::Log(LogError::Store(StoreError::Db(ref err)))
                if vibebox_db::is_transient(err) =>
            {
                status::unavailable("audit database", err)
            }
            ApiError::Read(ReadError::Store(ref err)) => status::internal(err),
            // Not an internal error: the log itself is incomplete (a
            // precondition of a complete export), named by its rule.
            ApiError::Read(ReadError::Tail(ref failure)) => status::precondition_failure(
                &format!("the audit log contradicts a receipt: {failure}"),
                &[(
                    crate::alerts::TAIL_RULE,
                    "log",
                    "events acknowledged earlier are no longer in the log",
                )],
            ),
            ApiError::Read(ReadError::Log(LogError::Closed)) | ApiError::Log(LogError::Closed) => {
                Status::unavailable("the audit service is shutting down")
            }
            ApiError::Read(ReadError::Log(ref err)) | ApiError::Log(ref err) => {
                status::internal(err)
            }
        }
    }
}

/// The calling service as its certificate names it. Which services may
/// call what is stated once, where `lib.rs` adds each service to the
/// server; a request without a caller identity never gets this far, and
/// is refused if it does.
fn caller<T>(request: &Request<T>, service: &'static str) -> Result<String, ApiError> {
    vibebox_server_kit::caller_service(request).ok_or(ApiError::CallerNotAllowed {
        caller: String::new(),
        service,
    })
}

/// `AuditIngestService`: durable, idempotent appends.
#[derive(Clone)]
pub struct IngestHandler {
    log: Log,
}

impl IngestHandler {
    pub fn new(log: Log) -> Self {
        Self { log }
    }
}

#[tonic::async_trait]
impl AuditIngestService for IngestHandler {
    async fn append_events(
        &self,
        request: Request<AppendEventsRequest>,
    ) -> Result<Response<AppendEventsResponse>, Status> {
        let caller = caller(&request, "AuditIngestService")?;
        let events = request.into_inner().events;
        if events.len() > MAX_EVENTS_PER_CALL {
            return Err(ApiError::TooManyEvents.into());
        }
        let now = prost_types::Timestamp::from(std::time::SystemTime::now());
        let events = events
            .into_iter()
            .enumerate()
            .map(|(index, mut e)| {
                e.time.get_or_insert(now);
                // The authenticated caller is the source, whatever it claims.
                e.source_service.clone_from(&caller);
                Event::try_from(e).map_err(|source| ApiError::InvalidEvent { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (sequences, hashes) = self
            .log
            .append(events)
            .await
            .map_err(ApiError::from)?
            .into_iter()
            .unzip();
        Ok(Response::new(AppendEventsResponse { sequences, hashes }))
    }
}

/// Longest accepted producer id.
const MAX_PRODUCER_ID: usize = 128;

/// `AuditReceiptService`: producers' receipts checked against the log.
#[derive(Clone)]
pub struct ReceiptHandler {
    log: Log,
}

impl ReceiptHandler {
    pub fn new(log: Log) -> Self {
        Self { log }
    }
}

#[tonic::async_trait]
impl AuditReceiptService for ReceiptHandler {
    async fn check_receipt(
        &self,
        request: Request<CheckReceiptRequest>,
    ) -> Result<Response<CheckReceiptResponse>, Status> {
        let caller = caller(&request, "AuditReceiptService")?;
        let req = request.into_inner();
        if req.producer_id.is_empty()
            || req.producer_id.len() > MAX_PRODUCER_ID
            || !req
                .producer_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(ApiError::InvalidReceipt {
                field: "producer_id",
                reason: "must be 1 to 128 letters, digits or '-'",
            }
            .into());
        }
        if req.sequence > 0
            && (req.hash.len() != 64 || !req.hash.chars().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(ApiError::InvalidReceipt {
                field: "hash",
                reason: "must be 64 hex digits",
            }
            .into());
        }
        // The authenticated caller names the holder, whatever it claims.
        let receipt = Receipt {
            holder: format!("producer {caller} ({})", req.producer_id),
            sequence: req.sequence,
            hash: req.hash,
        };
        let (head, failure) = self
            .log
            .check_receipt(&receipt)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(CheckReceiptResponse {
            head_sequence: head.sequence,
            head_hash: head.hash,
            intact: failure.is_none(),
            reason: failure.map(|f| f.to_string()).unwrap_or_default(),
        }))
    }
}

/// `AuditService`: queries, live watch, verification and export.
#[derive(Clone)]
pub struct AuditHandler {
    log: Log,
    shutdown: CancellationToken,
}

impl AuditHandler {
    pub fn new(log: Log, shutdown: CancellationToken) -> Self {
        Self { log, shutdown }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn report_to_proto(r: Report) -> pb::VerifyChainResponse {
    pb::VerifyChainResponse {
        ok: r.ok,
        events_checked: r.events_checked,
        first_broken_sequence: r.first_broken_sequence,
        reason: r.reason,
        head_hash: r.head_hash,
        head_sequence: r.head_sequence,
        checkpoints_verified: r.checkpoints_verified,
    }
}

#[tonic::async_trait]
impl AuditService for AuditHandler {
    async fn query_events(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> Result<Response<pb::QueryEventsResponse>, Status> {
        let req = request.into_inner();
        let filter = Filter::try_from(req.filter).map_err(ApiError::from)?;
        let page = service::query(&self.log, &filter, req.page_size, &req.page_token)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::QueryEventsResponse {
            events: page.events.iter().map(pb::AuditEvent::from).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    type WatchEventsStream = BoxStream<pb::WatchEventsResponse>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let filter = Filter::try_from(request.into_inner().filter).map_err(ApiError::from)?;
        let mut events = self.log.subscribe();
        let mut last = self.log.head().sequence;
        let log = self.log.clone();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    r = events.recv() => r,
                };
                let batch: Vec<Event> = match received {
                    Ok(e) if e.sequence <= last => continue,
                    Ok(e) => vec![(*e).clone()],
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Catch up from storage, then go on live.
                        match log.store().range(last + 1, u64::MAX, 10_000).await {
                            Ok(events) => events,
                            Err(err) => {
                                let _ = tx
                                    .send(Err(vibebox_server_kit::status::internal(&err)))
                                    .await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                for e in batch {
                    last = last.max(e.sequence);
                    if filter.matches(&e) {
                        let item = pb::WatchEventsResponse {
                            event: Some(pb::AuditEvent::from(&e)),
                        };
                        if tx.send(Ok(item)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify_chain(
        &self,
        request: Request<pb::VerifyChainRequest>,
    ) -> Result<Response<pb::VerifyChainResponse>, Status> {
        let req = request.into_inner();
        let report = service::verify(&self.log, req.from_sequence, req.to_sequence)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(report_to_proto(report)))
    }

    type ExportEventsStream = BoxStream<pb::ExportEventsResponse>;

    async fn export_events(
        &self,
        request: Request<pb::ExportEventsRequest>,
    ) -> Result<Response<Self::ExportEventsStream>, Status> {
        let req = request.into_inner();
        let (tx, mut rx) = mpsc::channel::<Result<String, ReadError>>(1024);
        let log = self.log.clone();
        let errors = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = service::export(&log, req.from_sequence, req.to_sequence, tx).await {
                let _ = errors.send(Err(e)).await;
            }
        });
        let (out_tx, out_rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                let item = item
                    .map(|json_line| pb::ExportEventsResponse { json_line })
                    .map_err(|e| Status::from(ApiError::from(e)));
                if out_tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use tonic_types::StatusExt;

    #[test]
    fn errors_map_to_codes_without_leaking_internals() {
        let denied = Status::from(ApiError::CallerNotAllowed {
            caller: "tester".into(),
            service: "AuditService",
        });
        assert_eq!(denied.code(), Code::PermissionDenied);

        let invalid = Status::from(ApiError::InvalidEvent {
            index: 2,
            source: EventError::InvalidField {
                field: "action",
                reason: "must be 1 to 128 characters",
            },
        });
        assert_eq!(invalid.code(), Code::InvalidArgument);
        let details = invalid.get_error_details();
        let bad = details.bad_request().expect("BadRequest details");
        assert_eq!(bad.field_violations[0].field, "events[2].action");

        let internal = Status::from(ApiError::Read(ReadError::Store(StoreError::Corrupt {
            sequence: 3,
            reason: "secret detail".into(),
        })));
        assert_eq!(internal.code(), Code::Internal);
        assert_eq!(internal.message(), "internal error");

        let closed = Status::from(ApiError::Log(LogError::Closed));
        assert_eq!(closed.code(), Code::Unavailable);
        let token = Status::from(ApiError::Read(ReadError::BadPageToken));
        assert_eq!(token.code(), Code::InvalidArgument);
    }
}
