//! Deployment helpers shipped in the service images.
//!
//! - [`init_pki`] (binary `vibebox-pki-init`): the one-shot step of the docker
//!   compose deployment that creates the development CA and one certificate
//!   per service, with the compose service names as extra DNS names.
//! - [`probe`] (binary `vibebox-health-probe`): asks a service's
//!   `grpc.health.v1.Health/Check` over mutual TLS (or plaintext for the
//!   gateway's public port) and exits 0 only when it answers `SERVING`. The
//!   images have no shell, so container healthchecks run this binary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vibebox_server_kit::TlsMaterial;

pub use vibebox_server_kit::pki::SERVICES;

/// Flags of `vibebox-pki-init`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "vibebox-pki-init",
    version,
    about = "Creates the development PKI (idempotent)."
)]
pub struct PkiInitArgs {
    /// Directory receiving ca.pem, ca-key.pem, <service>.pem and <service>-key.pem.
    #[arg(long, env = "VIBEBOX_PKI_DIR", default_value = "/pki")]
    pub dir: PathBuf,
    /// Extra DNS names put in every service certificate (repeatable, or comma separated).
    #[arg(long = "host", env = "VIBEBOX_PKI_HOSTS", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Also copy each service's own material (ca.pem, <service>.pem,
    /// <service>-key.pem, never the CA key) into <DIR>/<service>/, one
    /// volume per service: no service can read the CA key or another
    /// service's key.
    #[arg(long, env = "VIBEBOX_PKI_DISTRIBUTE")]
    pub distribute: Option<PathBuf>,
}

/// Creates what is missing of the CA and the certificates of the five services.
pub fn init_pki(dir: &Path, hosts: &[String]) -> anyhow::Result<()> {
    let hosts: Vec<&str> = hosts
        .iter()
        .map(String::as_str)
        .filter(|h| !h.is_empty())
        .collect();
    vibebox_server_kit::pki::ensure_dev_pki(dir, SERVICES, &hosts)
        .with_context(|| format!("creating the development PKI in {}", dir.display()))
}

/// Copies each service's own material from `dir` into `out/<service>/`
/// (keys with mode 0600), replacing what is there.
pub fn distribute(dir: &Path, out: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    for service in SERVICES {
        let target = out.join(service);
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        for (name, mode) in [
            ("ca.pem".to_owned(), 0o644),
            (format!("{service}.pem"), 0o644),
            (format!("{service}-key.pem"), 0o600),
        ] {
            let from = dir.join(&name);
            let to = target.join(&name);
            let bytes =
                std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
            // Written aside, then renamed: a service never reads half a key.
            let partial = target.join(format!(".{name}.partial"));
            std::fs::write(&partial, bytes)
                .with_context(|| format!("writing {}", partial.display()))?;
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("restricting {}", partial.display()))?;
            std::fs::rename(&partial, &to).with_context(|| format!("writing {}", to.display()))?;
        }
    }
    Ok(())
}

/// Flags of `vibebox-health-probe`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "vibebox-health-probe",
    version,
    about = "Exits 0 when a VibeBox service's gRPC health check answers SERVING."
)]
pub struct ProbeArgs {
    /// Service URL: https://host:port (mutual TLS) or http://host:port (plaintext).
    #[arg(long, env = "VIBEBOX_PROBE_URL")]
    pub url: String,
    /// Health service name to ask about ("" is the whole server).
    #[arg(long, default_value = "")]
    pub service: String,
    /// PEM certificate presented to the service (https only).
    #[arg(long, env = "VIBEBOX_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key matching --tls-cert.
    #[arg(long, env = "VIBEBOX_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate the service's certificate must chain to.
    #[arg(long, env = "VIBEBOX_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 3000)]
    pub timeout_ms: u64,
}

/// Checks the health of the service at `args.url`; `Ok(())` means SERVING.
pub async fn probe(args: &ProbeArgs) -> anyhow::Result<()> {
    let channel = if args.url.starts_with("https://") {
        let (Some(ca), Some(cert), Some(key)) = (&args.tls_ca, &args.tls_cert, &args.tls_key)
        else {
            anyhow::bail!("an https URL needs --tls-ca, --tls-cert and --tls-key");
        };
        let material = TlsMaterial::from_files(ca, cert, key)?;
        vibebox_server_kit::connect(&args.url, &material)?
    } else {
        vibebox_server_kit::connect_plaintext(&args.url)?
    };
    let mut client = HealthClient::new(channel);
    let check = client.check(HealthCheckRequest {
        service: args.service.clone(),
    });
    let response = tokio::time::timeout(Duration::from_millis(args.timeout_ms), check)
        .await
        .context("health check timed out")?
        .context("health check failed")?;
    let status = response.into_inner().status();
    anyhow::ensure!(status == ServingStatus::Serving, "service is {status:?}");
    Ok(())
}
