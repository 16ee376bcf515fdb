//! `cargo bench -p vibebox-audit`: durable appends per second through the
//! real gRPC ingest path (mTLS, SQLite WAL with synchronous=FULL, or
//! PostgreSQL when `VIBEBOX_BENCH_DATABASE_URL` is set), and the time to
//! verify an export of one million events offline.
//!
//! Knobs: `VIBEBOX_BENCH_APPENDS` (default 100000), `VIBEBOX_BENCH_VERIFY`
//! (default 1000000).

use std::io::{BufReader, BufWriter, Write};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use vibebox_audit_chain::verify::to_json_line;
use vibebox_audit_chain::{
    Actor, CheckpointSigner, Event, ExportLine, GENESIS_HASH, Outcome, Severity, verify_export,
};
use vibebox_proto::audit as pb;
use vibebox_proto::audit_ingest::AppendEventsRequest;
use vibebox_proto::audit_ingest::audit_ingest_service_client::AuditIngestServiceClient;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wire_event(i: usize) -> pb::AuditEvent {
    pb::AuditEvent {
        id: uuid::Uuid::now_v7().to_string(),
        actor: Some(pb::Actor {
            kind: Default::default(),
            user_id: format!("user-{}", i % 1000),
            token_id: "tok".into(),
            service: String::new(),
        }),
        team_id: "team-1".into(),
        action: "auth.login".into(),
        resource_type: "user".into(),
        resource_id: format!("user-{}", i % 1000),
        outcome: pb::Outcome::Success as i32,
        severity: pb::Severity::Low as i32,
        request_id: format!("req-{i}"),
        client_address: "127.0.0.1".into(),
        ..Default::default()
    }
}

async fn bench_appends(total: usize) {
    let pki = vibebox_server_kit::testing::TestPki::new();
    let mut config = vibebox_audit::Config::new(pki.server_args("audit"));
    config.database.url = std::env::var("VIBEBOX_BENCH_DATABASE_URL").ok();
    let backend = if config.database.url.is_some() {
        "postgres"
    } else {
        "sqlite"
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(vibebox_audit::run_with_listener(
        config,
        listener,
        shutdown.clone(),
    ));
    let channel = vibebox_server_kit::connect(&url, &pki.material("orchestrator")).unwrap();
    let mut probe = AuditIngestServiceClient::new(channel.clone());
    while probe
        .append_events(AppendEventsRequest {
            events: vec![wire_event(0)],
        })
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let producers = 8;
    let batch = 250;
    let per_producer = total / producers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let mut client = AuditIngestServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < per_producer {
                let n = batch.min(per_producer - sent);
                let events = (0..n)
                    .map(|i| wire_event(p * per_producer + sent + i))
                    .collect();
                client
                    .append_events(AppendEventsRequest { events })
                    .await
                    .unwrap();
                sent += n;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed();
    let appended = per_producer * producers;
    println!(
        "durable appends ({backend}, gRPC, {producers} producers, batches of {batch}): {appended} events in {:.2} s = {:.0} events/s",
        elapsed.as_secs_f64(),
        appended as f64 / elapsed.as_secs_f64()
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

fn bench_verify(total: u64) {
    let signer = CheckpointSigner::generate();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.jsonl");
    let mut out = BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut prev = GENESIS_HASH.to_owned();
    let base = chrono::Utc::now();
    let build = Instant::now();
    for seq in 1..=total {
        let mut details = serde_json::Map::new();
        details.insert("image".into(), serde_json::json!("busybox:latest"));
        details.insert("cpus".into(), serde_json::json!(1.0));
        let mut e = Event {
            id: uuid::Uuid::now_v7().to_string(),
            sequence: 0,
            time: base + chrono::Duration::milliseconds(seq as i64),
            actor: Actor {
                kind: Default::default(),
                user_id: format!("user-{}", seq % 1000),
                token_id: "tok".into(),
                service: String::new(),
            },
            team_id: "team-1".into(),
            action: "environment.create".into(),
            resource_type: "environment".into(),
            resource_id: format!("env-{seq}"),
            outcome: Outcome::Success,
            severity: Severity::Low,
            details,
            source_service: "orchestrator".into(),
            trace_id: String::new(),
            request_id: format!("req-{seq}"),
            client_address: "127.0.0.1".into(),
            hash: String::new(),
            prev_hash: String::new(),
        };
        e.seal(seq, &prev);
        prev.clone_from(&e.hash);
        writeln!(out, "{}", to_json_line(&ExportLine::Event(e))).unwrap();
        if seq % 1000 == 0 || seq == total {
            writeln!(
                out,
                "{}",
                to_json_line(&ExportLine::Checkpoint(signer.sign(seq, &prev)))
            )
            .unwrap();
        }
    }
    out.flush().unwrap();
    drop(out);
    let size = std::fs::metadata(&path).unwrap().len();
    println!(
        "built a {total}-event export ({:.0} MiB) in {:.2} s",
        size as f64 / (1024.0 * 1024.0),
        build.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let report = verify_export(
        BufReader::with_capacity(1 << 20, std::fs::File::open(&path).unwrap()),
        &signer.verifying_key(),
    )
    .unwrap();
    let elapsed = start.elapsed();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.events_checked, total);
    println!(
        "offline verification of {total} events ({} checkpoints): {:.2} s ({:.0} events/s, {} threads)",
        report.checkpoints_verified,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: run small then.
    let full = std::env::args().any(|a| a == "--bench");
    let appends = env_usize("VIBEBOX_BENCH_APPENDS", if full { 100_000 } else { 2_000 });
    let verify = env_usize(
        "VIBEBOX_BENCH_VERIFY",
        if full { 1_000_000 } else { 10_000 },
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench_appends(appends));
    bench_verify(verify as u64);
}
