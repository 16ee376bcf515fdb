//! Suite reports: the attack, chaos and load suites count what they tried,
//! what was refused and which containers they inspected. Each test appends
//! one JSON line to `target/suite-report.jsonl`; `scripts/suite-report.sh`
//! (called at the end of `tests/run.sh`) prints the totals.

use std::io::Write;
use std::path::PathBuf;

/// Counters of one test of one suite, written when dropped.
#[derive(Debug)]
pub struct SuiteReport {
    suite: &'static str,
    test: &'static str,
    /// Cases tried (requests, attacks, iterations).
    pub tried: u64,
    /// Cases refused as they must be.
    pub refused: u64,
    /// Containers whose hardening was inspected with the Docker API.
    pub inspected: u64,
    /// Free-form figures (RSS before/after, iterations, ...).
    pub notes: Vec<(String, String)>,
}

impl SuiteReport {
    pub fn new(suite: &'static str, test: &'static str) -> Self {
        Self {
            suite,
            test,
            tried: 0,
            refused: 0,
            inspected: 0,
            notes: Vec::new(),
        }
    }

    /// Counts one case; `refused` says whether it was refused.
    pub fn case(&mut self, refused: bool) {
        self.tried += 1;
        if refused {
            self.refused += 1;
        }
    }

    pub fn note(&mut self, key: impl Into<String>, value: impl ToString) {
        self.notes.push((key.into(), value.to_string()));
    }

    /// Where the reports go: `target/suite-report.jsonl`.
    pub fn path() -> PathBuf {
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/deps/<test> -> target/
        exe.ancestors()
            .nth(3)
            .expect("target dir")
            .join("suite-report.jsonl")
    }

    fn to_json(&self) -> String {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let notes = self
            .notes
            .iter()
            .map(|(k, v)| format!("\"{}\":\"{}\"", esc(k), esc(v)))
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "{{\"suite\":\"{}\",\"test\":\"{}\",\"tried\":{},\"refused\":{},\"inspected\":{},\"passed\":{},\"notes\":{{{}}}}}",
            self.suite,
            self.test,
            self.tried,
            self.refused,
            self.inspected,
            !std::thread::panicking(),
            notes
        )
    }
}

impl Drop for SuiteReport {
    fn drop(&mut self) {
        let line = self.to_json();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Self::path())
        {
            let _ = writeln!(f, "{line}");
        }
    }
}
