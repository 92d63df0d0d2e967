//! `jobsched-bench`: measures the cluster from the outside, through the
//! public HTTP API only (and etcd through its HTTP/JSON gateway, for a side
//! by side on the same machine).
//!
//! Modes:
//! * `submit`: closed loop, C concurrent clients, for T seconds (or N
//!   requests): throughput and latency percentiles of `POST /api/jobs` (or of
//!   `POST /api/jobs/batch` with `--batch`).
//! * `etcd-put`: the same closed loop against etcd's gateway,
//!   `POST /v3/kv/put` with base64 key and value: the anchor we compare with.
//! * `e2e`: C closed-loop submitters plus W workers x K slots that acquire
//!   (up to their free slots per call) and report results over HTTP the way
//!   the worker SDK does: a slot is free again when its (instant) handler
//!   returns, and each worker's reporter sends the finished results in one
//!   batched call per round trip: completed jobs per second end to end.
//! * `pickup`: one idle worker long-polls; N times, submit a job and time
//!   from the submit's acknowledgement (and from its send) to the moment the
//!   worker's acquire returns with it.
//! * `preload`: submit N jobs fast (batches of up to 1000 per request), and
//!   with `--finish` acquire and complete them all, to build a large
//!   retained history for the scale run.
//! * `acquire`: W workers acquire preloaded jobs of one type in a closed
//!   loop (no long poll): acquisitions and jobs per second.
//! * `failover`: R rounds of "kill -9 the leader with a command you give,
//!   measure the time until a submit is acknowledged again, restart it".
//!
//! Every mode prints a human line on stdout and progress on stderr; with
//! `--json` it also prints one JSON object, and `--json-out FILE` appends it
//! to FILE (one object per line) for scripts such as `scripts/bench.sh`.

mod engine;
mod modes;

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "jobsched-bench", about = "Measure a jobsched cluster (or etcd, for comparison) over HTTP")]
struct Cli {
    /// Coordinator base URLs, comma-separated.
    #[arg(
        long,
        env = "JOBSCHED_COORDINATORS",
        default_value = "http://127.0.0.1:5001,http://127.0.0.1:5002,http://127.0.0.1:5003",
        value_delimiter = ','
    )]
    coordinators: Vec<String>,
    /// Print one JSON object with the figures as well.
    #[arg(long)]
    json: bool,
    /// Append the JSON object (one line) to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Free-form tag copied into the JSON object (scripts use it to find rows).
    #[arg(long, default_value = "")]
    tag: String,
    #[command(subcommand)]
    mode: Mode,
}

/// The closed loop of `submit` and `etcd-put`: one definition, so both
/// sides of the side-by-side comparison take the same flags and defaults.
#[derive(clap::Args, Clone, Copy)]
struct ClosedLoop {
    #[arg(long, short = 'c', default_value_t = 1)]
    concurrency: usize,
    /// Seconds to measure (after a 1 s warm-up).
    #[arg(long, short = 'd', default_value_t = 10.0)]
    duration: f64,
    /// Stop after this many requests instead (0: use the duration).
    #[arg(long, default_value_t = 0)]
    total: u64,
}

#[derive(Subcommand)]
enum Mode {
    /// Closed-loop submits: C clients each wait for their answer before sending the next.
    Submit {
        #[command(flatten)]
        load: ClosedLoop,
        /// Send every request to this node only (index into --coordinators);
        /// default: spread clients over all nodes.
        #[arg(long)]
        node: Option<usize>,
        /// Jobs per request: above 1, `POST /api/jobs/batch`.
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Closed-loop puts to etcd's HTTP/JSON gateway (`POST /v3/kv/put`).
    EtcdPut {
        /// etcd client URLs, comma-separated; clients are spread over them.
        #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
        endpoints: Vec<String>,
        #[command(flatten)]
        load: ClosedLoop,
        /// Size of each value in bytes (before base64).
        #[arg(long, default_value_t = 64)]
        value_bytes: usize,
        /// Send every request to this member only (index into --endpoints);
        /// default: spread clients over all members.
        #[arg(long)]
        node: Option<usize>,
    },
    /// End to end: submitters plus HTTP workers; completed jobs per second.
    E2e {
        #[arg(long, short = 'c', default_value_t = 64)]
        submitters: usize,
        /// Worker processes simulated (each registers once).
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Slots per worker (jobs acquired per call at most).
        #[arg(long, default_value_t = 8)]
        slots: u32,
        #[arg(long, short = 'd', default_value_t = 10.0)]
        duration: f64,
        /// Complete each job with its own call instead of one batched call
        /// per acquired set.
        #[arg(long)]
        single_complete: bool,
        /// Hold the slots until the completion is acknowledged (report
        /// inline, then acquire again) instead of the SDK's pipelined
        /// reporter; for comparison.
        #[arg(long)]
        inline_report: bool,
    },
    /// Pickup latency: submit -> acquire on an idle long-polling worker.
    Pickup {
        #[arg(long, short = 'n', default_value_t = 200)]
        samples: usize,
    },
    /// Submit N jobs fast (batched), optionally acquire and complete them all.
    Preload {
        #[arg(long, short = 'n')]
        jobs: u64,
        /// Jobs per request (at most 1000).
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        #[arg(long, short = 'c', default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value = "retained")]
        job_type: String,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// Give every job a requestId (adds the idempotency index).
        #[arg(long)]
        request_ids: bool,
        /// Then acquire and complete every job of this type (a retained,
        /// finished history).
        #[arg(long)]
        finish: bool,
    },
    /// Acquire throughput over preloaded jobs of one type (no long poll).
    Acquire {
        /// Concurrent workers (each registered once, one call at a time).
        #[arg(long, short = 'c', default_value_t = 16)]
        workers: usize,
        /// Jobs asked for per acquire call.
        #[arg(long, default_value_t = 1)]
        max_jobs: u32,
        #[arg(long, short = 'd', default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value = "acq")]
        job_type: String,
        /// Also complete each acquired set (one batched call).
        #[arg(long)]
        complete: bool,
    },
    /// Kill the leader R times and measure write unavailability.
    Failover {
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Shell command that kills node {id} (e.g. "scripts/cluster.sh kill {id}").
        #[arg(long)]
        kill_cmd: String,
        /// Shell command that starts node {id} again.
        #[arg(long)]
        start_cmd: String,
    },
}

// One thread. Why: the load generator shares the machine's cores with the
// cluster it measures (3 nodes + this process on 2 cores in the benchmark
// runs). With tokio's default two workers it took 58 us of CPU per submit
// (a third of what the three nodes together spent per job); on one thread
// 44 us, the rest left to the systems under test (ours and etcd alike). One
// thread keeps up: at 15,000 requests/s it would be about a third of a core.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // One client, many pooled keep-alive connections: a closed-loop client
    // reuses its connection for every request, like a real SDK would.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    let nodes = &cli.coordinators;
    // An empty or malformed list would make every request fail at once and
    // the closed loop spin on errors instead of measuring anything.
    if let Some(bad) = nodes.iter().find(|u| !(u.starts_with("http://") || u.starts_with("https://"))) {
        anyhow::bail!("--coordinators: {bad:?} is not an http(s) URL");
    }
    let mut figures = match &cli.mode {
        Mode::Submit { load, node, batch } => {
            modes::submit(&http, nodes, load.concurrency, load.duration, load.total, *node, *batch).await?
        }
        Mode::EtcdPut { endpoints, load, value_bytes, node } => {
            modes::etcd_put(&http, endpoints, load.concurrency, load.duration, load.total, *value_bytes, *node).await?
        }
        Mode::E2e { submitters, workers, slots, duration, single_complete, inline_report } => {
            let reporting = modes::Reporting { batched: !*single_complete, pipelined: !*inline_report };
            modes::e2e(&http, nodes, *submitters, *workers, *slots, *duration, reporting).await?
        }
        Mode::Pickup { samples } => modes::pickup(&http, nodes, *samples).await?,
        Mode::Preload { jobs, batch, concurrency, job_type, priority, request_ids, finish } => {
            let opts = modes::PreloadOpts {
                jobs: *jobs,
                batch: *batch,
                concurrency: *concurrency,
                job_type: job_type.clone(),
                priority: *priority,
                request_ids: *request_ids,
                finish: *finish,
            };
            modes::preload(&http, nodes, &opts).await?
        }
        Mode::Acquire { workers, max_jobs, duration, job_type, complete } => {
            modes::acquire(&http, nodes, *workers, *max_jobs, *duration, job_type, *complete).await?
        }
        Mode::Failover { rounds, kill_cmd, start_cmd } => {
            modes::failover(&http, nodes, *rounds, kill_cmd, start_cmd).await?
        }
    };
    if let Value::Object(m) = &mut figures {
        m.insert("tag".into(), Value::String(cli.tag.clone()));
        m.insert("at".into(), Value::String(chrono::Utc::now().to_rfc3339()));
    }
    if cli.json {
        println!("{figures}");
    }
    if let Some(path) = &cli.json_out {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{figures}")?;
    }
    Ok(())
}
