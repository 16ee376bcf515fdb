//! `vibebox.policy.v1.PolicyService`: dry runs against the active policy,
//! authorized as `policy.evaluate` (on the named team) and `policy.get`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vibebox_proto::authz::Resource;
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
        let call = gw
            .authenticate(gw.info("PolicyService/EvaluateSpec", &request))
            .await?;
        let message = request.into_inner();
        validate::optional_id("team_id", &message.team_id)?;
        validate::container_spec("spec", message.spec.as_ref())?;
        let resource = Resource {
            kind: "policy".into(),
            team_id: message.team_id.clone(),
            ..Default::default()
        };
        gw.authorize(&call, "policy.evaluate", resource).await?;
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
        let call = gw
            .authenticate(gw.info("PolicyService/GetPolicy", &request))
            .await?;
        let resource = Resource {
            kind: "policy".into(),
            ..Default::default()
        };
        gw.authorize(&call, "policy.get", resource).await?;
        Ok(gw
            .policy
            .clone()
            .get_policy(call.forward(request.into_inner()))
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
        observe("PolicyService/EvaluateSpec", self.evaluate(request)).await
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> std::result::Result<Response<GetPolicyResponse>, Status> {
        observe("PolicyService/GetPolicy", self.get(request)).await
    }
}
