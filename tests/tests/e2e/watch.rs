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
//!   answers RUNNING once the engine is done;
//! - a watcher whose client stops reading is ended ABORTED
//!   `watch.fell_behind` after `--watch-max-lag-ms` while another watcher
//!   of the same changes goes on, and its last token resumes it; activity
//!   alone (an exec in a running environment moves its
//!   `last_activity_time`) is a change a resume replays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tonic::{Code, Status, Streaming};
use tonic_types::StatusExt;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, DeleteEnvironmentRequest, Environment,
    EnvironmentState, GetEnvironmentRequest, StartEnvironmentRequest, StopEnvironmentRequest,
    UpdateEnvironmentRequest, WaitEnvironmentRequest, WatchEnvironmentsRequest,
    WatchEnvironmentsResponse,
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
        Watch::open_on(c.environments(token), team, resume).await
    }

    /// Opens a watch through `client` (a connection of the test's own).
    async fn open_on<T>(
        mut client: EnvironmentServiceClient<T>,
        team: &str,
        resume: &str,
    ) -> Result<Watch, Status>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<tonic::codegen::StdError>,
        T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
        <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    {
        let stream = client
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

/// The resume token's position (Unix ms; the test knows the encoding the
/// gateway documents: base64url of `v1:<ms>`).
fn position(token: &str) -> i64 {
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .expect("base64url token");
    String::from_utf8(text)
        .expect("utf-8 token")
        .strip_prefix("v1:")
        .expect("v1 token")
        .parse()
        .expect("a position")
}

fn millis_of(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
}

async fn get(c: &Cluster, token: &str, id: &str) -> Environment {
    c.environments(token)
        .get_environment(GetEnvironmentRequest {
            environment_id: id.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .environment
        .expect("environment")
}

/// Sets `round` (and labels enough to make each change about 2 KiB on the
/// wire) on `id`'s labels.
async fn relabel(c: &Cluster, token: &str, id: &str, round: usize) {
    let mut labels: std::collections::BTreeMap<String, String> = (0..32)
        .map(|i| (format!("pad-{i:02}"), "x".repeat(60)))
        .collect();
    labels.insert("round".into(), round.to_string());
    c.environments(token)
        .update_environment(UpdateEnvironmentRequest {
            environment: Some(Environment {
                id: id.into(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels".into()],
            }),
            request_id: format!("relabel-{id}-{round}"),
        })
        .await
        .unwrap_or_else(|e| panic!("relabel {round}: {e:?}"));
}

fn round_of(env: &Environment) -> Option<usize> {
    env.labels.get("round").and_then(|r| r.parse().ok())
}

impl Watch {
    /// Reads until `id` is seen with label round `round`.
    async fn until_round(&mut self, id: &str, round: usize) {
        loop {
            let message = self.next().await.expect("watch message");
            if let Some(env) = message.environment
                && env.id == id
                && round_of(&env) == Some(round)
            {
                return;
            }
        }
    }
}

/// `vibebox_gateway_watch_fell_behind_total{cause}` as the gateway's
/// metrics endpoint shows it now (0 when absent).
fn fell_behind(c: &Cluster, cause: &str) -> u64 {
    use std::io::{Read, Write};
    let rest = c
        .metrics_url
        .strip_prefix("http://")
        .expect("metrics URL is http");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host).expect("connect to metrics");
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("read metrics");
    let series = format!("vibebox_gateway_watch_fell_behind_total{{cause=\"{cause}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse::<f64>().expect("a count") as u64)
}

/// The bound the gateway is started with (`--watch-max-lag-ms`).
const MAX_LAG: Duration = Duration::from_secs(2);

/// Longer than the gateway's resume slack (15 s): a resume from a token
/// taken this long after an environment's last update does not replay that
/// update.
const PAST_THE_SLACK: Duration = Duration::from_secs(16);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_ends_alone_and_activity_is_replayed_on_resume() {
    let image = dev_image();
    let c = Cluster::builder()
        .arg(
            Service::Gateway,
            format!("--watch-max-lag-ms={}", MAX_LAG.as_millis()),
        )
        // Activity is written every sweep.
        .arg(Service::Orchestrator, "--lifecycle-interval=1s")
        .start()
        .await;
    let team = c.team("stall").await;
    let alice = c.user("stall-alice", &team, TeamRole::Developer).await;
    let quiet = create(&c, &alice, &team, "quiet", &image).await.id;
    let busy = create(&c, &alice, &team, "busy", &image).await.id;
    settled(&c, &alice, &quiet, EnvironmentState::Running).await;
    settled(&c, &alice, &busy, EnvironmentState::Running).await;
    let quiet_updated = millis_of(get(&c, &alice, &quiet).await.update_time.as_ref());

    // (1) Two watchers of the same changes: one reads, one stops reading
    // after the listing. The stalled one has a connection of its own with a
    // 1 KiB flow-control window, so that what it does not read backs up to
    // the gateway after a few changes (not after megabytes).
    let mut reader = Watch::open_when_ready(&c, &alice, &team, "").await;
    reader.until_caught_up().await;
    let tiny = tonic::transport::Endpoint::from_shared(c.url(Service::Gateway))
        .expect("gateway url")
        .initial_stream_window_size(1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await
        .expect("a connection of the stalled watcher's own");
    let mut stalled = Watch::open_on(
        EnvironmentServiceClient::with_interceptor(tiny, vibebox_tests::bearer(&alice)),
        &team,
        "",
    )
    .await
    .expect("the stalled watch");
    stalled.until_caught_up().await;

    const ROUNDS: usize = 30;
    for round in 0..ROUNDS {
        relabel(&c, &alice, &busy, round).await;
        reader.until_round(&busy, round).await;
    }
    // The stalled watcher has been unable to deliver for a while now: past
    // the bound it is ended, and nothing else is.
    tokio::time::sleep(MAX_LAG * 2 + Duration::from_secs(1)).await;
    relabel(&c, &alice, &busy, ROUNDS).await;
    reader.until_round(&busy, ROUNDS).await;

    // Ended while its client still reads nothing (what it did not read is
    // no longer held for it), and it alone.
    assert_eq!(
        fell_behind(&c, "stalled"),
        1,
        "the gateway did not end the stalled watcher while it was not read"
    );
    assert_eq!(fell_behind(&c, "lagging") + fell_behind(&c, "backlog"), 0);

    // What reached the stalled client's buffers before it stopped, then the
    // status: it fell behind; resume.
    let ended = async {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), stalled.stream.message())
                .await
                .expect("the stalled watch was not ended: it kept waiting for its client");
            match message {
                Ok(Some(message)) => {
                    if let Some(env) = message.environment {
                        stalled.seen.push(env);
                    }
                    stalled.token = message.resume_token;
                }
                Ok(None) => panic!("the stalled watch ended without a status"),
                Err(status) => return status,
            }
        }
    };
    let status = ended.await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(
        status.get_details_error_info().map(|i| i.reason),
        Some("watch.fell_behind".to_owned()),
        "{status:?}"
    );
    let delivered = stalled
        .seen
        .iter()
        .filter_map(round_of)
        .max()
        .map_or(0, |r| r + 1);
    assert!(
        delivered < ROUNDS,
        "the stalled client got every change ({delivered}): it never stalled the gateway"
    );
    // The reader goes on.
    relabel(&c, &alice, &busy, ROUNDS + 1).await;
    reader.until_round(&busy, ROUNDS + 1).await;
    // The stalled client resumes with its last token and misses nothing.
    let mut resumed = Watch::open_when_ready(&c, &alice, &team, &stalled.token).await;
    let replayed = resumed.until_caught_up().await;
    assert_eq!(
        replayed
            .iter()
            .rev()
            .find(|e| e.id == busy)
            .and_then(round_of),
        Some(ROUNDS + 1),
        "the resume replays the changes the stalled client missed"
    );
    drop((reader, resumed));

    // (2) Activity alone is a change a resume replays. `quiet` has not
    // changed since it settled; a token taken more than the resume slack
    // after that does not replay its settling.
    // (Two seconds more: a token is the position of the gateway's replica,
    // which the feed's heartbeat moves every second.)
    let wait = (quiet_updated + PAST_THE_SLACK.as_millis() as i64 + 2_000)
        - chrono::Utc::now().timestamp_millis();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    let mut watch = Watch::open_when_ready(&c, &alice, &team, "").await;
    watch.until_caught_up().await;
    let token = watch.token.clone();
    drop(watch);
    let before = get(&c, &alice, &quiet).await;
    assert_eq!(
        millis_of(before.update_time.as_ref()),
        quiet_updated,
        "quiet changed meanwhile: {before:?}"
    );
    assert!(
        position(&token) - quiet_updated >= PAST_THE_SLACK.as_millis() as i64,
        "the token is past the slack after quiet's last update"
    );
    let out = vibebox_tests::cluster::exec(&mut c.environments(&alice), &quiet, &["true"])
        .await
        .expect("exec");
    assert_eq!(out.exit_code, 0, "{out:?}");
    // The next sweep writes the activity.
    let deadline = Instant::now() + PATIENCE;
    let active = loop {
        let env = get(&c, &alice, &quiet).await;
        if millis_of(env.last_activity_time.as_ref()) >= position(&token) {
            break env;
        }
        assert!(Instant::now() < deadline, "no activity recorded: {env:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut resumed = Watch::open_when_ready(&c, &alice, &team, &token).await;
    let replayed = resumed.until_caught_up().await;
    let seen = replayed
        .iter()
        .rev()
        .find(|e| e.id == quiet)
        .unwrap_or_else(|| {
            let names: Vec<&str> = replayed.iter().map(|e| e.name.as_str()).collect();
            panic!("the activity is not replayed; the replay sent {names:?}")
        });
    assert_eq!(
        seen.last_activity_time, active.last_activity_time,
        "the replay carries the activity"
    );
    assert_eq!(seen.state(), EnvironmentState::Running);
}
