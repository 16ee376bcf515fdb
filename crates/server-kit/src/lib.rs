//! One bootstrap for every VibeBox gRPC server and client.
//!
//! A service registers its handlers with [`ServerBuilder`]; the kit gives it
//! configuration (defaults, a TOML file, `VIBEBOX_*` variables, flags),
//! tracing with OpenTelemetry and W3C trace-context propagation, request ids,
//! deadlines, load shedding, panic catching, gRPC health, reflection (v1 and
//! v1alpha), graceful shutdown and mutual TLS with caller identities.
//! Clients get the same propagation through [`connect`].

mod client;
mod config;
mod entry;
mod error;
mod layer;
pub mod lockfile;
pub mod meta;
pub mod pki;
pub mod retry;
mod server;
pub mod status;
pub mod telemetry;
pub mod testing;
mod tls;

pub use client::{Authed, Bearer, GrpcChannel, InvalidToken, connect, connect_plaintext};
pub use config::{
    LimitArgs, LogFormat, ServerArgs, ServiceConfig, TelemetryArgs, TlsArgs, parse_config,
    parse_config_from,
};
pub use entry::{cancel_on_signal, main};
pub use error::KitError;
pub use layer::{CallerService, InFlightPermit, RequestId, caller_service, request_id, trace_id};
pub use server::{ServerBuilder, bind};
pub use tls::{IDENTITY_URI_PREFIX, TlsMaterial, service_identity};
