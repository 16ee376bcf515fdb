//! The identity service's business logic: login, token issue and
//! revocation, user and team management, and authorization decisions.
//! Takes and returns domain types; the gRPC adapters live in `grpc`.
//!
//! Invariant: every authentication re-reads the database (token revoked or
//! expired, user disabled, current team role), so revocation, disabling and
//! demotion take effect on the next call; the gateway caches decisions for at
//! most [`DECISION_CACHE_TTL_MS`]. Removing, demoting or disabling a team
//! admin also revokes the service account tokens they minted (see
//! [`accounts`]), in the same transaction.

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
    IssuedToken, Membership, PlatformRole, PrincipalKind, Team, TeamRole, User,
    validate_display_name, validate_id, validate_name, validate_password,
};
use crate::ratelimit::{LoginLimiter, LoginLimits, Verdict};
use crate::rbac::{self, Decision, Resource, Subject};
use crate::store;

mod accounts;
mod usage;

pub use accounts::{ApiTokenQuery, IDEMPOTENCY_WINDOW, NewServiceAccount, NewToken};
pub use usage::USAGE_INTERVAL;

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
    /// Least time between two recordings of one token's last use.
    pub token_usage_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(12 * 3600),
            login_limits: LoginLimits::default(),
            max_api_token_ttl: API_TOKEN_MAX_TTL,
            token_usage_interval: USAGE_INTERVAL,
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
            actor_kind: self.user.kind.actor_kind().to_owned(),
        }
    }

    /// Whether the calling token carries attenuation blocks (restrictions
    /// its holder or identity added).
    pub fn attenuated(&self) -> bool {
        self.token.attenuation_blocks() > 0
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
    /// The caller's kind (set whenever the token authenticated someone).
    pub principal_kind: Option<PrincipalKind>,
}

/// The teams a caller belongs to.
#[derive(Clone, Debug)]
pub struct Scopes {
    pub user_id: String,
    pub platform_role: PlatformRole,
    pub teams: Vec<(String, TeamRole)>,
    pub kind: PrincipalKind,
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
        Ok((offset, self.size()))
    }

    /// The page size: 0 means the default (50); at most 500.
    fn size(&self) -> u64 {
        match self.size {
            n if n <= 0 => PAGE_DEFAULT,
            n => u64::try_from(n).unwrap_or(PAGE_MAX).min(PAGE_MAX),
        }
    }
}

/// The page token of a team's member list after `username`: opaque to
/// clients, bound to its team.
fn member_token(team_id: &str, username: &str) -> String {
    hex::encode(format!("m1\0{team_id}\0{username}"))
}

/// The username a member list continues after (`None`: the first page).
fn member_cursor(team_id: &str, token: &str) -> Result<Option<String>> {
    if token.is_empty() {
        return Ok(None);
    }
    let malformed = || Error::invalid("page_token", "not a token from a previous page");
    let text = hex::decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(malformed)?;
    let mut parts = text.splitn(3, '\0');
    let (Some("m1"), Some(team), Some(username)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    if team != team_id {
        return Err(Error::invalid(
            "page_token",
            "was issued for another team: list again without a page token",
        ));
    }
    Ok(Some(username.to_owned()))
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

/// Argon2 computations allowed at once in the process. Each one holds its
/// memory cost (19 MiB with the default parameters) for its whole run, so a
/// login storm would otherwise cost 19 MiB per concurrent attempt (262 MiB
/// measured in the load suite); beyond this, attempts queue (fairly, in
/// arrival order) instead of failing. Two keep both cores of a small host
/// busy while bounding the memory at 38 MiB.
pub const MAX_CONCURRENT_HASHES: usize = 2;

static HASHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_HASHES);

/// Runs one Argon2 computation on the blocking pool once a hashing slot is
/// free.
async fn argon2<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    // The semaphore is never closed.
    let _slot = HASHING.acquire().await.ok()?;
    #[cfg(test)]
    let _running = hashing_probe::Running::enter();
    tokio::task::spawn_blocking(work).await.ok()
}

/// Hashes a password with Argon2id (on the blocking pool, at most
/// [`MAX_CONCURRENT_HASHES`] at once).
pub async fn hash_password(password: String) -> Result<String> {
    argon2(move || hash_password_blocking(&password))
        .await
        .ok_or_else(|| Error::Internal("hashing a password did not complete".into()))?
}

async fn verify_password(password: String, hash: String) -> bool {
    argon2(move || {
        Argon2::default()
            .verify_password(password.as_bytes(), hash.as_str())
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

/// Counts the Argon2 computations running at once (tests only).
#[cfg(test)]
pub(crate) mod hashing_probe {
    use std::sync::atomic::{AtomicUsize, Ordering};

    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static PEAK: AtomicUsize = AtomicUsize::new(0);

    pub(crate) struct Running;

    impl Running {
        pub(crate) fn enter() -> Self {
            let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
            PEAK.fetch_max(now, Ordering::SeqCst);
            Running
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            RUNNING.fetch_sub(1, Ordering::SeqCst);
        }
    }
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
    /// Records tokens' last use, throttled, off the request path.
    usage: usage::UsageRecorder,
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
            usage: usage::UsageRecorder::start(db.clone(), settings.token_usage_interval),
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

    /// Mints and records a token; its restrictions become one attenuation
    /// block of checks (the shape every service accepts), so that the token
    /// allows no more than they say whoever holds it.
    pub(crate) async fn issue(
        &self,
        db: &impl sea_orm::ConnectionTrait,
        new: NewToken<'_>,
    ) -> Result<IssuedToken> {
        let token_id = uuid::Uuid::new_v4().to_string();
        let expires_at = Utc::now()
            + chrono::Duration::from_std(new.ttl).map_err(|e| Error::Internal(e.to_string()))?;
        store::insert_token(
            db,
            store::NewToken {
                id: &token_id,
                user_id: new.user_id,
                parent_id: new.parent_id,
                kind: new.kind,
                description: new.description,
                expires_at,
                team_id: new.team_id,
                created_by: new.created_by,
                restrictions: new.restrictions,
            },
        )
        .await?;
        let mut token = vibebox_token::mint(
            &self.keys.current(),
            &Claims::new(new.user_id, &token_id, expires_at),
        )?;
        if !new.restrictions.is_empty() {
            token = vibebox_token::restrict(&token, &new.restrictions.scope()).map_err(
                |e| match e {
                    vibebox_token::TokenError::Invalid { field, reason } => {
                        Error::invalid(field, reason)
                    }
                    other => Error::Token(other),
                },
            )?;
        }
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
            // A service account has no password: refused exactly as a
            // wrong password is (same answer, same work, same limits).
            Some((user, _)) if user.is_service_account() => {
                verify_password(password.to_owned(), DUMMY_HASH.clone()).await;
                (Some(user), false)
            }
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
                    Some(u) if u.is_service_account() => "service_account",
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
                NewToken {
                    user_id: &user.id,
                    kind: "session",
                    description: "login",
                    ttl: self.settings.session_ttl,
                    ..NewToken::default()
                },
            )
            .await?;
        origin.user_id = user.id.clone();
        origin.actor_kind = user.kind.actor_kind().to_owned();
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
            service_account: caller.user.is_service_account(),
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
        self.usage.note(&caller.token_id);
        let resource = &self.resolve(resource).await?;
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
            principal_kind: Some(caller.user.kind),
        })
    }

    /// The resource as identity knows it: a service account is decided on
    /// in its own team, looked up here, whatever team the request named
    /// (an unknown one has no team: only platform admins get past that,
    /// and then find nothing).
    async fn resolve(&self, resource: &Resource) -> Result<Resource> {
        if resource.kind != "service_account" || resource.id.is_empty() {
            return Ok(resource.clone());
        }
        let team_id = if resource.id.len() > 64 {
            String::new()
        } else {
            store::user_by_id(&self.db, &resource.id)
                .await?
                .filter(User::is_service_account)
                .map(|sa| sa.team_id)
                .unwrap_or_default()
        };
        Ok(Resource {
            team_id,
            ..resource.clone()
        })
    }

    /// The caller's teams and roles.
    pub async fn caller_scopes(&self, token: &str) -> Result<Scopes> {
        let caller = self.authenticate(token).await?;
        self.usage.note(&caller.token_id);
        Ok(Scopes {
            teams: store::roles_of(&self.db, &caller.user.id).await?,
            user_id: caller.user.id,
            platform_role: caller.user.platform_role,
            kind: caller.user.kind,
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

    /// Creates a user (platform admins). Idempotent by `request_id` (see
    /// [`accounts`]): a retry within a day returns the same user, provided
    /// every field, the password included, is the same.
    #[allow(clippy::too_many_arguments)] // the request's fields, one each
    pub async fn create_user(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        username: &str,
        display_name: &str,
        password: &str,
        platform_role: PlatformRole,
        request_id: &str,
    ) -> Result<User> {
        self.require(caller, "identity.user.create", &Resource::default())
            .await?;
        validate_name("username", username)?;
        validate_display_name("display_name", display_name)?;
        validate_password(password)?;
        accounts::validate_request_id(request_id)?;
        let display_name = if display_name.is_empty() {
            username
        } else {
            display_name
        };
        // The password is not in the fingerprint (never in a fast hash):
        // a replay checks it against the user's own Argon2 hash instead.
        let key = accounts::Key::new(
            caller,
            "user.create",
            request_id,
            &[username, display_name, platform_role.as_str()],
        );
        if let Some(user) = self.replayed_user(&key, password).await? {
            return Ok(user);
        }
        let hash = hash_password(password.to_owned()).await?;
        let created = self
            .insert_new_user(
                caller,
                ctx,
                username,
                display_name,
                hash,
                platform_role,
                &key,
            )
            .await;
        match created {
            Err(Error::AlreadyExists(_)) if key.is_set() => {
                // A concurrent attempt with the same key won the race.
                match self.replayed_user(&key, password).await? {
                    Some(user) => Ok(user),
                    None => created,
                }
            }
            other => other,
        }
    }

    /// The user an earlier `create_user` with `key` made, if any.
    async fn replayed_user(&self, key: &accounts::Key<'_>, password: &str) -> Result<Option<User>> {
        let Some(user_id) = self.replayed(key).await? else {
            return Ok(None);
        };
        let user = store::user_by_id(&self.db, &user_id)
            .await?
            .ok_or(Error::NotFound("user"))?;
        let hash = store::password_hash(&self.db, &user_id)
            .await?
            .unwrap_or_default();
        if !verify_password(password.to_owned(), hash).await {
            return Err(Error::RequestReused);
        }
        Ok(Some(user))
    }

    #[allow(clippy::too_many_arguments)] // the request's fields, one each
    async fn insert_new_user(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        username: &str,
        display_name: &str,
        hash: String,
        platform_role: PlatformRole,
        key: &accounts::Key<'_>,
    ) -> Result<User> {
        let txn = vibebox_db::begin_write(&self.db).await?;
        let user = store::insert_user(
            &txn,
            store::NewUser {
                username,
                display_name,
                password_hash: hash,
                platform_role,
            },
        )
        .await?;
        key.put(&txn, &user.id).await?;
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
        if !disabled
            && store::user_by_id(&self.db, user_id)
                .await?
                .is_some_and(|u| u.deleted_at.is_some())
        {
            return Err(Error::Refused {
                message: "a deleted service account cannot be enabled again".into(),
                violations: vec![(
                    "service_account.deleted",
                    "user_id".into(),
                    "deleting a service account disables it for good".into(),
                )],
            });
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
        if disabled {
            // Whatever teams they were admin of: a disabled user's authority
            // is gone everywhere.
            self.revoke_minted(&txn, caller, ctx, &user.id, None, "user.disable")
                .await?;
        }
        txn.commit().await?;
        Ok(user)
    }

    /// Creates a team (platform admins); the creator becomes its admin.
    /// Idempotent by `request_id` (see [`accounts`]).
    pub async fn create_team(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        name: &str,
        display_name: &str,
        request_id: &str,
    ) -> Result<Team> {
        self.require(caller, "identity.team.create", &Resource::default())
            .await?;
        validate_name("name", name)?;
        validate_display_name("display_name", display_name)?;
        accounts::validate_request_id(request_id)?;
        let display_name = if display_name.is_empty() {
            name
        } else {
            display_name
        };
        let key = accounts::Key::new(caller, "team.create", request_id, &[name, display_name]);
        if let Some(team) = self.replayed_team(&key).await? {
            return Ok(team);
        }
        let created = self
            .insert_new_team(caller, ctx, name, display_name, &key)
            .await;
        match created {
            Err(Error::AlreadyExists(_)) if key.is_set() => match self.replayed_team(&key).await? {
                Some(team) => Ok(team),
                None => created,
            },
            other => other,
        }
    }

    /// The team an earlier `create_team` with `key` made, if any.
    async fn replayed_team(&self, key: &accounts::Key<'_>) -> Result<Option<Team>> {
        let Some(team_id) = self.replayed(key).await? else {
            return Ok(None);
        };
        Ok(Some(
            store::team_by_id(&self.db, &team_id)
                .await?
                .ok_or(Error::NotFound("team"))?,
        ))
    }

    async fn insert_new_team(
        &self,
        caller: &Caller,
        ctx: &RequestContext,
        name: &str,
        display_name: &str,
        key: &accounts::Key<'_>,
    ) -> Result<Team> {
        let txn = vibebox_db::begin_write(&self.db).await?;
        let team = store::insert_team(&txn, name, display_name).await?;
        store::add_member(&txn, &team.id, &caller.user.id, TeamRole::Admin).await?;
        key.put(&txn, &team.id).await?;
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

    /// Revokes the tokens `user_id` issued for `team_id`'s service
    /// accounts, now that they are no longer its admin (in the caller's
    /// transaction). A platform admin keeps the authority to issue them,
    /// so theirs stay.
    async fn revoke_minted_in_team(
        &self,
        txn: &impl sea_orm::ConnectionTrait,
        caller: &Caller,
        ctx: &RequestContext,
        team_id: &str,
        user_id: &str,
        cause: &str,
    ) -> Result<usize> {
        if store::user_by_id(txn, user_id)
            .await?
            .is_some_and(|u| u.platform_role == PlatformRole::Admin)
        {
            return Ok(0);
        }
        self.revoke_minted(txn, caller, ctx, user_id, Some(team_id), cause)
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
        let user = store::user_by_id(&self.db, user_id)
            .await?
            .ok_or(Error::NotFound("user"))?;
        if user.is_service_account() {
            return Err(accounts::single_team(
                "a service account belongs to the one team it was created in",
            ));
        }
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
        if role != TeamRole::Admin {
            self.revoke_minted_in_team(&txn, caller, ctx, team_id, user_id, "membership.set_role")
                .await?;
        }
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
        if store::user_by_id(&self.db, user_id)
            .await?
            .is_some_and(|u| u.is_service_account())
        {
            return Err(accounts::single_team(
                "a service account cannot leave its team: delete the service account instead",
            ));
        }
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
        self.revoke_minted_in_team(&txn, caller, ctx, team_id, user_id, "membership.remove")
            .await?;
        txn.commit().await?;
        Ok(())
    }

    /// A team's members, ordered by username, a page at a time (members,
    /// platform admins); with the token of the next page, empty on the last.
    pub async fn list_members(
        &self,
        caller: &Caller,
        team_id: &str,
        page: &Page,
    ) -> Result<(Vec<Membership>, String)> {
        self.visible_team(caller, team_id).await?;
        self.require(
            caller,
            "identity.member.list",
            &Self::team_resource(team_id),
        )
        .await?;
        let after = member_cursor(team_id, &page.token)?;
        let size = page.size();
        let mut members =
            store::members_of_team(&self.db, team_id, after.as_deref(), size + 1).await?;
        let mut next = String::new();
        if members.len() as u64 > size {
            members.truncate(size as usize);
            if let Some(last) = members.last() {
                next = member_token(team_id, &last.username);
            }
        }
        Ok((members, next))
    }

    /// Revokes a token of the caller's (a team admin: any token of the
    /// team's service accounts; a platform admin: any token) and every
    /// token derived from it. Anything else is NOT_FOUND, as an unknown id.
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
            .ok_or(Error::NotFound("token"))?;
        let allowed = record.user_id == caller.user.id
            || caller.user.platform_role == PlatformRole::Admin
            || match record.team_id.as_deref() {
                Some(team) if !caller.user.is_service_account() => {
                    store::role_in(&self.db, team, &caller.user.id).await? == Some(TeamRole::Admin)
                }
                _ => false,
            };
        if !allowed {
            return Err(Error::NotFound("token"));
        }
        let txn = vibebox_db::begin_write(&self.db).await?;
        let count = store::revoke_tree(&txn, &record.id, Utc::now()).await?;
        self.audit
            .record(
                &caller.origin(&ctx.client_address, &ctx.request_id),
                Event {
                    action: "token.revoke",
                    resource_type: "token",
                    resource_id: &record.id,
                    team_id: record.team_id.as_deref().unwrap_or_default(),
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

#[cfg(test)]
mod hashing_tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn argon2_runs_at_most_the_bound_at_once_and_queues_the_rest() {
        let attempts: Vec<_> = (0..8)
            .map(|i| tokio::spawn(hash_password(format!("password number {i}"))))
            .collect();
        for attempt in attempts {
            let hash = attempt.await.expect("task").expect("queued, never refused");
            assert!(hash.starts_with("$argon2id$"));
        }
        assert_eq!(
            hashing_probe::PEAK.load(Ordering::SeqCst),
            MAX_CONCURRENT_HASHES,
            "eight concurrent hashes must run two at a time"
        );
    }
}
