//! The orchestrator's integration tests, one binary (each links bollard,
//! sea-orm and tonic: one link instead of seven):
//! - [`engine`]: creates, lifecycle, quotas, reconcile against the real engine;
//! - [`recovery`]: interrupted deletes and quarantines finished by reconcile;
//! - [`killed`]: real orchestrator processes killed at crash points;
//! - [`keys`]: clearance keys fetched from policy, rotated, retired;
//! - [`lease`]: one orchestrator per database;
//! - [`lifecycle`]: idle stop, lifetimes and extensions with a short clock;
//! - [`operations`]: long-running operations (accepted at once, settled in
//!   the background, conflicts, a delete during a create, crashes finished
//!   by reconcile) and the errors' google.rpc details;
//! - [`seam`]: provisioning and lifecycle through the runtime seam, no Docker;
//! - [`store`]: records on SQLite and PostgreSQL;
//! - [`update`]: in-place updates on the live container, and an interrupted
//!   one rolled back by reconcile;
//! - [`docker_tls`]: the engine over TCP with mutual TLS;
//! - [`common`]: waiting for an environment to settle, error details, an
//!   engine that holds requests back.

mod common;
mod docker_tls;
mod engine;
mod keys;
mod killed;
mod lease;
mod lifecycle;
mod operations;
mod recovery;
mod seam;
mod store;
mod update;
