//! Typed async client of the job scheduler's REST API, with failover across
//! the coordinator nodes; used by the `jobsched` CLI, the worker SDK and the
//! integration tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), jobsched_client::ClientError> {
//! use jobsched_client::{Client, CreateJobRequest};
//! let client = Client::new(["http://127.0.0.1:5001", "http://127.0.0.1:5002"])?;
//! let submitted = client
//!     .submit(CreateJobRequest { job_type: "echo".into(), payload: serde_json::json!({"hi": 1}), ..Default::default() })
//!     .await?;
//! let job = client.get_job(submitted.job.id).await?;
//! println!("{} is {}", job.id, job.status);
//! # Ok(()) }
//! ```
//!
//! Retry safety is documented on [`client`]: in short, every call except
//! `acquire` may be repeated after an unknown outcome because the cluster
//! deduplicates it (`submit` always carries a `requestId`).

pub mod client;
pub mod error;

pub use client::{
    error_chain, parse_coordinators, Client, ClientBuilder, ListJobs, Submitted, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_COORDINATORS, DEFAULT_REQUEST_TIMEOUT, DEFAULT_RETRY_BUDGET,
};
pub use error::ClientError;

/// The API's JSON types, re-exported so users need only this crate.
pub use jobsched_api::{
    AcquireRequest, AcquireResponse, ClusterView, CompleteRequest, CreateJobRequest, ErrorBody, ErrorDetail,
    HealthView, HeartbeatRequest, HeartbeatResponse, HeldJob, JobList, JobView, RegisterWorkerRequest, ReleaseRequest,
    WorkerList, WorkerView,
};
