//! Host paths (bind mount sources): normalization never panics, its result
//! is absolute with no `.`, `..` or empty components (so no `//`) and is a
//! fixed point; and as a bind source, a path denied as a Docker socket or a
//! sensitive path stays denied under every re-spelling (`//`, `/./`,
//! `x/..`, a trailing `/`, a leading `/..`, ASCII case), while the decision
//! as a whole does not change with a lexical re-spelling. The policy's
//! normalization agrees with the independent oracle's
//! (`vibebox_fuzz::oracle::paths`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vibebox_fuzz::oracle::paths;
use vibebox_fuzz::{check_outcome, is_socket_path, policy, root_prefix_policy};
use vibebox_policy::path::normalize;
use vibebox_policy::{Outcome, Policy, Rule, evaluate};
use vibebox_proto::environment::{ContainerSpec, Mount, MountType};

fn bind(policy: &Policy, source: &str) -> Outcome {
    let spec = ContainerSpec {
        image: "python:3.12".into(),
        mounts: vec![Mount {
            r#type: MountType::Bind as i32,
            source: source.into(),
            target: "/mnt/host".into(),
            read_only: true,
            size_mb: None,
        }],
        ..Default::default()
    };
    let outcome = evaluate(policy.rules_for(""), &spec);
    check_outcome(policy, "", &spec, &outcome);
    outcome
}

/// (allowed, socket, sensitive)
fn verdict(o: &Outcome) -> (bool, bool, bool) {
    (
        o.allowed(),
        o.has(Rule::MountDockerSocket),
        o.has(Rule::MountSensitivePath),
    )
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    if input.len() > 1024 {
        return;
    }
    let normalized = normalize(input);
    assert_eq!(
        normalized.as_ref().ok(),
        paths::lexical(input).as_ref(),
        "{input:?}: policy vs oracle"
    );
    if let Ok(p) = &normalized {
        assert!(p.starts_with('/'));
        assert!(p == "/" || !p.ends_with('/'));
        assert!(!p.contains("//"));
        assert!(
            !p[1..]
                .split('/')
                .any(|c| c == "." || c == ".." || (c.is_empty() && p != "/"))
        );
        assert_eq!(normalize(p).as_deref(), Ok(p.as_str()), "idempotent");
    }

    let lexical = [
        format!("{input}/"),
        input.replace('/', "//"),
        format!("/.{input}"),
        format!("/..{input}"),
        format!("/tmp/..{input}"),
        format!("{input}/x/.."),
        input.replace('/', "/./"),
    ];
    let case = [input.to_ascii_uppercase(), input.to_ascii_lowercase()];

    // Under `/` as the only prefix, only the socket and sensitive rules
    // decide, and they ignore case.
    let root = root_prefix_policy();
    let base = bind(root, input);
    if let Ok(p) = &normalized {
        if is_socket_path(p) {
            assert!(
                base.has(Rule::MountDockerSocket),
                "{input:?} not denied as a socket"
            );
        }
        if let Some(h) = &base.hardened {
            assert_eq!(
                &h.mounts[0].source, p,
                "the hardened source is the normalized path"
            );
        }
    }
    if input.starts_with('/') {
        for variant in lexical.iter().chain(&case) {
            assert_eq!(
                verdict(&bind(root, variant)),
                verdict(&base),
                "{input:?} vs {variant:?}"
            );
        }
    }

    // Under a realistic policy (case-sensitive prefixes), denials are stable
    // under every re-spelling and the decision under lexical ones.
    let real = policy();
    let base = bind(real, input);
    if input.starts_with('/') {
        for variant in &lexical {
            assert_eq!(
                verdict(&bind(real, variant)),
                verdict(&base),
                "{input:?} vs {variant:?}"
            );
        }
        for variant in &case {
            let o = bind(real, variant);
            assert_eq!(verdict(&o).1, verdict(&base).1, "{input:?} vs {variant:?}");
            assert_eq!(verdict(&o).2, verdict(&base).2, "{input:?} vs {variant:?}");
        }
    }
});
