//! Capability names, in a spec's `cap_add` (one per line of the input) and
//! in a policy's `capabilities.allow_add`: never panics; a spec's name is
//! allowed exactly when its documented spelling (`CAP_` prefix optional,
//! any case, surrounding blanks) is in the allow list, `ALL` never; a policy
//! accepts only names that denote one capability, and allows a spec asking
//! for exactly the names it lists, hardened to names that re-evaluate the
//! same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vibebox_fuzz::{capability_name, check_outcome, policy};
use vibebox_policy::document::PolicyDocument;
use vibebox_policy::{Policy, Rule, evaluate};
use vibebox_proto::environment::ContainerSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let caps: Vec<String> = text.split('\n').take(8).map(str::to_owned).collect();
    let spec = ContainerSpec {
        image: "python:3.12".into(),
        cap_add: caps.clone(),
        ..Default::default()
    };

    // Under the realistic policy: base (CHOWN, NET_BIND_SERVICE) and acme (CHOWN).
    for (team, allowed) in [
        ("", &["CHOWN", "NET_BIND_SERVICE"][..]),
        ("acme", &["CHOWN"]),
    ] {
        let spec = ContainerSpec {
            image: "ghcr.io/acme/app:1".into(),
            ..spec.clone()
        };
        let outcome = evaluate(policy().rules_for(team), &spec);
        check_outcome(policy(), team, &spec, &outcome);
        let all_allowed = caps
            .iter()
            .all(|c| allowed.contains(&capability_name(c).as_str()));
        assert_eq!(
            !outcome.has(Rule::CapabilityAdd),
            all_allowed,
            "{caps:?} for {team:?}"
        );
    }

    // A policy that allows exactly these names.
    let mut doc = PolicyDocument::default();
    doc.capabilities.allow_add = caps.clone();
    let Ok(p) = Policy::from_document(doc) else {
        return;
    };
    let outcome = evaluate(p.rules_for(""), &spec);
    check_outcome(&p, "", &spec, &outcome);
    assert!(
        !outcome.has(Rule::CapabilityAdd),
        "{caps:?} is allowed by the policy but denied in a spec"
    );
    let hardened = outcome.hardened.expect("allowed");
    for cap in &hardened.cap_add {
        assert!(
            !cap.is_empty()
                && cap != "ALL"
                && cap.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
            "{cap:?}"
        );
    }
});
