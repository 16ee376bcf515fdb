//! Signing, verification, tampering, expiry and key rotation.

use std::time::{Duration, SystemTime};

use prost::Message;
use vibebox_proto::clearance::{Clearance, ClearanceBody};
use vibebox_proto::environment::ContainerSpec;

use super::*;

const ENV: &str = "3f1c1f9e-0d7b-4d3e-9a55-2f5d0f0c1a01";
const TEAM: &str = "team-a";

fn spec() -> ContainerSpec {
    ContainerSpec {
        image: "docker.io/library/python:3.12".into(),
        user: Some("1000:1000".into()),
        cap_drop: vec!["ALL".into()],
        security_opt: vec!["no-new-privileges".into()],
        cpu_limit: Some(2.0),
        memory_limit_mb: Some(4096),
        pids_limit: Some(512),
        env: [("B".to_string(), "2".to_string()), ("A".into(), "1".into())].into(),
        ..Default::default()
    }
}

fn grant() -> Grant {
    Grant {
        environment_id: ENV.into(),
        team_id: TEAM.into(),
        user_id: "user-1".into(),
        policy_digest: "abc".into(),
        policy_version: "1".into(),
    }
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn issue(signer: &ClearanceSigner, spec: &ContainerSpec) -> Clearance {
    signer.sign(&new_body(spec, grant(), now(), DEFAULT_TTL))
}

fn ring(signer: &ClearanceSigner) -> KeyRing {
    let mut r = KeyRing::new();
    r.insert(signer.verifying_key());
    r
}

fn expected(spec: &ContainerSpec) -> Expected<'_> {
    Expected {
        spec,
        environment_id: ENV,
        team_id: TEAM,
    }
}

#[test]
fn digest_is_deterministic_and_sensitive() {
    let a = spec();
    let mut b = spec();
    assert_eq!(spec_digest(&a), spec_digest(&b));
    // Map insertion order does not matter (BTreeMap).
    b.env = [("A".to_string(), "1".to_string()), ("B".into(), "2".into())].into();
    assert_eq!(spec_digest(&a), spec_digest(&b));
    b.memory_limit_mb = Some(4097);
    assert_ne!(spec_digest(&a), spec_digest(&b));
    assert_eq!(spec_digest_hex(&a).len(), 64);
}

#[test]
fn valid_clearance_verifies_and_returns_body() {
    let signer = ClearanceSigner::generate();
    let s = spec();
    let c = issue(&signer, &s);
    let body = verify(
        &c,
        &ring(&signer),
        expected(&s),
        now() + Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(body.environment_id, ENV);
    assert_eq!(body.team_id, TEAM);
    assert_eq!(body.user_id, "user-1");
    assert!(uuid::Uuid::parse_str(&body.clearance_id).is_ok());
    assert_eq!(c.key_id, signer.key_id());
}

#[test]
fn clearance_ids_are_unique() {
    let a = new_body(&spec(), grant(), now(), DEFAULT_TTL);
    let b = new_body(&spec(), grant(), now(), DEFAULT_TTL);
    assert_ne!(a.clearance_id, b.clearance_id);
}

#[test]
fn tampered_spec_fails() {
    let signer = ClearanceSigner::generate();
    let s = spec();
    let c = issue(&signer, &s);
    let mut evil = spec();
    evil.privileged = true;
    assert_eq!(
        verify(&c, &ring(&signer), expected(&evil), now()),
        Err(VerifyError::SpecMismatch)
    );
    let mut evil = spec();
    evil.image = "docker.io/library/docker:24-dind".into();
    assert_eq!(
        verify(&c, &ring(&signer), expected(&evil), now()),
        Err(VerifyError::SpecMismatch)
    );
}

#[test]
fn tampered_body_or_signature_fails() {
    let signer = ClearanceSigner::generate();
    let s = spec();
    let c = issue(&signer, &s);
    let r = ring(&signer);

    // Re-encode the body with a different team: the signature no longer matches.
    let mut body = ClearanceBody::decode(c.body.as_slice()).unwrap();
    body.team_id = "team-b".into();
    let forged = Clearance {
        body: body.encode_to_vec(),
        ..c.clone()
    };
    let exp = Expected {
        team_id: "team-b",
        ..expected(&s)
    };
    assert_eq!(
        verify(&forged, &r, exp, now()),
        Err(VerifyError::BadSignature)
    );

    // Flip one byte of the body.
    let mut flipped = c.clone();
    flipped.body[3] ^= 1;
    assert_eq!(
        verify(&flipped, &r, expected(&s), now()),
        Err(VerifyError::BadSignature)
    );

    // Flip one byte of the signature, truncate it.
    let mut bad = c.clone();
    bad.signature[0] ^= 1;
    assert_eq!(
        verify(&bad, &r, expected(&s), now()),
        Err(VerifyError::BadSignature)
    );
    let mut short = c.clone();
    short.signature.truncate(10);
    assert_eq!(
        verify(&short, &r, expected(&s), now()),
        Err(VerifyError::BadSignature)
    );

    // Signed by another key that claims the real key id.
    let other = ClearanceSigner::generate();
    let mut impostor = other.sign(&ClearanceBody::decode(c.body.as_slice()).unwrap());
    impostor.key_id = signer.key_id().into();
    assert_eq!(
        verify(&impostor, &r, expected(&s), now()),
        Err(VerifyError::BadSignature)
    );
}

#[test]
fn unknown_and_retired_keys_fail() {
    let signer = ClearanceSigner::generate();
    let other = ClearanceSigner::generate();
    let s = spec();
    let c = issue(&other, &s);
    assert_eq!(
        verify(&c, &ring(&signer), expected(&s), now()),
        Err(VerifyError::UnknownKey(other.key_id().into()))
    );
    let mut r = ring(&signer);
    r.insert(other.verifying_key());
    assert!(verify(&c, &r, expected(&s), now()).is_ok());
    r.retire(other.key_id());
    assert_eq!(
        verify(&c, &r, expected(&s), now()),
        Err(VerifyError::RetiredKey(other.key_id().into()))
    );
}

#[test]
fn wrong_environment_or_team_fails() {
    let signer = ClearanceSigner::generate();
    let s = spec();
    let c = issue(&signer, &s);
    let r = ring(&signer);
    let e = Expected {
        environment_id: "another",
        ..expected(&s)
    };
    assert_eq!(
        verify(&c, &r, e, now()),
        Err(VerifyError::EnvironmentMismatch)
    );
    let e = Expected {
        team_id: "team-b",
        ..expected(&s)
    };
    assert_eq!(verify(&c, &r, e, now()), Err(VerifyError::TeamMismatch));
}

#[test]
fn expiry_and_future_issue_fail() {
    let signer = ClearanceSigner::generate();
    let s = spec();
    let c = issue(&signer, &s);
    let r = ring(&signer);
    assert!(
        verify(
            &c,
            &r,
            expected(&s),
            now() + DEFAULT_TTL - Duration::from_millis(1)
        )
        .is_ok()
    );
    assert_eq!(
        verify(&c, &r, expected(&s), now() + DEFAULT_TTL),
        Err(VerifyError::Expired)
    );
    assert_eq!(
        verify(&c, &r, expected(&s), now() + Duration::from_secs(3600)),
        Err(VerifyError::Expired)
    );
    assert_eq!(
        verify(&c, &r, expected(&s), now() - Duration::from_secs(120)),
        Err(VerifyError::NotYetValid)
    );
}

#[test]
fn key_ring_proto_round_trip_rejects_mismatched_ids() {
    let a = ClearanceSigner::generate();
    let b = ClearanceSigner::generate();
    let mut bad = b.public_key();
    bad.key_id = a.key_id().into();
    let ring = KeyRing::from_proto(&[a.public_key(), bad]);
    assert!(ring.contains(a.key_id()));
    assert!(!ring.contains(b.key_id()));
    assert_eq!(ring.len(), 1);
    assert_eq!(ring.to_proto(), vec![a.public_key()]);
}

#[test]
fn key_store_generates_persists_rotates_and_retires() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys/clearance");
    let first = KeyStore::open_or_init(&path).unwrap();
    let first_id = first.active().key_id().to_owned();
    let s = spec();
    let old_clearance = issue(first.active(), &s);
    drop(first);

    // Reopening loads the same key instead of generating a new one.
    let mut store = KeyStore::open_or_init(&path).unwrap();
    assert_eq!(store.active().key_id(), first_id);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let pem = path.join(format!("{}.pem", first_id.trim_start_matches("ed25519:")));
        let mode = std::fs::metadata(pem).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "key file must be private");
    }

    // Rotation: new clearances use the new key; old ones still verify.
    let second_id = store.rotate().unwrap();
    assert_ne!(second_id, first_id);
    let new_clearance = issue(store.active(), &s);
    assert_eq!(new_clearance.key_id, second_id);
    let ring = store.key_ring();
    assert!(verify(&old_clearance, &ring, expected(&s), now()).is_ok());
    assert!(verify(&new_clearance, &ring, expected(&s), now()).is_ok());

    // Retiring the active key is refused; retiring the old one sticks across reopen.
    assert!(matches!(
        store.retire(&second_id),
        Err(StoreError::RetireActive(_))
    ));
    store.retire(&first_id).unwrap();
    drop(store);
    let store = KeyStore::open_or_init(&path).unwrap();
    assert_eq!(store.active().key_id(), second_id);
    let ring = store.key_ring();
    assert_eq!(
        verify(&old_clearance, &ring, expected(&s), now()),
        Err(VerifyError::RetiredKey(first_id.clone()))
    );
    assert!(verify(&new_clearance, &ring, expected(&s), now()).is_ok());
    assert_eq!(ring.to_proto().len(), 1);
}

#[test]
fn corrupt_key_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk.pem"), "not a key").unwrap();
    assert!(matches!(
        KeyStore::open_or_init(dir.path()),
        Err(StoreError::BadKey(_))
    ));
}
