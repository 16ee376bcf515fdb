//! `vibebox.environment.v1.EnvironmentService`: creates go through policy
//! (a clearance for exactly the hardened spec) to the orchestrator; every
//! other operation loads the environment, authorizes on its team and owner
//! and forwards to the orchestrator.

use std::sync::Arc;

use futures::stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use vibebox_proto::authz::Resource;
use vibebox_proto::clearance::IssueClearanceRequest;
use vibebox_proto::environment::environment_service_server::EnvironmentService;
use vibebox_proto::environment::{
    CreateEnvironmentRequest, CreateEnvironmentResponse, DeleteEnvironmentRequest,
    DeleteEnvironmentResponse, Environment, ExecRequest, ExecResponse, GetEnvironmentRequest,
    GetEnvironmentResponse, ListEnvironmentsRequest, ListEnvironmentsResponse,
    RestartEnvironmentRequest, RestartEnvironmentResponse, StartEnvironmentRequest,
    StartEnvironmentResponse, StopEnvironmentRequest, StopEnvironmentResponse, StreamLogsRequest,
    StreamLogsResponse, StreamStatsRequest, StreamStatsResponse, exec_request,
};
use vibebox_proto::runtime;

use super::{ProxyStream, Recheck, observe, relay};
use crate::error::{GatewayError, Result};
use crate::gateway::{Gateway, ORCHESTRATOR, POLICY};
use crate::validate::{self, FieldViolation};

/// The public environment service.
pub(crate) struct Environments {
    pub(crate) gateway: Arc<Gateway>,
}

fn upstream(status: Status) -> GatewayError {
    GatewayError::upstream(ORCHESTRATOR)(status)
}

impl Environments {
    async fn create(
        &self,
        request: Request<CreateEnvironmentRequest>,
    ) -> Result<CreateEnvironmentResponse> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(&request)).await?;
        let req = request.into_inner();
        let valid = validate::optional_id("request_id", &req.request_id)
            .and_then(|()| validate::id("team_id", &req.team_id))
            .and_then(|()| validate::environment_name("name", &req.name))
            .and_then(|()| validate::container_spec("spec", req.spec.as_ref()))
            .and_then(|()| validate::labels("labels", &req.labels));
        if let Err(violation) = valid {
            let error = GatewayError::from(violation);
            let resource = Resource {
                kind: "environment".into(),
                team_id: req.team_id.clone(),
                ..Resource::default()
            };
            gw.record_invalid(&call, &error, &resource);
            return Err(error);
        }
        let request_id = if req.request_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            req.request_id
        };
        let environment_id = uuid::Uuid::new_v4().to_string();
        let decision = gw
            .authorize(
                &call,
                Resource {
                    kind: "environment".into(),
                    team_id: req.team_id.clone(),
                    environment_id: environment_id.clone(),
                    owner_id: call.user_id().to_owned(),
                    id: environment_id.clone(),
                },
            )
            .await?;
        let cleared = gw
            .clearance
            .clone()
            .issue_clearance(call.forward(IssueClearanceRequest {
                spec: req.spec,
                environment_id: environment_id.clone(),
                team_id: req.team_id.clone(),
                user_id: call.user_id().to_owned(),
                team_role: decision.team_role,
            }))
            .await
            .map_err(GatewayError::upstream(POLICY))?
            .into_inner();
        let evaluation = cleared.evaluation.unwrap_or_default();
        let created = gw
            .runtime
            .clone()
            .create_environment(call.forward(runtime::CreateEnvironmentRequest {
                caller: Some(call.caller()),
                request_id,
                environment_id,
                team_id: req.team_id,
                owner_id: call.user_id().to_owned(),
                name: req.name,
                spec: evaluation.hardened_spec,
                clearance: cleared.clearance,
                canonical_image: evaluation.canonical_image,
                labels: req.labels,
            }))
            .await
            .map_err(upstream)?
            .into_inner();
        Ok(CreateEnvironmentResponse {
            environment: created.environment.map(redact),
        })
    }

    async fn get(&self, request: Request<GetEnvironmentRequest>) -> Result<GetEnvironmentResponse> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(&request)).await?;
        let id = &request.get_ref().environment_id;
        validate::uuid("environment_id", id)?;
        let (environment, _) = gw.environment(&call, id).await?;
        Ok(GetEnvironmentResponse {
            environment: Some(redact(environment)),
        })
    }

    async fn list(
        &self,
        request: Request<ListEnvironmentsRequest>,
    ) -> Result<ListEnvironmentsResponse> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(&request)).await?;
        let req = request.into_inner();
        validate::optional_id("team_id", &req.team_id)?;
        validate::page_size("page_size", req.page_size)?;
        validate::text("page_token", &req.page_token, 1024)?;
        validate::listing(
            &req.filter,
            &req.order_by,
            req.show_deleted,
            &req.page_token,
        )?;
        let team_ids = if req.team_id.is_empty() {
            // Every team the caller belongs to (and the token allows).
            gw.teams_allowed(&call).await?
        } else {
            gw.authorize(
                &call,
                Resource {
                    kind: "team".into(),
                    team_id: req.team_id.clone(),
                    id: req.team_id.clone(),
                    ..Default::default()
                },
            )
            .await?;
            vec![req.team_id]
        };
        if team_ids.is_empty() {
            // An empty team list means "all teams" upstream: never send it
            // on behalf of a user.
            return Ok(ListEnvironmentsResponse::default());
        }
        let listed = gw
            .runtime
            .clone()
            .list_environments(call.forward(runtime::ListEnvironmentsRequest {
                team_ids,
                page_size: req.page_size,
                page_token: req.page_token,
                show_deleted: req.show_deleted,
                filter: req.filter,
                order_by: req.order_by,
            }))
            .await
            .map_err(upstream)?
            .into_inner();
        Ok(ListEnvironmentsResponse {
            environments: listed.environments.into_iter().map(redact).collect(),
            next_page_token: listed.next_page_token,
        })
    }

    async fn start(
        &self,
        request: Request<StartEnvironmentRequest>,
    ) -> Result<StartEnvironmentResponse> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(&request)).await?;
        let id = request.into_inner().environment_id;
        validate::uuid("environment_id", &id)?;
        gw.environment(&call, &id).await?;
        let response = gw
            .runtime
            .clone()
            .start_environment(call.forward(runtime::StartEnvironmentRequest {
                caller: Some(call.caller()),
                environment_id: id,
            }))
            .await
            .map_err(upstream)?
            .into_inner();
        Ok(StartEnvironmentResponse {
            environment: response.environment.map(redact),
        })
    }

    async fn stop(
        &self,
        request: Request<StopEnvironmentRequest>,
    ) -> Result<StopEnvironmentResponse> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(&request)).await?;
        let req = request.into_inner();
        validate::uuid("environment_id", &req.environment_id)?;
        timeout_seconds(req.timeout_seconds)?;
        gw.environment(&call, &req.environment_id).await?;
        let response = gw
            .runtime
            .clone()
            .stop_environment(call.forward(runtime::StopEnvironmentRequest {
                caller: Some(call.caller()),
                environment_id: req.environment_id,
                timeout_seconds: req.timeout_seconds,
            }))
            .await
            .map_err(upstream)?
            .into_inner();
        Ok(StopEnvironmentResponse {
            environment: response.environment.map(redact),
        })
    }

    async fn restart(
        &self,
        request: Request<RestartEnvironmentRequest>,
    ) -> Result<RestartEnvironmentResponse> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(&request)).await?;
        let req = request.into_inner();
        validate::uuid("environment_id", &req.environment_id)?;
        timeout_seconds(req.timeout_seconds)?;
        gw.environment(&call, &req.environment_id).await?;
        let response = gw
            .runtime
            .clone()
            .restart_environment(call.forward(runtime::RestartEnvironmentRequest {
                caller: Some(call.caller()),
                environment_id: req.environment_id,
                timeout_seconds: req.timeout_seconds,
            }))
            .await
            .map_err(upstream)?
            .into_inner();
        Ok(RestartEnvironmentResponse {
            environment: response.environment.map(redact),
        })
    }

    async fn delete(
        &self,
        request: Request<DeleteEnvironmentRequest>,
    ) -> Result<DeleteEnvironmentResponse> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(&request)).await?;
        let id = request.into_inner().environment_id;
        validate::uuid("environment_id", &id)?;
        gw.environment(&call, &id).await?;
        let response = gw
            .runtime
            .clone()
            .delete_environment(call.forward(runtime::DeleteEnvironmentRequest {
                caller: Some(call.caller()),
                environment_id: id,
            }))
            .await
            .map_err(upstream)?
            .into_inner();
        Ok(DeleteEnvironmentResponse {
            environment: response.environment.map(redact),
        })
    }

    async fn extend(
        &self,
        request: Request<vibebox_proto::environment::ExtendEnvironmentRequest>,
    ) -> Result<vibebox_proto::environment::ExtendEnvironmentResponse> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(&request)).await?;
        let req = request.into_inner();
        validate::uuid("environment_id", &req.environment_id)?;
        extension(req.duration)?;
        gw.environment(&call, &req.environment_id).await?;
        let response = gw
            .runtime
            .clone()
            .extend_environment(call.forward(runtime::ExtendEnvironmentRequest {
                caller: Some(call.caller()),
                request: Some(req),
            }))
            .await
            .map_err(upstream)?
            .into_inner();
        Ok(vibebox_proto::environment::ExtendEnvironmentResponse {
            environment: response.environment.map(redact),
        })
    }

    async fn logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<ProxyStream<StreamLogsResponse>> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.stream_info(&request)).await?;
        let req = request.into_inner();
        validate::uuid("environment_id", &req.environment_id)?;
        let (environment, _) = gw.environment(&call, &req.environment_id).await?;
        let upstream_stream = gw
            .runtime
            .clone()
            .stream_logs(call.forward_stream(runtime::StreamLogsRequest { request: Some(req) }))
            .await
            .map_err(upstream)?
            .into_inner();
        Ok(relay(
            ORCHESTRATOR,
            upstream_stream,
            |m| m.chunk,
            Recheck::new(gw.clone(), call, resource_of(&environment)),
        ))
    }

    async fn stats(
        &self,
        request: Request<StreamStatsRequest>,
    ) -> Result<ProxyStream<StreamStatsResponse>> {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.stream_info(&request)).await?;
        let req = request.into_inner();
        validate::uuid("environment_id", &req.environment_id)?;
        let (environment, _) = gw.environment(&call, &req.environment_id).await?;
        let upstream_stream = gw
            .runtime
            .clone()
            .stream_stats(call.forward_stream(runtime::StreamStatsRequest { request: Some(req) }))
            .await
            .map_err(upstream)?
            .into_inner();
        Ok(relay(
            ORCHESTRATOR,
            upstream_stream,
            |m| m.sample,
            Recheck::new(gw.clone(), call, resource_of(&environment)),
        ))
    }

    async fn exec(
        &self,
        request: Request<Streaming<ExecRequest>>,
    ) -> Result<ProxyStream<ExecResponse>> {
        let gw = &self.gateway;
        let info = gw.stream_info(&request);
        let call = gw.authenticate(info).await?;
        let mut inbound = request.into_inner();
        let first = match inbound.next().await {
            Some(Ok(first)) => first,
            Some(Err(status)) => {
                return Err(GatewayError::Upstream {
                    service: "client",
                    status,
                });
            }
            None => return Err(violation("start", "the first message must be start")),
        };
        let Some(exec_request::Message::Start(start)) = &first.message else {
            return Err(violation("start", "the first message must be start"));
        };
        let id = validate::exec_start(start)?.to_string();
        let (environment, _) = gw.environment(&call, &id).await?;
        let recheck = Recheck::new(gw.clone(), call, resource_of(&environment));
        let call = &recheck.call;

        // The first message carries the caller; the rest are relayed as they
        // come (a second `start` or a client error ends the input).
        let rest = inbound
            .take_while(|item| {
                futures::future::ready(matches!(
                    item,
                    Ok(ExecRequest { message: Some(m) }) if !matches!(m, exec_request::Message::Start(_))
                ))
            })
            .filter_map(|item| futures::future::ready(item.ok()))
            .map(|request| runtime::ExecRequest {
                caller: None,
                request: Some(request),
            })
            // Input stops with the stream (rights withdrawn, client gone).
            .take_until(recheck.ended.clone().cancelled_owned());
        let outbound = futures::stream::once(futures::future::ready(runtime::ExecRequest {
            caller: Some(call.caller()),
            request: Some(first),
        }))
        .chain(rest);
        let upstream_stream = gw
            .runtime
            .clone()
            .exec(call.forward_stream(outbound))
            .await
            .map_err(upstream)?
            .into_inner();
        Ok(relay(
            ORCHESTRATOR,
            upstream_stream,
            |m| m.response,
            recheck,
        ))
    }
}

/// The environment as every read answers it: the spec's environment
/// variables keep their names, never their values (write-only secrets; the
/// container and Exec still get them).
pub(super) fn redact(mut environment: Environment) -> Environment {
    if let Some(spec) = environment.spec.as_mut() {
        for value in spec.env.values_mut() {
            value.clear();
        }
    }
    environment
}

/// What an environment's operations are authorized on.
pub(super) fn resource_of(environment: &Environment) -> Resource {
    Resource {
        kind: "environment".into(),
        team_id: environment.team_id.clone(),
        environment_id: environment.id.clone(),
        owner_id: environment.owner_id.clone(),
        id: environment.id.clone(),
    }
}

fn violation(field: &str, description: &str) -> GatewayError {
    GatewayError::Invalid(FieldViolation {
        field: field.to_owned(),
        description: description.to_owned(),
    })
}

/// An extension: from one minute to seven days.
fn extension(value: Option<prost_types::Duration>) -> Result<()> {
    const RANGE: &str = "must be between 1m and 7 days (168h)";
    let d = value.ok_or_else(|| violation("duration", RANGE))?;
    let in_range = d.nanos >= 0 && (60..=7 * 24 * 3600).contains(&d.seconds);
    let at_most = d.seconds < 7 * 24 * 3600 || d.nanos == 0;
    if in_range && at_most {
        Ok(())
    } else {
        Err(violation("duration", RANGE))
    }
}

fn timeout_seconds(value: Option<u32>) -> Result<()> {
    match value {
        Some(t) if t > 3600 => Err(violation("timeout_seconds", "must be at most 3600")),
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl EnvironmentService for Environments {
    async fn create_environment(
        &self,
        request: Request<CreateEnvironmentRequest>,
    ) -> std::result::Result<Response<CreateEnvironmentResponse>, Status> {
        observe(self.create(request)).await
    }

    async fn get_environment(
        &self,
        request: Request<GetEnvironmentRequest>,
    ) -> std::result::Result<Response<GetEnvironmentResponse>, Status> {
        observe(self.get(request)).await
    }

    async fn list_environments(
        &self,
        request: Request<ListEnvironmentsRequest>,
    ) -> std::result::Result<Response<ListEnvironmentsResponse>, Status> {
        observe(self.list(request)).await
    }

    async fn start_environment(
        &self,
        request: Request<StartEnvironmentRequest>,
    ) -> std::result::Result<Response<StartEnvironmentResponse>, Status> {
        observe(self.start(request)).await
    }

    async fn stop_environment(
        &self,
        request: Request<StopEnvironmentRequest>,
    ) -> std::result::Result<Response<StopEnvironmentResponse>, Status> {
        observe(self.stop(request)).await
    }

    async fn restart_environment(
        &self,
        request: Request<RestartEnvironmentRequest>,
    ) -> std::result::Result<Response<RestartEnvironmentResponse>, Status> {
        observe(self.restart(request)).await
    }

    async fn delete_environment(
        &self,
        request: Request<DeleteEnvironmentRequest>,
    ) -> std::result::Result<Response<DeleteEnvironmentResponse>, Status> {
        observe(self.delete(request)).await
    }

    type StreamLogsStream = ProxyStream<StreamLogsResponse>;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> std::result::Result<Response<Self::StreamLogsStream>, Status> {
        observe(self.logs(request)).await
    }

    type ExecStream = ProxyStream<ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<ExecRequest>>,
    ) -> std::result::Result<Response<Self::ExecStream>, Status> {
        observe(self.exec(request)).await
    }

    type StreamStatsStream = ProxyStream<StreamStatsResponse>;

    async fn stream_stats(
        &self,
        request: Request<StreamStatsRequest>,
    ) -> std::result::Result<Response<Self::StreamStatsStream>, Status> {
        observe(self.stats(request)).await
    }

    type PortForwardStream = ProxyStream<vibebox_proto::environment::PortForwardResponse>;

    async fn port_forward(
        &self,
        request: Request<Streaming<vibebox_proto::environment::PortForwardRequest>>,
    ) -> std::result::Result<Response<Self::PortForwardStream>, Status> {
        observe(super::forward::port_forward(
            &self.gateway,
            request,
            resource_of,
        ))
        .await
    }

    async fn copy_to(
        &self,
        request: Request<Streaming<vibebox_proto::environment::CopyToRequest>>,
    ) -> std::result::Result<Response<vibebox_proto::environment::CopyToResponse>, Status> {
        observe(super::copy::copy_to(&self.gateway, request, resource_of)).await
    }

    type CopyFromStream = ProxyStream<vibebox_proto::environment::CopyFromResponse>;

    async fn copy_from(
        &self,
        request: Request<vibebox_proto::environment::CopyFromRequest>,
    ) -> std::result::Result<Response<Self::CopyFromStream>, Status> {
        observe(super::copy::copy_from(&self.gateway, request, resource_of)).await
    }

    async fn extend_environment(
        &self,
        request: Request<vibebox_proto::environment::ExtendEnvironmentRequest>,
    ) -> std::result::Result<Response<vibebox_proto::environment::ExtendEnvironmentResponse>, Status>
    {
        observe(self.extend(request)).await
    }

    async fn update_environment(
        &self,
        request: Request<vibebox_proto::environment::UpdateEnvironmentRequest>,
    ) -> std::result::Result<Response<vibebox_proto::environment::UpdateEnvironmentResponse>, Status>
    {
        observe(super::update::update(&self.gateway, request)).await
    }

    /// Served by [`super::wait::LongUnary`] in the gateway (exempt from the
    /// handler timeout); this path gives the same answer when the service
    /// is mounted without it.
    async fn wait_environment(
        &self,
        request: Request<vibebox_proto::environment::WaitEnvironmentRequest>,
    ) -> std::result::Result<Response<vibebox_proto::environment::WaitEnvironmentResponse>, Status>
    {
        let mut answer = super::wait::wait(&self.gateway, request).await?;
        match answer.next().await {
            Some(answer) => answer.map(Response::new),
            None => Err(Status::internal("the wait ended without an answer")),
        }
    }

    type WatchEnvironmentsStream =
        ProxyStream<vibebox_proto::environment::WatchEnvironmentsResponse>;

    async fn watch_environments(
        &self,
        request: Request<vibebox_proto::environment::WatchEnvironmentsRequest>,
    ) -> std::result::Result<Response<Self::WatchEnvironmentsStream>, Status> {
        super::watch::watch(&self.gateway, request)
            .await
            .map(Response::new)
    }
}
