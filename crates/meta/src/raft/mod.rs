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

#[cfg(test)]
mod tests {
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
