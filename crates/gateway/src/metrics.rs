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
//!   orchestrator's feed (`replica`);
//! - `vibebox_gateway_watch_fell_behind_total{cause}`: `WatchEnvironments`
//!   streams ended ABORTED `watch.fell_behind` (`stalled`: the client took
//!   nothing for `--watch-max-lag-ms`; `lagging`: the change to send was that
//!   much older than the newest; `backlog`: past the replica's backlog).

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

/// Waits between attempts to follow the alerts.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

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
/// severity, reconnecting (with jittered backoff from `RETRY_MIN` to
/// `RETRY_MAX`) whenever the audit service is away.
pub(crate) async fn watch_alerts(audit: vibebox_server_kit::GrpcChannel, stop: CancellationToken) {
    use futures::StreamExt;
    use vibebox_proto::audit::audit_service_client::AuditServiceClient;
    use vibebox_proto::audit::{EventFilter, Severity, WatchEventsRequest};

    let retry_delays = || vibebox_server_kit::retry::backoff(RETRY_MIN, RETRY_MAX);
    let mut backoff = retry_delays();
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
                backoff = retry_delays();
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
            _ = tokio::time::sleep(backoff.next().unwrap_or(RETRY_MAX)) => {}
        }
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

/// How long a scraper may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` in the Prometheus text format (other paths answer
/// 404, other methods 405) until `shutdown`; also runs the recorder's
/// periodic upkeep. HTTP/1 by hyper, one request per connection and a
/// bounded wait for the request head, so an idle or slow client holds
/// nothing open for long. On shutdown it stops accepting; a scrape under way
/// finishes on its own task.
pub(crate) async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let handle = handle();
    let service = TowerToHyperService::new(router(handle));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(false);
    let mut upkeep = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = upkeep.tick() => handle.run_upkeep(),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let connection = http.serve_connection(TokioIo::new(stream), service.clone());
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%error, "metrics scrape connection failed");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// The scrape endpoint's one route.
fn router(handle: &'static PrometheusHandle) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || async move {
            (
                [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                handle.render(),
            )
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends `request` raw and reads the whole reply (the server closes the
    /// connection after one response).
    async fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut out))
            .await
            .expect("the server closes the connection after one response")
            .unwrap();
        out
    }

    #[tokio::test]
    async fn scrape_answers_get_metrics_once_per_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        handle();
        let server = tokio::spawn(serve(listener, stop.clone()));
        record_access_event("access.denied");

        // HTTP/1.1 without `Connection: close`: still one response, then EOF.
        let ok = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(
            ok.to_ascii_lowercase().contains("connection: close"),
            "{ok}"
        );
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{ok}"
        );
        assert!(ok.contains(ACCESS_EVENTS), "{ok}");

        let old = exchange(addr, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await;
        assert!(old.starts_with("HTTP/1.0 200"), "{old}");
        assert!(old.contains(ACCESS_EVENTS), "{old}");

        let post = exchange(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: l\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let other = exchange(addr, "GET /other HTTP/1.1\r\nHost: l\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns on shutdown")
            .unwrap();
    }

    /// A client that never sends its request head is cut off after
    /// `HEAD_TIMEOUT` (five seconds of real time).
    #[tokio::test]
    async fn a_silent_client_is_cut_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, stop.clone()));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = tokio::time::Instant::now();
        let mut out = Vec::new();
        let read = tokio::time::timeout(HEAD_TIMEOUT * 4, stream.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "still open after {:?}", started.elapsed());
        assert!(started.elapsed() >= HEAD_TIMEOUT, "{:?}", started.elapsed());
        stop.cancel();
    }
}
