//! The gateway: the only public entry; authenticates, authorizes, clears and
//! audits every call.
//!
//! It serves exactly the public services of the contract
//! (`vibebox.environment.v1.EnvironmentService`,
//! `vibebox.identity.v1.IdentityService`, `vibebox.audit.v1.AuditService`,
//! `vibebox.policy.v1.PolicyService`, plus health and reflection) on a
//! plaintext (or TLS) listener, and talks to the internal services over
//! mutual TLS with its own certificate. Nothing internal is routed: any other
//! path answers UNIMPLEMENTED.
//!
//! Code map: [`auth`] (token verification, decisions, cache), [`gateway`]
//! (the steps every call takes, trusted metadata, access audit),
//! [`services`] (one adapter per public service), [`validate`] (field
//! checks), [`ratelimit`], [`shares`] (per-user caps on streams and calls in
//! flight), [`metrics`] (Prometheus endpoint), [`error`].

mod auth;
mod authz;
mod error;
mod gateway;
mod metrics;
mod ratelimit;
mod replica;
mod services;
mod shares;
mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use vibebox_audit_client::{AuditClient, AuditClientConfig};
use vibebox_proto::audit::audit_service_server::AuditServiceServer;
use vibebox_proto::environment::environment_service_server::EnvironmentServiceServer;
use vibebox_proto::identity::identity_service_server::IdentityServiceServer;
use vibebox_proto::policy::policy_service_server::PolicyServiceServer;
use vibebox_server_kit::{ServerArgs, ServerBuilder, ServiceConfig, TlsMaterial};

use crate::gateway::{Gateway, Settings, Upstreams};

/// The service's binary (its name in `--help`, and where `Config::new`
/// reads its defaults from).
const BINARY: &str = "vibebox-gateway";
/// The service name (certificates, logs, the audit `source_service`).
pub const SERVICE_NAME: &str = "gateway";
/// Default public port (127.0.0.1).
pub const DEFAULT_PORT: u16 = 7700;

/// Gateway configuration (every flag is also a `VIBEBOX_*` variable).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "vibebox-gateway",
    about = "VibeBox gateway: the only public entry point"
)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,
    /// URL of the identity service (mutual TLS).
    #[arg(
        long,
        env = "VIBEBOX_IDENTITY_URL",
        default_value = "https://127.0.0.1:7701"
    )]
    pub identity_url: String,
    /// URL of the policy service (mutual TLS).
    #[arg(
        long,
        env = "VIBEBOX_POLICY_URL",
        default_value = "https://127.0.0.1:7702"
    )]
    pub policy_url: String,
    /// URL of the orchestrator (mutual TLS).
    #[arg(
        long,
        env = "VIBEBOX_ORCHESTRATOR_URL",
        default_value = "https://127.0.0.1:7703"
    )]
    pub orchestrator_url: String,
    #[command(flatten)]
    pub audit: vibebox_audit_client::AuditArgs,
    /// Address of the Prometheus metrics endpoint (keep it on loopback).
    #[arg(long, env = "VIBEBOX_METRICS_LISTEN", default_value = "127.0.0.1:7709")]
    pub metrics_listen: SocketAddr,
    /// PEM certificate for serving the public listener over TLS (plaintext when unset).
    #[arg(long, env = "VIBEBOX_PUBLIC_TLS_CERT", requires = "public_tls_key")]
    pub public_tls_cert: Option<PathBuf>,
    /// PEM private key matching --public-tls-cert.
    #[arg(long, env = "VIBEBOX_PUBLIC_TLS_KEY", requires = "public_tls_cert")]
    pub public_tls_key: Option<PathBuf>,
    /// Sustained requests per second allowed per user (token bucket refill rate).
    #[arg(long, env = "VIBEBOX_RATE_LIMIT_PER_SECOND", default_value_t = 20)]
    pub rate_limit_per_second: u32,
    /// Requests a user may burst above the sustained rate (token bucket size).
    #[arg(long, env = "VIBEBOX_RATE_LIMIT_BURST", default_value_t = 50)]
    pub rate_limit_burst: u32,
    /// Largest request message accepted, in bytes.
    #[arg(long, env = "VIBEBOX_MAX_REQUEST_BYTES", default_value_t = 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Deadline of forwarded unary calls, in milliseconds (a shorter client
    /// grpc-timeout wins).
    #[arg(long, env = "VIBEBOX_UPSTREAM_TIMEOUT_MS", default_value_t = 30_000)]
    pub upstream_timeout_ms: u64,
    /// Longest time an authorization decision is cached, in milliseconds
    /// (identity's cache_ttl_ms applies when shorter; at most 1000).
    #[arg(long, env = "VIBEBOX_AUTHZ_CACHE_MS", default_value_t = 1000)]
    pub authz_cache_ms: u64,
    /// Milliseconds between periodic refreshes of identity's token keys
    /// (100 to 500, so that with identity's one-second reload a retirement
    /// stays within two seconds): a key identity retires stops verifying
    /// here within this interval, and a ring identity has not confirmed for
    /// 2 s verifies nothing.
    #[arg(long, env = "VIBEBOX_TOKEN_KEYS_REFRESH_MS", default_value_t = 500)]
    pub token_keys_refresh_ms: u64,
    /// Streams (exec, log and stats follows, audit watch and export) one
    /// user may hold open at once; more are RESOURCE_EXHAUSTED with a
    /// QuotaFailure.
    #[arg(long, env = "VIBEBOX_USER_MAX_STREAMS", default_value_t = 16)]
    pub user_max_streams: usize,
    /// Short (unary) calls one user may have in flight at once; more are
    /// RESOURCE_EXHAUSTED with a QuotaFailure.
    #[arg(long, env = "VIBEBOX_USER_MAX_IN_FLIGHT", default_value_t = 32)]
    pub user_max_in_flight: usize,
    /// Streams the gateway holds open at once, all users together (more are
    /// RESOURCE_EXHAUSTED with a RetryInfo). Open streams do not count
    /// against --max-concurrency, which bounds calls in flight; keep the
    /// internal services' --max-concurrency above this plus the gateway's.
    #[arg(long, env = "VIBEBOX_MAX_STREAMS", default_value_t = 256)]
    pub max_streams: usize,
    /// Milliseconds between re-authorizations of every open stream: a
    /// revoked token, a disabled user, a demotion or a removal from the team
    /// ends the stream at the next check that misses the decision cache
    /// (within this plus --authz-cache-ms; at most 500, so that the two
    /// stay within two seconds).
    #[arg(long, env = "VIBEBOX_STREAM_RECHECK_MS", default_value_t = 500)]
    pub stream_recheck_ms: u64,
    /// How old a `WatchEnvironments` resume token may be, in milliseconds
    /// (default a day): an older one is FAILED_PRECONDITION with reason
    /// `watch.resume_token_expired`, and the client lists again. Keep it
    /// within how long the orchestrator keeps deleted records.
    #[arg(
        long,
        env = "VIBEBOX_WATCH_RESUME_RETENTION_MS",
        default_value_t = 86_400_000
    )]
    pub watch_resume_retention_ms: u64,
    /// How far, in milliseconds, a `WatchEnvironments` stream may fall
    /// behind before it ends ABORTED with reason `watch.fell_behind` (the
    /// client resumes with its last token): its client takes no message for
    /// this long, or the change it is about to send is this much older than
    /// the newest one. The gateway holds every change a watcher has not sent
    /// yet: this bounds what one client that does not read can pin.
    #[arg(long, env = "VIBEBOX_WATCH_MAX_LAG_MS", default_value_t = 10_000)]
    pub watch_max_lag_ms: u64,
}

impl ServiceConfig for Config {
    fn server_args(&self) -> &ServerArgs {
        &self.server
    }
}

impl Config {
    /// A configuration with defaults for `server`, pointing at the given
    /// internal service URLs (tests, `vibebox up`).
    pub fn new(server: ServerArgs) -> Self {
        use clap::Parser;
        let mut config = Config::parse_from([BINARY]);
        config.server = server;
        config
    }
}

/// Binds the public and metrics listeners and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let public = vibebox_server_kit::bind(config.server.listen_or(DEFAULT_PORT)).await?;
    let metrics = vibebox_server_kit::bind(config.metrics_listen).await?;
    run_with_listeners(config, public, metrics, shutdown).await
}

/// Serves on already bound listeners (tests bind `127.0.0.1:0`).
pub async fn run_with_listeners(
    config: Config,
    public: TcpListener,
    metrics_listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let material = config
        .server
        .tls_material(SERVICE_NAME)
        .context("loading the gateway's TLS material")?;
    let connect = |url: &str| {
        vibebox_server_kit::connect(url, &material).with_context(|| format!("connecting to {url}"))
    };
    let audit_channel = connect(&config.audit.url)?;
    let upstreams = Upstreams {
        identity: connect(&config.identity_url)?,
        policy: connect(&config.policy_url)?,
        orchestrator: connect(&config.orchestrator_url)?,
        audit: connect(&config.audit.url)?,
    };
    let audit_log = AuditClient::open_waiting(
        AuditClientConfig {
            outbox_dir: config.server.data_dir.join("outbox").join(SERVICE_NAME),
            audit_url: config.audit.url.clone(),
            tls: material.clone(),
            source_service: SERVICE_NAME.to_owned(),
        },
        vibebox_audit_client::OPEN_PATIENCE,
    )
    .await
    .context("opening the audit outbox")?;
    let settings = Settings {
        rate_per_second: config.rate_limit_per_second,
        rate_burst: config.rate_limit_burst,
        upstream_timeout: Duration::from_millis(config.upstream_timeout_ms.max(1)),
        decision_cache_ttl: Duration::from_millis(config.authz_cache_ms),
        shares: shares::ShareLimits {
            user_streams: config.user_max_streams,
            user_in_flight: config.user_max_in_flight,
            streams: config.max_streams,
        },
        stream_recheck: Duration::from_millis(config.stream_recheck_ms.clamp(50, 500)),
        watch_retention: Duration::from_millis(config.watch_resume_retention_ms.max(1)),
        watch_max_lag: Duration::from_millis(config.watch_max_lag_ms.max(100)),
    };
    let orchestrator = upstreams.orchestrator.clone();
    let gateway = Arc::new(Gateway::new(upstreams, audit_log, &settings));

    let public_tls = match (&config.public_tls_cert, &config.public_tls_key) {
        (Some(cert), Some(key)) => Some(TlsMaterial {
            ca_pem: material.ca_pem.clone(),
            cert_pem: std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
            key_pem: std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
        }),
        _ => None,
    };

    let background = shutdown.child_token();
    tokio::spawn(gateway.clone().maintain(
        Duration::from_millis(config.token_keys_refresh_ms.clamp(100, 500)),
        background.clone(),
    ));
    tokio::spawn(
        gateway
            .replica
            .clone()
            .follow(orchestrator, background.clone()),
    );
    metrics::handle();
    tracing::info!(addr = ?metrics_listener.local_addr().ok(), "serving metrics");
    tokio::spawn(metrics::serve(metrics_listener, background.clone()));
    tokio::spawn(metrics::watch_alerts(audit_channel, background.clone()));

    let limit = config.max_request_bytes;
    let result = ServerBuilder::new(SERVICE_NAME, &config.server)
        .tls(public_tls)
        .add_service(authz::guard(services::wait::LongUnary::new(
            EnvironmentServiceServer::new(services::environment::Environments {
                gateway: gateway.clone(),
            })
            .max_decoding_message_size(limit),
            gateway.clone(),
            limit,
        )))
        .add_service(authz::guard(
            IdentityServiceServer::new(services::identity::Identity {
                gateway: gateway.clone(),
            })
            .max_decoding_message_size(limit),
        ))
        .add_service(authz::guard(
            AuditServiceServer::new(services::audit::Audit {
                gateway: gateway.clone(),
            })
            .max_decoding_message_size(limit),
        ))
        .add_service(authz::guard(
            PolicyServiceServer::new(services::policy::Policy { gateway })
                .max_decoding_message_size(limit),
        ))
        .serve(public, shutdown)
        .await;
    background.cancel();
    result.context("serving the public listener")
}
