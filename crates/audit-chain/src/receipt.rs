//! Receipts: what a cut tail contradicts.
//!
//! Hashes and checkpoints prove the log up to its last signed checkpoint;
//! they say nothing about events deleted after it (or with it). A receipt is
//! the last `(sequence, hash)` audit acknowledged to someone who keeps it
//! outside the audit database: each producer keeps its own (beside its
//! outbox), and the audit service keeps its own head record beside the
//! database. Checked against the log, a receipt proves the log once reached
//! that sequence with that hash: a head below it means the tail was cut, a
//! different hash at its sequence means the tail was rewritten.

/// The last event audit acknowledged to `holder`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Receipt {
    /// Who holds the receipt (for messages: `identity (producer 0193…)`).
    pub holder: String,
    /// The acknowledged sequence; 0 for nothing acknowledged yet.
    pub sequence: u64,
    /// The acknowledged event's chain hash (hex).
    pub hash: String,
}

/// A receipt the log contradicts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TailError {
    #[error(
        "tail truncated: {holder} was acknowledged sequence {sequence} (hash {hash}), but the log head is {head}"
    )]
    Truncated {
        holder: String,
        sequence: u64,
        hash: String,
        head: u64,
    },
    #[error(
        "tail rewritten: {holder} was acknowledged sequence {sequence} with hash {hash}, but the log holds {found} there"
    )]
    Rewritten {
        holder: String,
        sequence: u64,
        hash: String,
        found: String,
    },
}

impl TailError {
    /// The first sequence the log no longer holds as acknowledged.
    pub fn first_broken_sequence(&self) -> u64 {
        match self {
            TailError::Truncated { head, .. } => head + 1,
            TailError::Rewritten { sequence, .. } => *sequence,
        }
    }

    /// The receipt's holder.
    pub fn holder(&self) -> &str {
        match self {
            TailError::Truncated { holder, .. } | TailError::Rewritten { holder, .. } => holder,
        }
    }

    /// The receipt's sequence.
    pub fn sequence(&self) -> u64 {
        match self {
            TailError::Truncated { sequence, .. } | TailError::Rewritten { sequence, .. } => {
                *sequence
            }
        }
    }
}

impl Receipt {
    /// Checks the receipt against a log whose head is `head` and which holds
    /// `hash_at` at the receipt's sequence (`None`: no such event).
    pub fn check(&self, head: u64, hash_at: Option<&str>) -> Result<(), TailError> {
        if self.sequence == 0 {
            return Ok(());
        }
        match hash_at {
            _ if head < self.sequence => Err(TailError::Truncated {
                holder: self.holder.clone(),
                sequence: self.sequence,
                hash: self.hash.clone(),
                head,
            }),
            // Below the head but gone: cut out of the middle.
            None => Err(TailError::Rewritten {
                holder: self.holder.clone(),
                sequence: self.sequence,
                hash: self.hash.clone(),
                found: "no event".into(),
            }),
            Some(found) if !found.eq_ignore_ascii_case(&self.hash) => Err(TailError::Rewritten {
                holder: self.holder.clone(),
                sequence: self.sequence,
                hash: self.hash.clone(),
                found: found.to_owned(),
            }),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(sequence: u64, hash: &str) -> Receipt {
        Receipt {
            holder: "identity".into(),
            sequence,
            hash: hash.into(),
        }
    }

    #[test]
    fn a_receipt_within_the_log_with_its_hash_holds() {
        assert_eq!(receipt(5, "ab").check(9, Some("ab")), Ok(()));
        assert_eq!(receipt(5, "ab").check(5, Some("AB")), Ok(()));
        assert_eq!(receipt(0, "").check(0, None), Ok(()));
    }

    #[test]
    fn a_head_behind_the_receipt_is_a_cut_tail() {
        let err = receipt(10, "ab").check(7, None).unwrap_err();
        assert_eq!(err.first_broken_sequence(), 8);
        assert_eq!(
            err.to_string(),
            "tail truncated: identity was acknowledged sequence 10 (hash ab), but the log head is 7"
        );
    }

    #[test]
    fn another_hash_at_the_receipt_is_a_rewritten_tail() {
        let err = receipt(10, "ab").check(12, Some("cd")).unwrap_err();
        assert_eq!(err.first_broken_sequence(), 10);
        assert!(err.to_string().starts_with("tail rewritten"), "{err}");
        let gone = receipt(10, "ab").check(12, None).unwrap_err();
        assert!(matches!(gone, TailError::Rewritten { .. }));
    }
}
