//! Outgoing calls: channels that carry the current trace context and request
//! id to the next service, over mutual TLS.

use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request};
use opentelemetry::propagation::Injector;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::KitError;
use crate::layer::CURRENT_REQUEST_ID;
use crate::meta;
use crate::tls::TlsMaterial;

/// A lazily connecting channel that propagates trace context (W3C
/// `traceparent`) and the request id. Generated clients take it as their
/// transport: `FooClient::new(channel)`.
#[derive(Clone, Debug)]
pub struct GrpcChannel {
    inner: Channel,
}

/// HTTP/2 flow-control window of one stream on a channel (what a stream
/// whose reader stalls can hold of the connection).
pub(crate) const STREAM_WINDOW: u32 = 1 << 20;
/// The connection's window: room for every stream the gateway admits at
/// once (its stream cap, 256) to stall at the same time. One shared
/// connection carries every user's streams to a service; with the HTTP/2
/// defaults (2 MiB a stream, 5 MiB the connection) three streams whose
/// clients stop reading would freeze every other user's calls.
pub(crate) const CONNECTION_WINDOW: u32 = 320 * STREAM_WINDOW;

fn endpoint(url: &str) -> Result<Endpoint, KitError> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| KitError::Endpoint {
            url: url.to_owned(),
            message: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW))
}

/// A mutual-TLS channel to `url` (`https://host:port`), presenting
/// `material`'s certificate. Connects on first use and reconnects as needed.
pub fn connect(url: &str, material: &TlsMaterial) -> Result<GrpcChannel, KitError> {
    let url = url.replacen("http://", "https://", 1);
    let endpoint = endpoint(&url)?.tls_config(material.client_config())?;
    Ok(GrpcChannel {
        inner: endpoint.connect_lazy(),
    })
}

/// A plaintext channel (the gateway's public port in development, tests).
pub fn connect_plaintext(url: &str) -> Result<GrpcChannel, KitError> {
    Ok(GrpcChannel {
        inner: endpoint(url)?.connect_lazy(),
    })
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

impl tower::Service<Request<Body>> for GrpcChannel {
    type Response = <Channel as tower::Service<Request<Body>>>::Response;
    type Error = <Channel as tower::Service<Request<Body>>>::Error;
    type Future = <Channel as tower::Service<Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut HeaderInjector(req.headers_mut()))
        });
        if !req.headers().contains_key(meta::REQUEST_ID)
            && let Ok(Some(value)) =
                CURRENT_REQUEST_ID.try_with(|id| HeaderValue::from_str(id).ok())
        {
            req.headers_mut().insert(meta::REQUEST_ID, value);
        }
        self.inner.call(req)
    }
}

/// Adds `authorization: Bearer <token>` to every call of a client (nothing
/// without a token): the one interceptor every gateway client uses.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

/// A token that cannot travel in a header (control characters, non-ASCII).
#[derive(Debug, thiserror::Error)]
#[error("the token contains characters not allowed in a header")]
pub struct InvalidToken;

impl Bearer {
    /// Sends `token` (surrounding whitespace removed).
    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        format!("Bearer {}", token.trim())
            .parse()
            .map(|value| Self(Some(value)))
            .map_err(|_| InvalidToken)
    }

    /// Sends no authorization header.
    pub fn none() -> Self {
        Self(None)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose every call carries a bearer token.
pub type Authed = tonic::codegen::InterceptedService<GrpcChannel, Bearer>;
