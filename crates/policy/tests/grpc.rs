//! The policy service over real gRPC on loopback with mutual TLS: the
//! security model's attack scenarios, a benign create with a clearance that
//! verifies, tampering and expiry, caller restrictions, audit records, and
//! reload on SIGHUP.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt;
use vibebox_clearance::{Expected, KeyRing, VerifyError};
use vibebox_policy::Config;
use vibebox_proto::audit::AuditEvent;
use vibebox_proto::audit_ingest::audit_ingest_service_server::{
    AuditIngestService, AuditIngestServiceServer,
};
use vibebox_proto::audit_ingest::{AppendEventsRequest, AppendEventsResponse};
use vibebox_proto::clearance::clearance_service_client::ClearanceServiceClient;
use vibebox_proto::clearance::{GetClearanceKeysRequest, IssueClearanceRequest};
use vibebox_proto::environment::{
    ContainerSpec, Egress, EgressMode, EgressRule, Lifetime, Mount, MountType,
};
use vibebox_proto::policy::policy_service_client::PolicyServiceClient;
use vibebox_proto::policy::{Decision, EvaluateSpecRequest, GetPolicyRequest, ViolationSeverity};
use vibebox_server_kit::testing::TestPki;
use vibebox_server_kit::{GrpcChannel, ServerBuilder, status};

const TEAM: &str = "team-1";
const DEVELOPER: i32 = 2;
const VIEWER: i32 = 1;

/// Collects what the policy service audits (a stand-in for the audit
/// service, which is not the subject here), over real gRPC.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<AuditEvent>>>);

#[tonic::async_trait]
impl AuditIngestService for Collector {
    async fn append_events(
        &self,
        request: Request<AppendEventsRequest>,
    ) -> Result<Response<AppendEventsResponse>, Status> {
        let mut events = self.0.lock().unwrap();
        let mut sequences = Vec::new();
        for e in request.into_inner().events {
            if !events.iter().any(|x| x.id == e.id) {
                events.push(e);
            }
            sequences.push(events.len() as u64);
        }
        Ok(Response::new(AppendEventsResponse {
            sequences,
            ..Default::default()
        }))
    }
}

struct Harness {
    pki: TestPki,
    url: String,
    audit: Collector,
    shutdown: CancellationToken,
    policy_file: std::path::PathBuf,
}

impl Harness {
    async fn start(policy: Option<&str>) -> Self {
        let pki = TestPki::new();
        let shutdown = CancellationToken::new();

        let audit = Collector::default();
        let audit_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let audit_url = format!("https://{}", audit_listener.local_addr().unwrap());
        let audit_args = pki.server_args("audit");
        let server = ServerBuilder::new("audit", &audit_args)
            .tls(Some(pki.material("audit")))
            .allow_callers(&["policy"])
            .add_service(AuditIngestServiceServer::new(audit.clone()));
        tokio::spawn(server.serve(audit_listener, shutdown.clone()));

        let server = pki.server_args("policy");
        let policy_file = server.data_dir.join("policy.toml");
        if let Some(text) = policy {
            std::fs::write(&policy_file, text).unwrap();
        }
        let config = Config {
            server,
            policy_file: policy.map(|_| policy_file.clone()),
            clearance_key_dir: None,
            rotate_clearance_key: false,
            retire_clearance_keys: Vec::new(),
            clearance_ttl_secs: 60,
            audit: vibebox_audit_client::AuditArgs { url: audit_url },
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = vibebox_policy::run_with_listener(config, listener, token).await {
                panic!("policy service failed: {e:#}");
            }
        });
        let h = Self {
            pki,
            url,
            audit,
            shutdown,
            policy_file,
        };
        h.wait_ready().await;
        h
    }

    fn channel(&self, identity: &str) -> GrpcChannel {
        vibebox_server_kit::connect(&self.url, &self.pki.material(identity)).unwrap()
    }

    fn clearance(&self, identity: &str) -> ClearanceServiceClient<GrpcChannel> {
        ClearanceServiceClient::new(self.channel(identity))
    }

    fn policy(&self) -> PolicyServiceClient<GrpcChannel> {
        PolicyServiceClient::new(self.channel("gateway"))
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if self.policy().get_policy(GetPolicyRequest {}).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("policy service did not come up");
    }

    /// Waits until an audit event matching `pred` has been delivered.
    async fn audited(&self, pred: impl Fn(&AuditEvent) -> bool) -> AuditEvent {
        for _ in 0..400 {
            if let Some(e) = self.audit.0.lock().unwrap().iter().find(|e| pred(e)) {
                return e.clone();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("expected audit event not delivered");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn request(spec: ContainerSpec) -> IssueClearanceRequest {
    IssueClearanceRequest {
        spec: Some(spec),
        environment_id: uuid::Uuid::new_v4().to_string(),
        team_id: TEAM.into(),
        user_id: "user-1".into(),
        team_role: DEVELOPER,
    }
}

fn benign() -> ContainerSpec {
    ContainerSpec {
        image: "busybox:1.36".into(),
        command: vec!["sleep".into(), "3600".into()],
        ..Default::default()
    }
}

fn rule_ids(event: &AuditEvent) -> Vec<String> {
    use prost_types::value::Kind;
    let Some(Kind::ListValue(list)) = event
        .details
        .as_ref()
        .and_then(|d| d.fields.get("rule_ids"))
        .and_then(|v| v.kind.clone())
    else {
        return Vec::new();
    };
    list.values
        .into_iter()
        .filter_map(|v| match v.kind {
            Some(Kind::StringValue(s)) => Some(s),
            _ => None,
        })
        .collect()
}

async fn denied(h: &Harness, spec: ContainerSpec) -> (Status, IssueClearanceRequest) {
    let req = request(spec);
    let err = h
        .clearance("gateway")
        .issue_clearance(req.clone())
        .await
        .unwrap_err();
    (err, req)
}

#[tokio::test]
async fn scenario_1_docker_socket_mount_is_denied_and_audited_critical() {
    let h = Harness::start(None).await;
    let spec = ContainerSpec {
        mounts: vec![Mount {
            r#type: MountType::Bind as i32,
            source: "/var/run/docker.sock".into(),
            target: "/var/run/docker.sock".into(),
            read_only: false,
            size_mb: None,
        }],
        ..benign()
    };
    let (err, req) = denied(&h, spec).await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(status::violated_rules(&err), ["mount.docker_socket"]);
    let pf = err.get_details_precondition_failure().unwrap();
    assert_eq!(pf.violations[0].subject, "spec.mounts[0].source");
    let ev = h.audited(|e| e.resource_id == req.environment_id).await;
    assert_eq!(ev.action, "policy.deny");
    assert_eq!(ev.severity, vibebox_proto::audit::Severity::Critical as i32);
    assert_eq!(ev.outcome, vibebox_proto::audit::Outcome::Denied as i32);
    assert_eq!(ev.team_id, TEAM);
    assert_eq!(ev.source_service, "policy");
    assert_eq!(rule_ids(&ev), ["mount.docker_socket"]);
}

#[tokio::test]
async fn scenario_2_privileged_is_denied_and_audited_critical() {
    let h = Harness::start(None).await;
    let (err, req) = denied(
        &h,
        ContainerSpec {
            image: "ubuntu:24.04".into(),
            privileged: true,
            ..benign()
        },
    )
    .await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(status::violated_rules(&err), ["privileged"]);
    let ev = h.audited(|e| e.resource_id == req.environment_id).await;
    assert_eq!(ev.severity, vibebox_proto::audit::Severity::Critical as i32);
    assert_eq!(rule_ids(&ev), ["privileged"]);
}

#[tokio::test]
async fn scenario_3_docker_in_docker_image_is_denied() {
    let h = Harness::start(None).await;
    for image in [
        "docker:24-dind",
        "docker.io/library/docker:24-dind",
        "DOCKER:24-dind",
    ] {
        let (err, req) = denied(
            &h,
            ContainerSpec {
                image: image.into(),
                ..benign()
            },
        )
        .await;
        assert_eq!(err.code(), Code::FailedPrecondition, "{image}");
        assert_eq!(status::violated_rules(&err), ["image.denied"], "{image}");
        let ev = h.audited(|e| e.resource_id == req.environment_id).await;
        assert_eq!(ev.severity, vibebox_proto::audit::Severity::High as i32);
    }
}

#[tokio::test]
async fn scenario_4_missing_limits_get_defaults_and_a_clearance_that_verifies() {
    let h = Harness::start(None).await;
    let req = request(benign());
    let resp = h
        .clearance("gateway")
        .issue_clearance(req.clone())
        .await
        .unwrap()
        .into_inner();
    let eval = resp.evaluation.unwrap();
    assert_eq!(eval.decision, Decision::Allow as i32);
    assert!(eval.violations.is_empty());
    assert_eq!(eval.canonical_image, "docker.io/library/busybox:1.36");
    let hardened = eval.hardened_spec.unwrap();
    assert_eq!(hardened.cpu_limit, Some(2.0));
    assert_eq!(hardened.memory_limit_mb, Some(4096));
    assert_eq!(hardened.pids_limit, Some(1024));
    assert_eq!(hardened.user.as_deref(), Some("1000:1000"));
    assert_eq!(hardened.cap_drop, ["ALL"]);
    assert_eq!(hardened.security_opt, ["no-new-privileges"]);
    assert!(
        hardened
            .mounts
            .iter()
            .any(|m| m.target == "/workspace" && m.source.is_empty())
    );

    // The orchestrator fetches the keys and verifies the clearance.
    let keys = h
        .clearance("orchestrator")
        .get_clearance_keys(GetClearanceKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    let ring = KeyRing::from_proto(&keys);
    let clearance = resp.clearance.unwrap();
    let expected = Expected {
        spec: &hardened,
        environment_id: &req.environment_id,
        team_id: TEAM,
    };
    let body = vibebox_clearance::verify(&clearance, &ring, expected, SystemTime::now()).unwrap();
    assert_eq!(body.user_id, "user-1");
    assert_eq!(body.policy_digest, eval.policy_digest);
    assert!(!body.clearance_id.is_empty());

    // Tampered spec: anything changed after clearance fails verification.
    let mut tampered = hardened.clone();
    tampered.privileged = true;
    let e = Expected {
        spec: &tampered,
        ..expected
    };
    assert_eq!(
        vibebox_clearance::verify(&clearance, &ring, e, SystemTime::now()),
        Err(VerifyError::SpecMismatch)
    );
    let mut tampered = hardened.clone();
    tampered.memory_limit_mb = None;
    let e = Expected {
        spec: &tampered,
        ..expected
    };
    assert_eq!(
        vibebox_clearance::verify(&clearance, &ring, e, SystemTime::now()),
        Err(VerifyError::SpecMismatch)
    );
    // The original (unhardened) spec is not what was cleared either.
    let e = Expected {
        spec: req.spec.as_ref().unwrap(),
        ..expected
    };
    assert_eq!(
        vibebox_clearance::verify(&clearance, &ring, e, SystemTime::now()),
        Err(VerifyError::SpecMismatch)
    );
    // Another environment.
    let other = uuid::Uuid::new_v4().to_string();
    let e = Expected {
        environment_id: &other,
        ..expected
    };
    assert_eq!(
        vibebox_clearance::verify(&clearance, &ring, e, SystemTime::now()),
        Err(VerifyError::EnvironmentMismatch)
    );
    // Expired: a minute later.
    let later = SystemTime::now() + Duration::from_secs(61);
    assert_eq!(
        vibebox_clearance::verify(&clearance, &ring, expected, later),
        Err(VerifyError::Expired)
    );

    let ev = h.audited(|e| e.resource_id == req.environment_id).await;
    assert_eq!(ev.action, "policy.allow");
    assert_eq!(ev.outcome, vibebox_proto::audit::Outcome::Success as i32);
    assert_eq!(ev.actor.unwrap().user_id, "user-1");
}

#[tokio::test]
async fn clearances_are_unique_per_issue() {
    let h = Harness::start(None).await;
    let mut ids = std::collections::HashSet::new();
    let keys = h
        .clearance("gateway")
        .get_clearance_keys(GetClearanceKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let ring = KeyRing::from_proto(&keys);
    for _ in 0..3 {
        let req = request(benign());
        let resp = h
            .clearance("gateway")
            .issue_clearance(req.clone())
            .await
            .unwrap()
            .into_inner();
        let hardened = resp.evaluation.unwrap().hardened_spec.unwrap();
        let e = Expected {
            spec: &hardened,
            environment_id: &req.environment_id,
            team_id: TEAM,
        };
        let body = vibebox_clearance::verify(&resp.clearance.unwrap(), &ring, e, SystemTime::now())
            .unwrap();
        assert!(ids.insert(body.clearance_id));
    }
}

#[tokio::test]
async fn invalid_requests_are_invalid_argument_with_bad_request() {
    let h = Harness::start(None).await;
    let err = h
        .clearance("gateway")
        .issue_clearance(IssueClearanceRequest {
            spec: None,
            environment_id: "nope".into(),
            ..request(benign())
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields: Vec<String> = err
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|f| f.field)
        .collect();
    assert_eq!(fields, ["spec", "environment_id"]);

    let (err, _) = denied(
        &h,
        ContainerSpec {
            image: "not a valid image".into(),
            ..benign()
        },
    )
    .await;
    assert_eq!(err.code(), Code::InvalidArgument);
    let br = err.get_details_bad_request().unwrap();
    assert_eq!(br.field_violations[0].field, "spec.image");
    assert!(
        br.field_violations[0]
            .description
            .starts_with("image.invalid")
    );

    // Mixed malformed and forbidden: a denial listing both.
    let (err, _) = denied(
        &h,
        ContainerSpec {
            image: "not a valid image".into(),
            privileged: true,
            ..benign()
        },
    )
    .await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        status::violated_rules(&err),
        ["image.invalid", "privileged"]
    );
}

#[tokio::test]
async fn viewers_get_no_clearance() {
    let h = Harness::start(None).await;
    let err = h
        .clearance("gateway")
        .issue_clearance(IssueClearanceRequest {
            team_role: VIEWER,
            ..request(benign())
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(status::violated_rules(&err), ["role.insufficient"]);
}

#[tokio::test]
async fn only_the_gateway_issues_and_only_known_services_call() {
    let h = Harness::start(None).await;
    let err = h
        .clearance("orchestrator")
        .issue_clearance(request(benign()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = PolicyServiceClient::new(h.channel("orchestrator"))
        .get_policy(GetPolicyRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = h
        .clearance("tester")
        .issue_clearance(request(benign()))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::PermissionDenied | Code::Unauthenticated),
        "{err:?}"
    );
    let err = h
        .clearance("tester")
        .get_clearance_keys(GetClearanceKeysRequest {})
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::PermissionDenied | Code::Unauthenticated),
        "{err:?}"
    );
}

#[tokio::test]
async fn evaluate_spec_is_a_dry_run_with_every_violation() {
    let h = Harness::start(None).await;
    let spec = ContainerSpec {
        image: "docker:24-dind".into(),
        privileged: true,
        user: Some("0:0".into()),
        pid_mode: "host".into(),
        ..benign()
    };
    let eval = h
        .policy()
        .evaluate_spec(EvaluateSpecRequest {
            spec: Some(spec),
            team_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .evaluation
        .unwrap();
    assert_eq!(eval.decision, Decision::Deny as i32);
    assert!(eval.hardened_spec.is_none());
    let ids: Vec<&str> = eval.violations.iter().map(|v| v.rule_id.as_str()).collect();
    assert_eq!(
        ids,
        ["image.denied", "privileged", "namespace.pid", "user.root"]
    );
    let privileged = &eval.violations[1];
    assert_eq!(privileged.severity, ViolationSeverity::Critical as i32);
    assert_eq!(privileged.cis_id, "5.4");
    assert_eq!(privileged.pss_control, "Privileged Containers");
    let policy = h
        .policy()
        .get_policy(GetPolicyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(eval.policy_digest, policy.policy_digest);
    assert!(policy.document.contains("docker:*"));
    let err = h
        .policy()
        .evaluate_spec(EvaluateSpecRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn team_overlays_apply() {
    let h = Harness::start(Some(
        "version = \"t1\"\n[teams.team-1]\nmax_memory_mb = 1024\n",
    ))
    .await;
    let err = denied(
        &h,
        ContainerSpec {
            memory_limit_mb: Some(2048),
            ..benign()
        },
    )
    .await
    .0;
    assert_eq!(status::violated_rules(&err), ["resources.ceiling"]);
    let resp = h
        .clearance("gateway")
        .issue_clearance(request(benign()))
        .await
        .unwrap()
        .into_inner();
    let eval = resp.evaluation.unwrap();
    assert_eq!(eval.hardened_spec.unwrap().memory_limit_mb, Some(1024));
    assert_eq!(eval.policy_version, "t1");

    // GetPolicy shows only the overlays the gateway says the caller may see.
    let document = |visible: Option<&'static str>| {
        let mut client = h.policy();
        async move {
            let mut request = tonic::Request::new(GetPolicyRequest {});
            if let Some(v) = visible {
                request
                    .metadata_mut()
                    .insert(vibebox_server_kit::meta::VISIBLE_TEAMS, v.parse().unwrap());
            }
            client.get_policy(request).await.unwrap().into_inner()
        }
    };
    let all = document(Some("*")).await;
    assert!(all.document.contains("team-1"), "{}", all.document);
    let own = document(Some("team-0,team-1")).await;
    assert!(own.document.contains("team-1"));
    for hidden in [None, Some(""), Some("team-2")] {
        let got = document(hidden).await;
        assert!(
            !got.document.contains("team-1"),
            "{hidden:?}: {}",
            got.document
        );
        assert!(got.document.contains("[images]"));
        // The digest is the whole document's, whoever asks.
        assert_eq!(got.policy_digest, all.policy_digest);
    }
}

#[tokio::test]
async fn sighup_reloads_and_keeps_the_old_policy_when_the_new_one_is_invalid() {
    let h = Harness::start(Some("version = \"v1\"\n")).await;
    let get = || async {
        h.policy()
            .get_policy(GetPolicyRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    let v1 = get().await;
    assert_eq!(v1.policy_version, "v1");
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };

    // An invalid document (a loosening overlay) is refused: v1 stays, audited as a failure.
    std::fs::write(
        &h.policy_file,
        "version = \"bad\"\n[teams.x]\nmax_cpus = 1000.0\n",
    )
    .unwrap();
    hup();
    h.audited(|e| {
        e.action == "policy.reload" && e.outcome == vibebox_proto::audit::Outcome::Failure as i32
    })
    .await;
    assert_eq!(get().await.policy_digest, v1.policy_digest);

    // A valid one takes effect.
    std::fs::write(
        &h.policy_file,
        "version = \"v2\"\n[images]\ndeny = [\"busybox:*\"]\n",
    )
    .unwrap();
    hup();
    h.audited(|e| {
        e.action == "policy.reload" && e.outcome == vibebox_proto::audit::Outcome::Success as i32
    })
    .await;
    let v2 = get().await;
    assert_eq!(v2.policy_version, "v2");
    assert_ne!(v2.policy_digest, v1.policy_digest);
    let err = denied(&h, benign()).await.0;
    assert_eq!(status::violated_rules(&err), ["image.denied"]);
}

/// Starts a policy service on `key_dir` (its own data dir, audit to nowhere:
/// records stay in the local outbox), returning its URL.
async fn start_with_keys(
    pki: &TestPki,
    key_dir: &std::path::Path,
    rotate: bool,
    retire: Vec<String>,
    shutdown: &CancellationToken,
) -> String {
    let config = Config {
        server: pki.server_args("policy"),
        policy_file: None,
        clearance_key_dir: Some(key_dir.to_owned()),
        rotate_clearance_key: rotate,
        retire_clearance_keys: retire,
        clearance_ttl_secs: 60,
        audit: vibebox_audit_client::AuditArgs {
            url: "https://127.0.0.1:9".into(),
        },
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(vibebox_policy::run_with_listener(
        config,
        listener,
        shutdown.clone(),
    ));
    url
}

async fn keys_at(pki: &TestPki, url: &str) -> Vec<vibebox_proto::clearance::ClearanceKey> {
    let ch = vibebox_server_kit::connect(url, &pki.material("orchestrator")).unwrap();
    for _ in 0..200 {
        if let Ok(r) = ClearanceServiceClient::new(ch.clone())
            .get_clearance_keys(GetClearanceKeysRequest {})
            .await
        {
            return r.into_inner().keys;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("policy service did not come up");
}

#[tokio::test]
async fn key_rotation_keeps_old_clearances_valid_until_retired() {
    let pki = TestPki::new();
    let key_dir = pki.path().join("keys");
    let shutdown = CancellationToken::new();

    // First run: one generated key; issue a clearance with it.
    let url = start_with_keys(&pki, &key_dir, false, Vec::new(), &shutdown).await;
    let first = keys_at(&pki, &url).await;
    assert_eq!(first.len(), 1);
    let ch = vibebox_server_kit::connect(&url, &pki.material("gateway")).unwrap();
    let req = request(benign());
    let resp = ClearanceServiceClient::new(ch)
        .issue_clearance(req.clone())
        .await
        .unwrap()
        .into_inner();
    let old = resp.clearance.unwrap();
    assert_eq!(old.key_id, first[0].key_id);
    let hardened = resp.evaluation.unwrap().hardened_spec.unwrap();
    let expected = Expected {
        spec: &hardened,
        environment_id: &req.environment_id,
        team_id: TEAM,
    };

    // Restart with rotation: two keys published, the old clearance still verifies.
    let url = start_with_keys(&pki, &key_dir, true, Vec::new(), &shutdown).await;
    let rotated = keys_at(&pki, &url).await;
    assert_eq!(rotated.len(), 2);
    let ring = KeyRing::from_proto(&rotated);
    assert!(vibebox_clearance::verify(&old, &ring, expected, SystemTime::now()).is_ok());
    let ch = vibebox_server_kit::connect(&url, &pki.material("gateway")).unwrap();
    let new = ClearanceServiceClient::new(ch)
        .issue_clearance(request(benign()))
        .await
        .unwrap()
        .into_inner();
    let new_key = new.clearance.unwrap().key_id;
    assert_ne!(new_key, old.key_id);

    // Restart retiring the first key: it is no longer published nor accepted.
    let url = start_with_keys(&pki, &key_dir, false, vec![old.key_id.clone()], &shutdown).await;
    let retired = keys_at(&pki, &url).await;
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].key_id, new_key);
    let ring = KeyRing::from_proto(&retired);
    assert_eq!(
        vibebox_clearance::verify(&old, &ring, expected, SystemTime::now()),
        Err(VerifyError::UnknownKey(old.key_id.clone()))
    );
    shutdown.cancel();
}

const EGRESS_POLICY: &str = r#"
version = "egress-1"
[lifetime]
idle_timeout = "1h"
lifetime = "1d"
max_lifetime = "7d"
[files]
copy_limit_mb = 512
[teams.team-1.egress]
mode = "allow-list"
allow = [
    { host = "*.github.com", ports = [443] },
    { cidr = "203.0.113.0/24", ports = [80, 443] },
]
[teams.team-1.lifetime]
idle_timeout = "30m"
"#;

fn egress_rule(host: &str, cidr: &str, ports: &[u32]) -> EgressRule {
    EgressRule {
        host: host.into(),
        cidr: cidr.into(),
        ports: ports.to_vec(),
    }
}

fn asking(mode: EgressMode, allow: Vec<EgressRule>) -> ContainerSpec {
    ContainerSpec {
        egress: Some(Egress {
            mode: mode as i32,
            allow,
        }),
        ..benign()
    }
}

#[tokio::test]
async fn egress_and_lifetimes_are_decided_by_policy_shown_by_the_dry_run_and_cleared() {
    let h = Harness::start(Some(EGRESS_POLICY)).await;
    let dry_run = |team: &'static str, spec: ContainerSpec| {
        let mut client = h.policy();
        async move {
            client
                .evaluate_spec(EvaluateSpecRequest {
                    spec: Some(spec),
                    team_id: team.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .evaluation
                .unwrap()
        }
    };

    // The team with an overlay gets its allow list; its idle timeout is the
    // overlay's; the rest comes from the base.
    let eval = dry_run(TEAM, benign()).await;
    assert_eq!(eval.decision, Decision::Allow as i32);
    let hardened = eval.hardened_spec.unwrap();
    assert_eq!(
        hardened.egress,
        Some(Egress {
            mode: EgressMode::AllowList as i32,
            allow: vec![
                egress_rule("*.github.com", "", &[443]),
                egress_rule("", "203.0.113.0/24", &[80, 443]),
            ],
        })
    );
    assert_eq!(
        hardened.lifetime,
        Some(Lifetime {
            idle_timeout_seconds: Some(1800),
            idle_cpu_percent: Some(5.0),
            lifetime_seconds: Some(86_400),
            max_lifetime_seconds: Some(604_800),
        })
    );
    assert_eq!(hardened.copy_limit_mb, Some(512));

    // Another team (no overlay) gets the base: no egress at all, and may
    // not ask for what team-1's overlay opens.
    let other = dry_run("team-2", benign()).await.hardened_spec.unwrap();
    assert_eq!(other.egress.unwrap().mode, EgressMode::None as i32);
    assert_eq!(other.lifetime.unwrap().idle_timeout_seconds, Some(3600));
    let github = asking(
        EgressMode::AllowList,
        vec![egress_rule("api.github.com", "", &[443])],
    );
    let eval = dry_run("team-2", github.clone()).await;
    assert_eq!(eval.decision, Decision::Deny as i32);
    assert_eq!(
        eval.violations
            .iter()
            .map(|v| (v.rule_id.as_str(), v.field.as_str()))
            .collect::<Vec<_>>(),
        [("egress.not_allowed", "spec.egress.mode")]
    );
    assert_eq!(eval.violations[0].severity, ViolationSeverity::High as i32);

    // A clearance for a narrowed request binds the narrowed decision.
    let req = request(ContainerSpec {
        lifetime: Some(Lifetime {
            lifetime_seconds: Some(3 * 86_400),
            ..Default::default()
        }),
        ..github.clone()
    });
    let resp = h
        .clearance("gateway")
        .issue_clearance(req.clone())
        .await
        .unwrap()
        .into_inner();
    let hardened = resp.evaluation.unwrap().hardened_spec.unwrap();
    assert_eq!(
        hardened.egress.as_ref().unwrap().allow,
        [egress_rule("api.github.com", "", &[443])]
    );
    assert_eq!(
        hardened.lifetime.as_ref().unwrap().lifetime_seconds,
        Some(259_200)
    );
    let keys = h
        .clearance("orchestrator")
        .get_clearance_keys(GetClearanceKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    let ring = KeyRing::from_proto(&keys);
    let clearance = resp.clearance.unwrap();
    let expected = Expected {
        spec: &hardened,
        environment_id: &req.environment_id,
        team_id: TEAM,
    };
    assert!(vibebox_clearance::verify(&clearance, &ring, expected, SystemTime::now()).is_ok());
    // Widening the egress or the lifetime after the fact breaks it.
    let mut wider = hardened.clone();
    wider.egress.as_mut().unwrap().mode = EgressMode::Internet as i32;
    let mut longer = hardened.clone();
    longer.lifetime.as_mut().unwrap().max_lifetime_seconds = Some(0);
    let mut bigger = hardened.clone();
    bigger.copy_limit_mb = Some(1 << 20);
    for tampered in [wider, longer, bigger] {
        let e = Expected {
            spec: &tampered,
            ..expected
        };
        assert_eq!(
            vibebox_clearance::verify(&clearance, &ring, e, SystemTime::now()),
            Err(VerifyError::SpecMismatch)
        );
    }

    // Refusals carry the rule and the field.
    let (err, _) = denied(
        &h,
        asking(
            EgressMode::AllowList,
            vec![
                egress_rule("api.github.com", "", &[443]),
                egress_rule("", "169.254.169.254", &[80]),
            ],
        ),
    )
    .await;
    assert_eq!(err.code(), Code::FailedPrecondition);
    let pf = err.get_details_precondition_failure().unwrap();
    assert_eq!(pf.violations[0].r#type, "egress.forbidden_destination");
    assert_eq!(pf.violations[0].subject, "spec.egress.allow[1].cidr");
    let (err, _) = denied(
        &h,
        asking(
            EgressMode::AllowList,
            vec![egress_rule("", "203.0.113.9/24", &[443])],
        ),
    )
    .await;
    assert_eq!(err.code(), Code::InvalidArgument);
    let br = err.get_details_bad_request().unwrap();
    assert_eq!(br.field_violations[0].field, "spec.egress.allow[0].cidr");
    assert!(
        br.field_violations[0]
            .description
            .contains("203.0.113.0/24"),
        "{:?}",
        br.field_violations[0]
    );
    let (err, _) = denied(
        &h,
        ContainerSpec {
            lifetime: Some(Lifetime {
                idle_timeout_seconds: Some(3600),
                ..Default::default()
            }),
            copy_limit_mb: Some(513),
            ..benign()
        },
    )
    .await;
    assert_eq!(
        status::violated_rules(&err),
        ["lifetime.too_long", "files.copy_limit"]
    );
    let ev = h
        .audited(|e| e.action == "policy.deny" && rule_ids(e).contains(&"files.copy_limit".into()))
        .await;
    assert_eq!(rule_ids(&ev), ["lifetime.too_long", "files.copy_limit"]);

    // GetPolicy shows the new sections; the team's egress only to its team.
    let document = |visible: &'static str| {
        let mut client = h.policy();
        async move {
            let mut request = tonic::Request::new(GetPolicyRequest {});
            request.metadata_mut().insert(
                vibebox_server_kit::meta::VISIBLE_TEAMS,
                visible.parse().unwrap(),
            );
            client
                .get_policy(request)
                .await
                .unwrap()
                .into_inner()
                .document
        }
    };
    let own = document(TEAM).await;
    for part in [
        "[egress]\nmode = \"none\"",
        "[lifetime]\nidle_timeout = \"1h\"",
        "max_lifetime = \"7d\"",
        "[files]\ncopy_limit_mb = 512",
        "[teams.team-1.egress]\nmode = \"allow-list\"",
        "*.github.com",
    ] {
        assert!(own.contains(part), "{part:?} not in\n{own}");
    }
    let stranger = document("team-2").await;
    assert!(stranger.contains("[egress]\nmode = \"none\""));
    assert!(!stranger.contains("github"), "{stranger}");
}
