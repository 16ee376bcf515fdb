//! Listing environments: the `filter` (a subset of AIP-160), the `order_by`
//! (AIP-132) and keyset page tokens (AIP-158) of `ListEnvironments`, parsed
//! and evaluated over [`Environment`](vibebox_proto::environment::Environment)
//! messages.
//!
//! # Filter grammar
//!
//! ```text
//! filter      = [ expression ]
//! expression  = term { "AND" term }          (every term holds)
//!             | term { "OR" term }           (at least one holds)
//! term        = [ "NOT" | "-" ] simple
//! simple      = comparison | "(" expression ")"
//! comparison  = field operator value
//! field       = id | name | owner_id | team_id | state | image
//!             | create_time | update_time | labels.KEY | labels
//! operator    = "=" | "!=" | "<" | "<=" | ">" | ">=" | ":"
//! value       = word | string
//! word        = { A-Z a-z 0-9 _ - . : / + * @ }   (at least one)
//! string      = '"' ... '"' | "'" ... "'"        (escapes \\ \" \' \*)
//! ```
//!
//! - `AND`, `OR` and `NOT` are upper case. AND and OR may not be mixed in one
//!   expression without parentheses (`a AND b OR c` is refused: write
//!   `(a AND b) OR c` or `a AND (b OR c)`), so that a filter means the same
//!   whether it is read with AIP-160's precedence (OR binds tighter) or
//!   SQL's. Juxtaposition (`a b`, AIP-160's implicit AND) and global
//!   restrictions (a bare value) are not supported.
//! - `name`, `id`, `owner_id`, `team_id`, `image` (the canonical image) and
//!   `labels.KEY` are strings: `=` and `!=` compare exactly, `<` `<=` `>`
//!   `>=` compare byte-wise; a value ending in an unescaped `*` is a prefix
//!   (`name = "web-*"`), with `=` and `!=` only; `*` anywhere else is
//!   refused (in a string, `\*` is a literal `*`).
//! - `labels:KEY` (and `labels.KEY:*`) holds when the label is set. A
//!   comparison on a label that is not set is false, except `!=`, which is
//!   always the negation of `=`.
//! - `state` takes `=` and `!=` with an enum name, short (`RUNNING`) or full
//!   (`ENVIRONMENT_STATE_RUNNING`), case-sensitive.
//! - `create_time` and `update_time` take RFC 3339 timestamps (quoted or
//!   not), compared to the nanosecond.
//!
//! Cost is bounded: at most [`MAX_FILTER_BYTES`] bytes, [`MAX_COMPARISONS`]
//! comparisons and parentheses [`MAX_DEPTH`] deep. Every error names the
//! column where the filter went wrong and what was expected there.
//!
//! # Order
//!
//! `order_by` is a comma-separated list of `create_time`, `update_time`,
//! `name` and `state` (by enum number), each optionally followed by `desc`
//! (or `asc`, the default); empty means `create_time desc`. Ties are broken
//! by `id`, ascending, so that the order is total and page tokens are exact.
//!
//! # Pages
//!
//! A [`Query`] is a parsed filter, order and `show_deleted`. Its page tokens
//! carry the sort key of the last item returned and a fingerprint of the
//! request's filter, order_by and show_deleted: the next page starts right
//! after that item whatever was created or deleted meanwhile, and a token
//! offered with another filter, order or show_deleted is refused.
//!
//! # Cost
//!
//! Deleted environments are kept, so a team's history only grows. One call
//! of a listing ordered by a time examines at most [`examine_limit`]
//! environments (`max(10 × page_size, 1000)`): when a filter matches few of
//! them, the page is short (even empty) and its token goes on from where
//! the examination stopped ([`Query::partial_page`]); callers page until
//! the token is empty. A listing ordered by `name` or `state` first is
//! sorted in memory on every call, so it may select at most [`MAX_SORTED`]
//! environments (after narrowing by team, state, owner, id and times);
//! the orchestrator refuses a larger one. (A retention that purges deleted
//! records is not there yet.)

mod filter;
mod order;
mod page;

pub use filter::{
    Comparison, Field, Filter, FilterError, MAX_COMPARISONS, MAX_DEPTH, MAX_FILTER_BYTES, Op, Value,
};
pub use order::{MAX_ORDER_BY_BYTES, OrderBy, OrderByError, OrderField, OrderKey};
pub use page::{
    Bounds, Cursor, DEFAULT_PAGE_SIZE, EXAMINED_PER_RESULT, InvalidArgument, MAX_PAGE_SIZE,
    MAX_PAGE_TOKEN_BYTES, MAX_SORTED, MIN_EXAMINED, MsRange, Page, Query, examine_limit, page_size,
};

#[cfg(test)]
mod tests;
