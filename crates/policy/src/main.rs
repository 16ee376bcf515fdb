//! `vibebox-policy`: the policy service binary.
fn main() -> std::process::ExitCode {
    vibebox_server_kit::main::<vibebox_policy::Config, _, _>("policy", vibebox_policy::run)
}
