//! The public keys clearances are verified with: static keys from a file
//! (tests, air-gapped setups) plus the policy service's keys fetched over
//! mTLS from `ClearanceService.GetClearanceKeys`, refreshed (rate limited)
//! when a clearance names a key id the ring does not know.

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

struct State {
    ring: KeyRing,
    last_fetch: Option<Instant>,
}

/// The key ring with its refresh policy.
pub struct ClearanceKeys {
    static_keys: Vec<VerifyingKey>,
    policy: Option<ClearanceServiceClient<GrpcChannel>>,
    min_refresh: Duration,
    state: Mutex<State>,
}

impl ClearanceKeys {
    /// Keys from `static_keys`, plus those of the policy service when a
    /// channel is given; an unknown key id triggers a fetch at most once per
    /// `min_refresh`.
    pub fn new(
        static_keys: Vec<VerifyingKey>,
        policy: Option<GrpcChannel>,
        min_refresh: Duration,
    ) -> Self {
        let mut ring = KeyRing::new();
        for k in &static_keys {
            ring.insert(*k);
        }
        ClearanceKeys {
            static_keys,
            policy: policy.map(ClearanceServiceClient::new),
            min_refresh,
            state: Mutex::new(State {
                ring,
                last_fetch: None,
            }),
        }
    }

    /// A ring that knows `key_id` if any source does (fetching from the
    /// policy service when needed and allowed by the rate limit).
    pub async fn ring_for(&self, key_id: &str) -> KeyRing {
        let mut state = self.state.lock().await;
        if state.ring.contains(key_id) {
            return state.ring.clone();
        }
        let Some(policy) = &self.policy else {
            return state.ring.clone();
        };
        if state
            .last_fetch
            .is_some_and(|t| t.elapsed() < self.min_refresh)
        {
            return state.ring.clone();
        }
        state.last_fetch = Some(Instant::now());
        match policy
            .clone()
            .get_clearance_keys(GetClearanceKeysRequest {})
            .await
        {
            Ok(resp) => {
                let mut ring = KeyRing::from_proto(&resp.into_inner().keys);
                for k in &self.static_keys {
                    ring.insert(*k);
                }
                tracing::info!(keys = ring.len(), "refreshed clearance keys from policy");
                state.ring = ring;
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), "cannot fetch clearance keys from policy");
            }
        }
        state.ring.clone()
    }
}
