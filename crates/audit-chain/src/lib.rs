//! The audit hash chain: canonical event encoding, hashes, signed
//! checkpoints and the offline verifier.
//!
//! Invariants (what the chain proves):
//! - an event's `hash` is `SHA-256(prev_hash_bytes || canonical(event))`,
//!   where `canonical` is the RFC 8785 (JCS) JSON of [`event::Canonical`]
//!   (every field except `hash` and `prev_hash`, sequence included) and the
//!   first event's `prev_hash` is [`GENESIS_HASH`];
//! - each event's `prev_hash` equals the previous event's `hash`, and
//!   sequences are consecutive from 1;
//! - a checkpoint signs (Ed25519) a sequence and the head hash at that
//!   sequence, so rewriting the chain up to a checkpoint is detectable even by
//!   someone who recomputes every hash, given the trusted public key;
//! - a [`Receipt`] (the last sequence and hash audit acknowledged, kept
//!   outside the audit database) proves the log once reached it: a head
//!   below it, or another hash at it, is a cut or rewritten tail, which
//!   hashes and checkpoints alone cannot show.

pub mod checkpoint;
pub mod event;
pub mod receipt;
pub mod verify;

pub use checkpoint::{Checkpoint, CheckpointSigner, verifying_key_from_pem};
pub use event::{Actor, Event, EventError, Outcome, Severity, chain_hash};
pub use receipt::{Receipt, TailError};
pub use verify::{ExportError, ExportLine, Report, Verifier, verify_export, verify_export_from};

/// `prev_hash` of the first event: 32 zero bytes, in hex.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
