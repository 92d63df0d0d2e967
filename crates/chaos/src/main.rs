//! `jobsched-chaos`: chaos testing of a running cluster from the outside.
//!
//! * `run` drives a workload (submitters and HTTP workers) while a fault
//!   command hits the cluster every few seconds, and records every
//!   operation in a history file (`history`).
//! * `check` compares that history with the cluster's final state and
//!   prints PASS/FAIL (exit code 0/1) with counts and per-fault write
//!   unavailability.
//!
//! This file only parses the command line; `run`, `check`, `history` and
//! `cluster` own the rest.

mod check;
mod cluster;
mod history;
mod run;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

const LOCAL: &str = "http://127.0.0.1:5001,http://127.0.0.1:5002,http://127.0.0.1:5003";

#[derive(Parser)]
#[command(name = "jobsched-chaos", about = "Chaos testing of a jobsched cluster through its HTTP API")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the workload with faults and write the history.
    Run {
        /// Coordinator base URLs, comma-separated.
        #[arg(long, env = "JOBSCHED_COORDINATORS", default_value = LOCAL, value_delimiter = ',')]
        coordinators: Vec<String>,
        /// Seconds of submitting (the drain comes after).
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        /// Keep submitting past --duration until this many faults have run
        /// (so a smoke run covers every fault once, a soak run N rounds).
        #[arg(long, default_value_t = 0)]
        min_faults: u64,
        /// Concurrent closed-loop submitters.
        #[arg(long, default_value_t = 4)]
        submitters: usize,
        /// In-process HTTP workers.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// History file (JSON lines), overwritten.
        #[arg(long)]
        history: PathBuf,
        /// Fault run every --fault-every seconds: `[kind: ]COMMAND`, where
        /// COMMAND is a shell command (`{leader}`, `{follower}`, `{random}`
        /// become node ids) or a built-in `@worker-kill` /
        /// `@worker-pause SECONDS`. Repeat the flag to rotate through several.
        #[arg(long)]
        fault_cmd: Vec<String>,
        /// Seconds between fault starts (counted from the previous fault's end).
        #[arg(long, default_value_t = 15.0)]
        fault_every: f64,
        /// Seconds to wait, after submitting stops, for all jobs to finish.
        #[arg(long, default_value_t = 120.0)]
        drain_timeout: f64,
        /// Seconds one submit or completion keeps retrying before its
        /// outcome is recorded as unknown.
        #[arg(long, default_value_t = 30.0)]
        op_deadline: f64,
        /// Seconds before one HTTP request is abandoned (and retried elsewhere).
        #[arg(long, default_value_t = 3.0)]
        request_timeout: f64,
        /// Lease asked for on acquire, seconds (heartbeats extend it).
        #[arg(long, default_value_t = 10)]
        lease_seconds: u64,
        /// Worker heartbeat period, milliseconds.
        #[arg(long, default_value_t = 2000)]
        heartbeat_ms: u64,
    },
    /// Check a history against the cluster's final state.
    Check {
        #[arg(long, env = "JOBSCHED_COORDINATORS", default_value = LOCAL, value_delimiter = ',')]
        coordinators: Vec<String>,
        #[arg(long)]
        history: PathBuf,
        /// Seconds to wait for all nodes to report the same applied index.
        #[arg(long, default_value_t = 30.0)]
        digest_wait: f64,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run {
            coordinators,
            duration,
            min_faults,
            submitters,
            workers,
            history,
            fault_cmd,
            fault_every,
            drain_timeout,
            op_deadline,
            request_timeout,
            lease_seconds,
            heartbeat_ms,
        } => {
            run::run(run::RunArgs {
                coordinators,
                duration,
                min_faults,
                submitters,
                workers,
                history,
                fault_cmds: fault_cmd,
                fault_every,
                drain_timeout,
                op_deadline,
                request_timeout,
                lease_seconds,
                heartbeat_ms,
            })
            .await
        }
        Cmd::Check { coordinators, history, digest_wait } => {
            let pass = check::check(&coordinators, &history, digest_wait).await?;
            std::process::exit(if pass { 0 } else { 1 });
        }
    }
}
