//! The identity service's business logic: login, token issue and
//! revocation, user and team management, and authorization decisions.
//! Takes and returns domain types; the gRPC adapters live in `grpc`.
//!
//! Invariant: every authentication re-reads the database (token revoked or
//! expired, user disabled, current team role), so revocation, disabling and
//! demotion take effect on the next call; the gateway caches decisions for at
//! most [`DECISION_CACHE_TTL_MS`].

use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::PasswordHasher;
use argon2::{Argon2, PasswordVerifier};
use chrono::Utc;
use sea_orm::DatabaseConnection;
use vibebox_proto::audit::{Outcome, Severity};
use vibebox_token::{AuthzRequest, Claims, Evaluator, VerifiedToken};

use crate::audit::{Auditor, Event, Origin};
use crate::error::{Error, Result};
use crate::keys::{KeyInfo, KeyStore};
use crate::model::{
    IssuedToken, Membership, PlatformRole, Team, TeamRole, User, validate_display_name,
    validate_id, validate_name, validate_password,
};
use crate::ratelimit::{LoginLimiter, LoginLimits, Verdict};
use crate::rbac::{self, Decision, Resource, Subject};
use crate::store;

/// How long the gateway may cache an authorization decision.
pub const DECISION_CACHE_TTL_MS: u32 = 1000;
/// Default lifetime of an API token (cut to the calling token's remaining
/// lifetime and to the platform maximum).
pub const API_TOKEN_DEFAULT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default platform-wide longest lifetime of an API token (`--max-api-token-ttl-secs`).
pub const API_TOKEN_MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
const PAGE_DEFAULT: u64 = 50;
const PAGE_MAX: u64 = 500;

/// Tunables of the service.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Lifetime of a login session token.
    pub session_ttl: Duration,
    /// Failed-login budgets (per account and source, per source, per account).
    pub login_limits: LoginLimits,
    /// Longest lifetime of any API token (the bootstrap admin token included).
    pub max_api_token_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(12 * 3600),
            login_limits: LoginLimits::default(),
            max_api_token_ttl: API_TOKEN_MAX_TTL,
        }
    }
}

/// An authenticated caller: a verified, unrevoked token of an enabled user.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user: User,
    pub token_id: String,
    /// When the calling token stops working: the earlier of its record's
    /// and its authority block's expiry (attenuations may end it sooner).
    pub token_expires_at: chrono::DateTime<Utc>,
    token: VerifiedToken,
}

impl Caller {
    fn origin(&self, client_address: &str, request_id: &str) -> Origin {
        Origin {
            user_id: self.user.id.clone(),
            token_id: self.token_id.clone(),
            client_address: client_address.to_owned(),
            request_id: request_id.to_owned(),
            service: String::new(),
        }
    }
}

/// Where a request came from (for rate limits and audit records).
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    pub client_address: String,
    pub request_id: String,
}

/// An authorization answer for the gateway.
#[derive(Clone, Debug, Default)]
pub struct AuthzDecision {
    pub allowed: bool,
    pub reason: String,
    pub user_id: String,
    pub token_id: String,
    pub username: String,
    pub team_role: Option<TeamRole>,
    pub platform_role: Option<PlatformRole>,
}

/// The teams a caller belongs to.
#[derive(Clone, Debug)]
pub struct Scopes {
    pub user_id: String,
    pub platform_role: PlatformRole,
    pub teams: Vec<(String, TeamRole)>,
}

/// A page request.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub size: i32,
    pub token: String,
}

impl Page {
    fn bounds(&self) -> Result<(u64, u64)> {
        let offset = if self.token.is_empty() {
            0
        } else {
            self.token
                .parse::<u64>()
                .map_err(|_| Error::invalid("page_token", "not a token from a previous page"))?
        };
        let size = match self.size {
            n if n <= 0 => PAGE_DEFAULT,
            n => u64::try_from(n).unwrap_or(PAGE_MAX).min(PAGE_MAX),
        };
        Ok((offset, size))
    }
}

fn next_token(offset: u64, size: u64, got: usize) -> String {
    if got as u64 == size {
        (offset + size).to_string()
    } else {
        String::new()
    }
}

/// A dummy hash verified for unknown usernames, so that response time does
/// not reveal which usernames exist.
static DUMMY_HASH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    hash_password_blocking("dummy password for timing").unwrap_or_default()
});

/// Computes the dummy hash on the blocking pool, so the first failed login
/// for an unknown user does not stall a runtime thread.
pub async fn warm_up() {
    let _ = tokio::task::spawn_blocking(|| DUMMY_HASH.len()).await;
}

fn hash_password_blocking(password: &str) -> Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| Error::Internal(format!("hashing a password: {e}")))
}

/// Hashes a password with Argon2id (on the blocking pool).
pub async fn hash_password(password: String) -> Result<String> {
    tokio::task::spawn_blocking(move || hash_password_blocking(&password))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
}

async fn verify_password(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .verify_password(password.as_bytes(), hash.as_str())
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

/// The identity service.
pub struct Identity {
    db: DatabaseConnection,
    keys: Arc<KeyStore>,
    limiter: LoginLimiter,
    audit: Auditor,
    settings: Settings,
    /// Token verification and evaluation, off the async workers.
    evaluator: Evaluator,
}

impl Identity {
    /// Builds the service over an opened, migrated database.
    pub fn new(
        db: DatabaseConnection,
        keys: Arc<KeyStore>,
        audit: Auditor,
        settings: Settings,
    ) -> Self {
        Self {
            limiter: LoginLimiter::new(settings.login_limits),
            db,
            keys,
            audit,
            settings,
            evaluator: Evaluator::default(),
        }
    }

    /// The tunables in effect.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The database (for bootstrap and tests).
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The audit sink.
    pub fn auditor(&self) -> &Auditor {
        &self.audit
    }

    /// The signing keys.
    pub fn key_store(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// Mints and records a token for `user_id`.
    pub(crate) async fn issue(
        &self,
        db: &impl sea_orm::ConnectionTrait,
        user_id: &str,
        parent_id: Option<&str>,
        kind: &str,
        description: &str,
        ttl: Duration,
    ) -> Result<IssuedToken> {
        let token_id = uuid::Uuid::new_v4().to_string();
        let expires_at = Utc::now()
            + chrono::Duration::from_std(ttl).map_err(|e| Error::Internal(e.to_string()))?;
        store::insert_token(
            db,
            store::NewToken {
                id: &token_id,
                user_id,
                parent_id,
                kind,
                description,
                expires_at,
            },
        )
        .await?;
        let token = vibebox_token::mint(
            &self.keys.current(),
            &Claims::new(user_id, &token_id, expires_at),
        )?;
        Ok(IssuedToken {
            token,
            token_id,
            expires_at,
        })
    }

    async fn login_failure(&self, origin: &Origin, username: &str, reason: &str) -> Result<()> {
        self.audit
            .record(
                origin,
                Event {
                    action: "auth.login",
                    resource_type: "user",
                    resource_id: "",
                    team_id: "",
                    outcome: Outcome::Failure,
                    severity: if reason == "rate_limited" {
                        Severity::High
                    } else {
                        Severity::Medium
                    },
                    details: &[("username", username), ("reason", reason)],
                },
            )
            .await
    }

    /// Exchanges a username and password for a session token.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        ctx: &RequestContext,
    ) -> Result<(IssuedToken, User)> {
        // The gateway's trusted `ip:port`: the limits key it by the IP.
        let source = ctx.client_address.as_str();
        let mut origin = Origin {
            client_address: ctx.client_address.clone(),
            request_id: ctx.request_id.clone(),
            ..Origin::default()
        };
        match self.limiter.check(username, source) {
            Verdict::Allow => {}
            Verdict::Delay(delay) => tokio::time::sleep(delay).await,
            Verdict::Refuse(_) => {
                // Refused attempts are audited within a per-source budget:
                // the first ones are the evidence, the rest only load disk.
                if self.limiter.audit_refusal(source) {
                    self.login_failure(&origin, username, "rate_limited")
                        .await?;
                } else {
                    tracing::debug!("login refused (rate limited); audit budget spent");
                }
                return Err(Error::RateLimited);
            }
        }
        let found = if username.is_empty() || username.len() > 64 {
            None
        } else {
            store::user_with_hash(&self.db, username).await?
        };
        let (user, ok) = match found {
            Some((user, hash)) => {
                let ok = verify_password(password.to_owned(), hash).await;
                (Some(user), ok)
            }
            None => {
                verify_password(password.to_owned(), DUMMY_HASH.clone()).await;
                (None, false)
            }
        };
        let user = match user {
            Some(user) if ok && !user.disabled => user,
            other => {
                self.limiter.record_failure(username, source);
                let reason = match other {
                    Some(u) if ok && u.disabled => "disabled",
                    _ => "bad_credentials",
                };
                origin.user_id = String::new();
                self.login_failure(&origin, username, reason).await?;
                return Err(Error::Unauthenticated(
                    "invalid username or password".into(),
                ));
            }
        };
        let txn = vibebox_db::begin_write(&self.db).await?;
        let issued = self
            .issue(
                &txn,
                &user.id,
                None,
                "session",
                "login",
                self.settings.session_ttl,
            )
            .await?;
        origin.user_id = user.id.clone();
        origin.token_id = issued.token_id.clone();
        self.audit
            .record(
                &origin,
                Event {
                    action: "auth.login",
                    resource_type: "user",
                    resource_id: &user.id,
                    team_id: "",
                    outcome: Outcome::Success,
                    severity: Severity::Low,
                    details: &[("username", username)],
                },
            )
            .await?;
        txn.commit().await?;
        Ok((issued, user))
    }

    /// Verifies a token fully against the current database state: signature
    /// and key, token record (not revoked, not expired), enabled user.
    pub async fn authenticate(&self, token: &str) -> Result<Caller> {
        let unauth = |m: &str| Error::Unauthenticated(m.to_owned());
        if token.is_empty() {
            return Err(unauth("missing token"));
        }
        use vibebox_token::TokenError as T;
        let keys = self.keys.clone();
        let owned = token.to_owned();
        let verified = self
            .evaluator
            .run(move || keys.verify(&owned))
            .await
            .map_err(|e| match e {
                T::UnknownKey => unauth("token signed by an unknown key"),
                T::InvalidSignature => unauth("invalid token signature"),
                T::Expired => unauth("token expired"),
                T::Refused(rule) => unauth(&format!("token refused: {rule}")),
                T::Malformed | T::MissingClaims | T::Denied | T::Invalid { .. } => {
                    unauth("malformed token")
                }
                e @ (T::InvalidKey | T::Internal(_)) => Error::Token(e),
            })?;
        let record = store::token_by_id(&self.db, verified.token_id())
            .await?
            .ok_or_else(|| unauth("unknown token"))?;
        if record.user_id != verified.user_id() {
            return Err(unauth("unknown token"));
        }
        if record.revoked_at.is_some() {
            return Err(unauth("token revoked"));
        }
        if record.expires_at <= Utc::now() {
            return Err(unauth("token expired"));
        }
        let user = store::user_by_id(&self.db, verified.user_id())
            .await?
            .ok_or_else(|| unauth("unknown user"))?;
        if user.disabled {
            return Err(unauth("user disabled"));
        }
        Ok(Caller {
            token_id: verified.token_id().to_owned(),
            token_expires_at: record.expires_at.min(verified.expires_at()),
            user,
            token: verified,
        })
    }

    /// Checks the token's own checks (expiry, attenuation) and the role rules
    /// for `operation` on `resource`. Returns the caller's role in the team.
    async fn decide(
        &self,
        caller: &Caller,
        operation: &str,
        resource: &Resource,
    ) -> Result<(Decision, Option<TeamRole>)> {
        let mut request = AuthzRequest::new(operation);
        if !resource.team_id.is_empty() {
            request = request.team(&resource.team_id);
        }
        if !resource.environment_id.is_empty() {
            request = request.environment(&resource.environment_id);
        }
        let token = caller.token.clone();
        match self.evaluator.run(move || token.authorize(&request)).await {
            Ok(()) => {}
            Err(e @ vibebox_token::TokenError::Internal(_)) => return Err(Error::Token(e)),
            // An expired token (or attenuation) authenticates nobody.
            Err(vibebox_token::TokenError::Expired) => {
                return Err(Error::Unauthenticated("token expired".into()));
            }
            Err(_) => {
                return Ok((
                    Decision::Deny(
                        "the token does not allow this request (expired or attenuated)".into(),
                    ),
                    None,
                ));
            }
        }
        let roles = store::roles_of(&self.db, &caller.user.id).await?;
        let team_role = roles
            .iter()
            .find(|(t, _)| *t == resource.team_id)
            .map(|(_, r)| *r);
        let subject = Subject {
            user_id: &caller.user.id,
            platform_role: caller.user.platform_role,
            team_role,
            member_of_any_team: !roles.is_empty(),
        };
        Ok((rbac::decide(operation, &subject, resource), team_role))
    }

    /// Like `decide`, as an error when denied.
    async fn require(
        &self,
        caller: &Caller,
        operation: &str,
        resource: &Resource,
    ) -> Result<Option<TeamRole>> {
        match self.decide(caller, operation, resource).await? {
            (Decision::Allow(_), role) => Ok(role),
            (Decision::Deny(reason), _) => Err(Error::PermissionDenied(reason)),
        }
    }

    /// The gateway's question: may this token do `operation` on `resource`?
    /// Denials (bad token included) are answers, not errors.
    pub async fn authorize(
        &self,
        token: &str,
        operation: &str,
        resource: &Resource,
    ) -> Result<AuthzDecision> {
        // A token that authenticates nobody (unknown, revoked, expired,
        // disabled user) is an answer, not an error.
        let unauthenticated = |reason: String| AuthzDecision {
            allowed: false,
            reason: format!("unauthenticated: {reason}"),
            ..AuthzDecision::default()
        };
        let caller = match self.authenticate(token).await {
            Ok(c) => c,
            Err(Error::Unauthenticated(reason)) => return Ok(unauthenticated(reason)),
            Err(e) => return Err(e),
        };
        let (decision, team_role) = match self.decide(&caller, operation, resource).await {
            Ok(decided) => decided,
            Err(Error::Unauthenticated(reason)) => return Ok(unauthenticated(reason)),
            Err(e) => return Err(e),
        };
        let (allowed, reason) = match decision {
            Decision::Allow(r) => (true, r.to_owned()),
            Decision::Deny(r) => (false, r),
        };
        Ok(AuthzDecision {
            allowed,
            reason,
            user_id: caller.user.id.clone(),
            token_id: caller.token_id.clone(),
            username: caller.user.username.clone(),
            team_role,
            platform_role: Some(caller.user.platform_role),
        })
    }

    /// The caller's teams and roles.
    pub async fn caller_scopes(&self, token: &str) -> Result<Scopes> {
        let caller = self.authenticate(token).await?;
        Ok(Scopes {
            teams: store::roles_of(&self.db, &caller.user.id).await?,
            user_id: caller.user.id,
            platform_role: caller.user.platform_role,
        })
    }

    /// Public keys verifying tokens.
    pub fn token_keys(&self) -> Vec<KeyInfo> {
        self.keys.keys()
    }

    /// The caller and their memberships.
    pub async fn whoami(&self, caller: &Caller) -> Result<(User, Vec<Membership>)> {
        self.require(caller, "identity.whoami", &Resource::default())
            .await?;
        let memberships = store::memberships_of_user(&self.db, &caller.user.id).await?;
        Ok((caller.user.clone(), memberships))
    }

    /// Creates a user (platform admins).
    pub async fn create_user(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        username: &str,
        display_name: &str,
        password: &str,
        platform_role: PlatformRole,
    ) -> Result<User> {
        self.require(caller, "identity.user.create", &Resource::default())
            .await?;
        validate_name("username", username)?;
        validate_display_name("display_name", display_name)?;
        validate_password(password)?;
        let hash = hash_password(password.to_owned()).await?;
        let txn = vibebox_db::begin_write(&self.db).await?;
        let user = store::insert_user(
            &txn,
            store::NewUser {
                username,
                display_name: if display_name.is_empty() {
                    username
                } else {
                    display_name
                },
                password_hash: hash,
                platform_role,
            },
        )
        .await?;
        self.audit
            .record(
                &caller.origin(&ctx.client_address, &ctx.request_id),
                Event {
                    action: "user.create",
                    resource_type: "user",
                    resource_id: &user.id,
                    team_id: "",
                    outcome: Outcome::Success,
                    severity: Severity::Medium,
                    details: &[
                        ("username", username),
                        ("platform_role", platform_role.as_str()),
                    ],
                },
            )
            .await?;
        txn.commit().await?;
        Ok(user)
    }

    /// Users, paged (platform admins).
    pub async fn list_users(&self, caller: &Caller, page: &Page) -> Result<(Vec<User>, String)> {
        self.require(caller, "identity.user.list", &Resource::default())
            .await?;
        let (offset, size) = page.bounds()?;
        let users = store::list_users(&self.db, offset, size).await?;
        let next = next_token(offset, size, users.len());
        Ok((users, next))
    }

    /// Disables or re-enables a user (platform admins; not oneself).
    pub async fn set_user_disabled(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        user_id: &str,
        disabled: bool,
    ) -> Result<User> {
        self.require(caller, "identity.user.disable", &Resource::default())
            .await?;
        validate_id("user_id", user_id)?;
        if user_id == caller.user.id && disabled {
            return Err(Error::FailedPrecondition(
                "you cannot disable yourself".into(),
            ));
        }
        let txn = vibebox_db::begin_write(&self.db).await?;
        let user = store::set_user_disabled(&txn, user_id, disabled)
            .await?
            .ok_or(Error::NotFound("user"))?;
        self.audit
            .record(
                &caller.origin(&ctx.client_address, &ctx.request_id),
                Event {
                    action: if disabled {
                        "user.disable"
                    } else {
                        "user.enable"
                    },
                    resource_type: "user",
                    resource_id: &user.id,
                    team_id: "",
                    outcome: Outcome::Success,
                    severity: Severity::Medium,
                    details: &[("username", &user.username)],
                },
            )
            .await?;
        txn.commit().await?;
        Ok(user)
    }

    /// Creates a team (platform admins); the creator becomes its admin.
    pub async fn create_team(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        name: &str,
        display_name: &str,
    ) -> Result<Team> {
        self.require(caller, "identity.team.create", &Resource::default())
            .await?;
        validate_name("name", name)?;
        validate_display_name("display_name", display_name)?;
        let txn = vibebox_db::begin_write(&self.db).await?;
        let team = store::insert_team(
            &txn,
            name,
            if display_name.is_empty() {
                name
            } else {
                display_name
            },
        )
        .await?;
        store::add_member(&txn, &team.id, &caller.user.id, TeamRole::Admin).await?;
        self.audit
            .record(
                &caller.origin(&ctx.client_address, &ctx.request_id),
                Event {
                    action: "team.create",
                    resource_type: "team",
                    resource_id: &team.id,
                    team_id: &team.id,
                    outcome: Outcome::Success,
                    severity: Severity::Medium,
                    details: &[("name", name)],
                },
            )
            .await?;
        txn.commit().await?;
        Ok(team)
    }

    /// Teams the caller belongs to (every team for platform admins).
    pub async fn list_teams(&self, caller: &Caller, page: &Page) -> Result<(Vec<Team>, String)> {
        self.require(caller, "identity.team.list", &Resource::default())
            .await?;
        let (offset, size) = page.bounds()?;
        let only = if caller.user.platform_role == PlatformRole::Admin {
            None
        } else {
            Some(
                store::roles_of(&self.db, &caller.user.id)
                    .await?
                    .into_iter()
                    .map(|(t, _)| t)
                    .collect(),
            )
        };
        let teams = store::list_teams(&self.db, only, offset, size).await?;
        let next = next_token(offset, size, teams.len());
        Ok((teams, next))
    }

    /// Resolves a team the caller may see: a member or a platform admin;
    /// anyone else gets NOT_FOUND, as for an unknown id (no existence oracle).
    async fn visible_team(&self, caller: &Caller, team_id: &str) -> Result<Team> {
        validate_id("team_id", team_id)?;
        let team = store::team_by_id(&self.db, team_id)
            .await?
            .ok_or(Error::NotFound("team"))?;
        if caller.user.platform_role == PlatformRole::Admin
            || store::role_in(&self.db, team_id, &caller.user.id)
                .await?
                .is_some()
        {
            Ok(team)
        } else {
            Err(Error::NotFound("team"))
        }
    }

    fn team_resource(team_id: &str) -> Resource {
        Resource {
            kind: "team".into(),
            team_id: team_id.to_owned(),
            ..Resource::default()
        }
    }

    async fn membership_event(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        action: &str,
        team_id: &str,
        user_id: &str,
        role: &str,
    ) -> Result<()> {
        self.audit
            .record(
                &caller.origin(&ctx.client_address, &ctx.request_id),
                Event {
                    action,
                    resource_type: "membership",
                    resource_id: &format!("{team_id}/{user_id}"),
                    team_id,
                    outcome: Outcome::Success,
                    severity: Severity::Medium,
                    details: &[("user_id", user_id), ("role", role)],
                },
            )
            .await
    }

    /// Adds a member (team admins, platform admins).
    pub async fn add_member(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        team_id: &str,
        user_id: &str,
        role: Option<TeamRole>,
    ) -> Result<Membership> {
        self.visible_team(caller, team_id).await?;
        self.require(caller, "identity.member.add", &Self::team_resource(team_id))
            .await?;
        let role = role.ok_or_else(|| Error::invalid("role", "a team role is required"))?;
        validate_id("user_id", user_id)?;
        store::user_by_id(&self.db, user_id)
            .await?
            .ok_or(Error::NotFound("user"))?;
        let txn = vibebox_db::begin_write(&self.db).await?;
        store::add_member(&txn, team_id, user_id, role).await?;
        self.membership_event(
            caller,
            ctx,
            "membership.add",
            team_id,
            user_id,
            role.as_str(),
        )
        .await?;
        txn.commit().await?;
        store::membership(&self.db, team_id, user_id)
            .await?
            .ok_or(Error::NotFound("membership"))
    }

    /// Changes a member's role (team admins, platform admins). A team keeps
    /// at least one admin.
    pub async fn set_member_role(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        team_id: &str,
        user_id: &str,
        role: Option<TeamRole>,
    ) -> Result<Membership> {
        self.visible_team(caller, team_id).await?;
        self.require(
            caller,
            "identity.member.set_role",
            &Self::team_resource(team_id),
        )
        .await?;
        let role = role.ok_or_else(|| Error::invalid("role", "a team role is required"))?;
        validate_id("user_id", user_id)?;
        let txn = vibebox_db::begin_write(&self.db).await?;
        let current = store::role_in(&txn, team_id, user_id)
            .await?
            .ok_or(Error::NotFound("membership"))?;
        if current == TeamRole::Admin
            && role != TeamRole::Admin
            && store::count_admins(&txn, team_id).await? <= 1
        {
            return Err(Error::FailedPrecondition(
                "a team must keep at least one admin".into(),
            ));
        }
        store::set_member_role(&txn, team_id, user_id, role).await?;
        self.membership_event(
            caller,
            ctx,
            "membership.set_role",
            team_id,
            user_id,
            role.as_str(),
        )
        .await?;
        txn.commit().await?;
        store::membership(&self.db, team_id, user_id)
            .await?
            .ok_or(Error::NotFound("membership"))
    }

    /// Removes a member (team admins, platform admins). A team keeps at
    /// least one admin.
    pub async fn remove_member(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        team_id: &str,
        user_id: &str,
    ) -> Result<()> {
        self.visible_team(caller, team_id).await?;
        self.require(
            caller,
            "identity.member.remove",
            &Self::team_resource(team_id),
        )
        .await?;
        validate_id("user_id", user_id)?;
        let txn = vibebox_db::begin_write(&self.db).await?;
        let current = store::role_in(&txn, team_id, user_id)
            .await?
            .ok_or(Error::NotFound("membership"))?;
        if current == TeamRole::Admin && store::count_admins(&txn, team_id).await? <= 1 {
            return Err(Error::FailedPrecondition(
                "a team must keep at least one admin".into(),
            ));
        }
        store::remove_member(&txn, team_id, user_id).await?;
        self.membership_event(
            caller,
            ctx,
            "membership.remove",
            team_id,
            user_id,
            current.as_str(),
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// A team's members (members, platform admins).
    pub async fn list_members(&self, caller: &Caller, team_id: &str) -> Result<Vec<Membership>> {
        self.visible_team(caller, team_id).await?;
        self.require(
            caller,
            "identity.member.list",
            &Self::team_resource(team_id),
        )
        .await?;
        store::members_of_team(&self.db, team_id).await
    }

    /// Issues an API token for the caller, derived from the calling token
    /// (revoking that one revokes this one too). Tokens never widen:
    /// - the calling token must be unattenuated (a Login session or an API
    ///   token as issued): an attenuated token's restrictions cannot be
    ///   carried into a fresh token, so it mints nothing (`token.attenuated_parent`);
    /// - the new token never outlives the calling one (`token.outlives_parent`;
    ///   without a requested TTL the default is cut to fit);
    /// - no API token lives longer than the platform maximum (`token.max_ttl`).
    pub async fn create_api_token(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        description: &str,
        ttl: Option<Duration>,
    ) -> Result<IssuedToken> {
        self.require(caller, "identity.token.create", &Resource::default())
            .await?;
        if description.chars().count() > 256 || description.chars().any(char::is_control) {
            return Err(Error::invalid(
                "description",
                "at most 256 characters, no control characters",
            ));
        }
        let ttl = self.api_token_ttl(caller, ttl, Utc::now())?;
        let txn = vibebox_db::begin_write(&self.db).await?;
        let issued = self
            .issue(
                &txn,
                &caller.user.id,
                Some(&caller.token_id),
                "api",
                description,
                ttl,
            )
            .await?;
        self.audit
            .record(
                &caller.origin(&ctx.client_address, &ctx.request_id),
                Event {
                    action: "token.create",
                    resource_type: "token",
                    resource_id: &issued.token_id,
                    team_id: "",
                    outcome: Outcome::Success,
                    severity: Severity::Low,
                    details: &[("description", description)],
                },
            )
            .await?;
        txn.commit().await?;
        Ok(issued)
    }

    /// The lifetime of an API token minted by `caller` at `now` (see
    /// [`Identity::create_api_token`] for the rules).
    fn api_token_ttl(
        &self,
        caller: &Caller,
        requested: Option<Duration>,
        now: chrono::DateTime<Utc>,
    ) -> Result<Duration> {
        if caller.token.attenuation_blocks() > 0 {
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
        let parent_left = (caller.token_expires_at - now)
            .to_std()
            .unwrap_or(Duration::ZERO);
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

    /// Revokes a token of the caller's (any token for platform admins) and
    /// every token derived from it.
    pub async fn revoke_token(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        token_id: &str,
    ) -> Result<()> {
        self.require(caller, "identity.token.revoke", &Resource::default())
            .await?;
        validate_id("token_id", token_id)?;
        let record = store::token_by_id(&self.db, token_id)
            .await?
            .filter(|t| {
                t.user_id == caller.user.id || caller.user.platform_role == PlatformRole::Admin
            })
            .ok_or(Error::NotFound("token"))?;
        let txn = vibebox_db::begin_write(&self.db).await?;
        let count = store::revoke_tree(&txn, &record.id, Utc::now()).await?;
        self.audit
            .record(
                &caller.origin(&ctx.client_address, &ctx.request_id),
                Event {
                    action: "token.revoke",
                    resource_type: "token",
                    resource_id: &record.id,
                    team_id: "",
                    outcome: Outcome::Success,
                    severity: Severity::Medium,
                    details: &[("revoked", &count.to_string()), ("owner", &record.user_id)],
                },
            )
            .await?;
        txn.commit().await?;
        Ok(())
    }
}
