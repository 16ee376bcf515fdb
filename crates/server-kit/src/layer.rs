//! The tower layer every server runs: request ids, caller identity checks,
//! load shedding, trace-context extraction and panic catching.

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::FutureExt;
use http::{HeaderValue, Request, Response};
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TraceContextExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::meta;

tokio::task_local! {
    /// The request id of the call being served, for outgoing calls.
    pub(crate) static CURRENT_REQUEST_ID: String;
}

/// The mTLS service identity of the caller, when it presented a certificate
/// signed by the platform CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerService(pub String);

/// The id of the request being served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// The caller's service identity (from its client certificate).
pub fn caller_service<T>(request: &tonic::Request<T>) -> Option<String> {
    request
        .extensions()
        .get::<CallerService>()
        .map(|c| c.0.clone())
}

/// The request id of a call.
pub fn request_id<T>(request: &tonic::Request<T>) -> Option<String> {
    request.extensions().get::<RequestId>().map(|r| r.0.clone())
}

/// The current trace id as 32 hex digits, or an empty string outside a trace.
pub fn trace_id() -> String {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    if span_context.is_valid() {
        span_context.trace_id().to_string()
    } else {
        String::new()
    }
}

/// The call's share of the server's concurrency limit, in the request's
/// extensions. It is held until the response body ends; a handler whose call
/// turns into a long-lived stream counted by a limit of its own gives it back
/// with [`release`](Self::release), so that open streams cannot starve short
/// calls of the global limit.
#[derive(Clone, Debug)]
pub struct InFlightPermit(Arc<std::sync::Mutex<Option<OwnedSemaphorePermit>>>);

impl InFlightPermit {
    /// The permit of `request`, if the kit's layer served it.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Self> {
        request.extensions().get::<Self>().cloned()
    }

    /// Gives the permit back now (idempotent).
    pub fn release(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Paths served to any caller: health checks and reflection describe the
/// server, they do not act.
fn is_open_path(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// Which services' certificates may call which paths: the one place a
/// server states its allowed callers (see [`crate::ServerBuilder`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Callers {
    /// For every path no rule below names.
    pub(crate) default: Option<Vec<String>>,
    /// `(path prefix, callers)`: a service (`/pkg.Service/`) or one method
    /// (`/pkg.Service/Method`); the longest matching prefix decides.
    pub(crate) rules: Vec<(String, Vec<String>)>,
}

impl Callers {
    /// Whether any rule restricts callers (then TLS is required).
    pub(crate) fn restricts(&self) -> bool {
        self.default.is_some() || !self.rules.is_empty()
    }

    /// The callers allowed on `path`, if the path is restricted.
    pub(crate) fn for_path(&self, path: &str) -> Option<&[String]> {
        self.rules
            .iter()
            .filter(|(prefix, _)| {
                path == prefix || (prefix.ends_with('/') && path.starts_with(prefix.as_str()))
            })
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, callers)| callers.as_slice())
            .or(self.default.as_deref())
    }
}

pub(crate) struct Shared {
    pub(crate) callers: Callers,
    pub(crate) permits: Arc<Semaphore>,
    pub(crate) service: &'static str,
    /// Service identities of client certificates already parsed, by DER
    /// bytes (the name is a pure function of the verified certificate;
    /// parsing it on every call was a visible share of a call's cost).
    pub(crate) identities: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Option<String>>>,
}

/// Certificates whose identity is remembered before the map is emptied.
const MAX_REMEMBERED_IDENTITIES: usize = 256;

#[derive(Clone)]
pub(crate) struct KitLayer {
    pub(crate) shared: Arc<Shared>,
}

impl<S> tower::Layer<S> for KitLayer {
    type Service = KitService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        KitService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct KitService<S> {
    inner: S,
    shared: Arc<Shared>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

fn reject(status: Status, request_id: &str) -> Response<Body> {
    let mut response = status.into_http::<Body>();
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(meta::REQUEST_ID, value);
    }
    response
}

fn valid_request_id(value: &HeaderValue) -> Option<String> {
    let s = value.to_str().ok()?;
    (!s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
    .then(|| s.to_owned())
}

fn peer_identity<B>(shared: &Shared, req: &Request<B>) -> Option<String> {
    let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    let der: &[u8] = certs.first()?.as_ref();
    let mut known = shared.identities.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(identity) = known.get(der) {
        return identity.clone();
    }
    let identity = crate::tls::service_identity(der);
    if known.len() >= MAX_REMEMBERED_IDENTITIES {
        known.clear();
    }
    known.insert(der.to_vec(), identity.clone());
    identity
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

impl<S, B> tower::Service<Request<B>> for KitService<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let path = req.uri().path().to_owned();

        let request_id = req
            .headers()
            .get(meta::REQUEST_ID)
            .and_then(valid_request_id)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        req.extensions_mut().insert(RequestId(request_id.clone()));

        let caller = peer_identity(&shared, &req);
        if let Some(caller) = &caller {
            req.extensions_mut().insert(CallerService(caller.clone()));
        }
        if let Some(allowed) = shared.callers.for_path(&path)
            && !is_open_path(&path)
        {
            let verdict = match &caller {
                None => Some(Status::unauthenticated(
                    "a client certificate signed by the platform CA is required",
                )),
                Some(name) if !allowed.iter().any(|a| a == name) => {
                    tracing::warn!(caller = %name, %path, "refused a caller that is not allowed");
                    Some(Status::permission_denied(format!(
                        "service {name:?} may not call {}",
                        shared.service
                    )))
                }
                Some(_) => None,
            };
            if let Some(status) = verdict {
                return Box::pin(async move { Ok(reject(status, &request_id)) });
            }
        }

        let permit = match shared.permits.clone().try_acquire_owned() {
            Ok(permit) => InFlightPermit(Arc::new(std::sync::Mutex::new(Some(permit)))),
            Err(_) => {
                metrics_shed(&path);
                return Box::pin(async move {
                    Ok(reject(
                        crate::status::retry_later(
                            "server overloaded: too many concurrent calls, retry later",
                            std::time::Duration::from_secs(1),
                        ),
                        &request_id,
                    ))
                });
            }
        };
        req.extensions_mut().insert(permit.clone());

        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(req.headers()))
        });
        let span = tracing::info_span!(
            "grpc",
            otel.name = %path,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %path,
            request_id = %request_id,
            caller = caller.as_deref().unwrap_or(""),
        );
        let _ = span.set_parent(parent);

        let future = inner.call(req);
        let rid = request_id.clone();
        Box::pin(
            async move {
                let outcome = CURRENT_REQUEST_ID
                    .scope(rid.clone(), AssertUnwindSafe(future).catch_unwind())
                    .await;
                let response = match outcome {
                    Ok(Ok(response)) => response,
                    Ok(Err(never)) => match never {},
                    Err(_) => {
                        tracing::error!("handler panicked");
                        Status::internal("internal error").into_http::<Body>()
                    }
                };
                let (mut parts, body) = response.into_parts();
                if let Ok(value) = HeaderValue::from_str(&rid) {
                    parts.headers.insert(meta::REQUEST_ID, value);
                }
                Ok(Response::from_parts(
                    parts,
                    Body::new(PermitBody {
                        inner: body,
                        _permit: permit,
                    }),
                ))
            }
            .instrument(span),
        )
    }
}

fn metrics_shed(path: &str) {
    tracing::warn!(%path, "shed a call: concurrency limit reached");
}

pin_project_lite::pin_project! {
    /// A response body that holds its concurrency permit until the body ends,
    /// so streams count against the limit for as long as they run.
    struct PermitBody {
        #[pin]
        inner: Body,
        _permit: InFlightPermit,
    }
}

impl http_body::Body for PermitBody {
    type Data = bytes_type::Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

mod bytes_type {
    pub(super) use tonic::codegen::Bytes;
}

#[cfg(test)]
mod caller_rules {
    use super::Callers;

    #[test]
    fn the_longest_rule_decides_and_the_default_covers_the_rest() {
        let callers = Callers {
            default: Some(vec!["gateway".into()]),
            rules: vec![
                ("/pkg.Clearance/".into(), vec!["gateway".into()]),
                (
                    "/pkg.Clearance/GetKeys".into(),
                    vec!["gateway".into(), "orchestrator".into()],
                ),
                ("/pkg.Ingest/".into(), vec!["identity".into()]),
            ],
        };
        let names = |path: &str| callers.for_path(path).map(<[String]>::to_vec);
        assert_eq!(names("/pkg.Clearance/Issue").unwrap(), ["gateway"]);
        assert_eq!(
            names("/pkg.Clearance/GetKeys").unwrap(),
            ["gateway", "orchestrator"]
        );
        // A method rule is exact: a longer path is not that method.
        assert_eq!(names("/pkg.Clearance/GetKeysAll").unwrap(), ["gateway"]);
        assert_eq!(names("/pkg.Ingest/Append").unwrap(), ["identity"]);
        assert_eq!(names("/pkg.Other/Call").unwrap(), ["gateway"]);
        assert!(Callers::default().for_path("/pkg.Other/Call").is_none());
    }
}
