//! Translation between a cleared `ContainerSpec` and Docker objects: names,
//! platform labels, the hardened create body, the isolated network request,
//! and the drift check that compares an inspected container with the body the
//! spec produces.
//!
//! Invariant: the create body is a pure function of the cleared spec, the
//! environment and the installation; drift detection re-derives it and
//! compares, so what was cleared is what must be running.

use std::collections::{BTreeSet, HashMap};

use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, DeviceMapping, HealthConfig, HostConfig,
    HostConfigLogConfig, Ipam, IpamConfig, Mount, MountTmpfsOptions, MountType,
    NetworkCreateRequest, RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use vibebox_proto::environment::{ContainerSpec, MountType as SpecMountType};

use crate::subnet::Cidr;

/// Label keys the platform puts on everything it creates.
pub mod labels {
    pub const MANAGED: &str = "vibebox.managed";
    pub const INSTALLATION: &str = "vibebox.installation";
    pub const ENVIRONMENT: &str = "vibebox.environment";
    pub const TEAM: &str = "vibebox.team";
    pub const OWNER: &str = "vibebox.owner";
    pub const POLICY_DIGEST: &str = "vibebox.policy-digest";
}

/// Where the workspace volume is mounted when the spec names no volume mount.
pub const DEFAULT_WORKSPACE: &str = "/workspace";

/// A spec the orchestrator will not apply even though it was cleared (a floor
/// under policy, never a bypass).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("privileged containers are never created")]
    Privileged,
    #[error("network mode {0:?} is not allowed; environments use their isolated network")]
    NetworkMode(String),
    #[error("published ports are not supported on isolated environment networks")]
    Ports,
    #[error("spec has no image")]
    NoImage,
    #[error("mount {0:?} has no type")]
    MountType(String),
    #[error("bind mount {0:?} exposes the Docker Engine or the host's root")]
    EngineMount(String),
    #[error("{0} mode {1:?} shares a namespace with the host or another container")]
    SharedNamespace(&'static str, String),
    #[error("bind source {source_path:?} (mount {index}) is refused: {reason}")]
    BindSource {
        index: usize,
        source_path: String,
        reason: BindSourceReason,
    },
}

/// Why a bind source is not mounted: the engine follows symlinks in a bind
/// source when it mounts it (at every start), so a path the policy judged
/// lexically must also hold on the host, and keep holding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindSourceReason {
    #[error("{0} is not a normalized absolute path")]
    NotNormalized(String),
    #[error("{0} is a symbolic link")]
    Symlink(String),
    #[error(
        "{0} does not exist or is not visible to the orchestrator (it must see the bind prefixes at the engine's paths)"
    )]
    Missing(String),
    #[error("{0} is not a directory")]
    NotDirectory(String),
    #[error(
        "{0} can be changed by a non-root user (owned by uid {1}, mode {2:o}): an entry below it could be swapped for a symbolic link"
    )]
    WritableAncestor(String, u32, u32),
    #[error("{0}: {1}")]
    Unreadable(String, String),
}

/// Checks every bind source of a cleared spec on the host's filesystem, the
/// one the engine resolves it on (the orchestrator must share it: the local
/// socket, or the bind prefixes mounted into the orchestrator at the same
/// paths as on the engine's host). A source is mounted only when
///
/// - no component of it is a symbolic link (the engine would follow it,
///   out of the prefix the policy allowed), and
/// - every directory above it is owned by root and writable by nobody else,
///   or is sticky (`/tmp`) with the next component owned by root: so no
///   tenant (never uid 0) can swap a component for a symbolic link between
///   this check and the engine's mount, or before a later restart.
///
/// The source itself may be writable (that is what a bind is for); what a
/// tenant creates inside it is never a component of another bind's path,
/// since that path's parent would be tenant-writable. A path the
/// orchestrator cannot see is refused (fail closed).
pub fn verify_bind_sources(spec: &ContainerSpec) -> Result<(), SpecError> {
    for (index, m) in spec.mounts.iter().enumerate() {
        if SpecMountType::try_from(m.r#type) != Ok(SpecMountType::Bind) {
            continue;
        }
        verify_bind_source(&m.source).map_err(|reason| SpecError::BindSource {
            index,
            source_path: m.source.clone(),
            reason,
        })?;
    }
    Ok(())
}

fn verify_bind_source(source: &str) -> Result<(), BindSourceReason> {
    use std::os::unix::fs::MetadataExt;
    let normalized = lexical(source);
    if normalized != source {
        // The policy hands over normalized paths; anything else was not judged.
        return Err(BindSourceReason::NotNormalized(source.to_owned()));
    }
    let lstat = |p: &str| match std::fs::symlink_metadata(p) {
        Ok(m) => Ok(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(BindSourceReason::Missing(p.to_owned()))
        }
        Err(e) => Err(BindSourceReason::Unreadable(p.to_owned(), e.to_string())),
    };
    let parts: Vec<&str> = normalized.split('/').filter(|p| !p.is_empty()).collect();
    let mut dir = String::from("/");
    let mut dir_meta = lstat("/")?;
    for part in parts {
        let child = if dir == "/" {
            format!("/{part}")
        } else {
            format!("{dir}/{part}")
        };
        let child_meta = lstat(&child)?;
        if child_meta.file_type().is_symlink() {
            return Err(BindSourceReason::Symlink(child));
        }
        if !dir_meta.is_dir() {
            return Err(BindSourceReason::NotDirectory(dir));
        }
        let mode = dir_meta.mode() & 0o7777;
        let others_write = mode & 0o022 != 0;
        let sticky = mode & 0o1000 != 0;
        let safe = dir_meta.uid() == 0 && (!others_write || (sticky && child_meta.uid() == 0));
        if !safe {
            return Err(BindSourceReason::WritableAncestor(
                dir,
                dir_meta.uid(),
                mode,
            ));
        }
        dir = child;
        dir_meta = child_meta;
    }
    Ok(())
}

/// What the engine's refusal of a cleared spec names: the field to fix and
/// the engine's reason, without the engine's internal paths.
pub fn engine_refusal(spec: &ContainerSpec, message: &str) -> (String, String) {
    let reason: String = message
        .split(' ')
        .map(|word| {
            let internal = [
                "/var/lib/docker",
                "/run/containerd",
                "/var/run/docker",
                "/run/docker",
            ]
            .iter()
            .any(|p| word.contains(p));
            if internal { "<engine path>" } else { word }
        })
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(512)
        .collect();
    let lower = message.to_ascii_lowercase();
    let quoted = |t: &str| format!("\"{t}\"");
    let mount = spec
        .mounts
        .iter()
        .position(|m| message.contains(&format!("rootfs at {}", quoted(&m.target))))
        .or_else(|| {
            spec.mounts
                .iter()
                .position(|m| message.contains(&quoted(&m.target)))
        });
    let field = if lower.contains("no command specified") {
        "spec.command".to_owned()
    } else if let Some(i) = mount {
        format!("spec.mounts[{i}].target")
    } else if lower.contains("unable to find user")
        || lower.contains("no matching entries in passwd")
        || lower.contains("no matching entries in group")
    {
        "spec.user".to_owned()
    } else if lower.contains("chdir") || lower.contains("working dir") || lower.contains("cwd") {
        "spec.working_dir".to_owned()
    } else if lower.contains("executable file not found")
        || lower.contains("exec format error")
        || lower.contains("exec:")
    {
        if spec.command.is_empty() && !spec.entrypoint.is_empty() {
            "spec.entrypoint".to_owned()
        } else {
            "spec.command".to_owned()
        }
    } else {
        "spec".to_owned()
    };
    (field, reason)
}

/// `path` with `.`, `..` and repeated or trailing slashes resolved lexically.
fn lexical(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Whether a bind source is the host root or leads to the Docker Engine
/// (its socket, its run directory, its state): never mounted, cleared or not.
fn exposes_engine(source: &str) -> bool {
    let p = lexical(source).to_ascii_lowercase();
    p == "/"
        || p.ends_with(".sock")
        || [
            "/var/run",
            "/run",
            "/var/lib/docker",
            "/var/lib/containerd",
            "/proc",
            "/sys",
            "/dev",
            "/etc",
        ]
        .iter()
        .any(|root| p == *root || p.starts_with(&format!("{root}/")))
}

/// Identity of an environment's Docker objects.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub installation: &'a str,
    pub environment_id: &'a str,
    pub team_id: &'a str,
    pub owner_id: &'a str,
    pub policy_digest: &'a str,
    /// Extra labels (for example `vibebox.test=<run>` in tests).
    pub extra_labels: &'a [(String, String)],
}

/// Container name of an environment.
pub fn container_name(env: &str) -> String {
    format!("vibebox-{env}")
}

/// Network name of an environment.
pub fn network_name(env: &str) -> String {
    format!("vibebox-{env}")
}

/// Workspace volume name of an environment.
pub fn volume_name(env: &str) -> String {
    format!("vibebox-ws-{env}")
}

/// Docker name of a named volume the spec asks for. Named volumes are
/// scoped to their environment (never shared across environments or teams)
/// and carry the platform labels, so delete and reconcile find them.
pub fn named_volume(env: &str, name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{}-{clean}", volume_name(env))
}

/// Volume create requests for every volume of a spec: the workspace and
/// each named volume.
pub fn volume_requests(t: &Target<'_>, spec: &ContainerSpec) -> Vec<VolumeCreateRequest> {
    let mut out = vec![volume_request(t)];
    for m in &spec.mounts {
        if SpecMountType::try_from(m.r#type) == Ok(SpecMountType::Volume) && !m.source.is_empty() {
            out.push(VolumeCreateRequest {
                name: Some(named_volume(t.environment_id, &m.source)),
                driver: Some("local".into()),
                labels: Some(platform_labels(t)),
                ..Default::default()
            });
        }
    }
    out
}

/// The platform labels of an environment's objects.
pub fn platform_labels(t: &Target<'_>) -> HashMap<String, String> {
    let mut l: HashMap<String, String> = t.extra_labels.iter().cloned().collect();
    l.insert(labels::MANAGED.into(), "true".into());
    l.insert(labels::INSTALLATION.into(), t.installation.into());
    l.insert(labels::ENVIRONMENT.into(), t.environment_id.into());
    l.insert(labels::TEAM.into(), t.team_id.into());
    l.insert(labels::OWNER.into(), t.owner_id.into());
    l.insert(labels::POLICY_DIGEST.into(), t.policy_digest.into());
    l
}

/// The isolated network: internal (no route out), no inter-container traffic,
/// on its own subnet. `gated`: the environment has an egress gate on it,
/// which must reach the environment (and nothing else is on the network).
pub fn network_request(t: &Target<'_>, subnet: Cidr, gated: bool) -> NetworkCreateRequest {
    NetworkCreateRequest {
        name: network_name(t.environment_id),
        driver: Some("bridge".into()),
        internal: Some(true),
        attachable: Some(false),
        ipam: Some(Ipam {
            driver: Some("default".into()),
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.to_string()),
                gateway: Some(subnet.gateway().to_string()),
                ..Default::default()
            }]),
            options: None,
        }),
        options: Some(HashMap::from([
            // No traffic between containers on the bridge...
            (
                "com.docker.network.bridge.enable_icc".to_string(),
                gated.to_string(),
            ),
            // ...and no address of the host on it: `internal` only stops
            // forwarding, so without this a container reaches every host
            // service listening on the gateway address or 0.0.0.0.
            (
                "com.docker.network.bridge.inhibit_ipv4".to_string(),
                "true".to_string(),
            ),
        ])),
        labels: Some(platform_labels(t)),
        ..Default::default()
    }
}

/// The workspace volume.
pub fn volume_request(t: &Target<'_>) -> VolumeCreateRequest {
    VolumeCreateRequest {
        name: Some(volume_name(t.environment_id)),
        driver: Some("local".into()),
        labels: Some(platform_labels(t)),
        ..Default::default()
    }
}

const MIB: i64 = 1024 * 1024;

/// Nano CPUs for a fractional core count.
pub fn nano_cpus(spec: &ContainerSpec) -> i64 {
    spec.cpu_limit
        .map(|c| (c * 1e9).round() as i64)
        .unwrap_or(0)
}

/// Memory limit in bytes.
pub fn memory_bytes(spec: &ContainerSpec) -> i64 {
    spec.memory_limit_mb.map(|m| m * MIB).unwrap_or(0)
}

fn norm_cap(c: &str) -> String {
    let c = c.trim().to_ascii_uppercase();
    c.strip_prefix("CAP_").map(str::to_owned).unwrap_or(c)
}

/// The hardened create body for a cleared spec. `health_cmd` is the health
/// check command (exec form).
pub fn container_body(
    spec: &ContainerSpec,
    image: &str,
    t: &Target<'_>,
    health_cmd: &[String],
) -> Result<ContainerCreateBody, SpecError> {
    if spec.privileged {
        return Err(SpecError::Privileged);
    }
    if !spec.ports.is_empty() {
        return Err(SpecError::Ports);
    }
    if image.is_empty() {
        return Err(SpecError::NoImage);
    }
    for (what, mode) in [
        ("pid", &spec.pid_mode),
        ("ipc", &spec.ipc_mode),
        ("uts", &spec.uts_mode),
        ("userns", &spec.userns_mode),
        ("cgroupns", &spec.cgroupns_mode),
    ] {
        let m = mode.trim().to_ascii_lowercase();
        if m == "host" || m.starts_with("container:") {
            return Err(SpecError::SharedNamespace(what, mode.clone()));
        }
    }
    let network_mode = match spec.network_mode.as_str() {
        "" | "default" | "bridge" => network_name(t.environment_id),
        "none" => "none".to_string(),
        other => return Err(SpecError::NetworkMode(other.to_string())),
    };

    let mut cap_drop: Vec<String> = spec.cap_drop.iter().map(|c| norm_cap(c)).collect();
    if !cap_drop.iter().any(|c| c == "ALL") {
        cap_drop.insert(0, "ALL".into());
    }
    let cap_add: Vec<String> = spec.cap_add.iter().map(|c| norm_cap(c)).collect();
    let mut security_opt = spec.security_opt.clone();
    if !security_opt
        .iter()
        .any(|o| o == "no-new-privileges" || o == "no-new-privileges:true")
    {
        security_opt.push("no-new-privileges:true".into());
    }

    let mut mounts = Vec::new();
    let mut has_workspace = false;
    for m in &spec.mounts {
        let kind = SpecMountType::try_from(m.r#type).unwrap_or(SpecMountType::Unspecified);
        let mount = match kind {
            SpecMountType::Bind if exposes_engine(&m.source) => {
                return Err(SpecError::EngineMount(m.source.clone()));
            }
            SpecMountType::Bind => Mount {
                typ: Some(MountType::BIND),
                source: Some(m.source.clone()),
                target: Some(m.target.clone()),
                read_only: Some(m.read_only),
                ..Default::default()
            },
            SpecMountType::Volume => {
                let source = if m.source.is_empty() {
                    has_workspace = true;
                    volume_name(t.environment_id)
                } else {
                    named_volume(t.environment_id, &m.source)
                };
                Mount {
                    typ: Some(MountType::VOLUME),
                    source: Some(source),
                    target: Some(m.target.clone()),
                    read_only: Some(m.read_only),
                    ..Default::default()
                }
            }
            SpecMountType::Tmpfs => Mount {
                typ: Some(MountType::TMPFS),
                target: Some(m.target.clone()),
                read_only: Some(m.read_only),
                tmpfs_options: m.size_mb.map(|s| MountTmpfsOptions {
                    size_bytes: Some(s * MIB),
                    ..Default::default()
                }),
                ..Default::default()
            },
            SpecMountType::Unspecified => return Err(SpecError::MountType(m.target.clone())),
        };
        mounts.push(mount);
    }
    if !has_workspace {
        mounts.push(Mount {
            typ: Some(MountType::VOLUME),
            source: Some(volume_name(t.environment_id)),
            target: Some(DEFAULT_WORKSPACE.into()),
            read_only: Some(false),
            ..Default::default()
        });
    }

    let mut labels: HashMap<String, String> = spec
        .labels
        .iter()
        .filter(|(k, _)| !k.starts_with("vibebox."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(platform_labels(t));

    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let host_config = HostConfig {
        privileged: Some(false),
        cap_drop: Some(cap_drop),
        cap_add: (!cap_add.is_empty()).then_some(cap_add),
        security_opt: Some(security_opt),
        readonly_rootfs: Some(spec.read_only_rootfs.unwrap_or(false)),
        nano_cpus: spec.cpu_limit.map(|_| nano_cpus(spec)),
        memory: spec.memory_limit_mb.map(|_| memory_bytes(spec)),
        // Swap pinned to memory: no swap beyond the limit (Docker's default
        // would add as much swap again).
        memory_swap: spec.memory_limit_mb.map(|_| memory_bytes(spec)),
        pids_limit: spec.pids_limit,
        init: Some(true),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
            maximum_retry_count: None,
        }),
        network_mode: Some(network_mode),
        mounts: Some(mounts),
        devices: (!spec.devices.is_empty()).then(|| {
            spec.devices
                .iter()
                .map(|d| DeviceMapping {
                    path_on_host: Some(d.host_path.clone()),
                    path_in_container: Some(d.container_path.clone()),
                    cgroup_permissions: non_empty(&d.permissions),
                })
                .collect()
        }),
        pid_mode: non_empty(&spec.pid_mode),
        // Always a private cgroup namespace (policy refuses "host"): the
        // engine's default on cgroup v1 would be the host's.
        cgroupns_mode: Some(bollard::models::HostConfigCgroupnsModeEnum::PRIVATE),
        ipc_mode: non_empty(&spec.ipc_mode),
        uts_mode: non_empty(&spec.uts_mode),
        userns_mode: non_empty(&spec.userns_mode),
        sysctls: (!spec.sysctls.is_empty()).then(|| {
            spec.sysctls
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".to_string(), "10m".to_string()),
                ("max-file".to_string(), "3".to_string()),
            ])),
        }),
        ..Default::default()
    };

    Ok(ContainerCreateBody {
        image: Some(image.to_string()),
        user: spec.user.clone(),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        entrypoint: (!spec.entrypoint.is_empty()).then(|| spec.entrypoint.clone()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        working_dir: non_empty(&spec.working_dir),
        labels: Some(labels),
        healthcheck: (!health_cmd.is_empty()).then(|| {
            let mut test = vec!["CMD".to_string()];
            test.extend(health_cmd.iter().cloned());
            HealthConfig {
                test: Some(test),
                interval: Some(30_000_000_000),
                timeout: Some(5_000_000_000),
                retries: Some(3),
                start_period: Some(5_000_000_000),
                ..Default::default()
            }
        }),
        host_config: Some(host_config),
        ..Default::default()
    })
}

fn set(v: &Option<Vec<String>>) -> BTreeSet<String> {
    v.iter().flatten().map(|c| norm_cap(c)).collect()
}

fn mode_matches(expected: &Option<String>, actual: &Option<String>, defaults: &[&str]) -> bool {
    let actual = actual.as_deref().unwrap_or("");
    match expected.as_deref() {
        None | Some("") => actual.is_empty() || defaults.contains(&actual),
        Some(e) => e == actual,
    }
}

fn positive(v: Option<i64>) -> i64 {
    v.filter(|x| *x > 0).unwrap_or(0)
}

/// Differences between what `expected` asked for and what the engine reports
/// for the container; empty when it matches.
pub fn drift(expected: &ContainerCreateBody, actual: &ContainerInspectResponse) -> Vec<String> {
    let mut out = Vec::new();
    let eh = expected.host_config.clone().unwrap_or_default();
    let ah = actual.host_config.clone().unwrap_or_default();
    let ac = actual.config.clone().unwrap_or_default();

    let e_user = expected.user.clone().unwrap_or_default();
    let a_user = ac.user.clone().unwrap_or_default();
    if e_user != a_user {
        out.push(format!("user {a_user:?} != {e_user:?}"));
    }
    if ah.privileged.unwrap_or(false) {
        out.push("privileged".into());
    }
    if set(&eh.cap_drop) != set(&ah.cap_drop) {
        out.push(format!("cap_drop {:?}", ah.cap_drop.unwrap_or_default()));
    }
    if set(&eh.cap_add) != set(&ah.cap_add) {
        out.push(format!("cap_add {:?}", ah.cap_add.unwrap_or_default()));
    }
    let eo: BTreeSet<_> = eh.security_opt.iter().flatten().cloned().collect();
    let ao: BTreeSet<_> = ah.security_opt.iter().flatten().cloned().collect();
    if eo != ao {
        out.push(format!("security_opt {ao:?}"));
    }
    if eh.readonly_rootfs.unwrap_or(false) != ah.readonly_rootfs.unwrap_or(false) {
        out.push("readonly_rootfs".into());
    }
    for (name, e, a) in [
        ("memory", eh.memory, ah.memory),
        ("nano_cpus", eh.nano_cpus, ah.nano_cpus),
        ("pids_limit", eh.pids_limit, ah.pids_limit),
    ] {
        if positive(e) != positive(a) {
            out.push(format!("{name} {} != {}", positive(a), positive(e)));
        }
    }
    if !mode_matches(&eh.pid_mode, &ah.pid_mode, &[]) {
        out.push(format!("pid_mode {:?}", ah.pid_mode));
    }
    if !mode_matches(&eh.ipc_mode, &ah.ipc_mode, &["private", "shareable"]) {
        out.push(format!("ipc_mode {:?}", ah.ipc_mode));
    }
    if !mode_matches(&eh.uts_mode, &ah.uts_mode, &[]) {
        out.push(format!("uts_mode {:?}", ah.uts_mode));
    }
    if !mode_matches(&eh.userns_mode, &ah.userns_mode, &[]) {
        out.push(format!("userns_mode {:?}", ah.userns_mode));
    }
    if eh.network_mode != ah.network_mode {
        out.push(format!("network_mode {:?}", ah.network_mode));
    }
    let a_nets: BTreeSet<String> = actual
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .map(|n| n.keys().cloned().collect())
        .unwrap_or_default();
    let e_nets: BTreeSet<String> = eh
        .network_mode
        .iter()
        .filter(|m| m.as_str() != "none")
        .cloned()
        .collect();
    if !e_nets.is_empty() && a_nets != e_nets {
        out.push(format!("networks {a_nets:?}"));
    }
    if ah.binds.as_ref().is_some_and(|b| !b.is_empty()) {
        out.push("binds".into());
    }
    let key = |m: &Mount| {
        (
            m.typ.map(|t| t.to_string()).unwrap_or_default(),
            m.source.clone().unwrap_or_default(),
            m.target.clone().unwrap_or_default(),
            m.read_only.unwrap_or(false),
        )
    };
    let em: BTreeSet<_> = eh.mounts.iter().flatten().map(key).collect();
    let am: BTreeSet<_> = ah.mounts.iter().flatten().map(key).collect();
    if em != am {
        out.push(format!("mounts {am:?}"));
    }
    let targets: BTreeSet<String> = eh
        .mounts
        .iter()
        .flatten()
        .filter_map(|m| m.target.clone())
        .collect();
    for mp in actual.mounts.iter().flatten() {
        let d = mp.destination.clone().unwrap_or_default();
        if !targets.contains(&d) {
            out.push(format!("unexpected mount at {d:?}"));
        }
    }
    let ed = eh.devices.as_ref().map_or(0, Vec::len);
    let ad = ah.devices.as_ref().map_or(0, Vec::len);
    if ed != ad {
        out.push(format!("{ad} devices"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target<'static> {
        Target {
            installation: "inst",
            environment_id: "env",
            team_id: "team",
            owner_id: "owner",
            policy_digest: "digest",
            extra_labels: &[],
        }
    }

    #[test]
    fn body_applies_the_floor_and_limits() {
        let spec = ContainerSpec {
            image: "x".into(),
            user: Some("1000".into()),
            cap_drop: vec!["all".into()],
            cpu_limit: Some(0.5),
            memory_limit_mb: Some(64),
            pids_limit: Some(50),
            read_only_rootfs: Some(true),
            ..Default::default()
        };
        let b = container_body(&spec, "img:1", &target(), &["true".into()]).unwrap();
        let h = b.host_config.as_ref().unwrap();
        assert_eq!(h.cap_drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(h.nano_cpus, Some(500_000_000));
        assert_eq!(h.memory, Some(64 * MIB));
        assert_eq!(h.memory_swap, Some(64 * MIB), "no swap beyond memory");
        assert!(
            h.security_opt
                .as_ref()
                .unwrap()
                .contains(&"no-new-privileges:true".into())
        );
        assert_eq!(h.network_mode.as_deref(), Some("vibebox-env"));
        assert_eq!(b.labels.as_ref().unwrap()[labels::INSTALLATION], "inst");
        for source in [
            "/var/run/docker.sock",
            "//run/../var/run/",
            "/",
            "/x/../etc/shadow",
        ] {
            let bind = ContainerSpec {
                mounts: vec![vibebox_proto::environment::Mount {
                    r#type: SpecMountType::Bind as i32,
                    source: source.into(),
                    target: "/mnt".into(),
                    ..Default::default()
                }],
                ..spec.clone()
            };
            assert_eq!(
                container_body(&bind, "img:1", &target(), &[]).unwrap_err(),
                SpecError::EngineMount(source.into()),
                "{source}"
            );
        }
        let shared = ContainerSpec {
            pid_mode: "container:abc".into(),
            ..spec.clone()
        };
        assert!(matches!(
            container_body(&shared, "img:1", &target(), &[]),
            Err(SpecError::SharedNamespace("pid", _))
        ));
        let privileged = ContainerSpec {
            privileged: true,
            ..spec.clone()
        };
        assert_eq!(
            container_body(&privileged, "img:1", &target(), &[]).unwrap_err(),
            SpecError::Privileged
        );
        let host = ContainerSpec {
            network_mode: "host".into(),
            ..spec
        };
        assert!(container_body(&host, "img:1", &target(), &[]).is_err());
    }
}

#[cfg(test)]
mod volume_scope_tests {
    use super::*;

    #[test]
    fn named_volumes_are_scoped_to_their_environment() {
        assert_eq!(named_volume("e1", "data"), "vibebox-ws-e1-data");
        assert_ne!(named_volume("e1", "data"), named_volume("e2", "data"));
        assert_eq!(named_volume("e1", "../x y"), "vibebox-ws-e1-..-x-y");
    }
}

#[cfg(test)]
mod host_checks_tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn bind_at(source: &str) -> ContainerSpec {
        ContainerSpec {
            mounts: vec![vibebox_proto::environment::Mount {
                r#type: SpecMountType::Bind as i32,
                source: source.into(),
                target: "/data".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn reason(source: &str) -> Option<BindSourceReason> {
        match verify_bind_sources(&bind_at(source)) {
            Ok(()) => None,
            Err(SpecError::BindSource { reason, index, .. }) => {
                assert_eq!(index, 0);
                Some(reason)
            }
            Err(other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn bind_sources_hold_on_the_host() {
        let root = tempfile::tempdir_in("/tmp").unwrap();
        let prefix = root.path().to_str().unwrap().to_owned();
        std::fs::set_permissions(&prefix, std::fs::Permissions::from_mode(0o755)).unwrap();
        let project = format!("{prefix}/project");
        std::fs::create_dir(&project).unwrap();
        std::fs::set_permissions(&project, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::create_dir(format!("{project}/sub")).unwrap();
        std::os::unix::fs::symlink("/", format!("{project}/escape")).unwrap();

        assert!(matches!(
            reason("/tmp/x/../y"),
            Some(BindSourceReason::NotNormalized(_))
        ));
        assert!(matches!(
            reason(&format!("{prefix}/missing")),
            Some(BindSourceReason::Missing(_))
        ));
        assert_eq!(
            reason(&format!("{project}/escape")),
            Some(BindSourceReason::Symlink(format!("{project}/escape")))
        );
        assert_eq!(
            reason(&format!("{project}/escape/etc")),
            Some(BindSourceReason::Symlink(format!("{project}/escape")))
        );
        // Not symlinks, and the volume/tmpfs mounts are not looked at.
        assert!(
            verify_bind_sources(&ContainerSpec {
                mounts: vec![vibebox_proto::environment::Mount {
                    r#type: SpecMountType::Tmpfs as i32,
                    target: "/x".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .is_ok()
        );
        if std::fs::metadata(&prefix).unwrap().uid() == 0 {
            // Root-owned ancestors (sticky /tmp with a root-owned child).
            assert_eq!(reason(&prefix), None);
            assert_eq!(reason(&project), None);
            // Below a directory a tenant can write: refused.
            assert!(matches!(
                reason(&format!("{project}/sub")),
                Some(BindSourceReason::WritableAncestor(dir, 0, 0o777)) if dir == project
            ));
        } else {
            // /tmp is sticky but our directory is not root's.
            assert!(matches!(
                reason(&project),
                Some(BindSourceReason::WritableAncestor(_, _, _))
            ));
        }
    }

    #[test]
    fn engine_refusals_name_the_field_and_hide_engine_paths() {
        let spec = ContainerSpec {
            mounts: vec![vibebox_proto::environment::Mount {
                r#type: SpecMountType::Tmpfs as i32,
                target: "/etc/hosts".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (field, reason) = engine_refusal(&spec, "No command specified");
        assert_eq!(field, "spec.command");
        assert_eq!(reason, "No command specified");
        let (field, _) = engine_refusal(
            &spec,
            "failed to create shim task: OCI runtime create failed: runc create failed: \
             unable to start container process: error during container init: error mounting \
             \"tmpfs\" to rootfs at \"/etc/hosts\": mount tmpfs:/etc/hosts (via /proc/self/fd/6), \
             flags: 0xe: not a directory: unknown",
        );
        assert_eq!(field, "spec.mounts[0].target");
        let (field, _) = engine_refusal(
            &spec,
            "unable to find user dev: no matching entries in passwd file",
        );
        assert_eq!(field, "spec.user");
        let (field, reason) = engine_refusal(
            &spec,
            "exec: \"nope\": executable file not found in $PATH at /var/lib/docker/overlay2/abc/merged",
        );
        assert_eq!(field, "spec.command");
        assert!(!reason.contains("/var/lib/docker"), "{reason}");
        let (field, _) = engine_refusal(&spec, "something else");
        assert_eq!(field, "spec");
        assert!(engine_refusal(&spec, &"x".repeat(5000)).1.len() <= 512);
    }
}
