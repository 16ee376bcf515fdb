//! Idle stop, lifetimes and extensions against the real engine, with a short
//! clock: sweeps are run by the test (`Orchestrator::sweep`), so each step
//! is observed, and the store behind them is SQLite and PostgreSQL (when
//! configured); plus the in-place migration of a table an earlier version
//! created.

use std::time::{Duration, Instant};

use tonic::Code;
use vibebox_orchestrator::lifecycle::SweepReport;
use vibebox_orchestrator::store::{State, Store};
use vibebox_orchestrator::testkit::{self, Harness, hardened_spec};
use vibebox_proto::audit::AuditEvent;
use vibebox_proto::environment as pb;
use vibebox_proto::runtime::*;

use crate::common::{error_info, settled};

const TEAM: &str = "team-l";
/// The sweep interval the tests pretend to run at.
const INTERVAL: Duration = Duration::from_millis(300);

fn caller() -> Option<Caller> {
    Some(Caller {
        user_id: "user-l".into(),
        ..Default::default()
    })
}

fn lifetime(idle: u32, lifetime: u32, max: u32) -> pb::Lifetime {
    pb::Lifetime {
        idle_timeout_seconds: Some(idle),
        idle_cpu_percent: Some(5.0),
        lifetime_seconds: Some(lifetime),
        max_lifetime_seconds: Some(max),
    }
}

async fn create(h: &Harness, command: &[&str], l: pb::Lifetime) -> pb::Environment {
    let spec = pb::ContainerSpec {
        lifetime: Some(l),
        ..hardened_spec(command)
    };
    let env = uuid::Uuid::new_v4().to_string();
    let created = h
        .client()
        .create_environment(CreateEnvironmentRequest {
            labels: Default::default(),
            caller: caller(),
            request_id: env.clone(),
            environment_id: env.clone(),
            team_id: TEAM.into(),
            owner_id: "user-l".into(),
            name: "lifecycle".into(),
            spec: Some(spec.clone()),
            clearance: Some(testkit::clearance(
                &h.signer,
                &spec,
                &env,
                TEAM,
                Duration::from_secs(60),
            )),
            canonical_image: String::new(),
        })
        .await
        .expect("create")
        .into_inner()
        .environment
        .expect("environment");
    assert_eq!(created.state(), pb::EnvironmentState::Creating);
    let running = settled(&h.client(), &env).await;
    assert_eq!(running.state(), pb::EnvironmentState::Running);
    running
}

async fn get(h: &Harness, env: &str) -> pb::Environment {
    h.client()
        .get_environment(GetEnvironmentRequest {
            environment_id: env.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .environment
        .expect("environment")
}

async fn extend(h: &Harness, env: &str, secs: i64) -> Result<pb::Environment, tonic::Status> {
    h.client()
        .extend_environment(ExtendEnvironmentRequest {
            caller: caller(),
            request: Some(pb::ExtendEnvironmentRequest {
                environment_id: env.into(),
                duration: Some(prost_types::Duration {
                    seconds: secs,
                    nanos: 0,
                }),
            }),
        })
        .await
        .map(|r| r.into_inner().environment.expect("environment"))
}

/// Sweeps (every [`INTERVAL`]) until `done` holds for a report, for at most
/// `limit`; returns every report.
async fn sweep_until(
    h: &Harness,
    limit: Duration,
    done: impl Fn(&SweepReport) -> bool,
) -> Vec<SweepReport> {
    let deadline = Instant::now() + limit;
    let mut reports = Vec::new();
    loop {
        let report = h.orchestrator.sweep(INTERVAL).await.expect("sweep");
        let finished = done(&report);
        reports.push(report);
        if finished {
            return reports;
        }
        assert!(
            Instant::now() < deadline,
            "condition not reached within {limit:?}: {reports:?}"
        );
        tokio::time::sleep(INTERVAL).await;
    }
}

fn events(h: &Harness, action: &str, env: &str) -> Vec<AuditEvent> {
    h.orchestrator
        .audit()
        .recent()
        .into_iter()
        .filter(|e| e.action == action && e.resource_id == env)
        .collect()
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

fn volume_exists(env: &str) -> bool {
    std::process::Command::new("docker")
        .args(["volume", "inspect", &format!("vibebox-ws-{env}")])
        .output()
        .expect("docker volume inspect")
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_environments_stop_with_their_reason_unless_a_session_or_the_cpu_keeps_them() {
    for db in vibebox_db::testing::databases().await {
        idle_stop(&db.url).await;
    }
}

async fn idle_stop(database_url: &str) {
    let h = Harness::start(|c| c.database.url = Some(database_url.to_owned()))
        .await
        .unwrap();
    // Three environments with an idle timeout of one second: one idle, one
    // with an open session, one busy (a shell spinning; its CPU share is
    // 25%, far above 5%).
    let idle = create(&h, &["sleep", "3600"], lifetime(1, 0, 0)).await;
    let held = create(&h, &["sleep", "3600"], lifetime(1, 0, 0)).await;
    let busy = create(&h, &["sh", "-c", "while :; do :; done"], lifetime(1, 0, 0)).await;
    // No idle timeout: never looked at.
    let forever = create(&h, &["sleep", "3600"], lifetime(0, 0, 0)).await;
    assert!(idle.idle_stop_time.is_some(), "{idle:?}");
    assert!(idle.last_activity_time.is_some());
    assert!(idle.expire_time.is_none(), "no lifetime");
    assert!(forever.idle_stop_time.is_none());
    let session = h.orchestrator.session(&held.id);

    let mut reports = sweep_until(&h, Duration::from_secs(30), |r| {
        r.stopped.contains(&idle.id)
    })
    .await;
    // The busy one was past its deadline on those sweeps too; sweep on until
    // its CPU was judged (busy) at least once more.
    reports.extend(sweep_until(&h, Duration::from_secs(30), |r| r.busy.contains(&busy.id)).await);
    for r in &reports {
        assert!(!r.stopped.contains(&held.id), "{reports:?}");
        assert!(!r.stopped.contains(&busy.id), "{reports:?}");
        assert!(
            !r.sampled.contains(&held.id),
            "an open session is not even sampled"
        );
        assert!(!r.sampled.contains(&forever.id));
    }

    let stopped = get(&h, &idle.id).await;
    assert_eq!(stopped.state(), pb::EnvironmentState::Stopped);
    assert_eq!(
        stopped.stop_reason,
        "idle for 1s (no exec, port-forward or copy session, CPU below 5%)"
    );
    assert!(stopped.idle_stop_time.is_none(), "not running");
    let audited = events(&h, "environment.auto_stop", &idle.id);
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0].actor.as_ref().unwrap().service, "orchestrator");
    assert_eq!(detail(&audited[0], "reason"), stopped.stop_reason);
    assert!(volume_exists(&idle.id), "the workspace is kept");
    for env in [&held, &busy, &forever] {
        assert_eq!(
            get(&h, &env.id).await.state(),
            pb::EnvironmentState::Running
        );
    }

    // Started again: the reason is gone and the idle clock starts over.
    let started = h
        .client()
        .start_environment(StartEnvironmentRequest {
            caller: caller(),
            environment_id: idle.id.clone(),
        })
        .await
        .expect("start")
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(started.state(), pb::EnvironmentState::Starting);
    let started = settled(&h.client(), &idle.id).await;
    assert_eq!(started.state(), pb::EnvironmentState::Running);
    assert_eq!(started.stop_reason, "");
    assert!(
        started.last_activity_time.unwrap().seconds >= stopped.update_time.unwrap().seconds,
        "a start is activity"
    );

    // The session ends: the held environment goes idle in its turn, with
    // the end of the session as its last activity.
    drop(session);
    sweep_until(&h, Duration::from_secs(30), |r| {
        r.stopped.contains(&held.id)
    })
    .await;
    let held = get(&h, &held.id).await;
    assert_eq!(held.state(), pb::EnvironmentState::Stopped);
    assert!(held.stop_reason.starts_with("idle for 1s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_exec_is_a_session() {
    let h = Harness::start(|_| {}).await.unwrap();
    let env = create(&h, &["sleep", "3600"], lifetime(1, 0, 0)).await;
    // An exec that lasts (stdin kept open, `cat` waits on it).
    let (tx, rx) = tokio::sync::mpsc::channel::<ExecRequest>(4);
    tx.send(ExecRequest {
        caller: caller(),
        request: Some(pb::ExecRequest {
            message: Some(pb::exec_request::Message::Start(pb::ExecStart {
                environment_id: env.id.clone(),
                command: vec!["cat".into()],
                stdin: true,
                ..Default::default()
            })),
        }),
    })
    .await
    .unwrap();
    let mut out = h
        .client()
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("exec")
        .into_inner();
    // Open once the orchestrator counts it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.orchestrator.open_sessions(&env.id) == 0 {
        assert!(Instant::now() < deadline, "the exec never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Well past the timeout, sweeps leave it running.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..4 {
        let r = h.orchestrator.sweep(INTERVAL).await.unwrap();
        assert!(!r.stopped.contains(&env.id), "{r:?}");
        assert!(!r.sampled.contains(&env.id), "not even a candidate: {r:?}");
        tokio::time::sleep(INTERVAL).await;
    }
    assert_eq!(
        get(&h, &env.id).await.state(),
        pb::EnvironmentState::Running
    );
    // The exec ends (stdin closed): the session with it.
    tx.send(ExecRequest {
        caller: None,
        request: Some(pb::ExecRequest {
            message: Some(pb::exec_request::Message::CloseStdin(true)),
        }),
    })
    .await
    .unwrap();
    while out.message().await.expect("exec stream").is_some() {}
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.orchestrator.open_sessions(&env.id) > 0 {
        assert!(Instant::now() < deadline, "the exec session never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sweep_until(&h, Duration::from_secs(30), |r| r.stopped.contains(&env.id)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetimes_expire_into_a_delete_and_extensions_stay_within_the_maximum() {
    for db in vibebox_db::testing::databases().await {
        lifetimes(&db.url).await;
    }
}

async fn lifetimes(database_url: &str) {
    let h = Harness::start(|c| c.database.url = Some(database_url.to_owned()))
        .await
        .unwrap();
    // Expires one second after its creation.
    let short = create(&h, &["sleep", "3600"], lifetime(0, 1, 3600)).await;
    let expire = short.expire_time.expect("expire time");
    let created = short.create_time.unwrap();
    assert_eq!(expire.seconds - created.seconds, 1, "{short:?}");
    sweep_until(&h, Duration::from_secs(30), |r| {
        r.expired.contains(&short.id)
    })
    .await;
    let gone = get(&h, &short.id).await;
    assert_eq!(gone.state(), pb::EnvironmentState::Deleted);
    assert_eq!(gone.stop_reason, "lifetime of 1s reached");
    let expired = events(&h, "environment.expire", &short.id);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].actor.as_ref().unwrap().service, "orchestrator");
    assert_eq!(detail(&expired[0], "reason"), "lifetime of 1s reached");
    let deleted = events(&h, "environment.delete", &short.id);
    assert_eq!(deleted.len(), 1, "the delete path of DeleteEnvironment");
    assert_eq!(detail(&deleted[0], "reason"), "lifetime of 1s reached");
    let left: Vec<String> = h
        .objects()
        .into_iter()
        .filter(|o| o.contains(&short.id))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // An hour to live, at most two: an extension pushes the expiry and the
    // idle stop, never past the maximum.
    let env = create(&h, &["sleep", "3600"], lifetime(600, 3600, 7200)).await;
    let expire = env.expire_time.unwrap().seconds;
    let extended = extend(&h, &env.id, 5400).await.expect("extend by 90m");
    let now = chrono::Utc::now().timestamp();
    let new_expire = extended.expire_time.unwrap().seconds;
    assert!(new_expire > expire, "{extended:?}");
    assert!((new_expire - (now + 5400)).abs() <= 5, "{extended:?}");
    let stop = extended.idle_stop_time.unwrap().seconds;
    assert!(
        (stop - (now + 5400 + 600)).abs() <= 5,
        "kept alive for 90m, then the idle timeout: {extended:?}"
    );
    let audited = events(&h, "environment.extend", &env.id);
    assert_eq!(audited.len(), 1);
    assert_eq!(audited[0].actor.as_ref().unwrap().user_id, "user-l");
    assert_eq!(detail(&audited[0], "duration"), "1h30m0s");

    // A shorter extension never pulls the expiry in.
    let again = extend(&h, &env.id, 60).await.expect("extend by 1m");
    assert_eq!(again.expire_time.unwrap().seconds, new_expire);

    // Past the maximum (creation + 2h): refused, naming the rule, nothing
    // changed.
    let refused = extend(&h, &env.id, 3 * 3600).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        vibebox_server_kit::status::violated_rules(&refused),
        ["lifetime.max_lifetime"]
    );
    let latest = chrono::DateTime::from_timestamp(env.create_time.unwrap().seconds + 7200, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert!(refused.message().contains(&latest), "{refused:?}");
    assert_eq!(
        get(&h, &env.id).await.expire_time.unwrap().seconds,
        new_expire
    );

    // Out of range: refused, naming the field.
    for secs in [59, 7 * 24 * 3600 + 1, -5] {
        let refused = extend(&h, &env.id, secs).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{secs}: {refused:?}");
        assert!(refused.message().contains("duration"), "{refused:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_survive_a_restart_and_are_applied_by_the_first_sweep() {
    let db = vibebox_db::testing::sqlite();
    let h = Harness::start(|c| c.database.url = Some(db.url.clone()))
        .await
        .unwrap();
    let env = create(&h, &["sleep", "3600"], lifetime(0, 1, 0)).await;
    // "Down" past its expiry: a second orchestrator on the same database
    // and installation (the first one never sweeps) applies it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let installation = h.installation.clone();
    let labels = h.config.docker_labels.clone();
    let second = Harness::start(|c| {
        c.database.url = Some(db.url.clone());
        c.installation_id = Some(installation);
        c.docker_labels = labels;
    })
    .await
    .unwrap();
    let report = second.orchestrator.sweep(INTERVAL).await.unwrap();
    assert_eq!(report.expired, vec![env.id.clone()], "{report:?}");
    assert_eq!(
        second.orchestrator.get(&env.id).await.unwrap().state,
        State::Deleted
    );
}

/// The environments table as the version before idle stop created it.
const OLD_TABLE: &str = "CREATE TABLE orchestrator_environments (
    id varchar NOT NULL PRIMARY KEY, installation_id varchar NOT NULL,
    team_id varchar NOT NULL, owner_id varchar NOT NULL, name varchar NOT NULL,
    request_id varchar NOT NULL, state varchar NOT NULL, spec BYTES NOT NULL,
    canonical_image varchar NOT NULL, policy_digest varchar NOT NULL,
    policy_version varchar NOT NULL, clearance_id varchar NOT NULL,
    subnet varchar NULL, container_id varchar NULL, nano_cpus bigint NOT NULL,
    memory_bytes bigint NOT NULL, failure_reason varchar NOT NULL,
    status_message varchar NOT NULL, create_time_ms bigint NOT NULL,
    update_time_ms bigint NOT NULL)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_an_earlier_version_created_gains_the_lifecycle_columns() {
    use sea_orm::ConnectionTrait;
    for db in vibebox_db::testing::databases().await {
        let conn = db.connect().await;
        let bytes = match conn.get_database_backend() {
            sea_orm::DbBackend::Postgres => "bytea",
            _ => "blob",
        };
        conn.execute_unprepared(&OLD_TABLE.replace("BYTES", bytes))
            .await
            .unwrap();
        conn.execute_unprepared(
            "INSERT INTO orchestrator_environments VALUES ('e1', 'i', 't', 'o', 'n', 'r', \
             'stopped', '', 'img', 'd', 'v', 'c', NULL, NULL, 1, 2, '', '', 1000, 2000)",
        )
        .await
        .unwrap();
        drop(conn);
        // Opened twice: the second open finds the columns there.
        for round in 0..2 {
            let store = Store::open(&db.url).await.expect("migrated");
            let rec = store.get("e1").await.unwrap().expect("the old row");
            assert_eq!(rec.state, State::Stopped);
            assert_eq!(rec.stop_reason, "");
            // Long-running operations: a settled row shows no operation.
            assert_eq!(rec.progress_percent, 100);
            assert_eq!(rec.operation, "");
            assert_eq!(rec.operation_id, "");
            if round == 0 {
                assert_eq!(rec.last_activity_ms, None);
            }
            assert_eq!(rec.expire_at_ms, None);
            store.set_stop_reason("e1", "why").await.unwrap();
            store
                .record_activity(&["e1".to_owned()], 5000)
                .await
                .unwrap();
            store
                .record_activity(&["e1".to_owned()], 4000)
                .await
                .unwrap();
            let rec = store.get("e1").await.unwrap().unwrap();
            assert_eq!(rec.stop_reason, "why");
            assert_eq!(rec.last_activity_ms, Some(5000), "never moved back");
            store.set_stop_reason("e1", "").await.unwrap();
        }
    }
}

/// Activity is a change of the record (`last_activity_time`,
/// `idle_stop_time`): it moves the update time, which a resumed watch
/// replays from; activity that moves nothing leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_activity_moves_the_update_time_and_is_announced() {
    use sea_orm::ConnectionTrait;
    for db in vibebox_db::testing::databases().await {
        let conn = db.connect().await;
        let bytes = match conn.get_database_backend() {
            sea_orm::DbBackend::Postgres => "bytea",
            _ => "blob",
        };
        conn.execute_unprepared(&OLD_TABLE.replace("BYTES", bytes))
            .await
            .unwrap();
        conn.execute_unprepared(
            "INSERT INTO orchestrator_environments VALUES ('e1', 'i', 't', 'o', 'n', 'r', \
             'running', '', 'img', 'd', 'v', 'c', NULL, NULL, 1, 2, '', '', 1000, 2000)",
        )
        .await
        .unwrap();
        drop(conn);
        let store = Store::open(&db.url).await.expect("migrated");
        let mut announced = store.changes().subscribe().receiver;
        let before = vibebox_orchestrator::store::now_ms();
        let ids = ["e1".to_owned()];
        assert_eq!(store.record_activity(&ids, 5000).await.unwrap(), 1);
        let rec = store.get("e1").await.unwrap().unwrap();
        assert_eq!(rec.last_activity_ms, Some(5000));
        assert!(
            rec.update_time_ms >= before,
            "the update time moved from 2000 to now ({before}): {}",
            rec.update_time_ms
        );
        assert_eq!(announced.try_recv().unwrap().1, "e1");
        // Older activity changes nothing: neither the record nor its time.
        let stamped = rec.update_time_ms;
        assert_eq!(store.record_activity(&ids, 4000).await.unwrap(), 0);
        let rec = store.get("e1").await.unwrap().unwrap();
        assert_eq!(
            (rec.last_activity_ms, rec.update_time_ms),
            (Some(5000), stamped)
        );
        assert!(announced.try_recv().is_err(), "nothing to announce");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extension_keeps_an_environment_from_idling_at_most_a_day_ahead() {
    for db in vibebox_db::testing::databases().await {
        keep_alive_cap(&db.url).await;
    }
}

async fn keep_alive_cap(database_url: &str) {
    const DAY: i64 = 24 * 3600;
    let h = Harness::start(|c| c.database.url = Some(database_url.to_owned()))
        .await
        .unwrap();
    // The built-in default: idle stop, no lifetime, no maximum lifetime.
    // A week asked for: granted, with the keep-alive cut to a day, so the
    // idle stop comes a day and the idle timeout from now (not a week).
    let env = create(&h, &["sleep", "3600"], lifetime(600, 0, 0)).await;
    let now = chrono::Utc::now().timestamp();
    let extended = extend(&h, &env.id, 7 * DAY)
        .await
        .expect("extend by a week");
    let stop = extended.idle_stop_time.unwrap().seconds;
    assert!(
        (stop - (now + DAY + 600)).abs() <= 5,
        "kept alive a day, then the idle timeout: {extended:?}"
    );
    assert!(extended.expire_time.is_none(), "{extended:?}");
    // What the answer says is what is stored.
    let stored = get(&h, &env.id).await;
    assert_eq!(stored.idle_stop_time, extended.idle_stop_time);
    let audited = events(&h, "environment.extend", &env.id);
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(detail(&audited[0], "duration"), "168h0m0s");
    assert_eq!(detail(&audited[0], "keep_alive_capped"), "24h0m0s");
    assert_eq!(detail(&audited[0], "expire_time"), "never");
    let until = chrono::DateTime::parse_from_rfc3339(&detail(&audited[0], "keep_alive_until"))
        .expect("keep_alive_until is RFC 3339")
        .timestamp();
    assert!((until - (now + DAY)).abs() <= 5, "{until} vs {now}");

    // Extending again (a week, again) moves it no further than a day from
    // now; a shorter one never pulls it in and is not capped.
    let again = extend(&h, &env.id, 7 * DAY).await.expect("again");
    assert!(again.idle_stop_time.unwrap().seconds - (now + DAY + 600) <= 5);
    let short = extend(&h, &env.id, 3600).await.expect("an hour");
    assert_eq!(short.idle_stop_time, again.idle_stop_time);
    let audited = events(&h, "environment.extend", &env.id);
    let last = audited
        .iter()
        .find(|e| detail(e, "duration") == "1h0m0s")
        .expect("the hour's event");
    assert!(
        !last
            .details
            .as_ref()
            .is_some_and(|d| d.fields.contains_key("keep_alive_capped")),
        "{last:?}"
    );

    // With a lifetime and no maximum: the expiry part moves as far as
    // asked, the keep-alive part a day.
    let lives = create(&h, &["sleep", "3600"], lifetime(600, 3600, 0)).await;
    let now = chrono::Utc::now().timestamp();
    let extended = extend(&h, &lives.id, 3 * DAY).await.expect("three days");
    let expire = extended.expire_time.unwrap().seconds;
    assert!((expire - (now + 3 * DAY)).abs() <= 5, "{extended:?}");
    let stop = extended.idle_stop_time.unwrap().seconds;
    assert!((stop - (now + DAY + 600)).abs() <= 5, "{extended:?}");
}

/// Runs `command` through the runtime's Exec: the refusal, if any.
async fn exec_status(h: &Harness, env: &str, command: &[&str]) -> Result<(), tonic::Status> {
    let start = ExecRequest {
        caller: caller(),
        request: Some(pb::ExecRequest {
            message: Some(pb::exec_request::Message::Start(pb::ExecStart {
                environment_id: env.into(),
                command: command.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            })),
        }),
    };
    let mut out = h
        .client()
        .exec(tokio_stream::iter(vec![start]))
        .await?
        .into_inner();
    while out.message().await?.is_some() {}
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_port_forward_are_refused_while_an_automatic_stop_is_under_way() {
    let h = Harness::start(|_| {}).await.unwrap();
    let env = create(&h, &["sleep", "3600"], lifetime(1, 0, 0)).await;
    exec_status(&h, &env.id, &["true"])
        .await
        .expect("exec runs");

    // With a session open, no automatic stop is decided.
    let session = h.orchestrator.session(&env.id);
    assert!(h.orchestrator.hold_stopping(&env.id).is_none());
    drop(session);

    // Once one is decided (as the sweeper decides it), a new exec or
    // port-forward is refused, not opened and then cut by the stop.
    let held = h
        .orchestrator
        .hold_stopping(&env.id)
        .expect("no session open");
    let refused = exec_status(&h, &env.id, &["true"]).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        refused.message(),
        "environment is stopping (auto_stop in progress); cannot exec"
    );
    let (reason, metadata) = error_info(&refused);
    assert_eq!(reason, "environment.operation_in_progress");
    assert_eq!(metadata["operation"], "auto_stop");
    assert_eq!(metadata["requested"], "exec");
    let start = PortForwardRequest {
        caller: caller(),
        request: Some(pb::PortForwardRequest {
            message: Some(pb::port_forward_request::Message::Start(
                pb::PortForwardStart {
                    environment_id: env.id.clone(),
                    port: 8080,
                },
            )),
        }),
    };
    let refused = h
        .client()
        .port_forward(tokio_stream::iter(vec![start]))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        refused.message(),
        "environment is stopping (auto_stop in progress); cannot port-forward"
    );
    assert_eq!(h.orchestrator.open_sessions(&env.id), 0, "nothing counted");

    // The stop given up (or done): sessions open again.
    drop(held);
    exec_status(&h, &env.id, &["true"])
        .await
        .expect("exec runs again");
}
