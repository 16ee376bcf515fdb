//! The `vibebox-pki-init` binary: the compose deployment's one-shot PKI step.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let args = vibebox_pki_init::PkiInitArgs::parse();
    let done =
        vibebox_pki_init::init_pki(&args.dir, &args.hosts).and_then(|()| match &args.distribute {
            Some(out) => vibebox_pki_init::distribute(&args.dir, out),
            None => Ok(()),
        });
    match done {
        Ok(()) => {
            eprintln!("development PKI ready in {}", args.dir.display());
            if let Some(out) = &args.distribute {
                eprintln!(
                    "each service's material copied to {}/<service>",
                    out.display()
                );
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vibebox-pki-init: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
