//! A cut tail: the newest events (and the checkpoints over them) deleted
//! from the audit database while the service is stopped. What is left still
//! verifies by hashes and signatures; the receipts kept outside the database
//! (the service's own head record, each producer's receipt) show the cut.

use crate::common;

use std::time::{Duration, Instant};

use common::{Harness, event};
use sea_orm::ConnectionTrait;
use vibebox_proto::audit as pb;

const FLUSH: Duration = Duration::from_secs(20);

/// Deletes every event and checkpoint from `from` on (the service stopped).
async fn cut(h: &Harness, from: u64) {
    let store = vibebox_audit::store::Store::open(&h.config.database_url())
        .await
        .unwrap();
    let db = store.connection();
    db.execute_unprepared(&format!(
        "DELETE FROM audit_events WHERE sequence >= {from}"
    ))
    .await
    .unwrap();
    db.execute_unprepared(&format!(
        "DELETE FROM audit_checkpoints WHERE sequence >= {from}"
    ))
    .await
    .unwrap();
}

async fn tail_alerts(h: &Harness) -> Vec<pb::AuditEvent> {
    h.query(pb::EventFilter {
        action: "alert.raised".into(),
        resource_id: "audit_tail_truncated".into(),
        ..Default::default()
    })
    .await
}

/// Polls `VerifyChain` until it reports a broken chain (or 15 s pass).
async fn verdict(h: &Harness) -> pb::VerifyChainResponse {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let report = h.verify().await;
        if !report.ok || Instant::now() > deadline {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn export_status(h: &Harness) -> Result<usize, tonic::Status> {
    let mut stream = h
        .reader()
        .export_events(pb::ExportEventsRequest::default())
        .await?
        .into_inner();
    let mut lines = 0;
    while stream.message().await?.is_some() {
        lines += 1;
    }
    Ok(lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_tail_is_detected_by_the_head_record_at_start() {
    let mut h = Harness::new(None).await;
    h.config.checkpoint_interval = 5;
    h.start().await;
    let producer = h.producer("identity");
    for i in 0..12 {
        producer
            .record(event("team.create", &format!("u{i}")))
            .await
            .unwrap();
    }
    producer.flush(FLUSH).await.unwrap();
    assert_eq!(producer.receipt().0, 12);
    assert!(h.verify().await.ok);
    assert!(export_status(&h).await.is_ok());
    h.stop().await;

    cut(&h, 9).await;
    h.start().await;
    let report = h.verify().await;
    assert!(!report.ok, "{report:?}");
    assert!(
        report.reason.starts_with("tail truncated")
            && report.reason.contains("audit head record")
            && report.reason.contains("sequence 12")
            && report.reason.contains("log head is 8"),
        "{report:?}"
    );
    assert_eq!(report.first_broken_sequence, 9);
    // A walk over a range before the cut is still fine.
    let early = h
        .reader()
        .verify_chain(pb::VerifyChainRequest {
            from_sequence: 1,
            to_sequence: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(early.ok, "{early:?}");
    let alerts = tail_alerts(&h).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].severity(), pb::Severity::Critical);
    // The export of the whole log ends with the failure, not a fresh
    // signature over what is left.
    let exported = export_status(&h).await.unwrap_err();
    assert_eq!(
        exported.code(),
        tonic::Code::FailedPrecondition,
        "{exported:?}"
    );
    assert!(
        exported.message().contains("tail truncated"),
        "{exported:?}"
    );

    // The contradicted record is kept: after a restart (and more events
    // past the cut) the failure is still reported.
    h.stop().await;
    h.start().await;
    let again = verdict(&h).await;
    assert!(!again.ok, "{again:?}");
    // Alerted once per failure and process: again after this start.
    assert_eq!(tail_alerts(&h).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_tail_is_detected_by_a_producer_receipt() {
    let mut h = Harness::new(None).await;
    h.config.checkpoint_interval = 5;
    h.start().await;
    let producer = h.producer("orchestrator");
    for i in 0..12 {
        producer
            .record(event("environment.start", &format!("u{i}")))
            .await
            .unwrap();
    }
    producer.flush(FLUSH).await.unwrap();
    let (sequence, hash) = producer.receipt();
    assert_eq!(sequence, 12);
    assert_eq!(hash.len(), 64);
    h.stop().await;

    // The attacker also removes the audit service's own records.
    cut(&h, 10).await;
    let record = h.config.head_record_path();
    std::fs::remove_file(&record).unwrap();
    h.start().await;
    assert!(h.verify().await.ok, "nothing left to show the cut yet");

    // The producer acts again: its next acknowledgement is below its
    // receipt, so it checks the receipt at once.
    producer
        .record(event("environment.stop", "u1"))
        .await
        .unwrap();
    producer.flush(FLUSH).await.unwrap();
    let report = verdict(&h).await;
    assert!(!report.ok, "{report:?}");
    assert!(
        report.reason.contains("producer orchestrator")
            && report.reason.contains("sequence 12")
            && (report.reason.starts_with("tail truncated")
                || report.reason.starts_with("tail rewritten")),
        "{report:?}"
    );
    assert!(report.first_broken_sequence <= 12, "{report:?}");
    let alerts = tail_alerts(&h).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    // The producer keeps the contradicted receipt for the operator (written
    // once the producer has read the audit service's answer: poll).
    let path = h.outbox_dir("orchestrator").join("receipt.contradicted");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let kept = loop {
        match std::fs::read_to_string(&path) {
            Ok(kept) => break kept,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("{} was never written: {e}", path.display())
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    };
    assert!(kept.contains(&hash), "{kept}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_receipts_raise_nothing() {
    let mut h = Harness::started(None).await;
    let producer = h.producer("policy");
    for i in 0..5 {
        producer
            .record(event("policy.update", &format!("u{i}")))
            .await
            .unwrap();
    }
    producer.flush(FLUSH).await.unwrap();
    h.stop().await;
    h.start().await;
    producer
        .record(event("policy.update", "again"))
        .await
        .unwrap();
    producer.flush(FLUSH).await.unwrap();
    assert_eq!(producer.receipt().0, 6);
    let report = h.verify().await;
    assert!(report.ok, "{report:?}");
    assert!(tail_alerts(&h).await.is_empty());
    assert!(export_status(&h).await.is_ok());
}
