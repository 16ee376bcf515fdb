//! Policy decisions per second per core: the engine in process (one thread)
//! next to the dry run over gRPC, through the gateway and directly to the
//! policy service over mutual TLS (with the gateway's certificate from the
//! platform's data directory).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use vibebox_proto::environment::{ContainerSpec, Mount, MountType};
use vibebox_proto::policy::EvaluateSpecRequest;
use vibebox_proto::policy::policy_service_client::PolicyServiceClient;
use vibebox_server_kit::TlsMaterial;

use crate::ctx::Ctx;
use crate::report::{Figure, Unit};
use crate::stats;

/// A typical allowed spec (the one `crates/policy/benches/evaluate.rs` uses).
pub(crate) fn allowed_spec() -> ContainerSpec {
    ContainerSpec {
        image: "python:3.12".into(),
        command: vec!["sleep".into(), "infinity".into()],
        env: BTreeMap::from([
            ("LANG".into(), "C.UTF-8".into()),
            ("TERM".into(), "xterm".into()),
        ]),
        working_dir: "/workspace".into(),
        labels: BTreeMap::from([("project".into(), "demo".into())]),
        cpu_limit: Some(1.0),
        memory_limit_mb: Some(2048),
        mounts: vec![Mount {
            r#type: MountType::Volume as i32,
            source: "cache".into(),
            target: "/cache".into(),
            read_only: false,
            size_mb: None,
        }],
        ..Default::default()
    }
}

/// Decisions per second of the engine on one thread, for about `seconds`.
pub(crate) fn in_process(seconds: f64) -> (f64, f64) {
    let policy = vibebox_policy::Policy::builtin();
    let rules = policy.rules_for("");
    let allowed = allowed_spec();
    assert!(vibebox_policy::evaluate(rules, &allowed).allowed());
    let denied = ContainerSpec {
        image: "docker:24-dind".into(),
        privileged: true,
        mounts: vec![Mount {
            r#type: MountType::Bind as i32,
            source: "/var/run/docker.sock".into(),
            target: "/var/run/docker.sock".into(),
            read_only: false,
            size_mb: None,
        }],
        ..allowed_spec()
    };
    assert!(!vibebox_policy::evaluate(rules, &denied).allowed());
    let rate = |spec: &ContainerSpec| {
        let budget = Duration::from_secs_f64(seconds / 2.0);
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < budget {
            for _ in 0..100 {
                black_box(vibebox_policy::evaluate(rules, black_box(spec)));
            }
            n += 100;
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    (rate(&allowed), rate(&denied))
}

pub(crate) async fn run(
    ctx: &Ctx,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let (allowed_rate, denied_rate) =
        tokio::task::spawn_blocking(move || in_process(seconds)).await?;

    let team = ctx.team.clone();
    let gateway = ctx.policy();
    let request = EvaluateSpecRequest {
        spec: Some(allowed_spec()),
        team_id: team,
    };
    let via_gateway = {
        let request = request.clone();
        move || {
            let mut client = gateway.clone();
            let request = request.clone();
            async move { client.evaluate_spec(request).await.map(|_| ()) }
        }
    };
    let warmup = Duration::from_millis(300);
    let duration = Duration::from_secs_f64(seconds);
    let gw = stats::closed_loop(via_gateway, concurrency, warmup, duration).await;
    anyhow::ensure!(gw.ok > 0, "no EvaluateSpec succeeded: {:?}", gw.first_error);

    let mut figures = vec![
        Figure::new(
            "policy.in_process",
            "policy decisions/s per core (in process, allowed spec)",
            allowed_rate,
            Unit::PerSecond,
        )
        .note(format!(
            "denied spec: {denied_rate:.0}/s per core; the engine's evaluate() on one thread"
        )),
        Figure::new(
            "policy.grpc_gateway",
            "policy dry runs/s per core (EvaluateSpec via gateway)",
            gw.per_second / cores,
            Unit::PerSecond,
        )
        .baseline("in process", allowed_rate)
        .note(format!(
            "{:.0}/s in total on {cores} cores shared by client, gateway, policy and audit (every dry run is audited); p50 {:.2} ms",
            gw.per_second, gw.latency.p50
        )),
    ];

    let mut direct_json = serde_json::Value::Null;
    if let Some(url) = ctx.platform.internal_url("policy") {
        let pki = ctx.platform.data_dir().join("pki");
        let material = TlsMaterial::from_files(
            &pki.join("ca.pem"),
            &pki.join("gateway.pem"),
            &pki.join("gateway-key.pem"),
        )?;
        let client = PolicyServiceClient::new(vibebox_server_kit::connect(&url, &material)?);
        let direct = move || {
            let mut client = client.clone();
            let request = request.clone();
            async move { client.evaluate_spec(request).await.map(|_| ()) }
        };
        let d = stats::closed_loop(direct, concurrency, warmup, duration).await;
        if d.ok > 0 {
            figures.push(
                Figure::new(
                    "policy.grpc_direct",
                    "policy dry runs/s per core (EvaluateSpec direct, mTLS)",
                    d.per_second / cores,
                    Unit::PerSecond,
                )
                .baseline("in process", allowed_rate)
                .note(format!(
                    "{:.0}/s in total; p50 {:.2} ms",
                    d.per_second, d.latency.p50
                )),
            );
        }
        direct_json = serde_json::to_value(&d)?;
    }
    Ok((
        figures,
        serde_json::json!({
            "cores": cores,
            "in_process_allowed_per_s": allowed_rate,
            "in_process_denied_per_s": denied_rate,
            "gateway": gw,
            "direct": direct_json,
        }),
    ))
}
