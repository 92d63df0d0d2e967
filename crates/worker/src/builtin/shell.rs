//! `shell`: runs a program as a child process.
//!
//! Payload:
//! `{"program": "ls", "args": ["-l"], "env": {"K": "V"}, "cwd": "/tmp", "shell": false}`
//! runs `program` with `args` directly (no shell, no interpolation). With
//! `"shell": true`, `{"command": "echo $1 | wc -c", "args": ["x"]}` runs
//! `sh -c command jobsched-shell args...` (args become `$1`, `$2`, ...).
//! `env` is added to the worker's environment.
//!
//! Success is exit code 0, with `{"exitCode", "stdout", "stderr"}` (the last
//! 4 KiB of each) as the result; anything else fails the attempt with the
//! exit code or signal and the output's tail.
//!
//! Invariant: no process of the job outlives the run. The child starts in a
//! new process group (`process_group(0)`, so its pgid is its pid); on
//! cancellation, on drop, and after the child exits the whole group gets
//! SIGKILL, and the child is reaped. Processes that leave the group
//! themselves (`setsid`) are beyond reach.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use super::{Tail, OUTPUT_TAIL_BYTES};
use crate::handler::{JobContext, JobError, JobHandler, JobResult};

/// How long to keep reading a pipe after the child exited: a process that
/// escaped the group may hold it open forever.
const PIPE_DRAIN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, Default)]
pub struct ShellHandler;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ShellPayload {
    #[serde(default)]
    program: Option<String>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    shell: bool,
}

/// Process groups of running shell jobs, so that an immediate exit (second
/// signal) can still kill them: drop guards do not run on `process::exit`.
static LIVE_GROUPS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn live_groups() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    LIVE_GROUPS.lock().unwrap_or_else(|e| e.into_inner())
}

fn killpg(pgid: i32) {
    // pgid 0 or 1 would mean our own group or init's: never.
    if pgid > 1 {
        // SAFETY: killpg has no memory-safety preconditions; the group is
        // one our child leads (see the module docs).
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

/// SIGKILL every process group of a running shell job. For a fast exit; the
/// handlers clean up after themselves otherwise.
pub fn kill_running_processes() {
    for pgid in live_groups().iter() {
        killpg(*pgid);
    }
}

/// Owns a job's process group: kills it when dropped, unless disarmed.
struct GroupKiller {
    pgid: Option<i32>,
}

impl GroupKiller {
    fn new(pgid: Option<i32>) -> Self {
        if let Some(p) = pgid {
            live_groups().insert(p);
        }
        GroupKiller { pgid }
    }

    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            killpg(pgid);
        }
    }

    fn disarm(&mut self) {
        if let Some(p) = self.pgid.take() {
            live_groups().remove(&p);
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
        self.disarm();
    }
}

fn read_tail<R: AsyncRead + Unpin + Send + 'static>(pipe: Option<R>) -> JoinHandle<Tail> {
    tokio::spawn(async move {
        let mut tail = Tail::new(OUTPUT_TAIL_BYTES);
        if let Some(mut pipe) = pipe {
            let mut buf = vec![0u8; 8192];
            loop {
                match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => tail.push(&buf[..n]),
                }
            }
        }
        tail
    })
}

async fn collect(handle: JoinHandle<Tail>) -> String {
    let mut handle = handle;
    match tokio::time::timeout(PIPE_DRAIN, &mut handle).await {
        Ok(Ok(tail)) => tail.text(),
        _ => {
            handle.abort();
            String::new()
        }
    }
}

impl JobHandler for ShellHandler {
    fn job_type(&self) -> &str {
        "shell"
    }

    async fn execute(&self, ctx: JobContext) -> JobResult {
        let p: ShellPayload = serde_json::from_value(ctx.payload.clone())
            .map_err(|e| JobError::new(format!("invalid shell payload: {e}")))?;
        let mut cmd = if p.shell {
            let script = p
                .command
                .or(p.program)
                .ok_or_else(|| JobError::new("invalid shell payload: \"shell\": true needs \"command\""))?;
            let mut c = tokio::process::Command::new("sh");
            c.arg("-c").arg(script).arg("jobsched-shell").args(&p.args);
            c
        } else {
            let program = p
                .program
                .filter(|s| !s.is_empty())
                .ok_or_else(|| JobError::new("invalid shell payload: \"program\" is required"))?;
            let mut c = tokio::process::Command::new(program);
            c.args(&p.args);
            c
        };
        cmd.envs(&p.env).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        if let Some(cwd) = &p.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().map_err(|e| JobError::new(format!("cannot start the process: {e}")))?;
        let mut killer = GroupKiller::new(child.id().and_then(|id| i32::try_from(id).ok()));
        tracing::debug!(job_id = %ctx.job_id, pid = ?child.id(), "shell job started");
        let stdout = read_tail(child.stdout.take());
        let stderr = read_tail(child.stderr.take());

        let status = tokio::select! {
            status = child.wait() => status,
            _ = ctx.cancel.cancelled() => {
                // Kill the group before reaping: while the child is a zombie
                // its pid (= the pgid) cannot be reused, so the signal cannot
                // hit a stranger.
                killer.kill();
                let _ = child.wait().await;
                killer.disarm();
                stdout.abort();
                stderr.abort();
                return Err(JobError::new("cancelled"));
            }
        };
        // Leftovers in the group (background jobs of a script) die with it;
        // they would otherwise also keep the pipes open. The child is reaped
        // by now, but its pid stays reserved as long as the group has a
        // member; with no member left the kill finds nothing (ESRCH), bar a
        // reuse of the number within these microseconds.
        killer.kill();
        killer.disarm();
        let status = status.map_err(|e| JobError::new(format!("waiting for the process: {e}")))?;
        let (out, err) = (collect(stdout).await, collect(stderr).await);

        match status.code() {
            Some(0) => Ok(Some(json!({ "exitCode": 0, "stdout": out, "stderr": err }))),
            code => {
                let how = match code {
                    Some(c) => format!("exit code {c}"),
                    None => {
                        use std::os::unix::process::ExitStatusExt;
                        format!("killed by signal {}", status.signal().unwrap_or(0))
                    }
                };
                let detail = if !err.trim().is_empty() {
                    format!("; stderr: {}", err.trim_end())
                } else if !out.trim().is_empty() {
                    format!("; stdout: {}", out.trim_end())
                } else {
                    String::new()
                };
                Err(JobError::new(format!("{how}{detail}")))
            }
        }
    }
}
