//! The reading side of the audit log, on domain types: paged queries,
//! chain verification (from storage, against the service's own key and
//! head, and against the receipts checked since start: see
//! [`crate::integrity`]) and export as JSON lines with signed checkpoints.

use std::collections::VecDeque;

use tokio::sync::mpsc;
use vibebox_audit_chain::verify::to_json_line;
use vibebox_audit_chain::{Checkpoint, Event, ExportLine, Report, TailError, Verifier};

use crate::filter::Filter;
use crate::log::{Log, LogError};
use crate::store::StoreError;

/// Events read per storage round trip when walking the chain.
const PAGE: u64 = 10_000;
pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Errors of the reading operations.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("invalid page token")]
    BadPageToken,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Log(#[from] LogError),
    /// The log contradicts a receipt: what was read is not the whole log.
    #[error("{0}")]
    Tail(TailError),
}

/// One page of a query.
pub struct Page {
    pub events: Vec<Event>,
    pub next_page_token: String,
}

/// Clamps `[from, to]` (0 = start / head) to the chain `1..=head`.
fn bounds(from: u64, to: u64, head: u64) -> (u64, u64) {
    let to = if to == 0 || to > head { head } else { to };
    (from.max(1), to)
}

/// Events matching `filter`, newest first.
pub async fn query(
    log: &Log,
    filter: &Filter,
    page_size: i32,
    page_token: &str,
) -> Result<Page, ReadError> {
    let size = match page_size {
        n if n <= 0 => DEFAULT_PAGE_SIZE,
        n => (n as u32).min(MAX_PAGE_SIZE),
    };
    let before = if page_token.is_empty() {
        None
    } else {
        Some(
            page_token
                .strip_prefix("s")
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or(ReadError::BadPageToken)?,
        )
    };
    let mut events = log
        .store()
        .query(filter, before, u64::from(size) + 1)
        .await?;
    let next_page_token = if events.len() > size as usize {
        events.truncate(size as usize);
        events
            .last()
            .map(|e| format!("s{}", e.sequence))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok(Page {
        events,
        next_page_token,
    })
}

/// Walks `from..=to` (0 = start / head) and reports the first broken link:
/// hashes, links, sequence gaps, stored checkpoints and, for a walk to the
/// head, the service's own head hash. A cut or rewritten tail (a receipt
/// the log contradicts) within or after the range breaks a walk to the head
/// or over it.
pub async fn verify(log: &Log, from: u64, to: u64) -> Result<Report, ReadError> {
    let to_head = to == 0 || to >= log.head().sequence;
    let mut report = verify_links(log, from, to).await?;
    let failures = log.integrity_failures();
    let relevant: Vec<&TailError> = failures
        .iter()
        .filter(|f| to_head || f.first_broken_sequence() <= to)
        .collect();
    if let Some(first) = relevant.iter().min_by_key(|f| f.first_broken_sequence()) {
        let first_broken = first.first_broken_sequence();
        let mut reason = first.to_string();
        if relevant.len() > 1 {
            reason.push_str(&format!(
                " (and {} more receipts contradicted)",
                relevant.len() - 1
            ));
        }
        if !report.ok {
            reason.push_str(&format!("; also: {}", report.reason));
        }
        report.ok = false;
        report.first_broken_sequence = if report.first_broken_sequence == 0 {
            first_broken
        } else {
            report.first_broken_sequence.min(first_broken)
        };
        report.reason = reason;
    }
    Ok(report)
}

async fn verify_links(log: &Log, from: u64, to: u64) -> Result<Report, ReadError> {
    let head = log.head();
    let (from, to) = bounds(from, to, head.sequence);
    let key = log.signer().verifying_key();
    let store = log.store();
    if from > to {
        return Ok(Report {
            ok: true,
            head_sequence: head.sequence,
            head_hash: head.hash,
            ..Report::default()
        });
    }
    let mut verifier = if from > 1 {
        match store.event(from - 1).await? {
            Some(prev) => Verifier::starting_after(key, prev.sequence, prev.hash),
            None => Verifier::new(key),
        }
    } else {
        Verifier::new(key)
    };
    let mut checkpoints: VecDeque<Checkpoint> = store.checkpoints(from, to).await?.into();
    let mut next = from;
    while next <= to && !verifier.is_broken() {
        let page = store.range(next, to, PAGE).await?;
        let Some(last) = page.last().map(|e| e.sequence) else {
            break;
        };
        for e in page {
            let seq = e.sequence;
            while checkpoints.front().is_some_and(|c| c.sequence < seq) {
                if let Some(cp) = checkpoints.pop_front() {
                    verifier.push(ExportLine::Checkpoint(cp));
                }
            }
            verifier.push(ExportLine::Event(e));
            if checkpoints.front().is_some_and(|c| c.sequence == seq)
                && let Some(cp) = checkpoints.pop_front()
            {
                verifier.push(ExportLine::Checkpoint(cp));
            }
        }
        next = last + 1;
    }
    let mut report = verifier.finish();
    if report.ok && report.head_sequence < to {
        report.ok = false;
        report.first_broken_sequence = report.head_sequence + 1;
        report.reason = format!("event {} is missing", report.head_sequence + 1);
    } else if report.ok && to == head.sequence && report.head_hash != head.hash {
        report.ok = false;
        report.first_broken_sequence = to;
        report.reason = format!("event {to}: stored hash differs from the service's head");
    }
    Ok(report)
}

/// A signed checkpoint covering exactly `to`, or `None` when the chain
/// between `to` and the next signed anchor does not verify (the export then
/// ends unanchored and the offline verifier reports it).
async fn anchor(log: &Log, to: u64) -> Result<Option<Checkpoint>, ReadError> {
    let store = log.store();
    if let Some(cp) = store.checkpoint_from(to).await?
        && cp.sequence == to
    {
        return Ok(Some(cp));
    }
    let Some(target) = store.event(to).await? else {
        return Ok(None);
    };
    let report = verify(log, to, 0).await?;
    if !report.ok {
        tracing::warn!(sequence = to, reason = %report.reason, "not signing an export anchor over a broken chain");
        return Ok(None);
    }
    Ok(Some(log.signer().sign(to, &target.hash)))
}

/// Streams `from..=to` (0 = start / head) as JSON lines, oldest first, each
/// stored checkpoint after its event and a checkpoint covering the last
/// event at the end.
pub async fn export(
    log: &Log,
    from: u64,
    to: u64,
    out: mpsc::Sender<Result<String, ReadError>>,
) -> Result<(), ReadError> {
    // The log contradicts a receipt: no fresh signature over what is left
    // (the export ends unanchored and then with the failure).
    let failures: Vec<TailError> = log
        .integrity_failures()
        .into_iter()
        .filter(|f| to == 0 || to >= log.head().sequence || f.first_broken_sequence() <= to)
        .collect();
    let (head_cp, to_head) = if to == 0 || to >= log.head().sequence {
        let cp = if failures.is_empty() {
            log.checkpoint_head().await?
        } else {
            None
        };
        (cp, true)
    } else {
        (None, false)
    };
    let head = head_cp.as_ref().map_or(log.head().sequence, |c| c.sequence);
    let (from, to) = bounds(from, if to_head { head } else { to }, head);
    if from > to {
        return Ok(());
    }
    let final_cp = if to_head || !failures.is_empty() {
        head_cp
    } else {
        anchor(log, to).await?
    };
    let store = log.store();
    let mut checkpoints: VecDeque<Checkpoint> = store.checkpoints(from, to).await?.into();
    let mut next = from;
    let mut final_written = false;
    while next <= to {
        let page = store.range(next, to, PAGE).await?;
        let Some(last) = page.last().map(|e| e.sequence) else {
            break;
        };
        for e in page {
            let seq = e.sequence;
            let mut lines = vec![to_json_line(&ExportLine::Event(e))];
            while checkpoints.front().is_some_and(|c| c.sequence <= seq) {
                if let Some(cp) = checkpoints.pop_front() {
                    if cp.sequence == to {
                        final_written = true;
                    }
                    lines.push(to_json_line(&ExportLine::Checkpoint(cp)));
                }
            }
            if seq == to
                && !final_written
                && let Some(cp) = &final_cp
            {
                lines.push(to_json_line(&ExportLine::Checkpoint(cp.clone())));
                final_written = true;
            }
            for line in lines {
                if out.send(Ok(line)).await.is_err() {
                    return Ok(()); // the client went away
                }
            }
        }
        next = last + 1;
    }
    match failures
        .into_iter()
        .min_by_key(TailError::first_broken_sequence)
    {
        Some(failure) => Err(ReadError::Tail(failure)),
        None => Ok(()),
    }
}
