//! Signed checkpoints: the audit service's Ed25519 signature over a sequence
//! number and the chain's head hash at that sequence.

use chrono::{DateTime, Utc};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::event::canonical_time;

/// Domain separation prefix of the signed message.
const CONTEXT: &[u8] = b"vibebox.audit.checkpoint.v1\n";

/// A signed statement "event `sequence` has hash `head_hash`".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub sequence: u64,
    pub head_hash: String,
    pub time: DateTime<Utc>,
    /// Identifies the signing key: hex of the first 8 bytes of SHA-256 of
    /// the raw public key.
    pub key_id: String,
    /// Hex Ed25519 signature over the checkpoint's signed message.
    pub signature: String,
}

#[derive(Serialize)]
struct SignedBody<'a> {
    head_hash: &'a str,
    key_id: &'a str,
    sequence: u64,
    time: String,
}

fn signed_message(sequence: u64, head_hash: &str, time: &DateTime<Utc>, key_id: &str) -> Vec<u8> {
    let body = SignedBody {
        head_hash,
        key_id,
        sequence,
        time: canonical_time(time),
    };
    let mut message = CONTEXT.to_vec();
    message.extend(serde_jcs::to_vec(&body).unwrap_or_default());
    message
}

/// The key id of a public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Reads a public key in SPKI PEM (`-----BEGIN PUBLIC KEY-----`).
pub fn verifying_key_from_pem(pem: &str) -> Result<VerifyingKey, CheckpointError> {
    VerifyingKey::from_public_key_pem(pem).map_err(|_| CheckpointError::BadKey)
}

/// Errors of checkpoint keys and signatures.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckpointError {
    #[error("the key is not a valid Ed25519 key in PEM")]
    BadKey,
    #[error("checkpoint signed by key {found}, expected {expected}")]
    UnknownKey { found: String, expected: String },
    #[error("checkpoint signature is invalid")]
    BadSignature,
}

impl Checkpoint {
    /// Checks the signature with the trusted `key`.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), CheckpointError> {
        let expected = key_id(key);
        if self.key_id != expected {
            return Err(CheckpointError::UnknownKey {
                found: self.key_id.clone(),
                expected,
            });
        }
        let mut bytes = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut bytes)
            .map_err(|_| CheckpointError::BadSignature)?;
        let message = signed_message(self.sequence, &self.head_hash, &self.time, &self.key_id);
        key.verify(&message, &Signature::from_bytes(&bytes))
            .map_err(|_| CheckpointError::BadSignature)
    }
}

/// The audit service's checkpoint key.
pub struct CheckpointSigner {
    key: SigningKey,
    key_id: String,
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self::from_key(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    fn from_key(key: SigningKey) -> Self {
        let key_id = key_id(&key.verifying_key());
        Self { key, key_id }
    }

    /// Reads a PKCS#8 PEM private key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, CheckpointError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self::from_key)
            .map_err(|_| CheckpointError::BadKey)
    }

    /// The private key as PKCS#8 PEM (to store with 0600 permissions).
    pub fn to_pkcs8_pem(&self) -> Result<String, CheckpointError> {
        self.key
            .to_pkcs8_pem(Default::default())
            .map(|pem| pem.to_string())
            .map_err(|_| CheckpointError::BadKey)
    }

    /// The public key as SPKI PEM, for offline verifiers.
    pub fn public_key_pem(&self) -> Result<String, CheckpointError> {
        self.key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .map_err(|_| CheckpointError::BadKey)
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs "event `sequence` has hash `head_hash`" now.
    pub fn sign(&self, sequence: u64, head_hash: &str) -> Checkpoint {
        let time = Utc::now();
        let message = signed_message(sequence, head_hash, &time, &self.key_id);
        Checkpoint {
            sequence,
            head_hash: head_hash.to_owned(),
            time,
            key_id: self.key_id.clone(),
            signature: hex::encode(self.key.sign(&message).to_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies_and_detects_changes() {
        let signer = CheckpointSigner::generate();
        let cp = signer.sign(10, &"ab".repeat(32));
        assert_eq!(cp.verify(&signer.verifying_key()), Ok(()));
        let mut forged = cp.clone();
        forged.head_hash = "cd".repeat(32);
        assert_eq!(
            forged.verify(&signer.verifying_key()),
            Err(CheckpointError::BadSignature)
        );
        let other = CheckpointSigner::generate();
        assert!(matches!(
            cp.verify(&other.verifying_key()),
            Err(CheckpointError::UnknownKey { .. })
        ));
    }

    #[test]
    fn keys_round_trip_through_pem() {
        let signer = CheckpointSigner::generate();
        let again = CheckpointSigner::from_pkcs8_pem(&signer.to_pkcs8_pem().unwrap()).unwrap();
        assert_eq!(again.key_id(), signer.key_id());
        let public = verifying_key_from_pem(&signer.public_key_pem().unwrap()).unwrap();
        assert_eq!(public, signer.verifying_key());
    }
}
