//! The mover: takes the blocks on this node to the nodes placement names for them.
//!
//! It walks the local block files one fan-out directory at a time (bounded memory)
//! and, for each block:
//! - held here but placed elsewhere (written here as a fallback, placed elsewhere by
//!   a new layout, or this node is draining): copies it to each placement node that
//!   lacks it, then removes the local copy, once every placement node has it;
//! - placed here, on a pass after a layout change: sends it to the placement nodes
//!   that lack it if no placement node ranked before this one holds it (so that one
//!   holder, not all, sends each copy).
//!
//! A block no record names (garbage waiting for collection, or the block of a
//! write not yet committed, which its writer takes care of) is never copied: a
//! copy made after a node collected its own would outlive the collection. A node
//! that holds such a block outside its placement removes it unless it is pinned.
//!
//! A pass runs after each layout change (a full pass), and every `interval` while a
//! block was stored here outside its placement (a short pass, which looks only at
//! such blocks). Progress is saved in `mover.state` after each directory, so a pass
//! resumes after a restart. Copies are throttled to `rate` bytes per second. A
//! draining node that has nothing left after a full pass leaves the cluster.
//!
//! Repair: a full pass also runs when a node has been down (as the failure
//! detector judges it) for `repair_after`, and every `repair_interval`. For each
//! block placed here of which this node is the first live holder, each placement
//! node down that long is stood in for by the next live node in the block's
//! preference order (a fallback copy, which that node's mover takes to the
//! placement node once it is back, and then drops). The pass counts the blocks
//! left with fewer live copies than the layout wants: `blocks_at_risk` in status
//! and the `cairn_blocks_at_risk` metric.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use cairn_blocks::BlockError;
use cairn_meta::{MetaStore, NodeState};
use cairn_types::{BlockHash, ShardId};

use crate::{Blocks, Placed, lock};

/// Settings of the mover.
#[derive(Clone, Debug)]
pub struct MoverSettings {
    /// Bytes per second the mover copies at most.
    pub rate: u64,
    /// How often blocks stored outside their placement are looked at again.
    pub interval: Duration,
    /// How long a node is down before its blocks get a stand-in copy elsewhere.
    pub repair_after: Duration,
    /// How often a full pass checks every block's copies even with no change.
    pub repair_interval: Duration,
}

impl Default for MoverSettings {
    fn default() -> Self {
        MoverSettings {
            // A fraction of a disk's or a link's bandwidth: client traffic first.
            rate: 64 << 20,
            interval: Duration::from_secs(30),
            // A restart or a short outage is not worth copying a node's share.
            repair_after: Duration::from_secs(600),
            repair_interval: Duration::from_secs(3600),
        }
    }
}

/// What the mover did, for status and metrics.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// The layout version the last full pass was for.
    pub layout_version: u64,
    /// A pass is running.
    pub running: bool,
    /// Whether the running (or last) pass is a full one.
    pub full: bool,
    /// Fan-out directories (of 256) the running or last pass has done.
    pub groups_done: u32,
    pub blocks_checked: u64,
    pub blocks_copied: u64,
    pub bytes_copied: u64,
    pub blocks_removed: u64,
    /// Blocks the last pass could not take to all their nodes (a node down).
    pub blocks_left: u64,
    pub passes: u64,
    /// Blocks this node is the first live holder of that the last full pass left
    /// with fewer live copies than the layout wants.
    pub blocks_at_risk: u64,
    /// Stand-in copies the running or last full pass made for nodes long down.
    pub repair_copies: u64,
}

/// Where a pass stands, saved after each directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cursor {
    /// Layout version of the last full pass begun.
    version: u64,
    /// Next directory of that pass; 256 once it is done.
    next: u32,
}

const GROUPS: u32 = 256;
/// Blocks asked about in one round of questions to the other nodes.
const CHUNK: usize = 512;
/// Blocks copied at once.
const PARALLEL: usize = 4;

fn state_path(blocks: &Blocks) -> PathBuf {
    blocks.store().root().join("mover.state")
}

fn load_cursor(path: &std::path::Path) -> Cursor {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut it = text.split_whitespace();
    match (it.next(), it.next(), it.next()) {
        (Some("v1"), Some(v), Some(n)) => match (v.parse(), n.parse::<u32>()) {
            (Ok(version), Ok(next)) => Cursor {
                version,
                next: next.min(GROUPS),
            },
            _ => Cursor {
                version: 0,
                next: GROUPS,
            },
        },
        _ => Cursor {
            version: 0,
            next: GROUPS,
        },
    }
}

fn save_cursor(path: &std::path::Path, c: Cursor) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("v1 {} {}\n", c.version, c.next))?;
    std::fs::rename(&tmp, path)
}

/// Paces copies to a rate.
struct Throttle {
    rate: u64,
    start: Instant,
    sent: u64,
}

impl Throttle {
    /// How long to wait after sending `n` more bytes.
    fn pause(&mut self, n: u64) -> Duration {
        self.sent += n;
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64(self.sent as f64 / self.rate as f64);
        due.saturating_sub(self.start.elapsed())
    }
}

/// The mover of one node; see the module docs.
pub struct Mover {
    blocks: Blocks,
    meta: MetaStore,
    settings: MoverSettings,
    progress: Arc<Mutex<Progress>>,
    path: PathBuf,
}

impl Mover {
    pub fn new(blocks: Blocks, meta: MetaStore, settings: MoverSettings) -> Mover {
        let path = state_path(&blocks);
        let progress = blocks.inner.progress.clone();
        Mover {
            blocks,
            meta,
            settings,
            progress,
            path,
        }
    }

    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let path = self.path.clone();
        let mut cursor = tokio::task::spawn_blocking(move || load_cursor(&path))
            .await
            .unwrap_or(Cursor {
                version: 0,
                next: GROUPS,
            });
        lock(&self.progress).layout_version = cursor.version;
        // Blocks stored outside their placement before a restart are looked at once.
        self.blocks.inner.misplaced.store(true, Ordering::Relaxed);
        let mut changed = self.blocks.inner.changed.subscribe();
        let mut last_short: Option<Instant> = None;
        // The nodes long down at the last repair pass, and when a full pass last
        // ended.
        let mut repaired_for: HashSet<u64> = HashSet::new();
        let mut last_full = Instant::now();
        loop {
            if *stop.borrow() {
                return;
            }
            let placed = self.blocks.placed();
            let version = placed.layout.version;
            let idle = self.blocks.local_only_in(&placed);
            let long_down = self.blocks.down_for_at_least(self.settings.repair_after);
            let newly_down = long_down.iter().any(|n| !repaired_for.contains(n));
            repaired_for.retain(|n| long_down.contains(n));
            // A pass that left blocks at risk is run again soon (a stand-in
            // copy failed, or a node that could take one was down too).
            let retry = lock(&self.progress).blocks_at_risk > 0
                && last_full.elapsed() >= self.settings.interval * 5;
            if !idle
                && cursor.next >= GROUPS
                && cursor.version == version
                && (newly_down || retry || last_full.elapsed() >= self.settings.repair_interval)
            {
                if newly_down {
                    tracing::info!(
                        nodes = ?long_down.iter().map(|n| format!("{n:016x}")).collect::<Vec<_>>(),
                        "nodes down for longer than repair_after: their blocks get stand-in copies"
                    );
                }
                repaired_for.extend(long_down.iter().copied());
                cursor = Cursor { version, next: 0 };
            }
            if !idle && (cursor.version != version || cursor.next < GROUPS) {
                if cursor.version != version {
                    cursor = Cursor { version, next: 0 };
                }
                cursor = self.pass(&placed, Some(cursor), &stop).await;
                last_short = Some(Instant::now());
                if cursor.next >= GROUPS {
                    last_full = Instant::now();
                }
                self.maybe_leave(&placed, cursor).await;
                continue;
            }
            let due = last_short.is_none_or(|t| t.elapsed() >= self.settings.interval);
            if !idle && due && self.blocks.inner.misplaced.swap(false, Ordering::Relaxed) {
                self.pass(&placed, None, &stop).await;
                last_short = Some(Instant::now());
                // A drain whose full pass left blocks (a target was down) ends
                // after the short pass that placed the rest.
                self.maybe_leave(&placed, cursor).await;
                continue;
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(self.settings.interval) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// A draining node with nothing left leaves the cluster.
    async fn maybe_leave(&self, placed: &Placed, cursor: Cursor) {
        let me = self.blocks.node_id();
        let draining = placed
            .layout
            .node(me)
            .is_some_and(|n| n.state == NodeState::Draining);
        if !draining || cursor.next < GROUPS || cursor.version != placed.layout.version {
            return;
        }
        let store = self.blocks.store().clone();
        // One directory at a time, stopping at the first block: bounded memory.
        let empty = tokio::task::spawn_blocking(move || {
            (0..=255u8).try_fold(true, |empty, g| {
                Ok::<_, BlockError>(
                    empty
                        && store.list_group(g)?.is_empty()
                        && store.list_shards_group(g)?.is_empty(),
                )
            })
        })
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or(false);
        if !empty {
            // Written here during the pass, or a copy failed: the next pass retries.
            self.blocks.inner.misplaced.store(true, Ordering::Relaxed);
            return;
        }
        match self.meta.remove_member(me).await {
            Ok(()) => tracing::info!(
                "this node is drained: every block is at its new place; it left the cluster"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "this node is drained but could not leave the cluster yet; retrying");
                self.blocks.inner.misplaced.store(true, Ordering::Relaxed);
            }
        }
    }

    /// One pass: full (from `cursor`, saving it as it goes) or short (`None`: only
    /// blocks placed elsewhere). Returns where a full pass stopped.
    async fn pass(
        &self,
        placed: &Arc<Placed>,
        cursor: Option<Cursor>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Cursor {
        let full = cursor.is_some();
        let mut cur = cursor.unwrap_or(Cursor {
            version: placed.layout.version,
            next: 0,
        });
        {
            let mut p = lock(&self.progress);
            *p = Progress {
                layout_version: if full { cur.version } else { p.layout_version },
                running: true,
                full,
                groups_done: cur.next,
                passes: p.passes,
                blocks_at_risk: if full { 0 } else { p.blocks_at_risk },
                ..Default::default()
            };
        }
        if full {
            tracing::info!(
                version = cur.version,
                from = cur.next,
                "moving blocks to their places for a new layout"
            );
        }
        let throttle = Arc::new(Mutex::new(Throttle {
            rate: self.settings.rate,
            start: Instant::now(),
            sent: 0,
        }));
        let mut left = 0;
        while cur.next < GROUPS {
            if *stop.borrow() || self.blocks.placed().layout.version != placed.layout.version {
                break;
            }
            let group = cur.next as u8;
            let store = self.blocks.store().clone();
            let hashes = match tokio::task::spawn_blocking(move || store.list_group(group)).await {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "listing blocks failed; the mover retries later");
                    left += 1;
                    break;
                }
                Err(_) => break,
            };
            for chunk in hashes.chunks(CHUNK) {
                left += self.chunk(placed, chunk, full, &throttle).await;
            }
            let store = self.blocks.store().clone();
            match tokio::task::spawn_blocking(move || store.list_shards_group(group)).await {
                Ok(Ok(shards)) => {
                    for chunk in shards.chunks(CHUNK) {
                        left += self.shards(placed, chunk, full, &throttle).await;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "listing shards failed; the mover retries later");
                    left += 1;
                }
                Err(_) => break,
            }
            cur.next += 1;
            lock(&self.progress).groups_done = cur.next;
            if full {
                let (path, c) = (self.path.clone(), cur);
                let _ = tokio::task::spawn_blocking(move || save_cursor(&path, c)).await;
            }
        }
        if left > 0 {
            self.blocks.inner.misplaced.store(true, Ordering::Relaxed);
        }
        let mut p = lock(&self.progress);
        p.running = false;
        p.blocks_left = left;
        p.passes += 1;
        if full && cur.next >= GROUPS {
            metrics::gauge!("cairn_blocks_at_risk").set(p.blocks_at_risk as f64);
            tracing::info!(
                version = cur.version,
                copied = p.blocks_copied,
                removed = p.blocks_removed,
                stand_ins = p.repair_copies,
                at_risk = p.blocks_at_risk,
                left,
                "full pass done: blocks checked against their places"
            );
        }
        cur
    }

    /// Handles one chunk of local blocks; returns how many could not be completed.
    async fn chunk(
        &self,
        placed: &Arc<Placed>,
        hashes: &[BlockHash],
        full: bool,
        throttle: &Arc<Mutex<Throttle>>,
    ) -> u64 {
        let me = self.blocks.node_id();
        let down = if full {
            self.blocks.down_for_at_least(self.settings.repair_after)
        } else {
            HashSet::new()
        };
        // The blocks to look at, with their placement nodes and, for placement
        // nodes long down, the live nodes that stand in for them.
        let work: Vec<(BlockHash, Vec<u64>, Vec<u64>)> = hashes
            .iter()
            .map(|h| (*h, placed.nodes(h)))
            .filter(|(_, nodes)| full || !nodes.contains(&me))
            .map(|(h, nodes)| {
                let gone = nodes.iter().filter(|n| down.contains(n)).count();
                let subs = if gone == 0 {
                    Vec::new()
                } else {
                    placed
                        .preference(&h)
                        .into_iter()
                        .filter(|n| !nodes.contains(n) && !down.contains(n))
                        .take(gone)
                        .collect()
                };
                (h, nodes, subs)
            })
            .collect();
        lock(&self.progress).blocks_checked += hashes.len() as u64;
        if work.is_empty() {
            return 0;
        }
        // Blocks no record names are not copied (see the module docs).
        let (meta, asked) = (
            self.meta.clone(),
            work.iter().map(|(h, _, _)| *h).collect::<Vec<_>>(),
        );
        let refs = tokio::task::spawn_blocking(move || meta.refcounts_blocking(&asked))
            .await
            .ok()
            .and_then(|r| r.ok());
        let mut left = 0u64;
        let work: Vec<(BlockHash, Vec<u64>, Vec<u64>)> = match refs {
            // Unknown (the metadata cannot be read now): as if named.
            None => work,
            Some(refs) => {
                let mut named = Vec::with_capacity(work.len());
                for ((h, nodes, subs), n) in work.into_iter().zip(refs) {
                    if n > 0 {
                        named.push((h, nodes, subs));
                    } else if !nodes.contains(&me) && !self.drop_unnamed(h).await {
                        left += 1;
                    }
                }
                named
            }
        };
        if work.is_empty() {
            return left;
        }
        // Ask each other node which of its blocks it has.
        let mut asks: HashMap<u64, Vec<BlockHash>> = HashMap::new();
        for (h, nodes, subs) in &work {
            for n in nodes
                .iter()
                .chain(subs)
                .filter(|n| **n != me && !down.contains(n))
            {
                asks.entry(*n).or_default().push(*h);
            }
        }
        let mut has: HashMap<(u64, BlockHash), bool> = HashMap::new();
        for (node, hs) in asks {
            if let Ok(answer) = self.blocks.has(placed, node, &hs).await {
                for (h, yes) in hs.into_iter().zip(answer) {
                    has.insert((node, h), yes);
                }
            }
        }
        let has = Arc::new(has);
        let down = Arc::new(down);
        let results = futures::stream::iter(work)
            .map(|(h, nodes, subs)| {
                let (has, down) = (has.clone(), down.clone());
                let throttle = throttle.clone();
                async move {
                    let done = self.one(placed, h, &nodes, &has, &throttle).await;
                    if full && nodes.contains(&me) {
                        self.stand_in(placed, h, &nodes, &subs, &has, &down, &throttle)
                            .await;
                    }
                    done
                }
            })
            .buffer_unordered(PARALLEL)
            .collect::<Vec<bool>>()
            .await;
        left + results.into_iter().filter(|done| !done).count() as u64
    }

    /// Takes each shard held here but placed on another node to that node (and
    /// removes it here once that node has it); removes shards of blocks no record
    /// names. Returns how many could not be completed.
    async fn shards(
        &self,
        placed: &Arc<Placed>,
        ids: &[ShardId],
        full: bool,
        throttle: &Arc<Mutex<Throttle>>,
    ) -> u64 {
        let me = self.blocks.node_id();
        lock(&self.progress).blocks_checked += ids.len() as u64;
        let mut work: Vec<(ShardId, u64)> = Vec::new();
        let mut home: Vec<ShardId> = Vec::new();
        let mut left = 0u64;
        for id in ids {
            let n = usize::from(id.data) + usize::from(id.parity);
            match placed.shard_nodes(&id.block, n).get(usize::from(id.index)) {
                Some(&node) if node == me => home.push(*id),
                Some(&node) => work.push((*id, node)),
                None => left += 1, // too few nodes to place it now
            }
        }
        if full && !home.is_empty() {
            self.check_stripes(placed, &home, throttle).await;
        }
        if work.is_empty() {
            return left;
        }
        let (meta, asked) = (
            self.meta.clone(),
            work.iter().map(|(id, _)| id.block).collect::<Vec<_>>(),
        );
        let refs = tokio::task::spawn_blocking(move || meta.refcounts_blocking(&asked))
            .await
            .ok()
            .and_then(|r| r.ok());
        for (i, (id, node)) in work.into_iter().enumerate() {
            if refs.as_ref().is_some_and(|r| r.get(i) == Some(&0)) {
                if !self.drop_unnamed(id.block).await {
                    left += 1;
                }
                continue;
            }
            if !self.move_shard(placed, id, node, throttle).await {
                left += 1;
            }
        }
        left
    }

    /// For the stripes of which this node holds a shard at home: asks the other
    /// shard nodes (and, for those down past `repair_after`, their stand-ins: the
    /// next nodes in the block's preference order that are no shard node) which
    /// shards they hold. The holder of the lowest shard present rebuilds the
    /// missing ones from any `k` and sends each to its node or stand-in; a stripe
    /// still short of a shard is counted at risk.
    async fn check_stripes(
        &self,
        placed: &Arc<Placed>,
        home: &[ShardId],
        throttle: &Arc<Mutex<Throttle>>,
    ) {
        let me = self.blocks.node_id();
        let down = self.blocks.down_for_at_least(self.settings.repair_after);
        // Blocks no record names are garbage waiting for collection: not rebuilt.
        let (meta, asked) = (
            self.meta.clone(),
            home.iter().map(|id| id.block).collect::<Vec<_>>(),
        );
        let named: Vec<bool> = tokio::task::spawn_blocking(move || meta.refcounts_blocking(&asked))
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|r| r.into_iter().map(|n| n > 0).collect())
            .unwrap_or_else(|| vec![true; home.len()]);
        // Per stripe: where each shard should be now (its node, or its stand-in).
        let mut stripes: Vec<(ShardId, Vec<Option<u64>>)> = Vec::new();
        let mut asks: HashMap<u64, Vec<ShardId>> = HashMap::new();
        for (id, _) in home.iter().zip(&named).filter(|(_, n)| **n) {
            let n = usize::from(id.data) + usize::from(id.parity);
            let targets = placed.shard_nodes(&id.block, n);
            let mut subs = placed
                .preference(&id.block)
                .into_iter()
                .filter(|x| !targets.contains(x) && !down.contains(x));
            let places: Vec<Option<u64>> = targets
                .iter()
                .map(|t| {
                    if down.contains(t) {
                        subs.next()
                    } else {
                        Some(*t)
                    }
                })
                .collect();
            for (j, p) in places.iter().enumerate() {
                if let Some(node) = *p
                    && node != me
                {
                    asks.entry(node).or_default().push(ShardId {
                        index: j as u8,
                        ..*id
                    });
                }
            }
            stripes.push((*id, places));
        }
        let mut has: HashMap<(u64, ShardId), bool> = HashMap::new();
        for (node, ids) in asks {
            for part in ids.chunks(crate::MAX_HAS) {
                if let Ok(answer) = self.blocks.has_shards(placed, node, part).await {
                    for (id, yes) in part.iter().zip(answer) {
                        has.insert((node, *id), yes);
                    }
                }
            }
        }
        // The shards of these blocks here (more than one of a block when the
        // layout has fewer nodes than shards).
        let (store, blocks) = (
            self.blocks.store().clone(),
            stripes.iter().map(|(id, _)| id.block).collect::<Vec<_>>(),
        );
        let local: HashSet<ShardId> = tokio::task::spawn_blocking(move || {
            blocks
                .iter()
                .flat_map(|b| store.shards_of(b).unwrap_or_default())
                .collect()
        })
        .await
        .unwrap_or_default();
        for (id, places) in stripes {
            let shard = |j: usize| ShardId {
                index: j as u8,
                ..id
            };
            // Per shard: Some(true) held, Some(false) missing, None not known.
            let state: Vec<Option<bool>> = places
                .iter()
                .enumerate()
                .map(|(j, p)| match *p {
                    Some(node) if node == me => Some(local.contains(&shard(j))),
                    Some(node) => has.get(&(node, shard(j))).copied(),
                    None => Some(false),
                })
                .collect();
            // The lowest shard held or not known answers for the stripe.
            if state.iter().position(|s| *s != Some(false)) != Some(usize::from(id.index)) {
                continue;
            }
            let missing: Vec<(usize, u64)> = places
                .iter()
                .enumerate()
                .filter(|(j, _)| state[*j] == Some(false))
                .filter_map(|(j, p)| p.map(|node| (j, node)))
                .collect();
            let mut short = state.iter().filter(|s| **s != Some(true)).count();
            if !missing.is_empty() {
                short -= self.rebuild(placed, id, &missing, throttle).await;
            }
            if short > 0 {
                lock(&self.progress).blocks_at_risk += 1;
            }
        }
    }

    /// Rebuilds the shards `missing` (index, node) of `id`'s block from any `k` and
    /// sends each to its node; returns how many were written.
    async fn rebuild(
        &self,
        placed: &Arc<Placed>,
        id: ShardId,
        missing: &[(usize, u64)],
        throttle: &Arc<Mutex<Throttle>>,
    ) -> usize {
        let store = self.blocks.store().clone();
        let len = match tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            store.get_shard_into(&id, &mut buf)
        })
        .await
        {
            Ok(Ok(n)) => n,
            _ => return 0,
        };
        let Ok(len32) = u32::try_from(len) else {
            return 0;
        };
        let block = match self
            .blocks
            .read_coded(id.block, len32, id.data, id.parity, Box::new(Vec::new()))
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(block = %id.block, error = %e, "rebuilding missing shards failed; retried on the next pass");
                return 0;
            }
        };
        let (k, m) = (usize::from(id.data), usize::from(id.parity));
        let Ok(Ok(shards)) =
            tokio::task::spawn_blocking(move || crate::coded::split(&block, k, m)).await
        else {
            return 0;
        };
        let mut written = 0;
        for &(j, node) in missing {
            let data = Bytes::from(shards[j].clone());
            let n = data.len() as u64;
            let sum = BlockHash::of(&data).0;
            let sid = ShardId {
                index: j as u8,
                ..id
            };
            match self
                .blocks
                .put_shard_to(placed, node, sid, len, data, sum)
                .await
            {
                Ok(()) => {
                    written += 1;
                    lock(&self.progress).repair_copies += 1;
                    metrics::counter!("cairn_repair_copies_total").increment(1);
                }
                Err(e) => {
                    tracing::debug!(node = format!("{node:016x}"), error = %e, "writing a rebuilt shard failed; retried on the next pass");
                }
            }
            let pause = lock(throttle).pause(n);
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        written
    }

    /// Sends one shard to `node` unless it has it, then removes it here.
    async fn move_shard(
        &self,
        placed: &Arc<Placed>,
        id: ShardId,
        node: u64,
        throttle: &Arc<Mutex<Throttle>>,
    ) -> bool {
        match self.blocks.has_shards(placed, node, &[id]).await {
            Ok(has) if has.first() == Some(&true) => {}
            Ok(_) => {
                let store = self.blocks.store().clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = Vec::new();
                    store.get_shard_into(&id, &mut buf).map(|n| (n, buf))
                })
                .await;
                let (block_len, data) = match read {
                    Ok(Ok((n, d))) => (n, Bytes::from(d)),
                    Ok(Err(BlockError::NotFound(_))) => return true, // collected meanwhile
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "a shard to move failed its check; left for the scrub");
                        return false;
                    }
                    Err(_) => return false,
                };
                let len = data.len() as u64;
                let sum = BlockHash::of(&data).0;
                if let Err(e) = self
                    .blocks
                    .put_shard_to(placed, node, id, block_len, data, sum)
                    .await
                {
                    tracing::debug!(node = format!("{node:016x}"), error = %e, "moving a shard to its place failed; retried later");
                    return false;
                }
                {
                    let mut p = lock(&self.progress);
                    p.blocks_copied += 1;
                    p.bytes_copied += len;
                }
                metrics::counter!("cairn_mover_bytes_copied_total").increment(len);
                let pause = lock(throttle).pause(len);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            Err(_) => return false,
        }
        let store = self.blocks.store().clone();
        match tokio::task::spawn_blocking(move || store.remove_surplus_shard(&id)).await {
            Ok(Ok(removed)) => {
                if removed {
                    lock(&self.progress).blocks_removed += 1;
                }
                true
            }
            _ => false,
        }
    }

    /// Removes this node's copy of a block no record names, held outside its
    /// placement, unless a write in flight pins it; whether it is gone.
    async fn drop_unnamed(&self, h: BlockHash) -> bool {
        let (store, meta) = (self.blocks.store().clone(), self.meta.clone());
        match tokio::task::spawn_blocking(move || {
            store.delete_unless(&h, || {
                meta.refcount_blocking(&h).map(|n| n > 0).unwrap_or(true)
            })?;
            Ok::<_, BlockError>(!store.contains(&h))
        })
        .await
        {
            Ok(Ok(gone)) => {
                if gone {
                    lock(&self.progress).blocks_removed += 1;
                }
                gone
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "removing an unnamed block failed");
                false
            }
            Err(_) => false,
        }
    }

    /// For a block placed here of which this node is the first live holder: copies
    /// it to the stand-ins of its placement nodes long down, and counts it at risk
    /// if it still has fewer live copies than the layout wants.
    #[allow(clippy::too_many_arguments)]
    async fn stand_in(
        &self,
        placed: &Arc<Placed>,
        h: BlockHash,
        nodes: &[u64],
        subs: &[u64],
        has: &HashMap<(u64, BlockHash), bool>,
        down: &HashSet<u64>,
        throttle: &Arc<Mutex<Throttle>>,
    ) {
        let me = self.blocks.node_id();
        let holds = |n: u64| n == me || has.get(&(n, h)) == Some(&true);
        let first_live = nodes
            .iter()
            .copied()
            .find(|n| holds(*n) && !down.contains(n));
        if first_live != Some(me) {
            return;
        }
        let mut live = nodes
            .iter()
            .chain(subs)
            .filter(|n| holds(**n) && !down.contains(n))
            .count();
        let want = placed.layout.copies().min(placed.layout.nodes.len());
        let missing: Vec<u64> = subs
            .iter()
            .copied()
            .filter(|n| has.get(&(*n, h)) == Some(&false))
            .collect();
        if live < want && !missing.is_empty() {
            let store = self.blocks.store().clone();
            if let Ok(Ok(data)) = tokio::task::spawn_blocking(move || store.get(&h)).await {
                let data = Bytes::from(data);
                let len = data.len() as u64;
                for n in missing {
                    if live >= want {
                        break;
                    }
                    match self.blocks.put_to(placed, n, h, data.clone()).await {
                        Ok(()) => {
                            live += 1;
                            lock(&self.progress).repair_copies += 1;
                            metrics::counter!("cairn_repair_copies_total").increment(1);
                        }
                        Err(e) => {
                            tracing::debug!(node = format!("{n:016x}"), error = %e, "a stand-in copy failed; retried on the next pass");
                        }
                    }
                    let pause = lock(throttle).pause(len);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        }
        if live < want {
            lock(&self.progress).blocks_at_risk += 1;
        }
    }

    /// Takes one block where it belongs; returns whether it is done.
    async fn one(
        &self,
        placed: &Arc<Placed>,
        h: BlockHash,
        nodes: &[u64],
        has: &HashMap<(u64, BlockHash), bool>,
        throttle: &Arc<Mutex<Throttle>>,
    ) -> bool {
        let me = self.blocks.node_id();
        let mine = nodes.contains(&me);
        let holds = |n: u64| n == me || has.get(&(n, h)) == Some(&true);
        let unknown: Vec<u64> = nodes
            .iter()
            .copied()
            .filter(|n| *n != me && !has.contains_key(&(*n, h)))
            .collect();
        let missing: Vec<u64> = nodes
            .iter()
            .copied()
            .filter(|n| *n != me && has.get(&(*n, h)) == Some(&false))
            .collect();
        if mine {
            // One holder sends: the first placement node that has the block.
            let first_holder = nodes.iter().copied().find(|n| holds(*n));
            if first_holder != Some(me) || missing.is_empty() {
                return unknown.is_empty();
            }
        }
        let mut ok = unknown.is_empty();
        if !missing.is_empty() {
            let store = self.blocks.store().clone();
            let data = match tokio::task::spawn_blocking(move || store.get(&h)).await {
                Ok(Ok(d)) => Bytes::from(d),
                Ok(Err(BlockError::NotFound(_))) => return true, // collected meanwhile
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "a block to move failed its check; left for repair");
                    return false;
                }
                Err(_) => return false,
            };
            let len = data.len() as u64;
            for n in missing {
                match self.blocks.put_to(placed, n, h, data.clone()).await {
                    Ok(()) => {
                        let mut p = lock(&self.progress);
                        p.blocks_copied += 1;
                        p.bytes_copied += len;
                        metrics::counter!("cairn_mover_bytes_copied_total").increment(len);
                    }
                    Err(e) => {
                        tracing::debug!(node = format!("{n:016x}"), error = %e, "copying a block to its place failed; retried later");
                        ok = false;
                    }
                }
                let pause = lock(throttle).pause(len);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
        }
        if mine || !ok {
            return ok;
        }
        // Every placement node has it: this copy is surplus.
        let store = self.blocks.store().clone();
        match tokio::task::spawn_blocking(move || store.remove_surplus_copy(&h)).await {
            Ok(Ok(removed)) => {
                if removed {
                    lock(&self.progress).blocks_removed += 1;
                }
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "removing a moved block failed");
                false
            }
            Err(_) => false,
        }
    }
}
