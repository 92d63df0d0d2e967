//! The history file: one JSON object per line, one line per operation the
//! workload invoked (submit, acquire, complete, fault, ...). This module owns
//! the record format and its writer; `run` only produces events and `check`
//! only reads them, so the two agree on the format through this type alone.
//!
//! Times are milliseconds since the run started, from a monotonic clock
//! (`Instant`), so a wall-clock step during the run cannot reorder events or
//! fake a gap; the `Start` record carries the wall-clock start for humans.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// What a submit's caller knows at the end: `Ok` (acknowledged, with a job
/// id), `Failed` (a definite rejection, nothing created) or `Unknown` (no
/// definite answer before the deadline: the job may or may not exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Failed,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerFaultKind {
    Kill,
    Pause,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Event {
    /// First line of every history.
    Start {
        run_id: String,
        wall_start: String,
        coordinators: Vec<String>,
        submitters: usize,
        workers: usize,
        /// Seq of the start marker: every job of this run has a greater one
        /// (`cluster::mark_start`). Absent: the checker lists every job.
        #[serde(default)]
        after_seq: Option<u64>,
    },
    /// One logical submit, including all retries with the same request id.
    Submit {
        submitter: usize,
        request_id: String,
        invoke_ms: u64,
        return_ms: u64,
        /// The node that gave the final answer (or was tried last).
        node: String,
        tries: u32,
        job_id: Option<String>,
        outcome: Outcome,
        status: Option<u16>,
        error: Option<String>,
    },
    /// A job handed to one of our workers by an acquire that returned.
    Acquire {
        worker: usize,
        t_ms: u64,
        node: String,
        job_id: String,
        attempt: u32,
        token: u64,
    },
    /// One completion report (retried on transport errors / 5xx with the same
    /// token). `status` is the definite HTTP status, 0 when none came back.
    Complete {
        worker: usize,
        invoke_ms: u64,
        return_ms: u64,
        node: String,
        job_id: String,
        token: u64,
        success: bool,
        status: u16,
        code: Option<String>,
    },
    /// A heartbeat told a worker it no longer holds this job.
    Revoked {
        worker: usize,
        t_ms: u64,
        job_id: String,
    },
    /// A fault started. `kind` is its label (`leader-kill`, ...), `leader`
    /// the leader's node id when it started (when known), `target` the node
    /// id substituted for `{leader}`, `{follower}` or `{random}`.
    FaultStart {
        index: usize,
        t_ms: u64,
        #[serde(default)]
        kind: String,
        leader: Option<u64>,
        #[serde(default)]
        target: Option<u64>,
        cmd: String,
    },
    /// An in-process worker was killed (`kill`: its held jobs are abandoned,
    /// never reported, and a fresh worker takes its place) or frozen
    /// (`pause`: no heartbeats, no work for `frozen_ms`, then it tries to
    /// complete the jobs it held, whose leases must have expired meanwhile).
    /// `jobs` are the (job id, fencing token) pairs it held.
    WorkerFault {
        index: usize,
        t_ms: u64,
        worker: usize,
        kind: WorkerFaultKind,
        frozen_ms: u64,
        jobs: Vec<(String, u64)>,
    },
    /// A frozen worker resumed: completions it invokes from now on for the
    /// jobs of its `WorkerFault` must be rejected as stale.
    WorkerResume {
        index: usize,
        t_ms: u64,
        worker: usize,
    },
    FaultEnd {
        index: usize,
        t_ms: u64,
        exit_code: Option<i32>,
    },
    /// After fault `index` ended, every node had applied everything the
    /// leader had logged when the fault ended (`caught_up` false: the wait
    /// gave up). The next fault waits for this.
    Settled {
        index: usize,
        t_ms: u64,
        caught_up: bool,
    },
    /// Submitters were told to stop.
    SubmitStop {
        t_ms: u64,
    },
    /// The drain finished (`drained` false: the bounded wait ran out).
    DrainEnd {
        t_ms: u64,
        drained: bool,
        remaining: usize,
    },
}

/// A cheap, cloneable handle: events go through a channel to one writer task,
/// so the many submitter/worker tasks never contend on the file.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<Event>,
}

impl Recorder {
    pub fn record(&self, e: Event) {
        // The writer only goes away at the very end, after every producer.
        let _ = self.tx.send(e);
    }
}

/// Opens (truncates) `path` and starts the writer task. Drop every
/// `Recorder` clone, then await the handle to flush the file.
pub async fn open(path: &Path) -> Result<(Recorder, tokio::task::JoinHandle<Result<()>>)> {
    let file = tokio::fs::File::create(path).await.with_context(|| format!("create {}", path.display()))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let handle = tokio::spawn(async move {
        let mut w = tokio::io::BufWriter::new(file);
        while let Some(e) = rx.recv().await {
            let mut line = serde_json::to_vec(&e)?;
            line.push(b'\n');
            w.write_all(&line).await?;
        }
        w.flush().await?;
        Ok(())
    });
    Ok((Recorder { tx }, handle))
}

/// Reads a whole history file.
pub fn read(path: &Path) -> Result<Vec<Event>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1)))
        .collect()
}
