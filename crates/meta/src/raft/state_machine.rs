//! The state machine: the redb tables, changed only by applying committed entries.
//!
//! One thread (`meta-apply`) applies each batch of entries openraft hands over in
//! one redb transaction committed without an fsync (readers see it at once); a
//! checkpoint (a durable commit) every `CHECKPOINT_BYTES` of entries or
//! `CHECKPOINT_INTERVAL` makes the tables durable in bulk. The Raft log keeps every
//! entry after the last checkpoint: a snapshot starts with a checkpoint, and the
//! log is purged only up to a snapshot. After a crash the tables are at their last
//! checkpoint and openraft applies the entries after it again once they are
//! committed anew. After a redb I/O error (a full disk), the database is reopened
//! and the entries since its checkpoint are applied again from the log, until it
//! works.
//!
//! Snapshots are files (`snapshots/*.snap`): a header with the snapshot's meta, then
//! every table row, then a CRC-64 of everything before it. They are written and read
//! as streams: memory stays bounded whatever the metadata size.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, RaftLogReader, RaftSnapshotBuilder, StorageError, StorageIOError,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::log_store::LogReader;
use super::{Entry, LogId, NodeId, Request, Response, SnapshotMeta, StoredMembership, TypeConfig};
use crate::store::{
    BLOCK_REFS, BUCKETS, CLUSTER, GC_QUEUE, KEYS, OBJECTS, PARTS, Shared, UPLOADS, changed_object,
    checkpoint,
};
use crate::{MetaError, Result};

/// Raft's own state in the tables: `applied` (the last applied log id) and
/// `membership` (the last applied membership), each postcard-encoded.
pub(crate) const RAFT_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");

/// A checkpoint is due once this many bytes of entries were applied since the last…
const CHECKPOINT_BYTES: u64 = 8 << 20;
/// …or once this long has passed with entries applied since.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// After a failed checkpoint or recovery, the next attempt waits this long.
const RETRY: Duration = Duration::from_secs(1);

const SNAP_MAGIC: &[u8; 8] = b"CAIRNSNP";
/// Version of the snapshot file format. A binary refuses a newer one.
pub const SNAPSHOT_VERSION: u32 = 1;
const END_OF_ROWS: u8 = 0xFF;

type SResult<T> = std::result::Result<T, StorageError<NodeId>>;

fn sm_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

fn snap_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, AnyError::error(e.to_string())).into()
}

enum Job {
    Apply(Vec<Entry>, oneshot::Sender<Vec<Response>>),
    /// A durable checkpoint, then a read transaction at it, for a snapshot.
    BeginSnapshot(
        oneshot::Sender<Result<(redb::ReadTransaction, Option<LogId>, StoredMembership)>>,
    ),
    /// Replace the tables with a snapshot file's rows.
    Install(PathBuf, SnapshotMeta, oneshot::Sender<Result<()>>),
    Checkpoint(oneshot::Sender<Result<()>>),
    Tick,
}

/// What openraft and the store see of the state machine.
struct SmShared {
    applied: Mutex<(Option<LogId>, StoredMembership)>,
    snapshot_dir: PathBuf,
    /// The newest complete snapshot file.
    current: Mutex<Option<(SnapshotMeta, PathBuf)>>,
    /// Snapshot files being received.
    incoming: Mutex<Vec<PathBuf>>,
}

/// openraft's state machine over the metadata tables.
#[derive(Clone)]
pub struct StateMachine {
    sm: Arc<SmShared>,
    jobs: tokio::sync::mpsc::Sender<Job>,
    /// Held by handles only: the ticker stops once the last handle is gone (the
    /// apply thread then sees its queue close, checkpoints and ends).
    _alive: Arc<()>,
}

/// Reads Raft's state from the tables.
pub(crate) fn read_raft_state(db: &Database) -> Result<(Option<LogId>, StoredMembership)> {
    let txn = db.begin_read()?;
    let t = match txn.open_table(RAFT_STATE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((None, Default::default())),
        Err(e) => return Err(e.into()),
    };
    let applied = match t.get("applied")? {
        Some(v) => crate::records::decode(v.value())?,
        None => None,
    };
    let membership = match t.get("membership")? {
        Some(v) => crate::records::decode(v.value())?,
        None => Default::default(),
    };
    Ok((applied, membership))
}

impl StateMachine {
    /// Starts the apply thread over the open store. `log` is used to apply entries
    /// again after an I/O error; `rt` runs its reads.
    pub(crate) fn start(
        shared: Arc<Shared>,
        log: LogReader,
        snapshot_dir: &Path,
        rt: tokio::runtime::Handle,
    ) -> Result<StateMachine> {
        std::fs::create_dir_all(snapshot_dir)
            .map_err(|e| MetaError::from_storage(format!("{}: {e}", snapshot_dir.display())))?;
        let (applied, membership) = read_raft_state(&*shared.get()?)?;
        let current = find_current_snapshot(snapshot_dir);
        let sm = Arc::new(SmShared {
            applied: Mutex::new((applied, membership.clone())),
            snapshot_dir: snapshot_dir.to_path_buf(),
            current: Mutex::new(current),
            incoming: Mutex::new(Vec::new()),
        });
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let applier = Applier {
            shared,
            sm: sm.clone(),
            log,
            rt,
            applied,
            membership,
            durable: applied,
            owed: None,
            last_checkpoint: Instant::now(),
            bytes_since: 0,
        };
        std::thread::Builder::new()
            .name("meta-apply".into())
            .spawn(move || applier.run(rx))
            .map_err(|e| MetaError::Storage(format!("spawn apply thread: {e}")))?;
        let alive = Arc::new(());
        let weak = Arc::downgrade(&alive);
        let ticks = tx.clone();
        std::thread::Builder::new()
            .name("meta-ticker".into())
            .spawn(move || {
                while weak.strong_count() > 0 {
                    std::thread::sleep(Duration::from_secs(1));
                    let _ = ticks.try_send(Job::Tick);
                }
            })
            .map_err(|e| MetaError::Storage(format!("spawn ticker thread: {e}")))?;
        Ok(StateMachine {
            sm,
            jobs: tx,
            _alive: alive,
        })
    }

    async fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce(oneshot::Sender<T>) -> Job,
    ) -> std::result::Result<T, MetaError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(job(tx))
            .await
            .map_err(|_| MetaError::Closed)?;
        rx.await.map_err(|_| MetaError::Closed)
    }

    /// How many handles of this state machine exist (this one included).
    pub(crate) fn handles(&self) -> usize {
        Arc::strong_count(&self._alive)
    }

    /// Makes everything applied so far durable (called at shutdown).
    pub async fn checkpoint(&self) -> Result<()> {
        self.call(Job::Checkpoint).await?
    }

    /// The last applied log id.
    pub fn applied(&self) -> Option<LogId> {
        self.sm.applied.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

/// The newest readable snapshot file in `dir`; others and leftovers are removed.
fn find_current_snapshot(dir: &Path) -> Option<(SnapshotMeta, PathBuf)> {
    let mut best: Option<(SnapshotMeta, PathBuf)> = None;
    let entries = std::fs::read_dir(dir).ok()?;
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "snap") {
            match read_snapshot_meta(&path) {
                Ok(meta) => {
                    if best
                        .as_ref()
                        .is_none_or(|(b, _)| b.last_log_id < meta.last_log_id)
                    {
                        if let Some((_, old)) = best.take() {
                            let _ = std::fs::remove_file(old);
                        }
                        best = Some((meta, path));
                    } else {
                        let _ = std::fs::remove_file(&path);
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable snapshot");
                }
            }
        } else if path.extension().is_some_and(|x| x == "tmp") {
            let _ = std::fs::remove_file(&path);
        }
    }
    best
}

/// The meta in a snapshot file's header.
fn read_snapshot_meta(path: &Path) -> io::Result<SnapshotMeta> {
    let mut r = BufReader::new(std::fs::File::open(path)?);
    read_header(&mut r)
}

fn read_header(r: &mut impl Read) -> io::Result<SnapshotMeta> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut h = [0u8; 16];
    r.read_exact(&mut h)?;
    if &h[..8] != SNAP_MAGIC {
        return Err(bad("not a snapshot file".into()));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version > SNAPSHOT_VERSION {
        return Err(bad(format!(
            "snapshot format {version} is newer than this binary's ({SNAPSHOT_VERSION})"
        )));
    }
    let len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as usize;
    if len > 16 << 20 {
        return Err(bad("snapshot header too large".into()));
    }
    let mut meta = vec![0u8; len];
    r.read_exact(&mut meta)?;
    crate::records::decode(&meta).map_err(|e| bad(format!("snapshot header: {e}")))
}

/// A writer that keeps a CRC-64 of what passes through.
struct Crc<W> {
    inner: W,
    digest: crc_fast::Digest,
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that keeps a CRC-64 of what passes through.
struct CrcRead<R> {
    inner: R,
    digest: crc_fast::Digest,
}

impl<R: Read> Read for CrcRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }
}

/// The tables a snapshot holds, with their ids in the file.
const TABLE_IDS: [(u8, &str); 8] = [
    (1, "buckets"),
    (2, "objects"),
    (3, "uploads"),
    (4, "parts"),
    (5, "block_refs"),
    (6, "gc_queue"),
    (7, "keys"),
    (8, "cluster"),
];

fn put_row(w: &mut impl Write, table: u8, key: &[u8], value: &[u8]) -> io::Result<()> {
    w.write_all(&[table])?;
    w.write_all(&(key.len() as u32).to_le_bytes())?;
    w.write_all(key)?;
    w.write_all(&(value.len() as u32).to_le_bytes())?;
    w.write_all(value)
}

/// Writes a snapshot of `txn` to `path` (temporary name, fsync, rename).
fn write_snapshot(txn: &redb::ReadTransaction, meta: &SnapshotMeta, path: &Path) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let res = (|| -> Result<()> {
        let io = |e: io::Error| MetaError::from_storage(format!("{}: {e}", tmp.display()));
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = Crc {
            inner: BufWriter::with_capacity(1 << 20, file),
            digest: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme),
        };
        let meta_bytes = crate::records::encode(meta)?;
        w.write_all(SNAP_MAGIC).map_err(io)?;
        w.write_all(&SNAPSHOT_VERSION.to_le_bytes()).map_err(io)?;
        w.write_all(&(meta_bytes.len() as u32).to_le_bytes())
            .map_err(io)?;
        w.write_all(&meta_bytes).map_err(io)?;
        for item in txn.open_table(BUCKETS)?.iter()? {
            let (k, v) = item?;
            put_row(&mut w, 1, k.value().as_bytes(), v.value()).map_err(io)?;
        }
        for (id, def) in [(2u8, OBJECTS), (3, UPLOADS), (4, PARTS)] {
            for item in txn.open_table(def)?.iter()? {
                let (k, v) = item?;
                put_row(&mut w, id, k.value(), v.value()).map_err(io)?;
            }
        }
        for item in txn.open_table(BLOCK_REFS)?.iter()? {
            let (k, v) = item?;
            put_row(&mut w, 5, k.value(), &v.value().to_le_bytes()).map_err(io)?;
        }
        for item in txn.open_table(GC_QUEUE)?.iter()? {
            let (k, v) = item?;
            put_row(&mut w, 6, k.value(), &v.value().to_le_bytes()).map_err(io)?;
        }
        for item in txn.open_table(KEYS)?.iter()? {
            let (k, v) = item?;
            put_row(&mut w, 7, k.value().as_bytes(), v.value()).map_err(io)?;
        }
        for item in txn.open_table(CLUSTER)?.iter()? {
            let (k, v) = item?;
            put_row(&mut w, 8, k.value().as_bytes(), v.value()).map_err(io)?;
        }
        w.write_all(&[END_OF_ROWS]).map_err(io)?;
        let crc = w.digest.finalize();
        let mut inner = w.inner;
        inner.write_all(&crc.to_le_bytes()).map_err(io)?;
        let file = inner.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Checks a snapshot file whole (header, rows, checksum) without loading it.
pub(crate) fn verify_snapshot(path: &Path) -> io::Result<SnapshotMeta> {
    let mut rows = SnapshotRows::open(path)?;
    while rows.next_row()?.is_some() {}
    Ok(rows.meta)
}

/// One row of a snapshot: table id, key, value.
type Row<'a> = (u8, &'a [u8], &'a [u8]);

/// Reads a snapshot file's rows in order, checking the checksum at the end.
struct SnapshotRows {
    r: CrcRead<BufReader<std::fs::File>>,
    meta: SnapshotMeta,
    key: Vec<u8>,
    value: Vec<u8>,
}

impl SnapshotRows {
    fn open(path: &Path) -> io::Result<SnapshotRows> {
        let mut r = CrcRead {
            inner: BufReader::with_capacity(1 << 20, std::fs::File::open(path)?),
            digest: crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme),
        };
        let meta = read_header(&mut r)?;
        Ok(SnapshotRows {
            r,
            meta,
            key: Vec::new(),
            value: Vec::new(),
        })
    }

    /// The next row (table id, key, value), or `None` after the last one once the
    /// checksum matched.
    fn next_row(&mut self) -> io::Result<Option<Row<'_>>> {
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("snapshot: {m}"));
        let mut t = [0u8; 1];
        self.r.read_exact(&mut t)?;
        if t[0] == END_OF_ROWS {
            let expect = self.r.digest.finalize();
            let mut crc = [0u8; 8];
            self.r.inner.read_exact(&mut crc)?;
            if u64::from_le_bytes(crc) != expect {
                return Err(bad("checksum mismatch"));
            }
            return Ok(None);
        }
        if !TABLE_IDS.iter().any(|(id, _)| *id == t[0]) {
            return Err(bad("unknown table"));
        }
        for buf in [&mut self.key, &mut self.value] {
            let mut l = [0u8; 4];
            self.r.read_exact(&mut l)?;
            let len = u32::from_le_bytes(l) as usize;
            if len > 64 << 20 {
                return Err(bad("row too large"));
            }
            buf.resize(len, 0);
            self.r.read_exact(buf)?;
        }
        Ok(Some((t[0], &self.key, &self.value)))
    }
}

/// Replaces every table's rows with the snapshot's, and Raft's state with its
/// meta, in one durable transaction.
fn load_snapshot(db: &Database, path: &Path, meta: &SnapshotMeta) -> Result<()> {
    let io = |e: io::Error| MetaError::from_storage(format!("{}: {e}", path.display()));
    let mut rows = SnapshotRows::open(path).map_err(io)?;
    let txn = db.begin_write()?;
    {
        crate::store::delete_data_tables(&txn)?;
        let mut buckets = txn.open_table(BUCKETS)?;
        let mut objects = txn.open_table(OBJECTS)?;
        let mut uploads = txn.open_table(UPLOADS)?;
        let mut parts = txn.open_table(PARTS)?;
        let mut refs = txn.open_table(BLOCK_REFS)?;
        let mut gc = txn.open_table(GC_QUEUE)?;
        let mut keys = txn.open_table(KEYS)?;
        let mut cluster = txn.open_table(CLUSTER)?;
        let text = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_string)
                .map_err(|_| MetaError::Encoding("snapshot: a name is not UTF-8".into()))
        };
        let num = |b: &[u8]| {
            <[u8; 8]>::try_from(b).map_err(|_| MetaError::Encoding("snapshot: bad number".into()))
        };
        while let Some((t, k, v)) = rows.next_row().map_err(io)? {
            match t {
                1 => {
                    buckets.insert(text(k)?.as_str(), v)?;
                }
                2 => {
                    objects.insert(k, v)?;
                }
                3 => {
                    uploads.insert(k, v)?;
                }
                4 => {
                    parts.insert(k, v)?;
                }
                5 => {
                    refs.insert(k, u64::from_le_bytes(num(v)?))?;
                }
                6 => {
                    gc.insert(k, i64::from_le_bytes(num(v)?))?;
                }
                7 => {
                    keys.insert(text(k)?.as_str(), v)?;
                }
                _ => {
                    cluster.insert(text(k)?.as_str(), v)?;
                }
            }
        }
        let mut st = txn.open_table(RAFT_STATE)?;
        st.insert(
            "applied",
            crate::records::encode(&meta.last_log_id)?.as_slice(),
        )?;
        st.insert(
            "membership",
            crate::records::encode(&meta.last_membership)?.as_slice(),
        )?;
    }
    txn.commit()?;
    Ok(())
}

/// Roughly how many bytes an entry holds (for checkpoint pacing).
fn entry_size(e: &Entry) -> u64 {
    match &e.payload {
        EntryPayload::Normal(Request::Commands(cmds)) => {
            cmds.iter().map(|c| c.approx_size() as u64).sum()
        }
        _ => 64,
    }
}

/// The apply thread's state.
struct Applier {
    shared: Arc<Shared>,
    sm: Arc<SmShared>,
    log: LogReader,
    rt: tokio::runtime::Handle,
    applied: Option<LogId>,
    membership: StoredMembership,
    /// The last applied log id the database file holds durably.
    durable: Option<LogId>,
    /// After an I/O error: the last entry applied before it, which the reopened
    /// database (back at its checkpoint) must get again before it applies or
    /// serves anything else.
    owed: Option<LogId>,
    last_checkpoint: Instant,
    bytes_since: u64,
}

impl Applier {
    fn run(mut self, mut rx: tokio::sync::mpsc::Receiver<Job>) {
        while let Some(job) = rx.blocking_recv() {
            match job {
                Job::Apply(entries, reply) => {
                    let started = std::time::Instant::now();
                    let responses = self.apply_until_done(&entries);
                    metrics::histogram!("cairn_meta_apply_seconds")
                        .record(started.elapsed().as_secs_f64());
                    let _ = reply.send(responses);
                    self.maybe_checkpoint(false);
                }
                Job::BeginSnapshot(reply) => {
                    let res = self.checkpoint().and_then(|()| {
                        let txn = self.shared.get()?.begin_read()?;
                        Ok((txn, self.applied, self.membership.clone()))
                    });
                    let _ = reply.send(res);
                }
                Job::Install(path, meta, reply) => {
                    let res = self.install(&path, &meta);
                    let _ = reply.send(res);
                }
                Job::Checkpoint(reply) => {
                    let _ = reply.send(self.checkpoint());
                }
                Job::Tick => {
                    if self.owed.is_some() {
                        // Readers wait on it: tried again at each tick.
                        if let Err(e) = self.recover() {
                            tracing::warn!(error = %e, "recovering the metadata database failed; retrying");
                        }
                    } else {
                        self.maybe_checkpoint(false);
                    }
                }
            }
        }
        // No checkpoint on the way out: `MetaStore::close` makes one; after a drop
        // without it, the next open applies the log again, as after a crash.
    }

    fn publish(&self) {
        *self.sm.applied.lock().unwrap_or_else(|p| p.into_inner()) =
            (self.applied, self.membership.clone());
    }

    /// Applies `entries`; on a storage error, recovers and tries again until it
    /// works (committed entries cannot be skipped).
    fn apply_until_done(&mut self, entries: &[Entry]) -> Vec<Response> {
        // Entries are applied in order: what an I/O error undid comes first.
        self.recover_until_done();
        loop {
            match self.try_apply(entries, true) {
                Ok(r) => return r,
                Err(e) => {
                    tracing::error!(error = %e, "applying metadata entries failed; recovering and retrying");
                    while let Err(e) = self.recover() {
                        tracing::error!(error = %e, "recovering the metadata database failed; retrying");
                        std::thread::sleep(RETRY);
                    }
                }
            }
        }
    }

    /// Recovers (see [`Applier::recover`]) until the database holds every entry
    /// applied before an I/O error.
    fn recover_until_done(&mut self) {
        while self.owed.is_some() {
            if let Err(e) = self.recover() {
                tracing::error!(error = %e, "recovering the metadata database failed; retrying");
                std::thread::sleep(RETRY);
            }
        }
    }

    /// Applies entries in one transaction committed without an fsync.
    fn try_apply(&mut self, entries: &[Entry], answer: bool) -> Result<Vec<Response>> {
        let Some(last) = entries.last() else {
            return Ok(Vec::new());
        };
        let db = self.shared.get_even_behind()?;
        let mut txn = db.begin_write()?;
        let _ = txn.set_durability(redb::Durability::None);
        let mut responses = Vec::with_capacity(entries.len());
        let mut membership = None;
        let mut changed = Vec::new();
        let mut committed = Vec::new();
        {
            let mut tables = crate::apply::Tables::open(&txn)?;
            for e in entries {
                let mut results = Vec::new();
                match &e.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(Request::Commands(cmds)) => {
                        for cmd in cmds {
                            let res = crate::apply::apply(&mut tables, cmd);
                            // A storage error may leave the transaction half-changed:
                            // drop it all.
                            if let Err(e @ (MetaError::Storage(_) | MetaError::NoSpace(_))) = &res {
                                return Err(e.clone());
                            }
                            if res.is_ok() {
                                changed.extend(changed_object(cmd));
                                committed.push(cmd);
                            }
                            if answer {
                                results.push(res);
                            }
                        }
                    }
                    EntryPayload::Membership(m) => {
                        membership = Some(StoredMembership::new(Some(e.log_id), m.clone()));
                    }
                }
                self.bytes_since += entry_size(e);
                responses.push(Response(results));
            }
            let mut st = txn.open_table(RAFT_STATE)?;
            st.insert(
                "applied",
                crate::records::encode(&Some(last.log_id))?.as_slice(),
            )?;
            if let Some(m) = &membership {
                st.insert("membership", crate::records::encode(m)?.as_slice())?;
            }
        }
        self.shared.commit_allowed()?;
        let records = &self.shared.records;
        records.begin_change(changed.iter().map(|k| k.as_slice()));
        let res = txn.commit();
        records.end_change(changed.iter().map(|k| k.as_slice()));
        res?;
        let layout_changed = committed.iter().any(|c| c.is_layout());
        for cmd in committed {
            self.shared.note_committed(cmd);
        }
        if layout_changed {
            self.shared.reload_layout(&db)?;
        }
        self.applied = Some(last.log_id);
        if let Some(m) = membership {
            self.membership = m;
        }
        self.publish();
        Ok(responses)
    }

    /// Reopens the database (it reverts to its last checkpoint) and applies again the
    /// entries after it, up to the last one applied.
    /// Until it succeeds the database is marked behind (readers get `Unavailable`),
    /// and nothing new is applied.
    fn recover(&mut self) -> Result<()> {
        self.shared.set_behind(true);
        if self
            .owed
            .is_none_or(|o| self.applied.is_some_and(|a| a > o))
        {
            self.owed = self.applied;
        }
        self.shared.records.clear();
        self.shared.reopen()?;
        let db = self.shared.get_even_behind()?;
        let (durable, membership) = read_raft_state(&db)?;
        let target = self.owed;
        self.applied = durable;
        self.membership = membership;
        self.durable = durable;
        let start = durable.map_or(0, |l| l.index + 1);
        if let Some(target) = target {
            let mut reader = self.log.clone();
            let mut at = start;
            while at <= target.index {
                let end = (at + 256).min(target.index + 1);
                let entries = self
                    .rt
                    .block_on(reader.try_get_log_entries(at..end))
                    .map_err(|e| MetaError::Storage(format!("reading the Raft log: {e}")))?;
                if entries.len() as u64 != end - at {
                    return Err(MetaError::Storage(format!(
                        "the Raft log lacks entries {at}..{end} that the database needs again"
                    )));
                }
                self.try_apply(&entries, false)?;
                at = end;
            }
        }
        self.shared.records.clear();
        self.shared.reload_caches(&db)?;
        self.owed = None;
        self.shared.set_behind(false);
        tracing::info!(applied = ?self.applied, "metadata database recovered from the Raft log");
        Ok(())
    }

    fn maybe_checkpoint(&mut self, force: bool) {
        let due = self.applied != self.durable
            && (self.bytes_since >= CHECKPOINT_BYTES
                || self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL);
        if (due || force) && self.checkpoint().is_err() {
            // Try again later; the log keeps every entry since the last one.
            self.last_checkpoint = Instant::now() - CHECKPOINT_INTERVAL + RETRY;
        }
    }

    fn checkpoint(&mut self) -> Result<()> {
        if self.owed.is_some() {
            self.recover()?;
        }
        if self.applied == self.durable {
            return Ok(());
        }
        let started = Instant::now();
        let res = self
            .shared
            .get()
            .and_then(|db| self.shared.commit_allowed().and_then(|()| checkpoint(&db)));
        metrics::histogram!("cairn_meta_checkpoint_seconds")
            .record(started.elapsed().as_secs_f64());
        match &res {
            Ok(()) => {
                self.durable = self.applied;
                self.bytes_since = 0;
                self.last_checkpoint = Instant::now();
            }
            Err(e) => {
                tracing::warn!(error = %e, "metadata checkpoint failed; the Raft log keeps every entry since the last one");
                let _ = self.recover();
            }
        }
        res
    }

    fn install(&mut self, path: &Path, meta: &SnapshotMeta) -> Result<()> {
        self.shared.records.clear();
        let db = self.shared.get()?;
        load_snapshot(&db, path, meta)?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.durable = self.applied;
        self.shared.records.clear();
        self.shared.reload_caches(&db)?;
        self.publish();
        Ok(())
    }
}

/// Builds a snapshot of the state machine as it is when asked.
pub struct SnapshotBuilder {
    sm: StateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Builds the snapshot; on a full disk (or while the database recovers from
    /// one) it waits and tries again rather than fail: openraft stops a node whose
    /// snapshot fails, and a full disk must not need a restart.
    async fn build_snapshot(&mut self) -> SResult<Snapshot<TypeConfig>> {
        let mut logged = false;
        let (meta, path) = loop {
            match self.try_build().await {
                Ok(done) => break done,
                Err(e) if e.is_no_space() || matches!(e, MetaError::Unavailable) => {
                    if !logged {
                        tracing::error!(error = %e, "building a metadata snapshot failed: the disk is full; retrying");
                        logged = true;
                    }
                    tokio::time::sleep(RETRY).await;
                }
                Err(e) => return Err(snap_err(e)),
            }
        };
        self.sm.set_current(meta.clone(), path.clone()).await;
        let file = tokio::fs::File::open(&path).await.map_err(snap_err)?;
        let bytes = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        metrics::counter!("cairn_meta_snapshots_built_total").increment(1);
        tracing::info!(last_log = ?meta.last_log_id.map(|l| l.index), bytes, "metadata snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl SnapshotBuilder {
    /// One try: a checkpoint and a read transaction, then the file.
    async fn try_build(&mut self) -> Result<(SnapshotMeta, PathBuf)> {
        self.sm
            .write_snapshot_file(|m| format!("{}.snap", m.snapshot_id))
            .await
    }
}

impl StateMachine {
    /// Writes a snapshot file of everything applied so far into the snapshot
    /// folder, named by `name`; its meta and path. A checkpoint first, then a
    /// read transaction: applying goes on while the file is written.
    async fn write_snapshot_file(
        &self,
        name: impl FnOnce(&SnapshotMeta) -> String,
    ) -> Result<(SnapshotMeta, PathBuf)> {
        let (txn, applied, membership) = self
            .call(Job::BeginSnapshot)
            .await
            .map_err(|e| MetaError::Storage(e.to_string()))??;
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}-{}",
                applied.map_or(0, |l| l.leader_id.term),
                applied.map_or(0, |l| l.index),
                cairn_types::now_millis()
            ),
        };
        let path = self.sm.snapshot_dir.join(name(&meta));
        let (m, p) = (meta.clone(), path.clone());
        tokio::task::spawn_blocking(move || write_snapshot(&txn, &m, &p))
            .await
            .map_err(|e| MetaError::Storage(e.to_string()))??;
        Ok((meta, path))
    }

    /// A snapshot file of everything applied so far, for a copy kept outside
    /// the cluster; its meta and path. Named as a leftover (`.tmp`), which the
    /// next start removes, if the caller does not remove it first.
    pub(crate) async fn export(&self) -> Result<(PathBuf, SnapshotSummary)> {
        let (meta, path) = self
            .write_snapshot_file(|m| format!("export-{}-{}.tmp", m.snapshot_id, rand_suffix()))
            .await?;
        Ok((path, SnapshotSummary::of(&meta)))
    }
}

/// What a snapshot file holds, as [`check_snapshot_file`] finds it.
#[derive(Clone, Debug)]
pub struct SnapshotSummary {
    /// The index of the last log entry the snapshot holds.
    pub last_log_index: Option<u64>,
    /// The term of that entry.
    pub last_log_term: Option<u64>,
    /// The cluster's members at that entry, by id.
    pub members: Vec<NodeId>,
}

/// Reads a snapshot file whole and checks it (header, every row, checksum).
pub fn check_snapshot_file(path: &Path) -> io::Result<SnapshotSummary> {
    Ok(SnapshotSummary::of(&verify_snapshot(path)?))
}

impl SnapshotSummary {
    pub(crate) fn of(meta: &SnapshotMeta) -> SnapshotSummary {
        SnapshotSummary {
            last_log_index: meta.last_log_id.map(|l| l.index),
            last_log_term: meta.last_log_id.map(|l| l.leader_id.term),
            members: meta
                .last_membership
                .membership()
                .nodes()
                .map(|(id, _)| *id)
                .collect(),
        }
    }
}

impl StateMachine {
    /// Records a new current snapshot and removes the previous one.
    async fn set_current(&self, meta: SnapshotMeta, path: PathBuf) {
        let old = self
            .sm
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace((meta, path.clone()));
        if let Some((_, old)) = old
            && old != path
        {
            let _ = tokio::fs::remove_file(old).await;
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> SResult<(Option<LogId>, StoredMembership)> {
        Ok(self
            .sm
            .applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone())
    }

    async fn apply<I>(&mut self, entries: I) -> SResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        self.call(|tx| Job::Apply(entries, tx))
            .await
            .map_err(sm_err)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> SResult<Box<tokio::fs::File>> {
        let path = self.sm.snapshot_dir.join(format!(
            "incoming-{}-{}.tmp",
            cairn_types::now_millis(),
            rand_suffix()
        ));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(snap_err)?;
        self.sm
            .incoming
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: Box<tokio::fs::File>,
    ) -> SResult<()> {
        use std::os::unix::fs::MetadataExt;
        use tokio::io::{AsyncSeekExt, AsyncWriteExt};
        snapshot.flush().await.map_err(snap_err)?;
        let incoming =
            std::mem::take(&mut *self.sm.incoming.lock().unwrap_or_else(|p| p.into_inner()));
        // Usually the data is in the file `begin_receiving_snapshot` made; if it is
        // another file, its bytes are copied into one of ours.
        let given = snapshot.metadata().await.map_err(snap_err)?;
        let received = tokio::task::spawn_blocking(move || {
            let mut received = None;
            for p in incoming {
                let same = std::fs::metadata(&p)
                    .is_ok_and(|m| m.dev() == given.dev() && m.ino() == given.ino());
                if same && received.is_none() {
                    received = Some(p);
                } else {
                    let _ = std::fs::remove_file(&p);
                }
            }
            received
        })
        .await
        .map_err(snap_err)?;
        let received = match received {
            Some(p) => {
                snapshot.sync_all().await.map_err(snap_err)?;
                drop(snapshot);
                p
            }
            None => {
                let p = self.sm.snapshot_dir.join(format!(
                    "copy-{}-{}.tmp",
                    cairn_types::now_millis(),
                    rand_suffix()
                ));
                let mut out = tokio::fs::File::create(&p).await.map_err(snap_err)?;
                snapshot
                    .seek(std::io::SeekFrom::Start(0))
                    .await
                    .map_err(snap_err)?;
                tokio::io::copy(&mut *snapshot, &mut out)
                    .await
                    .map_err(snap_err)?;
                out.sync_all().await.map_err(snap_err)?;
                p
            }
        };
        let path = self
            .sm
            .snapshot_dir
            .join(format!("{}.snap", meta.snapshot_id));
        let (m, r, p) = (meta.clone(), received.clone(), path.clone());
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let got = verify_snapshot(&r)?;
            if got.last_log_id != m.last_log_id || got.snapshot_id != m.snapshot_id {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the received snapshot is not the one announced",
                ));
            }
            std::fs::rename(&r, &p)?;
            if let Some(dir) = p.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(snap_err)?
        .map_err(|e| {
            let _ = std::fs::remove_file(&received);
            snap_err(e)
        })?;
        let m = meta.clone();
        self.call(|tx| Job::Install(path.clone(), m, tx))
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        self.set_current(meta.clone(), path).await;
        metrics::counter!("cairn_meta_snapshots_installed_total").increment(1);
        tracing::info!(
            last_log = ?meta.last_log_id.map(|l| l.index),
            "installed a metadata snapshot sent by the leader"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> SResult<Option<Snapshot<TypeConfig>>> {
        let current = self
            .sm
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match current {
            None => Ok(None),
            Some((meta, path)) => {
                let file = tokio::fs::File::open(&path).await.map_err(snap_err)?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(file),
                }))
            }
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
