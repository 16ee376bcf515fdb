//! The policy document (TOML): every knob with its secure default built in,
//! team overlays that can only tighten, validation, the canonical text and
//! digest, and the compiled [`Rules`] the engine evaluates against.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::image::{ImageError, ImagePattern, ListKind};
use crate::path;

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
    /// Team overlays by team id; they can only tighten.
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

/// A team's tightening of the base policy. Every field is optional; a value
/// looser than the base makes the document invalid.
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
    })
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
