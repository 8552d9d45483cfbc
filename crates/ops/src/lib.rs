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

use std::time::{Duration, SystemTime};

use cairn_blocks::BlockStore;
use cairn_meta::{Command, MetaError, MetaStore};
use cairn_types::now_millis;

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

/// Removes queued blocks that have been unreferenced for longer than `grace`.
pub async fn collect_queue(
    meta: &MetaStore,
    blocks: &BlockStore,
    grace: Duration,
) -> Result<GcStats> {
    let before = now_millis() - millis(grace);
    let mut stats = GcStats::default();
    // Bounded: each round forgets what it handled; a few rounds cover any backlog.
    for _ in 0..1000 {
        let candidates = meta.gc_candidates(before, 1000).await?;
        if candidates.is_empty() {
            break;
        }
        let (m, b) = (meta.clone(), blocks.clone());
        let (handled, round) = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut stats = GcStats::default();
            for (h, _) in &candidates {
                let removed =
                    b.delete_unless(h, || m.refcount_blocking(h).map(|n| n > 0).unwrap_or(true))?;
                if removed {
                    stats.removed += 1;
                } else {
                    stats.kept += 1;
                }
            }
            Ok((candidates, stats))
        })
        .await
        .map_err(|e| OpsError::Task(e.to_string()))??;
        stats.removed += round.removed;
        stats.kept += round.kept;
        meta.apply(Command::GcForget { entries: handled }).await?;
    }
    Ok(stats)
}

/// Removes block files that no metadata names and that are older than `grace`.
pub async fn sweep_orphans(
    meta: &MetaStore,
    blocks: &BlockStore,
    grace: Duration,
) -> Result<GcStats> {
    let (m, b) = (meta.clone(), blocks.clone());
    tokio::task::spawn_blocking(move || -> Result<GcStats> {
        let mut stats = GcStats::default();
        let now = SystemTime::now();
        for h in b.list()? {
            let old_enough = std::fs::metadata(b.path_of(&h))
                .and_then(|md| md.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= grace);
            if !old_enough {
                continue;
            }
            if b.delete_unless(&h, || {
                m.refcount_blocking(&h).map(|n| n > 0).unwrap_or(true)
            })? {
                stats.removed += 1;
            } else {
                stats.kept += 1;
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
    loop {
        match collect_queue(&meta, &blocks, settings.gc_grace).await {
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
