//! Durable state of the orchestrator: environment records (with the cleared
//! spec, the allocated subnet and the lifecycle state) and used clearance ids.
//!
//! Every state transition is written here before it is acted on in Docker, so
//! that reconcile can finish or roll back whatever a crash interrupted.

use sea_orm::sea_query::{Expr, ExprTrait, Index};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Schema, Set,
};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sea_orm::DbErr),
    #[error("cannot open the database: {0}")]
    Open(#[from] vibebox_db::DbError),
}

/// Result alias of this module.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Lifecycle state of an environment (mirrors the proto enum), stored as
/// its name; a name the code does not know fails the read instead of
/// becoming a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, sea_orm::EnumIter, sea_orm::DeriveActiveEnum)]
#[sea_orm(
    rs_type = "String",
    db_type = "String(sea_orm::sea_query::StringLen::None)"
)]
pub enum State {
    #[sea_orm(string_value = "creating")]
    Creating,
    #[sea_orm(string_value = "running")]
    Running,
    #[sea_orm(string_value = "stopped")]
    Stopped,
    #[sea_orm(string_value = "failed")]
    Failed,
    #[sea_orm(string_value = "deleting")]
    Deleting,
    #[sea_orm(string_value = "deleted")]
    Deleted,
    #[sea_orm(string_value = "quarantined")]
    Quarantined,
    /// A start (or the second half of a restart) is in progress.
    #[sea_orm(string_value = "starting")]
    Starting,
    /// A stop (or the first half of a restart) is in progress.
    #[sea_orm(string_value = "stopping")]
    Stopping,
}

impl State {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Running => "running",
            State::Stopped => "stopped",
            State::Failed => "failed",
            State::Deleting => "deleting",
            State::Deleted => "deleted",
            State::Quarantined => "quarantined",
            State::Starting => "starting",
            State::Stopping => "stopping",
        }
    }

    /// Whether an operation is in progress (`creating`, `starting`,
    /// `stopping`, `deleting`): the record settles by itself (or, after a
    /// crash, through reconcile).
    pub fn is_transitional(self) -> bool {
        matches!(
            self,
            State::Creating | State::Starting | State::Stopping | State::Deleting
        )
    }
}

/// The environments table.
pub mod environment {
    use sea_orm::entity::prelude::*;

    /// One environment record.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orchestrator_environments")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub installation_id: String,
        pub team_id: String,
        pub owner_id: String,
        pub name: String,
        pub request_id: String,
        pub state: super::State,
        /// Encoded hardened `ContainerSpec` exactly as cleared.
        pub spec: Vec<u8>,
        pub canonical_image: String,
        pub policy_digest: String,
        pub policy_version: String,
        pub clearance_id: String,
        /// CIDR of the environment's network while it holds one.
        #[sea_orm(nullable)]
        pub subnet: Option<String>,
        #[sea_orm(nullable)]
        pub container_id: Option<String>,
        pub nano_cpus: i64,
        pub memory_bytes: i64,
        pub failure_reason: String,
        pub status_message: String,
        /// Milliseconds since the Unix epoch.
        pub create_time_ms: i64,
        pub update_time_ms: i64,
        /// Why the platform stopped or deleted the environment (idle,
        /// lifetime); empty when a person did, or while it runs.
        #[sea_orm(default_value = "")]
        pub stop_reason: String,
        /// The last activity persisted (exec, port-forward or copy session,
        /// CPU above the idle threshold), ms since the epoch.
        #[sea_orm(nullable)]
        pub last_activity_ms: Option<i64>,
        /// An extension keeps the environment from going idle until then.
        #[sea_orm(nullable)]
        pub keep_alive_until_ms: Option<i64>,
        /// When the environment is deleted (its lifetime, maybe extended);
        /// `None`: never.
        #[sea_orm(nullable)]
        pub expire_at_ms: Option<i64>,
        /// Progress of the operation in progress, 0 to 100 (100 when none
        /// is).
        #[sea_orm(default_value = 100)]
        pub progress_percent: i32,
        /// The operation in progress (`create`, `start`, `stop`, `restart`,
        /// `delete`, `auto_stop`; see `crate::operations`), empty when none
        /// is.
        #[sea_orm(default_value = "")]
        pub operation: String,
        /// The id of the operation in progress: its audit event's id is
        /// made of it, so that reconcile finishing it records it once.
        #[sea_orm(default_value = "")]
        pub operation_id: String,
        /// Labels of the environment itself (not of its container), a JSON
        /// object of strings.
        #[sea_orm(column_type = "Text", default_value = "{}")]
        pub labels: String,
        /// Key of the last update applied: its caller and request id
        /// (`crate::update::update_key`; a retry with it is answered with
        /// the record as it is).
        #[sea_orm(default_value = "")]
        pub update_request_id: String,
        /// Request id of a resource update whose engine change is not
        /// committed yet (its reservation is held); empty otherwise. Left
        /// behind by a crash, reconcile rolls it back (`crate::update`).
        #[sea_orm(default_value = "")]
        pub pending_update: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Clearance ids already used (replay protection).
pub mod used_clearance {
    use sea_orm::entity::prelude::*;

    /// One used clearance.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "orchestrator_used_clearances")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub clearance_id: String,
        pub environment_id: String,
        pub used_time_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub use environment::Model as EnvRecord;

/// The time column a listing scans in order (see [`Store::list`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanBy {
    /// `create_time_ms`.
    CreateTime,
    /// `update_time_ms`.
    UpdateTime,
}

/// A scan of at most `limit` records in the order of a time column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// The column.
    pub by: ScanBy,
    /// Largest first.
    pub descending: bool,
    /// Records at most.
    pub limit: u64,
}

impl ScanBy {
    /// The value of this column in `record`.
    pub fn of(self, record: &EnvRecord) -> i64 {
        match self {
            ScanBy::CreateTime => record.create_time_ms,
            ScanBy::UpdateTime => record.update_time_ms,
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Notifications of committed record changes, numbered in the order they
/// are published (after the change is committed). The feed for the
/// gateway's read replica follows it: a subscriber that reads a record after
/// notification `n` sees every change up to `n`.
pub struct Changes {
    /// This process: sequences compare only within one epoch.
    epoch: String,
    /// The last sequence published; the lock makes the broadcast order the
    /// sequence order.
    last: std::sync::Mutex<u64>,
    sender: tokio::sync::broadcast::Sender<(u64, String)>,
}

/// A subscription to [`Changes`].
pub struct Subscription {
    /// Sequence at subscription: changes up to it happened before.
    pub sequence: u64,
    pub receiver: tokio::sync::broadcast::Receiver<(u64, String)>,
}

/// Notifications a slow subscriber may fall behind by before it has to
/// start over with a snapshot.
const CHANGE_BACKLOG: usize = 4096;

impl Changes {
    fn new() -> Self {
        Self {
            epoch: uuid::Uuid::new_v4().to_string(),
            last: std::sync::Mutex::new(0),
            sender: tokio::sync::broadcast::channel(CHANGE_BACKLOG).0,
        }
    }

    /// The epoch of this process.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The last sequence published.
    pub fn sequence(&self) -> u64 {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Announces a committed change of record `id`; returns its sequence.
    pub fn publish(&self, id: &str) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        *last += 1;
        // No subscriber is fine: nobody to tell.
        let _ = self.sender.send((*last, id.to_owned()));
        *last
    }

    /// Subscribes; changes after the returned sequence arrive on the
    /// receiver.
    pub fn subscribe(&self) -> Subscription {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        Subscription {
            sequence: *last,
            receiver: self.sender.subscribe(),
        }
    }
}

/// The orchestrator's database.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    changes: std::sync::Arc<Changes>,
    /// Records the listing reads returned ([`Store::records_listed`]).
    listed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Store {
    /// Connects and creates the tables when missing.
    pub async fn open(url: &str) -> Result<Self> {
        let db = vibebox_db::connect(url).await?;
        let store = Store {
            db,
            changes: std::sync::Arc::new(Changes::new()),
            listed: Default::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let backend = self.db.get_database_backend();
        let schema = Schema::new(backend);
        let mut t = schema.create_table_from_entity(environment::Entity);
        self.db.execute(t.if_not_exists()).await?;
        let mut t = schema.create_table_from_entity(used_clearance::Entity);
        self.db.execute(t.if_not_exists()).await?;
        // Columns added after the table was first created (idle stop and
        // lifetimes): added in place to a table an earlier version made.
        for column in [
            environment::Column::StopReason,
            environment::Column::LastActivityMs,
            environment::Column::KeepAliveUntilMs,
            environment::Column::ExpireAtMs,
            // Long-running operations (`crate::operations`).
            environment::Column::ProgressPercent,
            environment::Column::Operation,
            environment::Column::OperationId,
        ] {
            vibebox_db::add_column_if_missing(&self.db, environment::Entity, column).await?;
        }
        // Labels and in-place updates (`crate::update`).
        for column in [
            environment::Column::Labels,
            environment::Column::UpdateRequestId,
            environment::Column::PendingUpdate,
        ] {
            vibebox_db::add_column_if_missing(&self.db, environment::Entity, column).await?;
        }
        let idx = Index::create()
            .if_not_exists()
            .name("orchestrator_environments_request")
            .table(environment::Entity)
            .col(environment::Column::TeamId)
            .col(environment::Column::RequestId)
            .unique()
            .to_owned();
        self.db.execute(&idx).await?;
        let idx = Index::create()
            .if_not_exists()
            .name("orchestrator_environments_subnet")
            .table(environment::Entity)
            .col(environment::Column::InstallationId)
            .col(environment::Column::Subnet)
            .unique()
            .to_owned();
        self.db.execute(&idx).await?;
        // Listings scan in time order (`Store::list`): newest first by
        // default, and by update time to replay changes since a moment.
        for (name, column) in [
            (
                "orchestrator_environments_create_time",
                environment::Column::CreateTimeMs,
            ),
            (
                "orchestrator_environments_update_time",
                environment::Column::UpdateTimeMs,
            ),
        ] {
            let idx = Index::create()
                .if_not_exists()
                .name(name)
                .table(environment::Entity)
                .col(environment::Column::InstallationId)
                .col(column)
                .to_owned();
            self.db.execute(&idx).await?;
        }
        Ok(())
    }

    /// The connection.
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Notifications of record changes (every write below publishes one
    /// after it is committed; [`Store::insert`]'s caller publishes after its
    /// commit).
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    /// Starts a write transaction that holds the write lock from its first
    /// statement (`BEGIN IMMEDIATE` on SQLite), so a count-then-insert inside
    /// it cannot race another writer.
    pub async fn begin_immediate(&self) -> Result<DatabaseTransaction> {
        Ok(vibebox_db::begin_write(&self.db).await?)
    }

    /// The record of an environment.
    pub async fn get(&self, id: &str) -> Result<Option<EnvRecord>> {
        // Not `.one()`: it binds `LIMIT ?`, and SQLite re-prepares a
        // statement whose LIMIT parameter is bound again, i.e. on every
        // execution (parse and plan each time). The primary key already
        // guarantees at most one row; this is the gateway's lookup on every
        // environment call.
        Self::get_in(&self.db, id).await
    }

    /// The record of an environment, on a connection (a transaction's).
    pub async fn get_in(conn: &impl ConnectionTrait, id: &str) -> Result<Option<EnvRecord>> {
        Ok(environment::Entity::find_by_id(id.to_owned())
            .all(conn)
            .await?
            .pop())
    }

    /// The record created by `(team, request_id)`.
    pub async fn by_request(
        conn: &impl ConnectionTrait,
        team_id: &str,
        request_id: &str,
    ) -> Result<Option<EnvRecord>> {
        Ok(environment::Entity::find()
            .filter(environment::Column::TeamId.eq(team_id))
            .filter(environment::Column::RequestId.eq(request_id))
            .one(conn)
            .await?)
    }

    /// Whether a clearance id was used before.
    pub async fn clearance_used(conn: &impl ConnectionTrait, clearance_id: &str) -> Result<bool> {
        Ok(used_clearance::Entity::find_by_id(clearance_id.to_owned())
            .one(conn)
            .await?
            .is_some())
    }

    /// Every subnet a record of this installation holds, whatever its
    /// state: the unique index covers deleted records too, so an allocation
    /// must never hand out a subnet any record still carries.
    pub async fn held_subnets_in(
        conn: &impl ConnectionTrait,
        installation: &str,
    ) -> Result<Vec<String>> {
        Ok(environment::Entity::find()
            .select_only()
            .column(environment::Column::Subnet)
            .filter(environment::Column::InstallationId.eq(installation))
            .filter(environment::Column::Subnet.is_not_null())
            .into_tuple::<String>()
            .all(conn)
            .await?)
    }

    /// Releases the subnets still held by deleted records (left by a process
    /// killed between two writes of an earlier version). A failed record
    /// keeps its subnet: its network may exist until it is deleted. Returns
    /// how many were released.
    pub async fn release_deleted_subnets(&self, installation: &str) -> Result<u64> {
        let ids: Vec<String> = environment::Entity::find()
            .select_only()
            .column(environment::Column::Id)
            .filter(environment::Column::InstallationId.eq(installation))
            .filter(environment::Column::Subnet.is_not_null())
            .filter(environment::Column::State.eq(State::Deleted))
            .into_tuple::<String>()
            .all(&self.db)
            .await?;
        if ids.is_empty() {
            return Ok(0);
        }
        let done = environment::Entity::update_many()
            .col_expr(
                environment::Column::Subnet,
                Expr::value(Option::<String>::None),
            )
            .filter(environment::Column::Id.is_in(ids.iter().cloned()))
            .filter(environment::Column::State.eq(State::Deleted))
            .exec(&self.db)
            .await?;
        for id in &ids {
            self.changes.publish(id);
        }
        Ok(done.rows_affected)
    }

    /// Records of this installation that are not deleted.
    pub async fn live(&self, installation: &str) -> Result<Vec<EnvRecord>> {
        Self::live_in(&self.db, installation).await
    }

    /// Records of this installation that are not deleted, on a connection.
    pub async fn live_in(
        conn: &impl ConnectionTrait,
        installation: &str,
    ) -> Result<Vec<EnvRecord>> {
        Ok(environment::Entity::find()
            .filter(environment::Column::InstallationId.eq(installation))
            .filter(environment::Column::State.ne(State::Deleted))
            .all(conn)
            .await?)
    }

    /// Candidates of a listing: the installation's records of `team_ids`
    /// (every team when empty) within `bounds` (a superset of what the
    /// listing returns: the caller judges each record exactly). With
    /// `scan`, at most `limit` of them in the order of a time column;
    /// otherwise all of them, unordered.
    pub async fn list(
        &self,
        installation: &str,
        team_ids: &[String],
        bounds: &vibebox_listing::Bounds,
        scan: Option<Scan>,
    ) -> Result<Vec<EnvRecord>> {
        self.list_limited(installation, team_ids, bounds, scan, None, &[])
            .await
    }

    /// Candidates of a listing as [`Store::list`] reads them without a
    /// scan, but at most `limit` of them, unordered (a listing sorted in
    /// memory reads one more than it may sort, to know it may not).
    pub async fn list_at_most(
        &self,
        installation: &str,
        team_ids: &[String],
        bounds: &vibebox_listing::Bounds,
        limit: u64,
    ) -> Result<Vec<EnvRecord>> {
        self.list_limited(installation, team_ids, bounds, None, Some(limit), &[])
            .await
    }

    /// Candidates of a listing as [`Store::list`] reads them without a
    /// scan, but for the ids in `seen` (read already): the rest of the
    /// records sharing the time a scan's read ended on.
    pub async fn list_unseen(
        &self,
        installation: &str,
        team_ids: &[String],
        bounds: &vibebox_listing::Bounds,
        seen: &[String],
    ) -> Result<Vec<EnvRecord>> {
        self.list_limited(installation, team_ids, bounds, None, None, seen)
            .await
    }

    /// How many records the listing reads ([`Store::list`],
    /// [`Store::list_at_most`]) returned since the store was opened: what
    /// listings cost (for tests and metrics).
    pub fn records_listed(&self) -> u64 {
        self.listed.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn list_limited(
        &self,
        installation: &str,
        team_ids: &[String],
        bounds: &vibebox_listing::Bounds,
        scan: Option<Scan>,
        limit: Option<u64>,
        seen: &[String],
    ) -> Result<Vec<EnvRecord>> {
        use environment::Column;
        let mut q = environment::Entity::find().filter(Column::InstallationId.eq(installation));
        if !seen.is_empty() {
            q = q.filter(Column::Id.is_not_in(seen.iter().cloned()));
        }
        if !team_ids.is_empty() {
            q = q.filter(Column::TeamId.is_in(team_ids.iter().cloned()));
        }
        if !bounds.include_deleted {
            q = q.filter(Column::State.ne(State::Deleted));
        }
        if let Some(public) = bounds.state {
            // The stored name of the public state (`ENVIRONMENT_STATE_RUNNING`
            // is stored `running`); a state never stored matches nothing.
            let stored = <State as sea_orm::Iterable>::iter().find(|s| {
                public.as_str_name().strip_prefix("ENVIRONMENT_STATE_")
                    == Some(s.as_str().to_ascii_uppercase().as_str())
            });
            match stored {
                Some(state) => q = q.filter(Column::State.eq(state)),
                None => return Ok(Vec::new()),
            }
        }
        if let Some(owner) = &bounds.owner_id {
            q = q.filter(Column::OwnerId.eq(owner.as_str()));
        }
        if let Some(id) = &bounds.id {
            q = q.filter(Column::Id.eq(id.as_str()));
        }
        for (column, range) in [
            (Column::CreateTimeMs, bounds.create_time_ms),
            (Column::UpdateTimeMs, bounds.update_time_ms),
        ] {
            if let Some(min) = range.min {
                q = q.filter(column.gte(min));
            }
            if let Some(max) = range.max {
                q = q.filter(column.lte(max));
            }
        }
        if let Some(scan) = scan {
            let column = match scan.by {
                ScanBy::CreateTime => Column::CreateTimeMs,
                ScanBy::UpdateTime => Column::UpdateTimeMs,
            };
            q = if scan.descending {
                q.order_by_desc(column)
            } else {
                q.order_by_asc(column)
            };
            q = q.limit(scan.limit);
        } else if let Some(limit) = limit {
            q = q.limit(limit);
        }
        let records = q.all(&self.db).await?;
        self.listed
            .fetch_add(records.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(records)
    }

    /// Number of records (for tests and metrics).
    pub async fn count(&self, installation: &str) -> Result<u64> {
        Ok(environment::Entity::find()
            .filter(environment::Column::InstallationId.eq(installation))
            .count(&self.db)
            .await?)
    }

    /// Inserts a new record together with its used clearance, in `txn`.
    pub async fn insert(txn: &DatabaseTransaction, rec: EnvRecord) -> Result<()> {
        let used = used_clearance::ActiveModel {
            clearance_id: Set(rec.clearance_id.clone()),
            environment_id: Set(rec.id.clone()),
            used_time_ms: Set(now_ms()),
        };
        used.insert(txn).await?;
        let am: environment::ActiveModel = rec.into();
        let am = sea_orm::ActiveModelTrait::reset_all(am);
        am.insert(txn).await?;
        Ok(())
    }

    /// Sets the state (and optionally reason/message) of a record.
    pub async fn set_state(
        &self,
        id: &str,
        state: State,
        failure_reason: Option<&str>,
        status_message: Option<&str>,
    ) -> Result<()> {
        let change = Transition {
            failure_reason,
            status_message,
            ..Transition::default()
        };
        self.update_state(id, None, state, change).await?;
        Ok(())
    }

    /// Sets the state with the platform's reason for it (empty: a person
    /// asked) and, when given, the last activity (a start is activity).
    pub async fn set_state_reason(
        &self,
        id: &str,
        state: State,
        stop_reason: &str,
        last_activity_ms: Option<i64>,
        status_message: Option<&str>,
    ) -> Result<()> {
        let change = Transition {
            stop_reason: Some(stop_reason),
            last_activity_ms,
            status_message,
            ..Transition::default()
        };
        self.update_state(id, None, state, change).await?;
        Ok(())
    }

    /// Settles a record (`deleted`, or `failed` after a rolled-back create)
    /// and releases its subnet in the same statement: a crash can never
    /// leave it holding the subnet. (A network an incomplete rollback left
    /// behind stays in the engine's list, which allocation also skips.)
    pub async fn settle(
        &self,
        id: &str,
        state: State,
        failure_reason: Option<&str>,
        status_message: Option<&str>,
    ) -> Result<()> {
        debug_assert!(matches!(state, State::Deleted | State::Failed));
        let change = Transition {
            failure_reason,
            status_message,
            release_subnet: true,
            ..Transition::default()
        };
        self.update_state(id, None, state, change).await?;
        Ok(())
    }

    /// Moves a record to `state` only if it is in one of `from` (one
    /// statement), with whatever else `change` gives; returns whether it
    /// moved. Operations write through this, so that a change committed
    /// meanwhile (a delete accepted while they ran) is never overwritten.
    /// A state that is not transitional also ends the operation: progress
    /// 100, no operation.
    pub async fn transition(
        &self,
        id: &str,
        from: &[State],
        state: State,
        change: Transition<'_>,
    ) -> Result<bool> {
        self.update_state(id, Some(from), state, change).await
    }

    /// One statement: the state, and whatever else is given; only from the
    /// states `from` lists (any when `None`). Returns whether the record
    /// changed.
    async fn update_state(
        &self,
        id: &str,
        from: Option<&[State]>,
        state: State,
        change: Transition<'_>,
    ) -> Result<bool> {
        let Transition {
            failure_reason,
            status_message,
            progress_percent,
            stop_reason,
            last_activity_ms,
            release_subnet,
            operation,
        } = change;
        let mut q = environment::Entity::update_many()
            .col_expr(environment::Column::State, Expr::value(state))
            .col_expr(environment::Column::UpdateTimeMs, Expr::value(now_ms()));
        if let Some(r) = failure_reason {
            q = q.col_expr(environment::Column::FailureReason, Expr::value(r));
        }
        if let Some(m) = status_message {
            q = q.col_expr(environment::Column::StatusMessage, Expr::value(m));
        }
        let (progress_percent, operation) = match state.is_transitional() {
            true => (progress_percent, operation),
            // Settled: no operation in progress.
            false => (Some(progress_percent.unwrap_or(100)), Some(("", ""))),
        };
        if let Some(p) = progress_percent {
            q = q.col_expr(environment::Column::ProgressPercent, Expr::value(p));
        }
        if let Some((kind, operation_id)) = operation {
            q = q
                .col_expr(environment::Column::Operation, Expr::value(kind))
                .col_expr(environment::Column::OperationId, Expr::value(operation_id));
        }
        if let Some(r) = stop_reason {
            q = q.col_expr(environment::Column::StopReason, Expr::value(r));
        }
        if let Some(t) = last_activity_ms {
            q = q.col_expr(environment::Column::LastActivityMs, Expr::value(Some(t)));
        }
        if release_subnet {
            q = q.col_expr(
                environment::Column::Subnet,
                Expr::value(Option::<String>::None),
            );
        }
        let mut q = q.filter(environment::Column::Id.eq(id));
        if let Some(from) = from {
            q = q.filter(environment::Column::State.is_in(from.iter().copied()));
        }
        let done = q.exec(&self.db).await?;
        let changed = from.is_none() || done.rows_affected > 0;
        if changed {
            self.changes.publish(id);
        }
        Ok(changed)
    }

    /// Progress of the operation in progress on a record that is still in
    /// `state`: the status message and the percentage together. Returns
    /// whether the record is still in `state` (false: the operation was
    /// overtaken, for example by a delete).
    pub async fn set_progress(
        &self,
        id: &str,
        state: State,
        message: &str,
        percent: i32,
    ) -> Result<bool> {
        let done = environment::Entity::update_many()
            .col_expr(environment::Column::StatusMessage, Expr::value(message))
            .col_expr(
                environment::Column::ProgressPercent,
                Expr::value(percent.clamp(0, 100)),
            )
            .col_expr(environment::Column::UpdateTimeMs, Expr::value(now_ms()))
            .filter(environment::Column::Id.eq(id))
            .filter(environment::Column::State.eq(state))
            .exec(&self.db)
            .await?;
        if done.rows_affected == 0 {
            return Ok(false);
        }
        self.changes.publish(id);
        Ok(true)
    }

    /// Sets the progress message of a record.
    pub async fn set_status_message(&self, id: &str, message: &str) -> Result<()> {
        environment::Entity::update_many()
            .col_expr(environment::Column::StatusMessage, Expr::value(message))
            .col_expr(environment::Column::UpdateTimeMs, Expr::value(now_ms()))
            .filter(environment::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        self.changes.publish(id);
        Ok(())
    }

    /// Records the container id of an environment.
    pub async fn set_container(&self, id: &str, container_id: &str) -> Result<()> {
        environment::Entity::update_many()
            .col_expr(environment::Column::ContainerId, Expr::value(container_id))
            .col_expr(environment::Column::UpdateTimeMs, Expr::value(now_ms()))
            .filter(environment::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        self.changes.publish(id);
        Ok(())
    }

    /// Records the platform's reason on a record (before it acts on it).
    pub async fn set_stop_reason(&self, id: &str, stop_reason: &str) -> Result<()> {
        environment::Entity::update_many()
            .col_expr(environment::Column::StopReason, Expr::value(stop_reason))
            .col_expr(environment::Column::UpdateTimeMs, Expr::value(now_ms()))
            .filter(environment::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        self.changes.publish(id);
        Ok(())
    }

    /// Moves the last activity of records forward to `at` (never back).
    /// Returns how many records changed.
    ///
    /// A change of the record like any other: its update time moves to now
    /// (the activity changes `last_activity_time` and `idle_stop_time`), so
    /// that a watch resumed from a token taken before it, which replays the
    /// records updated since, sends it.
    pub async fn record_activity(&self, ids: &[String], at: i64) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut changed = 0;
        // Bounded statements (a parameter per id).
        for chunk in ids.chunks(500) {
            let behind = environment::Column::LastActivityMs
                .is_null()
                .or(environment::Column::LastActivityMs.lt(at));
            let changed_ids: Vec<String> = environment::Entity::find()
                .select_only()
                .column(environment::Column::Id)
                .filter(environment::Column::Id.is_in(chunk.iter().cloned()))
                .filter(behind.clone())
                .into_tuple::<String>()
                .all(&self.db)
                .await?;
            if changed_ids.is_empty() {
                continue;
            }
            let done = environment::Entity::update_many()
                .col_expr(environment::Column::LastActivityMs, Expr::value(Some(at)))
                .col_expr(environment::Column::UpdateTimeMs, Expr::value(now_ms()))
                .filter(environment::Column::Id.is_in(changed_ids.iter().cloned()))
                .filter(behind)
                .exec(&self.db)
                .await?;
            changed += done.rows_affected;
            for id in &changed_ids {
                self.changes.publish(id);
            }
        }
        Ok(changed)
    }

    /// Sets the keep-alive and expiry of a record (an extension).
    pub async fn set_deadlines(
        &self,
        id: &str,
        keep_alive_until_ms: Option<i64>,
        expire_at_ms: Option<i64>,
    ) -> Result<()> {
        environment::Entity::update_many()
            .col_expr(
                environment::Column::KeepAliveUntilMs,
                Expr::value(keep_alive_until_ms),
            )
            .col_expr(environment::Column::ExpireAtMs, Expr::value(expire_at_ms))
            .col_expr(environment::Column::UpdateTimeMs, Expr::value(now_ms()))
            .filter(environment::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        self.changes.publish(id);
        Ok(())
    }

    /// Records of this installation the lifecycle sweeper looks at: running
    /// ones (idle stop) and settled ones with an expiry (lifetime).
    pub async fn lifecycle_candidates(&self, installation: &str) -> Result<Vec<EnvRecord>> {
        let settled = [
            State::Running,
            State::Stopped,
            State::Failed,
            State::Quarantined,
        ];
        Ok(environment::Entity::find()
            .filter(environment::Column::InstallationId.eq(installation))
            .filter(
                environment::Column::State
                    .eq(State::Running)
                    .or(environment::Column::State
                        .is_in(settled)
                        .and(environment::Column::ExpireAtMs.is_not_null())),
            )
            .all(&self.db)
            .await?)
    }

    /// Replaces the subnet of a record (`None` releases it).
    pub async fn set_subnet(&self, id: &str, subnet: Option<&str>) -> Result<()> {
        environment::Entity::update_many()
            .col_expr(
                environment::Column::Subnet,
                Expr::value(subnet.map(str::to_owned)),
            )
            .col_expr(environment::Column::UpdateTimeMs, Expr::value(now_ms()))
            .filter(environment::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        self.changes.publish(id);
        Ok(())
    }
}

/// What one state change writes besides the state (and the update time);
/// `None` leaves a column as it is. See [`Store::transition`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Transition<'a> {
    pub failure_reason: Option<&'a str>,
    pub status_message: Option<&'a str>,
    /// Of the operation in progress (a settled state writes 100 unless
    /// told otherwise).
    pub progress_percent: Option<i32>,
    /// The platform's reason for a stop or delete (empty: a person asked).
    pub stop_reason: Option<&'a str>,
    pub last_activity_ms: Option<i64>,
    /// Releases the subnet in the same statement (`deleted`, `failed`).
    pub release_subnet: bool,
    /// The operation that begins and its id (with a transitional state; a
    /// settled state clears them).
    pub operation: Option<(&'a str, &'a str)>,
}
