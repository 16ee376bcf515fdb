//! The gateway against real services: audit and identity (and, for
//! environment lookups, the orchestrator) started in-process on loopback with
//! a throwaway PKI; calls go over real gRPC to the gateway's public port.

use crate::common;

use std::time::{Duration, Instant};

use common::{Platform, bearer};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;
use vibebox_proto::audit::audit_service_client::AuditServiceClient;
use vibebox_proto::audit::{EventFilter, QueryEventsRequest};
use vibebox_proto::authz::GetTokenKeysRequest;
use vibebox_proto::authz::authorization_service_client::AuthorizationServiceClient;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, GetEnvironmentRequest, ListEnvironmentsRequest,
};
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::identity::{CreateApiTokenRequest, RevokeTokenRequest, WhoAmIRequest};
use vibebox_proto::runtime::runtime_service_client::RuntimeServiceClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_routing_validation_metrics_and_audit() {
    let platform = Platform::start().await;
    let gateway = platform.gateway(|_| {}).await;
    let channel = gateway.channel().await;
    let mut environments = EnvironmentServiceClient::new(channel.clone());
    let mut identity = IdentityServiceClient::new(channel.clone());

    // No token: UNAUTHENTICATED.
    let status = environments
        .list_environments(ListEnvironmentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A garbage token: UNAUTHENTICATED.
    let status = identity
        .who_am_i(bearer(WhoAmIRequest {}, "not-a-biscuit"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A well-formed token signed by someone else's key: UNAUTHENTICATED.
    let forged_root = vibebox_token::RootKey::generate(1);
    let forged = vibebox_token::mint(
        &forged_root,
        &vibebox_token::Claims::new(
            "someone",
            "t-1",
            chrono::Utc::now() + chrono::Duration::hours(1),
        ),
    )
    .unwrap();
    let status = identity
        .who_am_i(bearer(WhoAmIRequest {}, &forged))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A token naming a key id identity does not have: the gateway refreshes
    // its key ring (rotation), still does not know the key: UNAUTHENTICATED.
    let unknown_root = vibebox_token::RootKey::generate(999_999);
    let unknown = vibebox_token::mint(
        &unknown_root,
        &vibebox_token::Claims::new(
            "someone",
            "t-2",
            chrono::Utc::now() + chrono::Duration::hours(1),
        ),
    )
    .unwrap();
    let status = identity
        .who_am_i(bearer(WhoAmIRequest {}, &unknown))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // The admin token works end to end (verified locally with identity's
    // keys, authorized by identity, forwarded with the authorization header).
    let me = identity
        .who_am_i(bearer(WhoAmIRequest {}, &platform.admin_token))
        .await
        .expect("whoami through the gateway")
        .into_inner();
    assert_eq!(me.user.unwrap().username, "admin");

    // The admin token attenuated offline to an expiry in the past: it
    // authenticates nobody any more, UNAUTHENTICATED (not PERMISSION_DENIED).
    let expired = vibebox_token::attenuate(
        &platform.admin_token,
        &vibebox_token::Restriction::default()
            .expires_at(chrono::Utc::now() - chrono::Duration::seconds(1)),
    )
    .unwrap();
    let status = identity
        .who_am_i(bearer(WhoAmIRequest {}, &expired))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("expired"), "{status:?}");
    // Listing every team's environments with it is refused the same way.
    let status = environments
        .list_environments(bearer(ListEnvironmentsRequest::default(), &expired))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // Internal services are not routed, even with a valid token.
    let mut runtime = RuntimeServiceClient::new(channel.clone());
    let status = runtime
        .create_environment(bearer(
            vibebox_proto::runtime::CreateEnvironmentRequest::default(),
            &platform.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let status = AuthorizationServiceClient::new(channel.clone())
        .get_token_keys(GetTokenKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // Fields are validated before anything travels further (policy and the
    // orchestrator are down in this test: a forwarded call would be UNAVAILABLE).
    let status = environments
        .create_environment(bearer(
            CreateEnvironmentRequest {
                team_id: "t".into(),
                name: "Not A Valid Name".into(),
                spec: Some(ContainerSpec {
                    image: "busybox:1.36".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            &platform.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad = status
        .get_details_bad_request()
        .expect("BadRequest details");
    assert_eq!(bad.field_violations[0].field, "name");
    let status = environments
        .get_environment(bearer(
            GetEnvironmentRequest {
                environment_id: "../../etc".into(),
            },
            &platform.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // A dependency that is down is UNAVAILABLE without internals.
    let status = environments
        .get_environment(bearer(
            GetEnvironmentRequest {
                environment_id: uuid::Uuid::new_v4().to_string(),
            },
            &platform.admin_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!status.message().contains("127.0.0.1"), "{status:?}");

    // Reflection lists only the public services (and health/reflection).
    let listed = list_services(channel.clone()).await;
    for public in vibebox_proto::PUBLIC_SERVICES {
        assert!(
            listed.iter().any(|s| s == public),
            "{public} missing: {listed:?}"
        );
    }
    assert!(
        listed
            .iter()
            .all(|s| !s.contains(".internal.") && !s.contains(".kit.")),
        "internal service listed: {listed:?}"
    );

    // Metrics count calls by method and code.
    let metrics = gateway.scrape().await;
    assert!(
        metrics.contains(
            r#"vibebox_gateway_requests_total{method="IdentityService/WhoAmI",code="OK"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"vibebox_gateway_requests_total{method="IdentityService/WhoAmI",code="UNAUTHENTICATED"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("vibebox_gateway_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"vibebox_gateway_access_events_total{action="access.unauthenticated"}"#),
        "{metrics}"
    );

    // The refusals are in the audit log (read through the gateway): the
    // anonymous ones, and the create refused for its content.
    let audit = AuditServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let query = |action: &str| {
            let request = bearer(
                QueryEventsRequest {
                    filter: Some(EventFilter {
                        action: action.into(),
                        ..Default::default()
                    }),
                    page_size: 50,
                    ..Default::default()
                },
                &platform.admin_token,
            );
            let mut audit = audit.clone();
            async move {
                audit
                    .query_events(request)
                    .await
                    .expect("query audit through the gateway")
                    .into_inner()
                    .events
            }
        };
        let events = query("access.unauthenticated").await;
        let invalid = query("request.invalid").await;
        if events.len() >= 4 && !invalid.is_empty() {
            assert!(events.iter().all(|e| e.source_service == "gateway"));
            assert!(
                invalid[0]
                    .details
                    .as_ref()
                    .is_some_and(|d| format!("{d:?}").contains("name")),
                "{invalid:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "access events not audited: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn list_services(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_rate_limit_is_resource_exhausted() {
    let platform = Platform::start().await;
    let gateway = platform
        .gateway(|c| {
            c.rate_limit_per_second = 1;
            c.rate_limit_burst = 3;
        })
        .await;
    let mut identity = IdentityServiceClient::new(gateway.channel().await);
    let mut codes = Vec::new();
    for _ in 0..6 {
        let code = match identity
            .who_am_i(bearer(WhoAmIRequest {}, &platform.admin_token))
            .await
        {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        codes.push(code);
    }
    assert_eq!(&codes[..3], &[Code::Ok; 3], "{codes:?}");
    assert!(codes[3..].contains(&Code::ResourceExhausted), "{codes:?}");
    let metrics = gateway.scrape().await;
    assert!(
        metrics.contains(r#"code="RESOURCE_EXHAUSTED""#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"vibebox_gateway_access_events_total{action="access.rate_limited"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_stops_working_within_two_seconds() {
    let platform = Platform::start().await;
    let gateway = platform.gateway(|_| {}).await;
    let mut identity = IdentityServiceClient::new(gateway.channel().await);
    let created = identity
        .create_api_token(bearer(
            CreateApiTokenRequest {
                request_id: Default::default(),
                restrictions: Default::default(),
                description: "gateway revocation test".into(),
                ttl_seconds: Some(3600),
            },
            &platform.admin_token,
        ))
        .await
        .expect("create an API token")
        .into_inner();
    // Warm the decision cache with the new token.
    identity
        .who_am_i(bearer(WhoAmIRequest {}, &created.token))
        .await
        .expect("the new token works");
    identity
        .revoke_token(bearer(
            RevokeTokenRequest {
                token_id: created.token_id.clone(),
            },
            &platform.admin_token,
        ))
        .await
        .expect("revoke");
    let revoked_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let status = identity
        .who_am_i(bearer(WhoAmIRequest {}, &created.token))
        .await
        .unwrap_err();
    assert!(revoked_at.elapsed() >= Duration::from_secs(2));
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_without_team_never_asks_for_all_teams() {
    // A user without teams gets an empty list, even though the orchestrator
    // is down (an empty team list upstream would mean "every team").
    let platform = Platform::start().await;
    let gateway = platform.gateway(|_| {}).await;
    let mut environments = EnvironmentServiceClient::new(gateway.channel().await);
    let listed = environments
        .list_environments(bearer(
            ListEnvironmentsRequest {
                team_id: String::new(),
                ..Default::default()
            },
            &platform.admin_token,
        ))
        .await;
    // The admin may be in the bootstrap team ("default"): then the
    // orchestrator is asked (and is down here), otherwise the list is empty.
    match listed {
        Ok(response) => assert!(response.into_inner().environments.is_empty()),
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_before_anything_else() {
    let platform = Platform::start().await;
    let gateway = platform.gateway(|c| c.max_request_bytes = 4096).await;
    let mut environments = EnvironmentServiceClient::new(gateway.channel().await);
    let mut spec = ContainerSpec {
        image: "busybox:1.36".into(),
        ..Default::default()
    };
    spec.env.insert("BIG".into(), "x".repeat(64 * 1024));
    let status = environments
        .create_environment(bearer(
            CreateEnvironmentRequest {
                team_id: "t".into(),
                name: "big".into(),
                spec: Some(spec),
                ..Default::default()
            },
            &platform.admin_token,
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_listener_can_serve_tls() {
    let platform = Platform::start().await;
    let pki = platform.pki.pki_dir();
    let gateway = platform
        .gateway(|c| {
            c.public_tls_cert = Some(pki.join("gateway.pem"));
            c.public_tls_key = Some(pki.join("gateway-key.pem"));
        })
        .await;
    let ca = std::fs::read(pki.join("ca.pem")).unwrap();
    let channel = Channel::from_shared(format!("https://localhost:{}", gateway.addr.port()))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .expect("TLS connection to the public listener");
    let mut identity = IdentityServiceClient::new(channel);
    let status = identity.who_am_i(WhoAmIRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let me = identity
        .who_am_i(bearer(WhoAmIRequest {}, &platform.admin_token))
        .await
        .expect("whoami over TLS")
        .into_inner();
    assert_eq!(me.user.unwrap().username, "admin");
}

/// Opens an audit watch of the whole log as `token`.
async fn watch(
    channel: &Channel,
    token: &str,
) -> Result<tonic::Streaming<vibebox_proto::audit::WatchEventsResponse>, tonic::Status> {
    AuditServiceClient::new(channel.clone())
        .watch_events(bearer(
            vibebox_proto::audit::WatchEventsRequest {
                filter: Some(EventFilter::default()),
            },
            token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_count_against_their_own_caps_not_the_in_flight_limit() {
    let platform = Platform::start().await;
    let gateway = platform
        .gateway(|c| {
            c.server.limits.max_concurrency = 2;
            c.user_max_streams = 4;
        })
        .await;
    let channel = gateway.channel().await;
    // Twice the global in-flight limit in open streams...
    let mut open = Vec::new();
    for i in 0..4 {
        let stream = watch(&channel, &platform.admin_token)
            .await
            .unwrap_or_else(|s| panic!("stream {i} refused: {s:?}"));
        open.push(stream);
    }
    // ...and short calls still pass.
    let mut identity = IdentityServiceClient::new(channel.clone());
    for _ in 0..3 {
        identity
            .who_am_i(bearer(WhoAmIRequest {}, &platform.admin_token))
            .await
            .expect("short calls are not starved by open streams");
    }
    // The user's own cap: RESOURCE_EXHAUSTED with a QuotaFailure naming it.
    let status = watch(&channel, &platform.admin_token).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let quota = status.get_details_quota_failure().expect("QuotaFailure");
    assert!(
        quota.violations[0].subject.starts_with("user:"),
        "{quota:?}"
    );
    assert!(status.get_details_retry_info().is_none());
    // A closed stream gives its slot back.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(status) = watch(&channel, &platform.admin_token).await {
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_ends_when_its_token_is_revoked() {
    let platform = Platform::start().await;
    let gateway = platform.gateway(|_| {}).await;
    let channel = gateway.channel().await;
    let mut stream = watch(&channel, &platform.admin_token).await.expect("watch");
    let mut identity = IdentityServiceClient::new(channel.clone());
    let token_id = identity
        .who_am_i(bearer(WhoAmIRequest {}, &platform.admin_token))
        .await
        .expect("whoami")
        .into_inner()
        .token_id;
    identity
        .revoke_token(bearer(
            RevokeTokenRequest { token_id },
            &platform.admin_token,
        ))
        .await
        .expect("revoke");
    let revoked_at = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the stream outlived the revocation")
    .expect("the stream ended without a status");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(
        revoked_at.elapsed() < Duration::from_secs(2) + Duration::from_millis(500),
        "took {:?}",
        revoked_at.elapsed()
    );
}
