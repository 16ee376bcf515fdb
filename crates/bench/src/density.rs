//! Density: N idle environments created through the gateway; the control
//! plane's memory per environment (RSS growth of `vibebox up`, all five
//! services in one process) next to what each container itself uses
//! (Docker's cgroup memory), plus the engine's own growth (dockerd,
//! containerd and one shim per container).

use std::time::{Duration, Instant};

use bollard::query_parameters::StatsOptions;
use futures::StreamExt;

use crate::ctx::Ctx;
use crate::platform::rss_of_processes;
use crate::report::{Figure, Unit};

const MIB: f64 = 1024.0 * 1024.0;

/// Memory a container uses, as `docker stats` computes it (usage minus
/// inactive page cache).
async fn container_memory(ctx: &Ctx, container: &str) -> Option<u64> {
    let mut stream = ctx.docker.stats(
        container,
        Some(StatsOptions {
            stream: false,
            one_shot: true,
        }),
    );
    let stats = stream.next().await?.ok()?;
    let mem = stats.memory_stats?;
    let usage = mem.usage?;
    let inactive = mem
        .stats
        .as_ref()
        .and_then(|s| {
            s.get("total_inactive_file")
                .or_else(|| s.get("inactive_file"))
        })
        .copied()
        .unwrap_or(0);
    Some(usage.saturating_sub(inactive))
}

/// RSS of the engine: dockerd, containerd and every containerd shim (the
/// `containerd` match covers the shims).
fn engine_rss() -> u64 {
    rss_of_processes("dockerd").0 + rss_of_processes("containerd").0
}

pub(crate) async fn run(
    ctx: &Ctx,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let engine_before = engine_rss();
    let rss_before = ctx.platform.rss_bytes().unwrap_or(0);

    let t = Instant::now();
    let results: Vec<anyhow::Result<String>> = futures::stream::iter(0..n)
        .map(|i| async move {
            let env = ctx
                .create(&format!("bench-density-{i}"), ctx.spec(&[]))
                .await?;
            Ok(env.id)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let create_s = t.elapsed().as_secs_f64();
    let mut ids = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(id) => ids.push(id),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    anyhow::ensure!(
        !ids.is_empty(),
        "no environment could be created: {:?}",
        failures.first()
    );
    // Let background work (audit delivery, health checks) settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = ctx.platform.rss_bytes().unwrap_or(0);
    let (_, shim_count) = rss_of_processes("containerd-shim");
    let engine_after = engine_rss();

    let memories: Vec<u64> = futures::stream::iter(ids.iter())
        .map(|id| {
            let name = vibebox_orchestrator::docker::container_name(id);
            async move { container_memory(ctx, &name).await }
        })
        .buffer_unordered(16)
        .filter_map(|m| async move { m })
        .collect()
        .await;
    let containers_total = memories.iter().sum::<u64>();
    let per_container = containers_total as f64 / memories.len().max(1) as f64;

    let created = ids.len() as f64;
    let per_env = rss_after.saturating_sub(rss_before) as f64 / created;
    let engine_per_env = engine_after.saturating_sub(engine_before) as f64 / created;

    let figures = vec![
        Figure::new(
            "density.control_plane_per_env",
            "control-plane memory per environment (vibebox up RSS growth / N)",
            per_env / 1024.0,
            Unit::Kib,
        )
        .baseline("the idle container itself (docker stats)", per_container / 1024.0)
        .note(format!(
            "{} of {n} environments created in {create_s:.1} s ({concurrency} at a time, {:.2}/s){}; engine (dockerd + containerd + {shim_count} shims) grew {:.0} KiB per environment",
            ids.len(),
            created / create_s,
            if failures.is_empty() {
                String::new()
            } else {
                format!(", {} failed: {}", failures.len(), failures[0])
            },
            engine_per_env / 1024.0
        )),
        Figure::new(
            "density.vibebox_rss",
            format!("vibebox up RSS with {} environments (all 5 services)", ids.len()),
            rss_after as f64 / MIB,
            Unit::Mib,
        )
        .baseline("before the density run", rss_before as f64 / MIB),
        Figure::new(
            "density.containers_total",
            format!("containers' own memory, {} environments", memories.len()),
            containers_total as f64 / MIB,
            Unit::Mib,
        ),
    ];
    Ok((
        figures,
        serde_json::json!({
            "requested": n,
            "created": ids.len(),
            "failures": failures,
            "create_seconds": create_s,
            "vibebox_rss_before": rss_before,
            "vibebox_rss_after": rss_after,
            "engine_rss_before": engine_before,
            "engine_rss_after": engine_after,
            "shims": shim_count,
            "container_memory_total": containers_total,
        }),
    ))
}
