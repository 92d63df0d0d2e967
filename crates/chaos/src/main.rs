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
    Run(run::RunArgs),
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
        Cmd::Run(args) => run::run(args).await,
        Cmd::Check { coordinators, history, digest_wait } => {
            let pass = check::check(&coordinators, &history, digest_wait).await?;
            std::process::exit(if pass { 0 } else { 1 });
        }
    }
}
