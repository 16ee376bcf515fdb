//! The `vibebox-health-probe` binary: a container healthcheck for images
//! without a shell.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let args = vibebox_pki_init::ProbeArgs::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vibebox-health-probe: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(vibebox_pki_init::probe(&args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vibebox-health-probe: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
