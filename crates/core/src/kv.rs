//! The ordered key-value space the state machine lives in.
//!
//! `apply` reads through [`KvRead`] and writes into an [`Overlay`]: a buffer
//! of puts and deletes layered over a read-only base. Reads through the
//! overlay see the batch's own earlier writes, so one batch of commands
//! behaves exactly as if each command were applied on its own. The caller
//! (the RocksDB adapter, or [`MemKv`] in tests and tools) then commits the
//! overlay's writes atomically together with its own bookkeeping.

use std::collections::BTreeMap;
use std::ops::Bound;

/// A storage failure. Fatal for the node: the state machine cannot continue
/// from an unknown state.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state storage failed: {0}")]
pub struct KvError(pub String);

/// Key/value pairs in key order, as returned by [`KvRead::scan`].
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Read access to an ordered byte-keyed store.
pub trait KvRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;

    /// Up to `limit` entries whose key starts with `prefix` and is `>= start`
    /// (pass `start = prefix` for the whole prefix), in ascending key order.
    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<KvPairs, KvError>;
}

/// Pending writes layered over a base store. `None` marks a delete.
pub struct Overlay<'a> {
    base: &'a dyn KvRead,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Overlay<'a> {
    pub fn new(base: &'a dyn KvRead) -> Self {
        Overlay { base, writes: BTreeMap::new() }
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// The buffered writes, in key order, for the caller to commit.
    pub fn into_writes(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.writes
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

impl KvRead for Overlay<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }

    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<KvPairs, KvError> {
        let from = if start < prefix { prefix } else { start };
        let local: Vec<(&Vec<u8>, &Option<Vec<u8>>)> = self
            .writes
            .range::<[u8], _>((Bound::Included(from), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .collect();
        // Each local delete can hide at most one base entry, so asking the
        // base for that many extra entries is enough to fill `limit`.
        let deletes = local.iter().filter(|(_, v)| v.is_none()).count();
        let base = self.base.scan(prefix, from, limit.saturating_add(deletes))?;

        let mut out = Vec::with_capacity(limit.min(base.len() + local.len()));
        let (mut bi, mut li) = (0, 0);
        while out.len() < limit {
            let take_local = match (base.get(bi), local.get(li)) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((bk, _)), Some((lk, _))) => {
                    if *lk == bk {
                        bi += 1; // the overlay shadows this base entry
                        true
                    } else {
                        lk.as_slice() < bk.as_slice()
                    }
                }
            };
            if take_local {
                let (k, v) = local[li];
                li += 1;
                if let Some(v) = v {
                    out.push((k.clone(), v.clone()));
                }
            } else {
                out.push(base[bi].clone());
                bi += 1;
            }
        }
        Ok(out)
    }
}

/// An in-memory store: the reference implementation of [`KvRead`], used by
/// unit tests, property tests and tools that replay a history.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemKv {
    pub map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemKv {
    pub fn commit(&mut self, writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
        for (k, v) in writes {
            match v {
                Some(v) => self.map.insert(k, v),
                None => self.map.remove(&k),
            };
        }
    }
}

impl KvRead for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.map.get(key).cloned())
    }

    fn scan(&self, prefix: &[u8], start: &[u8], limit: usize) -> Result<KvPairs, KvError> {
        let from = if start < prefix { prefix } else { start };
        Ok(self
            .map
            .range::<[u8], _>((Bound::Included(from), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Scanning through an overlay equals scanning the store after commit.
        #[test]
        fn overlay_scan_matches_committed(
            base in proptest::collection::btree_map(proptest::collection::vec(0u8..4, 0..4), any::<u8>(), 0..20),
            ops in proptest::collection::vec((proptest::collection::vec(0u8..4, 0..4), proptest::option::of(any::<u8>())), 0..20),
            prefix in proptest::collection::vec(0u8..4, 0..2),
            start in proptest::collection::vec(0u8..4, 0..3),
            limit in 0usize..10,
        ) {
            let mut mem = MemKv::default();
            for (k, v) in &base { mem.map.insert(k.clone(), vec![*v]); }
            let mut ov = Overlay::new(&mem);
            for (k, v) in &ops {
                match v { Some(v) => ov.put(k.clone(), vec![*v]), None => ov.delete(k.clone()) }
            }
            let through = ov.scan(&prefix, &start, limit).unwrap();
            let got: Vec<_> = ops.iter().map(|(k, _)| ov.get(k).unwrap()).collect();
            let writes = ov.into_writes();
            let mut after = mem.clone();
            after.commit(writes);
            prop_assert_eq!(through, after.scan(&prefix, &start, limit).unwrap());
            let want: Vec<_> = ops.iter().map(|(k, _)| after.get(k).unwrap()).collect();
            prop_assert_eq!(got, want);
        }
    }
}
