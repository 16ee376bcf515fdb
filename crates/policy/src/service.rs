//! gRPC adapters: the public `PolicyService` (dry runs, the active policy)
//! and the internal `ClearanceService` (evaluate for a real create, sign a
//! clearance, publish the verification keys). Every decision is audited.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};
use vibebox_audit_client::{AuditClient, AuditClientError, EventBuilder};
use vibebox_clearance::{Grant, KeyRing, KeyStore};
use vibebox_proto::audit::{AuditEvent, Outcome as AuditOutcome, Severity as AuditSeverity};
use vibebox_proto::clearance::clearance_service_server::ClearanceService;
use vibebox_proto::clearance::{
    GetClearanceKeysRequest, GetClearanceKeysResponse, IssueClearanceRequest,
    IssueClearanceResponse,
};
use vibebox_proto::environment::ContainerSpec;
use vibebox_proto::identity::TeamRole;
use vibebox_proto::policy::policy_service_server::PolicyService;
use vibebox_proto::policy::{
    Decision, EvaluateSpecRequest, EvaluateSpecResponse, Evaluation, GetPolicyRequest,
    GetPolicyResponse, ViolationSeverity,
};
use vibebox_server_kit::{meta, status};

use crate::document::{DocumentError, Policy, Visible};
use crate::engine::{Outcome, Violation, evaluate};
use crate::rules::Severity;

/// Who may call what (stated where the services are added, `lib.rs`):
/// the gateway calls everything; the orchestrator only reads the
/// clearance keys.
pub const GATEWAY_ONLY: &[&str] = &["gateway"];
/// The callers of [`GET_CLEARANCE_KEYS`].
pub const KEY_READERS: &[&str] = &["gateway", "orchestrator"];
/// The one method the orchestrator calls.
pub const GET_CLEARANCE_KEYS: &str =
    "/vibebox.internal.clearance.v1.ClearanceService/GetClearanceKeys";

/// Errors of the adapters. Converted to statuses by one exhaustive `From`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("invalid request")]
    BadRequest(Vec<(&'static str, &'static str)>),
    #[error("spec denied by policy")]
    Denied(Vec<Violation>),
    #[error("spec is malformed")]
    InvalidSpec(Vec<Violation>),
    #[error("the requester's team role may not create environments")]
    RoleInsufficient,
    #[error("audit record failed: {0}")]
    Audit(#[from] AuditClientError),
    #[error("cannot render the policy document: {0}")]
    Render(#[from] DocumentError),
}

/// Rule id reported when the requester's role is below developer.
pub const ROLE_RULE: &str = "role.insufficient";

fn rule_list(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| v.rule.id())
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::BadRequest(fields) => status::bad_request("invalid request", &fields),
            ServiceError::Denied(violations) => {
                let details: Vec<(&str, &str, &str)> = violations
                    .iter()
                    .map(|v| (v.rule.id(), v.field.as_ref(), v.message.as_ref()))
                    .collect();
                status::precondition_failure(
                    &format!("spec denied by policy: {}", rule_list(&violations)),
                    &details,
                )
            }
            ServiceError::InvalidSpec(violations) => {
                let described: Vec<String> = violations
                    .iter()
                    .map(|v| format!("{}: {}", v.rule.id(), v.message))
                    .collect();
                let fields: Vec<(&str, &str)> = violations
                    .iter()
                    .zip(&described)
                    .map(|(v, d)| (v.field.as_ref(), d.as_str()))
                    .collect();
                status::bad_request(
                    &format!("invalid spec: {}", rule_list(&violations)),
                    &fields,
                )
            }
            ServiceError::RoleInsufficient => status::precondition_failure(
                "the requester's team role may not create environments",
                &[(
                    ROLE_RULE,
                    "team_role",
                    "creating an environment needs the developer or admin role",
                )],
            ),
            ServiceError::Audit(err @ AuditClientError::Backlog(_)) => {
                status::unavailable("audit service", &err)
            }
            ServiceError::Audit(err) => status::internal(&err),
            ServiceError::Render(err) => status::internal(&err),
        }
    }
}

type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// The clock the service reads (a parameter so tests can move time).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// State shared by both services: the active policy (swapped on reload),
/// the signing keys and the audit client.
pub struct PolicyState {
    policy: RwLock<Arc<Policy>>,
    policy_file: Option<PathBuf>,
    keys: KeyStore,
    audit: AuditClient,
    ttl: Duration,
    clock: Clock,
}

impl PolicyState {
    pub fn new(
        policy: Policy,
        policy_file: Option<PathBuf>,
        keys: KeyStore,
        audit: AuditClient,
        ttl: Duration,
        clock: Clock,
    ) -> Self {
        Self {
            policy: RwLock::new(Arc::new(policy)),
            policy_file,
            keys,
            audit,
            ttl,
            clock,
        }
    }

    /// The active policy.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The public keys that verify clearances.
    pub fn key_ring(&self) -> KeyRing {
        self.keys.key_ring()
    }

    /// Re-reads the policy file. An invalid document leaves the active policy
    /// in place. Either way the attempt is audited (`policy.reload`).
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let Some(path) = &self.policy_file else {
            return Err(ReloadError::NoFile);
        };
        let result = std::fs::read_to_string(path)
            .map_err(|e| ReloadError::Read(e.to_string()))
            .and_then(|text| Policy::from_toml(&text).map_err(ReloadError::Invalid));
        let old = self.policy();
        let reload = |outcome, severity| {
            policy_event("policy.reload", outcome, severity).detail("previous_digest", old.digest())
        };
        let event = match &result {
            Ok(new) => {
                tracing::info!(
                    version = new.version(),
                    digest = new.digest(),
                    "policy reloaded"
                );
                reload(AuditOutcome::Success, AuditSeverity::Medium)
                    .detail("policy_digest", new.digest())
                    .detail("policy_version", new.version())
                    .build()
            }
            Err(e) => {
                tracing::error!(error = %e, "policy reload refused; keeping the active policy");
                reload(AuditOutcome::Failure, AuditSeverity::High)
                    .detail("error", e.to_string())
                    .build()
            }
        };
        if let Err(e) = self.audit.record(event).await {
            tracing::error!(error = %e, "cannot audit the policy reload; keeping the active policy");
            return Err(ReloadError::Audit(e.to_string()));
        }
        let new = result?;
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        Ok(())
    }
}

/// Why a reload did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no policy file is configured")]
    NoFile,
    #[error("cannot read the policy file: {0}")]
    Read(String),
    #[error(transparent)]
    Invalid(#[from] DocumentError),
    #[error("cannot audit the reload: {0}")]
    Audit(String),
}

/// An event of the policy service acting on its own policy.
fn policy_event(action: &str, outcome: AuditOutcome, severity: AuditSeverity) -> EventBuilder {
    EventBuilder::new(action, outcome, severity)
        .service("policy")
        .resource("policy", "")
}

fn metadata(request: &Request<impl Sized>, key: &str) -> String {
    request
        .metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn violation_severity(s: Severity) -> ViolationSeverity {
    match s {
        Severity::Low => ViolationSeverity::Low,
        Severity::Medium => ViolationSeverity::Medium,
        Severity::High => ViolationSeverity::High,
        Severity::Critical => ViolationSeverity::Critical,
    }
}

/// The wire form of an outcome.
pub fn to_evaluation(policy: &Policy, outcome: &Outcome) -> Evaluation {
    Evaluation {
        decision: if outcome.allowed() {
            Decision::Allow
        } else {
            Decision::Deny
        } as i32,
        violations: outcome
            .violations
            .iter()
            .map(|v| vibebox_proto::policy::Violation {
                rule_id: v.rule.id().to_owned(),
                field: v.field.to_string(),
                message: v.message.to_string(),
                severity: violation_severity(v.severity()) as i32,
                cis_id: v.cis.to_owned(),
                pss_control: v.pss.to_owned(),
            })
            .collect(),
        hardened_spec: outcome.hardened.clone(),
        policy_version: policy.version().to_owned(),
        policy_digest: policy.digest().to_owned(),
        canonical_image: outcome.canonical_image.clone().unwrap_or_default(),
    }
}

/// Who asked, for the audit record.
struct Asker {
    user_id: String,
    token_id: String,
    /// `user` or `service_account` (the gateway's [`meta::ACTOR_KIND`]).
    actor_kind: String,
    team_id: String,
    environment_id: String,
    request_id: String,
    client_address: String,
    dry_run: bool,
}

fn decision_event(
    policy: &Policy,
    outcome: &Outcome,
    asker: Asker,
    spec_digest: Option<String>,
) -> AuditEvent {
    let verdict = if outcome.allowed() {
        ("policy.allow", AuditOutcome::Success, AuditSeverity::Low)
    } else if outcome.severity() == Some(Severity::Critical) {
        ("policy.deny", AuditOutcome::Denied, AuditSeverity::Critical)
    } else {
        ("policy.deny", AuditOutcome::Denied, AuditSeverity::High)
    };
    let rule_ids = outcome.violations.iter().map(|v| v.rule.id()).collect();
    decision(policy, outcome, asker, spec_digest, verdict, rule_ids)
}

/// The decision event of a caller whose team role may not create: a denial
/// naming the role rule only.
fn role_denied_event(policy: &Policy, outcome: &Outcome, asker: Asker) -> AuditEvent {
    let verdict = ("policy.deny", AuditOutcome::Denied, AuditSeverity::High);
    decision(policy, outcome, asker, None, verdict, vec![ROLE_RULE])
}

fn decision(
    policy: &Policy,
    outcome: &Outcome,
    asker: Asker,
    spec_digest: Option<String>,
    (action, result, severity): (&str, AuditOutcome, AuditSeverity),
    rule_ids: Vec<&str>,
) -> AuditEvent {
    let event = EventBuilder::new(action, result, severity)
        .user(asker.user_id, asker.token_id)
        .actor_kind(asker.actor_kind)
        .team(asker.team_id)
        .resource("environment", asker.environment_id)
        .request(asker.request_id, asker.client_address)
        .detail("policy_digest", policy.digest())
        .detail("policy_version", policy.version())
        .detail(
            "canonical_image",
            outcome.canonical_image.as_deref().unwrap_or_default(),
        )
        .detail("dry_run", asker.dry_run)
        .detail("rule_ids", rule_ids);
    match spec_digest {
        Some(digest) => event.detail("spec_digest", digest),
        None => event,
    }
    .build()
}

fn asker_from<T>(
    request: &Request<T>,
    team_id: &str,
    environment_id: &str,
    user_id: Option<&str>,
    dry_run: bool,
) -> Asker {
    Asker {
        user_id: user_id.map_or_else(|| metadata(request, meta::USER_ID), str::to_owned),
        token_id: metadata(request, meta::TOKEN_ID),
        actor_kind: metadata(request, meta::ACTOR_KIND),
        team_id: team_id.to_owned(),
        environment_id: environment_id.to_owned(),
        request_id: vibebox_server_kit::request_id(request).unwrap_or_default(),
        client_address: metadata(request, meta::CLIENT_ADDRESS),
        dry_run,
    }
}

/// The overlays a `GetPolicy` caller may see, from the gateway's
/// [`meta::VISIBLE_TEAMS`]: `*` is every team, otherwise team ids separated
/// by commas; absent or empty is none (fail closed).
fn visible_teams(value: &str) -> Visible {
    if value.trim() == "*" {
        return Visible::All;
    }
    Visible::Teams(
        value
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty() && *t != "*")
            .map(str::to_owned)
            .collect(),
    )
}

/// `vibebox.policy.v1.PolicyService`.
#[derive(Clone)]
pub struct PolicyApi {
    state: Arc<PolicyState>,
}

impl PolicyApi {
    pub fn new(state: Arc<PolicyState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl PolicyService for PolicyApi {
    async fn evaluate_spec(
        &self,
        request: Request<EvaluateSpecRequest>,
    ) -> Result<Response<EvaluateSpecResponse>, Status> {
        let Some(spec) = request.get_ref().spec.as_ref() else {
            return Err(ServiceError::BadRequest(vec![("spec", "required")]).into());
        };
        let team_id = request.get_ref().team_id.as_str();
        let policy = self.state.policy();
        let outcome = evaluate(policy.rules_for(team_id), spec);
        let asker = asker_from(&request, team_id, "", None, true);
        // A dry run changes nothing, so an audit failure does not fail it.
        if let Err(e) = self
            .state
            .audit
            .record(decision_event(&policy, &outcome, asker, None))
            .await
        {
            tracing::warn!(error = %e, "cannot audit a dry-run decision");
        }
        Ok(Response::new(EvaluateSpecResponse {
            evaluation: Some(to_evaluation(&policy, &outcome)),
        }))
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<GetPolicyResponse>, Status> {
        let policy = self.state.policy();
        let visible = visible_teams(&metadata(&request, meta::VISIBLE_TEAMS));
        let document = policy.text_for(&visible).map_err(ServiceError::from)?;
        Ok(Response::new(GetPolicyResponse {
            policy_version: policy.version().to_owned(),
            policy_digest: policy.digest().to_owned(),
            document,
        }))
    }
}

/// `vibebox.internal.clearance.v1.ClearanceService`.
#[derive(Clone)]
pub struct ClearanceApi {
    state: Arc<PolicyState>,
}

impl ClearanceApi {
    pub fn new(state: Arc<PolicyState>) -> Self {
        Self { state }
    }
}

fn validate_issue(req: &IssueClearanceRequest) -> Result<&ContainerSpec> {
    let mut bad = Vec::new();
    if req.spec.is_none() {
        bad.push(("spec", "required"));
    }
    if uuid::Uuid::parse_str(&req.environment_id).is_err() {
        bad.push(("environment_id", "must be a UUID"));
    }
    if req.team_id.is_empty() {
        bad.push(("team_id", "required"));
    }
    if req.user_id.is_empty() {
        bad.push(("user_id", "required"));
    }
    match (&req.spec, bad.is_empty()) {
        (Some(spec), true) => Ok(spec),
        _ => Err(ServiceError::BadRequest(bad)),
    }
}

impl ClearanceApi {
    async fn issue(
        &self,
        request: Request<IssueClearanceRequest>,
    ) -> Result<IssueClearanceResponse> {
        let req = request.get_ref();
        let spec = validate_issue(req)?;
        let policy = self.state.policy();
        let asker = asker_from(
            &request,
            &req.team_id,
            &req.environment_id,
            Some(&req.user_id),
            false,
        );
        let role_ok = req.team_role >= TeamRole::Developer as i32;
        let outcome = evaluate(policy.rules_for(&req.team_id), spec);
        let spec_digest = outcome
            .hardened
            .as_ref()
            .map(vibebox_clearance::spec_digest_hex);
        if !role_ok {
            // Audited as a denial with the role rule only.
            self.state
                .audit
                .record(role_denied_event(&policy, &outcome, asker))
                .await?;
            return Err(ServiceError::RoleInsufficient);
        }
        // Fail closed: no decision leaves without its audit record.
        self.state
            .audit
            .record(decision_event(&policy, &outcome, asker, spec_digest))
            .await?;
        let Some(hardened) = outcome.hardened.as_ref() else {
            return Err(if outcome.only_invalid() {
                ServiceError::InvalidSpec(outcome.violations)
            } else {
                ServiceError::Denied(outcome.violations)
            });
        };
        let body = vibebox_clearance::new_body(
            hardened,
            Grant {
                environment_id: req.environment_id.clone(),
                team_id: req.team_id.clone(),
                user_id: req.user_id.clone(),
                policy_digest: policy.digest().to_owned(),
                policy_version: policy.version().to_owned(),
            },
            (self.state.clock)(),
            self.state.ttl,
        );
        let clearance = self.state.keys.active().sign(&body);
        tracing::info!(
            clearance_id = %body.clearance_id,
            environment_id = %req.environment_id,
            key_id = %clearance.key_id,
            "clearance issued"
        );
        Ok(IssueClearanceResponse {
            evaluation: Some(to_evaluation(&policy, &outcome)),
            clearance: Some(clearance),
        })
    }
}

#[tonic::async_trait]
impl ClearanceService for ClearanceApi {
    async fn issue_clearance(
        &self,
        request: Request<IssueClearanceRequest>,
    ) -> Result<Response<IssueClearanceResponse>, Status> {
        Ok(Response::new(self.issue(request).await?))
    }

    async fn get_clearance_keys(
        &self,
        _request: Request<GetClearanceKeysRequest>,
    ) -> Result<Response<GetClearanceKeysResponse>, Status> {
        Ok(Response::new(GetClearanceKeysResponse {
            keys: self.state.key_ring().to_proto(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Rule;
    use prost_types::{ListValue, Struct, Value, value::Kind as ValueKind};
    use std::collections::BTreeMap;
    use tonic::Code;
    use tonic_types::StatusExt;
    use vibebox_proto::audit::Actor;

    fn violation(rule: Rule, field: &'static str) -> Violation {
        Violation {
            rule,
            field: field.into(),
            message: "m".into(),
            cis: rule.cis(),
            pss: rule.pss(),
        }
    }

    fn text(s: &str) -> Value {
        Value {
            kind: Some(ValueKind::StringValue(s.to_owned())),
        }
    }

    fn list(items: &[&str]) -> Value {
        Value {
            kind: Some(ValueKind::ListValue(ListValue {
                values: items.iter().map(|s| text(s)).collect(),
            })),
        }
    }

    fn asker(dry_run: bool) -> Asker {
        Asker {
            user_id: "u1".into(),
            token_id: "t1".into(),
            actor_kind: "service_account".into(),
            team_id: "team-a".into(),
            environment_id: "env-1".into(),
            request_id: "req-1".into(),
            client_address: "10.0.0.1:5".into(),
            dry_run,
        }
    }

    /// The events are the ones recorded before the audit-client builder
    /// (written out field by field).
    #[test]
    fn decision_and_reload_events_are_pinned() {
        let policy = Policy::builtin();
        let common =
            |action: &str, outcome: AuditOutcome, severity: AuditSeverity, fields| AuditEvent {
                action: action.into(),
                actor: Some(Actor {
                    kind: "service_account".into(),
                    user_id: "u1".into(),
                    token_id: "t1".into(),
                    service: String::new(),
                }),
                team_id: "team-a".into(),
                resource_type: "environment".into(),
                resource_id: "env-1".into(),
                outcome: outcome as i32,
                severity: severity as i32,
                details: Some(Struct { fields }),
                request_id: "req-1".into(),
                client_address: "10.0.0.1:5".into(),
                ..AuditEvent::default()
            };
        let allowed = Outcome {
            violations: vec![],
            hardened: None,
            canonical_image: Some("docker.io/library/busybox:latest".into()),
        };
        assert_eq!(
            decision_event(&policy, &allowed, asker(true), Some("abc".into())),
            common(
                "policy.allow",
                AuditOutcome::Success,
                AuditSeverity::Low,
                BTreeMap::from([
                    ("policy_digest".to_owned(), text(policy.digest())),
                    ("policy_version".to_owned(), text(policy.version())),
                    (
                        "canonical_image".to_owned(),
                        text("docker.io/library/busybox:latest")
                    ),
                    (
                        "dry_run".to_owned(),
                        Value {
                            kind: Some(ValueKind::BoolValue(true)),
                        }
                    ),
                    ("rule_ids".to_owned(), list(&[])),
                    ("spec_digest".to_owned(), text("abc")),
                ])
            )
        );
        let denied = Outcome {
            violations: vec![
                violation(Rule::Privileged, "spec.privileged"),
                violation(Rule::MountDockerSocket, "spec.mounts[0].source"),
            ],
            hardened: None,
            canonical_image: None,
        };
        let denied_fields = |rules: &[&str]| {
            BTreeMap::from([
                ("policy_digest".to_owned(), text(policy.digest())),
                ("policy_version".to_owned(), text(policy.version())),
                ("canonical_image".to_owned(), text("")),
                (
                    "dry_run".to_owned(),
                    Value {
                        kind: Some(ValueKind::BoolValue(false)),
                    },
                ),
                ("rule_ids".to_owned(), list(rules)),
            ])
        };
        assert_eq!(
            decision_event(&policy, &denied, asker(false), None),
            common(
                "policy.deny",
                AuditOutcome::Denied,
                AuditSeverity::Critical,
                denied_fields(&["privileged", "mount.docker_socket"])
            )
        );
        assert_eq!(
            role_denied_event(&policy, &allowed, asker(false)).details,
            Some(Struct {
                fields: BTreeMap::from([
                    ("policy_digest".to_owned(), text(policy.digest())),
                    ("policy_version".to_owned(), text(policy.version())),
                    (
                        "canonical_image".to_owned(),
                        text("docker.io/library/busybox:latest")
                    ),
                    (
                        "dry_run".to_owned(),
                        Value {
                            kind: Some(ValueKind::BoolValue(false)),
                        }
                    ),
                    ("rule_ids".to_owned(), list(&[ROLE_RULE])),
                ])
            })
        );
        let role = role_denied_event(&policy, &denied, asker(false));
        assert_eq!(
            role,
            common(
                "policy.deny",
                AuditOutcome::Denied,
                AuditSeverity::High,
                denied_fields(&[ROLE_RULE])
            )
        );

        let reload = policy_event("policy.reload", AuditOutcome::Failure, AuditSeverity::High)
            .detail("error", "bad")
            .build();
        assert_eq!(
            reload,
            AuditEvent {
                action: "policy.reload".into(),
                resource_type: "policy".into(),
                outcome: AuditOutcome::Failure as i32,
                severity: AuditSeverity::High as i32,
                details: Some(Struct {
                    fields: BTreeMap::from([("error".to_owned(), text("bad"))]),
                }),
                actor: Some(Actor {
                    service: "policy".into(),
                    kind: "service".into(),
                    ..Actor::default()
                }),
                ..AuditEvent::default()
            }
        );
    }

    #[test]
    fn errors_map_to_the_right_codes_and_details() {
        let s: Status = ServiceError::BadRequest(vec![("spec", "required")]).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.get_details_bad_request().unwrap().field_violations[0].field,
            "spec"
        );
        let s: Status = ServiceError::Denied(vec![
            violation(Rule::Privileged, "spec.privileged"),
            violation(Rule::MountDockerSocket, "spec.mounts[0].source"),
        ])
        .into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(
            status::violated_rules(&s),
            ["privileged", "mount.docker_socket"]
        );
        let pf = s.get_details_precondition_failure().unwrap();
        assert_eq!(pf.violations[1].subject, "spec.mounts[0].source");
        let s: Status =
            ServiceError::InvalidSpec(vec![violation(Rule::ImageInvalid, "spec.image")]).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        let br = s.get_details_bad_request().unwrap();
        assert_eq!(br.field_violations[0].field, "spec.image");
        assert!(
            br.field_violations[0]
                .description
                .starts_with("image.invalid")
        );
        let s: Status = ServiceError::RoleInsufficient.into();
        assert_eq!(status::violated_rules(&s), [ROLE_RULE]);
        let s: Status = ServiceError::Audit(AuditClientError::Poisoned).into();
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(s.message(), "internal error");
        // An audit service away for long (its backlog full) is unavailable.
        let s: Status = ServiceError::Audit(AuditClientError::Backlog(1 << 29)).into();
        assert_eq!(s.code(), Code::Unavailable);
        let s: Status = ServiceError::Render(DocumentError::Invalid {
            field: "x".into(),
            message: "y".into(),
        })
        .into();
        assert_eq!(s.code(), Code::Internal);
    }

    #[test]
    fn visible_teams_fail_closed() {
        assert_eq!(visible_teams("*"), Visible::All);
        assert_eq!(visible_teams(" * "), Visible::All);
        assert_eq!(visible_teams(""), Visible::Teams(Vec::new()));
        assert_eq!(
            visible_teams("a, b,,*"),
            Visible::Teams(vec!["a".into(), "b".into()])
        );
    }
}
