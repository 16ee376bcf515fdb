//! VibeBox API tokens: biscuit-auth tokens minted by the identity service,
//! attenuated offline by their holders, verified against a key ring and
//! authorized for one operation on one resource.
//!
//! Token layout (the contract every service follows):
//! - the biscuit's `root_key_id` names the identity root key that signed it;
//! - the authority block holds `user("<uid>")`, `token_id("<tid>")` and
//!   `check if time($t), $t < <expiry>`;
//! - attenuation blocks (added by [`attenuate`], no service call) add checks on
//!   `team($t)`, `environment($e)`, `operation($op)` and `time($t)`;
//! - an authorizer provides `time(now)`, `operation("<op>")` and, when known,
//!   `team("<id>")` and `environment("<id>")`, so a token restricted to a team
//!   or an environment is useless for requests that do not name it.
//!
//!
//! Verification refuses, before any signature or datalog work, every token
//! that is not of that shape (see [`shape`]): larger than
//! [`MAX_TOKEN_CHARS`], more than [`MAX_BLOCKS`] blocks, an authority block
//! other than identity's, attenuation blocks with facts, rules, scopes,
//! external keys or oversized checks. What remains costs a bounded, small
//! amount to verify and evaluate; async services run it through an
//! [`Evaluator`] (the blocking pool, a few at a time).
//!
//! ```
//! use vibebox_token::{attenuate, mint, AuthzRequest, Claims, KeyRing, Restriction, RootKey};
//! let root = RootKey::generate(1);
//! let mut ring = KeyRing::new();
//! ring.insert(1, &root.public_key_bytes()).unwrap();
//! let claims = Claims::new("user-1", "token-1", chrono::Utc::now() + chrono::Duration::hours(1));
//! let token = mint(&root, &claims).unwrap();
//! let narrow = attenuate(&token, &Restriction::default().team("team-a")).unwrap();
//! let verified = ring.verify(&narrow).unwrap();
//! assert_eq!(verified.user_id(), "user-1");
//! assert!(verified.authorize(&AuthzRequest::new("environment.list").team("team-a")).is_ok());
//! assert!(verified.authorize(&AuthzRequest::new("environment.list").team("team-b")).is_err());
//! ```

mod pool;
pub mod shape;

pub use crate::pool::Evaluator;
pub use crate::shape::{MAX_BLOCKS, MAX_TOKEN_CHARS};

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, UNIX_EPOCH};

use biscuit_auth::builder::{Algorithm, AuthorizerBuilder, BlockBuilder, Term, date, fact, string};
use biscuit_auth::error::{Format, Token as BiscuitError};
use biscuit_auth::{AuthorizerLimits, Biscuit, KeyPair, PrivateKey, PublicKey, RootKeyProvider};
use chrono::{DateTime, Utc};

/// Errors of minting, attenuating, verifying and authorizing tokens.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token is not a well-formed biscuit (bad base64, bad encoding).
    #[error("malformed token")]
    Malformed,
    /// The token names no key id or a key id that is not (or no longer) in the ring.
    #[error("token signed by an unknown key")]
    UnknownKey,
    /// A signature does not verify (tampered token or wrong key).
    #[error("invalid token signature")]
    InvalidSignature,
    /// The authority block lacks the user or token id facts.
    #[error("token lacks required claims")]
    MissingClaims,
    /// A check of the token (attenuation to a team, environment or
    /// operations) failed.
    #[error("token does not allow this request")]
    Denied,
    /// The token (or an attenuation block of it) has expired: it allows
    /// nothing any more, whatever the request.
    #[error("token expired")]
    Expired,
    /// The token is not of a shape the platform issues (too large, too many
    /// blocks, datalog attenuation blocks may not carry): refused before any
    /// evaluation.
    #[error("token refused: {0}")]
    Refused(&'static str),
    /// A restriction or claim value is not acceptable (empty, bad characters).
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// Key material could not be parsed.
    #[error("invalid key material")]
    InvalidKey,
    /// An unexpected biscuit failure (datalog limits, internal errors).
    #[error("token processing failed: {0}")]
    Internal(String),
}

/// Result alias of this crate.
pub type Result<T, E = TokenError> = std::result::Result<T, E>;

fn classify(err: BiscuitError) -> TokenError {
    match err {
        BiscuitError::Format(
            Format::UnknownPublicKey | Format::UnknownExternalKey | Format::UnknownSymbol(_),
        ) => TokenError::UnknownKey,
        BiscuitError::Format(
            Format::Signature(_) | Format::SealedSignature | Format::InvalidSignatureSize(_),
        ) => TokenError::InvalidSignature,
        BiscuitError::Format(_) | BiscuitError::Base64(_) => TokenError::Malformed,
        BiscuitError::FailedLogic(_) => TokenError::Denied,
        // A check whose expression cannot be evaluated (a date compared with
        // a string, say) does not pass: the token allows nothing by it, and
        // its holder cannot turn the answer into an "identity unavailable".
        BiscuitError::Execution(_) => TokenError::Denied,
        other => TokenError::Internal(format!("{other:?}")),
    }
}

/// Datalog limits. The library's default 1 ms wall-clock budget fails
/// valid tokens on a loaded machine (a descheduled thread), so the time
/// budget is generous; the fact and iteration limits (defaults: 1000 facts,
/// 100 iterations) are what bound the work a hostile attenuation block can
/// cause.
fn limits() -> AuthorizerLimits {
    AuthorizerLimits {
        max_time: Duration::from_secs(1),
        ..AuthorizerLimits::default()
    }
}

/// An identity root key pair (Ed25519) with its key id.
pub struct RootKey {
    key_id: u32,
    keypair: KeyPair,
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootKey")
            .field("key_id", &self.key_id)
            .field("public_key", &hex::encode(self.public_key_bytes()))
            .finish_non_exhaustive()
    }
}

impl RootKey {
    /// A fresh random key with the given id.
    pub fn generate(key_id: u32) -> Self {
        Self {
            key_id,
            keypair: KeyPair::new(),
        }
    }

    /// Restores a key from its 32 private key bytes.
    pub fn from_private_bytes(key_id: u32, bytes: &[u8]) -> Result<Self> {
        let private = PrivateKey::from_bytes(bytes, Algorithm::Ed25519)
            .map_err(|_| TokenError::InvalidKey)?;
        Ok(Self {
            key_id,
            keypair: KeyPair::from(&private),
        })
    }

    /// The 32 private key bytes (store with mode 0600, never log).
    pub fn private_key_bytes(&self) -> Vec<u8> {
        self.keypair.private().to_bytes().to_vec()
    }

    /// The 32 Ed25519 public key bytes.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        self.keypair.public().to_bytes()
    }

    /// This key's id (written into every token's `root_key_id`).
    pub fn key_id(&self) -> u32 {
        self.key_id
    }
}

/// Public keys that verify tokens, by key id. Holds the current key and old
/// keys until they are retired (removed).
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: BTreeMap<u32, PublicKey>,
}

impl KeyRing {
    /// An empty ring (verifies nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the Ed25519 public key for `key_id`.
    pub fn insert(&mut self, key_id: u32, public_key: &[u8]) -> Result<()> {
        let key = PublicKey::from_bytes(public_key, Algorithm::Ed25519)
            .map_err(|_| TokenError::InvalidKey)?;
        self.keys.insert(key_id, key);
        Ok(())
    }

    /// Removes a retired key: tokens signed by it stop verifying.
    pub fn remove(&mut self, key_id: u32) {
        self.keys.remove(&key_id);
    }

    /// Key ids in the ring.
    pub fn key_ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Whether the ring holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies a token's signatures against the key its `root_key_id`
    /// names and extracts its claims. Refuses, before any signature check,
    /// a token of a shape the platform does not issue ([`shape`]). Does not
    /// evaluate checks: call [`VerifiedToken::authorize`] for that.
    pub fn verify(&self, token: &str) -> Result<VerifiedToken> {
        let (bytes, shape) = shape::inspect(token)?;
        let biscuit = Biscuit::from(&bytes, self).map_err(classify)?;
        let key_id = biscuit.root_key_id().ok_or(TokenError::UnknownKey)?;
        if biscuit.block_count() != shape.blocks {
            return Err(TokenError::Malformed);
        }
        Ok(VerifiedToken {
            biscuit,
            key_id,
            user_id: shape.user_id,
            token_id: shape.token_id,
            expires_at: DateTime::<Utc>::from_timestamp(
                i64::try_from(shape.expires_at).unwrap_or(i64::MAX),
                0,
            )
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
        })
    }
}

impl RootKeyProvider for &KeyRing {
    fn choose(&self, key_id: Option<u32>) -> std::result::Result<PublicKey, Format> {
        key_id
            .and_then(|id| self.keys.get(&id).cloned())
            .ok_or(Format::UnknownPublicKey)
    }
}

/// What the identity service puts into a token's authority block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// The user the token acts for.
    pub user_id: String,
    /// The token's id (revocation handle; shared by tokens attenuated from it).
    pub token_id: String,
    /// When the token stops working.
    pub expires_at: DateTime<Utc>,
}

impl Claims {
    /// Claims for `user_id` / `token_id` expiring at `expires_at`.
    pub fn new(
        user_id: impl Into<String>,
        token_id: impl Into<String>,
        expires_at: DateTime<Utc>,
    ) -> Self {
        Self {
            user_id: user_id.into(),
            token_id: token_id.into(),
            expires_at,
        }
    }
}

fn epoch_secs(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp()).unwrap_or(0)
}

fn check_value(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > 128 {
        return Err(TokenError::Invalid {
            field,
            reason: "must be 1 to 128 characters",
        });
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    {
        return Err(TokenError::Invalid {
            field,
            reason: "allowed characters: letters, digits, '-', '_', '.', ':'",
        });
    }
    Ok(())
}

fn block_code(
    builder: BlockBuilder,
    code: &str,
    params: HashMap<String, Term>,
) -> Result<BlockBuilder> {
    builder
        .code_with_params(code, params, HashMap::new())
        .map_err(|e| TokenError::Internal(e.to_string()))
}

/// Mints a token for `claims`, signed by `root` (base64url text).
pub fn mint(root: &RootKey, claims: &Claims) -> Result<String> {
    check_value("user_id", &claims.user_id)?;
    check_value("token_id", &claims.token_id)?;
    let params = HashMap::from([
        ("user".to_owned(), Term::Str(claims.user_id.clone())),
        ("tid".to_owned(), Term::Str(claims.token_id.clone())),
        ("exp".to_owned(), Term::Date(epoch_secs(claims.expires_at))),
    ]);
    let biscuit = Biscuit::builder()
        .code_with_params(
            "user({user}); token_id({tid}); check if time($t), $t < {exp};",
            params,
            HashMap::new(),
        )
        .map_err(|e| TokenError::Internal(e.to_string()))?
        .root_key_id(root.key_id)
        .build(&root.keypair)
        .map_err(classify)?;
    biscuit.to_base64().map_err(classify)
}

/// Restrictions a holder adds to a token offline. Every restriction can only
/// narrow what the token allows (biscuit checks are conjunctive).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restriction {
    /// Only requests on this team.
    pub team: Option<String>,
    /// Only requests on this environment.
    pub environment: Option<String>,
    /// Only these operations (empty: no restriction).
    pub operations: Vec<String>,
    /// An earlier expiry.
    pub expires_at: Option<DateTime<Utc>>,
}

impl Restriction {
    /// Restricts to one team.
    pub fn team(mut self, team_id: impl Into<String>) -> Self {
        self.team = Some(team_id.into());
        self
    }
    /// Restricts to one environment.
    pub fn environment(mut self, environment_id: impl Into<String>) -> Self {
        self.environment = Some(environment_id.into());
        self
    }
    /// Restricts to these operations.
    pub fn operations<I, S>(mut self, operations: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.operations = operations.into_iter().map(Into::into).collect();
        self
    }
    /// Restricts to an earlier expiry.
    pub fn expires_at(mut self, at: DateTime<Utc>) -> Self {
        self.expires_at = Some(at);
        self
    }
    /// Whether nothing is restricted.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Attenuates a token offline (no key and no service call needed): appends
/// a block whose checks restrict team, environment, operations and expiry.
pub fn attenuate(token: &str, restriction: &Restriction) -> Result<String> {
    if restriction.is_empty() {
        return Err(TokenError::Invalid {
            field: "restriction",
            reason: "at least one restriction is required",
        });
    }
    let unverified =
        biscuit_auth::UnverifiedBiscuit::from_base64(token.trim()).map_err(classify)?;
    let mut block = BlockBuilder::new();
    if let Some(team) = &restriction.team {
        check_value("team", team)?;
        block = block_code(
            block,
            "check if team({team});",
            HashMap::from([("team".to_owned(), Term::Str(team.clone()))]),
        )?;
    }
    if let Some(env) = &restriction.environment {
        check_value("environment", env)?;
        block = block_code(
            block,
            "check if environment({env});",
            HashMap::from([("env".to_owned(), Term::Str(env.clone()))]),
        )?;
    }
    if !restriction.operations.is_empty() {
        let mut params = HashMap::new();
        let mut alternatives = Vec::new();
        for (i, op) in restriction.operations.iter().enumerate() {
            check_value("operations", op)?;
            params.insert(format!("op{i}"), Term::Str(op.clone()));
            alternatives.push(format!("operation({{op{i}}})"));
        }
        let code = format!("check if {};", alternatives.join(" or "));
        block = block_code(block, &code, params)?;
    }
    if let Some(at) = restriction.expires_at {
        block = block_code(
            block,
            "check if time($t), $t < {exp};",
            HashMap::from([("exp".to_owned(), Term::Date(epoch_secs(at)))]),
        )?;
    }
    let attenuated = unverified.append(block).map_err(classify)?;
    attenuated.to_base64().map_err(classify)
}

/// Most values in one list of a [`Scope`] (teams, environments or
/// operations): one check of at most this many alternatives each, well
/// inside the shape every service accepts (see [`shape`]).
pub const MAX_SCOPE_VALUES: usize = 16;

/// Limits identity bakes into a token at issue (`TokenRestrictions`): each
/// non-empty list becomes one check of the token's one attenuation block,
/// `check if team("a") or team("b")`, so that the token allows only
/// requests naming one of the teams, one of the environments and one of the
/// operations listed. Empty lists restrict nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// Requests on one of these teams only.
    pub teams: Vec<String>,
    /// Requests on one of these environments only.
    pub environments: Vec<String>,
    /// One of these operations only.
    pub operations: Vec<String>,
}

impl Scope {
    /// Whether nothing is restricted.
    pub fn is_empty(&self) -> bool {
        self.teams.is_empty() && self.environments.is_empty() && self.operations.is_empty()
    }
}

/// Appends `scope` to `token` as one attenuation block of checks only (one
/// per non-empty list, each an `or` of its values), exactly the shape
/// [`shape`] accepts. At most [`MAX_SCOPE_VALUES`] values per list.
pub fn restrict(token: &str, scope: &Scope) -> Result<String> {
    if scope.is_empty() {
        return Err(TokenError::Invalid {
            field: "restriction",
            reason: "at least one restriction is required",
        });
    }
    let unverified =
        biscuit_auth::UnverifiedBiscuit::from_base64(token.trim()).map_err(classify)?;
    let mut block = BlockBuilder::new();
    for (field, predicate, values) in [
        ("team_ids", "team", &scope.teams),
        ("environment_ids", "environment", &scope.environments),
        ("operations", "operation", &scope.operations),
    ] {
        if values.is_empty() {
            continue;
        }
        if values.len() > MAX_SCOPE_VALUES {
            return Err(TokenError::Invalid {
                field,
                reason: "at most 16 values",
            });
        }
        let mut params = HashMap::new();
        let mut alternatives = Vec::with_capacity(values.len());
        for (i, value) in values.iter().enumerate() {
            check_value(field, value)?;
            params.insert(format!("v{i}"), Term::Str(value.clone()));
            alternatives.push(format!("{predicate}({{v{i}}})"));
        }
        let code = format!("check if {};", alternatives.join(" or "));
        block = block_code(block, &code, params)?;
    }
    let restricted = unverified
        .append(block)
        .map_err(classify)?
        .to_base64()
        .map_err(classify)?;
    if restricted.len() > MAX_TOKEN_CHARS {
        // Every service would refuse it unread (see [`shape`]).
        return Err(TokenError::Invalid {
            field: "restrictions",
            reason: "too many or too long values: the token would exceed 4096 characters",
        });
    }
    Ok(restricted)
}

/// A request to authorize a verified token for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzRequest {
    /// Operation name, e.g. `environment.create`.
    pub operation: String,
    /// The resource's team, when known.
    pub team: Option<String>,
    /// The resource's environment, when known.
    pub environment: Option<String>,
    /// The time to check expiries against (defaults to now).
    pub now: DateTime<Utc>,
}

impl AuthzRequest {
    /// A request for `operation` now.
    pub fn new(operation: impl Into<String>) -> Self {
        Self {
            operation: operation.into(),
            team: None,
            environment: None,
            now: Utc::now(),
        }
    }
    /// The resource's team.
    pub fn team(mut self, team_id: impl Into<String>) -> Self {
        self.team = Some(team_id.into());
        self
    }
    /// The resource's environment.
    pub fn environment(mut self, environment_id: impl Into<String>) -> Self {
        self.environment = Some(environment_id.into());
        self
    }
    /// Evaluates at another time (tests, clock skew handling).
    pub fn at(mut self, now: DateTime<Utc>) -> Self {
        self.now = now;
        self
    }
}

/// A token whose signatures verified against the key ring.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    biscuit: Biscuit,
    key_id: u32,
    user_id: String,
    token_id: String,
    expires_at: DateTime<Utc>,
}

impl VerifiedToken {
    /// The expiry identity minted into the authority block (attenuation
    /// blocks may only shorten it).
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.expires_at
    }
    /// The user the token acts for.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }
    /// The token id (shared by every token attenuated from the same mint).
    pub fn token_id(&self) -> &str {
        &self.token_id
    }
    /// The id of the root key that signed it.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }
    /// Number of attenuation blocks.
    pub fn attenuation_blocks(&self) -> usize {
        self.biscuit.block_count().saturating_sub(1)
    }

    /// Runs the biscuit authorizer: every check of every block (expiry,
    /// attenuation to team / environment / operations / earlier expiry)
    /// must pass for the request. Role rules are the caller's business.
    pub fn authorize(&self, request: &AuthzRequest) -> Result<()> {
        match self.run_authorizer(request, request.now) {
            // Only expiry checks depend on time: if the same request passes
            // at the epoch, what failed now is an expiry.
            Err(TokenError::Denied)
                if self
                    .run_authorizer(request, DateTime::<Utc>::UNIX_EPOCH)
                    .is_ok() =>
            {
                Err(TokenError::Expired)
            }
            other => other,
        }
    }

    fn run_authorizer(&self, request: &AuthzRequest, now: DateTime<Utc>) -> Result<()> {
        let secs = epoch_secs(now);
        let mut builder = AuthorizerBuilder::new()
            .set_limits(limits())
            .fact(fact(
                "time",
                &[date(&(UNIX_EPOCH + Duration::from_secs(secs)))],
            ))
            .and_then(|b| b.fact(fact("operation", &[string(&request.operation)])))
            .map_err(classify)?;
        if let Some(team) = &request.team {
            builder = builder
                .fact(fact("team", &[string(team)]))
                .map_err(classify)?;
        }
        if let Some(env) = &request.environment {
            builder = builder
                .fact(fact("environment", &[string(env)]))
                .map_err(classify)?;
        }
        let mut authorizer = builder
            .policy("allow if true")
            .map_err(classify)?
            .build(&self.biscuit)
            .map_err(classify)?;
        authorizer.authorize().map(|_| ()).map_err(classify)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration as ChronoDuration;

    fn setup() -> (RootKey, KeyRing, String) {
        let root = RootKey::generate(7);
        let mut ring = KeyRing::new();
        ring.insert(7, &root.public_key_bytes()).unwrap();
        let claims = Claims::new("u1", "t1", Utc::now() + ChronoDuration::hours(1));
        let token = mint(&root, &claims).unwrap();
        (root, ring, token)
    }

    #[test]
    fn mint_and_verify_roundtrip() {
        let (_, ring, token) = setup();
        let v = ring.verify(&token).unwrap();
        assert_eq!((v.user_id(), v.token_id(), v.key_id()), ("u1", "t1", 7));
        assert!(v.expires_at() > Utc::now() + ChronoDuration::minutes(59));
        v.authorize(&AuthzRequest::new("identity.whoami")).unwrap();
    }

    #[test]
    fn an_attenuated_expiry_reads_as_expired_and_other_restrictions_as_denied() {
        let (_, ring, token) = setup();
        let restricted = attenuate(
            &token,
            &Restriction::default()
                .team("team-a")
                .expires_at(Utc::now() - ChronoDuration::seconds(1)),
        )
        .unwrap();
        let v = ring.verify(&restricted).unwrap();
        assert!(matches!(
            v.authorize(&AuthzRequest::new("environment.get").team("team-a")),
            Err(TokenError::Expired)
        ));
        // Another team is refused for the restriction, expiry or not.
        assert!(matches!(
            v.authorize(&AuthzRequest::new("environment.get").team("team-b")),
            Err(TokenError::Denied)
        ));
    }

    #[test]
    fn expired_token_is_denied() {
        let root = RootKey::generate(1);
        let mut ring = KeyRing::new();
        ring.insert(1, &root.public_key_bytes()).unwrap();
        let token = mint(
            &root,
            &Claims::new("u", "t", Utc::now() - ChronoDuration::seconds(5)),
        )
        .unwrap();
        let v = ring.verify(&token).unwrap();
        assert!(matches!(
            v.authorize(&AuthzRequest::new("identity.whoami")),
            Err(TokenError::Expired)
        ));
        // Valid before its expiry.
        v.authorize(
            &AuthzRequest::new("identity.whoami").at(Utc::now() - ChronoDuration::minutes(1)),
        )
        .unwrap();
    }

    #[test]
    fn attenuation_restricts_team_environment_operations_and_expiry() {
        let (_, ring, token) = setup();
        let narrowed = attenuate(
            &token,
            &Restriction::default()
                .team("team-a")
                .environment("env-1")
                .operations(["environment.get", "environment.logs"]),
        )
        .unwrap();
        let v = ring.verify(&narrowed).unwrap();
        assert_eq!(v.attenuation_blocks(), 1);
        assert_eq!(v.token_id(), "t1");
        let ok = AuthzRequest::new("environment.get")
            .team("team-a")
            .environment("env-1");
        v.authorize(&ok).unwrap();
        // Beyond the restriction: other operation, team, environment, or no team.
        for bad in [
            AuthzRequest::new("environment.exec")
                .team("team-a")
                .environment("env-1"),
            AuthzRequest::new("environment.get")
                .team("team-b")
                .environment("env-1"),
            AuthzRequest::new("environment.get")
                .team("team-a")
                .environment("env-2"),
            AuthzRequest::new("environment.get"),
        ] {
            assert!(
                matches!(v.authorize(&bad), Err(TokenError::Denied)),
                "{bad:?}"
            );
        }
        // Earlier expiry.
        let short = attenuate(
            &token,
            &Restriction::default().expires_at(Utc::now() + ChronoDuration::minutes(1)),
        )
        .unwrap();
        let v = ring.verify(&short).unwrap();
        v.authorize(&AuthzRequest::new("identity.whoami")).unwrap();
        assert!(
            v.authorize(
                &AuthzRequest::new("identity.whoami").at(Utc::now() + ChronoDuration::minutes(2))
            )
            .is_err()
        );
        // A later expiry in an attenuation cannot extend the token.
        let long = attenuate(
            &token,
            &Restriction::default().expires_at(Utc::now() + ChronoDuration::days(30)),
        )
        .unwrap();
        let v = ring.verify(&long).unwrap();
        assert!(
            v.authorize(
                &AuthzRequest::new("identity.whoami").at(Utc::now() + ChronoDuration::hours(2))
            )
            .is_err()
        );
    }

    #[test]
    fn attenuation_cannot_widen_by_adding_facts() {
        // Re-attenuating narrows further: both blocks' checks apply.
        let (_, ring, token) = setup();
        let a = attenuate(&token, &Restriction::default().team("team-a")).unwrap();
        let b = attenuate(&a, &Restriction::default().team("team-b")).unwrap();
        let v = ring.verify(&b).unwrap();
        assert_eq!(v.attenuation_blocks(), 2);
        assert!(
            v.authorize(&AuthzRequest::new("environment.list").team("team-a"))
                .is_err()
        );
        assert!(
            v.authorize(&AuthzRequest::new("environment.list").team("team-b"))
                .is_err()
        );
        // A block that asserts another user is refused outright.
        let forged = append(&token, "user(\"admin\"); token_id(\"x\");");
        assert!(matches!(ring.verify(&forged), Err(TokenError::Refused(_))));
    }

    fn append(token: &str, code: &str) -> String {
        biscuit_auth::UnverifiedBiscuit::from_base64(token)
            .unwrap()
            .append(BlockBuilder::new().code(code).unwrap())
            .unwrap()
            .to_base64()
            .unwrap()
    }

    /// A block joining `n` facts with themselves: what a hostile holder
    /// appends offline to freeze a verifier.
    pub(crate) fn self_join(n: usize) -> String {
        let mut code = String::new();
        for i in 0..n {
            code.push_str(&format!("f({i});"));
        }
        code.push_str("g($a, $b, $c) <- f($a), f($b), f($c);");
        code
    }

    #[test]
    fn hostile_blocks_are_refused_before_evaluation() {
        let (_, ring, token) = setup();
        let refused = |t: &str| match ring.verify(t) {
            Err(TokenError::Refused(reason)) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        };
        // Facts and rules in an attenuation block (a self-join of 300 facts
        // would not finish; it is refused at once).
        let started = std::time::Instant::now();
        assert!(refused(&append(&token, &self_join(100))).contains("facts"));
        refused(&append(&token, &self_join(300)));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(refused(&append(&token, "x($a) <- team($a);")).contains("rules"));
        // Checks beyond what restrictions need.
        for (code, what) in [
            ("check all operation($o), $o == \"a\";", "check if"),
            ("reject if team(\"x\");", "check if"),
            ("check if user($u);", "team, environment"),
            (
                "check if team($a), team($b), team($c), team($d), team($e);",
                "predicates",
            ),
            ("check if time($t), $t.matches(\"a*\");", "comparison"),
            (
                "check if team($t), [\"a\", \"b\"].contains($t);",
                "comparison",
            ),
            ("check if team($t) trusting authority;", "scopes"),
        ] {
            let t = append(&token, code);
            assert!(refused(&t).contains(what), "{code}: {}", refused(&t));
        }
        let many: Vec<String> = (0..40).map(|i| format!("operation(\"op{i}\")")).collect();
        let t = append(&token, &format!("check if {};", many.join(" or ")));
        assert!(refused(&t).contains("alternatives"));
        // Too many blocks, too large a token.
        let mut deep = token.clone();
        for _ in 0..MAX_BLOCKS {
            deep = attenuate(&deep, &Restriction::default().team("team-a")).unwrap();
        }
        assert!(refused(&deep).contains("blocks"));
        assert!(refused(&"A".repeat(MAX_TOKEN_CHARS + 1)).contains("larger"));
        // A third-party block.
        let external = KeyPair::new();
        let request = Biscuit::from_base64(&token, &ring)
            .unwrap()
            .third_party_request()
            .unwrap();
        let signed = request
            .create_block(
                &external.private(),
                BlockBuilder::new().code("check if team(\"a\");").unwrap(),
            )
            .unwrap();
        let t = Biscuit::from_base64(&token, &ring)
            .unwrap()
            .append_third_party(external.public(), signed)
            .unwrap()
            .to_base64()
            .unwrap();
        assert!(refused(&t).contains("third-party"));
    }

    #[test]
    fn only_the_authority_block_identity_mints_is_accepted() {
        // Signed by the right key, but not the shape identity mints.
        let root = RootKey::generate(1);
        let mut ring = KeyRing::new();
        ring.insert(1, &root.public_key_bytes()).unwrap();
        for code in [
            "user(\"u\"); token_id(\"t\");",
            "user(\"u\"); token_id(\"t\"); admin(true); check if time($t), $t < 2100-01-01T00:00:00Z;",
            "user(\"u\"); token_id(\"t\"); check if time($t), $t > 2000-01-01T00:00:00Z;",
            "user(\"u\"); user(\"v\"); check if time($t), $t < 2100-01-01T00:00:00Z;",
            "user(\"u\"); token_id(\"t\"); x($a) <- user($a); check if time($t), $t < 2100-01-01T00:00:00Z;",
        ] {
            let t = Biscuit::builder()
                .code(code)
                .unwrap()
                .root_key_id(1)
                .build(&root.keypair)
                .unwrap()
                .to_base64()
                .unwrap();
            assert!(
                matches!(ring.verify(&t), Err(TokenError::Refused(_))),
                "{code}"
            );
        }
    }

    #[test]
    fn the_largest_accepted_token_verifies_and_authorizes() {
        let (_, ring, token) = setup();
        let ops: Vec<String> = (0..6).map(|i| format!("op.{i}")).collect();
        let mut t = token;
        for i in 0..MAX_BLOCKS - 1 {
            t = attenuate(
                &t,
                &Restriction::default()
                    .team("team-a")
                    .environment(format!("env-{i}"))
                    .operations(ops.iter().cloned().chain(["environment.get".to_owned()]))
                    .expires_at(Utc::now() + ChronoDuration::minutes(5)),
            )
            .unwrap();
        }
        assert!(t.len() <= MAX_TOKEN_CHARS, "{}", t.len());
        let v = ring.verify(&t).unwrap();
        assert_eq!(v.attenuation_blocks(), MAX_BLOCKS - 1);
        // Environments differ per block: nothing is allowed, evaluated fast.
        assert!(matches!(
            v.authorize(
                &AuthzRequest::new("environment.get")
                    .team("team-a")
                    .environment("env-0")
            ),
            Err(TokenError::Denied)
        ));
    }

    #[test]
    fn a_scope_becomes_one_block_of_or_checks_the_shape_guard_accepts() {
        let (_, ring, token) = setup();
        let ids = |prefix: u8| -> Vec<String> {
            (0..MAX_SCOPE_VALUES)
                .map(|i| format!("{prefix:02x}{i:06x}-2f4d-4c3b-9a8e-1d2c3b4a5f60"))
                .collect()
        };
        // A large scope as identity issues it: 16 team and 16 environment
        // UUIDs and 16 operations as long as the real ones.
        let scope = Scope {
            teams: ids(1),
            environments: ids(2),
            operations: (0..MAX_SCOPE_VALUES)
                .map(|i| format!("identity.service_account.op_{i:02}"))
                .collect(),
        };
        let scoped = restrict(&token, &scope).unwrap();
        assert!(scoped.len() <= MAX_TOKEN_CHARS, "{} chars", scoped.len());
        let verified = ring.verify(&scoped).unwrap();
        assert_eq!(verified.attenuation_blocks(), 1);
        let request =
            |team: &str, env: &str, op: &str| AuthzRequest::new(op).team(team).environment(env);
        let (team, env, op) = (
            &scope.teams[15],
            &scope.environments[3],
            &scope.operations[7],
        );
        assert!(verified.authorize(&request(team, env, op)).is_ok());
        assert!(verified.authorize(&request("other", env, op)).is_err());
        assert!(verified.authorize(&request(team, "other", op)).is_err());
        assert!(verified.authorize(&request(team, env, "other")).is_err());
        // A request naming no team is outside a team-scoped token.
        assert!(
            verified
                .authorize(&AuthzRequest::new(op.as_str()).environment(env))
                .is_err()
        );

        // Operations only: any team, that operation only.
        let ops = Scope {
            operations: vec!["environment.get".into()],
            ..Scope::default()
        };
        let verified = ring.verify(&restrict(&token, &ops).unwrap()).unwrap();
        assert!(
            verified
                .authorize(&AuthzRequest::new("environment.get").team("t"))
                .is_ok()
        );
        assert!(
            verified
                .authorize(&AuthzRequest::new("environment.create").team("t"))
                .is_err()
        );

        // Nothing, too many, or bad values: refused.
        assert!(restrict(&token, &Scope::default()).is_err());
        let mut too_many = ids(1);
        too_many.push("one-more".into());
        // Within the counts but too long for a token: refused, not issued.
        let long = |c: char| -> Vec<String> {
            (0..MAX_SCOPE_VALUES)
                .map(|i| format!("{i:02}{}", c.to_string().repeat(62)))
                .collect()
        };
        let huge = Scope {
            teams: long('t'),
            environments: long('e'),
            operations: long('o'),
        };
        assert!(matches!(
            restrict(&token, &huge),
            Err(TokenError::Invalid {
                field: "restrictions",
                ..
            })
        ));
        assert!(
            restrict(
                &token,
                &Scope {
                    teams: too_many,
                    ..Scope::default()
                }
            )
            .is_err()
        );
        assert!(
            restrict(
                &token,
                &Scope {
                    teams: vec!["a\") or true; //".into()],
                    ..Scope::default()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn attenuation_rejects_bad_values() {
        let (_, _, token) = setup();
        assert!(attenuate(&token, &Restriction::default()).is_err());
        assert!(matches!(
            attenuate(
                &token,
                &Restriction::default().team("a\"); check if false; (\"")
            ),
            Err(TokenError::Invalid { field: "team", .. })
        ));
        assert!(matches!(
            attenuate("not a token", &Restriction::default().team("a")),
            Err(TokenError::Malformed)
        ));
    }

    #[test]
    fn a_check_that_cannot_be_evaluated_denies_instead_of_failing() {
        let (_, ring, token) = setup();
        let mistyped = biscuit_auth::UnverifiedBiscuit::from_base64(&token)
            .unwrap()
            .append(
                BlockBuilder::new()
                    .code("check if time($t), $t < \"x\";")
                    .unwrap(),
            )
            .unwrap()
            .to_base64()
            .unwrap();
        let verified = ring.verify(&mistyped).unwrap();
        assert!(matches!(
            verified.authorize(&AuthzRequest::new("identity.whoami")),
            Err(TokenError::Denied)
        ));
    }

    #[test]
    fn tampered_token_is_rejected() {
        let (_, ring, token) = setup();
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::URL_SAFE;
        let mut bytes = engine.decode(&token).unwrap();
        // Flip a byte inside the authority block payload.
        let mid = bytes.len() / 3;
        bytes[mid] ^= 0x01;
        let tampered = engine.encode(&bytes);
        assert!(ring.verify(&tampered).is_err());
        // Garbage is malformed.
        assert!(matches!(ring.verify("abc"), Err(TokenError::Malformed)));
    }

    #[test]
    fn token_from_another_key_is_rejected() {
        let (_, ring, _) = setup();
        // Same key id, different key.
        let other = RootKey::generate(7);
        let forged = mint(
            &other,
            &Claims::new("u1", "t1", Utc::now() + ChronoDuration::hours(1)),
        )
        .unwrap();
        assert!(matches!(
            ring.verify(&forged),
            Err(TokenError::InvalidSignature)
        ));
        // Unknown key id.
        let unknown = RootKey::generate(99);
        let t = mint(
            &unknown,
            &Claims::new("u1", "t1", Utc::now() + ChronoDuration::hours(1)),
        )
        .unwrap();
        assert!(matches!(ring.verify(&t), Err(TokenError::UnknownKey)));
    }

    #[test]
    fn rotation_keeps_old_keys_until_retired() {
        let old = RootKey::generate(1);
        let new = RootKey::generate(2);
        let mut ring = KeyRing::new();
        ring.insert(1, &old.public_key_bytes()).unwrap();
        ring.insert(2, &new.public_key_bytes()).unwrap();
        let exp = Utc::now() + ChronoDuration::hours(1);
        let t_old = mint(&old, &Claims::new("u", "a", exp)).unwrap();
        let t_new = mint(&new, &Claims::new("u", "b", exp)).unwrap();
        assert_eq!(ring.verify(&t_old).unwrap().key_id(), 1);
        assert_eq!(ring.verify(&t_new).unwrap().key_id(), 2);
        ring.remove(1);
        assert!(matches!(ring.verify(&t_old), Err(TokenError::UnknownKey)));
        ring.verify(&t_new).unwrap();
    }

    #[test]
    fn root_key_roundtrips_through_bytes() {
        let k = RootKey::generate(3);
        let back = RootKey::from_private_bytes(3, &k.private_key_bytes()).unwrap();
        assert_eq!(k.public_key_bytes(), back.public_key_bytes());
        assert!(!format!("{k:?}").contains(&hex::encode(k.private_key_bytes())));
    }
}
