//! `order_by` (AIP-132): which fields sort a listing, and the comparison
//! that sorts it.

use std::cmp::Ordering;

use vibebox_proto::environment::Environment;

use crate::filter::time_key;

/// Longest `order_by` accepted, in bytes.
pub const MAX_ORDER_BY_BYTES: usize = 256;

/// A field a listing can be sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderField {
    /// `create_time`.
    CreateTime,
    /// `update_time`.
    UpdateTime,
    /// `name` (byte-wise).
    Name,
    /// `state`, by enum number.
    State,
}

impl OrderField {
    /// The name written in `order_by`.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderField::CreateTime => "create_time",
            OrderField::UpdateTime => "update_time",
            OrderField::Name => "name",
            OrderField::State => "state",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "create_time" => OrderField::CreateTime,
            "update_time" => OrderField::UpdateTime,
            "name" => OrderField::Name,
            "state" => OrderField::State,
            _ => return None,
        })
    }

    fn compare(self, a: &Environment, b: &Environment) -> Ordering {
        match self {
            OrderField::CreateTime => {
                time_key(a.create_time.as_ref()).cmp(&time_key(b.create_time.as_ref()))
            }
            OrderField::UpdateTime => {
                time_key(a.update_time.as_ref()).cmp(&time_key(b.update_time.as_ref()))
            }
            OrderField::Name => a.name.as_bytes().cmp(b.name.as_bytes()),
            OrderField::State => a.state.cmp(&b.state),
        }
    }
}

/// One sort key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderKey {
    /// The field.
    pub field: OrderField,
    /// Largest first.
    pub descending: bool,
}

/// Why an `order_by` was refused: where and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct OrderByError {
    /// Byte offset in the text.
    pub offset: usize,
    /// Character position in the text, from 1.
    pub column: usize,
    /// What is wrong there.
    pub message: String,
}

/// A parsed `order_by`: one or more keys, then `id` ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderBy {
    keys: Vec<OrderKey>,
}

impl Default for OrderBy {
    /// `create_time desc`: newest first.
    fn default() -> Self {
        OrderBy {
            keys: vec![OrderKey {
                field: OrderField::CreateTime,
                descending: true,
            }],
        }
    }
}

impl OrderBy {
    /// Parses `field [desc|asc], ...`; empty (or blank) is the default,
    /// `create_time desc`.
    pub fn parse(text: &str) -> Result<Self, OrderByError> {
        let error = |offset: usize, message: String| OrderByError {
            offset,
            column: text[..offset].chars().count() + 1,
            message,
        };
        if text.len() > MAX_ORDER_BY_BYTES {
            let mut at = MAX_ORDER_BY_BYTES;
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            return Err(error(
                at,
                format!("order_by is longer than {MAX_ORDER_BY_BYTES} bytes"),
            ));
        }
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let mut keys: Vec<OrderKey> = Vec::new();
        let mut offset = 0;
        for part in text.split(',') {
            let start = offset;
            offset += part.len() + 1;
            let words = words(part, start);
            let (field_at, name, descending) = match words.as_slice() {
                [] => {
                    return Err(error(
                        start,
                        "expected a field name (create_time, update_time, name or state), \
                         found nothing: a ',' too many?"
                            .into(),
                    ));
                }
                [(at, name)] => (*at, *name, false),
                [(at, name), (dir_at, dir)] => {
                    let descending = if dir.eq_ignore_ascii_case("desc") {
                        true
                    } else if dir.eq_ignore_ascii_case("asc") {
                        false
                    } else {
                        return Err(error(
                            *dir_at,
                            format!("expected `desc`, `asc` or ',' after `{name}`, found `{dir}`"),
                        ));
                    };
                    (*at, *name, descending)
                }
                [_, _, (at, word), ..] => {
                    return Err(error(
                        *at,
                        format!("expected ',' or the end, found `{word}`"),
                    ));
                }
            };
            let Some(field) = OrderField::parse(name) else {
                return Err(error(
                    field_at,
                    format!(
                        "unknown field `{name}`: order_by takes create_time, update_time, \
                         name and state"
                    ),
                ));
            };
            if keys.iter().any(|k| k.field == field) {
                return Err(error(
                    field_at,
                    format!("`{name}` appears twice in order_by"),
                ));
            }
            keys.push(OrderKey { field, descending });
        }
        Ok(OrderBy { keys })
    }

    /// The keys, most significant first (the `id` tie breaker is implied).
    pub fn keys(&self) -> &[OrderKey] {
        &self.keys
    }

    /// Compares two environments in this order (ties broken by id).
    pub fn compare(&self, a: &Environment, b: &Environment) -> Ordering {
        for key in &self.keys {
            let ordering = key.field.compare(a, b);
            let ordering = if key.descending {
                ordering.reverse()
            } else {
                ordering
            };
            if ordering != Ordering::Equal {
                return ordering;
            }
        }
        a.id.as_bytes().cmp(b.id.as_bytes())
    }
}

/// The whitespace-separated words of `part` with their offsets (`base` is
/// the offset of `part` in the whole text).
fn words(part: &str, base: usize) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in part.char_indices() {
        if c.is_whitespace() {
            if let Some(s) = start.take() {
                out.push((base + s, &part[s..i]));
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push((base + s, &part[s..]));
    }
    out
}
