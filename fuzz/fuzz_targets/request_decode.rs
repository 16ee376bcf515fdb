//! Request decoding: a `CreateEnvironmentRequest` as it arrives on the wire,
//! decoded with prost and judged by the policy engine for its team. Never
//! panics; a decoded spec re-encodes to a fixed point with the same digest;
//! every outcome satisfies the hardened-spec invariants (`check_outcome`);
//! the `Evaluation` reply round-trips; and a clearance signed for the
//! hardened spec verifies against the spec the orchestrator receives after
//! transport, and against nothing else.
#![no_main]

use std::sync::OnceLock;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use vibebox_clearance::{ClearanceSigner, Expected, Grant, KeyRing, VerifyError, spec_digest};
use vibebox_fuzz::{check_outcome, policy};
use vibebox_policy::evaluate;
use vibebox_policy::service::to_evaluation;
use vibebox_proto::environment::{ContainerSpec, CreateEnvironmentRequest};
use vibebox_proto::policy::{Decision, Evaluation};

fn signer() -> &'static (ClearanceSigner, KeyRing) {
    static SIGNER: OnceLock<(ClearanceSigner, KeyRing)> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let signer = ClearanceSigner::generate();
        let ring = KeyRing::from_proto(&[signer.public_key()]);
        (signer, ring)
    })
}

const ENVIRONMENT: &str = "0193a1b2-0000-7000-8000-000000000001";

fuzz_target!(|data: &[u8]| {
    let Ok(request) = CreateEnvironmentRequest::decode(data) else {
        return;
    };
    let encoded = request.encode_to_vec();
    let again = CreateEnvironmentRequest::decode(encoded.as_slice()).expect("re-encoding decodes");
    assert_eq!(
        again.encode_to_vec(),
        encoded,
        "request encoding is a fixed point"
    );
    let Some(spec) = &request.spec else {
        return;
    };
    let spec_bytes = spec.encode_to_vec();
    let transported = ContainerSpec::decode(spec_bytes.as_slice()).expect("spec decodes");
    assert_eq!(transported.encode_to_vec(), spec_bytes);
    assert_eq!(spec_digest(&transported), spec_digest(spec));

    let policy = policy();
    let team = request.team_id.as_str();
    let outcome = evaluate(policy.rules_for(team), spec);
    check_outcome(policy, team, spec, &outcome);
    let again = evaluate(policy.rules_for(team), &transported);
    assert_eq!(
        again.violations, outcome.violations,
        "evaluation is deterministic"
    );

    let evaluation = to_evaluation(policy, &outcome);
    let reply = evaluation.encode_to_vec();
    let decoded = Evaluation::decode(reply.as_slice()).expect("reply decodes");
    assert_eq!(decoded.encode_to_vec(), reply);
    assert_eq!(
        decoded.decision == Decision::Allow as i32,
        outcome.allowed()
    );
    assert_eq!(decoded.violations.len(), outcome.violations.len());
    assert_eq!(decoded.policy_digest, policy.digest());

    let Some(hardened) = &outcome.hardened else {
        return;
    };
    let team = if team.is_empty() { "team-fuzz" } else { team };
    let (signer, ring) = signer();
    let now = SystemTime::now();
    let body = vibebox_clearance::new_body(
        hardened,
        Grant {
            environment_id: ENVIRONMENT.into(),
            team_id: team.into(),
            user_id: "u-1".into(),
            policy_digest: policy.digest().into(),
            policy_version: policy.version().into(),
        },
        now,
        vibebox_clearance::DEFAULT_TTL,
    );
    let clearance = signer.sign(&body);
    let applied = decoded
        .hardened_spec
        .as_ref()
        .expect("allowed reply carries the spec");
    let expected = |spec| Expected {
        spec,
        environment_id: ENVIRONMENT,
        team_id: team,
    };
    vibebox_clearance::verify(&clearance, ring, expected(applied), now)
        .expect("the clearance verifies for the transported hardened spec");
    if spec_digest(spec) != spec_digest(hardened) {
        assert_eq!(
            vibebox_clearance::verify(&clearance, ring, expected(spec), now),
            Err(VerifyError::SpecMismatch),
            "a clearance for the hardened spec accepted the raw spec"
        );
    }
});
