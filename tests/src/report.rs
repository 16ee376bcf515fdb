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
        let line = Line {
            suite: self.suite,
            test: self.test,
            tried: self.tried,
            refused: self.refused,
            inspected: self.inspected,
            passed: !std::thread::panicking(),
            notes: &self.notes,
        };
        serde_json::to_string(&line).expect("a report line is plain data")
    }
}

/// One line of `suite-report.jsonl`, fields in this order.
#[derive(serde::Serialize)]
struct Line<'a> {
    suite: &'a str,
    test: &'a str,
    tried: u64,
    refused: u64,
    inspected: u64,
    passed: bool,
    /// An object, notes in the order they were taken.
    #[serde(serialize_with = "notes_as_object")]
    notes: &'a [(String, String)],
}

fn notes_as_object<S: serde::Serializer>(
    notes: &&[(String, String)],
    out: S,
) -> Result<S::Ok, S::Error> {
    out.collect_map(notes.iter().map(|(k, v)| (k, v)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_line_is_json_whatever_the_notes_hold() {
        let mut report = SuiteReport::new("attack", "quotes_and_newlines");
        report.case(true);
        report.case(false);
        report.note("rss \"before\"", "1\n2\t\u{1}\\");
        report.note("iterations", 3);
        let line = report.to_json();
        std::mem::forget(report); // no line in target/ from a unit test
        assert!(!line.contains('\n'), "{line}");
        let parsed: serde_json::Value = serde_json::from_str(&line).expect(&line);
        assert_eq!(parsed["suite"], "attack");
        assert_eq!(parsed["tried"], 2);
        assert_eq!(parsed["refused"], 1);
        assert_eq!(parsed["passed"], true);
        assert_eq!(parsed["notes"]["rss \"before\""], "1\n2\t\u{1}\\");
        assert_eq!(parsed["notes"]["iterations"], "3");
        assert!(
            line.starts_with(r#"{"suite":"attack","test":"quotes_and_newlines","tried":2,"refused":1,"inspected":0,"passed":true,"notes":{"#),
            "{line}"
        );
    }
}
