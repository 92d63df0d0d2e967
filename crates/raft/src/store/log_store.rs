//! The Raft log and the vote: openraft's `RaftLogStorage` over the `logs`
//! and `raft_meta` column families.
//!
//! Invariants:
//! - Entries are keyed by big-endian index, so key order is index order and
//!   the last key is the last entry.
//! - There are no holes: `append` adds a consecutive run, `truncate` removes a
//!   suffix, `purge` removes a prefix and records `last_purged` in the same
//!   WriteBatch, so `get_log_state` still knows it once every entry is gone.
//! - Every write here is durable before openraft is told so. Votes, truncates
//!   and purges are synced writes (`WriteOptions::set_sync(true)`, run in
//!   `spawn_blocking` so an fsync never stalls the async runtime). `append`
//!   is split in two (group commit of the WAL, see [`WalSyncer`]): the
//!   entries are written unsynced, so they are readable as soon as `append`
//!   returns (openraft's contract), and openraft's flush callback is called
//!   by the syncer thread only after a WAL fsync that started after the
//!   write: acknowledged still means on disk.
//! - openraft serialises all calls that take `&mut self`; readers
//!   ([`LogStore`] clones handed out by `get_log_reader`) only read, and
//!   RocksDB gives them a consistent view of each key.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{mpsc, Arc, Weak};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, StorageIOError};
use rocksdb::{WriteBatch, WriteOptions, DB};

use super::{blocking, cf, decode, encode, get_meta, StoreError, CF_LOGS, CF_RAFT_META};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
/// Stored bytes of log entries one append RPC carries at most (it always
/// carries at least one entry). Why: openraft 0.9 caps an append only by
/// entry count (256), and an append must be answered within the heartbeat
/// interval (100 ms by default), follower fsync included. Entries of batch
/// submits hold up to 1,000 jobs each, so 256 of them (tens of MB) could
/// never make it in time. Only part of the cure: under full CPU, appends
/// still time out now and then (a 300k-job preload logged 87 such timeouts
/// with this cap, 118 without), and the follower catches up on retries.
pub(crate) const MAX_APPEND_BYTES: usize = 1 << 20;
/// Ranges of at most this many entries are read with point lookups (see
/// `read_by_points`); longer ones (a follower catching up) with an iterator.
const POINT_READ_MAX: u64 = 64;

/// The node's Raft log (cheap to clone; clones share the database and the
/// WAL syncer).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    syncer: WalSyncer,
}

/// Group commit of the write-ahead log: one thread per store that fsyncs the
/// WAL and then completes every append callback queued before the fsync
/// began.
///
/// Why: with a synced write per append, openraft's core task waits for the
/// fsync inside `append` before it can even send the entries to the
/// followers, so the leader's fsync and the followers' ran one after the
/// other. Writing unsynced and syncing here lets the leader replicate at once
/// (its fsync and the followers' overlap), and one fsync covers every append
/// that arrived meanwhile.
///
/// Durability: `append` queues its callback only after its unsynced write
/// returned, i.e. after the write is in the WAL file (not yet on disk). The
/// thread takes callbacks off the queue, then calls `flush_wal(true)`, which
/// fsyncs the WAL up to everything written before it started: every
/// callback it then completes belongs to a write that is on disk. Callbacks
/// are completed in queue order, which is append order.
#[derive(Clone)]
struct WalSyncer {
    tx: mpsc::Sender<LogFlushed<TypeConfig>>,
}

impl WalSyncer {
    /// Start the thread. It holds only a weak reference to the database, so
    /// dropping the stores closes the database at once; the thread ends when
    /// the last [`LogStore`] clone (and so the last sender) is gone.
    fn start(db: &Arc<DB>) -> WalSyncer {
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let weak: Weak<DB> = Arc::downgrade(db);
        let spawned = std::thread::Builder::new().name("wal-sync".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                batch.extend(rx.try_iter());
                let synced = match weak.upgrade() {
                    Some(db) => db.flush_wal(true).map_err(|e| std::io::Error::other(format!("WAL fsync: {e}"))),
                    None => Err(std::io::Error::other("the log store was closed before its WAL was synced")),
                };
                for cb in batch {
                    cb.log_io_completed(match &synced {
                        Ok(()) => Ok(()),
                        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                    });
                }
            }
        });
        if let Err(e) = spawned {
            // Without the thread, appends would never be acknowledged; a
            // process that cannot start one thread is not going to run Raft.
            panic!("cannot start the WAL sync thread: {e}");
        }
        WalSyncer { tx }
    }
}

pub(crate) fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of_key(key: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = key.try_into().map_err(|_| StoreError::Corrupt(format!("log key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(arr))
}

/// Decode the stored entry `v` found under index `idx` onto `out` and count
/// its bytes; true once they reach `max_bytes` (the read should stop).
fn take_entry(
    out: &mut Vec<Entry>,
    bytes: &mut usize,
    idx: u64,
    v: &[u8],
    max_bytes: Option<usize>,
) -> Result<bool, StoreError> {
    let entry: Entry = decode(v)?;
    if entry.log_id.index != idx {
        return Err(StoreError::Corrupt(format!("log key {idx} holds entry {}", entry.log_id.index)));
    }
    out.push(entry);
    *bytes += v.len();
    Ok(max_bytes.is_some_and(|m| *bytes >= m))
}

fn synced() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        let syncer = WalSyncer::start(&db);
        LogStore { db, syncer }
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StoreError> {
        let mut it = self.db.raw_iterator_cf(cf(&self.db, CF_LOGS)?);
        it.seek_to_last();
        match it.value() {
            Some(v) => {
                let entry: Entry = decode(v)?;
                Ok(Some(entry.log_id))
            }
            None => {
                it.status()?;
                Ok(None)
            }
        }
    }

    /// The id of the last entry in the log (or of the last purged one when
    /// the log is empty): what this node would offer in an election.
    pub(crate) fn last_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let last_purged: Option<LogId> = get_meta(&self.db, CF_RAFT_META, KEY_LAST_PURGED)?;
        Ok(self.last_entry_id()?.or(last_purged))
    }

    /// Entries `[start, end)`; with `max_bytes`, stop once the stored bytes
    /// read reach it (after at least one entry).
    fn read_range(&self, start: u64, end: Option<u64>, max_bytes: Option<usize>) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        if end.is_some_and(|e| e <= start) {
            return Ok(out);
        }
        if let Some(end) = end.filter(|e| e - start <= POINT_READ_MAX) {
            if let Some(entries) = self.read_by_points(start, end, max_bytes)? {
                return Ok(entries);
            }
        }
        let mut it = self.db.raw_iterator_cf(cf(&self.db, CF_LOGS)?);
        it.seek(log_key(start));
        while let Some((k, v)) = it.item() {
            let idx = index_of_key(k)?;
            if end.is_some_and(|e| idx >= e) || take_entry(&mut out, &mut bytes, idx, v, max_bytes)? {
                break;
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Entries `[start, end)` read one key at a time, or `None` when the
    /// first is not there (purged, or never written: the iterator path
    /// answers that case). Why: openraft reads back every entry right
    /// after appending it (replication to each follower, the leader's
    /// apply), a few entries at a time; an iterator for that builds a merged
    /// view over every memtable and SST file and seeks in each (4-5 % of the
    /// leader's CPU under single-job acquires, `perf`), while a point read
    /// of a recent entry is one memtable lookup. The log has no holes, so
    /// after the first entry a missing key is the end of the log.
    fn read_by_points(&self, start: u64, end: u64, max_bytes: Option<usize>) -> Result<Option<Vec<Entry>>, StoreError> {
        let logs = cf(&self.db, CF_LOGS)?;
        let mut out = Vec::with_capacity((end - start) as usize);
        let mut bytes = 0usize;
        for idx in start..end {
            let Some(v) = self.db.get_pinned_cf(logs, log_key(idx))? else {
                if out.is_empty() {
                    return Ok(None);
                }
                break;
            };
            if take_entry(&mut out, &mut bytes, idx, &v, max_bytes)? {
                break;
            }
        }
        Ok(Some(out))
    }

    /// Run a synced WriteBatch built by `build` off the async runtime.
    async fn write_synced<F>(&self, build: F) -> Result<(), StoreError>
    where
        F: FnOnce(&DB, &mut WriteBatch) -> Result<(), StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            build(&db, &mut batch)?;
            db.write_opt(batch, &synced())?;
            Ok(())
        })
        .await
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => Some(e.saturating_add(1)),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        // Reads hit the memtable or block cache in the common case (recent
        // entries for replication) and are done inline.
        let (start, end) = bounds(&range);
        self.read_range(start, end, None).map_err(|e| StorageIOError::read_logs(e.any()).into())
    }

    /// What one append RPC sends: at most [`MAX_APPEND_BYTES`] of entries.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        self.read_range(start, Some(end), Some(MAX_APPEND_BYTES)).map_err(|e| StorageIOError::read_logs(e.any()).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let read = || -> Result<LogState<TypeConfig>, StoreError> {
            let last_purged: Option<LogId> = get_meta(&self.db, CF_RAFT_META, KEY_LAST_PURGED)?;
            Ok(LogState { last_purged_log_id: last_purged, last_log_id: self.last_entry_id()?.or(last_purged) })
        };
        read().map_err(|e| StorageIOError::read_logs(e.any()).into())
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.write_synced(move |db, b| {
            b.put_cf(cf(db, CF_RAFT_META)?, KEY_VOTE, encode(&vote)?);
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_vote(e.any()).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        get_meta(&self.db, CF_RAFT_META, KEY_VOTE).map_err(|e| StorageIOError::read_vote(e.any()).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: `committed` only lets a restarted node re-apply sooner;
        // losing the latest value is harmless (it is re-learned from the
        // leader), and the next synced append makes it durable anyway.
        let write = || -> Result<(), StoreError> {
            self.db.put_cf(cf(&self.db, CF_RAFT_META)?, KEY_COMMITTED, encode(&committed)?)?;
            Ok(())
        };
        write().map_err(|e| StorageIOError::write(e.any()).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let read = || -> Result<Option<LogId>, StoreError> {
            Ok(get_meta::<Option<LogId>>(&self.db, CF_RAFT_META, KEY_COMMITTED)?.flatten())
        };
        read().map_err(|e| StorageIOError::read(e.any()).into())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let fail = |callback: LogFlushed<TypeConfig>, e: &StoreError| {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
        };
        let logs = match cf(&self.db, CF_LOGS) {
            Ok(logs) => logs,
            Err(e) => {
                fail(callback, &e);
                return Err(StorageIOError::write_logs(e.any()).into());
            }
        };
        let mut batch = WriteBatch::default();
        let mut buf = Vec::new();
        for entry in entries {
            buf.clear();
            buf.push(super::STORE_VERSION);
            if let Err(e) = bincode::serialize_into(&mut buf, &entry) {
                let e = StoreError::from(e);
                fail(callback, &e);
                return Err(StorageIOError::write_log_entry(entry.log_id, e.any()).into());
            }
            batch.put_cf(logs, log_key(entry.log_id.index), &buf);
        }
        // Unsynced: into the WAL file and the memtable, so readable at once
        // (openraft reads the entries back to replicate them as soon as this
        // returns). Inline rather than on a blocking thread: without fsync
        // this is a buffered write() plus a memtable insert. Durability comes
        // from the syncer, which completes `callback` after a WAL fsync.
        if let Err(e) = self.db.write_opt(batch, &WriteOptions::default()) {
            let e = StoreError::from(e);
            fail(callback, &e);
            return Err(StorageIOError::write_logs(e.any()).into());
        }
        if let Err(mpsc::SendError(callback)) = self.syncer.tx.send(callback) {
            let e = StoreError::Corrupt("the WAL sync thread is gone".into());
            fail(callback, &e);
            return Err(StorageIOError::write_logs(e.any()).into());
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Remove [log_id.index, ..]: a suffix, so no hole can appear.
        let from = log_id.index;
        self.write_synced(move |db, b| {
            let logs = cf(db, CF_LOGS)?;
            b.delete_range_cf(logs, log_key(from), log_key(u64::MAX));
            b.delete_cf(logs, log_key(u64::MAX));
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e.any()).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Remove [0, log_id.index] and remember log_id, atomically. Synced:
        // by WAL ordering this also makes durable every state-machine write
        // that made the purge legal (the entries are in a snapshot/applied).
        let upto = log_id.index;
        self.write_synced(move |db, b| {
            let logs = cf(db, CF_LOGS)?;
            b.delete_range_cf(logs, log_key(0), log_key(upto));
            b.delete_cf(logs, log_key(upto));
            b.put_cf(cf(db, CF_RAFT_META)?, KEY_LAST_PURGED, encode(&log_id)?);
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(e.any()).into())
    }
}
