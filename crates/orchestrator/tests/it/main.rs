//! The orchestrator's integration tests, one binary (each links bollard,
//! sea-orm and tonic: one link instead of seven):
//! - [`engine`]: creates, lifecycle, quotas, reconcile against the real engine;
//! - [`recovery`]: interrupted deletes and quarantines finished by reconcile;
//! - [`killed`]: real orchestrator processes killed at crash points;
//! - [`keys`]: clearance keys fetched from policy, rotated, retired;
//! - [`lease`]: one orchestrator per database;
//! - [`lifecycle`]: idle stop, lifetimes and extensions with a short clock;
//! - [`seam`]: provisioning and lifecycle through the runtime seam, no Docker;
//! - [`store`]: records on SQLite and PostgreSQL;
//! - [`docker_tls`]: the engine over TCP with mutual TLS.

mod docker_tls;
mod engine;
mod keys;
mod killed;
mod lease;
mod lifecycle;
mod recovery;
mod seam;
mod store;
