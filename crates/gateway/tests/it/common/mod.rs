//! Test harness: the real services on ephemeral loopback ports with a
//! throwaway PKI, and gateways in front of them.

#![allow(dead_code, unreachable_pub)] // each test binary uses part of it

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Channel;
use vibebox_server_kit::testing::TestPki;

/// Audit + identity (+ gateways) on ephemeral ports.
pub struct Platform {
    pub pki: TestPki,
    pub shutdown: CancellationToken,
    pub audit_url: String,
    pub identity_url: String,
    /// Set by [`Platform::with_policy`].
    pub policy_url: Option<String>,
    /// Set by [`Platform::with_orchestrator`].
    pub orchestrator_url: Option<String>,
    pub admin_token: String,
}

pub struct Gateway {
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

async fn listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    (l, url)
}

/// A URL nothing listens on (a dependency that is down).
async fn dead_url() -> String {
    let (l, url) = listener().await;
    drop(l);
    url
}

impl Platform {
    pub async fn start() -> Self {
        let pki = TestPki::new();
        let shutdown = CancellationToken::new();

        let (audit_listener, audit_url) = listener().await;
        let audit = vibebox_audit::Config::new(pki.server_args("audit"));
        tokio::spawn(vibebox_audit::run_with_listener(
            audit,
            audit_listener,
            shutdown.clone(),
        ));

        let (identity_listener, identity_url) = listener().await;
        let mut identity = vibebox_identity::Config::new(pki.server_args("identity"));
        identity.audit.url = audit_url.clone();
        let token_file: PathBuf = identity.server.data_dir.join("admin.token");
        let run = tokio::spawn(vibebox_identity::run_with_listener(
            identity,
            identity_listener,
            shutdown.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(120);
        let admin_token = loop {
            if let Ok(token) = std::fs::read_to_string(&token_file)
                && !token.trim().is_empty()
            {
                break token.trim().to_owned();
            }
            assert!(!run.is_finished(), "identity stopped during start-up");
            assert!(Instant::now() < deadline, "identity did not bootstrap");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Self {
            pki,
            shutdown,
            audit_url,
            identity_url,
            policy_url: None,
            orchestrator_url: None,
            admin_token,
        }
    }

    /// Also starts the policy service.
    pub async fn with_policy(mut self) -> Self {
        use clap::Parser;
        let (l, url) = listener().await;
        let mut config = vibebox_policy::Config::parse_from(["vibebox-policy"]);
        config.server = self.pki.server_args("policy");
        config.audit.url = self.audit_url.clone();
        tokio::spawn(vibebox_policy::run_with_listener(
            config,
            l,
            self.shutdown.clone(),
        ));
        self.policy_url = Some(url);
        self
    }

    /// Also starts the orchestrator (it talks to the local Docker engine;
    /// these tests create no container).
    pub async fn with_orchestrator(self) -> Self {
        self.with_orchestrator_config(|_| {}).await
    }

    /// Also starts the orchestrator, adjusting its configuration.
    pub async fn with_orchestrator_config(
        mut self,
        adjust: impl FnOnce(&mut vibebox_orchestrator::Config),
    ) -> Self {
        let (l, url) = listener().await;
        let mut config =
            vibebox_orchestrator::Config::with_server(self.pki.server_args("orchestrator"));
        config.audit.url = self.audit_url.clone();
        config.policy_url = self.policy_url.clone().unwrap_or_default();
        config.reconcile_interval = 0;
        adjust(&mut config);
        tokio::spawn(vibebox_orchestrator::run_with_listener(
            config,
            l,
            self.shutdown.clone(),
        ));
        self.orchestrator_url = Some(url);
        self
    }

    pub async fn gateway(&self, tweak: impl FnOnce(&mut vibebox_gateway::Config)) -> Gateway {
        let mut config = vibebox_gateway::Config::new(self.pki.server_args("gateway"));
        config.identity_url = self.identity_url.clone();
        config.audit.url = self.audit_url.clone();
        config.policy_url = match &self.policy_url {
            Some(url) => url.clone(),
            None => dead_url().await,
        };
        config.orchestrator_url = match &self.orchestrator_url {
            Some(url) => url.clone(),
            None => dead_url().await,
        };
        tweak(&mut config);
        let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = Gateway {
            addr: public.local_addr().unwrap(),
            metrics: metrics.local_addr().unwrap(),
        };
        tokio::spawn(vibebox_gateway::run_with_listeners(
            config,
            public,
            metrics,
            self.shutdown.clone(),
        ));
        gateway
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Gateway {
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn scrape(&self) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }
}

pub fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Whether `state` is one a long operation passes through (CREATING,
/// STARTING, STOPPING, DELETING).
pub fn is_transitional(state: i32) -> bool {
    use vibebox_proto::environment::EnvironmentState as S;
    [S::Creating, S::Starting, S::Stopping, S::Deleting]
        .iter()
        .any(|s| *s as i32 == state)
}

/// Waits (at most 120 s) until environment `id` has settled: Create,
/// Start, Stop, Restart and Delete answer with the transitional state and
/// finish later. Asks `WaitEnvironment` (20 s a call) and polls
/// `GetEnvironment` every 100 ms while the gateway answers UNIMPLEMENTED.
/// Panics on an error or when it does not settle in time, naming the
/// environment and its last state.
pub async fn settle(
    environments: &mut vibebox_proto::environment::environment_service_client::EnvironmentServiceClient<Channel>,
    token: &str,
    id: &str,
) -> vibebox_proto::environment::Environment {
    use vibebox_proto::environment::{GetEnvironmentRequest, WaitEnvironmentRequest};
    let limit = Duration::from_secs(120);
    let deadline = Instant::now() + limit;
    let mut wait_served = true;
    let mut last = None;
    loop {
        let now = Instant::now();
        assert!(
            now < deadline,
            "environment {id} did not settle within {limit:?}: last seen {last:?}"
        );
        let env = if wait_served {
            let timeout = (deadline - now).min(Duration::from_secs(20));
            let mut request = bearer(
                WaitEnvironmentRequest {
                    environment_id: id.into(),
                    timeout: Some(prost_types::Duration {
                        seconds: timeout.as_secs() as i64,
                        nanos: timeout.subsec_nanos() as i32,
                    }),
                },
                token,
            );
            request.set_timeout(timeout + Duration::from_secs(5));
            match environments.wait_environment(request).await {
                Ok(answer) => answer.into_inner().environment,
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    wait_served = false;
                    continue;
                }
                Err(s) if s.code() == tonic::Code::DeadlineExceeded => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(s) => panic!("waiting for environment {id}: {s:?}"),
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            environments
                .get_environment(bearer(
                    GetEnvironmentRequest {
                        environment_id: id.into(),
                    },
                    token,
                ))
                .await
                .unwrap_or_else(|s| panic!("getting environment {id}: {s:?}"))
                .into_inner()
                .environment
        };
        let env = env.unwrap_or_else(|| panic!("no environment {id} in the answer"));
        if !is_transitional(env.state) {
            return env;
        }
        last = Some(env);
    }
}
