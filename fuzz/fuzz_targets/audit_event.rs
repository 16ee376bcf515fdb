//! Audit events as an export file carries them (one JSON object): parsing
//! never panics; the hand-written canonical encoding the chain hashes is
//! byte for byte RFC 8785 (`serde_jcs`) of the canonical view; and writing
//! an event out and reading it back (an export, a stored row) keeps its
//! canonical bytes and hash, and its time survives the wire type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vibebox_audit_chain::event::{time_from_proto, time_to_proto};
use vibebox_audit_chain::{Event, ExportLine};
use vibebox_fuzz::{checkpoint_signer, seed_heads};
use vibebox_proto::audit as pb;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ExportLine::Checkpoint(cp)) = serde_json::from_str::<ExportLine>(text)
        && cp.verify(&checkpoint_signer().verifying_key()).is_ok()
    {
        assert!(
            seed_heads().contains(&(cp.sequence, cp.head_hash.clone())),
            "a forged checkpoint verified"
        );
    }
    let Ok(event) = serde_json::from_str::<Event>(text) else {
        return;
    };
    let fast = event.canonical_bytes();
    let slow = serde_jcs::to_vec(&event.canonical_view()).expect("JCS encodes");
    assert_eq!(
        String::from_utf8_lossy(&fast),
        String::from_utf8_lossy(&slow),
        "canonical bytes differ from RFC 8785"
    );
    assert_eq!(fast, slow);
    let value: serde_json::Value = serde_json::from_slice(&fast).expect("canonical bytes are JSON");
    assert_eq!(
        serde_jcs::to_vec(&value).expect("JCS"),
        fast,
        "JCS is idempotent"
    );

    let json = serde_json::to_string(&event).expect("an event serializes");
    let back: Event = serde_json::from_str(&json).expect("an exported event parses");
    assert_eq!(
        back.canonical_bytes(),
        fast,
        "export round trip changed the event"
    );
    assert_eq!(back.compute_hash(), event.compute_hash());

    let wire = pb::AuditEvent::from(&event);
    let time = wire.time.as_ref().expect("time is set");
    assert_eq!(
        time_from_proto(time),
        Some(event.time),
        "time survives the wire"
    );
    assert_eq!(time_to_proto(&event.time), *time);
});
