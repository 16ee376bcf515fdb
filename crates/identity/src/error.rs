//! The identity service's error type and its one mapping to gRPC statuses.

use tonic::Status;

/// Errors of the identity service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No, or an unusable, credential (bad token, wrong password).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Authenticated, but not allowed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Unknown id, or a resource the caller may not see.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A duplicate name or membership.
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// A request field is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field name as in the proto.
        field: &'static str,
        /// What is allowed.
        reason: String,
    },
    /// The request conflicts with the current state (last admin, self-disable).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The request breaks named rules: `(rule id, subject, description)`
    /// each (FAILED_PRECONDITION with a PreconditionFailure detail).
    #[error("{message}")]
    Refused {
        /// The status message.
        message: String,
        /// The rules broken.
        violations: Vec<(&'static str, String, String)>,
    },
    /// A `request_id` already used by the same caller for a different
    /// request (FAILED_PRECONDITION with ErrorInfo `request_id.reused`).
    #[error("request_id was already used for a different request")]
    RequestReused,
    /// Too many failed logins.
    #[error("too many failed login attempts, retry later")]
    RateLimited,
    /// A database failure.
    #[error("database error: {0}")]
    Database(#[from] sea_orm::DbErr),
    /// The audit event could not be recorded (the operation is refused).
    #[error("audit error: {0}")]
    Audit(#[from] vibebox_audit_client::AuditClientError),
    /// Token machinery failure.
    #[error("token error: {0}")]
    Token(#[from] vibebox_token::TokenError),
    /// Anything else unexpected (key files, hashing).
    #[error("internal: {0}")]
    Internal(String),
}

/// Result alias of the identity service.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An invalid-argument error for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

/// `ErrorInfo.reason` (and PreconditionFailure type) of a `request_id`
/// reused for a different request.
pub const REQUEST_ID_REUSED: &str = "request_id.reused";

/// The RetryInfo of a refused login (a spent budget refills one failure in
/// a few seconds to a minute).
const LOGIN_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(15);

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Unauthenticated(msg) => Status::unauthenticated(msg),
            Error::PermissionDenied(msg) => Status::permission_denied(msg),
            Error::NotFound(what) => Status::not_found(format!("{what} not found")),
            Error::AlreadyExists(what) => Status::already_exists(format!("{what} already exists")),
            Error::InvalidArgument { field, reason } => vibebox_server_kit::status::bad_request(
                &format!("invalid {field}"),
                &[(field, &reason)],
            ),
            Error::FailedPrecondition(msg) => Status::failed_precondition(msg),
            Error::Refused {
                message,
                violations,
            } => {
                let violations: Vec<(&str, &str, &str)> = violations
                    .iter()
                    .map(|(rule, subject, description)| {
                        (*rule, subject.as_str(), description.as_str())
                    })
                    .collect();
                vibebox_server_kit::status::precondition_failure(&message, &violations)
            }
            Error::RequestReused => {
                let mut details = tonic_types::ErrorDetails::new();
                details.set_error_info(
                    REQUEST_ID_REUSED,
                    vibebox_server_kit::status::ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                );
                details.add_precondition_failure_violation(
                    REQUEST_ID_REUSED,
                    "request_id",
                    "this request_id was used within the last 24 hours for a request \
                     with different fields; use a new request_id",
                );
                <Status as tonic_types::StatusExt>::with_error_details(
                    tonic::Code::FailedPrecondition,
                    "request_id was already used for a different request",
                    details,
                )
            }
            Error::RateLimited => vibebox_server_kit::status::retry_later(
                "too many failed login attempts from this address, retry later",
                LOGIN_RETRY_AFTER,
            ),
            Error::Database(e) if vibebox_db::is_transient(&e) => {
                vibebox_server_kit::status::unavailable("identity database", &e)
            }
            Error::Database(e) => vibebox_server_kit::status::internal(&e),
            Error::Audit(e @ vibebox_audit_client::AuditClientError::Backlog(_)) => {
                vibebox_server_kit::status::unavailable("audit service", &e)
            }
            Error::Audit(e) => vibebox_server_kit::status::internal(&e),
            Error::Token(e) => vibebox_server_kit::status::internal(&e),
            Error::Internal(e) => vibebox_server_kit::status::internal(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_reused_request_id_says_so_in_error_info_and_precondition_failure() {
        use tonic_types::StatusExt;
        let status = Status::from(Error::RequestReused);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            REQUEST_ID_REUSED
        );
        assert_eq!(
            vibebox_server_kit::status::violated_rules(&status),
            [REQUEST_ID_REUSED]
        );
    }

    #[test]
    fn maps_to_codes_without_leaking_internals() {
        let cases = [
            (Error::Unauthenticated("x".into()), Code::Unauthenticated),
            (Error::PermissionDenied("x".into()), Code::PermissionDenied),
            (Error::NotFound("team"), Code::NotFound),
            (Error::AlreadyExists("user"), Code::AlreadyExists),
            (Error::invalid("username", "bad"), Code::InvalidArgument),
            (
                Error::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (Error::RateLimited, Code::ResourceExhausted),
            (Error::RequestReused, Code::FailedPrecondition),
            (
                Error::Refused {
                    message: "x".into(),
                    violations: vec![("token.max_ttl", "ttl_seconds".into(), "y".into())],
                },
                Code::FailedPrecondition,
            ),
            (Error::Internal("secret path /x".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("secret"));
        }
    }
}
