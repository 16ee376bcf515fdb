//! Retries: only UNAVAILABLE, only for calls that are safe to repeat, with
//! exponential backoff and jitter so that clients cut off together do not
//! come back in lock-step.
//!
//! UNAVAILABLE is what a call gets when it could not reach the platform (a
//! gateway restart, a refused connection) or the platform could not reach
//! one of its own services: the call did nothing, or did something that
//! repeating it does not change (reads, waits, deletes, and creates, which
//! carry a `request_id`). Every other code is the platform's answer and is
//! returned as it is: RESOURCE_EXHAUSTED carries its own `RetryInfo` for the
//! caller to decide (see [`crate::Error::retry_delay`]).

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tonic::{Code, Status};

/// How often and how patiently a call is tried again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retry). For the watch:
    /// consecutive reconnects that failed (the count starts again with every
    /// message received).
    pub max_attempts: u32,
    /// The first wait; each next one doubles, with jitter.
    pub min_delay: Duration,
    /// No wait is longer.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, waits from 100 ms doubling toward 3 s (about 2 s in all
    /// before giving up).
    fn default() -> Self {
        Self {
            max_attempts: 5,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(3),
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The default of the watch: 10 reconnects in a row, waits from 200 ms
    /// doubling toward 5 s (about half a minute without any answer before
    /// the stream gives up: a gateway restart takes a few seconds).
    pub fn watch() -> Self {
        Self {
            max_attempts: 10,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }

    /// An endless sequence of waits from `min_delay` doubling toward
    /// `max_delay`, each jittered and none outside `[min_delay, max_delay]`.
    /// backon's jitter adds up to 100% of the current delay, so the doubling
    /// is capped at half of `max_delay`: at the cap the waits spread over
    /// `[max/2, max)` instead of all landing on `max`.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + 'static {
        let min = self.min_delay;
        let max = self.max_delay.max(min);
        ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay((max / 2).max(min))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
            .map(move |delay| delay.clamp(min, max))
    }
}

/// The longest wait a server's `RetryInfo` can impose on an automatic retry.
const MAX_SERVER_DELAY: Duration = Duration::from_secs(30);

/// Whether a call that failed with `status` is tried again (when it is
/// safe to repeat): UNAVAILABLE only.
pub fn is_retryable(status: &Status) -> bool {
    status.code() == Code::Unavailable
}

/// Whether a watch that ended with `status` reconnects with its last resume
/// token: UNAVAILABLE and ABORTED, and a connection that broke under the
/// stream (the transport's own error, UNKNOWN or INTERNAL with a cause
/// attached, no status from the platform). A watch is a read with a
/// position, so reconnecting repeats nothing.
pub fn watch_reconnects(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Aborted => true,
        Code::Unknown | Code::Internal => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// The wait before the next attempt: the backoff's, or longer when the
/// platform asked for longer (`RetryInfo`, at most 30 s).
pub(crate) fn next_delay(
    delays: &mut impl Iterator<Item = Duration>,
    status: &Status,
    policy: &RetryPolicy,
) -> Duration {
    let backoff = delays.next().unwrap_or(policy.max_delay);
    match crate::error::retry_delay(status) {
        Some(asked) => backoff.max(asked.min(MAX_SERVER_DELAY)),
        None => backoff,
    }
}

/// Runs `call` until it succeeds, fails with anything but UNAVAILABLE, or
/// `policy.max_attempts` attempts have failed (the last status is
/// returned).
pub(crate) async fn run<T, F, Fut>(policy: &RetryPolicy, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut delays = policy.delays();
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(status) if is_retryable(&status) && attempt < policy.max_attempts => {
                let delay = next_delay(&mut delays, &status, policy);
                tracing::debug!(
                    attempt,
                    ?delay,
                    message = status.message(),
                    "unavailable, retrying"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(status) => return Err(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tonic_types::StatusExt;

    fn quick(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    #[test]
    fn only_unavailable_is_retried() {
        for code in [
            Code::Cancelled,
            Code::Unknown,
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::DataLoss,
            Code::Unauthenticated,
        ] {
            assert!(!is_retryable(&Status::new(code, "x")), "{code:?}");
        }
        assert!(is_retryable(&Status::unavailable("x")));
    }

    #[test]
    fn the_watch_reconnects_on_unavailable_aborted_and_a_broken_connection_only() {
        assert!(watch_reconnects(&Status::unavailable("restart")));
        assert!(watch_reconnects(&Status::aborted("moved")));
        // The transport's error: a status made from an I/O error has a cause.
        let broken = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset",
        )));
        assert_eq!(broken.code(), Code::Unknown);
        assert!(watch_reconnects(&broken));
        // The same codes sent by the platform (no cause) are its answer.
        assert!(!watch_reconnects(&Status::unknown("x")));
        assert!(!watch_reconnects(&Status::internal("x")));
        assert!(!watch_reconnects(&Status::failed_precondition("expired")));
        assert!(!watch_reconnects(&Status::permission_denied("demoted")));
        assert!(!watch_reconnects(&Status::unauthenticated("revoked")));
    }

    #[test]
    fn waits_grow_stay_within_bounds_and_are_jittered() {
        let policy = RetryPolicy {
            max_attempts: 5,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        };
        let waits: Vec<Duration> = policy.delays().take(100).collect();
        assert_eq!(waits.len(), 100, "the sequence never ends");
        assert!(
            waits
                .iter()
                .all(|w| (policy.min_delay..=policy.max_delay).contains(w)),
            "{waits:?}"
        );
        assert!(waits[0] < policy.min_delay * 2, "{waits:?}");
        assert!(waits[99] >= policy.max_delay / 2, "{waits:?}");
        let other: Vec<Duration> = policy.delays().take(100).collect();
        assert_ne!(waits, other, "two clients do not wait in lock-step");
    }

    #[test]
    fn a_server_asking_for_longer_is_heard_within_a_bound() {
        let policy = quick(3);
        let mut delays = policy.delays();
        let asked = Status::with_error_details(
            Code::Unavailable,
            "later",
            tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_millis(700))),
        );
        assert_eq!(
            next_delay(&mut delays, &asked, &policy),
            Duration::from_millis(700)
        );
        let greedy = Status::with_error_details(
            Code::Unavailable,
            "much later",
            tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_secs(3600))),
        );
        assert_eq!(next_delay(&mut delays, &greedy, &policy), MAX_SERVER_DELAY);
        assert!(next_delay(&mut delays, &Status::unavailable("x"), &policy) <= policy.max_delay);
    }

    #[tokio::test]
    async fn unavailable_is_retried_until_it_succeeds() {
        let calls = AtomicU32::new(0);
        let result = run(&quick(5), || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(Status::unavailable("restarting"))
            } else {
                Ok("done")
            }
        })
        .await;
        assert_eq!(result.unwrap(), "done");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn retries_stop_after_max_attempts_with_the_last_status() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = run(&quick(4), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Err(Status::unavailable(format!("down {n}")))
        })
        .await;
        assert_eq!(result.unwrap_err().message(), "down 3");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn any_other_code_is_returned_at_once() {
        for status in [
            Status::resource_exhausted("quota"),
            Status::deadline_exceeded("slow"),
            Status::internal("bug"),
            Status::failed_precondition("policy"),
        ] {
            let calls = AtomicU32::new(0);
            let code = status.code();
            let status = std::sync::Mutex::new(Some(status));
            let result: Result<(), _> = run(&quick(5), || {
                calls.fetch_add(1, Ordering::SeqCst);
                let status = status.lock().unwrap().take().expect("called once");
                async move { Err(status) }
            })
            .await;
            assert_eq!(result.unwrap_err().code(), code);
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{code:?} is not retried");
        }
    }

    #[tokio::test]
    async fn never_means_one_attempt() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = run(&RetryPolicy::never(), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Status::unavailable("down"))
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
