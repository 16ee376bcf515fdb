//! The five services as separate processes (`target/debug/vibebox-<service>`),
//! wired exactly as `vibebox up` wires them in one process: one data
//! directory (PKI in `pki/`, keys, SQLite files, outboxes, admin token,
//! installation id), each service on its own loopback port, internal calls
//! over mutual TLS. The chaos and load suites use it to SIGKILL and restart
//! one service while the others keep running, and to read each process's
//! memory.
//!
//! Ports are picked once (ephemeral, 127.0.0.1) and kept across restarts, so
//! peers reach a restarted service where they reached it before. Each
//! service's output goes to `<data-dir>/logs/<service>.log` (appended across
//! restarts; printed when a test fails). Dropping the cluster kills every
//! process and removes exactly the Docker objects labelled with its
//! installation id.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vibebox_proto::audit::audit_service_client::AuditServiceClient;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{ExecRequest, ExecStart, exec_request, exec_response};
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::identity::{
    AddTeamMemberRequest, CreateTeamRequest, CreateUserRequest, LoginRequest, PlatformRole,
    TeamRole,
};
use vibebox_proto::policy::policy_service_client::PolicyServiceClient;
use vibebox_server_kit::{GrpcChannel, TlsMaterial};

use crate::{Authed, bearer, binary};

/// One of the five services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    Audit,
    Identity,
    Policy,
    Orchestrator,
    Gateway,
}

impl Service {
    /// Every service, in start order.
    pub const ALL: [Service; 5] = [
        Service::Audit,
        Service::Identity,
        Service::Policy,
        Service::Orchestrator,
        Service::Gateway,
    ];

    /// The service's name (`identity`, ...), as in its binary and certificate.
    pub fn name(self) -> &'static str {
        match self {
            Service::Audit => "audit",
            Service::Identity => "identity",
            Service::Policy => "policy",
            Service::Orchestrator => "orchestrator",
            Service::Gateway => "gateway",
        }
    }

    fn binary(self) -> PathBuf {
        binary(&format!("vibebox-{}", self.name()))
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Extra flags per service, then [`ClusterBuilder::start`].
#[derive(Debug, Default)]
pub struct ClusterBuilder {
    extra: HashMap<Service, Vec<String>>,
}

impl ClusterBuilder {
    /// Adds one command-line argument (`--flag=value`) for `service`.
    pub fn arg(mut self, service: Service, arg: impl Into<String>) -> Self {
        self.extra.entry(service).or_default().push(arg.into());
        self
    }

    /// Prepares the data directory and the dev PKI (as `vibebox up` does),
    /// starts the five processes and waits until each answers SERVING.
    pub async fn start(self) -> Cluster {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let root = data_dir.path().canonicalize().expect("canonical data dir");
        vibebox_server_kit::pki::ensure_dev_pki(
            &root.join("pki"),
            vibebox_server_kit::pki::SERVICES,
            &[],
        )
        .expect("development PKI");
        std::fs::create_dir_all(root.join("logs")).expect("logs dir");

        let mut cluster = Cluster {
            root,
            ports: HashMap::new(),
            metrics_port: 0,
            extra: self.extra,
            children: HashMap::new(),
            material: None,
            gateway: String::new(),
            metrics_url: String::new(),
            _data_dir: data_dir,
        };
        cluster.material = Some(
            TlsMaterial::from_files(
                &cluster.root.join("pki/ca.pem"),
                &cluster.root.join("pki/gateway.pem"),
                &cluster.root.join("pki/gateway-key.pem"),
            )
            .expect("gateway TLS material"),
        );
        // Ports are picked free and then released for the services to bind:
        // another process on the machine can take one in between. A service
        // that then cannot bind exits; the cluster starts over on new ports.
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            cluster.pick_ports();
            for service in Service::ALL {
                cluster.spawn(service);
            }
            let mut failure = None;
            for service in Service::ALL {
                if let Err(e) = cluster.healthy(service).await {
                    failure = Some(e);
                    break;
                }
            }
            match failure {
                None => return cluster,
                Some(e) if attempt < ATTEMPTS && e.contains("in use") => {
                    for service in Service::ALL {
                        cluster.terminate(service);
                    }
                }
                Some(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }
}

/// Five running service processes sharing one data directory.
pub struct Cluster {
    root: PathBuf,
    ports: HashMap<Service, u16>,
    metrics_port: u16,
    extra: HashMap<Service, Vec<String>>,
    children: HashMap<Service, Child>,
    material: Option<TlsMaterial>,
    /// `127.0.0.1:<port>` of the gateway's public (plaintext) listener.
    pub gateway: String,
    /// `http://<addr>/metrics` of the gateway.
    pub metrics_url: String,
    /// Held so the directory is removed (last, after the processes are gone).
    _data_dir: tempfile::TempDir,
}

impl Cluster {
    /// A cluster with extra flags for some services.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// A cluster with every default.
    pub async fn start() -> Cluster {
        Self::builder().start().await
    }

    /// The shared data directory.
    pub fn data_dir(&self) -> &Path {
        &self.root
    }

    /// `https://127.0.0.1:<port>` of an internal service.
    pub fn url(&self, service: Service) -> String {
        let scheme = if service == Service::Gateway {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://127.0.0.1:{}", self.ports[&service])
    }

    fn args(&self, service: Service) -> Vec<String> {
        let mut args = vec![
            format!("--data-dir={}", self.root.display()),
            format!("--listen=127.0.0.1:{}", self.ports[&service]),
        ];
        let peers: &[Service] = match service {
            Service::Audit => &[],
            Service::Identity | Service::Policy => &[Service::Audit],
            Service::Orchestrator => &[Service::Audit, Service::Policy],
            Service::Gateway => &[
                Service::Audit,
                Service::Identity,
                Service::Policy,
                Service::Orchestrator,
            ],
        };
        for peer in peers {
            args.push(format!("--{}-url={}", peer.name(), self.url(*peer)));
        }
        if service == Service::Gateway {
            args.push(format!("--metrics-listen=127.0.0.1:{}", self.metrics_port));
        }
        args.extend(self.extra.get(&service).cloned().unwrap_or_default());
        args
    }

    fn log_path(&self, service: Service) -> PathBuf {
        self.root.join("logs").join(format!("{service}.log"))
    }

    fn spawn(&mut self, service: Service) {
        assert!(
            !self.children.contains_key(&service),
            "{service} is already running"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(service))
            .expect("service log file");
        let err = log.try_clone().expect("log handle");
        let child = Command::new(service.binary())
            .args(self.args(service))
            .env(
                "VIBEBOX_LOG",
                std::env::var("VIBEBOX_CLUSTER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning vibebox-{service}: {e}"));
        self.children.insert(service, child);
    }

    fn channel(&self, service: Service) -> GrpcChannel {
        if service == Service::Gateway {
            vibebox_server_kit::connect_plaintext(&self.url(service)).expect("gateway channel")
        } else {
            let material = self.material.as_ref().expect("TLS material");
            vibebox_server_kit::connect(&self.url(service), material).expect("mTLS channel")
        }
    }

    /// Picks a free port for every service and the gateway's metrics.
    fn pick_ports(&mut self) {
        // Hold every port until all are chosen, so none is picked twice.
        let held: Vec<std::net::TcpListener> = (0..Service::ALL.len() + 1)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("ephemeral port"))
            .collect();
        let port = |i: usize| held[i].local_addr().expect("local addr").port();
        self.ports = Service::ALL
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, port(i)))
            .collect();
        self.metrics_port = port(Service::ALL.len());
        self.metrics_url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        self.gateway = format!("127.0.0.1:{}", self.ports[&Service::Gateway]);
    }

    /// Waits until `service` answers its gRPC health check with SERVING
    /// (panics, with its log, if it exits or takes more than 60 s).
    pub async fn wait_healthy(&mut self, service: Service) {
        if let Err(e) = self.healthy(service).await {
            panic!("{e}");
        }
    }

    /// Waits until `service` answers its gRPC health check with SERVING; the
    /// error (with its log) when it exits or takes more than 60 s.
    async fn healthy(&mut self, service: Service) -> Result<(), String> {
        let mut client = HealthClient::new(self.channel(service));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let check = client.check(HealthCheckRequest {
                service: String::new(),
            });
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), check).await
                && r.into_inner().status() == ServingStatus::Serving
            {
                return Ok(());
            }
            if let Some(child) = self.children.get_mut(&service)
                && let Ok(Some(status)) = child.try_wait()
            {
                self.children.remove(&service);
                return Err(format!(
                    "vibebox-{service} exited during start ({status}):\n{}",
                    self.log_tail(service, 40)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "vibebox-{service} not healthy within 60 s:\n{}",
                    self.log_tail(service, 40)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Process id of a running service.
    pub fn pid(&self, service: Service) -> Option<u32> {
        self.children.get(&service).map(Child::id)
    }

    /// Whether the service's process is running.
    pub fn is_running(&mut self, service: Service) -> bool {
        self.children
            .get_mut(&service)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Resident memory of a service's process, in KiB (`VmRSS` of
    /// `/proc/<pid>/status`).
    pub fn rss_kib(&self, service: Service) -> u64 {
        let pid = self
            .pid(service)
            .unwrap_or_else(|| panic!("{service} is not running"));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
    }

    /// Kills a service with SIGKILL (no shutdown of any kind) and reaps it.
    pub fn kill(&mut self, service: Service) {
        let mut child = self
            .children
            .remove(&service)
            .unwrap_or_else(|| panic!("{service} is not running"));
        // std's Child::kill sends SIGKILL on Unix.
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops a service with SIGTERM (graceful shutdown) and reaps it.
    pub fn terminate(&mut self, service: Service) {
        let Some(mut child) = self.children.remove(&service) else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts a stopped (killed) service again, same port and flags, and
    /// waits until it is healthy.
    pub async fn restart(&mut self, service: Service) {
        if let Some(child) = self.children.get_mut(&service)
            && let Ok(Some(_)) = child.try_wait()
        {
            self.children.remove(&service);
        }
        // Its port was free while it ran; since it died, a client socket of
        // another process may hold it for a while: try again until it is free.
        for _ in 0..40 {
            self.spawn(service);
            match self.healthy(service).await {
                Ok(()) => return,
                Err(e) if e.contains("in use") => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("vibebox-{service} could not bind its port again within 10 s");
    }

    /// Replaces the extra flags `service` gets from its next (re)start on.
    pub fn set_args(&mut self, service: Service, args: Vec<String>) {
        self.extra.insert(service, args);
    }

    /// The last `lines` lines of a service's log.
    pub fn log_tail(&self, service: Service, lines: usize) -> String {
        let Ok(mut file) = std::fs::File::open(self.log_path(service)) else {
            return String::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The bootstrap admin's token (written by identity on first start).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.root.join("admin.token"))
            .expect("admin token file")
            .trim()
            .to_owned()
    }

    /// This installation's id (labels every Docker object it creates).
    pub fn installation_id(&self) -> String {
        std::fs::read_to_string(self.root.join("installation-id"))
            .expect("installation id file")
            .trim()
            .to_owned()
    }

    fn public(&self) -> GrpcChannel {
        self.channel(Service::Gateway)
    }

    pub fn environments(&self, token: &str) -> EnvironmentServiceClient<Authed> {
        EnvironmentServiceClient::with_interceptor(self.public(), bearer(token))
    }

    pub fn identity(&self, token: &str) -> IdentityServiceClient<Authed> {
        IdentityServiceClient::with_interceptor(self.public(), bearer(token))
    }

    pub fn audit(&self, token: &str) -> AuditServiceClient<Authed> {
        AuditServiceClient::with_interceptor(self.public(), bearer(token))
    }

    pub fn policy(&self, token: &str) -> PolicyServiceClient<Authed> {
        PolicyServiceClient::with_interceptor(self.public(), bearer(token))
    }

    /// Creates a team as the admin; returns its id.
    pub async fn team(&self, name: &str) -> String {
        self.identity(&self.admin_token())
            .create_team(CreateTeamRequest {
                request_id: Default::default(),
                name: name.into(),
                display_name: name.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("creating team {name}: {e:?}"))
            .into_inner()
            .team
            .expect("created team")
            .id
    }

    /// Creates a user with `role` in `team` and logs in; returns the token.
    pub async fn user(&self, name: &str, team: &str, role: TeamRole) -> String {
        let admin = self.admin_token();
        let mut identity = self.identity(&admin);
        let password = format!("{name}-password-123");
        let user = identity
            .create_user(CreateUserRequest {
                request_id: Default::default(),
                username: name.into(),
                display_name: name.into(),
                password: password.clone(),
                platform_role: PlatformRole::None as i32,
            })
            .await
            .unwrap_or_else(|e| panic!("creating user {name}: {e:?}"))
            .into_inner()
            .user
            .expect("created user");
        identity
            .add_team_member(AddTeamMemberRequest {
                team_id: team.into(),
                user_id: user.id,
                role: role as i32,
            })
            .await
            .unwrap_or_else(|e| panic!("adding {name} to its team: {e:?}"));
        self.identity("")
            .login(LoginRequest {
                username: name.into(),
                password,
            })
            .await
            .unwrap_or_else(|e| panic!("login of {name}: {e:?}"))
            .into_inner()
            .token
    }

    /// Removes every Docker object labelled with this installation's id.
    pub fn remove_docker_objects(&self) {
        let Ok(id) = std::fs::read_to_string(self.root.join("installation-id")) else {
            return;
        };
        let filter = format!("label=vibebox.installation={}", id.trim());
        for (list, remove) in [
            (&["ps", "-aq", "--filter"][..], &["rm", "-f", "-v"][..]),
            (
                &["network", "ls", "-q", "--filter"][..],
                &["network", "rm"][..],
            ),
            (
                &["volume", "ls", "-q", "--filter"][..],
                &["volume", "rm", "-f"][..],
            ),
        ] {
            let Ok(out) = Command::new("docker").args(list).arg(&filter).output() else {
                continue;
            };
            for object in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(remove).arg(object).output();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for service in Service::ALL {
                eprintln!(
                    "----- vibebox-{service} (last lines of its log) -----\n{}",
                    self.log_tail(service, 30)
                );
            }
        }
        let running: Vec<Service> = self.children.keys().copied().collect();
        for service in running {
            self.kill(service);
        }
        self.remove_docker_objects();
    }
}

/// What one exec returned: stdout, stderr, exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
}

/// Runs `command` in an environment through the gateway (no stdin, no TTY)
/// and collects its output. A stream that ends without an exit message is an
/// error (`UNKNOWN`): the exec was not acknowledged.
pub async fn exec(
    client: &mut EnvironmentServiceClient<Authed>,
    environment_id: &str,
    command: &[&str],
) -> Result<ExecOutcome, tonic::Status> {
    let start = ExecRequest {
        message: Some(exec_request::Message::Start(ExecStart {
            environment_id: environment_id.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    };
    let mut stream = client
        .exec(tokio_stream::iter(vec![start]))
        .await?
        .into_inner();
    let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
    while let Some(msg) = stream.message().await? {
        match msg.message {
            Some(exec_response::Message::Stdout(b)) => out.extend(b),
            Some(exec_response::Message::Stderr(b)) => err.extend(b),
            Some(exec_response::Message::Exit(e)) => code = Some(e.exit_code),
            None => {}
        }
    }
    let exit_code =
        code.ok_or_else(|| tonic::Status::unknown("exec stream ended without an exit code"))?;
    Ok(ExecOutcome {
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        exit_code,
    })
}
