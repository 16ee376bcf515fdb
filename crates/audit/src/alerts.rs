//! Alert rules evaluated on ingestion. An alert is itself an audit event
//! (`alert.raised`, severity high or critical) appended right after the
//! event that triggered it, so it is chained, queryable and watchable.
//!
//! Default rules (from the security model):
//! - more than 100 Docker operations (`environment.*`, `exec.*`) in an hour
//!   by one user (high);
//! - more than 10 failed environment creations in an hour (high);
//! - at once, any `policy.deny` event carrying a privileged or Docker-socket
//!   rule id (`mount.docker_socket`, `privileged`; matched exactly) as a
//!   string value anywhere in its details (critical).
//!
//! Threshold rules fire once when the count crosses the threshold and again
//! only after the count has dropped back below it.
//!
//! Integrity alerts do not come from an event: a receipt the log contradicts
//! (a cut or rewritten tail, see `crate::log`) raises
//! [`TAIL_RULE`] (critical) through [`tail_alert`].

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use vibebox_audit_chain::{Actor, Event, Outcome, Severity, TailError};

/// The action of alert events.
pub const ALERT_ACTION: &str = "alert.raised";
/// The rule of the alert raised when a receipt contradicts the log.
pub const TAIL_RULE: &str = "audit_tail_truncated";

/// Alert rule settings.
#[derive(Clone, Debug)]
pub struct AlertConfig {
    /// Sliding window of the threshold rules.
    pub window: Duration,
    /// Operations by one user within the window above which to alert (0 = off).
    pub user_ops_threshold: usize,
    /// Action prefixes (ending in '.') or exact actions counted as operations.
    pub user_ops_actions: Vec<String>,
    /// Failed `environment.create` events within the window above which to alert (0 = off).
    pub failed_creates_threshold: usize,
    /// Rule ids whose appearance in an event's details alerts at once.
    pub critical_rules: Vec<String>,
    /// Actions (exact, or prefixes ending in '.') whose events are searched
    /// for `critical_rules`: one attempt, one alert.
    pub critical_rule_actions: Vec<String>,
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            window: Duration::hours(1),
            user_ops_threshold: 100,
            user_ops_actions: vec!["environment.".into(), "exec.".into()],
            failed_creates_threshold: 10,
            critical_rules: vec!["mount.docker_socket".into(), "privileged".into()],
            critical_rule_actions: vec!["policy.deny".into()],
        }
    }
}

#[derive(Default)]
struct Window {
    times: VecDeque<DateTime<Utc>>,
    fired: bool,
}

impl Window {
    /// Adds an occurrence; true when the count just crossed `threshold`.
    fn add(&mut self, at: DateTime<Utc>, window: Duration, threshold: usize) -> bool {
        self.times.push_back(at);
        // Keeping only the newest threshold+1 times decides exactly as
        // keeping all would (older ones expire first) and bounds memory.
        while self.times.len() > threshold + 1
            || self.times.front().is_some_and(|t| *t <= at - window)
        {
            self.times.pop_front();
        }
        if self.times.len() <= threshold {
            self.fired = false;
            return false;
        }
        !std::mem::replace(&mut self.fired, true)
    }
}

/// The rules' state.
pub struct AlertEngine {
    config: AlertConfig,
    per_user: HashMap<String, Window>,
    failed_creates: Window,
}

fn matches_action(action: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| {
        if p.ends_with('.') {
            action.starts_with(p.as_str())
        } else {
            action == p
        }
    })
}

fn collect_rule_hits(value: &Value, rules: &[String], hits: &mut Vec<String>) {
    match value {
        Value::String(s) => {
            // Exact rule ids only: "port.privileged" is not "privileged".
            for rule in rules {
                if s == rule && !hits.contains(rule) {
                    hits.push(rule.clone());
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_rule_hits(v, rules, hits)),
        Value::Object(o) => o.values().for_each(|v| collect_rule_hits(v, rules, hits)),
        _ => {}
    }
}

impl AlertEngine {
    pub fn new(config: AlertConfig) -> Self {
        Self {
            config,
            per_user: HashMap::new(),
            failed_creates: Window::default(),
        }
    }

    /// Feeds one recorded event; returns the alert events it raises
    /// (unsealed). Alerts never trigger alerts.
    pub fn observe(&mut self, e: &Event) -> Vec<Event> {
        let mut alerts = Vec::new();
        if e.action == ALERT_ACTION {
            return alerts;
        }
        let c = &self.config;
        if c.user_ops_threshold > 0
            && !e.actor.user_id.is_empty()
            && matches_action(&e.action, &c.user_ops_actions)
        {
            let window = self.per_user.entry(e.actor.user_id.clone()).or_default();
            if window.add(e.time, c.window, c.user_ops_threshold) {
                alerts.push(alert(
                    e,
                    "user_operations_per_hour",
                    Severity::High,
                    json!({
                        "user_id": e.actor.user_id,
                        "threshold": c.user_ops_threshold,
                        "count": window.times.len(),
                        "window_seconds": c.window.num_seconds(),
                    }),
                ));
            }
        }
        if c.failed_creates_threshold > 0
            && e.action == "environment.create"
            && matches!(e.outcome, Outcome::Failure | Outcome::Denied)
            && self
                .failed_creates
                .add(e.time, c.window, c.failed_creates_threshold)
        {
            alerts.push(alert(
                e,
                "failed_environment_creations_per_hour",
                Severity::High,
                json!({
                    "threshold": c.failed_creates_threshold,
                    "count": self.failed_creates.times.len(),
                    "window_seconds": c.window.num_seconds(),
                }),
            ));
        }
        if !c.critical_rules.is_empty() && matches_action(&e.action, &c.critical_rule_actions) {
            let mut hits = Vec::new();
            for v in e.details.values() {
                collect_rule_hits(v, &c.critical_rules, &mut hits);
            }
            if !hits.is_empty() {
                alerts.push(alert(
                    e,
                    "privileged_or_docker_socket_attempt",
                    Severity::Critical,
                    json!({ "rule_ids": hits, "user_id": e.actor.user_id }),
                ));
            }
        }
        alerts
    }
}

fn alert(trigger: &Event, rule: &str, severity: Severity, extra: Value) -> Event {
    let mut details = serde_json::Map::new();
    details.insert("rule".into(), Value::String(rule.into()));
    details.insert("trigger_event_id".into(), Value::String(trigger.id.clone()));
    details.insert(
        "trigger_action".into(),
        Value::String(trigger.action.clone()),
    );
    details.insert("trigger_sequence".into(), json!(trigger.sequence as f64));
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            // Numbers as floats: what a protobuf Struct round trip yields.
            let v = match v {
                Value::Number(n) => json!(n.as_f64().unwrap_or_default()),
                v => v,
            };
            details.insert(k, v);
        }
    }
    metrics::counter!("vibebox_audit_alerts_raised_total", "rule" => rule.to_owned()).increment(1);
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        sequence: 0,
        time: Utc::now(),
        actor: Actor {
            service: "audit".into(),
            kind: "service".into(),
            ..Actor::default()
        },
        team_id: trigger.team_id.clone(),
        action: ALERT_ACTION.into(),
        resource_type: "alert_rule".into(),
        resource_id: rule.into(),
        outcome: Outcome::Success,
        severity,
        details,
        source_service: "audit".into(),
        trace_id: trigger.trace_id.clone(),
        request_id: trigger.request_id.clone(),
        client_address: String::new(),
        hash: String::new(),
        prev_hash: String::new(),
    }
}

/// The critical alert for a receipt the log contradicts.
pub fn tail_alert(failure: &TailError) -> Event {
    metrics::counter!("vibebox_audit_alerts_raised_total", "rule" => TAIL_RULE).increment(1);
    let mut details = serde_json::Map::new();
    details.insert("rule".into(), Value::String(TAIL_RULE.into()));
    details.insert("reason".into(), Value::String(failure.to_string()));
    details.insert("holder".into(), Value::String(failure.holder().into()));
    // Numbers as floats: what a protobuf Struct round trip yields.
    details.insert("receipt_sequence".into(), json!(failure.sequence() as f64));
    details.insert(
        "first_broken_sequence".into(),
        json!(failure.first_broken_sequence() as f64),
    );
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        sequence: 0,
        time: Utc::now(),
        actor: Actor {
            service: "audit".into(),
            kind: "service".into(),
            ..Actor::default()
        },
        team_id: String::new(),
        action: ALERT_ACTION.into(),
        resource_type: "alert_rule".into(),
        resource_id: TAIL_RULE.into(),
        outcome: Outcome::Failure,
        severity: Severity::Critical,
        details,
        source_service: "audit".into(),
        trace_id: String::new(),
        request_id: String::new(),
        client_address: String::new(),
        hash: String::new(),
        prev_hash: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user: &str, action: &str, outcome: Outcome) -> Event {
        Event {
            id: uuid::Uuid::now_v7().to_string(),
            sequence: 1,
            time: Utc::now(),
            actor: Actor {
                user_id: user.into(),
                ..Actor::default()
            },
            team_id: String::new(),
            action: action.into(),
            resource_type: String::new(),
            resource_id: String::new(),
            outcome,
            severity: Severity::Low,
            details: Default::default(),
            source_service: "orchestrator".into(),
            trace_id: String::new(),
            request_id: String::new(),
            client_address: String::new(),
            hash: String::new(),
            prev_hash: String::new(),
        }
    }

    #[test]
    fn user_operations_fire_once_above_the_threshold() {
        let mut engine = AlertEngine::new(AlertConfig::default());
        let mut raised = 0;
        for i in 0..150 {
            let alerts = engine.observe(&event("u1", "environment.start", Outcome::Success));
            if i < 100 {
                assert!(alerts.is_empty(), "fired early at {i}");
            }
            raised += alerts.len();
        }
        assert_eq!(raised, 1);
        // Other users and non-Docker actions do not count.
        assert!(
            engine
                .observe(&event("u2", "environment.start", Outcome::Success))
                .is_empty()
        );
        assert!(
            engine
                .observe(&event("u1", "auth.login", Outcome::Success))
                .is_empty()
        );
    }

    #[test]
    fn docker_socket_denials_fire_at_once() {
        let mut engine = AlertEngine::new(AlertConfig::default());
        let mut e = event("u1", "policy.deny", Outcome::Denied);
        e.details.insert(
            "rule_ids".into(),
            json!(["image.allowlist", "mount.docker_socket"]),
        );
        let alerts = engine.observe(&e);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].severity, Severity::Critical);
        assert_eq!(
            alerts[0].details["rule_ids"],
            json!(["mount.docker_socket"])
        );
        let mut benign = event("u1", "policy.deny", Outcome::Denied);
        benign
            .details
            .insert("rule_ids".into(), json!(["image.allowlist"]));
        assert!(engine.observe(&benign).is_empty());
        // The same rule id in another producer's event is not a new attempt.
        let mut echo = event("u1", "environment.create", Outcome::Failure);
        echo.details
            .insert("rule_ids".into(), json!(["mount.docker_socket"]));
        assert!(engine.observe(&echo).is_empty());
    }
}
