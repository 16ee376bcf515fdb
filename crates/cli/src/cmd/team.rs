//! `vibebox team ...`: teams and their members; also how every command
//! turns a team name into an id ([`resolve_team`]).

use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use serde::Serialize;
use vibebox_proto::identity::{
    AddTeamMemberRequest, CreateTeamRequest, ListTeamMembersRequest, ListTeamsRequest, Membership,
    RemoveTeamMemberRequest, SetTeamMemberRoleRequest, Team, TeamRole, WhoAmIRequest,
};

use crate::client::{CallExt, Session, all_pages};
use crate::cmd::user::resolve_user;
use crate::output::{self, Format};

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

/// A team role's name (`viewer`, `developer`, `admin`) as its enum value.
pub(crate) fn parse_team_role(s: &str) -> Result<i32> {
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

#[derive(Serialize)]
pub(crate) struct MembershipView {
    pub(crate) team_id: String,
    pub(crate) team: String,
    pub(crate) user_id: String,
    pub(crate) username: String,
    pub(crate) role: String,
}

/// A team role's short name (`viewer`, `developer`, `admin`).
pub(crate) fn role_name(r: i32) -> String {
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

/// `vibebox team ...`.
pub(crate) async fn run(cmd: TeamCommand, session: &Session, format: Format) -> Result<()> {
    let mut client = session.identity();
    match cmd {
        TeamCommand::Create { name, display_name } => {
            let r = client
                .create_team(CreateTeamRequest {
                    request_id: Default::default(),
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
            let members = all_pages(|page_token| {
                let mut client = client.clone();
                let team_id = team_id.clone();
                async move {
                    let r = client
                        .list_team_members(ListTeamMembersRequest {
                            page_size: 500,
                            page_token,
                            team_id,
                        })
                        .await
                        .call()?;
                    Ok((r.memberships, r.next_page_token))
                }
            })
            .await?;
            print_members(&members, format);
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
