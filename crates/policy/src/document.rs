//! The policy document (TOML): every knob with its secure default built in,
//! team overlays that can only tighten (except `egress`, which a team
//! overlay replaces), validation, the canonical text and digest, and the
//! compiled [`Rules`] the engine evaluates against.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::duration::{self, Seconds};
use crate::egress::{self, Destination, Mode, Problem};
use crate::image::{ImageError, ImagePattern, ListKind};
use crate::path;

/// The largest copy limit a policy may set, in MiB (1 TiB).
pub const MAX_COPY_LIMIT_MB: i64 = 1 << 20;

/// Host paths whose bind mount is always denied (with everything below them
/// and every directory above them, so `/` and `/var` are covered), whatever
/// the document says.
pub const SENSITIVE_PATHS: &[&str] = &[
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/usr",
    "/bin",
    "/sbin",
    "/root",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/lib/kubelet",
    "/var/log",
    "/run",
    "/var/run",
    "/etc/docker",
];

/// Container paths a mount may never target (nor anything below them): the
/// kernel interfaces the engine mounts itself (`/proc`, `/sys`, `/dev`) and
/// the files it manages in every container. A mount there either shadows a
/// kernel interface or makes the engine refuse the container at start, so
/// the policy refuses it up front and the dry run predicts the create.
/// Compared case-sensitively, as Linux does, after lexical normalization.
pub const RESERVED_TARGETS: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/.dockerenv",
    "/run/.containerenv",
];

/// The Docker socket's well-known locations.
pub const DOCKER_SOCKETS: &[&str] = &[
    "/var/run/docker.sock",
    "/run/docker.sock",
    "/var/run/docker",
    "/run/docker",
    "/var/run/containerd",
    "/run/containerd",
];

/// The whole policy. Unknown keys are an error (a typo must not silently
/// weaken the policy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyDocument {
    /// Free-form version reported with every decision.
    pub version: String,
    pub images: ImageSection,
    pub mounts: MountSection,
    pub capabilities: CapabilitySection,
    pub user: UserSection,
    pub network: NetworkSection,
    pub sysctls: SysctlSection,
    pub resources: ResourceSection,
    pub filesystem: FilesystemSection,
    /// Outbound access: the default and the ceiling for environments.
    pub egress: EgressSection,
    /// Idle stop and lifetimes.
    pub lifetime: LifetimeSection,
    /// File copy (`CopyTo`, `CopyFrom`).
    pub files: FilesSection,
    /// Team overlays by team id; they can only tighten, except `egress`,
    /// which replaces the base section for that team.
    pub teams: BTreeMap<String, TeamOverlay>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageSection {
    /// An image must match one of these.
    pub allow: Vec<String>,
    /// An image matching one of these is denied.
    pub deny: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MountSection {
    /// Host path prefixes bind mounts may use; empty = no bind mounts.
    pub allow_bind_prefixes: Vec<String>,
    /// Extra host paths treated like the built-in sensitive ones.
    pub extra_sensitive_paths: Vec<String>,
    pub max_mounts: u32,
    pub max_tmpfs_mb: i64,
    /// Size given to a tmpfs mount without one.
    pub default_tmpfs_mb: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CapabilitySection {
    /// Capabilities `cap_add` may name (without `CAP_`); all others are dropped.
    pub allow_add: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserSection {
    /// Applied when the spec sets no user.
    pub default_uid: u32,
    pub default_gid: u32,
    /// Allow user names (resolved inside the image, possibly to uid 0).
    pub allow_names: bool,
    /// Smallest uid and gid a spec may choose (keeps system users and
    /// groups, the Docker group's included, out of reach).
    pub min_id: u32,
    /// Largest uid and gid a spec may choose (keeps `nobody`, 65534, and
    /// the ids of other user namespaces out of reach).
    pub max_id: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkSection {
    /// Allow published ports (non-privileged host ports only).
    pub allow_published_ports: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SysctlSection {
    /// Sysctl names a spec may set.
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceSection {
    pub default_cpus: f64,
    pub default_memory_mb: i64,
    pub default_pids: i64,
    pub max_cpus: f64,
    pub max_memory_mb: i64,
    pub max_pids: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesystemSection {
    /// Strict profile: read-only root with a writable workspace and tmpfs /tmp.
    pub read_only_root: bool,
    /// Where the environment's workspace volume is mounted.
    pub workspace_path: String,
}

/// Outbound access (`[egress]`, `[teams.<id>.egress]`): the mode an
/// environment gets when its spec asks for nothing, and the widest it may
/// ask for. See [`crate::egress`] for the rules' grammar and address classes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressSection {
    /// `"none"` (default), `"allow-list"` or `"internet"`.
    pub mode: Mode,
    /// For `allow-list`: the destinations. For `internet`: private ranges
    /// it may reach besides every public destination. Empty for `none`.
    pub allow: Vec<EgressRuleEntry>,
}

/// One allowed destination: exactly one of `host` (pattern) and `cidr`,
/// with `ports` (empty: any port).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRuleEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u32>,
}

/// Idle stop and lifetimes (`[lifetime]`). Durations are strings: `"30m"`,
/// `"8h"`, `"7d"`, `"never"` (or `"0"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifetimeSection {
    /// Stop an environment idle this long (its workspace is kept). A
    /// request may ask for less, never more.
    pub idle_timeout: Seconds,
    /// CPU use (percent of one core) under which an environment counts as
    /// idle. A request may raise it (up to 100), never lower it.
    pub idle_cpu_percent: f64,
    /// Delete an environment this long after its creation (workspace
    /// included), unless the request asks otherwise within `max_lifetime`.
    pub lifetime: Seconds,
    /// The longest lifetime a request or `ExtendEnvironment` may reach.
    pub max_lifetime: Seconds,
}

/// File copy (`[files]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesSection {
    /// Largest archive one `CopyTo` or `CopyFrom` may move, in MiB.
    pub copy_limit_mb: i64,
}

/// A team's `[teams.<id>.lifetime]`: each value at most the base's
/// (`never` is the longest; `idle_cpu_percent` at least the base's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifetimeOverlay {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Seconds>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_cpu_percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<Seconds>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_lifetime: Option<Seconds>,
}

/// A team's `[teams.<id>.files]`: at most the base's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesOverlay {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_limit_mb: Option<i64>,
}

/// A team's tightening of the base policy. Every field is optional; a value
/// looser than the base makes the document invalid. The one exception is
/// `egress`: it **replaces** the base `[egress]` section for the team and
/// may be wider (the document is the platform admin's: a fresh install
/// gives no outbound access and a team's overlay opens what it needs).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TeamOverlay {
    /// Images must also match one of these (in addition to the base allow list).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_images: Option<Vec<String>>,
    /// Denied in addition to the base deny list.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny_images: Vec<String>,
    /// A subset of the base prefixes (each within a base prefix).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_bind_prefixes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_cap_add: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_sysctls: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_published_ports: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only_root: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cpus: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pids: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_mounts: Option<u32>,
    /// Replaces the base `[egress]` for this team (may widen it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressSection>,
    /// Tightens the base `[lifetime]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<LifetimeOverlay>,
    /// Tightens the base `[files]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesOverlay>,
}

impl Default for PolicyDocument {
    fn default() -> Self {
        Self {
            version: "builtin-1".into(),
            images: ImageSection::default(),
            mounts: MountSection::default(),
            capabilities: CapabilitySection::default(),
            user: UserSection::default(),
            network: NetworkSection::default(),
            sysctls: SysctlSection::default(),
            resources: ResourceSection::default(),
            filesystem: FilesystemSection::default(),
            egress: EgressSection::default(),
            lifetime: LifetimeSection::default(),
            files: FilesSection::default(),
            teams: BTreeMap::new(),
        }
    }
}

impl Default for ImageSection {
    fn default() -> Self {
        Self {
            allow: vec!["*".into()],
            deny: vec!["docker:*".into(), "dind:*".into(), "*:latest".into()],
        }
    }
}

impl Default for MountSection {
    fn default() -> Self {
        Self {
            allow_bind_prefixes: Vec::new(),
            extra_sensitive_paths: Vec::new(),
            max_mounts: 16,
            max_tmpfs_mb: 2048,
            default_tmpfs_mb: 512,
        }
    }
}

impl Default for UserSection {
    fn default() -> Self {
        Self {
            default_uid: 1000,
            default_gid: 1000,
            allow_names: false,
            min_id: 1000,
            max_id: 60000,
        }
    }
}

impl Default for ResourceSection {
    fn default() -> Self {
        Self {
            default_cpus: 2.0,
            default_memory_mb: 4096,
            default_pids: 1024,
            max_cpus: 8.0,
            max_memory_mb: 16384,
            max_pids: 4096,
        }
    }
}

impl Default for FilesystemSection {
    fn default() -> Self {
        Self {
            read_only_root: false,
            workspace_path: "/workspace".into(),
        }
    }
}

impl Default for LifetimeSection {
    fn default() -> Self {
        Self {
            idle_timeout: Seconds(2 * 3600),
            idle_cpu_percent: 5.0,
            lifetime: Seconds::NEVER,
            max_lifetime: Seconds::NEVER,
        }
    }
}

impl Default for FilesSection {
    fn default() -> Self {
        Self {
            copy_limit_mb: 1024,
        }
    }
}

/// Why a policy document was refused.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("policy document does not parse: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("policy document does not serialize: {0}")]
    Serialize(#[from] toml::ser::Error),
    #[error("{field}: invalid image pattern {pattern:?}: {source}")]
    ImagePattern {
        field: String,
        pattern: String,
        source: ImageError,
    },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("teams.{team}.{field}: an overlay can only tighten the base policy ({message})")]
    Loosens {
        team: String,
        field: &'static str,
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> DocumentError {
    DocumentError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The compiled rules for one team (or the base policy).
#[derive(Debug, Clone)]
pub struct Rules {
    pub(crate) allow: Vec<ImagePattern>,
    /// When non-empty, images must also match one of these (team overlay).
    pub(crate) team_allow: Vec<ImagePattern>,
    pub(crate) deny: Vec<ImagePattern>,
    pub(crate) bind_prefixes: Vec<String>,
    pub(crate) sensitive: Vec<String>,
    pub(crate) max_mounts: usize,
    pub(crate) max_tmpfs_mb: i64,
    pub(crate) default_tmpfs_mb: i64,
    pub(crate) allow_cap_add: Vec<String>,
    pub(crate) default_uid: u32,
    pub(crate) default_gid: u32,
    pub(crate) allow_user_names: bool,
    pub(crate) min_id: u32,
    pub(crate) max_id: u32,
    pub(crate) allow_published_ports: bool,
    pub(crate) allow_sysctls: Vec<String>,
    pub(crate) default_cpus: f64,
    pub(crate) default_memory_mb: i64,
    pub(crate) default_pids: i64,
    pub(crate) max_cpus: f64,
    pub(crate) max_memory_mb: i64,
    pub(crate) max_pids: i64,
    pub(crate) read_only_root: bool,
    pub(crate) workspace_path: String,
    pub(crate) egress_mode: Mode,
    /// Canonical (sorted, unique).
    pub(crate) egress_allow: Vec<Destination>,
    /// Seconds; 0 = never.
    pub(crate) idle_timeout: u32,
    pub(crate) idle_cpu_percent: f64,
    /// Seconds; 0 = never; at most `max_lifetime`.
    pub(crate) lifetime: u32,
    /// Seconds; 0 = unlimited.
    pub(crate) max_lifetime: u32,
    pub(crate) copy_limit_mb: i64,
}

/// Which team overlays a `GetPolicy` caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visible {
    /// Every overlay (platform admins and auditors).
    All,
    /// Only these teams' overlays (the caller's own teams; none when empty).
    Teams(Vec<String>),
}

/// A validated, compiled policy: the document, its canonical text, version
/// and digest, and the rules per team.
#[derive(Debug)]
pub struct Policy {
    document: PolicyDocument,
    text: String,
    digest: String,
    base: Rules,
    teams: HashMap<String, Rules>,
}

impl Policy {
    /// The built-in defaults.
    pub fn builtin() -> Self {
        Self::from_document(PolicyDocument::default()).expect("built-in policy is valid")
    }

    /// Parses and validates a TOML document; keys it omits take the defaults.
    pub fn from_toml(text: &str) -> Result<Self, DocumentError> {
        let doc: PolicyDocument = toml::from_str(text)?;
        Self::from_document(doc)
    }

    pub fn from_document(document: PolicyDocument) -> Result<Self, DocumentError> {
        let base = compile_base(&document)?;
        let mut teams = HashMap::new();
        for (team, overlay) in &document.teams {
            if team.is_empty() {
                return Err(invalid("teams", "empty team id"));
            }
            teams.insert(team.clone(), compile_overlay(&base, team, overlay)?);
        }
        let text = toml::to_string(&document)?;
        let digest = hex::encode(Sha256::digest(text.as_bytes()));
        Ok(Self {
            document,
            text,
            digest,
            base,
            teams,
        })
    }

    pub fn version(&self) -> &str {
        &self.document.version
    }

    /// Hex SHA-256 of [`Policy::text`].
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The canonical TOML of the active document, defaults included.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn document(&self) -> &PolicyDocument {
        &self.document
    }

    /// The canonical TOML a caller may see: the base policy and only the
    /// overlays of `visible` teams (another team's overlay names its team id,
    /// registries and bind prefixes). The digest stays the whole document's.
    pub fn text_for(&self, visible: &Visible) -> Result<String, DocumentError> {
        match visible {
            Visible::All => Ok(self.text.clone()),
            Visible::Teams(teams) => {
                let mut shown = self.document.clone();
                shown
                    .teams
                    .retain(|team, _| teams.iter().any(|t| t == team));
                Ok(toml::to_string(&shown)?)
            }
        }
    }

    /// The rules for `team_id` (the base rules if it has no overlay).
    pub fn rules_for(&self, team_id: &str) -> &Rules {
        self.teams.get(team_id).unwrap_or(&self.base)
    }
}

fn patterns(
    field: &str,
    list: &[String],
    kind: ListKind,
) -> Result<Vec<ImagePattern>, DocumentError> {
    list.iter()
        .map(|p| {
            ImagePattern::new(p, kind).map_err(|source| DocumentError::ImagePattern {
                field: field.to_owned(),
                pattern: p.clone(),
                source,
            })
        })
        .collect()
}

fn normalized_paths(field: &str, list: &[String]) -> Result<Vec<String>, DocumentError> {
    list.iter()
        .map(|p| path::normalize(p).map_err(|e| invalid(field, format!("{p:?}: {e}"))))
        .collect()
}

/// Whether a normalized container path is, or lies below, a
/// [`RESERVED_TARGETS`] entry (case-sensitive, as Linux paths are).
pub(crate) fn is_reserved_target(target: &str) -> bool {
    RESERVED_TARGETS.iter().any(|r| path::is_within(target, r))
}

/// `CAP_SYS_ADMIN`, `sys_admin` and ` Sys_Admin ` all become `SYS_ADMIN`.
pub(crate) fn normalize_capability(cap: &str) -> String {
    let c = cap.trim().to_ascii_uppercase();
    match c.strip_prefix("CAP_") {
        Some(rest) => rest.to_owned(),
        None => c,
    }
}

fn capabilities(field: &str, list: &[String]) -> Result<Vec<String>, DocumentError> {
    let mut out: Vec<String> = list.iter().map(|c| normalize_capability(c)).collect();
    if let Some(bad) = out.iter().find(|c| {
        // After the optional `CAP_` is stripped, a second one is no capability:
        // Docker would read `CAP_X` as `X`, not what this list judged.
        c.is_empty()
            || *c == "ALL"
            || c.starts_with("CAP_")
            || !c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
    }) {
        return Err(invalid(
            field,
            format!("{bad:?} is not a capability that can be allowed"),
        ));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn compile_base(doc: &PolicyDocument) -> Result<Rules, DocumentError> {
    let r = &doc.resources;
    if !(r.max_cpus.is_finite() && r.max_cpus > 0.0) {
        return Err(invalid("resources.max_cpus", "must be a positive number"));
    }
    if !(r.default_cpus.is_finite() && r.default_cpus > 0.0 && r.default_cpus <= r.max_cpus) {
        return Err(invalid(
            "resources.default_cpus",
            "must be positive and at most max_cpus",
        ));
    }
    if r.max_memory_mb < crate::engine::MIN_MEMORY_MB {
        return Err(invalid("resources.max_memory_mb", "must be at least 6"));
    }
    if r.default_memory_mb < crate::engine::MIN_MEMORY_MB || r.default_memory_mb > r.max_memory_mb {
        return Err(invalid(
            "resources.default_memory_mb",
            "must be between 6 and max_memory_mb",
        ));
    }
    if r.max_pids <= 0 {
        return Err(invalid("resources.max_pids", "must be positive"));
    }
    if r.default_pids <= 0 || r.default_pids > r.max_pids {
        return Err(invalid(
            "resources.default_pids",
            "must be positive and at most max_pids",
        ));
    }
    let m = &doc.mounts;
    if m.max_tmpfs_mb <= 0 || m.default_tmpfs_mb <= 0 || m.default_tmpfs_mb > m.max_tmpfs_mb {
        return Err(invalid(
            "mounts.default_tmpfs_mb",
            "tmpfs sizes must be positive, default at most max",
        ));
    }
    let u = &doc.user;
    if u.default_uid == 0 || u.default_gid == 0 {
        return Err(invalid("user", "the platform user must not be root"));
    }
    if u.min_id == 0 || u.min_id > u.max_id || i32::try_from(u.max_id).is_err() {
        return Err(invalid(
            "user.min_id",
            "ids must satisfy 0 < min_id <= max_id <= 2147483647",
        ));
    }
    if ![u.default_uid, u.default_gid]
        .iter()
        .all(|id| (u.min_id..=u.max_id).contains(id))
    {
        return Err(invalid(
            "user.default_uid",
            "the platform user and group must lie within min_id..=max_id",
        ));
    }
    let workspace_path = path::normalize(&doc.filesystem.workspace_path)
        .map_err(|e| invalid("filesystem.workspace_path", e.to_string()))?;
    if workspace_path == "/" {
        return Err(invalid("filesystem.workspace_path", "must not be /"));
    }
    if is_reserved_target(&workspace_path) {
        return Err(invalid(
            "filesystem.workspace_path",
            "must not be or lie below a path the engine manages (/proc, /sys, /dev, /etc/hosts, ...)",
        ));
    }
    if doc.images.allow.is_empty() {
        return Err(invalid(
            "images.allow",
            "empty: no image could ever be allowed",
        ));
    }
    let bind_prefixes = normalized_paths("mounts.allow_bind_prefixes", &m.allow_bind_prefixes)?;
    let mut sensitive: Vec<String> = SENSITIVE_PATHS.iter().map(|s| (*s).to_owned()).collect();
    sensitive.extend(normalized_paths(
        "mounts.extra_sensitive_paths",
        &m.extra_sensitive_paths,
    )?);
    let mut allow_sysctls = doc.sysctls.allow.clone();
    allow_sysctls.sort();
    allow_sysctls.dedup();
    let (egress_mode, egress_allow) = compile_egress("egress", &doc.egress)?;
    let l = &doc.lifetime;
    if !cpu_percent_ok(l.idle_cpu_percent) {
        return Err(invalid(
            "lifetime.idle_cpu_percent",
            "must be a number in (0, 100]",
        ));
    }
    if !duration::at_most(l.lifetime.0, l.max_lifetime.0) {
        return Err(invalid(
            "lifetime.lifetime",
            format!(
                "{} exceeds max_lifetime {} (never is longer than any duration)",
                l.lifetime, l.max_lifetime
            ),
        ));
    }
    let copy_limit_mb = doc.files.copy_limit_mb;
    if !(1..=MAX_COPY_LIMIT_MB).contains(&copy_limit_mb) {
        return Err(invalid(
            "files.copy_limit_mb",
            format!("must be in 1..={MAX_COPY_LIMIT_MB}"),
        ));
    }
    Ok(Rules {
        allow: patterns("images.allow", &doc.images.allow, ListKind::Allow)?,
        team_allow: Vec::new(),
        deny: patterns("images.deny", &doc.images.deny, ListKind::Deny)?,
        bind_prefixes,
        sensitive,
        max_mounts: m.max_mounts as usize,
        max_tmpfs_mb: m.max_tmpfs_mb,
        default_tmpfs_mb: m.default_tmpfs_mb,
        allow_cap_add: capabilities("capabilities.allow_add", &doc.capabilities.allow_add)?,
        default_uid: doc.user.default_uid,
        default_gid: doc.user.default_gid,
        allow_user_names: doc.user.allow_names,
        min_id: u.min_id,
        max_id: u.max_id,
        allow_published_ports: doc.network.allow_published_ports,
        allow_sysctls,
        default_cpus: r.default_cpus,
        default_memory_mb: r.default_memory_mb,
        default_pids: r.default_pids,
        max_cpus: r.max_cpus,
        max_memory_mb: r.max_memory_mb,
        max_pids: r.max_pids,
        read_only_root: doc.filesystem.read_only_root,
        workspace_path,
        egress_mode,
        egress_allow,
        idle_timeout: l.idle_timeout.0,
        idle_cpu_percent: l.idle_cpu_percent,
        lifetime: l.lifetime.0,
        max_lifetime: l.max_lifetime.0,
        copy_limit_mb,
    })
}

/// An idle CPU threshold a policy may set: in (0, 100].
pub(crate) fn cpu_percent_ok(p: f64) -> bool {
    p.is_finite() && p > 0.0 && p <= 100.0
}

/// Validates an `[egress]` section (`field` is its path in the document):
/// every rule as [`egress::destination`] wants it (forbidden destinations
/// included: the document refuses to load), what its mode allows its list
/// to hold, and returns the canonical (sorted, unique) list.
fn compile_egress(
    field: &str,
    section: &EgressSection,
) -> Result<(Mode, Vec<Destination>), DocumentError> {
    if section.allow.len() > egress::MAX_RULES {
        return Err(invalid(
            format!("{field}.allow"),
            format!("at most {} rules", egress::MAX_RULES),
        ));
    }
    let mut allow = Vec::with_capacity(section.allow.len());
    for (i, entry) in section.allow.iter().enumerate() {
        let rule = egress::destination(
            entry.host.as_deref().unwrap_or_default(),
            entry.cidr.as_deref().unwrap_or_default(),
            &entry.ports,
        )
        .map_err(|problem| match problem {
            Problem::Invalid { part, message } => {
                let at = if part.is_empty() {
                    format!("{field}.allow[{i}]")
                } else {
                    format!("{field}.allow[{i}].{part}")
                };
                invalid(at, message)
            }
            Problem::Forbidden { message } => invalid(format!("{field}.allow[{i}].cidr"), message),
        })?;
        allow.push(rule);
    }
    egress::check_mode(section.mode, &allow).map_err(|(at, message)| match at {
        Some(i) => invalid(format!("{field}.allow[{i}]"), message),
        None => invalid(format!("{field}.allow"), message),
    })?;
    Ok((section.mode, egress::canonical(allow)))
}

fn compile_overlay(base: &Rules, team: &str, o: &TeamOverlay) -> Result<Rules, DocumentError> {
    let loosens = |field: &'static str, message: String| DocumentError::Loosens {
        team: team.to_owned(),
        field,
        message,
    };
    let mut rules = base.clone();
    if let Some(allow) = &o.allow_images {
        if allow.is_empty() {
            return Err(loosens(
                "allow_images",
                "empty list; omit it to keep the base list".into(),
            ));
        }
        rules.team_allow = patterns(
            &format!("teams.{team}.allow_images"),
            allow,
            ListKind::Allow,
        )?;
    }
    rules.deny.extend(patterns(
        &format!("teams.{team}.deny_images"),
        &o.deny_images,
        ListKind::Deny,
    )?);
    if let Some(prefixes) = &o.allow_bind_prefixes {
        let prefixes = normalized_paths(&format!("teams.{team}.allow_bind_prefixes"), prefixes)?;
        if let Some(p) = prefixes
            .iter()
            .find(|p| !base.bind_prefixes.iter().any(|b| path::is_within(p, b)))
        {
            return Err(loosens(
                "allow_bind_prefixes",
                format!("{p:?} is not within a base prefix"),
            ));
        }
        rules.bind_prefixes = prefixes;
    }
    if let Some(caps) = &o.allow_cap_add {
        let caps = capabilities(&format!("teams.{team}.allow_cap_add"), caps)?;
        if let Some(c) = caps.iter().find(|c| !base.allow_cap_add.contains(c)) {
            return Err(loosens(
                "allow_cap_add",
                format!("{c} is not allowed by the base policy"),
            ));
        }
        rules.allow_cap_add = caps;
    }
    if let Some(sysctls) = &o.allow_sysctls {
        if let Some(s) = sysctls.iter().find(|s| !base.allow_sysctls.contains(s)) {
            return Err(loosens(
                "allow_sysctls",
                format!("{s} is not allowed by the base policy"),
            ));
        }
        rules.allow_sysctls = sysctls.clone();
    }
    if let Some(ports) = o.allow_published_ports {
        if ports && !base.allow_published_ports {
            return Err(loosens(
                "allow_published_ports",
                "the base policy forbids them".into(),
            ));
        }
        rules.allow_published_ports = ports;
    }
    if let Some(ro) = o.read_only_root {
        if !ro && base.read_only_root {
            return Err(loosens(
                "read_only_root",
                "the base policy requires it".into(),
            ));
        }
        rules.read_only_root = ro;
    }
    if let Some(v) = o.max_cpus {
        if !(v.is_finite() && v > 0.0 && v <= base.max_cpus) {
            return Err(loosens(
                "max_cpus",
                format!("must be in (0, {}]", base.max_cpus),
            ));
        }
        rules.max_cpus = v;
        rules.default_cpus = rules.default_cpus.min(v);
    }
    if let Some(v) = o.max_memory_mb {
        if !(crate::engine::MIN_MEMORY_MB..=base.max_memory_mb).contains(&v) {
            return Err(loosens(
                "max_memory_mb",
                format!("must be in [6, {}]", base.max_memory_mb),
            ));
        }
        rules.max_memory_mb = v;
        rules.default_memory_mb = rules.default_memory_mb.min(v);
    }
    if let Some(v) = o.max_pids {
        if !(1..=base.max_pids).contains(&v) {
            return Err(loosens(
                "max_pids",
                format!("must be in [1, {}]", base.max_pids),
            ));
        }
        rules.max_pids = v;
        rules.default_pids = rules.default_pids.min(v);
    }
    if let Some(v) = o.max_mounts {
        if v as usize > base.max_mounts {
            return Err(loosens(
                "max_mounts",
                format!("must be at most {}", base.max_mounts),
            ));
        }
        rules.max_mounts = v as usize;
    }
    if let Some(section) = &o.egress {
        // The one overlay that replaces rather than tightens.
        let (mode, allow) = compile_egress(&format!("teams.{team}.egress"), section)?;
        rules.egress_mode = mode;
        rules.egress_allow = allow;
    }
    if let Some(l) = &o.lifetime {
        let longer = |field: &'static str, value: Seconds, base: u32| {
            loosens(
                field,
                format!(
                    "{value} is longer than the base policy's {}",
                    duration::format(base)
                ),
            )
        };
        if let Some(v) = l.idle_timeout {
            if !duration::at_most(v.0, base.idle_timeout) {
                return Err(longer("lifetime.idle_timeout", v, base.idle_timeout));
            }
            rules.idle_timeout = v.0;
        }
        if let Some(v) = l.idle_cpu_percent {
            if !cpu_percent_ok(v) {
                return Err(invalid(
                    format!("teams.{team}.lifetime.idle_cpu_percent"),
                    "must be a number in (0, 100]",
                ));
            }
            if v < base.idle_cpu_percent {
                return Err(loosens(
                    "lifetime.idle_cpu_percent",
                    format!(
                        "{v} is below the base policy's {} (a lower threshold keeps \
                         environments awake longer)",
                        base.idle_cpu_percent
                    ),
                ));
            }
            rules.idle_cpu_percent = v;
        }
        if let Some(v) = l.max_lifetime {
            if !duration::at_most(v.0, base.max_lifetime) {
                return Err(longer("lifetime.max_lifetime", v, base.max_lifetime));
            }
            rules.max_lifetime = v.0;
        }
        match l.lifetime {
            Some(v) => {
                if !duration::at_most(v.0, base.lifetime) {
                    return Err(longer("lifetime.lifetime", v, base.lifetime));
                }
                if !duration::at_most(v.0, rules.max_lifetime) {
                    return Err(invalid(
                        format!("teams.{team}.lifetime.lifetime"),
                        format!(
                            "{v} exceeds the team's max_lifetime {}",
                            duration::format(rules.max_lifetime)
                        ),
                    ));
                }
                rules.lifetime = v.0;
            }
            // The base default, within the team's ceiling.
            None => rules.lifetime = duration::shorter(rules.lifetime, rules.max_lifetime),
        }
    }
    if let Some(v) = o.files.as_ref().and_then(|f| f.copy_limit_mb) {
        if !(1..=base.copy_limit_mb).contains(&v) {
            return Err(loosens(
                "files.copy_limit_mb",
                format!("must be in 1..={}", base.copy_limit_mb),
            ));
        }
        rules.copy_limit_mb = v;
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_round_trips_and_has_stable_digest() {
        let a = Policy::builtin();
        let b = Policy::from_toml(a.text()).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.version(), "builtin-1");
        // An empty file is the built-in policy.
        assert_eq!(Policy::from_toml("").unwrap().digest(), a.digest());
        let c = Policy::from_toml("version = \"2\"").unwrap();
        assert_ne!(c.digest(), a.digest());
        assert_eq!(c.version(), "2");
    }

    #[test]
    fn rejects_invalid_documents() {
        for (doc, needle) in [
            ("versoin = \"x\"", "unknown field"),
            ("[images]\nallow = []", "images.allow"),
            ("[images]\ndeny = [\"bad pattern\"]", "images.deny"),
            ("[resources]\nmax_cpus = -1.0", "max_cpus"),
            (
                "[resources]\ndefault_memory_mb = 999999",
                "default_memory_mb",
            ),
            ("[user]\ndefault_uid = 0", "root"),
            (
                "[mounts]\nallow_bind_prefixes = [\"relative\"]",
                "allow_bind_prefixes",
            ),
            ("[capabilities]\nallow_add = [\"ALL\"]", "allow_add"),
            // Found by the `capability` fuzzer: normalized to `CAP_SYS_ADMIN`,
            // which the policy judged as a name of its own but Docker reads
            // as SYS_ADMIN.
            (
                "[capabilities]\nallow_add = [\"cap_CAP_SYS_ADMIN\"]",
                "allow_add",
            ),
            ("[filesystem]\nworkspace_path = \"/\"", "workspace_path"),
        ] {
            let err = Policy::from_toml(doc).unwrap_err().to_string();
            assert!(err.contains(needle), "{doc}: {err}");
        }
    }

    #[test]
    fn overlays_can_only_tighten() {
        let ok = r#"
            [mounts]
            allow_bind_prefixes = ["/srv/projects"]
            [capabilities]
            allow_add = ["NET_BIND_SERVICE", "CHOWN"]
            [teams.acme]
            deny_images = ["node:*"]
            allow_bind_prefixes = ["/srv/projects/acme"]
            allow_cap_add = ["cap_chown"]
            max_cpus = 1.0
            max_memory_mb = 1024
            read_only_root = true
        "#;
        let p = Policy::from_toml(ok).unwrap();
        let acme = p.rules_for("acme");
        assert_eq!(acme.max_cpus, 1.0);
        assert_eq!(acme.default_cpus, 1.0);
        assert_eq!(acme.default_memory_mb, 1024);
        assert!(acme.read_only_root);
        assert_eq!(acme.allow_cap_add, vec!["CHOWN".to_string()]);
        assert_eq!(p.rules_for("other").max_cpus, 8.0);

        for (overlay, field) in [
            ("max_cpus = 64.0", "max_cpus"),
            ("max_memory_mb = 1000000", "max_memory_mb"),
            ("max_pids = 0", "max_pids"),
            ("max_mounts = 1000", "max_mounts"),
            ("allow_published_ports = true", "allow_published_ports"),
            ("allow_cap_add = [\"SYS_ADMIN\"]", "allow_cap_add"),
            ("allow_bind_prefixes = [\"/srv\"]", "allow_bind_prefixes"),
            ("allow_sysctls = [\"net.ipv4.ip_forward\"]", "allow_sysctls"),
            ("allow_images = []", "allow_images"),
        ] {
            let doc = format!(
                "[mounts]\nallow_bind_prefixes = [\"/srv/projects\"]\n[teams.acme]\n{overlay}\n"
            );
            let err = Policy::from_toml(&doc).unwrap_err().to_string();
            assert!(
                err.contains(field) && err.contains("tighten"),
                "{overlay}: {err}"
            );
        }
        let strict = "[filesystem]\nread_only_root = true\n[teams.acme]\nread_only_root = false\n";
        assert!(Policy::from_toml(strict).is_err());
    }
}

#[cfg(test)]
mod visibility_tests {
    use super::*;

    #[test]
    fn a_caller_sees_only_the_overlays_it_may() {
        let text = "[teams.alpha]\ndeny_images = [\"alpha-secret/*\"]\n\
                    [teams.beta]\ndeny_images = [\"beta-secret/*\"]\n";
        let p = Policy::from_toml(text).unwrap();
        let all = p.text_for(&Visible::All).unwrap();
        assert_eq!(all, p.text());
        assert!(all.contains("alpha-secret") && all.contains("beta-secret"));
        let alpha = p.text_for(&Visible::Teams(vec!["alpha".into()])).unwrap();
        assert!(alpha.contains("alpha-secret") && !alpha.contains("beta"));
        assert!(alpha.contains("[images]"), "the base policy stays visible");
        let none = p.text_for(&Visible::Teams(Vec::new())).unwrap();
        assert!(!none.contains("alpha") && !none.contains("beta"));
        let unknown = p.text_for(&Visible::Teams(vec!["gamma".into()])).unwrap();
        assert_eq!(unknown, none);
    }
}

#[cfg(test)]
mod egress_lifetime_tests {
    use super::*;
    use crate::egress::Target;

    #[track_caller]
    fn refused(doc: &str, needles: &[&str]) {
        let err = Policy::from_toml(doc)
            .err()
            .unwrap_or_else(|| panic!("accepted: {doc}"))
            .to_string();
        for n in needles {
            assert!(err.contains(n), "{doc}\n-> {err}\n(expected {n:?})");
        }
    }

    #[test]
    fn the_builtin_gives_no_egress_a_2h_idle_stop_no_lifetime_and_1_gib_copies() {
        let p = Policy::builtin();
        let r = p.rules_for("");
        assert_eq!(r.egress_mode, Mode::None);
        assert!(r.egress_allow.is_empty());
        assert_eq!(r.idle_timeout, 7200);
        assert_eq!(r.idle_cpu_percent, 5.0);
        assert_eq!((r.lifetime, r.max_lifetime), (0, 0));
        assert_eq!(r.copy_limit_mb, 1024);
        // GetPolicy's text shows every new section with its defaults.
        for line in [
            "[egress]\nmode = \"none\"\nallow = []",
            "[lifetime]\nidle_timeout = \"2h\"\nidle_cpu_percent = 5.0\nlifetime = \"never\"\nmax_lifetime = \"never\"",
            "[files]\ncopy_limit_mb = 1024",
        ] {
            assert!(p.text().contains(line), "{line}\nnot in\n{}", p.text());
        }
    }

    #[test]
    fn egress_sections_compile_to_canonical_rules() {
        let p = Policy::from_toml(
            r#"
            [egress]
            mode = "allow-list"
            allow = [
                { host = "Packages.Example.com.", ports = [443, 80, 443] },
                { cidr = "203.0.113.0/24", ports = [443] },
                { host = "*.github.com" },
                { cidr = "2001:DB8::/32" },
                { host = "*.github.com" },
                { cidr = "10.20.0.0/16", ports = [5432] },
            ]
            "#,
        )
        .unwrap();
        let r = p.rules_for("anyone");
        assert_eq!(r.egress_mode, Mode::AllowList);
        let shown: Vec<String> = r.egress_allow.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "*.github.com",
                "packages.example.com port 80,443",
                "10.20.0.0/16 port 5432",
                "203.0.113.0/24 port 443",
                "2001:db8::/32",
            ]
        );
        // The canonical text keeps what the admin wrote (a fixed point).
        let again = Policy::from_toml(p.text()).unwrap();
        assert_eq!(again.text(), p.text());
        assert_eq!(again.digest(), p.digest());
        assert!(p.text().contains("Packages.Example.com."));
        // Tables work as well as inline tables.
        let tables =
            "[egress]\nmode = \"internet\"\n[[egress.allow]]\ncidr = \"192.168.10.0/24\"\n";
        let r = Policy::from_toml(tables).unwrap();
        assert_eq!(r.rules_for("").egress_mode, Mode::Internet);
        assert_eq!(
            r.rules_for("").egress_allow[0].target,
            Target::Cidr(crate::egress::Cidr::parse("192.168.10.0/24").unwrap())
        );
    }

    #[test]
    fn invalid_egress_sections_refuse_to_load() {
        let many_rules = format!(
            "[egress]\nmode = \"allow-list\"\nallow = [{}]",
            (0..65)
                .map(|i| format!("{{ host = \"h{i}.example.com\" }}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let many_ports = format!(
            "[egress]\nmode = \"allow-list\"\nallow = [{{ host = \"a.com\", ports = [{}] }}]",
            (1..=33)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (doc, needles) in [
            ("[egress]\nmode = \"open\"", &["unknown variant"][..]),
            ("[egress]\nmode = \"ALLOW-LIST\"", &["unknown variant"]),
            ("[egress]\nmodes = \"none\"", &["unknown field"]),
            (
                "[egress]\nmode = \"allow-list\"\nallow = [{ hosts = \"a.com\" }]",
                &["unknown field"],
            ),
            (
                "[egress]\nmode = \"allow-list\"",
                &["egress.allow", "at least one rule"],
            ),
            (
                "[egress]\nallow = [{ host = \"a.com\" }]",
                &["egress.allow", "none"],
            ),
            (
                "[egress]\nmode = \"internet\"\nallow = [{ host = \"a.com\" }]",
                &["egress.allow[0]", "private ranges"],
            ),
            (
                "[egress]\nmode = \"internet\"\nallow = [{ cidr = \"0.0.0.0/0\" }]",
                &["egress.allow[0]", "private ranges"],
            ),
            (
                "[egress]\nmode = \"allow-list\"\nallow = [{ host = \"a.com\", cidr = \"203.0.113.0/24\" }]",
                &["egress.allow[0]", "exactly one"],
            ),
            (
                "[egress]\nmode = \"allow-list\"\nallow = [{ ports = [443] }]",
                &["egress.allow[0]", "exactly one"],
            ),
            (
                "[egress]\nmode = \"allow-list\"\nallow = [{ host = \"a..com\" }]",
                &["egress.allow[0].host", "empty label"],
            ),
            (
                "[egress]\nmode = \"allow-list\"\nallow = [{ host = \"*\" }]",
                &["egress.allow[0].host", "internet"],
            ),
            (
                "[egress]\nmode = \"allow-list\"\nallow = [{ cidr = \"203.0.113.9/24\" }]",
                &["egress.allow[0].cidr", "203.0.113.0/24"],
            ),
            (
                "[egress]\nmode = \"allow-list\"\nallow = [{ host = \"a.com\", ports = [0] }]",
                &["egress.allow[0].ports"],
            ),
            (
                "[egress]\nmode = \"allow-list\"\nallow = [{ host = \"a.com\", ports = [65536] }]",
                &["egress.allow[0].ports"],
            ),
            (
                "[egress]\nmode = \"allow-list\"\nallow = [{ host = \"a.com\", ports = [-1] }]",
                &["invalid value"],
            ),
            (many_rules.as_str(), &["egress.allow", "at most 64"]),
            (
                many_ports.as_str(),
                &["egress.allow[0].ports", "at most 32"],
            ),
            (
                "[egress]\nmode = \"allow-list\"\nallow = [{ cidr = \"::ffff:10.0.0.0/104\" }]",
                &["egress.allow[0].cidr", "IPv4"],
            ),
        ] {
            refused(doc, needles);
        }
    }

    #[test]
    fn forbidden_destinations_refuse_to_load_even_for_the_admin() {
        for cidr in [
            "127.0.0.0/8",
            "127.0.0.1",
            "169.254.169.254/32",
            "169.254.0.0/16",
            "0.0.0.0/8",
            "224.0.0.0/4",
            "255.255.255.255",
            "::1",
            "fe80::/10",
            "ff02::/16",
            "fd00:ec2::254",
        ] {
            for mode in ["allow-list", "internet"] {
                refused(
                    &format!("[egress]\nmode = \"{mode}\"\nallow = [{{ cidr = \"{cidr}\" }}]"),
                    &["egress.allow[0].cidr", "never reachable"],
                );
                refused(
                    &format!(
                        "[teams.acme.egress]\nmode = \"{mode}\"\nallow = [{{ cidr = \"{cidr}\" }}]"
                    ),
                    &["teams.acme.egress.allow[0].cidr", "never reachable"],
                );
            }
        }
        // Private ranges are fine when a rule lies inside them, in both modes.
        for cidr in [
            "10.0.0.0/8",
            "10.20.0.0/16",
            "172.16.5.0/24",
            "100.64.0.0/10",
            "fd12::/16",
        ] {
            for mode in ["allow-list", "internet"] {
                let doc = format!("[egress]\nmode = \"{mode}\"\nallow = [{{ cidr = \"{cidr}\" }}]");
                assert!(Policy::from_toml(&doc).is_ok(), "{doc}");
            }
        }
    }

    #[test]
    fn a_team_egress_overlay_replaces_the_base_for_that_team_only() {
        let doc = r#"
            [egress]
            mode = "none"
            [teams.web.egress]
            mode = "internet"
            allow = [{ cidr = "10.20.0.0/16", ports = [5432] }]
            [teams.ci.egress]
            mode = "allow-list"
            allow = [{ host = "*.github.com", ports = [443] }]
            [teams.locked]
            max_cpus = 1.0
        "#;
        let p = Policy::from_toml(doc).unwrap();
        assert_eq!(p.rules_for("web").egress_mode, Mode::Internet);
        assert_eq!(p.rules_for("web").egress_allow.len(), 1);
        assert_eq!(p.rules_for("ci").egress_mode, Mode::AllowList);
        assert_eq!(p.rules_for("locked").egress_mode, Mode::None);
        assert_eq!(p.rules_for("other").egress_mode, Mode::None);
        // Replacement, not a merge: a narrower team section drops the base rules.
        let doc = r#"
            [egress]
            mode = "allow-list"
            allow = [{ host = "*.github.com" }, { cidr = "203.0.113.0/24" }]
            [teams.quiet.egress]
            mode = "none"
            [teams.pkg.egress]
            mode = "allow-list"
            allow = [{ host = "packages.example.com", ports = [443] }]
        "#;
        let p = Policy::from_toml(doc).unwrap();
        assert_eq!(p.rules_for("quiet").egress_mode, Mode::None);
        assert!(p.rules_for("quiet").egress_allow.is_empty());
        let pkg: Vec<String> = p
            .rules_for("pkg")
            .egress_allow
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(pkg, ["packages.example.com port 443"]);
        assert_eq!(p.rules_for("").egress_allow.len(), 2);
        // The overlay section is validated like the base one.
        refused(
            "[teams.x.egress]\nmode = \"allow-list\"",
            &["teams.x.egress.allow", "at least one rule"],
        );
        refused(
            "[teams.x.egress]\nmode = \"internet\"\nextra = 1",
            &["unknown field"],
        );
    }

    #[test]
    fn lifetime_sections_validate() {
        let p = Policy::from_toml(
            "[lifetime]\nidle_timeout = \"30m\"\nidle_cpu_percent = 2.5\nlifetime = \"8h\"\nmax_lifetime = \"7d\"\n[files]\ncopy_limit_mb = 64\n",
        )
        .unwrap();
        let r = p.rules_for("");
        assert_eq!(
            (
                r.idle_timeout,
                r.idle_cpu_percent,
                r.lifetime,
                r.max_lifetime
            ),
            (1800, 2.5, 28_800, 604_800)
        );
        assert_eq!(r.copy_limit_mb, 64);
        assert!(p.text().contains("max_lifetime = \"7d\""));
        // "0" is never, written back as "never".
        let p = Policy::from_toml("[lifetime]\nidle_timeout = \"0\"").unwrap();
        assert_eq!(p.rules_for("").idle_timeout, 0);
        assert!(p.text().contains("idle_timeout = \"never\""));
        assert_eq!(Policy::from_toml(p.text()).unwrap().digest(), p.digest());
        for (doc, needles) in [
            ("[lifetime]\nidle_timeout = 3600", &["duration string"][..]),
            ("[lifetime]\nidle_timeout = \"1.5h\"", &["invalid duration"]),
            ("[lifetime]\nidle = \"1h\"", &["unknown field"]),
            (
                "[lifetime]\nidle_cpu_percent = 0.0",
                &["lifetime.idle_cpu_percent"],
            ),
            (
                "[lifetime]\nidle_cpu_percent = 101.0",
                &["lifetime.idle_cpu_percent"],
            ),
            (
                "[lifetime]\nidle_cpu_percent = nan",
                &["lifetime.idle_cpu_percent"],
            ),
            (
                "[lifetime]\nlifetime = \"8d\"\nmax_lifetime = \"7d\"",
                &["lifetime.lifetime", "max_lifetime"],
            ),
            (
                "[lifetime]\nmax_lifetime = \"7d\"",
                &["lifetime.lifetime", "never"],
            ),
            ("[files]\ncopy_limit_mb = 0", &["files.copy_limit_mb"]),
            ("[files]\ncopy_limit_mb = -5", &["files.copy_limit_mb"]),
            ("[files]\ncopy_limit_mb = 2000000", &["files.copy_limit_mb"]),
            ("[files]\ncopy_limit = 5", &["unknown field"]),
        ] {
            refused(doc, needles);
        }
    }

    #[test]
    fn lifetime_and_files_overlays_only_tighten() {
        let base = "[lifetime]\nidle_timeout = \"2h\"\nidle_cpu_percent = 5.0\nlifetime = \"1d\"\nmax_lifetime = \"7d\"\n";
        let p = Policy::from_toml(&format!(
            "{base}[teams.a.lifetime]\nidle_timeout = \"30m\"\nidle_cpu_percent = 10.0\nlifetime = \"8h\"\nmax_lifetime = \"2d\"\n[teams.a.files]\ncopy_limit_mb = 100\n"
        ))
        .unwrap();
        let a = p.rules_for("a");
        assert_eq!(
            (
                a.idle_timeout,
                a.idle_cpu_percent,
                a.lifetime,
                a.max_lifetime,
                a.copy_limit_mb
            ),
            (1800, 10.0, 28_800, 172_800, 100)
        );
        let b = p.rules_for("b");
        assert_eq!(
            (b.idle_timeout, b.lifetime, b.copy_limit_mb),
            (7200, 86_400, 1024)
        );
        // A team ceiling below the base default lifetime lowers the default.
        let p = Policy::from_toml(&format!(
            "{base}[teams.a.lifetime]\nmax_lifetime = \"4h\"\n"
        ))
        .unwrap();
        assert_eq!(
            (p.rules_for("a").lifetime, p.rules_for("a").max_lifetime),
            (14_400, 14_400)
        );
        // Under a base without limits, a team may set any.
        let p = Policy::from_toml(
            "[lifetime]\nidle_timeout = \"never\"\n[teams.a.lifetime]\nidle_timeout = \"12h\"\nmax_lifetime = \"30d\"\n",
        )
        .unwrap();
        assert_eq!(
            (
                p.rules_for("a").idle_timeout,
                p.rules_for("a").max_lifetime,
                p.rules_for("a").lifetime
            ),
            (43_200, 2_592_000, 2_592_000)
        );
        for (overlay, field) in [
            (
                "[teams.a.lifetime]\nidle_timeout = \"3h\"",
                "lifetime.idle_timeout",
            ),
            (
                "[teams.a.lifetime]\nidle_timeout = \"never\"",
                "lifetime.idle_timeout",
            ),
            (
                "[teams.a.lifetime]\nidle_cpu_percent = 1.0",
                "lifetime.idle_cpu_percent",
            ),
            ("[teams.a.lifetime]\nlifetime = \"2d\"", "lifetime.lifetime"),
            (
                "[teams.a.lifetime]\nlifetime = \"never\"",
                "lifetime.lifetime",
            ),
            (
                "[teams.a.lifetime]\nmax_lifetime = \"8d\"",
                "lifetime.max_lifetime",
            ),
            (
                "[teams.a.lifetime]\nmax_lifetime = \"never\"",
                "lifetime.max_lifetime",
            ),
            (
                "[teams.a.files]\ncopy_limit_mb = 2048",
                "files.copy_limit_mb",
            ),
            ("[teams.a.files]\ncopy_limit_mb = 0", "files.copy_limit_mb"),
        ] {
            refused(&format!("{base}{overlay}\n"), &[field, "tighten"]);
        }
        // Consistent within the team: its lifetime within its own ceiling.
        refused(
            &format!("{base}[teams.a.lifetime]\nlifetime = \"12h\"\nmax_lifetime = \"6h\"\n"),
            &["teams.a.lifetime.lifetime", "max_lifetime"],
        );
        refused(
            &format!("{base}[teams.a.lifetime]\nidle_cpu_percent = 200.0\n"),
            &["teams.a.lifetime.idle_cpu_percent"],
        );
        refused("[teams.a.lifetime]\nidle = \"1h\"", &["unknown field"]);
        refused("[teams.a.files]\nlimit = 1", &["unknown field"]);
        // Overlays round-trip through the canonical text.
        let p = Policy::from_toml(&format!(
            "{base}[teams.a.lifetime]\nidle_timeout = \"90m\"\n"
        ))
        .unwrap();
        assert!(
            p.text()
                .contains("[teams.a.lifetime]\nidle_timeout = \"1h30m\""),
            "{}",
            p.text()
        );
        assert_eq!(Policy::from_toml(p.text()).unwrap().digest(), p.digest());
    }
}

#[cfg(test)]
mod readme_tests {
    use super::*;

    /// The README's example policy file loads, and says what it claims.
    #[test]
    fn the_readme_example_is_a_valid_policy() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("## The policy file")
            .and_then(|at| readme[at..].find("```toml\n").map(|i| at + i + 8))
            .expect("the README has an example policy file");
        let end = start + readme[start..].find("```").unwrap();
        let p = Policy::from_toml(&readme[start..end]).unwrap();
        let team = p.rules_for("<team-id>");
        assert_eq!(team.egress_mode, Mode::AllowList);
        assert_eq!(team.egress_allow.len(), 5);
        assert_eq!((team.idle_timeout, team.max_lifetime), (1800, 604_800));
        assert_eq!(p.rules_for("<other-team>").egress_mode, Mode::Internet);
        assert_eq!(p.rules_for("anyone").egress_mode, Mode::None);
    }
}
