//! First start: on an empty database, create the platform admin `admin`
//! (a random password nobody sees, or the operator's from
//! `--bootstrap-admin-password-file`), the team `default` with `admin` as
//! its team admin, and an API token for `admin` written to
//! `<data-dir>/admin.token` with mode 0600 (never logged).

use std::io::Write;
use std::path::{Path, PathBuf};

use vibebox_proto::audit::{Outcome, Severity};

use crate::audit::{Event, Origin};
use crate::error::{Error, Result};
use crate::model::{PlatformRole, TeamRole};
use crate::service::{Identity, hash_password};
use crate::store;

/// Name of the admin token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The bootstrap admin's username.
pub const ADMIN_USERNAME: &str = "admin";
/// The bootstrap team's name.
pub const DEFAULT_TEAM: &str = "default";

/// Writes `contents` to `path` with mode 0600, atomically (temp + rename).
fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads the bootstrap admin's password from a file (a mounted secret):
/// one trailing newline is ignored, and the password rules apply.
pub fn read_password_file(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading the bootstrap admin password file {}",
            path.display()
        )
    })?;
    let password = text
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&text)
        .to_owned();
    crate::model::validate_password(&password).map_err(|e| {
        anyhow::anyhow!(
            "the bootstrap admin password in {} is not acceptable: {e}",
            path.display()
        )
    })?;
    Ok(password)
}

/// Bootstraps an empty database, giving the admin the password in
/// `password_file` when one is set (read only then: the file may go once
/// the platform is bootstrapped). Returns the token file path when it did.
pub async fn bootstrap(
    identity: &Identity,
    data_dir: &Path,
    password_file: Option<&Path>,
) -> anyhow::Result<Option<PathBuf>> {
    if store::count_users(identity.db()).await? > 0 {
        return Ok(None);
    }
    // Without an operator's password: 256 random bits nobody will ever see
    // (the admin uses the token file).
    let password = match password_file {
        Some(path) => read_password_file(path)?,
        None => format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ),
    };
    Ok(create_admin(identity, data_dir, password).await?)
}

/// Creates the admin, the default team and the admin's token file.
async fn create_admin(
    identity: &Identity,
    data_dir: &Path,
    password: String,
) -> Result<Option<PathBuf>> {
    let hash = hash_password(password).await?;
    let txn = vibebox_db::begin_write(identity.db()).await?;
    let admin = store::insert_user(
        &txn,
        store::NewUser {
            username: ADMIN_USERNAME,
            display_name: "Platform administrator",
            password_hash: hash,
            platform_role: PlatformRole::Admin,
        },
    )
    .await?;
    let team = store::insert_team(&txn, DEFAULT_TEAM, "Default team").await?;
    store::add_member(&txn, &team.id, &admin.id, TeamRole::Admin).await?;
    let issued = identity
        .issue(
            &txn,
            crate::service::NewToken {
                user_id: &admin.id,
                kind: "api",
                description: "bootstrap admin token",
                ttl: identity.settings().max_api_token_ttl,
                ..Default::default()
            },
        )
        .await?;
    let origin = Origin {
        service: crate::SERVICE_NAME.into(),
        ..Origin::default()
    };
    for (action, rtype, rid, team_id) in [
        ("user.create", "user", admin.id.as_str(), ""),
        ("team.create", "team", team.id.as_str(), team.id.as_str()),
        (
            "membership.add",
            "membership",
            admin.id.as_str(),
            team.id.as_str(),
        ),
        ("token.create", "token", issued.token_id.as_str(), ""),
    ] {
        identity
            .auditor()
            .record(
                &origin,
                Event {
                    action,
                    resource_type: rtype,
                    resource_id: rid,
                    team_id,
                    outcome: Outcome::Success,
                    severity: Severity::Medium,
                    details: &[("reason", "bootstrap")],
                },
            )
            .await?;
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| Error::Internal(format!("creating the data directory: {e}")))?;
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    write_secret_file(&path, &issued.token)
        .map_err(|e| Error::Internal(format!("writing the admin token file: {e}")))?;
    txn.commit().await?;
    tracing::info!(
        path = %path.display(),
        "bootstrapped: created platform admin 'admin' and team 'default'; admin token written"
    );
    Ok(Some(path))
}
