//! The worker runtime against a small in-memory fake of the coordinator API
//! (real HTTP on 127.0.0.1:0). The fake checks fencing tokens and records
//! every call, so these tests pin down the worker's side of the protocol:
//! registration, long-poll pickup, token-carrying results, timeouts,
//! revocation, re-registration, capacity, and the drain on shutdown. The
//! real cluster is exercised by the workspace's integration tests.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use jobsched_api::{
    AcquireRequest, AcquireResponse, CompleteRequest, HeartbeatRequest, HeartbeatResponse, HeldJob, JobView,
    RegisterWorkerRequest, ReleaseRequest, WorkerView,
};
use jobsched_worker::{CancellationToken, WorkerConfig};
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Debug, Clone)]
enum Event {
    Register(RegisterWorkerRequest),
    Acquire(u32),
    Complete(Uuid, CompleteRequest),
    Release(Uuid, u64),
    Heartbeat(Vec<HeldJob>),
    Deregister(Uuid),
}

#[derive(Default)]
struct Fake {
    queue: VecDeque<JobView>,
    next_token: u64,
    /// job -> token of its current lease
    running: HashMap<Uuid, u64>,
    max_running: usize,
    events: Vec<Event>,
    /// Leases to revoke at the next heartbeat that reports them.
    revoke: HashSet<Uuid>,
    /// Answer the next heartbeat with 409 worker_dead.
    dead_once: bool,
    /// Answer this many completions with 503 first.
    failing_completions: u32,
}

type Shared = Arc<Mutex<Fake>>;

fn err(status: u16, code: &str) -> Response {
    (StatusCode::from_u16(status).unwrap(), Json(json!({"error": {"code": code, "message": code}}))).into_response()
}

fn worker_view(id: Uuid) -> WorkerView {
    let now = chrono::Utc::now();
    WorkerView {
        id,
        name: "w".into(),
        capacity: 1,
        job_types: vec![],
        status: "Active".into(),
        registered_at: now,
        last_heartbeat_at: now,
    }
}

async fn register(State(s): State<Shared>, Json(req): Json<RegisterWorkerRequest>) -> Response {
    let id = req.worker_id.unwrap_or_else(Uuid::new_v4);
    s.lock().unwrap().events.push(Event::Register(req));
    (StatusCode::CREATED, Json(worker_view(id))).into_response()
}

async fn acquire(State(s): State<Shared>, Json(req): Json<AcquireRequest>) -> Response {
    let max = req.max_jobs.unwrap_or(1);
    s.lock().unwrap().events.push(Event::Acquire(max));
    let deadline = Instant::now() + Duration::from_secs_f64(req.wait_seconds.unwrap_or(0.0));
    loop {
        {
            let mut f = s.lock().unwrap();
            if !f.queue.is_empty() {
                let mut jobs = Vec::new();
                while jobs.len() < max as usize {
                    let Some(mut job) = f.queue.pop_front() else { break };
                    f.next_token += 1;
                    job.fencing_token = Some(f.next_token);
                    job.attempt += 1;
                    job.status = "Running".into();
                    job.worker_id = Some(req.worker_id);
                    let token = f.next_token;
                    f.running.insert(job.id, token);
                    jobs.push(job);
                }
                f.max_running = f.max_running.max(f.running.len());
                return Json(AcquireResponse { jobs }).into_response();
            }
        }
        if Instant::now() >= deadline {
            return Json(AcquireResponse { jobs: vec![] }).into_response();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn complete(State(s): State<Shared>, Path(id): Path<Uuid>, Json(req): Json<CompleteRequest>) -> Response {
    let mut f = s.lock().unwrap();
    if f.failing_completions > 0 {
        f.failing_completions -= 1;
        return err(503, "no_leader");
    }
    f.events.push(Event::Complete(id, req.clone()));
    if f.running.get(&id) != Some(&req.fencing_token) {
        return err(409, "stale_token");
    }
    f.running.remove(&id);
    let mut job = new_job("done", json!({}), None);
    job.id = id;
    job.status = if req.success { "Completed" } else { "Failed" }.into();
    Json(job).into_response()
}

async fn release(State(s): State<Shared>, Path(id): Path<Uuid>, Json(req): Json<ReleaseRequest>) -> Response {
    let mut f = s.lock().unwrap();
    f.events.push(Event::Release(id, req.fencing_token));
    if f.running.get(&id) != Some(&req.fencing_token) {
        return err(409, "stale_token");
    }
    f.running.remove(&id);
    let mut job = new_job("released", json!({}), None);
    job.id = id;
    Json(job).into_response()
}

async fn heartbeat(State(s): State<Shared>, Path(id): Path<Uuid>, Json(req): Json<HeartbeatRequest>) -> Response {
    let mut f = s.lock().unwrap();
    let jobs = req.jobs.unwrap_or_default();
    f.events.push(Event::Heartbeat(jobs.clone()));
    if std::mem::take(&mut f.dead_once) {
        return err(409, "worker_dead");
    }
    let mut revoked = Vec::new();
    for j in jobs {
        if f.revoke.remove(&j.job_id) {
            f.running.remove(&j.job_id);
        }
        if f.running.get(&j.job_id) != Some(&j.fencing_token) {
            revoked.push(j.job_id);
        }
    }
    Json(HeartbeatResponse { worker: worker_view(id), revoked_jobs: revoked }).into_response()
}

async fn deregister(State(s): State<Shared>, Path(id): Path<Uuid>) -> Response {
    s.lock().unwrap().events.push(Event::Deregister(id));
    StatusCode::OK.into_response()
}

async fn fake_coordinator() -> (String, Shared) {
    let state: Shared = Arc::default();
    let app = Router::new()
        .route("/api/workers/register", post(register))
        .route("/api/jobs/acquire", post(acquire))
        .route("/api/jobs/{id}/complete", post(complete))
        .route("/api/jobs/{id}/release", post(release))
        .route("/api/workers/{id}/heartbeat", post(heartbeat))
        .route("/api/workers/{id}", delete(deregister))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

fn new_job(job_type: &str, payload: Value, timeout_seconds: Option<f64>) -> JobView {
    let now = chrono::Utc::now();
    JobView {
        id: Uuid::new_v4(),
        name: job_type.into(),
        job_type: job_type.into(),
        payload,
        priority: 0,
        max_retries: 3,
        attempt: 0,
        status: "Pending".into(),
        worker_id: None,
        fencing_token: None,
        lease_expires_at: None,
        run_at: now,
        timeout_seconds,
        created_at: now,
        started_at: None,
        completed_at: None,
        updated_at: now,
        last_error: None,
        result: None,
        request_id: None,
    }
}

fn submit(s: &Shared, job_type: &str, payload: Value, timeout_seconds: Option<f64>) -> Uuid {
    let job = new_job(job_type, payload, timeout_seconds);
    let id = job.id;
    s.lock().unwrap().queue.push_back(job);
    id
}

fn config(url: &str, capacity: u32, drain_seconds: f64) -> WorkerConfig {
    WorkerConfig {
        coordinators: vec![url.to_owned()],
        name: Some("test-worker".into()),
        worker_id: Some(Uuid::new_v4()),
        capacity,
        heartbeat_interval_seconds: 0.2,
        lease_seconds: 2,
        poll_wait_seconds: 2.0,
        drain_timeout_seconds: drain_seconds,
        request_timeout_seconds: 2.0,
        ..WorkerConfig::default()
    }
}

async fn wait_for<T>(s: &Shared, what: &str, deadline: Duration, mut f: impl FnMut(&Fake) -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f(&s.lock().unwrap()) {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn completion(f: &Fake, job: Uuid) -> Option<CompleteRequest> {
    f.events.iter().find_map(|e| match e {
        Event::Complete(id, r) if *id == job => Some(r.clone()),
        _ => None,
    })
}

struct Running {
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), jobsched_worker::WorkerError>>,
}

fn start(config: WorkerConfig) -> Running {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(jobsched_worker::run(config, shutdown.clone()));
    Running { shutdown, handle }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.handle).await.unwrap().unwrap().unwrap();
    }
}

#[tokio::test]
async fn registers_picks_up_at_once_and_reports_with_the_token() {
    // Steps: start a worker; wait until it long-polls; submit an echo job;
    // the completion must arrive quickly and carry the lease's token and the
    // payload as result; stop; the worker deregisters last.
    let (url, s) = fake_coordinator().await;
    let cfg = config(&url, 4, 5.0);
    let worker_id = cfg.worker_id.unwrap();
    let w = start(cfg);

    let reg = wait_for(&s, "registration", Duration::from_secs(5), |f| {
        f.events.iter().find_map(|e| match e {
            Event::Register(r) => Some(r.clone()),
            _ => None,
        })
    })
    .await;
    assert_eq!(reg.worker_id, Some(worker_id));
    assert_eq!(reg.capacity, Some(4));
    assert_eq!(reg.job_types, vec!["echo", "fail", "http", "sample", "shell"]);
    wait_for(&s, "a long poll", Duration::from_secs(5), |f| {
        f.events.iter().any(|e| matches!(e, Event::Acquire(4))).then_some(())
    })
    .await;

    let submitted = Instant::now();
    let job = submit(&s, "echo", json!({"hello": "world"}), None);
    let done = wait_for(&s, "completion", Duration::from_secs(5), |f| completion(f, job)).await;
    assert!(submitted.elapsed() < Duration::from_millis(1000), "picked up by the waiting long poll");
    assert!(done.success);
    assert_eq!(done.fencing_token, 1);
    assert_eq!(done.worker_id, Some(worker_id));
    assert_eq!(done.result, Some(json!({"hello": "world"})));

    // Failures carry the handler's message.
    let job = submit(&s, "fail", json!({"message": "bad input"}), None);
    let done = wait_for(&s, "failure", Duration::from_secs(5), |f| completion(f, job)).await;
    assert!(!done.success);
    assert_eq!(done.error.as_deref(), Some("bad input"));
    assert_eq!(done.fencing_token, 2);

    w.stop().await;
    let f = s.lock().unwrap();
    assert!(matches!(f.events.last(), Some(Event::Deregister(id)) if *id == worker_id), "{:?}", f.events.last());
}

#[tokio::test]
async fn job_timeout_cancels_and_reports_a_failure() {
    // Steps: submit a 60 s sample job with a 0.3 s timeout; expect a failure
    // "timed out after 0.3s" well before 60 s.
    let (url, s) = fake_coordinator().await;
    let w = start(config(&url, 2, 5.0));
    let started = Instant::now();
    let job = submit(&s, "sample", json!({"durationMs": 60_000}), Some(0.3));
    let done = wait_for(&s, "timeout failure", Duration::from_secs(5), |f| completion(f, job)).await;
    assert!(!done.success);
    assert_eq!(done.error.as_deref(), Some("timed out after 0.3s"));
    assert!(started.elapsed() < Duration::from_secs(3));
    w.stop().await;
}

#[tokio::test]
async fn heartbeats_report_held_jobs_and_revocation_stops_the_handler() {
    // Steps: capacity 1; submit a long job; heartbeats list it with its
    // token; revoke its lease; the handler is cancelled, no result is sent,
    // and the freed slot runs the next job.
    let (url, s) = fake_coordinator().await;
    let w = start(config(&url, 1, 5.0));
    let long = submit(&s, "sample", json!({"durationMs": 60_000}), None);
    wait_for(&s, "heartbeat with the job", Duration::from_secs(5), |f| {
        f.events
            .iter()
            .any(|e| matches!(e, Event::Heartbeat(h) if h.iter().any(|j| j.job_id == long && j.fencing_token == 1)))
            .then_some(())
    })
    .await;

    s.lock().unwrap().revoke.insert(long);
    let next = submit(&s, "echo", json!(1), None);
    let done = wait_for(&s, "next job done", Duration::from_secs(5), |f| completion(f, next)).await;
    assert!(done.success);
    assert!(completion(&s.lock().unwrap(), long).is_none(), "a revoked job's result is dropped");
    w.stop().await;
}

#[tokio::test]
async fn a_worker_declared_dead_registers_again_under_the_same_id() {
    // Steps: start a worker; after its first heartbeat answer one heartbeat
    // with 409 worker_dead; it registers again with the same id and keeps
    // running jobs.
    let (url, s) = fake_coordinator().await;
    let cfg = config(&url, 1, 5.0);
    let id = cfg.worker_id.unwrap();
    let w = start(cfg);
    wait_for(&s, "first heartbeat", Duration::from_secs(5), |f| {
        f.events.iter().any(|e| matches!(e, Event::Heartbeat(_))).then_some(())
    })
    .await;
    s.lock().unwrap().dead_once = true;
    let ids = wait_for(&s, "second registration", Duration::from_secs(5), |f| {
        let ids: Vec<_> = f
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Register(r) => r.worker_id,
                _ => None,
            })
            .collect();
        (ids.len() >= 2).then_some(ids)
    })
    .await;
    assert!(ids.iter().all(|i| *i == id));
    // And it keeps working.
    let job = submit(&s, "echo", json!(2), None);
    wait_for(&s, "job after re-registration", Duration::from_secs(5), |f| completion(f, job)).await;
    w.stop().await;
}

#[tokio::test]
async fn never_runs_more_than_capacity_and_retries_failed_reports() {
    // Steps: capacity 2; the first two completions get 503; submit 5 short
    // jobs; all complete, at most 2 leases are held at once, and every
    // acquire asked for at most 2.
    let (url, s) = fake_coordinator().await;
    s.lock().unwrap().failing_completions = 2;
    let w = start(config(&url, 2, 5.0));
    let jobs: Vec<_> = (0..5).map(|_| submit(&s, "sample", json!({"durationMs": 150}), None)).collect();
    for job in &jobs {
        wait_for(&s, "all complete", Duration::from_secs(10), |f| completion(f, *job)).await;
    }
    {
        let f = s.lock().unwrap();
        assert!(f.max_running <= 2, "max_running {}", f.max_running);
        assert!(f.events.iter().all(|e| !matches!(e, Event::Acquire(n) if *n > 2)));
        assert_eq!(f.failing_completions, 0);
    }
    w.stop().await;
}

#[tokio::test]
async fn shutdown_drains_then_releases_then_deregisters() {
    // Steps: drain timeout 0.5 s; a 300 ms job and a 60 s job run; shutdown:
    // no new acquire, the short job completes, the long one is cancelled and
    // released with its token, and deregistration comes last.
    let (url, s) = fake_coordinator().await;
    let cfg = config(&url, 4, 0.5);
    let id = cfg.worker_id.unwrap();
    let w = start(cfg);
    let short = submit(&s, "sample", json!({"durationMs": 300}), None);
    let long = submit(&s, "sample", json!({"durationMs": 60_000}), None);
    wait_for(&s, "both running", Duration::from_secs(5), |f| {
        f.events.iter().any(|e| matches!(e, Event::Heartbeat(h) if h.len() == 2)).then_some(())
    })
    .await;

    let stopping = Instant::now();
    let acquires_before = s.lock().unwrap().events.iter().filter(|e| matches!(e, Event::Acquire(_))).count();
    w.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(3), "drain bounded by its timeout");

    let f = s.lock().unwrap();
    let acquires_after = f.events.iter().filter(|e| matches!(e, Event::Acquire(_))).count();
    assert_eq!(acquires_before, acquires_after, "no acquire after shutdown");
    assert!(completion(&f, short).is_some_and(|c| c.success));
    assert!(completion(&f, long).is_none());
    let release = f.events.iter().position(|e| matches!(e, Event::Release(j, _) if *j == long)).expect("released");
    let long_token = match &f.events[release] {
        Event::Release(_, t) => *t,
        _ => unreachable!(),
    };
    assert!(long_token > 0);
    let dereg = f.events.iter().position(|e| matches!(e, Event::Deregister(w) if *w == id)).expect("deregistered");
    assert!(release < dereg, "release before deregistration");
    assert_eq!(dereg, f.events.len() - 1, "deregistration is the last call");
}

#[tokio::test]
async fn unknown_built_in_job_types_are_rejected() {
    // Steps: configure a job type with no built-in handler; run fails at once.
    let mut cfg = config("http://127.0.0.1:1", 1, 1.0);
    cfg.job_types = vec!["echo".into(), "nope".into()];
    let err = jobsched_worker::run(cfg, CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn shutdown_before_any_node_answers_returns_cleanly() {
    // Steps: point the worker at a closed port; signal shutdown while it is
    // still trying to register; run returns Ok promptly.
    let cfg = config("http://127.0.0.1:1", 1, 1.0);
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(jobsched_worker::run(cfg, shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), handle).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn the_python_example_worker_speaks_the_same_protocol() {
    // Steps: run examples/python_worker.py against the fake; it registers
    // with its job types; a py-sum job completes with the lease's token and
    // the sum; it heartbeats; SIGTERM makes it deregister and exit 0.
    if std::process::Command::new("python3").arg("--version").output().is_err() {
        eprintln!("python3 not found; skipping");
        return;
    }
    let (url, s) = fake_coordinator().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/python_worker.py");
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--coordinators", &url, "--wait-seconds", "1", "--heartbeat-seconds", "0.2"])
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let reg = wait_for(&s, "python registration", Duration::from_secs(10), |f| {
        f.events.iter().find_map(|e| match e {
            Event::Register(r) => Some(r.clone()),
            _ => None,
        })
    })
    .await;
    assert_eq!(reg.job_types, vec!["py-echo", "py-sum"]);
    assert!(reg.worker_id.is_some(), "the worker picks its own id");

    let job = submit(&s, "py-sum", json!({"numbers": [1, 2, 3]}), None);
    let done = wait_for(&s, "python completion", Duration::from_secs(10), |f| completion(f, job)).await;
    assert!(done.success);
    assert_eq!(done.result, Some(json!({"sum": 6})));
    assert_eq!(done.fencing_token, 1);
    wait_for(&s, "python heartbeat", Duration::from_secs(10), |f| {
        f.events.iter().any(|e| matches!(e, Event::Heartbeat(_))).then_some(())
    })
    .await;

    let pid = child.id().unwrap() as i32;
    // SAFETY: plain kill(2) on our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    let f = s.lock().unwrap();
    assert!(f.events.iter().any(|e| matches!(e, Event::Deregister(id) if Some(*id) == reg.worker_id)));
}
