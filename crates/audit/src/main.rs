//! The `vibebox-audit` binary.

fn main() -> std::process::ExitCode {
    vibebox_server_kit::main::<vibebox_audit::Config, _, _>(
        vibebox_audit::SERVICE_NAME,
        vibebox_audit::run,
    )
}
