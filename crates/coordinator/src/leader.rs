//! Leader-only monitors: dead-worker detection, lease expiry, retention and
//! promotion of due retries. They read the local state machine and act only
//! by proposing commands, which `apply` re-checks against leader time.
//!
//! Gating: they run only while this node is leader *and* has heard from a
//! quorum recently. openraft 0.9 has no CheckQuorum, so a partitioned leader
//! keeps believing it leads; its proposals could never commit anyway, but
//! there is no point in making them.
//!
//! Grace after a leader change: heartbeats sent during an election fail, so a
//! new leader treats its own start as a heartbeat from every worker and a
//! renewal of every lease: nothing is expired until a full worker timeout (or
//! lease length) has passed under this leader.

use std::time::Duration;

use jobsched_core::{Command, Reader, WorkerStatus};
use openraft::ServerState;
use tokio::sync::watch;

use crate::node::SharedNode;

/// Terminal jobs deleted per purge command.
const PURGE_BATCH: u32 = 1000;
/// Due leases looked at per monitor round; the rest wait for the next round.
/// Bounds the round's work when a mass of leases lapses at once (and when a
/// new leader's grace keeps due leases alive, which are looked at again).
const EXPIRY_SCAN_MAX: usize = 10_000;

pub async fn run_monitors(node: SharedNode, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(node.config.monitor_interval_ms);
    // (term, leader-time when this node became leader in that term)
    let mut tenure: Option<(u64, i64)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (is_leader, term, quorum_ack_ms) = {
            let m = node.raft.metrics();
            let m = m.borrow();
            (m.state == ServerState::Leader, m.current_term, m.millis_since_quorum_ack)
        };
        if !is_leader {
            tenure = None;
            continue;
        }
        if quorum_ack_ms.is_none_or(|ms| ms > node.config.election_max_ms) {
            continue;
        }
        let now = node.now();
        let since = match tenure {
            Some((t, since)) if t == term => since,
            _ => {
                tenure = Some((term, now));
                now
            }
        };
        match plan(&node, now, since) {
            Ok(cmds) => {
                for cmd in cmds {
                    let node = node.clone();
                    // Concurrent proposals share Raft entries (group commit).
                    tokio::spawn(async move {
                        if let Err(e) = node.propose(cmd).await {
                            tracing::debug!("monitor proposal failed: {e}");
                        }
                    });
                }
            }
            Err(e) => tracing::error!("monitor failed to read state: {e}"),
        }
    }
}

/// Decide what to propose at leader time `now`, leader since `since`.
pub fn plan(node: &SharedNode, now: i64, since: i64) -> Result<Vec<Command>, jobsched_core::KvError> {
    let timeout = node.config.worker_timeout_ms as i64;
    let retention_ms = (node.config.retention_secs as i64).saturating_mul(1000);
    let planned = node.sm.read_consistent(|kv| -> Result<Vec<Command>, jobsched_core::KvError> {
        let r = Reader::new(kv);
        let mut cmds = Vec::new();
        for w in r.workers()? {
            if w.status == WorkerStatus::Active && now - w.last_heartbeat_at.max(since) > timeout {
                cmds.push(Command::MarkWorkerDead { worker_id: w.id, last_heartbeat_at: w.last_heartbeat_at });
            }
        }
        // Only leases already past their own expiry can be past the grace.
        for job in r.leases_due_by(now, EXPIRY_SCAN_MAX)? {
            if let Some(lease) = &job.lease {
                let effective = lease.expires_at.max(since + lease.duration_ms as i64);
                if effective <= now {
                    cmds.push(Command::ExpireLease { job_id: job.id, fencing_token: lease.fencing_token });
                }
            }
        }
        let cutoff = now - retention_ms;
        if r.oldest_finished_at()?.is_some_and(|t| t < cutoff) {
            cmds.push(Command::PurgeFinished { finished_before: cutoff, max_jobs: PURGE_BATCH });
        }
        if cmds.is_empty() && r.next_delayed_at()?.is_some_and(|t| t <= now) {
            cmds.push(Command::Tick);
        }
        Ok(cmds)
    })??;
    Ok(planned)
}
