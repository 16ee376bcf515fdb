//! Writes the seed corpus, fuzz/corpus/<target>/seed-*: real image
//! references, socket path spellings, user strings, capability names, policy
//! files, tokens minted with the seed key, encoded create requests, audit
//! events and exports signed with the seed checkpoint key.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use prost::Message;
use vibebox_audit_chain::verify::to_json_line;
use vibebox_audit_chain::{ExportLine, GENESIS_HASH};
use vibebox_fuzz::{POLICY_TOML, check_outcome, mint_token, policy, seed_events, seed_export};
use vibebox_policy::Policy;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, Egress, EgressMode, EgressRule, Lifetime, Mount,
    MountType, PortMapping,
};

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn write(root: &Path, target: &str, name: &str, bytes: impl AsRef<[u8]>) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
}

fn lines(root: &Path, target: &str, items: &[&str]) {
    for (i, item) in items.iter().enumerate() {
        write(root, target, &format!("{i:02}"), item);
    }
}

fn mount(kind: MountType, source: &str, target: &str, size_mb: Option<i64>) -> Mount {
    Mount {
        r#type: kind as i32,
        source: source.into(),
        target: target.into(),
        read_only: false,
        size_mb,
    }
}

fn egress_rule(host: &str, cidr: &str, ports: &[u32]) -> EgressRule {
    EgressRule {
        host: host.into(),
        cidr: cidr.into(),
        ports: ports.to_vec(),
    }
}

fn main() {
    vibebox_fuzz::oracle::self_check();
    let root: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let python_digest = format!("python@{DIGEST}");
    let python_tag_digest = format!("ghcr.io/acme/app:1.2@{DIGEST}");

    lines(
        &root,
        "image_reference",
        &[
            "python",
            "python:3.12",
            "library/python:3.12-slim",
            "docker.io/library/python:3.12",
            "index.docker.io/library/docker:24-dind",
            "registry-1.docker.io/docker:cli",
            "mirror.example.com/library/docker:24",
            "Docker.IO/Library/Python:3.12",
            "ghcr.io/acme/tools/app:v1.2.3",
            "localhost:5000/a/b/c:1.0",
            "[::1]:5000/app:1",
            "10.0.0.1:5000/app:Tag_X",
            "my-reg.example.com/a__b/c-d.e:1",
            "vibebox/devbox:1",
            &python_digest,
            &python_tag_digest,
            "acme/dind:1",
            "docker:*",
            "*:latest",
            "ghcr.io/acme/*:v*",
            // Where the policy once disagreed with Docker's rules.
            "python@md5:0123456789abcdef0123456789abcdef",
            "[::ffff:10.0.0.1]:5000/app:1",
            "acme*/app:*",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ],
    );

    lines(
        &root,
        "host_path",
        &[
            "/var/run/docker.sock",
            "//var//run//docker.sock/",
            "/var/./run/../run/docker.sock",
            "/RUN/Docker.Sock",
            "/srv/projects/acme/../../../var/run/docker.sock",
            "/run/containerd/containerd.sock",
            "/var/run",
            "/var",
            "/",
            "/etc/passwd",
            "/ETC",
            "/var/lib/docker/volumes/x",
            "/home/dev/project",
            "/home/dev/app.sock",
            "/srv/projects/acme/app",
            "/srv/projects/secrets/key",
            "/srv/projects/Secrets",
            "/tmp/../etc",
            "relative/path",
            "/a/.../b",
        ],
    );

    lines(
        &root,
        "user_spec",
        &[
            "1000",
            "1000:1000",
            "0",
            "0:0",
            "000:1000",
            "1000:0",
            "root",
            "ROOT:1000",
            "1000:root",
            "nobody",
            "nobody:nogroup",
            "dev-user.1:staff",
            "4294967295:4294967295",
            "4294967296",
            "-1",
            "1000:",
            ":1000",
            "",
            "999",
            "1000:999",
            "60000:60001",
            "65534:65534",
        ],
    );

    lines(
        &root,
        "capability",
        &[
            "NET_BIND_SERVICE",
            "cap_chown",
            " Cap_Net_Bind_Service \nCHOWN",
            "SYS_ADMIN",
            "ALL",
            "cap_all",
            "CAP_",
            "NET_RAW\nchown",
        ],
    );

    write(&root, "policy_document", "realistic", POLICY_TOML);
    write(
        &root,
        "policy_document",
        "ids",
        "[user]\nmin_id = 2000\nmax_id = 3000\ndefault_uid = 2500\ndefault_gid = 2500\n\
         [images]\ndeny = [\"acme*/app:*\", \"*:latest\"]\n\
         [mounts]\nallow_bind_prefixes = [\"/srv\"]\n",
    );
    write(
        &root,
        "policy_document",
        "builtin",
        Policy::builtin().text(),
    );
    write(
        &root,
        "policy_document",
        "strict",
        "version = \"strict-1\"\n[filesystem]\nread_only_root = true\n\
         [images]\nallow = [\"ghcr.io/acme/*\", \"python:*\"]\n\
         [teams.\"team a\"]\nmax_mounts = 2\nmax_pids = 64\n",
    );

    let token = mint_token();
    let raw = base64::engine::general_purpose::URL_SAFE
        .decode(&token)
        .expect("tokens are base64url");
    let narrow = vibebox_token::attenuate(
        &token,
        &vibebox_token::Restriction::default()
            .team("team-a")
            .operations(["environment.list"]),
    )
    .expect("attenuate");
    write(
        &root,
        "token",
        "text",
        [&[0u8][..], token.as_bytes()].concat(),
    );
    write(
        &root,
        "token",
        "attenuated",
        [&[0u8][..], narrow.as_bytes()].concat(),
    );
    write(&root, "token", "raw", [&[1u8][..], &raw].concat());
    write(
        &root,
        "token",
        "restriction",
        b"\x02team-a\nenv-1\nenvironment.list,environment.create\n3600",
    );
    write(
        &root,
        "token",
        "restriction-op",
        b"\x02\n\nenvironment.list\n",
    );
    write(&root, "token", "garbage", b"\x00En0KCgp1c2VyKCJ1Iik");

    let benign = ContainerSpec {
        image: "python:3.12".into(),
        command: vec!["sleep".into(), "infinity".into()],
        env: BTreeMap::from([("LANG".into(), "C.UTF-8".into())]),
        labels: BTreeMap::from([("project".into(), "demo".into())]),
        ..Default::default()
    };
    let specs = [
        ("benign", "", benign.clone()),
        (
            "acme-strict",
            "acme",
            ContainerSpec {
                image: "ghcr.io/acme/app:1".into(),
                user: Some("1001:1001".into()),
                cap_add: vec!["cap_chown".into()],
                mounts: vec![
                    mount(MountType::Bind, "/srv/projects/acme/app", "/src", None),
                    mount(MountType::Tmpfs, "", "/cache", Some(64)),
                ],
                cpu_limit: Some(1.5),
                memory_limit_mb: Some(1024),
                pids_limit: Some(256),
                ..benign.clone()
            },
        ),
        (
            "ports",
            "team-b",
            ContainerSpec {
                ports: vec![PortMapping {
                    container_port: 8080,
                    host_port: 18080,
                    host_ip: String::new(),
                    protocol: "TCP".into(),
                }],
                sysctls: BTreeMap::from([("net.ipv4.ping_group_range".into(), "0 1".into())]),
                read_only_rootfs: Some(true),
                mounts: vec![mount(MountType::Volume, "cache", "/cache", None)],
                ..benign.clone()
            },
        ),
        (
            "socket",
            "team-b",
            ContainerSpec {
                mounts: vec![mount(
                    MountType::Bind,
                    "//var/run/./docker.sock",
                    "/var/run/docker.sock",
                    None,
                )],
                privileged: true,
                user: Some("0".into()),
                cap_add: vec!["SYS_ADMIN".into()],
                security_opt: vec!["seccomp:unconfined".into()],
                pid_mode: "host".into(),
                ..benign.clone()
            },
        ),
    ];
    let bound = |user: Option<&str>| ContainerSpec {
        image: "ghcr.io/acme/app:1".into(),
        user: user.map(str::to_owned),
        mounts: vec![mount(
            MountType::Bind,
            "/srv/projects/acme/app",
            "/src",
            None,
        )],
        ..benign.clone()
    };
    let more = [
        ("bind-platform-user", "acme", bound(None)),
        ("bind-bare-uid", "acme", bound(Some("1000"))),
        ("bind-other-user", "acme", bound(Some("1001:1000"))),
        (
            "reserved-target",
            "",
            ContainerSpec {
                mounts: vec![
                    mount(MountType::Tmpfs, "", "//proc/../proc/sys/", Some(16)),
                    mount(MountType::Volume, "data", "/etc/hosts", None),
                ],
                ..benign.clone()
            },
        ),
        (
            "user-range",
            "",
            ContainerSpec {
                user: Some("65534:65534".into()),
                ..benign.clone()
            },
        ),
        (
            "egress-narrowed",
            "",
            ContainerSpec {
                egress: Some(Egress {
                    mode: EgressMode::AllowList as i32,
                    allow: vec![
                        egress_rule("API.GitHub.com.", "", &[443]),
                        egress_rule("", "203.0.113.128/25", &[443]),
                        egress_rule("", "10.20.1.0/24", &[5432]),
                    ],
                }),
                lifetime: Some(Lifetime {
                    idle_timeout_seconds: Some(1800),
                    idle_cpu_percent: Some(10.0),
                    lifetime_seconds: Some(3 * 86_400),
                    max_lifetime_seconds: None,
                }),
                copy_limit_mb: Some(100),
                ..benign.clone()
            },
        ),
        (
            "egress-team-internet",
            "acme",
            ContainerSpec {
                image: "python:3.12".into(),
                egress: Some(Egress {
                    mode: EgressMode::Internet as i32,
                    allow: vec![egress_rule("", "10.20.0.0/24", &[5432])],
                }),
                ..benign.clone()
            },
        ),
        (
            "egress-forbidden",
            "",
            ContainerSpec {
                egress: Some(Egress {
                    mode: EgressMode::AllowList as i32,
                    allow: vec![
                        egress_rule("", "169.254.169.254", &[80]),
                        egress_rule("", "::1", &[]),
                        egress_rule("", "0.0.0.0/0", &[]),
                        egress_rule("*", "", &[]),
                    ],
                }),
                lifetime: Some(Lifetime {
                    idle_timeout_seconds: Some(0),
                    ..Default::default()
                }),
                copy_limit_mb: Some(1 << 40),
                ..benign.clone()
            },
        ),
    ];
    for (name, team, spec) in specs.into_iter().chain(more) {
        // Every request seed is judged by the oracle as the fuzzer will.
        let outcome = vibebox_policy::evaluate(policy().rules_for(team), &spec);
        check_outcome(policy(), team, &spec, &outcome);
        let request = CreateEnvironmentRequest {
            request_id: format!("req-{name}"),
            team_id: team.into(),
            name: format!("env-{name}"),
            spec: Some(spec),
        };
        write(&root, "request_decode", name, request.encode_to_vec());
    }

    let export =
        |lines: &[ExportLine]| -> String { lines.iter().map(|l| to_json_line(l) + "\n").collect() };
    let full = seed_export(3);
    write(&root, "audit_export", "chain", export(&full));
    write(&root, "audit_export", "range", export(&full[4..]));
    let mut tampered = full.clone();
    if let ExportLine::Event(e) = &mut tampered[1] {
        e.actor.user_id = "someone-else".into();
    }
    write(&root, "audit_export", "tampered", export(&tampered));
    write(
        &root,
        "audit_export",
        "unsigned-tail",
        export(&full[..full.len() - 1]),
    );

    for (i, event) in seed_events().iter().enumerate().take(3) {
        write(
            &root,
            "audit_event",
            &format!("event-{i}"),
            serde_json::to_string(event).expect("event json"),
        );
    }
    let mut fresh = seed_events().remove(0);
    fresh.seal(1, GENESIS_HASH);
    fresh.details = serde_json::from_str(
        r#"{"ctl":"\u0001\u001f\t\n\u007f","𝄞":1e21,"":[1,2.5,-0.0,1e-7,true,null],"big":18446744073709551615}"#,
    )
    .expect("details");
    write(
        &root,
        "audit_event",
        "details",
        serde_json::to_string(&fresh).expect("event json"),
    );
    write(&root, "audit_event", "checkpoint", to_json_line(&full[3]));
    lines(
        &root,
        "list_filter",
        &[
            "state = RUNNING AND labels.ci = \"true\" AND create_time > \"2026-01-01T00:00:00Z\"",
            "(state = RUNNING OR state = STOPPED) AND owner_id = alice",
            "NOT labels:ci OR -name = 'web-*'",
            "update_time >= \"2026-01-01T00:00:00.123+01:00\"",
            "labels.example.com/team:* AND image = ghcr.io/acme/app:1.0",
            "name != \"a\\*b*\" AND id <= e",
            "((((name = x))))",
            "state = ENVIRONMENT_STATE_DELETED",
            "name desc, create_time",
            "state asc,update_time DESC",
            "state = RUNNING AND name = x OR owner_id = y",
        ],
    );
    println!("seeds written to {}", root.display());
}
