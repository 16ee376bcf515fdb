//! Tidy checks (in the manner of rust-analyzer's `tidy.rs`): the invariants
//! of ARCHITECTURE.md that can be checked mechanically, checked on every
//! test run so that a change which breaks one fails CI instead of waiting
//! for a reviewer to notice.
//!
//! - only the orchestrator, among the crates that ship, depends on bollard
//!   (invariant 1: only the orchestrator talks to Docker);
//! - every workspace crate takes its lints and its dependency versions from
//!   the workspace (one place for versions and lints);
//! - the orchestrator's test hooks (crash points, injected delays) are
//!   compiled only with its `test-hooks` feature, which no shipped binary
//!   enables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vibebox_tests::repo_root;

/// Packages that never ship (test harnesses, benchmarks): they may reach
/// Docker directly to set up and inspect what the platform did.
const NOT_SHIPPED: &[&str] = &["vibebox-tests", "vibebox-bench"];

/// Every workspace member's manifest, by package name.
fn manifests() -> BTreeMap<String, (PathBuf, toml::Table)> {
    let root = repo_root();
    let workspace: toml::Table = read_toml(&root.join("Cargo.toml"));
    let members = workspace["workspace"]["members"]
        .as_array()
        .expect("workspace.members");
    let mut dirs = Vec::new();
    for member in members {
        let pattern = member.as_str().expect("member is a string");
        if let Some(parent) = pattern.strip_suffix("/*") {
            for entry in std::fs::read_dir(root.join(parent)).expect("members folder") {
                let path = entry.expect("dir entry").path();
                if path.join("Cargo.toml").exists() {
                    dirs.push(path);
                }
            }
        } else {
            dirs.push(root.join(pattern));
        }
    }
    dirs.into_iter()
        .map(|dir| {
            let manifest = read_toml(&dir.join("Cargo.toml"));
            let name = manifest["package"]["name"]
                .as_str()
                .expect("package.name")
                .to_owned();
            (name, (dir, manifest))
        })
        .collect()
}

fn read_toml(path: &Path) -> toml::Table {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn dependency_tables(manifest: &toml::Table) -> Vec<(&'static str, &toml::Table)> {
    ["dependencies", "dev-dependencies", "build-dependencies"]
        .into_iter()
        .filter_map(|kind| {
            manifest
                .get(kind)
                .and_then(|t| t.as_table())
                .map(|t| (kind, t))
        })
        .collect()
}

#[test]
fn only_the_orchestrator_among_shipped_crates_depends_on_bollard() {
    let mut offenders = Vec::new();
    for (name, (_, manifest)) in manifests() {
        if name == "vibebox-orchestrator" || NOT_SHIPPED.contains(&name.as_str()) {
            continue;
        }
        let direct = manifest
            .get("dependencies")
            .and_then(|d| d.as_table())
            .is_some_and(|deps| deps.contains_key("bollard"));
        if direct {
            offenders.push(name);
        }
    }
    assert!(
        offenders.is_empty(),
        "only vibebox-orchestrator may depend on bollard (ARCHITECTURE.md invariant 1); \
         these shipped crates do: {offenders:?}"
    );
}

#[test]
fn every_crate_takes_lints_and_versions_from_the_workspace() {
    let mut problems = Vec::new();
    for (name, (_, manifest)) in manifests() {
        let lints = manifest
            .get("lints")
            .and_then(|l| l.get("workspace"))
            .and_then(|w| w.as_bool());
        if lints != Some(true) {
            problems.push(format!("{name}: [lints] workspace = true is missing"));
        }
        let publish = manifest["package"].get("publish");
        let from_workspace = publish
            .and_then(|p| p.get("workspace"))
            .and_then(|w| w.as_bool())
            == Some(true);
        if !from_workspace && publish.and_then(|p| p.as_bool()) != Some(false) {
            problems.push(format!("{name}: must not be publishable"));
        }
        for (kind, deps) in dependency_tables(&manifest) {
            for (dep, spec) in deps {
                let inherited = spec
                    .get("workspace")
                    .and_then(|w| w.as_bool())
                    .unwrap_or(false);
                if !inherited {
                    problems.push(format!(
                        "{name}: [{kind}] {dep} must be `{dep}.workspace = true` \
                         (versions live in the root [workspace.dependencies])"
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The names of the orchestrator's test hooks: each may appear only in a
/// file or item compiled under `feature = "test-hooks"`.
#[test]
fn orchestrator_test_hooks_are_behind_a_feature_no_shipped_binary_enables() {
    let root = repo_root();
    let manifest = read_toml(&root.join("crates/orchestrator/Cargo.toml"));
    let features = manifest
        .get("features")
        .and_then(|f| f.as_table())
        .expect("the orchestrator declares features");
    assert!(
        features.contains_key("test-hooks"),
        "the orchestrator must declare a `test-hooks` feature"
    );
    let default = features
        .get("default")
        .and_then(|d| d.as_array())
        .cloned()
        .unwrap_or_default();
    assert!(
        !default.iter().any(|f| f.as_str() == Some("test-hooks")),
        "test hooks must not be a default feature"
    );
    // No shipped crate turns the feature on in its normal dependencies.
    for (name, (_, manifest)) in manifests() {
        if NOT_SHIPPED.contains(&name.as_str()) {
            continue;
        }
        let enabled = manifest
            .get("dependencies")
            .and_then(|d| d.get("vibebox-orchestrator"))
            .and_then(|o| o.get("features"))
            .and_then(|f| f.as_array())
            .is_some_and(|f| f.iter().any(|x| x.as_str() == Some("test-hooks")));
        assert!(
            !enabled,
            "{name} ships and enables the orchestrator's test hooks"
        );
    }
    // The hook module itself is gated.
    let lib = std::fs::read_to_string(root.join("crates/orchestrator/src/lib.rs")).unwrap();
    for line in lib.lines().filter(|l| l.contains("mod testkit")) {
        let index = lib.find(line).unwrap();
        let before = &lib[..index];
        let attribute = before
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        assert!(
            attribute.contains("feature = \"test-hooks\""),
            "`{line}` must be under #[cfg(feature = \"test-hooks\")], found `{attribute}`"
        );
    }
}
