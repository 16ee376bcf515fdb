//! The audit service: an append-only, hash-chained audit log with queries,
//! a live watch stream and alert rules.
//!
//! Code map: [`entity`] + [`store`] (sea-orm storage), [`log`] (the single
//! writer: batching, sequences, hashes, checkpoints, alerts), [`alerts`]
//! (rules), [`integrity`] (receipts and the head record: cut tails),
//! [`filter`] (event filters), [`service`] (query / verify / export),
//! [`grpc`] (the gRPC services). The chain format itself lives in
//! `vibebox-audit-chain`.

pub mod alerts;
pub mod entity;
pub mod filter;
pub mod grpc;
pub mod integrity;
pub mod log;
pub mod service;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vibebox_audit_chain::CheckpointSigner;
use vibebox_proto::audit::audit_service_server::AuditServiceServer;
use vibebox_proto::audit_ingest::audit_ingest_service_server::AuditIngestServiceServer;
use vibebox_proto::audit_ingest::audit_receipt_service_server::AuditReceiptServiceServer;
use vibebox_server_kit::{ServerArgs, ServerBuilder, ServiceConfig};

use crate::alerts::AlertConfig;
use crate::grpc::{AuditHandler, INGEST_CALLERS, IngestHandler, READ_CALLERS, ReceiptHandler};
use crate::integrity::HeadRecord;
use crate::log::Log;
use crate::store::Store;

/// The service's binary (its name in `--help`, and where `Config::new`
/// reads its defaults from).
const BINARY: &str = "vibebox-audit";
/// The service name (certificate identity, logs).
pub const SERVICE_NAME: &str = "audit";
/// Default port on loopback.
pub const DEFAULT_PORT: u16 = 7704;

/// Configuration of the audit service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "vibebox-audit",
    version,
    about = "VibeBox audit service: append-only, hash-chained audit log"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub database: vibebox_db::DatabaseArgs,
    /// Checkpoint signing key (Ed25519, PKCS#8 PEM), created if missing;
    /// default <data-dir>/keys/audit-checkpoint.pem (public key beside it, .pub.pem).
    #[arg(long, env = "VIBEBOX_AUDIT_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
    /// Sign a checkpoint of the chain head every this many events.
    #[arg(
        long,
        env = "VIBEBOX_AUDIT_CHECKPOINT_INTERVAL",
        default_value_t = 1000
    )]
    pub checkpoint_interval: u64,
    /// The audit service's own record of the chain head, rewritten after every commit and checked at start: keep it outside the audit database (default <data-dir>/audit-head).
    #[arg(long, env = "VIBEBOX_AUDIT_HEAD_RECORD")]
    pub head_record: Option<PathBuf>,
    /// Alert when one user performs more than this many Docker operations in an hour (0 = off).
    #[arg(
        long,
        env = "VIBEBOX_AUDIT_ALERT_USER_OPS_PER_HOUR",
        default_value_t = 100
    )]
    pub alert_user_ops_per_hour: usize,
    /// Alert when more than this many environment creations fail in an hour (0 = off).
    #[arg(
        long,
        env = "VIBEBOX_AUDIT_ALERT_FAILED_CREATES_PER_HOUR",
        default_value_t = 10
    )]
    pub alert_failed_creates_per_hour: usize,
    /// Policy rule ids whose appearance in an event's details raises a critical alert at once.
    #[arg(
        long,
        env = "VIBEBOX_AUDIT_ALERT_CRITICAL_RULES",
        value_delimiter = ',',
        default_values_t = ["mount.docker_socket".to_owned(), "privileged".to_owned()]
    )]
    pub alert_critical_rules: Vec<String>,
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

    /// The signing key path in effect.
    pub fn signing_key_path(&self) -> PathBuf {
        self.signing_key.clone().unwrap_or_else(|| {
            self.server
                .data_dir
                .join("keys")
                .join("audit-checkpoint.pem")
        })
    }

    /// The head record path in effect.
    pub fn head_record_path(&self) -> PathBuf {
        self.head_record
            .clone()
            .unwrap_or_else(|| self.server.data_dir.join("audit-head"))
    }

    /// Where the checkpoint public key is written (for offline verifiers).
    pub fn public_key_path(&self) -> PathBuf {
        self.signing_key_path().with_extension("pub.pem")
    }

    fn alert_config(&self) -> AlertConfig {
        AlertConfig {
            user_ops_threshold: self.alert_user_ops_per_hour,
            failed_creates_threshold: self.alert_failed_creates_per_hour,
            critical_rules: self.alert_critical_rules.clone(),
            ..AlertConfig::default()
        }
    }
}

/// Loads the checkpoint key, creating it (mode 0600) on first start, and
/// (re)writes its public key beside it.
pub fn load_or_create_signer(path: &Path, public_path: &Path) -> anyhow::Result<CheckpointSigner> {
    let signer = match std::fs::read_to_string(path) {
        Ok(pem) => CheckpointSigner::from_pkcs8_pem(&pem)
            .with_context(|| format!("reading the checkpoint key {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let signer = CheckpointSigner::generate();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let pem = signer.to_pkcs8_pem()?;
            write_private(path, pem.as_bytes())
                .with_context(|| format!("writing the checkpoint key {}", path.display()))?;
            tracing::info!(key_id = signer.key_id(), "created the audit checkpoint key");
            signer
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    std::fs::write(public_path, signer.public_key_pem()?)
        .with_context(|| format!("writing {}", public_path.display()))?;
    Ok(signer)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Runs the service on its configured address until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = vibebox_server_kit::bind(config.server.listen_or(DEFAULT_PORT)).await?;
    run_with_listener(config, listener, shutdown).await
}

/// Runs the service on `listener` until `shutdown` (tests pass a listener on
/// an ephemeral port). Every event acknowledged before shutdown is committed.
pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = config
        .server
        .tls_material(SERVICE_NAME)
        .context("loading the audit service's TLS material")?;
    let signer = Arc::new(load_or_create_signer(
        &config.signing_key_path(),
        &config.public_key_path(),
    )?);
    let url = config.database_url();
    let store = Store::open(&url)
        .await
        .with_context(|| format!("opening the audit database {}", vibebox_db::redact(&url)))?;
    let (log, writer) = Log::start(
        store,
        signer,
        config.alert_config(),
        config.checkpoint_interval,
        Some(HeadRecord::new(config.head_record_path())),
    )
    .await?;
    let served = ServerBuilder::new(SERVICE_NAME, &config.server)
        .tls(Some(tls))
        .add_service_for(
            AuditIngestServiceServer::new(IngestHandler::new(log.clone())),
            INGEST_CALLERS,
        )
        .add_service_for(
            AuditReceiptServiceServer::new(ReceiptHandler::new(log.clone())),
            INGEST_CALLERS,
        )
        .add_service_for(
            AuditServiceServer::new(AuditHandler::new(log.clone(), shutdown.clone())),
            READ_CALLERS,
        )
        .serve(listener, shutdown)
        .await;
    drop(log);
    // The server (and its handler clones) is gone: the writer drains and ends.
    let _ = writer.await;
    Ok(served?)
}
