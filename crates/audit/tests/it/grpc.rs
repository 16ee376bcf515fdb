//! The audit service over real gRPC on loopback (mTLS with a test PKI):
//! ordering across producers, tamper detection, the outbox surviving a
//! stopped service, alert thresholds, caller checks, and the storage
//! behaviour on every test database.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Harness, details, event, number, text};
use sea_orm::ConnectionTrait;
use vibebox_audit_chain::{verify_export, verify_export_from};
use vibebox_proto::audit as pb;
use vibebox_proto::audit_ingest::AppendEventsRequest;

const FLUSH: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_several_producers_arrive_in_order_and_verify() {
    let mut h = Harness::new(None).await;
    h.config.checkpoint_interval = 25;
    h.start().await;
    let producers = ["identity", "policy", "orchestrator", "gateway"];
    let mut tasks = Vec::new();
    for name in producers {
        let client = h.producer(name);
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                // One user per producer: 40 operations stay under the alert threshold.
                let mut e = event("environment.start", name);
                e.details = details(&[("n", number(f64::from(i))), ("by", text(name))]);
                client.record(e).await.unwrap();
            }
            client.flush(FLUSH).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let events = h.all_events().await;
    assert_eq!(events.len(), 160);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.sequence, i as u64 + 1);
    }
    for name in producers {
        let ns: Vec<f64> = events
            .iter()
            .filter(|e| e.source_service == name)
            .map(|e| match &e.details.as_ref().unwrap().fields["n"].kind {
                Some(prost_types::value::Kind::NumberValue(n)) => *n,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let expected: Vec<f64> = (0..40).map(f64::from).collect();
        assert_eq!(ns, expected, "{name}'s events out of order");
    }
    let report = h.verify().await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.events_checked, 160);
    assert_eq!(report.head_sequence, 160);
    assert_eq!(report.checkpoints_verified, 6);

    let export = h.export().await;
    let offline = verify_export(export.as_bytes(), &h.public_key()).unwrap();
    assert!(offline.ok, "{offline:?}");
    assert_eq!(offline.events_checked, 160);
    assert_eq!(offline.signed_through, 160);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_altered_in_the_database_is_detected() {
    let mut h = Harness::new(None).await;
    h.config.checkpoint_interval = 10;
    h.start().await;
    let client = h.producer("orchestrator");
    for _ in 0..30 {
        client
            .record(event("environment.create", "u1"))
            .await
            .unwrap();
    }
    client.flush(FLUSH).await.unwrap();
    assert!(h.verify().await.ok);

    let db = vibebox_db::connect(&h.config.database_url()).await.unwrap();
    db.execute_unprepared("UPDATE audit_events SET actor_user_id = 'innocent' WHERE sequence = 17")
        .await
        .unwrap();

    let report = h.verify().await;
    assert!(!report.ok);
    assert_eq!(report.first_broken_sequence, 17, "{}", report.reason);

    let export = h.export().await;
    let offline = verify_export(export.as_bytes(), &h.public_key()).unwrap();
    assert!(!offline.ok);
    assert_eq!(offline.first_broken_sequence, 17, "{}", offline.reason);

    // A forger who also recomputes the row's hash breaks the next link.
    let rows = h.all_events().await;
    let mut forged = vibebox_audit_chain::Event::try_from(rows[16].clone()).unwrap();
    forged.seal(17, &rows[16].prev_hash);
    db.execute_unprepared(&format!(
        "UPDATE audit_events SET hash = '{}' WHERE sequence = 17",
        forged.hash
    ))
    .await
    .unwrap();
    let report = h.verify().await;
    assert!(!report.ok);
    assert_eq!(report.first_broken_sequence, 18, "{}", report.reason);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_recorded_while_the_service_is_down_arrive_once_after_restart() {
    let mut h = Harness::new(None).await;
    // The service has never started: recording must still succeed.
    let client = h.producer("gateway");
    let mut ids = HashSet::new();
    for i in 0..25 {
        let mut e = event("access.denied", "u2");
        e.id = format!("0190aaaa-0000-7000-8000-{i:012}");
        ids.insert(e.id.clone());
        client.record(e).await.unwrap();
    }
    assert!(client.has_pending());
    assert!(client.flush(Duration::from_millis(300)).await.is_err());

    h.start().await;
    client.flush(FLUSH).await.unwrap();
    assert_eq!(h.all_events().await.len(), 25);

    // Down again: more events wait on disk, the producer even restarts.
    h.stop().await;
    for i in 25..40 {
        let mut e = event("access.denied", "u2");
        e.id = format!("0190aaaa-0000-7000-8000-{i:012}");
        ids.insert(e.id.clone());
        client.record(e).await.unwrap();
    }
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reopened = loop {
        match h.producer_result("gateway") {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    h.start().await;
    reopened.flush(FLUSH).await.unwrap();
    let events = h.all_events().await;
    let seen: HashSet<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(events.len(), 40, "duplicates or losses");
    assert_eq!(seen, ids);
    assert!(h.verify().await.ok);

    // A producer that crashed after delivery but before saving its cursor
    // delivers everything again: the service records nothing twice.
    drop(reopened);
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::remove_file(h.outbox_dir("gateway").join("cursor")).unwrap();
    let replayed = loop {
        match h.producer_result("gateway") {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert!(replayed.has_pending());
    replayed.flush(FLUSH).await.unwrap();
    assert_eq!(h.all_events().await.len(), 40);

    // Redelivery of an already recorded id is ignored (same sequence back).
    let mut ingest = h.ingest_as("gateway");
    let mut again = events[3].clone();
    again.sequence = 0;
    again.hash.clear();
    again.prev_hash.clear();
    let sequences = ingest
        .append_events(AppendEventsRequest {
            events: vec![again.clone(), again],
        })
        .await
        .unwrap()
        .into_inner()
        .sequences;
    assert_eq!(sequences, vec![4, 4]);
    assert_eq!(h.all_events().await.len(), 40);
    h.stop().await;
}

async fn append(h: &Harness, events: Vec<pb::AuditEvent>) {
    let mut ingest = h.ingest_as("orchestrator");
    let events = events
        .into_iter()
        .map(|mut e| {
            e.id = uuid::Uuid::now_v7().to_string();
            e
        })
        .collect();
    ingest
        .append_events(AppendEventsRequest { events })
        .await
        .unwrap();
}

async fn alerts(h: &Harness, rule: &str) -> Vec<pb::AuditEvent> {
    h.query(pb::EventFilter {
        action: "alert.raised".into(),
        resource_id: rule.into(),
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_fire_at_their_thresholds_and_are_watchable() {
    let h = Harness::started(None).await;
    let mut watch = h
        .reader()
        .watch_events(pb::WatchEventsRequest {
            filter: Some(pb::EventFilter {
                action: "alert.".into(),
                min_severity: pb::Severity::High as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();

    // 100 Docker operations by one user in an hour: no alert; the 101st: one.
    append(
        &h,
        (0..100)
            .map(|_| event("environment.start", "busy"))
            .collect(),
    )
    .await;
    assert!(alerts(&h, "user_operations_per_hour").await.is_empty());
    append(&h, vec![event("exec.start", "busy")]).await;
    let raised = alerts(&h, "user_operations_per_hour").await;
    assert_eq!(raised.len(), 1);
    assert_eq!(raised[0].severity, pb::Severity::High as i32);
    append(
        &h,
        (0..5).map(|_| event("environment.stop", "busy")).collect(),
    )
    .await;
    assert_eq!(
        alerts(&h, "user_operations_per_hour").await.len(),
        1,
        "fires once"
    );

    // 10 failed creations: no alert; the 11th: one.
    let failed = |user: &str| {
        let mut e = event("environment.create", user);
        e.outcome = pb::Outcome::Failure as i32;
        e
    };
    append(&h, (0..10).map(|i| failed(&format!("f{i}"))).collect()).await;
    assert!(
        alerts(&h, "failed_environment_creations_per_hour")
            .await
            .is_empty()
    );
    append(&h, vec![failed("f10")]).await;
    assert_eq!(
        alerts(&h, "failed_environment_creations_per_hour")
            .await
            .len(),
        1
    );

    // A Docker socket denial: critical, at once.
    let mut deny = event("policy.deny", "mallory");
    deny.outcome = pb::Outcome::Denied as i32;
    deny.severity = pb::Severity::Critical as i32;
    deny.details = details(&[
        (
            "rule_ids",
            prost_types::value::Kind::ListValue(prost_types::ListValue {
                values: vec![prost_types::Value {
                    kind: Some(text("mount.docker_socket")),
                }],
            }),
        ),
        ("mount", text("/var/run/docker.sock")),
    ]);
    let mut ingest = h.ingest_as("policy");
    deny.id = uuid::Uuid::now_v7().to_string();
    ingest
        .append_events(AppendEventsRequest { events: vec![deny] })
        .await
        .unwrap();
    let critical = alerts(&h, "privileged_or_docker_socket_attempt").await;
    assert_eq!(critical.len(), 1);
    assert_eq!(critical[0].severity, pb::Severity::Critical as i32);

    // The watcher saw the three alerts live, in order.
    let mut watched = Vec::new();
    for _ in 0..3 {
        let item = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("alert on the watch stream")
            .unwrap()
            .unwrap();
        watched.push(item.event.unwrap().resource_id);
    }
    assert_eq!(
        watched,
        [
            "user_operations_per_hour",
            "failed_environment_creations_per_hour",
            "privileged_or_docker_socket_attempt"
        ]
    );
    // The security model's query: critical events mentioning docker.sock.
    let found = h
        .query(pb::EventFilter {
            min_severity: pb::Severity::Critical as i32,
            text: "docker.sock".into(),
            start_time: Some(prost_types::Timestamp::from(
                std::time::SystemTime::now() - Duration::from_secs(3600),
            )),
            ..Default::default()
        })
        .await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].action, "policy.deny");
    assert!(h.verify().await.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_callers_get_through() {
    let h = Harness::started(None).await;
    let status = h
        .reader_as("orchestrator")
        .verify_chain(pb::VerifyChainRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let mut e = event("x.y", "u");
    e.id = "id-1".into();
    let status = h
        .ingest_as("tester")
        .append_events(AppendEventsRequest { events: vec![e] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    // An invalid event names its field.
    let status = h
        .ingest_as("identity")
        .append_events(AppendEventsRequest {
            events: vec![pb::AuditEvent {
                id: "x".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("action"), "{}", status.message());
}

/// The storage behaviour every database must have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_behaves_the_same_on_every_database() {
    for db in vibebox_db::testing::databases().await {
        let mut h = Harness::new(Some(db.url.clone())).await;
        h.config.checkpoint_interval = 7;
        h.start().await;
        let mut batch = Vec::new();
        for i in 0..30 {
            let mut e = event(
                if i % 3 == 0 {
                    "environment.create"
                } else {
                    "auth.login"
                },
                if i % 2 == 0 { "alice" } else { "bob" },
            );
            e.severity = 1 + i % 4;
            e.team_id = format!("team-{}", i % 2);
            e.details = details(&[(
                "path",
                text(if i == 9 {
                    "/var/run/docker.sock"
                } else {
                    "/tmp"
                }),
            )]);
            batch.push(e);
        }
        append(&h, batch).await;
        let all = h.all_events().await;
        assert_eq!(all.len(), 30, "{:?}", db.kind);
        assert_eq!(
            h.query(pb::EventFilter {
                action: "environment.".into(),
                ..Default::default()
            })
            .await
            .len(),
            10
        );
        assert_eq!(
            h.query(pb::EventFilter {
                actor_user_id: "alice".into(),
                team_id: "team-0".into(),
                ..Default::default()
            })
            .await
            .len(),
            15
        );
        assert_eq!(
            h.query(pb::EventFilter {
                min_severity: pb::Severity::Critical as i32,
                ..Default::default()
            })
            .await
            .len(),
            7
        );
        let sock = h
            .query(pb::EventFilter {
                text: "docker.sock".into(),
                ..Default::default()
            })
            .await;
        assert_eq!(sock.len(), 1);
        assert_eq!(sock[0].sequence, 10);
        assert!(
            h.query(pb::EventFilter {
                text: "100%_".into(),
                ..Default::default()
            })
            .await
            .is_empty()
        );
        // Case-sensitive on every database, as the live watch filter is.
        for filter in [
            pb::EventFilter {
                text: "DOCKER.SOCK".into(),
                ..Default::default()
            },
            pb::EventFilter {
                action: "Environment.".into(),
                ..Default::default()
            },
        ] {
            assert!(
                h.query(filter.clone()).await.is_empty(),
                "{:?}: {filter:?}",
                db.kind
            );
        }
        // Newest first, paged.
        let page = h
            .reader()
            .query_events(pb::QueryEventsRequest {
                filter: None,
                page_size: 12,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.events.first().unwrap().sequence, 30);
        assert_eq!(page.events.len(), 12);
        let second = h
            .reader()
            .query_events(pb::QueryEventsRequest {
                filter: None,
                page_size: 12,
                page_token: page.next_page_token,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(second.events.first().unwrap().sequence, 18);
        // Chain, checkpoints, a range, restart.
        let report = h.verify().await;
        assert!(report.ok, "{report:?}");
        assert_eq!(report.checkpoints_verified, 4);
        let range = h
            .reader()
            .verify_chain(pb::VerifyChainRequest {
                from_sequence: 10,
                to_sequence: 20,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(range.ok && range.events_checked == 11, "{range:?}");
        h.stop().await;
        h.start().await;
        append(&h, vec![event("environment.stop", "alice")]).await;
        let all = h.all_events().await;
        assert_eq!(all.len(), 31);
        assert_eq!(all[30].prev_hash, all[29].hash);
        let export = h.export().await;
        let offline = verify_export(export.as_bytes(), &h.public_key()).unwrap();
        assert!(offline.ok, "{:?}: {offline:?}", db.kind);
        // A range export ending between checkpoints gets its own anchor.
        let mut stream = h
            .reader()
            .export_events(pb::ExportEventsRequest {
                from_sequence: 5,
                to_sequence: 12,
            })
            .await
            .unwrap()
            .into_inner();
        let mut range = String::new();
        while let Some(line) = stream.message().await.unwrap() {
            range.push_str(&line.json_line);
            range.push('\n');
        }
        let offline = verify_export_from(range.as_bytes(), &h.public_key(), 5).unwrap();
        assert!(offline.ok, "{offline:?}");
        assert_eq!(offline.events_checked, 8);
        assert_eq!(offline.signed_through, 12);
        // Taken for the whole chain, or for a range starting elsewhere, it
        // is refused: its start is cut.
        for refused in [
            verify_export(range.as_bytes(), &h.public_key()).unwrap(),
            verify_export_from(range.as_bytes(), &h.public_key(), 4).unwrap(),
        ] {
            assert!(!refused.ok, "{refused:?}");
            assert!(refused.reason.contains("starts at event 5"), "{refused:?}");
        }
        h.stop().await;
    }
}
