//! `vibebox user ...`: users (platform admins create, list, disable, enable).

use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use serde::Serialize;
use vibebox_proto::identity::{
    CreateUserRequest, ListUsersRequest, PlatformRole, SetUserDisabledRequest, User,
};

use crate::client::{CallExt, Session, all_pages};
use crate::output::{self, Format};
use crate::prompt::{prompt_password, read_line_stdin};

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

#[derive(Serialize)]
pub(crate) struct UserView {
    pub(crate) id: String,
    pub(crate) username: String,
    pub(crate) display_name: String,
    pub(crate) platform_role: String,
    pub(crate) disabled: bool,
    pub(crate) create_time: String,
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

pub(crate) async fn list_users(session: &Session) -> Result<Vec<User>> {
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
pub(crate) async fn resolve_user(session: &Session, user: &str) -> Result<String> {
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
pub(crate) async fn run(cmd: UserCommand, session: &Session, format: Format) -> Result<()> {
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
                    request_id: Default::default(),
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
