//! `vibebox-orchestrator-bench`: create-to-running latency through the
//! orchestrator (gRPC over mTLS, clearance check, admission, network, volume,
//! container, start; the create answers `creating` at once and the clock
//! stops when the background operation has settled it `running`) next to
//! raw Docker API calls (network create, container create, start) measured
//! in the same run, and their ratio.
//!
//! Usage: `vibebox-orchestrator-bench [iterations]` (default 10). Needs a
//! local Docker engine; cleans up everything it labelled.

use std::time::{Duration, Instant};

use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use vibebox_orchestrator::docker::{self, Target};
use vibebox_orchestrator::store::State;
use vibebox_orchestrator::testkit::{self, Harness, hardened_spec};
use vibebox_proto::runtime::{CreateEnvironmentRequest, DeleteEnvironmentRequest};

fn summary(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let mean = v.iter().sum::<Duration>() / v.len().max(1) as u32;
    (v[v.len() / 2], mean)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10)
        .max(1);
    let h = Harness::start(|c| c.team_max_environments = 1000).await?;
    let spec = hardened_spec(&["sleep", "3600"]);
    let docker = bollard::Docker::connect_with_defaults()?;

    // Warm-up (connection set-up, page cache) on both paths.
    let mut through = Vec::new();
    let mut raw = Vec::new();
    for i in 0..=n {
        let env = uuid::Uuid::new_v4().to_string();
        let t = Instant::now();
        h.client()
            .create_environment(CreateEnvironmentRequest {
                request_id: env.clone(),
                environment_id: env.clone(),
                team_id: "bench".into(),
                owner_id: "bench".into(),
                name: "bench".into(),
                spec: Some(spec.clone()),
                clearance: Some(testkit::clearance(
                    &h.signer,
                    &spec,
                    &env,
                    "bench",
                    Duration::from_secs(60),
                )),
                ..Default::default()
            })
            .await?;
        // The operation holds the environment until it has settled.
        h.orchestrator.wait_operation(&env).await;
        let elapsed = t.elapsed();
        let state = h.orchestrator.get(&env).await?.state;
        anyhow::ensure!(state == State::Running, "environment {env} is {state:?}");
        if i > 0 {
            through.push(elapsed);
        }
        h.client()
            .delete_environment(DeleteEnvironmentRequest {
                caller: None,
                environment_id: env.clone(),
            })
            .await?;
        h.orchestrator.wait_operation(&env).await;

        let env = uuid::Uuid::new_v4().to_string();
        let labels = [(testkit::TEST_LABEL.to_string(), h.installation.clone())];
        let target = Target {
            installation: &h.installation,
            environment_id: &env,
            team_id: "bench",
            owner_id: "bench",
            policy_digest: "bench",
            extra_labels: &labels,
        };
        let body = docker::container_body(&spec, testkit::TEST_IMAGE, &target, &["true".into()])?;
        let subnet = "10.214.0.0/28".parse()?;
        let t = Instant::now();
        docker
            .create_network(docker::network_request(&target, subnet, false))
            .await?;
        docker
            .create_volume(docker::volume_request(&target))
            .await?;
        let name = docker::container_name(&env);
        let created = docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                body,
            )
            .await?;
        docker.start_container(&created.id, None).await?;
        if i > 0 {
            raw.push(t.elapsed());
        }
        docker
            .remove_container(
                &created.id,
                Some(RemoveContainerOptionsBuilder::new().force(true).build()),
            )
            .await?;
        docker.remove_network(&docker::network_name(&env)).await?;
        docker
            .remove_volume(
                &docker::volume_name(&env),
                None::<bollard::query_parameters::RemoveVolumeOptions>,
            )
            .await?;
    }
    let (tm, ta) = summary(through);
    let (rm, ra) = summary(raw);
    println!("iterations: {n}");
    println!("orchestrator create-to-running: median {tm:?}, mean {ta:?}");
    println!("raw docker network+volume+create+start: median {rm:?}, mean {ra:?}");
    println!(
        "ratio (orchestrator / raw): median {:.2}, mean {:.2}",
        tm.as_secs_f64() / rm.as_secs_f64(),
        ta.as_secs_f64() / ra.as_secs_f64()
    );
    Ok(())
}
