//! Worker SDK and runtime of the job scheduler.
//!
//! A worker is stateless: it registers with the coordinator cluster over
//! HTTP, long-polls for jobs of the types it has handlers for, runs each in
//! its own task under the job's timeout, heartbeats the leases it holds, and
//! reports every result with the attempt's fencing token. Everything it
//! knows can be lost at any time; the cluster re-runs what a lost worker
//! held once its leases expire.
//!
//! Writing a worker:
//!
//! ```no_run
//! use jobsched_worker::{JobContext, JobHandler, JobResult, Worker};
//! use tokio_util::sync::CancellationToken;
//!
//! struct Resize;
//!
//! impl JobHandler for Resize {
//!     fn job_type(&self) -> &str {
//!         "resize"
//!     }
//!     async fn execute(&self, ctx: JobContext) -> JobResult {
//!         let width = ctx.payload["width"].as_u64().ok_or("payload.width missing")?;
//!         Ok(Some(serde_json::json!({ "resizedTo": width })))
//!     }
//! }
//!
//! # async fn demo() -> Result<(), jobsched_worker::WorkerError> {
//! let worker = Worker::builder().coordinators(["http://127.0.0.1:5001"]).capacity(4).handler(Resize).build()?;
//! let shutdown = CancellationToken::new();
//! worker.run(shutdown).await
//! # }
//! ```
//!
//! Modules: [`handler`] (the contract), [`runtime`] (the loops), [`builtin`]
//! (echo, sample, shell, http, fail), [`config`] (file/env/flags).

pub mod builtin;
pub mod config;
pub mod handler;
pub mod runtime;

pub use config::{load as load_config, ConfigError, LogFormat, WorkerArgs, WorkerConfig};
pub use handler::{BoxJobFuture, DynJobHandler, JobContext, JobError, JobHandler, JobResult, SharedHandler};
pub use jobsched_client::Client;
pub use runtime::{execute, Execution, Worker, WorkerBuilder, WorkerError, CANCEL_GRACE};
pub use tokio_util::sync::CancellationToken;

/// Run a worker with the built-in handlers named in `config.job_types`
/// until `shutdown` fires, then drain and deregister. This is the whole
/// binary minus flags, logging and signals, so tests can run workers
/// in-process.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    build(&config)?.run(shutdown).await
}

/// The worker [`run`] would run (e.g. to learn its id before starting it).
pub fn build(config: &WorkerConfig) -> Result<Worker, WorkerError> {
    config.validate()?;
    // One HTTP client for the process: the coordinator client and the
    // `http` handler share its pool.
    let http = reqwest::Client::builder()
        .connect_timeout(jobsched_client::DEFAULT_CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| ConfigError(format!("cannot build the HTTP client: {e}")))?;
    let mut b = WorkerBuilder::from_config(config).http_client(http.clone());
    for t in &config.job_types {
        let h = builtin::builtin(t, &http).ok_or_else(|| {
            ConfigError(format!(
                "job_types: no built-in handler named {t:?} (built-ins: {})",
                builtin::BUILTIN_TYPES.join(", ")
            ))
        })?;
        b = b.shared_handler(h);
    }
    b.build()
}

/// Install the `tracing` subscriber: `format` output on stderr, filtered by
/// `RUST_LOG` (default `info`). Does nothing if one is installed already.
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
