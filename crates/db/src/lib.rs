//! Database connections for VibeBox services.
//!
//! SQLite is the embedded default: it is opened in WAL mode with a busy
//! timeout, foreign keys on and `synchronous=FULL`, so that a committed write
//! survives a crash and concurrent writers wait instead of failing with
//! "database is locked". PostgreSQL URLs are used as they are.
//!
//! [`testing`] hands storage tests every database they must pass on: a fresh
//! SQLite file always, and a fresh PostgreSQL database when
//! `VIBEBOX_TEST_POSTGRES_URL` is set.

use std::time::Duration;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, Database, DatabaseConnection};

/// How long a SQLite statement waits for the write lock before it fails as
/// busy. A write whose values were computed before it waits (an update time
/// stamped when the statement is built) commits up to this much later than
/// its stamp: whoever reads changes by their stamp (a resumed
/// `WatchEnvironments`) must look back further than this.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors opening a database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unsupported database URL scheme in {0:?} (use sqlite:// or postgres://)")]
    UnsupportedUrl(String),
    #[error("cannot create the directory for {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to the database: {0}")]
    Connect(#[from] sea_orm::DbErr),
}

/// Which database engine a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

impl DbKind {
    /// The engine of a database URL.
    pub fn of(url: &str) -> Result<Self, DbError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err(DbError::UnsupportedUrl(redact(url)))
        }
    }
}

/// The default SQLite URL for a file.
/// The database flag every service with storage flattens into its
/// configuration (one declaration, one default).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DatabaseArgs {
    /// Database URL (sqlite:// or postgres://); default sqlite://<data-dir>/<service>.db.
    #[arg(
        id = "database_url",
        long = "database-url",
        env = "VIBEBOX_DATABASE_URL"
    )]
    pub url: Option<String>,
}

impl DatabaseArgs {
    /// The URL in effect: the flag, else `<data_dir>/<service>.db` on SQLite.
    pub fn url_or_default(&self, data_dir: &std::path::Path, service: &str) -> String {
        self.url
            .clone()
            .unwrap_or_else(|| sqlite_url(&data_dir.join(format!("{service}.db"))))
    }
}

pub fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Opens a connection pool for `url`.
pub async fn connect(url: &str) -> Result<DatabaseConnection, DbError> {
    let mut options = ConnectOptions::new(url.to_owned());
    options.sqlx_logging(false);
    match DbKind::of(url)? {
        DbKind::Sqlite => {
            let url = if url.contains("mode=") {
                url.to_owned()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            if let Some(path) = sqlite_path(&url)
                && let Some(parent) = std::path::Path::new(&path).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|source| DbError::CreateDir {
                    path: parent.display().to_string(),
                    source,
                })?;
            }
            options = ConnectOptions::new(url);
            options
                .sqlx_logging(false)
                .max_connections(8)
                .min_connections(1)
                .map_sqlx_sqlite_opts(|o| {
                    o.journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Full)
                        .busy_timeout(SQLITE_BUSY_TIMEOUT)
                        .foreign_keys(true)
                        .create_if_missing(true)
                });
        }
        DbKind::Postgres => {
            options.max_connections(16).min_connections(1);
        }
    }
    Ok(Database::connect(options).await?)
}

/// Starts a write transaction. On SQLite it takes the write lock at once
/// (`BEGIN IMMEDIATE`): a transaction that reads and then writes would
/// otherwise fail outright (`SQLITE_BUSY_SNAPSHOT`, which no busy timeout
/// waits out) whenever another writer committed since its read, and a
/// count-then-insert inside it could race another writer. PostgreSQL
/// transactions start as they are.
pub async fn begin_write(
    db: &DatabaseConnection,
) -> Result<sea_orm::DatabaseTransaction, sea_orm::DbErr> {
    use sea_orm::{DbBackend, SqliteTransactionMode, TransactionOptions, TransactionTrait};
    let mut options = TransactionOptions::default();
    if db.get_database_backend() == DbBackend::Sqlite {
        options.sqlite_transaction_mode = Some(SqliteTransactionMode::Immediate);
    }
    db.begin_with_options(options).await
}

/// Whether a database error is transient: the database was busy (SQLite's
/// lock wait ran out, a PostgreSQL serialization failure or deadlock) or no
/// pooled connection was free in time. Services answer these UNAVAILABLE,
/// which tells the client that retrying is right; anything else is a fault.
pub fn is_transient(error: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    let runtime = match error {
        DbErr::ConnectionAcquire(_) => return true,
        DbErr::Conn(e) | DbErr::Exec(e) | DbErr::Query(e) => e,
        _ => return false,
    };
    let RuntimeErr::SqlxError(error) = runtime else {
        return false;
    };
    match &**error {
        sea_orm::sqlx::Error::PoolTimedOut => true,
        sea_orm::sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            // SQLITE_BUSY, SQLITE_LOCKED and their extended codes.
            Some("5" | "6" | "261" | "262" | "517" | "773")
            // serialization_failure, deadlock_detected.
            | Some("40001" | "40P01")
        ),
        _ => false,
    }
}

/// The file of a SQLite URL (`None` for an in-memory database or another
/// engine).
pub fn sqlite_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| path.to_owned())
}

/// A URL with its password replaced, for error messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

pub mod testing {
    //! Databases for storage tests: each test gets fresh ones.

    use super::{DbKind, connect};
    use sea_orm::{ConnectionTrait, DatabaseConnection};

    /// The environment variable naming a PostgreSQL server for tests, for
    /// example `postgres://postgres:postgres@127.0.0.1:5432/postgres`.
    pub const POSTGRES_ENV: &str = "VIBEBOX_TEST_POSTGRES_URL";

    /// A fresh, empty database for one test.
    pub struct TestDb {
        pub url: String,
        pub kind: DbKind,
        _dir: Option<tempfile::TempDir>,
    }

    impl TestDb {
        /// Opens a pool on this database.
        pub async fn connect(&self) -> DatabaseConnection {
            connect(&self.url)
                .await
                .expect("connecting to the test database")
        }
    }

    /// A fresh SQLite database in a temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = super::sqlite_url(&dir.path().join("test.db"));
        TestDb {
            url,
            kind: DbKind::Sqlite,
            _dir: Some(dir),
        }
    }

    /// A fresh PostgreSQL database, when `VIBEBOX_TEST_POSTGRES_URL` is set.
    pub async fn postgres() -> Option<TestDb> {
        let admin_url = std::env::var(POSTGRES_ENV).ok().filter(|u| !u.is_empty())?;
        let admin = connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("{POSTGRES_ENV} is set but unusable: {e}"));
        let name = format!("vibebox_test_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("creating the test database");
        let base = match admin_url.rfind('/') {
            Some(slash) if slash > admin_url.find("://").map_or(0, |i| i + 2) => {
                &admin_url[..slash]
            }
            _ => admin_url.as_str(),
        };
        Some(TestDb {
            url: format!("{base}/{name}"),
            kind: DbKind::Postgres,
            _dir: None,
        })
    }

    /// A fresh PostgreSQL database for a test that only means something on
    /// PostgreSQL. Without `VIBEBOX_TEST_POSTGRES_URL` the test fails rather
    /// than pass having tested nothing: `tests/run.sh` leaves such tests
    /// (their names contain `postgres`) out when the variable is unset, so
    /// that they are reported as skipped.
    pub async fn postgres_required() -> TestDb {
        postgres().await.unwrap_or_else(|| {
            panic!(
                "{POSTGRES_ENV} is not set: this test runs on PostgreSQL only \
                 (tests/run.sh reports it as skipped without a database)"
            )
        })
    }

    /// Every database a storage test must pass on: SQLite always, PostgreSQL
    /// when configured.
    pub async fn databases() -> Vec<TestDb> {
        let mut all = vec![sqlite()];
        all.extend(postgres().await);
        all
    }
}

/// The column names a table has now.
pub async fn table_columns(
    db: &DatabaseConnection,
    table: &str,
) -> Result<Vec<String>, sea_orm::DbErr> {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => Statement::from_sql_and_values(
            backend,
            "SELECT column_name AS name FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1",
            [table.into()],
        ),
        _ => Statement::from_sql_and_values(
            backend,
            "SELECT name FROM pragma_table_info(?)",
            [table.into()],
        ),
    };
    let rows = db.query_all_raw(sql).await?;
    rows.iter()
        .map(|r| r.try_get::<String>("", "name"))
        .collect()
}

/// Adds a column of an entity to its existing table (a portable `ALTER
/// TABLE ... ADD COLUMN`, with the entity's default for the rows already
/// there); a column that exists, or that another process adds meanwhile, is
/// left alone.
pub async fn add_column_if_missing<E>(
    db: &DatabaseConnection,
    entity: E,
    column: E::Column,
) -> Result<(), sea_orm::DbErr>
where
    E: sea_orm::EntityTrait,
{
    use sea_orm::{ConnectionTrait, IdenStatic, Schema};
    let table = entity.table_name().to_owned();
    let name = column.as_str().to_owned();
    if table_columns(db, &table).await?.contains(&name) {
        return Ok(());
    }
    let schema = Schema::new(db.get_database_backend());
    let mut def = schema.get_column_def::<E>(column);
    let alter = sea_orm::sea_query::Table::alter()
        .table(entity)
        .add_column(&mut def)
        .to_owned();
    if let Err(e) = db.execute(&alter).await
        && !table_columns(db, &table).await?.contains(&name)
    {
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ConnectionTrait, Statement, TransactionTrait};

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn rejects_unknown_schemes() {
        assert!(matches!(
            DbKind::of("mysql://x"),
            Err(DbError::UnsupportedUrl(_))
        ));
    }

    #[tokio::test]
    async fn sqlite_opens_in_wal_mode() {
        let db = testing::sqlite();
        let conn = db.connect().await;
        let row = conn
            .query_one_raw(Statement::from_string(
                conn.get_database_backend(),
                "PRAGMA journal_mode",
            ))
            .await
            .unwrap()
            .unwrap();
        let mode: String = row.try_get_by_index(0).unwrap();
        assert_eq!(mode, "wal");
    }

    #[tokio::test]
    async fn a_busy_sqlite_database_is_transient_and_a_bad_statement_is_not() {
        let db = testing::sqlite();
        let holder = db.connect().await;
        holder
            .execute_unprepared("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .await
            .unwrap();
        let url = db.url.clone();
        let mut options = sea_orm::ConnectOptions::new(url);
        options
            .sqlx_logging(false)
            .max_connections(1)
            .map_sqlx_sqlite_opts(|o| o.busy_timeout(Duration::from_millis(50)));
        let waiter = Database::connect(options).await.unwrap();
        // The holder takes the write lock and keeps it.
        let txn = holder
            .begin_with_options(sea_orm::TransactionOptions {
                sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await
            .unwrap();
        let busy = waiter
            .execute_unprepared("INSERT INTO t (id) VALUES (1)")
            .await
            .expect_err("the write lock is held");
        assert!(is_transient(&busy), "{busy:?}");
        drop(txn);
        let bad = waiter
            .execute_unprepared("INSERT INTO missing (id) VALUES (1)")
            .await
            .expect_err("no such table");
        assert!(!is_transient(&bad), "{bad:?}");
    }

    #[tokio::test]
    async fn every_test_database_accepts_writes() {
        for db in testing::databases().await {
            let conn = db.connect().await;
            conn.execute_unprepared("CREATE TABLE t (id INTEGER PRIMARY KEY)")
                .await
                .unwrap();
            conn.execute_unprepared("INSERT INTO t (id) VALUES (1)")
                .await
                .unwrap();
        }
    }
}
