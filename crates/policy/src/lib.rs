//! The policy service: judges, hardens and signs every container spec.
//!
//! - [`image`], [`path`]: canonical image references and host paths;
//! - [`egress`], [`duration`]: outbound rules (host patterns, CIDRs, address
//!   classes, coverage) and durations as written in policy and spec files;
//! - [`rules`]: the rule catalogue (stable ids, severities, CIS/PSS controls);
//! - [`document`]: the TOML policy document, team overlays, digest;
//! - [`engine`]: the pure evaluation and hardening of a spec;
//! - [`service`]: the gRPC adapters (`PolicyService`, `ClearanceService`).
//!
//! [`run`] serves both over mutual TLS (callers: gateway, orchestrator) on
//! port 7702 by default and reloads the policy file on SIGHUP.

pub mod document;
pub mod duration;
pub mod egress;
pub mod engine;
pub mod image;
pub mod path;
pub mod rules;
pub mod service;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vibebox_audit_client::{AuditClient, AuditClientConfig};
use vibebox_clearance::KeyStore;
use vibebox_proto::clearance::clearance_service_server::ClearanceServiceServer;
use vibebox_proto::policy::policy_service_server::PolicyServiceServer;
use vibebox_server_kit::{ServerArgs, ServerBuilder, ServiceConfig};

pub use document::{Policy, PolicyDocument};
pub use engine::{Outcome, Violation, evaluate};
pub use rules::{Rule, Severity};
pub use service::{Clock, PolicyState};

/// The service name (mTLS identity, logs, audit source).
pub const SERVICE_NAME: &str = "policy";
/// Default port on 127.0.0.1.
pub const DEFAULT_PORT: u16 = 7702;

/// Configuration of the policy service.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "vibebox-policy",
    version,
    about = "VibeBox policy service: judges, hardens and signs container specs"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Policy document (TOML); built-in defaults fill what it omits, and apply alone when unset. Reloaded on SIGHUP.
    #[arg(long, env = "VIBEBOX_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// Directory of the clearance signing keys [default: <data-dir>/keys/clearance].
    #[arg(long, env = "VIBEBOX_CLEARANCE_KEY_DIR")]
    pub clearance_key_dir: Option<PathBuf>,
    /// Generate a new clearance signing key at startup and make it active (older keys keep verifying).
    #[arg(long, env = "VIBEBOX_ROTATE_CLEARANCE_KEY")]
    pub rotate_clearance_key: bool,
    /// Key ids no longer accepted for verification (retired at startup; repeatable).
    #[arg(
        long = "retire-clearance-key",
        env = "VIBEBOX_RETIRE_CLEARANCE_KEYS",
        value_delimiter = ','
    )]
    pub retire_clearance_keys: Vec<String>,
    /// Lifetime of a clearance, in seconds.
    #[arg(long, env = "VIBEBOX_CLEARANCE_TTL_SECS", default_value_t = 60)]
    pub clearance_ttl_secs: u64,
    #[command(flatten)]
    pub audit: vibebox_audit_client::AuditArgs,
}

impl ServiceConfig for Config {
    fn server_args(&self) -> &ServerArgs {
        &self.server
    }
}

/// Serves until `shutdown` is cancelled, on `--listen` (default 127.0.0.1:7702).
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = vibebox_server_kit::bind(config.server.listen_or(DEFAULT_PORT)).await?;
    run_with_listener(config, listener, shutdown).await
}

/// Like [`run`], on an already bound listener (tests bind 127.0.0.1:0).
pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_clock(config, listener, shutdown, Arc::new(SystemTime::now)).await
}

/// Like [`run_with_listener`], with the clock that stamps clearances.
pub async fn run_with_clock(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    clock: Clock,
) -> anyhow::Result<()> {
    let state = Arc::new(open_state(&config, clock).await?);
    let material = config.server.tls_material(SERVICE_NAME)?;

    let reload_state = state.clone();
    let reload_shutdown = shutdown.clone();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot watch SIGHUP")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = reload_shutdown.cancelled() => break,
                got = hangup.recv() => {
                    if got.is_none() { break; }
                    tracing::info!("SIGHUP: reloading the policy");
                    // Errors are logged and audited by reload; the old policy stays.
                    let _ = reload_state.reload().await;
                }
            }
        }
    });

    ServerBuilder::new(SERVICE_NAME, &config.server)
        .tls(Some(material))
        .add_service_for(
            PolicyServiceServer::new(service::PolicyApi::new(state.clone())),
            service::GATEWAY_ONLY,
        )
        .add_service_for(
            ClearanceServiceServer::new(service::ClearanceApi::new(state)),
            service::GATEWAY_ONLY,
        )
        .allow_method(service::GET_CLEARANCE_KEYS, service::KEY_READERS)
        .serve(listener, shutdown)
        .await?;
    Ok(())
}

/// Loads the policy (failing on an invalid file: never start with a policy
/// the operator did not mean), the keys and the audit client.
async fn open_state(config: &Config, clock: Clock) -> anyhow::Result<PolicyState> {
    let policy = match &config.policy_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the policy file {}", path.display()))?;
            Policy::from_toml(&text)
                .with_context(|| format!("invalid policy file {}", path.display()))?
        }
        None => Policy::builtin(),
    };
    tracing::info!(
        version = policy.version(),
        digest = policy.digest(),
        "policy loaded"
    );
    let key_dir = config
        .clearance_key_dir
        .clone()
        .unwrap_or_else(|| config.server.data_dir.join("keys").join("clearance"));
    let mut keys = KeyStore::open_or_init(&key_dir)?;
    if config.rotate_clearance_key {
        keys.rotate()?;
    }
    for id in &config.retire_clearance_keys {
        keys.retire(id)?;
    }
    let audit = AuditClient::open_waiting(
        AuditClientConfig {
            outbox_dir: config.server.data_dir.join("outbox").join(SERVICE_NAME),
            audit_url: config.audit.url.clone(),
            tls: config.server.tls_material(SERVICE_NAME)?,
            source_service: SERVICE_NAME.to_owned(),
        },
        vibebox_audit_client::OPEN_PATIENCE,
    )
    .await?;
    Ok(PolicyState::new(
        policy,
        config.policy_file.clone(),
        keys,
        audit,
        Duration::from_secs(config.clearance_ttl_secs.max(1)),
        clock,
    ))
}

#[cfg(test)]
mod engine_tests;

#[cfg(test)]
mod config_tests {
    use clap::{CommandFactory, Parser};

    use super::Config;

    #[test]
    fn flags_parse_with_defaults() {
        Config::command().debug_assert();
        let c = Config::parse_from([
            "vibebox-policy",
            "--policy-file",
            "/etc/vibebox/policy.toml",
            "--retire-clearance-key",
            "ed25519:a,ed25519:b",
        ]);
        assert_eq!(c.clearance_ttl_secs, 60);
        assert_eq!(c.audit.url, "https://127.0.0.1:7704");
        assert_eq!(c.retire_clearance_keys, ["ed25519:a", "ed25519:b"]);
        assert_eq!(c.server.listen_or(super::DEFAULT_PORT).port(), 7702);
    }
}
