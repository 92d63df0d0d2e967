//! The state machine: openraft's `RaftStateMachine` as a thin adapter around
//! [`jobsched_core::apply`], over the `sm` and `sm_meta` column families, and
//! the snapshot files in `<data_dir>/snapshots/`.
//!
//! Invariants:
//! - `sm` changes only through `jobsched_core::apply` (or a snapshot install,
//!   which replaces it wholesale). Each apply step commits the overlay's
//!   writes, `last_applied` and (for membership entries) the membership in
//!   ONE WriteBatch, written without the WAL; `sm` and `sm_meta` are flushed
//!   atomically, so on disk they always agree (see "Why apply writes skip
//!   the WAL" in the module docs of [`crate::store`]).
//! - A snapshot is published only after the state machine has been flushed
//!   up to (at least) it, so the log it lets openraft purge is never needed
//!   to rebuild the state machine after a crash.
//! - Snapshots are point in time: a RocksDB snapshot pins one sequence
//!   number, and both the data and the metadata (`last_applied`, membership)
//!   are read under it.
//! - Only the newest snapshot file is kept; its meta is `sm_meta["snapshot"]`.
//!   A snapshot is published (meta written, older files deleted) only if it
//!   is not older than the current one, under `snapshot_lock`.
//! - Installing a snapshot is crash safe: the file is made durable first,
//!   then a pending-install marker is written (synced), then `sm` is wiped and
//!   reloaded in bounded batches, and the last batch writes the new
//!   `last_applied`/membership/snapshot meta and clears the marker (synced).
//!   Opening a store with a marker redoes the load. During an install, direct
//!   reads of `sm` may see a partial state (the node is far behind anyway);
//!   [`SmKv::read_consistent`] and [`SmKv::digest`] detect it by the marker
//!   and fail instead of waiting.
//! - After every apply step and install, the applied index is published on a
//!   `watch` channel so the coordinator can wake long-polling requests.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jobsched_core::{KvError, KvRead, Overlay};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use rocksdb::{ColumnFamily, DBRawIteratorWithThreadMode, FlushOptions, ReadOptions, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::queue_fronts::QueueFronts;
use super::scan_hints::{prefix_end, ScanHints};
use super::{blocking, cf, encode, get_meta, sync_dir, StoreError, CF_SM, CF_SM_META};
use crate::snapshot_file::{self, Fnv64, SnapshotReader, SnapshotWriter};
use crate::types::{BatchResponse, Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_SNAPSHOT: &[u8] = b"snapshot";
const KEY_PENDING: &[u8] = b"install_pending";

/// Entries applied through one overlay and committed in one WriteBatch.
/// Bounds the overlay's memory while amortising the write.
const APPLY_CHUNK: usize = 64;
/// Applies of at most this many commands run inline (see `apply`).
const INLINE_APPLY_MAX_COMMANDS: usize = 32;
/// Size of one WriteBatch when loading a snapshot.
const INSTALL_BATCH_BYTES: usize = 4 << 20;
/// Message of the error returned by consistent reads during an install.
const INSTALLING: &str = "a snapshot install is in progress on this node; retry later";
/// Abandoned receive files kept before the oldest is removed.
const MAX_RECEIVING: usize = 4;
/// How often the apply path re-learns the hints of the prefixes that only
/// readers scan from their front (`jobsched_core::keys::READER_FRONT_SCANS`).
const READER_HINT_REFRESH: Duration = Duration::from_secs(1);

/// Written (synced) before an install wipes `sm`; cleared by its last batch.
#[derive(Debug, Serialize, Deserialize)]
struct PendingInstall {
    meta: SnapshotMeta,
    /// File name inside the snapshot directory.
    file: String,
}

/// State shared by the state machine, its snapshot builders and readers.
struct Shared {
    db: Arc<DB>,
    snap_dir: PathBuf,
    /// Held for a whole install and while a builder takes its RocksDB
    /// snapshot, so a build never sees a half-installed state; also
    /// serialises snapshot publication. Only blocking threads take it.
    snapshot_lock: Mutex<()>,
    /// Last applied log index (0 before any).
    applied_tx: watch::Sender<u64>,
    /// Where live keys of scanned prefixes begin (apply path only).
    hints: Mutex<ScanHints>,
    /// The first rows of the queue indexes (see `queue_fronts`). The apply
    /// path holds this lock while a commit is written, so readers see the
    /// fronts and the database agree. Never taken while holding `hints`.
    fronts: Mutex<QueueFronts>,
    /// When the apply path last refreshed the readers' front-scan hints.
    reader_hints_at: Mutex<Option<Instant>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ()> {
        // A panic while holding the lock leaves nothing half-done that the
        // install marker does not cover, so poisoning is not an error here.
        self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hints(&self) -> MutexGuard<'_, ScanHints> {
        // Hints are rebuilt from scratch if a panic left them half-updated.
        self.hints.lock().unwrap_or_else(|p| {
            let mut g = p.into_inner();
            g.clear();
            g
        })
    }

    fn fronts(&self) -> MutexGuard<'_, QueueFronts> {
        // A panic may have left a front half-updated: drop them all.
        self.fronts.lock().unwrap_or_else(|p| {
            let mut g = p.into_inner();
            g.clear();
            g
        })
    }

    /// Re-learn, at most once per [`READER_HINT_REFRESH`], where the live
    /// keys of the prefixes only readers scan from the front begin. Call on
    /// the apply path only, after a commit (it learns from the live state).
    ///
    /// Why: the leader checks the lease-expiry index every second from its
    /// front, and every lease that ended (completed, extended) left a
    /// tombstone there; after a million finished jobs that check walked a
    /// million tombstones. The apply path never scans that prefix by itself,
    /// so nothing else would move its hint. One short scan a second, from the
    /// previous hint, only steps over the tombstones made since.
    fn refresh_reader_hints(&self, db: &DB, sm: &ColumnFamily) -> Result<(), KvError> {
        {
            let mut at = self.reader_hints_at.lock().unwrap_or_else(|p| p.into_inner());
            if at.is_some_and(|t| t.elapsed() < READER_HINT_REFRESH) {
                return Ok(());
            }
            *at = Some(Instant::now());
        }
        let applied = *self.applied_tx.borrow();
        let kv = DbKv { db, cf: sm, shared: self, learn_at: Some(applied) };
        for prefix in jobsched_core::keys::READER_FRONT_SCANS {
            kv.scan(prefix, prefix, 1)?;
        }
        Ok(())
    }

    fn publish_applied(&self, index: Option<u64>) {
        if let Some(i) = index {
            self.applied_tx.send_replace(i);
        }
    }
}

fn synced() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

/// Snapshot-install batches before the last: in the WAL, not synced (the
/// last one is synced; a crash before it redoes the install).
fn unsynced() -> WriteOptions {
    WriteOptions::default()
}

/// Apply steps: not in the WAL at all. The Raft log already holds every
/// applied entry durably, so after a crash the state machine restarts from
/// its last flushed state and openraft re-applies the committed entries
/// after it; see "Why apply writes skip the WAL" in the module docs of
/// `store` for what keeps that sound (atomic flush of `sm` with `sm_meta`,
/// a flush before a snapshot is published).
fn without_wal() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.disable_wal(true);
    o
}

// ----- reading the key space ------------------------------------------------

fn scan_opts(prefix: &[u8]) -> ReadOptions {
    let mut o = ReadOptions::default();
    if let Some(end) = prefix_end(prefix) {
        o.set_iterate_upper_bound(end);
    }
    o
}

type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// True when a scan of `prefix` would seek past its last possible key: the
/// hint says the prefix holds no live key. Such scans return nothing without
/// creating an iterator. Why it matters: every apply step scans the delayed
/// index (usually empty), and an iterator over the memtables and every SST
/// file cost about 3 % of the leader's CPU under load.
pub(super) fn seeks_past(prefix: &[u8], seek: &[u8]) -> bool {
    seek > prefix && !seek.starts_with(prefix)
}

fn scan_iter(
    mut it: DBRawIteratorWithThreadMode<'_, DB>,
    prefix: &[u8],
    start: &[u8],
    limit: usize,
) -> Result<Rows, KvError> {
    let from = if start < prefix { prefix } else { start };
    it.seek(from);
    let mut out = Vec::new();
    while out.len() < limit {
        match it.item() {
            Some((k, v)) if k.starts_with(prefix) => {
                out.push((k.to_vec(), v.to_vec()));
                it.next();
            }
            _ => break,
        }
    }
    it.status().map_err(db_kv)?;
    Ok(out)
}

fn cf_meta(db: &DB) -> Result<&ColumnFamily, KvError> {
    Ok(cf(db, CF_SM_META)?)
}

fn db_kv(e: rocksdb::Error) -> KvError {
    KvError(format!("rocksdb: {e}"))
}

/// `KvRead` over the live `sm` column family. Scans of a queue index are
/// answered from its in-memory front when it holds the whole answer (see
/// `queue_fronts`); other prefix scans start where the prefix's live keys
/// begin (see `scan_hints`). With `learn_at` (the apply path, the only
/// writer, reading the state at that applied index) scans also record what
/// they find: hints, and the fronts of queue indexes (read ahead).
struct DbKv<'a> {
    db: &'a DB,
    cf: &'a ColumnFamily,
    shared: &'a Shared,
    learn_at: Option<u64>,
}

impl KvRead for DbKv<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.db.get_cf(self.cf, key).map_err(db_kv)
    }

    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Rows, KvError> {
        let from = if start < prefix { prefix } else { start };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let queue = jobsched_core::keys::is_queue_key(prefix);
        let read_ahead = if queue {
            let fronts = self.shared.fronts();
            if let Some(rows) = fronts.answer(prefix, from, limit) {
                return Ok(rows);
            }
            fronts.read_ahead()
        } else {
            0
        };
        let (seek, from_front) = self.shared.hints().seek_for(prefix, from, None);
        // Only the apply path fills fronts, from a scan that starts at the
        // prefix's first live key (what `from_front` says).
        let fill = queue && from_front && self.learn_at.is_some();
        if seeks_past(prefix, &seek) {
            if fill {
                self.shared.fronts().fill(prefix, &[], limit);
            }
            return Ok(Vec::new());
        }
        let asked = if fill { limit.max(read_ahead) } else { limit };
        let mut rows = scan_iter(self.db.raw_iterator_cf_opt(self.cf, scan_opts(prefix)), prefix, &seek, asked)?;
        // Only the apply thread writes `sm`, and it is the one learning:
        // nothing was written between the scan and this.
        if let Some(at) = self.learn_at {
            if from_front {
                self.shared.hints().learn(prefix, rows.first().map(|(k, _)| k.as_slice()), at);
            }
            if fill {
                self.shared.fronts().fill(prefix, &rows, asked);
            }
        }
        rows.truncate(limit);
        Ok(rows)
    }
}

/// `KvRead` over a RocksDB snapshot of the `sm` column family, whose state
/// is that at applied index `applied` (for using scan hints).
struct SnapKv<'a> {
    snap: &'a rocksdb::SnapshotWithThreadMode<'a, DB>,
    cf: &'a ColumnFamily,
    shared: &'a Shared,
    applied: u64,
}

impl KvRead for SnapKv<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.snap.get_cf(self.cf, key).map_err(db_kv)
    }

    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Rows, KvError> {
        let from = if start < prefix { prefix } else { start };
        let (seek, _) = self.shared.hints().seek_for(prefix, from, Some(self.applied));
        if limit == 0 || seeks_past(prefix, &seek) {
            return Ok(Vec::new());
        }
        scan_iter(self.snap.raw_iterator_cf_opt(self.cf, scan_opts(prefix)), prefix, &seek, limit)
    }
}

/// Read access to the node's local state machine (the `sm` column family),
/// for the coordinator's queries (`jobsched_core::Reader::new(&sm_kv)`).
///
/// Each `get`/`scan` sees committed apply steps only (never half an entry),
/// but two calls may straddle an apply; use [`SmKv::read_consistent`] when a
/// query needs one point in time. Calls block on RocksDB: cheap point reads
/// are fine on the async runtime, big scans belong in `spawn_blocking`.
#[derive(Clone)]
pub struct SmKv {
    shared: Arc<Shared>,
}

impl SmKv {
    /// Make every apply step so far durable (apply steps skip the WAL; see
    /// the module docs of `store`). For a graceful shutdown, after Raft has
    /// stopped, so that the next start has nothing to re-apply. Blocks.
    pub fn flush(&self) -> Result<(), KvError> {
        flush_state_machine(&self.shared.db).map_err(KvError::from)
    }

    fn with_kv<R>(&self, f: impl FnOnce(&DbKv<'_>) -> Result<R, KvError>) -> Result<R, KvError> {
        let db = &*self.shared.db;
        let cf = cf(db, CF_SM)?;
        // Not the apply path: uses hints, learns none (see `scan_hints`).
        f(&DbKv { db, cf, shared: &self.shared, learn_at: None })
    }

    /// Run `f` against one RocksDB snapshot of the state machine: every read
    /// inside sees the same point in time (and never a half-installed
    /// snapshot).
    ///
    /// Never waits for a snapshot install: if one is under way (this node is
    /// far behind anyway) it returns an error instead; answer "unavailable".
    pub fn read_consistent<R>(&self, f: impl FnOnce(&dyn KvRead) -> R) -> Result<R, KvError> {
        let db = &*self.shared.db;
        let cf = cf(db, CF_SM)?;
        let snap = self.stable_snapshot()?;
        let applied = match snap.get_cf(cf_meta(db)?, KEY_LAST_APPLIED).map_err(db_kv)? {
            Some(v) => super::decode::<Option<LogId>>(&v)?.map_or(0, |l| l.index),
            None => 0,
        };
        Ok(f(&SnapKv { snap: &snap, cf, shared: &self.shared, applied }))
    }

    /// A RocksDB snapshot that does not show a half-installed state. The
    /// install marker is written (synced) before `sm` is wiped and cleared in
    /// the install's last batch, so "no marker under this snapshot" means the
    /// state in it is whole.
    fn stable_snapshot(&self) -> Result<rocksdb::SnapshotWithThreadMode<'_, DB>, KvError> {
        let db = &*self.shared.db;
        let snap = db.snapshot();
        if snap.get_cf(cf(db, CF_SM_META)?, KEY_PENDING).map_err(db_kv)?.is_some() {
            return Err(KvError(INSTALLING.into()));
        }
        Ok(snap)
    }

    /// The index of the last applied log entry, if any.
    pub fn last_applied_index(&self) -> Result<Option<u64>, KvError> {
        let applied: Option<Option<LogId>> = get_meta(&self.shared.db, CF_SM_META, KEY_LAST_APPLIED)?;
        Ok(applied.flatten().map(|l| l.index))
    }

    /// A receiver of the last applied index; it changes after every apply
    /// step and snapshot install.
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.shared.applied_tx.subscribe()
    }

    /// Under one RocksDB snapshot: the last applied index, a 64-bit FNV-1a
    /// digest over every `sm` key/value (length-prefixed, key order) and the
    /// number of keys. Two nodes at the same applied index must return the
    /// same triple. Reads the whole state: call it from blocking code. Fails
    /// (retry later) while a snapshot install is under way.
    pub fn digest(&self) -> Result<(Option<u64>, u64, u64), KvError> {
        let db = &*self.shared.db;
        let (sm, smm) = (cf(db, CF_SM)?, cf(db, CF_SM_META)?);
        let snap = self.stable_snapshot()?;
        let applied: Option<LogId> = match snap.get_cf(smm, KEY_LAST_APPLIED).map_err(db_kv)? {
            Some(v) => super::decode::<Option<LogId>>(&v)?,
            None => None,
        };
        let mut opts = ReadOptions::default();
        opts.fill_cache(false);
        let mut it = snap.raw_iterator_cf_opt(sm, opts);
        it.seek_to_first();
        let (mut hash, mut count) = (Fnv64::default(), 0u64);
        while let Some((k, v)) = it.item() {
            hash.record(k, v);
            count += 1;
            it.next();
        }
        it.status().map_err(db_kv)?;
        Ok((applied.map(|l| l.index), hash.finish(), count))
    }
}

impl KvRead for SmKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.with_kv(|kv| kv.get(key))
    }

    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<Rows, KvError> {
        self.with_kv(|kv| kv.scan(prefix, start, limit))
    }
}

// ----- snapshot files ---------------------------------------------------------

/// A process-unique suffix for snapshot ids and temp files.
fn unique() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{}", SEQ.fetch_add(1, Ordering::Relaxed))
}

/// The file name of a snapshot. Ids we build are already safe; an id from
/// elsewhere that is not is replaced by a hash of it.
pub(crate) fn snapshot_file_name(id: &str) -> String {
    let safe = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if safe {
        format!("{id}.snap")
    } else {
        let mut h = Fnv64::default();
        h.write(id.as_bytes());
        format!("x{:016x}.snap", h.finish())
    }
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, _path: &Path) -> bool {
    false
}

fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl Shared {
    /// Delete every `.snap` file except `keep`, and every temp file when
    /// `temps` is set (only at open: at run time a receive may be under way).
    fn remove_snapshots_except(&self, keep: Option<&str>, temps: bool) -> Result<(), StoreError> {
        for dirent in fs::read_dir(&self.snap_dir)? {
            let dirent = dirent?;
            let name = dirent.file_name();
            let Some(name) = name.to_str() else { continue };
            let is_snap = name.ends_with(".snap");
            let is_temp = name.ends_with(".tmp");
            if (is_snap && Some(name) != keep) || (temps && is_temp) {
                remove_if_exists(&dirent.path())?;
            }
        }
        Ok(())
    }

    fn current_snapshot_meta(&self) -> Result<Option<SnapshotMeta>, StoreError> {
        get_meta(&self.db, CF_SM_META, KEY_SNAPSHOT)
    }

    /// Stream the state at one point in time into a new snapshot file and
    /// publish it if it is not older than the current one.
    fn build_snapshot(&self) -> Result<(SnapshotMeta, File), StoreError> {
        let db = &*self.db;
        let (sm, smm) = (cf(db, CF_SM)?, cf(db, CF_SM_META)?);
        let snap = {
            let _g = self.lock();
            db.snapshot()
        };
        let last_applied: Option<LogId> = match snap.get_cf(smm, KEY_LAST_APPLIED)? {
            Some(v) => super::decode::<Option<LogId>>(&v)?,
            None => None,
        };
        let membership: StoredMembership = match snap.get_cf(smm, KEY_MEMBERSHIP)? {
            Some(v) => super::decode(&v)?,
            None => StoredMembership::default(),
        };
        let (term, index) = last_applied.map_or((0, 0), |l| (l.leader_id.term, l.index));
        let snapshot_id = format!("{term}-{index}-{}", unique());
        let name = snapshot_file_name(&snapshot_id);
        let tmp = self.snap_dir.join(format!("{name}.tmp"));
        let final_path = self.snap_dir.join(&name);

        let write = || -> Result<(), StoreError> {
            let out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            let mut w = SnapshotWriter::new(out)?;
            let mut opts = ReadOptions::default();
            opts.fill_cache(false); // a full scan must not evict the hot set
            let mut it = snap.raw_iterator_cf_opt(sm, opts);
            it.seek_to_first();
            while let Some((k, v)) = it.item() {
                w.push(k, v)?;
                it.next();
            }
            it.status()?;
            let (out, _, _) = w.finish()?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            fs::rename(&tmp, &final_path)?;
            sync_dir(&self.snap_dir)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        drop(snap);
        // Apply steps skip the WAL, so until a flush this snapshot's state
        // may exist only in memtables. Publishing the snapshot lets openraft
        // purge the log up to it; the entries purged must never be needed to
        // rebuild the state machine after a crash, so make everything applied
        // so far (this snapshot's `last_applied` included) durable first.
        // `sm` and `sm_meta` flush atomically (`atomic_flush`, see `open_db`).
        if let Err(e) = flush_state_machine(db) {
            let _ = fs::remove_file(&final_path);
            return Err(e);
        }
        let handle = File::open(&final_path)?;
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };

        let _g = self.lock();
        let newer = self.current_snapshot_meta()?.is_none_or(|cur| cur.last_log_id <= meta.last_log_id);
        if newer {
            db.put_cf_opt(smm, KEY_SNAPSHOT, encode(&meta)?, &synced())?;
            self.remove_snapshots_except(Some(&name), false)?;
        } else {
            // An install overtook this build. The open handle stays readable.
            remove_if_exists(&final_path)?;
        }
        Ok((meta, handle))
    }

    fn open_current_snapshot(&self) -> Result<Option<(SnapshotMeta, File)>, StoreError> {
        let _g = self.lock();
        match self.current_snapshot_meta()? {
            None => Ok(None),
            Some(meta) => {
                let file = File::open(self.snap_dir.join(snapshot_file_name(&meta.snapshot_id)))?;
                Ok(Some((meta, file)))
            }
        }
    }

    /// Install a fully received snapshot (see the module docs for the steps).
    fn install_snapshot(&self, meta: SnapshotMeta, mut file: File, receiving: Vec<PathBuf>) -> Result<(), StoreError> {
        let name = snapshot_file_name(&meta.snapshot_id);
        let final_path = self.snap_dir.join(&name);

        // 1. The data, durable, next to its final name. Normally the handle
        //    is a file we created in `begin_receiving_snapshot`: rename it.
        //    Otherwise (a handle from elsewhere) copy it.
        let incoming = self.snap_dir.join(format!("{name}.incoming.tmp"));
        let received = receiving.iter().find(|p| same_file(&file, p)).cloned();
        match &received {
            Some(path) => {
                file.sync_all()?;
                fs::rename(path, &incoming)?;
            }
            None => {
                file.seek(SeekFrom::Start(0))?;
                let mut out = File::create(&incoming)?;
                std::io::copy(&mut BufReader::with_capacity(1 << 20, &mut file), &mut out)?;
                out.sync_all()?;
            }
        }
        drop(file);
        for p in receiving.iter().filter(|p| Some(*p) != received.as_ref()) {
            remove_if_exists(p)?;
        }

        // 2. Verify before touching anything: a bad transfer must neither wipe
        //    the state nor replace a good file of the same name.
        if let Err(e) = snapshot_file::verify(BufReader::with_capacity(1 << 20, File::open(&incoming)?)) {
            remove_if_exists(&incoming)?;
            return Err(StoreError::Corrupt(format!("received snapshot {}: {e}", meta.snapshot_id)));
        }
        // Under the lock from here on: a concurrent build publishing its own
        // snapshot deletes every other `.snap` file.
        let _g = self.lock();
        fs::rename(&incoming, &final_path)?;
        sync_dir(&self.snap_dir)?;
        // 3. The marker, synced: from here a crash makes `open` redo step 4.
        let pending = PendingInstall { meta: meta.clone(), file: name.clone() };
        self.db.put_cf_opt(cf(&self.db, CF_SM_META)?, KEY_PENDING, encode(&pending)?, &synced())?;
        // 4. Replace the state; the last batch clears the marker. Hints
        //    describe the old state: forget them (before and after, so that
        //    nothing learned in between survives).
        self.hints().clear();
        self.fronts().clear();
        let loaded = load_snapshot_file(&self.db, &final_path, &meta);
        self.hints().clear();
        self.fronts().clear();
        loaded?;
        self.remove_snapshots_except(Some(&name), false)?;
        drop(_g);
        self.publish_applied(meta.last_log_id.map(|l| l.index));
        Ok(())
    }
}

/// Flush the state machine's memtables (`sm` and `sm_meta`, atomically) to
/// SST files and wait: every apply step written before the call is durable
/// when it returns.
pub(crate) fn flush_state_machine(db: &DB) -> Result<(), StoreError> {
    let mut opts = FlushOptions::default();
    opts.set_wait(true);
    db.flush_cfs_opt(&[cf(db, CF_SM)?, cf(db, CF_SM_META)?], &opts)?;
    Ok(())
}

/// Wipe `sm` and load the snapshot file into it in bounded batches; the final
/// (synced) batch sets last_applied, membership and the current snapshot meta
/// and clears the pending-install marker. Idempotent, so recovery can redo it.
fn load_snapshot_file(db: &DB, path: &Path, meta: &SnapshotMeta) -> Result<(), StoreError> {
    let (sm, smm) = (cf(db, CF_SM)?, cf(db, CF_SM_META)?);
    let mut reader = SnapshotReader::new(BufReader::with_capacity(1 << 20, File::open(path)?))?;

    // The wipe below covers the keys this node can see. A delete written
    // without the WAL (an apply step) can hide a key that exists only in an
    // SST file; if that delete were lost in a crash after the install, the
    // key would come back beside the snapshot's state. Flushing first makes
    // what the node sees exactly what is durable.
    flush_state_machine(db)?;
    let mut batch = WriteBatch::default();
    let (first, last) = {
        let mut it = db.raw_iterator_cf(sm);
        it.seek_to_first();
        let first = it.key().map(<[u8]>::to_vec);
        it.seek_to_last();
        let last = it.key().map(<[u8]>::to_vec);
        it.status()?;
        (first, last)
    };
    if let (Some(first), Some(last)) = (first, last) {
        batch.delete_range_cf(sm, &first, &last);
        batch.delete_cf(sm, &last);
    }
    let mut bytes = 0usize;
    while let Some((k, v)) = reader.next_record()? {
        bytes += k.len() + v.len();
        batch.put_cf(sm, k, v);
        if bytes >= INSTALL_BATCH_BYTES {
            db.write_opt(std::mem::take(&mut batch), &unsynced())?;
            bytes = 0;
        }
    }
    batch.put_cf(smm, KEY_LAST_APPLIED, encode(&meta.last_log_id)?);
    batch.put_cf(smm, KEY_MEMBERSHIP, encode(&meta.last_membership)?);
    batch.put_cf(smm, KEY_SNAPSHOT, encode(meta)?);
    batch.delete_cf(smm, KEY_PENDING);
    db.write_opt(batch, &synced())?;
    Ok(())
}

/// Apply entries in chunks: each chunk through one overlay, committed with
/// last_applied and membership in one WriteBatch.
fn apply_entries(shared: &Shared, entries: Vec<Entry>) -> Result<Vec<BatchResponse>, StorageError> {
    let db = &*shared.db;
    let io = |e: StoreError| -> StorageError { StorageIOError::write_state_machine(e.any()).into() };
    let sm = cf(db, CF_SM).map_err(io)?;
    let smm = cf(db, CF_SM_META).map_err(io)?;
    let mut out = Vec::with_capacity(entries.len());

    for chunk in entries.chunks(APPLY_CHUNK) {
        // The base state is the one after the last committed chunk, whose
        // index was published last.
        let base_index = *shared.applied_tx.borrow();
        let base = DbKv { db, cf: sm, shared, learn_at: Some(base_index) };
        let mut overlay = Overlay::new(&base);
        let mut membership = None;
        let mut last = None;
        for entry in chunk {
            let response = match &entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(batch) => jobsched_core::apply(&mut overlay, entry.log_id.index, batch)
                    .map_err(|e| StorageIOError::apply(entry.log_id, openraft::AnyError::new(&e)))?,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                    Vec::new()
                }
            };
            out.push(response);
            last = Some(entry.log_id);
        }
        let mut batch = WriteBatch::default();
        // The queue fronts change with the write, under their lock (see
        // `queue_fronts`): a reader sees both before or both after.
        let mut fronts = shared.fronts();
        {
            // Hints are lowered before the write commits (see `scan_hints`).
            let mut hints = shared.hints();
            for (k, v) in overlay.into_writes() {
                if jobsched_core::keys::is_queue_key(&k) {
                    fronts.on_write(&k, v.as_deref());
                }
                match v {
                    Some(v) => {
                        hints.on_put(&k);
                        batch.put_cf(sm, k, v)
                    }
                    None => batch.delete_cf(sm, k),
                }
            }
        }
        batch.put_cf(smm, KEY_LAST_APPLIED, encode(&last).map_err(io)?);
        if let Some(m) = &membership {
            batch.put_cf(smm, KEY_MEMBERSHIP, encode(m).map_err(io)?);
        }
        let written = db.write_opt(batch, &without_wal());
        if written.is_err() {
            // The fronts already describe a state the database does not hold.
            fronts.clear();
        }
        drop(fronts);
        written.map_err(|e| io(e.into()))?;
        shared.publish_applied(last.map(|l| l.index));
    }
    // Hints are only an optimisation: a failed refresh must not fail the apply.
    if let Err(e) = shared.refresh_reader_hints(db, sm) {
        tracing::warn!("refreshing scan hints failed: {e}");
    }
    Ok(out)
}

// ----- the openraft state machine ---------------------------------------------

/// The node's state machine (move it into `Raft::new`; keep an [`SmKv`] from
/// [`StateMachineStore::kv`] for local reads).
pub struct StateMachineStore {
    shared: Arc<Shared>,
    /// Files handed out by `begin_receiving_snapshot`, not yet installed.
    receiving: Vec<PathBuf>,
}

impl StateMachineStore {
    /// Open over an opened database; completes an interrupted install and
    /// removes stale snapshot files.
    pub(crate) fn open(db: Arc<DB>, snap_dir: PathBuf) -> Result<Self, StoreError> {
        if let Some(p) = get_meta::<PendingInstall>(&db, CF_SM_META, KEY_PENDING)? {
            tracing::warn!(snapshot = %p.meta, "completing a snapshot install interrupted by a crash");
            load_snapshot_file(&db, &snap_dir.join(&p.file), &p.meta)?;
        }
        let mut current: Option<SnapshotMeta> = get_meta(&db, CF_SM_META, KEY_SNAPSHOT)?;
        if let Some(meta) = &current {
            if !snap_dir.join(snapshot_file_name(&meta.snapshot_id)).is_file() {
                tracing::warn!(snapshot = %meta, "snapshot file is missing; forgetting it (a new one will be built)");
                db.delete_cf_opt(cf(&db, CF_SM_META)?, KEY_SNAPSHOT, &synced())?;
                current = None;
            }
        }
        let applied: Option<LogId> = get_meta::<Option<LogId>>(&db, CF_SM_META, KEY_LAST_APPLIED)?.flatten();
        let (applied_tx, _) = watch::channel(applied.map_or(0, |l| l.index));
        let shared = Arc::new(Shared {
            db,
            snap_dir,
            snapshot_lock: Mutex::new(()),
            applied_tx,
            hints: Mutex::new(ScanHints::default()),
            fronts: Mutex::new(QueueFronts::default()),
            reader_hints_at: Mutex::new(None),
        });
        let keep = current.map(|m| snapshot_file_name(&m.snapshot_id));
        shared.remove_snapshots_except(keep.as_deref(), true)?;
        Ok(StateMachineStore { shared, receiving: Vec::new() })
    }

    /// A reader of the local state (cheap to clone, usable after this store
    /// has been moved into `Raft::new`).
    pub fn kv(&self) -> SmKv {
        SmKv { shared: self.shared.clone() }
    }

    /// A receiver of the last applied index (see [`SmKv::subscribe_applied`]).
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.shared.applied_tx.subscribe()
    }

    /// See [`SmKv::digest`]; runs on a blocking thread.
    pub async fn digest(&self) -> Result<(Option<u64>, u64, u64), KvError> {
        let kv = self.kv();
        blocking(move || kv.digest().map_err(StoreError::from)).await.map_err(KvError::from)
    }
}

/// Builds a snapshot from a point-in-time view of the state machine; runs
/// concurrently with `apply`.
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let shared = self.shared.clone();
        let (meta, file) = blocking(move || shared.build_snapshot())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, e.any()))?;
        tracing::info!(snapshot = %meta, "built snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let read = || -> Result<_, StoreError> {
            let applied = get_meta::<Option<LogId>>(&self.shared.db, CF_SM_META, KEY_LAST_APPLIED)?.flatten();
            let membership = get_meta(&self.shared.db, CF_SM_META, KEY_MEMBERSHIP)?.unwrap_or_default();
            Ok((applied, membership))
        };
        read().map_err(|e| StorageIOError::read_state_machine(e.any()).into())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // Small applies run inline on the state machine task. Why: a
        // lone write's latency is a chain of thread hand-offs (HTTP task,
        // proposer, Raft core, WAL sync, state machine), and a blocking-pool
        // round trip adds two wake-ups to it for what is a few memtable
        // lookups and one unsynced batch write (tens of microseconds).
        // Large applies (batch submits, a follower catching up) would hold
        // a runtime worker for milliseconds, so they keep the pool.
        let commands: usize = entries
            .iter()
            .map(|e| match &e.payload {
                EntryPayload::Normal(batch) => batch.commands.len(),
                _ => 1,
            })
            .sum();
        if commands <= INLINE_APPLY_MAX_COMMANDS {
            return apply_entries(&self.shared, entries);
        }
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || apply_entries(&shared, entries))
            .await
            .map_err(|e| StorageIOError::write_state_machine(openraft::AnyError::error(e)))?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { shared: self.shared.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.shared.snap_dir.join(format!("recv-{}.tmp", unique()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        self.receiving.push(path);
        if self.receiving.len() > MAX_RECEIVING {
            // An abandoned stream's file; a stream still writing to it would
            // keep its (unlinked) inode and fall back to copying on install.
            let old = self.receiving.remove(0);
            let _ = fs::remove_file(old);
        }
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let sig = Some(meta.signature());
        let err = |e: StoreError| -> StorageError { StorageIOError::write_snapshot(sig.clone(), e.any()).into() };
        let mut file = *snapshot;
        file.flush().await.map_err(|e| err(e.into()))?;
        let file = file.into_std().await;
        let receiving = std::mem::take(&mut self.receiving);
        let shared = self.shared.clone();
        let meta_owned = meta.clone();
        blocking(move || shared.install_snapshot(meta_owned, file, receiving)).await.map_err(err)?;
        tracing::info!(snapshot = %meta, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let shared = self.shared.clone();
        let current = blocking(move || shared.open_current_snapshot())
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, e.any()))?;
        Ok(current.map(|(meta, file)| Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) }))
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Hooks for the crash-recovery tests.
    use super::*;

    /// Write a pending-install marker (as step 3 of an install would) for a
    /// snapshot file already placed in the snapshot directory.
    pub(crate) fn write_pending_marker(db: &DB, meta: &SnapshotMeta, file: &str) {
        let p = PendingInstall { meta: meta.clone(), file: file.to_string() };
        db.put_cf_opt(cf(db, CF_SM_META).unwrap(), KEY_PENDING, encode(&p).unwrap(), &synced()).unwrap();
    }

    pub(crate) fn has_pending_marker(db: &DB) -> bool {
        get_meta::<PendingInstall>(db, CF_SM_META, KEY_PENDING).unwrap().is_some()
    }

    pub(crate) fn db_of(sm: &StateMachineStore) -> Arc<DB> {
        sm.shared.db.clone()
    }
}
