//! Audit export files (`vibebox audit verify FILE`, JSON lines of events and
//! checkpoints): the offline verifier never panics on any file; a file it
//! calls intact ends on a head vouched for by a checkpoint of the trusted
//! key (so only the real chain, from its first event, can verify);
//! and it agrees with the streaming `Verifier` the service uses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vibebox_audit_chain::{ExportLine, Verifier, verify_export};
use vibebox_fuzz::{checkpoint_signer, seed_heads};

fuzz_target!(|data: &[u8]| {
    let key = checkpoint_signer().verifying_key();
    let Ok(report) = verify_export(data, &key) else {
        return;
    };
    // The whole file parsed (it is one chunk): so it is UTF-8 JSON lines.
    let text = std::str::from_utf8(data).expect("a verified export is UTF-8");
    let lines: Vec<ExportLine> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("every line of a verified export parses"))
        .collect();
    let events = lines
        .iter()
        .filter(|l| matches!(l, ExportLine::Event(_)))
        .count() as u64;
    assert!(report.events_checked <= events);
    if report.ok && report.head_sequence > 0 {
        assert_eq!(report.signed_through, report.head_sequence);
        assert!(
            seed_heads().contains(&(report.head_sequence, report.head_hash.clone())),
            "a forged export verified: head {} {}",
            report.head_sequence,
            report.head_hash
        );
        assert_eq!(
            report.events_checked, events,
            "an intact export checks every event"
        );
    }
    if !report.ok {
        assert!(!report.reason.is_empty());
    }

    let mut streaming = Verifier::starting_at(key, 1);
    for line in lines {
        streaming.push(line);
    }
    let s = streaming.finish();
    assert_eq!(
        report.ok,
        s.ok && s.signed_through >= s.head_sequence,
        "{report:?} vs {s:?}"
    );
    assert_eq!(report.events_checked, s.events_checked);
    assert_eq!(report.checkpoints_verified, s.checkpoints_verified);
    assert_eq!(report.head_sequence, s.head_sequence);
    assert_eq!(report.head_hash, s.head_hash);
    assert_eq!(report.signed_through, s.signed_through);
    if !s.ok {
        assert_eq!(report.first_broken_sequence, s.first_broken_sequence);
    }
});
