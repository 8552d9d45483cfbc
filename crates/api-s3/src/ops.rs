//! The S3 operations. Each one validates its input, then reads or changes metadata
//! through `cairn-meta` and data through the write and read paths.

use std::collections::HashMap;

use md5::{Digest, Md5};
use s3s::dto::*;
use s3s::{S3, S3Error, S3Request, S3Response, S3Result, s3_error};

use cairn_meta::{
    Command, ListEntry, ListQuery, MetaError, ObjectData, ObjectRecord, Outcome, PartRecord,
    StoredHeaders, UploadRecord, WriteCondition,
};
use cairn_types::{UnixMillis, now_millis};

use crate::write::{self, Wanted};
use crate::{Cairn, error, limits, read};

fn ts(ms: UnixMillis) -> Timestamp {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    Timestamp::from(t)
}

fn millis(t: &Timestamp) -> UnixMillis {
    let t: time::OffsetDateTime = t.clone().into();
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn etag(s: &str) -> ETag {
    ETag::Strong(s.to_string())
}

fn check_key(key: &str) -> S3Result<()> {
    if key.is_empty() {
        return Err(s3_error!(
            InvalidArgument,
            "The object key must not be empty"
        ));
    }
    if key.len() > limits::MAX_KEY_LEN {
        return Err(s3_error!(
            KeyTooLongError,
            "Your key is too long: {} bytes, the maximum is {}",
            key.len(),
            limits::MAX_KEY_LEN
        ));
    }
    if key.contains('\0') {
        return Err(s3_error!(
            InvalidArgument,
            "The object key must not contain a NUL character"
        ));
    }
    Ok(())
}

fn check_part_number(n: i32) -> S3Result<u32> {
    if !(1..=limits::MAX_PART_NUMBER).contains(&n) {
        return Err(s3_error!(
            InvalidArgument,
            "Part number must be an integer between 1 and {}, inclusive",
            limits::MAX_PART_NUMBER
        ));
    }
    Ok(n as u32)
}

fn http_date(t: &Timestamp) -> Option<String> {
    let mut buf = Vec::new();
    t.format(TimestampFormat::HttpDate, &mut buf).ok()?;
    String::from_utf8(buf).ok()
}

fn user_metadata(m: Option<Metadata>) -> S3Result<Vec<(String, String)>> {
    let mut v: Vec<(String, String)> = m.unwrap_or_default().into_iter().collect();
    v.sort();
    let total: usize = v.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > limits::MAX_USER_METADATA {
        return Err(s3_error!(
            MetadataTooLarge,
            "Your metadata headers exceed the maximum allowed metadata size ({} bytes)",
            limits::MAX_USER_METADATA
        ));
    }
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
fn stored_headers(
    content_type: Option<ContentType>,
    cache_control: Option<CacheControl>,
    content_disposition: Option<ContentDisposition>,
    content_encoding: Option<ContentEncoding>,
    content_language: Option<ContentLanguage>,
    expires: Option<Expires>,
    metadata: Option<Metadata>,
) -> S3Result<StoredHeaders> {
    Ok(StoredHeaders {
        content_type,
        cache_control,
        content_disposition,
        content_encoding,
        content_language,
        expires: expires.as_ref().and_then(http_date),
        user: user_metadata(metadata)?,
    })
}

fn metadata_out(h: &StoredHeaders) -> Option<Metadata> {
    if h.user.is_empty() {
        return None;
    }
    Some(h.user.iter().cloned().collect::<HashMap<_, _>>())
}

fn expires_out(h: &StoredHeaders) -> Option<Timestamp> {
    h.expires
        .as_deref()
        .and_then(|s| Timestamp::parse(TimestampFormat::HttpDate, s).ok())
}

fn write_condition(
    if_match: Option<&IfMatch>,
    if_none_match: Option<&IfNoneMatch>,
) -> S3Result<WriteCondition> {
    match (if_match, if_none_match) {
        (Some(_), Some(_)) => Err(s3_error!(
            NotImplemented,
            "If-Match and If-None-Match together are not supported on writes"
        )),
        (Some(ETagCondition::Any), None) => Ok(WriteCondition::IfMatch("*".into())),
        (Some(ETagCondition::ETag(e)), None) => Ok(WriteCondition::IfMatch(e.value().to_string())),
        (None, Some(ETagCondition::Any)) => Ok(WriteCondition::IfAbsent),
        (None, Some(ETagCondition::ETag(_))) => Err(s3_error!(
            NotImplemented,
            "If-None-Match on writes supports only '*'"
        )),
        (None, None) => Ok(WriteCondition::None),
    }
}

fn etag_matches(cond: &ETagCondition, current: &str) -> bool {
    match cond {
        ETagCondition::Any => true,
        ETagCondition::ETag(e) => e.value() == current,
    }
}

/// GET/HEAD preconditions, in the order RFC 9110 and S3 evaluate them.
fn read_preconditions(
    rec: &ObjectRecord,
    if_match: Option<&IfMatch>,
    if_none_match: Option<&IfNoneMatch>,
    if_modified_since: Option<&Timestamp>,
    if_unmodified_since: Option<&Timestamp>,
) -> S3Result<()> {
    // HTTP dates have one-second resolution.
    let modified_secs = rec.last_modified.div_euclid(1000);
    let secs = |t: &Timestamp| millis(t).div_euclid(1000);
    match if_match {
        Some(c) if !etag_matches(c, &rec.etag) => return Err(precondition_failed()),
        None => {
            if let Some(t) = if_unmodified_since
                && modified_secs > secs(t)
            {
                return Err(precondition_failed());
            }
        }
        _ => {}
    }
    match if_none_match {
        Some(c) if etag_matches(c, &rec.etag) => return Err(not_modified(rec)),
        None => {
            if let Some(t) = if_modified_since
                && modified_secs <= secs(t)
            {
                return Err(not_modified(rec));
            }
        }
        _ => {}
    }
    Ok(())
}

fn precondition_failed() -> S3Error {
    s3_error!(
        PreconditionFailed,
        "At least one of the pre-conditions you specified did not hold"
    )
}

fn not_modified(rec: &ObjectRecord) -> S3Error {
    let mut e = s3_error!(NotModified, "Not Modified");
    let mut h = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&format!("\"{}\"", rec.etag)) {
        h.insert(http::header::ETAG, v);
    }
    if let Some(v) =
        http_date(&ts(rec.last_modified)).and_then(|d| http::HeaderValue::from_str(&d).ok())
    {
        h.insert(http::header::LAST_MODIFIED, v);
    }
    e.set_headers(h);
    e
}

fn new_upload_id() -> String {
    // Time first, so that uploads of one key list in the order they were started.
    format!("{:012x}{:016x}", now_millis(), rand::random::<u64>())
}

/// The algorithms a PUT asked to be checked, from headers and the trailer list.
fn wanted_checksums(
    headers: &http::HeaderMap,
    algorithm: Option<&ChecksumAlgorithm>,
    sent: &Checksum,
) -> Wanted {
    let mut w = Wanted::default();
    w.add_present(sent);
    if let Some(a) = algorithm {
        w.add_name(a.as_str());
    }
    if let Some(t) = headers.get("x-amz-trailer").and_then(|v| v.to_str().ok()) {
        for name in t.split(',') {
            w.add_name(name);
        }
    }
    w
}

fn trailers_of<T>(req: &S3Request<T>) -> Checksum {
    req.trailing_headers
        .as_ref()
        .and_then(|t| t.read(write::from_trailers))
        .unwrap_or_default()
}

fn merge(a: Checksum, b: Checksum) -> Checksum {
    Checksum {
        checksum_crc32: a.checksum_crc32.or(b.checksum_crc32),
        checksum_crc32c: a.checksum_crc32c.or(b.checksum_crc32c),
        checksum_crc64nvme: a.checksum_crc64nvme.or(b.checksum_crc64nvme),
        checksum_sha1: a.checksum_sha1.or(b.checksum_sha1),
        checksum_sha256: a.checksum_sha256.or(b.checksum_sha256),
        ..Default::default()
    }
}

fn owner() -> Owner {
    Owner {
        display_name: Some("cairn".into()),
        id: Some("cairn".into()),
    }
}

fn max_keys(m: Option<i32>) -> S3Result<usize> {
    match m {
        None => Ok(1000),
        Some(n) if n < 0 => Err(s3_error!(InvalidArgument, "max-keys must not be negative")),
        Some(n) => Ok((n as usize).min(1000)),
    }
}

impl Cairn {
    fn put_limits(&self, max_size: u64) -> write::Limits {
        write::Limits {
            block_size: self.settings.block_size,
            inline_max: self.settings.inline_max,
            max_size,
        }
    }

    fn require_bucket(&self, bucket: &str) -> S3Result<()> {
        match self.meta.bucket(bucket) {
            Some(_) => Ok(()),
            None => Err(error::meta(MetaError::NoSuchBucket)),
        }
    }

    async fn object_or_404(&self, bucket: &str, key: &str) -> S3Result<ObjectRecord> {
        self.meta
            .object(bucket, key)
            .await
            .map_err(error::meta)?
            .ok_or_else(|| error::meta(MetaError::NoSuchKey))
    }

    /// Reads the source of a copy, checking its `x-amz-copy-source-if-*` conditions.
    async fn copy_source(
        &self,
        src: &CopySource,
        if_match: Option<&ETagCondition>,
        if_none_match: Option<&ETagCondition>,
        if_modified_since: Option<&Timestamp>,
        if_unmodified_since: Option<&Timestamp>,
    ) -> S3Result<(String, String, ObjectRecord)> {
        let CopySource::Bucket {
            bucket,
            key,
            version_id,
        } = src
        else {
            return Err(s3_error!(
                NotImplemented,
                "Copy from an access point is not supported"
            ));
        };
        if version_id.as_deref().is_some_and(|v| v != "null") {
            return Err(s3_error!(
                NoSuchVersion,
                "The specified version does not exist."
            ));
        }
        let rec = self.object_or_404(bucket, key).await?;
        // For copies, S3 answers every failed source condition with 412.
        read_preconditions(
            &rec,
            if_match,
            if_none_match,
            if_modified_since,
            if_unmodified_since,
        )
        .map_err(|e| {
            if *e.code() == s3s::S3ErrorCode::NotModified {
                precondition_failed()
            } else {
                e
            }
        })?;
        Ok((bucket.to_string(), key.to_string(), rec))
    }

    /// Pins the blocks of `rec` and checks they are all still present, so that a copy
    /// can name them without rewriting them. (The checks touch the disk: they run on a
    /// blocking thread.)
    async fn pin_existing(&self, rec: &ObjectRecord) -> S3Result<cairn_blocks::PinGuard> {
        let store = self.blocks.store().clone();
        // In a cluster the blocks may be on other nodes: their garbage collection
        // waits a grace period after the last reference goes, far longer than a copy.
        let check = self.blocks.local_only();
        let blocks = rec.data.hashes();
        tokio::task::spawn_blocking(move || {
            let mut pin = store.pin();
            for h in blocks {
                pin.add(h);
                if check && !store.contains(&h) {
                    return Err(s3_error!(
                        NoSuchKey,
                        "The copy source was deleted while it was being copied"
                    ));
                }
            }
            Ok(pin)
        })
        .await
        .map_err(error::join)?
    }
}

#[async_trait::async_trait]
impl S3 for Cairn {
    async fn list_buckets(
        &self,
        _req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let buckets = self.meta.buckets();
        let buckets = buckets
            .into_iter()
            .map(|(name, rec)| Bucket {
                name: Some(name),
                creation_date: Some(ts(rec.created)),
                bucket_region: Some(self.settings.region.clone()),
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            owner: Some(owner()),
            ..Default::default()
        }))
    }

    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let input = req.input;
        if let Some(c) = input
            .create_bucket_configuration
            .as_ref()
            .and_then(|c| c.location_constraint.as_ref())
            && c.as_str() != self.settings.region
            && !c.as_str().is_empty()
        {
            return Err(s3_error!(
                InvalidLocationConstraint,
                "The specified location-constraint '{}' is not valid; this endpoint serves '{}'",
                c.as_str(),
                self.settings.region
            ));
        }
        self.meta
            .apply(Command::CreateBucket {
                bucket: input.bucket.clone(),
                now: now_millis(),
            })
            .await
            .map_err(error::meta)?;
        tracing::info!(bucket = %input.bucket, "bucket created");
        Ok(S3Response::new(CreateBucketOutput {
            location: Some(format!("/{}", input.bucket)),
        }))
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.meta
            .apply(Command::DeleteBucket {
                bucket: req.input.bucket.clone(),
                now: now_millis(),
            })
            .await
            .map_err(error::meta)?;
        tracing::info!(bucket = %req.input.bucket, "bucket deleted");
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.require_bucket(&req.input.bucket)?;
        Ok(S3Response::new(HeadBucketOutput {
            bucket_region: Some(self.settings.region.clone()),
            ..Default::default()
        }))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.require_bucket(&req.input.bucket)?;
        // S3 answers an empty constraint for us-east-1.
        let location_constraint = (self.settings.region != "us-east-1")
            .then(|| BucketLocationConstraint::from(self.settings.region.clone()));
        Ok(S3Response::new(GetBucketLocationOutput {
            location_constraint,
        }))
    }

    async fn get_bucket_versioning(
        &self,
        req: S3Request<GetBucketVersioningInput>,
    ) -> S3Result<S3Response<GetBucketVersioningOutput>> {
        self.require_bucket(&req.input.bucket)?;
        // Versioning was never enabled: S3 answers with no status.
        Ok(S3Response::new(GetBucketVersioningOutput::default()))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        let trailers = req.trailing_headers.clone();
        let headers = req.headers.clone();
        let input = req.input;
        check_key(&input.key)?;
        let cond = write_condition(input.if_match.as_ref(), input.if_none_match.as_ref())?;
        let sent = Checksum {
            checksum_crc32: input.checksum_crc32.clone(),
            checksum_crc32c: input.checksum_crc32c.clone(),
            checksum_crc64nvme: input.checksum_crc64nvme.clone(),
            checksum_sha1: input.checksum_sha1.clone(),
            checksum_sha256: input.checksum_sha256.clone(),
            ..Default::default()
        };
        if let Some(len) = input.content_length
            && len as u64 > limits::MAX_PUT_SIZE
        {
            return Err(s3_error!(
                EntityTooLarge,
                "Your proposed upload exceeds the maximum allowed size ({} bytes)",
                limits::MAX_PUT_SIZE
            ));
        }
        let stored = stored_headers(
            input.content_type,
            input.cache_control,
            input.content_disposition,
            input.content_encoding,
            input.content_language,
            input.expires,
            input.metadata,
        )?;
        // Fail fast on a missing bucket, before the body is stored.
        self.require_bucket(&input.bucket)?;
        let wanted = wanted_checksums(&headers, input.checksum_algorithm.as_ref(), &sent);
        let ing = write::ingest(
            &self.blocks,
            &self.buffers,
            input.body,
            wanted,
            &self.put_limits(limits::MAX_PUT_SIZE),
            self.meta.class_of(&input.bucket),
        )
        .await?;
        let trailer_sums = trailers
            .as_ref()
            .and_then(|t| t.read(write::from_trailers))
            .unwrap_or_default();
        let sent = merge(sent, trailer_sums);
        write::verify(&sent, &ing.computed)?;
        write::verify_md5(input.content_md5.as_deref(), &ing.md5)?;
        let etag_s = ing.etag();
        let record = ObjectRecord {
            size: ing.size,
            etag: etag_s.clone(),
            last_modified: now_millis(),
            headers: stored,
            checksums: write::stored_checksums(&ing.computed),
            parts_count: None,
            data: ing.data,
        };
        self.meta
            .apply(Command::PutObject {
                bucket: input.bucket.clone(),
                key: input.key.clone(),
                record,
                cond,
            })
            .await
            .map_err(error::meta)?;
        drop(ing.pins);
        metrics::counter!("cairn_s3_bytes_received_total").increment(ing.size);
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(etag(&etag_s)),
            checksum_crc32: ing.computed.checksum_crc32,
            checksum_crc32c: ing.computed.checksum_crc32c,
            checksum_crc64nvme: ing.computed.checksum_crc64nvme,
            checksum_sha1: ing.computed.checksum_sha1,
            checksum_sha256: ing.computed.checksum_sha256,
            size: Some(ing.size as i64),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        let input = req.input;
        if input.version_id.as_deref().is_some_and(|v| v != "null") {
            return Err(s3_error!(
                NoSuchVersion,
                "The specified version does not exist."
            ));
        }
        let rec = self.object_or_404(&input.bucket, &input.key).await?;
        read_preconditions(
            &rec,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        if input.part_number.is_some() && input.range.is_some() {
            return Err(s3_error!(
                InvalidRequest,
                "Cannot specify both Range header and partNumber"
            ));
        }
        let range = match &input.range {
            Some(r) => Some(r.check(rec.size).map_err(|_| {
                s3_error!(
                    InvalidRange,
                    "The requested range is not satisfiable: the object is {} bytes",
                    rec.size
                )
            })?),
            None => None,
        };
        let span = range.clone().unwrap_or(0..rec.size);
        let body = read::body(&self.blocks, &self.buffers, &rec, span.clone()).await?;
        metrics::counter!("cairn_s3_bytes_sent_total").increment(span.end - span.start);
        let whole = range.is_none();
        let checksum_mode = input
            .checksum_mode
            .as_ref()
            .is_some_and(|m| m.as_str() == "ENABLED");
        let sums =
            (whole && checksum_mode && rec.parts_count.is_none()).then(|| rec.checksums.clone());
        let h = &rec.headers;
        Ok(S3Response::new(GetObjectOutput {
            body: Some(body),
            content_length: Some((span.end - span.start) as i64),
            content_range: range.map(|r| format!("bytes {}-{}/{}", r.start, r.end - 1, rec.size)),
            accept_ranges: Some("bytes".into()),
            e_tag: Some(etag(&rec.etag)),
            last_modified: Some(ts(rec.last_modified)),
            content_type: Some(
                h.content_type
                    .clone()
                    .unwrap_or_else(|| "binary/octet-stream".into()),
            ),
            cache_control: h.cache_control.clone(),
            content_disposition: h.content_disposition.clone(),
            content_encoding: h.content_encoding.clone(),
            content_language: h.content_language.clone(),
            expires: expires_out(h),
            metadata: metadata_out(h),
            parts_count: rec.parts_count.map(|n| n as i32),
            checksum_crc32: sums.as_ref().and_then(|s| s.crc32.clone()),
            checksum_crc32c: sums.as_ref().and_then(|s| s.crc32c.clone()),
            checksum_crc64nvme: sums.as_ref().and_then(|s| s.crc64nvme.clone()),
            checksum_sha1: sums.as_ref().and_then(|s| s.sha1.clone()),
            checksum_sha256: sums.as_ref().and_then(|s| s.sha256.clone()),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        let input = req.input;
        if input.version_id.as_deref().is_some_and(|v| v != "null") {
            return Err(s3_error!(
                NoSuchVersion,
                "The specified version does not exist."
            ));
        }
        let rec = self.object_or_404(&input.bucket, &input.key).await?;
        read_preconditions(
            &rec,
            input.if_match.as_ref(),
            input.if_none_match.as_ref(),
            input.if_modified_since.as_ref(),
            input.if_unmodified_since.as_ref(),
        )?;
        let range =
            match &input.range {
                Some(r) => Some(r.check(rec.size).map_err(|_| {
                    s3_error!(InvalidRange, "The requested range is not satisfiable")
                })?),
                None => None,
            };
        let len = range.as_ref().map(|r| r.end - r.start).unwrap_or(rec.size);
        let checksum_mode = input
            .checksum_mode
            .as_ref()
            .is_some_and(|m| m.as_str() == "ENABLED");
        let sums = (checksum_mode && rec.parts_count.is_none()).then(|| rec.checksums.clone());
        let h = &rec.headers;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(len as i64),
            content_range: range.map(|r| format!("bytes {}-{}/{}", r.start, r.end - 1, rec.size)),
            accept_ranges: Some("bytes".into()),
            e_tag: Some(etag(&rec.etag)),
            last_modified: Some(ts(rec.last_modified)),
            content_type: Some(
                h.content_type
                    .clone()
                    .unwrap_or_else(|| "binary/octet-stream".into()),
            ),
            cache_control: h.cache_control.clone(),
            content_disposition: h.content_disposition.clone(),
            content_encoding: h.content_encoding.clone(),
            content_language: h.content_language.clone(),
            expires: expires_out(h),
            metadata: metadata_out(h),
            parts_count: rec.parts_count.map(|n| n as i32),
            checksum_crc32: sums.as_ref().and_then(|s| s.crc32.clone()),
            checksum_crc32c: sums.as_ref().and_then(|s| s.crc32c.clone()),
            checksum_crc64nvme: sums.as_ref().and_then(|s| s.crc64nvme.clone()),
            checksum_sha1: sums.as_ref().and_then(|s| s.sha1.clone()),
            checksum_sha256: sums.as_ref().and_then(|s| s.sha256.clone()),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        let input = req.input;
        check_key(&input.key)?;
        if let Some(cond) = &input.if_match {
            let rec = self.object_or_404(&input.bucket, &input.key).await?;
            if !etag_matches(cond, &rec.etag) {
                return Err(precondition_failed());
            }
        }
        self.meta
            .apply(Command::DeleteObject {
                bucket: input.bucket,
                key: input.key,
                now: now_millis(),
            })
            .await
            .map_err(error::meta)?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let input = req.input;
        if input.delete.objects.len() > limits::MAX_DELETE_KEYS {
            return Err(s3_error!(
                MalformedXML,
                "A DeleteObjects request may name at most {} keys",
                limits::MAX_DELETE_KEYS
            ));
        }
        self.require_bucket(&input.bucket)?;
        let quiet = input.delete.quiet.unwrap_or(false);
        let now = now_millis();
        // All deletes are sent at once: the metadata log takes them in one write.
        let futs = input.delete.objects.into_iter().map(|o| {
            let bucket = input.bucket.clone();
            async move {
                if let Err(e) = check_key(&o.key) {
                    return (o.key, Err(e));
                }
                let res = self
                    .meta
                    .apply(Command::DeleteObject {
                        bucket,
                        key: o.key.clone(),
                        now,
                    })
                    .await
                    .map_err(error::meta);
                (o.key, res)
            }
        });
        let results = futures::future::join_all(futs).await;
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        for (key, res) in results {
            match res {
                Ok(_) => {
                    if !quiet {
                        deleted.push(DeletedObject {
                            key: Some(key),
                            ..Default::default()
                        });
                    }
                }
                Err(e) => errors.push(Error {
                    code: Some(e.code().as_str().to_string()),
                    key: Some(key),
                    message: e.message().map(str::to_string),
                    version_id: None,
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let input = req.input;
        check_key(&input.key)?;
        let (sb, sk, src) = self
            .copy_source(
                &input.copy_source,
                input.copy_source_if_match.as_ref(),
                input.copy_source_if_none_match.as_ref(),
                input.copy_source_if_modified_since.as_ref(),
                input.copy_source_if_unmodified_since.as_ref(),
            )
            .await?;
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        if sb == input.bucket && sk == input.key && !replace {
            return Err(s3_error!(
                InvalidRequest,
                "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata, storage class, website redirect location or encryption attributes."
            ));
        }
        let headers = if replace {
            stored_headers(
                input.content_type,
                input.cache_control,
                input.content_disposition,
                input.content_encoding,
                input.content_language,
                input.expires,
                input.metadata,
            )?
        } else {
            src.headers.clone()
        };
        self.require_bucket(&input.bucket)?;
        // Blocks are content-addressed: the copy names the same blocks, once pinned and
        // found present.
        let pin = self.pin_existing(&src).await?;
        let now = now_millis();
        let record = ObjectRecord {
            last_modified: now,
            headers,
            ..src
        };
        let etag_s = record.etag.clone();
        self.meta
            .apply(Command::PutObject {
                bucket: input.bucket,
                key: input.key,
                record,
                cond: WriteCondition::None,
            })
            .await
            .map_err(error::meta)?;
        drop(pin);
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(etag(&etag_s)),
                last_modified: Some(ts(now)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let input = req.input;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let page = self
            .meta
            .list(
                &input.bucket,
                ListQuery {
                    prefix: prefix.clone(),
                    delimiter: input.delimiter.clone(),
                    start_after: input.marker.clone().filter(|m| !m.is_empty()),
                    max,
                },
            )
            .await
            .map_err(error::meta)?;
        let (contents, prefixes) = split_page(&page.entries);
        let next_marker = (page.truncated && input.delimiter.is_some())
            .then(|| page.entries.last().map(|e| e.name().to_string()))
            .flatten();
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(input.bucket),
            prefix: Some(prefix),
            marker: input.marker,
            max_keys: Some(max as i32),
            delimiter: input.delimiter,
            is_truncated: Some(page.truncated),
            next_marker,
            contents: Some(contents),
            common_prefixes: Some(prefixes),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let start_after = match &input.continuation_token {
            Some(t) => Some(decode_token(t)?),
            None => input.start_after.clone().filter(|s| !s.is_empty()),
        };
        let page = self
            .meta
            .list(
                &input.bucket,
                ListQuery {
                    prefix: prefix.clone(),
                    delimiter: input.delimiter.clone(),
                    start_after,
                    max,
                },
            )
            .await
            .map_err(error::meta)?;
        let (contents, prefixes) = split_page(&page.entries);
        let next = page
            .truncated
            .then(|| page.entries.last().map(|e| encode_token(e.name())))
            .flatten();
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: Some(prefix),
            max_keys: Some(max as i32),
            key_count: Some(page.entries.len() as i32),
            continuation_token: input.continuation_token,
            next_continuation_token: next,
            is_truncated: Some(page.truncated),
            contents: Some(contents),
            common_prefixes: Some(prefixes),
            delimiter: input.delimiter,
            encoding_type: input.encoding_type,
            start_after: input.start_after,
            ..Default::default()
        }))
    }

    async fn list_object_versions(
        &self,
        req: S3Request<ListObjectVersionsInput>,
    ) -> S3Result<S3Response<ListObjectVersionsOutput>> {
        // Unversioned buckets: every object is its one version, with id "null".
        let input = req.input;
        let max = max_keys(input.max_keys)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let page = self
            .meta
            .list(
                &input.bucket,
                ListQuery {
                    prefix: prefix.clone(),
                    delimiter: input.delimiter.clone(),
                    start_after: input.key_marker.clone().filter(|m| !m.is_empty()),
                    max,
                },
            )
            .await
            .map_err(error::meta)?;
        let mut versions = Vec::new();
        let mut prefixes = Vec::new();
        for e in &page.entries {
            match e {
                ListEntry::Object(k, r) => versions.push(ObjectVersion {
                    key: Some(k.clone()),
                    version_id: Some("null".into()),
                    is_latest: Some(true),
                    e_tag: Some(etag(&r.etag)),
                    last_modified: Some(ts(r.last_modified)),
                    size: Some(r.size as i64),
                    owner: Some(owner()),
                    storage_class: Some(ObjectVersionStorageClass::from_static(
                        ObjectVersionStorageClass::STANDARD,
                    )),
                    ..Default::default()
                }),
                ListEntry::Prefix(p) => prefixes.push(CommonPrefix {
                    prefix: Some(p.clone()),
                }),
            }
        }
        let next = page
            .truncated
            .then(|| page.entries.last().map(|e| e.name().to_string()))
            .flatten();
        Ok(S3Response::new(ListObjectVersionsOutput {
            name: Some(input.bucket),
            prefix: Some(prefix),
            key_marker: input.key_marker,
            version_id_marker: input.version_id_marker,
            max_keys: Some(max as i32),
            delimiter: input.delimiter,
            is_truncated: Some(page.truncated),
            next_key_marker: next.clone(),
            next_version_id_marker: next.map(|_| "null".into()),
            versions: Some(versions),
            common_prefixes: Some(prefixes),
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let input = req.input;
        check_key(&input.key)?;
        let headers = stored_headers(
            input.content_type,
            input.cache_control,
            input.content_disposition,
            input.content_encoding,
            input.content_language,
            input.expires,
            input.metadata,
        )?;
        let upload_id = new_upload_id();
        self.meta
            .apply(Command::CreateUpload {
                bucket: input.bucket.clone(),
                key: input.key.clone(),
                upload_id: upload_id.clone(),
                record: UploadRecord {
                    initiated: now_millis(),
                    headers,
                    checksum_algorithm: input
                        .checksum_algorithm
                        .as_ref()
                        .map(|a| a.as_str().to_string()),
                },
            })
            .await
            .map_err(error::meta)?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload_id),
            checksum_algorithm: input.checksum_algorithm,
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let trailers = trailers_of(&req);
        let headers = req.headers.clone();
        let input = req.input;
        check_key(&input.key)?;
        let part_number = check_part_number(input.part_number)?;
        if let Some(len) = input.content_length
            && len as u64 > limits::MAX_PUT_SIZE
        {
            return Err(s3_error!(
                EntityTooLarge,
                "A part may be at most {} bytes",
                limits::MAX_PUT_SIZE
            ));
        }
        self.meta
            .upload(&input.bucket, &input.key, &input.upload_id)
            .await
            .map_err(error::meta)?;
        let sent = Checksum {
            checksum_crc32: input.checksum_crc32.clone(),
            checksum_crc32c: input.checksum_crc32c.clone(),
            checksum_crc64nvme: input.checksum_crc64nvme.clone(),
            checksum_sha1: input.checksum_sha1.clone(),
            checksum_sha256: input.checksum_sha256.clone(),
            ..Default::default()
        };
        let wanted = wanted_checksums(&headers, input.checksum_algorithm.as_ref(), &sent);
        // Parts are always stored as blocks: a completed object is their concatenation.
        let mut lim = self.put_limits(limits::MAX_PUT_SIZE);
        lim.inline_max = 0;
        let class = self.meta.class_of(&input.bucket);
        let ing =
            write::ingest(&self.blocks, &self.buffers, input.body, wanted, &lim, class).await?;
        let trailers = match &req.trailing_headers {
            Some(t) => t.read(write::from_trailers).unwrap_or(trailers),
            None => trailers,
        };
        let sent = merge(sent, trailers);
        write::verify(&sent, &ing.computed)?;
        write::verify_md5(input.content_md5.as_deref(), &ing.md5)?;
        let etag_s = ing.etag();
        let data = match ing.data {
            ObjectData::Inline(_) => ObjectData::Blocks(Vec::new()),
            d => d,
        };
        self.meta
            .apply(Command::PutPart {
                bucket: input.bucket,
                key: input.key,
                upload_id: input.upload_id,
                part_number,
                record: PartRecord {
                    size: ing.size,
                    etag: etag_s.clone(),
                    last_modified: now_millis(),
                    checksums: write::stored_checksums(&ing.computed),
                    data,
                },
            })
            .await
            .map_err(error::meta)?;
        drop(ing.pins);
        metrics::counter!("cairn_s3_bytes_received_total").increment(ing.size);
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(etag(&etag_s)),
            checksum_crc32: ing.computed.checksum_crc32,
            checksum_crc32c: ing.computed.checksum_crc32c,
            checksum_crc64nvme: ing.computed.checksum_crc64nvme,
            checksum_sha1: ing.computed.checksum_sha1,
            checksum_sha256: ing.computed.checksum_sha256,
            ..Default::default()
        }))
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let input = req.input;
        check_key(&input.key)?;
        let part_number = check_part_number(input.part_number)?;
        self.meta
            .upload(&input.bucket, &input.key, &input.upload_id)
            .await
            .map_err(error::meta)?;
        let (_, _, src) = self
            .copy_source(
                &input.copy_source,
                input.copy_source_if_match.as_ref(),
                input.copy_source_if_none_match.as_ref(),
                input.copy_source_if_modified_since.as_ref(),
                input.copy_source_if_unmodified_since.as_ref(),
            )
            .await?;
        let range = match &input.copy_source_range {
            None => 0..src.size,
            Some(r) => {
                let parsed = Range::parse(r).map_err(|_| {
                    s3_error!(
                        InvalidArgument,
                        "The x-amz-copy-source-range value must be of the form bytes=first-last"
                    )
                })?;
                if let Range::Int {
                    last: Some(last), ..
                } = parsed
                    && last >= src.size
                {
                    return Err(s3_error!(
                        InvalidRange,
                        "The x-amz-copy-source-range is past the end of the source object"
                    ));
                }
                parsed.check(src.size).map_err(|_| {
                    s3_error!(InvalidRange, "The requested range is not satisfiable")
                })?
            }
        };
        if range.end - range.start > limits::MAX_PUT_SIZE {
            return Err(s3_error!(
                EntityTooLarge,
                "A part may be at most {} bytes",
                limits::MAX_PUT_SIZE
            ));
        }
        let body = if src.size == 0 {
            None
        } else {
            Some(read::body(&self.blocks, &self.buffers, &src, range).await?)
        };
        let mut lim = self.put_limits(limits::MAX_PUT_SIZE);
        lim.inline_max = 0;
        let class = self.meta.class_of(&input.bucket);
        let ing = write::ingest(
            &self.blocks,
            &self.buffers,
            body,
            Wanted::default(),
            &lim,
            class,
        )
        .await?;
        let etag_s = ing.etag();
        let now = now_millis();
        let data = match ing.data {
            ObjectData::Inline(_) => ObjectData::Blocks(Vec::new()),
            d => d,
        };
        self.meta
            .apply(Command::PutPart {
                bucket: input.bucket,
                key: input.key,
                upload_id: input.upload_id,
                part_number,
                record: PartRecord {
                    size: ing.size,
                    etag: etag_s.clone(),
                    last_modified: now,
                    checksums: Default::default(),
                    data,
                },
            })
            .await
            .map_err(error::meta)?;
        drop(ing.pins);
        Ok(S3Response::new(UploadPartCopyOutput {
            copy_part_result: Some(CopyPartResult {
                e_tag: Some(etag(&etag_s)),
                last_modified: Some(ts(now)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let input = req.input;
        check_key(&input.key)?;
        let cond = write_condition(input.if_match.as_ref(), input.if_none_match.as_ref())?;
        let upload = self
            .meta
            .upload(&input.bucket, &input.key, &input.upload_id)
            .await
            .map_err(error::meta)?;
        let wanted = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default();
        if wanted.is_empty() {
            return Err(s3_error!(
                MalformedXML,
                "You must specify at least one part"
            ));
        }
        let stored = self
            .meta
            .parts(&input.upload_id, 0, limits::MAX_PART_NUMBER as usize)
            .await
            .map_err(error::meta)?;
        let by_number: HashMap<u32, &PartRecord> = stored.iter().map(|(n, p)| (*n, p)).collect();
        let mut list = Vec::with_capacity(wanted.len());
        let mut md5s = Md5::new();
        let mut total = 0u64;
        let mut prev = 0u32;
        for (i, p) in wanted.iter().enumerate() {
            let n = check_part_number(p.part_number.unwrap_or(0))?;
            if n <= prev {
                return Err(s3_error!(
                    InvalidPartOrder,
                    "The list of parts was not in ascending order. Parts must be ordered by part number."
                ));
            }
            prev = n;
            let sent = p
                .e_tag
                .as_ref()
                .map(|e| e.value().to_string())
                .unwrap_or_default();
            let part = by_number
                .get(&n)
                .filter(|rec| rec.etag == sent)
                .ok_or_else(|| error::meta(MetaError::InvalidPart(n)))?;
            let mismatch = |mine: &Option<String>, theirs: &Option<String>| matches!((mine, theirs), (Some(a), Some(b)) if a != b);
            if mismatch(&part.checksums.crc32, &p.checksum_crc32)
                || mismatch(&part.checksums.crc32c, &p.checksum_crc32c)
                || mismatch(&part.checksums.sha1, &p.checksum_sha1)
                || mismatch(&part.checksums.sha256, &p.checksum_sha256)
            {
                return Err(s3_error!(
                    InvalidPart,
                    "The checksum of part {n} does not match the one stored"
                ));
            }
            if i + 1 < wanted.len() && part.size < limits::MIN_PART_SIZE {
                return Err(s3_error!(
                    EntityTooSmall,
                    "Your proposed upload is smaller than the minimum allowed size: part {n} is {} bytes, the minimum is {}",
                    part.size,
                    limits::MIN_PART_SIZE
                ));
            }
            let raw = hex::decode(&part.etag)
                .map_err(|_| s3_error!(InternalError, "bad stored part ETag"))?;
            md5s.update(&raw);
            total += part.size;
            list.push((n, sent));
        }
        if total > limits::MAX_OBJECT_SIZE {
            return Err(s3_error!(
                EntityTooLarge,
                "The object would exceed {} bytes",
                limits::MAX_OBJECT_SIZE
            ));
        }
        let etag_s = format!("{}-{}", hex::encode(md5s.finalize()), list.len());
        let record = ObjectRecord {
            size: total,
            etag: etag_s.clone(),
            last_modified: now_millis(),
            headers: upload.headers,
            checksums: Default::default(),
            parts_count: Some(list.len() as u32),
            data: ObjectData::Blocks(Vec::new()),
        };
        let out = self
            .meta
            .apply(Command::CompleteUpload {
                bucket: input.bucket.clone(),
                key: input.key.clone(),
                upload_id: input.upload_id,
                parts: list,
                record,
                cond,
            })
            .await
            .map_err(error::meta)?;
        debug_assert!(matches!(out, Outcome::Object(_)));
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            e_tag: Some(etag(&etag_s)),
            location: Some(format!("/{}/{}", input.bucket, input.key)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let input = req.input;
        self.meta
            .apply(Command::AbortUpload {
                bucket: input.bucket,
                key: input.key,
                upload_id: input.upload_id,
                now: now_millis(),
            })
            .await
            .map_err(error::meta)?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        self.meta
            .upload(&input.bucket, &input.key, &input.upload_id)
            .await
            .map_err(error::meta)?;
        let max = max_keys(input.max_parts)?;
        let after = match input.part_number_marker {
            None => 0,
            Some(m) if m >= 0 => m as u32,
            Some(_) => {
                return Err(s3_error!(
                    InvalidArgument,
                    "part-number-marker must not be negative"
                ));
            }
        };
        let mut parts = self
            .meta
            .parts(&input.upload_id, after, max + 1)
            .await
            .map_err(error::meta)?;
        let truncated = parts.len() > max;
        parts.truncate(max);
        let next = truncated
            .then(|| parts.last().map(|(n, _)| *n as i32))
            .flatten();
        let parts = parts
            .into_iter()
            .map(|(n, p)| Part {
                part_number: Some(n as i32),
                e_tag: Some(etag(&p.etag)),
                size: Some(p.size as i64),
                last_modified: Some(ts(p.last_modified)),
                checksum_crc32: p.checksums.crc32,
                checksum_crc32c: p.checksums.crc32c,
                checksum_crc64nvme: p.checksums.crc64nvme,
                checksum_sha1: p.checksums.sha1,
                checksum_sha256: p.checksums.sha256,
            })
            .collect();
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            max_parts: Some(max as i32),
            part_number_marker: input.part_number_marker,
            next_part_number_marker: next,
            is_truncated: Some(truncated),
            parts: Some(parts),
            owner: Some(owner()),
            initiator: Some(Initiator {
                display_name: Some("cairn".into()),
                id: Some("cairn".into()),
            }),
            storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
            ..Default::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        let max = max_keys(input.max_uploads)?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let after = input
            .key_marker
            .clone()
            .filter(|k| !k.is_empty())
            .map(|k| (k, input.upload_id_marker.clone().filter(|u| !u.is_empty())));
        let mut ups = self
            .meta
            .uploads(&input.bucket, &prefix, after, max + 1)
            .await
            .map_err(error::meta)?;
        let truncated = ups.len() > max;
        ups.truncate(max);
        let (next_key, next_id) = match (truncated, ups.last()) {
            (true, Some(u)) => (Some(u.key.clone()), Some(u.upload_id.clone())),
            _ => (None, None),
        };
        let uploads = ups
            .into_iter()
            .map(|u| MultipartUpload {
                key: Some(u.key),
                upload_id: Some(u.upload_id),
                initiated: Some(ts(u.record.initiated)),
                owner: Some(owner()),
                initiator: Some(Initiator {
                    display_name: Some("cairn".into()),
                    id: Some("cairn".into()),
                }),
                storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: Some(prefix),
            key_marker: input.key_marker,
            upload_id_marker: input.upload_id_marker,
            next_key_marker: next_key,
            next_upload_id_marker: next_id,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            uploads: Some(uploads),
            delimiter: input.delimiter,
            encoding_type: input.encoding_type,
            ..Default::default()
        }))
    }
}

fn split_page(entries: &[ListEntry]) -> (Vec<Object>, Vec<CommonPrefix>) {
    let mut contents = Vec::new();
    let mut prefixes = Vec::new();
    for e in entries {
        match e {
            ListEntry::Object(k, r) => contents.push(Object {
                key: Some(k.clone()),
                e_tag: Some(etag(&r.etag)),
                last_modified: Some(ts(r.last_modified)),
                size: Some(r.size as i64),
                storage_class: Some(ObjectStorageClass::from_static(
                    ObjectStorageClass::STANDARD,
                )),
                owner: Some(owner()),
                ..Default::default()
            }),
            ListEntry::Prefix(p) => prefixes.push(CommonPrefix {
                prefix: Some(p.clone()),
            }),
        }
    }
    (contents, prefixes)
}

/// Continuation tokens are the last name returned, base64-encoded (opaque to clients).
fn encode_token(name: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name.as_bytes())
}

fn decode_token(t: &str) -> S3Result<String> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t.as_bytes())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            s3_error!(
                InvalidArgument,
                "The continuation token provided is incorrect"
            )
        })
}
