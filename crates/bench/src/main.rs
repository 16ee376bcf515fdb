//! `vibebox-bench` (`just bench`): starts the real platform (`vibebox up`
//! from the same build, on a temporary data directory and ephemeral ports)
//! and measures what a user feels, each figure next to a baseline measured
//! in the same run on the same machine: create-to-running, unary RPCs,
//! policy decisions, exec round trips, log streaming, port forwarding,
//! density, and the
//! audit log's durable appends and chain verification, and the cost of
//! verifying a token (normal, worst accepted, hostile refused).
//!
//! Prints a table and the JSON report, writes `<out-dir>/<time>.json` and
//! `.txt`, and appends a line to `<out-dir>/history.jsonl`. Every Docker
//! object the run creates carries `vibebox.bench=<run id>` and is removed at
//! the end (also on Ctrl-C).

mod audit;
mod create;
mod ctx;
mod density;
mod exec;
mod forward;
mod logs;
mod platform;
mod policy;
mod report;
mod rpc;
mod stats;
mod token;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;

use crate::ctx::Ctx;
use crate::platform::Platform;
use crate::report::{Figure, Machine, Report, Section};

const SECTIONS: &[&str] = &[
    "create", "rpc", "exec", "policy", "logs", "forward", "density", "audit", "token",
];

/// Benchmarks of the whole platform next to same-run baselines.
#[derive(Parser, Debug, Clone)]
#[command(name = "vibebox-bench")]
struct Args {
    /// Sections to run (comma separated): create, rpc, exec, policy, logs,
    /// forward, density, audit, token. Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Creates through the gateway (and raw Docker creates) to time.
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// Seconds of each unary RPC load phase (saturation, then half load).
    #[arg(long, default_value_t = 3.0)]
    rpc_seconds: f64,
    /// Concurrent calls of the saturation phase.
    #[arg(long, default_value_t = 16)]
    rpc_concurrency: usize,
    /// Seconds of each policy measurement.
    #[arg(long, default_value_t = 2.0)]
    policy_seconds: f64,
    /// One-byte exec round trips to time on each path.
    #[arg(long, default_value_t = 400)]
    exec_round_trips: usize,
    /// MiB the log benchmark's container writes.
    #[arg(long, default_value_t = 8)]
    log_mib: usize,
    /// Times the whole log is read on each path.
    #[arg(long, default_value_t = 3)]
    log_rounds: usize,
    /// MiB of each port-forward bulk transfer (each way).
    #[arg(long, default_value_t = 64)]
    forward_mib: usize,
    /// Bulk transfers each way and direction through port-forward and direct.
    #[arg(long, default_value_t = 3)]
    forward_rounds: usize,
    /// 64-byte echo round trips through port-forward and direct.
    #[arg(long, default_value_t = 400)]
    forward_round_trips: usize,
    /// Idle environments of the density run.
    #[arg(long, default_value_t = 100)]
    density: usize,
    /// Creates in flight during the density run.
    #[arg(long, default_value_t = 4)]
    density_concurrency: usize,
    /// Audit events appended through the ingest path.
    #[arg(long, default_value_t = 100_000)]
    audit_appends: usize,
    /// Events in the export whose verification is timed.
    #[arg(long, default_value_t = 1_000_000)]
    verify_events: u64,
    /// Seconds each token verification figure is measured for.
    #[arg(long, default_value_t = 1.0)]
    token_seconds: f64,
    /// Free text recorded with this run in the history (e.g. "before: ...").
    #[arg(long, default_value = "")]
    label: String,
    /// Where the per-run files and history.jsonl go.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
    /// Do not write anything under --out-dir.
    #[arg(long)]
    no_record: bool,
    /// The `vibebox` binary to start (default: next to this one).
    #[arg(long)]
    vibebox: Option<PathBuf>,
    /// Image of the environments (built locally by scripts/dev-image.sh).
    #[arg(long, default_value = "vibebox/devbox:1")]
    image: String,
}

impl Args {
    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

fn git_revision() -> String {
    let out = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let rev = out(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        out(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{rev}+changes") } else { rev }
}

type Outcome = anyhow::Result<(Vec<Figure>, serde_json::Value)>;

async fn section(sections: &mut Vec<Section>, name: &str, run: impl Future<Output = Outcome>) {
    eprintln!("vibebox-bench: {name} ...");
    let t = Instant::now();
    let result = run.await;
    let seconds = t.elapsed().as_secs_f64();
    match result {
        Ok((figures, details)) => {
            eprintln!("vibebox-bench: {name} done in {seconds:.1} s");
            sections.push(Section {
                name: name.to_owned(),
                seconds,
                figures,
                error: None,
                details,
            });
        }
        Err(e) => {
            eprintln!("vibebox-bench: {name} FAILED after {seconds:.1} s: {e:#}");
            sections.push(Section {
                name: name.to_owned(),
                seconds,
                figures: Vec::new(),
                error: Some(format!("{e:#}")),
                details: serde_json::Value::Null,
            });
        }
    }
}

/// The sections that need the platform.
async fn platform_sections(
    args: &Args,
    run_id: &str,
    docker: &bollard::Docker,
    sections: &mut Vec<Section>,
) -> anyhow::Result<()> {
    let binary = match &args.vibebox {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .join("vibebox"),
    };
    let headroom = args.density + 50;
    let env = vec![
        // The per-user limiter still runs on every call, but must not cap
        // the throughput being measured.
        (
            "VIBEBOX_RATE_LIMIT_PER_SECOND".to_owned(),
            "1000000".to_owned(),
        ),
        ("VIBEBOX_RATE_LIMIT_BURST".to_owned(), "1000000".to_owned()),
        // Quotas and the address pool sized for the density run.
        (
            "VIBEBOX_TEAM_MAX_ENVIRONMENTS".to_owned(),
            headroom.to_string(),
        ),
        (
            "VIBEBOX_TEAM_MAX_CPU".to_owned(),
            (headroom as f64).to_string(),
        ),
        (
            "VIBEBOX_TEAM_MAX_MEMORY_MB".to_owned(),
            (headroom * 64).to_string(),
        ),
        ("VIBEBOX_SUBNET_POOL".to_owned(), "10.216.0.0/16".to_owned()),
    ];
    let t = Instant::now();
    let platform = Platform::start(&binary, run_id, &env)?;
    let started = t.elapsed();
    let idle_rss = platform.rss_bytes().unwrap_or(0);
    eprintln!(
        "vibebox-bench: vibebox up ready in {:.1} s at {} (installation {}, RSS {:.0} MiB; log {})",
        started.as_secs_f64(),
        platform.gateway,
        platform.installation,
        idle_rss as f64 / (1024.0 * 1024.0),
        platform.log_file.display()
    );
    sections.push(Section {
        name: "startup".into(),
        seconds: started.as_secs_f64(),
        figures: vec![
            Figure::new(
                "platform.startup",
                "vibebox up start to gateway ready (fresh data dir)",
                started.as_secs_f64(),
                report::Unit::Seconds,
            )
            .note("includes generating the development PKI, keys and the SQLite databases"),
            Figure::new(
                "platform.idle_rss",
                "vibebox up RSS just started (all 5 services)",
                idle_rss as f64 / (1024.0 * 1024.0),
                report::Unit::Mib,
            ),
        ],
        error: None,
        details: serde_json::json!({ "idle_rss": idle_rss }),
    });
    let ctx = Ctx::new(
        platform,
        docker.clone(),
        args.image.clone(),
        run_id.to_owned(),
    )
    .await?;

    if args.wants("create") {
        section(sections, "create", create::run(&ctx, args.iterations)).await;
    }
    let needs_main = ["rpc", "exec"].iter().any(|s| args.wants(s));
    let main_env = if needs_main {
        Some(ctx.create("bench-main", ctx.spec(&[])).await?)
    } else {
        None
    };
    if let Some(env) = &main_env {
        if args.wants("rpc") {
            let s = rpc::RpcSettings {
                concurrency: args.rpc_concurrency,
                seconds: args.rpc_seconds,
            };
            section(sections, "rpc", rpc::run(&ctx, &env.id, s)).await;
        }
        if args.wants("exec") {
            section(
                sections,
                "exec",
                exec::run(&ctx, &env.id, args.exec_round_trips),
            )
            .await;
        }
    }
    if args.wants("policy") {
        section(
            sections,
            "policy",
            policy::run(&ctx, args.rpc_concurrency, args.policy_seconds),
        )
        .await;
    }
    if args.wants("logs") {
        section(
            sections,
            "logs",
            logs::run(&ctx, args.log_mib, args.log_rounds),
        )
        .await;
    }
    if args.wants("forward") {
        let s = forward::ForwardSettings {
            mib: args.forward_mib,
            rounds: args.forward_rounds,
            round_trips: args.forward_round_trips,
        };
        section(sections, "forward", forward::run(&ctx, s)).await;
    }
    if let Some(env) = &main_env {
        ctx.delete(&env.id).await?;
    }
    if args.wants("density") && args.density > 0 {
        section(
            sections,
            "density",
            density::run(&ctx, args.density, args.density_concurrency),
        )
        .await;
    }
    drop(ctx);
    Ok(())
}

async fn run(args: Args, run_id: String, docker: bollard::Docker) -> anyhow::Result<Report> {
    let started = Instant::now();
    let time = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let machine = Machine::describe(&docker).await;
    let mut sections = Vec::new();
    let platform_wanted = SECTIONS[..7].iter().any(|s| args.wants(s));
    if platform_wanted {
        if let Err(e) = platform_sections(&args, &run_id, &docker, &mut sections).await {
            eprintln!("vibebox-bench: the platform run stopped: {e:#}");
            sections.push(Section {
                name: "platform".into(),
                seconds: 0.0,
                figures: Vec::new(),
                error: Some(format!("{e:#}")),
                details: serde_json::Value::Null,
            });
        }
        let (c, n, v) = platform::remove_labelled(&docker, &run_id).await?;
        eprintln!(
            "vibebox-bench: removed {c} containers, {n} networks, {v} volumes labelled {}={run_id}",
            platform::RUN_LABEL
        );
    }
    if args.wants("audit") {
        section(
            &mut sections,
            "audit",
            audit::run(args.audit_appends, args.verify_events),
        )
        .await;
    }
    if args.wants("token") {
        section(&mut sections, "token", token::run(args.token_seconds)).await;
    }
    Ok(Report {
        time,
        label: args.label.clone(),
        git: git_revision(),
        machine,
        settings: serde_json::json!({
            "iterations": args.iterations,
            "rpc_seconds": args.rpc_seconds,
            "rpc_concurrency": args.rpc_concurrency,
            "policy_seconds": args.policy_seconds,
            "exec_round_trips": args.exec_round_trips,
            "log_mib": args.log_mib,
            "log_rounds": args.log_rounds,
            "forward_mib": args.forward_mib,
            "forward_rounds": args.forward_rounds,
            "forward_round_trips": args.forward_round_trips,
            "density": args.density,
            "density_concurrency": args.density_concurrency,
            "audit_appends": args.audit_appends,
            "verify_events": args.verify_events,
            "token_seconds": args.token_seconds,
            "only": args.only,
        }),
        sections,
        total_seconds: started.elapsed().as_secs_f64(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(unknown) = args.only.iter().find(|s| !SECTIONS.contains(&s.as_str())) {
        anyhow::bail!(
            "unknown section {unknown:?}; known: {}",
            SECTIONS.join(", ")
        );
    }
    let docker = bollard::Docker::connect_with_local_defaults().context("connecting to Docker")?;
    docker.ping().await.context("Docker is not reachable")?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    eprintln!(
        "vibebox-bench: run {run_id}; Docker objects are labelled {}={run_id}",
        platform::RUN_LABEL
    );

    let report = tokio::select! {
        report = run(args.clone(), run_id.clone(), docker.clone()) => report?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("vibebox-bench: interrupted; removing what this run created");
            // Dropping the run stopped the platform; sweep its objects.
            let _ = platform::remove_labelled(&docker, &run_id).await;
            std::process::exit(130);
        }
    };

    println!("{}", report.table());
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !args.no_record {
        let file = report.write(&args.out_dir)?;
        eprintln!(
            "vibebox-bench: wrote {file} and appended to {}",
            args.out_dir.join("history.jsonl").display()
        );
    }
    let failed: Vec<&Section> = report
        .sections
        .iter()
        .filter(|s| s.error.is_some())
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "{} section(s) failed: {}",
        failed.len(),
        failed
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
