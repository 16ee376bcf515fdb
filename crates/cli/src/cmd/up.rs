//! `vibebox up`: all five services in one process, each on its own loopback
//! port, connected over mutual TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vibebox_server_kit::{LogFormat, TelemetryArgs, TlsMaterial};

/// Flags of `vibebox up`.
#[derive(clap::Args, Debug)]
pub(crate) struct UpArgs {
    /// Directory for databases, keys, certificates, the admin token and the
    /// audit outbox. A second `up` on the same directory keeps all data.
    #[arg(long, env = "VIBEBOX_DATA_DIR", default_value = ".vibebox")]
    data_dir: PathBuf,
    /// Public gRPC address of the gateway (plaintext).
    #[arg(long, env = "VIBEBOX_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Prometheus metrics address of the gateway.
    #[arg(long, env = "VIBEBOX_METRICS_LISTEN", default_value = "127.0.0.1:7709")]
    metrics_listen: SocketAddr,
    /// Log format.
    #[arg(long, env = "VIBEBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "VIBEBOX_LOG", default_value = "info")]
    log_filter: String,
    /// Security policy document (TOML; reloaded on SIGHUP). Default: the
    /// built-in policy (crates/policy/README.md).
    #[arg(long, env = "VIBEBOX_POLICY_FILE")]
    policy_file: Option<PathBuf>,
    /// Outbound networks of the environments' egress gates, comma separated
    /// (default: `vibebox-egress`, created when missing).
    #[arg(long, env = "VIBEBOX_EGRESS_NETWORK")]
    egress_network: Option<String>,
    /// Upstream DNS servers of the egress gates (IP:PORT, comma separated).
    #[arg(long, env = "VIBEBOX_EGRESS_DNS")]
    egress_dns: Option<String>,
    /// Ranges no environment reaches whatever its policy says (CIDRs, comma
    /// separated), for example this host's public addresses.
    #[arg(long, env = "VIBEBOX_EGRESS_DENY")]
    egress_deny: Option<String>,
}

struct Internal {
    name: &'static str,
    listener: TcpListener,
    url: String,
}

async fn internal(name: &'static str) -> anyhow::Result<Internal> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .with_context(|| format!("binding a loopback port for {name}"))?;
    let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
    Ok(Internal {
        name,
        listener,
        url,
    })
}

fn args(binary: &str, data_dir: &Path, extra: &[(&str, &str)]) -> Vec<String> {
    let mut out = vec![
        binary.to_owned(),
        "--data-dir".to_owned(),
        data_dir.display().to_string(),
    ];
    for (flag, value) in extra {
        out.push(format!("--{flag}"));
        out.push((*value).to_owned());
    }
    out
}

/// Locks the data directory for this `up` (released when the process ends,
/// however it ends): a second `up` on it fails at once with a clear error
/// instead of running a second platform on the same databases.
fn claim_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    use vibebox_server_kit::lockfile::{Claim, claim};
    let path = data_dir.join("up.lock");
    match claim(&path, &format!("process {}", std::process::id()))
        .with_context(|| format!("locking {}", path.display()))?
    {
        Claim::Held(file) => Ok(file),
        Claim::Busy { holder } => anyhow::bail!(
            "the data directory {} is in use by another `vibebox up` ({holder}); stop it, or pass another --data-dir",
            data_dir.display()
        ),
    }
}

pub(crate) async fn run(up: UpArgs) -> anyhow::Result<()> {
    let _telemetry = vibebox_server_kit::telemetry::init(
        "vibebox",
        &TelemetryArgs {
            log_format: up.log_format,
            log_filter: up.log_filter.clone(),
        },
    )?;
    std::fs::create_dir_all(&up.data_dir)
        .with_context(|| format!("creating {}", up.data_dir.display()))?;
    let data_dir = up.data_dir.canonicalize()?;
    let _in_use = claim_data_dir(&data_dir)?;
    let pki = data_dir.join("pki");
    vibebox_server_kit::pki::ensure_dev_pki(&pki, vibebox_server_kit::pki::SERVICES, &[])
        .context("generating the development PKI")?;

    let audit = internal("audit").await?;
    let identity = internal("identity").await?;
    let policy = internal("policy").await?;
    let orchestrator = internal("orchestrator").await?;
    let public = vibebox_server_kit::bind(up.listen).await?;
    let metrics = vibebox_server_kit::bind(up.metrics_listen).await?;
    let gateway_addr = public.local_addr()?;
    let metrics_addr = metrics.local_addr()?;

    let shutdown = CancellationToken::new();
    let mut tasks: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    let urls = [
        ("audit-url", audit.url.clone()),
        ("identity-url", identity.url.clone()),
        ("policy-url", policy.url.clone()),
        ("orchestrator-url", orchestrator.url.clone()),
    ];
    let peer = |name: &str| -> (&str, &str) {
        let (flag, url) = urls
            .iter()
            .find(|(f, _)| f.starts_with(name))
            .expect("known peer");
        (flag, url.as_str())
    };

    let config = vibebox_audit::Config::parse_from(args("vibebox-audit", &data_dir, &[]));
    let token = shutdown.clone();
    tasks.spawn(async move {
        (
            "audit",
            vibebox_audit::run_with_listener(config, audit.listener, token).await,
        )
    });

    let config =
        vibebox_identity::Config::parse_from(args("vibebox-identity", &data_dir, &[peer("audit")]));
    let token = shutdown.clone();
    tasks.spawn(async move {
        (
            "identity",
            vibebox_identity::run_with_listener(config, identity.listener, token).await,
        )
    });

    let policy_file = match &up.policy_file {
        Some(p) => Some(
            p.canonicalize()
                .with_context(|| format!("reading {}", p.display()))?
                .display()
                .to_string(),
        ),
        None => None,
    };
    let mut policy_args = vec![peer("audit")];
    if let Some(p) = &policy_file {
        policy_args.push(("policy-file", p.as_str()));
    }
    let config =
        vibebox_policy::Config::parse_from(args("vibebox-policy", &data_dir, &policy_args));
    let token = shutdown.clone();
    tasks.spawn(async move {
        (
            "policy",
            vibebox_policy::run_with_listener(config, policy.listener, token).await,
        )
    });

    let mut orchestrator_args = vec![peer("audit"), peer("policy")];
    for (flag, value) in [
        ("egress-network", &up.egress_network),
        ("egress-dns", &up.egress_dns),
        ("egress-deny", &up.egress_deny),
    ] {
        if let Some(v) = value {
            orchestrator_args.push((flag, v.as_str()));
        }
    }
    let config = vibebox_orchestrator::Config::parse_from(args(
        "vibebox-orchestrator",
        &data_dir,
        &orchestrator_args,
    ));
    let token = shutdown.clone();
    tasks.spawn(async move {
        (
            "orchestrator",
            vibebox_orchestrator::run_with_listener(config, orchestrator.listener, token).await,
        )
    });

    let metrics_flag = metrics_addr.to_string();
    let config = vibebox_gateway::Config::parse_from(args(
        "vibebox-gateway",
        &data_dir,
        &[
            peer("audit"),
            peer("identity"),
            peer("policy"),
            peer("orchestrator"),
            ("metrics-listen", metrics_flag.as_str()),
        ],
    ));
    let token = shutdown.clone();
    tasks.spawn(async move {
        (
            "gateway",
            vibebox_gateway::run_with_listeners(config, public, metrics, token).await,
        )
    });

    tokio::spawn(vibebox_server_kit::cancel_on_signal(shutdown.clone()));

    let material = TlsMaterial::from_files(
        &pki.join("ca.pem"),
        &pki.join("gateway.pem"),
        &pki.join("gateway-key.pem"),
    )?;
    let mut checks = vec![(
        "gateway",
        vibebox_server_kit::connect_plaintext(&format!("http://{gateway_addr}"))?,
    )];
    for (name, url) in [
        (audit.name, &urls[0].1),
        (identity.name, &urls[1].1),
        (policy.name, &urls[2].1),
        (orchestrator.name, &urls[3].1),
    ] {
        checks.push((name, vibebox_server_kit::connect(url, &material)?));
    }
    let wait = async {
        for (name, channel) in checks {
            wait_healthy(name, channel).await?;
        }
        anyhow::Ok(())
    };
    tokio::select! {
        ready = wait => ready?,
        Some(exited) = tasks.join_next() => {
            shutdown.cancel();
            let (name, result) = exited?;
            match result {
                Ok(()) => bail!("{name} stopped during startup"),
                Err(e) => return Err(e.context(format!("{name} failed to start"))),
            }
        }
        _ = shutdown.cancelled() => {}
    }

    if !shutdown.is_cancelled() {
        write_services_file(&data_dir, &gateway_addr.to_string(), &urls)?;
        let token_file = data_dir.join("admin.token");
        let shown = relative(&token_file);
        println!("VibeBox is up.");
        println!("  gateway listening on {gateway_addr} (plaintext gRPC)");
        println!("  metrics:      http://{metrics_addr}/metrics");
        println!("  data dir:     {}", data_dir.display());
        println!("  admin token:  {}", token_file.display());
        println!("Try:");
        println!(
            "  grpcurl -plaintext -H \"authorization: Bearer $(cat {shown})\" {gateway_addr} list"
        );
        println!(
            "  grpcurl -plaintext -H \"authorization: Bearer $(cat {shown})\" {gateway_addr} vibebox.identity.v1.IdentityService/WhoAmI"
        );
        println!("Press Ctrl-C to stop.");
    }

    let mut failure = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        Some(exited) = tasks.join_next() => {
            let (name, result) = exited?;
            failure = (!shutdown.is_cancelled() || result.is_err()).then(|| match result {
                Ok(()) => anyhow::anyhow!("{name} stopped unexpectedly"),
                Err(e) => e.context(format!("{name} failed")),
            });
            shutdown.cancel();
        }
    }
    let drain = async {
        while let Some(exited) = tasks.join_next().await {
            if let Ok((name, Err(e))) = exited {
                tracing::warn!("{name} stopped with an error: {e:#}");
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(15), drain)
        .await
        .is_err()
    {
        tracing::warn!("services did not stop within 15 s");
    }
    match failure {
        Some(e) => Err(e),
        None => {
            println!("VibeBox stopped.");
            Ok(())
        }
    }
}

/// Writes `<data-dir>/services.toml`: where this `up` serves each service
/// (internal ones over mutual TLS with the certificates in `pki/`), so that
/// operators and tests can reach them. Replaced on every start.
fn write_services_file(
    data_dir: &Path,
    gateway: &str,
    internal: &[(&str, String)],
) -> anyhow::Result<()> {
    let mut text = String::from(
        "# Written by `vibebox up` on every start: where each service listens.\n\
         # Internal services speak mutual TLS only (certificates in pki/).\n",
    );
    text.push_str(&format!("gateway = \"http://{gateway}\"\n"));
    for (flag, url) in internal {
        let name = flag.trim_end_matches("-url");
        text.push_str(&format!("{name} = \"{url}\"\n"));
    }
    let path = data_dir.join("services.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

fn relative(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(|p| p.display().to_string()))
        .unwrap_or_else(|| path.display().to_string())
}

async fn wait_healthy(name: &str, channel: vibebox_server_kit::GrpcChannel) -> anyhow::Result<()> {
    let mut client = HealthClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status);
        if matches!(status, Ok(s) if s == ServingStatus::Serving as i32) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} did not become healthy within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod config_tests {
    use clap::CommandFactory;

    /// Every service's flags, shared blocks flattened in, form a valid
    /// command (no two arguments share an id or a flag).
    #[test]
    fn every_service_configuration_is_a_valid_command() {
        vibebox_identity::Config::command().debug_assert();
        vibebox_policy::Config::command().debug_assert();
        vibebox_orchestrator::Config::command().debug_assert();
        vibebox_audit::Config::command().debug_assert();
        vibebox_gateway::Config::command().debug_assert();
    }

    #[test]
    fn shared_blocks_keep_their_flags_and_defaults() {
        let identity = <vibebox_identity::Config as clap::Parser>::parse_from(["vibebox-identity"]);
        assert_eq!(identity.audit.url, vibebox_audit_client::DEFAULT_AUDIT_URL);
        let dir = std::path::Path::new("/data");
        assert_eq!(
            identity.database.url_or_default(dir, "identity"),
            vibebox_db::sqlite_url(&dir.join("identity.db"))
        );
        let command = vibebox_orchestrator::Config::command();
        for flag in ["database-url", "audit-url"] {
            assert!(
                command.get_arguments().any(|a| a.get_long() == Some(flag)),
                "--{flag}"
            );
        }
    }
}
