//! The end-to-end tests, one binary (each suite links the whole client side
//! of the platform and bollard: one link instead of seven). Each suite
//! starts the real binaries itself:
//! - [`attack`]: what attackers try, outsiders and tenants alike;
//! - [`chaos`]: services killed mid-operation, the Docker engine cut;
//! - [`listing`]: filters, orders and pages of the list calls;
//! - [`lifecycle`]: idle stop, lifetimes and extensions with a short clock;
//! - [`load`]: many users at once;
//! - [`platform`]: the whole journey through the gateway;
//! - [`forward`]: port forwarding into environments;
//! - [`copy`]: files in and out of environments (API and `vibebox env cp`);
//! - [`compose`] and [`chart`]: the deployments;
//! - [`watch`]: `WatchEnvironments` and `WaitEnvironment` (resume across
//!   restarts, tokens, a create slower than the gateway's deadline);
//! - [`service_accounts`]: non-human principals, their tokens, restrictions
//!   and the token registry; idempotent creates;
//! - [`update`]: `UpdateEnvironment` (rename, relabel, live resize within
//!   policy and quota) and environment labels;
//! - [`tidy`]: the invariants that can be checked mechanically.

mod attack;
mod chaos;
mod chart;
mod compose;
mod copy;
mod forward;
mod lifecycle;
mod listing;
mod load;
mod platform;
mod service_accounts;
mod tidy;
mod update;
mod watch;
