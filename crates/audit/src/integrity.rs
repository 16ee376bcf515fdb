//! Tail integrity: receipts kept outside the audit database, checked against
//! the log.
//!
//! Hashes and signed checkpoints cannot show that the newest events were
//! deleted (with the checkpoints over them): what is left still verifies.
//! Two kinds of receipt (`vibebox_audit_chain::Receipt`) can:
//!
//! - the **producers'**: every producer keeps the last sequence and hash
//!   audit acknowledged to it beside its outbox (another host, container or
//!   volume than the audit database) and checks it through
//!   `AuditReceiptService.CheckReceipt` on start, after reconnecting and
//!   periodically. These are what an attacker holding only the audit
//!   database and the audit service's own files cannot reach;
//! - the **audit service's own head record** (`--head-record`, default
//!   `<data-dir>/audit-head`): the head after every commit, checked at start.
//!   It catches an attacker who edits the database alone (SQL access, or a
//!   PostgreSQL database shared with others) without a producer's help.
//!
//! A contradicted receipt is an integrity failure: logged at ERROR (critical),
//! raised as a critical `alert.raised` event (rule `audit_tail_truncated`),
//! and reported by `VerifyChain` for as long as the process runs. The head
//! record that was contradicted is kept as `<head-record>.contradicted` and
//! reported again at every start until an operator removes it; producers do
//! the same with their own (`receipt.contradicted` in the outbox).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vibebox_audit_chain::{Receipt, TailError};

/// Receipts reported and failures found since the process started.
#[derive(Default)]
pub struct Integrity {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The highest receipt each holder presented.
    receipts: BTreeMap<String, Receipt>,
    failures: Vec<TailError>,
}

impl Integrity {
    /// Remembers a checked receipt (the highest per holder).
    pub fn note_receipt(&self, receipt: &Receipt) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let entry = state.receipts.entry(receipt.holder.clone()).or_default();
        if receipt.sequence >= entry.sequence {
            *entry = receipt.clone();
        }
    }

    /// Records a failure; false when the same holder's failure at the same
    /// sequence is already known (so it is alerted once).
    pub fn record(&self, failure: &TailError) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let known = state
            .failures
            .iter()
            .any(|f| f.holder() == failure.holder() && f.sequence() == failure.sequence());
        if !known {
            state.failures.push(failure.clone());
        }
        !known
    }

    /// The failures found so far, oldest first.
    pub fn failures(&self) -> Vec<TailError> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failures
            .clone()
    }

    /// Number of holders whose receipts were checked.
    pub fn holders(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .receipts
            .len()
    }
}

/// The audit service's own head record: `<sequence> <hash>` in one line.
#[derive(Debug, Clone)]
pub struct HeadRecord {
    path: PathBuf,
}

impl HeadRecord {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where a contradicted record is kept until an operator removes it.
    pub fn contradicted_path(&self) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(".contradicted");
        PathBuf::from(name)
    }

    fn receipt(&self, path: &Path) -> std::io::Result<Option<Receipt>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut parts = text.split_whitespace();
        let (Some(sequence), Some(hash)) = (
            parts.next().and_then(|s| s.parse::<u64>().ok()),
            parts.next(),
        ) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not `<sequence> <hash>`", path.display()),
            ));
        };
        Ok(Some(Receipt {
            holder: format!("the audit head record {}", self.path.display()),
            sequence,
            hash: hash.to_owned(),
        }))
    }

    /// The recorded head, if any.
    pub fn read(&self) -> std::io::Result<Option<Receipt>> {
        self.receipt(&self.path)
    }

    /// A record kept after it was contradicted, if any.
    pub fn read_contradicted(&self) -> std::io::Result<Option<Receipt>> {
        self.receipt(&self.contradicted_path())
    }

    /// Keeps `receipt` (a record the log contradicted) beside the record;
    /// the first one kept stays.
    pub fn keep_contradicted(&self, receipt: &Receipt) -> std::io::Result<()> {
        let kept = self.contradicted_path();
        if kept.exists() {
            return Ok(());
        }
        write_atomic(&kept, receipt.sequence, &receipt.hash, true)
    }

    /// Replaces the record (write, rename). Not fsynced: it is written after
    /// every commit, on the path of every acknowledgement, and it is written
    /// only after the database committed, so it can lag behind the log
    /// after a power loss (weaker detection for that moment, never a false
    /// alarm) but never run ahead of it.
    pub fn write(&self, sequence: u64, hash: &str) -> std::io::Result<()> {
        write_atomic(&self.path, sequence, hash, false)
    }
}

fn write_atomic(path: &Path, sequence: u64, hash: &str, sync: bool) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut file = std::fs::File::create(&tmp)?;
        writeln!(file, "{sequence} {hash}")?;
        if sync {
            file.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_record_round_trips_and_keeps_a_contradicted_copy() {
        let dir = tempfile::tempdir().unwrap();
        let record = HeadRecord::new(dir.path().join("audit-head"));
        assert_eq!(record.read().unwrap(), None);
        record.write(7, "abc").unwrap();
        let read = record.read().unwrap().unwrap();
        assert_eq!((read.sequence, read.hash.as_str()), (7, "abc"));
        record.keep_contradicted(&read).unwrap();
        record.write(9, "def").unwrap();
        let later = record.read().unwrap().unwrap();
        record.keep_contradicted(&later).unwrap();
        assert_eq!(record.read_contradicted().unwrap().unwrap().sequence, 7);
        std::fs::write(record.path(), "garbage").unwrap();
        assert!(record.read().is_err());
    }

    #[test]
    fn failures_are_recorded_once() {
        let integrity = Integrity::default();
        let failure = TailError::Truncated {
            holder: "identity".into(),
            sequence: 9,
            hash: "ab".into(),
            head: 4,
        };
        assert!(integrity.record(&failure));
        assert!(!integrity.record(&failure));
        assert_eq!(integrity.failures(), [failure]);
    }
}
