//! The orchestrator: the only holder of a Docker connection; creates only what
//! policy cleared.
//!
//! Code map:
//! - [`admission`]: quota, capacity, subnet and idempotency as pure functions;
//! - [`service`]: clearance checks, provisioning and lifecycle;
//! - [`operations`]: long-running operations (accepted at once, engine work
//!   in the background, settled; finished by reconcile after a crash);
//! - [`runtime`]: the seam between them and one container engine;
//! - [`streams`]: logs, exec, stats;
//! - [`forward`]: port forwarding through a forwarder container that
//!   shares the environment's network namespace;
//! - [`copy`]: files in and out (CopyTo, CopyFrom) over the archive API;
//! - [`reconcile`]: orphans, lost containers, drift, interrupted operations;
//! - [`docker`]: spec -> hardened Docker objects, and the drift comparison;
//! - [`store`]: records and used clearances (sea-orm);
//! - [`subnet`]: the environment address pool;
//! - [`keys`]: clearance verification keys (file and policy service);
//! - [`audit`]: audit events; [`grpc`]: the RuntimeService adapter;
//! - [`feed`]: the change feed the gateway's replica follows;
//! - [`lease`]: one orchestrator per database;
//! - [`lifecycle`]: activity sessions, idle stop, lifetimes and extensions;
//! - [`update`]: in-place updates (name, labels, resources applied live);
//! - [`hooks`] and [`testkit`] (feature `test-hooks` only): crash points, a
//!   held-back feed, the test image, signed clearances and a loopback harness.

pub mod admission;
pub mod audit;
pub mod copy;
pub mod docker;
pub mod egress;
pub mod feed;
pub mod forward;
pub mod grpc;
pub mod helper_image;
pub mod hooks;
pub mod keys;
pub mod lease;
pub mod lifecycle;
pub mod operations;
pub mod reconcile;
pub mod runtime;
pub mod service;
pub mod store;
pub mod streams;
pub mod subnet;
#[cfg(feature = "test-hooks")]
pub mod testkit;
pub mod update;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vibebox_audit_client::{AuditClient, AuditClientConfig};
use vibebox_proto::runtime::runtime_service_server::RuntimeServiceServer;
use vibebox_server_kit::{ServerArgs, ServerBuilder, ServiceConfig};

pub use hooks::CrashPoint;
pub use lifecycle::ActivityGuard;
pub use service::Orchestrator;

/// The service name (mTLS identity, audit source, logs).
pub const SERVICE_NAME: &str = "orchestrator";
/// Default port on 127.0.0.1.
pub const DEFAULT_PORT: u16 = 7703;

/// Orchestrator configuration.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "vibebox-orchestrator",
    about = "VibeBox orchestrator: the only holder of Docker"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub database: vibebox_db::DatabaseArgs,
    /// Policy service URL, for the clearance verification keys (empty: keys only from the file).
    #[arg(
        long,
        env = "VIBEBOX_POLICY_URL",
        default_value = "https://127.0.0.1:7702"
    )]
    pub policy_url: String,
    #[command(flatten)]
    pub audit: vibebox_audit_client::AuditArgs,
    /// File of trusted clearance public keys (hex or base64 Ed25519, one a line), in addition to the policy service's.
    #[arg(long, env = "VIBEBOX_CLEARANCE_PUBLIC_KEY_FILE")]
    pub clearance_public_key_file: Option<PathBuf>,
    /// Minimum seconds between key fetches triggered by unknown key ids.
    #[arg(long, env = "VIBEBOX_KEY_REFRESH_SECONDS", default_value_t = 10)]
    pub key_refresh_seconds: u64,
    /// Milliseconds after which the clearance key ring is fetched again from policy before it verifies a clearance (a retired key is refused within this time).
    #[arg(long, env = "VIBEBOX_KEY_RING_REFRESH_MS", default_value_t = 1000)]
    pub key_ring_refresh_ms: u64,
    /// Milliseconds after the last successful fetch beyond which the ring is not trusted (clearances refused as UNAVAILABLE, except for static keys).
    #[arg(long, env = "VIBEBOX_KEY_RING_MAX_AGE_MS", default_value_t = 2000)]
    pub key_ring_max_age_ms: u64,
    /// This installation's id, carried in a label on every Docker object (default: generated once and kept in <data-dir>/installation-id).
    #[arg(long, env = "VIBEBOX_INSTALLATION_ID")]
    pub installation_id: Option<String>,
    /// Seconds between reconcile passes (0: only at start).
    #[arg(long, env = "VIBEBOX_RECONCILE_INTERVAL", default_value_t = 30)]
    pub reconcile_interval: u64,
    /// Time between lifecycle sweeps (idle stop, lifetime expiry), e.g. 30s or 500ms (0: off).
    #[arg(long, env = "VIBEBOX_LIFECYCLE_INTERVAL", default_value = "30s", value_parser = lifecycle::parse_interval)]
    pub lifecycle_interval: Duration,
    /// Address pool environment networks get their subnets from.
    #[arg(long, env = "VIBEBOX_SUBNET_POOL", default_value = "10.213.0.0/16")]
    pub subnet_pool: String,
    /// Prefix length of each environment's subnet.
    #[arg(long, env = "VIBEBOX_SUBNET_PREFIX", default_value_t = 28)]
    pub subnet_prefix: u8,
    /// Maximum environments per team (not counting deleted or failed ones).
    #[arg(long, env = "VIBEBOX_TEAM_MAX_ENVIRONMENTS", default_value_t = 10)]
    pub team_max_environments: u32,
    /// Maximum total CPU cores per team.
    #[arg(long, env = "VIBEBOX_TEAM_MAX_CPU", default_value_t = 16.0)]
    pub team_max_cpu: f64,
    /// Maximum total memory per team, in MiB.
    #[arg(long, env = "VIBEBOX_TEAM_MAX_MEMORY_MB", default_value_t = 32768)]
    pub team_max_memory_mb: i64,
    /// Share of the host's memory that all environments together may reserve.
    #[arg(long, env = "VIBEBOX_HOST_MEMORY_SHARE", default_value_t = 0.8)]
    pub host_memory_share: f64,
    /// Health check command run in every environment (exec form, space separated).
    #[arg(long, env = "VIBEBOX_HEALTH_CMD", default_value = "true")]
    pub health_cmd: String,
    /// Seconds a stop waits before killing, when the request sets none.
    #[arg(long, env = "VIBEBOX_STOP_TIMEOUT", default_value_t = 10)]
    pub stop_timeout: u32,
    /// Extra labels (key=value) on every Docker object this installation creates.
    #[arg(
        long = "docker-label",
        env = "VIBEBOX_DOCKER_LABELS",
        value_delimiter = ','
    )]
    pub docker_labels: Vec<String>,
    /// The outbound networks egress gates join, comma separated; the first gives them their default route (each created as a plain bridge when missing; never removed). Point it at networks of your own to give environments a different way out.
    #[arg(
        long,
        env = "VIBEBOX_EGRESS_NETWORK",
        default_value = "vibebox-egress",
        value_delimiter = ','
    )]
    pub egress_network: Vec<String>,
    /// Upstream DNS servers of the egress gates (IP:PORT, comma separated; default: the engine's resolver as the gates see it).
    #[arg(long, env = "VIBEBOX_EGRESS_DNS", value_delimiter = ',')]
    pub egress_dns: Vec<std::net::SocketAddr>,
    /// Address ranges no environment may reach whatever its rules say (for example the engine host's public addresses), comma separated. Loopback, link-local, metadata and the environments' own pool are always refused.
    #[arg(long, env = "VIBEBOX_EGRESS_DENY", value_delimiter = ',')]
    pub egress_deny: Vec<ipnet::IpNet>,
    /// The VibeBox executable the helper image (egress gates, port forwarding) is built from (default: this one).
    #[arg(long, env = "VIBEBOX_HELPER_EXECUTABLE")]
    pub helper_executable: Option<PathBuf>,
    #[command(flatten)]
    pub docker: DockerEndpoint,
    /// Test hook: every change on the environment feed is held back this
    /// long (a slow feed, to show that the gateway never reads stale state).
    #[cfg(feature = "test-hooks")]
    #[arg(skip)]
    pub feed_delay: Duration,
}

/// Where the Docker Engine is: the local socket by default, or a TCP endpoint
/// with mutual TLS (Docker-in-Docker in a cluster), configured the way the
/// docker CLI is (`DOCKER_HOST`, `DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DockerEndpoint {
    /// Docker Engine address: unix:///path, tcp://host:port or https://host:port.
    #[arg(
        long = "docker-host",
        env = "DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub host: String,
    /// Verify the engine's certificate and present ours (mutual TLS) over TCP.
    #[arg(long = "docker-tls-verify", env = "DOCKER_TLS_VERIFY", value_parser = parse_flag, default_value = "false", num_args = 0..=1, default_missing_value = "true")]
    pub tls_verify: bool,
    /// Directory with ca.pem, cert.pem and key.pem for the TLS connection.
    #[arg(long = "docker-cert-path", env = "DOCKER_CERT_PATH")]
    pub cert_path: Option<PathBuf>,
}

/// Docker's convention: any non-empty value but "0"/"false" enables TLS.
fn parse_flag(value: &str) -> Result<bool, String> {
    Ok(!matches!(
        value.trim(),
        "" | "0" | "false" | "FALSE" | "False"
    ))
}

impl DockerEndpoint {
    /// Connects (lazily: nothing is sent until the first request). A TCP
    /// endpoint with TLS verification refuses to fall back to plaintext.
    pub fn connect(&self) -> anyhow::Result<bollard::Docker> {
        const TIMEOUT_SECS: u64 = 120;
        let host = self.host.trim();
        let tls = self.tls_verify || host.starts_with("https://");
        if let Some(path) = host.strip_prefix("unix://") {
            return bollard::Docker::connect_with_unix(
                path,
                TIMEOUT_SECS,
                bollard::API_DEFAULT_VERSION,
            )
            .with_context(|| format!("connecting to Docker at {host}"));
        }
        let address = host
            .strip_prefix("tcp://")
            .or_else(|| host.strip_prefix("https://"))
            .or_else(|| host.strip_prefix("http://"))
            .with_context(|| {
                format!("unsupported Docker host {host:?}: use unix://, tcp:// or https://")
            })?;
        if !tls {
            anyhow::ensure!(
                !host.starts_with("https://"),
                "https Docker host needs certificates"
            );
            return bollard::Docker::connect_with_http(
                &format!("http://{address}"),
                TIMEOUT_SECS,
                bollard::API_DEFAULT_VERSION,
            )
            .with_context(|| format!("connecting to Docker at {host}"));
        }
        let dir = self
            .cert_path
            .clone()
            .context("DOCKER_TLS_VERIFY is set but DOCKER_CERT_PATH (--docker-cert-path) is not")?;
        for file in ["ca.pem", "cert.pem", "key.pem"] {
            anyhow::ensure!(
                dir.join(file).is_file(),
                "Docker TLS material {} is missing",
                dir.join(file).display()
            );
        }
        bollard::Docker::connect_with_ssl(
            &format!("https://{address}"),
            &dir.join("key.pem"),
            &dir.join("cert.pem"),
            &dir.join("ca.pem"),
            TIMEOUT_SECS,
            bollard::API_DEFAULT_VERSION,
        )
        .with_context(|| format!("connecting to Docker at {host} over TLS"))
    }
}

impl ServiceConfig for Config {
    fn server_args(&self) -> &ServerArgs {
        &self.server
    }
}

impl Config {
    /// A configuration with every default, state under `server.data_dir`.
    pub fn with_server(server: ServerArgs) -> Self {
        use clap::Parser;
        let mut c = Config::parse_from(["vibebox-orchestrator"]);
        c.server = server;
        c
    }
}

/// The installation id: the flag, or the one kept in the data dir (created once).
pub fn installation_id(config: &Config) -> anyhow::Result<String> {
    if let Some(id) = &config.installation_id {
        return Ok(id.clone());
    }
    let path = config.server.data_dir.join("installation-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_owned();
        if !id.is_empty() {
            return Ok(id);
        }
    }
    std::fs::create_dir_all(&config.server.data_dir)?;
    let id = uuid::Uuid::new_v4().to_string();
    std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

fn database_url(config: &Config) -> String {
    config
        .database
        .url_or_default(&config.server.data_dir, SERVICE_NAME)
}

/// The RuntimeService handler, with the feed delay of test builds.
fn runtime_handler(
    config: &Config,
    orchestrator: Orchestrator,
    shutdown: CancellationToken,
) -> grpc::RuntimeHandler {
    let handler = grpc::RuntimeHandler::new(orchestrator, shutdown)
        .spool_dir(config.server.data_dir.join("spool"));
    #[cfg(feature = "test-hooks")]
    let handler = handler.feed_delay(config.feed_delay);
    #[cfg(not(feature = "test-hooks"))]
    let _ = config;
    handler
}

fn outbox_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("outbox").join(SERVICE_NAME)
}

/// Opens storage, Docker, keys and the audit outbox, and builds the
/// orchestrator (without serving or reconciling).
pub async fn build(config: &Config) -> anyhow::Result<Orchestrator> {
    let tls = config
        .server
        .tls_material(SERVICE_NAME)
        .context("loading TLS material")?;
    let store = store::Store::open(&database_url(config))
        .await
        .context("opening the database")?;
    let docker = config.docker.connect()?;
    let mut static_keys = Vec::new();
    if let Some(path) = &config.clearance_public_key_file {
        static_keys = keys::load_key_file(path)?;
    }
    let policy = if config.policy_url.is_empty() {
        None
    } else {
        Some(vibebox_server_kit::connect(&config.policy_url, &tls)?)
    };
    let keys = keys::ClearanceKeys::new(
        static_keys,
        policy,
        keys::KeyRefresh {
            every: Duration::from_millis(config.key_ring_refresh_ms),
            max_age: Duration::from_millis(
                config.key_ring_max_age_ms.max(config.key_ring_refresh_ms),
            ),
            unknown_key_min_interval: Duration::from_secs(config.key_refresh_seconds),
        },
    );
    let audit_client = AuditClient::open_waiting(
        AuditClientConfig {
            outbox_dir: outbox_dir(&config.server.data_dir),
            audit_url: config.audit.url.clone(),
            tls,
            source_service: SERVICE_NAME.into(),
        },
        vibebox_audit_client::OPEN_PATIENCE,
    )
    .await
    .context("opening the audit outbox")?;
    let extra_labels = config
        .docker_labels
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--docker-label {l:?} is not key=value"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let settings = service::Settings {
        installation: installation_id(config)?,
        subnet_pool: config.subnet_pool.parse()?,
        subnet_prefix: config.subnet_prefix,
        quotas: service::Quotas {
            max_environments: config.team_max_environments,
            max_cpu_nanos: (config.team_max_cpu * 1e9) as i64,
            max_memory_bytes: config.team_max_memory_mb * 1024 * 1024,
        },
        host_memory_share: config.host_memory_share,
        health_cmd: config
            .health_cmd
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        extra_labels,
        default_stop_timeout: config.stop_timeout,
        egress: egress::EgressSettings {
            networks: config.egress_network.clone(),
            dns: config.egress_dns.clone(),
            deny: config.egress_deny.clone(),
            helper_executable: config.helper_executable.clone(),
        },
    };
    Ok(Orchestrator::new(
        docker,
        store,
        keys,
        audit::Audit::new(audit_client),
        settings,
    )
    .await?)
}

/// Reconciles once now, then every `interval` (if non-zero) until shutdown.
pub fn spawn_reconciler(
    orchestrator: Orchestrator,
    interval: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match orchestrator.reconcile().await {
                Ok(r) => tracing::debug!(?r, "reconcile pass"),
                Err(e) => tracing::warn!(error = %e, "reconcile pass failed"),
            }
            // The lifecycle sweeper starts after the first pass.
            orchestrator.mark_reconciled();
            if interval.is_zero() {
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    })
}

/// Serves an orchestrator's RuntimeService (gateway callers only) on
/// `listener` until shutdown.
pub async fn serve(
    orchestrator: Orchestrator,
    config: &Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = config.server.tls_material(SERVICE_NAME)?;
    ServerBuilder::new(SERVICE_NAME, &config.server)
        .tls(Some(tls))
        .allow_callers(&["gateway"])
        .add_service(RuntimeServiceServer::new(runtime_handler(
            config,
            orchestrator.clone(),
            shutdown.clone(),
        )))
        .serve(listener, shutdown)
        .await?;
    // Operations still in flight get a short grace, then are abandoned as
    // a crash would abandon them: the next reconcile pass finishes them.
    orchestrator
        .shutdown_operations(operations::OPERATION_GRACE)
        .await;
    Ok(())
}

/// Runs the orchestrator on `listener` until shutdown (for tests and `vibebox up`).
pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Some(lease) = hold_installation(&config, &shutdown).await? else {
        return Ok(());
    };
    run_holding(config, lease, listener, shutdown).await
}

/// Runs the orchestrator on its configured address until shutdown. The
/// address is bound once the installation's lease is held: a process that
/// waits for it refuses connections instead of leaving them unanswered.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(lease) = hold_installation(&config, &shutdown).await? else {
        return Ok(());
    };
    let listener = vibebox_server_kit::bind(config.server.listen_or(DEFAULT_PORT)).await?;
    run_holding(config, lease, listener, shutdown).await
}

/// Exit code of a process that lost its installation's lease.
pub const LEASE_LOST_EXIT_CODE: i32 = 75;

/// Takes the installation's lease (see [`lease`]), waiting while another
/// process holds it; `None` when shut down meanwhile.
async fn hold_installation(
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<lease::Lease>> {
    let (url, installation) = (database_url(config), installation_id(config)?);
    tokio::select! {
        lease = lease::acquire(&url, &installation) => lease.map(Some),
        () = shutdown.cancelled() => Ok(None),
    }
}

async fn run_holding(
    config: Config,
    lease: lease::Lease,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Losing the lease ends the process at once, as a crash would: another
    // process may already act for the installation, and a graceful stop
    // would let in-flight operations and a running reconcile pass go on
    // beside it. What they leave half done, the next holder's reconcile
    // repairs.
    let lost = lease.lost();
    let exit_on_loss = tokio::spawn(async move {
        lost.cancelled().await;
        tracing::error!(
            "lost the installation lease: exiting so that no other process acts beside this one"
        );
        std::process::exit(LEASE_LOST_EXIT_CODE);
    });
    let orchestrator = build(&config).await?;
    let reconciler = spawn_reconciler(
        orchestrator.clone(),
        Duration::from_secs(config.reconcile_interval),
        shutdown.clone(),
    );
    let sweeper = lifecycle::spawn_sweeper(
        orchestrator.clone(),
        config.lifecycle_interval,
        shutdown.clone(),
    );
    egress::spawn_gate_watch(orchestrator.clone(), shutdown.clone());
    let result = serve(orchestrator, &config, listener, shutdown).await;
    sweeper.abort();
    reconciler.abort();
    exit_on_loss.abort();
    drop(lease);
    result
}
