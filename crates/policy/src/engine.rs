//! The evaluation engine: judges a `ContainerSpec` against compiled
//! [`Rules`] and, on allow, produces the hardened spec that will actually be
//! applied. Pure and synchronous; allocates only for the hardened copy and for
//! violations.
//!
//! The spec is the contract's `ContainerSpec` because the hardened spec is
//! exactly what gets signed (by the digest of its encoding) and applied.

use std::borrow::Cow;

use vibebox_proto::environment::{
    ContainerSpec, Egress, EgressMode, EgressRule, Lifetime, Mount, MountType, PortMapping,
};

use crate::document::{
    DOCKER_SOCKETS, Rules, cpu_percent_ok, is_reserved_target, normalize_capability,
};
use crate::duration::{self, at_most};
use crate::egress::{self, Destination, Mode, Problem};
use crate::image::ImageRef;
use crate::path;
use crate::rules::{Kind, Rule, Severity};

/// Docker's minimum memory limit.
pub const MIN_MEMORY_MB: i64 = 6;
/// Docker's smallest CPU quota (0.01 CPU).
const MIN_CPUS: f64 = 0.01;

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    /// The offending field, for example `spec.mounts[0].source`.
    pub field: Cow<'static, str>,
    pub message: Cow<'static, str>,
    /// CIS Docker Benchmark control (section 5) or "".
    pub cis: &'static str,
    /// Pod Security Standards control or "".
    pub pss: &'static str,
}

impl Violation {
    fn new(
        rule: Rule,
        field: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            rule,
            field: field.into(),
            message: message.into(),
            cis: rule.cis(),
            pss: rule.pss(),
        }
    }

    fn controls(mut self, cis: &'static str, pss: &'static str) -> Self {
        self.cis = cis;
        self.pss = pss;
        self
    }

    pub fn severity(&self) -> Severity {
        self.rule.severity()
    }
}

/// The result of evaluating a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Empty means allowed.
    pub violations: Vec<Violation>,
    /// On allow, the spec to apply.
    pub hardened: Option<ContainerSpec>,
    /// The canonical image reference, when the image parsed.
    pub canonical_image: Option<String>,
}

impl Outcome {
    pub fn allowed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The highest severity among the violations.
    pub fn severity(&self) -> Option<Severity> {
        self.violations.iter().map(Violation::severity).max()
    }

    /// True when every violation is malformed input (no forbidden request).
    pub fn only_invalid(&self) -> bool {
        !self.violations.is_empty()
            && self
                .violations
                .iter()
                .all(|v| v.rule.kind() == Kind::Invalid)
    }

    /// Whether a violation of `rule` was found.
    pub fn has(&self, rule: Rule) -> bool {
        self.violations.iter().any(|v| v.rule == rule)
    }
}

/// Evaluates `spec` under `rules`.
pub fn evaluate(rules: &Rules, spec: &ContainerSpec) -> Outcome {
    let mut v = Vec::new();
    let image = check_image(rules, &spec.image, &mut v);
    if spec.privileged {
        v.push(Violation::new(
            Rule::Privileged,
            "spec.privileged",
            "privileged containers are not allowed",
        ));
    }
    let cap_add = check_capabilities(rules, &spec.cap_add, &mut v);
    check_security_opts(&spec.security_opt, &mut v);
    for i in 0..spec.devices.len() {
        v.push(Violation::new(
            Rule::Device,
            format!("spec.devices[{i}]"),
            "host devices cannot be mapped into a container",
        ));
    }
    check_namespaces(spec, &mut v);
    for key in spec.sysctls.keys() {
        if !rules.allow_sysctls.iter().any(|a| a == key) {
            v.push(Violation::new(
                Rule::Sysctl,
                format!("spec.sysctls[{key}]"),
                "sysctl is not allowed by policy",
            ));
        }
    }
    let user = check_user(rules, spec.user.as_deref(), &mut v);
    let mounts = check_mounts(rules, &spec.mounts, &mut v);
    check_bind_identity(rules, spec, &user, &mut v);
    check_ports(rules, &spec.ports, &mut v);
    let (cpu, memory, pids) = check_resources(rules, spec, &mut v);
    let egress = check_egress(rules, spec.egress.as_ref(), &mut v);
    let lifetime = check_lifetime(rules, spec.lifetime.as_ref(), &mut v);
    let copy_limit_mb = check_copy_limit(rules, spec.copy_limit_mb, &mut v);
    for key in spec.labels.keys() {
        let k = key.trim().to_ascii_lowercase();
        if k == "vibebox" || k.starts_with("vibebox.") {
            v.push(Violation::new(
                Rule::LabelReserved,
                format!("spec.labels[{key}]"),
                "labels in the vibebox. namespace are reserved for the platform",
            ));
        }
    }
    if rules.read_only_root && spec.read_only_rootfs == Some(false) {
        v.push(Violation::new(
            Rule::RootfsWritable,
            "spec.read_only_rootfs",
            "this policy requires a read-only root filesystem",
        ));
    }
    for key in spec.env.keys() {
        if key.is_empty() || key.contains(['=', '\0']) {
            v.push(Violation::new(
                Rule::EnvInvalid,
                "spec.env",
                "environment variable names must be non-empty without '=' or NUL",
            ));
        }
    }
    if !spec.working_dir.is_empty() && path::normalize(&spec.working_dir).is_err() {
        v.push(Violation::new(
            Rule::WorkingDirInvalid,
            "spec.working_dir",
            "working directory must be an absolute path",
        ));
    }

    let canonical_image = image.map(ImageRef::into_canonical);
    if !v.is_empty() {
        return Outcome {
            violations: v,
            hardened: None,
            canonical_image,
        };
    }
    let read_only = rules.read_only_root || spec.read_only_rootfs == Some(true);
    let mut hardened = spec.clone();
    hardened.image = canonical_image.clone().unwrap_or_default();
    hardened.user = Some(user);
    hardened.privileged = false;
    hardened.cap_add = cap_add;
    hardened.cap_drop = vec!["ALL".to_owned()];
    hardened.security_opt = vec!["no-new-privileges".to_owned()];
    hardened.devices.clear();
    hardened.read_only_rootfs = Some(read_only);
    hardened.cpu_limit = Some(cpu);
    hardened.memory_limit_mb = Some(memory);
    hardened.pids_limit = Some(pids);
    hardened.mounts = mounts;
    hardened.egress = Some(egress);
    hardened.lifetime = Some(lifetime);
    hardened.copy_limit_mb = Some(copy_limit_mb);
    if !hardened
        .mounts
        .iter()
        .any(|m| m.target == rules.workspace_path)
    {
        hardened.mounts.push(Mount {
            r#type: MountType::Volume as i32,
            source: String::new(),
            target: rules.workspace_path.clone(),
            read_only: false,
            size_mb: None,
        });
    }
    if read_only && !hardened.mounts.iter().any(|m| m.target == "/tmp") {
        hardened.mounts.push(Mount {
            r#type: MountType::Tmpfs as i32,
            source: String::new(),
            target: "/tmp".to_owned(),
            read_only: false,
            size_mb: Some(rules.default_tmpfs_mb),
        });
    }
    for p in &mut hardened.ports {
        if p.host_ip.is_empty() {
            p.host_ip = "127.0.0.1".to_owned();
        }
        if p.protocol.is_empty() {
            p.protocol = "tcp".to_owned();
        }
        p.protocol.make_ascii_lowercase();
    }
    Outcome {
        violations: v,
        hardened: Some(hardened),
        canonical_image,
    }
}

fn check_image(rules: &Rules, raw: &str, v: &mut Vec<Violation>) -> Option<ImageRef> {
    let image = match ImageRef::parse(raw) {
        Ok(i) => i,
        Err(e) => {
            v.push(Violation::new(
                Rule::ImageInvalid,
                "spec.image",
                format!("invalid image reference: {e}"),
            ));
            return None;
        }
    };
    if let Some(p) = rules.deny.iter().find(|p| p.matches(&image)) {
        v.push(Violation::new(
            Rule::ImageDenied,
            "spec.image",
            format!("image {image} is denied by pattern {:?}", p.as_str()),
        ));
    } else if !rules.allow.iter().any(|p| p.matches(&image))
        || (!rules.team_allow.is_empty() && !rules.team_allow.iter().any(|p| p.matches(&image)))
    {
        v.push(Violation::new(
            Rule::ImageNotAllowed,
            "spec.image",
            format!("image {image} is not on the allow list"),
        ));
    }
    Some(image)
}

fn check_capabilities(rules: &Rules, caps: &[String], v: &mut Vec<Violation>) -> Vec<String> {
    let mut out = Vec::new();
    for (i, cap) in caps.iter().enumerate() {
        let c = normalize_capability(cap);
        if !c.is_empty() && c != "ALL" && rules.allow_cap_add.contains(&c) {
            out.push(c);
        } else {
            v.push(Violation::new(
                Rule::CapabilityAdd,
                format!("spec.cap_add[{i}]"),
                format!("adding capability {:?} is not allowed", cap.trim()),
            ));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn check_security_opts(opts: &[String], v: &mut Vec<Violation>) {
    for (i, opt) in opts.iter().enumerate() {
        let o = opt.trim().to_ascii_lowercase();
        // Docker accepts both `key=value` and the legacy `key:value`.
        let (key, value) = match o.find(['=', ':']) {
            Some(at) => (o[..at].trim(), o[at + 1..].trim()),
            None => (o.as_str(), ""),
        };
        let field = || format!("spec.security_opt[{i}]");
        match (key, value) {
            ("no-new-privileges", "" | "true") => {}
            ("seccomp", "unconfined") => v.push(
                Violation::new(
                    Rule::SecurityOptUnconfined,
                    field(),
                    "disabling seccomp is not allowed",
                )
                .controls("5.21", "Seccomp"),
            ),
            ("apparmor", "unconfined") => v.push(
                Violation::new(
                    Rule::SecurityOptUnconfined,
                    field(),
                    "disabling AppArmor is not allowed",
                )
                .controls("5.1", "AppArmor"),
            ),
            ("label", "disable") => v.push(
                Violation::new(
                    Rule::SecurityOptUnconfined,
                    field(),
                    "disabling SELinux labels is not allowed",
                )
                .controls("5.2", "SELinux"),
            ),
            ("systempaths", "unconfined") => v.push(
                Violation::new(
                    Rule::SecurityOptUnconfined,
                    field(),
                    "unmasking kernel paths is not allowed",
                )
                .controls("", "Privileged Containers"),
            ),
            _ => v.push(Violation::new(
                Rule::SecurityOptNotAllowed,
                field(),
                "only no-new-privileges is accepted; the platform sets its own security options",
            )),
        }
    }
}

fn check_namespaces(spec: &ContainerSpec, v: &mut Vec<Violation>) {
    let checks: [(&str, &'static str, Rule, &[&str]); 6] = [
        (
            &spec.network_mode,
            "spec.network_mode",
            Rule::NetworkMode,
            &[""],
        ),
        (&spec.pid_mode, "spec.pid_mode", Rule::NamespacePid, &[""]),
        (
            &spec.ipc_mode,
            "spec.ipc_mode",
            Rule::NamespaceIpc,
            &["", "private", "none"],
        ),
        (&spec.uts_mode, "spec.uts_mode", Rule::NamespaceUts, &[""]),
        (
            &spec.userns_mode,
            "spec.userns_mode",
            Rule::NamespaceUserns,
            &[""],
        ),
        (
            &spec.cgroupns_mode,
            "spec.cgroupns_mode",
            Rule::NamespaceCgroupns,
            &["", "private"],
        ),
    ];
    for (value, field, rule, allowed) in checks {
        if !allowed.contains(&value) {
            let message = if rule == Rule::NetworkMode {
                "each environment runs on its own platform network; network_mode cannot be set"
            } else {
                "sharing a namespace with the host or another container is not allowed"
            };
            let mut violation = Violation::new(rule, field, message);
            if rule == Rule::NetworkMode && value.trim().eq_ignore_ascii_case("bridge") {
                violation = violation.controls("5.29", "");
            }
            v.push(violation);
        }
    }
}

/// Parses one side of `uid:gid` / `name:group`.
enum Id<'a> {
    Num(u32),
    Name(&'a str),
    Bad,
}

fn parse_id(s: &str) -> Id<'_> {
    if s.is_empty() {
        Id::Bad
    } else if s.bytes().all(|b| b.is_ascii_digit()) {
        // Kernel ids are signed 32-bit in places (-1 means "no change"):
        // anything above i32::MAX is no real user.
        s.parse::<u32>()
            .ok()
            .filter(|n| i32::try_from(*n).is_ok())
            .map_or(Id::Bad, Id::Num)
    } else if s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !s.starts_with('-')
    {
        Id::Name(s)
    } else {
        Id::Bad
    }
}

fn check_user(rules: &Rules, user: Option<&str>, v: &mut Vec<Violation>) -> String {
    let default = || format!("{}:{}", rules.default_uid, rules.default_gid);
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return default();
    };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = parse_id(u);
    let gid = g.map(parse_id);
    let bad = matches!(uid, Id::Bad) || matches!(gid, Some(Id::Bad));
    if bad {
        v.push(Violation::new(
            Rule::UserInvalid,
            "spec.user",
            "user must be uid, uid:gid, name or name:group",
        ));
        return default();
    }
    let is_root = |id: &Id<'_>| match id {
        Id::Num(n) => *n == 0,
        Id::Name(n) => n.eq_ignore_ascii_case("root"),
        Id::Bad => false,
    };
    if is_root(&uid) || gid.as_ref().is_some_and(is_root) {
        v.push(Violation::new(
            Rule::UserRoot,
            "spec.user",
            "containers must not run as root (uid 0 or group 0)",
        ));
        return default();
    }
    let out_of_range = |id: &Id<'_>| match id {
        Id::Num(n) => !(rules.min_id..=rules.max_id).contains(n),
        Id::Name(_) | Id::Bad => false,
    };
    if out_of_range(&uid) || gid.as_ref().is_some_and(out_of_range) {
        v.push(Violation::new(
            Rule::UserRange,
            "spec.user",
            format!(
                "uid and gid must lie within {}..={} (system users and groups, the Docker \
                 group's included, are out of reach)",
                rules.min_id, rules.max_id
            ),
        ));
        return default();
    }
    let named = matches!(uid, Id::Name(_)) || matches!(gid, Some(Id::Name(_)));
    if named && !rules.allow_user_names {
        v.push(Violation::new(
            Rule::UserName,
            "spec.user",
            "user names resolve inside the image (possibly to root); give a numeric uid:gid",
        ));
        return default();
    }
    let side = |id: &Id<'_>| match id {
        Id::Num(n) => n.to_string(),
        Id::Name(n) => (*n).to_owned(),
        Id::Bad => String::new(),
    };
    match gid {
        Some(g) => format!("{}:{}", side(&uid), side(&g)),
        // Without a group Docker falls back to the image's passwd entry or gid 0.
        None => format!("{}:{}", side(&uid), rules.default_gid),
    }
}

/// A spec with a bind mount runs as the platform's user and group: host
/// files under a bind prefix belong to host uids, and a chosen uid/gid would
/// reach another user's (or group's) files there.
fn check_bind_identity(rules: &Rules, spec: &ContainerSpec, user: &str, v: &mut Vec<Violation>) {
    let has_bind = spec
        .mounts
        .iter()
        .any(|m| MountType::try_from(m.r#type) == Ok(MountType::Bind));
    let platform = format!("{}:{}", rules.default_uid, rules.default_gid);
    let chosen = spec.user.as_deref().is_some_and(|u| !u.is_empty());
    if has_bind && chosen && user != platform {
        v.push(Violation::new(
            Rule::UserBindIdentity,
            "spec.user",
            format!(
                "a spec with a bind mount runs as the platform user {platform}; leave user unset"
            ),
        ));
    }
}

/// Whether a normalized host path is, contains, or lies in a Docker socket location.
fn is_docker_socket(p: &str) -> bool {
    let lower = p.to_ascii_lowercase();
    DOCKER_SOCKETS
        .iter()
        .any(|s| path::overlaps_ignore_case(&lower, s))
        || lower
            .rsplit('/')
            .next()
            .is_some_and(|name| name.ends_with(".sock"))
}

fn check_mounts(rules: &Rules, mounts: &[Mount], v: &mut Vec<Violation>) -> Vec<Mount> {
    if mounts.len() > rules.max_mounts {
        v.push(Violation::new(
            Rule::MountTooMany,
            "spec.mounts",
            format!("at most {} mounts are allowed", rules.max_mounts),
        ));
    }
    let mut out = Vec::with_capacity(mounts.len());
    for (i, m) in mounts.iter().enumerate() {
        let mut m = m.clone();
        // A bad target does not stop the source checks: a socket mount is
        // reported (and audited) as such whatever its target.
        match path::normalize(&m.target) {
            Ok(target) if is_reserved_target(&target) => {
                v.push(Violation::new(
                    Rule::MountTargetReserved,
                    format!("spec.mounts[{i}].target"),
                    format!(
                        "{target} is or lies below a kernel interface or a file the engine \
                         manages (/proc, /sys, /dev, /etc/hosts, /etc/hostname, \
                         /etc/resolv.conf, /.dockerenv)"
                    ),
                ));
                m.target = target;
            }
            Ok(target) if target != "/" => {
                if out.iter().any(|o: &Mount| o.target == target) {
                    v.push(Violation::new(
                        Rule::MountInvalid,
                        format!("spec.mounts[{i}].target"),
                        "duplicate mount target",
                    ));
                }
                m.target = target;
            }
            _ => v.push(Violation::new(
                Rule::MountInvalid,
                format!("spec.mounts[{i}].target"),
                "mount target must be an absolute path other than /",
            )),
        }
        match MountType::try_from(m.r#type) {
            Ok(MountType::Bind) => {
                let field = || format!("spec.mounts[{i}].source");
                let source = match path::normalize(&m.source) {
                    Ok(s) => s,
                    Err(e) => {
                        v.push(Violation::new(
                            Rule::MountInvalid,
                            field(),
                            format!("bind source: {e}"),
                        ));
                        continue;
                    }
                };
                if is_docker_socket(&source) {
                    v.push(Violation::new(
                        Rule::MountDockerSocket,
                        field(),
                        "mounting the Docker socket (or a directory holding it) is never allowed",
                    ));
                } else if rules
                    .sensitive
                    .iter()
                    .any(|s| path::overlaps_ignore_case(&source, s))
                {
                    v.push(Violation::new(
                        Rule::MountSensitivePath,
                        field(),
                        format!("host path {source} is or contains a sensitive system path"),
                    ));
                } else if !rules
                    .bind_prefixes
                    .iter()
                    .any(|p| path::is_within(&source, p))
                {
                    v.push(Violation::new(
                        Rule::MountBindNotAllowed,
                        field(),
                        "bind mounts are only allowed under the policy's host path prefixes",
                    ));
                }
                m.source = source;
                m.size_mb = None;
            }
            Ok(MountType::Volume) => {
                let s = &m.source;
                let valid = s.is_empty()
                    || (s.as_bytes()[0].is_ascii_alphanumeric()
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')));
                if !valid {
                    v.push(Violation::new(
                        Rule::MountInvalid,
                        format!("spec.mounts[{i}].source"),
                        "volume names are [A-Za-z0-9][A-Za-z0-9_.-]*",
                    ));
                } else if s.to_ascii_lowercase().starts_with("vibebox") {
                    v.push(Violation::new(
                        Rule::MountVolumeReserved,
                        format!("spec.mounts[{i}].source"),
                        "volume names starting with vibebox are reserved for the platform",
                    ));
                }
                m.size_mb = None;
            }
            Ok(MountType::Tmpfs) => {
                if !m.source.is_empty() {
                    v.push(Violation::new(
                        Rule::MountInvalid,
                        format!("spec.mounts[{i}].source"),
                        "tmpfs mounts take no source",
                    ));
                }
                match m.size_mb {
                    None => m.size_mb = Some(rules.default_tmpfs_mb),
                    Some(s) if s <= 0 || s > rules.max_tmpfs_mb => v.push(Violation::new(
                        Rule::MountTmpfsSize,
                        format!("spec.mounts[{i}].size_mb"),
                        format!(
                            "tmpfs size must be between 1 and {} MiB",
                            rules.max_tmpfs_mb
                        ),
                    )),
                    Some(_) => {}
                }
            }
            Ok(MountType::Unspecified) | Err(_) => {
                v.push(Violation::new(
                    Rule::MountInvalid,
                    format!("spec.mounts[{i}].type"),
                    "mount type must be bind, volume or tmpfs",
                ));
            }
        }
        out.push(m);
    }
    out
}

fn check_ports(rules: &Rules, ports: &[PortMapping], v: &mut Vec<Violation>) {
    for (i, p) in ports.iter().enumerate() {
        let field = || format!("spec.ports[{i}]");
        if !rules.allow_published_ports {
            v.push(Violation::new(
                Rule::PortPublish,
                field(),
                "publishing ports is not allowed by policy",
            ));
            continue;
        }
        let protocol_ok = matches!(p.protocol.to_ascii_lowercase().as_str(), "" | "tcp" | "udp");
        let ip_ok = p.host_ip.is_empty() || p.host_ip.parse::<std::net::IpAddr>().is_ok();
        if !(1..=65535).contains(&p.container_port) || p.host_port > 65535 || !protocol_ok || !ip_ok
        {
            v.push(Violation::new(
                Rule::PortInvalid,
                field(),
                "ports are 1-65535, protocol tcp or udp, host_ip an IP address",
            ));
        } else if (1..1024).contains(&p.host_port) {
            v.push(Violation::new(
                Rule::PortPrivileged,
                field(),
                "host ports below 1024 are not allowed",
            ));
        }
    }
}

fn check_resources(rules: &Rules, spec: &ContainerSpec, v: &mut Vec<Violation>) -> (f64, i64, i64) {
    let cpu = match spec.cpu_limit {
        None => rules.default_cpus,
        Some(c) if !c.is_finite() => {
            v.push(
                Violation::new(
                    Rule::ResourcesInvalid,
                    "spec.cpu_limit",
                    "cpu_limit must be a number",
                )
                .controls("5.11", ""),
            );
            rules.default_cpus
        }
        Some(c) if c <= 0.0 => {
            v.push(
                Violation::new(
                    Rule::ResourcesUnlimited,
                    "spec.cpu_limit",
                    "an unlimited CPU share is not allowed",
                )
                .controls("5.11", ""),
            );
            c
        }
        Some(c) if c < MIN_CPUS => {
            v.push(
                Violation::new(
                    Rule::ResourcesInvalid,
                    "spec.cpu_limit",
                    "cpu_limit must be at least 0.01",
                )
                .controls("5.11", ""),
            );
            c
        }
        Some(c) if c > rules.max_cpus => {
            v.push(
                Violation::new(
                    Rule::ResourcesCeiling,
                    "spec.cpu_limit",
                    format!("cpu_limit {c} exceeds the ceiling of {}", rules.max_cpus),
                )
                .controls("5.11", ""),
            );
            c
        }
        Some(c) => c,
    };
    let memory = match spec.memory_limit_mb {
        None => rules.default_memory_mb,
        Some(m) if m <= 0 => {
            v.push(
                Violation::new(
                    Rule::ResourcesUnlimited,
                    "spec.memory_limit_mb",
                    "unlimited memory is not allowed",
                )
                .controls("5.10", ""),
            );
            m
        }
        Some(m) if m < MIN_MEMORY_MB => {
            v.push(
                Violation::new(
                    Rule::ResourcesInvalid,
                    "spec.memory_limit_mb",
                    "memory_limit_mb must be at least 6",
                )
                .controls("5.10", ""),
            );
            m
        }
        Some(m) if m > rules.max_memory_mb => {
            v.push(
                Violation::new(
                    Rule::ResourcesCeiling,
                    "spec.memory_limit_mb",
                    format!(
                        "memory_limit_mb {m} exceeds the ceiling of {}",
                        rules.max_memory_mb
                    ),
                )
                .controls("5.10", ""),
            );
            m
        }
        Some(m) => m,
    };
    let pids = match spec.pids_limit {
        None => rules.default_pids,
        Some(p) if p <= 0 => {
            v.push(
                Violation::new(
                    Rule::ResourcesUnlimited,
                    "spec.pids_limit",
                    "an unlimited PIDs limit is not allowed",
                )
                .controls("5.28", ""),
            );
            p
        }
        Some(p) if p > rules.max_pids => {
            v.push(
                Violation::new(
                    Rule::ResourcesCeiling,
                    "spec.pids_limit",
                    format!("pids_limit {p} exceeds the ceiling of {}", rules.max_pids),
                )
                .controls("5.28", ""),
            );
            p
        }
        Some(p) => p,
    };
    (cpu, memory, pids)
}

fn proto_mode(mode: Mode) -> EgressMode {
    match mode {
        Mode::None => EgressMode::None,
        Mode::AllowList => EgressMode::AllowList,
        Mode::Internet => EgressMode::Internet,
    }
}

/// The contract's form of a canonical decision.
fn proto_egress(mode: Mode, allow: &[Destination]) -> Egress {
    Egress {
        mode: proto_mode(mode) as i32,
        allow: allow
            .iter()
            .map(|d| {
                let (host, cidr) = d.host_and_cidr();
                EgressRule {
                    host,
                    cidr,
                    ports: d.ports.iter().map(|p| u32::from(*p)).collect(),
                }
            })
            .collect(),
    }
}

/// Judges `spec.egress` and returns the decision to apply: the policy's
/// when the request asks nothing (unset, or mode unspecified without
/// rules), else the request's, canonical, if policy covers it: its mode no
/// wider than the policy's, each of its rules covered by the policy (see
/// [`egress::covers`]). The hardened decision always has an explicit mode.
fn check_egress(rules: &Rules, requested: Option<&Egress>, v: &mut Vec<Violation>) -> Egress {
    let policy = || proto_egress(rules.egress_mode, &rules.egress_allow);
    let Some(req) = requested else {
        return policy();
    };
    let bad = |v: &mut Vec<Violation>, field: String, message: String| {
        v.push(Violation::new(Rule::EgressInvalid, field, message));
    };
    let mode = match EgressMode::try_from(req.mode) {
        Ok(EgressMode::Unspecified) if req.allow.is_empty() => return policy(),
        Ok(EgressMode::Unspecified) => {
            bad(
                v,
                "spec.egress.mode".into(),
                "allow rules need a mode (allow-list or internet)".into(),
            );
            return policy();
        }
        Ok(EgressMode::None) => Mode::None,
        Ok(EgressMode::AllowList) => Mode::AllowList,
        Ok(EgressMode::Internet) => Mode::Internet,
        Err(_) => {
            bad(
                v,
                "spec.egress.mode".into(),
                format!("unknown egress mode {}", req.mode),
            );
            return policy();
        }
    };
    if req.allow.len() > egress::MAX_RULES {
        bad(
            v,
            "spec.egress.allow".into(),
            format!("at most {} rules", egress::MAX_RULES),
        );
        return policy();
    }
    let mut allow = Vec::with_capacity(req.allow.len());
    for (i, r) in req.allow.iter().enumerate() {
        match egress::destination(&r.host, &r.cidr, &r.ports) {
            Ok(d) => allow.push(d),
            Err(Problem::Invalid { part, message }) => {
                let field = if part.is_empty() {
                    format!("spec.egress.allow[{i}]")
                } else {
                    format!("spec.egress.allow[{i}].{part}")
                };
                bad(v, field, message);
            }
            Err(Problem::Forbidden { message }) => v.push(Violation::new(
                Rule::EgressForbiddenDestination,
                format!("spec.egress.allow[{i}].cidr"),
                message,
            )),
        }
    }
    if allow.len() != req.allow.len() {
        return policy();
    }
    if let Err((at, message)) = egress::check_mode(mode, &allow) {
        let field = match at {
            Some(i) => format!("spec.egress.allow[{i}]"),
            None => "spec.egress.allow".to_owned(),
        };
        bad(v, field, message);
        return policy();
    }
    if mode > rules.egress_mode {
        v.push(Violation::new(
            Rule::EgressNotAllowed,
            "spec.egress.mode",
            format!(
                "mode \"{mode}\" is wider than this policy allows (\"{}\")",
                rules.egress_mode
            ),
        ));
        return policy();
    }
    for (i, d) in allow.iter().enumerate() {
        if !egress::covers(rules.egress_mode, &rules.egress_allow, d) {
            v.push(Violation::new(
                Rule::EgressNotAllowed,
                format!("spec.egress.allow[{i}]"),
                format!(
                    "{d} is not covered by this policy's egress (mode \"{}\"{})",
                    rules.egress_mode,
                    if rules.egress_mode == Mode::Internet {
                        ": private ranges only through a policy rule inside them"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    proto_egress(mode, &egress::canonical(allow))
}

/// Judges `spec.lifetime` and returns the values to apply, all four set:
/// unset fields take the policy's values; a request may ask for a shorter
/// idle timeout, a higher idle CPU threshold, a lower `max_lifetime`, and a
/// lifetime up to the (possibly lowered) `max_lifetime`. 0 is never.
fn check_lifetime(rules: &Rules, requested: Option<&Lifetime>, v: &mut Vec<Violation>) -> Lifetime {
    let req = requested.copied().unwrap_or_default();
    let fmt = duration::format;
    let mut too_long = |field: &'static str, message: String| {
        v.push(Violation::new(Rule::LifetimeTooLong, field, message));
    };
    let idle = match req.idle_timeout_seconds {
        None => rules.idle_timeout,
        Some(x) if at_most(x, rules.idle_timeout) => x,
        Some(x) => {
            too_long(
                "spec.lifetime.idle_timeout_seconds",
                format!(
                    "idle timeout {} is longer than this policy's {}",
                    fmt(x),
                    fmt(rules.idle_timeout)
                ),
            );
            rules.idle_timeout
        }
    };
    let max = match req.max_lifetime_seconds {
        None => rules.max_lifetime,
        Some(x) if at_most(x, rules.max_lifetime) => x,
        Some(x) => {
            too_long(
                "spec.lifetime.max_lifetime_seconds",
                format!(
                    "max lifetime {} is longer than this policy's {}",
                    fmt(x),
                    fmt(rules.max_lifetime)
                ),
            );
            rules.max_lifetime
        }
    };
    let lifetime = match req.lifetime_seconds {
        None => duration::shorter(rules.lifetime, max),
        Some(x) if at_most(x, max) => x,
        Some(x) => {
            too_long(
                "spec.lifetime.lifetime_seconds",
                format!(
                    "lifetime {} is longer than the max lifetime {}",
                    fmt(x),
                    fmt(max)
                ),
            );
            max
        }
    };
    let cpu = match req.idle_cpu_percent {
        None => rules.idle_cpu_percent,
        Some(x) if !cpu_percent_ok(x) => {
            v.push(Violation::new(
                Rule::LifetimeInvalid,
                "spec.lifetime.idle_cpu_percent",
                "idle_cpu_percent must be a number in (0, 100]",
            ));
            rules.idle_cpu_percent
        }
        Some(x) if x < rules.idle_cpu_percent => {
            v.push(Violation::new(
                Rule::LifetimeTooLong,
                "spec.lifetime.idle_cpu_percent",
                format!(
                    "idle_cpu_percent {x} is below this policy's {} (a lower threshold keeps \
                     the environment awake longer)",
                    rules.idle_cpu_percent
                ),
            ));
            rules.idle_cpu_percent
        }
        Some(x) => x,
    };
    Lifetime {
        idle_timeout_seconds: Some(idle),
        idle_cpu_percent: Some(cpu),
        lifetime_seconds: Some(lifetime),
        max_lifetime_seconds: Some(max),
    }
}

/// Judges `spec.copy_limit_mb`: unset is the policy's limit; a request may
/// ask for less.
fn check_copy_limit(rules: &Rules, requested: Option<i64>, v: &mut Vec<Violation>) -> i64 {
    match requested {
        None => rules.copy_limit_mb,
        Some(x) if x <= 0 => {
            v.push(Violation::new(
                Rule::FilesInvalid,
                "spec.copy_limit_mb",
                "copy_limit_mb must be positive",
            ));
            rules.copy_limit_mb
        }
        Some(x) if x > rules.copy_limit_mb => {
            v.push(Violation::new(
                Rule::FilesCopyLimit,
                "spec.copy_limit_mb",
                format!(
                    "copy_limit_mb {x} exceeds this policy's {} MiB",
                    rules.copy_limit_mb
                ),
            ));
            rules.copy_limit_mb
        }
        Some(x) => x,
    }
}
