//! `vibebox env logs`: print (or follow) an environment's output.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use vibebox_proto::environment::{OutputStream, StreamLogsRequest};

use crate::client::{CallError, CallExt, Session};
use crate::cmd::env::resolve_env;
use crate::output;

#[derive(Args, Debug)]
pub(crate) struct LogsArgs {
    /// Environment id or name.
    env: String,
    /// Keep streaming new output.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    tail: Option<u32>,
    /// Only since a time (RFC 3339) or a duration ago (30s, 10m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
    /// Prefix each line with its time.
    #[arg(short, long)]
    timestamps: bool,
}

/// `vibebox env logs`.
pub(crate) async fn run(a: LogsArgs, session: &Session) -> Result<()> {
    let id = resolve_env(session, &a.env).await?;
    let since_time = a
        .since
        .as_deref()
        .map(output::parse_since)
        .transpose()?
        .map(output::to_proto);
    let mut stream = session
        .environments()
        .stream_logs(StreamLogsRequest {
            environment_id: id,
            follow: a.follow,
            tail_lines: a.tail,
            since_time,
            timestamps: a.timestamps,
            include_stdout: true,
            include_stderr: true,
        })
        .await
        .call()?;
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    while let Some(chunk) = stream.message().await.map_err(CallError)? {
        let w: &mut dyn Write = if chunk.stream == OutputStream::Stderr as i32 {
            &mut err
        } else {
            &mut out
        };
        if a.timestamps && chunk.time.is_some() {
            write!(w, "{} ", output::time(chunk.time.as_ref()))?;
        }
        w.write_all(&chunk.data)?;
        w.flush()?;
    }
    Ok(())
}
