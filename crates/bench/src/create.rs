//! Create-to-running through the gateway (authentication, RBAC, policy
//! clearance, orchestrator admission, audit, Docker) next to the raw Docker
//! API creating the same hardened objects: network, workspace volume,
//! container, start.
//!
//! `CreateEnvironment` is a long operation: it answers CREATING as soon as
//! the change is accepted and the container starts afterwards. The timed
//! part is therefore the create call plus the wait until the environment is
//! RUNNING (`WaitEnvironment`, or `GetEnvironment` polled every 20 ms where
//! that is not served; see [`Ctx::create`]), so that the ratio to the raw
//! baseline, which ends with the container started, stays honest.

use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveVolumeOptionsBuilder,
};
use vibebox_orchestrator::docker::{self, Target};
use vibebox_orchestrator::subnet::{self, Cidr};
use vibebox_proto::environment::Environment;

use crate::ctx::Ctx;
use crate::platform::RUN_LABEL;
use crate::report::{Figure, Unit};
use crate::stats::Summary;

/// Address pool of the raw baseline's networks (the platform uses its own).
const RAW_POOL: &str = "10.217.0.0/16";

pub(crate) async fn run(
    ctx: &Ctx,
    iterations: usize,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let mut through = Vec::new();
    let mut raw = Vec::new();
    // Iteration 0 warms both paths (connections, page cache) and is dropped.
    for i in 0..=iterations {
        // Create-to-RUNNING: `Ctx::create` waits until the environment runs.
        let t = Instant::now();
        let env = ctx
            .create(&format!("bench-create-{i}"), ctx.spec(&[]))
            .await?;
        let elapsed = t.elapsed();
        ctx.delete(&env.id).await?;

        let raw_elapsed = raw_create(ctx, &env).await?;
        if i > 0 {
            through.push(elapsed);
            raw.push(raw_elapsed);
        }
    }
    let g = Summary::of(&through);
    let r = Summary::of(&raw);
    let figures = vec![
        Figure::new(
            "create.p50",
            "create-to-running p50 (gateway)",
            g.p50,
            Unit::Millis,
        )
        .baseline("raw Docker API", r.p50)
        .ratio_at_most(1.10)
        .note(format!(
            "{iterations} creates each way; raw = network + volume + container create + start of the same hardened body"
        )),
        Figure::new(
            "create.p95",
            "create-to-running p95 (gateway)",
            g.p95,
            Unit::Millis,
        )
        .baseline("raw Docker API", r.p95)
        .note("the goal is judged at p50: with the default 10 samples p95 is the slowest one"),
    ];
    Ok((figures, serde_json::json!({ "gateway_ms": g, "raw_ms": r })))
}

/// Creates and starts, with bollard, exactly what the orchestrator creates
/// for `like` (same hardened spec, image and health check), times it, then
/// removes it.
async fn raw_create(ctx: &Ctx, like: &Environment) -> anyhow::Result<Duration> {
    let d = &ctx.docker;
    let env = uuid::Uuid::new_v4().to_string();
    let installation = format!("bench-raw-{}", ctx.run_id);
    let labels = [(RUN_LABEL.to_owned(), ctx.run_id.clone())];
    let target = Target {
        installation: &installation,
        environment_id: &env,
        team_id: &like.team_id,
        owner_id: &like.owner_id,
        policy_digest: &like.policy_digest,
        extra_labels: &labels,
    };
    let spec = like.spec.clone().unwrap_or_default();
    let image = if like.canonical_image.is_empty() {
        spec.image.clone()
    } else {
        like.canonical_image.clone()
    };
    let body = docker::container_body(&spec, &image, &target, &["true".to_owned()])?;
    let subnet = free_subnet(d).await?;

    let t = Instant::now();
    d.create_network(docker::network_request(&target, subnet, false))
        .await?;
    for volume in docker::volume_requests(&target, &spec) {
        d.create_volume(volume).await?;
    }
    let name = docker::container_name(&env);
    let created = d
        .create_container(
            Some(CreateContainerOptionsBuilder::new().name(&name).build()),
            body,
        )
        .await?;
    d.start_container(&created.id, None).await?;
    let elapsed = t.elapsed();

    d.remove_container(
        &created.id,
        Some(
            RemoveContainerOptionsBuilder::new()
                .force(true)
                .v(true)
                .build(),
        ),
    )
    .await?;
    d.remove_network(&docker::network_name(&env)).await?;
    for volume in docker::volume_requests(&target, &spec) {
        let name = volume.name.unwrap_or_default();
        d.remove_volume(
            &name,
            Some(RemoveVolumeOptionsBuilder::new().force(true).build()),
        )
        .await?;
    }
    Ok(elapsed)
}

/// A /28 of [`RAW_POOL`] that no network on the engine overlaps (looked up
/// outside the timed part).
async fn free_subnet(d: &Docker) -> anyhow::Result<Cidr> {
    let taken: Vec<Cidr> = d
        .list_networks(Some(ListNetworksOptionsBuilder::new().build()))
        .await?
        .iter()
        .filter_map(|n| n.ipam.as_ref()?.config.as_ref())
        .flatten()
        .filter_map(|c| c.subnet.as_deref()?.parse().ok())
        .collect();
    subnet::allocate(RAW_POOL.parse()?, 28, &taken)
        .ok_or_else(|| anyhow::anyhow!("no free /28 left in {RAW_POOL}"))
}
