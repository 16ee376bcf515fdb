//! User strings (`spec.user`: `uid`, `uid:gid`, `name`, `name:group`):
//! never panics; uid 0 or group 0 in any spelling (`0`, `000`, `root`,
//! `ROOT`) is denied; names are denied unless the policy allows them; an
//! allowed user hardens to a canonical `uid:gid` that re-evaluates to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vibebox_fuzz::{check_outcome, names_policy, policy};
use vibebox_policy::{Rule, evaluate};
use vibebox_proto::environment::ContainerSpec;

fn numeric(s: &str) -> Option<u32> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(user) = std::str::from_utf8(data) else {
        return;
    };
    let spec = ContainerSpec {
        image: "python:3.12".into(),
        user: Some(user.to_owned()),
        ..Default::default()
    };
    let (uid, gid) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    for (policy, names) in [(policy(), false), (names_policy(), true)] {
        let outcome = evaluate(policy.rules_for(""), &spec);
        check_outcome(policy, "", &spec, &outcome);
        if numeric(uid) == Some(0) || gid.and_then(numeric) == Some(0) {
            assert!(
                outcome.has(Rule::UserRoot) || outcome.has(Rule::UserInvalid),
                "{user:?} not denied as root"
            );
        }
        if uid.eq_ignore_ascii_case("root") || gid.is_some_and(|g| g.eq_ignore_ascii_case("root")) {
            assert!(!outcome.allowed(), "{user:?} allowed");
        }
        let Some(h) = &outcome.hardened else {
            continue;
        };
        let hardened = h.user.as_deref().unwrap();
        if user.is_empty() {
            assert_eq!(hardened, "1000:1000");
            continue;
        }
        match (numeric(uid), gid.map(numeric)) {
            (Some(u), Some(Some(g))) => assert_eq!(hardened, format!("{u}:{g}")),
            (Some(u), None) => assert_eq!(hardened, format!("{u}:1000")),
            _ => assert!(names, "{user:?} allowed as a name while names are off"),
        }
    }
});
