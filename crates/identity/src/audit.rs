//! Audit events of the identity service (`auth.login`, `user.*`, `team.*`,
//! `membership.*`, `token.create`, `token.revoke`), recorded through the
//! durable audit client. Mutations record their event inside their database
//! transaction and commit only once the event is durable (fail closed).

use std::collections::BTreeMap;

use prost_types::{Struct, Value, value::Kind};
use vibebox_audit_client::AuditClient;
use vibebox_proto::audit::{Actor, AuditEvent, Outcome, Severity};

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
        let fields: BTreeMap<String, Value> = event
            .details
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    Value {
                        kind: Some(Kind::StringValue((*v).to_owned())),
                    },
                )
            })
            .collect();
        let record = AuditEvent {
            actor: Some(Actor {
                user_id: origin.user_id.clone(),
                token_id: origin.token_id.clone(),
                service: origin.service.clone(),
            }),
            team_id: event.team_id.to_owned(),
            action: event.action.to_owned(),
            resource_type: event.resource_type.to_owned(),
            resource_id: event.resource_id.to_owned(),
            outcome: event.outcome as i32,
            severity: event.severity as i32,
            details: (!fields.is_empty()).then_some(Struct { fields }),
            trace_id: vibebox_server_kit::trace_id(),
            request_id: origin.request_id.clone(),
            client_address: origin.client_address.clone(),
            ..Default::default()
        };
        client.record(record).await?;
        Ok(())
    }
}
