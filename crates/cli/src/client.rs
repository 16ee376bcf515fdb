//! Connecting to the gateway: a channel (plaintext, or TLS when the context
//! names certificates), an interceptor adding `authorization: Bearer <token>`,
//! the four public clients, and turning a gRPC status into one error line
//! with its code, message and google.rpc details (rule ids, field violations).

use std::fmt;
use vibebox_server_kit::status::code_name;

use anyhow::{Context as _, Result, anyhow};
use tonic_types::StatusExt;
use vibebox_proto::audit::audit_service_client::AuditServiceClient;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::policy::policy_service_client::PolicyServiceClient;
use vibebox_server_kit::{Bearer, GrpcChannel};

use crate::config::Context;

pub(crate) use vibebox_server_kit::Authed;

/// A connection to one platform as one user.
#[derive(Clone)]
pub(crate) struct Session {
    channel: GrpcChannel,
    bearer: Bearer,
}

impl Session {
    /// Connects (lazily) to the context's gateway with its token.
    pub(crate) fn open(ctx: &Context) -> Result<Self> {
        Self::open_with(ctx, ctx.token.as_deref())
    }

    /// Connects with an explicit token (or none).
    pub(crate) fn open_with(ctx: &Context, token: Option<&str>) -> Result<Self> {
        let url = if ctx.server.contains("://") {
            ctx.server.clone()
        } else {
            format!("http://{}", ctx.server)
        };
        let channel = match (&ctx.tls_ca, &ctx.tls_cert, &ctx.tls_key) {
            (Some(ca), Some(cert), Some(key)) => {
                let read = |p: &std::path::PathBuf| {
                    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
                };
                let material = vibebox_server_kit::TlsMaterial {
                    ca_pem: read(ca)?,
                    cert_pem: read(cert)?,
                    key_pem: read(key)?,
                };
                vibebox_server_kit::connect(&url, &material)
            }
            _ => vibebox_server_kit::connect_plaintext(&url),
        }
        .map_err(|e| anyhow!("invalid gateway address {url:?}: {e}"))?;
        let bearer = match token {
            Some(t) => Bearer::new(t)?,
            None => Bearer::none(),
        };
        Ok(Self { channel, bearer })
    }

    pub(crate) fn environments(&self) -> EnvironmentServiceClient<Authed> {
        EnvironmentServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub(crate) fn identity(&self) -> IdentityServiceClient<Authed> {
        IdentityServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub(crate) fn audit(&self) -> AuditServiceClient<Authed> {
        AuditServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    pub(crate) fn policy(&self) -> PolicyServiceClient<Authed> {
        PolicyServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
}

/// A failed call, rendered in one line.
#[derive(Debug)]
pub(crate) struct CallError(pub(crate) tonic::Status);

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = &self.0;
        let message = status.message().replace('\n', " ");
        let message = if status.code() == tonic::Code::Unavailable {
            format!("cannot reach the gateway: {message}")
        } else {
            message
        };
        write!(f, "{}: {}", code_name(status.code()), message)?;
        let details = status.get_error_details();
        let mut parts = Vec::new();
        if let Some(pf) = details.precondition_failure() {
            for v in &pf.violations {
                let mut s = format!("rule {}", v.r#type);
                if !v.subject.is_empty() {
                    s.push_str(&format!(" ({})", v.subject));
                }
                if !v.description.is_empty() {
                    s.push_str(&format!(": {}", v.description));
                }
                parts.push(s.replace('\n', " "));
            }
        }
        if let Some(br) = details.bad_request() {
            for v in &br.field_violations {
                parts.push(format!("field {}: {}", v.field, v.description).replace('\n', " "));
            }
        }
        if let Some(info) = details.error_info()
            && !info.reason.is_empty()
        {
            parts.push(format!("reason {}", info.reason));
        }
        if !parts.is_empty() {
            write!(f, " [{}]", parts.join("; "))?;
        }
        if status.code() == tonic::Code::Unauthenticated {
            write!(f, " (run `vibebox login`)")?;
        }
        Ok(())
    }
}

impl std::error::Error for CallError {}

/// Every page of a paged list: `fetch(page_token)` returns one page's items
/// and the next page token (empty after the last page).
pub(crate) async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String)>>,
{
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let (items, next) = fetch(page_token).await?;
        out.extend(items);
        if next.is_empty() {
            return Ok(out);
        }
        page_token = next;
    }
}

/// Extension turning a tonic result into an anyhow one with [`CallError`].
pub(crate) trait CallExt<T> {
    fn call(self) -> Result<T>;
}

impl<T> CallExt<T> for std::result::Result<tonic::Response<T>, tonic::Status> {
    fn call(self) -> Result<T> {
        self.map(tonic::Response::into_inner)
            .map_err(|s| CallError(s).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn status_renders_in_one_line_with_rule_ids() {
        let details =
            ErrorDetails::with_precondition_failure(vec![tonic_types::PreconditionViolation::new(
                "VB-PRIV-001",
                "spec.privileged",
                "privileged\ncontainers are denied",
            )]);
        let status = tonic::Status::with_error_details(
            tonic::Code::FailedPrecondition,
            "spec denied by policy",
            details,
        );
        let line = CallError(status).to_string();
        assert_eq!(
            line,
            "FAILED_PRECONDITION: spec denied by policy [rule VB-PRIV-001 (spec.privileged): privileged containers are denied]"
        );
    }

    #[test]
    fn field_violations_are_listed() {
        let details = ErrorDetails::with_bad_request_violation("spec.image", "required");
        let status = tonic::Status::with_error_details(
            tonic::Code::InvalidArgument,
            "invalid spec",
            details,
        );
        assert_eq!(
            CallError(status).to_string(),
            "INVALID_ARGUMENT: invalid spec [field spec.image: required]"
        );
    }
}
