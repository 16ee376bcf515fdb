//! The client against a scripted gateway over real gRPC on loopback: the
//! token on every call, retries of UNAVAILABLE with one request id, the
//! wait (WaitEnvironment, and polling when it is UNIMPLEMENTED), a
//! non-interactive exec, the watch resuming from its last token, and TLS
//! with the caller's CA.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_types::StatusExt;
use vibebox_client::environment::environment_service_server::{
    EnvironmentService, EnvironmentServiceServer,
};
use vibebox_client::environment::*;
use vibebox_client::{Client, Error, RESUME_TOKEN_EXPIRED, RetryPolicy, create_request};

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

const TOKEN: &str = "test-token";

/// What the scripted gateway saw and what it answers next.
#[derive(Default)]
struct Script {
    /// Create answers UNAVAILABLE this many more times.
    create_unavailable: u32,
    /// The request ids of every create attempt.
    create_request_ids: Vec<String>,
    /// Whether WaitEnvironment exists.
    wait_implemented: bool,
    /// GetEnvironment answers CREATING this many more times.
    creating_gets: u32,
    gets: u32,
    waits: u32,
    /// Exec: every request message seen.
    exec_requests: Vec<ExecRequest>,
    /// Watch: the resume token of every stream opened.
    watch_tokens: Vec<String>,
    /// Watch: how each stream opened goes (in order).
    watch_plan: VecDeque<WatchLeg>,
}

/// One watch stream: the changes after the token it is opened with, at
/// most `send`, then `end` (None: a clean end of the stream).
struct WatchLeg {
    send: usize,
    end: Option<Status>,
}

fn env(id: &str, state: EnvironmentState) -> Environment {
    Environment {
        id: id.into(),
        name: id.into(),
        state: state as i32,
        ..Default::default()
    }
}

#[derive(Clone)]
struct Fake(Arc<Mutex<Script>>);

impl Fake {
    fn authorize<T>(request: &Request<T>) -> Result<(), Status> {
        let expected = format!("Bearer {TOKEN}");
        match request.metadata().get("authorization") {
            Some(value) if value == expected.as_str() => Ok(()),
            _ => Err(Status::unauthenticated("missing or wrong token")),
        }
    }
}

fn unused<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not scripted"))
}

#[tonic::async_trait]
impl EnvironmentService for Fake {
    async fn create_environment(
        &self,
        request: Request<CreateEnvironmentRequest>,
    ) -> Result<Response<CreateEnvironmentResponse>, Status> {
        Self::authorize(&request)?;
        let mut script = self.0.lock().unwrap();
        script
            .create_request_ids
            .push(request.get_ref().request_id.clone());
        if script.create_unavailable > 0 {
            script.create_unavailable -= 1;
            return Err(Status::unavailable("gateway restarting"));
        }
        Ok(Response::new(CreateEnvironmentResponse {
            environment: Some(env("env-1", EnvironmentState::Creating)),
        }))
    }

    async fn get_environment(
        &self,
        request: Request<GetEnvironmentRequest>,
    ) -> Result<Response<GetEnvironmentResponse>, Status> {
        Self::authorize(&request)?;
        let mut script = self.0.lock().unwrap();
        script.gets += 1;
        let state = if script.creating_gets > 0 {
            script.creating_gets -= 1;
            EnvironmentState::Creating
        } else {
            EnvironmentState::Running
        };
        Ok(Response::new(GetEnvironmentResponse {
            environment: Some(env(&request.get_ref().environment_id, state)),
        }))
    }

    async fn list_environments(
        &self,
        _: Request<ListEnvironmentsRequest>,
    ) -> Result<Response<ListEnvironmentsResponse>, Status> {
        unused()
    }

    async fn start_environment(
        &self,
        _: Request<StartEnvironmentRequest>,
    ) -> Result<Response<StartEnvironmentResponse>, Status> {
        unused()
    }

    async fn stop_environment(
        &self,
        _: Request<StopEnvironmentRequest>,
    ) -> Result<Response<StopEnvironmentResponse>, Status> {
        unused()
    }

    async fn restart_environment(
        &self,
        _: Request<RestartEnvironmentRequest>,
    ) -> Result<Response<RestartEnvironmentResponse>, Status> {
        unused()
    }

    async fn delete_environment(
        &self,
        request: Request<DeleteEnvironmentRequest>,
    ) -> Result<Response<DeleteEnvironmentResponse>, Status> {
        Self::authorize(&request)?;
        Ok(Response::new(DeleteEnvironmentResponse {
            environment: Some(env(
                &request.get_ref().environment_id,
                EnvironmentState::Deleting,
            )),
        }))
    }

    type StreamLogsStream = Stream_<StreamLogsResponse>;

    async fn stream_logs(
        &self,
        _: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        unused()
    }

    type ExecStream = Stream_<ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        Self::authorize(&request)?;
        let mut inbound = request.into_inner();
        let mut stdin = Vec::new();
        // Input until end of input, as the platform reads it.
        while let Some(message) = inbound.message().await? {
            let close = matches!(message.message, Some(exec_request::Message::CloseStdin(_)));
            if let Some(exec_request::Message::Stdin(bytes)) = &message.message {
                stdin.extend_from_slice(bytes);
            }
            self.0.lock().unwrap().exec_requests.push(message);
            if close {
                break;
            }
        }
        let reply = |m| Ok(ExecResponse { message: Some(m) });
        let out = vec![
            reply(exec_response::Message::Stdout(b"hel".to_vec())),
            reply(exec_response::Message::Stderr(b"warning\n".to_vec())),
            reply(exec_response::Message::Stdout(b"lo\n".to_vec())),
            reply(exec_response::Message::Stdout(stdin)),
            reply(exec_response::Message::Exit(ExecExit { exit_code: 3 })),
        ];
        Ok(Response::new(Box::pin(futures::stream::iter(out))))
    }

    type StreamStatsStream = Stream_<StreamStatsResponse>;

    async fn stream_stats(
        &self,
        _: Request<StreamStatsRequest>,
    ) -> Result<Response<Self::StreamStatsStream>, Status> {
        unused()
    }

    type PortForwardStream = Stream_<PortForwardResponse>;

    async fn port_forward(
        &self,
        _: Request<Streaming<PortForwardRequest>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        unused()
    }

    async fn copy_to(
        &self,
        _: Request<Streaming<CopyToRequest>>,
    ) -> Result<Response<CopyToResponse>, Status> {
        unused()
    }

    type CopyFromStream = Stream_<CopyFromResponse>;

    async fn copy_from(
        &self,
        _: Request<CopyFromRequest>,
    ) -> Result<Response<Self::CopyFromStream>, Status> {
        unused()
    }

    async fn extend_environment(
        &self,
        _: Request<ExtendEnvironmentRequest>,
    ) -> Result<Response<ExtendEnvironmentResponse>, Status> {
        unused()
    }

    async fn update_environment(
        &self,
        _: Request<UpdateEnvironmentRequest>,
    ) -> Result<Response<UpdateEnvironmentResponse>, Status> {
        unused()
    }

    async fn wait_environment(
        &self,
        request: Request<WaitEnvironmentRequest>,
    ) -> Result<Response<WaitEnvironmentResponse>, Status> {
        Self::authorize(&request)?;
        {
            let mut script = self.0.lock().unwrap();
            if !script.wait_implemented {
                return Err(Status::unimplemented("not implemented yet"));
            }
            script.waits += 1;
        }
        // The platform blocks until the operation is over.
        assert!(
            request.get_ref().timeout.is_some(),
            "the wait says how long"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(Response::new(WaitEnvironmentResponse {
            environment: Some(env(
                &request.get_ref().environment_id,
                EnvironmentState::Running,
            )),
        }))
    }

    type WatchEnvironmentsStream = Stream_<WatchEnvironmentsResponse>;

    async fn watch_environments(
        &self,
        request: Request<WatchEnvironmentsRequest>,
    ) -> Result<Response<Self::WatchEnvironmentsStream>, Status> {
        Self::authorize(&request)?;
        let token = request.get_ref().resume_token.clone();
        let mut script = self.0.lock().unwrap();
        script.watch_tokens.push(token.clone());
        let leg = script.watch_plan.pop_front().expect("a planned leg");
        if leg.send == 0
            && let Some(status) = leg.end
        {
            // Refused when it opens.
            return Err(status);
        }
        // Five changes with tokens "1".."5"; a stream continues after its token.
        let after: usize = if token.is_empty() {
            0
        } else {
            token.parse().unwrap()
        };
        let mut out: Vec<Result<WatchEnvironmentsResponse, Status>> = (after + 1..=5)
            .take(leg.send)
            .map(|n| {
                Ok(WatchEnvironmentsResponse {
                    environment: Some(env(&format!("env-{n}"), EnvironmentState::Running)),
                    resume_token: n.to_string(),
                    caught_up: false,
                })
            })
            .collect();
        if let Some(status) = leg.end {
            out.push(Err(status));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(out))))
    }
}

/// Serves `fake` on a free loopback port; returns its address.
async fn serve(fake: Fake, tls: Option<tonic::transport::ServerTlsConfig>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).unwrap();
    }
    let router = builder.add_service(EnvironmentServiceServer::new(fake));
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    format!("127.0.0.1:{port}")
}

fn quick() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(40),
    }
}

async fn fake(script: Script) -> (Arc<Mutex<Script>>, Client) {
    let script = Arc::new(Mutex::new(script));
    let addr = serve(Fake(script.clone()), None).await;
    let client = Client::connect(format!("http://{addr}"))
        .token(format!("  {TOKEN}\n"))
        .retry(quick())
        .watch_retry(quick())
        .build()
        .unwrap();
    (script, client)
}

#[tokio::test]
async fn a_create_retried_after_unavailable_keeps_its_request_id_and_waits_with_the_server() {
    let (script, client) = fake(Script {
        create_unavailable: 2,
        wait_implemented: true,
        ..Default::default()
    })
    .await;
    let env = client
        .create_environment_and_wait(
            create_request("team", "demo", "vibebox/devbox:1"),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(env.state, EnvironmentState::Running as i32);
    let script = script.lock().unwrap();
    assert_eq!(script.create_request_ids.len(), 3, "two retries");
    assert!(!script.create_request_ids[0].is_empty(), "one was made");
    assert!(
        script
            .create_request_ids
            .iter()
            .all(|id| id == &script.create_request_ids[0]),
        "one request id for every attempt: {:?}",
        script.create_request_ids
    );
    assert_eq!((script.waits, script.gets), (1, 0), "no polling");
}

#[tokio::test]
async fn a_given_request_id_is_kept_and_unavailable_gives_up_after_the_budget() {
    let (script, client) = fake(Script {
        create_unavailable: 100,
        ..Default::default()
    })
    .await;
    let mut request = create_request("team", "demo", "vibebox/devbox:1");
    request.request_id = "mine-1".into();
    let error = client.create_environment(request).await.unwrap_err();
    assert_eq!(error.code(), Some(Code::Unavailable));
    let script = script.lock().unwrap();
    assert_eq!(script.create_request_ids, vec!["mine-1"; 5]);
}

#[tokio::test]
async fn without_wait_environment_the_client_polls_until_settled_or_times_out() {
    let (script, client) = fake(Script {
        creating_gets: 3,
        ..Default::default()
    })
    .await;
    let env = client.wait("env-1", Duration::from_secs(30)).await.unwrap();
    assert_eq!(env.state, EnvironmentState::Running as i32);
    assert_eq!(
        script.lock().unwrap().gets,
        4,
        "three CREATING, then RUNNING"
    );

    script.lock().unwrap().creating_gets = 1000;
    let started = std::time::Instant::now();
    match client.wait("env-1", Duration::from_millis(700)).await {
        Err(Error::Timeout { environment, .. }) => {
            assert_eq!(environment.state, EnvironmentState::Creating as i32)
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn exec_sends_start_then_end_of_input_and_collects_the_output() {
    let (script, client) = fake(Script::default()).await;
    let out = client.exec("env-1", ["echo", "hello"]).await.unwrap();
    assert_eq!(out.exit_code, 3);
    assert_eq!(out.stdout_lossy(), "hello\n");
    assert_eq!(out.stderr_lossy(), "warning\n");
    {
        let script = script.lock().unwrap();
        let seen = &script.exec_requests;
        match &seen[0].message {
            Some(exec_request::Message::Start(start)) => {
                assert_eq!(start.environment_id, "env-1");
                assert_eq!(start.command, vec!["echo", "hello"]);
                assert!(!start.stdin && !start.tty);
            }
            other => panic!("the first message must be start: {other:?}"),
        }
        assert_eq!(
            seen[1].message,
            Some(exec_request::Message::CloseStdin(true))
        );
    }

    let start = ExecStart {
        environment_id: "env-1".into(),
        command: vec!["cat".into()],
        ..Default::default()
    };
    let out = client
        .exec_with(start, Some(b"from stdin".to_vec()))
        .await
        .unwrap();
    assert_eq!(out.stdout_lossy(), "hello\nfrom stdin");
}

#[tokio::test]
async fn the_watch_resumes_from_its_last_token_and_surfaces_an_expired_one() {
    let plan = VecDeque::from([
        // Two changes, then the gateway goes away.
        WatchLeg {
            send: 2,
            end: Some(Status::unavailable("gateway restarting")),
        },
        // One more, then the stream just ends (a shutdown).
        WatchLeg { send: 1, end: None },
        // The rest, then ABORTED.
        WatchLeg {
            send: 10,
            end: Some(Status::aborted("moved")),
        },
        // Nothing new, then the token is too old.
        WatchLeg {
            send: 0,
            end: Some(Status::with_error_details(
                Code::FailedPrecondition,
                "resume token too old",
                tonic_types::ErrorDetails::with_error_info(
                    RESUME_TOKEN_EXPIRED,
                    "vibebox",
                    std::collections::HashMap::new(),
                ),
            )),
        },
    ]);
    let (script, client) = fake(Script {
        watch_plan: plan,
        ..Default::default()
    })
    .await;
    let items: Vec<_> = client.watch_environments("team").collect().await;
    let ids: Vec<_> = items
        .iter()
        .filter_map(|i| i.as_ref().ok().map(|e| e.id.clone()))
        .collect();
    assert_eq!(
        ids,
        ["env-1", "env-2", "env-3", "env-4", "env-5"],
        "in order, none twice"
    );
    match items.last() {
        Some(Err(Error::ResumeTokenExpired(status))) => {
            assert_eq!(status.code(), Code::FailedPrecondition)
        }
        other => panic!("expected the expiry last, got {other:?}"),
    }
    assert_eq!(
        script.lock().unwrap().watch_tokens,
        ["", "2", "3", "5"],
        "each reconnect continues after the last message"
    );
}

#[tokio::test]
async fn a_refused_watch_ends_at_once_and_a_saved_token_is_where_it_starts() {
    let plan = VecDeque::from([WatchLeg {
        send: 1,
        end: Some(Status::permission_denied("removed from the team")),
    }]);
    let (script, client) = fake(Script {
        watch_plan: plan,
        ..Default::default()
    })
    .await;
    let items: Vec<_> = client.watch_environments_from("team", "3").collect().await;
    assert_eq!(items.len(), 2);
    let first = items[0].as_ref().unwrap();
    assert_eq!(first.resume_token, "4");
    assert_eq!(first.environment.as_ref().unwrap().id, "env-4");
    assert_eq!(
        items[1].as_ref().unwrap_err().code(),
        Some(Code::PermissionDenied)
    );
    assert_eq!(script.lock().unwrap().watch_tokens, ["3"], "no reconnect");
}

#[tokio::test]
async fn a_wrong_token_is_unauthenticated_and_not_retried() {
    let script = Arc::new(Mutex::new(Script::default()));
    let addr = serve(Fake(script.clone()), None).await;
    let client = Client::connect(addr)
        .token("someone else")
        .retry(quick())
        .build()
        .unwrap();
    let error = client
        .create_environment(create_request("team", "demo", "img"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::Unauthenticated));
    assert_eq!(script.lock().unwrap().create_request_ids.len(), 0);
}

#[tokio::test]
async fn an_unreachable_gateway_is_unavailable_after_the_retries_and_a_failed_eager_connect() {
    // A port nobody listens on: bind one, then free it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let client = Client::connect(&url).retry(quick()).build().unwrap();
    let error = client.get_environment("env-1").await.unwrap_err();
    assert_eq!(error.code(), Some(Code::Unavailable));
    assert!(matches!(
        Client::connect(&url).await,
        Err(Error::Connect(_))
    ));
}

#[tokio::test]
async fn https_verifies_the_gateway_with_the_given_ca() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let tls = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem()),
    );
    let script = Arc::new(Mutex::new(Script::default()));
    let addr = serve(Fake(script), Some(tls)).await;
    let url = format!("https://{}", addr.replace("127.0.0.1", "localhost"));

    // The system's roots plus the CA.
    let client = Client::connect(&url)
        .token(TOKEN)
        .tls_ca(ca_cert.pem())
        .build()
        .unwrap();
    let env = client.get_environment("env-9").await.unwrap();
    assert_eq!(env.id, "env-9");

    // The CA alone; and connecting eagerly.
    let client = Client::connect(&url)
        .token(TOKEN)
        .tls_ca(ca_cert.pem())
        .system_roots(false)
        .await
        .unwrap();
    assert_eq!(client.get_environment("env-8").await.unwrap().id, "env-8");

    // Without the CA the gateway's certificate is not trusted (a machine
    // without any root certificate refuses to build the client at all).
    match Client::connect(&url)
        .token(TOKEN)
        .retry(RetryPolicy::never())
        .build()
    {
        Ok(client) => {
            let error = client.get_environment("env-7").await.unwrap_err();
            assert_eq!(error.code(), Some(Code::Unavailable), "{error}");
        }
        Err(error) => assert!(matches!(error, Error::Tls(_)), "{error}"),
    }
}
