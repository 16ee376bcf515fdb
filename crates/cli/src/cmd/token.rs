//! `vibebox token ...`: create and revoke API tokens through the platform;
//! attenuate one offline (no service call).

use std::path::PathBuf;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use vibebox_proto::identity::{CreateApiTokenRequest, RevokeTokenRequest};

use crate::client::{CallExt, Session};
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
