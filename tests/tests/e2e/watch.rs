//! `WatchEnvironments` and `WaitEnvironment` through the real gateway (five
//! processes, real Docker), issue #20 items 1 and 2:
//!
//! - a watch lists a caller's environments, says `caught_up`, then streams
//!   every change of them in order (CREATING ... RUNNING, STOPPING ...
//!   STOPPED, DELETING ... DELETED), and nothing of another team;
//! - a client that disconnects, lets changes happen while the gateway
//!   restarts, and resumes with its last token gets every change it missed
//!   before `caught_up`; an orchestrator restart ends a watch UNAVAILABLE
//!   and its last token resumes it;
//! - garbage tokens are INVALID_ARGUMENT, tokens older than the retention
//!   FAILED_PRECONDITION `watch.resume_token_expired`; another team cannot
//!   be watched; watches and waits count against the per-user stream share;
//!   withdrawn rights end them;
//! - a create slower than the gateway's 30 s deadline (a Docker socket
//!   proxy the test owns holds the container create back) returns CREATING
//!   at once, a short wait answers CREATING promptly, and a long wait
//!   answers RUNNING once the engine is done.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, DeleteEnvironmentRequest, Environment,
    EnvironmentState, StartEnvironmentRequest, StopEnvironmentRequest, WaitEnvironmentRequest,
    WatchEnvironmentsRequest, WatchEnvironmentsResponse,
};
use vibebox_proto::identity::{
    RemoveTeamMemberRequest, SetUserDisabledRequest, TeamRole, WhoAmIRequest,
};
use vibebox_tests::cluster::{Cluster, Service};
use vibebox_tests::dev_image;

/// How long a test waits for one expected message.
const PATIENCE: Duration = Duration::from_secs(120);

fn spec(image: &str) -> ContainerSpec {
    ContainerSpec {
        image: image.into(),
        command: vec!["sleep".into(), "3600".into()],
        cpu_limit: Some(0.2),
        ..Default::default()
    }
}

fn state_of(env: &Environment) -> EnvironmentState {
    env.state()
}

async fn user_id(c: &Cluster, token: &str) -> String {
    c.identity(token)
        .who_am_i(WhoAmIRequest {})
        .await
        .expect("whoami")
        .into_inner()
        .user
        .expect("user")
        .id
}

/// Creates an environment; the answer (CREATING: the operation goes on).
async fn create(c: &Cluster, token: &str, team: &str, name: &str, image: &str) -> Environment {
    let env = c
        .environments(token)
        .create_environment(CreateEnvironmentRequest {
            request_id: format!("watch-{name}"),
            team_id: team.into(),
            name: name.into(),
            spec: Some(spec(image)),
            labels: Default::default(),
        })
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e:?}"))
        .into_inner()
        .environment
        .expect("environment");
    assert_eq!(
        state_of(&env),
        EnvironmentState::Creating,
        "a create answers at once, with the operation in progress: {env:?}"
    );
    env
}

/// `WaitEnvironment` with `timeout`.
async fn wait(
    c: &Cluster,
    token: &str,
    id: &str,
    timeout: Duration,
) -> Result<Environment, Status> {
    c.environments(token)
        .wait_environment(WaitEnvironmentRequest {
            environment_id: id.into(),
            timeout: Some(prost_types::Duration {
                seconds: timeout.as_secs() as i64,
                nanos: timeout.subsec_nanos() as i32,
            }),
        })
        .await
        .map(|r| r.into_inner().environment.expect("environment"))
}

/// Waits until `id` settles in `state` (through `WaitEnvironment`).
async fn settled(c: &Cluster, token: &str, id: &str, state: EnvironmentState) -> Environment {
    let env = wait(c, token, id, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("waiting for {id}: {e:?}"));
    assert_eq!(state_of(&env), state, "{id} settled as {env:?}");
    env
}

/// One open watch and what it received.
struct Watch {
    stream: Streaming<WatchEnvironmentsResponse>,
    /// The token of the last message received.
    token: String,
    /// Every environment message received, in order.
    seen: Vec<Environment>,
}

impl Watch {
    async fn open(c: &Cluster, token: &str, team: &str, resume: &str) -> Result<Watch, Status> {
        let stream = c
            .environments(token)
            .watch_environments(WatchEnvironmentsRequest {
                team_id: team.into(),
                resume_token: resume.into(),
            })
            .await?
            .into_inner();
        Ok(Watch {
            stream,
            token: resume.to_owned(),
            seen: Vec::new(),
        })
    }

    /// Opens a watch, trying again while the gateway's replica is not in
    /// sync yet (right after a restart).
    async fn open_when_ready(c: &Cluster, token: &str, team: &str, resume: &str) -> Watch {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match Watch::open(c, token, team, resume).await {
                Ok(watch) => return watch,
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => panic!("opening a watch: {s:?}"),
            }
        }
    }

    /// The next message (an error ends the watch).
    async fn next(&mut self) -> Result<WatchEnvironmentsResponse, Status> {
        let message = tokio::time::timeout(PATIENCE, self.stream.message())
            .await
            .expect("a watch message within the patience")?
            .expect("the watch went on");
        assert!(
            !message.resume_token.is_empty(),
            "every message carries a resume token: {message:?}"
        );
        self.token.clone_from(&message.resume_token);
        if let Some(env) = &message.environment {
            self.seen.push(env.clone());
        }
        Ok(message)
    }

    /// The environments received up to `caught_up`.
    async fn until_caught_up(&mut self) -> Vec<Environment> {
        let mut listed = Vec::new();
        loop {
            let message = self.next().await.expect("watch message");
            if message.caught_up {
                assert!(message.environment.is_none(), "{message:?}");
                return listed;
            }
            listed.extend(message.environment);
        }
    }

    /// Reads until environment `id` is seen in `state`.
    async fn until(&mut self, id: &str, state: EnvironmentState) {
        loop {
            let message = self.next().await.expect("watch message");
            if let Some(env) = message.environment
                && env.id == id
                && state_of(&env) == state
            {
                return;
            }
        }
    }

    /// The states `id` was seen in, in order.
    fn states_of(&self, id: &str) -> Vec<EnvironmentState> {
        self.seen
            .iter()
            .filter(|e| e.id == id)
            .map(state_of)
            .collect()
    }

    /// The teams of every environment received.
    fn teams(&self) -> Vec<String> {
        let mut teams: Vec<String> = self.seen.iter().map(|e| e.team_id.clone()).collect();
        teams.sort();
        teams.dedup();
        teams
    }

    /// Reads until the watch ends; its status (panics on a plain end).
    async fn ended(&mut self) -> Status {
        loop {
            if let Err(status) = self.next().await {
                return status;
            }
        }
    }
}

/// The states a whole life passes through, in order.
const LIFE: [EnvironmentState; 6] = [
    EnvironmentState::Creating,
    EnvironmentState::Running,
    EnvironmentState::Stopping,
    EnvironmentState::Stopped,
    EnvironmentState::Deleting,
    EnvironmentState::Deleted,
];

/// Asserts `states` follow [`LIFE`] in order (each may repeat: every
/// progress step is a change) and pass through every one of them.
fn assert_whole_life(what: &str, states: &[EnvironmentState]) {
    let ranks: Vec<usize> = states
        .iter()
        .map(|s| {
            LIFE.iter()
                .position(|l| l == s)
                .unwrap_or_else(|| panic!("{what}: unexpected state {s:?} in {states:?}"))
        })
        .collect();
    assert!(
        ranks.windows(2).all(|w| w[0] <= w[1]),
        "{what}: states out of order: {states:?}"
    );
    for state in LIFE {
        assert!(
            states.contains(&state),
            "{what}: never {state:?}: {states:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_every_change_in_order_and_resumes_across_restarts() {
    let image = dev_image();
    let mut c = Cluster::start().await;
    let team_a = c.team("watch-a").await;
    let team_b = c.team("watch-b").await;
    let alice = c.user("watch-alice", &team_a, TeamRole::Developer).await;
    let bob = c.user("watch-bob", &team_b, TeamRole::Developer).await;

    // One environment in each team before anyone watches.
    let a0 = create(&c, &alice, &team_a, "a0", &image).await.id;
    let b0 = create(&c, &bob, &team_b, "b0", &image).await.id;
    settled(&c, &alice, &a0, EnvironmentState::Running).await;
    settled(&c, &bob, &b0, EnvironmentState::Running).await;

    // (a) The listing: alice's environments only, then caught_up.
    let mut watch = Watch::open_when_ready(&c, &alice, "", "").await;
    let listed = watch.until_caught_up().await;
    let listed: Vec<(&str, EnvironmentState)> = listed
        .iter()
        .map(|e| (e.id.as_str(), state_of(e)))
        .collect();
    assert_eq!(listed, [(a0.as_str(), EnvironmentState::Running)]);

    // A whole life of a1 while bob creates b1 in his team.
    let a1 = create(&c, &alice, &team_a, "a1", &image).await.id;
    let b1 = create(&c, &bob, &team_b, "b1", &image).await.id;
    watch.until(&a1, EnvironmentState::Running).await;
    c.environments(&alice)
        .stop_environment(StopEnvironmentRequest {
            environment_id: a1.clone(),
            timeout_seconds: Some(1),
        })
        .await
        .expect("stop a1");
    watch.until(&a1, EnvironmentState::Stopped).await;
    c.environments(&alice)
        .delete_environment(DeleteEnvironmentRequest {
            environment_id: a1.clone(),
        })
        .await
        .expect("delete a1");
    watch.until(&a1, EnvironmentState::Deleted).await;
    assert_whole_life("a1 on the watch", &watch.states_of(&a1));
    // (d) Bob's environments never reached alice.
    settled(&c, &bob, &b1, EnvironmentState::Running).await;
    assert_eq!(watch.teams(), [team_a.as_str()], "{:?}", watch.seen);

    // (b) Disconnect, change things, restart the gateway meanwhile, resume.
    let token = watch.token.clone();
    drop(watch);
    let a2 = create(&c, &alice, &team_a, "a2", &image).await.id;
    let stopping = c
        .environments(&alice)
        .stop_environment(StopEnvironmentRequest {
            environment_id: a0.clone(),
            timeout_seconds: Some(1),
        })
        .await
        .expect("stop a0")
        .into_inner()
        .environment
        .expect("environment");
    assert_eq!(state_of(&stopping), EnvironmentState::Stopping);
    c.terminate(Service::Gateway);
    // The orchestrator finishes both operations while no gateway runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.restart(Service::Gateway).await;
    settled(&c, &alice, &a2, EnvironmentState::Running).await;
    settled(&c, &alice, &a0, EnvironmentState::Stopped).await;
    let mut watch = Watch::open_when_ready(&c, &alice, "", &token).await;
    let replayed = watch.until_caught_up().await;
    let last_state = |id: &str| replayed.iter().rev().find(|e| e.id == id).map(state_of);
    assert_eq!(
        last_state(&a2),
        Some(EnvironmentState::Running),
        "a2's create is replayed: {replayed:?}"
    );
    assert_eq!(
        last_state(&a0),
        Some(EnvironmentState::Stopped),
        "a0's stop is replayed: {replayed:?}"
    );
    // Live again after the replay: a2's delete.
    c.environments(&alice)
        .delete_environment(DeleteEnvironmentRequest {
            environment_id: a2.clone(),
        })
        .await
        .expect("delete a2");
    watch.until(&a2, EnvironmentState::Deleted).await;
    let after: Vec<EnvironmentState> = watch
        .states_of(&a2)
        .into_iter()
        .skip_while(|s| *s != EnvironmentState::Deleting && *s != EnvironmentState::Deleted)
        .collect();
    assert_eq!(
        after.last(),
        Some(&EnvironmentState::Deleted),
        "a2's delete arrives live: {after:?}"
    );
    assert_eq!(watch.teams(), [team_a.as_str()], "{:?}", watch.seen);

    // An orchestrator restart interrupts the feed: the watch ends
    // UNAVAILABLE and says to resume, and its last token does.
    c.terminate(Service::Orchestrator);
    let status = watch.ended().await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.get_details_error_info().map(|i| i.reason),
        Some("watch.feed_interrupted".to_owned()),
        "{status:?}"
    );
    let token = watch.token.clone();
    c.restart(Service::Orchestrator).await;
    let start = async {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match c
                .environments(&alice)
                .start_environment(StartEnvironmentRequest {
                    environment_id: a0.clone(),
                })
                .await
            {
                Ok(_) => return,
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => panic!("starting a0: {s:?}"),
            }
        }
    };
    start.await;
    settled(&c, &alice, &a0, EnvironmentState::Running).await;
    let mut watch = Watch::open_when_ready(&c, &alice, "", &token).await;
    let replayed = watch.until_caught_up().await;
    assert_eq!(
        replayed.iter().rev().find(|e| e.id == a0).map(state_of),
        Some(EnvironmentState::Running),
        "a0's start after the orchestrator restart is replayed: {replayed:?}"
    );
    assert_eq!(watch.teams(), [team_a.as_str()], "{:?}", watch.seen);
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn field_of(status: &Status) -> Option<String> {
    status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_tokens_rights_and_shares_are_enforced() {
    let c = Cluster::builder()
        .arg(Service::Gateway, "--watch-resume-retention-ms=5000")
        .arg(Service::Gateway, "--user-max-streams=2")
        .start()
        .await;
    let admin = c.admin_token();
    let team_a = c.team("tokens-a").await;
    let team_b = c.team("tokens-b").await;
    let alice = c.user("tokens-alice", &team_a, TeamRole::Developer).await;

    // (c) Garbage is INVALID_ARGUMENT on resume_token.
    let now_ms = chrono::Utc::now().timestamp_millis();
    for garbage in [
        "garbage!".to_owned(),
        "djE6".to_owned(),
        b64("v2:1"),
        b64("v1:12ab"),
        b64("v1:-1"),
        b64(&format!("v1:{}", now_ms + 86_400_000)),
    ] {
        let status = Watch::open(&c, &alice, "", &garbage)
            .await
            .err()
            .unwrap_or_else(|| panic!("{garbage:?} was accepted"));
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{garbage:?}: {status:?}"
        );
        assert_eq!(field_of(&status).as_deref(), Some("resume_token"));
    }

    // A token of a watch resumes within the retention, not after it.
    let mut watch = Watch::open_when_ready(&c, &alice, "", "").await;
    assert!(watch.until_caught_up().await.is_empty());
    let token = watch.token.clone();
    drop(watch);
    let mut resumed = Watch::open(&c, &alice, "", &token)
        .await
        .expect("a fresh token resumes");
    assert!(resumed.until_caught_up().await.is_empty());
    drop(resumed);
    // Past the 5 s retention.
    tokio::time::sleep(Duration::from_secs(7)).await;
    for old in [token, b64("v1:1000")] {
        let status = Watch::open(&c, &alice, "", &old)
            .await
            .err()
            .unwrap_or_else(|| panic!("an expired token {old:?} was accepted"));
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let info = status.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "watch.resume_token_expired", "{status:?}");
        assert!(status.message().contains("list"), "{status:?}");
    }

    // (d) Another team cannot be watched.
    let status = Watch::open(&c, &alice, &team_b, "")
        .await
        .err()
        .expect("watching another team is refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Watches and waits take the caller's stream share (2 here).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut w = Watch::open(&c, &alice, &team_a, "")
            .await
            .expect("within the share");
        w.until_caught_up().await;
        held.push(w);
    }
    let status = Watch::open(&c, &alice, "", "")
        .await
        .err()
        .expect("a third watch is over the share");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.get_details_quota_failure().is_some(), "{status:?}");
    let status = wait(
        &c,
        &alice,
        &uuid::Uuid::new_v4().to_string(),
        Duration::from_secs(1),
    )
    .await
    .expect_err("a wait is over the share too");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    drop(held);

    // Rights withdrawn: a team watch ends PERMISSION_DENIED once the
    // caller is removed from the team; every watch ends UNAUTHENTICATED
    // once its user is disabled.
    let carol = c.user("tokens-carol", &team_a, TeamRole::Viewer).await;
    let carol_id = user_id(&c, &carol).await;
    let mut team_watch = Watch::open_when_ready(&c, &carol, &team_a, "").await;
    team_watch.until_caught_up().await;
    c.identity(&admin)
        .remove_team_member(RemoveTeamMemberRequest {
            team_id: team_a.clone(),
            user_id: carol_id,
        })
        .await
        .expect("remove carol");
    let status = team_watch.ended().await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let dave = c.user("tokens-dave", &team_a, TeamRole::Viewer).await;
    let dave_id = user_id(&c, &dave).await;
    let mut all_watch = Watch::open_when_ready(&c, &dave, "", "").await;
    all_watch.until_caught_up().await;
    c.identity(&admin)
        .set_user_disabled(SetUserDisabledRequest {
            user_id: dave_id,
            disabled: true,
        })
        .await
        .expect("disable dave");
    let status = all_watch.ended().await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

/// A Docker socket in front of the real one that holds every container
/// create back for `delay` (the test's slow engine).
struct SlowDocker {
    _dir: tempfile::TempDir,
    path: PathBuf,
    delayed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowDocker {
    fn start(delay: Duration) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("docker.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind the proxy socket");
        let upstream = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"));
        let delayed = Arc::new(AtomicUsize::new(0));
        let counter = delayed.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream.clone(), delay, counter.clone()));
            }
        });
        Self {
            _dir: dir,
            path,
            delayed,
            task,
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn delayed(&self) -> usize {
        self.delayed.load(Ordering::SeqCst)
    }
}

impl Drop for SlowDocker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relays one connection; a request that starts a container create waits
/// `delay` before it goes on (the client waits for each answer before its
/// next request, so a read that starts a request starts with its line).
async fn relay(
    client: tokio::net::UnixStream,
    upstream: PathBuf,
    delay: Duration,
    delayed: Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::UnixStream::connect(&upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let line_end = chunk.iter().position(|b| *b == b'\n').unwrap_or(n);
        let line = String::from_utf8_lossy(&chunk[..line_end]);
        if line.starts_with("POST ") && line.contains("/containers/create") {
            delayed.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
        }
        if server_write.write_all(chunk).await.is_err() {
            break;
        }
    }
    let _ = server_write.shutdown().await;
    let _ = down.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_slower_than_the_gateway_deadline_settles_through_wait() {
    /// Longer than the gateway's deadline for unary calls (30 s) and its
    /// handler timeout here (20 s).
    const ENGINE_DELAY: Duration = Duration::from_secs(35);
    let image = dev_image();
    let engine = SlowDocker::start(ENGINE_DELAY);
    let c = Cluster::builder()
        .arg(
            Service::Orchestrator,
            format!("--docker-host=unix://{}", engine.path().display()),
        )
        .arg(Service::Gateway, "--request-timeout-ms=20000")
        .start()
        .await;
    let admin = c.admin_token();
    let team = c.team("slow").await;
    let alice = c.user("slow-alice", &team, TeamRole::Developer).await;
    let vic = c.user("slow-vic", &team, TeamRole::Viewer).await;
    let vic_id = user_id(&c, &vic).await;

    let mut watch = Watch::open_when_ready(&c, &alice, &team, "").await;
    watch.until_caught_up().await;

    // The create answers at once; the engine holds the container back.
    let env = create(&c, &alice, &team, "slow", &image).await.id;

    // (e) A short wait answers promptly with the state as it is.
    let asked = Instant::now();
    let now = wait(&c, &alice, &env, Duration::from_secs(1))
        .await
        .expect("short wait");
    assert_eq!(state_of(&now), EnvironmentState::Creating, "{now:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "a 1 s wait took {:?}",
        asked.elapsed()
    );

    // A viewer waits too, until it is disabled: its wait ends
    // UNAUTHENTICATED, whatever the environment does.
    let viewer_wait = {
        let c_env = c.environments(&vic);
        let env = env.clone();
        tokio::spawn(async move {
            let mut client = c_env;
            client
                .wait_environment(WaitEnvironmentRequest {
                    environment_id: env,
                    timeout: Some(prost_types::Duration {
                        seconds: 600,
                        nanos: 0,
                    }),
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.identity(&admin)
        .set_user_disabled(SetUserDisabledRequest {
            user_id: vic_id,
            disabled: true,
        })
        .await
        .expect("disable vic");
    let ended = tokio::time::timeout(Duration::from_secs(10), viewer_wait)
        .await
        .expect("the viewer's wait ends once the viewer is disabled")
        .expect("join");
    let status = ended.expect_err("a disabled user's wait ends with an error");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // (f) The long wait outlives the gateway's deadlines and answers RUNNING.
    let asked = Instant::now();
    let done = wait(&c, &alice, &env, Duration::from_secs(600))
        .await
        .expect("the long wait answers");
    assert_eq!(state_of(&done), EnvironmentState::Running, "{done:?}");
    assert!(
        engine.delayed() >= 1,
        "the proxy held no container create back"
    );
    assert!(
        asked.elapsed() > Duration::from_secs(20),
        "the wait was meant to outlast the 20 s handler timeout; took {:?}",
        asked.elapsed()
    );
    // The watch saw it through: CREATING, then RUNNING.
    watch.until(&env, EnvironmentState::Running).await;
    let states = watch.states_of(&env);
    assert_eq!(
        states.first(),
        Some(&EnvironmentState::Creating),
        "{states:?}"
    );
    assert_eq!(
        states.last(),
        Some(&EnvironmentState::Running),
        "{states:?}"
    );
}
