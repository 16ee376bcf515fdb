//! What can go wrong: a bad configuration, or a call the platform refused
//! (with its google.rpc details readable: the reason, the retry delay, the
//! quota and the rules that were violated).

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;
use vibebox_proto::environment::{Environment, EnvironmentState};

/// `ErrorInfo.reason` (FAILED_PRECONDITION) of a `WatchEnvironments` resume
/// token older than the changes the platform keeps: list again and watch
/// without a token.
pub const RESUME_TOKEN_EXPIRED: &str = "watch.resume_token_expired";

/// The result of this crate's calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL is not one the client can connect to.
    #[error("invalid URL {url:?}: {message}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it cannot be used.
        message: String,
    },
    /// The token cannot travel in a header (control characters, non-ASCII).
    #[error("the token contains characters not allowed in a header")]
    InvalidToken,
    /// The TLS configuration cannot be used (no root certificates, a CA
    /// that is not PEM).
    #[error("TLS: {0}")]
    Tls(String),
    /// The connection could not be established (eager connect only; lazy
    /// clients report it as an UNAVAILABLE [`Error::Status`] on first use).
    #[error("cannot connect: {0}")]
    Connect(#[source] tonic::transport::Error),
    /// The platform (or the transport) answered a call with an error. Its
    /// google.rpc details are readable through [`Error::reason`],
    /// [`Error::retry_delay`] and [`Error::status`].
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[source] Status),
    /// `WatchEnvironments` refused the resume token: it is older than the
    /// changes the platform keeps. List the environments again and start a
    /// new watch without a token.
    #[error("the watch's resume token expired: list again and watch from now ({})", .0.message())]
    ResumeTokenExpired(#[source] Status),
    /// The environment still had an operation in progress when the wait's
    /// timeout passed; it is returned as it was last seen.
    #[error("environment {} still {} after {:?}", .environment.id, state_name(.environment.state), .waited)]
    Timeout {
        /// The environment as last seen.
        environment: Box<Environment>,
        /// How long the client waited.
        waited: Duration,
    },
    /// The environment settled in the FAILED state (see its
    /// `failure_reason`).
    #[error("environment {} failed: {}", .0.id, .0.failure_reason)]
    EnvironmentFailed(Box<Environment>),
    /// An Exec stream ended without its exit message.
    #[error("the exec stream ended without an exit code")]
    ExecIncomplete,
}

impl Error {
    /// The gRPC status, when the error is an answer to a call.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Error::Status(status) | Error::ResumeTokenExpired(status) => Some(status),
            _ => None,
        }
    }

    /// The gRPC code, when the error is an answer to a call.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }

    /// The stable reason of the error: `ErrorInfo.reason` (for example
    /// `update.requires_recreate`, `watch.resume_token_expired`), else the
    /// first `PreconditionFailure` violation's type (a policy rule id such
    /// as `mount.docker_socket`).
    pub fn reason(&self) -> Option<String> {
        reason(self.status()?)
    }

    /// How long the platform asks the caller to wait before trying again
    /// (`RetryInfo`: rate limits, load shedding, the stream cap).
    pub fn retry_delay(&self) -> Option<Duration> {
        retry_delay(self.status()?)
    }

    /// The quotas the call ran into (`QuotaFailure`: subject and
    /// description of each).
    pub fn quota_violations(&self) -> Vec<(String, String)> {
        self.status()
            .and_then(|s| s.get_details_quota_failure())
            .map(|q| {
                q.violations
                    .into_iter()
                    .map(|v| (v.subject, v.description))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Error::Status(status)
    }
}

/// `ErrorInfo.reason`, else the first PreconditionFailure violation type.
pub(crate) fn reason(status: &Status) -> Option<String> {
    let details = status.get_error_details();
    if let Some(info) = details.error_info()
        && !info.reason.is_empty()
    {
        return Some(info.reason.clone());
    }
    details
        .precondition_failure()
        .and_then(|pf| pf.violations.first())
        .map(|v| v.r#type.clone())
        .filter(|t| !t.is_empty())
}

/// `RetryInfo.retry_delay` as a duration (negative values read as zero).
pub(crate) fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info()?.retry_delay
}

/// The proto name of an environment state without its prefix (`RUNNING`,
/// `CREATING`, ...; `UNKNOWN` for a value this client does not know).
pub fn state_name(state: i32) -> &'static str {
    EnvironmentState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .strip_prefix("ENVIRONMENT_STATE_")
                .unwrap_or("UNSPECIFIED")
        })
        .unwrap_or("UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::ErrorDetails;

    #[test]
    fn reason_prefers_error_info_then_the_violated_rule() {
        let info = Status::with_error_details(
            Code::FailedPrecondition,
            "too old",
            ErrorDetails::with_error_info(
                RESUME_TOKEN_EXPIRED,
                "vibebox",
                std::collections::HashMap::new(),
            ),
        );
        assert_eq!(reason(&info).as_deref(), Some(RESUME_TOKEN_EXPIRED));
        let rule = Status::with_error_details(
            Code::FailedPrecondition,
            "refused",
            ErrorDetails::with_precondition_failure_violation(
                "mount.docker_socket",
                "spec.mounts[0]",
                "no",
            ),
        );
        assert_eq!(reason(&rule).as_deref(), Some("mount.docker_socket"));
        assert_eq!(reason(&Status::internal("x")), None);
    }

    #[test]
    fn details_are_readable_from_the_error() {
        let limited: Error = Status::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            ErrorDetails::with_retry_info(Some(Duration::from_millis(1500))),
        )
        .into();
        assert_eq!(limited.retry_delay(), Some(Duration::from_millis(1500)));
        assert_eq!(limited.code(), Some(Code::ResourceExhausted));
        let quota: Error = Status::with_error_details(
            Code::ResourceExhausted,
            "quota",
            ErrorDetails::with_quota_failure_violation("user:u1", "16 open streams"),
        )
        .into();
        assert_eq!(
            quota.quota_violations(),
            vec![("user:u1".to_owned(), "16 open streams".to_owned())]
        );
        assert_eq!(Error::InvalidToken.status().map(Status::code), None);
    }

    #[test]
    fn states_are_named_without_their_prefix() {
        assert_eq!(state_name(EnvironmentState::Creating as i32), "CREATING");
        assert_eq!(state_name(99), "UNKNOWN");
    }
}
