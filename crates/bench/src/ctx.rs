//! What every platform section shares: the running platform, the admin's
//! clients, the team, the Docker connection and the run's label.

use anyhow::Context;
use bollard::Docker;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, DeleteEnvironmentRequest, Environment,
    EnvironmentState,
};
use vibebox_proto::identity::ListTeamsRequest;
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::policy::policy_service_client::PolicyServiceClient;
use vibebox_server_kit::GrpcChannel;

use crate::platform::{Authed, Platform, bearer};

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

    /// Creates an environment through the gateway and checks it runs.
    pub(crate) async fn create(
        &self,
        name: &str,
        spec: ContainerSpec,
    ) -> anyhow::Result<Environment> {
        let env = self
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
        anyhow::ensure!(
            env.state() == EnvironmentState::Running,
            "environment {name} is {:?}, not running: {}",
            env.state(),
            env.failure_reason
        );
        Ok(env)
    }

    pub(crate) async fn delete(&self, id: &str) -> anyhow::Result<()> {
        self.environments()
            .delete_environment(DeleteEnvironmentRequest {
                environment_id: id.to_owned(),
            })
            .await
            .with_context(|| format!("deleting environment {id}"))?;
        Ok(())
    }
}
