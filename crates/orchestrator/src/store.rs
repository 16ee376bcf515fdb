//! Durable state of the orchestrator: environment records (with the cleared
//! spec, the allocated subnet and the lifecycle state) and used clearance ids.
//!
//! Every state transition is written here before it is acted on in Docker, so
//! that reconcile can finish or roll back whatever a crash interrupted.

use sea_orm::sea_query::{Expr, ExprTrait, Index};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    DbBackend, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Schema, Set,
    Statement,
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
        }
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
}

impl Store {
    /// Connects and creates the tables when missing.
    pub async fn open(url: &str) -> Result<Self> {
        let db = vibebox_db::connect(url).await?;
        let store = Store {
            db,
            changes: std::sync::Arc::new(Changes::new()),
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
        ] {
            self.add_column_if_missing(&schema, column).await?;
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
        Ok(())
    }

    /// The columns the environments table has now.
    async fn environment_columns(&self) -> Result<Vec<String>> {
        let backend = self.db.get_database_backend();
        let sql = match backend {
            DbBackend::Postgres => {
                "SELECT column_name AS name FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = 'orchestrator_environments'"
            }
            _ => "SELECT name FROM pragma_table_info('orchestrator_environments')",
        };
        let rows = self
            .db
            .query_all_raw(Statement::from_string(backend, sql))
            .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String>("", "name")?))
            .collect()
    }

    /// Adds a column of the entity to an existing environments table (a
    /// portable `ALTER TABLE ... ADD COLUMN`, with the entity's default for
    /// the rows already there).
    async fn add_column_if_missing(
        &self,
        schema: &Schema,
        column: environment::Column,
    ) -> Result<()> {
        let name = sea_orm::IdenStatic::as_str(&column).to_owned();
        if self.environment_columns().await?.contains(&name) {
            return Ok(());
        }
        let mut def = schema.get_column_def::<environment::Entity>(column);
        let alter = sea_orm::sea_query::Table::alter()
            .table(environment::Entity)
            .add_column(&mut def)
            .to_owned();
        if let Err(e) = self.db.execute(&alter).await {
            // Another process may have added it meanwhile.
            if !self.environment_columns().await?.contains(&name) {
                return Err(e.into());
            }
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

    /// A page of environments, newest first.
    pub async fn list(
        &self,
        installation: &str,
        team_ids: &[String],
        show_deleted: bool,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<EnvRecord>> {
        let mut q = environment::Entity::find()
            .filter(environment::Column::InstallationId.eq(installation));
        if !team_ids.is_empty() {
            q = q.filter(environment::Column::TeamId.is_in(team_ids.iter().cloned()));
        }
        if !show_deleted {
            q = q.filter(environment::Column::State.ne(State::Deleted));
        }
        Ok(q.order_by_desc(environment::Column::CreateTimeMs)
            .order_by_desc(environment::Column::Id)
            .offset(offset)
            .limit(limit)
            .all(&self.db)
            .await?)
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
        self.update_state(
            id,
            state,
            failure_reason,
            status_message,
            Lifecycle::default(),
        )
        .await
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
        let lifecycle = Lifecycle {
            stop_reason: Some(stop_reason),
            last_activity_ms,
            release_subnet: false,
        };
        self.update_state(id, state, None, status_message, lifecycle)
            .await
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
        let lifecycle = Lifecycle {
            release_subnet: true,
            ..Lifecycle::default()
        };
        self.update_state(id, state, failure_reason, status_message, lifecycle)
            .await
    }

    /// One statement: the state, and whatever else is given.
    async fn update_state(
        &self,
        id: &str,
        state: State,
        failure_reason: Option<&str>,
        status_message: Option<&str>,
        lifecycle: Lifecycle<'_>,
    ) -> Result<()> {
        let Lifecycle {
            stop_reason,
            last_activity_ms,
            release_subnet,
        } = lifecycle;
        let mut q = environment::Entity::update_many()
            .col_expr(environment::Column::State, Expr::value(state))
            .col_expr(environment::Column::UpdateTimeMs, Expr::value(now_ms()));
        if let Some(r) = failure_reason {
            q = q.col_expr(environment::Column::FailureReason, Expr::value(r));
        }
        if let Some(m) = status_message {
            q = q.col_expr(environment::Column::StatusMessage, Expr::value(m));
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
        q.filter(environment::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        self.changes.publish(id);
        Ok(())
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

/// The lifecycle columns one state change also writes.
#[derive(Debug, Default, Clone, Copy)]
struct Lifecycle<'a> {
    stop_reason: Option<&'a str>,
    last_activity_ms: Option<i64>,
    release_subnet: bool,
}
