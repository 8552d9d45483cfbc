//! Blocks across the cluster: where each block goes, writing its copies, and reading
//! it from whichever node has it.
//!
//! The layout (nodes, zones, capacities, replication factor; in the metadata, so
//! versioned by Raft) gives a [`Placement`]: each block's preference order of nodes.
//! A write sends the block to the first `copies` nodes of that order at once and is
//! acknowledged once `quorum` of them have fsynced it; a node that fails or does not
//! answer is replaced by the next node in the order (so a minority of nodes down
//! stops no write), and the remaining copies are finished in the background. A read
//! takes the local copy if there is one, else asks the nodes in preference order,
//! and checks the bytes against their BLAKE3 before using them. A block written to a
//! node outside its placement (a fallback) is noted as misplaced; the mover
//! ([`mover`]) takes such blocks, and those a layout change moved, to their places.
//!
//! A node without peers, or alone in its layout, keeps every block locally: the
//! single-node path is the same store with no network in it.

pub mod coded;
pub mod health;
pub mod mover;
pub mod scrub;

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::DerefMut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use cairn_blocks::{BlockError, BlockStore, PinGuard};
use cairn_meta::{Layout, MetaStore, NodeState};
use cairn_net::{Peers, RpcError};
use cairn_placement::{NodeSpec, Placement};
use cairn_types::BlockHash;

/// RPC services of the block layer (`cairn-net` dispatches on them).
/// Stores the body as a block; answers its BLAKE3 once fsynced.
pub const SVC_BLOCK_PUT: u8 = 16;
/// Answers the block named by the body (32 bytes), or [`NOT_FOUND`].
pub const SVC_BLOCK_GET: u8 = 17;
/// For each 32-byte address in the body, one byte: 1 if the block is here.
pub const SVC_BLOCK_HAS: u8 = 18;
/// The node's [`Report`]: disk usage and the mover's progress.
pub const SVC_REPORT: u8 = 19;
/// A heartbeat of the failure detector ([`health`]): answered at once, empty.
pub const SVC_PING: u8 = 20;
/// A scrub command (one byte, [`scrub::ScrubCommand`]); answers the node's
/// [`scrub::ScrubStatus`].
pub const SVC_SCRUB: u8 = 21;
/// Stores a shard (its name, [`coded`], then its bytes); answers the bytes' BLAKE3
/// once fsynced.
pub const SVC_SHARD_PUT: u8 = 22;
/// Answers the shard named by the body, or [`NOT_FOUND`].
pub const SVC_SHARD_GET: u8 = 23;
/// For each shard name in the body, one byte: 1 if the shard is here.
pub const SVC_SHARD_HAS: u8 = 24;

/// Whether a service id belongs to the block layer.
pub fn is_block_service(svc: u8) -> bool {
    (SVC_BLOCK_PUT..=SVC_SHARD_HAS).contains(&svc)
}

/// Repairs of copies found bad or missing by reads, under way at once at most
/// (beyond, a read leaves the repair to the scrub and the mover).
const READ_REPAIRS: usize = 4;

/// A node's disk and the mover's progress, as `cairn cluster status` shows them.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Size of the file system holding the node's data, and the bytes used on it.
    pub fs_bytes: u64,
    pub used_bytes: u64,
    pub mover: mover::Progress,
}

impl Report {
    fn encode(&self) -> Bytes {
        let m = &self.mover;
        let fields = [
            self.fs_bytes,
            self.used_bytes,
            m.layout_version,
            u64::from(m.running),
            u64::from(m.full),
            u64::from(m.groups_done),
            m.blocks_checked,
            m.blocks_copied,
            m.bytes_copied,
            m.blocks_removed,
            m.blocks_left,
            m.passes,
            m.blocks_at_risk,
            m.repair_copies,
        ];
        let mut out = Vec::with_capacity(1 + fields.len() * 8);
        out.push(1u8);
        for f in fields {
            out.extend_from_slice(&f.to_le_bytes());
        }
        Bytes::from(out)
    }

    fn decode(b: &[u8]) -> Option<Report> {
        let (&1, rest) = b.split_first()? else {
            return None;
        };
        let f: Vec<u64> = rest
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        if f.len() < 12 {
            return None;
        }
        Some(Report {
            fs_bytes: f[0],
            used_bytes: f[1],
            mover: mover::Progress {
                layout_version: f[2],
                running: f[3] != 0,
                full: f[4] != 0,
                groups_done: f[5] as u32,
                blocks_checked: f[6],
                blocks_copied: f[7],
                bytes_copied: f[8],
                blocks_removed: f[9],
                blocks_left: f[10],
                passes: f[11],
                blocks_at_risk: f.get(12).copied().unwrap_or(0),
                repair_copies: f.get(13).copied().unwrap_or(0),
            },
        })
    }
}

/// The error a node answers for a block it does not have.
const NOT_FOUND: &str = "block not found";
/// Addresses one `SVC_BLOCK_HAS` call may ask about.
pub const MAX_HAS: usize = 4096;
/// Blocks received from peers being stored at once on this node.
const RECEIVING: usize = 16;
/// Blocks received from peers that stay pinned (see [`DataSettings::recent_pin`]),
/// at most.
const MAX_RECENT_PINS: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Block(#[from] BlockError),
    /// Too few nodes could take or give the block.
    #[error("{0}")]
    Unavailable(String),
}

/// Settings of the block layer.
#[derive(Clone, Debug)]
pub struct DataSettings {
    /// How long one block write or read to a peer may take.
    pub block_timeout: Duration,
    /// How long a node that failed a call is tried last (a coarse failure detector).
    pub down_for: Duration,
    /// How long a block received from a peer stays pinned against garbage
    /// collection: the writer commits the metadata that names it well within this.
    pub recent_pin: Duration,
    /// The failure detector's heartbeats and thresholds.
    pub health: health::HealthSettings,
    /// When a read asks a second node while the first has not answered.
    pub hedge: Hedge,
}

/// When a block read sends a second (hedged) request to the next node while the
/// first has not answered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Hedge {
    /// Never: the next node is asked only once the first failed or timed out.
    Off,
    /// After this long.
    After(Duration),
    /// After the 95th percentile of the latest remote reads' latency (between
    /// `HEDGE_MIN` and `HEDGE_MAX`; `HEDGE_COLD` until enough reads were seen).
    Auto,
}

impl std::str::FromStr for Hedge {
    type Err = String;
    /// `auto`, `off`, or a duration (`20ms`, `1s`).
    fn from_str(s: &str) -> Result<Hedge, String> {
        match s.trim() {
            "auto" => Ok(Hedge::Auto),
            "off" => Ok(Hedge::Off),
            d => {
                let split = d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len());
                let (n, unit) = d.split_at(split);
                let n: u64 = n
                    .parse()
                    .map_err(|_| format!("'{s}' is not auto, off or a duration like 20ms"))?;
                match unit {
                    "ms" => Ok(Hedge::After(Duration::from_millis(n))),
                    "s" => Ok(Hedge::After(Duration::from_secs(n))),
                    _ => Err(format!("'{s}' is not auto, off or a duration like 20ms")),
                }
            }
        }
    }
}

/// Bounds of the automatic hedge delay, and the delay used before enough remote
/// reads were timed.
const HEDGE_MIN: Duration = Duration::from_millis(2);
const HEDGE_MAX: Duration = Duration::from_secs(1);
const HEDGE_COLD: Duration = Duration::from_millis(50);
/// Remote read latencies kept for the automatic hedge delay.
const LATENCY_WINDOW: usize = 512;
/// Requests one block read has in flight at most (the first and a hedge).
const READ_FANOUT: usize = 2;

/// The latest remote block reads' latencies (microseconds), oldest overwritten.
#[derive(Default)]
struct Latencies {
    samples: Vec<u32>,
    next: usize,
}

impl Latencies {
    fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u32::MAX)) as u32;
        if self.samples.len() < LATENCY_WINDOW {
            self.samples.push(us);
        } else {
            self.samples[self.next] = us;
        }
        self.next = (self.next + 1) % LATENCY_WINDOW;
    }

    /// The `q` quantile, once at least 16 reads were timed.
    fn quantile(&self, q: f64) -> Option<Duration> {
        if self.samples.len() < 16 {
            return None;
        }
        let mut v = self.samples.clone();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        let (_, x, _) = v.select_nth_unstable(i);
        Some(Duration::from_micros(u64::from(*x)))
    }
}

impl Default for DataSettings {
    fn default() -> Self {
        DataSettings {
            // 4 MiB at a slow 10 MB/s with room to spare.
            block_timeout: Duration::from_secs(30),
            down_for: Duration::from_secs(2),
            recent_pin: Duration::from_secs(600),
            health: health::HealthSettings::default(),
            hedge: Hedge::Auto,
        }
    }
}

/// A layout and the placement computed from it.
pub struct Placed {
    pub layout: Arc<Layout>,
    placement: Option<Placement>,
    rpc: HashMap<u64, String>,
}

impl Placed {
    fn new(layout: Arc<Layout>) -> Placed {
        let specs: Vec<NodeSpec> = layout
            .nodes
            .iter()
            .map(|n| NodeSpec {
                id: n.id,
                zone: n.zone.clone(),
                capacity: if n.state == NodeState::Active {
                    n.capacity
                } else {
                    0
                },
            })
            .collect();
        let placement = specs
            .iter()
            .any(|s| s.capacity > 0)
            .then(|| Placement::new(&specs, layout.copies()));
        let rpc = layout.nodes.iter().map(|n| (n.id, n.rpc.clone())).collect();
        Placed {
            layout,
            placement,
            rpc,
        }
    }

    /// Every node that takes data, in the block's preference order: its placement
    /// nodes first, then the fallbacks.
    pub fn preference(&self, hash: &BlockHash) -> Vec<u64> {
        self.placement
            .as_ref()
            .map(|p| p.preference(hash))
            .unwrap_or_default()
    }

    /// The nodes that should hold the block.
    pub fn nodes(&self, hash: &BlockHash) -> Vec<u64> {
        self.placement
            .as_ref()
            .map(|p| p.nodes(hash))
            .unwrap_or_default()
    }

    /// Every node of the layout in the block's preference order, the nodes that
    /// take no data (draining) last: where a reader looks.
    fn read_order(&self, hash: &BlockHash) -> Vec<u64> {
        let mut order = self.preference(hash);
        for n in &self.layout.nodes {
            if !order.contains(&n.id) {
                order.push(n.id);
            }
        }
        order
    }
}

/// The cluster's blocks as seen from this node. Cheap to clone.
#[derive(Clone)]
pub struct Blocks {
    inner: Arc<Inner>,
}

struct Inner {
    local: BlockStore,
    me: u64,
    peers: Option<Peers>,
    settings: DataSettings,
    placed: RwLock<Arc<Placed>>,
    /// Nodes whose last call failed, and when.
    down: Mutex<HashMap<u64, Instant>>,
    /// The failure detector of each other node of the layout.
    detectors: health::Detectors,
    /// Latencies of the latest remote block reads (for the hedge delay).
    latencies: Mutex<Latencies>,
    /// This node's scrub.
    scrub: scrub::Scrub,
    /// Read repairs under way.
    repairs: Arc<tokio::sync::Semaphore>,
    /// Pins of blocks received from peers, oldest first.
    recent: Mutex<VecDeque<(Instant, PinGuard)>>,
    receiving: tokio::sync::Semaphore,
    /// A block was stored here outside its placement since the mover last looked.
    misplaced: AtomicBool,
    /// Placement recomputed for a new layout; the mover waits on it.
    changed: tokio::sync::watch::Sender<u64>,
    /// The mover's progress.
    progress: Arc<Mutex<mover::Progress>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn task_failed(e: tokio::task::JoinError) -> DataError {
    DataError::Block(BlockError::Io {
        op: "block task",
        path: Default::default(),
        source: std::io::Error::other(e.to_string()),
    })
}

impl Blocks {
    /// The block layer of a node with no peers: every block is local.
    pub fn local(local: BlockStore) -> Blocks {
        Self::build(local, 0, None, DataSettings::default(), Arc::default())
    }

    fn build(
        local: BlockStore,
        me: u64,
        peers: Option<Peers>,
        settings: DataSettings,
        layout: Arc<Layout>,
    ) -> Blocks {
        let detectors = health::Detectors::new(settings.health.clone());
        let scrub = scrub::Scrub::new(local.root());
        Blocks {
            inner: Arc::new(Inner {
                local,
                me,
                peers,
                settings,
                placed: RwLock::new(Arc::new(Placed::new(layout))),
                down: Mutex::default(),
                detectors,
                latencies: Mutex::default(),
                scrub,
                repairs: Arc::new(tokio::sync::Semaphore::new(READ_REPAIRS)),
                recent: Mutex::default(),
                receiving: tokio::sync::Semaphore::new(RECEIVING),
                misplaced: AtomicBool::new(false),
                changed: tokio::sync::watch::channel(0).0,
                progress: Arc::default(),
            }),
        }
    }

    /// The block layer of a node, following the layout in `meta`: the placement is
    /// computed again (on a blocking thread) whenever the layout changes.
    pub async fn new(
        local: BlockStore,
        meta: &MetaStore,
        peers: Option<Peers>,
        settings: DataSettings,
    ) -> Blocks {
        let mut watch = meta.watch_layout();
        let layout = watch.borrow_and_update().clone();
        let placed = tokio::task::spawn_blocking(move || Placed::new(layout))
            .await
            .unwrap_or_else(|_| Placed::new(Arc::default()));
        let b = Self::build(local, meta.node_id(), peers, settings, Arc::default());
        b.set_placed(placed);
        let weak = Arc::downgrade(&b.inner);
        tokio::spawn(follow_layout(weak.clone(), watch));
        tokio::spawn(expire_recent_pins(weak.clone()));
        if b.inner.peers.is_some() {
            tokio::spawn(health::heartbeats(weak));
        }
        b
    }

    fn set_placed(&self, placed: Placed) {
        let version = placed.layout.version;
        *self.inner.placed.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(placed);
        self.inner.changed.send_replace(version);
    }

    /// The local block store.
    pub fn store(&self) -> &BlockStore {
        &self.inner.local
    }

    /// The layout and placement in use.
    pub fn placed(&self) -> Arc<Placed> {
        self.inner
            .placed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn node_id(&self) -> u64 {
        self.inner.me
    }

    /// Whether every block is kept on this node only (no peers, or alone in the
    /// layout).
    pub fn local_only(&self) -> bool {
        let placed = self.placed();
        self.local_only_in(&placed)
    }

    fn local_only_in(&self, placed: &Placed) -> bool {
        self.inner.peers.is_none() || placed.layout.nodes.iter().all(|n| n.id == self.inner.me)
    }

    /// Nodes to try last: those whose last call failed a moment ago, and those
    /// the failure detector holds suspect or down.
    fn down_nodes(&self) -> HashSet<u64> {
        let mut out: HashSet<u64> = {
            let mut down = lock(&self.inner.down);
            let for_ = self.inner.settings.down_for;
            down.retain(|_, t| t.elapsed() < for_);
            down.keys().copied().collect()
        };
        out.extend(self.inner.detectors.unhealthy(Instant::now()));
        out
    }

    /// The nodes the failure detector has held down for at least `d`.
    pub fn down_for_at_least(&self, d: Duration) -> HashSet<u64> {
        self.inner
            .detectors
            .down_for_at_least(d, Instant::now())
            .into_iter()
            .collect()
    }

    /// Each other node's state as the failure detector judges it now.
    pub fn health(&self) -> Vec<health::PeerHealth> {
        self.inner.detectors.view(Instant::now())
    }

    fn note_result(&self, node: u64, res: &Result<Bytes, RpcError>) {
        match res {
            Err(RpcError::Connect { .. } | RpcError::Timeout(_) | RpcError::Closed) => {
                lock(&self.inner.down).insert(node, Instant::now());
            }
            Ok(_) => {
                lock(&self.inner.down).remove(&node);
            }
            Err(_) => {}
        }
    }

    /// `order` with the nodes that failed recently moved to the end.
    fn live_first(&self, mut order: Vec<u64>) -> Vec<u64> {
        let down = self.down_nodes();
        if !down.is_empty() {
            order.sort_by_key(|n| down.contains(n));
        }
        order
    }

    async fn call(
        &self,
        placed: &Placed,
        node: u64,
        svc: u8,
        body: Bytes,
    ) -> Result<Bytes, RpcError> {
        let (Some(peers), Some(addr)) = (&self.inner.peers, placed.rpc.get(&node)) else {
            return Err(RpcError::Connect {
                addr: format!("node {node:016x}"),
                reason: "no RPC address known".into(),
            });
        };
        let res = peers
            .call_node(node, addr, svc, body, self.inner.settings.block_timeout)
            .await;
        self.note_result(node, &res);
        res
    }

    /// Stores one copy on `node`.
    async fn put_to(
        &self,
        placed: &Placed,
        node: u64,
        hash: BlockHash,
        data: Bytes,
    ) -> Result<(), DataError> {
        if node == self.inner.me {
            let local = self.inner.local.clone();
            return tokio::task::spawn_blocking(move || local.put(&hash, &data))
                .await
                .map_err(task_failed)?
                .map_err(DataError::Block);
        }
        let answer = self
            .call(placed, node, SVC_BLOCK_PUT, data)
            .await
            .map_err(|e| DataError::Unavailable(e.to_string()))?;
        if answer[..] != hash.0 {
            return Err(DataError::Unavailable(format!(
                "node {node:016x} stored a block of another address"
            )));
        }
        Ok(())
    }

    /// Stores a block (`hash` is `BlockHash::of(data)`): returns once the layout's
    /// write quorum of copies is fsynced; the other copies follow in the background.
    /// The caller pins `hash` on this node until the metadata naming it commits.
    pub async fn put(&self, hash: BlockHash, data: Bytes) -> Result<(), DataError> {
        let placed = self.placed();
        if self.local_only_in(&placed) {
            let local = self.inner.local.clone();
            return tokio::task::spawn_blocking(move || local.put(&hash, &data))
                .await
                .map_err(task_failed)?
                .map_err(DataError::Block);
        }
        let order = self.live_first(placed.preference(&hash));
        if order.is_empty() {
            return Err(DataError::Unavailable(
                "no node of the layout takes data".into(),
            ));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move { this.replicate(placed, hash, data, order, tx).await });
        rx.await
            .unwrap_or_else(|_| Err(DataError::Unavailable("block write abandoned".into())))
    }

    /// Writes copies to the nodes of `order`, starting with as many as the layout
    /// wants and replacing each that fails with the next one; answers `done` once the
    /// quorum is reached (or cannot be), and goes on until every copy is written.
    async fn replicate(
        &self,
        placed: Arc<Placed>,
        hash: BlockHash,
        data: Bytes,
        order: Vec<u64>,
        done: tokio::sync::oneshot::Sender<Result<(), DataError>>,
    ) {
        let copies = placed.layout.copies().min(order.len());
        let quorum = placed.layout.quorum().min(copies).max(1);
        let wanted: HashSet<u64> = placed.nodes(&hash).into_iter().collect();
        let mut next = 0;
        let mut running = FuturesUnordered::new();
        let start = |node: u64| {
            let (this, placed, data) = (self.clone(), placed.clone(), data.clone());
            async move { (node, this.put_to(&placed, node, hash, data).await) }
        };
        while next < order.len() && running.len() < copies {
            running.push(start(order[next]));
            next += 1;
        }
        let mut done = Some(done);
        let mut written = 0;
        let mut errors = Vec::new();
        while let Some((node, res)) = running.next().await {
            match res {
                Ok(()) => {
                    written += 1;
                    if !wanted.contains(&node) {
                        metrics::counter!("cairn_block_fallback_writes_total").increment(1);
                        if node == self.inner.me {
                            self.inner.misplaced.store(true, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(node = format!("{node:016x}"), block = %hash, error = %e, "writing a block copy failed; trying the next node");
                    errors.push(format!("node {node:016x}: {e}"));
                    if next < order.len() {
                        running.push(start(order[next]));
                        next += 1;
                    }
                }
            }
            if written >= quorum
                && let Some(d) = done.take()
            {
                let _ = d.send(Ok(()));
            }
        }
        if written < copies {
            metrics::counter!("cairn_block_copies_missing_total")
                .increment((copies - written) as u64);
        }
        if let Some(d) = done.take() {
            // In a cluster a shortfall is the cluster's to answer for (503), even
            // when one of the failures was this node's full disk.
            let _ = d.send(Err(DataError::Unavailable(format!(
                "{written} of {quorum} block copies needed could be written: {}",
                errors.join("; ")
            ))));
        }
    }

    /// Reads the block into `buf` (replacing its contents) and checks it against its
    /// address: the local copy if there is a good one, else one from the first node
    /// in preference order that has it.
    pub async fn read<B>(&self, hash: BlockHash, mut buf: B) -> Result<B, DataError>
    where
        B: DerefMut<Target = Vec<u8>> + Send + 'static,
    {
        let placed = self.placed();
        let local = self.inner.local.clone();
        let (res, back) = tokio::task::spawn_blocking(move || {
            let r = local.get_into(&hash, &mut buf);
            (r, buf)
        })
        .await
        .map_err(task_failed)?;
        buf = back;
        let local_err = match res {
            Ok(()) => return Ok(buf),
            Err(e) if self.local_only_in(&placed) => return Err(DataError::Block(e)),
            Err(BlockError::NotFound(_)) => None,
            Err(e) => {
                tracing::error!(error = %e, "the local copy of a block failed its check; reading another copy");
                Some(e)
            }
        };
        let local_bad = local_err.is_some();
        let order: Vec<u64> = self
            .live_first(placed.read_order(&hash))
            .into_iter()
            .filter(|n| *n != self.inner.me)
            .collect();
        let mut errors = Vec::new();
        let mut lacking = Vec::new();
        if let Some(got) = self
            .read_remote(&placed, hash, &order, &mut errors, &mut lacking)
            .await?
        {
            buf.clear();
            buf.extend_from_slice(&got);
            // Read repair: this node's bad copy, and the placement nodes that
            // answered without a good one, get the good copy in the background.
            if local_bad {
                lacking.push(self.inner.me);
            }
            self.repair_in_background(&placed, hash, got, lacking);
            return Ok(buf);
        }
        if errors.is_empty() {
            return Err(DataError::Block(
                local_err.unwrap_or(BlockError::NotFound(hash)),
            ));
        }
        Err(DataError::Unavailable(format!(
            "no copy of block {hash} could be read: {}",
            errors.join("; ")
        )))
    }

    /// Gives the nodes of `lacking` that placement names for the block a good copy
    /// (`data`), in the background; this node's own bad copy is quarantined first.
    /// Skipped when `READ_REPAIRS` are under way: scrub and the mover catch up.
    fn repair_in_background(
        &self,
        placed: &Arc<Placed>,
        hash: BlockHash,
        data: Bytes,
        lacking: Vec<u64>,
    ) {
        let wanted = placed.nodes(&hash);
        let targets: Vec<u64> = lacking.into_iter().filter(|n| wanted.contains(n)).collect();
        if targets.is_empty() {
            return;
        }
        let Ok(permit) = self.inner.repairs.clone().try_acquire_owned() else {
            metrics::counter!("cairn_read_repairs_skipped_total").increment(1);
            return;
        };
        let (this, placed) = (self.clone(), placed.clone());
        tokio::spawn(async move {
            let _permit = permit;
            for node in targets {
                let res = if node == this.inner.me {
                    this.store_good_copy(hash, data.clone()).await
                } else {
                    this.put_to(&placed, node, hash, data.clone()).await
                };
                match res {
                    Ok(()) => {
                        metrics::counter!("cairn_read_repairs_total").increment(1);
                        tracing::info!(node = format!("{node:016x}"), block = %hash, "read repair: a good copy was written");
                    }
                    Err(e) => {
                        tracing::warn!(node = format!("{node:016x}"), block = %hash, error = %e, "read repair failed");
                    }
                }
            }
        });
    }

    /// Replaces this node's copy of a block with `data` (a good copy, checked by
    /// the caller): the bad one goes to the quarantine first.
    async fn store_good_copy(&self, hash: BlockHash, data: Bytes) -> Result<(), DataError> {
        let local = self.inner.local.clone();
        tokio::task::spawn_blocking(move || {
            let mut pin = local.pin();
            pin.add(hash);
            if local.get(&hash).is_err() {
                local.quarantine(&hash)?;
            }
            local.put(&hash, &data)
        })
        .await
        .map_err(task_failed)?
        .map_err(DataError::Block)
    }

    /// Moves this node's copy of a block (found bad) to the quarantine and writes
    /// a good copy from another node in its place. Fails when no other node has a
    /// good copy (the bad one stays in the quarantine).
    pub async fn replace_local_copy(&self, hash: BlockHash) -> Result<(), DataError> {
        let local = self.inner.local.clone();
        tokio::task::spawn_blocking(move || local.quarantine(&hash))
            .await
            .map_err(task_failed)?
            .map_err(DataError::Block)?;
        let placed = self.placed();
        if self.local_only_in(&placed) {
            return Err(DataError::Unavailable(
                "this node holds the only copy".into(),
            ));
        }
        let order: Vec<u64> = self
            .live_first(placed.read_order(&hash))
            .into_iter()
            .filter(|n| *n != self.inner.me)
            .collect();
        let (mut errors, mut lacking) = (Vec::new(), Vec::new());
        match self
            .read_remote(&placed, hash, &order, &mut errors, &mut lacking)
            .await?
        {
            Some(good) => {
                self.store_good_copy(hash, good.clone()).await?;
                lacking.retain(|n| *n != self.inner.me);
                self.repair_in_background(&placed, hash, good, lacking);
                Ok(())
            }
            None => Err(DataError::Unavailable(if errors.is_empty() {
                "no other node has a copy".into()
            } else {
                errors.join("; ")
            })),
        }
    }

    /// This node's scrub.
    pub fn scrub(&self) -> &scrub::Scrub {
        &self.inner.scrub
    }

    /// Carries out a scrub command on every node of the layout (this one directly);
    /// answers each node's status or why it could not be reached.
    pub async fn scrub_all(
        &self,
        cmd: scrub::ScrubCommand,
    ) -> Vec<(u64, Result<scrub::ScrubStatus, String>)> {
        let placed = self.placed();
        let mut ids: Vec<u64> = placed.layout.nodes.iter().map(|n| n.id).collect();
        if !ids.contains(&self.inner.me) {
            ids.insert(0, self.inner.me);
        }
        let calls = ids.into_iter().map(|id| {
            let (this, placed) = (self.clone(), placed.clone());
            async move {
                if id == this.inner.me {
                    return (id, Ok(this.inner.scrub.command(cmd).await));
                }
                let res = this
                    .call(&placed, id, SVC_SCRUB, Bytes::from(vec![cmd as u8]))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|b| {
                        scrub::ScrubStatus::decode(&b)
                            .ok_or_else(|| format!("node {id:016x} sent a bad scrub status"))
                    });
                (id, res)
            }
        });
        futures::future::join_all(calls).await
    }

    /// The delay after which a read asks the next node as well, if any.
    fn hedge_delay(&self) -> Option<Duration> {
        match self.inner.settings.hedge {
            Hedge::Off => None,
            Hedge::After(d) => Some(d),
            Hedge::Auto => Some(
                lock(&self.inner.latencies)
                    .quantile(0.95)
                    .map_or(HEDGE_COLD, |d| d.clamp(HEDGE_MIN, HEDGE_MAX)),
            ),
        }
    }

    /// Reads the block from the nodes of `order`: the first is asked; the next is
    /// asked at once when one fails (an error, a timeout, a corrupt copy) and, if
    /// the one asked has not answered within the hedge delay, at the same time
    /// (at most `READ_FANOUT` in flight). The first copy that passes its check is
    /// returned; `None` when no node had a good one (`errors` says why).
    async fn read_remote(
        &self,
        placed: &Arc<Placed>,
        hash: BlockHash,
        order: &[u64],
        errors: &mut Vec<String>,
        lacking: &mut Vec<u64>,
    ) -> Result<Option<Bytes>, DataError> {
        let fetch = |node: u64, hedged: bool| {
            let (this, placed) = (self.clone(), placed.clone());
            async move {
                let started = Instant::now();
                let res = this
                    .call(
                        &placed,
                        node,
                        SVC_BLOCK_GET,
                        Bytes::copy_from_slice(&hash.0),
                    )
                    .await;
                (node, hedged, started.elapsed(), res)
            }
        };
        let hedge = self.hedge_delay();
        let mut running = FuturesUnordered::new();
        let mut next = 0;
        let mut timer = None;
        loop {
            if running.is_empty() {
                let Some(&node) = order.get(next) else {
                    return Ok(None);
                };
                running.push(fetch(node, false));
                next += 1;
                timer = hedge.map(|d| Box::pin(tokio::time::sleep(d)));
            }
            let can_hedge = next < order.len() && running.len() < READ_FANOUT;
            tokio::select! {
                Some((node, hedged, took, res)) = running.next() => {
                    match res {
                        Ok(got) => {
                            let (ok, got) = tokio::task::spawn_blocking(move || {
                                (BlockHash::of(&got) == hash, got)
                            })
                            .await
                            .map_err(task_failed)?;
                            if ok {
                                lock(&self.inner.latencies).record(took);
                                metrics::counter!("cairn_block_remote_reads_total").increment(1);
                                if hedged {
                                    metrics::counter!("cairn_block_hedge_wins_total").increment(1);
                                }
                                return Ok(Some(got));
                            }
                            tracing::error!(node = format!("{node:016x}"), block = %hash, "a peer sent a block that fails its check");
                            errors.push(format!("node {node:016x}: corrupt copy"));
                        }
                        Err(RpcError::Remote(m)) if m == NOT_FOUND => lacking.push(node),
                        Err(e @ RpcError::Remote(_)) => {
                            // It answered without a good copy (its own was bad).
                            lacking.push(node);
                            errors.push(format!("node {node:016x}: {e}"));
                        }
                        Err(e) => errors.push(format!("node {node:016x}: {e}")),
                    }
                    // Fail over to the next node at once.
                    if let Some(&node) = order.get(next) {
                        metrics::counter!("cairn_block_read_failovers_total").increment(1);
                        running.push(fetch(node, false));
                        next += 1;
                        timer = hedge.map(|d| Box::pin(tokio::time::sleep(d)));
                    }
                }
                _ = async {
                    match timer.as_mut() {
                        Some(t) => t.as_mut().await,
                        None => std::future::pending().await,
                    }
                }, if can_hedge => {
                    if let Some(&node) = order.get(next) {
                        metrics::counter!("cairn_block_hedged_reads_total").increment(1);
                        running.push(fetch(node, true));
                        next += 1;
                    }
                    timer = hedge.map(|d| Box::pin(tokio::time::sleep(d)));
                }
            }
        }
    }

    /// Which of `hashes` (at most [`MAX_HAS`]) `node` holds.
    pub async fn has(
        &self,
        placed: &Placed,
        node: u64,
        hashes: &[BlockHash],
    ) -> Result<Vec<bool>, DataError> {
        if node == self.inner.me {
            let local = self.inner.local.clone();
            let hashes = hashes.to_vec();
            return tokio::task::spawn_blocking(move || {
                hashes.iter().map(|h| local.contains(h)).collect()
            })
            .await
            .map_err(task_failed);
        }
        let mut body = Vec::with_capacity(hashes.len() * 32);
        for h in hashes {
            body.extend_from_slice(&h.0);
        }
        let answer = self
            .call(placed, node, SVC_BLOCK_HAS, Bytes::from(body))
            .await
            .map_err(|e| DataError::Unavailable(e.to_string()))?;
        if answer.len() != hashes.len() {
            return Err(DataError::Unavailable(format!(
                "node {node:016x} answered {} of {} block questions",
                answer.len(),
                hashes.len()
            )));
        }
        Ok(answer.iter().map(|b| *b == 1).collect())
    }

    /// This node's report (disk usage, the mover's progress).
    pub async fn report(&self) -> Report {
        let root = self.inner.local.root().to_path_buf();
        let (fs_bytes, used_bytes) = tokio::task::spawn_blocking(move || {
            rustix::fs::statvfs(&root)
                .map(|s| {
                    (
                        s.f_blocks.saturating_mul(s.f_frsize),
                        s.f_blocks
                            .saturating_sub(s.f_bfree)
                            .saturating_mul(s.f_frsize),
                    )
                })
                .unwrap_or((0, 0))
        })
        .await
        .unwrap_or((0, 0));
        Report {
            fs_bytes,
            used_bytes,
            mover: lock(&self.inner.progress).clone(),
        }
    }

    /// The report of node `id` (this one, or another over RPC).
    pub async fn report_of(&self, id: u64) -> Result<Report, DataError> {
        if id == self.inner.me {
            return Ok(self.report().await);
        }
        let placed = self.placed();
        let answer = self
            .call(&placed, id, SVC_REPORT, Bytes::new())
            .await
            .map_err(|e| DataError::Unavailable(e.to_string()))?;
        Report::decode(&answer)
            .ok_or_else(|| DataError::Unavailable(format!("node {id:016x} sent a bad report")))
    }

    /// Keeps a block received from a peer pinned for a while (see
    /// [`DataSettings::recent_pin`]).
    fn pin_recent(&self, pin: PinGuard) {
        let mut recent = lock(&self.inner.recent);
        drop_expired(&mut recent, self.inner.settings.recent_pin);
        recent.push_back((Instant::now(), pin));
    }

    /// Serves one block RPC from a peer.
    pub async fn handle(&self, service: u8, body: Bytes) -> Result<Bytes, String> {
        match service {
            SVC_BLOCK_PUT => {
                let _permit = self
                    .inner
                    .receiving
                    .acquire()
                    .await
                    .map_err(|_| "shutting down".to_string())?;
                let local = self.inner.local.clone();
                let (hash, pin) = tokio::task::spawn_blocking(move || {
                    let hash = BlockHash::of(&body);
                    let mut pin = local.pin();
                    pin.add(hash);
                    local.put(&hash, &body).map(|()| (hash, pin))
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| {
                    tracing::error!(error = %e, "storing a block for a peer failed");
                    e.to_string()
                })?;
                self.pin_recent(pin);
                if !self.placed().nodes(&hash).contains(&self.inner.me) {
                    self.inner.misplaced.store(true, Ordering::Relaxed);
                }
                Ok(Bytes::copy_from_slice(&hash.0))
            }
            SVC_BLOCK_GET => {
                let hash = <[u8; 32]>::try_from(&body[..])
                    .map(BlockHash)
                    .map_err(|_| "a block address is 32 bytes".to_string())?;
                let local = self.inner.local.clone();
                match tokio::task::spawn_blocking(move || local.get(&hash))
                    .await
                    .map_err(|e| e.to_string())?
                {
                    Ok(data) => Ok(Bytes::from(data)),
                    Err(BlockError::NotFound(_)) => Err(NOT_FOUND.into()),
                    Err(e) => {
                        // Quarantined at once, so that the good copy the reader
                        // sends back (read repair) can take its place.
                        tracing::error!(error = %e, "a block asked for by a peer failed its check; it is quarantined");
                        let local = self.inner.local.clone();
                        let _ = tokio::task::spawn_blocking(move || local.quarantine(&hash)).await;
                        Err(e.to_string())
                    }
                }
            }
            SVC_BLOCK_HAS => {
                if !body.len().is_multiple_of(32) || body.len() / 32 > MAX_HAS {
                    return Err(format!(
                        "a block question is up to {MAX_HAS} addresses of 32 bytes"
                    ));
                }
                let local = self.inner.local.clone();
                tokio::task::spawn_blocking(move || {
                    let answer: Vec<u8> = body
                        .chunks_exact(32)
                        .map(|c| {
                            let mut h = [0u8; 32];
                            h.copy_from_slice(c);
                            u8::from(local.contains(&BlockHash(h)))
                        })
                        .collect();
                    Bytes::from(answer)
                })
                .await
                .map_err(|e| e.to_string())
            }
            SVC_REPORT => Ok(self.report().await.encode()),
            SVC_PING => Ok(Bytes::new()),
            SVC_SCRUB => {
                let cmd = body
                    .first()
                    .and_then(|b| scrub::ScrubCommand::from_byte(*b))
                    .ok_or_else(|| "a scrub command is one byte: 0, 1 or 2".to_string())?;
                Ok(self.inner.scrub.command(cmd).await.encode())
            }
            SVC_SHARD_PUT | SVC_SHARD_GET | SVC_SHARD_HAS => self.handle_shard(service, body).await,
            _ => Err(format!("unknown block service {service}")),
        }
    }
}

/// Recomputes the placement whenever the layout changes, while the block layer lives.
/// Drops the pins of received blocks that are older than `keep` (and the oldest
/// beyond `MAX_RECENT_PINS`).
fn drop_expired(recent: &mut VecDeque<(Instant, PinGuard)>, keep: Duration) {
    while recent
        .front()
        .is_some_and(|(t, _)| t.elapsed() > keep || recent.len() >= MAX_RECENT_PINS)
    {
        recent.pop_front();
    }
}

/// Expires received blocks' pins on time even when no new block arrives, so that
/// garbage collection is not held off by a write long finished.
async fn expire_recent_pins(inner: Weak<Inner>) {
    loop {
        let every = match inner.upgrade() {
            Some(i) => {
                let keep = i.settings.recent_pin;
                drop_expired(&mut lock(&i.recent), keep);
                (keep / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
            }
            None => return,
        };
        tokio::time::sleep(every).await;
    }
}

async fn follow_layout(inner: Weak<Inner>, mut watch: tokio::sync::watch::Receiver<Arc<Layout>>) {
    while watch.changed().await.is_ok() {
        let layout = watch.borrow_and_update().clone();
        let Some(strong) = inner.upgrade() else {
            return;
        };
        drop(strong);
        let version = layout.version;
        let placed = match tokio::task::spawn_blocking(move || Placed::new(layout)).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "computing the placement failed");
                continue;
            }
        };
        let Some(strong) = inner.upgrade() else {
            return;
        };
        Blocks { inner: strong }.set_placed(placed);
        tracing::info!(version, "layout changed; placement updated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hedge_settings_parse_or_name_the_problem() {
        assert_eq!("auto".parse::<Hedge>(), Ok(Hedge::Auto));
        assert_eq!("off".parse::<Hedge>(), Ok(Hedge::Off));
        assert_eq!(
            "20ms".parse::<Hedge>(),
            Ok(Hedge::After(Duration::from_millis(20)))
        );
        assert_eq!(
            "1s".parse::<Hedge>(),
            Ok(Hedge::After(Duration::from_secs(1)))
        );
        for bad in ["", "soon", "5m", "-1ms", "ms"] {
            let e = bad.parse::<Hedge>().unwrap_err();
            assert!(e.contains("auto, off or a duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_hedge_delay_follows_the_latest_reads() {
        let mut l = Latencies::default();
        assert_eq!(l.quantile(0.95), None);
        for ms in 1..=100u64 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.quantile(0.95), Some(Duration::from_millis(95)));
        // Only the latest LATENCY_WINDOW count: a fast network after a slow one.
        for _ in 0..LATENCY_WINDOW {
            l.record(Duration::from_millis(3));
        }
        assert_eq!(l.quantile(0.95), Some(Duration::from_millis(3)));
        assert_eq!(l.samples.len(), LATENCY_WINDOW);
    }
}
