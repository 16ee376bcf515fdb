//! What the test modules share: waiting for an environment to settle (its
//! operations run in the background), reading google.rpc details, and an
//! engine that holds back the requests a test names (a slow engine, under
//! the test's control).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::watch;
use tonic_types::StatusExt;
use vibebox_orchestrator::DockerEndpoint;
use vibebox_proto::environment::{Environment, EnvironmentState};
use vibebox_proto::runtime::GetEnvironmentRequest;
use vibebox_proto::runtime::runtime_service_client::RuntimeServiceClient;
use vibebox_server_kit::GrpcChannel;

/// How long an operation may take before a test gives up on it.
pub(crate) const SETTLE_DEADLINE: Duration = Duration::from_secs(90);

/// Whether an operation is in progress in `state`.
pub(crate) fn transitional(state: i32) -> bool {
    [
        EnvironmentState::Creating,
        EnvironmentState::Starting,
        EnvironmentState::Stopping,
        EnvironmentState::Deleting,
    ]
    .iter()
    .any(|s| *s as i32 == state)
}

/// The environment as GetEnvironment answers now.
pub(crate) async fn get(client: &RuntimeServiceClient<GrpcChannel>, id: &str) -> Environment {
    client
        .clone()
        .get_environment(GetEnvironmentRequest {
            environment_id: id.into(),
        })
        .await
        .expect("get")
        .into_inner()
        .environment
        .expect("environment")
}

/// Polls GetEnvironment until `done` holds, within [`SETTLE_DEADLINE`].
pub(crate) async fn wait_for(
    client: &RuntimeServiceClient<GrpcChannel>,
    id: &str,
    what: &str,
    done: impl Fn(&Environment) -> bool,
) -> Environment {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        let env = get(client, id).await;
        if done(&env) {
            return env;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: {what} not reached within {SETTLE_DEADLINE:?}: {env:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the environment has no operation in progress (its state is
/// not CREATING, STARTING, STOPPING or DELETING); returns it then.
pub(crate) async fn settled(client: &RuntimeServiceClient<GrpcChannel>, id: &str) -> Environment {
    let env = wait_for(client, id, "a settled state", |e| !transitional(e.state)).await;
    assert_eq!(env.progress_percent, 100, "settled: {env:?}");
    env
}

/// The `ErrorInfo` reason and metadata of a status.
pub(crate) fn error_info(
    status: &tonic::Status,
) -> (String, std::collections::HashMap<String, String>) {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "vibebox");
    (info.reason, info.metadata)
}

/// The local engine behind a TCP proxy (plain HTTP, as `tcp://`) that holds
/// back every request whose bytes contain the pattern set with
/// [`hold`](Self::hold) until [`release`](Self::release). Dropped, it
/// discards what it holds (a test that failed leaves nothing to the engine
/// after its harness cleaned up).
pub(crate) struct HeldEngine {
    pub(crate) port: u16,
    hold: watch::Sender<Hold>,
    held: Arc<AtomicUsize>,
}

/// What the proxy does with requests.
#[derive(Clone, PartialEq, Eq)]
enum Hold {
    Open,
    Pattern(String),
    Closed,
}

impl HeldEngine {
    /// Serves the local engine's socket on a port of its own.
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (hold, watching) = watch::channel(Hold::Open);
        let held = Arc::new(AtomicUsize::new(0));
        let counter = held.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (watching, counter) = (watching.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(engine) = UnixStream::connect("/var/run/docker.sock").await else {
                        return;
                    };
                    let (client_read, mut client_write) = tcp.into_split();
                    let (mut engine_read, engine_write) = engine.into_split();
                    let up = pump(client_read, engine_write, watching, counter);
                    let down = tokio::io::copy(&mut engine_read, &mut client_write);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Self { port, hold, held }
    }

    /// The endpoint an orchestrator reaches the engine through.
    pub(crate) fn endpoint(&self) -> DockerEndpoint {
        DockerEndpoint {
            host: format!("tcp://127.0.0.1:{}", self.port),
            tls_verify: false,
            cert_path: None,
        }
    }

    /// Holds back requests containing `pattern` from now on.
    pub(crate) fn hold(&self, pattern: &str) {
        self.hold.send_replace(Hold::Pattern(pattern.to_owned()));
    }

    /// Lets held requests (and all later ones) through.
    pub(crate) fn release(&self) {
        self.hold.send_replace(Hold::Open);
    }

    /// Waits until a request is held back.
    pub(crate) async fn wait_held(&self) {
        let deadline = Instant::now() + SETTLE_DEADLINE;
        while self.held.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no request was held back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for HeldEngine {
    fn drop(&mut self) {
        self.hold.send_replace(Hold::Closed);
    }
}

/// Client to engine: each read is passed on unless it contains the pattern
/// held back, which waits until the pattern changes.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut hold: watch::Receiver<Hold>,
    held: Arc<AtomicUsize>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        loop {
            let pattern = match hold.borrow_and_update().clone() {
                Hold::Open => break,
                Hold::Closed => return,
                Hold::Pattern(pattern) => pattern,
            };
            if !chunk
                .windows(pattern.len().max(1))
                .any(|w| w == pattern.as_bytes())
            {
                break;
            }
            held.fetch_add(1, Ordering::SeqCst);
            let changed = hold.changed().await;
            held.fetch_sub(1, Ordering::SeqCst);
            if changed.is_err() {
                break;
            }
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
    }
}
