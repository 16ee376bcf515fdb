//! Every spelling of a forbidden spec, refused with a rule id, creating
//! nothing, audited with the promised severity.

use super::*;

/// How a case must be refused.
#[derive(Debug, Clone, Copy)]
pub(super) enum Expect {
    /// By the policy, naming this rule id (PreconditionFailure, or
    /// BadRequest for a spec that is only malformed); audited as policy.deny.
    Rule(&'static str),
    /// By the gateway's field validation: BadRequest naming this field.
    Field(&'static str),
    /// By the transport (a message over the gateway's size limit).
    Code(Code),
}

pub(super) struct Case {
    pub(super) what: String,
    pub(super) request: CreateEnvironmentRequest,
    pub(super) expect: Expect,
}

/// Severity the policy promises for a refusal naming `rules`.
fn promised_severity(rules: &[String]) -> Severity {
    if rules
        .iter()
        .any(|r| r == "mount.docker_socket" || r == "privileged")
    {
        Severity::Critical
    } else {
        Severity::High
    }
}

fn bind(image: &str, source: &str) -> ContainerSpec {
    ContainerSpec {
        mounts: vec![Mount {
            r#type: MountType::Bind as i32,
            source: source.into(),
            target: "/host".into(),
            ..Default::default()
        }],
        ..spec(image)
    }
}

fn mount(
    image: &str,
    kind: i32,
    source: &str,
    target: &str,
    size_mb: Option<i64>,
) -> ContainerSpec {
    ContainerSpec {
        mounts: vec![Mount {
            r#type: kind,
            source: source.into(),
            target: target.into(),
            read_only: false,
            size_mb,
        }],
        ..spec(image)
    }
}

fn tmpfs(target: &str) -> Mount {
    Mount {
        r#type: MountType::Tmpfs as i32,
        target: target.into(),
        size_mb: Some(16),
        ..Default::default()
    }
}

/// Every case of the policy attack, each a full CreateEnvironment request.
pub(super) fn policy_cases(image: &str, team: &str) -> Vec<Case> {
    use Expect::{Code as Transport, Field, Rule};
    let mut specs: Vec<(String, ContainerSpec, Expect)> = Vec::new();
    let mut add =
        |what: String, spec: ContainerSpec, expect: Expect| specs.push((what, spec, expect));

    // Scenario 3 and the image deny list: docker:*, dind:*, *:latest.
    let digest_image = |name: &str| format!("{name}@{DIGEST}");
    let denied_images = [
        "docker".to_owned(),
        "docker:24-dind".into(),
        "docker:dind".into(),
        "docker:latest".into(),
        "docker:27.3.1-cli".into(),
        "DOCKER:24-dind".into(),
        "Docker:24-DIND".into(),
        "library/docker:24".into(),
        "docker.io/docker:24".into(),
        "docker.io/library/docker:24".into(),
        "index.docker.io/library/docker:24".into(),
        "index.docker.io/docker:24".into(),
        "registry-1.docker.io/library/docker:24".into(),
        "registry.hub.docker.com/library/docker:24".into(),
        "DOCKER.IO/LIBRARY/DOCKER:24".into(),
        "Index.Docker.IO/Library/Docker:24-dind".into(),
        "docker.io:443/library/docker:24".into(),
        "mirror.gcr.io/library/docker:24".into(),
        "localhost:5000/docker:24".into(),
        "localhost/docker:24".into(),
        "127.0.0.1:5000/library/docker:dind".into(),
        "[::1]:5000/docker:24".into(),
        "ghcr.io/acme/docker:24".into(),
        "docker/docker:24".into(),
        digest_image("docker"),
        digest_image("docker:24-dind"),
        digest_image("docker.io/library/docker"),
        digest_image("index.docker.io/library/docker"),
        "dind".into(),
        "dind:1".into(),
        "DIND:1".into(),
        "acme/dind:1".into(),
        "quay.io/acme/dind:v2".into(),
        digest_image("acme/dind"),
        // A missing tag is latest.
        "ubuntu".into(),
        "UBUNTU".into(),
        "ubuntu:latest".into(),
        "Ubuntu:latest".into(),
        "library/ubuntu".into(),
        "docker.io/library/ubuntu:latest".into(),
        "index.docker.io/ubuntu".into(),
        "localhost:5000/team/app".into(),
        "ghcr.io/acme/app:latest".into(),
        format!("ubuntu:latest@{DIGEST}"),
        // The platform's own dev image, untagged and as latest.
        image.split(':').next().expect("image name").to_owned(),
        format!("{}:latest", image.split(':').next().expect("image name")),
        format!(
            "docker.io/{}:latest",
            image.split(':').next().expect("image name")
        ),
    ];
    for i in denied_images {
        add(format!("image {i:?}"), spec(&i), Rule("image.denied"));
    }
    let invalid_images = [
        "docker:".to_owned(),
        ":24".into(),
        "docker::24".into(),
        " docker:24".into(),
        "docker:24 ".into(),
        "docker :24".into(),
        "dockér:24".into(),
        "docker@sha256:abc".into(),
        format!("docker@sha256:{}", "A".repeat(64)),
        "http://docker.io/library/docker:24".into(),
        "../docker:24".into(),
        "-docker:24".into(),
        "docker:-24".into(),
        "docker.io//docker:24".into(),
        "docker.io/library/docker:24:25".into(),
        "docker.io/library/DOCKER:24/".into(),
        format!("{}:1", "a".repeat(300)),
        format!("docker:{}", "t".repeat(129)),
    ];
    for i in invalid_images {
        add(format!("image {i:?}"), spec(&i), Rule("image.invalid"));
    }
    add(
        "image with a tab".into(),
        spec("docker\t:24"),
        Rule("image.invalid"),
    );
    for i in ["", "   ", "docker\0:24", "docker\u{1b}[0m:24"] {
        add(format!("image {i:?}"), spec(i), Field("spec.image"));
    }
    add(
        "image of 600 bytes".into(),
        spec(&"d".repeat(600)),
        Field("spec.image"),
    );

    // Scenario 2: privileged mode.
    add(
        "privileged".into(),
        ContainerSpec {
            privileged: true,
            ..spec(image)
        },
        Rule("privileged"),
    );
    add(
        "privileged with the socket".into(),
        ContainerSpec {
            privileged: true,
            ..bind(image, "/var/run/docker.sock")
        },
        Rule("mount.docker_socket"),
    );

    // Scenario 1: the Docker socket, however it is spelled.
    for path in [
        "/var/run/docker.sock",
        "//var/run/docker.sock",
        "/var/run/../run/docker.sock",
        "/var/run/docker.sock/",
        "/var/run/docker.sock//",
        "/var/run/docker.sock/.",
        "/var/./run/docker.sock",
        "/var//run///docker.sock",
        "/tmp/../var/run/docker.sock",
        "/../../var/run/docker.sock",
        "/var/lib/../run/docker.sock",
        "/run/docker.sock",
        "/VAR/RUN/DOCKER.SOCK",
        "/Var/Run/Docker.Sock",
        "/var/run",
        "/var/run/",
        "/run",
        "/run/",
        "/var",
        "/",
        "//",
        "/.",
        "/..",
        "/var/run/docker",
        "/run/docker",
        "/run/containerd",
        "/run/containerd/containerd.sock",
        "/var/run/containerd/containerd.sock",
        "/run/user/1000/docker.sock",
        "/home/dev/.docker/run/docker.sock",
        "/proc/self/root/var/run/docker.sock",
        "/proc/1/root/run/docker.sock",
        "/mnt/host/var/run/docker.sock",
        "/run/podman/podman.sock",
    ] {
        add(
            format!("bind {path:?}"),
            bind(image, path),
            Rule("mount.docker_socket"),
        );
    }
    // Sensitive host paths.
    for path in [
        "/etc",
        "/etc/",
        "/ETC",
        "/etc/shadow",
        "/etc/docker",
        "/etc/../etc/passwd",
        "/home/../etc",
        "/proc",
        "/proc/1/root",
        "/proc/sys/kernel",
        "/sys",
        "/sys/fs/cgroup",
        "/dev",
        "/dev/mem",
        "/boot",
        "/root",
        "/root/.ssh",
        "/usr",
        "/usr/bin",
        "/lib",
        "/lib64",
        "/bin",
        "/sbin",
        "/var/lib/docker",
        "/var/lib/docker/volumes",
        "/VAR/LIB/DOCKER",
        "/var/lib",
        "/var/lib/containerd",
        "/var/lib/kubelet",
        "/var/log",
        "/var/run/secrets",
        "/run/secrets",
    ] {
        add(
            format!("bind {path:?}"),
            bind(image, path),
            Rule("mount.sensitive_path"),
        );
    }
    for path in [
        "/home/dev/project",
        "/tmp",
        "/srv",
        "/opt/data",
        "/workspace",
    ] {
        add(
            format!("bind {path:?}"),
            bind(image, path),
            Rule("mount.bind_not_allowed"),
        );
    }
    for path in ["", "relative/path", "~/x", "./x", "var/run/docker.sock"] {
        add(
            format!("bind {path:?}"),
            bind(image, path),
            Rule("mount.invalid"),
        );
    }
    add(
        "bind with a NUL".into(),
        bind(image, "/var/run/docker.sock\0"),
        Field("spec.mounts[0].source"),
    );
    add(
        "bind source of 2000 bytes".into(),
        bind(image, &format!("/{}", "a".repeat(2000))),
        Field("spec.mounts[0].source"),
    );
    let sock = "/var/run/docker.sock";
    add(
        "socket as a volume".into(),
        mount(image, MountType::Volume as i32, sock, "/s", None),
        Rule("mount.invalid"),
    );
    add(
        "socket as tmpfs".into(),
        mount(image, MountType::Tmpfs as i32, sock, "/s", None),
        Rule("mount.invalid"),
    );
    add(
        "socket, no mount type".into(),
        mount(image, 0, sock, "/s", None),
        Rule("mount.invalid"),
    );
    add(
        "socket, mount type 99".into(),
        mount(image, 99, sock, "/s", None),
        Rule("mount.invalid"),
    );
    for target in ["/", "//", "/workspace/..", "relative", ""] {
        add(
            format!("mount target {target:?}"),
            mount(image, MountType::Tmpfs as i32, "", target, None),
            Rule("mount.invalid"),
        );
    }
    add(
        "duplicate mount targets".into(),
        ContainerSpec {
            mounts: vec![tmpfs("/data"), tmpfs("/data/")],
            ..spec(image)
        },
        Rule("mount.invalid"),
    );
    for name in [
        "vibebox-ws-2f1c3e4a-9b7d-4c1e-8a2b-3c4d5e6f7a8b",
        "vibebox",
        "VIBEBOX",
        "Vibebox-data",
    ] {
        add(
            format!("volume {name:?}"),
            mount(image, MountType::Volume as i32, name, "/data", None),
            Rule("mount.volume_reserved"),
        );
    }
    for name in ["../x", "a/b", "/abs", "-x", ".x", "x y"] {
        add(
            format!("volume {name:?}"),
            mount(image, MountType::Volume as i32, name, "/data", None),
            Rule("mount.invalid"),
        );
    }
    for size in [0, -1, i64::MIN, 2049, i64::MAX] {
        add(
            format!("tmpfs of {size} MiB"),
            mount(image, MountType::Tmpfs as i32, "", "/scratch", Some(size)),
            Rule("mount.tmpfs_size"),
        );
    }
    add(
        "17 mounts".into(),
        ContainerSpec {
            mounts: (0..17).map(|i| tmpfs(&format!("/t{i}"))).collect(),
            ..spec(image)
        },
        Rule("mount.too_many"),
    );
    add(
        "33 mounts".into(),
        ContainerSpec {
            mounts: (0..33).map(|i| tmpfs(&format!("/t{i}"))).collect(),
            ..spec(image)
        },
        Field("spec.mounts"),
    );

    // Every way of writing root.
    let user = |u: &str| ContainerSpec {
        user: Some(u.into()),
        ..spec(image)
    };
    for u in [
        "root",
        "ROOT",
        "Root",
        "0",
        "00",
        "000",
        "0000000000",
        "0:0",
        "00:00",
        "root:root",
        "0:1000",
        "1000:0",
        "1000:000",
        "1000:root",
        "1000:ROOT",
        "root:1000",
        "0:root",
        "ROOT:0",
    ] {
        add(format!("user {u:?}"), user(u), Rule("user.root"));
    }
    for u in [
        "+0",
        "-0",
        " 0",
        "0 ",
        "0\n",
        "0\t",
        "4294967296",
        "99999999999999999999",
        "-1",
        "1000:",
        ":1000",
        ":",
        "0:0:0",
        "1000:1000:0",
        "０",
        "u id",
        "root;",
        "$(id -u)",
    ] {
        add(format!("user {u:?}"), user(u), Rule("user.invalid"));
    }
    for u in [
        "toor",
        "nobody",
        "dev",
        "admin:wheel",
        "1000:docker",
        "0x0",
        "root2",
        "daemon",
    ] {
        add(format!("user {u:?}"), user(u), Rule("user.name"));
    }
    add(
        "user of 65 bytes".into(),
        user(&"1".repeat(65)),
        Field("spec.user"),
    );

    // Capabilities in every accepted spelling.
    for c in [
        "SYS_ADMIN",
        "CAP_SYS_ADMIN",
        "sys_admin",
        "cap_sys_admin",
        "Cap_Sys_Admin",
        " SYS_ADMIN ",
        "ALL",
        "all",
        "CAP_ALL",
        "NET_ADMIN",
        "NET_RAW",
        "SYS_PTRACE",
        "SYS_MODULE",
        "SYS_RAWIO",
        "DAC_READ_SEARCH",
        "DAC_OVERRIDE",
        "SETUID",
        "SETGID",
        "MKNOD",
        "BPF",
        "PERFMON",
        "SYS_BOOT",
        "",
        "NONE",
    ] {
        add(
            format!("cap_add {c:?}"),
            ContainerSpec {
                cap_add: vec![c.into()],
                ..spec(image)
            },
            Rule("capability.add"),
        );
    }
    add(
        "cap_add 65 entries".into(),
        ContainerSpec {
            cap_add: vec!["CHOWN".into(); 65],
            ..spec(image)
        },
        Field("spec.cap_add"),
    );

    // Host and cross-environment namespaces.
    let other = "2f1c3e4a-9b7d-4c1e-8a2b-3c4d5e6f7a8b";
    for mode in [
        "host".to_owned(),
        "HOST".into(),
        " host".into(),
        "bridge".into(),
        "none".into(),
        "default".into(),
        format!("container:{other}"),
        format!("container:vibebox-{other}"),
        "ns:/proc/1/ns/net".into(),
    ] {
        add(
            format!("network_mode {mode:?}"),
            ContainerSpec {
                network_mode: mode.clone(),
                ..spec(image)
            },
            Rule("network.mode"),
        );
    }
    let ns_modes = [
        "host".to_owned(),
        "Host".into(),
        format!("container:vibebox-{other}"),
    ];
    for mode in &ns_modes {
        add(
            format!("pid_mode {mode:?}"),
            ContainerSpec {
                pid_mode: mode.clone(),
                ..spec(image)
            },
            Rule("namespace.pid"),
        );
        add(
            format!("ipc_mode {mode:?}"),
            ContainerSpec {
                ipc_mode: mode.clone(),
                ..spec(image)
            },
            Rule("namespace.ipc"),
        );
        add(
            format!("uts_mode {mode:?}"),
            ContainerSpec {
                uts_mode: mode.clone(),
                ..spec(image)
            },
            Rule("namespace.uts"),
        );
        add(
            format!("userns_mode {mode:?}"),
            ContainerSpec {
                userns_mode: mode.clone(),
                ..spec(image)
            },
            Rule("namespace.userns"),
        );
        add(
            format!("cgroupns_mode {mode:?}"),
            ContainerSpec {
                cgroupns_mode: mode.clone(),
                ..spec(image)
            },
            Rule("namespace.cgroupns"),
        );
    }
    add(
        "ipc_mode shareable".into(),
        ContainerSpec {
            ipc_mode: "shareable".into(),
            ..spec(image)
        },
        Rule("namespace.ipc"),
    );
    add(
        "pid_mode private".into(),
        ContainerSpec {
            pid_mode: "private".into(),
            ..spec(image)
        },
        Rule("namespace.pid"),
    );

    // Options that switch confinement off.
    let opt = |o: &str| ContainerSpec {
        security_opt: vec![o.into()],
        ..spec(image)
    };
    for o in [
        "seccomp=unconfined",
        "seccomp:unconfined",
        "SECCOMP=UNCONFINED",
        " seccomp = unconfined ",
        "apparmor=unconfined",
        "apparmor:unconfined",
        "AppArmor=Unconfined",
        "label=disable",
        "label:disable",
        "LABEL=DISABLE",
        "systempaths=unconfined",
    ] {
        add(
            format!("security_opt {o:?}"),
            opt(o),
            Rule("security_opt.unconfined"),
        );
    }
    for o in [
        "no-new-privileges=false",
        "no-new-privileges:false",
        "NO-NEW-PRIVILEGES=FALSE",
        "no-new-privileges=0",
        "no-new-privileges=no",
        "seccomp=/tmp/profile.json",
        "apparmor=docker-default",
        "label=type:spc_t",
        "label=user:system_u",
        "label=level:s0",
        "unmask=ALL",
        "privileged",
        "",
    ] {
        add(
            format!("security_opt {o:?}"),
            opt(o),
            Rule("security_opt.not_allowed"),
        );
    }
    add(
        "33 security options".into(),
        ContainerSpec {
            security_opt: vec!["no-new-privileges".into(); 33],
            ..spec(image)
        },
        Field("spec.security_opt"),
    );

    // Devices, sysctls, published ports.
    for d in [
        "/dev/sda",
        "/dev/mem",
        "/dev/kmsg",
        "/dev/fuse",
        "/dev/net/tun",
    ] {
        add(
            format!("device {d:?}"),
            ContainerSpec {
                devices: vec![Device {
                    host_path: d.into(),
                    container_path: d.into(),
                    permissions: "rwm".into(),
                }],
                ..spec(image)
            },
            Rule("device"),
        );
    }
    for s in [
        "kernel.core_pattern",
        "net.ipv4.ip_forward",
        "kernel.shm_rmid_forced",
        "net.core.somaxconn",
    ] {
        add(
            format!("sysctl {s:?}"),
            ContainerSpec {
                sysctls: BTreeMap::from([(s.into(), "1".into())]),
                ..spec(image)
            },
            Rule("sysctl"),
        );
    }
    for (container_port, host_port, host_ip) in [
        (80, 80, ""),
        (8080, 0, ""),
        (22, 2222, "0.0.0.0"),
        (5432, 5432, "::"),
    ] {
        add(
            format!("port {host_ip}:{host_port}->{container_port}"),
            ContainerSpec {
                ports: vec![PortMapping {
                    container_port,
                    host_port,
                    host_ip: host_ip.into(),
                    protocol: String::new(),
                }],
                ..spec(image)
            },
            Rule("port.publish"),
        );
    }

    // Forged platform labels.
    for l in [
        "vibebox.team",
        "vibebox.installation",
        "vibebox.environment",
        "vibebox.owner",
        "vibebox.managed",
        "vibebox.policy-digest",
        "VIBEBOX.TEAM",
        "Vibebox.Installation",
        " vibebox.team",
        "vibebox.team ",
        "vibebox",
        "vibebox.",
    ] {
        add(
            format!("label {l:?}"),
            ContainerSpec {
                labels: BTreeMap::from([(l.into(), "forged".into())]),
                ..spec(image)
            },
            Rule("label.reserved"),
        );
    }

    // Resources that mean "unlimited", too small, or over the ceiling.
    for cpu in [
        0.0,
        -0.0,
        -1.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::MIN,
    ] {
        add(
            format!("cpu {cpu}"),
            ContainerSpec {
                cpu_limit: Some(cpu),
                ..spec(image)
            },
            Field("spec.cpu_limit"),
        );
    }
    for cpu in [0.001, 1e-300, f64::MIN_POSITIVE] {
        add(
            format!("cpu {cpu}"),
            ContainerSpec {
                cpu_limit: Some(cpu),
                ..spec(image)
            },
            Rule("resources.invalid"),
        );
    }
    for cpu in [8.01, 9.0, 1e308, f64::MAX] {
        add(
            format!("cpu {cpu}"),
            ContainerSpec {
                cpu_limit: Some(cpu),
                ..spec(image)
            },
            Rule("resources.ceiling"),
        );
    }
    for m in [0, -1, i64::MIN] {
        add(
            format!("memory {m}"),
            ContainerSpec {
                memory_limit_mb: Some(m),
                ..spec(image)
            },
            Field("spec.memory_limit_mb"),
        );
    }
    for m in [1, 5] {
        add(
            format!("memory {m}"),
            ContainerSpec {
                memory_limit_mb: Some(m),
                ..spec(image)
            },
            Rule("resources.invalid"),
        );
    }
    for m in [16385, 1 << 40, i64::MAX] {
        add(
            format!("memory {m}"),
            ContainerSpec {
                memory_limit_mb: Some(m),
                ..spec(image)
            },
            Rule("resources.ceiling"),
        );
    }
    for n in [0, -1, i64::MIN] {
        add(
            format!("pids {n}"),
            ContainerSpec {
                pids_limit: Some(n),
                ..spec(image)
            },
            Field("spec.pids_limit"),
        );
    }
    for n in [4097, i64::MAX] {
        add(
            format!("pids {n}"),
            ContainerSpec {
                pids_limit: Some(n),
                ..spec(image)
            },
            Rule("resources.ceiling"),
        );
    }

    // Oversized and malformed specs.
    let env = |pairs: Vec<(String, String)>| ContainerSpec {
        env: pairs.into_iter().collect(),
        ..spec(image)
    };
    add(
        "env name empty".into(),
        env(vec![(String::new(), "x".into())]),
        Field("spec.env"),
    );
    add(
        "env name with '='".into(),
        env(vec![("A=B".into(), "x".into())]),
        Field("spec.env"),
    );
    add(
        "env name with NUL".into(),
        env(vec![("A\0B".into(), "x".into())]),
        Field("spec.env"),
    );
    add(
        "env value with NUL".into(),
        env(vec![("A".into(), "x\0y".into())]),
        Field("spec.env"),
    );
    add(
        "env value of 1 MB".into(),
        env(vec![("A".into(), "x".repeat(1_000_000))]),
        Field("spec.env"),
    );
    add(
        "env name of 300 bytes".into(),
        env(vec![("A".repeat(300), "x".into())]),
        Field("spec.env"),
    );
    add(
        "257 env entries".into(),
        env((0..257).map(|i| (format!("V{i}"), "x".into())).collect()),
        Field("spec.env"),
    );
    add(
        "8 MB of env".into(),
        env((0..255)
            .map(|i| (format!("V{i}"), "x".repeat(32 * 1024)))
            .collect()),
        Transport(Code::OutOfRange),
    );
    add(
        "257 command words".into(),
        ContainerSpec {
            command: vec!["x".into(); 257],
            ..spec(image)
        },
        Field("spec.command"),
    );
    add(
        "a command word of 9000 bytes".into(),
        ContainerSpec {
            command: vec!["x".repeat(9000)],
            ..spec(image)
        },
        Field("spec.command"),
    );
    add(
        "2 MB of command".into(),
        ContainerSpec {
            command: vec!["x".repeat(8192); 256],
            ..spec(image)
        },
        Transport(Code::OutOfRange),
    );
    add(
        "65 entrypoint words".into(),
        ContainerSpec {
            entrypoint: vec!["x".into(); 65],
            ..spec(image)
        },
        Field("spec.entrypoint"),
    );
    add(
        "65 labels".into(),
        ContainerSpec {
            labels: (0..65).map(|i| (format!("l{i}"), "x".into())).collect(),
            ..spec(image)
        },
        Field("spec.labels"),
    );
    add(
        "65 sysctls".into(),
        ContainerSpec {
            sysctls: (0..65).map(|i| (format!("s{i}"), "x".into())).collect(),
            ..spec(image)
        },
        Field("spec.sysctls"),
    );
    add(
        "33 devices".into(),
        ContainerSpec {
            devices: vec![Device::default(); 33],
            ..spec(image)
        },
        Field("spec.devices"),
    );
    add(
        "65 ports".into(),
        ContainerSpec {
            ports: vec![
                PortMapping {
                    container_port: 80,
                    ..Default::default()
                };
                65
            ],
            ..spec(image)
        },
        Field("spec.ports"),
    );
    add(
        "port 0".into(),
        ContainerSpec {
            ports: vec![PortMapping::default()],
            ..spec(image)
        },
        Field("spec.ports[0].container_port"),
    );
    add(
        "network_mode of 300 bytes".into(),
        ContainerSpec {
            network_mode: "h".repeat(300),
            ..spec(image)
        },
        Field("spec.network_mode"),
    );
    for dir in ["relative", "./x", "~"] {
        add(
            format!("working_dir {dir:?}"),
            ContainerSpec {
                working_dir: dir.into(),
                ..spec(image)
            },
            Rule("working_dir.invalid"),
        );
    }
    add(
        "working_dir of 2000 bytes".into(),
        ContainerSpec {
            working_dir: format!("/{}", "w".repeat(2000)),
            ..spec(image)
        },
        Field("spec.working_dir"),
    );

    let mut cases: Vec<Case> = specs
        .into_iter()
        .enumerate()
        .map(|(n, (what, spec, expect))| Case {
            what,
            request: CreateEnvironmentRequest {
                labels: Default::default(),
                request_id: format!("attack-{n}"),
                team_id: team.into(),
                name: format!("attack-{n}"),
                spec: Some(spec),
            },
            expect,
        })
        .collect();

    // Malformed requests around a valid spec.
    let good = || CreateEnvironmentRequest {
        labels: Default::default(),
        request_id: String::new(),
        team_id: team.into(),
        name: "fine".into(),
        spec: Some(spec(image)),
    };
    let mut request = |what: &str, request: CreateEnvironmentRequest, field: &'static str| {
        cases.push(Case {
            what: what.into(),
            request,
            expect: Field(field),
        })
    };
    for name in [
        "Bad Name",
        "",
        "-x",
        "x/../y",
        "ümlaut",
        "a\0b",
        &"a".repeat(64),
    ] {
        request(
            &format!("name {name:?}"),
            CreateEnvironmentRequest {
                name: name.into(),
                ..good()
            },
            "name",
        );
    }
    for id in ["a/b", "../x", "id with space", &"r".repeat(129)] {
        request(
            &format!("request_id {id:?}"),
            CreateEnvironmentRequest {
                request_id: id.into(),
                ..good()
            },
            "request_id",
        );
    }
    for id in ["", "../other", "team\0", &"t".repeat(129)] {
        request(
            &format!("team_id {id:?}"),
            CreateEnvironmentRequest {
                team_id: id.into(),
                ..good()
            },
            "team_id",
        );
    }
    request(
        "no spec",
        CreateEnvironmentRequest {
            spec: None,
            ..good()
        },
        "spec",
    );
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_refuses_every_spelling_of_a_forbidden_spec_creates_nothing_and_audits_it() {
    let mut report = SuiteReport::new(
        "attack",
        "policy_refuses_every_spelling_of_a_forbidden_spec",
    );
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let installation = p.installation_id().expect("installation id");
    let alpha = team(&p, &admin, "alpha").await;
    let (dev_id, dev) = member(&p, &admin, "dev", &alpha, TeamRole::Developer).await;

    // Controls: the base spec of every case is allowed, and the environments
    // it (and tightened variants) create run hardened.
    let plain = create_ok(&p, &dev, &alpha, "control", spec(&image)).await;
    assert_hardened(&p, &dev, &plain, &Expected::default(), &mut report).await;
    let tight = create_ok(
        &p,
        &dev,
        &alpha,
        "tight",
        ContainerSpec {
            user: Some("2000:3000".into()),
            cpu_limit: Some(0.5),
            memory_limit_mb: Some(64),
            pids_limit: Some(64),
            read_only_rootfs: Some(true),
            ..spec(&image)
        },
    )
    .await;
    let tight_expected = Expected {
        uid: 2000,
        gid: 3000,
        nano_cpus: 500_000_000,
        memory_bytes: 64 * 1024 * 1024,
        pids: 64,
        read_only_rootfs: true,
    };
    assert_hardened(&p, &dev, &tight, &tight_expected, &mut report).await;
    // A bare uid gets the platform's group, never the image's (or gid 0).
    let bare = create_ok(
        &p,
        &dev,
        &alpha,
        "bare-uid",
        ContainerSpec {
            user: Some("1234".into()),
            memory_limit_mb: Some(64),
            cpu_limit: Some(0.25),
            pids_limit: Some(32),
            ..spec(&image)
        },
    )
    .await;
    let bare_expected = Expected {
        uid: 1234,
        gid: 1000,
        nano_cpus: 250_000_000,
        memory_bytes: 64 * 1024 * 1024,
        pids: 32,
        read_only_rootfs: false,
    };
    assert_hardened(&p, &dev, &bare, &bare_expected, &mut report).await;
    let before = labelled_objects(&installation);
    let mut expected_objects: Vec<String> = [&plain, &tight, &bare]
        .iter()
        .flat_map(|e| objects_of(e))
        .collect();
    expected_objects.sort();
    assert_eq!(before, expected_objects, "the controls' objects");

    // The attacks.
    let cases = policy_cases(&image, &alpha);
    let mut failures: Vec<String> = Vec::new();
    let mut audited: Vec<(String, &'static str, Severity)> = Vec::new();
    let (mut by_policy, mut by_gateway) = (0u64, 0u64);
    for (n, case) in cases.iter().enumerate() {
        let header_id = format!("attack-case-{n}");
        let result = patiently(|| {
            let mut client = p.environments(&dev);
            let request = with_id(&header_id, case.request.clone());
            async move { client.create_environment(request).await }
        })
        .await;
        let status = match result {
            Ok(created) => {
                failures.push(format!(
                    "ALLOWED (hole): {} -> {:?}",
                    case.what,
                    created.into_inner().environment
                ));
                report.case(false);
                continue;
            }
            Err(status) => status,
        };
        let refusal = Refusal::of(&status);
        let ok = match case.expect {
            Expect::Rule(rule) => {
                let rules = refusal.rule_ids();
                let ok = matches!(
                    refusal.code,
                    Code::FailedPrecondition | Code::InvalidArgument
                ) && rules.iter().any(|r| r == rule);
                if ok {
                    by_policy += 1;
                    audited.push((header_id.clone(), rule, promised_severity(&rules)));
                }
                ok
            }
            Expect::Field(field) => {
                let ok = refusal.code == Code::InvalidArgument && refusal.names_field(field);
                by_gateway += u64::from(ok);
                ok
            }
            Expect::Code(code) => refusal.code == code,
        };
        if !ok {
            failures.push(format!(
                "{}: expected {:?}, got {refusal:?}",
                case.what, case.expect
            ));
        }
        report.case(ok);
    }
    report.note("refused_by_policy_with_rule_id", by_policy);
    report.note("refused_by_gateway_field_validation", by_gateway);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Nothing was created: exactly the controls' objects exist.
    assert_eq!(
        labelled_objects(&installation),
        expected_objects,
        "the attacks created nothing"
    );

    // Every policy refusal is audited as policy.deny with the promised severity.
    let ids: Vec<String> = audited.iter().map(|(id, _, _)| id.clone()).collect();
    let events = events_for(&p, &admin, "policy.deny", &ids).await;
    let mut audit_failures = Vec::new();
    for (id, rule, severity) in &audited {
        let found = events[id].iter().any(|e| {
            e.severity == *severity as i32
                && e.outcome == vibebox_proto::audit::Outcome::Denied as i32
                && e.team_id == alpha
                && e.actor.as_ref().is_some_and(|a| a.user_id == dev_id)
                && vibebox_tests::attack::detail_strings(e, "rule_ids")
                    .iter()
                    .any(|r| r == rule)
        });
        if !found {
            audit_failures.push(format!("{id} ({rule}, {severity:?}): {:?}", events[id]));
        }
    }
    assert!(
        audit_failures.is_empty(),
        "badly audited refusals:\n{}",
        audit_failures.join("\n")
    );
    let critical = audited
        .iter()
        .filter(|(_, _, s)| *s == Severity::Critical)
        .count();
    report.note("audited_policy_denials", audited.len());
    report.note("audited_critical", critical);
}
