//! Background work of a node: garbage collection of unreferenced blocks and expiry
//! of abandoned multipart uploads.
//!
//! Garbage collection never removes a block that a manifest may still name: a block
//! is removed only if no writer has it pinned and the metadata counts no reference to
//! it, both checked under the block store's pin lock (see `cairn-blocks`). Blocks lose
//! their last reference in a metadata commit, which queues them; they are removed once
//! they have stayed unreferenced for the grace period. A sweep over the block files
//! also removes blocks that were written but never named (a crash between a block
//! write and its metadata commit, a failed upload).
//!
//! In a cluster the queue is replicated with the metadata and every node removes its
//! own copies from it; the leader forgets an entry only once every node has had time
//! to (`OpsSettings::forget_delay` later). A node that was down all that time leaves
//! its copy to the sweep.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use cairn_blocks::BlockStore;
use cairn_meta::{Command, MetaError, MetaStore};
use cairn_types::{BlockHash, UnixMillis, now_millis};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Block(#[from] cairn_blocks::BlockError),
    #[error("background task failed: {0}")]
    Task(String),
}

pub type Result<T> = std::result::Result<T, OpsError>;

/// Settings of the background work.
#[derive(Clone, Debug)]
pub struct OpsSettings {
    /// How long a block stays unreferenced before it is removed.
    pub gc_grace: Duration,
    /// How often the queue of unreferenced blocks is processed.
    pub gc_interval: Duration,
    /// How often all block files are swept for never-referenced blocks.
    pub sweep_interval: Duration,
    /// Multipart uploads older than this are aborted.
    pub multipart_expiry: Duration,
    /// In a cluster, how long a queued block stays queued after its grace period, so
    /// that every node removes its copy (at least the time a node keeps a block it
    /// received pinned, and a few collection intervals).
    pub forget_delay: Duration,
}

impl Default for OpsSettings {
    fn default() -> Self {
        OpsSettings {
            // An hour: far longer than any in-flight request, short enough that deleted
            // data frees its space the same day.
            gc_grace: Duration::from_secs(3600),
            gc_interval: Duration::from_secs(60),
            sweep_interval: Duration::from_secs(6 * 3600),
            multipart_expiry: Duration::from_secs(7 * 24 * 3600),
            forget_delay: Duration::from_secs(15 * 60),
        }
    }
}

/// What one pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcStats {
    pub removed: u64,
    pub kept: u64,
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Queue entries this node has handled (block → the time it was queued), so that it
/// does not handle them again while they wait to be forgotten.
#[derive(Default)]
pub struct GcMemo {
    done: HashMap<BlockHash, UnixMillis>,
}

/// Removes this node's copies of queued blocks that have been unreferenced for longer
/// than `grace`. Entries are forgotten once `forget_delay` has passed on top (by the
/// leader only; at once in a cluster of one, where the only copy is gone).
pub async fn collect_queue(
    meta: &MetaStore,
    blocks: &BlockStore,
    grace: Duration,
    forget_delay: Duration,
    memo: &mut GcMemo,
) -> Result<GcStats> {
    const PAGE: usize = 1000;
    let before = now_millis() - millis(grace);
    let alone = meta.layout().nodes.len() <= 1;
    let forget_before = if alone {
        before
    } else {
        before - millis(forget_delay)
    };
    let mut stats = GcStats::default();
    let mut seen: HashMap<BlockHash, UnixMillis> = HashMap::new();
    let mut after = None;
    loop {
        let page = meta.gc_candidates_after(after, before, PAGE).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(last.0);
        let full = page.len() >= PAGE;
        let todo: Vec<BlockHash> = page
            .iter()
            .filter(|(h, q)| memo.done.get(h) != Some(q))
            .map(|(h, _)| *h)
            .collect();
        seen.extend(page.iter().copied());
        if !todo.is_empty() {
            let (m, b) = (meta.clone(), blocks.clone());
            let (round, kept) = tokio::task::spawn_blocking(move || -> Result<_> {
                let mut stats = GcStats::default();
                let mut kept = std::collections::HashSet::new();
                for h in &todo {
                    let removed = b.delete_unless(h, || {
                        m.refcount_blocking(h).map(|n| n > 0).unwrap_or(true)
                    })?;
                    if removed {
                        stats.removed += 1;
                    } else if b.contains(h) {
                        // Named again, or pinned by a write still in flight: looked
                        // at again next time, until the entry is forgotten.
                        stats.kept += 1;
                        kept.insert(*h);
                    }
                }
                Ok((stats, kept))
            })
            .await
            .map_err(|e| OpsError::Task(e.to_string()))??;
            stats.removed += round.removed;
            stats.kept += round.kept;
            for (h, q) in &page {
                if !kept.contains(h) {
                    memo.done.insert(*h, *q);
                }
            }
        }
        let forget: Vec<(BlockHash, UnixMillis)> = page
            .into_iter()
            .filter(|(_, q)| *q < forget_before)
            .collect();
        if !forget.is_empty() && (alone || meta.is_leader()) {
            meta.apply(Command::GcForget { entries: forget }).await?;
        }
        if !full {
            break;
        }
    }
    // What left the queue (forgotten, or referenced again) is no longer remembered.
    memo.done.retain(|h, q| seen.get(h) == Some(q));
    Ok(stats)
}

/// Removes block and shard files that no metadata names and that are older than
/// `grace`.
pub async fn sweep_orphans(
    meta: &MetaStore,
    blocks: &BlockStore,
    grace: Duration,
) -> Result<GcStats> {
    let (m, b) = (meta.clone(), blocks.clone());
    tokio::task::spawn_blocking(move || -> Result<GcStats> {
        let mut stats = GcStats::default();
        let now = SystemTime::now();
        let old_enough = |path: &std::path::Path| {
            std::fs::metadata(path)
                .and_then(|md| md.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= grace)
        };
        let mut candidates: Vec<BlockHash> = Vec::new();
        for group in 0..=255u8 {
            for h in b.list_group(group)? {
                if old_enough(&b.path_of(&h)) {
                    candidates.push(h);
                }
            }
            for id in b.list_shards_group(group)? {
                if old_enough(&b.shard_path(&id)) && candidates.last() != Some(&id.block) {
                    candidates.push(id.block);
                }
            }
            for h in candidates.drain(..) {
                if b.delete_unless(&h, || {
                    m.refcount_blocking(&h).map(|n| n > 0).unwrap_or(true)
                })? {
                    stats.removed += 1;
                } else {
                    stats.kept += 1;
                }
            }
        }
        Ok(stats)
    })
    .await
    .map_err(|e| OpsError::Task(e.to_string()))?
}

/// Aborts multipart uploads started longer ago than `expiry`. Returns how many.
pub async fn expire_uploads(meta: &MetaStore, expiry: Duration) -> Result<u64> {
    let before = now_millis() - millis(expiry);
    let mut n = 0;
    for (bucket, key, upload_id) in meta.uploads_older_than(before).await? {
        match meta
            .apply(Command::AbortUpload {
                bucket,
                key,
                upload_id,
                now: now_millis(),
            })
            .await
        {
            Ok(_) | Err(MetaError::NoSuchUpload) => n += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

/// Runs the background work until `stop` turns true.
pub async fn run(
    meta: MetaStore,
    blocks: BlockStore,
    settings: OpsSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_sweep: Option<tokio::time::Instant> = None;
    let mut memo = GcMemo::default();
    let forget_delay = settings.forget_delay;
    loop {
        match collect_queue(&meta, &blocks, settings.gc_grace, forget_delay, &mut memo).await {
            Ok(s) if s.removed > 0 => {
                tracing::info!(
                    removed = s.removed,
                    "garbage collection removed unreferenced blocks"
                );
                metrics::counter!("cairn_gc_blocks_removed_total").increment(s.removed);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "garbage collection failed; will retry"),
        }
        if last_sweep.is_none_or(|t| t.elapsed() >= settings.sweep_interval) {
            match sweep_orphans(&meta, &blocks, settings.gc_grace).await {
                Ok(s) => {
                    last_sweep = Some(tokio::time::Instant::now());
                    if s.removed > 0 {
                        tracing::info!(removed = s.removed, "sweep removed blocks no object names");
                        metrics::counter!("cairn_gc_blocks_removed_total").increment(s.removed);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "block sweep failed; will retry"),
            }
        }
        match expire_uploads(&meta, settings.multipart_expiry).await {
            Ok(n) if n > 0 => tracing::info!(aborted = n, "aborted abandoned multipart uploads"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "expiring multipart uploads failed; will retry"),
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.gc_interval) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
