//! One orchestrator process per database.
//!
//! Two orchestrators acting for the same installation would each serialize
//! only their own admissions (team quotas, subnets), reconcile against each
//! other and feed the gateways only their own changes. The process therefore
//! holds a lease as long as it runs, and waits for it on start while another
//! process holds it:
//!
//! - SQLite: an exclusive lock (`flock`) on `<database>.lease` next to the
//!   database file (one per database file, whatever the installation);
//! - PostgreSQL: a session advisory lock keyed by the installation, held on a
//!   connection of its own that is checked every two seconds.
//!
//! Both are released by the kernel or the database server the moment the
//! holder dies, so a replacement after `kill -9` takes over at once, not
//! after a timeout. A PostgreSQL holder that goes silent without dying (a
//! frozen process, a node cut off) loses its session after ten seconds
//! (`idle_session_timeout`, PostgreSQL 14 or later); a PostgreSQL lease
//! whose session is lost, for that or any other reason, cancels
//! [`Lease::lost`], and the process exits rather than go on without it.

use std::fs::File;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use sea_orm::sqlx::postgres::PgConnection;
use sea_orm::sqlx::{self, Connection};
use tokio_util::sync::CancellationToken;
use vibebox_db::DbKind;
use vibebox_server_kit::lockfile::{self, Claim};

/// How often a waiting process tries again.
const RETRY: Duration = Duration::from_secs(1);
/// How often a PostgreSQL lease checks its session.
const CHECK: Duration = Duration::from_secs(2);
/// Bounds how long the database keeps the session of a holder that went
/// silent (frozen, or on a node that vanished without closing its
/// connection) before it ends it and frees the lease: several missed checks.
const BOUND_SILENT_HOLDER: &str = "SET idle_session_timeout = '10s'";

/// A held lease; released when dropped (or when the process dies).
pub struct Lease {
    held: Held,
    lost: CancellationToken,
}

enum Held {
    /// Locked as long as it is open.
    File {
        _lock: File,
    },
    Postgres(tokio::task::JoinHandle<()>),
    /// An in-memory SQLite database: no other process can open it.
    Nothing,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Held::Postgres(watch) = &self.held {
            // Dropping the task drops its connection: the session ends and
            // with it the advisory lock.
            watch.abort();
        }
    }
}

impl Lease {
    /// Cancelled when the lease is lost while the process runs.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }
}

/// Who holds a lease another process asked for, as far as it is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    pub holder: String,
}

/// Takes the lease of `installation` in the database at `database_url` if
/// no other process holds it.
pub async fn try_acquire(
    database_url: &str,
    installation: &str,
) -> anyhow::Result<Result<Lease, Busy>> {
    let lost = CancellationToken::new();
    match DbKind::of(database_url)? {
        DbKind::Sqlite => {
            let Some(path) = vibebox_db::sqlite_path(database_url) else {
                return Ok(Ok(Lease {
                    held: Held::Nothing,
                    lost,
                }));
            };
            let path = format!("{path}.lease");
            let holder = format!(
                "process {} of installation {installation}",
                std::process::id()
            );
            match lockfile::claim(Path::new(&path), &holder)
                .with_context(|| format!("locking the lease file {path}"))?
            {
                Claim::Held(file) => Ok(Ok(Lease {
                    held: Held::File { _lock: file },
                    lost,
                })),
                Claim::Busy { holder } => Ok(Err(Busy { holder })),
            }
        }
        DbKind::Postgres => {
            let mut conn = PgConnection::connect(database_url)
                .await
                .context("connecting to the database for the installation lease")?;
            let key = advisory_key(installation);
            let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut conn)
                .await
                .context("taking the installation lease")?;
            if !held {
                let holder: Option<i32> = sqlx::query_scalar(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                     AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = $1 LIMIT 1",
                )
                .bind(key)
                .fetch_optional(&mut conn)
                .await
                .ok()
                .flatten();
                let _ = conn.close().await;
                return Ok(Err(Busy {
                    holder: holder
                        .map(|pid| format!("database session {pid}"))
                        .unwrap_or_default(),
                }));
            }
            // Without this a holder that vanished without closing its
            // connection would keep the lease until TCP keepalive noticed
            // (hours by default). PostgreSQL 14 and later; best effort.
            if let Err(e) = sqlx::query(BOUND_SILENT_HOLDER).execute(&mut conn).await {
                tracing::warn!(error = %e, "cannot bound the lease session's idle time");
            }
            let watch = tokio::spawn(watch_session(conn, lost.clone()));
            Ok(Ok(Lease {
                held: Held::Postgres(watch),
                lost,
            }))
        }
    }
}

/// Takes the lease, waiting as long as another process holds it. On
/// PostgreSQL a database that cannot be reached (as during the failover that
/// may have freed the lease) is waited for as well.
pub async fn acquire(database_url: &str, installation: &str) -> anyhow::Result<Lease> {
    let retry_errors = DbKind::of(database_url)? == DbKind::Postgres;
    let mut waited = 0u32;
    loop {
        let warn = waited.is_multiple_of(30);
        match try_acquire(database_url, installation).await {
            Ok(Ok(lease)) => {
                if waited > 0 {
                    tracing::info!(installation, "took over the installation lease");
                }
                return Ok(lease);
            }
            Ok(Err(busy)) if warn => tracing::warn!(
                installation,
                holder = %busy.holder,
                "another orchestrator holds this installation; waiting for it to stop"
            ),
            Ok(Err(_)) => {}
            Err(e) if retry_errors => {
                if warn {
                    tracing::warn!(installation, error = %format!("{e:#}"), "cannot take the installation lease yet; retrying");
                }
            }
            Err(e) => return Err(e),
        }
        waited += 1;
        tokio::time::sleep(RETRY).await;
    }
}

async fn watch_session(mut conn: PgConnection, lost: CancellationToken) {
    loop {
        tokio::time::sleep(CHECK).await;
        let alive = tokio::time::timeout(CHECK * 2, sqlx::query("SELECT 1").execute(&mut conn))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false);
        if !alive {
            tracing::error!("the database session holding the installation lease is gone");
            lost.cancel();
            return;
        }
    }
}

/// The advisory lock key of an installation: 64 bits of FNV-1a over a
/// prefix and the id, the same in every process.
fn advisory_key(installation: &str) -> i64 {
    use std::hash::Hasher;
    // `Hasher::write` hashes the bytes alone (`Hash for str` would add a
    // terminator and change the key).
    let mut fnv = fnv::FnvHasher::default();
    fnv.write(b"vibebox-orchestrator/");
    fnv.write(installation.as_bytes());
    fnv.finish() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_per_installation_and_are_stable() {
        assert_eq!(advisory_key("a"), advisory_key("a"));
        assert_ne!(advisory_key("a"), advisory_key("b"));
    }

    /// Two versions running side by side in a rolling upgrade must contend
    /// for the same lock: the key never changes. Values produced by the
    /// hand-written FNV-1a this replaced.
    #[test]
    fn keys_are_pinned_across_versions() {
        assert_eq!(advisory_key("default"), -123_250_938_720_071_381);
        assert_eq!(advisory_key(""), -5_605_643_341_439_776_922);
        assert_eq!(advisory_key("a"), -4_437_420_896_226_365_211);
    }
}
