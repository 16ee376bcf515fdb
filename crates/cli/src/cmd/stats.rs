//! `vibebox env stats`: resource usage, once or as a stream (`--follow`).

use std::io::Write as _;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use vibebox_proto::environment::StreamStatsRequest;

use crate::client::{CallError, CallExt, Session};
use crate::cmd::env::resolve_env;
use crate::output::{self, Format};

#[derive(Args, Debug)]
pub(crate) struct StatsArgs {
    /// Environment id or name.
    env: String,
    /// Keep streaming samples.
    #[arg(short, long)]
    follow: bool,
}

#[derive(Serialize)]
struct StatsView {
    time: String,
    cpu_percent: f64,
    memory_usage_bytes: u64,
    memory_limit_bytes: u64,
    pids: u64,
    network_rx_bytes: u64,
    network_tx_bytes: u64,
}

/// `vibebox env stats`.
pub(crate) async fn run(a: StatsArgs, session: &Session, format: Format) -> Result<()> {
    let id = resolve_env(session, &a.env).await?;
    let mut stream = session
        .environments()
        .stream_stats(StreamStatsRequest {
            environment_id: id,
            one_shot: !a.follow,
        })
        .await
        .call()?;
    let mut table = StatsTable::default();
    while let Some(s) = stream.message().await.map_err(CallError)? {
        let v = StatsView {
            time: output::time(s.time.as_ref()),
            cpu_percent: s.cpu_percent,
            memory_usage_bytes: s.memory_usage_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            pids: s.pids,
            network_rx_bytes: s.network_rx_bytes,
            network_tx_bytes: s.network_tx_bytes,
        };
        if format == Format::Json {
            println!("{}", serde_json::to_string(&v)?);
            continue;
        }
        for line in table.lines(&v) {
            println!("{line}");
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

const HEADERS: [&str; 5] = ["TIME", "CPU", "MEMORY", "PIDS", "NET RX / TX"];

/// The cells of one sample.
fn cells(v: &StatsView) -> Vec<String> {
    vec![
        v.time.clone(),
        format!("{:.2}%", v.cpu_percent),
        format!(
            "{} / {}",
            output::bytes(v.memory_usage_bytes),
            output::bytes(v.memory_limit_bytes)
        ),
        v.pids.to_string(),
        format!(
            "{} / {}",
            output::bytes(v.network_rx_bytes),
            output::bytes(v.network_tx_bytes)
        ),
    ]
}

/// The widest cells [`cells`] makes short of absurd values: an RFC 3339
/// time, `9999.99%` (100 CPUs), `1023.9 MiB / 1023.9 GiB` (`output::bytes`
/// is at most 10 characters below 1024 TiB), a pid count up to the kernel's
/// 4194304; the last column needs no padding.
const WIDTHS: [usize; 5] = [20, 8, 23, 7, 0];

/// The human table: the header before the first sample, then one line a
/// sample, all through one [`output::Columns`] of fixed widths, so the rows
/// of `--follow` stay under the header whatever values come later.
struct StatsTable {
    columns: output::Columns,
    header_done: bool,
}

impl Default for StatsTable {
    fn default() -> Self {
        Self {
            columns: output::Columns::fixed(&HEADERS, &WIDTHS),
            header_done: false,
        }
    }
}

impl StatsTable {
    fn lines(&mut self, v: &StatsView) -> Vec<String> {
        let mut lines = Vec::with_capacity(2);
        if !self.header_done {
            self.header_done = true;
            lines.push(self.columns.line(&HEADERS));
        }
        lines.push(self.columns.line(&cells(v)));
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cpu: f64, mem: u64, pids: u64, net: u64) -> StatsView {
        StatsView {
            time: "2024-05-01T10:00:00Z".to_owned(),
            cpu_percent: cpu,
            memory_usage_bytes: mem,
            memory_limit_bytes: 512 << 20,
            pids,
            network_rx_bytes: net,
            network_tx_bytes: net,
        }
    }

    /// Where each header starts in the header line.
    fn starts(header: &str) -> Vec<usize> {
        HEADERS.iter().map(|h| header.find(h).unwrap()).collect()
    }

    #[test]
    fn follow_rows_stay_under_their_headers() {
        let mut table = StatsTable::default();
        // Small first sample, then wider values (and back), as `--follow` sees.
        let samples = [
            sample(0.0, 512, 1, 0),
            sample(123.45, 300 << 20, 1234, 5 << 30),
            sample(3.5, 1 << 20, 12, 900),
            sample(1600.0, 511 << 20, 65535, 1023 << 30),
        ];
        let mut lines = Vec::new();
        for s in &samples {
            lines.extend(table.lines(s));
        }
        assert_eq!(lines.len(), samples.len() + 1, "{lines:#?}");
        let header = &lines[0];
        let starts = starts(header);
        for (line, s) in lines[1..].iter().zip(&samples) {
            let want = cells(s);
            let chars: Vec<char> = line.chars().collect();
            for (i, start) in starts.iter().enumerate() {
                let end = starts.get(i + 1).copied().unwrap_or(chars.len());
                assert!(
                    end <= chars.len(),
                    "row shorter than its columns:\n{header}\n{line}"
                );
                let cell: String = chars[*start..end].iter().collect();
                assert_eq!(
                    cell.trim_end(),
                    want[i],
                    "column {} drifts from its header:\n{header}\n{line}",
                    HEADERS[i]
                );
                if *start > 0 {
                    assert_eq!(
                        chars[start - 1],
                        ' ',
                        "no gap before {}:\n{line}",
                        HEADERS[i]
                    );
                }
            }
        }
    }

    #[test]
    fn one_sample_prints_header_and_row() {
        let lines = StatsTable::default().lines(&sample(1.0, 2048, 3, 4));
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("TIME"));
        assert!(lines[1].starts_with("2024-05-01T10:00:00Z"));
    }
}
