//! The oracle: what every outcome of the policy engine must satisfy, judged
//! by code written apart from the engine's.
//!
//! An oracle that calls the code it checks cannot catch that code's bugs: if
//! `path::normalize` kept a `..`, or the image canonicalizer dropped a
//! registry, an oracle built on them would agree. So nothing here imports the
//! policy crate's judgement: paths are normalized by a different algorithm
//! (a scanner that truncates its output on `..`, not a component stack) and
//! compared component by component (not by string prefix); image references
//! follow Docker's reference rules written out here (distribution/reference
//! `splitDockerDomain` and grammar, go-digest's algorithms) and patterns are
//! matched with `wildmatch` directly; the Docker socket locations, the
//! sensitive host paths and the reserved container paths are written out from
//! the policy README, not imported; capability and user spellings are parsed
//! here. The policy crate is used only to *produce* outcomes (`evaluate`,
//! `Policy`, `Rule`) and to read the operator's configured lists from the
//! `PolicyDocument`, which is input, not judgement.
//!
//! Where the two readings differ the fuzz target fails, and the input is a
//! reproducer for a bug in one of them: decide which by Docker's and Linux's
//! documented behaviour, not by which one is older.

use std::net::IpAddr;

use prost::Message;
use vibebox_policy::document::PolicyDocument;
use vibebox_policy::egress::Mode;
use vibebox_policy::{Outcome, Policy, Rule, evaluate};
use vibebox_proto::environment::{ContainerSpec, EgressMode, MountType};

/// Lexical paths: normalization and containment, as Linux reads a path
/// without looking at the disk.
pub mod paths {
    /// Linux's `PATH_MAX`: longer paths are refused, not judged.
    pub const PATH_MAX: usize = 4096;

    /// `//var/./run/../run/docker.sock/` → `/var/run/docker.sock`; `..` at the
    /// root stays at the root. `None` for an empty, relative, over-long path
    /// or one with a control character.
    pub fn lexical(raw: &str) -> Option<String> {
        if !raw.starts_with('/') || raw.len() > PATH_MAX || raw.chars().any(char::is_control) {
            return None;
        }
        // One pass over the bytes; `out` is always "" or "/a/b". `/` is ASCII,
        // so every cut lands on a char boundary.
        let bytes = raw.as_bytes();
        let mut out = String::with_capacity(raw.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'/' {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && bytes[i] != b'/' {
                i += 1;
            }
            match &raw[start..i] {
                "." => {}
                ".." => {
                    let parent = out.rfind('/').unwrap_or(0);
                    out.truncate(parent);
                }
                name => {
                    out.push('/');
                    out.push_str(name);
                }
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        Some(out)
    }

    fn components(p: &str) -> impl Iterator<Item = &str> {
        p.split('/').filter(|c| !c.is_empty())
    }

    fn below_by(path: &str, prefix: &str, same: impl Fn(&str, &str) -> bool) -> bool {
        let mut rest = components(path);
        components(prefix).all(|want| rest.next().is_some_and(|have| same(have, want)))
    }

    /// Whether lexical `path` is `prefix` or lies below it, component by
    /// component (`/etcetera` is not below `/etc`).
    pub fn below(path: &str, prefix: &str) -> bool {
        below_by(path, prefix, |a, b| a == b)
    }

    /// [`below`] ignoring ASCII case.
    pub fn below_ignore_case(path: &str, prefix: &str) -> bool {
        below_by(path, prefix, |a, b| a.eq_ignore_ascii_case(b))
    }

    /// Whether either path holds the other, ignoring ASCII case: binding
    /// either exposes part of the other.
    pub fn overlap_ignore_case(a: &str, b: &str) -> bool {
        below_ignore_case(a, b) || below_ignore_case(b, a)
    }

    /// Where the Docker Engine and containerd keep their sockets (README,
    /// `mount.docker_socket`: "a Docker/containerd socket location"): the
    /// socket itself, and the runtime directories holding containerd's and
    /// the plugins' sockets, under both `/run` and its `/var/run` alias.
    pub const SOCKET_LOCATIONS: &[&str] = &[
        "/run/docker.sock",
        "/var/run/docker.sock",
        "/run/docker",
        "/var/run/docker",
        "/run/containerd",
        "/var/run/containerd",
    ];

    /// Host paths a bind may not be, be below, or hold (README,
    /// `mount.sensitive_path`; `/lib*` spelled out as the library
    /// directories distributions ship).
    pub const SENSITIVE: &[&str] = &[
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
        "/run",
        "/var/run",
        "/var/log",
        "/var/lib/docker",
        "/var/lib/containerd",
        "/var/lib/kubelet",
    ];

    /// Container paths no mount may be or lie below (README,
    /// `mount.target_reserved`): kernel interfaces and the files the engine
    /// writes into every container. Case-sensitive, as Linux is.
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

    /// Whether a lexical host path is, holds or lies in a socket location,
    /// or names a `*.sock` (ignoring ASCII case).
    pub fn is_socket(p: &str) -> bool {
        SOCKET_LOCATIONS.iter().any(|s| overlap_ignore_case(p, s))
            || components(p)
                .last()
                .is_some_and(|name| name.to_ascii_lowercase().ends_with(".sock"))
    }

    /// Whether a lexical container path is or lies below a reserved one.
    pub fn is_reserved_target(p: &str) -> bool {
        RESERVED_TARGETS.iter().any(|r| below(p, r))
    }
}

/// Docker image references, canonicalized by Docker's rules, and the
/// platform's allow/deny patterns over them.
pub mod image {
    use wildmatch::WildMatch;

    /// Docker's default registry.
    pub const HUB: &str = "docker.io";
    /// Docker folds `index.docker.io` into `docker.io`; the platform also
    /// folds Docker Hub's registry endpoints (policy README).
    const HUB_ALIASES: &[&str] = &[
        "index.docker.io",
        "registry-1.docker.io",
        "registry.hub.docker.com",
    ];
    /// distribution/reference `NameTotalLengthMax`, over `registry/path`.
    const MAX_NAME: usize = 255;

    /// A reference in canonical parts.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Reference {
        pub registry: String,
        pub path: String,
        pub tag: Option<String>,
        pub digest: Option<String>,
    }

    impl Reference {
        /// `registry/path`.
        pub fn name(&self) -> String {
            format!("{}/{}", self.registry, self.path)
        }

        /// The last path component.
        pub fn repository(&self) -> &str {
            self.path.rsplit('/').next().unwrap_or(&self.path)
        }

        /// `registry/path[:tag][@digest]`.
        pub fn canonical(&self) -> String {
            let mut s = self.name();
            if let Some(t) = &self.tag {
                s.push(':');
                s.push_str(t);
            }
            if let Some(d) = &self.digest {
                s.push('@');
                s.push_str(d);
            }
            s
        }
    }

    /// Docker's domain test (`splitDockerDomain`), on a lower-cased first
    /// component: a registry has a `.` or a `:` or is `localhost`.
    fn is_domain(first: &str) -> bool {
        first.contains(['.', ':']) || first == "localhost"
    }

    fn fold_hub(registry: &str) -> &str {
        if HUB_ALIASES.contains(&registry) {
            HUB
        } else {
            registry
        }
    }

    /// `host[:port]`: host a domain name (`[a-z0-9]` components, inner `-`)
    /// or a bracketed IPv6 address `[hex and colons]`; port digits.
    fn valid_domain(d: &str) -> bool {
        let (host_ok, port) = if let Some(inner) = d.strip_prefix('[') {
            let Some((ip, after)) = inner.split_once(']') else {
                return false;
            };
            let ip_ok = !ip.is_empty() && ip.bytes().all(|b| b == b':' || b.is_ascii_hexdigit());
            match after {
                "" => (ip_ok, None),
                a => (ip_ok, Some(a.strip_prefix(':').unwrap_or("x"))),
            }
        } else {
            let (host, port) = match d.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (d, None),
            };
            let label = |l: &str| {
                let b = l.as_bytes();
                !b.is_empty()
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
            };
            (host.split('.').all(label), port)
        };
        host_ok && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    }

    /// One path component: `[a-z0-9]+` runs joined by one separator each:
    /// `.`, `_`, `__` or any number of `-`.
    fn valid_component(c: &str) -> bool {
        let mut separator = String::new();
        let mut started = false;
        for ch in c.chars() {
            if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
                let joins = separator.is_empty()
                    || matches!(separator.as_str(), "." | "_" | "__")
                    || separator.chars().all(|x| x == '-');
                if !joins {
                    return false;
                }
                separator.clear();
                started = true;
            } else if started && matches!(ch, '.' | '_' | '-') {
                separator.push(ch);
            } else {
                return false;
            }
        }
        started && separator.is_empty()
    }

    /// `[\w][\w.-]{0,127}`.
    fn valid_tag(t: &str) -> bool {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        let mut chars = t.chars();
        t.len() <= 128
            && chars.next().is_some_and(word)
            && chars.all(|c| word(c) || c == '.' || c == '-')
    }

    /// go-digest: only algorithms Docker can verify (sha256, sha384,
    /// sha512), each with its exact length of lower-case hex.
    fn valid_digest(d: &str) -> bool {
        let Some((algorithm, hex)) = d.split_once(':') else {
            return false;
        };
        let want = match algorithm {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return false,
        };
        hex.len() == want
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }

    /// Canonicalizes a reference as written by a user: `docker.io` when the
    /// first component is no domain, `library/` for a one-component Hub
    /// name, the name lower-cased (the platform's choice; Docker refuses
    /// upper case), `latest` when there is neither tag nor digest.
    pub fn canonicalize(raw: &str) -> Result<Reference, &'static str> {
        if raw.is_empty() {
            return Err("empty");
        }
        if raw.len() == 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            // ParseNormalizedNamed: 64 hex digits are an image id.
            return Err("64 hex digits name an image id, not a repository");
        }
        // Scan left to right: [domain '/'] path [':' tag] ['@' digest].
        // Lower-casing ASCII keeps byte offsets, so `lower` and `raw` align.
        let lower = raw.to_ascii_lowercase();
        let (registry, path_start) = match lower.split_once('/') {
            Some((first, _)) if is_domain(first) => {
                if !valid_domain(first) {
                    return Err("bad registry");
                }
                (fold_hub(first).to_owned(), first.len() + 1)
            }
            _ => (HUB.to_owned(), 0),
        };
        let path_end = lower[path_start..]
            .find([':', '@'])
            .map_or(lower.len(), |i| path_start + i);
        let path = &lower[path_start..path_end];
        if !path.split('/').all(valid_component) {
            return Err("bad path");
        }
        let rest = &raw[path_end..];
        let (tag, digest) = match rest.split_once('@') {
            Some((t, d)) => (t, Some(d)),
            None => (rest, None),
        };
        let tag = match tag.strip_prefix(':') {
            Some(t) if valid_tag(t) => Some(t),
            Some(_) => return Err("bad tag"),
            None if tag.is_empty() => None,
            None => return Err("bad path"),
        };
        if digest.is_some_and(|d| !valid_digest(d)) {
            return Err("bad digest");
        }
        let path = if registry == HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_owned()
        };
        if registry.len() + 1 + path.len() > MAX_NAME {
            return Err("name too long");
        }
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_owned()),
            (t, _) => t.map(str::to_owned),
        };
        Ok(Reference {
            registry,
            path,
            tag,
            digest: digest.map(str::to_owned),
        })
    }

    /// One entry of an image allow or deny list.
    #[derive(Debug)]
    pub struct Pattern {
        /// Globs over `registry/path`.
        names: Vec<WildMatch>,
        /// A glob over the last path component (deny lists, no `/`).
        repository: Option<WildMatch>,
        tag: Option<WildMatch>,
        digest: Option<WildMatch>,
    }

    impl Pattern {
        /// A deny-list entry: a name without `/` is that repository in any
        /// registry and namespace. A first component with a wildcard and no
        /// `.`/`:` could be a registry or a Docker Hub namespace; a deny
        /// entry covers both readings (fail closed).
        pub fn deny(p: &str) -> Self {
            Self::new(p, true)
        }

        /// An allow-list entry: a name without `/` is the official Docker
        /// Hub image, `*` any image. An ambiguous first component (see
        /// [`Pattern::deny`]) is read either way: the oracle does not
        /// second-guess an operator's allow list.
        pub fn allow(p: &str) -> Self {
            Self::new(p, false)
        }

        fn new(p: &str, deny: bool) -> Self {
            let (name_tag, digest) = match p.split_once('@') {
                Some((n, d)) => (n, Some(d)),
                None => (p, None),
            };
            let last = name_tag.rfind('/').map_or(0, |i| i + 1);
            let (name, tag) = match name_tag[last..].find(':') {
                Some(i) => (&name_tag[..last + i], Some(&name_tag[last + i + 1..])),
                None => (name_tag, None),
            };
            let name = name.to_ascii_lowercase();
            let hub = |path: &str| {
                if path.contains('/') {
                    format!("{HUB}/{path}")
                } else {
                    format!("{HUB}/library/{path}")
                }
            };
            let mut names = Vec::new();
            let mut repository = None;
            match name.split_once('/') {
                None if deny => repository = Some(WildMatch::new(&name)),
                None if name == "*" => names.push("*".to_owned()),
                None => names.push(hub(&name)),
                Some((first, rest)) if is_domain(first) => {
                    let registry = fold_hub(first);
                    if registry == HUB {
                        names.push(hub(rest));
                    } else {
                        names.push(format!("{registry}/{rest}"));
                    }
                }
                Some((first, _)) => {
                    names.push(hub(&name));
                    if first.contains(['*', '?']) {
                        names.push(name.clone());
                    }
                }
            }
            Self {
                names: names.iter().map(|n| WildMatch::new(n)).collect(),
                repository,
                tag: tag.map(WildMatch::new),
                digest: digest.map(WildMatch::new),
            }
        }

        pub fn matches(&self, r: &Reference) -> bool {
            let name = r.name();
            let name_ok = self.names.iter().any(|n| n.matches(&name))
                || self
                    .repository
                    .as_ref()
                    .is_some_and(|g| g.matches(r.repository()));
            name_ok
                && self
                    .tag
                    .as_ref()
                    .is_none_or(|t| t.matches(r.tag.as_deref().unwrap_or("")))
                && self
                    .digest
                    .as_ref()
                    .is_none_or(|d| r.digest.as_deref().is_some_and(|x| d.matches(x)))
        }
    }
}

/// Known answers, from Docker's and the README's own examples: the oracle
/// is checked before it judges (once per process), so a slip in it shows up
/// as a failed self-check rather than as a bug blamed on the engine.
pub fn self_check() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(known_answers);
}

fn known_answers() {
    use paths::{below, is_reserved_target, is_socket, lexical, overlap_ignore_case};
    for (raw, want) in [
        ("/", "/"),
        ("//", "/"),
        ("/..", "/"),
        ("/../../etc", "/etc"),
        ("//var//run//docker.sock/", "/var/run/docker.sock"),
        ("/var/./run/../run/docker.sock", "/var/run/docker.sock"),
        ("/tmp/../var/run/docker.sock", "/var/run/docker.sock"),
        ("/a/b/c/../../..", "/"),
        ("/a/b/..", "/a"),
        ("/a/.../b", "/a/.../b"),
        ("/a/..b/.c", "/a/..b/.c"),
    ] {
        assert_eq!(
            lexical(raw).as_deref(),
            Some(want),
            "oracle: lexical({raw:?})"
        );
    }
    let long = format!("/{}", "a".repeat(paths::PATH_MAX));
    for raw in [
        "",
        "relative",
        "./x",
        "~/x",
        "/a\0b",
        "/a\nb",
        long.as_str(),
    ] {
        assert_eq!(lexical(raw), None, "oracle: lexical({raw:?})");
    }
    assert!(below("/etc/passwd", "/etc") && below("/etc", "/etc") && below("/x", "/"));
    assert!(!below("/etcetera", "/etc") && !below("/", "/etc") && !below("/ETC", "/etc"));
    assert!(overlap_ignore_case("/VAR", "/var/lib/docker"));
    for p in [
        "/var/run/docker.sock",
        "/RUN/Docker.Sock",
        "/run",
        "/var",
        "/",
        "/home/a.sock",
    ] {
        assert!(is_socket(p), "oracle: {p} is a socket path");
    }
    assert!(is_socket("/run/containerd/containerd.sock") && is_socket("/var/run/docker/plugins"));
    for p in [
        "/home/dev",
        "/srv/docker.socket",
        "/var/run/dockerx",
        "/var/lib",
    ] {
        assert!(!is_socket(p), "oracle: {p} is no socket path");
    }
    for p in [
        "/proc",
        "/proc/sys",
        "/dev/shm",
        "/etc/hosts",
        "/.dockerenv",
        "/run/.containerenv",
    ] {
        assert!(is_reserved_target(p), "oracle: {p} is reserved");
    }
    for p in [
        "/PROC",
        "/etc",
        "/etc/hostsx",
        "/run",
        "/workspace",
        "/procfs",
    ] {
        assert!(!is_reserved_target(p), "oracle: {p} is not reserved");
    }

    let sha = format!("sha256:{}", "0123456789abcdef".repeat(4));
    for (raw, want) in [
        ("ubuntu", "docker.io/library/ubuntu:latest".to_owned()),
        ("ubuntu:20.04", "docker.io/library/ubuntu:20.04".into()),
        ("library/ubuntu", "docker.io/library/ubuntu:latest".into()),
        ("docker.io/ubuntu", "docker.io/library/ubuntu:latest".into()),
        (
            "index.docker.io/library/ubuntu",
            "docker.io/library/ubuntu:latest".into(),
        ),
        (
            "dmcgowan/myapp/sub",
            "docker.io/dmcgowan/myapp/sub:latest".into(),
        ),
        ("example.com/app", "example.com/app:latest".into()),
        ("localhost/app:1", "localhost/app:1".into()),
        ("localhost:5000/a/b:tag", "localhost:5000/a/b:tag".into()),
        ("localhost:5000", "docker.io/library/localhost:5000".into()),
        ("[::1]:5000/app", "[::1]:5000/app:latest".into()),
        (
            "a__b/c-d.e---f:Tag_1",
            "docker.io/a__b/c-d.e---f:Tag_1".into(),
        ),
        ("Python:3", "docker.io/library/python:3".into()),
        (
            &format!("ghcr.io/acme/app@{sha}"),
            format!("ghcr.io/acme/app@{sha}"),
        ),
        (
            &format!("app:v1@{sha}"),
            format!("docker.io/library/app:v1@{sha}"),
        ),
    ] {
        let got = image::canonicalize(raw).map(|r| r.canonical());
        assert_eq!(got, Ok(want), "oracle: canonicalize({raw:?})");
    }
    let upper = format!("a@sha256:{}", "0123456789ABCDEF".repeat(4));
    let md5 = format!("a@md5:{}", "0123456789abcdef".repeat(2));
    let id = "0123456789abcdef".repeat(4);
    for raw in [
        "",
        ":x",
        "a//b",
        "a/",
        "/a",
        "-a",
        "a-",
        "a..b",
        "a___b",
        "a:",
        "a:-x",
        "a:b/c",
        "a@sha256:abc",
        "bad_host.io/app",
        "host:port/app",
        "[::1/app",
        "a b",
        &upper,
        &md5,
        &id,
    ] {
        assert!(
            image::canonicalize(raw).is_err(),
            "oracle: {raw:?} is refused"
        );
    }
    let reference = |raw: &str| image::canonicalize(raw).expect("known reference");
    let deny = |p: &str, raw: &str| image::Pattern::deny(p).matches(&reference(raw));
    let allow = |p: &str, raw: &str| image::Pattern::allow(p).matches(&reference(raw));
    assert!(deny("docker:*", "mirror.example.com/library/docker:24"));
    assert!(deny("docker:*", &format!("docker@{sha}")));
    assert!(!deny("docker:*", "dockerfile:1") && !deny("docker:*", "python:3"));
    assert!(deny("*:latest", "python") && !deny("*:latest", &format!("python@{sha}")));
    assert!(deny("index.docker.io/library/docker", "docker:1"));
    assert!(
        deny("acme*/app", "acme1/app:1"),
        "ambiguous first component: both readings"
    );
    assert!(allow("*", "ghcr.io/x/y:1") && allow("python:*", "python:3.12"));
    assert!(!allow("python:*", "acme/python:3") && !allow("python:*", "evil.io/library/python:3"));
    assert!(allow("ghcr.io/acme/*", "ghcr.io/acme/app:1"));
    assert!(!allow("ghcr.io/acme/*", "ghcr.io/other/app:1"));

    for (raw, want) in [
        ("cap_chown", "CHOWN"),
        (" Cap_Net_Bind_Service ", "NET_BIND_SERVICE"),
        ("sys_admin", "SYS_ADMIN"),
        ("CAP_", ""),
        ("cap_CAP_SYS_ADMIN", "CAP_SYS_ADMIN"),
    ] {
        assert_eq!(
            capability_name(raw),
            want,
            "oracle: capability_name({raw:?})"
        );
    }
    assert!(is_root(side("000")) && is_root(side("Root")) && !is_root(side("1000")));
    assert_eq!(side("0001000"), Side::Id(1000));
    assert_eq!(side("99999999999999999999999"), Side::Id(u64::MAX));
}

/// `CAP_SYS_ADMIN`, ` sys_admin `, `Cap_Sys_Admin` → `SYS_ADMIN` (README:
/// `CAP_` optional, any case, surrounding blanks). Docker upper-cases with
/// Unicode rules (`ſ` becomes `S`); a name that is not ASCII is no name the
/// policy can allow, so it maps to itself and matches nothing.
pub fn capability_name(cap: &str) -> String {
    let trimmed = cap.trim_matches(char::is_whitespace);
    if !trimmed.is_ascii() {
        return trimmed.to_owned();
    }
    let upper: String = trimmed.chars().map(|c| c.to_ascii_uppercase()).collect();
    match upper.get(..4) {
        Some("CAP_") => upper[4..].to_owned(),
        _ => upper,
    }
}

/// Whether a lexical host path is a Docker socket location, holds one, lies
/// in one, or names a `*.sock` (ignoring ASCII case).
pub fn is_socket_path(p: &str) -> bool {
    paths::is_socket(p)
}

/// One side of `uid:gid`, read as the kernel and runc would: digits are an
/// id (leading zeros allowed), anything else a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side<'a> {
    /// The value, saturated: `u64::MAX` for more digits than fit.
    Id(u64),
    Name(&'a str),
}

fn side(s: &str) -> Side<'_> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let significant = s.trim_start_matches('0');
        if significant.len() > 19 {
            Side::Id(u64::MAX)
        } else {
            Side::Id(significant.parse().unwrap_or(0))
        }
    } else {
        Side::Name(s)
    }
}

fn is_root(side: Side<'_>) -> bool {
    match side {
        Side::Id(n) => n == 0,
        Side::Name(n) => n.eq_ignore_ascii_case("root"),
    }
}

/// What a team may get under a document, recomputed from the document
/// itself (independently of the engine's compiled rules).
#[derive(Debug)]
pub struct Limits {
    allow: Vec<image::Pattern>,
    /// Empty unless the team's overlay narrows the images.
    team_allow: Vec<image::Pattern>,
    deny: Vec<image::Pattern>,
    caps: Vec<String>,
    bind_prefixes: Vec<String>,
    sensitive: Vec<String>,
    sysctls: Vec<String>,
    max_mounts: usize,
    max_tmpfs_mb: i64,
    max_cpus: f64,
    max_memory_mb: i64,
    max_pids: i64,
    default_uid: u64,
    default_gid: u64,
    min_id: u64,
    max_id: u64,
    allow_names: bool,
    allow_ports: bool,
    read_only_root: bool,
    workspace: String,
    egress_mode: Mode,
    /// Seconds, 0 = never.
    idle_timeout: u32,
    idle_cpu_percent: f64,
    /// Seconds, 0 = unlimited.
    max_lifetime: u32,
    copy_limit_mb: i64,
}

impl Limits {
    /// The limits of `team` (the base policy when it has no overlay).
    pub fn of(doc: &PolicyDocument, team: &str) -> Self {
        let lexical = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|p| paths::lexical(p).expect("an accepted document has absolute paths"))
                .collect()
        };
        let caps =
            |list: &[String]| -> Vec<String> { list.iter().map(|c| capability_name(c)).collect() };
        let mut limits = Limits {
            allow: doc
                .images
                .allow
                .iter()
                .map(|p| image::Pattern::allow(p))
                .collect(),
            team_allow: Vec::new(),
            deny: doc
                .images
                .deny
                .iter()
                .map(|p| image::Pattern::deny(p))
                .collect(),
            caps: caps(&doc.capabilities.allow_add),
            bind_prefixes: lexical(&doc.mounts.allow_bind_prefixes),
            sensitive: paths::SENSITIVE
                .iter()
                .map(|s| (*s).to_owned())
                .chain(lexical(&doc.mounts.extra_sensitive_paths))
                .collect(),
            sysctls: doc.sysctls.allow.clone(),
            max_mounts: doc.mounts.max_mounts as usize,
            max_tmpfs_mb: doc.mounts.max_tmpfs_mb,
            max_cpus: doc.resources.max_cpus,
            max_memory_mb: doc.resources.max_memory_mb,
            max_pids: doc.resources.max_pids,
            default_uid: doc.user.default_uid.into(),
            default_gid: doc.user.default_gid.into(),
            min_id: doc.user.min_id.into(),
            max_id: doc.user.max_id.into(),
            allow_names: doc.user.allow_names,
            allow_ports: doc.network.allow_published_ports,
            read_only_root: doc.filesystem.read_only_root,
            workspace: paths::lexical(&doc.filesystem.workspace_path)
                .expect("an accepted document has an absolute workspace"),
            egress_mode: doc.egress.mode,
            idle_timeout: doc.lifetime.idle_timeout.0,
            idle_cpu_percent: doc.lifetime.idle_cpu_percent,
            max_lifetime: doc.lifetime.max_lifetime.0,
            copy_limit_mb: doc.files.copy_limit_mb,
        };
        if let Some(o) = doc.teams.get(team) {
            if let Some(allow) = &o.allow_images {
                limits.team_allow = allow.iter().map(|p| image::Pattern::allow(p)).collect();
            }
            limits
                .deny
                .extend(o.deny_images.iter().map(|p| image::Pattern::deny(p)));
            if let Some(c) = &o.allow_cap_add {
                limits.caps = caps(c);
            }
            if let Some(p) = &o.allow_bind_prefixes {
                limits.bind_prefixes = lexical(p);
            }
            if let Some(s) = &o.allow_sysctls {
                limits.sysctls = s.clone();
            }
            limits.max_mounts = o.max_mounts.map_or(limits.max_mounts, |m| m as usize);
            limits.max_cpus = o.max_cpus.unwrap_or(limits.max_cpus);
            limits.max_memory_mb = o.max_memory_mb.unwrap_or(limits.max_memory_mb);
            limits.max_pids = o.max_pids.unwrap_or(limits.max_pids);
            limits.allow_ports = o.allow_published_ports.unwrap_or(limits.allow_ports);
            limits.read_only_root = o.read_only_root.unwrap_or(limits.read_only_root);
            // A team's egress section replaces the base one; lifetime and
            // files values replace the base's field by field.
            if let Some(e) = &o.egress {
                limits.egress_mode = e.mode;
            }
            if let Some(l) = &o.lifetime {
                limits.idle_timeout = l.idle_timeout.map_or(limits.idle_timeout, |d| d.0);
                limits.idle_cpu_percent = l.idle_cpu_percent.unwrap_or(limits.idle_cpu_percent);
                limits.max_lifetime = l.max_lifetime.map_or(limits.max_lifetime, |d| d.0);
            }
            if let Some(c) = o.files.as_ref().and_then(|f| f.copy_limit_mb) {
                limits.copy_limit_mb = c;
            }
        }
        limits
    }

    fn in_range(&self, id: u64) -> bool {
        (self.min_id..=self.max_id).contains(&id)
    }

    /// The `uid:gid` a spec with a bind must run as.
    fn platform_user(&self) -> (u64, u64) {
        (self.default_uid, self.default_gid)
    }
}

fn is_bind(kind: i32) -> bool {
    kind == MountType::Bind as i32
}

/// Denials that hold whatever else the spec says: judged from the raw spec.
/// Whether a CIDR rule, as `address/length`, lies inside a range no
/// environment may reach (written out from the policy README: "this
/// network", loopback, link-local and metadata, multicast, reserved and
/// broadcast, `::`, `::1`, fe80::/10, ff00::/8, fec0::/10, fd00:ec2::254).
fn inside_forbidden(ip: IpAddr, len: u8) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            (len >= 8 && (o[0] == 0 || o[0] == 127))
                || (len >= 16 && o[0] == 169 && o[1] == 254)
                || (len >= 4 && o[0] >= 224)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            (len == 128 && (a.is_unspecified() || a.is_loopback()))
                || (len >= 10 && (s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0))
                || (len >= 8 && s[0] >> 8 == 0xff)
                || (len == 128 && s == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254])
        }
    }
}

/// `after` is no later than `limit`, where 0 is never.
fn within(after: u32, limit: u32) -> bool {
    limit == 0 || (after != 0 && after <= limit)
}

fn check_denials(limits: &Limits, spec: &ContainerSpec, outcome: &Outcome) {
    // An address literal no environment may reach, asked for in a
    // well-formed list, is refused as such.
    if let Some(e) = &spec.egress
        && matches!(
            EgressMode::try_from(e.mode),
            Ok(EgressMode::AllowList | EgressMode::Internet)
        )
        && e.allow.len() <= 64
    {
        for r in &e.allow {
            let forbidden = r.host.is_empty()
                && r.cidr
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| inside_forbidden(ip, if ip.is_ipv4() { 32 } else { 128 }));
            if forbidden {
                assert!(
                    outcome.has(Rule::EgressForbiddenDestination),
                    "forbidden destination {:?} not denied as such",
                    r.cidr
                );
            }
        }
    }
    if spec.privileged {
        assert!(
            outcome.has(Rule::Privileged),
            "privileged not denied as such"
        );
    }
    if let Some(user) = spec.user.as_deref().filter(|u| !u.is_empty()) {
        let (u, g) = match user.split_once(':') {
            Some((u, g)) => (side(u), Some(side(g))),
            None => (side(user), None),
        };
        if is_root(u) || g.is_some_and(is_root) {
            assert!(!outcome.allowed(), "root user {user:?} allowed");
        }
        let out_of_range = |s: Side<'_>| matches!(s, Side::Id(n) if !limits.in_range(n));
        if out_of_range(u) || g.is_some_and(out_of_range) {
            assert!(
                !outcome.allowed(),
                "user {user:?} outside {}..={} allowed",
                limits.min_id,
                limits.max_id
            );
        }
        // With a bind, only the platform identity (a bare uid takes the
        // platform gid).
        let effective = match (u, g) {
            (Side::Id(u), None) => Some((u, limits.default_gid)),
            (Side::Id(u), Some(Side::Id(g))) => Some((u, g)),
            _ => None,
        };
        if spec.mounts.iter().any(|m| is_bind(m.r#type))
            && effective != Some(limits.platform_user())
        {
            assert!(
                !outcome.allowed(),
                "user {user:?} allowed with a bind mount"
            );
        }
    }
    for m in &spec.mounts {
        if let Some(target) = paths::lexical(&m.target)
            && paths::is_reserved_target(&target)
        {
            assert!(
                outcome.has(Rule::MountTargetReserved),
                "reserved target {:?} not denied as such",
                m.target
            );
        }
        if !is_bind(m.r#type) {
            continue;
        }
        let Some(source) = paths::lexical(&m.source) else {
            continue;
        };
        if paths::is_socket(&source) {
            assert!(
                outcome.has(Rule::MountDockerSocket),
                "socket bind {:?} not denied as such",
                m.source
            );
        } else if limits
            .sensitive
            .iter()
            .any(|s| paths::overlap_ignore_case(&source, s))
        {
            assert!(
                outcome.has(Rule::MountSensitivePath),
                "sensitive bind {:?} not denied as such",
                m.source
            );
        }
    }
}

/// Checks an outcome of evaluating `spec` for `team` under `policy`:
/// every invariant of a hardened spec (README of the policy crate), the
/// denials that no document can lift, and that hardening is idempotent and
/// its digest survives a protobuf round trip.
pub fn check_outcome(policy: &Policy, team: &str, spec: &ContainerSpec, outcome: &Outcome) {
    self_check();
    let limits = Limits::of(policy.document(), team);
    assert_eq!(
        outcome.allowed(),
        outcome.hardened.is_some(),
        "a hardened spec exactly when allowed"
    );
    check_denials(&limits, spec, outcome);
    let Some(h) = &outcome.hardened else {
        assert!(!outcome.violations.is_empty());
        return;
    };

    // The image: what the user wrote, canonicalized by Docker's rules;
    // allowed and not denied.
    let image = image::canonicalize(&spec.image)
        .unwrap_or_else(|e| panic!("{:?} allowed but Docker refuses it: {e}", spec.image));
    assert_eq!(
        h.image,
        image.canonical(),
        "hardened image of {:?}",
        spec.image
    );
    assert_eq!(
        image::canonicalize(&h.image).map(|r| r.canonical()),
        Ok(h.image.clone()),
        "hardened image is canonical"
    );
    assert_eq!(outcome.canonical_image.as_deref(), Some(h.image.as_str()));
    assert!(
        !limits.deny.iter().any(|p| p.matches(&image)),
        "{} allowed despite a deny pattern",
        h.image
    );
    assert!(
        limits.allow.iter().any(|p| p.matches(&image))
            && (limits.team_allow.is_empty()
                || limits.team_allow.iter().any(|p| p.matches(&image))),
        "{} allowed but on no allow list",
        h.image
    );

    assert!(!h.privileged);
    assert_eq!(h.cap_drop, ["ALL"]);
    assert_eq!(h.security_opt, ["no-new-privileges"]);
    assert!(h.devices.is_empty());
    assert!(
        h.cap_add.windows(2).all(|w| w[0] < w[1]),
        "cap_add sorted and unique: {:?}",
        h.cap_add
    );
    for cap in &h.cap_add {
        assert!(
            limits.caps.contains(cap),
            "capability {cap:?} not in the allow list {:?}",
            limits.caps
        );
        assert!(
            cap != "ALL"
                && !cap.is_empty()
                && cap.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
            "capability {cap:?}"
        );
    }
    for cap in &spec.cap_add {
        assert!(
            limits.caps.contains(&capability_name(cap)),
            "requested capability {cap:?} allowed"
        );
    }

    // The user: uid:gid, never root, in range, numeric unless names are
    // allowed; the platform identity whenever something is bound.
    let user = h.user.as_deref().expect("hardened user is set");
    let (uid, gid) = user.split_once(':').expect("hardened user is uid:gid");
    for s in [uid, gid] {
        assert!(!s.is_empty() && !is_root(side(s)), "user {user:?}");
        match side(s) {
            Side::Id(n) => {
                assert_eq!(n.to_string(), s, "numeric side of {user:?} is canonical");
                assert!(
                    limits.in_range(n),
                    "user {user:?} outside {}..={}",
                    limits.min_id,
                    limits.max_id
                );
            }
            Side::Name(_) => assert!(limits.allow_names, "name in {user:?} while names are off"),
        }
    }
    if h.mounts.iter().any(|m| is_bind(m.r#type)) {
        let (u, g) = limits.platform_user();
        assert_eq!(
            user,
            format!("{u}:{g}"),
            "a spec with a bind runs as the platform user"
        );
    }

    for (mode, allowed) in [
        (&h.network_mode, &[""][..]),
        (&h.pid_mode, &[""]),
        (&h.ipc_mode, &["", "private", "none"]),
        (&h.uts_mode, &[""]),
        (&h.userns_mode, &[""]),
        (&h.cgroupns_mode, &["", "private"]),
    ] {
        assert!(allowed.contains(&mode.as_str()), "namespace mode {mode:?}");
    }
    for key in h.sysctls.keys() {
        assert!(limits.sysctls.contains(key), "sysctl {key:?}");
    }
    for key in h.labels.keys() {
        let k = key.trim().to_ascii_lowercase();
        assert!(
            k != "vibebox" && !k.starts_with("vibebox."),
            "label {key:?}"
        );
    }

    // Mounts: lexical, unique, unreserved targets; binds only under a
    // prefix, never sensitive or a socket; the workspace is always there.
    assert!(
        spec.mounts.len() <= limits.max_mounts,
        "{} mounts allowed, at most {}",
        spec.mounts.len(),
        limits.max_mounts
    );
    let mut targets = Vec::new();
    for m in &h.mounts {
        assert_eq!(
            paths::lexical(&m.target).as_deref(),
            Some(m.target.as_str())
        );
        assert_ne!(m.target, "/");
        assert!(
            !paths::is_reserved_target(&m.target),
            "reserved target {}",
            m.target
        );
        assert!(
            !targets.contains(&&m.target),
            "duplicate target {}",
            m.target
        );
        targets.push(&m.target);
        match MountType::try_from(m.r#type) {
            Ok(MountType::Bind) => {
                let s = &m.source;
                assert_eq!(
                    paths::lexical(s).as_deref(),
                    Some(s.as_str()),
                    "bind source"
                );
                assert!(!paths::is_socket(s), "socket bind {s} allowed");
                assert!(
                    !limits
                        .sensitive
                        .iter()
                        .any(|p| paths::overlap_ignore_case(s, p)),
                    "sensitive bind {s} allowed"
                );
                assert!(
                    limits.bind_prefixes.iter().any(|p| paths::below(s, p)),
                    "bind {s} outside {:?}",
                    limits.bind_prefixes
                );
            }
            Ok(MountType::Volume) => {
                assert!(!m.source.to_ascii_lowercase().starts_with("vibebox"));
                assert!(
                    m.source
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                );
            }
            Ok(MountType::Tmpfs) => {
                let size = m.size_mb.expect("tmpfs has a size");
                assert!((1..=limits.max_tmpfs_mb).contains(&size), "tmpfs {size}");
            }
            other => panic!("mount type {other:?} allowed"),
        }
    }
    assert!(targets.contains(&&limits.workspace), "no workspace mount");
    let read_only = h.read_only_rootfs.expect("read_only_rootfs is set");
    if limits.read_only_root {
        assert!(read_only, "read-only root required");
    }
    if read_only {
        assert!(
            targets.iter().any(|t| *t == "/tmp"),
            "no /tmp with a read-only root"
        );
    }

    let cpu = h.cpu_limit.expect("cpu set");
    assert!(
        cpu.is_finite() && (0.01..=limits.max_cpus).contains(&cpu),
        "cpu {cpu}"
    );
    let memory = h.memory_limit_mb.expect("memory set");
    assert!(
        (6..=limits.max_memory_mb).contains(&memory),
        "memory {memory}"
    );
    let pids = h.pids_limit.expect("pids set");
    assert!((1..=limits.max_pids).contains(&pids), "pids {pids}");

    if !h.ports.is_empty() {
        assert!(limits.allow_ports, "ports published against the policy");
    }
    for p in &h.ports {
        assert!((1..=65535).contains(&p.container_port));
        assert!(p.host_port == 0 || (1024..=65535).contains(&p.host_port));
        assert!(
            p.host_ip.parse::<std::net::IpAddr>().is_ok(),
            "{:?}",
            p.host_ip
        );
        assert!(p.protocol == "tcp" || p.protocol == "udp");
    }
    for key in h.env.keys() {
        assert!(!key.is_empty() && !key.contains(['=', '\0']));
    }

    // Egress: always decided (an explicit mode), never wider than the
    // team's; rules well-formed, canonical, unique, never inside a
    // forbidden range.
    let egress = h.egress.as_ref().expect("hardened egress is set");
    let ceiling = match limits.egress_mode {
        Mode::None => EgressMode::None,
        Mode::AllowList => EgressMode::AllowList,
        Mode::Internet => EgressMode::Internet,
    } as i32;
    assert!(
        (EgressMode::None as i32..=ceiling).contains(&egress.mode),
        "egress mode {} above the team's {:?}",
        egress.mode,
        limits.egress_mode
    );
    if egress.mode == EgressMode::None as i32 {
        assert!(egress.allow.is_empty(), "rules under mode none");
    }
    if egress.mode == EgressMode::AllowList as i32 {
        assert!(!egress.allow.is_empty(), "an empty allow list");
    }
    assert!(egress.allow.len() <= 64);
    for (i, r) in egress.allow.iter().enumerate() {
        assert!(!egress.allow[..i].contains(r), "duplicate rule {r:?}");
        assert!(r.host.is_empty() != r.cidr.is_empty(), "{r:?}");
        assert!(r.ports.len() <= 32);
        assert!(
            r.ports.windows(2).all(|w| w[0] < w[1])
                && r.ports.iter().all(|p| (1..=65535).contains(p)),
            "ports {:?}",
            r.ports
        );
        if r.host.is_empty() {
            let (addr, len) = r
                .cidr
                .split_once('/')
                .expect("a canonical CIDR has a length");
            let ip: IpAddr = addr.parse().expect("a CIDR's address parses");
            let len: u8 = len.parse().expect("a CIDR's length parses");
            assert_eq!(ip.to_string(), addr, "canonical address spelling");
            assert!(!inside_forbidden(ip, len), "forbidden rule {}", r.cidr);
        } else {
            assert!(
                !r.host.ends_with('.')
                    && r.host.bytes().all(|b| b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'-' | b'.' | b'*' | b'?')),
                "host pattern {:?}",
                r.host
            );
        }
    }

    // Lifetimes: all four set, none longer than the team's; copy limit set
    // and within the team's.
    let l = h.lifetime.as_ref().expect("hardened lifetime is set");
    let idle = l.idle_timeout_seconds.expect("idle timeout set");
    let cpu = l.idle_cpu_percent.expect("idle CPU threshold set");
    let lifetime = l.lifetime_seconds.expect("lifetime set");
    let max = l.max_lifetime_seconds.expect("max lifetime set");
    assert!(within(idle, limits.idle_timeout), "idle timeout {idle}");
    assert!(
        cpu >= limits.idle_cpu_percent && cpu <= 100.0,
        "idle CPU threshold {cpu}"
    );
    assert!(within(max, limits.max_lifetime), "max lifetime {max}");
    assert!(within(lifetime, max), "lifetime {lifetime} above {max}");
    let copy = h.copy_limit_mb.expect("copy limit set");
    assert!(
        (1..=limits.copy_limit_mb).contains(&copy),
        "copy limit {copy}"
    );

    // What is signed is what is applied: the digest survives transport.
    let bytes = h.encode_to_vec();
    let transported = ContainerSpec::decode(bytes.as_slice()).expect("hardened spec decodes");
    assert_eq!(
        transported.encode_to_vec(),
        bytes,
        "encoding is a fixed point"
    );
    assert_eq!(
        vibebox_clearance::spec_digest(&transported),
        vibebox_clearance::spec_digest(h)
    );

    // Hardening is idempotent: the hardened spec is allowed as it is and
    // hardens to itself (the platform's own mounts may push it over the
    // mount count, which is the only acceptable complaint).
    let again = evaluate(policy.rules_for(team), h);
    assert!(
        again
            .violations
            .iter()
            .all(|v| v.rule == Rule::MountTooMany),
        "hardened spec is denied: {:?}",
        again.violations
    );
    if let Some(h2) = &again.hardened {
        assert_eq!(h2.encode_to_vec(), bytes, "hardening is idempotent");
    }
}
