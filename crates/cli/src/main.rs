//! `vibebox`: the platform's command line.
//!
//! `vibebox up` runs the whole platform on one machine: the five services,
//! each its own gRPC server on loopback, talking to each other over mutual
//! TLS with a development PKI generated into the data directory.

mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// VibeBox: on-demand, hardened development environments.
#[derive(Parser, Debug)]
#[command(name = "vibebox", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole platform on this machine (gateway, identity, policy,
    /// orchestrator, audit) until Ctrl-C.
    Up(up::UpArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vibebox: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vibebox: {e:#}");
            ExitCode::FAILURE
        }
    }
}
