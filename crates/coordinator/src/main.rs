//! `jobsched-coordinator`: runs one coordinator node. See the README for the
//! configuration reference.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use jobsched_coordinator::config::Subcommand;
use jobsched_coordinator::{Config, Flags};

/// The Rust side's allocator: mimalloc instead of glibc malloc.
///
/// Why: under load every request allocates and frees many small buffers
/// (HTTP parsing, JSON, the state machine's overlay, Raft entries); glibc's
/// malloc/free were about 10 % of each node's CPU samples (87 % of them from
/// Rust code), mimalloc's thread-local free lists make those few
/// instructions (docs/benchmarks.md item 35). RocksDB's C++ allocations
/// still go to glibc, tuned below.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// glibc malloc arenas for the whole process (unless `MALLOC_ARENA_MAX` is
/// set in the environment, which glibc then honours instead).
///
/// Why: glibc gives threads that allocate at the same time arenas of their
/// own, up to 8 per core, and memory freed in one arena is not reused by
/// another. Tokio's workers, the blocking pool that runs RocksDB writes and
/// RocksDB's own threads each fragmented theirs: with 1 M retained jobs the
/// largest node peaked at 213-245 MiB resident with the default, 187-194 MiB
/// with 2 arenas, at the same acquire throughput (docs/benchmarks.md).
const MALLOC_ARENAS: i32 = 2;

fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tunables; called before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let flags = Flags::parse();
    if let Some(Subcommand::Healthcheck { addr: Some(addr) }) = &flags.command {
        return match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(healthcheck(addr)),
            Err(_) => ExitCode::FAILURE,
        };
    }
    let config = match Config::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    // One thread: the current-thread scheduler, not a one-worker
    // multi-thread runtime, which still carries the work-stealing
    // scheduler's bookkeeping (and polls `block_on`'s future on a second
    // thread). Measured (docs/benchmarks.md item 33): at 64 connections
    // 7-9 % less cluster CPU per submit, and the proposer finds more commands
    // waiting per Raft entry (17.5 vs 14.6 jobs per entry).
    let mut builder = if config.runtime_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if config.runtime_threads > 1 {
        builder.worker_threads(config.runtime_threads);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Subcommand::Healthcheck { addr }) = &flags.command {
        let addr = addr.clone().unwrap_or_else(|| config.advertise_addr());
        return rt.block_on(healthcheck(&addr));
    }
    jobsched_coordinator::init_logging(&config.log_format, &config.log_filter);
    let clock = jobsched_coordinator::system_clock();
    match rt.block_on(jobsched_coordinator::run(config, clock, jobsched_coordinator::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("coordinator failed: {e:#}");
            eprintln!("coordinator failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn healthcheck(addr: &str) -> ExitCode {
    let client = reqwest::Client::new();
    match client.get(format!("http://{addr}/health")).timeout(Duration::from_secs(3)).send().await {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}
