//! Test and benchmark support: a tiny busybox image imported into the local
//! engine, hardened specs, locally signed clearances, and a harness running a
//! real orchestrator on loopback with a throwaway PKI, its own installation
//! id and cleanup of exactly the objects it labelled.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use vibebox_clearance::{ClearanceSigner, Grant};
use vibebox_proto::clearance::Clearance;
use vibebox_proto::environment::{ContainerSpec, Mount, MountType};
use vibebox_proto::runtime::runtime_service_client::RuntimeServiceClient;
use vibebox_server_kit::GrpcChannel;
use vibebox_server_kit::testing::TestPki;

use crate::{Config, Orchestrator};

/// The shared test image tag.
pub const TEST_IMAGE: &str = "vibebox-test/busybox:1";
/// Label marking objects created by tests.
pub const TEST_LABEL: &str = "vibebox.test";

/// Imports the busybox test image unless it exists (idempotent, safe to
/// race): the same builder as the README's development image
/// (`scripts/dev-image.sh`), under the test tag.
pub fn ensure_test_image() -> std::io::Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/dev-image.sh");
    let status = Command::new("bash")
        .arg(script)
        .arg(TEST_IMAGE)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "{script} {TEST_IMAGE} failed ({status})"
        )));
    }
    Ok(())
}

/// A hardened spec as the policy service would return it.
pub fn hardened_spec(command: &[&str]) -> ContainerSpec {
    ContainerSpec {
        image: TEST_IMAGE.into(),
        command: command.iter().map(|s| (*s).to_string()).collect(),
        user: Some("1000:1000".into()),
        cap_drop: vec!["ALL".into()],
        security_opt: vec!["no-new-privileges:true".into()],
        read_only_rootfs: Some(true),
        cpu_limit: Some(0.25),
        memory_limit_mb: Some(64),
        pids_limit: Some(64),
        working_dir: "/workspace".into(),
        mounts: vec![
            Mount {
                r#type: MountType::Volume as i32,
                source: String::new(),
                target: "/workspace".into(),
                read_only: false,
                size_mb: None,
            },
            Mount {
                r#type: MountType::Tmpfs as i32,
                source: String::new(),
                target: "/tmp".into(),
                read_only: false,
                size_mb: Some(16),
            },
        ],
        ..Default::default()
    }
}

/// Signs a clearance for `spec`, `environment_id` and `team_id`.
pub fn clearance(
    signer: &ClearanceSigner,
    spec: &ContainerSpec,
    environment_id: &str,
    team_id: &str,
    ttl: Duration,
) -> Clearance {
    signer.sign(&vibebox_clearance::new_body(
        spec,
        Grant {
            environment_id: environment_id.into(),
            team_id: team_id.into(),
            user_id: "user-1".into(),
            policy_digest: "sha256:test-policy".into(),
            policy_version: "test".into(),
        },
        SystemTime::now(),
        ttl,
    ))
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running orchestrator on loopback.
pub struct Harness {
    pub pki: Arc<TestPki>,
    pub config: Config,
    pub orchestrator: Orchestrator,
    pub signer: ClearanceSigner,
    pub addr: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    pub installation: String,
}

impl Harness {
    /// Starts an orchestrator with a fresh PKI; `adjust` may change the
    /// configuration.
    pub async fn start(adjust: impl FnOnce(&mut Config)) -> anyhow::Result<Harness> {
        Self::start_with_pki(Arc::new(TestPki::new()), adjust).await
    }

    /// Starts an orchestrator in `pki` (with its own data directory, so that
    /// several can share a PKI, a database or an installation id).
    pub async fn start_with_pki(
        pki: Arc<TestPki>,
        adjust: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Harness> {
        ensure_test_image()?;
        let signer = ClearanceSigner::generate();
        let key_file = pki.path().join(format!(
            "clearance-{}.pub",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&key_file, hex::encode(signer.verifying_key().to_bytes()))?;
        let installation = format!("test-{}", uuid::Uuid::new_v4());
        let mut config = Config::with_server(pki.server_args(crate::SERVICE_NAME));
        config.installation_id = Some(installation.clone());
        config.clearance_public_key_file = Some(key_file);
        config.policy_url = String::new();
        config.audit.url = "https://127.0.0.1:9".into();
        config.reconcile_interval = 0;
        config.stop_timeout = 1;
        config.docker_labels = vec![format!("{TEST_LABEL}={installation}")];
        config.database.url = Some(vibebox_db::sqlite_url(
            &config.server.data_dir.join("orchestrator.db"),
        ));
        adjust(&mut config);
        let installation = crate::installation_id(&config)?;
        let orchestrator = crate::build(&config).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let (o, c, s) = (orchestrator.clone(), config.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::serve(o, &c, listener, s).await {
                tracing::error!(error = %e, "test orchestrator server failed");
            }
        });
        Ok(Harness {
            pki,
            config,
            orchestrator,
            signer,
            addr,
            shutdown,
            installation,
        })
    }

    /// A RuntimeService client with `service`'s identity.
    pub fn client_as(&self, service: &str) -> RuntimeServiceClient<GrpcChannel> {
        let ch = vibebox_server_kit::connect(
            &format!("https://127.0.0.1:{}", self.addr.port()),
            &self.pki.material(service),
        )
        .expect("channel");
        RuntimeServiceClient::new(ch)
    }

    /// A RuntimeService client as the gateway.
    pub fn client(&self) -> RuntimeServiceClient<GrpcChannel> {
        self.client_as("gateway")
    }

    /// Docker objects (containers, networks, volumes) labelled with this
    /// installation, as `kind:name`.
    pub fn objects(&self) -> Vec<String> {
        labelled_objects(&self.installation)
    }
}

/// Every object carrying `vibebox.installation=<installation>`.
pub fn labelled_objects(installation: &str) -> Vec<String> {
    let filter = format!("label=vibebox.installation={installation}");
    let mut out = Vec::new();
    for (kind, args) in [
        ("container", vec!["ps", "-a", "--format", "{{.Names}}"]),
        ("network", vec!["network", "ls", "--format", "{{.Name}}"]),
        ("volume", vec!["volume", "ls", "--format", "{{.Name}}"]),
    ] {
        let output = Command::new("docker")
            .args(&args)
            .args(["--filter", &filter])
            .output();
        if let Ok(o) = output {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if !line.trim().is_empty() {
                    out.push(format!("{kind}:{}", line.trim()));
                }
            }
        }
    }
    out
}

/// Removes every object labelled with `installation` (containers first).
pub fn remove_labelled(installation: &str) {
    let filter = format!("label=vibebox.installation={installation}");
    let script = format!(
        "docker ps -aq --filter '{filter}' | xargs -r docker rm -f -v >/dev/null 2>&1; \
         docker network ls -q --filter '{filter}' | xargs -r docker network rm >/dev/null 2>&1; \
         docker volume ls -q --filter '{filter}' | xargs -r docker volume rm -f >/dev/null 2>&1; true"
    );
    let _ = Command::new("sh").arg("-c").arg(script).status();
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // Operations in flight stop where they are (nothing recreates what
        // is removed below).
        self.orchestrator.abandon_operations();
        remove_labelled(&self.installation);
    }
}
