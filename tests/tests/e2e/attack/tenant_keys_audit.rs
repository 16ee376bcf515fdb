//! Hostile tenants (issue 16), items 7 and 8, against a [`Cluster`] (each
//! service its own process):
//!
//! - a clearance signed by a key policy has since retired is refused by the
//!   running orchestrator within 2 s of the retirement (no orchestrator
//!   restart), with a status naming the key;
//! - an audit tail deleted from the audit database (events and the signed
//!   checkpoints over them, plus the audit service's own head record) is
//!   detected after the audit service restarts: the producers' receipts
//!   contradict the shortened log, `VerifyChain` reports the cut and an
//!   `alert.raised` event records it.

use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use vibebox_proto::audit::{QueryEventsRequest, VerifyChainRequest};
use vibebox_tests::cluster::{Cluster, Service};

use super::*;

fn small(image: &str) -> ContainerSpec {
    ContainerSpec {
        cpu_limit: Some(0.25),
        memory_limit_mb: Some(64),
        pids_limit: Some(64),
        ..spec(image)
    }
}

/// A clearance from policy for a fresh environment id, asked as the gateway.
async fn cleared(
    policy: &ClearanceServiceClient<tonic::transport::Channel>,
    image: &str,
    team: &str,
) -> (String, ContainerSpec, String, Clearance) {
    let environment_id = uuid::Uuid::new_v4().to_string();
    let issued = policy
        .clone()
        .issue_clearance(IssueClearanceRequest {
            spec: Some(small(image)),
            environment_id: environment_id.clone(),
            team_id: team.to_owned(),
            user_id: "key-retirement-user".into(),
            team_role: TeamRole::Developer as i32,
        })
        .await
        .expect("a clearance from policy, as the gateway")
        .into_inner();
    let evaluation = issued.evaluation.expect("evaluation");
    (
        environment_id,
        evaluation.hardened_spec.expect("hardened spec"),
        evaluation.canonical_image,
        issued.clearance.expect("clearance"),
    )
}

fn runtime_create(
    team: &str,
    (environment_id, spec, canonical, clearance): &(String, ContainerSpec, String, Clearance),
) -> tonic::Request<runtime::CreateEnvironmentRequest> {
    let request_id = format!("retired-{}", &environment_id[..8]);
    with_id(
        &request_id,
        runtime::CreateEnvironmentRequest {
            labels: Default::default(),
            caller: Some(runtime::Caller {
                user_id: "key-retirement-user".into(),
                request_id: request_id.clone(),
                ..Default::default()
            }),
            request_id: request_id.clone(),
            environment_id: environment_id.clone(),
            team_id: team.to_owned(),
            owner_id: "key-retirement-user".into(),
            name: format!("retired-{}", &environment_id[..8]),
            spec: Some(spec.clone()),
            clearance: Some(clearance.clone()),
            canonical_image: canonical.clone(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_clearance_key_is_refused_by_the_running_orchestrator_within_2s() {
    let mut report = SuiteReport::new(
        "attack",
        "a_retired_clearance_key_is_refused_by_the_running_orchestrator_within_2s",
    );
    let image = dev_image();
    let mut cluster = Cluster::start().await;
    let data = cluster.data_dir().to_owned();
    let team = cluster.team("retired-keys").await;
    let gateway = material(&data, "gateway");
    let policy = ClearanceServiceClient::new(mtls(&cluster.url(Service::Policy), &gateway));
    let mut orchestrator =
        RuntimeServiceClient::new(mtls(&cluster.url(Service::Orchestrator), &gateway));

    let keys = ClearanceServiceClient::new(mtls(
        &cluster.url(Service::Policy),
        &material(&data, "orchestrator"),
    ))
    .get_clearance_keys(GetClearanceKeysRequest {})
    .await
    .expect("policy's clearance keys")
    .into_inner()
    .keys;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let old_key = keys[0].key_id.clone();

    // Control: the orchestrator accepts a clearance by the current key (and
    // so holds it in its ring).
    let control = cleared(&policy, &image, &team).await;
    assert_eq!(control.3.key_id, old_key);
    orchestrator
        .create_environment(runtime_create(&team, &control))
        .await
        .expect("a clearance by the active key is accepted");
    // Clearances an attacker kept (or the gateway still has in flight); few
    // enough for the team quota (10) to never be what refuses them.
    let mut kept = Vec::new();
    for _ in 0..8 {
        kept.push(cleared(&policy, &image, &team).await);
    }

    // The operator rotates and retires the old key: policy restarts with it
    // retired; the orchestrator keeps running.
    cluster.terminate(Service::Policy);
    cluster.set_args(
        Service::Policy,
        vec![
            "--rotate-clearance-key".into(),
            format!("--retire-clearance-key={old_key}"),
        ],
    );
    cluster.restart(Service::Policy).await;
    let retired_at = Instant::now();

    // Within 2 s, clearances by the retired key are refused, naming it.
    let mut accepted_late = Vec::new();
    let mut accepted_in_window = 0;
    let mut refusal = None;
    for attempt in &kept {
        let result = orchestrator
            .create_environment(runtime_create(&team, attempt))
            .await;
        let elapsed = retired_at.elapsed();
        match result {
            Ok(_) if elapsed <= Duration::from_secs(2) => accepted_in_window += 1,
            Ok(_) => accepted_late.push(format!("{elapsed:?}")),
            Err(status) if status.code() == Code::PermissionDenied => {
                if refusal.is_none() {
                    refusal = Some((status, elapsed));
                }
            }
            Err(status) => accepted_late.push(format!("not a key refusal: {status:?}")),
        }
        if refusal.is_some() && elapsed > Duration::from_millis(2500) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.case(accepted_late.is_empty() && refusal.is_some());
    let (status, after) = refusal.unwrap_or_else(|| {
        panic!(
            "every clearance by the retired key {old_key} was accepted (late: {accepted_late:?})"
        )
    });
    assert!(
        accepted_late.is_empty(),
        "clearances by the retired key {old_key} accepted more than 2 s after its retirement: {accepted_late:?}"
    );
    assert!(
        after <= Duration::from_secs(2),
        "first refusal only after {after:?}"
    );
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(&old_key)
            && (status.message().contains("retired") || status.message().contains("unknown")),
        "the refusal names the retired key: {status:?}"
    );
    report.note("accepted_within_2s", accepted_in_window);
    report.note("first_refusal_ms", after.as_millis());

    // The new key works.
    let fresh = cleared(&policy, &image, &team).await;
    assert_ne!(fresh.3.key_id, old_key);
    orchestrator
        .create_environment(runtime_create(&team, &fresh))
        .await
        .expect("a clearance by the new key is accepted");
}

/// Runs `sql` on the audit SQLite database (the service must be stopped).
async fn tamper(data_dir: &std::path::Path, sql: &[&str]) -> i64 {
    let url = format!("sqlite://{}?mode=rw", data_dir.join("audit.db").display());
    let db = Database::connect(&url).await.expect("open audit.db");
    let head = db
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT max(sequence) AS head FROM audit_events",
        ))
        .await
        .expect("head query")
        .and_then(|row| row.try_get::<i64>("", "head").ok())
        .unwrap_or(0);
    for statement in sql {
        db.execute_unprepared(statement).await.expect(statement);
    }
    db.close().await.expect("close audit.db");
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_tail_cut_from_the_database_is_detected_after_restart() {
    let mut report = SuiteReport::new(
        "attack",
        "an_audit_tail_cut_from_the_database_is_detected_after_restart",
    );
    let mut cluster = Cluster::builder()
        .arg(Service::Audit, "--checkpoint-interval=5")
        .start()
        .await;
    let admin = cluster.admin_token();
    let data = cluster.data_dir().to_owned();
    // Some history, identity's events last.
    for i in 0..6 {
        cluster.team(&format!("cut-tail-{i}")).await;
    }
    let mut audit = cluster.audit(&admin);
    let before = audit
        .verify_chain(VerifyChainRequest::default())
        .await
        .expect("verify before")
        .into_inner();
    assert!(before.ok, "intact before the cut: {before:?}");
    // Every producer has delivered what it had (it acknowledged through the
    // API already; give the outboxes a moment).
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The attacker stops audit and cuts the tail: everything from identity's
    // last events on, with the checkpoints over them, and the audit
    // service's own head record beside the database.
    cluster.terminate(Service::Audit);
    let url = format!("sqlite://{}?mode=rw", data.join("audit.db").display());
    let cut_from = {
        let db = Database::connect(&url).await.expect("open audit.db");
        let row = db
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT max(sequence) AS s FROM audit_events WHERE source_service = 'identity'",
            ))
            .await
            .expect("query")
            .expect("a row");
        let last_identity: i64 = row.try_get("", "s").expect("identity events exist");
        db.close().await.expect("close");
        (last_identity - 3).max(1)
    };
    let head = tamper(
        &data,
        &[
            &format!("DELETE FROM audit_events WHERE sequence >= {cut_from}"),
            &format!("DELETE FROM audit_checkpoints WHERE sequence >= {cut_from}"),
        ],
    )
    .await;
    for entry in std::fs::read_dir(&data).expect("data dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("audit") && !name.starts_with("audit.db") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    report.note("cut", format!("{cut_from}..={head}"));
    cluster.restart(Service::Audit).await;

    // Life goes on: identity acts again (its receipt is above the new head).
    cluster.team("cut-tail-after").await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let verdict = loop {
        let verdict = audit
            .verify_chain(VerifyChainRequest::default())
            .await
            .expect("verify after")
            .into_inner();
        if !verdict.ok || Instant::now() >= deadline {
            break verdict;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    report.case(!verdict.ok);
    assert!(
        !verdict.ok,
        "VerifyChain still reports an intact chain after the tail {cut_from}..={head} was cut: {verdict:?}"
    );
    assert!(
        verdict.reason.contains("truncated") || verdict.reason.contains("rewritten"),
        "{verdict:?}"
    );
    assert!(verdict.first_broken_sequence <= head as u64, "{verdict:?}");
    report.note("reason", &verdict.reason);

    // The export no longer ends as if complete: it ends with the failure.
    let exported = async {
        let mut stream = audit
            .export_events(vibebox_proto::audit::ExportEventsRequest::default())
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok::<(), tonic::Status>(())
    }
    .await;
    report.case(exported.is_err());
    let status = exported.expect_err("the export of a cut log ends with an error");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("tail"), "{status:?}");

    let alerts = audit
        .query_events(QueryEventsRequest {
            filter: Some(vibebox_proto::audit::EventFilter {
                action: "alert.raised".into(),
                ..Default::default()
            }),
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("query alerts")
        .into_inner()
        .events;
    let raised = alerts
        .iter()
        .any(|e| e.resource_id == "audit_tail_truncated" && e.severity() == Severity::Critical);
    report.case(raised);
    assert!(raised, "no critical tail alert: {alerts:?}");
}
