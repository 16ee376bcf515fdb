//! Long-running operations: create, start, stop, restart and delete return
//! as soon as the change is accepted and durable, with the record in its
//! transitional state (`creating`, `starting`, `stopping`, `deleting`); the
//! engine work runs in a background task that holds the environment's lock
//! and settles the record (`running`, `stopped`, `deleted`, `failed`).
//!
//! Rules:
//! - what can be decided at once is decided before anything is committed,
//!   and refused with its error: arguments, clearance, admission, bind
//!   sources, a state the operation does not apply to ([`Error::BadState`]),
//!   and another operation in progress ([`Error::OperationInProgress`]);
//! - a delete is accepted in any state but `deleted` (a second one answers
//!   with the record as it is). During another operation it is committed at
//!   once and runs right after it: the operation in flight is told to give
//!   way ([`Error::Superseded`] at its next step);
//! - every write an operation makes is conditional on the state it expects
//!   ([`crate::store::Store::transition`], [`crate::store::Store::set_progress`]),
//!   so a delete committed meanwhile is never overwritten;
//! - audit first, then commit: a settled record always has its event
//!   durable. Events of start, stop, restart and automatic stops carry an
//!   id made of the environment and the operation id the record keeps, so
//!   reconcile finishing an operation a crash interrupted records it once
//!   (see [`Orchestrator::resume`]);
//! - an engine failure settles the record with a `failure_reason`: a create
//!   becomes `failed` (rolled back); a start that did not happen goes back
//!   to `stopped`, a stop that did not happen back to `running`;
//! - at shutdown, operations get [`OPERATION_GRACE`] to finish and are then
//!   abandoned as a crash would abandon them; the next reconcile pass
//!   finishes them.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bollard::models::CreateImageInfo;
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use vibebox_proto::audit::{Outcome, Severity};

use crate::audit::{Caller, Event};
use crate::hooks::CrashPoint;
use crate::service::{Error, Orchestrator, Result, tolerate_304};
use crate::store::{self, EnvRecord, State, Transition};

/// Progress of an operation once it is accepted.
pub const ADMITTED_PERCENT: i32 = 5;
/// The share of a create's progress an image pull covers.
pub const PULL_PERCENT: Range<i32> = 10..60;
/// Pull progress is written at most this often.
pub const PULL_PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// How long a shutdown waits for operations in flight before abandoning
/// them to reconcile.
pub const OPERATION_GRACE: Duration = Duration::from_secs(3);
/// How long a new operation waits for the environment's lock held by a
/// short platform action (reconcile, an update, a forwarder being made).
const LOCK_PATIENCE: Duration = Duration::from_secs(10);
/// What reconcile says when it finishes an operation.
const FINISHED_BY_RECONCILE: &str = "interrupted; finished by reconcile";

/// A long-running operation (kept in the record while it is in progress).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Create,
    Start,
    Stop,
    Restart,
    Delete,
    /// The lifecycle sweeper's stop of an idle environment.
    AutoStop,
}

impl Operation {
    /// Its stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Start => "start",
            Operation::Stop => "stop",
            Operation::Restart => "restart",
            Operation::Delete => "delete",
            Operation::AutoStop => "auto_stop",
        }
    }

    /// The operation a stored name names.
    pub fn parse(name: &str) -> Option<Self> {
        [
            Operation::Create,
            Operation::Start,
            Operation::Stop,
            Operation::Restart,
            Operation::Delete,
            Operation::AutoStop,
        ]
        .into_iter()
        .find(|op| op.as_str() == name)
    }

    /// The operation in progress on a record: the one it names, or the one
    /// its transitional state implies (a record written by hand).
    pub fn of(rec: &EnvRecord) -> Option<Self> {
        Self::parse(&rec.operation).or(match rec.state {
            State::Creating => Some(Operation::Create),
            State::Starting => Some(Operation::Start),
            State::Stopping => Some(Operation::Stop),
            State::Deleting => Some(Operation::Delete),
            _ => None,
        })
    }

    /// The audit action recording its outcome.
    pub fn action(self) -> &'static str {
        match self {
            Operation::Create => "environment.create",
            Operation::Start => "environment.start",
            Operation::Stop => "environment.stop",
            Operation::Restart => "environment.restart",
            Operation::Delete => "environment.delete",
            Operation::AutoStop => "environment.auto_stop",
        }
    }
}

/// The progress of an image pull, from the engine's messages: the layers
/// it announced and how far each is.
#[derive(Debug, Default)]
pub struct PullProgress {
    layers: HashMap<String, Layer>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Layer {
    current: i64,
    total: i64,
    done: bool,
}

impl PullProgress {
    /// Takes one progress message of the engine into account (messages
    /// about the image as a whole, and unknown ones, change nothing).
    pub fn update(&mut self, info: &CreateImageInfo) {
        let (Some(id), Some(status)) = (info.id.as_deref(), info.status.as_deref()) else {
            return;
        };
        let layer = || Layer::default();
        match status {
            "Pulling fs layer" | "Waiting" => {
                self.layers.entry(id.to_owned()).or_insert_with(layer);
            }
            s if s.starts_with("Downloading") => {
                let entry = self.layers.entry(id.to_owned()).or_insert_with(layer);
                if let Some(d) = &info.progress_detail
                    && let (Some(current), Some(total)) = (d.current, d.total)
                    && total > 0
                {
                    entry.current = current.clamp(0, total);
                    entry.total = total;
                }
            }
            s if s == "Verifying Checksum"
                || s == "Download complete"
                || s.starts_with("Extracting")
                || s == "Pull complete"
                || s == "Already exists" =>
            {
                let entry = self.layers.entry(id.to_owned()).or_insert_with(layer);
                entry.done = true;
                entry.current = entry.total;
            }
            _ => {}
        }
    }

    /// How far the pull is, 0 to 1 (each layer counts the same).
    pub fn fraction(&self) -> f64 {
        if self.layers.is_empty() {
            return 0.0;
        }
        let sum: f64 = self
            .layers
            .values()
            .map(|l| match (l.done, l.total) {
                (true, _) => 1.0,
                (false, 0) => 0.0,
                (false, total) => l.current as f64 / total as f64,
            })
            .sum();
        sum / self.layers.len() as f64
    }

    /// The create's progress while pulling (within [`PULL_PERCENT`]).
    pub fn percent(&self) -> i32 {
        let span = f64::from(PULL_PERCENT.end - PULL_PERCENT.start);
        PULL_PERCENT.start + (span * self.fraction()).floor() as i32
    }

    /// For the status message, e.g. `2 of 5 layers, 12 of 80 MB`.
    pub fn describe(&self) -> String {
        let done = self.layers.values().filter(|l| l.done).count();
        let mut text = format!("{done} of {} layers", self.layers.len());
        let total: i64 = self.layers.values().map(|l| l.total).sum();
        if total > 0 {
            let current: i64 = self.layers.values().map(|l| l.current).sum();
            text.push_str(&format!(
                ", {} of {} MB",
                current / 1_000_000,
                (total + 999_999) / 1_000_000
            ));
        }
        text
    }
}

/// The operations running in the background.
pub(crate) struct Operations {
    tracker: TaskTracker,
    /// Cancelled when a shutdown gives up waiting: operations stop where
    /// they are, as a crash would stop them.
    abandon: CancellationToken,
    /// Per environment: the operation in flight (a ticket, and the token a
    /// delete accepted meanwhile cancels).
    in_flight: std::sync::Mutex<HashMap<String, (u64, CancellationToken)>>,
    next: AtomicU64,
}

impl Default for Operations {
    fn default() -> Self {
        Self {
            tracker: TaskTracker::new(),
            abandon: CancellationToken::new(),
            in_flight: std::sync::Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }
    }
}

impl Operations {
    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, CancellationToken)>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether the record may not take a new operation `requested` now: an
/// operation is in progress on it.
pub fn not_in_progress(rec: &EnvRecord, requested: &'static str) -> Result<()> {
    if !rec.state.is_transitional() {
        return Ok(());
    }
    Err(Error::OperationInProgress {
        state: rec.state.as_str(),
        operation: Operation::of(rec).map_or("operation", Operation::as_str),
        requested,
    })
}

impl Orchestrator {
    /// Runs `work` in the background, holding `guard` (the environment's
    /// lock) until it ends; `work` gets the token a delete accepted
    /// meanwhile cancels.
    pub(crate) fn spawn_operation<F, Fut>(&self, id: &str, guard: OwnedMutexGuard<()>, work: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let ops = &self.inner.ops;
        let cancel = CancellationToken::new();
        let ticket = ops.next.fetch_add(1, Ordering::Relaxed);
        ops.in_flight()
            .insert(id.to_owned(), (ticket, cancel.clone()));
        let work = work(cancel);
        let (this, id) = (self.clone(), id.to_owned());
        let abandon = ops.abandon.clone();
        let task = async move {
            tokio::select! {
                biased;
                () = abandon.cancelled() => {
                    tracing::warn!(environment = %id, "operation abandoned at shutdown; reconcile finishes it");
                }
                () = work => {}
            }
            {
                let mut in_flight = this.inner.ops.in_flight();
                if in_flight.get(&id).is_some_and(|(t, _)| *t == ticket) {
                    in_flight.remove(&id);
                }
            }
            drop(guard);
        };
        ops.tracker.spawn(tracing::Instrument::instrument(
            task,
            tracing::Span::current(),
        ));
    }

    /// Waits for the operations in progress, at most `grace`, then abandons
    /// them (they stop at their next step, as a crash would stop them; the
    /// next reconcile pass finishes them).
    pub async fn shutdown_operations(&self, grace: Duration) {
        let ops = &self.inner.ops;
        ops.tracker.close();
        if tokio::time::timeout(grace, ops.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = ops.tracker.len(),
                "operations still in progress at shutdown: abandoned, reconcile finishes them"
            );
            ops.abandon.cancel();
            ops.tracker.wait().await;
        }
    }

    /// Abandons every operation in progress at once (see
    /// [`shutdown_operations`](Self::shutdown_operations)).
    pub fn abandon_operations(&self) {
        self.inner.ops.tracker.close();
        self.inner.ops.abandon.cancel();
    }

    /// Waits until no operation (nor anything else) holds the environment.
    pub async fn wait_operation(&self, id: &str) {
        drop(self.lock_env(id).await);
    }

    /// Writes the progress of `op` on a record still in `state`; a record
    /// no longer in it was taken over by a delete ([`Error::Superseded`]).
    pub(crate) async fn step(
        &self,
        rec: &EnvRecord,
        state: State,
        op: Operation,
        percent: i32,
        message: &str,
    ) -> Result<()> {
        match self
            .store()
            .set_progress(&rec.id, state, message, percent)
            .await?
        {
            true => Ok(()),
            false => Err(Error::Superseded {
                operation: op.as_str(),
            }),
        }
    }

    /// The environment's lock and its record, for a new operation
    /// `requested`: refused at once while another is in progress (never
    /// waiting for it), waiting at most [`LOCK_PATIENCE`] for a short
    /// platform action that holds it ([`Error::Busy`] then).
    pub async fn lock_settled(
        &self,
        id: &str,
        requested: &'static str,
    ) -> Result<(OwnedMutexGuard<()>, EnvRecord)> {
        not_in_progress(&self.get(id).await?, requested)?;
        let Ok(guard) = tokio::time::timeout(LOCK_PATIENCE, self.lock_env(id)).await else {
            not_in_progress(&self.get(id).await?, requested)?;
            return Err(Error::Busy { requested });
        };
        let rec = self.get(id).await?;
        not_in_progress(&rec, requested)?;
        Ok((guard, rec))
    }

    /// Starts a stopped environment: `starting` at once, then (in the
    /// background) its egress gate and its container, `running`.
    pub async fn start(&self, caller: &Caller, id: &str) -> Result<EnvRecord> {
        self.change_run_state(caller, id, Operation::Start, None)
            .await
    }

    /// Stops a running environment: `stopping` at once, then (in the
    /// background) SIGTERM, SIGKILL after the timeout, the gate stopped,
    /// `stopped`.
    pub async fn stop(&self, caller: &Caller, id: &str, timeout: Option<u32>) -> Result<EnvRecord> {
        self.change_run_state(caller, id, Operation::Stop, timeout)
            .await
    }

    /// Restarts an environment: a running one goes `stopping` then
    /// `starting`, a stopped one `starting`; `running` at the end.
    pub async fn restart(
        &self,
        caller: &Caller,
        id: &str,
        timeout: Option<u32>,
    ) -> Result<EnvRecord> {
        self.change_run_state(caller, id, Operation::Restart, timeout)
            .await
    }

    /// The state `op` moves a record in `state` to, if it applies.
    fn run_state_target(op: Operation, state: State) -> Option<State> {
        match (op, state) {
            (Operation::Start | Operation::Restart, State::Stopped) => Some(State::Starting),
            (Operation::Stop | Operation::Restart, State::Running) => Some(State::Stopping),
            _ => None,
        }
    }

    async fn change_run_state(
        &self,
        caller: &Caller,
        id: &str,
        op: Operation,
        timeout: Option<u32>,
    ) -> Result<EnvRecord> {
        let seen = self.get(id).await?;
        let locked = self
            .lock_settled(id, op.as_str())
            .await
            .and_then(|(guard, rec)| {
                let target = Self::run_state_target(op, rec.state).ok_or(Error::BadState {
                    state: rec.state.as_str(),
                    operation: op.as_str(),
                })?;
                rec.container_id.as_ref().ok_or(Error::NotFound)?;
                Ok((guard, rec, target))
            });
        let (guard, rec, target) = match locked {
            Ok(locked) => locked,
            Err(e) => {
                // Refusals are audited, as they always were.
                let refused = Err(e);
                self.audit_op(op.action(), Some(caller), &seen, &refused)
                    .await?;
                return refused;
            }
        };
        let operation_id = uuid::Uuid::new_v4().to_string();
        let message = match target {
            State::Stopping => "stopping",
            _ => "starting",
        };
        let moved = self
            .store()
            .transition(
                id,
                &[rec.state],
                target,
                Transition {
                    status_message: Some(message),
                    progress_percent: Some(ADMITTED_PERCENT),
                    operation: Some((op.as_str(), &operation_id)),
                    ..Transition::default()
                },
            )
            .await?;
        if !moved {
            // A delete was accepted meanwhile (the only change made without
            // the lock).
            not_in_progress(&self.get(id).await?, op.as_str())?;
            return Err(Error::Busy {
                requested: op.as_str(),
            });
        }
        let accepted = self.get(id).await?;
        let (this, caller, rec) = (self.clone(), caller.clone(), accepted.clone());
        self.spawn_operation(id, guard, move |cancel| async move {
            let result = this.run_state_change(op, &rec, timeout, &cancel).await;
            if let Err(e) = this
                .conclude(op, Some(&caller), &rec, result, Vec::new())
                .await
            {
                tracing::warn!(environment = %rec.id, operation = op.as_str(), error = %e, "operation not settled; reconcile finishes it");
            }
        });
        Ok(accepted)
    }

    /// The engine work of a start, stop or restart of `rec` (in `starting`
    /// or `stopping`).
    pub(crate) async fn run_state_change(
        &self,
        op: Operation,
        rec: &EnvRecord,
        timeout: Option<u32>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        match (op, rec.state) {
            (Operation::Restart, _) => self.do_restart(rec, timeout, cancel).await,
            (_, State::Starting) => self.do_start(rec, op, cancel).await,
            (_, State::Stopping) => self.do_stop(rec, op, timeout, cancel).await,
            _ => Ok(()),
        }
    }

    /// Stops the container of a record in `stopping` (and, unless this is
    /// the first half of a restart, its egress gate); its forwarder goes.
    async fn do_stop(
        &self,
        rec: &EnvRecord,
        op: Operation,
        timeout: Option<u32>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let cid = rec.container_id.clone().ok_or(Error::NotFound)?;
        self.step(rec, State::Stopping, op, 30, "stopping the container")
            .await?;
        let t = timeout.unwrap_or(self.inner.settings.default_stop_timeout);
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        let stopped = tokio::select! {
            biased;
            () = cancel.cancelled() => return Err(Error::Superseded { operation: op.as_str() }),
            stopped = self.inner.runtime.stop_container(&cid, t) => stopped,
        };
        // The forwarder goes whatever the engine answered (a restarted
        // container has a new network namespace).
        self.remove_forwarder_logged(&rec.id).await;
        tolerate_304(stopped)?;
        if op != Operation::Restart {
            if Self::gate_of(rec).is_some() {
                self.step(rec, State::Stopping, op, 80, "stopping the egress gate")
                    .await?;
            }
            // The environment is stopped: a gate that would not stop is
            // stopped by reconcile (which stops a stopped environment's).
            if let Err(e) = self.gate_stop(rec).await {
                tracing::warn!(environment = %rec.id, error = %e, "cannot stop the egress gate");
            }
        }
        self.crash_at(CrashPoint::AfterStop)?;
        Ok(())
    }

    /// Starts the egress gate and the container of a record in `starting`.
    async fn do_start(
        &self,
        rec: &EnvRecord,
        op: Operation,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let cid = rec.container_id.clone().ok_or(Error::NotFound)?;
        let (gate, container) = match op {
            Operation::Restart => (60, 80),
            _ => (30, 60),
        };
        if Self::gate_of(rec).is_some() {
            self.step(rec, State::Starting, op, gate, "starting the egress gate")
                .await?;
        }
        if cancel.is_cancelled() {
            return Err(Error::Superseded {
                operation: op.as_str(),
            });
        }
        self.gate_up(rec).await?;
        self.step(
            rec,
            State::Starting,
            op,
            container,
            "starting the container",
        )
        .await?;
        // A refusal of the spec (a mount the runtime cannot make now, ...)
        // is the caller's to fix, as on create.
        tolerate_304(self.inner.runtime.start_container(&cid).await)
            .map_err(|e| self.engine_error(rec, e))?;
        self.crash_at(CrashPoint::AfterStart)?;
        Ok(())
    }

    /// A restart: the stop half (if the record is `stopping`), `starting`,
    /// the start half.
    async fn do_restart(
        &self,
        rec: &EnvRecord,
        timeout: Option<u32>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let op = Operation::Restart;
        if rec.state == State::Stopping {
            self.do_stop(rec, op, timeout, cancel).await?;
            let moved = self
                .store()
                .transition(
                    &rec.id,
                    &[State::Stopping],
                    State::Starting,
                    Transition {
                        status_message: Some("starting"),
                        progress_percent: Some(50),
                        ..Transition::default()
                    },
                )
                .await?;
            if !moved {
                return Err(Error::Superseded {
                    operation: op.as_str(),
                });
            }
        }
        self.do_start(rec, op, cancel).await
    }

    /// Settles a start, stop, restart or automatic stop: its event first
    /// (`details`, plus the error of a failure), under an id made of the
    /// environment and the operation id, then the state, only from
    /// `starting` or `stopping` (a delete accepted meanwhile keeps its
    /// `deleting`). A success ends `running` or `stopped`; a failure goes
    /// back to what the container still is (`stopped` when the start did
    /// not happen, `running` when the stop did not) with the failure as
    /// `failure_reason`. A simulated crash leaves everything as it is.
    pub(crate) async fn conclude(
        &self,
        op: Operation,
        caller: Option<&Caller>,
        rec: &EnvRecord,
        result: Result<()>,
        mut details: Vec<(&'static str, String)>,
    ) -> Result<()> {
        if let Err(Error::SimulatedCrash) = result {
            return Err(Error::SimulatedCrash);
        }
        let now = self.get(&rec.id).await?;
        let (outcome, severity) = match &result {
            Ok(()) => (Outcome::Success, Severity::Low),
            Err(e) => {
                details.push(("error", e.to_string()));
                (Outcome::Failure, Severity::Medium)
            }
        };
        let event = Event {
            action: op.action(),
            outcome,
            severity,
            caller,
            team_id: &rec.team_id,
            environment_id: &rec.id,
            details,
        };
        if rec.operation_id.is_empty() {
            self.audit().record(event).await?;
        } else {
            let name = format!("{} {}", op.action(), rec.operation_id);
            self.audit()
                .record_once(crate::audit::once_id(&rec.id, &name), event)
                .await?;
        }
        let (state, failure) = match &result {
            Ok(()) => match op {
                Operation::Stop | Operation::AutoStop => (State::Stopped, String::new()),
                _ => (State::Running, String::new()),
            },
            Err(e) => match now.state {
                State::Starting => (State::Stopped, format!("{} failed: {e}", op.as_str())),
                _ => (State::Running, format!("{} failed: {e}", op.as_str())),
            },
        };
        // A person's operation clears the platform's stop reason; an
        // automatic stop keeps the one it recorded. Running is activity.
        let stop_reason = (op != Operation::AutoStop).then_some("");
        let last_activity_ms = (state == State::Running).then(store::now_ms);
        self.store()
            .transition(
                &rec.id,
                &[State::Starting, State::Stopping],
                state,
                Transition {
                    failure_reason: Some(&failure),
                    status_message: Some(""),
                    stop_reason,
                    last_activity_ms,
                    ..Transition::default()
                },
            )
            .await?;
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(environment = %rec.id, operation = op.as_str(), error = %e, "operation failed");
                Ok(())
            }
        }
    }

    /// Finishes what a crash (or an abandoned shutdown) interrupted on a
    /// record in `starting` or `stopping`, from where the engine is: the
    /// start, stop, restart or automatic stop it records is done again
    /// (each engine step is idempotent), audited under the operation's own
    /// event id (once, even if the interrupted process wrote it), and
    /// settled. Called by reconcile with the environment's lock held.
    pub(crate) async fn resume(&self, rec: &EnvRecord) -> Result<()> {
        let op = match (rec.state, Operation::of(rec)) {
            (State::Starting, Some(op @ (Operation::Start | Operation::Restart))) => op,
            (State::Starting, _) => Operation::Start,
            (
                State::Stopping,
                Some(op @ (Operation::Stop | Operation::Restart | Operation::AutoStop)),
            ) => op,
            (State::Stopping, _) => Operation::Stop,
            _ => return Ok(()),
        };
        let never = CancellationToken::new();
        let mut details = vec![("reason", FINISHED_BY_RECONCILE.to_owned())];
        if op == Operation::AutoStop {
            details = vec![
                ("reason", rec.stop_reason.clone()),
                ("detail", FINISHED_BY_RECONCILE.to_owned()),
            ];
        }
        let result = self.run_state_change(op, rec, None, &never).await;
        self.conclude(op, None, rec, result, details).await
    }

    /// Moves a settled record to `deleting` (only from the state it was
    /// read in; the drift event a quarantine still owes is written first).
    /// Returns whether it moved.
    async fn accept_delete(&self, rec: &EnvRecord) -> Result<bool> {
        if Self::drift_event_pending(rec) {
            self.record_drift(rec, &rec.failure_reason).await?;
        }
        let operation_id = uuid::Uuid::new_v4().to_string();
        Ok(self
            .store()
            .transition(
                &rec.id,
                &[rec.state],
                State::Deleting,
                Transition {
                    // A person's delete clears the platform's stop reason.
                    stop_reason: Some(""),
                    status_message: Some("deleting"),
                    progress_percent: Some(ADMITTED_PERCENT),
                    operation: Some((Operation::Delete.as_str(), &operation_id)),
                    ..Transition::default()
                },
            )
            .await?)
    }

    /// Deletes an environment's container, network and volume; the record
    /// stays as `deleted`. Accepted in any state: `deleting` is committed at
    /// once and the removal runs in the background, right after the
    /// operation in flight if there is one (which is told to give way). A
    /// deleted or deleting environment is answered as it is.
    pub async fn delete(&self, caller: &Caller, id: &str) -> Result<EnvRecord> {
        let mut rec = self.get(id).await?;
        if matches!(rec.state, State::Deleted | State::Deleting) {
            return Ok(rec);
        }
        if let Some(guard) = self.try_lock_env(id) {
            let rec = self.get(id).await?;
            if matches!(rec.state, State::Deleted | State::Deleting) {
                return Ok(rec);
            }
            if !self.accept_delete(&rec).await? {
                return Err(Error::Busy {
                    requested: "delete",
                });
            }
            let accepted = self.get(id).await?;
            let (this, caller, rec) = (self.clone(), caller.clone(), accepted.clone());
            self.spawn_operation(id, guard, move |_| async move {
                this.run_delete(rec, caller).await;
            });
            return Ok(accepted);
        }
        // Something holds the environment (an operation in flight, or a
        // short platform action): the delete is committed now and runs once
        // it is done. The record may change meanwhile; try on the new one.
        for _ in 0..8 {
            if self.accept_delete(&rec).await? {
                self.cancel_in_flight(id);
                self.spawn_deferred_delete(id, caller.clone());
                return self.get(id).await;
            }
            rec = self.get(id).await?;
            if matches!(rec.state, State::Deleted | State::Deleting) {
                return Ok(rec);
            }
        }
        Err(Error::Busy {
            requested: "delete",
        })
    }

    /// Tells the operation in flight on an environment to give way.
    fn cancel_in_flight(&self, id: &str) {
        if let Some((_, cancel)) = self.inner.ops.in_flight().get(id) {
            cancel.cancel();
        }
    }

    /// A delete committed while something held the environment: runs once
    /// the lock is free, if the record still waits for it.
    fn spawn_deferred_delete(&self, id: &str, caller: Caller) {
        let (this, id) = (self.clone(), id.to_owned());
        let abandon = self.inner.ops.abandon.clone();
        let task = async move {
            tokio::select! {
                biased;
                () = abandon.cancelled() => {
                    tracing::warn!(environment = %id, "delete abandoned at shutdown; reconcile finishes it");
                }
                () = async {
                    let guard = this.lock_env(&id).await;
                    match this.get(&id).await {
                        Ok(rec) if rec.state == State::Deleting => this.run_delete(rec, caller).await,
                        // Finished meanwhile (by reconcile).
                        Ok(_) => {}
                        Err(e) => tracing::warn!(environment = %id, error = %e, "cannot read the environment to delete"),
                    }
                    drop(guard);
                } => {}
            }
        };
        self.inner
            .ops
            .tracker
            .spawn(tracing::Instrument::instrument(
                task,
                tracing::Span::current(),
            ));
    }

    /// The background half of a delete: the removal, its event, `deleted`
    /// (see [`delete_locked`](Self::delete_locked)). A failure is audited
    /// and leaves `deleting`, which the next reconcile pass finishes.
    async fn run_delete(&self, rec: EnvRecord, caller: Caller) {
        let Err(e) = self.delete_locked(&rec, Some(&caller)).await else {
            return;
        };
        tracing::warn!(environment = %rec.id, error = %e, "delete failed; reconcile finishes it");
        let failed: Result<EnvRecord> = Err(e);
        if let Err(ae) = self
            .audit_op("environment.delete", Some(&caller), &rec, &failed)
            .await
        {
            tracing::warn!(environment = %rec.id, error = %ae, "delete failure not audited");
        }
        if let Err(e) = failed {
            let message = format!("delete failed, reconcile retries it: {e}");
            let _ = self
                .store()
                .set_progress(&rec.id, State::Deleting, &message, ADMITTED_PERCENT)
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::ProgressDetail;

    fn info(id: &str, status: &str, progress: Option<(i64, i64)>) -> CreateImageInfo {
        CreateImageInfo {
            id: Some(id.into()),
            status: Some(status.into()),
            progress_detail: progress.map(|(current, total)| ProgressDetail {
                current: Some(current),
                total: Some(total),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn operations_round_trip_their_names() {
        for op in [
            Operation::Create,
            Operation::Start,
            Operation::Stop,
            Operation::Restart,
            Operation::Delete,
            Operation::AutoStop,
        ] {
            assert_eq!(Operation::parse(op.as_str()), Some(op));
            assert!(op.action().starts_with("environment."));
        }
        assert_eq!(Operation::parse(""), None);
    }

    #[test]
    fn pull_progress_counts_layers_and_bytes_and_ignores_image_lines() {
        let mut p = PullProgress::default();
        // The tag's own line is not a layer.
        p.update(&info("1.2", "Pulling from library/x", None));
        assert_eq!(p.percent(), PULL_PERCENT.start);
        assert_eq!(p.describe(), "0 of 0 layers");
        p.update(&info("a", "Pulling fs layer", None));
        p.update(&info("b", "Waiting", None));
        p.update(&info("a", "Downloading", Some((50_000_000, 100_000_000))));
        assert!((p.fraction() - 0.25).abs() < 1e-9, "{}", p.fraction());
        assert_eq!(p.percent(), PULL_PERCENT.start + 12);
        assert_eq!(p.describe(), "0 of 2 layers, 50 of 100 MB");
        p.update(&info("a", "Download complete", None));
        p.update(&info("b", "Already exists", None));
        assert_eq!(p.percent(), PULL_PERCENT.end);
        assert_eq!(p.describe(), "2 of 2 layers, 100 of 100 MB");
        // Nonsense does not move it past the end.
        p.update(&info("a", "Downloading", Some((500, 100))));
        assert!(p.percent() <= PULL_PERCENT.end);
    }
}
