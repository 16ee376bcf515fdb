//! What every platform section shares: the running platform, the admin's
//! clients, the team, the Docker connection and the run's label.

use std::time::{Duration, Instant};

use anyhow::Context;
use bollard::Docker;
use tonic::Code;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, DeleteEnvironmentRequest, Environment,
    EnvironmentState, GetEnvironmentRequest, WaitEnvironmentRequest,
};
use vibebox_proto::identity::ListTeamsRequest;
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::policy::policy_service_client::PolicyServiceClient;
use vibebox_server_kit::GrpcChannel;

use crate::platform::{Authed, Platform, bearer};

/// How long an operation may take to settle before the run gives up.
const SETTLE_LIMIT: Duration = Duration::from_secs(180);
/// The `timeout` of one `WaitEnvironment` call (below the gateway's own
/// deadline for unary calls).
const WAIT_CALL: Duration = Duration::from_secs(20);
/// Time between `GetEnvironment` polls while the gateway does not serve
/// `WaitEnvironment`: short, so that polling adds little to a measured
/// create-to-running time.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Whether `state` is one a long operation passes through.
fn transitional(state: EnvironmentState) -> bool {
    matches!(
        state,
        EnvironmentState::Creating
            | EnvironmentState::Starting
            | EnvironmentState::Stopping
            | EnvironmentState::Deleting
    )
}

pub(crate) struct Ctx {
    pub(crate) platform: Platform,
    pub(crate) token: String,
    pub(crate) team: String,
    pub(crate) docker: Docker,
    pub(crate) image: String,
    pub(crate) run_id: String,
    pub(crate) channel: GrpcChannel,
}

impl Ctx {
    pub(crate) async fn new(
        platform: Platform,
        docker: Docker,
        image: String,
        run_id: String,
    ) -> anyhow::Result<Self> {
        let token = platform.admin_token()?;
        let channel = platform.channel()?;
        let teams = IdentityServiceClient::with_interceptor(channel.clone(), bearer(&token))
            .list_teams(ListTeamsRequest::default())
            .await
            .context("ListTeams through the gateway")?
            .into_inner()
            .teams;
        let team = teams
            .iter()
            .find(|t| t.name == "default")
            .or(teams.first())
            .context("the bootstrap team is missing")?
            .id
            .clone();
        Ok(Self {
            platform,
            token,
            team,
            docker,
            image,
            run_id,
            channel,
        })
    }

    pub(crate) fn environments(&self) -> EnvironmentServiceClient<Authed> {
        EnvironmentServiceClient::with_interceptor(self.channel.clone(), bearer(&self.token))
    }

    pub(crate) fn policy(&self) -> PolicyServiceClient<Authed> {
        PolicyServiceClient::with_interceptor(self.channel.clone(), bearer(&self.token))
    }

    /// A small spec of the development image running `command` (the image's
    /// own command when empty).
    pub(crate) fn spec(&self, command: &[&str]) -> ContainerSpec {
        ContainerSpec {
            image: self.image.clone(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            cpu_limit: Some(0.25),
            memory_limit_mb: Some(32),
            ..Default::default()
        }
    }

    /// Waits until environment `id` has settled (is not CREATING,
    /// STARTING, STOPPING or DELETING) and returns it: `WaitEnvironment`,
    /// or `GetEnvironment` polls while the gateway answers UNIMPLEMENTED.
    pub(crate) async fn settle(&self, id: &str) -> anyhow::Result<Environment> {
        let mut client = self.environments();
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut wait_served = true;
        let mut last = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                anyhow::bail!(
                    "environment {id} did not settle within {SETTLE_LIMIT:?}; last seen: {last:?}"
                );
            }
            let env = if wait_served {
                let timeout = (deadline - now).min(WAIT_CALL);
                let mut request = tonic::Request::new(WaitEnvironmentRequest {
                    environment_id: id.to_owned(),
                    timeout: Some(prost_types::Duration {
                        seconds: timeout.as_secs() as i64,
                        nanos: timeout.subsec_nanos() as i32,
                    }),
                });
                request.set_timeout(timeout + Duration::from_secs(5));
                match client.wait_environment(request).await {
                    Ok(answer) => answer.into_inner().environment,
                    Err(s) if s.code() == Code::Unimplemented => {
                        wait_served = false;
                        continue;
                    }
                    Err(s) if s.code() == Code::DeadlineExceeded => continue,
                    Err(s) => {
                        return Err(s).with_context(|| format!("waiting for environment {id}"));
                    }
                }
            } else {
                client
                    .get_environment(GetEnvironmentRequest {
                        environment_id: id.to_owned(),
                    })
                    .await
                    .with_context(|| format!("getting environment {id}"))?
                    .into_inner()
                    .environment
            };
            let env = env.with_context(|| format!("no environment {id} in the answer"))?;
            if !transitional(env.state()) {
                return Ok(env);
            }
            last = Some(env);
            if !wait_served {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    }

    /// Creates an environment through the gateway, waits until it has
    /// settled and checks it runs. Create is a long operation (it answers
    /// CREATING as soon as the change is accepted), so the time this takes
    /// is create-to-RUNNING, as the create benchmark reports it: timing
    /// only the CreateEnvironment call would make the ratio to the raw
    /// Docker baseline (which includes the container start) dishonest.
    pub(crate) async fn create(
        &self,
        name: &str,
        spec: ContainerSpec,
    ) -> anyhow::Result<Environment> {
        let accepted = self
            .environments()
            .create_environment(CreateEnvironmentRequest {
                labels: Default::default(),
                request_id: uuid::Uuid::new_v4().to_string(),
                team_id: self.team.clone(),
                name: name.to_owned(),
                spec: Some(spec),
            })
            .await
            .with_context(|| format!("creating environment {name} through the gateway"))?
            .into_inner()
            .environment
            .context("CreateEnvironment answered without an environment")?;
        let env = self.settle(&accepted.id).await?;
        anyhow::ensure!(
            env.state() == EnvironmentState::Running,
            "environment {name} is {:?}, not running: {}",
            env.state(),
            env.failure_reason
        );
        Ok(env)
    }

    /// Deletes an environment and waits until it is gone (delete is a long
    /// operation: what follows must not overlap the removal).
    pub(crate) async fn delete(&self, id: &str) -> anyhow::Result<()> {
        self.environments()
            .delete_environment(DeleteEnvironmentRequest {
                environment_id: id.to_owned(),
            })
            .await
            .with_context(|| format!("deleting environment {id}"))?;
        let env = self.settle(id).await?;
        anyhow::ensure!(
            env.state() == EnvironmentState::Deleted,
            "environment {id} is {:?} after its delete: {}",
            env.state(),
            env.failure_reason
        );
        Ok(())
    }
}
