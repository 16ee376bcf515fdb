//! `UpdateEnvironment` and environment labels through the real gateway
//! (five processes, real Docker), with a small policy ceiling (1 CPU, 256
//! MiB, 512 PIDs) and small team quotas (1.25 CPUs, 512 MiB): a rename and a
//! relabel read back; a resize judged by policy again and applied to the
//! live container (and to a stopped one, kept after its start); a resize
//! above the ceiling refused with the rule id and the container unchanged;
//! a path that needs a new container refused with
//! `update.requires_recreate`; viewers and other developers refused; a
//! resize over the team quota refused with a QuotaFailure; every update
//! audited as `environment.update`, without the environment's secrets.

use std::collections::BTreeMap;

use bollard::query_parameters::InspectContainerOptions;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use vibebox_proto::audit::{EventFilter, Outcome, QueryEventsRequest};
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, Environment, EnvironmentState, GetEnvironmentRequest,
    UpdateEnvironmentRequest,
};
use vibebox_proto::identity::TeamRole;
use vibebox_server_kit::status::{error_reason, violated_rules};
use vibebox_tests::cluster::{Cluster, Service};
use vibebox_tests::{Settle, dev_image, docker};

const MIB: i64 = 1024 * 1024;
const POLICY: &str = "[resources]\ndefault_cpus = 0.25\ndefault_memory_mb = 64\n\
                      default_pids = 64\nmax_cpus = 1.0\nmax_memory_mb = 256\nmax_pids = 512\n";
const SECRET: &str = "update-e2e-s3cr3t";

async fn cluster(dir: &tempfile::TempDir) -> Cluster {
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, POLICY).expect("policy file");
    Cluster::builder()
        .arg(Service::Policy, format!("--policy-file={}", file.display()))
        .arg(Service::Orchestrator, "--team-max-cpu=1.25")
        .arg(Service::Orchestrator, "--team-max-memory-mb=512")
        .arg(Service::Orchestrator, "--stop-timeout=1")
        .start()
        .await
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

async fn create(
    c: &Cluster,
    token: &str,
    team: &str,
    name: &str,
    labels: BTreeMap<String, String>,
) -> Environment {
    let env = c
        .environments(token)
        .create_settled(CreateEnvironmentRequest {
            request_id: format!("update-{name}"),
            team_id: team.into(),
            name: name.into(),
            labels,
            spec: Some(ContainerSpec {
                image: dev_image(),
                env: [("SECRET".to_owned(), SECRET.to_owned())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e:?}"));
    assert_eq!(env.state(), EnvironmentState::Running, "{name}: {env:?}");
    env
}

/// An update of `id` naming `paths`, with the values in `env`.
fn update(
    id: &str,
    paths: &[&str],
    env: Environment,
    request_id: &str,
) -> UpdateEnvironmentRequest {
    UpdateEnvironmentRequest {
        environment: Some(Environment {
            id: id.into(),
            ..env
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        }),
        request_id: request_id.into(),
    }
}

fn resources(cpu: Option<f64>, memory_mb: Option<i64>, pids: Option<i64>) -> Environment {
    Environment {
        spec: Some(ContainerSpec {
            cpu_limit: cpu,
            memory_limit_mb: memory_mb,
            pids_limit: pids,
            ..Default::default()
        }),
        ..Default::default()
    }
}

const RESOURCES: [&str; 3] = ["spec.cpu_limit", "spec.memory_limit_mb", "spec.pids_limit"];

async fn updated(c: &Cluster, token: &str, request: UpdateEnvironmentRequest) -> Environment {
    c.environments(token)
        .update_environment(request)
        .await
        .unwrap_or_else(|e| panic!("update: {e:?}"))
        .into_inner()
        .environment
        .expect("environment")
}

async fn refused(c: &Cluster, token: &str, request: UpdateEnvironmentRequest) -> Status {
    c.environments(token)
        .update_environment(request)
        .await
        .expect_err("the update is refused")
}

async fn get(c: &Cluster, token: &str, id: &str) -> Environment {
    c.environments(token)
        .get_environment(GetEnvironmentRequest {
            environment_id: id.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .environment
        .expect("environment")
}

/// (NanoCpus, Memory, MemorySwap, PidsLimit) of the environment's live
/// container, as the engine reports them.
async fn limits(id: &str) -> (i64, i64, i64, i64) {
    let host = docker()
        .inspect_container(&format!("vibebox-{id}"), None::<InspectContainerOptions>)
        .await
        .expect("inspect the environment's container")
        .host_config
        .expect("host config");
    (
        host.nano_cpus.unwrap_or(0),
        host.memory.unwrap_or(0),
        host.memory_swap.unwrap_or(0),
        host.pids_limit.unwrap_or(0),
    )
}

fn spec_limits(env: &Environment) -> (Option<f64>, Option<i64>, Option<i64>) {
    let spec = env.spec.as_ref().expect("spec");
    (spec.cpu_limit, spec.memory_limit_mb, spec.pids_limit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_are_renamed_relabelled_and_resized_live_within_policy_and_quota() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir).await;
    let team = c.team("updaters").await;
    let dev = c.user("upd-dev", &team, TeamRole::Developer).await;
    let other_dev = c.user("upd-other", &team, TeamRole::Developer).await;
    let viewer = c.user("upd-viewer", &team, TeamRole::Viewer).await;
    let team_admin = c.user("upd-admin", &team, TeamRole::Admin).await;

    // Labels given at create come back, and bad ones name themselves.
    let bad = c
        .environments(&dev)
        .create_environment(CreateEnvironmentRequest {
            request_id: "update-bad-labels".into(),
            team_id: team.clone(),
            name: "bad".into(),
            labels: labels(&[("Not A Key", "x")]),
            spec: Some(ContainerSpec {
                image: dev_image(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    let fields: Vec<String> = bad
        .get_details_bad_request()
        .expect("a BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, [r#"labels["Not A Key"]"#]);
    let web = create(
        &c,
        &dev,
        &team,
        "web",
        labels(&[("ci", "true"), ("app/tier", "web")]),
    )
    .await;
    let id = web.id.clone();
    assert_eq!(web.labels, labels(&[("ci", "true"), ("app/tier", "web")]));
    assert_eq!(get(&c, &viewer, &id).await.labels, web.labels);
    assert_eq!(spec_limits(&web), (Some(0.25), Some(64), Some(64)));
    assert_eq!(limits(&id).await, (250_000_000, 64 * MIB, 64 * MIB, 64));

    // Rename and relabel: the labels are replaced as a whole.
    let renamed = updated(
        &c,
        &dev,
        update(
            &id,
            &["name", "labels"],
            Environment {
                name: "web-2".into(),
                labels: labels(&[("stage", "canary")]),
                ..Default::default()
            },
            "rename-1",
        ),
    )
    .await;
    assert_eq!(renamed.name, "web-2");
    assert_eq!(renamed.labels, labels(&[("stage", "canary")]));
    let read = get(&c, &viewer, &id).await;
    assert_eq!(
        (read.name.as_str(), &read.labels),
        ("web-2", &renamed.labels)
    );
    assert_eq!(limits(&id).await, (250_000_000, 64 * MIB, 64 * MIB, 64));

    // Resize: judged by policy, applied to the running container, and the
    // environment's secret stays write-only in the answer.
    let resized = updated(
        &c,
        &dev,
        update(
            &id,
            &RESOURCES,
            resources(Some(0.5), Some(128), Some(100)),
            "resize-1",
        ),
    )
    .await;
    assert_eq!(spec_limits(&resized), (Some(0.5), Some(128), Some(100)));
    assert_eq!(resized.state(), EnvironmentState::Running);
    assert_eq!(
        resized
            .spec
            .as_ref()
            .unwrap()
            .env
            .get("SECRET")
            .map(String::as_str),
        Some(""),
        "values never leave the gateway"
    );
    assert_eq!(
        limits(&id).await,
        (500_000_000, 128 * MIB, 128 * MIB, 100),
        "the live container has the new limits, swap pinned to memory"
    );
    assert_eq!(
        spec_limits(&get(&c, &dev, &id).await),
        (Some(0.5), Some(128), Some(100))
    );
    // A retry of the same request changes nothing more.
    let again = updated(
        &c,
        &dev,
        update(
            &id,
            &RESOURCES,
            resources(Some(0.5), Some(128), Some(100)),
            "resize-1",
        ),
    )
    .await;
    assert_eq!(again.update_time, resized.update_time);

    // Above the policy's ceiling: refused with the rule, nothing changes.
    let ceiling = refused(
        &c,
        &dev,
        update(
            &id,
            &["spec.cpu_limit"],
            resources(Some(1.5), None, None),
            "too-big",
        ),
    )
    .await;
    assert_eq!(ceiling.code(), Code::FailedPrecondition, "{ceiling:?}");
    assert_eq!(violated_rules(&ceiling), ["resources.ceiling"]);
    assert_eq!(limits(&id).await, (500_000_000, 128 * MIB, 128 * MIB, 100));
    assert_eq!(
        spec_limits(&get(&c, &dev, &id).await),
        (Some(0.5), Some(128), Some(100))
    );

    // What needs a new container says so, naming the path; what is not a
    // path of an environment is an invalid argument.
    let recreate = refused(
        &c,
        &dev,
        update(
            &id,
            &["spec.image"],
            Environment {
                spec: Some(ContainerSpec {
                    image: "vibebox/other:1".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "image",
        ),
    )
    .await;
    assert_eq!(recreate.code(), Code::FailedPrecondition, "{recreate:?}");
    assert_eq!(
        error_reason(&recreate).as_deref(),
        Some("update.requires_recreate")
    );
    let info = recreate.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        info.metadata.get("path").map(String::as_str),
        Some("spec.image")
    );
    let invalid = refused(
        &c,
        &dev,
        update(&id, &["owner_id"], Environment::default(), "owner"),
    )
    .await;
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    let fields: Vec<String> = invalid
        .get_details_bad_request()
        .expect("a BadRequest")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["update_mask.paths[0]"]);

    // A viewer and another developer may not; a team admin may.
    let rename = |name: &str, request_id: &str| {
        update(
            &id,
            &["name"],
            Environment {
                name: name.into(),
                ..Default::default()
            },
            request_id,
        )
    };
    for (who, token) in [("viewer", &viewer), ("other-developer", &other_dev)] {
        let denied = refused(&c, token, rename("taken", &format!("by-{who}"))).await;
        assert_eq!(denied.code(), Code::PermissionDenied, "{who}: {denied:?}");
    }
    assert_eq!(get(&c, &dev, &id).await.name, "web-2");
    let by_admin = updated(&c, &team_admin, rename("web-3", "by-admin")).await;
    assert_eq!(by_admin.name, "web-3");

    // A stopped environment is resized too, and starts with its new limits.
    c.environments(&dev)
        .stop_settled(&id, Some(1))
        .await
        .expect("stop");
    let stopped = updated(
        &c,
        &dev,
        update(
            &id,
            &["spec.memory_limit_mb"],
            resources(None, Some(192), None),
            "resize-stopped",
        ),
    )
    .await;
    assert_eq!(stopped.state(), EnvironmentState::Stopped);
    assert_eq!(spec_limits(&stopped), (Some(0.5), Some(192), Some(100)));
    assert_eq!(limits(&id).await, (500_000_000, 192 * MIB, 192 * MIB, 100));
    let started = c
        .environments(&dev)
        .start_settled(&id)
        .await
        .expect("start");
    assert_eq!(started.state(), EnvironmentState::Running, "{started:?}");
    assert_eq!(limits(&id).await, (500_000_000, 192 * MIB, 192 * MIB, 100));

    // The team quota (1.25 CPUs): 0.5 + 0.25 held, so 1.0 for the second
    // environment is over it, though within the policy's ceiling.
    let api = create(&c, &dev, &team, "api", BTreeMap::new()).await;
    let quota = refused(
        &c,
        &dev,
        update(
            &api.id,
            &["spec.cpu_limit"],
            resources(Some(1.0), None, None),
            "api-big",
        ),
    )
    .await;
    assert_eq!(quota.code(), Code::ResourceExhausted, "{quota:?}");
    let failure = quota.get_details_quota_failure().expect("a QuotaFailure");
    assert_eq!(failure.violations.len(), 1, "{failure:?}");
    assert!(
        failure.violations[0].description.contains("CPU"),
        "{failure:?}"
    );
    assert_eq!(limits(&api.id).await, (250_000_000, 64 * MIB, 64 * MIB, 64));
    // Within it, it fits (0.5 + 0.75 = 1.25).
    let fits = updated(
        &c,
        &dev,
        update(
            &api.id,
            &["spec.cpu_limit"],
            resources(Some(0.75), None, None),
            "api-fits",
        ),
    )
    .await;
    assert_eq!(spec_limits(&fits).0, Some(0.75));
    assert_eq!(limits(&api.id).await.0, 750_000_000);

    // Every update is audited, successes and refusals, never with the
    // secret.
    let admin = c.admin_token();
    let mut events = Vec::new();
    for _ in 0..100 {
        events = c
            .audit(&admin)
            .query_events(QueryEventsRequest {
                filter: Some(EventFilter {
                    action: "environment.update".into(),
                    ..Default::default()
                }),
                page_size: 100,
                page_token: String::new(),
            })
            .await
            .expect("query the audit log")
            .into_inner()
            .events;
        let successes = events
            .iter()
            .filter(|e| e.outcome == Outcome::Success as i32)
            .count();
        let failures = events.len() - successes;
        // Rename, resize, rename by the admin, resize stopped, api fits;
        // the quota refusal.
        if successes >= 5 && failures >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let of = |resource: &str, outcome: Outcome| {
        events
            .iter()
            .filter(|e| e.resource_id == resource && e.outcome == outcome as i32)
            .count()
    };
    assert_eq!(of(&id, Outcome::Success), 4, "{events:#?}");
    assert_eq!(of(&api.id, Outcome::Success), 1, "{events:#?}");
    assert_eq!(of(&api.id, Outcome::Failure), 1, "{events:#?}");
    // The resize's event names each path with its old and new value.
    let resize_event = events
        .iter()
        .find(|e| {
            e.resource_id == id
                && e.details
                    .as_ref()
                    .is_some_and(|d| d.fields.contains_key("spec.cpu_limit"))
        })
        .expect("the resize's event");
    let detail = |key: &str| match resize_event
        .details
        .as_ref()
        .and_then(|d| d.fields.get(key))
        .and_then(|v| v.kind.clone())
    {
        Some(prost_types::value::Kind::StringValue(s)) => s,
        other => panic!("{key}: {other:?}"),
    };
    assert_eq!(
        detail("paths"),
        "spec.cpu_limit,spec.memory_limit_mb,spec.pids_limit"
    );
    assert_eq!(detail("spec.cpu_limit"), "0.25 -> 0.5");
    assert_eq!(detail("spec.memory_limit_mb"), "64 -> 128");
    assert_eq!(detail("spec.pids_limit"), "64 -> 100");
    let all = c
        .audit(&admin)
        .query_events(QueryEventsRequest {
            filter: Some(EventFilter {
                text: SECRET.into(),
                ..Default::default()
            }),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .expect("query the audit log")
        .into_inner()
        .events;
    assert!(all.is_empty(), "the secret is in the audit log: {all:#?}");
}
