//! Table tests for every rule (spelling variants included), hardening, and
//! property tests that no spec holding a forbidden element is ever allowed.

use std::collections::BTreeMap;

use proptest::prelude::*;
use vibebox_proto::environment::{ContainerSpec, Device, Mount, MountType, PortMapping};

use crate::document::Policy;
use crate::engine::{Outcome, evaluate};
use crate::rules::{Rule, Severity};

fn benign() -> ContainerSpec {
    ContainerSpec {
        image: "python:3.12".into(),
        command: vec!["sleep".into(), "infinity".into()],
        env: BTreeMap::from([("LANG".into(), "C.UTF-8".into())]),
        labels: BTreeMap::from([("project".into(), "demo".into())]),
        ..Default::default()
    }
}

fn eval(spec: &ContainerSpec) -> Outcome {
    evaluate(Policy::builtin().rules_for(""), spec)
}

fn eval_with(policy: &str, team: &str, spec: &ContainerSpec) -> Outcome {
    evaluate(Policy::from_toml(policy).unwrap().rules_for(team), spec)
}

fn bind(source: &str) -> Mount {
    Mount {
        r#type: MountType::Bind as i32,
        source: source.into(),
        target: "/mnt/x".into(),
        read_only: false,
        size_mb: None,
    }
}

fn ids(o: &Outcome) -> Vec<&'static str> {
    o.violations.iter().map(|v| v.rule.id()).collect()
}

#[track_caller]
fn assert_denied(spec: &ContainerSpec, rule: Rule) {
    let o = eval(spec);
    assert!(!o.allowed(), "expected {rule} for {spec:?}");
    assert!(
        o.has(rule),
        "expected {rule}, got {:?} for {spec:?}",
        ids(&o)
    );
    assert!(o.hardened.is_none());
}

#[test]
fn benign_spec_is_allowed_and_hardened() {
    let o = eval(&benign());
    assert!(o.allowed(), "{:?}", o.violations);
    let h = o.hardened.unwrap();
    assert_eq!(h.image, "docker.io/library/python:3.12");
    assert_eq!(
        o.canonical_image.as_deref(),
        Some("docker.io/library/python:3.12")
    );
    assert_eq!(h.user.as_deref(), Some("1000:1000"));
    assert_eq!(h.cap_drop, vec!["ALL"]);
    assert!(h.cap_add.is_empty());
    assert_eq!(h.security_opt, vec!["no-new-privileges"]);
    assert_eq!(h.cpu_limit, Some(2.0));
    assert_eq!(h.memory_limit_mb, Some(4096));
    assert_eq!(h.pids_limit, Some(1024));
    assert_eq!(h.read_only_rootfs, Some(false));
    assert!(!h.privileged);
    assert_eq!(h.mounts.len(), 1);
    assert_eq!(h.mounts[0].target, "/workspace");
    assert_eq!(h.mounts[0].source, "");
    assert_eq!(h.mounts[0].r#type, MountType::Volume as i32);
    assert_eq!(h.command, benign().command);
    assert_eq!(h.labels, benign().labels);
    // Hardening is idempotent: the hardened spec is allowed and unchanged.
    let again = eval(&h);
    assert!(again.allowed());
    assert_eq!(again.hardened.unwrap(), h);
}

#[test]
fn read_only_profile_adds_tmpfs() {
    let o = eval_with("[filesystem]\nread_only_root = true", "", &benign());
    let h = o.hardened.unwrap();
    assert_eq!(h.read_only_rootfs, Some(true));
    let tmp = h.mounts.iter().find(|m| m.target == "/tmp").unwrap();
    assert_eq!(tmp.r#type, MountType::Tmpfs as i32);
    assert_eq!(tmp.size_mb, Some(512));
    let mut writable = benign();
    writable.read_only_rootfs = Some(false);
    let o = eval_with("[filesystem]\nread_only_root = true", "", &writable);
    assert!(o.has(Rule::RootfsWritable));
}

#[test]
fn images() {
    for image in [
        "docker:24-dind",
        "docker",
        "DOCKER:24-DIND",
        "docker:latest",
        "library/docker:24",
        "docker.io/library/docker:24-dind",
        "index.docker.io/library/docker:24",
        "docker.io/docker:dind",
        "mirror.local:5000/library/docker:24-dind",
        "dind:1",
        "acme/dind:2",
        "python",
        "python:latest",
        "ghcr.io/acme/app",
    ] {
        let spec = ContainerSpec {
            image: image.into(),
            ..benign()
        };
        assert_denied(&spec, Rule::ImageDenied);
    }
    for image in [
        "",
        " python:3",
        "Python:3 ",
        "python:",
        "py//thon:1",
        "python@sha256:xyz",
        "bad host/x:1",
    ] {
        let spec = ContainerSpec {
            image: image.into(),
            ..benign()
        };
        assert_denied(&spec, Rule::ImageInvalid);
    }
    let team = "[teams.acme]\nallow_images = [\"ghcr.io/acme/*\"]\ndeny_images = [\"node:*\"]";
    let spec = ContainerSpec {
        image: "python:3.12".into(),
        ..benign()
    };
    assert!(eval_with(team, "acme", &spec).has(Rule::ImageNotAllowed));
    assert!(eval_with(team, "other", &spec).allowed());
    let spec = ContainerSpec {
        image: "ghcr.io/acme/app:1".into(),
        ..benign()
    };
    assert!(eval_with(team, "acme", &spec).allowed());
    let spec = ContainerSpec {
        image: "node:20".into(),
        ..benign()
    };
    assert!(eval_with(team, "acme", &spec).has(Rule::ImageDenied));
    let base = "[images]\nallow = [\"python:*\"]";
    let spec = ContainerSpec {
        image: "ruby:3".into(),
        ..benign()
    };
    assert!(eval_with(base, "", &spec).has(Rule::ImageNotAllowed));
}

#[test]
fn docker_socket_mounts_in_every_spelling() {
    for source in [
        "/var/run/docker.sock",
        "/run/docker.sock",
        "//var//run//docker.sock",
        "/var/run/docker.sock/",
        "/var/./run/docker.sock",
        "/var/lib/../run/docker.sock",
        "/tmp/../../var/run/docker.sock",
        "/VAR/RUN/DOCKER.SOCK",
        "/var/run",
        "/var/run/",
        "/run",
        "/var",
        "/",
        "/var/run/docker",
        "/run/containerd/containerd.sock",
        "/home/dev/docker.sock",
        "/srv/podman.sock",
    ] {
        let spec = ContainerSpec {
            mounts: vec![bind(source)],
            ..benign()
        };
        assert_denied(&spec, Rule::MountDockerSocket);
        let o = eval(&spec);
        assert_eq!(o.severity(), Some(Severity::Critical), "{source}");
        let v = &o.violations[0];
        assert_eq!(v.field, "spec.mounts[0].source");
        assert_eq!(v.cis, "5.31");
    }
    // Even when bind mounts are allowed under a prefix that contains it.
    let policy = "[mounts]\nallow_bind_prefixes = [\"/home\"]";
    let spec = ContainerSpec {
        mounts: vec![bind("/home/dev/../dev/docker.sock")],
        ..benign()
    };
    assert!(eval_with(policy, "", &spec).has(Rule::MountDockerSocket));
}

/// Found by the `request_decode` fuzzer: an invalid target used to skip the
/// source checks, so a socket mount was reported as a low-severity malformed
/// mount (and not audited as critical).
#[test]
fn socket_mount_with_a_bad_target_is_still_a_socket_mount() {
    for target in ["relative/target", "/", ""] {
        let spec = ContainerSpec {
            mounts: vec![Mount {
                target: target.into(),
                ..bind("//r/vraun/./docker.sock")
            }],
            ..benign()
        };
        let o = eval(&spec);
        assert!(o.has(Rule::MountInvalid), "{target:?}: {:?}", ids(&o));
        assert!(o.has(Rule::MountDockerSocket), "{target:?}: {:?}", ids(&o));
        assert_eq!(o.severity(), Some(Severity::Critical));
        assert!(!o.only_invalid());
    }
}

#[test]
fn sensitive_and_unlisted_bind_mounts() {
    for source in [
        "/etc",
        "/etc/",
        "/ETC/shadow",
        "/proc/1/root",
        "/sys",
        "/dev",
        "/boot",
        "/lib",
        "/usr/bin",
        "/var/lib/docker",
        "/var/lib/docker/volumes",
        "/root/.ssh",
        "/var/lib",
        "/usr/../etc",
    ] {
        let spec = ContainerSpec {
            mounts: vec![bind(source)],
            ..benign()
        };
        assert_denied(&spec, Rule::MountSensitivePath);
    }
    let spec = ContainerSpec {
        mounts: vec![bind("/home/dev/project")],
        ..benign()
    };
    assert_denied(&spec, Rule::MountBindNotAllowed);
    let policy = "[mounts]\nallow_bind_prefixes = [\"/home/dev\"]\nextra_sensitive_paths = [\"/home/dev/secrets\"]";
    let o = eval_with(policy, "", &spec);
    assert!(o.allowed(), "{:?}", o.violations);
    let spec = ContainerSpec {
        mounts: vec![bind("/home/dev/../other")],
        ..benign()
    };
    assert!(eval_with(policy, "", &spec).has(Rule::MountBindNotAllowed));
    let spec = ContainerSpec {
        mounts: vec![bind("/home/dev/secrets/x")],
        ..benign()
    };
    assert!(eval_with(policy, "", &spec).has(Rule::MountSensitivePath));
    let spec = ContainerSpec {
        mounts: vec![bind("/home/developer")],
        ..benign()
    };
    assert!(eval_with(policy, "", &spec).has(Rule::MountBindNotAllowed));
    // Normalized source in the hardened spec.
    let spec = ContainerSpec {
        mounts: vec![bind("/home/dev//project/")],
        ..benign()
    };
    let h = eval_with(policy, "", &spec).hardened.unwrap();
    assert_eq!(h.mounts[0].source, "/home/dev/project");
    for source in ["relative/path", "", "/a\0b"] {
        let spec = ContainerSpec {
            mounts: vec![bind(source)],
            ..benign()
        };
        assert_denied(&spec, Rule::MountInvalid);
    }
}

#[test]
fn volumes_tmpfs_and_mount_shape() {
    let vol = |source: &str| Mount {
        r#type: MountType::Volume as i32,
        source: source.into(),
        target: "/data".into(),
        read_only: false,
        size_mb: None,
    };
    assert!(
        eval(&ContainerSpec {
            mounts: vec![vol("cache")],
            ..benign()
        })
        .allowed()
    );
    for s in ["vibebox-env-123-workspace", "VibeBox_x"] {
        assert_denied(
            &ContainerSpec {
                mounts: vec![vol(s)],
                ..benign()
            },
            Rule::MountVolumeReserved,
        );
    }
    for s in ["/etc", "../x", "-x"] {
        assert_denied(
            &ContainerSpec {
                mounts: vec![vol(s)],
                ..benign()
            },
            Rule::MountInvalid,
        );
    }
    let tmpfs = |size: Option<i64>| Mount {
        r#type: MountType::Tmpfs as i32,
        source: String::new(),
        target: "/scratch".into(),
        read_only: false,
        size_mb: size,
    };
    let h = eval(&ContainerSpec {
        mounts: vec![tmpfs(None)],
        ..benign()
    })
    .hardened
    .unwrap();
    assert_eq!(h.mounts[0].size_mb, Some(512));
    for size in [0, -1, 100_000] {
        assert_denied(
            &ContainerSpec {
                mounts: vec![tmpfs(Some(size))],
                ..benign()
            },
            Rule::MountTmpfsSize,
        );
    }
    let unspecified = Mount {
        r#type: 0,
        ..vol("x")
    };
    assert_denied(
        &ContainerSpec {
            mounts: vec![unspecified],
            ..benign()
        },
        Rule::MountInvalid,
    );
    let unknown = Mount {
        r#type: 42,
        ..vol("x")
    };
    assert_denied(
        &ContainerSpec {
            mounts: vec![unknown],
            ..benign()
        },
        Rule::MountInvalid,
    );
    for target in ["", "/", "relative", "/.."] {
        let m = Mount {
            target: target.into(),
            ..vol("x")
        };
        assert_denied(
            &ContainerSpec {
                mounts: vec![m],
                ..benign()
            },
            Rule::MountInvalid,
        );
    }
    let dup = vec![
        vol("a"),
        Mount {
            target: "/data/".into(),
            ..vol("b")
        },
    ];
    assert_denied(
        &ContainerSpec {
            mounts: dup,
            ..benign()
        },
        Rule::MountInvalid,
    );
    let many = (0..17)
        .map(|i| Mount {
            target: format!("/d{i}"),
            ..vol("x")
        })
        .collect();
    assert_denied(
        &ContainerSpec {
            mounts: many,
            ..benign()
        },
        Rule::MountTooMany,
    );
}

#[test]
fn privileged_is_critical() {
    let spec = ContainerSpec {
        privileged: true,
        ..benign()
    };
    assert_denied(&spec, Rule::Privileged);
    let o = eval(&spec);
    assert_eq!(o.severity(), Some(Severity::Critical));
    assert_eq!(o.violations[0].cis, "5.4");
    assert_eq!(o.violations[0].pss, "Privileged Containers");
}

#[test]
fn capabilities() {
    for cap in [
        "SYS_ADMIN",
        "sys_admin",
        "CAP_SYS_ADMIN",
        "cap_sys_admin",
        " Sys_Admin ",
        "ALL",
        "all",
        "NET_ADMIN",
        "",
    ] {
        let spec = ContainerSpec {
            cap_add: vec![cap.into()],
            ..benign()
        };
        assert_denied(&spec, Rule::CapabilityAdd);
    }
    let policy = "[capabilities]\nallow_add = [\"NET_BIND_SERVICE\"]";
    let spec = ContainerSpec {
        cap_add: vec!["cap_net_bind_service".into()],
        ..benign()
    };
    let h = eval_with(policy, "", &spec).hardened.unwrap();
    assert_eq!(h.cap_add, vec!["NET_BIND_SERVICE"]);
    assert_eq!(h.cap_drop, vec!["ALL"]);
    let spec = ContainerSpec {
        cap_add: vec!["ALL".into()],
        ..benign()
    };
    assert!(eval_with(policy, "", &spec).has(Rule::CapabilityAdd));
    // A user's cap_drop cannot replace ALL.
    let spec = ContainerSpec {
        cap_drop: vec!["NET_RAW".into()],
        ..benign()
    };
    assert_eq!(eval(&spec).hardened.unwrap().cap_drop, vec!["ALL"]);
}

#[test]
fn users() {
    for user in [
        "root",
        "ROOT",
        "0",
        "00",
        "0:0",
        "0:1000",
        "1000:0",
        "root:root",
        "1000:root",
        "dev:0",
    ] {
        let spec = ContainerSpec {
            user: Some(user.into()),
            ..benign()
        };
        assert_denied(&spec, Rule::UserRoot);
    }
    for user in ["dev", "dev:dev", "1000:staff"] {
        let spec = ContainerSpec {
            user: Some(user.into()),
            ..benign()
        };
        assert_denied(&spec, Rule::UserName);
    }
    for user in [
        ":",
        "1000:",
        ":1000",
        "-1",
        "99999999999",
        "4294967295",
        "1000:2147483648",
        "a b",
        "1:2:3",
        "+0",
    ] {
        let spec = ContainerSpec {
            user: Some(user.into()),
            ..benign()
        };
        assert_denied(&spec, Rule::UserInvalid);
    }
    let harden = |user: Option<&str>| {
        eval(&ContainerSpec {
            user: user.map(str::to_owned),
            ..benign()
        })
        .hardened
        .unwrap()
        .user
        .unwrap()
    };
    assert_eq!(harden(None), "1000:1000");
    assert_eq!(harden(Some("")), "1000:1000");
    assert_eq!(harden(Some("1001")), "1001:1000");
    assert_eq!(harden(Some("01001:02000")), "1001:2000");
    let named = "[user]\nallow_names = true";
    let spec = ContainerSpec {
        user: Some("dev:staff".into()),
        ..benign()
    };
    assert_eq!(
        eval_with(named, "", &spec)
            .hardened
            .unwrap()
            .user
            .as_deref(),
        Some("dev:staff")
    );
    let spec = ContainerSpec {
        user: Some("Root".into()),
        ..benign()
    };
    assert!(eval_with(named, "", &spec).has(Rule::UserRoot));
}

#[test]
fn namespaces_and_network() {
    type Setter = fn(&mut ContainerSpec, &str);
    let cases: [(Setter, Rule, &[&str]); 6] = [
        (
            |s, v| s.network_mode = v.into(),
            Rule::NetworkMode,
            &[
                "host",
                "HOST",
                "bridge",
                "container:abc",
                "none",
                "default",
                " ",
            ],
        ),
        (
            |s, v| s.pid_mode = v.into(),
            Rule::NamespacePid,
            &["host", "Host", "container:abc", "private "],
        ),
        (
            |s, v| s.ipc_mode = v.into(),
            Rule::NamespaceIpc,
            &["host", "shareable", "container:abc"],
        ),
        (
            |s, v| s.uts_mode = v.into(),
            Rule::NamespaceUts,
            &["host", "HOST"],
        ),
        (
            |s, v| s.userns_mode = v.into(),
            Rule::NamespaceUserns,
            &["host", "Host"],
        ),
        (
            |s, v| s.cgroupns_mode = v.into(),
            Rule::NamespaceCgroupns,
            &["host", "HOST"],
        ),
    ];
    for (set, rule, values) in cases {
        for value in values {
            let mut spec = benign();
            set(&mut spec, value);
            assert_denied(&spec, rule);
        }
    }
    for ok in ["private", "none"] {
        let spec = ContainerSpec {
            ipc_mode: ok.into(),
            ..benign()
        };
        assert!(eval(&spec).allowed());
    }
}

#[test]
fn security_options() {
    for opt in [
        "seccomp=unconfined",
        "seccomp:unconfined",
        "SECCOMP=UNCONFINED",
        " seccomp = unconfined ",
        "apparmor=unconfined",
        "apparmor:unconfined",
        "label=disable",
        "label:disable",
        "systempaths=unconfined",
    ] {
        let spec = ContainerSpec {
            security_opt: vec![opt.into()],
            ..benign()
        };
        assert_denied(&spec, Rule::SecurityOptUnconfined);
    }
    for opt in [
        "no-new-privileges=false",
        "no-new-privileges:false",
        "seccomp=/tmp/profile.json",
        "label=type:spc_t",
        "apparmor=custom",
        "bogus",
    ] {
        let spec = ContainerSpec {
            security_opt: vec![opt.into()],
            ..benign()
        };
        assert_denied(&spec, Rule::SecurityOptNotAllowed);
    }
    for opt in [
        "no-new-privileges",
        "no-new-privileges=true",
        "no-new-privileges:true",
    ] {
        let spec = ContainerSpec {
            security_opt: vec![opt.into()],
            ..benign()
        };
        assert_eq!(
            eval(&spec).hardened.unwrap().security_opt,
            vec!["no-new-privileges"]
        );
    }
}

#[test]
fn devices_sysctls_labels_env() {
    let dev = Device {
        host_path: "/dev/fuse".into(),
        container_path: "/dev/fuse".into(),
        permissions: "rwm".into(),
    };
    assert_denied(
        &ContainerSpec {
            devices: vec![dev],
            ..benign()
        },
        Rule::Device,
    );
    let sysctls = BTreeMap::from([("net.ipv4.ip_forward".to_string(), "1".to_string())]);
    assert_denied(
        &ContainerSpec {
            sysctls: sysctls.clone(),
            ..benign()
        },
        Rule::Sysctl,
    );
    let policy = "[sysctls]\nallow = [\"net.ipv4.ip_forward\"]";
    assert!(
        eval_with(
            policy,
            "",
            &ContainerSpec {
                sysctls,
                ..benign()
            }
        )
        .allowed()
    );
    for key in [
        "vibebox.owner",
        "VIBEBOX.team",
        " vibebox.managed",
        "vibebox",
    ] {
        let labels = BTreeMap::from([(key.to_string(), "x".to_string())]);
        assert_denied(&ContainerSpec { labels, ..benign() }, Rule::LabelReserved);
    }
    let labels = BTreeMap::from([("vibeboxer".to_string(), "x".to_string())]);
    assert!(eval(&ContainerSpec { labels, ..benign() }).allowed());
    for key in ["", "A=B", "A\0"] {
        let env = BTreeMap::from([(key.to_string(), "x".to_string())]);
        assert_denied(&ContainerSpec { env, ..benign() }, Rule::EnvInvalid);
    }
    assert_denied(
        &ContainerSpec {
            working_dir: "relative".into(),
            ..benign()
        },
        Rule::WorkingDirInvalid,
    );
}

#[test]
fn ports() {
    let port = |host: u32, ip: &str, proto: &str| PortMapping {
        container_port: 8080,
        host_port: host,
        host_ip: ip.into(),
        protocol: proto.into(),
    };
    assert_denied(
        &ContainerSpec {
            ports: vec![port(8080, "", "")],
            ..benign()
        },
        Rule::PortPublish,
    );
    let policy = "[network]\nallow_published_ports = true";
    let o = eval_with(
        policy,
        "",
        &ContainerSpec {
            ports: vec![port(8080, "", "TCP")],
            ..benign()
        },
    );
    let h = o.hardened.unwrap();
    assert_eq!(h.ports[0].host_ip, "127.0.0.1");
    assert_eq!(h.ports[0].protocol, "tcp");
    for p in [port(80, "", ""), port(22, "0.0.0.0", "tcp")] {
        assert!(
            eval_with(
                policy,
                "",
                &ContainerSpec {
                    ports: vec![p],
                    ..benign()
                }
            )
            .has(Rule::PortPrivileged)
        );
    }
    for p in [
        port(70000, "", ""),
        port(8080, "nope", ""),
        port(8080, "", "sctp"),
        PortMapping {
            container_port: 0,
            ..port(8080, "", "")
        },
    ] {
        assert!(
            eval_with(
                policy,
                "",
                &ContainerSpec {
                    ports: vec![p],
                    ..benign()
                }
            )
            .has(Rule::PortInvalid)
        );
    }
}

#[test]
fn resources() {
    let cases: [(ContainerSpec, Rule); 11] = [
        (
            ContainerSpec {
                cpu_limit: Some(0.0),
                ..benign()
            },
            Rule::ResourcesUnlimited,
        ),
        (
            ContainerSpec {
                cpu_limit: Some(-1.0),
                ..benign()
            },
            Rule::ResourcesUnlimited,
        ),
        (
            ContainerSpec {
                cpu_limit: Some(64.0),
                ..benign()
            },
            Rule::ResourcesCeiling,
        ),
        (
            ContainerSpec {
                cpu_limit: Some(f64::NAN),
                ..benign()
            },
            Rule::ResourcesInvalid,
        ),
        (
            ContainerSpec {
                cpu_limit: Some(f64::INFINITY),
                ..benign()
            },
            Rule::ResourcesInvalid,
        ),
        (
            ContainerSpec {
                memory_limit_mb: Some(0),
                ..benign()
            },
            Rule::ResourcesUnlimited,
        ),
        (
            ContainerSpec {
                memory_limit_mb: Some(-1),
                ..benign()
            },
            Rule::ResourcesUnlimited,
        ),
        (
            ContainerSpec {
                memory_limit_mb: Some(1 << 40),
                ..benign()
            },
            Rule::ResourcesCeiling,
        ),
        (
            ContainerSpec {
                memory_limit_mb: Some(2),
                ..benign()
            },
            Rule::ResourcesInvalid,
        ),
        (
            ContainerSpec {
                pids_limit: Some(-1),
                ..benign()
            },
            Rule::ResourcesUnlimited,
        ),
        (
            ContainerSpec {
                pids_limit: Some(1_000_000),
                ..benign()
            },
            Rule::ResourcesCeiling,
        ),
    ];
    for (spec, rule) in cases {
        assert_denied(&spec, rule);
    }
    let spec = ContainerSpec {
        cpu_limit: Some(1.5),
        memory_limit_mb: Some(1024),
        pids_limit: Some(100),
        ..benign()
    };
    let h = eval(&spec).hardened.unwrap();
    assert_eq!(
        (h.cpu_limit, h.memory_limit_mb, h.pids_limit),
        (Some(1.5), Some(1024), Some(100))
    );
    // Team ceilings apply, and lower the defaults.
    let team = "[teams.small]\nmax_cpus = 1.0\nmax_memory_mb = 512";
    assert!(
        eval_with(
            team,
            "small",
            &ContainerSpec {
                cpu_limit: Some(2.0),
                ..benign()
            }
        )
        .has(Rule::ResourcesCeiling)
    );
    let h = eval_with(team, "small", &benign()).hardened.unwrap();
    assert_eq!((h.cpu_limit, h.memory_limit_mb), (Some(1.0), Some(512)));
}

#[test]
fn every_violation_is_reported() {
    let spec = ContainerSpec {
        image: "docker:24-dind".into(),
        privileged: true,
        mounts: vec![bind("/var/run/docker.sock")],
        cap_add: vec!["SYS_ADMIN".into()],
        network_mode: "host".into(),
        user: Some("0".into()),
        ..benign()
    };
    let o = eval(&spec);
    for rule in [
        Rule::ImageDenied,
        Rule::Privileged,
        Rule::MountDockerSocket,
        Rule::CapabilityAdd,
        Rule::NetworkMode,
        Rule::UserRoot,
    ] {
        assert!(o.has(rule), "{rule}: {:?}", ids(&o));
    }
    assert!(!o.only_invalid());
}

#[test]
fn rule_ids_are_unique_and_dotted() {
    let mut seen = std::collections::HashSet::new();
    for r in Rule::ALL {
        assert!(seen.insert(r.id()), "duplicate {}", r.id());
        assert!(
            r.id()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_')
        );
    }
    assert_eq!(Rule::MountDockerSocket.severity(), Severity::Critical);
    assert_eq!(Rule::Privileged.severity(), Severity::Critical);
}

/// One forbidden element, and a rule that must catch it.
fn forbidden() -> impl Strategy<Value = (Rule, fn(&mut ContainerSpec, &str), String)> {
    type Apply = fn(&mut ContainerSpec, &str);
    let socket: Apply = |s, v| s.mounts.push(bind(v));
    let image: Apply = |s, v| s.image = v.into();
    let privileged: Apply = |s, _| s.privileged = true;
    let cap: Apply = |s, v| s.cap_add.push(v.into());
    let user: Apply = |s, v| s.user = Some(v.into());
    let pid: Apply = |s, v| s.pid_mode = v.into();
    let net: Apply = |s, v| s.network_mode = v.into();
    let opt: Apply = |s, v| s.security_opt.push(v.into());
    let label: Apply = |s, v| {
        s.labels.insert(v.into(), "x".into());
    };
    let mem: Apply = |s, v| s.memory_limit_mb = Some(v.parse().unwrap());
    let device: Apply = |s, v| {
        s.devices.push(Device {
            host_path: v.into(),
            ..Default::default()
        });
    };
    prop_oneof![
        (
            prop::sample::select(vec![
                "/var/run/docker.sock",
                "/run/docker.sock",
                "/var/run",
                "/"
            ]),
            "[/]{1,3}",
            prop::bool::ANY
        )
            .prop_map(move |(p, slashes, trailing)| {
                let spelled = format!(
                    "{}{}",
                    p.replace('/', &slashes),
                    if trailing { "/" } else { "" }
                );
                (Rule::MountDockerSocket, socket, spelled)
            }),
        (
            prop::sample::select(vec![
                "docker",
                "DOCKER",
                "library/docker",
                "docker.io/library/docker",
                "index.docker.io/library/docker",
                "dind",
                "x.io/y/dind"
            ]),
            "[a-z0-9][a-z0-9.-]{0,8}"
        )
            .prop_map(move |(name, tag)| (
                Rule::ImageDenied,
                image,
                format!("{name}:{tag}")
            )),
        Just((Rule::Privileged, privileged, String::new())),
        prop::sample::select(vec![
            "SYS_ADMIN",
            "cap_sys_admin",
            "Net_Admin",
            "ALL",
            "sys_ptrace"
        ])
        .prop_map(move |c| (Rule::CapabilityAdd, cap, c.to_string())),
        prop::sample::select(vec!["root", "0", "0:0", "000", "1000:0", "root:1000"])
            .prop_map(move |u| (Rule::UserRoot, user, u.to_string())),
        prop::sample::select(vec!["host", "HOST", "container:x"]).prop_map(move |v| (
            Rule::NamespacePid,
            pid,
            v.to_string()
        )),
        prop::sample::select(vec!["host", "bridge", "container:x"]).prop_map(move |v| (
            Rule::NetworkMode,
            net,
            v.to_string()
        )),
        prop::sample::select(vec![
            "seccomp=unconfined",
            "apparmor:unconfined",
            "label=disable"
        ])
        .prop_map(move |v| (Rule::SecurityOptUnconfined, opt, v.to_string())),
        "vibebox\\.[a-z]{1,8}".prop_map(move |k| (Rule::LabelReserved, label, k)),
        prop::sample::select(vec!["0", "-1", "999999999"]).prop_map(move |m| {
            let rule = if m == "999999999" {
                Rule::ResourcesCeiling
            } else {
                Rule::ResourcesUnlimited
            };
            (rule, mem, m.to_string())
        }),
        Just((Rule::Device, device, "/dev/sda".to_string())),
    ]
}

/// Arbitrary (mostly benign, sometimes odd) surrounding content.
fn noise() -> impl Strategy<Value = ContainerSpec> {
    (
        prop::sample::select(vec![
            "python:3.12",
            "ghcr.io/acme/app:1",
            "busybox:1.36",
            "ubuntu:24.04",
        ]),
        prop::collection::btree_map("[A-Z_]{1,8}", ".{0,12}", 0..4),
        prop::collection::btree_map("[a-z.]{1,12}", "[a-z]{0,6}", 0..3),
        prop::option::of(0.01f64..8.0),
        prop::option::of(6i64..16384),
        prop::option::of(prop::sample::select(vec![
            "1000",
            "1000:1000",
            "4242:4242",
            "",
        ])),
        prop::collection::vec(".{0,16}", 0..3),
        prop::option::of(prop::bool::ANY),
    )
        .prop_map(
            |(image, env, labels, cpu, mem, user, command, ro)| ContainerSpec {
                image: image.into(),
                env,
                labels,
                cpu_limit: cpu,
                memory_limit_mb: mem,
                user: user.map(str::to_owned),
                command,
                read_only_rootfs: ro,
                ..Default::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_spec_with_a_forbidden_element_is_allowed(
        spec in noise(),
        extras in prop::collection::vec(forbidden(), 0..3),
        (rule, apply, value) in forbidden(),
    ) {
        let mut spec = spec;
        for (_, f, v) in &extras {
            f(&mut spec, v);
        }
        apply(&mut spec, &value);
        let o = eval(&spec);
        prop_assert!(!o.allowed());
        prop_assert!(o.hardened.is_none());
        prop_assert!(o.has(rule), "{} not in {:?} for {:?}", rule, ids(&o), value);
    }

    #[test]
    fn allowed_specs_are_always_hardened(spec in noise()) {
        let o = eval(&spec);
        if let Some(h) = o.hardened {
            prop_assert_eq!(h.cap_drop, vec!["ALL".to_string()]);
            prop_assert_eq!(h.security_opt, vec!["no-new-privileges".to_string()]);
            prop_assert!(!h.privileged);
            let user = h.user.unwrap();
            prop_assert!(!user.starts_with("0:") && !user.ends_with(":0"));
            prop_assert!(h.cpu_limit.is_some() && h.memory_limit_mb.is_some() && h.pids_limit.is_some());
            prop_assert!(h.mounts.iter().any(|m| m.target == "/workspace"));
        } else {
            prop_assert!(!o.violations.is_empty());
        }
    }

    #[test]
    fn evaluation_never_panics(
        image in ".{0,40}",
        user in prop::option::of(".{0,12}"),
        source in ".{0,30}",
        opt in ".{0,20}",
        mode in ".{0,10}",
        ty in 0i32..5,
    ) {
        let spec = ContainerSpec {
            image,
            user,
            security_opt: vec![opt],
            ipc_mode: mode,
            mounts: vec![Mount { r#type: ty, source, target: "/x".into(), read_only: false, size_mb: None }],
            ..Default::default()
        };
        let o = eval(&spec);
        prop_assert_eq!(o.allowed(), o.hardened.is_some());
    }
}

fn mount_at(kind: MountType, target: &str) -> Mount {
    Mount {
        r#type: kind as i32,
        source: String::new(),
        target: target.into(),
        read_only: false,
        size_mb: None,
    }
}

#[test]
fn mount_targets_over_kernel_interfaces_and_engine_files() {
    for target in [
        "/proc",
        "//proc/",
        "/proc/../proc",
        "/proc/.",
        "/./proc",
        "/x/../proc",
        "/proc/sys",
        "/proc/sys/kernel/",
        "/sys",
        "/sys/fs/cgroup",
        "/dev",
        "/dev/shm",
        "/dev/pts",
        "//dev//",
        "/etc/hosts",
        "/etc//hosts/",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/etc/../etc/resolv.conf",
        "/.dockerenv",
        "/run/.containerenv",
    ] {
        for kind in [MountType::Tmpfs, MountType::Volume] {
            let spec = ContainerSpec {
                mounts: vec![mount_at(kind, target)],
                ..benign()
            };
            assert_denied(&spec, Rule::MountTargetReserved);
            let o = eval(&spec);
            assert_eq!(o.violations[0].field, "spec.mounts[0].target");
        }
        // A bind there is refused for its target too (whatever its source).
        let spec = ContainerSpec {
            mounts: vec![Mount {
                target: target.into(),
                ..bind("/home/dev/project")
            }],
            ..benign()
        };
        let o = eval_with("[mounts]\nallow_bind_prefixes = [\"/home/dev\"]", "", &spec);
        assert!(o.has(Rule::MountTargetReserved), "{target}: {:?}", ids(&o));
    }
    // Linux paths are case-sensitive, and neighbours are not below.
    for target in [
        "/PROC",
        "/Sys",
        "/procfs",
        "/devices",
        "/etc/hosts.d",
        "/etc",
        "/srv/proc",
    ] {
        let spec = ContainerSpec {
            mounts: vec![mount_at(MountType::Tmpfs, target)],
            ..benign()
        };
        let o = eval(&spec);
        assert!(o.allowed(), "{target}: {:?}", ids(&o));
    }
    // The workspace cannot be configured there either.
    for ws in ["/proc", "/dev/shm", "/etc/hosts"] {
        let doc = format!("[filesystem]\nworkspace_path = \"{ws}\"");
        assert!(Policy::from_toml(&doc).is_err(), "{ws}");
    }
    assert_eq!(
        Rule::MountTargetReserved.id(),
        "mount.target_reserved",
        "stable rule id"
    );
}

#[test]
fn user_ids_must_lie_in_the_configured_range() {
    for user in [
        "1",
        "1:1",
        "100:100",
        "999",
        "1000:999",
        "999:1000",
        "1000:105",
        "65534",
        "65534:65534",
        "60001",
        "1000:60001",
        "2147483646",
    ] {
        let spec = ContainerSpec {
            user: Some(user.into()),
            ..benign()
        };
        assert_denied(&spec, Rule::UserRange);
    }
    for (user, hardened) in [
        ("1000", "1000:1000"),
        ("60000:60000", "60000:60000"),
        ("2000:3000", "2000:3000"),
    ] {
        let spec = ContainerSpec {
            user: Some(user.into()),
            ..benign()
        };
        let o = eval(&spec);
        assert_eq!(o.hardened.and_then(|h| h.user).as_deref(), Some(hardened));
    }
    // Root stays root's rule.
    assert!(
        eval(&ContainerSpec {
            user: Some("0".into()),
            ..benign()
        })
        .has(Rule::UserRoot)
    );
    // The range is configurable; the platform user must lie in it.
    let wide = "[user]\nmin_id = 500\nmax_id = 70000";
    let spec = ContainerSpec {
        user: Some("65534:65534".into()),
        ..benign()
    };
    assert!(eval_with(wide, "", &spec).allowed());
    for bad in [
        "[user]\nmin_id = 0",
        "[user]\nmin_id = 2000\nmax_id = 1000",
        "[user]\nmin_id = 2000",
        "[user]\nmax_id = 4294967295",
    ] {
        assert!(Policy::from_toml(bad).is_err(), "{bad}");
    }
}

#[test]
fn binds_run_as_the_platform_user() {
    let policy = "[mounts]\nallow_bind_prefixes = [\"/home/dev\"]";
    let with = |user: Option<&str>| ContainerSpec {
        mounts: vec![bind("/home/dev/project")],
        user: user.map(str::to_owned),
        ..benign()
    };
    for user in [None, Some(""), Some("1000"), Some("1000:1000")] {
        let o = eval_with(policy, "", &with(user));
        assert!(o.allowed(), "{user:?}: {:?}", ids(&o));
        assert_eq!(o.hardened.unwrap().user.as_deref(), Some("1000:1000"));
    }
    for user in ["2000:2000", "1000:2000", "1001"] {
        let o = eval_with(policy, "", &with(Some(user)));
        assert!(o.has(Rule::UserBindIdentity), "{user}: {:?}", ids(&o));
    }
    // Without a bind a chosen (in-range) user is fine.
    let spec = ContainerSpec {
        user: Some("2000:2000".into()),
        ..benign()
    };
    assert!(eval_with(policy, "", &spec).allowed());
}

// ---- Egress, lifetime and copy limit (#17) ----

use vibebox_proto::environment::{Egress, EgressMode, EgressRule, Lifetime};

fn rule(host: &str, cidr: &str, ports: &[u32]) -> EgressRule {
    EgressRule {
        host: host.into(),
        cidr: cidr.into(),
        ports: ports.to_vec(),
    }
}

fn with_egress(mode: EgressMode, allow: Vec<EgressRule>) -> ContainerSpec {
    ContainerSpec {
        egress: Some(Egress {
            mode: mode as i32,
            allow,
        }),
        ..benign()
    }
}

/// The violations as `(rule id, field)`.
fn found(o: &Outcome) -> Vec<(&'static str, String)> {
    o.violations
        .iter()
        .map(|v| (v.rule.id(), v.field.to_string()))
        .collect()
}

#[track_caller]
fn assert_idempotent(policy: &str, team: &str, hardened: &ContainerSpec) {
    let again = eval_with(policy, team, hardened);
    assert!(again.allowed(), "{:?}", again.violations);
    assert_eq!(again.hardened.as_ref(), Some(hardened));
}

const ALLOW_LIST: &str = r#"
    [egress]
    mode = "allow-list"
    allow = [
        { host = "*.github.com", ports = [443] },
        { host = "packages.example.com" },
        { cidr = "203.0.113.0/24", ports = [80, 443] },
        { cidr = "10.20.0.0/16", ports = [5432] },
    ]
"#;

#[test]
fn hardened_spec_always_carries_egress_lifetime_and_copy_limit() {
    let h = eval(&benign()).hardened.unwrap();
    assert_eq!(
        h.egress,
        Some(Egress {
            mode: EgressMode::None as i32,
            allow: vec![],
        })
    );
    assert_eq!(
        h.lifetime,
        Some(Lifetime {
            idle_timeout_seconds: Some(7200),
            idle_cpu_percent: Some(5.0),
            lifetime_seconds: Some(0),
            max_lifetime_seconds: Some(0),
        })
    );
    assert_eq!(h.copy_limit_mb, Some(1024));
    assert_idempotent("", "", &h);
    // An unset request takes the policy's decision, rules canonical.
    let h = eval_with(ALLOW_LIST, "", &benign()).hardened.unwrap();
    let egress = h.egress.clone().unwrap();
    assert_eq!(egress.mode, EgressMode::AllowList as i32);
    assert_eq!(
        egress.allow,
        [
            rule("*.github.com", "", &[443]),
            rule("packages.example.com", "", &[]),
            rule("", "10.20.0.0/16", &[5432]),
            rule("", "203.0.113.0/24", &[80, 443]),
        ]
    );
    assert_idempotent(ALLOW_LIST, "", &h);
    // A set message with an unspecified mode and no rules asks nothing.
    let o = eval_with(
        ALLOW_LIST,
        "",
        &with_egress(EgressMode::Unspecified, vec![]),
    );
    assert_eq!(o.hardened.unwrap().egress, Some(egress));
}

#[test]
fn a_request_may_narrow_egress() {
    // Allow-list policy: a subset of its rules, canonicalized.
    let spec = with_egress(
        EgressMode::AllowList,
        vec![
            rule("", "203.0.113.128/25", &[443]),
            rule("API.GitHub.com.", "", &[443, 443]),
            rule("*.api.github.com", "", &[443]),
            rule("packages.example.com", "", &[8443, 443]),
            rule("", "10.20.3.0/24", &[5432]),
            rule("api.github.com", "", &[443]),
        ],
    );
    let o = eval_with(ALLOW_LIST, "", &spec);
    assert!(o.allowed(), "{:?}", found(&o));
    let h = o.hardened.unwrap();
    assert_eq!(
        h.egress.as_ref().unwrap().allow,
        [
            rule("*.api.github.com", "", &[443]),
            rule("api.github.com", "", &[443]),
            rule("packages.example.com", "", &[443, 8443]),
            rule("", "10.20.3.0/24", &[5432]),
            rule("", "203.0.113.128/25", &[443]),
        ]
    );
    assert_idempotent(ALLOW_LIST, "", &h);
    // Down to none.
    let h = eval_with(ALLOW_LIST, "", &with_egress(EgressMode::None, vec![]))
        .hardened
        .unwrap();
    assert_eq!(h.egress.unwrap().mode, EgressMode::None as i32);
    // Internet policy: an allow list of public names and ranges, and the
    // private range it names.
    let internet =
        "[egress]\nmode = \"internet\"\nallow = [{ cidr = \"10.20.0.0/16\", ports = [5432] }]";
    let spec = with_egress(
        EgressMode::AllowList,
        vec![
            rule("*.pypi.org", "", &[443]),
            rule("", "0.0.0.0/0", &[443]),
            rule("", "2001:db8::/32", &[]),
            rule("", "10.20.0.0/24", &[5432]),
        ],
    );
    let o = eval_with(internet, "", &spec);
    assert!(o.allowed(), "{:?}", found(&o));
    assert_idempotent(internet, "", &o.hardened.unwrap());
    let h = eval_with(internet, "", &benign()).hardened.unwrap();
    assert_eq!(
        h.egress.unwrap(),
        Egress {
            mode: EgressMode::Internet as i32,
            allow: vec![rule("", "10.20.0.0/16", &[5432])],
        }
    );
    // Internet without the private rule.
    let o = eval_with(internet, "", &with_egress(EgressMode::Internet, vec![]));
    assert_eq!(o.hardened.unwrap().egress.unwrap().allow, []);
}

#[test]
fn egress_wider_than_policy_is_not_allowed() {
    for (policy, spec, expected) in [
        (
            "",
            with_egress(EgressMode::Internet, vec![]),
            vec![("egress.not_allowed", "spec.egress.mode")],
        ),
        (
            "",
            with_egress(
                EgressMode::AllowList,
                vec![rule("a.example.com", "", &[443])],
            ),
            vec![("egress.not_allowed", "spec.egress.mode")],
        ),
        (
            ALLOW_LIST,
            with_egress(EgressMode::Internet, vec![]),
            vec![("egress.not_allowed", "spec.egress.mode")],
        ),
        (
            ALLOW_LIST,
            with_egress(
                EgressMode::AllowList,
                vec![
                    rule("api.github.com", "", &[443]),
                    rule("api.github.com", "", &[22]),
                    rule("api.github.com", "", &[]),
                    rule("github.com", "", &[443]),
                    rule("*.com", "", &[443]),
                    rule("", "203.0.112.0/23", &[443]),
                    rule("", "10.0.0.0/8", &[5432]),
                    rule("", "192.168.1.0/24", &[]),
                    rule("", "140.82.112.0/20", &[443]),
                ],
            ),
            vec![
                ("egress.not_allowed", "spec.egress.allow[1]"),
                ("egress.not_allowed", "spec.egress.allow[2]"),
                ("egress.not_allowed", "spec.egress.allow[3]"),
                ("egress.not_allowed", "spec.egress.allow[4]"),
                ("egress.not_allowed", "spec.egress.allow[5]"),
                ("egress.not_allowed", "spec.egress.allow[6]"),
                ("egress.not_allowed", "spec.egress.allow[7]"),
                ("egress.not_allowed", "spec.egress.allow[8]"),
            ],
        ),
        // 0.0.0.0/0 names no private range, and internet reaches none
        // it does not name.
        (
            "[egress]\nmode = \"allow-list\"\nallow = [{ cidr = \"0.0.0.0/0\" }]",
            with_egress(
                EgressMode::AllowList,
                vec![
                    rule("", "10.1.0.0/16", &[]),
                    rule("", "198.51.100.0/24", &[]),
                ],
            ),
            vec![("egress.not_allowed", "spec.egress.allow[0]")],
        ),
        (
            "[egress]\nmode = \"internet\"",
            with_egress(
                EgressMode::Internet,
                vec![
                    rule("", "172.16.0.0/12", &[]),
                    rule("", "100.64.0.0/10", &[]),
                ],
            ),
            vec![
                ("egress.not_allowed", "spec.egress.allow[0]"),
                ("egress.not_allowed", "spec.egress.allow[1]"),
            ],
        ),
    ] {
        let o = eval_with(policy, "", &spec);
        let expected: Vec<(&str, String)> = expected
            .into_iter()
            .map(|(r, f)| (r, f.to_owned()))
            .collect();
        assert_eq!(found(&o), expected, "{policy}");
        assert!(o.hardened.is_none());
        assert_eq!(o.severity(), Some(Severity::High));
    }
}

#[test]
fn forbidden_destinations_are_refused_whatever_the_policy() {
    let wide =
        "[egress]\nmode = \"allow-list\"\nallow = [{ cidr = \"0.0.0.0/0\" }, { cidr = \"::/0\" }]";
    for policy in ["", wide, "[egress]\nmode = \"internet\"", ALLOW_LIST] {
        for cidr in [
            "127.0.0.1",
            "127.0.0.0/8",
            "169.254.169.254",
            "169.254.0.0/16",
            "0.0.0.0/8",
            "0.0.0.0",
            "224.0.0.251",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "ff02::1",
            "fd00:ec2::254",
        ] {
            for mode in [EgressMode::AllowList, EgressMode::Internet] {
                let o = eval_with(policy, "", &with_egress(mode, vec![rule("", cidr, &[80])]));
                assert_eq!(
                    found(&o),
                    [(
                        "egress.forbidden_destination",
                        "spec.egress.allow[0].cidr".to_owned()
                    )],
                    "{policy} {cidr}"
                );
                assert!(!o.only_invalid());
            }
        }
    }
    // Wide rules are fine: they never name what they contain.
    let o = eval_with(
        wide,
        "",
        &with_egress(EgressMode::AllowList, vec![rule("", "0.0.0.0/0", &[443])]),
    );
    assert!(o.allowed());
}

#[test]
fn malformed_egress_is_invalid() {
    let bad = |spec: ContainerSpec| found(&eval_with(ALLOW_LIST, "", &spec));
    let one = |field: &str| vec![("egress.invalid", field.to_owned())];
    assert_eq!(
        bad(with_egress(
            EgressMode::Unspecified,
            vec![rule("a.com", "", &[])]
        )),
        one("spec.egress.mode")
    );
    let mut unknown = with_egress(EgressMode::AllowList, vec![]);
    unknown.egress.as_mut().unwrap().mode = 42;
    assert_eq!(bad(unknown), one("spec.egress.mode"));
    assert_eq!(
        bad(with_egress(
            EgressMode::None,
            vec![rule("api.github.com", "", &[443])]
        )),
        one("spec.egress.allow")
    );
    assert_eq!(
        bad(with_egress(EgressMode::AllowList, vec![])),
        one("spec.egress.allow")
    );
    assert_eq!(
        bad(with_egress(
            EgressMode::AllowList,
            vec![rule("a.github.com", "203.0.113.0/24", &[443])]
        )),
        one("spec.egress.allow[0]")
    );
    assert_eq!(
        bad(with_egress(
            EgressMode::AllowList,
            vec![rule("", "", &[443])]
        )),
        one("spec.egress.allow[0]")
    );
    for (r, field) in [
        (
            rule("a..github.com", "", &[443]),
            "spec.egress.allow[0].host",
        ),
        (rule("*", "", &[443]), "spec.egress.allow[0].host"),
        (rule("127.0.0.1", "", &[443]), "spec.egress.allow[0].host"),
        (
            rule("a_b.github.com", "", &[443]),
            "spec.egress.allow[0].host",
        ),
        (
            rule("", "203.0.113.1/24", &[443]),
            "spec.egress.allow[0].cidr",
        ),
        (
            rule("", "203.0.113.0/33", &[443]),
            "spec.egress.allow[0].cidr",
        ),
        (
            rule("", "::ffff:127.0.0.1", &[443]),
            "spec.egress.allow[0].cidr",
        ),
        (
            rule("", "203.0.113.0/24", &[0]),
            "spec.egress.allow[0].ports",
        ),
        (
            rule("", "203.0.113.0/24", &[65536]),
            "spec.egress.allow[0].ports",
        ),
        (
            rule("", "203.0.113.0/24", &(1..=33).collect::<Vec<u32>>()),
            "spec.egress.allow[0].ports",
        ),
    ] {
        assert_eq!(
            bad(with_egress(EgressMode::AllowList, vec![r.clone()])),
            one(field),
            "{r:?}"
        );
    }
    let e = eval_with(
        ALLOW_LIST,
        "",
        &with_egress(
            EgressMode::AllowList,
            vec![rule("", "203.0.113.1/24", &[443])],
        ),
    );
    assert!(e.violations[0].message.contains("203.0.113.0/24"));
    assert!(e.only_invalid());
    let many = (0..65)
        .map(|i| rule(&format!("h{i}.github.com"), "", &[443]))
        .collect();
    assert_eq!(
        bad(with_egress(EgressMode::AllowList, many)),
        one("spec.egress.allow")
    );
    // Internet mode: rules only for private ranges.
    let internet = "[egress]\nmode = \"internet\"";
    assert_eq!(
        found(&eval_with(
            internet,
            "",
            &with_egress(EgressMode::Internet, vec![rule("a.com", "", &[])])
        )),
        one("spec.egress.allow[0]")
    );
}

#[test]
fn a_team_egress_overlay_widens_for_that_team_only() {
    let policy = r#"
        [teams.web.egress]
        mode = "internet"
        [teams.ci.egress]
        mode = "allow-list"
        allow = [{ host = "*.github.com", ports = [443] }]
    "#;
    let mode = |team: &str, spec: &ContainerSpec| {
        eval_with(policy, team, spec)
            .hardened
            .map(|h| h.egress.unwrap().mode)
    };
    assert_eq!(mode("web", &benign()), Some(EgressMode::Internet as i32));
    assert_eq!(mode("ci", &benign()), Some(EgressMode::AllowList as i32));
    assert_eq!(mode("other", &benign()), Some(EgressMode::None as i32));
    assert_eq!(mode("", &benign()), Some(EgressMode::None as i32));
    let internet = with_egress(EgressMode::Internet, vec![]);
    assert!(eval_with(policy, "web", &internet).allowed());
    for team in ["ci", "other", ""] {
        assert!(
            eval_with(policy, team, &internet).has(Rule::EgressNotAllowed),
            "{team}"
        );
    }
    let github = with_egress(
        EgressMode::AllowList,
        vec![rule("api.github.com", "", &[443])],
    );
    assert!(eval_with(policy, "ci", &github).allowed());
    assert!(eval_with(policy, "web", &github).allowed());
    assert!(eval_with(policy, "other", &github).has(Rule::EgressNotAllowed));
}

fn with_lifetime(l: Lifetime) -> ContainerSpec {
    ContainerSpec {
        lifetime: Some(l),
        ..benign()
    }
}

const LIMITS: &str = "[lifetime]\nidle_timeout = \"2h\"\nidle_cpu_percent = 5.0\nlifetime = \"1d\"\nmax_lifetime = \"7d\"\n[files]\ncopy_limit_mb = 256\n";

#[test]
fn a_request_may_shorten_lifetimes_never_lengthen_them() {
    let lifetime = |l: Lifetime| {
        let o = eval_with(LIMITS, "", &with_lifetime(l));
        assert!(o.allowed(), "{:?}", found(&o));
        let h = o.hardened.unwrap();
        assert_idempotent(LIMITS, "", &h);
        let l = h.lifetime.unwrap();
        (
            l.idle_timeout_seconds.unwrap(),
            l.idle_cpu_percent.unwrap(),
            l.lifetime_seconds.unwrap(),
            l.max_lifetime_seconds.unwrap(),
        )
    };
    assert_eq!(lifetime(Lifetime::default()), (7200, 5.0, 86_400, 604_800));
    assert_eq!(
        lifetime(Lifetime {
            idle_timeout_seconds: Some(1800),
            idle_cpu_percent: Some(20.0),
            lifetime_seconds: Some(3 * 86_400),
            max_lifetime_seconds: None,
        }),
        (1800, 20.0, 259_200, 604_800)
    );
    // A lower ceiling lowers the default lifetime with it.
    assert_eq!(
        lifetime(Lifetime {
            max_lifetime_seconds: Some(3600),
            ..Default::default()
        }),
        (7200, 5.0, 3600, 3600)
    );
    // Equal to the policy is fine (the hardened spec re-evaluates to itself).
    assert_eq!(
        lifetime(Lifetime {
            idle_timeout_seconds: Some(7200),
            idle_cpu_percent: Some(5.0),
            lifetime_seconds: Some(604_800),
            max_lifetime_seconds: Some(604_800),
        }),
        (7200, 5.0, 604_800, 604_800)
    );
    for (l, field) in [
        (
            Lifetime {
                idle_timeout_seconds: Some(7201),
                ..Default::default()
            },
            "spec.lifetime.idle_timeout_seconds",
        ),
        (
            Lifetime {
                idle_timeout_seconds: Some(0),
                ..Default::default()
            },
            "spec.lifetime.idle_timeout_seconds",
        ),
        (
            Lifetime {
                idle_cpu_percent: Some(1.0),
                ..Default::default()
            },
            "spec.lifetime.idle_cpu_percent",
        ),
        (
            Lifetime {
                lifetime_seconds: Some(604_801),
                ..Default::default()
            },
            "spec.lifetime.lifetime_seconds",
        ),
        (
            Lifetime {
                lifetime_seconds: Some(0),
                ..Default::default()
            },
            "spec.lifetime.lifetime_seconds",
        ),
        (
            Lifetime {
                lifetime_seconds: Some(7200),
                max_lifetime_seconds: Some(3600),
                ..Default::default()
            },
            "spec.lifetime.lifetime_seconds",
        ),
        (
            Lifetime {
                max_lifetime_seconds: Some(0),
                ..Default::default()
            },
            "spec.lifetime.max_lifetime_seconds",
        ),
        (
            Lifetime {
                max_lifetime_seconds: Some(604_801),
                ..Default::default()
            },
            "spec.lifetime.max_lifetime_seconds",
        ),
    ] {
        let o = eval_with(LIMITS, "", &with_lifetime(l));
        assert_eq!(
            found(&o),
            [("lifetime.too_long", field.to_owned())],
            "{l:?}"
        );
        assert_eq!(o.severity(), Some(Severity::Medium));
    }
    for cpu in [0.0, -1.0, 100.5, f64::NAN, f64::INFINITY] {
        let o = eval_with(
            LIMITS,
            "",
            &with_lifetime(Lifetime {
                idle_cpu_percent: Some(cpu),
                ..Default::default()
            }),
        );
        assert_eq!(
            found(&o),
            [(
                "lifetime.invalid",
                "spec.lifetime.idle_cpu_percent".to_owned()
            )],
            "{cpu}"
        );
        assert!(o.only_invalid());
    }
    // Under a policy without limits, "never" (0) may be asked, and any value.
    let o = eval(&with_lifetime(Lifetime {
        idle_timeout_seconds: Some(600),
        lifetime_seconds: Some(0),
        max_lifetime_seconds: Some(86_400),
        ..Default::default()
    }));
    assert!(
        o.has(Rule::LifetimeTooLong),
        "never exceeds a 1d ceiling the request set"
    );
    let h = eval(&with_lifetime(Lifetime {
        idle_timeout_seconds: Some(600),
        lifetime_seconds: Some(31_536_000),
        ..Default::default()
    }))
    .hardened
    .unwrap();
    assert_eq!(
        h.lifetime.unwrap(),
        Lifetime {
            idle_timeout_seconds: Some(600),
            idle_cpu_percent: Some(5.0),
            lifetime_seconds: Some(31_536_000),
            max_lifetime_seconds: Some(0),
        }
    );
    let o = eval_with(
        "[lifetime]\nidle_timeout = \"never\"",
        "",
        &with_lifetime(Lifetime {
            idle_timeout_seconds: Some(0),
            ..Default::default()
        }),
    );
    assert!(o.allowed());
    // A team overlay's tighter limits apply to that team.
    let team = format!("{LIMITS}[teams.a.lifetime]\nidle_timeout = \"30m\"\n");
    let idle = with_lifetime(Lifetime {
        idle_timeout_seconds: Some(3600),
        ..Default::default()
    });
    assert!(eval_with(&team, "a", &idle).has(Rule::LifetimeTooLong));
    assert!(eval_with(&team, "b", &idle).allowed());
    assert_eq!(
        eval_with(&team, "a", &benign())
            .hardened
            .unwrap()
            .lifetime
            .unwrap()
            .idle_timeout_seconds,
        Some(1800)
    );
}

#[test]
fn copy_limits() {
    let limit = |req: Option<i64>| {
        let o = eval_with(
            LIMITS,
            "",
            &ContainerSpec {
                copy_limit_mb: req,
                ..benign()
            },
        );
        (found(&o), o.hardened.and_then(|h| h.copy_limit_mb))
    };
    assert_eq!(limit(None), (vec![], Some(256)));
    assert_eq!(limit(Some(10)), (vec![], Some(10)));
    assert_eq!(limit(Some(256)), (vec![], Some(256)));
    assert_eq!(
        limit(Some(257)),
        (
            vec![("files.copy_limit", "spec.copy_limit_mb".to_owned())],
            None
        )
    );
    for bad in [0, -1, i64::MIN] {
        assert_eq!(
            limit(Some(bad)),
            (
                vec![("files.invalid", "spec.copy_limit_mb".to_owned())],
                None
            )
        );
    }
    let team = format!("{LIMITS}[teams.a.files]\ncopy_limit_mb = 8\n");
    let h = eval_with(&team, "a", &benign()).hardened.unwrap();
    assert_eq!(h.copy_limit_mb, Some(8));
    assert_idempotent(&team, "a", &h);
    let ask = ContainerSpec {
        copy_limit_mb: Some(100),
        ..benign()
    };
    assert!(eval_with(&team, "a", &ask).has(Rule::FilesCopyLimit));
    assert!(eval_with(&team, "b", &ask).allowed());
}

#[test]
fn the_new_rules_are_in_the_catalogue() {
    for (rule, id, severity) in [
        (Rule::EgressInvalid, "egress.invalid", Severity::Low),
        (Rule::EgressNotAllowed, "egress.not_allowed", Severity::High),
        (
            Rule::EgressForbiddenDestination,
            "egress.forbidden_destination",
            Severity::High,
        ),
        (Rule::LifetimeTooLong, "lifetime.too_long", Severity::Medium),
        (Rule::LifetimeInvalid, "lifetime.invalid", Severity::Low),
        (Rule::FilesCopyLimit, "files.copy_limit", Severity::Medium),
        (Rule::FilesInvalid, "files.invalid", Severity::Low),
    ] {
        assert!(Rule::ALL.contains(&rule));
        assert_eq!((rule.id(), rule.severity()), (id, severity));
    }
}

/// Short patterns over a small alphabet, wildcards included.
fn glob() -> impl Strategy<Value = String> {
    "[ab.*?]{1,7}".prop_map(|s| format!("{s}.x"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Coverage is sound: a name the requested pattern matches, the policy
    /// pattern matches too; and it is exact for literal names.
    #[test]
    fn host_coverage_never_admits_a_name_policy_does_not(
        policy in glob(),
        requested in glob(),
        name in "[ab.]{0,8}",
    ) {
        let name = format!("{name}.x");
        let matches = |p: &str, n: &str| wildmatch::WildMatch::new(p).matches(n);
        if crate::egress::host_covers(&policy, &requested) && matches(&requested, &name) {
            prop_assert!(matches(&policy, &name), "{policy} covers {requested} but not {name}");
        }
        prop_assert_eq!(crate::egress::host_covers(&policy, &name), matches(&policy, &name));
        prop_assert!(crate::egress::host_covers(&requested, &requested));
    }

    /// Whatever a request asks of egress and lifetimes, an allowed spec's
    /// decision lies within the policy's and re-evaluates to itself.
    #[test]
    fn allowed_egress_and_lifetimes_stay_within_policy(
        mode in 0i32..4,
        rules in prop::collection::vec(
            (
                prop::sample::select(vec![
                    "", "api.github.com", "*.github.com", "*.com", "a.example.com",
                    "packages.example.com", "*",
                ]),
                prop::sample::select(vec![
                    "", "203.0.113.0/24", "203.0.113.7", "10.20.0.0/16", "10.0.0.0/8",
                    "0.0.0.0/0", "127.0.0.1", "169.254.169.254", "192.168.0.0/24",
                ]),
                prop::collection::vec(prop::sample::select(vec![0u32, 22, 80, 443, 5432]), 0..3),
            ),
            0..4,
        ),
        idle in prop::option::of(prop::sample::select(vec![0u32, 60, 7200, 7201, 100_000])),
        life in prop::option::of(prop::sample::select(vec![0u32, 60, 86_400, 604_800, 604_801])),
        max in prop::option::of(prop::sample::select(vec![0u32, 3600, 604_800, 604_801])),
        cpu in prop::option::of(prop::sample::select(vec![0.0f64, 1.0, 5.0, 50.0, 100.0, 101.0])),
        copy in prop::option::of(prop::sample::select(vec![-1i64, 0, 1, 256, 257])),
        policy in prop::sample::select(vec![0usize, 1, 2]),
    ) {
        let policies = [
            format!("{LIMITS}{ALLOW_LIST}"),
            format!("{LIMITS}[egress]\nmode = \"internet\"\nallow = [{{ cidr = \"10.20.0.0/16\" }}]\n"),
            LIMITS.to_owned(),
        ];
        let text = &policies[policy];
        let parsed = Policy::from_toml(text).unwrap();
        let r = parsed.rules_for("");
        let spec = ContainerSpec {
            egress: Some(Egress {
                mode,
                allow: rules.iter().map(|(h, c, p)| rule(h, c, p)).collect(),
            }),
            lifetime: Some(Lifetime {
                idle_timeout_seconds: idle,
                idle_cpu_percent: cpu,
                lifetime_seconds: life,
                max_lifetime_seconds: max,
            }),
            copy_limit_mb: copy,
            ..benign()
        };
        let o = evaluate(r, &spec);
        let Some(h) = o.hardened else {
            prop_assert!(!o.violations.is_empty());
            return Ok(());
        };
        let e = h.egress.clone().unwrap();
        prop_assert!(e.mode != EgressMode::Unspecified as i32);
        let ceiling = match r.egress_mode {
            crate::egress::Mode::None => EgressMode::None,
            crate::egress::Mode::AllowList => EgressMode::AllowList,
            crate::egress::Mode::Internet => EgressMode::Internet,
        };
        prop_assert!(e.mode <= ceiling as i32);
        for a in &e.allow {
            let d = crate::egress::destination(&a.host, &a.cidr, &a.ports).unwrap();
            prop_assert!(crate::egress::covers(r.egress_mode, &r.egress_allow, &d), "{d}");
            prop_assert!(a.cidr != "127.0.0.1/32" && a.cidr != "169.254.169.254/32");
        }
        let l = h.lifetime.unwrap();
        let (idle, life, max) = (
            l.idle_timeout_seconds.unwrap(),
            l.lifetime_seconds.unwrap(),
            l.max_lifetime_seconds.unwrap(),
        );
        prop_assert!(crate::duration::at_most(idle, r.idle_timeout));
        prop_assert!(crate::duration::at_most(max, r.max_lifetime));
        prop_assert!(crate::duration::at_most(life, max));
        prop_assert!(l.idle_cpu_percent.unwrap() >= r.idle_cpu_percent);
        prop_assert!((1..=r.copy_limit_mb).contains(&h.copy_limit_mb.unwrap()));
        let again = evaluate(r, &h);
        prop_assert_eq!(again.hardened.as_ref(), Some(&h));
    }
}
