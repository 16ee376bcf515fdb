//! `vibebox env exec`: run a command in an environment, through an
//! interactive terminal (`-it`: raw mode, resizes forwarded) or plain pipes.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vibebox_proto::environment::{
    ExecRequest, ExecStart, TerminalSize, exec_request, exec_response,
};

use crate::client::{CallError, CallExt, Session};
use crate::cmd::env::{parse_kv, resolve_env};

#[derive(Args, Debug)]
pub(crate) struct ExecArgs {
    /// Keep stdin open and forward it.
    #[arg(short, long)]
    interactive: bool,
    /// Allocate a terminal (raw mode, resizes forwarded).
    #[arg(short, long)]
    tty: bool,
    /// Environment variables KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env_vars: Vec<String>,
    /// Working directory.
    #[arg(short, long)]
    workdir: Option<String>,
    /// Environment id or name.
    env: String,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Raw mode for the lifetime of the guard: restored on drop, so on every
/// return path, error or panic (unwinding).
struct RawMode;

impl RawMode {
    fn enter() -> Result<Self> {
        crossterm::terminal::enable_raw_mode().context("cannot put the terminal in raw mode")?;
        Ok(Self)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

fn terminal_size() -> Option<TerminalSize> {
    crossterm::terminal::size()
        .ok()
        .map(|(columns, rows)| TerminalSize {
            rows: rows.into(),
            columns: columns.into(),
        })
}

/// `vibebox env exec`: exits with the remote command's status.
pub(crate) async fn run(a: ExecArgs, session: &Session) -> Result<ExitCode> {
    if a.tty && !std::io::stdin().is_terminal() {
        bail!("the input device is not a terminal: drop -t (use -i to forward stdin)");
    }
    let id = resolve_env(session, &a.env).await?;
    let (tx, rx) = mpsc::channel::<ExecRequest>(64);
    let start = ExecStart {
        environment_id: id,
        command: a.command,
        tty: a.tty,
        env: parse_kv(&a.env_vars)?,
        working_dir: a.workdir.unwrap_or_default(),
        terminal_size: if a.tty { terminal_size() } else { None },
        stdin: a.interactive,
    };
    tx.send(ExecRequest {
        message: Some(exec_request::Message::Start(start)),
    })
    .await
    .map_err(|_| anyhow!("exec stream closed"))?;
    let mut stream = session
        .environments()
        .exec(ReceiverStream::new(rx))
        .await
        .call()?;
    let _raw = if a.tty { Some(RawMode::enter()?) } else { None };

    if a.interactive {
        // A plain thread: a blocked stdin read must not keep the runtime
        // from shutting down once the remote command has exited.
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 4096];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.blocking_send(ExecRequest {
                            message: Some(exec_request::Message::CloseStdin(true)),
                        });
                        return;
                    }
                    Ok(n) => {
                        let msg = ExecRequest {
                            message: Some(exec_request::Message::Stdin(buf[..n].to_vec())),
                        };
                        if tx.blocking_send(msg).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    if a.tty {
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(mut winch) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some(size) = terminal_size()
                    && tx
                        .send(ExecRequest {
                            message: Some(exec_request::Message::Resize(size)),
                        })
                        .await
                        .is_err()
                {
                    return;
                }
            }
        });
    }

    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let code = loop {
        let Some(msg) = stream.message().await.map_err(CallError)? else {
            bail!("the exec stream ended without an exit status");
        };
        match msg.message {
            Some(exec_response::Message::Stdout(b)) => {
                out.write_all(&b)?;
                out.flush()?;
            }
            Some(exec_response::Message::Stderr(b)) => {
                err.write_all(&b)?;
                err.flush()?;
            }
            Some(exec_response::Message::Exit(e)) => break e.exit_code,
            None => {}
        }
    };
    drop(tx);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(if code < 0 {
        1
    } else {
        255
    })))
}
