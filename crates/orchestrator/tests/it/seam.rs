//! Provisioning and lifecycle through the runtime seam, without Docker: an
//! in-memory engine that records every call and refuses what a test tells
//! it to. Shows that a create the engine refuses halfway is rolled back
//! object by object and settles as failed with its subnet released and the
//! refusal as its reason; that lifecycle calls reach the engine with the
//! container the record names; and that a shutdown does not wait for an
//! operation the engine never finishes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, CreateImageInfo, NetworkCreateRequest, VolumeCreateRequest,
};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use vibebox_clearance::ClearanceSigner;
use vibebox_orchestrator::audit::{Audit, Caller};
use vibebox_orchestrator::keys::{ClearanceKeys, KeyRefresh};
use vibebox_orchestrator::runtime::{EngineResult, Runtime};
use vibebox_orchestrator::service::{CreateRequest, Error, Quotas, Settings};
use vibebox_orchestrator::store::{State, Store};
use vibebox_orchestrator::subnet::Cidr;
use vibebox_orchestrator::{Orchestrator, testkit};

/// An engine in memory: every call is written down; `start` answers what
/// the test set.
#[derive(Default)]
struct FakeEngine {
    calls: Mutex<Vec<String>>,
    refuse_start: Mutex<Option<String>>,
    /// A stop that never returns.
    hang_stop: std::sync::atomic::AtomicBool,
    /// What `update` answers (a 400 with this message).
    refuse_update: Mutex<Option<String>>,
}

impl FakeEngine {
    fn log(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

fn ok<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, EngineResult<T>> {
    Box::pin(async move { Ok(value) })
}

impl Runtime for FakeEngine {
    fn memory_bytes(&self) -> BoxFuture<'_, EngineResult<i64>> {
        ok(0)
    }
    fn subnets(&self) -> BoxFuture<'_, EngineResult<Vec<Cidr>>> {
        ok(Vec::new())
    }
    fn inspect_image<'a>(&'a self, image: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        self.log(format!("inspect_image {image}"));
        ok(())
    }
    fn pull_image<'a>(&'a self, image: &'a str) -> BoxStream<'a, EngineResult<CreateImageInfo>> {
        self.log(format!("pull_image {image}"));
        Box::pin(futures::stream::empty())
    }
    fn create_network(&self, request: NetworkCreateRequest) -> BoxFuture<'_, EngineResult<()>> {
        self.log(format!("create_network {}", request.name));
        ok(())
    }
    fn create_volume(&self, request: VolumeCreateRequest) -> BoxFuture<'_, EngineResult<()>> {
        self.log(format!(
            "create_volume {}",
            request.name.unwrap_or_default()
        ));
        ok(())
    }
    fn create_container<'a>(
        &'a self,
        name: &'a str,
        body: ContainerCreateBody,
    ) -> BoxFuture<'a, EngineResult<String>> {
        let memory = body.host_config.and_then(|h| h.memory).unwrap_or(0);
        self.log(format!("create_container {name} memory={memory}"));
        ok(format!("id-{name}"))
    }
    fn container_id<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<Option<String>>> {
        ok(Some(format!("id-{name}")))
    }
    fn start_container<'a>(&'a self, id: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        self.log(format!("start_container {id}"));
        let refusal = self.refuse_start.lock().unwrap().clone();
        Box::pin(async move {
            match refusal {
                Some(message) => Err(DockerError::DockerResponseServerError {
                    status_code: 400,
                    message,
                }),
                None => Ok(()),
            }
        })
    }
    fn stop_container<'a>(
        &'a self,
        id: &'a str,
        timeout_secs: i32,
    ) -> BoxFuture<'a, EngineResult<()>> {
        self.log(format!("stop_container {id} t={timeout_secs}"));
        if self.hang_stop.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(futures::future::pending());
        }
        ok(())
    }
    fn restart_container<'a>(
        &'a self,
        id: &'a str,
        timeout_secs: i32,
    ) -> BoxFuture<'a, EngineResult<()>> {
        self.log(format!("restart_container {id} t={timeout_secs}"));
        ok(())
    }
    fn update_container<'a>(
        &'a self,
        id: &'a str,
        body: bollard::models::ContainerUpdateBody,
    ) -> BoxFuture<'a, EngineResult<()>> {
        let limits = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        self.log(format!(
            "update_container {id} nano_cpus={} memory={} swap={} pids={}",
            limits(body.nano_cpus),
            limits(body.memory),
            limits(body.memory_swap),
            limits(body.pids_limit),
        ));
        let refusal = self.refuse_update.lock().unwrap().clone();
        Box::pin(async move {
            match refusal {
                Some(message) => Err(DockerError::DockerResponseServerError {
                    status_code: 400,
                    message,
                }),
                None => Ok(()),
            }
        })
    }
    fn remove_container<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        self.log(format!("remove_container {name}"));
        ok(())
    }
    fn remove_network<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        self.log(format!("remove_network {name}"));
        ok(())
    }
    fn remove_volume<'a>(&'a self, name: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        self.log(format!("remove_volume {name}"));
        ok(())
    }
}

struct Seam {
    orchestrator: Orchestrator,
    engine: Arc<FakeEngine>,
    signer: ClearanceSigner,
    _dir: tempfile::TempDir,
}

async fn seam() -> Seam {
    let dir = tempfile::tempdir().unwrap();
    let pki = vibebox_server_kit::testing::TestPki::new();
    let store = Store::open(&vibebox_db::sqlite_url(&dir.path().join("o.db")))
        .await
        .unwrap();
    let signer = ClearanceSigner::generate();
    let keys = ClearanceKeys::new(
        vec![signer.verifying_key()],
        None,
        KeyRefresh {
            every: Duration::from_secs(1),
            max_age: Duration::from_secs(2),
            unknown_key_min_interval: Duration::from_secs(10),
        },
    );
    let audit_client =
        vibebox_audit_client::AuditClient::open(vibebox_audit_client::AuditClientConfig {
            outbox_dir: dir.path().join("outbox"),
            // Nobody listens: events wait in the durable outbox.
            audit_url: "https://127.0.0.1:9".into(),
            tls: pki.material("orchestrator"),
            source_service: "orchestrator".into(),
        })
        .unwrap();
    // Never asked: everything provisioning does goes through the engine
    // (bollard only checks that the socket path exists).
    let socket = dir.path().join("no-engine.sock");
    std::fs::write(&socket, b"").unwrap();
    let docker = bollard::Docker::connect_with_unix(
        socket.to_str().unwrap(),
        1,
        bollard::API_DEFAULT_VERSION,
    )
    .unwrap();
    let engine = Arc::new(FakeEngine::default());
    let orchestrator = Orchestrator::with_runtime(
        docker,
        engine.clone(),
        store,
        keys,
        Audit::new(audit_client),
        Settings {
            installation: "seam".into(),
            subnet_pool: "10.77.0.0/24".parse().unwrap(),
            subnet_prefix: 28,
            quotas: Quotas {
                max_environments: 5,
                max_cpu_nanos: 8_000_000_000,
                max_memory_bytes: 8 << 30,
            },
            host_memory_share: 0.9,
            health_cmd: Vec::new(),
            extra_labels: Vec::new(),
            default_stop_timeout: 3,
            egress: Default::default(),
        },
    )
    .await
    .unwrap();
    Seam {
        orchestrator,
        engine,
        signer,
        _dir: dir,
    }
}

fn request(seam: &Seam, name: &str) -> CreateRequest {
    let environment_id = uuid::Uuid::new_v4().to_string();
    let spec = testkit::hardened_spec(&["sleep", "60"]);
    CreateRequest {
        caller: Caller::default(),
        request_id: format!("req-{name}"),
        clearance: Some(testkit::clearance(
            &seam.signer,
            &spec,
            &environment_id,
            "team-a",
            Duration::from_secs(60),
        )),
        canonical_image: spec.image.clone(),
        spec: Some(spec),
        environment_id,
        team_id: "team-a".into(),
        owner_id: "user-1".into(),
        name: name.into(),
        labels: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_engine_refuses_rolls_back_every_object_without_docker() {
    let seam = seam().await;
    *seam.engine.refuse_start.lock().unwrap() =
        Some("failed to create task: no command specified".into());
    let req = request(&seam, "refused");
    let id = req.environment_id.clone();
    // Accepted, then refused by the engine in the background.
    let accepted = seam.orchestrator.create(req).await.unwrap();
    assert_eq!(accepted.state, State::Creating);
    let record = settled(&seam, &id).await;
    assert_eq!(record.state, State::Failed);
    assert!(
        record
            .failure_reason
            .starts_with("the Docker Engine refused the spec (spec.command)"),
        "{record:?}"
    );

    let calls = seam.engine.calls();
    let container = format!("vibebox-{id}");
    let position = |call: &str| {
        calls
            .iter()
            .position(|c| c.starts_with(call))
            .unwrap_or_else(|| panic!("no {call:?} in {calls:#?}"))
    };
    // Made in order, swap pinned to memory by the body the engine got ...
    assert!(position("create_network") < position("create_container"));
    assert!(position("create_container") < position("start_container"));
    assert!(
        calls
            .iter()
            .any(|c| c == &format!("create_container {container} memory=67108864"))
    );
    // ... and every object removed after the refusal.
    let start = position("start_container");
    for removal in [
        format!("remove_container {container}"),
        format!("remove_network vibebox-{id}"),
        format!("remove_volume vibebox-ws-{id}"),
    ] {
        let at = calls
            .iter()
            .position(|c| c == &removal)
            .unwrap_or_else(|| panic!("no {removal:?} in {calls:#?}"));
        assert!(at > start, "{removal} before the refusal: {calls:#?}");
    }

    let record = seam.orchestrator.get(&id).await.unwrap();
    assert_eq!(record.state, State::Failed);
    assert_eq!(
        record.subnet, None,
        "the subnet is released with the failure"
    );
}

/// A create's request id is its owner's: retried by the same owner it
/// answers what the first call created; reused by another member of the
/// team it is refused (`request_id.reused`) and audited, and nothing of
/// the first environment is handed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_retried_by_its_owner_and_refused_to_anyone_else() {
    use vibebox_proto::audit::Outcome;
    let seam = seam().await;
    let first = request(&seam, "mine");
    let created = seam.orchestrator.create(first.clone()).await.unwrap();
    settled(&seam, &created.id).await;

    // The owner's retry (a fresh clearance for a fresh id, as through the
    // gateway): the same environment.
    let retry = CreateRequest {
        request_id: first.request_id.clone(),
        ..request(&seam, "mine")
    };
    let again = seam.orchestrator.create(retry).await.unwrap();
    assert_eq!(again.id, created.id);

    // Another owner with the same request id: refused, whatever they hold.
    let mut stolen = CreateRequest {
        request_id: first.request_id.clone(),
        ..request(&seam, "theirs")
    };
    stolen.owner_id = "user-2".into();
    stolen.caller.user_id = "user-2".into();
    let refused = seam.orchestrator.create(stolen.clone()).await.unwrap_err();
    assert!(
        matches!(&refused, Error::RequestIdReused { request_id } if *request_id == first.request_id),
        "{refused:?}"
    );
    let status = tonic::Status::from(refused);
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        vibebox_server_kit::status::error_reason(&status).as_deref(),
        Some("request_id.reused")
    );
    assert!(!status.message().contains(&created.id), "{status:?}");
    // Nothing was created for them, and the refusal is audited.
    assert!(matches!(
        seam.orchestrator.get(&stolen.environment_id).await,
        Err(Error::NotFound)
    ));
    let audited: Vec<_> = seam
        .orchestrator
        .audit()
        .recent()
        .into_iter()
        .filter(|e| e.resource_id == stolen.environment_id)
        .collect();
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0].action, "environment.create");
    assert_eq!(audited[0].outcome, Outcome::Failure as i32);
    assert_eq!(
        seam.orchestrator.store().count("seam").await.unwrap(),
        1,
        "one environment"
    );
}

/// Waits for the operation in progress on `id`, and returns the record it
/// left.
async fn settled(seam: &Seam, id: &str) -> vibebox_orchestrator::store::EnvRecord {
    seam.orchestrator.wait_operation(id).await;
    let record = seam.orchestrator.get(id).await.unwrap();
    assert!(!record.state.is_transitional(), "{record:?}");
    assert_eq!(record.progress_percent, 100);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_calls_reach_the_engine_with_the_recorded_container() {
    let seam = seam().await;
    let accepted = seam
        .orchestrator
        .create(request(&seam, "life"))
        .await
        .unwrap();
    let created = settled(&seam, &accepted.id).await;
    assert_eq!(created.state, State::Running);
    let cid = created.container_id.clone().unwrap();
    let caller = Caller::default();
    let stopping = seam
        .orchestrator
        .stop(&caller, &created.id, Some(7))
        .await
        .unwrap();
    assert_eq!(stopping.state, State::Stopping);
    assert_eq!(settled(&seam, &created.id).await.state, State::Stopped);
    // A stop of a stopped environment is refused at once.
    let again = seam
        .orchestrator
        .stop(&caller, &created.id, Some(7))
        .await
        .unwrap_err();
    assert!(
        matches!(
            again,
            Error::BadState {
                state: "stopped",
                operation: "stop"
            }
        ),
        "{again:?}"
    );
    let starting = seam.orchestrator.start(&caller, &created.id).await.unwrap();
    assert_eq!(starting.state, State::Starting);
    assert_eq!(settled(&seam, &created.id).await.state, State::Running);
    // An engine refusal of a start is the caller's to fix, as on create: the
    // environment stays stopped, with the refusal as its reason.
    seam.orchestrator
        .stop(&caller, &created.id, Some(7))
        .await
        .unwrap();
    settled(&seam, &created.id).await;
    *seam.engine.refuse_start.lock().unwrap() = Some("no command specified".into());
    let starting = seam.orchestrator.start(&caller, &created.id).await.unwrap();
    assert_eq!(starting.state, State::Starting);
    let refused = settled(&seam, &created.id).await;
    assert_eq!(refused.state, State::Stopped);
    assert!(
        refused
            .failure_reason
            .starts_with("start failed: the Docker Engine refused the spec (spec.command)"),
        "{refused:?}"
    );
    // Each outcome is audited under its operation's own id.
    let starts: Vec<_> = seam
        .orchestrator
        .audit()
        .recent()
        .into_iter()
        .filter(|e| e.action == "environment.start" && e.resource_id == created.id)
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_ne!(starts[0].id, starts[1].id);
    assert_eq!(
        starts[1].outcome,
        vibebox_proto::audit::Outcome::Failure as i32
    );
    let calls = seam.engine.calls();
    assert!(
        calls.contains(&format!("stop_container {cid} t=7")),
        "{calls:#?}"
    );
    assert_eq!(
        calls
            .iter()
            .filter(|c| *c == &format!("start_container {cid}"))
            .count(),
        3,
        "{calls:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_abandons_an_operation_the_engine_never_finishes() {
    let seam = seam().await;
    let accepted = seam
        .orchestrator
        .create(request(&seam, "hang"))
        .await
        .unwrap();
    settled(&seam, &accepted.id).await;
    seam.engine
        .hang_stop
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let stopping = seam
        .orchestrator
        .stop(&Caller::default(), &accepted.id, None)
        .await
        .unwrap();
    assert_eq!(stopping.state, State::Stopping);

    // The stop never ends: the shutdown waits its grace, then abandons it.
    let began = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(10),
        seam.orchestrator
            .shutdown_operations(Duration::from_millis(200)),
    )
    .await
    .expect("the shutdown does not hang");
    assert!(began.elapsed() >= Duration::from_millis(200));
    // Left as a crash would leave it (reconcile finishes it), and the
    // environment is free again.
    seam.orchestrator.wait_operation(&accepted.id).await;
    let left = seam.orchestrator.get(&accepted.id).await.unwrap();
    assert_eq!(left.state, State::Stopping);
    assert_eq!(left.operation, "stop");
    assert!(
        !seam
            .orchestrator
            .audit()
            .recent()
            .iter()
            .any(|e| e.action == "environment.stop"),
        "nothing audited for a stop that did not finish"
    );
}

/// In-place updates through the seam: the engine is asked before the
/// audited commit, a refusal anywhere changes nothing, and only resources
/// change in place.
mod update {
    use std::collections::BTreeMap;

    use vibebox_orchestrator::service::Rejection;
    use vibebox_orchestrator::store::EnvRecord;
    use vibebox_orchestrator::update::{UpdateRefusal, UpdateRequest, labels_of};
    use vibebox_proto::audit::{AuditEvent, Outcome};
    use vibebox_proto::environment::ContainerSpec;

    use super::*;

    const MIB: i64 = 1024 * 1024;

    async fn running(seam: &Seam, name: &str) -> EnvRecord {
        let accepted = seam.orchestrator.create(request(seam, name)).await.unwrap();
        let record = settled(seam, &accepted.id).await;
        assert_eq!(record.state, State::Running);
        record
    }

    fn resized(cpu: f64, memory_mb: i64, pids: i64) -> ContainerSpec {
        ContainerSpec {
            cpu_limit: Some(cpu),
            memory_limit_mb: Some(memory_mb),
            pids_limit: Some(pids),
            ..testkit::hardened_spec(&["sleep", "60"])
        }
    }

    fn resize(
        seam: &Seam,
        rec: &EnvRecord,
        spec: ContainerSpec,
        request_id: &str,
    ) -> UpdateRequest {
        UpdateRequest {
            caller: Caller {
                user_id: "user-1".into(),
                ..Caller::default()
            },
            environment_id: rec.id.clone(),
            update_mask: vec![
                "spec.cpu_limit".into(),
                "spec.memory_limit_mb".into(),
                "spec.pids_limit".into(),
            ],
            clearance: Some(testkit::clearance(
                &seam.signer,
                &spec,
                &rec.id,
                "team-a",
                Duration::from_secs(60),
            )),
            spec: Some(spec),
            request_id: request_id.into(),
            ..UpdateRequest::default()
        }
    }

    fn events(seam: &Seam, env: &str) -> Vec<AuditEvent> {
        seam.orchestrator
            .audit()
            .recent()
            .into_iter()
            .filter(|e| e.action == "environment.update" && e.resource_id == env)
            .collect()
    }

    fn detail(e: &AuditEvent, key: &str) -> String {
        use prost_types::value::Kind;
        match e
            .details
            .as_ref()
            .and_then(|d| d.fields.get(key))
            .and_then(|v| v.kind.clone())
        {
            Some(Kind::StringValue(s)) => s,
            other => panic!("detail {key}: {other:?}"),
        }
    }

    fn updates(seam: &Seam) -> Vec<String> {
        seam.engine
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("update_container"))
            .collect()
    }

    /// The parts of a record an update may change.
    fn changeable(r: &EnvRecord) -> (Vec<u8>, i64, i64, String, String, String, String, i64) {
        (
            r.spec.clone(),
            r.nano_cpus,
            r.memory_bytes,
            r.name.clone(),
            r.labels.clone(),
            r.clearance_id.clone(),
            r.pending_update.clone(),
            r.update_time_ms,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resize_reaches_the_engine_before_its_audited_commit_once() {
        let seam = seam().await;
        let rec = running(&seam, "resize").await;
        let cid = rec.container_id.clone().unwrap();
        let spec = resized(1.5, 256, 200);
        let mut req = resize(&seam, &rec, spec.clone(), "upd-1");
        req.update_mask.extend(["name".into(), "labels".into()]);
        req.name = "renamed".into();
        req.labels = BTreeMap::from([("ci".into(), "true".into())]);
        let updated = seam.orchestrator.update(req.clone()).await.unwrap();

        assert_eq!(
            updates(&seam),
            [format!(
                "update_container {cid} nano_cpus=1500000000 memory={} swap={} pids=200",
                256 * MIB,
                256 * MIB
            )],
            "swap pinned to memory"
        );
        let stored: ContainerSpec = prost::Message::decode(updated.spec.as_slice()).unwrap();
        assert_eq!(stored, spec, "the stored spec is the cleared new one");
        assert_eq!(
            (updated.nano_cpus, updated.memory_bytes),
            (1_500_000_000, 256 * MIB)
        );
        assert_eq!(updated.name, "renamed");
        assert_eq!(labels_of(&updated), req.labels);
        assert_eq!(
            updated.update_request_id,
            vibebox_orchestrator::update::update_key(&req.caller, "upd-1"),
            "the key is the caller's"
        );
        assert_eq!(updated.pending_update, "", "nothing left pending");
        assert_ne!(updated.clearance_id, rec.clearance_id);
        assert!(updated.update_time_ms >= rec.update_time_ms);
        assert_eq!(updated.state, State::Running);

        let audited = events(&seam, &rec.id);
        assert_eq!(audited.len(), 1, "{audited:?}");
        assert_eq!(audited[0].outcome, Outcome::Success as i32);
        assert_eq!(
            detail(&audited[0], "paths"),
            "name,labels,spec.cpu_limit,spec.memory_limit_mb,spec.pids_limit"
        );
        assert_eq!(detail(&audited[0], "spec.cpu_limit"), "0.25 -> 1.5");
        assert_eq!(detail(&audited[0], "spec.memory_limit_mb"), "64 -> 256");
        assert_eq!(detail(&audited[0], "spec.pids_limit"), "64 -> 200");
        assert_eq!(detail(&audited[0], "name"), "resize -> renamed");
        assert_eq!(detail(&audited[0], "labels"), r#"{} -> {"ci":"true"}"#);

        // A retry of the same request: the record as it is, nothing again.
        let again = seam.orchestrator.update(req.clone()).await.unwrap();
        assert_eq!(changeable(&again), changeable(&updated));
        assert_eq!(updates(&seam).len(), 1);
        assert_eq!(events(&seam, &rec.id).len(), 1);
        // The same clearance under another request id is a replay.
        let replayed = seam
            .orchestrator
            .update(UpdateRequest {
                request_id: "upd-2".into(),
                ..req.clone()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(replayed, Error::Clearance(Rejection::Replayed)),
            "{replayed:?}"
        );
        assert_eq!(updates(&seam).len(), 1, "a replay never reaches the engine");

        // Another caller reusing the request id is not retrying: the update
        // is applied, not answered as a no-op.
        let mut other = resize(&seam, &rec, resized(1.0, 256, 200), "upd-1");
        other.caller.user_id = "user-2".into();
        let by_other = seam.orchestrator.update(other.clone()).await.unwrap();
        assert_eq!(updates(&seam).len(), 2, "applied by the engine");
        assert_eq!(by_other.nano_cpus, 1_000_000_000);
        assert_eq!(
            by_other.update_request_id,
            vibebox_orchestrator::update::update_key(&other.caller, "upd-1")
        );
        assert_eq!(events(&seam, &rec.id).len(), 2);
        // The first caller's retry now is not the last update applied
        // either: with its used clearance it is a replay, never a silent
        // success over the other caller's change.
        let stale = seam.orchestrator.update(req.clone()).await.unwrap_err();
        assert!(
            matches!(stale, Error::Clearance(Rejection::Replayed)),
            "{stale:?}"
        );
        // And the other caller's own retry is one.
        let again = seam.orchestrator.update(other).await.unwrap();
        assert_eq!(changeable(&again), changeable(&by_other));
        assert_eq!(updates(&seam).len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_by_the_engine_or_a_quota_changes_nothing_and_is_audited() {
        let seam = seam().await;
        let rec = running(&seam, "refused").await;
        let before = changeable(&seam.orchestrator.get(&rec.id).await.unwrap());

        *seam.engine.refuse_update.lock().unwrap() =
            Some("Range of CPUs is from 0.01 to 2.00, as there are only 2 CPUs available".into());
        let refused = seam
            .orchestrator
            .update(resize(&seam, &rec, resized(3.0, 64, 64), "too-many-cpus"))
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, Error::EngineRefused { field, .. } if field == "spec.cpu_limit"),
            "{refused:?}"
        );
        assert_eq!(updates(&seam).len(), 1);
        let after = seam.orchestrator.get(&rec.id).await.unwrap();
        assert_eq!(changeable(&after), before, "the reservation is given back");
        *seam.engine.refuse_update.lock().unwrap() = None;

        // 9 GiB is over the team's 8: refused before the engine is asked.
        let over = seam
            .orchestrator
            .update(resize(
                &seam,
                &rec,
                resized(0.25, 9 * 1024, 64),
                "too-much-memory",
            ))
            .await
            .unwrap_err();
        assert!(matches!(over, Error::Quota { .. }), "{over:?}");
        assert_eq!(updates(&seam).len(), 1, "the engine was not asked");
        let after = seam.orchestrator.get(&rec.id).await.unwrap();
        assert_eq!(changeable(&after), before);

        let audited = events(&seam, &rec.id);
        assert_eq!(audited.len(), 2, "{audited:?}");
        assert!(audited.iter().all(|e| e.outcome == Outcome::Failure as i32));
        assert!(detail(&audited[0], "error").contains("CPUs"));
        assert!(detail(&audited[1], "error").contains("quota"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_resources_change_in_place_and_a_stopped_environment_is_resized() {
        let seam = seam().await;
        let rec = running(&seam, "fields").await;

        // A cleared spec that changes more than resources.
        let mut image = resized(0.5, 64, 64);
        image.image = "vibebox-test/other:1".into();
        let refused = seam
            .orchestrator
            .update(resize(&seam, &rec, image, "image"))
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, Error::Update(UpdateRefusal::RequiresRecreate { path }) if path == "spec.image"),
            "{refused:?}"
        );
        // A path of the spec that is not a resource; one that is nothing.
        let mut mask = resize(&seam, &rec, resized(0.5, 64, 64), "mask");
        mask.update_mask = vec!["spec.mounts".into()];
        let refused = seam.orchestrator.update(mask.clone()).await.unwrap_err();
        assert!(
            matches!(&refused, Error::Update(UpdateRefusal::RequiresRecreate { path }) if path == "spec.mounts"),
            "{refused:?}"
        );
        mask.update_mask = vec!["team_id".into()];
        let refused = seam.orchestrator.update(mask).await.unwrap_err();
        assert!(
            matches!(
                refused,
                Error::InvalidArgument {
                    field: "update_mask",
                    ..
                }
            ),
            "{refused:?}"
        );
        // Resources without a clearance.
        let mut bare = resize(&seam, &rec, resized(0.5, 64, 64), "bare");
        bare.clearance = None;
        let refused = seam.orchestrator.update(bare).await.unwrap_err();
        assert!(
            matches!(refused, Error::Clearance(Rejection::Missing)),
            "{refused:?}"
        );
        assert!(
            updates(&seam).is_empty(),
            "none of these reached the engine"
        );

        // Metadata alone needs no clearance and no engine.
        let renamed = seam
            .orchestrator
            .update(UpdateRequest {
                environment_id: rec.id.clone(),
                update_mask: vec!["name".into()],
                name: "fields-2".into(),
                request_id: "rename".into(),
                ..UpdateRequest::default()
            })
            .await
            .unwrap();
        assert_eq!(renamed.name, "fields-2");
        assert_eq!(renamed.spec, rec.spec);
        assert!(updates(&seam).is_empty());

        // A stopped environment is resized too.
        seam.orchestrator
            .stop(&Caller::default(), &rec.id, Some(1))
            .await
            .unwrap();
        assert_eq!(settled(&seam, &rec.id).await.state, State::Stopped);
        let resized = seam
            .orchestrator
            .update(resize(&seam, &rec, resized(0.5, 96, 80), "stopped"))
            .await
            .unwrap();
        assert_eq!(resized.state, State::Stopped);
        assert_eq!(resized.memory_bytes, 96 * MIB);
        assert_eq!(updates(&seam).len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_update_is_refused_while_an_operation_is_in_progress() {
        let seam = seam().await;
        let rec = running(&seam, "busy").await;
        seam.engine
            .hang_stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let stopping = seam
            .orchestrator
            .stop(&Caller::default(), &rec.id, None)
            .await
            .unwrap();
        assert_eq!(stopping.state, State::Stopping);
        let refused = tokio::time::timeout(
            Duration::from_secs(2),
            seam.orchestrator.update(UpdateRequest {
                environment_id: rec.id.clone(),
                update_mask: vec!["name".into()],
                name: "later".into(),
                request_id: "during-stop".into(),
                ..UpdateRequest::default()
            }),
        )
        .await
        .expect("refused at once, not after the stop")
        .unwrap_err();
        assert!(
            matches!(
                refused,
                Error::OperationInProgress {
                    state: "stopping",
                    ..
                }
            ),
            "{refused:?}"
        );
        seam.orchestrator.abandon_operations();
    }
}
