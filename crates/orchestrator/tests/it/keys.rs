//! Clearance keys fetched from the policy service's ClearanceService over
//! mTLS: an unknown key id triggers a (rate-limited) refresh, so rotated keys
//! are picked up and keys nobody published are still refused; the ring is
//! refreshed at most every `--key-ring-refresh-ms`, so a key policy stops
//! publishing (retired) is refused without a restart, and a ring policy could
//! not refresh for `--key-ring-max-age-ms` verifies nothing (fail closed).
//!
//! The ClearanceService here serves keys only (the policy crate's service
//! can take its place once it exists); everything else is real: mTLS with
//! the kit's caller check, gRPC, Docker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use vibebox_clearance::ClearanceSigner;
use vibebox_orchestrator::testkit::{self, Harness, hardened_spec};
use vibebox_proto::clearance::clearance_service_server::{
    ClearanceService, ClearanceServiceServer,
};
use vibebox_proto::clearance::*;
use vibebox_proto::runtime::CreateEnvironmentRequest;
use vibebox_server_kit::ServerBuilder;
use vibebox_server_kit::testing::TestPki;

#[derive(Clone, Default)]
struct Keys {
    keys: Arc<Mutex<Vec<ClearanceKey>>>,
    fetches: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl ClearanceService for Keys {
    async fn issue_clearance(
        &self,
        _: Request<IssueClearanceRequest>,
    ) -> Result<Response<IssueClearanceResponse>, Status> {
        Err(Status::unimplemented("keys only"))
    }

    async fn get_clearance_keys(
        &self,
        _: Request<GetClearanceKeysRequest>,
    ) -> Result<Response<GetClearanceKeysResponse>, Status> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(GetClearanceKeysResponse {
            keys: self.keys.lock().unwrap().clone(),
        }))
    }
}

/// Creates an environment with a clearance `signer` signed, and waits
/// until it is running.
async fn create(h: &Harness, signer: &ClearanceSigner) {
    let req = request(signer);
    let id = req.environment_id.clone();
    h.client().create_environment(req).await.unwrap();
    let env = crate::common::settled(&h.client(), &id).await;
    assert_eq!(
        env.state(),
        vibebox_proto::environment::EnvironmentState::Running
    );
}

fn request(signer: &ClearanceSigner) -> CreateEnvironmentRequest {
    let spec = hardened_spec(&["sleep", "3600"]);
    let env = uuid::Uuid::new_v4().to_string();
    CreateEnvironmentRequest {
        request_id: env.clone(),
        environment_id: env.clone(),
        team_id: "team".into(),
        owner_id: "owner".into(),
        clearance: Some(testkit::clearance(
            signer,
            &spec,
            &env,
            "team",
            Duration::from_secs(60),
        )),
        spec: Some(spec),
        ..Default::default()
    }
}

/// A keys-only policy service and an orchestrator fetching from it.
async fn start(refresh_seconds: u64) -> (Harness, Keys, CancellationToken) {
    // Periodic refresh off: these tests count fetches triggered by key ids.
    start_with(refresh_seconds, 3_600_000, 3_600_000).await
}

async fn start_with(
    refresh_seconds: u64,
    ring_refresh_ms: u64,
    ring_max_age_ms: u64,
) -> (Harness, Keys, CancellationToken) {
    let pki = Arc::new(TestPki::new());
    let keys = Keys::default();
    let args = pki.server_args("policy");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    let server = ServerBuilder::new("policy", &args)
        .tls(Some(pki.material("policy")))
        .allow_callers(&["gateway", "orchestrator"])
        .add_service(ClearanceServiceServer::new(keys.clone()));
    let s = stop.clone();
    tokio::spawn(async move { server.serve(listener, s).await });
    let h = Harness::start_with_pki(pki, |c| {
        c.clearance_public_key_file = None;
        c.policy_url = format!("https://127.0.0.1:{port}");
        c.key_refresh_seconds = refresh_seconds;
        c.key_ring_refresh_ms = ring_refresh_ms;
        c.key_ring_max_age_ms = ring_max_age_ms;
    })
    .await
    .unwrap();
    (h, keys, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_fetched_from_policy_and_refreshed_on_rotation() {
    let (h, keys, stop) = start(0).await;
    let first = ClearanceSigner::generate();
    keys.keys.lock().unwrap().push(first.public_key());
    create(&h, &first).await;
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 1);
    // A known key needs no fetch.
    create(&h, &first).await;
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 1);

    // Rotation: a new key appears at the policy service.
    let second = ClearanceSigner::generate();
    keys.keys.lock().unwrap().push(second.public_key());
    create(&h, &second).await;
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 2);

    // A key the policy service never published is refused.
    let stranger = ClearanceSigner::generate();
    let err = h
        .client()
        .create_environment(request(&stranger))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let containers = h
        .objects()
        .into_iter()
        .filter(|o| o.starts_with("container:"))
        .count();
    assert_eq!(containers, 3);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_do_not_cause_a_fetch_storm() {
    let (h, keys, stop) = start(3600).await;
    let stranger = ClearanceSigner::generate();
    for _ in 0..5 {
        let err = h
            .client()
            .create_environment(request(&stranger))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }
    assert_eq!(keys.fetches.load(Ordering::SeqCst), 1);
    assert!(h.objects().is_empty());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_policy_withdraws_is_refused_as_retired_without_a_restart() {
    let (h, keys, stop) = start_with(3600, 200, 5_000).await;
    let old = ClearanceSigner::generate();
    keys.keys.lock().unwrap().push(old.public_key());
    create(&h, &old).await;
    // Policy rotates and retires the old key: it publishes only the new one.
    let new = ClearanceSigner::generate();
    *keys.keys.lock().unwrap() = vec![new.public_key()];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = h
        .client()
        .create_environment(request(&old))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains(old.key_id()) && err.message().contains("retired"),
        "{err:?}"
    );
    create(&h, &new).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_policy_cannot_refresh_is_not_trusted() {
    let (h, keys, stop) = start_with(3600, 100, 400).await;
    let signer = ClearanceSigner::generate();
    keys.keys.lock().unwrap().push(signer.public_key());
    create(&h, &signer).await;
    // Policy goes away; once the ring is older than its maximum age, no
    // clearance verifies (the key may have been retired meanwhile).
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let err = h
        .client()
        .create_environment(request(&signer))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("clearance keys"), "{err:?}");
    let containers = h
        .objects()
        .into_iter()
        .filter(|o| o.starts_with("container:"))
        .count();
    assert_eq!(containers, 1);
}
