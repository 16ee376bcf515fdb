//! The spec file (`env create --file spec.toml`, `policy check SPEC`): a
//! serde mirror of `ContainerSpec` in TOML (or JSON), plus the spec built
//! from `env create` flags.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use vibebox_policy::duration::Seconds;
use vibebox_policy::egress::Mode;
use vibebox_proto::environment::{
    ContainerSpec, Device, Egress, EgressMode, EgressRule, Lifetime, Mount, MountType, PortMapping,
};

/// A container spec as written by users.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpecFile {
    /// Environment name (used by `env create` when no NAME is given).
    #[serde(default)]
    pub(crate) name: Option<String>,
    /// Team id or name (used by `env create` when no `--team` is given).
    #[serde(default)]
    pub(crate) team: Option<String>,
    pub(crate) image: String,
    #[serde(default)]
    pub(crate) command: Vec<String>,
    #[serde(default)]
    pub(crate) entrypoint: Vec<String>,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) working_dir: String,
    #[serde(default)]
    pub(crate) user: Option<String>,
    #[serde(default)]
    pub(crate) privileged: bool,
    #[serde(default)]
    pub(crate) cap_add: Vec<String>,
    #[serde(default)]
    pub(crate) cap_drop: Vec<String>,
    #[serde(default)]
    pub(crate) mounts: Vec<MountFile>,
    #[serde(default)]
    pub(crate) devices: Vec<DeviceFile>,
    #[serde(default)]
    pub(crate) network_mode: String,
    #[serde(default)]
    pub(crate) pid_mode: String,
    #[serde(default)]
    pub(crate) ipc_mode: String,
    #[serde(default)]
    pub(crate) uts_mode: String,
    #[serde(default)]
    pub(crate) userns_mode: String,
    #[serde(default)]
    pub(crate) cgroupns_mode: String,
    #[serde(default)]
    pub(crate) security_opt: Vec<String>,
    #[serde(default)]
    pub(crate) sysctls: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) read_only_rootfs: Option<bool>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    /// CPUs (e.g. 1.5).
    #[serde(default)]
    pub(crate) cpu: Option<f64>,
    /// Memory in MiB.
    #[serde(default)]
    pub(crate) memory_mb: Option<i64>,
    #[serde(default)]
    pub(crate) pids_limit: Option<i64>,
    #[serde(default)]
    pub(crate) ports: Vec<PortFile>,
    /// Outbound access to ask for (at most what policy allows); absent:
    /// the policy's decision for the team.
    #[serde(default)]
    pub(crate) egress: Option<EgressFile>,
    /// Idle stop and lifetime to ask for (at most policy's); absent fields:
    /// the policy's values.
    #[serde(default)]
    pub(crate) lifetime: Option<LifetimeFile>,
    /// Largest archive one copy may move, in MiB (at most policy's).
    #[serde(default)]
    pub(crate) copy_limit_mb: Option<i64>,
}

/// `[egress]`: `mode = "none" | "allow-list" | "internet"` and `allow`
/// rules `{ host = "*.github.com", ports = [443] }` or `{ cidr = "203.0.113.0/24" }`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EgressFile {
    pub(crate) mode: Mode,
    #[serde(default)]
    pub(crate) allow: Vec<EgressRuleFile>,
}

/// One allowed destination: `host` or `cidr`, and `ports` (empty: any).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EgressRuleFile {
    #[serde(default)]
    pub(crate) host: String,
    #[serde(default)]
    pub(crate) cidr: String,
    #[serde(default)]
    pub(crate) ports: Vec<u32>,
}

/// `[lifetime]`: durations as `"30m"`, `"8h"`, `"7d"` or `"never"`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LifetimeFile {
    #[serde(default)]
    pub(crate) idle_timeout: Option<Seconds>,
    #[serde(default)]
    pub(crate) idle_cpu_percent: Option<f64>,
    #[serde(default)]
    pub(crate) lifetime: Option<Seconds>,
    #[serde(default)]
    pub(crate) max_lifetime: Option<Seconds>,
}

/// A mount: `type` is bind, volume or tmpfs.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MountFile {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) source: String,
    pub(crate) target: String,
    #[serde(default)]
    pub(crate) read_only: bool,
    #[serde(default)]
    pub(crate) size_mb: Option<i64>,
}

/// A host device.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeviceFile {
    pub(crate) host_path: String,
    #[serde(default)]
    pub(crate) container_path: String,
    #[serde(default)]
    pub(crate) permissions: String,
}

/// A published port.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PortFile {
    pub(crate) container_port: u32,
    #[serde(default)]
    pub(crate) host_port: u32,
    #[serde(default)]
    pub(crate) host_ip: String,
    #[serde(default)]
    pub(crate) protocol: String,
}

impl SpecFile {
    /// Reads a TOML (or, by extension, JSON) spec file.
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        } else {
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        }
    }

    /// The wire spec.
    pub(crate) fn to_proto(&self) -> Result<ContainerSpec> {
        let mounts = self
            .mounts
            .iter()
            .map(|m| {
                let kind = match m.kind.to_ascii_lowercase().as_str() {
                    "bind" => MountType::Bind,
                    "volume" => MountType::Volume,
                    "tmpfs" => MountType::Tmpfs,
                    other => bail!("mount type {other:?} is not bind, volume or tmpfs"),
                };
                Ok(Mount {
                    r#type: kind as i32,
                    source: m.source.clone(),
                    target: m.target.clone(),
                    read_only: m.read_only,
                    size_mb: m.size_mb,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ContainerSpec {
            image: self.image.clone(),
            command: self.command.clone(),
            env: self.env.clone(),
            working_dir: self.working_dir.clone(),
            user: self.user.clone(),
            privileged: self.privileged,
            cap_add: self.cap_add.clone(),
            cap_drop: self.cap_drop.clone(),
            mounts,
            devices: self
                .devices
                .iter()
                .map(|d| Device {
                    host_path: d.host_path.clone(),
                    container_path: d.container_path.clone(),
                    permissions: d.permissions.clone(),
                })
                .collect(),
            network_mode: self.network_mode.clone(),
            pid_mode: self.pid_mode.clone(),
            ipc_mode: self.ipc_mode.clone(),
            uts_mode: self.uts_mode.clone(),
            userns_mode: self.userns_mode.clone(),
            cgroupns_mode: self.cgroupns_mode.clone(),
            security_opt: self.security_opt.clone(),
            sysctls: self.sysctls.clone(),
            read_only_rootfs: self.read_only_rootfs,
            labels: self.labels.clone(),
            cpu_limit: self.cpu,
            memory_limit_mb: self.memory_mb,
            pids_limit: self.pids_limit,
            ports: self
                .ports
                .iter()
                .map(|p| PortMapping {
                    container_port: p.container_port,
                    host_port: p.host_port,
                    host_ip: p.host_ip.clone(),
                    protocol: p.protocol.clone(),
                })
                .collect(),
            entrypoint: self.entrypoint.clone(),
            egress: self.egress.as_ref().map(|e| Egress {
                mode: match e.mode {
                    Mode::None => EgressMode::None,
                    Mode::AllowList => EgressMode::AllowList,
                    Mode::Internet => EgressMode::Internet,
                } as i32,
                allow: e
                    .allow
                    .iter()
                    .map(|r| EgressRule {
                        host: r.host.clone(),
                        cidr: r.cidr.clone(),
                        ports: r.ports.clone(),
                    })
                    .collect(),
            }),
            lifetime: self.lifetime.as_ref().map(|l| Lifetime {
                idle_timeout_seconds: l.idle_timeout.map(|d| d.0),
                idle_cpu_percent: l.idle_cpu_percent,
                lifetime_seconds: l.lifetime.map(|d| d.0),
                max_lifetime_seconds: l.max_lifetime.map(|d| d.0),
            }),
            copy_limit_mb: self.copy_limit_mb,
        })
    }
}

/// Parses a memory size: `512m`, `2g`, `1024` (MiB).
pub(crate) fn parse_memory_mb(s: &str) -> Result<i64> {
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches('b').trim_end_matches('i');
    let (num, mult) = match lower.chars().last() {
        Some('g') => (&lower[..lower.len() - 1], 1024),
        Some('m') => (&lower[..lower.len() - 1], 1),
        _ => (lower, 1),
    };
    let invalid = || format!("invalid memory size {s:?} (a positive size, e.g. 512m, 2g)");
    let n: i64 = num.trim().parse().with_context(invalid)?;
    n.checked_mul(mult)
        .filter(|mb| *mb > 0)
        .with_context(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_file_maps_to_proto() {
        let spec: SpecFile = toml::from_str(
            r#"
            image = "busybox"
            command = ["sleep", "infinity"]
            cpu = 1.5
            memory_mb = 512
            privileged = true
            [env]
            A = "1"
            [[mounts]]
            type = "tmpfs"
            target = "/tmp"
            "#,
        )
        .unwrap();
        let p = spec.to_proto().unwrap();
        assert_eq!(p.image, "busybox");
        assert_eq!(p.cpu_limit, Some(1.5));
        assert_eq!(p.memory_limit_mb, Some(512));
        assert!(p.privileged);
        assert_eq!(p.mounts[0].r#type, MountType::Tmpfs as i32);
        assert_eq!(p.env.get("A").map(String::as_str), Some("1"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<SpecFile>("image = \"x\"\nimagee = 1").is_err());
        for bad in [
            "image = \"x\"\n[egress]\nmode = \"open\"",
            "image = \"x\"\n[egress]\nallow = []",
            "image = \"x\"\n[egress]\nmode = \"none\"\nextra = 1",
            "image = \"x\"\n[egress]\nmode = \"allow-list\"\nallow = [{ hosts = \"a.com\" }]",
            "image = \"x\"\n[lifetime]\nidle_timeout = 1800",
            "image = \"x\"\n[lifetime]\nidle_timeout = \"1.5h\"",
            "image = \"x\"\n[lifetime]\nidle = \"1h\"",
        ] {
            assert!(toml::from_str::<SpecFile>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn egress_lifetime_and_copy_limit_map_to_proto() {
        let spec: SpecFile = toml::from_str(
            r#"
            image = "busybox"
            copy_limit_mb = 64
            [egress]
            mode = "allow-list"
            allow = [
                { host = "*.github.com", ports = [443] },
                { cidr = "203.0.113.0/24", ports = [80, 443] },
            ]
            [lifetime]
            idle_timeout = "30m"
            lifetime = "8h"
            max_lifetime = "never"
            "#,
        )
        .unwrap();
        let p = spec.to_proto().unwrap();
        assert_eq!(
            p.egress,
            Some(Egress {
                mode: EgressMode::AllowList as i32,
                allow: vec![
                    EgressRule {
                        host: "*.github.com".into(),
                        cidr: String::new(),
                        ports: vec![443],
                    },
                    EgressRule {
                        host: String::new(),
                        cidr: "203.0.113.0/24".into(),
                        ports: vec![80, 443],
                    },
                ],
            })
        );
        assert_eq!(
            p.lifetime,
            Some(Lifetime {
                idle_timeout_seconds: Some(1800),
                idle_cpu_percent: None,
                lifetime_seconds: Some(28_800),
                max_lifetime_seconds: Some(0),
            })
        );
        assert_eq!(p.copy_limit_mb, Some(64));
        // JSON spells them the same way.
        let json: SpecFile = serde_json::from_str(
            r#"{"image": "busybox", "egress": {"mode": "internet"},
                "lifetime": {"idle_timeout": "1h"}}"#,
        )
        .unwrap();
        let p = json.to_proto().unwrap();
        assert_eq!(p.egress.unwrap().mode, EgressMode::Internet as i32);
        assert_eq!(p.lifetime.unwrap().idle_timeout_seconds, Some(3600));
        // Absent sections leave the policy to decide.
        let p = toml::from_str::<SpecFile>("image = \"x\"")
            .unwrap()
            .to_proto()
            .unwrap();
        assert_eq!((p.egress, p.lifetime, p.copy_limit_mb), (None, None, None));
        let p = toml::from_str::<SpecFile>("image = \"x\"\n[egress]\nmode = \"none\"")
            .unwrap()
            .to_proto()
            .unwrap();
        assert_eq!(p.egress.unwrap().mode, EgressMode::None as i32);
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mb("512m").unwrap(), 512);
        assert_eq!(parse_memory_mb("2g").unwrap(), 2048);
        assert_eq!(parse_memory_mb("2GiB").unwrap(), 2048);
        assert_eq!(parse_memory_mb("300").unwrap(), 300);
        assert_eq!(parse_memory_mb("1g").unwrap(), 1024);
        assert_eq!(parse_memory_mb("512MB").unwrap(), 512);
        assert_eq!(parse_memory_mb(" 64 m ").unwrap(), 64);
        for bad in [
            "-5m",
            "0",
            "9223372036854775807g",
            "m",
            "12x",
            "",
            "1.5g",
            "512k",
        ] {
            assert!(parse_memory_mb(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_memory_mb("lots").is_err());
    }
}
