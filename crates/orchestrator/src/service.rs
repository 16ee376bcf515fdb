//! The orchestrator's business logic: clearance checks, provisioning and
//! the lifecycle of environments. Admission decisions are the pure
//! functions of [`crate::admission`], taken here over a snapshot read in
//! one serialized write transaction; every engine call goes through the
//! [`crate::runtime::Runtime`] seam. Wire types that reach this module are
//! the cleared `ContainerSpec` and `Clearance` themselves (the exact bytes a
//! clearance binds) and the audit outcome and severity enums; no `Status`.
//!
//! Invariants:
//! - nothing is created in Docker for a request whose clearance did not
//!   verify against exactly its spec, environment, team, expiry and a known
//!   key, or whose clearance id was used before;
//! - a create is recorded (`creating`, with its subnet) before the engine is
//!   asked for anything, and committed `running` only once its
//!   `environment.create` event is durable; start, stop and restart commit
//!   their transitional state at once and their settled state after the
//!   engine acted and the event is durable (see [`crate::operations`];
//!   reconcile finishes an operation a crash interrupted);
//! - admission runs under one lock inside one transaction, so quotas hold
//!   under concurrency.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use futures::StreamExt;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;
use vibebox_audit_client::AuditClientError;
use vibebox_clearance::{Expected, VerifyError};
use vibebox_proto::audit::{Outcome, Severity};
use vibebox_proto::clearance::Clearance;
use vibebox_proto::environment::ContainerSpec;

use crate::admission::{self, Decision, Refusal};
use crate::audit::{Audit, Caller, Event};
use crate::docker::{self, SpecError, Target};
use crate::hooks::{CrashPoint, Hooks};
use crate::keys::ClearanceKeys;
use crate::runtime::{DockerRuntime, Runtime};
use crate::store::{self, EnvRecord, State, Store, StoreError, Transition};
use crate::subnet::{self, Cidr};

/// Errors of the orchestrator's operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("clearance refused: {0}")]
    Clearance(Rejection),
    #[error("the spec cannot be applied: {0}")]
    Spec(#[from] SpecError),
    #[error("environment not found")]
    NotFound,
    #[error("environment id {0} is already in use")]
    AlreadyExists(String),
    /// A quota of `team` would be exceeded.
    #[error("team quota exceeded: {exceeded}")]
    Quota {
        team: String,
        exceeded: crate::admission::QuotaExceeded,
    },
    #[error("host capacity exceeded: {0}")]
    Capacity(String),
    #[error("no free subnet left in the environment address pool")]
    SubnetsExhausted,
    #[error("environment is {state}; cannot {operation}")]
    BadState {
        state: &'static str,
        operation: &'static str,
    },
    /// `requested` was asked while `operation` is in progress (the record
    /// is in the transitional `state`): wait for it to settle.
    #[error("environment is {state} ({operation} in progress); cannot {requested}")]
    OperationInProgress {
        state: &'static str,
        operation: &'static str,
        requested: &'static str,
    },
    /// The environment stayed locked by a short platform action (reconcile,
    /// an update) for longer than an operation waits: retry.
    #[error("environment is busy; cannot {requested} now, retry")]
    Busy { requested: &'static str },
    /// An operation in progress gave way to a delete accepted meanwhile.
    #[error("the environment was deleted while the {operation} was in progress")]
    Superseded { operation: &'static str },
    #[error("image {image} is not available locally and could not be pulled: {reason}")]
    ImageUnavailable { image: String, reason: String },
    /// The engine refused the cleared spec (a 400 on create or start): the
    /// caller's to fix, for example an image without a command.
    #[error("the Docker Engine refused the spec ({field}): {reason}")]
    EngineRefused { field: String, reason: String },
    #[error("docker: {0}")]
    Docker(#[from] DockerError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("audit: {0}")]
    Audit(#[from] AuditClientError),
    /// The clearance key ring is too old to trust (policy unreachable).
    #[error(transparent)]
    Keys(#[from] crate::keys::StaleKeys),
    /// An extension past the longest lifetime the environment's policy
    /// allows (`latest`: the latest possible time, RFC 3339).
    #[error(
        "cannot extend past the maximum lifetime of {max}: the latest possible time is {latest}"
    )]
    LifetimeCeiling { latest: String, max: String },
    /// An operation stopped at a test crash point (as if the process was
    /// killed).
    #[error("simulated crash (test hook)")]
    SimulatedCrash,
    /// The environment's egress gate could not be set up.
    #[error("egress gate: {0}")]
    Egress(String),
    /// An in-place update refused (see [`crate::update`]).
    #[error(transparent)]
    Update(#[from] crate::update::UpdateRefusal),
    /// A listing ordered by name or state first selects more records than
    /// one call sorts in memory ([`ListLimits::sort`]).
    #[error(
        "ordering by name or state sorts at most {max} environments and this listing selects \
         more (deleted ones included when asked for): narrow it with a filter (state, owner_id, \
         create_time, update_time) or order by create_time or update_time"
    )]
    TooManyToSort { max: u64 },
    /// A create retried with the request id of another owner's create in
    /// the team: request ids are chosen by clients, so this is a reuse, not
    /// a retry.
    #[error(
        "request_id {request_id:?} was already used by another create in this team: choose a \
         new request_id"
    )]
    RequestIdReused { request_id: String },
}

/// Result alias of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a clearance was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("no clearance was presented")]
    Missing,
    #[error("{0}")]
    Invalid(VerifyError),
    #[error("clearance was already used")]
    Replayed,
    #[error("the image to run differs from the cleared spec's image")]
    ImageMismatch,
}

impl Rejection {
    /// Whether the clearance is well-formed but no longer usable (expired,
    /// replayed), as opposed to forged or for something else.
    pub fn is_stale(&self) -> bool {
        matches!(
            self,
            Rejection::Replayed
                | Rejection::Invalid(VerifyError::Expired | VerifyError::NotYetValid)
        )
    }
}

pub use crate::admission::Quotas;

/// Runtime settings of an orchestrator.
#[derive(Debug, Clone)]
pub struct Settings {
    pub installation: String,
    pub subnet_pool: Cidr,
    pub subnet_prefix: u8,
    pub quotas: Quotas,
    /// Share of the host's memory all environments may reserve together.
    pub host_memory_share: f64,
    pub health_cmd: Vec<String>,
    pub extra_labels: Vec<(String, String)>,
    pub default_stop_timeout: u32,
    /// Egress gates: outbound network, resolvers, ranges never reached.
    pub egress: crate::egress::EgressSettings,
}

/// A create, as the gateway asks for it.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub caller: Caller,
    pub request_id: String,
    pub environment_id: String,
    pub team_id: String,
    pub owner_id: String,
    pub name: String,
    pub spec: Option<ContainerSpec>,
    pub clearance: Option<Clearance>,
    pub canonical_image: String,
    /// Labels of the environment itself (not of its container).
    pub labels: std::collections::BTreeMap<String, String>,
}

pub(crate) struct Inner {
    pub(crate) docker: Docker,
    /// Provisioning and lifecycle go through this seam (one engine).
    pub(crate) runtime: Arc<dyn Runtime>,
    pub(crate) store: Store,
    pub(crate) keys: ClearanceKeys,
    pub(crate) audit: Audit,
    pub(crate) settings: Settings,
    pub(crate) admission: Mutex<()>,
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    pub(crate) host_memory: i64,
    hooks: Hooks,
    /// Open sessions and recent activity (idle stop, see [`crate::lifecycle`]).
    pub(crate) activity: Arc<crate::lifecycle::Activity>,
    /// Egress gates being followed and their counts (see [`crate::egress`]).
    pub(crate) gates: crate::egress::GateState,
    /// Operations running in the background (see [`crate::operations`]).
    pub(crate) ops: crate::operations::Operations,
}

/// The orchestrator (cheap to clone).
#[derive(Clone)]
pub struct Orchestrator {
    pub(crate) inner: Arc<Inner>,
}

fn docker_status(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Whether a Docker error means the engine could not be reached (socket
/// missing, connection refused or cut, no answer in time), as opposed to an
/// answer from the engine.
pub(crate) fn engine_unreachable(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::HyperLegacyError { .. }
            | DockerError::HyperResponseError { .. }
            | DockerError::IOError { .. }
            | DockerError::RequestTimeoutError
            | DockerError::SocketNotFoundError(_)
    )
}

/// Ignores "not found" (and "not modified") answers from Docker.
fn tolerate(r: Result<(), DockerError>) -> Result<(), DockerError> {
    match r {
        Err(e) if matches!(docker_status(&e), Some(404 | 304)) => Ok(()),
        other => other,
    }
}

/// The fixed name of a create's failure event (a create happens once per
/// environment): its failure and reconcile's rollback of it are one event.
pub(crate) const CREATE_FAILED: &str = "environment.create.failed";

/// What a record reserves.
fn reservation(rec: &EnvRecord) -> admission::Reservation {
    admission::Reservation {
        nano_cpus: rec.nano_cpus,
        memory_bytes: rec.memory_bytes,
    }
}

fn required(field: &'static str, v: &str) -> Result<()> {
    if v.trim().is_empty() {
        return Err(Error::InvalidArgument {
            field,
            reason: "must not be empty".into(),
        });
    }
    Ok(())
}

impl Orchestrator {
    /// Builds an orchestrator over an engine, a store, keys and an auditor.
    pub async fn new(
        docker: Docker,
        store: Store,
        keys: ClearanceKeys,
        audit: Audit,
        settings: Settings,
    ) -> Result<Self> {
        let runtime = Arc::new(DockerRuntime::new(docker.clone()));
        Self::with_runtime(docker, runtime, store, keys, audit, settings).await
    }

    /// Builds an orchestrator whose provisioning and lifecycle go through
    /// `runtime` (reconcile and the streams still use `docker`).
    pub async fn with_runtime(
        docker: Docker,
        runtime: Arc<dyn Runtime>,
        store: Store,
        keys: ClearanceKeys,
        audit: Audit,
        settings: Settings,
    ) -> Result<Self> {
        let host_memory = runtime.memory_bytes().await?;
        Ok(Orchestrator {
            inner: Arc::new(Inner {
                docker,
                runtime,
                store,
                keys,
                audit,
                settings,
                admission: Mutex::new(()),
                locks: std::sync::Mutex::new(HashMap::new()),
                host_memory,
                hooks: Hooks::from_env(),
                activity: Arc::default(),
                gates: Default::default(),
                ops: Default::default(),
            }),
        })
    }

    /// The Docker client.
    pub fn docker(&self) -> &Docker {
        &self.inner.docker
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The auditor.
    pub fn audit(&self) -> &Audit {
        &self.inner.audit
    }

    /// The installation id.
    pub fn installation(&self) -> &str {
        &self.inner.settings.installation
    }

    /// Test hook: make the next operations stop at `point` as if killed.
    #[cfg(feature = "test-hooks")]
    pub fn set_crash_point(&self, point: Option<CrashPoint>) {
        self.inner.hooks.set_crash_point(point);
    }

    pub(crate) async fn lock_env(&self, id: &str) -> OwnedMutexGuard<()> {
        self.env_mutex(id).lock_owned().await
    }

    pub(crate) fn try_lock_env(&self, id: &str) -> Option<OwnedMutexGuard<()>> {
        self.env_mutex(id).try_lock_owned().ok()
    }

    fn env_mutex(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, m| Arc::strong_count(m) > 1 || m.try_lock().is_err());
        Arc::clone(locks.entry(id.to_owned()).or_default())
    }

    pub(crate) fn target<'a>(&'a self, rec: &'a EnvRecord) -> Target<'a> {
        Target {
            installation: &self.inner.settings.installation,
            environment_id: &rec.id,
            team_id: &rec.team_id,
            owner_id: &rec.owner_id,
            policy_digest: &rec.policy_digest,
            extra_labels: &self.inner.settings.extra_labels,
        }
    }

    /// Decodes the cleared spec of a record.
    pub(crate) fn spec_of(rec: &EnvRecord) -> ContainerSpec {
        prost::Message::decode(rec.spec.as_slice()).unwrap_or_default()
    }

    pub(crate) fn body_of(&self, rec: &EnvRecord) -> Result<bollard::models::ContainerCreateBody> {
        let mut body = docker::container_body(
            &Self::spec_of(rec),
            &rec.canonical_image,
            &self.target(rec),
            &self.inner.settings.health_cmd,
        )?;
        if let Some(gate) = Self::gate_of(rec) {
            crate::egress::apply_to_body(&mut body, gate);
        }
        Ok(body)
    }

    /// A record of this installation.
    pub async fn get(&self, id: &str) -> Result<EnvRecord> {
        match self.inner.store.get(id).await? {
            Some(r) if r.installation_id == self.inner.settings.installation => Ok(r),
            _ => Err(Error::NotFound),
        }
    }

    /// A page of a listing (`query` parsed from the request's filter,
    /// order_by and show_deleted) among the records of `team_ids` (every
    /// team when empty); see [`list_page`].
    pub async fn list(
        &self,
        team_ids: &[String],
        query: &vibebox_listing::Query,
        size: usize,
        cursor: Option<&vibebox_listing::Cursor>,
    ) -> Result<vibebox_listing::Page> {
        list_page(
            &self.inner.store,
            &self.inner.settings.installation,
            team_ids,
            query,
            size,
            cursor,
            ListLimits::for_page(size),
        )
        .await
    }

    async fn reject(&self, req: &CreateRequest, why: Rejection) -> Error {
        let audited = self
            .inner
            .audit
            .record(Event {
                action: "clearance.rejected",
                outcome: Outcome::Denied,
                severity: Severity::Critical,
                caller: Some(&req.caller),
                team_id: &req.team_id,
                environment_id: &req.environment_id,
                details: vec![("reason", why.to_string())],
            })
            .await;
        tracing::warn!(environment = %req.environment_id, reason = %why, "clearance rejected");
        match audited {
            Ok(()) => Error::Clearance(why),
            Err(e) => Error::Audit(e),
        }
    }

    pub(crate) async fn audit_op(
        &self,
        action: &str,
        caller: Option<&Caller>,
        rec: &EnvRecord,
        result: &Result<EnvRecord>,
    ) -> Result<()> {
        let (outcome, severity, details) = match result {
            Ok(_) => (Outcome::Success, Severity::Low, vec![]),
            Err(e) => (
                Outcome::Failure,
                Severity::Medium,
                vec![("error", e.to_string())],
            ),
        };
        self.inner
            .audit
            .record(Event {
                action,
                outcome,
                severity,
                caller,
                team_id: &rec.team_id,
                environment_id: &rec.id,
                details,
            })
            .await?;
        Ok(())
    }

    /// Creates and starts an environment for a cleared spec. Idempotent by
    /// `(team_id, request_id)` for its owner: a retry by the same owner is
    /// answered with what the first call created, another owner's create
    /// with the same key is refused ([`Error::RequestIdReused`]). Returns
    /// once the environment is admitted and recorded (`creating`);
    /// provisioning runs in the background and settles the record `running`
    /// or `failed` (see [`crate::operations`]). What can be decided at once
    /// is refused here: arguments, clearance, the bind sources, admission.
    pub async fn create(&self, req: CreateRequest) -> Result<EnvRecord> {
        required("request_id", &req.request_id)?;
        required("team_id", &req.team_id)?;
        required("owner_id", &req.owner_id)?;
        uuid::Uuid::parse_str(&req.environment_id).map_err(|_| Error::InvalidArgument {
            field: "environment_id",
            reason: "must be a UUID".into(),
        })?;
        let existing =
            Store::by_request(self.inner.store.db(), &req.team_id, &req.request_id).await?;
        let Some(spec) = req.spec.clone() else {
            return Err(Error::InvalidArgument {
                field: "spec",
                reason: "is required".into(),
            });
        };
        let Some(clearance) = req.clearance.clone() else {
            return Err(self.reject(&req, Rejection::Missing).await);
        };
        let ring = self.inner.keys.ring_for(&clearance.key_id).await?;
        let body = match vibebox_clearance::verify(
            &clearance,
            &ring,
            Expected {
                spec: &spec,
                environment_id: &req.environment_id,
                team_id: &req.team_id,
            },
            SystemTime::now(),
        ) {
            Ok(b) => b,
            Err(e) => return Err(self.reject(&req, Rejection::Invalid(e)).await),
        };
        // A retried request (same team and request id; through the gateway
        // it comes with a fresh clearance) is answered with what it created,
        // but only to a caller holding a valid clearance (no clearance, no
        // answer) and only to its owner: another member of the team reusing
        // the request id is refused (and audited) at admission below.
        if let Some(existing) = existing.filter(|e| e.owner_id == req.owner_id) {
            return Ok(existing);
        }
        // The image that runs is the one the clearance signed, nothing else.
        if !req.canonical_image.is_empty() && req.canonical_image != spec.image {
            return Err(self.reject(&req, Rejection::ImageMismatch).await);
        }
        let image = spec.image.clone();
        let now = store::now_ms();
        let mut rec = EnvRecord {
            id: req.environment_id.clone(),
            installation_id: self.inner.settings.installation.clone(),
            team_id: req.team_id.clone(),
            owner_id: req.owner_id.clone(),
            name: req.name.clone(),
            request_id: req.request_id.clone(),
            state: State::Creating,
            spec: prost::Message::encode_to_vec(&spec),
            canonical_image: image,
            policy_digest: body.policy_digest.clone(),
            policy_version: body.policy_version.clone(),
            clearance_id: body.clearance_id.clone(),
            subnet: None,
            container_id: None,
            nano_cpus: docker::nano_cpus(&spec),
            memory_bytes: docker::memory_bytes(&spec),
            failure_reason: String::new(),
            status_message: "admitted".into(),
            create_time_ms: now,
            update_time_ms: now,
            stop_reason: String::new(),
            last_activity_ms: Some(now),
            keep_alive_until_ms: None,
            expire_at_ms: crate::lifecycle::expire_at(&spec, now),
            progress_percent: crate::operations::ADMITTED_PERCENT,
            operation: crate::operations::Operation::Create.as_str().to_owned(),
            operation_id: uuid::Uuid::new_v4().to_string(),
            labels: crate::update::labels_json(&req.labels),
            update_request_id: String::new(),
            pending_update: String::new(),
        };
        // A spec the orchestrator refuses to apply fails before admission,
        // and so does a bind source that does not hold on the host.
        let binds = spec.clone();
        let bind_check = tokio::task::spawn_blocking(move || docker::verify_bind_sources(&binds))
            .await
            .unwrap_or_else(|_| {
                Err(SpecError::BindSource {
                    index: 0,
                    source_path: String::new(),
                    reason: docker::BindSourceReason::Unreadable(
                        String::new(),
                        "the check did not complete".into(),
                    ),
                })
            });
        if let Err(e) = self.body_of(&rec).and_then(|_| Ok(bind_check?)) {
            let result = Err(e);
            self.audit_op("environment.create", Some(&req.caller), &rec, &result)
                .await?;
            return result;
        }

        let guard = self.lock_env(&rec.id).await;
        match self.admit(&mut rec).await {
            Ok(Some(existing)) if existing.owner_id == req.owner_id => return Ok(existing),
            Ok(Some(_)) => {
                let result = Err(Error::RequestIdReused {
                    request_id: req.request_id.clone(),
                });
                self.audit_op("environment.create", Some(&req.caller), &rec, &result)
                    .await?;
                return result;
            }
            Ok(None) => {}
            Err(Error::Clearance(why)) => return Err(self.reject(&req, why).await),
            Err(e) => {
                let result = Err(e);
                self.audit_op("environment.create", Some(&req.caller), &rec, &result)
                    .await?;
                return result;
            }
        }

        // Admitted and durable (the record as inserted): the engine work
        // goes on in the background, holding the environment's lock.
        let admitted = rec.clone();
        let (this, caller, id) = (self.clone(), req.caller.clone(), rec.id.clone());
        self.spawn_operation(&id, guard, move |cancel| async move {
            this.run_create(rec, caller, cancel).await;
        });
        Ok(admitted)
    }

    /// Provisions an admitted environment and settles its record: `running`
    /// (audited first, inside [`provision`](Self::provision)), or `failed`
    /// with the objects removed and the failure audited first (under a
    /// fixed id, which reconcile's rollback of an interrupted create shares,
    /// so the failure is logged once).
    async fn run_create(&self, rec: EnvRecord, caller: Caller, cancel: CancellationToken) {
        let error = match self.provision(&rec, &caller, &cancel).await {
            Ok(()) => return,
            // As if killed: everything stays as it is, for reconcile.
            Err(Error::SimulatedCrash) => return,
            Err(e) => e,
        };
        let superseded = matches!(error, Error::Superseded { .. });
        if !superseded {
            tracing::warn!(environment = %rec.id, error = %error, "create failed; rolling back");
            if let Err(re) = self.remove_objects(&rec).await {
                tracing::warn!(environment = %rec.id, error = %re, "rollback incomplete");
            }
        }
        // Audit first, then commit: a crash between them leaves `creating`,
        // which reconcile rolls back under the same event id.
        let audited = self
            .inner
            .audit
            .record_once(
                crate::audit::once_id(&rec.id, CREATE_FAILED),
                Event {
                    action: "environment.create",
                    outcome: Outcome::Failure,
                    severity: Severity::Medium,
                    caller: Some(&caller),
                    team_id: &rec.team_id,
                    environment_id: &rec.id,
                    details: vec![("error", error.to_string())],
                },
            )
            .await;
        if let Err(e) = audited {
            tracing::warn!(environment = %rec.id, error = %e, "create failure not audited; reconcile rolls it back");
            return;
        }
        // A delete accepted meanwhile settles the record itself.
        if superseded {
            return;
        }
        let settled = self
            .inner
            .store
            .transition(
                &rec.id,
                &[State::Creating],
                State::Failed,
                Transition {
                    failure_reason: Some(&error.to_string()),
                    status_message: Some(""),
                    release_subnet: true,
                    ..Transition::default()
                },
            )
            .await;
        if let Err(e) = settled {
            tracing::warn!(environment = %rec.id, error = %e, "cannot settle the failed create; reconcile rolls it back");
        }
    }

    /// Admission: idempotency, replay, quota, capacity and subnet in one
    /// serialized transaction. Returns an existing record for a retried
    /// request.
    async fn admit(&self, rec: &mut EnvRecord) -> Result<Option<EnvRecord>> {
        let s = &self.inner.settings;
        let _admission = self.inner.admission.lock().await;
        // Asked of the engine before the write lock is taken: the lock is
        // never held across a Docker call (other writers wait on it). The
        // admission mutex keeps our own allocations serialized; a network
        // someone else creates meanwhile is handled by `reallocate_subnet`.
        let engine_subnets = self.engine_subnets().await?;
        // Every statement below runs on the transaction's own connection:
        // asking the pool for a second one while holding SQLite's write lock
        // deadlocks against writers that wait for the lock on every other
        // pooled connection (until their busy timeout).
        let txn = self.inner.store.begin_immediate().await?;
        let existing = Store::by_request(&txn, &rec.team_id, &rec.request_id).await?;
        let live = Store::live_in(&txn, &s.installation).await?;
        let holding: Vec<&EnvRecord> = live.iter().filter(|r| r.state != State::Failed).collect();
        let mut taken_subnets: Vec<Cidr> = Store::held_subnets_in(&txn, &s.installation)
            .await?
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        taken_subnets.extend(engine_subnets);
        let snapshot = admission::Snapshot {
            retried: existing.is_some(),
            clearance_used: Store::clearance_used(&txn, &rec.clearance_id).await?,
            id_taken: Store::get_in(&txn, &rec.id).await?.is_some(),
            team: holding
                .iter()
                .filter(|r| r.team_id == rec.team_id)
                .map(|r| reservation(r))
                .collect(),
            all: holding.iter().map(|r| reservation(r)).collect(),
            taken_subnets,
        };
        let capacity = admission::Capacity {
            host_memory_bytes: self.inner.host_memory,
            share: s.host_memory_share,
        };
        let pool = admission::SubnetPool {
            pool: s.subnet_pool,
            prefix: s.subnet_prefix,
        };
        let subnet =
            match admission::admit(&snapshot, reservation(rec), &s.quotas, &capacity, &pool) {
                Ok(Decision::Retry) => return Ok(existing),
                Ok(Decision::Admit(subnet)) => subnet,
                Err(Refusal::Replayed) => return Err(Error::Clearance(Rejection::Replayed)),
                Err(Refusal::IdTaken) => return Err(Error::AlreadyExists(rec.id.clone())),
                Err(Refusal::Quota(exceeded)) => {
                    return Err(Error::Quota {
                        team: rec.team_id.clone(),
                        exceeded,
                    });
                }
                Err(Refusal::Capacity(why)) => return Err(Error::Capacity(why)),
                Err(Refusal::SubnetsExhausted) => return Err(Error::SubnetsExhausted),
            };
        rec.subnet = Some(subnet.to_string());
        Store::insert(&txn, rec.clone()).await?;
        txn.commit().await.map_err(StoreError::from)?;
        self.inner.store.changes().publish(&rec.id);
        Ok(None)
    }

    /// Subnets of every network on the engine (ours and everybody else's).
    async fn engine_subnets(&self) -> Result<Vec<Cidr>> {
        Ok(self.inner.runtime.subnets().await?)
    }

    /// Moves a record to a fresh subnet after the engine refused its current
    /// one (another installation took it meanwhile).
    async fn reallocate_subnet(&self, rec: &mut EnvRecord, refused: &[Cidr]) -> Result<Cidr> {
        let s = &self.inner.settings;
        let _admission = self.inner.admission.lock().await;
        let mine = rec.subnet.as_deref();
        let mut taken: Vec<Cidr> = Store::held_subnets_in(self.inner.store.db(), &s.installation)
            .await?
            .iter()
            .filter(|c| Some(c.as_str()) != mine)
            .filter_map(|c| c.parse().ok())
            .collect();
        taken.extend(self.engine_subnets().await?);
        taken.extend_from_slice(refused);
        let subnet = subnet::allocate(s.subnet_pool, s.subnet_prefix, &taken)
            .ok_or(Error::SubnetsExhausted)?;
        self.inner
            .store
            .set_subnet(&rec.id, Some(&subnet.to_string()))
            .await?;
        rec.subnet = Some(subnet.to_string());
        Ok(subnet)
    }

    pub(crate) fn crash_at(&self, point: CrashPoint) -> Result<()> {
        if self.inner.hooks.crashes_at(point) {
            return Err(Error::SimulatedCrash);
        }
        Ok(())
    }

    /// Image, network, volume, container, start, audit; the record is
    /// `creating` throughout and `running` (committed) last, once the
    /// `environment.create` event is durable: a `running` record always has
    /// its event, and a crash before the commit leaves `creating`, which
    /// reconcile rolls back (and audits).
    ///
    /// Each step shows on the record (status message and progress) through
    /// a write that only lands while it is still `creating`: a delete
    /// accepted meanwhile ends provisioning at the next step
    /// ([`Error::Superseded`]), and so does `cancel` during an image pull.
    async fn provision(
        &self,
        rec: &EnvRecord,
        caller: &Caller,
        cancel: &CancellationToken,
    ) -> Result<()> {
        use crate::operations::Operation::Create;
        let runtime = &self.inner.runtime;
        let mut rec = rec.clone();
        self.ensure_image(&rec, cancel).await?;

        self.step(&rec, State::Creating, Create, 65, "creating the network")
            .await?;
        // The engine may refuse a subnet another installation took (or one
        // it has not released yet): move on, remembering every refusal.
        let mut refused = Vec::new();
        loop {
            let subnet: Cidr = rec
                .subnet
                .as_deref()
                .and_then(|s| s.parse().ok())
                .ok_or(Error::SubnetsExhausted)?;
            let gated = Self::gate_of(&rec).is_some();
            match runtime
                .create_network(docker::network_request(&self.target(&rec), subnet, gated))
                .await
            {
                Ok(_) => break,
                Err(e) if docker_status(&e) == Some(409) => break,
                Err(e)
                    if refused.len() < 32
                        && docker_message(&e).to_ascii_lowercase().contains("overlap") =>
                {
                    tracing::debug!(%subnet, "engine refused subnet; allocating another");
                    refused.push(subnet);
                    self.reallocate_subnet(&mut rec, &refused).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.crash_at(CrashPoint::AfterNetwork)?;
        if Self::gate_of(&rec).is_some() {
            self.step(
                &rec,
                State::Creating,
                Create,
                70,
                "starting the egress gate",
            )
            .await?;
            self.gate_up(&rec).await?;
        }

        self.step(&rec, State::Creating, Create, 80, "creating the container")
            .await?;
        for volume in docker::volume_requests(&self.target(&rec), &Self::spec_of(&rec)) {
            runtime.create_volume(volume).await?;
        }
        let body = self.body_of(&rec)?;
        let name = docker::container_name(&rec.id);
        let id = match runtime.create_container(&name, body).await {
            Ok(id) => id,
            Err(e) if docker_status(&e) == Some(409) => {
                runtime.container_id(&name).await?.unwrap_or(name.clone())
            }
            Err(e) => return Err(self.engine_error(&rec, e)),
        };
        self.inner.store.set_container(&rec.id, &id).await?;
        self.crash_at(CrashPoint::AfterContainer)?;

        self.step(&rec, State::Creating, Create, 90, "starting the container")
            .await?;
        tolerate_304(runtime.start_container(&id).await).map_err(|e| self.engine_error(&rec, e))?;
        // The health check is not waited for: its first probe comes at its
        // interval (30 s), and a failing one shows in the engine's state.
        self.inner
            .audit
            .record(Event {
                action: "environment.create",
                outcome: Outcome::Success,
                severity: Severity::Low,
                caller: Some(caller),
                team_id: &rec.team_id,
                environment_id: &rec.id,
                details: vec![],
            })
            .await?;
        // Only from `creating`: a delete accepted meanwhile goes on from
        // here. Running is activity (the idle clock starts now, not at the
        // request: an image pull may have taken minutes).
        self.inner
            .store
            .transition(
                &rec.id,
                &[State::Creating],
                State::Running,
                Transition {
                    failure_reason: Some(""),
                    status_message: Some(""),
                    last_activity_ms: Some(store::now_ms()),
                    ..Transition::default()
                },
            )
            .await?;
        Ok(())
    }

    /// A Docker error of a create or start: a refusal of the spec itself (400:
    /// no command, a mount the runtime cannot make, ...) is the caller's to
    /// fix and names the field; anything else stays an engine error.
    pub(crate) fn engine_error(&self, rec: &EnvRecord, e: DockerError) -> Error {
        match &e {
            DockerError::DockerResponseServerError {
                status_code: 400,
                message,
            } => {
                let (field, reason) = docker::engine_refusal(&Self::spec_of(rec), message);
                Error::EngineRefused { field, reason }
            }
            _ => Error::Docker(e),
        }
    }

    /// Makes sure the image exists, pulling it through the engine otherwise
    /// (progress goes to the record: status message and percentage, at most
    /// [`crate::operations::PULL_PROGRESS_EVERY`] apart).
    async fn ensure_image(&self, rec: &EnvRecord, cancel: &CancellationToken) -> Result<()> {
        use crate::operations::{
            Operation::Create, PULL_PERCENT, PULL_PROGRESS_EVERY, PullProgress,
        };
        let runtime = &self.inner.runtime;
        let image = &rec.canonical_image;
        match runtime.inspect_image(image).await {
            Ok(_) => return Ok(()),
            Err(e) if docker_status(&e) == Some(404) => {}
            Err(e) => return Err(e.into()),
        }
        self.step(
            rec,
            State::Creating,
            Create,
            PULL_PERCENT.start,
            &format!("pulling image {image}"),
        )
        .await?;
        let mut pull = runtime.pull_image(image);
        let mut progress = PullProgress::default();
        let mut last = Instant::now();
        loop {
            let item = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(Error::Superseded { operation: Create.as_str() }),
                item = pull.next() => item,
            };
            match item {
                None => break,
                Some(Ok(info)) => {
                    progress.update(&info);
                    if last.elapsed() >= PULL_PROGRESS_EVERY {
                        last = Instant::now();
                        let msg = format!("pulling image {image}: {}", progress.describe());
                        self.step(rec, State::Creating, Create, progress.percent(), &msg)
                            .await?;
                    }
                }
                Some(Err(e)) => {
                    return Err(Error::ImageUnavailable {
                        image: image.clone(),
                        reason: docker_message(&e),
                    });
                }
            }
        }
        match runtime.inspect_image(image).await {
            Ok(()) => Ok(()),
            Err(e) => Err(Error::ImageUnavailable {
                image: image.clone(),
                reason: docker_message(&e),
            }),
        }
    }

    /// Removes the container, network and volume of an environment (found by
    /// name and by label), tolerating ones already gone.
    pub(crate) async fn remove_objects(&self, rec: &EnvRecord) -> Result<()> {
        self.remove_containers(rec).await?;
        self.remove_network(rec).await?;
        self.remove_volumes(rec).await
    }

    /// Removes the forwarder and the container of an environment.
    pub(crate) async fn remove_containers(&self, rec: &EnvRecord) -> Result<()> {
        let runtime = self.inner.runtime.as_ref();
        self.remove_forwarder(&rec.id).await?;
        if let Some(id) = &rec.container_id {
            remove_container(runtime, id).await?;
        }
        remove_container(runtime, &docker::container_name(&rec.id)).await?;
        Ok(())
    }

    /// Removes the egress gate and the network of an environment.
    pub(crate) async fn remove_network(&self, rec: &EnvRecord) -> Result<()> {
        self.gate_remove(&rec.id).await?;
        let runtime = self.inner.runtime.as_ref();
        tolerate(runtime.remove_network(&docker::network_name(&rec.id)).await)?;
        Ok(())
    }

    /// Removes the volumes of an environment.
    pub(crate) async fn remove_volumes(&self, rec: &EnvRecord) -> Result<()> {
        let runtime = self.inner.runtime.as_ref();
        for volume in docker::volume_requests(&self.target(rec), &Self::spec_of(rec)) {
            let name = volume.name.unwrap_or_default();
            tolerate(runtime.remove_volume(&name).await)?;
        }
        Ok(())
    }

    /// `deleting`, objects removed, `environment.delete` recorded, `deleted`.
    /// The event is durable before `deleted` is committed and has a fixed id:
    /// reconcile finishing a delete a crash interrupted (`caller` is then
    /// `None`) records it again, and the log keeps it once.
    pub(crate) async fn delete_locked(
        &self,
        rec: &EnvRecord,
        caller: Option<&Caller>,
    ) -> Result<EnvRecord> {
        // Deleting ends the quarantine that would have written it.
        if Self::drift_event_pending(rec) {
            self.record_drift(rec, &rec.failure_reason).await?;
        }
        // A person's delete clears the platform's stop reason; the
        // platform's (lifetime) keeps it.
        let stop_reason = match caller {
            Some(_) => "",
            None => rec.stop_reason.as_str(),
        };
        use crate::operations::Operation::Delete;
        if rec.state != State::Deleting {
            let operation_id = uuid::Uuid::new_v4().to_string();
            self.inner
                .store
                .transition(
                    &rec.id,
                    &[rec.state],
                    State::Deleting,
                    Transition {
                        stop_reason: Some(stop_reason),
                        status_message: Some("deleting"),
                        progress_percent: Some(crate::operations::ADMITTED_PERCENT),
                        operation: Some((Delete.as_str(), &operation_id)),
                        ..Transition::default()
                    },
                )
                .await?;
        }
        self.step(rec, State::Deleting, Delete, 30, "removing the container")
            .await?;
        self.remove_containers(rec).await?;
        self.step(rec, State::Deleting, Delete, 60, "removing the network")
            .await?;
        self.remove_network(rec).await?;
        self.step(rec, State::Deleting, Delete, 85, "removing the volumes")
            .await?;
        self.remove_volumes(rec).await?;
        let details = match caller {
            Some(_) => vec![],
            None if !rec.stop_reason.is_empty() => vec![("reason", rec.stop_reason.clone())],
            None => vec![("reason", "interrupted; finished by reconcile".to_owned())],
        };
        self.inner
            .audit
            .record_once(
                crate::audit::once_id(&rec.id, "environment.delete"),
                Event {
                    action: "environment.delete",
                    outcome: Outcome::Success,
                    severity: Severity::Low,
                    caller,
                    team_id: &rec.team_id,
                    environment_id: &rec.id,
                    details,
                },
            )
            .await?;
        self.inner
            .store
            .settle(&rec.id, State::Deleted, None, Some(""))
            .await?;
        self.get(&rec.id).await
    }

    /// The container id of an environment that has one, for logs, exec and
    /// stats.
    pub async fn container_of(&self, id: &str) -> Result<String> {
        let rec = self.get(id).await?;
        match rec.state {
            State::Deleted | State::Deleting => Err(Error::BadState {
                state: "deleted",
                operation: "attach",
            }),
            _ => rec.container_id.ok_or(Error::BadState {
                state: "creating",
                operation: "attach",
            }),
        }
    }
}

/// Removes a container (gone already is fine). When the engine answers that
/// it is removing it already (409: a removal started by a process that was
/// killed, or by a caller that went away), waits for that removal to end
/// instead of failing the delete.
async fn remove_container(runtime: &dyn Runtime, name: &str) -> Result<(), DockerError> {
    let mut waited = Duration::ZERO;
    loop {
        match tolerate(runtime.remove_container(name).await) {
            Err(e) if docker_status(&e) == Some(409) && waited < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                waited += Duration::from_millis(100);
            }
            other => return other,
        }
    }
}

pub(crate) fn tolerate_304(r: Result<(), DockerError>) -> Result<(), DockerError> {
    match r {
        Err(e) if docker_status(&e) == Some(304) => Ok(()),
        other => other,
    }
}

/// The engine's message of a Docker error, without transport details.
pub(crate) fn docker_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        DockerError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

/// Records read per database query of a listing scan (see [`list_page`]).
pub const LIST_CHUNK: u64 = 256;

/// What one call of a listing may read (see [`list_page`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListLimits {
    /// Records per database read of a scan in time order.
    pub chunk: u64,
    /// Records a scan in time order examines per call before it answers
    /// what matched so far (a short page with a token).
    pub examine: u64,
    /// Candidates a listing ordered by name or state first sorts at most;
    /// more is refused ([`Error::TooManyToSort`]).
    pub sort: u64,
}

impl ListLimits {
    /// The limits of a call asking for `size` results: chunks of
    /// [`LIST_CHUNK`], [`vibebox_listing::examine_limit`] examined,
    /// [`vibebox_listing::MAX_SORTED`] sorted.
    pub fn for_page(size: usize) -> Self {
        ListLimits {
            chunk: LIST_CHUNK,
            examine: vibebox_listing::examine_limit(size) as u64,
            sort: vibebox_listing::MAX_SORTED as u64,
        }
    }
}

/// A page of a listing of `installation`'s records of `team_ids` (every
/// team when empty).
///
/// The database narrows by installation, teams, deleted and what the filter
/// requires of owner, id, state and times (see [`vibebox_listing::Bounds`]);
/// the filter is judged exactly on the wire form. The cost of a call is
/// bounded whatever the team's history (deleted records are kept):
/// - when the order starts with a time, records are read in that order,
///   `limits.chunk` at a time, until the page is full or `limits.examine`
///   records were examined (plus the rest of the records sharing the
///   millisecond the last read ended on, read with it so that the next
///   read starts strictly after it); stopped by the limit, the page holds what
///   matched so far, maybe nothing, with a token right after the last
///   record examined ([`vibebox_listing::Query::partial_page`]);
/// - ordered by name or state first, the candidates are sorted in memory:
///   at most `limits.sort` of them are read, and a listing that selects
///   more is refused ([`Error::TooManyToSort`]).
///
/// (Keyset reads in SQL for name, and a retention that purges deleted
/// records, would lift both; neither is there yet.)
pub async fn list_page(
    store: &Store,
    installation: &str,
    team_ids: &[String],
    query: &vibebox_listing::Query,
    size: usize,
    cursor: Option<&vibebox_listing::Cursor>,
    limits: ListLimits,
) -> Result<vibebox_listing::Page> {
    use crate::grpc::environment_pb;
    use vibebox_listing::OrderField;
    use vibebox_proto::environment::Environment;

    let chunk = limits.chunk.max(1);
    let mut bounds = query.bounds(cursor);
    let first = query.order().keys()[0];
    let by = match first.field {
        OrderField::CreateTime => store::ScanBy::CreateTime,
        OrderField::UpdateTime => store::ScanBy::UpdateTime,
        OrderField::Name | OrderField::State => {
            let records = store
                .list_at_most(
                    installation,
                    team_ids,
                    &bounds,
                    limits.sort.saturating_add(1),
                )
                .await?;
            if records.len() as u64 > limits.sort {
                return Err(Error::TooManyToSort { max: limits.sort });
            }
            return Ok(query.page(records.iter().map(environment_pb), size, cursor));
        }
    };
    let order = query.order();
    let after_cursor =
        |env: &Environment| cursor.is_none_or(|c| order.compare(c.last(), env).is_lt());
    // Candidates by id: a record changed between two reads may come twice;
    // the later read wins.
    let mut found: HashMap<String, Environment> = HashMap::new();
    let mut examined: u64 = 0;
    // The last record examined after the cursor, in the query's order
    // (matching or not): where a call stopped by the limit goes on.
    let mut edge_env: Option<Environment> = None;
    loop {
        let limit = chunk.min(limits.examine.saturating_sub(examined)).max(1);
        let scan = store::Scan {
            by,
            descending: first.descending,
            limit,
        };
        let mut records = store
            .list(installation, team_ids, &bounds, Some(scan))
            .await?;
        examined += records.len() as u64;
        let Some(edge) = records.last().map(|r| by.of(r)) else {
            break;
        };
        let complete = (records.len() as u64) < limit;
        if !complete {
            // The read may end inside the records sharing its last time:
            // read the rest of those, so that the next read starts strictly
            // after that time.
            let seen: Vec<String> = records
                .iter()
                .filter(|r| by.of(r) == edge)
                .map(|r| r.id.clone())
                .collect();
            let mut ties = bounds.clone();
            let range = match by {
                store::ScanBy::CreateTime => &mut ties.create_time_ms,
                store::ScanBy::UpdateTime => &mut ties.update_time_ms,
            };
            range.min = Some(edge);
            range.max = Some(edge);
            let tied = store
                .list_unseen(installation, team_ids, &ties, &seen)
                .await?;
            examined += tied.len() as u64;
            records.extend(tied);
        }
        for record in &records {
            let env = environment_pb(record);
            if !after_cursor(&env) {
                continue;
            }
            let further = edge_env
                .as_ref()
                .is_none_or(|e| order.compare(e, &env).is_lt());
            if query.matches(&env) {
                if further {
                    edge_env = Some(env.clone());
                }
                found.insert(env.id.clone(), env);
            } else if further {
                edge_env = Some(env);
            }
        }
        // Every record not read yet sorts after every record read (its first
        // key is strictly beyond): once one more than a page matched, the
        // page is known.
        if complete || found.len() > size {
            break;
        }
        if examined >= limits.examine {
            // Stopped by the limit, with what matched so far; a call that
            // examined nothing after the cursor yet (a millisecond of ties
            // at the cursor) reads on, so that paging always moves.
            if let Some(edge_env) = &edge_env {
                return Ok(query.partial_page(found.into_values(), size, cursor, edge_env));
            }
        }
        let range = match by {
            store::ScanBy::CreateTime => &mut bounds.create_time_ms,
            store::ScanBy::UpdateTime => &mut bounds.update_time_ms,
        };
        if first.descending {
            range.max = Some(edge.saturating_sub(1));
        } else {
            range.min = Some(edge.saturating_add(1));
        }
    }
    Ok(query.page(found.into_values(), size, cursor))
}
