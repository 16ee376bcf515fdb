//! End-to-end tests of the orchestrator against the real Docker engine, over
//! real gRPC with mutual TLS (the test client holds the gateway's identity).

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use tonic::Code;
use vibebox_clearance::ClearanceSigner;
use vibebox_orchestrator::testkit::{self, Harness, hardened_spec};
use vibebox_orchestrator::{CrashPoint, store::State};
use vibebox_proto::audit::Severity;
use vibebox_proto::environment as pb;
use vibebox_proto::runtime::runtime_service_client::RuntimeServiceClient;
use vibebox_proto::runtime::*;

use crate::common::settled;

const TEAM: &str = "team-a";

fn create_req(
    h: &Harness,
    spec: &pb::ContainerSpec,
    env: &str,
    request_id: &str,
) -> CreateEnvironmentRequest {
    CreateEnvironmentRequest {
        labels: Default::default(),
        caller: Some(Caller {
            user_id: "user-1".into(),
            ..Default::default()
        }),
        request_id: request_id.into(),
        environment_id: env.into(),
        team_id: TEAM.into(),
        owner_id: "user-1".into(),
        name: "dev".into(),
        spec: Some(spec.clone()),
        clearance: Some(testkit::clearance(
            &h.signer,
            spec,
            env,
            TEAM,
            Duration::from_secs(60),
        )),
        canonical_image: String::new(),
    }
}

/// Creates an environment and waits until it runs.
async fn create(h: &Harness, command: &[&str]) -> pb::Environment {
    let spec = hardened_spec(command);
    let env = uuid::Uuid::new_v4().to_string();
    let created = h
        .client()
        .create_environment(create_req(h, &spec, &env, &env))
        .await
        .expect("create")
        .into_inner()
        .environment
        .expect("environment");
    assert_eq!(created.state(), pb::EnvironmentState::Creating);
    let running = settled(&h.client(), &env).await;
    assert_eq!(
        running.state(),
        pb::EnvironmentState::Running,
        "{running:?}"
    );
    running
}

fn inspect(name: &str) -> serde_json::Value {
    let out = std::process::Command::new("docker")
        .args(["inspect", name])
        .output()
        .expect("docker inspect");
    assert!(out.status.success(), "docker inspect {name} failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v[0].clone()
}

fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleared_spec_runs_hardened_and_create_is_idempotent() {
    let h = Harness::start(|_| {}).await.unwrap();
    let spec = hardened_spec(&["sleep", "3600"]);
    let env_id = uuid::Uuid::new_v4().to_string();
    let req = create_req(&h, &spec, &env_id, "req-1");
    let env = h
        .client()
        .create_environment(req.clone())
        .await
        .unwrap()
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(env.state, pb::EnvironmentState::Creating as i32);
    assert_eq!(env.spec.as_ref(), Some(&spec));
    let env = settled(&h.client(), &env_id).await;
    assert_eq!(env.state, pb::EnvironmentState::Running as i32);

    let c = inspect(&format!("vibebox-{env_id}"));
    let hc = &c["HostConfig"];
    assert_eq!(c["State"]["Running"], true);
    assert_eq!(c["Config"]["User"], "1000:1000");
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    assert!(hc["CapAdd"].is_null() || hc["CapAdd"] == serde_json::json!([]));
    assert_eq!(hc["Privileged"], false);
    assert_eq!(
        hc["SecurityOpt"],
        serde_json::json!(["no-new-privileges:true"])
    );
    assert_eq!(hc["ReadonlyRootfs"], true);
    assert_eq!(hc["NanoCpus"], 250_000_000i64);
    assert_eq!(hc["Memory"], 64 * 1024 * 1024i64);
    assert_eq!(hc["PidsLimit"], 64);
    assert_eq!(hc["Init"], true);
    assert_eq!(hc["RestartPolicy"]["Name"], "unless-stopped");
    assert_eq!(hc["NetworkMode"], format!("vibebox-{env_id}"));
    assert!(c["Config"]["Healthcheck"]["Test"].is_array());
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["vibebox.managed"], "true");
    assert_eq!(labels["vibebox.installation"], h.installation.as_str());
    assert_eq!(labels["vibebox.environment"], env_id.as_str());
    assert_eq!(labels["vibebox.team"], TEAM);
    assert_eq!(labels["vibebox.owner"], "user-1");
    assert_eq!(labels["vibebox.policy-digest"], "sha256:test-policy");
    let mounts: Vec<(String, String)> = hc["Mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["Type"].as_str().unwrap().to_string(),
                m["Target"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(mounts.contains(&("volume".into(), "/workspace".into())));
    assert!(mounts.contains(&("tmpfs".into(), "/tmp".into())));

    let n = inspect(&format!("vibebox-{env_id}"));
    assert_eq!(n["Id"], c["Id"], "container inspect first");
    let net = serde_json::from_str::<serde_json::Value>(&docker(&[
        "network",
        "inspect",
        &format!("vibebox-{env_id}"),
    ]))
    .unwrap()[0]
        .clone();
    assert_eq!(net["Internal"], true);
    assert_eq!(
        net["Options"]["com.docker.network.bridge.enable_icc"],
        "false"
    );
    let subnet = net["IPAM"]["Config"][0]["Subnet"].as_str().unwrap();
    assert!(
        subnet.starts_with("10.213.") && subnet.ends_with("/28"),
        "{subnet}"
    );
    docker(&["volume", "inspect", &format!("vibebox-ws-{env_id}")]);

    // The process really runs as 1000 without capabilities.
    let status = docker(&[
        "exec",
        &format!("vibebox-{env_id}"),
        "sh",
        "-c",
        "id -u; grep CapEff /proc/self/status",
    ]);
    assert!(status.starts_with("1000"), "{status}");
    assert!(status.contains("0000000000000000"), "{status}");

    // A retried create (same request id, even with a fresh clearance)
    // returns the same environment and creates nothing new.
    let again = h
        .client()
        .create_environment(create_req(&h, &spec, &env_id, "req-1"))
        .await
        .unwrap()
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(again.id, env_id);
    let containers = h
        .objects()
        .iter()
        .filter(|o| o.starts_with("container:"))
        .count();
    assert_eq!(containers, 1);

    // Only the gateway may call.
    let err = h
        .client_as("tester")
        .get_environment(GetEnvironmentRequest {
            environment_id: env_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let audit = h.orchestrator.audit().recent();
    assert!(
        audit
            .iter()
            .any(|e| e.action == "environment.create" && e.resource_id == env_id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_clearances_create_nothing() {
    let h = Harness::start(|_| {}).await.unwrap();
    let spec = hardened_spec(&["sleep", "3600"]);
    let mut client = h.client();

    // No clearance.
    let env = uuid::Uuid::new_v4().to_string();
    let mut req = create_req(&h, &spec, &env, "r-none");
    req.clearance = None;
    let err = client.create_environment(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // A clearance for another spec.
    let env = uuid::Uuid::new_v4().to_string();
    let mut req = create_req(&h, &spec, &env, "r-other-spec");
    let mut other = spec.clone();
    other.memory_limit_mb = Some(4096);
    req.spec = Some(other);
    let err = client.create_environment(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // A clearance for another environment.
    let env = uuid::Uuid::new_v4().to_string();
    let mut req = create_req(&h, &spec, &env, "r-other-env");
    req.environment_id = uuid::Uuid::new_v4().to_string();
    let err = client.create_environment(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Expired.
    let env = uuid::Uuid::new_v4().to_string();
    let mut req = create_req(&h, &spec, &env, "r-expired");
    req.clearance = Some(testkit::clearance(
        &h.signer,
        &spec,
        &env,
        TEAM,
        Duration::ZERO,
    ));
    let err = client.create_environment(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Signed by an unknown key.
    let env = uuid::Uuid::new_v4().to_string();
    let mut req = create_req(&h, &spec, &env, "r-unknown-key");
    let stranger = ClearanceSigner::generate();
    req.clearance = Some(testkit::clearance(
        &stranger,
        &spec,
        &env,
        TEAM,
        Duration::from_secs(60),
    ));
    let err = client.create_environment(req).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    assert!(h.objects().is_empty(), "objects: {:?}", h.objects());

    // Replayed: a used clearance under a new request id is refused.
    let env = uuid::Uuid::new_v4().to_string();
    let req = create_req(&h, &spec, &env, "r-first");
    client.create_environment(req.clone()).await.unwrap();
    settled(&client, &env).await;
    let before = h.objects();
    let mut replay = req.clone();
    replay.request_id = "r-replay".into();
    let err = client.create_environment(replay).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(h.objects(), before);

    let rejected = h
        .orchestrator
        .audit()
        .recent()
        .into_iter()
        .filter(|e| e.action == "clearance.rejected" && e.severity == Severity::Critical as i32)
        .count();
    assert_eq!(rejected, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_tty_stdin_and_logs_follow() {
    let h = Harness::start(|_| {}).await.unwrap();
    let env = create(
        &h,
        &[
            "sh",
            "-c",
            "i=0; while true; do echo out$i; echo err$i >&2; i=$((i+1)); sleep 0.2; done",
        ],
    )
    .await;
    let mut client = h.client();

    // TTY exec: output and exit code.
    let start = |command: &[&str], tty: bool, stdin: bool| ExecRequest {
        caller: Some(Caller {
            user_id: "user-1".into(),
            ..Default::default()
        }),
        request: Some(pb::ExecRequest {
            message: Some(pb::exec_request::Message::Start(pb::ExecStart {
                environment_id: env.id.clone(),
                command: command.iter().map(|s| s.to_string()).collect(),
                tty,
                stdin,
                terminal_size: Some(pb::TerminalSize {
                    rows: 40,
                    columns: 100,
                }),
                ..Default::default()
            })),
        }),
    };
    async fn collect(
        client: &mut RuntimeServiceClient<vibebox_server_kit::GrpcChannel>,
        msgs: Vec<ExecRequest>,
    ) -> (Vec<u8>, Vec<u8>, Option<i32>) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        for m in msgs {
            tx.send(m).await.unwrap();
        }
        let mut stream = client
            .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let (mut out, mut err, mut code) = (vec![], vec![], None);
        while let Some(m) = stream.next().await {
            match m.unwrap().response.unwrap().message.unwrap() {
                pb::exec_response::Message::Stdout(b) => out.extend(b),
                pb::exec_response::Message::Stderr(b) => err.extend(b),
                pb::exec_response::Message::Exit(e) => code = Some(e.exit_code),
            }
        }
        drop(tx);
        (out, err, code)
    }
    let (out, _, code) = collect(
        &mut client,
        vec![start(
            &["sh", "-c", "tty; echo hello-tty; exit 3"],
            true,
            false,
        )],
    )
    .await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("hello-tty\r\n"), "{out:?}");
    assert!(out.contains("/dev/pts/"), "a real terminal: {out:?}");
    assert_eq!(code, Some(3));

    // Non-TTY: separate streams.
    let (out, err, code) = collect(
        &mut client,
        vec![start(
            &["sh", "-c", "echo to-out; echo to-err >&2"],
            false,
            false,
        )],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out), "to-out\n");
    assert_eq!(String::from_utf8_lossy(&err), "to-err\n");
    assert_eq!(code, Some(0));

    // Stdin.
    let stdin = |b: &[u8]| ExecRequest {
        caller: None,
        request: Some(pb::ExecRequest {
            message: Some(pb::exec_request::Message::Stdin(b.to_vec())),
        }),
    };
    let close = ExecRequest {
        caller: None,
        request: Some(pb::ExecRequest {
            message: Some(pb::exec_request::Message::CloseStdin(true)),
        }),
    };
    let (out, _, code) = collect(
        &mut client,
        vec![start(&["cat"], false, true), stdin(b"typed input\n"), close],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out), "typed input\n");
    assert_eq!(code, Some(0));

    let audit = h.orchestrator.audit().recent();
    assert_eq!(audit.iter().filter(|e| e.action == "exec.start").count(), 3);
    let ends: Vec<_> = audit.iter().filter(|e| e.action == "exec.end").collect();
    assert_eq!(ends.len(), 3);
    assert_eq!(
        ends[0].details.as_ref().unwrap().fields["exit_code"],
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue("3".into()))
        }
    );

    // Logs: follow sees new lines; stdout and stderr apart; timestamps parsed.
    let mut logs = client
        .stream_logs(StreamLogsRequest {
            request: Some(pb::StreamLogsRequest {
                environment_id: env.id.clone(),
                follow: true,
                tail_lines: Some(0),
                timestamps: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen_out = Vec::new();
    let mut seen_err = 0;
    while seen_out.len() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(20), logs.next())
            .await
            .expect("log line in time")
            .unwrap()
            .unwrap()
            .chunk
            .unwrap();
        assert!(chunk.time.is_some());
        let text = String::from_utf8_lossy(&chunk.data).to_string();
        if chunk.stream == pb::OutputStream::Stdout as i32 {
            assert!(text.starts_with("out"), "{text:?}");
            seen_out.push(text);
        } else {
            assert!(text.starts_with("err"), "{text:?}");
            seen_err += 1;
        }
    }
    assert!(seen_err > 0 || seen_out.len() == 3);
    assert_ne!(seen_out[0], seen_out[2], "follow delivers new output");

    // Stdout only.
    let mut only_out = client
        .stream_logs(StreamLogsRequest {
            request: Some(pb::StreamLogsRequest {
                environment_id: env.id.clone(),
                tail_lines: Some(10),
                include_stdout: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(c) = only_out.next().await {
        assert_eq!(
            c.unwrap().chunk.unwrap().stream,
            pb::OutputStream::Stdout as i32
        );
    }

    // Stats.
    let mut stats = client
        .stream_stats(StreamStatsRequest {
            request: Some(pb::StreamStatsRequest {
                environment_id: env.id.clone(),
                one_shot: true,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let s = stats.next().await.unwrap().unwrap().sample.unwrap();
    assert_eq!(s.memory_limit_bytes, 64 * 1024 * 1024);
    assert!(s.pids >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_and_delete_leaves_nothing() {
    let h = Harness::start(|_| {}).await.unwrap();
    let env = create(&h, &["sleep", "3600"]).await;
    let mut client = h.client();
    let name = format!("vibebox-{}", env.id);

    let stopping = client
        .stop_environment(StopEnvironmentRequest {
            caller: None,
            environment_id: env.id.clone(),
            timeout_seconds: Some(1),
        })
        .await
        .unwrap()
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(stopping.state, pb::EnvironmentState::Stopping as i32);
    let stopped = settled(&client, &env.id).await;
    assert_eq!(stopped.state, pb::EnvironmentState::Stopped as i32);
    assert_eq!(inspect(&name)["State"]["Running"], false);

    let starting = client
        .start_environment(StartEnvironmentRequest {
            caller: None,
            environment_id: env.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(starting.state, pb::EnvironmentState::Starting as i32);
    assert_eq!(
        settled(&client, &env.id).await.state,
        pb::EnvironmentState::Running as i32
    );
    assert_eq!(inspect(&name)["State"]["Running"], true);
    let started_at = inspect(&name)["State"]["StartedAt"].clone();
    let restarting = client
        .restart_environment(RestartEnvironmentRequest {
            caller: None,
            environment_id: env.id.clone(),
            timeout_seconds: Some(1),
        })
        .await
        .unwrap()
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(restarting.state, pb::EnvironmentState::Stopping as i32);
    assert_eq!(
        settled(&client, &env.id).await.state,
        pb::EnvironmentState::Running as i32
    );
    assert_eq!(inspect(&name)["State"]["Running"], true);
    assert_ne!(
        inspect(&name)["State"]["StartedAt"],
        started_at,
        "restarted"
    );

    let other = create(&h, &["sleep", "3600"]).await;
    let page = client
        .list_environments(ListEnvironmentsRequest {
            team_ids: vec![TEAM.into()],
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.environments.len(), 1);
    assert_eq!(page.environments[0].id, other.id, "newest first");
    let page2 = client
        .list_environments(ListEnvironmentsRequest {
            team_ids: vec![TEAM.into()],
            page_size: 1,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.environments[0].id, env.id);
    assert!(page2.next_page_token.is_empty());
    let none = client
        .list_environments(ListEnvironmentsRequest {
            team_ids: vec!["team-b".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.environments.is_empty());

    for id in [&env.id, &other.id] {
        let deleting = client
            .delete_environment(DeleteEnvironmentRequest {
                caller: None,
                environment_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .environment
            .unwrap();
        assert_eq!(deleting.state, pb::EnvironmentState::Deleting as i32);
        assert_eq!(
            settled(&client, id).await.state,
            pb::EnvironmentState::Deleted as i32
        );
    }
    assert!(h.objects().is_empty(), "left behind: {:?}", h.objects());
    let all = client
        .list_environments(ListEnvironmentsRequest {
            show_deleted: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.environments.len(), 2);
    let err = client
        .start_environment(StartEnvironmentRequest {
            caller: None,
            environment_id: env.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = client
        .get_environment(GetEnvironmentRequest {
            environment_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_creates_and_orphans_are_cleaned_by_reconcile() {
    let h = Harness::start(|_| {}).await.unwrap();
    let spec = hardened_spec(&["sleep", "3600"]);
    let mut ids = Vec::new();
    for point in [CrashPoint::AfterNetwork, CrashPoint::AfterContainer] {
        h.orchestrator.set_crash_point(Some(point));
        let env = uuid::Uuid::new_v4().to_string();
        // Accepted: the crash comes in the background, and leaves the
        // record `creating`.
        h.client()
            .create_environment(create_req(&h, &spec, &env, &env))
            .await
            .unwrap();
        h.orchestrator.wait_operation(&env).await;
        assert_eq!(
            h.orchestrator.get(&env).await.unwrap().state,
            State::Creating
        );
        ids.push(env);
    }
    h.orchestrator.set_crash_point(None);
    assert!(!h.objects().is_empty(), "the crash left objects behind");

    // An object with the platform labels and no record at all.
    let ghost = uuid::Uuid::new_v4().to_string();
    docker(&[
        "network",
        "create",
        "--internal",
        "--label",
        "vibebox.managed=true",
        "--label",
        &format!("vibebox.installation={}", h.installation),
        "--label",
        &format!("vibebox.environment={ghost}"),
        &format!("vibebox-ghost-{ghost}"),
    ]);

    // A restarted orchestrator (same database, same installation) reconciles.
    let restarted = Harness::start_with_pki(h.pki.clone(), |c| {
        c.installation_id = Some(h.installation.clone());
        c.database.url = h.config.database.url.clone();
    })
    .await
    .unwrap();
    let report = restarted.orchestrator.reconcile().await.unwrap();
    assert_eq!(report.rolled_back.len(), 2, "{report:?}");
    assert!(
        report.orphans_removed.iter().any(|o| o.contains("ghost")),
        "{report:?}"
    );
    assert!(h.objects().is_empty(), "left behind: {:?}", h.objects());
    for id in &ids {
        let rec = h.orchestrator.get(id).await.unwrap();
        assert_eq!(rec.state, State::Failed);
        assert!(rec.subnet.is_none(), "subnet released");
    }
    let audit = restarted.orchestrator.audit().recent();
    assert!(
        audit
            .iter()
            .any(|e| e.action == "reconcile.orphan_removed" && e.severity == Severity::High as i32)
    );
    // Other installations' objects are never touched.
    let other = uuid::Uuid::new_v4().to_string();
    docker(&[
        "network",
        "create",
        "--internal",
        "--label",
        "vibebox.managed=true",
        "--label",
        &format!("vibebox.installation=test-other-{other}"),
        "--label",
        &format!("vibebox.environment={other}"),
        &format!("vibebox-other-{other}"),
    ]);
    restarted.orchestrator.reconcile().await.unwrap();
    docker(&["network", "rm", &format!("vibebox-other-{other}")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_capacity_guard_refuses_past_the_share() {
    // 64 MiB per environment against a share of host memory below that.
    let h = Harness::start(|c| c.host_memory_share = 0.000_001)
        .await
        .unwrap();
    let spec = hardened_spec(&["sleep", "3600"]);
    let env = uuid::Uuid::new_v4().to_string();
    let err = h
        .client()
        .create_environment(create_req(&h, &spec, &env, &env))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("host capacity"), "{}", err.message());
    assert!(h.objects().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_and_lost_containers_are_caught() {
    let h = Harness::start(|_| {}).await.unwrap();
    let drifted = create(&h, &["sleep", "3600"]).await;
    let impostor_target = create(&h, &["sleep", "3600"]).await;
    let lost = create(&h, &["sleep", "3600"]).await;
    let healthy = create(&h, &["sleep", "3600"]).await;

    // A clean pass changes nothing.
    let report = h.orchestrator.reconcile().await.unwrap();
    assert!(report.quarantined.is_empty(), "{report:?}");

    // Memory raised out of band.
    docker(&[
        "update",
        "--memory",
        "256m",
        "--memory-swap",
        "512m",
        &format!("vibebox-{}", drifted.id),
    ]);
    // A container started out of band with an environment's labels.
    let impostor = docker(&[
        "run",
        "-d",
        "--label",
        "vibebox.managed=true",
        "--label",
        &format!("vibebox.installation={}", h.installation),
        "--label",
        &format!("vibebox.environment={}", impostor_target.id),
        testkit::TEST_IMAGE,
        "sleep",
        "3600",
    ]);
    // A container removed behind the platform's back.
    docker(&["rm", "-f", &format!("vibebox-{}", lost.id)]);

    let report = h.orchestrator.reconcile().await.unwrap();
    let mut q = report.quarantined.clone();
    q.sort();
    let mut want = vec![drifted.id.clone(), impostor_target.id.clone()];
    want.sort();
    assert_eq!(q, want, "{report:?}");
    assert_eq!(report.lost, vec![lost.id.clone()]);

    let rec = h.orchestrator.get(&drifted.id).await.unwrap();
    assert_eq!(rec.state, State::Quarantined);
    assert!(
        rec.failure_reason.contains("memory"),
        "{}",
        rec.failure_reason
    );
    assert_eq!(
        inspect(&format!("vibebox-{}", drifted.id))["State"]["Running"],
        false
    );
    let gone = std::process::Command::new("docker")
        .args(["inspect", &impostor])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "impostor removed");
    assert_eq!(
        h.orchestrator.get(&lost.id).await.unwrap().state,
        State::Failed
    );
    assert_eq!(
        h.orchestrator.get(&healthy.id).await.unwrap().state,
        State::Running
    );
    let audit = h.orchestrator.audit().recent();
    assert_eq!(
        audit
            .iter()
            .filter(|e| e.action == "reconcile.drift" && e.severity == Severity::Critical as i32)
            .count(),
        2
    );
    assert!(audit.iter().any(|e| e.action == "reconcile.lost"));

    // A quarantined environment cannot be started again.
    let err = h
        .client()
        .start_environment(StartEnvironmentRequest {
            caller: None,
            environment_id: drifted.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_quota_holds_under_concurrency() {
    // On every test database (SQLite; PostgreSQL when configured).
    for db in vibebox_db::testing::databases().await {
        quota_under_concurrency(&db.url).await;
    }
}

async fn quota_under_concurrency(database_url: &str) {
    let h = Harness::start(|c| {
        c.team_max_environments = 5;
        c.database.url = Some(database_url.to_owned());
    })
    .await
    .unwrap();
    let spec = hardened_spec(&["sleep", "3600"]);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let env = uuid::Uuid::new_v4().to_string();
        let req = create_req(&h, &spec, &env, &env);
        let mut client = h.client();
        tasks.push(tokio::spawn(async move {
            client.create_environment(req).await.map(|_| ())
        }));
    }
    let mut codes: HashMap<Code, usize> = HashMap::new();
    for t in tasks {
        let code = match t.await.unwrap() {
            Ok(()) => Code::Ok,
            Err(s) => s.code(),
        };
        *codes.entry(code).or_default() += 1;
    }
    assert_eq!(codes.get(&Code::Ok), Some(&5), "{codes:?}");
    assert_eq!(codes.get(&Code::ResourceExhausted), Some(&45), "{codes:?}");
    let admitted = h
        .client()
        .list_environments(ListEnvironmentsRequest {
            team_ids: vec![TEAM.into()],
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .environments;
    assert_eq!(admitted.len(), 5);
    for env in &admitted {
        assert_eq!(
            settled(&h.client(), &env.id).await.state,
            pb::EnvironmentState::Running as i32
        );
    }
    let containers = h
        .objects()
        .into_iter()
        .filter(|o| o.starts_with("container:"))
        .count();
    assert_eq!(containers, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_environments_than_default_address_pools() {
    let h = Harness::start(|c| c.team_max_environments = 100)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..40 {
        let env = create(&h, &["sleep", "3600"]).await;
        assert_eq!(env.state, pb::EnvironmentState::Running as i32);
        ids.push(env.id);
    }
    let networks = h
        .objects()
        .into_iter()
        .filter(|o| o.starts_with("network:"))
        .count();
    assert_eq!(networks, 40);
    let mut client = h.client();
    for id in &ids {
        client
            .delete_environment(DeleteEnvironmentRequest {
                caller: None,
                environment_id: id.clone(),
            })
            .await
            .unwrap();
    }
    for id in &ids {
        settled(&client, id).await;
    }
    assert!(h.objects().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_fails_naming_it() {
    let h = Harness::start(|_| {}).await.unwrap();
    let mut spec = hardened_spec(&["sleep", "3600"]);
    spec.image = "registry.invalid/vibebox/nothing:1".into();
    let env = uuid::Uuid::new_v4().to_string();
    // Accepted (the pull runs in the background), then failed naming it.
    let created = h
        .client()
        .create_environment(create_req(&h, &spec, &env, &env))
        .await
        .unwrap()
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(created.state(), pb::EnvironmentState::Creating);
    let failed = settled(&h.client(), &env).await;
    assert_eq!(failed.state(), pb::EnvironmentState::Failed);
    assert!(
        failed
            .failure_reason
            .contains("registry.invalid/vibebox/nothing:1"),
        "{failed:?}"
    );
    assert_eq!(failed.status_message, "");
    assert!(h.objects().is_empty(), "left behind: {:?}", h.objects());
    let rec = h.orchestrator.get(&env).await.unwrap();
    assert_eq!(rec.state, State::Failed);
    assert_eq!(rec.subnet, None, "released with the failure");
    // Its failure is audited (once, before `failed` was committed).
    let failures: Vec<_> = h
        .orchestrator
        .audit()
        .recent()
        .into_iter()
        .filter(|e| {
            e.action == "environment.create"
                && e.resource_id == env
                && e.outcome == vibebox_proto::audit::Outcome::Failure as i32
        })
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_reconcile_removes_orphans_and_exec_needs_a_running_container() {
    let h = Harness::start(|_| {}).await.unwrap();
    let env = create(&h, &["sleep", "3600"]).await;
    h.client()
        .stop_environment(StopEnvironmentRequest {
            caller: None,
            environment_id: env.id.clone(),
            timeout_seconds: Some(0),
        })
        .await
        .unwrap();
    settled(&h.client(), &env.id).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ExecRequest {
        caller: None,
        request: Some(pb::ExecRequest {
            message: Some(pb::exec_request::Message::Start(pb::ExecStart {
                environment_id: env.id.clone(),
                command: vec!["true".into()],
                ..Default::default()
            })),
        }),
    })
    .await
    .unwrap();
    let err = h
        .client()
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let shutdown = tokio_util::sync::CancellationToken::new();
    let reconciler = vibebox_orchestrator::spawn_reconciler(
        h.orchestrator.clone(),
        Duration::from_secs(1),
        shutdown.clone(),
    );
    let ghost = uuid::Uuid::new_v4().to_string();
    let name = format!("vibebox-ghost-{ghost}");
    docker(&[
        "volume",
        "create",
        "--label",
        &format!("vibebox.installation={}", h.installation),
        "--label",
        &format!("vibebox.environment={ghost}"),
        &name,
    ]);
    let mut removed = false;
    for _ in 0..100 {
        if !h.objects().contains(&format!("volume:{name}")) {
            removed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    reconciler.await.unwrap();
    assert!(removed, "the periodic reconcile removed the orphan volume");
    // The stopped environment stayed stopped and intact.
    let rec = h.orchestrator.get(&env.id).await.unwrap();
    assert_eq!(rec.state, State::Stopped);
    assert_eq!(
        h.objects().iter().filter(|o| o.contains(&env.id)).count(),
        3
    );
}
