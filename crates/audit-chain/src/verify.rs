//! Chain verification: a streaming [`Verifier`] (used by the service's
//! `VerifyChain`) and [`verify_export`], the offline verifier of an export
//! file against the signed checkpoints and a trusted public key.
//!
//! Hashing is the expensive part and each event's hash depends only on its
//! own fields and stored `prev_hash`, so events are hashed in parallel in
//! chunks; links and checkpoints are then checked in order.

use std::io::BufRead;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::GENESIS_HASH;
use crate::checkpoint::Checkpoint;
use crate::event::Event;

/// Events hashed per parallel chunk.
const CHUNK: usize = 16 * 1024;

/// One line of an export file: `{"event":{...}}` or `{"checkpoint":{...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)] // mostly events: boxing would only add an allocation each
pub enum ExportLine {
    Event(Event),
    Checkpoint(Checkpoint),
}

/// The outcome of a verification.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// No broken link, and (for exports) every event covered by a checkpoint.
    pub ok: bool,
    pub events_checked: u64,
    pub checkpoints_verified: u64,
    /// The first sequence whose link is broken; 0 when none.
    pub first_broken_sequence: u64,
    pub reason: String,
    pub head_sequence: u64,
    pub head_hash: String,
    /// The last sequence covered by a verified checkpoint; 0 when none.
    pub signed_through: u64,
}

/// Errors reading an export file (a malformed file, not a broken chain).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("line {line} of the export is not an event or checkpoint: {message}")]
    Parse { line: u64, message: String },
}

/// Checks events and checkpoints pushed in chain order.
pub struct Verifier {
    key: VerifyingKey,
    /// The last event accepted: (sequence, hash).
    last: Option<(u64, String)>,
    pending: Vec<ExportLine>,
    report: Report,
    broken: bool,
    /// The sequence the first event must have, when the start is known.
    expected_first: Option<u64>,
}

/// Applies `f` to every item, spreading the work over the available cores.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || items.len() < 256 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

impl Verifier {
    /// A verifier trusting `key` for checkpoints. The first event must be
    /// sequence 1 linked to [`GENESIS_HASH`], or (for a range) it is taken as
    /// the starting point as it is.
    pub fn new(key: VerifyingKey) -> Self {
        Self {
            key,
            last: None,
            pending: Vec::new(),
            report: Report::default(),
            broken: false,
            expected_first: None,
        }
    }

    /// A verifier requiring the first event to be `sequence` (1: the whole
    /// chain from genesis), so that an input cut at its start is refused.
    pub fn starting_at(key: VerifyingKey, sequence: u64) -> Self {
        let mut v = Self::new(key);
        v.expected_first = Some(sequence);
        v
    }

    /// A verifier for a range starting right after a known event.
    pub fn starting_after(key: VerifyingKey, sequence: u64, hash: String) -> Self {
        let mut v = Self::new(key);
        v.last = Some((sequence, hash));
        v
    }

    /// Whether a broken link was found (further input is ignored).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Adds the next event or checkpoint.
    pub fn push(&mut self, line: ExportLine) {
        if self.broken {
            return;
        }
        self.pending.push(line);
        if self.pending.len() >= CHUNK {
            self.process_pending();
        }
    }

    fn process_pending(&mut self) {
        let lines = std::mem::take(&mut self.pending);
        let hashes = par_map(&lines, |line| match line {
            ExportLine::Event(e) => Some(e.compute_hash()),
            ExportLine::Checkpoint(_) => None,
        });
        for (line, hash) in lines.into_iter().zip(hashes) {
            self.link(line, hash);
        }
    }

    fn fail(&mut self, sequence: u64, reason: String) {
        self.broken = true;
        self.report.first_broken_sequence = sequence;
        self.report.reason = reason;
    }

    /// Checks one line whose hash (for events) is already computed.
    fn link(&mut self, line: ExportLine, computed: Option<String>) {
        if self.broken {
            return;
        }
        match line {
            ExportLine::Event(e) => {
                match &self.last {
                    Some((seq, hash)) => {
                        if e.sequence != seq + 1 {
                            return self.fail(
                                seq + 1,
                                format!(
                                    "expected sequence {} after {seq}, found {}",
                                    seq + 1,
                                    e.sequence
                                ),
                            );
                        }
                        if &e.prev_hash != hash {
                            return self.fail(
                                e.sequence,
                                format!(
                                    "event {}: prev_hash does not match the previous event's hash",
                                    e.sequence
                                ),
                            );
                        }
                    }
                    None => {
                        if e.sequence == 0 {
                            return self.fail(0, "event without a sequence".into());
                        }
                        if let Some(first) = self.expected_first
                            && e.sequence != first
                        {
                            return self.fail(
                                first,
                                format!(
                                    "the export starts at event {}, not at event {first}: events before it are missing",
                                    e.sequence
                                ),
                            );
                        }
                        if e.sequence == 1 && e.prev_hash != GENESIS_HASH {
                            return self
                                .fail(1, "event 1: prev_hash is not the genesis hash".into());
                        }
                    }
                }
                if computed.as_deref() != Some(e.hash.as_str()) {
                    return self.fail(
                        e.sequence,
                        format!("event {}: content does not match its hash", e.sequence),
                    );
                }
                self.report.events_checked += 1;
                self.last = Some((e.sequence, e.hash));
            }
            ExportLine::Checkpoint(cp) => {
                if let Err(err) = cp.verify(&self.key) {
                    return self.fail(cp.sequence, format!("checkpoint {}: {err}", cp.sequence));
                }
                match &self.last {
                    Some((seq, hash)) if *seq == cp.sequence => {
                        if *hash != cp.head_hash {
                            return self.fail(
                                cp.sequence,
                                format!(
                                    "event {}: hash differs from the signed checkpoint",
                                    cp.sequence
                                ),
                            );
                        }
                        self.report.checkpoints_verified += 1;
                        self.report.signed_through = cp.sequence;
                    }
                    _ => self.fail(
                        cp.sequence,
                        format!("checkpoint {} does not follow its event", cp.sequence),
                    ),
                }
            }
        }
    }

    /// Finishes and reports. `ok` means no broken link; it does not require
    /// the head to be signed (see [`Report::signed_through`]).
    pub fn finish(mut self) -> Report {
        self.process_pending();
        if let Some((seq, hash)) = self.last.take() {
            self.report.head_sequence = seq;
            self.report.head_hash = hash;
        }
        self.report.ok = !self.broken;
        self.report
    }
}

/// Verifies an export of the whole chain (JSON lines, oldest first) offline:
/// it must start at event 1 linked to the genesis hash; every hash and link,
/// every checkpoint signature against `key`, and that the last event is
/// covered by a signed checkpoint (so nothing can be cut at either end or
/// appended unnoticed).
pub fn verify_export(
    reader: impl BufRead + Send,
    key: &VerifyingKey,
) -> Result<Report, ExportError> {
    verify_export_from(reader, key, 1)
}

/// Verifies an export of a range that starts at event `first_sequence` (an
/// export made with `from_sequence`), as [`verify_export`] does the whole
/// chain. The range's first link cannot be checked offline; that it starts
/// where it says is.
pub fn verify_export_from(
    reader: impl BufRead + Send,
    key: &VerifyingKey,
    first_sequence: u64,
) -> Result<Report, ExportError> {
    let mut verifier = Verifier::starting_at(*key, first_sequence.max(1));
    // A reader thread splits lines while the chunk before is parsed and hashed.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<(u64, String)>, std::io::Error>>(2);
    std::thread::scope(|scope| -> Result<(), ExportError> {
        scope.spawn(move || {
            let mut lines = reader.lines();
            let mut line_no = 0u64;
            loop {
                let mut chunk = Vec::with_capacity(CHUNK);
                for line in lines.by_ref() {
                    line_no += 1;
                    match line {
                        Ok(line) if line.trim().is_empty() => continue,
                        Ok(line) => chunk.push((line_no, line)),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                    if chunk.len() >= CHUNK {
                        break;
                    }
                }
                if chunk.is_empty() || tx.send(Ok(chunk)).is_err() {
                    return;
                }
            }
        });
        for chunk in rx {
            let chunk = chunk?;
            let parsed = par_map(&chunk, |(no, text)| {
                serde_json::from_str::<ExportLine>(text)
                    .map(|line| {
                        let hash = match &line {
                            ExportLine::Event(e) => Some(e.compute_hash()),
                            ExportLine::Checkpoint(_) => None,
                        };
                        (line, hash)
                    })
                    .map_err(|e| ExportError::Parse {
                        line: *no,
                        message: e.to_string(),
                    })
            });
            for item in parsed {
                let (line, hash) = item?;
                verifier.link(line, hash);
            }
            if verifier.is_broken() {
                break; // dropping the receiver stops the reader
            }
        }
        Ok(())
    })?;
    let mut report = verifier.finish();
    if report.ok && report.signed_through < report.head_sequence {
        report.ok = false;
        report.first_broken_sequence = report.signed_through + 1;
        report.reason = format!(
            "events {}..={} are not covered by a signed checkpoint",
            report.signed_through + 1,
            report.head_sequence
        );
    }
    Ok(report)
}

/// Writes one export line (no trailing newline).
pub fn to_json_line(line: &ExportLine) -> String {
    serde_json::to_string(line).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::CheckpointSigner;
    use crate::event::tests::sample;

    fn chain(n: u64, signer: &CheckpointSigner, every: u64) -> Vec<ExportLine> {
        let mut out = Vec::new();
        let mut prev = GENESIS_HASH.to_owned();
        for seq in 1..=n {
            let mut e = sample(seq);
            e.seal(seq, &prev);
            prev = e.hash.clone();
            out.push(ExportLine::Event(e));
            if seq % every == 0 || seq == n {
                out.push(ExportLine::Checkpoint(signer.sign(seq, &prev)));
            }
        }
        out
    }

    fn export(lines: &[ExportLine]) -> String {
        lines.iter().map(|l| to_json_line(l) + "\n").collect()
    }

    #[test]
    fn a_valid_export_verifies() {
        let signer = CheckpointSigner::generate();
        let lines = chain(1000, &signer, 100);
        let report = verify_export(export(&lines).as_bytes(), &signer.verifying_key()).unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.events_checked, 1000);
        assert_eq!(report.checkpoints_verified, 10);
        assert_eq!(report.head_sequence, 1000);
    }

    #[test]
    fn an_altered_event_is_found() {
        let signer = CheckpointSigner::generate();
        let mut lines = chain(500, &signer, 100);
        let ExportLine::Event(e) = &mut lines[300] else {
            panic!()
        };
        let seq = e.sequence;
        e.action = "environment.delete".into();
        let report = verify_export(export(&lines).as_bytes(), &signer.verifying_key()).unwrap();
        assert!(!report.ok);
        assert_eq!(report.first_broken_sequence, seq);
    }

    #[test]
    fn a_rehashed_chain_fails_at_the_signed_checkpoint() {
        let signer = CheckpointSigner::generate();
        let lines = chain(300, &signer, 100);
        // Rewrite event 150 and recompute every later hash (an attacker without the key).
        let mut prev = GENESIS_HASH.to_owned();
        let mut forged = Vec::new();
        for line in lines {
            match line {
                ExportLine::Event(mut e) => {
                    if e.sequence == 150 {
                        e.actor.user_id = "someone-else".into();
                    }
                    e.seal(e.sequence, &prev);
                    prev = e.hash.clone();
                    forged.push(ExportLine::Event(e));
                }
                cp => forged.push(cp),
            }
        }
        let report = verify_export(export(&forged).as_bytes(), &signer.verifying_key()).unwrap();
        assert!(!report.ok);
        assert_eq!(report.first_broken_sequence, 200);
        assert!(
            report.reason.contains("signed checkpoint"),
            "{}",
            report.reason
        );
    }

    #[test]
    fn truncation_removal_and_wrong_keys_are_found() {
        let signer = CheckpointSigner::generate();
        let lines = chain(250, &signer, 100);
        // Unsigned tail: drop the final checkpoint.
        let report = verify_export(
            export(&lines[..lines.len() - 1]).as_bytes(),
            &signer.verifying_key(),
        )
        .unwrap();
        assert!(!report.ok);
        assert_eq!(report.first_broken_sequence, 201);
        // A removed event.
        let mut removed = lines.clone();
        removed.remove(10);
        let report = verify_export(export(&removed).as_bytes(), &signer.verifying_key()).unwrap();
        assert!(!report.ok);
        assert_eq!(report.first_broken_sequence, 11);
        // Another key.
        let other = CheckpointSigner::generate();
        let report = verify_export(export(&lines).as_bytes(), &other.verifying_key()).unwrap();
        assert!(!report.ok);
        assert_eq!(report.first_broken_sequence, 100);
        // Garbage.
        assert!(matches!(
            verify_export("{\"nope\":1}\n".as_bytes(), &signer.verifying_key()),
            Err(ExportError::Parse { line: 1, .. })
        ));
    }

    #[test]
    fn the_streaming_verifier_handles_ranges() {
        let signer = CheckpointSigner::generate();
        let lines = chain(40_000, &signer, 1000);
        let mut v = Verifier::new(signer.verifying_key());
        for line in lines.iter().cloned() {
            v.push(line);
        }
        let report = v.finish();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.events_checked, 40_000);
        assert_eq!(report.signed_through, 40_000);
    }
}
