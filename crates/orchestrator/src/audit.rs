//! Audit events of the orchestrator, recorded through the durable audit
//! client (fail closed: an operation whose event cannot be written fails).
//! The most recent events are also kept in memory so tests and operators can
//! see what was recorded without the audit service.

use std::collections::VecDeque;
use std::hash::Hasher;
use std::sync::{Arc, Mutex};

use vibebox_audit_client::{AuditClient, AuditClientError, EventBuilder};
use vibebox_proto::audit::{AuditEvent, Outcome, Severity};

use crate::SERVICE_NAME;

/// The id of the one event recording that `action` succeeded on an
/// environment (a UUID of version 8 made of the environment id and the
/// action): the same on every attempt, for [`Audit::record_once`].
pub fn once_id(environment_id: &str, action: &str) -> String {
    let mut bytes = uuid::Uuid::parse_str(environment_id)
        .map(uuid::Uuid::into_bytes)
        .unwrap_or_default();
    // FNV-1a (64) over the action then the id, spread over the 16 bytes.
    // `Hasher::write` hashes the bytes alone (`Hash for str` would add a
    // terminator and change every id).
    let mut fnv = fnv::FnvHasher::default();
    fnv.write(action.as_bytes());
    fnv.write(environment_id.as_bytes());
    let hash = fnv.finish();
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
    /// `user` or `service_account`, as identity told the gateway (empty:
    /// unknown).
    pub actor_kind: String,
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
        let event = to_audit_event(id, e);
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

/// The wire event of `e` (under `id`, empty for a fresh one).
fn to_audit_event(id: String, e: Event<'_>) -> AuditEvent {
    let event = EventBuilder::new(e.action, e.outcome, e.severity)
        .id(id)
        .team(e.team_id)
        .resource("environment", e.environment_id)
        .details(e.details);
    match e.caller {
        Some(c) => event
            .user(&c.user_id, &c.token_id)
            .actor_kind(&c.actor_kind)
            .request(&c.request_id, &c.client_address),
        None => event.service(SERVICE_NAME),
    }
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{Struct, Value, value::Kind};
    use vibebox_proto::audit::Actor;

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

    fn text(s: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        }
    }

    /// The events are the ones recorded before the audit-client builder
    /// (written out field by field).
    #[test]
    fn events_carry_caller_resource_and_string_details() {
        let caller = Caller {
            user_id: "u1".into(),
            token_id: "t1".into(),
            request_id: "req-1".into(),
            client_address: "10.0.0.1:5".into(),
            actor_kind: "service_account".into(),
        };
        let event = to_audit_event(
            "id-1".into(),
            Event {
                action: "environment.create",
                outcome: Outcome::Success,
                severity: Severity::Low,
                caller: Some(&caller),
                team_id: "team-a",
                environment_id: "env-1",
                details: vec![("image", "busybox".into()), ("cpus", "1".into())],
            },
        );
        assert_eq!(
            event,
            AuditEvent {
                id: "id-1".into(),
                actor: Some(Actor {
                    kind: "service_account".into(),
                    user_id: "u1".into(),
                    token_id: "t1".into(),
                    service: String::new(),
                }),
                team_id: "team-a".into(),
                action: "environment.create".into(),
                resource_type: "environment".into(),
                resource_id: "env-1".into(),
                outcome: Outcome::Success as i32,
                severity: Severity::Low as i32,
                details: Some(Struct {
                    fields: [("image", text("busybox")), ("cpus", text("1"))]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                }),
                request_id: "req-1".into(),
                client_address: "10.0.0.1:5".into(),
                ..AuditEvent::default()
            }
        );

        let own = to_audit_event(
            String::new(),
            Event {
                action: "environment.reconcile",
                outcome: Outcome::Failure,
                severity: Severity::High,
                caller: None,
                team_id: "team-a",
                environment_id: "env-1",
                details: vec![],
            },
        );
        assert_eq!(
            own,
            AuditEvent {
                actor: Some(Actor {
                    service: SERVICE_NAME.into(),
                    kind: "service".into(),
                    ..Actor::default()
                }),
                team_id: "team-a".into(),
                action: "environment.reconcile".into(),
                resource_type: "environment".into(),
                resource_id: "env-1".into(),
                outcome: Outcome::Failure as i32,
                severity: Severity::High as i32,
                details: Some(Struct::default()),
                ..AuditEvent::default()
            }
        );
    }

    /// The ids are part of the log (a recovery re-records under the same id
    /// and the audit service drops the copy): they must never change across
    /// versions. Values produced by the hand-written FNV-1a this replaced.
    #[test]
    fn once_ids_are_pinned_across_versions() {
        assert_eq!(
            once_id("0b9c6a1e-2f4d-4c3b-9a8e-1d2c3b4a5f60", "environment.delete"),
            "3fe3a27d-2fe3-8f04-b271-8dea3a16791e"
        );
        assert_eq!(
            once_id("not-a-uuid", "environment.create"),
            "f1069b61-c1f1-855f-a20d-36c383e3aabf"
        );
    }
}
