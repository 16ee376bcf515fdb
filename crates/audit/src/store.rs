//! Storage of the audit log (sea-orm; SQLite or PostgreSQL): schema
//! creation, batched append-only inserts in one transaction, the filters of
//! `QueryEvents`, and ordered range reads for verification and export.
//!
//! There is deliberately no update or delete here.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::DbBackend;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Schema,
};
use vibebox_audit_chain::{Actor, Checkpoint, Event, Outcome, Severity};

use crate::entity::{checkpoint, event};
use crate::filter::Filter;

/// Storage errors (internal: never shown to callers).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    #[error("opening the database: {0}")]
    Open(#[from] vibebox_db::DbError),
    #[error("row {sequence} is unreadable: {reason}")]
    Corrupt { sequence: i64, reason: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Rows per insert statement: as few statements as the bind limits allow
/// (19 columns; SQLite allows 32766 bind variables, PostgreSQL 65535).
/// Fewer statements matter on PostgreSQL: sqlx does not set TCP_NODELAY, so
/// every multi-segment statement can wait ~40 ms for a delayed ACK.
const SQLITE_INSERT_CHUNK: usize = 1500;
const POSTGRES_INSERT_CHUNK: usize = 3000;
/// Ids per lookup statement (SQLite allows 32766 bind variables, PostgreSQL 65535).
const LOOKUP_CHUNK: usize = 5000;

/// The audit database.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
}

fn outcome_code(o: Outcome) -> i32 {
    match o {
        Outcome::Unspecified => 0,
        Outcome::Success => 1,
        Outcome::Failure => 2,
        Outcome::Denied => 3,
    }
}

fn outcome_from(code: i32) -> Outcome {
    match code {
        1 => Outcome::Success,
        2 => Outcome::Failure,
        3 => Outcome::Denied,
        _ => Outcome::Unspecified,
    }
}

pub(crate) fn severity_code(s: Severity) -> i32 {
    match s {
        Severity::Unspecified => 0,
        Severity::Low => 1,
        Severity::Medium => 2,
        Severity::High => 3,
        Severity::Critical => 4,
    }
}

fn severity_from(code: i32) -> Severity {
    match code {
        1 => Severity::Low,
        2 => Severity::Medium,
        3 => Severity::High,
        4 => Severity::Critical,
        _ => Severity::Unspecified,
    }
}

pub(crate) fn time_ns(t: &DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

fn to_row(e: &Event) -> event::ActiveModel {
    use sea_orm::ActiveValue::Set;
    event::ActiveModel {
        sequence: Set(e.sequence as i64),
        event_id: Set(e.id.clone()),
        time_ns: Set(time_ns(&e.time)),
        actor_user_id: Set(e.actor.user_id.clone()),
        actor_token_id: Set(e.actor.token_id.clone()),
        actor_service: Set(e.actor.service.clone()),
        actor_kind: Set(e.actor.kind.clone()),
        team_id: Set(e.team_id.clone()),
        action: Set(e.action.clone()),
        resource_type: Set(e.resource_type.clone()),
        resource_id: Set(e.resource_id.clone()),
        outcome: Set(outcome_code(e.outcome)),
        severity: Set(severity_code(e.severity)),
        details: Set(e.details_text()),
        source_service: Set(e.source_service.clone()),
        trace_id: Set(e.trace_id.clone()),
        request_id: Set(e.request_id.clone()),
        client_address: Set(e.client_address.clone()),
        hash: Set(e.hash.clone()),
        prev_hash: Set(e.prev_hash.clone()),
    }
}

fn from_row(m: event::Model) -> Result<Event> {
    let details = match serde_json::from_str(&m.details) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => {
            return Err(StoreError::Corrupt {
                sequence: m.sequence,
                reason: "details are not a JSON object".into(),
            });
        }
    };
    Ok(Event {
        id: m.event_id,
        sequence: m.sequence as u64,
        time: DateTime::from_timestamp_nanos(m.time_ns),
        actor: Actor {
            user_id: m.actor_user_id,
            token_id: m.actor_token_id,
            service: m.actor_service,
            kind: m.actor_kind,
        },
        team_id: m.team_id,
        action: m.action,
        resource_type: m.resource_type,
        resource_id: m.resource_id,
        outcome: outcome_from(m.outcome),
        severity: severity_from(m.severity),
        details,
        source_service: m.source_service,
        trace_id: m.trace_id,
        request_id: m.request_id,
        client_address: m.client_address,
        hash: m.hash,
        prev_hash: m.prev_hash,
    })
}

fn checkpoint_from(m: checkpoint::Model) -> Checkpoint {
    Checkpoint {
        sequence: m.sequence as u64,
        head_hash: m.head_hash,
        time: DateTime::from_timestamp_nanos(m.time_ns),
        key_id: m.key_id,
        signature: m.signature,
    }
}

fn checkpoint_row(c: &Checkpoint) -> checkpoint::ActiveModel {
    use sea_orm::ActiveValue::Set;
    checkpoint::ActiveModel {
        sequence: Set(c.sequence as i64),
        head_hash: Set(c.head_hash.clone()),
        time_ns: Set(time_ns(&c.time)),
        key_id: Set(c.key_id.clone()),
        signature: Set(c.signature.clone()),
    }
}

impl Store {
    /// Connects (see `vibebox_db::connect`) and creates the schema if needed.
    pub async fn open(url: &str) -> Result<Self> {
        let db = vibebox_db::connect(url).await?;
        let store = Store { db };
        store.create_schema().await?;
        Ok(store)
    }

    /// The underlying connection (tests use it to tamper with rows).
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    async fn create_schema(&self) -> Result<()> {
        let backend = self.db.get_database_backend();
        let schema = Schema::new(backend);
        let mut events = schema.create_table_from_entity(event::Entity);
        self.db.execute(&*events.if_not_exists()).await?;
        for mut index in schema.create_index_from_entity(event::Entity) {
            self.db.execute(&*index.if_not_exists()).await?;
        }
        let mut checkpoints = schema.create_table_from_entity(checkpoint::Entity);
        self.db.execute(&*checkpoints.if_not_exists()).await?;
        vibebox_db::add_column_if_missing(&self.db, event::Entity, event::Column::ActorKind)
            .await?;
        Ok(())
    }

    /// The last event: (sequence, hash).
    pub async fn head(&self) -> Result<Option<(u64, String)>> {
        Ok(event::Entity::find()
            .order_by_desc(event::Column::Sequence)
            .one(&self.db)
            .await?
            .map(|m| (m.sequence as u64, m.hash)))
    }

    /// The latest checkpoint.
    pub async fn last_checkpoint(&self) -> Result<Option<Checkpoint>> {
        Ok(checkpoint::Entity::find()
            .order_by_desc(checkpoint::Column::Sequence)
            .one(&self.db)
            .await?
            .map(checkpoint_from))
    }

    /// Sequences and hashes of the ids already recorded.
    pub async fn existing(&self, ids: &[String]) -> Result<HashMap<String, (u64, String)>> {
        let mut found = HashMap::new();
        for chunk in ids.chunks(LOOKUP_CHUNK) {
            let rows: Vec<(String, i64, String)> = event::Entity::find()
                .select_only()
                .column(event::Column::EventId)
                .column(event::Column::Sequence)
                .column(event::Column::Hash)
                .filter(event::Column::EventId.is_in(chunk.iter().cloned()))
                .into_tuple()
                .all(&self.db)
                .await?;
            found.extend(
                rows.into_iter()
                    .map(|(id, seq, hash)| (id, (seq as u64, hash))),
            );
        }
        Ok(found)
    }

    /// The hash of the event at `sequence`, if the log holds it.
    pub async fn hash_at(&self, sequence: u64) -> Result<Option<String>> {
        let Ok(sequence) = i64::try_from(sequence) else {
            return Ok(None);
        };
        Ok(event::Entity::find_by_id(sequence)
            .select_only()
            .column(event::Column::Hash)
            .into_tuple::<String>()
            .one(&self.db)
            .await?)
    }

    /// Inserts sealed events and checkpoints in one transaction.
    pub async fn append(&self, events: &[Event], checkpoints: &[Checkpoint]) -> Result<()> {
        let rows = match self.db.get_database_backend() {
            sea_orm::DatabaseBackend::Postgres => POSTGRES_INSERT_CHUNK,
            _ => SQLITE_INSERT_CHUNK,
        };
        let txn = vibebox_db::begin_write(&self.db).await?;
        for chunk in events.chunks(rows) {
            event::Entity::insert_many(chunk.iter().map(to_row))
                .exec_without_returning(&txn)
                .await?;
        }
        for cp in checkpoints {
            checkpoint::Entity::insert(checkpoint_row(cp))
                .exec_without_returning(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Events matching `filter`, newest first, with sequence below `before`.
    pub async fn query(
        &self,
        filter: &Filter,
        before: Option<u64>,
        limit: u64,
    ) -> Result<Vec<Event>> {
        let mut cond = Condition::all();
        if let Some(before) = before {
            cond = cond.add(event::Column::Sequence.lt(before as i64));
        }
        if let Some(start) = &filter.start_time {
            cond = cond.add(event::Column::TimeNs.gte(time_ns(start)));
        }
        if let Some(end) = &filter.end_time {
            cond = cond.add(event::Column::TimeNs.lt(time_ns(end)));
        }
        if !filter.actor_user_id.is_empty() {
            cond = cond.add(event::Column::ActorUserId.eq(filter.actor_user_id.clone()));
        }
        if !filter.team_id.is_empty() {
            cond = cond.add(event::Column::TeamId.eq(filter.team_id.clone()));
        }
        // Case-sensitive on every database, as the live filter is (`LIKE`
        // ignores ASCII case on SQLite and not on PostgreSQL).
        let postgres = self.db.get_database_backend() == DbBackend::Postgres;
        if !filter.action.is_empty() {
            if filter.action.ends_with('.') {
                let prefix_len = i32::try_from(filter.action.chars().count()).unwrap_or(i32::MAX);
                let compare = if postgres {
                    "substr(\"action\", 1, $1) = $2"
                } else {
                    "substr(\"action\", 1, ?) = ?"
                };
                cond = cond.add(Expr::cust_with_values(
                    compare,
                    [
                        sea_orm::Value::from(prefix_len),
                        sea_orm::Value::from(filter.action.clone()),
                    ],
                ));
            } else {
                cond = cond.add(event::Column::Action.eq(filter.action.clone()));
            }
        }
        if !filter.resource_type.is_empty() {
            cond = cond.add(event::Column::ResourceType.eq(filter.resource_type.clone()));
        }
        if !filter.resource_id.is_empty() {
            cond = cond.add(event::Column::ResourceId.eq(filter.resource_id.clone()));
        }
        if let Some(outcome) = filter.outcome {
            cond = cond.add(event::Column::Outcome.eq(outcome_code(outcome)));
        }
        if let Some(min) = filter.min_severity {
            cond = cond.add(event::Column::Severity.gte(severity_code(min)));
        }
        if !filter.text.is_empty() {
            let position = if postgres {
                "strpos(\"details\", $1) > 0"
            } else {
                "instr(\"details\", ?) > 0"
            };
            cond = cond.add(Expr::cust_with_values(position, [filter.text.clone()]));
        }
        let rows = event::Entity::find()
            .filter(cond)
            .order_by_desc(event::Column::Sequence)
            .limit(limit)
            .all(&self.db)
            .await?;
        rows.into_iter().map(from_row).collect()
    }

    /// Events `from..=to` in chain order, at most `limit`.
    pub async fn range(&self, from: u64, to: u64, limit: u64) -> Result<Vec<Event>> {
        let rows = event::Entity::find()
            .filter(event::Column::Sequence.gte(from as i64))
            .filter(event::Column::Sequence.lte(Ord::min(to, i64::MAX as u64) as i64))
            .order_by_asc(event::Column::Sequence)
            .limit(limit)
            .all(&self.db)
            .await?;
        rows.into_iter().map(from_row).collect()
    }

    /// One event by sequence.
    pub async fn event(&self, sequence: u64) -> Result<Option<Event>> {
        event::Entity::find_by_id(sequence as i64)
            .one(&self.db)
            .await?
            .map(from_row)
            .transpose()
    }

    /// Checkpoints `from..=to` in order.
    pub async fn checkpoints(&self, from: u64, to: u64) -> Result<Vec<Checkpoint>> {
        Ok(checkpoint::Entity::find()
            .filter(checkpoint::Column::Sequence.gte(from as i64))
            .filter(checkpoint::Column::Sequence.lte(Ord::min(to, i64::MAX as u64) as i64))
            .order_by_asc(checkpoint::Column::Sequence)
            .all(&self.db)
            .await?
            .into_iter()
            .map(checkpoint_from)
            .collect())
    }

    /// The first checkpoint at or after `sequence`.
    pub async fn checkpoint_from(&self, sequence: u64) -> Result<Option<Checkpoint>> {
        Ok(checkpoint::Entity::find()
            .filter(checkpoint::Column::Sequence.gte(sequence as i64))
            .order_by_asc(checkpoint::Column::Sequence)
            .one(&self.db)
            .await?
            .map(checkpoint_from))
    }

    /// Events at or after `since` in chain order (to warm up alert windows).
    pub async fn since(&self, since: &DateTime<Utc>) -> Result<Vec<Event>> {
        let rows = event::Entity::find()
            .filter(event::Column::TimeNs.gte(time_ns(since)))
            .order_by_asc(event::Column::Sequence)
            .limit(200_000)
            .all(&self.db)
            .await?;
        rows.into_iter().map(from_row).collect()
    }
}
