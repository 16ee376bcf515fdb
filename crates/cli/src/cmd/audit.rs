//! `vibebox audit ...`: query and watch the trail, verify the chain on the
//! platform, export it, and verify an export file offline.

use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, anyhow};
use clap::{Args, Subcommand};
use serde::Serialize;
use vibebox_proto::audit::{
    AuditEvent, EventFilter, ExportEventsRequest, Outcome, QueryEventsRequest, Severity,
    VerifyChainRequest, WatchEventsRequest,
};

use crate::client::{CallError, CallExt, Session};
use crate::output::{self, Format};

/// Audit commands.
#[derive(Subcommand, Debug)]
pub(crate) enum AuditCommand {
    /// Search the trail (newest first).
    Query(QueryArgs),
    /// Stream new events as they are recorded.
    Watch(FilterArgs),
    /// Verify the hash chain and its signed checkpoints on the platform.
    Verify(RangeArgs),
    /// Export the chain (JSON lines, with checkpoints) for offline verification.
    Export(ExportArgs),
    /// Verify an export file offline against the checkpoint public key.
    VerifyFile(VerifyFileArgs),
}

#[derive(Args, Debug, Default)]
pub(crate) struct FilterArgs {
    /// Only this action, e.g. environment.create.
    #[arg(long)]
    action: Option<String>,
    /// Only this resource type, e.g. environment.
    #[arg(long)]
    resource_type: Option<String>,
    /// Only this resource id.
    #[arg(long)]
    resource: Option<String>,
    /// Only this team (id).
    #[arg(long)]
    team: Option<String>,
    /// Only this actor (user id).
    #[arg(long)]
    user: Option<String>,
    /// success, failure or denied.
    #[arg(long)]
    outcome: Option<String>,
    /// At least this severity: low, medium, high, critical.
    #[arg(long)]
    min_severity: Option<String>,
    /// Since a time (RFC 3339) or a duration ago (10m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
    /// Until a time (RFC 3339) or a duration ago.
    #[arg(long)]
    until: Option<String>,
    /// Free text search.
    #[arg(long)]
    text: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct QueryArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// At most this many events.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

#[derive(Args, Debug)]
pub(crate) struct RangeArgs {
    /// First sequence (default: the start).
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Last sequence (default: the head).
    #[arg(long, default_value_t = 0)]
    to: u64,
}

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    range: RangeArgs,
    /// Write to this file instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct VerifyFileArgs {
    /// The export file.
    file: PathBuf,
    /// The audit checkpoint public key (PEM), e.g.
    /// <data-dir>/keys/audit-checkpoint.pub.pem.
    #[arg(long)]
    key: PathBuf,
    /// The event the file starts at, for an export of a range
    /// (`audit export --from N`); a whole export starts at event 1, and a
    /// file that starts elsewhere is refused as cut.
    #[arg(long = "from", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    from: u64,
}

impl FilterArgs {
    fn to_proto(&self) -> Result<EventFilter> {
        let outcome = match self
            .outcome
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => Outcome::Unspecified,
            Some("success") => Outcome::Success,
            Some("failure") => Outcome::Failure,
            Some("denied") => Outcome::Denied,
            Some(o) => anyhow::bail!("outcome {o:?} is not success, failure or denied"),
        } as i32;
        let min_severity = match self
            .min_severity
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None => Severity::Unspecified,
            Some("low") => Severity::Low,
            Some("medium") => Severity::Medium,
            Some("high") => Severity::High,
            Some("critical") => Severity::Critical,
            Some(s) => anyhow::bail!("severity {s:?} is not low, medium, high or critical"),
        } as i32;
        let time = |s: &Option<String>| -> Result<Option<prost_types::Timestamp>> {
            Ok(s.as_deref()
                .map(output::parse_since)
                .transpose()?
                .map(output::to_proto))
        };
        Ok(EventFilter {
            start_time: time(&self.since)?,
            end_time: time(&self.until)?,
            actor_user_id: self.user.clone().unwrap_or_default(),
            team_id: self.team.clone().unwrap_or_default(),
            action: self.action.clone().unwrap_or_default(),
            resource_type: self.resource_type.clone().unwrap_or_default(),
            resource_id: self.resource.clone().unwrap_or_default(),
            outcome,
            min_severity,
            text: self.text.clone().unwrap_or_default(),
        })
    }
}

/// An audit event as printed.
#[derive(Serialize)]
struct EventView {
    sequence: u64,
    id: String,
    time: String,
    actor_user_id: String,
    actor_token_id: String,
    actor_service: String,
    team_id: String,
    action: String,
    resource_type: String,
    resource_id: String,
    outcome: String,
    severity: String,
    details: serde_json::Map<String, serde_json::Value>,
    source_service: String,
    request_id: String,
    trace_id: String,
    client_address: String,
    hash: String,
    prev_hash: String,
}

impl From<&AuditEvent> for EventView {
    fn from(e: &AuditEvent) -> Self {
        let actor = e.actor.clone().unwrap_or_default();
        Self {
            sequence: e.sequence,
            id: e.id.clone(),
            time: output::time(e.time.as_ref()),
            actor_user_id: actor.user_id,
            actor_token_id: actor.token_id,
            actor_service: actor.service,
            team_id: e.team_id.clone(),
            action: e.action.clone(),
            resource_type: e.resource_type.clone(),
            resource_id: e.resource_id.clone(),
            outcome: Outcome::try_from(e.outcome)
                .map(|o| output::enum_name(o.as_str_name(), "OUTCOME_"))
                .unwrap_or_default(),
            severity: Severity::try_from(e.severity)
                .map(|s| output::enum_name(s.as_str_name(), "SEVERITY_"))
                .unwrap_or_default(),
            details: e
                .details
                .as_ref()
                .map(vibebox_audit_chain::event::struct_to_json)
                .unwrap_or_default(),
            source_service: e.source_service.clone(),
            request_id: e.request_id.clone(),
            trace_id: e.trace_id.clone(),
            client_address: e.client_address.clone(),
            hash: e.hash.clone(),
            prev_hash: e.prev_hash.clone(),
        }
    }
}

const HEADERS: [&str; 8] = [
    "SEQ", "TIME", "ACTION", "OUTCOME", "SEVERITY", "ACTOR", "RESOURCE", "SERVICE",
];

/// Column widths for `audit watch`, which cannot measure rows it has not
/// seen: a sequence, an RFC 3339 time, the longest action names, `success`,
/// `critical`, a user id (UUID), `environment/<UUID>`; the last column needs
/// no padding.
const WATCH_WIDTHS: [usize; 8] = [6, 20, 30, 7, 8, 36, 48, 0];

fn row(v: &EventView) -> Vec<String> {
    let actor = if v.actor_user_id.is_empty() {
        v.actor_service.clone()
    } else {
        v.actor_user_id.clone()
    };
    let resource = if v.resource_id.is_empty() {
        v.resource_type.clone()
    } else {
        format!("{}/{}", v.resource_type, v.resource_id)
    };
    vec![
        v.sequence.to_string(),
        v.time.clone(),
        v.action.clone(),
        v.outcome.clone(),
        v.severity.clone(),
        actor,
        resource,
        v.source_service.clone(),
    ]
}

#[derive(Serialize)]
struct VerifyView {
    ok: bool,
    events_checked: u64,
    checkpoints_verified: u64,
    first_broken_sequence: u64,
    reason: String,
    head_sequence: u64,
    head_hash: String,
}

fn print_verify(v: &VerifyView, format: Format) -> ExitCode {
    if format == Format::Json {
        output::json(v);
    } else if v.ok {
        println!(
            "chain OK: {} events, {} checkpoints verified, head {} {}",
            v.events_checked, v.checkpoints_verified, v.head_sequence, v.head_hash
        );
    } else {
        println!(
            "chain BROKEN at sequence {}: {} ({} events checked)",
            v.first_broken_sequence, v.reason, v.events_checked
        );
    }
    if v.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs an `audit` subcommand.
pub(crate) async fn run(
    cmd: AuditCommand,
    session: Option<&Session>,
    format: Format,
) -> Result<ExitCode> {
    if let AuditCommand::VerifyFile(a) = &cmd {
        return verify_file(a, format);
    }
    let session = session.ok_or_else(|| anyhow!("not logged in: run `vibebox login`"))?;
    let mut client = session.audit();
    match cmd {
        AuditCommand::VerifyFile(_) => unreachable!("handled above"),
        AuditCommand::Query(a) => {
            let filter = a.filter.to_proto()?;
            let mut events = Vec::new();
            let mut page_token = String::new();
            while events.len() < a.limit {
                let r = client
                    .query_events(QueryEventsRequest {
                        filter: Some(filter.clone()),
                        page_size: (a.limit - events.len()).min(500) as i32,
                        page_token,
                    })
                    .await
                    .call()?;
                events.extend(r.events);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            events.truncate(a.limit);
            let views: Vec<EventView> = events.iter().map(EventView::from).collect();
            if format == Format::Json {
                output::json(&views);
            } else {
                output::table(&HEADERS, &views.iter().map(row).collect::<Vec<_>>());
            }
        }
        AuditCommand::Watch(f) => {
            let mut stream = client
                .watch_events(WatchEventsRequest {
                    filter: Some(f.to_proto()?),
                })
                .await
                .call()?;
            // Events not seen yet: fixed widths, so later rows stay under the header.
            let columns = output::Columns::fixed(&HEADERS, &WATCH_WIDTHS);
            let mut first = true;
            while let Some(r) = stream.message().await.map_err(CallError)? {
                let Some(e) = r.event else { continue };
                let v = EventView::from(&e);
                if format == Format::Json {
                    println!("{}", serde_json::to_string(&v)?);
                    std::io::stdout().flush()?;
                    continue;
                }
                if first {
                    println!("{}", columns.line(&HEADERS));
                    first = false;
                }
                println!("{}", columns.line(&row(&v)));
                std::io::stdout().flush()?;
            }
        }
        AuditCommand::Verify(r) => {
            let v = client
                .verify_chain(VerifyChainRequest {
                    from_sequence: r.from,
                    to_sequence: r.to,
                })
                .await
                .call()?;
            return Ok(print_verify(
                &VerifyView {
                    ok: v.ok,
                    events_checked: v.events_checked,
                    checkpoints_verified: v.checkpoints_verified,
                    first_broken_sequence: v.first_broken_sequence,
                    reason: v.reason,
                    head_sequence: v.head_sequence,
                    head_hash: v.head_hash,
                },
                format,
            ));
        }
        AuditCommand::Export(a) => {
            let mut stream = client
                .export_events(ExportEventsRequest {
                    from_sequence: a.range.from,
                    to_sequence: a.range.to,
                })
                .await
                .call()?;
            let mut out: Box<dyn Write> = match &a.out {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut lines = 0u64;
            while let Some(r) = stream.message().await.map_err(CallError)? {
                out.write_all(r.json_line.trim_end().as_bytes())?;
                out.write_all(b"\n")?;
                lines += 1;
            }
            out.flush()?;
            if let Some(p) = &a.out {
                eprintln!("exported {lines} lines to {}", p.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify_file(a: &VerifyFileArgs, format: Format) -> Result<ExitCode> {
    let pem =
        std::fs::read_to_string(&a.key).with_context(|| format!("reading {}", a.key.display()))?;
    let key = vibebox_audit_chain::verifying_key_from_pem(&pem).map_err(|e| {
        anyhow!(
            "{} is not an audit checkpoint public key: {e}",
            a.key.display()
        )
    })?;
    let file =
        std::fs::File::open(&a.file).with_context(|| format!("opening {}", a.file.display()))?;
    let report = vibebox_audit_chain::verify_export_from(BufReader::new(file), &key, a.from)?;
    Ok(print_verify(
        &VerifyView {
            ok: report.ok,
            events_checked: report.events_checked,
            checkpoints_verified: report.checkpoints_verified,
            first_broken_sequence: report.first_broken_sequence,
            reason: report.reason,
            head_sequence: report.head_sequence,
            head_hash: report.head_hash,
        },
        format,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, action: &str, user: &str, resource: &str) -> EventView {
        EventView {
            sequence: seq,
            id: String::new(),
            time: "2024-05-01T10:00:00Z".to_owned(),
            actor_user_id: user.to_owned(),
            actor_token_id: String::new(),
            actor_service: "gateway".to_owned(),
            team_id: String::new(),
            action: action.to_owned(),
            resource_type: "environment".to_owned(),
            resource_id: resource.to_owned(),
            outcome: "success".to_owned(),
            severity: "low".to_owned(),
            details: Default::default(),
            source_service: "gateway".to_owned(),
            request_id: String::new(),
            trace_id: String::new(),
            client_address: String::new(),
            hash: String::new(),
            prev_hash: String::new(),
        }
    }

    #[test]
    fn watch_rows_stay_under_their_headers() {
        let uuid = "0190c3d2-7a1b-7c3d-8e4f-a1b2c3d4e5f6";
        let events = [
            event(1, "user.login", "", ""),
            event(123456, "environment.create.rolled_back", uuid, uuid),
            event(7, "team.create", uuid, "x"),
        ];
        let columns = output::Columns::fixed(&HEADERS, &WATCH_WIDTHS);
        let header = columns.line(&HEADERS);
        let starts: Vec<usize> = HEADERS.iter().map(|h| header.find(h).unwrap()).collect();
        for e in &events {
            let cells = row(e);
            let line: Vec<char> = columns.line(&cells).chars().collect();
            for (i, start) in starts.iter().enumerate() {
                let end = starts.get(i + 1).copied().unwrap_or(line.len());
                let cell: String = line[*start..end].iter().collect();
                assert_eq!(
                    cell.trim_end(),
                    cells[i],
                    "{header}\n{}",
                    String::from_iter(&line)
                );
            }
        }
    }
}
