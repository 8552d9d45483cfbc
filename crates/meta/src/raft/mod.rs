//! The metadata's Raft group (openraft): its types, its log store
//! (`log_store.rs`) and its state machine (`state_machine.rs`).
//!
//! Every change to the metadata is an entry of one replicated log. An entry carries a
//! batch of [`Command`]s (concurrent writes share one entry, one log write and one
//! apply transaction); applying it returns one result per command.

pub mod log_store;
pub mod network;
pub mod state_machine;

use serde::{Deserialize, Serialize};

use crate::{Command, MetaError, Outcome};

/// Raft node ids: the node's persistent random id.
pub type NodeId = u64;

/// What a member of the Raft group is to the others: where to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's RPC address (`host:port`); empty for a node that has none (a
    /// cluster of one).
    pub rpc: String,
    /// The node's failure zone: voters are spread over zones.
    pub zone: String,
}

/// Most voters a group gets: more make every commit wait for more nodes.
pub const MAX_VOTERS: usize = 5;

/// The voters of a group of `members` (id, zone): an odd number (at most
/// `max`, at most the members), spread over zones. Current voters stay while they
/// are members and fit; the others are added from the zones with the fewest voters
/// first, lowest id first.
pub fn choose_voters(
    members: &[(NodeId, String)],
    current: &std::collections::BTreeSet<NodeId>,
    max: usize,
) -> std::collections::BTreeSet<NodeId> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut target = members.len().min(max).max(1);
    if target.is_multiple_of(2) {
        target -= 1;
    }
    let mut sorted: Vec<&(NodeId, String)> = members.iter().collect();
    sorted.sort();
    let mut chosen: BTreeSet<NodeId> = BTreeSet::new();
    let mut per_zone: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, zone) in &sorted {
        if current.contains(id) && chosen.len() < target {
            chosen.insert(*id);
            *per_zone.entry(zone.as_str()).or_default() += 1;
        }
    }
    while chosen.len() < target {
        let Some((id, zone)) = sorted
            .iter()
            .filter(|(id, _)| !chosen.contains(id))
            .min_by_key(|(id, zone)| (per_zone.get(zone.as_str()).copied().unwrap_or(0), *id))
        else {
            break;
        };
        chosen.insert(*id);
        *per_zone.entry(zone.as_str()).or_default() += 1;
    }
    chosen
}

/// The payload of a log entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// Commands applied in order; each succeeds or fails on its own.
    Commands(Vec<Command>),
}

/// What applying an entry returned: one result per command.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response(pub Vec<Result<Outcome, MetaError>>);

openraft::declare_raft_types!(
    /// The metadata Raft group's types.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Entry = openraft::Entry<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;

/// How long a leader keeps trying to confirm it leads for a read before it gives
/// up: a quorum slow to answer one heartbeat round (a busy machine, a slow link)
/// delays the read instead of failing it.
pub const CONFIRM_LEADERSHIP_FOR: std::time::Duration = std::time::Duration::from_secs(2);

/// The read index of a linearizable read: this node confirms it leads (a
/// heartbeat round answered by a quorum), asking again while a quorum is slow,
/// for up to [`CONFIRM_LEADERSHIP_FOR`]. A node that does not lead says so at once.
pub async fn read_index(
    raft: &Raft,
) -> Result<
    Option<LogId>,
    openraft::error::RaftError<NodeId, openraft::error::CheckIsLeaderError<NodeId, Member>>,
> {
    use openraft::error::{CheckIsLeaderError, RaftError};
    let deadline = tokio::time::Instant::now() + CONFIRM_LEADERSHIP_FOR;
    loop {
        match raft.ensure_linearizable().await {
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use openraft::StorageError;
    use openraft::testing::{StoreBuilder, Suite};

    use super::NodeId;
    use super::log_store::LogStore;
    use super::state_machine::StateMachine;
    use crate::MetaOptions;

    struct Builder;

    impl StoreBuilder<super::TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
            let d = tempfile::tempdir().expect("temporary directory");
            let (_, log, sm) =
                crate::store::open_storage(&d.path().join("meta.redb"), &MetaOptions::default())
                    .await
                    .expect("open storage");
            Ok((d, log, sm))
        }
    }

    fn members(v: &[(u64, &str)]) -> Vec<(u64, String)> {
        v.iter().map(|(i, z)| (*i, z.to_string())).collect()
    }

    #[test]
    fn voters_are_odd_spread_over_zones_and_stable() {
        let none = BTreeSet::new();
        assert_eq!(
            super::choose_voters(&members(&[(1, "a")]), &none, 5),
            BTreeSet::from([1])
        );
        // Two nodes: one voter (two would need both for every commit).
        assert_eq!(
            super::choose_voters(&members(&[(1, "a"), (2, "b")]), &BTreeSet::from([1]), 5),
            BTreeSet::from([1])
        );
        // Four nodes in two zones: three voters, both zones.
        let four = members(&[(1, "a"), (2, "a"), (3, "a"), (4, "b")]);
        let v = super::choose_voters(&four, &BTreeSet::from([1]), 5);
        assert_eq!(v.len(), 3);
        assert!(v.contains(&4) && v.contains(&1));
        // Seven nodes: five voters; current ones stay.
        let seven = members(&[
            (1, "a"),
            (2, "b"),
            (3, "c"),
            (4, "a"),
            (5, "b"),
            (6, "c"),
            (7, "a"),
        ]);
        let cur = BTreeSet::from([1, 2, 3]);
        let v = super::choose_voters(&seven, &cur, 5);
        assert_eq!(v.len(), 5);
        assert!(cur.is_subset(&v));
        // A removed voter is replaced.
        let v2 = super::choose_voters(&seven[1..], &v, 5);
        assert_eq!(v2.len(), 5);
        assert!(!v2.contains(&1));
    }

    type S = Suite<super::TypeConfig, LogStore, StateMachine, Builder, tempfile::TempDir>;

    /// openraft's own checks of a log store and state machine (log states, votes,
    /// purge and truncation, membership, apply, snapshot transfer), each on a fresh
    /// store. Left out: `get_initial_state_membership_from_log_and_sm`, which appends
    /// entries with a hole between them; openraft itself never does, and this log
    /// refuses it.
    #[test]
    fn openraft_storage_suite() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        macro_rules! check {
            ($($t:ident)*) => {$(
                rt.block_on(async {
                    let (_dir, log, sm) = Builder.build().await.unwrap();
                    S::$t(log, sm).await
                })
                .unwrap_or_else(|e| panic!("{}: {e}", stringify!($t)));
            )*};
        }
        check!(
            last_membership_in_log_initial last_membership_in_log
            last_membership_in_log_multi_step get_membership_initial
            get_membership_from_log_and_empty_sm get_membership_from_empty_log_and_sm
            get_membership_from_log_le_sm_last_applied
            get_membership_from_log_gt_sm_last_applied_1
            get_membership_from_log_gt_sm_last_applied_2 get_initial_state_without_init
            get_initial_state_with_state get_initial_state_last_log_gt_sm
            get_initial_state_last_log_lt_sm get_initial_state_log_ids
            get_initial_state_re_apply_committed save_vote get_log_entries
            limited_get_log_entries try_get_log_entry initial_logs get_log_state get_log_id
            last_id_in_log last_applied_state purge_logs_upto_0 purge_logs_upto_5
            purge_logs_upto_20 delete_logs_since_11 delete_logs_since_0 append_to_log
            snapshot_meta apply_single apply_multiple
        );
        rt.block_on(S::transfer_snapshot(&Builder)).unwrap();
    }
}
