//! Exec round trip: one byte written to `cat` in the environment and read
//! back, through the gateway's bidirectional `Exec` stream (gateway ->
//! orchestrator -> Docker attach) next to a Docker exec attached directly.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use vibebox_proto::environment::{ExecRequest, ExecStart, exec_request, exec_response};

use crate::ctx::Ctx;
use crate::report::{Figure, Unit};
use crate::stats::Summary;

const WARMUP: usize = 20;
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn run(
    ctx: &Ctx,
    environment_id: &str,
    round_trips: usize,
) -> anyhow::Result<(Vec<Figure>, serde_json::Value)> {
    let container = vibebox_orchestrator::docker::container_name(environment_id);
    // Alternate the two paths in rounds so that drift hits both alike.
    let mut through = Vec::new();
    let mut direct = Vec::new();
    let rounds = 4;
    for _ in 0..rounds {
        through.extend(gateway_round_trips(ctx, environment_id, round_trips / rounds).await?);
        direct.extend(docker_round_trips(ctx, &container, round_trips / rounds).await?);
    }
    let g = Summary::of(&through);
    let d = Summary::of(&direct);
    let figures = vec![
        Figure::new(
            "exec.p50",
            "exec 1-byte echo round trip p50 (gateway)",
            g.p50,
            Unit::Millis,
        )
        .baseline("direct Docker exec attach", d.p50)
        .value_below(d.p50 + 1.0)
        .note(format!(
            "goal: under 1 ms added at p50 (added {:.3} ms); {} round trips each way, p95 gateway {:.3} ms vs direct {:.3} ms",
            g.p50 - d.p50,
            g.n,
            g.p95,
            d.p95
        )),
        Figure::new(
            "exec.p95",
            "exec 1-byte echo round trip p95 (gateway)",
            g.p95,
            Unit::Millis,
        )
        .baseline("direct Docker exec attach", d.p95),
    ];
    Ok((
        figures,
        serde_json::json!({ "gateway_ms": g, "direct_ms": d, "added_p50_ms": g.p50 - d.p50 }),
    ))
}

async fn gateway_round_trips(
    ctx: &Ctx,
    environment_id: &str,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<ExecRequest>(16);
    tx.send(ExecRequest {
        message: Some(exec_request::Message::Start(ExecStart {
            environment_id: environment_id.to_owned(),
            command: vec!["cat".into()],
            stdin: true,
            ..Default::default()
        })),
    })
    .await?;
    let mut output = ctx
        .environments()
        .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("Exec through the gateway")?
        .into_inner();
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t = Instant::now();
        tx.send(ExecRequest {
            message: Some(exec_request::Message::Stdin(vec![b'x'])),
        })
        .await?;
        let mut got = 0;
        while got < 1 {
            let message = tokio::time::timeout(ROUND_TRIP_TIMEOUT, output.message())
                .await
                .context("exec echo timed out")??;
            match message.and_then(|m| m.message) {
                Some(exec_response::Message::Stdout(b)) => got += b.len(),
                Some(exec_response::Message::Stderr(b)) => {
                    bail!("cat wrote to stderr: {}", String::from_utf8_lossy(&b))
                }
                Some(exec_response::Message::Exit(e)) => {
                    bail!("cat exited early with {}", e.exit_code)
                }
                None => bail!("the exec stream ended early"),
            }
        }
        if i >= WARMUP {
            samples.push(t.elapsed());
        }
    }
    tx.send(ExecRequest {
        message: Some(exec_request::Message::CloseStdin(true)),
    })
    .await?;
    drop(tx);
    // Drain to the exit message so the exec ends cleanly.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = output.message().await {}
    })
    .await;
    Ok(samples)
}

async fn docker_round_trips(ctx: &Ctx, container: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let d = &ctx.docker;
    let created = d
        .create_exec(
            container,
            CreateExecOptions::<String> {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(false),
                cmd: Some(vec!["cat".into()]),
                ..Default::default()
            },
        )
        .await?;
    let StartExecResults::Attached {
        mut output,
        mut input,
    } = d
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: false,
                tty: false,
                output_capacity: None,
            }),
        )
        .await?
    else {
        bail!("the exec detached");
    };
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t = Instant::now();
        input.write_all(b"x").await?;
        input.flush().await?;
        let mut got = 0;
        while got < 1 {
            match tokio::time::timeout(ROUND_TRIP_TIMEOUT, output.next())
                .await
                .context("exec echo timed out")?
            {
                Some(Ok(LogOutput::StdOut { message })) => got += message.len(),
                Some(Ok(LogOutput::StdErr { message })) => {
                    bail!("cat wrote to stderr: {}", String::from_utf8_lossy(&message))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("the exec stream ended early"),
            }
        }
        if i >= WARMUP {
            samples.push(t.elapsed());
        }
    }
    let _ = input.shutdown().await;
    drop(input);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while output.next().await.is_some() {}
    })
    .await;
    Ok(samples)
}
