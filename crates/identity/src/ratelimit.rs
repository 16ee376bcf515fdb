//! Brute-force protection for `Login` (GCRA budgets via `governor`), keyed
//! by the client's address, never by its connection: the gateway passes
//! `ip:port` in trusted metadata and only the IP counts (an IPv6 client by
//! its /64, the block one host usually holds), so reconnecting buys nothing.
//!
//! Three budgets of failed logins, each per minute:
//!
//! - per (account, source): once spent, logins for that account from that
//!   source are refused, without checking the password, until it refills.
//!   An attacker guessing one account locks only itself out of it;
//! - per source, all accounts together: once spent, every login from that
//!   source is refused (password spraying);
//! - per account, all sources together, much larger: once spent, logins for
//!   the account are slowed down (a fixed delay before the password is
//!   checked), never refused. Many sources guessing one account are slowed,
//!   while its owner can always log in from an address of its own.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The budgets (failures per minute; zero values are raised to one).
#[derive(Clone, Copy, Debug)]
pub struct LoginLimits {
    /// Failures per account and source before that pair is locked.
    pub per_account_source: u32,
    /// Failures per source, all accounts together, before the source is locked.
    pub per_source: u32,
    /// Failures per account, all sources together, before its logins are slowed.
    pub per_account: u32,
    /// The delay of a login for an account whose budget is spent.
    pub account_backoff: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            per_account_source: 5,
            per_source: 20,
            per_account: 60,
            account_backoff: Duration::from_secs(1),
        }
    }
}

/// What to do with a login attempt before checking its password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Check the password.
    Allow,
    /// Wait this long, then check the password.
    Delay(Duration),
    /// Refuse without checking; retry no earlier than this.
    Refuse(Duration),
}

/// Failed-login limits.
pub struct LoginLimiter {
    limits: LoginLimits,
    per_pair: DefaultKeyedRateLimiter<String>,
    per_source: DefaultKeyedRateLimiter<String>,
    per_account: DefaultKeyedRateLimiter<String>,
    /// Locked pairs and sources, until when.
    blocked: Mutex<HashMap<String, Instant>>,
    /// Slowed accounts, until when.
    slowed: Mutex<HashMap<String, Instant>>,
    /// How many refused attempts per source are audited (a flood of them
    /// must not become a flood of fsynced audit events; the first ones
    /// are the evidence).
    refusal_audits: DefaultKeyedRateLimiter<String>,
}

fn quota(per_minute: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(per_minute.max(1)).expect("at least one"))
}

pub use vibebox_server_kit::meta::source_key;

impl LoginLimiter {
    pub fn new(limits: LoginLimits) -> Self {
        Self {
            limits,
            per_pair: RateLimiter::keyed(quota(limits.per_account_source)),
            per_source: RateLimiter::keyed(quota(limits.per_source)),
            per_account: RateLimiter::keyed(quota(limits.per_account)),
            refusal_audits: RateLimiter::keyed(
                Quota::per_minute(NonZeroU32::new(6).expect("non-zero"))
                    .allow_burst(NonZeroU32::new(3).expect("non-zero")),
            ),
            blocked: Mutex::new(HashMap::new()),
            slowed: Mutex::new(HashMap::new()),
        }
    }

    fn pair_key(username: &str, source: &str) -> String {
        format!("pair:{source}\u{0}{username}")
    }

    /// Whether to check the password of a login for `username` from the
    /// client address `address` now, later, or not at all.
    /// Whether a refused attempt from `address` is still within the audit
    /// budget (a burst of 3, then one every 10 seconds per source).
    pub fn audit_refusal(&self, address: &str) -> bool {
        self.refusal_audits.check_key(&source_key(address)).is_ok()
    }

    pub fn check(&self, username: &str, address: &str) -> Verdict {
        let source = source_key(address);
        let now = Instant::now();
        {
            let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            blocked.retain(|_, until| *until > now);
            let refused = [
                Self::pair_key(username, &source),
                format!("source:{source}"),
            ]
            .iter()
            .filter_map(|k| blocked.get(k))
            .max()
            .copied();
            if let Some(until) = refused {
                return Verdict::Refuse(until - now);
            }
        }
        let mut slowed = self.slowed.lock().unwrap_or_else(|e| e.into_inner());
        slowed.retain(|_, until| *until > now);
        if slowed.contains_key(username) {
            return Verdict::Delay(self.limits.account_backoff);
        }
        Verdict::Allow
    }

    /// Counts a failed login; spends the budgets, locks the spent pair or
    /// source and slows a spent account.
    pub fn record_failure(&self, username: &str, address: &str) {
        let source = source_key(address);
        let spent = |limiter: &DefaultKeyedRateLimiter<String>, key: &String| {
            limiter.check_key(key).err().map(|not_until| {
                Instant::now()
                    + not_until
                        .wait_time_from(limiter.clock().now())
                        .max(Duration::from_millis(1))
            })
        };
        for (limiter, key) in [
            (&self.per_pair, Self::pair_key(username, &source)),
            (&self.per_source, format!("source:{source}")),
        ] {
            if let Some(until) = spent(limiter, &key) {
                self.blocked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, until);
            }
        }
        let account = username.to_owned();
        if let Some(until) = spent(&self.per_account, &account) {
            self.slowed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(account, until);
        }
        // Keep the limiters' state bounded.
        for limiter in [
            &self.per_pair,
            &self.per_source,
            &self.per_account,
            &self.refusal_audits,
        ] {
            if limiter.len() > 10_000 {
                limiter.retain_recent();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_account_source: u32, per_source: u32, per_account: u32) -> LoginLimiter {
        LoginLimiter::new(LoginLimits {
            per_account_source,
            per_source,
            per_account,
            account_backoff: Duration::from_millis(500),
        })
    }

    #[test]
    fn sources_are_addresses_not_connections() {
        assert_eq!(source_key("1.2.3.4:5555"), "1.2.3.4");
        assert_eq!(source_key("1.2.3.4:6666"), "1.2.3.4");
        assert_eq!(source_key("1.2.3.4"), "1.2.3.4");
        assert_eq!(source_key("[::ffff:1.2.3.4]:80"), "1.2.3.4");
        assert_eq!(
            source_key("[2001:db8:1:2:aaaa::1]:443"),
            source_key("[2001:db8:1:2:bbbb::9]:443"),
            "one IPv6 host's /64 is one source"
        );
        assert_ne!(
            source_key("[2001:db8:1:2::1]:443"),
            source_key("[2001:db8:1:3::1]:443")
        );
        assert_eq!(source_key(""), "unknown");
    }

    #[test]
    fn a_guessed_account_is_locked_for_the_guesser_only() {
        let l = limiter(3, 100, 100);
        for port in 0..3 {
            let attacker = format!("1.2.3.4:{}", 4000 + port);
            assert_eq!(l.check("alice", &attacker), Verdict::Allow);
            l.record_failure("alice", &attacker);
        }
        l.record_failure("alice", "1.2.3.4:4999");
        // A new connection from the same address is still locked out...
        assert!(matches!(
            l.check("alice", "1.2.3.4:5000"),
            Verdict::Refuse(_)
        ));
        // ...but not the owner elsewhere, nor other accounts from there.
        assert_eq!(l.check("alice", "5.6.7.8:1"), Verdict::Allow);
        assert_eq!(l.check("bob", "1.2.3.4:5001"), Verdict::Allow);
    }

    #[test]
    fn a_spraying_source_is_locked_for_every_account() {
        let l = limiter(100, 3, 100);
        for i in 0..4 {
            l.record_failure(&format!("user{i}"), &format!("9.9.9.9:{}", 1000 + i));
        }
        assert!(matches!(
            l.check("fresh", "9.9.9.9:2000"),
            Verdict::Refuse(_)
        ));
        assert_eq!(l.check("fresh", "8.8.8.8:2000"), Verdict::Allow);
    }

    #[test]
    fn many_sources_slow_an_account_down_but_never_lock_it() {
        let l = limiter(100, 100, 5);
        for i in 0..6 {
            l.record_failure("admin", &format!("10.0.0.{i}:1"));
        }
        assert_eq!(
            l.check("admin", "192.168.1.1:1"),
            Verdict::Delay(Duration::from_millis(500))
        );
        assert_eq!(l.check("other", "192.168.1.1:1"), Verdict::Allow);
    }

    #[test]
    fn refused_attempts_are_audited_within_a_budget_per_source() {
        let limiter = LoginLimiter::new(LoginLimits {
            per_account_source: 5,
            per_source: 20,
            per_account: 60,
            account_backoff: Duration::from_millis(1000),
        });
        let audited = (0..50)
            .filter(|_| limiter.audit_refusal("10.0.0.1:1234"))
            .count();
        assert_eq!(audited, 3, "a burst of three, then one per ten seconds");
        // Another port of the same address shares the budget; another
        // address has its own.
        assert!(!limiter.audit_refusal("10.0.0.1:999"));
        assert!(limiter.audit_refusal("10.0.0.2:1234"));
    }
}
