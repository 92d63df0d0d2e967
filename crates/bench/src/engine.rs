//! The closed-loop load engine shared by every throughput mode, and the
//! figures it produces.
//!
//! Closed loop: each of C clients sends one request, waits for its answer,
//! then sends the next, so the offered load adapts to the system's speed and
//! the latency of every request is measured from its own send. A warm-up
//! second (connections opened, leader caches filled) is excluded from the
//! figures. A progress line on stderr shows the rate of the last second.
//!
//! The same engine drives jobsched's submit and etcd's put, so the two
//! numbers in one run are comparable.

use std::future::Future;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

/// What one closed-loop run should do.
pub struct LoopSpec {
    /// Shown in the progress line and the figures.
    pub label: String,
    pub concurrency: usize,
    /// Seconds to measure (after the warm-up); ignored when `total > 0`.
    pub duration: f64,
    /// Stop after this many requests instead (0: use the duration). Counted
    /// from the start, without warm-up.
    pub total: u64,
    /// Excluded from the figures; 0 for none.
    pub warmup: f64,
}

/// Latencies and counts of the measured window.
pub struct Stats {
    pub label: String,
    pub concurrency: usize,
    /// Successful requests.
    pub ok: u64,
    /// Items carried by the successful requests (jobs in a batch, jobs
    /// acquired); equal to `ok` for one-item requests.
    pub items: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    /// Sorted latencies of the successful requests.
    pub latencies: Vec<Duration>,
}

/// Nearest-rank percentile of sorted latencies, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

impl Stats {
    pub fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ok as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn items_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.items as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn p(&self, q: f64) -> f64 {
        percentile_ms(&self.latencies, q)
    }

    /// One human-readable line.
    pub fn line(&self) -> String {
        let items =
            if self.items != self.ok { format!("  items {:>9.0}/s", self.items_per_second()) } else { String::new() };
        format!(
            "{:<22} c={:<4} {:>9.0}/s{items}  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms  errors {}",
            self.label,
            self.concurrency,
            self.per_second(),
            self.p(0.5),
            self.p(0.9),
            self.p(0.99),
            self.p(1.0),
            self.errors
        )
    }

    pub fn to_json(&self) -> Value {
        json!({
            "label": self.label, "concurrency": self.concurrency,
            "ok": self.ok, "items": self.items, "errors": self.errors, "firstError": self.first_error,
            "seconds": self.seconds, "perSecond": self.per_second(), "itemsPerSecond": self.items_per_second(),
            "p50Ms": self.p(0.5), "p90Ms": self.p(0.9), "p99Ms": self.p(0.99), "maxMs": self.p(1.0),
        })
    }
}

/// Shared counters of one run.
struct Shared {
    /// Set to end the run (the duration passed, the total was reached, or a
    /// client declared the work exhausted through `stop`).
    stop: Arc<AtomicBool>,
    measuring: AtomicBool,
    issued: AtomicU64,
    ok: AtomicU64,
    items: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// Run `request(client, n)` in a closed loop on `spec.concurrency` clients.
/// `request` returns how many items the request carried. Setting `stop`
/// (the caller keeps a clone) ends the run early, e.g. when the work ran out.
pub async fn closed_loop<F, Fut>(spec: &LoopSpec, stop: Arc<AtomicBool>, request: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u64>> + Send + 'static,
{
    let request = Arc::new(request);
    let sh = Arc::new(Shared {
        stop,
        measuring: AtomicBool::new(spec.warmup <= 0.0 || spec.total > 0),
        issued: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        items: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
    });
    let total = spec.total;
    let mut tasks = Vec::with_capacity(spec.concurrency);
    for client in 0..spec.concurrency {
        let (sh, request) = (sh.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(8192);
            while !sh.stop.load(Ordering::Relaxed) {
                let n = sh.issued.fetch_add(1, Ordering::Relaxed);
                if total > 0 && n >= total {
                    break;
                }
                let t = Instant::now();
                let res = request(client, n).await;
                let took = t.elapsed();
                // Only requests that both started and ended inside the
                // window count; the warm-up's stragglers are dropped.
                if !sh.measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match res {
                    Ok(items) => {
                        lat.push(took);
                        sh.ok.fetch_add(1, Ordering::Relaxed);
                        sh.items.fetch_add(items, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if sh.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            *sh.first_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
                        }
                        // Do not spin on a failing target.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            lat
        }));
    }

    if spec.total == 0 && spec.warmup > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(spec.warmup)).await;
        sh.measuring.store(true, Ordering::Relaxed);
    }
    let started = Instant::now();
    let progress = tokio::spawn(progress(sh.clone(), spec.label.clone(), spec.concurrency));
    if spec.total == 0 {
        let end = started + Duration::from_secs_f64(spec.duration);
        while Instant::now() < end && !sh.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50).min(end.saturating_duration_since(Instant::now()))).await;
        }
        // Stop counting first: requests still in flight when the window
        // closes are not part of it.
        sh.measuring.store(false, Ordering::Relaxed);
        sh.stop.store(true, Ordering::Relaxed);
    }
    let mut seconds = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            latencies.extend(l);
        }
    }
    if spec.total > 0 {
        seconds = started.elapsed().as_secs_f64();
    }
    sh.stop.store(true, Ordering::Relaxed);
    progress.abort();
    let _ = progress.await;
    latencies.sort_unstable();
    let first_error = sh.first_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    Stats {
        label: spec.label.clone(),
        concurrency: spec.concurrency,
        ok: sh.ok.load(Ordering::Relaxed),
        items: sh.items.load(Ordering::Relaxed),
        errors: sh.errors.load(Ordering::Relaxed),
        first_error,
        seconds,
        latencies,
    }
}

/// Once a second: the rate of the last second. On a terminal the line is
/// rewritten in place; in a log, one line per second.
async fn progress(sh: Arc<Shared>, label: String, concurrency: usize) {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let (mut last_ok, mut last_items) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let (ok, items, errors) =
            (sh.ok.load(Ordering::Relaxed), sh.items.load(Ordering::Relaxed), sh.errors.load(Ordering::Relaxed));
        let line = format!(
            "  {label} c={concurrency} t={:>3.0}s  {:>8}/s  items {:>8}/s  total {ok}  errors {errors}",
            started.elapsed().as_secs_f64(),
            ok - last_ok,
            items - last_items
        );
        (last_ok, last_items) = (ok, items);
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
    }
}

/// Clears a terminal progress line before the result is printed.
pub fn end_progress() {
    if std::io::stderr().is_terminal() {
        eprint!("\r{:100}\r", "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&v, 0.5), 51.0);
        assert_eq!(percentile_ms(&v, 0.99), 99.0);
        assert_eq!(percentile_ms(&v, 1.0), 100.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
    }

    #[tokio::test]
    async fn closed_loop_counts_total_requests() {
        let spec = LoopSpec { label: "t".into(), concurrency: 4, duration: 0.0, total: 100, warmup: 0.0 };
        let stats = closed_loop(&spec, Arc::new(AtomicBool::new(false)), |_, _| async { Ok(2) }).await;
        assert_eq!(stats.ok, 100);
        assert_eq!(stats.items, 200);
        assert_eq!(stats.latencies.len(), 100);
    }
}
