//! Applying a [`Command`] inside a write transaction.
//!
//! Each function checks everything that can make its command fail *before* it changes
//! anything, so a command that fails leaves the transaction as it found it and the
//! other commands of its group commit are unaffected.

use redb::{ReadableTable, Table, WriteTransaction};

use cairn_types::{BlockHash, StorageClass, UnixMillis};

use crate::records::{
    BucketRecord, KeyRecord, Layout, ObjectData, ObjectRecord, PartRecord, UploadRecord, decode,
    encode,
};
use crate::store::{BLOCK_REFS, BUCKETS, CLUSTER, GC_QUEUE, KEYS, LAYOUT, OBJECTS, PARTS, UPLOADS};
use crate::{Command, MetaError, Outcome, Result, WriteCondition, keys};

/// The tables a command may change, opened once per transaction (opening a table
/// costs a lookup in redb's table tree).
pub(crate) struct Tables<'t> {
    buckets: Table<'t, &'static str, &'static [u8]>,
    objects: Table<'t, &'static [u8], &'static [u8]>,
    uploads: Table<'t, &'static [u8], &'static [u8]>,
    parts: Table<'t, &'static [u8], &'static [u8]>,
    refs: Table<'t, &'static [u8], u64>,
    gc: Table<'t, &'static [u8], i64>,
    keys: Table<'t, &'static str, &'static [u8]>,
    cluster: Table<'t, &'static str, &'static [u8]>,
}

impl<'t> Tables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Self> {
        Ok(Tables {
            buckets: txn.open_table(BUCKETS)?,
            objects: txn.open_table(OBJECTS)?,
            uploads: txn.open_table(UPLOADS)?,
            parts: txn.open_table(PARTS)?,
            refs: txn.open_table(BLOCK_REFS)?,
            gc: txn.open_table(GC_QUEUE)?,
            keys: txn.open_table(KEYS)?,
            cluster: txn.open_table(CLUSTER)?,
        })
    }
}

pub(crate) fn apply(tb: &mut Tables<'_>, cmd: &Command) -> Result<Outcome> {
    match cmd {
        Command::CreateBucket { bucket, now } => create_bucket(tb, bucket, *now),
        Command::DeleteBucket { bucket, now } => delete_bucket(tb, bucket, *now),
        Command::PutObject {
            bucket,
            key,
            record,
            cond,
        } => put_object(tb, bucket, key, record, cond).map(|_| Outcome::Done),
        Command::DeleteObject { bucket, key, now } => delete_object(tb, bucket, key, *now),
        Command::CreateUpload {
            bucket,
            key,
            upload_id,
            record,
        } => create_upload(tb, bucket, key, upload_id, record),
        Command::PutPart {
            bucket,
            key,
            upload_id,
            part_number,
            record,
        } => put_part(tb, bucket, key, upload_id, *part_number, record),
        Command::CompleteUpload {
            bucket,
            key,
            upload_id,
            parts,
            record,
            cond,
        } => complete_upload(tb, bucket, key, upload_id, parts, record.clone(), cond),
        Command::AbortUpload {
            bucket,
            key,
            upload_id,
            now,
        } => abort_upload(tb, bucket, key, upload_id, *now),
        Command::PutKey { access_key, record } => put_key(tb, access_key, record),
        Command::GcForget { entries } => gc_forget(tb, entries),
        Command::SetLayoutNode { node } => change_layout(tb, |l| {
            match l.nodes.iter_mut().find(|n| n.id == node.id) {
                Some(n) => *n = node.clone(),
                None => {
                    if l.nodes.is_empty() && l.replication == 0 {
                        l.replication = crate::DEFAULT_REPLICATION;
                    }
                    l.nodes.push(node.clone());
                    l.nodes.sort_by_key(|n| n.id);
                }
            }
            Ok(())
        }),
        Command::RemoveLayoutNode { id } => change_layout(tb, |l| {
            l.nodes.retain(|n| n.id != *id);
            Ok(())
        }),
        Command::SetReplication {
            replication,
            write_quorum,
        } => change_layout(tb, |l| {
            if *replication == 0 || write_quorum > replication {
                return Err(MetaError::Refused(format!(
                    "replication {replication} with write quorum {write_quorum}: \
                     the replication factor must be at least 1 and the quorum at most it"
                )));
            }
            l.replication = *replication;
            l.write_quorum = *write_quorum;
            Ok(())
        }),
        Command::SetDefaultClass { class } => change_layout(tb, |l| {
            l.check_class(*class)?;
            l.default_class = *class;
            Ok(())
        }),
        Command::SetBucketClass { bucket, class } => set_bucket_class(tb, bucket, *class),
    }
}

fn set_bucket_class(
    tb: &mut Tables<'_>,
    bucket: &str,
    class: Option<StorageClass>,
) -> Result<Outcome> {
    let layout = read_layout(&tb.cluster)?;
    if let Some(c) = class {
        layout.check_class(c)?;
    }
    let t = &mut tb.buckets;
    let mut rec = match t.get(bucket)? {
        Some(v) => BucketRecord::decode(v.value())?,
        None => return Err(MetaError::NoSuchBucket),
    };
    rec.class = class;
    t.insert(bucket, encode(&rec)?.as_slice())?;
    Ok(Outcome::Done)
}

fn require_bucket(tb: &mut Tables<'_>, bucket: &str) -> Result<()> {
    let t = &tb.buckets;
    if t.get(bucket)?.is_none() {
        return Err(MetaError::NoSuchBucket);
    }
    Ok(())
}

fn create_bucket(tb: &mut Tables<'_>, bucket: &str, now: UnixMillis) -> Result<Outcome> {
    let t = &mut tb.buckets;
    if t.get(bucket)?.is_some() {
        return Err(MetaError::BucketAlreadyOwnedByYou);
    }
    let rec = BucketRecord {
        created: now,
        class: None,
    };
    t.insert(bucket, encode(&rec)?.as_slice())?;
    Ok(Outcome::Done)
}

fn delete_bucket(tb: &mut Tables<'_>, bucket: &str, now: UnixMillis) -> Result<Outcome> {
    require_bucket(tb, bucket)?;
    let (lo, hi) = keys::bucket_range(bucket);
    {
        let objects = &tb.objects;
        if objects
            .range(lo.as_slice()..hi.as_slice())?
            .next()
            .is_some()
        {
            return Err(MetaError::BucketNotEmpty);
        }
    }
    // Uploads in progress do not keep a bucket alive: they are aborted with it.
    let uploads: Vec<(String, String)> = {
        let t = &tb.uploads;
        let mut out = Vec::new();
        for item in t.range(lo.as_slice()..hi.as_slice())? {
            let (k, _) = item?;
            if let Some((key, id)) = keys::split_upload(bucket, k.value()) {
                out.push((key.to_string(), id.to_string()));
            }
        }
        out
    };
    for (key, id) in uploads {
        abort_upload(tb, bucket, &key, &id, now)?;
    }
    tb.buckets.remove(bucket)?;
    Ok(Outcome::Done)
}

fn check_condition(current: Option<&ObjectRecord>, cond: &WriteCondition) -> Result<()> {
    match (cond, current) {
        (WriteCondition::None, _) => Ok(()),
        (WriteCondition::IfAbsent, None) => Ok(()),
        (WriteCondition::IfAbsent, Some(_)) => Err(MetaError::PreconditionFailed),
        (WriteCondition::IfMatch(_), None) => Err(MetaError::NoSuchKey),
        (WriteCondition::IfMatch(etag), Some(cur)) => {
            if etag == "*" || cur.etag == *etag {
                Ok(())
            } else {
                Err(MetaError::PreconditionFailed)
            }
        }
    }
}

fn get_object(tb: &mut Tables<'_>, okey: &[u8]) -> Result<Option<ObjectRecord>> {
    let t = &tb.objects;
    let v = t.get(okey)?;
    v.map(|v| decode(v.value())).transpose()
}

/// Writes `record` under the key, replacing (and dereferencing) what was there.
fn put_object(
    tb: &mut Tables<'_>,
    bucket: &str,
    key: &str,
    record: &ObjectRecord,
    cond: &WriteCondition,
) -> Result<()> {
    require_bucket(tb, bucket)?;
    let okey = keys::object(bucket, key);
    let old = get_object(tb, &okey)?;
    check_condition(old.as_ref(), cond)?;
    let encoded = encode(&record)?;
    add_refs(tb, &record.data.hashes())?;
    if let Some(old) = &old {
        drop_refs(tb, &old.data.hashes(), record.last_modified)?;
    }
    tb.objects.insert(okey.as_slice(), encoded.as_slice())?;
    Ok(())
}

fn delete_object(tb: &mut Tables<'_>, bucket: &str, key: &str, now: UnixMillis) -> Result<Outcome> {
    require_bucket(tb, bucket)?;
    let okey = keys::object(bucket, key);
    if let Some(old) = get_object(tb, &okey)? {
        drop_refs(tb, &old.data.hashes(), now)?;
        tb.objects.remove(okey.as_slice())?;
    }
    Ok(Outcome::Done)
}

fn get_upload(
    tb: &mut Tables<'_>,
    bucket: &str,
    key: &str,
    upload_id: &str,
) -> Result<UploadRecord> {
    let t = &tb.uploads;
    let v = t
        .get(keys::upload(bucket, key, upload_id).as_slice())?
        .ok_or(MetaError::NoSuchUpload)?;
    decode(v.value())
}

fn create_upload(
    tb: &mut Tables<'_>,
    bucket: &str,
    key: &str,
    upload_id: &str,
    record: &UploadRecord,
) -> Result<Outcome> {
    require_bucket(tb, bucket)?;
    tb.uploads.insert(
        keys::upload(bucket, key, upload_id).as_slice(),
        encode(record)?.as_slice(),
    )?;
    Ok(Outcome::Done)
}

fn put_part(
    tb: &mut Tables<'_>,
    bucket: &str,
    key: &str,
    upload_id: &str,
    part_number: u32,
    record: &PartRecord,
) -> Result<Outcome> {
    require_bucket(tb, bucket)?;
    get_upload(tb, bucket, key, upload_id)?;
    let pkey = keys::part(upload_id, part_number);
    let old: Option<PartRecord> = {
        let t = &tb.parts;
        let v = t.get(pkey.as_slice())?;
        v.map(|v| decode(v.value())).transpose()?
    };
    let encoded = encode(record)?;
    add_refs(tb, &record.data.hashes())?;
    if let Some(old) = old {
        drop_refs(tb, &old.data.hashes(), record.last_modified)?;
    }
    tb.parts.insert(pkey.as_slice(), encoded.as_slice())?;
    Ok(Outcome::Done)
}

fn load_parts(tb: &mut Tables<'_>, upload_id: &str) -> Result<Vec<(u32, PartRecord)>> {
    let t = &tb.parts;
    let (lo, hi) = keys::part_range(upload_id);
    let mut out = Vec::new();
    for item in t.range(lo.as_slice()..hi.as_slice())? {
        let (k, v) = item?;
        out.push((keys::part_number_of(k.value()), decode(v.value())?));
    }
    Ok(out)
}

fn complete_upload(
    tb: &mut Tables<'_>,
    bucket: &str,
    key: &str,
    upload_id: &str,
    wanted: &[(u32, String)],
    mut record: ObjectRecord,
    cond: &WriteCondition,
) -> Result<Outcome> {
    require_bucket(tb, bucket)?;
    get_upload(tb, bucket, key, upload_id)?;
    let parts = load_parts(tb, upload_id)?;
    let mut blocks = Vec::new();
    let mut size = 0u64;
    for (number, etag) in wanted {
        let part = parts
            .iter()
            .find(|(n, _)| n == number)
            .map(|(_, p)| p)
            .filter(|p| p.etag == *etag)
            .ok_or(MetaError::InvalidPart(*number))?;
        blocks.extend(part.data.blocks());
        size += part.size;
    }
    record.size = size;
    record.data = ObjectData::from_blocks(blocks);
    // The object takes its references before the parts drop theirs, so shared blocks
    // never pass through zero.
    put_object(tb, bucket, key, &record, cond)?;
    remove_upload(tb, bucket, key, upload_id, parts, record.last_modified)?;
    Ok(Outcome::Object(record))
}

fn abort_upload(
    tb: &mut Tables<'_>,
    bucket: &str,
    key: &str,
    upload_id: &str,
    now: UnixMillis,
) -> Result<Outcome> {
    get_upload(tb, bucket, key, upload_id)?;
    let parts = load_parts(tb, upload_id)?;
    remove_upload(tb, bucket, key, upload_id, parts, now)?;
    Ok(Outcome::Done)
}

fn remove_upload(
    tb: &mut Tables<'_>,
    bucket: &str,
    key: &str,
    upload_id: &str,
    parts: Vec<(u32, PartRecord)>,
    now: UnixMillis,
) -> Result<()> {
    for (n, p) in &parts {
        tb.parts.remove(keys::part(upload_id, *n).as_slice())?;
        drop_refs(tb, &p.data.hashes(), now)?;
    }
    tb.uploads
        .remove(keys::upload(bucket, key, upload_id).as_slice())?;
    Ok(())
}

fn put_key(tb: &mut Tables<'_>, access_key: &str, record: &KeyRecord) -> Result<Outcome> {
    tb.keys.insert(access_key, encode(record)?.as_slice())?;
    Ok(Outcome::Done)
}

/// The layout as stored (the default, empty, before the first node is set).
pub(crate) fn read_layout(t: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Layout> {
    match t.get(LAYOUT)? {
        Some(v) => Layout::decode(v.value()),
        None => Ok(Layout::default()),
    }
}

/// Applies `change` to the layout; stores it with the next version if it changed.
fn change_layout(
    tb: &mut Tables<'_>,
    change: impl FnOnce(&mut Layout) -> Result<()>,
) -> Result<Outcome> {
    let old = read_layout(&tb.cluster)?;
    let mut new = old.clone();
    change(&mut new)?;
    if new != old {
        new.version = old.version + 1;
        tb.cluster.insert(LAYOUT, encode(&new)?.as_slice())?;
    }
    Ok(Outcome::Done)
}

fn add_refs(tb: &mut Tables<'_>, blocks: &[BlockHash]) -> Result<()> {
    if blocks.is_empty() {
        return Ok(());
    }
    let refs = &mut tb.refs;
    let gc = &mut tb.gc;
    for b in blocks {
        let h = b.0;
        let n = refs.get(h.as_slice())?.map(|v| v.value()).unwrap_or(0);
        refs.insert(h.as_slice(), n + 1)?;
        if n == 0 {
            gc.remove(h.as_slice())?;
        }
    }
    Ok(())
}

fn drop_refs(tb: &mut Tables<'_>, blocks: &[BlockHash], now: UnixMillis) -> Result<()> {
    if blocks.is_empty() {
        return Ok(());
    }
    let refs = &mut tb.refs;
    let gc = &mut tb.gc;
    for b in blocks {
        decrement(refs, gc, b, now)?;
    }
    Ok(())
}

fn decrement(
    refs: &mut Table<&[u8], u64>,
    gc: &mut Table<&[u8], i64>,
    hash: &BlockHash,
    now: UnixMillis,
) -> Result<()> {
    let h = hash.0;
    let n = refs.get(h.as_slice())?.map(|v| v.value()).unwrap_or(0);
    if n <= 1 {
        refs.remove(h.as_slice())?;
        gc.insert(h.as_slice(), now)?;
    } else {
        refs.insert(h.as_slice(), n - 1)?;
    }
    Ok(())
}

fn gc_forget(tb: &mut Tables<'_>, entries: &[(BlockHash, UnixMillis)]) -> Result<Outcome> {
    let gc = &mut tb.gc;
    for (h, queued) in entries {
        // Only the entry that was collected: a block referenced and dropped again since
        // has a newer time and stays queued.
        let same = gc.get(h.0.as_slice())?.map(|v| v.value()) == Some(*queued);
        if same {
            gc.remove(h.0.as_slice())?;
        }
    }
    Ok(Outcome::Done)
}
