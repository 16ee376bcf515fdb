//! The public services the gateway serves. Every request first passes the
//! authorization table (`crate::authz`), which names its method and
//! operation and refuses what it does not list; each handler then
//! authenticates (`Gateway::authenticate`, which takes its fair share),
//! validates, authorizes the table's operation on the resource the request
//! names and forwards to the internal service that owns it.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Response, Status, Streaming};
use vibebox_proto::authz::Resource;

use crate::error::{GatewayError, Result};
use crate::gateway::{Call, Gateway};
use crate::metrics::StreamGuard;

pub(crate) mod audit;
pub(crate) mod copy;
pub(crate) mod environment;
pub(crate) mod forward;
pub(crate) mod identity;
pub(crate) mod policy;
pub(crate) mod update;
pub(crate) mod wait;
pub(crate) mod watch;

/// A boxed response stream.
pub(crate) type ProxyStream<T> = BoxStream<'static, std::result::Result<T, Status>>;

/// Runs one call, converting its error (its metrics are recorded by
/// [`crate::authz::Guarded`], per method of the table).
pub(crate) async fn observe<T>(
    call: impl Future<Output = Result<T>>,
) -> std::result::Result<Response<T>, Status> {
    call.await.map(Response::new).map_err(Status::from)
}

/// What a long stream must keep being allowed: re-authorized every
/// `stream_recheck` through the gateway's decision path (whose cache keeps a
/// decision at most a second), so that revoking the token, disabling the
/// user, a demotion or a removal from the team ends the stream within two
/// seconds.
pub(crate) struct Recheck {
    pub(crate) gateway: Arc<Gateway>,
    /// The authenticated call; its fair share lives as long as the stream.
    pub(crate) call: Call,
    pub(crate) resource: Resource,
    /// Cancelled when the stream ends, for whatever reason (Exec stops
    /// relaying the client's input with it).
    pub(crate) ended: CancellationToken,
}

impl Recheck {
    pub(crate) fn new(gateway: Arc<Gateway>, call: Call, resource: Resource) -> Self {
        Self {
            gateway,
            call,
            resource,
            ended: CancellationToken::new(),
        }
    }

    /// Asks again; `last_allowed` is when the last decision allowed.
    pub(crate) async fn still_allowed(&self, last_allowed: &mut Instant) -> Result<()> {
        let decided = self
            .gateway
            .authorize(&self.call, self.resource.clone())
            .await;
        match decided {
            Ok(_) => {
                *last_allowed = Instant::now();
                Ok(())
            }
            Err(GatewayError::InvalidToken(reason)) => Err(GatewayError::StreamRevoked(reason)),
            Err(GatewayError::Denied(_) | GatewayError::EnvironmentDenied) => {
                Err(GatewayError::StreamWithdrawn {
                    operation: self.call.operation(),
                })
            }
            // Identity cannot be asked: the stream lives on only while the
            // last decision is within the revocation bound (fail closed).
            Err(error @ GatewayError::Unavailable { .. }) => {
                if last_allowed.elapsed() < MAX_UNCHECKED {
                    tracing::debug!(%error, "cannot re-authorize a stream yet");
                    Ok(())
                } else {
                    Err(error)
                }
            }
            Err(other) => Err(other),
        }
    }
}

/// Longest time a stream stays open without a decision that allows it.
pub(crate) const MAX_UNCHECKED: Duration = Duration::from_secs(2);

/// Relays an upstream response stream item by item while re-authorizing it
/// periodically (see [`Recheck`]). A relay task owns the upstream stream: it
/// pulls an item only when the client side can take one (no buffering beyond
/// one item and HTTP/2 flow control), and keeps re-checking even while the
/// client does not read. When the rights are gone it drops the upstream
/// (cancelling the upstream call) and ends the client's stream with
/// UNAUTHENTICATED (token or user no longer valid) or PERMISSION_DENIED (the
/// operation no longer allowed). Dropping the returned stream (client gone)
/// ends the task, which drops the upstream stream too.
pub(crate) fn relay<U, T>(
    service: &'static str,
    mut upstream: Streaming<U>,
    map: fn(U) -> Option<T>,
    recheck: Recheck,
) -> ProxyStream<T>
where
    U: Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = mpsc::channel::<std::result::Result<T, Status>>(1);
    let method = recheck.call.info.method;
    let guard = StreamGuard::new(method);
    let period = recheck.gateway.stream_recheck;
    tokio::spawn(async move {
        let _active = guard;
        let _ended = recheck.ended.clone().drop_guard();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_allowed = Instant::now();
        let mut pending: Option<std::result::Result<T, Status>> = None;
        loop {
            tokio::select! {
                () = tx.closed() => return,
                _ = tick.tick() => {
                    if let Err(error) = recheck.still_allowed(&mut last_allowed).await {
                        tracing::debug!(method, %error, "stream ended: rights re-checked");
                        drop(upstream);
                        recheck.ended.cancel();
                        let _ = tx.send(Err(Status::from(error))).await;
                        return;
                    }
                }
                slot = tx.reserve(), if pending.is_some() => {
                    let Ok(slot) = slot else { return };
                    if let Some(item) = pending.take() {
                        slot.send(item);
                    }
                }
                item = upstream.next(), if pending.is_none() => match item {
                    None => return,
                    Some(Ok(message)) => pending = map(message).map(Ok),
                    Some(Err(status)) => {
                        pending = Some(Err(Status::from(GatewayError::upstream(service)(status))));
                    }
                },
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed()
}
