//! Retry delays for the loops that reconnect to another service (audit
//! delivery, the gateway's feeds): exponential with jitter, so clients cut
//! off together do not come back in lock-step.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// An endless sequence of waits from `min` doubling toward `max`, each
/// jittered and none outside `[min, max]`.
///
/// backon's jitter adds up to 100% of the current delay, so the doubling
/// is capped at half of `max`: at the cap the waits spread over
/// `[max/2, max)` instead of all landing on `max`. Build a new one after a
/// success to start again from `min`.
pub fn backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send {
    let max = max.max(min);
    ExponentialBuilder::new()
        .with_min_delay(min)
        .with_max_delay((max / 2).max(min))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .map(move |delay| delay.clamp(min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_stay_within_bounds_never_end_and_are_jittered() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let waits: Vec<Duration> = backoff(min, max).take(200).collect();
        assert_eq!(waits.len(), 200, "the sequence never ends");
        assert!(waits.iter().all(|w| (min..=max).contains(w)), "{waits:?}");
        assert!(waits[0] < min * 2, "starts near min: {waits:?}");
        assert!(waits[199] >= max / 2, "reaches the cap: {waits:?}");
        let capped: std::collections::HashSet<_> = waits[20..].iter().collect();
        assert!(capped.len() > 1, "capped waits are jittered: {waits:?}");
        let other: Vec<Duration> = backoff(min, max).take(200).collect();
        assert_ne!(waits, other, "two clients do not wait in lock-step");
    }

    #[test]
    fn a_max_below_min_waits_min() {
        let min = Duration::from_millis(300);
        assert!(
            backoff(min, Duration::from_millis(10))
                .take(10)
                .all(|w| w == min)
        );
    }
}
