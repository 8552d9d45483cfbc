//! The write path on this node: a request body streamed into content-addressed blocks.
//!
//! One pass over the bytes: as the body arrives it is cut into blocks; each full block
//! goes to a blocking task that feeds it to the MD5 (the ETag) and to any checksum the
//! client asked for, then to another that hashes it with BLAKE3 (its address), writes
//! and fsyncs it. Receiving, the MD5 and the writes overlap: at most four blocks per
//! request are in memory (one filling, one in MD5, two being written), whatever the
//! object size, and all requests together stay within the block memory budget.
//!
//! The blocks written are pinned until the caller has committed (or given up on) the
//! metadata that names them; a block nobody ends up naming is collected later.

use futures::StreamExt;
use md5::{Digest, Md5};
use s3s::checksum::ChecksumHasher;
use s3s::dto::StreamingBlob;
use s3s::{S3Error, S3Result, s3_error};

use cairn_blocks::PinGuard;
use cairn_cluster::{Blocks, DataError};

use crate::buffers::{BlockBuf, BlockBuffers};
use cairn_meta::{Checksums, ClassedBlock, ObjectData};
use cairn_types::{BlockHash, BlockRef, StorageClass};

use crate::error;

/// What was stored from one body.
pub struct Ingested {
    pub size: u64,
    pub md5: [u8; 16],
    pub data: ObjectData,
    /// Checksums computed over the body, for the algorithms that were asked for.
    pub computed: s3s::dto::Checksum,
    /// Keeps the blocks from garbage collection until the metadata is committed.
    pub pins: Vec<PinGuard>,
}

impl Ingested {
    pub fn etag(&self) -> String {
        hex::encode(self.md5)
    }
}

struct Hashing {
    md5: Md5,
    checksums: ChecksumHasher,
}

/// A block buffer, back to the pool (and the memory budget) when dropped.
type Block = BlockBuf;

type HashTask = tokio::task::JoinHandle<(Hashing, Block)>;
type WriteTask = tokio::task::JoinHandle<Result<(ClassedBlock, PinGuard), DataError>>;

/// Block writes (fsyncs) of one request that may be in flight at once.
const WRITES_IN_FLIGHT: usize = 2;

/// Two stages on blocking threads: the object's MD5 (and requested checksums), which
/// must see the blocks in order, and per block its BLAKE3, write and fsync (up to
/// [`WRITES_IN_FLIGHT`] at once). Receiving, the MD5 of one block and the writes of the
/// ones before overlap.
struct Pipeline {
    store: Blocks,
    state: Option<Hashing>,
    hashing: Option<HashTask>,
    writing: std::collections::VecDeque<WriteTask>,
    blocks: Vec<ClassedBlock>,
    pins: Vec<PinGuard>,
    /// The class the blocks are written in (on a node alone, always whole).
    class: StorageClass,
}

fn lost() -> S3Error {
    s3_error!(InternalError, "write path state lost")
}

impl Pipeline {
    /// Whether any block was handed to the pipeline.
    fn started(&self) -> bool {
        self.hashing.is_some() || !self.writing.is_empty() || !self.blocks.is_empty()
    }

    async fn push(&mut self, block: Block) -> S3Result<()> {
        self.advance().await?;
        let mut st = self.state.take().ok_or_else(lost)?;
        self.hashing = Some(tokio::task::spawn_blocking(move || {
            st.md5.update(&block[..]);
            st.checksums.update(&block[..]);
            (st, block)
        }));
        Ok(())
    }

    /// Moves the hashed block (if any) on to be written, once the previous write is done.
    async fn advance(&mut self) -> S3Result<()> {
        let Some(task) = self.hashing.take() else {
            return Ok(());
        };
        let (st, block) = task.await.map_err(error::join)?;
        self.state = Some(st);
        if self.writing.len() >= WRITES_IN_FLIGHT {
            self.finish_write().await?;
        }
        let blocks = self.store.clone();
        // BLAKE3 is independent of the MD5 chain: it runs beside the next block's MD5.
        let task = if blocks.local_only() {
            // One blocking task hashes, writes and fsyncs.
            tokio::task::spawn_blocking(move || {
                let store = blocks.store();
                let hash = BlockHash::of(&block);
                let mut pin = store.pin();
                pin.add(hash);
                store.put(&hash, &block)?;
                let block = BlockRef {
                    hash,
                    len: block.len() as u32,
                };
                let class = StorageClass::Replicated;
                Ok((ClassedBlock { block, class }, pin))
            })
        } else {
            // Hashed on a blocking thread, then written to the block's nodes.
            let class = self.class;
            tokio::spawn(async move {
                let store = blocks.store().clone();
                let (hash, pin, block) = tokio::task::spawn_blocking(move || {
                    let hash = BlockHash::of(&block);
                    let mut pin = store.pin();
                    pin.add(hash);
                    (hash, pin, block)
                })
                .await
                .map_err(|e| DataError::Unavailable(format!("hashing task: {e}")))?;
                let len = block.len() as u32;
                let data = bytes::Bytes::from_owner(block);
                match class {
                    StorageClass::Replicated => blocks.put(hash, data).await?,
                    StorageClass::Erasure { data: k, parity: m } => {
                        blocks.put_coded(hash, data, k, m).await?
                    }
                }
                let block = BlockRef { hash, len };
                Ok((ClassedBlock { block, class }, pin))
            })
        };
        self.writing.push_back(task);
        Ok(())
    }

    async fn finish_write(&mut self) -> S3Result<()> {
        if let Some(task) = self.writing.pop_front() {
            let (br, pin) = task.await.map_err(error::join)?.map_err(error::data)?;
            self.blocks.push(br);
            self.pins.push(pin);
        }
        Ok(())
    }

    async fn finish(mut self) -> S3Result<(Hashing, Vec<ClassedBlock>, Vec<PinGuard>)> {
        self.advance().await?;
        while !self.writing.is_empty() {
            self.finish_write().await?;
        }
        let st = self.state.take().ok_or_else(lost)?;
        Ok((st, self.blocks, self.pins))
    }
}

/// Which additional checksums to compute while the body streams.
#[derive(Default, Clone, Copy, Debug)]
pub struct Wanted {
    pub crc32: bool,
    pub crc32c: bool,
    pub crc64nvme: bool,
    pub sha1: bool,
    pub sha256: bool,
}

impl Wanted {
    /// Adds the algorithm named like `CRC32`, `crc32c`, or `x-amz-checksum-sha256`.
    pub fn add_name(&mut self, name: &str) {
        let n = name.trim().to_ascii_lowercase();
        match n.strip_prefix("x-amz-checksum-").unwrap_or(&n) {
            "crc32" => self.crc32 = true,
            "crc32c" => self.crc32c = true,
            "crc64nvme" => self.crc64nvme = true,
            "sha1" => self.sha1 = true,
            "sha256" => self.sha256 = true,
            _ => {}
        }
    }

    pub fn add_present(&mut self, c: &s3s::dto::Checksum) {
        self.crc32 |= c.checksum_crc32.is_some();
        self.crc32c |= c.checksum_crc32c.is_some();
        self.crc64nvme |= c.checksum_crc64nvme.is_some();
        self.sha1 |= c.checksum_sha1.is_some();
        self.sha256 |= c.checksum_sha256.is_some();
    }

    fn hasher(self) -> ChecksumHasher {
        use s3s::crypto::Checksum as _;
        ChecksumHasher {
            crc32: self.crc32.then(s3s::crypto::Crc32::new),
            crc32c: self.crc32c.then(s3s::crypto::Crc32c::new),
            crc64nvme: self.crc64nvme.then(s3s::crypto::Crc64Nvme::new),
            sha1: self.sha1.then(s3s::crypto::Sha1::new),
            sha256: self.sha256.then(s3s::crypto::Sha256::new),
        }
    }
}

pub struct Limits {
    pub block_size: usize,
    /// Bodies up to this size are kept inline in the metadata.
    pub inline_max: usize,
    /// A body larger than this fails with EntityTooLarge.
    pub max_size: u64,
}

fn body_error(e: impl std::fmt::Display) -> S3Error {
    let msg = e.to_string();
    tracing::warn!(error = %msg, "request body failed");
    if msg.contains("Sha256Mismatch") {
        let mut e = S3Error::with_message(
            s3s::S3ErrorCode::Custom("XAmzContentSHA256Mismatch".into()),
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        );
        e.set_status_code(http::StatusCode::BAD_REQUEST);
        e
    } else if msg.contains("SignatureMismatch") {
        s3_error!(
            SignatureDoesNotMatch,
            "A chunk signature of the body does not match"
        )
    } else if msg.contains("FormatError") {
        s3_error!(InvalidRequest, "The aws-chunked body is malformed")
    } else {
        s3_error!(
            IncompleteBody,
            "The request body could not be read completely"
        )
    }
}

/// Streams `body` into blocks (or inline data). See the module docs.
pub async fn ingest(
    store: &Blocks,
    buffers: &std::sync::Arc<BlockBuffers>,
    body: Option<StreamingBlob>,
    wanted: Wanted,
    limits: &Limits,
    class: StorageClass,
) -> S3Result<Ingested> {
    let bs = limits.block_size;
    let mut pipe = Pipeline {
        store: store.clone(),
        state: Some(Hashing {
            md5: Md5::new(),
            checksums: wanted.hasher(),
        }),
        hashing: None,
        writing: std::collections::VecDeque::new(),
        blocks: Vec::new(),
        pins: Vec::new(),
        class,
    };
    // Small bodies collect in `small`; once a body outgrows the inline size it moves
    // to a block buffer from the pool.
    let mut small: Vec<u8> = Vec::new();
    let mut cur: Option<BlockBuf> = None;
    let mut size: u64 = 0;
    if let Some(mut body) = body {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(body_error)?;
            size += chunk.len() as u64;
            if size > limits.max_size {
                return Err(s3_error!(
                    EntityTooLarge,
                    "Your proposed upload exceeds the maximum allowed size ({} bytes)",
                    limits.max_size
                ));
            }
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let buf = match &mut cur {
                    Some(b) => b,
                    None if size <= limits.inline_max as u64 && !pipe.started() => {
                        small.extend_from_slice(rest);
                        break;
                    }
                    None => {
                        let mut b = buffers.take().await?;
                        b.extend_from_slice(&small);
                        small = Vec::new();
                        cur.insert(b)
                    }
                };
                let take = (bs - buf.len()).min(rest.len());
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if buf.len() == bs
                    && let Some(full) = cur.take()
                {
                    pipe.push(full).await?;
                }
            }
        }
    }
    if cur.is_none() && !pipe.started() {
        let mut st = pipe.state.take().ok_or_else(lost)?;
        st.md5.update(&small);
        st.checksums.update(&small);
        return Ok(Ingested {
            size,
            md5: st.md5.finalize().into(),
            data: ObjectData::Inline(small),
            computed: st.checksums.finalize(),
            pins: Vec::new(),
        });
    }
    if let Some(last) = cur.take().filter(|b| !b.is_empty()) {
        pipe.push(last).await?;
    }
    let (st, blocks, pins) = pipe.finish().await?;
    Ok(Ingested {
        size,
        md5: st.md5.finalize().into(),
        data: ObjectData::from_blocks(blocks),
        computed: st.checksums.finalize(),
        pins,
    })
}

/// Compares checksums the client sent (headers or trailers) with those computed.
pub fn verify(sent: &s3s::dto::Checksum, computed: &s3s::dto::Checksum) -> S3Result<()> {
    let pairs = [
        ("CRC32", &sent.checksum_crc32, &computed.checksum_crc32),
        ("CRC32C", &sent.checksum_crc32c, &computed.checksum_crc32c),
        (
            "CRC64NVME",
            &sent.checksum_crc64nvme,
            &computed.checksum_crc64nvme,
        ),
        ("SHA1", &sent.checksum_sha1, &computed.checksum_sha1),
        ("SHA256", &sent.checksum_sha256, &computed.checksum_sha256),
    ];
    for (name, s, c) in pairs {
        if let (Some(s), Some(c)) = (s, c)
            && s != c
        {
            return Err(s3_error!(
                BadDigest,
                "The {name} you specified did not match the calculated checksum."
            ));
        }
    }
    Ok(())
}

/// Checks a Content-MD5 header against the MD5 computed over the body.
pub fn verify_md5(content_md5: Option<&str>, md5: &[u8; 16]) -> S3Result<()> {
    let Some(sent) = content_md5 else {
        return Ok(());
    };
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(sent.trim())
        .ok()
        .filter(|d| d.len() == 16)
        .ok_or_else(|| s3_error!(InvalidDigest, "The Content-MD5 you specified is not valid."))?;
    if decoded != md5 {
        return Err(s3_error!(
            BadDigest,
            "The Content-MD5 you specified did not match what we received."
        ));
    }
    Ok(())
}

/// The checksums that were both asked for and computed, for storage.
pub fn stored_checksums(c: &s3s::dto::Checksum) -> Checksums {
    Checksums {
        crc32: c.checksum_crc32.clone(),
        crc32c: c.checksum_crc32c.clone(),
        crc64nvme: c.checksum_crc64nvme.clone(),
        sha1: c.checksum_sha1.clone(),
        sha256: c.checksum_sha256.clone(),
    }
}

/// Checksums a client sent as trailing headers of an aws-chunked body.
pub fn from_trailers(h: &http::HeaderMap) -> s3s::dto::Checksum {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    s3s::dto::Checksum {
        checksum_crc32: get("x-amz-checksum-crc32"),
        checksum_crc32c: get("x-amz-checksum-crc32c"),
        checksum_crc64nvme: get("x-amz-checksum-crc64nvme"),
        checksum_sha1: get("x-amz-checksum-sha1"),
        checksum_sha256: get("x-amz-checksum-sha256"),
        ..Default::default()
    }
}
