//! Harness for the end-to-end tests under `tests/tests/`: starts the real
//! `vibebox up` binary on a fresh data directory and an ephemeral gateway
//! port, hands out authenticated gRPC clients, and removes exactly the Docker
//! objects of its own installation when dropped.

pub mod attack;
pub mod cluster;
pub mod report;
pub mod settle;

pub use settle::Settle;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vibebox_proto::audit::audit_service_client::AuditServiceClient;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::policy::policy_service_client::PolicyServiceClient;
use vibebox_server_kit::GrpcChannel;

/// Path of a binary built by this workspace (`target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first (tests/run.sh does)",
        path.display()
    );
    path
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Builds (once, idempotently) the busybox development image and returns its tag.
pub fn dev_image() -> String {
    let tag = "vibebox/devbox:1";
    let status = Command::new("bash")
        .arg(repo_root().join("scripts/dev-image.sh"))
        .arg(tag)
        .stdout(Stdio::null())
        .status()
        .expect("running scripts/dev-image.sh");
    assert!(status.success(), "building {tag} failed");
    tag.to_owned()
}

/// A running platform (`vibebox up`).
pub struct Platform {
    child: Child,
    data_dir: tempfile::TempDir,
    pub gateway: String,
    /// `http://<addr>/metrics` of the gateway.
    pub metrics_url: String,
}

impl Platform {
    /// Starts `vibebox up` and waits until it reports the gateway address.
    pub fn start() -> Self {
        let data_dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(data_dir)
    }

    /// `vibebox up` on `data_dir`, on free ports, logging warnings only.
    pub fn up_command(data_dir: &Path) -> Command {
        let mut command = Command::new(binary("vibebox"));
        command
            .args([
                "up",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .env("VIBEBOX_LOG", "warn");
        command
    }

    /// Starts `vibebox up` on an existing data directory.
    pub fn start_in(data_dir: tempfile::TempDir) -> Self {
        let mut child = Self::up_command(data_dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning vibebox up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut gateway = None;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let line = line.trim();
                if let Some(rest) = line.strip_prefix("gateway listening on ") {
                    gateway = rest.split_whitespace().next().map(str::to_owned);
                } else if let Some(rest) = line.strip_prefix("metrics:")
                    && let Some(addr) = gateway.take()
                {
                    let _ = tx.send((addr, rest.trim().to_owned()));
                }
            }
        });
        let (gateway, metrics_url) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("vibebox up reported its gateway and metrics addresses");
        Self {
            child,
            data_dir,
            gateway,
            metrics_url,
        }
    }

    /// The gateway's Prometheus exposition (one scrape, over plain HTTP/1.0).
    pub fn scrape_metrics(&self) -> String {
        use std::io::{Read, Write};
        let rest = self
            .metrics_url
            .strip_prefix("http://")
            .expect("metrics URL is http");
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut stream = std::net::TcpStream::connect(host).expect("connect to metrics");
        write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("request");
        let mut body = String::new();
        stream.read_to_string(&mut body).expect("read metrics");
        body
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// The bootstrap admin's token.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin.token"))
            .expect("admin token file")
            .trim()
            .to_owned()
    }

    /// This installation's id (labels every Docker object it creates).
    pub fn installation_id(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir().join("installation-id"))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    fn channel(&self) -> GrpcChannel {
        vibebox_server_kit::connect_plaintext(&format!("http://{}", self.gateway))
            .expect("gateway channel")
    }

    pub fn environments(&self, token: &str) -> EnvironmentServiceClient<Authed> {
        EnvironmentServiceClient::with_interceptor(self.channel(), bearer(token))
    }

    pub fn identity(&self, token: &str) -> IdentityServiceClient<Authed> {
        IdentityServiceClient::with_interceptor(self.channel(), bearer(token))
    }

    pub fn audit(&self, token: &str) -> AuditServiceClient<Authed> {
        AuditServiceClient::with_interceptor(self.channel(), bearer(token))
    }

    pub fn policy(&self, token: &str) -> PolicyServiceClient<Authed> {
        PolicyServiceClient::with_interceptor(self.channel(), bearer(token))
    }

    /// Creates the team `name` as `admin`; its id.
    pub async fn team(&self, admin: &str, name: &str) -> String {
        use vibebox_proto::identity::CreateTeamRequest;
        self.identity(admin)
            .create_team(CreateTeamRequest {
                request_id: Default::default(),
                name: name.into(),
                display_name: name.into(),
            })
            .await
            .expect("create team")
            .into_inner()
            .team
            .expect("team")
            .id
    }

    /// Creates a user in `team` with `role` and logs in; (user id, session
    /// token).
    pub async fn member(
        &self,
        admin: &str,
        name: &str,
        team: &str,
        role: vibebox_proto::identity::TeamRole,
    ) -> (String, String) {
        use vibebox_proto::identity::{
            AddTeamMemberRequest, CreateUserRequest, LoginRequest, PlatformRole,
        };
        let password = format!("{name}-password-123");
        let user = self
            .identity(admin)
            .create_user(CreateUserRequest {
                request_id: Default::default(),
                username: name.into(),
                display_name: name.into(),
                password: password.clone(),
                platform_role: PlatformRole::None as i32,
            })
            .await
            .expect("create user")
            .into_inner()
            .user
            .expect("user");
        self.identity(admin)
            .add_team_member(AddTeamMemberRequest {
                team_id: team.into(),
                user_id: user.id.clone(),
                role: role as i32,
            })
            .await
            .expect("add member");
        let token = self
            .identity("")
            .login(LoginRequest {
                username: name.into(),
                password,
            })
            .await
            .expect("login")
            .into_inner()
            .token;
        (user.id, token)
    }

    /// Stops the platform with SIGTERM (as Ctrl-C would) and waits for it.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.terminate();
        let dir = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.data_dir, dir)
    }

    fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Removes every Docker object labelled with this installation's id.
    pub fn remove_docker_objects(&self) {
        let Some(id) = self.installation_id() else {
            return;
        };
        let filter = format!("label=vibebox.installation={id}");
        let out = Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
            .expect("docker ps");
        for c in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("docker").args(["rm", "-f", "-v", c]).output();
        }
        let out = Command::new("docker")
            .args(["network", "ls", "-q", "--filter", &filter])
            .output()
            .expect("docker network ls");
        for n in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("docker").args(["network", "rm", n]).output();
        }
        let out = Command::new("docker")
            .args(["volume", "ls", "-q", "--filter", &filter])
            .output()
            .expect("docker volume ls");
        for v in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f", v])
                .output();
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.terminate();
        self.remove_docker_objects();
    }
}

pub use vibebox_server_kit::Authed;

/// The interceptor authenticating as the holder of `token` (an empty token
/// sends no header; a token that cannot be a header value is sent as none,
/// which the gateway refuses).
pub fn bearer(token: &str) -> vibebox_server_kit::Bearer {
    if token.is_empty() {
        return vibebox_server_kit::Bearer::none();
    }
    vibebox_server_kit::Bearer::new(token).unwrap_or_default()
}

/// A Docker client for inspecting what the platform created.
pub fn docker() -> bollard::Docker {
    bollard::Docker::connect_with_local_defaults().expect("docker")
}
