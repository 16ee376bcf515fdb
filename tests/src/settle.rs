//! Long operations (issue #20): `CreateEnvironment`, `StartEnvironment`,
//! `StopEnvironment`, `RestartEnvironment` and `DeleteEnvironment` return as
//! soon as the change is accepted, with the environment in its transitional
//! state (CREATING, STARTING, STOPPING, DELETING); it settles later (RUNNING,
//! STOPPED, DELETED, or FAILED with a `failure_reason`). A test that relies
//! on the outcome (the state, the container existing or running) waits for
//! it with these helpers.
//!
//! Waiting asks `WaitEnvironment` first (one call of at most
//! [`WAIT_CALL`] at a time) and polls `GetEnvironment` every
//! [`POLL_INTERVAL`] while the gateway answers UNIMPLEMENTED; either way it
//! gives up (panics, naming the environment and its last state) after
//! [`SETTLE_LIMIT`]. An environment that is already settled is returned at
//! once, so these helpers are correct before and after the operations
//! became long.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::{Code, Status};
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    CreateEnvironmentRequest, DeleteEnvironmentRequest, Environment, EnvironmentState,
    GetEnvironmentRequest, RestartEnvironmentRequest, StartEnvironmentRequest,
    StopEnvironmentRequest, WaitEnvironmentRequest,
};

use crate::Authed;

/// How long a helper waits for an environment to settle before panicking.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(120);
/// Time between two `GetEnvironment` polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The `timeout` of one `WaitEnvironment` call (below the gateway's own
/// deadline for unary calls).
pub const WAIT_CALL: Duration = Duration::from_secs(20);

/// Whether `state` is one an operation passes through (CREATING, STARTING,
/// STOPPING, DELETING).
pub fn is_transitional(state: EnvironmentState) -> bool {
    matches!(
        state,
        EnvironmentState::Creating
            | EnvironmentState::Starting
            | EnvironmentState::Stopping
            | EnvironmentState::Deleting
    )
}

/// Whether `status` is the gateway's per-user or per-address rate limit
/// (waiting polls on, a little slower).
fn rate_limited(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted && status.message().contains("rate limit")
}

fn environment_of(env: Option<Environment>, what: &str) -> Environment {
    env.unwrap_or_else(|| panic!("{what}: the answer carries no environment"))
}

/// Waits (at most [`SETTLE_LIMIT`]) until environment `id` is not in a
/// transitional state and returns it as it is then. An error of
/// `WaitEnvironment` (other than UNIMPLEMENTED and the rate limit) or of
/// `GetEnvironment` is returned; running out of time panics.
pub async fn settle(
    client: &mut EnvironmentServiceClient<Authed>,
    id: &str,
) -> Result<Environment, Status> {
    settle_within(client, id, SETTLE_LIMIT).await
}

/// [`settle`] with a limit of its own.
pub async fn settle_within(
    client: &mut EnvironmentServiceClient<Authed>,
    id: &str,
    limit: Duration,
) -> Result<Environment, Status> {
    let deadline = Instant::now() + limit;
    let mut wait_served = true;
    let mut last: Option<Environment> = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            let state = last
                .as_ref()
                .map(|e| format!("{:?} ({:?})", e.state(), e.status_message))
                .unwrap_or_else(|| "never read".into());
            panic!(
                "environment {id} did not settle within {limit:?}: last state {state}: {last:?}"
            );
        }
        let left = deadline - now;
        if wait_served {
            let timeout = left.min(WAIT_CALL);
            let mut request = tonic::Request::new(WaitEnvironmentRequest {
                environment_id: id.into(),
                timeout: Some(prost_types::Duration {
                    seconds: timeout.as_secs() as i64,
                    nanos: timeout.subsec_nanos() as i32,
                }),
            });
            request.set_timeout(timeout + Duration::from_secs(5));
            match client.wait_environment(request).await {
                Ok(answer) => {
                    let env = environment_of(answer.into_inner().environment, "WaitEnvironment");
                    if !is_transitional(env.state()) {
                        return Ok(env);
                    }
                    last = Some(env);
                    continue;
                }
                Err(s) if s.code() == Code::Unimplemented => wait_served = false,
                // The call's own deadline (or the gateway's) passed before
                // an answer: ask again.
                Err(s) if s.code() == Code::DeadlineExceeded => {
                    tokio::time::sleep(POLL_INTERVAL).await;
                    continue;
                }
                Err(s) if rate_limited(&s) => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
                Err(s) => return Err(s),
            }
        }
        match client
            .get_environment(GetEnvironmentRequest {
                environment_id: id.into(),
            })
            .await
        {
            Ok(answer) => {
                let env = environment_of(answer.into_inner().environment, "GetEnvironment");
                if !is_transitional(env.state()) {
                    return Ok(env);
                }
                last = Some(env);
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            Err(s) if rate_limited(&s) => tokio::time::sleep(Duration::from_millis(300)).await,
            Err(s) => return Err(s),
        }
    }
}

/// Settles the environment an operation answered with (no environment in
/// the answer is a defect of the server: panics).
async fn settle_answer(
    client: &mut EnvironmentServiceClient<Authed>,
    what: &str,
    env: Option<Environment>,
) -> Result<Environment, Status> {
    let env = environment_of(env, what);
    if !is_transitional(env.state()) {
        return Ok(env);
    }
    settle(client, &env.id).await
}

/// The environment operations, each waiting until the environment has
/// settled. `Err` is the operation's own refusal (policy, validation, quota,
/// authorization, a state it cannot act in: all synchronous) or an error
/// while waiting; what the engine decides later (an image it cannot pull, a
/// spec it refuses) shows as a settled environment in state FAILED with a
/// `failure_reason`.
pub trait Settle {
    /// Waits until environment `id` has settled ([`settle`]).
    fn settle(&mut self, id: &str) -> impl Future<Output = Result<Environment, Status>> + Send;
    /// `CreateEnvironment`, then waits: RUNNING, or FAILED with the reason.
    fn create_settled(
        &mut self,
        request: CreateEnvironmentRequest,
    ) -> impl Future<Output = Result<Environment, Status>> + Send;
    /// `StartEnvironment`, then waits.
    fn start_settled(
        &mut self,
        id: &str,
    ) -> impl Future<Output = Result<Environment, Status>> + Send;
    /// `StopEnvironment` (with the graceful stop `timeout_seconds`), then
    /// waits.
    fn stop_settled(
        &mut self,
        id: &str,
        timeout_seconds: Option<u32>,
    ) -> impl Future<Output = Result<Environment, Status>> + Send;
    /// `RestartEnvironment`, then waits.
    fn restart_settled(
        &mut self,
        id: &str,
        timeout_seconds: Option<u32>,
    ) -> impl Future<Output = Result<Environment, Status>> + Send;
    /// `DeleteEnvironment`, then waits (DELETED).
    fn delete_settled(
        &mut self,
        id: &str,
    ) -> impl Future<Output = Result<Environment, Status>> + Send;
}

impl Settle for EnvironmentServiceClient<Authed> {
    async fn settle(&mut self, id: &str) -> Result<Environment, Status> {
        settle(self, id).await
    }

    async fn create_settled(
        &mut self,
        request: CreateEnvironmentRequest,
    ) -> Result<Environment, Status> {
        let env = self.create_environment(request).await?.into_inner();
        settle_answer(self, "CreateEnvironment", env.environment).await
    }

    async fn start_settled(&mut self, id: &str) -> Result<Environment, Status> {
        let env = self
            .start_environment(StartEnvironmentRequest {
                environment_id: id.into(),
            })
            .await?
            .into_inner();
        settle_answer(self, "StartEnvironment", env.environment).await
    }

    async fn stop_settled(
        &mut self,
        id: &str,
        timeout_seconds: Option<u32>,
    ) -> Result<Environment, Status> {
        let env = self
            .stop_environment(StopEnvironmentRequest {
                environment_id: id.into(),
                timeout_seconds,
            })
            .await?
            .into_inner();
        settle_answer(self, "StopEnvironment", env.environment).await
    }

    async fn restart_settled(
        &mut self,
        id: &str,
        timeout_seconds: Option<u32>,
    ) -> Result<Environment, Status> {
        let env = self
            .restart_environment(RestartEnvironmentRequest {
                environment_id: id.into(),
                timeout_seconds,
            })
            .await?
            .into_inner();
        settle_answer(self, "RestartEnvironment", env.environment).await
    }

    async fn delete_settled(&mut self, id: &str) -> Result<Environment, Status> {
        let env = self
            .delete_environment(DeleteEnvironmentRequest {
                environment_id: id.into(),
            })
            .await?
            .into_inner();
        settle_answer(self, "DeleteEnvironment", env.environment).await
    }
}
