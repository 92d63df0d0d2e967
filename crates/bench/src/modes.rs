//! The measurement modes (see the crate docs for what each measures).
//!
//! Request bodies on the hot loops are formatted directly into strings and
//! answers are read without building a JSON tree where only a count or a
//! status matters: the tool shares the machine's cores with the cluster it
//! measures, so its own cost per request must stay small (and is the same
//! for jobsched and etcd).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::engine::{closed_loop, end_progress, percentile_ms, LoopSpec};

const WARMUP_SECS: f64 = 1.0;

/// POST a JSON body given as a string; fail on a non-2xx answer. Returns the
/// answer's body.
async fn post_raw(http: &reqwest::Client, url: &str, body: String) -> Result<bytes::Bytes> {
    post_to(http, &parse_url(url)?, body).await
}

fn parse_url(url: &str) -> Result<reqwest::Url> {
    reqwest::Url::parse(url).with_context(|| format!("bad URL {url:?}"))
}

/// [`post_raw`] to a URL parsed beforehand. Why: the closed loops send to
/// the same few URLs hundreds of thousands of times, and parsing a URL string
/// (host normalisation included) was ~3 % of the load generator's CPU, which
/// shares the machine's cores with the cluster under test.
async fn post_to(http: &reqwest::Client, url: &reqwest::Url, body: String) -> Result<bytes::Bytes> {
    let r = http.post(url.clone()).header(reqwest::header::CONTENT_TYPE, "application/json").body(body).send().await?;
    let status = r.status();
    // Read the whole body so the connection goes back to the pool.
    let bytes = r.bytes().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)]));
    }
    Ok(bytes)
}

async fn post_json(http: &reqwest::Client, url: String, body: Value) -> Result<Value> {
    let bytes = post_raw(http, &url, body.to_string()).await?;
    Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn submit_body(job_type: &str, n: u64, request_id: bool) -> String {
    if request_id {
        format!(
            r#"{{"name":"bench","type":"{job_type}","payload":{{"n":{n}}},"requestId":"{}"}}"#,
            uuid::Uuid::new_v4()
        )
    } else {
        format!(r#"{{"name":"bench","type":"{job_type}","payload":{{"n":{n}}}}}"#)
    }
}

fn batch_body(job_type: &str, first: u64, count: usize, priority: i32, request_ids: bool) -> String {
    let mut s = String::with_capacity(count * 100 + 16);
    s.push_str(r#"{"jobs":["#);
    for i in 0..count as u64 {
        if i > 0 {
            s.push(',');
        }
        let n = first + i;
        if request_ids {
            s.push_str(&format!(
                r#"{{"name":"bench","type":"{job_type}","priority":{priority},"payload":{{"n":{n}}},"requestId":"{}"}}"#,
                uuid::Uuid::new_v4()
            ));
        } else {
            s.push_str(&format!(
                r#"{{"name":"bench","type":"{job_type}","priority":{priority},"payload":{{"n":{n}}}}}"#
            ));
        }
    }
    s.push_str("]}");
    s
}

fn finish(stats: &crate::engine::Stats, mode: &str, extra: Value) -> Value {
    end_progress();
    println!("{}", stats.line());
    if let Some(e) = &stats.first_error {
        eprintln!("  first error: {e}");
    }
    let mut v = stats.to_json();
    if let (Value::Object(m), Value::Object(x)) = (&mut v, extra) {
        m.insert("mode".into(), Value::String(mode.into()));
        m.extend(x);
    }
    v
}

pub async fn submit(
    http: &reqwest::Client,
    nodes: &[String],
    concurrency: usize,
    duration: f64,
    total: u64,
    node: Option<usize>,
    batch: usize,
) -> Result<Value> {
    if let Some(i) = node {
        nodes.get(i).context("--node out of range")?;
    }
    let urls = (0..concurrency)
        .map(|c| {
            let base = &nodes[node.unwrap_or(c % nodes.len())];
            let path = if batch > 1 { "/api/jobs/batch" } else { "/api/jobs" };
            parse_url(&format!("{base}{path}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let urls = Arc::new(urls);
    let label = if batch > 1 { format!("submit batch={batch}") } else { "submit".to_string() };
    let spec = LoopSpec { label, concurrency, duration, total, warmup: WARMUP_SECS };
    let http = http.clone();
    let stats = closed_loop(&spec, Arc::new(AtomicBool::new(false)), move |c, n| {
        let (http, urls) = (http.clone(), urls.clone());
        async move {
            if batch > 1 {
                post_to(&http, &urls[c], batch_body("bench", n * batch as u64, batch, 0, true)).await?;
                Ok(batch as u64)
            } else {
                post_to(&http, &urls[c], submit_body("bench", n, true)).await?;
                Ok(1)
            }
        }
    })
    .await;
    Ok(finish(&stats, "submit", json!({"target": "jobsched", "batch": batch})))
}

/// Standard base64 with padding (etcd's gateway takes bytes fields so).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 { T[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if chunk.len() > 2 { T[n as usize & 63] as char } else { '=' });
    }
    out
}

pub async fn etcd_put(
    http: &reqwest::Client,
    endpoints: &[String],
    concurrency: usize,
    duration: f64,
    total: u64,
    value_bytes: usize,
    node: Option<usize>,
) -> Result<Value> {
    if let Some(i) = node {
        endpoints.get(i).context("--node out of range")?;
    }
    let urls = (0..concurrency)
        .map(|c| parse_url(&format!("{}/v3/kv/put", endpoints[node.unwrap_or(c % endpoints.len())])))
        .collect::<Result<Vec<_>>>()?;
    let urls = Arc::new(urls);
    let value = Arc::new(base64(&vec![b'v'; value_bytes]));
    let spec = LoopSpec { label: "etcd put".into(), concurrency, duration, total, warmup: WARMUP_SECS };
    let http = http.clone();
    let stats = closed_loop(&spec, Arc::new(AtomicBool::new(false)), move |c, n| {
        let (http, urls, value) = (http.clone(), urls.clone(), value.clone());
        async move {
            let key = base64(format!("bench/{n:012}").as_bytes());
            let body = format!(r#"{{"key":"{key}","value":"{value}"}}"#);
            let answer = post_to(&http, &urls[c], body).await?;
            // The gateway answers 200 with an error object for some failures.
            if answer.starts_with(b"{\"error\"") || answer.starts_with(b"{\"code\"") {
                bail!("etcd: {}", String::from_utf8_lossy(&answer));
            }
            Ok(1)
        }
    })
    .await;
    Ok(finish(&stats, "etcd-put", json!({"target": "etcd", "valueBytes": value_bytes})))
}

/// The parts of an acquired job a worker needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AcquiredJob {
    id: String,
    fencing_token: u64,
}

#[derive(Deserialize)]
struct Acquired {
    jobs: Vec<AcquiredJob>,
}

fn completions_body(jobs: &[AcquiredJob]) -> String {
    let mut s = String::with_capacity(jobs.len() * 80 + 20);
    s.push_str(r#"{"completions":["#);
    for (i, j) in jobs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(r#"{{"jobId":"{}","fencingToken":{},"success":true}}"#, j.id, j.fencing_token));
    }
    s.push_str("]}");
    s
}

/// Complete `jobs` (one batched call, or one call each); returns how many
/// completions were accepted.
async fn complete_jobs(http: &reqwest::Client, base: &str, jobs: &[AcquiredJob], batched: bool) -> Result<u64> {
    if jobs.is_empty() {
        return Ok(0);
    }
    if batched {
        let mut done = 0;
        for chunk in jobs.chunks(jobsched_api::MAX_BATCH_ITEMS) {
            let answer = post_raw(http, &format!("{base}/api/jobs/complete"), completions_body(chunk)).await?;
            let v: Value = serde_json::from_slice(&answer)?;
            done += v["results"].as_array().map_or(0, |r| r.iter().filter(|x| x.get("job").is_some()).count()) as u64;
        }
        Ok(done)
    } else {
        let calls = jobs.iter().map(|j| {
            let url = format!("{base}/api/jobs/{}/complete", j.id);
            let body = format!(r#"{{"fencingToken":{},"success":true}}"#, j.fencing_token);
            async move { post_raw(http, &url, body).await.is_ok() }
        });
        Ok(futures::future::join_all(calls).await.into_iter().filter(|ok| *ok).count() as u64)
    }
}

/// A finished job and the report slot it holds until its report is answered.
type Finished = (AcquiredJob, tokio::sync::OwnedSemaphorePermit);

/// An e2e worker's reporter: takes every finished job waiting in the queue
/// and reports them (one call per round trip when batched).
async fn report_loop(
    http: reqwest::Client,
    base: String,
    mut rx: tokio::sync::mpsc::Receiver<Finished>,
    batched: bool,
    measuring: Arc<AtomicBool>,
    completed: Arc<AtomicU64>,
    report_calls: Arc<AtomicU64>,
) {
    let mut ready = Vec::new();
    while rx.recv_many(&mut ready, jobsched_api::MAX_BATCH_ITEMS).await > 0 {
        // The slots are freed when `_slots` drops, after the answer.
        let (jobs, _slots): (Vec<AcquiredJob>, Vec<_>) = ready.drain(..).unzip();
        let done = complete_jobs(&http, &base, &jobs, batched).await.unwrap_or(0);
        if measuring.load(Ordering::Relaxed) {
            completed.fetch_add(done, Ordering::Relaxed);
            report_calls.fetch_add(if batched { 1 } else { jobs.len() as u64 }, Ordering::Relaxed);
        }
    }
}

async fn register(http: &reqwest::Client, base: &str, name: &str, capacity: u32, job_type: &str) -> Result<String> {
    let reg = post_json(
        http,
        format!("{base}/api/workers/register"),
        json!({"name": name, "capacity": capacity, "jobTypes": [job_type]}),
    )
    .await?;
    Ok(reg["id"].as_str().context("worker id")?.to_owned())
}

/// A counter's rate once a second on stderr, until `stop`.
fn rate_progress(label: String, counter: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut last = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let now = counter.load(Ordering::Relaxed);
            eprintln!("  {label} t={:>3.0}s  {:>8}/s  total {now}", started.elapsed().as_secs_f64(), now - last);
            last = now;
        }
    })
}

/// How the e2e workers report results.
#[derive(Clone, Copy)]
pub struct Reporting {
    /// One `POST /api/jobs/complete` per set instead of one call per job.
    pub batched: bool,
    /// A reporter task per worker sends the results while the worker
    /// acquires again (the SDK's way); otherwise each acquired set is
    /// completed before the next acquire.
    pub pipelined: bool,
}

pub async fn e2e(
    http: &reqwest::Client,
    nodes: &[String],
    submitters: usize,
    workers: usize,
    slots: u32,
    duration: f64,
    reporting: Reporting,
) -> Result<Value> {
    let job_type = format!("e2e-{}", uuid::Uuid::new_v4());
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let submitted = Arc::new(AtomicU64::new(0));
    // Calls per completed job: how well acquires and reports are batched.
    let acquire_calls = Arc::new(AtomicU64::new(0));
    let report_calls = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let base = nodes[w % nodes.len()].clone();
        let worker_id = register(http, &base, &format!("bench-e2e-{w}"), slots, &job_type).await?;
        let (http, stop, measuring, completed) = (http.clone(), stop.clone(), measuring.clone(), completed.clone());
        let (acquire_calls, report_calls) = (acquire_calls.clone(), report_calls.clone());
        let url = parse_url(&format!("{base}/api/jobs/acquire"))?;
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"{{"workerId":"{worker_id}","maxJobs":{slots},"waitSeconds":1,"leaseSeconds":60}}"#);
            // As in the SDK: at most 2 x `slots` results wait for their
            // report's answer (each holds a report slot), so a slow reporter
            // holds the acquire loop back instead of piling up leased jobs.
            let (report_tx, reporter) = if reporting.pipelined {
                let report_slots = Arc::new(tokio::sync::Semaphore::new(2 * slots as usize));
                let (tx, rx) = tokio::sync::mpsc::channel::<Finished>(2 * slots as usize);
                let reporter = tokio::spawn(report_loop(
                    http.clone(),
                    base.clone(),
                    rx,
                    reporting.batched,
                    measuring.clone(),
                    completed.clone(),
                    report_calls.clone(),
                ));
                (Some((tx, report_slots)), Some(reporter))
            } else {
                (None, None)
            };
            while !stop.load(Ordering::Relaxed) {
                let Ok(answer) = post_to(&http, &url, body.clone()).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let Ok(acq) = serde_json::from_slice::<Acquired>(&answer) else { continue };
                if measuring.load(Ordering::Relaxed) {
                    acquire_calls.fetch_add(1, Ordering::Relaxed);
                }
                // Each acquired job's handler returns at once.
                match &report_tx {
                    Some((tx, report_slots)) => {
                        for job in acq.jobs {
                            let Ok(slot) = report_slots.clone().acquire_owned().await else { break };
                            if tx.send((job, slot)).await.is_err() {
                                break;
                            }
                        }
                    }
                    None => {
                        let done = complete_jobs(&http, &base, &acq.jobs, reporting.batched).await.unwrap_or(0);
                        if measuring.load(Ordering::Relaxed) {
                            completed.fetch_add(done, Ordering::Relaxed);
                            let calls = if reporting.batched { 1 } else { acq.jobs.len() as u64 };
                            report_calls.fetch_add(calls, Ordering::Relaxed);
                        }
                    }
                }
            }
            drop(report_tx);
            if let Some(r) = reporter {
                let _ = r.await;
            }
            let _ = http.delete(format!("{base}/api/workers/{worker_id}")).send().await;
        }));
    }
    for c in 0..submitters {
        let url = parse_url(&format!("{}/api/jobs", nodes[c % nodes.len()]))?;
        let (http, stop, measuring, submitted, job_type) =
            (http.clone(), stop.clone(), measuring.clone(), submitted.clone(), job_type.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let ok = post_to(&http, &url, submit_body(&job_type, n, true)).await.is_ok();
                if ok && measuring.load(Ordering::Relaxed) {
                    submitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(WARMUP_SECS)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let progress = rate_progress(format!("e2e completed c={submitters}"), completed.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs_f64(duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    progress.abort();
    for t in tasks {
        let _ = t.await;
    }
    let (done, sub) = (completed.load(Ordering::Relaxed) as f64, submitted.load(Ordering::Relaxed) as f64);
    let per_job = |calls: &AtomicU64| if done > 0.0 { calls.load(Ordering::Relaxed) as f64 / done } else { 0.0 };
    let (acquires_per_job, reports_per_job) = (per_job(&acquire_calls), per_job(&report_calls));
    println!(
        "e2e submitters={submitters} slots={} completed {:>8.0}/s  submitted {:>8.0}/s  calls per job: acquire {:.2} report {:.2}",
        workers as u32 * slots,
        done / elapsed,
        sub / elapsed,
        acquires_per_job,
        reports_per_job
    );
    Ok(json!({"mode": "e2e", "target": "jobsched", "submitters": submitters, "workers": workers,
              "slots": workers as u32 * slots, "batchedComplete": reporting.batched,
              "pipelinedReport": reporting.pipelined, "seconds": elapsed,
              "completedPerSecond": done / elapsed, "submittedPerSecond": sub / elapsed,
              "acquireCallsPerJob": acquires_per_job, "reportCallsPerJob": reports_per_job}))
}

pub async fn pickup(http: &reqwest::Client, nodes: &[String], samples: usize) -> Result<Value> {
    let job_type = format!("pickup-{}", uuid::Uuid::new_v4());
    let worker_id = register(http, &nodes[0], "bench-pickup", 1, &job_type).await?;
    let mut from_ack = Vec::with_capacity(samples);
    let mut from_send = Vec::with_capacity(samples);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    for i in 0..samples {
        // The worker polls one node, the client submits through another.
        let poll_node = nodes[i % nodes.len()].clone();
        let submit_node = nodes[(i + 1) % nodes.len()].clone();
        let (h, wid) = (http.clone(), worker_id.clone());
        let poll = tokio::spawn(async move {
            let v = post_raw(
                &h,
                &format!("{poll_node}/api/jobs/acquire"),
                format!(r#"{{"workerId":"{wid}","waitSeconds":10}}"#),
            )
            .await;
            (Instant::now(), v)
        });
        // Let the long poll park on the leader before submitting.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = Instant::now();
        post_raw(http, &format!("{submit_node}/api/jobs"), submit_body(&job_type, i as u64, false)).await?;
        let acked = Instant::now();
        let (picked, acquired) = poll.await?;
        let acquired: Acquired = serde_json::from_slice(&acquired?)?;
        let job = acquired.jobs.first().context("acquire returned no job")?;
        from_ack.push(picked.saturating_duration_since(acked));
        from_send.push(picked.saturating_duration_since(sent));
        complete_jobs(http, &nodes[0], std::slice::from_ref(job), false).await?;
        if (i + 1) % 50 == 0 {
            if tty {
                eprint!("\r  pickup {}/{samples}", i + 1);
            } else {
                eprintln!("  pickup {}/{samples}", i + 1);
            }
        }
    }
    end_progress();
    let _ = http.delete(format!("{}/api/workers/{worker_id}", nodes[0])).send().await;
    from_ack.sort();
    from_send.sort();
    let fig = json!({
        "mode": "pickup", "target": "jobsched", "samples": samples,
        "fromAckP50Ms": percentile_ms(&from_ack, 0.5), "fromAckP90Ms": percentile_ms(&from_ack, 0.9),
        "fromAckP99Ms": percentile_ms(&from_ack, 0.99), "fromAckMaxMs": percentile_ms(&from_ack, 1.0),
        "fromSendP50Ms": percentile_ms(&from_send, 0.5), "fromSendP90Ms": percentile_ms(&from_send, 0.9),
        "fromSendP99Ms": percentile_ms(&from_send, 0.99), "fromSendMaxMs": percentile_ms(&from_send, 1.0),
    });
    println!(
        "pickup n={samples}  after submit ack: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  |  after submit sent: p50 {:.2} ms  p99 {:.2} ms",
        percentile_ms(&from_ack, 0.5),
        percentile_ms(&from_ack, 0.9),
        percentile_ms(&from_ack, 0.99),
        percentile_ms(&from_send, 0.5),
        percentile_ms(&from_send, 0.99)
    );
    Ok(fig)
}

pub struct PreloadOpts {
    pub jobs: u64,
    pub batch: usize,
    pub concurrency: usize,
    pub job_type: String,
    pub priority: i32,
    pub request_ids: bool,
    pub finish: bool,
}

pub async fn preload(http: &reqwest::Client, nodes: &[String], o: &PreloadOpts) -> Result<Value> {
    let batch = o.batch.clamp(1, 1000) as u64;
    let requests = o.jobs.div_ceil(batch);
    let spec = LoopSpec {
        label: format!("preload {}", o.job_type),
        concurrency: o.concurrency,
        duration: 0.0,
        total: requests,
        warmup: 0.0,
    };
    let urls: Arc<Vec<String>> =
        Arc::new((0..o.concurrency).map(|c| format!("{}/api/jobs/batch", nodes[c % nodes.len()])).collect());
    let (http2, jobs, job_type, priority, request_ids) =
        (http.clone(), o.jobs, Arc::new(o.job_type.clone()), o.priority, o.request_ids);
    let stats = closed_loop(&spec, Arc::new(AtomicBool::new(false)), move |c, n| {
        let (http, urls, job_type) = (http2.clone(), urls.clone(), job_type.clone());
        async move {
            let first = n * batch;
            let count = batch.min(jobs - first) as usize;
            // Retried on failure (an election, a timeout): the preload must
            // reach its size. Without request ids a retry after an unknown
            // outcome may add a batch twice, which a preload tolerates.
            let mut tries = 0;
            loop {
                let body = batch_body(&job_type, first, count, priority, request_ids);
                match post_raw(&http, &urls[c], body).await {
                    Ok(_) => return Ok(count as u64),
                    Err(e) if tries >= 20 => return Err(e),
                    Err(_) => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    })
    .await;
    let mut fig = finish(&stats, "preload", json!({"target": "jobsched", "jobs": o.jobs, "jobType": o.job_type}));
    if stats.errors > 0 {
        bail!("preload failed: {}", stats.first_error.unwrap_or_default());
    }
    if o.finish {
        let (done, secs) = finish_all(http, nodes, &o.job_type, o.concurrency).await?;
        println!(
            "finish {}: acquired and completed {done} jobs in {secs:.1} s ({:.0}/s)",
            o.job_type,
            done as f64 / secs
        );
        if let Value::Object(m) = &mut fig {
            m.insert("finished".into(), json!(done));
            m.insert("finishSeconds".into(), json!(secs));
        }
    }
    Ok(fig)
}

/// Acquire and complete every ready job of `job_type`, 1000 per call, with
/// `concurrency` workers. Returns (jobs completed, seconds).
async fn finish_all(
    http: &reqwest::Client,
    nodes: &[String],
    job_type: &str,
    concurrency: usize,
) -> Result<(u64, f64)> {
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = rate_progress(format!("finish {job_type}"), done.clone(), stop.clone());
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let base = nodes[w % nodes.len()].clone();
        let worker_id = register(http, &base, &format!("bench-finish-{w}"), 1000, job_type).await?;
        let (http, done, job_type) = (http.clone(), done.clone(), job_type.to_owned());
        tasks.push(tokio::spawn(async move {
            let url = format!("{base}/api/jobs/acquire");
            let body = format!(r#"{{"workerId":"{worker_id}","maxJobs":1000,"waitSeconds":0,"leaseSeconds":3600}}"#);
            let mut empty = 0;
            // Two empty answers in a row: the queue is drained (one may be a
            // race with another finisher's acquisitions).
            while empty < 2 {
                let answer = match post_raw(&http, &url, body.clone()).await {
                    Ok(a) => a,
                    Err(e) => {
                        // These workers send no heartbeats: a drain longer
                        // than the worker timeout gets them declared dead.
                        // Register again under the same id and go on.
                        let msg = format!("{e:#}");
                        if msg.contains("worker_dead") || msg.contains("404") {
                            let again = json!({"workerId": worker_id, "name": format!("bench-finish-{w}"),
                                               "capacity": 1000, "jobTypes": [job_type]});
                            let _ = post_json(&http, format!("{base}/api/workers/register"), again).await;
                        } else {
                            eprintln!("  finish: {msg}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        continue;
                    }
                };
                let acq: Acquired = serde_json::from_slice(&answer)?;
                if acq.jobs.is_empty() {
                    empty += 1;
                    continue;
                }
                empty = 0;
                let n = complete_jobs(&http, &base, &acq.jobs, true).await?;
                done.fetch_add(n, Ordering::Relaxed);
            }
            let _ = http.delete(format!("{base}/api/workers/{worker_id}")).send().await;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    stop.store(true, Ordering::Relaxed);
    progress.abort();
    Ok((done.load(Ordering::Relaxed), started.elapsed().as_secs_f64()))
}

pub async fn acquire(
    http: &reqwest::Client,
    nodes: &[String],
    workers: usize,
    max_jobs: u32,
    duration: f64,
    job_type: &str,
    complete: bool,
) -> Result<Value> {
    // Workers are left registered at the end: deregistering would release
    // every job they hold in one big write. Their leases are long; a run
    // ends well before the worker timeout.
    let mut targets = Vec::new();
    for w in 0..workers {
        let base = nodes[w % nodes.len()].clone();
        let id = register(http, &base, &format!("bench-acquire-{w}"), max_jobs.max(1), job_type).await?;
        let body = format!(r#"{{"workerId":"{id}","maxJobs":{max_jobs},"waitSeconds":0,"leaseSeconds":3600}}"#);
        targets.push((base.clone(), format!("{base}/api/jobs/acquire"), body));
    }
    let targets = Arc::new(targets);
    let stop = Arc::new(AtomicBool::new(false));
    let exhausted = Arc::new(AtomicBool::new(false));
    let spec =
        LoopSpec { label: format!("acquire max={max_jobs}"), concurrency: workers, duration, total: 0, warmup: 0.0 };
    let (http2, stop2, exhausted2) = (http.clone(), stop.clone(), exhausted.clone());
    let stats = closed_loop(&spec, stop, move |c, _| {
        let (http, targets, stop, exhausted) = (http2.clone(), targets.clone(), stop2.clone(), exhausted2.clone());
        async move {
            let (base, url, body) = &targets[c];
            let answer = post_raw(&http, url, body.clone()).await?;
            let acq: Acquired = serde_json::from_slice(&answer)?;
            if acq.jobs.is_empty() {
                // The preloaded queue ran out: end the run here.
                exhausted.store(true, Ordering::Relaxed);
                stop.store(true, Ordering::Relaxed);
            }
            if complete {
                complete_jobs(&http, base, &acq.jobs, true).await?;
            }
            Ok(acq.jobs.len() as u64)
        }
    })
    .await;
    let exhausted = exhausted.load(Ordering::Relaxed);
    if exhausted {
        eprintln!("  acquire: the queue of {job_type} ran out after {:.1} s", stats.seconds);
    }
    Ok(finish(
        &stats,
        "acquire",
        json!({"target": "jobsched", "maxJobs": max_jobs, "complete": complete, "exhausted": exhausted}),
    ))
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

async fn submit_once(http: &reqwest::Client, base: &str, n: u64) -> Result<()> {
    post_raw(http, &format!("{base}/api/jobs"), submit_body("bench", n, true)).await.map(|_| ())
}

pub async fn failover(
    http: &reqwest::Client,
    nodes: &[String],
    rounds: usize,
    kill: &str,
    start: &str,
) -> Result<Value> {
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
        "mode": "failover", "target": "jobsched", "rounds": rounds,
        "medianMs": percentile_ms(&gaps, 0.5), "maxMs": percentile_ms(&gaps, 1.0), "minMs": percentile_ms(&gaps, 0.0),
    });
    println!(
        "failover rounds={rounds} median {:.0} ms  min {:.0} ms  max {:.0} ms",
        percentile_ms(&gaps, 0.5),
        percentile_ms(&gaps, 0.0),
        percentile_ms(&gaps, 1.0)
    );
    Ok(fig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }

    #[test]
    fn bodies_are_valid_json() {
        let v: Value = serde_json::from_str(&batch_body("t", 5, 3, -2, true)).unwrap();
        assert_eq!(v["jobs"].as_array().unwrap().len(), 3);
        assert_eq!(v["jobs"][2]["payload"]["n"], 7);
        assert_eq!(v["jobs"][0]["priority"], -2);
        let v: Value = serde_json::from_str(&submit_body("t", 9, false)).unwrap();
        assert_eq!(v["type"], "t");
        let jobs = [AcquiredJob { id: "a".into(), fencing_token: 4 }, AcquiredJob { id: "b".into(), fencing_token: 5 }];
        let v: Value = serde_json::from_str(&completions_body(&jobs)).unwrap();
        assert_eq!(v["completions"][1]["fencingToken"], 5);
    }
}
