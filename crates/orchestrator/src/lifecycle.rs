//! Idle stop and lifetimes: activity tracking, extensions and the sweeper.
//!
//! Activity is an open exec, port-forward or copy session
//! ([`Orchestrator::session`]), a touch ([`Orchestrator::touch`]) or CPU use
//! above the environment's `idle_cpu_percent`. Sessions are counted in
//! memory; the last activity is persisted by every sweep (an open session
//! counts as activity at each sweep), so a restarted orchestrator judges
//! idleness from the database, at most one sweep behind.
//!
//! Every sweep:
//! 1. persists the activity seen since the last one;
//! 2. deletes the environments whose expiry passed (audited
//!    `environment.expire`, then the delete path of `DeleteEnvironment`);
//! 3. samples the CPU of the running environments whose idle deadline is
//!    near (a one-shot stats call each, a few at a time: an installation
//!    with hundreds of environments asks Docker only about the few close to
//!    stopping), and stops those that stayed idle past their deadline
//!    (graceful stop, workspace kept; audited `environment.auto_stop`).
//!
//! CPU use is measured as the average over the time between two samples
//! (the container's cumulative CPU time), so one sample only sets a
//! baseline: an environment is never stopped on a single sample.
//!
//! Extensions (`ExtendEnvironment`, [`Orchestrator::extend`]) have two
//! parts. The expiry part pushes the expiry to at least `now + duration`,
//! never past creation plus the policy's `max_lifetime` (beyond it:
//! FAILED_PRECONDITION `lifetime.max_lifetime`). The keep-alive part keeps
//! the environment from idling until `now + duration`, but never more than
//! [`MAX_KEEP_ALIVE`] (24 hours) ahead and never past the expiry: a longer
//! request still succeeds, with the keep-alive cut to 24 hours (rule
//! `lifetime.max_keep_alive`, audited as the `keep_alive_capped` detail of
//! `environment.extend`), and the answer carries the times applied. So an
//! environment nobody uses stops at most 24 hours plus its idle timeout
//! after the last extension, whatever its `max_lifetime` (never, by
//! default): only a person extending again (audited) keeps it longer.
//!
//! Invariants:
//! - an environment with an open session is never stopped for idleness, and
//!   the check and the stop are atomic against opening sessions that need
//!   the container running (exec, port-forward): once an automatic stop is
//!   decided (under the tracker's lock, with no session open), such a
//!   session is refused with FAILED_PRECONDITION "environment is stopping"
//!   until the stop is committed (then the environment is stopped);
//! - deadlines live in the database (`expire_at_ms`, `keep_alive_until_ms`,
//!   `last_activity_ms`): what came due while the orchestrator was down is
//!   applied by the first sweep, which runs after the first reconcile pass;
//! - the automatic stop and delete are audited with their reason before the
//!   new state is committed (as for a person's stop and delete).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::query_parameters::StatsOptionsBuilder;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use vibebox_proto::audit::{Outcome, Severity};
use vibebox_proto::environment::ContainerSpec;

use crate::audit::{Caller, Event};
use crate::service::{Error, Orchestrator, Result};
use crate::store::{self, EnvRecord, State};

/// CPU use (percent of one core) under which an environment is idle, when
/// its spec sets no threshold.
pub const DEFAULT_IDLE_CPU_PERCENT: f64 = 5.0;
/// The shortest extension.
pub const MIN_EXTENSION: Duration = Duration::from_secs(60);
/// The longest extension.
pub const MAX_EXTENSION: Duration = Duration::from_secs(7 * 24 * 3600);
/// How far ahead an extension may keep an environment from idling (rule
/// `lifetime.max_keep_alive`): a longer extension is cut to it (the expiry
/// part is not).
pub const MAX_KEEP_ALIVE: Duration = Duration::from_secs(24 * 3600);
/// Stats calls in flight at once during a sweep (each waits for the
/// engine's next collection, about a second; the engine collects for every
/// container on one tick, so waiting callers cost it little).
const SAMPLE_CONCURRENCY: usize = 32;
/// Automatic stops in flight at once (each may wait for its stop timeout).
const STOP_CONCURRENCY: usize = 8;
/// How long one stats call may take.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest time between two CPU samples that is judged.
const MIN_SAMPLE_WINDOW: Duration = Duration::from_millis(200);
/// The longest time between two CPU samples that is always judged (longer
/// ones only up to three sweep intervals). The engine hands out a new
/// sample about once a second, whatever the sweep interval.
const MIN_JUDGED_WINDOW: Duration = Duration::from_secs(10);

/// The idle and lifetime limits of a spec (unset means never, and the
/// default CPU threshold).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub idle_timeout: Option<Duration>,
    pub idle_cpu_percent: f64,
    pub lifetime: Option<Duration>,
    pub max_lifetime: Option<Duration>,
}

impl Limits {
    /// The limits a (hardened) spec carries.
    pub fn of(spec: &ContainerSpec) -> Limits {
        let l = spec.lifetime.unwrap_or_default();
        let secs = |s: Option<u32>| {
            s.filter(|s| *s > 0)
                .map(|s| Duration::from_secs(u64::from(s)))
        };
        Limits {
            idle_timeout: secs(l.idle_timeout_seconds),
            idle_cpu_percent: l
                .idle_cpu_percent
                .filter(|p| p.is_finite() && *p >= 0.0)
                .unwrap_or(DEFAULT_IDLE_CPU_PERCENT),
            lifetime: secs(l.lifetime_seconds),
            max_lifetime: secs(l.max_lifetime_seconds),
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// When an environment created at `create_ms` with `spec` expires.
pub fn expire_at(spec: &ContainerSpec, create_ms: i64) -> Option<i64> {
    Limits::of(spec)
        .lifetime
        .map(|l| create_ms.saturating_add(ms(l)))
}

/// The last activity a record shows (persisted; a record of an earlier
/// version without one counts from its last update).
fn persisted_activity(rec: &EnvRecord) -> i64 {
    rec.last_activity_ms.unwrap_or(rec.update_time_ms)
}

/// When a running environment stops if it stays idle: its last activity (or
/// the end of its extension, whichever is later) plus its idle timeout;
/// `None` when it is not running or has no idle timeout. `seen` is activity
/// known in memory and not persisted yet.
pub fn idle_stop_at(rec: &EnvRecord, spec: &ContainerSpec, seen: Option<i64>) -> Option<i64> {
    if rec.state != State::Running {
        return None;
    }
    let timeout = Limits::of(spec).idle_timeout?;
    let since = persisted_activity(rec)
        .max(rec.keep_alive_until_ms.unwrap_or(i64::MIN))
        .max(seen.unwrap_or(i64::MIN));
    Some(since.saturating_add(ms(timeout)))
}

/// The deadlines an extension sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension {
    /// The environment does not go idle before this (ms since the epoch).
    pub keep_alive_until_ms: i64,
    /// Its expiry (`None`: it has no lifetime).
    pub expire_at_ms: Option<i64>,
    /// Whether the keep-alive was cut to [`MAX_KEEP_ALIVE`] ahead.
    pub keep_alive_capped: bool,
}

/// What extending `rec` by `duration` at `now` sets: the expiry pushed to
/// at least `now + duration` (never pulled in; the caller checks the
/// maximum lifetime), the keep-alive pushed to `now + duration` but at most
/// [`MAX_KEEP_ALIVE`] ahead of `now` and never past the expiry (a
/// keep-alive further ahead, from a version without the cap, is pulled in
/// to it).
pub fn extension(rec: &EnvRecord, now: i64, duration: Duration) -> Extension {
    let until = now.saturating_add(ms(duration));
    let expire_at_ms = rec.expire_at_ms.map(|e| e.max(until));
    let wanted = rec.keep_alive_until_ms.unwrap_or(i64::MIN).max(until);
    let ceiling = now.saturating_add(ms(MAX_KEEP_ALIVE));
    let keep_alive_until_ms = wanted.min(ceiling).min(expire_at_ms.unwrap_or(i64::MAX));
    Extension {
        keep_alive_until_ms,
        expire_at_ms,
        keep_alive_capped: wanted > ceiling,
    }
}

/// A duration the way Go prints one, at second precision: `30m0s`,
/// `8h0m0s`, `45s`.
pub fn go_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// Parses a sweep interval: `500ms`, `30s`, `2m`, `1h`, `1m30s`, or a
/// number of seconds; `0` turns the sweeper off.
pub fn parse_interval(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?} is not a duration like 500ms, 30s or 2m"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("unknown unit {other:?} in {text:?} (ms, s, m, h)")),
        };
        total += unit * u32::try_from(value).map_err(|_| format!("{text:?} is too long"))?;
        rest = &rest[unit_len..];
    }
    if text.is_empty() {
        return Err("empty duration".into());
    }
    Ok(total)
}

/// Why an idle environment was stopped.
pub fn idle_reason(limits: &Limits) -> String {
    format!(
        "idle for {} (no exec, port-forward or copy session, CPU below {}%)",
        go_duration(limits.idle_timeout.unwrap_or_default()),
        limits.idle_cpu_percent
    )
}

/// Why an environment was deleted at the end of its lifetime.
pub fn expire_reason(rec: &EnvRecord) -> String {
    let lived = rec
        .expire_at_ms
        .unwrap_or(rec.create_time_ms)
        .saturating_sub(rec.create_time_ms)
        .max(0);
    format!(
        "lifetime of {} reached",
        go_duration(Duration::from_millis(lived as u64))
    )
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// What the orchestrator knows about recent activity, in memory (persisted
/// by the sweeper).
#[derive(Default)]
pub(crate) struct Activity {
    entries: Mutex<HashMap<String, Entry>>,
    /// Set once the first reconcile pass ended: the sweeper waits for it.
    reconciled: tokio::sync::Notify,
    reconciled_once: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default, Clone)]
struct Entry {
    /// Sessions open now.
    open: u32,
    /// Last activity seen in this process (ms since the epoch).
    last_ms: i64,
    /// The last activity written to the database.
    persisted_ms: i64,
    /// The previous CPU sample: cumulative CPU nanoseconds, and when.
    cpu: Option<(u64, Instant)>,
    /// An automatic stop was decided and is under way: sessions that need
    /// the container running are refused.
    stopping: bool,
}

impl Activity {
    fn with<R>(&self, env: &str, f: impl FnOnce(&mut Entry) -> R) -> R {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        f(entries.entry(env.to_owned()).or_default())
    }

    /// Opens a session (counted, and activity now). A `live` one (it needs
    /// the container running: exec, port-forward) is refused, returning
    /// false, while an automatic stop is under way; decided under the same
    /// lock as [`begin_stop`](Self::begin_stop), so a session is either
    /// counted before the stop is decided (and there is no stop) or refused.
    fn open(&self, env: &str, live: bool) -> bool {
        let now = store::now_ms();
        self.with(env, |e| {
            if live && e.stopping {
                return false;
            }
            e.open += 1;
            e.last_ms = e.last_ms.max(now);
            true
        })
    }

    /// Decides an automatic stop: marks the environment as stopping when no
    /// session is open (and no other stop is under way); whether it did.
    fn begin_stop(&self, env: &str) -> bool {
        self.with(env, |e| {
            if e.open > 0 || e.stopping {
                return false;
            }
            e.stopping = true;
            true
        })
    }

    fn end_stop(&self, env: &str) {
        self.with(env, |e| e.stopping = false);
    }

    fn touch(&self, env: &str) {
        let now = store::now_ms();
        self.with(env, |e| e.last_ms = e.last_ms.max(now));
    }

    /// Activity seen in memory (not necessarily persisted yet).
    fn seen(&self, env: &str) -> Option<i64> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(env).map(|e| e.last_ms).filter(|t| *t > 0)
    }

    /// What to persist now: `(ids with an open session, [(id, last)])`.
    fn unpersisted(&self) -> (Vec<String>, Vec<(String, i64)>) {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let open = entries
            .iter()
            .filter(|(_, e)| e.open > 0)
            .map(|(id, _)| id.clone())
            .collect();
        let ended = entries
            .iter()
            .filter(|(_, e)| e.open == 0 && e.last_ms > e.persisted_ms)
            .map(|(id, e)| (id.clone(), e.last_ms))
            .collect();
        (open, ended)
    }

    fn persisted(&self, env: &str, at: i64) {
        self.with(env, |e| e.persisted_ms = e.persisted_ms.max(at));
    }

    /// Takes a CPU sample (cumulative nanoseconds at `at`): the CPU time
    /// and wall time since the previous one, when they can be judged. A
    /// sample too close to the previous one keeps the previous as the
    /// baseline; one too far from it (or from a restarted container, whose
    /// counter starts over) becomes the new baseline, unjudged: an average
    /// over a long window could hide a burst that just began.
    fn cpu_sample(
        &self,
        env: &str,
        total: u64,
        at: Instant,
        max_window: Duration,
    ) -> Option<(u64, Duration)> {
        self.with(env, |e| match e.cpu {
            Some((_, then)) if at.duration_since(then) < MIN_SAMPLE_WINDOW => None,
            Some((before, then)) if total >= before && at.duration_since(then) <= max_window => {
                e.cpu = Some((total, at));
                Some((total - before, at.duration_since(then)))
            }
            _ => {
                e.cpu = Some((total, at));
                None
            }
        })
    }

    /// Forgets environments the sweeper no longer watches (nothing open,
    /// everything persisted).
    fn forget_except(&self, keep: &HashSet<&str>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|id, e| {
            keep.contains(id.as_str()) || e.open > 0 || e.stopping || e.last_ms > e.persisted_ms
        });
    }

    fn mark_reconciled(&self) {
        self.reconciled_once
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.reconciled.notify_waiters();
    }

    async fn wait_reconciled(&self) {
        loop {
            let notified = self.reconciled.notified();
            if self
                .reconciled_once
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return;
            }
            notified.await;
        }
    }
}

/// An open session (exec, port-forward, copy) on an environment: while it
/// lives the environment is not idle; dropping it ends the session and
/// marks the environment active now.
#[must_use = "the session ends when the guard is dropped"]
pub struct ActivityGuard {
    activity: Arc<Activity>,
    env: String,
}

impl std::fmt::Debug for ActivityGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityGuard")
            .field("env", &self.env)
            .finish()
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let now = store::now_ms();
        self.activity.with(&self.env, |e| {
            e.open = e.open.saturating_sub(1);
            e.last_ms = e.last_ms.max(now);
        });
    }
}

/// An automatic stop under way (see [`Activity::begin_stop`]); dropping it
/// (the stop committed, or given up) lets sessions open again.
struct Stopping {
    activity: Arc<Activity>,
    env: String,
}

impl Stopping {
    fn begin(activity: &Arc<Activity>, env: &str) -> Option<Stopping> {
        activity.begin_stop(env).then(|| Stopping {
            activity: Arc::clone(activity),
            env: env.to_owned(),
        })
    }
}

impl Drop for Stopping {
    fn drop(&mut self) {
        self.activity.end_stop(&self.env);
    }
}

/// Test hook: an automatic stop held under way (see
/// [`Orchestrator::hold_stopping`]); dropping it ends it.
#[cfg(feature = "test-hooks")]
#[must_use = "the stop is under way while the guard lives"]
pub struct HeldStop {
    _stopping: Stopping,
}

#[cfg(feature = "test-hooks")]
impl Orchestrator {
    /// Test hook: decides an automatic stop of an environment, as the
    /// sweeper does, without stopping it, until the guard drops (`None`
    /// when a session is open: no stop is decided then). Meanwhile exec and
    /// port-forward are refused as the sweeper's stop would have them.
    pub fn hold_stopping(&self, env_id: &str) -> Option<HeldStop> {
        Stopping::begin(&self.inner.activity, env_id).map(|s| HeldStop { _stopping: s })
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Environments deleted at the end of their lifetime.
    pub expired: Vec<String>,
    /// Environments stopped for idleness.
    pub stopped: Vec<String>,
    /// Environments whose CPU was sampled.
    pub sampled: Vec<String>,
    /// Environments found busy by their CPU use.
    pub busy: Vec<String>,
}

/// What a CPU sample says.
enum Cpu {
    /// Above the threshold since the previous sample.
    Busy,
    /// Below it since the previous sample.
    Idle,
    /// No judgement yet (first sample, the container restarted, no answer).
    Unknown,
}

impl Orchestrator {
    /// Opens an activity session on an environment (copy): the environment
    /// does not go idle while the guard lives, and counts as active at the
    /// moment it is dropped. Never refused: for sessions that do not need
    /// the container running (the archive API works on a stopped
    /// container); those that do use [`live_session`](Self::live_session).
    pub fn session(&self, env_id: &str) -> ActivityGuard {
        self.inner.activity.open(env_id, false);
        ActivityGuard {
            activity: Arc::clone(&self.inner.activity),
            env: env_id.to_owned(),
        }
    }

    /// Opens an activity session that needs the environment's container
    /// running (exec, port-forward; `operation` names it): like
    /// [`session`](Self::session), but refused with `BadState`
    /// (FAILED_PRECONDITION "environment is stopping; cannot ...") while an
    /// automatic stop of the environment is under way. Take it before the
    /// check that the environment runs: a session taken before the stop is
    /// decided prevents it, one asked for after it is refused, and once the
    /// stop is committed the environment shows as stopped.
    pub fn live_session(&self, env_id: &str, operation: &'static str) -> Result<ActivityGuard> {
        if !self.inner.activity.open(env_id, true) {
            return Err(Error::OperationInProgress {
                state: State::Stopping.as_str(),
                operation: crate::operations::Operation::AutoStop.as_str(),
                requested: operation,
            });
        }
        Ok(ActivityGuard {
            activity: Arc::clone(&self.inner.activity),
            env: env_id.to_owned(),
        })
    }

    /// Marks an environment active now (for example when data moves on a
    /// long session, or on a one-off operation).
    pub fn touch(&self, env_id: &str) {
        self.inner.activity.touch(env_id);
    }

    /// Sessions open now on an environment.
    pub fn open_sessions(&self, env_id: &str) -> u32 {
        self.inner.activity.with(env_id, |e| e.open)
    }

    /// Tells the sweeper that the first reconcile pass is over.
    pub fn mark_reconciled(&self) {
        self.inner.activity.mark_reconciled();
    }

    /// Extends an environment by `duration` (see the module docs): pushes
    /// its expiry to at least `now + duration`, never past its creation plus
    /// the maximum lifetime its policy allows (beyond it: `LifetimeCeiling`,
    /// FAILED_PRECONDITION `lifetime.max_lifetime`, nothing changed), and
    /// keeps it from going idle until then, but at most [`MAX_KEEP_ALIVE`]
    /// (24 hours) ahead and never past its expiry: a longer keep-alive is
    /// cut, not refused (rule `lifetime.max_keep_alive`; the audit event
    /// carries `keep_alive_capped`), and the returned record holds the
    /// deadlines applied. Owner or team admin (checked by the gateway);
    /// audited `environment.extend`.
    pub async fn extend(&self, caller: &Caller, id: &str, duration: Duration) -> Result<EnvRecord> {
        if !(MIN_EXTENSION..=MAX_EXTENSION).contains(&duration) {
            return Err(Error::InvalidArgument {
                field: "duration",
                reason: format!(
                    "must be between {} and {}",
                    go_duration(MIN_EXTENSION),
                    go_duration(MAX_EXTENSION)
                ),
            });
        }
        // Never waits for an operation in progress (refused instead).
        let (_g, rec) = self.lock_settled(id, "extend").await?;
        let now = store::now_ms();
        let until = now.saturating_add(ms(duration));
        let limits = Limits::of(&Self::spec_of(&rec));
        let decided = match rec.state {
            State::Running | State::Stopped => match limits.max_lifetime {
                Some(max) if until > rec.create_time_ms.saturating_add(ms(max)) => {
                    Err(Error::LifetimeCeiling {
                        latest: rfc3339(rec.create_time_ms.saturating_add(ms(max))),
                        max: go_duration(max),
                    })
                }
                _ => Ok(()),
            },
            other => Err(Error::BadState {
                state: other.as_str(),
                operation: "extend",
            }),
        };
        let Extension {
            keep_alive_until_ms: keep_alive,
            expire_at_ms: expire,
            keep_alive_capped,
        } = extension(&rec, now, duration);
        let (outcome, severity, details) = match &decided {
            Ok(()) => {
                let mut details = vec![
                    ("duration", go_duration(duration)),
                    ("keep_alive_until", rfc3339(keep_alive)),
                    (
                        "expire_time",
                        expire.map(rfc3339).unwrap_or_else(|| "never".into()),
                    ),
                ];
                if keep_alive_capped {
                    // Rule lifetime.max_keep_alive: what the keep-alive was
                    // cut to.
                    details.push(("keep_alive_capped", go_duration(MAX_KEEP_ALIVE)));
                }
                (Outcome::Success, Severity::Low, details)
            }
            Err(e) => (
                Outcome::Failure,
                Severity::Medium,
                vec![
                    ("duration", go_duration(duration)),
                    ("error", e.to_string()),
                ],
            ),
        };
        self.audit()
            .record(Event {
                action: "environment.extend",
                outcome,
                severity,
                caller: Some(caller),
                team_id: &rec.team_id,
                environment_id: &rec.id,
                details,
            })
            .await?;
        decided?;
        self.store()
            .set_deadlines(&rec.id, Some(keep_alive), expire)
            .await?;
        self.get(&rec.id).await
    }

    /// When a running environment stops if it stays idle (with the activity
    /// this process saw and has not persisted yet).
    pub fn idle_stop_time(&self, rec: &EnvRecord) -> Option<i64> {
        idle_stop_at(rec, &Self::spec_of(rec), self.inner.activity.seen(&rec.id))
    }

    /// Writes the activity seen since the last sweep: an open session is
    /// activity now, an ended one at its end.
    async fn persist_activity(&self, now: i64) -> Result<()> {
        let (open, ended) = self.inner.activity.unpersisted();
        self.store().record_activity(&open, now).await?;
        for id in &open {
            self.inner.activity.persisted(id, now);
        }
        for (id, at) in ended {
            self.store()
                .record_activity(std::slice::from_ref(&id), at)
                .await?;
            self.inner.activity.persisted(&id, at);
        }
        Ok(())
    }

    /// One sweep (see the module docs). `interval` is the time to the next
    /// one: environments whose idle deadline falls before the one after it
    /// have their CPU sampled now.
    pub async fn sweep(&self, interval: Duration) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        let now = store::now_ms();
        self.persist_activity(now).await?;
        let records = self
            .store()
            .lifecycle_candidates(self.installation())
            .await?;

        // Lifetimes first: an expired environment is deleted, not stopped.
        let mut watched = Vec::new();
        for rec in &records {
            if rec.expire_at_ms.is_some_and(|t| t <= now) {
                match self.expire(&rec.id).await {
                    Ok(true) => report.expired.push(rec.id.clone()),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(environment = %rec.id, error = %e, "cannot expire environment")
                    }
                }
                continue;
            }
            let spec = Self::spec_of(rec);
            let limits = Limits::of(&spec);
            if rec.state == State::Running && limits.idle_timeout.is_some() {
                watched.push((rec, limits));
            }
        }

        // Idle: sample the CPU of those near their deadline, without an
        // open session.
        let horizon = now.saturating_add(ms(interval.saturating_mul(2)));
        let near: Vec<(EnvRecord, Limits)> = watched
            .iter()
            .filter(|(rec, _)| self.open_sessions(&rec.id) == 0)
            .filter(|(rec, _)| self.idle_stop_time(rec).is_some_and(|t| t <= horizon))
            .map(|(rec, limits)| ((*rec).clone(), *limits))
            .collect();
        let samples: Vec<(EnvRecord, Limits, Cpu)> = futures::stream::iter(near)
            .map(|(rec, limits)| {
                let this = self.clone();
                async move {
                    let cpu = this
                        .cpu_since_last_sample(&rec, &limits, interval.saturating_mul(3))
                        .await;
                    (rec, limits, cpu)
                }
            })
            .buffer_unordered(SAMPLE_CONCURRENCY)
            .collect()
            .await;
        let mut due = Vec::new();
        for (rec, limits, cpu) in &samples {
            let (rec, limits) = (rec, *limits);
            report.sampled.push(rec.id.clone());
            match cpu {
                Cpu::Busy => {
                    self.touch(&rec.id);
                    report.busy.push(rec.id.clone());
                }
                Cpu::Idle if self.idle_stop_time(rec).is_some_and(|t| t <= now) => {
                    due.push((rec.id.clone(), limits));
                }
                Cpu::Idle | Cpu::Unknown => {}
            }
        }
        let stopped: Vec<Option<String>> = futures::stream::iter(due)
            .map(|(id, limits)| {
                let this = self.clone();
                async move {
                    match this.auto_stop(&id, &limits).await {
                        Ok(true) => Some(id),
                        Ok(false) => None,
                        Err(e) => {
                            tracing::warn!(environment = %id, error = %e, "cannot stop idle environment");
                            None
                        }
                    }
                }
            })
            .buffer_unordered(STOP_CONCURRENCY)
            .collect()
            .await;
        report.stopped.extend(stopped.into_iter().flatten());

        let keep: HashSet<&str> = watched.iter().map(|(r, _)| r.id.as_str()).collect();
        self.inner.activity.forget_except(&keep);
        Ok(report)
    }

    /// The CPU use of an environment since its previous sample, against its
    /// threshold (a one-shot stats call: cumulative CPU time, no wait).
    async fn cpu_since_last_sample(
        &self,
        rec: &EnvRecord,
        limits: &Limits,
        max_window: Duration,
    ) -> Cpu {
        let Some(cid) = rec.container_id.as_deref() else {
            return Cpu::Unknown;
        };
        let opts = StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        let mut stats = self.docker().stats(cid, Some(opts));
        let total = match tokio::time::timeout(SAMPLE_TIMEOUT, stats.next()).await {
            Ok(Some(Ok(s))) => s
                .cpu_stats
                .and_then(|c| c.cpu_usage)
                .and_then(|u| u.total_usage),
            Ok(Some(Err(e))) => {
                tracing::debug!(environment = %rec.id, error = %e, "cannot sample CPU");
                None
            }
            _ => None,
        };
        let Some(total) = total else {
            return Cpu::Unknown;
        };
        let max_window = max_window.max(MIN_JUDGED_WINDOW);
        let Some((used, wall)) =
            self.inner
                .activity
                .cpu_sample(&rec.id, total, Instant::now(), max_window)
        else {
            return Cpu::Unknown;
        };
        let percent = used as f64 / wall.as_nanos() as f64 * 100.0;
        tracing::debug!(environment = %rec.id, percent, "CPU since the previous sample");
        if percent > limits.idle_cpu_percent {
            Cpu::Busy
        } else {
            Cpu::Idle
        }
    }

    /// Stops an idle environment (graceful, workspace kept), if it is still
    /// running, idle and past its deadline once locked. Returns whether it
    /// stopped it; an environment busy with another operation is left for
    /// the next sweep.
    async fn auto_stop(&self, id: &str, sampled: &Limits) -> Result<bool> {
        let Some(_g) = self.try_lock_env(id) else {
            return Ok(false);
        };
        let rec = self.get(id).await?;
        let limits = Limits::of(&Self::spec_of(&rec));
        if rec.state != State::Running || limits != *sampled {
            return Ok(false);
        }
        // Decided atomically against sessions opening: with none open, and
        // from now until the state is committed (or this gives up), exec
        // and port-forward are refused ("environment is stopping"). The
        // deadline is checked after, so it sees the activity of a session
        // that ended just before.
        let Some(_stopping) = Stopping::begin(&self.inner.activity, id) else {
            return Ok(false);
        };
        if self
            .idle_stop_time(&rec)
            .is_none_or(|t| t > store::now_ms())
        {
            return Ok(false);
        }
        if rec.container_id.is_none() {
            return Ok(false);
        }
        let reason = idle_reason(&limits);
        let since = rfc3339(
            persisted_activity(&rec)
                .max(self.inner.activity.seen(id).unwrap_or(0))
                .max(rec.keep_alive_until_ms.unwrap_or(0)),
        );
        // `stopping` with its reason first (a person's operation meanwhile
        // is refused as in progress; a crash from here is finished by
        // reconcile), then the stop of the container, its gate and its
        // forwarder (a stopped environment keeps nothing running), the
        // event and `stopped` (see `crate::operations`).
        use crate::operations::{ADMITTED_PERCENT, Operation};
        let operation_id = uuid::Uuid::new_v4().to_string();
        let stopping = self
            .store()
            .transition(
                id,
                &[State::Running],
                State::Stopping,
                store::Transition {
                    stop_reason: Some(&reason),
                    status_message: Some("stopping: idle"),
                    progress_percent: Some(ADMITTED_PERCENT),
                    operation: Some((Operation::AutoStop.as_str(), &operation_id)),
                    ..store::Transition::default()
                },
            )
            .await?;
        if !stopping {
            return Ok(false);
        }
        let rec = self.get(id).await?;
        let result = self
            .run_state_change(
                Operation::AutoStop,
                &rec,
                None,
                &tokio_util::sync::CancellationToken::new(),
            )
            .await;
        let stopped = result.is_ok();
        self.conclude(
            Operation::AutoStop,
            None,
            &rec,
            result,
            vec![("reason", reason.clone()), ("idle_since", since)],
        )
        .await?;
        if stopped {
            tracing::info!(environment = %rec.id, %reason, "stopped idle environment");
        }
        Ok(stopped)
    }

    /// Deletes an environment past its expiry (the delete path of
    /// `DeleteEnvironment`), audited `environment.expire` first. Returns
    /// whether it did; one busy with another operation is left for the next
    /// sweep.
    async fn expire(&self, id: &str) -> Result<bool> {
        let Some(_g) = self.try_lock_env(id) else {
            return Ok(false);
        };
        let mut rec = self.get(id).await?;
        let settled = matches!(
            rec.state,
            State::Running | State::Stopped | State::Failed | State::Quarantined
        );
        if !settled || rec.expire_at_ms.is_none_or(|t| t > store::now_ms()) {
            return Ok(false);
        }
        let reason = expire_reason(&rec);
        // Under a fixed id: a crash before the delete repeats this, and the
        // log keeps the event once.
        self.audit()
            .record_once(
                crate::audit::once_id(&rec.id, "environment.expire"),
                Event {
                    action: "environment.expire",
                    outcome: Outcome::Success,
                    severity: Severity::Low,
                    caller: None,
                    team_id: &rec.team_id,
                    environment_id: &rec.id,
                    details: vec![
                        ("reason", reason.clone()),
                        ("expire_time", rfc3339(rec.expire_at_ms.unwrap_or_default())),
                    ],
                },
            )
            .await?;
        self.store().set_stop_reason(&rec.id, &reason).await?;
        rec.stop_reason = reason.clone();
        self.delete_locked(&rec, None).await?;
        tracing::info!(environment = %rec.id, %reason, "deleted expired environment");
        Ok(true)
    }
}

/// Sweeps every `interval` until shutdown, starting once the first
/// reconcile pass is over (so what came due while the orchestrator was down
/// is applied to a reconciled installation). A zero interval turns it off.
pub fn spawn_sweeper(
    orchestrator: Orchestrator,
    interval: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if interval.is_zero() {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = orchestrator.inner.activity.wait_reconciled() => {}
        }
        loop {
            match orchestrator.sweep(interval).await {
                Ok(r) if r != SweepReport::default() => tracing::debug!(?r, "lifecycle sweep"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "lifecycle sweep failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vibebox_proto::environment::Lifetime;

    fn spec(l: Lifetime) -> ContainerSpec {
        ContainerSpec {
            lifetime: Some(l),
            ..ContainerSpec::default()
        }
    }

    fn record(state: State, spec: &ContainerSpec) -> EnvRecord {
        EnvRecord {
            id: "e".into(),
            installation_id: "i".into(),
            team_id: "t".into(),
            owner_id: "o".into(),
            name: "n".into(),
            request_id: "r".into(),
            state,
            spec: prost::Message::encode_to_vec(spec),
            canonical_image: String::new(),
            policy_digest: String::new(),
            policy_version: String::new(),
            clearance_id: String::new(),
            subnet: None,
            container_id: None,
            nano_cpus: 0,
            memory_bytes: 0,
            failure_reason: String::new(),
            status_message: String::new(),
            create_time_ms: 1_000_000,
            update_time_ms: 1_000_000,
            stop_reason: String::new(),
            last_activity_ms: Some(1_000_000),
            keep_alive_until_ms: None,
            expire_at_ms: None,
            labels: "{}".into(),
            update_request_id: String::new(),
            pending_update: String::new(),
            progress_percent: 100,
            operation: String::new(),
            operation_id: String::new(),
        }
    }

    #[test]
    fn durations_print_the_way_go_prints_them() {
        assert_eq!(go_duration(Duration::from_secs(30 * 60)), "30m0s");
        assert_eq!(go_duration(Duration::from_secs(8 * 3600)), "8h0m0s");
        assert_eq!(go_duration(Duration::from_secs(3)), "3s");
        assert_eq!(go_duration(Duration::from_secs(3661)), "1h1m1s");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn intervals_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_interval("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_interval("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_interval("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "3x", "-1s", "1.5s"] {
            assert!(parse_interval(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn unset_limits_mean_never_and_the_default_threshold() {
        let l = Limits::of(&ContainerSpec::default());
        assert_eq!(l.idle_timeout, None);
        assert_eq!(l.lifetime, None);
        assert_eq!(l.max_lifetime, None);
        assert_eq!(l.idle_cpu_percent, DEFAULT_IDLE_CPU_PERCENT);
        let zero = Limits::of(&spec(Lifetime {
            idle_timeout_seconds: Some(0),
            idle_cpu_percent: Some(f64::NAN),
            lifetime_seconds: Some(0),
            max_lifetime_seconds: Some(0),
        }));
        assert_eq!(zero, l, "zero is never, NaN is the default");
        assert_eq!(expire_at(&ContainerSpec::default(), 5), None);
    }

    #[test]
    fn reasons_name_the_limits() {
        let s = spec(Lifetime {
            idle_timeout_seconds: Some(1800),
            idle_cpu_percent: Some(5.0),
            lifetime_seconds: Some(8 * 3600),
            max_lifetime_seconds: None,
        });
        assert_eq!(
            idle_reason(&Limits::of(&s)),
            "idle for 30m0s (no exec, port-forward or copy session, CPU below 5%)"
        );
        let mut rec = record(State::Running, &s);
        rec.expire_at_ms = expire_at(&s, rec.create_time_ms);
        assert_eq!(rec.expire_at_ms, Some(1_000_000 + 8 * 3600 * 1000));
        assert_eq!(expire_reason(&rec), "lifetime of 8h0m0s reached");
    }

    #[test]
    fn the_idle_deadline_counts_from_the_latest_activity_or_extension() {
        let s = spec(Lifetime {
            idle_timeout_seconds: Some(60),
            ..Lifetime::default()
        });
        let mut rec = record(State::Running, &s);
        assert_eq!(idle_stop_at(&rec, &s, None), Some(1_060_000));
        assert_eq!(idle_stop_at(&rec, &s, Some(1_010_000)), Some(1_070_000));
        rec.keep_alive_until_ms = Some(2_000_000);
        assert_eq!(idle_stop_at(&rec, &s, Some(1_010_000)), Some(2_060_000));
        rec.state = State::Stopped;
        assert_eq!(idle_stop_at(&rec, &s, None), None, "only while running");
        let none = ContainerSpec::default();
        let rec = record(State::Running, &none);
        assert_eq!(idle_stop_at(&rec, &none, None), None, "no idle timeout");
    }

    #[test]
    fn sessions_are_counted_and_their_end_is_activity() {
        let activity = Arc::new(Activity::default());
        let guard = |a: &Arc<Activity>| {
            a.with("e", |e| e.open += 1);
            ActivityGuard {
                activity: Arc::clone(a),
                env: "e".into(),
            }
        };
        let (one, two) = (guard(&activity), guard(&activity));
        assert_eq!(activity.with("e", |e| e.open), 2);
        let (open, _) = activity.unpersisted();
        assert_eq!(open, ["e"]);
        drop(one);
        drop(two);
        assert_eq!(activity.with("e", |e| e.open), 0);
        let (open, ended) = activity.unpersisted();
        assert!(open.is_empty());
        assert_eq!(ended.len(), 1, "the end is activity to persist");
        activity.persisted("e", ended[0].1);
        assert!(activity.unpersisted().1.is_empty());
        activity.forget_except(&HashSet::new());
        assert!(activity.seen("e").is_none(), "forgotten once persisted");
    }

    const HOUR_MS: i64 = 3600 * 1000;

    #[test]
    fn an_extension_keeps_an_environment_from_idling_at_most_a_day_ahead() {
        // The built-in default: no lifetime, no maximum. A week asked for,
        // a day applied (the expiry part has nothing to push).
        let forever = ContainerSpec::default();
        let mut rec = record(State::Running, &forever);
        let now = 5 * HOUR_MS;
        let week = Duration::from_secs(7 * 24 * 3600);
        let e = extension(&rec, now, week);
        assert_eq!(e.keep_alive_until_ms, now + 24 * HOUR_MS);
        assert_eq!(e.expire_at_ms, None);
        assert!(e.keep_alive_capped);
        // A day exactly, or less: applied as asked, not capped.
        let e = extension(&rec, now, MAX_KEEP_ALIVE);
        assert_eq!(e.keep_alive_until_ms, now + 24 * HOUR_MS);
        assert!(!e.keep_alive_capped);
        let e = extension(&rec, now, Duration::from_secs(7200));
        assert_eq!(e.keep_alive_until_ms, now + 2 * HOUR_MS);
        assert!(!e.keep_alive_capped);
        // A shorter extension never pulls an earlier keep-alive in ...
        rec.keep_alive_until_ms = Some(now + 10 * HOUR_MS);
        let e = extension(&rec, now, Duration::from_secs(60));
        assert_eq!(e.keep_alive_until_ms, now + 10 * HOUR_MS);
        assert!(!e.keep_alive_capped);
        // ... but one further than a day ahead (from a version without the
        // cap) is cut to a day.
        rec.keep_alive_until_ms = Some(now + 7 * 24 * HOUR_MS);
        let e = extension(&rec, now, Duration::from_secs(60));
        assert_eq!(e.keep_alive_until_ms, now + 24 * HOUR_MS);
        assert!(e.keep_alive_capped);

        // With a lifetime: the expiry part moves as asked (the maximum is
        // the caller's check), the keep-alive part at most a day, and never
        // past the expiry.
        let lives = spec(Lifetime {
            idle_timeout_seconds: Some(7200),
            lifetime_seconds: Some(8 * 3600),
            ..Lifetime::default()
        });
        let mut rec = record(State::Running, &lives);
        rec.expire_at_ms = expire_at(&lives, rec.create_time_ms);
        let e = extension(&rec, now, Duration::from_secs(3 * 24 * 3600));
        assert_eq!(e.expire_at_ms, Some(now + 3 * 24 * HOUR_MS));
        assert_eq!(e.keep_alive_until_ms, now + 24 * HOUR_MS);
        assert!(e.keep_alive_capped);
        rec.keep_alive_until_ms = Some(now + 20 * HOUR_MS);
        rec.expire_at_ms = Some(now + HOUR_MS);
        let e = extension(&rec, now, Duration::from_secs(60));
        assert_eq!(e.expire_at_ms, Some(now + HOUR_MS), "never pulled in");
        assert_eq!(e.keep_alive_until_ms, now + HOUR_MS, "not past the expiry");
        // And the idle deadline follows: a day, then the idle timeout.
        let mut rec = record(State::Running, &lives);
        let e = extension(&rec, now, week);
        rec.keep_alive_until_ms = Some(e.keep_alive_until_ms);
        assert_eq!(
            idle_stop_at(&rec, &lives, None),
            Some(now + 24 * HOUR_MS + 2 * HOUR_MS)
        );
    }

    #[test]
    fn once_an_automatic_stop_is_decided_live_sessions_are_refused_until_it_ends() {
        let activity = Arc::new(Activity::default());
        // A session open: no stop.
        assert!(activity.open("e", true));
        assert!(Stopping::begin(&activity, "e").is_none());
        activity.with("e", |e| e.open -= 1);
        // None open: the stop is decided, and from then on an exec or a
        // port-forward is refused; a second stop is not decided twice.
        let stopping = Stopping::begin(&activity, "e").expect("nothing open");
        assert!(!activity.open("e", true), "a live session while stopping");
        assert_eq!(
            activity.with("e", |e| e.open),
            0,
            "the refused one is not counted"
        );
        assert!(Stopping::begin(&activity, "e").is_none());
        assert!(
            activity.open("other", true),
            "other environments are not concerned"
        );
        // A copy (works on a stopped container) is counted, never refused.
        assert!(activity.open("e", false));
        activity.with("e", |e| e.open -= 1);
        // Kept while the sweeper forgets what it no longer watches.
        activity.forget_except(&HashSet::new());
        assert!(!activity.open("e", true), "still stopping after forget");
        // The stop committed (or given up): sessions open again.
        drop(stopping);
        assert!(activity.open("e", true));
    }

    #[test]
    fn a_session_and_an_automatic_stop_never_both_win_a_race() {
        // From two threads at once, many times: exactly one of them wins,
        // either the session is counted (and the stop is not decided) or
        // the stop is decided (and the session is refused).
        for round in 0..2000 {
            let activity = Arc::new(Activity::default());
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let opener = {
                let (activity, barrier) = (Arc::clone(&activity), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    activity.open("e", true)
                })
            };
            barrier.wait();
            let stopped = activity.begin_stop("e");
            let opened = opener.join().expect("opener");
            assert!(
                opened != stopped,
                "round {round}: opened {opened}, stopped {stopped}"
            );
            assert_eq!(
                activity.with("e", |e| (e.open, e.stopping)),
                (u32::from(opened), stopped)
            );
        }
    }

    #[test]
    fn cpu_is_judged_over_a_window_neither_too_short_nor_too_long() {
        let activity = Activity::default();
        let t0 = Instant::now();
        let max = Duration::from_secs(3);
        assert_eq!(activity.cpu_sample("e", 100, t0, max), None, "a baseline");
        let near = t0 + Duration::from_millis(50);
        assert_eq!(activity.cpu_sample("e", 150, near, max), None, "too close");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            activity.cpu_sample("e", 1_100, t1, max),
            Some((1_000, Duration::from_secs(1))),
            "judged against the first baseline, not the one too close"
        );
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(
            activity.cpu_sample("e", 10, t2, max),
            None,
            "counter restarted"
        );
        let t3 = t2 + Duration::from_secs(10);
        assert_eq!(
            activity.cpu_sample("e", 20, t3, max),
            None,
            "window too long"
        );
        let t4 = t3 + Duration::from_secs(1);
        assert_eq!(
            activity.cpu_sample("e", 30, t4, max),
            Some((10, Duration::from_secs(1)))
        );
    }
}
