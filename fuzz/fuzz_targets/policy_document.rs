//! Policy files (TOML, `--policy-file`): never panics; an accepted document's
//! canonical text is a fixed point with the same digest; whatever it says,
//! the built-in denials hold (Docker socket, privileged, root, devices, host
//! namespaces, sensitive paths) for the base and every team; and a team
//! overlay only tightens: a probe spec built from the document's own values
//! that a team may run, the base policy allows too. Egress is the exception
//! (a team's `[egress]` replaces the base one and may widen it): its probes
//! are judged by the hardened-spec invariants only.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use vibebox_fuzz::check_outcome;
use vibebox_policy::egress::Mode;
use vibebox_policy::{Policy, Rule, evaluate};
use vibebox_proto::environment::{
    ContainerSpec, Device, Egress, EgressMode, EgressRule, Lifetime, Mount, MountType, PortMapping,
};

fn bind(source: &str, target: &str) -> Mount {
    Mount {
        r#type: MountType::Bind as i32,
        source: source.to_owned(),
        target: target.to_owned(),
        read_only: false,
        size_mb: None,
    }
}

/// A concrete image matching a pattern (wildcards filled in).
fn image_for(pattern: &str) -> String {
    let filled = pattern.replace(['*', '?'], "x");
    if filled.contains(':') && !filled.ends_with(':') {
        filled
    } else {
        format!("{filled}:1")
    }
}

/// Specs built from the document's own values.
fn probes(policy: &Policy) -> Vec<ContainerSpec> {
    let doc = policy.document();
    let benign = ContainerSpec {
        image: "python:3.12".into(),
        ..Default::default()
    };
    let mut out = vec![benign.clone()];
    let mut images: Vec<&String> = doc.images.allow.iter().chain(&doc.images.deny).collect();
    let mut prefixes: Vec<&String> = doc.mounts.allow_bind_prefixes.iter().collect();
    let mut caps = doc.capabilities.allow_add.clone();
    let mut limits = vec![(
        Some(doc.resources.max_cpus),
        Some(doc.resources.max_memory_mb),
        Some(doc.resources.max_pids),
    )];
    let mut mounts = vec![doc.mounts.max_mounts];
    let l = &doc.lifetime;
    let mut lifetimes = vec![(
        Some(l.idle_timeout.0),
        Some(l.idle_cpu_percent),
        Some(l.lifetime.0),
        Some(l.max_lifetime.0),
        Some(doc.files.copy_limit_mb),
    )];
    for overlay in doc.teams.values() {
        if let Some(l) = &overlay.lifetime {
            lifetimes.push((
                l.idle_timeout.map(|d| d.0),
                l.idle_cpu_percent,
                l.lifetime.map(|d| d.0),
                l.max_lifetime.map(|d| d.0),
                overlay.files.as_ref().and_then(|f| f.copy_limit_mb),
            ));
        }
        images.extend(overlay.allow_images.iter().flatten());
        images.extend(&overlay.deny_images);
        prefixes.extend(overlay.allow_bind_prefixes.iter().flatten());
        caps.extend(overlay.allow_cap_add.iter().flatten().cloned());
        limits.push((overlay.max_cpus, overlay.max_memory_mb, overlay.max_pids));
        mounts.extend(overlay.max_mounts);
    }
    for image in images.into_iter().take(16) {
        out.push(ContainerSpec {
            image: image_for(image),
            ..benign.clone()
        });
    }
    for prefix in prefixes.into_iter().take(16) {
        out.push(ContainerSpec {
            mounts: vec![bind(&format!("{prefix}/project"), "/mnt/project")],
            ..benign.clone()
        });
    }
    out.push(ContainerSpec {
        cap_add: caps.into_iter().take(16).collect(),
        ..benign.clone()
    });
    out.push(ContainerSpec {
        sysctls: doc
            .sysctls
            .allow
            .iter()
            .take(16)
            .map(|s| (s.clone(), "1".to_owned()))
            .collect(),
        ports: vec![PortMapping {
            container_port: 8080,
            host_port: 18080,
            host_ip: String::new(),
            protocol: "tcp".into(),
        }],
        user: Some("nobody".into()),
        read_only_rootfs: Some(false),
        ..benign.clone()
    });
    for (cpu_limit, memory_limit_mb, pids_limit) in limits.into_iter().take(8) {
        out.push(ContainerSpec {
            cpu_limit,
            memory_limit_mb,
            pids_limit,
            ..benign.clone()
        });
    }
    for (idle, cpu, lifetime, max, copy) in lifetimes.into_iter().take(8) {
        out.push(ContainerSpec {
            lifetime: Some(Lifetime {
                idle_timeout_seconds: idle,
                idle_cpu_percent: cpu,
                lifetime_seconds: lifetime,
                max_lifetime_seconds: max,
            }),
            copy_limit_mb: copy,
            ..benign.clone()
        });
    }
    for n in mounts.into_iter().take(8) {
        out.push(ContainerSpec {
            mounts: (0..n.min(32))
                .map(|i| Mount {
                    r#type: MountType::Tmpfs as i32,
                    source: String::new(),
                    target: format!("/scratch/{i}"),
                    read_only: false,
                    size_mb: None,
                })
                .collect(),
            ..benign.clone()
        });
    }
    out
}

/// Egress requests built from the document's own sections (each mode, and
/// each rule alone): a team may ask for what its section allows, which the
/// base may not.
fn egress_probes(policy: &Policy) -> Vec<ContainerSpec> {
    let doc = policy.document();
    let sections = std::iter::once(&doc.egress)
        .chain(doc.teams.values().filter_map(|o| o.egress.as_ref()))
        .take(8);
    let mut out = Vec::new();
    for section in sections {
        let mode = match section.mode {
            Mode::None => EgressMode::None,
            Mode::AllowList => EgressMode::AllowList,
            Mode::Internet => EgressMode::Internet,
        };
        let rules: Vec<EgressRule> = section
            .allow
            .iter()
            .take(16)
            .map(|r| EgressRule {
                host: r.host.clone().unwrap_or_default(),
                cidr: r.cidr.clone().unwrap_or_default(),
                ports: r.ports.clone(),
            })
            .collect();
        let spec = |mode: EgressMode, allow: Vec<EgressRule>| ContainerSpec {
            image: "python:3.12".into(),
            egress: Some(Egress {
                mode: mode as i32,
                allow,
            }),
            ..Default::default()
        };
        out.push(spec(mode, rules.clone()));
        for r in rules {
            out.push(spec(EgressMode::AllowList, vec![r]));
        }
    }
    out
}

/// Specs no document can allow, with the rule that must deny each.
fn forbidden() -> Vec<(ContainerSpec, Rule)> {
    let benign = ContainerSpec {
        image: "python:3.12".into(),
        ..Default::default()
    };
    vec![
        (
            ContainerSpec {
                mounts: vec![bind("//var/run/./docker.sock", "/var/run/docker.sock")],
                ..benign.clone()
            },
            Rule::MountDockerSocket,
        ),
        (
            ContainerSpec {
                mounts: vec![bind("/RUN/containerd", "/c")],
                ..benign.clone()
            },
            Rule::MountDockerSocket,
        ),
        (
            ContainerSpec {
                mounts: vec![bind("/etc/../var/lib/docker", "/d")],
                ..benign.clone()
            },
            Rule::MountSensitivePath,
        ),
        (
            ContainerSpec {
                privileged: true,
                ..benign.clone()
            },
            Rule::Privileged,
        ),
        (
            ContainerSpec {
                user: Some("0:1000".into()),
                ..benign.clone()
            },
            Rule::UserRoot,
        ),
        (
            ContainerSpec {
                devices: vec![Device {
                    host_path: "/dev/sda".into(),
                    container_path: "/dev/sda".into(),
                    permissions: "rwm".into(),
                }],
                ..benign.clone()
            },
            Rule::Device,
        ),
        (
            ContainerSpec {
                pid_mode: "host".into(),
                ..benign.clone()
            },
            Rule::NamespacePid,
        ),
        (
            ContainerSpec {
                network_mode: "host".into(),
                ..benign.clone()
            },
            Rule::NetworkMode,
        ),
        (
            ContainerSpec {
                cap_add: vec!["ALL".into()],
                ..benign.clone()
            },
            Rule::CapabilityAdd,
        ),
        (
            ContainerSpec {
                security_opt: vec!["seccomp=unconfined".into()],
                ..benign.clone()
            },
            Rule::SecurityOptUnconfined,
        ),
        (
            ContainerSpec {
                labels: BTreeMap::from([("vibebox.team".into(), "x".into())]),
                ..benign
            },
            Rule::LabelReserved,
        ),
    ]
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::from_toml(text) else {
        return;
    };
    let again = Policy::from_toml(policy.text())
        .unwrap_or_else(|e| panic!("canonical text does not parse: {e}\n{}", policy.text()));
    assert_eq!(
        again.text(),
        policy.text(),
        "canonical text is a fixed point"
    );
    assert_eq!(again.digest(), policy.digest());
    assert_eq!(again.document(), policy.document());

    let teams: Vec<&str> = policy.document().teams.keys().map(String::as_str).collect();
    for (spec, rule) in forbidden() {
        for team in std::iter::once("").chain(teams.iter().copied()) {
            let outcome = evaluate(policy.rules_for(team), &spec);
            assert!(outcome.has(rule), "{rule} lifted for team {team:?}");
        }
    }
    for spec in probes(&policy) {
        let base = evaluate(policy.rules_for(""), &spec);
        check_outcome(&policy, "", &spec, &base);
        for team in &teams {
            let outcome = evaluate(policy.rules_for(team), &spec);
            check_outcome(&policy, team, &spec, &outcome);
            if outcome.allowed() {
                assert!(
                    base.allowed(),
                    "team {team:?} may run a spec the base policy denies ({:?}): {spec:?}",
                    base.violations
                );
            }
        }
    }
    for spec in egress_probes(&policy) {
        for team in std::iter::once("").chain(teams.iter().copied()) {
            let outcome = evaluate(policy.rules_for(team), &spec);
            check_outcome(&policy, team, &spec, &outcome);
        }
    }
});
