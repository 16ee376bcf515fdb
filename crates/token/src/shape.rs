//! The only token shapes the platform accepts, checked on the raw bytes
//! before any signature or datalog work.
//!
//! Biscuit lets any holder append blocks offline, and a block may carry
//! arbitrary datalog: facts, rules joining them, scopes, third-party
//! signatures. The datalog engine's time limit is only checked between
//! fixpoint iterations, so one rule joining a few hundred facts with
//! themselves runs unbounded inside a single iteration. VibeBox never issues
//! such blocks, so it refuses them, structurally, before running anything:
//!
//! - at most [`MAX_TOKEN_CHARS`] characters of base64 and [`MAX_BLOCKS`]
//!   blocks (the authority block and up to seven attenuations);
//! - the authority block is exactly what identity mints: `user(<string>)`,
//!   `token_id(<string>)` and `check if time($t), $t < <date>`, nothing else;
//! - an attenuation block carries checks only (no facts, no rules, no scopes,
//!   no public keys, no third-party signature), at most
//!   [`MAX_CHECKS_PER_BLOCK`] of them; each check is a plain `check if`
//!   (not `check all`, not `reject if`) of at most [`MAX_QUERIES_PER_CHECK`]
//!   alternatives, each alternative at most [`MAX_PREDICATES_PER_QUERY`]
//!   predicates among `team`, `environment`, `operation` and `time` with one
//!   string, date or variable term, and at most
//!   [`MAX_EXPRESSIONS_PER_QUERY`] comparisons of a variable with a value.
//!
//! With no rules anywhere, evaluation derives no fact: the world is the two
//! authority facts plus the at most four the authorizer adds, each allowed
//! predicate matches at most one fact, and a token's whole evaluation is a
//! few thousand lookups at most.

use biscuit_auth::datalog::SymbolTable;
use biscuit_auth::format::schema;
use biscuit_prost::Message as _;

use crate::TokenError;

/// Longest accepted token, in base64 characters.
pub const MAX_TOKEN_CHARS: usize = 4096;
/// Most blocks in a token (the authority block included).
pub const MAX_BLOCKS: usize = 8;
/// Most checks in one attenuation block.
pub const MAX_CHECKS_PER_BLOCK: usize = 8;
/// Most alternatives (`or`) in one check.
pub const MAX_QUERIES_PER_CHECK: usize = 32;
/// Most predicates in one alternative of a check.
pub const MAX_PREDICATES_PER_QUERY: usize = 4;
/// Most expressions in one alternative of a check.
pub const MAX_EXPRESSIONS_PER_QUERY: usize = 2;
/// Most operations in one expression (`$t < <date>` is three).
const MAX_OPS_PER_EXPRESSION: usize = 3;
/// Most symbols a block may define, and their longest length.
const MAX_SYMBOLS_PER_BLOCK: usize = 64;
const MAX_SYMBOL_BYTES: usize = 128;

/// Predicates a check of an attenuation block may use (what the authorizer
/// provides about a request).
const CHECK_PREDICATES: [&str; 4] = ["team", "environment", "operation", "time"];

/// What the raw bytes of an accepted token say (authenticated only once the
/// signatures verified over the same bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shape {
    pub(crate) user_id: String,
    pub(crate) token_id: String,
    /// The authority block's expiry, seconds since the epoch.
    pub(crate) expires_at: u64,
    /// Blocks, the authority block included.
    pub(crate) blocks: usize,
}

fn refuse(reason: &'static str) -> TokenError {
    TokenError::Refused(reason)
}

/// Symbols of the token seen so far: biscuit's defaults below 1024, then
/// every block's own symbols in order (no third-party blocks, so one table).
struct Symbols {
    defaults: SymbolTable,
    own: Vec<String>,
}

impl Symbols {
    fn add(&mut self, block: &schema::Block) -> Result<(), TokenError> {
        if block.symbols.len() > MAX_SYMBOLS_PER_BLOCK
            || block.symbols.iter().any(|s| s.len() > MAX_SYMBOL_BYTES)
        {
            return Err(refuse("a block defines too many or too long symbols"));
        }
        self.own.extend(block.symbols.iter().cloned());
        Ok(())
    }

    fn get(&self, index: u64) -> Option<&str> {
        if index < 1024 {
            self.defaults.get_symbol(index)
        } else {
            usize::try_from(index - 1024)
                .ok()
                .and_then(|i| self.own.get(i))
                .map(String::as_str)
        }
    }
}

/// Checks a token's size, block count and the shape of every block without
/// verifying or evaluating anything; returns the decoded bytes and what the
/// authority block says.
pub(crate) fn inspect(token: &str) -> Result<(Vec<u8>, Shape), TokenError> {
    let token = token.trim();
    if token.len() > MAX_TOKEN_CHARS {
        return Err(refuse("token larger than 4096 characters"));
    }
    let bytes = decode_base64(token)?;
    let container = schema::Biscuit::decode(bytes.as_slice()).map_err(|_| TokenError::Malformed)?;
    if container.root_key_id.is_none() {
        return Err(TokenError::UnknownKey);
    }
    let blocks = 1 + container.blocks.len();
    if blocks > MAX_BLOCKS {
        return Err(refuse("token has more than 8 blocks"));
    }
    let mut symbols = Symbols {
        defaults: SymbolTable::new(),
        own: Vec::new(),
    };
    let authority = decode_block(&container.authority)?;
    symbols.add(&authority)?;
    let (user_id, token_id, expires_at) = authority_claims(&authority, &symbols)?;
    for signed in &container.blocks {
        let block = decode_block(signed)?;
        symbols.add(&block)?;
        attenuation(&block, &symbols)?;
    }
    Ok((
        bytes,
        Shape {
            user_id,
            token_id,
            expires_at,
            blocks,
        },
    ))
}

fn decode_base64(token: &str) -> Result<Vec<u8>, TokenError> {
    use base64::Engine as _;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    ENGINE.decode(token).map_err(|_| TokenError::Malformed)
}

fn decode_block(signed: &schema::SignedBlock) -> Result<schema::Block, TokenError> {
    if signed.external_signature.is_some() {
        return Err(refuse("third-party blocks are not accepted"));
    }
    let block =
        schema::Block::decode(signed.block.as_slice()).map_err(|_| TokenError::Malformed)?;
    if !block.scope.is_empty() {
        return Err(refuse("blocks may not change the trusted scope"));
    }
    if !block.public_keys.is_empty() {
        return Err(refuse("blocks may not name external keys"));
    }
    Ok(block)
}

fn name_of<'a>(symbols: &'a Symbols, predicate: &schema::Predicate) -> Result<&'a str, TokenError> {
    symbols.get(predicate.name).ok_or(TokenError::Malformed)
}

/// The one string term of a predicate.
fn single_string(symbols: &Symbols, predicate: &schema::Predicate) -> Option<String> {
    use schema::term::Content;
    match predicate.terms.as_slice() {
        [
            schema::Term {
                content: Some(Content::String(index)),
            },
        ] => symbols.get(*index).map(str::to_owned),
        _ => None,
    }
}

/// The authority block must be exactly what identity mints.
fn authority_claims(
    block: &schema::Block,
    symbols: &Symbols,
) -> Result<(String, String, u64), TokenError> {
    let mismatch = || refuse("the authority block is not one identity issues");
    if !block.rules.is_empty() || block.facts.len() != 2 || block.checks.len() != 1 {
        return Err(mismatch());
    }
    let mut user = None;
    let mut token_id = None;
    for fact in &block.facts {
        let slot = match name_of(symbols, &fact.predicate)? {
            "user" => &mut user,
            "token_id" => &mut token_id,
            _ => return Err(mismatch()),
        };
        if slot.is_some() {
            return Err(mismatch());
        }
        *slot = Some(single_string(symbols, &fact.predicate).ok_or_else(mismatch)?);
    }
    let (Some(user), Some(token_id)) = (user, token_id) else {
        return Err(mismatch());
    };
    let expires_at = expiry_check(&block.checks[0], symbols).ok_or_else(mismatch)?;
    Ok((user, token_id, expires_at))
}

/// `check if time($t), $t < <date>`: the date.
fn expiry_check(check: &schema::Check, symbols: &Symbols) -> Option<u64> {
    use schema::op::Content as Op;
    use schema::term::Content as T;
    if check.kind.unwrap_or(0) != schema::check::Kind::One as i32 {
        return None;
    }
    let [query] = check.queries.as_slice() else {
        return None;
    };
    if !query.head.terms.is_empty() || !query.scope.is_empty() {
        return None;
    }
    let [time] = query.body.as_slice() else {
        return None;
    };
    if symbols.get(time.name) != Some("time") {
        return None;
    }
    let [
        schema::Term {
            content: Some(T::Variable(var)),
        },
    ] = time.terms.as_slice()
    else {
        return None;
    };
    let [expression] = query.expressions.as_slice() else {
        return None;
    };
    match expression.ops.as_slice() {
        [
            schema::Op {
                content:
                    Some(Op::Value(schema::Term {
                        content: Some(T::Variable(v)),
                    })),
            },
            schema::Op {
                content:
                    Some(Op::Value(schema::Term {
                        content: Some(T::Date(date)),
                    })),
            },
            schema::Op {
                content: Some(Op::Binary(binary)),
            },
        ] if v == var
            && binary.kind == schema::op_binary::Kind::LessThan as i32
            && binary.ffi_name.is_none() =>
        {
            Some(*date)
        }
        _ => None,
    }
}

/// An attenuation block: checks only, of the allowed kinds and sizes.
fn attenuation(block: &schema::Block, symbols: &Symbols) -> Result<(), TokenError> {
    if !block.facts.is_empty() {
        return Err(refuse("attenuation blocks may not add facts"));
    }
    if !block.rules.is_empty() {
        return Err(refuse("attenuation blocks may not add rules"));
    }
    if block.checks.is_empty() || block.checks.len() > MAX_CHECKS_PER_BLOCK {
        return Err(refuse("an attenuation block has 1 to 8 checks"));
    }
    for check in &block.checks {
        if check.kind.unwrap_or(0) != schema::check::Kind::One as i32 {
            return Err(refuse("only `check if` is accepted in attenuation blocks"));
        }
        if check.queries.is_empty() || check.queries.len() > MAX_QUERIES_PER_CHECK {
            return Err(refuse("a check has 1 to 32 alternatives"));
        }
        for query in &check.queries {
            restriction_query(query, symbols)?;
        }
    }
    Ok(())
}

fn restriction_query(query: &schema::Rule, symbols: &Symbols) -> Result<(), TokenError> {
    use schema::term::Content as T;
    if !query.head.terms.is_empty() || !query.scope.is_empty() {
        return Err(refuse("checks may not carry head terms or scopes"));
    }
    if query.body.is_empty() || query.body.len() > MAX_PREDICATES_PER_QUERY {
        return Err(refuse("a check alternative has 1 to 4 predicates"));
    }
    if query.expressions.len() > MAX_EXPRESSIONS_PER_QUERY {
        return Err(refuse("a check alternative has at most 2 expressions"));
    }
    for predicate in &query.body {
        let name = name_of(symbols, predicate)?;
        if !CHECK_PREDICATES.contains(&name) {
            return Err(refuse(
                "checks may only use team, environment, operation and time",
            ));
        }
        let ok = match predicate.terms.as_slice() {
            [
                schema::Term {
                    content: Some(term),
                },
            ] => matches!(
                (name, term),
                (_, T::Variable(_))
                    | ("time", T::Date(_))
                    | ("team" | "environment" | "operation", T::String(_))
            ),
            _ => false,
        };
        if !ok {
            return Err(refuse(
                "a check predicate takes one string, date or variable",
            ));
        }
    }
    for expression in &query.expressions {
        comparison(expression)?;
    }
    Ok(())
}

/// `<value or variable> <comparison> <value or variable>`, nothing else.
fn comparison(expression: &schema::Expression) -> Result<(), TokenError> {
    use schema::op::Content as Op;
    use schema::op_binary::Kind as B;
    use schema::term::Content as T;
    let bad = || refuse("a check expression is a single comparison");
    if expression.ops.len() != MAX_OPS_PER_EXPRESSION {
        return Err(bad());
    }
    for (i, op) in expression.ops.iter().enumerate() {
        let ok = match (i, &op.content) {
            (
                0 | 1,
                Some(Op::Value(schema::Term {
                    content: Some(T::Variable(_) | T::Date(_) | T::Integer(_) | T::String(_)),
                })),
            ) => true,
            (2, Some(Op::Binary(binary))) => {
                binary.ffi_name.is_none()
                    && [
                        B::LessThan,
                        B::GreaterThan,
                        B::LessOrEqual,
                        B::GreaterOrEqual,
                        B::Equal,
                        B::NotEqual,
                        B::HeterogeneousEqual,
                        B::HeterogeneousNotEqual,
                    ]
                    .iter()
                    .any(|k| *k as i32 == binary.kind)
            }
            _ => false,
        };
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}
