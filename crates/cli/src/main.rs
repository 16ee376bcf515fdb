//! `vibebox`: the platform's command line.
//!
//! `vibebox up` runs the whole platform on one machine: the five services,
//! each its own gRPC server on loopback, talking to each other over mutual
//! TLS with a development PKI generated into the data directory.
//!
//! Every other subcommand is a client of the gateway. [`cmd`] holds one
//! module per command group (`login`, `context`, `user`, `team`, `sa`,
//! `token`, `env`, `exec`, `logs`, `stats`, `policy`, `audit`, `up`); the
//! support they share stays outside it: [`config`] keeps the contexts
//! (platforms and tokens), [`client`] connects and renders errors,
//! [`output`] prints tables or JSON, [`prompt`] reads passwords, [`spec`]
//! reads spec files.

mod client;
mod cmd;
mod config;
mod output;
mod prompt;
mod spec;

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

use crate::client::Session;
use crate::cmd::{audit, context, env, login, policy, sa, team, token, up, user};
use crate::config::{Config, Context};
use crate::output::Format;

/// VibeBox: on-demand, hardened development environments.
#[derive(Parser, Debug)]
#[command(name = "vibebox", version, about)]
struct Cli {
    /// Context (platform and credentials) to use instead of the current one.
    #[arg(long, global = true, env = "VIBEBOX_CONTEXT")]
    context: Option<String>,
    /// Gateway URL, overriding the context's.
    #[arg(long, global = true, env = "VIBEBOX_SERVER")]
    server: Option<String>,
    /// Output format.
    #[arg(
        short,
        long,
        global = true,
        value_enum,
        default_value = "table",
        env = "VIBEBOX_OUTPUT"
    )]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole platform on this machine (gateway, identity, policy,
    /// orchestrator, audit) until Ctrl-C.
    Up(up::UpArgs),
    /// Log in (username and password, or a token) and save a context.
    Login(login::LoginArgs),
    /// Forget the current context's token.
    Logout,
    /// Show who you are logged in as.
    Whoami,
    /// Manage contexts (one per platform).
    #[command(subcommand)]
    Context(context::ContextCommand),
    /// Development environments.
    #[command(subcommand, alias = "environment")]
    Env(env::EnvCommand),
    /// Check specs against the platform's policy.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Teams and their members.
    #[command(subcommand)]
    Team(team::TeamCommand),
    /// Users (platform admins).
    #[command(subcommand)]
    User(user::UserCommand),
    /// A team's service accounts: create, list, delete, issue tokens.
    #[command(subcommand)]
    Sa(sa::SaCommand),
    /// API tokens: create, list, revoke, attenuate (offline).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// The audit trail.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    // Inside the helper image this executable is the gate (see vibebox-gate).
    vibebox_gate::dispatch();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vibebox: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up::run(args).await.map(|()| ExitCode::SUCCESS),
            command => dispatch(command, cli.context, cli.server, cli.output).await,
        }
    });
    // Do not wait for a stdin reader blocked on the terminal.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            let line = format!("{e:#}").replace(['\n', '\r'], " ");
            eprintln!("vibebox: error: {line}");
            ExitCode::FAILURE
        }
    }
}

/// The context to use, with `--server` and `VIBEBOX_TOKEN` applied.
fn current_context(name: Option<&str>, server: Option<String>) -> Result<(String, Context)> {
    let (name, mut ctx) = Config::load()?.context(name)?;
    if let Some(s) = server {
        ctx.server = s;
    }
    if let Ok(t) = std::env::var("VIBEBOX_TOKEN")
        && !t.trim().is_empty()
    {
        ctx.token = Some(t.trim().to_owned());
    }
    Ok((name, ctx))
}

fn logged_in(ctx: &Context) -> Result<Session> {
    if ctx.token.is_none() {
        anyhow::bail!("not logged in: run `vibebox login`");
    }
    Session::open(ctx)
}

async fn dispatch(
    command: Command,
    context: Option<String>,
    server: Option<String>,
    format: Format,
) -> Result<ExitCode> {
    match command {
        Command::Up(_) => unreachable!("handled in main"),
        Command::Login(args) => login::login(args, context.as_deref()).await?,
        Command::Logout => login::logout(context.as_deref())?,
        Command::Context(cmd) => context::run(cmd, format)?,
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vibebox", &mut script);
            use std::io::Write as _;
            // A closed pipe (`| head`) is not an error worth reporting.
            let _ = std::io::stdout().write_all(&script);
        }
        Command::Whoami => {
            let (name, ctx) = current_context(context.as_deref(), server)?;
            login::whoami(&logged_in(&ctx)?, &name, &ctx, format).await?;
        }
        Command::Env(cmd) => {
            let (_, ctx) = current_context(context.as_deref(), server)?;
            return env::run(cmd, &logged_in(&ctx)?, &ctx, format).await;
        }
        Command::Policy(cmd) => {
            let (_, ctx) = current_context(context.as_deref(), server)?;
            return policy::run(cmd, &logged_in(&ctx)?, format).await;
        }
        Command::Team(cmd) => {
            let (_, ctx) = current_context(context.as_deref(), server)?;
            team::run(cmd, &logged_in(&ctx)?, format).await?;
        }
        Command::User(cmd) => {
            let (_, ctx) = current_context(context.as_deref(), server)?;
            user::run(cmd, &logged_in(&ctx)?, format).await?;
        }
        Command::Sa(cmd) => {
            let (_, ctx) = current_context(context.as_deref(), server)?;
            sa::run(cmd, &logged_in(&ctx)?, format).await?;
        }
        Command::Token(cmd) => {
            let (_, ctx) = current_context(context.as_deref(), server)?;
            token::run(cmd, &ctx, format).await?;
        }
        Command::Audit(cmd) => {
            let (_, ctx) = current_context(context.as_deref(), server)?;
            let session = logged_in(&ctx).ok();
            return audit::run(cmd, session.as_ref(), format).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}
