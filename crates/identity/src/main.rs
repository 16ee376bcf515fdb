//! The `vibebox-identity` binary.

fn main() -> std::process::ExitCode {
    vibebox_server_kit::main::<vibebox_identity::Config, _, _>(
        vibebox_identity::SERVICE_NAME,
        vibebox_identity::run,
    )
}
