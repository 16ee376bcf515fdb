//! The policy service: judges, hardens and signs every container spec.
//!
//! - [`image`], [`path`]: canonical image references and host paths;
//! - [`rules`]: the rule catalogue (stable ids, severities, CIS/PSS controls);
//! - [`document`]: the TOML policy document, team overlays, digest;
//! - [`engine`]: the pure evaluation and hardening of a spec.

pub mod document;
pub mod engine;
pub mod image;
pub mod path;
pub mod rules;

pub use document::{Policy, PolicyDocument};
pub use engine::{Outcome, Violation, evaluate};
pub use rules::{Rule, Severity};

#[cfg(test)]
mod engine_tests;
