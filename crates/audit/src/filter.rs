//! The event filter shared by `QueryEvents` (translated to SQL in the store)
//! and `WatchEvents` (evaluated in memory by [`Filter::matches`]).

use chrono::{DateTime, Utc};
use vibebox_audit_chain::event::time_from_proto;
use vibebox_audit_chain::{Event, Outcome, Severity};
use vibebox_proto::audit as pb;

/// A validated `EventFilter`; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    pub actor_user_id: String,
    pub team_id: String,
    /// Exact action, or a prefix ending in '.'.
    pub action: String,
    pub resource_type: String,
    pub resource_id: String,
    pub outcome: Option<Outcome>,
    pub min_severity: Option<Severity>,
    /// Substring of the details' JSON text.
    pub text: String,
}

/// A filter field that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("filter.{field}: {reason}")]
pub struct FilterError {
    pub field: &'static str,
    pub reason: &'static str,
}

impl TryFrom<Option<pb::EventFilter>> for Filter {
    type Error = FilterError;

    fn try_from(f: Option<pb::EventFilter>) -> Result<Self, FilterError> {
        let Some(f) = f else {
            return Ok(Filter::default());
        };
        let time = |t: Option<prost_types::Timestamp>, field| {
            t.map(|t| {
                time_from_proto(&t).ok_or(FilterError {
                    field,
                    reason: "out of range",
                })
            })
            .transpose()
        };
        let outcome = match pb::Outcome::try_from(f.outcome) {
            Ok(pb::Outcome::Unspecified) => None,
            Ok(o) => Some(o.into()),
            Err(_) => {
                return Err(FilterError {
                    field: "outcome",
                    reason: "unknown value",
                });
            }
        };
        let min_severity = match pb::Severity::try_from(f.min_severity) {
            Ok(pb::Severity::Unspecified) => None,
            Ok(s) => Some(s.into()),
            Err(_) => {
                return Err(FilterError {
                    field: "min_severity",
                    reason: "unknown value",
                });
            }
        };
        if f.text.len() > 256 {
            return Err(FilterError {
                field: "text",
                reason: "longer than 256 bytes",
            });
        }
        Ok(Filter {
            start_time: time(f.start_time, "start_time")?,
            end_time: time(f.end_time, "end_time")?,
            actor_user_id: f.actor_user_id,
            team_id: f.team_id,
            action: f.action,
            resource_type: f.resource_type,
            resource_id: f.resource_id,
            outcome,
            min_severity,
            text: f.text,
        })
    }
}

impl Filter {
    /// Whether `e` passes this filter (same semantics as the SQL query).
    pub fn matches(&self, e: &Event) -> bool {
        self.start_time.is_none_or(|t| e.time >= t)
            && self.end_time.is_none_or(|t| e.time < t)
            && (self.actor_user_id.is_empty() || e.actor.user_id == self.actor_user_id)
            && (self.team_id.is_empty() || e.team_id == self.team_id)
            && (self.action.is_empty()
                || if self.action.ends_with('.') {
                    e.action.starts_with(&self.action)
                } else {
                    e.action == self.action
                })
            && (self.resource_type.is_empty() || e.resource_type == self.resource_type)
            && (self.resource_id.is_empty() || e.resource_id == self.resource_id)
            && self.outcome.is_none_or(|o| e.outcome == o)
            && self.min_severity.is_none_or(|s| e.severity >= s)
            && (self.text.is_empty() || e.details_text().contains(&self.text))
    }
}
