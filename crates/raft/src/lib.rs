//! Replication for the scheduler: openraft 0.9 wired to RocksDB and HTTP.
//!
//! What this crate owns:
//! - the openraft type configuration ([`TypeConfig`]): a log entry carries one
//!   [`jobsched_core::Batch`], applying it returns one [`jobsched_core::Outcome`]
//!   per command;
//! - durable storage, ONE RocksDB database per node ([`store`]): the Raft log
//!   ([`LogStore`]) and the state machine ([`StateMachineStore`]), which is a
//!   thin adapter around [`jobsched_core::apply`];
//! - point-in-time snapshots streamed to files ([`snapshot_file`]);
//! - the node-to-node network ([`network`]): bincode RPCs over persistent
//!   framed connections ([`peer_stream`]) with per-request HTTP as fallback,
//!   both the client side and the decode/dispatch helpers the coordinator's
//!   HTTP server calls;
//! - the election timer with pre-vote ([`election`]) that replaces
//!   openraft's own;
//! - a calm default [`raft_config`].
//!
//! openraft's generics stay behind the aliases below so that callers (the
//! coordinator) name `jobsched_raft::Raft`, `jobsched_raft::ClientWriteError`
//! and so on, and an upgrade to openraft 0.10 stays local to this crate.
//!
//! Semantics promised here (see GUIDE §2): a log append is reported to openraft
//! only after the RocksDB WAL is fsynced; state-machine data, last-applied and
//! membership are committed in one atomic WriteBatch; a snapshot install
//! survives a crash at any point.

// openraft's error types (`StorageError`, `ConfigError`, `RaftError`) are
// large and its traits require returning them by value.
#![allow(clippy::result_large_err)]

pub mod config;
pub mod election;
pub mod network;
pub mod peer_stream;
pub mod snapshot_file;
pub mod store;
mod types;

pub use config::{initialize_cluster, raft_config};
pub use election::{ElectionTiming, Elector, PATH_PREVOTE};
pub use network::{handle_append, handle_snapshot, handle_vote, Network, NetworkConnection, WireError, WIRE_VERSION};
pub use store::{open_stores, LogStore, OpenError, SmKv, SnapshotBuilder, StateMachineStore};
pub use types::*;

/// The openraft crate itself, for the rare item not aliased here.
pub use openraft;
