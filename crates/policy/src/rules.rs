//! The catalogue of rules: stable ids, severities, and the matching CIS
//! Docker Benchmark (section 5) and Pod Security Standards controls.

use std::fmt;

/// How bad a violation is. Docker socket mounts and privileged mode are
/// critical (escape attempts); other denials are high or medium; malformed
/// input is low.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

/// Whether a violation is malformed input or a forbidden request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The spec is malformed (fail closed: denied, reported as a bad argument).
    Invalid,
    /// The spec asks for something the policy forbids.
    Forbidden,
}

macro_rules! rules {
    ($( $variant:ident => $id:literal, $kind:ident, $sev:ident, $cis:literal, $pss:literal; )*) => {
        /// A rule of the policy. Its id is stable API: clients, alerts and
        /// audit queries match on it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Rule { $( $variant, )* }

        impl Rule {
            /// Every rule, in catalogue order.
            pub const ALL: &'static [Rule] = &[ $( Rule::$variant, )* ];

            pub const fn id(self) -> &'static str {
                match self { $( Rule::$variant => $id, )* }
            }
            pub const fn kind(self) -> Kind {
                match self { $( Rule::$variant => Kind::$kind, )* }
            }
            pub const fn severity(self) -> Severity {
                match self { $( Rule::$variant => Severity::$sev, )* }
            }
            /// CIS Docker Benchmark control, or "".
            pub const fn cis(self) -> &'static str {
                match self { $( Rule::$variant => $cis, )* }
            }
            /// Pod Security Standards control, or "".
            pub const fn pss(self) -> &'static str {
                match self { $( Rule::$variant => $pss, )* }
            }
        }
    };
}

rules! {
    ImageInvalid => "image.invalid", Invalid, Low, "", "";
    ImageDenied => "image.denied", Forbidden, High, "", "";
    ImageNotAllowed => "image.not_allowed", Forbidden, High, "", "";
    MountDockerSocket => "mount.docker_socket", Forbidden, Critical, "5.31", "HostPath Volumes";
    MountSensitivePath => "mount.sensitive_path", Forbidden, High, "5.5", "HostPath Volumes";
    MountBindNotAllowed => "mount.bind_not_allowed", Forbidden, High, "5.5", "HostPath Volumes";
    MountVolumeReserved => "mount.volume_reserved", Forbidden, High, "", "Volume Types";
    MountTmpfsSize => "mount.tmpfs_size", Forbidden, Medium, "", "";
    MountTooMany => "mount.too_many", Forbidden, Medium, "", "";
    MountInvalid => "mount.invalid", Invalid, Low, "", "";
    MountTargetReserved => "mount.target_reserved", Forbidden, Medium, "", "";
    Privileged => "privileged", Forbidden, Critical, "5.4", "Privileged Containers";
    CapabilityAdd => "capability.add", Forbidden, High, "5.3", "Capabilities";
    UserRoot => "user.root", Forbidden, High, "", "Running as Non-root user";
    UserName => "user.name", Forbidden, High, "", "Running as Non-root user";
    UserInvalid => "user.invalid", Invalid, Low, "", "";
    UserRange => "user.range", Forbidden, High, "", "Running as Non-root user";
    UserBindIdentity => "user.bind_identity", Forbidden, High, "5.5", "HostPath Volumes";
    NetworkMode => "network.mode", Forbidden, High, "5.9", "Host Namespaces";
    NamespacePid => "namespace.pid", Forbidden, High, "5.15", "Host Namespaces";
    NamespaceIpc => "namespace.ipc", Forbidden, High, "5.16", "Host Namespaces";
    NamespaceUts => "namespace.uts", Forbidden, High, "5.20", "Host Namespaces";
    NamespaceUserns => "namespace.userns", Forbidden, High, "5.30", "Host Namespaces";
    NamespaceCgroupns => "namespace.cgroupns", Forbidden, High, "", "Host Namespaces";
    SecurityOptUnconfined => "security_opt.unconfined", Forbidden, High, "5.21", "Seccomp";
    SecurityOptNotAllowed => "security_opt.not_allowed", Forbidden, High, "5.25", "Privilege Escalation";
    Device => "device", Forbidden, High, "5.17", "";
    Sysctl => "sysctl", Forbidden, High, "", "Sysctls";
    PortPublish => "port.publish", Forbidden, Medium, "5.8", "Host Ports";
    PortPrivileged => "port.privileged", Forbidden, Medium, "5.7", "Host Ports";
    PortInvalid => "port.invalid", Invalid, Low, "", "";
    ResourcesCeiling => "resources.ceiling", Forbidden, Medium, "", "";
    ResourcesUnlimited => "resources.unlimited", Forbidden, Medium, "", "";
    ResourcesInvalid => "resources.invalid", Invalid, Low, "", "";
    LabelReserved => "label.reserved", Forbidden, High, "", "";
    RootfsWritable => "rootfs.writable", Forbidden, Medium, "5.12", "";
    EnvInvalid => "env.invalid", Invalid, Low, "", "";
    WorkingDirInvalid => "working_dir.invalid", Invalid, Low, "", "";
    EgressInvalid => "egress.invalid", Invalid, Low, "", "";
    EgressNotAllowed => "egress.not_allowed", Forbidden, High, "", "";
    EgressForbiddenDestination => "egress.forbidden_destination", Forbidden, High, "", "";
    LifetimeTooLong => "lifetime.too_long", Forbidden, Medium, "", "";
    LifetimeInvalid => "lifetime.invalid", Invalid, Low, "", "";
    FilesCopyLimit => "files.copy_limit", Forbidden, Medium, "", "";
    FilesInvalid => "files.invalid", Invalid, Low, "", "";
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}
