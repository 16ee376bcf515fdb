//! The kit over real loopback sockets: health, reflection (v1 and v1alpha),
//! trace propagation to a downstream call, mTLS caller checks and load
//! shedding.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use vibebox_proto::kit::probe_service_client::ProbeServiceClient;
use vibebox_proto::kit::probe_service_server::{ProbeService, ProbeServiceServer};
use vibebox_proto::kit::{ProbeRequest, ProbeResponse};
use vibebox_server_kit::testing::TestPki;
use vibebox_server_kit::{GrpcChannel, ServerBuilder, TlsMaterial, connect, pki};

struct Probe {
    downstream: Option<GrpcChannel>,
}

#[tonic::async_trait]
impl ProbeService for Probe {
    async fn probe(
        &self,
        request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        let caller_service = vibebox_server_kit::caller_service(&request).unwrap_or_default();
        let request_id = vibebox_server_kit::request_id(&request).unwrap_or_default();
        let trace_id = vibebox_server_kit::trace_id();
        let body = request.into_inner();
        if body.hold_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(body.hold_ms))).await;
        }
        let downstream = match (&self.downstream, body.forward) {
            (Some(channel), true) => Some(Box::new(
                ProbeServiceClient::new(channel.clone())
                    .probe(ProbeRequest::default())
                    .await?
                    .into_inner(),
            )),
            _ => None,
        };
        Ok(Response::new(ProbeResponse {
            caller_service,
            request_id,
            trace_id,
            downstream,
        }))
    }
}

struct Running {
    url: String,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(
    pki: &TestPki,
    service: &'static str,
    allowed: &[&str],
    max_concurrency: usize,
    downstream: Option<GrpcChannel>,
) -> Running {
    let args = pki.server_args(service);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = ServerBuilder::new(service, &args)
        .tls(Some(args.tls_material(service).unwrap()))
        .allow_callers(allowed)
        .max_concurrency(max_concurrency)
        .add_service(ProbeServiceServer::new(Probe { downstream }));
    tokio::spawn(server.serve(listener, shutdown.clone()));
    Running {
        url: format!("https://127.0.0.1:{}", addr.port()),
        shutdown,
    }
}

fn client(url: &str, material: &TlsMaterial) -> ProbeServiceClient<GrpcChannel> {
    ProbeServiceClient::new(connect(url, material).unwrap())
}

#[tokio::test]
async fn health_answers_serving_for_each_registered_service() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let pki = TestPki::new();
    let server = start(&pki, "policy", &["gateway"], 16, None).await;
    // Health is open to any certificate-holding peer, even one not allowed to act.
    let mut health = HealthClient::new(connect(&server.url, &pki.material("tester")).unwrap());
    for service in ["", "vibebox.kit.v1.ProbeService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.Such".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_lists_services_over_v1_and_v1alpha() {
    let pki = TestPki::new();
    let server = start(&pki, "policy", &["gateway"], 16, None).await;
    let channel = connect(&server.url, &pki.material("gateway")).unwrap();

    use tonic_reflection::pb::v1 as r1;
    let mut v1 = r1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = v1
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("unexpected v1 reply {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"vibebox.kit.v1.ProbeService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    // Only what this server serves is advertised.
    assert!(
        !names.iter().any(|n| n.contains("EnvironmentService")),
        "{names:?}"
    );

    // Other contracts (internal ones included) are not even described.
    let request = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            r1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "vibebox.internal.runtime.v1.RuntimeService".into(),
            ),
        ),
    };
    let mut stream = v1
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    match stream.message().await {
        Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
        Ok(reply) => assert!(
            matches!(
                reply.and_then(|r| r.message_response),
                Some(r1::server_reflection_response::MessageResponse::ErrorResponse(_))
            ),
            "an unserved contract is not described"
        ),
    }

    use tonic_reflection::pb::v1alpha as ra;
    let mut alpha = ra::server_reflection_client::ServerReflectionClient::new(channel);
    let request = ra::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(ra::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = alpha
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(ra::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("unexpected v1alpha reply {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"vibebox.kit.v1.ProbeService".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn trace_id_and_request_id_reach_the_downstream_call() {
    let pki = TestPki::new();
    let downstream = start(&pki, "policy", &["gateway"], 16, None).await;
    let upstream = start(
        &pki,
        "gateway",
        &["tester"],
        16,
        Some(connect(&downstream.url, &pki.material("gateway")).unwrap()),
    )
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = Request::new(ProbeRequest {
        forward: true,
        hold_ms: 0,
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    request
        .metadata_mut()
        .insert("x-request-id", "req-123".parse().unwrap());
    let response = client(&upstream.url, &pki.material("tester"))
        .probe(request)
        .await
        .unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "req-123");
    let body = response.into_inner();
    assert_eq!(body.trace_id, trace);
    assert_eq!(body.request_id, "req-123");
    assert_eq!(body.caller_service, "tester");
    let down = body.downstream.expect("forwarded");
    assert_eq!(down.trace_id, trace, "trace id propagated downstream");
    assert_eq!(
        down.request_id, "req-123",
        "request id propagated downstream"
    );
    assert_eq!(
        down.caller_service, "gateway",
        "downstream saw the gateway's identity"
    );
}

#[tokio::test]
async fn a_request_id_is_generated_when_absent() {
    let pki = TestPki::new();
    let server = start(&pki, "policy", &["gateway"], 16, None).await;
    let response = client(&server.url, &pki.material("gateway"))
        .probe(ProbeRequest::default())
        .await
        .unwrap();
    let header = response
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(header.len(), 36, "uuid {header}");
    assert_eq!(response.into_inner().request_id, header);
}

#[tokio::test]
async fn callers_without_an_allowed_certificate_are_refused() {
    let pki = TestPki::new();
    let server = start(&pki, "orchestrator", &["gateway"], 16, None).await;

    // The allowed service gets through.
    let ok = client(&server.url, &pki.material("gateway"))
        .probe(ProbeRequest::default())
        .await
        .unwrap();
    assert_eq!(ok.into_inner().caller_service, "gateway");

    // A valid certificate of a service that is not allowed: PERMISSION_DENIED.
    let denied = client(&server.url, &pki.material("identity"))
        .probe(ProbeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");

    // No client certificate at all: UNAUTHENTICATED.
    let ca_only = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(pki.material("gateway").ca_pem),
        ))
        .unwrap()
        .connect_lazy();
    let anonymous = ProbeServiceClient::new(ca_only)
        .probe(ProbeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");

    // A "gateway" certificate signed by another CA never completes the handshake.
    let mut forged = pki::foreign_material("gateway").unwrap();
    forged.ca_pem = pki.material("gateway").ca_pem; // trusts the real server
    let refused = client(&server.url, &forged)
        .probe(ProbeRequest::default())
        .await
        .unwrap_err();
    assert_ne!(refused.code(), Code::Ok);
    assert!(
        matches!(
            refused.code(),
            Code::Unavailable | Code::Unknown | Code::Internal
        ),
        "{refused:?}"
    );
}

#[tokio::test]
async fn past_the_concurrency_limit_calls_are_shed_not_queued() {
    let pki = TestPki::new();
    let server = start(&pki, "policy", &["gateway"], 2, None).await;
    let material = pki.material("gateway");
    let holding: Vec<_> = (0..2)
        .map(|_| {
            let mut c = client(&server.url, &material);
            tokio::spawn(async move {
                c.probe(ProbeRequest {
                    hold_ms: 1500,
                    forward: false,
                })
                .await
            })
        })
        .collect();
    // Wait until both holders are admitted: a third call is then shed at once.
    let mut shed = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match client(&server.url, &material)
            .probe(ProbeRequest {
                hold_ms: 0,
                forward: false,
            })
            .await
        {
            Err(status) if status.code() == Code::ResourceExhausted => {
                shed = Some(status);
                break;
            }
            Err(other) => panic!("unexpected {other:?}"),
            Ok(_) => continue,
        }
    }
    let shed = shed.expect("a call past the limit was shed");
    assert!(shed.message().contains("overloaded"), "{shed:?}");
    for h in holding {
        h.await.unwrap().unwrap();
    }
    // Once the holders finish, calls are admitted again.
    client(&server.url, &material)
        .probe(ProbeRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_restricted_server_refuses_to_start_without_tls() {
    let pki = TestPki::new();
    let args = pki.server_args("policy");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = ServerBuilder::new("policy", &args)
        .allow_callers(&["gateway"])
        .add_service(ProbeServiceServer::new(Probe { downstream: None }))
        .serve(listener, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    let _ = Arc::new(());
}
