//! Where the live keys of a scanned prefix begin: lets the state machine's
//! prefix scans skip the deletion tombstones that queue-like indexes pile up
//! at their front.
//!
//! Why: the ready indexes are queues. Every acquisition deletes the first
//! entries of a prefix, and in an LSM tree a delete is a tombstone that stays
//! until compaction reaches the bottom level. A scan from the start of the
//! prefix must step over every one of them, so "take the first ready job"
//! gets slower with every job taken (tens of thousands of tombstones after a
//! few seconds at full speed). A hint remembers, per prefix, a key below
//! which the prefix has no live key, and scans seek there directly.
//!
//! Invariant: for each `(prefix, hint)`, the live `sm` column family holds no
//! key `k` with `prefix <= k < hint` that starts with `prefix`. It is kept by:
//! - learning only from a scan of the live database that covered the whole
//!   range from the prefix (or from the hint) up to the first key it found;
//! - lowering hints for every key put, *before* the write commits (a lower
//!   hint is always safe), see [`ScanHints::on_put`];
//! - forgetting everything when the column family is replaced (snapshot
//!   install).
//!
//! Deletes need no care: they only make the invariant "more true". Only the
//! apply path learns hints: it is the single writer and reads the live
//! database, so no write can slip between its scan and what it learns.
//!
//! Readers use them too (the long-poll "is anything ready?" check runs the
//! same scans on every wake-up). A hint is learned from the state at some
//! applied index `L` and stays valid for every later state (later puts only
//! lower it), but not for an earlier one: a key below it may have been live
//! then. So each hint records `L`, and a read at a RocksDB snapshot of
//! applied index `A` uses it only if `A >= L`. Reads of the live database
//! always may.

use std::collections::HashMap;

/// Prefixes remembered at most; beyond this the map starts over (hints are
/// only an optimisation, dropping them is always correct).
const MAX_PREFIXES: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct ScanHints {
    /// prefix -> (hint, applied index of the state it was learned from)
    map: HashMap<Vec<u8>, (Vec<u8>, u64)>,
}

impl ScanHints {
    /// Where a scan of `prefix` from `from` (>= prefix) should seek, and
    /// whether what it finds there is the first live key of the prefix (so it
    /// can be learned with [`ScanHints::learn`]). `view`: the applied index of
    /// the snapshot read, `None` for the live database.
    pub(crate) fn seek_for(&self, prefix: &[u8], from: &[u8], view: Option<u64>) -> (Vec<u8>, bool) {
        match self.map.get(prefix) {
            Some((hint, at)) if from <= hint.as_slice() && view.is_none_or(|v| v >= *at) => (hint.clone(), true),
            _ => (from.to_vec(), from == prefix),
        }
    }

    /// A scan of the live state at applied index `at` that covered the
    /// prefix from its start found `first` as its first live key (`None`: the
    /// prefix has no live key at all, when the scan was not cut short by its
    /// limit).
    pub(crate) fn learn(&mut self, prefix: &[u8], first: Option<&[u8]>, at: u64) {
        let hint = match first {
            Some(k) => k.to_vec(),
            None => match prefix_end(prefix) {
                Some(end) => end,
                None => return,
            },
        };
        if self.map.len() >= MAX_PREFIXES && !self.map.contains_key(prefix) {
            self.map.clear();
        }
        self.map.insert(prefix.to_vec(), (hint, at));
    }

    /// `key` is about to be written: no hint may stay above it.
    pub(crate) fn on_put(&mut self, key: &[u8]) {
        for (prefix, (hint, _)) in self.map.iter_mut() {
            if key.starts_with(prefix) && key < hint.as_slice() {
                hint.clear();
                hint.extend_from_slice(key);
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.map.clear();
    }
}

/// The first key after every key starting with `prefix`, if any.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_follow_learning_and_puts() {
        let mut h = ScanHints::default();
        assert_eq!(h.seek_for(b"q", b"q", None), (b"q".to_vec(), true));
        assert_eq!(h.seek_for(b"q", b"q5", None), (b"q5".to_vec(), false));
        h.learn(b"q", Some(b"q7"), 10);
        // A snapshot older than the learned state must not use it.
        assert_eq!(h.seek_for(b"q", b"q", Some(9)), (b"q".to_vec(), true));
        assert_eq!(h.seek_for(b"q", b"q", Some(10)), (b"q7".to_vec(), true));
        assert_eq!(h.seek_for(b"q", b"q", None), (b"q7".to_vec(), true));
        assert_eq!(h.seek_for(b"q", b"q3", None), (b"q7".to_vec(), true));
        // Starting beyond the hint: nothing to learn there.
        assert_eq!(h.seek_for(b"q", b"q9", None), (b"q9".to_vec(), false));
        // A put below the hint lowers it; other prefixes are untouched.
        h.on_put(b"q4");
        h.on_put(b"r1");
        assert_eq!(h.seek_for(b"q", b"q", None), (b"q4".to_vec(), true));
        // An empty prefix: the hint is the prefix's end.
        h.learn(b"d", None, 11);
        assert_eq!(h.seek_for(b"d", b"d", None), (b"e".to_vec(), true));
        h.on_put(b"d\x00\x01");
        assert_eq!(h.seek_for(b"d", b"d", None), (b"d\x00\x01".to_vec(), true));
        h.clear();
        assert_eq!(h.seek_for(b"q", b"q", None), (b"q".to_vec(), true));
    }
}
