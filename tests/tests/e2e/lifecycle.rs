//! Idle stop and lifetimes through the real platform (five processes, real
//! Docker), with a short clock: the policy's idle timeout is a few seconds
//! and the orchestrator sweeps every 500 ms. What a user sees: an idle
//! environment stops itself and says why (its workspace kept), an open exec
//! or a busy CPU keeps one running, a lifetime ends in a delete, an
//! extension pushes the deadlines within the policy's maximum (owner or team
//! admin only) and keeps an environment from idling at most a day ahead even
//! when its lifetime is unbounded, and deadlines that came due while the
//! orchestrator was down are applied once it is back.

use std::time::{Duration, Instant};

use tonic::Code;
use vibebox_proto::audit::{AuditEvent, EventFilter, QueryEventsRequest};
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, Environment, EnvironmentState, ExecRequest, ExecStart,
    ExtendEnvironmentRequest, GetEnvironmentRequest, Lifetime, exec_request, exec_response,
};
use vibebox_proto::identity::TeamRole;
use vibebox_server_kit::status::violated_rules;
use vibebox_tests::cluster::{Cluster, Service};
use vibebox_tests::{Settle, dev_image};

/// Idle after 4 s, deleted after an hour unless extended, never past two.
const POLICY: &str = "[lifetime]\nidle_timeout = \"4s\"\nidle_cpu_percent = 5.0\n\
                      lifetime = \"1h\"\nmax_lifetime = \"2h\"\n";
const IDLE_REASON: &str = "idle for 4s (no exec, port-forward or copy session, CPU below 5%)";
/// Idle after 4 s; no lifetime and no maximum lifetime (the built-in
/// defaults).
const UNBOUNDED_POLICY: &str = "[lifetime]\nidle_timeout = \"4s\"\nidle_cpu_percent = 5.0\n";

async fn cluster(dir: &tempfile::TempDir) -> Cluster {
    cluster_with(dir, POLICY).await
}

async fn cluster_with(dir: &tempfile::TempDir, policy: &str) -> Cluster {
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, policy).expect("policy file");
    Cluster::builder()
        .arg(Service::Policy, format!("--policy-file={}", file.display()))
        .arg(Service::Orchestrator, "--lifecycle-interval=500ms")
        .arg(Service::Orchestrator, "--stop-timeout=1")
        .start()
        .await
}

fn spec(image: &str, command: &[&str]) -> ContainerSpec {
    ContainerSpec {
        image: image.into(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        cpu_limit: Some(0.2),
        ..Default::default()
    }
}

async fn create(
    c: &Cluster,
    token: &str,
    team: &str,
    name: &str,
    spec: ContainerSpec,
) -> Environment {
    // Settled: create returns CREATING, the deadlines count from RUNNING on.
    let env = c
        .environments(token)
        .create_settled(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: format!("lifecycle-{name}"),
            team_id: team.into(),
            name: name.into(),
            spec: Some(spec),
        })
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e:?}"));
    assert_eq!(env.state(), EnvironmentState::Running, "{name}: {env:?}");
    env
}

async fn get(c: &Cluster, token: &str, env: &str) -> Environment {
    c.environments(token)
        .get_environment(GetEnvironmentRequest {
            environment_id: env.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("getting {env}: {e:?}"))
        .into_inner()
        .environment
        .expect("environment")
}

/// Polls an environment until `done` holds (at most `limit`).
async fn wait_for(
    c: &Cluster,
    token: &str,
    env: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&Environment) -> bool,
) -> Environment {
    let deadline = Instant::now() + limit;
    loop {
        let e = get(c, token, env).await;
        if done(&e) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_state(c: &Cluster, token: &str, env: &str, state: EnvironmentState) -> Environment {
    wait_for(
        c,
        token,
        env,
        Duration::from_secs(60),
        state.as_str_name(),
        |e| e.state() == state,
    )
    .await
}

/// The `action` events about `env` (waits until there is one; the outbox
/// delivers asynchronously).
async fn audited(c: &Cluster, action: &str, env: &str) -> Vec<AuditEvent> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let events = c
            .audit(&c.admin_token())
            .query_events(QueryEventsRequest {
                filter: Some(EventFilter {
                    action: action.into(),
                    resource_id: env.into(),
                    ..Default::default()
                }),
                page_size: 100,
                page_token: String::new(),
            })
            .await
            .expect("query events")
            .into_inner()
            .events;
        if !events.is_empty() {
            return events;
        }
        assert!(Instant::now() < deadline, "no {action} event for {env}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn detail(e: &AuditEvent, key: &str) -> String {
    use prost_types::value::Kind;
    match e
        .details
        .as_ref()
        .and_then(|d| d.fields.get(key))
        .and_then(|v| v.kind.clone())
    {
        Some(Kind::StringValue(s)) => s,
        other => panic!("detail {key} of {}: {other:?}", e.action),
    }
}

fn seconds(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map(|t| t.seconds).unwrap_or_default()
}

fn docker_ok(args: &[&str]) -> bool {
    std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("docker")
        .status
        .success()
}

/// An exec left open: `cat` waits on its stdin until it is closed.
struct OpenExec {
    input: tokio::sync::mpsc::Sender<ExecRequest>,
    output: tonic::Streaming<vibebox_proto::environment::ExecResponse>,
}

impl OpenExec {
    async fn start(c: &Cluster, token: &str, env: &str) -> OpenExec {
        let (input, rx) = tokio::sync::mpsc::channel(4);
        input
            .send(ExecRequest {
                message: Some(exec_request::Message::Start(ExecStart {
                    environment_id: env.into(),
                    command: ["sh", "-c", "echo ready; cat"].map(String::from).to_vec(),
                    stdin: true,
                    ..Default::default()
                })),
            })
            .await
            .unwrap();
        let mut output = c
            .environments(token)
            .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("exec")
            .into_inner();
        // Open once the command runs.
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("ready") {
            match output.message().await.expect("exec output") {
                Some(m) => {
                    if let Some(exec_response::Message::Stdout(b)) = m.message {
                        seen.extend(b);
                    }
                }
                None => panic!("the exec ended early"),
            }
        }
        OpenExec { input, output }
    }

    async fn close(mut self) {
        self.input
            .send(ExecRequest {
                message: Some(exec_request::Message::CloseStdin(true)),
            })
            .await
            .unwrap();
        while self.output.message().await.expect("exec output").is_some() {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_environment_stops_itself_says_why_and_an_exec_or_a_busy_cpu_keeps_one_running() {
    let image = dev_image();
    let dir = tempfile::tempdir().expect("temp dir");
    let c = cluster(&dir).await;
    let alpha = c.team("alpha").await;
    let dev = c.user("dev", &alpha, TeamRole::Developer).await;

    // Held by an exec opened at once; busy spinning until told to stop;
    // idle from the start. Created in this order, so the first two are past
    // their idle deadline whenever the third is.
    let held = create(&c, &dev, &alpha, "held", spec(&image, &["sleep", "3600"])).await;
    let exec = OpenExec::start(&c, &dev, &held.id).await;
    let spin = "while [ ! -e /tmp/stop ]; do :; done; exec sleep 3600";
    let busy = create(&c, &dev, &alpha, "busy", spec(&image, &["sh", "-c", spin])).await;
    let idle = create(&c, &dev, &alpha, "idle", spec(&image, &["sleep", "3600"])).await;
    assert!(idle.idle_stop_time.is_some(), "{idle:?}");
    assert!(
        idle.expire_time.is_some(),
        "the policy's lifetime: {idle:?}"
    );

    let stopped = wait_state(&c, &dev, &idle.id, EnvironmentState::Stopped).await;
    assert_eq!(stopped.stop_reason, IDLE_REASON);
    assert!(stopped.idle_stop_time.is_none(), "{stopped:?}");
    assert!(stopped.last_activity_time.is_some());
    let events = audited(&c, "environment.auto_stop", &idle.id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].actor.as_ref().unwrap().service, "orchestrator");
    assert_eq!(detail(&events[0], "reason"), IDLE_REASON);
    let ws = format!("vibebox-ws-{}", idle.id);
    assert!(docker_ok(&["volume", "inspect", &ws]), "workspace kept");
    assert!(docker_ok(&[
        "container",
        "inspect",
        &format!("vibebox-{}", idle.id)
    ]));

    // The other two were judged active after that: their last activity
    // moves past the idle one's stop, and they run.
    let stop_time = seconds(stopped.update_time.as_ref());
    for env in [&held, &busy] {
        let e = wait_for(
            &c,
            &dev,
            &env.id,
            Duration::from_secs(30),
            "still active",
            |e| seconds(e.last_activity_time.as_ref()) > stop_time,
        )
        .await;
        assert_eq!(e.state(), EnvironmentState::Running, "{e:?}");
        assert_eq!(e.stop_reason, "");
    }

    // What kept them: the exec ends, the spinning ends; both go idle.
    exec.close().await;
    let r =
        vibebox_tests::cluster::exec(&mut c.environments(&dev), &busy.id, &["touch", "/tmp/stop"])
            .await
            .expect("exec touch");
    assert_eq!(r.exit_code, 0, "{r:?}");
    for env in [&held, &busy] {
        let e = wait_state(&c, &dev, &env.id, EnvironmentState::Stopped).await;
        assert_eq!(e.stop_reason, IDLE_REASON);
    }

    // Started again by its owner: no reason, and the idle clock starts over.
    let before = chrono::Utc::now().timestamp();
    let started = c
        .environments(&dev)
        .start_settled(&idle.id)
        .await
        .expect("start");
    assert_eq!(started.state(), EnvironmentState::Running);
    assert_eq!(started.stop_reason, "");
    assert!(
        seconds(started.last_activity_time.as_ref()) >= before - 1,
        "{started:?}"
    );
    assert!(
        seconds(started.idle_stop_time.as_ref()) >= before + 3,
        "{started:?}"
    );
}

async fn extend(
    c: &Cluster,
    token: &str,
    env: &str,
    duration: Option<prost_types::Duration>,
) -> Result<Environment, tonic::Status> {
    c.environments(token)
        .extend_environment(ExtendEnvironmentRequest {
            environment_id: env.into(),
            duration,
        })
        .await
        .map(|r| r.into_inner().environment.expect("environment"))
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifetime_ends_in_a_delete_and_extensions_stay_within_the_policy() {
    let image = dev_image();
    let dir = tempfile::tempdir().expect("temp dir");
    let c = cluster(&dir).await;
    let installation = c.installation_id();
    let alpha = c.team("alpha").await;
    let beta = c.team("beta").await;
    let dev = c.user("dev", &alpha, TeamRole::Developer).await;
    let dev2 = c.user("dev2", &alpha, TeamRole::Developer).await;
    let lead = c.user("lead", &alpha, TeamRole::Admin).await;
    let viewer = c.user("viewer", &alpha, TeamRole::Viewer).await;
    let outsider = c.user("outsider", &beta, TeamRole::Admin).await;

    // A request may ask for a shorter lifetime: three seconds.
    let short = ContainerSpec {
        lifetime: Some(Lifetime {
            lifetime_seconds: Some(3),
            ..Default::default()
        }),
        ..spec(&image, &["sleep", "3600"])
    };
    let short = create(&c, &dev, &alpha, "short", short).await;
    assert_eq!(
        seconds(short.expire_time.as_ref()) - seconds(short.create_time.as_ref()),
        3,
        "{short:?}"
    );
    let gone = wait_state(&c, &dev, &short.id, EnvironmentState::Deleted).await;
    assert_eq!(gone.stop_reason, "lifetime of 3s reached");
    let events = audited(&c, "environment.expire", &short.id).await;
    assert_eq!(events[0].actor.as_ref().unwrap().service, "orchestrator");
    assert_eq!(detail(&events[0], "reason"), "lifetime of 3s reached");
    let deletes = audited(&c, "environment.delete", &short.id).await;
    assert_eq!(detail(&deletes[0], "reason"), "lifetime of 3s reached");
    let left: Vec<String> = vibebox_tests::attack::labelled_objects(&installation)
        .into_iter()
        .filter(|o| o.contains(&short.id))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // An hour to live (the policy's), two at most.
    let env = create(&c, &dev, &alpha, "long", spec(&image, &["sleep", "3600"])).await;
    let created = seconds(env.create_time.as_ref());
    assert_eq!(seconds(env.expire_time.as_ref()) - created, 3600);

    // The owner extends by 90 minutes: the expiry and the idle stop move.
    let now = chrono::Utc::now().timestamp();
    let extended = extend(&c, &dev, &env.id, secs(5400)).await.expect("extend");
    let expire = seconds(extended.expire_time.as_ref());
    assert!((expire - (now + 5400)).abs() <= 5, "{extended:?}");
    let idle_stop = seconds(extended.idle_stop_time.as_ref());
    assert!((idle_stop - (now + 5400 + 4)).abs() <= 5, "{extended:?}");
    let events = audited(&c, "environment.extend", &env.id).await;
    assert_eq!(detail(&events[0], "duration"), "1h30m0s");
    assert!(!events[0].actor.as_ref().unwrap().user_id.is_empty());
    // Kept alive: well past the idle timeout it still runs (its deadline
    // is an hour and a half away, as it says).
    assert_eq!(
        get(&c, &dev, &env.id).await.state(),
        EnvironmentState::Running
    );

    // Past the maximum (creation + 2 h): refused, naming the rule and the
    // latest possible time; nothing changes.
    let refused = extend(&c, &dev, &env.id, secs(3 * 3600)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(violated_rules(&refused), ["lifetime.max_lifetime"]);
    let latest = chrono::DateTime::from_timestamp(created + 7200, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert!(refused.message().contains(&latest), "{refused:?}");
    assert_eq!(
        seconds(get(&c, &dev, &env.id).await.expire_time.as_ref()),
        expire
    );

    // Out of range or missing: INVALID_ARGUMENT naming `duration`.
    for bad in [secs(30), secs(8 * 24 * 3600), secs(-60), None] {
        let refused = extend(&c, &dev, &env.id, bad).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{bad:?}: {refused:?}"
        );
        let fields = vibebox_tests::attack::Refusal::of(&refused);
        assert!(fields.names_field("duration"), "{bad:?}: {refused:?}");
    }

    // Owner or team admin only.
    for (who, token) in [
        ("viewer", &viewer),
        ("another developer", &dev2),
        ("another team", &outsider),
    ] {
        let refused = extend(&c, token, &env.id, secs(600)).await.unwrap_err();
        assert!(
            matches!(refused.code(), Code::PermissionDenied),
            "{who}: {refused:?}"
        );
    }
    assert_eq!(
        seconds(get(&c, &dev, &env.id).await.expire_time.as_ref()),
        expire
    );
    extend(&c, &lead, &env.id, secs(600))
        .await
        .expect("the team admin extends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_that_came_due_while_the_orchestrator_was_down_are_applied_after_restart() {
    let image = dev_image();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut c = cluster(&dir).await;
    let alpha = c.team("alpha").await;
    let dev = c.user("dev", &alpha, TeamRole::Developer).await;
    let expiring = ContainerSpec {
        lifetime: Some(Lifetime {
            lifetime_seconds: Some(5),
            ..Default::default()
        }),
        ..spec(&image, &["sleep", "3600"])
    };
    let expiring = create(&c, &dev, &alpha, "expiring", expiring).await;
    let idle = create(&c, &dev, &alpha, "idle", spec(&image, &["sleep", "3600"])).await;
    c.kill(Service::Orchestrator);
    // Down past both deadlines (no condition to poll: time has to pass).
    let due = seconds(expiring.expire_time.as_ref()).max(seconds(idle.idle_stop_time.as_ref()));
    while chrono::Utc::now().timestamp() <= due + 1 {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        docker_ok(&["container", "inspect", &format!("vibebox-{}", expiring.id)]),
        "nothing acted while the orchestrator was down"
    );
    c.restart(Service::Orchestrator).await;

    let gone = wait_state(&c, &dev, &expiring.id, EnvironmentState::Deleted).await;
    assert_eq!(gone.stop_reason, "lifetime of 5s reached");
    audited(&c, "environment.expire", &expiring.id).await;
    let stopped = wait_state(&c, &dev, &idle.id, EnvironmentState::Stopped).await;
    assert_eq!(stopped.stop_reason, IDLE_REASON);
    audited(&c, "environment.auto_stop", &idle.id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_keeps_an_environment_from_idling_at_most_a_day_ahead() {
    const DAY: i64 = 24 * 3600;
    let image = dev_image();
    let dir = tempfile::tempdir().expect("temp dir");
    let c = cluster_with(&dir, UNBOUNDED_POLICY).await;
    let alpha = c.team("alpha").await;
    let dev = c.user("dev", &alpha, TeamRole::Developer).await;
    let env = create(
        &c,
        &dev,
        &alpha,
        "unbounded",
        spec(&image, &["sleep", "3600"]),
    )
    .await;
    assert!(env.expire_time.is_none(), "no lifetime: {env:?}");

    // The longest extension, a week: granted, but the environment is kept
    // from idling a day ahead only (then the idle timeout), not a week; the
    // answer says so, and the audit record says it was capped.
    let now = chrono::Utc::now().timestamp();
    let extended = extend(&c, &dev, &env.id, secs(7 * DAY))
        .await
        .expect("extend by a week");
    let idle_stop = seconds(extended.idle_stop_time.as_ref());
    assert!(
        (idle_stop - (now + DAY + 4)).abs() <= 5,
        "a day, then the idle timeout: {extended:?}"
    );
    assert!(extended.expire_time.is_none(), "{extended:?}");
    let events = audited(&c, "environment.extend", &env.id).await;
    assert_eq!(detail(&events[0], "duration"), "168h0m0s");
    assert_eq!(detail(&events[0], "keep_alive_capped"), "24h0m0s");
    assert_eq!(detail(&events[0], "expire_time"), "never");
    let shown = get(&c, &dev, &env.id).await;
    assert_eq!(shown.state(), EnvironmentState::Running);
    assert_eq!(shown.idle_stop_time, extended.idle_stop_time, "as applied");

    // Asking again does not push it further than a day from now.
    let again = extend(&c, &dev, &env.id, secs(7 * DAY))
        .await
        .expect("again");
    assert!(seconds(again.idle_stop_time.as_ref()) <= chrono::Utc::now().timestamp() + DAY + 4 + 1);
}
