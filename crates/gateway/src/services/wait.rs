//! `EnvironmentService/WaitEnvironment`: blocks until an environment has no
//! operation in progress (its state is not CREATING, STARTING, STOPPING or
//! DELETING) or its timeout passes, and answers the environment as it is
//! then (AIP-151 style: the client reads the state).
//!
//! - **Free while idle.** A waiter subscribes to the replica's change
//!   broadcast before it reads the environment, then sleeps until a change
//!   of that environment (or a loss of the feed) arrives: no polling. While
//!   the replica is not in sync, it asks the orchestrator once a second.
//! - **Long, like a stream.** The call may last up to an hour, so it is
//!   exempt from the gateway's deadline for unary calls
//!   (`--upstream-timeout-ms`) and from the server's handler timeout
//!   (`--request-timeout-ms`): [`LongUnary`] serves it with the streaming
//!   machinery (headers first, then the one answer and the trailers: on the
//!   wire the same as any unary answer), so the handler timeout, which ends
//!   when the headers are ready, never cuts it. It takes a share of the
//!   caller's streams (`--user-max-streams`), not of its short calls, and
//!   gives its global in-flight permit back, as every stream does.
//! - **Timeout.** `min(request.timeout, the call's grpc-timeout, 1 hour)`;
//!   without a request timeout, the call's deadline (or one hour). The
//!   answer comes slightly before the call's own deadline, so that the
//!   client gets the environment instead of DEADLINE_EXCEEDED.
//! - **Rights.** Authorized as `GetEnvironment` is (the environment's team
//!   and owner, operation `environment.wait`), then re-authorized every
//!   `--stream-recheck-ms` while waiting ([`Recheck`]): a revoked token ends
//!   the wait UNAUTHENTICATED, a lost right PERMISSION_DENIED.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use futures::stream::StreamExt;
use tokio::sync::broadcast::error::RecvError;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status};
use vibebox_proto::environment::{
    Environment, EnvironmentState, WaitEnvironmentRequest, WaitEnvironmentResponse,
};
use vibebox_proto::runtime::GetEnvironmentRequest;

use super::environment::{redact, resource_of};
use super::{ProxyStream, Recheck};
use crate::error::{GatewayError, Result};
use crate::gateway::{Call, Gateway, ORCHESTRATOR, client_timeout};
use crate::metrics::StreamGuard;
use crate::replica::Change;
use crate::validate::{self, FieldViolation};

/// The method [`LongUnary`] serves itself.
pub(crate) const WAIT_PATH: &str = "/vibebox.environment.v1.EnvironmentService/WaitEnvironment";

/// The longest wait.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(3600);

/// While the replica is not in sync, the orchestrator is asked this often.
const POLL: Duration = Duration::from_secs(1);

/// The answer leaves this much (at most) of the call's own deadline, so that
/// it arrives before the client gives up.
const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

/// Whether an operation is in progress in `state`.
pub(crate) fn transitional(state: EnvironmentState) -> bool {
    matches!(
        state,
        EnvironmentState::Creating
            | EnvironmentState::Starting
            | EnvironmentState::Stopping
            | EnvironmentState::Deleting
    )
}

/// How long to wait: `timeout` (validated), within the call's deadline
/// (less a margin) and [`MAX_WAIT`].
fn wait_limit(
    timeout: Option<prost_types::Duration>,
    call_deadline: Option<Duration>,
) -> Result<Duration> {
    let call = call_deadline
        .map(|d| d.saturating_sub(DEADLINE_MARGIN.min(d / 10)))
        .unwrap_or(MAX_WAIT)
        .min(MAX_WAIT);
    let Some(timeout) = timeout else {
        return Ok(call);
    };
    if timeout.seconds < 0 || !(0..1_000_000_000).contains(&timeout.nanos) {
        return Err(GatewayError::Invalid(FieldViolation {
            field: "timeout".into(),
            description: "must be a non-negative duration (at most 1h is waited)".into(),
        }));
    }
    let asked = Duration::from_secs(timeout.seconds.unsigned_abs())
        + Duration::from_nanos(timeout.nanos.unsigned_abs().into());
    Ok(asked.min(call))
}

/// Authenticates, validates and authorizes a wait, then answers a stream of
/// exactly one item: the environment once settled or at the timeout (or the
/// status that ended the wait).
pub(crate) async fn wait(
    gw: &Arc<Gateway>,
    request: Request<WaitEnvironmentRequest>,
) -> Result<ProxyStream<WaitEnvironmentResponse>> {
    let call_deadline = client_timeout(request.metadata());
    let call = gw.authenticate(gw.stream_info(&request)).await?;
    let req = request.into_inner();
    validate::uuid("environment_id", &req.environment_id)?;
    let limit = wait_limit(req.timeout, call_deadline)?;
    let deadline = tokio::time::Instant::now() + limit;
    // Subscribed before the read: a change after it is on the subscription.
    let changes = gw.replica.subscribe();
    let (environment, _) = gw.environment(&call, &req.environment_id).await?;
    let recheck = Recheck::new(gw.clone(), call, resource_of(&environment));
    Ok(futures::stream::once(async move {
        waiting(recheck, environment, changes, deadline)
            .await
            .map(|environment| WaitEnvironmentResponse {
                environment: Some(redact(environment)),
            })
            .map_err(Status::from)
    })
    .boxed())
}

/// Waits until `environment` settles or `deadline`, re-checking the rights.
async fn waiting(
    recheck: Recheck,
    mut environment: Environment,
    mut changes: tokio::sync::broadcast::Receiver<Arc<Change>>,
    deadline: tokio::time::Instant,
) -> Result<Environment> {
    let _active = StreamGuard::new(recheck.call.info.method);
    let gw = recheck.gateway.clone();
    let id = environment.id.clone();
    let period = gw.stream_recheck;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + POLL, POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_allowed = Instant::now();
    loop {
        if !transitional(environment.state()) {
            return Ok(environment);
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                // As it is now: one last look.
                return current(&gw, &recheck.call, &id).await;
            }
            _ = tick.tick() => {
                recheck.still_allowed(&mut last_allowed).await?;
            }
            change = changes.recv() => match change {
                Ok(change) => match &*change {
                    Change::Applied { environments, .. } => {
                        if let Some(changed) = environments.iter().find(|e| e.id == id) {
                            environment = changed.clone();
                        }
                    }
                    Change::Lost => environment = look(&gw, &recheck.call, &id, environment).await?,
                },
                Err(RecvError::Lagged(_)) => {
                    environment = look(&gw, &recheck.call, &id, environment).await?;
                }
                // The replica lives as long as the gateway: not before it ends.
                Err(RecvError::Closed) => return current(&gw, &recheck.call, &id).await,
            },
            _ = poll.tick(), if !gw.replica.is_synced() => {
                environment = look(&gw, &recheck.call, &id, environment).await?;
            }
        }
    }
}

/// The environment as the replica (when current) or the orchestrator has it.
async fn current(gw: &Gateway, call: &Call, id: &str) -> Result<Environment> {
    if let Some(environment) = gw.replica.get(id) {
        return Ok(environment);
    }
    let found = gw
        .runtime
        .clone()
        .get_environment(call.forward(GetEnvironmentRequest {
            environment_id: id.to_owned(),
        }))
        .await;
    match found {
        Ok(response) => response
            .into_inner()
            .environment
            .ok_or(GatewayError::EnvironmentDenied),
        Err(status) if status.code() == Code::NotFound => Err(GatewayError::EnvironmentDenied),
        Err(status) => Err(GatewayError::upstream(ORCHESTRATOR)(status)),
    }
}

/// Like [`current`] while waiting: an orchestrator that cannot answer now
/// is asked again later (the wait goes on with what was known), a missing
/// environment ends the wait.
async fn look(gw: &Gateway, call: &Call, id: &str, known: Environment) -> Result<Environment> {
    match current(gw, call, id).await {
        Ok(environment) => Ok(environment),
        Err(GatewayError::EnvironmentDenied) => Err(GatewayError::EnvironmentDenied),
        Err(error) => {
            tracing::debug!(%error, "cannot look at a waited environment now; asking again later");
            Ok(known)
        }
    }
}

/// The environment service with `WaitEnvironment` served as a long call
/// (see the module docs); every other method goes to `inner`.
#[derive(Clone)]
pub(crate) struct LongUnary<S> {
    inner: S,
    gateway: Arc<Gateway>,
    max_decoding_message_size: usize,
}

impl<S> LongUnary<S> {
    pub(crate) fn new(inner: S, gateway: Arc<Gateway>, max_decoding_message_size: usize) -> Self {
        Self {
            inner,
            gateway,
            max_decoding_message_size,
        }
    }
}

impl<S: NamedService> NamedService for LongUnary<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for LongUnary<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, std::result::Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != WAIT_PATH {
            return self.inner.call(request).boxed();
        }
        let gateway = self.gateway.clone();
        let limit = self.max_decoding_message_size;
        async move {
            let handler = tower::service_fn(move |request: Request<WaitEnvironmentRequest>| {
                let gateway = gateway.clone();
                async move {
                    wait(&gateway, request)
                        .await
                        .map(Response::new)
                        .map_err(Status::from)
                }
            });
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
                .apply_max_message_size_config(Some(limit), None);
            Ok(grpc.server_streaming(handler, request).await)
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn duration(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos })
    }

    #[test]
    fn the_wait_is_the_shortest_of_the_timeout_the_deadline_and_an_hour() {
        assert_eq!(wait_limit(None, None).unwrap(), MAX_WAIT);
        assert_eq!(
            wait_limit(duration(7200, 0), None).unwrap(),
            MAX_WAIT,
            "at most an hour"
        );
        assert_eq!(
            wait_limit(duration(1, 500_000_000), None).unwrap(),
            Duration::from_millis(1500)
        );
        // The call's deadline, less a margin so the answer arrives in time.
        assert_eq!(
            wait_limit(None, Some(Duration::from_secs(20))).unwrap(),
            Duration::from_millis(19_500)
        );
        assert_eq!(
            wait_limit(None, Some(Duration::from_secs(2))).unwrap(),
            Duration::from_millis(1800)
        );
        assert_eq!(
            wait_limit(duration(5, 0), Some(Duration::from_secs(20))).unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(
            wait_limit(duration(60, 0), Some(Duration::from_secs(20))).unwrap(),
            Duration::from_millis(19_500)
        );
        assert_eq!(wait_limit(duration(0, 0), None).unwrap(), Duration::ZERO);
        for bad in [duration(-1, 0), duration(0, -1), duration(1, 1_000_000_000)] {
            let Err(GatewayError::Invalid(v)) = wait_limit(bad, None) else {
                panic!("{bad:?} accepted");
            };
            assert_eq!(v.field, "timeout");
        }
    }

    #[test]
    fn only_operations_in_progress_are_waited_for() {
        use EnvironmentState as S;
        for state in [S::Creating, S::Starting, S::Stopping, S::Deleting] {
            assert!(transitional(state), "{state:?}");
        }
        for state in [
            S::Unspecified,
            S::Running,
            S::Stopped,
            S::Failed,
            S::Deleted,
            S::Quarantined,
        ] {
            assert!(!transitional(state), "{state:?}");
        }
    }
}
