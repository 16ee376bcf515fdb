//! Audit events of the orchestrator, recorded through the durable audit
//! client (fail closed: an operation whose event cannot be written fails).
//! The most recent events are also kept in memory so tests and operators can
//! see what was recorded without the audit service.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use prost_types::{Struct, Value, value::Kind};
use vibebox_audit_client::{AuditClient, AuditClientError};
use vibebox_proto::audit::{Actor, AuditEvent, Outcome, Severity};

use crate::SERVICE_NAME;

/// The id of the one event recording that `action` succeeded on an
/// environment (a UUID of version 8 made of the environment id and the
/// action): the same on every attempt, for [`Audit::record_once`].
pub fn once_id(environment_id: &str, action: &str) -> String {
    let mut bytes = uuid::Uuid::parse_str(environment_id)
        .map(uuid::Uuid::into_bytes)
        .unwrap_or_default();
    // FNV-1a over the action, spread over the 16 bytes.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in action.bytes().chain(environment_id.bytes()) {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte ^= hash.rotate_left(8 * (i as u32 % 8) + i as u32 / 8) as u8;
    }
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Who asked for an operation (from the gateway's `Caller`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub token_id: String,
    pub request_id: String,
    pub client_address: String,
}

const RECENT: usize = 4096;

/// The orchestrator's audit recorder.
#[derive(Clone)]
pub struct Audit {
    client: AuditClient,
    recent: Arc<Mutex<VecDeque<AuditEvent>>>,
}

/// One event to record.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    pub action: &'a str,
    pub outcome: Outcome,
    pub severity: Severity,
    /// `None` means the orchestrator acted on its own (reconcile).
    pub caller: Option<&'a Caller>,
    pub team_id: &'a str,
    pub environment_id: &'a str,
    pub details: Vec<(&'a str, String)>,
}

impl Audit {
    /// Wraps an opened audit client.
    pub fn new(client: AuditClient) -> Self {
        Audit {
            client,
            recent: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    /// Records an event durably.
    pub async fn record(&self, e: Event<'_>) -> Result<(), AuditClientError> {
        self.record_as(String::new(), e).await
    }

    /// Records an event under a fixed id (see [`once_id`]): recording it
    /// again, as a recovery may, is ignored by the audit service, so the
    /// log holds it exactly once.
    pub async fn record_once(&self, id: String, e: Event<'_>) -> Result<(), AuditClientError> {
        self.record_as(id, e).await
    }

    async fn record_as(&self, id: String, e: Event<'_>) -> Result<(), AuditClientError> {
        let actor = match e.caller {
            Some(c) => Actor {
                user_id: c.user_id.clone(),
                token_id: c.token_id.clone(),
                service: String::new(),
            },
            None => Actor {
                service: SERVICE_NAME.into(),
                ..Default::default()
            },
        };
        let details = Struct {
            fields: e
                .details
                .into_iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(v)),
                        },
                    )
                })
                .collect(),
        };
        let event = AuditEvent {
            id,
            actor: Some(actor),
            team_id: e.team_id.into(),
            action: e.action.into(),
            resource_type: "environment".into(),
            resource_id: e.environment_id.into(),
            outcome: e.outcome as i32,
            severity: e.severity as i32,
            details: Some(details),
            request_id: e.caller.map(|c| c.request_id.clone()).unwrap_or_default(),
            client_address: e
                .caller
                .map(|c| c.client_address.clone())
                .unwrap_or_default(),
            ..Default::default()
        };
        self.client.record(event.clone()).await?;
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(event);
        Ok(())
    }

    /// Recently recorded events, oldest first.
    pub fn recent(&self) -> Vec<AuditEvent> {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::once_id;

    #[test]
    fn once_ids_are_stable_uuids_distinct_per_environment_and_action() {
        let a = "0b9c6a1e-2f4d-4c3b-9a8e-1d2c3b4a5f60";
        let b = "0b9c6a1e-2f4d-4c3b-9a8e-1d2c3b4a5f61";
        let id = once_id(a, "environment.delete");
        assert_eq!(id, once_id(a, "environment.delete"));
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert_ne!(id, once_id(b, "environment.delete"));
        assert_ne!(id, once_id(a, "environment.create"));
        assert_ne!(id, a);
    }
}
