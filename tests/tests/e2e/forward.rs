//! Port forwarding (issue 17, part 2) against the real `vibebox up` and the
//! real Docker Engine: real servers inside an environment (busybox `httpd`
//! on every address and on 127.0.0.1 only, a CGI echo, an `nc` echo)
//! reached through `EnvironmentService/PortForward` and through
//! `vibebox env port-forward` with a local TCP client; data both ways
//! (a 1 MiB upload echoed back, a download larger than 1 MiB), half close,
//! the audit record with the port and byte counts, the forwarder container
//! as Docker shows it (hardened, in the environment's network namespace,
//! gone when the environment stops, restarts or is deleted), the audit
//! record at open (there while the connection is still open) and at close,
//! a helper image another build pruned (imported again), and the
//! refusals: viewers, another developer, another team, bad ports, a stopped
//! environment, nothing listening, a broken protocol, and rights withdrawn
//! from an open forward.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::query_parameters::InspectContainerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};
use vibebox_proto::audit::AuditEvent;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, EnvironmentState, PortForwardRequest,
    PortForwardResponse, PortForwardStart, port_forward_request, port_forward_response,
};
use vibebox_proto::identity::{
    CreateTeamRequest, RemoveTeamMemberRequest, RevokeTokenRequest, TeamRole, WhoAmIRequest,
};
use vibebox_tests::attack::{Refusal, events, patiently};
use vibebox_tests::report::SuiteReport;
use vibebox_tests::{Platform, Settle, binary, dev_image, docker};

/// The environment's servers: `httpd` on every address (8080) and on
/// 127.0.0.1 only (8081), both serving `index.html` ("hello"), `big` (the
/// numbers 1 to 200000, one a line) and a CGI echoing a POST body; an `nc`
/// echo on 9000 (`cat` per connection).
const SERVERS: &str = r#"mkdir -p /tmp/www/cgi-bin
echo hello > /tmp/www/index.html
seq 1 200000 > /tmp/www/big
printf '#!/bin/sh\necho "Content-Type: application/octet-stream"\necho\nhead -c "$CONTENT_LENGTH"\n' > /tmp/www/cgi-bin/echo
chmod +x /tmp/www/cgi-bin/echo
httpd -p 8080 -h /tmp/www
httpd -p 127.0.0.1:8081 -h /tmp/www
nc -ll -p 9000 -e cat &
exec sleep 2147483647"#;

/// What `/tmp/www/big` holds.
fn big() -> Vec<u8> {
    (1..=200_000)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

fn spec(image: &str) -> ContainerSpec {
    ContainerSpec {
        image: image.into(),
        command: vec!["sh".into(), "-c".into(), SERVERS.into()],
        ..Default::default()
    }
}

async fn create(p: &Platform, token: &str, team: &str, name: &str, image: &str) -> String {
    let created = p
        .environments(token)
        .create_settled(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: format!("create-{name}"),
            team_id: team.into(),
            name: name.into(),
            spec: Some(spec(image)),
        })
        .await
        .unwrap_or_else(|s| panic!("creating {name}: {s:?}"));
    assert_eq!(created.state(), EnvironmentState::Running, "{created:?}");
    created.id
}

fn start_message(env: &str, port: u32) -> PortForwardRequest {
    PortForwardRequest {
        message: Some(port_forward_request::Message::Start(PortForwardStart {
            environment_id: env.into(),
            port,
        })),
    }
}

fn data_message(data: &[u8]) -> PortForwardRequest {
    PortForwardRequest {
        message: Some(port_forward_request::Message::Data(data.to_vec())),
    }
}

fn close_write() -> PortForwardRequest {
    PortForwardRequest {
        message: Some(port_forward_request::Message::CloseWrite(true)),
    }
}

/// One open port-forward.
struct Forward {
    tx: mpsc::Sender<PortForwardRequest>,
    rx: Streaming<PortForwardResponse>,
}

/// Opens a port-forward as `token` (requests tagged `request_id`) and
/// waits for `ready`.
async fn open(
    p: &Platform,
    token: &str,
    env: &str,
    port: u32,
    request_id: &str,
) -> Result<Forward, Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(start_message(env, port))
        .await
        .expect("queue start");
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().expect("request id"));
    let mut stream = p
        .environments(token)
        .port_forward(request)
        .await?
        .into_inner();
    match stream.message().await? {
        Some(PortForwardResponse {
            message: Some(port_forward_response::Message::Ready(true)),
        }) => Ok(Forward { tx, rx: stream }),
        other => panic!("the first message of a forward is ready, not {other:?}"),
    }
}

impl Forward {
    /// Sends `data` in messages of at most 256 KiB.
    async fn send(&self, data: &[u8]) {
        for chunk in data.chunks(256 * 1024) {
            self.tx.send(data_message(chunk)).await.expect("send data");
        }
    }

    async fn close_write(&self) {
        self.tx.send(close_write()).await.expect("send close_write");
    }

    /// Everything that comes back until the stream ends.
    async fn read_to_end(mut self) -> Result<Vec<u8>, Status> {
        let mut out = Vec::new();
        while let Some(message) = self.rx.message().await? {
            match message.message {
                Some(port_forward_response::Message::Data(b)) => out.extend(b),
                other => panic!("unexpected {other:?} after ready"),
            }
        }
        Ok(out)
    }

    /// Reads until `want` bytes came back.
    async fn read_exactly(&mut self, want: usize) -> Result<Vec<u8>, Status> {
        let mut out = Vec::new();
        while out.len() < want {
            match self.rx.message().await? {
                Some(PortForwardResponse {
                    message: Some(port_forward_response::Message::Data(b)),
                }) => out.extend(b),
                other => panic!("unexpected {other:?} after {} bytes", out.len()),
            }
        }
        Ok(out)
    }
}

/// Sends `request`, half closes, and returns all that came back.
async fn exchange(
    p: &Platform,
    token: &str,
    env: &str,
    port: u32,
    request: &[u8],
    request_id: &str,
) -> Result<Vec<u8>, Status> {
    let forward = patiently(|| open(p, token, env, port, request_id)).await?;
    forward.send(request).await;
    forward.close_write().await;
    forward.read_to_end().await
}

/// The body of an HTTP response (after the blank line), and its status
/// line. A CGI's own header lines may end in a bare LF.
fn http_body(response: &[u8]) -> (String, Vec<u8>) {
    let crlf = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4);
    let lf = response
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|at| at + 2);
    let body_at = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or_else(|| {
            let head = String::from_utf8_lossy(&response[..response.len().min(200)]);
            panic!("no end of headers in {} bytes: {head:?}", response.len())
        }),
    };
    let status = String::from_utf8_lossy(&response[..body_at])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    (status, response[body_at..].to_vec())
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.0\r\n\r\n").into_bytes()
}

/// GET `path` on `port` through a forward, once the server listens
/// (an environment is running before its servers are).
async fn get_when_up(p: &Platform, token: &str, env: &str, port: u32, path: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match exchange(p, token, env, port, &get(path), "wait-for-server").await {
            Ok(response) if !response.is_empty() => return response,
            Ok(_) => {}
            Err(s) if s.code() == Code::FailedPrecondition && s.message().contains("refused") => {}
            Err(s) => panic!("GET {path} on {port}: {s:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "port {port} never answered inside {env}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The forwarder container of `env`, as Docker shows it (`None` when
/// there is none).
async fn forwarder(env: &str) -> Option<bollard::models::ContainerInspectResponse> {
    match docker()
        .inspect_container(
            &format!("vibebox-fwd-{env}"),
            None::<InspectContainerOptions>,
        )
        .await
    {
        Ok(found) => Some(found),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => None,
        Err(e) => panic!("inspecting the forwarder of {env}: {e}"),
    }
}

/// Polls until the forwarder of `env` is gone.
async fn forwarder_gone(env: &str, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while forwarder(env).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the forwarder of {env} is still there after {after}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A detail of an audit event, as a string.
fn detail(event: &AuditEvent, key: &str) -> String {
    vibebox_tests::attack::detail_strings(event, key)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no {key} in {event:?}"))
}

/// The `environment.port_forward` events of a request id, by phase.
fn phase<'a>(events: &'a [AuditEvent], request_id: &str, phase: &str) -> Vec<&'a AuditEvent> {
    events
        .iter()
        .filter(|e| e.request_id == request_id)
        .filter(|e| vibebox_tests::attack::detail_strings(e, "phase") == [phase])
        .collect()
}

/// The `environment.port_forward` events of `phase` for each request id,
/// once each has one (polled: audit delivery is asynchronous).
async fn forward_events(
    p: &Platform,
    admin: &str,
    wanted: &str,
    ids: &[&str],
) -> HashMap<String, AuditEvent> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = events(p, admin, "environment.port_forward").await;
        let found: HashMap<String, AuditEvent> = ids
            .iter()
            .filter_map(|id| {
                let of = phase(&all, id, wanted);
                assert!(of.len() <= 1, "{id} has {} {wanted} events", of.len());
                Some((id.to_string(), of.first().copied()?.clone()))
            })
            .collect();
        if found.len() == ids.len() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {wanted} event for some of {ids:?}: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_reaches_servers_inside_the_environment_both_ways_and_is_audited() {
    let mut report = SuiteReport::new(
        "forward",
        "port_forward_reaches_servers_inside_the_environment_both_ways_and_is_audited",
    );
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let t = p.team(&admin, "forwarding").await;
    let (owner_id, owner) = p.member(&admin, "owner", &t, TeamRole::Developer).await;
    let env = create(&p, &owner, &t, "web", &image).await;

    // A server on every address and one on loopback only: both reached.
    for port in [8080, 8081] {
        let response = get_when_up(&p, &owner, &env, port, "/index.html").await;
        let (status, body) = http_body(&response);
        assert!(status.contains("200"), "{port}: {status}");
        assert_eq!(body, b"hello\n", "{port}");
    }

    // 1 MiB up, echoed back by a CGI (data both ways, half close).
    let upload: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut post = format!(
        "POST /cgi-bin/echo HTTP/1.0\r\nContent-Length: {}\r\n\r\n",
        upload.len()
    )
    .into_bytes();
    post.extend_from_slice(&upload);
    let echoed = exchange(&p, &owner, &env, 8080, &post, "forward-post")
        .await
        .expect("POST through the forward");
    let (status, body) = http_body(&echoed);
    assert!(status.contains("200"), "{status}");
    assert!(
        body == upload,
        "the echoed body differs ({} bytes)",
        body.len()
    );

    // More than 1 MiB down, on the loopback-only server.
    let downloaded = exchange(&p, &owner, &env, 8081, &get("/big"), "forward-get")
        .await
        .expect("GET through the forward");
    let (status, body) = http_body(&downloaded);
    assert!(status.contains("200"), "{status}");
    let want = big();
    assert!(want.len() > 1024 * 1024);
    assert!(body == want, "the download differs ({} bytes)", body.len());

    // A byte stream both ways on one connection, then a half close: the
    // echo server sees the end and closes, which ends the stream.
    let mut echo = patiently(|| open(&p, &owner, &env, 9000, "forward-echo"))
        .await
        .expect("open echo");
    for round in 0..3 {
        let line = format!("round {round}\n");
        echo.send(line.as_bytes()).await;
        let back = echo.read_exactly(line.len()).await.expect("echo");
        assert_eq!(back, line.as_bytes());
    }
    // Audited at open: the record is there while the connection is still
    // open (one held for days, or cut by a crash, is not invisible).
    let opened = forward_events(&p, &admin, "open", &["forward-echo"]).await;
    let opened = &opened["forward-echo"];
    assert_eq!(
        opened.actor.as_ref().map(|a| a.user_id.as_str()),
        Some(owner_id.as_str())
    );
    assert_eq!(opened.resource_id, env);
    assert_eq!(opened.outcome(), vibebox_proto::audit::Outcome::Success);
    assert_eq!(detail(opened, "port"), "9000");
    let all = events(&p, &admin, "environment.port_forward").await;
    assert!(
        phase(&all, "forward-echo", "close").is_empty(),
        "closed before it closed"
    );
    echo.close_write().await;
    let rest = echo.read_to_end().await.expect("the echo ends cleanly");
    assert!(rest.is_empty(), "{rest:?}");

    // Nothing listening: a clear refusal after ready.
    let refused = exchange(&p, &owner, &env, 9, b"x", "forward-refused")
        .await
        .expect_err("nothing listens on 9");
    report.case(refused.code() == Code::FailedPrecondition);
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        refused.message(),
        "connection refused on port 9 inside the environment"
    );
    assert_eq!(
        Refusal::of(&refused).rules,
        ["port_forward.connection_refused"]
    );

    // The audit log: each connection at open (who, which port) and at
    // close (the bytes each way, how it ended).
    let ids = [
        "forward-post",
        "forward-get",
        "forward-echo",
        "forward-refused",
    ];
    let opens = forward_events(&p, &admin, "open", &ids).await;
    let events = forward_events(&p, &admin, "close", &ids).await;
    for (id, port) in ids.iter().zip(["8080", "8081", "9000", "9"]) {
        let open = &opens[*id];
        assert_eq!(
            open.actor.as_ref().map(|a| a.user_id.as_str()),
            Some(owner_id.as_str()),
            "{id}"
        );
        assert_eq!(open.resource_id, env, "{id}");
        assert_eq!(
            open.outcome(),
            vibebox_proto::audit::Outcome::Success,
            "{id}"
        );
        assert_eq!(detail(open, "port"), port, "{id}");
        assert!(
            vibebox_tests::attack::detail_strings(open, "bytes_in").is_empty(),
            "{id}: no bytes at open"
        );
        assert_eq!(detail(&events[*id], "phase"), "close", "{id}");
    }
    let post_event = &events["forward-post"];
    assert_eq!(
        post_event.actor.as_ref().map(|a| a.user_id.as_str()),
        Some(owner_id.as_str())
    );
    assert_eq!(post_event.team_id, t);
    assert_eq!(post_event.resource_id, env);
    assert_eq!(post_event.outcome(), vibebox_proto::audit::Outcome::Success);
    assert_eq!(detail(post_event, "port"), "8080");
    assert_eq!(detail(post_event, "bytes_in"), post.len().to_string());
    assert_eq!(detail(post_event, "bytes_out"), echoed.len().to_string());
    let get_event = &events["forward-get"];
    assert_eq!(detail(get_event, "port"), "8081");
    assert_eq!(detail(get_event, "bytes_in"), get("/big").len().to_string());
    assert_eq!(detail(get_event, "bytes_out"), downloaded.len().to_string());
    let echo_event = &events["forward-echo"];
    assert_eq!(detail(echo_event, "bytes_in"), "24");
    assert_eq!(detail(echo_event, "bytes_out"), "24");
    let refused_event = &events["forward-refused"];
    assert_eq!(
        refused_event.outcome(),
        vibebox_proto::audit::Outcome::Failure
    );
    assert_eq!(detail(refused_event, "end"), "refused");
    assert_eq!(detail(refused_event, "port"), "9");

    // The forwarder: hardened, in the environment's network namespace,
    // labelled as the platform's.
    let fwd = forwarder(&env).await.expect("a forwarder runs");
    let cid = docker()
        .inspect_container(&format!("vibebox-{env}"), None::<InspectContainerOptions>)
        .await
        .expect("the environment's container")
        .id
        .expect("container id");
    let config = fwd.config.clone().expect("config");
    let host = fwd.host_config.clone().expect("host config");
    assert_eq!(config.user.as_deref(), Some("65532:65532"));
    assert_eq!(host.network_mode, Some(format!("container:{cid}")));
    assert_eq!(host.cap_drop.clone().unwrap_or_default(), ["ALL"]);
    assert!(host.cap_add.clone().unwrap_or_default().is_empty());
    assert_eq!(host.readonly_rootfs, Some(true));
    assert_ne!(host.privileged, Some(true));
    assert!(
        host.security_opt
            .clone()
            .unwrap_or_default()
            .iter()
            .any(|o| o.starts_with("no-new-privileges"))
    );
    assert!(host.memory.is_some_and(|m| m > 0 && m <= 256 * 1024 * 1024));
    assert!(host.pids_limit.is_some_and(|n| n > 0 && n <= 256));
    assert!(fwd.mounts.clone().unwrap_or_default().is_empty());
    let labels = config.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("vibebox.role").map(String::as_str),
        Some("forwarder")
    );
    assert_eq!(
        labels.get("vibebox.environment").map(String::as_str),
        Some(env.as_str())
    );
    assert_eq!(
        labels.get("vibebox.installation"),
        p.installation_id().as_ref()
    );
    report.inspected += 1;

    // A restart gives the container a new network namespace: the old
    // forwarder goes, a new one comes with the next forward.
    let before = fwd.id.clone().expect("forwarder id");
    let restarted = p
        .environments(&owner)
        .restart_settled(&env, Some(1))
        .await
        .expect("restart");
    assert_eq!(
        restarted.state(),
        EnvironmentState::Running,
        "{restarted:?}"
    );
    forwarder_gone(&env, "a restart").await;
    let response = get_when_up(&p, &owner, &env, 8080, "/index.html").await;
    assert_eq!(http_body(&response).1, b"hello\n");
    let after = forwarder(&env).await.expect("a new forwarder").id;
    assert_ne!(after, Some(before), "the forwarder was recreated");

    // Stopped: the forwarder goes and a forward is refused.
    let stopped = p
        .environments(&owner)
        .stop_settled(&env, Some(1))
        .await
        .expect("stop");
    assert_eq!(stopped.state(), EnvironmentState::Stopped, "{stopped:?}");
    forwarder_gone(&env, "a stop").await;
    let stopped = exchange(&p, &owner, &env, 8080, &get("/"), "forward-stopped")
        .await
        .expect_err("a stopped environment is refused");
    report.case(stopped.code() == Code::FailedPrecondition);
    assert_eq!(stopped.code(), Code::FailedPrecondition, "{stopped:?}");
    assert!(stopped.message().contains("stopped"), "{stopped:?}");
    assert!(
        forwarder(&env).await.is_none(),
        "a refused forward made a forwarder"
    );

    // Started again, forwarding works again; deleted, the forwarder goes.
    let started = p
        .environments(&owner)
        .start_settled(&env)
        .await
        .expect("start");
    assert_eq!(started.state(), EnvironmentState::Running, "{started:?}");
    let response = get_when_up(&p, &owner, &env, 8081, "/index.html").await;
    assert_eq!(http_body(&response).1, b"hello\n");
    assert!(forwarder(&env).await.is_some());
    let deleted = p
        .environments(&owner)
        .delete_settled(&env)
        .await
        .expect("delete");
    assert_eq!(deleted.state(), EnvironmentState::Deleted, "{deleted:?}");
    forwarder_gone(&env, "a delete").await;
    let deleted = exchange(&p, &owner, &env, 8080, &get("/"), "forward-deleted").await;
    report.case(deleted.is_err());
    assert!(
        deleted.is_err(),
        "a deleted environment forwarded: {deleted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_is_refused_to_viewers_other_developers_other_teams_and_bad_requests() {
    let mut report = SuiteReport::new(
        "forward",
        "port_forward_is_refused_to_viewers_other_developers_other_teams_and_bad_requests",
    );
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let t = p.team(&admin, "forwarding").await;
    let other_team = p.team(&admin, "elsewhere").await;
    let (_, owner) = p.member(&admin, "owner", &t, TeamRole::Developer).await;
    let (_, viewer) = p.member(&admin, "viewer", &t, TeamRole::Viewer).await;
    let (_, colleague) = p.member(&admin, "colleague", &t, TeamRole::Developer).await;
    let (_, team_admin) = p.member(&admin, "lead", &t, TeamRole::Admin).await;
    let (_, outsider) = p
        .member(&admin, "outsider", &other_team, TeamRole::Admin)
        .await;
    let env = create(&p, &owner, &t, "web", &image).await;

    for (who, token) in [
        ("viewer", &viewer),
        ("another developer", &colleague),
        ("another team's admin", &outsider),
    ] {
        let refused = open(&p, token, &env, 8080, "refused")
            .await
            .err()
            .unwrap_or_else(|| panic!("{who} opened a port-forward"));
        report.case(refused.code() == Code::PermissionDenied);
        assert_eq!(refused.code(), Code::PermissionDenied, "{who}: {refused:?}");
    }
    // An unknown environment gets the same answer as another team's.
    let unknown = open(
        &p,
        &owner,
        &uuid::Uuid::new_v4().to_string(),
        8080,
        "unknown",
    )
    .await
    .err()
    .expect("an unknown environment is refused");
    report.case(unknown.code() == Code::PermissionDenied);
    assert_eq!(unknown.code(), Code::PermissionDenied, "{unknown:?}");
    // Nothing was created for the refused callers.
    assert!(
        forwarder(&env).await.is_none(),
        "a refused forward made a forwarder"
    );

    // Bad ports name the field, and change nothing.
    for port in [0, 65536, 70000] {
        let refused = open(&p, &owner, &env, port, "bad-port")
            .await
            .err()
            .unwrap_or_else(|| panic!("port {port} accepted"));
        report.case(refused.code() == Code::InvalidArgument);
        assert_eq!(refused.code(), Code::InvalidArgument, "{port}: {refused:?}");
        assert!(
            Refusal::of(&refused).names_field("start.port"),
            "{port}: {refused:?}"
        );
    }
    assert!(forwarder(&env).await.is_none());
    // A first message that is not start.
    let (tx, rx) = mpsc::channel(2);
    tx.send(data_message(b"GET /")).await.unwrap();
    drop(tx);
    let refused = p
        .environments(&owner)
        .port_forward(ReceiverStream::new(rx))
        .await
        .map(|_| ())
        .expect_err("a stream without start is refused");
    report.case(refused.code() == Code::InvalidArgument);
    assert!(Refusal::of(&refused).names_field("start"), "{refused:?}");

    // The team admin may forward the owner's environment.
    let response = get_when_up(&p, &team_admin, &env, 8080, "/index.html").await;
    assert_eq!(http_body(&response).1, b"hello\n");

    // A data message over 1 MiB ends the stream, naming the field.
    let forward = open(&p, &owner, &env, 9000, "oversized")
        .await
        .expect("open echo");
    forward.send_one(&vec![b'x'; 1024 * 1024 + 1]).await;
    let broken = forward.read_to_end().await.expect_err("oversized data");
    report.case(broken.code() == Code::InvalidArgument);
    assert_eq!(broken.code(), Code::InvalidArgument, "{broken:?}");
    assert!(Refusal::of(&broken).names_field("data"), "{broken:?}");
}

impl Forward {
    /// Sends `data` as one message, whatever its size.
    async fn send_one(&self, data: &[u8]) {
        self.tx.send(data_message(data)).await.expect("send data");
    }
}

/// Waits until `forward` ends; its status code (OK when it ended cleanly).
async fn ended(forward: Forward) -> Code {
    match tokio::time::timeout(Duration::from_secs(30), forward.read_to_end()).await {
        Err(_) => panic!("the forward is still open 30 s after its rights were withdrawn"),
        Ok(Ok(_)) => Code::Ok,
        Ok(Err(status)) => status.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_port_forward_ends_when_its_rights_are_withdrawn() {
    let mut report = SuiteReport::new(
        "forward",
        "an_open_port_forward_ends_when_its_rights_are_withdrawn",
    );
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let t = p.team(&admin, "forwarding").await;
    let (_, owner) = p.member(&admin, "owner", &t, TeamRole::Developer).await;
    let env = create(&p, &owner, &t, "echo", &image).await;
    get_when_up(&p, &owner, &env, 8080, "/index.html").await;

    for scenario in ["revoke", "remove"] {
        let (user_id, token) = p
            .member(&admin, &format!("held-{scenario}"), &t, TeamRole::Admin)
            .await;
        let mut forward = open(&p, &token, &env, 9000, &format!("held-{scenario}"))
            .await
            .expect("open echo");
        forward.send(b"ping\n").await;
        assert_eq!(forward.read_exactly(5).await.expect("echo"), b"ping\n");
        match scenario {
            "revoke" => {
                let token_id = p
                    .identity(&token)
                    .who_am_i(WhoAmIRequest {})
                    .await
                    .expect("whoami")
                    .into_inner()
                    .token_id;
                p.identity(&admin)
                    .revoke_token(RevokeTokenRequest { token_id })
                    .await
                    .expect("revoke");
            }
            _ => {
                p.identity(&admin)
                    .remove_team_member(RemoveTeamMemberRequest {
                        team_id: t.clone(),
                        user_id,
                    })
                    .await
                    .expect("remove");
            }
        }
        let code = ended(forward).await;
        let want = if scenario == "revoke" {
            Code::Unauthenticated
        } else {
            Code::PermissionDenied
        };
        report.case(code == want);
        assert_eq!(code, want, "{scenario}");
    }
}

/// `vibebox env port-forward` running in the background, killed on drop.
struct PortForwardCli {
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// (local address, remote port), in the order of the arguments.
    forwarding: Vec<(String, u16)>,
}

impl Drop for PortForwardCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PortForwardCli {
    fn start(p: &Platform, token: &str, args: &[&str]) -> Self {
        let config = tempfile::tempdir().expect("config dir");
        let mut child = Command::new(binary("vibebox"))
            .args(["env", "port-forward"])
            .args(args)
            .env("VIBEBOX_CONFIG_DIR", config.path())
            .env("VIBEBOX_SERVER", format!("http://{}", p.gateway))
            .env("VIBEBOX_TOKEN", token)
            .env_remove("VIBEBOX_CONTEXT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vibebox env port-forward");
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        let out = child.stdout.take().expect("stdout");
        let want = args
            .iter()
            .filter(|a| a.contains(':') || a.parse::<u16>().is_ok())
            .count();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut forwarding = Vec::new();
        while forwarding.len() < want {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| {
                    panic!(
                        "the CLI printed no Forwarding line: {}",
                        stderr.lock().unwrap()
                    )
                });
            let rest = line
                .strip_prefix("Forwarding from ")
                .unwrap_or_else(|| panic!("unexpected output {line:?}"));
            let (local, remote) = rest.split_once(" -> ").expect("LOCAL -> REMOTE");
            forwarding.push((local.to_owned(), remote.parse().expect("remote port")));
        }
        drop(config);
        Self {
            child,
            stderr,
            forwarding,
        }
    }
}

/// Sends `request` over a new local connection, half closes, reads to the end.
async fn local_exchange(address: &str, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut conn = tokio::net::TcpStream::connect(address).await?;
    conn.write_all(request).await?;
    conn.shutdown().await?;
    let mut out = Vec::new();
    conn.read_to_end(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_forwards_local_connections_and_survives_a_failed_one() {
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let t = p.team(&admin, "forwarding").await;
    let (_, owner) = p.member(&admin, "owner", &t, TeamRole::Developer).await;
    let env = create(&p, &owner, &t, "web", &image).await;
    get_when_up(&p, &owner, &env, 8081, "/index.html").await;

    // By name; a free local port for the loopback-only server, and one
    // for a port nothing listens on.
    let cli = PortForwardCli::start(&p, &owner, &["web", "0:8081", ":9"]);
    let (local, remote) = cli.forwarding[0].clone();
    assert_eq!(remote, 8081);
    assert!(local.starts_with("127.0.0.1:"), "{local}");
    assert_ne!(local, "127.0.0.1:0", "the chosen port is printed");
    let (refusing, _) = cli.forwarding[1].clone();

    // Two connections, each its own stream: data both ways.
    for _ in 0..2 {
        let response = local_exchange(&local, &get("/big"))
            .await
            .expect("local GET");
        let (status, body) = http_body(&response);
        assert!(status.contains("200"), "{status}");
        assert!(body == big(), "the download differs ({} bytes)", body.len());
    }
    // Nothing listening on 9: that connection closes with nothing, the
    // error is printed, and the listeners keep going.
    let nothing = local_exchange(&refusing, b"x").await.unwrap_or_default();
    assert!(nothing.is_empty(), "{nothing:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cli
        .stderr
        .lock()
        .unwrap()
        .contains("connection refused on port 9")
    {
        assert!(
            Instant::now() < deadline,
            "no refusal printed: {}",
            cli.stderr.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let response = local_exchange(&local, &get("/index.html"))
        .await
        .expect("local GET after a failed connection");
    assert_eq!(http_body(&response).1, b"hello\n");
}

/// A `vibebox up` with extra environment variables (the harness's platform
/// takes none), for example an orchestrator that reconciles every second;
/// stopped and its Docker objects removed on drop.
struct UpPlatform {
    child: Child,
    data_dir: tempfile::TempDir,
    gateway: String,
}

impl UpPlatform {
    fn start(env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let data_dir = tempfile::tempdir().expect("data dir");
        let mut command = Platform::up_command(data_dir.path());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning vibebox up");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(rest) = line.trim().strip_prefix("gateway listening on ")
                    && let Some(addr) = rest.split_whitespace().next()
                {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let gateway = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("vibebox up reported its gateway");
        Self {
            child,
            data_dir,
            gateway,
        }
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.data_dir.path().join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .trim()
            .to_owned()
    }

    fn environments(&self, token: &str) -> EnvironmentServiceClient<vibebox_tests::Authed> {
        let channel = vibebox_server_kit::connect_plaintext(&format!("http://{}", self.gateway))
            .expect("gateway channel");
        EnvironmentServiceClient::with_interceptor(channel, vibebox_tests::bearer(token))
    }

    /// A team named `name`, made by `admin`.
    async fn team(&self, admin: &str, name: &str) -> String {
        let channel = vibebox_server_kit::connect_plaintext(&format!("http://{}", self.gateway))
            .expect("gateway channel");
        vibebox_proto::identity::identity_service_client::IdentityServiceClient::with_interceptor(
            channel,
            vibebox_tests::bearer(admin),
        )
        .create_team(CreateTeamRequest {
            request_id: Default::default(),
            name: name.into(),
            display_name: name.into(),
        })
        .await
        .expect("create team")
        .into_inner()
        .team
        .expect("team")
        .id
    }

    /// GET `path` on `port` through a forward, until it answers (an
    /// environment runs before its servers listen: a refused connection is
    /// tried again for a minute). Any other failure is returned at once
    /// when `strict`, tried again otherwise.
    async fn get_when_up(
        &self,
        token: &str,
        env: &str,
        port: u32,
        path: &str,
        strict: bool,
    ) -> Result<Vec<u8>, Status> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (tx, rx) = mpsc::channel(4);
            tx.send(start_message(env, port)).await.unwrap();
            tx.send(data_message(&get(path))).await.unwrap();
            tx.send(close_write()).await.unwrap();
            let answer = async {
                let mut stream = self
                    .environments(token)
                    .port_forward(ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                let mut out = Vec::new();
                while let Some(m) = stream.message().await? {
                    if let Some(port_forward_response::Message::Data(b)) = m.message {
                        out.extend(b);
                    }
                }
                Ok::<_, Status>(out)
            }
            .await;
            match answer {
                Ok(out) if !out.is_empty() => return Ok(out),
                Err(s)
                    if strict
                        && !(s.code() == Code::FailedPrecondition
                            && s.message().contains("refused")) =>
                {
                    return Err(s);
                }
                _ => {
                    assert!(
                        Instant::now() < deadline,
                        "the server never answered: {answer:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

impl Drop for UpPlatform {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(self.child.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(id) = std::fs::read_to_string(self.data_dir.path().join("installation-id")) {
            for object in vibebox_tests::attack::labelled_objects(id.trim()) {
                let args: &[&str] = match object.split_once(':') {
                    Some(("container", name)) => &["rm", "-f", "-v", name],
                    Some(("network", name)) => &["network", "rm", name],
                    Some(("volume", name)) => &["volume", "rm", "-f", name],
                    _ => continue,
                };
                let _ = Command::new("docker").args(args).output();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_keeps_a_running_environments_forwarder_and_removes_a_leftover_one() {
    let image = dev_image();
    let p = UpPlatform::start(&[("VIBEBOX_RECONCILE_INTERVAL", "1".as_ref())]);
    let admin = p.read("admin.token");
    let installation = p.read("installation-id");
    let team_id = p.team(&admin, "forwarding").await;
    let mut created = Vec::new();
    for name in ["running", "stopped"] {
        let env = p
            .environments(&admin)
            .create_settled(CreateEnvironmentRequest {
                labels: Default::default(),
                request_id: format!("create-{name}"),
                team_id: team_id.clone(),
                name: name.into(),
                spec: Some(spec(&image)),
            })
            .await
            .expect("create");
        assert_eq!(env.state(), EnvironmentState::Running, "{env:?}");
        created.push(env.id);
    }
    let (running, stopped) = (created[0].clone(), created[1].clone());

    // A forward makes the running environment's forwarder.
    p.get_when_up(&admin, &running, 8080, "/index.html", false)
        .await
        .expect("the server answers");
    let kept = forwarder(&running).await.expect("a forwarder").id;

    // A forwarder left beside an environment that is not running (a crash
    // between its stop and the forwarder's removal).
    let settled = p
        .environments(&admin)
        .stop_settled(&stopped, Some(1))
        .await
        .expect("stop");
    assert_eq!(settled.state(), EnvironmentState::Stopped, "{settled:?}");
    let leftover = format!("vibebox-fwd-{stopped}");
    let made = Command::new("docker")
        .args(["create", "--name", &leftover])
        .args(["--label", &format!("vibebox.installation={installation}")])
        .args(["--label", &format!("vibebox.environment={stopped}")])
        .args(["--label", "vibebox.managed=true"])
        .args(["--label", "vibebox.role=forwarder"])
        .arg(&image)
        .output()
        .expect("docker create");
    assert!(made.status.success(), "{made:?}");

    // A reconcile pass removes the leftover ...
    forwarder_gone(&stopped, "reconcile").await;
    // ... and, in the same pass, took the running environment's forwarder
    // for what it is: not an impostor (no quarantine), kept.
    let env = p
        .environments(&admin)
        .get_environment(vibebox_proto::environment::GetEnvironmentRequest {
            environment_id: running.clone(),
        })
        .await
        .expect("get")
        .into_inner()
        .environment
        .expect("environment");
    assert_eq!(env.state(), EnvironmentState::Running, "{env:?}");
    assert_eq!(forwarder(&running).await.expect("kept").id, kept);
}

/// Whether the engine has `image`.
fn image_exists(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .expect("docker image inspect")
        .status
        .success()
}

/// Removes this test's own helper image on drop (best effort).
struct OwnImage(Option<String>);

impl Drop for OwnImage {
    fn drop(&mut self) {
        if let Some(image) = &self.0 {
            let _ = Command::new("docker").args(["rmi", image]).output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_imports_the_helper_image_again_when_another_build_pruned_it() {
    let image = dev_image();
    // A copy of the executable: its own inode, so its own helper image
    // (the reference fingerprints the file), which nothing else on the
    // engine uses and this test may remove.
    let helper_dir = tempfile::tempdir().expect("helper dir");
    let helper = helper_dir.path().join("vibebox");
    std::fs::copy(binary("vibebox"), &helper).expect("copying the executable");
    let mut own = OwnImage(None);
    let p = UpPlatform::start(&[("VIBEBOX_HELPER_EXECUTABLE", helper.as_os_str())]);
    let admin = p.read("admin.token");
    let team_id = p.team(&admin, "forwarding").await;
    let created = p
        .environments(&admin)
        .create_settled(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: "create-pruned".into(),
            team_id,
            name: "pruned".into(),
            spec: Some(spec(&image)),
        })
        .await
        .expect("create");
    assert_eq!(created.state(), EnvironmentState::Running, "{created:?}");
    let env = created.id;

    // A forward: the forwarder runs this platform's helper image.
    let response = p
        .get_when_up(&admin, &env, 8080, "/index.html", true)
        .await
        .expect("a forward");
    assert_eq!(http_body(&response).1, b"hello\n");
    let reference = forwarder(&env)
        .await
        .expect("a forwarder")
        .config
        .and_then(|c| c.image)
        .expect("the forwarder's image");
    assert!(reference.starts_with("vibebox/helper:"), "{reference}");
    own.0 = Some(reference.clone());

    // Stopped: the forwarder goes, and with it the last container using
    // the image; then the image goes too, as when another build's import
    // prunes it (an engine refuses to remove an image a container uses).
    let stopped = p
        .environments(&admin)
        .stop_settled(&env, Some(1))
        .await
        .expect("stop");
    assert_eq!(stopped.state(), EnvironmentState::Stopped, "{stopped:?}");
    forwarder_gone(&env, "a stop").await;
    let removed = Command::new("docker")
        .args(["rmi", &reference])
        .output()
        .expect("docker rmi");
    // (Pruned already by another orchestrator's import: fine, it is gone.)
    assert!(
        removed.status.success()
            || String::from_utf8_lossy(&removed.stderr).contains("No such image"),
        "{removed:?}"
    );
    assert!(!image_exists(&reference), "the helper image is still there");

    // Started again, the next forward works: the orchestrator, which had
    // the image's reference cached, imports it again.
    let started = p
        .environments(&admin)
        .start_settled(&env)
        .await
        .expect("start");
    assert_eq!(started.state(), EnvironmentState::Running, "{started:?}");
    let response = p
        .get_when_up(&admin, &env, 8080, "/index.html", true)
        .await
        .unwrap_or_else(|s| panic!("a forward after the helper image went away: {s:?}"));
    assert_eq!(http_body(&response).1, b"hello\n");
    assert!(image_exists(&reference), "imported again");
    let again = forwarder(&env).await.expect("a new forwarder");
    assert_eq!(again.config.and_then(|c| c.image), Some(reference));
    drop(p);
}
