//! In-place updates of an environment (`UpdateEnvironment`): its name and
//! labels (metadata of the record only), and its resources (CPU, memory,
//! PIDs), which are applied to the container live with `docker update`,
//! running or stopped.
//!
//! A resource update carries the hardened new spec and a clearance for
//! exactly it, and is held to the rules of a create:
//! - the clearance verifies against the new spec, the environment and its
//!   team, and its id was never used (it is recorded as used);
//! - the new spec differs from the stored one only in `cpu_limit`,
//!   `memory_limit_mb` and `pids_limit` (anything else needs a new
//!   container: `update.requires_recreate`);
//! - admission ([`crate::admission::admit_resize`]) judges the team's quotas
//!   and the host's capacity over every reservation but the environment's
//!   own, in one serialized write transaction that also raises the
//!   environment's reservation to the larger of old and new and marks the
//!   update pending, so that no concurrent create can take what the resize
//!   is about to use;
//! - the engine applies the limits, `environment.update` is recorded in the
//!   durable audit outbox, and only then is the new spec committed (with
//!   its reservation, the clearance id, the request id and a change on the
//!   feed). A failure anywhere restores what was there before (the old
//!   limits on the container, the old reservation) and is audited as a
//!   failure; a crash between the engine and the commit leaves the update
//!   pending, and reconcile rolls it back ([`Orchestrator::roll_back_update`])
//!   before it compares the container with the stored spec, so an updated
//!   container is never mistaken for drift.
//!
//! An update is idempotent by its request id and its caller: a retry of the
//! last update applied (same caller, same request id, see [`update_key`])
//! is answered with the record as it is. It is refused while an
//! operation is in progress on the environment
//! ([`crate::operations::not_in_progress`]:
//! `environment.operation_in_progress`), on deleted environments, and for
//! resources, on failed and quarantined ones (no container to apply them
//! to, or one that must not be touched).

use std::collections::BTreeMap;
use std::time::SystemTime;

use bollard::errors::Error as DockerError;
use bollard::models::ContainerUpdateBody;
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};
use vibebox_clearance::Expected;
use vibebox_proto::audit::{Outcome, Severity};
use vibebox_proto::clearance::Clearance;
use vibebox_proto::environment::ContainerSpec;

use crate::admission::{self, Refusal, Reservation};
use crate::audit::{Caller, Event};
use crate::docker;
use crate::hooks::CrashPoint;
use crate::service::{Error, Orchestrator, Rejection, Result};
use crate::store::{self, EnvRecord, State, Store, StoreError, environment};

/// `ErrorInfo.reason` of a path that cannot be changed in place.
pub const REQUIRES_RECREATE: &str = "update.requires_recreate";
/// `ErrorInfo.reason` of a resource update prepared on an older record.
pub const CHANGED_MEANWHILE: &str = "environment.changed_meanwhile";

/// One path of an update mask that can be changed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    Name,
    Labels,
    CpuLimit,
    MemoryLimitMb,
    PidsLimit,
}

impl Path {
    /// Every path, in mask order.
    pub const ALL: [Path; 5] = [
        Path::Name,
        Path::Labels,
        Path::CpuLimit,
        Path::MemoryLimitMb,
        Path::PidsLimit,
    ];

    /// The path as written in a mask.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Name => "name",
            Path::Labels => "labels",
            Path::CpuLimit => "spec.cpu_limit",
            Path::MemoryLimitMb => "spec.memory_limit_mb",
            Path::PidsLimit => "spec.pids_limit",
        }
    }

    /// A resource of the container (judged by policy, applied live).
    pub fn is_resource(self) -> bool {
        matches!(self, Path::CpuLimit | Path::MemoryLimitMb | Path::PidsLimit)
    }

    /// Parses a mask path: one of [`Path::ALL`]; the rest of the spec
    /// (`spec`, `spec.image`, `spec.mounts`, ...) needs a new container;
    /// anything else is not a path of an environment that can change.
    pub fn parse(path: &str) -> Result<Path> {
        if let Some(p) = Path::ALL.into_iter().find(|p| p.as_str() == path) {
            return Ok(p);
        }
        if path == "spec" || path.starts_with("spec.") {
            return Err(UpdateRefusal::RequiresRecreate {
                path: path.to_owned(),
            }
            .into());
        }
        Err(Error::InvalidArgument {
            field: "update_mask",
            reason: format!(
                "{path:?} cannot be updated (paths: name, labels, spec.cpu_limit, \
                 spec.memory_limit_mb, spec.pids_limit)"
            ),
        })
    }
}

/// Why an update is refused for what it asks or when it asks it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpdateRefusal {
    /// The path (or a field the new spec changes) needs a new container.
    #[error("{path} cannot be changed in place: create a new environment")]
    RequiresRecreate { path: String },
    /// A resource the mask does not name differs from the stored one: the
    /// new spec was made from an older record.
    #[error("the environment changed while the update was prepared: read it again and retry")]
    ChangedMeanwhile,
}

/// An update, as the gateway asks for it.
#[derive(Debug, Clone, Default)]
pub struct UpdateRequest {
    pub caller: Caller,
    pub environment_id: String,
    /// Paths to change (see [`Path`]).
    pub update_mask: Vec<String>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// With a resource path: the hardened new spec (the stored spec with
    /// the new resources), and its clearance.
    pub spec: Option<ContainerSpec>,
    pub clearance: Option<Clearance>,
    /// Idempotency key.
    pub request_id: String,
}

/// The idempotency key of an update as the record keeps it
/// (`update_request_id`): the caller's user id with the request id (a JSON
/// array of the two, unambiguous whatever they hold). Request ids are the
/// clients' to choose, so a retry is the same caller with the same request
/// id; another caller's update with that request id is applied, not
/// answered as a retry.
pub fn update_key(caller: &Caller, request_id: &str) -> String {
    serde_json::to_string(&[caller.user_id.as_str(), request_id]).unwrap_or_default()
}

/// The stored form of labels (a JSON object, keys in order).
pub fn labels_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

/// The labels of a record.
pub fn labels_of(rec: &EnvRecord) -> BTreeMap<String, String> {
    serde_json::from_str(&rec.labels).unwrap_or_default()
}

/// The `docker update` body that gives a container the limits of `spec`,
/// exactly as the create body does (swap pinned to memory: no swap beyond
/// the limit).
pub fn update_body(spec: &ContainerSpec) -> ContainerUpdateBody {
    ContainerUpdateBody {
        nano_cpus: spec.cpu_limit.map(|_| docker::nano_cpus(spec)),
        memory: spec.memory_limit_mb.map(|_| docker::memory_bytes(spec)),
        memory_swap: spec.memory_limit_mb.map(|_| docker::memory_bytes(spec)),
        pids_limit: spec.pids_limit,
        ..Default::default()
    }
}

/// What a spec reserves.
fn reservation_of(spec: &ContainerSpec) -> Reservation {
    Reservation {
        nano_cpus: docker::nano_cpus(spec),
        memory_bytes: docker::memory_bytes(spec),
    }
}

/// What a record reserves now.
fn reservation(rec: &EnvRecord) -> Reservation {
    Reservation {
        nano_cpus: rec.nano_cpus,
        memory_bytes: rec.memory_bytes,
    }
}

/// The first field in which two specs differ, as a mask path.
fn first_difference(a: &ContainerSpec, b: &ContainerSpec) -> Option<&'static str> {
    // Every field by name: a field added to the contract fails to compile
    // here until it is sorted in.
    let ContainerSpec {
        image,
        command,
        env,
        working_dir,
        user,
        privileged,
        cap_add,
        cap_drop,
        mounts,
        devices,
        network_mode,
        pid_mode,
        ipc_mode,
        uts_mode,
        userns_mode,
        cgroupns_mode,
        security_opt,
        sysctls,
        read_only_rootfs,
        labels,
        cpu_limit,
        memory_limit_mb,
        pids_limit,
        ports,
        entrypoint,
        egress,
        lifetime,
        copy_limit_mb,
    } = a;
    macro_rules! differs {
        ($($field:ident),* $(,)?) => {
            $(
                if *$field != b.$field {
                    return Some(concat!("spec.", stringify!($field)));
                }
            )*
        };
    }
    differs!(
        image,
        command,
        env,
        working_dir,
        user,
        privileged,
        cap_add,
        cap_drop,
        mounts,
        devices,
        network_mode,
        pid_mode,
        ipc_mode,
        uts_mode,
        userns_mode,
        cgroupns_mode,
        security_opt,
        sysctls,
        read_only_rootfs,
        labels,
        cpu_limit,
        memory_limit_mb,
        pids_limit,
        ports,
        entrypoint,
        egress,
        lifetime,
        copy_limit_mb,
    );
    None
}

/// Checks that `new` differs from `stored` only in the resources `paths`
/// names: another field needs a new container; a resource the mask does not
/// name that differs means `new` was made from an older record.
pub fn check_resources_only(
    stored: &ContainerSpec,
    new: &ContainerSpec,
    paths: &[Path],
) -> Result<(), UpdateRefusal> {
    let mut rest = new.clone();
    rest.cpu_limit = stored.cpu_limit;
    rest.memory_limit_mb = stored.memory_limit_mb;
    rest.pids_limit = stored.pids_limit;
    if let Some(path) = first_difference(stored, &rest) {
        return Err(UpdateRefusal::RequiresRecreate {
            path: path.to_owned(),
        });
    }
    let unnamed_changed = |path: Path, changed: bool| changed && !paths.contains(&path);
    if unnamed_changed(Path::CpuLimit, new.cpu_limit != stored.cpu_limit)
        || unnamed_changed(
            Path::MemoryLimitMb,
            new.memory_limit_mb != stored.memory_limit_mb,
        )
        || unnamed_changed(Path::PidsLimit, new.pids_limit != stored.pids_limit)
    {
        return Err(UpdateRefusal::ChangedMeanwhile);
    }
    Ok(())
}

/// Whether an environment may be updated: never while an operation is in
/// progress; metadata in every settled state but `deleted`, resources only
/// with a container that runs or is stopped (not quarantined, not failed).
fn updatable(rec: &EnvRecord, resources: bool) -> Result<()> {
    crate::operations::not_in_progress(rec, "update")?;
    settled_updatable(rec.state, resources)
}

/// [`updatable`] for a settled state.
fn settled_updatable(state: State, resources: bool) -> Result<()> {
    match state {
        State::Running | State::Stopped => Ok(()),
        State::Failed | State::Quarantined if !resources => Ok(()),
        State::Failed | State::Quarantined => Err(Error::BadState {
            state: state.as_str(),
            operation: "change its resources",
        }),
        // Deleted (and the transitional states, refused before).
        _ => Err(Error::BadState {
            state: state.as_str(),
            operation: "update",
        }),
    }
}

fn shown<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "unset".to_owned(), |v| v.to_string())
}

fn docker_status(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// A refusal of the engine to apply new limits: the caller's to fix (a CPU
/// count above the host's, a memory limit below what the container uses),
/// naming the field; anything else stays an engine error.
fn engine_update_error(e: DockerError) -> Error {
    let (status, message) = match &e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => (*status_code, message.clone()),
        _ => return Error::Docker(e),
    };
    let lower = message.to_ascii_lowercase();
    let field = if lower.contains("cpu") {
        "spec.cpu_limit"
    } else if lower.contains("memory") || lower.contains("swap") {
        "spec.memory_limit_mb"
    } else if lower.contains("pids") {
        "spec.pids_limit"
    } else {
        "spec"
    };
    let refused = status == 400 || (status == 500 && field == "spec.memory_limit_mb");
    if refused {
        Error::EngineRefused {
            field: field.to_owned(),
            reason: message,
        }
    } else {
        Error::Docker(e)
    }
}

/// What one update changes, decided before anything is changed.
struct Plan {
    paths: Vec<Path>,
    name: Option<String>,
    labels: Option<String>,
    /// The new spec and the id of its clearance.
    resources: Option<(ContainerSpec, String)>,
}

impl Orchestrator {
    /// Applies an update (see the module documentation). Idempotent by
    /// the caller's `request_id` ([`update_key`]).
    pub async fn update(&self, req: UpdateRequest) -> Result<EnvRecord> {
        if req.request_id.trim().is_empty() {
            return Err(Error::InvalidArgument {
                field: "request_id",
                reason: "must not be empty".into(),
            });
        }
        let rec = self.get(&req.environment_id).await?;
        if rec.update_request_id == update_key(&req.caller, &req.request_id) {
            return Ok(rec);
        }
        let result = self.update_audited(rec.clone(), &req).await;
        match &result {
            // Audited as `clearance.rejected`; a test crash as a crash.
            Err(Error::Clearance(_) | Error::SimulatedCrash) | Ok(_) => {}
            Err(e) => self.audit_update_failure(&rec, &req, e).await?,
        }
        result
    }

    async fn update_audited(&self, rec: EnvRecord, req: &UpdateRequest) -> Result<EnvRecord> {
        let mut paths = req
            .update_mask
            .iter()
            .map(|p| Path::parse(p))
            .collect::<Result<Vec<_>>>()?;
        paths.sort();
        paths.dedup();
        if paths.is_empty() {
            return Err(Error::InvalidArgument {
                field: "update_mask",
                reason: "must name at least one path".into(),
            });
        }
        let resources = paths.iter().any(|p| p.is_resource());
        // Refused at once, without waiting for the environment's lock.
        updatable(&rec, resources)?;
        // An operation in progress is refused, never waited for.
        let (_guard, mut rec) = self.lock_settled(&rec.id, "update").await?;
        if rec.update_request_id == update_key(&req.caller, &req.request_id) {
            return Ok(rec);
        }
        updatable(&rec, resources)?;
        if !rec.pending_update.is_empty() {
            // A crash left an update half done: finish its rollback first.
            self.roll_back_update(&rec).await?;
            rec = self.get(&rec.id).await?;
        }
        let plan = self.plan(&rec, req, paths).await?;
        self.apply(&rec, req, plan).await
    }

    /// Checks the request and its clearance; nothing is changed yet.
    async fn plan(&self, rec: &EnvRecord, req: &UpdateRequest, paths: Vec<Path>) -> Result<Plan> {
        let name = if paths.contains(&Path::Name) {
            if req.name.trim().is_empty() {
                return Err(Error::InvalidArgument {
                    field: "name",
                    reason: "must not be empty".into(),
                });
            }
            Some(req.name.clone())
        } else {
            None
        };
        let labels = paths
            .contains(&Path::Labels)
            .then(|| labels_json(&req.labels));
        let resources = if paths.iter().any(|p| p.is_resource()) {
            let Some(spec) = req.spec.clone() else {
                return Err(Error::InvalidArgument {
                    field: "spec",
                    reason: "is required to change resources".into(),
                });
            };
            let clearance_id = self.verify_clearance(rec, req, &spec).await?;
            check_resources_only(&Self::spec_of(rec), &spec, &paths)?;
            Some((spec, clearance_id))
        } else {
            None
        };
        Ok(Plan {
            paths,
            name,
            labels,
            resources,
        })
    }

    /// Verifies the clearance against exactly the new spec, the
    /// environment and its team (a refusal is audited as
    /// `clearance.rejected`); its id.
    async fn verify_clearance(
        &self,
        rec: &EnvRecord,
        req: &UpdateRequest,
        spec: &ContainerSpec,
    ) -> Result<String> {
        let Some(clearance) = &req.clearance else {
            return Err(self.reject_update(rec, req, Rejection::Missing).await);
        };
        let ring = self.inner.keys.ring_for(&clearance.key_id).await?;
        let expected = Expected {
            spec,
            environment_id: &rec.id,
            team_id: &rec.team_id,
        };
        match vibebox_clearance::verify(clearance, &ring, expected, SystemTime::now()) {
            Ok(body) => {
                if Store::clearance_used(self.inner.store.db(), &body.clearance_id).await? {
                    return Err(self.reject_update(rec, req, Rejection::Replayed).await);
                }
                Ok(body.clearance_id)
            }
            Err(e) => Err(self.reject_update(rec, req, Rejection::Invalid(e)).await),
        }
    }

    async fn reject_update(&self, rec: &EnvRecord, req: &UpdateRequest, why: Rejection) -> Error {
        let audited = self
            .inner
            .audit
            .record(Event {
                action: "clearance.rejected",
                outcome: Outcome::Denied,
                severity: Severity::Critical,
                caller: Some(&req.caller),
                team_id: &rec.team_id,
                environment_id: &rec.id,
                details: vec![
                    ("reason", why.to_string()),
                    ("operation", "environment.update".to_owned()),
                ],
            })
            .await;
        tracing::warn!(environment = %rec.id, reason = %why, "update clearance rejected");
        match audited {
            Ok(()) => Error::Clearance(why),
            Err(e) => Error::Audit(e),
        }
    }

    /// Admission, engine, audit, commit; every failure after the
    /// reservation restores what was there.
    async fn apply(&self, rec: &EnvRecord, req: &UpdateRequest, plan: Plan) -> Result<EnvRecord> {
        let stored = Self::spec_of(rec);
        if let Some((spec, clearance_id)) = &plan.resources {
            match self.reserve(rec, spec, clearance_id, &req.request_id).await {
                Ok(()) => {}
                // Used meanwhile by a concurrent request.
                Err(Error::Clearance(why)) => return Err(self.reject_update(rec, req, why).await),
                Err(e) => return Err(e),
            }
            let Some(cid) = rec.container_id.as_deref() else {
                self.release(rec).await?;
                return Err(Error::BadState {
                    state: rec.state.as_str(),
                    operation: "change its resources",
                });
            };
            if let Err(e) = self
                .inner
                .runtime
                .update_container(cid, update_body(spec))
                .await
            {
                self.release(rec).await?;
                return Err(engine_update_error(e));
            }
            // As if killed here: the update stays pending for reconcile.
            self.crash_at(CrashPoint::AfterUpdate)?;
        }
        let details = self.details(rec, &stored, &plan);
        let recorded = self
            .inner
            .audit
            .record(Event {
                action: "environment.update",
                outcome: Outcome::Success,
                severity: Severity::Low,
                caller: Some(&req.caller),
                team_id: &rec.team_id,
                environment_id: &rec.id,
                details,
            })
            .await;
        let committed = match recorded {
            Ok(()) => self.commit(rec, req, &plan).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = committed {
            if plan.resources.is_some() {
                self.restore(rec).await;
            }
            return Err(e);
        }
        self.get(&rec.id).await
    }

    /// Judges the new reservation and holds the larger of the old and the
    /// new one (with the clearance recorded as used and the update marked
    /// pending) in one serialized write transaction.
    async fn reserve(
        &self,
        rec: &EnvRecord,
        spec: &ContainerSpec,
        clearance_id: &str,
        request_id: &str,
    ) -> Result<()> {
        let s = &self.inner.settings;
        let _admission = self.inner.admission.lock().await;
        let txn = self.inner.store.begin_immediate().await?;
        if Store::clearance_used(&txn, clearance_id).await? {
            return Err(Error::Clearance(Rejection::Replayed));
        }
        let live = Store::live_in(&txn, &s.installation).await?;
        let others: Vec<&EnvRecord> = live
            .iter()
            .filter(|r| r.state != State::Failed && r.id != rec.id)
            .collect();
        let team: Vec<Reservation> = others
            .iter()
            .filter(|r| r.team_id == rec.team_id)
            .map(|r| reservation(r))
            .collect();
        let all: Vec<Reservation> = others.iter().map(|r| reservation(r)).collect();
        let current = live
            .iter()
            .find(|r| r.id == rec.id)
            .map(reservation)
            .unwrap_or_else(|| reservation(rec));
        let wanted = reservation_of(spec);
        let capacity = admission::Capacity {
            host_memory_bytes: self.inner.host_memory,
            share: s.host_memory_share,
        };
        match admission::admit_resize(&team, &all, current, wanted, &s.quotas, &capacity) {
            Ok(()) => {}
            Err(Refusal::Quota(exceeded)) => {
                return Err(Error::Quota {
                    team: rec.team_id.clone(),
                    exceeded,
                });
            }
            Err(Refusal::Capacity(why)) => return Err(Error::Capacity(why)),
            // Not judged by a resize.
            Err(Refusal::Replayed) => return Err(Error::Clearance(Rejection::Replayed)),
            Err(Refusal::IdTaken) => return Err(Error::AlreadyExists(rec.id.clone())),
            Err(Refusal::SubnetsExhausted) => return Err(Error::SubnetsExhausted),
        }
        store::used_clearance::ActiveModel {
            clearance_id: Set(clearance_id.to_owned()),
            environment_id: Set(rec.id.clone()),
            used_time_ms: Set(store::now_ms()),
        }
        .insert(&txn)
        .await
        .map_err(StoreError::from)?;
        environment::Entity::update_many()
            .col_expr(
                environment::Column::NanoCpus,
                Expr::value(current.nano_cpus.max(wanted.nano_cpus)),
            )
            .col_expr(
                environment::Column::MemoryBytes,
                Expr::value(current.memory_bytes.max(wanted.memory_bytes)),
            )
            .col_expr(environment::Column::PendingUpdate, Expr::value(request_id))
            .filter(environment::Column::Id.eq(&rec.id))
            .exec(&txn)
            .await
            .map_err(StoreError::from)?;
        txn.commit().await.map_err(StoreError::from)?;
        self.inner.store.changes().publish(&rec.id);
        Ok(())
    }

    /// Gives a record back the reservation of its stored spec and clears
    /// its pending update.
    async fn release(&self, rec: &EnvRecord) -> Result<()> {
        let held = reservation_of(&Self::spec_of(rec));
        environment::Entity::update_many()
            .col_expr(environment::Column::NanoCpus, Expr::value(held.nano_cpus))
            .col_expr(
                environment::Column::MemoryBytes,
                Expr::value(held.memory_bytes),
            )
            .col_expr(environment::Column::PendingUpdate, Expr::value(""))
            .filter(environment::Column::Id.eq(&rec.id))
            .exec(self.inner.store.db())
            .await
            .map_err(StoreError::from)?;
        self.inner.store.changes().publish(&rec.id);
        Ok(())
    }

    /// After the engine applied new limits but the update could not be
    /// committed: the old limits back on the container, the old
    /// reservation back on the record. What cannot be restored now stays
    /// pending for reconcile.
    async fn restore(&self, rec: &EnvRecord) {
        if let Some(cid) = rec.container_id.as_deref() {
            let body = update_body(&Self::spec_of(rec));
            if let Err(e) = self.inner.runtime.update_container(cid, body).await {
                tracing::warn!(environment = %rec.id, error = %e,
                    "cannot restore the limits of a failed update; reconcile will");
                return;
            }
        }
        if let Err(e) = self.release(rec).await {
            tracing::warn!(environment = %rec.id, error = %e,
                "cannot release the reservation of a failed update; reconcile will");
        }
    }

    /// Commits the update in one statement (and announces it).
    async fn commit(&self, rec: &EnvRecord, req: &UpdateRequest, plan: &Plan) -> Result<()> {
        let mut q = environment::Entity::update_many()
            .col_expr(
                environment::Column::UpdateRequestId,
                Expr::value(update_key(&req.caller, &req.request_id)),
            )
            .col_expr(environment::Column::PendingUpdate, Expr::value(""))
            .col_expr(
                environment::Column::UpdateTimeMs,
                Expr::value(store::now_ms()),
            );
        if let Some(name) = &plan.name {
            q = q.col_expr(environment::Column::Name, Expr::value(name.as_str()));
        }
        if let Some(labels) = &plan.labels {
            q = q.col_expr(environment::Column::Labels, Expr::value(labels.as_str()));
        }
        if let Some((spec, clearance_id)) = &plan.resources {
            let wanted = reservation_of(spec);
            q = q
                .col_expr(
                    environment::Column::Spec,
                    Expr::value(prost::Message::encode_to_vec(spec)),
                )
                .col_expr(environment::Column::NanoCpus, Expr::value(wanted.nano_cpus))
                .col_expr(
                    environment::Column::MemoryBytes,
                    Expr::value(wanted.memory_bytes),
                )
                .col_expr(
                    environment::Column::ClearanceId,
                    Expr::value(clearance_id.as_str()),
                );
        }
        q.filter(environment::Column::Id.eq(&rec.id))
            .exec(self.inner.store.db())
            .await
            .map_err(StoreError::from)?;
        self.inner.store.changes().publish(&rec.id);
        Ok(())
    }

    /// The audit details of an update: the paths and each one's old and
    /// new value (never an environment variable).
    fn details(
        &self,
        rec: &EnvRecord,
        stored: &ContainerSpec,
        plan: &Plan,
    ) -> Vec<(&'static str, String)> {
        let paths: Vec<&str> = plan.paths.iter().map(|p| p.as_str()).collect();
        let mut details = vec![("paths", paths.join(","))];
        for path in &plan.paths {
            let change = match (path, &plan.resources) {
                (Path::Name, _) => {
                    format!("{} -> {}", rec.name, plan.name.as_deref().unwrap_or(""))
                }
                (Path::Labels, _) => format!(
                    "{} -> {}",
                    rec.labels,
                    plan.labels.as_deref().unwrap_or("{}")
                ),
                (Path::CpuLimit, Some((new, _))) => {
                    format!("{} -> {}", shown(stored.cpu_limit), shown(new.cpu_limit))
                }
                (Path::MemoryLimitMb, Some((new, _))) => format!(
                    "{} -> {}",
                    shown(stored.memory_limit_mb),
                    shown(new.memory_limit_mb)
                ),
                (Path::PidsLimit, Some((new, _))) => {
                    format!("{} -> {}", shown(stored.pids_limit), shown(new.pids_limit))
                }
                (_, None) => continue,
            };
            details.push((path.as_str(), change));
        }
        if let Some((_, clearance_id)) = &plan.resources {
            details.push(("clearance_id", clearance_id.clone()));
        }
        details
    }

    async fn audit_update_failure(
        &self,
        rec: &EnvRecord,
        req: &UpdateRequest,
        error: &Error,
    ) -> Result<()> {
        self.inner
            .audit
            .record(Event {
                action: "environment.update",
                outcome: Outcome::Failure,
                severity: Severity::Medium,
                caller: Some(&req.caller),
                team_id: &rec.team_id,
                environment_id: &rec.id,
                details: vec![
                    ("paths", req.update_mask.join(",")),
                    ("error", error.to_string()),
                ],
            })
            .await?;
        Ok(())
    }

    /// Rolls back an update a crash left pending (the engine may hold the
    /// new limits, the record still has the old spec): the stored limits
    /// back on the container, the failure audited (once, under a fixed id),
    /// then the reservation of the stored spec committed. Reconcile runs it
    /// before it compares the container with the stored spec; an update
    /// that finds its environment so runs it first.
    pub(crate) async fn roll_back_update(&self, rec: &EnvRecord) -> Result<()> {
        if rec.pending_update.is_empty() {
            return Ok(());
        }
        if let Some(cid) = rec.container_id.as_deref() {
            let body = update_body(&Self::spec_of(rec));
            match self.inner.runtime.update_container(cid, body).await {
                // A container gone is reconcile's to find (lost).
                Err(e) if docker_status(&e) != Some(404) => return Err(e.into()),
                _ => {}
            }
        }
        let action = format!("environment.update.rolled_back {}", rec.pending_update);
        self.inner
            .audit
            .record_once(
                crate::audit::once_id(&rec.id, &action),
                Event {
                    action: "environment.update",
                    outcome: Outcome::Failure,
                    severity: Severity::Medium,
                    caller: None,
                    team_id: &rec.team_id,
                    environment_id: &rec.id,
                    details: vec![
                        ("reason", "interrupted; rolled back by reconcile".to_owned()),
                        ("request_id", rec.pending_update.clone()),
                    ],
                },
            )
            .await?;
        self.release(rec).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> ContainerSpec {
        ContainerSpec {
            image: "docker.io/vibebox/devbox:1".into(),
            env: BTreeMap::from([("TOKEN".into(), "secret".into())]),
            cpu_limit: Some(0.5),
            memory_limit_mb: Some(128),
            pids_limit: Some(128),
            ..Default::default()
        }
    }

    #[test]
    fn mask_paths_are_updatable_need_a_recreate_or_are_invalid() {
        for p in Path::ALL {
            assert_eq!(Path::parse(p.as_str()).unwrap(), p);
        }
        assert!(Path::parse("spec.cpu_limit").unwrap().is_resource());
        assert!(!Path::parse("labels").unwrap().is_resource());
        for recreate in [
            "spec",
            "spec.image",
            "spec.mounts",
            "spec.egress.mode",
            "spec.env",
        ] {
            match Path::parse(recreate) {
                Err(Error::Update(UpdateRefusal::RequiresRecreate { path })) => {
                    assert_eq!(path, recreate)
                }
                other => panic!("{recreate}: {other:?}"),
            }
        }
        for invalid in [
            "", "team_id", "state", "id", "*", "specs", "labels.a", "Name",
        ] {
            assert!(
                matches!(
                    Path::parse(invalid),
                    Err(Error::InvalidArgument {
                        field: "update_mask",
                        ..
                    })
                ),
                "{invalid}"
            );
        }
    }

    #[test]
    fn only_the_named_resources_may_differ() {
        let old = stored();
        let mut new = old.clone();
        new.cpu_limit = Some(1.0);
        new.pids_limit = Some(256);
        assert_eq!(
            check_resources_only(&old, &new, &[Path::CpuLimit, Path::PidsLimit]),
            Ok(())
        );
        // A resource the mask does not name: made from an older record.
        assert_eq!(
            check_resources_only(&old, &new, &[Path::CpuLimit]),
            Err(UpdateRefusal::ChangedMeanwhile)
        );
        // Anything else needs a new container, named.
        let mut image = new.clone();
        image.image = "docker.io/vibebox/other:1".into();
        assert_eq!(
            check_resources_only(&old, &image, &[Path::CpuLimit, Path::PidsLimit]),
            Err(UpdateRefusal::RequiresRecreate {
                path: "spec.image".into()
            })
        );
        let mut env = new.clone();
        env.env.insert("MORE".into(), "x".into());
        assert_eq!(
            check_resources_only(&old, &env, &[Path::CpuLimit, Path::PidsLimit]),
            Err(UpdateRefusal::RequiresRecreate {
                path: "spec.env".into()
            })
        );
        let mut privileged = new;
        privileged.privileged = true;
        assert!(check_resources_only(&old, &privileged, &Path::ALL).is_err());
        // Unchanged is fine.
        assert_eq!(
            check_resources_only(&old, &old, &[Path::MemoryLimitMb]),
            Ok(())
        );
    }

    #[test]
    fn the_update_body_pins_swap_to_memory() {
        let body = update_body(&stored());
        assert_eq!(body.nano_cpus, Some(500_000_000));
        assert_eq!(body.memory, Some(128 * 1024 * 1024));
        assert_eq!(body.memory_swap, body.memory, "no swap beyond memory");
        assert_eq!(body.pids_limit, Some(128));
    }

    #[test]
    fn settled_states_decide_what_may_change() {
        assert!(settled_updatable(State::Running, true).is_ok());
        assert!(settled_updatable(State::Stopped, true).is_ok());
        assert!(settled_updatable(State::Failed, false).is_ok());
        assert!(settled_updatable(State::Quarantined, false).is_ok());
        for (state, resources) in [
            (State::Quarantined, true),
            (State::Failed, true),
            (State::Deleted, false),
        ] {
            assert!(
                matches!(
                    settled_updatable(state, resources),
                    Err(Error::BadState { .. })
                ),
                "{state:?}"
            );
        }
    }

    #[test]
    fn engine_refusals_of_new_limits_name_the_field() {
        let refusal = |status_code: u16, message: &str| {
            engine_update_error(DockerError::DockerResponseServerError {
                status_code,
                message: message.into(),
            })
        };
        assert!(matches!(
            refusal(400, "Range of CPUs is from 0.01 to 2.00, as there are only 2 CPUs available"),
            Error::EngineRefused { field, .. } if field == "spec.cpu_limit"
        ));
        assert!(matches!(
            refusal(500, "Cannot update container: failed to write memory.max: device or resource busy"),
            Error::EngineRefused { field, .. } if field == "spec.memory_limit_mb"
        ));
        assert!(matches!(refusal(500, "driver failed"), Error::Docker(_)));
        assert!(matches!(
            refusal(404, "No such container"),
            Error::Docker(_)
        ));
    }

    #[test]
    fn labels_round_trip_through_the_record_column() {
        let labels = BTreeMap::from([
            ("ci".to_owned(), "true".to_owned()),
            ("team/app".to_owned(), "web".to_owned()),
        ]);
        let json = labels_json(&labels);
        assert_eq!(json, r#"{"ci":"true","team/app":"web"}"#);
        assert_eq!(labels_json(&BTreeMap::new()), "{}");
        let parsed: BTreeMap<String, String> = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, labels);
    }
}
