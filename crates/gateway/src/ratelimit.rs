//! Per-user token-bucket rate limiting (governor), keyed by the verified user id.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota};

/// A token bucket per user: `per_second` refill rate, `burst` bucket size.
pub(crate) struct UserRateLimiter {
    inner: DefaultKeyedRateLimiter<String>,
}

impl UserRateLimiter {
    /// A limiter allowing `per_second` requests per second with bursts of `burst`
    /// (zero values are raised to one).
    pub(crate) fn new(per_second: u32, burst: u32) -> Self {
        let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self {
            inner: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        }
    }

    /// Takes one token from `user`'s bucket; false when the bucket is empty.
    pub(crate) fn check(&self, user: &str) -> bool {
        self.inner.check_key(&user.to_owned()).is_ok()
    }

    /// Forgets buckets that are full again (keeps memory bounded).
    pub(crate) fn shrink(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_exhausted_per_user() {
        let limiter = UserRateLimiter::new(1, 3);
        assert!(limiter.check("alice"));
        assert!(limiter.check("alice"));
        assert!(limiter.check("alice"));
        assert!(
            !limiter.check("alice"),
            "fourth call within a second must be refused"
        );
        // Another user has an independent bucket.
        assert!(limiter.check("bob"));
    }

    #[test]
    fn zero_knobs_do_not_panic() {
        let limiter = UserRateLimiter::new(0, 0);
        assert!(limiter.check("u"));
        assert!(!limiter.check("u"));
        limiter.shrink();
    }
}
