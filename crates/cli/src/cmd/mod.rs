//! One module per command group. Each holds its clap arguments and a `run`
//! (or, for `login`, one function per command) that drives the platform
//! through a [`Session`](crate::client::Session); shared support (client,
//! config, output, prompt, spec) lives outside `cmd/`.

pub(crate) mod audit;
pub(crate) mod context;
pub(crate) mod cp;
pub(crate) mod env;
pub(crate) mod exec;
pub(crate) mod forward;
pub(crate) mod login;
pub(crate) mod logs;
pub(crate) mod policy;
pub(crate) mod sa;
pub(crate) mod stats;
pub(crate) mod team;
pub(crate) mod token;
pub(crate) mod up;
pub(crate) mod user;
