//! Egress gates: the orchestrator's side of outbound access.
//!
//! An environment's network stays `internal` (no route out, no address of
//! the host on it) in every mode. When policy decided `allow-list` or
//! `internet`, the orchestrator adds one platform container to that
//! network, the environment's **gate** (`vibebox-gate-<id>`, from the
//! helper image, see [`crate::helper_image`] and `vibebox_gate`): it sits on
//! the environment's network at the subnet's last address and on the
//! outbound network (`--egress-network`), and is the environment's DNS
//! server and HTTP proxy. The environment can reach nothing but the gate,
//! so nothing depends on its cooperation: a client that ignores the proxy
//! and DNS simply has no route.
//!
//! The gate's decisions come from the hardened spec (the clearance covers
//! them); what it refuses it reports on stdout, and [`spawn_gate_watch`]
//! follows every gate's output: the first refusal per destination is
//! audited (`network.egress_denied`), and the counts feed `StreamStats`.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HostConfig, NetworkConnectRequest,
    NetworkCreateRequest, NetworkingConfig, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use vibebox_gate::events::GateEvent;
use vibebox_gate::{EgressConfig, Mode, Rule};
use vibebox_proto::audit::{Outcome, Severity};
use vibebox_proto::environment::{ContainerSpec, EgressMode};

use crate::audit::Event;
use crate::docker::{self, labels};
use crate::service::{Error, Orchestrator, Result};
use crate::store::{EnvRecord, State};
use crate::subnet::Cidr;

/// [`docker::labels`]-style label naming a platform container's role.
pub const ROLE_LABEL: &str = "vibebox.role";
/// The gate's role.
pub const GATE_ROLE: &str = "gate";
/// The gate's user: not root, no name needed in the image.
const GATE_USER: &str = "65532:65532";

/// Where gates reach out, and what they never reach.
#[derive(Debug, Clone)]
pub struct EgressSettings {
    /// The outbound networks gates join, the first providing their default
    /// route (each created as a plain bridge if missing; never removed).
    pub networks: Vec<String>,
    /// Upstream resolvers for the gates (empty: the engine's resolver as
    /// the gate sees it).
    pub dns: Vec<SocketAddr>,
    /// Ranges no environment reaches whatever its rules say (the engine
    /// host's own addresses, the platform's networks).
    pub deny: Vec<ipnet::IpNet>,
    /// The VibeBox executable the helper image is built from (default: the
    /// running one).
    pub helper_executable: Option<PathBuf>,
}

impl Default for EgressSettings {
    fn default() -> Self {
        Self {
            networks: vec!["vibebox-egress".into()],
            dns: Vec::new(),
            deny: Vec::new(),
            helper_executable: None,
        }
    }
}

/// What the orchestrator knows of running gates.
#[derive(Default)]
pub(crate) struct GateState {
    /// Environments whose gate output is being followed.
    following: Mutex<HashSet<String>>,
    /// (allowed, denied) per environment, as the gate last reported.
    counts: Mutex<HashMap<String, (u64, u64)>>,
    /// Destinations already audited per environment.
    audited: Mutex<HashMap<String, HashSet<String>>>,
    /// The helper image, once built.
    image: tokio::sync::Mutex<Option<String>>,
    /// What no gate reaches, learnt from the engine, and when.
    engine_deny: tokio::sync::Mutex<Option<(std::time::Instant, Vec<ipnet::IpNet>)>>,
}

/// Name of an environment's gate container.
pub fn gate_name(env: &str) -> String {
    format!("vibebox-gate-{env}")
}

/// The policy decision in a hardened spec; `None` when the environment has
/// no egress (mode none or unset).
pub fn decision(spec: &ContainerSpec) -> Option<(Mode, Vec<Rule>)> {
    let egress = spec.egress.as_ref()?;
    let mode = match EgressMode::try_from(egress.mode).ok()? {
        EgressMode::AllowList => Mode::AllowList,
        EgressMode::Internet => Mode::Internet,
        EgressMode::None | EgressMode::Unspecified => return None,
    };
    let rules = egress
        .allow
        .iter()
        .filter_map(|r| {
            let host = (!r.host.is_empty()).then(|| r.host.clone());
            let cidr = if r.cidr.is_empty() {
                None
            } else {
                // The policy validated it; an unparsable one opens nothing.
                Some(r.cidr.parse().ok()?)
            };
            if host.is_none() == cidr.is_none() {
                return None;
            }
            Some(Rule {
                host,
                cidr,
                ports: r
                    .ports
                    .iter()
                    .filter_map(|p| u16::try_from(*p).ok().filter(|p| *p != 0))
                    .collect(),
            })
        })
        .collect();
    Some((mode, rules))
}

/// The gate's address on an environment's subnet: its last usable one
/// (Docker hands the environment the first free one).
pub fn gate_address(subnet: Cidr) -> Ipv4Addr {
    subnet.last_host()
}

/// What the environment's container gets when it has a gate: the gate as
/// its resolver and proxy (a convenience: without them it has no route).
pub fn apply_to_body(body: &mut ContainerCreateBody, gate: Ipv4Addr) {
    let proxy = format!("http://{gate}:{}", vibebox_gate::PROXY_PORT);
    let env = body.env.get_or_insert_with(Vec::new);
    for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        env.retain(|e| !e.starts_with(&format!("{key}=")));
        env.push(format!("{key}={proxy}"));
    }
    for key in ["NO_PROXY", "no_proxy"] {
        env.retain(|e| !e.starts_with(&format!("{key}=")));
        env.push(format!("{key}=localhost,127.0.0.1,::1"));
    }
    let host = body.host_config.get_or_insert_with(HostConfig::default);
    host.dns = Some(vec![gate.to_string()]);
}

fn status(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

impl Orchestrator {
    fn subnet_of(rec: &EnvRecord) -> Option<Cidr> {
        rec.subnet.as_deref()?.parse().ok()
    }

    /// The gate's address when the environment has egress.
    pub(crate) fn gate_of(rec: &EnvRecord) -> Option<Ipv4Addr> {
        decision(&Self::spec_of(rec))?;
        Some(gate_address(Self::subnet_of(rec)?))
    }

    /// The helper image (egress gates, port forwarders), built once per
    /// process from `--helper-executable` or the running executable.
    pub(crate) async fn ensure_helper_image(&self) -> Result<String> {
        let mut image = self.inner.gates.image.lock().await;
        if let Some(i) = image.as_ref() {
            return Ok(i.clone());
        }
        let exe = match &self.inner.settings.egress.helper_executable {
            Some(p) => p.clone(),
            None => crate::helper_image::running_executable()
                .map_err(|e| Error::Egress(format!("cannot find the running executable: {e}")))?,
        };
        let built = crate::helper_image::ensure(self.docker(), &exe)
            .await
            .map_err(|e| Error::Egress(e.to_string()))?;
        *image = Some(built.clone());
        Ok(built)
    }

    /// The outbound networks, created when missing (shared by every gate
    /// of every installation on the engine; never removed by the platform).
    async fn egress_networks(&self) -> Result<()> {
        for name in &self.inner.settings.egress.networks {
            self.egress_network(name).await?;
        }
        Ok(())
    }

    async fn egress_network(&self, name: &str) -> Result<()> {
        if self.docker().inspect_network(name, None).await.is_ok() {
            return Ok(());
        }
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".into()),
            internal: Some(false),
            labels: Some(HashMap::from([
                (labels::MANAGED.to_string(), "true".to_string()),
                (ROLE_LABEL.to_string(), "egress-network".to_string()),
            ])),
            ..Default::default()
        };
        match self.docker().create_network(request).await {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(409) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// What no gate may reach whatever the rules say, learnt from the
    /// engine: every address of the engine host (a one-shot probe on its
    /// host network, so public addresses too), the gateway of every network
    /// on the engine (the host again, on each bridge), and the subnets of
    /// every network that is not an outbound one (the platform's own
    /// containers under compose, other installations, other environments).
    /// Cached for a minute; fails closed (no gate without it).
    async fn engine_deny(&self) -> Result<Vec<ipnet::IpNet>> {
        let mut cache = self.inner.gates.engine_deny.lock().await;
        if let Some((at, nets)) = cache.as_ref()
            && at.elapsed() < Duration::from_secs(60)
        {
            return Ok(nets.clone());
        }
        let mut out: Vec<ipnet::IpNet> = self
            .host_addresses()
            .await?
            .into_iter()
            .map(ipnet::IpNet::from)
            .collect();
        let outbound = &self.inner.settings.egress.networks;
        let networks = self
            .docker()
            .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
            .await?;
        for network in networks {
            let own = network.name.as_ref().is_some_and(|n| outbound.contains(n));
            for config in network.ipam.and_then(|i| i.config).unwrap_or_default() {
                if let Some(ip) = config
                    .gateway
                    .and_then(|g| g.parse::<std::net::IpAddr>().ok())
                {
                    out.push(ipnet::IpNet::from(ip));
                }
                let Some(net) = config.subnet.and_then(|s| s.parse::<ipnet::IpNet>().ok()) else {
                    continue;
                };
                if own {
                    // The outbound networks' own hosts are the world the
                    // gates reach; only the host's address on them is not
                    // (without an explicit gateway the engine takes the
                    // subnet's first address and does not record it).
                    if let Some(first) = net.hosts().next() {
                        out.push(ipnet::IpNet::from(first));
                    }
                } else {
                    out.push(net);
                }
            }
        }
        out.sort();
        out.dedup();
        *cache = Some((std::time::Instant::now(), out.clone()));
        Ok(out)
    }

    /// The engine host's own addresses: `gate local-addresses` in a
    /// one-shot container on the engine's host network (no capability,
    /// read-only, not root), the same against a local engine and a
    /// Docker-in-Docker daemon.
    async fn host_addresses(&self) -> Result<Vec<std::net::IpAddr>> {
        let image = self.ensure_helper_image().await?;
        let docker = self.docker();
        let name = format!("vibebox-probe-{}", uuid::Uuid::new_v4().simple());
        let mut labels = HashMap::from([
            (labels::MANAGED.to_string(), "true".to_string()),
            (
                labels::INSTALLATION.to_string(),
                self.installation().to_string(),
            ),
            (ROLE_LABEL.to_string(), "probe".to_string()),
        ]);
        labels.extend(self.inner.settings.extra_labels.iter().cloned());
        let body = ContainerCreateBody {
            image: Some(image),
            entrypoint: Some(vibebox_gate::local_addresses_command()),
            cmd: Some(vec![]),
            user: Some(GATE_USER.into()),
            labels: Some(labels),
            network_disabled: Some(false),
            host_config: Some(HostConfig {
                network_mode: Some("host".into()),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                readonly_rootfs: Some(true),
                memory: Some(32 * 1024 * 1024),
                pids_limit: Some(16),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        docker.create_container(Some(options), body).await?;
        let result = async {
            docker.start_container(&name, None).await?;
            let mut wait = docker.wait_container(
                &name,
                None::<bollard::query_parameters::WaitContainerOptions>,
            );
            while let Some(step) = wait.next().await {
                step?;
            }
            let options = LogsOptionsBuilder::new().stdout(true).build();
            let mut logs = docker.logs(&name, Some(options));
            let mut text = String::new();
            while let Some(chunk) = logs.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk?.into_bytes()));
            }
            let all: Vec<String> = serde_json::from_str(text.trim())
                .map_err(|e| Error::Egress(format!("engine host addresses: {e}")))?;
            Ok::<_, Error>(all.iter().filter_map(|a| a.parse().ok()).collect())
        }
        .await;
        let _ = self.inner.runtime.remove_container(&name).await;
        result
    }

    fn gate_config(&self, rec: &EnvRecord, mode: Mode, rules: Vec<Rule>) -> Result<EgressConfig> {
        let subnet = Self::subnet_of(rec)
            .ok_or_else(|| Error::Egress("environment without a subnet".into()))?;
        let settings = &self.inner.settings;
        let mut deny = settings.egress.deny.clone();
        // No environment reaches another environment's network.
        let pool = settings.subnet_pool;
        if let Ok(net) = format!("{}/{}", pool.addr, pool.prefix).parse() {
            deny.push(net);
        }
        Ok(EgressConfig {
            mode,
            rules,
            listen: gate_address(subnet),
            upstream_dns: settings.egress.dns.clone(),
            deny,
        })
    }

    /// Creates (if needed) and starts the gate of an environment with
    /// egress, and waits until it listens. Nothing for one without.
    pub(crate) async fn gate_up(&self, rec: &EnvRecord) -> Result<()> {
        let Some((mode, rules)) = decision(&Self::spec_of(rec)) else {
            return Ok(());
        };
        let name = gate_name(&rec.id);
        let docker = self.docker();
        let exists = docker.inspect_container(&name, None).await.is_ok();
        if !exists {
            self.egress_networks().await?;
            let image = self.ensure_helper_image().await?;
            let mut config = self.gate_config(rec, mode, rules)?;
            config.deny.extend(self.engine_deny().await?);
            let config = serde_json::to_string(&config)
                .map_err(|e| Error::Egress(format!("gate configuration: {e}")))?;
            let mut labels = docker::platform_labels(&self.target(rec));
            labels.insert(ROLE_LABEL.into(), GATE_ROLE.into());
            let networks = &self.inner.settings.egress.networks;
            let egress_network = networks
                .first()
                .cloned()
                .ok_or_else(|| Error::Egress("no egress network configured".into()))?;
            let body = ContainerCreateBody {
                image: Some(image),
                entrypoint: Some(vibebox_gate::egress_command()),
                cmd: Some(vec![]),
                env: Some(vec![format!("{}={config}", vibebox_gate::CONFIG_ENV)]),
                user: Some(GATE_USER.into()),
                labels: Some(labels),
                host_config: Some(HostConfig {
                    cap_drop: Some(vec!["ALL".into()]),
                    security_opt: Some(vec!["no-new-privileges:true".into()]),
                    readonly_rootfs: Some(true),
                    memory: Some(64 * 1024 * 1024),
                    memory_swap: Some(64 * 1024 * 1024),
                    nano_cpus: Some(500_000_000),
                    pids_limit: Some(128),
                    // Ports 53, 80 and 443 without any capability; and the
                    // gate is not a router: a packet sent to it (by an
                    // environment that somehow held NET_RAW) is not
                    // forwarded, whatever the host's defaults.
                    sysctls: Some(HashMap::from([
                        (
                            "net.ipv4.ip_unprivileged_port_start".to_string(),
                            "0".to_string(),
                        ),
                        ("net.ipv4.ip_forward".to_string(), "0".to_string()),
                        ("net.ipv4.conf.all.rp_filter".to_string(), "1".to_string()),
                    ])),
                    // Its output is the orchestrator's feed: bounded.
                    log_config: Some(bollard::models::HostConfigLogConfig {
                        typ: Some("json-file".into()),
                        config: Some(HashMap::from([
                            ("max-size".to_string(), "1m".to_string()),
                            ("max-file".to_string(), "2".to_string()),
                        ])),
                    }),
                    network_mode: Some(egress_network.clone()),
                    restart_policy: Some(RestartPolicy {
                        name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                        maximum_retry_count: None,
                    }),
                    ..Default::default()
                }),
                networking_config: Some(NetworkingConfig {
                    endpoints_config: Some(HashMap::from([(
                        egress_network,
                        EndpointSettings::default(),
                    )])),
                }),
                ..Default::default()
            };
            let options = CreateContainerOptionsBuilder::new().name(&name).build();
            match docker
                .create_container(Some(options.clone()), body.clone())
                .await
            {
                Ok(_) => {}
                Err(e) if status(&e) == Some(409) => {}
                // The image went away (another build pruned it): import
                // it again, once.
                Err(e) if status(&e) == Some(404) => {
                    *self.inner.gates.image.lock().await = None;
                    let mut body = body;
                    body.image = Some(self.ensure_helper_image().await?);
                    match docker.create_container(Some(options), body).await {
                        Ok(_) => {}
                        Err(e) if status(&e) == Some(409) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
            let subnet = Self::subnet_of(rec)
                .ok_or_else(|| Error::Egress("environment without a subnet".into()))?;
            let connect = NetworkConnectRequest {
                container: name.clone(),
                endpoint_config: Some(EndpointSettings {
                    ipam_config: Some(EndpointIpamConfig {
                        ipv4_address: Some(gate_address(subnet).to_string()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            };
            let mut joins = vec![(docker::network_name(&rec.id), connect)];
            for extra in networks.iter().skip(1) {
                joins.push((
                    extra.clone(),
                    NetworkConnectRequest {
                        container: name.clone(),
                        endpoint_config: Some(EndpointSettings::default()),
                    },
                ));
            }
            for (network, request) in joins {
                match docker.connect_network(&network, request).await {
                    Ok(()) => {}
                    Err(e) if matches!(status(&e), Some(403 | 409)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let since = chrono::Utc::now().timestamp() - 1;
        let fresh = match docker.start_container(&name, None).await {
            Ok(()) => true,
            Err(e) if status(&e) == Some(304) => false,
            Err(e) => return Err(e.into()),
        };
        // A gate that was already running said it was ready long ago.
        if fresh {
            self.wait_gate_ready(&name, since).await?;
        }
        self.follow_gate(rec);
        Ok(())
    }

    /// Waits until the gate says it listens (its DNS must answer before the
    /// environment's first lookup).
    async fn wait_gate_ready(&self, name: &str, since: i64) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let options = LogsOptionsBuilder::new()
                .stdout(true)
                .stderr(true)
                .since(i32::try_from(since).unwrap_or(0))
                .build();
            let mut logs = self.docker().logs(name, Some(options));
            let mut text = String::new();
            while let Some(Ok(chunk)) = logs.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            }
            if text.contains("\"event\":\"ready\"") {
                return Ok(());
            }
            let running = self
                .docker()
                .inspect_container(name, None)
                .await
                .ok()
                .and_then(|c| c.state?.running)
                .unwrap_or(false);
            if tokio::time::Instant::now() >= deadline || (!running && !text.is_empty()) {
                let last = text.lines().last().unwrap_or("no output").to_owned();
                return Err(Error::Egress(format!(
                    "the egress gate did not start: {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the gate (after its environment stopped).
    pub(crate) async fn gate_stop(&self, rec: &EnvRecord) -> Result<()> {
        if decision(&Self::spec_of(rec)).is_none() {
            return Ok(());
        }
        let stop = StopContainerOptionsBuilder::new().t(2).build();
        match self
            .docker()
            .stop_container(&gate_name(&rec.id), Some(stop))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if matches!(status(&e), Some(304 | 404)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the gate (whatever the spec says: a gate left behind by an
    /// earlier spec goes too).
    pub(crate) async fn gate_remove(&self, env: &str) -> Result<()> {
        let r = match self.inner.runtime.remove_container(&gate_name(env)).await {
            Ok(()) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(e.into()),
        };
        self.inner
            .gates
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(env);
        self.inner
            .gates
            .audited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(env);
        r
    }

    /// Egress connections (allowed, refused) the gate reported since it
    /// started.
    pub fn egress_counts(&self, env: &str) -> (u64, u64) {
        self.inner
            .gates
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(env)
            .copied()
            .unwrap_or_default()
    }

    /// Follows the gate's output (once per environment at a time).
    fn follow_gate(&self, rec: &EnvRecord) {
        {
            let mut following = self
                .inner
                .gates
                .following
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if !following.insert(rec.id.clone()) {
                return;
            }
        }
        let this = self.clone();
        let (env, team) = (rec.id.clone(), rec.team_id.clone());
        tokio::spawn(async move {
            this.follow_gate_output(&env, &team).await;
            this.inner
                .gates
                .following
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&env);
        });
    }

    async fn follow_gate_output(&self, env: &str, team: &str) {
        let options = LogsOptionsBuilder::new().stdout(true).follow(true).build();
        let mut logs = self.docker().logs(&gate_name(env), Some(options));
        let mut pending = String::new();
        while let Some(Ok(chunk)) = logs.next().await {
            pending.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            while let Some(at) = pending.find('\n') {
                let line: String = pending.drain(..=at).collect();
                if let Some(event) = GateEvent::parse(&line) {
                    self.gate_event(env, team, event).await;
                }
            }
            if pending.len() > 64 * 1024 {
                pending.clear();
            }
        }
    }

    async fn gate_event(&self, env: &str, team: &str, event: GateEvent) {
        match event {
            GateEvent::Ready { .. } => {}
            GateEvent::EgressCounts { allowed, denied } => {
                self.inner
                    .gates
                    .counts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(env.to_owned(), (allowed, denied));
            }
            GateEvent::EgressDenied {
                destination,
                address,
                code,
                reason,
            } => {
                let first = {
                    let mut audited = self
                        .inner
                        .gates
                        .audited
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let seen = audited.entry(env.to_owned()).or_default();
                    seen.len() < 1024 && seen.insert(destination.clone())
                };
                if !first {
                    return;
                }
                // One event per destination per environment, whoever reads
                // the gate's output and however often (a restarted
                // orchestrator reads it again from the start).
                let id =
                    crate::audit::once_id(env, &format!("network.egress_denied {destination}"));
                let result = self
                    .audit()
                    .record_once(
                        id,
                        Event {
                            action: "network.egress_denied",
                            outcome: Outcome::Denied,
                            severity: Severity::Medium,
                            caller: None,
                            team_id: team,
                            environment_id: env,
                            details: vec![
                                ("destination", destination),
                                ("address", address),
                                ("rule", format!("egress.{code}")),
                                ("reason", reason),
                            ],
                        },
                    )
                    .await;
                if let Err(e) = result {
                    tracing::warn!(environment = env, error = %e, "egress refusal not audited");
                }
            }
        }
    }

    /// Follows every running gate of this installation that is not
    /// followed yet (after a restart of the orchestrator).
    async fn follow_running_gates(&self) -> Result<()> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{}={}", labels::INSTALLATION, self.installation()),
                format!("{ROLE_LABEL}={GATE_ROLE}"),
            ],
        )]);
        let gates = self
            .docker()
            .list_containers(Some(
                ListContainersOptionsBuilder::new()
                    .filters(&filters)
                    .build(),
            ))
            .await?;
        for gate in gates {
            let Some(env) = gate
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::ENVIRONMENT))
            else {
                continue;
            };
            if let Ok(rec) = self.get(env).await
                && rec.state == State::Running
            {
                self.follow_gate(&rec);
            }
        }
        Ok(())
    }
}

/// Keeps every running gate's output followed (every few seconds: after a
/// restart of the orchestrator, and after an engine restart brought a gate
/// back).
pub fn spawn_gate_watch(orchestrator: Orchestrator, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = orchestrator.follow_running_gates().await {
                tracing::debug!(error = %e, "cannot list egress gates");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
}
