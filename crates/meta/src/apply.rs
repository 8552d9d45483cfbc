//! Applying a [`Command`] inside a write transaction.
//!
//! Each function checks everything that can make its command fail *before* it changes
//! anything, so a command that fails leaves the transaction as it found it and the
//! other commands of its group commit are unaffected.

use redb::{ReadableTable, Table, WriteTransaction};

use cairn_types::{BlockHash, BlockRef, UnixMillis};

use crate::records::{
    BucketRecord, KeyRecord, ObjectData, ObjectRecord, PartRecord, UploadRecord, decode, encode,
};
use crate::store::{BLOCK_REFS, BUCKETS, GC_QUEUE, KEYS, OBJECTS, PARTS, UPLOADS};
use crate::{Command, MetaError, Outcome, Result, WriteCondition, keys};

pub(crate) fn apply(txn: &WriteTransaction, cmd: &Command) -> Result<Outcome> {
    match cmd {
        Command::CreateBucket { bucket, now } => create_bucket(txn, bucket, *now),
        Command::DeleteBucket { bucket, now } => delete_bucket(txn, bucket, *now),
        Command::PutObject {
            bucket,
            key,
            record,
            cond,
        } => put_object(txn, bucket, key, record, cond).map(|_| Outcome::Done),
        Command::DeleteObject { bucket, key, now } => delete_object(txn, bucket, key, *now),
        Command::CreateUpload {
            bucket,
            key,
            upload_id,
            record,
        } => create_upload(txn, bucket, key, upload_id, record),
        Command::PutPart {
            bucket,
            key,
            upload_id,
            part_number,
            record,
        } => put_part(txn, bucket, key, upload_id, *part_number, record),
        Command::CompleteUpload {
            bucket,
            key,
            upload_id,
            parts,
            record,
            cond,
        } => complete_upload(txn, bucket, key, upload_id, parts, record.clone(), cond),
        Command::AbortUpload {
            bucket,
            key,
            upload_id,
            now,
        } => abort_upload(txn, bucket, key, upload_id, *now),
        Command::PutKey { access_key, record } => put_key(txn, access_key, record),
        Command::GcForget { entries } => gc_forget(txn, entries),
    }
}

fn require_bucket(txn: &WriteTransaction, bucket: &str) -> Result<()> {
    let t = txn.open_table(BUCKETS)?;
    if t.get(bucket)?.is_none() {
        return Err(MetaError::NoSuchBucket);
    }
    Ok(())
}

fn create_bucket(txn: &WriteTransaction, bucket: &str, now: UnixMillis) -> Result<Outcome> {
    let mut t = txn.open_table(BUCKETS)?;
    if t.get(bucket)?.is_some() {
        return Err(MetaError::BucketAlreadyOwnedByYou);
    }
    t.insert(bucket, encode(&BucketRecord { created: now })?.as_slice())?;
    Ok(Outcome::Done)
}

fn delete_bucket(txn: &WriteTransaction, bucket: &str, now: UnixMillis) -> Result<Outcome> {
    require_bucket(txn, bucket)?;
    let (lo, hi) = keys::bucket_range(bucket);
    {
        let objects = txn.open_table(OBJECTS)?;
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
        let t = txn.open_table(UPLOADS)?;
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
        abort_upload(txn, bucket, &key, &id, now)?;
    }
    txn.open_table(BUCKETS)?.remove(bucket)?;
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

fn get_object(txn: &WriteTransaction, okey: &[u8]) -> Result<Option<ObjectRecord>> {
    let t = txn.open_table(OBJECTS)?;
    let v = t.get(okey)?;
    v.map(|v| decode(v.value())).transpose()
}

/// Writes `record` under the key, replacing (and dereferencing) what was there.
fn put_object(
    txn: &WriteTransaction,
    bucket: &str,
    key: &str,
    record: &ObjectRecord,
    cond: &WriteCondition,
) -> Result<()> {
    require_bucket(txn, bucket)?;
    let okey = keys::object(bucket, key);
    let old = get_object(txn, &okey)?;
    check_condition(old.as_ref(), cond)?;
    let encoded = encode(&record)?;
    add_refs(txn, record.data.blocks())?;
    if let Some(old) = &old {
        drop_refs(txn, old.data.blocks(), record.last_modified)?;
    }
    txn.open_table(OBJECTS)?
        .insert(okey.as_slice(), encoded.as_slice())?;
    Ok(())
}

fn delete_object(
    txn: &WriteTransaction,
    bucket: &str,
    key: &str,
    now: UnixMillis,
) -> Result<Outcome> {
    require_bucket(txn, bucket)?;
    let okey = keys::object(bucket, key);
    if let Some(old) = get_object(txn, &okey)? {
        drop_refs(txn, old.data.blocks(), now)?;
        txn.open_table(OBJECTS)?.remove(okey.as_slice())?;
    }
    Ok(Outcome::Done)
}

fn get_upload(
    txn: &WriteTransaction,
    bucket: &str,
    key: &str,
    upload_id: &str,
) -> Result<UploadRecord> {
    let t = txn.open_table(UPLOADS)?;
    let v = t
        .get(keys::upload(bucket, key, upload_id).as_slice())?
        .ok_or(MetaError::NoSuchUpload)?;
    decode(v.value())
}

fn create_upload(
    txn: &WriteTransaction,
    bucket: &str,
    key: &str,
    upload_id: &str,
    record: &UploadRecord,
) -> Result<Outcome> {
    require_bucket(txn, bucket)?;
    txn.open_table(UPLOADS)?.insert(
        keys::upload(bucket, key, upload_id).as_slice(),
        encode(record)?.as_slice(),
    )?;
    Ok(Outcome::Done)
}

fn put_part(
    txn: &WriteTransaction,
    bucket: &str,
    key: &str,
    upload_id: &str,
    part_number: u32,
    record: &PartRecord,
) -> Result<Outcome> {
    require_bucket(txn, bucket)?;
    get_upload(txn, bucket, key, upload_id)?;
    let pkey = keys::part(upload_id, part_number);
    let old: Option<PartRecord> = {
        let t = txn.open_table(PARTS)?;
        let v = t.get(pkey.as_slice())?;
        v.map(|v| decode(v.value())).transpose()?
    };
    let encoded = encode(record)?;
    add_refs(txn, record.data.blocks())?;
    if let Some(old) = old {
        drop_refs(txn, old.data.blocks(), record.last_modified)?;
    }
    txn.open_table(PARTS)?
        .insert(pkey.as_slice(), encoded.as_slice())?;
    Ok(Outcome::Done)
}

fn load_parts(txn: &WriteTransaction, upload_id: &str) -> Result<Vec<(u32, PartRecord)>> {
    let t = txn.open_table(PARTS)?;
    let (lo, hi) = keys::part_range(upload_id);
    let mut out = Vec::new();
    for item in t.range(lo.as_slice()..hi.as_slice())? {
        let (k, v) = item?;
        out.push((keys::part_number_of(k.value()), decode(v.value())?));
    }
    Ok(out)
}

fn complete_upload(
    txn: &WriteTransaction,
    bucket: &str,
    key: &str,
    upload_id: &str,
    wanted: &[(u32, String)],
    mut record: ObjectRecord,
    cond: &WriteCondition,
) -> Result<Outcome> {
    require_bucket(txn, bucket)?;
    get_upload(txn, bucket, key, upload_id)?;
    let parts = load_parts(txn, upload_id)?;
    let mut blocks: Vec<BlockRef> = Vec::new();
    let mut size = 0u64;
    for (number, etag) in wanted {
        let part = parts
            .iter()
            .find(|(n, _)| n == number)
            .map(|(_, p)| p)
            .filter(|p| p.etag == *etag)
            .ok_or(MetaError::InvalidPart(*number))?;
        blocks.extend_from_slice(part.data.blocks());
        size += part.size;
    }
    record.size = size;
    record.data = ObjectData::Blocks(blocks);
    // The object takes its references before the parts drop theirs, so shared blocks
    // never pass through zero.
    put_object(txn, bucket, key, &record, cond)?;
    remove_upload(txn, bucket, key, upload_id, parts, record.last_modified)?;
    Ok(Outcome::Object(record))
}

fn abort_upload(
    txn: &WriteTransaction,
    bucket: &str,
    key: &str,
    upload_id: &str,
    now: UnixMillis,
) -> Result<Outcome> {
    get_upload(txn, bucket, key, upload_id)?;
    let parts = load_parts(txn, upload_id)?;
    remove_upload(txn, bucket, key, upload_id, parts, now)?;
    Ok(Outcome::Done)
}

fn remove_upload(
    txn: &WriteTransaction,
    bucket: &str,
    key: &str,
    upload_id: &str,
    parts: Vec<(u32, PartRecord)>,
    now: UnixMillis,
) -> Result<()> {
    {
        let mut t = txn.open_table(PARTS)?;
        for (n, p) in &parts {
            t.remove(keys::part(upload_id, *n).as_slice())?;
            drop_refs(txn, p.data.blocks(), now)?;
        }
    }
    txn.open_table(UPLOADS)?
        .remove(keys::upload(bucket, key, upload_id).as_slice())?;
    Ok(())
}

fn put_key(txn: &WriteTransaction, access_key: &str, record: &KeyRecord) -> Result<Outcome> {
    txn.open_table(KEYS)?
        .insert(access_key, encode(record)?.as_slice())?;
    Ok(Outcome::Done)
}

fn add_refs(txn: &WriteTransaction, blocks: &[BlockRef]) -> Result<()> {
    if blocks.is_empty() {
        return Ok(());
    }
    let mut refs = txn.open_table(BLOCK_REFS)?;
    let mut gc = txn.open_table(GC_QUEUE)?;
    for b in blocks {
        let h = b.hash.0;
        let n = refs.get(h.as_slice())?.map(|v| v.value()).unwrap_or(0);
        refs.insert(h.as_slice(), n + 1)?;
        if n == 0 {
            gc.remove(h.as_slice())?;
        }
    }
    Ok(())
}

fn drop_refs(txn: &WriteTransaction, blocks: &[BlockRef], now: UnixMillis) -> Result<()> {
    if blocks.is_empty() {
        return Ok(());
    }
    let mut refs = txn.open_table(BLOCK_REFS)?;
    let mut gc = txn.open_table(GC_QUEUE)?;
    for b in blocks {
        decrement(&mut refs, &mut gc, &b.hash, now)?;
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

fn gc_forget(txn: &WriteTransaction, entries: &[(BlockHash, UnixMillis)]) -> Result<Outcome> {
    let mut gc = txn.open_table(GC_QUEUE)?;
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
