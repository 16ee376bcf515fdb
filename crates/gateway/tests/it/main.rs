//! The gateway's integration tests, one binary (each part links every
//! service in-process: one link instead of three):
//! - [`gateway`]: against real audit, identity and orchestrator services;
//! - [`platform`]: in front of the whole platform (roles, isolation,
//!   policy denials);
//! - [`docker`]: a real environment through the gateway.

mod common;
mod docker;
mod gateway;
mod platform;
