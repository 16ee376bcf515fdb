//! The orchestrator's store on every test database (SQLite, and PostgreSQL
//! when `VIBEBOX_TEST_POSTGRES_URL` is set): idempotency and replay
//! constraints, subnet uniqueness, state changes and paging.

use vibebox_orchestrator::store::{EnvRecord, State, Store, now_ms};

fn record(id: &str, request: &str, clearance: &str, subnet: Option<&str>, t: i64) -> EnvRecord {
    EnvRecord {
        id: id.into(),
        installation_id: "inst".into(),
        team_id: "team".into(),
        owner_id: "owner".into(),
        name: "n".into(),
        request_id: request.into(),
        state: State::Creating,
        spec: vec![1, 2, 3],
        canonical_image: "img".into(),
        policy_digest: "d".into(),
        policy_version: "v".into(),
        clearance_id: clearance.into(),
        subnet: subnet.map(str::to_owned),
        container_id: None,
        nano_cpus: 1,
        memory_bytes: 2,
        failure_reason: String::new(),
        status_message: String::new(),
        create_time_ms: t,
        update_time_ms: t,
        stop_reason: String::new(),
        last_activity_ms: Some(t),
        keep_alive_until_ms: None,
        expire_at_ms: None,
    }
}

async fn insert(store: &Store, rec: EnvRecord) -> bool {
    let txn = store.begin_immediate().await.unwrap();
    match Store::insert(&txn, rec).await {
        Ok(()) => {
            txn.commit().await.unwrap();
            true
        }
        Err(_) => false,
    }
}

#[tokio::test]
async fn store_constraints_hold_on_every_database() {
    for db in vibebox_db::testing::databases().await {
        let store = Store::open(&db.url).await.unwrap();
        // Opening twice (restart) keeps the schema and data.
        let t = now_ms();
        assert!(insert(&store, record("e1", "r1", "c1", Some("10.0.0.0/28"), t)).await);
        let store = Store::open(&db.url).await.unwrap();

        // Same clearance again: refused.
        assert!(!insert(&store, record("e2", "r2", "c1", Some("10.0.0.16/28"), t)).await);
        // Same (team, request id): refused.
        assert!(!insert(&store, record("e3", "r1", "c3", Some("10.0.0.32/28"), t)).await);
        // Same subnet in the installation: refused.
        assert!(!insert(&store, record("e4", "r4", "c4", Some("10.0.0.0/28"), t)).await);
        assert!(insert(&store, record("e5", "r5", "c5", None, t + 1)).await);
        assert!(insert(&store, record("e6", "r6", "c6", None, t + 2)).await);

        assert!(Store::clearance_used(store.db(), "c1").await.unwrap());
        assert!(!Store::clearance_used(store.db(), "c2").await.unwrap());
        let found = Store::by_request(store.db(), "team", "r1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.id, "e1");

        store
            .set_state("e1", State::Failed, Some("boom"), Some(""))
            .await
            .unwrap();
        store.set_subnet("e1", None).await.unwrap();
        let e1 = store.get("e1").await.unwrap().unwrap();
        assert_eq!(e1.state, State::Failed);
        assert_eq!(e1.failure_reason, "boom");
        assert!(e1.subnet.is_none());
        // The released subnet can be taken again.
        assert!(insert(&store, record("e7", "r7", "c7", Some("10.0.0.0/28"), t + 3)).await);

        store
            .set_state("e5", State::Deleted, None, None)
            .await
            .unwrap();
        let page = store
            .list("inst", &["team".into()], false, 0, 2)
            .await
            .unwrap();
        let ids: Vec<_> = page.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["e7", "e6"], "{:?}", db.kind);
        let rest = store.list("inst", &[], false, 2, 10).await.unwrap();
        assert_eq!(
            rest.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["e1"]
        );
        let all = store.list("inst", &[], true, 0, 10).await.unwrap();
        assert_eq!(all.len(), 4);
        assert!(
            store
                .list("other", &[], true, 0, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.live("inst").await.unwrap().len(), 3);
    }
}
