//! The store: tables, the group-commit writer thread, and reads.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::RaftLogStorage;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use cairn_types::{BlockHash, StorageClass, UnixMillis};

use crate::log::LogRecord;
use crate::raft::log_store::LogStore;
use crate::raft::network::{NetNetwork, SVC_READ_INDEX, SVC_WRITE};
use crate::raft::state_machine::{RAFT_STATE, StateMachine};
use crate::raft::{LogId, Member, NodeId, Raft, Request, Response};
use crate::records::{
    BucketRecord, KeyRecord, Layout, LayoutNode, ObjectRecord, PartRecord, UploadRecord, decode,
};
use crate::{Command, MetaError, Outcome, Result, keys};
use cairn_net::Peers;

pub(crate) const BUCKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("buckets");
pub(crate) const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
pub(crate) const UPLOADS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("uploads");
pub(crate) const PARTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("parts");
/// Block address -> number of references from objects and parts.
pub(crate) const BLOCK_REFS: TableDefinition<&[u8], u64> = TableDefinition::new("block_refs");
/// Unreferenced block address -> when it lost its last reference.
pub(crate) const GC_QUEUE: TableDefinition<&[u8], i64> = TableDefinition::new("gc_queue");
pub(crate) const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// Cluster-wide records: the layout.
pub(crate) const CLUSTER: TableDefinition<&str, &[u8]> = TableDefinition::new("cluster");
pub(crate) const LAYOUT: &str = "layout";
/// Before the Raft log (data directory format 2): `applied`, the sequence number of
/// the last command of the old command log (`meta.log`) these tables hold. Read
/// only to upgrade such a directory.
const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
const APPLIED: &str = "applied";

/// Memory redb may use to cache pages (and to hold pages not yet checkpointed, up to
/// half of it), unless set in [`MetaOptions`].
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Commands one Raft entry carries at most. Concurrent writes share an entry: one
/// log record, one apply transaction.
const MAX_BATCH: usize = 512;
/// Bytes of encoded commands one entry carries at most (a batch of inline objects).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Entries proposed and not yet applied at once: while they are in flight the next
/// batch gathers.
const MAX_IN_FLIGHT: usize = 1;
/// Batches a follower has sent to the leader and not yet seen answered. They cost
/// the leader no entry of their own: it adds their commands to its next batch.
const MAX_FORWARDS_IN_FLIGHT: usize = 4;
/// Commands waiting to be batched. Callers beyond this wait for room (backpressure).
const QUEUE_DEPTH: usize = 4096;

/// How a metadata store is opened.
#[derive(Clone)]
pub struct MetaOptions {
    /// This node's id in the Raft group.
    pub node_id: NodeId,
    /// Memory for caches: three quarters for redb's page cache, one for object records.
    pub memory: usize,
    /// This node's RPC address, as the other members reach it ("" for none).
    pub rpc_address: String,
    /// Connections to the other members; `None`: a cluster of one.
    pub peers: Option<Peers>,
    /// A new store waits to be added to an existing group instead of starting one.
    pub join: bool,
    /// This node's failure zone.
    pub zone: String,
    /// A snapshot of the state machine is taken after this many log entries.
    pub snapshot_every: u64,
    /// Log entries kept behind the latest snapshot, so that a follower a little
    /// behind catches up from the log instead of a whole snapshot.
    pub log_keep: u64,
}

impl Default for MetaOptions {
    fn default() -> Self {
        MetaOptions {
            node_id: 1,
            memory: DEFAULT_CACHE_BYTES,
            rpc_address: String::new(),
            peers: None,
            join: false,
            zone: "z1".into(),
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            log_keep: DEFAULT_LOG_KEEP,
        }
    }
}

type Reply = oneshot::Sender<Result<Outcome>>;

/// Read barriers in progress (see [`MetaStore::read_barrier`]).
struct Barriers {
    state: std::sync::Mutex<BarrierState>,
    /// The last finished round: its generation and result.
    done: tokio::sync::watch::Sender<(u64, Result<()>)>,
}

struct BarrierState {
    /// Number of the next round to start; a read arriving now waits for it.
    next: u64,
    /// Reads waiting for round `next`.
    waiting: usize,
    running: bool,
}

#[derive(Clone)]
pub struct MetaStore {
    barrier: Arc<Barriers>,
    shared: Arc<Shared>,
    /// The Raft node and what feeds it; replaced whole when the node leaves its
    /// cluster of one to join another (`reset_for_join`).
    node: Arc<RwLock<Node>>,
    opts: Arc<MetaOptions>,
    path: PathBuf,
}

/// A running Raft node over the store's tables.
#[derive(Clone)]
struct Node {
    tx: mpsc::Sender<(Command, Reply)>,
    raft: Raft,
    sm: StateMachine,
}

/// How long a follower waits for the leader's read index and for applying up to it.
const READ_BARRIER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a write forwarded to the leader may take.
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Access keys, read on every request: kept in memory, loaded at open and updated by
/// the writer after each commit that changes them.
type KeyCache = RwLock<std::collections::HashMap<String, KeyRecord>>;

/// Buckets, checked on every request: kept in memory like the keys.
type BucketCache = RwLock<std::collections::BTreeMap<String, BucketRecord>>;

/// The open database, replaced by a fresh handle after an I/O error: redb refuses
/// every call after one (`PreviousIo`) until the database is opened again, and a full
/// disk must not need a restart.
pub(crate) struct Shared {
    path: PathBuf,
    cache_bytes: usize,
    pub(crate) records: crate::cache::RecordCache,
    db: RwLock<Option<Arc<Database>>>,
    /// Set while the database, reopened after an I/O error, holds less than was
    /// applied before it (its last checkpoint): readers get `Unavailable`, never
    /// that older state, until the entries are applied again.
    behind: std::sync::atomic::AtomicBool,
    /// Tests: the next commits this many fail as on a full disk.
    #[cfg(test)]
    pub(crate) fail_commits: std::sync::atomic::AtomicUsize,
    keys: KeyCache,
    buckets: BucketCache,
    /// The layout as last committed; watchers learn of every change.
    layout: tokio::sync::watch::Sender<Arc<Layout>>,
}

impl Shared {
    /// The database, for readers and writers: `Unavailable` while it is behind
    /// what was applied (being recovered after an I/O error).
    pub(crate) fn get(&self) -> Result<Arc<Database>> {
        if self.behind.load(std::sync::atomic::Ordering::Acquire) {
            return Err(MetaError::Unavailable);
        }
        self.get_even_behind()
    }

    /// The database whatever it holds: for the apply thread, which brings it back.
    pub(crate) fn get_even_behind(&self) -> Result<Arc<Database>> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(MetaError::Unavailable)
    }

    /// Whether a commit may go ahead: in tests that ask for it, the next ones fail
    /// as on a full disk.
    pub(crate) fn commit_allowed(&self) -> Result<()> {
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering::SeqCst;
            if self
                .fail_commits
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(MetaError::NoSpace(
                    "a full disk (injected by a test)".into(),
                ));
            }
        }
        Ok(())
    }

    /// Marks the database as behind what was applied (or caught up again).
    pub(crate) fn set_behind(&self, behind: bool) {
        self.behind
            .store(behind, std::sync::atomic::Ordering::Release);
    }

    /// Keeps the in-memory caches in step with a committed command.
    pub(crate) fn note_committed(&self, cmd: &Command) {
        match cmd {
            Command::PutKey { access_key, record } => {
                let mut k = self.keys.write().unwrap_or_else(|p| p.into_inner());
                k.insert(access_key.clone(), record.clone());
            }
            Command::CreateBucket { bucket, now } => {
                let mut b = self.buckets.write().unwrap_or_else(|p| p.into_inner());
                let rec = BucketRecord {
                    created: *now,
                    class: None,
                };
                b.insert(bucket.clone(), rec);
            }
            Command::DeleteBucket { bucket, .. } => {
                let mut b = self.buckets.write().unwrap_or_else(|p| p.into_inner());
                b.remove(bucket);
            }
            Command::SetBucketClass { bucket, class } => {
                let mut b = self.buckets.write().unwrap_or_else(|p| p.into_inner());
                if let Some(rec) = b.get_mut(bucket) {
                    rec.class = *class;
                }
            }
            _ => {}
        }
    }

    /// Drops the current handle (once no reader holds it) and opens the file again.
    pub(crate) fn reopen(&self) -> Result<()> {
        let old = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(old) = old {
            let start = std::time::Instant::now();
            while Arc::strong_count(&old) > 1
                && start.elapsed() < std::time::Duration::from_secs(30)
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            drop(old);
        }
        self.commit_allowed()?;
        let db = open_db(&self.path, self.cache_bytes)?;
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
        tracing::info!(path = %self.path.display(), "metadata database reopened");
        Ok(())
    }

    /// Loads the key and bucket caches from the tables.
    pub(crate) fn reload_caches(&self, db: &Database) -> Result<()> {
        let mut keys = std::collections::HashMap::new();
        let mut buckets = std::collections::BTreeMap::new();
        let txn = db.begin_read()?;
        for item in txn.open_table(KEYS)?.iter()? {
            let (k, v) = item?;
            keys.insert(k.value().to_string(), decode(v.value())?);
        }
        for item in txn.open_table(BUCKETS)?.iter()? {
            let (k, v) = item?;
            buckets.insert(k.value().to_string(), BucketRecord::decode(v.value())?);
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        *self.buckets.write().unwrap_or_else(|p| p.into_inner()) = buckets;
        drop(txn);
        self.reload_layout(db)
    }

    /// Loads the layout from its table; watchers are told if it changed.
    pub(crate) fn reload_layout(&self, db: &Database) -> Result<()> {
        let txn = db.begin_read()?;
        let layout = crate::apply::read_layout(&txn.open_table(CLUSTER)?)?;
        self.layout.send_if_modified(|cur| {
            if **cur == layout {
                return false;
            }
            *cur = Arc::new(layout);
            true
        });
        Ok(())
    }
}

fn open_db(path: &Path, cache_bytes: usize) -> Result<Database> {
    let mut b = Database::builder();
    b.set_cache_size(cache_bytes);
    Ok(if path.exists() {
        b.open(path)?
    } else {
        b.create(path)?
    })
}

/// The command log next to the database file (`meta.redb` -> `meta.log`).
fn log_path(db_path: &Path) -> PathBuf {
    db_path.with_extension("log")
}

fn read_applied(db: &Database) -> Result<u64> {
    let txn = db.begin_read()?;
    let t = match txn.open_table(STATE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    Ok(t.get(APPLIED)?.map(|v| v.value()).unwrap_or(0))
}

/// Applies the log records the tables do not hold yet (non-durably), in one
/// transaction. Returns each one's sequence number and result.
fn replay(
    db: &Database,
    records: &[LogRecord],
    applied: u64,
) -> Result<Vec<(u64, Result<Outcome>)>> {
    let todo: Vec<&LogRecord> = records.iter().filter(|r| r.seq > applied).collect();
    let (Some(first), Some(last)) = (todo.first(), todo.last()) else {
        return Ok(Vec::new());
    };
    if first.seq != applied + 1 {
        return Err(MetaError::Storage(format!(
            "the metadata log starts at command {} but the database holds commands up to {applied} only: \
             commands {}..{} are missing",
            first.seq,
            applied + 1,
            first.seq - 1
        )));
    }
    let mut txn = db.begin_write()?;
    let _ = txn.set_durability(redb::Durability::None);
    let mut out = Vec::with_capacity(todo.len());
    {
        let mut tables = crate::apply::Tables::open(&txn)?;
        for r in &todo {
            let cmd: Command = decode(&r.payload)?;
            let res = crate::apply::apply(&mut tables, &cmd);
            if let Err(e @ (MetaError::Storage(_) | MetaError::NoSpace(_))) = &res {
                return Err(e.clone());
            }
            out.push((r.seq, res));
        }
    }
    txn.open_table(STATE)?.insert(APPLIED, last.seq)?;
    txn.commit()?;
    Ok(out)
}

/// The table key of the object a command replaces or removes, if any.
pub(crate) fn changed_object(cmd: &Command) -> Option<Vec<u8>> {
    match cmd {
        Command::PutObject { bucket, key, .. }
        | Command::DeleteObject { bucket, key, .. }
        | Command::CompleteUpload { bucket, key, .. } => Some(keys::object(bucket, key)),
        _ => None,
    }
}

/// Makes every commit so far durable in the database file.
pub(crate) fn checkpoint(db: &Database) -> Result<()> {
    let mut txn = db.begin_write()?;
    let _ = txn.set_durability(redb::Durability::Immediate);
    txn.commit()?;
    Ok(())
}

/// A listing request over one bucket's keys.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub prefix: String,
    pub delimiter: Option<String>,
    /// List names strictly after this one: keys after it, and common prefixes after
    /// it (so a prefix returned as the last entry of a page is not returned again).
    pub start_after: Option<String>,
    pub max: usize,
}

#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // built once per listed key and consumed at once
pub enum ListEntry {
    Object(String, ObjectRecord),
    Prefix(String),
}

impl ListEntry {
    pub fn name(&self) -> &str {
        match self {
            ListEntry::Object(k, _) | ListEntry::Prefix(k) => k,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub entries: Vec<ListEntry>,
    pub truncated: bool,
}

#[derive(Clone, Debug)]
pub struct UploadEntry {
    pub key: String,
    pub upload_id: String,
    pub record: UploadRecord,
}

impl MetaStore {
    /// Opens or creates the metadata store at `path` (`meta.redb`; the Raft log and
    /// snapshots in `raft/` beside it) as node 1 with default memory.
    pub async fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, MetaOptions::default()).await
    }

    /// Opens or creates the metadata store and starts its Raft node. A new store
    /// becomes a cluster of one; its node is leader once this returns.
    pub async fn open_with(path: &Path, opts: MetaOptions) -> Result<Self> {
        let shared = open_shared(path, &opts).await?;
        let node = start_node(shared.clone(), path, &opts).await?;
        Ok(MetaStore {
            barrier: Arc::new(Barriers {
                state: std::sync::Mutex::new(BarrierState {
                    next: 1,
                    waiting: 0,
                    running: false,
                }),
                done: tokio::sync::watch::channel((0, Ok(()))).0,
            }),
            shared,
            node: Arc::new(RwLock::new(node)),
            opts: Arc::new(opts),
            path: path.to_path_buf(),
        })
    }

    fn node(&self) -> Node {
        self.node.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies one command; returns once it is committed and applied (or failed).
    pub async fn apply(&self, cmd: Command) -> Result<Outcome> {
        let (reply, rx) = oneshot::channel();
        let tx = self
            .node
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .tx
            .clone();
        tx.send((cmd, reply)).await.map_err(|_| MetaError::Closed)?;
        rx.await.map_err(|_| MetaError::Closed)?
    }

    /// Commands a follower forwarded: on the leader they join its next batch (all
    /// the cluster's writes share its entries); a node that does not lead proposes
    /// them itself, which fails with the leader's address, so that nothing is
    /// passed on twice.
    pub(crate) async fn apply_forwarded(&self, cmds: Vec<Command>) -> Result<Response> {
        let node = self.node();
        if !self.is_leader() {
            use openraft::error::{ClientWriteError, RaftError};
            return match node.raft.client_write(Request::Commands(cmds)).await {
                Ok(r) => Ok(r.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    Err(MetaError::Unavailable)
                }
                Err(e) => Err(MetaError::Storage(e.to_string())),
            };
        }
        let mut waiting = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let (reply, rx) = oneshot::channel();
            node.tx
                .send((cmd, reply))
                .await
                .map_err(|_| MetaError::Closed)?;
            waiting.push(rx);
        }
        let mut results = Vec::with_capacity(waiting.len());
        for rx in waiting {
            results.push(rx.await.map_err(|_| MetaError::Closed)?);
        }
        Ok(Response(results))
    }

    /// Makes everything applied so far durable in the database file, so that the
    /// next open has little to apply again.
    pub async fn checkpoint(&self) -> Result<()> {
        self.node().sm.checkpoint().await
    }

    /// Stops the Raft node and checkpoints. Other handles fail with `Closed` after.
    pub async fn close(&self) -> Result<()> {
        let node = self.node();
        let _ = node.raft.shutdown().await;
        node.sm.checkpoint().await
    }

    /// The Raft node (status, membership).
    pub fn raft(&self) -> Raft {
        self.node().raft
    }

    /// The connections to the other members (`None`: a node without RPC).
    pub fn peers(&self) -> Option<&Peers> {
        self.opts.peers.as_ref()
    }

    /// This node's id in the Raft group.
    pub fn node_id(&self) -> NodeId {
        self.opts.node_id
    }

    /// Whether node `id` is in the Raft group's membership as applied here.
    pub fn is_member(&self, id: NodeId) -> bool {
        self.raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some()
    }

    /// The layout as last applied on this node.
    pub fn layout(&self) -> Arc<Layout> {
        self.shared.layout.borrow().clone()
    }

    /// Follows the layout: the receiver sees each version applied on this node.
    pub fn watch_layout(&self) -> tokio::sync::watch::Receiver<Arc<Layout>> {
        self.shared.layout.subscribe()
    }

    /// Makes the layout's entry for `node.id` equal to `node` (nothing is proposed
    /// when it already is). Reads the layout after a read barrier, so that an entry
    /// committed elsewhere is seen.
    pub async fn set_layout_node(&self, node: LayoutNode) -> Result<()> {
        self.read_barrier().await?;
        if self.layout().node(node.id) == Some(&node) {
            return Ok(());
        }
        self.apply(Command::SetLayoutNode { node })
            .await
            .map(|_| ())
    }

    /// Adds a node to the group (on the leader; elsewhere the request goes to the
    /// leader): as a learner that catches up first, then as a voter if the group's
    /// voters (an odd number, at most `MAX_VOTERS`, spread over zones) include it.
    pub async fn add_member(&self, id: NodeId, member: Member) -> Result<()> {
        use openraft::error::{ClientWriteError, RaftError};
        let raft = self.raft();
        match raft.add_learner(id, member.clone(), true).await {
            Ok(_) => {}
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                let node = leader_named(&raft, &f).await;
                let req = crate::raft::network::JoinRequest {
                    node_id: id,
                    member,
                };
                return self
                    .ask_leader(node, crate::raft::network::SVC_JOIN, &req)
                    .await;
            }
            Err(e) => return Err(MetaError::Refused(format!("adding node {id:016x}: {e}"))),
        }
        let (members, current) = {
            let m = raft.metrics();
            let m = m.borrow();
            let cfg = m.membership_config.membership();
            let members: Vec<(NodeId, String)> =
                cfg.nodes().map(|(i, n)| (*i, n.zone.clone())).collect();
            (
                members,
                cfg.voter_ids().collect::<std::collections::BTreeSet<_>>(),
            )
        };
        let voters = crate::raft::choose_voters(&members, &current, crate::raft::MAX_VOTERS);
        // Members left out of the voters stay in the group as learners.
        if voters != current {
            raft.change_membership(voters, true)
                .await
                .map_err(|e| MetaError::Refused(format!("changing the voters: {e}")))?;
        }
        tracing::info!(node = format!("{id:016x}"), rpc = %member.rpc, zone = %member.zone, "node added to the cluster");
        Ok(())
    }

    /// Sends a membership request to the leader `node` (if known), which answers
    /// `Result<(), String>`.
    async fn ask_leader<T: serde::Serialize>(
        &self,
        node: Option<(NodeId, Member)>,
        svc: u8,
        req: &T,
    ) -> Result<()> {
        let (Some((leader, node)), Some(peers)) = (node, &self.opts.peers) else {
            return Err(MetaError::Unavailable);
        };
        let body = crate::raft::network::encode(req).map_err(MetaError::Storage)?;
        let answer = peers
            .call_node(leader, &node.rpc, svc, body, FORWARD_TIMEOUT)
            .await
            .map_err(|e| MetaError::Refused(format!("the leader at {}: {e}", node.rpc)))?;
        let res: std::result::Result<(), String> =
            crate::raft::network::decode(&answer).map_err(MetaError::Storage)?;
        res.map_err(MetaError::Refused)
    }

    /// Takes a node out of the layout and out of the group (the voters are chosen
    /// again among the rest). Done by the leader; elsewhere the request goes to it.
    /// The caller has made sure the node's blocks are elsewhere.
    pub async fn remove_member(&self, id: NodeId) -> Result<()> {
        use openraft::ChangeMembers;
        use openraft::error::{ClientWriteError, RaftError};
        let raft = self.raft();
        let leader = raft.metrics().borrow().current_leader;
        if leader != Some(self.opts.node_id) {
            let node = match leader.and_then(|l| {
                raft.metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| (l, n.clone()))
            }) {
                Some(n) => Some(n),
                None => wait_for_leader(&raft).await,
            };
            return self
                .ask_leader(node, crate::raft::network::SVC_LEAVE, &id)
                .await;
        }
        self.apply(Command::RemoveLayoutNode { id }).await?;
        let (members, current) = {
            let m = raft.metrics();
            let m = m.borrow();
            let cfg = m.membership_config.membership();
            let members: Vec<(NodeId, String)> = cfg
                .nodes()
                .filter(|(i, _)| **i != id)
                .map(|(i, n)| (*i, n.zone.clone()))
                .collect();
            (
                members,
                cfg.voter_ids().collect::<std::collections::BTreeSet<_>>(),
            )
        };
        let changed = |e: RaftError<NodeId, ClientWriteError<NodeId, Member>>| {
            MetaError::Refused(format!("removing node {id:016x}: {e}"))
        };
        if current.contains(&id) {
            let mut rest = current.clone();
            rest.remove(&id);
            let voters = crate::raft::choose_voters(&members, &rest, crate::raft::MAX_VOTERS);
            if voters.is_empty() {
                return Err(MetaError::Refused(
                    "the last member of a cluster cannot leave it".into(),
                ));
            }
            // The others stay as learners (`retain`): a group of five that loses
            // one keeps three voters and one learner, not three members.
            raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
                .await
                .map_err(changed)?;
        }
        if self.is_member(id) {
            raft.change_membership(
                ChangeMembers::RemoveNodes(std::iter::once(id).collect()),
                false,
            )
            .await
            .map_err(changed)?;
        }
        tracing::info!(node = format!("{id:016x}"), "node removed from the cluster");
        Ok(())
    }

    /// Leaves this node's own cluster of one so that it can be added to another:
    /// stops its Raft node, empties its tables and its Raft log, and starts a Raft
    /// node that waits for a leader to add it. Refused unless the node is alone in
    /// its group and holds no bucket (the generated root key is dropped: the
    /// cluster's keys replace it).
    pub async fn reset_for_join(&self) -> Result<()> {
        let old = self.node();
        let voters: Vec<NodeId> = {
            let m = old.raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().voter_ids().collect()
        };
        // Alone in its group, or in none yet (a join that did not complete).
        if !voters.is_empty() && voters != [self.opts.node_id] {
            return Err(MetaError::Refused(
                "this node is already a member of a cluster of several nodes".into(),
            ));
        }
        if !self.buckets().is_empty() {
            return Err(MetaError::Refused(
                "this node holds buckets: only a node without data can join a cluster".into(),
            ));
        }
        let _ = old.raft.shutdown().await;
        // Entries the old group committed may still be on their way to its
        // state machine (openraft's worker outlives the core for a moment):
        // applied after the tables are emptied, they would put the old group's
        // rows and applied index back under the new one. Once openraft has let
        // go of the state machine (only `old` and the store's own handle left),
        // a checkpoint through its queue comes after every apply sent to it.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while old.sm.handles() > 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let _ = old.sm.checkpoint().await;
        let shared = self.shared.clone();
        let raft_dir = raft_dir(&self.path);
        tokio::task::spawn_blocking(move || -> Result<()> {
            let db = shared.get()?;
            let txn = db.begin_write()?;
            delete_data_tables(&txn)?;
            txn.delete_table(RAFT_STATE)?;
            txn.commit()?;
            create_tables(&db)?;
            shared.records.clear();
            shared.reload_caches(&db)?;
            // The old log's threads may still hold its files: move it aside whole.
            let aside = raft_dir.with_file_name(format!("raft.left-{}", cairn_types::now_millis()));
            if raft_dir.exists() {
                std::fs::rename(&raft_dir, &aside).map_err(|e| io_error(&raft_dir, e))?;
                let _ = std::fs::remove_dir_all(&aside);
            }
            Ok(())
        })
        .await
        .map_err(|e| MetaError::Storage(format!("reset task failed: {e}")))??;
        let mut opts = (*self.opts).clone();
        opts.join = true;
        let node = start_node(self.shared.clone(), &self.path, &opts).await?;
        *self.node.write().unwrap_or_else(|p| p.into_inner()) = node;
        tracing::info!("left this node's cluster of one; waiting to be added to a cluster");
        Ok(())
    }

    /// Writes the whole metadata state (keys, buckets, objects, layout and
    /// membership: every table) to a snapshot file, as of every write
    /// acknowledged before the call; the file's path (which the caller removes)
    /// and what it holds.
    pub async fn export_snapshot(
        &self,
    ) -> Result<(
        std::path::PathBuf,
        crate::raft::state_machine::SnapshotSummary,
    )> {
        self.read_barrier().await?;
        self.node().sm.export().await
    }

    /// Waits until this node has applied every entry committed before the call
    /// (a linearizable read then sees every write acknowledged before it began).
    /// A cluster of one needs nothing: its writes return once applied here. The
    /// leader confirms it still leads (a heartbeat round); a follower asks the
    /// leader for its read index and waits to have applied that far. Concurrent
    /// reads share rounds: a read waits for the first round that starts after it
    /// arrived, so each round serves every read that came while the last one ran.
    pub async fn read_barrier(&self) -> Result<()> {
        let raft = self.raft();
        {
            let m = raft.metrics();
            let m = m.borrow();
            if m.membership_config.membership().voter_ids().count() <= 1
                && m.current_leader == Some(self.opts.node_id)
            {
                return Ok(());
            }
        }
        // Subscribed before any round can finish: no result is missed.
        let mut rx = self.barrier.done.subscribe();
        let round = {
            let mut st = self.barrier.state.lock().unwrap_or_else(|p| p.into_inner());
            let round = st.next;
            if st.running {
                st.waiting += 1;
            } else {
                st.running = true;
                st.next += 1;
                let this = self.clone();
                tokio::spawn(async move { this.barrier_rounds(round).await });
            }
            round
        };
        loop {
            {
                let done = rx.borrow_and_update();
                if done.0 >= round {
                    return done.1.clone();
                }
            }
            rx.changed().await.map_err(|_| MetaError::Closed)?;
        }
    }

    /// Runs barrier rounds, starting with `round`, while reads wait for one.
    async fn barrier_rounds(&self, mut round: u64) {
        loop {
            let res = self.barrier_round().await;
            // Stored even when no one is subscribed at this instant.
            let _previous = self.barrier.done.send_replace((round, res));
            let mut st = self.barrier.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.waiting > 0 {
                round = st.next;
                st.next += 1;
                st.waiting = 0;
            } else {
                st.running = false;
                return;
            }
        }
    }

    /// One round: the leader confirms it leads, or a follower gets its read index;
    /// then this node waits to have applied that far.
    async fn barrier_round(&self) -> Result<()> {
        let raft = self.raft();
        let mut attempts = 0;
        let read_index: Option<LogId> = loop {
            attempts += 1;
            match crate::raft::read_index(&raft).await {
                Ok(l) => break l,
                Err(openraft::error::RaftError::APIError(
                    openraft::error::CheckIsLeaderError::ForwardToLeader(f),
                )) => {
                    let node = leader_named(&raft, &f).await;
                    let (Some((leader, node)), Some(peers)) = (node, &self.opts.peers) else {
                        return Err(MetaError::Unavailable);
                    };
                    let body = crate::raft::network::encode(&()).map_err(MetaError::Storage)?;
                    match peers
                        .call_node(
                            leader,
                            &node.rpc,
                            SVC_READ_INDEX,
                            body,
                            READ_BARRIER_TIMEOUT,
                        )
                        .await
                    {
                        Ok(answer) => {
                            let res: std::result::Result<Option<LogId>, String> =
                                crate::raft::network::decode(&answer)
                                    .map_err(MetaError::Storage)?;
                            break res.map_err(|_| MetaError::Unavailable)?;
                        }
                        // The leader this node knows is gone: once another is
                        // elected, ask it (a read changes nothing: asking again is safe).
                        Err(_) if attempts < 3 && f.leader_id.is_some() => {
                            if !wait_for_other_leader(&raft, f.leader_id).await {
                                return Err(MetaError::Unavailable);
                            }
                        }
                        Err(_) => return Err(MetaError::Unavailable),
                    }
                }
                Err(_) => return Err(MetaError::Unavailable),
            }
        };
        if let Some(index) = read_index {
            raft.wait(Some(READ_BARRIER_TIMEOUT))
                .applied_index_at_least(Some(index.index), "read barrier")
                .await
                .map_err(|_| MetaError::Unavailable)?;
        }
        Ok(())
    }

    /// Runs a read on a blocking thread (redb reads may touch the disk).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.shared.get()?;
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| MetaError::Storage(format!("read task failed: {e}")))?
    }

    /// The bucket's record (from memory; no I/O).
    /// The storage class a new object of `bucket` is written in: the bucket's own,
    /// else the cluster's default (as this node last applied them).
    pub fn class_of(&self, bucket: &str) -> StorageClass {
        self.bucket(bucket)
            .and_then(|b| b.class)
            .unwrap_or_else(|| self.layout().default_class)
    }

    pub fn bucket(&self, bucket: &str) -> Option<BucketRecord> {
        self.shared
            .buckets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(bucket)
            .cloned()
    }

    /// All buckets, sorted by name (from memory; no I/O).
    pub fn buckets(&self) -> Vec<(String, BucketRecord)> {
        let b = self
            .shared
            .buckets
            .read()
            .unwrap_or_else(|p| p.into_inner());
        b.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn require_bucket(&self, bucket: &str) -> Result<()> {
        match self.bucket(bucket) {
            Some(_) => Ok(()),
            None => Err(MetaError::NoSuchBucket),
        }
    }

    /// The object under `key`; `NoSuchBucket` if the bucket does not exist.
    pub async fn object(&self, bucket: &str, key: &str) -> Result<Option<ObjectRecord>> {
        self.read_barrier().await?;
        self.require_bucket(bucket)?;
        let okey = keys::object(bucket, key);
        let records = &self.shared.records;
        if let Some(r) = records.get(&okey) {
            return Ok(Some((*r).clone()));
        }
        let since = records.generation();
        let k = okey.clone();
        let rec = self
            .read(move |db| {
                let txn = db.begin_read()?;
                let t = txn.open_table(OBJECTS)?;
                let v = t.get(k.as_slice())?;
                v.map(|v| decode::<ObjectRecord>(v.value())).transpose()
            })
            .await?;
        if let Some(r) = &rec {
            records.fill(since, okey, r.clone());
        }
        Ok(rec)
    }

    /// One page of a bucket's keys, sorted, with keys that share a prefix up to the
    /// delimiter rolled up into one [`ListEntry::Prefix`].
    pub async fn list(&self, bucket: &str, q: ListQuery) -> Result<ListPage> {
        self.read_barrier().await?;
        let bucket = bucket.to_string();
        self.read(move |db| {
            let txn = db.begin_read()?;
            if txn.open_table(BUCKETS)?.get(bucket.as_str())?.is_none() {
                return Err(MetaError::NoSuchBucket);
            }
            let t = txn.open_table(OBJECTS)?;
            list_in(&t, &bucket, &q)
        })
        .await
    }

    pub async fn upload(&self, bucket: &str, key: &str, upload_id: &str) -> Result<UploadRecord> {
        self.read_barrier().await?;
        let k = keys::upload(bucket, key, upload_id);
        let bucket = bucket.to_string();
        self.read(move |db| {
            let txn = db.begin_read()?;
            if txn.open_table(BUCKETS)?.get(bucket.as_str())?.is_none() {
                return Err(MetaError::NoSuchBucket);
            }
            let t = txn.open_table(UPLOADS)?;
            let v = t.get(k.as_slice())?.ok_or(MetaError::NoSuchUpload)?;
            decode(v.value())
        })
        .await
    }

    /// Parts of an upload with numbers above `after`, at most `max`, in order.
    pub async fn parts(
        &self,
        upload_id: &str,
        after: u32,
        max: usize,
    ) -> Result<Vec<(u32, PartRecord)>> {
        let upload_id = upload_id.to_string();
        self.read(move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(PARTS)?;
            let (_, hi) = keys::part_range(&upload_id);
            let lo = keys::part(&upload_id, after);
            let mut out = Vec::new();
            for item in t.range::<&[u8]>((
                Bound::Excluded(lo.as_slice()),
                Bound::Excluded(hi.as_slice()),
            ))? {
                if out.len() >= max {
                    break;
                }
                let (k, v) = item?;
                out.push((keys::part_number_of(k.value()), decode(v.value())?));
            }
            Ok(out)
        })
        .await
    }

    /// Uploads in progress in a bucket, by key then by initiation, after the marker
    /// (key, upload id), at most `max`.
    pub async fn uploads(
        &self,
        bucket: &str,
        prefix: &str,
        after: Option<(String, Option<String>)>,
        max: usize,
    ) -> Result<Vec<UploadEntry>> {
        let (bucket, prefix) = (bucket.to_string(), prefix.to_string());
        self.read(move |db| {
            let txn = db.begin_read()?;
            if txn.open_table(BUCKETS)?.get(bucket.as_str())?.is_none() {
                return Err(MetaError::NoSuchBucket);
            }
            let t = txn.open_table(UPLOADS)?;
            let (_, hi) = keys::bucket_range(&bucket);
            let lo = match &after {
                None => Bound::Included(keys::object(&bucket, &prefix)),
                // Past every upload of the marker key.
                Some((key, None)) => {
                    let mut k = keys::object(&bucket, key);
                    k.push(keys::SEP + 1);
                    Bound::Included(k)
                }
                Some((key, Some(id))) => Bound::Excluded(keys::upload(&bucket, key, id)),
            };
            let mut out = Vec::new();
            for item in t.range::<&[u8]>((
                lo.as_ref().map(|v| v.as_slice()),
                Bound::Excluded(hi.as_slice()),
            ))? {
                let (k, v) = item?;
                let Some((key, id)) = keys::split_upload(&bucket, k.value()) else {
                    continue;
                };
                if !key.starts_with(&prefix) {
                    if key > prefix.as_str() {
                        break;
                    }
                    continue;
                }
                if out.len() >= max {
                    break;
                }
                out.push(UploadEntry {
                    key: key.to_string(),
                    upload_id: id.to_string(),
                    record: decode(v.value())?,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Every upload initiated before `before`: (bucket, key, upload id).
    pub async fn uploads_older_than(
        &self,
        before: UnixMillis,
    ) -> Result<Vec<(String, String, String)>> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let buckets: Vec<String> = {
                let t = txn.open_table(BUCKETS)?;
                let mut v = Vec::new();
                for item in t.iter()? {
                    v.push(item?.0.value().to_string());
                }
                v
            };
            let t = txn.open_table(UPLOADS)?;
            let mut out = Vec::new();
            for bucket in buckets {
                let (lo, hi) = keys::bucket_range(&bucket);
                for item in t.range(lo.as_slice()..hi.as_slice())? {
                    let (k, v) = item?;
                    let rec: UploadRecord = decode(v.value())?;
                    if rec.initiated < before
                        && let Some((key, id)) = keys::split_upload(&bucket, k.value())
                    {
                        out.push((bucket.clone(), key.to_string(), id.to_string()));
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// The key record of an access key (from memory; no I/O).
    pub fn key(&self, access_key: &str) -> Option<KeyRecord> {
        self.shared
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(access_key)
            .cloned()
    }

    /// Blocks that lost their last reference before `before`, with the time they were
    /// queued (at most `max`).
    pub async fn gc_candidates(
        &self,
        before: UnixMillis,
        max: usize,
    ) -> Result<Vec<(BlockHash, UnixMillis)>> {
        self.gc_candidates_after(None, before, max).await
    }

    /// As [`Self::gc_candidates`], among the blocks whose address sorts after
    /// `after`: a scan of the whole queue in pages.
    pub async fn gc_candidates_after(
        &self,
        after: Option<BlockHash>,
        before: UnixMillis,
        max: usize,
    ) -> Result<Vec<(BlockHash, UnixMillis)>> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(GC_QUEUE)?;
            let mut out = Vec::new();
            let from = after.map(|h| h.0);
            let range = match &from {
                Some(h) => t.range::<&[u8]>((
                    std::ops::Bound::Excluded(h.as_slice()),
                    std::ops::Bound::Unbounded,
                ))?,
                None => t.iter()?,
            };
            for item in range {
                let (k, v) = item?;
                if v.value() < before
                    && let Ok(h) = <[u8; 32]>::try_from(k.value())
                {
                    out.push((BlockHash(h), v.value()));
                    if out.len() >= max {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// Whether this node is the Raft leader now.
    pub fn is_leader(&self) -> bool {
        let raft = self.raft();
        let m = raft.metrics();
        let m = m.borrow();
        m.current_leader == Some(self.opts.node_id) && m.state == openraft::ServerState::Leader
    }

    /// How many objects and parts name this block. Blocking (used under the block
    /// store's pin lock by garbage collection).
    /// How many records name each block, in one read (blocking: call it on a
    /// blocking thread).
    pub fn refcounts_blocking(&self, hashes: &[BlockHash]) -> Result<Vec<u64>> {
        let txn = self.shared.get()?.begin_read()?;
        let t = txn.open_table(BLOCK_REFS)?;
        hashes
            .iter()
            .map(|h| Ok(t.get(h.0.as_slice())?.map(|v| v.value()).unwrap_or(0)))
            .collect()
    }

    pub fn refcount_blocking(&self, hash: &BlockHash) -> Result<u64> {
        let txn = self.shared.get()?.begin_read()?;
        let t = txn.open_table(BLOCK_REFS)?;
        Ok(t.get(hash.0.as_slice())?.map(|v| v.value()).unwrap_or(0))
    }
}

fn list_in(t: &redb::ReadOnlyTable<&[u8], &[u8]>, bucket: &str, q: &ListQuery) -> Result<ListPage> {
    let (base, hi) = keys::bucket_range(bucket);
    let prefix_key = keys::object(bucket, &q.prefix);
    let delim = q.delimiter.as_deref().filter(|d| !d.is_empty());
    let mut cursor: Bound<Vec<u8>> = Bound::Included(prefix_key.clone());
    if let Some(after) = &q.start_after {
        let k = keys::object(bucket, after);
        if k >= prefix_key {
            cursor = Bound::Excluded(k);
        }
    }
    let mut page = ListPage::default();
    'scan: loop {
        let range = t.range::<&[u8]>((
            cursor.as_ref().map(|v| v.as_slice()),
            Bound::Excluded(hi.as_slice()),
        ))?;
        for item in range {
            let (k, v) = item?;
            let raw = k.value();
            if !raw.starts_with(&prefix_key) {
                break 'scan;
            }
            let Ok(name) = std::str::from_utf8(&raw[base.len()..]) else {
                continue;
            };
            if page.entries.len() >= q.max {
                page.truncated = true;
                break 'scan;
            }
            if let Some(d) = delim
                && let Some(pos) = name[q.prefix.len()..].find(d)
            {
                let cp = &name[..q.prefix.len() + pos + d.len()];
                // A prefix at or before the marker was returned on an earlier page.
                if q.start_after.as_deref().is_none_or(|a| cp > a) {
                    page.entries.push(ListEntry::Prefix(cp.to_string()));
                }
                let mut next = keys::object(bucket, cp);
                next.push(keys::PAST);
                cursor = Bound::Included(next);
                continue 'scan;
            }
            page.entries
                .push(ListEntry::Object(name.to_string(), decode(v.value())?));
        }
        break;
    }
    Ok(page)
}

fn io_error(path: &Path, e: std::io::Error) -> MetaError {
    // `Display` of an io::Error carries "(os error N)".
    MetaError::from_storage(format!("{}: {e}", path.display()))
}

/// Opens the Raft log and state machine over `shared` and starts the Raft node; a
/// new store starts a cluster of one unless `opts.join`.
async fn start_node(shared: Arc<Shared>, path: &Path, opts: &MetaOptions) -> Result<Node> {
    let (log, sm) = open_raft_storage(shared, path).await?;
    let config = openraft::Config {
        cluster_name: "cairn".into(),
        // A leader that stops is replaced within about twice the longest election
        // timeout (followers vote only once their leader's lease has run out):
        // ~1.75 s measured. Heartbeats every 100 ms leave room for scheduling
        // delays on a busy machine before a follower gives up on its leader.
        heartbeat_interval: 100,
        election_timeout_min: 500,
        election_timeout_max: 1000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(opts.snapshot_every.max(1)),
        max_in_snapshot_log_to_keep: opts.log_keep,
        ..Default::default()
    }
    .validate()
    .map_err(|e| MetaError::Storage(format!("Raft configuration: {e}")))?;
    // What the tables hold durably, before anything is applied again.
    let durable = sm.applied();
    let raft = Raft::new(
        opts.node_id,
        Arc::new(config),
        NetNetwork {
            peers: opts.peers.clone(),
        },
        log,
        sm.clone(),
    )
    .await
    .map_err(|e| MetaError::Storage(format!("starting Raft: {e}")))?;
    let me = opts.node_id;
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| MetaError::Storage(format!("Raft: {e}")))?;
    if !initialized && !opts.join {
        let members = BTreeMap::from([(
            me,
            Member {
                rpc: opts.rpc_address.clone(),
                zone: opts.zone.clone(),
            },
        )]);
        raft.initialize(members)
            .await
            .map_err(|e| MetaError::Storage(format!("initializing Raft: {e}")))?;
    }
    // Just initialized, the metrics may not show the membership yet.
    let alone = (!initialized && !opts.join) || {
        let m = raft.metrics().borrow().membership_config.clone();
        let voters: Vec<NodeId> = m.membership().voter_ids().collect();
        voters == [me]
    };
    if alone {
        // A cluster of one need not wait out an election timeout, and serves
        // once it leads and has applied its log.
        if initialized {
            let _ = raft.trigger().elect().await;
        }
        raft.wait(Some(std::time::Duration::from_secs(30)))
            .metrics(
                |m| m.current_leader == Some(me) && m.state == openraft::ServerState::Leader,
                "this node leads its cluster of one",
            )
            .await
            .map_err(|e| MetaError::Storage(format!("waiting for Raft leadership: {e}")))?;
        let last = raft.metrics().borrow().last_log_index;
        raft.wait(Some(std::time::Duration::from_secs(60)))
            .applied_index_at_least(last, "the log is applied")
            .await
            .map_err(|e| MetaError::Storage(format!("applying the Raft log: {e}")))?;
        let applied = raft.metrics().borrow().last_applied;
        if applied.map(|l| l.index) > durable.map(|l| l.index) {
            tracing::info!(
                checkpoint = ?durable.map(|l| l.index),
                applied = ?applied.map(|l| l.index),
                "metadata entries after the last checkpoint applied again from the Raft log"
            );
        }
    }

    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    tokio::spawn(batcher(raft.clone(), opts.node_id, opts.peers.clone(), rx));
    Ok(Node { tx, raft, sm })
}

/// Opens the tables (upgrading a format-2 command log), the Raft log and the
/// state machine.
#[cfg(test)]
pub(crate) async fn open_storage(
    path: &Path,
    opts: &MetaOptions,
) -> Result<(Arc<Shared>, LogStore, StateMachine)> {
    let shared = open_shared(path, opts).await?;
    let (log, sm) = open_raft_storage(shared.clone(), path).await?;
    Ok((shared, log, sm))
}

/// A file or folder moved aside by a restore: where it was, where it is.
type MovedAside = (PathBuf, PathBuf);

/// Replaces the metadata of a stopped node (the tables at `db_path` and the
/// Raft log beside them) with the state a snapshot file holds (`cairn admin
/// snapshot restore`). The node keeps its vote; its log starts after the
/// snapshot. What was there is moved aside (`meta.redb.before-restore-TIME`,
/// `raft.before-restore-TIME`), and put back if the restore fails. Refused,
/// changing nothing, while the node runs (its tables are locked), when the file
/// is damaged, or when the snapshot's cluster does not count `node_id` as a
/// member. What the snapshot holds, and the folder the old metadata went to.
pub async fn restore_snapshot(
    db_path: &Path,
    file: &Path,
    node_id: NodeId,
) -> Result<(crate::raft::state_machine::SnapshotSummary, PathBuf)> {
    use crate::raft::state_machine::{SnapshotSummary, verify_snapshot};
    use openraft::storage::RaftStateMachine;
    let f = file.to_path_buf();
    let meta = tokio::task::spawn_blocking(move || verify_snapshot(&f))
        .await
        .map_err(|e| MetaError::Storage(e.to_string()))?
        .map_err(|e| MetaError::Storage(format!("{}: {e}", file.display())))?;
    let summary = SnapshotSummary::of(&meta);
    if !summary.members.contains(&node_id) {
        return Err(MetaError::Refused(format!(
            "this node ({node_id:016x}) is not a member of the cluster the snapshot is of ({}): restore it on those nodes",
            summary
                .members
                .iter()
                .map(|m| format!("{m:016x}"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let stamp = cairn_types::now_millis();
    let aside = move |p: &Path| -> PathBuf {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        p.with_file_name(format!("{name}.before-restore-{stamp}"))
    };
    // The tables are locked while the node runs: opening them is the check.
    // Then its vote is read, and the old tables and log are moved aside.
    let p = db_path.to_path_buf();
    let (vote, moved) = tokio::task::spawn_blocking(
        move || -> Result<(Option<openraft::Vote<NodeId>>, Vec<MovedAside>)> {
            drop(open_db(&p, 1 << 20).map_err(|e| {
                MetaError::Refused(format!(
                    "cannot open {} ({e}): stop the node first",
                    p.display()
                ))
            })?);
            let raft = raft_dir(&p);
            let vote = match raft.exists() {
                true => LogStore::open(&raft, skip_fsync_for_test())
                    .map_err(|e| MetaError::from_storage(format!("{}: {e}", raft.display())))?
                    .vote(),
                false => None,
            };
            let mut moved = Vec::new();
            for from in [p.clone(), raft].into_iter().filter(|p| p.exists()) {
                let to = aside(&from);
                std::fs::rename(&from, &to).map_err(|e| {
                    MetaError::from_storage(format!("moving {} aside: {e}", from.display()))
                })?;
                moved.push((from, to));
            }
            Ok((vote, moved))
        },
    )
    .await
    .map_err(|e| MetaError::Storage(e.to_string()))??;
    let fresh = async {
        let shared = open_shared(db_path, &MetaOptions::default()).await?;
        let (mut log, mut sm) = open_raft_storage(shared, db_path).await?;
        if let Some(v) = vote {
            log.save_vote(&v)
                .await
                .map_err(|e| MetaError::Storage(e.to_string()))?;
        }
        let mut into = sm
            .begin_receiving_snapshot()
            .await
            .map_err(|e| MetaError::Storage(e.to_string()))?;
        let mut from = tokio::fs::File::open(file)
            .await
            .map_err(|e| MetaError::Storage(format!("{}: {e}", file.display())))?;
        tokio::io::copy(&mut from, &mut *into)
            .await
            .map_err(|e| MetaError::from_storage(e.to_string()))?;
        sm.install_snapshot(&meta, into)
            .await
            .map_err(|e| MetaError::Storage(e.to_string()))?;
        if let Some(last) = meta.last_log_id {
            log.purge(last)
                .await
                .map_err(|e| MetaError::Storage(e.to_string()))?;
        }
        sm.checkpoint().await?;
        Ok::<(), MetaError>(())
    }
    .await;
    if let Err(e) = fresh {
        // Back as it was.
        let p = db_path.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_dir_all(raft_dir(&p));
            for (from, to) in &moved {
                let _ = std::fs::rename(to, from);
            }
        })
        .await;
        return Err(e);
    }
    Ok((summary, aside(db_path)))
}

/// Creates the tables that do not exist yet.
fn create_tables(db: &Database) -> Result<()> {
    let txn = db.begin_write()?;
    txn.open_table(BUCKETS)?;
    txn.open_table(OBJECTS)?;
    txn.open_table(UPLOADS)?;
    txn.open_table(PARTS)?;
    txn.open_table(BLOCK_REFS)?;
    txn.open_table(GC_QUEUE)?;
    txn.open_table(KEYS)?;
    txn.open_table(CLUSTER)?;
    txn.open_table(RAFT_STATE)?;
    txn.commit()?;
    Ok(())
}

/// Deletes every table of metadata (not Raft's own state) in `txn`.
pub(crate) fn delete_data_tables(txn: &redb::WriteTransaction) -> Result<()> {
    for def in [BUCKETS, KEYS, CLUSTER] {
        txn.delete_table(def)?;
    }
    for def in [OBJECTS, UPLOADS, PARTS] {
        txn.delete_table(def)?;
    }
    txn.delete_table(BLOCK_REFS)?;
    txn.delete_table(GC_QUEUE)?;
    Ok(())
}

/// Opens the tables, upgrading a format-2 command log.
async fn open_shared(path: &Path, opts: &MetaOptions) -> Result<Arc<Shared>> {
    let memory = opts.memory;
    let cache_bytes = memory / 4 * 3;
    let db_path = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<Arc<Shared>> {
        let db = open_db(&db_path, cache_bytes)?;
        create_tables(&db)?;
        upgrade_command_log(&db, &db_path)?;
        let shared = Arc::new(Shared {
            path: db_path,
            cache_bytes,
            records: crate::cache::RecordCache::new(memory / 4),
            db: RwLock::new(Some(Arc::new(db))),
            behind: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            fail_commits: std::sync::atomic::AtomicUsize::new(0),
            keys: RwLock::new(Default::default()),
            buckets: RwLock::new(Default::default()),
            layout: tokio::sync::watch::channel(Arc::new(Layout::default())).0,
        });
        shared.reload_caches(&*shared.get()?)?;
        Ok(shared)
    })
    .await
    .map_err(|e| MetaError::Storage(format!("open task failed: {e}")))?
}

/// Opens the Raft log (`raft/` beside the tables) and starts the state machine.
async fn open_raft_storage(shared: Arc<Shared>, path: &Path) -> Result<(LogStore, StateMachine)> {
    let raft_dir = raft_dir(path);
    let rd = raft_dir.clone();
    let mut log = tokio::task::spawn_blocking(move || LogStore::open(&rd, skip_fsync_for_test()))
        .await
        .map_err(|e| MetaError::Storage(format!("open task failed: {e}")))?
        .map_err(|e| MetaError::from_storage(format!("{}: {e}", raft_dir.display())))?;
    // Starting reads the tables and lists the snapshots: off the reactor.
    let (reader, rt) = (
        log.get_log_reader().await,
        tokio::runtime::Handle::current(),
    );
    let snapshots = raft_dir.join("snapshots");
    let sm =
        tokio::task::spawn_blocking(move || StateMachine::start(shared, reader, &snapshots, rt))
            .await
            .map_err(|e| MetaError::Storage(format!("open task failed: {e}")))??;
    Ok((log, sm))
}

/// Takes the commands waiting, proposes them as one Raft entry (on a follower: sends
/// them to the leader, which adds them to its own next entry), and answers each
/// caller with its command's result once the entry is applied. Up to
/// `MAX_IN_FLIGHT` entries (`MAX_FORWARDS_IN_FLIGHT` forwarded batches) are in
/// flight; meanwhile the next batch gathers.
async fn batcher(
    raft: Raft,
    me: NodeId,
    peers: Option<Peers>,
    mut rx: mpsc::Receiver<(Command, Reply)>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let forward_slots = Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let leads = {
            let m = raft.metrics();
            let m = m.borrow();
            m.current_leader == Some(me) || m.current_leader.is_none()
        };
        let sem = if leads { &slots } else { &forward_slots };
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let mut cmds = Vec::new();
        let mut replies = Vec::new();
        let mut bytes = 0usize;
        let mut next = Some(first);
        while let Some((cmd, reply)) = next {
            bytes += cmd.approx_size();
            cmds.push(cmd);
            replies.push(reply);
            next = if cmds.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        metrics::histogram!("cairn_meta_commit_group_size").record(cmds.len() as f64);
        let (raft, peers) = (raft.clone(), peers.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let res = propose(&raft, peers.as_ref(), Request::Commands(cmds)).await;
            metrics::histogram!("cairn_meta_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            drop(permit);
            match res {
                Ok(resp) => {
                    let mut results = resp.0.into_iter();
                    for reply in replies {
                        let _ = reply.send(results.next().unwrap_or(Err(MetaError::Unavailable)));
                    }
                }
                Err(err) => {
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}

/// The leader as this node knows it, waiting a little for one to be known (a node
/// that has just joined, or an election under way).
async fn wait_for_leader(raft: &Raft) -> Option<(NodeId, Member)> {
    let leader = |m: &openraft::RaftMetrics<NodeId, Member>| {
        m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| (l, n.clone()))
        })
    };
    let mut rx = raft.metrics();
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        if let Some(n) = leader(&rx.borrow_and_update()) {
            return Some(n);
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return None;
        }
    }
}

/// The leader a refusal names (id and address), or the one known within
/// `LEADER_WAIT`.
async fn leader_named(
    raft: &Raft,
    f: &openraft::error::ForwardToLeader<NodeId, Member>,
) -> Option<(NodeId, Member)> {
    match (f.leader_id, &f.leader_node) {
        (Some(id), Some(n)) => Some((id, n.clone())),
        _ => wait_for_leader(raft).await,
    }
}

/// How long a request waits for a leader to be known before it fails with 503.
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Proposes an entry: here if this node leads, else through the leader.
async fn propose(raft: &Raft, peers: Option<&Peers>, req: Request) -> Result<Response> {
    use openraft::error::{ClientWriteError, RaftError};
    let mut attempts = 0;
    loop {
        attempts += 1;
        match raft.client_write(req.clone()).await {
            Ok(r) => return Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                let node = leader_named(raft, &f).await;
                let (Some((leader, node)), Some(peers)) = (node, peers) else {
                    return Err(MetaError::Unavailable);
                };
                let body = crate::raft::network::encode(&req).map_err(MetaError::Storage)?;
                let answer = match peers
                    .call_node(leader, &node.rpc, SVC_WRITE, body, FORWARD_TIMEOUT)
                    .await
                {
                    Ok(a) => a,
                    // Not sent at all (the leader this node knows is gone, or
                    // another node answers at its address): once another is
                    // elected, send it there.
                    Err(
                        cairn_net::RpcError::Connect { .. } | cairn_net::RpcError::WrongNode { .. },
                    ) if attempts < 3 && f.leader_id.is_some() => {
                        if !wait_for_other_leader(raft, f.leader_id).await {
                            return Err(MetaError::Unavailable);
                        }
                        continue;
                    }
                    // An error here may come after the leader committed the entry:
                    // the caller cannot tell, as with any write whose answer was lost.
                    Err(e) => {
                        tracing::warn!(leader = %node.rpc, error = %e, "forwarding a metadata write failed");
                        return Err(MetaError::Unavailable);
                    }
                };
                let res: std::result::Result<Response, String> =
                    crate::raft::network::decode(&answer).map_err(MetaError::Storage)?;
                return res.map_err(|e| {
                    tracing::warn!(error = %e, "the leader did not commit a forwarded write");
                    MetaError::Unavailable
                });
            }
            Err(RaftError::Fatal(e)) => {
                tracing::error!(error = %e, "the metadata Raft node stopped");
                return Err(MetaError::Closed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "a metadata write was not committed");
                return Err(MetaError::Unavailable);
            }
        }
    }
}

/// Waits (up to `LEADER_WAIT`) for a leader other than `failed`; whether one came.
async fn wait_for_other_leader(raft: &Raft, failed: Option<NodeId>) -> bool {
    let mut rx = raft.metrics();
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        {
            let m = rx.borrow_and_update();
            if m.current_leader.is_some() && m.current_leader != failed {
                return true;
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return false;
        }
    }
}

/// Log entries between two snapshots, by default. A snapshot writes every table row
/// to a file, so it is taken rarely; the log keeps the entries since (at ~100 bytes
/// to a few KiB each).
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 50_000;
/// Log entries kept behind a snapshot, by default.
pub const DEFAULT_LOG_KEEP: u64 = 1000;

/// Where the Raft log and snapshots live: `raft/` beside the database file.
fn raft_dir(db_path: &Path) -> PathBuf {
    db_path.with_file_name("raft")
}

/// Data directory format 2 kept changes in a command log (`meta.log`) until they
/// were checkpointed: apply what the database lacks, durably, and remove the log.
fn upgrade_command_log(db: &Database, db_path: &Path) -> Result<()> {
    let lpath = log_path(db_path);
    if !lpath.exists() {
        return Ok(());
    }
    let applied = read_applied(db)?;
    let records = crate::log::read_until(&lpath, u64::MAX).map_err(|e| io_error(&lpath, e))?;
    let n = replay(db, &records, applied)?.len();
    checkpoint(db)?;
    std::fs::remove_file(&lpath).map_err(|e| io_error(&lpath, e))?;
    tracing::info!(
        commands = n,
        "metadata command log of data directory format 2 applied and removed"
    );
    Ok(())
}

/// See `cairn_blocks::unsafe_test_skip_fsync`: the power-cut test's hook (`meta`).
fn skip_fsync_for_test() -> bool {
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SKIP.get_or_init(|| {
        std::env::var("CAIRN_UNSAFE_TEST_SKIP_FSYNC")
            .is_ok_and(|v| v.split(',').any(|s| s == "meta"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::CommandLog;

    fn bucket(name: &str) -> Vec<u8> {
        crate::records::encode(&Command::CreateBucket {
            bucket: name.into(),
            now: 1,
        })
        .unwrap()
    }

    /// Opens `path`, waiting while an earlier store of it is still closing.
    pub(crate) async fn reopen(path: &Path) -> MetaStore {
        let mut tries = 0;
        loop {
            match MetaStore::open(path).await {
                Ok(s) => return s,
                Err(_) if tries < 200 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_format_2_command_log_is_applied_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("meta.redb");
        // As a format-2 directory after a crash: the log holds commands the
        // database file never got.
        let (mut log, _) = CommandLog::open(&log_path(&path), 0, true).unwrap();
        log.append(&[bucket("a"), bucket("b")]).unwrap();
        drop(log);
        let s = MetaStore::open(&path).await.unwrap();
        assert!(s.bucket("a").is_some() && s.bucket("b").is_some());
        assert!(!log_path(&path).exists());
        s.apply(Command::CreateBucket {
            bucket: "c".into(),
            now: 1,
        })
        .await
        .unwrap();
        s.close().await.unwrap();
        drop(s);
        let s = reopen(&path).await;
        assert_eq!(s.buckets().len(), 3);
    }

    /// A store stopped without its closing checkpoint comes back whole, and a
    /// failed command fails again when applied again. (Dropping closes the redb
    /// file cleanly, so the log may have nothing to add here: the crash case, where
    /// it must, is `kill9_loses_no_acknowledged_write` in the server's tests.)
    #[tokio::test]
    async fn a_store_stopped_without_closing_comes_back_whole() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("meta.redb");
        let s = MetaStore::open(&path).await.unwrap();
        for i in 0..20 {
            s.apply(Command::CreateBucket {
                bucket: format!("b{i}"),
                now: 1,
            })
            .await
            .unwrap();
        }
        // A failing command is in the log too, and fails again when applied again.
        assert!(matches!(
            s.apply(Command::CreateBucket {
                bucket: "b0".into(),
                now: 1,
            })
            .await,
            Err(MetaError::BucketAlreadyOwnedByYou)
        ));
        let applied = s.node().sm.applied().unwrap().index;
        // Stop Raft without `close` and its checkpoint.
        s.raft().shutdown().await.unwrap();
        drop(s);
        let s = reopen(&path).await;
        assert_eq!(s.buckets().len(), 20);
        assert!(s.node().sm.applied().unwrap().index >= applied);
        s.apply(Command::CreateBucket {
            bucket: "next".into(),
            now: 1,
        })
        .await
        .unwrap();
        assert_eq!(s.buckets().len(), 21);
    }

    /// When a checkpoint fails (a full disk) and so do the first tries to open the
    /// database again, reads answer `Unavailable` (never an older state), the
    /// apply thread tries again at its ticks, and the object applied before the
    /// failure is read back once it succeeds. (`cairn chaos` with disk faults found
    /// a reopened database read at its last checkpoint, before the entries after it
    /// were applied again.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_wait_out_a_failed_checkpoint_and_its_recovery() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("meta.redb");
        let s = MetaStore::open(&path).await.unwrap();
        s.apply(Command::CreateBucket {
            bucket: "b".into(),
            now: 1,
        })
        .await
        .unwrap();
        s.checkpoint().await.unwrap();
        let rec = crate::ObjectRecord {
            size: 1,
            etag: "e".into(),
            last_modified: 1,
            headers: Default::default(),
            checksums: Default::default(),
            parts_count: None,
            data: crate::ObjectData::Inline(b"x".to_vec()),
        };
        s.apply(Command::PutObject {
            bucket: "b".into(),
            key: "k".into(),
            record: rec,
            cond: crate::WriteCondition::None,
        })
        .await
        .unwrap();
        assert!(s.object("b", "k").await.unwrap().is_some());
        // The checkpoint fails, and so do the next two tries to open the database.
        s.shared
            .fail_commits
            .store(3, std::sync::atomic::Ordering::SeqCst);
        assert!(s.checkpoint().await.is_err());
        let started = std::time::Instant::now();
        let mut unavailable = 0;
        loop {
            match s.object("b", "k").await {
                Ok(Some(_)) => break,
                Ok(None) => panic!("the object is read as missing after a failed checkpoint"),
                Err(MetaError::Unavailable) => unavailable += 1,
                Err(e) => panic!("{e}"),
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "the database never recovered"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(unavailable > 0, "no read saw the recovery");
        assert_eq!(
            s.shared
                .fail_commits
                .load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        s.checkpoint().await.unwrap();
    }

    /// A snapshot built while the disk is full waits for space and is then built,
    /// instead of failing (openraft stops a node whose snapshot fails: found by
    /// `cairn chaos` with disk faults, a node's metadata stopped for good).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_waits_out_a_full_disk() {
        use openraft::RaftSnapshotBuilder;
        use openraft::storage::RaftStateMachine;
        let d = tempfile::tempdir().unwrap();
        let s = MetaStore::open(&d.path().join("meta.redb")).await.unwrap();
        for i in 0..5 {
            s.apply(Command::CreateBucket {
                bucket: format!("b{i}"),
                now: i,
            })
            .await
            .unwrap();
        }
        // The snapshot's checkpoint fails, and so do the next two reopens.
        s.shared
            .fail_commits
            .store(3, std::sync::atomic::Ordering::SeqCst);
        let mut sm = s.node().sm.clone();
        let snap = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            sm.get_snapshot_builder().await.build_snapshot().await
        })
        .await
        .expect("the snapshot never got built")
        .expect("the snapshot failed instead of waiting for space");
        assert_eq!(snap.meta.last_log_id, s.node().sm.applied());
        assert_eq!(
            s.shared
                .fail_commits
                .load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        s.apply(Command::CreateBucket {
            bucket: "after".into(),
            now: 9,
        })
        .await
        .unwrap();
        assert_eq!(s.buckets().len(), 6);
    }

    /// Concurrent commands share entries: fewer entries than commands.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commands_are_batched_into_entries() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("meta.redb");
        let s = MetaStore::open(&path).await.unwrap();
        let before = s.node().sm.applied().unwrap().index;
        let mut tasks = Vec::new();
        for i in 0..400 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.apply(Command::CreateBucket {
                    bucket: format!("b{i}"),
                    now: 1,
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(s.buckets().len(), 400);
        let entries = s.node().sm.applied().unwrap().index - before;
        assert!(entries < 400, "{entries} entries for 400 commands");
    }

    /// A snapshot is a file of every row; a store built from it alone (as a node
    /// that installs it) has the same tables.
    #[tokio::test]
    async fn snapshots_build_and_install() {
        use openraft::RaftSnapshotBuilder;
        use openraft::storage::RaftStateMachine;
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("meta.redb");
        let s = MetaStore::open(&path).await.unwrap();
        for i in 0..50 {
            s.apply(Command::CreateBucket {
                bucket: format!("b{i:02}"),
                now: i,
            })
            .await
            .unwrap();
        }
        let mut sm = s.node().sm.clone();
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, s.node().sm.applied());

        let d2 = tempfile::tempdir().unwrap();
        let other = MetaStore::open(&d2.path().join("meta.redb")).await.unwrap();
        let mut sm2 = other.node().sm.clone();
        let mut incoming = sm2.begin_receiving_snapshot().await.unwrap();
        let mut src = snap.snapshot;
        tokio::io::copy(&mut src, &mut *incoming).await.unwrap();
        sm2.install_snapshot(&snap.meta, incoming).await.unwrap();
        assert_eq!(other.buckets(), s.buckets());
        assert_eq!(other.node().sm.applied(), s.node().sm.applied());
        // A damaged snapshot is refused and changes nothing.
        let mut bad = sm2.begin_receiving_snapshot().await.unwrap();
        let mut meta = snap.meta.clone();
        meta.snapshot_id = "damaged".into();
        tokio::io::AsyncWriteExt::write_all(&mut *bad, b"CAIRNSNP garbage")
            .await
            .unwrap();
        assert!(sm2.install_snapshot(&meta, bad).await.is_err());
        assert_eq!(other.buckets().len(), 50);
    }
}
