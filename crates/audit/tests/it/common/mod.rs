//! Test harness: the audit service on a loopback port with a test PKI, and
//! clients speaking to it as producers and as the gateway.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use vibebox_audit::Config;
use vibebox_audit_client::{AuditClient, AuditClientConfig};
use vibebox_proto::audit as pb;
use vibebox_proto::audit::audit_service_client::AuditServiceClient;
use vibebox_proto::audit_ingest::audit_ingest_service_client::AuditIngestServiceClient;
use vibebox_server_kit::GrpcChannel;
use vibebox_server_kit::testing::TestPki;

pub struct Harness {
    pub pki: TestPki,
    pub config: Config,
    pub addr: SocketAddr,
    running: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
}

/// A free loopback port (bound then released).
pub async fn free_addr() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

impl Harness {
    /// A configured (not yet started) audit service using `database_url`
    /// (default: SQLite in its data dir).
    pub async fn new(database_url: Option<String>) -> Self {
        let pki = TestPki::new();
        let mut config = Config::new(pki.server_args("audit"));
        config.database.url = database_url;
        let addr = free_addr().await;
        Self {
            pki,
            config,
            addr,
            running: None,
        }
    }

    pub async fn started(database_url: Option<String>) -> Self {
        let mut h = Self::new(database_url).await;
        h.start().await;
        h
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub async fn start(&mut self) {
        assert!(self.running.is_none());
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(vibebox_audit::run_with_listener(
            self.config.clone(),
            listener,
            shutdown.clone(),
        ));
        self.running = Some((shutdown, task));
        // Wait until it answers.
        let mut reader = self.reader();
        for _ in 0..100 {
            if reader
                .verify_chain(pb::VerifyChainRequest::default())
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the audit service did not start");
    }

    pub async fn stop(&mut self) {
        let (shutdown, task) = self.running.take().expect("running");
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }

    fn channel(&self, service: &str) -> GrpcChannel {
        vibebox_server_kit::connect(&self.url(), &self.pki.material(service)).unwrap()
    }

    /// `AuditService` as the gateway.
    pub fn reader(&self) -> AuditServiceClient<GrpcChannel> {
        AuditServiceClient::new(self.channel("gateway"))
    }

    pub fn reader_as(&self, service: &str) -> AuditServiceClient<GrpcChannel> {
        AuditServiceClient::new(self.channel(service))
    }

    pub fn ingest_as(&self, service: &str) -> AuditIngestServiceClient<GrpcChannel> {
        AuditIngestServiceClient::new(self.channel(service))
    }

    /// A producer's audit client with its outbox under the PKI temp dir.
    pub fn producer(&self, service: &str) -> AuditClient {
        AuditClient::open(AuditClientConfig {
            outbox_dir: self.outbox_dir(service),
            audit_url: self.url(),
            tls: self.pki.material(service),
            source_service: service.to_owned(),
        })
        .unwrap()
    }

    pub fn producer_result(
        &self,
        service: &str,
    ) -> Result<AuditClient, vibebox_audit_client::AuditClientError> {
        AuditClient::open(AuditClientConfig {
            outbox_dir: self.outbox_dir(service),
            audit_url: self.url(),
            tls: self.pki.material(service),
            source_service: service.to_owned(),
        })
    }

    pub fn outbox_dir(&self, service: &str) -> PathBuf {
        self.pki.path().join("outbox").join(service)
    }

    pub fn public_key(&self) -> ed25519_dalek::VerifyingKey {
        let pem = std::fs::read_to_string(self.config.public_key_path()).unwrap();
        vibebox_audit_chain::verifying_key_from_pem(&pem).unwrap()
    }

    /// Every event, oldest first.
    pub async fn all_events(&self) -> Vec<pb::AuditEvent> {
        self.query(pb::EventFilter::default())
            .await
            .into_iter()
            .rev()
            .collect()
    }

    /// Every event matching `filter`, newest first (follows pages).
    pub async fn query(&self, filter: pb::EventFilter) -> Vec<pb::AuditEvent> {
        let mut reader = self.reader();
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = reader
                .query_events(pb::QueryEventsRequest {
                    filter: Some(filter.clone()),
                    page_size: 200,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            out.extend(page.events);
            if page.next_page_token.is_empty() {
                return out;
            }
            token = page.next_page_token;
        }
    }

    pub async fn verify(&self) -> pb::VerifyChainResponse {
        self.reader()
            .verify_chain(pb::VerifyChainRequest::default())
            .await
            .unwrap()
            .into_inner()
    }

    /// The export as text.
    pub async fn export(&self) -> String {
        let mut stream = self
            .reader()
            .export_events(pb::ExportEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut text = String::new();
        while let Some(line) = stream.message().await.unwrap() {
            text.push_str(&line.json_line);
            text.push('\n');
        }
        text
    }
}

/// An event as a producer would record it.
pub fn event(action: &str, user: &str) -> pb::AuditEvent {
    pb::AuditEvent {
        actor: Some(pb::Actor {
            kind: Default::default(),
            user_id: user.to_owned(),
            token_id: "tok".to_owned(),
            service: String::new(),
        }),
        team_id: "team-1".to_owned(),
        action: action.to_owned(),
        resource_type: "environment".to_owned(),
        resource_id: "env-1".to_owned(),
        outcome: pb::Outcome::Success as i32,
        severity: pb::Severity::Low as i32,
        ..Default::default()
    }
}

pub fn details(pairs: &[(&str, prost_types::value::Kind)]) -> Option<prost_types::Struct> {
    Some(prost_types::Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    prost_types::Value {
                        kind: Some(v.clone()),
                    },
                )
            })
            .collect(),
    })
}

pub fn text(s: &str) -> prost_types::value::Kind {
    prost_types::value::Kind::StringValue(s.to_owned())
}

pub fn number(n: f64) -> prost_types::value::Kind {
    prost_types::value::Kind::NumberValue(n)
}
