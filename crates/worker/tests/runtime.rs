//! Worker runtime behaviour that needs no coordinator. Everything that talks
//! to one (registration, long-poll pickup, fencing tokens on results,
//! timeouts, heartbeats and revocation, re-registration, capacity, report
//! retries, drain, the Python example) is tested against a real cluster of
//! `jobsched-coordinator` processes in the workspace's `tests/workers.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jobsched_worker::{CancellationToken, WorkerConfig};
use uuid::Uuid;

/// A config pointing at `url`, with short timings.
fn config(url: &str) -> WorkerConfig {
    WorkerConfig {
        coordinators: vec![url.to_owned()],
        name: Some("test-worker".into()),
        worker_id: Some(Uuid::new_v4()),
        capacity: 1,
        heartbeat_interval_seconds: 0.2,
        lease_seconds: 2,
        poll_wait_seconds: 2.0,
        drain_timeout_seconds: 1.0,
        request_timeout_seconds: 2.0,
        ..WorkerConfig::default()
    }
}

#[tokio::test]
async fn unknown_built_in_job_types_are_rejected() {
    // Steps: configure a job type with no built-in handler; run fails at once.
    let mut cfg = config("http://127.0.0.1:1");
    cfg.job_types = vec!["echo".into(), "nope".into()];
    let err = jobsched_worker::run(cfg, CancellationToken::new()).await.unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn shutdown_before_any_node_answers_returns_cleanly() {
    // Steps: point the worker at a closed port; signal shutdown while it is
    // still trying to register; run returns Ok promptly.
    let cfg = config("http://127.0.0.1:1");
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(jobsched_worker::run(cfg, shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(3), handle).await.unwrap().unwrap().unwrap();
}

/// A coordinator stand-in that hands out a fixed set of jobs once and
/// records how their results arrive: batched (`POST /api/jobs/complete`) or
/// one by one. It is only as real as the reporter's rules need: the
/// behaviour against a real cluster is in the workspace's `tests/workers.rs`.
mod stub {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::routing::{delete, post};
    use axum::{Json, Router};
    use serde_json::{json, Value};
    use uuid::Uuid;

    #[derive(Default)]
    pub struct Calls {
        pub to_hand_out: VecDeque<(Uuid, u64)>,
        /// (job id, fencing token) of each item of each batched call.
        pub batches: Vec<Vec<(Uuid, u64)>>,
        /// (job id, fencing token) of each single-result call.
        pub singles: Vec<(Uuid, u64)>,
    }

    #[derive(Clone)]
    pub struct Stub {
        pub calls: Arc<Mutex<Calls>>,
        /// Status of every batched call: 200 answers each item with its job.
        pub batch_status: StatusCode,
        /// Delay of every single-result answer, so that results pile up
        /// behind it.
        pub single_delay: Duration,
        /// While set, report answers (batched or single) wait.
        pub hold_reports: Arc<std::sync::atomic::AtomicBool>,
    }

    async fn while_held(s: &Stub) {
        while s.hold_reports.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn job(id: Uuid, token: u64, status: &str) -> Value {
        let t = "2026-01-01T00:00:00Z";
        json!({"id": id, "name": "j", "type": "echo", "payload": {"n": 1}, "priority": 0, "maxRetries": 0,
               "attempt": 1, "status": status, "workerId": null, "fencingToken": token,
               "leaseExpiresAt": null, "runAt": t, "timeoutSeconds": null, "createdAt": t,
               "startedAt": t, "completedAt": null, "updatedAt": t, "lastError": null,
               "result": null, "requestId": null})
    }

    fn worker(id: &str) -> Value {
        let t = "2026-01-01T00:00:00Z";
        json!({"id": id, "name": "w", "capacity": 8, "jobTypes": ["echo"], "status": "Alive",
               "registeredAt": t, "lastHeartbeatAt": t})
    }

    pub async fn start(stub: Stub) -> String {
        let app = Router::new()
            .route(
                "/api/workers/register",
                post(|Json(b): Json<Value>| async move { Json(worker(b["workerId"].as_str().unwrap())) }),
            )
            .route(
                "/api/workers/{id}/heartbeat",
                post(|Path(id): Path<String>| async move { Json(json!({"worker": worker(&id), "revokedJobs": []})) }),
            )
            .route("/api/workers/{id}", delete(|| async { StatusCode::NO_CONTENT }))
            .route("/api/jobs/acquire", post(acquire))
            .route("/api/jobs/complete", post(complete_many))
            .route("/api/jobs/{id}/complete", post(complete_one))
            .with_state(stub);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    async fn acquire(State(s): State<Stub>, Json(b): Json<Value>) -> Json<Value> {
        let max = b["maxJobs"].as_u64().unwrap_or(1) as usize;
        let jobs: Vec<Value> = {
            let mut c = s.calls.lock().unwrap();
            let n = max.min(c.to_hand_out.len());
            c.to_hand_out.drain(..n).map(|(id, token)| job(id, token, "Running")).collect()
        };
        if jobs.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Json(json!({ "jobs": jobs }))
    }

    async fn complete_many(State(s): State<Stub>, Json(b): Json<Value>) -> (StatusCode, Json<Value>) {
        let items: Vec<(Uuid, u64)> = b["completions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["jobId"].as_str().unwrap().parse().unwrap(), i["fencingToken"].as_u64().unwrap()))
            .collect();
        s.calls.lock().unwrap().batches.push(items.clone());
        while_held(&s).await;
        if s.batch_status != StatusCode::OK {
            let body = json!({"error": {"code": "payload_too_large", "message": "body over the limit"}});
            return (s.batch_status, Json(body));
        }
        let results: Vec<Value> =
            items.iter().map(|(id, t)| json!({"jobId": id, "job": job(*id, *t, "Completed")})).collect();
        (StatusCode::OK, Json(json!({ "results": results })))
    }

    async fn complete_one(State(s): State<Stub>, Path(id): Path<Uuid>, Json(b): Json<Value>) -> Json<Value> {
        tokio::time::sleep(s.single_delay).await;
        while_held(&s).await;
        let token = b["fencingToken"].as_u64().unwrap();
        s.calls.lock().unwrap().singles.push((id, token));
        Json(job(id, token, "Completed"))
    }
}

/// An echo worker of `capacity` against the stub at `url`.
fn echo_worker(url: String, capacity: u32) -> jobsched_worker::Worker {
    jobsched_worker::Worker::builder()
        .coordinators([url])
        .capacity(capacity)
        .poll_wait(Duration::from_millis(200))
        .handler(jobsched_worker::builtin::EchoHandler)
        .build()
        .unwrap()
}

/// Runs an echo worker of capacity 8 against a stub that answers batched
/// reports with `batch_status` and single ones after 300 ms, until every
/// one of the 8 handed-out jobs has been reported by some call; returns the
/// jobs, the batched calls and the single calls.
async fn run_against(
    batch_status: axum::http::StatusCode,
) -> (Vec<(Uuid, u64)>, Vec<Vec<(Uuid, u64)>>, Vec<(Uuid, u64)>) {
    let stub = stub::Stub {
        calls: Default::default(),
        batch_status,
        single_delay: Duration::from_millis(300),
        hold_reports: Default::default(),
    };
    let jobs: Vec<(Uuid, u64)> = (0..8).map(|i| (Uuid::new_v4(), 100 + i)).collect();
    stub.calls.lock().unwrap().to_hand_out = jobs.iter().copied().collect();
    let url = stub::start(stub.clone()).await;
    let worker = echo_worker(url, 8);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(worker.run(shutdown.clone()));
    let reported = |c: &stub::Calls| {
        let batched_ok = if stub.batch_status.is_success() { c.batches.iter().flatten().count() } else { 0 };
        batched_ok + c.singles.len()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reported(&stub.calls.lock().unwrap()) < jobs.len() {
        assert!(std::time::Instant::now() < deadline, "not every result was reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), run).await.unwrap().unwrap().unwrap();
    let c = stub.calls.lock().unwrap();
    (jobs, c.batches.clone(), c.singles.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_that_finish_together_are_reported_in_one_call() {
    // Steps: the stub hands 8 jobs to an echo worker of capacity 8 in one
    // acquire and answers single reports after 300 ms; results that finish
    // while a report is on its way (or before the reporter wakes) leave
    // together in one batched call. Every job is reported exactly once, with
    // its own fencing token.
    let (jobs, batches, singles) = run_against(axum::http::StatusCode::OK).await;
    assert!(batches.iter().any(|b| b.len() > 1), "no batched report: batches {batches:?}, singles {singles:?}");
    let mut all: Vec<(Uuid, u64)> = batches.into_iter().flatten().chain(singles).collect();
    all.sort();
    let mut want = jobs;
    want.sort();
    assert_eq!(all, want, "each job reported exactly once with its token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_as_a_whole_is_reported_one_by_one() {
    // Steps: as above, but the stub refuses every batched call with 413
    // (the body over the limit); each result of a refused batch is then
    // sent on its own and lands: every job reported once by a single call,
    // and each refused batch's jobs are among them.
    let (jobs, batches, singles) = run_against(axum::http::StatusCode::PAYLOAD_TOO_LARGE).await;
    assert!(!batches.is_empty(), "no batched report was tried: singles {singles:?}");
    let mut singles_sorted = singles.clone();
    singles_sorted.sort();
    let mut want = jobs;
    want.sort();
    assert_eq!(singles_sorted, want, "each job reported exactly once by a single call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_reports_bound_the_jobs_a_worker_takes() {
    // Steps: the stub has 20 jobs and holds every report's answer (batched
    // or single) until told. An echo worker of capacity 2 takes jobs until 2 x capacity
    // results wait for an answer and its 2 handlers, done, wait for a report
    // slot with their run slots held: exactly 3 x capacity = 6 jobs taken,
    // and no more while the reports hang.
    let stub = stub::Stub {
        calls: Default::default(),
        batch_status: axum::http::StatusCode::OK,
        single_delay: Duration::ZERO,
        hold_reports: Arc::new(AtomicBool::new(true)),
    };
    stub.calls.lock().unwrap().to_hand_out = (0..20).map(|i| (Uuid::new_v4(), 100 + i)).collect();
    let url = stub::start(stub.clone()).await;
    let worker = echo_worker(url, 2);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(worker.run(shutdown.clone()));
    let taken = || 20 - stub.calls.lock().unwrap().to_hand_out.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while taken() < 6 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give a would-be seventh acquire time to happen.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(taken(), 6, "jobs leased while every report hangs");
    // Once the reports are answered, the worker goes on taking jobs.
    stub.hold_reports.store(false, Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while taken() < 20 {
        assert!(std::time::Instant::now() < deadline, "the worker did not resume: {} taken", taken());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), run).await.unwrap().unwrap().unwrap();
}
