//! The handler contract: [`JobHandler`] (what a user implements), the
//! [`JobContext`] a run receives, and the object-safe [`DynJobHandler`] the
//! runtime stores.
//!
//! Invariants:
//! - A handler is called once per attempt; the same job may run again (on
//!   this or another worker) after a failure, a lease expiry or a drain, so
//!   handlers should be idempotent or fence their side effects with
//!   [`JobContext::fencing_token`].
//! - When [`JobContext::cancel`] fires (timeout, revoked lease, shutdown)
//!   the result will not be used as a success; a handler should stop
//!   promptly and clean up. The runtime waits a short grace period for it,
//!   then drops it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Outcome of one attempt: `Ok(result)` completes the job (the optional JSON
/// is stored as its result), `Err` fails the attempt (the cluster retries it
/// while retries remain).
pub type JobResult = Result<Option<Value>, JobError>;

/// Why an attempt failed; the message is stored as the job's `lastError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    message: String,
}

impl JobError {
    pub fn new(message: impl Into<String>) -> Self {
        JobError { message: message.into() }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<String> for JobError {
    fn from(message: String) -> Self {
        JobError { message }
    }
}

impl From<&str> for JobError {
    fn from(message: &str) -> Self {
        JobError { message: message.to_owned() }
    }
}

/// Everything a handler knows about the attempt it runs.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub job_id: Uuid,
    pub job_type: String,
    pub name: String,
    /// The job's payload as submitted.
    pub payload: Value,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub max_retries: u32,
    /// Token of this attempt's lease. Pass it to downstream systems to fence
    /// side effects: a later attempt always has a larger token.
    pub fencing_token: u64,
    /// The job's per-attempt timeout; the runtime enforces it by cancelling.
    pub timeout: Option<Duration>,
    /// The worker running the attempt.
    pub worker_id: Uuid,
    /// Fires when the attempt must stop (timeout, revoked lease, shutdown).
    pub cancel: CancellationToken,
}

impl JobContext {
    /// A context for calling a handler directly (tests, tools): attempt 1,
    /// token 0, no timeout, a fresh cancellation token.
    pub fn new(job_type: impl Into<String>, payload: Value) -> Self {
        let job_type = job_type.into();
        JobContext {
            job_id: Uuid::new_v4(),
            name: job_type.clone(),
            job_type,
            payload,
            attempt: 1,
            max_retries: 0,
            fencing_token: 0,
            timeout: None,
            worker_id: Uuid::nil(),
            cancel: CancellationToken::new(),
        }
    }

    /// Resolves when the attempt must stop.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// A job handler: one per job type.
///
/// ```
/// use jobsched_worker::{JobContext, JobHandler, JobResult};
///
/// struct Greet;
///
/// impl JobHandler for Greet {
///     fn job_type(&self) -> &str {
///         "greet"
///     }
///
///     async fn execute(&self, ctx: JobContext) -> JobResult {
///         let who = ctx.payload["name"].as_str().ok_or("payload.name missing")?;
///         Ok(Some(serde_json::json!({ "greeting": format!("hello {who}") })))
///     }
/// }
/// ```
pub trait JobHandler: Send + Sync + 'static {
    /// The job type this handler runs (`type` of the submitted job).
    fn job_type(&self) -> &str;

    /// Run one attempt. Watch `ctx.cancel` in long work.
    fn execute(&self, ctx: JobContext) -> impl Future<Output = JobResult> + Send;
}

/// A boxed future of a handler run.
pub type BoxJobFuture<'a> = Pin<Box<dyn Future<Output = JobResult> + Send + 'a>>;

/// Object-safe form of [`JobHandler`], implemented for every handler, so
/// handlers of different types can share one registry.
pub trait DynJobHandler: Send + Sync + 'static {
    fn job_type(&self) -> &str;
    fn execute_boxed(&self, ctx: JobContext) -> BoxJobFuture<'_>;
}

impl<H: JobHandler> DynJobHandler for H {
    fn job_type(&self) -> &str {
        JobHandler::job_type(self)
    }

    fn execute_boxed(&self, ctx: JobContext) -> BoxJobFuture<'_> {
        Box::pin(self.execute(ctx))
    }
}

/// A handler as the runtime holds it.
pub type SharedHandler = Arc<dyn DynJobHandler>;
