//! The pure heart of the scheduler: the job and worker model, the commands
//! that change it, and [`apply`], the one function through which every change
//! flows.
//!
//! Invariants this crate owns:
//! - `apply` is deterministic: the same state and the same [`Batch`] give the
//!   same new state and the same outcomes on every node. It reads no clock,
//!   RNG or environment; time arrives inside the batch, stamped by the leader,
//!   and the state keeps the largest time seen so time never moves backwards.
//! - Only legal status transitions happen (see [`graph`]); terminal states
//!   never change.
//! - Every acquisition issues a fresh fencing token (the Raft log index of the
//!   acquiring entry), and completions carrying any other token are rejected.
//! - State lives in an ordered key-value space ([`kv`]), not in memory, with
//!   indexes that make acquire and list-by-status cheap.
//!
//! Business outcomes (not found, stale token, ...) are data
//! ([`Outcome::Rejected`]); only storage failures are `Err`.

pub mod backoff;
pub mod command;
pub mod graph;
pub mod keys;
pub mod kv;
pub mod model;
pub mod state;

pub use command::{Batch, Command, CompletionReport, Outcome, Rejection};
pub use kv::{KvError, KvPairs, KvRead, MemKv, Overlay};
pub use model::{Job, JobSpec, JobStatus, Lease, Worker, WorkerStatus};
pub use state::{apply, Reader};

/// Milliseconds since the Unix epoch, as stamped by the leader.
pub type Millis = i64;

/// Limits on user input, enforced by the API layer and re-checked by `apply`.
pub mod limits {
    pub const MAX_NAME_LEN: usize = 256;
    pub const MAX_TYPE_LEN: usize = 128;
    pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
    pub const MAX_RESULT_BYTES: usize = 256 * 1024;
    pub const MAX_ERROR_LEN: usize = 8 * 1024;
    pub const MIN_PRIORITY: i32 = -1000;
    pub const MAX_PRIORITY: i32 = 1000;
    pub const MAX_RETRIES: u32 = 100;
    pub const MAX_REQUEST_ID_LEN: usize = 128;
    pub const MAX_ACQUIRE_BATCH: u32 = 1000;
    pub const MAX_WORKER_CAPACITY: u32 = 10_000;
    pub const MAX_JOB_TYPES: usize = 64;
}
