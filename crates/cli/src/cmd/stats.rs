//! `vibebox env stats`: resource usage, once or as a stream (`--follow`).

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use vibebox_proto::environment::StreamStatsRequest;

use crate::client::{CallError, CallExt, Session};
use crate::cmd::env::resolve_env;
use crate::output::{self, Format};

#[derive(Args, Debug)]
pub(crate) struct StatsArgs {
    /// Environment id or name.
    env: String,
    /// Keep streaming samples.
    #[arg(short, long)]
    follow: bool,
}

#[derive(Serialize)]
struct StatsView {
    time: String,
    cpu_percent: f64,
    memory_usage_bytes: u64,
    memory_limit_bytes: u64,
    pids: u64,
    network_rx_bytes: u64,
    network_tx_bytes: u64,
}

pub(crate) async fn run(a: StatsArgs, session: &Session, format: Format) -> Result<()> {
    let id = resolve_env(session, &a.env).await?;
    let mut stream = session
        .environments()
        .stream_stats(StreamStatsRequest {
            environment_id: id,
            one_shot: !a.follow,
        })
        .await
        .call()?;
    let mut header = false;
    while let Some(s) = stream.message().await.map_err(CallError)? {
        let v = StatsView {
            time: output::time(s.time.as_ref()),
            cpu_percent: s.cpu_percent,
            memory_usage_bytes: s.memory_usage_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            pids: s.pids,
            network_rx_bytes: s.network_rx_bytes,
            network_tx_bytes: s.network_tx_bytes,
        };
        if format == Format::Json {
            println!("{}", serde_json::to_string(&v)?);
            continue;
        }
        let row = vec![
            v.time,
            format!("{:.2}%", v.cpu_percent),
            format!(
                "{} / {}",
                output::bytes(v.memory_usage_bytes),
                output::bytes(v.memory_limit_bytes)
            ),
            v.pids.to_string(),
            format!(
                "{} / {}",
                output::bytes(v.network_rx_bytes),
                output::bytes(v.network_tx_bytes)
            ),
        ];
        let headers = ["TIME", "CPU", "MEMORY", "PIDS", "NET RX / TX"];
        if !header {
            output::table(&headers, &[row]);
            header = true;
        } else {
            println!("{}", row.join("  "));
        }
    }
    Ok(())
}
