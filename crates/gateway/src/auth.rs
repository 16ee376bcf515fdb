//! Authentication and authorization of end users.
//!
//! Tokens are verified locally against identity's public keys (a key ring
//! fetched with `AuthorizationService.GetTokenKeys`, refreshed at least once
//! a second and when a token names an unknown key id). A ring that could not
//! be refreshed for [`MAX_RING_AGE`] verifies nothing (UNAVAILABLE): a key
//! identity retired stops working here within two seconds, and an
//! unreachable identity never leaves an old ring in force. Decisions come from identity's
//! `Authorize` and are cached for at most `cache_ttl_ms` (never more than one
//! second), which keeps a revoked token working for at most about one second
//! through the gateway, inside the platform's two-second revocation bound.
//! The token's own biscuit checks (expiry, attenuation) are evaluated locally
//! too: both must allow.
//!
//! Verifying a biscuit (signatures, datalog world) costs far more than the
//! rest of a call, so the gateway remembers: a token whose signatures
//! verified against the current key ring stays verified until the ring is
//! replaced (signature checks are a pure function of the token's bytes and
//! the keys), and the result of the token's own checks is cached together
//! with identity's decision for the same request, under the same at most
//! one-second bound (identity's decision already embodies those checks).
//!
//! Token work is bounded: `vibebox_token` refuses any token that is not of
//! the shape identity issues before verifying or evaluating anything, and
//! what remains runs on the blocking pool through a small [`Evaluator`],
//! never on the async workers. The gateway applies the per-address limit
//! before verifying a token it has not verified already.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tonic::Code;
use vibebox_proto::authz::authorization_service_client::AuthorizationServiceClient;
use vibebox_proto::authz::{
    AuthorizeRequest, AuthorizeResponse, GetTokenKeysRequest, ListCallerScopesRequest,
    ListCallerScopesResponse, Resource,
};
use vibebox_server_kit::GrpcChannel;
use vibebox_token::{AuthzRequest, Evaluator, KeyRing, TokenError, VerifiedToken};

/// The upper bound on caching one decision, whatever identity says.
pub(crate) const MAX_DECISION_TTL: Duration = Duration::from_secs(1);
/// Least time between two key refreshes triggered by unknown key ids.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Cached decisions kept before the cache is swept.
const MAX_CACHE_ENTRIES: usize = 50_000;
/// Verified tokens kept before the cache is emptied.
const MAX_VERIFIED_ENTRIES: usize = 10_000;
/// Deadline of calls to identity made while authenticating.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of one key refresh (the ring must stay younger than [`MAX_RING_AGE`]).
const KEY_REFRESH_TIMEOUT: Duration = Duration::from_secs(1);
/// Oldest key ring tokens are verified against: beyond it (identity
/// unreachable) the gateway verifies nothing until a refresh succeeds.
pub(crate) const MAX_RING_AGE: Duration = Duration::from_secs(2);

/// Why a caller was not let through.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// No usable token: missing, malformed, forged, expired or revoked.
    #[error("invalid token: {0}")]
    Unauthenticated(&'static str),
    /// A token of a shape the platform never issues (oversized, too many
    /// blocks, datalog beyond restriction checks), refused unevaluated.
    #[error("token refused: {0}")]
    Refused(&'static str),
    /// The token is fine but does not allow this operation on this resource.
    #[error("denied: {0}")]
    Denied(String),
    /// Identity could not be asked.
    #[error("identity unavailable: {0}")]
    Unavailable(String),
}

/// User ids whose kind is remembered before the map is emptied.
const MAX_KNOWN_KINDS: usize = 50_000;

/// A caller whose token verified against the key ring.
#[derive(Clone, Debug)]
pub(crate) struct Principal {
    pub(crate) token: String,
    pub(crate) verified: Arc<VerifiedToken>,
    /// `user` or `service_account`, once identity said (see
    /// [`Principal::actor_kind`]).
    kind: Arc<OnceLock<&'static str>>,
}

impl Principal {
    pub(crate) fn user_id(&self) -> &str {
        self.verified.user_id()
    }
    pub(crate) fn token_id(&self) -> &str {
        self.verified.token_id()
    }
    /// The caller's kind for audit records (`Actor.kind`): `user` or
    /// `service_account` as identity last said for this user id (a user's
    /// kind never changes), empty while identity has not been asked yet.
    pub(crate) fn actor_kind(&self) -> &'static str {
        self.kind.get().copied().unwrap_or_default()
    }
}

/// `Actor.kind` of a `vibebox.identity.v1.PrincipalKind` number (empty:
/// unknown).
fn actor_kind_of(principal_kind: i32) -> &'static str {
    use vibebox_audit_client::actor_kind;
    use vibebox_proto::identity::PrincipalKind;
    match PrincipalKind::try_from(principal_kind) {
        Ok(PrincipalKind::Human) => actor_kind::USER,
        Ok(PrincipalKind::ServiceAccount) => actor_kind::SERVICE_ACCOUNT,
        Ok(PrincipalKind::Unspecified) | Err(_) => "",
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    token: String,
    operation: String,
    kind: String,
    team_id: String,
    environment_id: String,
    owner_id: String,
    id: String,
}

impl CacheKey {
    fn new(token: &str, operation: &str, resource: &Resource) -> Self {
        Self {
            token: token.to_owned(),
            operation: operation.to_owned(),
            kind: resource.kind.clone(),
            team_id: resource.team_id.clone(),
            environment_id: resource.environment_id.clone(),
            owner_id: resource.owner_id.clone(),
            id: resource.id.clone(),
        }
    }
}

/// A cached answer: identity's decision and whether the token's own checks
/// allowed the same request.
#[derive(Clone, Debug)]
struct Cached {
    decision: AuthorizeResponse,
    locally_allowed: bool,
}

/// A short-lived cache of identity's decisions.
pub(crate) struct DecisionCache {
    max_ttl: Duration,
    entries: Mutex<HashMap<CacheKey, (Cached, Instant)>>,
}

impl DecisionCache {
    /// A cache keeping decisions at most `max_ttl` (capped at one second).
    pub(crate) fn new(max_ttl: Duration) -> Self {
        Self {
            max_ttl: max_ttl.min(MAX_DECISION_TTL),
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &CacheKey) -> Option<Cached> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(_, expires)| Instant::now() < *expires)
            .map(|(cached, _)| cached.clone())
    }

    fn put(&self, key: CacheKey, cached: Cached) {
        let ttl = Duration::from_millis(u64::from(cached.decision.cache_ttl_ms)).min(self.max_ttl);
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_CACHE_ENTRIES {
            entries.retain(|_, (_, expires)| now < *expires);
            if entries.len() >= MAX_CACHE_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (cached, now + ttl));
    }
}

/// Tokens whose signatures verified, valid for one generation of the key
/// ring (any replacement of the ring starts a new generation).
#[derive(Default)]
struct VerifiedCache {
    generation: u64,
    entries: HashMap<String, Arc<VerifiedToken>>,
}

/// The key ring in force.
struct Ring {
    /// Bumped whenever the keys change.
    generation: u64,
    keys: Arc<KeyRing>,
    /// The keys as identity listed them (unretired), to detect a change.
    listed: Vec<(String, Vec<u8>)>,
    /// When identity last confirmed these keys.
    confirmed_at: Option<Instant>,
}

/// Verifies tokens and asks identity for decisions.
pub(crate) struct Authenticator {
    ring: RwLock<Ring>,
    verified: Mutex<VerifiedCache>,
    evaluator: Evaluator,
    last_refresh: tokio::sync::Mutex<Option<Instant>>,
    client: AuthorizationServiceClient<GrpcChannel>,
    cache: DecisionCache,
    /// Each user id's kind as identity said (it never changes), so that
    /// refusals recorded before identity is asked name it too.
    kinds: Mutex<HashMap<String, &'static str>>,
}

impl Authenticator {
    pub(crate) fn new(channel: GrpcChannel, max_ttl: Duration) -> Self {
        Self {
            ring: RwLock::new(Ring {
                generation: 0,
                keys: Arc::new(KeyRing::new()),
                listed: Vec::new(),
                confirmed_at: None,
            }),
            verified: Mutex::new(VerifiedCache::default()),
            evaluator: Evaluator::default(),
            last_refresh: tokio::sync::Mutex::new(None),
            client: AuthorizationServiceClient::new(channel),
            cache: DecisionCache::new(max_ttl),
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// Records what identity said `principal` is (`principal_kind`, a
    /// `PrincipalKind` number; unknown values are ignored).
    fn learn_kind(&self, principal: &Principal, user_id: &str, principal_kind: i32) {
        let kind = actor_kind_of(principal_kind);
        if kind.is_empty() || user_id != principal.user_id() {
            return;
        }
        let _ = principal.kind.set(kind);
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        if kinds.len() >= MAX_KNOWN_KINDS {
            kinds.clear();
        }
        kinds.insert(user_id.to_owned(), kind);
    }

    /// Fetches identity's token keys and replaces the ring when they changed
    /// (retired keys are dropped: tokens they signed stop verifying).
    pub(crate) async fn refresh_keys(&self) -> Result<usize, AuthError> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(GetTokenKeysRequest {});
        request.set_timeout(KEY_REFRESH_TIMEOUT);
        let asked_at = Instant::now();
        let keys = client
            .get_token_keys(request)
            .await
            .map_err(|s| AuthError::Unavailable(format!("GetTokenKeys: {s}")))?
            .into_inner()
            .keys;
        let mut listed: Vec<(String, Vec<u8>)> = keys
            .into_iter()
            .filter(|k| !k.retired)
            .map(|k| (k.key_id, k.public_key))
            .collect();
        listed.sort();
        let mut current = self.ring.write().unwrap_or_else(|e| e.into_inner());
        if current.generation > 0 && current.listed == listed {
            current.confirmed_at = Some(asked_at);
            return Ok(current.keys.key_ids().len());
        }
        let mut ring = KeyRing::new();
        for (key_id, public_key) in &listed {
            match key_id.parse::<u32>() {
                Ok(id) => {
                    if ring.insert(id, public_key).is_err() {
                        tracing::warn!(%key_id, "ignoring an unparsable token key");
                    }
                }
                Err(_) => {
                    tracing::warn!(%key_id, "ignoring a non-numeric token key id")
                }
            }
        }
        let count = ring.key_ids().len();
        // Tokens verified against the old ring must be verified again.
        *current = Ring {
            generation: current.generation + 1,
            keys: Arc::new(ring),
            listed,
            confirmed_at: Some(asked_at),
        };
        tracing::debug!(keys = count, "token keys changed");
        Ok(count)
    }

    /// Refreshes the keys unless that happened less than a second ago
    /// (so that forged key ids cannot hammer identity).
    async fn refresh_throttled(&self) -> Result<(), AuthError> {
        let mut last = self.last_refresh.lock().await;
        if last.is_some_and(|at| at.elapsed() < MIN_REFRESH_INTERVAL) {
            return Ok(());
        }
        let result = self.refresh_keys().await;
        *last = Some(Instant::now());
        result.map(|_| ())
    }

    /// The ring to verify against, unless it is older than [`MAX_RING_AGE`].
    fn fresh_ring(&self) -> Option<(u64, Arc<KeyRing>)> {
        let ring = self.ring.read().unwrap_or_else(|e| e.into_inner());
        ring.confirmed_at
            .is_some_and(|at| at.elapsed() <= MAX_RING_AGE)
            .then(|| (ring.generation, ring.keys.clone()))
    }

    /// The token as verified against the current ring, if it was.
    fn cached(&self, token: &str) -> Option<Arc<VerifiedToken>> {
        let (generation, _) = self.fresh_ring()?;
        let cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        (cache.generation == generation)
            .then(|| cache.entries.get(token).cloned())
            .flatten()
    }

    /// Whether `token` verified against the current ring already (then
    /// authenticating it again costs a lookup, not a verification).
    pub(crate) fn is_verified(&self, token: &str) -> bool {
        self.cached(token).is_some()
    }

    async fn verify_locally(&self, token: &str) -> Result<Arc<VerifiedToken>, AuthError> {
        if let Some(verified) = self.cached(token) {
            return Ok(verified);
        }
        let (generation, ring) = match self.fresh_ring() {
            Some(fresh) => fresh,
            None => {
                // Stale (identity unreachable for a while) or never fetched:
                // try once, then refuse rather than trust old keys.
                self.refresh_throttled().await?;
                self.fresh_ring().ok_or_else(|| {
                    AuthError::Unavailable("token keys could not be refreshed".into())
                })?
            }
        };
        let owned = token.to_owned();
        let verified = self
            .evaluator
            .run(move || ring.verify(&owned))
            .await
            .map(Arc::new)
            .map_err(|error| match error {
                TokenError::Refused(rule) => AuthError::Refused(rule),
                other => AuthError::Unauthenticated(reason(&other)),
            })?;
        let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if cache.generation != generation {
            if cache.generation > generation {
                // Verified against a ring replaced meanwhile: do not keep it.
                return Ok(verified);
            }
            *cache = VerifiedCache {
                generation,
                entries: HashMap::new(),
            };
        }
        if cache.entries.len() >= MAX_VERIFIED_ENTRIES {
            cache.entries.clear();
        }
        cache.entries.insert(token.to_owned(), verified.clone());
        Ok(verified)
    }

    /// Verifies `token`'s shape, signatures and claims against the key ring.
    pub(crate) async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let verified = match self.verify_locally(token).await {
            Err(AuthError::Unauthenticated(why)) if why == reason(&TokenError::UnknownKey) => {
                // Rotation: identity may have a key we have not seen yet.
                let refreshed = self.refresh_throttled().await;
                match self.verify_locally(token).await {
                    Err(AuthError::Unauthenticated(why))
                        if why == reason(&TokenError::UnknownKey) =>
                    {
                        refreshed?;
                        return Err(AuthError::Unauthenticated(why));
                    }
                    other => other?,
                }
            }
            other => other?,
        };
        let kind = Arc::new(OnceLock::new());
        if let Some(known) = self
            .kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(verified.user_id())
        {
            let _ = kind.set(*known);
        }
        Ok(Principal {
            token: token.to_owned(),
            verified,
            kind,
        })
    }

    /// Runs token work off the async workers, a few jobs at a time (the
    /// same bounded lane verification uses).
    pub(crate) async fn evaluate<T, F>(&self, job: F) -> Result<T, TokenError>
    where
        F: FnOnce() -> Result<T, TokenError> + Send + 'static,
        T: Send + 'static,
    {
        self.evaluator.run(job).await
    }

    /// Decides whether `principal` may perform `operation` on `resource`:
    /// the token's own checks (locally) and identity's decision must both
    /// allow.
    pub(crate) async fn authorize(
        &self,
        principal: &Principal,
        operation: &str,
        resource: &Resource,
    ) -> Result<AuthorizeResponse, AuthError> {
        let mut local = AuthzRequest::new(operation);
        if !resource.team_id.is_empty() {
            local = local.team(&resource.team_id);
        }
        if !resource.environment_id.is_empty() {
            local = local.environment(&resource.environment_id);
        }
        let key = CacheKey::new(&principal.token, operation, resource);
        let Cached {
            decision,
            locally_allowed,
        } = match self.cache.get(&key) {
            Some(cached) => cached,
            None => {
                let verified = principal.verified.clone();
                let checked = self.evaluator.run(move || verified.authorize(&local)).await;
                let locally_allowed = match checked {
                    Ok(()) => true,
                    Err(TokenError::Expired) => {
                        return Err(AuthError::Unauthenticated("token expired"));
                    }
                    Err(_) => false,
                };
                let decision = self.ask_identity(principal, operation, resource).await?;
                let cached = Cached {
                    decision,
                    locally_allowed,
                };
                self.cache.put(key, cached.clone());
                cached
            }
        };
        if !decision.user_id.is_empty() {
            self.learn_kind(principal, &decision.user_id, decision.principal_kind);
        }
        if !decision.allowed && decision.user_id.is_empty() {
            // Identity could not authenticate the token (revoked, disabled
            // user, expired): an answer, not an error.
            tracing::debug!(reason = %decision.reason, "identity rejected the token");
            return Err(AuthError::Unauthenticated("token rejected by identity"));
        }
        if !decision.allowed {
            let reason = if decision.reason.is_empty() {
                "permission denied".to_owned()
            } else {
                decision.reason.clone()
            };
            return Err(AuthError::Denied(reason));
        }
        if !locally_allowed {
            return Err(AuthError::Denied(
                "the token does not allow this request".into(),
            ));
        }
        Ok(decision)
    }

    async fn ask_identity(
        &self,
        principal: &Principal,
        operation: &str,
        resource: &Resource,
    ) -> Result<AuthorizeResponse, AuthError> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(AuthorizeRequest {
            token: principal.token.clone(),
            operation: operation.to_owned(),
            resource: Some(resource.clone()),
        });
        request.set_timeout(IDENTITY_TIMEOUT);
        match client.authorize(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(classify_identity_status(&status)),
        }
    }

    /// The teams (with roles) of the token's user, from identity.
    pub(crate) async fn caller_scopes(
        &self,
        principal: &Principal,
    ) -> Result<ListCallerScopesResponse, AuthError> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(ListCallerScopesRequest {
            token: principal.token.clone(),
        });
        request.set_timeout(IDENTITY_TIMEOUT);
        match client.list_caller_scopes(request).await {
            Ok(response) => {
                let scopes = response.into_inner();
                self.learn_kind(principal, &scopes.user_id, scopes.principal_kind);
                Ok(scopes)
            }
            Err(status) => Err(classify_identity_status(&status)),
        }
    }
}

fn classify_identity_status(status: &tonic::Status) -> AuthError {
    match status.code() {
        Code::Unauthenticated => AuthError::Unauthenticated("token rejected by identity"),
        Code::PermissionDenied => AuthError::Denied(status.message().to_owned()),
        _ => {
            tracing::warn!(code = ?status.code(), message = status.message(), "identity failed to decide");
            AuthError::Unavailable(format!("{}: {}", status.code(), status.message()))
        }
    }
}

/// A short, non-secret description of a verification failure (for logs and
/// audit details, never the token itself).
fn reason(error: &TokenError) -> &'static str {
    match error {
        TokenError::Malformed => "malformed token",
        TokenError::UnknownKey => "token signed by an unknown key",
        TokenError::InvalidSignature => "invalid token signature",
        TokenError::MissingClaims => "token lacks required claims",
        TokenError::Denied => "token checks failed",
        TokenError::Expired => "token expired",
        TokenError::Invalid { .. } => "invalid token",
        TokenError::InvalidKey => "invalid key material",
        TokenError::Internal(_) => "token processing failed",
        TokenError::Refused(rule) => rule,
    }
}

/// The bearer token of `authorization: Bearer <token>`, if any.
pub(crate) fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(allowed: bool, ttl_ms: u32) -> Cached {
        Cached {
            decision: AuthorizeResponse {
                allowed,
                cache_ttl_ms: ttl_ms,
                user_id: "u".into(),
                ..Default::default()
            },
            locally_allowed: true,
        }
    }

    fn key(op: &str, team: &str) -> CacheKey {
        CacheKey::new(
            "tok",
            op,
            &Resource {
                kind: "team".into(),
                team_id: team.into(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn cache_keys_differ_by_operation_and_resource() {
        let cache = DecisionCache::new(Duration::from_secs(1));
        cache.put(key("environment.list", "a"), decision(true, 1000));
        assert!(
            cache
                .get(&key("environment.list", "a"))
                .unwrap()
                .decision
                .allowed
        );
        assert!(cache.get(&key("environment.list", "b")).is_none());
        assert!(cache.get(&key("environment.create", "a")).is_none());
    }

    #[test]
    fn cache_honours_zero_ttl_and_caps_at_one_second() {
        let cache = DecisionCache::new(Duration::from_secs(60));
        assert_eq!(cache.max_ttl, MAX_DECISION_TTL);
        cache.put(key("op", "a"), decision(true, 0));
        assert!(
            cache.get(&key("op", "a")).is_none(),
            "ttl 0 must not be cached"
        );
    }

    #[test]
    fn cached_decisions_expire() {
        let cache = DecisionCache::new(Duration::from_millis(20));
        cache.put(key("op", "a"), decision(false, 1000));
        assert!(!cache.get(&key("op", "a")).unwrap().decision.allowed);
        std::thread::sleep(Duration::from_millis(40));
        assert!(cache.get(&key("op", "a")).is_none());
    }

    impl Authenticator {
        /// Installs `ring` as if identity listed it `age` ago.
        fn install(&self, ring: KeyRing, age: Duration) {
            let mut current = self.ring.write().unwrap();
            *current = Ring {
                generation: current.generation + 1,
                keys: Arc::new(ring),
                listed: Vec::new(),
                confirmed_at: Instant::now().checked_sub(age),
            };
        }
    }

    #[tokio::test]
    async fn verified_tokens_are_reused_only_with_the_ring_that_verified_them() {
        let root = vibebox_token::RootKey::generate(7);
        let claims =
            vibebox_token::Claims::new("u1", "t1", chrono::Utc::now() + chrono::Duration::hours(1));
        let token = vibebox_token::mint(&root, &claims).unwrap();
        let channel = vibebox_server_kit::connect_plaintext("http://127.0.0.1:9").unwrap();
        let auth = Authenticator::new(channel, Duration::from_secs(1));
        let mut ring = KeyRing::new();
        ring.insert(7, &root.public_key_bytes()).unwrap();
        auth.install(ring.clone(), Duration::ZERO);

        assert!(!auth.is_verified(&token));
        let first = auth.verify_locally(&token).await.unwrap();
        assert!(auth.is_verified(&token));
        let second = auth.verify_locally(&token).await.unwrap();
        assert!(
            Arc::ptr_eq(&first, &second),
            "the second call reuses the first verification"
        );
        assert_eq!(second.user_id(), "u1");
        assert!(
            auth.verify_locally("not-a-token").await.is_err(),
            "a bad token is never served from the cache"
        );

        // A token of a shape identity never issues is refused, naming why.
        let hostile = biscuit_auth::UnverifiedBiscuit::from_base64(&token)
            .unwrap()
            .append(
                biscuit_auth::BlockBuilder::new()
                    .code("f(1); f(2); g($a) <- f($a), f($b);")
                    .unwrap(),
            )
            .unwrap()
            .to_base64()
            .unwrap();
        assert!(matches!(
            auth.verify_locally(&hostile).await,
            Err(AuthError::Refused(rule)) if rule.contains("facts")
        ));

        // A ring identity has not confirmed for too long verifies nothing,
        // cached tokens included (identity at 127.0.0.1:9 is unreachable).
        auth.install(ring, MAX_RING_AGE + Duration::from_millis(100));
        assert!(!auth.is_verified(&token));
        assert!(matches!(
            auth.verify_locally(&token).await,
            Err(AuthError::Unavailable(_))
        ));

        // Retiring the key (a new ring without it) must stop the token.
        auth.install(KeyRing::new(), Duration::ZERO);
        assert!(matches!(
            auth.verify_locally(&token).await,
            Err(AuthError::Unauthenticated(why)) if why == reason(&TokenError::UnknownKey)
        ));
    }

    #[tokio::test]
    async fn kinds_come_from_identity_and_stay_with_the_user_id() {
        use vibebox_proto::identity::PrincipalKind;
        let root = vibebox_token::RootKey::generate(7);
        let claims = vibebox_token::Claims::new(
            "sa-1",
            "t1",
            chrono::Utc::now() + chrono::Duration::hours(1),
        );
        let token = vibebox_token::mint(&root, &claims).unwrap();
        let mut ring = KeyRing::new();
        ring.insert(7, &root.public_key_bytes()).unwrap();
        let verified = Arc::new(ring.verify(&token).unwrap());
        let channel = vibebox_server_kit::connect_plaintext("http://127.0.0.1:9").unwrap();
        let auth = Authenticator::new(channel, Duration::from_secs(1));
        let principal = || Principal {
            token: token.clone(),
            verified: verified.clone(),
            kind: Arc::new(OnceLock::new()),
        };
        let first = principal();
        assert_eq!(first.actor_kind(), "", "unknown until identity says");
        // An answer about another user id teaches nothing.
        auth.learn_kind(&first, "someone-else", PrincipalKind::Human as i32);
        assert_eq!(first.actor_kind(), "");
        auth.learn_kind(&first, "sa-1", PrincipalKind::Unspecified as i32);
        assert_eq!(first.actor_kind(), "");
        auth.learn_kind(&first, "sa-1", PrincipalKind::ServiceAccount as i32);
        assert_eq!(first.actor_kind(), "service_account");
        assert_eq!(actor_kind_of(PrincipalKind::Human as i32), "user");
        assert_eq!(actor_kind_of(99), "");
        // Clones share it; the id's kind is remembered for later calls.
        let clone = first.clone();
        assert_eq!(clone.actor_kind(), "service_account");
        assert_eq!(
            auth.kinds.lock().unwrap().get("sa-1").copied(),
            Some("service_account")
        );
    }

    #[test]
    fn bearer_parsing() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer_token(&md), None);
        md.insert("authorization", "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer_token(&md), Some("abc.def"));
        md.insert("authorization", "bearer   xyz ".parse().unwrap());
        assert_eq!(bearer_token(&md), Some("xyz"));
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&md), None);
        md.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer_token(&md), None);
    }
}
