use std::time::Instant;
use vibebox_audit::store::Store;
use vibebox_audit_chain::{Actor, Event, Outcome, Severity, GENESIS_HASH};

#[tokio::test]
async fn tmp_pg_timing() {
    for db in vibebox_db::testing::databases().await {
        let store = Store::open(&db.url).await.unwrap();
        let mut prev = GENESIS_HASH.to_string();
        let mut seq = 0;
        for _ in 0..5 {
            let mut events = Vec::new();
            for _ in 0..2000 {
                seq += 1;
                let mut e = Event { id: uuid::Uuid::now_v7().to_string(), sequence: 0, time: chrono::Utc::now(), actor: Actor::default(), team_id: "t".into(), action: "a.b".into(), resource_type: String::new(), resource_id: String::new(), outcome: Outcome::Success, severity: Severity::Low, details: Default::default(), source_service: "x".into(), trace_id: String::new(), request_id: String::new(), client_address: String::new(), hash: String::new(), prev_hash: String::new() };
                e.seal(seq, &prev);
                prev = e.hash.clone();
                events.push(e);
            }
            let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
            let t = Instant::now();
            store.existing(&ids).await.unwrap();
            let t1 = t.elapsed();
            let t = Instant::now();
            store.append(&events, &[]).await.unwrap();
            eprintln!("{:?}: existing {:?} append {:?}", db.kind, t1, t.elapsed());
        }
    }
}
