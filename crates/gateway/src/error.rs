//! The gateway's errors and their one mapping to gRPC statuses.

use tonic::{Code, Status};

use std::time::Duration;

use tonic_types::{ErrorDetails, StatusExt};

use crate::shares::ShareError;
use crate::validate::FieldViolation;

/// How long RESOURCE_EXHAUSTED answers that may be retried ask clients to wait.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);
/// `ErrorInfo.reason` of a stream ended because its token or user stopped
/// being valid.
pub(crate) const ACCESS_REVOKED: &str = "ACCESS_REVOKED";
/// `ErrorInfo.reason` of a stream ended because the caller lost the right to it.
pub(crate) const ACCESS_WITHDRAWN: &str = "ACCESS_WITHDRAWN";
/// `ErrorInfo.reason` of an update path that needs a new environment (the
/// orchestrator answers the same for a spec that changes more).
pub(crate) const REQUIRES_RECREATE: &str = "update.requires_recreate";

/// The answer given for a missing environment and for another team's
/// environment alike (no existence oracle).
pub(crate) const ENVIRONMENT_DENIED: &str = "environment not found or access denied";

/// Why the gateway refused or failed a call.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GatewayError {
    #[error("missing bearer token")]
    MissingToken,
    /// A handler reached by a method the authorization table does not list
    /// (or that it lists as anonymous): a wiring mistake, refused.
    #[error("method not in the authorization table")]
    Unlisted,
    #[error("invalid token ({0})")]
    InvalidToken(&'static str),
    /// A token of a shape the platform never issues, refused unevaluated;
    /// the rule is not secret and tells an honest client what to fix.
    #[error("token refused: {0}")]
    TokenRefused(&'static str),
    #[error("permission denied: {0}")]
    Denied(String),
    #[error("{ENVIRONMENT_DENIED}")]
    EnvironmentDenied,
    #[error("rate limit exceeded")]
    RateLimited,
    /// A fair-share cap (per user or the gateway's open streams).
    #[error("{subject}: {error}")]
    Share { subject: String, error: ShareError },
    /// A long stream whose token or user is no longer valid (revoked,
    /// disabled, expired).
    #[error("stream ended: the token is no longer valid ({0})")]
    StreamRevoked(&'static str),
    /// A long stream whose caller may no longer do what it does (demoted,
    /// removed from the team).
    #[error("stream ended: the caller may no longer {operation}")]
    StreamWithdrawn { operation: &'static str },
    #[error("invalid argument {0}")]
    Invalid(#[from] FieldViolation),
    /// An update path that cannot change in place (the environment must be
    /// created again): `update.requires_recreate`, naming the path.
    #[error("{0} cannot be changed in place")]
    RequiresRecreate(String),
    /// A dependency could not be reached.
    #[error("{service} unavailable: {detail}")]
    Unavailable {
        service: &'static str,
        detail: String,
    },
    /// A dependency's answer, passed through (details included).
    #[error("{service} answered {}", .status.code())]
    Upstream {
        service: &'static str,
        status: Status,
    },
}

pub(crate) type Result<T, E = GatewayError> = std::result::Result<T, E>;

impl GatewayError {
    /// Wraps a status returned by `service`.
    pub(crate) fn upstream(service: &'static str) -> impl FnOnce(Status) -> Self {
        move |status| GatewayError::Upstream { service, status }
    }
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Self {
        match error {
            GatewayError::MissingToken => {
                Status::unauthenticated("missing bearer token (authorization: Bearer <token>)")
            }
            GatewayError::Unlisted => Status::permission_denied(
                "this method is not in the gateway's authorization table (deny by default)",
            ),
            GatewayError::InvalidToken(_) => Status::unauthenticated("invalid or expired token"),
            GatewayError::TokenRefused(rule) => {
                let mut details = ErrorDetails::new();
                details.set_error_info(
                    "TOKEN_REFUSED",
                    vibebox_server_kit::status::ERROR_DOMAIN,
                    [("rule".to_owned(), rule.to_owned())],
                );
                Status::with_error_details(
                    Code::Unauthenticated,
                    format!("token refused: {rule}"),
                    details,
                )
            }
            GatewayError::Denied(_) => Status::permission_denied("permission denied"),
            GatewayError::EnvironmentDenied => Status::permission_denied(ENVIRONMENT_DENIED),
            GatewayError::RateLimited => Status::with_error_details(
                Code::ResourceExhausted,
                "rate limit exceeded, retry later",
                ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
            ),
            GatewayError::Share { subject, error } => match error {
                ShareError::UserStreams { .. } | ShareError::UserInFlight { .. } => {
                    Status::with_error_details(
                        Code::ResourceExhausted,
                        format!("quota exceeded: {error}; end one first"),
                        ErrorDetails::with_quota_failure_violation(subject, error.to_string()),
                    )
                }
                ShareError::Streams { .. } => Status::with_error_details(
                    Code::ResourceExhausted,
                    "gateway overloaded: too many open streams, retry later",
                    ErrorDetails::with_retry_info(Some(RETRY_AFTER)),
                ),
            },
            GatewayError::StreamRevoked(_) => Status::with_error_details(
                Code::Unauthenticated,
                "stream ended: the token or its user is no longer valid",
                ErrorDetails::with_error_info(
                    ACCESS_REVOKED,
                    vibebox_server_kit::status::ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                ),
            ),
            GatewayError::StreamWithdrawn { operation } => Status::with_error_details(
                Code::PermissionDenied,
                format!("stream ended: the caller may no longer {operation}"),
                ErrorDetails::with_error_info(
                    ACCESS_WITHDRAWN,
                    vibebox_server_kit::status::ERROR_DOMAIN,
                    [("operation".to_owned(), operation.to_owned())],
                ),
            ),
            GatewayError::Invalid(v) => {
                vibebox_server_kit::status::invalid_field(&v.field, &v.description)
            }
            GatewayError::RequiresRecreate(path) => vibebox_server_kit::status::with_reason(
                Code::FailedPrecondition,
                &format!("{path} cannot be changed in place: create a new environment"),
                REQUIRES_RECREATE,
                &[("path", &path)],
                &[(REQUIRES_RECREATE, &path, "cannot be changed in place")],
            ),
            GatewayError::Unavailable { service, detail } => {
                vibebox_server_kit::status::unavailable(service, &detail)
            }
            GatewayError::Upstream { service, status } => match status.code() {
                // Transport failures and internal errors carry text not meant
                // for end users: log it, answer generically.
                // A service's own UNAVAILABLE names what it could not reach:
                // pass that name on (only the name).
                Code::Unavailable => {
                    match vibebox_server_kit::status::unavailable_dependency(&status) {
                        Some(dependency) => {
                            vibebox_server_kit::status::unavailable(&dependency, &status)
                        }
                        None => vibebox_server_kit::status::unavailable(service, &status),
                    }
                }
                // The upstream deadline ran out here (the service is hung or
                // frozen): say which service, not tonic's "Timeout expired".
                Code::Cancelled if vibebox_server_kit::status::is_local_timeout(&status) => {
                    vibebox_server_kit::status::dependency_timed_out(service)
                }
                // Made here from a broken connection (a status the service
                // sent has no source): the service went away mid-call.
                Code::Unknown if std::error::Error::source(&status).is_some() => {
                    vibebox_server_kit::status::unavailable(service, &status)
                }
                Code::Unknown | Code::Internal | Code::DataLoss => {
                    vibebox_server_kit::status::internal(&format_args!("{service}: {status}"))
                }
                Code::Ok
                | Code::Cancelled
                | Code::InvalidArgument
                | Code::DeadlineExceeded
                | Code::NotFound
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::ResourceExhausted
                | Code::FailedPrecondition
                | Code::Aborted
                | Code::OutOfRange
                | Code::Unimplemented
                | Code::Unauthenticated => status,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let s: Status = GatewayError::MissingToken.into();
        assert_eq!(s.code(), Code::Unauthenticated);
        let s: Status = GatewayError::InvalidToken("x").into();
        assert_eq!(s.code(), Code::Unauthenticated);
        let s: Status = GatewayError::TokenRefused("attenuation blocks may not add rules").into();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert!(s.message().contains("may not add rules"), "{s:?}");
        assert_eq!(
            s.get_error_details().error_info().unwrap().reason,
            "TOKEN_REFUSED"
        );
        let s: Status = GatewayError::Denied("secret reason".into()).into();
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(!s.message().contains("secret"));
        let s: Status = GatewayError::EnvironmentDenied.into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::PermissionDenied, ENVIRONMENT_DENIED)
        );
        let s: Status = GatewayError::RateLimited.into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.get_details_retry_info().is_some());
        assert!(s.get_details_quota_failure().is_none());
    }

    #[test]
    fn quota_and_load_shedding_are_told_apart() {
        let s: Status = GatewayError::Share {
            subject: "user:u1".into(),
            error: ShareError::UserStreams { limit: 16 },
        }
        .into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        let quota = s.get_details_quota_failure().expect("quota failure");
        assert_eq!(quota.violations[0].subject, "user:u1");
        assert!(s.get_details_retry_info().is_none());

        let s: Status = GatewayError::Share {
            subject: "user:u1".into(),
            error: ShareError::Streams { limit: 256 },
        }
        .into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.get_details_retry_info().is_some());
        assert!(s.get_details_quota_failure().is_none());
    }

    #[test]
    fn withdrawn_streams_say_why() {
        let s: Status = GatewayError::StreamRevoked("token rejected by identity").into();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(s.get_details_error_info().unwrap().reason, ACCESS_REVOKED);
        let s: Status = GatewayError::StreamWithdrawn {
            operation: "environment.exec",
        }
        .into();
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(s.message().contains("environment.exec"));
        assert_eq!(s.get_details_error_info().unwrap().reason, ACCESS_WITHDRAWN);
    }

    #[test]
    fn invalid_fields_carry_bad_request_details() {
        let s: Status = GatewayError::Invalid(FieldViolation {
            field: "spec.image".into(),
            description: "is required".into(),
        })
        .into();
        assert_eq!(s.code(), Code::InvalidArgument);
        let br = s.get_details_bad_request().expect("bad request details");
        assert_eq!(br.field_violations[0].field, "spec.image");
    }

    #[test]
    fn an_upstream_that_does_not_answer_in_time_is_named() {
        let timed_out = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(timed_out.code(), Code::Cancelled);
        let s: Status = GatewayError::Upstream {
            service: "orchestrator",
            status: timed_out,
        }
        .into();
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert!(s.message().contains("orchestrator"), "{s:?}");
        // A cancellation the service itself sent passes as it is.
        let s: Status = GatewayError::Upstream {
            service: "orchestrator",
            status: Status::cancelled("the caller went away"),
        }
        .into();
        assert_eq!(s.code(), Code::Cancelled);
    }

    #[test]
    fn upstream_denials_pass_through_unchanged_but_internals_do_not_leak() {
        let denial = vibebox_server_kit::status::precondition_failure(
            "denied by policy",
            &[(
                "privileged",
                "spec.privileged",
                "privileged containers are not allowed",
            )],
        );
        let s: Status = GatewayError::Upstream {
            service: "policy",
            status: denial,
        }
        .into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(
            vibebox_server_kit::status::violated_rules(&s),
            ["privileged"]
        );

        let s: Status = GatewayError::Upstream {
            service: "orchestrator",
            status: Status::internal("db at /var/secret exploded"),
        }
        .into();
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("secret"));
    }

    #[test]
    fn unreachable_upstreams_are_unavailable_naming_only_what_is_down() {
        // The orchestrator answered: its Docker Engine is down.
        let s: Status = GatewayError::Upstream {
            service: "orchestrator",
            status: vibebox_server_kit::status::unavailable(
                "Docker Engine",
                &"connect /run/secret.sock",
            ),
        }
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "Docker Engine is unavailable, retry later");

        // The orchestrator could not be reached at all.
        let s: Status = GatewayError::Upstream {
            service: "orchestrator",
            status: Status::unavailable("tcp connect error 10.0.0.7:7703"),
        }
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "orchestrator is unavailable, retry later");

        // Its connection broke mid-stream (it was killed): tonic makes an
        // UNKNOWN status from the transport error, which is no answer of it.
        let broken = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "peer closed connection",
        )));
        assert_eq!(broken.code(), Code::Unknown);
        let s: Status = GatewayError::Upstream {
            service: "orchestrator",
            status: broken,
        }
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.message(), "orchestrator is unavailable, retry later");

        // An UNKNOWN the service itself sent stays generic.
        let s: Status = GatewayError::Upstream {
            service: "orchestrator",
            status: Status::unknown("panic in handler"),
        }
        .into();
        assert_eq!(s.code(), Code::Internal);
    }
}
