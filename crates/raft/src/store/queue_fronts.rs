//! The first rows of each queue-like index (ready queues, delayed index),
//! kept in memory by the apply path so that "take the first ready job" and
//! "is anything ready?" do not build a RocksDB iterator each time.
//!
//! Why: with a large retained history the `sm` column family spans several
//! hundred MB in many SST files and levels. Every prefix scan builds a merged
//! iterator over the memtables and every level and seeks in each; profiled
//! at 1 million retained jobs, those scans were 16 % of the leader's CPU
//! while workers acquired one job per call (docs/benchmarks.md item 23): one
//! from the acquire handler's readiness check, one from the acquire's apply.
//! A front read ahead once answers the next many scans from memory.
//!
//! Invariant, per cached prefix `P` with `Front { rows, end }`: the keys of
//! the live `sm` column family that start with `P` and are below `end`
//! (`None`: all keys of `P`) are exactly the keys of `rows`, with the same
//! values. It is kept by:
//! - filling a front only from a scan of the live database, on the apply
//!   path (the single writer), that covered the prefix from its first live
//!   key (what a scan hint guarantees, see `scan_hints`);
//! - applying every put and delete inside `end` to `rows` while the write
//!   commits, under the same lock (see `apply_entries`), so a reader never
//!   sees the front and the database disagree; if a commit fails the fronts
//!   are dropped;
//! - cutting a front that grows past [`FrontLimits::max_rows`] back (the
//!   new `end` is the first key dropped, so the invariant still holds);
//! - forgetting everything when the column family is replaced (snapshot
//!   install), or when too many prefixes are cached.
//!
//! A scan is answered from a front only when the front holds the whole
//! answer: `limit` rows below `end`, or fewer when `end` is `None`.
//! Readers of a RocksDB snapshot never use fronts (they describe the live
//! state, not an older one).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use jobsched_core::KvPairs;

/// How a front is filled and bounded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrontLimits {
    /// Rows read when the apply path fills a front (at least the scan's limit).
    pub read_ahead: usize,
    /// A front with more rows than this (puts into its range) is cut back.
    pub max_rows: usize,
    /// Rows kept when a front is cut back.
    pub keep_rows: usize,
    /// Prefixes cached at most; beyond this every front is dropped.
    pub max_prefixes: usize,
}

impl Default for FrontLimits {
    fn default() -> Self {
        // 64 rows: one iterator per 64 single-job acquires; a front of a
        // few hundred ~40-byte rows per job type is a few KiB.
        FrontLimits { read_ahead: 64, max_rows: 512, keep_rows: 128, max_prefixes: 1024 }
    }
}

#[derive(Debug, Default)]
struct Front {
    rows: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Exclusive end of the key range `rows` describes; `None`: the rest of
    /// the prefix.
    end: Option<Vec<u8>>,
}

impl Front {
    fn covers(&self, key: &[u8]) -> bool {
        self.end.as_deref().is_none_or(|end| key < end)
    }
}

#[derive(Debug, Default)]
pub(crate) struct QueueFronts {
    limits: FrontLimits,
    fronts: HashMap<Vec<u8>, Front>,
}

impl QueueFronts {
    #[cfg(test)]
    pub(crate) fn with_limits(limits: FrontLimits) -> Self {
        QueueFronts { limits, fronts: HashMap::new() }
    }

    pub(crate) fn read_ahead(&self) -> usize {
        self.limits.read_ahead
    }

    /// The scan `(prefix, from, limit)` (with `from >= prefix`), if the
    /// front of `prefix` holds the whole answer.
    pub(crate) fn answer(&self, prefix: &[u8], from: &[u8], limit: usize) -> Option<KvPairs> {
        let front = self.fronts.get(prefix)?;
        if !front.covers(from) {
            return None;
        }
        let rows: KvPairs = front
            .rows
            .range::<[u8], _>((Bound::Included(from), Bound::Unbounded))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (rows.len() == limit || front.end.is_none()).then_some(rows)
    }

    /// A scan of the live database found `rows` as the first live rows of
    /// `prefix`, asking for `asked` rows (fewer found: the prefix has no
    /// more). Only the apply path may call this (see the module docs).
    pub(crate) fn fill(&mut self, prefix: &[u8], rows: &[(Vec<u8>, Vec<u8>)], asked: usize) {
        if asked == 0 {
            return;
        }
        if self.fronts.len() >= self.limits.max_prefixes && !self.fronts.contains_key(prefix) {
            self.fronts.clear();
        }
        let end = if rows.len() < asked {
            None
        } else {
            // The immediate successor of the last key: the front covers up
            // to and including it.
            rows.last().map(|(k, _)| {
                let mut e = k.clone();
                e.push(0);
                e
            })
        };
        let rows = rows.iter().cloned().collect();
        self.fronts.insert(prefix.to_vec(), Front { rows, end });
    }

    /// `key` is being written (`Some`: put, `None`: delete) in the commit
    /// that holds this lock.
    pub(crate) fn on_write(&mut self, key: &[u8], value: Option<&[u8]>) {
        let limits = self.limits;
        for (prefix, front) in self.fronts.iter_mut() {
            if !key.starts_with(prefix) || !front.covers(key) {
                continue;
            }
            match value {
                Some(v) => {
                    front.rows.insert(key.to_vec(), v.to_vec());
                    if front.rows.len() > limits.max_rows {
                        // Keep the first `keep_rows`; the first key dropped
                        // becomes the end of what the front describes.
                        if let Some(cut) = front.rows.keys().nth(limits.keep_rows).cloned() {
                            front.rows.split_off(&cut);
                            front.end = Some(cut);
                        }
                    }
                }
                None => {
                    front.rows.remove(key);
                }
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        self.fronts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random history of fills, puts, deletes and scans over a few
    /// prefixes: every answer a front gives equals the reference store's.
    #[test]
    fn fronts_answer_exactly_what_the_store_holds() {
        let limits = FrontLimits { read_ahead: 4, max_rows: 6, keep_rows: 3, max_prefixes: 2 };
        let mut fronts = QueueFronts::with_limits(limits);
        let mut store: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let prefixes: [&[u8]; 3] = [b"a", b"b", b"ab"];
        let scan = |store: &BTreeMap<Vec<u8>, Vec<u8>>, prefix: &[u8], from: &[u8], limit: usize| -> KvPairs {
            store
                .range::<[u8], _>((Bound::Included(from), Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(prefix))
                .take(limit)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (mut answered, mut full_answers) = (0, 0);
        for step in 0..20_000u32 {
            let prefix = prefixes[next(3) as usize];
            let key = |next: &mut dyn FnMut(u64) -> u64| {
                let mut k = prefixes[next(3) as usize].to_vec();
                k.push(next(24) as u8);
                k
            };
            match next(6) {
                0 | 1 => {
                    let k = key(&mut next);
                    let v = step.to_be_bytes().to_vec();
                    fronts.on_write(&k, Some(&v));
                    store.insert(k, v);
                }
                2 | 3 => {
                    let k = key(&mut next);
                    fronts.on_write(&k, None);
                    store.remove(&k);
                }
                4 => {
                    let asked = fronts.read_ahead() + next(3) as usize;
                    fronts.fill(prefix, &scan(&store, prefix, prefix, asked), asked);
                }
                _ => {
                    let mut from = prefix.to_vec();
                    if next(2) == 0 {
                        from.push(next(24) as u8);
                    }
                    let limit = next(5) as usize;
                    if let Some(rows) = fronts.answer(prefix, &from, limit) {
                        answered += 1;
                        full_answers += usize::from(rows.len() == limit && limit > 0);
                        assert_eq!(rows, scan(&store, prefix, &from, limit), "step {step}");
                    }
                }
            }
        }
        // The history exercised the fronts, not only the fallback.
        assert!(answered > 1_000 && full_answers > 100, "answered {answered}, full {full_answers}");
    }

    #[test]
    fn a_front_grown_by_puts_is_cut_back_and_still_exact() {
        let limits = FrontLimits { read_ahead: 2, max_rows: 4, keep_rows: 2, max_prefixes: 8 };
        let mut fronts = QueueFronts::with_limits(limits);
        // An empty queue: the front covers the whole prefix.
        fronts.fill(b"q", &[], 2);
        assert_eq!(fronts.answer(b"q", b"q", 10), Some(vec![]));
        for i in [5u8, 1, 4, 2, 3] {
            fronts.on_write(&[b'q', i], Some(&[i]));
        }
        // Five rows > 4: cut to the first two; q3 and above unknown.
        assert_eq!(fronts.answer(b"q", b"q", 2), Some(vec![(vec![b'q', 1], vec![1]), (vec![b'q', 2], vec![2])]));
        assert_eq!(fronts.answer(b"q", b"q", 3), None);
        assert_eq!(fronts.answer(b"q", &[b'q', 3], 1), None);
        // A put beyond the end is not the front's business.
        fronts.on_write(&[b'q', 9], Some(&[9]));
        fronts.on_write(&[b'q', 1], None);
        assert_eq!(fronts.answer(b"q", b"q", 1), Some(vec![(vec![b'q', 2], vec![2])]));
        fronts.clear();
        assert_eq!(fronts.answer(b"q", b"q", 1), None);
    }
}
