//! What a crash between a state change and its audit event leaves behind is
//! audited exactly once: a create's event is durable before `running` is
//! committed, and a delete's event has one fixed id, so reconcile finishing
//! an interrupted delete records it again under that id (which the audit
//! service keeps once) instead of not at all or twice.

use std::time::Duration;

use vibebox_orchestrator::store::State;
use vibebox_orchestrator::testkit::{self, Harness, hardened_spec};
use vibebox_proto::audit::{AuditEvent, Outcome};
use vibebox_proto::runtime::*;

use crate::common::settled;

const TEAM: &str = "team-r";

async fn create(h: &Harness) -> String {
    let spec = hardened_spec(&["sleep", "3600"]);
    let env = uuid::Uuid::new_v4().to_string();
    let created = h
        .client()
        .create_environment(CreateEnvironmentRequest {
            labels: Default::default(),
            caller: Some(Caller {
                user_id: "user-r".into(),
                ..Default::default()
            }),
            request_id: env.clone(),
            environment_id: env.clone(),
            team_id: TEAM.into(),
            owner_id: "user-r".into(),
            name: "recovery".into(),
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
    assert_eq!(
        created.state(),
        vibebox_proto::environment::EnvironmentState::Creating
    );
    assert_eq!(
        settled(&h.client(), &env).await.state(),
        vibebox_proto::environment::EnvironmentState::Running
    );
    env
}

/// Deletes an environment as `user-r`, and waits until it is deleted.
async fn delete(h: &Harness, env: &str) {
    h.client()
        .delete_environment(DeleteEnvironmentRequest {
            caller: Some(Caller {
                user_id: "user-r".into(),
                ..Default::default()
            }),
            environment_id: env.to_owned(),
        })
        .await
        .expect("delete");
    assert_eq!(
        settled(&h.client(), env).await.state(),
        vibebox_proto::environment::EnvironmentState::Deleted
    );
}

fn events<'a>(recent: &'a [AuditEvent], action: &str, env: &str) -> Vec<&'a AuditEvent> {
    recent
        .iter()
        .filter(|e| {
            e.action == action && e.resource_id == env && e.outcome == Outcome::Success as i32
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_deletes_are_finished_and_audited_under_one_id() {
    let h = Harness::start(|_| {}).await.unwrap();

    // A running environment has its create event.
    let env = create(&h).await;
    let recent = h.orchestrator.audit().recent();
    assert_eq!(events(&recent, "environment.create", &env).len(), 1);

    // Deleted; then, as if killed after the event was written but before
    // `deleted` was committed, the record is back in `deleting`.
    delete(&h, &env).await;
    h.orchestrator
        .store()
        .set_state(&env, State::Deleting, None, None)
        .await
        .unwrap();
    let report = h.orchestrator.reconcile().await.unwrap();
    assert_eq!(report.deletes_finished, vec![env.clone()], "{report:?}");
    let recent = h.orchestrator.audit().recent();
    let deletes = events(&recent, "environment.delete", &env);
    assert_eq!(deletes.len(), 2, "recorded by the delete and by reconcile");
    assert_eq!(
        deletes[0].id, deletes[1].id,
        "one id: the audit service keeps the event once"
    );
    assert_eq!(deletes[0].actor.as_ref().unwrap().user_id, "user-r");

    // Killed before the event was written: the objects are still there and
    // reconcile removes them, recording the event it was missing.
    let other = create(&h).await;
    h.orchestrator
        .store()
        .set_state(&other, State::Deleting, None, None)
        .await
        .unwrap();
    let report = h.orchestrator.reconcile().await.unwrap();
    assert_eq!(report.deletes_finished, vec![other.clone()], "{report:?}");
    let recent = h.orchestrator.audit().recent();
    let deletes = events(&recent, "environment.delete", &other);
    assert_eq!(deletes.len(), 1);
    assert_ne!(
        deletes[0].id,
        events(&recent, "environment.delete", &env)[0].id
    );
    assert_eq!(
        deletes[0].actor.as_ref().unwrap().service,
        "orchestrator",
        "finished by reconcile"
    );
    assert_eq!(
        h.orchestrator.get(&other).await.unwrap().state,
        State::Deleted
    );
    assert!(h.objects().is_empty(), "left behind: {:?}", h.objects());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_record_still_holding_its_subnet_never_collides_with_a_new_one() {
    let h = Harness::start(|_| {}).await.unwrap();

    // Deleted; then, as a process killed between two writes of an earlier
    // version left it, the deleted record still carries its subnet (whose
    // network is gone, so the engine no longer reports it).
    let env = create(&h).await;
    let subnet = h
        .orchestrator
        .get(&env)
        .await
        .unwrap()
        .subnet
        .expect("subnet");
    delete(&h, &env).await;
    assert_eq!(
        h.orchestrator.get(&env).await.unwrap().subnet,
        None,
        "released on delete"
    );
    h.orchestrator
        .store()
        .set_subnet(&env, Some(&subnet))
        .await
        .unwrap();

    // The next create gets another subnet instead of failing on the index.
    let next = create(&h).await;
    let next_subnet = h
        .orchestrator
        .get(&next)
        .await
        .unwrap()
        .subnet
        .expect("subnet");
    assert_ne!(next_subnet, subnet);

    // Reconcile releases what the settled record held.
    h.orchestrator.reconcile().await.unwrap();
    assert_eq!(h.orchestrator.get(&env).await.unwrap().subnet, None);
    assert_eq!(
        h.orchestrator.get(&next).await.unwrap().subnet,
        Some(next_subnet),
        "a live record keeps its subnet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_whose_event_was_not_written_is_audited_by_the_next_pass() {
    let h = Harness::start(|_| {}).await.unwrap();
    let env = create(&h).await;
    let drifts = |h: &Harness| {
        h.orchestrator
            .audit()
            .recent()
            .into_iter()
            .filter(|e| e.action == "reconcile.drift" && e.resource_id == env)
            .collect::<Vec<_>>()
    };

    // As if killed right after the quarantine was committed: the record is
    // quarantined for drift and no event was written.
    h.orchestrator
        .store()
        .set_state(
            &env,
            State::Quarantined,
            Some("drift from the cleared spec: memory limit 268435456, cleared 134217728"),
            Some(""),
        )
        .await
        .unwrap();
    assert!(drifts(&h).is_empty());

    h.orchestrator.reconcile().await.unwrap();
    let found = drifts(&h);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].severity,
        vibebox_proto::audit::Severity::Critical as i32
    );
    let detail = found[0]
        .details
        .as_ref()
        .and_then(|d| d.fields.get("drift"))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        });
    assert_eq!(
        detail.as_deref(),
        Some("memory limit 268435456, cleared 134217728")
    );

    // Once: the record says so, and another pass does not write it again.
    assert!(
        h.orchestrator
            .get(&env)
            .await
            .unwrap()
            .status_message
            .contains("recorded in the audit log")
    );
    h.orchestrator.reconcile().await.unwrap();
    assert_eq!(drifts(&h).len(), 1);

    // Deleting a quarantine whose event was not written writes it first.
    let other = create(&h).await;
    h.orchestrator
        .store()
        .set_state(
            &other,
            State::Quarantined,
            Some("drift from the cleared spec: privileged true, cleared false"),
            Some(""),
        )
        .await
        .unwrap();
    delete(&h, &other).await;
    let recorded: Vec<_> = h
        .orchestrator
        .audit()
        .recent()
        .into_iter()
        .filter(|e| e.action == "reconcile.drift" && e.resource_id == other)
        .collect();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
}
