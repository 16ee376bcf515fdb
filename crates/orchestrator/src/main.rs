//! The `vibebox-orchestrator` binary.
fn main() -> std::process::ExitCode {
    // Inside the helper image this executable is the gate.
    vibebox_gate::dispatch();
    vibebox_server_kit::main::<vibebox_orchestrator::Config, _, _>(
        vibebox_orchestrator::SERVICE_NAME,
        vibebox_orchestrator::run,
    )
}
