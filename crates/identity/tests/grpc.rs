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
