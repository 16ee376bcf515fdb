//! Test hooks: crash points that stop an operation halfway (as if the
//! process were killed there) and a held-back environment feed. They exist only in
//! builds with the `test-hooks` feature, which the workspace's tests turn on
//! through dev-dependencies and no shipped build enables (`tests/tests/e2e/tidy.rs`
//! checks both); without it every hook is a no-op the compiler removes.

/// Where an operation may stop as if the process had been killed (the
/// names exist in every build; only test builds can make one stop there).
/// The record is left as the crash would leave it (`creating`, `stopping`,
/// `starting`), for reconcile to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the environment's network exists.
    AfterNetwork,
    /// After its container exists (not started).
    AfterContainer,
    /// A stop (or the first half of a restart): after the engine stopped
    /// the container, before the event and the commit.
    AfterStop,
    /// A start (or the second half of a restart): after the engine started
    /// the container, before the event and the commit.
    AfterStart,
    /// A resource update: after the engine applied the new limits, before
    /// the event and the commit (the update stays pending).
    AfterUpdate,
}

/// Environment variable that makes the process abort at a crash point
/// (`network`, `container`, `stop`, `start` or `update`), to test recovery from a
/// killed process.
#[cfg(feature = "test-hooks")]
pub const ABORT_ENV: &str = "VIBEBOX_TEST_ABORT_AFTER";

/// The hook state of one orchestrator.
#[derive(Default)]
pub(crate) struct Hooks {
    #[cfg(feature = "test-hooks")]
    crash: std::sync::Mutex<Option<CrashPoint>>,
    #[cfg(feature = "test-hooks")]
    abort_at: Option<CrashPoint>,
}

impl Hooks {
    /// Hooks as the process environment sets them.
    pub(crate) fn from_env() -> Self {
        #[cfg(feature = "test-hooks")]
        {
            Self {
                crash: std::sync::Mutex::new(None),
                abort_at: match std::env::var(ABORT_ENV).as_deref() {
                    Ok("network") => Some(CrashPoint::AfterNetwork),
                    Ok("container") => Some(CrashPoint::AfterContainer),
                    Ok("stop") => Some(CrashPoint::AfterStop),
                    Ok("start") => Some(CrashPoint::AfterStart),
                    Ok("update") => Some(CrashPoint::AfterUpdate),
                    _ => None,
                },
            }
        }
        #[cfg(not(feature = "test-hooks"))]
        Self::default()
    }

    /// Makes the next operations stop at `point`.
    #[cfg(feature = "test-hooks")]
    pub(crate) fn set_crash_point(&self, point: Option<CrashPoint>) {
        *self.crash.lock().unwrap_or_else(|p| p.into_inner()) = point;
    }

    /// Whether an operation must stop at `point` (aborts the process when
    /// [`ABORT_ENV`] names it).
    #[cfg_attr(not(feature = "test-hooks"), allow(clippy::unused_self))]
    pub(crate) fn crashes_at(&self, point: CrashPoint) -> bool {
        #[cfg(feature = "test-hooks")]
        {
            if self.abort_at == Some(point) {
                tracing::error!(?point, "{ABORT_ENV} is set: aborting the process");
                std::process::abort();
            }
            *self.crash.lock().unwrap_or_else(|p| p.into_inner()) == Some(point)
        }
        #[cfg(not(feature = "test-hooks"))]
        {
            let _ = point;
            false
        }
    }
}
