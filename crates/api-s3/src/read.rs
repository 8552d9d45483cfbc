//! The read path on this node: an object's bytes, verified block by block.
//!
//! Every block is read whole and its BLAKE3 checked before any of its bytes is sent.
//! The first block of the requested range is read before the response starts, so a
//! bad first block is a clean 500; a bad later block ends the body stream with an
//! error, which aborts the connection: the client sees a truncated body, never wrong
//! bytes. The next block is read while the current one is sent (two in memory at most).

use std::ops::Range;
use std::sync::Arc;

use crate::buffers::BlockBuffers;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use s3s::S3Result;
use s3s::dto::StreamingBlob;

use cairn_cluster::{Blocks, DataError};
use cairn_meta::{ClassedBlock, ObjectData, ObjectRecord};
use cairn_types::StorageClass;

use crate::error;

/// The blocks overlapping `range`, each with the byte range to take from it.
pub fn plan(blocks: &[ClassedBlock], range: &Range<u64>) -> Vec<(ClassedBlock, Range<usize>)> {
    let mut out = Vec::new();
    let mut offset = 0u64;
    for cb in blocks {
        let b = &cb.block;
        let start = offset;
        let end = offset + u64::from(b.len);
        offset = end;
        if end <= range.start || b.len == 0 {
            continue;
        }
        if start >= range.end {
            break;
        }
        let from = range.start.saturating_sub(start) as usize;
        let to = (range.end.min(end) - start) as usize;
        out.push((*cb, from..to));
    }
    out
}

async fn read_block(
    store: Blocks,
    buffers: Arc<BlockBuffers>,
    cb: ClassedBlock,
) -> Result<Bytes, DataError> {
    let buf = buffers
        .take()
        .await
        .map_err(|_| DataError::Unavailable("shutting down".into()))?;
    let b = cb.block;
    let data = match cb.class {
        StorageClass::Replicated => store.read(b.hash, buf).await?,
        StorageClass::Erasure { data, parity } => {
            store.read_coded(b.hash, b.len, data, parity, buf).await?
        }
    };
    if data.len() != b.len as usize {
        return Err(DataError::Block(cairn_blocks::BlockError::Corrupt {
            hash: b.hash,
            path: store.store().path_of(&b.hash),
            reason: format!(
                "length {} differs from the manifest's {}",
                data.len(),
                b.len
            ),
        }));
    }
    // The buffer returns to the pool when the last slice of it has been sent.
    Ok(Bytes::from_owner(data))
}

/// A stream of the object's bytes in `range`. Reads the first block before returning.
pub async fn body(
    store: &Blocks,
    buffers: &Arc<BlockBuffers>,
    rec: &ObjectRecord,
    range: Range<u64>,
) -> S3Result<StreamingBlob> {
    match &rec.data {
        ObjectData::Inline(data) => {
            let slice = Bytes::copy_from_slice(&data[range.start as usize..range.end as usize]);
            Ok(StreamingBlob::wrap::<_, std::io::Error>(stream::once(
                async move { Ok(slice) },
            )))
        }
        ObjectData::Blocks(_) | ObjectData::Classed(_) => {
            let blocks = rec.data.blocks();
            let store = store.clone();
            let buffers = buffers.clone();
            // Up to READ_AHEAD blocks are read and verified at once, the first of
            // them together with the next.
            let mut reads = stream::iter(plan(&blocks, &range))
                .map(move |(b, r)| {
                    let (store, buffers) = (store.clone(), buffers.clone());
                    async move { read_block(store, buffers, b).await.map(|d| d.slice(r)) }
                })
                .buffered(READ_AHEAD);
            let head = match reads.next().await {
                None => return Ok(StreamingBlob::wrap::<_, std::io::Error>(stream::empty())),
                Some(Ok(head)) => head,
                Some(Err(e)) => {
                    tracing::error!(error = %e, "GET refused before sending: a block failed its check");
                    return Err(error::data(e));
                }
            };
            let rest = reads
                .inspect_err(|e| {
                    tracing::error!(error = %e, "GET aborted mid-body: a block failed its check");
                })
                .map_err(std::io::Error::other);
            let s = stream::once(async move { Ok::<_, std::io::Error>(head) }).chain(rest);
            Ok(StreamingBlob::wrap(s))
        }
    }
}

/// Blocks of one GET read ahead of the one being sent.
const READ_AHEAD: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_types::{BlockHash, BlockRef};

    fn b(len: u32) -> ClassedBlock {
        ClassedBlock {
            block: BlockRef {
                hash: BlockHash::of(&len.to_le_bytes()),
                len,
            },
            class: StorageClass::Replicated,
        }
    }

    #[test]
    fn plan_takes_only_needed_blocks() {
        let blocks = [b(10), b(10), b(5)];
        let p = plan(&blocks, &(0..25));
        assert_eq!(
            p.iter().map(|x| x.1.clone()).collect::<Vec<_>>(),
            [0..10, 0..10, 0..5]
        );
        let p = plan(&blocks, &(12..13));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].1, 2..3);
        let p = plan(&blocks, &(9..21));
        assert_eq!(
            p.iter().map(|x| x.1.clone()).collect::<Vec<_>>(),
            [9..10, 0..10, 0..1]
        );
    }

    proptest::proptest! {
        #[test]
        fn plan_covers_exactly_the_range(lens in proptest::collection::vec(1u32..50, 1..8), a in 0u64..400, n in 1u64..400) {
            let blocks: Vec<ClassedBlock> = lens.iter().map(|&l| b(l)).collect();
            let total: u64 = lens.iter().map(|&l| u64::from(l)).sum();
            let start = a.min(total - 1);
            let end = (start + n).min(total);
            let p = plan(&blocks, &(start..end));
            let covered: usize = p.iter().map(|x| x.1.len()).sum();
            proptest::prop_assert_eq!(covered as u64, end - start);
        }
    }
}
