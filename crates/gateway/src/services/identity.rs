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

/// A service account, by id only: identity decides in the account's own
/// team, which it looks up itself (a team the client names is never
/// trusted). The token's own checks run without a team here, so a token
/// restricted to teams cannot manage service accounts by id.
fn service_account(id: &str) -> Resource {
    with_id("service_account", id)
}

/// Most values in one list of `TokenRestrictions`.
const MAX_RESTRICTION_VALUES: usize = 16;
/// Longest token lifetime a request may name (identity's platform maximum
/// is far below; this only keeps the number sane).
const MAX_TTL_SECONDS: u64 = 10 * 366 * 24 * 3600;

fn invalid(field: &str, description: &str) -> GatewayError {
    GatewayError::Invalid(validate::FieldViolation {
        field: field.to_owned(),
        description: description.to_owned(),
    })
}

/// `TokenRestrictions`: at most 16 values a list, each an id (identity
/// checks that operations exist).
fn restrictions(r: Option<&TokenRestrictions>) -> Result<()> {
    let Some(r) = r else {
        return Ok(());
    };
    for (field, values) in [
        ("restrictions.team_ids", &r.team_ids),
        ("restrictions.operations", &r.operations),
        ("restrictions.environment_ids", &r.environment_ids),
    ] {
        if values.len() > MAX_RESTRICTION_VALUES {
            return Err(invalid(field, "must have at most 16 values"));
        }
        for (i, value) in values.iter().enumerate() {
            if value.len() > 64 {
                return Err(invalid(
                    &format!("{field}[{i}]"),
                    "must be at most 64 characters",
                ));
            }
            validate::id(&format!("{field}[{i}]"), value)?;
        }
    }
    Ok(())
}

/// An optional lifetime in seconds: 1 to ten years.
fn ttl(value: Option<u64>) -> Result<()> {
    match value {
        Some(0) => Err(invalid("ttl_seconds", "must be at least 1")),
        Some(n) if n > MAX_TTL_SECONDS => Err(invalid("ttl_seconds", "must be at most ten years")),
        _ => Ok(()),
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
                validate::optional_id("request_id", &m.request_id)?;
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
                validate::optional_id("request_id", &m.request_id)?;
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
                validate::page_size("page_size", m.page_size)?;
                validate::text("page_token", &m.page_token, 1024)?;
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
                ttl(m.ttl_seconds)?;
                restrictions(m.restrictions.as_ref())?;
                validate::optional_id("request_id", &m.request_id)?;
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
        request: Request<CreateServiceAccountRequest>,
    ) -> std::result::Result<Response<CreateServiceAccountResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::id("team_id", &m.team_id)?;
                validate::text("name", &m.name, 64)?;
                validate::text("display_name", &m.display_name, 256)?;
                validate::optional_id("request_id", &m.request_id)?;
                Ok(team(&m.team_id))
            },
            |mut c, r| async move { c.create_service_account(r).await },
        );
        observe(call).await
    }

    async fn list_service_accounts(
        &self,
        request: Request<ListServiceAccountsRequest>,
    ) -> std::result::Result<Response<ListServiceAccountsResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::id("team_id", &m.team_id)?;
                validate::page_size("page_size", m.page_size)?;
                validate::text("page_token", &m.page_token, 1024)?;
                Ok(team(&m.team_id))
            },
            |mut c, r| async move { c.list_service_accounts(r).await },
        );
        observe(call).await
    }

    async fn delete_service_account(
        &self,
        request: Request<DeleteServiceAccountRequest>,
    ) -> std::result::Result<Response<DeleteServiceAccountResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::id("service_account_id", &m.service_account_id)?;
                Ok(service_account(&m.service_account_id))
            },
            |mut c, r| async move { c.delete_service_account(r).await },
        );
        observe(call).await
    }

    async fn create_service_account_token(
        &self,
        request: Request<CreateServiceAccountTokenRequest>,
    ) -> std::result::Result<Response<CreateServiceAccountTokenResponse>, Status> {
        let call = self.forward(
            request,
            |m, _| {
                validate::id("service_account_id", &m.service_account_id)?;
                validate::text("description", &m.description, 1024)?;
                ttl(m.ttl_seconds)?;
                restrictions(m.restrictions.as_ref())?;
                validate::optional_id("request_id", &m.request_id)?;
                Ok(service_account(&m.service_account_id))
            },
            |mut c, r| async move { c.create_service_account_token(r).await },
        );
        observe(call).await
    }

    async fn list_api_tokens(
        &self,
        request: Request<ListApiTokensRequest>,
    ) -> std::result::Result<Response<ListApiTokensResponse>, Status> {
        let call = self.forward(
            request,
            |m, call| {
                validate::optional_id("owner_id", &m.owner_id)?;
                validate::optional_id("team_id", &m.team_id)?;
                validate::page_size("page_size", m.page_size)?;
                validate::text("page_token", &m.page_token, 1024)?;
                // Identity scopes the answer; the team, when named, is
                // what the token's own checks see.
                Ok(if !m.team_id.is_empty() {
                    team(&m.team_id)
                } else if !m.owner_id.is_empty() {
                    with_id("user", &m.owner_id)
                } else {
                    with_id("user", call.user_id())
                })
            },
            |mut c, r| async move { c.list_api_tokens(r).await },
        );
        observe(call).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(error: GatewayError) -> String {
        match error {
            GatewayError::Invalid(v) => v.field,
            other => panic!("not a field violation: {other:?}"),
        }
    }

    #[test]
    fn restrictions_are_bounded_and_each_value_checked() {
        assert!(restrictions(None).is_ok());
        let sixteen: Vec<String> = (0..16).map(|i| format!("team-{i}")).collect();
        let ok = TokenRestrictions {
            team_ids: sixteen.clone(),
            operations: vec!["environment.get".into()],
            environment_ids: vec![],
        };
        assert!(restrictions(Some(&ok)).is_ok());
        let mut seventeen = sixteen;
        seventeen.push("team-16".into());
        let too_many = TokenRestrictions {
            team_ids: seventeen,
            ..Default::default()
        };
        assert_eq!(
            field(restrictions(Some(&too_many)).unwrap_err()),
            "restrictions.team_ids"
        );
        for (bad, at) in [
            ("", "restrictions.environment_ids[1]"),
            ("a b", "restrictions.environment_ids[1]"),
            (&"x".repeat(65), "restrictions.environment_ids[1]"),
        ] {
            let r = TokenRestrictions {
                environment_ids: vec!["fine".into(), bad.to_owned()],
                ..Default::default()
            };
            assert_eq!(field(restrictions(Some(&r)).unwrap_err()), at, "{bad:?}");
        }
    }

    #[test]
    fn lifetimes_are_at_least_a_second_and_sane() {
        assert!(ttl(None).is_ok());
        assert!(ttl(Some(1)).is_ok());
        assert!(ttl(Some(MAX_TTL_SECONDS)).is_ok());
        assert_eq!(field(ttl(Some(0)).unwrap_err()), "ttl_seconds");
        assert_eq!(field(ttl(Some(u64::MAX)).unwrap_err()), "ttl_seconds");
    }

    #[test]
    fn a_service_account_is_authorized_by_id_never_by_a_claimed_team() {
        let r = service_account("sa-1");
        assert_eq!(
            (r.kind.as_str(), r.id.as_str(), r.team_id.as_str()),
            ("service_account", "sa-1", "")
        );
    }
}
