//! The store: tables, the group-commit writer thread, and reads.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use cairn_types::{BlockHash, UnixMillis};

use crate::log::{CommandLog, LogRecord};
use crate::records::{
    BucketRecord, KeyRecord, ObjectRecord, PartRecord, UploadRecord, decode, encode,
};
use crate::{Command, MetaError, Outcome, Result, keys};

pub(crate) const BUCKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("buckets");
pub(crate) const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
pub(crate) const UPLOADS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("uploads");
pub(crate) const PARTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("parts");
/// Block address -> number of references from objects and parts.
pub(crate) const BLOCK_REFS: TableDefinition<&[u8], u64> = TableDefinition::new("block_refs");
/// Unreferenced block address -> when it lost its last reference.
pub(crate) const GC_QUEUE: TableDefinition<&[u8], i64> = TableDefinition::new("gc_queue");
pub(crate) const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// The store's own state: `applied`, the sequence number of the last command of the
/// log these tables hold.
const STATE: TableDefinition<&str, u64> = TableDefinition::new("state");
const APPLIED: &str = "applied";

/// Memory redb may use to cache pages (and to hold pages not yet checkpointed, up to
/// half of it), unless set with [`MetaStore::open_with`].
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
/// A checkpoint is due once the log's current cycle holds this much...
const CHECKPOINT_BYTES: u64 = 8 << 20;
/// ...or once this long has passed since the last one with commands since.
const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// After a failed checkpoint (a full disk), the next waits this long.
const CHECKPOINT_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// How many waiting commands one log write (and one apply transaction) takes at most.
/// Bounds the work lost (and retried by clients) if a write fails, and the latency of
/// the first.
const MAX_GROUP: usize = 512;
/// Commands waiting for the writer. Callers beyond this wait for room (backpressure).
const QUEUE_DEPTH: usize = 4096;

#[allow(clippy::large_enum_variant)] // short-lived, one per request
enum Job {
    Apply {
        cmd: Command,
        reply: oneshot::Sender<Result<Outcome>>,
    },
    /// Checkpoint if one is due (sent every second by the ticker thread).
    Tick,
    /// Checkpoint now.
    Checkpoint(oneshot::Sender<Result<()>>),
}

#[derive(Clone)]
pub struct MetaStore {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Job>,
}

/// Access keys, read on every request: kept in memory, loaded at open and updated by
/// the writer after each commit that changes them.
type KeyCache = RwLock<std::collections::HashMap<String, KeyRecord>>;

/// Buckets, checked on every request: kept in memory like the keys.
type BucketCache = RwLock<std::collections::BTreeMap<String, BucketRecord>>;

/// The open database, replaced by a fresh handle after an I/O error: redb refuses
/// every call after one (`PreviousIo`) until the database is opened again, and a full
/// disk must not need a restart.
struct Shared {
    path: PathBuf,
    cache_bytes: usize,
    records: crate::cache::RecordCache,
    db: RwLock<Option<Arc<Database>>>,
    keys: KeyCache,
    buckets: BucketCache,
}

impl Shared {
    fn get(&self) -> Result<Arc<Database>> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(MetaError::Unavailable)
    }

    /// Keeps the in-memory caches in step with a committed command.
    fn note_committed(&self, cmd: &Command) {
        match cmd {
            Command::PutKey { access_key, record } => {
                let mut k = self.keys.write().unwrap_or_else(|p| p.into_inner());
                k.insert(access_key.clone(), record.clone());
            }
            Command::CreateBucket { bucket, now } => {
                let mut b = self.buckets.write().unwrap_or_else(|p| p.into_inner());
                b.insert(bucket.clone(), BucketRecord { created: *now });
            }
            Command::DeleteBucket { bucket, .. } => {
                let mut b = self.buckets.write().unwrap_or_else(|p| p.into_inner());
                b.remove(bucket);
            }
            _ => {}
        }
    }

    /// Drops the current handle (once no reader holds it) and opens the file again.
    fn reopen(&self) -> Result<()> {
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
        let db = open_db(&self.path, self.cache_bytes)?;
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
        tracing::info!(path = %self.path.display(), "metadata database reopened");
        Ok(())
    }

    /// Loads the key and bucket caches from the tables.
    fn reload_caches(&self, db: &Database) -> Result<()> {
        let mut keys = std::collections::HashMap::new();
        let mut buckets = std::collections::BTreeMap::new();
        let txn = db.begin_read()?;
        for item in txn.open_table(KEYS)?.iter()? {
            let (k, v) = item?;
            keys.insert(k.value().to_string(), decode(v.value())?);
        }
        for item in txn.open_table(BUCKETS)?.iter()? {
            let (k, v) = item?;
            buckets.insert(k.value().to_string(), decode(v.value())?);
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        *self.buckets.write().unwrap_or_else(|p| p.into_inner()) = buckets;
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
    let t = txn.open_table(STATE)?;
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
fn changed_object(cmd: &Command) -> Option<Vec<u8>> {
    match cmd {
        Command::PutObject { bucket, key, .. }
        | Command::DeleteObject { bucket, key, .. }
        | Command::CompleteUpload { bucket, key, .. } => Some(keys::object(bucket, key)),
        _ => None,
    }
}

/// Makes every commit so far durable in the database file.
fn checkpoint(db: &Database) -> Result<()> {
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
    /// Opens or creates the metadata database at `path` (its command log next to it)
    /// and starts its log and apply threads. Blocking: call it before serving or on a
    /// blocking thread.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, DEFAULT_CACHE_BYTES)
    }

    /// [`MetaStore::open`] with its memory limited to `memory` bytes: three quarters
    /// for redb's page cache, one for the cache of object records.
    pub fn open_with(path: &Path, memory: usize) -> Result<Self> {
        let cache_bytes = memory / 4 * 3;
        let db = open_db(path, cache_bytes)?;
        {
            let txn = db.begin_write()?;
            txn.open_table(BUCKETS)?;
            txn.open_table(OBJECTS)?;
            txn.open_table(UPLOADS)?;
            txn.open_table(PARTS)?;
            txn.open_table(BLOCK_REFS)?;
            txn.open_table(GC_QUEUE)?;
            txn.open_table(KEYS)?;
            txn.open_table(STATE)?;
            txn.commit()?;
        }
        let applied = read_applied(&db)?;
        let lpath = log_path(path);
        let (mut log, records) = CommandLog::open(&lpath, applied, skip_fsync_for_test())
            .map_err(|e| io_error(&lpath, e))?;
        let replayed = replay(&db, &records, applied)?.len();
        if replayed > 0 {
            tracing::info!(
                commands = replayed,
                "metadata commands applied again from the log"
            );
            match checkpoint(&db) {
                Ok(()) => log.new_cycle(),
                Err(e) => {
                    tracing::warn!(error = %e, "checkpoint after recovery failed; will retry")
                }
            }
        }
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            cache_bytes,
            records: crate::cache::RecordCache::new(memory / 4),
            db: RwLock::new(Some(Arc::new(db))),
            keys: RwLock::new(Default::default()),
            buckets: RwLock::new(Default::default()),
        });
        shared.reload_caches(&*shared.get()?)?;
        let received = log.next_seq() - 1;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (stage_tx, stage_rx) = std::sync::mpsc::sync_channel(APPLY_QUEUE);
        let log_stage = LogStage {
            log,
            apply: stage_tx,
            last_checkpoint: std::time::Instant::now(),
            no_checkpoint_before: None,
        };
        let apply_stage = ApplyStage {
            shared: shared.clone(),
            log_path: lpath,
            received,
        };
        std::thread::Builder::new()
            .name("meta-apply".into())
            .spawn(move || apply_stage.run(stage_rx))
            .map_err(|e| MetaError::Storage(format!("spawn apply thread: {e}")))?;
        std::thread::Builder::new()
            .name("meta-log".into())
            .spawn(move || log_stage.run(rx))
            .map_err(|e| MetaError::Storage(format!("spawn log thread: {e}")))?;
        let weak = tx.downgrade();
        std::thread::Builder::new()
            .name("meta-ticker".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    match weak.upgrade() {
                        Some(tx) => {
                            let _ = tx.try_send(Job::Tick);
                        }
                        None => break,
                    }
                }
            })
            .map_err(|e| MetaError::Storage(format!("spawn ticker thread: {e}")))?;
        Ok(MetaStore { shared, tx })
    }

    /// Applies one command; returns once it is durable (or failed).
    pub async fn apply(&self, cmd: Command) -> Result<Outcome> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Apply { cmd, reply })
            .await
            .map_err(|_| MetaError::Closed)?;
        rx.await.map_err(|_| MetaError::Closed)?
    }

    /// Makes everything committed so far durable in the database file, so that the
    /// next open has nothing to apply again (called at shutdown).
    pub async fn checkpoint(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Checkpoint(reply))
            .await
            .map_err(|_| MetaError::Closed)?;
        rx.await.map_err(|_| MetaError::Closed)?
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
        self.read(move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(GC_QUEUE)?;
            let mut out = Vec::new();
            for item in t.iter()? {
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

    /// How many objects and parts name this block. Blocking (used under the block
    /// store's pin lock by garbage collection).
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

type Reply = oneshot::Sender<Result<Outcome>>;

/// Groups of logged commands waiting for the apply thread (backpressure beyond).
const APPLY_QUEUE: usize = 64;

/// What the log thread hands the apply thread, in log order.
enum Stage {
    /// Commands numbered from `first_seq`, durable in the log.
    Group {
        first_seq: u64,
        jobs: Vec<(Command, Reply)>,
    },
    /// Checkpoint everything applied so far and answer.
    Checkpoint(std::sync::mpsc::SyncSender<Result<()>>),
}

/// The first stage of the write pipeline: takes every command waiting, appends them
/// to the log with one synchronous write (group commit), passes them on; decides when to
/// checkpoint and starts a new log cycle after one.
struct LogStage {
    log: CommandLog,
    apply: std::sync::mpsc::SyncSender<Stage>,
    last_checkpoint: std::time::Instant,
    no_checkpoint_before: Option<std::time::Instant>,
}

impl LogStage {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(first) = rx.blocking_recv() {
            let mut jobs = Vec::new();
            let mut checkpoints = Vec::new();
            let mut next = Some(first);
            while let Some(job) = next {
                match job {
                    Job::Apply { cmd, reply } => jobs.push((cmd, reply)),
                    Job::Tick => {}
                    Job::Checkpoint(reply) => checkpoints.push(reply),
                }
                next = if jobs.len() < MAX_GROUP {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            if !jobs.is_empty() {
                self.log_group(jobs);
            }
            let res = self.maybe_checkpoint(!checkpoints.is_empty());
            for reply in checkpoints {
                let _ = reply.send(res.clone());
            }
        }
        let _ = self.maybe_checkpoint(true);
    }

    fn log_group(&mut self, jobs: Vec<(Command, Reply)>) {
        let mut payloads = Vec::with_capacity(jobs.len());
        let mut logged = Vec::with_capacity(jobs.len());
        for (cmd, reply) in jobs {
            match encode(&cmd) {
                Ok(p) => {
                    payloads.push(p);
                    logged.push((cmd, reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        let started = std::time::Instant::now();
        let res = self.log.append(&payloads);
        metrics::histogram!("cairn_meta_log_write_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("cairn_meta_commit_group_size").record(payloads.len() as f64);
        match res {
            Ok(first_seq) => {
                if let Err(std::sync::mpsc::SendError(Stage::Group { jobs, .. })) =
                    self.apply.send(Stage::Group {
                        first_seq,
                        jobs: logged,
                    })
                {
                    for (_, reply) in jobs {
                        let _ = reply.send(Err(MetaError::Closed));
                    }
                }
            }
            Err(e) => {
                let e = io_error(self.log.path(), e);
                tracing::error!(error = %e, commands = logged.len(), "metadata log write failed; nothing of it was applied");
                for (_, reply) in logged {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Checkpoints if one is due (or `force`), then starts a new log cycle.
    fn maybe_checkpoint(&mut self, force: bool) -> Result<()> {
        let bytes = self.log.cycle_bytes();
        let due = bytes >= CHECKPOINT_BYTES
            || (bytes > 0 && self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL);
        let waiting = self
            .no_checkpoint_before
            .is_some_and(|t| std::time::Instant::now() < t);
        if !force && (!due || waiting) {
            return Ok(());
        }
        // The apply thread checkpoints once it has applied everything logged so far;
        // nothing is logged meanwhile, so the whole cycle is then in the database.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let res = match self.apply.send(Stage::Checkpoint(tx)) {
            Ok(()) => rx.recv().unwrap_or(Err(MetaError::Closed)),
            Err(_) => Err(MetaError::Closed),
        };
        match &res {
            Ok(()) => {
                self.log.new_cycle();
                self.last_checkpoint = std::time::Instant::now();
                self.no_checkpoint_before = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, log_bytes = bytes, "metadata checkpoint failed; the log keeps every command until one succeeds");
                self.no_checkpoint_before = Some(std::time::Instant::now() + CHECKPOINT_RETRY);
            }
        }
        res
    }
}

/// The second stage: applies logged commands to the tables in log order, without
/// an fsync, and answers their callers; checkpoints when asked.
struct ApplyStage {
    shared: Arc<Shared>,
    log_path: PathBuf,
    /// The last command received from the log stage (all up to it are in the log).
    received: u64,
}

impl ApplyStage {
    fn run(mut self, rx: std::sync::mpsc::Receiver<Stage>) {
        while let Ok(first) = rx.recv() {
            let mut batch: Vec<(u64, Command, Reply)> = Vec::new();
            let mut next = Some(first);
            while let Some(stage) = next {
                match stage {
                    Stage::Group { first_seq, jobs } => {
                        batch.extend(
                            jobs.into_iter()
                                .enumerate()
                                .map(|(i, (c, r))| (first_seq + i as u64, c, r)),
                        );
                    }
                    Stage::Checkpoint(reply) => {
                        self.apply_batch(std::mem::take(&mut batch));
                        let started = std::time::Instant::now();
                        let res = self.db().and_then(|db| checkpoint(&db));
                        metrics::histogram!("cairn_meta_checkpoint_seconds")
                            .record(started.elapsed().as_secs_f64());
                        if res.is_err() {
                            // A failed commit leaves redb refusing every call until reopened.
                            let _ = self.recover();
                        }
                        let _ = reply.send(res);
                    }
                }
                next = if batch.len() < MAX_GROUP {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            self.apply_batch(batch);
        }
    }

    fn apply_batch(&mut self, batch: Vec<(u64, Command, Reply)>) {
        let (Some(&(first, ..)), Some(&(last, ..))) = (batch.first(), batch.last()) else {
            return;
        };
        let started = std::time::Instant::now();
        let results = match self.try_apply(&batch) {
            Ok(r) => Ok(r),
            Err(e) => {
                // The batch is in the log: recovery applies it, and its results count.
                tracing::warn!(error = %e, "applying logged metadata commands failed; recovering from the log");
                self.received = last;
                self.recover().map(|r| {
                    let mut by_seq: std::collections::HashMap<u64, Result<Outcome>> =
                        r.into_iter().collect();
                    (first..=last)
                        .map(|s| by_seq.remove(&s).unwrap_or(Err(MetaError::Unavailable)))
                        .collect()
                })
            }
        };
        self.received = last;
        metrics::histogram!("cairn_meta_commit_seconds").record(started.elapsed().as_secs_f64());
        match results {
            Ok(results) => {
                for ((_, cmd, reply), res) in batch.into_iter().zip(results) {
                    if res.is_ok() {
                        self.shared.note_committed(&cmd);
                    }
                    let _ = reply.send(res);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, commands = batch.len(), "logged metadata commands could not be applied yet; they will be at the next recovery");
                for (_, _, reply) in batch {
                    let _ = reply.send(Err(MetaError::Unavailable));
                }
            }
        }
    }

    fn try_apply(&mut self, batch: &[(u64, Command, Reply)]) -> Result<Vec<Result<Outcome>>> {
        let db = self.db()?;
        let mut txn = db.begin_write()?;
        let _ = txn.set_durability(redb::Durability::None);
        let mut results = Vec::with_capacity(batch.len());
        {
            let mut tables = crate::apply::Tables::open(&txn)?;
            for (_, cmd, _) in batch {
                let res = crate::apply::apply(&mut tables, cmd);
                // A storage error may have left the transaction half-changed: drop it all.
                if let Err(e @ (MetaError::Storage(_) | MetaError::NoSpace(_))) = &res {
                    return Err(e.clone());
                }
                results.push(res);
            }
        }
        if let Some((last, ..)) = batch.last() {
            txn.open_table(STATE)?.insert(APPLIED, *last)?;
        }
        let changed: Vec<Vec<u8>> = batch
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .filter_map(|((_, cmd, _), _)| changed_object(cmd))
            .collect();
        let records = &self.shared.records;
        records.begin_change(changed.iter().map(|k| k.as_slice()));
        let committed = txn.commit();
        records.end_change(changed.iter().map(|k| k.as_slice()));
        committed?;
        Ok(results)
    }

    /// The database, opened again and brought up to the log if an error dropped it.
    fn db(&mut self) -> Result<Arc<Database>> {
        match self.shared.get() {
            Ok(db) => Ok(db),
            Err(_) => {
                self.recover()?;
                self.shared.get()
            }
        }
    }

    /// Opens the database again (it reverts to its last checkpoint) and applies the
    /// logged commands after it, up to the last one received.
    fn recover(&mut self) -> Result<Vec<(u64, Result<Outcome>)>> {
        let res = (|| {
            self.shared.records.clear();
            self.shared.reopen()?;
            let db = self.shared.get()?;
            let records = crate::log::read_until(&self.log_path, self.received)
                .map_err(|e| io_error(&self.log_path, e))?;
            let out = replay(&db, &records, read_applied(&db)?)?;
            self.shared.records.clear();
            self.shared.reload_caches(&db)?;
            Ok(out)
        })();
        if let Err(e) = &res {
            tracing::error!(error = %e, "recovering the metadata database failed; will retry");
            self.shared
                .db
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take();
        }
        res
    }
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

    fn bucket(name: &str) -> Vec<u8> {
        encode(&Command::CreateBucket {
            bucket: name.into(),
            now: 1,
        })
        .unwrap()
    }

    #[test]
    fn commands_only_in_the_log_are_applied_at_open() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("meta.redb");
        // As after a crash: the log holds commands the database file never got.
        let (mut log, _) = CommandLog::open(&log_path(&path), 0, true).unwrap();
        log.append(&[bucket("a"), bucket("b")]).unwrap();
        drop(log);
        let s = MetaStore::open(&path).unwrap();
        assert!(s.bucket("a").is_some() && s.bucket("b").is_some());
        let db = s.shared.get().unwrap();
        assert_eq!(read_applied(&db).unwrap(), 2);
        drop(db);
        drop(s);
        // Applied once: a second open finds them in the database and numbers on.
        let (log, records) = CommandLog::open(&log_path(&path), 2, true).unwrap();
        assert!(records.iter().all(|r| r.seq <= 2));
        assert_eq!(log.next_seq(), 3);
    }

    #[test]
    fn a_log_with_missing_commands_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("meta.redb");
        let (mut log, _) = CommandLog::open(&log_path(&path), 4, true).unwrap();
        log.append(&[bucket("a")]).unwrap();
        drop(log);
        match MetaStore::open(&path) {
            Err(MetaError::Storage(m)) => assert!(m.contains("missing"), "{m}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a log that skips commands 1..4 was accepted"),
        }
    }

    #[tokio::test]
    async fn checkpoint_starts_a_new_cycle_and_keeps_everything() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("meta.redb");
        let s = MetaStore::open(&path).unwrap();
        for i in 0..10 {
            s.apply(Command::CreateBucket {
                bucket: format!("b{i}"),
                now: 1,
            })
            .await
            .unwrap();
        }
        // A failing command is logged too (and fails again if applied again).
        assert!(
            s.apply(Command::CreateBucket {
                bucket: "b0".into(),
                now: 1,
            })
            .await
            .is_err()
        );
        s.checkpoint().await.unwrap();
        let db = s.shared.get().unwrap();
        assert_eq!(read_applied(&db).unwrap(), 11);
        assert_eq!(s.buckets().len(), 10);
        // The next command starts the log over at offset 0: it is the whole cycle.
        s.apply(Command::CreateBucket {
            bucket: "after".into(),
            now: 1,
        })
        .await
        .unwrap();
        let cycle = crate::log::read_until(&log_path(&path), u64::MAX).unwrap();
        assert_eq!(cycle.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![12]);
        let cmd: Command = decode(&cycle[0].payload).unwrap();
        assert!(matches!(cmd, Command::CreateBucket { bucket, .. } if bucket == "after"));
    }
}
