//! Worker runtime behaviour that needs no coordinator. Everything that talks
//! to one (registration, long-poll pickup, fencing tokens on results,
//! timeouts, heartbeats and revocation, re-registration, capacity, report
//! retries, drain, the Python example) is tested against a real cluster of
//! `jobsched-coordinator` processes in the workspace's `tests/workers.rs`.

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
