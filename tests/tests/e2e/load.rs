//! Load suite: many users at once against the five services as separate
//! processes (`cluster`), on loopback only, in bounded numbers. Team quotas
//! never over-admit under concurrent creates; concurrent execs and log
//! streams each see only their own output; the gateway's per-user token
//! bucket refuses a burst with RESOURCE_EXHAUSTED while other users go on;
//! and the resident memory of every service stays bounded (VmRSS before and
//! after, in the suite report).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bollard::query_parameters::ListContainersOptionsBuilder;
use futures::future::join_all;
use tonic::Code;
use vibebox_proto::audit::{EventFilter, QueryEventsRequest};
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, EnvironmentState, ListEnvironmentsRequest,
    StreamLogsRequest,
};
use vibebox_proto::identity::{TeamRole, WhoAmIRequest};
use vibebox_tests::cluster::{self, Cluster, Service};
use vibebox_tests::report::SuiteReport;
use vibebox_tests::{Settle, dev_image, docker};

/// Resident memory may grow by at most this much under the load (KiB).
const RSS_GROWTH_BOUND_KIB: u64 = 200 * 1024;

fn rss(cluster: &Cluster) -> BTreeMap<Service, u64> {
    Service::ALL
        .iter()
        .map(|s| (*s, cluster.rss_kib(*s)))
        .collect()
}

/// Notes each service's VmRSS before and after, and asserts the bound.
fn check_rss(
    report: &mut SuiteReport,
    before: &BTreeMap<Service, u64>,
    after: &BTreeMap<Service, u64>,
) {
    for service in Service::ALL {
        let (b, a) = (before[&service], after[&service]);
        report.note(
            format!("rss {service} before/after"),
            format!("{} MiB / {} MiB", b / 1024, a / 1024),
        );
    }
    for service in Service::ALL {
        let (b, a) = (before[&service], after[&service]);
        assert!(
            a < b + RSS_GROWTH_BOUND_KIB,
            "{service} grew from {b} KiB to {a} KiB under load"
        );
    }
}

fn small_spec(image: &str, command: Option<String>) -> ContainerSpec {
    ContainerSpec {
        image: image.into(),
        command: command
            .map(|c| vec!["sh".into(), "-c".into(), c])
            .unwrap_or_default(),
        cpu_limit: Some(0.25),
        memory_limit_mb: Some(64),
        ..Default::default()
    }
}

async fn team_containers(team: &str) -> usize {
    let label = format!("vibebox.team={team}");
    let filters: HashMap<&str, Vec<&str>> = HashMap::from([("label", vec![label.as_str()])]);
    docker()
        .list_containers(Some(
            ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .expect("list containers")
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_never_over_admit_a_team_quota() {
    const QUOTA: usize = 3;
    const USERS: usize = 12;
    const CREATES_PER_USER: usize = 2;
    let mut report = SuiteReport::new("load", "team_quota_under_concurrency");
    let image = dev_image();
    let cluster = Cluster::builder()
        .arg(
            Service::Orchestrator,
            format!("--team-max-environments={QUOTA}"),
        )
        .arg(Service::Gateway, "--rate-limit-per-second=1000")
        .arg(Service::Gateway, "--rate-limit-burst=1000")
        .start()
        .await;
    let team = cluster.team("quota").await;
    let other_team = cluster.team("quota-other").await;
    let mut users = Vec::new();
    for u in 0..USERS {
        users.push(
            cluster
                .user(&format!("quota-{u}"), &team, TeamRole::Developer)
                .await,
        );
    }
    let outsider = cluster
        .user("quota-outsider", &other_team, TeamRole::Developer)
        .await;
    let before = rss(&cluster);

    // Every user creates at once, twice. The quota is judged when a create
    // is accepted (synchronously); an accepted one is waited for (create
    // answers CREATING) and must run.
    let attempt = |token: &str, team: &str, n: usize| {
        let mut envs = cluster.environments(token);
        let request = CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: format!("quota-{n}"),
            team_id: team.into(),
            name: format!("quota-{n}"),
            spec: Some(small_spec(&image, None)),
        };
        async move { envs.create_settled(request).await }
    };
    let tries: Vec<(usize, usize)> = (0..USERS)
        .flat_map(|u| (0..CREATES_PER_USER).map(move |c| (u, u * CREATES_PER_USER + c)))
        .collect();
    let results = join_all(tries.iter().map(|(u, n)| attempt(&users[*u], &team, *n))).await;
    // (owner, environment id)
    let mut admitted = Vec::new();
    for ((owner, _), result) in tries.iter().zip(results) {
        match result {
            Ok(env) => {
                assert_eq!(env.state(), EnvironmentState::Running, "{env:?}");
                admitted.push((*owner, env.id));
                report.case(false);
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(
                    s.message().contains("team quota exceeded"),
                    "the refusal names the quota: {s:?}"
                );
                report.case(true);
            }
        }
    }
    assert_eq!(
        admitted.len(),
        QUOTA,
        "exactly the quota is admitted out of {} concurrent creates",
        USERS * CREATES_PER_USER
    );
    assert_eq!(team_containers(&team).await, QUOTA, "containers in Docker");
    report.inspected += QUOTA as u64;
    let listed = cluster
        .environments(&users[0])
        .list_environments(ListEnvironmentsRequest {
            team_id: team.clone(),
            show_deleted: true,
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .environments;
    let holding = listed
        .iter()
        .filter(|e| e.state() != EnvironmentState::Failed && e.state() != EnvironmentState::Deleted)
        .count();
    assert_eq!(holding, QUOTA, "{listed:?}");

    // Another team's quota is its own.
    let theirs = attempt(&outsider, &other_team, 1000)
        .await
        .expect("another team creates while this one is full");
    report.case(false);
    assert_eq!(theirs.state(), EnvironmentState::Running, "{theirs:?}");

    // A delete (once it has settled) frees one slot, and a second wave
    // takes exactly that one.
    let (owner, freed) = &admitted[0];
    let deleted = cluster
        .environments(&users[*owner])
        .delete_settled(freed)
        .await
        .expect("delete");
    assert_eq!(deleted.state(), EnvironmentState::Deleted, "{deleted:?}");
    let wave = join_all(
        users
            .iter()
            .take(8)
            .enumerate()
            .map(|(u, token)| attempt(token, &team, 100 + u)),
    )
    .await;
    let second: Vec<_> = wave.iter().filter(|r| r.is_ok()).collect();
    for r in &wave {
        report.case(r.is_err());
        if let Err(s) = r {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        }
    }
    assert_eq!(second.len(), 1, "one freed slot, one admission: {wave:?}");
    for env in second.iter().filter_map(|r| r.as_ref().ok()) {
        assert_eq!(env.state(), EnvironmentState::Running, "{env:?}");
    }
    assert_eq!(team_containers(&team).await, QUOTA);
    assert_eq!(team_containers(&other_team).await, 1);
    report.inspected += 1;

    let after = rss(&cluster);
    check_rss(&mut report, &before, &after);
    report.note("concurrent creates", USERS * CREATES_PER_USER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_execs_and_log_streams_each_see_their_own_output() {
    const USERS: usize = 8;
    const EXECS_PER_USER: usize = 4;
    const LOG_LINES: usize = 15;
    let mut report = SuiteReport::new("load", "execs_and_logs_under_concurrency");
    let image = dev_image();
    let cluster = Cluster::builder()
        .arg(Service::Orchestrator, "--team-max-environments=20")
        .arg(Service::Gateway, "--rate-limit-per-second=1000")
        .arg(Service::Gateway, "--rate-limit-burst=1000")
        .start()
        .await;
    let team = cluster.team("load").await;
    let mut users = Vec::new();
    for u in 0..USERS {
        users.push(
            cluster
                .user(&format!("load-{u}"), &team, TeamRole::Developer)
                .await,
        );
    }
    let before = rss(&cluster);
    let started = Instant::now();

    // One environment per user, created at once (each waited for until it
    // runs); each prints its own mark.
    let creates = users.iter().enumerate().map(|(u, token)| {
        let mut envs = cluster.environments(token);
        let command =
            format!("i=0; while true; do echo \"mark-{u} line $i\"; i=$((i+1)); sleep 0.1; done");
        let request = CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: format!("load-{u}"),
            team_id: team.clone(),
            name: format!("load-{u}"),
            spec: Some(small_spec(&image, Some(command))),
        };
        async move { envs.create_settled(request).await }
    });
    let envs: Vec<String> = join_all(creates)
        .await
        .into_iter()
        .map(|r| {
            let env = r.expect("create");
            assert_eq!(env.state(), EnvironmentState::Running, "{env:?}");
            env.id
        })
        .collect();
    report.inspected += USERS as u64;

    // Every user at once: a followed log stream and several execs.
    let work = users
        .iter()
        .zip(&envs)
        .enumerate()
        .map(|(u, (token, env))| {
            let cluster = &cluster;
            async move {
                let logs = async {
                    let mut stream = cluster
                        .environments(token)
                        .stream_logs(StreamLogsRequest {
                            environment_id: env.clone(),
                            follow: true,
                            ..Default::default()
                        })
                        .await
                        .expect("logs")
                        .into_inner();
                    let mut text = String::new();
                    let own = format!("mark-{u} ");
                    while text.lines().filter(|l| l.starts_with(&own)).count() < LOG_LINES {
                        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.message())
                            .await
                            .expect("log output within 30 s")
                            .expect("log stream")
                            .expect("log stream open");
                        text.push_str(&String::from_utf8_lossy(&chunk.data));
                    }
                    for line in text.lines().filter(|l| !l.is_empty()) {
                        assert!(
                            line.starts_with(&own),
                            "user {u}'s log stream carried another line: {line:?}"
                        );
                    }
                };
                let execs = join_all((0..EXECS_PER_USER).map(|j| async move {
                    let token_text = format!("exec-{u}-{j}");
                    let script = format!("echo {token_text}; echo err-{token_text} >&2; exit {j}");
                    let out = cluster::exec(
                        &mut cluster.environments(token),
                        env,
                        &["sh", "-c", &script],
                    )
                    .await
                    .expect("exec");
                    assert_eq!(out.stdout.trim(), token_text, "{out:?}");
                    assert_eq!(out.stderr.trim(), format!("err-{token_text}"), "{out:?}");
                    assert_eq!(out.exit_code, j as i32, "{out:?}");
                }));
                tokio::join!(logs, execs);
            }
        });
    join_all(work).await;
    for _ in 0..USERS * (EXECS_PER_USER + 1) {
        report.case(false);
    }

    // Another user's environment is not theirs to exec in.
    let denied = cluster::exec(&mut cluster.environments(&users[1]), &envs[0], &["id"])
        .await
        .expect_err("exec in another user's environment");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    report.case(true);

    let deletes = users.iter().zip(&envs).map(|(token, env)| {
        let mut envs = cluster.environments(token);
        async move { envs.delete_settled(env).await }
    });
    for r in join_all(deletes).await {
        let env = r.expect("delete");
        assert_eq!(env.state(), EnvironmentState::Deleted);
        report.case(false);
    }
    assert_eq!(team_containers(&team).await, 0);

    let after = rss(&cluster);
    check_rss(&mut report, &before, &after);
    report.note(
        "operations",
        USERS * (2 + EXECS_PER_USER) + USERS, // creates, execs, deletes, log streams
    );
    report.note("seconds", started.elapsed().as_secs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rate_limiter_refuses_a_burst_and_spares_other_users() {
    const PER_SECOND: u64 = 2;
    const BURST: u64 = 20;
    const FLOOD: usize = 100;
    let mut report = SuiteReport::new("load", "per_user_rate_limit");
    let cluster = Cluster::builder()
        .arg(
            Service::Gateway,
            format!("--rate-limit-per-second={PER_SECOND}"),
        )
        .arg(Service::Gateway, format!("--rate-limit-burst={BURST}"))
        .start()
        .await;
    let team = cluster.team("rate").await;
    let greedy = cluster.user("greedy", &team, TeamRole::Developer).await;
    let polite = cluster.user("polite", &team, TeamRole::Developer).await;
    let before = rss(&cluster);
    let greedy_id = cluster
        .identity(&greedy)
        .who_am_i(WhoAmIRequest {})
        .await
        .expect("whoami")
        .into_inner()
        .user
        .expect("user")
        .id;
    // That call took a token from the bucket; wait for it to fill again.
    tokio::time::sleep(Duration::from_millis(1000 / PER_SECOND + 100)).await;

    // One user floods while another makes a few calls of its own.
    let started = Instant::now();
    let flood = join_all((0..FLOOD).map(|_| {
        let mut identity = cluster.identity(&greedy);
        async move { identity.who_am_i(WhoAmIRequest {}).await }
    }));
    let others = async {
        let mut identity = cluster.identity(&polite);
        let mut results = Vec::new();
        for _ in 0..10 {
            results.push(identity.who_am_i(WhoAmIRequest {}).await);
        }
        results
    };
    let (flooded, others) = tokio::join!(flood, others);
    let elapsed = started.elapsed();

    let mut ok = 0u64;
    for r in &flooded {
        match r {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert_eq!(s.message(), "rate limit exceeded, retry later");
            }
        }
        report.case(r.is_err());
    }
    // The bucket holds BURST and refills PER_SECOND: whatever the timing,
    // no more can have been served.
    let allowed = BURST + PER_SECOND * (elapsed.as_secs() + 1);
    assert!(
        ok <= allowed,
        "{ok} of {FLOOD} calls served in {elapsed:?}; at most {allowed} allowed"
    );
    assert!(ok >= 1, "the bucket's burst is served");
    for r in others {
        r.expect("another user is not limited by the flood");
        report.case(false);
    }
    report.note(
        "flood served/refused",
        format!("{ok}/{}", FLOOD as u64 - ok),
    );

    // The bucket refills: the flooding user is served again.
    tokio::time::sleep(Duration::from_millis(1000 / PER_SECOND + 200)).await;
    cluster
        .identity(&greedy)
        .who_am_i(WhoAmIRequest {})
        .await
        .expect("served again once the bucket refilled");
    report.case(false);

    // The refusals are audited (within the gateway's audit budget), and
    // only for the user who flooded.
    let admin = cluster.admin_token();
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        let events = cluster
            .audit(&admin)
            .query_events(QueryEventsRequest {
                filter: Some(EventFilter {
                    action: "access.rate_limited".into(),
                    ..Default::default()
                }),
                page_size: 500,
                page_token: String::new(),
            })
            .await
            .expect("query")
            .into_inner()
            .events;
        if !events.is_empty() || Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!events.is_empty(), "rate limiting is audited");
    for e in &events {
        let actor = e.actor.as_ref().map(|a| a.user_id.as_str()).unwrap_or("");
        assert_eq!(actor, greedy_id, "{e:?}");
    }

    let after = rss(&cluster);
    check_rss(&mut report, &before, &after);
}
