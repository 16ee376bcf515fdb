//! The resume logic of `WatchEnvironments`: remember the last resume token,
//! reconnect with it when the stream breaks, give up when the platform says
//! the token is too old or refuses the watch.

use std::time::Duration;

use tonic::{Code, Status};
use vibebox_proto::environment::{WatchEnvironmentsRequest, WatchEnvironmentsResponse};

use crate::error::{Error, RESUME_TOKEN_EXPIRED};
use crate::retry::{RetryPolicy, next_delay, watch_reconnects};

/// Whether `status` is the platform's refusal of a resume token that is
/// older than the changes it keeps (FAILED_PRECONDITION, reason
/// `watch.resume_token_expired`).
pub fn is_resume_token_expired(status: &Status) -> bool {
    status.code() == Code::FailedPrecondition
        && crate::error::reason(status).as_deref() == Some(RESUME_TOKEN_EXPIRED)
}

/// What the watch does after its stream ended.
#[derive(Debug)]
pub(crate) enum Next {
    /// Wait this long, then open the stream again from the last token.
    Reconnect(Duration),
    /// End the watch with this error.
    Stop(Error),
}

/// The position of a watch and its reconnect budget.
pub(crate) struct Resume {
    team_id: String,
    token: String,
    policy: RetryPolicy,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
    failures: u32,
}

impl Resume {
    /// A watch of `team_id` (empty: every team) from `token` (empty: start
    /// with the current environments).
    pub(crate) fn new(team_id: String, token: String, policy: RetryPolicy) -> Self {
        Self {
            team_id,
            token,
            delays: Box::new(policy.delays()),
            policy,
            failures: 0,
        }
    }

    /// The request that opens (or reopens) the stream.
    pub(crate) fn request(&self) -> WatchEnvironmentsRequest {
        WatchEnvironmentsRequest {
            team_id: self.team_id.clone(),
            resume_token: self.token.clone(),
        }
    }

    /// The last resume token seen (or the one the watch started from).
    #[cfg(test)]
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// A message arrived: continue after it next time, and the stream works
    /// again (the reconnect budget and the backoff start over).
    pub(crate) fn received(&mut self, message: &WatchEnvironmentsResponse) {
        if !message.resume_token.is_empty() {
            self.token.clone_from(&message.resume_token);
        }
        if self.failures > 0 {
            self.failures = 0;
            self.delays = Box::new(self.policy.delays());
        }
    }

    /// The stream ended: with `status`, or cleanly (`None`: the server
    /// closed it, as on shutdown; a watch has no end, so it reconnects).
    pub(crate) fn ended(&mut self, status: Option<Status>) -> Next {
        let status = status.unwrap_or_else(|| Status::unavailable("the watch stream ended"));
        if is_resume_token_expired(&status) {
            return Next::Stop(Error::ResumeTokenExpired(status));
        }
        if !watch_reconnects(&status) {
            return Next::Stop(Error::Status(status));
        }
        self.failures += 1;
        if self.failures >= self.policy.max_attempts {
            return Next::Stop(Error::Status(status));
        }
        Next::Reconnect(next_delay(&mut self.delays, &status, &self.policy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};
    use vibebox_proto::environment::Environment;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(80),
        }
    }

    fn message(token: &str, id: Option<&str>) -> WatchEnvironmentsResponse {
        WatchEnvironmentsResponse {
            environment: id.map(|id| Environment {
                id: id.into(),
                ..Environment::default()
            }),
            resume_token: token.into(),
            caught_up: false,
        }
    }

    fn expired() -> Status {
        Status::with_error_details(
            Code::FailedPrecondition,
            "resume token too old",
            ErrorDetails::with_error_info(
                RESUME_TOKEN_EXPIRED,
                "vibebox",
                std::collections::HashMap::new(),
            ),
        )
    }

    #[test]
    fn reconnects_continue_after_the_last_message_heartbeats_included() {
        let mut resume = Resume::new("team-1".into(), String::new(), policy(5));
        assert_eq!(resume.request().resume_token, "", "starts with a listing");
        assert_eq!(resume.request().team_id, "team-1");
        resume.received(&message("t1", Some("e1")));
        resume.received(&message("t2", Some("e2")));
        // A heartbeat carries a token and no environment: it moves too.
        resume.received(&message("t3", None));
        assert!(matches!(
            resume.ended(Some(Status::unavailable("gateway restart"))),
            Next::Reconnect(_)
        ));
        assert_eq!(resume.request().resume_token, "t3");
        assert_eq!(resume.request().team_id, "team-1");
        // A message without a token (there should be none) keeps the last one.
        resume.received(&message("", Some("e3")));
        assert_eq!(resume.token(), "t3");
    }

    #[test]
    fn a_given_token_is_where_the_first_stream_starts() {
        let resume = Resume::new(String::new(), "saved".into(), policy(5));
        assert_eq!(resume.request().resume_token, "saved");
        assert_eq!(resume.request().team_id, "");
    }

    #[test]
    fn an_expired_token_is_surfaced_never_retried() {
        let mut resume = Resume::new(String::new(), "old".into(), policy(5));
        match resume.ended(Some(expired())) {
            Next::Stop(Error::ResumeTokenExpired(status)) => {
                assert_eq!(status.code(), Code::FailedPrecondition)
            }
            other => panic!("expected ResumeTokenExpired, got {other:?}"),
        }
        // Another FAILED_PRECONDITION is an answer, not an expiry.
        let mut resume = Resume::new(String::new(), String::new(), policy(5));
        assert!(matches!(
            resume.ended(Some(Status::failed_precondition("something else"))),
            Next::Stop(Error::Status(_))
        ));
    }

    #[test]
    fn refusals_end_the_watch() {
        for status in [
            Status::permission_denied("no longer a member"),
            Status::unauthenticated("token revoked"),
            Status::invalid_argument("bad team id"),
            Status::unimplemented("old server"),
            Status::resource_exhausted("stream cap"),
        ] {
            let code = status.code();
            let mut resume = Resume::new(String::new(), String::new(), policy(5));
            match resume.ended(Some(status)) {
                Next::Stop(Error::Status(s)) => assert_eq!(s.code(), code),
                other => panic!("{code:?}: expected Stop, got {other:?}"),
            }
        }
    }

    #[test]
    fn reconnects_are_bounded_and_the_budget_resets_on_a_message() {
        let mut resume = Resume::new(String::new(), String::new(), policy(3));
        for _ in 0..2 {
            match resume.ended(Some(Status::unavailable("down"))) {
                Next::Reconnect(delay) => {
                    assert!(
                        (Duration::from_millis(10)..=Duration::from_millis(80)).contains(&delay)
                    )
                }
                other => panic!("expected a reconnect, got {other:?}"),
            }
        }
        // A clean end counts as a failure too.
        assert!(matches!(resume.ended(None), Next::Stop(Error::Status(_))));

        let mut resume = Resume::new(String::new(), String::new(), policy(3));
        for round in 0..5 {
            assert!(matches!(
                resume.ended(Some(Status::aborted("moved"))),
                Next::Reconnect(_)
            ));
            assert!(matches!(resume.ended(None), Next::Reconnect(_)));
            resume.received(&message(&format!("t{round}"), None));
        }
        assert_eq!(resume.token(), "t4");
    }
}
