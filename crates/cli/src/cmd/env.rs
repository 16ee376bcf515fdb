//! `vibebox env ...`: create, ls, get, update, start/stop/restart/rm;
//! `logs`, `exec` and `stats` live in their own modules.
//!
//! Create, start, stop, restart and rm are long operations on the platform:
//! the call answers at once with the environment in its transitional state
//! (CREATING, STARTING, STOPPING, DELETING). The commands wait until it has
//! settled (`WaitEnvironment`, falling back to polling `GetEnvironment` on a
//! gateway that does not serve it), showing the progress on stderr, and
//! fail naming the reason when it ends FAILED; `--no-wait` prints the
//! transitional state and returns.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use vibebox_proto::environment::environment_service_client::EnvironmentServiceClient;
use vibebox_proto::environment::{
    ContainerSpec, CreateEnvironmentRequest, DeleteEnvironmentRequest, Environment,
    EnvironmentState, ExtendEnvironmentRequest, GetEnvironmentRequest, ListEnvironmentsRequest,
    RestartEnvironmentRequest, StartEnvironmentRequest, StopEnvironmentRequest,
    UpdateEnvironmentRequest, WaitEnvironmentRequest,
};
use vibebox_server_kit::Authed;

use crate::client::{CallError, CallExt, Session, all_pages};
use crate::cmd::team::resolve_team;
use crate::cmd::{exec, logs, stats};
use crate::config::Context;
use crate::output::{self, Format};
use crate::spec::{SpecFile, parse_memory_mb};

/// Environment commands.
#[derive(Subcommand, Debug)]
pub(crate) enum EnvCommand {
    /// Create an environment (from flags or a spec file) and wait until it runs.
    Create(CreateArgs),
    /// List environments.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Show one environment.
    Get(EnvArg),
    /// Change an environment in place: its name, its labels, its CPUs,
    /// memory and process limit (applied live, judged by policy and
    /// quotas).
    Update(UpdateArgs),
    /// Start a stopped environment and wait until it runs.
    Start(OpArgs),
    /// Stop a running environment and wait until it has stopped.
    Stop(StopArgs),
    /// Restart an environment and wait until it runs again.
    Restart(StopArgs),
    /// Delete an environment (its container, network and workspace) and
    /// wait until it is gone.
    #[command(alias = "delete")]
    Rm(OpArgs),
    /// Print an environment's logs.
    Logs(logs::LogsArgs),
    /// Run a command in an environment (`-it` for an interactive terminal).
    Exec(exec::ExecArgs),
    /// Show resource usage.
    Stats(stats::StatsArgs),
    /// Copy files or directories between an environment and here: SRC DST,
    /// one of them ENV:/path (like docker cp; `-` is a tar archive on
    /// stdin or stdout).
    Cp(crate::cmd::cp::CpArgs),
    /// Forward local ports to ports inside an environment (until Ctrl-C).
    PortForward(crate::cmd::forward::PortForwardArgs),
    /// Keep an environment from stopping when idle (and push its expiry) for a while.
    Extend(ExtendArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ExtendArgs {
    /// Environment id or name.
    env: String,
    /// How long from now, e.g. 30m, 2h, 1d (1m to 7 days; the expiry stays within the policy's maximum lifetime).
    #[arg(long = "for", value_name = "DURATION")]
    duration: String,
}

/// An environment, by id or name.
#[derive(Args, Debug)]
pub(crate) struct EnvArg {
    /// Environment id or name.
    pub(crate) env: String,
}

/// An environment to start or delete.
#[derive(Args, Debug)]
pub(crate) struct OpArgs {
    /// Environment id or name.
    env: String,
    /// Return as soon as the platform accepted the change, printing the
    /// transitional state (STARTING, DELETING), instead of waiting.
    #[arg(long)]
    no_wait: bool,
}

#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// Name of the environment (or `name` in the spec file).
    name: Option<String>,
    /// Spec file (TOML, or JSON by extension) mirroring ContainerSpec.
    #[arg(short, long)]
    file: Option<PathBuf>,
    /// Image (overrides the spec file).
    #[arg(long)]
    image: Option<String>,
    /// CPUs, e.g. 1.5.
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory, e.g. 512m or 2g.
    #[arg(long)]
    memory: Option<String>,
    /// Maximum number of processes.
    #[arg(long)]
    pids_limit: Option<i64>,
    /// Environment variables KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env_vars: Vec<String>,
    /// Labels of the environment KEY=VALUE (repeatable), for `env ls
    /// --filter 'labels.KEY = VALUE'`.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Working directory.
    #[arg(short, long)]
    workdir: Option<String>,
    /// Team id or name (default: the context's team, or your only team).
    #[arg(long)]
    team: Option<String>,
    /// Return as soon as the platform accepted the create, printing the
    /// CREATING state, instead of waiting until the environment runs.
    #[arg(long)]
    no_wait: bool,
    /// Command to run (default: the image's).
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct LsArgs {
    /// Only this team (id or name).
    #[arg(long)]
    team: Option<String>,
    /// Include deleted environments.
    #[arg(short, long)]
    all: bool,
    /// Only the environments this filter selects, e.g. `state = RUNNING AND
    /// labels.ci = "true"` (fields: name, id, owner_id, team_id, state,
    /// image, create_time, update_time, labels.KEY; see the API reference).
    #[arg(long, value_name = "EXPR")]
    filter: Option<String>,
    /// Sort order, e.g. `name` or `state, create_time desc` (create_time,
    /// update_time, name, state; default: newest first).
    #[arg(long, value_name = "EXPR")]
    order_by: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct UpdateArgs {
    /// Environment id or name.
    env: String,
    /// New name.
    #[arg(long)]
    name: Option<String>,
    /// Set a label KEY=VALUE, keeping the other labels (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Remove every label (with --label: the labels become exactly those
    /// given).
    #[arg(long)]
    clear_labels: bool,
    /// CPUs, e.g. 1.5.
    #[arg(long, visible_alias = "cpu", value_name = "X")]
    cpus: Option<f64>,
    /// Memory, e.g. 512m or 2g (a bare number is MiB).
    #[arg(long, value_name = "MB")]
    memory: Option<String>,
    /// Maximum number of processes.
    #[arg(long, visible_alias = "pids-limit", value_name = "N")]
    pids: Option<i64>,
}

#[derive(Args, Debug)]
pub(crate) struct StopArgs {
    /// Environment id or name.
    env: String,
    /// Seconds to wait before killing.
    #[arg(short, long)]
    timeout: Option<u32>,
    /// Return as soon as the platform accepted the change, printing the
    /// transitional state (STOPPING), instead of waiting.
    #[arg(long)]
    no_wait: bool,
}

/// What `env get`/`ls -o json` print.
#[derive(Serialize)]
pub(crate) struct EnvView {
    id: String,
    name: String,
    team_id: String,
    owner_id: String,
    state: String,
    image: String,
    canonical_image: String,
    cpu: Option<f64>,
    memory_mb: Option<i64>,
    pids_limit: Option<i64>,
    command: Vec<String>,
    policy_version: String,
    policy_digest: String,
    create_time: String,
    update_time: String,
    status_message: String,
    failure_reason: String,
    /// Why the platform stopped or deleted it (idle, lifetime).
    stop_reason: String,
    last_activity_time: String,
    idle_stop_time: String,
    expire_time: String,
    /// Labels of the environment itself.
    labels: BTreeMap<String, String>,
}

fn state_name(state: i32) -> String {
    EnvironmentState::try_from(state)
        .map(|s| output::enum_name(s.as_str_name(), "ENVIRONMENT_STATE_"))
        .unwrap_or_else(|_| state.to_string())
}

impl From<&Environment> for EnvView {
    fn from(e: &Environment) -> Self {
        let spec = e.spec.clone().unwrap_or_default();
        Self {
            id: e.id.clone(),
            name: e.name.clone(),
            team_id: e.team_id.clone(),
            owner_id: e.owner_id.clone(),
            state: state_name(e.state),
            image: spec.image,
            canonical_image: e.canonical_image.clone(),
            cpu: spec.cpu_limit,
            memory_mb: spec.memory_limit_mb,
            pids_limit: spec.pids_limit,
            command: spec.command,
            policy_version: e.policy_version.clone(),
            policy_digest: e.policy_digest.clone(),
            create_time: output::time(e.create_time.as_ref()),
            update_time: output::time(e.update_time.as_ref()),
            status_message: e.status_message.clone(),
            failure_reason: e.failure_reason.clone(),
            stop_reason: e.stop_reason.clone(),
            last_activity_time: output::time(e.last_activity_time.as_ref()),
            idle_stop_time: output::time(e.idle_stop_time.as_ref()),
            expire_time: output::time(e.expire_time.as_ref()),
            labels: e.labels.clone().into_iter().collect(),
        }
    }
}

/// A time relative to now: `in 25m`, `3h ago`, `-` when unset.
fn relative(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = ts else {
        return "-".to_owned();
    };
    let secs = t.seconds - chrono::Utc::now().timestamp();
    let span = |s: i64| match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        s => format!("{}d", s / 86400),
    };
    if secs >= 0 {
        format!("in {}", span(secs))
    } else {
        format!("{} ago", span(-secs))
    }
}

fn print_env(e: &Environment, format: Format) {
    let v = EnvView::from(e);
    if format == Format::Json {
        return output::json(&v);
    }
    let opt = |o: Option<String>| o.unwrap_or_else(|| "-".to_owned());
    let mut pairs = vec![
        ("id", v.id),
        ("name", v.name),
        ("state", v.state),
        ("team", v.team_id),
        ("owner", v.owner_id),
        ("image", v.image),
        ("canonical image", v.canonical_image),
        ("cpu", opt(v.cpu.map(|c| c.to_string()))),
        ("memory", opt(v.memory_mb.map(|m| format!("{m} MiB")))),
        ("pids limit", opt(v.pids_limit.map(|p| p.to_string()))),
        (
            "policy",
            format!("{} {}", v.policy_version, v.policy_digest),
        ),
        ("created", v.create_time),
        ("updated", v.update_time),
    ];
    if !v.labels.is_empty() {
        let labels: Vec<String> = v.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.push(("labels", labels.join(", ")));
    }
    if !v.status_message.is_empty() {
        pairs.push(("status", v.status_message));
    }
    if !v.failure_reason.is_empty() {
        pairs.push(("failure", v.failure_reason));
    }
    if !v.stop_reason.is_empty() {
        pairs.push(("stop reason", v.stop_reason));
    }
    let when = |s: String, ts| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            format!("{s} ({})", relative(ts))
        }
    };
    pairs.push((
        "last activity",
        when(v.last_activity_time, e.last_activity_time.as_ref()),
    ));
    pairs.push((
        "idle stop",
        when(v.idle_stop_time, e.idle_stop_time.as_ref()),
    ));
    pairs.push(("expires", when(v.expire_time, e.expire_time.as_ref())));
    output::fields(&pairs);
}

pub(crate) fn parse_kv(items: &[String]) -> Result<std::collections::BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow!("{kv:?} is not KEY=VALUE"))
        })
        .collect()
}

/// What a listing asks for.
#[derive(Debug, Clone, Default)]
struct Listing {
    /// Empty: every team of the caller.
    team_id: String,
    show_deleted: bool,
    filter: String,
    order_by: String,
}

/// All environments a listing selects (every page; a page may be short,
/// even empty, with a token to go on).
async fn list_all(session: &Session, listing: Listing) -> Result<Vec<Environment>> {
    let client = session.environments();
    all_pages(|page_token| {
        let (mut client, listing) = (client.clone(), listing.clone());
        async move {
            let r = client
                .list_environments(ListEnvironmentsRequest {
                    filter: listing.filter,
                    order_by: listing.order_by,
                    team_id: listing.team_id,
                    page_size: 200,
                    page_token,
                    show_deleted: listing.show_deleted,
                })
                .await
                .call()?;
            Ok((r.environments, r.next_page_token))
        }
    })
    .await
}

/// A filter value quoted for `ListEnvironments` (`"..."`, with `\\`, `\"`
/// and `\*` escaped: matched exactly, never as a prefix).
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '\\' | '"' | '*') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Resolves an environment id or name to an id.
pub(crate) async fn resolve_env(session: &Session, env: &str) -> Result<String> {
    if uuid::Uuid::parse_str(env).is_ok() {
        return Ok(env.to_owned());
    }
    let listing = Listing {
        filter: format!("name = {}", quoted(env)),
        ..Listing::default()
    };
    let matches: Vec<_> = list_all(session, listing)
        .await?
        .into_iter()
        .filter(|e| e.name == env)
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => bail!("no environment named {env:?} (see `vibebox env ls`)"),
        many => bail!(
            "{} environments are named {env:?}; use an id ({})",
            many.len(),
            many.iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs an `env` subcommand.
pub(crate) async fn run(
    cmd: EnvCommand,
    session: &Session,
    ctx: &Context,
    format: Format,
) -> Result<ExitCode> {
    let mut client = session.environments();
    match cmd {
        EnvCommand::Create(args) => return create(args, session, ctx, format).await,
        EnvCommand::Ls(args) => {
            let team_id = match &args.team {
                Some(t) => resolve_team(session, Some(t), None).await?,
                None => String::new(),
            };
            let listing = Listing {
                team_id,
                show_deleted: args.all,
                filter: args.filter.unwrap_or_default(),
                order_by: args.order_by.unwrap_or_default(),
            };
            let envs = list_all(session, listing).await?;
            if format == Format::Json {
                output::json(&envs.iter().map(EnvView::from).collect::<Vec<_>>());
            } else {
                let rows: Vec<Vec<String>> = envs
                    .iter()
                    .map(|e| {
                        let v = EnvView::from(e);
                        vec![
                            v.id,
                            v.name,
                            v.state,
                            v.image,
                            v.team_id,
                            v.create_time,
                            relative(e.idle_stop_time.as_ref()),
                            relative(e.expire_time.as_ref()),
                            if v.stop_reason.is_empty() {
                                "-".to_owned()
                            } else {
                                v.stop_reason
                            },
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "ID",
                        "NAME",
                        "STATE",
                        "IMAGE",
                        "TEAM",
                        "CREATED",
                        "IDLE STOP",
                        "EXPIRES",
                        "REASON",
                    ],
                    &rows,
                );
            }
        }
        EnvCommand::Get(a) => {
            let id = resolve_env(session, &a.env).await?;
            let resp = client
                .get_environment(GetEnvironmentRequest { environment_id: id })
                .await
                .call()?;
            print_env(&resp.environment.unwrap_or_default(), format);
        }
        EnvCommand::Update(a) => {
            // Checked before anything is asked of the platform.
            update_request(String::new(), &a, None)?;
            let id = resolve_env(session, &a.env).await?;
            // `--label` keeps the other labels: the mask's `labels` replaces
            // them all, so the current ones are read first.
            let current = if !a.labels.is_empty() && !a.clear_labels {
                let got = client
                    .get_environment(GetEnvironmentRequest {
                        environment_id: id.clone(),
                    })
                    .await
                    .call()?;
                Some(got.environment.unwrap_or_default().labels)
            } else {
                None
            };
            let request = update_request(id, &a, current.as_ref())?;
            let resp = client.update_environment(request).await.call()?;
            print_env(&resp.environment.unwrap_or_default(), format);
        }
        EnvCommand::Start(a) => {
            let id = resolve_env(session, &a.env).await?;
            let resp = client
                .start_environment(StartEnvironmentRequest { environment_id: id })
                .await
                .call()?;
            let op = Operation::START;
            finish(&mut client, resp.environment, op, a.no_wait, format).await?;
        }
        EnvCommand::Stop(a) => {
            let id = resolve_env(session, &a.env).await?;
            let resp = client
                .stop_environment(StopEnvironmentRequest {
                    environment_id: id,
                    timeout_seconds: a.timeout,
                })
                .await
                .call()?;
            let op = Operation::STOP;
            finish(&mut client, resp.environment, op, a.no_wait, format).await?;
        }
        EnvCommand::Restart(a) => {
            let id = resolve_env(session, &a.env).await?;
            let resp = client
                .restart_environment(RestartEnvironmentRequest {
                    environment_id: id,
                    timeout_seconds: a.timeout,
                })
                .await
                .call()?;
            let op = Operation::RESTART;
            finish(&mut client, resp.environment, op, a.no_wait, format).await?;
        }
        EnvCommand::Rm(a) => {
            let id = resolve_env(session, &a.env).await?;
            let resp = client
                .delete_environment(DeleteEnvironmentRequest { environment_id: id })
                .await
                .call()?;
            let op = Operation::DELETE;
            finish(&mut client, resp.environment, op, a.no_wait, format).await?;
        }
        EnvCommand::Logs(a) => logs::run(a, session).await?,
        EnvCommand::Stats(a) => stats::run(a, session, format).await?,
        EnvCommand::Exec(a) => return exec::run(a, session).await,
        EnvCommand::Cp(a) => return crate::cmd::cp::run(a, session).await,
        EnvCommand::PortForward(a) => return crate::cmd::forward::run(a, session).await,
        EnvCommand::Extend(a) => {
            let duration = output::parse_duration(&a.duration)?;
            let id = resolve_env(session, &a.env).await?;
            let resp = client
                .extend_environment(ExtendEnvironmentRequest {
                    environment_id: id,
                    duration: Some(prost_types::Duration {
                        seconds: duration.num_seconds(),
                        nanos: 0,
                    }),
                })
                .await
                .call()?;
            let env = resp.environment.unwrap_or_default();
            if format == Format::Json {
                output::json(&EnvView::from(&env));
            } else {
                let mut until = String::new();
                if let Some(t) = &env.idle_stop_time {
                    until += &format!("; idle stop {}", output::time(Some(t)));
                }
                if let Some(t) = &env.expire_time {
                    until += &format!("; expires {}", output::time(Some(t)));
                }
                println!(
                    "extended {} ({}) for {}{until}",
                    env.name, env.id, a.duration
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The `UpdateEnvironment` request of `env update` for environment `id`:
/// the new values and the mask naming exactly the fields given (`name`,
/// `labels`, `spec.cpu_limit`, `spec.memory_limit_mb`, `spec.pids_limit`,
/// in that order). `--label` adds to `current` (the labels the environment
/// has; `None` with `--clear-labels`, or when no label is given).
fn update_request(
    id: String,
    args: &UpdateArgs,
    current: Option<&BTreeMap<String, String>>,
) -> Result<UpdateEnvironmentRequest> {
    let mut paths = Vec::new();
    let mut environment = Environment {
        id,
        ..Environment::default()
    };
    if let Some(name) = &args.name {
        if name.trim().is_empty() {
            bail!("--name must not be empty");
        }
        environment.name = name.clone();
        paths.push("name");
    }
    if args.clear_labels || !args.labels.is_empty() {
        let mut labels = match (args.clear_labels, current) {
            (false, Some(current)) => current.clone(),
            _ => BTreeMap::new(),
        };
        labels.extend(parse_kv(&args.labels).map_err(|e| anyhow!("--label: {e}"))?);
        environment.labels = labels;
        paths.push("labels");
    }
    let mut spec = ContainerSpec::default();
    if let Some(cpus) = args.cpus {
        if !(cpus.is_finite() && cpus > 0.0) {
            bail!("--cpus must be a positive number of CPUs, e.g. 0.5 or 2");
        }
        spec.cpu_limit = Some(cpus);
        paths.push("spec.cpu_limit");
    }
    if let Some(memory) = &args.memory {
        spec.memory_limit_mb = Some(parse_memory_mb(memory).map_err(|e| anyhow!("--memory: {e}"))?);
        paths.push("spec.memory_limit_mb");
    }
    if let Some(pids) = args.pids {
        if pids <= 0 {
            bail!("--pids must be a positive number of processes");
        }
        spec.pids_limit = Some(pids);
        paths.push("spec.pids_limit");
    }
    if paths.is_empty() {
        bail!(
            "nothing to update: give --name, --label, --clear-labels, --cpus, --memory or --pids"
        );
    }
    if paths.iter().any(|p| p.starts_with("spec.")) {
        environment.spec = Some(spec);
    }
    Ok(UpdateEnvironmentRequest {
        environment: Some(environment),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.into_iter().map(str::to_owned).collect(),
        }),
        request_id: uuid::Uuid::new_v4().to_string(),
    })
}

fn done(env: &Environment, format: Format, verb: &str) {
    if format == Format::Json {
        output::json(&EnvView::from(env));
    } else {
        println!(
            "{verb} {} ({}): {}",
            env.name,
            env.id,
            state_name(env.state)
        );
    }
}

/// A long operation as the CLI reports it.
#[derive(Clone, Copy)]
struct Operation {
    /// What is printed once it is done (`started web (id): running`).
    done: &'static str,
    /// What is printed with `--no-wait` (`starting web (id): starting`).
    accepted: &'static str,
    /// The state it ends in when it succeeds.
    target: EnvironmentState,
}

impl Operation {
    const CREATE: Operation = Operation {
        done: "created",
        accepted: "creating",
        target: EnvironmentState::Running,
    };
    const START: Operation = Operation {
        done: "started",
        accepted: "starting",
        target: EnvironmentState::Running,
    };
    const STOP: Operation = Operation {
        done: "stopped",
        accepted: "stopping",
        target: EnvironmentState::Stopped,
    };
    const RESTART: Operation = Operation {
        done: "restarted",
        accepted: "restarting",
        target: EnvironmentState::Running,
    };
    const DELETE: Operation = Operation {
        done: "deleted",
        accepted: "deleting",
        target: EnvironmentState::Deleted,
    };
}

/// `timeout` of one `WaitEnvironment` call when the progress is not shown
/// live (stderr is not a terminal): below the gateway's deadline.
const WAIT_CALL: Duration = Duration::from_secs(25);
/// `timeout` of one `WaitEnvironment` call on a terminal: short, so that the
/// progress line follows the operation (each answer is the environment as
/// it is then).
const WAIT_CALL_LIVE: Duration = Duration::from_secs(2);
/// Time between `GetEnvironment` polls on a gateway without
/// `WaitEnvironment`.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Time between two frames of the spinner.
const SPIN_INTERVAL: Duration = Duration::from_millis(100);

/// Whether `state` is one a long operation passes through.
fn transitional(state: i32) -> bool {
    [
        EnvironmentState::Creating,
        EnvironmentState::Starting,
        EnvironmentState::Stopping,
        EnvironmentState::Deleting,
    ]
    .iter()
    .any(|s| *s as i32 == state)
}

/// Waits until `env` has settled (it is not CREATING, STARTING, STOPPING
/// or DELETING), showing its progress: `WaitEnvironment` in a loop with a
/// per-call timeout, or `GetEnvironment` polls while the gateway answers
/// UNIMPLEMENTED.
async fn wait_settled(
    client: &mut EnvironmentServiceClient<Authed>,
    mut env: Environment,
    progress: &Progress,
) -> Result<Environment> {
    let mut wait_served = true;
    loop {
        if !transitional(env.state) {
            return Ok(env);
        }
        progress.show(&env);
        let next = if wait_served {
            let timeout = if progress.tty {
                WAIT_CALL_LIVE
            } else {
                WAIT_CALL
            };
            let mut request = tonic::Request::new(WaitEnvironmentRequest {
                environment_id: env.id.clone(),
                timeout: Some(prost_types::Duration {
                    seconds: timeout.as_secs() as i64,
                    nanos: 0,
                }),
            });
            request.set_timeout(timeout + Duration::from_secs(10));
            match progress.spin_while(client.wait_environment(request)).await {
                Ok(answer) => answer.into_inner().environment,
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    wait_served = false;
                    continue;
                }
                // Our own deadline or the gateway's: ask again.
                Err(s) if s.code() == tonic::Code::DeadlineExceeded => {
                    progress.spin_while(tokio::time::sleep(POLL_INTERVAL)).await;
                    continue;
                }
                Err(s) => return Err(CallError(s).into()),
            }
        } else {
            progress.spin_while(tokio::time::sleep(POLL_INTERVAL)).await;
            client
                .get_environment(GetEnvironmentRequest {
                    environment_id: env.id.clone(),
                })
                .await
                .call()?
                .environment
        };
        env = next.ok_or_else(|| anyhow!("the platform answered without the environment"))?;
    }
}

/// After a long operation was accepted: prints the transitional state
/// (`--no-wait`), or waits until the environment has settled and prints
/// it; an environment that did not end where the operation leads (FAILED,
/// with its reason) is an error (non-zero exit).
async fn finish(
    client: &mut EnvironmentServiceClient<Authed>,
    env: Option<Environment>,
    op: Operation,
    no_wait: bool,
    format: Format,
) -> Result<()> {
    let env = env.ok_or_else(|| anyhow!("the platform answered without the environment"))?;
    if no_wait {
        done(&env, format, op.accepted);
        return Ok(());
    }
    let progress = Progress::new(&env.name);
    let settled = wait_settled(client, env, &progress).await;
    progress.finish();
    let env = settled?;
    if env.state == op.target as i32 {
        done(&env, format, op.done);
        return Ok(());
    }
    if format == Format::Json {
        output::json(&EnvView::from(&env));
    }
    let reason = if env.failure_reason.is_empty() {
        &env.status_message
    } else {
        &env.failure_reason
    };
    if env.state == EnvironmentState::Failed as i32 {
        bail!("environment {} ({}) failed: {reason}", env.name, env.id);
    }
    bail!(
        "environment {} ({}) is {}, not {}{}",
        env.name,
        env.id,
        state_name(env.state),
        state_name(op.target as i32),
        if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        }
    );
}

async fn create(
    args: CreateArgs,
    session: &Session,
    ctx: &Context,
    format: Format,
) -> Result<ExitCode> {
    let mut file = match &args.file {
        Some(path) => SpecFile::read(path)?,
        None => SpecFile::default(),
    };
    if let Some(image) = args.image {
        file.image = image;
    }
    if file.image.is_empty() {
        bail!("an image is required: --image IMAGE or `image` in --file");
    }
    if let Some(cpu) = args.cpu {
        file.cpu = Some(cpu);
    }
    if let Some(mem) = &args.memory {
        file.memory_mb = Some(parse_memory_mb(mem)?);
    }
    if let Some(p) = args.pids_limit {
        file.pids_limit = Some(p);
    }
    file.env.extend(parse_kv(&args.env_vars)?);
    if let Some(w) = args.workdir {
        file.working_dir = w;
    }
    if !args.command.is_empty() {
        file.command = args.command;
    }
    let name = args
        .name
        .or_else(|| file.name.clone())
        .ok_or_else(|| anyhow!("a name is required: vibebox env create NAME"))?;
    let team = args.team.or_else(|| file.team.clone());
    let team_id = resolve_team(session, team.as_deref(), ctx.team.as_deref()).await?;
    let spec: ContainerSpec = file.to_proto()?;
    let labels = parse_kv(&args.labels)?;

    let progress = Progress::new(&name);
    progress.say("submitting to the policy and the orchestrator");
    let mut client = session.environments();
    let created = progress
        .spin_while(client.create_environment(CreateEnvironmentRequest {
            labels,
            request_id: uuid::Uuid::new_v4().to_string(),
            team_id,
            name: name.clone(),
            spec: Some(spec),
        }))
        .await
        .call();
    progress.finish();
    let created = created?;
    finish(
        &mut client,
        created.environment,
        Operation::CREATE,
        args.no_wait,
        format,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// Progress on stderr: one updating line with a spinner on a terminal,
/// plain lines otherwise.
struct Progress {
    name: String,
    tty: bool,
    frame: std::cell::Cell<usize>,
    message: std::cell::RefCell<String>,
}

/// How an environment's progress reads: its state, then (while an
/// operation runs) the percentage and the status message, e.g.
/// `creating 40% pulling image vibebox/devbox:1`.
fn progress_text(env: &Environment) -> String {
    let mut text = state_name(env.state);
    if transitional(env.state) && (1..100).contains(&env.progress_percent) {
        text.push_str(&format!(" {}%", env.progress_percent));
    }
    if !env.status_message.is_empty() {
        text.push(' ');
        text.push_str(&env.status_message);
    }
    text
}

impl Progress {
    const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            tty: std::io::stderr().is_terminal(),
            frame: Default::default(),
            message: Default::default(),
        }
    }

    /// Shows `env`'s progress when it changed.
    fn show(&self, env: &Environment) {
        let text = progress_text(env);
        if *self.message.borrow() != text {
            self.say(&text);
        }
    }

    /// Runs `fut`, turning the spinner meanwhile (on a terminal).
    async fn spin_while<F: std::future::Future>(&self, fut: F) -> F::Output {
        if !self.tty {
            return fut.await;
        }
        let mut fut = std::pin::pin!(fut);
        let mut spin = tokio::time::interval(SPIN_INTERVAL);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                _ = spin.tick() => self.tick(),
            }
        }
    }

    fn say(&self, msg: &str) {
        *self.message.borrow_mut() = msg.to_owned();
        if self.tty {
            self.tick();
        } else {
            eprintln!("{}: {msg}", self.name);
        }
    }

    fn tick(&self) {
        if !self.tty {
            return;
        }
        let f = self.frame.get();
        self.frame.set(f + 1);
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r\x1b[2K{} {}: {}",
            Self::FRAMES[f % Self::FRAMES.len()],
            self.name,
            self.message.borrow()
        );
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Update {
        #[command(flatten)]
        args: UpdateArgs,
    }

    fn args(argv: &[&str]) -> UpdateArgs {
        Update::try_parse_from(["update", "web"].iter().chain(argv))
            .unwrap()
            .args
    }

    fn mask(request: &UpdateEnvironmentRequest) -> Vec<&str> {
        request
            .update_mask
            .as_ref()
            .unwrap()
            .paths
            .iter()
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn update_masks_name_exactly_the_fields_given() {
        let current = BTreeMap::from([
            ("ci".to_owned(), "true".to_owned()),
            ("tier".to_owned(), "front".to_owned()),
        ]);
        let all = args(&[
            "--name",
            "web-2",
            "--label",
            "tier=back",
            "--label",
            "new=1",
            "--cpus",
            "1.5",
            "--memory",
            "1g",
            "--pids",
            "200",
        ]);
        let r = update_request("id-1".into(), &all, Some(&current)).unwrap();
        assert_eq!(
            mask(&r),
            [
                "name",
                "labels",
                "spec.cpu_limit",
                "spec.memory_limit_mb",
                "spec.pids_limit"
            ]
        );
        let env = r.environment.as_ref().unwrap();
        assert_eq!(env.id, "id-1");
        assert_eq!(env.name, "web-2");
        // --label keeps the other labels and overrides the same key.
        assert_eq!(
            env.labels,
            BTreeMap::from([
                ("ci".to_owned(), "true".to_owned()),
                ("new".to_owned(), "1".to_owned()),
                ("tier".to_owned(), "back".to_owned()),
            ])
            .into_iter()
            .collect()
        );
        let spec = env.spec.as_ref().unwrap();
        assert_eq!(
            (spec.cpu_limit, spec.memory_limit_mb, spec.pids_limit),
            (Some(1.5), Some(1024), Some(200))
        );
        assert!(!r.request_id.is_empty());

        // One resource: one path, no name, no labels.
        let r = update_request("id-1".into(), &args(&["--memory", "512"]), None).unwrap();
        assert_eq!(mask(&r), ["spec.memory_limit_mb"]);
        let env = r.environment.unwrap();
        assert_eq!(env.spec.unwrap().memory_limit_mb, Some(512));
        assert!(env.name.is_empty() && env.labels.is_empty());
        // Aliases of the create flags.
        let r = update_request(
            "id-1".into(),
            &args(&["--cpu", "2", "--pids-limit", "64"]),
            None,
        )
        .unwrap();
        assert_eq!(mask(&r), ["spec.cpu_limit", "spec.pids_limit"]);

        // Metadata only: no spec sent.
        let r = update_request("id-1".into(), &args(&["--name", "x"]), None).unwrap();
        assert_eq!(mask(&r), ["name"]);
        assert!(r.environment.unwrap().spec.is_none());

        // --clear-labels: exactly the labels given, or none.
        let cleared = args(&["--clear-labels"]);
        let r = update_request("id-1".into(), &cleared, Some(&current)).unwrap();
        assert_eq!(mask(&r), ["labels"]);
        assert!(r.environment.unwrap().labels.is_empty());
        let replaced = args(&["--clear-labels", "--label", "only=this"]);
        let r = update_request("id-1".into(), &replaced, Some(&current)).unwrap();
        assert_eq!(
            r.environment
                .unwrap()
                .labels
                .into_iter()
                .collect::<Vec<_>>(),
            [("only".to_owned(), "this".to_owned())]
        );
    }

    #[test]
    fn update_refuses_what_it_cannot_send() {
        for (argv, error) in [
            (&[][..], "nothing to update"),
            (
                &["--label", "novalue"][..],
                "--label: \"novalue\" is not KEY=VALUE",
            ),
            (&["--cpus", "0"][..], "--cpus must be a positive"),
            (&["--cpus", "NaN"][..], "--cpus must be a positive"),
            (&["--memory", "lots"][..], "--memory: invalid memory size"),
            (&["--pids", "0"][..], "--pids must be a positive"),
            (&["--pids=-1"][..], "--pids must be a positive"),
            (&["--name", " "][..], "--name must not be empty"),
        ] {
            let e = update_request("id".into(), &args(argv), None).unwrap_err();
            assert!(e.to_string().starts_with(error), "{argv:?}: {e}");
        }
    }

    #[test]
    fn filter_values_are_quoted_exactly() {
        assert_eq!(quoted("web-1"), r#""web-1""#);
        assert_eq!(quoted(r#"a"b\c*"#), r#""a\"b\\c\*""#);
        // Read back by the platform's parser: the exact name, not a prefix.
        for name in ["web-*", r#"a"b\c*"#, "plain"] {
            let filter = format!("name = {}", quoted(name));
            let query = vibebox_listing::Query::new(&filter, "", false).unwrap();
            let env = |name: &str| Environment {
                id: "x".into(),
                name: name.into(),
                state: EnvironmentState::Running as i32,
                ..Environment::default()
            };
            assert!(query.matches(&env(name)), "{filter}");
            assert!(!query.matches(&env(&format!("{name}-more"))), "{filter}");
        }
    }
}
