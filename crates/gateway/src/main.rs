//! The `vibebox-gateway` binary.

fn main() -> std::process::ExitCode {
    vibebox_server_kit::main::<vibebox_gateway::Config, _, _>(
        vibebox_gateway::SERVICE_NAME,
        vibebox_gateway::run,
    )
}
