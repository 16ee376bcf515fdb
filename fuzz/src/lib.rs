//! Fixtures shared by the fuzz targets (`fuzz_targets/*.rs`) and the seed
//! generator (`examples/seeds.rs`): the policies the targets judge under,
//! fixed test keys, and (in [`oracle`]) an independently written oracle for
//! what every outcome of the policy engine must satisfy.
//!
//! The keys here are public test keys: they sign fuzz seeds and nothing else.

use std::sync::OnceLock;

use vibebox_audit_chain::{CheckpointSigner, Event, ExportLine, GENESIS_HASH};
use vibebox_policy::Policy;
use vibebox_policy::document::PolicyDocument;

pub mod oracle;

pub use oracle::{Limits, capability_name, check_outcome, is_socket_path};

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

[egress]
mode = "allow-list"
allow = [
    { host = "*.github.com", ports = [443] },
    { host = "pypi.org" },
    { cidr = "203.0.113.0/24", ports = [80, 443] },
    { cidr = "10.20.0.0/16", ports = [5432] },
    { cidr = "2001:db8::/32" },
]

[lifetime]
idle_timeout = "2h"
idle_cpu_percent = 5.0
lifetime = "1d"
max_lifetime = "7d"

[files]
copy_limit_mb = 512

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

[teams.acme.egress]
mode = "internet"
allow = [{ cidr = "10.20.0.0/16", ports = [5432] }]

[teams.acme.lifetime]
idle_timeout = "30m"
max_lifetime = "2d"

[teams.acme.files]
copy_limit_mb = 64
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
