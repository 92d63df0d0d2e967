//! The Raft log and the vote: openraft's `RaftLogStorage` over the `logs`
//! and `raft_meta` column families.
//!
//! Invariants:
//! - Entries are keyed by big-endian index, so key order is index order and
//!   the last key is the last entry.
//! - There are no holes: `append` adds a consecutive run, `truncate` removes a
//!   suffix, `purge` removes a prefix and records `last_purged` in the same
//!   WriteBatch, so `get_log_state` still knows it once every entry is gone.
//! - Every write here is synced (`WriteOptions::set_sync(true)`), and `append`
//!   calls openraft's flush callback only after the synced write returned:
//!   acknowledged means on disk. The write runs in `spawn_blocking` so an
//!   fsync never stalls the async runtime.
//! - openraft serialises all calls that take `&mut self`; readers
//!   ([`LogStore`] clones handed out by `get_log_reader`) only read, and
//!   RocksDB gives them a consistent view of each key.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, StorageIOError};
use rocksdb::{WriteBatch, WriteOptions, DB};

use super::{blocking, cf, decode, encode, get_meta, StoreError, CF_LOGS, CF_RAFT_META};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// The node's Raft log (cheap to clone; clones share the database).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

pub(crate) fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of_key(key: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = key.try_into().map_err(|_| StoreError::Corrupt(format!("log key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(arr))
}

fn synced() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        LogStore { db }
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

    fn read_range(&self, start: u64, end: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        if end.is_some_and(|e| e <= start) {
            return Ok(out);
        }
        let mut it = self.db.raw_iterator_cf(cf(&self.db, CF_LOGS)?);
        it.seek(log_key(start));
        while let Some((k, v)) = it.item() {
            let idx = index_of_key(k)?;
            if end.is_some_and(|e| idx >= e) {
                break;
            }
            let entry: Entry = decode(v)?;
            if entry.log_id.index != idx {
                return Err(StoreError::Corrupt(format!("log key {idx} holds entry {}", entry.log_id.index)));
            }
            out.push(entry);
            it.next();
        }
        it.status()?;
        Ok(out)
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
        self.read_range(start, end).map_err(|e| StorageIOError::read_logs(e.any()).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let read = || -> Result<LogState<TypeConfig>, StoreError> {
            let last_purged: Option<LogId> = get_meta(&self.db, CF_RAFT_META, KEY_LAST_PURGED)?;
            let last = self.last_entry_id()?.or(last_purged);
            Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
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
        let mut encoded = Vec::new();
        for entry in entries {
            match encode(&entry) {
                Ok(v) => encoded.push((log_key(entry.log_id.index), v)),
                Err(e) => {
                    let err = std::io::Error::other(e.to_string());
                    callback.log_io_completed(Err(err));
                    return Err(StorageIOError::write_log_entry(entry.log_id, e.any()).into());
                }
            }
        }
        let res = self
            .write_synced(move |db, b| {
                let logs = cf(db, CF_LOGS)?;
                for (k, v) in encoded {
                    b.put_cf(logs, k, v);
                }
                Ok(())
            })
            .await;
        // The synced write returned: the entries are on disk (and readable)
        // before openraft hears about it.
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e.any()).into())
            }
        }
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
