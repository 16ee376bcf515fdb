//! The gateway's authorization table: every public RPC the gateway serves,
//! and what a caller needs to reach it. Deny by default: each public service
//! is wrapped in [`Guarded`], which refuses (PERMISSION_DENIED, before any
//! handler code runs) a method that is not in [`TABLE`]. A handler added to a
//! proto but not to the table is therefore closed, never open; the tests
//! below walk every method of every public service descriptor to prove that
//! the table covers exactly what the protos declare.
//!
//! The table is the one place a method's name and operation are written:
//! [`Guarded`] hands the handler a [`Resolved`] entry, the gateway's
//! `authenticate` refuses a request without one (or one listed as
//! anonymous), and `authorize` asks identity for the entry's operation.
//! Per-method call metrics are recorded here too.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures::future::{BoxFuture, FutureExt};
use tonic::body::Body;
use tonic::server::NamedService;

/// What a caller needs to reach a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// No token (Login): limited per client address and per account.
    Anonymous,
    /// A valid bearer token allowed `operation` by the token's own checks and
    /// by identity's decision for the resource the request names.
    Operation(&'static str),
}

/// Every public method, by its gRPC path, with its access rule.
pub(crate) const TABLE: &[(&str, Access)] = &[
    // vibebox.environment.v1.EnvironmentService
    (
        "/vibebox.environment.v1.EnvironmentService/CreateEnvironment",
        Access::Operation("environment.create"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/GetEnvironment",
        Access::Operation("environment.get"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/ListEnvironments",
        Access::Operation("environment.list"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/StartEnvironment",
        Access::Operation("environment.start"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/StopEnvironment",
        Access::Operation("environment.stop"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/RestartEnvironment",
        Access::Operation("environment.restart"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/DeleteEnvironment",
        Access::Operation("environment.delete"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/StreamLogs",
        Access::Operation("environment.logs"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/Exec",
        Access::Operation("environment.exec"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/PortForward",
        Access::Operation("environment.port_forward"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/StreamStats",
        Access::Operation("environment.stats"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/CopyTo",
        Access::Operation("environment.copy_to"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/CopyFrom",
        Access::Operation("environment.copy_from"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/ExtendEnvironment",
        Access::Operation("environment.extend"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/UpdateEnvironment",
        Access::Operation("environment.update"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/WaitEnvironment",
        Access::Operation("environment.wait"),
    ),
    (
        "/vibebox.environment.v1.EnvironmentService/WatchEnvironments",
        Access::Operation("environment.watch"),
    ),
    // vibebox.identity.v1.IdentityService
    (
        "/vibebox.identity.v1.IdentityService/Login",
        Access::Anonymous,
    ),
    (
        "/vibebox.identity.v1.IdentityService/WhoAmI",
        Access::Operation("identity.whoami"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/CreateUser",
        Access::Operation("identity.user.create"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/ListUsers",
        Access::Operation("identity.user.list"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/SetUserDisabled",
        Access::Operation("identity.user.disable"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/CreateTeam",
        Access::Operation("identity.team.create"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/ListTeams",
        Access::Operation("identity.team.list"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/AddTeamMember",
        Access::Operation("identity.member.add"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/SetTeamMemberRole",
        Access::Operation("identity.member.set_role"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/RemoveTeamMember",
        Access::Operation("identity.member.remove"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/ListTeamMembers",
        Access::Operation("identity.member.list"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/CreateApiToken",
        Access::Operation("identity.token.create"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/RevokeToken",
        Access::Operation("identity.token.revoke"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/CreateServiceAccount",
        Access::Operation("identity.service_account.create"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/ListServiceAccounts",
        Access::Operation("identity.service_account.list"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/DeleteServiceAccount",
        Access::Operation("identity.service_account.delete"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/CreateServiceAccountToken",
        Access::Operation("identity.service_account.token_create"),
    ),
    (
        "/vibebox.identity.v1.IdentityService/ListApiTokens",
        Access::Operation("identity.token.list"),
    ),
    // vibebox.audit.v1.AuditService
    (
        "/vibebox.audit.v1.AuditService/QueryEvents",
        Access::Operation("audit.query"),
    ),
    (
        "/vibebox.audit.v1.AuditService/WatchEvents",
        Access::Operation("audit.watch"),
    ),
    (
        "/vibebox.audit.v1.AuditService/VerifyChain",
        Access::Operation("audit.verify"),
    ),
    (
        "/vibebox.audit.v1.AuditService/ExportEvents",
        Access::Operation("audit.export"),
    ),
    // vibebox.policy.v1.PolicyService
    (
        "/vibebox.policy.v1.PolicyService/EvaluateSpec",
        Access::Operation("policy.evaluate"),
    ),
    (
        "/vibebox.policy.v1.PolicyService/GetPolicy",
        Access::Operation("policy.get"),
    ),
];

/// A request's method as the table knows it: travels in the request's
/// extensions from [`Guarded`] to the handler, which reads its name and
/// operation from here (handlers never spell either).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// `/package.Service/Method`.
    pub(crate) path: &'static str,
    /// What a caller needs.
    pub(crate) access: Access,
}

impl Resolved {
    /// `Service/Method` (metrics, logs and audit details).
    pub(crate) fn name(&self) -> &'static str {
        let service_and_method = self.path.trim_start_matches('/');
        match service_and_method.split_once('/') {
            Some((qualified, _)) => {
                let skip = qualified.rfind('.').map_or(0, |dot| dot + 1);
                &service_and_method[skip..]
            }
            None => service_and_method,
        }
    }

    /// The operation identity authorizes (none for anonymous methods).
    pub(crate) fn operation(&self) -> Option<&'static str> {
        match self.access {
            Access::Anonymous => None,
            Access::Operation(operation) => Some(operation),
        }
    }
}

/// The table's entry for the method at `path` (`/package.Service/Method`).
pub(crate) fn rule(path: &str) -> Option<Resolved> {
    TABLE
        .iter()
        .find(|(method, _)| *method == path)
        .map(|(path, access)| Resolved {
            path,
            access: *access,
        })
}

/// A public service that only lets through the methods in a table; the
/// method's [`Access`] travels on in the request's extensions.
#[derive(Clone)]
pub(crate) struct Guarded<S> {
    inner: S,
    table: fn(&str) -> Option<Resolved>,
}

/// Wraps `service` in the gateway's authorization table.
pub(crate) fn guard<S>(service: S) -> Guarded<S> {
    Guarded {
        inner: service,
        table: rule,
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Guarded<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match (self.table)(request.uri().path()) {
            Some(resolved) => {
                request.extensions_mut().insert(resolved);
                let started = std::time::Instant::now();
                let answer = self.inner.call(request);
                async move {
                    let response = answer.await?;
                    // An error is a trailers-only answer (its status in the
                    // headers); an answer without one started as OK.
                    let code = tonic::Status::from_header_map(response.headers())
                        .map_or(tonic::Code::Ok, |status| status.code());
                    crate::metrics::record_call(resolved.name(), code, started);
                    Ok(response)
                }
                .boxed()
            }
            None => {
                let path = request.uri().path().to_owned();
                let status = if declared(&path) {
                    tracing::warn!(method = %path, "refused a method missing from the authorization table");
                    crate::metrics::record_access_event("access.unlisted_method");
                    tonic::Status::permission_denied(format!(
                        "{path} is not in the gateway's authorization table (deny by default)"
                    ))
                } else {
                    tonic::Status::unimplemented(format!("{path} is not a method of this API"))
                };
                futures::future::ready(Ok(status.into_http())).boxed()
            }
        }
    }
}

/// Whether a public proto declares the method at `path` (a declared method
/// missing from the table is a wiring mistake: refused as such; anything
/// else is simply not part of the API).
fn declared(path: &str) -> bool {
    static DECLARED: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    DECLARED
        .get_or_init(|| {
            use prost::Message;
            let set = prost_types::FileDescriptorSet::decode(vibebox_proto::FILE_DESCRIPTOR_SET)
                .unwrap_or_default();
            set.file
                .iter()
                .flat_map(|file| {
                    file.service.iter().flat_map(move |service| {
                        service.method.iter().map(move |method| {
                            format!("/{}.{}/{}", file.package(), service.name(), method.name())
                        })
                    })
                })
                .collect()
        })
        .contains(path)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;
    use tower::ServiceExt;

    use super::*;

    /// The packages the gateway serves to the public.
    const PUBLIC_PACKAGES: &[&str] = &[
        "vibebox.environment.v1",
        "vibebox.identity.v1",
        "vibebox.audit.v1",
        "vibebox.policy.v1",
    ];

    fn public_methods() -> BTreeSet<String> {
        let set = prost_types::FileDescriptorSet::decode(vibebox_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut methods = BTreeSet::new();
        for file in &set.file {
            let package = file.package();
            if !PUBLIC_PACKAGES.contains(&package) {
                continue;
            }
            for service in &file.service {
                for method in &service.method {
                    methods.insert(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
        methods
    }

    #[test]
    fn every_public_method_is_in_the_table_and_nothing_else_is() {
        let declared = public_methods();
        assert!(declared.len() >= 29, "descriptors found: {declared:?}");
        let listed: BTreeSet<String> = TABLE.iter().map(|(m, _)| (*m).to_owned()).collect();
        assert_eq!(listed.len(), TABLE.len(), "a method is listed twice");
        let missing: Vec<_> = declared.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "public methods missing from the authorization table: {missing:?}"
        );
        let stale: Vec<_> = listed.difference(&declared).collect();
        assert!(
            stale.is_empty(),
            "table entries no proto declares: {stale:?}"
        );
    }

    #[test]
    fn names_and_operations_come_from_the_table() {
        let get = rule("/vibebox.environment.v1.EnvironmentService/GetEnvironment").unwrap();
        assert_eq!(get.name(), "EnvironmentService/GetEnvironment");
        assert_eq!(get.operation(), Some("environment.get"));
        let login = rule("/vibebox.identity.v1.IdentityService/Login").unwrap();
        assert_eq!(login.name(), "IdentityService/Login");
        assert_eq!(login.operation(), None);
    }

    #[test]
    fn only_login_is_anonymous() {
        let anonymous: Vec<_> = TABLE
            .iter()
            .filter(|(_, a)| *a == Access::Anonymous)
            .map(|(m, _)| *m)
            .collect();
        assert_eq!(anonymous, ["/vibebox.identity.v1.IdentityService/Login"]);
    }

    #[derive(Clone)]
    struct Echo;
    impl NamedService for Echo {
        const NAME: &'static str = "vibebox.environment.v1.EnvironmentService";
    }
    impl tower::Service<http::Request<Body>> for Echo {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = futures::future::Ready<Result<Self::Response, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: http::Request<Body>) -> Self::Future {
            // Answers OK and says which access rule reached it.
            let access = request.extensions().get::<Resolved>().map(|r| r.access);
            let status = tonic::Status::ok(format!("{access:?}"));
            futures::future::ready(Ok(status.into_http()))
        }
    }

    fn grpc_status(response: &http::Response<Body>) -> (String, String) {
        let status = tonic::Status::from_header_map(response.headers()).expect("grpc-status");
        (
            (status.code() as i32).to_string(),
            status.message().to_owned(),
        )
    }

    fn request(path: &str) -> http::Request<Body> {
        http::Request::builder()
            .uri(format!("http://gateway{path}"))
            .header("content-type", "application/grpc")
            .body(Body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_method_missing_from_the_table_is_refused_before_its_handler() {
        // The real table, minus one method: as if a handler had been added
        // to the proto and the server but forgotten here.
        fn without_get(path: &str) -> Option<Resolved> {
            (path != "/vibebox.environment.v1.EnvironmentService/GetEnvironment")
                .then(|| rule(path))
                .flatten()
        }
        let service = Guarded {
            inner: Echo,
            table: without_get,
        };
        let response = service
            .clone()
            .oneshot(request(
                "/vibebox.environment.v1.EnvironmentService/GetEnvironment",
            ))
            .await
            .unwrap();
        let (code, message) = grpc_status(&response);
        assert_eq!(code, "7", "PERMISSION_DENIED, got {code} {message}");
        assert!(message.contains("authorization table"), "{message}");

        // A listed method reaches the handler with its rule.
        let response = service
            .oneshot(request(
                "/vibebox.environment.v1.EnvironmentService/ListEnvironments",
            ))
            .await
            .unwrap();
        let (code, message) = grpc_status(&response);
        assert_eq!(code, "0");
        assert!(message.contains("environment.list"), "{message}");

        // With the real table, a method no proto declares is not part of
        // the API at all.
        let response = guard(Echo)
            .oneshot(request(
                "/vibebox.environment.v1.EnvironmentService/DropAllTables",
            ))
            .await
            .unwrap();
        assert_eq!(grpc_status(&response).0, "12", "UNIMPLEMENTED");
    }
}
