//! In-place updates against the real engine, through the RuntimeService: new
//! limits reach the live container (`docker update`) and become the spec
//! reconcile compares it with (no drift); an update interrupted between the
//! engine and its commit is rolled back by reconcile (the old limits back on
//! the container, audited once), never quarantined as drift.

use std::collections::BTreeMap;
use std::time::Duration;

use bollard::query_parameters::InspectContainerOptions;
use vibebox_orchestrator::CrashPoint;
use vibebox_orchestrator::store::State;
use vibebox_orchestrator::testkit::{self, Harness, hardened_spec};
use vibebox_proto::audit::Outcome;
use vibebox_proto::environment::ContainerSpec;
use vibebox_proto::runtime::*;

use crate::common::settled;

const TEAM: &str = "team-u";
const MIB: i64 = 1024 * 1024;

fn caller() -> Option<Caller> {
    Some(Caller {
        user_id: "user-u".into(),
        ..Default::default()
    })
}

async fn create(h: &Harness) -> String {
    let spec = hardened_spec(&["sleep", "3600"]);
    let env = uuid::Uuid::new_v4().to_string();
    h.client()
        .create_environment(CreateEnvironmentRequest {
            labels: BTreeMap::from([("stage".into(), "test".into())]),
            caller: caller(),
            request_id: env.clone(),
            environment_id: env.clone(),
            team_id: TEAM.into(),
            owner_id: "user-u".into(),
            name: "resizable".into(),
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
        .expect("create");
    let created = settled(&h.client(), &env).await;
    assert_eq!(
        created.state(),
        vibebox_proto::environment::EnvironmentState::Running
    );
    assert_eq!(
        created.labels,
        BTreeMap::from([("stage".to_owned(), "test".to_owned())]),
        "labels given at create come back"
    );
    env
}

fn resized(cpu: f64, memory_mb: i64, pids: i64) -> ContainerSpec {
    ContainerSpec {
        cpu_limit: Some(cpu),
        memory_limit_mb: Some(memory_mb),
        pids_limit: Some(pids),
        ..hardened_spec(&["sleep", "3600"])
    }
}

fn resize(
    h: &Harness,
    env: &str,
    spec: ContainerSpec,
    request_id: &str,
) -> UpdateEnvironmentRequest {
    UpdateEnvironmentRequest {
        caller: caller(),
        environment_id: env.into(),
        update_mask: vec![
            "spec.cpu_limit".into(),
            "spec.memory_limit_mb".into(),
            "spec.pids_limit".into(),
        ],
        clearance: Some(testkit::clearance(
            &h.signer,
            &spec,
            env,
            TEAM,
            Duration::from_secs(60),
        )),
        spec: Some(spec),
        request_id: request_id.into(),
        ..Default::default()
    }
}

/// (NanoCpus, Memory, MemorySwap, PidsLimit) of the environment's container.
async fn limits(h: &Harness, env: &str) -> (i64, i64, i64, i64) {
    let cid = h
        .orchestrator
        .get(env)
        .await
        .unwrap()
        .container_id
        .expect("container");
    let host = h
        .orchestrator
        .docker()
        .inspect_container(&cid, None::<InspectContainerOptions>)
        .await
        .unwrap()
        .host_config
        .unwrap();
    (
        host.nano_cpus.unwrap_or(0),
        host.memory.unwrap_or(0),
        host.memory_swap.unwrap_or(0),
        host.pids_limit.unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_is_live_and_an_interrupted_one_is_rolled_back_not_quarantined() {
    let h = Harness::start(|_| {}).await.unwrap();
    let env = create(&h).await;
    assert_eq!(
        limits(&h, &env).await,
        (250_000_000, 64 * MIB, 64 * MIB, 64)
    );

    // Applied to the running container, and returned.
    let mut request = resize(&h, &env, resized(0.5, 96, 100), "resize-1");
    request.update_mask.push("labels".into());
    request.labels = BTreeMap::from([("stage".into(), "resized".into())]);
    let updated = h
        .client()
        .update_environment(request)
        .await
        .expect("update")
        .into_inner()
        .environment
        .expect("environment");
    let spec = updated.spec.clone().unwrap();
    assert_eq!(
        (spec.cpu_limit, spec.memory_limit_mb, spec.pids_limit),
        (Some(0.5), Some(96), Some(100))
    );
    assert_eq!(
        updated.labels.get("stage").map(String::as_str),
        Some("resized")
    );
    assert_eq!(
        limits(&h, &env).await,
        (500_000_000, 96 * MIB, 96 * MIB, 100),
        "swap pinned to memory"
    );
    // The stored spec is the new one: no drift.
    let report = h.orchestrator.reconcile().await.unwrap();
    assert!(report.quarantined.is_empty(), "{report:?}");
    assert_eq!(
        h.orchestrator.get(&env).await.unwrap().state,
        State::Running
    );

    // Killed after the engine applied new limits, before the commit.
    h.orchestrator
        .set_crash_point(Some(CrashPoint::AfterUpdate));
    let crashed = h
        .client()
        .update_environment(resize(&h, &env, resized(0.75, 128, 120), "resize-2"))
        .await
        .unwrap_err();
    h.orchestrator.set_crash_point(None);
    assert_eq!(crashed.code(), tonic::Code::Internal, "{crashed:?}");
    assert_eq!(
        limits(&h, &env).await,
        (750_000_000, 128 * MIB, 128 * MIB, 120),
        "the engine has the limits the record never committed"
    );
    let pending = h.orchestrator.get(&env).await.unwrap();
    assert_eq!(pending.pending_update, "resize-2");
    assert_eq!(
        pending.memory_bytes,
        128 * MIB,
        "the larger reservation is held while pending"
    );

    // Reconcile rolls it back instead of quarantining it.
    let report = h.orchestrator.reconcile().await.unwrap();
    assert!(report.quarantined.is_empty(), "{report:?}");
    let rolled_back = h.orchestrator.get(&env).await.unwrap();
    assert_eq!(rolled_back.state, State::Running);
    assert_eq!(rolled_back.pending_update, "");
    assert_eq!(
        (rolled_back.nano_cpus, rolled_back.memory_bytes),
        (500_000_000, 96 * MIB)
    );
    assert_eq!(
        rolled_back.update_request_id,
        vibebox_orchestrator::update::update_key(
            &vibebox_orchestrator::audit::Caller {
                user_id: "user-u".into(),
                ..Default::default()
            },
            "resize-1"
        ),
        "the last update committed, with its caller"
    );
    assert_eq!(
        limits(&h, &env).await,
        (500_000_000, 96 * MIB, 96 * MIB, 100),
        "the committed limits are back"
    );
    h.orchestrator.reconcile().await.unwrap();
    let updates: Vec<_> = h
        .orchestrator
        .audit()
        .recent()
        .into_iter()
        .filter(|e| e.action == "environment.update" && e.resource_id == env)
        .collect();
    let outcomes: Vec<i32> = updates.iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        [Outcome::Success as i32, Outcome::Failure as i32],
        "one success, one rollback, recorded once: {updates:?}"
    );
    assert_eq!(
        updates[1].actor.as_ref().unwrap().service,
        "orchestrator",
        "rolled back by reconcile"
    );
}
