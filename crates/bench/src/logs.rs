//! Log streaming throughput: an environment writes N MiB to stdout and
//! sleeps; its whole log is read through the gateway (`StreamLogs`, gateway
//! -> orchestrator -> Docker) and directly from Docker, alternately.

use std::time::{Duration, Instant};

use anyhow::Context;
use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use futures::StreamExt;
use vibebox_proto::environment::StreamLogsRequest;

use crate::ctx::Ctx;
use crate::report::{Figure, Unit};

const MIB: f64 = 1024.0 * 1024.0;
/// Bytes per output line (the line itself and its newline).
const LINE: usize = 1024;

/// The container command: `mib` MiB of 1 KiB lines, then sleep.
fn command(mib: usize) -> Vec<String> {
    let bytes = mib * 1024 * 1024;
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "line=$(head -c {} /dev/zero | tr '\\000' x); yes \"$line\" | head -c {bytes}; exec sleep 2147483647",
            LINE - 1
        ),
    ]
}

pub(crate) async fn run(
    ctx: &Ctx,
    mib: usize,
    rounds: usize,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let cmd = command(mib);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let env = ctx.create("bench-logs", ctx.spec(&cmd)).await?;
    let container = vibebox_orchestrator::docker::container_name(&env.id);
    let want = (mib * 1024 * 1024) as u64;

    // Wait until the whole output is in the log (this read also warms the
    // page cache for both paths).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (bytes, _) = docker_read(ctx, &container).await?;
        if bytes >= want {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the log reached only {bytes} of {want} bytes in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let mut through = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..rounds.max(1) {
        let (bytes, t) = gateway_read(ctx, &env.id).await?;
        anyhow::ensure!(bytes >= want, "gateway delivered {bytes} of {want} bytes");
        through.push(bytes as f64 / MIB / t.as_secs_f64());
        let (bytes, t) = docker_read(ctx, &container).await?;
        direct.push(bytes as f64 / MIB / t.as_secs_f64());
    }
    ctx.delete(&env.id).await?;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let g = median(&mut through);
    let d = median(&mut direct);
    let figures = vec![
        Figure::new(
            "logs.throughput",
            "log streaming throughput (StreamLogs via gateway)",
            g,
            Unit::MibPerSecond,
        )
        .baseline("direct Docker logs", d)
        .ratio_at_least(0.8)
        .note(format!(
            "{mib} MiB of {LINE}-byte lines, whole log read {} times each way (median)",
            rounds.max(1)
        )),
    ];
    Ok((
        figures,
        serde_json::json!({ "mib": mib, "gateway_mib_s": through, "direct_mib_s": direct }),
    ))
}

async fn gateway_read(ctx: &Ctx, id: &str) -> anyhow::Result<(u64, Duration)> {
    let t = Instant::now();
    let mut stream = ctx
        .environments()
        .stream_logs(StreamLogsRequest {
            environment_id: id.to_owned(),
            ..Default::default()
        })
        .await
        .context("StreamLogs through the gateway")?
        .into_inner();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.message().await? {
        bytes += chunk.data.len() as u64;
    }
    Ok((bytes, t.elapsed()))
}

async fn docker_read(ctx: &Ctx, container: &str) -> anyhow::Result<(u64, Duration)> {
    let t = Instant::now();
    let mut stream = ctx.docker.logs(
        container,
        Some(
            LogsOptionsBuilder::new()
                .follow(false)
                .stdout(true)
                .stderr(true)
                .build(),
        ),
    );
    let mut bytes = 0u64;
    while let Some(item) = stream.next().await {
        match item? {
            LogOutput::StdOut { message }
            | LogOutput::StdErr { message }
            | LogOutput::Console { message } => bytes += message.len() as u64,
            LogOutput::StdIn { .. } => {}
        }
    }
    Ok((bytes, t.elapsed()))
}
