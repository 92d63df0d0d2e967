//! `run`: the workload. It owns the submitter tasks, the in-process HTTP
//! workers, the fault loop, the drain and the progress line; every operation
//! it invokes becomes one `history::Event`.
//!
//! Everything talks to the cluster through the public HTTP API only, exactly
//! like an external client or a worker in another language would, so the
//! history describes what a user of the cluster could observe.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use jobsched_api::JobView;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::cluster;
use crate::history::{self, Event, Outcome, Recorder, WorkerFaultKind};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Coordinator base URLs, comma-separated.
    #[arg(long, env = "JOBSCHED_COORDINATORS", default_value = crate::LOCAL, value_delimiter = ',')]
    pub coordinators: Vec<String>,
    /// Seconds of submitting (the drain comes after).
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Keep submitting past --duration until this many faults have run
    /// (so a smoke run covers every fault once, a soak run N rounds).
    #[arg(long, default_value_t = 0)]
    pub min_faults: u64,
    /// Concurrent closed-loop submitters.
    #[arg(long, default_value_t = 4)]
    pub submitters: usize,
    /// In-process HTTP workers.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// History file (JSON lines), overwritten.
    #[arg(long)]
    pub history: PathBuf,
    /// Fault run every --fault-every seconds: `[kind: ]COMMAND`, where
    /// COMMAND is a shell command (`{leader}`, `{follower}`, `{random}`
    /// become node ids) or a built-in `@worker-kill` /
    /// `@worker-pause SECONDS`. Repeat the flag to rotate through several.
    #[arg(long = "fault-cmd")]
    pub fault_cmds: Vec<String>,
    /// Seconds between fault starts (counted from the previous fault's end,
    /// once the cluster has settled, see --settle-timeout).
    #[arg(long, default_value_t = 15.0)]
    pub fault_every: f64,
    /// After each fault, wait up to this many seconds until every node has
    /// applied what the leader had logged when the fault ended (a node back
    /// from a long partition may need a snapshot first) before the next
    /// fault may start; 0: do not wait. Each fault then tests a cluster that
    /// had recovered from the previous one, and the catch-up time is
    /// reported per fault kind.
    #[arg(long, default_value_t = 300.0)]
    pub settle_timeout: f64,
    /// After submitting stops, the drain waits for all jobs to finish; it
    /// gives up when the number of open jobs has not fallen for this many
    /// seconds (a stall), however long the backlog takes to work off.
    #[arg(long, default_value_t = 120.0)]
    pub drain_timeout: f64,
    /// Seconds one submit or completion keeps retrying before its
    /// outcome is recorded as unknown.
    #[arg(long, default_value_t = 30.0)]
    pub op_deadline: f64,
    /// Seconds before one HTTP request is abandoned (and retried elsewhere).
    #[arg(long, default_value_t = 3.0)]
    pub request_timeout: f64,
    /// Milliseconds a submit waits for its node before the same request
    /// (same requestId) also goes to the next node; 0 turns hedging off.
    /// Why 300: well above a healthy submit's p99 (tens of ms) under this
    /// workload, and well below an election (~700 ms), so a frozen or
    /// cut-off node costs a submit about this much, not a request timeout.
    #[arg(long, default_value_t = 300)]
    pub hedge_ms: u64,
    /// Lease asked for on acquire, seconds (heartbeats extend it).
    #[arg(long, default_value_t = 10)]
    pub lease_seconds: u64,
    /// Worker heartbeat period, milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub heartbeat_ms: u64,
}

#[derive(Default)]
struct Stats {
    submit_ok: AtomicU64,
    submit_failed: AtomicU64,
    submit_unknown: AtomicU64,
    /// Individual tries that got a timeout, 5xx or connection error.
    errors: AtomicU64,
    /// Submit tries sent to a second node because the first was slow.
    hedges: AtomicU64,
    acquired: AtomicU64,
    complete_ok: AtomicU64,
    complete_rejected: AtomicU64,
    complete_unknown: AtomicU64,
    faults: AtomicU64,
    faults_done: AtomicU64,
}

struct Ctx {
    http: reqwest::Client,
    nodes: Vec<String>,
    rec: Recorder,
    /// All history times are measured from here (monotonic clock).
    t0: Instant,
    job_name: String,
    stats: Stats,
    /// Give up on one logical operation (submit, complete) after this long
    /// and record its outcome as unknown.
    op_deadline: Duration,
    request_timeout: Duration,
    /// Zero: no hedging (see `submitter`).
    hedge_after: Duration,
    lease_seconds: u64,
    heartbeat_every: Duration,
    /// One planned-fault mailbox per worker slot (see `PlannedFault`).
    slots: Vec<Mutex<Option<PlannedFault>>>,
    /// Per node: `Some(until)` while submitters avoid it (see
    /// `Ctx::submit_node`).
    suspects: Mutex<Vec<Option<Instant>>>,
}

impl Ctx {
    fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }
    fn node(&self, i: usize) -> &str {
        &self.nodes[i % self.nodes.len()]
    }

    /// The node index to send the next submit to: from `i` on (round
    /// robin), the first node that is not under suspicion, or whose
    /// suspicion lapsed and that nobody is probing yet (this caller becomes
    /// the single probe); `i` itself when all are suspect. Like a careful
    /// client (a circuit breaker): without it every submitter soon sits in a
    /// request timeout on a frozen or cut-off node at once, and the measured
    /// unavailability would be the client's request timeout rather than the
    /// cluster's failover. Such a node still gets a probe every few seconds,
    /// so a cut-off old leader keeps being asked for writes it must not ack.
    fn submit_node(&self, i: usize) -> usize {
        let n = self.nodes.len();
        let now = Instant::now();
        let mut s = self.suspects.lock().unwrap();
        for k in i..i + n {
            let e = &mut s[k % n];
            match e {
                None => return k,
                Some(until) if *until <= now => {
                    // Hold the others off while this probe is in flight.
                    *until = now + self.request_timeout + Duration::from_secs(1);
                    return k;
                }
                Some(_) => {}
            }
        }
        i
    }

    /// Records how a request to node `i` went: reachable (any HTTP answer)
    /// clears its suspicion; a timeout or refused connection sets it.
    fn node_seen(&self, i: usize, reachable: bool) {
        // Why 2 s: about an election plus a node restart in the chaos runs;
        // long enough to route around a dead node, short enough to notice
        // soon that it is back.
        let n = self.nodes.len();
        self.suspects.lock().unwrap()[i % n] = (!reachable).then(|| Instant::now() + Duration::from_secs(2));
    }
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Sleeps `total` in short steps so a stop request is seen within 100 ms.
async fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let end = Instant::now() + total;
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100).min(end - Instant::now())).await;
    }
}

pub async fn run(a: RunArgs) -> Result<()> {
    let specs = a.fault_cmds.iter().map(|c| FaultSpec::parse(c)).collect::<Result<Vec<_>>>()?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let run_id = Uuid::new_v4().simple().to_string()[..8].to_string();
    let (rec, writer) = history::open(&a.history).await?;
    let ctx = Arc::new(Ctx {
        http,
        nodes: a.coordinators.clone(),
        rec,
        t0: Instant::now(),
        job_name: format!("chaos-{run_id}"),
        stats: Stats::default(),
        op_deadline: Duration::from_secs_f64(a.op_deadline),
        request_timeout: Duration::from_secs_f64(a.request_timeout),
        hedge_after: Duration::from_millis(a.hedge_ms),
        lease_seconds: a.lease_seconds,
        heartbeat_every: Duration::from_millis(a.heartbeat_ms.max(50)),
        slots: (0..a.workers).map(|_| Mutex::new(None)).collect(),
        suspects: Mutex::new(vec![None; a.coordinators.len()]),
    });
    let after_seq =
        cluster::mark_start(&ctx.http, &ctx.nodes, &format!("{}-start", ctx.job_name), Duration::from_secs(30)).await;
    ctx.rec.record(Event::Start {
        run_id: run_id.clone(),
        wall_start: chrono::Utc::now().to_rfc3339(),
        coordinators: a.coordinators.clone(),
        submitters: a.submitters,
        workers: a.workers,
        after_seq,
    });
    println!(
        "run {run_id}: {} submitters, {} workers, {:.0} s, history {}",
        a.submitters,
        a.workers,
        a.duration,
        a.history.display()
    );

    stop_faults_on_signal();
    let submit_stop = Arc::new(AtomicBool::new(false));
    let worker_stop = Arc::new(AtomicBool::new(false));
    let progress_stop = Arc::new(AtomicBool::new(false));

    let progress = tokio::spawn(progress_loop(ctx.clone(), progress_stop.clone()));
    let workers: Vec<_> = (0..a.workers).map(|w| tokio::spawn(worker(ctx.clone(), w, worker_stop.clone()))).collect();
    let submitters: Vec<_> =
        (0..a.submitters).map(|i| tokio::spawn(submitter(ctx.clone(), i, submit_stop.clone()))).collect();
    let faults = (!specs.is_empty() && a.fault_every > 0.0)
        .then(|| tokio::spawn(fault_loop(ctx.clone(), specs, a.fault_every, a.settle_timeout, submit_stop.clone())));

    tokio::time::sleep(Duration::from_secs_f64(a.duration)).await;
    if faults.is_some() {
        while ctx.stats.faults_done.load(Ordering::Relaxed) < a.min_faults {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    submit_stop.store(true, Ordering::Relaxed);
    ctx.rec.record(Event::SubmitStop { t_ms: ctx.ms() });
    println!("t={:.1}s: stop submitting; waiting for in-flight submits and faults", ctx.t0.elapsed().as_secs_f64());
    for s in submitters {
        s.await?;
    }
    // A fault in progress runs to its end (its restart half included), so the
    // drain starts with every node back.
    if let Some(f) = faults {
        f.await?;
    }

    let (drained, remaining) = drain(&ctx, Duration::from_secs_f64(a.drain_timeout)).await;
    ctx.rec.record(Event::DrainEnd { t_ms: ctx.ms(), drained, remaining });
    println!(
        "t={:.1}s: drain {} ({remaining} of our jobs not terminal)",
        ctx.t0.elapsed().as_secs_f64(),
        if drained { "done" } else { "TIMED OUT" }
    );
    worker_stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    progress_stop.store(true, Ordering::Relaxed);
    progress.await?;
    print_progress(&ctx);
    // Every Recorder clone lives in `ctx`; dropping the last one ends the writer.
    drop(ctx);
    writer.await??;
    Ok(())
}

async fn progress_loop(ctx: Arc<Ctx>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        sleep_unless(&stop, Duration::from_secs(5)).await;
        if !stop.load(Ordering::Relaxed) {
            print_progress(&ctx);
        }
    }
}

fn print_progress(ctx: &Ctx) {
    let s = &ctx.stats;
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "t={:6.1}s submits ok={} failed={} unknown={} | errors={} hedges={} | acquired={} completes ok={} rejected={} unknown={} | faults={}",
        ctx.t0.elapsed().as_secs_f64(),
        g(&s.submit_ok),
        g(&s.submit_failed),
        g(&s.submit_unknown),
        g(&s.errors),
        g(&s.hedges),
        g(&s.acquired),
        g(&s.complete_ok),
        g(&s.complete_rejected),
        g(&s.complete_unknown),
        g(&s.faults),
    );
}

fn error_code(body: &Value) -> Option<String> {
    body.pointer("/error/code").and_then(Value::as_str).map(str::to_string)
}

/// Closed loop: one submit at a time, each with a fresh request id that all
/// of its retries reuse, so a retry can never create a second job.
/// How one try of a submit ended.
enum TryEnd {
    /// 2xx with the job's id: acknowledged.
    Acked(u16, Uuid),
    /// 4xx: a definite refusal.
    Refused(u16, Option<String>),
    /// 5xx, transport error, timeout or a lost body: the outcome of this try
    /// is unknown and the submit goes on elsewhere.
    Failed(Option<u16>, String),
}

async fn submit_try(ctx: Arc<Ctx>, node_idx: usize, body: Arc<Value>) -> TryEnd {
    let node = ctx.node(node_idx).to_string();
    let res = ctx.http.post(format!("{node}/api/jobs")).json(&*body).timeout(ctx.request_timeout).send().await;
    ctx.node_seen(node_idx, res.is_ok());
    match res {
        Ok(r) if r.status().is_success() => {
            let st = r.status().as_u16();
            match r.json::<JobView>().await {
                Ok(j) => TryEnd::Acked(st, j.id),
                // The body was lost on the way: the outcome is unknown, and
                // a retry will return the same job.
                Err(e) => TryEnd::Failed(Some(st), e.to_string()),
            }
        }
        Ok(r) => {
            let st = r.status().as_u16();
            let code = r.json::<Value>().await.ok().and_then(|b| error_code(&b));
            if (500..600).contains(&st) {
                TryEnd::Failed(Some(st), code.unwrap_or_else(|| "5xx".into()))
            } else {
                TryEnd::Refused(st, code)
            }
        }
        Err(e) => TryEnd::Failed(None, if e.is_timeout() { "timeout".into() } else { format!("transport: {e}") }),
    }
}

/// Pause before the `n`th retry (1-based) after failed tries. Why short at
/// first: a 503 from a relay that lost its leader, or a refused connection,
/// usually means the cluster has just moved on, so the next node is likely to
/// answer at once; a run of failures (an election everywhere) backs off to
/// 100 ms so we do not hot-loop, without hiding the moment writes are
/// accepted again by more than that.
fn retry_pause(n: u32) -> Duration {
    Duration::from_millis(match n {
        0 | 1 => 10,
        2 => 50,
        _ => 100,
    })
}

async fn submitter(ctx: Arc<Ctx>, i: usize, stop: Arc<AtomicBool>) {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        // Each submit starts on the next node (round robin), so the load and
        // the faults' effects are spread over every node instead of all
        // submitters piling onto whichever node survived the last fault.
        let mut node_idx = i + seq as usize;
        let request_id = Uuid::new_v4().to_string();
        let body = Arc::new(json!({
            "name": ctx.job_name, "type": "chaos", "payload": {"submitter": i, "seq": seq},
            "maxRetries": 3, "requestId": request_id,
        }));
        let invoke_ms = ctx.ms();
        let deadline = Instant::now() + ctx.op_deadline;
        let mut tries = 0u32;
        let mut failures_in_a_row = 0u32;
        let mut ambiguous = false;
        // Tries in flight, each tagged with its node. Dropping the set (once
        // the op ends) abandons the others: safe, they carry the same
        // requestId, so at most one job exists whichever of them lands.
        let mut inflight: tokio::task::JoinSet<(String, TryEnd)> = tokio::task::JoinSet::new();
        let mut last_node = String::new();
        let mut last_err: (Option<u16>, String) = (None, String::new());
        let (outcome, job_id, status, error, node) = loop {
            if inflight.is_empty() {
                if tries > 0 {
                    if Instant::now() >= deadline {
                        break (Outcome::Unknown, None, last_err.0, Some(last_err.1), last_node);
                    }
                    tokio::time::sleep(retry_pause(failures_in_a_row)).await;
                }
                tries += 1;
                node_idx = ctx.submit_node(node_idx);
                let node = ctx.node(node_idx).to_string();
                let c = ctx.clone();
                let b = body.clone();
                let n = node_idx;
                inflight.spawn(async move { (node, submit_try(c, n, b).await) });
            }
            // Hedging: a node that does not answer within --hedge-ms (frozen,
            // cut off, or relaying to a leader that is) gets company: the same
            // request goes to the next node while the first try stays open.
            // Without it every submitter soon sits out a full request timeout
            // on such a node and the measured unavailability is the client's
            // timeout, not the cluster's failover (the Tail at Scale hedged
            // request; safe only because of the requestId).
            let may_hedge = !ctx.hedge_after.is_zero() && inflight.len() < 2;
            let hedge = async {
                if !may_hedge {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(ctx.hedge_after).await;
            };
            let joined = tokio::select! {
                j = inflight.join_next() => j,
                _ = hedge => {
                    // The slow node is suspect from now on, so the others
                    // stop queueing behind it too.
                    ctx.node_seen(node_idx, false);
                    add(&ctx.stats.hedges);
                    tries += 1;
                    node_idx = ctx.submit_node(node_idx + 1);
                    let node = ctx.node(node_idx).to_string();
                    let c = ctx.clone();
                    let b = body.clone();
                    let n = node_idx;
                    inflight.spawn(async move { (node, submit_try(c, n, b).await) });
                    continue;
                }
            };
            let Some(Ok((node, end))) = joined else { continue };
            last_node = node.clone();
            match end {
                TryEnd::Acked(st, id) => break (Outcome::Ok, Some(id.to_string()), Some(st), None, node),
                TryEnd::Refused(st, code) => {
                    // A definite rejection. After an ambiguous try (or with
                    // another still open) it is still possible that one of the
                    // others created the job: an idempotent retry should have
                    // returned it, but we do not assume.
                    let o = if ambiguous || !inflight.is_empty() { Outcome::Unknown } else { Outcome::Failed };
                    break (o, None, Some(st), code, node);
                }
                TryEnd::Failed(st, err) => {
                    ambiguous = true;
                    failures_in_a_row += 1;
                    add(&ctx.stats.errors);
                    last_err = (st, err);
                    node_idx += 1;
                }
            }
        };
        drop(inflight);
        match outcome {
            Outcome::Ok => add(&ctx.stats.submit_ok),
            Outcome::Failed => add(&ctx.stats.submit_failed),
            Outcome::Unknown => add(&ctx.stats.submit_unknown),
        }
        ctx.rec.record(Event::Submit {
            submitter: i,
            request_id,
            invoke_ms,
            return_ms: ctx.ms(),
            node,
            tries,
            job_id,
            outcome,
            status,
            error,
        });
        if outcome == Outcome::Failed {
            // A definite rejection of a valid job is unexpected; do not spin.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// POST with retries on other nodes for transport errors and 5xx; returns
/// the first definite answer (status, body) or None at the deadline.
async fn post_definite(ctx: &Ctx, node_idx: &mut usize, path: &str, body: &Value) -> Option<(u16, Value, String)> {
    let deadline = Instant::now() + ctx.op_deadline;
    loop {
        let node = ctx.node(*node_idx).to_string();
        match ctx.http.post(format!("{node}{path}")).json(body).timeout(ctx.request_timeout).send().await {
            Ok(r) if !r.status().is_server_error() => {
                let st = r.status().as_u16();
                let v = r.json::<Value>().await.unwrap_or(Value::Null);
                return Some((st, v, node));
            }
            _ => {}
        }
        add(&ctx.stats.errors);
        *node_idx += 1;
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn register(ctx: &Ctx, w: usize, id: Uuid, node_idx: &mut usize, stop: &AtomicBool) -> bool {
    let body = json!({"workerId": id, "name": format!("{}-w{w}", ctx.job_name), "capacity": 8, "jobTypes": ["chaos"]});
    while !stop.load(Ordering::Relaxed) {
        if let Some((st, _, _)) = post_definite(ctx, node_idx, "/api/workers/register", &body).await {
            if (200..300).contains(&st) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Jobs a worker holds right now: job id -> fencing token. Shared with its
/// heartbeat task, which reports them so their leases stay alive.
type Held = Arc<Mutex<HashMap<Uuid, u64>>>;

/// A worker fault waiting for its victim: the worker slot takes it right
/// after its next acquire that returned jobs, so the fault always hits a
/// worker that holds work (a fault on an idle worker would test nothing).
pub struct PlannedFault {
    index: usize,
    kind: WorkerFaultKind,
    frozen: Duration,
    done: oneshot::Sender<()>,
}

/// One worker slot: several incarnations (a killed worker is replaced by a
/// fresh one under a new id), speaking only the public HTTP protocol:
/// register, long-poll acquire, heartbeat the held jobs, complete with the
/// fencing token.
async fn worker(ctx: Arc<Ctx>, w: usize, stop: Arc<AtomicBool>) {
    let mut node_idx = w;
    loop {
        let id = Uuid::new_v4();
        if !register(&ctx, w, id, &mut node_idx, &stop).await {
            return;
        }
        match incarnation(&ctx, w, id, &mut node_idx, &stop).await {
            Exit::Killed => continue,
            Exit::Stopped => {
                let _ = ctx
                    .http
                    .delete(format!("{}/api/workers/{id}", ctx.node(node_idx)))
                    .timeout(ctx.request_timeout)
                    .send()
                    .await;
                return;
            }
        }
    }
}

enum Exit {
    /// Killed by a worker fault: held jobs abandoned, no deregistration.
    Killed,
    /// The run is over.
    Stopped,
}

async fn incarnation(ctx: &Arc<Ctx>, w: usize, id: Uuid, node_idx: &mut usize, stop: &AtomicBool) -> Exit {
    let held: Held = Arc::default();
    let hb_stop = Arc::new(AtomicBool::new(false));
    let frozen = Arc::new(AtomicBool::new(false));
    let hb = tokio::spawn(heartbeat_loop(ctx.clone(), w, id, held.clone(), hb_stop.clone(), frozen.clone()));
    let acquire = json!({
        "workerId": id, "jobTypes": ["chaos"], "maxJobs": 8,
        "leaseSeconds": ctx.lease_seconds, "waitSeconds": 1,
    });
    while !stop.load(Ordering::Relaxed) {
        let node = ctx.node(*node_idx).to_string();
        // The long poll holds the request up to waitSeconds on the server, so
        // the client timeout must be longer than that.
        let res = ctx
            .http
            .post(format!("{node}/api/jobs/acquire"))
            .json(&acquire)
            .timeout(ctx.request_timeout + Duration::from_secs(1))
            .send()
            .await;
        let jobs: Vec<JobView> = match res {
            Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                Ok(v) => serde_json::from_value(v["jobs"].clone()).unwrap_or_default(),
                Err(_) => continue,
            },
            Ok(r) if r.status() == 409 || r.status() == 404 => {
                // worker_dead (e.g. declared dead while the cluster was down):
                // register again under the same id.
                register(ctx, w, id, node_idx, stop).await;
                continue;
            }
            _ => {
                add(&ctx.stats.errors);
                *node_idx += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut list = Vec::new();
        for j in &jobs {
            let token = j.fencing_token.unwrap_or(0);
            add(&ctx.stats.acquired);
            ctx.rec.record(Event::Acquire {
                worker: w,
                t_ms: ctx.ms(),
                node: node.clone(),
                job_id: j.id.to_string(),
                attempt: j.attempt,
                token,
            });
            held.lock().unwrap().insert(j.id, token);
            list.push((j.id.to_string(), token));
        }
        let planned = if jobs.is_empty() { None } else { ctx.slots[w].lock().unwrap().take() };
        if let Some(p) = planned {
            ctx.rec.record(Event::WorkerFault {
                index: p.index,
                t_ms: ctx.ms(),
                worker: w,
                kind: p.kind,
                frozen_ms: p.frozen.as_millis() as u64,
                jobs: list,
            });
            match p.kind {
                WorkerFaultKind::Kill => {
                    // Like kill -9: no more heartbeats, no reports, no goodbye.
                    hb.abort();
                    let _ = p.done.send(());
                    return Exit::Killed;
                }
                WorkerFaultKind::Pause => {
                    // Like SIGSTOP: the heartbeat task skips its beats and
                    // the jobs sit untouched; afterwards the worker carries on
                    // as if nothing happened and reports them.
                    frozen.store(true, Ordering::SeqCst);
                    tokio::time::sleep(p.frozen).await;
                    frozen.store(false, Ordering::SeqCst);
                    ctx.rec.record(Event::WorkerResume { index: p.index, t_ms: ctx.ms(), worker: w });
                    let _ = p.done.send(());
                }
            }
        }
        let mut set = tokio::task::JoinSet::new();
        for j in jobs {
            let token = j.fencing_token.unwrap_or(0);
            let (ctx, held) = (ctx.clone(), held.clone());
            let start_idx = *node_idx + 1;
            set.spawn(async move {
                // Simulated work, long enough that faults land mid-job.
                tokio::time::sleep(Duration::from_millis(20)).await;
                // About 1 job in 16 fails its first attempt, deterministically
                // by id, so the retry path (Failed -> Pending) is exercised.
                let success = !(j.attempt <= 1 && j.id.as_bytes()[15] % 16 == 0);
                complete(&ctx, w, start_idx, j.id, token, success).await;
                held.lock().unwrap().remove(&j.id);
            });
        }
        while set.join_next().await.is_some() {}
    }
    hb_stop.store(true, Ordering::Relaxed);
    let _ = hb.await;
    Exit::Stopped
}

async fn complete(ctx: &Ctx, w: usize, mut node_idx: usize, job: Uuid, token: u64, success: bool) {
    let body = if success {
        json!({"fencingToken": token, "success": true, "result": {"worker": w}})
    } else {
        json!({"fencingToken": token, "success": false, "error": "chaos: planned first-attempt failure"})
    };
    let invoke_ms = ctx.ms();
    let res = post_definite(ctx, &mut node_idx, &format!("/api/jobs/{job}/complete"), &body).await;
    let (status, code, node) = match res {
        Some((st, v, node)) => (st, error_code(&v), node),
        None => (0, None, ctx.node(node_idx).to_string()),
    };
    match status {
        200..=299 => add(&ctx.stats.complete_ok),
        0 => add(&ctx.stats.complete_unknown),
        _ => add(&ctx.stats.complete_rejected),
    }
    ctx.rec.record(Event::Complete {
        worker: w,
        invoke_ms,
        return_ms: ctx.ms(),
        node,
        job_id: job.to_string(),
        token,
        success,
        status,
        code,
    });
}

async fn heartbeat_loop(ctx: Arc<Ctx>, w: usize, id: Uuid, held: Held, stop: Arc<AtomicBool>, frozen: Arc<AtomicBool>) {
    let mut node_idx = w + 1;
    // Why this period (--heartbeat-ms, 2 s by default): a few beats per
    // lease, so one beat lost to a fault (and the request timeout it costs)
    // does not let a healthy worker's leases run out.
    while !stop.load(Ordering::Relaxed) {
        sleep_unless(&stop, ctx.heartbeat_every).await;
        if frozen.load(Ordering::SeqCst) {
            continue;
        }
        let jobs: Vec<Value> =
            held.lock().unwrap().iter().map(|(j, t)| json!({"jobId": j, "fencingToken": t})).collect();
        let node = ctx.node(node_idx).to_string();
        let res = ctx
            .http
            .post(format!("{node}/api/workers/{id}/heartbeat"))
            .json(&json!({"jobs": jobs}))
            .timeout(ctx.request_timeout)
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => {
                let v = r.json::<Value>().await.unwrap_or(Value::Null);
                for j in v["revokedJobs"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                    ctx.rec.record(Event::Revoked { worker: w, t_ms: ctx.ms(), job_id: j.to_string() });
                }
            }
            Ok(r) if r.status() == 409 || r.status() == 404 => {
                register(&ctx, w, id, &mut node_idx, &stop).await;
            }
            _ => node_idx += 1,
        }
    }
}

/// Polls (by status, see `cluster::open_jobs`) until none of this run's jobs
/// is Pending, Running or Failed, or
/// their number has not fallen for `stall` (the workers' pace depends on the
/// machine, so a fixed deadline would fail a healthy run with a large
/// backlog). Returns (drained, how many were left).
async fn drain(ctx: &Ctx, stall: Duration) -> (bool, usize) {
    let mut last_progress = Instant::now();
    let mut remaining = usize::MAX;
    let mut zero_reads = 0;
    loop {
        if let Ok(jobs) = cluster::open_jobs(&ctx.http, &ctx.nodes).await {
            let open = jobs.iter().filter(|j| j.name == ctx.job_name).count();
            // Two empty reads in a row: the three status lists are read one
            // after another, so a job moving between them (a lease expiring
            // sends Running back to Pending) can be missed by one read.
            zero_reads = if open == 0 { zero_reads + 1 } else { 0 };
            if zero_reads == 2 {
                return (true, 0);
            }
            if open < remaining {
                last_progress = Instant::now();
            }
            remaining = open;
        }
        if last_progress.elapsed() >= stall {
            return (false, remaining);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One `--fault-cmd`: an optional `kind: ` label, then a shell command or
/// a built-in `@worker-kill` / `@worker-pause SECONDS`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    pub kind: String,
    pub action: FaultAction,
}

#[derive(Debug, Clone, PartialEq)]
pub enum FaultAction {
    Shell(String),
    Worker(WorkerFaultKind, Duration),
}

impl FaultSpec {
    pub fn parse(s: &str) -> Result<FaultSpec> {
        let s = s.trim();
        let (label, rest) = match s.split_once(": ") {
            Some((l, r)) if !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') => {
                (Some(l.to_string()), r.trim())
            }
            _ => (None, s),
        };
        let action = if let Some(builtin) = rest.strip_prefix('@') {
            let mut words = builtin.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("worker-kill"), None, None) => FaultAction::Worker(WorkerFaultKind::Kill, Duration::ZERO),
                (Some("worker-pause"), Some(secs), None) => {
                    let secs: f64 = secs.parse().map_err(|_| anyhow::anyhow!("@worker-pause: bad seconds {secs:?}"))?;
                    FaultAction::Worker(WorkerFaultKind::Pause, Duration::from_secs_f64(secs))
                }
                _ => anyhow::bail!("unknown built-in fault {rest:?} (known: @worker-kill, @worker-pause SECONDS)"),
            }
        } else {
            FaultAction::Shell(rest.to_string())
        };
        let kind = label.unwrap_or_else(|| rest.split_whitespace().next().unwrap_or("fault").to_string());
        Ok(FaultSpec { kind, action })
    }
}

/// A small xorshift generator: fault targets need variety, not quality, and
/// the seed is printed so a run's choices can be told apart.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Every `every` seconds: find the leader, substitute node ids for
/// `{leader}`, `{follower}` (a random other node) and `{random}` (any node;
/// node ids are taken to be 1..=N in the order of --coordinators) in the next
/// fault (round robin) and run it, waiting for it to finish before the next
/// period starts counting, so faults never overlap.
async fn fault_loop(ctx: Arc<Ctx>, specs: Vec<FaultSpec>, every: f64, settle: f64, stop: Arc<AtomicBool>) {
    let mut rng = Rng(u64::from_le_bytes(Uuid::new_v4().as_bytes()[..8].try_into().unwrap_or([7; 8])) | 1);
    let n = ctx.nodes.len() as u64;
    let mut index = 0usize;
    loop {
        sleep_unless(&stop, Duration::from_secs_f64(every)).await;
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let spec = &specs[index % specs.len()];
        // Always look for the leader (for the record); wait for one when the
        // command needs it: during an election there is briefly none.
        let needs_leader =
            matches!(&spec.action, FaultAction::Shell(c) if c.contains("{leader}") || c.contains("{follower}"));
        let mut leader = cluster::leader(&ctx.http, &ctx.nodes).await;
        let end = Instant::now() + Duration::from_secs(10);
        while needs_leader && leader.is_none() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(200)).await;
            leader = cluster::leader(&ctx.http, &ctx.nodes).await;
        }
        if needs_leader && leader.is_none() {
            // Counted as done so --min-faults cannot wait forever on a
            // cluster without a leader (the drain and check then fail).
            println!("fault {index}: no leader found within 10 s, skipped");
            add(&ctx.stats.faults_done);
            index += 1;
            continue;
        }
        let (cmd, target) = match &spec.action {
            FaultAction::Shell(c) => {
                let mut target = None;
                let mut cmd = c.clone();
                if cmd.contains("{leader}") {
                    target = leader;
                } else if cmd.contains("{follower}") {
                    let l = leader.unwrap_or(1);
                    let others: Vec<u64> = (1..=n).filter(|&i| i != l).collect();
                    target = others.get(rng.below(others.len() as u64) as usize).copied();
                } else if cmd.contains("{random}") {
                    target = Some(1 + rng.below(n));
                }
                let t = target.map(|t| t.to_string()).unwrap_or_default();
                for k in ["{leader}", "{follower}", "{random}"] {
                    cmd = cmd.replace(k, &t);
                }
                (cmd, target)
            }
            FaultAction::Worker(k, d) => (format!("@worker-{k:?} {:.1}s", d.as_secs_f64()).to_lowercase(), None),
        };
        add(&ctx.stats.faults);
        ctx.rec.record(Event::FaultStart {
            index,
            t_ms: ctx.ms(),
            kind: spec.kind.clone(),
            leader,
            target,
            cmd: cmd.clone(),
        });
        println!("t={:.1}s fault {index} [{}]: {cmd}", ctx.t0.elapsed().as_secs_f64(), spec.kind);
        let exit_code = match &spec.action {
            FaultAction::Shell(_) => run_fault_command(index, &cmd).await,
            FaultAction::Worker(kind, frozen) => worker_fault(&ctx, &mut rng, index, *kind, *frozen).await,
        };
        ctx.rec.record(Event::FaultEnd { index, t_ms: ctx.ms(), exit_code });
        if settle > 0.0 {
            let started = Instant::now();
            let caught_up = wait_settled(&ctx, Duration::from_secs_f64(settle), &stop).await;
            ctx.rec.record(Event::Settled { index, t_ms: ctx.ms(), caught_up });
            println!(
                "t={:.1}s fault {index}: {} after {:.1} s",
                ctx.t0.elapsed().as_secs_f64(),
                if caught_up { "every node caught up" } else { "nodes still behind, gave up waiting" },
                started.elapsed().as_secs_f64()
            );
        }
        add(&ctx.stats.faults_done);
        index += 1;
    }
}

/// Waits until one leader is agreed by every node and every node has applied
/// at least the leader's last log index as first seen here; false when
/// `limit` passes (or the run stops) first.
async fn wait_settled(ctx: &Ctx, limit: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + limit;
    let mut target: Option<u64> = None;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let mut views = Vec::new();
        for n in &ctx.nodes {
            let r = ctx.http.get(format!("{n}/api/cluster")).timeout(Duration::from_secs(1)).send().await;
            match r {
                Ok(r) => views.push(r.json::<jobsched_api::ClusterView>().await.ok()),
                Err(_) => views.push(None),
            }
        }
        let leader = views.iter().flatten().filter(|v| v.role == "Leader").max_by_key(|v| v.term);
        if target.is_none() {
            target = leader.and_then(|l| l.last_log_index);
        }
        if let (Some(t), Some(l)) = (target, leader) {
            let all_follow = views.iter().all(|v| v.as_ref().is_some_and(|v| v.leader_id == Some(l.node_id)));
            let all_applied =
                views.iter().all(|v| v.as_ref().and_then(|v| v.last_applied_index).is_some_and(|a| a >= t));
            if all_follow && all_applied {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Process group of the fault command running now (0: none); see
/// [`run_fault_command`] and [`stop_faults_on_signal`].
static FAULT_GROUP: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Runs one shell fault command in a process group of its own and returns
/// its exit code. Why the group: the command's second half (restart, heal)
/// often runs seconds later (`kill N && sleep 2; start N`); if this tool
/// is interrupted meanwhile, that half must not run later against whatever
/// cluster is up by then (a new run's). The group lets the signal handler
/// end the command and all its children at once, and the parent-death
/// signal ends the shell even if this tool is killed with SIGKILL.
async fn run_fault_command(index: usize, cmd: &str) -> Option<i32> {
    let mut command = tokio::process::Command::new("sh");
    command.arg("-c").arg(cmd).stdout(std::process::Stdio::null()).process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            println!("fault {index}: could not run: {e}");
            return None;
        }
    };
    FAULT_GROUP.store(child.id().map_or(0, |p| p as i32), Ordering::SeqCst);
    let status = child.wait().await;
    FAULT_GROUP.store(0, Ordering::SeqCst);
    match status {
        Ok(s) => s.code(),
        Err(e) => {
            println!("fault {index}: {e}");
            None
        }
    }
}

/// On SIGINT or SIGTERM: kill the running fault command's whole process
/// group (see [`run_fault_command`]), then exit 130. The history written so
/// far stays on disk; the cluster may be left with a node down or cut off
/// (`scripts/chaos.sh` tears it down).
pub fn stop_faults_on_signal() {
    tokio::spawn(async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let group = FAULT_GROUP.load(Ordering::SeqCst);
        if group > 0 {
            // SAFETY: plain syscall; a negative pid addresses the group.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            eprintln!("interrupted: killed the running fault command (process group {group})");
        }
        std::process::exit(130);
    });
}

/// Plans a worker fault on a random worker slot and waits until the worker
/// took it and (for a pause) resumed. Exit code 0, or 1 when no worker
/// acquired a job within 20 s (the planned fault is withdrawn).
async fn worker_fault(ctx: &Ctx, rng: &mut Rng, index: usize, kind: WorkerFaultKind, frozen: Duration) -> Option<i32> {
    if ctx.slots.is_empty() {
        return Some(1);
    }
    let w = rng.below(ctx.slots.len() as u64) as usize;
    let (tx, rx) = oneshot::channel();
    *ctx.slots[w].lock().unwrap() = Some(PlannedFault { index, kind, frozen, done: tx });
    let wait = Duration::from_secs(25) + frozen;
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(())) => Some(0),
        _ => {
            ctx.slots[w].lock().unwrap().take();
            println!("fault {index}: worker {w} acquired nothing within {} s", wait.as_secs());
            Some(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse() {
        let s = FaultSpec::parse("leader-kill: scripts/cluster.sh kill {leader}; sleep 2").unwrap();
        assert_eq!(s.kind, "leader-kill");
        assert_eq!(s.action, FaultAction::Shell("scripts/cluster.sh kill {leader}; sleep 2".into()));
        // No label: the kind is the command's first word.
        let s = FaultSpec::parse("scripts/cluster.sh pause {leader}").unwrap();
        assert_eq!(s.kind, "scripts/cluster.sh");
        let s = FaultSpec::parse("wp: @worker-pause 8.5").unwrap();
        assert_eq!(s.action, FaultAction::Worker(WorkerFaultKind::Pause, Duration::from_millis(8500)));
        let s = FaultSpec::parse("@worker-kill").unwrap();
        assert_eq!(
            (s.kind.as_str(), s.action),
            ("@worker-kill", FaultAction::Worker(WorkerFaultKind::Kill, Duration::ZERO))
        );
        assert!(FaultSpec::parse("@worker-pause").is_err());
        assert!(FaultSpec::parse("@worker-pause soon").is_err());
        assert!(FaultSpec::parse("@reboot").is_err());
    }
}
