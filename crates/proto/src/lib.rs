//! VibeBox's API contract: the code generated from `proto/` and the encoded
//! file descriptor set that servers register for gRPC reflection.
//!
//! Public packages (`vibebox.<domain>.v1`) are served to clients by the
//! gateway; `vibebox.internal.*` packages are spoken only between services
//! over mutual TLS and are never exposed by the gateway.

#![allow(unreachable_pub, clippy::all, missing_docs)] // generated code

/// Encoded `FileDescriptorSet` of every VibeBox proto, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vibebox_descriptor.bin"));

pub mod vibebox {
    pub mod environment {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/vibebox.environment.v1.rs"));
        }
    }
    pub mod identity {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/vibebox.identity.v1.rs"));
        }
    }
    pub mod audit {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/vibebox.audit.v1.rs"));
        }
    }
    pub mod policy {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/vibebox.policy.v1.rs"));
        }
    }
    pub mod kit {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/vibebox.kit.v1.rs"));
        }
    }
    pub mod internal {
        pub mod authz {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/vibebox.internal.authz.v1.rs"));
            }
        }
        pub mod clearance {
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/vibebox.internal.clearance.v1.rs"
                ));
            }
        }
        pub mod audit {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/vibebox.internal.audit.v1.rs"));
            }
        }
        pub mod runtime {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/vibebox.internal.runtime.v1.rs"));
            }
        }
    }
}

pub use vibebox::audit::v1 as audit;
pub use vibebox::environment::v1 as environment;
pub use vibebox::identity::v1 as identity;
pub use vibebox::internal::audit::v1 as audit_ingest;
pub use vibebox::internal::authz::v1 as authz;
pub use vibebox::internal::clearance::v1 as clearance;
pub use vibebox::internal::runtime::v1 as runtime;
pub use vibebox::kit::v1 as kit;
pub use vibebox::policy::v1 as policy;

/// Fully-qualified names of the services the gateway may expose publicly.
pub const PUBLIC_SERVICES: &[&str] = &[
    "vibebox.environment.v1.EnvironmentService",
    "vibebox.identity.v1.IdentityService",
    "vibebox.audit.v1.AuditService",
    "vibebox.policy.v1.PolicyService",
];
