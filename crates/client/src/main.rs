//! `jobsched`: command-line client of the job scheduler. Prints JSON on
//! stdout; on failure prints an error object on stderr and exits non-zero.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use jobsched_client::{parse_coordinators, Client, ClientError, CreateJobRequest, ListJobs, DEFAULT_COORDINATORS};
use serde::Serialize;
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(name = "jobsched", version, about = "Command-line client of the job scheduler cluster")]
struct Cli {
    /// Coordinator base URLs, comma-separated; any node accepts any call.
    #[arg(long, env = "JOBSCHED_COORDINATORS", default_value = DEFAULT_COORDINATORS, global = true)]
    coordinators: String,

    /// Give up after retrying across nodes for this many seconds.
    #[arg(long, env = "JOBSCHED_RETRY_SECONDS", default_value_t = 10.0, global = true)]
    retry_seconds: f64,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Submit a job; prints it. Retries are deduplicated by the request id.
    Submit {
        /// Job type (selects the worker handler).
        #[arg(long = "type")]
        job_type: String,
        /// Human-readable name (default: the type).
        #[arg(long)]
        name: Option<String>,
        /// Payload as JSON text.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Higher runs first (-1000..=1000; server default 0).
        #[arg(long, allow_hyphen_values = true)]
        priority: Option<i64>,
        /// Retries after a failed attempt (0..=100; server default 3).
        #[arg(long)]
        max_retries: Option<i64>,
        /// Per-attempt timeout in seconds, enforced by the worker.
        #[arg(long)]
        timeout_seconds: Option<f64>,
        /// Idempotency key (default: a fresh UUID).
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Submit many jobs from a file (`-` for stdin): a JSON array of job
    /// objects or one job object per line, each as for `POST /api/jobs`.
    /// Sent 1000 per request; prints `{"jobs":[...],"created":N}`.
    SubmitBatch { file: String },
    /// Show one job.
    Get { id: Uuid },
    /// List jobs, one page.
    List {
        /// Pending, Running, Completed, Failed or Dead.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        /// `nextCursor` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
        /// Read the answering node's local state (fast, maybe slightly old).
        #[arg(long)]
        stale: bool,
    },
    /// Cancel a job that is not running.
    Cancel { id: Uuid },
    /// List registered workers.
    Workers,
    /// Show the answering node's view of the cluster.
    Cluster,
    /// Health of whichever node answers.
    Health,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let (code, status) = match e.downcast_ref::<ClientError>() {
                Some(ClientError::Api { code, status, .. }) => (code.clone(), Some(*status)),
                Some(ClientError::Unavailable { .. }) => ("unavailable".to_owned(), None),
                _ => ("error".to_owned(), None),
            };
            let body = serde_json::json!({"error": {"code": code, "status": status, "message": format!("{e:#}")}});
            eprintln!("{body}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let retry =
        Duration::try_from_secs_f64(cli.retry_seconds).context("--retry-seconds must be a non-negative number")?;
    let client = Client::builder().coordinators(parse_coordinators(&cli.coordinators)).retry_budget(retry).build()?;
    match cli.command {
        Command::Submit { job_type, name, payload, priority, max_retries, timeout_seconds, request_id } => {
            let payload: serde_json::Value = serde_json::from_str(&payload).context("--payload is not valid JSON")?;
            let req = CreateJobRequest {
                name,
                job_type,
                payload,
                max_retries,
                priority,
                timeout_seconds,
                run_at: None,
                request_id,
            };
            print(&client.submit(req).await?.job)
        }
        Command::SubmitBatch { file } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let jobs = parse_job_list(&text)?;
            let mut all = Vec::with_capacity(jobs.len());
            let mut created = 0;
            for chunk in jobs.chunks(jobsched_api::MAX_BATCH_ITEMS) {
                let answer = client.submit_batch(chunk.to_vec()).await?;
                created += answer.created;
                all.extend(answer.jobs);
            }
            print(&serde_json::json!({"jobs": all, "created": created}))
        }
        Command::Get { id } => print(&client.get_job(id).await?),
        Command::List { status, limit, cursor, stale } => {
            print(&client.list_jobs(&ListJobs { status, limit, cursor, stale }).await?)
        }
        Command::Cancel { id } => print(&client.cancel(id).await?),
        Command::Workers => print(&client.list_workers().await?),
        Command::Cluster => print(&client.cluster().await?),
        Command::Health => print(&client.health().await?),
    }
}

/// A JSON array of jobs, or JSON lines (blank lines skipped).
fn parse_job_list(text: &str) -> anyhow::Result<Vec<CreateJobRequest>> {
    let jobs: Vec<CreateJobRequest> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text).context("the file is not a JSON array of jobs")?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("line {} is not a job object", i + 1)))
            .collect::<anyhow::Result<_>>()?
    };
    anyhow::ensure!(!jobs.is_empty(), "no jobs in the input");
    Ok(jobs)
}

fn print<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
