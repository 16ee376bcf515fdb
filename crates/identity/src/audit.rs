//! Audit events of the identity service (`auth.login`, `user.*`, `team.*`,
//! `membership.*`, `service_account.*`, `token.create`, `token.revoke`,
//! `token.revoke_minted`),
//! each naming its actor's kind (`user`, `service_account`, or `service`
//! for bootstrap), recorded through the
//! durable audit client. Mutations record their event inside their database
//! transaction and commit only once the event is durable (fail closed).

use vibebox_audit_client::{AuditClient, EventBuilder};
use vibebox_proto::audit::{AuditEvent, Outcome, Severity};

use crate::error::Result;

/// Who acted and from where, for the audit record.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    pub user_id: String,
    pub token_id: String,
    pub client_address: String,
    pub request_id: String,
    /// Set when the service acts on its own (bootstrap).
    pub service: String,
    /// `user` or `service_account` for a caller (empty for none, and for
    /// the service acting alone, which the builder records as `service`).
    pub actor_kind: String,
}

/// One event to record.
pub struct Event<'a> {
    pub action: &'a str,
    pub resource_type: &'a str,
    pub resource_id: &'a str,
    pub team_id: &'a str,
    pub outcome: Outcome,
    pub severity: Severity,
    pub details: &'a [(&'a str, &'a str)],
}

/// The identity service's audit sink. `None` only in unit tests of the
/// business logic; `run` always opens a real client.
#[derive(Clone, Debug)]
pub struct Auditor(Option<AuditClient>);

impl Auditor {
    /// Records through `client`.
    pub fn new(client: AuditClient) -> Self {
        Self(Some(client))
    }

    /// Records nothing (tests of logic that is not about auditing).
    pub fn disabled() -> Self {
        Self(None)
    }

    /// Records an event; returns once it is durable in the outbox.
    pub async fn record(&self, origin: &Origin, event: Event<'_>) -> Result<()> {
        let Some(client) = &self.0 else {
            return Ok(());
        };
        let record = to_audit_event(origin, &event);
        client.record(record).await?;
        Ok(())
    }
}

/// The wire event of `event`, done by `origin`.
fn to_audit_event(origin: &Origin, event: &Event<'_>) -> AuditEvent {
    EventBuilder::new(event.action, event.outcome, event.severity)
        .user(&origin.user_id, &origin.token_id)
        .actor_kind(&origin.actor_kind)
        .service(&origin.service)
        .team(event.team_id)
        .resource(event.resource_type, event.resource_id)
        .details(event.details.iter().copied())
        .trace_id(vibebox_server_kit::trace_id())
        .request(&origin.request_id, &origin.client_address)
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{Struct, Value, value::Kind};
    use std::collections::BTreeMap;
    use vibebox_proto::audit::Actor;

    /// The events are the ones recorded before the audit-client builder
    /// (written out field by field).
    #[test]
    fn events_carry_origin_resource_and_string_details() {
        let origin = Origin {
            user_id: "u1".into(),
            token_id: "t1".into(),
            client_address: "10.0.0.1:5".into(),
            request_id: "req-1".into(),
            service: String::new(),
            actor_kind: "service_account".into(),
        };
        let event = to_audit_event(
            &origin,
            &Event {
                action: "user.create",
                resource_type: "user",
                resource_id: "user-1",
                team_id: "",
                outcome: Outcome::Success,
                severity: Severity::Medium,
                details: &[("username", "ada"), ("role", "admin")],
            },
        );
        let text = |s: &str| Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        };
        assert_eq!(
            event,
            AuditEvent {
                actor: Some(Actor {
                    kind: "service_account".into(),
                    user_id: "u1".into(),
                    token_id: "t1".into(),
                    service: String::new(),
                }),
                action: "user.create".into(),
                resource_type: "user".into(),
                resource_id: "user-1".into(),
                outcome: Outcome::Success as i32,
                severity: Severity::Medium as i32,
                details: Some(Struct {
                    fields: BTreeMap::from([
                        ("username".to_owned(), text("ada")),
                        ("role".to_owned(), text("admin")),
                    ]),
                }),
                trace_id: vibebox_server_kit::trace_id(),
                request_id: "req-1".into(),
                client_address: "10.0.0.1:5".into(),
                ..AuditEvent::default()
            }
        );

        let bootstrap = Origin {
            service: "identity".into(),
            ..Origin::default()
        };
        let event = to_audit_event(
            &bootstrap,
            &Event {
                action: "user.create",
                resource_type: "user",
                resource_id: "user-0",
                team_id: "team-a",
                outcome: Outcome::Success,
                severity: Severity::High,
                details: &[("reason", "bootstrap")],
            },
        );
        assert_eq!(
            event.actor,
            Some(Actor {
                service: "identity".into(),
                kind: "service".into(),
                ..Actor::default()
            })
        );
        assert_eq!(event.team_id, "team-a");
        assert_eq!(
            event.details,
            Some(Struct {
                fields: BTreeMap::from([("reason".to_owned(), text("bootstrap"))]),
            })
        );
    }
}
