//! The gateway in front of the whole platform (audit, identity, policy,
//! orchestrator; no container is created here): roles, team isolation,
//! policy denials passed through unchanged, no existence oracle.

use crate::common;

use std::time::{Duration, Instant};

use common::{Platform, bearer};
use tonic::Code;
use vibebox_proto::audit::audit_service_client::AuditServiceClient;
use vibebox_proto::audit::{EventFilter, QueryEventsRequest};
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, DeleteEnvironmentRequest, GetEnvironmentRequest,
    ListEnvironmentsRequest, Mount, MountType,
};
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::identity::{
    AddTeamMemberRequest, CreateTeamRequest, CreateUserRequest, LoginRequest, PlatformRole,
    TeamRole,
};
use vibebox_proto::policy::policy_service_client::PolicyServiceClient;
use vibebox_proto::policy::{Decision, EvaluateSpecRequest, GetPolicyRequest};

const PASSWORD: &str = "correct horse battery staple";

fn create(team_id: &str, spec: ContainerSpec) -> CreateEnvironmentRequest {
    CreateEnvironmentRequest {
        labels: Default::default(),
        request_id: String::new(),
        team_id: team_id.to_owned(),
        name: "dev-env".into(),
        spec: Some(spec),
    }
}

fn busybox() -> ContainerSpec {
    ContainerSpec {
        image: "busybox:1.36".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_isolation_and_policy_denials_through_the_gateway() {
    let platform = Platform::start()
        .await
        .with_policy()
        .await
        .with_orchestrator()
        .await;
    let gateway = platform.gateway(|_| {}).await;
    let channel = gateway.channel().await;
    let mut identity = IdentityServiceClient::new(channel.clone());
    let admin = platform.admin_token.clone();

    // Admin sets up two teams, a developer and a viewer in team alpha.
    let team = |name: &'static str| {
        let mut identity = identity.clone();
        let admin = admin.clone();
        async move {
            identity
                .create_team(bearer(
                    CreateTeamRequest {
                        request_id: Default::default(),
                        name: name.into(),
                        display_name: name.into(),
                    },
                    &admin,
                ))
                .await
                .expect("create team")
                .into_inner()
                .team
                .unwrap()
                .id
        }
    };
    let alpha = team("alpha").await;
    let beta = team("beta").await;
    let mut users = Vec::new();
    for (name, role) in [("dev", TeamRole::Developer), ("viewer", TeamRole::Viewer)] {
        let user = identity
            .create_user(bearer(
                CreateUserRequest {
                    request_id: Default::default(),
                    username: name.into(),
                    display_name: name.into(),
                    password: PASSWORD.into(),
                    platform_role: PlatformRole::None as i32,
                },
                &admin,
            ))
            .await
            .expect("create user")
            .into_inner()
            .user
            .unwrap();
        identity
            .add_team_member(bearer(
                AddTeamMemberRequest {
                    team_id: alpha.clone(),
                    user_id: user.id.clone(),
                    role: role as i32,
                },
                &admin,
            ))
            .await
            .expect("add member");
        // Login needs no token and goes through the gateway too.
        let token = identity
            .login(LoginRequest {
                username: name.into(),
                password: PASSWORD.into(),
            })
            .await
            .expect("login through the gateway")
            .into_inner()
            .token;
        users.push(token);
    }
    let (dev, viewer) = (users[0].clone(), users[1].clone());

    let mut environments = EnvironmentServiceClient::new(channel.clone());

    // Attack scenarios are refused by policy; the denial reaches the client
    // unchanged: FAILED_PRECONDITION with the rule ids.
    let privileged = ContainerSpec {
        privileged: true,
        ..busybox()
    };
    let status = environments
        .create_environment(bearer(create(&alpha, privileged.clone()), &dev))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let rules = vibebox_server_kit::status::violated_rules(&status);
    assert!(!rules.is_empty(), "no rule ids in {status:?}");
    let socket = ContainerSpec {
        mounts: vec![Mount {
            r#type: MountType::Bind as i32,
            source: "/var/run/docker.sock".into(),
            target: "/var/run/docker.sock".into(),
            ..Default::default()
        }],
        ..busybox()
    };
    let status = environments
        .create_environment(bearer(create(&alpha, socket), &dev))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(!vibebox_server_kit::status::violated_rules(&status).is_empty());

    // Viewers cannot create; nobody creates in another team.
    let status = environments
        .create_environment(bearer(create(&alpha, busybox()), &viewer))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = environments
        .create_environment(bearer(create(&beta, busybox()), &dev))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A missing environment looks exactly like a forbidden one.
    let missing = uuid::Uuid::new_v4().to_string();
    let status = environments
        .get_environment(bearer(
            GetEnvironmentRequest {
                environment_id: missing.clone(),
            },
            &dev,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "environment not found or access denied");
    let status = environments
        .delete_environment(bearer(
            DeleteEnvironmentRequest {
                environment_id: missing,
            },
            &dev,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "environment not found or access denied");

    // Listing is scoped to the caller's teams (nothing there yet), and an
    // explicit other team is refused.
    let listed = environments
        .list_environments(bearer(ListEnvironmentsRequest::default(), &dev))
        .await
        .expect("list own teams")
        .into_inner();
    assert!(listed.environments.is_empty());
    let status = environments
        .list_environments(bearer(
            ListEnvironmentsRequest {
                team_id: beta.clone(),
                ..Default::default()
            },
            &dev,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Policy dry runs are public to members.
    let mut policy = PolicyServiceClient::new(channel.clone());
    let got = policy
        .get_policy(bearer(GetPolicyRequest {}, &dev))
        .await
        .expect("get policy")
        .into_inner();
    assert!(!got.policy_digest.is_empty());
    let evaluation = policy
        .evaluate_spec(bearer(
            EvaluateSpecRequest {
                spec: Some(privileged),
                team_id: alpha.clone(),
            },
            &dev,
        ))
        .await
        .expect("evaluate")
        .into_inner()
        .evaluation
        .unwrap();
    assert_eq!(evaluation.decision, Decision::Deny as i32);

    // Developers cannot read the platform audit log; the denials are in it.
    let mut audit = AuditServiceClient::new(channel.clone());
    let status = audit
        .query_events(bearer(QueryEventsRequest::default(), &dev))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = audit
            .query_events(bearer(
                QueryEventsRequest {
                    filter: Some(EventFilter {
                        action: "access.denied".into(),
                        ..Default::default()
                    }),
                    page_size: 100,
                    ..Default::default()
                },
                &admin,
            ))
            .await
            .expect("admin reads the audit log")
            .into_inner()
            .events;
        // viewer create, other-team create, missing get, missing delete,
        // other-team list, developer audit query.
        if events.len() >= 6 {
            assert!(
                events
                    .iter()
                    .all(|e| e.severity == vibebox_proto::audit::Severity::Medium as i32)
            );
            break;
        }
        assert!(Instant::now() < deadline, "denials not audited: {events:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
