//! Where token work runs in async services: on tokio's blocking pool, at
//! most a few evaluations at a time, never on the async workers.
//!
//! Verification is bounded by [`crate::shape`] (a token is refused before
//! anything runs unless it has the shape identity issues), so one job costs
//! well under a millisecond; the bound here keeps a flood of them from
//! taking every core and from queueing unboundedly on the blocking pool.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::TokenError;

/// A bounded lane for token verification and authorization.
#[derive(Clone, Debug)]
pub struct Evaluator {
    permits: Arc<Semaphore>,
}

impl Default for Evaluator {
    /// One lane per core but one (at least one), so the async workers keep a core.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self::new(cores.saturating_sub(1).max(1))
    }
}

impl Evaluator {
    /// At most `concurrency` jobs at once (at least one).
    pub fn new(concurrency: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// Runs `job` on the blocking pool once a lane is free.
    pub async fn run<T, F>(&self, job: F) -> Result<T, TokenError>
    where
        F: FnOnce() -> Result<T, TokenError> + Send + 'static,
        T: Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TokenError::Internal("the token evaluator is closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|e| TokenError::Internal(format!("token evaluation failed: {e}")))?
    }
}
