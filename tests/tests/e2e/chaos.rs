//! Chaos suite: the five services as separate processes (`cluster`), one of
//! them killed with SIGKILL at a random point of a create, an exec or a
//! delete, restarted, and the platform left to reconcile. Afterwards: no
//! orphan Docker objects, every environment in a defined state, every
//! acknowledged operation in the audit log exactly once, and the chain
//! verifies. A second test takes the Docker Engine away from the orchestrator
//! (a socket proxy the test controls) and gives it back. A third freezes the
//! orchestrator (SIGSTOP): the gateway's environment replica must stop
//! answering instead of serving what may be stale.
//!
//! `VIBEBOX_CHAOS_ITERATIONS` (default 50) sets the number of kills;
//! `VIBEBOX_CHAOS_SEED` replays a run (the seed is in the suite report).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, ListVolumesOptionsBuilder,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tonic::Code;
use vibebox_proto::audit::{
    AuditEvent, EventFilter, Outcome, QueryEventsRequest, VerifyChainRequest,
};
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, DeleteEnvironmentRequest, Environment,
    EnvironmentState, GetEnvironmentRequest, ListEnvironmentsRequest, StreamLogsRequest,
};
use vibebox_proto::identity::TeamRole;
use vibebox_tests::cluster::{self, Cluster, Service};
use vibebox_tests::report::SuiteReport;
use vibebox_tests::settle::is_transitional;
use vibebox_tests::{Settle, dev_image, docker};

/// A small deterministic generator (xorshift64*), seeded per run.
struct Rng(u64);

impl Rng {
    fn seeded() -> (Self, u64) {
        let seed = std::env::var("VIBEBOX_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        (Rng(seed | 1), seed)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn iterations() -> usize {
    std::env::var("VIBEBOX_CHAOS_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Create,
    Exec,
    Delete,
}

/// Codes a call may fail with while one service is being killed: the
/// connection went away, or a dependency was unreachable.
fn interrupted(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Small limits: the host capacity guard (a share of the host's memory)
/// must not be what refuses a create here.
fn spec(image: &str) -> ContainerSpec {
    ContainerSpec {
        image: image.into(),
        cpu_limit: Some(0.25),
        memory_limit_mb: Some(64),
        ..Default::default()
    }
}

fn state_name(s: EnvironmentState) -> &'static str {
    s.as_str_name()
}

/// What the clients were told, to be compared with what the platform did.
#[derive(Default)]
struct Ledger {
    /// Creates acknowledged with a running environment.
    created: Vec<String>,
    /// Creates that ended with a failed environment (rolled back).
    failed: Vec<String>,
    /// Deletes acknowledged with a deleted environment.
    deleted: Vec<String>,
    /// Exec tokens whose exit code reached the client.
    execs_acked: Vec<String>,
    /// Exec tokens that were interrupted.
    execs_interrupted: Vec<String>,
    /// First-attempt outcomes, `victim op code` -> count.
    outcomes: BTreeMap<String, u32>,
}

struct Ctx {
    cluster: Cluster,
    image: String,
    team: String,
    dev: String,
    admin: String,
}

impl Ctx {
    /// A context on `cluster`: a new team `name` with a developer `name-dev`.
    async fn with_team(cluster: Cluster, image: String, name: &str) -> Self {
        let admin = cluster.admin_token();
        let team = cluster.team(name).await;
        let dev = cluster
            .user(&format!("{name}-dev"), &team, TeamRole::Developer)
            .await;
        Ctx {
            cluster,
            image,
            team,
            dev,
            admin,
        }
    }

    fn create_request(&self, request_id: &str, name: &str) -> CreateEnvironmentRequest {
        CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: request_id.into(),
            team_id: self.team.clone(),
            name: name.into(),
            spec: Some(spec(&self.image)),
        }
    }

    /// Creates and waits until the environment has settled (create is a
    /// long operation: it answers CREATING). A retry with the same request
    /// id waits for the same environment.
    async fn create(&self, request_id: &str, name: &str) -> Result<Environment, tonic::Status> {
        self.cluster
            .environments(&self.dev)
            .create_settled(self.create_request(request_id, name))
            .await
    }

    /// Creates without waiting: the environment as the create answered.
    async fn create_unsettled(
        &self,
        request_id: &str,
        name: &str,
    ) -> Result<Environment, tonic::Status> {
        self.cluster
            .environments(&self.dev)
            .create_environment(self.create_request(request_id, name))
            .await
            .map(|r| r.into_inner().environment.expect("environment"))
    }

    async fn get(&self, id: &str) -> Result<Environment, tonic::Status> {
        self.cluster
            .environments(&self.dev)
            .get_environment(GetEnvironmentRequest {
                environment_id: id.into(),
            })
            .await
            .map(|r| r.into_inner().environment.expect("environment"))
    }

    /// Deletes without waiting: the environment as the delete answered.
    async fn delete_unsettled(&self, id: &str) -> Result<Environment, tonic::Status> {
        self.cluster
            .environments(&self.dev)
            .delete_environment(DeleteEnvironmentRequest {
                environment_id: id.into(),
            })
            .await
            .map(|r| r.into_inner().environment.expect("environment"))
    }

    /// Deletes and waits until the environment has settled (DELETED). A
    /// retry of a delete that was accepted before (the environment is still
    /// DELETING, which may refuse a second delete as a state it cannot act
    /// in) waits for that one.
    async fn delete(&self, id: &str) -> Result<Environment, tonic::Status> {
        let mut envs = self.cluster.environments(&self.dev);
        match self.delete_unsettled(id).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::FailedPrecondition => {
                let now = self.get(id).await?;
                if now.state() != EnvironmentState::Deleting {
                    return Err(s);
                }
            }
            Err(s) => return Err(s),
        }
        envs.settle(id).await
    }

    /// Retries `call` while it fails as an interrupted call would, up to 60 s.
    async fn settle<T, F, Fut>(&self, what: &str, mut call: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match call().await {
                Ok(v) => return v,
                Err(s) if interrupted(s.code()) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => panic!("{what}: {s:?}"),
            }
        }
    }

    /// Waits until the operation (or reconcile) has moved an environment
    /// out of its transitional state (creating, starting, stopping,
    /// deleting).
    async fn defined(&self, id: &str) -> Environment {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let env = self.settle("get", || self.get(id)).await;
            if is_transitional(env.state()) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
            } else {
                return env;
            }
        }
    }

    async fn list_all(&self) -> Vec<Environment> {
        self.settle("list", || async {
            self.cluster
                .environments(&self.dev)
                .list_environments(ListEnvironmentsRequest {
                    team_id: self.team.clone(),
                    page_size: 500,
                    show_deleted: true,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().environments)
        })
        .await
    }

    async fn audit_events(&self) -> Vec<AuditEvent> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .settle("query events", || async {
                    self.cluster
                        .audit(&self.admin)
                        .query_events(QueryEventsRequest {
                            filter: Some(EventFilter::default()),
                            page_size: 500,
                            page_token: page_token.clone(),
                        })
                        .await
                        .map(|r| r.into_inner())
                })
                .await;
            all.extend(page.events);
            if page.next_page_token.is_empty() {
                return all;
            }
            page_token = page.next_page_token;
        }
    }
}

fn exec_command(token: &str, code: i32) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("echo {token}; exit {code}"),
    ]
}

async fn exec_once(
    cluster: &Cluster,
    dev: &str,
    env: &str,
    token: &str,
    code: i32,
) -> Result<cluster::ExecOutcome, tonic::Status> {
    let command = exec_command(token, code);
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    cluster::exec(&mut cluster.environments(dev), env, &command).await
}

fn check_exec(out: &cluster::ExecOutcome, token: &str, code: i32) {
    assert_eq!(out.stdout.trim(), token, "exec output of {token}: {out:?}");
    assert_eq!(out.exit_code, code, "exit code of {token}: {out:?}");
}

/// Docker objects labelled with this installation: (kind:name, environment).
async fn labelled_objects(installation: &str) -> Vec<(String, String)> {
    let label = format!("vibebox.installation={installation}");
    let filters: HashMap<&str, Vec<&str>> = HashMap::from([("label", vec![label.as_str()])]);
    let d = docker();
    let env_of = |labels: Option<&HashMap<String, String>>| {
        labels
            .and_then(|l| l.get("vibebox.environment").cloned())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for c in d
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .expect("list containers")
    {
        out.push((
            format!("container:{}", c.id.clone().unwrap_or_default()),
            env_of(c.labels.as_ref()),
        ));
    }
    for n in d
        .list_networks(Some(
            ListNetworksOptionsBuilder::new().filters(&filters).build(),
        ))
        .await
        .expect("list networks")
    {
        out.push((
            format!("network:{}", n.name.clone().unwrap_or_default()),
            env_of(n.labels.as_ref()),
        ));
    }
    for v in d
        .list_volumes(Some(
            ListVolumesOptionsBuilder::new().filters(&filters).build(),
        ))
        .await
        .expect("list volumes")
        .volumes
        .unwrap_or_default()
    {
        out.push((format!("volume:{}", v.name), env_of(Some(&v.labels))));
    }
    out
}

fn detail<'a>(e: &'a AuditEvent, key: &str) -> Option<&'a str> {
    match e.details.as_ref()?.fields.get(key)?.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

fn count(events: &[AuditEvent], pred: impl Fn(&AuditEvent) -> bool) -> usize {
    events.iter().filter(|e| pred(e)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_services_leave_no_orphans_no_stuck_states_and_an_exact_audit_log() {
    let mut report = SuiteReport::new("chaos", "kill_restart_reconcile");
    let (mut rng, seed) = Rng::seeded();
    let iterations = iterations();
    report.note("seed", seed);
    report.note("iterations", iterations);
    let started = Instant::now();

    let image = dev_image();
    let cluster = Cluster::builder()
        .arg(Service::Orchestrator, "--reconcile-interval=2")
        .arg(Service::Orchestrator, "--team-max-environments=100")
        .arg(Service::Gateway, "--rate-limit-per-second=10000")
        .arg(Service::Gateway, "--rate-limit-burst=10000")
        .start()
        .await;
    let mut ctx = Ctx::with_team(cluster, image, "chaos").await;
    let installation = ctx.cluster.installation_id();

    // One undisturbed round: it must work, and it tells how long each
    // operation takes, which bounds the random kill delays.
    let t = Instant::now();
    let first = ctx
        .create("warmup", "warmup")
        .await
        .expect("warm-up create");
    assert_eq!(first.state(), EnvironmentState::Running, "{first:?}");
    let create_ms = t.elapsed().as_millis() as u64;
    let t = Instant::now();
    let out = exec_once(&ctx.cluster, &ctx.dev, &first.id, "warmup-exec", 0)
        .await
        .expect("warm-up exec");
    check_exec(&out, "warmup-exec", 0);
    let exec_ms = t.elapsed().as_millis() as u64;
    let mut ledger = Ledger::default();
    ledger.created.push(first.id.clone());
    ledger.execs_acked.push("warmup-exec".into());
    let mut pool: Vec<String> = vec![first.id.clone()];
    let t = Instant::now();
    let gone = ctx
        .delete(&pool.pop().unwrap())
        .await
        .expect("warm-up delete");
    assert_eq!(gone.state(), EnvironmentState::Deleted);
    let delete_ms = t.elapsed().as_millis() as u64;
    ledger.deleted.push(gone.id);
    report.note(
        "undisturbed create/exec/delete ms",
        format!("{create_ms}/{exec_ms}/{delete_ms}"),
    );

    let mut kills: BTreeMap<&str, u32> = BTreeMap::new();
    for i in 0..iterations {
        // Every (victim, operation) pair equally often.
        let victim = Service::ALL[i % Service::ALL.len()];
        let op = [Op::Create, Op::Exec, Op::Delete][(i / Service::ALL.len()) % 3];
        // Keep one to four environments, with undisturbed operations.
        if op != Op::Create && pool.is_empty() {
            let env = ctx
                .create(&format!("keep-{i}"), &format!("keep-{i}"))
                .await
                .expect("undisturbed create");
            assert_eq!(env.state(), EnvironmentState::Running, "{env:?}");
            ledger.created.push(env.id.clone());
            pool.push(env.id);
        }
        if op == Op::Create && pool.len() >= 4 {
            let id = pool.remove(0);
            let env = ctx.delete(&id).await.expect("undisturbed delete");
            assert_eq!(env.state(), EnvironmentState::Deleted, "{env:?}");
            ledger.deleted.push(id);
        }
        let budget = match op {
            Op::Create => create_ms,
            Op::Exec => exec_ms,
            Op::Delete => delete_ms,
        };
        // Identity and policy take part early in a call (authorization,
        // clearance): aim early for them, anywhere for the others.
        let window = match victim {
            Service::Identity | Service::Policy => budget / 4 + 10,
            _ => budget * 5 / 4 + 20,
        };
        let delay = Duration::from_millis(rng.below(window));
        let pick = rng.below(pool.len() as u64) as usize;
        let exec_code = (i % 7) as i32;
        let token = format!("chaos-{seed}-{i}");
        let request_id = format!("chaos-{i}");

        // The operation, in flight while the victim dies.
        let envs = ctx.cluster.environments(&ctx.dev);
        let (team, image) = (ctx.team.clone(), ctx.image.clone());
        let target = pool.get(pick).cloned().unwrap_or_default();
        let command = exec_command(&token, exec_code);
        let rid = request_id.clone();
        let task: JoinHandle<Result<String, tonic::Status>> = tokio::spawn(async move {
            let mut envs = envs;
            match op {
                Op::Create => envs
                    .create_environment(CreateEnvironmentRequest {
                        labels: Default::default(),
                        request_id: rid.clone(),
                        team_id: team,
                        name: rid,
                        spec: Some(spec(&image)),
                    })
                    .await
                    .map(|r| r.into_inner().environment.expect("environment").id),
                Op::Exec => {
                    let command: Vec<&str> = command.iter().map(String::as_str).collect();
                    cluster::exec(&mut envs, &target, &command)
                        .await
                        .map(|o| format!("{}\n{}", o.stdout.trim(), o.exit_code))
                }
                Op::Delete => envs
                    .delete_environment(DeleteEnvironmentRequest {
                        environment_id: target,
                    })
                    .await
                    .map(|r| r.into_inner().environment.expect("environment").id),
            }
        });
        tokio::time::sleep(delay).await;
        ctx.cluster.kill(victim);
        *kills.entry(victim.name()).or_default() += 1;
        ctx.cluster.restart(victim).await;
        let first = tokio::time::timeout(Duration::from_secs(90), task)
            .await
            .unwrap_or_else(|_| panic!("iteration {i}: {op:?} hung after {victim} was killed"))
            .expect("operation task");
        let outcome = match &first {
            Ok(_) => "OK".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        *ledger
            .outcomes
            .entry(format!("{victim} {op:?} {outcome}"))
            .or_default() += 1;
        report.case(first.is_err());
        if let Err(s) = &first {
            assert!(
                interrupted(s.code()),
                "iteration {i}: {op:?} interrupted by killing {victim} failed with {s:?}"
            );
        }

        // Resolve the operation as a client would, then check its result.
        match op {
            Op::Create => {
                // A retry with the same request id is the same environment,
                // whether or not the first answer arrived.
                let env = ctx
                    .settle("create retry", || ctx.create(&request_id, &request_id))
                    .await;
                if let Ok(id) = &first {
                    assert_eq!(&env.id, id, "iteration {i}: retried create");
                }
                let env = ctx.defined(&env.id).await;
                match env.state() {
                    EnvironmentState::Running => {
                        ledger.created.push(env.id.clone());
                        pool.push(env.id);
                    }
                    EnvironmentState::Failed => ledger.failed.push(env.id),
                    other => panic!(
                        "iteration {i}: create {request_id} ended {}: {env:?}",
                        state_name(other)
                    ),
                }
            }
            Op::Exec => {
                match first {
                    Ok(text) => {
                        assert_eq!(text, format!("{token}\n{exec_code}"), "iteration {i}");
                        ledger.execs_acked.push(token.clone());
                    }
                    Err(_) => ledger.execs_interrupted.push(token.clone()),
                }
                // The platform serves execs again, in the same environment.
                let again = format!("{token}-again");
                let out = ctx
                    .settle("exec retry", || {
                        exec_once(&ctx.cluster, &ctx.dev, &pool[pick], &again, exec_code)
                    })
                    .await;
                check_exec(&out, &again, exec_code);
                ledger.execs_acked.push(again);
            }
            Op::Delete => {
                let id = pool.remove(pick);
                let env = ctx.settle("delete retry", || ctx.delete(&id)).await;
                assert_eq!(
                    env.state(),
                    EnvironmentState::Deleted,
                    "iteration {i}: {env:?}"
                );
                ledger.deleted.push(id);
            }
        }
    }
    report.note(
        "kills",
        kills
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    report.note(
        "first attempts",
        ledger
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; "),
    );

    // After reconcile: every environment in a defined state, no orphans.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (envs, objects) = loop {
        let envs = ctx.list_all().await;
        let objects = labelled_objects(&installation).await;
        let states: HashMap<&str, EnvironmentState> =
            envs.iter().map(|e| (e.id.as_str(), e.state())).collect();
        let stuck = envs.iter().any(|e| is_transitional(e.state()));
        let orphans = objects.iter().any(|(_, env)| {
            !matches!(
                states.get(env.as_str()),
                Some(EnvironmentState::Running | EnvironmentState::Stopped)
            )
        });
        if (!stuck && !orphans) || Instant::now() > deadline {
            break (envs, objects);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let states: HashMap<&str, EnvironmentState> =
        envs.iter().map(|e| (e.id.as_str(), e.state())).collect();
    for e in &envs {
        assert!(
            matches!(
                e.state(),
                EnvironmentState::Running
                    | EnvironmentState::Stopped
                    | EnvironmentState::Failed
                    | EnvironmentState::Deleted
            ),
            "environment {} stuck in {} after reconcile: {e:?}",
            e.id,
            state_name(e.state())
        );
    }
    let orphans: Vec<&(String, String)> = objects
        .iter()
        .filter(|(_, env)| {
            !matches!(
                states.get(env.as_str()),
                Some(EnvironmentState::Running | EnvironmentState::Stopped)
            )
        })
        .collect();
    assert!(orphans.is_empty(), "orphan Docker objects: {orphans:?}");
    for id in &pool {
        assert_eq!(
            states.get(id.as_str()),
            Some(&EnvironmentState::Running),
            "acknowledged environment {id}"
        );
        assert!(
            objects
                .iter()
                .any(|(o, env)| env == id && o.starts_with("container:")),
            "running environment {id} has its container"
        );
        report.inspected += 1;
    }
    for id in &ledger.deleted {
        assert_eq!(states.get(id.as_str()), Some(&EnvironmentState::Deleted));
    }
    report.note("environments", envs.len());
    report.note("docker objects after", objects.len());

    // The audit log: every acknowledged operation exactly once.
    let want = |events: &[AuditEvent]| -> Vec<String> {
        let mut missing = Vec::new();
        for id in &ledger.created {
            let n = count(events, |e| {
                e.action == "environment.create"
                    && e.outcome() == Outcome::Success
                    && e.resource_id == *id
            });
            if n != 1 {
                missing.push(format!("environment.create {id}: {n} successes"));
            }
        }
        for id in &ledger.failed {
            // Started, audited, then killed before `running` was committed:
            // reconcile rolled it back, and says so after the success.
            let creates: Vec<&AuditEvent> = events
                .iter()
                .filter(|e| e.action == "environment.create" && e.resource_id == *id)
                .collect();
            let successes: Vec<u64> = creates
                .iter()
                .filter(|e| e.outcome() == Outcome::Success)
                .map(|e| e.sequence)
                .collect();
            let rolled_back = creates.iter().any(|e| {
                e.outcome() == Outcome::Failure && successes.iter().all(|s| e.sequence > *s)
            });
            if successes.len() > 1 || (successes.len() == 1 && !rolled_back) {
                missing.push(format!(
                    "failed environment {id}: {} create successes, rolled back: {rolled_back}",
                    successes.len()
                ));
            }
        }
        for id in &ledger.deleted {
            let n = count(events, |e| {
                e.action == "environment.delete"
                    && e.outcome() == Outcome::Success
                    && e.resource_id == *id
            });
            if n != 1 {
                missing.push(format!("environment.delete {id}: {n} successes"));
            }
        }
        for token in &ledger.execs_acked {
            for action in ["exec.start", "exec.end"] {
                let n = count(events, |e| {
                    e.action == action
                        && detail(e, "command").is_some_and(|c| {
                            c.split_whitespace()
                                .any(|w| w.trim_end_matches(';') == token)
                        })
                });
                if n != 1 {
                    missing.push(format!("{action} {token}: {n}"));
                }
            }
        }
        for token in &ledger.execs_interrupted {
            for action in ["exec.start", "exec.end"] {
                let n = count(events, |e| {
                    e.action == action
                        && detail(e, "command").is_some_and(|c| {
                            c.split_whitespace()
                                .any(|w| w.trim_end_matches(';') == token)
                        })
                });
                if n > 1 {
                    missing.push(format!("interrupted {action} {token}: {n}"));
                }
            }
        }
        let mut ids = HashSet::new();
        for e in events {
            if !ids.insert(e.id.as_str()) {
                missing.push(format!("event {} appended twice", e.id));
            }
        }
        missing
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (events, problems) = loop {
        let events = ctx.audit_events().await;
        let problems = want(&events);
        if problems.is_empty() || Instant::now() > deadline {
            break (events, problems);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        problems.is_empty(),
        "audit log does not match what clients were told:\n{}",
        problems.join("\n")
    );
    report.note("audit events", events.len());

    let verified = ctx
        .settle("verify chain", || async {
            ctx.cluster
                .audit(&ctx.admin)
                .verify_chain(VerifyChainRequest::default())
                .await
                .map(|r| r.into_inner())
        })
        .await;
    assert!(verified.ok, "audit chain: {verified:?}");
    assert!(
        verified.events_checked >= events.len() as u64,
        "{verified:?} vs {} events",
        events.len()
    );
    report.note("chain events checked", verified.events_checked);
    report.note("seconds", started.elapsed().as_secs());
    // The environments left are removed with the cluster (on drop).
}

/// A Unix socket the orchestrator uses as its Docker Engine: forwards every
/// connection to the real engine until stopped.
struct DockerProxy {
    path: PathBuf,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl DockerProxy {
    fn new(path: &Path) -> Self {
        let mut proxy = DockerProxy {
            path: path.to_owned(),
            accept: None,
            conns: Arc::default(),
        };
        proxy.up();
        proxy
    }

    /// Starts accepting (and forwarding) connections.
    fn up(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = UnixListener::bind(&self.path).expect("bind proxy socket");
        let conns = self.conns.clone();
        self.accept = Some(tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let task = tokio::spawn(async move {
                    let Ok(mut engine) = UnixStream::connect("/var/run/docker.sock").await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                });
                conns.lock().unwrap().push(task);
            }
        }));
    }

    /// The engine goes away: no new connections, open ones cut.
    fn down(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.down();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn docker_engine_outage_is_unavailable_and_recovers_without_restart() {
    let mut report = SuiteReport::new("chaos", "docker_engine_outage");
    let image = dev_image();
    let sockets = tempfile::tempdir().expect("temp dir");
    let socket = sockets.path().join("docker.sock");
    let mut proxy = DockerProxy::new(&socket);
    let cluster = Cluster::builder()
        .arg(
            Service::Orchestrator,
            format!("--docker-host=unix://{}", socket.display()),
        )
        .arg(Service::Orchestrator, "--reconcile-interval=1")
        .start()
        .await;
    let ctx = Ctx::with_team(cluster, image, "outage").await;
    let orchestrator_pid = ctx.cluster.pid(Service::Orchestrator);

    let before = ctx.create("before", "before").await.expect("create before");
    assert_eq!(before.state(), EnvironmentState::Running);
    let doomed = ctx.create("doomed", "doomed").await.expect("create doomed");
    let out = exec_once(&ctx.cluster, &ctx.dev, &before.id, "before-outage", 0)
        .await
        .expect("exec before");
    check_exec(&out, "before-outage", 0);

    // The engine goes away.
    proxy.down();
    let unavailable = |what: &str, s: &tonic::Status| {
        assert_eq!(s.code(), Code::Unavailable, "{what}: {s:?}");
        assert!(
            s.message().contains("Docker Engine is unavailable"),
            "{what}: the message names the engine: {s:?}"
        );
    };
    // A create is refused at once when admission needs the engine, or
    // accepted (CREATING) and settled once the engine is back; it never
    // claims to run without one.
    let during = match ctx.create_unsettled("during", "during").await {
        Err(refused) => {
            unavailable("create", &refused);
            None
        }
        Ok(env) => {
            assert!(
                is_transitional(env.state()) || env.state() == EnvironmentState::Failed,
                "a create without an engine: {env:?}"
            );
            Some(env.id)
        }
    };
    report.case(true);
    let refused = exec_once(&ctx.cluster, &ctx.dev, &before.id, "during-outage", 0)
        .await
        .unwrap_err();
    unavailable("exec", &refused);
    report.case(true);
    // A delete is refused at once, or accepted (DELETING) and finished
    // once the engine is back (below); it is not DELETED without one.
    match ctx.delete_unsettled(&doomed.id).await {
        Err(refused) => unavailable("delete", &refused),
        Ok(env) => assert_eq!(
            env.state(),
            EnvironmentState::Deleting,
            "a delete without an engine: {env:?}"
        ),
    }
    assert_ne!(
        ctx.get(&doomed.id).await.expect("get doomed").state(),
        EnvironmentState::Deleted,
        "deleted without an engine"
    );
    report.case(true);
    let refused = ctx
        .cluster
        .environments(&ctx.dev)
        .stream_logs(StreamLogsRequest {
            environment_id: before.id.clone(),
            ..Default::default()
        })
        .await;
    let refused = match refused {
        Err(s) => s,
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                match stream.message().await {
                    Err(s) => break s,
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("logs streamed without an engine"),
                }
            }
        }
    };
    unavailable("logs", &refused);
    report.case(true);
    // What needs no engine still answers.
    let listed = ctx.list_all().await;
    assert!(listed.iter().any(|e| e.id == before.id));
    report.case(false);

    // The engine comes back: the same processes recover.
    proxy.up();
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        match ctx.create("after", "after").await {
            Ok(env) => break env,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("create after the outage: {s:?}"),
        }
    };
    assert_eq!(after.state(), EnvironmentState::Running, "{after:?}");
    report.case(false);
    // A create accepted during the outage has settled: running, or failed
    // naming the engine.
    if let Some(id) = &during {
        let env = ctx.defined(id).await;
        match env.state() {
            EnvironmentState::Running => {}
            EnvironmentState::Failed => assert!(
                env.failure_reason.contains("Docker Engine")
                    || env.failure_reason.contains("docker"),
                "the reason names the engine: {env:?}"
            ),
            _ => panic!("the create accepted during the outage ended: {env:?}"),
        }
    }
    let out = exec_once(&ctx.cluster, &ctx.dev, &before.id, "after-outage", 4)
        .await
        .expect("exec after the outage");
    check_exec(&out, "after-outage", 4);
    report.case(false);
    // The delete interrupted by the outage completes (retried, or finished by
    // reconcile); nothing of it is left.
    let gone = ctx
        .delete(&doomed.id)
        .await
        .expect("delete after the outage");
    assert_eq!(gone.state(), EnvironmentState::Deleted, "{gone:?}");
    report.case(false);
    let installation = ctx.cluster.installation_id();
    let objects = labelled_objects(&installation).await;
    assert!(
        objects.iter().all(|(_, env)| *env != doomed.id),
        "objects of the deleted environment: {objects:?}"
    );
    for id in [&before.id, &after.id] {
        assert!(
            objects
                .iter()
                .any(|(o, env)| env == id && o.starts_with("container:")),
            "{id} keeps its container"
        );
        report.inspected += 1;
    }
    let envs = ctx.list_all().await;
    for e in &envs {
        assert!(!is_transitional(e.state()), "{e:?}");
    }
    assert_eq!(
        ctx.cluster.pid(Service::Orchestrator),
        orchestrator_pid,
        "the orchestrator was not restarted"
    );
    ctx.cluster.remove_docker_objects();
}

/// Resumes a stopped process when dropped (also when the test fails).
struct Resume(Option<u32>);

impl Drop for Resume {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}

/// The gateway answers environment reads from its replica of the
/// orchestrator's feed; a frozen orchestrator (SIGSTOP: its connections stay
/// open, nothing answers) must not be papered over with that replica: the
/// feed's heartbeat stops, and reads fail instead of returning what may be
/// stale. Once it thaws, reads are answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_orchestrator_is_not_papered_over_by_the_gateway_replica() {
    let mut report = SuiteReport::new("chaos", "frozen_orchestrator");
    let image = dev_image();
    let cluster = Cluster::builder()
        .arg(Service::Gateway, "--upstream-timeout-ms=1000")
        .start()
        .await;
    let ctx = Ctx::with_team(cluster, image, "frozen").await;
    let env = ctx.create("frozen", "frozen").await.expect("create");
    assert_eq!(env.state(), EnvironmentState::Running);
    assert_eq!(
        ctx.get(&env.id).await.expect("get").state(),
        EnvironmentState::Running
    );

    let pid = ctx
        .cluster
        .pid(Service::Orchestrator)
        .expect("orchestrator pid");
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .expect("kill -STOP");
    assert!(stopped.success());
    let resume = Resume(Some(pid));
    let deadline = Instant::now() + Duration::from_secs(15);
    let refused = loop {
        match ctx.get(&env.id).await {
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "reads of a frozen orchestrator's environment kept being answered"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => break status,
        }
    };
    // The orchestrator is asked and does not answer within the gateway's
    // upstream deadline: the answer names it.
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("orchestrator did not answer in time"),
        "{refused:?}"
    );
    report.case(true);

    drop(resume);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ctx.get(&env.id).await {
            Ok(found) => {
                assert_eq!(found.state(), EnvironmentState::Running);
                break;
            }
            Err(status) => {
                assert!(
                    Instant::now() < deadline,
                    "reads never recovered after the thaw: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    report.case(false);
    ctx.cluster.remove_docker_objects();
}
