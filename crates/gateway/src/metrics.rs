//! Prometheus metrics: the recorder, the per-call instruments and the scrape
//! endpoint served on its own (loopback) listener.
//!
//! Series:
//! - `vibebox_gateway_requests_total{method,code}`: finished calls by gRPC code;
//! - `vibebox_gateway_request_duration_seconds{method}`: latency histogram
//!   (time to the response headers for streams);
//! - `vibebox_gateway_active_streams{method}`: open response streams;
//! - `vibebox_gateway_access_events_total{action}`: refused calls
//!   (`access.unauthenticated`, `access.denied`, `access.rate_limited`,
//!   `access.quota_exceeded`);
//! - `vibebox_gateway_alerts_total{rule,severity}`: `alert.raised` events of
//!   the audit log, followed live (`watch_alerts`);
//! - `vibebox_gateway_replica_reads_total{result}`: environment reads
//!   answered by the replica (`hit`) or asked of the orchestrator (`miss`);
//! - `vibebox_gateway_replica_synced`: 1 while the replica follows the
//!   orchestrator's feed (`replica`).

use std::sync::OnceLock;
use std::time::{Duration, Instant};
use vibebox_server_kit::status::code_name;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const REQUESTS: &str = "vibebox_gateway_requests_total";
const DURATION: &str = "vibebox_gateway_request_duration_seconds";
const ACTIVE_STREAMS: &str = "vibebox_gateway_active_streams";
const ACCESS_EVENTS: &str = "vibebox_gateway_access_events_total";
const ALERTS: &str = "vibebox_gateway_alerts_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus handle (the recorder is installed once; every
/// gateway in the process shares it).
pub(crate) fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let builder = PrometheusBuilder::new()
            .set_buckets(&buckets)
            .expect("static bucket list is not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a global metrics recorder was already installed; gateway metrics go there"
            );
        }
        handle
    })
}

/// Records one finished call.
pub(crate) fn record_call(method: &'static str, code: tonic::Code, started: Instant) {
    metrics::counter!(REQUESTS, "method" => method, "code" => code_name(code)).increment(1);
    metrics::histogram!(DURATION, "method" => method).record(started.elapsed().as_secs_f64());
}

/// Counts a refused call by its audit action.
pub(crate) fn record_access_event(action: &'static str) {
    metrics::counter!(ACCESS_EVENTS, "action" => action).increment(1);
}

/// Follows the audit log's `alert.raised` events and counts them by rule and
/// severity, reconnecting (with backoff) whenever the audit service is away.
pub(crate) async fn watch_alerts(audit: vibebox_server_kit::GrpcChannel, stop: CancellationToken) {
    use futures::StreamExt;
    use vibebox_proto::audit::audit_service_client::AuditServiceClient;
    use vibebox_proto::audit::{EventFilter, Severity, WatchEventsRequest};

    let mut backoff = Duration::from_millis(500);
    loop {
        let mut client = AuditServiceClient::new(audit.clone());
        let request = WatchEventsRequest {
            filter: Some(EventFilter {
                action: "alert.raised".into(),
                ..EventFilter::default()
            }),
        };
        let watched = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.watch_events(request) => r,
        };
        match watched {
            Ok(response) => {
                backoff = Duration::from_millis(500);
                let mut events = response.into_inner();
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        n = events.next() => n,
                    };
                    let Some(Ok(message)) = next else { break };
                    let Some(event) = message.event else { continue };
                    let severity = Severity::try_from(event.severity)
                        .map(|s| {
                            s.as_str_name()
                                .trim_start_matches("SEVERITY_")
                                .to_ascii_lowercase()
                        })
                        .unwrap_or_else(|_| "unknown".into());
                    metrics::counter!(ALERTS, "rule" => event.resource_id, "severity" => severity)
                        .increment(1);
                }
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), "alert watch unavailable; retrying");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Increments the active-stream gauge for as long as it lives.
pub(crate) struct StreamGuard {
    method: &'static str,
}

impl StreamGuard {
    pub(crate) fn new(method: &'static str) -> Self {
        metrics::gauge!(ACTIVE_STREAMS, "method" => method).increment(1.0);
        Self { method }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        metrics::gauge!(ACTIVE_STREAMS, "method" => self.method).decrement(1.0);
    }
}

/// The scrape response's content type (Prometheus text exposition 0.0.4).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `GET /metrics` in the Prometheus text format until `shutdown`
/// (other paths answer 404, other methods 405); also runs the recorder's
/// periodic upkeep. One scrape per connection: every response says
/// `Connection: close`, so an idle scraper holds no connection open and
/// shutdown is not kept waiting.
pub(crate) async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let handle = handle();
    let upkeep = {
        let shutdown = shutdown.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => handle.run_upkeep(),
                }
            }
        }
    };
    let app = router(handle);
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
    let (served, ()) = tokio::join!(server, upkeep);
    if let Err(error) = served {
        tracing::warn!(%error, "metrics server failed");
    }
}

/// The scrape endpoint's routes.
fn router(handle: &'static PrometheusHandle) -> axum::Router {
    use axum::http::header;
    axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move {
                ([(header::CONTENT_TYPE, CONTENT_TYPE)], handle.render())
            }),
        )
        .layer(axum::middleware::map_response(close_connection))
}

async fn close_connection(mut response: axum::response::Response) -> axum::response::Response {
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}
