//! `jobsched-worker`: the worker binary. Flags, config file and environment
//! are read by [`jobsched_worker::load_config`]; everything else lives in
//! the library. The first SIGTERM/SIGINT starts a graceful drain; a second
//! one exits at once with status 130, killing the jobs' processes.

use std::process::ExitCode;

use clap::Parser;
use jobsched_worker::{CancellationToken, WorkerArgs};
use tokio::signal::unix::{signal, SignalKind};

fn main() -> ExitCode {
    let args = WorkerArgs::parse();
    let config = match jobsched_worker::load_config(&args, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jobsched-worker: {e}");
            return ExitCode::from(2);
        }
    };
    jobsched_worker::init_tracing(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jobsched-worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        if let Err(e) = watch_signals(shutdown.clone()) {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
        match jobsched_worker::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "worker failed");
                ExitCode::FAILURE
            }
        }
    })
}

fn watch_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown signal: draining (send it again to exit at once)");
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        jobsched_worker::builtin::kill_running_processes();
        std::process::exit(130);
    });
    Ok(())
}
