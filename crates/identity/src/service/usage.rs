//! Tokens' last use (`ApiToken.last_used_time`), recorded when identity
//! serves an authorization decision or a scope lookup for a token: at most
//! once per [`USAGE_INTERVAL`] per token (an in-memory throttle), written by
//! a background task. A request never waits for it: noting a use is a map
//! lookup and, at most once a minute per token, a non-blocking send; when
//! the writer falls behind, uses are dropped rather than queued without end.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use tokio::sync::mpsc;

use crate::store;

/// Least time between two recordings of one token's use.
pub const USAGE_INTERVAL: Duration = Duration::from_secs(60);
/// Uses waiting for the writer before new ones are dropped.
const QUEUE: usize = 1024;
/// Tokens remembered by the throttle before it forgets the stale ones.
const MAX_REMEMBERED: usize = 100_000;

/// The throttle and the writer's queue.
pub(crate) struct UsageRecorder {
    interval: Duration,
    last: Mutex<HashMap<String, Instant>>,
    /// `None` outside a Tokio runtime (nothing is recorded then).
    queue: Option<mpsc::Sender<(String, DateTime<Utc>)>>,
}

impl UsageRecorder {
    /// Starts the writer on the current runtime (it ends when the recorder
    /// is dropped).
    pub(crate) fn start(db: DatabaseConnection, interval: Duration) -> Self {
        let queue = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (tx, rx) = mpsc::channel(QUEUE);
            runtime.spawn(write(db, rx));
            tx
        });
        Self {
            interval,
            last: Mutex::new(HashMap::new()),
            queue,
        }
    }

    /// Notes that `token_id` was used now.
    pub(crate) fn note(&self, token_id: &str) {
        let Some(queue) = &self.queue else {
            return;
        };
        let now = Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last
                .get(token_id)
                .is_some_and(|at| now.duration_since(*at) < self.interval)
            {
                return;
            }
            if last.len() >= MAX_REMEMBERED {
                last.retain(|_, at| now.duration_since(*at) < self.interval);
                if last.len() >= MAX_REMEMBERED {
                    last.clear();
                }
            }
            last.insert(token_id.to_owned(), now);
        }
        if queue.try_send((token_id.to_owned(), Utc::now())).is_err() {
            tracing::debug!("token usage queue full; a last-use update is dropped");
        }
    }
}

async fn write(db: DatabaseConnection, mut rx: mpsc::Receiver<(String, DateTime<Utc>)>) {
    while let Some((token_id, at)) = rx.recv().await {
        if let Err(error) = store::touch_token(&db, &token_id, at).await {
            tracing::debug!(%error, "cannot record a token's last use");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn uses_are_throttled_per_token() {
        let (tx, mut rx) = mpsc::channel(16);
        let recorder = UsageRecorder {
            interval: Duration::from_millis(200),
            last: Mutex::new(HashMap::new()),
            queue: Some(tx),
        };
        recorder.note("a");
        recorder.note("a");
        recorder.note("b");
        assert_eq!(rx.recv().await.unwrap().0, "a");
        assert_eq!(rx.recv().await.unwrap().0, "b");
        assert!(rx.try_recv().is_err(), "the second use of a is throttled");
        tokio::time::sleep(Duration::from_millis(250)).await;
        recorder.note("a");
        assert_eq!(rx.recv().await.unwrap().0, "a");
    }
}
