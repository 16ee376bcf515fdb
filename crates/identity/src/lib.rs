//! The identity service: users, teams, roles, biscuit tokens, revocation and
//! authorization decisions.
//!
//! It serves `vibebox.identity.v1.IdentityService` and the internal
//! `vibebox.internal.authz.v1.AuthorizationService` to the gateway only
//! (mutual TLS). Module map:
//! - [`model`]: roles, users, service accounts, teams, token restrictions
//!   and name/password rules;
//! - [`entity`] / [`migration`] / [`store`]: the database;
//! - [`keys`]: token signing keys (files + table, rotation, retirement);
//! - [`rbac`]: the role rules; [`service`]: the logic (service accounts,
//!   the token registry and idempotent creates in `service/accounts.rs`);
//!   [`grpc`]: adapters;
//! - [`ratelimit`]: failed-login limits; [`audit`]: audit events;
//! - [`bootstrap`]: first-start admin, default team and admin token file.

pub mod audit;
pub mod bootstrap;
pub mod entity;
pub mod error;
pub mod grpc;
pub mod keys;
pub mod migration;
pub mod model;
pub mod ratelimit;
pub mod rbac;
pub mod service;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sea_orm_migration::MigratorTrait;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vibebox_audit_client::{AuditClient, AuditClientConfig};
use vibebox_proto::authz::authorization_service_server::AuthorizationServiceServer;
use vibebox_proto::identity::identity_service_server::IdentityServiceServer;
use vibebox_server_kit::{ServerArgs, ServerBuilder, ServiceConfig};

pub use crate::error::{Error, Result};
pub use crate::service::{Identity, Settings};

/// The service's binary (its name in `--help`, and where `Config::new`
/// reads its defaults from).
const BINARY: &str = "vibebox-identity";
/// Name of this service (certificates, logs, audit source).
pub const SERVICE_NAME: &str = "identity";
/// Default port on 127.0.0.1.
pub const DEFAULT_PORT: u16 = 7701;
/// The mTLS identities allowed to call this service.
pub const ALLOWED_CALLERS: &[&str] = &["gateway"];

/// Configuration of the identity service.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "vibebox-identity",
    version,
    about = "VibeBox identity service: users, teams, roles, tokens and authorization"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub database: vibebox_db::DatabaseArgs,
    #[command(flatten)]
    pub audit: vibebox_audit_client::AuditArgs,
    /// Lifetime of login session tokens, in seconds.
    #[arg(long, env = "VIBEBOX_SESSION_TTL_SECS", default_value_t = 12 * 3600)]
    pub session_ttl_secs: u64,
    /// Failed logins allowed per minute per account and client address (the
    /// IP, whatever the port) before logins for that account from that
    /// address are refused. Other addresses are not affected.
    #[arg(
        long,
        env = "VIBEBOX_LOGIN_FAILURES_PER_ACCOUNT_SOURCE",
        default_value_t = 5
    )]
    pub login_failures_per_account_source: u32,
    /// Failed logins allowed per minute per client address, all accounts
    /// together, before every login from it is refused (password spraying).
    #[arg(long, env = "VIBEBOX_LOGIN_FAILURES_PER_SOURCE", default_value_t = 20)]
    pub login_failures_per_source: u32,
    /// Failed logins allowed per minute per account, all addresses together,
    /// before every login for it is slowed down by --login-backoff-ms (never
    /// refused: nobody can lock an account out from everywhere).
    #[arg(long, env = "VIBEBOX_LOGIN_FAILURES_PER_ACCOUNT", default_value_t = 60)]
    pub login_failures_per_account: u32,
    /// Delay of a login for an account whose per-account budget is spent, in
    /// milliseconds.
    #[arg(long, env = "VIBEBOX_LOGIN_BACKOFF_MS", default_value_t = 1000)]
    pub login_backoff_ms: u64,
    /// Longest lifetime of any API token, in seconds (default 90 days). A
    /// minted token also never outlives the token that asked for it, and
    /// only unattenuated tokens may mint. Applies to the bootstrap admin
    /// token too.
    #[arg(long, env = "VIBEBOX_MAX_API_TOKEN_TTL_SECS", default_value_t = 90 * 24 * 3600)]
    pub max_api_token_ttl_secs: u64,
    /// Least time between two recordings of one token's last use
    /// (`ApiToken.last_used_time`), in seconds.
    #[arg(long, env = "VIBEBOX_TOKEN_USAGE_INTERVAL_SECS", default_value_t = 60)]
    pub token_usage_interval_secs: u64,
    /// Create a new token signing key at start; older keys keep verifying until retired.
    #[arg(long, env = "VIBEBOX_ROTATE_TOKEN_KEY")]
    pub rotate_token_key: bool,
    /// Retire these token signing key ids at start: tokens they signed stop working.
    #[arg(long, env = "VIBEBOX_RETIRE_TOKEN_KEYS", value_delimiter = ',')]
    pub retire_token_key: Vec<u32>,
    /// File holding the password the bootstrap admin gets on first start
    /// (12 to 1024 characters; a trailing newline is ignored), so that an
    /// operator can `Login` as `admin`. Read only on first start (an empty
    /// database). Without it the password is random and the admin uses the
    /// token file.
    #[arg(long, env = "VIBEBOX_BOOTSTRAP_ADMIN_PASSWORD_FILE")]
    pub bootstrap_admin_password_file: Option<std::path::PathBuf>,
}

impl ServiceConfig for Config {
    fn server_args(&self) -> &ServerArgs {
        &self.server
    }
}

impl Config {
    /// A configuration with every default (written once, on the flags),
    /// around `server`.
    pub fn new(server: ServerArgs) -> Self {
        use clap::Parser;
        let mut config = Config::parse_from([BINARY]);
        config.server = server;
        config
    }

    /// The database URL in effect.
    pub fn database_url(&self) -> String {
        self.database
            .url_or_default(&self.server.data_dir, SERVICE_NAME)
    }
}

/// Opens (and migrates) the database, loads the keys, opens the audit
/// client, bootstraps an empty database and returns the service.
pub async fn open(config: &Config, audit: audit::Auditor) -> anyhow::Result<Arc<Identity>> {
    let url = config.database_url();
    let db = vibebox_db::connect(&url)
        .await
        .with_context(|| format!("opening {}", vibebox_db::redact(&url)))?;
    migration::Migrator::up(&db, None)
        .await
        .context("migrating the identity database")?;
    let keys = keys::KeyStore::open(&db, &config.server.data_dir.join("keys"))
        .await
        .context("loading token signing keys")?;
    if config.rotate_token_key {
        let id = keys.rotate(&db).await.context("rotating the token key")?;
        tracing::info!(key_id = id, "rotated the token signing key");
    }
    for key_id in &config.retire_token_key {
        keys.retire(&db, *key_id)
            .await
            .with_context(|| format!("retiring token key {key_id}"))?;
        tracing::info!(key_id, "retired a token signing key");
    }
    let settings = Settings {
        session_ttl: Duration::from_secs(config.session_ttl_secs.max(60)),
        login_limits: ratelimit::LoginLimits {
            per_account_source: config.login_failures_per_account_source,
            per_source: config.login_failures_per_source,
            per_account: config.login_failures_per_account,
            account_backoff: Duration::from_millis(config.login_backoff_ms.min(10_000)),
        },
        max_api_token_ttl: Duration::from_secs(config.max_api_token_ttl_secs.max(60)),
        token_usage_interval: Duration::from_secs(config.token_usage_interval_secs.max(1)),
    };
    service::warm_up().await;
    let identity = Arc::new(Identity::new(db, Arc::new(keys), audit, settings));
    bootstrap::bootstrap(
        &identity,
        &config.server.data_dir,
        config.bootstrap_admin_password_file.as_deref(),
    )
    .await
    .context("bootstrapping the identity database")?;
    Ok(identity)
}

/// Opens the audit outbox (waiting while a previous instance in this
/// process, a restart, still holds it).
async fn open_audit_client(
    config: &Config,
    tls: &vibebox_server_kit::TlsMaterial,
) -> anyhow::Result<AuditClient> {
    AuditClient::open_waiting(
        AuditClientConfig {
            outbox_dir: config.server.data_dir.join("outbox").join(SERVICE_NAME),
            audit_url: config.audit.url.clone(),
            tls: tls.clone(),
            source_service: SERVICE_NAME.into(),
        },
        vibebox_audit_client::OPEN_PATIENCE,
    )
    .await
    .context("opening the audit outbox")
}

/// How often the token keys are read from the database again: a key retired
/// by another identity process stops verifying here within this interval.
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

async fn reload_keys(identity: Arc<Identity>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(KEY_RELOAD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Err(error) = identity.key_store().reload(identity.db()).await {
                    tracing::warn!(%error, "cannot reload the token keys; will retry");
                }
            }
        }
    }
}

/// Runs the service on its configured address until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = vibebox_server_kit::bind(config.server.listen_or(DEFAULT_PORT)).await?;
    run_with_listener(config, listener, shutdown).await
}

/// Runs the service on `listener` (tests bind 127.0.0.1:0) until `shutdown`.
pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = config
        .server
        .tls_material(SERVICE_NAME)
        .context("loading the identity TLS material")?;
    let audit_client = open_audit_client(&config, &tls).await?;
    let identity = open(&config, audit::Auditor::new(audit_client)).await?;
    tokio::spawn(reload_keys(identity.clone(), shutdown.child_token()));
    let handlers = grpc::Handlers::new(identity);
    ServerBuilder::new(SERVICE_NAME, &config.server)
        .tls(Some(tls))
        .allow_callers(ALLOWED_CALLERS)
        .add_service(IdentityServiceServer::new(handlers.clone()))
        .add_service(AuthorizationServiceServer::new(handlers))
        .serve(listener, shutdown)
        .await?;
    Ok(())
}
