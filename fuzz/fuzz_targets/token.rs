//! Token strings (the bearer biscuit every request carries, and the token a
//! user attenuates offline): parsing, verifying, authorizing and attenuating
//! never panic; only tokens minted with the seed key verify, always with the
//! seed claims (no block can change the user); and attenuation only narrows:
//! whatever an attenuated token may do, the original may do, and a team,
//! environment or operation restriction refuses requests outside it.
//!
//! The first byte picks the mode: 0 the rest is token text; 1 the rest is a
//! raw biscuit (base64url-encoded here, so mutations hit the protobuf);
//! 2 the rest is a restriction (`team\nenvironment\nop,op\nexpiry-offset`)
//! applied to a freshly minted token.
#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use vibebox_fuzz::{TOKEN_ID, TOKEN_KEY_ID, TOKEN_USER, mint_token, token_ring};
use vibebox_token::{AuthzRequest, Restriction, TokenError, VerifiedToken, attenuate};

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_900_000_000, 0).unwrap()
}

fn requests() -> Vec<AuthzRequest> {
    let mut out = Vec::new();
    for op in ["environment.create", "environment.list"] {
        for team in [None, Some("team-a"), Some("team-b")] {
            for env in [None, Some("env-1")] {
                let mut r = AuthzRequest::new(op).at(now());
                if let Some(t) = team {
                    r = r.team(t);
                }
                if let Some(e) = env {
                    r = r.environment(e);
                }
                out.push(r);
            }
        }
    }
    out
}

fn seed_token() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(mint_token)
}

fn verify(token: &str) -> Option<VerifiedToken> {
    let verified = token_ring().verify(token).ok()?;
    assert_eq!(verified.user_id(), TOKEN_USER, "a forged user verified");
    assert_eq!(verified.token_id(), TOKEN_ID);
    assert_eq!(verified.key_id(), TOKEN_KEY_ID);
    Some(verified)
}

/// `narrow` may do only what `wide` may do.
fn assert_narrower(narrow: &VerifiedToken, wide: &VerifiedToken) {
    for r in requests() {
        if narrow.authorize(&r).is_ok() {
            assert!(wide.authorize(&r).is_ok(), "attenuation widened {r:?}");
        }
    }
}

fn check_text(token: &str) {
    let original = verify(token);
    if let Some(v) = &original {
        for r in requests() {
            let _ = v.authorize(&r);
        }
    }
    let restriction = Restriction::default().team("team-a");
    if let Ok(narrow) = attenuate(token, &restriction)
        && let Some(original) = &original
    {
        let narrow = verify(&narrow).expect("an attenuated valid token verifies");
        assert_eq!(
            narrow.attenuation_blocks(),
            original.attenuation_blocks() + 1
        );
        assert_narrower(&narrow, original);
        let other = AuthzRequest::new("environment.list")
            .team("team-b")
            .at(now());
        assert!(
            narrow.authorize(&other).is_err(),
            "team restriction ignored"
        );
    }
}

fn check_restriction(text: &str) {
    let mut lines = text.split('\n');
    let mut restriction = Restriction::default();
    if let Some(team) = lines.next().filter(|t| !t.is_empty()) {
        restriction = restriction.team(team);
    }
    if let Some(env) = lines.next().filter(|e| !e.is_empty()) {
        restriction = restriction.environment(env);
    }
    if let Some(ops) = lines.next().filter(|o| !o.is_empty()) {
        restriction = restriction.operations(ops.split(',').take(8));
    }
    if let Some(offset) = lines.next().and_then(|o| o.trim().parse::<i64>().ok()) {
        let at = now()
            .timestamp()
            .saturating_add(offset.clamp(-1 << 40, 1 << 40));
        if let Some(at) = DateTime::from_timestamp(at, 0) {
            restriction = restriction.expires_at(at);
        }
    }
    let narrow = match attenuate(seed_token(), &restriction) {
        Ok(n) => n,
        Err(TokenError::Invalid { .. }) => return,
        Err(e) => panic!("attenuating a valid token failed: {e}"),
    };
    let wide = verify(seed_token()).expect("seed verifies");
    let narrow = verify(&narrow).expect("attenuated token verifies");
    assert_eq!(narrow.attenuation_blocks(), 1);
    assert_narrower(&narrow, &wide);
    for r in requests() {
        if narrow.authorize(&r).is_ok() {
            if let Some(team) = &restriction.team {
                assert_eq!(r.team.as_ref(), Some(team), "team restriction ignored");
            }
            if let Some(env) = &restriction.environment {
                assert_eq!(
                    r.environment.as_ref(),
                    Some(env),
                    "environment restriction ignored"
                );
            }
            if !restriction.operations.is_empty() {
                assert!(
                    restriction.operations.contains(&r.operation),
                    "operations ignored"
                );
            }
            if let Some(at) = restriction.expires_at {
                assert!(r.now < at, "expiry ignored");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                check_text(text);
            }
        }
        1 => check_text(&base64::engine::general_purpose::URL_SAFE.encode(rest)),
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                check_restriction(text);
            }
        }
    }
});
