//! The producer's receipt: the highest sequence (and its chain hash) the
//! audit service acknowledged for this producer's events, kept beside the
//! outbox, that is outside the audit database.
//!
//! Files in the outbox directory:
//! - `receipt`: `<producer id> <sequence> <hash>`; the producer id is random,
//!   made once, and names this producer instance to the audit service. Only
//!   ever raised (a lower acknowledgement never replaces a higher one), and
//!   rewritten atomically and fsynced before the delivery cursor moves;
//! - `receipt.contradicted`: the first receipt the audit service's log
//!   contradicted (a cut or rewritten tail). It is checked again at every
//!   periodic check, so the failure stays visible after the log has grown
//!   past it or the audit service restarted, until an operator who has
//!   investigated removes the file.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// An acknowledgement held by this producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Receipt {
    pub(crate) producer_id: String,
    pub(crate) sequence: u64,
    pub(crate) hash: String,
}

fn receipt_path(dir: &Path) -> PathBuf {
    dir.join("receipt")
}

fn contradicted_path(dir: &Path) -> PathBuf {
    dir.join("receipt.contradicted")
}

fn parse(path: &Path) -> io::Result<Option<Receipt>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut parts = text.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|s| s.parse::<u64>().ok()),
        parts.next(),
    ) {
        (Some(id), Some(sequence), hash) => Ok(Some(Receipt {
            producer_id: id.to_owned(),
            sequence,
            hash: hash.unwrap_or_default().to_owned(),
        })),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not `<producer id> <sequence> <hash>`",
                path.display()
            ),
        )),
    }
}

fn write_atomic(dir: &Path, path: &Path, receipt: &Receipt) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = fs::File::create(&tmp)?;
        writeln!(
            file,
            "{} {} {}",
            receipt.producer_id, receipt.sequence, receipt.hash
        )?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// Loads the receipt, creating one (a new producer id, nothing
/// acknowledged) on first use.
pub(crate) fn load_or_init(dir: &Path) -> io::Result<Receipt> {
    if let Some(receipt) = parse(&receipt_path(dir))? {
        return Ok(receipt);
    }
    let receipt = Receipt {
        producer_id: uuid::Uuid::new_v4().to_string(),
        sequence: 0,
        hash: String::new(),
    };
    write_atomic(dir, &receipt_path(dir), &receipt)?;
    Ok(receipt)
}

/// Replaces the receipt (the caller only ever raises it).
pub(crate) fn store(dir: &Path, receipt: &Receipt) -> io::Result<()> {
    write_atomic(dir, &receipt_path(dir), receipt)
}

/// The receipt kept after a contradiction, if any.
pub(crate) fn contradicted(dir: &Path) -> io::Result<Option<Receipt>> {
    parse(&contradicted_path(dir))
}

/// Keeps `receipt` as contradicted (the first one stays).
pub(crate) fn keep_contradicted(dir: &Path, receipt: &Receipt) -> io::Result<()> {
    if contradicted_path(dir).exists() {
        return Ok(());
    }
    write_atomic(dir, &contradicted_path(dir), receipt)
}

/// The receipt after an acknowledgement of `(sequence, hash)` pairs: the
/// highest one, if higher than `current`. Pairs without a hash (an older
/// audit service) are ignored.
pub(crate) fn raised(current: &Receipt, sequences: &[u64], hashes: &[String]) -> Option<Receipt> {
    if sequences.len() != hashes.len() {
        return None;
    }
    let (sequence, hash) = sequences
        .iter()
        .zip(hashes)
        .filter(|(_, h)| !h.is_empty())
        .max_by_key(|(s, _)| **s)?;
    (*sequence > current.sequence).then(|| Receipt {
        producer_id: current.producer_id.clone(),
        sequence: *sequence,
        hash: hash.clone(),
    })
}

/// Whether an acknowledgement looks like the log went backwards: its
/// highest sequence is at or below the receipt without being the receipt
/// itself (a redelivery acknowledges exactly the receipt, or less with the
/// same events, which the audit service then confirms).
pub(crate) fn suspicious(current: &Receipt, sequences: &[u64], hashes: &[String]) -> bool {
    if current.sequence == 0 || sequences.len() != hashes.len() {
        return false;
    }
    let Some((sequence, hash)) = sequences.iter().zip(hashes).max_by_key(|(s, _)| **s) else {
        return false;
    };
    *sequence <= current.sequence && !(*sequence == current.sequence && *hash == current.hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receipt_is_made_once_and_only_raised() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_init(dir.path()).unwrap();
        assert_eq!(first.sequence, 0);
        assert_eq!(load_or_init(dir.path()).unwrap(), first);
        let up = raised(&first, &[4, 9, 7], &["a".into(), "c".into(), "b".into()]).unwrap();
        assert_eq!((up.sequence, up.hash.as_str()), (9, "c"));
        store(dir.path(), &up).unwrap();
        assert_eq!(load_or_init(dir.path()).unwrap(), up);
        assert_eq!(raised(&up, &[8], &["x".into()]), None);
        // An older audit service sends no hashes: nothing to keep.
        assert_eq!(raised(&first, &[3], &[]), None);
    }

    #[test]
    fn an_acknowledgement_below_the_receipt_is_suspicious() {
        let r = Receipt {
            producer_id: "p".into(),
            sequence: 9,
            hash: "c".into(),
        };
        assert!(!suspicious(&r, &[10], &["d".into()]));
        assert!(!suspicious(&r, &[9], &["c".into()]));
        assert!(suspicious(&r, &[9], &["e".into()]));
        assert!(suspicious(&r, &[5], &["e".into()]));
    }

    #[test]
    fn a_contradicted_receipt_is_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(contradicted(dir.path()).unwrap(), None);
        let r = |sequence| Receipt {
            producer_id: "p".into(),
            sequence,
            hash: "h".into(),
        };
        keep_contradicted(dir.path(), &r(9)).unwrap();
        keep_contradicted(dir.path(), &r(12)).unwrap();
        assert_eq!(contradicted(dir.path()).unwrap(), Some(r(9)));
    }
}
