//! A bounded in-memory cache of object records, so that a GET or HEAD of a hot
//! object needs neither redb nor a blocking thread.
//!
//! Readers fill it; the apply thread invalidates what it changes. A reader may only
//! fill what it read if no change was applied while it read: every invalidation
//! bumps a generation number, and a fill checks the generation it started with
//! under the same lock. The apply thread invalidates the keys of a batch both
//! before its commit (so the cache never serves the old record once the new one is
//! visible) and after it (so a reader that read the old record cannot fill it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::records::{ObjectData, ObjectRecord};

#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<Vec<u8>, Arc<ObjectRecord>> for Weight {
    fn weight(&self, key: &Vec<u8>, val: &Arc<ObjectRecord>) -> u64 {
        let data = match &val.data {
            ObjectData::Inline(d) => d.len(),
            ObjectData::Blocks(b) => b.len() * 48,
        };
        (key.len() + data + 256) as u64
    }
}

pub(crate) struct RecordCache {
    cache: quick_cache::sync::Cache<Vec<u8>, Arc<ObjectRecord>, Weight>,
    generation: AtomicU64,
    fill: Mutex<()>,
}

impl RecordCache {
    pub fn new(bytes: usize) -> Self {
        RecordCache {
            cache: quick_cache::sync::Cache::with_weighter(
                (bytes / 1024).max(16),
                bytes as u64,
                Weight,
            ),
            generation: AtomicU64::new(0),
            fill: Mutex::new(()),
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<Arc<ObjectRecord>> {
        self.cache.get(key)
    }

    /// The generation to pass to [`RecordCache::fill`] for a read starting now.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches what a read that started at generation `since` found, unless a change
    /// was applied meanwhile.
    pub fn fill(&self, since: u64, key: Vec<u8>, record: ObjectRecord) {
        let _g = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::Acquire) == since {
            self.cache.insert(key, Arc::new(record));
        }
    }

    /// Forgets these keys and stops fills by reads that started before.
    pub fn invalidate<'a>(&self, keys: impl Iterator<Item = &'a [u8]>) {
        let _g = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        for k in keys {
            self.cache.remove(k);
        }
    }

    /// Forgets everything (after recovery, when any record may have changed).
    pub fn clear(&self) {
        let _g = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(etag: &str) -> ObjectRecord {
        ObjectRecord {
            size: 1,
            etag: etag.into(),
            last_modified: 0,
            headers: Default::default(),
            checksums: Default::default(),
            parts_count: None,
            data: ObjectData::Inline(vec![1]),
        }
    }

    #[test]
    fn a_fill_after_an_invalidation_is_dropped() {
        let c = RecordCache::new(1 << 20);
        let g = c.generation();
        // A change is applied while the read runs.
        c.invalidate([b"k".as_slice()].into_iter());
        c.fill(g, b"k".to_vec(), rec("old"));
        assert!(c.get(b"k").is_none());
        let g = c.generation();
        c.fill(g, b"k".to_vec(), rec("new"));
        assert_eq!(c.get(b"k").unwrap().etag, "new");
        c.invalidate([b"k".as_slice()].into_iter());
        assert!(c.get(b"k").is_none());
    }

    #[test]
    fn the_cache_stays_within_its_budget() {
        let c = RecordCache::new(64 << 10);
        for i in 0..1000u32 {
            let mut r = rec("x");
            r.data = ObjectData::Inline(vec![0; 4096]);
            c.fill(c.generation(), i.to_be_bytes().to_vec(), r);
        }
        let held = (0..1000u32)
            .filter(|i| c.get(&i.to_be_bytes()).is_some())
            .count();
        assert!(held <= 16, "{held} records of 4 KiB in a 64 KiB cache");
    }
}
