//! The job and worker records as they are stored in the state machine.
//!
//! These types are encoded with bincode on disk and inside snapshots, so their
//! field order is part of the storage format: append fields only together with
//! a bump of [`crate::keys::FORMAT_VERSION`], and keep the golden tests green.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Millis;

/// Where a job is in its life. See [`crate::graph`] for the legal moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobStatus {
    /// Waiting to be acquired (possibly not before `run_at`).
    Pending,
    /// Held by a worker under a lease.
    Running,
    /// Finished successfully. Terminal.
    Completed,
    /// The last attempt failed; it becomes Pending again at `run_at`.
    Failed,
    /// Retries exhausted (or cancelled). Terminal.
    Dead,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] =
        [JobStatus::Pending, JobStatus::Running, JobStatus::Completed, JobStatus::Failed, JobStatus::Dead];

    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Dead)
    }

    /// Stable one-byte code used in index keys.
    pub fn code(self) -> u8 {
        match self {
            JobStatus::Pending => 1,
            JobStatus::Running => 2,
            JobStatus::Completed => 3,
            JobStatus::Failed => 4,
            JobStatus::Dead => 5,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "Pending",
            JobStatus::Running => "Running",
            JobStatus::Completed => "Completed",
            JobStatus::Failed => "Failed",
            JobStatus::Dead => "Dead",
        }
    }

    /// Case-insensitive parse of the names used in the JSON API.
    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str().eq_ignore_ascii_case(s))
    }
}

/// What a client asks for when it submits a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub job_type: String,
    /// The payload as JSON text (any JSON value). Kept as text so the state
    /// machine never has to parse it and bincode can store it.
    pub payload: String,
    /// Higher runs first.
    pub priority: i32,
    /// How many times a failed attempt is retried; attempts <= max_retries + 1.
    pub max_retries: u32,
    /// Per-attempt timeout the worker enforces, if any.
    pub timeout_ms: Option<u64>,
    /// Not runnable before this time (delayed job), if set.
    pub run_at: Option<Millis>,
}

/// The lease a worker holds on a Running job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub worker_id: Uuid,
    /// The Raft log index of the entry that acquired the job. Strictly
    /// increasing across acquisitions of the same job (and of all jobs).
    pub fencing_token: u64,
    pub expires_at: Millis,
    /// The lease length the worker asked for; heartbeats extend by this much.
    pub duration_ms: u64,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: Uuid,
    /// Submission order, assigned by `apply`; the tie-breaker after priority.
    pub seq: u64,
    pub spec: JobSpec,
    pub request_id: Option<String>,
    pub status: JobStatus,
    /// Number of acquisitions that counted as an attempt.
    pub attempt: u32,
    pub lease: Option<Lease>,
    /// The last fencing token issued for this job (0 when never acquired).
    pub last_token: u64,
    /// When the job becomes (or became) runnable: `spec.run_at` or the retry
    /// backoff deadline.
    pub ready_at: Millis,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub completed_at: Option<Millis>,
    pub updated_at: Millis,
    pub last_error: Option<String>,
    /// Result of a successful run, as JSON text.
    pub result: Option<String>,
}

impl Job {
    /// Attempts allowed in total.
    pub fn max_attempts(&self) -> u32 {
        self.spec.max_retries.saturating_add(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerStatus {
    Active,
    Dead,
}

impl WorkerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Active => "Active",
            WorkerStatus::Dead => "Dead",
        }
    }
}

/// A registered worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub id: Uuid,
    pub name: String,
    pub capacity: u32,
    /// Job types it runs; empty means any type.
    pub job_types: Vec<String>,
    pub registered_at: Millis,
    pub last_heartbeat_at: Millis,
    pub status: WorkerStatus,
}
