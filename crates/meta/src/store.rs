//! The store: tables, the group-commit writer thread, and reads.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use cairn_types::{BlockHash, UnixMillis};

use crate::records::{BucketRecord, KeyRecord, ObjectRecord, PartRecord, UploadRecord, decode};
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

/// How many waiting commands one write transaction takes at most. Bounds the work
/// lost (and retried by clients) if a commit fails, and the latency of the first.
const MAX_GROUP: usize = 512;
/// Commands waiting for the writer. Callers beyond this wait for room (backpressure).
const QUEUE_DEPTH: usize = 4096;

struct Job {
    cmd: Command,
    reply: oneshot::Sender<Result<Outcome>>,
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
        let db = Database::open(&self.path)?;
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
        tracing::info!(path = %self.path.display(), "metadata database reopened");
        Ok(())
    }
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
    /// Opens or creates the metadata database at `path` and starts its writer thread.
    /// Blocking: call it before serving or on a blocking thread.
    pub fn open(path: &Path) -> Result<Self> {
        let db = if path.exists() {
            Database::open(path)?
        } else {
            Database::create(path)?
        };
        {
            let txn = db.begin_write()?;
            txn.open_table(BUCKETS)?;
            txn.open_table(OBJECTS)?;
            txn.open_table(UPLOADS)?;
            txn.open_table(PARTS)?;
            txn.open_table(BLOCK_REFS)?;
            txn.open_table(GC_QUEUE)?;
            txn.open_table(KEYS)?;
            txn.commit()?;
        }
        let mut keys = std::collections::HashMap::new();
        let mut buckets = std::collections::BTreeMap::new();
        {
            let txn = db.begin_read()?;
            for item in txn.open_table(KEYS)?.iter()? {
                let (k, v) = item?;
                keys.insert(k.value().to_string(), decode(v.value())?);
            }
            for item in txn.open_table(BUCKETS)?.iter()? {
                let (k, v) = item?;
                buckets.insert(k.value().to_string(), decode(v.value())?);
            }
        }
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            db: RwLock::new(Some(Arc::new(db))),
            keys: RwLock::new(keys),
            buckets: RwLock::new(buckets),
        });
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let wshared = shared.clone();
        std::thread::Builder::new()
            .name("meta-writer".into())
            .spawn(move || writer(wshared, rx))
            .map_err(|e| MetaError::Storage(format!("spawn writer thread: {e}")))?;
        Ok(MetaStore { shared, tx })
    }

    /// Applies one command; returns once it is durable (or failed).
    pub async fn apply(&self, cmd: Command) -> Result<Outcome> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { cmd, reply })
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
        self.read(move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(OBJECTS)?;
            let v = t.get(okey.as_slice())?;
            v.map(|v| decode(v.value())).transpose()
        })
        .await
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

/// The writer thread: group commit. See the crate docs.
fn writer(shared: Arc<Shared>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let n = jobs.len();
        let started = std::time::Instant::now();
        let res = match shared.get() {
            Ok(db) => apply_group(&db, &mut jobs),
            Err(_) => shared
                .reopen()
                .and_then(|()| shared.get())
                .and_then(|db| apply_group(&db, &mut jobs)),
        };
        metrics::histogram!("cairn_meta_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("cairn_meta_commit_group_size").record(n as f64);
        match res {
            Ok(results) => {
                for (job, res) in jobs.into_iter().zip(results) {
                    if res.is_ok() {
                        shared.note_committed(&job.cmd);
                    }
                    let _ = job.reply.send(res);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, commands = n, "metadata commit failed; nothing of it was applied");
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone()));
                }
                if let Err(e) = shared.reopen() {
                    tracing::error!(error = %e, "reopening the metadata database failed; will retry");
                }
            }
        }
    }
}

fn apply_group(db: &Database, jobs: &mut [Job]) -> Result<Vec<Result<Outcome>>> {
    let mut txn = db.begin_write()?;
    if skip_fsync_for_test() {
        let _ = txn.set_durability(redb::Durability::None);
    }
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs.iter() {
        let res = crate::apply::apply(&txn, &job.cmd);
        if let Err(e @ (MetaError::Storage(_) | MetaError::NoSpace(_))) = &res {
            // A storage error may have left the transaction half-changed: drop it all.
            return Err(e.clone());
        }
        results.push(res);
    }
    txn.commit()?;
    Ok(results)
}

/// See `cairn_blocks::unsafe_test_skip_fsync`: the power-cut test's hook (`meta`).
fn skip_fsync_for_test() -> bool {
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SKIP.get_or_init(|| {
        std::env::var("CAIRN_UNSAFE_TEST_SKIP_FSYNC")
            .is_ok_and(|v| v.split(',').any(|s| s == "meta"))
    })
}
