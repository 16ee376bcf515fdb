//! Latency summaries and load generators (closed loop for throughput, open
//! loop at a fixed rate for latency under a given load).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Summary {
    pub(crate) n: usize,
    pub(crate) min: f64,
    pub(crate) p50: f64,
    pub(crate) p95: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted samples.
fn rank(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

impl Summary {
    pub(crate) fn of(samples: &[Duration]) -> Self {
        let mut v = samples.to_vec();
        v.sort_unstable();
        if v.is_empty() {
            return Self::default();
        }
        let total: Duration = v.iter().sum();
        Self {
            n: v.len(),
            min: ms(v[0]),
            p50: ms(rank(&v, 0.50)),
            p95: ms(rank(&v, 0.95)),
            p99: ms(rank(&v, 0.99)),
            max: ms(v[v.len() - 1]),
            mean: ms(total / v.len() as u32),
        }
    }
}

/// What a load run achieved.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Load {
    /// Successful calls per second over the measured window.
    pub(crate) per_second: f64,
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) latency: Summary,
    /// For open loops: the rate asked for.
    pub(crate) target_rate: Option<f64>,
}

/// Calls `call` from `concurrency` workers back to back for `warmup +
/// duration`; only the last `duration` counts.
pub(crate) async fn closed_loop<F, Fut, E>(
    call: F,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> Load
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let call = call.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let result = call().await;
                let done = Instant::now();
                if t < measure_from || done > end {
                    continue;
                }
                match result {
                    Ok(()) => {
                        ok += 1;
                        lat.push(done - t);
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (lat, ok, errors, first_error)
        }));
    }
    let mut lat = Vec::new();
    let (mut ok, mut errors, mut first_error) = (0, 0, None);
    for w in workers {
        if let Ok((l, o, e, f)) = w.await {
            lat.extend(l);
            ok += o;
            errors += e;
            if first_error.is_none() {
                first_error = f;
            }
        }
    }
    Load {
        per_second: ok as f64 / duration.as_secs_f64(),
        ok,
        errors,
        first_error,
        latency: Summary::of(&lat),
        target_rate: None,
    }
}

/// Starts calls at `rate` per second for `duration` regardless of how fast
/// they complete (at most `max_in_flight` outstanding); latency is measured
/// from each call's start.
pub(crate) async fn open_loop<F, Fut, E>(
    call: F,
    rate: f64,
    duration: Duration,
    max_in_flight: usize,
) -> Load
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let rate = rate.max(1.0);
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let in_flight = Arc::new(AtomicU64::new(0));
    let overloaded = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<Duration, String>>();
    let start = Instant::now();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        }
        if in_flight.load(Ordering::Relaxed) >= max_in_flight as u64 {
            overloaded.store(true, Ordering::Relaxed);
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let call = call.clone();
        let tx = tx.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let result = call().await;
            let _ = tx.send(result.map(|()| t.elapsed()).map_err(|e| e.to_string()));
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(tx);
    let mut lat = Vec::with_capacity(total as usize);
    let (mut ok, mut errors, mut first_error) = (0, 0, None);
    while let Some(r) = rx.recv().await {
        match r {
            Ok(d) => {
                ok += 1;
                lat.push(d);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if overloaded.load(Ordering::Relaxed) {
        first_error.get_or_insert_with(|| format!("more than {max_in_flight} calls in flight"));
    }
    Load {
        per_second: ok as f64 / elapsed,
        ok,
        errors,
        first_error,
        latency: Summary::of(&lat),
        target_rate: Some(rate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Summary::of(&v);
        assert_eq!(s.n, 100);
        assert_eq!(s.p50, 50.0);
        assert_eq!(s.p95, 95.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(s.max, 100.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(Summary::of(&[]).n, 0);
    }

    #[tokio::test]
    async fn loops_count_calls() {
        let load = closed_loop(
            || async { Ok::<(), String>(()) },
            2,
            Duration::from_millis(10),
            Duration::from_millis(50),
        )
        .await;
        assert!(load.ok > 0);
        assert_eq!(load.errors, 0);
        let load = open_loop(
            || async { Err::<(), String>("no".into()) },
            200.0,
            Duration::from_millis(100),
            10,
        )
        .await;
        assert_eq!(load.ok, 0);
        assert_eq!(load.errors, 20);
        assert_eq!(load.first_error.as_deref(), Some("no"));
    }
}
