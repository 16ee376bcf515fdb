//! The docker compose deployment end to end: builds the service images from
//! this workspace's binaries, brings `deploy/docker-compose.yml` up under a
//! unique project name with the gateway on an ephemeral loopback port,
//! creates an environment through the gateway, checks with the Docker API
//! that both the platform containers and the environment run hardened, and
//! tears everything down (`down -v`, then the environment's objects by the
//! installation label).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use bollard::query_parameters::{InspectContainerOptions, ListContainersOptionsBuilder};
use tonic::Code;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, EnvironmentState, ExecRequest, ExecStart,
    ListEnvironmentsRequest, exec_request, exec_response,
};
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::identity::{
    AddTeamMemberRequest, CreateTeamRequest, CreateUserRequest, LoginRequest, PlatformRole,
    TeamRole,
};
use vibebox_tests::{Authed, Settle, bearer, binary, dev_image, docker, repo_root};

const SERVICES: [&str; 5] = ["gateway", "identity", "policy", "orchestrator", "audit"];

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One compose project of the deployment; dropping it removes everything it
/// created: environments (by installation label), containers, networks,
/// volumes and the images built for it.
struct Deployment {
    project: String,
    tag: String,
    scratch: tempfile::TempDir,
    installation: Option<String>,
}

impl Deployment {
    fn compose_file() -> PathBuf {
        repo_root().join("deploy/docker-compose.yml")
    }

    /// `docker-compose` (v1) when installed, else the `docker compose` plugin.
    fn compose(&self) -> Command {
        let v1 = Command::new("docker-compose")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        let mut cmd = if v1 {
            Command::new("docker-compose")
        } else {
            let mut c = Command::new("docker");
            c.arg("compose");
            c
        };
        let gid = std::fs::metadata("/var/run/docker.sock")
            .expect("docker socket")
            .gid();
        cmd.arg("--project-name")
            .arg(&self.project)
            .arg("--file")
            .arg(Self::compose_file())
            .env("VIBEBOX_TAG", &self.tag)
            .env("DOCKER_GID", gid.to_string())
            .env("VIBEBOX_GATEWAY_PUBLISH", "127.0.0.1:")
            .env("VIBEBOX_LOG", "info");
        cmd
    }

    /// Builds the images (tagged for this run) and starts the project.
    fn up() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let this = Self {
            project: format!("vbxe2e{}", &id[..12]),
            tag: format!("e2e-{}", &id[..12]),
            scratch: tempfile::tempdir().expect("temp dir"),
            installation: None,
        };
        let bin_dir = binary("vibebox-pki-init")
            .parent()
            .expect("bin dir")
            .to_path_buf();
        for s in SERVICES {
            binary(&format!("vibebox-{s}"));
        }
        run(Command::new("bash")
            .arg(repo_root().join("scripts/images.sh"))
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--tag")
            .arg(&this.tag));
        let out = this
            .compose()
            .args(["up", "-d"])
            .output()
            .expect("compose up");
        if !out.status.success() {
            let logs = this
                .compose()
                .args(["logs", "--no-color"])
                .output()
                .expect("compose logs");
            panic!(
                "compose up failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&logs.stdout)
            );
        }
        this.wait_healthy();
        this
    }

    /// Waits until every service's healthcheck (the gRPC health probe) passes.
    fn wait_healthy(&self) {
        for service in SERVICES {
            let container = self.container(service);
            let mut status = String::new();
            for _ in 0..180 {
                let out = run(Command::new("docker").args([
                    "inspect",
                    "--format",
                    "{{.State.Health.Status}}",
                    &container,
                ]));
                status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if status == "healthy" {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            assert_eq!(status, "healthy", "{service} never became healthy");
        }
    }

    fn container(&self, service: &str) -> String {
        let out = run(self.compose().args(["ps", "-q", service]));
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    /// Reads a file from a service's data volume (`docker cp`: the images
    /// have no shell), waiting for it to appear.
    fn read_data_file(&self, service: &str, name: &str) -> String {
        let container = self.container(service);
        let dest = self.scratch.path().join(format!("{service}-{name}"));
        for _ in 0..120 {
            let copied = Command::new("docker")
                .arg("cp")
                .arg(format!("{container}:/data/{name}"))
                .arg(&dest)
                .output()
                .expect("docker cp");
            if copied.status.success() {
                return std::fs::read_to_string(&dest)
                    .expect("copied file")
                    .trim()
                    .to_owned();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("{service} never wrote /data/{name}");
    }

    /// The gateway's published loopback address.
    fn gateway(&self) -> String {
        let out = run(self.compose().args(["port", "gateway", "7700"]));
        let addr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            addr.starts_with("127.0.0.1:"),
            "gateway published on loopback only: {addr}"
        );
        addr
    }

    fn remove_environment_objects(&self) {
        let Some(id) = &self.installation else { return };
        let filter = format!("label=vibebox.installation={id}");
        for (list, rm) in [
            (vec!["ps", "-aq"], vec!["rm", "-f", "-v"]),
            (vec!["network", "ls", "-q"], vec!["network", "rm"]),
            (vec!["volume", "ls", "-q"], vec!["volume", "rm", "-f"]),
        ] {
            let Ok(out) = Command::new("docker")
                .args(&list)
                .args(["--filter", &filter])
                .output()
            else {
                continue;
            };
            for object in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(&rm).arg(object).output();
            }
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // Environments first: their containers sit on networks the
        // orchestrator created outside the compose project.
        self.remove_environment_objects();
        let _ = self
            .compose()
            .args(["down", "--volumes", "--remove-orphans", "--timeout", "5"])
            .output();
        self.remove_environment_objects();
        for s in SERVICES.iter().chain(&["pki-init"]) {
            let _ = Command::new("docker")
                .args(["rmi", &format!("vibebox/{s}:{}", self.tag)])
                .output();
        }
    }
}

fn channel(gateway: &str) -> vibebox_server_kit::GrpcChannel {
    vibebox_server_kit::connect_plaintext(&format!("http://{gateway}")).expect("gateway channel")
}

fn identity(gateway: &str, token: &str) -> IdentityServiceClient<Authed> {
    IdentityServiceClient::with_interceptor(channel(gateway), bearer(token))
}

fn environments(gateway: &str, token: &str) -> EnvironmentServiceClient<Authed> {
    EnvironmentServiceClient::with_interceptor(channel(gateway), bearer(token))
}

async fn inspect(container: &str) -> bollard::models::ContainerInspectResponse {
    docker()
        .inspect_container(container, None::<InspectContainerOptions>)
        .await
        .expect("inspect container")
}

/// Asserts a platform container runs with the deployment's hardening.
async fn assert_platform_hardened(d: &Deployment, service: &str) -> bollard::models::HostConfig {
    let inspect = inspect(&d.container(service)).await;
    let state = inspect.state.expect("state");
    assert_eq!(
        state
            .health
            .and_then(|h| h.status)
            .map(|s| s.to_string())
            .as_deref(),
        Some("healthy"),
        "{service} is healthy through its gRPC health probe"
    );
    let config = inspect.config.expect("config");
    assert_eq!(
        config.user.as_deref(),
        Some("65532:65532"),
        "{service} runs as non-root"
    );
    let host = inspect.host_config.expect("host config");
    assert_eq!(
        host.readonly_rootfs,
        Some(true),
        "{service} has a read-only root"
    );
    assert_eq!(
        host.cap_drop.clone().unwrap_or_default(),
        vec!["ALL".to_string()]
    );
    assert!(host.cap_add.clone().unwrap_or_default().is_empty());
    assert_ne!(host.privileged, Some(true));
    assert!(
        host.security_opt
            .clone()
            .unwrap_or_default()
            .iter()
            .any(|o| o.starts_with("no-new-privileges")),
        "{service} has no-new-privileges"
    );
    let mounts = inspect.mounts.unwrap_or_default();
    // Its own PKI volume, read-only, holding its own material only: no CA
    // key, no other service's key.
    let pki = mounts
        .iter()
        .find(|m| m.destination.as_deref() == Some("/pki"))
        .unwrap_or_else(|| panic!("{service} mounts no /pki"));
    let volume = pki.name.clone().unwrap_or_default();
    assert!(
        volume.ends_with(&format!("pki-{service}")),
        "{service} mounts {volume} at /pki"
    );
    assert_eq!(pki.rw, Some(false), "{service}'s /pki is read-only");
    let listed = Command::new("docker")
        .args(["run", "--rm", "--network", "none", "-v"])
        .arg(format!("{volume}:/v:ro"))
        .args([vibebox_tests::dev_image().as_str(), "ls", "-a", "/v"])
        .output()
        .expect("docker run ls");
    assert!(listed.status.success(), "listing {volume}");
    let mut files: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .filter(|f| !f.starts_with('.'))
        .map(str::to_owned)
        .collect();
    files.sort();
    let mut expected = vec![
        "ca.pem".to_owned(),
        format!("{service}-key.pem"),
        format!("{service}.pem"),
    ];
    expected.sort();
    assert_eq!(files, expected, "{service}'s PKI volume");
    let mounts_socket = mounts
        .iter()
        .any(|m| m.source.as_deref() == Some("/var/run/docker.sock"));
    assert_eq!(
        mounts_socket,
        service == "orchestrator",
        "only the orchestrator gets the Docker socket ({service})"
    );
    let published = host
        .port_bindings
        .clone()
        .unwrap_or_default()
        .values()
        .flatten()
        .flatten()
        .map(|b| b.host_ip.clone().unwrap_or_default())
        .collect::<Vec<_>>();
    if service == "gateway" {
        assert_eq!(
            published,
            vec!["127.0.0.1".to_string()],
            "gateway published on loopback only"
        );
    } else {
        assert!(
            published.is_empty(),
            "{service} publishes nothing: {published:?}"
        );
    }
    host
}

async fn exec(gateway: &str, token: &str, env: &str, command: &[&str]) -> (String, i32) {
    let start = ExecRequest {
        message: Some(exec_request::Message::Start(ExecStart {
            environment_id: env.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    };
    let mut stream = environments(gateway, token)
        .exec(tokio_stream::iter(vec![start]))
        .await
        .expect("exec")
        .into_inner();
    let (mut out, mut code) = (Vec::new(), None);
    while let Some(msg) = stream.message().await.expect("exec stream") {
        match msg.message {
            Some(exec_response::Message::Stdout(b)) => out.extend(b),
            Some(exec_response::Message::Exit(e)) => code = Some(e.exit_code),
            Some(exec_response::Message::Stderr(_)) | None => {}
        }
    }
    (
        String::from_utf8_lossy(&out).into_owned(),
        code.expect("exit message"),
    )
}

fn ip_on_platform_network(
    inspect: &bollard::models::ContainerInspectResponse,
    project: &str,
) -> String {
    let networks = inspect
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.clone())
        .expect("networks");
    networks
        .get(&format!("{project}_platform"))
        .and_then(|n| n.ip_address.clone())
        .filter(|ip| !ip.is_empty())
        .expect("address on the platform network")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_deployment_creates_a_hardened_environment_through_the_gateway() {
    let image = dev_image();
    let mut d = Deployment::up();
    let gateway = d.gateway();
    d.installation = Some(d.read_data_file("orchestrator", "installation-id"));
    let installation = d.installation.clone().expect("installation id");
    let admin = d.read_data_file("identity", "admin.token");

    // Every platform container is hardened; only the orchestrator holds the
    // socket and only the gateway is published.
    for s in SERVICES {
        assert_platform_hardened(&d, s).await;
    }
    let networks = run(Command::new("docker").args([
        "network",
        "inspect",
        "--format",
        "{{.Internal}}",
        &format!("{}_platform", d.project),
    ]));
    assert_eq!(
        String::from_utf8_lossy(&networks.stdout).trim(),
        "true",
        "platform network is internal"
    );

    // The gateway is the way in: anonymous calls are refused.
    let anonymous = environments(&gateway, "")
        .list_environments(ListEnvironmentsRequest::default())
        .await
        .expect_err("anonymous call refused");
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    // A team and a developer, through the gateway with the bootstrap admin token.
    let team = identity(&gateway, &admin)
        .create_team(CreateTeamRequest {
            request_id: Default::default(),
            name: "compose".into(),
            display_name: "Compose".into(),
        })
        .await
        .expect("create team")
        .into_inner()
        .team
        .expect("team")
        .id;
    let user = identity(&gateway, &admin)
        .create_user(CreateUserRequest {
            request_id: Default::default(),
            username: "composer".into(),
            display_name: "Composer".into(),
            password: "composer-password-123".into(),
            platform_role: PlatformRole::None as i32,
        })
        .await
        .expect("create user")
        .into_inner()
        .user
        .expect("user");
    identity(&gateway, &admin)
        .add_team_member(AddTeamMemberRequest {
            team_id: team.clone(),
            user_id: user.id.clone(),
            role: TeamRole::Developer as i32,
        })
        .await
        .expect("add member");
    let dev = identity(&gateway, "")
        .login(LoginRequest {
            username: "composer".into(),
            password: "composer-password-123".into(),
        })
        .await
        .expect("login")
        .into_inner()
        .token;

    // Create returns CREATING; settled, it runs.
    let created = environments(&gateway, &dev)
        .create_settled(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: format!("compose-{}", d.project),
            team_id: team.clone(),
            name: "compose-env".into(),
            spec: Some(ContainerSpec {
                image: image.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("create environment");
    assert_eq!(created.state(), EnvironmentState::Running, "{created:?}");

    // The orchestrator container created it on this engine, hardened and
    // labelled with this installation.
    let filters: HashMap<String, Vec<String>> = HashMap::from([(
        "label".to_string(),
        vec![format!("vibebox.environment={}", created.id)],
    )]);
    let listed = docker()
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .expect("list containers");
    assert_eq!(listed.len(), 1);
    let env = inspect(listed[0].id.as_deref().expect("id")).await;
    let config = env.config.clone().expect("config");
    let labels = config.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("vibebox.installation"), Some(&installation));
    assert_eq!(labels.get("vibebox.team"), Some(&team));
    assert_eq!(config.user.as_deref(), Some("1000:1000"));
    let host = env.host_config.clone().expect("host config");
    assert_eq!(host.cap_drop.unwrap_or_default(), vec!["ALL".to_string()]);
    assert!(host.cap_add.unwrap_or_default().is_empty());
    assert_ne!(host.privileged, Some(true));
    assert!(
        host.security_opt
            .unwrap_or_default()
            .iter()
            .any(|o| o.starts_with("no-new-privileges"))
    );
    assert!(
        host.memory.unwrap_or(0) > 0
            && host.nano_cpus.unwrap_or(0) > 0
            && host.pids_limit.unwrap_or(0) > 0
    );
    assert!(
        host.binds
            .unwrap_or_default()
            .iter()
            .all(|b| !b.contains("docker.sock")),
        "no Docker socket in an environment"
    );
    let network = host.network_mode.expect("network");
    let net = docker()
        .inspect_network(
            &network,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .expect("inspect network");
    assert_eq!(net.internal, Some(true), "environment network is internal");

    // Inside: the unprivileged user, and no way to the platform services.
    let (out, code) = exec(&gateway, &dev, &created.id, &["id", "-u"]).await;
    assert_eq!((out.trim(), code), ("1000", 0));
    let orchestrator_ip =
        ip_on_platform_network(&inspect(&d.container("orchestrator")).await, &d.project);
    let probe =
        format!("nc -w 2 {orchestrator_ip} 7703 </dev/null && echo reached || echo isolated");
    let (out, _) = exec(&gateway, &dev, &created.id, &["sh", "-c", &probe]).await;
    assert_eq!(
        out.trim(),
        "isolated",
        "an environment cannot reach the orchestrator"
    );

    let deleted = environments(&gateway, &dev)
        .delete_settled(&created.id)
        .await
        .expect("delete environment");
    assert_eq!(deleted.state(), EnvironmentState::Deleted, "{deleted:?}");
    let left = docker()
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .expect("list containers");
    assert!(left.is_empty(), "deleted environment's container is gone");

    drop(d);
    let leftovers = run(Command::new("docker").args([
        "ps",
        "-aq",
        "--filter",
        &format!("label=vibebox.installation={installation}"),
    ]));
    assert!(String::from_utf8_lossy(&leftovers.stdout).trim().is_empty());
}
