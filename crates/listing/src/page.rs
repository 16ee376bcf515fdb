//! A whole listing request (filter, order, show_deleted), its keyset page
//! tokens and the page it selects from candidate environments.

use std::cmp::Ordering;
use std::hash::Hasher;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message as _;
use prost_types::Timestamp;
use vibebox_proto::environment::{Environment, EnvironmentState};

use crate::filter::{Field, Filter, Op, Value};
use crate::order::{OrderBy, OrderField};

/// Page size when the request leaves it 0.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size accepted.
pub const MAX_PAGE_SIZE: usize = 500;
/// Longest page token accepted, in bytes (tokens issued here are far
/// shorter).
pub const MAX_PAGE_TOKEN_BYTES: usize = 1024;
/// Fewest environments one call of a listing ordered by a time may examine
/// before it answers a short page (see [`examine_limit`]).
pub const MIN_EXAMINED: usize = 1000;
/// Environments one call of a listing ordered by a time may examine per
/// result asked for (see [`examine_limit`]).
pub const EXAMINED_PER_RESULT: usize = 10;
/// Most environments a listing ordered by `name` or `state` first may
/// select (they are sorted in memory on every call): a listing that selects
/// more is refused, to be narrowed by a filter or ordered by a time.
pub const MAX_SORTED: usize = 5000;

/// How many environments one call of a listing ordered by a time examines
/// at most (`max(10 × size, 1000)`), whatever its filter matches: a filter
/// that matches few of a long history answers pages shorter than `size`,
/// even empty ones, each with a token to go on from where it stopped
/// ([`Query::partial_page`]). The cost of a call stays bounded however
/// many environments a team ever had (deleted ones are kept).
pub fn examine_limit(size: usize) -> usize {
    size.saturating_mul(EXAMINED_PER_RESULT).max(MIN_EXAMINED)
}

/// A request field that cannot be used, and why (for a BadRequest field
/// violation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {description}")]
pub struct InvalidArgument {
    /// `filter`, `order_by`, `page_size` or `page_token`.
    pub field: &'static str,
    /// What is wrong with it.
    pub description: String,
}

fn invalid(field: &'static str, description: impl Into<String>) -> InvalidArgument {
    InvalidArgument {
        field,
        description: description.into(),
    }
}

/// The page size a request asks for: 0 means [`DEFAULT_PAGE_SIZE`]; negative
/// or above [`MAX_PAGE_SIZE`] is refused.
pub fn page_size(requested: i32) -> Result<usize, InvalidArgument> {
    match usize::try_from(requested) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) if n <= MAX_PAGE_SIZE => Ok(n),
        _ => Err(invalid(
            "page_size",
            format!("must be between 0 and {MAX_PAGE_SIZE}"),
        )),
    }
}

/// The page token's content: which query issued it, and the last item of
/// the page it ended (its id and sort-key fields only).
#[derive(Clone, PartialEq, prost::Message)]
struct Token {
    #[prost(fixed64, tag = "1")]
    query: u64,
    #[prost(message, optional, tag = "2")]
    last: Option<Environment>,
}

/// Where a page starts: strictly after this (partial) environment in the
/// query's order.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    last: Environment,
}

impl Cursor {
    /// The last item of the previous page: its id and the fields the order
    /// reads, nothing else.
    pub fn last(&self) -> &Environment {
        &self.last
    }
}

/// An inclusive range of milliseconds since the epoch; `None` is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsRange {
    /// Smallest value.
    pub min: Option<i64>,
    /// Largest value.
    pub max: Option<i64>,
}

impl MsRange {
    fn at_least(&mut self, ms: i64) {
        self.min = Some(self.min.map_or(ms, |m| m.max(ms)));
    }

    fn at_most(&mut self, ms: i64) {
        self.max = Some(self.max.map_or(ms, |m| m.min(ms)));
    }
}

/// What a database query may narrow its candidates by: every environment
/// the query can still return (on this page and after) satisfies these.
/// They are a superset (time bounds in whole milliseconds): the exact
/// judgement is [`Query::page`]'s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bounds {
    /// `create_time`, in whole milliseconds.
    pub create_time_ms: MsRange,
    /// `update_time`, in whole milliseconds.
    pub update_time_ms: MsRange,
    /// `owner_id = X` is required.
    pub owner_id: Option<String>,
    /// `id = X` is required.
    pub id: Option<String>,
    /// `state = X` is required.
    pub state: Option<EnvironmentState>,
    /// Whether deleted environments can be returned at all.
    pub include_deleted: bool,
}

/// Milliseconds of `t`, rounded down.
fn floor_ms(t: &Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos).div_euclid(1_000_000))
}

/// A page of results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    /// The environments of this page, in order.
    pub environments: Vec<Environment>,
    /// Token of the next page; empty on the last page.
    pub next_page_token: String,
}

/// A listing request: filter, order and whether deleted environments are
/// included.
#[derive(Debug, Clone)]
pub struct Query {
    filter: Filter,
    order: OrderBy,
    show_deleted: bool,
    /// Fingerprint of the request's text, carried by its page tokens.
    fingerprint: u64,
}

impl Query {
    /// Parses a request's `filter` and `order_by`.
    pub fn new(filter: &str, order_by: &str, show_deleted: bool) -> Result<Self, InvalidArgument> {
        let parsed = Filter::parse(filter).map_err(|e| invalid("filter", e.to_string()))?;
        let order = OrderBy::parse(order_by).map_err(|e| invalid("order_by", e.to_string()))?;
        // FNV-1a: stable across processes and versions (a token outlives
        // the orchestrator that issued it).
        let mut hash = fnv::FnvHasher::default();
        for part in [
            b"listing-v1".as_slice(),
            filter.as_bytes(),
            order_by.as_bytes(),
        ] {
            hash.write(&(part.len() as u64).to_le_bytes());
            hash.write(part);
        }
        hash.write(&[u8::from(show_deleted)]);
        Ok(Query {
            filter: parsed,
            order,
            show_deleted,
            fingerprint: hash.finish(),
        })
    }

    /// The filter.
    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// The order.
    pub fn order(&self) -> &OrderBy {
        &self.order
    }

    /// Whether deleted environments can be listed: `show_deleted`, or a
    /// filter that names the state DELETED (`state = DELETED`).
    pub fn includes_deleted(&self) -> bool {
        self.show_deleted || self.filter.names_state(EnvironmentState::Deleted)
    }

    /// Whether `env` belongs in the listing (page aside).
    pub fn matches(&self, env: &Environment) -> bool {
        (self.includes_deleted() || env.state != EnvironmentState::Deleted as i32)
            && self.filter.matches(env)
    }

    /// Reads a page token: `None` for the first page (an empty token).
    /// A token this query did not issue (another filter, order_by or
    /// show_deleted, or no token at all) is refused.
    pub fn cursor(&self, page_token: &str) -> Result<Option<Cursor>, InvalidArgument> {
        if page_token.is_empty() {
            return Ok(None);
        }
        let malformed = || invalid("page_token", "not a token from a previous page");
        if page_token.len() > MAX_PAGE_TOKEN_BYTES {
            return Err(malformed());
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(page_token)
            .map_err(|_| malformed())?;
        let token = Token::decode(bytes.as_slice()).map_err(|_| malformed())?;
        if token.query != self.fingerprint {
            return Err(invalid(
                "page_token",
                "was issued for another filter, order_by or show_deleted: list again \
                 without a page token",
            ));
        }
        match token.last {
            Some(last) if !last.id.is_empty() => Ok(Some(Cursor { last })),
            _ => Err(malformed()),
        }
    }

    /// Bounds for narrowing the candidates in a database: from the
    /// comparisons the filter requires and from the cursor.
    pub fn bounds(&self, cursor: Option<&Cursor>) -> Bounds {
        let mut bounds = Bounds {
            include_deleted: self.includes_deleted(),
            ..Bounds::default()
        };
        for c in self.filter.required() {
            match (&c.field, c.op, &c.value) {
                (Field::CreateTime | Field::UpdateTime, op, Value::Time(t)) => {
                    let range = if c.field == Field::CreateTime {
                        &mut bounds.create_time_ms
                    } else {
                        &mut bounds.update_time_ms
                    };
                    // Stored times are whole milliseconds: rounding the
                    // bound down keeps every match (m >= t implies
                    // m >= floor(t); m <= t implies m <= floor(t)).
                    match op {
                        Op::Gt | Op::Ge => range.at_least(floor_ms(t)),
                        Op::Lt | Op::Le => range.at_most(floor_ms(t)),
                        Op::Eq => {
                            range.at_least(floor_ms(t));
                            range.at_most(floor_ms(t));
                        }
                        Op::Ne | Op::Has => {}
                    }
                }
                (Field::OwnerId, Op::Eq, Value::Text(v)) => {
                    bounds.owner_id.get_or_insert_with(|| v.clone());
                }
                (Field::Id, Op::Eq, Value::Text(v)) => {
                    bounds.id.get_or_insert_with(|| v.clone());
                }
                (Field::State, Op::Eq, Value::State(s)) => {
                    bounds.state.get_or_insert(*s);
                }
                _ => {}
            }
        }
        // Items after the cursor are on its side of the first key.
        if let (Some(cursor), Some(first)) = (cursor, self.order.keys().first()) {
            let (range, t) = match first.field {
                OrderField::CreateTime => (&mut bounds.create_time_ms, &cursor.last.create_time),
                OrderField::UpdateTime => (&mut bounds.update_time_ms, &cursor.last.update_time),
                OrderField::Name | OrderField::State => return bounds,
            };
            let ms = floor_ms(&t.unwrap_or_default());
            if first.descending {
                range.at_most(ms);
            } else {
                range.at_least(ms);
            }
        }
        bounds
    }

    /// The page after `cursor` (or the first) of at most `size` items among
    /// `candidates`: those the query matches, in its order, with a token for
    /// the next page when more remain.
    pub fn page(
        &self,
        candidates: impl IntoIterator<Item = Environment>,
        size: usize,
        cursor: Option<&Cursor>,
    ) -> Page {
        let size = size.max(1);
        let compare = |a: &Environment, b: &Environment| self.order.compare(a, b);
        let mut items: Vec<Environment> = candidates
            .into_iter()
            .filter(|e| {
                self.matches(e) && cursor.is_none_or(|c| compare(&c.last, e) == Ordering::Less)
            })
            .collect();
        // Only the first size + 1 need sorting (one more tells whether a
        // next page exists).
        if items.len() > size + 1 {
            items.select_nth_unstable_by(size, compare);
            items.truncate(size + 1);
        }
        items.sort_unstable_by(compare);
        let mut next_page_token = String::new();
        if items.len() > size {
            items.truncate(size);
            if let Some(last) = items.last() {
                next_page_token = self.token(last);
            }
        }
        Page {
            environments: items,
            next_page_token,
        }
    }

    /// A page that stopped early, before every candidate that may follow
    /// the cursor was examined (a scan in the order's first key that
    /// reached its [`examine_limit`]): the matches among `candidates` as
    /// [`Query::page`] makes them and, when they do not fill the page, a
    /// token positioned right after `edge` so that the next page goes on
    /// where the scan stopped (the page may be short, even empty).
    ///
    /// `edge` is the last environment examined, in this query's order,
    /// whether it matches or not: every environment not examined must sort
    /// after it, and it must sort after the cursor (so that paging always
    /// moves on). Its token carries its id and sort keys only, like any
    /// other.
    pub fn partial_page(
        &self,
        candidates: impl IntoIterator<Item = Environment>,
        size: usize,
        cursor: Option<&Cursor>,
        edge: &Environment,
    ) -> Page {
        let mut page = self.page(candidates, size, cursor);
        if page.next_page_token.is_empty() {
            page.next_page_token = self.token(edge);
        }
        page
    }

    /// Whether the order's first key is a time, so that a database can
    /// read the candidates in that order and stop early (`create_time` or
    /// `update_time`); `name` and `state` are sorted in memory.
    pub fn scans_in_order(&self) -> bool {
        matches!(
            self.order.keys().first().map(|k| k.field),
            Some(OrderField::CreateTime | OrderField::UpdateTime)
        )
    }

    /// The token of the page after `last`.
    fn token(&self, last: &Environment) -> String {
        let mut key = Environment {
            id: last.id.clone(),
            ..Environment::default()
        };
        for k in self.order.keys() {
            match k.field {
                OrderField::CreateTime => key.create_time = last.create_time,
                OrderField::UpdateTime => key.update_time = last.update_time,
                OrderField::Name => key.name.clone_from(&last.name),
                OrderField::State => key.state = last.state,
            }
        }
        let token = Token {
            query: self.fingerprint,
            last: Some(key),
        };
        URL_SAFE_NO_PAD.encode(token.encode_to_vec())
    }
}
