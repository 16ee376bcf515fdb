//! A real `vibebox-orchestrator` process killed in the middle of a create
//! (it aborts right after creating the network, or right after creating the
//! container) leaves nothing behind once the restarted process has
//! reconciled, and the environment is reported failed. Killed in the middle
//! of a stop or a start (after the engine acted, before the commit), the
//! restarted process finishes the operation.

use std::process::{Child, Command};
use std::time::Duration;

use tonic::Code;
use vibebox_clearance::ClearanceSigner;
use vibebox_orchestrator::testkit::{self, hardened_spec, labelled_objects, remove_labelled};
use vibebox_proto::environment::EnvironmentState;
use vibebox_proto::runtime::runtime_service_client::RuntimeServiceClient;
use vibebox_proto::runtime::{
    CreateEnvironmentRequest, GetEnvironmentRequest, StartEnvironmentRequest,
    StopEnvironmentRequest,
};
use vibebox_server_kit::testing::TestPki;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The process's log, in its data directory.
const LOG: &str = "orchestrator.log";

fn spawn(
    pki: &TestPki,
    data_dir: &std::path::Path,
    key_file: &std::path::Path,
    installation: &str,
    port: u16,
    abort_after: Option<&str>,
    extra_args: &[&str],
) -> Proc {
    let dir = pki.pki_dir();
    std::fs::create_dir_all(data_dir).unwrap();
    let log = std::fs::File::create(data_dir.join(LOG)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vibebox-orchestrator"));
    cmd.arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--tls-ca")
        .arg(dir.join("ca.pem"))
        .arg("--tls-cert")
        .arg(dir.join("orchestrator.pem"))
        .arg("--tls-key")
        .arg(dir.join("orchestrator-key.pem"))
        .arg("--policy-url=")
        .arg("--audit-url=https://127.0.0.1:9")
        .arg("--clearance-public-key-file")
        .arg(key_file)
        .arg("--installation-id")
        .arg(installation)
        .arg("--reconcile-interval=0")
        .arg(format!(
            "--docker-label={}={installation}",
            testkit::TEST_LABEL
        ))
        .args(extra_args)
        .env_remove(vibebox_orchestrator::hooks::ABORT_ENV)
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if let Some(point) = abort_after {
        cmd.env(vibebox_orchestrator::hooks::ABORT_ENV, point);
    }
    Proc(cmd.spawn().expect("spawn orchestrator"))
}

async fn client(pki: &TestPki, port: u16) -> RuntimeServiceClient<vibebox_server_kit::GrpcChannel> {
    let ch = vibebox_server_kit::connect(
        &format!("https://127.0.0.1:{port}"),
        &pki.material("gateway"),
    )
    .unwrap();
    RuntimeServiceClient::new(ch)
}

async fn wait_serving(pki: &TestPki, port: u16) {
    wait_serving_within(pki, port, Duration::from_secs(20)).await;
}

async fn wait_serving_within(pki: &TestPki, port: u16, patience: Duration) {
    for _ in 0..patience.as_millis() / 100 {
        let mut c = client(pki, port).await;
        match c
            .get_environment(GetEnvironmentRequest {
                environment_id: "probe".into(),
            })
            .await
        {
            Err(s) if s.code() == Code::NotFound => return,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("orchestrator did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_create_leaves_nothing_after_restart() {
    testkit::ensure_test_image().unwrap();
    for point in ["network", "container"] {
        let pki = TestPki::new();
        let data_dir = pki.path().join("data");
        let signer = ClearanceSigner::generate();
        let key_file = pki.path().join("clearance.pub");
        std::fs::write(&key_file, hex::encode(signer.verifying_key().to_bytes())).unwrap();
        let installation = format!("test-killed-{}", uuid::Uuid::new_v4());
        let port = free_port();

        let mut first = spawn(
            &pki,
            &data_dir,
            &key_file,
            &installation,
            port,
            Some(point),
            &[],
        );
        wait_serving(&pki, port).await;
        let spec = hardened_spec(&["sleep", "3600"]);
        let env = uuid::Uuid::new_v4().to_string();
        // Accepted (`creating`) before the background work reaches the
        // crash point, or cut by the abort if it comes first.
        let answer = client(&pki, port)
            .await
            .create_environment(CreateEnvironmentRequest {
                request_id: env.clone(),
                environment_id: env.clone(),
                team_id: "team".into(),
                owner_id: "owner".into(),
                clearance: Some(testkit::clearance(
                    &signer,
                    &spec,
                    &env,
                    "team",
                    Duration::from_secs(60),
                )),
                spec: Some(spec),
                ..Default::default()
            })
            .await;
        match answer {
            Ok(created) => assert_eq!(
                created.into_inner().environment.unwrap().state,
                EnvironmentState::Creating as i32
            ),
            Err(err) => assert!(
                matches!(
                    err.code(),
                    Code::Unavailable | Code::Unknown | Code::Internal
                ),
                "{err:?}"
            ),
        }
        let status = first.0.wait().unwrap();
        assert!(!status.success(), "the process died");
        assert!(
            !labelled_objects(&installation).is_empty(),
            "the killed create left objects behind"
        );

        // Restart: reconcile at start rolls the interrupted create back.
        let port = free_port();
        let _second = spawn(&pki, &data_dir, &key_file, &installation, port, None, &[]);
        wait_serving(&pki, port).await;
        let mut left = labelled_objects(&installation);
        for _ in 0..100 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = labelled_objects(&installation);
        }
        // Reconcile removes the objects, then marks the record failed: wait
        // for both (the record's update may trail the removal under load).
        let mut got = None;
        for _ in 0..100 {
            let current = client(&pki, port)
                .await
                .get_environment(GetEnvironmentRequest {
                    environment_id: env.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .environment
                .unwrap();
            let failed = current.state == EnvironmentState::Failed as i32;
            got = Some(current);
            if failed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let got = got.expect("the environment");
        remove_labelled(&installation);
        assert!(left.is_empty(), "after {point}: left behind {left:?}");
        assert_eq!(got.state, EnvironmentState::Failed as i32);
        assert!(
            got.failure_reason.contains("interrupted"),
            "{}",
            got.failure_reason
        );
    }
}

/// Waits until the environment is in `state` (asking the process on `port`).
async fn wait_state(
    pki: &TestPki,
    port: u16,
    env: &str,
    state: EnvironmentState,
) -> vibebox_proto::environment::Environment {
    let mut last = None;
    for _ in 0..600 {
        if let Ok(found) = client(pki, port)
            .await
            .get_environment(GetEnvironmentRequest {
                environment_id: env.to_owned(),
            })
            .await
        {
            let found = found.into_inner().environment.unwrap();
            if found.state == state as i32 {
                return found;
            }
            last = Some(found);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{env} never reached {state:?}: {last:?}");
}

fn container_running(env: &str) -> bool {
    let out = Command::new("docker")
        .args([
            "container",
            "inspect",
            "--format",
            "{{.State.Running}}",
            &format!("vibebox-{env}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "the container of {env} exists");
    String::from_utf8_lossy(&out.stdout).trim() == "true"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_stop_or_mid_start_is_finished_after_restart() {
    testkit::ensure_test_image().unwrap();
    let pki = TestPki::new();
    let data_dir = pki.path().join("data");
    let signer = ClearanceSigner::generate();
    let key_file = pki.path().join("clearance.pub");
    std::fs::write(&key_file, hex::encode(signer.verifying_key().to_bytes())).unwrap();
    let installation = format!("test-killed-{}", uuid::Uuid::new_v4());
    // Dropped last: after every process is gone.
    let _cleanup = Cleanup(installation.clone());
    let start = |abort: Option<&str>| {
        let port = free_port();
        let proc = spawn(&pki, &data_dir, &key_file, &installation, port, abort, &[]);
        (proc, port)
    };

    // Aborts after the engine stopped the container, before the commit.
    let (mut first, port) = start(Some("stop"));
    wait_serving(&pki, port).await;
    let spec = hardened_spec(&["sleep", "3600"]);
    let env = uuid::Uuid::new_v4().to_string();
    client(&pki, port)
        .await
        .create_environment(CreateEnvironmentRequest {
            request_id: env.clone(),
            environment_id: env.clone(),
            team_id: "team".into(),
            owner_id: "owner".into(),
            clearance: Some(testkit::clearance(
                &signer,
                &spec,
                &env,
                "team",
                Duration::from_secs(60),
            )),
            spec: Some(spec),
            ..Default::default()
        })
        .await
        .expect("create");
    wait_state(&pki, port, &env, EnvironmentState::Running).await;
    let answer = client(&pki, port)
        .await
        .stop_environment(StopEnvironmentRequest {
            environment_id: env.clone(),
            timeout_seconds: Some(1),
            ..Default::default()
        })
        .await;
    if let Ok(stopping) = answer {
        assert_eq!(
            stopping.into_inner().environment.unwrap().state,
            EnvironmentState::Stopping as i32
        );
    }
    assert!(!first.0.wait().unwrap().success(), "the process died");
    assert!(!container_running(&env), "the engine stopped it");

    // The restarted process finishes the stop.
    let (second, port) = start(None);
    wait_serving(&pki, port).await;
    let stopped = wait_state(&pki, port, &env, EnvironmentState::Stopped).await;
    assert_eq!(stopped.progress_percent, 100);
    assert_eq!(stopped.failure_reason, "");
    assert!(!container_running(&env));
    drop(second);

    // Aborts after the engine started the container, before the commit.
    let (mut third, port) = start(Some("start"));
    wait_serving(&pki, port).await;
    let answer = client(&pki, port)
        .await
        .start_environment(StartEnvironmentRequest {
            environment_id: env.clone(),
            ..Default::default()
        })
        .await;
    if let Ok(starting) = answer {
        assert_eq!(
            starting.into_inner().environment.unwrap().state,
            EnvironmentState::Starting as i32
        );
    }
    assert!(!third.0.wait().unwrap().success(), "the process died");

    // The restarted process finishes the start.
    let (_fourth, port) = start(None);
    wait_serving(&pki, port).await;
    let running = wait_state(&pki, port, &env, EnvironmentState::Running).await;
    assert_eq!(running.progress_percent, 100);
    assert!(container_running(&env));
}

/// Removes what an installation's processes created, however the test ends.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_labelled(&self.0);
    }
}

/// Orchestrator processes of one installation on one database, each with
/// its own data directory (as on two hosts).
struct SharedDatabase {
    pki: TestPki,
    key_file: std::path::PathBuf,
    installation: String,
    database_arg: String,
}

impl SharedDatabase {
    /// On `database_url`, or on a SQLite file of its own.
    fn new(database_url: Option<String>) -> Self {
        testkit::ensure_test_image().unwrap();
        let pki = TestPki::new();
        let key_file = pki.path().join("clearance.pub");
        std::fs::write(
            &key_file,
            hex::encode(ClearanceSigner::generate().verifying_key().to_bytes()),
        )
        .unwrap();
        let url = database_url.unwrap_or_else(|| {
            vibebox_db::sqlite_url(&pki.path().join("shared").join("orchestrator.db"))
        });
        Self {
            key_file,
            installation: format!("test-lease-{}", uuid::Uuid::new_v4()),
            database_arg: format!("--database-url={url}"),
            pki,
        }
    }

    /// Starts one in data directory `name`: the process, its port and its
    /// data directory.
    fn spawn(&self, name: &str) -> (Proc, u16, std::path::PathBuf) {
        let port = free_port();
        let dir = self.pki.path().join(name);
        let proc = spawn(
            &self.pki,
            &dir,
            &self.key_file,
            &self.installation,
            port,
            None,
            &[&self.database_arg],
        );
        (proc, port, dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_for_the_same_installation_waits_until_the_first_is_gone() {
    // One SQLite database, two data directories (as two hosts sharing it).
    let shared = SharedDatabase::new(None);
    let (mut first, first_port, _) = shared.spawn("data-1");
    wait_serving(&shared.pki, first_port).await;

    // Same database, same installation: it does not serve beside the first.
    let (_second, second_port, second_dir) = shared.spawn("data-2");
    // It says it waits...
    let mut waiting = false;
    for _ in 0..300 {
        let log = std::fs::read_to_string(second_dir.join(LOG)).unwrap_or_default();
        if log.contains("another orchestrator holds this installation") {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(waiting, "the second process does not wait for the first");
    // ...and does not serve meanwhile.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            client(&shared.pki, second_port)
                .await
                .get_environment(GetEnvironmentRequest {
                    environment_id: "probe".into(),
                }),
        )
        .await
        .expect("a waiting process refuses connections, it does not leave them hanging");
        assert!(
            answer.is_err_and(|s| s.code() == Code::Unavailable),
            "the second process served while the first held the installation"
        );
    }

    // Killed: the lease goes with the process, and the second takes over.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    wait_serving(&shared.pki, second_port).await;
}

/// On PostgreSQL a holder that goes silent without dying (frozen here with
/// SIGSTOP, as a node cut off would be) loses the lease to a waiting
/// process, and stops once it runs again instead of acting beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_holder_loses_a_postgres_lease_and_stops_when_it_wakes() {
    let db = vibebox_db::testing::postgres_required().await;
    let shared = SharedDatabase::new(Some(db.url.clone()));
    let (mut first, first_port, _) = shared.spawn("data-1");
    wait_serving(&shared.pki, first_port).await;
    let (_second, second_port, _) = shared.spawn("data-2");

    let pid = first.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    // The database ends the silent session; the second takes over.
    wait_serving_within(&shared.pki, second_port, Duration::from_secs(60)).await;
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success()
    );
    // The first notices its lease is gone and stops.
    let mut status = None;
    for _ in 0..300 {
        status = first.0.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.expect("the woken holder stopped");
    assert_eq!(
        status.code(),
        Some(vibebox_orchestrator::LEASE_LOST_EXIT_CODE),
        "it exits for the lost lease: {status:?}"
    );
}
