//! One orchestrator per installation: the lease is exclusive while held,
//! free the moment its holder lets go, waited for by a second process, and
//! on PostgreSQL reported lost when its database session ends.

use std::time::Duration;

use sea_orm::ConnectionTrait;
use vibebox_db::DbKind;
use vibebox_orchestrator::lease;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installation_lease_is_exclusive_and_released_at_once() {
    for db in vibebox_db::testing::databases().await {
        let first = lease::try_acquire(&db.url, "inst-a")
            .await
            .unwrap()
            .expect("a free lease is taken");
        let busy = lease::try_acquire(&db.url, "inst-a")
            .await
            .unwrap()
            .err()
            .unwrap_or_else(|| panic!("{:?}: a held lease was taken twice", db.kind));
        assert!(!busy.holder.is_empty(), "the holder is named: {busy:?}");

        if db.kind == DbKind::Postgres {
            // Installations sharing a database have a lease each.
            let other = lease::try_acquire(&db.url, "inst-b").await.unwrap();
            assert!(other.is_ok(), "another installation is not blocked");
        }

        // A waiting process takes over as soon as the holder lets go.
        let url = db.url.clone();
        let waiting = tokio::spawn(async move { lease::acquire(&url, "inst-a").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "{:?}: waited while held", db.kind);
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("taken over after release")
            .unwrap()
            .unwrap();
        assert!(!second.lost().is_cancelled());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_lease_whose_session_ends_is_reported_lost() {
    let db = vibebox_db::testing::postgres_required().await;
    let held = lease::try_acquire(&db.url, "inst-lost")
        .await
        .unwrap()
        .expect("taken");
    let lost = held.lost();
    // The database ends the holder's session (a restart, a failover).
    let admin = db.connect().await;
    admin
        .execute_unprepared(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND pid <> pg_backend_pid() \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), lost.cancelled())
        .await
        .expect("the loss is noticed");
    // And the lease is free for the next process.
    let next = lease::try_acquire(&db.url, "inst-lost").await.unwrap();
    assert!(next.is_ok());
}
