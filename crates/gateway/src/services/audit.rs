//! `vibebox.audit.v1.AuditService`: read-only access to the audit log,
//! authorized per operation (`audit.query|watch|verify|export`) on the
//! filter's team (or the whole log when no team is named).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vibebox_proto::audit::audit_service_server::AuditService;
use vibebox_proto::audit::{
    EventFilter, ExportEventsRequest, ExportEventsResponse, QueryEventsRequest,
    QueryEventsResponse, VerifyChainRequest, VerifyChainResponse, WatchEventsRequest,
    WatchEventsResponse,
};
use vibebox_proto::authz::Resource;

use super::{ProxyStream, Recheck, observe, relay};
use crate::error::{GatewayError, Result};
use crate::gateway::{AUDIT, Call, Gateway};
use crate::validate;

/// The public audit service.
pub(crate) struct Audit {
    pub(crate) gateway: Arc<Gateway>,
}

fn check_filter(filter: Option<&EventFilter>) -> Result<Resource> {
    let mut resource = Resource {
        kind: "audit".into(),
        ..Default::default()
    };
    if let Some(f) = filter {
        validate::optional_id("filter.team_id", &f.team_id)?;
        validate::optional_id("filter.actor_user_id", &f.actor_user_id)?;
        validate::text("filter.action", &f.action, 128)?;
        validate::text("filter.resource_type", &f.resource_type, 128)?;
        validate::text("filter.resource_id", &f.resource_id, 256)?;
        validate::text("filter.text", &f.text, 1024)?;
        resource.team_id = f.team_id.clone();
    }
    Ok(resource)
}

impl Audit {
    async fn begin<T>(&self, request: &Request<T>, resource: Result<Resource>) -> Result<Call> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(request)).await?;
        gw.authorize(&call, resource?).await?;
        Ok(call)
    }

    /// Like `begin` for a call answered with a long-lived stream: returns
    /// what the stream's re-checks need.
    async fn begin_stream<T>(
        &self,
        request: &Request<T>,
        resource: Result<Resource>,
    ) -> Result<Recheck> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.stream_info(request)).await?;
        let resource = resource?;
        gw.authorize(&call, resource.clone()).await?;
        Ok(Recheck::new(gw.clone(), call, resource))
    }

    async fn query(&self, request: Request<QueryEventsRequest>) -> Result<QueryEventsResponse> {
        let m = request.get_ref();
        let resource = validate::page_size("page_size", m.page_size)
            .map_err(GatewayError::from)
            .and_then(|()| check_filter(m.filter.as_ref()));
        let call = self.begin(&request, resource).await?;
        Ok(self
            .gateway
            .audit
            .clone()
            .query_events(call.forward(request.into_inner()))
            .await
            .map_err(GatewayError::upstream(AUDIT))?
            .into_inner())
    }

    async fn watch(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<ProxyStream<WatchEventsResponse>> {
        let resource = check_filter(request.get_ref().filter.as_ref());
        let recheck = self.begin_stream(&request, resource).await?;
        let upstream = self
            .gateway
            .audit
            .clone()
            .watch_events(recheck.call.forward_stream(request.into_inner()))
            .await
            .map_err(GatewayError::upstream(AUDIT))?
            .into_inner();
        Ok(relay(AUDIT, upstream, Some, recheck))
    }

    async fn verify(&self, request: Request<VerifyChainRequest>) -> Result<VerifyChainResponse> {
        let resource = Ok(Resource {
            kind: "audit".into(),
            ..Default::default()
        });
        let call = self.begin(&request, resource).await?;
        // Verifying a long chain can take a while: the stream-style request
        // keeps the client's own deadline (if any) instead of ours.
        Ok(self
            .gateway
            .audit
            .clone()
            .verify_chain(call.forward(request.into_inner()))
            .await
            .map_err(GatewayError::upstream(AUDIT))?
            .into_inner())
    }

    async fn export(
        &self,
        request: Request<ExportEventsRequest>,
    ) -> Result<ProxyStream<ExportEventsResponse>> {
        let resource = Ok(Resource {
            kind: "audit".into(),
            ..Default::default()
        });
        let recheck = self.begin_stream(&request, resource).await?;
        let upstream = self
            .gateway
            .audit
            .clone()
            .export_events(recheck.call.forward_stream(request.into_inner()))
            .await
            .map_err(GatewayError::upstream(AUDIT))?
            .into_inner();
        Ok(relay(AUDIT, upstream, Some, recheck))
    }
}

#[tonic::async_trait]
impl AuditService for Audit {
    async fn query_events(
        &self,
        request: Request<QueryEventsRequest>,
    ) -> std::result::Result<Response<QueryEventsResponse>, Status> {
        observe(self.query(request)).await
    }

    type WatchEventsStream = ProxyStream<WatchEventsResponse>;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> std::result::Result<Response<Self::WatchEventsStream>, Status> {
        observe(self.watch(request)).await
    }

    async fn verify_chain(
        &self,
        request: Request<VerifyChainRequest>,
    ) -> std::result::Result<Response<VerifyChainResponse>, Status> {
        observe(self.verify(request)).await
    }

    type ExportEventsStream = ProxyStream<ExportEventsResponse>;

    async fn export_events(
        &self,
        request: Request<ExportEventsRequest>,
    ) -> std::result::Result<Response<Self::ExportEventsStream>, Status> {
        observe(self.export(request)).await
    }
}
