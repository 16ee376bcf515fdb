//! One way to build an audit event, for every producer: who acted, on what,
//! with which outcome, and typed details, without writing `prost_types`
//! values by hand.

use std::collections::BTreeMap;

use prost_types::{ListValue, Struct, Value, value::Kind};
use vibebox_proto::audit::{Actor, AuditEvent, Outcome, Severity};

/// A detail's value: text, a flag or a list of texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detail {
    Text(String),
    Flag(bool),
    List(Vec<String>),
}

impl From<&str> for Detail {
    fn from(s: &str) -> Self {
        Detail::Text(s.to_owned())
    }
}

impl From<String> for Detail {
    fn from(s: String) -> Self {
        Detail::Text(s)
    }
}

impl From<&String> for Detail {
    fn from(s: &String) -> Self {
        Detail::Text(s.clone())
    }
}

impl From<bool> for Detail {
    fn from(b: bool) -> Self {
        Detail::Flag(b)
    }
}

impl From<Vec<String>> for Detail {
    fn from(items: Vec<String>) -> Self {
        Detail::List(items)
    }
}

impl From<Vec<&str>> for Detail {
    fn from(items: Vec<&str>) -> Self {
        Detail::List(items.into_iter().map(str::to_owned).collect())
    }
}

impl From<Detail> for Value {
    fn from(detail: Detail) -> Self {
        let kind = match detail {
            Detail::Text(s) => Kind::StringValue(s),
            Detail::Flag(b) => Kind::BoolValue(b),
            Detail::List(items) => Kind::ListValue(ListValue {
                values: items
                    .into_iter()
                    .map(|s| Value {
                        kind: Some(Kind::StringValue(s)),
                    })
                    .collect(),
            }),
        };
        Value { kind: Some(kind) }
    }
}

/// The values of `Actor.kind`.
pub mod actor_kind {
    /// A person (a user account).
    pub const USER: &str = "user";
    /// A service account: a non-human principal of one team.
    pub const SERVICE_ACCOUNT: &str = "service_account";
    /// A platform service acting on its own (reconcile, bootstrap, alerts).
    pub const SERVICE: &str = "service";
}

/// Builds an [`AuditEvent`]: `new` names the action, outcome and severity;
/// the rest is optional and empty unless set. The actor is always present
/// and the details always an object (empty when none were given). Id, time,
/// source service and (when left empty) trace id are completed by
/// [`AuditClient::record`](crate::AuditClient::record).
#[derive(Debug, Clone)]
#[must_use]
pub struct EventBuilder {
    event: AuditEvent,
    actor: Actor,
    details: BTreeMap<String, Value>,
}

impl EventBuilder {
    pub fn new(action: impl Into<String>, outcome: Outcome, severity: Severity) -> Self {
        Self {
            event: AuditEvent {
                action: action.into(),
                outcome: outcome as i32,
                severity: severity as i32,
                ..AuditEvent::default()
            },
            actor: Actor::default(),
            details: BTreeMap::new(),
        }
    }

    /// A fixed id (an event recorded again under the same id is kept once).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.event.id = id.into();
        self
    }

    /// The user who acted, and the token they acted with.
    pub fn user(mut self, user_id: impl Into<String>, token_id: impl Into<String>) -> Self {
        self.actor.user_id = user_id.into();
        self.actor.token_id = token_id.into();
        self
    }

    /// The service that acted on its own (its kind is [`actor_kind::SERVICE`]
    /// unless a user is named too).
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.actor.service = service.into();
        self
    }

    /// The kind of the acting user ([`actor_kind::USER`] or
    /// [`actor_kind::SERVICE_ACCOUNT`], as identity said when it authorized
    /// the call); empty leaves it unknown.
    pub fn actor_kind(mut self, kind: impl Into<String>) -> Self {
        self.actor.kind = kind.into();
        self
    }

    /// The team the resource belongs to.
    pub fn team(mut self, team_id: impl Into<String>) -> Self {
        self.event.team_id = team_id.into();
        self
    }

    /// What was acted on: its type (`environment`, `user`, ...) and id.
    pub fn resource(mut self, kind: impl Into<String>, id: impl Into<String>) -> Self {
        self.event.resource_type = kind.into();
        self.event.resource_id = id.into();
        self
    }

    /// The request's id and the client's address.
    pub fn request(
        mut self,
        request_id: impl Into<String>,
        client_address: impl Into<String>,
    ) -> Self {
        self.event.request_id = request_id.into();
        self.event.client_address = client_address.into();
        self
    }

    /// The trace id; capture it (`vibebox_server_kit::trace_id()`) where the
    /// event is recorded outside the request's span.
    pub fn trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.event.trace_id = trace_id.into();
        self
    }

    /// One detail; a later value for the same key replaces the earlier one.
    pub fn detail(mut self, key: impl Into<String>, value: impl Into<Detail>) -> Self {
        self.details.insert(key.into(), value.into().into());
        self
    }

    /// Several details at once.
    pub fn details<K, V>(mut self, details: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<Detail>,
    {
        for (key, value) in details {
            self.details.insert(key.into(), value.into().into());
        }
        self
    }

    /// The event. A service acting on its own (a service named, no user)
    /// is of kind [`actor_kind::SERVICE`] unless a kind was given.
    pub fn build(mut self) -> AuditEvent {
        if self.actor.kind.is_empty()
            && self.actor.user_id.is_empty()
            && !self.actor.service.is_empty()
        {
            self.actor.kind = actor_kind::SERVICE.to_owned();
        }
        AuditEvent {
            actor: Some(self.actor),
            details: Some(Struct {
                fields: self.details,
            }),
            ..self.event
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(s.to_owned())),
        }
    }

    #[test]
    fn builds_the_event_field_by_field() {
        let event = EventBuilder::new("environment.create", Outcome::Success, Severity::Low)
            .id("id-1")
            .user("u1", "t1")
            .team("team-a")
            .resource("environment", "env-1")
            .request("req-1", "127.0.0.1:5")
            .trace_id("abc")
            .detail("image", "busybox")
            .detail("dry_run", false)
            .detail("rule_ids", vec!["r1", "r2"])
            .details([("a", "1"), ("image", "alpine")])
            .build();
        let expected = AuditEvent {
            id: "id-1".into(),
            actor: Some(Actor {
                kind: Default::default(),
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
                fields: BTreeMap::from([
                    ("a".to_owned(), text("1")),
                    ("image".to_owned(), text("alpine")),
                    (
                        "dry_run".to_owned(),
                        Value {
                            kind: Some(Kind::BoolValue(false)),
                        },
                    ),
                    (
                        "rule_ids".to_owned(),
                        Value {
                            kind: Some(Kind::ListValue(ListValue {
                                values: vec![text("r1"), text("r2")],
                            })),
                        },
                    ),
                ]),
            }),
            trace_id: "abc".into(),
            request_id: "req-1".into(),
            client_address: "127.0.0.1:5".into(),
            ..AuditEvent::default()
        };
        assert_eq!(event, expected);
    }

    #[test]
    fn actors_carry_their_kind_and_services_acting_alone_are_of_kind_service() {
        let by = |b: EventBuilder| b.build().actor.unwrap().kind;
        let new = || EventBuilder::new("a", Outcome::Success, Severity::Low);
        assert_eq!(by(new().service("orchestrator")), actor_kind::SERVICE);
        assert_eq!(
            by(new()
                .user("sa-1", "t1")
                .actor_kind(actor_kind::SERVICE_ACCOUNT)),
            "service_account"
        );
        assert_eq!(
            by(new().user("u1", "t1").actor_kind(actor_kind::USER)),
            "user"
        );
        // Unknown stays unknown (canonical encoding v1), never guessed.
        assert_eq!(by(new().user("u1", "t1")), "");
        assert_eq!(by(new()), "");
    }

    #[test]
    fn a_bare_event_has_an_empty_actor_and_empty_details() {
        let event = EventBuilder::new("policy.reload", Outcome::Failure, Severity::High).build();
        assert_eq!(event.actor, Some(Actor::default()));
        assert_eq!(event.details, Some(Struct::default()));
        assert!(event.id.is_empty() && event.trace_id.is_empty() && event.team_id.is_empty());
    }
}
