//! The attack suite: what attackers actually try against a container
//! platform, against the real `vibebox up` and the real Docker Engine.
//!
//! - [`policy`]: every spelling of a forbidden spec (images, socket and host
//!   paths, root users, capabilities, namespaces, confinement options, forged
//!   labels, unlimited resources, oversized and malformed requests) is refused
//!   with a rule id, creates nothing, and the policy's refusals are audited
//!   with the severity the policy promises (critical for the Docker socket and
//!   privileged mode, high otherwise);
//! - [`trust`]: the orchestrator, policy, identity and audit called directly
//!   (no certificate, a foreign CA, the wrong service, the gateway's own
//!   certificate without / with a bad clearance), internal RPCs through the
//!   gateway, forged trust metadata, bad tokens, and one team reaching for
//!   another team's environment;
//! - the hostile tenant (issue 16), with nothing but a developer's or a
//!   viewer's own token: [`tenant_tokens`] (a token that would freeze the
//!   gateway, minting a wider token, a retired token key), [`tenant_streams`]
//!   (reading secrets, starving others of streams, login spraying, streams
//!   outliving the right to them), [`tenant_keys_audit`] (a retired clearance
//!   key, an audit tail cut from the database) and [`tenant_policy`] (the dry
//!   run against the create on every attack spec, swap, other teams'
//!   overlays, binds escaping their prefix through a symlink, chosen uids);
//! - [`egress`] (issue 17): a process inside an environment reaching for
//!   what its egress policy forbids (private ranges, loopback and metadata
//!   through rebinding names, the Docker host, another environment) through
//!   the gate's proxy and around it, against a stand-in internet built by
//!   the test;
//! - every environment the suite creates is inspected: from Docker, and from
//!   inside through the platform's Exec and `docker exec`.
//!
//! Counts go to the suite report (`tests/run.sh` prints them). A known gap
//! the suite can demonstrate but that belongs to another component is
//! counted as tried and not refused, with a `HOLE ...` note, rather than
//! failing the run.

mod egress;
mod policy;
mod tenant_keys_audit;
mod tenant_policy;
mod tenant_streams;
mod tenant_tokens;
mod trust;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use prost::Message;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use vibebox_proto::audit::Severity;
use vibebox_proto::audit_ingest::AppendEventsRequest;
use vibebox_proto::audit_ingest::audit_ingest_service_client::AuditIngestServiceClient;
use vibebox_proto::authz::authorization_service_client::AuthorizationServiceClient;
use vibebox_proto::authz::{AuthorizeRequest, GetTokenKeysRequest, ListCallerScopesRequest};
use vibebox_proto::clearance::clearance_service_client::ClearanceServiceClient;
use vibebox_proto::clearance::{
    Clearance, ClearanceBody, GetClearanceKeysRequest, IssueClearanceRequest,
};
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, DeleteEnvironmentRequest, Device, EnvironmentState,
    ExecRequest, ExecStart, GetEnvironmentRequest, ListEnvironmentsRequest, Mount, MountType,
    PortMapping, RestartEnvironmentRequest, StartEnvironmentRequest, StopEnvironmentRequest,
    StreamLogsRequest, StreamStatsRequest, exec_request,
};
use vibebox_proto::identity::{
    AddTeamMemberRequest, CreateApiTokenRequest, CreateUserRequest, LoginRequest, PlatformRole,
    RevokeTokenRequest, SetUserDisabledRequest, TeamRole, WhoAmIRequest,
};
use vibebox_proto::runtime;
use vibebox_proto::runtime::runtime_service_client::RuntimeServiceClient;
use vibebox_tests::attack::{
    Expected, Refusal, Services, assert_hardened, events_for, foreign, labelled_objects, material,
    mtls, patiently, plaintext, tls_without_client_cert, with_id,
};
use vibebox_tests::report::SuiteReport;
use vibebox_tests::{Platform, Settle, dev_image};

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
// ---------------------------------------------------------------------------
// Shared set-up.

async fn team(p: &Platform, admin: &str, name: &str) -> String {
    p.team(admin, name).await
}

/// A user with `role` in `team`: (user id, token).
async fn member(
    p: &Platform,
    admin: &str,
    name: &str,
    team: &str,
    role: TeamRole,
) -> (String, String) {
    p.member(admin, name, team, role).await
}

fn spec(image: &str) -> ContainerSpec {
    ContainerSpec {
        image: image.into(),
        ..Default::default()
    }
}

/// Creates an environment through the gateway and waits until it has
/// settled (create answers CREATING); it must come up running.
async fn create_ok(
    p: &Platform,
    token: &str,
    team: &str,
    name: &str,
    spec: ContainerSpec,
) -> String {
    let created = patiently(|| {
        let mut client = p.environments(token);
        let request = CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: format!("ok-{name}"),
            team_id: team.into(),
            name: name.into(),
            spec: Some(spec.clone()),
        };
        async move { client.create_settled(request).await }
    })
    .await
    .unwrap_or_else(|s| panic!("creating {name}: {s:?}"));
    assert_eq!(created.state(), EnvironmentState::Running, "{created:?}");
    created.id
}

/// The objects an environment owns in Docker.
fn objects_of(env: &str) -> Vec<String> {
    vec![
        format!("container:vibebox-{env}"),
        format!("network:vibebox-{env}"),
        format!("volume:vibebox-ws-{env}"),
    ]
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}
