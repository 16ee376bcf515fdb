//! The gateway's shared core: upstream clients, the authentication and
//! rate-limit steps every call goes through, trusted metadata for forwarded
//! calls, and the audit of refused calls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Code, Request};
use vibebox_audit_client::{AuditClient, EventBuilder};
use vibebox_proto::audit::audit_service_client::AuditServiceClient;
use vibebox_proto::audit::{AuditEvent, Outcome, Severity};
use vibebox_proto::authz::{AuthorizeResponse, Resource};
use vibebox_proto::clearance::clearance_service_client::ClearanceServiceClient;
use vibebox_proto::environment::Environment;
use vibebox_proto::identity::identity_service_client::IdentityServiceClient;
use vibebox_proto::policy::policy_service_client::PolicyServiceClient;
use vibebox_proto::runtime::runtime_service_client::RuntimeServiceClient;
use vibebox_proto::runtime::{Caller, GetEnvironmentRequest};
use vibebox_server_kit::{GrpcChannel, InFlightPermit, meta};

use crate::replica::{MarkedChannel, Replica};

use crate::auth::{AuthError, Authenticator, Principal, bearer_token};
use crate::error::{GatewayError, Result};
use crate::ratelimit::UserRateLimiter;
use crate::shares::{CallKind, Share, ShareLimits, Shares};
use crate::validate;

pub(crate) const IDENTITY: &str = "identity";
pub(crate) const POLICY: &str = "policy";
pub(crate) const ORCHESTRATOR: &str = "orchestrator";
pub(crate) const AUDIT: &str = "audit";

/// Refusals audited per second per client address or user (sustained).
const AUDIT_BUDGET_PER_SECOND: u32 = 5;
/// Refusals audited in a burst per client address or user.
const AUDIT_BUDGET_BURST: u32 = 20;

/// Channels to the internal services (mutual TLS, the gateway's identity).
pub(crate) struct Upstreams {
    pub(crate) identity: GrpcChannel,
    pub(crate) policy: GrpcChannel,
    pub(crate) orchestrator: GrpcChannel,
    pub(crate) audit: GrpcChannel,
}

/// Knobs of the shared core.
pub(crate) struct Settings {
    pub(crate) rate_per_second: u32,
    pub(crate) rate_burst: u32,
    pub(crate) upstream_timeout: Duration,
    pub(crate) decision_cache_ttl: Duration,
    /// Per-user and global caps on streams and calls in flight.
    pub(crate) shares: ShareLimits,
    /// Time between re-authorizations of an open stream.
    pub(crate) stream_recheck: Duration,
    /// How old a `WatchEnvironments` resume token may be.
    pub(crate) watch_retention: Duration,
    /// How far a `WatchEnvironments` stream may fall behind.
    pub(crate) watch_max_lag: Duration,
}

/// State shared by every handler.
pub(crate) struct Gateway {
    pub(crate) auth: Authenticator,
    limiter: UserRateLimiter,
    /// Limits unauthenticated traffic (Login, refused tokens) per client address.
    anonymous_limiter: UserRateLimiter,
    /// Bounds how many refusals per address or user are audited (a flood of
    /// refused calls must not turn into a flood of fsyncs); every refusal is
    /// still counted in the metrics.
    audit_budget: UserRateLimiter,
    audit_log: AuditClient,
    pub(crate) runtime: RuntimeServiceClient<MarkedChannel>,
    /// Environments as the orchestrator's feed describes them.
    pub(crate) replica: Arc<Replica>,
    pub(crate) clearance: ClearanceServiceClient<GrpcChannel>,
    pub(crate) identity: IdentityServiceClient<GrpcChannel>,
    pub(crate) policy: PolicyServiceClient<GrpcChannel>,
    pub(crate) audit: AuditServiceClient<GrpcChannel>,
    upstream_timeout: Duration,
    /// Fair shares: per-user caps on streams and calls in flight.
    shares: Arc<Shares>,
    /// Time between re-authorizations of an open stream.
    pub(crate) stream_recheck: Duration,
    /// How old a `WatchEnvironments` resume token may be.
    pub(crate) watch_retention: Duration,
    /// How far a `WatchEnvironments` stream may fall behind.
    pub(crate) watch_max_lag: Duration,
}

/// What is known about a call before it is authenticated.
pub(crate) struct CallInfo {
    /// `Service/Method`, from the authorization table.
    pub(crate) method: &'static str,
    /// The operation the table names for the method (none: anonymous).
    operation: Option<&'static str>,
    pub(crate) request_id: String,
    pub(crate) client_address: String,
    pub(crate) timeout: Duration,
    authorization: Option<AsciiMetadataValue>,
    token: Option<String>,
    /// A short call or a long-lived stream (which share it takes).
    kind: CallKind,
    /// The call's permit of the server's global in-flight limit (a stream
    /// gives it back once admitted; it counts against the stream caps).
    permit: Option<InFlightPermit>,
}

impl CallInfo {
    /// Reads what the gateway needs from an incoming request. The method
    /// and its operation come from the authorization table (the request
    /// passed through [`crate::authz::Guarded`]); a request that did not is
    /// refused, never served.
    pub(crate) fn of<T>(request: &Request<T>, max_timeout: Duration) -> Result<Self> {
        let Some(resolved) = request
            .extensions()
            .get::<crate::authz::Resolved>()
            .copied()
        else {
            return Err(GatewayError::Unlisted);
        };
        let metadata = request.metadata();
        let request_id = vibebox_server_kit::request_id(request)
            .or_else(|| {
                metadata
                    .get(meta::REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .filter(|id| validate::optional_id("request_id", id).is_ok() && !id.is_empty())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let client_address = request
            .remote_addr()
            .map(|a: SocketAddr| a.to_string())
            .unwrap_or_default();
        let timeout = client_timeout(metadata).map_or(max_timeout, |t| t.min(max_timeout));
        Ok(Self {
            method: resolved.name(),
            operation: resolved.operation(),
            request_id,
            client_address,
            timeout,
            authorization: metadata.get("authorization").cloned(),
            token: bearer_token(metadata).map(str::to_owned),
            kind: CallKind::Unary,
            permit: InFlightPermit::of(request),
        })
    }
}

/// An authenticated call.
pub(crate) struct Call {
    pub(crate) info: CallInfo,
    /// What identity authorizes for this call (the table's operation).
    operation: &'static str,
    pub(crate) principal: Principal,
    /// The caller's fair share, held as long as the call (or stream) lives.
    share: Option<Share>,
}

impl Call {
    /// The operation the authorization table names for this call's method.
    pub(crate) fn operation(&self) -> &'static str {
        self.operation
    }

    pub(crate) fn user_id(&self) -> &str {
        self.principal.user_id()
    }

    /// Who asked, for the orchestrator's audit records.
    pub(crate) fn caller(&self) -> Caller {
        Caller {
            user_id: self.principal.user_id().to_owned(),
            token_id: self.principal.token_id().to_owned(),
            request_id: self.info.request_id.clone(),
            client_address: self.info.client_address.clone(),
            actor_kind: self.principal.actor_kind().to_owned(),
        }
    }

    /// A request to an internal service carrying the trusted caller
    /// metadata and the call's deadline.
    pub(crate) fn forward<T>(&self, message: T) -> Request<T> {
        let mut request = self.forward_stream(message);
        request.set_timeout(self.info.timeout);
        request
    }

    /// Like [`forward`](Self::forward) without a deadline (long-lived streams).
    pub(crate) fn forward_stream<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let md = request.metadata_mut();
        insert(md, meta::USER_ID, self.principal.user_id());
        insert(md, meta::TOKEN_ID, self.principal.token_id());
        let kind = self.principal.actor_kind();
        if !kind.is_empty() {
            insert(md, meta::ACTOR_KIND, kind);
        }
        insert(md, meta::REQUEST_ID, &self.info.request_id);
        insert(md, meta::CLIENT_ADDRESS, &self.info.client_address);
        request
    }

    /// A request to identity: trusted metadata plus the raw authorization header.
    pub(crate) fn forward_identity<T>(&self, message: T) -> Request<T> {
        let mut request = self.forward(message);
        if let Some(value) = &self.info.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }
}

fn insert(md: &mut MetadataMap, key: &'static str, value: &str) {
    if let Ok(value) = value.parse::<AsciiMetadataValue>() {
        md.insert(key, value);
    }
}

/// The client's `grpc-timeout`, if any.
pub(crate) fn client_timeout(md: &MetadataMap) -> Option<Duration> {
    let value = md.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl Gateway {
    pub(crate) fn new(upstreams: Upstreams, audit_log: AuditClient, settings: &Settings) -> Self {
        let replica = Arc::new(Replica::default());
        Self {
            auth: Authenticator::new(upstreams.identity.clone(), settings.decision_cache_ttl),
            limiter: UserRateLimiter::new(settings.rate_per_second, settings.rate_burst),
            anonymous_limiter: UserRateLimiter::new(settings.rate_per_second, settings.rate_burst),
            audit_budget: UserRateLimiter::new(AUDIT_BUDGET_PER_SECOND, AUDIT_BUDGET_BURST),
            audit_log,
            runtime: RuntimeServiceClient::new(MarkedChannel::new(
                upstreams.orchestrator,
                replica.clone(),
            )),
            replica,
            clearance: ClearanceServiceClient::new(upstreams.policy.clone()),
            identity: IdentityServiceClient::new(upstreams.identity),
            policy: PolicyServiceClient::new(upstreams.policy),
            audit: AuditServiceClient::new(upstreams.audit),
            upstream_timeout: settings.upstream_timeout,
            shares: Shares::new(settings.shares),
            stream_recheck: settings.stream_recheck,
            watch_retention: settings.watch_retention,
            watch_max_lag: settings.watch_max_lag,
        }
    }

    /// Periodic housekeeping: key refresh and rate-limiter shrinking.
    pub(crate) async fn maintain(
        self: Arc<Self>,
        key_refresh: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(key_refresh);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(error) = self.auth.refresh_keys().await {
                        tracing::debug!(%error, "token key refresh failed; will retry");
                    }
                    self.limiter.shrink();
                    self.anonymous_limiter.shrink();
                    self.audit_budget.shrink();
                }
            }
        }
    }

    /// Reads the call's metadata.
    pub(crate) fn info<T>(&self, request: &Request<T>) -> Result<CallInfo> {
        CallInfo::of(request, self.upstream_timeout)
    }

    /// Reads the metadata of a call that answers with a long-lived stream.
    pub(crate) fn stream_info<T>(&self, request: &Request<T>) -> Result<CallInfo> {
        let mut info = CallInfo::of(request, self.upstream_timeout)?;
        info.kind = CallKind::Stream;
        Ok(info)
    }

    /// Authenticates the bearer token and applies the caller's rate limit.
    /// A token not verified already costs the client address one unit of
    /// its anonymous budget first: verification is the expensive step, so
    /// the per-address limit applies before it (garbage and hostile tokens
    /// from one address cannot take the gateway's CPU).
    pub(crate) async fn authenticate(&self, info: Result<CallInfo>) -> Result<Call> {
        let info = info?;
        // An anonymous method has no operation to authorize: a handler that
        // authenticates one is a wiring mistake, refused.
        let Some(operation) = info.operation else {
            return Err(GatewayError::Unlisted);
        };
        let Some(token) = info.token.clone() else {
            self.refuse_anonymous(&info, "missing bearer token");
            return Err(GatewayError::MissingToken);
        };
        if !self.auth.is_verified(&token) {
            self.limit_anonymous(&info)?;
        }
        let principal = match self.auth.authenticate(&token).await {
            Ok(principal) => principal,
            Err(AuthError::Unauthenticated(reason)) => {
                self.refuse_anonymous(&info, reason);
                return Err(GatewayError::InvalidToken(reason));
            }
            Err(AuthError::Refused(rule)) => {
                self.refuse_anonymous(&info, rule);
                return Err(GatewayError::TokenRefused(rule));
            }
            Err(AuthError::Denied(reason)) => return Err(GatewayError::Denied(reason)),
            Err(AuthError::Unavailable(detail)) => {
                return Err(GatewayError::Unavailable {
                    service: IDENTITY,
                    detail,
                });
            }
        };
        let mut call = Call {
            info,
            operation,
            principal,
            share: None,
        };
        if !self.limiter.check(call.user_id()) {
            if self.audit_budget.check(&format!("user:{}", call.user_id())) {
                self.record(
                    &call.info,
                    Some(&call.principal),
                    "access.rate_limited",
                    Severity::Low,
                    "per-user rate limit exceeded",
                    None,
                );
            } else {
                crate::metrics::record_access_event("access.rate_limited");
            }
            return Err(GatewayError::RateLimited);
        }
        self.take_share(&mut call)?;
        Ok(call)
    }

    /// Takes the caller's fair share for the call: a slot of the user's
    /// calls in flight, or of its streams and the gateway's streams (a
    /// stream then gives its global in-flight permit back).
    fn take_share(&self, call: &mut Call) -> Result<()> {
        match self.shares.admit(call.user_id(), call.info.kind) {
            Ok(share) => {
                if call.info.kind == CallKind::Stream
                    && let Some(permit) = &call.info.permit
                {
                    permit.release();
                }
                call.share = Some(share);
                Ok(())
            }
            Err(error) => {
                if self.audit_budget.check(&format!("user:{}", call.user_id())) {
                    self.record(
                        &call.info,
                        Some(&call.principal),
                        "access.quota_exceeded",
                        Severity::Low,
                        &error.to_string(),
                        None,
                    );
                } else {
                    crate::metrics::record_access_event("access.quota_exceeded");
                }
                Err(GatewayError::Share {
                    subject: format!("user:{}", call.user_id()),
                    error,
                })
            }
        }
    }

    /// Rate limit for calls without a user (Login), by client address.
    pub(crate) fn limit_anonymous(&self, info: &CallInfo) -> Result<()> {
        let key = client_host(&info.client_address);
        if self.anonymous_limiter.check(&key) {
            return Ok(());
        }
        if self.audit_budget.check(&format!("addr:{key}")) {
            self.record(
                info,
                None,
                "access.rate_limited",
                Severity::Low,
                "per-address rate limit exceeded",
                None,
            );
        } else {
            crate::metrics::record_access_event("access.rate_limited");
        }
        Err(GatewayError::RateLimited)
    }

    /// The caller's teams from identity; a token identity no longer accepts
    /// is UNAUTHENTICATED, as everywhere.
    pub(crate) async fn caller_teams(&self, call: &Call) -> Result<Vec<String>> {
        match self.auth.caller_scopes(&call.principal).await {
            Ok(scopes) => Ok(scopes.teams.into_iter().map(|t| t.team_id).collect()),
            Err(AuthError::Unauthenticated(reason) | AuthError::Refused(reason)) => {
                self.refuse_anonymous(&call.info, reason);
                Err(GatewayError::InvalidToken(reason))
            }
            Err(AuthError::Denied(reason)) => Err(GatewayError::Denied(reason)),
            Err(AuthError::Unavailable(detail)) => Err(GatewayError::Unavailable {
                service: IDENTITY,
                detail,
            }),
        }
    }

    /// The caller's teams its token's own checks allow for the call's
    /// operation, evaluated off the async workers in one job.
    pub(crate) async fn teams_allowed(&self, call: &Call) -> Result<Vec<String>> {
        let teams = self.caller_teams(call).await?;
        let verified = call.principal.verified.clone();
        let operation = call.operation();
        let allowed = self
            .auth
            .evaluate(move || {
                let mut allowed = Vec::new();
                for team in teams {
                    match verified
                        .authorize(&vibebox_token::AuthzRequest::new(operation).team(&team))
                    {
                        Ok(()) => allowed.push(team),
                        Err(vibebox_token::TokenError::Expired) => {
                            return Err(vibebox_token::TokenError::Expired);
                        }
                        Err(_) => {}
                    }
                }
                Ok(allowed)
            })
            .await;
        match allowed {
            Ok(teams) => Ok(teams),
            Err(vibebox_token::TokenError::Expired) => {
                Err(GatewayError::InvalidToken("token expired"))
            }
            Err(_) => Err(GatewayError::InvalidToken("token processing failed")),
        }
    }

    fn refuse_anonymous(&self, info: &CallInfo, reason: &'static str) {
        // A flood of bad tokens is audited only within the per-address budget
        // (the refusals themselves are always counted in metrics).
        let key = format!("addr:{}", client_host(&info.client_address));
        if self.audit_budget.check(&key) {
            self.record(
                info,
                None,
                "access.unauthenticated",
                Severity::Low,
                reason,
                None,
            );
        } else {
            crate::metrics::record_access_event("access.unauthenticated");
        }
    }

    /// Asks identity whether the call may perform `operation` on `resource`.
    pub(crate) async fn authorize(
        &self,
        call: &Call,
        resource: Resource,
    ) -> Result<AuthorizeResponse> {
        let operation = call.operation();
        match self
            .auth
            .authorize(&call.principal, operation, &resource)
            .await
        {
            Ok(decision) => Ok(decision),
            Err(AuthError::Denied(reason)) => {
                self.record_denied(call, operation, &reason, &resource);
                Err(GatewayError::Denied(reason))
            }
            Err(AuthError::Unauthenticated(reason) | AuthError::Refused(reason)) => {
                self.refuse_anonymous(&call.info, reason);
                Err(GatewayError::InvalidToken(reason))
            }
            Err(AuthError::Unavailable(detail)) => Err(GatewayError::Unavailable {
                service: IDENTITY,
                detail,
            }),
        }
    }

    /// Audits a request refused for its content before it travels further
    /// (a field out of range, a malformed spec): attempts are evidence too.
    pub(crate) fn record_invalid(&self, call: &Call, error: &GatewayError, resource: &Resource) {
        let reason = format!("{}: {error}", call.operation());
        self.record(
            &call.info,
            Some(&call.principal),
            "request.invalid",
            Severity::Medium,
            &reason,
            Some(resource),
        );
    }

    fn record_denied(&self, call: &Call, operation: &str, reason: &str, resource: &Resource) {
        let reason = format!("{operation}: {reason}");
        self.record(
            &call.info,
            Some(&call.principal),
            "access.denied",
            Severity::Medium,
            &reason,
            Some(resource),
        );
    }

    /// Loads an environment from the orchestrator and authorizes `operation`
    /// on it. A missing environment and a forbidden one get the same answer.
    pub(crate) async fn environment(
        &self,
        call: &Call,
        environment_id: &str,
    ) -> Result<(Environment, AuthorizeResponse)> {
        let operation = call.operation();
        let environment = match self.replica.get(environment_id) {
            Some(environment) => Some(environment),
            None => {
                let found = self
                    .runtime
                    .clone()
                    .get_environment(call.forward(GetEnvironmentRequest {
                        environment_id: environment_id.to_owned(),
                    }))
                    .await;
                match found {
                    Ok(response) => response.into_inner().environment,
                    Err(status) if status.code() == Code::NotFound => None,
                    Err(status) => return Err(GatewayError::upstream(ORCHESTRATOR)(status)),
                }
            }
        };
        let Some(environment) = environment else {
            let resource = Resource {
                kind: "environment".into(),
                environment_id: environment_id.to_owned(),
                ..Default::default()
            };
            self.record_denied(call, operation, "environment not found", &resource);
            return Err(GatewayError::EnvironmentDenied);
        };
        let resource = Resource {
            kind: "environment".into(),
            team_id: environment.team_id.clone(),
            environment_id: environment.id.clone(),
            owner_id: environment.owner_id.clone(),
            id: environment.id.clone(),
        };
        match self.authorize(call, resource).await {
            Ok(decision) => Ok((environment, decision)),
            Err(GatewayError::Denied(_)) => Err(GatewayError::EnvironmentDenied),
            Err(other) => Err(other),
        }
    }

    /// Records an access event in the background (a refusal never waits on
    /// the audit outbox; failures are logged).
    fn record(
        &self,
        info: &CallInfo,
        principal: Option<&Principal>,
        action: &'static str,
        severity: Severity,
        reason: &str,
        resource: Option<&Resource>,
    ) {
        crate::metrics::record_access_event(action);
        tracing::debug!(action, method = info.method, reason, "call refused");
        let user = principal
            .map(|p| (p.user_id(), p.token_id(), p.actor_kind()))
            .unwrap_or_default();
        let event = access_event(
            info.method,
            (&info.request_id, &info.client_address),
            user,
            action,
            severity,
            reason,
            resource,
        );
        let audit_log = self.audit_log.clone();
        tokio::spawn(async move {
            if let Err(error) = audit_log.record(event).await {
                tracing::error!(%error, action, "cannot record an access audit event");
            }
        });
    }
}

/// An access event: `user` (user id, token id and kind; empty when
/// unauthenticated) was refused `action` on `method` for `reason`;
/// `request` is the request id and the client's address.
fn access_event(
    method: &str,
    request: (&str, &str),
    user: (&str, &str, &str),
    action: &str,
    severity: Severity,
    reason: &str,
    resource: Option<&Resource>,
) -> AuditEvent {
    let (resource_type, resource_id, team_id) = resource
        .map(|r| {
            let id = [&r.environment_id, &r.id, &r.team_id]
                .into_iter()
                .find(|s| !s.is_empty())
                .map_or("", |s| s.as_str());
            (r.kind.as_str(), id, r.team_id.as_str())
        })
        .unwrap_or_default();
    EventBuilder::new(action, Outcome::Denied, severity)
        .user(user.0, user.1)
        .actor_kind(user.2)
        .team(team_id)
        .resource(resource_type, resource_id)
        .detail("method", method)
        .detail("reason", reason)
        .trace_id(vibebox_server_kit::trace_id())
        .request(request.0, request.1)
        .build()
}

/// The source of `ip:port` every per-address limit keys on: the IP, not
/// the connection; an IPv6 client by its /64 (rotating addresses within
/// one does not buy a fresh budget).
fn client_host(address: &str) -> String {
    meta::source_key(address)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vibebox_proto::audit::Actor;

    /// Access events are the ones recorded before the audit-client builder
    /// (written out field by field).
    #[test]
    fn access_events_name_the_method_reason_and_resource() {
        let text = |s: &str| prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(s.to_owned())),
        };
        let resource = Resource {
            kind: "environment".into(),
            team_id: "team-a".into(),
            environment_id: "env-1".into(),
            owner_id: "u2".into(),
            id: "env-1".into(),
        };
        let event = access_event(
            "EnvironmentService/GetEnvironment",
            ("req-1", "10.0.0.1:5"),
            ("u1", "t1", "service_account"),
            "access.denied",
            Severity::High,
            "not a member",
            Some(&resource),
        );
        assert_eq!(
            event,
            AuditEvent {
                actor: Some(Actor {
                    kind: "service_account".into(),
                    user_id: "u1".into(),
                    token_id: "t1".into(),
                    service: String::new(),
                }),
                team_id: "team-a".into(),
                action: "access.denied".into(),
                resource_type: "environment".into(),
                resource_id: "env-1".into(),
                outcome: Outcome::Denied as i32,
                severity: Severity::High as i32,
                details: Some(prost_types::Struct {
                    fields: std::collections::BTreeMap::from([
                        (
                            "method".to_owned(),
                            text("EnvironmentService/GetEnvironment")
                        ),
                        ("reason".to_owned(), text("not a member")),
                    ]),
                }),
                trace_id: vibebox_server_kit::trace_id(),
                request_id: "req-1".into(),
                client_address: "10.0.0.1:5".into(),
                ..AuditEvent::default()
            }
        );

        // Unauthenticated, no resource; a team-only resource is named by its team.
        let anonymous = access_event(
            "IdentityService/WhoAmI",
            ("req-2", "10.0.0.2:6"),
            ("", "", ""),
            "access.unauthenticated",
            Severity::Medium,
            "no token",
            None,
        );
        assert_eq!(anonymous.actor, Some(Actor::default()));
        assert_eq!(
            (
                anonymous.resource_type.as_str(),
                anonymous.resource_id.as_str(),
                anonymous.team_id.as_str()
            ),
            ("", "", "")
        );
        let team = Resource {
            kind: "team".into(),
            team_id: "team-b".into(),
            ..Resource::default()
        };
        let event = access_event(
            "m",
            ("", ""),
            ("u", "t", "user"),
            "access.denied",
            Severity::High,
            "r",
            Some(&team),
        );
        assert_eq!(
            (
                event.resource_type.as_str(),
                event.resource_id.as_str(),
                event.team_id.as_str()
            ),
            ("team", "team-b", "team-b")
        );
    }

    #[test]
    fn grpc_timeout_parsing() {
        let mut md = MetadataMap::new();
        assert_eq!(client_timeout(&md), None);
        md.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(client_timeout(&md), Some(Duration::from_millis(250)));
        md.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(client_timeout(&md), Some(Duration::from_secs(3)));
        md.insert("grpc-timeout", "xS".parse().unwrap());
        assert_eq!(client_timeout(&md), None);
    }

    #[test]
    fn hosts_strip_ports_and_group_ipv6_by_its_64() {
        assert_eq!(client_host("127.0.0.1:5555"), "127.0.0.1");
        assert_eq!(client_host("[::ffff:127.0.0.1]:80"), "127.0.0.1");
        assert_eq!(
            client_host("[2001:db8:1:2:aaaa::1]:443"),
            client_host("[2001:db8:1:2:bbbb::9]:443")
        );
        assert_eq!(client_host(""), "unknown");
    }
}
