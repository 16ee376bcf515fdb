//! Hostile tenants with tokens (issue 16, items 1, 2 and the token-key half
//! of 7): the holder of a developer's own token appends datalog offline to
//! freeze the gateway, mints a long unrestricted token from a short
//! attenuated one, and keeps using a token whose signing key was retired.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use vibebox_tests::cluster::{Cluster, Service};

use super::*;

/// The gateway's answer to a call made with `token` (raw bearer value),
/// `None` if it succeeded; a call that does not finish in `deadline` is a
/// DEADLINE_EXCEEDED made here.
async fn whoami_with(gateway: &str, token: &str, deadline: Duration) -> Result<(), tonic::Status> {
    let channel = plaintext(&format!("http://{gateway}"));
    let mut client =
        vibebox_proto::identity::identity_service_client::IdentityServiceClient::new(channel);
    let mut request = tonic::Request::new(WhoAmIRequest {});
    request.set_timeout(deadline);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    match tokio::time::timeout(
        deadline + Duration::from_millis(500),
        client.who_am_i(request),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(tonic::Status::deadline_exceeded("no answer (test timeout)")),
    }
}

/// `token` with an appended block whose rule joins `facts` facts four ways
/// and never derives anything: unbounded work inside one datalog iteration.
fn with_hostile_block(token: &str, facts: usize) -> String {
    let mut code = String::new();
    for i in 0..facts {
        code.push_str(&format!("f({i});"));
    }
    code.push_str("g($a) <- f($a), f($b), f($c), f($d), $a + $b + $c + $d == -1;");
    hostile_append(token, &code)
}

fn hostile_append(token: &str, code: &str) -> String {
    // What any holder can do offline with the public biscuit library; the
    // platform's own `attenuate` only writes checks.
    let block = biscuit_auth::BlockBuilder::new()
        .code(code)
        .expect("datalog");
    biscuit_auth::UnverifiedBiscuit::from_base64(token)
        .and_then(|t| t.append(block))
        .and_then(|t| t.to_base64())
        .expect("append a block offline")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_tokens_do_not_freeze_the_gateway() {
    let mut report = SuiteReport::new("attack", "hostile_tokens_do_not_freeze_the_gateway");
    let p = Platform::start();
    let admin = p.admin_token();
    let alpha = team(&p, &admin, "alpha").await;
    let (_, dev) = member(&p, &admin, "dev", &alpha, TeamRole::Developer).await;
    let mut dev_identity = p.identity(&dev);
    let expired = dev_identity
        .create_api_token(CreateApiTokenRequest {
            request_id: Default::default(),
            restrictions: Default::default(),
            description: "expires at once".into(),
            ttl_seconds: Some(1),
        })
        .await
        .expect("a one-second API token")
        .into_inner();
    let revoked = dev_identity
        .create_api_token(CreateApiTokenRequest {
            request_id: Default::default(),
            restrictions: Default::default(),
            description: "revoked at once".into(),
            ttl_seconds: Some(3600),
        })
        .await
        .expect("an API token")
        .into_inner();
    dev_identity
        .revoke_token(RevokeTokenRequest {
            token_id: revoked.token_id.clone(),
        })
        .await
        .expect("revoke");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Control: honest calls work before the attack.
    let gateway = p.gateway.clone();
    whoami_with(&gateway, &dev, Duration::from_secs(5))
        .await
        .expect("control: WhoAmI before the attack");

    let hostile = vec![
        ("self-join, valid token", with_hostile_block(&dev, 200)),
        ("self-join, small", with_hostile_block(&dev, 60)),
        (
            "self-join, expired token",
            with_hostile_block(&expired.token, 60),
        ),
        (
            "self-join, revoked token",
            with_hostile_block(&revoked.token, 60),
        ),
        (
            "rule-only block",
            hostile_append(&dev, "g($a) <- team($a), operation($b), time($c);"),
        ),
        (
            "regex check",
            hostile_append(&dev, "check if operation($o), $o.matches(\"^(a+)+$\");"),
        ),
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    for client in 0..4 {
        let hostile = hostile.clone();
        let gateway = gateway.clone();
        let stop = stop.clone();
        attackers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = client;
            while !stop.load(Ordering::Relaxed) {
                let (name, token) = &hostile[i % hostile.len()];
                i += 1;
                let result = whoami_with(&gateway, token, Duration::from_secs(3)).await;
                answers.push((*name, result));
            }
            answers
        }));
    }

    // Honest calls alongside: Health and WhoAmI, each with a generous deadline.
    let mut honest_failures = Vec::new();
    let mut honest_calls = 0;
    let started = Instant::now();
    let mut health = HealthClient::new(plaintext(&format!("http://{gateway}")));
    while started.elapsed() < Duration::from_secs(12) {
        honest_calls += 1;
        let mut request = tonic::Request::new(HealthCheckRequest::default());
        request.set_timeout(Duration::from_secs(5));
        match tokio::time::timeout(Duration::from_secs(6), health.check(request)).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) => honest_failures.push(format!("health: {s:?}")),
            Err(_) => honest_failures.push("health: no answer in 5 s".to_owned()),
        }
        if let Err(s) = whoami_with(&gateway, &dev, Duration::from_secs(5)).await {
            honest_failures.push(format!("whoami: {:?} {}", s.code(), s.message()));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for attacker in attackers {
        answers.extend(attacker.await.expect("attacker task"));
    }
    report.note("honest_calls", honest_calls * 2);
    report.note("hostile_calls", answers.len());

    report.case(honest_failures.is_empty());
    assert!(
        honest_failures.is_empty(),
        "honest calls failed during the attack ({} of {}): {:?}",
        honest_failures.len(),
        honest_calls * 2,
        &honest_failures[..honest_failures.len().min(6)]
    );

    // Every hostile token is refused as unauthenticated, naming the rule
    // (the per-address limit may answer first once the burst is spent).
    let mut named = std::collections::BTreeSet::new();
    for (name, result) in &answers {
        let refused = match result {
            Err(s) if s.code() == Code::Unauthenticated => {
                if s.message().contains("refused") {
                    named.insert(*name);
                }
                true
            }
            Err(s) => s.code() == Code::ResourceExhausted && s.message().contains("rate limit"),
            Ok(()) => false,
        };
        report.case(refused);
        assert!(refused, "{name}: {result:?}");
    }
    for (name, _) in &hostile {
        assert!(
            named.contains(name),
            "{name}: never refused with a reason naming the rule: {:?}",
            answers
                .iter()
                .filter(|(n, _)| n == name)
                .take(3)
                .collect::<Vec<_>>()
        );
    }
    // And after it.
    whoami_with(&gateway, &dev, Duration::from_secs(5))
        .await
        .expect("WhoAmI after the attack");
}

/// The expiry a CreateApiToken answer states.
fn expiry_of(response: &vibebox_proto::identity::CreateApiTokenResponse) -> SystemTime {
    let t = response.expire_time.as_ref().expect("expire_time");
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.seconds).expect("after 1970"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_tokens_never_widen() {
    let mut report = SuiteReport::new("attack", "minted_tokens_never_widen");
    let p = Platform::start();
    let admin = p.admin_token();
    let alpha = team(&p, &admin, "alpha").await;
    let password = "mint-password-123";
    let user = p
        .identity(&admin)
        .create_user(CreateUserRequest {
            request_id: Default::default(),
            username: "minter".into(),
            display_name: "minter".into(),
            password: password.into(),
            platform_role: PlatformRole::None as i32,
        })
        .await
        .expect("create user")
        .into_inner()
        .user
        .expect("user");
    p.identity(&admin)
        .add_team_member(AddTeamMemberRequest {
            team_id: alpha.clone(),
            user_id: user.id.clone(),
            role: TeamRole::Developer as i32,
        })
        .await
        .expect("add member");
    let session = p
        .identity("")
        .login(LoginRequest {
            username: "minter".into(),
            password: password.into(),
        })
        .await
        .expect("login")
        .into_inner();
    let session_expiry = {
        let t = session.expire_time.as_ref().expect("session expiry");
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.seconds as u64)
    };
    let year = 365 * 24 * 3600;

    // 1. Attenuated tokens (two minutes; operations, or team and operations)
    // ask for a year.
    let two_minutes = chrono::Utc::now() + chrono::Duration::minutes(2);
    let ops = ["identity.token.create", "identity.whoami"];
    let op_restricted = vibebox_token::attenuate(
        &session.token,
        &vibebox_token::Restriction::default()
            .operations(ops)
            .expires_at(two_minutes),
    )
    .expect("attenuate");
    let team_restricted = vibebox_token::attenuate(
        &session.token,
        &vibebox_token::Restriction::default()
            .team(&alpha)
            .operations(ops)
            .expires_at(two_minutes),
    )
    .expect("attenuate");
    for (name, token) in [
        ("two-minute operation-restricted", &op_restricted),
        ("two-minute team-restricted", &team_restricted),
    ] {
        let result = p
            .identity(token)
            .create_api_token(CreateApiTokenRequest {
                request_id: Default::default(),
                restrictions: Default::default(),
                description: "escape".into(),
                ttl_seconds: Some(year),
            })
            .await;
        let refused = match &result {
            Err(s) => matches!(s.code(), Code::PermissionDenied | Code::FailedPrecondition),
            Ok(_) => false,
        };
        report.case(refused);
        assert!(refused, "{name} minted: {result:?}");
        // The operation-restricted one passes the gateway's checks: identity
        // refuses it and names the rule.
        if name.contains("operation") {
            let status = result.unwrap_err();
            let rules = Refusal::of(&status).rule_ids();
            assert!(
                rules.iter().any(|r| r == "token.attenuated_parent"),
                "{status:?}"
            );
        }
        // Nor with the default lifetime.
        let result = p
            .identity(token)
            .create_api_token(CreateApiTokenRequest {
                request_id: Default::default(),
                restrictions: Default::default(),
                description: "escape".into(),
                ttl_seconds: None,
            })
            .await;
        report.case(result.is_err());
        assert!(
            result.is_err(),
            "{name} minted with the default TTL: {result:?}"
        );
    }

    // 2. A session token asks for a year: beyond the platform maximum and
    // beyond its own expiry.
    let result = p
        .identity(&session.token)
        .create_api_token(CreateApiTokenRequest {
            request_id: Default::default(),
            restrictions: Default::default(),
            description: "a year".into(),
            ttl_seconds: Some(year),
        })
        .await;
    report.case(result.is_err());
    let status = result.expect_err("a 365-day token from a 12-hour session");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let rules = Refusal::of(&status).rule_ids();
    assert!(
        rules.iter().any(|r| r == "token.max_ttl")
            && rules.iter().any(|r| r == "token.outlives_parent"),
        "{status:?}"
    );

    // 3. What it may mint never outlives it: the default lifetime is cut to
    // the session's, and the token works (WhoAmI) as the same user.
    let minted = p
        .identity(&session.token)
        .create_api_token(CreateApiTokenRequest {
            request_id: Default::default(),
            restrictions: Default::default(),
            description: "default".into(),
            ttl_seconds: None,
        })
        .await
        .expect("an API token within the session's lifetime")
        .into_inner();
    let outlives = expiry_of(&minted) > session_expiry;
    report.case(!outlives);
    assert!(
        !outlives,
        "minted {:?} beyond the session's {session_expiry:?}",
        minted.expire_time
    );
    let who = p
        .identity(&minted.token)
        .who_am_i(WhoAmIRequest {})
        .await
        .expect("the minted token works")
        .into_inner();
    assert_eq!(who.user.expect("user").id, user.id);
    let hour = p
        .identity(&session.token)
        .create_api_token(CreateApiTokenRequest {
            request_id: Default::default(),
            restrictions: Default::default(),
            description: "an hour".into(),
            ttl_seconds: Some(3600),
        })
        .await
        .expect("a one-hour token from a session")
        .into_inner();
    assert!(expiry_of(&hour) <= SystemTime::now() + Duration::from_secs(3601));
    // An API token cannot mint one that outlives it either.
    let result = p
        .identity(&hour.token)
        .create_api_token(CreateApiTokenRequest {
            request_id: Default::default(),
            restrictions: Default::default(),
            description: "longer than its parent".into(),
            ttl_seconds: Some(7200),
        })
        .await;
    report.case(result.is_err());
    let status = result.expect_err("a two-hour token from a one-hour token");
    assert!(
        Refusal::of(&status)
            .rule_ids()
            .iter()
            .any(|r| r == "token.outlives_parent"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_token_key_is_refused_within_two_seconds() {
    let mut report = SuiteReport::new(
        "attack",
        "a_retired_token_key_is_refused_within_two_seconds",
    );
    let mut cluster = Cluster::start().await;
    let alpha = cluster.team("alpha").await;
    let dev = cluster.user("dev", &alpha, TeamRole::Developer).await;
    // Every token issued so far (the admin's too) is signed by key 1; this
    // user logs in again after the rotation.
    cluster.user("dev2", &alpha, TeamRole::Developer).await;
    whoami_with(&cluster.gateway, &dev, Duration::from_secs(5))
        .await
        .expect("control: the token works");

    // Identity restarts with a new key and key 1 retired (the gateway keeps
    // running throughout).
    cluster.terminate(Service::Identity);
    cluster.set_args(
        Service::Identity,
        vec![
            "--rotate-token-key".to_owned(),
            "--retire-token-key=1".to_owned(),
        ],
    );
    cluster.restart(Service::Identity).await;
    let retired_at = Instant::now();
    let deadline = retired_at + Duration::from_secs(2);
    let last = loop {
        let result = whoami_with(&cluster.gateway, &dev, Duration::from_secs(1)).await;
        if matches!(&result, Err(s) if s.code() == Code::Unauthenticated)
            || Instant::now() > deadline
        {
            break result;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let elapsed = retired_at.elapsed();
    report.note("refused_after_ms", elapsed.as_millis());
    let refused = matches!(&last, Err(s) if s.code() == Code::Unauthenticated);
    report.case(refused);
    assert!(
        refused && elapsed <= Duration::from_millis(2100),
        "a token of the retired key after {elapsed:?}: {last:?}"
    );
    // The platform goes on with the new key.
    let fresh = cluster
        .identity("")
        .login(LoginRequest {
            username: "dev2".into(),
            password: "dev2-password-123".into(),
        })
        .await
        .expect("login after the rotation")
        .into_inner()
        .token;
    whoami_with(&cluster.gateway, &fresh, Duration::from_secs(5))
        .await
        .expect("a token of the new key works");
}
