//! Storage: every query of the identity database, generic over a connection
//! or a transaction so that callers can group writes with their audit event.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Set, SqlErr,
};

use crate::entity::{membership, team, token, token_key, user};
use crate::error::{Error, Result};
use crate::model::{Membership, PlatformRole, Team, TeamRole, User};

fn unique(err: DbErr, what: &'static str) -> Error {
    match err.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(_)) => Error::AlreadyExists(what),
        _ => Error::Database(err),
    }
}

impl From<user::Model> for User {
    fn from(m: user::Model) -> Self {
        User {
            id: m.id,
            username: m.username,
            display_name: m.display_name,
            platform_role: PlatformRole::parse(&m.platform_role),
            disabled: m.disabled,
            created_at: m.created_at,
        }
    }
}

impl From<team::Model> for Team {
    fn from(m: team::Model) -> Self {
        Team {
            id: m.id,
            name: m.name,
            display_name: m.display_name,
            created_at: m.created_at,
        }
    }
}

/// A user to insert.
pub struct NewUser<'a> {
    pub username: &'a str,
    pub display_name: &'a str,
    pub password_hash: String,
    pub platform_role: PlatformRole,
}

/// Inserts a user; a taken username is `AlreadyExists`.
pub async fn insert_user(db: &impl ConnectionTrait, new: NewUser<'_>) -> Result<User> {
    let model = user::ActiveModel {
        id: Set(uuid::Uuid::new_v4().to_string()),
        username: Set(new.username.to_owned()),
        display_name: Set(new.display_name.to_owned()),
        password_hash: Set(new.password_hash),
        platform_role: Set(new.platform_role.as_str().to_owned()),
        disabled: Set(false),
        created_at: Set(Utc::now()),
    }
    .insert(db)
    .await
    .map_err(|e| unique(e, "user"))?;
    Ok(model.into())
}

/// Number of users (bootstrap runs on zero).
pub async fn count_users(db: &impl ConnectionTrait) -> Result<u64> {
    Ok(user::Entity::find().count(db).await?)
}

/// A user by id.
pub async fn user_by_id(db: &impl ConnectionTrait, id: &str) -> Result<Option<User>> {
    // `.all()` on the primary key rather than `.one()`: `.one()` binds
    // `LIMIT ?`, which makes SQLite re-prepare the statement on every
    // execution; this lookup runs on every authenticated call.
    Ok(user::Entity::find_by_id(id.to_owned())
        .all(db)
        .await?
        .pop()
        .map(Into::into))
}

/// A user and their password hash, by username.
pub async fn user_with_hash(
    db: &impl ConnectionTrait,
    username: &str,
) -> Result<Option<(User, String)>> {
    Ok(user::Entity::find()
        .filter(user::Column::Username.eq(username))
        .one(db)
        .await?
        .map(|m| {
            let hash = m.password_hash.clone();
            (m.into(), hash)
        }))
}

/// Users ordered by username, paged by offset.
pub async fn list_users(db: &impl ConnectionTrait, offset: u64, limit: u64) -> Result<Vec<User>> {
    Ok(user::Entity::find()
        .order_by_asc(user::Column::Username)
        .offset(offset)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(Into::into)
        .collect())
}

/// Sets a user's disabled flag; `None` if no such user.
pub async fn set_user_disabled(
    db: &impl ConnectionTrait,
    id: &str,
    disabled: bool,
) -> Result<Option<User>> {
    let Some(m) = user::Entity::find_by_id(id.to_owned()).one(db).await? else {
        return Ok(None);
    };
    let mut am: user::ActiveModel = m.into();
    am.disabled = Set(disabled);
    Ok(Some(am.update(db).await?.into()))
}

/// Inserts a team; a taken name is `AlreadyExists`.
pub async fn insert_team(
    db: &impl ConnectionTrait,
    name: &str,
    display_name: &str,
) -> Result<Team> {
    let model = team::ActiveModel {
        id: Set(uuid::Uuid::new_v4().to_string()),
        name: Set(name.to_owned()),
        display_name: Set(display_name.to_owned()),
        created_at: Set(Utc::now()),
    }
    .insert(db)
    .await
    .map_err(|e| unique(e, "team"))?;
    Ok(model.into())
}

/// A team by id.
pub async fn team_by_id(db: &impl ConnectionTrait, id: &str) -> Result<Option<Team>> {
    Ok(team::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .map(Into::into))
}

/// Teams ordered by name; only `only_ids` when given.
pub async fn list_teams(
    db: &impl ConnectionTrait,
    only_ids: Option<Vec<String>>,
    offset: u64,
    limit: u64,
) -> Result<Vec<Team>> {
    let mut q = team::Entity::find().order_by_asc(team::Column::Name);
    if let Some(ids) = only_ids {
        q = q.filter(team::Column::Id.is_in(ids));
    }
    Ok(q.offset(offset)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(Into::into)
        .collect())
}

/// A user's role in a team, if a member.
pub async fn role_in(
    db: &impl ConnectionTrait,
    team_id: &str,
    user_id: &str,
) -> Result<Option<TeamRole>> {
    Ok(
        membership::Entity::find_by_id((team_id.to_owned(), user_id.to_owned()))
            .one(db)
            .await?
            .and_then(|m| TeamRole::parse(&m.role)),
    )
}

/// Every (team id, role) of a user.
pub async fn roles_of(db: &impl ConnectionTrait, user_id: &str) -> Result<Vec<(String, TeamRole)>> {
    Ok(membership::Entity::find()
        .filter(membership::Column::UserId.eq(user_id))
        .order_by_asc(membership::Column::TeamId)
        .all(db)
        .await?
        .into_iter()
        .filter_map(|m| TeamRole::parse(&m.role).map(|r| (m.team_id, r)))
        .collect())
}

async fn decorate(
    db: &impl ConnectionTrait,
    rows: Vec<membership::Model>,
) -> Result<Vec<Membership>> {
    let mut out = Vec::with_capacity(rows.len());
    for m in rows {
        let Some(role) = TeamRole::parse(&m.role) else {
            continue;
        };
        let team_name = team::Entity::find_by_id(m.team_id.clone())
            .one(db)
            .await?
            .map(|t| t.name)
            .unwrap_or_default();
        let username = user::Entity::find_by_id(m.user_id.clone())
            .one(db)
            .await?
            .map(|u| u.username)
            .unwrap_or_default();
        out.push(Membership {
            team_id: m.team_id,
            user_id: m.user_id,
            role,
            team_name,
            username,
        });
    }
    Ok(out)
}

/// A user's memberships with display names.
pub async fn memberships_of_user(
    db: &impl ConnectionTrait,
    user_id: &str,
) -> Result<Vec<Membership>> {
    let rows = membership::Entity::find()
        .filter(membership::Column::UserId.eq(user_id))
        .order_by_asc(membership::Column::TeamId)
        .all(db)
        .await?;
    decorate(db, rows).await
}

/// A team's memberships with display names.
pub async fn members_of_team(db: &impl ConnectionTrait, team_id: &str) -> Result<Vec<Membership>> {
    let rows = membership::Entity::find()
        .filter(membership::Column::TeamId.eq(team_id))
        .order_by_asc(membership::Column::UserId)
        .all(db)
        .await?;
    decorate(db, rows).await
}

/// One membership with display names.
pub async fn membership(
    db: &impl ConnectionTrait,
    team_id: &str,
    user_id: &str,
) -> Result<Option<Membership>> {
    let rows: Vec<_> = membership::Entity::find_by_id((team_id.to_owned(), user_id.to_owned()))
        .one(db)
        .await?
        .into_iter()
        .collect();
    Ok(decorate(db, rows).await?.pop())
}

/// Adds a membership; an existing one is `AlreadyExists`.
pub async fn add_member(
    db: &impl ConnectionTrait,
    team_id: &str,
    user_id: &str,
    role: TeamRole,
) -> Result<()> {
    membership::ActiveModel {
        team_id: Set(team_id.to_owned()),
        user_id: Set(user_id.to_owned()),
        role: Set(role.as_str().to_owned()),
        created_at: Set(Utc::now()),
    }
    .insert(db)
    .await
    .map_err(|e| unique(e, "membership"))?;
    Ok(())
}

/// Changes a member's role; false if not a member.
pub async fn set_member_role(
    db: &impl ConnectionTrait,
    team_id: &str,
    user_id: &str,
    role: TeamRole,
) -> Result<bool> {
    let res = membership::Entity::update_many()
        .col_expr(membership::Column::Role, Expr::value(role.as_str()))
        .filter(membership::Column::TeamId.eq(team_id))
        .filter(membership::Column::UserId.eq(user_id))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// Removes a membership; false if not a member.
pub async fn remove_member(
    db: &impl ConnectionTrait,
    team_id: &str,
    user_id: &str,
) -> Result<bool> {
    let res = membership::Entity::delete_by_id((team_id.to_owned(), user_id.to_owned()))
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}

/// Number of admins of a team.
pub async fn count_admins(db: &impl ConnectionTrait, team_id: &str) -> Result<u64> {
    Ok(membership::Entity::find()
        .filter(membership::Column::TeamId.eq(team_id))
        .filter(membership::Column::Role.eq(TeamRole::Admin.as_str()))
        .count(db)
        .await?)
}

/// A token record to insert.
pub struct NewToken<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub parent_id: Option<&'a str>,
    pub kind: &'a str,
    pub description: &'a str,
    pub expires_at: DateTime<Utc>,
}

/// Records an issued token.
pub async fn insert_token(db: &impl ConnectionTrait, new: NewToken<'_>) -> Result<()> {
    token::ActiveModel {
        id: Set(new.id.to_owned()),
        user_id: Set(new.user_id.to_owned()),
        parent_id: Set(new.parent_id.map(str::to_owned)),
        kind: Set(new.kind.to_owned()),
        description: Set(new.description.to_owned()),
        created_at: Set(Utc::now()),
        expires_at: Set(new.expires_at),
        revoked_at: Set(None),
    }
    .insert(db)
    .await?;
    Ok(())
}

/// A token record by id.
pub async fn token_by_id(db: &impl ConnectionTrait, id: &str) -> Result<Option<token::Model>> {
    // Primary key lookup on every authenticated call: see `user_by_id`.
    Ok(token::Entity::find_by_id(id.to_owned())
        .all(db)
        .await?
        .pop())
}

/// Revokes a token and every token derived from it (transitively).
/// Returns the number of tokens newly revoked.
pub async fn revoke_tree(db: &impl ConnectionTrait, id: &str, now: DateTime<Utc>) -> Result<u64> {
    let mut frontier = vec![id.to_owned()];
    let mut all = Vec::new();
    while !frontier.is_empty() {
        let children: Vec<String> = token::Entity::find()
            .filter(token::Column::ParentId.is_in(frontier.clone()))
            .all(db)
            .await?
            .into_iter()
            .map(|t| t.id)
            .filter(|c| !all.contains(c))
            .collect();
        all.append(&mut frontier);
        frontier = children;
    }
    let res = token::Entity::update_many()
        .col_expr(token::Column::RevokedAt, Expr::value(now))
        .filter(token::Column::Id.is_in(all))
        .filter(token::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    Ok(res.rows_affected)
}

/// Every token signing key, oldest first.
pub async fn token_keys(db: &impl ConnectionTrait) -> Result<Vec<token_key::Model>> {
    Ok(token_key::Entity::find()
        .order_by_asc(token_key::Column::KeyId)
        .all(db)
        .await?)
}

/// Records a new signing key's public half.
pub async fn insert_token_key(
    db: &impl ConnectionTrait,
    key_id: i64,
    public_key_hex: String,
) -> Result<()> {
    token_key::ActiveModel {
        key_id: Set(key_id),
        public_key: Set(public_key_hex),
        created_at: Set(Utc::now()),
        retired_at: Set(None),
    }
    .insert(db)
    .await?;
    Ok(())
}

/// Retires a key; false if unknown.
pub async fn retire_token_key(
    db: &impl ConnectionTrait,
    key_id: i64,
    now: DateTime<Utc>,
) -> Result<bool> {
    let res = token_key::Entity::update_many()
        .col_expr(token_key::Column::RetiredAt, Expr::value(now))
        .filter(token_key::Column::KeyId.eq(key_id))
        .filter(token_key::Column::RetiredAt.is_null())
        .exec(db)
        .await?;
    Ok(res.rows_affected > 0)
}
