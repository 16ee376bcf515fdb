//! `vibebox.policy.v1.PolicyService`: dry runs against the active policy,
//! authorized as `policy.evaluate` (on the named team) and `policy.get`.
//! `GetPolicy` shows a caller only the overlays of its own teams (those its
//! token may act on); platform admins and auditors see every overlay.

use std::sync::Arc;

use tonic::metadata::AsciiMetadataValue;
use tonic::{Request, Response, Status};
use vibebox_proto::authz::Resource;
use vibebox_proto::identity::PlatformRole;
use vibebox_proto::policy::policy_service_server::PolicyService;
use vibebox_proto::policy::{
    EvaluateSpecRequest, EvaluateSpecResponse, GetPolicyRequest, GetPolicyResponse,
};

use super::observe;
use crate::error::{GatewayError, Result};
use crate::gateway::{Gateway, POLICY};
use crate::validate;

/// The public policy service.
pub(crate) struct Policy {
    pub(crate) gateway: Arc<Gateway>,
}

impl Policy {
    async fn evaluate(
        &self,
        request: Request<EvaluateSpecRequest>,
    ) -> Result<EvaluateSpecResponse> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(&request)).await?;
        let message = request.into_inner();
        validate::optional_id("team_id", &message.team_id)?;
        validate::container_spec("spec", message.spec.as_ref())?;
        let resource = Resource {
            kind: "policy".into(),
            team_id: message.team_id.clone(),
            ..Default::default()
        };
        gw.authorize(&call, resource).await?;
        Ok(gw
            .policy
            .clone()
            .evaluate_spec(call.forward(message))
            .await
            .map_err(GatewayError::upstream(POLICY))?
            .into_inner())
    }

    async fn get(&self, request: Request<GetPolicyRequest>) -> Result<GetPolicyResponse> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(&request)).await?;
        let resource = Resource {
            kind: "policy".into(),
            ..Default::default()
        };
        let decision = gw.authorize(&call, resource).await?;
        let visible = if decision.platform_role == PlatformRole::Admin as i32
            || decision.platform_role == PlatformRole::Auditor as i32
        {
            "*".to_owned()
        } else {
            gw.teams_allowed(&call).await?.join(",")
        };
        let mut forwarded = call.forward(request.into_inner());
        // Team ids are validated ids (ASCII, no commas); one that would not
        // fit a header is left out, never shown by mistake.
        if let Ok(value) = visible.parse::<AsciiMetadataValue>() {
            forwarded
                .metadata_mut()
                .insert(vibebox_server_kit::meta::VISIBLE_TEAMS, value);
        }
        Ok(gw
            .policy
            .clone()
            .get_policy(forwarded)
            .await
            .map_err(GatewayError::upstream(POLICY))?
            .into_inner())
    }
}

#[tonic::async_trait]
impl PolicyService for Policy {
    async fn evaluate_spec(
        &self,
        request: Request<EvaluateSpecRequest>,
    ) -> std::result::Result<Response<EvaluateSpecResponse>, Status> {
        observe(self.evaluate(request)).await
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> std::result::Result<Response<GetPolicyResponse>, Status> {
        observe(self.get(request)).await
    }
}
