//! Policy clearances: the canonical spec digest, signing and verification
//! bound to exactly one hardened spec.
//!
//! The policy service signs a [`ClearanceBody`] with an Ed25519 key
//! ([`ClearanceSigner`], persisted by a [`KeyStore`]); the orchestrator checks
//! it with [`verify`] against the spec it is about to create and the public
//! keys of a [`KeyRing`] (fetched from `ClearanceService.GetClearanceKeys`).
//!
//! Invariant: a clearance that verifies binds the exact hardened spec (by
//! SHA-256 of its protobuf encoding), the environment id and the team, and has
//! not expired. Replay protection (remembering used `clearance_id`s) is the
//! verifier's job.

mod keys;
mod store;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use sha2::{Digest, Sha256};
use vibebox_proto::clearance::{Clearance, ClearanceBody};
use vibebox_proto::environment::ContainerSpec;

pub use keys::{ClearanceSigner, KeyRing, key_id_for};
pub use store::{KeyStore, StoreError};

/// How long a clearance is valid by default: the orchestrator must use it
/// within about a minute.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);

/// How far a clearance's issue time may lie in the verifier's future (clock
/// skew between the policy service and the orchestrator).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// SHA-256 of the protobuf encoding of `spec` (prost encodes fields in tag
/// order and maps as sorted `BTreeMap`s, so the encoding is deterministic).
pub fn spec_digest(spec: &ContainerSpec) -> [u8; 32] {
    Sha256::digest(spec.encode_to_vec()).into()
}

/// Lower-case hex of [`spec_digest`].
pub fn spec_digest_hex(spec: &ContainerSpec) -> String {
    hex::encode(spec_digest(spec))
}

/// What a new clearance grants (everything except id and times).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    pub environment_id: String,
    pub team_id: String,
    pub user_id: String,
    pub policy_digest: String,
    pub policy_version: String,
}

/// Builds the body of a fresh clearance for `hardened_spec`, with a new UUID
/// as its id, issued at `now` and expiring `ttl` later.
pub fn new_body(
    hardened_spec: &ContainerSpec,
    grant: Grant,
    now: SystemTime,
    ttl: Duration,
) -> ClearanceBody {
    ClearanceBody {
        clearance_id: uuid::Uuid::new_v4().to_string(),
        spec_digest: spec_digest(hardened_spec).to_vec(),
        environment_id: grant.environment_id,
        team_id: grant.team_id,
        user_id: grant.user_id,
        policy_digest: grant.policy_digest,
        policy_version: grant.policy_version,
        issue_time: Some(to_timestamp(now)),
        expire_time: Some(to_timestamp(now + ttl)),
    }
}

/// Why a clearance was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("clearance signed by unknown key {0:?}")]
    UnknownKey(String),
    #[error("clearance signed by retired key {0:?}")]
    RetiredKey(String),
    #[error("clearance signature is invalid")]
    BadSignature,
    #[error("clearance body does not decode")]
    MalformedBody,
    #[error("clearance does not match the spec")]
    SpecMismatch,
    #[error("clearance is for another environment")]
    EnvironmentMismatch,
    #[error("clearance is for another team")]
    TeamMismatch,
    #[error("clearance has expired")]
    Expired,
    #[error("clearance is not valid yet")]
    NotYetValid,
    #[error("clearance lacks issue or expiry time")]
    MissingTime,
}

/// What a verifier expects a clearance to bind.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The spec about to be applied (the hardened spec the gateway got back).
    pub spec: &'a ContainerSpec,
    pub environment_id: &'a str,
    pub team_id: &'a str,
}

/// Verifies `clearance` against the key ring and what the verifier is about to
/// do, at time `now`. Returns the verified body (its `clearance_id` is what a
/// replay check must remember).
pub fn verify(
    clearance: &Clearance,
    keys: &KeyRing,
    expected: Expected<'_>,
    now: SystemTime,
) -> Result<ClearanceBody, VerifyError> {
    keys.verify_signature(&clearance.key_id, &clearance.body, &clearance.signature)?;
    let body =
        ClearanceBody::decode(clearance.body.as_slice()).map_err(|_| VerifyError::MalformedBody)?;
    if body.spec_digest.as_slice() != spec_digest(expected.spec).as_slice() {
        return Err(VerifyError::SpecMismatch);
    }
    if body.environment_id.is_empty() || body.environment_id != expected.environment_id {
        return Err(VerifyError::EnvironmentMismatch);
    }
    if body.team_id.is_empty() || body.team_id != expected.team_id {
        return Err(VerifyError::TeamMismatch);
    }
    let (Some(issued), Some(expires)) = (&body.issue_time, &body.expire_time) else {
        return Err(VerifyError::MissingTime);
    };
    let issued = from_timestamp(issued).ok_or(VerifyError::MissingTime)?;
    let expires = from_timestamp(expires).ok_or(VerifyError::MissingTime)?;
    if issued > now + MAX_CLOCK_SKEW {
        return Err(VerifyError::NotYetValid);
    }
    if now >= expires {
        return Err(VerifyError::Expired);
    }
    Ok(body)
}

fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn from_timestamp(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok().filter(|n| *n < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests;
