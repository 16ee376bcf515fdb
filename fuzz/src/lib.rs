//! Fixtures shared by the fuzz targets (`fuzz_targets/*.rs`) and the seed
//! generator (`examples/seeds.rs`): the policies the targets judge under,
//! fixed test keys, and an independent oracle for what every hardened spec
//! must satisfy.
//!
//! The keys here are public test keys: they sign fuzz seeds and nothing else.

use std::sync::OnceLock;

use prost::Message;
use vibebox_audit_chain::{CheckpointSigner, Event, ExportLine, GENESIS_HASH};
use vibebox_policy::document::{DOCKER_SOCKETS, PolicyDocument, SENSITIVE_PATHS};
use vibebox_policy::image::{ImagePattern, ImageRef, ListKind};
use vibebox_policy::path;
use vibebox_policy::{Outcome, Policy, Rule, evaluate};
use vibebox_proto::environment::{ContainerSpec, MountType};

/// A realistic policy file: bind prefixes, allowed capabilities, published
/// ports, a sysctl and a tightening team overlay (`acme`).
pub const POLICY_TOML: &str = r#"version = "fuzz-2026-11-28"

[images]
allow = ["*"]
deny = ["docker:*", "dind:*", "*:latest", "ghcr.io/evil/*"]

[mounts]
allow_bind_prefixes = ["/srv/projects", "/home"]
extra_sensitive_paths = ["/srv/projects/secrets"]
max_mounts = 8
max_tmpfs_mb = 1024
default_tmpfs_mb = 256

[capabilities]
allow_add = ["NET_BIND_SERVICE", "cap_chown"]

[user]
default_uid = 1000
default_gid = 1000
allow_names = false

[network]
allow_published_ports = true

[sysctls]
allow = ["net.ipv4.ping_group_range"]

[resources]
default_cpus = 1.0
default_memory_mb = 2048
default_pids = 512
max_cpus = 4.0
max_memory_mb = 8192
max_pids = 2048

[filesystem]
read_only_root = false
workspace_path = "/workspace"

[teams.acme]
allow_images = ["ghcr.io/acme/*", "python:*"]
deny_images = ["node:*"]
allow_bind_prefixes = ["/srv/projects/acme"]
allow_cap_add = ["CHOWN"]
max_cpus = 2.0
max_memory_mb = 4096
max_pids = 1024
max_mounts = 4
read_only_root = true
"#;

/// [`POLICY_TOML`], compiled once.
pub fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| Policy::from_toml(POLICY_TOML).expect("POLICY_TOML is valid"))
}

/// [`POLICY_TOML`] with user names allowed.
pub fn names_policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let mut doc = policy().document().clone();
        doc.user.allow_names = true;
        Policy::from_document(doc).expect("valid")
    })
}

/// A policy whose only bind prefix is `/`: every bind is judged by the
/// socket and sensitive-path rules alone.
pub fn root_prefix_policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let mut doc = PolicyDocument::default();
        doc.mounts.allow_bind_prefixes = vec!["/".into()];
        Policy::from_document(doc).expect("valid")
    })
}

/// Identity root key (key id [`TOKEN_KEY_ID`]) of the token seeds.
pub const TOKEN_ROOT_KEY: [u8; 32] = [0x42; 32];
pub const TOKEN_KEY_ID: u32 = 1;
pub const TOKEN_USER: &str = "fuzz-user";
pub const TOKEN_ID: &str = "fuzz-token";

pub fn token_root() -> vibebox_token::RootKey {
    vibebox_token::RootKey::from_private_bytes(TOKEN_KEY_ID, &TOKEN_ROOT_KEY).expect("valid key")
}

pub fn token_ring() -> &'static vibebox_token::KeyRing {
    static RING: OnceLock<vibebox_token::KeyRing> = OnceLock::new();
    RING.get_or_init(|| {
        let mut ring = vibebox_token::KeyRing::new();
        ring.insert(TOKEN_KEY_ID, &token_root().public_key_bytes())
            .expect("valid key");
        ring
    })
}

/// A token for [`TOKEN_USER`] / [`TOKEN_ID`], expiring in 2100.
pub fn mint_token() -> String {
    let expires = chrono::DateTime::from_timestamp(4_102_444_800, 0).expect("valid time");
    let claims = vibebox_token::Claims::new(TOKEN_USER, TOKEN_ID, expires);
    vibebox_token::mint(&token_root(), &claims).expect("mint")
}

/// The audit checkpoint key of the export seeds (PKCS#8, seed bytes 0x11).
pub const CHECKPOINT_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\n\
MC4CAQAwBQYDK2VwBCIEIBERERERERERERERERERERERERERERERERERERERERER\n\
-----END PRIVATE KEY-----\n";

pub fn checkpoint_signer() -> &'static CheckpointSigner {
    static SIGNER: OnceLock<CheckpointSigner> = OnceLock::new();
    SIGNER.get_or_init(|| CheckpointSigner::from_pkcs8_pem(CHECKPOINT_KEY_PEM).expect("valid key"))
}

/// Events in the seed chain.
pub const SEED_CHAIN_LEN: u64 = 6;

/// The seed chain's events (deterministic, sealed from the genesis hash).
pub fn seed_events() -> Vec<Event> {
    let mut prev = GENESIS_HASH.to_owned();
    (1..=SEED_CHAIN_LEN)
        .map(|seq| {
            let action = ["environment.create", "policy.deny", "token.create"][(seq % 3) as usize];
            let mut event: Event = serde_json::from_value(serde_json::json!({
                "id": format!("01938f2a-0000-7000-8000-{seq:012}"),
                "sequence": 0,
                "time": format!("2026-11-28T10:00:{:02}.{:09}Z", seq, seq * 123_456),
                "actor": {"user_id": "u-1", "token_id": "t-1", "service": ""},
                "team_id": "team-a",
                "action": action,
                "resource_type": "environment",
                "resource_id": format!("env-{seq}"),
                "outcome": if seq % 3 == 1 { "denied" } else { "success" },
                "severity": if seq % 3 == 1 { "critical" } else { "low" },
                "details": {
                    "image": "docker.io/library/python:3.12",
                    "rules": ["mount.docker_socket"],
                    "cpus": 1.5,
                    "n": seq,
                    "nested": {"é": "\u{1}\"\\", "big": 9_007_199_254_740_993u64, "neg": -0.0}
                },
                "source_service": "policy",
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                "request_id": format!("req-{seq}"),
                "client_address": "127.0.0.1:50000"
            }))
            .expect("valid event");
            event.seal(seq, &prev);
            prev = event.hash.clone();
            event
        })
        .collect()
}

/// Every `(sequence, hash)` of the seed chain: the only heads a checkpoint
/// signed by [`checkpoint_signer`] can vouch for.
pub fn seed_heads() -> &'static [(u64, String)] {
    static HEADS: OnceLock<Vec<(u64, String)>> = OnceLock::new();
    HEADS.get_or_init(|| {
        seed_events()
            .into_iter()
            .map(|e| (e.sequence, e.hash))
            .collect()
    })
}

/// The seed chain as export lines, a checkpoint after every `every` events.
pub fn seed_export(every: u64) -> Vec<ExportLine> {
    let mut out = Vec::new();
    for e in seed_events() {
        let (seq, hash) = (e.sequence, e.hash.clone());
        out.push(ExportLine::Event(e));
        if seq % every == 0 || seq == SEED_CHAIN_LEN {
            out.push(ExportLine::Checkpoint(checkpoint_signer().sign(seq, &hash)));
        }
    }
    out
}

/// `CAP_SYS_ADMIN`, ` sys_admin ` → `SYS_ADMIN` (the documented spelling rule).
pub fn capability_name(cap: &str) -> String {
    let c = cap.trim().to_ascii_uppercase();
    c.strip_prefix("CAP_").map(str::to_owned).unwrap_or(c)
}

/// What a team may get under a document, recomputed from the document
/// itself (independently of the engine's compiled rules).
#[derive(Debug)]
pub struct Limits {
    deny: Vec<ImagePattern>,
    caps: Vec<String>,
    bind_prefixes: Vec<String>,
    sensitive: Vec<String>,
    sysctls: Vec<String>,
    max_tmpfs_mb: i64,
    max_cpus: f64,
    max_memory_mb: i64,
    max_pids: i64,
    allow_names: bool,
    allow_ports: bool,
    read_only_root: bool,
    workspace: String,
}

impl Limits {
    /// The limits of `team` (the base policy when it has no overlay).
    pub fn of(doc: &PolicyDocument, team: &str) -> Self {
        let norm = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|p| path::normalize(p).expect("validated"))
                .collect()
        };
        let mut limits = Limits {
            deny: patterns(&doc.images.deny, ListKind::Deny),
            caps: doc
                .capabilities
                .allow_add
                .iter()
                .map(|c| capability_name(c))
                .collect(),
            bind_prefixes: norm(&doc.mounts.allow_bind_prefixes),
            sensitive: SENSITIVE_PATHS
                .iter()
                .map(|s| (*s).to_owned())
                .chain(norm(&doc.mounts.extra_sensitive_paths))
                .collect(),
            sysctls: doc.sysctls.allow.clone(),
            max_tmpfs_mb: doc.mounts.max_tmpfs_mb,
            max_cpus: doc.resources.max_cpus,
            max_memory_mb: doc.resources.max_memory_mb,
            max_pids: doc.resources.max_pids,
            allow_names: doc.user.allow_names,
            allow_ports: doc.network.allow_published_ports,
            read_only_root: doc.filesystem.read_only_root,
            workspace: path::normalize(&doc.filesystem.workspace_path).expect("validated"),
        };
        if let Some(o) = doc.teams.get(team) {
            limits.deny.extend(patterns(&o.deny_images, ListKind::Deny));
            if let Some(caps) = &o.allow_cap_add {
                limits.caps = caps.iter().map(|c| capability_name(c)).collect();
            }
            if let Some(p) = &o.allow_bind_prefixes {
                limits.bind_prefixes = norm(p);
            }
            if let Some(s) = &o.allow_sysctls {
                limits.sysctls = s.clone();
            }
            limits.max_cpus = o.max_cpus.unwrap_or(limits.max_cpus);
            limits.max_memory_mb = o.max_memory_mb.unwrap_or(limits.max_memory_mb);
            limits.max_pids = o.max_pids.unwrap_or(limits.max_pids);
            limits.allow_ports = o.allow_published_ports.unwrap_or(limits.allow_ports);
            limits.read_only_root = o.read_only_root.unwrap_or(limits.read_only_root);
        }
        limits
    }
}

fn patterns(list: &[String], kind: ListKind) -> Vec<ImagePattern> {
    list.iter()
        .map(|p| ImagePattern::new(p, kind).expect("validated"))
        .collect()
}

/// Whether a normalized host path is a Docker socket location, holds one or
/// lies in one, or names a `*.sock` (ignoring ASCII case).
pub fn is_socket_path(p: &str) -> bool {
    let lower = p.to_ascii_lowercase();
    DOCKER_SOCKETS
        .iter()
        .any(|s| path::overlaps_ignore_case(&lower, s))
        || lower
            .rsplit('/')
            .next()
            .is_some_and(|n| n.ends_with(".sock"))
}

/// `"uid"`-style side of a user spec that means root.
fn is_root_side(side: &str) -> bool {
    side.eq_ignore_ascii_case("root")
        || (!side.is_empty()
            && side.bytes().all(|b| b.is_ascii_digit())
            && side.bytes().all(|b| b == b'0'))
}

/// Checks an outcome of evaluating `spec` for `team` under `policy`:
/// every invariant of a hardened spec (README of the policy crate), the
/// denials that no document can lift, and that hardening is idempotent and
/// its digest survives a protobuf round trip.
pub fn check_outcome(policy: &Policy, team: &str, spec: &ContainerSpec, outcome: &Outcome) {
    let limits = Limits::of(policy.document(), team);
    assert_eq!(
        outcome.allowed(),
        outcome.hardened.is_some(),
        "a hardened spec exactly when allowed"
    );
    // Denials no document can lift.
    if spec.privileged {
        assert!(outcome.has(Rule::Privileged));
    }
    if spec.user.as_deref().is_some_and(|u| {
        let (uid, gid) = u.split_once(':').unwrap_or((u, ""));
        is_root_side(uid) || is_root_side(gid)
    }) {
        assert!(!outcome.allowed(), "root user {:?} allowed", spec.user);
    }
    for m in &spec.mounts {
        if m.r#type == MountType::Bind as i32
            && path::normalize(&m.source).is_ok_and(|s| is_socket_path(&s))
        {
            assert!(
                outcome.has(Rule::MountDockerSocket),
                "socket bind {:?} not denied as such",
                m.source
            );
        }
    }
    let Some(h) = &outcome.hardened else {
        assert!(!outcome.violations.is_empty());
        return;
    };

    // The image is canonical, allowed and not denied.
    let image = ImageRef::parse(&h.image).expect("hardened image parses");
    assert_eq!(image.canonical(), h.image, "hardened image is canonical");
    assert_eq!(outcome.canonical_image.as_deref(), Some(h.image.as_str()));
    assert!(
        !limits.deny.iter().any(|p| p.matches(&image)),
        "{} allowed despite a deny pattern",
        h.image
    );

    assert!(!h.privileged);
    assert_eq!(h.cap_drop, ["ALL"]);
    assert_eq!(h.security_opt, ["no-new-privileges"]);
    assert!(h.devices.is_empty());
    let mut sorted = h.cap_add.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, h.cap_add, "cap_add sorted and unique");
    for cap in &h.cap_add {
        assert!(
            limits.caps.contains(cap),
            "capability {cap:?} not in the allow list {:?}",
            limits.caps
        );
        assert!(cap != "ALL" && !cap.is_empty());
    }

    // The user: uid:gid, never root, numeric unless names are allowed.
    let user = h.user.as_deref().expect("hardened user is set");
    let (uid, gid) = user.split_once(':').expect("hardened user is uid:gid");
    for side in [uid, gid] {
        assert!(!side.is_empty() && !is_root_side(side), "user {user:?}");
        if side.bytes().all(|b| b.is_ascii_digit()) {
            let n: u32 = side.parse().expect("numeric side fits u32");
            assert_eq!(n.to_string(), side, "numeric side is canonical");
        } else {
            assert!(limits.allow_names, "name in {user:?} while names are off");
        }
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

    // Mounts: normalized, unique targets; binds only under a prefix, never
    // sensitive or a socket; the workspace is always there.
    let mut targets = Vec::new();
    for m in &h.mounts {
        assert_eq!(path::normalize(&m.target).as_deref(), Ok(m.target.as_str()));
        assert_ne!(m.target, "/");
        assert!(
            !targets.contains(&&m.target),
            "duplicate target {}",
            m.target
        );
        targets.push(&m.target);
        match MountType::try_from(m.r#type) {
            Ok(MountType::Bind) => {
                let s = &m.source;
                assert_eq!(path::normalize(s).as_deref(), Ok(s.as_str()), "bind source");
                assert!(!is_socket_path(s), "socket bind {s} allowed");
                assert!(
                    !limits
                        .sensitive
                        .iter()
                        .any(|p| path::overlaps_ignore_case(s, p)),
                    "sensitive bind {s} allowed"
                );
                assert!(
                    limits.bind_prefixes.iter().any(|p| path::is_within(s, p)),
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
