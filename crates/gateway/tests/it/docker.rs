//! A real environment through the gateway: create (policy clearance, exact
//! hardened spec to the orchestrator), idempotent retry, exec, logs and
//! stats streamed through the proxy, delete. Uses the local Docker engine
//! and cleans up exactly the objects of its own installation id.

use crate::common;

use std::time::{Duration, Instant};

use common::{Platform, bearer};
use futures::StreamExt;
use vibebox_orchestrator::testkit::{TEST_IMAGE, TEST_LABEL, ensure_test_image, remove_labelled};
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, DeleteEnvironmentRequest, EnvironmentState,
    ExecRequest, ExecStart, GetEnvironmentRequest, StartEnvironmentRequest, StopEnvironmentRequest,
    StreamLogsRequest, StreamStatsRequest, exec_request, exec_response,
};
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::identity::{AddTeamMemberRequest, CreateTeamRequest, TeamRole, WhoAmIRequest};

/// Removes this test's Docker objects even when it fails.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_labelled(&self.0);
    }
}

/// Identity, policy and an orchestrator on the local engine under a fresh
/// installation id. Bind the guard first: it drops last, after the
/// platform, and removes the installation's Docker objects.
async fn docker_platform(
    subnet_pool: &str,
    adjust: impl FnOnce(&mut vibebox_orchestrator::Config),
) -> (Cleanup, Platform) {
    ensure_test_image().expect("test image");
    let installation = format!("gateway-test-{}", uuid::Uuid::new_v4());
    let cleanup = Cleanup(installation.clone());
    let platform = Platform::start()
        .await
        .with_policy()
        .await
        .with_orchestrator_config(|c| {
            c.installation_id = Some(installation);
            c.docker_labels = vec![format!("{TEST_LABEL}=gateway")];
            c.subnet_pool = subnet_pool.into();
            adjust(c);
        })
        .await;
    (cleanup, platform)
}

/// A new team with the admin as a developer in it: (team id, admin's user id).
async fn developer_team(
    channel: tonic::transport::Channel,
    admin: &str,
    name: &str,
) -> (String, String) {
    let mut identity = IdentityServiceClient::new(channel);
    let team_id = identity
        .create_team(bearer(
            CreateTeamRequest {
                request_id: Default::default(),
                name: name.into(),
                display_name: format!("{name} (gateway test)"),
            },
            admin,
        ))
        .await
        .expect("create team")
        .into_inner()
        .team
        .unwrap()
        .id;
    let me = identity
        .who_am_i(bearer(WhoAmIRequest {}, admin))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    identity
        .add_team_member(bearer(
            AddTeamMemberRequest {
                team_id: team_id.clone(),
                user_id: me.id.clone(),
                role: TeamRole::Developer as i32,
            },
            admin,
        ))
        .await
        .map(drop)
        .or_else(|s| {
            // The team's creator may already be a member.
            (s.code() == tonic::Code::AlreadyExists)
                .then_some(())
                .ok_or(s)
        })
        .expect("join team");
    (team_id, me.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_exec_logs_stats_delete_through_the_gateway() {
    let (_cleanup, platform) = docker_platform("10.214.0.0/16", |_| {}).await;
    let gateway = platform.gateway(|_| {}).await;
    let channel = gateway.channel().await;
    let admin = platform.admin_token.clone();

    let (team_id, me) = developer_team(channel.clone(), &admin, "gw-docker").await;

    let mut environments = EnvironmentServiceClient::new(channel.clone());
    let request = CreateEnvironmentRequest {
        labels: Default::default(),
        request_id: format!("create-{}", uuid::Uuid::new_v4()),
        team_id: team_id.clone(),
        name: "proxied".into(),
        spec: Some(ContainerSpec {
            image: TEST_IMAGE.into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo started; exec sleep 3600".into(),
            ],
            memory_limit_mb: Some(64),
            cpu_limit: Some(0.5),
            ..Default::default()
        }),
    };
    let created = environments
        .create_environment(bearer(request.clone(), &admin))
        .await
        .expect("create through the gateway")
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(created.team_id, team_id);
    assert_eq!(created.owner_id, me);
    // The hardened spec was applied (policy filled in the platform user).
    let applied = created.spec.clone().unwrap();
    assert!(applied.user.is_some(), "{applied:?}");
    // Retrying with the same request id returns the same environment.
    let again = environments
        .create_environment(bearer(request, &admin))
        .await
        .expect("idempotent retry")
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(again.id, created.id);

    // Create answers CREATING (or, before it became a long operation,
    // RUNNING); settled, the environment runs.
    let settled = common::settle(&mut environments, &admin, &created.id).await;
    assert_eq!(
        settled.state,
        EnvironmentState::Running as i32,
        "environment did not run: {} ({settled:?})",
        settled.failure_reason
    );

    // Exec: stdout, stderr and the exit code come back through the proxy.
    let start = ExecRequest {
        message: Some(exec_request::Message::Start(ExecStart {
            environment_id: created.id.clone(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo hello-through-gateway; echo oops >&2; exit 3".into(),
            ],
            ..Default::default()
        })),
    };
    let mut responses = environments
        .exec(bearer(futures::stream::iter([start]), &admin))
        .await
        .expect("exec")
        .into_inner();
    let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), None);
    while let Some(message) = responses.message().await.expect("exec stream") {
        match message.message {
            Some(exec_response::Message::Stdout(b)) => stdout.extend(b),
            Some(exec_response::Message::Stderr(b)) => stderr.extend(b),
            Some(exec_response::Message::Exit(e)) => exit = Some(e.exit_code),
            None => {}
        }
    }
    assert!(
        String::from_utf8_lossy(&stdout).contains("hello-through-gateway"),
        "{stdout:?}"
    );
    assert!(
        String::from_utf8_lossy(&stderr).contains("oops"),
        "{stderr:?}"
    );
    assert_eq!(exit, Some(3));

    // Logs (not following) end by themselves and hold the container output.
    let logs = environments
        .stream_logs(bearer(
            StreamLogsRequest {
                environment_id: created.id.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("logs")
        .into_inner()
        .collect::<Vec<_>>()
        .await;
    let text: Vec<u8> = logs
        .into_iter()
        .flat_map(|chunk| chunk.expect("log chunk").data)
        .collect();
    assert!(
        String::from_utf8_lossy(&text).contains("started"),
        "{text:?}"
    );

    // A follower that goes away ends the proxied stream (and, with it, the
    // upstream one): the active-stream gauge returns to zero.
    let mut follow = environments
        .stream_logs(bearer(
            StreamLogsRequest {
                environment_id: created.id.clone(),
                follow: true,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("follow logs")
        .into_inner();
    let first = follow
        .message()
        .await
        .expect("first chunk")
        .expect("a chunk");
    assert!(!first.data.is_empty());
    let gauge = r#"vibebox_gateway_active_streams{method="EnvironmentService/StreamLogs"}"#;
    assert!(gateway.scrape().await.contains(&format!("{gauge} 1")));
    drop(follow);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gateway.scrape().await.contains(&format!("{gauge} 0")) {
        assert!(Instant::now() < deadline, "the follow stream was not ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Stats: one sample.
    let samples = environments
        .stream_stats(bearer(
            StreamStatsRequest {
                environment_id: created.id.clone(),
                one_shot: true,
            },
            &admin,
        ))
        .await
        .expect("stats")
        .into_inner()
        .collect::<Vec<_>>()
        .await;
    assert!(!samples.is_empty());
    assert!(samples[0].as_ref().expect("sample").memory_limit_bytes > 0);

    let deleted = environments
        .delete_environment(bearer(
            DeleteEnvironmentRequest {
                environment_id: created.id.clone(),
            },
            &admin,
        ))
        .await
        .expect("delete")
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(deleted.id, created.id);
    let deleted = common::settle(&mut environments, &admin, &created.id).await;
    assert_eq!(
        deleted.state,
        EnvironmentState::Deleted as i32,
        "{deleted:?}"
    );
    let metrics = gateway.scrape().await;
    assert!(
        metrics.contains(
            r#"vibebox_gateway_requests_total{method="EnvironmentService/Exec",code="OK"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"vibebox_gateway_active_streams{method="EnvironmentService/Exec"} 0"#),
        "{metrics}"
    );
}

/// `vibebox_gateway_replica_reads_total{result="hit"}` (0 when absent).
async fn replica_hits(gateway: &common::Gateway) -> u64 {
    let metrics = gateway.scrape().await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"vibebox_gateway_replica_reads_total{result="hit"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Environment reads are answered from the gateway's replica of the
/// orchestrator's feed: a change made through the gateway is read back at
/// once (the replica waits for the feed position the change reported), and
/// a change the orchestrator makes on its own (reconcile finding the
/// container gone) reaches the replica, which then answers with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_reads_follow_the_orchestrator_feed() {
    let (_cleanup, platform) = docker_platform("10.215.0.0/16", |c| {
        c.reconcile_interval = 1;
        // A slow feed: a read right after a change must not be answered
        // by a replica that has not seen the change yet.
        c.feed_delay = Duration::from_millis(300);
    })
    .await;
    let gateway = platform.gateway(|_| {}).await;
    let channel = gateway.channel().await;
    let admin = platform.admin_token.clone();
    let (team_id, _) = developer_team(channel.clone(), &admin, "gw-replica").await;
    let mut environments = EnvironmentServiceClient::new(channel.clone());
    let reader = environments.clone();
    let get = |id: String| {
        let mut environments = reader.clone();
        let admin = admin.clone();
        async move {
            environments
                .get_environment(bearer(GetEnvironmentRequest { environment_id: id }, &admin))
                .await
                .expect("get")
                .into_inner()
                .environment
                .unwrap()
        }
    };

    let created = environments
        .create_environment(bearer(
            CreateEnvironmentRequest {
                labels: Default::default(),
                request_id: format!("create-{}", uuid::Uuid::new_v4()),
                team_id,
                name: "replicated".into(),
                spec: Some(ContainerSpec {
                    image: TEST_IMAGE.into(),
                    command: vec!["sleep".into(), "3600".into()],
                    ..Default::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("create")
        .into_inner()
        .environment
        .unwrap();
    let id = created.id.clone();
    let settled = common::settle(&mut environments, &admin, &id).await;
    assert_eq!(
        settled.state,
        EnvironmentState::Running as i32,
        "{settled:?}"
    );

    // Read-your-writes: the very next read is never older than what a
    // change answered. Stop and start are long operations: they answer
    // STOPPING / STARTING (or, done already, STOPPED / RUNNING), and a read
    // right after shows that state or the one it settles in, never the one
    // before the change.
    let (stopping, stopped, starting, running) = (
        EnvironmentState::Stopping as i32,
        EnvironmentState::Stopped as i32,
        EnvironmentState::Starting as i32,
        EnvironmentState::Running as i32,
    );
    let not_older = |answered: i32, read: i32, transitional: i32, settled: i32| {
        if answered == transitional {
            read == transitional || read == settled
        } else {
            read == settled
        }
    };
    for _ in 0..3 {
        let answered = environments
            .stop_environment(bearer(
                StopEnvironmentRequest {
                    environment_id: id.clone(),
                    timeout_seconds: Some(0),
                },
                &admin,
            ))
            .await
            .expect("stop")
            .into_inner()
            .environment
            .unwrap();
        assert!(
            answered.state == stopping || answered.state == stopped,
            "{answered:?}"
        );
        let read = get(id.clone()).await;
        assert!(
            not_older(answered.state, read.state, stopping, stopped),
            "answered {answered:?}, then read {read:?}"
        );
        let settled = common::settle(&mut environments, &admin, &id).await;
        assert_eq!(settled.state, stopped, "{settled:?}");
        assert_eq!(get(id.clone()).await.state, stopped);

        let answered = environments
            .start_environment(bearer(
                StartEnvironmentRequest {
                    environment_id: id.clone(),
                },
                &admin,
            ))
            .await
            .expect("start")
            .into_inner()
            .environment
            .unwrap();
        assert!(
            answered.state == starting || answered.state == running,
            "{answered:?}"
        );
        let read = get(id.clone()).await;
        assert!(
            not_older(answered.state, read.state, starting, running),
            "answered {answered:?}, then read {read:?}"
        );
        let settled = common::settle(&mut environments, &admin, &id).await;
        assert_eq!(settled.state, running, "{settled:?}");
        assert_eq!(get(id.clone()).await.state, running);
    }

    // Once the feed has caught up, reads are answered by the replica.
    let before = replica_hits(&gateway).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let environment = get(id.clone()).await;
        assert_eq!(environment.state, EnvironmentState::Running as i32);
        if replica_hits(&gateway).await > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no read was served by the replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Behind the gateway's back: the container disappears; reconcile marks
    // the environment failed, and the replica learns it from the feed.
    let removed = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "docker ps -aq --filter label=vibebox.environment={id} | xargs -r docker rm -f"
        ))
        .status()
        .expect("docker rm");
    assert!(removed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let environment = get(id.clone()).await;
        if environment.state == EnvironmentState::Failed as i32 {
            break environment;
        }
        assert!(
            Instant::now() < deadline,
            "the vanished container never showed: {environment:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        failed.failure_reason.contains("vanished"),
        "{}",
        failed.failure_reason
    );
    let before = replica_hits(&gateway).await;
    assert_eq!(get(id.clone()).await.state, EnvironmentState::Failed as i32);
    assert!(
        replica_hits(&gateway).await > before,
        "the failed state was not served by the replica"
    );
    let metrics = gateway.scrape().await;
    assert!(
        metrics.contains("vibebox_gateway_replica_synced 1"),
        "{metrics}"
    );
}
