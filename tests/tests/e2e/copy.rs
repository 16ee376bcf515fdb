//! Files in and out of environments (issue 17, "Files in and out"), against
//! the real `vibebox up` and the real Docker Engine: `CopyTo` / `CopyFrom`
//! through the gateway (a directory with nested files both ways, compared
//! byte for byte; ownership by the environment's user; the copy limit; bad
//! paths and hostile archives refused with nothing extracted; viewers, other
//! developers and other teams refused; one audit event per copy with its path
//! and bytes), and `vibebox env cp` both ways with docker cp's rules.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;
use vibebox_proto::audit::{AuditEvent, EventFilter, Outcome, QueryEventsRequest};
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CopyFromRequest, CopyToRequest, CopyToStart, CreateEnvironmentRequest,
    EnvironmentState, copy_to_request,
};
use vibebox_proto::identity::TeamRole;
use vibebox_server_kit::status::violated_rules;
use vibebox_tests::cluster::exec;
use vibebox_tests::{Authed, Platform, Settle, dev_image};

type Client = EnvironmentServiceClient<Authed>;

// ---------------------------------------------------------------------------
// Set-up.

async fn team(p: &Platform, admin: &str, name: &str) -> String {
    p.team(admin, name).await
}

/// A user with `role` in `team`: (user id, token).
async fn member(
    p: &Platform,
    admin: &str,
    name: &str,
    team: &str,
    role: TeamRole,
) -> (String, String) {
    p.member(admin, name, team, role).await
}

/// Creates a running environment; its id.
async fn environment(
    p: &Platform,
    token: &str,
    team: &str,
    name: &str,
    spec: ContainerSpec,
) -> String {
    let created = p
        .environments(token)
        .create_settled(CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: format!("copy-{name}"),
            team_id: team.into(),
            name: name.into(),
            spec: Some(spec),
        })
        .await
        .unwrap_or_else(|s| panic!("creating {name}: {s:?}"));
    assert_eq!(created.state(), EnvironmentState::Running, "{created:?}");
    created.id
}

fn spec(image: &str, copy_limit_mb: Option<i64>) -> ContainerSpec {
    ContainerSpec {
        image: image.into(),
        copy_limit_mb,
        ..Default::default()
    }
}

/// Runs a shell command in the environment (as its user); its stdout.
async fn sh(client: &mut Client, env: &str, script: &str) -> String {
    let out = exec(client, env, &["sh", "-c", script])
        .await
        .unwrap_or_else(|s| panic!("exec {script:?}: {s:?}"));
    assert_eq!(out.exit_code, 0, "{script:?}: {out:?}");
    out.stdout
}

// ---------------------------------------------------------------------------
// Archives.

/// One entry of a test archive.
enum Item<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8], u32),
    Link(&'a str, &'a str),
}

/// A tar archive as a client builds it (root-owned headers: the platform
/// must make them the environment's user's).
fn archive(items: &[Item<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match item {
            Item::Dir(name) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                builder.append_data(&mut h, name, std::io::empty()).unwrap();
            }
            Item::File(name, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                builder.append_data(&mut h, name, *data).unwrap();
            }
            Item::Link(name, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                builder.append_link(&mut h, name, target).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

/// A raw entry whose header says exactly what an attacker wants (the tar
/// crate's writer refuses `..` and absolute names).
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: u8, data: &[u8]) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkflag[0] = kind;
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
}

/// Deterministic bytes that are not all alike.
fn noise(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// What an archive holds: path -> (type, contents or link target, mode, uid, gid).
type Listing = BTreeMap<String, (tar::EntryType, Vec<u8>, u32, u64, u64)>;

fn listing(bytes: &[u8]) -> Listing {
    let mut out = Listing::new();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries().expect("a tar archive") {
        let mut entry = entry.expect("an entry");
        let h = entry.header().clone();
        let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        if h.entry_type() == tar::EntryType::Symlink {
            data = entry.link_name_bytes().unwrap().into_owned();
        }
        out.insert(
            path.trim_end_matches('/').to_owned(),
            (
                h.entry_type(),
                data,
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
            ),
        );
    }
    out
}

/// Sends `bytes` to CopyTo in `chunk`-sized messages.
async fn copy_to(
    client: &mut Client,
    env: &str,
    path: &str,
    bytes: &[u8],
    chunk: usize,
) -> Result<u64, tonic::Status> {
    let mut messages = vec![CopyToRequest {
        message: Some(copy_to_request::Message::Start(CopyToStart {
            environment_id: env.into(),
            path: path.into(),
        })),
    }];
    messages.extend(bytes.chunks(chunk.max(1)).map(|c| CopyToRequest {
        message: Some(copy_to_request::Message::Data(c.to_vec())),
    }));
    client
        .copy_to(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner().bytes)
}

/// CopyFrom: the archive and the largest message.
async fn copy_from(
    client: &mut Client,
    env: &str,
    path: &str,
) -> Result<(Vec<u8>, usize), tonic::Status> {
    let mut stream = client
        .copy_from(CopyFromRequest {
            environment_id: env.into(),
            path: path.into(),
        })
        .await?
        .into_inner();
    let (mut bytes, mut largest) = (Vec::new(), 0);
    while let Some(message) = stream.message().await? {
        largest = largest.max(message.data.len());
        bytes.extend(message.data);
    }
    Ok((bytes, largest))
}

fn field_of(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

fn detail(event: &AuditEvent, key: &str) -> String {
    use prost_types::value::Kind;
    match event
        .details
        .as_ref()
        .and_then(|d| d.fields.get(key))
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(s)) => s.clone(),
        Some(Kind::NumberValue(n)) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// Events of `action` (exact) until `ready` holds for them (the audit
/// service receives the producers' outboxes asynchronously).
async fn events_until(
    p: &Platform,
    admin: &str,
    action: &str,
    ready: impl Fn(&[AuditEvent]) -> bool,
) -> Vec<AuditEvent> {
    let mut events = Vec::new();
    for _ in 0..100 {
        events = p
            .audit(admin)
            .query_events(QueryEventsRequest {
                filter: Some(EventFilter {
                    action: action.into(),
                    ..Default::default()
                }),
                page_size: 500,
                page_token: String::new(),
            })
            .await
            .expect("query events")
            .into_inner()
            .events;
        if ready(&events) {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{action}: the awaited events never came: {events:#?}");
}

// ---------------------------------------------------------------------------
// The API.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_a_directory_in_and_out_within_limits_rights_and_audit() {
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let alpha = team(&p, &admin, "alpha").await;
    let beta = team(&p, &admin, "beta").await;
    let (_, dev) = member(&p, &admin, "dev", &alpha, TeamRole::Developer).await;
    let (_, dev2) = member(&p, &admin, "dev2", &alpha, TeamRole::Developer).await;
    let (viewer_id, viewer) = member(&p, &admin, "viewer", &alpha, TeamRole::Viewer).await;
    let (_, lead) = member(&p, &admin, "lead", &alpha, TeamRole::Admin).await;
    let (_, outsider) = member(&p, &admin, "outsider", &beta, TeamRole::Admin).await;
    let env = environment(&p, &dev, &alpha, "work", spec(&image, None)).await;
    // A request may ask for a smaller copy limit than the policy's.
    let small = environment(&p, &dev, &alpha, "small", spec(&image, Some(1))).await;
    let mut client = p.environments(&dev);

    // A directory with nested files, a symbolic link, a set-uid executable
    // and a file spanning many messages, all root-owned in the archive.
    let big = noise(700 * 1024, 1);
    let sent = archive(&[
        Item::Dir("proj"),
        Item::File("proj/a.txt", b"alpha\n", 0o644),
        Item::Dir("proj/sub"),
        Item::File("proj/sub/b.bin", &big, 0o600),
        Item::Dir("proj/sub/deeper"),
        Item::File("proj/sub/deeper/c.txt", b"gamma\n", 0o640),
        Item::File("proj/tool", b"#!/bin/sh\necho tool\n", 0o4755),
        Item::Link("proj/link", "a.txt"),
    ]);
    let bytes = copy_to(&mut client, &env, "/workspace", &sent, 64 * 1024)
        .await
        .expect("copy to");
    assert_eq!(bytes, sent.len() as u64, "the archive bytes received");

    // Inside: the contents, owned by the environment's user (1000:1000),
    // without the set-uid bit.
    assert_eq!(
        sh(&mut client, &env, "cat /workspace/proj/a.txt").await,
        "alpha\n"
    );
    assert_eq!(
        sh(&mut client, &env, "cat /workspace/proj/sub/deeper/c.txt").await,
        "gamma\n"
    );
    let stats = sh(
        &mut client,
        &env,
        "cd /workspace/proj && stat -c '%n %u:%g %a' . a.txt sub sub/b.bin sub/deeper tool && readlink link",
    )
    .await;
    assert_eq!(
        stats,
        ". 1000:1000 755\na.txt 1000:1000 644\nsub 1000:1000 755\nsub/b.bin 1000:1000 600\n\
         sub/deeper 1000:1000 755\ntool 1000:1000 755\na.txt\n",
        "ownership and modes inside the environment"
    );
    assert_eq!(
        sh(&mut client, &env, "wc -c < /workspace/proj/sub/b.bin")
            .await
            .trim(),
        big.len().to_string()
    );

    // Out again: the same tree, byte for byte, in messages of at most 64 KiB.
    let (back, largest) = copy_from(&mut client, &env, "/workspace/proj")
        .await
        .expect("copy from");
    assert!(largest <= 64 * 1024, "messages of {largest} bytes");
    let got = listing(&back);
    let want = listing(&sent);
    for (path, (kind, data, ..)) in &want {
        let (got_kind, got_data, _, uid, gid) = got
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from {:?}", got.keys()));
        assert_eq!(got_kind, kind, "{path}");
        assert_eq!(got_data, data, "{path}: the same bytes");
        assert_eq!((*uid, *gid), (1000, 1000), "{path}");
    }
    assert_eq!(got.len(), want.len(), "{:?}", got.keys());

    // The environment's user owns what was copied: it can change it.
    sh(
        &mut client,
        &env,
        "echo more >> /workspace/proj/a.txt && mkdir /workspace/proj/sub/made && rm /workspace/proj/tool",
    )
    .await;

    // A single file, and a path through `..` (normalized inside).
    let (one, _) = copy_from(&mut client, &env, "/workspace/x/../proj/a.txt")
        .await
        .expect("copy a file");
    assert_eq!(listing(&one)["a.txt"].1, b"alpha\nmore\n");

    // --- The copy limit (1 MiB here): refused whole, nothing extracted. ---
    let ok = archive(&[
        Item::Dir("fits"),
        Item::File("fits/f.bin", &noise(100_000, 2), 0o644),
    ]);
    copy_to(&mut client, &small, "/workspace", &ok, 256 * 1024)
        .await
        .expect("an archive under the limit");
    let over = archive(&[
        Item::Dir("limited"),
        Item::File("limited/first.txt", b"first\n", 0o644),
        Item::File("limited/big.bin", &noise(2 * 1024 * 1024, 3), 0o644),
    ]);
    let refused = copy_to(&mut client, &small, "/workspace", &over, 512 * 1024)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let quota = refused
        .get_details_quota_failure()
        .expect("a quota failure");
    assert_eq!(quota.violations[0].subject, "files.copy_limit");
    assert!(refused.message().contains("1 MiB"), "{refused:?}");
    assert_eq!(
        sh(&mut client, &small, "ls -A /workspace").await,
        "fits\n",
        "nothing of the refused archive was extracted"
    );
    // Out: a single file over the limit is refused before a byte moves; a
    // directory stops once it passes the limit.
    sh(
        &mut client,
        &small,
        "mkdir /workspace/bigdir && head -c 1500000 /dev/urandom > /workspace/bigdir/big && head -c 1500000 /dev/urandom > /workspace/bigdir/big2",
    )
    .await;
    let refused = copy_from(&mut client, &small, "/workspace/bigdir/big")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let mut stream = client
        .copy_from(CopyFromRequest {
            environment_id: small.clone(),
            path: "/workspace/bigdir".into(),
        })
        .await
        .expect("the stream starts")
        .into_inner();
    let mut received = 0usize;
    let ended = loop {
        match stream.message().await {
            Ok(Some(m)) => received += m.data.len(),
            Ok(None) => panic!("a directory over the limit was streamed whole"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
    assert!(
        received <= 1024 * 1024,
        "{received} bytes before the refusal"
    );

    // --- Bad paths and hostile archives: refused, nothing extracted. ---
    let small_archive = archive(&[Item::File("ok.txt", b"ok\n", 0o644)]);
    for (path, why) in [
        ("workspace", "relative"),
        ("", "empty"),
        ("/work\0space", "NUL"),
        ("/work\nspace", "control character"),
        ("/proc", "reserved"),
        ("/sys/fs", "reserved"),
        ("/workspace/../dev", "reserved after normalization"),
        ("/etc/hosts", "reserved"),
    ] {
        let refused = copy_to(&mut client, &env, path, &small_archive, 1024)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{why}: {refused:?}");
        assert_eq!(field_of(&refused), ["path"], "{why}: {refused:?}");
    }
    let refused = copy_from(&mut client, &env, "relative/path")
        .await
        .unwrap_err();
    assert_eq!(field_of(&refused), ["path"], "{refused:?}");
    let missing = copy_to(&mut client, &env, "/workspace/nope", &small_archive, 1024)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let missing = copy_from(&mut client, &env, "/workspace/nope")
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let not_dir = copy_to(
        &mut client,
        &env,
        "/workspace/proj/a.txt",
        &small_archive,
        1024,
    )
    .await
    .unwrap_err();
    assert_eq!(
        violated_rules(&not_dir),
        ["files.not_a_directory"],
        "{not_dir:?}"
    );

    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", {
            let mut a = Vec::new();
            raw_entry(&mut a, "h1.txt", b'0', b"x");
            raw_entry(&mut a, "../escape.txt", b'0', b"x");
            a.extend([0u8; 1024]);
            a
        }),
        ("absolute", {
            let mut a = Vec::new();
            raw_entry(&mut a, "h2.txt", b'0', b"x");
            raw_entry(&mut a, "/etc/evil", b'0', b"x");
            a.extend([0u8; 1024]);
            a
        }),
        ("device", {
            let mut a = Vec::new();
            raw_entry(&mut a, "h3.txt", b'0', b"x");
            raw_entry(&mut a, "null", b'3', b"");
            a.extend([0u8; 1024]);
            a
        }),
        ("through a symlink of the archive", {
            let mut a = archive(&[Item::File("h4.txt", b"x", 0o644), Item::Link("hop", "/etc")]);
            a.truncate(a.len() - 1024);
            raw_entry(&mut a, "hop/evil", b'0', b"x");
            a.extend([0u8; 1024]);
            a
        }),
        ("cut short", {
            let mut a = archive(&[Item::File("h5.txt", b"x", 0o644)]);
            a.truncate(a.len() - 1024);
            a
        }),
        ("not tar", noise(4096, 4)),
    ];
    for (what, bytes) in hostile {
        let refused = copy_to(&mut client, &env, "/workspace", &bytes, 1000)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{what}: {refused:?}");
        assert_eq!(field_of(&refused), ["data"], "{what}: {refused:?}");
    }
    // A client that goes away before the end of its archive (into
    // /workspace/proj/sub): nothing of it is extracted.
    let mut withheld = archive(&[
        Item::Dir("aborted"),
        Item::File("aborted/mid.txt", b"mid\n", 0o644),
    ]);
    withheld.truncate(withheld.len() - 1024);
    let opening = vec![
        CopyToRequest {
            message: Some(copy_to_request::Message::Start(CopyToStart {
                environment_id: env.clone(),
                path: "/workspace/proj/sub".into(),
            })),
        },
        CopyToRequest {
            message: Some(copy_to_request::Message::Data(withheld)),
        },
    ];
    let mut leaving = p.environments(&dev);
    let call = tokio::spawn(async move {
        use futures::StreamExt as _;
        let requests = tokio_stream::iter(opening).chain(futures::stream::pending());
        leaving.copy_to(requests).await
    });
    let open = r#"vibebox_gateway_active_streams{method="EnvironmentService/CopyTo"} 1"#;
    let mut seen = false;
    for _ in 0..200 {
        if p.scrape_metrics().lines().any(|l| l.trim() == open) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the CopyTo stream was never open at the gateway");
    call.abort();
    let _ = call.await;
    events_until(&p, &admin, "environment.copy_to", |events| {
        events.iter().any(|e| {
            let error = detail(e, "error");
            e.resource_id == env
                && detail(e, "path") == "/workspace/proj/sub"
                && e.outcome() == Outcome::Failure
                && (error.contains("cancelled") || error.contains("incomplete"))
        })
    })
    .await;
    assert_eq!(
        sh(&mut client, &env, "ls /workspace/proj/sub").await,
        "b.bin\ndeeper\nmade\n",
        "nothing of the abandoned archive was extracted"
    );

    assert_eq!(
        sh(
            &mut client,
            &env,
            "ls -A /workspace; ls /escape.txt /etc/evil /etc/hosts.d 2>/dev/null; true"
        )
        .await,
        "proj\n",
        "no entry of a refused archive reached the environment"
    );

    // The protocol: a second start, an oversized chunk.
    let twice = tokio_stream::iter(vec![
        CopyToRequest {
            message: Some(copy_to_request::Message::Start(CopyToStart {
                environment_id: env.clone(),
                path: "/workspace".into(),
            })),
        },
        CopyToRequest {
            message: Some(copy_to_request::Message::Start(CopyToStart::default())),
        },
    ]);
    let refused = client.copy_to(twice).await.unwrap_err();
    assert_eq!(field_of(&refused), ["start"], "{refused:?}");
    // Messages are at most 1 MiB (the gateway's request limit, framing
    // included): a larger chunk is refused by the transport.
    let refused = copy_to(
        &mut client,
        &env,
        "/workspace",
        &noise(1024 * 1024 + 1, 5),
        1024 * 1024 + 1,
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(
        refused.message().contains("message length too large"),
        "{refused:?}"
    );

    // --- Who may copy: the owner and team admins only. ---
    for (who, token) in [
        ("viewer", &viewer),
        ("another developer", &dev2),
        ("another team's admin", &outsider),
    ] {
        let mut theirs = p.environments(token);
        let refused = copy_to(&mut theirs, &env, "/workspace", &small_archive, 1024)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{who}: {refused:?}");
        let refused = copy_from(&mut theirs, &env, "/workspace/proj")
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{who}: {refused:?}");
    }
    assert_eq!(
        sh(&mut client, &env, "ls /workspace/ok.txt 2>/dev/null; true").await,
        "",
        "no refused caller wrote anything"
    );
    let mut admin_of_team = p.environments(&lead);
    copy_to(&mut admin_of_team, &env, "/workspace", &small_archive, 1024)
        .await
        .expect("a team admin copies in");
    let (from_admin, _) = copy_from(&mut admin_of_team, &env, "/workspace/ok.txt")
        .await
        .expect("a team admin copies out");
    assert_eq!(listing(&from_admin)["ok.txt"].1, b"ok\n");

    // --- A stopped environment: refused, naming its state. ---
    let stopped = client.stop_settled(&small, Some(1)).await.expect("stop");
    assert_eq!(stopped.state(), EnvironmentState::Stopped, "{stopped:?}");
    let refused = copy_to(&mut client, &small, "/workspace", &small_archive, 1024)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("stopped"), "{refused:?}");
    let refused = copy_from(&mut client, &small, "/workspace")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // --- Audit: one event per copy, with its path, bytes and outcome. ---
    let sent_len = sent.len().to_string();
    let copies_to = events_until(&p, &admin, "environment.copy_to", |events| {
        events.iter().any(|e| {
            e.resource_id == env
                && e.outcome() == Outcome::Success
                && detail(e, "bytes") == sent_len
        }) && events
            .iter()
            .any(|e| e.resource_id == small && detail(e, "error").contains("copy limit"))
    })
    .await;
    let first = copies_to
        .iter()
        .find(|e| e.resource_id == env && detail(e, "bytes") == sent_len)
        .unwrap();
    assert_eq!(detail(first, "path"), "/workspace");
    assert_eq!(detail(first, "entries"), "8");
    assert_eq!(first.source_service, "orchestrator");
    assert!(!first.actor.as_ref().unwrap().user_id.is_empty());
    let limited = copies_to
        .iter()
        .find(|e| e.resource_id == small && detail(e, "error").contains("copy limit"))
        .unwrap();
    assert_eq!(limited.outcome(), Outcome::Failure);
    let reserved = copies_to
        .iter()
        .find(|e| detail(e, "path") == "/dev")
        .expect("the refused /workspace/../dev, audited as /dev");
    assert_eq!(reserved.outcome(), Outcome::Failure);
    let back_len = back.len().to_string();
    let copies_from = events_until(&p, &admin, "environment.copy_from", |events| {
        events
            .iter()
            .any(|e| detail(e, "path") == "/workspace/proj" && detail(e, "bytes") == back_len)
    })
    .await;
    assert!(
        copies_from
            .iter()
            .any(|e| detail(e, "path") == "/workspace/bigdir" && e.outcome() == Outcome::Failure)
    );
    let denied = events_until(&p, &admin, "access.denied", |events| {
        events.iter().any(|e| {
            e.actor.as_ref().is_some_and(|a| a.user_id == viewer_id)
                && detail(e, "reason").starts_with("environment.copy_to")
        }) && events.iter().any(|e| {
            e.actor.as_ref().is_some_and(|a| a.user_id == viewer_id)
                && detail(e, "reason").starts_with("environment.copy_from")
        })
    })
    .await;
    assert!(!denied.is_empty());
}

/// The opening of a CopyTo: its start and one data message.
fn opening(env: &str, path: &str, data: Vec<u8>) -> Vec<CopyToRequest> {
    vec![
        CopyToRequest {
            message: Some(copy_to_request::Message::Start(CopyToStart {
                environment_id: env.into(),
                path: path.into(),
            })),
        },
        CopyToRequest {
            message: Some(copy_to_request::Message::Data(data)),
        },
    ]
}

/// Tasks aborted when dropped: a test that fails half-way must not leave
/// streams open (the platform's graceful shutdown would wait for them).
struct Tasks<T>(Vec<tokio::task::JoinHandle<T>>);

impl<T> Drop for Tasks<T> {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

fn quota_subjects(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_quota_failure()
        .map(|q| q.violations.into_iter().map(|v| v.subject).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_copies_of_one_environment_do_not_block_another() {
    use futures::StreamExt as _;
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let alpha = team(&p, &admin, "alpha").await;
    let (_, dev) = member(&p, &admin, "dev", &alpha, TeamRole::Developer).await;
    let stuck = environment(&p, &dev, &alpha, "stuck", spec(&image, None)).await;
    let other = environment(&p, &dev, &alpha, "other", spec(&image, None)).await;
    let mut client = p.environments(&dev);

    // Four uploads to `stuck` that send the start of an archive, then
    // nothing (their clients stay connected).
    let mut part = archive(&[
        Item::Dir("stalled"),
        Item::File("stalled/f.txt", b"f\n", 0o644),
    ]);
    part.truncate(part.len() - 1024);
    let mut stalled = Tasks(
        (0..4)
            .map(|_| {
                let mut theirs = p.environments(&dev);
                let requests = tokio_stream::iter(opening(&stuck, "/workspace", part.clone()))
                    .chain(futures::stream::pending());
                tokio::spawn(async move { theirs.copy_to(requests).await })
            })
            .collect(),
    );
    // Two of them hold the environment's spool slots; the other two are
    // refused at once, to their callers only.
    let mut refused = Vec::new();
    for _ in 0..300 {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut stalled.0)
            .into_iter()
            .partition(|t| t.is_finished());
        stalled.0 = waiting;
        for task in done {
            refused.push(
                task.await
                    .unwrap()
                    .expect_err("a stalled upload cannot succeed"),
            );
        }
        if refused.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        refused.len(),
        2,
        "two of four stalled uploads to one environment are refused: {refused:?}"
    );
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(
            quota_subjects(status),
            ["files.copy_concurrency"],
            "{status:?}"
        );
    }
    assert_eq!(
        stalled.0.len(),
        2,
        "two uploads still wait for their clients"
    );

    // Meanwhile another environment takes copies in and out.
    let small = archive(&[Item::File("ok.txt", b"ok\n", 0o644)]);
    copy_to(&mut client, &other, "/workspace", &small, 1024)
        .await
        .expect("a copy to another environment is not blocked");
    assert_eq!(
        sh(&mut client, &other, "cat /workspace/ok.txt").await,
        "ok\n"
    );

    // A CopyFrom whose client does not read holds neither the engine (which
    // locks the container while it streams an archive) nor anyone else.
    sh(
        &mut client,
        &stuck,
        "head -c 33554432 /dev/zero > /workspace/big",
    )
    .await;
    let mut theirs = p.environments(&dev);
    let not_read = theirs
        .copy_from(CopyFromRequest {
            environment_id: stuck.clone(),
            path: "/workspace/big".into(),
        })
        .await
        .expect("a CopyFrom")
        .into_inner();
    assert_eq!(
        sh(&mut client, &stuck, "ls /workspace").await,
        "big\n",
        "the environment still answers while its download waits"
    );
    let (out, _) = copy_from(&mut client, &other, "/workspace/ok.txt")
        .await
        .expect("a CopyFrom of another environment");
    assert_eq!(listing(&out)["ok.txt"].1, b"ok\n");
    drop((not_read, theirs));

    // An archive declaring a 1 GiB long name is refused before it is read,
    // naming the rule; nothing of it is extracted.
    let mut huge = tar::Header::new_gnu();
    huge.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    huge.set_entry_type(tar::EntryType::GNULongName);
    huge.set_size(1 << 30);
    huge.set_cksum();
    let mut bomb = huge.as_bytes().to_vec();
    bomb.extend(std::iter::repeat_n(b'a', 256 * 1024));
    let refused = copy_to(&mut client, &other, "/workspace", &bomb, 64 * 1024)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        violated_rules(&refused),
        ["files.archive_limits"],
        "{refused:?}"
    );
    assert_eq!(
        sh(&mut client, &other, "ls -A /workspace").await,
        "ok.txt\n"
    );

    // The stalled uploads end with their clients: nothing was extracted.
    for task in std::mem::take(&mut stalled.0) {
        task.abort();
        let _ = task.await;
    }
    assert_eq!(
        sh(&mut client, &stuck, "ls -A /workspace").await,
        "big\n",
        "nothing of a stalled upload was extracted"
    );
}

// ---------------------------------------------------------------------------
// The CLI.

/// `vibebox` as a user with `token` (its own config directory).
struct Cli {
    config: tempfile::TempDir,
    server: String,
    token: String,
}

impl Cli {
    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(vibebox_tests::binary("vibebox"))
            .args(args)
            .env("VIBEBOX_CONFIG_DIR", self.config.path())
            .env("VIBEBOX_SERVER", &self.server)
            .env("VIBEBOX_TOKEN", &self.token)
            .env_remove("VIBEBOX_CONTEXT")
            .env_remove("VIBEBOX_OUTPUT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vibebox");
        let mut input = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().expect("vibebox output");
        writer.join().unwrap();
        out
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args, b"");
        assert!(
            out.status.success(),
            "vibebox {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args, b"");
        assert!(!out.status.success(), "vibebox {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// Every file, directory and link under `root`: relative path -> contents
/// (files), `dir`, or `-> target` (links).
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let kind = e.file_type().unwrap();
            if kind.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(rel, format!("-> {}", target.display()).into_bytes());
            } else if kind.is_dir() {
                out.insert(rel, b"dir".to_vec());
                walk(root, &path, out);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vibebox_env_cp_copies_directories_both_ways_like_docker_cp() {
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let alpha = team(&p, &admin, "alpha").await;
    let (_, dev) = member(&p, &admin, "dev", &alpha, TeamRole::Developer).await;
    let (_, viewer) = member(&p, &admin, "viewer", &alpha, TeamRole::Viewer).await;
    let env = environment(&p, &dev, &alpha, "box", spec(&image, None)).await;
    let small = environment(&p, &dev, &alpha, "tiny", spec(&image, Some(1))).await;
    let mut client = p.environments(&dev);
    let cli = Cli {
        config: tempfile::tempdir().unwrap(),
        server: format!("http://{}", p.gateway),
        token: dev.clone(),
    };

    // A local project: nested directories, an empty one, a link, a binary.
    let local = tempfile::tempdir().unwrap();
    let proj = local.path().join("proj");
    std::fs::create_dir_all(proj.join("src/nested")).unwrap();
    std::fs::create_dir_all(proj.join("empty")).unwrap();
    std::fs::write(proj.join("README.md"), "# proj\n").unwrap();
    std::fs::write(proj.join("src/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(proj.join("src/nested/data.bin"), noise(600 * 1024, 9)).unwrap();
    std::os::unix::fs::symlink("README.md", proj.join("readme-link")).unwrap();
    let proj_arg = proj.to_str().unwrap();

    // Into an existing directory: /workspace/proj (by the environment's name).
    cli.ok(&["env", "cp", proj_arg, "box:/workspace"]);
    assert_eq!(
        sh(&mut client, &env, "cd /workspace/proj && find . | sort && cat src/main.rs && readlink readme-link && stat -c '%u:%g' src/nested/data.bin").await,
        ".\n./README.md\n./empty\n./readme-link\n./src\n./src/main.rs\n./src/nested\n./src/nested/data.bin\nfn main() {}\nREADME.md\n1000:1000\n"
    );
    // To a path that does not exist: it becomes that directory.
    cli.ok(&["env", "cp", proj_arg, &format!("{env}:/workspace/renamed")]);
    assert_eq!(
        sh(&mut client, &env, "cat /workspace/renamed/README.md").await,
        "# proj\n"
    );
    // A file to a new name, and the contents of a directory (`dir/.`).
    let readme = proj.join("README.md");
    cli.ok(&[
        "env",
        "cp",
        readme.to_str().unwrap(),
        "box:/workspace/notes.md",
    ]);
    assert_eq!(
        sh(&mut client, &env, "cat /workspace/notes.md").await,
        "# proj\n"
    );
    sh(&mut client, &env, "mkdir /workspace/flat").await;
    cli.ok(&["env", "cp", &format!("{proj_arg}/."), "box:/workspace/flat"]);
    assert_eq!(
        sh(&mut client, &env, "ls /workspace/flat").await,
        "README.md\nempty\nreadme-link\nsrc\n"
    );

    // Out to a path that does not exist: the same tree, byte for byte.
    let out = local.path().join("out");
    cli.ok(&["env", "cp", "box:/workspace/proj", out.to_str().unwrap()]);
    assert_eq!(tree(&out), tree(&proj), "copied back out unchanged");
    // Out into an existing directory: out/proj.
    cli.ok(&["env", "cp", "box:/workspace/proj", out.to_str().unwrap()]);
    assert_eq!(tree(&out.join("proj")), tree(&proj));
    // A single file out, over an existing one.
    let single = local.path().join("single.md");
    std::fs::write(&single, "old").unwrap();
    cli.ok(&[
        "env",
        "cp",
        "box:/workspace/notes.md",
        single.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(&single).unwrap(), "# proj\n");

    // `-`: a tar archive on stdout, and from stdin.
    let streamed = cli.ok(&["env", "cp", "box:/workspace/proj/src", "-"]);
    let listed = listing(&streamed.stdout);
    assert_eq!(listed["src/main.rs"].1, b"fn main() {}\n");
    let piped = archive(&[
        Item::Dir("piped"),
        Item::File("piped/p.txt", b"from stdin\n", 0o644),
    ]);
    let out_piped = cli.run(&["env", "cp", "-", "box:/workspace"], &piped);
    assert!(
        out_piped.status.success(),
        "{}",
        String::from_utf8_lossy(&out_piped.stderr)
    );
    assert_eq!(
        sh(&mut client, &env, "cat /workspace/piped/p.txt").await,
        "from stdin\n"
    );

    // Clear errors, and nothing left behind by a refused copy.
    let gone = local.path().join("gone");
    let e = cli.fails(&["env", "cp", "box:/workspace/nope", gone.to_str().unwrap()]);
    assert!(e.contains("NOT_FOUND"), "{e}");
    assert!(!gone.exists());
    let e = cli.fails(&["env", "cp", proj_arg, "box:/workspace/nope/deeper"]);
    assert!(
        e.contains("/workspace/nope: no such directory in the environment"),
        "{e}"
    );
    let e = cli.fails(&["env", "cp", proj_arg, "box:/workspace/notes.md"]);
    assert!(e.contains("cannot copy a directory onto the file"), "{e}");
    let e = cli.fails(&["env", "cp", proj_arg, "box:relative"]);
    assert!(e.contains("must be absolute"), "{e}");
    let e = cli.fails(&["env", "cp", proj_arg, local.path().to_str().unwrap()]);
    assert!(e.contains("ENV:/path"), "{e}");
    let e = cli.fails(&["env", "cp", proj_arg, "no-such-env:/workspace"]);
    assert!(e.contains("no environment named"), "{e}");
    // Over the copy limit (1 MiB): refused both ways, naming the limit.
    let big = local.path().join("big.bin");
    std::fs::write(&big, noise(2 * 1024 * 1024, 7)).unwrap();
    let e = cli.fails(&[
        "env",
        "cp",
        big.to_str().unwrap(),
        &format!("{small}:/workspace"),
    ]);
    assert!(
        e.contains("RESOURCE_EXHAUSTED") && e.contains("copy limit"),
        "{e}"
    );
    assert_eq!(sh(&mut client, &small, "ls -A /workspace").await, "");
    sh(&mut client, &small, "mkdir /workspace/d && head -c 700000 /dev/urandom > /workspace/d/a && head -c 700000 /dev/urandom > /workspace/d/b").await;
    let partial = local.path().join("partial");
    let e = cli.fails(&["env", "cp", "tiny:/workspace/d", partial.to_str().unwrap()]);
    assert!(e.contains("copy limit"), "{e}");
    assert!(!partial.exists(), "nothing unpacked from a refused copy");

    // A symbolic link a first copy left on disk is never written through
    // by a later one (the environment controls what it sends).
    let victim = local.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    sh(
        &mut client,
        &env,
        &format!(
            "mkdir /workspace/trap && ln -s {} /workspace/trap/evil",
            victim.display()
        ),
    )
    .await;
    let landed = local.path().join("landed");
    cli.ok(&["env", "cp", "box:/workspace/trap", landed.to_str().unwrap()]);
    assert_eq!(std::fs::read_link(landed.join("evil")).unwrap(), victim);
    sh(
        &mut client,
        &env,
        "rm /workspace/trap/evil && mkdir /workspace/trap/evil && echo owned > /workspace/trap/evil/x",
    )
    .await;
    let e = cli.fails(&[
        "env",
        "cp",
        "box:/workspace/trap/.",
        landed.to_str().unwrap(),
    ]);
    assert!(e.contains("symbolic link"), "{e}");
    assert_eq!(
        std::fs::read_dir(&victim).unwrap().count(),
        0,
        "nothing written through the link"
    );

    // A viewer may not copy.
    let as_viewer = Cli {
        config: tempfile::tempdir().unwrap(),
        server: cli.server.clone(),
        token: viewer,
    };
    let e = as_viewer.fails(&["env", "cp", proj_arg, &format!("{env}:/workspace/v")]);
    assert!(e.contains("PERMISSION_DENIED"), "{e}");
    let e = as_viewer.fails(&[
        "env",
        "cp",
        &format!("{env}:/workspace/proj"),
        local.path().join("v").to_str().unwrap(),
    ]);
    assert!(e.contains("PERMISSION_DENIED"), "{e}");
}

/// Downloads whose clients stop reading hold only their own stream's share
/// of the gateway's one connection to the orchestrator: other users' calls
/// (another team's exec and download) still go through. With the HTTP/2
/// defaults (2 MiB a stream, 5 MiB the connection) three such streams froze
/// every call through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_nobody_reads_do_not_freeze_other_users() {
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let alpha = team(&p, &admin, "alpha").await;
    let beta = team(&p, &admin, "beta").await;
    let (_, greedy) = member(&p, &admin, "greedy", &alpha, TeamRole::Developer).await;
    let (_, other) = member(&p, &admin, "other", &beta, TeamRole::Developer).await;
    let big = environment(&p, &greedy, &alpha, "big", spec(&image, None)).await;
    let theirs = environment(&p, &other, &beta, "theirs", spec(&image, None)).await;
    let mut greedy_client = p.environments(&greedy);
    sh(
        &mut greedy_client,
        &big,
        "head -c 16777216 /dev/zero > /workspace/big",
    )
    .await;
    // Four downloads (the per-environment cap) that are never read.
    let mut held = Vec::new();
    for _ in 0..4 {
        let stream = p
            .environments(&greedy)
            .copy_from(CopyFromRequest {
                environment_id: big.clone(),
                path: "/workspace/big".into(),
            })
            .await
            .expect("a CopyFrom")
            .into_inner();
        held.push(stream);
    }
    // Give the orchestrator time to spool and push what the windows allow.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut client = p.environments(&other);
    let call = async {
        sh(&mut client, &theirs, "echo fine").await;
        sh(&mut client, &theirs, "echo ok > /workspace/ok.txt").await;
        copy_from(&mut client, &theirs, "/workspace/ok.txt").await
    };
    let (out, _) = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("another user's calls are not frozen by unread downloads")
        .expect("a CopyFrom of another environment");
    assert_eq!(listing(&out)["ok.txt"].1, b"ok\n");
    drop(held);
}
