//! What the gate reports, as JSON lines on stdout (the orchestrator follows
//! the gate's log through the engine, audits and counts): the first refusal
//! per destination, and the running counts whenever they change.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// One line of the gate's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GateEvent {
    /// The gate listens.
    Ready { listen: String },
    /// The first refusal of a destination (`name:port` or `address:port`).
    EgressDenied {
        destination: String,
        address: String,
        code: String,
        reason: String,
    },
    /// Connections allowed and refused since the gate started.
    EgressCounts { allowed: u64, denied: u64 },
}

impl GateEvent {
    /// Parses one output line; `None` for anything else.
    pub fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line.trim()).ok()
    }
}

/// Distinct destinations reported per gate; past this only counts grow.
const MAX_REPORTED: usize = 1024;

/// The gate's counters and report.
#[derive(Default)]
pub struct Events {
    allowed: AtomicU64,
    denied: AtomicU64,
    reported: Mutex<HashSet<String>>,
}

impl Events {
    pub fn emit(&self, event: &GateEvent) {
        if let Ok(line) = serde_json::to_string(event) {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    pub fn allowed(&self) {
        self.allowed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refusal, and reports it when it is the first for
    /// `destination`.
    pub fn denied(&self, destination: &str, address: &str, code: &str, reason: &str) {
        self.denied.fetch_add(1, Ordering::Relaxed);
        let first = {
            let mut seen = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            seen.len() < MAX_REPORTED && seen.insert(destination.to_owned())
        };
        if first {
            self.emit(&GateEvent::EgressDenied {
                destination: destination.to_owned(),
                address: address.to_owned(),
                code: code.to_owned(),
                reason: reason.to_owned(),
            });
        }
    }

    pub fn counts(&self) -> (u64, u64) {
        (
            self.allowed.load(Ordering::Relaxed),
            self.denied.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let e = GateEvent::EgressDenied {
            destination: "evil.test:443".into(),
            address: "10.0.0.1".into(),
            code: "private".into(),
            reason: "private destination".into(),
        };
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.contains("\"event\":\"egress_denied\""));
        assert_eq!(GateEvent::parse(&line), Some(e));
        assert_eq!(GateEvent::parse("garbage"), None);
    }

    #[test]
    fn only_the_first_refusal_per_destination_is_reported() {
        let events = Events::default();
        for _ in 0..3 {
            events.denied("a:1", "", "x", "y");
        }
        events.denied("b:1", "", "x", "y");
        assert_eq!(events.counts(), (0, 4));
        assert_eq!(events.reported.lock().unwrap().len(), 2);
    }
}
