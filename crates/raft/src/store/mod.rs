//! Durable storage of one node: ONE RocksDB database holding the Raft log and
//! the state machine, plus a directory of snapshot files.
//!
//! Layout of `<data_dir>`:
//!
//! ```text
//! <data_dir>/db/          RocksDB, column families:
//!     logs        big-endian u64 index -> versioned bincode Entry
//!     raft_meta   "vote", "committed", "last_purged" -> versioned bincode
//!     sm          the key space jobsched_core reads and writes (keys as-is)
//!     sm_meta     "last_applied", "membership", "snapshot" (current snapshot
//!                 meta), "install_pending" (crash-safe install marker)
//! <data_dir>/snapshots/   <snapshot id>.snap (only the current one is kept)
//! ```
//!
//! ## Why apply writes skip the WAL
//!
//! All column families share one write-ahead log, and RocksDB appends to it in
//! write order. A write with `sync = true` fsyncs the WAL up to and including
//! itself, so it also makes every earlier WAL write durable, whatever its
//! column family; so does a WAL fsync on its own (`flush_wal(true)`). The log
//! store syncs every vote, truncate and purge, and acknowledges every append
//! only after a WAL fsync that began after the append's write (group commit,
//! see `log_store`).
//!
//! The state machine's apply steps do not go through the WAL at all
//! (`WriteOptions::disable_wal`): the Raft log already holds every entry they
//! come from, durably, so writing the same change a second time to the WAL
//! (about two thirds of its bytes under load) bought nothing. After a crash
//! the state machine comes back as it was at its last memtable flush, and
//! openraft re-applies the committed entries after that point from the log
//! (`get_initial_state` -> `reapply_committed`). What keeps this sound:
//!
//! - Each apply step is one WriteBatch (data, `last_applied`, membership), and
//!   `sm` and `sm_meta` are flushed atomically (`atomic_flush`), so the flushed
//!   state is always some exact `last_applied`, never half an entry or data
//!   without its index.
//! - The log entries after the flushed `last_applied` must still exist. The
//!   log is purged only up to a published snapshot (openraft's
//!   `calc_purge_upto`), and a snapshot is published only after the state
//!   machine is flushed past it (`build_snapshot`), or, when installed from
//!   the leader, by synced WAL writes. So the snapshot meta is never ahead of
//!   the durable `last_applied` either.
//! - An install wipes the keys it can see; it flushes first, so that a delete
//!   lost in a crash cannot bring back a key the wipe did not see.
//! - A graceful shutdown flushes the state machine (`SmKv::flush`, called by
//!   the coordinator after Raft stops), so a restart re-applies nothing.
//!
//! ## Memory
//!
//! One LRU block cache shared by all column families (for the log and
//! metadata also their index and filter blocks; the state machine's stay in
//! its table readers, see `open_db`), modest memtables, and a cap on total
//! WAL size so that rarely
//! written column families (votes, metadata) get flushed and old WAL files
//! can be deleted. These numbers are the knobs for the "< 200 MB per node
//! with 1M jobs" goal.

mod log_store;
mod queue_fronts;
mod scan_hints;
mod state_machine;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use jobsched_core::KvError;
use openraft::AnyError;
use rocksdb::{BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, Options, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use log_store::LogStore;
pub use state_machine::{SmKv, SnapshotBuilder, StateMachineStore};

pub(crate) const CF_LOGS: &str = "logs";
pub(crate) const CF_RAFT_META: &str = "raft_meta";
pub(crate) const CF_SM: &str = "sm";
pub(crate) const CF_SM_META: &str = "sm_meta";

/// Version byte in front of every value this crate stores (log entries and
/// metadata). The state machine's own records carry core's version byte.
pub(crate) const STORE_VERSION: u8 = 1;

/// Block cache shared by all column families.
const BLOCK_CACHE_BYTES: usize = 32 << 20;
/// Memtable size of the state machine column family.
const SM_WRITE_BUFFER_BYTES: usize = 32 << 20;
/// Memtable size of the log column family.
const LOG_WRITE_BUFFER_BYTES: usize = 16 << 20;
/// Memtable size of the small metadata column families.
const META_WRITE_BUFFER_BYTES: usize = 1 << 20;
/// Upper bound of all memtables together.
/// (With 1M retained jobs a node stays near 200 MiB resident; cutting this
/// budget to 24 MiB cache + 48 MiB memtables did not lower it, in session 2
/// nor again in session 5 with the malloc arena fix: 205 MiB on the largest
/// node and slower acquires; see docs/benchmarks.md.)
const DB_WRITE_BUFFER_BYTES: usize = 64 << 20;
/// When the WALs exceed this, RocksDB flushes the column families that keep
/// the oldest WAL alive.
const MAX_TOTAL_WAL_BYTES: u64 = 128 << 20;

/// Failure to open (or recover) a node's store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening RocksDB at {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    /// The store is inconsistent or a recovery step failed.
    #[error("store at {path} is unusable: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// Open (creating as needed) the node's store in `data_dir` and return the
/// log store and the state machine, which share the one database.
///
/// If a snapshot install was interrupted by a crash, it is completed here
/// before returning. Leftover temporary snapshot files are removed.
pub fn open_stores(data_dir: &Path) -> Result<(LogStore, StateMachineStore), OpenError> {
    let db_path = data_dir.join("db");
    let snap_dir = data_dir.join("snapshots");
    for dir in [data_dir, db_path.as_path(), snap_dir.as_path()] {
        std::fs::create_dir_all(dir)
            .map_err(|source| OpenError::Io { context: format!("creating directory {}", dir.display()), source })?;
    }
    let db = Arc::new(open_db(&db_path)?);
    let sm = StateMachineStore::open(db.clone(), snap_dir)
        .map_err(|e| OpenError::Corrupt { path: data_dir.to_path_buf(), message: e.to_string() })?;
    Ok((LogStore::new(db), sm))
}

fn open_db(path: &Path) -> Result<DB, OpenError> {
    let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    let cf_opts = |write_buffer: usize, bloom: bool| {
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        let mut o = Options::default();
        if bloom {
            table.set_bloom_filter(10.0, false);
            // Index and filter blocks stay in the table readers, outside the
            // block cache. Why: the state machine does several point lookups
            // per command that mostly miss (request ids, fresh job ids), and
            // each one needs the filter block of every level. In the shared
            // block cache a whole-file filter block (about 1 MiB per 64 MiB
            // file) was evicted by data blocks and re-read and checksummed
            // from disk on most lookups: the top of the profile. Held by the
            // readers they cost about 1.5 bytes per key (~10 MiB at 1M jobs).
            table.set_cache_index_and_filter_blocks(false);
            // A bloom filter over the memtable too, so a miss does not walk
            // the skip list.
            o.set_memtable_prefix_bloom_ratio(0.1);
            o.set_memtable_whole_key_filtering(true);
        } else {
            table.set_cache_index_and_filter_blocks(true);
            table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        }
        o.set_write_buffer_size(write_buffer);
        o.set_max_write_buffer_number(2);
        o.set_block_based_table_factory(&table);
        o
    };

    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_db_write_buffer_size(DB_WRITE_BUFFER_BYTES);
    db_opts.set_max_total_wal_size(MAX_TOTAL_WAL_BYTES);
    db_opts.set_max_background_jobs(2);
    db_opts.set_keep_log_file_num(3);
    db_opts.set_max_log_file_size(8 << 20);
    // Smooth out writeback instead of large bursts at fsync time.
    db_opts.set_bytes_per_sync(1 << 20);
    // Apply steps skip the WAL (see the module docs), so `sm` and `sm_meta`
    // must reach disk together or not at all. With this set, every automatic
    // flush flushes all column families in one atomic step, and a manual
    // flush the given ones.
    db_opts.set_atomic_flush(true);

    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_LOGS, cf_opts(LOG_WRITE_BUFFER_BYTES, false)),
        ColumnFamilyDescriptor::new(CF_RAFT_META, cf_opts(META_WRITE_BUFFER_BYTES, false)),
        ColumnFamilyDescriptor::new(CF_SM, cf_opts(SM_WRITE_BUFFER_BYTES, true)),
        ColumnFamilyDescriptor::new(CF_SM_META, cf_opts(META_WRITE_BUFFER_BYTES, false)),
    ];
    DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|source| OpenError::Db { path: path.to_path_buf(), source })
}

/// Internal error of the storage layer, turned into openraft's
/// `StorageError` (fatal for the node) at the trait boundary.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding: {0}")]
    Codec(#[from] bincode::Error),
    #[error("state machine: {0}")]
    Kv(#[from] KvError),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error("blocking storage task failed: {0}")]
    Join(String),
}

impl StoreError {
    pub(crate) fn any(&self) -> AnyError {
        AnyError::new(self)
    }
}

impl From<StoreError> for KvError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Kv(e) => e,
            other => KvError(other.to_string()),
        }
    }
}

/// Run blocking RocksDB / file work off the async worker threads.
///
/// `spawn_blocking` (not `block_in_place`) so that it also works on a
/// current-thread runtime, e.g. in `#[tokio::test]`.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Join(e.to_string()))?
}

pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily, StoreError> {
    db.cf_handle(name).ok_or_else(|| StoreError::Corrupt(format!("column family {name} is missing")))
}

/// Version byte + bincode.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![STORE_VERSION];
    bincode::serialize_into(&mut out, value)?;
    Ok(out)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&STORE_VERSION, rest)) => Ok(bincode::deserialize(rest)?),
        Some((v, _)) => Err(StoreError::Corrupt(format!("unknown stored value version {v}"))),
        None => Err(StoreError::Corrupt("empty stored value".into())),
    }
}

/// Read and decode one metadata value.
pub(crate) fn get_meta<T: DeserializeOwned>(db: &DB, cf_name: &str, key: &[u8]) -> Result<Option<T>, StoreError> {
    match db.get_cf(cf(db, cf_name)?, key)? {
        Some(v) => Ok(Some(decode(&v)?)),
        None => Ok(None),
    }
}

/// fsync a directory so that a rename or create inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests;
