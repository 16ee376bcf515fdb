//! Service accounts, API tokens (issue, restrictions, the registry
//! `ListApiTokens` reads) and the idempotency of creates.
//!
//! **Service accounts.** A service account is a user row of kind
//! `service_account`: it has an id (what audit events and memberships name),
//! a name unique among usernames and service account names, exactly one team
//! (a membership row with its role) and no password (Login refuses it as a
//! wrong password, with the same work and the same answer). Its team's
//! admins, and platform admins, create, delete and issue tokens for it; the
//! role given is at most the creator's own role in the team (platform admins:
//! any). It is never added to another team, never removed from its own (it
//! is deleted instead), never has a platform role, and never manages
//! identities itself, whatever its role: no users, teams, members, service
//! accounts or tokens (see `rbac::IDENTITY_MANAGEMENT`; a leaked automation
//! token must not mint more credentials). Deleting one disables it for good,
//! removes its membership and revokes every token it has; the row stays for
//! the audit trail.
//!
//! **Service account tokens** hold the service account's own id and are not
//! derived from the admin's token: revoking the admin's session leaves them
//! working, and their lifetime (default 30 days) is capped by the platform
//! maximum only. The calling token must still be unattenuated.
//!
//! **Their issuer's authority bounds them.** A token records who minted it
//! (`created_by`); when that person loses the authority to mint it, the
//! tokens they minted are revoked in the same transaction, and audited
//! (`token.revoke_minted`): removed from the team or demoted below admin
//! (that team's tokens; not for a platform admin, who may still mint them),
//! or disabled (every team's). Minting re-checks the issuer's authority
//! inside its own transaction, under a shared lock of the rows those
//! changes write (PostgreSQL; SQLite serializes writers), so a mint racing
//! a removal either sees it or is revoked by it.
//!
//! **Restrictions** (`TokenRestrictions`, on both kinds of API token) are
//! checked (at most 16 values a list, known operations) and baked into the
//! token as one attenuation block of `check if team(..) or team(..)` checks,
//! the only shape services accept; they are stored for listing too.
//!
//! **The registry.** Every API token (never login sessions) is listed by
//! `ListApiTokens` with its owner, team, description, times and
//! restrictions and issuer, never its secret: the caller's own; a team
//! admin's view of the team's service accounts' tokens (`team_id`, or
//! `owner_id` of one of them); any principal's for platform admins, who see
//! every API token when naming neither. A service account sees its own
//! only, whatever its role (as `RevokeToken` lets it revoke its own only).
//!
//! **Idempotency.** A create with a `request_id` records `(caller, operation,
//! request_id)` with a SHA-256 fingerprint of its fields for 24 hours. A
//! retry with the same fields gets the same user, team or service account; a
//! retry of a token create revokes the token the earlier attempt issued and
//! issues a fresh one (a token's secret is never stored, so the only way to
//! answer again is a new token, and at most one token per key is ever
//! valid). The same key with different fields is FAILED_PRECONDITION
//! `request_id.reused` (ErrorInfo and PreconditionFailure): the caller made a
//! mistake, and silently answering with the other request's resource would
//! hide it. For `CreateUser` the password is compared with the created
//! user's Argon2 hash, never put into the fingerprint.

use std::time::Duration;

use chrono::Utc;
use sha2::{Digest, Sha256};
use vibebox_proto::audit::{Outcome, Severity};

use super::{API_TOKEN_DEFAULT_TTL, Caller, Identity, Page, RequestContext, next_token};
use crate::audit::Event;
use crate::error::{Error, Result};
use crate::model::{
    ApiToken, IssuedToken, PlatformRole, Restrictions, ServiceAccount, TeamRole, User,
    validate_display_name, validate_id, validate_name,
};
use crate::rbac::Resource;
use crate::store;

/// How long a `request_id` is remembered.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Longest description of an API token.
const MAX_DESCRIPTION: usize = 256;
/// Token ids named by one `token.revoke_minted` event (about 19 KB).
const REVOKED_IDS_PER_EVENT: usize = 500;

static NO_RESTRICTIONS: Restrictions = Restrictions {
    team_ids: Vec::new(),
    operations: Vec::new(),
    environment_ids: Vec::new(),
};

/// A token to mint and record.
#[derive(Clone, Copy, Debug)]
pub struct NewToken<'a> {
    pub user_id: &'a str,
    /// The token it derives from (revoking that one revokes this one).
    pub parent_id: Option<&'a str>,
    /// "session" or "api".
    pub kind: &'a str,
    pub description: &'a str,
    pub ttl: Duration,
    /// The owning team of a service account's token.
    pub team_id: Option<&'a str>,
    /// Who asked for it.
    pub created_by: Option<&'a str>,
    pub restrictions: &'a Restrictions,
}

impl Default for NewToken<'_> {
    fn default() -> Self {
        Self {
            user_id: "",
            parent_id: None,
            kind: "api",
            description: "",
            ttl: Duration::ZERO,
            team_id: None,
            created_by: None,
            restrictions: &NO_RESTRICTIONS,
        }
    }
}

/// A `CreateServiceAccount` request.
#[derive(Clone, Debug, Default)]
pub struct NewServiceAccount {
    pub team_id: String,
    pub name: String,
    pub display_name: String,
    pub role: Option<TeamRole>,
    pub request_id: String,
}

/// A `ListApiTokens` request.
#[derive(Clone, Debug, Default)]
pub struct ApiTokenQuery {
    pub owner_id: String,
    pub team_id: String,
    pub show_inactive: bool,
    pub page: Page,
}

/// Checks an optional `request_id`: at most 128 characters of
/// `[A-Za-z0-9._:-]`.
pub(crate) fn validate_request_id(request_id: &str) -> Result<()> {
    let ok = request_id.len() <= 128
        && request_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "request_id",
            "at most 128 characters: letters, digits, '.', '_', ':' and '-'",
        ))
    }
}

/// The refusal of moving a service account between teams.
pub(crate) fn single_team(description: &str) -> Error {
    Error::Refused {
        message: description.to_owned(),
        violations: vec![(
            "service_account.single_team",
            "user_id".into(),
            description.to_owned(),
        )],
    }
}

/// An idempotency key: the caller, the operation, the request id and the
/// fingerprint of the request's fields. Without a request id it does
/// nothing.
pub(crate) struct Key<'a> {
    caller_id: &'a str,
    operation: &'static str,
    request_id: &'a str,
    fingerprint: String,
}

impl<'a> Key<'a> {
    pub(crate) fn new(
        caller: &'a Caller,
        operation: &'static str,
        request_id: &'a str,
        fields: &[&str],
    ) -> Self {
        let mut hash = Sha256::new();
        for field in std::iter::once(&operation).chain(fields) {
            hash.update((field.len() as u64).to_be_bytes());
            hash.update(field.as_bytes());
        }
        Self {
            caller_id: &caller.user.id,
            operation,
            request_id,
            fingerprint: hex::encode(hash.finalize()),
        }
    }

    /// Whether the request carried a request id.
    pub(crate) fn is_set(&self) -> bool {
        !self.request_id.is_empty()
    }

    fn since() -> chrono::DateTime<Utc> {
        Utc::now() - chrono::Duration::from_std(IDEMPOTENCY_WINDOW).unwrap_or_default()
    }

    /// What an earlier request with this key made; `RequestReused` if that
    /// request had other fields.
    async fn find(&self, db: &impl sea_orm::ConnectionTrait) -> Result<Option<String>> {
        if !self.is_set() {
            return Ok(None);
        }
        match store::idempotency_key(
            db,
            self.caller_id,
            self.operation,
            self.request_id,
            Self::since(),
        )
        .await?
        {
            Some(record) if record.fingerprint == self.fingerprint => Ok(Some(record.resource_id)),
            Some(_) => Err(Error::RequestReused),
            None => Ok(None),
        }
    }

    /// Records that this key made `resource_id` (inside the creating
    /// transaction; a concurrent twin makes it `AlreadyExists`).
    pub(crate) async fn put(
        &self,
        db: &impl sea_orm::ConnectionTrait,
        resource_id: &str,
    ) -> Result<()> {
        if !self.is_set() {
            return Ok(());
        }
        store::put_idempotency_key(
            db,
            self.caller_id,
            self.operation,
            self.request_id,
            &self.fingerprint,
            resource_id,
            Self::since(),
        )
        .await
    }
}

impl Identity {
    /// What an earlier create with `key` made, if anything.
    pub(super) async fn replayed(&self, key: &Key<'_>) -> Result<Option<String>> {
        key.find(&self.db).await
    }

    /// A service account the caller may see (a member of its team or a
    /// platform admin); anything else is NOT_FOUND, as an unknown id.
    async fn visible_service_account(&self, caller: &Caller, id: &str) -> Result<User> {
        validate_id("service_account_id", id)?;
        let sa = store::user_by_id(&self.db, id)
            .await?
            .filter(User::is_service_account)
            .ok_or(Error::NotFound("service account"))?;
        match self.visible_team(caller, &sa.team_id).await {
            Ok(_) => Ok(sa),
            Err(Error::NotFound(_)) => Err(Error::NotFound("service account")),
            Err(e) => Err(e),
        }
    }

    /// Creates a service account in a team (its admins, platform admins).
    pub async fn create_service_account(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        new: &NewServiceAccount,
    ) -> Result<ServiceAccount> {
        self.visible_team(caller, &new.team_id).await?;
        let own_role = self
            .require(
                caller,
                "identity.service_account.create",
                &Self::team_resource(&new.team_id),
            )
            .await?;
        validate_name("name", &new.name)?;
        validate_display_name("display_name", &new.display_name)?;
        validate_request_id(&new.request_id)?;
        let role = new
            .role
            .ok_or_else(|| Error::invalid("role", "a team role is required"))?;
        if caller.user.platform_role != PlatformRole::Admin && own_role.is_none_or(|r| role > r) {
            return Err(Error::PermissionDenied(
                "a service account's role is at most your own role in the team".into(),
            ));
        }
        let display_name = if new.display_name.is_empty() {
            new.name.as_str()
        } else {
            new.display_name.as_str()
        };
        let key = Key::new(
            caller,
            "service_account.create",
            &new.request_id,
            &[&new.team_id, &new.name, display_name, role.as_str()],
        );
        if let Some(sa) = self.replayed_service_account(&key).await? {
            return Ok(sa);
        }
        let created = self
            .insert_service_account(caller, ctx, new, display_name, role, &key)
            .await;
        match created {
            Err(Error::AlreadyExists(_)) if key.is_set() => {
                match self.replayed_service_account(&key).await? {
                    Some(sa) => Ok(sa),
                    None => created,
                }
            }
            other => other,
        }
    }

    async fn replayed_service_account(&self, key: &Key<'_>) -> Result<Option<ServiceAccount>> {
        let Some(id) = self.replayed(key).await? else {
            return Ok(None);
        };
        let user = store::user_by_id(&self.db, &id)
            .await?
            .ok_or(Error::NotFound("service account"))?;
        let role = store::role_in(&self.db, &user.team_id, &user.id).await?;
        Ok(Some(ServiceAccount { user, role }))
    }

    async fn insert_service_account(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        new: &NewServiceAccount,
        display_name: &str,
        role: TeamRole,
        key: &Key<'_>,
    ) -> Result<ServiceAccount> {
        let txn = vibebox_db::begin_write(&self.db).await?;
        let user = store::insert_service_account(
            &txn,
            store::NewServiceAccount {
                name: &new.name,
                display_name,
                team_id: &new.team_id,
                created_by: &caller.user.id,
            },
        )
        .await?;
        store::add_member(&txn, &new.team_id, &user.id, role).await?;
        key.put(&txn, &user.id).await?;
        self.audit
            .record(
                &caller.origin(&ctx.client_address, &ctx.request_id),
                Event {
                    action: "service_account.create",
                    resource_type: "service_account",
                    resource_id: &user.id,
                    team_id: &new.team_id,
                    outcome: Outcome::Success,
                    severity: Severity::Medium,
                    details: &[("name", &new.name), ("role", role.as_str())],
                },
            )
            .await?;
        txn.commit().await?;
        Ok(ServiceAccount {
            user,
            role: Some(role),
        })
    }

    /// A team's service accounts, deleted ones included (members, platform
    /// admins), paged.
    pub async fn list_service_accounts(
        &self,
        caller: &Caller,
        team_id: &str,
        page: &Page,
    ) -> Result<(Vec<ServiceAccount>, String)> {
        self.visible_team(caller, team_id).await?;
        self.require(
            caller,
            "identity.service_account.list",
            &Self::team_resource(team_id),
        )
        .await?;
        let (offset, size) = page.bounds()?;
        let users = store::list_service_accounts(&self.db, team_id, true, offset, size).await?;
        let next = next_token(offset, size, users.len());
        let mut out = Vec::with_capacity(users.len());
        for user in users {
            let role = store::role_in(&self.db, team_id, &user.id).await?;
            out.push(ServiceAccount { user, role });
        }
        Ok((out, next))
    }

    /// Deletes a service account (its team's admins, platform admins):
    /// disabled for good, out of its team, every token revoked; the record
    /// stays. Deleting it again answers the same, changing nothing.
    pub async fn delete_service_account(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        id: &str,
    ) -> Result<ServiceAccount> {
        let sa = self.visible_service_account(caller, id).await?;
        self.require(
            caller,
            "identity.service_account.delete",
            &Self::team_resource(&sa.team_id),
        )
        .await?;
        let txn = vibebox_db::begin_write(&self.db).await?;
        let role = store::role_in(&txn, &sa.team_id, &sa.id).await?;
        if sa.deleted_at.is_some() {
            return Ok(ServiceAccount { user: sa, role });
        }
        let now = Utc::now();
        let user = store::delete_service_account(&txn, &sa.id, now)
            .await?
            .ok_or(Error::NotFound("service account"))?;
        store::remove_member(&txn, &sa.team_id, &sa.id).await?;
        let revoked = store::revoke_all_of_user(&txn, &sa.id, now).await?;
        self.audit
            .record(
                &caller.origin(&ctx.client_address, &ctx.request_id),
                Event {
                    action: "service_account.delete",
                    resource_type: "service_account",
                    resource_id: &sa.id,
                    team_id: &sa.team_id,
                    outcome: Outcome::Success,
                    severity: Severity::Medium,
                    details: &[
                        ("name", &sa.username),
                        ("revoked_tokens", &revoked.to_string()),
                    ],
                },
            )
            .await?;
        txn.commit().await?;
        Ok(ServiceAccount { user, role })
    }

    /// Issues an API token for the caller, derived from the calling token
    /// (revoking that one revokes this one too). Tokens never widen:
    /// - the calling token must be unattenuated (a Login session or an API
    ///   token as issued): an attenuated token's restrictions cannot be
    ///   carried into a fresh token, so it mints nothing (`token.attenuated_parent`);
    /// - the new token never outlives the calling one (`token.outlives_parent`;
    ///   without a requested TTL the default is cut to fit);
    /// - no API token lives longer than the platform maximum (`token.max_ttl`).
    ///
    /// `restrictions` are baked in; a retry with the same `request_id`
    /// revokes the earlier attempt's token and issues a fresh one.
    pub async fn create_api_token(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        description: &str,
        ttl: Option<Duration>,
        restrictions: Restrictions,
        request_id: &str,
    ) -> Result<IssuedToken> {
        self.require(caller, "identity.token.create", &Resource::default())
            .await?;
        validate_description(description)?;
        validate_request_id(request_id)?;
        let restrictions = restrictions.validated()?;
        let ttl_field = ttl.map_or_else(|| "default".to_owned(), |t| t.as_secs().to_string());
        let key = Key::new(
            caller,
            "token.create",
            request_id,
            &[description, &ttl_field, &restrictions.encode()],
        );
        let ttl = self.token_ttl(caller, ttl, Utc::now(), true)?;
        let new = NewToken {
            user_id: &caller.user.id,
            parent_id: Some(&caller.token_id),
            kind: "api",
            description,
            ttl,
            team_id: None,
            created_by: Some(&caller.user.id),
            restrictions: &restrictions,
        };
        self.issue_once(caller, ctx, &key, new, caller.user.kind.actor_kind())
            .await
    }

    /// Issues an API token for a service account (its team's admins,
    /// platform admins; an unattenuated calling token). It holds the service
    /// account's id, does not derive from the calling token, and lives 30
    /// days unless asked otherwise, at most the platform maximum.
    #[allow(clippy::too_many_arguments)] // the request's fields, one each
    pub async fn create_service_account_token(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        service_account_id: &str,
        description: &str,
        ttl: Option<Duration>,
        restrictions: Restrictions,
        request_id: &str,
    ) -> Result<IssuedToken> {
        let sa = self
            .visible_service_account(caller, service_account_id)
            .await?;
        self.require(
            caller,
            "identity.service_account.token_create",
            &Self::team_resource(&sa.team_id),
        )
        .await?;
        validate_description(description)?;
        validate_request_id(request_id)?;
        let restrictions = restrictions.validated()?;
        if sa.disabled {
            return Err(Error::FailedPrecondition(
                "the service account is disabled or deleted".into(),
            ));
        }
        let ttl_field = ttl.map_or_else(|| "default".to_owned(), |t| t.as_secs().to_string());
        let key = Key::new(
            caller,
            "service_account.token_create",
            request_id,
            &[&sa.id, description, &ttl_field, &restrictions.encode()],
        );
        let ttl = self.token_ttl(caller, ttl, Utc::now(), false)?;
        let new = NewToken {
            user_id: &sa.id,
            parent_id: None,
            kind: "api",
            description,
            ttl,
            team_id: Some(&sa.team_id),
            created_by: Some(&caller.user.id),
            restrictions: &restrictions,
        };
        self.issue_once(caller, ctx, &key, new, sa.kind.actor_kind())
            .await
    }

    /// Issues `new` once per key: a retry revokes what the earlier attempt
    /// issued (and what derives from it) in the same transaction.
    async fn issue_once(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        key: &Key<'_>,
        new: NewToken<'_>,
        owner_kind: &str,
    ) -> Result<IssuedToken> {
        // A concurrent twin with the same key may win the key's insert
        // (PostgreSQL; SQLite serializes writers): then once more, as a retry.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let txn = vibebox_db::begin_write(&self.db).await?;
            if let Some(team) = new.team_id {
                self.recheck_minter(&txn, caller, team, new.user_id).await?;
            }
            let earlier = key.find(&txn).await?;
            let now = Utc::now();
            if let Some(old) = &earlier {
                store::revoke_tree(&txn, old, now).await?;
            }
            let issued = self.issue(&txn, new).await?;
            let recorded = match &earlier {
                Some(_) => {
                    store::update_idempotency_key(
                        &txn,
                        key.caller_id,
                        key.operation,
                        key.request_id,
                        &issued.token_id,
                    )
                    .await
                }
                None => key.put(&txn, &issued.token_id).await,
            };
            match recorded {
                Err(Error::AlreadyExists(_)) if attempts < 2 => continue,
                other => other?,
            }
            let expires = issued.expires_at.to_rfc3339();
            let restrictions = new.restrictions.encode().replace('\n', "; ");
            let mut details = vec![
                ("description", new.description),
                ("owner", new.user_id),
                ("owner_kind", owner_kind),
                ("expire_time", expires.as_str()),
            ];
            if !restrictions.is_empty() {
                details.push(("restrictions", restrictions.as_str()));
            }
            if let Some(old) = &earlier {
                details.push(("replaces", old.as_str()));
            }
            self.audit
                .record(
                    &caller.origin(&ctx.client_address, &ctx.request_id),
                    Event {
                        action: "token.create",
                        resource_type: "token",
                        resource_id: &issued.token_id,
                        team_id: new.team_id.unwrap_or_default(),
                        outcome: Outcome::Success,
                        severity: if new.team_id.is_some() {
                            Severity::Medium
                        } else {
                            Severity::Low
                        },
                        details: &details,
                    },
                )
                .await?;
            txn.commit().await?;
            return Ok(issued);
        }
    }

    /// Re-checks, inside the minting transaction, what `create_service_account_token`
    /// checked before it: the caller is still enabled and an admin of
    /// `team_id` (or a platform admin), and the service account is still
    /// enabled. The rows read stay share-locked (PostgreSQL) until the
    /// transaction ends, so a concurrent removal, demotion, disabling or
    /// deletion either comes first (and this refuses) or waits for the
    /// token and then revokes it.
    async fn recheck_minter(
        &self,
        txn: &impl sea_orm::ConnectionTrait,
        caller: &Caller,
        team_id: &str,
        service_account_id: &str,
    ) -> Result<()> {
        let minter = store::user_for_share(txn, &caller.user.id)
            .await?
            .filter(|u| !u.disabled)
            .ok_or_else(|| Error::Unauthenticated("user disabled".into()))?;
        if minter.platform_role != PlatformRole::Admin
            && store::role_in_for_share(txn, team_id, &minter.id).await? != Some(TeamRole::Admin)
        {
            return Err(Error::PermissionDenied(
                "no longer an admin of the service account's team".into(),
            ));
        }
        if store::user_for_share(txn, service_account_id)
            .await?
            .is_none_or(|sa| sa.disabled)
        {
            return Err(Error::FailedPrecondition(
                "the service account is disabled or deleted".into(),
            ));
        }
        Ok(())
    }

    /// Revokes the service account tokens `minter` issued (in `team_id`
    /// only, when given: see the module's documentation), inside the
    /// caller's transaction, with one audit event per team (token ids in
    /// chunks, so that no event grows without bound). `cause` is the
    /// action that took the authority away. Returns the number revoked.
    pub(super) async fn revoke_minted(
        &self,
        txn: &impl sea_orm::ConnectionTrait,
        caller: &Caller,
        ctx: &RequestContext,
        minter: &str,
        team_id: Option<&str>,
        cause: &str,
    ) -> Result<usize> {
        let revoked = store::revoke_minted_by(txn, minter, team_id, Utc::now()).await?;
        let mut by_team: std::collections::BTreeMap<&str, Vec<&str>> =
            std::collections::BTreeMap::new();
        for t in &revoked {
            by_team.entry(&t.team_id).or_default().push(&t.id);
        }
        for (team, ids) in by_team {
            for chunk in ids.chunks(REVOKED_IDS_PER_EVENT) {
                let count = chunk.len().to_string();
                let token_ids = chunk.join(",");
                self.audit
                    .record(
                        &caller.origin(&ctx.client_address, &ctx.request_id),
                        Event {
                            action: "token.revoke_minted",
                            resource_type: "user",
                            resource_id: minter,
                            team_id: team,
                            outcome: Outcome::Success,
                            severity: Severity::Medium,
                            details: &[
                                ("reason", cause),
                                ("minted_by", minter),
                                ("revoked", &count),
                                ("token_ids", &token_ids),
                            ],
                        },
                    )
                    .await?;
            }
        }
        Ok(revoked.len())
    }

    /// The lifetime of an API token minted by `caller` at `now`: see
    /// [`Identity::create_api_token`]. `bound_by_caller`: whether it may
    /// not outlive the calling token (a service account's token is not
    /// derived from it, so it is not bound).
    pub(super) fn token_ttl(
        &self,
        caller: &Caller,
        requested: Option<Duration>,
        now: chrono::DateTime<Utc>,
        bound_by_caller: bool,
    ) -> Result<Duration> {
        if caller.attenuated() {
            return Err(Error::Refused {
                message: "an attenuated token cannot mint API tokens".into(),
                violations: vec![(
                    "token.attenuated_parent",
                    "authorization".into(),
                    "API tokens are minted only with an unattenuated token (a Login \
                     session or an API token as issued): restrictions are never dropped"
                        .into(),
                )],
            });
        }
        let max = self.settings.max_api_token_ttl;
        let parent_left = if bound_by_caller {
            (caller.token_expires_at - now)
                .to_std()
                .unwrap_or(Duration::ZERO)
        } else {
            Duration::MAX
        };
        let Some(requested) = requested else {
            let ttl = API_TOKEN_DEFAULT_TTL.min(max).min(parent_left);
            if ttl < Duration::from_secs(1) {
                return Err(Error::Refused {
                    message: "the calling token is about to expire".into(),
                    violations: vec![(
                        "token.outlives_parent",
                        "ttl_seconds".into(),
                        "the calling token expires within a second".into(),
                    )],
                });
            }
            return Ok(ttl);
        };
        if requested.is_zero() {
            return Err(Error::invalid("ttl_seconds", "at least 1 second"));
        }
        let mut violations = Vec::new();
        if requested > max {
            violations.push((
                "token.max_ttl",
                "ttl_seconds".into(),
                format!(
                    "API tokens live at most {} seconds on this platform",
                    max.as_secs()
                ),
            ));
        }
        if requested > parent_left {
            violations.push((
                "token.outlives_parent",
                "ttl_seconds".into(),
                format!(
                    "a minted token never outlives the calling token, which expires at {} \
                     (at most {} seconds from now)",
                    caller.token_expires_at.to_rfc3339(),
                    parent_left.as_secs()
                ),
            ));
        }
        if violations.is_empty() {
            Ok(requested)
        } else {
            Err(Error::Refused {
                message: "the requested token lifetime is not allowed".into(),
                violations,
            })
        }
    }

    /// API tokens (never their secret), newest first: the caller's own;
    /// with `team_id`, the team's service accounts' (its admins); with
    /// `owner_id`, that principal's (platform admins, or a team admin for
    /// one of the team's service accounts); every API token for platform
    /// admins naming neither. A service account, whatever its role, sees
    /// its own only (`team_id` narrows them; another `owner_id` is refused).
    pub async fn list_api_tokens(
        &self,
        caller: &Caller,
        query: &ApiTokenQuery,
    ) -> Result<(Vec<ApiToken>, String)> {
        let resource = if query.team_id.is_empty() {
            Resource::default()
        } else {
            Self::team_resource(&query.team_id)
        };
        self.require(caller, "identity.token.list", &resource)
            .await?;
        let platform_admin = caller.user.platform_role == PlatformRole::Admin;
        let mut filter = store::TokenFilter {
            show_inactive: query.show_inactive,
            ..store::TokenFilter::default()
        };
        let service_account = caller.user.is_service_account();
        if !query.team_id.is_empty() {
            self.visible_team(caller, &query.team_id).await?;
            if service_account {
                // Its own tokens in its team, never its peers'.
                filter.owner_id = Some(caller.user.id.clone());
            } else if !platform_admin
                && store::role_in(&self.db, &query.team_id, &caller.user.id).await?
                    != Some(TeamRole::Admin)
            {
                return Err(Error::PermissionDenied(
                    "a team's service account tokens are for its admins".into(),
                ));
            }
            filter.team_id = Some(query.team_id.clone());
        }
        if !query.owner_id.is_empty() {
            validate_id("owner_id", &query.owner_id)?;
            if query.owner_id != caller.user.id && service_account {
                return Err(Error::PermissionDenied(
                    "a service account lists its own tokens only".into(),
                ));
            }
            if query.owner_id != caller.user.id && !platform_admin {
                // A team admin, for one of the team's service accounts.
                let team_of_owner = store::user_by_id(&self.db, &query.owner_id)
                    .await?
                    .filter(User::is_service_account)
                    .map(|sa| sa.team_id);
                let admin_of_it = match &team_of_owner {
                    Some(team) => {
                        store::role_in(&self.db, team, &caller.user.id).await?
                            == Some(TeamRole::Admin)
                    }
                    None => false,
                };
                if !admin_of_it {
                    return Err(Error::PermissionDenied(
                        "only your own tokens, your teams' service accounts' (team \
                         admins) or anyone's (platform admins)"
                            .into(),
                    ));
                }
            }
            filter.owner_id = Some(query.owner_id.clone());
        }
        if query.team_id.is_empty() && query.owner_id.is_empty() && !platform_admin {
            filter.owner_id = Some(caller.user.id.clone());
        }
        let (offset, size) = query.page.bounds()?;
        let tokens = store::list_api_tokens(&self.db, &filter, Utc::now(), offset, size).await?;
        let next = next_token(offset, size, tokens.len());
        Ok((tokens, next))
    }
}

fn validate_description(description: &str) -> Result<()> {
    if description.chars().count() > MAX_DESCRIPTION || description.chars().any(char::is_control) {
        return Err(Error::invalid(
            "description",
            "at most 256 characters, no control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_bounded_and_plain() {
        validate_request_id("").unwrap();
        validate_request_id("ci-run:42.retry_1").unwrap();
        assert!(validate_request_id(&"a".repeat(129)).is_err());
        assert!(validate_request_id("a b").is_err());
        assert!(validate_request_id("a/b").is_err());
    }
}
