//! Service accounts through the real gateway (issue #20): a team admin makes
//! one and a token for it; the token works in its team only, within its
//! restrictions, is audited as the service account itself
//! (`actor.kind = service_account`), is listed (never its secret) with its
//! last use, and stops when revoked or when the account is deleted. Creates
//! are idempotent by `request_id`. A token ends with its issuer's authority:
//! removing or demoting the admin who minted it revokes it.

use std::time::{Duration, Instant};

use tonic::Code;
use vibebox_proto::audit::{EventFilter, QueryEventsRequest};
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, EnvironmentState, GetEnvironmentRequest,
    ListEnvironmentsRequest,
};
use vibebox_proto::identity::{
    ApiToken, CreateServiceAccountRequest, CreateServiceAccountTokenRequest,
    CreateServiceAccountTokenResponse, CreateTeamRequest, CreateUserRequest,
    DeleteServiceAccountRequest, ListApiTokensRequest, PlatformRole, PrincipalKind,
    RemoveTeamMemberRequest, RevokeTokenRequest, SetTeamMemberRoleRequest, TeamRole,
    TokenRestrictions, WhoAmIRequest,
};
use vibebox_tests::{Platform, Settle, dev_image};

async fn sa_token(
    p: &Platform,
    admin: &str,
    sa: &str,
    operations: &[&str],
) -> CreateServiceAccountTokenResponse {
    p.identity(admin)
        .create_service_account_token(CreateServiceAccountTokenRequest {
            service_account_id: sa.into(),
            description: "ci pipeline".into(),
            ttl_seconds: None,
            request_id: String::new(),
            restrictions: (!operations.is_empty()).then(|| TokenRestrictions {
                operations: operations.iter().map(|o| o.to_string()).collect(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn tokens(p: &Platform, token: &str, owner: &str, team: &str) -> Vec<ApiToken> {
    p.identity(token)
        .list_api_tokens(ListApiTokensRequest {
            owner_id: owner.into(),
            team_id: team.into(),
            show_inactive: false,
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
}

/// Polls `check` (a call through the gateway) until it answers `code`:
/// a revocation reaches the gateway within its one-second decision cache.
async fn until_code<F, Fut, T>(mut check: F, code: Code) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Err(status) if status.code() == code => return start.elapsed(),
            _ => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never answered {code:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_works_in_its_team_audited_as_itself_until_revoked() {
    let image = dev_image();
    let p = Platform::start();
    let root = p.admin_token();
    let team = p.team(&root, "sa-team").await;
    let other = p.team(&root, "sa-other").await;
    let (_, lead) = p.member(&root, "sa-lead", &team, TeamRole::Admin).await;
    let (_, dev) = p.member(&root, "sa-dev", &team, TeamRole::Developer).await;

    // A developer cannot make one; the team admin can, idempotently.
    let create = |token: &str, name: &str, request_id: &str| {
        let mut identity = p.identity(token);
        let request = CreateServiceAccountRequest {
            team_id: team.clone(),
            name: name.into(),
            display_name: "CI".into(),
            role: TeamRole::Developer as i32,
            request_id: request_id.into(),
        };
        async move { identity.create_service_account(request).await }
    };
    let denied = create(&dev, "dev-bot", "").await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let sa = create(&lead, "ci-bot", "make-ci-bot")
        .await
        .unwrap()
        .into_inner()
        .service_account
        .unwrap();
    let again = create(&lead, "ci-bot", "make-ci-bot")
        .await
        .unwrap()
        .into_inner()
        .service_account
        .unwrap();
    assert_eq!(again.id, sa.id);
    assert_eq!(sa.role, TeamRole::Developer as i32);

    // Its token acts as the service account itself.
    let issued = sa_token(&p, &lead, &sa.id, &[]).await;
    let bot = issued.token.clone();
    let me = p
        .identity(&bot)
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(
        (me.id.as_str(), me.kind),
        (sa.id.as_str(), PrincipalKind::ServiceAccount as i32)
    );

    // It creates an environment in its team (asynchronous: waited for)...
    let created = p
        .environments(&bot)
        .create_settled(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: "sa-create-1".into(),
            team_id: team.clone(),
            name: "ci-job".into(),
            spec: Some(ContainerSpec {
                image: image.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    assert_eq!(created.state(), EnvironmentState::Running, "{created:?}");
    assert_eq!(created.owner_id, sa.id);
    // ... and nothing in another team.
    let elsewhere = p
        .environments(&bot)
        .create_environment(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: "sa-create-2".into(),
            team_id: other.clone(),
            name: "nope".into(),
            spec: Some(ContainerSpec {
                image: image.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(elsewhere.code(), Code::PermissionDenied);
    // It manages no identities.
    let minted = p
        .identity(&bot)
        .create_service_account_token(CreateServiceAccountTokenRequest {
            service_account_id: sa.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(minted.code(), Code::PermissionDenied);

    // The create is audited as the service account, of its kind.
    // So is the policy decision that cleared it (policy hears the kind
    // from the gateway's metadata).
    for action in ["environment.create", "policy.allow"] {
        let deadline = Instant::now() + Duration::from_secs(20);
        let event = loop {
            let events = p
                .audit(&root)
                .query_events(QueryEventsRequest {
                    filter: Some(EventFilter {
                        action: action.into(),
                        resource_id: created.id.clone(),
                        ..Default::default()
                    }),
                    page_size: 50,
                    page_token: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .events;
            if let Some(event) = events.into_iter().next() {
                break event;
            }
            assert!(Instant::now() < deadline, "{action} not audited");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let actor = event.actor.unwrap();
        assert_eq!(
            (
                actor.user_id.as_str(),
                actor.kind.as_str(),
                actor.token_id.as_str()
            ),
            (sa.id.as_str(), "service_account", issued.token_id.as_str()),
            "{action}"
        );
    }

    // Listed: the admin sees it with its last use, never its secret; the
    // developer's own list does not show it; the platform admin sees all.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        let listed = tokens(&p, &lead, "", &team).await;
        if listed.iter().any(|t| t.last_used_time.is_some()) {
            break listed;
        }
        assert!(
            Instant::now() < deadline,
            "last_used_time never set: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(listed.len(), 1, "{listed:?}");
    let entry = &listed[0];
    assert_eq!(
        (
            entry.id.as_str(),
            entry.owner_id.as_str(),
            entry.owner_kind,
            entry.owner_name.as_str(),
            entry.team_id.as_str(),
            entry.description.as_str()
        ),
        (
            issued.token_id.as_str(),
            sa.id.as_str(),
            PrincipalKind::ServiceAccount as i32,
            "ci-bot",
            team.as_str(),
            "ci pipeline"
        )
    );
    assert!(!format!("{listed:?}").contains(&bot[..32]));
    assert!(
        tokens(&p, &dev, "", "")
            .await
            .iter()
            .all(|t| t.id != issued.token_id)
    );
    let denied = p
        .identity(&dev)
        .list_api_tokens(ListApiTokensRequest {
            team_id: team.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let all = tokens(&p, &root, "", "").await;
    assert!(all.iter().any(|t| t.id == issued.token_id), "{all:?}");

    // Restrictions: a token for `environment.get` only reads.
    let reader = sa_token(&p, &lead, &sa.id, &["environment.get"])
        .await
        .token;
    p.environments(&reader)
        .get_environment(GetEnvironmentRequest {
            environment_id: created.id.clone(),
        })
        .await
        .unwrap();
    let refused = p
        .environments(&reader)
        .create_environment(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: "sa-create-3".into(),
            team_id: team.clone(),
            name: "reader-made".into(),
            spec: Some(ContainerSpec {
                image: image.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Revoked by the team admin: its next calls are UNAUTHENTICATED.
    p.identity(&lead)
        .revoke_token(RevokeTokenRequest {
            token_id: issued.token_id.clone(),
        })
        .await
        .unwrap();
    let took = until_code(
        || {
            let mut envs = p.environments(&bot);
            async move {
                envs.list_environments(ListEnvironmentsRequest {
                    team_id: String::new(),
                    ..Default::default()
                })
                .await
            }
        },
        Code::Unauthenticated,
    )
    .await;
    assert!(took < Duration::from_secs(3), "revocation took {took:?}");

    // Deleting the account stops every token it still has.
    p.identity(&reader)
        .who_am_i(WhoAmIRequest {})
        .await
        .expect_err("restricted to environment.get: WhoAmI is outside it");
    let deleted = p
        .identity(&lead)
        .delete_service_account(DeleteServiceAccountRequest {
            service_account_id: sa.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .service_account
        .unwrap();
    assert!(deleted.disabled);
    until_code(
        || {
            let mut envs = p.environments(&reader);
            let id = created.id.clone();
            async move {
                envs.get_environment(GetEnvironmentRequest { environment_id: id })
                    .await
            }
        },
        Code::Unauthenticated,
    )
    .await;
    // A developer cannot delete a service account either.
    let keep = create(&lead, "keep-bot", "").await.unwrap().into_inner();
    let kept = keep.service_account.unwrap();
    let denied = p
        .identity(&dev)
        .delete_service_account(DeleteServiceAccountRequest {
            service_account_id: kept.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    p.environments(&lead)
        .delete_settled(&created.id)
        .await
        .unwrap();
}

/// Every API token `token` may list in `team`, revoked ones included.
async fn team_tokens(p: &Platform, token: &str, team: &str) -> Vec<ApiToken> {
    p.identity(token)
        .list_api_tokens(ListApiTokensRequest {
            owner_id: String::new(),
            team_id: team.into(),
            show_inactive: true,
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens
}

/// How long until `token` is refused (UNAUTHENTICATED) through the gateway.
async fn until_refused(p: &Platform, token: &str) -> Duration {
    until_code(
        || {
            let mut identity = p.identity(token);
            async move { identity.who_am_i(WhoAmIRequest {}).await }
        },
        Code::Unauthenticated,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_ends_with_its_minters_authority_and_a_service_account_lists_its_own() {
    let p = Platform::start();
    let root = p.admin_token();
    let team = p.team(&root, "minted").await;
    let (lead_id, lead) = p.member(&root, "minted-lead", &team, TeamRole::Admin).await;
    let (second_id, second) = p
        .member(&root, "minted-second", &team, TeamRole::Admin)
        .await;
    let sa = p
        .identity(&lead)
        .create_service_account(CreateServiceAccountRequest {
            team_id: team.clone(),
            name: "minted-bot".into(),
            display_name: String::new(),
            role: TeamRole::Developer as i32,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .service_account
        .unwrap();
    let by_lead = sa_token(&p, &lead, &sa.id, &[]).await;
    let by_second = sa_token(&p, &second, &sa.id, &[]).await;
    for t in [&by_lead, &by_second] {
        // Used once, so the gateway has a decision cached for it.
        p.identity(&t.token)
            .who_am_i(WhoAmIRequest {})
            .await
            .unwrap();
    }
    let state = |listed: &[ApiToken], id: &str| {
        let t = listed.iter().find(|t| t.id == id).expect("listed");
        (t.created_by.clone(), t.revoked)
    };

    // The admin who minted it leaves the team: it stops within the
    // platform's two seconds; the other admin's keeps working.
    p.identity(&root)
        .remove_team_member(RemoveTeamMemberRequest {
            team_id: team.clone(),
            user_id: lead_id.clone(),
        })
        .await
        .unwrap();
    let took = until_refused(&p, &by_lead.token).await;
    assert!(took < Duration::from_secs(2), "removal took {took:?}");
    p.identity(&by_second.token)
        .who_am_i(WhoAmIRequest {})
        .await
        .unwrap();
    let listed = team_tokens(&p, &root, &team).await;
    assert_eq!(state(&listed, &by_lead.token_id), (lead_id, true));
    assert_eq!(
        state(&listed, &by_second.token_id),
        (second_id.clone(), false)
    );

    // The other is demoted to developer: its token stops too.
    p.identity(&root)
        .set_team_member_role(SetTeamMemberRoleRequest {
            team_id: team.clone(),
            user_id: second_id.clone(),
            role: TeamRole::Developer as i32,
        })
        .await
        .unwrap();
    let took = until_refused(&p, &by_second.token).await;
    assert!(took < Duration::from_secs(2), "demotion took {took:?}");
    let listed = team_tokens(&p, &root, &team).await;
    assert_eq!(state(&listed, &by_second.token_id), (second_id, true));

    // A service account with the admin role sees its own tokens only.
    let admin_bot = p
        .identity(&root)
        .create_service_account(CreateServiceAccountRequest {
            team_id: team.clone(),
            name: "admin-bot".into(),
            display_name: String::new(),
            role: TeamRole::Admin as i32,
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .service_account
        .unwrap();
    let own = sa_token(&p, &root, &admin_bot.id, &[]).await;
    let peer = sa_token(&p, &root, &sa.id, &[]).await;
    let seen: Vec<String> = team_tokens(&p, &own.token, &team)
        .await
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(seen, std::slice::from_ref(&own.token_id));
    let all = team_tokens(&p, &root, &team).await;
    assert!(all.iter().any(|t| t.id == peer.token_id), "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_teams_are_created_once_per_request_id() {
    let p = Platform::start();
    let root = p.admin_token();
    let team = |name: &str| CreateTeamRequest {
        name: name.into(),
        display_name: String::new(),
        request_id: "team-once".into(),
    };
    let a = p
        .identity(&root)
        .create_team(team("once"))
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap();
    let b = p
        .identity(&root)
        .create_team(team("once"))
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap();
    assert_eq!(a.id, b.id);
    let reused = p
        .identity(&root)
        .create_team(team("twice"))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);
    assert_eq!(
        vibebox_server_kit::status::violated_rules(&reused),
        ["request_id.reused"]
    );
    let user = || CreateUserRequest {
        username: "once-user".into(),
        display_name: String::new(),
        password: "once-user-password".into(),
        platform_role: PlatformRole::None as i32,
        request_id: "user-once".into(),
    };
    let first = p
        .identity(&root)
        .create_user(user())
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let second = p
        .identity(&root)
        .create_user(user())
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(first.id, second.id);
    // The gateway checks the key's shape before anything travels.
    let bad = p
        .identity(&root)
        .create_user(CreateUserRequest {
            request_id: "not a key".into(),
            ..user()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}
