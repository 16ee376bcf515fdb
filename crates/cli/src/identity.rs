//! Identity commands: `login`, `logout`, `whoami`, `context`, `user`, `team`
//! and `token` (create and revoke through the platform; attenuate offline).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use vibebox_proto::identity::{
    AddTeamMemberRequest, CreateApiTokenRequest, CreateTeamRequest, CreateUserRequest,
    ListTeamMembersRequest, ListTeamsRequest, ListUsersRequest, LoginRequest, Membership,
    PlatformRole, RemoveTeamMemberRequest, RevokeTokenRequest, SetTeamMemberRoleRequest,
    SetUserDisabledRequest, Team, TeamRole, User, WhoAmIRequest,
};

use crate::client::{CallExt, Session, all_pages};
use crate::config::{self, Config, Context};
use crate::output::{self, Format};

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

/// Reads a password without echo from the terminal.
fn prompt_password(prompt: &str) -> Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!("no terminal to read the password from: use --password-stdin");
    }
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let mut password = String::new();
    {
        crossterm::terminal::enable_raw_mode()?;
        struct Restore;
        impl Drop for Restore {
            fn drop(&mut self) {
                let _ = crossterm::terminal::disable_raw_mode();
            }
        }
        let _restore = Restore;
        let mut stdin = std::io::stdin();
        let mut byte = [0u8; 1];
        loop {
            if stdin.read(&mut byte)? == 0 {
                break;
            }
            match byte[0] {
                b'\r' | b'\n' => break,
                3 => bail!("interrupted"),
                127 | 8 => {
                    password.pop();
                }
                b => password.push(b as char),
            }
        }
    }
    eprintln!();
    Ok(password)
}

fn read_line_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin().read_line(&mut s)?;
    Ok(s.trim_end_matches(['\r', '\n']).to_owned())
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
struct UserView {
    id: String,
    username: String,
    display_name: String,
    platform_role: String,
    disabled: bool,
    create_time: String,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        Self {
            id: u.id.clone(),
            username: u.username.clone(),
            display_name: u.display_name.clone(),
            platform_role: PlatformRole::try_from(u.platform_role)
                .map(|r| output::enum_name(r.as_str_name(), "PLATFORM_ROLE_"))
                .unwrap_or_default(),
            disabled: u.disabled,
            create_time: output::time(u.create_time.as_ref()),
        }
    }
}

#[derive(Serialize)]
struct MembershipView {
    team_id: String,
    team: String,
    user_id: String,
    username: String,
    role: String,
}

fn role_name(r: i32) -> String {
    TeamRole::try_from(r)
        .map(|r| output::enum_name(r.as_str_name(), "TEAM_ROLE_"))
        .unwrap_or_default()
}

impl From<&Membership> for MembershipView {
    fn from(m: &Membership) -> Self {
        Self {
            team_id: m.team_id.clone(),
            team: m.team_name.clone(),
            user_id: m.user_id.clone(),
            username: m.username.clone(),
            role: role_name(m.role),
        }
    }
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

/// Resolves a team id or name; without one, the default (the context's
/// team, else the caller's only team).
pub(crate) async fn resolve_team(
    session: &Session,
    team: Option<&str>,
    default: Option<&str>,
) -> Result<String> {
    let wanted = team.or(default);
    if let Some(t) = wanted
        && uuid::Uuid::parse_str(t).is_ok()
    {
        return Ok(t.to_owned());
    }
    let who = session.identity().who_am_i(WhoAmIRequest {}).await.call()?;
    match wanted {
        Some(t) => {
            if let Some(m) = who
                .memberships
                .iter()
                .find(|m| m.team_name == t || m.team_id == t)
            {
                return Ok(m.team_id.clone());
            }
            // Platform admins may act on teams they are not members of.
            let teams = list_teams(session).await.unwrap_or_default();
            teams
                .iter()
                .find(|x| x.name == t || x.id == t)
                .map(|x| x.id.clone())
                .ok_or_else(|| anyhow!("no team {t:?} among your teams"))
        }
        None => match who.memberships.as_slice() {
            [one] => Ok(one.team_id.clone()),
            [] => bail!("you are not a member of any team"),
            _ => bail!(
                "you are in several teams ({}): choose one with --team",
                who.memberships
                    .iter()
                    .map(|m| m.team_name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

async fn list_teams(session: &Session) -> Result<Vec<Team>> {
    let client = session.identity();
    all_pages(|page_token| {
        let mut client = client.clone();
        async move {
            let r = client
                .list_teams(ListTeamsRequest {
                    page_size: 200,
                    page_token,
                })
                .await
                .call()?;
            Ok((r.teams, r.next_page_token))
        }
    })
    .await
}

async fn list_users(session: &Session) -> Result<Vec<User>> {
    let client = session.identity();
    all_pages(|page_token| {
        let mut client = client.clone();
        async move {
            let r = client
                .list_users(ListUsersRequest {
                    page_size: 200,
                    page_token,
                })
                .await
                .call()?;
            Ok((r.users, r.next_page_token))
        }
    })
    .await
}

/// Resolves a user id or username.
async fn resolve_user(session: &Session, user: &str) -> Result<String> {
    if uuid::Uuid::parse_str(user).is_ok() {
        return Ok(user.to_owned());
    }
    list_users(session)
        .await?
        .into_iter()
        .find(|u| u.username == user)
        .map(|u| u.id)
        .ok_or_else(|| anyhow!("no user named {user:?}"))
}

/// Context commands.
#[derive(Subcommand, Debug)]
pub(crate) enum ContextCommand {
    /// List contexts (the current one marked with *).
    Ls,
    /// Make a context the current one.
    Use { name: String },
    /// Show the current context's name.
    Current,
    /// Delete a context.
    Rm { name: String },
}

#[derive(Serialize)]
struct ContextView {
    name: String,
    current: bool,
    server: String,
    username: Option<String>,
    team: Option<String>,
    logged_in: bool,
}

/// `vibebox context ...` (local only).
pub(crate) fn context(cmd: ContextCommand, format: Format) -> Result<()> {
    let mut cfg = Config::load()?;
    match cmd {
        ContextCommand::Ls => {
            let views: Vec<ContextView> = cfg
                .contexts
                .iter()
                .map(|(n, c)| ContextView {
                    name: n.clone(),
                    current: cfg.current_context.as_deref() == Some(n),
                    server: c.server.clone(),
                    username: c.username.clone(),
                    team: c.team.clone(),
                    logged_in: c.token.is_some(),
                })
                .collect();
            if format == Format::Json {
                output::json(&views);
            } else {
                let rows: Vec<Vec<String>> = views
                    .into_iter()
                    .map(|v| {
                        vec![
                            if v.current { "*".into() } else { String::new() },
                            v.name,
                            v.server,
                            v.username.unwrap_or_default(),
                            v.team.unwrap_or_default(),
                        ]
                    })
                    .collect();
                output::table(&["", "NAME", "SERVER", "USER", "TEAM"], &rows);
            }
        }
        ContextCommand::Use { name } => {
            if !cfg.contexts.contains_key(&name) {
                bail!("no context named {name:?}");
            }
            cfg.current_context = Some(name.clone());
            cfg.save()?;
            println!("switched to context {name}");
        }
        ContextCommand::Current => {
            println!("{}", cfg.current_context.as_deref().unwrap_or("(none)"));
        }
        ContextCommand::Rm { name } => {
            if cfg.contexts.remove(&name).is_none() {
                bail!("no context named {name:?}");
            }
            if cfg.current_context.as_deref() == Some(&name) {
                cfg.current_context = None;
            }
            cfg.save()?;
            println!("deleted context {name}");
        }
    }
    Ok(())
}

/// User commands (platform admins).
#[derive(Subcommand, Debug)]
pub(crate) enum UserCommand {
    /// Create a user; the password is read without echo, or from stdin.
    Create {
        username: String,
        #[arg(long)]
        display_name: Option<String>,
        /// Read the password from stdin (first line).
        #[arg(long)]
        password_stdin: bool,
        /// Platform role: none, admin or auditor.
        #[arg(long, default_value = "none")]
        role: String,
    },
    /// List users.
    #[command(alias = "list")]
    Ls,
    /// Disable a user (their tokens stop working).
    Disable { user: String },
    /// Enable a disabled user.
    Enable { user: String },
}

/// Team commands.
#[derive(Subcommand, Debug)]
pub(crate) enum TeamCommand {
    /// Create a team.
    Create {
        name: String,
        #[arg(long)]
        display_name: Option<String>,
    },
    /// List teams.
    #[command(alias = "list")]
    Ls,
    /// List a team's members.
    Members { team: String },
    /// Add a user to a team.
    Add {
        team: String,
        user: String,
        /// viewer, developer or admin.
        #[arg(long, default_value = "developer")]
        role: String,
    },
    /// Change a member's role.
    SetRole {
        team: String,
        user: String,
        role: String,
    },
    /// Remove a user from a team.
    Remove { team: String, user: String },
}

fn parse_team_role(s: &str) -> Result<i32> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "viewer" => TeamRole::Viewer,
        "developer" | "dev" => TeamRole::Developer,
        "admin" => TeamRole::Admin,
        _ => bail!("team role {s:?} is not viewer, developer or admin"),
    } as i32)
}

fn print_members(ms: &[Membership], format: Format) {
    let views: Vec<MembershipView> = ms.iter().map(MembershipView::from).collect();
    if format == Format::Json {
        return output::json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .into_iter()
        .map(|v| vec![v.team, v.username, v.user_id, v.role])
        .collect();
    output::table(&["TEAM", "USER", "USER ID", "ROLE"], &rows);
}

fn print_users(us: &[User], format: Format) {
    let views: Vec<UserView> = us.iter().map(UserView::from).collect();
    if format == Format::Json {
        return output::json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .into_iter()
        .map(|v| {
            vec![
                v.id,
                v.username,
                v.display_name,
                v.platform_role,
                if v.disabled {
                    "disabled".into()
                } else {
                    "active".into()
                },
            ]
        })
        .collect();
    output::table(&["ID", "USERNAME", "NAME", "ROLE", "STATUS"], &rows);
}

/// `vibebox user ...`.
pub(crate) async fn user(cmd: UserCommand, session: &Session, format: Format) -> Result<()> {
    let mut client = session.identity();
    match cmd {
        UserCommand::Create {
            username,
            display_name,
            password_stdin,
            role,
        } => {
            let platform_role = match role.to_ascii_lowercase().as_str() {
                "none" | "" => PlatformRole::None,
                "admin" => PlatformRole::Admin,
                "auditor" => PlatformRole::Auditor,
                _ => bail!("platform role {role:?} is not none, admin or auditor"),
            } as i32;
            let password = if password_stdin {
                read_line_stdin()?
            } else {
                let p = prompt_password("Password: ")?;
                if prompt_password("Repeat password: ")? != p {
                    bail!("the passwords differ");
                }
                p
            };
            let r = client
                .create_user(CreateUserRequest {
                    display_name: display_name.unwrap_or_else(|| username.clone()),
                    username,
                    password,
                    platform_role,
                })
                .await
                .call()?;
            print_users(&[r.user.unwrap_or_default()], format);
        }
        UserCommand::Ls => print_users(&list_users(session).await?, format),
        UserCommand::Disable { user } => {
            let user_id = resolve_user(session, &user).await?;
            let r = client
                .set_user_disabled(SetUserDisabledRequest {
                    user_id,
                    disabled: true,
                })
                .await
                .call()?;
            print_users(&[r.user.unwrap_or_default()], format);
        }
        UserCommand::Enable { user } => {
            let user_id = resolve_user(session, &user).await?;
            let r = client
                .set_user_disabled(SetUserDisabledRequest {
                    user_id,
                    disabled: false,
                })
                .await
                .call()?;
            print_users(&[r.user.unwrap_or_default()], format);
        }
    }
    Ok(())
}

/// `vibebox team ...`.
pub(crate) async fn team(cmd: TeamCommand, session: &Session, format: Format) -> Result<()> {
    let mut client = session.identity();
    match cmd {
        TeamCommand::Create { name, display_name } => {
            let r = client
                .create_team(CreateTeamRequest {
                    display_name: display_name.unwrap_or_else(|| name.clone()),
                    name,
                })
                .await
                .call()?;
            print_teams(&[r.team.unwrap_or_default()], format);
        }
        TeamCommand::Ls => print_teams(&list_teams(session).await?, format),
        TeamCommand::Members { team } => {
            let team_id = resolve_team(session, Some(&team), None).await?;
            let r = client
                .list_team_members(ListTeamMembersRequest { team_id })
                .await
                .call()?;
            print_members(&r.memberships, format);
        }
        TeamCommand::Add { team, user, role } => {
            let team_id = resolve_team(session, Some(&team), None).await?;
            let user_id = resolve_user(session, &user).await?;
            let r = client
                .add_team_member(AddTeamMemberRequest {
                    team_id,
                    user_id,
                    role: parse_team_role(&role)?,
                })
                .await
                .call()?;
            print_members(&[r.membership.unwrap_or_default()], format);
        }
        TeamCommand::SetRole { team, user, role } => {
            let team_id = resolve_team(session, Some(&team), None).await?;
            let user_id = resolve_user(session, &user).await?;
            let r = client
                .set_team_member_role(SetTeamMemberRoleRequest {
                    team_id,
                    user_id,
                    role: parse_team_role(&role)?,
                })
                .await
                .call()?;
            print_members(&[r.membership.unwrap_or_default()], format);
        }
        TeamCommand::Remove { team, user } => {
            let team_id = resolve_team(session, Some(&team), None).await?;
            let user_id = resolve_user(session, &user).await?;
            client
                .remove_team_member(RemoveTeamMemberRequest { team_id, user_id })
                .await
                .call()?;
            if format == Format::Json {
                output::json(&serde_json::json!({"removed": true}));
            } else {
                println!("removed {user} from {team}");
            }
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct TeamView {
    id: String,
    name: String,
    display_name: String,
    create_time: String,
}

fn print_teams(ts: &[Team], format: Format) {
    let views: Vec<TeamView> = ts
        .iter()
        .map(|t| TeamView {
            id: t.id.clone(),
            name: t.name.clone(),
            display_name: t.display_name.clone(),
            create_time: output::time(t.create_time.as_ref()),
        })
        .collect();
    if format == Format::Json {
        return output::json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .into_iter()
        .map(|v| vec![v.id, v.name, v.display_name, v.create_time])
        .collect();
    output::table(&["ID", "NAME", "DISPLAY NAME", "CREATED"], &rows);
}

/// Token commands.
#[derive(Subcommand, Debug)]
pub(crate) enum TokenCommand {
    /// Create an API token for yourself (printed once).
    Create {
        /// What the token is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Lifetime, e.g. 1h, 30d.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Revoke a token by id.
    Revoke { token_id: String },
    /// Restrict a token offline (no service call): prints the attenuated token.
    Attenuate(AttenuateArgs),
}

#[derive(Args, Debug)]
pub(crate) struct AttenuateArgs {
    /// The token to restrict (default: the context's token).
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// Read the token to restrict from a file (`-` for stdin).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Only this team (id).
    #[arg(long)]
    team: Option<String>,
    /// Only this environment (id).
    #[arg(long)]
    environment: Option<String>,
    /// Only these operations (repeatable), e.g. environment.get.
    #[arg(long = "operation", value_name = "OP")]
    operations: Vec<String>,
    /// Expire after this long (e.g. 10m, 1h) or at this RFC 3339 time.
    #[arg(long)]
    expires: Option<String>,
}

#[derive(Serialize)]
struct TokenView {
    token: String,
    token_id: String,
    expire_time: String,
}

/// `vibebox token ...`.
pub(crate) async fn token(cmd: TokenCommand, ctx: &Context, format: Format) -> Result<()> {
    match cmd {
        TokenCommand::Attenuate(a) => return attenuate(a, ctx),
        TokenCommand::Create { description, ttl } => {
            let ttl_seconds = ttl
                .as_deref()
                .map(output::parse_duration)
                .transpose()?
                .map(|d| d.num_seconds().max(0) as u64);
            let session = Session::open(ctx)?;
            let r = session
                .identity()
                .create_api_token(CreateApiTokenRequest {
                    description,
                    ttl_seconds,
                })
                .await
                .call()?;
            let v = TokenView {
                token: r.token,
                token_id: r.token_id,
                expire_time: output::time(r.expire_time.as_ref()),
            };
            if format == Format::Json {
                output::json(&v);
            } else {
                eprintln!(
                    "token id {} (expires {}); store it now, it is not shown again:",
                    v.token_id, v.expire_time
                );
                println!("{}", v.token);
            }
        }
        TokenCommand::Revoke { token_id } => {
            let session = Session::open(ctx)?;
            session
                .identity()
                .revoke_token(RevokeTokenRequest {
                    token_id: token_id.clone(),
                })
                .await
                .call()?;
            if format == Format::Json {
                output::json(&serde_json::json!({"revoked": token_id}));
            } else {
                println!("revoked {token_id}");
            }
        }
    }
    Ok(())
}

fn attenuate(a: AttenuateArgs, ctx: &Context) -> Result<()> {
    let token = match (a.token, a.token_file) {
        (Some(t), _) => t,
        (None, Some(p)) if p.as_os_str() == "-" => read_line_stdin()?,
        (None, Some(p)) => {
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?
        }
        (None, None) => ctx
            .token
            .clone()
            .ok_or_else(|| anyhow!("no token: pass --token/--token-file or run `vibebox login`"))?,
    };
    let mut r = vibebox_token::Restriction::default();
    if let Some(t) = a.team {
        r = r.team(t);
    }
    if let Some(e) = a.environment {
        r = r.environment(e);
    }
    if !a.operations.is_empty() {
        r = r.operations(a.operations);
    }
    if let Some(e) = a.expires {
        r = r.expires_at(match chrono::DateTime::parse_from_rfc3339(&e) {
            Ok(t) => t.with_timezone(&chrono::Utc),
            Err(_) => chrono::Utc::now() + output::parse_duration(&e)?,
        });
    }
    if r.is_empty() {
        bail!("nothing to restrict: give --team, --environment, --operation or --expires");
    }
    let attenuated = vibebox_token::attenuate(token.trim(), &r)
        .map_err(|e| anyhow!("cannot attenuate the token: {e}"))?;
    println!("{attenuated}");
    Ok(())
}
