//! The `vibebox-pki-init` binary: the compose deployment's one-shot PKI step.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let args = vibebox_pki_init::PkiInitArgs::parse();
    match vibebox_pki_init::init_pki(&args.dir, &args.hosts) {
        Ok(()) => {
            eprintln!("development PKI ready in {}", args.dir.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vibebox-pki-init: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
