//! `vibebox login`, `logout` and `whoami`: getting a token (by password or
//! as is) into a context, forgetting it, and showing who it belongs to.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde::Serialize;
use vibebox_proto::identity::{LoginRequest, WhoAmIRequest};

use crate::client::{CallExt, Session};
use crate::cmd::team::MembershipView;
use crate::cmd::user::UserView;
use crate::config::{self, Config, Context};
use crate::output::{self, Format};
use crate::prompt::{prompt_password, read_line_stdin};

#[derive(Args, Debug)]
pub(crate) struct LoginArgs {
    /// Gateway URL (default: the context's, else http://127.0.0.1:7700).
    server: Option<String>,
    /// Username (prompted for when neither a token nor a username is given).
    #[arg(short, long)]
    username: Option<String>,
    /// Read the password from stdin (first line) instead of the terminal.
    #[arg(long)]
    password_stdin: bool,
    /// Log in with an existing token instead of a password.
    #[arg(long, conflicts_with_all = ["username", "password_stdin", "token_file"])]
    token: Option<String>,
    /// Log in with a token read from a file.
    #[arg(long, conflicts_with_all = ["username", "password_stdin"])]
    token_file: Option<PathBuf>,
    /// Name of the context to save (default: the current one, else "default").
    #[arg(long = "name")]
    context_name: Option<String>,
    /// Default team for this context (id or name).
    #[arg(long)]
    team: Option<String>,
    /// CA certificate (PEM) for an https:// gateway.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for an https:// gateway.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// Client key (PEM) for an https:// gateway.
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

/// `vibebox login`.
pub(crate) async fn login(args: LoginArgs, context_flag: Option<&str>) -> Result<()> {
    let mut cfg = Config::load()?;
    let name = args
        .context_name
        .or(context_flag.map(str::to_owned))
        .or(cfg.current_context.clone())
        .unwrap_or_else(|| "default".to_owned());
    // A new context starts from the current one's server (another user on
    // the same platform) unless a server is given.
    let mut ctx = match cfg.contexts.get(&name) {
        Some(c) => c.clone(),
        None => Context {
            server: cfg.context(None).map(|(_, c)| c.server).unwrap_or_default(),
            ..Context::default()
        },
    };
    if let Some(server) = args.server {
        ctx.server = server;
    }
    if ctx.server.is_empty() {
        ctx.server = config::DEFAULT_SERVER.to_owned();
    }
    if args.tls_ca.is_some() {
        ctx.tls_ca = args.tls_ca;
        ctx.tls_cert = args.tls_cert;
        ctx.tls_key = args.tls_key;
    }
    let token = match (args.token, args.token_file) {
        (Some(t), _) => t.trim().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => {
            let username = match args.username {
                Some(u) => u,
                None if std::io::stdin().is_terminal() => {
                    eprint!("Username: ");
                    std::io::stderr().flush()?;
                    read_line_stdin()?
                }
                None => bail!("--username is required (or --token / --token-file)"),
            };
            let password = if args.password_stdin {
                read_line_stdin()?
            } else {
                prompt_password("Password: ")?
            };
            let session = Session::open_with(&ctx, None)?;
            let resp = session
                .identity()
                .login(LoginRequest { username, password })
                .await
                .call()?;
            resp.token
        }
    };
    let session = Session::open_with(&ctx, Some(&token))?;
    let who = session.identity().who_am_i(WhoAmIRequest {}).await.call()?;
    let user = who.user.unwrap_or_default();
    ctx.token = Some(token);
    ctx.username = Some(user.username.clone());
    if args.team.is_some() {
        ctx.team = args.team;
    }
    cfg.contexts.insert(name.clone(), ctx.clone());
    cfg.current_context = Some(name.clone());
    cfg.save()?;
    println!(
        "logged in to {} as {} (context {name})",
        ctx.server, user.username
    );
    Ok(())
}

/// `vibebox logout`: forgets the context's token.
pub(crate) fn logout(context_flag: Option<&str>) -> Result<()> {
    let mut cfg = Config::load()?;
    let (name, _) = cfg.context(context_flag)?;
    if let Some(ctx) = cfg.contexts.get_mut(&name) {
        ctx.token = None;
    }
    cfg.save()?;
    println!("logged out of context {name}");
    Ok(())
}

#[derive(Serialize)]
struct WhoAmIView {
    context: String,
    server: String,
    user: UserView,
    token_id: String,
    teams: Vec<MembershipView>,
}

/// `vibebox whoami`.
pub(crate) async fn whoami(
    session: &Session,
    name: &str,
    ctx: &Context,
    format: Format,
) -> Result<()> {
    let who = session.identity().who_am_i(WhoAmIRequest {}).await.call()?;
    let view = WhoAmIView {
        context: name.to_owned(),
        server: ctx.server.clone(),
        user: UserView::from(&who.user.unwrap_or_default()),
        token_id: who.token_id,
        teams: who.memberships.iter().map(MembershipView::from).collect(),
    };
    if format == Format::Json {
        output::json(&view);
        return Ok(());
    }
    output::fields(&[
        ("user", format!("{} ({})", view.user.username, view.user.id)),
        ("platform role", view.user.platform_role.clone()),
        ("token id", view.token_id.clone()),
        ("context", format!("{} ({})", view.context, view.server)),
        (
            "teams",
            view.teams
                .iter()
                .map(|m| format!("{} ({})", m.team, m.role))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    ]);
    Ok(())
}
