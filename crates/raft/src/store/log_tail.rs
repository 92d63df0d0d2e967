//! The newest log entries, kept decoded in memory so that reading them back
//! costs a clone instead of a RocksDB seek and a bincode decode.
//!
//! Why: openraft reads every entry back right after appending it: on the
//! leader once per follower (replication) and once more on its core task to
//! hand the entry to the state machine; on a follower once (apply). Those
//! reads were RocksDB iterators plus a full decode of each entry's batch.
//!
//! Invariant: `entries` is a run of consecutive indexes, each equal to what
//! the `logs` column family holds at that index, and, when not empty, its
//! last index is the log's last index. It is kept by:
//! - `truncate` and `purge` drop their range from the tail *before* the
//!   database write (a smaller tail is always correct);
//! - `append` adds its entries *after* its write returned (before that a
//!   reader misses and reads the database); an append that does not
//!   continue the run (the first after opening, or after a truncate) first
//!   drops what no longer fits, so the run stays consecutive;
//! - the tail is bounded in entries and bytes, dropping from the front.
//!
//! openraft serialises the writers (`&mut self`); readers run concurrently
//! and take the lock only to clone what they need.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use crate::types::Entry;

/// Entries kept at most. Replication to a healthy follower reads within
/// the last few dozen; a slower one falls back to the database.
const MAX_ENTRIES: usize = 2048;
/// Stored bytes kept at most (batch-submit entries reach ~1 MB each).
const MAX_BYTES: usize = 16 << 20;

#[derive(Default)]
struct Run {
    /// (entry, its stored size in bytes), consecutive indexes.
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl Run {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn end_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.log_id.index + 1)
    }

    fn pop_front(&mut self) {
        if let Some((_, n)) = self.entries.pop_front() {
            self.bytes -= n;
        }
    }

    fn pop_back(&mut self) {
        if let Some((_, n)) = self.entries.pop_back() {
            self.bytes -= n;
        }
    }
}

#[derive(Default)]
pub(crate) struct LogTail {
    run: Mutex<Run>,
}

impl LogTail {
    fn lock(&self) -> MutexGuard<'_, Run> {
        // A panic mid-update may have broken the run: start over empty.
        self.run.lock().unwrap_or_else(|p| {
            let mut g = p.into_inner();
            *g = Run::default();
            g
        })
    }

    /// Entries `[start, end)` (`None`: to the end of the log), stopping once
    /// their stored bytes reach `max_bytes` (after at least one), if the tail
    /// holds all of them.
    pub(crate) fn read(&self, start: u64, end: Option<u64>, max_bytes: Option<usize>) -> Option<Vec<Entry>> {
        let run = self.lock();
        let (first, run_end) = (run.first_index()?, run.end_index()?);
        let end = end.unwrap_or(run_end);
        if start < first || start > run_end || end > run_end {
            return None;
        }
        let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
        let mut bytes = 0usize;
        for (entry, n) in run.entries.range((start - first) as usize..(end.max(start) - first) as usize) {
            out.push(entry.clone());
            bytes += n;
            if max_bytes.is_some_and(|m| bytes >= m) {
                break;
            }
        }
        Some(out)
    }

    /// `entries` (consecutive, with their stored sizes) were just written.
    pub(crate) fn appended(&self, entries: Vec<(Entry, usize)>) {
        let Some(first_new) = entries.first().map(|(e, _)| e.log_id.index) else { return };
        let mut run = self.lock();
        // Keep only what the new entries continue; anything at or after
        // their first index was overwritten by this append.
        while run.end_index().is_some_and(|end| end > first_new) {
            run.pop_back();
        }
        if run.end_index().is_some_and(|end| end != first_new) {
            *run = Run::default();
        }
        for (entry, n) in entries {
            run.bytes += n;
            run.entries.push_back((entry, n));
        }
        while run.entries.len() > MAX_ENTRIES || (run.bytes > MAX_BYTES && run.entries.len() > 1) {
            run.pop_front();
        }
    }

    /// Entries from `index` on are about to be removed.
    pub(crate) fn truncate_from(&self, index: u64) {
        let mut run = self.lock();
        while run.end_index().is_some_and(|end| end > index) {
            run.pop_back();
        }
    }

    /// Entries up to and including `index` are about to be removed.
    pub(crate) fn purge_upto(&self, index: u64) {
        let mut run = self.lock();
        while run.first_index().is_some_and(|f| f <= index) {
            run.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::LogId;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> (Entry, usize) {
        let log_id = LogId::new(CommittedLeaderId::new(term, 1), index);
        (Entry { log_id, payload: EntryPayload::Blank }, 10)
    }

    fn ids(v: Option<Vec<Entry>>) -> Option<Vec<(u64, u64)>> {
        v.map(|v| v.iter().map(|e| (e.log_id.leader_id.term, e.log_id.index)).collect())
    }

    #[test]
    fn the_tail_follows_appends_truncates_and_purges() {
        let tail = LogTail::default();
        assert_eq!(ids(tail.read(1, None, None)), None);
        tail.appended((1..=5).map(|i| entry(1, i)).collect());
        assert_eq!(ids(tail.read(2, Some(4), None)), Some(vec![(1, 2), (1, 3)]));
        assert_eq!(ids(tail.read(4, None, None)), Some(vec![(1, 4), (1, 5)]));
        assert_eq!(ids(tail.read(6, None, None)), Some(vec![]), "nothing after the last entry");
        assert_eq!(ids(tail.read(8, None, None)), None);
        assert_eq!(ids(tail.read(3, Some(2), None)), Some(vec![]));
        assert_eq!(ids(tail.read(0, Some(3), None)), None, "before the tail: the database answers");
        assert_eq!(ids(tail.read(3, Some(7), None)), None, "past the end");
        assert_eq!(ids(tail.read(1, None, Some(25))), Some(vec![(1, 1), (1, 2), (1, 3)]), "byte cap");
        // A follower overwrites from 4 with a new term (after a truncate).
        tail.truncate_from(4);
        assert_eq!(ids(tail.read(3, None, None)), Some(vec![(1, 3)]));
        tail.appended(vec![entry(2, 4)]);
        assert_eq!(ids(tail.read(3, None, None)), Some(vec![(1, 3), (2, 4)]));
        // An append that overlaps without a truncate replaces the overlap.
        tail.appended(vec![entry(3, 4), entry(3, 5)]);
        assert_eq!(ids(tail.read(1, None, None)), Some(vec![(1, 1), (1, 2), (1, 3), (3, 4), (3, 5)]));
        tail.purge_upto(2);
        assert_eq!(ids(tail.read(2, None, None)), None);
        assert_eq!(ids(tail.read(3, Some(4), None)), Some(vec![(1, 3)]));
        // A gap (e.g. after a snapshot install) starts a new run.
        tail.appended(vec![entry(3, 9)]);
        assert_eq!(ids(tail.read(5, None, None)), None);
        assert_eq!(ids(tail.read(9, None, None)), Some(vec![(3, 9)]));
        // Truncating everything empties it.
        tail.truncate_from(1);
        assert_eq!(ids(tail.read(9, None, None)), None);
    }

    #[test]
    fn the_tail_is_bounded() {
        let tail = LogTail::default();
        tail.appended((1..=(MAX_ENTRIES as u64 + 10)).map(|i| entry(1, i)).collect());
        assert_eq!(ids(tail.read(10, Some(11), None)), None);
        assert_eq!(ids(tail.read(11, Some(12), None)), Some(vec![(1, 11)]));
        // One huge entry is kept even above the byte bound (it is the last).
        let (big, _) = entry(1, MAX_ENTRIES as u64 + 11);
        tail.appended(vec![(big, MAX_BYTES + 1)]);
        assert_eq!(ids(tail.read(MAX_ENTRIES as u64 + 11, None, None)), Some(vec![(1, MAX_ENTRIES as u64 + 11)]));
        assert_eq!(ids(tail.read(MAX_ENTRIES as u64 + 10, None, None)), None);
    }
}
