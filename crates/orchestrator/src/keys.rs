//! The public keys clearances are verified with: static keys from a file
//! (tests, air-gapped setups) plus the policy service's keys fetched over
//! mTLS from `ClearanceService.GetClearanceKeys`.
//!
//! Retirement is immediate: the ring is refreshed from policy whenever it is
//! older than [`KeyRefresh::every`] (1 s by default) at the moment a
//! clearance is verified, and the fetched list replaces the old one, so a
//! key policy no longer publishes (retired) is refused within that time. A
//! ring that could not be refreshed for [`KeyRefresh::max_age`] (2 s by
//! default) is not trusted at all: only static keys still verify and every
//! other clearance is refused as unverifiable (fail closed). A key id the
//! ring does not know also triggers a (rate-limited) fetch, so a rotated-in
//! key works at once.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use ed25519_dalek::VerifyingKey;
use tokio::sync::Mutex;
use vibebox_clearance::KeyRing;
use vibebox_proto::clearance::GetClearanceKeysRequest;
use vibebox_proto::clearance::clearance_service_client::ClearanceServiceClient;
use vibebox_server_kit::GrpcChannel;

/// Errors loading keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the clearance public key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("line {line} of {path} is not a 32-byte Ed25519 public key (hex or base64)")]
    Parse { path: String, line: usize },
}

/// Parses a key file: one public key per line, hex or base64 of the 32 raw
/// bytes; blank lines and `#` comments ignored.
pub fn load_key_file(path: &Path) -> Result<Vec<VerifyingKey>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bytes = hex::decode(line)
            .ok()
            .or_else(|| base64::engine::general_purpose::STANDARD.decode(line).ok());
        let key = bytes
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .and_then(|b| VerifyingKey::from_bytes(&b).ok())
            .ok_or_else(|| KeyError::Parse {
                path: path.display().to_string(),
                line: i + 1,
            })?;
        keys.push(key);
    }
    Ok(keys)
}

/// How often the ring is refreshed from policy and how old it may get.
#[derive(Debug, Clone, Copy)]
pub struct KeyRefresh {
    /// A ring older than this is refreshed before it verifies a clearance.
    pub every: Duration,
    /// A ring older than this (policy unreachable) verifies nothing but the
    /// static keys.
    pub max_age: Duration,
    /// Minimum time between fetches triggered by an unknown key id.
    pub unknown_key_min_interval: Duration,
}

impl Default for KeyRefresh {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(1),
            max_age: Duration::from_secs(2),
            unknown_key_min_interval: Duration::from_secs(10),
        }
    }
}

/// The ring cannot be trusted: policy has not answered for too long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the clearance keys could not be refreshed from the policy service for {age_ms} ms (at most {max_age_ms} ms allowed); refusing to verify clearances with possibly retired keys"
)]
pub struct StaleKeys {
    /// Milliseconds since the last successful refresh (`u64::MAX`: never).
    pub age_ms: u64,
    pub max_age_ms: u64,
}

struct State {
    ring: KeyRing,
    /// When the request behind the current ring was sent (conservative).
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    last_unknown_fetch: Option<Instant>,
    /// Key ids policy published once and no longer does: refused as
    /// retired (rather than unknown) so the refusal says why.
    withdrawn: BTreeSet<String>,
}

/// Upper bound for one `GetClearanceKeys` call.
const FETCH_TIMEOUT: Duration = Duration::from_secs(1);
/// Failed fetches are retried at most this often.
const RETRY_MIN: Duration = Duration::from_millis(100);

/// The key ring with its refresh policy.
pub struct ClearanceKeys {
    static_keys: Vec<VerifyingKey>,
    policy: Option<ClearanceServiceClient<GrpcChannel>>,
    refresh: KeyRefresh,
    state: Mutex<State>,
}

impl ClearanceKeys {
    /// Keys from `static_keys`, plus those of the policy service when a
    /// channel is given, refreshed as `refresh` says.
    pub fn new(
        static_keys: Vec<VerifyingKey>,
        policy: Option<GrpcChannel>,
        refresh: KeyRefresh,
    ) -> Self {
        ClearanceKeys {
            state: Mutex::new(State {
                ring: static_ring(&static_keys),
                fetched_at: None,
                last_attempt: None,
                last_unknown_fetch: None,
                withdrawn: BTreeSet::new(),
            }),
            static_keys,
            policy: policy.map(ClearanceServiceClient::new),
            refresh,
        }
    }

    /// The ring to verify a clearance signed by `key_id` with: refreshed
    /// from policy when older than `every` (or when it does not know
    /// `key_id`, rate limited). A ring older than `max_age` is refused
    /// unless `key_id` is a static key.
    pub async fn ring_for(&self, key_id: &str) -> Result<KeyRing, StaleKeys> {
        let Some(policy) = &self.policy else {
            return Ok(static_ring(&self.static_keys));
        };
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let old = state
            .fetched_at
            .is_none_or(|t| now.duration_since(t) >= self.refresh.every);
        let unknown = !state.ring.contains(key_id)
            && state
                .last_unknown_fetch
                .is_none_or(|t| now.duration_since(t) >= self.refresh.unknown_key_min_interval);
        let may_retry = state
            .last_attempt
            .is_none_or(|t| now.duration_since(t) >= RETRY_MIN);
        if (old && may_retry) || unknown {
            if unknown {
                state.last_unknown_fetch = Some(now);
            }
            state.last_attempt = Some(now);
            let mut client = policy.clone();
            let fetch = client.get_clearance_keys(GetClearanceKeysRequest {});
            match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
                Ok(Ok(resp)) => {
                    let mut ring = KeyRing::from_proto(&resp.into_inner().keys);
                    for k in &self.static_keys {
                        ring.insert(*k);
                    }
                    let published = key_ids(&ring);
                    let before = key_ids(&state.ring);
                    state
                        .withdrawn
                        .extend(before.difference(&published).cloned());
                    state.withdrawn.retain(|id| !published.contains(id));
                    for id in &state.withdrawn {
                        ring.retire(id);
                    }
                    if ring.len() != state.ring.len() || state.fetched_at.is_none() {
                        tracing::info!(keys = ring.len(), "refreshed clearance keys from policy");
                    }
                    state.ring = ring;
                    state.fetched_at = Some(now);
                }
                Ok(Err(status)) => {
                    tracing::warn!(code = ?status.code(), "cannot fetch clearance keys from policy");
                }
                Err(_) => {
                    tracing::warn!("fetching clearance keys from policy timed out");
                }
            }
        }
        let age = state.fetched_at.map(|t| Instant::now().duration_since(t));
        if age.is_some_and(|a| a <= self.refresh.max_age) {
            return Ok(state.ring.clone());
        }
        // Stale: whatever policy published may have been retired since.
        let ring = static_ring(&self.static_keys);
        if ring.contains(key_id) {
            return Ok(ring);
        }
        Err(StaleKeys {
            age_ms: age.map_or(u64::MAX, |a| {
                u64::try_from(a.as_millis()).unwrap_or(u64::MAX)
            }),
            max_age_ms: u64::try_from(self.refresh.max_age.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

fn key_ids(ring: &KeyRing) -> BTreeSet<String> {
    ring.to_proto().into_iter().map(|k| k.key_id).collect()
}

fn static_ring(keys: &[VerifyingKey]) -> KeyRing {
    let mut ring = KeyRing::new();
    for k in keys {
        ring.insert(*k);
    }
    ring
}

#[cfg(test)]
mod tests {
    use vibebox_clearance::ClearanceSigner;

    use super::*;

    fn unreachable_policy() -> (vibebox_server_kit::testing::TestPki, GrpcChannel) {
        let pki = vibebox_server_kit::testing::TestPki::new();
        // Nothing listens on the discard port.
        let channel =
            vibebox_server_kit::connect("https://127.0.0.1:9", &pki.material("orchestrator"))
                .unwrap();
        (pki, channel)
    }

    #[tokio::test]
    async fn without_policy_only_static_keys_verify() {
        let signer = ClearanceSigner::generate();
        let keys = ClearanceKeys::new(vec![signer.verifying_key()], None, KeyRefresh::default());
        let ring = keys.ring_for(signer.key_id()).await.unwrap();
        assert!(ring.contains(signer.key_id()));
        assert_eq!(ring.len(), 1);
    }

    #[tokio::test]
    async fn a_ring_policy_never_refreshed_is_stale_except_for_static_keys() {
        let (_pki, channel) = unreachable_policy();
        let fixed = ClearanceSigner::generate();
        let keys = ClearanceKeys::new(
            vec![fixed.verifying_key()],
            Some(channel),
            KeyRefresh {
                every: Duration::from_millis(50),
                max_age: Duration::from_millis(100),
                unknown_key_min_interval: Duration::from_secs(10),
            },
        );
        // A static key is the operator's own: it still verifies.
        assert!(
            keys.ring_for(fixed.key_id())
                .await
                .unwrap()
                .contains(fixed.key_id())
        );
        let err = keys.ring_for("ed25519:0123456789abcdef").await.unwrap_err();
        assert_eq!(err.age_ms, u64::MAX);
        assert_eq!(err.max_age_ms, 100);
        assert!(err.to_string().contains("could not be refreshed"), "{err}");
    }
}
