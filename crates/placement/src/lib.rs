//! Placement: which nodes hold the copies (or shards) of a block.
//!
//! A pure function of the nodes of a layout (id, zone, capacity), the number of
//! copies wanted and the block's hash. No I/O, no clock, no randomness: every node
//! that knows the same layout computes the same answer, so any node can find a
//! block without asking anyone.
//!
//! # How
//!
//! Rendezvous (highest-random-weight) hashing: each node draws, from a hash of its
//! id and the block's hash, an exponential "arrival time" `-ln(u) / w`; nodes are
//! ranked by it, earliest first. A node's chance of coming first is `w / Σw`, and
//! a node added or removed changes only the blocks it wins or held: nothing else
//! moves.
//!
//! Copies go to distinct zones while there are zones left: walking the ranking, a
//! node is taken only if its zone holds no copy yet; once every zone holds one,
//! the remaining copies go to the next nodes in the ranking. The nodes after the
//! chosen ones, still in ranking order, are the fallbacks a writer uses when chosen
//! nodes are down ([`Placement::preference`]).
//!
//! # Weights
//!
//! With one copy, weighting by capacity gives each node exactly its capacity's
//! share. With several copies it does not: a node cannot hold two copies of one
//! block, so drawing without replacement flattens the shares (a node with twice the
//! capacity of its six peers would hold ~14 % less than its due with three copies),
//! and zones constrain it further. [`Placement::new`] therefore computes, once per
//! layout, the share each node *should* hold ([`Placement::target`]: proportional
//! to capacity, at most one copy per block per node, one per zone while the zones
//! allow) and adjusts the weights until a fixed sample of block hashes places
//! that share on every node. The adjustment is deterministic (fixed sample,
//! `libm`'s portable `log`/`pow`, no platform maths), so every node, whatever its
//! CPU, derives the same weights.
//!
//! The hash function and the sample are part of the on-disk contract: changing
//! them moves data. [`ALGORITHM_VERSION`] names this one.

use cairn_types::BlockHash;
use serde::{Deserialize, Serialize};

/// Node ids are random 64-bit numbers chosen once by each node.
pub type NodeId = u64;

/// Version of the placement function. A layout records the version it was made
/// for; a binary that does not know it must not place blocks with it.
pub const ALGORITHM_VERSION: u32 = 1;

/// Number of sample block hashes over which the weights are fitted, per layout.
/// 32 768 samples bound the sampling error of a share of 1/3 to ~0.3 % (one
/// standard deviation); fewer are used for large layouts so that fitting stays
/// within about a second (it runs once per layout change).
const MAX_SAMPLES: usize = 32_768;
const MIN_SAMPLES: usize = 4_096;
/// Sample score computations per fitting round for large layouts.
const SAMPLE_BUDGET: usize = 1 << 21;
/// Fitting stops when every node's share is this close to its target (relative),
/// or after `MAX_ROUNDS`.
const TOLERANCE: f64 = 0.004;
const MAX_ROUNDS: usize = 40;
/// A node's fitted weight stays within this factor of its capacity weight.
const MAX_WEIGHT_RATIO: f64 = 1e4;

/// One node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub id: NodeId,
    pub zone: String,
    /// Bytes this node offers. 0: the node holds no data (a gateway, or draining).
    pub capacity: u64,
}

#[derive(Clone, Debug)]
struct Slot {
    id: NodeId,
    zone: usize,
    seed: u64,
    weight: f64,
    target: f64,
}

/// The placement of one layout: build it once per layout version
/// ([`Placement::new`]), then ask it for any block.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Nodes with capacity, sorted by id.
    slots: Vec<Slot>,
    zones: usize,
    copies: usize,
}

impl Placement {
    /// Placement of `copies` copies of each block over `nodes`. Nodes with zero
    /// capacity hold nothing; `copies` is capped by the number of nodes that can
    /// hold data (see [`Placement::copies`]).
    pub fn new(nodes: &[NodeSpec], copies: usize) -> Placement {
        let mut eligible: Vec<&NodeSpec> = nodes.iter().filter(|n| n.capacity > 0).collect();
        eligible.sort_by_key(|n| n.id);
        eligible.dedup_by_key(|n| n.id);
        let mut zone_names: Vec<&str> = eligible.iter().map(|n| n.zone.as_str()).collect();
        zone_names.sort_unstable();
        zone_names.dedup();
        let copies = copies.min(eligible.len());
        let total: f64 = eligible.iter().map(|n| n.capacity as f64).sum();
        let slots: Vec<Slot> = eligible
            .iter()
            .map(|n| Slot {
                id: n.id,
                zone: zone_names.binary_search(&n.zone.as_str()).unwrap_or(0),
                seed: mix(n.id ^ 0x6361_6972_6e2d_706c), // "cairn-pl"
                weight: n.capacity as f64 / total * eligible.len() as f64,
                target: 0.0,
            })
            .collect();
        let mut placement = Placement {
            slots,
            zones: zone_names.len(),
            copies,
        };
        if placement.copies > 0 {
            placement.set_targets();
            placement.fit();
        }
        placement
    }

    /// Copies per block: the number asked for, capped by the nodes that hold data.
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// The nodes that hold `block`, in placement order (the first is the primary;
    /// for erasure coding, shard `i` goes to the `i`-th).
    pub fn nodes(&self, block: &BlockHash) -> Vec<NodeId> {
        let mut order = self.preference(block);
        order.truncate(self.copies);
        order
    }

    /// Every node that can hold data, in the order a writer tries them for
    /// `block`: the placement ([`Placement::nodes`]) first, then fallbacks.
    pub fn preference(&self, block: &BlockHash) -> Vec<NodeId> {
        let (b0, b1) = block_words(block);
        let times: Vec<f64> = self
            .slots
            .iter()
            .map(|s| arrival(s.seed, b0, b1) / s.weight)
            .collect();
        let mut picked = Vec::with_capacity(self.slots.len());
        self.pick(&times, &mut picked);
        let mut rest: Vec<usize> = (0..self.slots.len())
            .filter(|i| !picked.contains(i))
            .collect();
        rest.sort_by(|&a, &b| times[a].total_cmp(&times[b]).then(a.cmp(&b)));
        picked.extend(rest);
        picked.into_iter().map(|i| self.slots[i].id).collect()
    }

    /// The share of all copies `node` should hold: its expected number of copies
    /// per block divided by the copies per block. 0 for unknown nodes. The shares
    /// of all nodes add up to 1.
    pub fn share(&self, node: NodeId) -> f64 {
        match self.slots.binary_search_by_key(&node, |s| s.id) {
            Ok(i) if self.copies > 0 => self.slots[i].target / self.copies as f64,
            _ => 0.0,
        }
    }

    /// Expected copies per block on `node` (between 0 and 1).
    pub fn target(&self, node: NodeId) -> f64 {
        match self.slots.binary_search_by_key(&node, |s| s.id) {
            Ok(i) => self.slots[i].target,
            _ => 0.0,
        }
    }

    /// Chooses the nodes of one block from their arrival times (indexed like
    /// `slots`; earliest wins, ties to the lower index): the earliest node of each
    /// zone in turn while zones remain, then the earliest of the rest.
    fn pick(&self, times: &[f64], picked: &mut Vec<usize>) {
        picked.clear();
        let mut zone_used = [false; 64];
        let mut zone_used_big = Vec::new();
        let zone_used: &mut [bool] = if self.zones <= 64 {
            &mut zone_used[..self.zones]
        } else {
            zone_used_big.resize(self.zones, false);
            &mut zone_used_big
        };
        let zone_rounds = self.zones.min(self.copies);
        while picked.len() < self.copies {
            let by_zone = picked.len() < zone_rounds;
            let mut best: Option<usize> = None;
            for (i, &t) in times.iter().enumerate() {
                let free = if by_zone {
                    !zone_used[self.slots[i].zone]
                } else {
                    !picked.contains(&i)
                };
                if free && best.is_none_or(|b| t < times[b]) {
                    best = Some(i);
                }
            }
            let Some(i) = best else { break };
            zone_used[self.slots[i].zone] = true;
            picked.push(i);
        }
    }

    /// The copies per block each node should hold. Zones first: proportional to
    /// their capacity, at most one copy per block per zone while there are at
    /// least as many zones as copies; otherwise at least one per zone and at most
    /// one per node. Then, inside each zone, proportional to capacity, at most one
    /// per node.
    fn set_targets(&mut self) {
        let mut zone_cap = vec![0.0; self.zones];
        let mut zone_size = vec![0.0; self.zones];
        for s in &self.slots {
            zone_cap[s.zone] += s.weight;
            zone_size[s.zone] += 1.0;
        }
        let n = self.copies as f64;
        let zone_target = if self.zones >= self.copies {
            water_fill(n, &zone_cap, &vec![0.0; self.zones], &vec![1.0; self.zones])
        } else {
            water_fill(n, &zone_cap, &vec![1.0; self.zones], &zone_size)
        };
        for (z, &zone_total) in zone_target.iter().enumerate() {
            let members: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].zone == z)
                .collect();
            let caps: Vec<f64> = members.iter().map(|&i| self.slots[i].weight).collect();
            let t = water_fill(
                zone_total,
                &caps,
                &vec![0.0; caps.len()],
                &vec![1.0; caps.len()],
            );
            for (k, &i) in members.iter().enumerate() {
                self.slots[i].target = t[k];
            }
        }
    }

    /// Adjusts the weights until the sample places each node's target share,
    /// within what the sample can tell apart (half a standard deviation of a
    /// node's sampled share, or `TOLERANCE`, whichever is larger).
    fn fit(&mut self) {
        let nodes = self.slots.len();
        if nodes <= self.copies {
            return; // every node holds every block
        }
        let samples = (SAMPLE_BUDGET / nodes).clamp(MIN_SAMPLES, MAX_SAMPLES);
        // A node's arrival time for a block is its unit-rate draw over its weight:
        // the draws do not depend on the weights, so they are computed once.
        let mut draws = Vec::with_capacity(samples * nodes);
        for k in 0..samples as u64 {
            let b0 = mix(k.wrapping_mul(2).wrapping_add(0x9e37_79b9_7f4a_7c15));
            let b1 = mix(k.wrapping_mul(2).wrapping_add(0x7f4a_7c15_9e37_79b9));
            draws.extend(self.slots.iter().map(|s| arrival(s.seed, b0, b1)));
        }
        let base: Vec<f64> = self.slots.iter().map(|s| s.weight).collect();
        let slack: Vec<f64> = self
            .slots
            .iter()
            .map(|s| (TOLERANCE * s.target).max(0.5 * libm::sqrt(s.target / samples as f64)))
            .collect();
        let mut counts = vec![0u64; nodes];
        let mut times = vec![0.0; nodes];
        let mut picked = Vec::with_capacity(self.copies);
        for _ in 0..MAX_ROUNDS {
            counts.fill(0);
            let inverse: Vec<f64> = self.slots.iter().map(|s| 1.0 / s.weight).collect();
            for sample in draws.chunks_exact(nodes) {
                for ((t, &d), &inv) in times.iter_mut().zip(sample).zip(&inverse) {
                    *t = d * inv;
                }
                self.pick(&times, &mut picked);
                for &i in &picked {
                    counts[i] += 1;
                }
            }
            let observed: Vec<f64> = counts.iter().map(|&c| c as f64 / samples as f64).collect();
            let done = self
                .slots
                .iter()
                .zip(&observed)
                .zip(&slack)
                .all(|((s, &o), &e)| (o - s.target).abs() <= e);
            if done {
                break;
            }
            for ((s, &o), &b) in self.slots.iter_mut().zip(&observed).zip(&base) {
                let factor = if o > 0.0 {
                    libm::pow(s.target / o, 0.8)
                } else {
                    2.0
                };
                s.weight = (s.weight * factor).clamp(b / MAX_WEIGHT_RATIO, b * MAX_WEIGHT_RATIO);
            }
        }
    }
}

/// The block's hash as two 64-bit words (BLAKE3 output is uniform: any bits do).
fn block_words(block: &BlockHash) -> (u64, u64) {
    let b = &block.0;
    let w0 = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let w1 = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    (w0, w1)
}

/// A node's unit-rate exponential draw for a block; over its weight, its arrival
/// time.
fn arrival(seed: u64, b0: u64, b1: u64) -> f64 {
    let h = mix(mix(seed ^ b0) ^ b1);
    // 53 random bits, mapped into (0, 1]: the logarithm is finite.
    let u = ((h >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64);
    -libm::log(u)
}

/// A 64-bit mixing function (the SplitMix64 finaliser): a bijection whose output
/// bits each depend on every input bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Splits `total` into parts proportional to `weights`, each clamped to
/// `[low, high]`: finds `λ` with `Σ clamp(λ·wᵢ, lowᵢ, highᵢ) = total`. The caller
/// guarantees `Σ low ≤ total ≤ Σ high`.
fn water_fill(total: f64, weights: &[f64], low: &[f64], high: &[f64]) -> Vec<f64> {
    let parts = |lambda: f64| -> Vec<f64> {
        weights
            .iter()
            .zip(low.iter().zip(high))
            .map(|(&w, (&lo, &hi))| (lambda * w).clamp(lo, hi))
            .collect()
    };
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let min_weight = weights.iter().cloned().fold(f64::INFINITY, f64::min);
    let max_high = high.iter().cloned().fold(0.0, f64::max);
    let (mut lo, mut hi) = (0.0, max_high / min_weight.max(1e-300));
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if sum(&parts(mid)) < total {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    parts(hi)
}

#[cfg(test)]
mod tests;
