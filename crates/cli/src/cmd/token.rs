//! `vibebox token ...`: create, list and revoke API tokens through the
//! platform; attenuate one offline (no service call).

use std::path::PathBuf;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use vibebox_proto::identity::{
    ApiToken, CreateApiTokenRequest, ListApiTokensRequest, PrincipalKind, RevokeTokenRequest,
    TokenRestrictions,
};

use crate::client::{CallExt, Session, all_pages};
use crate::cmd::team::resolve_team;
use crate::config::Context;
use crate::output::{self, Format};
use crate::prompt::read_line_stdin;

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
    /// List API tokens (never their secret): your own; with --team, the
    /// team's service accounts' (team admins); with --owner, that
    /// principal's. Platform admins without either see every one.
    #[command(alias = "list")]
    Ls {
        /// Tokens of this team's service accounts (id or name).
        #[arg(long)]
        team: Option<String>,
        /// Tokens of this principal (user or service account id).
        #[arg(long, value_name = "ID")]
        owner: Option<String>,
        /// Include revoked and expired tokens.
        #[arg(long)]
        all: bool,
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

/// A freshly issued token (its secret shown this once).
#[derive(Serialize)]
pub(crate) struct TokenView {
    pub(crate) token: String,
    pub(crate) token_id: String,
    pub(crate) expire_time: String,
}

/// Prints a freshly issued token: the secret alone on stdout (so that it
/// can be piped), what it is on stderr; all of it with `-o json`.
pub(crate) fn print_issued(v: &TokenView, format: Format) {
    if format == Format::Json {
        output::json(v);
    } else {
        eprintln!(
            "token id {} (expires {}); store it now, it is not shown again:",
            v.token_id, v.expire_time
        );
        println!("{}", v.token);
    }
}

/// A listed API token (never its secret).
#[derive(Serialize)]
struct ApiTokenView {
    id: String,
    owner_id: String,
    owner_name: String,
    owner_kind: String,
    team_id: String,
    description: String,
    created_by: String,
    create_time: String,
    last_used_time: String,
    expire_time: String,
    restrictions: RestrictionsView,
    revoked: bool,
}

#[derive(Serialize, Default)]
struct RestrictionsView {
    team_ids: Vec<String>,
    operations: Vec<String>,
    environment_ids: Vec<String>,
}

impl RestrictionsView {
    /// `teams=a,b ops=x envs=y`, or `-` when unrestricted.
    fn summary(&self) -> String {
        let parts: Vec<String> = [
            ("teams", &self.team_ids),
            ("ops", &self.operations),
            ("envs", &self.environment_ids),
        ]
        .into_iter()
        .filter(|(_, values)| !values.is_empty())
        .map(|(name, values)| format!("{name}={}", values.join(",")))
        .collect();
        if parts.is_empty() {
            "-".to_owned()
        } else {
            parts.join(" ")
        }
    }
}

impl From<&ApiToken> for ApiTokenView {
    fn from(t: &ApiToken) -> Self {
        let r: TokenRestrictions = t.restrictions.clone().unwrap_or_default();
        Self {
            id: t.id.clone(),
            owner_id: t.owner_id.clone(),
            owner_name: t.owner_name.clone(),
            owner_kind: PrincipalKind::try_from(t.owner_kind)
                .map(|k| output::enum_name(k.as_str_name(), "PRINCIPAL_KIND_"))
                .unwrap_or_default(),
            team_id: t.team_id.clone(),
            description: t.description.clone(),
            created_by: t.created_by.clone(),
            create_time: output::time(t.create_time.as_ref()),
            last_used_time: output::time(t.last_used_time.as_ref()),
            expire_time: output::time(t.expire_time.as_ref()),
            restrictions: RestrictionsView {
                team_ids: r.team_ids,
                operations: r.operations,
                environment_ids: r.environment_ids,
            },
            revoked: t.revoked,
        }
    }
}

fn print_tokens(tokens: &[ApiToken], format: Format) {
    let views: Vec<ApiTokenView> = tokens.iter().map(ApiTokenView::from).collect();
    if format == Format::Json {
        return output::json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .into_iter()
        .map(|v| {
            let dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
            vec![
                v.id,
                dash(if v.owner_name.is_empty() {
                    v.owner_id
                } else {
                    v.owner_name
                }),
                v.owner_kind,
                dash(v.description),
                v.create_time,
                dash(v.last_used_time),
                v.expire_time,
                v.restrictions.summary(),
                if v.revoked { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "OWNER",
            "KIND",
            "DESCRIPTION",
            "CREATED",
            "LAST USED",
            "EXPIRES",
            "RESTRICTIONS",
            "REVOKED",
        ],
        &rows,
    );
}

async fn list(
    session: &Session,
    team: Option<String>,
    owner: Option<String>,
    all: bool,
) -> Result<Vec<ApiToken>> {
    let team_id = match team {
        Some(t) => resolve_team(session, Some(&t), None).await?,
        None => String::new(),
    };
    let owner_id = owner.unwrap_or_default();
    let client = session.identity();
    all_pages(|page_token| {
        let mut client = client.clone();
        let (team_id, owner_id) = (team_id.clone(), owner_id.clone());
        async move {
            let r = client
                .list_api_tokens(ListApiTokensRequest {
                    owner_id,
                    team_id,
                    show_inactive: all,
                    page_size: 500,
                    page_token,
                })
                .await
                .call()?;
            Ok((r.tokens, r.next_page_token))
        }
    })
    .await
}

/// `vibebox token ...`.
pub(crate) async fn run(cmd: TokenCommand, ctx: &Context, format: Format) -> Result<()> {
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
                    request_id: Default::default(),
                    restrictions: Default::default(),
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
            print_issued(&v, format);
        }
        TokenCommand::Ls { team, owner, all } => {
            let session = Session::open(ctx)?;
            print_tokens(&list(&session, team, owner, all).await?, format);
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
