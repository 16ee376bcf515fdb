//! The platform under test: the release `vibebox up` on a temporary data
//! directory with ephemeral ports (as `tests/src/lib.rs` starts it), its
//! clients, its memory, and the removal of every Docker object the run
//! labelled.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use bollard::Docker;
use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, ListVolumesOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder,
};
use futures::StreamExt;
use vibebox_server_kit::GrpcChannel;

/// The label every Docker object of a run carries (`vibebox.bench=<run>`).
pub(crate) const RUN_LABEL: &str = "vibebox.bench";

/// A running `vibebox up`.
pub(crate) struct Platform {
    child: Child,
    data_dir: tempfile::TempDir,
    /// Gateway address (`127.0.0.1:port`).
    pub(crate) gateway: String,
    /// The orchestrator's installation id (labels every object it creates).
    pub(crate) installation: String,
    /// Where the platform's stderr goes.
    pub(crate) log_file: PathBuf,
}

impl Platform {
    /// Starts `binary up` with `env` added to its environment and waits until
    /// it prints its gateway address.
    pub(crate) fn start(
        binary: &Path,
        run_id: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            binary.is_file(),
            "{} is missing: build it with `cargo build --profile bench-build -p vibebox -p vibebox-bench` (scripts/bench.sh does)",
            binary.display()
        );
        let data_dir = tempfile::Builder::new()
            .prefix("vibebox-bench-")
            .tempdir()
            .context("creating the data directory")?;
        let installation = format!("bench-{run_id}");
        let log_file = std::env::temp_dir().join(format!("vibebox-bench-{run_id}.log"));
        let log = std::fs::File::create(&log_file)
            .with_context(|| format!("creating {}", log_file.display()))?;
        let mut command = Command::new(binary);
        command
            .args([
                "up",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data_dir.path())
            .env("VIBEBOX_LOG", "warn")
            .env("VIBEBOX_INSTALLATION_ID", &installation)
            .env("VIBEBOX_DOCKER_LABELS", format!("{RUN_LABEL}={run_id}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().context("spawning vibebox up")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.trim().strip_prefix("gateway listening on ")
                    && let Some(addr) = rest.split_whitespace().next()
                {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let mut platform = Self {
            child,
            data_dir,
            gateway: String::new(),
            installation,
            log_file,
        };
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(addr) => platform.gateway = addr,
            Err(_) => {
                platform.terminate();
                let log = std::fs::read_to_string(&platform.log_file).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                bail!(
                    "vibebox up did not report its gateway address within 120 s; its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(platform)
    }

    pub(crate) fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// The bootstrap admin's token.
    pub(crate) fn admin_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.data_dir().join("admin.token"))
            .context("reading admin.token")?
            .trim()
            .to_owned())
    }

    /// A plaintext channel to the gateway (one HTTP/2 connection).
    pub(crate) fn channel(&self) -> anyhow::Result<GrpcChannel> {
        Ok(vibebox_server_kit::connect_plaintext(&format!(
            "http://{}",
            self.gateway
        ))?)
    }

    /// Resident memory of the `vibebox up` process (all five services).
    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        rss_of(self.child.id())
    }

    /// Where `vibebox up` serves an internal service (from `services.toml`).
    pub(crate) fn internal_url(&self, service: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.data_dir().join("services.toml")).ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == service).then(|| v.trim().trim_matches('"').to_owned())
        })
    }

    /// Stops the platform with SIGTERM (as Ctrl-C would) and waits for it.
    pub(crate) fn terminate(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.terminate();
        // Keep the platform's log only when it has something to say.
        if std::fs::metadata(&self.log_file).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&self.log_file);
        }
    }
}

/// `VmRSS` of a process, in bytes.
pub(crate) fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let kib: u64 = l
            .strip_prefix("VmRSS:")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib * 1024)
    })
}

/// Total RSS and count of the processes whose command line contains `needle`.
pub(crate) fn rss_of_processes(needle: &str) -> (u64, usize) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    let mut total = 0;
    let mut count = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if String::from_utf8_lossy(first).contains(needle)
            && let Some(rss) = rss_of(pid)
        {
            total += rss;
            count += 1;
        }
    }
    (total, count)
}

pub(crate) use vibebox_server_kit::Authed;

/// The interceptor authenticating as the holder of `token`.
pub(crate) fn bearer(token: &str) -> vibebox_server_kit::Bearer {
    vibebox_server_kit::Bearer::new(token).expect("a token fits in a header")
}

/// Removes every container, network and volume labelled with this run;
/// returns how many of each went.
pub(crate) async fn remove_labelled(
    docker: &Docker,
    run_id: &str,
) -> anyhow::Result<(usize, usize, usize)> {
    let filters: HashMap<String, Vec<String>> =
        HashMap::from([("label".to_string(), vec![format!("{RUN_LABEL}={run_id}")])]);
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await?;
    let ids: Vec<String> = containers.into_iter().filter_map(|c| c.id).collect();
    let n_containers = ids.len();
    futures::stream::iter(ids)
        .map(|id| async move {
            let rm = RemoveContainerOptionsBuilder::new()
                .force(true)
                .v(true)
                .build();
            let _ = docker.remove_container(&id, Some(rm)).await;
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    let networks = docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await?;
    let names: Vec<String> = networks.into_iter().filter_map(|n| n.id).collect();
    let n_networks = names.len();
    futures::stream::iter(names)
        .map(|id| async move {
            let _ = docker.remove_network(&id).await;
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    let volumes = docker
        .list_volumes(Some(
            ListVolumesOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await?;
    let names: Vec<String> = volumes
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.name)
        .collect();
    let n_volumes = names.len();
    futures::stream::iter(names)
        .map(|name| async move {
            let rm = RemoveVolumeOptionsBuilder::new().force(true).build();
            let _ = docker.remove_volume(&name, Some(rm)).await;
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    Ok((n_containers, n_networks, n_volumes))
}
