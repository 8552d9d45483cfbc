//! Erasure-coded blocks: a block of an `EC:k+m` class is cut into `k` data shards
//! and `m` parity shards (Reed-Solomon, the reed-solomon-simd crate), each stored
//! as a shard file ([`cairn_blocks::BlockStore::put_shard`]) on its own node.
//!
//! Shard `i` of a block belongs on the `i`-th of the block's shard nodes
//! ([`Placed::shard_nodes`]: its preference order taken one zone at a time, so
//! that the shards spread over as many zones as there are). A write sends every
//! shard at once, replaces a node that fails with the next node in the order that
//! holds no shard of the block yet, and is acknowledged once `k + m - m/2` shards
//! are fsynced; the rest finish in the background. A read asks for the data shards
//! first (they need no decoding), asks for the next shard at once when one fails
//! and also when one is slower than the hedge delay, looks for shards on the other
//! nodes when their own nodes lack them, rebuilds the block from any `k`, checks
//! it against its BLAKE3, and writes back the shards it found missing or bad.

use std::collections::HashSet;
use std::ops::DerefMut;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use cairn_blocks::BlockError;
use cairn_net::RpcError;
use cairn_types::{BlockHash, ShardId};

use crate::{
    Blocks, DataError, NOT_FOUND, Placed, SVC_SHARD_GET, SVC_SHARD_HAS, SVC_SHARD_PUT, lock,
    task_failed,
};

/// A shard's name on the wire: block address, k, m, index.
pub(crate) const SHARD_ID_LEN: usize = 35;

pub(crate) fn id_bytes(id: &ShardId) -> [u8; SHARD_ID_LEN] {
    let mut out = [0u8; SHARD_ID_LEN];
    out[..32].copy_from_slice(&id.block.0);
    out[32] = id.data;
    out[33] = id.parity;
    out[34] = id.index;
    out
}

pub(crate) fn id_from(b: &[u8]) -> Option<ShardId> {
    if b.len() != SHARD_ID_LEN {
        return None;
    }
    let mut h = [0u8; 32];
    h.copy_from_slice(&b[..32]);
    ShardId::parse(BlockHash(h), &format!("{}+{}.{}", b[32], b[33], b[34]))
}

/// Shard `i` of the block `hash` cut into `k` + `m`.
fn shard_id(hash: BlockHash, k: usize, m: usize, i: usize) -> ShardId {
    ShardId {
        block: hash,
        data: k as u8,
        parity: m as u8,
        index: i as u8,
    }
}

/// Bytes in each shard of a block of `len` bytes cut into `k`: even (the codec's
/// unit), at least 2.
pub fn shard_len(len: usize, k: usize) -> usize {
    let l = len.div_ceil(k.max(1)).max(2);
    l + (l & 1)
}

/// Cuts `block` into `k` data shards (zero-padded) and computes `m` parity shards.
pub fn split(block: &[u8], k: usize, m: usize) -> Result<Vec<Vec<u8>>, DataError> {
    let n = shard_len(block.len(), k);
    let mut shards: Vec<Vec<u8>> = (0..k)
        .map(|i| {
            let from = (i * n).min(block.len());
            let to = ((i + 1) * n).min(block.len());
            let mut s = Vec::with_capacity(n);
            s.extend_from_slice(&block[from..to]);
            s.resize(n, 0);
            s
        })
        .collect();
    let parity = reed_solomon_simd::encode(k, m, &shards)
        .map_err(|e| DataError::Unavailable(format!("erasure coding failed: {e}")))?;
    shards.extend(parity);
    Ok(shards)
}

/// The block of `len` bytes from any `k` of its `k + m` shards (`None` for those
/// missing). Its BLAKE3 is the caller's to check.
pub fn join(
    len: usize,
    k: usize,
    m: usize,
    shards: &[Option<Bytes>],
) -> Result<Vec<u8>, DataError> {
    let n = shard_len(len, k);
    if shards.len() != k + m || shards.iter().flatten().any(|s| s.len() != n) {
        return Err(DataError::Unavailable(format!(
            "shards of the wrong count or size for a block of {len} bytes in EC:{k}+{m}"
        )));
    }
    let have = shards.iter().flatten().count();
    if have < k {
        return Err(DataError::Unavailable(format!(
            "{have} of the {k} shards needed could be read"
        )));
    }
    let restored = if shards[..k].iter().all(Option::is_some) {
        Default::default()
    } else {
        let original = shards[..k]
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)));
        let recovery = shards[k..]
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)));
        reed_solomon_simd::decode(k, m, original, recovery)
            .map_err(|e| DataError::Unavailable(format!("erasure decoding failed: {e}")))?
    };
    let mut out = Vec::with_capacity(k * n);
    for (i, s) in shards[..k].iter().enumerate() {
        match s {
            Some(s) => out.extend_from_slice(s),
            None => out.extend_from_slice(restored.get(&i).ok_or_else(|| {
                DataError::Unavailable(format!("erasure decoding did not restore shard {i}"))
            })?),
        }
    }
    out.truncate(len);
    Ok(out)
}

/// Shards fsynced before a write of `k + m` is acknowledged: all but half the
/// parity (so an acknowledged block survives the loss of `m/2` more shards at once).
pub fn shard_quorum(k: usize, m: usize) -> usize {
    k + m - m / 2
}

impl Placed {
    /// The `n` nodes a block's shards go to, shard `i` to the `i`-th: the
    /// preference order taken one zone at a time (the first node of each zone not
    /// yet used in this round, zones in the order they first appear), so that the
    /// shards spread over every zone. With fewer nodes than shards (a layout
    /// shrunk below the class's width) the list starts over: a node holds two
    /// shards of a block until nodes are added. Empty when no node takes data.
    pub fn shard_nodes(&self, hash: &BlockHash, n: usize) -> Vec<u64> {
        let order = self.preference(hash);
        let zone = |id: u64| {
            self.layout
                .node(id)
                .map(|x| x.zone.as_str())
                .unwrap_or_default()
        };
        let mut out: Vec<u64> = Vec::with_capacity(n);
        while out.len() < n && out.len() < order.len() {
            let mut used_zones: Vec<&str> = Vec::new();
            for &id in &order {
                if out.len() >= n {
                    break;
                }
                if out.contains(&id) || used_zones.contains(&zone(id)) {
                    continue;
                }
                used_zones.push(zone(id));
                out.push(id);
            }
        }
        let distinct = out.len();
        while out.len() < n && distinct > 0 {
            out.push(out[out.len() - distinct]);
        }
        out
    }
}

impl Blocks {
    /// Stores one shard on `node`.
    pub(crate) async fn put_shard_to(
        &self,
        placed: &Placed,
        node: u64,
        id: ShardId,
        block_len: u64,
        data: Bytes,
        sum: [u8; 32],
    ) -> Result<(), DataError> {
        if node == self.inner.me {
            let local = self.inner.local.clone();
            return tokio::task::spawn_blocking(move || local.put_shard(&id, block_len, &data))
                .await
                .map_err(task_failed)?
                .map_err(DataError::Block);
        }
        let mut body = Vec::with_capacity(SHARD_ID_LEN + 8 + data.len());
        body.extend_from_slice(&id_bytes(&id));
        body.extend_from_slice(&block_len.to_le_bytes());
        body.extend_from_slice(&data);
        let answer = self
            .call(placed, node, SVC_SHARD_PUT, Bytes::from(body))
            .await
            .map_err(|e| DataError::Unavailable(e.to_string()))?;
        if answer[..] != sum {
            return Err(DataError::Unavailable(format!(
                "node {node:016x} stored other bytes than the shard sent"
            )));
        }
        Ok(())
    }

    /// Stores a block (`hash` is its BLAKE3) as `k + m` shards on distinct nodes:
    /// returns once [`shard_quorum`] of them are fsynced; the others follow in the
    /// background. The caller pins `hash` on this node until the metadata naming it
    /// commits.
    pub async fn put_coded(
        &self,
        hash: BlockHash,
        data: Bytes,
        k: u8,
        m: u8,
    ) -> Result<(), DataError> {
        let (k, m) = (usize::from(k), usize::from(m));
        let placed = self.placed();
        let targets = placed.shard_nodes(&hash, k + m);
        if targets.len() < k + m {
            return Err(DataError::Unavailable(
                "no node of the layout takes data".into(),
            ));
        }
        let data_len = data.len();
        let shards = tokio::task::spawn_blocking(move || -> Result<_, DataError> {
            let shards = split(&data, k, m)?;
            Ok(shards
                .into_iter()
                .map(|s| {
                    let sum = BlockHash::of(&s).0;
                    (Bytes::from(s), sum)
                })
                .collect::<Vec<_>>())
        })
        .await
        .map_err(task_failed)??;
        let block_len = data_len as u64;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            this.write_shards(placed, hash, block_len, k, m, targets, shards, tx)
                .await
        });
        rx.await
            .unwrap_or_else(|_| Err(DataError::Unavailable("block write abandoned".into())))
    }

    /// Writes shard `i` to `targets[i]` (a node held down is replaced at once),
    /// replacing each node that fails with the next free one in the block's
    /// preference order; answers `done` once the quorum is reached or cannot be.
    #[allow(clippy::too_many_arguments)]
    async fn write_shards(
        &self,
        placed: Arc<Placed>,
        hash: BlockHash,
        block_len: u64,
        k: usize,
        m: usize,
        targets: Vec<u64>,
        shards: Vec<(Bytes, [u8; 32])>,
        done: tokio::sync::oneshot::Sender<Result<(), DataError>>,
    ) {
        let quorum = shard_quorum(k, m);
        let down = self.down_nodes();
        let mut spare: Vec<u64> = self.live_first(
            placed
                .preference(&hash)
                .into_iter()
                .filter(|n| !targets.contains(n))
                .collect(),
        );
        spare.reverse(); // popped from the end: the best first
        let mut others: Vec<u64> = targets.clone();
        others.sort_unstable();
        others.dedup();
        if others.len() < targets.len() {
            // Fewer nodes than shards (the list started over): a failed shard may
            // go to another shard node. Otherwise never: two shards of a block on
            // one node because another is down would let one more loss take it.
            // Those holding the fewest shards of the block first.
            let held = |n: &u64| targets.iter().filter(|t| *t == n).count();
            others.sort_by_key(|n| (down.contains(n), held(n)));
            spare = others;
            spare.reverse();
        }
        let mut running = FuturesUnordered::new();
        let start = |i: usize, node: u64| {
            let (this, placed) = (self.clone(), placed.clone());
            let id = shard_id(hash, k, m, i);
            let (data, sum) = shards[i].clone();
            async move {
                let res = this
                    .put_shard_to(&placed, node, id, block_len, data, sum)
                    .await;
                (i, node, res)
            }
        };
        for (i, &node) in targets.iter().enumerate() {
            let node = match down.contains(&node) && spare.last().is_some_and(|s| !down.contains(s))
            {
                true => spare.pop().unwrap_or(node),
                false => node,
            };
            running.push(start(i, node));
        }
        let mut done = Some(done);
        let mut written = 0;
        let mut errors = Vec::new();
        while let Some((i, node, res)) = running.next().await {
            match res {
                Ok(()) => {
                    written += 1;
                    if targets.get(i) != Some(&node) {
                        metrics::counter!("cairn_block_fallback_writes_total").increment(1);
                        if node == self.inner.me {
                            self.inner
                                .misplaced
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(node = format!("{node:016x}"), block = %hash, shard = i, error = %e, "writing a shard failed; trying the next node");
                    errors.push(format!("node {node:016x}: {e}"));
                    if let Some(next) = spare.pop() {
                        running.push(start(i, next));
                    }
                }
            }
            if written >= quorum
                && let Some(d) = done.take()
            {
                let _ = d.send(Ok(()));
            }
        }
        if written < k + m {
            metrics::counter!("cairn_block_copies_missing_total")
                .increment((k + m - written) as u64);
        }
        if let Some(d) = done.take() {
            let _ = d.send(Err(DataError::Unavailable(format!(
                "{written} of {quorum} shards needed could be written: {}",
                errors.join("; ")
            ))));
        }
    }

    /// Reads one shard from `node` (this one from disk): the block's length and
    /// the shard's bytes.
    pub(crate) async fn get_shard_from(
        &self,
        placed: &Placed,
        node: u64,
        id: ShardId,
    ) -> Result<(u64, Bytes), RpcError> {
        if node == self.inner.me {
            let local = self.inner.local.clone();
            let res = tokio::task::spawn_blocking(move || {
                let mut buf = Vec::new();
                local.get_shard_into(&id, &mut buf).map(|n| (n, buf))
            })
            .await
            .map_err(|e| RpcError::Remote(e.to_string()))?;
            return match res {
                Ok((n, b)) => Ok((n, Bytes::from(b))),
                Err(BlockError::NotFound(_)) => Err(RpcError::Remote(NOT_FOUND.into())),
                Err(e) => {
                    tracing::error!(error = %e, "a local shard failed its check; it is quarantined");
                    let local = self.inner.local.clone();
                    let _ = tokio::task::spawn_blocking(move || local.quarantine_shard(&id)).await;
                    Err(RpcError::Remote(e.to_string()))
                }
            };
        }
        let answer = self
            .call(
                placed,
                node,
                SVC_SHARD_GET,
                Bytes::copy_from_slice(&id_bytes(&id)),
            )
            .await?;
        if answer.len() < 8 {
            return Err(RpcError::Remote(format!(
                "node {node:016x} sent a shard without its header"
            )));
        }
        let n = u64::from_le_bytes(answer[..8].try_into().unwrap_or([0; 8]));
        Ok((n, answer.slice(8..)))
    }

    /// Which shards of the block (EC:k+m) each node other than `skip` holds.
    async fn find_shards(
        &self,
        placed: &Arc<Placed>,
        hash: BlockHash,
        k: usize,
        m: usize,
        skip: &HashSet<(usize, u64)>,
    ) -> Vec<(usize, u64)> {
        let ids: Vec<ShardId> = (0..k + m).map(|i| shard_id(hash, k, m, i)).collect();
        let nodes: Vec<u64> = placed.read_order(&hash);
        let asks = nodes.into_iter().map(|node| {
            let (this, placed, ids) = (self.clone(), placed.clone(), ids.clone());
            async move { (node, this.has_shards(&placed, node, &ids).await) }
        });
        let mut out = Vec::new();
        for (node, res) in futures::future::join_all(asks).await {
            if let Ok(held) = res {
                for (i, h) in held.into_iter().enumerate() {
                    if h && !skip.contains(&(i, node)) {
                        out.push((i, node));
                    }
                }
            }
        }
        out
    }

    /// Which of `ids` `node` holds.
    pub async fn has_shards(
        &self,
        placed: &Placed,
        node: u64,
        ids: &[ShardId],
    ) -> Result<Vec<bool>, DataError> {
        if node == self.inner.me {
            let local = self.inner.local.clone();
            let ids = ids.to_vec();
            return tokio::task::spawn_blocking(move || {
                ids.iter().map(|id| local.has_shard(id)).collect()
            })
            .await
            .map_err(task_failed);
        }
        let mut body = Vec::with_capacity(ids.len() * SHARD_ID_LEN);
        for id in ids {
            body.extend_from_slice(&id_bytes(id));
        }
        let answer = self
            .call(placed, node, SVC_SHARD_HAS, Bytes::from(body))
            .await
            .map_err(|e| DataError::Unavailable(e.to_string()))?;
        if answer.len() != ids.len() {
            return Err(DataError::Unavailable(format!(
                "node {node:016x} answered {} of {} shard questions",
                answer.len(),
                ids.len()
            )));
        }
        Ok(answer.iter().map(|b| *b == 1).collect())
    }

    /// Reads an erasure-coded block of `len` bytes into `buf` (replacing its
    /// contents) from any `k` of its shards and checks it against its address.
    pub async fn read_coded<B>(
        &self,
        hash: BlockHash,
        len: u32,
        k: u8,
        m: u8,
        mut buf: B,
    ) -> Result<B, DataError>
    where
        B: DerefMut<Target = Vec<u8>> + Send + 'static,
    {
        let (k, m) = (usize::from(k), usize::from(m));
        let placed = self.placed();
        let targets = placed.shard_nodes(&hash, k + m);
        let down = self.down_nodes();
        // Where each shard is looked for first: its own node, data shards first,
        // shards whose node is held down last.
        let mut queue: Vec<(usize, u64)> = targets.iter().copied().enumerate().collect();
        queue.sort_by_key(|&(i, n)| (down.contains(&n), i >= k, i));
        let mut queue: std::collections::VecDeque<(usize, u64)> = queue.into();
        let mut tried: HashSet<(usize, u64)> = HashSet::new();
        let mut searched = false;
        let mut got: Vec<Option<Bytes>> = vec![None; k + m];
        let mut have = 0;
        // Shards whose own node lacked them or had them bad: written back after.
        let mut lacking: Vec<usize> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        let fetch = |i: usize, node: u64| {
            let (this, placed) = (self.clone(), placed.clone());
            let id = shard_id(hash, k, m, i);
            async move {
                let started = Instant::now();
                let res = this.get_shard_from(&placed, node, id).await;
                (i, node, started.elapsed(), res)
            }
        };
        let hedge = self.hedge_delay();
        let mut running = FuturesUnordered::new();
        let mut timer = None;
        loop {
            // Enough asked to make up k (one per shard still wanted).
            while have + running.len() < k {
                let next = loop {
                    match queue.pop_front() {
                        Some((i, n)) if got[i].is_some() || tried.contains(&(i, n)) => continue,
                        other => break other,
                    }
                };
                let Some((i, node)) = next else {
                    if !searched {
                        searched = true;
                        let found = self.find_shards(&placed, hash, k, m, &tried).await;
                        queue.extend(found.into_iter().filter(|&(i, _)| got[i].is_none()));
                        if !queue.is_empty() {
                            continue;
                        }
                    }
                    break;
                };
                tried.insert((i, node));
                running.push(fetch(i, node));
                timer = hedge.map(|d| Box::pin(tokio::time::sleep(d)));
            }
            if running.is_empty() {
                break;
            }
            let can_hedge = !queue.is_empty();
            tokio::select! {
                Some((i, node, took, res)) = running.next() => {
                    let own = targets.get(i) == Some(&node);
                    match res {
                        Ok((n, shard)) if got[i].is_none() && n == u64::from(len) => {
                            if node != self.inner.me {
                                lock(&self.inner.latencies).record(took);
                            }
                            got[i] = Some(shard);
                            have += 1;
                        }
                        Ok((n, _)) if n != u64::from(len) => {
                            errors.push(format!("node {node:016x} shard {i}: for a block of {n} bytes, not {len}"));
                        }
                        Ok(_) => {}
                        Err(RpcError::Remote(e)) => {
                            if own {
                                lacking.push(i);
                            }
                            if e != NOT_FOUND {
                                errors.push(format!("node {node:016x} shard {i}: {e}"));
                            }
                        }
                        Err(e) => errors.push(format!("node {node:016x} shard {i}: {e}")),
                    }
                    if have >= k {
                        break;
                    }
                }
                _ = async {
                    match timer.as_mut() {
                        Some(t) => t.as_mut().await,
                        None => std::future::pending().await,
                    }
                }, if can_hedge => {
                    if let Some((i, node)) = queue.pop_front()
                        && got[i].is_none()
                        && tried.insert((i, node))
                    {
                        metrics::counter!("cairn_block_hedged_reads_total").increment(1);
                        running.push(fetch(i, node));
                    }
                    timer = hedge.map(|d| Box::pin(tokio::time::sleep(d)));
                }
            }
        }
        if have < k {
            return Err(DataError::Unavailable(format!(
                "{have} of the {k} shards needed of block {hash} could be read{}{}",
                if errors.is_empty() { "" } else { ": " },
                errors.join("; ")
            )));
        }
        let n = len as usize;
        let (res, back) = tokio::task::spawn_blocking(move || {
            let res = join(n, k, m, &got).and_then(|block| {
                if BlockHash::of(&block) != hash {
                    return Err(DataError::Unavailable(format!(
                        "block {hash} rebuilt from its shards fails its check"
                    )));
                }
                Ok(block)
            });
            if let Ok(block) = &res {
                buf.clear();
                buf.extend_from_slice(block);
            }
            (res.map(|_| ()), buf)
        })
        .await
        .map_err(task_failed)?;
        res?;
        if !lacking.is_empty() {
            self.rebuild_in_background(&placed, hash, k, m, Bytes::copy_from_slice(&back), lacking);
        }
        Ok(back)
    }

    /// Writes the shards `lacking` (found missing or bad on their own nodes) back
    /// to their nodes from the whole block, in the background (skipped when
    /// `READ_REPAIRS` are under way).
    fn rebuild_in_background(
        &self,
        placed: &Arc<Placed>,
        hash: BlockHash,
        k: usize,
        m: usize,
        block: Bytes,
        lacking: Vec<usize>,
    ) {
        let Ok(permit) = self.inner.repairs.clone().try_acquire_owned() else {
            metrics::counter!("cairn_read_repairs_skipped_total").increment(1);
            return;
        };
        let (this, placed) = (self.clone(), placed.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let targets = placed.shard_nodes(&hash, k + m);
            let block_len = block.len() as u64;
            let shards = match tokio::task::spawn_blocking(move || split(&block, k, m)).await {
                Ok(Ok(s)) => s,
                _ => return,
            };
            for i in lacking {
                let Some(&node) = targets.get(i) else {
                    continue;
                };
                let id = shard_id(hash, k, m, i);
                let data = Bytes::from(shards[i].clone());
                let sum = BlockHash::of(&data).0;
                if node == this.inner.me {
                    let local = this.inner.local.clone();
                    let _ = tokio::task::spawn_blocking(move || local.quarantine_shard(&id)).await;
                }
                match this
                    .put_shard_to(&placed, node, id, block_len, data, sum)
                    .await
                {
                    Ok(()) => {
                        metrics::counter!("cairn_read_repairs_total").increment(1);
                        tracing::info!(node = format!("{node:016x}"), block = %hash, shard = i, "read repair: a shard was rebuilt");
                    }
                    Err(e) => {
                        tracing::warn!(node = format!("{node:016x}"), block = %hash, shard = i, error = %e, "read repair of a shard failed");
                    }
                }
            }
        });
    }

    /// Moves this node's shard (found bad) to the quarantine and rebuilds it from
    /// the block's other shards. Fails when fewer than `k` good ones can be read.
    pub async fn replace_local_shard(&self, id: ShardId) -> Result<(), DataError> {
        let local = self.inner.local.clone();
        tokio::task::spawn_blocking(move || local.quarantine_shard(&id))
            .await
            .map_err(task_failed)?
            .map_err(DataError::Block)?;
        let (k, m) = (usize::from(id.data), usize::from(id.parity));
        let placed = self.placed();
        // The block's length, from any other shard's header.
        let mut len = None;
        for (i, node) in self
            .find_shards(&placed, id.block, k, m, &HashSet::new())
            .await
        {
            if i == usize::from(id.index) {
                continue;
            }
            let other = ShardId {
                index: i as u8,
                ..id
            };
            if let Ok((n, _)) = self.get_shard_from(&placed, node, other).await {
                len = Some(n);
                break;
            }
        }
        let len = len.ok_or_else(|| {
            DataError::Unavailable("no other shard of the block could be read".into())
        })?;
        let len32 = u32::try_from(len)
            .map_err(|_| DataError::Unavailable(format!("a block of {len} bytes")))?;
        let block = self
            .read_coded(id.block, len32, id.data, id.parity, Box::new(Vec::new()))
            .await?;
        let i = usize::from(id.index);
        let shard = tokio::task::spawn_blocking(move || split(&block, k, m).map(|s| s[i].clone()))
            .await
            .map_err(task_failed)??;
        let local = self.inner.local.clone();
        tokio::task::spawn_blocking(move || {
            let mut pin = local.pin();
            pin.add(id.block);
            local.put_shard(&id, len, &shard)
        })
        .await
        .map_err(task_failed)?
        .map_err(DataError::Block)
    }

    /// Serves the shard RPCs.
    pub(crate) async fn handle_shard(&self, service: u8, body: Bytes) -> Result<Bytes, String> {
        match service {
            SVC_SHARD_PUT => {
                let id = body
                    .get(..SHARD_ID_LEN)
                    .and_then(id_from)
                    .ok_or_else(|| "a shard write starts with a valid shard name".to_string())?;
                let _permit = self
                    .inner
                    .receiving
                    .acquire()
                    .await
                    .map_err(|_| "shutting down".to_string())?;
                if body.len() < SHARD_ID_LEN + 8 {
                    return Err("a shard write carries the block's length".into());
                }
                let block_len = u64::from_le_bytes(
                    body[SHARD_ID_LEN..SHARD_ID_LEN + 8]
                        .try_into()
                        .unwrap_or([0; 8]),
                );
                let local = self.inner.local.clone();
                let (sum, pin) = tokio::task::spawn_blocking(move || {
                    let data = &body[SHARD_ID_LEN + 8..];
                    let mut pin = local.pin();
                    pin.add(id.block);
                    local
                        .put_shard(&id, block_len, data)
                        .map(|()| (BlockHash::of(data).0, pin))
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| {
                    tracing::error!(error = %e, "storing a shard for a peer failed");
                    e.to_string()
                })?;
                self.pin_recent(pin);
                let n = usize::from(id.data) + usize::from(id.parity);
                let place = self.placed().shard_nodes(&id.block, n);
                if place.get(usize::from(id.index)) != Some(&self.inner.me) {
                    self.inner
                        .misplaced
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Bytes::copy_from_slice(&sum))
            }
            SVC_SHARD_GET => {
                let id = id_from(&body).ok_or_else(|| "not a valid shard name".to_string())?;
                let placed = self.placed();
                match self.get_shard_from(&placed, self.inner.me, id).await {
                    Ok((n, b)) => {
                        let mut out = Vec::with_capacity(8 + b.len());
                        out.extend_from_slice(&n.to_le_bytes());
                        out.extend_from_slice(&b);
                        Ok(Bytes::from(out))
                    }
                    Err(RpcError::Remote(e)) => Err(e),
                    Err(e) => Err(e.to_string()),
                }
            }
            SVC_SHARD_HAS => {
                if !body.len().is_multiple_of(SHARD_ID_LEN)
                    || body.len() / SHARD_ID_LEN > crate::MAX_HAS
                {
                    return Err(format!(
                        "a shard question is up to {} names of {SHARD_ID_LEN} bytes",
                        crate::MAX_HAS
                    ));
                }
                let ids: Vec<ShardId> = body
                    .chunks_exact(SHARD_ID_LEN)
                    .map(|c| id_from(c).ok_or_else(|| "not a valid shard name".to_string()))
                    .collect::<Result<_, _>>()?;
                let local = self.inner.local.clone();
                tokio::task::spawn_blocking(move || {
                    Bytes::from(
                        ids.iter()
                            .map(|id| u8::from(local.has_shard(id)))
                            .collect::<Vec<u8>>(),
                    )
                })
                .await
                .map_err(|e| e.to_string())
            }
            _ => Err(format!("unknown shard service {service}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_k_shards_give_the_block_back() {
        for len in [1usize, 2, 3, 5, 1000, 4097, 65_536 + 7] {
            let block: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let (k, m) = (3, 2);
            let shards: Vec<Bytes> = split(&block, k, m)
                .unwrap()
                .into_iter()
                .map(Bytes::from)
                .collect();
            assert_eq!(shards.len(), 5);
            assert!(shards.iter().all(|s| s.len() == shard_len(len, k)));
            assert_eq!(shard_len(len, k) % 2, 0);
            // Every choice of two shards lost.
            for a in 0..5 {
                for b in a..5 {
                    let mut have: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
                    have[a] = None;
                    have[b] = None;
                    assert_eq!(
                        join(len, k, m, &have).unwrap(),
                        block,
                        "len {len} lost {a},{b}"
                    );
                }
            }
            // Three lost: refused, never wrong bytes.
            let mut have: Vec<Option<Bytes>> = shards.iter().cloned().map(Some).collect();
            have[0] = None;
            have[2] = None;
            have[4] = None;
            assert!(join(len, k, m, &have).is_err());
        }
    }

    #[test]
    fn a_shard_of_the_wrong_size_is_refused() {
        let shards: Vec<Option<Bytes>> = split(b"hello world", 2, 1)
            .unwrap()
            .into_iter()
            .map(|s| Some(Bytes::from(s)))
            .collect();
        let mut bad = shards.clone();
        bad[1] = Some(Bytes::from_static(b"x"));
        assert!(join(11, 2, 1, &bad).is_err());
        assert!(join(11, 2, 1, &shards[..2]).is_err());
    }

    #[test]
    fn shard_names_cross_the_wire() {
        let id = ShardId {
            block: BlockHash::of(b"b"),
            data: 4,
            parity: 2,
            index: 5,
        };
        assert_eq!(id_from(&id_bytes(&id)), Some(id));
        let mut bad = id_bytes(&id);
        bad[34] = 6; // index past k + m
        assert_eq!(id_from(&bad), None);
        assert_eq!(id_from(&bad[..34]), None);
    }

    fn layout(zones: &[&str]) -> Arc<cairn_meta::Layout> {
        Arc::new(cairn_meta::Layout {
            version: 1,
            replication: 3,
            nodes: zones
                .iter()
                .enumerate()
                .map(|(i, z)| cairn_meta::LayoutNode {
                    id: 100 + i as u64,
                    zone: z.to_string(),
                    capacity: 1 << 30,
                    rpc: format!("127.0.0.1:{}", 7000 + i),
                    state: cairn_meta::NodeState::Active,
                })
                .collect(),
            ..Default::default()
        })
    }

    #[test]
    fn shards_spread_over_zones_and_start_over_on_too_few_nodes() {
        let placed = Placed::new(layout(&["a", "a", "a", "b", "b", "c"]));
        let zone = |id: u64| placed.layout.node(id).unwrap().zone.clone();
        for seed in 0..200u32 {
            let h = BlockHash::of(&seed.to_le_bytes());
            let nodes = placed.shard_nodes(&h, 5);
            let distinct: HashSet<u64> = nodes.iter().copied().collect();
            assert_eq!(distinct.len(), 5);
            // One per zone, then one per zone again: no zone holds three.
            let first: HashSet<String> = nodes[..3].iter().map(|n| zone(*n)).collect();
            assert_eq!(first.len(), 3, "{nodes:?}");
            let in_a = nodes.iter().filter(|n| zone(**n) == "a").count();
            assert!(in_a <= 2, "{nodes:?}");
        }
        let small = Placed::new(layout(&["a", "b", "c"]));
        let h = BlockHash::of(b"x");
        let nodes = small.shard_nodes(&h, 5);
        assert_eq!(nodes.len(), 5);
        assert_eq!((nodes[3], nodes[4]), (nodes[0], nodes[1]));
        assert!(Placed::new(layout(&[])).shard_nodes(&h, 5).is_empty());
    }

    #[test]
    fn quorum_leaves_half_the_parity() {
        assert_eq!(shard_quorum(3, 2), 4);
        assert_eq!(shard_quorum(4, 2), 5);
        assert_eq!(shard_quorum(2, 1), 3);
        assert_eq!(shard_quorum(8, 4), 10);
    }
}
