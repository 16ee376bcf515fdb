//! The gate: the platform's own process beside a user container.
//!
//! It runs inside the platform's helper image (the running VibeBox
//! executable and its shared libraries, imported into the engine by the
//! orchestrator), never in a user container, and has three jobs, one
//! subcommand each:
//!
//! - `egress`: the **egress gate** of one environment. The environment's
//!   network is `internal` (no route out) and the gate is the only other
//!   member: its DNS server answers allowed names with the gate's own
//!   address, its transparent listeners (ports 80, 443 and the ports of the
//!   allow rules) learn the destination name from TLS SNI or the HTTP `Host`
//!   header, and its HTTP proxy (`CONNECT` and absolute-form requests) serves
//!   clients that honour `HTTP(S)_PROXY`. Every destination is decided by
//!   [`destination::Policy`] at connect time, on the address actually
//!   dialled, so a DNS answer cannot smuggle a forbidden address in
//!   (rebinding). Refusals and counts go to stdout as JSON lines
//!   ([`events`]), which the orchestrator follows, audits and counts.
//! - `connect HOST PORT`: pipes stdin to a TCP connection and the connection
//!   to stdout (one port-forward connection, run by `docker exec` in a
//!   forwarder container that shares the environment's network namespace).
//! - `idle`: waits forever (the forwarder's main process).
//! - `local-addresses`: prints the addresses of its network namespace (run
//!   on the engine's host network, the engine host's own addresses).
//!
//! Binaries that can be the helper image call [`dispatch`] first thing in
//! `main`.

mod connect;
pub mod destination;
pub mod dns;
mod egress;
pub mod events;
pub mod local;
pub mod sniff;

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

pub use destination::{Mode, Rule};

/// The first argument that turns a VibeBox executable into the gate.
pub const SUBCOMMAND: &str = "gate";
/// Path of the executable inside the helper image.
pub const EXECUTABLE: &str = "/vibebox-gate";
/// Environment variable carrying the egress configuration (JSON).
pub const CONFIG_ENV: &str = "VIBEBOX_GATE_CONFIG";
/// The proxy port on the gate's address.
pub const PROXY_PORT: u16 = 3128;
/// Ports the gate intercepts transparently (besides the allow rules' ports).
pub const TRANSPARENT_PORTS: [u16; 2] = [80, 443];

/// What an egress gate is told at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// The decision of policy for this environment.
    pub mode: Mode,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// The gate's address on the environment's network (its listeners bind
    /// only there, never on the outbound side).
    pub listen: Ipv4Addr,
    /// Upstream resolvers; empty means the gate's own /etc/resolv.conf.
    #[serde(default)]
    pub upstream_dns: Vec<SocketAddr>,
    /// Ranges never reachable whatever the rules say (the engine host's
    /// addresses, the platform's networks, the environments' pool).
    #[serde(default)]
    pub deny: Vec<ipnet::IpNet>,
}

impl EgressConfig {
    /// The ports the gate listens on transparently.
    pub fn transparent_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = TRANSPARENT_PORTS.to_vec();
        if self.mode == Mode::AllowList {
            for rule in &self.rules {
                ports.extend(rule.ports.iter().copied());
            }
        }
        ports.retain(|p| *p != 53 && *p != PROXY_PORT && *p != 0);
        ports.sort_unstable();
        ports.dedup();
        ports.truncate(64);
        ports
    }
}

/// Argv (inside the helper image) of an egress gate.
pub fn egress_command() -> Vec<String> {
    vec![EXECUTABLE.into(), SUBCOMMAND.into(), "egress".into()]
}

/// Argv (inside the helper image) that connects to `host:port` and pipes
/// stdio through it.
pub fn connect_command(host: &str, port: u16) -> Vec<String> {
    vec![
        EXECUTABLE.into(),
        SUBCOMMAND.into(),
        "connect".into(),
        host.into(),
        port.to_string(),
    ]
}

/// Argv (inside the helper image) that prints the addresses of its network
/// namespace as a JSON array.
pub fn local_addresses_command() -> Vec<String> {
    vec![
        EXECUTABLE.into(),
        SUBCOMMAND.into(),
        "local-addresses".into(),
    ]
}

/// Argv (inside the helper image) of a process that waits forever.
pub fn idle_command() -> Vec<String> {
    vec![EXECUTABLE.into(), SUBCOMMAND.into(), "idle".into()]
}

/// Runs the gate and exits when the process was started as one
/// (`<exe> gate ...`); returns otherwise.
pub fn dispatch() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some(SUBCOMMAND) {
        return;
    }
    let rest: Vec<String> = args.collect();
    std::process::exit(run(&rest));
}

fn run(args: &[String]) -> i32 {
    match args.first().map(String::as_str) {
        Some("connect") => connect::run(&args[1..]),
        Some("idle") => loop {
            std::thread::park();
        },
        Some("egress") => egress::run(),
        Some("local-addresses") => local::run(),
        _ => {
            eprintln!("usage: gate (egress | connect HOST PORT | idle | local-addresses)");
            2
        }
    }
}
