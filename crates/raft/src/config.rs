//! openraft configuration with calm defaults, and cluster bootstrap.
//!
//! openraft 0.9 derives its RPC deadlines from the config: an append-entries
//! call (heartbeats included) must finish within `heartbeat_interval`, a vote
//! within `election_timeout_min`, and a snapshot chunk — the last one
//! including the follower's install — within `install_snapshot_timeout`. On a
//! loaded 2-core box with fsync on every append, 100 ms is about the floor for
//! the heartbeat; raise it (150–250 ms) if followers report append timeouts.

use std::collections::BTreeMap;

use openraft::error::{InitializeError, RaftError};
use openraft::{Config, ConfigError, SnapshotPolicy};

use crate::types::{Node, NodeId, Raft};

/// Budget for sending one snapshot chunk, and for the last one, installing
/// the whole snapshot on the follower (a 1M-job state takes seconds).
const INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 60_000;
/// Snapshot chunk size on the wire (and the minimum body limit of
/// `/raft/snapshot`).
const SNAPSHOT_CHUNK_BYTES: u64 = 2 << 20;
/// Entries per append-entries RPC.
const MAX_PAYLOAD_ENTRIES: u64 = 256;

/// A validated openraft config.
///
/// - `heartbeat_ms`: leader heartbeat interval, also the append RPC deadline
///   (suggested 100);
/// - `election_min_ms` / `election_max_ms`: randomized election timeout range
///   (suggested 500 / 1000); `min` must exceed the heartbeat;
/// - `snapshot_logs`: build a snapshot every this many applied entries
///   (0 = never build one automatically);
/// - `catchup_logs`: entries kept in the log behind the snapshot, so that a
///   follower that fell at most this far behind catches up from the log
///   (appended and acknowledged at once, applied in the background) rather
///   than by installing a whole snapshot (during which it acknowledges
///   nothing, so the cluster survives no second fault).
pub fn raft_config(
    heartbeat_ms: u64,
    election_min_ms: u64,
    election_max_ms: u64,
    snapshot_logs: u64,
    catchup_logs: u64,
) -> Result<Config, ConfigError> {
    let snapshot_policy =
        if snapshot_logs == 0 { SnapshotPolicy::Never } else { SnapshotPolicy::LogsSinceLast(snapshot_logs) };
    Config {
        cluster_name: "jobsched".into(),
        heartbeat_interval: heartbeat_ms,
        election_timeout_min: election_min_ms,
        election_timeout_max: election_max_ms,
        install_snapshot_timeout: INSTALL_SNAPSHOT_TIMEOUT_MS,
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        snapshot_policy,
        max_in_snapshot_log_to_keep: catchup_logs,
        // A follower further behind than this gets a snapshot; keep it above
        // the snapshot interval so a snapshot actually helps.
        replication_lag_threshold: snapshot_logs.saturating_mul(2).max(5000),
        ..Config::default()
    }
    .validate()
}

/// Initialize the cluster with `members` (id -> node with `addr`). Safe to
/// call on every start and on every member with the same map: a node that is
/// already initialized (it has a vote or log) answers `NotAllowed`, which is
/// treated as success.
pub async fn initialize_cluster(
    raft: &Raft,
    members: BTreeMap<NodeId, Node>,
) -> Result<(), RaftError<NodeId, InitializeError<NodeId, Node>>> {
    match raft.initialize(members).await {
        Ok(()) => Ok(()),
        Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
            tracing::debug!(reason = %e, "cluster already initialized");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calm_defaults_validate() {
        let c = raft_config(100, 500, 1000, 10_000, 50_000).unwrap();
        assert_eq!(c.heartbeat_interval, 100);
        assert_eq!(c.snapshot_policy, SnapshotPolicy::LogsSinceLast(10_000));
        assert_eq!(c.max_in_snapshot_log_to_keep, 50_000);
        assert!(raft_config(100, 100, 1000, 1, 0).is_err()); // election <= heartbeat
        assert!(raft_config(100, 900, 500, 1, 0).is_err()); // min >= max
        assert_eq!(raft_config(100, 500, 1000, 0, 0).unwrap().snapshot_policy, SnapshotPolicy::Never);
    }
}
