//! Hostile tenants (issue 16), items 3 to 6, through the public API of a
//! real platform:
//!
//! - secrets stay write-only: environment variable values never come back
//!   from a read (Create's answer, Get, List, Restart), to the owner or a
//!   viewer, and never reach the audit log; the container still has them;
//! - fair shares: one user opening follow streams hits a per-user cap
//!   (RESOURCE_EXHAUSTED with QuotaFailure) long before it can starve the
//!   gateway; another user's Login and reads keep working meanwhile;
//! - login abuse: password spraying with a new connection per attempt is
//!   limited per client address, and an attacker hammering an account from
//!   one address cannot lock its owner out from another address;
//! - rights are re-checked on long streams: an exec shell, a log follow and
//!   an audit watch end within the platform's two-second bound once the
//!   token is revoked, the user demoted, removed from the team or disabled.

use std::net::IpAddr;

use tokio::sync::mpsc;
use tonic::{Status, Streaming};
use tonic_types::StatusExt;
use vibebox_proto::audit::{
    EventFilter, QueryEventsRequest, WatchEventsRequest, WatchEventsResponse,
};
use vibebox_proto::environment::{Environment, ExecResponse, StreamLogsResponse, exec_response};
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::identity::{LoginResponse, RemoveTeamMemberRequest, SetTeamMemberRoleRequest};

use super::*;

/// The value the secrets test hides in the spec.
const SECRET: &str = "s3cr3t-value-7f3a9c1e";

/// Env var names whose values came back (must be none).
fn leaked_values(environment: &Environment) -> Vec<String> {
    let spec = environment.spec.clone().unwrap_or_default();
    spec.env
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| format!("{name}={value}"))
        .collect()
}

fn env_names(environment: &Environment) -> Vec<String> {
    let spec = environment.spec.clone().unwrap_or_default();
    spec.env.keys().cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variable_values_are_write_only() {
    let mut report = SuiteReport::new("attack", "environment_variable_values_are_write_only");
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let t = team(&p, &admin, "secrets").await;
    let (_, owner) = member(&p, &admin, "owner", &t, TeamRole::Developer).await;
    let (_, viewer) = member(&p, &admin, "viewer", &t, TeamRole::Viewer).await;

    let mut with_secret = spec(&image);
    with_secret.env.insert("API_KEY".into(), SECRET.into());
    with_secret.env.insert("GREETING".into(), "hello".into());
    let created = patiently(|| {
        let mut client = p.environments(&owner);
        let request = CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: "secret-env".into(),
            team_id: t.clone(),
            name: "secret-env".into(),
            spec: Some(with_secret.clone()),
        };
        async move { client.create_environment(request).await }
    })
    .await
    .expect("create")
    .into_inner()
    .environment
    .expect("environment");
    let env = created.id.clone();
    let expected_names = vec!["API_KEY".to_owned(), "GREETING".to_owned()];
    // Create answers CREATING; the environment as it settled (the answer of
    // WaitEnvironment, or of the GetEnvironment poll) is a read too.
    let settled = p
        .environments(&owner)
        .settle(&env)
        .await
        .expect("settle the create");
    assert_eq!(settled.state(), EnvironmentState::Running, "{settled:?}");

    // Every read: Create's own answer, Get and List (with and without a
    // team), by the owner and by a viewer, and a lifecycle call's answer.
    let mut reads: Vec<(String, Environment)> = vec![
        ("create response".into(), created),
        ("settled create".into(), settled),
    ];
    for (who, token) in [("owner", &owner), ("viewer", &viewer)] {
        let got = p
            .environments(token)
            .get_environment(GetEnvironmentRequest {
                environment_id: env.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("{who} get: {s:?}"))
            .into_inner()
            .environment
            .expect("environment");
        reads.push((format!("{who} GetEnvironment"), got));
        for team_id in [t.clone(), String::new()] {
            let listed = p
                .environments(token)
                .list_environments(ListEnvironmentsRequest {
                    team_id: team_id.clone(),
                    page_size: 50,
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("{who} list: {s:?}"))
                .into_inner()
                .environments;
            let mine = listed
                .into_iter()
                .find(|e| e.id == env)
                .unwrap_or_else(|| panic!("{who} lists the environment"));
            reads.push((format!("{who} ListEnvironments(team={team_id:?})"), mine));
        }
    }
    let restarted = p
        .environments(&owner)
        .restart_environment(RestartEnvironmentRequest {
            environment_id: env.clone(),
            timeout_seconds: Some(1),
        })
        .await
        .expect("restart")
        .into_inner()
        .environment
        .expect("environment");
    reads.push(("restart response".into(), restarted));
    let settled = p
        .environments(&owner)
        .settle(&env)
        .await
        .expect("settle the restart");
    assert_eq!(settled.state(), EnvironmentState::Running, "{settled:?}");
    reads.push(("settled restart".into(), settled));

    for (what, environment) in &reads {
        let leaked = leaked_values(environment);
        report.case(leaked.is_empty());
        assert!(
            leaked.is_empty(),
            "{what} returned environment variable values: {leaked:?}"
        );
        assert_eq!(
            env_names(environment),
            expected_names,
            "{what} keeps the variable names"
        );
    }

    // The container still gets them (the owner's exec sees the value).
    let (out, _, code) = vibebox_tests::attack::exec(&p, &owner, &env, &["env"])
        .await
        .expect("exec env");
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("API_KEY={SECRET}")),
        "the container lost its environment: {out}"
    );

    // The audit log never holds the value (its details are searchable).
    let mut leaked_events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = p
            .audit(&admin)
            .query_events(QueryEventsRequest {
                filter: Some(EventFilter::default()),
                page_size: 500,
                page_token: page_token.clone(),
            })
            .await
            .expect("query audit")
            .into_inner();
        for event in &page.events {
            if format!("{event:?}").contains(SECRET) {
                leaked_events.push(event.action.clone());
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    report.case(leaked_events.is_empty());
    assert!(
        leaked_events.is_empty(),
        "audit events hold the secret: {leaked_events:?}"
    );
    report.note("reads checked", reads.len());
}

/// Opens one follow-mode log stream of `env` as `token`.
async fn follow_logs(
    client: &mut EnvironmentServiceClient<vibebox_tests::Authed>,
    env: &str,
) -> Result<Streaming<StreamLogsResponse>, Status> {
    client
        .stream_logs(StreamLogsRequest {
            environment_id: env.into(),
            follow: true,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_starve_the_gateway_with_streams() {
    let mut report = SuiteReport::new("attack", "one_user_cannot_starve_the_gateway_with_streams");
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let t = team(&p, &admin, "shares").await;
    let (_, owner) = member(&p, &admin, "owner", &t, TeamRole::Developer).await;
    let (_, hog) = member(&p, &admin, "hog", &t, TeamRole::Viewer).await;
    let env = create_ok(&p, &owner, &t, "shared", spec(&image)).await;

    // The hog opens follow streams until the gateway says no.
    let mut client = p.environments(&hog);
    let mut open = Vec::new();
    let refusal = loop {
        match follow_logs(&mut client, &env).await {
            Ok(stream) => open.push(stream),
            Err(status) => break status,
        }
        assert!(
            open.len() < 64,
            "one viewer held {} follow streams without being refused",
            open.len()
        );
    };
    report.note("streams before refusal", open.len());
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    let quota = refusal.get_details_quota_failure();
    report.case(quota.is_some());
    assert!(
        quota.is_some(),
        "the per-user refusal carries no QuotaFailure (clients cannot tell it from load shedding): {refusal:?}"
    );
    // Stats follows count against the same per-user budget.
    let stats = client
        .stream_stats(StreamStatsRequest {
            environment_id: env.clone(),
            one_shot: false,
        })
        .await;
    let refused = matches!(&stats, Err(s) if s.code() == Code::ResourceExhausted);
    report.case(refused);
    assert!(refused, "a stats follow past the cap: {:?}", stats.err());

    // Meanwhile everybody else is served: another user's Login and reads,
    // and the hog's own short calls (a separate budget from its streams).
    let login = p
        .identity("")
        .login(LoginRequest {
            username: "owner".into(),
            password: "owner-password-123".into(),
        })
        .await;
    report.case(login.is_ok());
    assert!(login.is_ok(), "Login starved: {:?}", login.err());
    for (who, token) in [("owner", &owner), ("hog", &hog)] {
        let got = p
            .environments(token)
            .get_environment(GetEnvironmentRequest {
                environment_id: env.clone(),
            })
            .await;
        report.case(got.is_ok());
        assert!(
            got.is_ok(),
            "{who}'s GetEnvironment starved: {:?}",
            got.err()
        );
    }
    // The owner can still follow the logs.
    let mut owner_client = p.environments(&owner);
    let owner_stream = follow_logs(&mut owner_client, &env).await;
    report.case(owner_stream.is_ok());
    assert!(
        owner_stream.is_ok(),
        "owner's follow refused: {:?}",
        owner_stream.err()
    );

    // Closed streams give their share back.
    open.truncate(open.len() / 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match follow_logs(&mut client, &env).await {
            Ok(stream) => {
                open.push(stream);
                break;
            }
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("closed streams did not free the hog's share: {status:?}"),
        }
    }
}

/// A Login from `source` (a loopback address of this host) over a brand new
/// connection.
async fn login_from(
    p: &Platform,
    source: &str,
    username: &str,
    password: &str,
) -> Result<LoginResponse, Status> {
    let source: IpAddr = source.parse().expect("source address");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", p.gateway))
        .expect("endpoint")
        .local_address(Some(source))
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("connect from {source}: {e}")))?;
    IdentityServiceClient::new(channel)
        .login(LoginRequest {
            username: username.into(),
            password: password.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_limits_follow_the_client_address_and_never_lock_the_owner_out() {
    let mut report = SuiteReport::new(
        "attack",
        "login_limits_follow_the_client_address_and_never_lock_the_owner_out",
    );
    let p = Platform::start();
    let admin = p.admin_token();
    let t = team(&p, &admin, "logins").await;
    let (_, _) = member(&p, &admin, "victim", &t, TeamRole::Developer).await;
    let (_, _) = member(&p, &admin, "bystander", &t, TeamRole::Developer).await;

    // An attacker hammers one account from one address, reconnecting for
    // every attempt: it is locked out of that account from there.
    let mut locked_after = None;
    for attempt in 1..=15 {
        match login_from(&p, "127.0.0.3", "victim", &format!("guess-{attempt}")).await {
            Err(s) if s.code() == Code::Unauthenticated => {}
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    s.get_details_retry_info().is_some(),
                    "a login refusal carries RetryInfo: {s:?}"
                );
                locked_after = Some(attempt);
                break;
            }
            other => panic!("attempt {attempt}: {other:?}"),
        }
    }
    report.case(locked_after.is_some());
    let locked_after = locked_after
        .expect("15 reconnecting guesses at one account from one address were never refused");
    report.note("guesses before lockout", locked_after - 1);
    // Even the right password is refused from the attacker's address now.
    let from_attacker = login_from(&p, "127.0.0.3", "victim", "victim-password-123").await;
    let refused = matches!(&from_attacker, Err(s) if s.code() == Code::ResourceExhausted);
    report.case(refused);
    assert!(
        refused,
        "the locked address still logs in: {from_attacker:?}"
    );
    // The owner, from another address, still logs in.
    let owner = login_from(&p, "127.0.0.2", "victim", "victim-password-123").await;
    report.case(owner.is_ok());
    assert!(
        owner.is_ok(),
        "an anonymous attacker locked the owner out from everywhere: {:?}",
        owner.err()
    );

    // Password spraying: one address, one guess per (made-up) account, a new
    // connection per guess. The address runs out of failures.
    let mut sprayed_until = None;
    for attempt in 1..=40 {
        let username = format!("spray-{attempt}");
        match login_from(&p, "127.0.0.4", &username, "Winter2026!").await {
            Err(s) if s.code() == Code::Unauthenticated => {}
            Err(s) if s.code() == Code::ResourceExhausted => {
                sprayed_until = Some(attempt);
                break;
            }
            other => panic!("spray attempt {attempt}: {other:?}"),
        }
    }
    report.case(sprayed_until.is_some());
    let sprayed_until = sprayed_until
        .expect("40 sprayed guesses from one address, reconnecting each time, were never refused");
    report.note("sprayed guesses before refusal", sprayed_until - 1);
    // The spraying address is refused for every account; others are not.
    let from_sprayer = login_from(&p, "127.0.0.4", "bystander", "bystander-password-123").await;
    let refused = matches!(&from_sprayer, Err(s) if s.code() == Code::ResourceExhausted);
    report.case(refused);
    assert!(
        refused,
        "the spraying address still logs in: {from_sprayer:?}"
    );
    let elsewhere = login_from(&p, "127.0.0.2", "bystander", "bystander-password-123").await;
    assert!(elsewhere.is_ok(), "{:?}", elsewhere.err());
}

/// The three long streams one user holds.
struct Held {
    exec: Streaming<ExecResponse>,
    /// Keeps the shell's input open.
    stdin: mpsc::Sender<ExecRequest>,
    logs: Streaming<StreamLogsResponse>,
    audit: Streaming<WatchEventsResponse>,
}

/// Opens an interactive shell, a log follow and a team audit watch as `token`.
async fn hold_streams(p: &Platform, token: &str, env: &str, team_id: &str) -> Held {
    let (stdin, input) = mpsc::channel(8);
    stdin
        .send(ExecRequest {
            message: Some(exec_request::Message::Start(ExecStart {
                environment_id: env.into(),
                command: vec!["sh".into()],
                stdin: true,
                ..Default::default()
            })),
        })
        .await
        .expect("queue start");
    let mut exec = p
        .environments(token)
        .exec(tokio_stream::wrappers::ReceiverStream::new(input))
        .await
        .expect("open exec")
        .into_inner();
    // The shell answers.
    stdin
        .send(ExecRequest {
            message: Some(exec_request::Message::Stdin(b"echo shell-ready\n".to_vec())),
        })
        .await
        .expect("stdin");
    let mut out = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(message) = exec.message().await.expect("exec output") {
            if let Some(exec_response::Message::Stdout(bytes)) = message.message {
                out.extend(bytes);
                if String::from_utf8_lossy(&out).contains("shell-ready") {
                    return;
                }
            }
        }
        panic!("the shell ended before answering");
    })
    .await;
    assert!(ready.is_ok(), "the shell did not answer");
    let logs = follow_logs(&mut p.environments(token), env)
        .await
        .expect("follow logs");
    let audit = p
        .audit(token)
        .watch_events(WatchEventsRequest {
            filter: Some(EventFilter {
                team_id: team_id.into(),
                ..Default::default()
            }),
        })
        .await
        .expect("watch audit")
        .into_inner();
    Held {
        exec,
        stdin,
        logs,
        audit,
    }
}

/// How a stream ended by `deadline`: its status code and when, or `None`
/// while it is still open.
async fn ended<T>(stream: &mut Streaming<T>, deadline: Instant) -> Option<(Code, Instant)> {
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.message()).await {
            Err(_) => return None,
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return Some((Code::Ok, Instant::now())),
            Ok(Err(status)) => return Some((status.code(), Instant::now())),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_streams_end_when_rights_are_withdrawn() {
    let mut report = SuiteReport::new("attack", "long_streams_end_when_rights_are_withdrawn");
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let t = team(&p, &admin, "streams").await;
    let (_, owner) = member(&p, &admin, "owner", &t, TeamRole::Developer).await;
    let env = create_ok(&p, &owner, &t, "watched", spec(&image)).await;

    // Team admins may exec into any of the team's environments, follow its
    // logs and watch its audit events: each scenario takes one of them.
    for scenario in ["revoke", "demote", "remove", "disable"] {
        let name = format!("held-{scenario}");
        let (user_id, token) = member(&p, &admin, &name, &t, TeamRole::Admin).await;
        let mut held = hold_streams(&p, &token, &env, &t).await;
        let at = Instant::now();
        match scenario {
            "revoke" => {
                let token_id = p
                    .identity(&token)
                    .who_am_i(WhoAmIRequest {})
                    .await
                    .expect("whoami")
                    .into_inner()
                    .token_id;
                p.identity(&admin)
                    .revoke_token(RevokeTokenRequest { token_id })
                    .await
                    .expect("revoke");
            }
            "demote" => {
                p.identity(&admin)
                    .set_team_member_role(SetTeamMemberRoleRequest {
                        team_id: t.clone(),
                        user_id: user_id.clone(),
                        role: TeamRole::Viewer as i32,
                    })
                    .await
                    .expect("demote");
            }
            "remove" => {
                p.identity(&admin)
                    .remove_team_member(RemoveTeamMemberRequest {
                        team_id: t.clone(),
                        user_id: user_id.clone(),
                    })
                    .await
                    .expect("remove");
            }
            "disable" => {
                p.identity(&admin)
                    .set_user_disabled(SetUserDisabledRequest {
                        user_id: user_id.clone(),
                        disabled: true,
                    })
                    .await
                    .expect("disable");
            }
            _ => unreachable!(),
        }
        let withdrawn_code = match scenario {
            "revoke" | "disable" => Code::Unauthenticated,
            _ => Code::PermissionDenied,
        };
        let deadline = at + Duration::from_secs(5);
        let streams = [
            ("exec", ended(&mut held.exec, deadline).await),
            ("audit watch", ended(&mut held.audit, deadline).await),
        ];
        for (what, outcome) in streams {
            report.case(outcome.is_some());
            let (code, when) = outcome
                .unwrap_or_else(|| panic!("{scenario}: the {what} stream is still open after 5 s"));
            let took = when - at;
            assert_eq!(
                code, withdrawn_code,
                "{scenario}: {what} ended with {code:?}"
            );
            assert!(
                took < Duration::from_secs(4),
                "{scenario}: {what} ended only after {took:?}"
            );
            report.note(
                format!("{scenario} {what} ended after ms"),
                took.as_millis(),
            );
        }
        // A viewer may still follow logs: a demotion keeps that stream (the
        // re-check is a decision, not a blanket cut); every other change
        // ends it.
        let logs = ended(&mut held.logs, deadline).await;
        if scenario == "demote" {
            report.case(logs.is_none());
            assert!(
                logs.is_none(),
                "demote: a viewer's log follow was cut: {logs:?}"
            );
        } else {
            report.case(logs.is_some());
            let (code, when) = logs
                .unwrap_or_else(|| panic!("{scenario}: the log follow is still open after 5 s"));
            assert_eq!(code, withdrawn_code, "{scenario}: logs ended with {code:?}");
            assert!(
                when - at < Duration::from_secs(4),
                "{scenario}: logs took {:?}",
                when - at
            );
        }
        drop(held.stdin);
    }
}
