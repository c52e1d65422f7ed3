//! Long scans that keep sled's memory bounded.
//!
//! sled 0.34 does not account a page access at once: it appends it to one of 256 shard
//! queues (the page id picks the shard) and settles a queue, evicting what the shard
//! holds over its share of the cache, only when 64 accesses have piled up there. A sled
//! iterator reads each leaf page once, so during a scan every queue fills with up to 64
//! *distinct* pages, each still resident: ~16,000 leaves of ~9 records, whatever the
//! cache size. Over 1,000,000 queued indicators (2,000,000 records with their catalog
//! entries) that was 261 MB resident at the end of a scan with a 16 MiB cache (1 MiB:
//! 253 MB), and the peak of every restart.
//!
//! Reading each record's key once more with `get` accesses its leaf a second time, in its
//! shard's queue: a queue then fills with a few pages read many times and settles ~10
//! times as often. The lookup finds the page just read, in memory: no I/O. Measured on
//! one store of 1,000,000 indicators (a plain scan of all 2,000,000 records: 261 MB →
//! 101 MB resident, 1.36 s → 1.92 s) and through the daemon (`cargo bench --bench
//! memory`, 1,000,000 queued, 16 MiB cache, RSS settled / peak): 227 / 272 MB → 92 / 108
//! MB, restart to healthy 5.1 s → 5.3 s.

use sled::{IVec, Iter, Tree};

/// A sled iterator whose records are each read once more, so that what it scans is
/// evicted as it goes (see the module doc).
pub(crate) struct Touching<'t> {
    tree: &'t Tree,
    inner: Iter,
}

/// [`Touching`] over `inner`, an iterator of `tree`.
pub(crate) fn touching(tree: &Tree, inner: Iter) -> Touching<'_> {
    Touching { tree, inner }
}

impl Iterator for Touching<'_> {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        let entry = self.inner.next()?;
        if let Ok((key, _)) = &entry {
            // Only the access counts: the value is the one just read (or the record
            // went away meanwhile, which the caller's own read already reflects).
            if let Err(e) = self.tree.get(key) {
                return Some(Err(e));
            }
        }
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yields_what_the_iterator_yields() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("t").unwrap();
        for i in 0u32..1000 {
            tree.insert(i.to_be_bytes(), vec![i as u8; 100]).unwrap();
        }
        let plain: Vec<_> = tree
            .range(10u32.to_be_bytes()..)
            .map(Result::unwrap)
            .collect();
        let touched: Vec<_> = touching(&tree, tree.range(10u32.to_be_bytes()..))
            .map(Result::unwrap)
            .collect();
        assert_eq!(plain.len(), 990);
        assert_eq!(plain, touched);
    }
}
