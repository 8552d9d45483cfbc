//! Taking a backup of a cairn (or any S3 endpoint) and restoring one into it.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_s3::primitives::ByteStream;
use futures::{SinkExt, StreamExt};
use serde::Serialize;

use crate::BackupError;
use crate::lock::Lock;
use crate::manifest::{self, Change, Kind, MANIFEST_FORMAT, Manifest, ObjectEntry};
use crate::repo::{PageWriter, Repo};

/// The settings of a cairn's buckets that S3 does not carry (their storage
/// class), read and set through cairn itself. A backup records them in its
/// manifest as `{"class": CLASS}` per bucket (`null`: the cluster's default).
#[async_trait::async_trait]
pub trait BucketSettings: Send + Sync {
    /// Every bucket's own storage class, by name (`None`: the cluster's default).
    async fn classes(&self) -> Result<BTreeMap<String, Option<String>>, BackupError>;
    /// Sets `bucket`'s storage class (`None`: back to the cluster's default).
    async fn set_class(&self, bucket: &str, _class: Option<&str>) -> Result<(), BackupError> {
        Err(BackupError::Usage(format!(
            "bucket {bucket}: its storage class cannot be set through this endpoint"
        )))
    }
}

/// The S3 endpoint backed up, or restored into.
#[derive(Clone)]
pub struct Endpoint {
    pub client: aws_sdk_s3::Client,
    pub url: String,
    /// The buckets' own settings, where the endpoint is a cairn whose admin API
    /// the caller may use: recorded by a backup, given back by a restore.
    pub settings: Option<std::sync::Arc<dyn BucketSettings>>,
}

impl Endpoint {
    pub fn new(url: &str, access_key: &str, secret_key: &str) -> Endpoint {
        Endpoint {
            client: crate::target::s3_client(url, access_key, secret_key),
            url: url.to_string(),
            settings: None,
        }
    }

    pub fn with_settings(mut self, settings: std::sync::Arc<dyn BucketSettings>) -> Endpoint {
        self.settings = Some(settings);
        self
    }

    fn fail<E: std::fmt::Debug>(&self, what: &str, e: E) -> BackupError {
        BackupError::Source(format!(
            "{what} at {}: {}",
            self.url,
            crate::target::sdk_message(&e)
        ))
    }

    /// Deletes `keys` of `bucket`, up to 1,000 a request (one at a time where
    /// the endpoint has no multi-object delete); how many.
    pub async fn delete_keys(&self, bucket: &str, keys: Vec<String>) -> Result<u64, BackupError> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        let bad = |e: aws_sdk_s3::error::BuildError| BackupError::Usage(e.to_string());
        for batch in keys.chunks(1000) {
            let objects = batch
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad)?;
            let delete = Delete::builder()
                .set_objects(Some(objects))
                .quiet(true)
                .build()
                .map_err(bad)?;
            let sent = self
                .client
                .delete_objects()
                .bucket(bucket)
                .delete(delete)
                .send()
                .await;
            let out = match sent {
                Ok(out) => out,
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 501) => {
                    for k in batch {
                        self.client
                            .delete_object()
                            .bucket(bucket)
                            .key(k)
                            .send()
                            .await
                            .map_err(|e| self.fail(&format!("deleting {bucket}/{k}"), e))?;
                    }
                    continue;
                }
                Err(e) => return Err(self.fail(&format!("deleting from {bucket}"), e)),
            };
            if let Some(e) = out.errors().first() {
                return Err(BackupError::Source(format!(
                    "deleting {bucket}/{} at {}: {} {}",
                    e.key().unwrap_or_default(),
                    self.url,
                    e.code().unwrap_or_default(),
                    e.message().unwrap_or_default()
                )));
            }
        }
        Ok(keys.len() as u64)
    }

    /// Every bucket's name, sorted.
    pub async fn buckets(&self) -> Result<Vec<String>, BackupError> {
        let out = self
            .client
            .list_buckets()
            .send()
            .await
            .map_err(|e| self.fail("listing the buckets", e))?;
        let mut names: Vec<String> = out
            .buckets()
            .iter()
            .filter_map(|b| b.name().map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }

    /// How many objects `bucket` holds under `prefix` (an error when there
    /// is no such bucket).
    async fn count(&self, bucket: &str, prefix: &str) -> Result<u64, BackupError> {
        let mut n = 0;
        let mut pages = std::pin::pin!(self.list_pages(bucket, prefix));
        while let Some(page) = pages.next().await {
            n += page?.len() as u64;
        }
        Ok(n)
    }

    /// The objects of `bucket`, a page of the listing at a time, in key order.
    fn list_pages<'s>(
        &'s self,
        bucket: &'s str,
        prefix: &str,
    ) -> impl futures::Stream<Item = Result<Vec<Listed>, BackupError>> + 's {
        let pages = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .set_prefix((!prefix.is_empty()).then(|| prefix.to_string()))
            .into_paginator()
            .send();
        futures::stream::unfold(pages, move |mut pages| async move {
            let page = pages
                .next()
                .await?
                .map_err(|e| self.fail(&format!("listing bucket {bucket}"), e));
            let page = page.map(|page| {
                page.contents()
                    .iter()
                    .filter_map(|o| {
                        let (k, t) = (o.key()?, o.last_modified()?);
                        Some((
                            k.to_string(),
                            o.size().unwrap_or(0).max(0) as u64,
                            o.e_tag().unwrap_or_default().to_string(),
                            rfc3339(t),
                        ))
                    })
                    .collect()
            });
            Some((page, pages))
        })
    }
}

/// An object as a listing shows it: key, size, ETag, time.
type Listed = (String, u64, String, String);

fn rfc3339(t: &aws_sdk_s3::primitives::DateTime) -> String {
    t.fmt(aws_sdk_s3::primitives::DateTimeFormat::DateTime)
        .unwrap_or_default()
}

/// The time now (RFC 3339, to the microsecond) and a backup id made from it:
/// ids sort as the backups were begun, and two never clash.
fn now_and_id() -> (String, String) {
    let now = time::OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.microsecond() * 1000)
        .unwrap_or(now);
    let text = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let id = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}{:06}Z-{:06x}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond(),
        rand::random::<u32>() & 0xff_ffff
    );
    (text, id)
}

/// What to back up.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    /// The buckets (none: every bucket of the endpoint).
    pub buckets: Vec<String>,
    /// Full, incremental or differential (none: incremental).
    pub kind: Option<Kind>,
}

/// A list entry (and `--json` output) for a backup.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub parent: Option<String>,
    pub buckets: Vec<String>,
    pub time: String,
    pub objects: u64,
    pub bytes_stored: u64,
    pub bytes_new: u64,
}

impl From<&Manifest> for Summary {
    fn from(m: &Manifest) -> Summary {
        Summary {
            id: m.id.clone(),
            kind: m.kind,
            parent: m.parent.clone(),
            buckets: m.buckets.clone(),
            time: m.time.clone(),
            objects: m.objects,
            bytes_stored: m.bytes_stored,
            bytes_new: m.bytes_new,
        }
    }
}

/// Reports progress: objects and bytes done of those known.
pub trait Progress: Send + Sync {
    /// The work ahead, once known.
    fn begin(&self, _objects: u64, _bytes: u64) {}
    /// The work ahead as far as it is listed yet (`complete`: all of it).
    fn listed(&self, objects: u64, bytes: u64, complete: bool) {
        if complete {
            self.begin(objects, bytes);
        }
    }
    fn object_done(&self, bytes: u64);
    /// Something the user should know (a stale lock taken over, say).
    fn note(&self, _text: &str) {}
}

impl Progress for () {
    fn object_done(&self, _: u64) {}
}

/// Takes a backup of `source`'s buckets into `repo`; its manifest.
pub async fn backup(
    source: &Endpoint,
    repo: &Repo<'_>,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<Manifest, BackupError> {
    let mut lock = Lock::acquire(repo.target, "backup").await?;
    if let Some(old) = &lock.took_over {
        progress.note(&format!(
            "took over the lock {} left at {} (its {} had stopped)",
            old.holder,
            repo.target.describe(),
            if old.operation.is_empty() {
                "work"
            } else {
                &old.operation
            }
        ));
    }
    let res = backup_locked(source, repo, opts, progress, &mut lock).await;
    let released = lock.release(repo.target).await;
    let m = res?;
    released?;
    Ok(m)
}

async fn backup_locked(
    source: &Endpoint,
    repo: &Repo<'_>,
    opts: &BackupOptions,
    progress: &dyn Progress,
    lock: &mut Lock,
) -> Result<Manifest, BackupError> {
    let (time, id) = now_and_id();
    let mut buckets: Vec<String> = if opts.buckets.is_empty() {
        source.buckets().await?
    } else {
        opts.buckets.clone()
    };
    buckets.sort();
    buckets.dedup();
    let all = repo.manifests().await?;
    let same: Vec<&Manifest> = all.iter().filter(|m| m.buckets == buckets).collect();
    let asked = opts.kind.unwrap_or(Kind::Incremental);
    let parent = match asked {
        Kind::Full => None,
        Kind::Incremental => same.last().copied(),
        Kind::Differential => same.iter().rev().find(|m| m.kind == Kind::Full).copied(),
    };
    let kind = if parent.is_none() { Kind::Full } else { asked };
    let held = match parent {
        Some(p) => Some(repo.state_stream(&all, &p.id)?),
        None => None,
    };
    let parent_id = parent.map(|p| p.id.clone());
    let bucket_settings = match &source.settings {
        Some(s) => s
            .classes()
            .await?
            .into_iter()
            .filter(|(b, _)| buckets.contains(b))
            .map(|(b, class)| (b, serde_json::json!({ "class": class })))
            .collect(),
        None => {
            progress.note(
                "the buckets' own settings (storage class) are not recorded: no admin access to the source",
            );
            BTreeMap::new()
        }
    };
    // The listing runs ahead of the reads by up to LISTED_AHEAD objects (for
    // most buckets, all of them: the progress knows the whole work at once)
    // and is merged, in key order, with the parent's state: a key of the
    // parent's that the listing passes by is a delete. Changes go to the
    // target a page at a time, in that order.
    let (found, listed) =
        futures::channel::mpsc::channel::<Result<(String, Listed), BackupError>>(LISTED_AHEAD);
    let lister = list_in_order(source, &buckets, found, progress);
    let mut pages = PageWriter::new(repo, &id);
    let (mut bytes_stored, mut bytes_new, mut bytes, mut objects) = (0u64, 0u64, 0u64, 0u64);
    let mut renewed = std::time::Instant::now();
    // Unchanged objects are taken from the parent as they are; changed ones are
    // read, up to OBJECTS_IN_FLIGHT at once while the chunks they hold fit in
    // MEMORY_IN_FLIGHT (small objects are bound by round trips and fsyncs,
    // not bandwidth: many go at once), their results taken in listing order.
    let memory = tokio::sync::Semaphore::new(MEMORY_IN_FLIGHT_KIB as usize);
    let memory = &memory;
    let (step_tx, steps) =
        futures::channel::mpsc::channel::<Result<Step, BackupError>>(OBJECTS_IN_FLIGHT);
    let merger = merge_with_parent(listed, held, step_tx);
    let results = steps
        .map(|step| async move {
            Ok::<_, BackupError>(match step? {
                Step::Gone(k) => Taken::Gone(k),
                Step::Listed((bucket, (key, size, etag, modified)), had) => {
                    let got = match &had {
                        Some(h) if manifest::unchanged(h, size, &etag, &modified) => {
                            Some(Captured::Held(size))
                        }
                        _ => {
                            let _held = memory
                                .acquire_many(capture_kib(size))
                                .await
                                .map_err(|e| BackupError::Target(format!("backup stopped: {e}")))?;
                            capture(source, repo, &bucket, &key, &etag, &modified)
                                .await?
                                .map(|(entry, stored)| Captured::Read(entry, stored))
                        }
                    };
                    Taken::Listed((bucket, key), had, got)
                }
            })
        })
        .buffered(OBJECTS_IN_FLIGHT);
    let merged = async {
        // Owned here: when this ends, early or not, the listing stops too.
        let mut results = results;
        loop {
            // The lock is renewed on time even while one large object takes long.
            let renew_at = renewed + crate::lock::LOCK_TTL / 3;
            let r = tokio::select! {
                r = results.next() => r,
                _ = tokio::time::sleep_until(renew_at.into()) => {
                    lock.renew(repo.target).await?;
                    renewed = std::time::Instant::now();
                    continue;
                }
            };
            let Some(r) = r else { break };
            let (k, had, got) = match r? {
                Taken::Gone(k) => {
                    pages.push(deleted(&k)).await?;
                    continue;
                }
                Taken::Listed(k, had, got) => (k, had, got),
            };
            let size = match got {
                // Deleted since the listing.
                None => {
                    if had.is_some() {
                        pages.push(deleted(&k)).await?;
                    }
                    continue;
                }
                Some(Captured::Held(size)) => size,
                Some(Captured::Read(entry, stored)) => {
                    bytes_stored += stored;
                    bytes_new += entry.size;
                    let size = entry.size;
                    if had.as_ref() != Some(&entry) {
                        pages.push(Change::Put(entry)).await?;
                    }
                    size
                }
            };
            bytes += size;
            objects += 1;
            progress.object_done(size);
        }
        Ok::<(), BackupError>(())
    };
    let ((), (), merged) = futures::join!(lister, merger, merged);
    merged?;
    let (finished, _) = now_and_id();
    let m = Manifest {
        format: MANIFEST_FORMAT,
        id,
        kind,
        parent: parent_id,
        buckets,
        time,
        finished,
        objects,
        bytes,
        bytes_stored,
        bytes_new,
        bucket_settings,
        pages: 0,
        sorted: true,
    };
    pages.commit(m).await
}

/// One step of a backup's merge of the listing with its parent's state (a
/// few are in flight at once: their size does not matter).
#[allow(clippy::large_enum_variant)]
enum Step {
    /// A key the parent held that the listing passed by.
    Gone((String, String)),
    /// A listed object (bucket, listing), and the parent's entry for it.
    Listed((String, Listed), Option<ObjectEntry>),
}

/// What a backup took of one step.
#[allow(clippy::large_enum_variant)]
enum Taken {
    Gone((String, String)),
    /// A listed object, the parent's entry for it, and what was taken (none:
    /// deleted since the listing).
    Listed((String, String), Option<ObjectEntry>, Option<Captured>),
}

/// Merges `listed` (in key order) with the parent's state `held` into `steps`,
/// until either ends; an error is sent as the last step.
async fn merge_with_parent(
    mut listed: futures::channel::mpsc::Receiver<Result<(String, Listed), BackupError>>,
    mut held: Option<crate::repo::StateStream<'_, '_>>,
    mut steps: futures::channel::mpsc::Sender<Result<Step, BackupError>>,
) {
    let mut next = None;
    loop {
        let step = merge_step(&mut listed, &mut held, &mut next).await;
        let end = !matches!(step, Ok(Some(_)));
        let Some(step) = step.transpose() else { return };
        if steps.send(step).await.is_err() || end {
            return;
        }
    }
}

/// The next step of the merge of `listed` (in key order) with the parent's
/// state `held`; `next` holds a listed object not yet merged.
async fn merge_step(
    listed: &mut futures::channel::mpsc::Receiver<Result<(String, Listed), BackupError>>,
    held: &mut Option<crate::repo::StateStream<'_, '_>>,
    next: &mut Option<(String, Listed)>,
) -> Result<Option<Step>, BackupError> {
    if next.is_none() {
        *next = listed.next().await.transpose()?;
    }
    let order = match held.as_mut() {
        Some(h) => h.peek().await?.map(|e| match next.as_ref() {
            None => std::cmp::Ordering::Less,
            Some((b, l)) => (e.bucket.as_str(), e.key.as_str()).cmp(&(b.as_str(), l.0.as_str())),
        }),
        None => None,
    };
    let (take_held, take_listed) = match order {
        Some(std::cmp::Ordering::Less) => (true, false),
        Some(std::cmp::Ordering::Equal) => (true, true),
        _ => (false, true),
    };
    let had = match held.as_mut() {
        Some(h) if take_held => h.next().await?,
        _ => None,
    };
    Ok(match (take_listed, had) {
        (false, Some(e)) => Some(Step::Gone((e.bucket, e.key))),
        (false, None) => None,
        (true, had) => next.take().map(|l| Step::Listed(l, had)),
    })
}

/// The change that deletes the object `k` (bucket, key).
fn deleted(k: &(String, String)) -> Change {
    Change::Delete {
        bucket: k.0.clone(),
        key: k.1.clone(),
    }
}

/// Lists `buckets` (sorted) into `found`, a page at a time, telling
/// `progress` what is listed; a listing out of key order is an error (a
/// backup merges it with its parent's state by key). Stops when `found` is
/// dropped; an error is sent as the last item.
async fn list_in_order(
    source: &Endpoint,
    buckets: &[String],
    mut found: futures::channel::mpsc::Sender<Result<(String, Listed), BackupError>>,
    progress: &dyn Progress,
) {
    let (mut objects, mut bytes) = (0u64, 0u64);
    for bucket in buckets {
        let mut last: Option<String> = None;
        let mut listing = std::pin::pin!(source.list_pages(bucket, ""));
        while let Some(page) = listing.next().await {
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    let _ = found.send(Err(e)).await;
                    return;
                }
            };
            objects += page.len() as u64;
            bytes += page.iter().map(|o| o.1).sum::<u64>();
            progress.listed(objects, bytes, false);
            for o in page {
                if last.as_ref().is_some_and(|l| *l >= o.0) {
                    let _ = found
                        .send(Err(BackupError::Source(format!(
                            "{} listed bucket {bucket} out of key order ('{}' after '{}')",
                            source.url,
                            o.0,
                            last.unwrap_or_default()
                        ))))
                        .await;
                    return;
                }
                last = Some(o.0.clone());
                if found.send(Ok((bucket.clone(), o))).await.is_err() {
                    return;
                }
            }
        }
    }
    progress.listed(objects, bytes, true);
}

/// Objects a backup's listing may run ahead of its reads (each about 150
/// bytes in memory).
const LISTED_AHEAD: usize = 100_000;

/// Reads one object and stores its chunks; its entry and the bytes its new
/// chunks took at the target, or `None` if it is gone. The entry keeps the
/// ETag and time the listing showed (`etag`, `modified`), which the next
/// backup's listing is compared with, unless the object changed since.
async fn capture(
    source: &Endpoint,
    repo: &Repo<'_>,
    bucket: &str,
    key: &str,
    etag: &str,
    modified: &str,
) -> Result<Option<(ObjectEntry, u64)>, BackupError> {
    let resp = match source
        .client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => return Ok(None),
        Err(e) => return Err(source.fail(&format!("reading {bucket}/{key}"), e)),
    };
    let expected = resp.content_length().unwrap_or(0).max(0) as u64;
    let got_etag = resp.e_tag().unwrap_or_default().to_string();
    let same = got_etag.trim_matches('"') == etag.trim_matches('"');
    let mut entry = ObjectEntry {
        bucket: bucket.to_string(),
        key: key.to_string(),
        size: 0,
        etag: if same { etag.to_string() } else { got_etag },
        content_type: resp.content_type().map(str::to_string),
        metadata: resp
            .metadata()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
        modified: match same {
            true => modified.to_string(),
            false => resp.last_modified().map(rfc3339).unwrap_or_default(),
        },
        chunks: Vec::new(),
        sealed: Vec::new(),
    };
    // Reading the object overlaps storing its chunks: the reader cuts chunks
    // (hashing each frame as it is copied in) and hands them over (at most one
    // waiting), and up to STORES_IN_FLIGHT are sealed and written at once,
    // their order kept.
    let (tx, rx) = futures::channel::mpsc::channel::<crate::repo::Chunk>(0);
    let reader = async move {
        let mut tx = tx;
        let mut body = resp.body;
        // A chunk's buffer is taken when its first bytes come (sized for what
        // is left of the object), not ahead: a buffer is held only for bytes.
        let mut buf: Option<crate::repo::Chunk> = None;
        let (mut cut, mut sent) = (0u64, false);
        loop {
            let next = body
                .try_next()
                .await
                .map_err(|e| source.fail(&format!("reading {bucket}/{key}"), e))?;
            let Some(b) = next else { break };
            let mut b = &b[..];
            while !b.is_empty() {
                let chunk =
                    buf.get_or_insert_with(|| repo.chunk_buffer_for(expected.saturating_sub(cut)));
                let (took, full) = repo.chunk_bytes(chunk, b);
                b = &b[took..];
                cut += took as u64;
                if full && let Some(full) = buf.take() {
                    if tx.send(full).await.is_err() {
                        return Ok(()); // the writer failed: its error is the one told
                    }
                    sent = true;
                }
            }
        }
        // The last, partial chunk; or an empty object's one empty chunk.
        let last = match buf {
            Some(chunk) => Some(chunk),
            None if !sent => Some(repo.chunk_buffer_for(0)),
            None => None,
        };
        if let Some(chunk) = last {
            let _ = tx.send(chunk).await;
        }
        Ok::<(), BackupError>(())
    };
    let writer = async {
        let mut stored = 0u64;
        let mut done = rx
            .map(|chunk| repo.put_chunk(chunk))
            .buffered(STORES_IN_FLIGHT);
        while let Some(r) = done.next().await {
            let (id, len, n, new) = r?;
            entry.chunks.push(id);
            entry.sealed.push(n);
            entry.size += len;
            stored += if new { n } else { 0 };
        }
        Ok::<u64, BackupError>(stored)
    };
    let ((), stored) = futures::try_join!(reader, writer)?;
    Ok(Some((entry, stored)))
}

/// What a backup took of one listed object.
enum Captured {
    /// Unchanged since the parent: its entry there stands (its size).
    Held(u64),
    /// Read again: its entry, and the bytes its new chunks took.
    Read(ObjectEntry, u64),
}

/// The most objects a backup reads at once (as many as their chunks fit in
/// [`MEMORY_IN_FLIGHT_KIB`]: small ones, this many; large ones, three).
const OBJECTS_IN_FLIGHT: usize = 32;

/// The memory that chunks of objects being read may hold at once, in KiB:
/// 96 MiB, twelve whole chunks.
const MEMORY_IN_FLIGHT_KIB: u32 = 96 << 10;

/// What reading an object of `size` bytes is counted for against
/// [`MEMORY_IN_FLIGHT_KIB`]: a small object, its own size; a larger one, a
/// whole chunk for each it is cut into, up to the most it holds at once
/// (STORES_IN_FLIGHT being stored, one waiting, one being read).
fn capture_kib(size: u64) -> u32 {
    in_flight_kib(size, || {
        let chunks = size
            .div_ceil(crate::repo::CHUNK_SIZE as u64)
            .min(STORES_IN_FLIGHT as u64 + 2);
        chunks * crate::repo::CHUNK_SIZE as u64
    })
}

/// An object's count against [`MEMORY_IN_FLIGHT_KIB`], never more than all
/// of it: a small object's size and a little for its request, else what
/// `large` says it holds.
fn in_flight_kib(size: u64, large: impl FnOnce() -> u64) -> u32 {
    let bytes = match size < crate::repo::SMALL_OBJECT {
        true => size + 64 * 1024,
        false => large(),
    };
    bytes.div_ceil(1024).min(MEMORY_IN_FLIGHT_KIB as u64) as u32
}

/// Chunks of one object hashed, sealed and written at once.
const STORES_IN_FLIGHT: usize = 2;

/// What to restore, and where.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// The buckets of the backup to restore (none: all it holds).
    pub buckets: Vec<String>,
    /// Restore into this bucket instead (one source bucket only).
    pub to_bucket: Option<String>,
    /// Only keys starting with this.
    pub prefix: Option<String>,
    /// Restore into non-empty buckets, deleting what the backup does not hold.
    pub force: bool,
}

/// What a restore did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreReport {
    pub objects: u64,
    pub bytes: u64,
    pub deleted: u64,
    /// Objects not written: each with the damaged chunk or file that kept it out.
    pub failed: Vec<String>,
}

/// Restores backup `m` into `dest`.
pub async fn restore(
    repo: &Repo<'_>,
    all: &[Manifest],
    m: &Manifest,
    dest: &Endpoint,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport, BackupError> {
    let wanted: BTreeSet<String> = if opts.buckets.is_empty() {
        m.buckets.iter().cloned().collect()
    } else {
        for b in &opts.buckets {
            if !m.buckets.contains(b) {
                return Err(BackupError::Usage(format!(
                    "backup {} holds no bucket {b} (it holds {})",
                    m.id,
                    m.buckets.join(", ")
                )));
            }
        }
        opts.buckets.iter().cloned().collect()
    };
    if opts.to_bucket.is_some() && wanted.len() != 1 {
        return Err(BackupError::Usage(
            "--to-bucket needs exactly one source bucket (--bucket B)".into(),
        ));
    }
    let dest_of = |b: &str| opts.to_bucket.clone().unwrap_or_else(|| b.to_string());
    let prefix = opts.prefix.clone().unwrap_or_default();
    let in_scope = |o: &ObjectEntry| wanted.contains(&o.bucket) && o.key.starts_with(&prefix);
    // Every destination checked before anything is written.
    for b in &wanted {
        let d = dest_of(b);
        // With --force only whether the bucket exists matters (what it holds
        // is merged with the backup after the writes).
        let held = match opts.force {
            true => dest
                .client
                .head_bucket()
                .bucket(&d)
                .send()
                .await
                .map(|_| 0)
                .map_err(drop),
            false => dest.count(&d, &prefix).await.map_err(drop),
        };
        match held {
            Ok(0) => {}
            Ok(n) => {
                return Err(BackupError::Usage(format!(
                    "bucket {d} is not empty ({n} objects{}): restore into another (--to-bucket), or give --force to replace what it holds",
                    if prefix.is_empty() {
                        String::new()
                    } else {
                        format!(" under {prefix}")
                    }
                )));
            }
            Err(()) => {
                dest.client
                    .create_bucket()
                    .bucket(&d)
                    .send()
                    .await
                    .map_err(|e| dest.fail(&format!("creating bucket {d}"), e))?;
            }
        }
    }
    // The buckets' settings before their objects (a storage class applies to
    // objects written after it is set).
    for b in &wanted {
        let Some(settings) = m.bucket_settings.get(b) else {
            continue;
        };
        let d = dest_of(b);
        match &dest.settings {
            Some(s) => s.set_class(&d, settings["class"].as_str()).await?,
            None => progress.note(&format!(
                "bucket {d}: its settings in the backup ({settings}) are not restored: no admin access to the destination"
            )),
        }
    }
    // The objects are read from the backup's chain as they are written (one
    // page per backup in memory); the totals, when not the backup's own,
    // from a first pass over it.
    let (objects, bytes) = if opts.buckets.is_empty() && prefix.is_empty() {
        (m.objects, m.bytes)
    } else {
        let (mut n, mut b) = (0, 0);
        let mut state = repo.state_stream(all, &m.id)?;
        while let Some(o) = state.next().await? {
            if in_scope(&o) {
                n += 1;
                b += o.size;
            }
        }
        (n, b)
    };
    progress.begin(objects, bytes);
    let mut report = RestoreReport::default();
    let mut state = repo.state_stream(all, &m.id)?;
    // Up to RESTORES_IN_FLIGHT objects are written at once, as many as their
    // bytes fit in MEMORY_IN_FLIGHT_KIB (small objects are bound by round
    // trips). The first error (of the destination, or reading the backup's
    // pages) stops new ones from starting; those under way finish, so that no
    // upload is left open.
    let memory = tokio::sync::Semaphore::new(MEMORY_IN_FLIGHT_KIB as usize);
    let memory = &memory;
    let mut writing = futures::stream::FuturesUnordered::new();
    let mut fatal: Option<BackupError> = None;
    let mut listed = true;
    loop {
        while listed && fatal.is_none() && writing.len() < RESTORES_IN_FLIGHT {
            match state.next().await {
                Ok(Some(o)) if in_scope(&o) => {
                    let d = dest_of(&o.bucket);
                    writing.push(async move {
                        let r = match memory.acquire_many(restore_kib(&o)).await {
                            Ok(_held) => put_object(repo, dest, &d, &o).await,
                            Err(e) => Err(BackupError::Target(format!("restore stopped: {e}"))),
                        };
                        (o, r)
                    });
                }
                Ok(Some(_)) => {}
                Ok(None) => listed = false,
                Err(e) => fatal = Some(e),
            }
        }
        let Some((o, r)) = writing.next().await else {
            break;
        };
        match r {
            Ok(Ok(())) => {
                report.objects += 1;
                report.bytes += o.size;
                progress.object_done(o.size);
            }
            Ok(Err(why)) => report.failed.push(format!("{}/{}: {why}", o.bucket, o.key)),
            Err(e) => {
                fatal.get_or_insert(e);
            }
        }
    }
    if let Some(e) = fatal {
        return Err(e);
    }
    report.failed.sort();
    // With --force, what the backup does not hold goes: each destination's
    // listing merged, in key order, with the backup's objects.
    if opts.force {
        for b in &wanted {
            let d = dest_of(b);
            let mut held = repo.state_stream(all, &m.id)?;
            let mut listing = std::pin::pin!(dest.list_pages(&d, &prefix));
            while let Some(page) = listing.next().await {
                // What goes is deleted a listing page at a time, in batches.
                let mut gone = Vec::new();
                for (k, ..) in page? {
                    let here = (b.as_str(), k.as_str());
                    while held
                        .peek()
                        .await?
                        .is_some_and(|o| (o.bucket.as_str(), o.key.as_str()) < here)
                    {
                        held.next().await?;
                    }
                    let kept = held
                        .peek()
                        .await?
                        .is_some_and(|o| (o.bucket.as_str(), o.key.as_str()) == here);
                    if !kept {
                        gone.push(k);
                    }
                }
                report.deleted += dest.delete_keys(&d, gone).await?;
            }
        }
    }
    Ok(report)
}

/// The most objects a restore writes at once (as many as fit in
/// [`MEMORY_IN_FLIGHT_KIB`]: small ones, this many; large ones, three).
const RESTORES_IN_FLIGHT: usize = 32;

/// Parts of one object a restore reads and sends at once.
const PARTS_IN_FLIGHT: usize = 2;

/// What writing an object back is counted for against
/// [`MEMORY_IN_FLIGHT_KIB`]: a small object, its own size; a larger one, for
/// each part in flight, a chunk's sealed bytes and its plain ones.
fn restore_kib(o: &ObjectEntry) -> u32 {
    in_flight_kib(o.size, || {
        let per_part = chunks_per_part(o.chunks.len()) as u64 * crate::repo::CHUNK_SIZE as u64;
        (o.chunks.len() as u64).min(PARTS_IN_FLIGHT as u64) * per_part * 2
    })
}

/// The most parts an S3 multipart upload may have.
const MAX_PARTS: usize = 10_000;

/// How many consecutive chunks go into one part of a restored object: one, but
/// for objects of more than [`MAX_PARTS`] chunks (over 80 GiB), as few as keep
/// the count of parts within the limit.
fn chunks_per_part(chunks: usize) -> usize {
    chunks.div_ceil(MAX_PARTS).max(1)
}

/// Writes one object from its chunks, each checked before it is sent; an
/// object with a bad chunk is not written (Ok(Err(why))).
async fn put_object(
    repo: &Repo<'_>,
    dest: &Endpoint,
    bucket: &str,
    o: &ObjectEntry,
) -> Result<Result<(), String>, BackupError> {
    let meta: Option<std::collections::HashMap<String, String>> = if o.metadata.is_empty() {
        None
    } else {
        Some(o.metadata.clone().into_iter().collect())
    };
    if o.chunks.len() <= 1 {
        let data = match o.chunks.first() {
            Some(id) => match repo.get_chunk(id).await {
                Ok(d) => d,
                Err(e) => return Ok(Err(e.to_string())),
            },
            None => Vec::new(),
        };
        dest.client
            .put_object()
            .bucket(bucket)
            .key(&o.key)
            .set_content_type(o.content_type.clone())
            .set_metadata(meta)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| dest.fail(&format!("writing {bucket}/{}", o.key), e))?;
        return Ok(Ok(()));
    }
    let up = dest
        .client
        .create_multipart_upload()
        .bucket(bucket)
        .key(&o.key)
        .set_content_type(o.content_type.clone())
        .set_metadata(meta)
        .send()
        .await
        .map_err(|e| dest.fail(&format!("writing {bucket}/{}", o.key), e))?;
    let upload_id = up.upload_id().unwrap_or_default().to_string();
    let abort = || async {
        let _ = dest
            .client
            .abort_multipart_upload()
            .bucket(bucket)
            .key(&o.key)
            .upload_id(&upload_id)
            .send()
            .await;
    };
    // Up to PARTS_IN_FLIGHT parts are read and sent at once (reading one
    // overlaps sending the one before), each checked before it is sent.
    let upload = upload_id.as_str();
    let mut sent =
        futures::stream::iter(o.chunks.chunks(chunks_per_part(o.chunks.len())).enumerate())
            .map(|(n, group)| async move {
                let mut data = Vec::new();
                for id in group {
                    match repo.get_chunk(id).await {
                        Ok(d) if data.is_empty() => data = d,
                        Ok(d) => data.extend_from_slice(&d),
                        Err(e) => return Ok(Err(e.to_string())),
                    }
                }
                let part = (n + 1) as i32;
                let r = dest
                    .client
                    .upload_part()
                    .bucket(bucket)
                    .key(&o.key)
                    .upload_id(upload)
                    .part_number(part)
                    .body(ByteStream::from(data))
                    .send()
                    .await
                    .map_err(|e| dest.fail(&format!("writing {bucket}/{}", o.key), e))?;
                Ok::<_, BackupError>(Ok(aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(part)
                    .set_e_tag(r.e_tag().map(str::to_string))
                    .build()))
            })
            .buffered(PARTS_IN_FLIGHT);
    let mut parts = Vec::new();
    while let Some(r) = sent.next().await {
        match r {
            Ok(Ok(p)) => parts.push(p),
            Ok(Err(why)) => {
                drop(sent);
                abort().await;
                return Ok(Err(why));
            }
            Err(e) => {
                drop(sent);
                abort().await;
                return Err(e);
            }
        }
    }
    dest.client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(&o.key)
        .upload_id(&upload_id)
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .map_err(|e| dest.fail(&format!("writing {bucket}/{}", o.key), e))?;
    Ok(Ok(()))
}

/// What a verify found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub backups: u64,
    pub chunks: u64,
    /// Each problem, naming the file at the target it is about.
    pub problems: Vec<String>,
}

/// Checks the backups at a target (or only `id` and its chain): every manifest
/// and page can be read, every chain reaches a full backup, and every chunk a
/// backup needs is there with the size it was written at; with `read_data`,
/// every chunk is read and checked against its name too.
pub async fn verify(
    repo: &Repo<'_>,
    id: Option<&str>,
    read_data: bool,
) -> Result<VerifyReport, BackupError> {
    verify_within(repo, id, read_data, NAMED_AT_ONCE).await
}

/// [`verify`], remembering at most `limit` chunks it looked at.
async fn verify_within(
    repo: &Repo<'_>,
    id: Option<&str>,
    read_data: bool,
    limit: usize,
) -> Result<VerifyReport, BackupError> {
    let (all, bad) = repo.manifests_checked().await?;
    let mut report = VerifyReport {
        problems: bad.iter().map(|e| e.to_string()).collect(),
        ..Default::default()
    };
    let ids: Vec<&str> = match id {
        Some(i) => {
            if !all.iter().any(|m| m.id == i) {
                report
                    .problems
                    .push(format!("backup {i}: no readable manifest"));
                return Ok(report);
            }
            vec![i]
        }
        None => all.iter().map(|m| m.id.as_str()).collect(),
    };
    // Each chunk is looked at once, whichever backups need it, while their
    // names fit in `limit`; past that, the names are forgotten and a
    // chunk may be looked at again (its problem told once).
    let mut seen: BTreeSet<crate::ChunkId> = BTreeSet::new();
    // Up to CHECKS_IN_FLIGHT chunks are looked at at once.
    let check = |c: crate::ChunkId, sealed: Option<u64>| async move {
        let name = manifest::chunk_name(&c);
        Ok::<_, BackupError>(match (repo.target.size(&name).await?, sealed) {
            (None, _) => Some(format!("{name}: missing")),
            (Some(size), Some(want)) if size != want => {
                Some(format!("{name}: {size} bytes, written as {want}"))
            }
            _ if read_data => repo.get_chunk(&c).await.err().map(|e| e.to_string()),
            _ => None,
        })
    };
    let mut checking = futures::stream::FuturesUnordered::new();
    for i in ids {
        report.backups += 1;
        // The backup's objects as they are read (one page per backup of its
        // chain in memory); a damaged page ends this backup's check.
        let mut state = match repo.state_stream(&all, i) {
            Ok(s) => s,
            Err(e) => {
                report.problems.push(format!("backup {i}: {e}"));
                continue;
            }
        };
        loop {
            let o = match state.next().await {
                Ok(Some(o)) => o,
                Ok(None) => break,
                Err(e) => {
                    report.problems.push(format!("backup {i}: {e}"));
                    break;
                }
            };
            for (n, c) in o.chunks.iter().enumerate() {
                if seen.len() >= limit {
                    seen.clear();
                }
                if !seen.insert(*c) {
                    continue;
                }
                report.chunks += 1;
                checking.push(check(*c, o.sealed.get(n).copied()));
                while checking.len() >= CHECKS_IN_FLIGHT {
                    if let Some(problem) = checking.next().await.transpose()?.flatten() {
                        report.problems.push(problem);
                    }
                }
            }
        }
        // This backup's chunks all looked at before the next backup.
        while let Some(r) = checking.next().await {
            report.problems.extend(r?);
        }
    }
    // A chunk looked at again after its name was forgotten: told once.
    let mut told = BTreeSet::new();
    report.problems.retain(|p| told.insert(p.clone()));
    Ok(report)
}

/// Chunks a verify looks at at once (with `--read-data`, each read whole).
const CHECKS_IN_FLIGHT: usize = 4;

/// Which backups a prune keeps.
#[derive(Clone, Debug, Default)]
pub struct Retention {
    /// The newest this many full backups of each bucket set, with every backup
    /// that counts from them.
    pub keep_full: usize,
    /// Every backup begun within this long before now.
    pub keep_within: std::time::Duration,
}

/// What a prune did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub kept: Vec<String>,
    pub deleted: Vec<String>,
    pub chunks_deleted: u64,
    pub bytes_freed: u64,
    /// Files half written by backups cut short, removed.
    pub temporary_removed: u64,
}

/// Deletes the backups `keep` does not keep, never one a kept backup needs,
/// then the chunks and pages no kept backup names. Refused while any manifest
/// is damaged (the chunks it names cannot be known).
pub async fn prune(repo: &Repo<'_>, keep: &Retention) -> Result<PruneReport, BackupError> {
    let lock = Lock::acquire(repo.target, "prune").await?;
    let res = prune_locked(repo, keep, NAMED_AT_ONCE).await;
    let released = lock.release(repo.target).await;
    let r = res?;
    released?;
    Ok(r)
}

async fn prune_locked(
    repo: &Repo<'_>,
    keep: &Retention,
    limit: usize,
) -> Result<PruneReport, BackupError> {
    let (all, bad) = repo.manifests_checked().await?;
    if let Some(e) = bad.first() {
        return Err(BackupError::Usage(format!(
            "nothing pruned while a manifest is damaged ({e}); `cairn backup verify` lists every damaged file"
        )));
    }
    let now = time::OffsetDateTime::now_utc();
    let within = time::Duration::try_from(keep.keep_within).unwrap_or(time::Duration::MAX);
    let mut kept: BTreeSet<String> = BTreeSet::new();
    // The newest full backups of each bucket set, and what counts from them.
    let sets: BTreeSet<&Vec<String>> = all.iter().map(|m| &m.buckets).collect();
    for set in sets {
        let fulls: Vec<&Manifest> = all
            .iter()
            .filter(|m| &m.buckets == set && m.kind == Kind::Full)
            .collect();
        for f in fulls.iter().rev().take(keep.keep_full) {
            kept.insert(f.id.clone());
        }
    }
    for m in &all {
        let recent =
            time::OffsetDateTime::parse(&m.time, &time::format_description::well_known::Rfc3339)
                .is_ok_and(|t| now - t <= within);
        let from_kept_full = Repo::chain(&all, &m.id)
            .ok()
            .and_then(|c| c.first().map(|f| kept.contains(&f.id)))
            .unwrap_or(false);
        if recent || from_kept_full {
            kept.insert(m.id.clone());
        }
    }
    // Every backup a kept one needs.
    for id in kept.clone() {
        for m in Repo::chain(&all, &id)? {
            kept.insert(m.id.clone());
        }
    }
    let mut report = PruneReport::default();
    let keeping: Vec<&Manifest> = all.iter().filter(|m| kept.contains(&m.id)).collect();
    // The chunks the kept backups name, read (and every kept page checked)
    // before anything is deleted: all of them if they fit in `limit`,
    // else those of each range of chunk folders in turn, below.
    let first = named_in(repo, &keeping, (0, 256), limit).await?;
    // Manifests first: a backup is gone once its manifest is.
    for m in all.iter().filter(|m| !kept.contains(&m.id)) {
        repo.target.delete(&manifest::manifest_name(&m.id)).await?;
        report.deleted.push(m.id.clone());
    }
    report.kept = all
        .iter()
        .filter(|m| kept.contains(&m.id))
        .map(|m| m.id.clone())
        .collect();
    // Pages of backups deleted, or cut short before their manifest.
    for (name, _) in repo.target.list("backups/").await? {
        let id = name.split('/').nth(1).unwrap_or_default();
        if !kept.contains(id) {
            repo.target.delete(&name).await?;
        }
    }
    // What backups cut short left half written (no backup runs: the lock).
    report.temporary_removed = repo.target.sweep_temporary().await?;
    // Chunk folders (`chunks/00/` to `chunks/ff/`, by a chunk's first byte)
    // in ranges whose named chunks fit in `limit`, halved until they do: one
    // range's names in memory at a time.
    let mut first = Some(first);
    let mut ranges = vec![(0u16, 256u16)];
    while let Some((lo, hi)) = ranges.pop() {
        let named = match first.take() {
            Some(named) => named,
            // One folder's chunks are taken whatever their number.
            None if hi - lo == 1 => named_in(repo, &keeping, (lo, hi), usize::MAX).await?,
            None => named_in(repo, &keeping, (lo, hi), limit).await?,
        };
        let Some(named) = named else {
            let mid = (lo + hi) / 2;
            ranges.push((mid, hi));
            ranges.push((lo, mid));
            continue;
        };
        for folder in lo..hi {
            for (name, size) in repo.target.list(&format!("chunks/{folder:02x}/")).await? {
                let id = name.rsplit('/').next().and_then(crate::ChunkId::from_hex);
                if id.is_none_or(|c| !named.contains(&c)) {
                    repo.target.delete(&name).await?;
                    report.chunks_deleted += 1;
                    report.bytes_freed += size;
                }
            }
        }
    }
    Ok(report)
}

/// The most chunk names a prune holds at once (32 bytes each, and the set's
/// own cost): past that, it works through the chunk folders in ranges.
const NAMED_AT_ONCE: usize = 1 << 20;

/// The chunks whose first byte is in `range` that the backups `keeping`
/// name, or `None` if there are more than `limit` of them (every page is
/// read and checked all the same).
async fn named_in(
    repo: &Repo<'_>,
    keeping: &[&Manifest],
    range: (u16, u16),
    limit: usize,
) -> Result<Option<BTreeSet<crate::ChunkId>>, BackupError> {
    let mut named = Some(BTreeSet::new());
    for m in keeping {
        for n in 0..m.pages {
            for c in repo.page(m, n).await? {
                let (Change::Put(o), Some(set)) = (c, named.as_mut()) else {
                    continue;
                };
                let inside = |c: &crate::ChunkId| (range.0..range.1).contains(&(c.0[0] as u16));
                set.extend(o.chunks.into_iter().filter(inside));
                if set.len() > limit {
                    named = None;
                }
            }
        }
    }
    Ok(named)
}

/// A duration as `30s`, `15m`, `12h`, `30d` or `2w`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, BackupError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| BackupError::Usage(format!("'{s}' is not a duration (like 12h or 30d)")))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => {
            return Err(BackupError::Usage(format!(
                "'{s}' is not a duration (a number and s, m, h, d or w: 12h, 30d)"
            )));
        }
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What objects in flight may hold: many small ones at once, three large
    /// ones (as many chunks as the pool keeps), and never more than the
    /// budget, whatever the size.
    #[test]
    fn objects_in_flight_are_counted_by_the_memory_they_hold() {
        use crate::repo::CHUNK_SIZE;
        let budget = MEMORY_IN_FLIGHT_KIB;
        let entry = crate::repo::tests::entry;
        let large = |chunks: usize| ObjectEntry {
            size: (chunks * CHUNK_SIZE) as u64,
            chunks: vec![crate::codec::ChunkId([0; 32]); chunks],
            ..entry("b", "k", 0)
        };
        for size in [0u64, 1, 4096, 1 << 19] {
            assert!(capture_kib(size) as usize * OBJECTS_IN_FLIGHT <= budget as usize);
            let small = entry("b", "k", size);
            assert!(restore_kib(&small) as usize * RESTORES_IN_FLIGHT <= budget as usize);
        }
        assert_eq!(budget / capture_kib(64 << 20), 3);
        assert_eq!(budget / restore_kib(&large(8)), 3);
        assert_eq!(budget / capture_kib(16 << 20), 6);
        for size in [1u64 << 20, 8 << 20, 9 << 20, 1 << 40, u64::MAX] {
            assert!((1..=budget).contains(&capture_kib(size)), "{size}");
        }
        assert!((1..=budget).contains(&restore_kib(&large(20_000))));
    }

    /// Verify reads a backup's objects page by page: a missing chunk, a
    /// chunk of the wrong size and a damaged page are each named, and a
    /// damaged page of one backup does not hide another backup's state.
    #[tokio::test]
    async fn verify_names_missing_chunks_and_damaged_pages() {
        use crate::manifest::{chunk_name, page_name};
        use crate::target::{LocalTarget, Target};
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::new(dir.path());
        let repo = Repo::open(&t, None, true).await.unwrap();
        let chunk = |bytes: &[u8]| {
            let mut b = repo.chunk_buffer();
            repo.chunk_bytes(&mut b, bytes);
            b
        };
        let (a, _, a_sealed, _) = repo.put_chunk(chunk(b"first")).await.unwrap();
        let (b, _, b_sealed, _) = repo.put_chunk(chunk(b"second")).await.unwrap();
        let entry = |key: &str, c: crate::ChunkId, sealed: u64| ObjectEntry {
            size: 5,
            chunks: vec![c],
            sealed: vec![sealed],
            ..crate::repo::tests::entry("b", key, 0)
        };
        let manifest = |id: &str| Manifest {
            sorted: true,
            ..crate::repo::tests::manifest(id, Kind::Full, None)
        };
        repo.commit(manifest("1"), &[Change::Put(entry("x", a, a_sealed))])
            .await
            .unwrap();
        repo.commit(manifest("2"), &[Change::Put(entry("y", b, b_sealed))])
            .await
            .unwrap();
        let clean = verify(&repo, None, true).await.unwrap();
        assert_eq!((clean.backups, clean.chunks), (2, 2));
        assert!(clean.problems.is_empty(), "{:?}", clean.problems);
        // The first chunk cut short, the second gone, backup 2's page damaged.
        let path = |name: &str| dir.path().join(name);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path(&chunk_name(&a)))
            .unwrap();
        f.set_len(a_sealed - 1).unwrap();
        t.delete(&chunk_name(&b)).await.unwrap();
        std::fs::write(path(&page_name("2", 0)), b"damaged").unwrap();
        let r = verify(&repo, None, false).await.unwrap();
        let all = r.problems.join("\n");
        assert!(
            all.contains(&format!("{}: {} bytes", chunk_name(&a), a_sealed - 1)),
            "{all}"
        );
        assert!(
            all.contains("backup 2") && all.contains(&page_name("2", 0)),
            "{all}"
        );
        // Backup 2's objects were not read: its page is the problem named.
        assert!(!all.contains(&chunk_name(&b)), "{all}");
        assert_eq!(r.problems.len(), 2, "{all}");
    }

    /// A prune whose named chunks do not fit at once works through the chunk
    /// folders in ranges: it deletes exactly the chunks no kept backup names,
    /// as a prune holding every name at once does.
    #[tokio::test]
    async fn a_prune_in_ranges_deletes_exactly_the_unnamed_chunks() {
        use crate::target::{LocalTarget, Target};
        for limit in [3, NAMED_AT_ONCE] {
            let dir = tempfile::tempdir().unwrap();
            let t = LocalTarget::new(dir.path());
            let repo = Repo::open(&t, None, true).await.unwrap();
            let mut chunks = Vec::new();
            for i in 0..40 {
                let mut b = repo.chunk_buffer();
                repo.chunk_bytes(&mut b, format!("chunk {i}").as_bytes());
                chunks.push(repo.put_chunk(b).await.unwrap());
            }
            // Backup 1 names chunks 0-19, backup 2 (the newest full) 10-29;
            // 30-39 are named by none (a run cut short).
            let backup = |id: &str, from: usize, to: usize| {
                let changes: Vec<Change> = (from..to)
                    .map(|i| {
                        let (c, len, sealed, _) = chunks[i];
                        Change::Put(ObjectEntry {
                            size: len,
                            chunks: vec![c],
                            sealed: vec![sealed],
                            ..crate::repo::tests::entry("b", &format!("k{i:02}"), 0)
                        })
                    })
                    .collect();
                let m = Manifest {
                    sorted: true,
                    ..crate::repo::tests::manifest(id, Kind::Full, None)
                };
                (m, changes)
            };
            for (id, from, to) in [("1", 0, 20), ("2", 10, 30)] {
                let (m, changes) = backup(id, from, to);
                repo.commit(m, &changes).await.unwrap();
            }
            // Chunks 10-19 are named twice: a verify remembering 3 chunks
            // looks at some again, but tells the missing one once.
            let lost = manifest::chunk_name(&chunks[15].0);
            let saved = std::fs::read(dir.path().join(&lost)).unwrap();
            t.delete(&lost).await.unwrap();
            let v = verify_within(&repo, None, false, limit).await.unwrap();
            assert_eq!(v.problems, [format!("{lost}: missing")], "limit {limit}");
            match limit {
                3 => assert!(v.chunks > 30, "{}", v.chunks),
                _ => assert_eq!(v.chunks, 30),
            }
            std::fs::write(dir.path().join(&lost), saved).unwrap();
            let keep = Retention {
                keep_full: 1,
                keep_within: std::time::Duration::ZERO,
            };
            let r = prune_locked(&repo, &keep, limit).await.unwrap();
            assert_eq!(
                (r.kept, r.deleted),
                (vec!["2".to_string()], vec!["1".to_string()])
            );
            assert_eq!(r.chunks_deleted, 20, "limit {limit}");
            let left: BTreeSet<String> = t
                .list("chunks/")
                .await
                .unwrap()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            let want: BTreeSet<String> = chunks[10..30]
                .iter()
                .map(|(c, ..)| manifest::chunk_name(c))
                .collect();
            assert_eq!(left, want, "limit {limit}");
            let v = verify(&repo, None, true).await.unwrap();
            assert_eq!((v.backups, v.chunks), (1, 20));
            assert!(v.problems.is_empty(), "{:?}", v.problems);
        }
    }

    #[test]
    fn restored_objects_stay_within_the_part_limit() {
        for chunks in [1, 2, 9_999, 10_000, 10_001, 20_000, 20_001, 655_360] {
            let per = chunks_per_part(chunks);
            assert!(
                chunks.div_ceil(per) <= MAX_PARTS,
                "{chunks} chunks, {per} per part"
            );
            assert!(
                per == 1 || chunks.div_ceil(per - 1) > MAX_PARTS,
                "{chunks}: {per} per part is more than needed"
            );
        }
        assert_eq!(chunks_per_part(10_000), 1);
        assert_eq!(chunks_per_part(10_001), 2);
    }

    #[test]
    fn durations_parse_with_their_unit() {
        assert_eq!(parse_duration("12h").unwrap().as_secs(), 43_200);
        assert_eq!(parse_duration("30d").unwrap().as_secs(), 2_592_000);
        assert_eq!(parse_duration("0s").unwrap().as_secs(), 0);
        for bad in ["", "h", "12", "12x", "-1d", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
