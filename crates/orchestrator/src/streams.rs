//! Streaming operations on an environment's container: logs (stdout and
//! stderr kept apart), exec (TTY with stdin and resize, or separate streams;
//! audited at start and end with the exit code) and resource stats.

use std::collections::BTreeMap;
use std::pin::Pin;

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::{
    LogsOptionsBuilder, ResizeExecOptionsBuilder, StatsOptionsBuilder,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use vibebox_proto::audit::{Outcome, Severity};

use crate::audit::{Caller, Event};
use crate::service::{Error, Orchestrator, Result};

/// Boxed stream of results.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T>> + Send>>;

/// Which output stream bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// Options of a log stream.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    pub follow: bool,
    pub tail: Option<u32>,
    /// Unix seconds.
    pub since: Option<i64>,
    pub timestamps: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// One piece of log output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub stream: Output,
    pub data: Bytes,
    /// The engine's timestamp when asked for (RFC 3339).
    pub time: Option<chrono::DateTime<chrono::Utc>>,
}

/// The first message of an exec.
#[derive(Debug, Clone, Default)]
pub struct ExecStart {
    pub environment_id: String,
    pub command: Vec<String>,
    pub tty: bool,
    pub env: BTreeMap<String, String>,
    pub working_dir: String,
    /// (rows, columns)
    pub size: Option<(u16, u16)>,
    pub stdin: bool,
}

/// Input to a running exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecInput {
    Stdin(Bytes),
    Resize(u16, u16),
    CloseStdin,
}

/// Output of a running exec; `Exit` is last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(i32),
}

/// One stats sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSample {
    pub time: Option<chrono::DateTime<chrono::Utc>>,
    pub cpu_percent: f64,
    pub memory_usage_bytes: u64,
    pub memory_limit_bytes: u64,
    pub pids: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
}

fn split_timestamp(data: Bytes) -> (Option<chrono::DateTime<chrono::Utc>>, Bytes) {
    if let Some(sp) = data.iter().position(|b| *b == b' ')
        && let Ok(s) = std::str::from_utf8(&data[..sp])
        && let Ok(t) = chrono::DateTime::parse_from_rfc3339(s)
    {
        return (Some(t.with_timezone(&chrono::Utc)), data.slice(sp + 1..));
    }
    (None, data)
}

/// Log chunks ready at once that may become one message.
const COALESCE_CHUNKS: usize = 64;
/// Largest coalesced log message (far below the 4 MiB gRPC limit).
const COALESCE_BYTES: usize = 256 * 1024;

/// Merges consecutive chunks of the same stream without timestamps (Docker
/// hands out one chunk per line, and per-message overhead dominated log
/// streaming); order and bytes are kept, errors end a merge.
fn coalesce(batch: Vec<Result<LogChunk>>) -> Vec<Result<LogChunk>> {
    let mut out: Vec<Result<LogChunk>> = Vec::with_capacity(batch.len());
    let mut pending: Option<(Output, Vec<u8>)> = None;
    let flush = |pending: &mut Option<(Output, Vec<u8>)>, out: &mut Vec<Result<LogChunk>>| {
        if let Some((stream, data)) = pending.take() {
            out.push(Ok(LogChunk {
                stream,
                data: Bytes::from(data),
                time: None,
            }));
        }
    };
    for item in batch {
        match item {
            Ok(chunk) if chunk.time.is_none() => {
                if let Some((stream, data)) = &mut pending
                    && *stream == chunk.stream
                    && data.len() + chunk.data.len() <= COALESCE_BYTES
                {
                    data.extend_from_slice(&chunk.data);
                    continue;
                }
                flush(&mut pending, &mut out);
                pending = Some((chunk.stream, chunk.data.to_vec()));
            }
            other => {
                flush(&mut pending, &mut out);
                out.push(other);
            }
        }
    }
    flush(&mut pending, &mut out);
    out
}

impl Orchestrator {
    /// Streams an environment's logs.
    pub async fn logs(&self, id: &str, o: LogOptions) -> Result<BoxStream<LogChunk>> {
        let cid = self.container_of(id).await?;
        let (stdout, stderr) = if !o.stdout && !o.stderr {
            (true, true)
        } else {
            (o.stdout, o.stderr)
        };
        let mut b = LogsOptionsBuilder::new()
            .follow(o.follow)
            .stdout(stdout)
            .stderr(stderr)
            .timestamps(o.timestamps);
        if let Some(t) = o.tail {
            b = b.tail(&t.to_string());
        }
        if let Some(s) = o.since {
            b = b.since(i32::try_from(s).unwrap_or(i32::MAX));
        }
        let timestamps = o.timestamps;
        let stream = self
            .docker()
            .logs(&cid, Some(b.build()))
            .filter_map(move |item| async move {
                let (stream, data) = match item {
                    Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                        (Output::Stdout, message)
                    }
                    Ok(LogOutput::StdErr { message }) => (Output::Stderr, message),
                    Ok(LogOutput::StdIn { .. }) => return None,
                    Err(e) => return Some(Err(Error::Docker(e))),
                };
                let (time, data) = if timestamps {
                    split_timestamp(data)
                } else {
                    (None, data)
                };
                Some(Ok(LogChunk { stream, data, time }))
            })
            // Output already waiting is sent as fewer, larger messages;
            // nothing waits for more to arrive, so a follower sees each line
            // as soon as Docker hands it over.
            .ready_chunks(COALESCE_CHUNKS)
            .flat_map(|batch| futures::stream::iter(coalesce(batch)));
        Ok(Box::pin(stream))
    }

    /// Streams resource usage samples.
    pub async fn stats(&self, id: &str, one_shot: bool) -> Result<BoxStream<StatsSample>> {
        let cid = self.container_of(id).await?;
        let opts = StatsOptionsBuilder::new().stream(!one_shot).build();
        let stream = self.docker().stats(&cid, Some(opts)).map(|item| {
            let s = item?;
            let cpu = s.cpu_stats.clone().unwrap_or_default();
            let pre = s.precpu_stats.clone().unwrap_or_default();
            let total = |c: &bollard::models::ContainerCpuStats| {
                c.cpu_usage
                    .as_ref()
                    .and_then(|u| u.total_usage)
                    .unwrap_or(0)
            };
            let cpu_delta = total(&cpu).saturating_sub(total(&pre)) as f64;
            let sys_delta =
                cpu.system_cpu_usage
                    .unwrap_or(0)
                    .saturating_sub(pre.system_cpu_usage.unwrap_or(0)) as f64;
            let online = f64::from(cpu.online_cpus.unwrap_or(1).max(1));
            let cpu_percent = if sys_delta > 0.0 {
                cpu_delta / sys_delta * online * 100.0
            } else {
                0.0
            };
            let mem = s.memory_stats.clone().unwrap_or_default();
            let (rx, tx) = s
                .networks
                .iter()
                .flatten()
                .fold((0, 0), |(rx, tx), (_, n)| {
                    (rx + n.rx_bytes.unwrap_or(0), tx + n.tx_bytes.unwrap_or(0))
                });
            Ok(StatsSample {
                time: Some(chrono::Utc::now()),
                cpu_percent,
                memory_usage_bytes: mem.usage.unwrap_or(0),
                memory_limit_bytes: mem.limit.unwrap_or(0),
                pids: s.pids_stats.and_then(|p| p.current).unwrap_or(0),
                network_rx_bytes: rx,
                network_tx_bytes: tx,
            })
        });
        let stream = if one_shot {
            Box::pin(stream.take(1)) as BoxStream<StatsSample>
        } else {
            Box::pin(stream)
        };
        Ok(stream)
    }

    /// Runs a command in an environment. `input` feeds stdin and resizes; the
    /// returned stream ends with [`ExecOutput::Exit`].
    pub async fn exec<I>(
        &self,
        caller: &Caller,
        start: ExecStart,
        input: I,
    ) -> Result<BoxStream<ExecOutput>>
    where
        I: Stream<Item = ExecInput> + Send + Unpin + 'static,
    {
        if start.command.is_empty() {
            return Err(Error::InvalidArgument {
                field: "command",
                reason: "must not be empty".into(),
            });
        }
        let rec = self.get(&start.environment_id).await?;
        // An open exec is activity: the environment is not idle until it
        // ends. Taken first: refused while an automatic stop is under way.
        let session = self.live_session(&rec.id, "exec")?;
        // Not while an operation is in progress (a start, a stop, ...).
        crate::operations::not_in_progress(&rec, "exec")?;
        let cid = self.container_of(&start.environment_id).await?;
        let command = start.command.join(" ");
        self.audit()
            .record(Event {
                action: "exec.start",
                outcome: Outcome::Success,
                severity: Severity::Low,
                caller: Some(caller),
                team_id: &rec.team_id,
                environment_id: &rec.id,
                details: vec![("command", command.clone()), ("tty", start.tty.to_string())],
            })
            .await?;
        let env: Vec<String> = start.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let created = self
            .docker()
            .create_exec(
                &cid,
                CreateExecOptions::<String> {
                    attach_stdin: Some(start.stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(start.tty),
                    env: (!env.is_empty()).then_some(env),
                    cmd: Some(start.command.clone()),
                    working_dir: (!start.working_dir.is_empty()).then(|| start.working_dir.clone()),
                    ..Default::default()
                },
            )
            .await?;
        let exec_id = created.id;
        let started = self
            .docker()
            .start_exec(
                &exec_id,
                Some(StartExecOptions {
                    detach: false,
                    tty: start.tty,
                    output_capacity: None,
                }),
            )
            .await?;
        let StartExecResults::Attached {
            mut output,
            input: mut stdin,
        } = started
        else {
            return Err(Error::InvalidArgument {
                field: "start",
                reason: "exec detached unexpectedly".into(),
            });
        };
        if let Some((rows, cols)) = start.size
            && start.tty
        {
            let _ = self
                .docker()
                .resize_exec(
                    &exec_id,
                    ResizeExecOptionsBuilder::new()
                        .h(i32::from(rows))
                        .w(i32::from(cols))
                        .build(),
                )
                .await;
        }

        // Input pump: stdin bytes and resizes.
        let docker = self.docker().clone();
        let resize_id = exec_id.clone();
        let mut input = input;
        let input_task = tokio::spawn(async move {
            while let Some(msg) = input.next().await {
                match msg {
                    ExecInput::Stdin(b) => {
                        if stdin.write_all(&b).await.is_err() {
                            break;
                        }
                        let _ = stdin.flush().await;
                    }
                    ExecInput::Resize(rows, cols) => {
                        let _ = docker
                            .resize_exec(
                                &resize_id,
                                ResizeExecOptionsBuilder::new()
                                    .h(i32::from(rows))
                                    .w(i32::from(cols))
                                    .build(),
                            )
                            .await;
                    }
                    ExecInput::CloseStdin => {
                        let _ = stdin.shutdown().await;
                        break;
                    }
                }
            }
        });

        let (tx, rx) = mpsc::channel::<Result<ExecOutput>>(64);
        let this = self.clone();
        let caller = caller.clone();
        // The session outlives the call: keep its span, so that `exec.end`
        // carries the request's trace id like `exec.start`.
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                while let Some(item) = output.next().await {
                    let out = match item {
                        Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                            ExecOutput::Stdout(message)
                        }
                        Ok(LogOutput::StdErr { message }) => ExecOutput::Stderr(message),
                        Ok(LogOutput::StdIn { .. }) => continue,
                        Err(e) => {
                            let _ = tx.send(Err(Error::Docker(e))).await;
                            break;
                        }
                    };
                    if tx.send(Ok(out)).await.is_err() {
                        break;
                    }
                }
                input_task.abort();
                let mut code = -1;
                for _ in 0..50 {
                    match this.docker().inspect_exec(&exec_id).await {
                        Ok(i) if i.running == Some(true) => {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        Ok(i) => {
                            code = i.exit_code.unwrap_or(-1) as i32;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let audited = this
                    .audit()
                    .record(Event {
                        action: "exec.end",
                        outcome: Outcome::Success,
                        severity: Severity::Low,
                        caller: Some(&caller),
                        team_id: &rec.team_id,
                        environment_id: &rec.id,
                        details: vec![("command", command), ("exit_code", code.to_string())],
                    })
                    .await;
                let last = match audited {
                    Ok(()) => Ok(ExecOutput::Exit(code)),
                    Err(e) => Err(Error::Audit(e)),
                };
                let _ = tx.send(last).await;
                drop(session);
            },
            span,
        ));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(stream: Output, data: &str) -> Result<LogChunk> {
        Ok(LogChunk {
            stream,
            data: Bytes::from(data.to_owned()),
            time: None,
        })
    }

    fn flatten(chunks: &[Result<LogChunk>]) -> Vec<(Output, String)> {
        chunks
            .iter()
            .map(|c| {
                let c = c.as_ref().expect("no error");
                (c.stream, String::from_utf8_lossy(&c.data).into_owned())
            })
            .collect()
    }

    #[test]
    fn coalescing_merges_runs_of_one_stream_and_keeps_order() {
        let out = coalesce(vec![
            chunk(Output::Stdout, "a\n"),
            chunk(Output::Stdout, "b\n"),
            chunk(Output::Stderr, "oops\n"),
            chunk(Output::Stdout, "c\n"),
            chunk(Output::Stdout, "d\n"),
        ]);
        assert_eq!(
            flatten(&out),
            vec![
                (Output::Stdout, "a\nb\n".to_owned()),
                (Output::Stderr, "oops\n".to_owned()),
                (Output::Stdout, "c\nd\n".to_owned()),
            ]
        );
    }

    #[test]
    fn coalescing_keeps_timestamped_chunks_and_errors_apart() {
        let stamped = Ok(LogChunk {
            stream: Output::Stdout,
            data: Bytes::from_static(b"t\n"),
            time: Some(chrono::Utc::now()),
        });
        let out = coalesce(vec![
            chunk(Output::Stdout, "a\n"),
            stamped,
            chunk(Output::Stdout, "b\n"),
            Err(Error::InvalidArgument {
                field: "x",
                reason: "y".into(),
            }),
            chunk(Output::Stdout, "c\n"),
        ]);
        assert_eq!(
            out.len(),
            5,
            "nothing merges across a timestamp or an error"
        );
        assert!(out[1].as_ref().unwrap().time.is_some());
        assert!(out[3].is_err());
    }

    #[test]
    fn coalescing_caps_message_size() {
        let line = "x".repeat(100 * 1024);
        let out = coalesce((0..5).map(|_| chunk(Output::Stdout, &line)).collect());
        assert!(out.len() >= 2);
        let total: usize = out.iter().map(|c| c.as_ref().unwrap().data.len()).sum();
        assert_eq!(total, 5 * line.len());
        assert!(
            out.iter()
                .all(|c| c.as_ref().unwrap().data.len() <= COALESCE_BYTES)
        );
    }
}
