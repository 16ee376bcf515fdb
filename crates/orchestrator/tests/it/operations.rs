//! Long-running operations against the real engine: create, start, stop,
//! restart and delete answer with the transitional state at once and settle
//! in the background (the engine is held back by the test where a step must
//! be seen in progress); another operation meanwhile is refused with its
//! reason; a delete during a create runs right after it; a crash in a stop
//! or a start is finished by reconcile; refusals carry their google.rpc
//! details.

use std::time::Duration;

use futures::StreamExt;
use tonic::Code;
use tonic_types::StatusExt;
use vibebox_orchestrator::CrashPoint;
use vibebox_orchestrator::store::State;
use vibebox_orchestrator::testkit::{self, Harness, hardened_spec};
use vibebox_proto::audit::{AuditEvent, Outcome};
use vibebox_proto::environment::{self as pb, EnvironmentState};
use vibebox_proto::runtime::*;

use crate::common::{HeldEngine, error_info, get, settled, wait_for};

const TEAM: &str = "team-o";

fn caller() -> Option<Caller> {
    Some(Caller {
        user_id: "user-o".into(),
        ..Default::default()
    })
}

fn create_req(h: &Harness, env: &str, request_id: &str) -> CreateEnvironmentRequest {
    let spec = hardened_spec(&["sleep", "3600"]);
    CreateEnvironmentRequest {
        caller: caller(),
        request_id: request_id.into(),
        environment_id: env.into(),
        team_id: TEAM.into(),
        owner_id: "user-o".into(),
        name: "ops".into(),
        clearance: Some(testkit::clearance(
            &h.signer,
            &spec,
            env,
            TEAM,
            Duration::from_secs(60),
        )),
        spec: Some(spec),
        ..Default::default()
    }
}

/// Asks for a create; the answer (the environment as accepted).
async fn create(h: &Harness, env: &str) -> pb::Environment {
    h.client()
        .create_environment(create_req(h, env, env))
        .await
        .expect("create")
        .into_inner()
        .environment
        .expect("environment")
}

async fn start(h: &Harness, env: &str) -> Result<pb::Environment, tonic::Status> {
    h.client()
        .start_environment(StartEnvironmentRequest {
            caller: caller(),
            environment_id: env.into(),
        })
        .await
        .map(|r| r.into_inner().environment.expect("environment"))
}

async fn stop(h: &Harness, env: &str) -> Result<pb::Environment, tonic::Status> {
    h.client()
        .stop_environment(StopEnvironmentRequest {
            caller: caller(),
            environment_id: env.into(),
            timeout_seconds: Some(1),
        })
        .await
        .map(|r| r.into_inner().environment.expect("environment"))
}

async fn restart(h: &Harness, env: &str) -> Result<pb::Environment, tonic::Status> {
    h.client()
        .restart_environment(RestartEnvironmentRequest {
            caller: caller(),
            environment_id: env.into(),
            timeout_seconds: Some(1),
        })
        .await
        .map(|r| r.into_inner().environment.expect("environment"))
}

async fn delete(h: &Harness, env: &str) -> pb::Environment {
    h.client()
        .delete_environment(DeleteEnvironmentRequest {
            caller: caller(),
            environment_id: env.into(),
        })
        .await
        .expect("delete")
        .into_inner()
        .environment
        .expect("environment")
}

/// The refusal of an exec in `env`.
async fn exec_refusal(h: &Harness, env: &str) -> tonic::Status {
    let start = ExecRequest {
        caller: caller(),
        request: Some(pb::ExecRequest {
            message: Some(pb::exec_request::Message::Start(pb::ExecStart {
                environment_id: env.into(),
                command: vec!["true".into()],
                ..Default::default()
            })),
        }),
    };
    match h.client().exec(tokio_stream::iter(vec![start])).await {
        Err(status) => status,
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                match stream.next().await {
                    Some(Err(status)) => return status,
                    Some(Ok(_)) => {}
                    None => panic!("the exec in {env} was not refused"),
                }
            }
        }
    }
}

/// Asserts `status` refuses `requested` because `operation` is in progress
/// in `state`.
fn assert_in_progress(status: &tonic::Status, state: &str, operation: &str, requested: &str) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let (reason, metadata) = error_info(status);
    assert_eq!(reason, "environment.operation_in_progress", "{status:?}");
    assert_eq!(metadata["state"], state, "{status:?}");
    assert_eq!(metadata["operation"], operation, "{status:?}");
    assert_eq!(metadata["requested"], requested, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("environment is {state} ({operation} in progress)")),
        "{status:?}"
    );
}

/// The container of `env` as `docker inspect` shows it (`None`: there is
/// none).
fn inspect(env: &str) -> Option<serde_json::Value> {
    let out = std::process::Command::new("docker")
        .args(["container", "inspect", &format!("vibebox-{env}")])
        .output()
        .expect("docker inspect");
    out.status
        .success()
        .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")[0].clone())
}

fn running(env: &str) -> bool {
    inspect(env).expect("the container exists")["State"]["Running"] == true
}

fn events(h: &Harness, action: &str, env: &str) -> Vec<AuditEvent> {
    h.orchestrator
        .audit()
        .recent()
        .into_iter()
        .filter(|e| e.action == action && e.resource_id == env)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answers_creating_before_the_container_exists_then_settles_running() {
    let engine = HeldEngine::start().await;
    let h = Harness::start(|c| c.docker = engine.endpoint())
        .await
        .unwrap();
    let env = uuid::Uuid::new_v4().to_string();
    engine.hold(&format!("containers/create?name=vibebox-{env}"));

    let accepted = create(&h, &env).await;
    assert_eq!(accepted.state(), EnvironmentState::Creating);
    assert_eq!(accepted.status_message, "admitted");
    assert_eq!(accepted.progress_percent, 5);

    // The engine has the container's create and holds it: the network is
    // there, the container is not, and the progress says where it is.
    engine.wait_held().await;
    let creating = get(&h.client(), &env).await;
    assert_eq!(creating.state(), EnvironmentState::Creating);
    assert_eq!(creating.status_message, "creating the container");
    assert_eq!(creating.progress_percent, 80);
    assert!(inspect(&env).is_none(), "no container yet");
    assert!(
        h.objects().contains(&format!("network:vibebox-{env}")),
        "{:?}",
        h.objects()
    );

    // Nothing else is asked of it meanwhile, and no exec gets in.
    assert_in_progress(
        &start(&h, &env).await.unwrap_err(),
        "creating",
        "create",
        "start",
    );
    assert_in_progress(
        &stop(&h, &env).await.unwrap_err(),
        "creating",
        "create",
        "stop",
    );
    assert_in_progress(&exec_refusal(&h, &env).await, "creating", "create", "exec");
    // A retry of the same request is answered with what it created.
    let retried = h
        .client()
        .create_environment(create_req(&h, &env, &env))
        .await
        .unwrap()
        .into_inner()
        .environment
        .unwrap();
    assert_eq!(retried.state(), EnvironmentState::Creating);

    engine.release();
    let done = settled(&h.client(), &env).await;
    assert_eq!(done.state(), EnvironmentState::Running, "{done:?}");
    assert_eq!(done.status_message, "");
    assert_eq!(done.failure_reason, "");
    assert!(running(&env), "the container runs");
    let created = events(&h, "environment.create", &env);
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].outcome, Outcome::Success as i32);
    assert_eq!(created[0].actor.as_ref().unwrap().user_id, "user-o");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_answers_stopping_and_settles_stopped_and_refuses_what_conflicts() {
    let engine = HeldEngine::start().await;
    let h = Harness::start(|c| c.docker = engine.endpoint())
        .await
        .unwrap();
    let env = uuid::Uuid::new_v4().to_string();
    create(&h, &env).await;
    assert_eq!(
        settled(&h.client(), &env).await.state(),
        EnvironmentState::Running
    );

    // A start of a running environment is a bad state, said so.
    let refused = start(&h, &env).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let (reason, metadata) = error_info(&refused);
    assert_eq!(reason, "environment.bad_state");
    assert_eq!(metadata["state"], "running");
    assert_eq!(metadata["operation"], "start");

    // The engine holds the stop: the environment shows it in progress.
    let cid = inspect(&env).unwrap()["Id"].as_str().unwrap().to_owned();
    engine.hold(&format!("/containers/{cid}/stop"));
    let stopping = stop(&h, &env).await.unwrap();
    assert_eq!(stopping.state(), EnvironmentState::Stopping);
    assert_eq!(stopping.progress_percent, 5);
    engine.wait_held().await;
    let seen = wait_for(&h.client(), &env, "the stop step", |e| {
        e.status_message == "stopping the container"
    })
    .await;
    assert_eq!(seen.state(), EnvironmentState::Stopping);
    assert_eq!(seen.progress_percent, 30);
    assert!(running(&env), "not stopped yet");
    assert_in_progress(
        &start(&h, &env).await.unwrap_err(),
        "stopping",
        "stop",
        "start",
    );
    assert_in_progress(
        &restart(&h, &env).await.unwrap_err(),
        "stopping",
        "stop",
        "restart",
    );
    assert_in_progress(
        &stop(&h, &env).await.unwrap_err(),
        "stopping",
        "stop",
        "stop",
    );
    assert_in_progress(&exec_refusal(&h, &env).await, "stopping", "stop", "exec");
    // The refusals are audited, as they always were; nothing else is yet.
    assert!(
        events(&h, "environment.stop", &env)
            .iter()
            .all(|e| e.outcome == Outcome::Failure as i32)
    );

    engine.release();
    let stopped = settled(&h.client(), &env).await;
    assert_eq!(stopped.state(), EnvironmentState::Stopped, "{stopped:?}");
    assert!(!running(&env));
    let stops: Vec<_> = events(&h, "environment.stop", &env)
        .into_iter()
        .filter(|e| e.outcome == Outcome::Success as i32)
        .collect();
    assert_eq!(stops.len(), 1, "{stops:?}");

    // Start, then restart (stopping, then starting): each settles.
    assert_eq!(
        start(&h, &env).await.unwrap().state(),
        EnvironmentState::Starting
    );
    assert_eq!(
        settled(&h.client(), &env).await.state(),
        EnvironmentState::Running
    );
    assert!(running(&env));
    assert_eq!(
        restart(&h, &env).await.unwrap().state(),
        EnvironmentState::Stopping
    );
    assert_eq!(
        settled(&h.client(), &env).await.state(),
        EnvironmentState::Running
    );
    assert!(running(&env));
    let restarts: Vec<_> = events(&h, "environment.restart", &env)
        .into_iter()
        .filter(|e| e.outcome == Outcome::Success as i32)
        .collect();
    assert_eq!(
        restarts.len(),
        1,
        "the refusal before is a failure: {restarts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_a_create_runs_right_after_it() {
    let engine = HeldEngine::start().await;
    let h = Harness::start(|c| c.docker = engine.endpoint())
        .await
        .unwrap();
    let env = uuid::Uuid::new_v4().to_string();
    engine.hold(&format!("containers/create?name=vibebox-{env}"));
    create(&h, &env).await;
    engine.wait_held().await;

    // Accepted at once, durable, while the create still holds the
    // environment; asked again, answered the same.
    let deleting = delete(&h, &env).await;
    assert_eq!(deleting.state(), EnvironmentState::Deleting);
    assert_eq!(delete(&h, &env).await.state(), EnvironmentState::Deleting);
    assert_eq!(
        h.orchestrator.get(&env).await.unwrap().state,
        State::Deleting
    );
    // Nothing but the delete may happen now.
    assert_in_progress(
        &start(&h, &env).await.unwrap_err(),
        "deleting",
        "delete",
        "start",
    );

    engine.release();
    let deleted = settled(&h.client(), &env).await;
    assert_eq!(deleted.state(), EnvironmentState::Deleted, "{deleted:?}");
    assert!(h.objects().is_empty(), "left behind: {:?}", h.objects());
    assert_eq!(h.orchestrator.get(&env).await.unwrap().subnet, None);
    // The create gave way (audited as such), the delete is recorded once.
    let created = events(&h, "environment.create", &env);
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].outcome, Outcome::Failure as i32);
    let deletes = events(&h, "environment.delete", &env);
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert_eq!(deletes[0].outcome, Outcome::Success as i32);
    assert_eq!(deletes[0].actor.as_ref().unwrap().user_id, "user-o");
    // Deleted is final; a delete of it answers with it.
    assert_eq!(delete(&h, &env).await.state(), EnvironmentState::Deleted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_a_stop_or_a_start_is_finished_by_reconcile_after_a_restart() {
    let h = Harness::start(|_| {}).await.unwrap();
    let env = uuid::Uuid::new_v4().to_string();
    create(&h, &env).await;
    settled(&h.client(), &env).await;
    let restarted = || {
        Harness::start_with_pki(h.pki.clone(), |c| {
            c.installation_id = Some(h.installation.clone());
            c.database.url = h.config.database.url.clone();
            c.docker_labels = h.config.docker_labels.clone();
        })
    };

    // Crashes after the engine stopped the container: `stopping` stays.
    h.orchestrator.set_crash_point(Some(CrashPoint::AfterStop));
    assert_eq!(
        stop(&h, &env).await.unwrap().state(),
        EnvironmentState::Stopping
    );
    h.orchestrator.wait_operation(&env).await;
    let left = h.orchestrator.get(&env).await.unwrap();
    assert_eq!(
        (left.state, left.operation.as_str()),
        (State::Stopping, "stop")
    );
    assert!(!running(&env));
    assert!(
        events(&h, "environment.stop", &env).is_empty(),
        "nothing recorded before the crash"
    );

    // A restarted orchestrator finishes it, and audits it once.
    let second = restarted().await.unwrap();
    let report = second.orchestrator.reconcile().await.unwrap();
    assert_eq!(report.operations_finished, vec![env.clone()], "{report:?}");
    let stopped = get(&second.client(), &env).await;
    assert_eq!(stopped.state(), EnvironmentState::Stopped);
    assert_eq!(stopped.progress_percent, 100);
    assert!(!running(&env));
    let stops = events(&second, "environment.stop", &env);
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!(stops[0].outcome, Outcome::Success as i32);
    assert_eq!(stops[0].actor.as_ref().unwrap().service, "orchestrator");
    // Another pass has nothing left to do.
    let report = second.orchestrator.reconcile().await.unwrap();
    assert!(report.operations_finished.is_empty(), "{report:?}");
    // (Every harness lives to the end: dropping one removes what its
    // installation labelled, which all of them share.)

    // Crashes after the engine started it: `starting` stays.
    h.orchestrator.set_crash_point(Some(CrashPoint::AfterStart));
    assert_eq!(
        start(&h, &env).await.unwrap().state(),
        EnvironmentState::Starting
    );
    h.orchestrator.wait_operation(&env).await;
    assert_eq!(
        h.orchestrator.get(&env).await.unwrap().state,
        State::Starting
    );
    assert!(running(&env));
    h.orchestrator.set_crash_point(None);
    let third = restarted().await.unwrap();
    let report = third.orchestrator.reconcile().await.unwrap();
    assert_eq!(report.operations_finished, vec![env.clone()], "{report:?}");
    let started = get(&third.client(), &env).await;
    assert_eq!(started.state(), EnvironmentState::Running);
    assert!(running(&env));
    assert_eq!(events(&third, "environment.start", &env).len(), 1);

    // Crashes in the stop half of a restart: reconcile finishes the restart.
    h.orchestrator.set_crash_point(Some(CrashPoint::AfterStop));
    assert_eq!(
        restart(&h, &env).await.unwrap().state(),
        EnvironmentState::Stopping
    );
    h.orchestrator.wait_operation(&env).await;
    h.orchestrator.set_crash_point(None);
    let report = third.orchestrator.reconcile().await.unwrap();
    assert_eq!(report.operations_finished, vec![env.clone()], "{report:?}");
    assert_eq!(
        get(&third.client(), &env).await.state(),
        EnvironmentState::Running
    );
    assert!(running(&env));
    let restarts = events(&third, "environment.restart", &env);
    assert_eq!(restarts.len(), 1, "{restarts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_and_id_refusals_carry_their_details() {
    // Room for one environment of 64 MiB, not two.
    let h = Harness::start(|c| c.team_max_memory_mb = 100)
        .await
        .unwrap();
    let env = uuid::Uuid::new_v4().to_string();
    create(&h, &env).await;

    let other = uuid::Uuid::new_v4().to_string();
    let refused = h
        .client()
        .create_environment(create_req(&h, &other, &other))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let quota = refused.get_details_quota_failure().expect("a QuotaFailure");
    assert_eq!(quota.violations.len(), 1);
    assert_eq!(quota.violations[0].subject, format!("team:{TEAM}"));
    assert_eq!(
        quota.violations[0].description,
        "team memory quota: 64 MiB reserved of 100 MiB, 64 MiB more requested"
    );
    assert!(
        refused.get_details_retry_info().is_none(),
        "not a rate limit"
    );
    let (reason, metadata) = error_info(&refused);
    assert_eq!(reason, "environment.quota_exceeded");
    assert_eq!(metadata["quota"], "memory");
    assert_eq!(metadata["unit"], "MiB");
    assert_eq!(metadata["limit"], "100");
    assert_eq!(metadata["reserved"], "64");
    assert_eq!(metadata["requested"], "64");
    assert!(
        h.client()
            .get_environment(GetEnvironmentRequest {
                environment_id: other.clone(),
            })
            .await
            .is_err_and(|s| s.code() == Code::NotFound),
        "nothing recorded"
    );

    // The same id again under another request: taken.
    let taken = h
        .client()
        .create_environment(create_req(&h, &env, "another-request"))
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    let (reason, metadata) = error_info(&taken);
    assert_eq!(reason, "environment.id_taken");
    assert_eq!(metadata["environment_id"], env);
    settled(&h.client(), &env).await;
}
