//! `jobsched-bench`: measures the cluster from the outside, through the
//! public HTTP API only.
//!
//! Modes:
//! * `submit`: closed loop, C concurrent clients, for T seconds (or N jobs):
//!   throughput and latency percentiles of `POST /api/jobs`.
//! * `e2e`: C closed-loop submitters plus W workers x K slots that acquire
//!   (up to their free slots per call) and complete over HTTP: completed
//!   jobs per second end to end.
//! * `pickup`: one idle worker long-polls; N times, submit a job and time
//!   from the submit's acknowledgement (and from its send) to the moment the
//!   worker's acquire returns with it.
//! * `failover`: R rounds of "kill -9 the leader with a command you give,
//!   measure the time until a submit is acknowledged again, restart it".
//!
//! Figures are printed as a table line and, with `--json`, as one JSON
//! object, so scripts can collect them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "jobsched-bench", about = "Measure a jobsched cluster through its HTTP API")]
struct Cli {
    /// Coordinator base URLs, comma-separated.
    #[arg(
        long,
        env = "JOBSCHED_COORDINATORS",
        default_value = "http://127.0.0.1:5001,http://127.0.0.1:5002,http://127.0.0.1:5003",
        value_delimiter = ','
    )]
    coordinators: Vec<String>,
    /// Print one JSON object with the figures as well.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Closed-loop submits: C clients each wait for their answer before sending the next.
    Submit {
        #[arg(long, short = 'c', default_value_t = 1)]
        concurrency: usize,
        /// Seconds to run (after a 1 s warm-up).
        #[arg(long, short = 'd', default_value_t = 10.0)]
        duration: f64,
        /// Stop after this many jobs instead (0: use the duration).
        #[arg(long, default_value_t = 0)]
        total: u64,
        /// Send every request to this node only (index into --coordinators);
        /// default: spread clients over all nodes.
        #[arg(long)]
        node: Option<usize>,
    },
    /// End to end: submitters plus HTTP workers; completed jobs per second.
    E2e {
        #[arg(long, short = 'c', default_value_t = 64)]
        submitters: usize,
        /// Worker processes simulated (each registers once).
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Slots per worker (jobs acquired per call at most).
        #[arg(long, default_value_t = 8)]
        slots: u32,
        #[arg(long, short = 'd', default_value_t = 10.0)]
        duration: f64,
    },
    /// Pickup latency: submit -> acquire on an idle long-polling worker.
    Pickup {
        #[arg(long, short = 'n', default_value_t = 200)]
        samples: usize,
    },
    /// Kill the leader R times and measure write unavailability.
    Failover {
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Shell command that kills node {id} (e.g. "scripts/cluster.sh kill {id}").
        #[arg(long)]
        kill_cmd: String,
        /// Shell command that starts node {id} again.
        #[arg(long)]
        start_cmd: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    let figures = match &cli.mode {
        Mode::Submit { concurrency, duration, total, node } => {
            submit(&http, &cli.coordinators, *concurrency, *duration, *total, *node).await?
        }
        Mode::E2e { submitters, workers, slots, duration } => {
            e2e(&http, &cli.coordinators, *submitters, *workers, *slots, *duration).await?
        }
        Mode::Pickup { samples } => pickup(&http, &cli.coordinators, *samples).await?,
        Mode::Failover { rounds, kill_cmd, start_cmd } => {
            failover(&http, &cli.coordinators, *rounds, kill_cmd, start_cmd).await?
        }
    };
    if cli.json {
        println!("{figures}");
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

async fn submit_once(http: &reqwest::Client, base: &str, n: u64) -> Result<()> {
    let body =
        json!({"name": "bench", "type": "bench", "payload": {"n": n}, "requestId": uuid::Uuid::new_v4().to_string()});
    let r = http.post(format!("{base}/api/jobs")).json(&body).send().await?;
    if !r.status().is_success() {
        bail!("submit answered {}", r.status());
    }
    Ok(())
}

async fn submit(
    http: &reqwest::Client,
    nodes: &[String],
    concurrency: usize,
    duration: f64,
    total: u64,
    node: Option<usize>,
) -> Result<Value> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let base = match node {
            Some(i) => nodes.get(i).context("--node out of range")?.clone(),
            None => nodes[c % nodes.len()].clone(),
        };
        let (http, stop, sent, errors, measuring) =
            (http.clone(), stop.clone(), sent.clone(), errors.clone(), measuring.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            while !stop.load(Ordering::Relaxed) {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                if total > 0 && n >= total {
                    break;
                }
                let t = Instant::now();
                let ok = submit_once(&http, &base, n).await.is_ok();
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        lat.push(t.elapsed());
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    // Warm-up: connections, leader caches.
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let progress = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(2)).await;
                eprint!(".");
            }
        })
    };
    if total == 0 {
        tokio::time::sleep(Duration::from_secs_f64(duration)).await;
        stop.store(true, Ordering::Relaxed);
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    progress.abort();
    eprintln!();
    all.sort();
    let ok = all.len() as f64;
    let fig = json!({
        "mode": "submit", "concurrency": concurrency, "ok": all.len(), "errors": errors.load(Ordering::Relaxed),
        "seconds": elapsed, "perSecond": ok / elapsed,
        "p50Ms": percentile(&all, 0.50), "p90Ms": percentile(&all, 0.90), "p99Ms": percentile(&all, 0.99),
        "maxMs": percentile(&all, 1.0),
    });
    println!(
        "submit c={concurrency:<4} {:>9.0}/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>8.2} ms  errors {}",
        ok / elapsed,
        percentile(&all, 0.5),
        percentile(&all, 0.9),
        percentile(&all, 0.99),
        percentile(&all, 1.0),
        errors.load(Ordering::Relaxed)
    );
    Ok(fig)
}

async fn post_json(http: &reqwest::Client, url: String, body: Value) -> Result<Value> {
    let r = http.post(url).json(&body).send().await?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{status}: {v}");
    }
    Ok(v)
}

async fn e2e(
    http: &reqwest::Client,
    nodes: &[String],
    submitters: usize,
    workers: usize,
    slots: u32,
    duration: f64,
) -> Result<Value> {
    let job_type = format!("e2e-{}", uuid::Uuid::new_v4());
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let submitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let base = nodes[w % nodes.len()].clone();
        let reg = post_json(
            http,
            format!("{base}/api/workers/register"),
            json!({"name": format!("bench-e2e-{w}"), "capacity": slots, "jobTypes": [job_type]}),
        )
        .await?;
        let worker_id = reg["id"].as_str().context("worker id")?.to_owned();
        let (http, stop, measuring, completed) = (http.clone(), stop.clone(), measuring.clone(), completed.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let acq = post_json(
                    &http,
                    format!("{base}/api/jobs/acquire"),
                    json!({"workerId": worker_id, "maxJobs": slots, "waitSeconds": 1, "leaseSeconds": 60}),
                )
                .await;
                let Ok(acq) = acq else { continue };
                let jobs = acq["jobs"].as_array().cloned().unwrap_or_default();
                // Complete the batch concurrently, as a worker with this many slots would.
                let done =
                    futures::future::join_all(
                        jobs.iter().map(|job| {
                            let http = http.clone();
                            let url = format!("{base}/api/jobs/{}/complete", job["id"].as_str().unwrap_or(""));
                            let token = job["fencingToken"].clone();
                            async move {
                                post_json(&http, url, json!({"fencingToken": token, "success": true})).await.is_ok()
                            }
                        }),
                    )
                    .await;
                if measuring.load(Ordering::Relaxed) {
                    completed.fetch_add(done.iter().filter(|ok| **ok).count() as u64, Ordering::Relaxed);
                }
            }
            let _ = http.delete(format!("{base}/api/workers/{worker_id}")).send().await;
        }));
    }
    for c in 0..submitters {
        let base = nodes[c % nodes.len()].clone();
        let (http, stop, measuring, submitted, job_type) =
            (http.clone(), stop.clone(), measuring.clone(), submitted.clone(), job_type.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let body = json!({"type": job_type, "payload": {}, "requestId": uuid::Uuid::new_v4().to_string()});
                let ok = post_json(&http, format!("{base}/api/jobs"), body).await.is_ok();
                if ok && measuring.load(Ordering::Relaxed) {
                    submitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let (done, sub) = (completed.load(Ordering::Relaxed) as f64, submitted.load(Ordering::Relaxed) as f64);
    println!(
        "e2e submitters={submitters} slots={} completed {:>8.0}/s  submitted {:>8.0}/s",
        workers as u32 * slots,
        done / elapsed,
        sub / elapsed
    );
    Ok(json!({"mode": "e2e", "submitters": submitters, "slots": workers as u32 * slots,
              "completedPerSecond": done / elapsed, "submittedPerSecond": sub / elapsed}))
}

async fn pickup(http: &reqwest::Client, nodes: &[String], samples: usize) -> Result<Value> {
    let job_type = format!("pickup-{}", uuid::Uuid::new_v4());
    let worker = post_json(
        http,
        format!("{}/api/workers/register", nodes[0]),
        json!({"name": "bench-pickup", "capacity": 1, "jobTypes": [job_type]}),
    )
    .await?;
    let worker_id = worker["id"].as_str().context("worker id")?.to_owned();
    let mut from_ack = Vec::with_capacity(samples);
    let mut from_send = Vec::with_capacity(samples);
    for i in 0..samples {
        // The worker polls one node, the client submits through another.
        let poll_node = nodes[i % nodes.len()].clone();
        let submit_node = nodes[(i + 1) % nodes.len()].clone();
        let (h, wid) = (http.clone(), worker_id.clone());
        let poll = tokio::spawn(async move {
            let v = post_json(&h, format!("{poll_node}/api/jobs/acquire"), json!({"workerId": wid, "waitSeconds": 10}))
                .await;
            (Instant::now(), v)
        });
        // Let the long poll park on the leader before submitting.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = Instant::now();
        post_json(http, format!("{submit_node}/api/jobs"), json!({"type": job_type, "payload": {"i": i}})).await?;
        let acked = Instant::now();
        let (picked, acquired) = poll.await?;
        let acquired = acquired?;
        let job = &acquired["jobs"][0];
        let id = job["id"].as_str().context("acquire returned no job")?;
        from_ack.push(picked.saturating_duration_since(acked));
        from_send.push(picked.saturating_duration_since(sent));
        post_json(
            http,
            format!("{}/api/jobs/{id}/complete", nodes[0]),
            json!({"fencingToken": job["fencingToken"], "success": true}),
        )
        .await?;
    }
    let _ = http.delete(format!("{}/api/workers/{worker_id}", nodes[0])).send().await;
    from_ack.sort();
    from_send.sort();
    let fig = json!({
        "mode": "pickup", "samples": samples,
        "fromAckP50Ms": percentile(&from_ack, 0.5), "fromAckP99Ms": percentile(&from_ack, 0.99),
        "fromSendP50Ms": percentile(&from_send, 0.5), "fromSendP99Ms": percentile(&from_send, 0.99),
    });
    println!(
        "pickup n={samples}  after submit ack: p50 {:.2} ms  p99 {:.2} ms  |  after submit sent: p50 {:.2} ms  p99 {:.2} ms",
        percentile(&from_ack, 0.5),
        percentile(&from_ack, 0.99),
        percentile(&from_send, 0.5),
        percentile(&from_send, 0.99)
    );
    Ok(fig)
}

async fn cluster_view(http: &reqwest::Client, base: &str) -> Option<Value> {
    let r = http.get(format!("{base}/api/cluster")).timeout(Duration::from_secs(1)).send().await.ok()?;
    r.json().await.ok()
}

/// The leader's node id and its index in `nodes`: the node that itself
/// reports role Leader with the highest term (another node's view of who
/// leads can be stale right after a restart).
async fn find_leader(http: &reqwest::Client, nodes: &[String]) -> Option<(u64, usize)> {
    let mut best: Option<(u64, u64, usize)> = None;
    for (i, base) in nodes.iter().enumerate() {
        if let Some(v) = cluster_view(http, base).await {
            if v["role"] == "Leader" {
                let (term, id) = (v["term"].as_u64()?, v["nodeId"].as_u64()?);
                if best.is_none_or(|(t, _, _)| term > t) {
                    best = Some((term, id, i));
                }
            }
        }
    }
    best.map(|(_, id, i)| (id, i))
}

/// Every node is ready and all have applied the same index: a healthy,
/// caught-up cluster. (A node still catching up after its restart has a
/// shorter log; if it campaigns first its election fails and costs a second
/// election round, which is a different measurement.)
async fn all_ready(http: &reqwest::Client, nodes: &[String]) -> bool {
    let mut applied = Vec::new();
    for base in nodes {
        let ok = http
            .get(format!("{base}/ready"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !ok {
            return false;
        }
        match cluster_view(http, base).await {
            Some(v) => applied.push(v["lastAppliedIndex"].as_u64()),
            None => return false,
        }
    }
    applied.windows(2).all(|w| w[0] == w[1])
}

fn sh(cmd: &str, id: u64) -> Result<()> {
    let cmd = cmd.replace("{id}", &id.to_string());
    let st = std::process::Command::new("sh").arg("-c").arg(&cmd).status()?;
    if !st.success() {
        bail!("`{cmd}` failed: {st}");
    }
    Ok(())
}

async fn failover(http: &reqwest::Client, nodes: &[String], rounds: usize, kill: &str, start: &str) -> Result<Value> {
    let mut gaps = Vec::new();
    for round in 1..=rounds {
        // Warm every node's connections, then wait for a healthy, caught-up
        // cluster, kill the leader and time the first acknowledged submit
        // through a survivor.
        for n in nodes {
            submit_once(http, n, 0).await.ok();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !all_ready(http, nodes).await {
            if Instant::now() > deadline {
                bail!("cluster not ready before round {round}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (leader, leader_idx) = find_leader(http, nodes).await.context("no leader")?;
        let survivors: Vec<String> =
            nodes.iter().enumerate().filter(|(i, _)| *i != leader_idx).map(|(_, n)| n.clone()).collect();
        sh(kill, leader)?;
        let killed = Instant::now();
        let mut i = 0u64;
        loop {
            let base = &survivors[i as usize % survivors.len()];
            i += 1;
            let attempt = tokio::time::timeout(Duration::from_secs(5), submit_once(http, base, i)).await;
            if matches!(attempt, Ok(Ok(()))) {
                break;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                bail!("no submit acknowledged within 60 s of killing the leader");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let gap = killed.elapsed();
        gaps.push(gap);
        eprintln!(
            "round {round}: killed leader {leader}; writes acknowledged again after {:.0} ms",
            gap.as_secs_f64() * 1e3
        );
        sh(start, leader)?;
    }
    gaps.sort();
    let fig = json!({
        "mode": "failover", "rounds": rounds,
        "medianMs": percentile(&gaps, 0.5), "maxMs": percentile(&gaps, 1.0), "minMs": percentile(&gaps, 0.0),
    });
    println!(
        "failover rounds={rounds} median {:.0} ms  min {:.0} ms  max {:.0} ms",
        percentile(&gaps, 0.5),
        percentile(&gaps, 0.0),
        percentile(&gaps, 1.0)
    );
    Ok(fig)
}
