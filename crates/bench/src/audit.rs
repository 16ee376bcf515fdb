//! Durable audit appends per second through the real ingest path (gRPC over
//! mutual TLS into the audit service, SQLite WAL with synchronous=FULL, hash
//! chain) next to the durability floor (the same encoded events appended to
//! a plain file with one fdatasync per batch), and the offline verification
//! of an export of one million events next to reading and hashing the same
//! file once. Adapted from `crates/audit/benches/audit.rs`.

use std::io::{BufReader, BufWriter, Read, Write};
use std::time::{Duration, Instant};

use prost::Message;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use vibebox_audit_chain::verify::to_json_line;
use vibebox_audit_chain::{
    Actor, CheckpointSigner, Event, ExportLine, GENESIS_HASH, Outcome, Severity, verify_export,
};
use vibebox_proto::audit as pb;
use vibebox_proto::audit_ingest::AppendEventsRequest;
use vibebox_proto::audit_ingest::audit_ingest_service_client::AuditIngestServiceClient;

use crate::report::{Figure, Unit};

const PRODUCERS: usize = 8;
const BATCH: usize = 250;

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

/// Appends per second through gRPC ingest into the audit service.
async fn service_appends(total: usize) -> anyhow::Result<f64> {
    let pki = vibebox_server_kit::testing::TestPki::new();
    let config = vibebox_audit::Config::new(pki.server_args("audit"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(vibebox_audit::run_with_listener(
        config,
        listener,
        shutdown.clone(),
    ));
    let channel = vibebox_server_kit::connect(&url, &pki.material("orchestrator"))?;
    let mut probe = AuditIngestServiceClient::new(channel.clone());
    let ready = Instant::now();
    while probe
        .append_events(AppendEventsRequest {
            events: vec![wire_event(0)],
        })
        .await
        .is_err()
    {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(30),
            "the audit service did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let per_producer = total / PRODUCERS;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PRODUCERS {
        let mut client = AuditIngestServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < per_producer {
                let n = BATCH.min(per_producer - sent);
                let events = (0..n)
                    .map(|i| wire_event(p * per_producer + sent + i))
                    .collect();
                client.append_events(AppendEventsRequest { events }).await?;
                sent += n;
            }
            Ok::<(), tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    shutdown.cancel();
    server.await??;
    Ok((per_producer * PRODUCERS) as f64 / elapsed.as_secs_f64())
}

/// The durability floor: the same events, encoded, appended to one file with
/// one fdatasync per batch.
fn file_appends(total: usize, dir: &std::path::Path) -> anyhow::Result<f64> {
    let mut file = std::fs::File::create(dir.join("floor.log"))?;
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut done = 0;
    while done < total {
        let n = BATCH.min(total - done);
        buf.clear();
        for i in 0..n {
            let e = wire_event(done + i).encode_to_vec();
            buf.extend_from_slice(&(e.len() as u32).to_le_bytes());
            buf.extend_from_slice(&e);
        }
        file.write_all(&buf)?;
        file.sync_data()?;
        done += n;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Writes an export of `total` sealed events with a signed checkpoint every
/// 1000; returns its size.
fn build_export(
    total: u64,
    signer: &CheckpointSigner,
    path: &std::path::Path,
) -> anyhow::Result<u64> {
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut prev = GENESIS_HASH.to_owned();
    let base = chrono::Utc::now();
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
        writeln!(out, "{}", to_json_line(&ExportLine::Event(e)))?;
        if seq % 1000 == 0 || seq == total {
            writeln!(
                out,
                "{}",
                to_json_line(&ExportLine::Checkpoint(signer.sign(seq, &prev)))
            )?;
        }
    }
    out.flush()?;
    drop(out);
    Ok(std::fs::metadata(path)?.len())
}

pub(crate) async fn run(
    appends: usize,
    verify_events: u64,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let dir = tempfile::Builder::new()
        .prefix("vibebox-bench-audit-")
        .tempdir()?;
    let service = service_appends(appends).await?;
    let floor_dir = dir.path().to_owned();
    let floor = tokio::task::spawn_blocking(move || file_appends(appends, &floor_dir)).await??;

    let path = dir.path().join("export.jsonl");
    let (build_s, size, verify_s, hash_s, report) = tokio::task::spawn_blocking({
        let path = path.clone();
        move || -> anyhow::Result<_> {
            let signer = CheckpointSigner::generate();
            let t = Instant::now();
            let size = build_export(verify_events, &signer, &path)?;
            let build_s = t.elapsed().as_secs_f64();
            // Baseline: read and SHA-256 the file once.
            let t = Instant::now();
            let mut reader = BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?);
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            std::hint::black_box(hasher.finalize());
            let hash_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let report = verify_export(
                BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?),
                &signer.verifying_key(),
            )?;
            let verify_s = t.elapsed().as_secs_f64();
            Ok((build_s, size, verify_s, hash_s, report))
        }
    })
    .await??;
    anyhow::ensure!(report.ok, "the export did not verify: {report:?}");
    anyhow::ensure!(report.events_checked == verify_events);

    let figures = vec![
        Figure::new(
            "audit.appends",
            "durable audit appends/s (gRPC ingest, SQLite)",
            service,
            Unit::PerSecond,
        )
        .baseline("file + fdatasync per batch", floor)
        .note(format!(
            "{appends} events, {PRODUCERS} producers, batches of {BATCH}, mTLS, synchronous=FULL"
        )),
        Figure::new(
            "audit.verify_1m",
            format!("audit chain verification of {verify_events} events"),
            verify_s,
            Unit::Seconds,
        )
        .baseline("read + SHA-256 of the export", hash_s)
        .value_below(30.0)
        .note(format!(
            "export of {:.0} MiB ({} checkpoints) built in {build_s:.1} s; every hash, link and checkpoint signature checked",
            size as f64 / (1024.0 * 1024.0),
            report.checkpoints_verified
        )),
    ];
    Ok((
        figures,
        serde_json::json!({
            "appends": appends,
            "service_per_s": service,
            "file_floor_per_s": floor,
            "verify_events": verify_events,
            "export_bytes": size,
            "build_s": build_s,
            "verify_s": verify_s,
            "read_hash_s": hash_s,
        }),
    ))
}
