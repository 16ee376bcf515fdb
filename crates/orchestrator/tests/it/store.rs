//! The orchestrator's store on every test database (SQLite, and PostgreSQL
//! when `VIBEBOX_TEST_POSTGRES_URL` is set): idempotency and replay
//! constraints, subnet uniqueness, state changes and paging.

use vibebox_listing::{Bounds, MsRange};
use vibebox_orchestrator::store::{EnvRecord, Scan, ScanBy, State, Store, now_ms};
use vibebox_proto::environment::EnvironmentState;

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
        labels: "{}".into(),
        update_request_id: String::new(),
        pending_update: String::new(),
        progress_percent: 100,
        operation: String::new(),
        operation_id: String::new(),
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
        // Listing candidates: narrowed in the database, scanned in time
        // order.
        let ids = |records: &[EnvRecord]| -> Vec<String> {
            let mut ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
            ids.sort();
            ids
        };
        let newest = Scan {
            by: ScanBy::CreateTime,
            descending: true,
            limit: 2,
        };
        let live = Bounds::default();
        let page = store
            .list("inst", &["team".into()], &live, Some(newest))
            .await
            .unwrap();
        let in_order: Vec<_> = page.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(in_order, ["e7", "e6"], "{:?}", db.kind);
        let mut older = live.clone();
        older.create_time_ms.max = Some(t + 2 - 1);
        let rest = store.list("inst", &[], &older, Some(newest)).await.unwrap();
        assert_eq!(ids(&rest), ["e1"]);
        let all = Bounds {
            include_deleted: true,
            ..Bounds::default()
        };
        assert_eq!(
            ids(&store.list("inst", &[], &all, None).await.unwrap()),
            ["e1", "e5", "e6", "e7"]
        );
        assert!(
            store
                .list("other", &[], &all, None)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .list("inst", &["team-b".into()], &all, None)
                .await
                .unwrap()
                .is_empty()
        );
        let failed = Bounds {
            state: Some(EnvironmentState::Failed),
            ..all.clone()
        };
        assert_eq!(
            ids(&store.list("inst", &[], &failed, None).await.unwrap()),
            ["e1"]
        );
        let deleted = Bounds {
            state: Some(EnvironmentState::Deleted),
            ..all.clone()
        };
        assert_eq!(
            ids(&store.list("inst", &[], &deleted, None).await.unwrap()),
            ["e5"]
        );
        let never = Bounds {
            state: Some(EnvironmentState::Unspecified),
            ..all.clone()
        };
        assert!(
            store
                .list("inst", &[], &never, None)
                .await
                .unwrap()
                .is_empty()
        );
        let mut window = all.clone();
        window.create_time_ms = MsRange {
            min: Some(t + 1),
            max: Some(t + 2),
        };
        window.owner_id = Some("owner".into());
        assert_eq!(
            ids(&store.list("inst", &[], &window, None).await.unwrap()),
            ["e5", "e6"]
        );
        window.owner_id = Some("someone".into());
        assert!(
            store
                .list("inst", &[], &window, None)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.live("inst").await.unwrap().len(), 3);
    }
}

/// Operations write only from the state they expect (a delete accepted
/// meanwhile is never overwritten), and a settled state ends the operation.
#[tokio::test]
async fn transitions_move_only_from_the_states_they_expect() {
    use vibebox_orchestrator::store::Transition;
    for db in vibebox_db::testing::databases().await {
        let store = Store::open(&db.url).await.unwrap();
        let t = now_ms();
        assert!(insert(&store, record("o1", "r1", "c1", Some("10.0.1.0/28"), t)).await);
        // Creating -> Running, as a create's commit.
        assert!(
            store
                .set_progress("o1", State::Creating, "creating the network", 65)
                .await
                .unwrap()
        );
        let rec = store.get("o1").await.unwrap().unwrap();
        assert_eq!(
            (rec.progress_percent, rec.status_message.as_str()),
            (65, "creating the network")
        );
        assert!(
            store
                .transition(
                    "o1",
                    &[State::Creating],
                    State::Running,
                    Transition::default()
                )
                .await
                .unwrap()
        );
        // Running -> Stopping, with the operation and its id.
        let start = Transition {
            status_message: Some("stopping"),
            progress_percent: Some(5),
            operation: Some(("stop", "op-1")),
            ..Transition::default()
        };
        assert!(
            store
                .transition("o1", &[State::Running], State::Stopping, start)
                .await
                .unwrap()
        );
        let rec = store.get("o1").await.unwrap().unwrap();
        assert_eq!(rec.state, State::Stopping);
        assert_eq!(
            (rec.operation.as_str(), rec.operation_id.as_str()),
            ("stop", "op-1")
        );
        assert_eq!(rec.progress_percent, 5);
        // A delete accepted meanwhile: the stop's writes no longer land.
        store
            .set_state("o1", State::Deleting, None, Some("deleting"))
            .await
            .unwrap();
        assert!(
            !store
                .set_progress("o1", State::Stopping, "stopping the container", 30)
                .await
                .unwrap()
        );
        assert!(
            !store
                .transition(
                    "o1",
                    &[State::Stopping],
                    State::Stopped,
                    Transition::default()
                )
                .await
                .unwrap()
        );
        let rec = store.get("o1").await.unwrap().unwrap();
        assert_eq!(rec.state, State::Deleting, "{:?}", db.kind);
        assert_eq!(rec.status_message, "deleting");
        // Settled: progress 100, no operation, the subnet released.
        let settle = Transition {
            release_subnet: true,
            ..Transition::default()
        };
        assert!(
            store
                .transition("o1", &[State::Deleting], State::Deleted, settle)
                .await
                .unwrap()
        );
        let rec = store.get("o1").await.unwrap().unwrap();
        assert_eq!(rec.state, State::Deleted);
        assert_eq!((rec.progress_percent, rec.operation.as_str()), (100, ""));
        assert_eq!(rec.operation_id, "");
        assert_eq!(rec.subnet, None);
        // Stored as their names.
        for state in [State::Starting, State::Stopping] {
            store.set_state("o1", state, None, None).await.unwrap();
            assert_eq!(store.get("o1").await.unwrap().unwrap().state, state);
        }
    }
}

/// Listing pages (`service::list_page`) read the database in chunks of the
/// first sort key; whatever the chunk size (ties straddling a chunk's end
/// included), walking the pages returns exactly the records the query
/// selects, in its order, on every database.
#[tokio::test]
async fn listing_pages_scan_in_chunks_on_every_database() {
    use vibebox_listing::Query;
    use vibebox_orchestrator::grpc::environment_pb;
    use vibebox_orchestrator::service::{ListLimits, list_page};

    for db in vibebox_db::testing::databases().await {
        let store = Store::open(&db.url).await.unwrap();
        let t = 1_767_225_600_000;
        let mut all = Vec::new();
        for i in 0..40i64 {
            let mut r = record(
                &format!("env-{i:02}"),
                &format!("req-{i}"),
                &format!("clr-{i}"),
                None,
                // Four records share each creation time.
                t + i / 4,
            );
            r.owner_id = ["alice", "bob", "carol"][(i % 3) as usize].into();
            r.state = [
                State::Running,
                State::Stopped,
                State::Deleted,
                State::Running,
            ][(i % 4) as usize];
            r.name = format!("n-{}", 39 - i);
            // Update times run the other way, in pairs.
            r.update_time_ms = t + 1000 - i / 2;
            r.team_id = if i % 5 == 0 { "team-b" } else { "team" }.into();
            all.push(r.clone());
            assert!(insert(&store, r).await);
        }
        let teams = ["team".to_owned(), "team-b".to_owned()];
        for (filter, order_by, show_deleted) in [
            ("", "", false),
            ("", "", true),
            ("", "update_time", true),
            ("owner_id = bob", "update_time desc", true),
            ("state = RUNNING", "create_time", false),
            ("state = DELETED", "", false),
            (
                "update_time >= \"2026-01-01T00:00:00.990Z\"",
                "update_time",
                true,
            ),
            (
                "create_time < \"2026-01-01T00:00:00.004Z\" OR name = \"n-1*\"",
                "",
                true,
            ),
            ("team_id = team-b OR owner_id = carol", "name desc", true),
            ("", "state, create_time desc", false),
        ] {
            let query = Query::new(filter, order_by, show_deleted).unwrap();
            let expected: Vec<String> = query
                .page(all.iter().map(environment_pb), 500, None)
                .environments
                .into_iter()
                .map(|e| e.id)
                .collect();
            assert!(!expected.is_empty(), "{filter:?} selects something");
            for chunk in [1, 3, 5, 256] {
                for size in [1, 3, 7] {
                    let mut got = Vec::new();
                    let mut token = String::new();
                    loop {
                        let cursor = query.cursor(&token).unwrap();
                        let limits = ListLimits {
                            chunk,
                            ..ListLimits::for_page(size)
                        };
                        let page = list_page(
                            &store,
                            "inst",
                            &teams,
                            &query,
                            size,
                            cursor.as_ref(),
                            limits,
                        )
                        .await
                        .unwrap();
                        assert!(page.environments.len() <= size);
                        got.extend(page.environments.into_iter().map(|e| e.id));
                        if page.next_page_token.is_empty() {
                            break;
                        }
                        token = page.next_page_token;
                    }
                    assert_eq!(
                        got, expected,
                        "{:?}: {filter:?} / {order_by:?} / {show_deleted}, chunk {chunk}, size {size}",
                        db.kind
                    );
                }
            }
        }
        // Only the teams asked for.
        let query = Query::new("", "", true).unwrap();
        let limits = ListLimits {
            chunk: 3,
            ..ListLimits::for_page(500)
        };
        let page = list_page(
            &store,
            "inst",
            &["team-b".into()],
            &query,
            500,
            None,
            limits,
        )
        .await
        .unwrap();
        assert_eq!(page.environments.len(), 8);
        assert!(page.environments.iter().all(|e| e.team_id == "team-b"));
    }
}

/// The cost of one listing call is capped, however long the history: with
/// more records than the cap (mostly deleted, as a team's history is), a
/// scan in time order examines at most `examine` records per call (the
/// store's own count of the records it returned), answering short or empty
/// pages with a token, and walking the pages still collects exactly the
/// matching set; records sharing a millisecond add only themselves. A
/// listing ordered by name or state reads at most `sort + 1` candidates and
/// is refused when it selects more.
#[tokio::test]
async fn listing_cost_per_call_is_capped_on_every_database() {
    use vibebox_listing::Query;
    use vibebox_orchestrator::grpc::environment_pb;
    use vibebox_orchestrator::service::{Error, ListLimits, list_page};

    for db in vibebox_db::testing::databases().await {
        let store = Store::open(&db.url).await.unwrap();
        let t = 1_767_225_600_000;
        let mut all = Vec::new();
        // 150 records; the first 100 at distinct times, the last 50 in ties
        // of 5.
        for i in 0..150i64 {
            let at = if i < 100 {
                t + i
            } else {
                t + 100 + (i - 100) / 5
            };
            let mut r = record(
                &format!("env-{i:03}"),
                &format!("req-{i}"),
                &format!("clr-{i}"),
                None,
                at,
            );
            r.state = if i % 23 == 4 {
                State::Running
            } else {
                State::Deleted
            };
            r.name = format!("{}-{}", if i % 31 == 0 { "keep" } else { "gone" }, 149 - i);
            r.update_time_ms = t + 10_000 - at;
            all.push(r.clone());
            assert!(insert(&store, r).await);
        }
        let cap = ListLimits {
            chunk: 8,
            examine: 30,
            sort: 40,
        };
        let teams = ["team".to_owned()];
        for (filter, order_by, show_deleted) in [
            ("", "", true),
            ("state = RUNNING", "", true),
            ("state = DELETED", "create_time", false),
            ("name = \"keep-*\"", "update_time", true),
            (
                "name = \"keep-*\" OR state = RUNNING",
                "create_time desc, name",
                true,
            ),
            ("name = nothing", "", true),
        ] {
            let query = Query::new(filter, order_by, show_deleted).unwrap();
            let expected: Vec<String> = query
                .page(all.iter().map(environment_pb), 500, None)
                .environments
                .into_iter()
                .map(|e| e.id)
                .collect();
            for size in [1, 4] {
                let mut got = Vec::new();
                let mut token = String::new();
                let mut calls = 0;
                let mut short = 0;
                loop {
                    calls += 1;
                    assert!(calls < 200, "paging does not end");
                    let cursor = query.cursor(&token).unwrap();
                    let before = store.records_listed();
                    let page =
                        list_page(&store, "inst", &teams, &query, size, cursor.as_ref(), cap)
                            .await
                            .unwrap();
                    let read = store.records_listed() - before;
                    // The cap, and at most the rest of one tie of 5.
                    assert!(
                        read <= cap.examine + 4,
                        "{:?}: {filter:?} / {order_by:?}: {read} records read",
                        db.kind
                    );
                    assert!(page.environments.len() <= size);
                    got.extend(page.environments.iter().map(|e| e.id.clone()));
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    if page.environments.len() < size {
                        short += 1;
                    }
                    token = page.next_page_token;
                }
                assert_eq!(
                    got, expected,
                    "{:?}: {filter:?} / {order_by:?} / {show_deleted}, size {size}",
                    db.kind
                );
                if expected.len() < 5 {
                    assert!(short > 0, "{filter:?}: a sparse match answers short pages");
                }
            }
        }
        // Where times are distinct, no call reads a record beyond the cap.
        let query = Query::new("name = nothing", "create_time", true).unwrap();
        let mut token = String::new();
        let mut calls = 0;
        loop {
            let cursor = query.cursor(&token).unwrap();
            let before = store.records_listed();
            let page = list_page(&store, "inst", &teams, &query, 1, cursor.as_ref(), cap)
                .await
                .unwrap();
            let read = store.records_listed() - before;
            assert!(page.environments.is_empty());
            calls += 1;
            if page.next_page_token.is_empty() {
                break;
            }
            if calls <= 3 {
                assert_eq!(read, cap.examine, "{:?}: call {calls}", db.kind);
            }
            token = page.next_page_token;
        }
        assert!(
            (5..=7).contains(&calls),
            "150 records, 30 a call: {calls} calls"
        );

        // Ordered by name: at most `sort` candidates.
        let by_name = Query::new("", "name", true).unwrap();
        let before = store.records_listed();
        let refused = list_page(&store, "inst", &teams, &by_name, 10, None, cap)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, Error::TooManyToSort { max: 40 }),
            "{refused:?}"
        );
        assert_eq!(store.records_listed() - before, cap.sort + 1);
        let status = tonic::Status::from(refused);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            vibebox_server_kit::status::error_reason(&status).as_deref(),
            Some("listing.too_many_to_sort")
        );
        // Narrowed (live ones only, or a state the database filters by),
        // the same order is served.
        for (filter, show_deleted) in [("", false), ("state = RUNNING", true)] {
            let narrowed = Query::new(filter, "name desc", show_deleted).unwrap();
            let page = list_page(&store, "inst", &teams, &narrowed, 100, None, cap)
                .await
                .unwrap();
            let mut expected: Vec<&EnvRecord> =
                all.iter().filter(|r| r.state == State::Running).collect();
            expected.sort_by(|a, b| b.name.cmp(&a.name));
            let expected: Vec<&str> = expected.iter().map(|r| r.id.as_str()).collect();
            let got: Vec<&str> = page.environments.iter().map(|e| e.id.as_str()).collect();
            assert_eq!(got, expected, "{filter:?}");
        }
    }
}

/// A table an earlier version made (without labels and in-place updates)
/// gains the columns on open, with their defaults for the rows it holds.
#[tokio::test]
async fn an_earlier_table_gains_labels_and_update_columns() {
    use sea_orm::ConnectionTrait;
    for db in vibebox_db::testing::databases().await {
        let store = Store::open(&db.url).await.unwrap();
        for column in ["labels", "update_request_id", "pending_update"] {
            store
                .db()
                .execute_unprepared(&format!(
                    "ALTER TABLE orchestrator_environments DROP COLUMN {column}"
                ))
                .await
                .unwrap_or_else(|e| panic!("dropping {column} on {:?}: {e}", db.kind));
        }
        store
            .db()
            .execute_unprepared(
                "INSERT INTO orchestrator_environments (id, installation_id, team_id, \
                 owner_id, name, request_id, state, spec, canonical_image, policy_digest, \
                 policy_version, clearance_id, nano_cpus, memory_bytes, failure_reason, \
                 status_message, create_time_ms, update_time_ms) VALUES ('old', 'inst', \
                 'team', 'owner', 'n', 'r-old', 'running', '', 'img', 'd', 'v', 'c-old', 1, \
                 2, '', '', 1, 1)",
            )
            .await
            .unwrap_or_else(|e| panic!("an old row on {:?}: {e}", db.kind));

        let store = Store::open(&db.url).await.unwrap();
        let old = store.get("old").await.unwrap().expect("the old row");
        assert_eq!(old.labels, "{}", "{:?}", db.kind);
        assert!(vibebox_orchestrator::update::labels_of(&old).is_empty());
        assert_eq!(old.update_request_id, "");
        assert_eq!(old.pending_update, "");
        // New rows carry theirs.
        let mut new = record("new", "r-new", "c-new", None, now_ms());
        new.labels = r#"{"ci":"true"}"#.into();
        assert!(insert(&store, new).await);
        let new = store.get("new").await.unwrap().unwrap();
        assert_eq!(
            vibebox_orchestrator::update::labels_of(&new)
                .get("ci")
                .map(String::as_str),
            Some("true")
        );
    }
}
