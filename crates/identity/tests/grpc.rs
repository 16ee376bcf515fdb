//! The identity service over real gRPC on loopback with mutual TLS (the
//! kit's throwaway PKI; the test plays the gateway): bootstrap, the role
//! table, attenuation, revocation / demotion / disabling within 2 seconds,
//! expiry, tampering, foreign keys, validation, brute-force limits, and the
//! storage flows on every test database (SQLite, and PostgreSQL when
//! `VIBEBOX_TEST_POSTGRES_URL` is set).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tonic::{Code, Request};
use vibebox_identity::Config;
use vibebox_proto::authz::authorization_service_client::AuthorizationServiceClient;
use vibebox_proto::authz::{self, AuthorizeRequest};
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::identity::{self as pb, PlatformRole, TeamRole};
use vibebox_server_kit::GrpcChannel;
use vibebox_server_kit::testing::TestPki;

const PASSWORD: &str = "correct horse battery staple";

struct Harness {
    pki: TestPki,
    data_dir: PathBuf,
    url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    identity: IdentityServiceClient<GrpcChannel>,
    authz: AuthorizationServiceClient<GrpcChannel>,
    admin_token: String,
}

impl Harness {
    async fn start(database_url: Option<String>) -> Self {
        let pki = TestPki::new();
        let args = pki.server_args("identity");
        Self::start_with(pki, args.data_dir.clone(), database_url, |_| {}).await
    }

    async fn start_with(
        pki: TestPki,
        data_dir: PathBuf,
        database_url: Option<String>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut args = pki.server_args("identity");
        args.data_dir = data_dir.clone();
        let mut config = Config::new(args);
        config.database.url = database_url;
        // No audit service in these tests: events stay in the durable outbox.
        config.audit.url = "https://127.0.0.1:9".into();
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://localhost:{}",
            listener.local_addr().unwrap().port()
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(vibebox_identity::run_with_listener(
            config,
            listener,
            shutdown.clone(),
        ));
        let channel = vibebox_server_kit::connect(&url, &pki.material("gateway")).unwrap();
        let identity = IdentityServiceClient::new(channel.clone());
        let mut authz = AuthorizationServiceClient::new(channel);
        let deadline = Instant::now() + Duration::from_secs(60);
        while authz
            .get_token_keys(authz::GetTokenKeysRequest {})
            .await
            .is_err()
        {
            if task.is_finished() {
                panic!("identity exited early: {:?}", task.await);
            }
            assert!(Instant::now() < deadline, "identity did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let admin_token = std::fs::read_to_string(data_dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            pki,
            data_dir,
            url,
            shutdown,
            task,
            identity,
            authz,
            admin_token,
        }
    }

    async fn stop(self) -> (TestPki, PathBuf) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        (self.pki, self.data_dir)
    }

    async fn create_user(&mut self, username: &str, role: PlatformRole) -> String {
        self.identity
            .create_user(bearer(
                pb::CreateUserRequest {
                    request_id: Default::default(),
                    username: username.into(),
                    display_name: String::new(),
                    password: PASSWORD.into(),
                    platform_role: role as i32,
                },
                &self.admin_token,
            ))
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap()
            .id
    }

    async fn create_team(&mut self, name: &str) -> String {
        self.identity
            .create_team(bearer(
                pb::CreateTeamRequest {
                    request_id: Default::default(),
                    name: name.into(),
                    display_name: String::new(),
                },
                &self.admin_token,
            ))
            .await
            .unwrap()
            .into_inner()
            .team
            .unwrap()
            .id
    }

    async fn add_member(&mut self, team: &str, user: &str, role: TeamRole) {
        self.identity
            .add_team_member(bearer(
                pb::AddTeamMemberRequest {
                    team_id: team.into(),
                    user_id: user.into(),
                    role: role as i32,
                },
                &self.admin_token,
            ))
            .await
            .unwrap();
    }

    async fn login(&mut self, username: &str) -> pb::LoginResponse {
        self.identity
            .login(pb::LoginRequest {
                username: username.into(),
                password: PASSWORD.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn authorize(
        &mut self,
        token: &str,
        op: &str,
        resource: authz::Resource,
    ) -> authz::AuthorizeResponse {
        self.authz
            .authorize(AuthorizeRequest {
                token: token.into(),
                operation: op.into(),
                resource: Some(resource.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("Authorize {op} {resource:?}: {e}"))
            .into_inner()
    }

    /// Polls Authorize until it denies; returns how long that took.
    async fn until_denied(&mut self, token: &str, op: &str, resource: authz::Resource) -> Duration {
        let start = Instant::now();
        loop {
            let d = self.authorize(token, op, resource.clone()).await;
            assert!(d.cache_ttl_ms <= 1000);
            if !d.allowed {
                return start.elapsed();
            }
            assert!(start.elapsed() < Duration::from_secs(10), "never denied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Every event in the identity service's audit outbox, in order.
fn outbox_events(data_dir: &std::path::Path) -> Vec<vibebox_proto::audit::AuditEvent> {
    use prost::Message as _;
    let dir = data_dir.join("outbox").join("identity");
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .collect();
    segments.sort();
    let mut events = Vec::new();
    for segment in segments {
        let bytes = std::fs::read(segment).unwrap();
        let mut at = 0;
        while at + 8 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let payload = &bytes[at + 8..at + 8 + len];
            events.push(vibebox_proto::audit::AuditEvent::decode(payload).unwrap());
            at += 8 + len;
        }
    }
    events
}

fn env(team: &str, env: &str, owner: &str) -> authz::Resource {
    authz::Resource {
        kind: "environment".into(),
        team_id: team.into(),
        environment_id: env.into(),
        owner_id: owner.into(),
        id: String::new(),
    }
}

#[tokio::test]
async fn bootstrap_writes_admin_token_file_0600_and_not_twice() {
    let mut h = Harness::start(None).await;
    let path = h.data_dir.join("admin.token");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let me = h
        .identity
        .who_am_i(bearer(pb::WhoAmIRequest {}, &h.admin_token))
        .await
        .unwrap()
        .into_inner();
    let user = me.user.unwrap();
    assert_eq!(user.username, "admin");
    assert_eq!(user.platform_role, PlatformRole::Admin as i32);
    assert_eq!(me.memberships.len(), 1);
    assert_eq!(me.memberships[0].team_name, "default");
    assert_eq!(me.memberships[0].role, TeamRole::Admin as i32);
    // The bootstrap is audited into the durable outbox.
    let actions: Vec<String> = outbox_events(&h.data_dir)
        .into_iter()
        .map(|e| e.action)
        .collect();
    for action in [
        "user.create",
        "team.create",
        "membership.add",
        "token.create",
    ] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} missing in {actions:?}"
        );
    }
    // A restart on the same database does not bootstrap again.
    let before = std::fs::read_to_string(&path).unwrap();
    let (pki, dir) = h.stop().await;
    let h = Harness::start_with(pki, dir, None, |_| {}).await;
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    h.stop().await;
}

#[tokio::test]
async fn an_operator_password_file_lets_the_bootstrap_admin_log_in() {
    const SECRET: &str = "correct horse battery staple";
    let pki = TestPki::new();
    let data_dir = pki.server_args("identity").data_dir.clone();
    let file = pki.path().join("admin-password");
    // As a mounted secret usually is: with a trailing newline.
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let mut h = Harness::start_with(pki, data_dir, None, |c| {
        c.bootstrap_admin_password_file = Some(file.clone());
    })
    .await;
    let login = |password: &str| pb::LoginRequest {
        username: "admin".into(),
        password: password.into(),
    };
    let session = h.identity.login(login(SECRET)).await.unwrap().into_inner();
    let me = h
        .identity
        .who_am_i(bearer(pb::WhoAmIRequest {}, &session.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.user.unwrap().platform_role, PlatformRole::Admin as i32);
    let wrong = h
        .identity
        .login(login(&format!("{SECRET}\n")))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    // The token file is written as well.
    assert!(!h.admin_token.is_empty());
    // Read on first start only: a restart does without it.
    let (pki, dir) = h.stop().await;
    std::fs::remove_file(&file).unwrap();
    let mut h = Harness::start_with(pki, dir, None, |c| {
        c.bootstrap_admin_password_file = Some(file.clone());
    })
    .await;
    h.identity
        .login(login(SECRET))
        .await
        .expect("same password");
    h.stop().await;

    // A password the rules refuse stops the service at start, naming the file.
    let pki = TestPki::new();
    let short = pki.path().join("short-password");
    std::fs::write(&short, "short\n").unwrap();
    let mut config = Config::new(pki.server_args("identity"));
    config.audit.url = "https://127.0.0.1:9".into();
    config.bootstrap_admin_password_file = Some(short.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = vibebox_identity::run_with_listener(config, listener, CancellationToken::new())
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("short-password") && text.contains("12 to 1024"),
        "{text}"
    );
}

/// Every role against every operation on an environment of team T owned by
/// `dev`, and the team / audit / policy / identity rules.
#[tokio::test]
async fn role_table_is_enforced() {
    let mut h = Harness::start(None).await;
    let team = h.create_team("team-t").await;
    let other_team = h.create_team("team-o").await;
    let mut ids = std::collections::BTreeMap::new();
    for (name, platform) in [
        ("t-admin", PlatformRole::None),
        ("dev", PlatformRole::None),
        ("dev2", PlatformRole::None),
        ("viewer", PlatformRole::None),
        ("outsider", PlatformRole::None),
        ("auditor", PlatformRole::Auditor),
        ("padmin", PlatformRole::Admin),
    ] {
        ids.insert(name, h.create_user(name, platform).await);
    }
    h.add_member(&team, &ids["t-admin"], TeamRole::Admin).await;
    h.add_member(&team, &ids["dev"], TeamRole::Developer).await;
    h.add_member(&team, &ids["dev2"], TeamRole::Developer).await;
    h.add_member(&team, &ids["viewer"], TeamRole::Viewer).await;
    h.add_member(&other_team, &ids["outsider"], TeamRole::Admin)
        .await;
    let mut tokens = std::collections::BTreeMap::new();
    for name in ids.keys() {
        tokens.insert(*name, h.login(name).await.token);
    }
    let roles = [
        "t-admin", "dev", "dev2", "viewer", "outsider", "auditor", "padmin",
    ];
    let resource = env(&team, "env-1", &ids["dev"]);
    // Columns follow `roles`. 1 = allowed.
    let table: &[(&str, [u8; 7])] = &[
        ("environment.create", [1, 1, 1, 0, 0, 0, 0]),
        ("environment.get", [1, 1, 1, 1, 0, 0, 0]),
        ("environment.list", [1, 1, 1, 1, 0, 0, 0]),
        ("environment.logs", [1, 1, 1, 1, 0, 0, 0]),
        ("environment.stats", [1, 1, 1, 1, 0, 0, 0]),
        ("environment.start", [1, 1, 0, 0, 0, 0, 0]),
        ("environment.stop", [1, 1, 0, 0, 0, 0, 0]),
        ("environment.restart", [1, 1, 0, 0, 0, 0, 0]),
        ("environment.exec", [1, 1, 0, 0, 0, 0, 0]),
        ("environment.delete", [1, 1, 0, 0, 0, 0, 0]),
        ("environment.extend", [1, 1, 0, 0, 0, 0, 0]),
        ("environment.port_forward", [1, 1, 0, 0, 0, 0, 0]),
        ("environment.copy_to", [1, 1, 0, 0, 0, 0, 0]),
        ("environment.copy_from", [1, 1, 0, 0, 0, 0, 0]),
        ("environment.update", [1, 1, 0, 0, 0, 0, 0]),
        ("environment.wait", [1, 1, 1, 1, 0, 0, 0]),
        ("environment.watch", [1, 1, 1, 1, 0, 0, 0]),
        ("identity.service_account.create", [1, 0, 0, 0, 0, 0, 1]),
        ("identity.service_account.delete", [1, 0, 0, 0, 0, 0, 1]),
        (
            "identity.service_account.token_create",
            [1, 0, 0, 0, 0, 0, 1],
        ),
        ("identity.service_account.list", [1, 1, 1, 1, 0, 0, 1]),
        ("identity.token.list", [1, 1, 1, 1, 1, 1, 1]),
        ("identity.member.add", [1, 0, 0, 0, 0, 0, 1]),
        ("identity.member.set_role", [1, 0, 0, 0, 0, 0, 1]),
        ("identity.member.remove", [1, 0, 0, 0, 0, 0, 1]),
        ("identity.member.list", [1, 1, 1, 1, 0, 0, 1]),
        ("identity.user.create", [0, 0, 0, 0, 0, 0, 1]),
        ("identity.team.create", [0, 0, 0, 0, 0, 0, 1]),
        ("identity.whoami", [1, 1, 1, 1, 1, 1, 1]),
        ("audit.query", [1, 0, 0, 0, 0, 1, 1]),
        ("audit.verify", [0, 0, 0, 0, 0, 1, 1]),
        ("policy.get", [1, 1, 1, 1, 1, 1, 1]),
        ("policy.evaluate", [1, 1, 1, 1, 0, 1, 1]),
        ("policy.reload", [0, 0, 0, 0, 0, 0, 1]),
        ("environment.explode", [0, 0, 0, 0, 0, 0, 0]),
    ];
    let mut failures = Vec::new();
    for (op, expected) in table {
        for (i, role) in roles.iter().enumerate() {
            let mut r = resource.clone();
            if !op.starts_with("environment.") {
                r.kind = "team".into();
                r.environment_id.clear();
                r.owner_id.clear();
            }
            let d = h.authorize(&tokens[role], op, r).await;
            if d.allowed != (expected[i] == 1) {
                failures.push(format!("{role} {op}: allowed={} ({})", d.allowed, d.reason));
            }
            assert_eq!(d.user_id, ids[role]);
            assert!(d.cache_ttl_ms > 0 && d.cache_ttl_ms <= 1000);
        }
    }
    assert!(
        failures.is_empty(),
        "role table mismatches:\n{}",
        failures.join("\n")
    );
    // Team admins read audit events of their own team only, "team-scoped".
    let d = h
        .authorize(&tokens["t-admin"], "audit.query", env(&team, "", ""))
        .await;
    assert!(d.allowed);
    assert_eq!(d.reason, "team-scoped");
    assert_eq!(d.team_role, TeamRole::Admin as i32);
    let d = h
        .authorize(&tokens["t-admin"], "audit.query", env(&other_team, "", ""))
        .await;
    assert!(!d.allowed);
    // Scopes for list queries.
    let scopes = h
        .authz
        .list_caller_scopes(authz::ListCallerScopesRequest {
            token: tokens["viewer"].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scopes.user_id, ids["viewer"]);
    assert_eq!(scopes.teams.len(), 1);
    assert_eq!(scopes.teams[0].team_id, team);
    assert_eq!(scopes.teams[0].team_role, TeamRole::Viewer as i32);
    h.stop().await;
}

#[tokio::test]
async fn attenuated_tokens_are_enforced() {
    let mut h = Harness::start(None).await;
    let team = h.create_team("team-a").await;
    let dev = h.create_user("dev", PlatformRole::None).await;
    h.add_member(&team, &dev, TeamRole::Developer).await;
    let token = h.login("dev").await.token;
    // Offline attenuation: env-1 only, read-only operations.
    let narrow = vibebox_token::attenuate(
        &token,
        &vibebox_token::Restriction::default()
            .environment("env-1")
            .operations(["environment.get", "environment.logs"]),
    )
    .unwrap();
    assert!(
        h.authorize(&narrow, "environment.get", env(&team, "env-1", &dev))
            .await
            .allowed
    );
    assert!(
        h.authorize(&token, "environment.exec", env(&team, "env-1", &dev))
            .await
            .allowed
    );
    for (op, e) in [
        ("environment.exec", "env-1"),
        ("environment.delete", "env-1"),
        ("environment.get", "env-2"),
    ] {
        let d = h.authorize(&narrow, op, env(&team, e, &dev)).await;
        assert!(!d.allowed, "{op} {e}");
    }
    // Team restriction: another team's resources and team-less calls fail.
    let other = h.create_team("team-b").await;
    h.add_member(&other, &dev, TeamRole::Developer).await;
    let team_only =
        vibebox_token::attenuate(&token, &vibebox_token::Restriction::default().team(&team))
            .unwrap();
    assert!(
        h.authorize(&team_only, "environment.create", env(&team, "", ""))
            .await
            .allowed
    );
    assert!(
        !h.authorize(&team_only, "environment.create", env(&other, "", ""))
            .await
            .allowed
    );
    // An attenuated token cannot mint an unrestricted one.
    let err = h
        .identity
        .create_api_token(bearer(pb::CreateApiTokenRequest::default(), &team_only))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Earlier expiry, already past.
    let past = vibebox_token::attenuate(
        &token,
        &vibebox_token::Restriction::default()
            .expires_at(chrono::Utc::now() - chrono::Duration::seconds(1)),
    )
    .unwrap();
    assert!(
        !h.authorize(&past, "environment.get", env(&team, "env-1", &dev))
            .await
            .allowed
    );
    h.stop().await;
}

#[tokio::test]
async fn revocation_demotion_and_disabling_apply_within_two_seconds() {
    let mut h = Harness::start(None).await;
    let team = h.create_team("team-r").await;
    let dev = h.create_user("dev", PlatformRole::None).await;
    let dev2 = h.create_user("dev-two", PlatformRole::None).await;
    h.add_member(&team, &dev, TeamRole::Developer).await;
    h.add_member(&team, &dev2, TeamRole::Developer).await;
    let resource = env(&team, "env-1", &dev);

    // Revocation: a session, an API token derived from it and an offline
    // attenuation of the API token all stop working.
    let session = h.login("dev").await;
    let api = h
        .identity
        .create_api_token(bearer(
            pb::CreateApiTokenRequest {
                request_id: Default::default(),
                restrictions: Default::default(),
                description: "ci".into(),
                ttl_seconds: Some(3600),
            },
            &session.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let attenuated = vibebox_token::attenuate(
        &api.token,
        &vibebox_token::Restriction::default().team(&team),
    )
    .unwrap();
    for t in [&session.token, &api.token, &attenuated] {
        assert!(
            h.authorize(t, "environment.exec", resource.clone())
                .await
                .allowed
        );
    }
    h.identity
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: session.token_id.clone(),
            },
            &session.token,
        ))
        .await
        .unwrap();
    for t in [&session.token, &api.token, &attenuated] {
        let took = h
            .until_denied(t, "environment.exec", resource.clone())
            .await;
        assert!(took < Duration::from_secs(2), "revocation took {took:?}");
    }
    let d = h
        .authorize(&api.token, "environment.get", resource.clone())
        .await;
    assert!(d.reason.contains("revoked"), "{}", d.reason);
    let err = h
        .identity
        .who_am_i(bearer(pb::WhoAmIRequest {}, &api.token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Another user's token cannot be revoked, and looks unknown.
    let other = h.login("dev-two").await;
    let mine = h.login("dev").await;
    let err = h
        .identity
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: other.token_id.clone(),
            },
            &mine.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Demotion to viewer: exec on one's own environment stops, reading stays.
    assert!(
        h.authorize(&mine.token, "environment.exec", resource.clone())
            .await
            .allowed
    );
    h.identity
        .set_team_member_role(bearer(
            pb::SetTeamMemberRoleRequest {
                team_id: team.clone(),
                user_id: dev.clone(),
                role: TeamRole::Viewer as i32,
            },
            &h.admin_token,
        ))
        .await
        .unwrap();
    let took = h
        .until_denied(&mine.token, "environment.exec", resource.clone())
        .await;
    assert!(took < Duration::from_secs(2), "demotion took {took:?}");
    assert!(
        h.authorize(&mine.token, "environment.get", resource.clone())
            .await
            .allowed
    );

    // Disabling a user stops every token of theirs.
    assert!(
        h.authorize(&other.token, "environment.get", resource.clone())
            .await
            .allowed
    );
    h.identity
        .set_user_disabled(bearer(
            pb::SetUserDisabledRequest {
                user_id: dev2.clone(),
                disabled: true,
            },
            &h.admin_token,
        ))
        .await
        .unwrap();
    let took = h
        .until_denied(&other.token, "environment.get", resource.clone())
        .await;
    assert!(took < Duration::from_secs(2), "disabling took {took:?}");
    // And their logins fail.
    let err = h
        .identity
        .login(pb::LoginRequest {
            username: "dev-two".into(),
            password: PASSWORD.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Each change was audited once, by the acting user.
    let events = outbox_events(&h.data_dir);
    let count = |action: &str| events.iter().filter(|e| e.action == action).count();
    assert_eq!(count("token.revoke"), 1);
    assert_eq!(count("membership.set_role"), 1);
    assert_eq!(count("user.disable"), 1);
    let revoke = events.iter().find(|e| e.action == "token.revoke").unwrap();
    assert_eq!(revoke.actor.as_ref().unwrap().user_id, dev);
    assert_eq!(revoke.resource_id, session.token_id);
    assert!(
        events.iter().any(|e| e.action == "auth.login"
            && e.outcome == vibebox_proto::audit::Outcome::Failure as i32)
    );
    h.stop().await;
}

#[tokio::test]
async fn expired_tampered_and_foreign_tokens_are_denied() {
    let mut h = Harness::start(None).await;
    let team_res = authz::Resource::default();
    // Expired: a one-second API token, checked after it ran out.
    let short = h
        .identity
        .create_api_token(bearer(
            pb::CreateApiTokenRequest {
                request_id: Default::default(),
                restrictions: Default::default(),
                description: "short".into(),
                ttl_seconds: Some(1),
            },
            &h.admin_token,
        ))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let d = h
        .authorize(&short.token, "identity.whoami", team_res.clone())
        .await;
    assert!(!d.allowed);
    assert!(d.reason.contains("expired"), "{}", d.reason);

    // Tampered: flip one character in the middle of the admin token.
    let mut chars: Vec<char> = h.admin_token.chars().collect();
    let mid = chars.len() / 2;
    chars[mid] = if chars[mid] == 'A' { 'B' } else { 'A' };
    let tampered: String = chars.into_iter().collect();
    let d = h
        .authorize(&tampered, "identity.whoami", team_res.clone())
        .await;
    assert!(!d.allowed);
    assert!(d.user_id.is_empty());

    // Signed by another key, with the right key id and a real user/token id.
    let me = h
        .identity
        .who_am_i(bearer(pb::WhoAmIRequest {}, &h.admin_token))
        .await
        .unwrap()
        .into_inner();
    let keys = h
        .authz
        .get_token_keys(authz::GetTokenKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].public_key.len(), 32);
    let key_id: u32 = keys[0].key_id.parse().unwrap();
    let forged = vibebox_token::mint(
        &vibebox_token::RootKey::generate(key_id),
        &vibebox_token::Claims::new(
            me.user.unwrap().id,
            me.token_id,
            chrono::Utc::now() + chrono::Duration::hours(1),
        ),
    )
    .unwrap();
    let d = h
        .authorize(&forged, "identity.whoami", team_res.clone())
        .await;
    assert!(!d.allowed);
    assert!(d.reason.contains("signature"), "{}", d.reason);
    let err = h
        .identity
        .who_am_i(bearer(pb::WhoAmIRequest {}, &forged))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // And no token at all.
    let err = h.identity.who_am_i(pb::WhoAmIRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    h.stop().await;
}

#[tokio::test]
async fn validation_duplicates_and_no_existence_oracle() {
    let mut h = Harness::start(None).await;
    let bad = h
        .identity
        .create_user(bearer(
            pb::CreateUserRequest {
                request_id: Default::default(),
                username: "Bad Name".into(),
                display_name: String::new(),
                password: PASSWORD.into(),
                platform_role: 0,
            },
            &h.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("username"), "{}", bad.message());
    let short = h
        .identity
        .create_user(bearer(
            pb::CreateUserRequest {
                request_id: Default::default(),
                username: "carol".into(),
                display_name: String::new(),
                password: "short".into(),
                platform_role: 0,
            },
            &h.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::InvalidArgument);
    let alice = h.create_user("alice", PlatformRole::None).await;
    let dup = h
        .identity
        .create_user(bearer(
            pb::CreateUserRequest {
                request_id: Default::default(),
                username: "alice".into(),
                display_name: String::new(),
                password: PASSWORD.into(),
                platform_role: 0,
            },
            &h.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let team = h.create_team("team-x").await;
    let dup = h
        .identity
        .create_team(bearer(
            pb::CreateTeamRequest {
                request_id: Default::default(),
                name: "team-x".into(),
                display_name: String::new(),
            },
            &h.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    h.add_member(&team, &alice, TeamRole::Viewer).await;
    let dup = h
        .identity
        .add_team_member(bearer(
            pb::AddTeamMemberRequest {
                team_id: team.clone(),
                user_id: alice.clone(),
                role: TeamRole::Admin as i32,
            },
            &h.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);

    // Bob, outside team-x, cannot tell it from a team that does not exist.
    h.create_user("bob", PlatformRole::None).await;
    let bob = h.login("bob").await.token;
    let hidden = h
        .identity
        .list_team_members(bearer(
            pb::ListTeamMembersRequest {
                page_size: Default::default(),
                page_token: Default::default(),
                team_id: team.clone(),
            },
            &bob,
        ))
        .await
        .unwrap_err();
    let missing = h
        .identity
        .list_team_members(bearer(
            pb::ListTeamMembersRequest {
                page_size: Default::default(),
                page_token: Default::default(),
                team_id: uuid::Uuid::new_v4().to_string(),
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    assert_eq!(
        (hidden.code(), hidden.message()),
        (missing.code(), missing.message())
    );
    // Bob sees no teams; Alice, a viewer, sees hers but cannot manage it.
    let teams = h
        .identity
        .list_teams(bearer(pb::ListTeamsRequest::default(), &bob))
        .await
        .unwrap()
        .into_inner()
        .teams;
    assert!(teams.is_empty());
    let alice_token = h.login("alice").await.token;
    let err = h
        .identity
        .add_team_member(bearer(
            pb::AddTeamMemberRequest {
                team_id: team.clone(),
                user_id: alice.clone(),
                role: TeamRole::Admin as i32,
            },
            &alice_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .identity
        .create_user(bearer(
            pb::CreateUserRequest {
                request_id: Default::default(),
                username: "mallory".into(),
                display_name: String::new(),
                password: PASSWORD.into(),
                platform_role: PlatformRole::Admin as i32,
            },
            &alice_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The last admin of a team stays.
    let admin_id = h
        .identity
        .who_am_i(bearer(pb::WhoAmIRequest {}, &h.admin_token))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .id;
    let err = h
        .identity
        .remove_team_member(bearer(
            pb::RemoveTeamMemberRequest {
                team_id: team.clone(),
                user_id: admin_id,
            },
            &h.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    h.stop().await;
}

#[tokio::test]
async fn failed_logins_are_limited_per_account_and_address_never_everywhere() {
    // Three failures per minute per (account, address), per address and per
    // account: a budget refills one failure every 20 s, far longer than this
    // test's steps take.
    let pki = TestPki::new();
    let dir = pki.server_args("identity").data_dir;
    let mut h = Harness::start_with(pki, dir, None, |c| {
        c.login_failures_per_account_source = 3;
        c.login_failures_per_source = 3;
        c.login_failures_per_account = 3;
        c.login_backoff_ms = 300;
    })
    .await;
    h.create_user("victim", PlatformRole::None).await;
    let attempt = |user: &str, password: &str, source: &str| {
        let mut r = Request::new(pb::LoginRequest {
            username: user.into(),
            password: password.into(),
        });
        r.metadata_mut().insert(
            vibebox_server_kit::meta::CLIENT_ADDRESS,
            source.parse().unwrap(),
        );
        r
    };
    // One address guessing, a new connection (port) per guess.
    for i in 0..3 {
        let err = h
            .identity
            .login(attempt(
                "victim",
                "wrong password!",
                &format!("10.0.0.1:{}", 40000 + i),
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let _ = h
        .identity
        .login(attempt("victim", "wrong password!", "10.0.0.1:41000"))
        .await;
    // That address is locked out of the account, whatever its port, even
    // with the right password; the refusal says when to retry.
    let err = h
        .identity
        .login(attempt("victim", PASSWORD, "10.0.0.1:42000"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(!err.details().is_empty(), "a RetryInfo detail: {err:?}");
    // The owner, from another address, still gets in: the account's own
    // budget is spent, so only slowly.
    let started = Instant::now();
    h.identity
        .login(attempt("victim", PASSWORD, "10.0.1.1:5000"))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "a much-guessed account is slowed down"
    );

    // One address spraying many usernames gets blocked as a source.
    h.create_user("bystander", PlatformRole::None).await;
    for i in 0..4 {
        let _ = h
            .identity
            .login(attempt(
                &format!("nobody{i}"),
                "whatever12345",
                &format!("192.0.2.7:{}", 1000 + i),
            ))
            .await;
    }
    let err = h
        .identity
        .login(attempt("bystander", PASSWORD, "192.0.2.7:2000"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let events = outbox_events(&h.data_dir);
    let limited = events
        .iter()
        .filter(|e| e.action == "auth.login" && e.client_address.starts_with("192.0.2.7:"))
        .filter(|e| {
            e.details
                .as_ref()
                .is_some_and(|d| format!("{d:?}").contains("rate_limited"))
        })
        .count();
    assert!(limited >= 1);
    // From elsewhere the bystander logs in fine.
    h.identity
        .login(attempt("bystander", PASSWORD, "192.0.2.8:2000"))
        .await
        .unwrap();
    h.stop().await;
}

#[tokio::test]
async fn only_the_gateway_may_call() {
    let h = Harness::start(None).await;
    let channel = vibebox_server_kit::connect(&h.url, &h.pki.material("tester")).unwrap();
    let mut stranger = AuthorizationServiceClient::new(channel);
    let err = stranger
        .get_token_keys(authz::GetTokenKeysRequest {})
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::PermissionDenied | Code::Unauthenticated),
        "{err:?}"
    );
    h.stop().await;
}

/// The storage flows on every test database: bootstrap, users, teams,
/// memberships, token trees, and key rotation / retirement across restarts.
#[tokio::test]
async fn storage_flows_on_every_database() {
    for db in vibebox_db::testing::databases().await {
        let pki = TestPki::new();
        let dir = pki.server_args("identity").data_dir;
        let mut h = Harness::start_with(pki, dir, Some(db.url.clone()), |_| {}).await;
        let team = h.create_team("store-team").await;
        let u = h.create_user("store-user", PlatformRole::Auditor).await;
        h.add_member(&team, &u, TeamRole::Developer).await;
        let members = h
            .identity
            .list_team_members(bearer(
                pb::ListTeamMembersRequest {
                    page_size: Default::default(),
                    page_token: Default::default(),
                    team_id: team.clone(),
                },
                &h.admin_token,
            ))
            .await
            .unwrap()
            .into_inner()
            .memberships;
        assert_eq!(members.len(), 2, "{:?}", db.kind);
        let users = h
            .identity
            .list_users(bearer(
                pb::ListUsersRequest {
                    page_size: 1,
                    page_token: String::new(),
                },
                &h.admin_token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(users.users.len(), 1);
        let rest = h
            .identity
            .list_users(bearer(
                pb::ListUsersRequest {
                    page_size: 10,
                    page_token: users.next_page_token,
                },
                &h.admin_token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(rest.users.len(), 1);
        assert_eq!(rest.users[0].platform_role, PlatformRole::Auditor as i32);
        let session = h.login("store-user").await;
        let api = h
            .identity
            .create_api_token(bearer(pb::CreateApiTokenRequest::default(), &session.token))
            .await
            .unwrap()
            .into_inner();
        h.identity
            .revoke_token(bearer(
                pb::RevokeTokenRequest {
                    token_id: session.token_id,
                },
                &session.token,
            ))
            .await
            .unwrap();
        let d = h
            .authorize(&api.token, "identity.whoami", authz::Resource::default())
            .await;
        assert!(!d.allowed, "{:?}: derived token survived", db.kind);

        // Rotation: the old admin token keeps working next to the new key.
        let admin_token = h.admin_token.clone();
        let (pki, dir) = h.stop().await;
        let mut h = Harness::start_with(pki, dir, Some(db.url.clone()), |c| {
            c.rotate_token_key = true
        })
        .await;
        let keys = h
            .authz
            .get_token_keys(authz::GetTokenKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .keys;
        assert_eq!(keys.len(), 2);
        assert!(
            h.authorize(&admin_token, "identity.whoami", authz::Resource::default())
                .await
                .allowed
        );
        // New logins are signed by the new key.
        let fresh = h.login("store-user").await.token;
        // Retiring the old key: its tokens stop, the new ones work.
        let (pki, dir) = h.stop().await;
        let old: u32 = keys
            .iter()
            .map(|k| k.key_id.parse::<u32>().unwrap())
            .min()
            .unwrap();
        let mut h = Harness::start_with(pki, dir.clone(), Some(db.url.clone()), |c| {
            c.retire_token_key = vec![old]
        })
        .await;
        let d = h
            .authorize(&admin_token, "identity.whoami", authz::Resource::default())
            .await;
        assert!(!d.allowed);
        assert!(
            h.authorize(&fresh, "identity.whoami", authz::Resource::default())
                .await
                .allowed
        );
        h.stop().await;
    }
}

/// Writers that arrive together all succeed: each write transaction holds
/// the write lock from its start (SQLite would otherwise fail a transaction
/// that read before another writer committed, whatever the busy timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_all_succeed_on_every_database() {
    for db in vibebox_db::testing::databases().await {
        let pki = TestPki::new();
        let dir = pki.server_args("identity").data_dir;
        let mut h = Harness::start_with(pki, dir, Some(db.url.clone()), |_| {}).await;
        let team = h.create_team("busy-team").await;
        let mut users = Vec::new();
        for i in 0..12 {
            users.push(
                h.create_user(&format!("busy-user-{i}"), PlatformRole::None)
                    .await,
            );
        }
        let admin = h.admin_token.clone();
        let teams = (0..12).map(|i| {
            let mut identity = h.identity.clone();
            let admin = admin.clone();
            async move {
                identity
                    .create_team(bearer(
                        pb::CreateTeamRequest {
                            request_id: Default::default(),
                            name: format!("busy-team-{i}"),
                            display_name: String::new(),
                        },
                        &admin,
                    ))
                    .await
                    .map(drop)
            }
        });
        let members = users.iter().map(|user| {
            let mut identity = h.identity.clone();
            let (admin, team, user) = (admin.clone(), team.clone(), user.clone());
            async move {
                identity
                    .add_team_member(bearer(
                        pb::AddTeamMemberRequest {
                            team_id: team.clone(),
                            user_id: user.clone(),
                            role: TeamRole::Viewer as i32,
                        },
                        &admin,
                    ))
                    .await?;
                identity
                    .set_team_member_role(bearer(
                        pb::SetTeamMemberRoleRequest {
                            team_id: team,
                            user_id: user,
                            role: TeamRole::Developer as i32,
                        },
                        &admin,
                    ))
                    .await
                    .map(drop)
            }
        });
        let (teams, members) = tokio::join!(
            futures::future::join_all(teams),
            futures::future::join_all(members)
        );
        for result in teams.into_iter().chain(members) {
            result.unwrap_or_else(|s| panic!("{:?}: {s:?}", db.kind));
        }
        let listed = h
            .identity
            .list_team_members(bearer(
                pb::ListTeamMembersRequest {
                    page_size: Default::default(),
                    page_token: Default::default(),
                    team_id: team.clone(),
                },
                &admin,
            ))
            .await
            .unwrap()
            .into_inner()
            .memberships;
        let developers = listed
            .iter()
            .filter(|m| m.role == TeamRole::Developer as i32)
            .count();
        assert!(developers >= 12, "{:?}: {listed:?}", db.kind);
        h.stop().await;
    }
}

fn team_resource(team: &str) -> authz::Resource {
    authz::Resource {
        kind: "team".into(),
        team_id: team.into(),
        id: team.into(),
        ..Default::default()
    }
}

fn rules(status: &tonic::Status) -> Vec<String> {
    vibebox_server_kit::status::violated_rules(status)
}

impl Harness {
    async fn create_service_account(
        &mut self,
        token: &str,
        team: &str,
        name: &str,
        role: TeamRole,
        request_id: &str,
    ) -> Result<pb::ServiceAccount, tonic::Status> {
        self.identity
            .create_service_account(bearer(
                pb::CreateServiceAccountRequest {
                    team_id: team.into(),
                    name: name.into(),
                    display_name: String::new(),
                    role: role as i32,
                    request_id: request_id.into(),
                },
                token,
            ))
            .await
            .map(|r| r.into_inner().service_account.unwrap())
    }

    async fn service_account_token(
        &mut self,
        token: &str,
        sa: &str,
        restrictions: Option<pb::TokenRestrictions>,
        request_id: &str,
    ) -> Result<pb::CreateServiceAccountTokenResponse, tonic::Status> {
        self.identity
            .create_service_account_token(bearer(
                pb::CreateServiceAccountTokenRequest {
                    service_account_id: sa.into(),
                    description: "ci".into(),
                    ttl_seconds: None,
                    request_id: request_id.into(),
                    restrictions,
                },
                token,
            ))
            .await
            .map(|r| r.into_inner())
    }

    async fn list_tokens(
        &mut self,
        token: &str,
        owner: &str,
        team: &str,
        show_inactive: bool,
    ) -> Result<Vec<pb::ApiToken>, tonic::Status> {
        self.identity
            .list_api_tokens(bearer(
                pb::ListApiTokensRequest {
                    owner_id: owner.into(),
                    team_id: team.into(),
                    show_inactive,
                    page_size: 0,
                    page_token: String::new(),
                },
                token,
            ))
            .await
            .map(|r| r.into_inner().tokens)
    }
}

#[tokio::test]
async fn service_accounts_are_team_principals_that_never_log_in_or_manage_identities() {
    for db in vibebox_db::testing::databases().await {
        service_account_journey(Harness::start(Some(db.url.clone())).await).await;
    }
}

async fn service_account_journey(mut h: Harness) {
    let admin = h.admin_token.clone();
    let team = h.create_team("team-sa").await;
    let other = h.create_team("team-other").await;
    let alice = h.create_user("alice", PlatformRole::None).await;
    let bob = h.create_user("bob", PlatformRole::None).await;
    let carol = h.create_user("carol", PlatformRole::None).await;
    h.add_member(&team, &alice, TeamRole::Admin).await;
    h.add_member(&team, &bob, TeamRole::Developer).await;
    h.add_member(&other, &carol, TeamRole::Admin).await;
    let alice_t = h.login("alice").await.token;
    let bob_t = h.login("bob").await.token;
    let carol_t = h.login("carol").await.token;

    // A team admin creates it; a retry with the same request id is the same
    // account, the same id with other fields is refused as reused.
    let sa = h
        .create_service_account(&alice_t, &team, "ci-bot", TeamRole::Developer, "sa-1")
        .await
        .unwrap();
    assert_eq!(
        (sa.team_id.as_str(), sa.role, sa.disabled),
        (team.as_str(), TeamRole::Developer as i32, false)
    );
    let again = h
        .create_service_account(&alice_t, &team, "ci-bot", TeamRole::Developer, "sa-1")
        .await
        .unwrap();
    assert_eq!(again.id, sa.id);
    let reused = h
        .create_service_account(&alice_t, &team, "ci-bot", TeamRole::Admin, "sa-1")
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);
    assert_eq!(rules(&reused), ["request_id.reused"]);
    // Without a request id, the name is simply taken (as a username is).
    for name in ["ci-bot", "alice"] {
        let taken = h
            .create_service_account(&alice_t, &team, name, TeamRole::Viewer, "")
            .await
            .unwrap_err();
        assert_eq!(taken.code(), Code::AlreadyExists, "{name}");
    }
    // Developers cannot; outsiders do not even see the team.
    let denied = h
        .create_service_account(&bob_t, &team, "bob-bot", TeamRole::Viewer, "")
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let hidden = h
        .create_service_account(&carol_t, &team, "carol-bot", TeamRole::Viewer, "")
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    assert!(
        h.create_service_account(&alice_t, &team, "Bad Name", TeamRole::Viewer, "")
            .await
            .unwrap_err()
            .code()
            == Code::InvalidArgument
    );

    // It never logs in: the same answer as a wrong password.
    for (user, password) in [
        ("ci-bot", ""),
        ("ci-bot", PASSWORD),
        ("alice", "wrong password!"),
    ] {
        let err = h
            .identity
            .login(pb::LoginRequest {
                username: user.into(),
                password: password.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::Unauthenticated, "invalid username or password"),
            "{user}"
        );
    }

    // One team only: not added elsewhere, not removed (deleted instead).
    let add = h
        .identity
        .add_team_member(bearer(
            pb::AddTeamMemberRequest {
                team_id: other.clone(),
                user_id: sa.id.clone(),
                role: TeamRole::Viewer as i32,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(rules(&add), ["service_account.single_team"]);
    let remove = h
        .identity
        .remove_team_member(bearer(
            pb::RemoveTeamMemberRequest {
                team_id: team.clone(),
                user_id: sa.id.clone(),
            },
            &alice_t,
        ))
        .await
        .unwrap_err();
    assert_eq!(rules(&remove), ["service_account.single_team"]);

    // Its token holds its own id, is of its kind, and works in its team only.
    let issued = h
        .service_account_token(&alice_t, &sa.id, None, "")
        .await
        .unwrap();
    let lifetime = issued.expire_time.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!(
        (29 * 86400..=30 * 86400).contains(&lifetime),
        "default 30 days: {lifetime}"
    );
    let sa_t = issued.token.clone();
    let who = h
        .identity
        .who_am_i(bearer(pb::WhoAmIRequest {}, &sa_t))
        .await
        .unwrap()
        .into_inner();
    let user = who.user.unwrap();
    assert_eq!(
        (user.id.as_str(), user.kind),
        (sa.id.as_str(), pb::PrincipalKind::ServiceAccount as i32)
    );
    assert_eq!(who.memberships.len(), 1);
    let d = h
        .authorize(&sa_t, "environment.create", team_resource(&team))
        .await;
    assert!(d.allowed, "{}", d.reason);
    assert_eq!(d.user_id, sa.id);
    assert_eq!(d.principal_kind, pb::PrincipalKind::ServiceAccount as i32);
    assert!(
        !h.authorize(&sa_t, "environment.create", team_resource(&other))
            .await
            .allowed
    );
    let human = h
        .authorize(&bob_t, "environment.create", team_resource(&team))
        .await;
    assert_eq!(human.principal_kind, pb::PrincipalKind::Human as i32);

    // It manages no identities, whatever its role.
    let minted = h
        .identity
        .create_api_token(bearer(pb::CreateApiTokenRequest::default(), &sa_t))
        .await
        .unwrap_err();
    assert_eq!(minted.code(), Code::PermissionDenied);
    let own = h
        .service_account_token(&sa_t, &sa.id, None, "")
        .await
        .unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied);
    let spawn = h
        .create_service_account(&sa_t, &team, "sa-child", TeamRole::Viewer, "")
        .await
        .unwrap_err();
    assert_eq!(spawn.code(), Code::PermissionDenied);
    for op in ["identity.member.add", "identity.service_account.delete"] {
        assert!(
            !h.authorize(&sa_t, op, team_resource(&team)).await.allowed,
            "{op}"
        );
    }

    // Tokens for it: only from its team's admins, with an unattenuated
    // token, never past the platform maximum, and not bound to the caller.
    assert_eq!(
        h.service_account_token(&bob_t, &sa.id, None, "")
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        h.service_account_token(&carol_t, &sa.id, None, "")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let narrow =
        vibebox_token::attenuate(&alice_t, &vibebox_token::Restriction::default().team(&team))
            .unwrap();
    let attenuated = h
        .service_account_token(&narrow, &sa.id, None, "")
        .await
        .unwrap_err();
    assert_eq!(rules(&attenuated), ["token.attenuated_parent"]);
    let too_long = h
        .identity
        .create_service_account_token(bearer(
            pb::CreateServiceAccountTokenRequest {
                service_account_id: sa.id.clone(),
                ttl_seconds: Some(91 * 86400),
                ..Default::default()
            },
            &alice_t,
        ))
        .await
        .unwrap_err();
    assert_eq!(rules(&too_long), ["token.max_ttl"]);
    // Longer than alice's 12-hour session: fine, it does not derive from it.
    let long = h
        .identity
        .create_service_account_token(bearer(
            pb::CreateServiceAccountTokenRequest {
                service_account_id: sa.id.clone(),
                ttl_seconds: Some(60 * 86400),
                ..Default::default()
            },
            &alice_t,
        ))
        .await
        .unwrap()
        .into_inner();
    let alice_session = h.login("alice").await;
    h.identity
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: alice_session.token_id.clone(),
            },
            &alice_session.token,
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        h.authorize(&long.token, "environment.get", team_resource(&team))
            .await
            .allowed,
        "revoking an admin's session leaves the service account's tokens"
    );

    // Members list them; outsiders do not see the team.
    let listed = h
        .identity
        .list_service_accounts(bearer(
            pb::ListServiceAccountsRequest {
                team_id: team.clone(),
                ..Default::default()
            },
            &bob_t,
        ))
        .await
        .unwrap()
        .into_inner()
        .service_accounts;
    assert_eq!(
        listed.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["ci-bot"]
    );
    assert_eq!(
        h.identity
            .list_service_accounts(bearer(
                pb::ListServiceAccountsRequest {
                    team_id: team.clone(),
                    ..Default::default()
                },
                &carol_t,
            ))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Delete: developers cannot; the admin disables it for good and every
    // token it has stops.
    let delete = |token: &str| {
        bearer(
            pb::DeleteServiceAccountRequest {
                service_account_id: sa.id.clone(),
            },
            token,
        )
    };
    assert_eq!(
        h.identity
            .delete_service_account(delete(&bob_t))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let deleted = h
        .identity
        .delete_service_account(delete(&alice_t))
        .await
        .unwrap()
        .into_inner()
        .service_account
        .unwrap();
    assert!(deleted.disabled);
    for t in [&sa_t, &long.token] {
        let d = h
            .authorize(t, "environment.get", team_resource(&team))
            .await;
        assert!(!d.allowed && d.user_id.is_empty(), "{}", d.reason);
    }
    let listed = h.list_tokens(&alice_t, &sa.id, "", true).await.unwrap();
    assert!(
        listed.len() >= 2 && listed.iter().all(|t| t.revoked),
        "{listed:?}"
    );
    // Deleting again changes nothing; it is never enabled again nor given
    // tokens.
    h.identity
        .delete_service_account(delete(&alice_t))
        .await
        .unwrap();
    let enable = h
        .identity
        .set_user_disabled(bearer(
            pb::SetUserDisabledRequest {
                user_id: sa.id.clone(),
                disabled: false,
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(rules(&enable), ["service_account.deleted"]);
    assert_eq!(
        h.service_account_token(&alice_t, &sa.id, None, "")
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );

    // Audited with the actor's kind.
    let events = outbox_events(&h.data_dir);
    let created = events
        .iter()
        .find(|e| e.action == "service_account.create")
        .expect("service_account.create audited");
    let actor = created.actor.clone().unwrap();
    assert_eq!(
        (actor.user_id.as_str(), actor.kind.as_str()),
        (alice.as_str(), "user")
    );
    assert_eq!(created.team_id, team);
    assert!(events.iter().any(|e| e.action == "service_account.delete"));
    let sa_token_event = events
        .iter()
        .find(|e| e.action == "token.create" && e.resource_id == issued.token_id)
        .expect("token.create audited");
    assert_eq!(sa_token_event.team_id, team);
    h.stop().await;
}

#[tokio::test]
async fn restrictions_are_baked_into_tokens() {
    let mut h = Harness::start(None).await;
    let team = h.create_team("team-r1").await;
    let other = h.create_team("team-r2").await;
    let dev = h.create_user("dev", PlatformRole::None).await;
    h.add_member(&team, &dev, TeamRole::Developer).await;
    h.add_member(&other, &dev, TeamRole::Developer).await;
    let dev_t = h.login("dev").await.token;
    let create = |restrictions: pb::TokenRestrictions| {
        bearer(
            pb::CreateApiTokenRequest {
                description: "narrow".into(),
                restrictions: Some(restrictions),
                ..Default::default()
            },
            &dev_t,
        )
    };
    let narrow = h
        .identity
        .create_api_token(create(pb::TokenRestrictions {
            team_ids: vec![team.clone()],
            operations: vec!["environment.get".into(), "environment.logs".into()],
            environment_ids: vec![],
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(
        h.authorize(&narrow.token, "environment.get", env(&team, "e1", &dev))
            .await
            .allowed
    );
    for (op, t) in [
        ("environment.create", &team),
        ("environment.exec", &team),
        ("environment.get", &other),
    ] {
        assert!(
            !h.authorize(&narrow.token, op, env(t, "e1", &dev))
                .await
                .allowed,
            "{op}"
        );
    }
    // Restricted tokens are attenuated: they mint nothing.
    let err = h
        .identity
        .create_api_token(bearer(pb::CreateApiTokenRequest::default(), &narrow.token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Listed as issued.
    let listed = h.list_tokens(&dev_t, "", "", false).await.unwrap();
    let mine = listed.iter().find(|t| t.id == narrow.token_id).unwrap();
    let r = mine.restrictions.clone().unwrap();
    assert_eq!(r.team_ids, [team.as_str()]);
    assert_eq!(r.operations, ["environment.get", "environment.logs"]);
    // Bounded and checked.
    for (bad, field) in [
        (
            pb::TokenRestrictions {
                operations: vec!["environment.explode".into()],
                ..Default::default()
            },
            "restrictions.operations",
        ),
        (
            pb::TokenRestrictions {
                team_ids: (0..17).map(|i| format!("t{i}")).collect(),
                ..Default::default()
            },
            "restrictions.team_ids",
        ),
        (
            pb::TokenRestrictions {
                environment_ids: vec!["a,b".into()],
                ..Default::default()
            },
            "restrictions.environment_ids",
        ),
    ] {
        let err = h.identity.create_api_token(create(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().contains(field), "{}", err.message());
    }
    h.stop().await;
}

#[tokio::test]
async fn api_tokens_are_listed_by_scope_with_last_use_and_never_their_secret() {
    for db in vibebox_db::testing::databases().await {
        let pki = TestPki::new();
        let data_dir = pki.server_args("identity").data_dir.clone();
        let h = Harness::start_with(pki, data_dir, Some(db.url.clone()), |c| {
            c.token_usage_interval_secs = 1;
        })
        .await;
        token_listing(h).await;
    }
}

async fn token_listing(mut h: Harness) {
    let admin = h.admin_token.clone();
    let team = h.create_team("team-l").await;
    let other = h.create_team("team-l2").await;
    let alice = h.create_user("alice", PlatformRole::None).await;
    let bob = h.create_user("bob", PlatformRole::None).await;
    let carol = h.create_user("carol", PlatformRole::None).await;
    h.add_member(&team, &alice, TeamRole::Admin).await;
    h.add_member(&team, &bob, TeamRole::Developer).await;
    h.add_member(&other, &carol, TeamRole::Admin).await;
    let alice_t = h.login("alice").await.token;
    let bob_t = h.login("bob").await.token;
    let carol_t = h.login("carol").await.token;
    let sa = h
        .create_service_account(&alice_t, &team, "lister", TeamRole::Viewer, "")
        .await
        .unwrap();
    let sa_token = h
        .service_account_token(&alice_t, &sa.id, None, "")
        .await
        .unwrap();
    let bob_api = h
        .identity
        .create_api_token(bearer(
            pb::CreateApiTokenRequest {
                description: "bob's laptop".into(),
                ..Default::default()
            },
            &bob_t,
        ))
        .await
        .unwrap()
        .into_inner();

    // Own: API tokens only (no sessions), never anyone else's.
    let ids = |tokens: &[pb::ApiToken]| tokens.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&h.list_tokens(&bob_t, "", "", false).await.unwrap()),
        [bob_api.token_id.as_str()]
    );
    assert!(
        h.list_tokens(&alice_t, "", "", false)
            .await
            .unwrap()
            .is_empty()
    );
    // A team admin: the team's service accounts', by team or by owner.
    for (owner, t) in [
        ("", team.as_str()),
        (sa.id.as_str(), ""),
        (sa.id.as_str(), team.as_str()),
    ] {
        let listed = h.list_tokens(&alice_t, owner, t, false).await.unwrap();
        assert_eq!(ids(&listed), [sa_token.token_id.as_str()], "{owner} {t}");
        let only = &listed[0];
        assert_eq!(
            (
                only.owner_id.as_str(),
                only.owner_kind,
                only.owner_name.as_str(),
                only.team_id.as_str(),
                only.description.as_str(),
                only.revoked
            ),
            (
                sa.id.as_str(),
                pb::PrincipalKind::ServiceAccount as i32,
                "lister",
                team.as_str(),
                "ci",
                false
            )
        );
    }
    // Not for developers, not for other teams' admins, not other people's.
    for (token, owner, t, code) in [
        (&bob_t, "", team.as_str(), Code::PermissionDenied),
        (&bob_t, sa.id.as_str(), "", Code::PermissionDenied),
        (&alice_t, bob.as_str(), "", Code::PermissionDenied),
        (&carol_t, "", team.as_str(), Code::NotFound),
        (&carol_t, sa.id.as_str(), "", Code::PermissionDenied),
    ] {
        let err = h.list_tokens(token, owner, t, false).await.unwrap_err();
        assert_eq!(err.code(), code, "{owner} {t}");
    }
    // A platform admin sees every API token (the bootstrap one included),
    // and anyone's by owner.
    let all = ids(&h.list_tokens(&admin, "", "", false).await.unwrap());
    for id in [&sa_token.token_id, &bob_api.token_id] {
        assert!(all.contains(id), "{all:?}");
    }
    assert!(all.len() >= 3);
    assert_eq!(
        ids(&h.list_tokens(&admin, &bob, "", false).await.unwrap()),
        [bob_api.token_id.as_str()]
    );

    // Last use: set once identity decides for the token, throttled.
    let listed = h.list_tokens(&alice_t, &sa.id, "", false).await.unwrap();
    assert!(listed[0].last_used_time.is_none());
    let before = chrono::Utc::now().timestamp();
    assert!(
        h.authorize(&sa_token.token, "environment.get", team_resource(&team))
            .await
            .allowed
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let used = loop {
        let listed = h.list_tokens(&alice_t, &sa.id, "", false).await.unwrap();
        if let Some(t) = listed[0].last_used_time {
            break t;
        }
        assert!(Instant::now() < deadline, "last_used_time never set");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(used.seconds >= before - 1);

    // Never the secret, in any listing.
    use prost::Message as _;
    for token in [&admin, &alice_t, &bob_t] {
        let listed = h.list_tokens(token, "", "", true).await.unwrap();
        let bytes = pb::ListApiTokensResponse {
            tokens: listed,
            next_page_token: String::new(),
        }
        .encode_to_vec();
        for secret in [&sa_token.token, &bob_api.token] {
            let needle = &secret.as_bytes()[..40];
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
    }

    // Revoking: a team admin may revoke the service account's token; a
    // developer of the team finds nothing to revoke.
    let revoke = |token: &str| {
        bearer(
            pb::RevokeTokenRequest {
                token_id: sa_token.token_id.clone(),
            },
            token,
        )
    };
    assert_eq!(
        h.identity
            .revoke_token(revoke(&bob_t))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    h.identity.revoke_token(revoke(&alice_t)).await.unwrap();
    assert!(
        !h.authorize(&sa_token.token, "environment.get", team_resource(&team))
            .await
            .allowed
    );
    // Inactive tokens only on request.
    assert!(
        h.list_tokens(&alice_t, "", &team, false)
            .await
            .unwrap()
            .is_empty()
    );
    let inactive = h.list_tokens(&alice_t, "", &team, true).await.unwrap();
    assert_eq!(ids(&inactive), [sa_token.token_id.as_str()]);
    assert!(inactive[0].revoked);
    h.stop().await;
}

#[tokio::test]
async fn service_account_tokens_end_with_their_issuers_authority() {
    for db in vibebox_db::testing::databases().await {
        issuer_authority(Harness::start(Some(db.url.clone())).await).await;
    }
}

async fn issuer_authority(mut h: Harness) {
    let admin = h.admin_token.clone();
    let root = h
        .identity
        .who_am_i(bearer(pb::WhoAmIRequest {}, &admin))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .id;
    let team = h.create_team("team-m").await;
    let other = h.create_team("team-m2").await;
    let mut ids = std::collections::HashMap::new();
    for name in ["alice", "bob", "carol", "keeper"] {
        let id = h.create_user(name, PlatformRole::None).await;
        h.add_member(&team, &id, TeamRole::Admin).await;
        ids.insert(name, id);
    }
    h.add_member(&other, &ids["carol"], TeamRole::Admin).await;
    // The platform admin is an admin of the teams it made.
    let alice_t = h.login("alice").await.token;
    let bob_t = h.login("bob").await.token;
    let carol_t = h.login("carol").await.token;
    let sa = h
        .create_service_account(&alice_t, &team, "minted-bot", TeamRole::Developer, "")
        .await
        .unwrap();
    let sa2 = h
        .create_service_account(&carol_t, &other, "minted-bot-2", TeamRole::Viewer, "")
        .await
        .unwrap();
    let mint = |h: &Harness, by: &str, sa: &str| {
        let (by, sa) = (by.to_owned(), sa.to_owned());
        let mut identity = h.identity.clone();
        async move {
            identity
                .create_service_account_token(bearer(
                    pb::CreateServiceAccountTokenRequest {
                        service_account_id: sa,
                        description: "ci".into(),
                        ..Default::default()
                    },
                    &by,
                ))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let by_alice = mint(&h, &alice_t, &sa.id).await;
    let by_alice_too = mint(&h, &alice_t, &sa.id).await;
    let by_bob = mint(&h, &bob_t, &sa.id).await;
    let by_carol = mint(&h, &carol_t, &sa.id).await;
    let by_carol_elsewhere = mint(&h, &carol_t, &sa2.id).await;
    let by_root = mint(&h, &admin, &sa.id).await;
    let works = |h: &Harness, token: &str, team: &str| {
        let (token, team) = (token.to_owned(), team.to_owned());
        let mut authz = h.authz.clone();
        async move {
            authz
                .authorize(AuthorizeRequest {
                    token,
                    operation: "environment.get".into(),
                    resource: Some(team_resource(&team)),
                })
                .await
                .unwrap()
                .into_inner()
                .allowed
        }
    };
    for (t, in_team) in [
        (&by_alice, &team),
        (&by_alice_too, &team),
        (&by_bob, &team),
        (&by_carol, &team),
        (&by_carol_elsewhere, &other),
        (&by_root, &team),
    ] {
        assert!(works(&h, &t.token, in_team).await);
    }
    // Listed with their issuer.
    let listed = h.list_tokens(&admin, "", &team, true).await.unwrap();
    let issuer = |listed: &[pb::ApiToken], id: &str| {
        let t = listed.iter().find(|t| t.id == id).unwrap();
        (t.created_by.clone(), t.revoked)
    };
    assert_eq!(
        issuer(&listed, &by_bob.token_id),
        (ids["bob"].clone(), false)
    );

    // Removed from the team: what alice minted stops; the rest works.
    h.identity
        .remove_team_member(bearer(
            pb::RemoveTeamMemberRequest {
                team_id: team.clone(),
                user_id: ids["alice"].clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    for t in [&by_alice, &by_alice_too] {
        let took = h
            .until_denied(&t.token, "environment.get", team_resource(&team))
            .await;
        assert!(took < Duration::from_secs(2), "removal took {took:?}");
    }
    assert!(works(&h, &by_bob.token, &team).await);
    // Demoted to developer: what bob minted stops. Re-made admin, it stays
    // revoked.
    for role in [TeamRole::Developer, TeamRole::Admin] {
        h.identity
            .set_team_member_role(bearer(
                pb::SetTeamMemberRoleRequest {
                    team_id: team.clone(),
                    user_id: ids["bob"].clone(),
                    role: role as i32,
                },
                &admin,
            ))
            .await
            .unwrap();
    }
    assert!(!works(&h, &by_bob.token, &team).await);
    assert!(works(&h, &by_carol.token, &team).await);
    // Disabled: what carol minted, in every team, stops.
    h.identity
        .set_user_disabled(bearer(
            pb::SetUserDisabledRequest {
                user_id: ids["carol"].clone(),
                disabled: true,
            },
            &admin,
        ))
        .await
        .unwrap();
    assert!(!works(&h, &by_carol.token, &team).await);
    assert!(!works(&h, &by_carol_elsewhere.token, &other).await);
    // A platform admin leaving the team keeps the authority to mint: theirs
    // stays.
    h.identity
        .remove_team_member(bearer(
            pb::RemoveTeamMemberRequest {
                team_id: team.clone(),
                user_id: root.clone(),
            },
            &admin,
        ))
        .await
        .unwrap();
    assert!(works(&h, &by_root.token, &team).await);

    // The registry shows each one revoked, with who minted it.
    let listed = h.list_tokens(&admin, "", "", true).await.unwrap();
    for (t, by, revoked) in [
        (&by_alice, &ids["alice"], true),
        (&by_alice_too, &ids["alice"], true),
        (&by_bob, &ids["bob"], true),
        (&by_carol, &ids["carol"], true),
        (&by_carol_elsewhere, &ids["carol"], true),
        (&by_root, &root, false),
    ] {
        assert_eq!(issuer(&listed, &t.token_id), (by.clone(), revoked));
    }
    // Audited: one event per cause and team, naming the tokens.
    let events = outbox_events(&h.data_dir);
    let mut revocations: Vec<_> = events
        .iter()
        .filter(|e| e.action == "token.revoke_minted")
        .map(|e| {
            let detail = |k: &str| match &e.details.as_ref().unwrap().fields[k].kind {
                Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
                other => panic!("{k}: {other:?}"),
            };
            let mut tokens: Vec<String> =
                detail("token_ids").split(',').map(str::to_owned).collect();
            tokens.sort();
            (
                e.resource_id.clone(),
                e.team_id.clone(),
                detail("reason"),
                detail("revoked"),
                tokens,
                e.actor.as_ref().unwrap().user_id.clone(),
            )
        })
        .collect();
    revocations.sort();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let mut want = vec![
        (
            ids["alice"].clone(),
            team.clone(),
            "membership.remove".to_owned(),
            "2".to_owned(),
            sorted(vec![
                by_alice.token_id.clone(),
                by_alice_too.token_id.clone(),
            ]),
            root.clone(),
        ),
        (
            ids["bob"].clone(),
            team.clone(),
            "membership.set_role".to_owned(),
            "1".to_owned(),
            vec![by_bob.token_id.clone()],
            root.clone(),
        ),
        (
            ids["carol"].clone(),
            team.clone(),
            "user.disable".to_owned(),
            "1".to_owned(),
            vec![by_carol.token_id.clone()],
            root.clone(),
        ),
        (
            ids["carol"].clone(),
            other.clone(),
            "user.disable".to_owned(),
            "1".to_owned(),
            vec![by_carol_elsewhere.token_id.clone()],
            root.clone(),
        ),
    ];
    want.sort();
    assert_eq!(revocations, want);

    // A service account made admin lists its own tokens only, by team too,
    // and no other service account's.
    let sa_admin = h
        .create_service_account(&admin, &team, "admin-bot", TeamRole::Admin, "")
        .await
        .unwrap();
    let sa_admin_t = mint(&h, &admin, &sa_admin.id).await;
    let keeper_t = h.login("keeper").await.token;
    let kept = mint(&h, &keeper_t, &sa.id).await;
    for (owner, t) in [
        ("", ""),
        ("", team.as_str()),
        (sa_admin.id.as_str(), team.as_str()),
    ] {
        let listed = h
            .list_tokens(&sa_admin_t.token, owner, t, true)
            .await
            .unwrap();
        let ids: Vec<_> = listed.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, [sa_admin_t.token_id.as_str()], "{owner:?} {t:?}");
    }
    let err = h
        .list_tokens(&sa_admin_t.token, &sa.id, "", true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The team's human admin still sees them all.
    let all = h.list_tokens(&keeper_t, "", &team, false).await.unwrap();
    for id in [&sa_admin_t.token_id, &kept.token_id, &by_root.token_id] {
        assert!(all.iter().any(|t| &t.id == id), "{all:?}");
    }
    h.stop().await;
}

/// Mints racing the issuer's removal: every token minted either comes
/// before the removal (and is revoked by it) or is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mint_racing_the_issuers_removal_leaves_no_token_behind() {
    for db in vibebox_db::testing::databases().await {
        let mut h = Harness::start(Some(db.url.clone())).await;
        let admin = h.admin_token.clone();
        let team = h.create_team("team-race").await;
        let alice = h.create_user("alice", PlatformRole::None).await;
        h.add_member(&team, &alice, TeamRole::Admin).await;
        let alice_t = h.login("alice").await.token;
        let sa = h
            .create_service_account(&alice_t, &team, "race-bot", TeamRole::Viewer, "")
            .await
            .unwrap();
        let minters: Vec<_> = (0..4)
            .map(|_| {
                let mut identity = h.identity.clone();
                let (token, sa) = (alice_t.clone(), sa.id.clone());
                tokio::spawn(async move {
                    let mut minted = 0;
                    loop {
                        let request = bearer(
                            pb::CreateServiceAccountTokenRequest {
                                service_account_id: sa.clone(),
                                ..Default::default()
                            },
                            &token,
                        );
                        match identity.create_service_account_token(request).await {
                            Ok(_) => minted += 1,
                            Err(status) => return (minted, status.code()),
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.identity
            .remove_team_member(bearer(
                pb::RemoveTeamMemberRequest {
                    team_id: team.clone(),
                    user_id: alice.clone(),
                },
                &admin,
            ))
            .await
            .unwrap();
        let mut minted = 0;
        for m in minters {
            let (n, code) = m.await.unwrap();
            assert!(
                matches!(code, Code::PermissionDenied | Code::NotFound),
                "{code:?}"
            );
            minted += n;
        }
        assert!(minted > 0, "no mint came before the removal");
        let active = h.list_tokens(&admin, "", &team, false).await.unwrap();
        assert!(
            active.is_empty(),
            "{} of {minted} left: {active:?}",
            active.len()
        );
        h.stop().await;
    }
}

#[tokio::test]
async fn creates_are_idempotent_by_request_id() {
    for db in vibebox_db::testing::databases().await {
        idempotent_creates(Harness::start(Some(db.url.clone())).await).await;
    }
}

async fn idempotent_creates(mut h: Harness) {
    let admin = h.admin_token.clone();
    let user = |display: &str, password: &str| {
        bearer(
            pb::CreateUserRequest {
                username: "idem".into(),
                display_name: display.into(),
                password: password.into(),
                platform_role: PlatformRole::None as i32,
                request_id: "user-1".into(),
            },
            &admin,
        )
    };
    let first = h
        .identity
        .create_user(user("Idem", PASSWORD))
        .await
        .unwrap();
    let again = h
        .identity
        .create_user(user("Idem", PASSWORD))
        .await
        .unwrap();
    assert_eq!(
        first.into_inner().user.unwrap().id,
        again.into_inner().user.unwrap().id
    );
    for (display, password) in [("Other", PASSWORD), ("Idem", "another long password")] {
        let err = h
            .identity
            .create_user(user(display, password))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{display}");
        use tonic_types::StatusExt as _;
        assert_eq!(
            err.get_details_error_info().unwrap().reason,
            "request_id.reused"
        );
    }

    let team = |name: &str, request_id: &str, token: &str| {
        bearer(
            pb::CreateTeamRequest {
                name: name.into(),
                display_name: String::new(),
                request_id: request_id.into(),
            },
            token,
        )
    };
    let a = h
        .identity
        .create_team(team("idem-team", "team-1", &admin))
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap();
    let b = h
        .identity
        .create_team(team("idem-team", "team-1", &admin))
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap();
    assert_eq!(a.id, b.id);
    // Without the key, a second create is a duplicate.
    assert_eq!(
        h.identity
            .create_team(team("idem-team", "", &admin))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    // Keys are per caller: another admin's same key is a new request.
    h.create_user("root2", PlatformRole::Admin).await;
    let root2 = h.login("root2").await.token;
    let c = h
        .identity
        .create_team(team("idem-team-2", "team-1", &root2))
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap();
    assert_ne!(c.id, a.id);

    // Tokens: a retry revokes what the earlier attempt issued.
    let token = |description: &str| {
        bearer(
            pb::CreateApiTokenRequest {
                description: description.into(),
                request_id: "tok-1".into(),
                ..Default::default()
            },
            &admin,
        )
    };
    let t1 = h
        .identity
        .create_api_token(token("ci"))
        .await
        .unwrap()
        .into_inner();
    let t2 = h
        .identity
        .create_api_token(token("ci"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(t1.token_id, t2.token_id);
    let platform = authz::Resource {
        kind: "platform".into(),
        ..Default::default()
    };
    assert!(
        !h.authorize(&t1.token, "identity.user.list", platform.clone())
            .await
            .allowed
    );
    assert!(
        h.authorize(&t2.token, "identity.user.list", platform)
            .await
            .allowed
    );
    let err = h
        .identity
        .create_api_token(token("something else"))
        .await
        .unwrap_err();
    assert_eq!(rules(&err), ["request_id.reused"]);
    // The same for a service account's token.
    let sa = h
        .create_service_account(&admin, &a.id, "idem-bot", TeamRole::Viewer, "")
        .await
        .unwrap();
    let s1 = h
        .service_account_token(&admin, &sa.id, None, "sa-tok")
        .await
        .unwrap();
    let s2 = h
        .service_account_token(&admin, &sa.id, None, "sa-tok")
        .await
        .unwrap();
    assert_ne!(s1.token_id, s2.token_id);
    assert!(
        !h.authorize(&s1.token, "environment.get", team_resource(&a.id))
            .await
            .allowed
    );
    assert!(
        h.authorize(&s2.token, "environment.get", team_resource(&a.id))
            .await
            .allowed
    );
    let listed = h.list_tokens(&admin, &sa.id, "", false).await.unwrap();
    assert_eq!(listed.len(), 1, "one valid token per key");
    h.stop().await;
}

/// ListTeamMembers is paged: ordered by username, pages of the size asked
/// for (default 50), an opaque token bound to its team, on every database.
#[tokio::test]
async fn team_members_are_paged_by_username_on_every_database() {
    use tonic_types::StatusExt;
    for db in vibebox_db::testing::databases().await {
        let pki = TestPki::new();
        let dir = pki.server_args("identity").data_dir;
        let mut h = Harness::start_with(pki, dir, Some(db.url.clone()), |_| {}).await;
        let team = h.create_team("paged-team").await;
        let other = h.create_team("other-team").await;
        // Created out of order; the creator (the bootstrap admin) is a
        // member too.
        let names = ["mira", "bert", "zoe", "anna", "carl", "yuki", "dora"];
        for name in names {
            let id = h.create_user(name, PlatformRole::None).await;
            h.add_member(&team, &id, TeamRole::Developer).await;
        }
        let admin_token = h.admin_token.clone();
        let list = |page_size: i32, page_token: String, team_id: String| {
            let mut client = h.identity.clone();
            let token = admin_token.clone();
            async move {
                client
                    .list_team_members(bearer(
                        pb::ListTeamMembersRequest {
                            team_id,
                            page_size,
                            page_token,
                        },
                        &token,
                    ))
                    .await
                    .map(|r| r.into_inner())
            }
        };
        let everyone = list(0, String::new(), team.clone()).await.unwrap();
        assert!(everyone.next_page_token.is_empty());
        let mut expected: Vec<String> = everyone
            .memberships
            .iter()
            .map(|m| m.username.clone())
            .collect();
        assert_eq!(expected.len(), names.len() + 1, "{:?}", db.kind);
        expected.sort();
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        let mut token = String::new();
        loop {
            let page = list(3, token.clone(), team.clone()).await.unwrap();
            sizes.push(page.memberships.len());
            assert!(
                page.memberships
                    .iter()
                    .all(|m| m.team_id == team && m.team_name == "paged-team")
            );
            got.extend(page.memberships.iter().map(|m| m.username.clone()));
            if page.next_page_token.is_empty() {
                break;
            }
            // Opaque: not the username in the clear.
            assert!(!page.next_page_token.contains(got.last().unwrap().as_str()));
            token = page.next_page_token;
        }
        assert_eq!(got, expected, "{:?}", db.kind);
        assert_eq!(sizes, [3, 3, 2], "{:?}", db.kind);

        // A token is refused for another team, and garbage is refused.
        let first = list(3, String::new(), team.clone()).await.unwrap();
        for (bad, why) in [
            (first.next_page_token.clone(), "another team"),
            ("zz".to_owned(), "not a token"),
            ("42".to_owned(), "not a token"),
        ] {
            let err = list(3, bad, other.clone()).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            let violations = err
                .get_details_bad_request()
                .expect("a BadRequest")
                .field_violations;
            assert_eq!(violations[0].field, "page_token");
            assert!(violations[0].description.contains(why), "{violations:?}");
        }
        h.stop().await;
    }
}
