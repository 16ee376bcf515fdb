//! Ed25519 signing keys with key ids, and the key ring verifiers use.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use prost::Message;
use sha2::{Digest, Sha256};
use vibebox_proto::clearance::{Clearance, ClearanceBody, ClearanceKey};

use crate::VerifyError;

/// The key id of a public key: `ed25519:` and the first 16 hex digits of the
/// SHA-256 of its 32 bytes.
pub fn key_id_for(public: &VerifyingKey) -> String {
    let digest = Sha256::digest(public.as_bytes());
    format!("ed25519:{}", hex::encode(&digest[..8]))
}

/// A signing key with its key id.
pub struct ClearanceSigner {
    key_id: String,
    key: SigningKey,
}

impl std::fmt::Debug for ClearanceSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("ClearanceSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl ClearanceSigner {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self::from_key(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    pub(crate) fn from_key(key: SigningKey) -> Self {
        Self {
            key_id: key_id_for(&key.verifying_key()),
            key,
        }
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The public half as sent by `GetClearanceKeys`.
    pub fn public_key(&self) -> ClearanceKey {
        ClearanceKey {
            key_id: self.key_id.clone(),
            public_key: self.verifying_key().to_bytes().to_vec(),
        }
    }

    /// Signs the exact encoding of `body`.
    pub fn sign(&self, body: &ClearanceBody) -> Clearance {
        let body = body.encode_to_vec();
        let signature = self.key.sign(&body);
        Clearance {
            body,
            key_id: self.key_id.clone(),
            signature: signature.to_bytes().to_vec(),
        }
    }
}

/// Public keys accepted for verification, by key id, plus retired key ids
/// that are refused even if still present.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<String, VerifyingKey>,
    retired: BTreeSet<String>,
}

impl KeyRing {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a public key; its id must be the one derived from the key.
    pub fn insert(&mut self, key: VerifyingKey) -> String {
        let id = key_id_for(&key);
        self.keys.insert(id.clone(), key);
        id
    }

    /// Builds a ring from `GetClearanceKeys` entries. Entries whose bytes are
    /// not a valid key, or whose id does not match the key, are skipped.
    pub fn from_proto(keys: &[ClearanceKey]) -> Self {
        let mut ring = Self::new();
        for k in keys {
            let Ok(bytes) = <[u8; 32]>::try_from(k.public_key.as_slice()) else {
                continue;
            };
            let Ok(vk) = VerifyingKey::from_bytes(&bytes) else {
                continue;
            };
            if key_id_for(&vk) == k.key_id {
                ring.insert(vk);
            }
        }
        ring
    }

    /// The accepted keys in `GetClearanceKeys` form (retired ones left out).
    pub fn to_proto(&self) -> Vec<ClearanceKey> {
        self.keys
            .iter()
            .filter(|(id, _)| !self.retired.contains(*id))
            .map(|(id, k)| ClearanceKey {
                key_id: id.clone(),
                public_key: k.to_bytes().to_vec(),
            })
            .collect()
    }

    /// Refuses clearances signed by `key_id` from now on.
    pub fn retire(&mut self, key_id: &str) {
        self.retired.insert(key_id.to_owned());
    }

    pub fn contains(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id) && !self.retired.contains(key_id)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
            - self
                .keys
                .keys()
                .filter(|k| self.retired.contains(*k))
                .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn verify_signature(
        &self,
        key_id: &str,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), VerifyError> {
        if self.retired.contains(key_id) {
            return Err(VerifyError::RetiredKey(key_id.to_owned()));
        }
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| VerifyError::UnknownKey(key_id.to_owned()))?;
        let signature = Signature::from_slice(signature).map_err(|_| VerifyError::BadSignature)?;
        key.verify_strict(message, &signature)
            .map_err(|_| VerifyError::BadSignature)
    }
}
