//! Helpers of the attack suite (`tests/tests/e2e/attack`): reading a refusal
//! (rule ids from google.rpc details), reaching the internal services of a
//! `vibebox up` the way an attacker on the host would, finding audit events
//! by request id, listing the Docker objects of an installation, and proving
//! from inside and outside that a running environment is hardened.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::query_parameters::{
    InspectContainerOptions, InspectNetworkOptions, ListContainersOptionsBuilder,
};
use tonic::{Code, Status};
use tonic_types::StatusExt;
use vibebox_proto::audit::{AuditEvent, EventFilter, QueryEventsRequest};
use vibebox_proto::environment::{ExecRequest, ExecStart, exec_request, exec_response};
use vibebox_server_kit::TlsMaterial;

use crate::Platform;
use crate::report::SuiteReport;

/// Where a `vibebox up` serves each service (`<data-dir>/services.toml`).
#[derive(Debug, Clone)]
pub struct Services {
    urls: BTreeMap<String, String>,
}

impl Services {
    /// Reads `<data-dir>/services.toml` (flat `name = "url"` lines).
    pub fn read(data_dir: &Path) -> Self {
        let path = data_dir.join("services.toml");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} (written by `vibebox up`): {e}", path.display()));
        let urls = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
            .collect();
        Self { urls }
    }

    /// The URL of `service` (`https://127.0.0.1:<port>` for internal ones).
    pub fn url(&self, service: &str) -> &str {
        self.urls
            .get(service)
            .unwrap_or_else(|| panic!("services.toml names no {service}"))
    }
}

/// The platform's certificate and key of `service` (from `<data-dir>/pki`).
pub fn material(data_dir: &Path, service: &str) -> TlsMaterial {
    let pki = data_dir.join("pki");
    TlsMaterial::from_files(
        &pki.join("ca.pem"),
        &pki.join(format!("{service}.pem")),
        &pki.join(format!("{service}-key.pem")),
    )
    .expect("platform TLS material")
}

fn endpoint(url: &str) -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
}

/// A mutual-TLS channel to `url` presenting `material`.
pub fn mtls(url: &str, material: &TlsMaterial) -> tonic::transport::Channel {
    endpoint(url)
        .tls_config(material.client_config())
        .expect("tls config")
        .connect_lazy()
}

/// What an attacker without the platform CA's key can present: a
/// certificate naming `service`, signed by a CA of their own (trusting the
/// platform CA, which is public, to reach the server at all).
pub fn foreign(data_dir: &Path, service: &str) -> TlsMaterial {
    let forged = vibebox_server_kit::pki::foreign_material(service).expect("foreign material");
    TlsMaterial {
        ca_pem: std::fs::read(data_dir.join("pki/ca.pem")).expect("ca.pem"),
        cert_pem: forged.cert_pem,
        key_pem: forged.key_pem,
    }
}

/// A TLS channel to `url` that trusts the platform CA but presents no
/// client certificate.
pub fn tls_without_client_cert(url: &str, data_dir: &Path) -> tonic::transport::Channel {
    let ca = std::fs::read(data_dir.join("pki/ca.pem")).expect("ca.pem");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca));
    endpoint(url)
        .tls_config(tls)
        .expect("tls config")
        .connect_lazy()
}

/// A plaintext (h2c) channel to `url`, whatever its scheme.
pub fn plaintext(url: &str) -> tonic::transport::Channel {
    endpoint(&url.replacen("https://", "http://", 1)).connect_lazy()
}

/// `request` carrying `x-request-id: id` (so its audit events can be found).
pub fn with_id<T>(id: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().expect("request id"));
    request
}

/// What a refusal says: its code, message and the rule ids / fields of its
/// google.rpc details.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: Code,
    pub message: String,
    /// `PreconditionFailure` violation types (rule ids).
    pub rules: Vec<String>,
    /// `BadRequest` field violations: (field, description).
    pub fields: Vec<(String, String)>,
}

impl Refusal {
    pub fn of(status: &Status) -> Self {
        let rules = vibebox_server_kit::status::violated_rules(status);
        let fields = status
            .get_details_bad_request()
            .map(|br| {
                br.field_violations
                    .into_iter()
                    .map(|v| (v.field, v.description))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            code: status.code(),
            message: status.message().to_owned(),
            rules,
            fields,
        }
    }

    /// Rule ids named by the refusal: PreconditionFailure types, and the
    /// `<rule>: ...` prefix of the policy's BadRequest descriptions (a spec
    /// that is only malformed comes back as INVALID_ARGUMENT).
    pub fn rule_ids(&self) -> Vec<String> {
        let mut out = self.rules.clone();
        if self.code == Code::InvalidArgument && self.message.starts_with("invalid spec: ") {
            out.extend(
                self.fields
                    .iter()
                    .filter_map(|(_, d)| d.split_once(": ").map(|(rule, _)| rule.to_owned())),
            );
        }
        out
    }

    /// Whether a BadRequest violation names `field` (or an element of it).
    pub fn names_field(&self, field: &str) -> bool {
        self.fields.iter().any(|(f, _)| {
            f == field || f.starts_with(&format!("{field}[")) || f.starts_with(&format!("{field}."))
        })
    }
}

/// Runs `call` again while the gateway answers "rate limit exceeded" (the
/// suite sends far more than the per-user burst on purpose).
pub async fn patiently<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match call().await {
            Err(s)
                if s.code() == Code::ResourceExhausted
                    && s.message().contains("rate limit")
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            other => return other,
        }
    }
}

/// Docker objects (containers, networks, volumes) labelled with the
/// installation, as `kind:name`.
pub fn labelled_objects(installation: &str) -> Vec<String> {
    let filter = format!("label=vibebox.installation={installation}");
    let mut out = Vec::new();
    for (kind, args) in [
        ("container", &["ps", "-a", "--format", "{{.Names}}"][..]),
        ("network", &["network", "ls", "--format", "{{.Name}}"][..]),
        ("volume", &["volume", "ls", "--format", "{{.Name}}"][..]),
    ] {
        let output = Command::new("docker")
            .args(args)
            .args(["--filter", &filter])
            .output()
            .expect("docker CLI");
        assert!(output.status.success(), "docker {args:?} failed");
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if !line.trim().is_empty() {
                out.push(format!("{kind}:{}", line.trim()));
            }
        }
    }
    out.sort();
    out
}

/// The string values of a details list field (`rule_ids`).
pub fn detail_strings(event: &AuditEvent, key: &str) -> Vec<String> {
    use prost_types::value::Kind;
    let Some(value) = event.details.as_ref().and_then(|d| d.fields.get(key)) else {
        return Vec::new();
    };
    match &value.kind {
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        Some(Kind::StringValue(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Every event with `action`, oldest first (paged through the gateway's
/// AuditService as `admin`).
pub async fn events(p: &Platform, admin: &str, action: &str) -> Vec<AuditEvent> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = p
            .audit(admin)
            .query_events(QueryEventsRequest {
                filter: Some(EventFilter {
                    action: action.to_owned(),
                    ..Default::default()
                }),
                page_size: 500,
                page_token: page_token.clone(),
            })
            .await
            .expect("QueryEvents as the bootstrap admin")
            .into_inner();
        out.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    out.reverse();
    out
}

/// Waits (the outbox delivers asynchronously) until an `action` event exists
/// for each of `request_ids`; returns them by request id.
pub async fn events_for(
    p: &Platform,
    admin: &str,
    action: &str,
    request_ids: &[String],
) -> HashMap<String, Vec<AuditEvent>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut by_id: HashMap<String, Vec<AuditEvent>> = HashMap::new();
        for e in events(p, admin, action).await {
            by_id.entry(e.request_id.clone()).or_default().push(e);
        }
        let missing: Vec<&String> = request_ids
            .iter()
            .filter(|id| !by_id.contains_key(*id))
            .collect();
        if missing.is_empty() {
            return by_id;
        }
        assert!(
            Instant::now() < deadline,
            "no {action} audit event for request ids {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs `command` in an environment through the gateway's Exec; returns
/// (stdout, stderr, exit code).
pub async fn exec(
    p: &Platform,
    token: &str,
    env: &str,
    command: &[&str],
) -> Result<(String, String, i32), Status> {
    let start = ExecRequest {
        message: Some(exec_request::Message::Start(ExecStart {
            environment_id: env.into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    };
    let mut stream = patiently(|| {
        let mut client = p.environments(token);
        let start = start.clone();
        async move { client.exec(tokio_stream::iter(vec![start])).await }
    })
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
    Ok((
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        code.expect("an exit message ends the stream"),
    ))
}

/// What an environment's container must look like.
#[derive(Debug, Clone)]
pub struct Expected {
    pub uid: u32,
    pub gid: u32,
    pub nano_cpus: i64,
    pub memory_bytes: i64,
    pub pids: i64,
    pub read_only_rootfs: bool,
}

impl Default for Expected {
    /// The platform defaults: 1000:1000, 2 CPUs, 4096 MiB, 1024 PIDs.
    fn default() -> Self {
        Self {
            uid: 1000,
            gid: 1000,
            nano_cpus: 2_000_000_000,
            memory_bytes: 4096 * 1024 * 1024,
            pids: 1024,
            read_only_rootfs: false,
        }
    }
}

/// The id of the container of environment `env`.
pub async fn container_of(env: &str) -> String {
    let filters: HashMap<String, Vec<String>> = HashMap::from([(
        "label".to_string(),
        vec![format!("vibebox.environment={env}")],
    )]);
    let listed = crate::docker()
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .expect("docker list containers");
    assert_eq!(listed.len(), 1, "one container for environment {env}");
    listed[0].id.clone().expect("container id")
}

/// `key:\tvalue` lines of /proc/<pid>/status.
fn status_fields(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// Asserts what /proc/self/status says about a process of the environment.
fn assert_confined(status: &str, expected: &Expected, via: &str) {
    let f = status_fields(status);
    let ids = |key: &str| -> Vec<u32> {
        f.get(key)
            .unwrap_or_else(|| panic!("{via}: no {key} in /proc/self/status: {status}"))
            .split_whitespace()
            .map(|n| n.parse().expect("numeric id"))
            .collect()
    };
    let uids = ids("Uid");
    let gids = ids("Gid");
    assert!(
        uids.iter().all(|u| *u == expected.uid) && expected.uid != 0,
        "{via}: real/effective/saved/fs uid {uids:?}, want {}",
        expected.uid
    );
    assert!(
        gids.iter().all(|g| *g == expected.gid) && expected.gid != 0,
        "{via}: gids {gids:?}, want {}",
        expected.gid
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let value = f.get(cap).map(String::as_str).unwrap_or("missing");
        assert_eq!(value, "0000000000000000", "{via}: {cap} must be empty");
    }
    assert_eq!(
        f.get("NoNewPrivs").map(String::as_str),
        Some("1"),
        "{via}: NoNewPrivs"
    );
    assert_eq!(
        f.get("Seccomp").map(String::as_str),
        Some("2"),
        "{via}: a seccomp filter is on"
    );
}

/// Whether a process in `env` can connect to a listener the host opens on
/// the environment network's gateway address (the host side of the bridge).
/// `None` when the host address cannot be bound (not on the Docker host).
async fn host_reachable(p: &Platform, token: &str, env: &str, gateway_ip: &str) -> bool {
    // A host service on every address (0.0.0.0), probed from inside at the
    // environment network's gateway address and at the default bridge's.
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", 0))
        .await
        .expect("bind a host listener");
    let port = listener.local_addr().expect("local addr").port();
    let accepting = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            drop(conn);
        }
    });
    let mut targets = vec![gateway_ip.to_owned()];
    let bridge = std::process::Command::new("docker")
        .args([
            "network",
            "inspect",
            "bridge",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if !bridge.is_empty() {
        targets.push(bridge);
    }
    let mut reached = false;
    for ip in targets {
        let probe = format!("echo x | nc -w 2 {ip} {port}");
        let (_, _, code) = exec(p, token, env, &["sh", "-c", &probe])
            .await
            .expect("exec nc");
        reached |= code == 0;
    }
    accepting.abort();
    reached
}

/// Proves that environment `env` runs hardened: the container as Docker
/// reports it, and /proc/self/status, the Docker socket, the network and the
/// cgroup limits as a process inside it sees them (through the gateway's
/// Exec as `token`, and through `docker exec`). Counts one inspection.
pub async fn assert_hardened(
    p: &Platform,
    token: &str,
    env: &str,
    expected: &Expected,
    report: &mut SuiteReport,
) {
    let installation = p.installation_id().expect("installation id");
    let id = container_of(env).await;
    let docker = crate::docker();
    let inspect = docker
        .inspect_container(&id, None::<InspectContainerOptions>)
        .await
        .expect("inspect container");
    let config = inspect.config.clone().expect("config");
    let host = inspect.host_config.clone().expect("host config");
    let state = inspect.state.clone().expect("state");
    assert_eq!(state.running, Some(true), "{env} is running");

    // As Docker applies it.
    assert_eq!(
        config.user.as_deref(),
        Some(format!("{}:{}", expected.uid, expected.gid).as_str()),
        "{env}: user"
    );
    assert_ne!(host.privileged, Some(true), "{env}: privileged");
    assert_eq!(
        host.cap_drop.clone().unwrap_or_default(),
        ["ALL"],
        "{env}: cap_drop"
    );
    assert!(
        host.cap_add.clone().unwrap_or_default().is_empty(),
        "{env}: cap_add"
    );
    let security = host.security_opt.clone().unwrap_or_default();
    assert!(
        security.iter().any(|o| o.starts_with("no-new-privileges")),
        "{env}: security_opt {security:?}"
    );
    assert!(
        !security
            .iter()
            .any(|o| o.contains("unconfined") || o.contains("disable")),
        "{env}: security_opt {security:?}"
    );
    assert_eq!(host.nano_cpus, Some(expected.nano_cpus), "{env}: nano_cpus");
    assert_eq!(host.memory, Some(expected.memory_bytes), "{env}: memory");
    assert_eq!(host.pids_limit, Some(expected.pids), "{env}: pids_limit");
    assert_eq!(
        host.readonly_rootfs.unwrap_or(false),
        expected.read_only_rootfs,
        "{env}: read-only root"
    );
    assert!(
        host.devices.clone().unwrap_or_default().is_empty(),
        "{env}: devices"
    );
    assert!(
        host.binds.clone().unwrap_or_default().is_empty(),
        "{env}: binds"
    );
    for (what, mode) in [
        ("pid", host.pid_mode.clone()),
        ("ipc", host.ipc_mode.clone()),
        ("uts", host.uts_mode.clone()),
        ("userns", host.userns_mode.clone()),
    ] {
        let mode = mode.unwrap_or_default();
        assert!(
            mode != "host" && !mode.starts_with("container:"),
            "{env}: {what} namespace mode {mode:?}"
        );
    }
    for m in inspect.mounts.clone().unwrap_or_default() {
        assert_ne!(
            m.typ.as_deref(),
            Some("bind"),
            "{env}: no bind mounts ({m:?})"
        );
        let source = m.source.clone().unwrap_or_default();
        assert!(!source.contains("docker.sock"), "{env}: mount {m:?}");
    }
    let labels = config.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("vibebox.installation"), Some(&installation));
    assert_eq!(
        labels.get("vibebox.environment").map(String::as_str),
        Some(env)
    );

    // Its own internal network, and nothing else.
    let network = host.network_mode.clone().expect("network mode");
    assert_eq!(network, format!("vibebox-{env}"), "{env}: network mode");
    let attached: Vec<String> = inspect
        .network_settings
        .clone()
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_keys()
        .collect();
    assert_eq!(
        attached,
        std::slice::from_ref(&network),
        "{env}: attached networks"
    );
    let net = docker
        .inspect_network(&network, None::<InspectNetworkOptions>)
        .await
        .expect("inspect network");
    assert_eq!(net.internal, Some(true), "{env}: the network is internal");
    let gateway_ip = net
        .ipam
        .and_then(|i| i.config)
        .and_then(|c| c.into_iter().find_map(|c| c.gateway))
        .expect("network gateway");

    // From inside, through the platform's Exec.
    let (status, _, code) = exec(p, token, env, &["cat", "/proc/self/status"])
        .await
        .expect("exec through the gateway");
    assert_eq!(code, 0);
    assert_confined(&status, expected, "gateway exec");
    let (out, _, code) = exec(p, token, env, &["id", "-u"]).await.expect("exec id");
    assert_eq!((out.trim(), code), (expected.uid.to_string().as_str(), 0));

    // From inside, through `docker exec` (the engine's own default user).
    let output = Command::new("docker")
        .args(["exec", &id, "cat", "/proc/self/status"])
        .output()
        .expect("docker exec");
    assert!(output.status.success(), "docker exec: {output:?}");
    assert_confined(
        &String::from_utf8_lossy(&output.stdout),
        expected,
        "docker exec",
    );

    // No Docker socket anywhere it usually lives.
    for socket in [
        "/var/run/docker.sock",
        "/run/docker.sock",
        "/var/run/containerd/containerd.sock",
        "/run/containerd/containerd.sock",
    ] {
        let (_, _, code) = exec(p, token, env, &["ls", socket]).await.expect("exec ls");
        assert_ne!(code, 0, "{env}: {socket} is reachable inside");
    }
    let (out, _, _) = exec(
        p,
        token,
        env,
        &["sh", "-c", "find / -xdev -type s 2>/dev/null; true"],
    )
    .await
    .expect("exec find");
    assert!(out.trim().is_empty(), "{env}: sockets inside: {out}");

    // No way out: nothing beyond the environment's network answers, and no
    // Docker API over TCP on the host side of the bridge.
    let (_, _, code) = exec(
        p,
        token,
        env,
        &[
            "wget",
            "-q",
            "-T",
            "2",
            "-O",
            "/dev/null",
            "http://1.1.1.1/",
        ],
    )
    .await
    .expect("exec wget");
    assert_ne!(code, 0, "{env}: reached the internet");
    for port in ["2375", "2376"] {
        let probe = format!("echo x | nc -w 2 {gateway_ip} {port}");
        let (_, _, code) = exec(p, token, env, &["sh", "-c", &probe])
            .await
            .expect("exec nc");
        assert_ne!(
            code, 0,
            "{env}: Docker API port {port} reachable at {gateway_ip}"
        );
    }
    // A host service listening on 0.0.0.0 is not reachable from the
    // environment (the environment's bridge carries no host address).
    let reached = host_reachable(p, token, env, &gateway_ip).await;
    report.case(!reached);
    assert!(
        !reached,
        "{env}: a host listener on 0.0.0.0 answered from inside"
    );

    // The cgroup limits as the kernel applies them to the container.
    let (cg, _, _) = exec(
        p,
        token,
        env,
        &[
            "sh",
            "-c",
            "for f in memory/memory.limit_in_bytes memory.max pids/pids.max pids.max \
             cpu/cpu.cfs_quota_us cpu/cpu.cfs_period_us cpu.max; do \
             [ -r /sys/fs/cgroup/$f ] && echo \"$f=$(cat /sys/fs/cgroup/$f)\"; done; true",
        ],
    )
    .await
    .expect("exec cgroup");
    let cg: HashMap<&str, &str> = cg.lines().filter_map(|l| l.split_once('=')).collect();
    let memory = cg
        .get("memory/memory.limit_in_bytes")
        .or(cg.get("memory.max"))
        .unwrap_or_else(|| panic!("{env}: no memory limit file: {cg:?}"));
    assert_eq!(
        memory.parse::<i64>().ok(),
        Some(expected.memory_bytes),
        "{env}: memory cgroup"
    );
    let pids = cg
        .get("pids/pids.max")
        .or(cg.get("pids.max"))
        .unwrap_or_else(|| panic!("{env}: no pids limit file: {cg:?}"));
    assert_eq!(
        pids.parse::<i64>().ok(),
        Some(expected.pids),
        "{env}: pids cgroup"
    );
    let (quota, period) = match (
        cg.get("cpu/cpu.cfs_quota_us"),
        cg.get("cpu/cpu.cfs_period_us"),
    ) {
        (Some(q), Some(p)) => (q.to_string(), p.to_string()),
        _ => {
            let max = cg
                .get("cpu.max")
                .unwrap_or_else(|| panic!("{env}: no cpu limit: {cg:?}"));
            let (q, p) = max.split_once(' ').expect("cpu.max");
            (q.to_owned(), p.to_owned())
        }
    };
    let (quota, period): (i64, i64) = (
        quota
            .parse()
            .expect("cpu quota is a number (not unlimited)"),
        period.parse().expect("cpu period"),
    );
    assert_eq!(
        quota * 1_000_000_000 / period,
        expected.nano_cpus,
        "{env}: cpu quota {quota}/{period}"
    );

    report.inspected += 1;
}
