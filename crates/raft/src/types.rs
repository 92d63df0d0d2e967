//! The openraft type configuration and aliases of openraft's generic types.
//!
//! Everything outside this crate should use these names rather than spelling
//! `openraft::...<NodeId, Node>` itself: one place to change on an upgrade.

use jobsched_core::{Batch, Outcome};

openraft::declare_raft_types!(
    /// Type configuration of the scheduler's Raft group.
    pub TypeConfig:
        D            = Batch,
        R            = BatchResponse,
        NodeId       = NodeId,
        Node         = Node,
        Entry        = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A node's id. Never reuse an id after wiping a node's data.
pub type NodeId = u64;

/// What the cluster knows about a node: `addr` is `"host:port"` of its HTTP
/// server (where `/raft/*` is served).
pub type Node = openraft::BasicNode;

/// The response to one applied entry: one outcome per command of the batch,
/// in order. Blank and membership entries produce an empty vector.
pub type BatchResponse = Vec<Outcome>;

/// A running Raft node.
pub type Raft = openraft::Raft<TypeConfig>;

/// A Raft log entry.
pub type Entry = openraft::Entry<TypeConfig>;
pub type EntryPayload = openraft::EntryPayload<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Membership = openraft::Membership<NodeId, Node>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Node>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Config = openraft::Config;
pub use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};

/// Result of a successful `client_write`: `data` is the [`BatchResponse`].
pub type ClientWriteResponse = openraft::raft::ClientWriteResponse<TypeConfig>;

/// Errors returned by the [`Raft`] API. `E` is the API-specific part.
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, Node>;
pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, Node>;
pub type ChangeMembershipError = openraft::error::ChangeMembershipError<NodeId>;
pub type InitializeError = openraft::error::InitializeError<NodeId, Node>;
pub type ForwardToLeader = openraft::error::ForwardToLeader<NodeId, Node>;
pub type Fatal = openraft::error::Fatal<NodeId>;
pub use openraft::error::{Infallible, InstallSnapshotError};

/// `client_write` error: `Err(RaftError::APIError(ClientWriteError::ForwardToLeader(..)))`
/// when this node is not the leader.
pub type WriteError = RaftError<ClientWriteError>;

/// The RPC payloads exchanged between nodes (bincode inside the HTTP bodies).
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;
