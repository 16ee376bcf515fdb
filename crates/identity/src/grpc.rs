//! gRPC adapters: `vibebox.identity.v1.IdentityService` (served to the
//! gateway, which forwards the end user's `authorization: Bearer` header;
//! identity verifies the token itself) and the internal
//! `vibebox.internal.authz.v1.AuthorizationService`. They convert wire types
//! to domain types and back; the logic is in `service`.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use vibebox_proto::authz::{self, authorization_service_server::AuthorizationService};
use vibebox_proto::identity::{self as pb, identity_service_server::IdentityService};
use vibebox_server_kit::meta;

use crate::error::Error;
use crate::model::{
    ApiToken, Membership, PlatformRole, PrincipalKind, Restrictions, ServiceAccount, Team,
    TeamRole, User,
};
use crate::rbac::Resource;
use crate::service::{ApiTokenQuery, Caller, Identity, NewServiceAccount, Page, RequestContext};

/// Both services share one `Identity`.
#[derive(Clone)]
pub struct Handlers {
    identity: Arc<Identity>,
}

impl Handlers {
    /// Adapters over `identity`.
    pub fn new(identity: Arc<Identity>) -> Self {
        Self { identity }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let token =
            bearer(request).ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        Ok(self.identity.authenticate(token).await?)
    }
}

fn bearer<T>(request: &Request<T>) -> Option<&str> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn context<T>(request: &Request<T>) -> RequestContext {
    RequestContext {
        client_address: request
            .metadata()
            .get(meta::CLIENT_ADDRESS)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        request_id: vibebox_server_kit::request_id(request).unwrap_or_default(),
    }
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn platform_role_to_pb(r: PlatformRole) -> pb::PlatformRole {
    match r {
        PlatformRole::None => pb::PlatformRole::None,
        PlatformRole::Admin => pb::PlatformRole::Admin,
        PlatformRole::Auditor => pb::PlatformRole::Auditor,
    }
}

fn platform_role_from_pb(v: i32) -> Result<PlatformRole, Error> {
    match pb::PlatformRole::try_from(v) {
        Ok(pb::PlatformRole::Unspecified | pb::PlatformRole::None) => Ok(PlatformRole::None),
        Ok(pb::PlatformRole::Admin) => Ok(PlatformRole::Admin),
        Ok(pb::PlatformRole::Auditor) => Ok(PlatformRole::Auditor),
        Err(_) => Err(Error::invalid("platform_role", "unknown platform role")),
    }
}

fn team_role_to_pb(r: TeamRole) -> pb::TeamRole {
    match r {
        TeamRole::Viewer => pb::TeamRole::Viewer,
        TeamRole::Developer => pb::TeamRole::Developer,
        TeamRole::Admin => pb::TeamRole::Admin,
    }
}

fn team_role_from_pb(v: i32) -> Result<Option<TeamRole>, Error> {
    match pb::TeamRole::try_from(v) {
        Ok(pb::TeamRole::Unspecified) => Ok(None),
        Ok(pb::TeamRole::Viewer) => Ok(Some(TeamRole::Viewer)),
        Ok(pb::TeamRole::Developer) => Ok(Some(TeamRole::Developer)),
        Ok(pb::TeamRole::Admin) => Ok(Some(TeamRole::Admin)),
        Err(_) => Err(Error::invalid("role", "unknown team role")),
    }
}

fn kind_to_pb(k: PrincipalKind) -> pb::PrincipalKind {
    match k {
        PrincipalKind::Human => pb::PrincipalKind::Human,
        PrincipalKind::ServiceAccount => pb::PrincipalKind::ServiceAccount,
    }
}

fn user_to_pb(u: User) -> pb::User {
    pb::User {
        platform_role: platform_role_to_pb(u.platform_role) as i32,
        create_time: Some(timestamp(u.created_at)),
        kind: kind_to_pb(u.kind) as i32,
        id: u.id,
        username: u.username,
        display_name: u.display_name,
        disabled: u.disabled,
    }
}

fn service_account_to_pb(sa: ServiceAccount) -> pb::ServiceAccount {
    pb::ServiceAccount {
        role: sa.role.map_or(0, |r| team_role_to_pb(r) as i32),
        create_time: Some(timestamp(sa.user.created_at)),
        id: sa.user.id,
        team_id: sa.user.team_id,
        name: sa.user.username,
        display_name: sa.user.display_name,
        disabled: sa.user.disabled,
    }
}

fn restrictions_from_pb(r: Option<pb::TokenRestrictions>) -> Restrictions {
    let r = r.unwrap_or_default();
    Restrictions {
        team_ids: r.team_ids,
        operations: r.operations,
        environment_ids: r.environment_ids,
    }
}

fn restrictions_to_pb(r: Restrictions) -> pb::TokenRestrictions {
    pb::TokenRestrictions {
        team_ids: r.team_ids,
        operations: r.operations,
        environment_ids: r.environment_ids,
    }
}

fn api_token_to_pb(t: ApiToken) -> pb::ApiToken {
    pb::ApiToken {
        owner_kind: kind_to_pb(t.owner_kind) as i32,
        create_time: Some(timestamp(t.created_at)),
        last_used_time: t.last_used_at.map(timestamp),
        expire_time: Some(timestamp(t.expires_at)),
        restrictions: Some(restrictions_to_pb(t.restrictions)),
        id: t.id,
        owner_id: t.owner_id,
        owner_name: t.owner_name,
        team_id: t.team_id,
        description: t.description,
        revoked: t.revoked,
        created_by: t.created_by,
    }
}

fn team_to_pb(t: Team) -> pb::Team {
    pb::Team {
        create_time: Some(timestamp(t.created_at)),
        id: t.id,
        name: t.name,
        display_name: t.display_name,
    }
}

fn membership_to_pb(m: Membership) -> pb::Membership {
    pb::Membership {
        role: team_role_to_pb(m.role) as i32,
        team_id: m.team_id,
        user_id: m.user_id,
        team_name: m.team_name,
        username: m.username,
    }
}

#[tonic::async_trait]
impl IdentityService for Handlers {
    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let ctx = context(&request);
        let req = request.into_inner();
        let (issued, user) = self
            .identity
            .login(&req.username, &req.password, &ctx)
            .await?;
        Ok(Response::new(pb::LoginResponse {
            token: issued.token,
            token_id: issued.token_id,
            expire_time: Some(timestamp(issued.expires_at)),
            user: Some(user_to_pb(user)),
        }))
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let caller = self.caller(&request).await?;
        let (user, memberships) = self.identity.whoami(&caller).await?;
        Ok(Response::new(pb::WhoAmIResponse {
            user: Some(user_to_pb(user)),
            memberships: memberships.into_iter().map(membership_to_pb).collect(),
            token_id: caller.token_id,
        }))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ctx = context(&request);
        let req = request.into_inner();
        let role = platform_role_from_pb(req.platform_role)?;
        let user = self
            .identity
            .create_user(
                &caller,
                &ctx,
                &req.username,
                &req.display_name,
                &req.password,
                role,
                &req.request_id,
            )
            .await?;
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(user_to_pb(user)),
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let page = Page {
            size: req.page_size,
            token: req.page_token,
        };
        let (users, next) = self.identity.list_users(&caller, &page).await?;
        Ok(Response::new(pb::ListUsersResponse {
            users: users.into_iter().map(user_to_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn set_user_disabled(
        &self,
        request: Request<pb::SetUserDisabledRequest>,
    ) -> Result<Response<pb::SetUserDisabledResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ctx = context(&request);
        let req = request.into_inner();
        let user = self
            .identity
            .set_user_disabled(&caller, &ctx, &req.user_id, req.disabled)
            .await?;
        Ok(Response::new(pb::SetUserDisabledResponse {
            user: Some(user_to_pb(user)),
        }))
    }

    async fn create_team(
        &self,
        request: Request<pb::CreateTeamRequest>,
    ) -> Result<Response<pb::CreateTeamResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ctx = context(&request);
        let req = request.into_inner();
        let team = self
            .identity
            .create_team(&caller, &ctx, &req.name, &req.display_name, &req.request_id)
            .await?;
        Ok(Response::new(pb::CreateTeamResponse {
            team: Some(team_to_pb(team)),
        }))
    }

    async fn list_teams(
        &self,
        request: Request<pb::ListTeamsRequest>,
    ) -> Result<Response<pb::ListTeamsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let page = Page {
            size: req.page_size,
            token: req.page_token,
        };
        let (teams, next) = self.identity.list_teams(&caller, &page).await?;
        Ok(Response::new(pb::ListTeamsResponse {
            teams: teams.into_iter().map(team_to_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn add_team_member(
        &self,
        request: Request<pb::AddTeamMemberRequest>,
    ) -> Result<Response<pb::AddTeamMemberResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ctx = context(&request);
        let req = request.into_inner();
        let role = team_role_from_pb(req.role)?;
        let m = self
            .identity
            .add_member(&caller, &ctx, &req.team_id, &req.user_id, role)
            .await?;
        Ok(Response::new(pb::AddTeamMemberResponse {
            membership: Some(membership_to_pb(m)),
        }))
    }

    async fn set_team_member_role(
        &self,
        request: Request<pb::SetTeamMemberRoleRequest>,
    ) -> Result<Response<pb::SetTeamMemberRoleResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ctx = context(&request);
        let req = request.into_inner();
        let role = team_role_from_pb(req.role)?;
        let m = self
            .identity
            .set_member_role(&caller, &ctx, &req.team_id, &req.user_id, role)
            .await?;
        Ok(Response::new(pb::SetTeamMemberRoleResponse {
            membership: Some(membership_to_pb(m)),
        }))
    }

    async fn remove_team_member(
        &self,
        request: Request<pb::RemoveTeamMemberRequest>,
    ) -> Result<Response<pb::RemoveTeamMemberResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ctx = context(&request);
        let req = request.into_inner();
        self.identity
            .remove_member(&caller, &ctx, &req.team_id, &req.user_id)
            .await?;
        Ok(Response::new(pb::RemoveTeamMemberResponse {}))
    }

    async fn list_team_members(
        &self,
        request: Request<pb::ListTeamMembersRequest>,
    ) -> Result<Response<pb::ListTeamMembersResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let page = Page {
            size: req.page_size,
            token: req.page_token,
        };
        let (members, next) = self
            .identity
            .list_members(&caller, &req.team_id, &page)
            .await?;
        Ok(Response::new(pb::ListTeamMembersResponse {
            memberships: members.into_iter().map(membership_to_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn create_api_token(
        &self,
        request: Request<pb::CreateApiTokenRequest>,
    ) -> Result<Response<pb::CreateApiTokenResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ctx = context(&request);
        let req = request.into_inner();
        let issued = self
            .identity
            .create_api_token(
                &caller,
                &ctx,
                &req.description,
                req.ttl_seconds.map(Duration::from_secs),
                restrictions_from_pb(req.restrictions),
                &req.request_id,
            )
            .await?;
        Ok(Response::new(pb::CreateApiTokenResponse {
            expire_time: Some(timestamp(issued.expires_at)),
            token: issued.token,
            token_id: issued.token_id,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ctx = context(&request);
        let req = request.into_inner();
        self.identity
            .revoke_token(&caller, &ctx, &req.token_id)
            .await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn create_service_account(
        &self,
        request: Request<pb::CreateServiceAccountRequest>,
    ) -> Result<Response<pb::CreateServiceAccountResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ctx = context(&request);
        let req = request.into_inner();
        let new = NewServiceAccount {
            role: team_role_from_pb(req.role)?,
            team_id: req.team_id,
            name: req.name,
            display_name: req.display_name,
            request_id: req.request_id,
        };
        let sa = self
            .identity
            .create_service_account(&caller, &ctx, &new)
            .await?;
        Ok(Response::new(pb::CreateServiceAccountResponse {
            service_account: Some(service_account_to_pb(sa)),
        }))
    }

    async fn list_service_accounts(
        &self,
        request: Request<pb::ListServiceAccountsRequest>,
    ) -> Result<Response<pb::ListServiceAccountsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let page = Page {
            size: req.page_size,
            token: req.page_token,
        };
        let (accounts, next) = self
            .identity
            .list_service_accounts(&caller, &req.team_id, &page)
            .await?;
        Ok(Response::new(pb::ListServiceAccountsResponse {
            service_accounts: accounts.into_iter().map(service_account_to_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn delete_service_account(
        &self,
        request: Request<pb::DeleteServiceAccountRequest>,
    ) -> Result<Response<pb::DeleteServiceAccountResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ctx = context(&request);
        let req = request.into_inner();
        let sa = self
            .identity
            .delete_service_account(&caller, &ctx, &req.service_account_id)
            .await?;
        Ok(Response::new(pb::DeleteServiceAccountResponse {
            service_account: Some(service_account_to_pb(sa)),
        }))
    }

    async fn create_service_account_token(
        &self,
        request: Request<pb::CreateServiceAccountTokenRequest>,
    ) -> Result<Response<pb::CreateServiceAccountTokenResponse>, Status> {
        let caller = self.caller(&request).await?;
        let ctx = context(&request);
        let req = request.into_inner();
        let issued = self
            .identity
            .create_service_account_token(
                &caller,
                &ctx,
                &req.service_account_id,
                &req.description,
                req.ttl_seconds.map(Duration::from_secs),
                restrictions_from_pb(req.restrictions),
                &req.request_id,
            )
            .await?;
        Ok(Response::new(pb::CreateServiceAccountTokenResponse {
            expire_time: Some(timestamp(issued.expires_at)),
            token: issued.token,
            token_id: issued.token_id,
        }))
    }

    async fn list_api_tokens(
        &self,
        request: Request<pb::ListApiTokensRequest>,
    ) -> Result<Response<pb::ListApiTokensResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let query = ApiTokenQuery {
            owner_id: req.owner_id,
            team_id: req.team_id,
            show_inactive: req.show_inactive,
            page: Page {
                size: req.page_size,
                token: req.page_token,
            },
        };
        let (tokens, next) = self.identity.list_api_tokens(&caller, &query).await?;
        Ok(Response::new(pb::ListApiTokensResponse {
            tokens: tokens.into_iter().map(api_token_to_pb).collect(),
            next_page_token: next,
        }))
    }
}

#[tonic::async_trait]
impl AuthorizationService for Handlers {
    async fn authorize(
        &self,
        request: Request<authz::AuthorizeRequest>,
    ) -> Result<Response<authz::AuthorizeResponse>, Status> {
        let req = request.into_inner();
        let r = req.resource.unwrap_or_default();
        let resource = Resource {
            kind: r.kind,
            team_id: r.team_id,
            environment_id: r.environment_id,
            owner_id: r.owner_id,
            id: r.id,
        };
        let d = self
            .identity
            .authorize(&req.token, &req.operation, &resource)
            .await?;
        Ok(Response::new(authz::AuthorizeResponse {
            allowed: d.allowed,
            reason: d.reason,
            user_id: d.user_id,
            token_id: d.token_id,
            username: d.username,
            team_role: d.team_role.map_or(0, |r| team_role_to_pb(r) as i32),
            platform_role: d.platform_role.map_or(0, |r| platform_role_to_pb(r) as i32),
            cache_ttl_ms: crate::service::DECISION_CACHE_TTL_MS,
            principal_kind: d.principal_kind.map_or(0, |k| kind_to_pb(k) as i32),
        }))
    }

    async fn get_token_keys(
        &self,
        _request: Request<authz::GetTokenKeysRequest>,
    ) -> Result<Response<authz::GetTokenKeysResponse>, Status> {
        let keys = self
            .identity
            .token_keys()
            .into_iter()
            .map(|k| authz::TokenKey {
                key_id: k.key_id.to_string(),
                public_key: k.public_key,
                retired: k.retired,
            })
            .collect();
        Ok(Response::new(authz::GetTokenKeysResponse { keys }))
    }

    async fn list_caller_scopes(
        &self,
        request: Request<authz::ListCallerScopesRequest>,
    ) -> Result<Response<authz::ListCallerScopesResponse>, Status> {
        let req = request.into_inner();
        let scopes = self.identity.caller_scopes(&req.token).await?;
        Ok(Response::new(authz::ListCallerScopesResponse {
            principal_kind: kind_to_pb(scopes.kind) as i32,
            user_id: scopes.user_id,
            platform_role: platform_role_to_pb(scopes.platform_role) as i32,
            teams: scopes
                .teams
                .into_iter()
                .map(|(team_id, role)| authz::TeamScope {
                    team_id,
                    team_role: team_role_to_pb(role) as i32,
                })
                .collect(),
        }))
    }
}
