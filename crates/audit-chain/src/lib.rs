//! The audit hash chain: canonical event encoding, hashes, signed checkpoints and the offline verifier.
