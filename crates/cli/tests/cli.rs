//! End-to-end tests of the `vibebox` binary against a running platform
//! (`vibebox up` on a temp data dir, real Docker): what a new user does,
//! step by step, asserting outputs and exit codes.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vibebox_tests::Platform;

const BIN: &str = env!("CARGO_BIN_EXE_vibebox");

/// The CLI with its own config directory, pointed at one platform.
struct Cli {
    config: tempfile::TempDir,
}

impl Cli {
    fn new() -> Self {
        Self {
            config: tempfile::tempdir().expect("config dir"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("VIBEBOX_CONFIG_DIR", self.config.path())
            .env_remove("VIBEBOX_TOKEN")
            .env_remove("VIBEBOX_CONTEXT")
            .env_remove("VIBEBOX_SERVER")
            .env_remove("VIBEBOX_OUTPUT");
        cmd
    }

    /// Runs the CLI with `stdin` and returns its output.
    fn run_with(&self, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(args);
        cmd.envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning vibebox");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("writing stdin");
        child.wait_with_output().expect("vibebox output")
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, "", &[])
    }

    /// Runs and asserts success, returning stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vibebox {args:?} failed ({:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("JSON output")
    }

    /// Logs in as the bootstrap admin (token file), then creates `user` in
    /// the default team and logs in as them with a password on stdin.
    fn login_as_new_developer(&self, p: &Platform, user: &str) {
        let token_file = p.data_dir().join("admin.token");
        let out = self.ok(&[
            "login",
            &format!("http://{}", p.gateway),
            "--name",
            "admin",
            "--token-file",
            token_file.to_str().unwrap(),
        ]);
        assert!(out.contains("as admin"), "{out}");
        let out = self.run_with(
            &["user", "create", user, "--password-stdin"],
            "correct horse battery\n",
            &[],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.ok(&["team", "add", "default", user, "--role", "developer"]);
        let out = self.run_with(
            &[
                "login",
                "--name",
                user,
                "--username",
                user,
                "--password-stdin",
            ],
            "correct horse battery\n",
            &[],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("as {user}")));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("config file")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn new_user_logs_in_creates_works_reads_logs_deletes_and_sees_the_trail() {
    let p = Platform::start();
    let image = vibebox_tests::dev_image();
    let cli = Cli::new();

    // Not logged in yet: one error line, non-zero exit.
    let out = cli.run(&["env", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));

    // A wrong password is refused with the gRPC code.
    cli.login_as_new_developer(&p, "dana");
    let out = cli.run_with(
        &[
            "login",
            "--name",
            "dana",
            "--username",
            "dana",
            "--password-stdin",
        ],
        "wrong\n",
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("UNAUTHENTICATED"), "{}", stderr(&out));

    // The config file holds tokens: mode 0600; contexts are listed.
    #[cfg(unix)]
    assert_eq!(mode(&cli.config.path().join("config.toml")), 0o600);
    let contexts = cli.json(&["context", "ls"]);
    let names: Vec<&str> = contexts
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "dana"]);
    let who = cli.json(&["whoami"]);
    assert_eq!(who["user"]["username"], "dana");
    assert_eq!(who["teams"][0]["team"], "default");

    // Create (flags), with progress on stderr and the result on stdout.
    let out = cli.run(&[
        "env", "create", "work", "--image", &image, "--cpu", "1", "--memory", "256m",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("created work"), "{}", stdout(&out));
    assert!(stdout(&out).contains("running"), "{}", stdout(&out));
    assert!(!stderr(&out).is_empty(), "progress is shown on stderr");
    let env = cli.json(&["env", "get", "work"]);
    assert_eq!(env["state"], "running");
    assert_eq!(env["memory_mb"], 256);
    let id = env["id"].as_str().unwrap().to_owned();
    let table = cli.ok(&["env", "ls"]);
    assert!(table.lines().next().unwrap().starts_with("ID"), "{table}");
    assert!(table.contains(&id) && table.contains("work"), "{table}");

    // Non-interactive exec: separate stdout/stderr, the remote exit code.
    let out = cli.run(&[
        "env",
        "exec",
        "work",
        "--",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "to-out\n");
    assert_eq!(stderr(&out), "to-err\n");
    // stdin forwarded with -i (by id this time).
    let out = cli.run_with(&["env", "exec", "-i", &id, "--", "cat"], "piped in\n", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "piped in\n");

    // Logs: the image prints "devbox ready" at start.
    let logs = cli.ok(&["env", "logs", "work", "--tail", "10"]);
    assert!(logs.contains("devbox ready"), "{logs:?}");

    // Policy dry run: each violation with its rule id and CIS id.
    let spec = cli.config.path().join("bad.toml");
    std::fs::write(
        &spec,
        format!(
            "image = \"{image}\"\nprivileged = true\n[[mounts]]\ntype = \"bind\"\nsource = \"/var/run/docker.sock\"\ntarget = \"/var/run/docker.sock\"\n"
        ),
    )
    .unwrap();
    let out = cli.run(&["policy", "check", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(text.contains("DENY"), "{text}");
    assert!(
        text.contains("privileged") && text.contains("5.4"),
        "{text}"
    );
    assert!(
        text.contains("mount.docker_socket") && text.contains("5.31"),
        "{text}"
    );
    // Creating it fails in one line naming the rule ids.
    let out = cli.run(&["env", "create", "bad", "--file", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("vibebox: error: FAILED_PRECONDITION"),
        "{err}"
    );
    assert!(
        last.contains("rule privileged") && last.contains("rule mount.docker_socket"),
        "{err}"
    );

    // Delete.
    let out = cli.ok(&["env", "rm", "work"]);
    assert!(out.contains("deleted work"), "{out}");
    let listed = cli.json(&["env", "ls"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["id"] != id.as_str()),
        "{listed}"
    );

    // The audit trail (as the platform admin): create, exec, delete of `work`.
    let events = cli.json(&[
        "--context",
        "admin",
        "audit",
        "query",
        "--resource",
        &id,
        "--limit",
        "100",
    ]);
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for wanted in [
        "environment.create",
        "exec.start",
        "exec.end",
        "environment.delete",
    ] {
        assert!(
            actions.contains(&wanted),
            "{wanted} missing from {actions:?}"
        );
    }
    let trail = cli.ok(&[
        "--context",
        "admin",
        "audit",
        "query",
        "--action",
        "environment.delete",
    ]);
    assert!(trail.contains(&id), "{trail}");
    // The developer may not read the audit trail.
    let out = cli.run(&["audit", "query"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&out)
    );

    // The chain verifies on the platform and offline from an export.
    assert!(
        cli.ok(&["--context", "admin", "audit", "verify"])
            .contains("chain OK")
    );
    let export = cli.config.path().join("audit.jsonl");
    cli.ok(&[
        "--context",
        "admin",
        "audit",
        "export",
        "--out",
        export.to_str().unwrap(),
    ]);
    let key = p.data_dir().join("keys/audit-checkpoint.pub.pem");
    let report = cli.json(&[
        "audit",
        "verify-file",
        export.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(report["ok"], true, "{report}");
    // A range export verifies as the range it is, and not as the whole chain
    // (a file cut at its start).
    let range = cli.config.path().join("audit-range.jsonl");
    cli.ok(&[
        "--context",
        "admin",
        "audit",
        "export",
        "--from",
        "3",
        "--out",
        range.to_str().unwrap(),
    ]);
    let verify_range = |from: Option<&str>| {
        let mut args = vec![
            "audit",
            "verify-file",
            range.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ];
        if let Some(from) = from {
            args.extend(["--from", from]);
        }
        cli.run(&args)
    };
    let out = verify_range(Some("3"));
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let out = verify_range(None);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("starts at event 3"),
        "{}",
        stdout(&out)
    );
    // A tampered export is caught (exit 1).
    let text = std::fs::read_to_string(&export).unwrap();
    std::fs::write(
        &export,
        text.replacen("environment.delete", "environment.dElete", 1),
    )
    .unwrap();
    let out = cli.run(&[
        "audit",
        "verify-file",
        export.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("BROKEN"), "{}", stdout(&out));
}

#[test]
fn attenuated_token_is_made_offline_and_refused_beyond_its_restriction() {
    let p = Platform::start();
    let image = vibebox_tests::dev_image();
    let cli = Cli::new();
    cli.login_as_new_developer(&p, "erin");
    let out = cli.ok(&["env", "create", "scoped", "--image", &image]);
    assert!(out.contains("running"), "{out}");

    // Offline: an unreachable server does not matter.
    let out = cli.run(&[
        "--server",
        "http://127.0.0.1:1",
        "token",
        "attenuate",
        "--operation",
        "environment.list",
        "--operation",
        "environment.get",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_owned();
    assert!(!token.is_empty());

    let env = [("VIBEBOX_TOKEN", token.as_str())];
    let out = cli.run_with(&["env", "ls"], "", &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("scoped"));
    let out = cli.run_with(&["env", "exec", "scoped", "--", "true"], "", &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&out)
    );
    let out = cli.run_with(&["env", "rm", "scoped"], "", &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&out)
    );
    // The unrestricted token still works.
    cli.ok(&["env", "rm", "scoped"]);
}

/// An image with neither a command nor an entrypoint (built once from the
/// development image, without a registry): the engine refuses to run it.
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

/// The state at the end of a `verb name (id): state` line.
fn printed_state(out: &str) -> String {
    out.trim_end()
        .rsplit_once(": ")
        .map(|(_, s)| s.to_owned())
        .unwrap_or_default()
}

#[test]
fn lifecycle_commands_wait_until_done_and_a_failed_environment_says_why() {
    let p = Platform::start();
    let image = vibebox_tests::dev_image();
    let nocmd = no_command_image(&image);
    let cli = Cli::new();
    cli.login_as_new_developer(&p, "fay");

    // Each command returns once the environment has settled; its progress
    // goes to stderr as plain lines (stderr is not a terminal here),
    // starting with the transitional state the platform answered.
    let run = cli.run(&[
        "env", "create", "box", "--image", &image, "--label", "ci=true",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = stdout(&run);
    assert!(out.starts_with("created box ("), "{out}");
    assert_eq!(printed_state(&out), "running", "{out}");
    let progress = stderr(&run);
    assert!(
        progress.lines().any(|l| l.starts_with("box: creating")),
        "{progress}"
    );
    assert!(!progress.contains('\r'), "plain lines: {progress:?}");
    let run = cli.run(&["env", "stop", "box", "--timeout", "1"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = stdout(&run);
    assert!(out.starts_with("stopped box ("), "{out}");
    assert_eq!(printed_state(&out), "stopped", "{out}");
    assert!(
        stderr(&run).lines().any(|l| l.starts_with("box: stopping")),
        "{}",
        stderr(&run)
    );
    assert_eq!(cli.json(&["env", "get", "box"])["state"], "stopped");
    let out = cli.ok(&["env", "start", "box"]);
    assert!(out.starts_with("started box ("), "{out}");
    assert_eq!(printed_state(&out), "running", "{out}");
    let restarted = cli.json(&["env", "restart", "box", "--timeout", "1"]);
    assert_eq!(restarted["state"], "running", "{restarted}");
    let out = cli.run(&["env", "exec", "box", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Labels from create, listed through a filter; updated in place (name,
    // labels kept and added, memory applied live), then named back.
    let ls = |filter: &str| -> Vec<String> {
        cli.json(&["env", "ls", "--filter", filter, "--order-by", "name"])
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ls(r#"labels.ci = "true""#), ["box"]);
    assert!(ls("labels:tier").is_empty());
    let updated = cli.json(&[
        "env",
        "update",
        "box",
        "--name",
        "box-2",
        "--label",
        "tier=back",
        "--memory",
        "192m",
    ]);
    assert_eq!(updated["name"], "box-2", "{updated}");
    assert_eq!(updated["memory_mb"], 192, "{updated}");
    assert_eq!(updated["labels"]["ci"], "true", "{updated}");
    assert_eq!(updated["labels"]["tier"], "back", "{updated}");
    assert_eq!(ls("labels.tier = back AND state = RUNNING"), ["box-2"]);
    let out = cli.ok(&["env", "update", "box-2", "--name", "box", "--clear-labels"]);
    assert!(out.contains("name") && out.contains("box"), "{out}");
    assert!(!out.contains("labels"), "no labels left: {out}");
    // Nothing to update, or an order the platform refuses: one error line.
    let out = cli.run(&["env", "update", "box"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("nothing to update"),
        "{}",
        stderr(&out)
    );
    let out = cli.run(&["env", "ls", "--order-by", "owner_id"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("order_by"),
        "{err}"
    );

    // --no-wait returns as soon as the platform accepted the change, with
    // the state it answered (the transitional one, unless already done).
    let out = cli.ok(&["env", "stop", "box", "--no-wait", "--timeout", "1"]);
    assert!(out.starts_with("stopping box ("), "{out}");
    let state = printed_state(&out);
    assert!(state == "stopping" || state == "stopped", "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while cli.json(&["env", "get", "box"])["state"] != "stopped" {
        assert!(Instant::now() < deadline, "box never stopped");
        std::thread::sleep(Duration::from_millis(200));
    }
    let deleted = cli.json(&["env", "rm", "box"]);
    assert_eq!(deleted["state"], "deleted", "{deleted}");

    // What the engine refuses (an image without a command) fails the
    // command with exit code 1, naming the field to fix in one last line.
    let out = cli.run(&["env", "create", "nocmd", "--image", &nocmd]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("vibebox: error: "), "{err}");
    assert!(last.contains("spec.command"), "{err}");
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
}

/// Reads a pseudo-terminal's output into a shared buffer.
fn collect(mut reader: Box<dyn Read + Send>) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let out = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = reader.read(&mut chunk) {
            if n == 0 {
                break;
            }
            out.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn wait_for(buf: &Arc<Mutex<Vec<u8>>>, what: &str, mut retry: impl FnMut()) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
        if text.contains(what) {
            return;
        }
        assert!(Instant::now() < deadline, "never saw {what:?} in {text:?}");
        retry();
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn create_shows_one_updating_progress_line_on_a_terminal() {
    use portable_pty::{CommandBuilder, PtySize, native_pty_system};

    let p = Platform::start();
    let image = vibebox_tests::dev_image();
    let cli = Cli::new();
    cli.login_as_new_developer(&p, "gus");

    let pty = native_pty_system();
    let pair = pty
        .openpty(PtySize {
            rows: 30,
            cols: 120,
            pixel_width: 0,
            pixel_height: 0,
        })
        .expect("openpty");
    let mut cmd = CommandBuilder::new(BIN);
    cmd.args(["env", "create", "shown", "--image", &image]);
    cmd.env("VIBEBOX_CONFIG_DIR", cli.config.path());
    cmd.env("TERM", "xterm");
    let mut child = pair.slave.spawn_command(cmd).expect("spawn in pty");
    drop(pair.slave);
    let output = collect(pair.master.try_clone_reader().expect("reader"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for vibebox") {
            break status;
        }
        assert!(Instant::now() < deadline, "the create never finished");
        std::thread::sleep(Duration::from_millis(50));
    };
    wait_for(&output, "created shown (", || {});
    let text = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    assert!(status.success(), "{text:?}");
    // One line, rewritten in place (carriage return, erase line): the
    // state the create answered with, then cleared before the result.
    assert!(text.contains("\r\x1b[2K"), "{text:?}");
    assert!(text.contains("shown: creating"), "{text:?}");
    let result = text
        .lines()
        .find(|l| l.contains("created shown ("))
        .unwrap_or_default();
    assert!(result.trim_end().ends_with(": running"), "{text:?}");
    cli.ok(&["env", "rm", "shown"]);
}

#[test]
fn interactive_exec_through_a_pseudo_terminal() {
    use portable_pty::{CommandBuilder, PtySize, native_pty_system};

    let p = Platform::start();
    let image = vibebox_tests::dev_image();
    let cli = Cli::new();
    cli.login_as_new_developer(&p, "finn");
    cli.ok(&["env", "create", "tty", "--image", &image]);

    let pty = native_pty_system();
    let pair = pty
        .openpty(PtySize {
            rows: 30,
            cols: 100,
            pixel_width: 0,
            pixel_height: 0,
        })
        .expect("openpty");
    let mut cmd = CommandBuilder::new(BIN);
    cmd.args(["env", "exec", "-it", "tty", "--", "sh"]);
    cmd.env("VIBEBOX_CONFIG_DIR", cli.config.path());
    cmd.env("TERM", "xterm");
    let mut child = pair.slave.spawn_command(cmd).expect("spawn in pty");
    drop(pair.slave);
    let output = collect(pair.master.try_clone_reader().expect("reader"));
    let mut input = pair.master.take_writer().expect("writer");

    // The shell's prompt arrives; the initial size was forwarded.
    wait_for(&output, "$ ", || {});
    input.write_all(b"stty size\r").unwrap();
    wait_for(&output, "30 100", || {});
    // A resize is forwarded (SIGWINCH -> TerminalSize).
    pair.master
        .resize(PtySize {
            rows: 33,
            cols: 111,
            pixel_width: 0,
            pixel_height: 0,
        })
        .expect("resize");
    wait_for(&output, "33 111", || {
        let _ = input.write_all(b"stty size\r");
    });
    // Ctrl-C reaches the remote shell (interrupts `sleep`), not the CLI:
    // once the sleep runs in the container, Ctrl-C must end it and the
    // session must end promptly (a lost Ctrl-C would leave it asleep for
    // ten minutes).
    input.write_all(b"sleep 600\r").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cli
        .ok(&["env", "exec", "tty", "--", "ps"])
        .contains("sleep 600")
    {
        assert!(Instant::now() < deadline, "the remote sleep never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    input.write_all(&[3]).unwrap();
    input.write_all(b"echo hi; exit 7\r").unwrap();

    let interrupted = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for vibebox") {
            break status;
        }
        assert!(
            interrupted.elapsed() < Duration::from_secs(60),
            "Ctrl-C did not reach the remote shell: the session is still asleep: {}",
            String::from_utf8_lossy(&output.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.exit_code(),
        7,
        "{}",
        String::from_utf8_lossy(&output.lock().unwrap())
    );
    let text = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
    assert!(text.lines().any(|l| l.trim() == "hi"), "{text:?}");
    cli.ok(&["env", "rm", "tty"]);
}

#[test]
fn service_accounts_and_their_tokens_are_managed_and_listed_without_secrets() {
    let p = Platform::start();
    let cli = Cli::new();
    let token_file = p.data_dir().join("admin.token");
    cli.ok(&[
        "login",
        &format!("http://{}", p.gateway),
        "--name",
        "admin",
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    let admin_id = cli.json(&["whoami"])["user"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let sa = cli.json(&["sa", "create", "default", "ci-bot", "--role", "developer"]);
    let sa_id = sa[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(sa[0]["role"], "developer");
    let out = cli.ok(&["sa", "ls", "default"]);
    assert!(out.contains("ci-bot") && out.contains(&sa_id), "{out}");

    // The secret alone on stdout, once; it acts as the service account.
    let out = cli.run(&[
        "sa",
        "token",
        &sa_id,
        "--description",
        "pipeline",
        "--operation",
        "identity.whoami",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = stdout(&out).trim().to_owned();
    assert!(stderr(&out).contains("not shown again"), "{}", stderr(&out));
    let who = cli.run_with(&["whoami"], "", &[("VIBEBOX_TOKEN", secret.as_str())]);
    assert!(stdout(&who).contains("ci-bot"), "{}", stderr(&who));

    // Listed with owner, kind, restrictions and issuer; never the secret.
    let table = cli.ok(&["token", "ls", "--team", "default"]);
    assert!(table.starts_with("ID  "), "{table}");
    for want in [
        "ci-bot",
        "service_account",
        "pipeline",
        "ops=identity.whoami",
    ] {
        assert!(table.contains(want), "{want}: {table}");
    }
    let listed = cli.json(&["token", "ls", "--team", "default"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let token_id = listed[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(listed[0]["created_by"], admin_id.as_str());
    assert_eq!(listed[0]["owner_id"], sa_id.as_str());
    for shown in [&table, &listed.to_string()] {
        assert!(!shown.contains(&secret[..40]));
    }

    // Deleted: its token is revoked, listed only with --all.
    cli.ok(&["sa", "rm", &sa_id]);
    let listed = cli.json(&["token", "ls", "--team", "default"]);
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");
    let listed = cli.json(&["token", "ls", "--team", "default", "--all"]);
    assert_eq!(
        (listed[0]["id"].as_str(), listed[0]["revoked"].as_bool()),
        (Some(token_id.as_str()), Some(true))
    );
    let who = cli.run_with(&["whoami"], "", &[("VIBEBOX_TOKEN", secret.as_str())]);
    assert_eq!(who.status.code(), Some(1));
    assert!(stderr(&who).contains("UNAUTHENTICATED"), "{}", stderr(&who));
}
