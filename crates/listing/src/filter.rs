//! The filter: parsed by recursive descent straight from the text (no
//! separate lexer: what a word may contain depends on whether it is a field
//! or a value), evaluated over an [`Environment`].

use std::cmp::Ordering;

use prost_types::Timestamp;
use vibebox_proto::environment::{Environment, EnvironmentState};

/// Longest filter accepted, in bytes.
pub const MAX_FILTER_BYTES: usize = 1024;
/// Most comparisons one filter may hold.
pub const MAX_COMPARISONS: usize = 32;
/// Deepest nesting of parentheses accepted.
pub const MAX_DEPTH: usize = 8;

/// Why a filter was refused: where (`offset` in bytes, `column` in
/// characters from 1) and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: {message}")]
pub struct FilterError {
    /// Byte offset in the filter text.
    pub offset: usize,
    /// Character position in the filter text, from 1.
    pub column: usize,
    /// What is wrong there.
    pub message: String,
}

/// A field a comparison reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// `id`.
    Id,
    /// `name`.
    Name,
    /// `owner_id`.
    OwnerId,
    /// `team_id`.
    TeamId,
    /// `image` (or `canonical_image`): the canonical image reference.
    Image,
    /// `state`.
    State,
    /// `create_time`.
    CreateTime,
    /// `update_time`.
    UpdateTime,
    /// `labels.KEY` (and `labels:KEY`): one label.
    Label(String),
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `:` (has): only as label presence.
    Has,
}

impl Op {
    fn holds(self, ordering: Ordering) -> bool {
        match self {
            Op::Eq => ordering == Ordering::Equal,
            Op::Ne => ordering != Ordering::Equal,
            Op::Lt => ordering == Ordering::Less,
            Op::Le => ordering != Ordering::Greater,
            Op::Gt => ordering == Ordering::Greater,
            Op::Ge => ordering != Ordering::Less,
            Op::Has => false,
        }
    }
}

/// The right-hand side of a comparison, typed for its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A string compared exactly (or byte-wise).
    Text(String),
    /// A string prefix (the value ended in `*`).
    Prefix(String),
    /// An environment state.
    State(EnvironmentState),
    /// A point in time.
    Time(Timestamp),
    /// Presence of a label (`labels:KEY`, `labels.KEY:*`).
    Present,
}

/// One `field op value` comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// What it reads.
    pub field: Field,
    /// How it compares.
    pub op: Op,
    /// What it compares with.
    pub value: Value,
}

impl Comparison {
    /// Whether `env` satisfies this comparison.
    pub fn matches(&self, env: &Environment) -> bool {
        match (&self.field, &self.value) {
            (Field::Label(key), Value::Present) => env.labels.contains_key(key),
            (Field::Label(key), value) => match env.labels.get(key) {
                Some(actual) => text_holds(actual, self.op, value),
                // Absent: only `!=` holds (it is the negation of `=`).
                None => self.op == Op::Ne,
            },
            (Field::State, Value::State(state)) => {
                (env.state == *state as i32) == (self.op == Op::Eq)
            }
            (Field::CreateTime, Value::Time(t)) => self
                .op
                .holds(time_key(env.create_time.as_ref()).cmp(&time_key(Some(t)))),
            (Field::UpdateTime, Value::Time(t)) => self
                .op
                .holds(time_key(env.update_time.as_ref()).cmp(&time_key(Some(t)))),
            (Field::Id, value) => text_holds(&env.id, self.op, value),
            (Field::Name, value) => text_holds(&env.name, self.op, value),
            (Field::OwnerId, value) => text_holds(&env.owner_id, self.op, value),
            (Field::TeamId, value) => text_holds(&env.team_id, self.op, value),
            (Field::Image, value) => text_holds(&env.canonical_image, self.op, value),
            // The parser never builds other pairs.
            _ => false,
        }
    }
}

/// A timestamp as a comparable pair (unset: the epoch).
pub(crate) fn time_key(t: Option<&Timestamp>) -> (i64, i32) {
    t.map_or((0, 0), |t| (t.seconds, t.nanos))
}

fn text_holds(actual: &str, op: Op, value: &Value) -> bool {
    match value {
        Value::Text(expected) => op.holds(actual.as_bytes().cmp(expected.as_bytes())),
        Value::Prefix(prefix) => actual.starts_with(prefix.as_str()) == (op == Op::Eq),
        _ => false,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expr {
    Cmp(Comparison),
    Not(Box<Expr>),
    All(Vec<Expr>),
    Any(Vec<Expr>),
}

impl Expr {
    fn matches(&self, env: &Environment) -> bool {
        match self {
            Expr::Cmp(c) => c.matches(env),
            Expr::Not(e) => !e.matches(env),
            Expr::All(items) => items.iter().all(|e| e.matches(env)),
            Expr::Any(items) => items.iter().any(|e| e.matches(env)),
        }
    }

    fn each<'a>(&'a self, out: &mut Vec<&'a Comparison>) {
        match self {
            Expr::Cmp(c) => out.push(c),
            Expr::Not(e) => e.each(out),
            Expr::All(items) | Expr::Any(items) => items.iter().for_each(|e| e.each(out)),
        }
    }

    fn required<'a>(&'a self, out: &mut Vec<&'a Comparison>) {
        match self {
            Expr::Cmp(c) => out.push(c),
            Expr::All(items) => items.iter().for_each(|e| e.required(out)),
            Expr::Not(_) | Expr::Any(_) => {}
        }
    }
}

/// A parsed filter; the empty filter matches every environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    expr: Option<Expr>,
}

impl Filter {
    /// Parses `text` (see the crate documentation for the grammar).
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        if text.len() > MAX_FILTER_BYTES {
            let mut at = MAX_FILTER_BYTES;
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            return Err(error_at(
                text,
                at,
                format!("the filter is longer than {MAX_FILTER_BYTES} bytes"),
            ));
        }
        let mut parser = Parser {
            text,
            pos: 0,
            comparisons: 0,
        };
        parser.skip_ws();
        if parser.at_end() {
            return Ok(Filter { expr: None });
        }
        let expr = parser.expression(0)?;
        // `expression` stops only at the end or at a ')'.
        if !parser.at_end() {
            return Err(parser.error(parser.pos, "unbalanced ')': there is no '(' to close"));
        }
        Ok(Filter { expr: Some(expr) })
    }

    /// Whether the filter is empty (matches everything).
    pub fn is_empty(&self) -> bool {
        self.expr.is_none()
    }

    /// Whether `env` satisfies the filter.
    pub fn matches(&self, env: &Environment) -> bool {
        self.expr.as_ref().is_none_or(|e| e.matches(env))
    }

    /// Every comparison of the filter, negated or not.
    pub fn comparisons(&self) -> Vec<&Comparison> {
        let mut out = Vec::new();
        if let Some(e) = &self.expr {
            e.each(&mut out);
        }
        out
    }

    /// The comparisons every matching environment satisfies (those joined
    /// to the top level by AND only, not negated): what a database query may
    /// narrow by.
    pub fn required(&self) -> Vec<&Comparison> {
        let mut out = Vec::new();
        if let Some(e) = &self.expr {
            e.required(&mut out);
        }
        out
    }

    /// Whether a comparison of the filter names `state` (for example
    /// `state = DELETED`, negated or not).
    pub fn names_state(&self, state: EnvironmentState) -> bool {
        self.comparisons()
            .iter()
            .any(|c| c.field == Field::State && c.value == Value::State(state))
    }
}

fn error_at(text: &str, offset: usize, message: impl Into<String>) -> FilterError {
    FilterError {
        offset,
        column: text[..offset].chars().count() + 1,
        message: message.into(),
    }
}

/// Characters of a field path (`labels.example.com/team-x`).
fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/')
}

/// Characters of an unquoted value (enum names, timestamps, image
/// references, names with a trailing `*`).
fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/' | '+' | '*' | '@')
}

fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// A label key as the contract allows: 1-63 of `[a-z0-9_.\-/]`.
fn valid_label_key(key: &str) -> bool {
    (1..=63).contains(&key.len())
        && key.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.' | '/')
        })
}

const FIELDS: &str = "id, name, owner_id, team_id, state, image, create_time, update_time, \
                      labels.KEY or labels:KEY";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Joiner {
    And,
    Or,
}

/// A field as written, before its comparison is typed.
enum Named {
    Field(Field),
    /// Bare `labels`: only `labels:KEY`.
    Labels,
}

/// A value as written.
struct Raw {
    text: String,
    quoted: bool,
    /// Input offset of every unescaped `*`, and whether it was the last
    /// character of the value.
    stars: Vec<(usize, bool)>,
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    comparisons: usize,
}

impl Parser<'_> {
    fn error(&self, offset: usize, message: impl Into<String>) -> FilterError {
        error_at(self.text, offset, message)
    }

    fn rest(&self) -> &str {
        &self.text[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.text.len()
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek().filter(|c| is_ws(*c)) {
            self.pos += c.len_utf8();
        }
    }

    /// `word` here, as a whole word (not the start of a longer field name).
    fn keyword(&self, word: &str) -> bool {
        self.rest().starts_with(word)
            && !self.rest()[word.len()..]
                .chars()
                .next()
                .is_some_and(is_field_char)
    }

    /// What is at `offset`, for messages: the next word, or the end.
    fn found(&self, offset: usize) -> String {
        let rest = &self.text[offset..];
        let Some(first) = rest.chars().next() else {
            return "the end of the filter".into();
        };
        let word: String = if is_field_char(first) || first == '*' {
            rest.chars()
                .take_while(|c| is_word_char(*c) || is_field_char(*c))
                .take(24)
                .collect()
        } else {
            first.to_string()
        };
        format!("`{word}`")
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &str {
        let start = self.pos;
        while let Some(c) = self.peek().filter(|c| f(*c)) {
            self.pos += c.len_utf8();
        }
        &self.text[start..self.pos]
    }

    fn expression(&mut self, depth: usize) -> Result<Expr, FilterError> {
        let mut items = vec![self.term(depth)?];
        let mut joiner: Option<(Joiner, usize)> = None;
        loop {
            self.skip_ws();
            let at = self.pos;
            let (this, len) = if self.keyword("AND") {
                (Joiner::And, 3)
            } else if self.keyword("OR") {
                (Joiner::Or, 2)
            } else {
                break;
            };
            if let Some((first, first_at)) = joiner
                && first != this
            {
                let (a, b) = match this {
                    Joiner::And => ("AND", "OR"),
                    Joiner::Or => ("OR", "AND"),
                };
                return Err(self.error(
                    at,
                    format!(
                        "{a} after the {b} at column {}: AND and OR cannot be mixed without \
                         parentheses; write (x AND y) OR z, or x AND (y OR z)",
                        self.error(first_at, "").column
                    ),
                ));
            }
            joiner = Some((this, at));
            self.pos += len;
            items.push(self.term(depth)?);
        }
        match self.peek() {
            None => {}
            Some(')') if depth > 0 => {}
            Some(')') => {
                return Err(self.error(self.pos, "unbalanced ')': there is no '(' to close"));
            }
            Some(_) => {
                let found = self.found(self.pos);
                let hint = if self.keyword("and") || self.keyword("or") {
                    " (AND and OR are upper case)"
                } else {
                    ""
                };
                let expected = if depth > 0 {
                    "AND, OR or ')'"
                } else {
                    "AND, OR or the end of the filter"
                };
                return Err(self.error(
                    self.pos,
                    format!("expected {expected}, found {found}{hint}"),
                ));
            }
        }
        Ok(match joiner {
            None => items.pop().unwrap_or(Expr::All(Vec::new())),
            Some((Joiner::And, _)) => Expr::All(items),
            Some((Joiner::Or, _)) => Expr::Any(items),
        })
    }

    fn term(&mut self, depth: usize) -> Result<Expr, FilterError> {
        self.skip_ws();
        if self.keyword("NOT") {
            self.pos += 3;
            self.skip_ws();
            return Ok(Expr::Not(Box::new(self.simple(depth)?)));
        }
        if self.peek() == Some('-') {
            self.pos += 1;
            if self.peek().is_some_and(is_ws) {
                return Err(self.error(
                    self.pos,
                    "expected a comparison or '(' right after '-' (no space)",
                ));
            }
            return Ok(Expr::Not(Box::new(self.simple(depth)?)));
        }
        self.simple(depth)
    }

    fn simple(&mut self, depth: usize) -> Result<Expr, FilterError> {
        if self.peek() == Some('(') {
            if depth >= MAX_DEPTH {
                return Err(self.error(
                    self.pos,
                    format!("parentheses nested deeper than {MAX_DEPTH}"),
                ));
            }
            let open = self.pos;
            self.pos += 1;
            let inner = self.expression(depth + 1)?;
            if self.peek() != Some(')') {
                let column = self.error(open, "").column;
                return Err(self.error(
                    self.pos,
                    format!(
                        "expected ')' to close the '(' at column {column}, found {}",
                        self.found(self.pos)
                    ),
                ));
            }
            self.pos += 1;
            return Ok(inner);
        }
        self.comparison().map(Expr::Cmp)
    }

    fn comparison(&mut self) -> Result<Comparison, FilterError> {
        let start = self.pos;
        let name = if self.peek().is_some_and(|c| c.is_ascii_alphabetic()) {
            self.take_while(is_field_char).to_owned()
        } else {
            String::new()
        };
        if name.is_empty() || matches!(name.as_str(), "AND" | "OR" | "NOT") {
            return Err(self.error(
                start,
                format!(
                    "expected a comparison (such as state = RUNNING), NOT or '(', found {}",
                    self.found(start)
                ),
            ));
        }
        let named = self.field(&name, start)?;
        self.comparisons += 1;
        if self.comparisons > MAX_COMPARISONS {
            return Err(self.error(start, format!("more than {MAX_COMPARISONS} comparisons")));
        }
        self.skip_ws();
        let op_at = self.pos;
        let op = self.operator(&name)?;
        self.skip_ws();
        let value_at = self.pos;
        let raw = self.value()?;
        self.typed(named, &name, op, op_at, raw, value_at)
    }

    fn field(&self, name: &str, at: usize) -> Result<Named, FilterError> {
        Ok(Named::Field(match name {
            "id" => Field::Id,
            "name" => Field::Name,
            "owner_id" => Field::OwnerId,
            "team_id" => Field::TeamId,
            "image" | "canonical_image" => Field::Image,
            "state" => Field::State,
            "create_time" => Field::CreateTime,
            "update_time" => Field::UpdateTime,
            "labels" => return Ok(Named::Labels),
            _ => {
                if let Some(key) = name.strip_prefix("labels.") {
                    if !valid_label_key(key) {
                        return Err(self.error(
                            at + "labels.".len(),
                            format!(
                                "label key `{key}` must be 1 to 63 lower-case letters, digits, \
                                 '_', '-', '.' or '/'"
                            ),
                        ));
                    }
                    Field::Label(key.to_owned())
                } else {
                    let hint = if matches!(name, "and" | "or" | "not") {
                        " (AND, OR and NOT are upper case)"
                    } else {
                        ""
                    };
                    return Err(self.error(
                        at,
                        format!("unknown field `{name}`: expected {FIELDS}{hint}"),
                    ));
                }
            }
        }))
    }

    fn operator(&mut self, name: &str) -> Result<Op, FilterError> {
        let rest = self.rest();
        if rest.starts_with("==") {
            return Err(self.error(self.pos, "`==` is not an operator: use `=`"));
        }
        let (op, len) = if rest.starts_with("!=") {
            (Op::Ne, 2)
        } else if rest.starts_with("<=") {
            (Op::Le, 2)
        } else if rest.starts_with(">=") {
            (Op::Ge, 2)
        } else if rest.starts_with('=') {
            (Op::Eq, 1)
        } else if rest.starts_with('<') {
            (Op::Lt, 1)
        } else if rest.starts_with('>') {
            (Op::Gt, 1)
        } else if rest.starts_with(':') {
            (Op::Has, 1)
        } else {
            return Err(self.error(
                self.pos,
                format!(
                    "expected an operator (=, !=, <, <=, >, >= or :) after `{name}`, found {}",
                    self.found(self.pos)
                ),
            ));
        };
        self.pos += len;
        Ok(op)
    }

    fn value(&mut self) -> Result<Raw, FilterError> {
        let start = self.pos;
        match self.peek() {
            Some(quote @ ('"' | '\'')) => self.quoted(quote),
            Some(c) if is_word_char(c) => {
                let word = self.take_while(is_word_char).to_owned();
                let stars = word
                    .char_indices()
                    .filter(|(_, c)| *c == '*')
                    .map(|(i, _)| (start + i, i + 1 == word.len()))
                    .collect();
                Ok(Raw {
                    text: word,
                    quoted: false,
                    stars,
                })
            }
            _ => Err(self.error(
                start,
                format!(
                    "expected a value (a word, or a string in double quotes), found {}",
                    self.found(start)
                ),
            )),
        }
    }

    fn quoted(&mut self, quote: char) -> Result<Raw, FilterError> {
        let open = self.pos;
        self.pos += 1;
        let mut text = String::new();
        let mut stars = Vec::new();
        loop {
            let at = self.pos;
            let Some(c) = self.peek() else {
                return Err(self.error(
                    open,
                    format!("string not terminated: expected a closing {quote}"),
                ));
            };
            self.pos += c.len_utf8();
            match c {
                c if c == quote => break,
                '\\' => match self.peek() {
                    Some(e @ ('\\' | '"' | '\'' | '*')) => {
                        self.pos += 1;
                        text.push(e);
                    }
                    other => {
                        let shown = other.map_or_else(|| "the end".to_owned(), |c| c.to_string());
                        return Err(self.error(
                            at,
                            format!(
                                "unknown escape `\\{shown}`: the escapes are \\\\, \\\", \\' and \\*"
                            ),
                        ));
                    }
                },
                '*' => {
                    stars.push((at, false));
                    text.push('*');
                }
                c => text.push(c),
            }
        }
        // An unescaped `*` counts as trailing when it is the value's last
        // character.
        if let Some(last) = stars.last_mut()
            && text.ends_with('*')
            && last.0 + 2 == self.pos
        {
            last.1 = true;
        }
        Ok(Raw {
            text,
            quoted: true,
            stars,
        })
    }

    fn typed(
        &self,
        named: Named,
        name: &str,
        op: Op,
        op_at: usize,
        raw: Raw,
        value_at: usize,
    ) -> Result<Comparison, FilterError> {
        let field = match named {
            Named::Labels => {
                if op != Op::Has {
                    return Err(self.error(
                        op_at,
                        "`labels` takes `:` (labels:KEY: the label is set); compare a label's \
                         value as labels.KEY",
                    ));
                }
                if !raw.stars.is_empty() || !valid_label_key(&raw.text) {
                    return Err(self.error(
                        value_at,
                        format!(
                            "label key `{}` must be 1 to 63 lower-case letters, digits, '_', \
                             '-', '.' or '/'",
                            raw.text
                        ),
                    ));
                }
                return Ok(Comparison {
                    field: Field::Label(raw.text),
                    op: Op::Has,
                    value: Value::Present,
                });
            }
            Named::Field(field) => field,
        };
        if op == Op::Has {
            if let Field::Label(_) = field
                && raw.text == "*"
                && !raw.quoted
            {
                return Ok(Comparison {
                    field,
                    op,
                    value: Value::Present,
                });
            }
            let message = match field {
                Field::Label(_) => format!("`{name}:` takes `*` only ({name}:* tests presence)"),
                _ => format!(
                    "`:` (has) applies to labels only (labels:KEY); compare `{name}` with = or !="
                ),
            };
            return Err(self.error(op_at, message));
        }
        match field {
            Field::State => {
                if !matches!(op, Op::Eq | Op::Ne) {
                    return Err(self.error(op_at, "`state` takes = or != only"));
                }
                let state = EnvironmentState::from_str_name(&raw.text)
                    .or_else(|| {
                        EnvironmentState::from_str_name(&format!("ENVIRONMENT_STATE_{}", raw.text))
                    })
                    .filter(|_| raw.stars.is_empty());
                let Some(state) = state else {
                    return Err(self.error(
                        value_at,
                        format!(
                            "unknown state `{}`: expected one of {} (upper case)",
                            raw.text,
                            state_names()
                        ),
                    ));
                };
                Ok(Comparison {
                    field,
                    op,
                    value: Value::State(state),
                })
            }
            Field::CreateTime | Field::UpdateTime => {
                let parsed = chrono::DateTime::parse_from_rfc3339(&raw.text).map_err(|_| {
                    self.error(
                        value_at,
                        format!(
                            "expected an RFC 3339 timestamp such as \"2026-01-01T00:00:00Z\" \
                             after `{name}`, found `{}`",
                            raw.text
                        ),
                    )
                })?;
                Ok(Comparison {
                    field,
                    op,
                    value: Value::Time(Timestamp {
                        seconds: parsed.timestamp(),
                        nanos: parsed.timestamp_subsec_nanos() as i32,
                    }),
                })
            }
            _ => {
                if let Some(&(at, _)) = raw.stars.iter().find(|(_, trailing)| !trailing) {
                    let escape = if raw.quoted {
                        " (\\* is a literal *)"
                    } else {
                        " (in quotes, \\* is a literal *)"
                    };
                    return Err(self.error(
                        at,
                        format!(
                            "`*` is allowed only at the end of a value (a prefix match){escape}"
                        ),
                    ));
                }
                let value = if raw.stars.is_empty() {
                    Value::Text(raw.text)
                } else {
                    if !matches!(op, Op::Eq | Op::Ne) {
                        return Err(self.error(
                            op_at,
                            "a prefix match (a value ending in *) takes = or != only",
                        ));
                    }
                    let mut prefix = raw.text;
                    prefix.pop();
                    Value::Prefix(prefix)
                };
                Ok(Comparison { field, op, value })
            }
        }
    }
}

/// The short names of every state, for messages.
fn state_names() -> String {
    (1..64)
        .filter_map(|n| EnvironmentState::try_from(n).ok())
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ENVIRONMENT_STATE_")
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join(", ")
}
