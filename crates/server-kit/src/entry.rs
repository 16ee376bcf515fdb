//! The `main` of every service binary.

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::{ServiceConfig, parse_config};

/// Parses configuration, installs telemetry, runs `run` on a multi-threaded
/// runtime and cancels its token on SIGINT or SIGTERM.
pub fn main<C, F, Fut>(service: &'static str, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config: C = match parse_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vibebox-{service}: {e}");
            return ExitCode::from(2);
        }
    };
    let _guard = match crate::telemetry::init(service, &config.server_args().telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("vibebox-{service}: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vibebox-{service}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        match run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("vibebox-{service} failed: {e:#}");
                eprintln!("vibebox-{service}: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Cancels `token` on the first SIGINT or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = token.cancelled() => return,
    }
    tracing::info!("shutting down");
    token.cancel();
}
