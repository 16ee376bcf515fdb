//! gRPC statuses with google.rpc error details, so that clients (grpcurl
//! included) see which rule or field was at fault.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// FAILED_PRECONDITION listing each broken rule: `(rule_id, subject, description)`.
pub fn precondition_failure(message: &str, violations: &[(&str, &str, &str)]) -> Status {
    let mut details = ErrorDetails::new();
    for (rule, subject, description) in violations {
        details.add_precondition_failure_violation(*rule, *subject, *description);
    }
    Status::with_error_details(Code::FailedPrecondition, message, details)
}

/// INVALID_ARGUMENT listing each bad field: `(field, description)`.
pub fn bad_request(message: &str, fields: &[(&str, &str)]) -> Status {
    let mut details = ErrorDetails::new();
    for (field, description) in fields {
        details.add_bad_request_violation(*field, *description);
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// INVALID_ARGUMENT for one bad field.
pub fn invalid_field(field: &str, description: &str) -> Status {
    bad_request(
        &format!("invalid {field}: {description}"),
        &[(field, description)],
    )
}

/// RESOURCE_EXHAUSTED that may be retried after `after`, said in a
/// `RetryInfo` detail (rate limits, load shedding; a per-user quota carries
/// a `QuotaFailure` instead).
pub fn retry_later(message: &str, after: std::time::Duration) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(after)),
    )
}

/// RESOURCE_EXHAUSTED for a quota the caller used up (retrying does not help
/// until it frees some), said in a `QuotaFailure` detail naming `subject`.
pub fn quota_failure(message: &str, subject: &str, description: &str) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_quota_failure_violation(subject, description),
    )
}

/// INTERNAL without internals: the error is logged, the client sees a
/// generic message (and the request id in the response headers).
pub fn internal(error: &dyn std::fmt::Display) -> Status {
    tracing::error!(%error, "internal error");
    Status::internal("internal error")
}

/// `ErrorInfo.reason` of [`unavailable`] statuses (domain [`ERROR_DOMAIN`]);
/// `metadata["dependency"]` names what could not be reached.
pub const DEPENDENCY_UNAVAILABLE: &str = "DEPENDENCY_UNAVAILABLE";

/// `ErrorInfo.domain` of the statuses VibeBox services make.
pub const ERROR_DOMAIN: &str = "vibebox";

/// UNAVAILABLE naming the dependency that could not be reached, in the
/// message and in an `ErrorInfo` detail (so that a proxy can pass the name on
/// without passing on any other text).
pub fn unavailable(dependency: &str, error: &dyn std::fmt::Display) -> Status {
    tracing::warn!(%dependency, %error, "dependency unavailable");
    about_dependency(
        Code::Unavailable,
        DEPENDENCY_UNAVAILABLE,
        dependency,
        format!("{dependency} is unavailable, retry later"),
    )
}

/// A status about `dependency`, named in an `ErrorInfo` detail too.
fn about_dependency(code: Code, reason: &str, dependency: &str, message: String) -> Status {
    let details = ErrorDetails::with_error_info(
        reason,
        ERROR_DOMAIN,
        [("dependency".to_owned(), dependency.to_owned())],
    );
    Status::with_error_details(code, message, details)
}

/// `ErrorInfo.reason` of [`dependency_timed_out`] statuses.
pub const DEPENDENCY_TIMED_OUT: &str = "DEPENDENCY_TIMED_OUT";

/// DEADLINE_EXCEEDED naming the dependency that did not answer within the
/// deadline (message and `ErrorInfo`, as [`unavailable`]).
pub fn dependency_timed_out(dependency: &str) -> Status {
    tracing::warn!(%dependency, "dependency did not answer in time");
    about_dependency(
        Code::DeadlineExceeded,
        DEPENDENCY_TIMED_OUT,
        dependency,
        format!("{dependency} did not answer in time, retry later"),
    )
}

/// Whether `status` is a deadline that ran out on this side of a call (the
/// channel's own timeout, not a status the peer sent).
pub fn is_local_timeout(status: &Status) -> bool {
    if status.code() != Code::Cancelled {
        return false;
    }
    let mut cause = std::error::Error::source(status);
    while let Some(error) = cause {
        if error.downcast_ref::<tonic::TimeoutExpired>().is_some() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// The dependency named by an [`unavailable`] status, if `status` is one.
pub fn unavailable_dependency(status: &Status) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    let info = status.get_details_error_info()?;
    if info.reason != DEPENDENCY_UNAVAILABLE || info.domain != ERROR_DOMAIN {
        return None;
    }
    info.metadata.get("dependency").cloned()
}

/// A refusal a client handles by its stable reason: `code` with an
/// `ErrorInfo` (`reason`, domain [`ERROR_DOMAIN`], `metadata`) and, when
/// `violations` is not empty, a PreconditionFailure as in
/// [`precondition_failure`] (so [`violated_rules`] names it too).
pub fn with_reason(
    code: Code,
    message: &str,
    reason: &str,
    metadata: &[(&str, &str)],
    violations: &[(&str, &str, &str)],
) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        reason,
        ERROR_DOMAIN,
        metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<std::collections::HashMap<_, _>>(),
    );
    for (rule, subject, description) in violations {
        details.add_precondition_failure_violation(*rule, *subject, *description);
    }
    Status::with_error_details(code, message, details)
}

/// The `ErrorInfo.reason` of a status a VibeBox service made (domain
/// [`ERROR_DOMAIN`]), if it carries one.
pub fn error_reason(status: &Status) -> Option<String> {
    let info = status.get_details_error_info()?;
    (info.domain == ERROR_DOMAIN).then_some(info.reason)
}

/// The rule ids in a status's PreconditionFailure details.
pub fn violated_rules(status: &Status) -> Vec<String> {
    status
        .get_details_precondition_failure()
        .map(|pf| pf.violations.into_iter().map(|v| v.r#type).collect())
        .unwrap_or_default()
}

/// The canonical upper-snake name of a gRPC code, as in the gRPC spec
/// (`PERMISSION_DENIED`): for metrics labels and one-line error messages.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_names_its_dependency_in_a_detail() {
        let status = unavailable("Docker Engine", &"connection refused");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "Docker Engine is unavailable, retry later"
        );
        assert!(!status.message().contains("refused"));
        assert_eq!(
            unavailable_dependency(&status).as_deref(),
            Some("Docker Engine")
        );
        assert_eq!(
            unavailable_dependency(&Status::unavailable("transport error")),
            None
        );
        assert_eq!(
            unavailable_dependency(&Status::internal("Docker Engine")),
            None
        );
    }

    #[test]
    fn reasons_round_trip_with_their_metadata_and_rules() {
        let status = with_reason(
            Code::FailedPrecondition,
            "spec.image cannot be changed in place",
            "update.requires_recreate",
            &[("path", "spec.image")],
            &[("update.requires_recreate", "spec.image", "recreate")],
        );
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            error_reason(&status).as_deref(),
            Some("update.requires_recreate")
        );
        let info = status.get_details_error_info().unwrap();
        assert_eq!(
            info.metadata.get("path").map(String::as_str),
            Some("spec.image")
        );
        assert_eq!(violated_rules(&status), ["update.requires_recreate"]);
        let bare = with_reason(
            Code::Aborted,
            "busy",
            "environment.operation_in_progress",
            &[],
            &[],
        );
        assert_eq!(
            error_reason(&bare).as_deref(),
            Some("environment.operation_in_progress")
        );
        assert!(violated_rules(&bare).is_empty());
        assert_eq!(error_reason(&Status::aborted("x")), None);
    }

    #[test]
    fn precondition_failures_round_trip_rule_ids() {
        let status = precondition_failure(
            "denied",
            &[
                ("privileged", "spec.privileged", "no"),
                ("mount.docker_socket", "spec.mounts[0]", "no"),
            ],
        );
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            violated_rules(&status),
            ["privileged", "mount.docker_socket"]
        );
    }
}
