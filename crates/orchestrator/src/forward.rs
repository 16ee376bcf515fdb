//! Port forwarding: one TCP connection to a port inside a running
//! environment per stream, like `kubectl port-forward`.
//!
//! An environment's network is internal (no route from the orchestrator's
//! host) and a development server often listens on 127.0.0.1 only, so the
//! connection is made from inside the environment's network namespace: by a
//! platform-owned **forwarder** container that shares it
//! (`network_mode: container:<environment container>`). The forwarder is
//! created on demand at the first port-forward of a running environment and
//! removed when the environment stops, restarts or is deleted (and by
//! reconcile when its environment is not running; reconcile never takes it
//! for an impostor). It runs the helper image (`crate::helper_image`, the
//! egress gates' image) as uid 65532 with every capability dropped,
//! no-new-privileges, a read-only root, no mounts and small memory and
//! process limits, and idles (`vibebox_gate::idle_command`). A restarted
//! environment container has a new network namespace: the forwarder records
//! the start it joined and is recreated when that changed.
//!
//! Each connection is one Docker exec in the forwarder of
//! `vibebox_gate::connect_command("127.0.0.1", port)` ([`connect_command`]),
//! attached without a TTY: the client's bytes go to its stdin, its stdout
//! comes back (ready frames merged into messages of at most 64 KiB). The
//! helper writes nothing before it is connected; a failed connect prints one
//! line on stderr and exits 1, which ends the stream with
//! FAILED_PRECONDITION ("connection refused on port N inside the
//! environment"). `ready` is sent as soon as the exec is attached (before
//! the helper has connected): a refused connection therefore shows as
//! `ready` followed by that error.
//!
//! Half close both ways: `close_write` (or the end of the request stream)
//! closes the exec's stdin, and the helper shuts down the write side of the
//! connection; when the remote side closes, the helper flushes and exits,
//! and the stream ends.
//!
//! Every connection is audited twice (`environment.port_forward`): when it
//! opens (phase `open`, the port; before the helper is started, so a
//! connection held for days, or one cut by a crash of the orchestrator, has
//! a record from its start; no audit, no connection) and when it ends
//! (phase `close`, with the port, `bytes_in` (client to environment),
//! `bytes_out` (environment to client) and how it ended). At most
//! [`MAX_FORWARDS_PER_ENVIRONMENT`] connections per environment are open at
//! once; each holds an activity session (idle stop), taken before anything
//! is checked or started: refused while an automatic stop of the
//! environment is under way.
//!
//! The helper image can vanish while the orchestrator runs (another build's
//! import prunes the images of other builds that no container uses, see
//! `crate::helper_image`): a forwarder create the engine answers with 404
//! imports it again and retries once, as the egress gates do.
//!
//! A limit of the engine: a Docker exec is not killed when its client goes
//! away (the engine only closes its stdin). A helper whose client vanished
//! half-closes the connection and lives until the remote side closes too; if
//! it is still running two seconds later, the forwarder is marked, and it is
//! removed (with every helper in it) once the environment's last forward has
//! ended. It is recreated on demand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, RestartPolicy};
use bollard::query_parameters::{CreateContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use vibebox_proto::audit::{Outcome, Severity};

use crate::audit::{Caller, Event};
use crate::docker;
use crate::service::{Error, Orchestrator};
use crate::store::{EnvRecord, State};

pub use crate::egress::ROLE_LABEL;
/// [`ROLE_LABEL`] of a forwarder.
pub const FORWARDER_ROLE: &str = "forwarder";
/// Label of a forwarder: when the environment container it joined started
/// (a restarted container has a new network namespace, and the forwarder
/// is then stale).
const JOINED_START_LABEL: &str = "vibebox.forwarder.joined-start";

/// Connections open at once per environment.
pub const MAX_FORWARDS_PER_ENVIRONMENT: usize = 32;
/// Largest data message accepted from a client.
pub const MAX_DATA_BYTES: usize = 1024 * 1024;
/// Largest data message sent to a client.
const CHUNK_BYTES: usize = 64 * 1024;
/// Engine output frames taken at once when they are ready.
const READY_FRAMES: usize = 16;
/// The forwarder's user (not root, no name needed in the image).
const FORWARDER_USER: &str = "65532:65532";
const FORWARDER_MEMORY: i64 = 64 * 1024 * 1024;
/// The idle process, one helper per connection, and headroom for helpers
/// whose clients went away.
const FORWARDER_PIDS: i64 = 2 * MAX_FORWARDS_PER_ENVIRONMENT as i64 + 8;
/// Stderr kept from a helper (its one-line error).
const STDERR_BYTES: usize = 1024;
/// How long a helper whose client went away may take to end.
const LINGER: Duration = Duration::from_secs(2);

/// Argv, in the forwarder, of one connection to `port` inside the
/// environment.
pub fn connect_command(port: u16) -> Vec<String> {
    vibebox_gate::connect_command("127.0.0.1", port)
}

/// Container name of an environment's forwarder.
pub fn forwarder_name(environment_id: &str) -> String {
    format!("vibebox-fwd-{environment_id}")
}

/// The environment whose forwarder `c` is (by its role label and its name),
/// if it is one.
fn forwarder_of(c: &bollard::models::ContainerSummary) -> Option<String> {
    let labels = c.labels.as_ref()?;
    if labels.get(ROLE_LABEL).map(String::as_str) != Some(FORWARDER_ROLE) {
        return None;
    }
    let env = labels.get(docker::labels::ENVIRONMENT)?;
    let name = format!("/{}", forwarder_name(env));
    c.names
        .iter()
        .flatten()
        .any(|n| *n == name)
        .then(|| env.clone())
}

/// Whether a listed container is a forwarder.
pub(crate) fn is_forwarder(c: &bollard::models::ContainerSummary) -> bool {
    forwarder_of(c).is_some()
}

/// The forwarders among listed containers, as (container id, environment id).
pub(crate) fn forwarders_in(listed: &[bollard::models::ContainerSummary]) -> Vec<(String, String)> {
    listed
        .iter()
        .filter_map(|c| Some((c.id.clone()?, forwarder_of(c)?)))
        .collect()
}

/// Errors of a port-forward.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Orchestrator(#[from] Error),
    #[error(
        "at most {MAX_FORWARDS_PER_ENVIRONMENT} port-forward connections per environment may be open at once"
    )]
    TooMany,
    #[error("connection refused on port {port} inside the environment")]
    Refused { port: u16 },
    #[error("cannot connect to port {port} inside the environment: {reason}")]
    Unreachable { port: u16, reason: String },
    #[error("the port-forward helper image is unavailable: {0}")]
    HelperImage(String),
}

impl From<bollard::errors::Error> for ForwardError {
    fn from(e: bollard::errors::Error) -> Self {
        ForwardError::Orchestrator(Error::Docker(e))
    }
}

/// Result alias of this module.
pub type ForwardResult<T> = std::result::Result<T, ForwardError>;

/// What a client sends after the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardInput {
    /// Bytes for the connection.
    Data(Bytes),
    /// No more bytes from the client (half close).
    CloseWrite,
    /// The client broke the protocol (the stream ends with this error).
    Invalid { field: &'static str, reason: String },
    /// The client's stream failed (reset, cancelled).
    Aborted,
}

/// What a client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardOutput {
    /// The connection is attached (first message).
    Ready,
    /// Bytes from the connection.
    Data(Bytes),
}

/// Output stream of a port-forward.
pub type ForwardStream = std::pin::Pin<Box<dyn Stream<Item = ForwardResult<ForwardOutput>> + Send>>;

/// The port of a start message, checked.
pub fn port_of(port: u32) -> Result<u16, Error> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(Error::InvalidArgument {
            field: "start.port",
            reason: "must be a TCP port between 1 and 65535".into(),
        }),
    }
}

/// Open forwards per environment, and whether a helper outlived its client
/// there (process-wide: environment ids are unique).
#[derive(Debug, Default)]
struct Open {
    count: usize,
    lingering: bool,
}

static OPEN: LazyLock<Mutex<HashMap<String, Open>>> = LazyLock::new(Default::default);

fn open_map() -> std::sync::MutexGuard<'static, HashMap<String, Open>> {
    OPEN.lock().unwrap_or_else(|p| p.into_inner())
}

/// One open forward of an environment; dropping it releases the slot and,
/// when it was the last one and a helper outlived its client, removes the
/// forwarder.
struct Slot {
    orchestrator: Orchestrator,
    environment_id: String,
}

impl Slot {
    fn acquire(orchestrator: &Orchestrator, environment_id: &str) -> ForwardResult<Self> {
        let mut open = open_map();
        let entry = open.entry(environment_id.to_owned()).or_default();
        if entry.count >= MAX_FORWARDS_PER_ENVIRONMENT {
            return Err(ForwardError::TooMany);
        }
        entry.count += 1;
        Ok(Slot {
            orchestrator: orchestrator.clone(),
            environment_id: environment_id.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let reset = {
            let mut open = open_map();
            let Some(entry) = open.get_mut(&self.environment_id) else {
                return;
            };
            entry.count = entry.count.saturating_sub(1);
            if entry.count > 0 {
                false
            } else {
                let lingering = entry.lingering;
                open.remove(&self.environment_id);
                lingering
            }
        };
        if reset && let Ok(handle) = tokio::runtime::Handle::try_current() {
            let orchestrator = self.orchestrator.clone();
            let id = self.environment_id.clone();
            handle.spawn(async move {
                let _g = orchestrator.lock_env(&id).await;
                if open_map().get(&id).is_some_and(|o| o.count > 0) {
                    // A new forward started meanwhile: keep it (the next
                    // last one resets).
                    open_map().entry(id).or_default().lingering = true;
                    return;
                }
                tracing::debug!(environment = %id, "removing a forwarder with lingering helpers");
                if let Err(e) = orchestrator.remove_forwarder(&id).await {
                    tracing::warn!(environment = %id, error = %e, "cannot remove the forwarder");
                }
            });
        }
    }
}

fn mark_lingering(environment_id: &str) {
    if let Some(entry) = open_map().get_mut(environment_id) {
        entry.lingering = true;
    }
}

/// How a connection ended.
enum End {
    /// The helper exited (remote closed, or the connect failed).
    Helper,
    /// The client went away, or its stream failed.
    ClientGone,
    /// The client broke the protocol.
    Invalid { field: &'static str, reason: String },
    /// The engine's output stream failed.
    Engine(bollard::errors::Error),
}

impl Orchestrator {
    /// Removes an environment's forwarder (gone already is fine). Through
    /// the runtime seam, so lifecycle calls can use it on any engine.
    pub(crate) async fn remove_forwarder(&self, environment_id: &str) -> Result<(), Error> {
        match self
            .inner
            .runtime
            .remove_container(&forwarder_name(environment_id))
            .await
        {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(Error::Docker(e)),
        }
    }

    /// Like [`remove_forwarder`](Self::remove_forwarder), logging a failure
    /// instead of returning it (stop and restart must not fail for it:
    /// reconcile removes a forwarder left behind).
    pub(crate) async fn remove_forwarder_logged(&self, environment_id: &str) {
        if let Err(e) = self.remove_forwarder(environment_id).await {
            tracing::warn!(environment = %environment_id, error = %e, "cannot remove the forwarder");
        }
    }

    /// Removes the forwarders (found by reconcile, as (container id,
    /// environment id)) whose environment is not running; returns their
    /// names. `running` says whether an environment runs (or is busy with an
    /// operation, which then removes what it must).
    pub(crate) async fn sweep_forwarders(
        &self,
        forwarders: &[(String, String)],
        running: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut removed = Vec::new();
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        for (id, env) in forwarders.iter().filter(|(_, env)| !running(env)) {
            match self
                .docker()
                .remove_container(id, Some(options.clone()))
                .await
            {
                Ok(()) => {
                    tracing::info!(environment = %env, "removed the forwarder of an environment that is not running");
                    removed.push(format!("forwarder:{id}"));
                }
                Err(e) => tracing::warn!(environment = %env, error = %e, "cannot remove forwarder"),
            }
        }
        removed
    }

    /// The id of the running forwarder of a running environment, created
    /// (or recreated, when the environment's container restarted since)
    /// on demand.
    async fn forwarder(&self, rec: &EnvRecord) -> ForwardResult<String> {
        let cid = rec.container_id.clone().ok_or(Error::BadState {
            state: "creating",
            operation: "port-forward",
        })?;
        let target = self.docker().inspect_container(&cid, None).await?;
        let target_state = target.state.clone().unwrap_or_default();
        if target_state.running != Some(true) || target_state.restarting == Some(true) {
            return Err(Error::BadState {
                state: "not running",
                operation: "port-forward",
            }
            .into());
        }
        let cid = target.id.clone().unwrap_or(cid);
        let joined = target_state.started_at.clone().unwrap_or_default();
        let image = self.ensure_helper_image().await?;
        if let Some(id) = self.current_forwarder(rec, &cid, &joined, &image).await? {
            return Ok(id);
        }
        // Created under the environment's lock: serialized with stop,
        // restart and delete (which remove it) and with other creates;
        // never waiting for an operation in progress (refused instead).
        let (_g, rec) = self.lock_settled(&rec.id, "port-forward").await?;
        if rec.state != State::Running {
            return Err(Error::BadState {
                state: rec.state.as_str(),
                operation: "port-forward",
            }
            .into());
        }
        if let Some(id) = self.current_forwarder(&rec, &cid, &joined, &image).await? {
            return Ok(id);
        }
        self.remove_forwarder(&rec.id).await?;
        let name = forwarder_name(&rec.id);
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let body = forwarder_body(&self.target(&rec), &cid, &joined, &image);
        let created = match self
            .docker()
            .create_container(Some(options.clone()), body)
            .await
        {
            Ok(created) => created,
            // No such image: it went away since it was imported (another
            // build pruned it). Import it again, once.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404,
                message,
            }) => {
                tracing::info!(environment = %rec.id, %message, "the helper image is gone; importing it again");
                let image = self.reimport_helper_image().await?;
                let body = forwarder_body(&self.target(&rec), &cid, &joined, &image);
                self.docker().create_container(Some(options), body).await?
            }
            Err(e) => return Err(e.into()),
        };
        self.docker().start_container(&created.id, None).await?;
        tracing::debug!(environment = %rec.id, "forwarder started");
        Ok(created.id)
    }

    /// Imports the helper image again after the engine said it is missing;
    /// its reference. The reference names the executable it is built from,
    /// so it is the one the orchestrator keeps (`ensure_helper_image`).
    async fn reimport_helper_image(&self) -> ForwardResult<String> {
        let exe = match &self.inner.settings.egress.helper_executable {
            Some(p) => p.clone(),
            None => crate::helper_image::running_executable().map_err(|e| {
                ForwardError::HelperImage(format!("cannot find the running executable: {e}"))
            })?,
        };
        crate::helper_image::ensure(self.docker(), &exe)
            .await
            .map_err(|e| ForwardError::HelperImage(e.to_string()))
    }

    /// The forwarder, when it runs the current image in the namespace of
    /// the environment's current container; otherwise `None` (stale ones
    /// are removed by the caller).
    async fn current_forwarder(
        &self,
        rec: &EnvRecord,
        cid: &str,
        joined: &str,
        image: &str,
    ) -> ForwardResult<Option<String>> {
        let found = match self
            .docker()
            .inspect_container(&forwarder_name(&rec.id), None)
            .await
        {
            Ok(found) => found,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let labels = found
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let current = found.state.as_ref().and_then(|s| s.running) == Some(true)
            && found.config.as_ref().and_then(|c| c.image.as_deref()) == Some(image)
            && labels.get(JOINED_START_LABEL).map(String::as_str) == Some(joined)
            && labels.get(ROLE_LABEL).map(String::as_str) == Some(FORWARDER_ROLE)
            && found
                .host_config
                .as_ref()
                .and_then(|h| h.network_mode.clone())
                == Some(format!("container:{cid}"));
        Ok(current.then_some(found.id).flatten())
    }

    /// Opens one TCP connection to `port` inside a running environment:
    /// `input` feeds it, the returned stream starts with
    /// [`ForwardOutput::Ready`] and carries what comes back; it ends when
    /// the connection ends, with an error when it could not be made.
    pub async fn port_forward<I>(
        &self,
        caller: &Caller,
        environment_id: &str,
        port: u32,
        input: I,
    ) -> ForwardResult<ForwardStream>
    where
        I: Stream<Item = ForwardInput> + Send + Unpin + 'static,
    {
        let port = port_of(port)?;
        let rec = self.get(environment_id).await?;
        // An open forward is activity (idle stop). Taken before the checks:
        // refused while an automatic stop is under way (and one decided
        // after this is not, as long as the session lives).
        let session = self.live_session(&rec.id, "port-forward")?;
        crate::operations::not_in_progress(&rec, "port-forward")?;
        if rec.state != State::Running {
            return Err(Error::BadState {
                state: rec.state.as_str(),
                operation: "port-forward",
            }
            .into());
        }
        let slot = Slot::acquire(self, &rec.id)?;
        let forwarder = self.forwarder(&rec).await?;
        let audit = Audit {
            orchestrator: self,
            caller,
            rec: &rec,
            port,
        };
        // Audited at open (no record, no connection), and at close.
        audit.opened().await.map_err(Error::Audit)?;
        let (exec_id, output, stdin) = match self.attach(&forwarder, port).await {
            Ok(attached) => attached,
            Err(e) => {
                let closed = audit
                    .closed(Outcome::Failure, 0, 0, "engine error", Some(&e))
                    .await;
                if let Err(a) = closed {
                    tracing::warn!(environment = %rec.id, error = %a, "port-forward end not audited");
                }
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel::<ForwardResult<ForwardOutput>>(4);
        let connection = Connection {
            orchestrator: self.clone(),
            caller: caller.clone(),
            rec,
            port,
            exec_id,
        };
        // The connection outlives the call: keep its span, so that its
        // audit event carries the request's trace id.
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let helper_may_live = connection.run(output, stdin, input, tx).await;
                drop(session);
                // Still counted while the helper is checked on.
                if helper_may_live {
                    connection.check_linger().await;
                }
                drop(slot);
            },
            span,
        ));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// Starts the connection helper for `port` in the forwarder, attached:
    /// its exec id, output and stdin.
    async fn attach(
        &self,
        forwarder: &str,
        port: u16,
    ) -> ForwardResult<(String, ExecOutputStream, ExecInputSink)> {
        let created = self
            .docker()
            .create_exec(
                forwarder,
                CreateExecOptions::<String> {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(false),
                    cmd: Some(connect_command(port)),
                    ..Default::default()
                },
            )
            .await?;
        let exec_id = created.id;
        let started = self
            .docker()
            .start_exec(
                &exec_id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: Some(2 * CHUNK_BYTES),
                }),
            )
            .await?;
        match started {
            StartExecResults::Attached { output, input } => Ok((exec_id, output, input)),
            StartExecResults::Detached => Err(Error::InvalidArgument {
                field: "start",
                reason: "the connection detached unexpectedly".into(),
            }
            .into()),
        }
    }
}

/// The audit records of one connection (`environment.port_forward`).
struct Audit<'a> {
    orchestrator: &'a Orchestrator,
    caller: &'a Caller,
    rec: &'a EnvRecord,
    port: u16,
}

impl Audit<'_> {
    /// The connection opens (phase `open`).
    async fn opened(&self) -> Result<(), vibebox_audit_client::AuditClientError> {
        self.record(
            Outcome::Success,
            vec![
                ("port", self.port.to_string()),
                ("phase", "open".to_owned()),
            ],
        )
        .await
    }

    /// The connection ended (phase `close`): the bytes each way, how it
    /// ended, and the error the client got.
    async fn closed(
        &self,
        outcome: Outcome,
        bytes_in: u64,
        bytes_out: u64,
        how: &str,
        error: Option<&ForwardError>,
    ) -> Result<(), vibebox_audit_client::AuditClientError> {
        let mut details = vec![
            ("port", self.port.to_string()),
            ("phase", "close".to_owned()),
            ("bytes_in", bytes_in.to_string()),
            ("bytes_out", bytes_out.to_string()),
            ("end", how.to_owned()),
        ];
        if let Some(error) = error {
            details.push(("error", error.to_string()));
        }
        self.record(outcome, details).await
    }

    async fn record(
        &self,
        outcome: Outcome,
        details: Vec<(&'static str, String)>,
    ) -> Result<(), vibebox_audit_client::AuditClientError> {
        self.orchestrator
            .audit()
            .record(Event {
                action: "environment.port_forward",
                outcome,
                severity: Severity::Low,
                caller: Some(self.caller),
                team_id: &self.rec.team_id,
                environment_id: &self.rec.id,
                details,
            })
            .await
    }
}

/// The create body of an environment's forwarder.
fn forwarder_body(
    target: &docker::Target<'_>,
    container_id: &str,
    joined: &str,
    image: &str,
) -> ContainerCreateBody {
    let mut labels = docker::platform_labels(target);
    labels.insert(ROLE_LABEL.into(), FORWARDER_ROLE.into());
    labels.insert(JOINED_START_LABEL.into(), joined.into());
    ContainerCreateBody {
        image: Some(image.to_owned()),
        user: Some(FORWARDER_USER.into()),
        // The whole argv (the image's entrypoint is the bare executable).
        entrypoint: Some(vibebox_gate::idle_command()),
        cmd: None,
        env: Some(Vec::new()),
        labels: Some(labels),
        network_disabled: None,
        host_config: Some(HostConfig {
            network_mode: Some(format!("container:{container_id}")),
            privileged: Some(false),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            readonly_rootfs: Some(true),
            memory: Some(FORWARDER_MEMORY),
            memory_swap: Some(FORWARDER_MEMORY),
            pids_limit: Some(FORWARDER_PIDS),
            mounts: Some(Vec::new()),
            cgroupns_mode: Some(bollard::models::HostConfigCgroupnsModeEnum::PRIVATE),
            ipc_mode: Some("private".into()),
            restart_policy: Some(RestartPolicy {
                name: Some(bollard::models::RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_string(), "1m".to_string()),
                    ("max-file".to_string(), "1".to_string()),
                ])),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

type ExecOutputStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;
type ExecInputSink = std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// One attached connection.
struct Connection {
    orchestrator: Orchestrator,
    caller: Caller,
    rec: EnvRecord,
    port: u16,
    exec_id: String,
}

impl Connection {
    /// Relays until the connection ends and audits it; whether it ended
    /// without the helper exiting (the client went away or broke the
    /// protocol).
    async fn run<I>(
        &self,
        output: ExecOutputStream,
        stdin: ExecInputSink,
        input: I,
        tx: mpsc::Sender<ForwardResult<ForwardOutput>>,
    ) -> bool
    where
        I: Stream<Item = ForwardInput> + Send + Unpin + 'static,
    {
        let _ = tx.send(Ok(ForwardOutput::Ready)).await;
        // What the engine has ready is sent as fewer, larger messages
        // (nothing waits for more to arrive).
        let mut output = output.ready_chunks(READY_FRAMES);
        let received = Arc::new(AtomicU64::new(0));
        let mut pump = tokio::spawn(pump_input(input, stdin, Arc::clone(&received)));
        let mut pump_done = false;
        let mut bytes_out = 0u64;
        let mut stderr = Vec::new();
        let end = loop {
            tokio::select! {
                () = tx.closed() => break End::ClientGone,
                joined = &mut pump, if !pump_done => {
                    pump_done = true;
                    match joined {
                        Ok(None) => {}
                        Ok(Some(end)) => break end,
                        Err(_) => break End::ClientGone,
                    }
                }
                batch = output.next() => {
                    let Some(batch) = batch else { break End::Helper };
                    if let Some(end) = relay_batch(batch, &tx, &mut bytes_out, &mut stderr).await {
                        break end;
                    }
                }
            }
        };
        if !pump_done {
            pump.abort();
        }
        let bytes_in = received.load(Ordering::Relaxed);
        drop(output);
        let exit = match end {
            End::Helper => self.exit_code().await,
            _ => None,
        };
        let stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
        let (outcome, how, error) = self.judge(&end, exit, bytes_out, &stderr);
        let audited = Audit {
            orchestrator: &self.orchestrator,
            caller: &self.caller,
            rec: &self.rec,
            port: self.port,
        }
        .closed(outcome, bytes_in, bytes_out, how, error.as_ref())
        .await;
        let last = match (error, audited) {
            (Some(error), _) => Some(error),
            (None, Err(e)) => {
                tracing::warn!(environment = %self.rec.id, error = %e, "port-forward not audited");
                Some(ForwardError::Orchestrator(Error::Audit(e)))
            }
            (None, Ok(())) => None,
        };
        if let Some(error) = last {
            let _ = tx.send(Err(error)).await;
        }
        !matches!(end, End::Helper)
    }

    /// The helper's exit code, once it has exited.
    async fn exit_code(&self) -> Option<i64> {
        for _ in 0..40 {
            match self.orchestrator.docker().inspect_exec(&self.exec_id).await {
                Ok(i) if i.running == Some(true) => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Ok(i) => return i.exit_code,
                Err(_) => return None,
            }
        }
        None
    }

    /// Outcome, a word for how it ended, and the error the client gets.
    fn judge(
        &self,
        end: &End,
        exit: Option<i64>,
        bytes_out: u64,
        stderr: &str,
    ) -> (Outcome, &'static str, Option<ForwardError>) {
        let port = self.port;
        match end {
            End::Helper if exit == Some(0) => (Outcome::Success, "closed", None),
            End::Helper if bytes_out == 0 && stderr.to_ascii_lowercase().contains("refused") => (
                Outcome::Failure,
                "refused",
                Some(ForwardError::Refused { port }),
            ),
            End::Helper if bytes_out == 0 && !stderr.is_empty() => (
                Outcome::Failure,
                "unreachable",
                Some(ForwardError::Unreachable {
                    port,
                    reason: helper_reason(stderr),
                }),
            ),
            End::Helper => (
                Outcome::Failure,
                "failed",
                Some(ForwardError::Unreachable {
                    port,
                    reason: if stderr.is_empty() {
                        format!("the connection helper exited with {exit:?}")
                    } else {
                        helper_reason(stderr)
                    },
                }),
            ),
            End::ClientGone => (Outcome::Success, "client gone", None),
            End::Invalid { field, reason } => (
                Outcome::Failure,
                "invalid request",
                Some(ForwardError::Orchestrator(Error::InvalidArgument {
                    field,
                    reason: reason.clone(),
                })),
            ),
            End::Engine(e) => (
                Outcome::Failure,
                "engine error",
                Some(ForwardError::Orchestrator(Error::Docker(
                    bollard::errors::Error::DockerStreamError {
                        error: e.to_string(),
                    },
                ))),
            ),
        }
    }

    /// Checks, a little later, whether the helper outlived its client; if
    /// so the forwarder is reset once the environment's last forward ends.
    async fn check_linger(&self) {
        tokio::time::sleep(LINGER).await;
        if let Ok(i) = self.orchestrator.docker().inspect_exec(&self.exec_id).await
            && i.running == Some(true)
        {
            tracing::debug!(environment = %self.rec.id, "a port-forward helper outlived its client");
            mark_lingering(&self.rec.id);
        }
    }
}

/// The helper's error line, bounded and on one line.
fn helper_reason(stderr: &str) -> String {
    stderr
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

/// Relays a batch of the engine's output frames: stdout merged into
/// messages of at most [`CHUNK_BYTES`], stderr kept (bounded) for the
/// error; how the connection ended, if the batch ended it.
async fn relay_batch(
    batch: Vec<Result<LogOutput, bollard::errors::Error>>,
    tx: &mpsc::Sender<ForwardResult<ForwardOutput>>,
    bytes_out: &mut u64,
    stderr: &mut Vec<u8>,
) -> Option<End> {
    let mut pending = bytes::BytesMut::new();
    for item in batch {
        match item {
            Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                *bytes_out += message.len() as u64;
                if pending.is_empty() && message.len() >= CHUNK_BYTES {
                    if !send_chunks(tx, message).await {
                        return Some(End::ClientGone);
                    }
                    continue;
                }
                if pending.len() + message.len() > CHUNK_BYTES
                    && !send_chunks(tx, pending.split().freeze()).await
                {
                    return Some(End::ClientGone);
                }
                pending.extend_from_slice(&message);
            }
            Ok(LogOutput::StdErr { message }) => {
                let room = STDERR_BYTES.saturating_sub(stderr.len());
                stderr.extend_from_slice(&message[..message.len().min(room)]);
            }
            Ok(LogOutput::StdIn { .. }) => {}
            Err(e) => {
                if !pending.is_empty() {
                    let _ = send_chunks(tx, pending.split().freeze()).await;
                }
                return Some(End::Engine(e));
            }
        }
    }
    if !pending.is_empty() && !send_chunks(tx, pending.freeze()).await {
        return Some(End::ClientGone);
    }
    None
}

/// Sends `message` in chunks of at most [`CHUNK_BYTES`]; false when the
/// client is gone.
async fn send_chunks(tx: &mpsc::Sender<ForwardResult<ForwardOutput>>, message: Bytes) -> bool {
    let mut rest = message;
    while !rest.is_empty() {
        let chunk = rest.split_to(rest.len().min(CHUNK_BYTES));
        if tx.send(Ok(ForwardOutput::Data(chunk))).await.is_err() {
            return false;
        }
    }
    true
}

/// Feeds the client's bytes to the helper's stdin (counting them in
/// `received`) until the client half closes (stdin closed, the helper shuts
/// down its write side) or breaks the protocol; how the input ended the
/// connection, if it did.
async fn pump_input<I>(
    mut input: I,
    mut stdin: ExecInputSink,
    received: Arc<AtomicU64>,
) -> Option<End>
where
    I: Stream<Item = ForwardInput> + Send + Unpin + 'static,
{
    loop {
        match input.next().await {
            Some(ForwardInput::Data(data)) => {
                if data.len() > MAX_DATA_BYTES {
                    return Some(End::Invalid {
                        field: "data",
                        reason: format!("at most {MAX_DATA_BYTES} bytes per message"),
                    });
                }
                if data.is_empty() {
                    continue;
                }
                if stdin.write_all(&data).await.is_err() || stdin.flush().await.is_err() {
                    // The helper is gone; its output says why.
                    return None;
                }
                received.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Some(ForwardInput::CloseWrite) | None => {
                let _ = stdin.shutdown().await;
                // Anything after a half close is ignored until the
                // connection ends (or the client goes away).
                while let Some(item) = input.next().await {
                    if item == ForwardInput::Aborted {
                        return Some(End::ClientGone);
                    }
                }
                return None;
            }
            Some(ForwardInput::Invalid { field, reason }) => {
                return Some(End::Invalid { field, reason });
            }
            Some(ForwardInput::Aborted) => return Some(End::ClientGone),
        }
    }
}

impl From<ForwardError> for tonic::Status {
    fn from(e: ForwardError) -> Self {
        use vibebox_server_kit::status;
        match e {
            ForwardError::Orchestrator(e) => tonic::Status::from(e),
            e @ ForwardError::TooMany => status::quota_failure(
                &e.to_string(),
                "environment",
                "open port-forward connections",
            ),
            e @ ForwardError::Refused { .. } => status::precondition_failure(
                &e.to_string(),
                &[(
                    "port_forward.connection_refused",
                    "start.port",
                    "nothing listens on this port inside the environment",
                )],
            ),
            e @ ForwardError::Unreachable { .. } => status::precondition_failure(
                &e.to_string(),
                &[("port_forward.unreachable", "start.port", &e.to_string())],
            ),
            e @ ForwardError::HelperImage(_) => {
                status::unavailable("port-forward helper image", &e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_outside_1_to_65535_are_refused_naming_the_field() {
        for bad in [0, 65536, 70000, u32::MAX] {
            match port_of(bad) {
                Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "start.port"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert_eq!(port_of(1).unwrap(), 1);
        assert_eq!(port_of(65535).unwrap(), 65535);
    }

    #[test]
    fn the_forwarder_is_hardened_and_joins_the_environment() {
        let extra = vec![("vibebox.test".to_owned(), "run".to_owned())];
        let target = docker::Target {
            installation: "inst",
            environment_id: "env",
            team_id: "team",
            owner_id: "owner",
            policy_digest: "digest",
            extra_labels: &extra,
        };
        let body = forwarder_body(&target, "abc", "2026-01-01T00:00:00Z", "img:1");
        let h = body.host_config.as_ref().unwrap();
        assert_eq!(h.network_mode.as_deref(), Some("container:abc"));
        assert_eq!(h.cap_drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.privileged, Some(false));
        assert!(h.mounts.as_ref().unwrap().is_empty());
        assert!(h.binds.is_none());
        assert_eq!(h.pids_limit, Some(FORWARDER_PIDS));
        assert_eq!(h.memory, Some(FORWARDER_MEMORY));
        assert!(
            h.security_opt
                .as_ref()
                .unwrap()
                .contains(&"no-new-privileges:true".to_string())
        );
        assert_eq!(body.user.as_deref(), Some(FORWARDER_USER));
        let labels = body.labels.unwrap();
        assert_eq!(labels[ROLE_LABEL], FORWARDER_ROLE);
        assert_eq!(labels[docker::labels::ENVIRONMENT], "env");
        assert_eq!(labels[docker::labels::INSTALLATION], "inst");
        assert_eq!(labels["vibebox.test"], "run");
        assert_eq!(body.entrypoint, Some(vibebox_gate::idle_command()));
    }

    #[test]
    fn refusals_are_failed_preconditions_naming_the_port() {
        let s = tonic::Status::from(ForwardError::Refused { port: 8080 });
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            s.message(),
            "connection refused on port 8080 inside the environment"
        );
        assert_eq!(
            vibebox_server_kit::status::violated_rules(&s),
            ["port_forward.connection_refused"]
        );
        let s = tonic::Status::from(ForwardError::TooMany);
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        let s = tonic::Status::from(ForwardError::Orchestrator(Error::BadState {
            state: "stopped",
            operation: "port-forward",
        }));
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    }
}
