//! The `vibebox-orchestrator` binary.
fn main() -> std::process::ExitCode {
    vibebox_server_kit::main::<vibebox_orchestrator::Config, _, _>(
        vibebox_orchestrator::SERVICE_NAME,
        vibebox_orchestrator::run,
    )
}
