//! `vibebox.identity.v1.IdentityService`: Login is forwarded as is (rate
//! limited per client address); every other call is authenticated,
//! validated, authorized and forwarded with the caller metadata and the
//! original authorization header.

use std::future::Future;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use vibebox_proto::authz::Resource;
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::identity::identity_service_server::IdentityService;
use vibebox_proto::identity::*;
use vibebox_server_kit::{GrpcChannel, meta};

use super::observe;
use crate::error::{GatewayError, Result};
use crate::gateway::{Call, Gateway, IDENTITY};
use crate::validate;

/// The public identity service.
pub(crate) struct Identity {
    pub(crate) gateway: Arc<Gateway>,
}

type Client = IdentityServiceClient<GrpcChannel>;

fn resource(kind: &str) -> Resource {
    Resource {
        kind: kind.to_owned(),
        ..Default::default()
    }
}

fn team(team_id: &str) -> Resource {
    Resource {
        kind: "team".into(),
        team_id: team_id.to_owned(),
        id: team_id.to_owned(),
        ..Default::default()
    }
}

fn with_id(kind: &str, id: &str) -> Resource {
    Resource {
        kind: kind.to_owned(),
        id: id.to_owned(),
        ..Default::default()
    }
}

impl Identity {
    /// Authenticates, validates (`check` returns the resource to authorize
    /// on), authorizes the table's operation and forwards with `send`.
    async fn forward<Req, Resp, Fut>(
        &self,
        request: Request<Req>,
        check: impl FnOnce(&Req, &Call) -> Result<Resource>,
        send: impl FnOnce(Client, Request<Req>) -> Fut,
    ) -> Result<Resp>
    where
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let gw = &self.gateway;
        let call = gw.authenticate(gw.info(&request)).await?;
        let message = request.into_inner();
        let resource = check(&message, &call)?;
        gw.authorize(&call, resource).await?;
        let response = send(gw.identity.clone(), call.forward_identity(message))
            .await
            .map_err(GatewayError::upstream(IDENTITY))?;
        Ok(response.into_inner())
    }

    async fn login(&self, request: Request<LoginRequest>) -> Result<LoginResponse> {
        let gw = &self.gateway;
        let info = gw.info(&request)?;
        gw.limit_anonymous(&info)?;
        let message = request.into_inner();
        validate::text("username", &message.username, 64)?;
        if message.password.len() > 1024 {
            return Err(GatewayError::Invalid(validate::FieldViolation {
                field: "password".into(),
                description: "must be at most 1024 bytes".into(),
            }));
        }
        let mut forwarded = Request::new(message);
        forwarded.set_timeout(info.timeout);
        let md = forwarded.metadata_mut();
        if let Ok(v) = info.request_id.parse() {
            md.insert(meta::REQUEST_ID, v);
        }
        if let Ok(v) = info.client_address.parse() {
            md.insert(meta::CLIENT_ADDRESS, v);
        }
        Ok(gw
            .identity
            .clone()
            .login(forwarded)
            .await
            .map_err(GatewayError::upstream(IDENTITY))?
            .into_inner())
    }
}

#[tonic::async_trait]
impl IdentityService for Identity {
    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> std::result::Result<Response<LoginResponse>, Status> {
        observe(Identity::login(self, request)).await
    }

    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> std::result::Result<Response<WhoAmIResponse>, Status> {
        let call = self.forward(
            request,
            |_, call| Ok(with_id("user", call.user_id())),
            |mut c, r| async move { c.who_am_i(r).await },
        );
        observe(call).await
    }

    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> std::result::Result<Response<CreateUserResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::text("username", &m.username, 64)?;
                validate::text("display_name", &m.display_name, 256)?;
                validate::text("password", &m.password, 1024)?;
                Ok(resource("platform"))
            },
            |mut c, r| async move { c.create_user(r).await },
        );
        observe(call).await
    }

    async fn list_users(
        &self,
        request: Request<ListUsersRequest>,
    ) -> std::result::Result<Response<ListUsersResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::page_size("page_size", m.page_size)?;
                validate::text("page_token", &m.page_token, 1024)?;
                Ok(resource("platform"))
            },
            |mut c, r| async move { c.list_users(r).await },
        );
        observe(call).await
    }

    async fn set_user_disabled(
        &self,
        request: Request<SetUserDisabledRequest>,
    ) -> std::result::Result<Response<SetUserDisabledResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::id("user_id", &m.user_id)?;
                Ok(with_id("user", &m.user_id))
            },
            |mut c, r| async move { c.set_user_disabled(r).await },
        );
        observe(call).await
    }

    async fn create_team(
        &self,
        request: Request<CreateTeamRequest>,
    ) -> std::result::Result<Response<CreateTeamResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::text("name", &m.name, 64)?;
                validate::text("display_name", &m.display_name, 256)?;
                Ok(resource("platform"))
            },
            |mut c, r| async move { c.create_team(r).await },
        );
        observe(call).await
    }

    async fn list_teams(
        &self,
        request: Request<ListTeamsRequest>,
    ) -> std::result::Result<Response<ListTeamsResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::page_size("page_size", m.page_size)?;
                validate::text("page_token", &m.page_token, 1024)?;
                Ok(resource("platform"))
            },
            |mut c, r| async move { c.list_teams(r).await },
        );
        observe(call).await
    }

    async fn add_team_member(
        &self,
        request: Request<AddTeamMemberRequest>,
    ) -> std::result::Result<Response<AddTeamMemberResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::id("team_id", &m.team_id)?;
                validate::id("user_id", &m.user_id)?;
                Ok(team(&m.team_id))
            },
            |mut c, r| async move { c.add_team_member(r).await },
        );
        observe(call).await
    }

    async fn set_team_member_role(
        &self,
        request: Request<SetTeamMemberRoleRequest>,
    ) -> std::result::Result<Response<SetTeamMemberRoleResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::id("team_id", &m.team_id)?;
                validate::id("user_id", &m.user_id)?;
                Ok(team(&m.team_id))
            },
            |mut c, r| async move { c.set_team_member_role(r).await },
        );
        observe(call).await
    }

    async fn remove_team_member(
        &self,
        request: Request<RemoveTeamMemberRequest>,
    ) -> std::result::Result<Response<RemoveTeamMemberResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::id("team_id", &m.team_id)?;
                validate::id("user_id", &m.user_id)?;
                Ok(team(&m.team_id))
            },
            |mut c, r| async move { c.remove_team_member(r).await },
        );
        observe(call).await
    }

    async fn list_team_members(
        &self,
        request: Request<ListTeamMembersRequest>,
    ) -> std::result::Result<Response<ListTeamMembersResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::id("team_id", &m.team_id)?;
                Ok(team(&m.team_id))
            },
            |mut c, r| async move { c.list_team_members(r).await },
        );
        observe(call).await
    }

    async fn create_api_token(
        &self,
        request: Request<CreateApiTokenRequest>,
    ) -> std::result::Result<Response<CreateApiTokenResponse>, Status> {
        let call = self.forward(
            request,
            |m, call| {
                validate::text("description", &m.description, 1024)?;
                Ok(with_id("user", call.user_id()))
            },
            |mut c, r| async move { c.create_api_token(r).await },
        );
        observe(call).await
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> std::result::Result<Response<RevokeTokenResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::id("token_id", &m.token_id)?;
                Ok(with_id("token", &m.token_id))
            },
            |mut c, r| async move { c.revoke_token(r).await },
        );
        observe(call).await
    }

    async fn create_service_account(
        &self,
        _request: Request<CreateServiceAccountRequest>,
    ) -> std::result::Result<Response<CreateServiceAccountResponse>, Status> {
        Err(Status::unimplemented("not implemented yet"))
    }

    async fn list_service_accounts(
        &self,
        _request: Request<ListServiceAccountsRequest>,
    ) -> std::result::Result<Response<ListServiceAccountsResponse>, Status> {
        Err(Status::unimplemented("not implemented yet"))
    }

    async fn delete_service_account(
        &self,
        _request: Request<DeleteServiceAccountRequest>,
    ) -> std::result::Result<Response<DeleteServiceAccountResponse>, Status> {
        Err(Status::unimplemented("not implemented yet"))
    }

    async fn create_service_account_token(
        &self,
        _request: Request<CreateServiceAccountTokenRequest>,
    ) -> std::result::Result<Response<CreateServiceAccountTokenResponse>, Status> {
        Err(Status::unimplemented("not implemented yet"))
    }

    async fn list_api_tokens(
        &self,
        _request: Request<ListApiTokensRequest>,
    ) -> std::result::Result<Response<ListApiTokensResponse>, Status> {
        Err(Status::unimplemented("not implemented yet"))
    }
}
