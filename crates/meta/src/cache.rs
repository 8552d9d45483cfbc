//! A bounded in-memory cache of object records, so that a GET or HEAD of a hot
//! object needs neither redb nor a blocking thread.
//!
//! Readers fill it; the apply thread invalidates what it changes. A reader may only
//! fill what it read if no commit was under way or completed while it read. The
//! generation number is odd while a commit is under way: the apply thread calls
//! [`RecordCache::begin_change`] before a commit (the keys leave the cache, so it
//! never serves the old record once the new one is visible) and
//! [`RecordCache::end_change`] after it (the keys leave again, in case a fill slipped
//! in). A fill is accepted, under the same lock, only if the generation is even and
//! the same as when the read started.

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
            ObjectData::Classed(b) => b.len() * 56,
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

    /// Caches what a read that started at generation `since` found, unless a commit
    /// was under way when it started or has begun since.
    pub fn fill(&self, since: u64, key: Vec<u8>, record: ObjectRecord) {
        let _g = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        if since.is_multiple_of(2) && self.generation.load(Ordering::Acquire) == since {
            self.cache.insert(key, Arc::new(record));
        }
    }

    /// Before a commit that changes these keys: they leave the cache, and no read
    /// from now until [`RecordCache::end_change`] may fill it.
    pub fn begin_change<'a>(&self, keys: impl Iterator<Item = &'a [u8]>) {
        self.bump_and_remove(keys, 1);
    }

    /// After that commit: the keys leave the cache again (a fill by a read that began
    /// before the commit may have slipped in before `begin_change`).
    pub fn end_change<'a>(&self, keys: impl Iterator<Item = &'a [u8]>) {
        self.bump_and_remove(keys, 1);
    }

    fn bump_and_remove<'a>(&self, keys: impl Iterator<Item = &'a [u8]>, by: u64) {
        let _g = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(by, Ordering::AcqRel);
        for k in keys {
            self.cache.remove(k);
        }
    }

    /// Forgets everything (after recovery, when any record may have changed); keeps
    /// the generation's parity.
    pub fn clear(&self) {
        let _g = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(2, Ordering::AcqRel);
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

    fn k() -> std::iter::Once<&'static [u8]> {
        std::iter::once(b"k".as_slice())
    }

    #[test]
    fn a_read_that_overlaps_a_commit_does_not_fill() {
        let c = RecordCache::new(1 << 20);
        // Started before the commit, filled after it began.
        let g = c.generation();
        c.begin_change(k());
        c.fill(g, b"k".to_vec(), rec("old"));
        assert!(c.get(b"k").is_none());
        // Started while the commit was under way (it may have read the old record),
        // filled before or after the commit ended.
        let g = c.generation();
        c.fill(g, b"k".to_vec(), rec("old"));
        assert!(c.get(b"k").is_none());
        c.end_change(k());
        c.fill(g, b"k".to_vec(), rec("old"));
        assert!(c.get(b"k").is_none());
        // Started after the commit.
        let g = c.generation();
        c.fill(g, b"k".to_vec(), rec("new"));
        assert_eq!(c.get(b"k").unwrap().etag, "new");
        c.begin_change(k());
        assert!(c.get(b"k").is_none());
        c.end_change(k());
        c.clear();
        let g = c.generation();
        c.fill(g, b"k".to_vec(), rec("newer"));
        assert_eq!(c.get(b"k").unwrap().etag, "newer");
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
