//! Port forwarding: bulk throughput and small round trips through
//! `PortForward` (client -> gateway -> orchestrator -> Docker exec of the
//! connect helper in the forwarder, which shares the environment's network
//! namespace -> 127.0.0.1:PORT) next to a direct TCP connection from the
//! host to the same servers in a container of the same image and limits on
//! a plain Docker bridge network.
//!
//! The direct path is the fairest one the host has: an environment's own
//! network is internal and carries no host address (the host cannot reach
//! it at all, which is why forwarding exists), so the baseline container
//! sits on the default bridge, the path `docker run -p` or a developer's
//! local container would take. Both sides run the same busybox servers
//! (`nc -ll -e`): `dd` of N MiB in 64 KiB writes for downloads, `cat >/dev/null` for
//! uploads and `cat` for the echo. Throughput counts from the first byte to
//! the last (connection setup is reported apart); round trips are 64-byte
//! echoes on one open connection, alternating the two paths in rounds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use vibebox_proto::environment::{
    ContainerSpec, PortForwardRequest, PortForwardResponse, PortForwardStart, port_forward_request,
    port_forward_response,
};

use crate::ctx::Ctx;
use crate::platform::RUN_LABEL;
use crate::report::{Figure, Unit};
use crate::stats::Summary;

const MIB: f64 = 1024.0 * 1024.0;
const DOWNLOAD_PORT: u16 = 9100;
const UPLOAD_PORT: u16 = 9101;
const ECHO_PORT: u16 = 9102;
/// Bytes of one echo round trip.
const ECHO_BYTES: usize = 64;
const WARMUP: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(60);
/// Upload chunk (a message on the forward, a write on the direct path).
const CHUNK: usize = 64 * 1024;

/// The servers, for `mib` MiB downloads.
fn command(mib: usize) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "nc -ll -p {DOWNLOAD_PORT} -e sh -c 'dd if=/dev/zero bs=65536 count={} 2>/dev/null' & \
             nc -ll -p {UPLOAD_PORT} -e sh -c 'cat >/dev/null; echo done' & \
             nc -ll -p {ECHO_PORT} -e cat & \
             exec sleep 2147483647",
            mib * 16
        ),
    ]
}

/// Both sides' limits.
const CPU: f64 = 1.0;
const MEMORY_MB: i64 = 64;

/// Settings of the section.
pub(crate) struct ForwardSettings {
    pub(crate) mib: usize,
    pub(crate) rounds: usize,
    pub(crate) round_trips: usize,
}

pub(crate) async fn run(
    ctx: &Ctx,
    s: ForwardSettings,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let cmd = command(s.mib);
    let spec = ContainerSpec {
        cpu_limit: Some(CPU),
        memory_limit_mb: Some(MEMORY_MB),
        ..ctx.spec(&cmd.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let env = ctx.create("bench-forward", spec).await?;
    let direct = DirectContainer::start(ctx, &cmd).await?;
    let result = measure(ctx, &env.id, &direct.address, &s).await;
    direct.remove(ctx).await;
    ctx.delete(&env.id).await?;
    result
}

async fn measure(
    ctx: &Ctx,
    env: &str,
    direct: &str,
    s: &ForwardSettings,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let want = (s.mib * 1024 * 1024) as u64;
    // Servers up, forwarder made and helper image in the page cache: one
    // warm-up transfer each way (also waits for the servers to listen).
    wait_until_up(ctx, env, direct).await?;
    let mut setup = Vec::new();
    let (mut fwd_down, mut dir_down, mut exec_down) = (Vec::new(), Vec::new(), Vec::new());
    let (mut fwd_up, mut dir_up, mut exec_up) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..s.rounds.max(1) {
        let (bytes, t, opened) = forward_download(ctx, env).await?;
        anyhow::ensure!(
            bytes == want,
            "the forward delivered {bytes} of {want} bytes"
        );
        fwd_down.push(bytes as f64 / MIB / t.as_secs_f64());
        setup.push(opened);
        let (bytes, t) = direct_download(direct).await?;
        anyhow::ensure!(
            bytes == want,
            "the direct path delivered {bytes} of {want} bytes"
        );
        dir_down.push(bytes as f64 / MIB / t.as_secs_f64());
        let t = forward_upload(ctx, env, want).await?;
        fwd_up.push(want as f64 / MIB / t.as_secs_f64());
        let t = direct_upload(direct, want).await?;
        dir_up.push(want as f64 / MIB / t.as_secs_f64());
        let (bytes, t) = exec_download(ctx, env).await?;
        anyhow::ensure!(
            bytes == want,
            "the Docker exec delivered {bytes} of {want} bytes"
        );
        exec_down.push(bytes as f64 / MIB / t.as_secs_f64());
        let t = exec_upload(ctx, env, want).await?;
        exec_up.push(want as f64 / MIB / t.as_secs_f64());
    }
    let mut through = Vec::new();
    let mut plain = Vec::new();
    let rounds = 4;
    for _ in 0..rounds {
        through.extend(forward_round_trips(ctx, env, s.round_trips / rounds).await?);
        plain.extend(direct_round_trips(direct, s.round_trips / rounds).await?);
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (fd, dd, ed) = (median(&fwd_down), median(&dir_down), median(&exec_down));
    let (fu, du, eu) = (median(&fwd_up), median(&dir_up), median(&exec_up));
    let g = Summary::of(&through);
    let d = Summary::of(&plain);
    let setup = Summary::of(&setup);
    let figures = vec![
        Figure::new(
            "forward.download",
            "port-forward download throughput (PortForward via gateway)",
            fd,
            Unit::MibPerSecond,
        )
        .baseline("direct TCP to a bridge container", dd)
        .ratio_at_least(0.5)
        .note(format!(
            "{} MiB from `dd bs=64k` behind `nc`, first byte to last, median of {} each way; connection setup (open to first byte) p50 {:.1} ms",
            s.mib,
            s.rounds.max(1),
            setup.p50
        )),
        Figure::new(
            "forward.download_vs_engine",
            "port-forward download throughput vs its engine path",
            fd,
            Unit::MibPerSecond,
        )
        .baseline("the same helper's Docker exec attached directly", ed)
        .note(
            "what the platform (gateway, orchestrator, two gRPC hops) costs over the engine path it wraps: \
             the same `gate connect` exec in the forwarder, attached over the Docker API by this process",
        ),
        Figure::new(
            "forward.upload",
            "port-forward upload throughput (PortForward via gateway)",
            fu,
            Unit::MibPerSecond,
        )
        .baseline("direct TCP to a bridge container", du)
        .ratio_at_least(0.5)
        .note(format!(
            "{} MiB in 64 KiB messages to `cat >/dev/null`, until the server's answer after the half close",
            s.mib
        )),
        Figure::new(
            "forward.upload_vs_engine",
            "port-forward upload throughput vs its engine path",
            fu,
            Unit::MibPerSecond,
        )
        .baseline("the same helper's Docker exec attached directly", eu),
        Figure::new(
            "forward.p50",
            "port-forward 64-byte echo round trip p50",
            g.p50,
            Unit::Millis,
        )
        .baseline("direct TCP to a bridge container", d.p50)
        .value_below(d.p50 + 1.0)
        .note(format!(
            "goal: under 1 ms added at p50 (added {:.3} ms); {} round trips each way on one connection, p95 forward {:.3} ms vs direct {:.3} ms",
            g.p50 - d.p50,
            g.n,
            g.p95,
            d.p95
        )),
    ];
    Ok((
        figures,
        serde_json::json!({
            "mib": s.mib,
            "forward_download_mib_s": fwd_down,
            "direct_download_mib_s": dir_down,
            "forward_upload_mib_s": fwd_up,
            "direct_upload_mib_s": dir_up,
            "engine_exec_download_mib_s": exec_down,
            "engine_exec_upload_mib_s": exec_up,
            "setup_ms": setup,
            "forward_round_trip_ms": g,
            "direct_round_trip_ms": d,
            "added_p50_ms": g.p50 - d.p50,
        }),
    ))
}

/// The baseline: the same image, command and limits on the default bridge.
struct DirectContainer {
    id: String,
    /// `ip` (ports as above).
    address: String,
}

impl DirectContainer {
    async fn start(ctx: &Ctx, cmd: &[String]) -> anyhow::Result<Self> {
        let name = format!("vibebox-bench-direct-{}", ctx.run_id);
        let body = ContainerCreateBody {
            image: Some(ctx.image.clone()),
            cmd: Some(cmd.to_vec()),
            user: Some("1000:1000".into()),
            labels: Some(HashMap::from([(RUN_LABEL.to_owned(), ctx.run_id.clone())])),
            host_config: Some(HostConfig {
                network_mode: Some("bridge".into()),
                nano_cpus: Some((CPU * 1e9) as i64),
                memory: Some(MEMORY_MB * 1024 * 1024),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                init: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = ctx
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::new().name(&name).build()),
                body,
            )
            .await
            .context("creating the direct baseline's container")?;
        ctx.docker.start_container(&created.id, None).await?;
        let inspected = ctx.docker.inspect_container(&created.id, None).await?;
        let address = inspected
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|n| n.get("bridge").and_then(|b| b.ip_address.clone()))
            .filter(|ip| !ip.is_empty())
            .context("the baseline container has no bridge address")?;
        Ok(Self {
            id: created.id,
            address,
        })
    }

    async fn remove(self, ctx: &Ctx) {
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        let _ = ctx.docker.remove_container(&self.id, Some(options)).await;
    }
}

fn start(env: &str, port: u16) -> PortForwardRequest {
    PortForwardRequest {
        message: Some(port_forward_request::Message::Start(PortForwardStart {
            environment_id: env.to_owned(),
            port: port.into(),
        })),
    }
}

fn data(bytes: Vec<u8>) -> PortForwardRequest {
    PortForwardRequest {
        message: Some(port_forward_request::Message::Data(bytes)),
    }
}

fn close_write() -> PortForwardRequest {
    PortForwardRequest {
        message: Some(port_forward_request::Message::CloseWrite(true)),
    }
}

/// Opens a forward; its input and output once `ready` came.
async fn open(
    ctx: &Ctx,
    env: &str,
    port: u16,
) -> anyhow::Result<(
    mpsc::Sender<PortForwardRequest>,
    Streaming<PortForwardResponse>,
)> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(start(env, port)).await?;
    let mut stream = ctx
        .environments()
        .port_forward(ReceiverStream::new(rx))
        .await
        .context("PortForward through the gateway")?
        .into_inner();
    match stream.message().await? {
        Some(PortForwardResponse {
            message: Some(port_forward_response::Message::Ready(true)),
        }) => Ok((tx, stream)),
        other => bail!("the forward answered {other:?} instead of ready"),
    }
}

/// Next data message (`None` at the end).
async fn next_data(stream: &mut Streaming<PortForwardResponse>) -> anyhow::Result<Option<Vec<u8>>> {
    match tokio::time::timeout(TIMEOUT, stream.message())
        .await
        .context("the forward stalled")??
    {
        None => Ok(None),
        Some(PortForwardResponse {
            message: Some(port_forward_response::Message::Data(b)),
        }) => Ok(Some(b)),
        Some(other) => bail!("unexpected {other:?}"),
    }
}

/// Retries a small echo on both paths until both servers answer.
async fn wait_until_up(ctx: &Ctx, env: &str, direct: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let forwarded = async {
            let (tx, mut rx) = open(ctx, env, ECHO_PORT).await?;
            tx.send(data(vec![b'x'])).await?;
            anyhow::ensure!(next_data(&mut rx).await?.is_some(), "no echo");
            anyhow::Ok(())
        }
        .await;
        let plain = async {
            let mut conn = tokio::net::TcpStream::connect((direct, ECHO_PORT)).await?;
            conn.write_all(b"x").await?;
            let mut b = [0u8; 1];
            conn.read_exact(&mut b).await?;
            anyhow::Ok(())
        }
        .await;
        match (forwarded, plain) {
            (Ok(()), Ok(())) => return Ok(()),
            (f, p) if Instant::now() > deadline => {
                bail!("the servers did not come up: forward {f:?}, direct {p:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Bytes, first-to-last-byte time, and open-to-first-byte time.
async fn forward_download(ctx: &Ctx, env: &str) -> anyhow::Result<(u64, Duration, Duration)> {
    let t = Instant::now();
    let (tx, mut rx) = open(ctx, env, DOWNLOAD_PORT).await?;
    tx.send(close_write()).await?;
    let Some(first) = next_data(&mut rx).await? else {
        bail!("the download ended before its first byte");
    };
    let opened = t.elapsed();
    let t = Instant::now();
    let mut bytes = first.len() as u64;
    while let Some(b) = next_data(&mut rx).await? {
        bytes += b.len() as u64;
    }
    Ok((bytes, t.elapsed(), opened))
}

async fn direct_download(address: &str) -> anyhow::Result<(u64, Duration)> {
    let mut conn = tokio::net::TcpStream::connect((address, DOWNLOAD_PORT)).await?;
    conn.shutdown().await?;
    let mut buf = vec![0u8; 256 * 1024];
    let n = conn.read(&mut buf).await?;
    anyhow::ensure!(n > 0, "the direct download ended before its first byte");
    let t = Instant::now();
    let mut bytes = n as u64;
    loop {
        let n = tokio::time::timeout(TIMEOUT, conn.read(&mut buf))
            .await
            .context("the direct download stalled")??;
        if n == 0 {
            return Ok((bytes, t.elapsed()));
        }
        bytes += n as u64;
    }
}

type ExecOutput = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
>;
type ExecInput = std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// The engine path alone: the connect helper exec'd in the environment's
/// forwarder, attached here over the Docker API.
async fn exec_attach(ctx: &Ctx, env: &str, port: u16) -> anyhow::Result<(ExecOutput, ExecInput)> {
    let created = ctx
        .docker
        .create_exec(
            &vibebox_orchestrator::forward::forwarder_name(env),
            CreateExecOptions::<String> {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(false),
                cmd: Some(vibebox_orchestrator::forward::connect_command(port)),
                ..Default::default()
            },
        )
        .await
        .context("exec in the forwarder")?;
    match ctx
        .docker
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: false,
                tty: false,
                output_capacity: Some(128 * 1024),
            }),
        )
        .await?
    {
        StartExecResults::Attached { output, input } => Ok((output, input)),
        StartExecResults::Detached => bail!("the exec detached"),
    }
}

/// The helper's stdout until it ends (a failure on stderr is an error).
async fn exec_read(
    output: &mut ExecOutput,
    mut each: impl FnMut(usize),
) -> anyhow::Result<Vec<u8>> {
    let mut kept = Vec::new();
    while let Some(frame) = tokio::time::timeout(TIMEOUT, output.next())
        .await
        .context("the exec stalled")?
    {
        match frame? {
            LogOutput::StdOut { message } => {
                each(message.len());
                if kept.len() < 64 {
                    kept.extend_from_slice(&message[..message.len().min(64)]);
                }
            }
            LogOutput::StdErr { message } => {
                bail!("the helper failed: {}", String::from_utf8_lossy(&message))
            }
            _ => {}
        }
    }
    Ok(kept)
}

/// Download over the engine path (first byte to last).
async fn exec_download(ctx: &Ctx, env: &str) -> anyhow::Result<(u64, Duration)> {
    let (mut output, mut input) = exec_attach(ctx, env, DOWNLOAD_PORT).await?;
    input.shutdown().await?;
    let mut bytes = 0u64;
    let mut started = None;
    exec_read(&mut output, |n| {
        started.get_or_insert_with(Instant::now);
        bytes += n as u64;
    })
    .await?;
    Ok((bytes, started.map(|t| t.elapsed()).unwrap_or_default()))
}

/// Upload over the engine path (first byte to the server's answer).
async fn exec_upload(ctx: &Ctx, env: &str, bytes: u64) -> anyhow::Result<Duration> {
    let (mut output, mut input) = exec_attach(ctx, env, UPLOAD_PORT).await?;
    let chunk = vec![0u8; CHUNK];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = CHUNK.min((bytes - sent) as usize);
        input.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    input.shutdown().await?;
    let answer = exec_read(&mut output, |_| {}).await?;
    anyhow::ensure!(answer == b"done\n", "the upload server answered {answer:?}");
    Ok(t.elapsed())
}

/// Time from the first byte sent to the server's answer after the half close.
async fn forward_upload(ctx: &Ctx, env: &str, bytes: u64) -> anyhow::Result<Duration> {
    let (tx, mut rx) = open(ctx, env, UPLOAD_PORT).await?;
    let chunk = vec![0u8; CHUNK];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = CHUNK.min((bytes - sent) as usize);
        tx.send(data(chunk[..n].to_vec())).await?;
        sent += n as u64;
    }
    tx.send(close_write()).await?;
    let mut answer = Vec::new();
    while let Some(b) = next_data(&mut rx).await? {
        answer.extend(b);
    }
    anyhow::ensure!(answer == b"done\n", "the upload server answered {answer:?}");
    Ok(t.elapsed())
}

async fn direct_upload(address: &str, bytes: u64) -> anyhow::Result<Duration> {
    let mut conn = tokio::net::TcpStream::connect((address, UPLOAD_PORT)).await?;
    let chunk = vec![0u8; CHUNK];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = CHUNK.min((bytes - sent) as usize);
        conn.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    conn.shutdown().await?;
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, conn.read_to_end(&mut answer))
        .await
        .context("the direct upload stalled")??;
    anyhow::ensure!(answer == b"done\n", "the upload server answered {answer:?}");
    Ok(t.elapsed())
}

async fn forward_round_trips(ctx: &Ctx, env: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let (tx, mut rx) = open(ctx, env, ECHO_PORT).await?;
    let payload = vec![b'x'; ECHO_BYTES];
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t = Instant::now();
        tx.send(data(payload.clone())).await?;
        let mut got = 0;
        while got < ECHO_BYTES {
            match next_data(&mut rx).await? {
                Some(b) => got += b.len(),
                None => bail!("the echo ended early"),
            }
        }
        if i >= WARMUP {
            samples.push(t.elapsed());
        }
    }
    tx.send(close_write()).await?;
    while next_data(&mut rx).await?.is_some() {}
    Ok(samples)
}

async fn direct_round_trips(address: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut conn = tokio::net::TcpStream::connect((address, ECHO_PORT)).await?;
    conn.set_nodelay(true)?;
    let payload = vec![b'x'; ECHO_BYTES];
    let mut buf = vec![0u8; ECHO_BYTES];
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t = Instant::now();
        conn.write_all(&payload).await?;
        tokio::time::timeout(TIMEOUT, conn.read_exact(&mut buf))
            .await
            .context("the direct echo stalled")??;
        if i >= WARMUP {
            samples.push(t.elapsed());
        }
    }
    Ok(samples)
}
