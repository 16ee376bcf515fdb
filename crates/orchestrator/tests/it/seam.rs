//! Provisioning and lifecycle through the runtime seam, without Docker: an
//! in-memory engine that records every call and refuses what a test tells
//! it to. Shows that a create the engine refuses halfway is rolled back
//! object by object, settles as failed with its subnet released, and comes
//! back as the caller's to fix; and that lifecycle calls reach the engine
//! with the container the record names.

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
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_engine_refuses_rolls_back_every_object_without_docker() {
    let seam = seam().await;
    *seam.engine.refuse_start.lock().unwrap() =
        Some("failed to create task: no command specified".into());
    let req = request(&seam, "refused");
    let id = req.environment_id.clone();
    let error = seam.orchestrator.create(req).await.unwrap_err();
    assert!(
        matches!(&error, Error::EngineRefused { field, .. } if field == "spec.command"),
        "{error:?}"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_calls_reach_the_engine_with_the_recorded_container() {
    let seam = seam().await;
    let created = seam
        .orchestrator
        .create(request(&seam, "life"))
        .await
        .unwrap();
    assert_eq!(created.state, State::Running);
    let cid = created.container_id.clone().unwrap();
    let caller = Caller::default();
    let stopped = seam
        .orchestrator
        .stop(&caller, &created.id, Some(7))
        .await
        .unwrap();
    assert_eq!(stopped.state, State::Stopped);
    let started = seam.orchestrator.start(&caller, &created.id).await.unwrap();
    assert_eq!(started.state, State::Running);
    // An engine refusal of a start is the caller's to fix, as on create.
    seam.orchestrator
        .stop(&caller, &created.id, Some(7))
        .await
        .unwrap();
    *seam.engine.refuse_start.lock().unwrap() = Some("no command specified".into());
    let refused = seam
        .orchestrator
        .start(&caller, &created.id)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::EngineRefused { field, .. } if field == "spec.command"),
        "{refused:?}"
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
