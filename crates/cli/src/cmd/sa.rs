//! `vibebox sa ...`: a team's service accounts (team admins create, delete
//! and issue tokens for them; any member lists them).

use anyhow::Result;
use clap::{Args, Subcommand};
use serde::Serialize;
use vibebox_proto::identity::{
    CreateServiceAccountRequest, CreateServiceAccountTokenRequest, DeleteServiceAccountRequest,
    ListServiceAccountsRequest, ServiceAccount, TokenRestrictions,
};

use crate::client::{CallExt, Session, all_pages};
use crate::cmd::env::resolve_env;
use crate::cmd::team::{parse_team_role, resolve_team, role_name};
use crate::cmd::token::{TokenView, print_issued};
use crate::output::{self, Format};

/// Service account commands.
#[derive(Subcommand, Debug)]
pub(crate) enum SaCommand {
    /// Create a service account in a team (its admins; a role at most your own).
    Create {
        /// Team id or name.
        team: String,
        /// Unique among usernames and service account names.
        name: String,
        /// viewer, developer or admin.
        #[arg(long, default_value = "developer")]
        role: String,
        #[arg(long)]
        display_name: Option<String>,
    },
    /// List a team's service accounts (deleted ones too, as disabled).
    #[command(alias = "list")]
    Ls {
        /// Team id or name.
        team: String,
    },
    /// Delete a service account: disabled for good, every token revoked.
    #[command(alias = "delete")]
    Rm {
        /// The service account's id.
        sa_id: String,
    },
    /// Issue an API token for a service account (printed once).
    Token(SaTokenArgs),
}

/// `vibebox sa token`.
#[derive(Args, Debug)]
pub(crate) struct SaTokenArgs {
    /// The service account's id.
    sa_id: String,
    /// What the token is for.
    #[arg(long, default_value = "")]
    description: String,
    /// Lifetime, e.g. 1h, 30d (default 30 days, at most the platform maximum).
    #[arg(long)]
    ttl: Option<String>,
    /// Only this team, id or name (repeatable).
    #[arg(long = "team", value_name = "TEAM")]
    teams: Vec<String>,
    /// Only these operations (repeatable), e.g. environment.get.
    #[arg(long = "operation", value_name = "OP")]
    operations: Vec<String>,
    /// Only this environment, id or name (repeatable).
    #[arg(long = "environment", value_name = "ENV")]
    environments: Vec<String>,
}

#[derive(Serialize)]
struct ServiceAccountView {
    id: String,
    team_id: String,
    name: String,
    display_name: String,
    role: String,
    disabled: bool,
    create_time: String,
}

impl From<&ServiceAccount> for ServiceAccountView {
    fn from(s: &ServiceAccount) -> Self {
        Self {
            id: s.id.clone(),
            team_id: s.team_id.clone(),
            name: s.name.clone(),
            display_name: s.display_name.clone(),
            role: role_name(s.role),
            disabled: s.disabled,
            create_time: output::time(s.create_time.as_ref()),
        }
    }
}

fn print_accounts(accounts: &[ServiceAccount], format: Format) {
    let views: Vec<ServiceAccountView> = accounts.iter().map(ServiceAccountView::from).collect();
    if format == Format::Json {
        return output::json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .into_iter()
        .map(|v| {
            vec![
                v.id,
                v.name,
                v.display_name,
                v.role,
                if v.disabled { "disabled" } else { "active" }.to_owned(),
                v.create_time,
            ]
        })
        .collect();
    output::table(
        &["ID", "NAME", "DISPLAY NAME", "ROLE", "STATUS", "CREATED"],
        &rows,
    );
}

/// `vibebox sa ...`.
pub(crate) async fn run(cmd: SaCommand, session: &Session, format: Format) -> Result<()> {
    let mut client = session.identity();
    match cmd {
        SaCommand::Create {
            team,
            name,
            role,
            display_name,
        } => {
            let role = parse_team_role(&role)?;
            let team_id = resolve_team(session, Some(&team), None).await?;
            let r = client
                .create_service_account(CreateServiceAccountRequest {
                    team_id,
                    display_name: display_name.unwrap_or_default(),
                    name,
                    role,
                    request_id: String::new(),
                })
                .await
                .call()?;
            print_accounts(&[r.service_account.unwrap_or_default()], format);
        }
        SaCommand::Ls { team } => {
            let team_id = resolve_team(session, Some(&team), None).await?;
            let accounts = all_pages(|page_token| {
                let mut client = client.clone();
                let team_id = team_id.clone();
                async move {
                    let r = client
                        .list_service_accounts(ListServiceAccountsRequest {
                            team_id,
                            page_size: 500,
                            page_token,
                        })
                        .await
                        .call()?;
                    Ok((r.service_accounts, r.next_page_token))
                }
            })
            .await?;
            print_accounts(&accounts, format);
        }
        SaCommand::Rm { sa_id } => {
            let r = client
                .delete_service_account(DeleteServiceAccountRequest {
                    service_account_id: sa_id,
                })
                .await
                .call()?;
            let sa = r.service_account.unwrap_or_default();
            if format == Format::Json {
                output::json(&ServiceAccountView::from(&sa));
            } else {
                println!(
                    "deleted service account {} ({}); its tokens are revoked",
                    sa.name, sa.id
                );
            }
        }
        SaCommand::Token(a) => {
            let ttl_seconds = a
                .ttl
                .as_deref()
                .map(output::parse_duration)
                .transpose()?
                .map(|d| d.num_seconds().max(0) as u64);
            let mut team_ids = Vec::with_capacity(a.teams.len());
            for team in &a.teams {
                team_ids.push(resolve_team(session, Some(team), None).await?);
            }
            let mut environment_ids = Vec::with_capacity(a.environments.len());
            for env in &a.environments {
                environment_ids.push(resolve_env(session, env).await?);
            }
            let restricted =
                !(team_ids.is_empty() && a.operations.is_empty() && environment_ids.is_empty());
            let r = client
                .create_service_account_token(CreateServiceAccountTokenRequest {
                    service_account_id: a.sa_id,
                    description: a.description,
                    ttl_seconds,
                    request_id: String::new(),
                    restrictions: restricted.then_some(TokenRestrictions {
                        team_ids,
                        operations: a.operations,
                        environment_ids,
                    }),
                })
                .await
                .call()?;
            print_issued(
                &TokenView {
                    token: r.token,
                    token_id: r.token_id,
                    expire_time: output::time(r.expire_time.as_ref()),
                },
                format,
            );
        }
    }
    Ok(())
}
