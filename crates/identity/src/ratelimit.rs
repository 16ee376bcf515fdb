//! Brute-force protection: failed logins are counted per username and per
//! source address (GCRA via `governor`). Once either budget is spent, every
//! login for that user or from that source is refused, without checking the
//! password, until the budget refills.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Failed-login limits.
pub struct LoginLimiter {
    per_user: DefaultKeyedRateLimiter<String>,
    per_source: DefaultKeyedRateLimiter<String>,
    blocked: Mutex<HashMap<String, Instant>>,
}

fn quota(per_minute: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(per_minute.max(1)).expect("at least one"))
}

impl LoginLimiter {
    /// Allows `per_user` failures per minute per username (burst of the same
    /// size) and `per_source` per minute per source address.
    pub fn new(per_user: u32, per_source: u32) -> Self {
        Self {
            per_user: RateLimiter::keyed(quota(per_user)),
            per_source: RateLimiter::keyed(quota(per_source)),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    fn keys(username: &str, source: Option<&str>) -> Vec<String> {
        let mut keys = vec![format!("user:{username}")];
        if let Some(source) = source.filter(|s| !s.is_empty()) {
            keys.push(format!("source:{source}"));
        }
        keys
    }

    /// Whether logins for this user or from this source are refused now.
    pub fn is_blocked(&self, username: &str, source: Option<&str>) -> bool {
        let now = Instant::now();
        let mut blocked = self.blocked.lock().expect("limiter lock");
        blocked.retain(|_, until| *until > now);
        Self::keys(username, source)
            .iter()
            .any(|k| blocked.contains_key(k))
    }

    /// Counts a failed login; spends budget and blocks exhausted keys.
    pub fn record_failure(&self, username: &str, source: Option<&str>) {
        for key in Self::keys(username, source) {
            let limiter = if key.starts_with("user:") {
                &self.per_user
            } else {
                &self.per_source
            };
            if let Err(not_until) = limiter.check_key(&key) {
                let wait = not_until.wait_time_from(limiter.clock().now());
                let until = Instant::now() + wait.max(Duration::from_millis(1));
                self.blocked
                    .lock()
                    .expect("limiter lock")
                    .insert(key, until);
            }
        }
        // Keep the limiters' state bounded.
        if self.per_user.len() > 10_000 {
            self.per_user.retain_recent();
        }
        if self.per_source.len() > 10_000 {
            self.per_source.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_user_after_budget_and_not_others() {
        let l = LoginLimiter::new(3, 100);
        for _ in 0..3 {
            assert!(!l.is_blocked("alice", Some("1.2.3.4")));
            l.record_failure("alice", Some("1.2.3.4"));
        }
        assert!(!l.is_blocked("alice", Some("1.2.3.4")));
        l.record_failure("alice", Some("1.2.3.4"));
        assert!(l.is_blocked("alice", Some("5.6.7.8")));
        assert!(!l.is_blocked("bob", Some("1.2.3.4")));
    }

    #[test]
    fn blocks_source_spraying_many_users() {
        let l = LoginLimiter::new(100, 3);
        for i in 0..4 {
            l.record_failure(&format!("user{i}"), Some("9.9.9.9"));
        }
        assert!(l.is_blocked("fresh", Some("9.9.9.9")));
        assert!(!l.is_blocked("fresh", Some("8.8.8.8")));
    }
}
