//! Storage: every query of the identity database, generic over a connection
//! or a transaction so that callers can group writes with their audit event.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Set, SqlErr,
};

use crate::entity::{idempotency, membership, team, token, token_key, user};
use crate::error::{Error, Result};
use crate::model::{
    ApiToken, Membership, PlatformRole, PrincipalKind, Restrictions, Team, TeamRole, User,
};

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
            kind: PrincipalKind::parse(&m.kind),
            team_id: m.team_id.unwrap_or_default(),
            deleted_at: m.deleted_at,
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
        kind: Set(PrincipalKind::Human.as_str().to_owned()),
        team_id: Set(None),
        deleted_at: Set(None),
        created_by: Set(None),
    }
    .insert(db)
    .await
    .map_err(|e| unique(e, "user"))?;
    Ok(model.into())
}

/// A service account to insert.
pub struct NewServiceAccount<'a> {
    pub name: &'a str,
    pub display_name: &'a str,
    pub team_id: &'a str,
    pub created_by: &'a str,
}

/// Inserts a service account: a user of kind `service_account` with no
/// password (no hash verifies against an empty string) and no platform
/// role. Its name shares the usernames' uniqueness (`AlreadyExists`).
pub async fn insert_service_account(
    db: &impl ConnectionTrait,
    new: NewServiceAccount<'_>,
) -> Result<User> {
    let model = user::ActiveModel {
        id: Set(uuid::Uuid::new_v4().to_string()),
        username: Set(new.name.to_owned()),
        display_name: Set(new.display_name.to_owned()),
        password_hash: Set(String::new()),
        platform_role: Set(PlatformRole::None.as_str().to_owned()),
        disabled: Set(false),
        created_at: Set(Utc::now()),
        kind: Set(PrincipalKind::ServiceAccount.as_str().to_owned()),
        team_id: Set(Some(new.team_id.to_owned())),
        deleted_at: Set(None),
        created_by: Set(Some(new.created_by.to_owned())),
    }
    .insert(db)
    .await
    .map_err(|e| unique(e, "user or service account"))?;
    Ok(model.into())
}

/// A team's service accounts ordered by name, paged by offset; deleted
/// ones only with `include_deleted`.
pub async fn list_service_accounts(
    db: &impl ConnectionTrait,
    team_id: &str,
    include_deleted: bool,
    offset: u64,
    limit: u64,
) -> Result<Vec<User>> {
    let mut q = user::Entity::find()
        .filter(user::Column::Kind.eq(PrincipalKind::ServiceAccount.as_str()))
        .filter(user::Column::TeamId.eq(team_id));
    if !include_deleted {
        q = q.filter(user::Column::DeletedAt.is_null());
    }
    Ok(q.order_by_asc(user::Column::Username)
        .offset(offset)
        .limit(limit)
        .all(db)
        .await?
        .into_iter()
        .map(Into::into)
        .collect())
}

/// Marks a service account deleted and disabled, for good; `None` if no
/// such service account.
pub async fn delete_service_account(
    db: &impl ConnectionTrait,
    id: &str,
    now: DateTime<Utc>,
) -> Result<Option<User>> {
    let Some(m) = user::Entity::find_by_id(id.to_owned())
        .filter(user::Column::Kind.eq(PrincipalKind::ServiceAccount.as_str()))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    let mut am: user::ActiveModel = m.into();
    am.disabled = Set(true);
    am.deleted_at = Set(Some(now));
    Ok(Some(am.update(db).await?.into()))
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

/// A user by username (people and service accounts alike).
pub async fn user_by_name(db: &impl ConnectionTrait, username: &str) -> Result<Option<User>> {
    Ok(user::Entity::find()
        .filter(user::Column::Username.eq(username))
        .one(db)
        .await?
        .map(Into::into))
}

/// A user's password hash (empty for service accounts).
pub async fn password_hash(db: &impl ConnectionTrait, id: &str) -> Result<Option<String>> {
    Ok(user::Entity::find_by_id(id.to_owned())
        .one(db)
        .await?
        .map(|m| m.password_hash))
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

/// A page of a team's memberships with display names, ordered by username
/// (unique): at most `limit`, those after the username `after` when given.
pub async fn members_of_team(
    db: &impl ConnectionTrait,
    team_id: &str,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<Membership>> {
    use sea_orm::QueryTrait;
    let in_team = membership::Entity::find()
        .select_only()
        .column(membership::Column::UserId)
        .filter(membership::Column::TeamId.eq(team_id))
        .into_query();
    let mut users = user::Entity::find().filter(user::Column::Id.in_subquery(in_team));
    if let Some(after) = after {
        users = users.filter(user::Column::Username.gt(after));
    }
    let users = users
        .order_by_asc(user::Column::Username)
        .limit(limit)
        .all(db)
        .await?;
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let roles: std::collections::HashMap<String, String> = membership::Entity::find()
        .filter(membership::Column::TeamId.eq(team_id))
        .filter(membership::Column::UserId.is_in(users.iter().map(|u| u.id.clone())))
        .all(db)
        .await?
        .into_iter()
        .map(|m| (m.user_id, m.role))
        .collect();
    let team_name = team::Entity::find_by_id(team_id.to_owned())
        .one(db)
        .await?
        .map(|t| t.name)
        .unwrap_or_default();
    Ok(users
        .into_iter()
        .filter_map(|u| {
            let role = TeamRole::parse(roles.get(&u.id)?)?;
            Some(Membership {
                team_id: team_id.to_owned(),
                user_id: u.id,
                role,
                team_name: team_name.clone(),
                username: u.username,
            })
        })
        .collect())
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
    /// The owning team of a service account's token.
    pub team_id: Option<&'a str>,
    /// Who issued it (absent for logins and bootstrap).
    pub created_by: Option<&'a str>,
    pub restrictions: &'a Restrictions,
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
        team_id: Set(new.team_id.map(str::to_owned)),
        created_by: Set(new.created_by.map(str::to_owned)),
        restrictions: Set(new.restrictions.encode()),
        last_used_at: Set(None),
    }
    .insert(db)
    .await?;
    Ok(())
}

/// Revokes every unrevoked token of a user (a deleted service account's)
/// and every token derived from them. Returns the number newly revoked.
pub async fn revoke_all_of_user(
    db: &impl ConnectionTrait,
    user_id: &str,
    now: DateTime<Utc>,
) -> Result<u64> {
    let ids: Vec<String> = token::Entity::find()
        .filter(token::Column::UserId.eq(user_id))
        .filter(token::Column::RevokedAt.is_null())
        .all(db)
        .await?
        .into_iter()
        .map(|t| t.id)
        .collect();
    let mut count = 0;
    for id in ids {
        count += revoke_tree(db, &id, now).await?;
    }
    Ok(count)
}

/// A service account's token revoked because its issuer lost the
/// authority to issue it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedMinted {
    pub id: String,
    /// The service account holding it.
    pub owner_id: String,
    /// The service account's team.
    pub team_id: String,
}

/// Revokes the active (unrevoked, unexpired) service account tokens that
/// `minter` issued, only those of `team_id` when given, and every token
/// derived from them. Returns the tokens `minter` issued, oldest first.
pub async fn revoke_minted_by(
    db: &impl ConnectionTrait,
    minter: &str,
    team_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<RevokedMinted>> {
    let mut q = token::Entity::find()
        .filter(token::Column::CreatedBy.eq(minter))
        .filter(token::Column::UserId.ne(minter))
        .filter(token::Column::RevokedAt.is_null())
        .filter(token::Column::ExpiresAt.gt(now));
    q = match team_id {
        Some(team) => q.filter(token::Column::TeamId.eq(team)),
        None => q.filter(token::Column::TeamId.is_not_null()),
    };
    let rows = q
        .order_by_asc(token::Column::CreatedAt)
        .order_by_asc(token::Column::Id)
        .all(db)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for t in rows {
        revoke_tree(db, &t.id, now).await?;
        out.push(RevokedMinted {
            id: t.id,
            owner_id: t.user_id,
            team_id: t.team_id.unwrap_or_default(),
        });
    }
    Ok(out)
}

/// A user read for a decision that a concurrent change must not slip
/// past: on PostgreSQL the row is locked `FOR SHARE` until the
/// transaction ends (a concurrent disable waits, or is waited for); SQLite
/// write transactions are serialized already.
pub async fn user_for_share(db: &impl ConnectionTrait, id: &str) -> Result<Option<User>> {
    Ok(user::Entity::find_by_id(id.to_owned())
        .lock_shared()
        .all(db)
        .await?
        .pop()
        .map(Into::into))
}

/// A user's role in a team, the membership row locked as in
/// [`user_for_share`].
pub async fn role_in_for_share(
    db: &impl ConnectionTrait,
    team_id: &str,
    user_id: &str,
) -> Result<Option<TeamRole>> {
    Ok(
        membership::Entity::find_by_id((team_id.to_owned(), user_id.to_owned()))
            .lock_shared()
            .all(db)
            .await?
            .pop()
            .and_then(|m| TeamRole::parse(&m.role)),
    )
}

/// Records that a token was used at `at` (never moves backwards).
pub async fn touch_token(db: &impl ConnectionTrait, id: &str, at: DateTime<Utc>) -> Result<()> {
    token::Entity::update_many()
        .col_expr(token::Column::LastUsedAt, Expr::value(at))
        .filter(token::Column::Id.eq(id))
        .filter(
            sea_orm::Condition::any()
                .add(token::Column::LastUsedAt.is_null())
                .add(token::Column::LastUsedAt.lt(at)),
        )
        .exec(db)
        .await?;
    Ok(())
}

/// Which API tokens to list.
#[derive(Clone, Debug, Default)]
pub struct TokenFilter {
    /// Only this owner's.
    pub owner_id: Option<String>,
    /// Only those of this team's service accounts.
    pub team_id: Option<String>,
    /// Revoked and expired ones too.
    pub show_inactive: bool,
}

/// API tokens (never sessions), newest first, paged by offset.
pub async fn list_api_tokens(
    db: &impl ConnectionTrait,
    filter: &TokenFilter,
    now: DateTime<Utc>,
    offset: u64,
    limit: u64,
) -> Result<Vec<ApiToken>> {
    let mut q = token::Entity::find().filter(token::Column::Kind.eq("api"));
    if let Some(owner) = &filter.owner_id {
        q = q.filter(token::Column::UserId.eq(owner.as_str()));
    }
    if let Some(team) = &filter.team_id {
        q = q.filter(token::Column::TeamId.eq(team.as_str()));
    }
    if !filter.show_inactive {
        q = q
            .filter(token::Column::RevokedAt.is_null())
            .filter(token::Column::ExpiresAt.gt(now));
    }
    let rows = q
        .order_by_desc(token::Column::CreatedAt)
        .order_by_asc(token::Column::Id)
        .offset(offset)
        .limit(limit)
        .all(db)
        .await?;
    let mut owners: std::collections::HashMap<String, Option<User>> =
        std::collections::HashMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for t in rows {
        if !owners.contains_key(&t.user_id) {
            let owner = user_by_id(db, &t.user_id).await?;
            owners.insert(t.user_id.clone(), owner);
        }
        let owner = owners.get(&t.user_id).cloned().flatten();
        out.push(ApiToken {
            owner_kind: owner.as_ref().map_or(PrincipalKind::Human, |u| u.kind),
            owner_name: owner.map(|u| u.username).unwrap_or_default(),
            id: t.id,
            owner_id: t.user_id,
            team_id: t.team_id.unwrap_or_default(),
            description: t.description,
            created_at: t.created_at,
            last_used_at: t.last_used_at,
            expires_at: t.expires_at,
            restrictions: Restrictions::decode(&t.restrictions),
            revoked: t.revoked_at.is_some(),
            created_by: t.created_by.unwrap_or_default(),
        });
    }
    Ok(out)
}

/// What an earlier create with the same key made.
pub struct IdempotencyRecord {
    pub fingerprint: String,
    pub resource_id: String,
}

/// The record of `(caller, operation, request_id)` made after `since`.
pub async fn idempotency_key(
    db: &impl ConnectionTrait,
    caller_id: &str,
    operation: &str,
    request_id: &str,
    since: DateTime<Utc>,
) -> Result<Option<IdempotencyRecord>> {
    Ok(idempotency::Entity::find_by_id((
        caller_id.to_owned(),
        operation.to_owned(),
        request_id.to_owned(),
    ))
    .one(db)
    .await?
    .filter(|m| m.created_at > since)
    .map(|m| IdempotencyRecord {
        fingerprint: m.fingerprint,
        resource_id: m.resource_id,
    }))
}

/// Records (or, for a key older than the window, replaces) what a create
/// made. A concurrent create with the same key is `AlreadyExists`.
pub async fn put_idempotency_key(
    db: &impl ConnectionTrait,
    caller_id: &str,
    operation: &str,
    request_id: &str,
    fingerprint: &str,
    resource_id: &str,
    before: DateTime<Utc>,
) -> Result<()> {
    // Keys past the window are forgotten (this one included, so that it
    // can be used again), a few at a time on every create.
    idempotency::Entity::delete_many()
        .filter(idempotency::Column::CreatedAt.lte(before))
        .exec(db)
        .await?;
    idempotency::ActiveModel {
        caller_id: Set(caller_id.to_owned()),
        operation: Set(operation.to_owned()),
        request_id: Set(request_id.to_owned()),
        fingerprint: Set(fingerprint.to_owned()),
        resource_id: Set(resource_id.to_owned()),
        created_at: Set(Utc::now()),
    }
    .insert(db)
    .await
    .map_err(|e| unique(e, "request"))?;
    Ok(())
}

/// Points a key at what its latest attempt made (a token retry).
pub async fn update_idempotency_key(
    db: &impl ConnectionTrait,
    caller_id: &str,
    operation: &str,
    request_id: &str,
    resource_id: &str,
) -> Result<()> {
    idempotency::Entity::update_many()
        .col_expr(idempotency::Column::ResourceId, Expr::value(resource_id))
        .filter(idempotency::Column::CallerId.eq(caller_id))
        .filter(idempotency::Column::Operation.eq(operation))
        .filter(idempotency::Column::RequestId.eq(request_id))
        .exec(db)
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
