use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn node(id: NodeId, zone: &str, capacity: u64) -> NodeSpec {
    NodeSpec {
        id,
        zone: zone.to_string(),
        capacity,
    }
}

/// Block hashes unrelated to the fitting sample: BLAKE3 of a counter.
fn blocks(count: usize, salt: u64) -> impl Iterator<Item = BlockHash> {
    (0..count as u64).map(move |i| BlockHash::of(&[salt.to_le_bytes(), i.to_le_bytes()].concat()))
}

/// Copies per block each node received over `count` blocks.
fn measured(p: &Placement, count: usize, salt: u64) -> BTreeMap<NodeId, f64> {
    let mut counts = BTreeMap::new();
    for b in blocks(count, salt) {
        for id in p.nodes(&b) {
            *counts.entry(id).or_insert(0u64) += 1;
        }
    }
    counts
        .into_iter()
        .map(|(id, c)| (id, c as f64 / count as f64))
        .collect()
}

/// Fraction of all copies that sit on a different node under `after` than under
/// `before`.
fn moved(before: &Placement, after: &Placement, count: usize) -> f64 {
    let mut moved = 0usize;
    for b in blocks(count, 99) {
        let old: BTreeSet<NodeId> = before.nodes(&b).into_iter().collect();
        moved += after
            .nodes(&b)
            .iter()
            .filter(|id| !old.contains(id))
            .count();
    }
    moved as f64 / (count * after.copies()) as f64
}

/// The least a layout change must move: the copies per block the gaining nodes
/// gain, over the copies per block.
fn minimum_move(before: &Placement, after: &Placement, ids: &[NodeId]) -> f64 {
    ids.iter()
        .map(|&id| (after.target(id) - before.target(id)).max(0.0))
        .sum::<f64>()
        / after.copies() as f64
}

#[test]
fn one_node_holds_everything() {
    let p = Placement::new(&[node(7, "z1", 100)], 3);
    assert_eq!(p.copies(), 1);
    for b in blocks(100, 1) {
        assert_eq!(p.nodes(&b), vec![7]);
    }
    assert_eq!(p.share(7), 1.0);
}

#[test]
fn no_capacity_no_copies() {
    let p = Placement::new(&[node(1, "z1", 0), node(2, "z2", 0)], 3);
    assert_eq!(p.copies(), 0);
    assert!(p.nodes(&BlockHash::of(b"x")).is_empty());
    assert!(p.preference(&BlockHash::of(b"x")).is_empty());
}

#[test]
fn nodes_without_capacity_are_never_chosen() {
    let nodes = [
        node(1, "z1", 10),
        node(2, "z2", 10),
        node(3, "z3", 0),
        node(4, "z3", 10),
    ];
    let p = Placement::new(&nodes, 3);
    for b in blocks(2000, 2) {
        assert!(!p.preference(&b).contains(&3));
    }
    assert_eq!(p.share(3), 0.0);
}

#[test]
fn copies_land_in_distinct_zones() {
    let nodes: Vec<NodeSpec> = (0..9)
        .map(|i| node(100 + i, &format!("z{}", i % 3), 10 + i * 3))
        .collect();
    let zone_of: BTreeMap<NodeId, String> = nodes.iter().map(|n| (n.id, n.zone.clone())).collect();
    let p = Placement::new(&nodes, 3);
    for b in blocks(5000, 3) {
        let zones: BTreeSet<&String> = p.nodes(&b).iter().map(|id| &zone_of[id]).collect();
        assert_eq!(zones.len(), 3, "{b:?}");
    }
}

#[test]
fn fewer_zones_than_copies_uses_every_zone() {
    let nodes = [
        node(1, "a", 10),
        node(2, "a", 10),
        node(3, "a", 10),
        node(4, "b", 10),
    ];
    let p = Placement::new(&nodes, 3);
    for b in blocks(3000, 4) {
        let set = p.nodes(&b);
        assert_eq!(set.len(), 3);
        assert!(set.contains(&4), "zone b holds a copy of every block");
    }
    assert!((p.target(4) - 1.0).abs() < 1e-9);
    for id in 1..=3 {
        assert!((p.target(id) - 2.0 / 3.0).abs() < 1e-9);
    }
}

#[test]
fn preference_starts_with_the_placement_and_names_every_node_once() {
    let nodes: Vec<NodeSpec> = (0..7)
        .map(|i| node(i, &format!("z{}", i % 4), 5 + i))
        .collect();
    let p = Placement::new(&nodes, 3);
    for b in blocks(500, 5) {
        let pref = p.preference(&b);
        assert_eq!(&pref[..3], &p.nodes(&b)[..]);
        let unique: BTreeSet<NodeId> = pref.iter().copied().collect();
        assert_eq!(unique.len(), 7);
        assert_eq!(pref.len(), 7);
    }
}

#[test]
fn the_order_of_nodes_in_the_layout_does_not_matter() {
    let mut nodes: Vec<NodeSpec> = (0..6)
        .map(|i| node(i * 11, &format!("z{}", i % 3), 8 + i))
        .collect();
    let a = Placement::new(&nodes, 3);
    nodes.reverse();
    let b = Placement::new(&nodes, 3);
    for h in blocks(500, 6) {
        assert_eq!(a.preference(&h), b.preference(&h));
    }
}

/// The weights are part of the on-disk contract: a block placed by one build must
/// be found by the next. These answers were computed once and must not change
/// unless [`ALGORITHM_VERSION`] does.
#[test]
fn placement_is_stable_across_builds() {
    let nodes = [
        node(1, "z1", 4 << 40),
        node(2, "z2", 8 << 40),
        node(3, "z3", 4 << 40),
        node(4, "z1", 2 << 40),
        node(5, "z2", 4 << 40),
    ];
    let p = Placement::new(&nodes, 3);
    let got: Vec<Vec<NodeId>> = blocks(4, 7).map(|b| p.nodes(&b)).collect();
    assert_eq!(got, [[2, 3, 1], [2, 1, 3], [5, 1, 3], [2, 3, 1]]);
    // And a digest of the full preference lists of 2 000 blocks.
    let mut digest = blake3::Hasher::new();
    for b in blocks(2000, 8) {
        for id in p.preference(&b) {
            digest.update(&id.to_le_bytes());
        }
    }
    assert_eq!(
        digest.finalize().to_hex().as_str(),
        "c8c97f3faf12e9d9bf551547875aeb975826bf54a608b0f60d7a320be7b8e6aa"
    );
}

#[test]
fn a_big_node_gets_its_share_with_several_copies() {
    // One node twice the size of six peers, one zone each: plain weighted
    // rendezvous would give it ~0.64 copies per block instead of 0.75.
    let mut nodes: Vec<NodeSpec> = (1..=6).map(|i| node(i, &format!("z{i}"), 100)).collect();
    nodes.push(node(7, "z7", 200));
    let p = Placement::new(&nodes, 3);
    assert!((p.target(7) - 0.75).abs() < 1e-9);
    let m = measured(&p, 40_000, 8);
    assert!(
        (m[&7] - 0.75).abs() < 0.02,
        "big node holds {} copies per block",
        m[&7]
    );
}

fn layout_strategy() -> impl Strategy<Value = (Vec<NodeSpec>, usize)> {
    (2usize..=10, 1usize..=4, 1usize..=4).prop_flat_map(|(nodes, zones, copies)| {
        (
            proptest::collection::vec((0..zones, 1u64..=8), nodes).prop_map(|v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (z, cap))| node(1000 + i as u64 * 7, &format!("z{z}"), cap << 40))
                    .collect::<Vec<_>>()
            }),
            Just(copies),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Every node holds its target share within a few percent, on blocks the
    /// weights were not fitted on.
    #[test]
    fn shares_match_targets((nodes, copies) in layout_strategy()) {
        let p = Placement::new(&nodes, copies);
        let total: f64 = nodes.iter().map(|n| p.target(n.id)).sum();
        prop_assert!((total - p.copies() as f64).abs() < 1e-6);
        let m = measured(&p, 20_000, 9);
        for n in &nodes {
            let got = m.get(&n.id).copied().unwrap_or(0.0);
            let want = p.target(n.id);
            prop_assert!(
                (got - want).abs() <= 0.04 * want + 0.01,
                "node {} zone {} cap {}: {} copies per block, target {}",
                n.id, n.zone, n.capacity >> 40, got, want
            );
        }
    }

    /// Adding a node moves little more than the share it takes.
    #[test]
    fn adding_a_node_moves_close_to_the_minimum(
        (nodes, copies) in layout_strategy(),
        zone in 0usize..5,
        cap in 1u64..=8,
    ) {
        prop_assume!(nodes.len() >= copies);
        let before = Placement::new(&nodes, copies);
        let mut grown = nodes.clone();
        grown.push(node(1, &format!("z{zone}"), cap << 40));
        let after = Placement::new(&grown, copies);
        let ids: Vec<NodeId> = grown.iter().map(|n| n.id).collect();
        let least = minimum_move(&before, &after, &ids);
        let got = moved(&before, &after, 10_000);
        prop_assert!(got <= least + MOVE_SLACK, "moved {got}, minimum {least}");
    }

    /// Removing a node moves little more than the share it held.
    #[test]
    fn removing_a_node_moves_close_to_the_minimum(
        (nodes, copies) in layout_strategy(),
        which in any::<prop::sample::Index>(),
    ) {
        prop_assume!(nodes.len() > copies);
        let before = Placement::new(&nodes, copies);
        let mut shrunk = nodes.clone();
        shrunk.remove(which.index(nodes.len()));
        let after = Placement::new(&shrunk, copies);
        let ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
        let least = minimum_move(&before, &after, &ids);
        let got = moved(&before, &after, 10_000);
        prop_assert!(got <= least + MOVE_SLACK, "moved {got}, minimum {least}");
    }

    /// With equal capacities, all in one zone or each in its own, nothing moves
    /// but what must.
    #[test]
    fn uniform_layouts_move_the_minimum(
        count in 1usize..=8,
        one_zone in any::<bool>(),
        copies in 1usize..=3,
        remove in any::<bool>(),
    ) {
        let zone = |i: usize| if one_zone { "z".to_string() } else { format!("z{i}") };
        let nodes: Vec<NodeSpec> = (0..count).map(|i| node(50 + i as u64, &zone(i), 4 << 40)).collect();
        let mut changed = nodes.clone();
        if remove {
            prop_assume!(nodes.len() > copies);
            changed.pop();
        } else {
            prop_assume!(nodes.len() >= copies);
            changed.push(node(1, &zone(count), 4 << 40));
        }
        let before = Placement::new(&nodes, copies);
        let after = Placement::new(&changed, copies);
        let ids: Vec<NodeId> = nodes.iter().chain(&changed).map(|n| n.id).collect();
        let least = minimum_move(&before, &after, &ids);
        let got = moved(&before, &after, 10_000);
        prop_assert!(got <= least * 1.05 + 0.01, "moved {got}, minimum {least}");
    }
}

/// How far above the minimum a layout change may move copies. Over 3,468 random
/// layout changes (1,815 nodes added, 1,653 removed; 2–10 nodes, 1–4 zones,
/// capacities 1–8, 1–4 copies) the median excess was 0.1–0.2 point, the 99th
/// percentile 4.6 points and the largest 7.1; a shrunk failing case in
/// `proptest-regressions/tests.txt` reaches 8.1. The large ones are small
/// layouts whose zone shares are capped (a zone cannot hold two copies of a
/// block): refitting the weights there shifts copies between zones the change
/// did not touch. For scale: re-drawing every block at random when one of 5
/// equal nodes holding 2 copies leaves moves 60% of the copies, against a
/// minimum of 20%.
const MOVE_SLACK: f64 = 0.10;
