//! The whole platform end to end, as a user drives it: `vibebox up`, then
//! everything through the gateway only, with Docker inspected directly.

use std::collections::HashMap;
use std::time::Duration;

use bollard::query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder};
use tonic::Code;
use vibebox_proto::audit::{EventFilter, QueryEventsRequest, VerifyChainRequest};
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, DeleteEnvironmentRequest, EnvironmentState,
    ExecRequest, ExecStart, GetEnvironmentRequest, ListEnvironmentsRequest, Mount, MountType,
    StreamLogsRequest, exec_request, exec_response,
};
use vibebox_proto::identity::{
    AddTeamMemberRequest, CreateTeamRequest, CreateUserRequest, LoginRequest, PlatformRole,
    TeamRole,
};
use vibebox_server_kit::status::violated_rules;
use vibebox_tests::{Platform, Settle, dev_image, docker};

async fn user(p: &Platform, admin: &str, name: &str, team: &str, role: TeamRole) -> String {
    let mut identity = p.identity(admin);
    let password = format!("{name}-password-123");
    let created = identity
        .create_user(CreateUserRequest {
            request_id: Default::default(),
            username: name.into(),
            display_name: name.into(),
            password: password.clone(),
            platform_role: PlatformRole::None as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    identity
        .add_team_member(AddTeamMemberRequest {
            team_id: team.into(),
            user_id: created.id.clone(),
            role: role as i32,
        })
        .await
        .unwrap();
    p.identity("")
        .login(LoginRequest {
            username: name.into(),
            password,
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

async fn team(p: &Platform, admin: &str, name: &str) -> String {
    p.identity(admin)
        .create_team(CreateTeamRequest {
            request_id: Default::default(),
            name: name.into(),
            display_name: name.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .team
        .unwrap()
        .id
}

fn spec(image: &str) -> ContainerSpec {
    ContainerSpec {
        image: image.into(),
        ..Default::default()
    }
}

async fn containers_of(installation: &str) -> usize {
    let filters: HashMap<String, Vec<String>> = HashMap::from([(
        "label".to_string(),
        vec![format!("vibebox.installation={installation}")],
    )]);
    docker()
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap()
        .len()
}

async fn exec(
    p: &Platform,
    token: &str,
    env: &str,
    command: &[&str],
) -> Result<(String, String, i32), tonic::Status> {
    let start = ExecRequest {
        message: Some(exec_request::Message::Start(ExecStart {
            environment_id: env.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    };
    let mut stream = p
        .environments(token)
        .exec(tokio_stream::iter(vec![start]))
        .await?
        .into_inner();
    let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
    while let Some(msg) = stream.message().await? {
        match msg.message {
            Some(exec_response::Message::Stdout(b)) => out.extend(b),
            Some(exec_response::Message::Stderr(b)) => err.extend(b),
            Some(exec_response::Message::Exit(e)) => code = Some(e.exit_code),
            None => {}
        }
    }
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        code.expect("an exit message ends the stream"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_works_in_a_hardened_environment_end_to_end() {
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let installation = p.installation_id().expect("installation id");

    // Unauthenticated calls are refused.
    let anonymous = p
        .environments("")
        .list_environments(ListEnvironmentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    let alpha = team(&p, &admin, "alpha").await;
    let beta = team(&p, &admin, "beta").await;
    let dev = user(&p, &admin, "dev", &alpha, TeamRole::Developer).await;
    let viewer = user(&p, &admin, "viewer", &alpha, TeamRole::Viewer).await;
    let outsider = user(&p, &admin, "outsider", &beta, TeamRole::Developer).await;

    // The developer creates an environment; it runs hardened.
    // Create returns CREATING; it runs once settled.
    let created = p
        .environments(&dev)
        .create_settled(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: "e2e-create-1".into(),
            team_id: alpha.clone(),
            name: "workbench".into(),
            spec: Some(spec(&image)),
        })
        .await
        .unwrap();
    assert_eq!(created.state(), EnvironmentState::Running, "{created:?}");
    let env_id = created.id.clone();

    // A retried create with the same request id is the same environment.
    let again = p
        .environments(&dev)
        .create_settled(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: "e2e-create-1".into(),
            team_id: alpha.clone(),
            name: "workbench".into(),
            spec: Some(spec(&image)),
        })
        .await
        .unwrap();
    assert_eq!(again.id, env_id);
    assert_eq!(again.state(), EnvironmentState::Running, "{again:?}");
    assert_eq!(containers_of(&installation).await, 1);

    let filters: HashMap<String, Vec<String>> = HashMap::from([(
        "label".to_string(),
        vec![format!("vibebox.environment={env_id}")],
    )]);
    let listed = docker()
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap();
    let container_id = listed[0].id.clone().unwrap();
    let inspect = docker()
        .inspect_container(&container_id, None::<InspectContainerOptions>)
        .await
        .unwrap();
    let config = inspect.config.unwrap();
    let host = inspect.host_config.unwrap();
    assert_eq!(config.user.as_deref(), Some("1000:1000"));
    assert_eq!(host.cap_drop.unwrap_or_default(), vec!["ALL".to_string()]);
    assert!(host.cap_add.unwrap_or_default().is_empty());
    assert!(
        host.security_opt
            .unwrap_or_default()
            .iter()
            .any(|o| o.starts_with("no-new-privileges")),
    );
    assert_ne!(host.privileged, Some(true));
    assert_eq!(host.nano_cpus, Some(2_000_000_000));
    assert_eq!(host.memory, Some(4096 * 1024 * 1024));
    assert!(host.pids_limit.unwrap_or(0) > 0);
    let network = host.network_mode.unwrap();
    let net = docker()
        .inspect_network(
            &network,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .unwrap();
    assert_eq!(net.internal, Some(true), "environment network is internal");
    assert_eq!(config.labels.unwrap().get("vibebox.team"), Some(&alpha));

    // Exec: output, stderr and exit code.
    let (out, err, code) = exec(
        &p,
        &dev,
        &env_id,
        &["sh", "-c", "id -u; echo oops >&2; exit 3"],
    )
    .await
    .unwrap();
    assert_eq!(out.trim(), "1000");
    assert_eq!(err.trim(), "oops");
    assert_eq!(code, 3);

    // Logs: the image's command prints a greeting.
    let mut logs = p
        .environments(&dev)
        .stream_logs(StreamLogsRequest {
            environment_id: env_id.clone(),
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(20), logs.message())
        .await
        .expect("a log line within 20 s")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first.data).contains("devbox ready"));
    drop(logs);

    // The viewer can see but not act.
    let seen = p
        .environments(&viewer)
        .list_environments(ListEnvironmentsRequest {
            team_id: alpha.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .environments;
    assert!(seen.iter().any(|e| e.id == env_id));
    let denied = exec(&p, &viewer, &env_id, &["id"]).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = p
        .environments(&viewer)
        .delete_environment(DeleteEnvironmentRequest {
            environment_id: env_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);

    // Another team cannot see it, and cannot tell it from a missing one.
    let other = p
        .environments(&outsider)
        .get_environment(GetEnvironmentRequest {
            environment_id: env_id.clone(),
        })
        .await
        .unwrap_err();
    let missing = p
        .environments(&outsider)
        .get_environment(GetEnvironmentRequest {
            environment_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    assert_eq!(
        (other.code(), other.message()),
        (missing.code(), missing.message())
    );
    let theirs = p
        .environments(&outsider)
        .list_environments(ListEnvironmentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .environments;
    assert!(theirs.iter().all(|e| e.id != env_id));

    // The security model's attack scenarios are refused with rule ids and create nothing.
    let attacks: Vec<(ContainerSpec, &str)> = vec![
        (
            ContainerSpec {
                mounts: vec![Mount {
                    r#type: MountType::Bind as i32,
                    source: "/var/run/docker.sock".into(),
                    target: "/var/run/docker.sock".into(),
                    ..Default::default()
                }],
                ..spec(&image)
            },
            "mount.docker_socket",
        ),
        (
            ContainerSpec {
                privileged: true,
                ..spec(&image)
            },
            "privileged",
        ),
        (spec("docker:24-dind"), "image.denied"),
        (spec("ubuntu"), "image.denied"),
    ];
    for (n, (attack, rule)) in attacks.into_iter().enumerate() {
        let refused = p
            .environments(&dev)
            .create_environment(CreateEnvironmentRequest {
                labels: Default::default(),
                request_id: format!("attack-{n}"),
                team_id: alpha.clone(),
                name: format!("attack{n}"),
                spec: Some(attack),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        let rules = violated_rules(&refused);
        assert!(rules.iter().any(|r| r == rule), "{rule} in {rules:?}");
    }
    assert_eq!(
        containers_of(&installation).await,
        1,
        "attacks created nothing"
    );

    // The socket and privileged attempts raised a critical alert, which the
    // gateway's metrics count (followed live from the audit log).
    let alert_series = r#"vibebox_gateway_alerts_total{rule="privileged_or_docker_socket_attempt",severity="critical"}"#;
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = p.scrape_metrics();
        if metrics.contains(alert_series) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(metrics.contains(alert_series), "{metrics}");

    // Stop, start, delete (each settled before the next).
    let stopped = p
        .environments(&dev)
        .stop_settled(&env_id, Some(1))
        .await
        .unwrap();
    assert_eq!(stopped.state(), EnvironmentState::Stopped);
    let started = p.environments(&dev).start_settled(&env_id).await.unwrap();
    assert_eq!(started.state(), EnvironmentState::Running);
    let deleted = p.environments(&dev).delete_settled(&env_id).await.unwrap();
    assert_eq!(deleted.state(), EnvironmentState::Deleted);
    assert_eq!(containers_of(&installation).await, 0, "no container left");
    let nets = std::process::Command::new("docker")
        .args([
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("label=vibebox.installation={installation}"),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&nets.stdout).trim().is_empty(),
        "no network left"
    );
    let vols = std::process::Command::new("docker")
        .args([
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("label=vibebox.installation={installation}"),
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&vols.stdout).trim().is_empty(),
        "no volume left"
    );

    // The audit log holds every step, and the chain verifies.
    let mut seen_actions = Vec::new();
    let mut events = Vec::new();
    for _ in 0..50 {
        events = p
            .audit(&admin)
            .query_events(QueryEventsRequest {
                filter: Some(EventFilter::default()),
                page_size: 500,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        seen_actions = events.iter().map(|e| e.action.clone()).collect();
        let wanted = [
            "environment.create",
            "exec.start",
            "exec.end",
            "policy.deny",
            "environment.stop",
            "environment.start",
            "environment.delete",
            "access.denied",
        ];
        if wanted.iter().all(|w| seen_actions.iter().any(|a| a == w)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for wanted in [
        "environment.create",
        "exec.end",
        "policy.deny",
        "environment.delete",
        "access.denied",
    ] {
        assert!(
            seen_actions.iter().any(|a| a == wanted),
            "{wanted} in {seen_actions:?}"
        );
    }
    // One trace per request across services: the create's policy decision
    // (policy) and its creation (orchestrator) share the trace id, and an
    // exec session's start and end events carry its request's trace id.
    let trace_of = |action: &str| {
        events
            .iter()
            .find(|e| e.action == action && e.resource_id == env_id)
            .map(|e| (e.trace_id.clone(), e.request_id.clone()))
            .unwrap_or_else(|| panic!("{action} of {env_id} in the audit log"))
    };
    let (create_trace, create_request) = trace_of("environment.create");
    assert_eq!(create_trace.len(), 32, "a W3C trace id: {create_trace:?}");
    let cleared = events
        .iter()
        .find(|e| e.action.starts_with("policy.") && e.request_id == create_request)
        .expect("the policy decision of the create, by request id");
    assert_eq!(cleared.source_service, "policy");
    assert_eq!(
        cleared.trace_id, create_trace,
        "policy and orchestrator share the trace"
    );
    let (start_trace, start_request) = trace_of("exec.start");
    let exec_end = events
        .iter()
        .find(|e| e.action == "exec.end" && e.request_id == start_request)
        .expect("exec.end of the same request");
    assert!(!start_trace.is_empty());
    assert_eq!(
        exec_end.trace_id, start_trace,
        "exec.end keeps the session's trace"
    );
    let verified = p
        .audit(&admin)
        .verify_chain(VerifyChainRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    assert!(verified.events_checked > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_up_on_the_same_data_dir_keeps_the_data() {
    let p = Platform::start();
    let admin = p.admin_token();
    let alpha = team(&p, &admin, "keepers").await;

    // Not while the first runs: a second platform on the same databases is
    // refused at once, naming the data directory.
    let mut second = Platform::up_command(p.data_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running a second vibebox up");
    let mut exited = None;
    for _ in 0..600 {
        exited = second.try_wait().unwrap();
        if exited.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(status) = exited else {
        let _ = second.kill();
        let _ = second.wait();
        panic!("a second up on the same data directory kept running");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "a second up ran: {stderr}");
    assert!(
        stderr.contains("is in use by another `vibebox up`"),
        "{stderr}"
    );

    let dir = p.stop();
    let p = Platform::start_in(dir);
    assert_eq!(p.admin_token(), admin, "bootstrap ran once");
    let teams = p
        .identity(&admin)
        .list_teams(vibebox_proto::identity::ListTeamsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .teams;
    assert!(teams.iter().any(|t| t.id == alpha));
}
