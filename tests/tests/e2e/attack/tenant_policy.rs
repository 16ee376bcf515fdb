//! Hostile tenants (issue 16), item 9 and "the dry run and the create
//! disagree": what an authenticated developer can ask the policy for.
//!
//! - every spec of the attack corpus, plus mount targets over kernel
//!   interfaces and engine-managed files, chosen uids/gids and an image with
//!   no command, goes through `EvaluateSpec` (the dry run) and
//!   `CreateEnvironment`, and the two must agree: refused by the dry run ⇒
//!   the create is refused with the same rule ids (synchronously: policy
//!   never lets a denied spec reach the engine); allowed by the dry run ⇒
//!   the create runs once settled, or is refused with a caller-fixable code
//!   (never INTERNAL) naming the field, or (what only the engine can tell)
//!   settles in FAILED with a `failure_reason` naming the field, leaving
//!   nothing behind;
//! - the container's swap is pinned to its memory (Docker inspect);
//! - `GetPolicy` shows a member only the overlays of its own teams;
//! - a symlink planted through one environment's bind never lets a second
//!   bind escape the allowed prefix, and binds run as the platform's user.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use tonic::Status;
use vibebox_proto::environment::Environment;
use vibebox_proto::policy::{Decision, EvaluateSpecRequest, Evaluation, GetPolicyRequest};
use vibebox_tests::cluster::{Cluster, Service};

use super::policy::{Case, policy_cases};
use super::*;

/// An image with neither a command nor an entrypoint (built once from the
/// development image, without a registry).
fn no_command_image(base: &str) -> String {
    let tag = "vibebox/nocmd:1";
    let exists = Command::new("docker")
        .args(["image", "inspect", tag])
        .output()
        .expect("docker image inspect")
        .status
        .success();
    if !exists {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(
            dir.path().join("Dockerfile"),
            format!("FROM {base}\nCMD []\nLABEL vibebox.test=tenant-policy\n"),
        )
        .expect("Dockerfile");
        let built = Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", tag])
            .arg(dir.path())
            .output()
            .expect("docker build");
        assert!(
            built.status.success(),
            "building {tag}: {}",
            String::from_utf8_lossy(&built.stderr)
        );
    }
    tag.to_owned()
}

fn with_mount(image: &str, kind: MountType, source: &str, target: &str) -> ContainerSpec {
    ContainerSpec {
        mounts: vec![Mount {
            r#type: kind as i32,
            source: source.into(),
            target: target.into(),
            read_only: false,
            size_mb: (kind == MountType::Tmpfs).then_some(16),
        }],
        memory_limit_mb: Some(64),
        cpu_limit: Some(0.25),
        ..spec(image)
    }
}

fn with_user(image: &str, user: &str) -> ContainerSpec {
    ContainerSpec {
        user: Some(user.into()),
        memory_limit_mb: Some(64),
        cpu_limit: Some(0.25),
        ..spec(image)
    }
}

/// The new cases of this suite: (what, spec, the rule the dry run must name
/// or None when the dry run must allow it).
fn tenant_cases(image: &str, nocmd: &str) -> Vec<(String, ContainerSpec, Option<&'static str>)> {
    let mut out = Vec::new();
    let reserved = "mount.target_reserved";
    for target in [
        "/proc",
        "//proc/",
        "/proc/../proc",
        "/proc/./",
        "/./proc",
        "/x/../proc",
        "/proc/sys",
        "/proc/sys/kernel",
        "/sys",
        "/sys/fs/cgroup",
        "/sys/kernel/",
        "/dev",
        "/dev/shm",
        "/dev/pts",
        "//dev//",
        "/etc/hosts",
        "/etc//hosts/",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/etc/../etc/resolv.conf",
        "/.dockerenv",
    ] {
        for kind in [MountType::Tmpfs, MountType::Volume] {
            out.push((
                format!("{kind:?} over {target:?}"),
                with_mount(image, kind, "", target),
                Some(reserved),
            ));
        }
    }
    // Linux paths are case-sensitive: these are ordinary directories.
    for target in ["/PROC", "/Sys", "/procfs", "/devices", "/etc/hosts.d"] {
        out.push((
            format!("tmpfs at the ordinary path {target:?}"),
            with_mount(image, MountType::Tmpfs, "", target),
            None,
        ));
    }
    let docker_gid = Command::new("getent")
        .args(["group", "docker"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split(':')
                .nth(2)
                .map(str::to_owned)
        })
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| "999".into());
    for user in [
        format!("1000:{docker_gid}"),
        format!("{docker_gid}:1000"),
        "1000:999".into(),
        "999".into(),
        "1".into(),
        "1:1".into(),
        "100:100".into(),
        "1000:100".into(),
        "65534".into(),
        "65534:65534".into(),
        "60001".into(),
        "1000:2147483647".into(),
        "2147483646".into(),
    ] {
        out.push((
            format!("user {user:?}"),
            with_user(image, &user),
            Some("user.range"),
        ));
    }
    for user in ["1000", "1000:1000", "2000:3000", "60000:60000"] {
        out.push((format!("user {user:?}"), with_user(image, user), None));
    }
    // The image has no command: the dry run cannot know, the create must
    // say so (the caller's to fix), not fail with INTERNAL.
    out.push((
        "an image without a command, none given".into(),
        ContainerSpec {
            memory_limit_mb: Some(64),
            cpu_limit: Some(0.25),
            ..spec(nocmd)
        },
        None,
    ));
    out.push((
        "an image without a command, one given".into(),
        ContainerSpec {
            command: vec!["sleep".into(), "600".into()],
            memory_limit_mb: Some(64),
            cpu_limit: Some(0.25),
            ..spec(nocmd)
        },
        None,
    ));
    out
}

/// The dry run of `spec` for `team`.
async fn dry_run(
    p: &Platform,
    token: &str,
    team: &str,
    spec: Option<ContainerSpec>,
) -> Result<Evaluation, Status> {
    patiently(|| {
        let mut client = p.policy(token);
        let request = EvaluateSpecRequest {
            spec: spec.clone(),
            team_id: team.into(),
        };
        async move { client.evaluate_spec(request).await }
    })
    .await
    .map(|r| r.into_inner().evaluation.expect("evaluation"))
}

/// Codes that tell the caller to change the request (never the platform's
/// fault, never "retry").
fn caller_fixable(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange
    )
}

/// Whether a `failure_reason` names a field of the spec (`spec.command`,
/// `spec.mounts[0].target`, ...), as a refusal's details would.
fn names_spec_field(reason: &str) -> bool {
    reason.contains("spec.")
}

/// Whether the dry run and the create (settled) agree; Err says how they do
/// not.
fn agree(
    dry: &Result<Evaluation, Status>,
    created: &Result<Environment, Status>,
) -> Result<(), String> {
    match (dry, created) {
        (Ok(e), Ok(env)) if e.decision() == Decision::Allow => match env.state() {
            EnvironmentState::Running => Ok(()),
            // Accepted, then refused by the engine: the reason names the
            // field to fix.
            EnvironmentState::Failed if names_spec_field(&env.failure_reason) => Ok(()),
            _ => Err(format!(
                "allowed by the dry run, but the create settled {:?} ({:?})",
                env.state(),
                env.failure_reason
            )),
        },
        (Ok(e), Err(s)) if e.decision() == Decision::Allow => {
            let r = Refusal::of(s);
            if caller_fixable(r.code) && (!r.fields.is_empty() || !r.rules.is_empty()) {
                Ok(())
            } else {
                Err(format!(
                    "allowed by the dry run, but the create failed with {:?} {:?} (details: {:?} {:?})",
                    r.code, r.message, r.rules, r.fields
                ))
            }
        }
        (Ok(e), Ok(env)) => Err(format!(
            "denied by the dry run ({:?}) but created as {} ({:?})",
            e.violations,
            env.id,
            env.state()
        )),
        (Ok(e), Err(s)) => {
            let want: BTreeSet<String> = e.violations.iter().map(|v| v.rule_id.clone()).collect();
            let r = Refusal::of(s);
            let got: BTreeSet<String> = r.rule_ids().into_iter().collect();
            if matches!(r.code, Code::FailedPrecondition | Code::InvalidArgument) && got == want {
                Ok(())
            } else {
                Err(format!(
                    "the dry run denied with {want:?}, the create answered {:?} {got:?} ({:?})",
                    r.code, r.message
                ))
            }
        }
        (Err(d), Err(c)) if d.code() == c.code() => Ok(()),
        (Err(d), other) => Err(format!(
            "the dry run failed with {:?} {:?}, the create answered {other:?}",
            d.code(),
            d.message()
        )),
    }
}

/// The create, and (once accepted) the environment as it settled.
async fn try_create(
    p: &Platform,
    token: &str,
    header_id: &str,
    request: &CreateEnvironmentRequest,
) -> Result<Environment, Status> {
    let created = patiently(|| {
        let mut client = p.environments(token);
        let request = with_id(header_id, request.clone());
        async move { client.create_environment(request).await }
    })
    .await?
    .into_inner()
    .environment
    .expect("environment");
    vibebox_tests::settle::settle(&mut p.environments(token), &created.id).await
}

/// Deletes and waits until the environment is gone.
async fn delete(p: &Platform, token: &str, id: &str) {
    let deleted = patiently(|| {
        let mut client = p.environments(token);
        let id = id.to_owned();
        async move { client.delete_settled(&id).await }
    })
    .await
    .unwrap_or_else(|s| panic!("deleting {id}: {s:?}"));
    assert_eq!(deleted.state(), EnvironmentState::Deleted, "{deleted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_and_create_agree_on_every_attack_spec() {
    let mut report = SuiteReport::new("attack", "dry_run_and_create_agree_on_every_attack_spec");
    let image = dev_image();
    let nocmd = no_command_image(&image);
    let p = Platform::start();
    let admin = p.admin_token();
    let installation = p.installation_id().expect("installation id");
    let alpha = team(&p, &admin, "alpha").await;
    let (_, dev) = member(&p, &admin, "dev", &alpha, TeamRole::Developer).await;

    let mut cases: Vec<Case> = policy_cases(&image, &alpha);
    let corpus = cases.len();
    let mut promised: Vec<(usize, Option<&'static str>)> = Vec::new();
    for (what, spec, rule) in tenant_cases(&image, &nocmd) {
        promised.push((cases.len(), rule));
        cases.push(Case {
            what,
            request: CreateEnvironmentRequest {
                labels: Default::default(),
                request_id: format!("tenant-{}", cases.len()),
                team_id: alpha.clone(),
                name: format!("tenant-{}", cases.len()),
                spec: Some(spec),
            },
            expect: super::policy::Expect::Code(Code::Ok),
        });
    }

    let mut failures = Vec::new();
    let mut created = 0usize;
    let mut no_command_answer = None;
    for (n, case) in cases.iter().enumerate() {
        let dry = dry_run(&p, &dev, &case.request.team_id, case.request.spec.clone()).await;
        let result = try_create(&p, &dev, &format!("agree-{n}"), &case.request).await;
        let mut ok = true;
        if let Err(why) = agree(&dry, &result) {
            failures.push(format!("{}: {why}", case.what));
            ok = false;
        }
        if let Some((_, rule)) = promised.iter().find(|(i, _)| *i == n) {
            let rules: Vec<String> = dry
                .as_ref()
                .map(|e| e.violations.iter().map(|v| v.rule_id.clone()).collect())
                .unwrap_or_default();
            match rule {
                Some(rule) if !rules.iter().any(|r| r == rule) => {
                    failures.push(format!(
                        "{}: the dry run must name {rule}, it said {dry:?}",
                        case.what
                    ));
                    ok = false;
                }
                None if !rules.is_empty() => {
                    failures.push(format!("{}: must be allowed, got {rules:?}", case.what));
                    ok = false;
                }
                _ => {}
            }
        }
        if case.what == "an image without a command, none given" {
            no_command_answer = Some(result.clone());
        }
        if let Ok(env) = &result
            && env.state() != EnvironmentState::Failed
        {
            // Deleted at once: the team's quota stays free for the next case.
            delete(&p, &dev, &env.id).await;
            created += 1;
        }
        report.case(ok);
    }
    report.note("corpus_specs", corpus);
    report.note("tenant_specs", cases.len() - corpus);

    // The engine's refusal names what to fix: in the create's answer, or
    // (create being a long operation) in the failed environment's reason.
    match no_command_answer {
        Some(Ok(env)) if env.state() == EnvironmentState::Failed => {
            let reason = &env.failure_reason;
            // The field, and the engine's own words about the command.
            let engine_words = reason.to_lowercase().replace("spec.command", "");
            if !(reason.contains("spec.command") && engine_words.contains("command")) {
                failures.push(format!(
                    "no command: want the engine's reason and spec.command, got {env:?}"
                ));
            }
        }
        Some(Err(s)) => {
            let r = Refusal::of(&s);
            let subjects: Vec<String> =
                tonic_types::StatusExt::get_details_precondition_failure(&s)
                    .map(|pf| pf.violations.into_iter().map(|v| v.subject).collect())
                    .unwrap_or_default();
            let names_command =
                r.names_field("spec.command") || subjects.iter().any(|f| f == "spec.command");
            if !(caller_fixable(r.code)
                && names_command
                && r.message.to_lowercase().contains("command"))
            {
                failures.push(format!(
                    "no command: want the engine's reason and spec.command, got {r:?}"
                ));
            }
        }
        other => failures.push(format!("no command: must be refused, got {other:?}")),
    }

    report.note("created_and_deleted", created);
    assert!(
        failures.is_empty(),
        "{} of {} specs disagree:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Refused creates leave nothing behind in the engine.
    assert_eq!(
        labelled_objects(&installation),
        Vec::<String>::new(),
        "refused and deleted creates leave no Docker object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_is_pinned_to_memory() {
    let mut report = SuiteReport::new("attack", "swap_is_pinned_to_memory");
    let image = dev_image();
    let p = Platform::start();
    let admin = p.admin_token();
    let alpha = team(&p, &admin, "alpha").await;
    let (_, dev) = member(&p, &admin, "dev", &alpha, TeamRole::Developer).await;
    for (name, memory) in [("small", Some(64)), ("default", None)] {
        let env = create_ok(
            &p,
            &dev,
            &alpha,
            name,
            ContainerSpec {
                memory_limit_mb: memory,
                cpu_limit: Some(0.25),
                ..spec(&image)
            },
        )
        .await;
        let container = vibebox_tests::attack::container_of(&env).await;
        let inspected = vibebox_tests::docker()
            .inspect_container(&container, None)
            .await
            .expect("inspect");
        let host = inspected.host_config.expect("host config");
        let want = memory.unwrap_or(4096) * 1024 * 1024;
        assert_eq!(host.memory, Some(want), "{name}: memory");
        report.case(host.memory_swap == Some(want));
        assert_eq!(
            host.memory_swap,
            Some(want),
            "{name}: MemorySwap must equal Memory (no swap beyond memory)"
        );
    }
}

/// Writes `text` as the policy file and makes the policy service reload it
/// (SIGHUP); returns once the admin sees the new digest.
async fn reload_policy(c: &Cluster, file: &Path, text: &str) {
    let admin = c.admin_token();
    let before = c
        .policy(&admin)
        .get_policy(GetPolicyRequest {})
        .await
        .expect("get policy")
        .into_inner()
        .policy_digest;
    std::fs::write(file, text).expect("policy file");
    let pid = c.pid(Service::Policy).expect("policy pid");
    let sent = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(sent.success());
    for _ in 0..100 {
        let now = c
            .policy(&admin)
            .get_policy(GetPolicyRequest {})
            .await
            .expect("get policy")
            .into_inner()
            .policy_digest;
        if now != before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the policy was not reloaded");
}

async fn platform_user(c: &Cluster, name: &str, role: PlatformRole) -> String {
    let admin = c.admin_token();
    let password = format!("{name}-password-123");
    c.identity(&admin)
        .create_user(CreateUserRequest {
            request_id: Default::default(),
            username: name.into(),
            display_name: name.into(),
            password: password.clone(),
            platform_role: role as i32,
        })
        .await
        .expect("create user");
    c.identity("")
        .login(LoginRequest {
            username: name.into(),
            password,
        })
        .await
        .expect("login")
        .into_inner()
        .token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_policy_shows_a_member_only_its_own_teams_overlays() {
    let mut report = SuiteReport::new("attack", "get_policy_shows_only_own_team_overlays");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, "").expect("policy file");
    let c = Cluster::builder()
        .arg(Service::Policy, format!("--policy-file={}", file.display()))
        .start()
        .await;
    let alpha = c.team("alpha").await;
    let beta = c.team("beta").await;
    let text = format!(
        "[teams.\"{alpha}\"]\ndeny_images = [\"alpha-secret.example/*\"]\nmax_cpus = 1.0\n\n\
         [teams.\"{beta}\"]\ndeny_images = [\"beta-secret.example/*\"]\nmax_cpus = 2.0\n"
    );
    reload_policy(&c, &file, &text).await;
    let alpha_dev = c.user("alpha-dev", &alpha, TeamRole::Developer).await;
    let beta_viewer = c.user("beta-viewer", &beta, TeamRole::Viewer).await;
    let auditor = platform_user(&c, "auditor", PlatformRole::Auditor).await;
    let loner = platform_user(&c, "loner", PlatformRole::None).await;

    let document = |token: String| {
        let mut client = c.policy(&token);
        async move {
            client
                .get_policy(GetPolicyRequest {})
                .await
                .map(|r| r.into_inner().document)
        }
    };
    let sees = |doc: &str, team: &str, marker: &str| doc.contains(team) || doc.contains(marker);
    let mut failures = Vec::new();
    for (who, token, alpha_visible, beta_visible) in [
        ("admin", c.admin_token(), true, true),
        ("auditor", auditor, true, true),
        ("alpha developer", alpha_dev, true, false),
        ("beta viewer", beta_viewer, false, true),
    ] {
        let doc = document(token).await.expect("get policy");
        let a = sees(&doc, &alpha, "alpha-secret");
        let b = sees(&doc, &beta, "beta-secret");
        let ok = a == alpha_visible && b == beta_visible;
        if !ok {
            failures.push(format!(
                "{who}: sees alpha {a} (want {alpha_visible}), beta {b} (want {beta_visible})"
            ));
        }
        // The base policy stays visible to everyone.
        if !doc.contains("[images]") {
            failures.push(format!("{who}: the base policy is missing"));
        }
        report.case(ok);
    }
    // A user in no team is not shown the policy at all (members only).
    let loner_answer = document(loner).await;
    let ok = match &loner_answer {
        Err(s) => s.code() == Code::PermissionDenied,
        Ok(doc) => !sees(doc, &alpha, "alpha-secret") && !sees(doc, &beta, "beta-secret"),
    };
    if !ok {
        failures.push(format!("member of no team: {loner_answer:?}"));
    }
    report.case(ok);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A bind prefix on the host (root-owned, as an operator would set it up)
/// with one world-writable project directory in it.
fn bind_prefix() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let root = tempfile::Builder::new()
        .prefix("vibebox-binds-")
        .tempdir_in("/tmp")
        .expect("prefix dir");
    let prefix = root.path().canonicalize().expect("canonical prefix");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&prefix, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let project = prefix.join("project");
    std::fs::create_dir(&project).expect("project dir");
    std::fs::set_permissions(&project, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    std::fs::create_dir(project.join("sub")).expect("sub dir");
    (root, prefix, project)
}

fn bind_spec(image: &str, source: &Path, target: &str, user: Option<&str>) -> ContainerSpec {
    ContainerSpec {
        mounts: vec![Mount {
            r#type: MountType::Bind as i32,
            source: source.display().to_string(),
            target: target.into(),
            ..Default::default()
        }],
        user: user.map(str::to_owned),
        memory_limit_mb: Some(64),
        cpu_limit: Some(0.25),
        ..spec(image)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_never_escape_their_prefix_and_run_as_the_platform_user() {
    let mut report = SuiteReport::new("attack", "binds_never_escape_their_prefix");
    let image = dev_image();
    let (_root, prefix, project) = bind_prefix();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        format!(
            "[mounts]\nallow_bind_prefixes = [\"{}\"]\n",
            prefix.display()
        ),
    )
    .expect("policy file");
    let c = Cluster::builder()
        .arg(Service::Policy, format!("--policy-file={}", file.display()))
        .start()
        .await;
    let installation = c.installation_id();
    let alpha = c.team("alpha").await;
    let dev = c.user("dev", &alpha, TeamRole::Developer).await;

    let create = |name: &str, spec: ContainerSpec| {
        let mut client = c.environments(&dev);
        let request = CreateEnvironmentRequest {
            labels: Default::default(),
            request_id: format!("bind-{name}"),
            team_id: alpha.clone(),
            name: name.into(),
            spec: Some(spec),
        };
        async move { client.create_settled(request).await }
    };

    // Environment A binds the project and plants a symlink to the host's root.
    let a = create("planter", bind_spec(&image, &project, "/data", None))
        .await
        .expect("the bind under the prefix is allowed");
    assert_eq!(a.state(), EnvironmentState::Running, "{a:?}");
    let a = a.id;
    let planted = vibebox_tests::cluster::exec(
        &mut c.environments(&dev),
        &a,
        &["ln", "-s", "/", "/data/escape"],
    )
    .await
    .expect("exec");
    assert_eq!(planted.exit_code, 0, "{planted:?}");
    assert!(
        std::fs::symlink_metadata(project.join("escape"))
            .expect("the symlink exists on the host")
            .file_type()
            .is_symlink()
    );

    let mut failures = Vec::new();
    let mut objects_before = labelled_objects(&installation);
    objects_before.sort();
    // Environment B binds through the symlink: lexically under the prefix,
    // on the host the host's /etc.
    for (what, source) in [
        ("through a planted symlink", project.join("escape/etc")),
        ("the planted symlink itself", project.join("escape")),
        ("below a directory a tenant can write", project.join("sub")),
    ] {
        let result = create(
            &format!("escape-{}", what.len()),
            bind_spec(&image, &source, "/host", None),
        )
        .await;
        let ok = match &result {
            Err(s) => {
                let r = Refusal::of(s);
                r.code == Code::FailedPrecondition
                    && r.rules.iter().any(|x| x == "mount.bind_source")
            }
            // Refused on the host after the create was accepted: failed,
            // naming the bind source, never run.
            Ok(env)
                if env.state() == EnvironmentState::Failed
                    && env.failure_reason.contains("bind source")
                    && env.failure_reason.contains("(mount 0)") =>
            {
                true
            }
            Ok(env) => {
                let seen = vibebox_tests::cluster::exec(
                    &mut c.environments(&dev),
                    &env.id,
                    &["ls", "/host"],
                )
                .await;
                failures.push(format!("ESCAPE {what}: created, /host holds {seen:?}"));
                false
            }
        };
        if !ok && result.is_err() {
            failures.push(format!("{what}: refused badly: {result:?}"));
        }
        report.case(ok);
    }
    let mut objects_after = labelled_objects(&installation);
    objects_after.sort();
    if failures.is_empty() {
        assert_eq!(
            objects_after, objects_before,
            "refused binds leave nothing behind"
        );
    }

    // A bind runs as the platform's user: a chosen uid/gid would read or
    // write another user's files under the prefix.
    for user in ["2000:2000", "1000:2000", "1001"] {
        let result = create(
            &format!("user-{}", user.replace(':', "-")),
            bind_spec(&image, &project, "/data", Some(user)),
        )
        .await;
        let rules = match &result {
            Err(s) => Refusal::of(s).rule_ids(),
            Ok(_) => Vec::new(),
        };
        let ok = rules.iter().any(|r| r == "user.bind_identity");
        if !ok {
            failures.push(format!(
                "bind with user {user:?}: want user.bind_identity, got {result:?}"
            ));
        }
        report.case(ok);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
