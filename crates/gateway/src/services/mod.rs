//! The public services the gateway serves. Each handler authenticates,
//! validates, authorizes and forwards to the internal service that owns the
//! operation; nothing else is routed (unknown paths are UNIMPLEMENTED).

use std::future::Future;
use std::time::Instant;

use futures::stream::{BoxStream, StreamExt};
use tonic::{Code, Response, Status, Streaming};

use crate::error::{GatewayError, Result};
use crate::metrics::{StreamGuard, record_call};

pub(crate) mod audit;
pub(crate) mod environment;
pub(crate) mod identity;
pub(crate) mod policy;

/// A boxed response stream.
pub(crate) type ProxyStream<T> = BoxStream<'static, std::result::Result<T, Status>>;

/// Runs one call, converting its error and recording its metrics.
pub(crate) async fn observe<T>(
    method: &'static str,
    call: impl Future<Output = Result<T>>,
) -> std::result::Result<Response<T>, Status> {
    let started = Instant::now();
    let result = call.await.map(Response::new).map_err(Status::from);
    let code = match &result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    record_call(method, code, started);
    result
}

/// Relays an upstream response stream item by item (no buffering beyond
/// HTTP/2 flow control: an item is pulled upstream only when the client
/// side can take one). Dropping the returned stream (client gone) drops the
/// upstream stream, which cancels the upstream call.
pub(crate) fn relay<U, T>(
    method: &'static str,
    service: &'static str,
    upstream: Streaming<U>,
    map: fn(U) -> Option<T>,
) -> ProxyStream<T>
where
    U: Send + 'static,
    T: Send + 'static,
{
    let guard = StreamGuard::new(method);
    upstream
        .filter_map(move |item| {
            let _active = &guard;
            futures::future::ready(match item {
                Ok(message) => map(message).map(Ok),
                Err(status) => Some(Err(Status::from(GatewayError::upstream(service)(status)))),
            })
        })
        .boxed()
}
