//! The records stored in the metadata tables, and their versioned encoding.
//!
//! Every value is one format-version byte followed by the postcard encoding of the
//! record. A binary refuses a record whose version byte is newer than it knows.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use cairn_types::{BlockHash, BlockRef, StorageClass, UnixMillis};

use crate::MetaError;

/// Format version of every record written by this binary.
///
/// 2: a bucket's storage class (`BucketRecord::class`) and the cluster's default
/// one (`Layout::default_class`); records of version 1 are read as having none.
pub const RECORD_VERSION: u8 = 2;

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, MetaError> {
    let mut out = vec![RECORD_VERSION];
    postcard::to_io(v, &mut out).map_err(|e| MetaError::Encoding(e.to_string()))?;
    Ok(out)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, MetaError> {
    match bytes.split_first() {
        Some((&v, rest)) if v <= RECORD_VERSION => {
            postcard::from_bytes(rest).map_err(|e| MetaError::Encoding(e.to_string()))
        }
        Some((&v, _)) => Err(MetaError::Encoding(format!(
            "record format version {v} is newer than this binary knows ({RECORD_VERSION})"
        ))),
        None => Err(MetaError::Encoding("empty record".into())),
    }
}

/// Decodes a record whose shape changed at version 2: a record of version 1 is
/// read as `Old` and upgraded.
fn decode_upgraded<T: DeserializeOwned, Old: DeserializeOwned>(
    bytes: &[u8],
    upgrade: impl FnOnce(Old) -> T,
) -> Result<T, MetaError> {
    match bytes.first() {
        Some(1) => {
            let old: Old = postcard::from_bytes(&bytes[1..])
                .map_err(|e| MetaError::Encoding(e.to_string()))?;
            Ok(upgrade(old))
        }
        _ => decode(bytes),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRecord {
    pub created: UnixMillis,
    /// How the bucket's new objects are stored; `None`: the cluster's default.
    pub class: Option<StorageClass>,
}

impl BucketRecord {
    /// Reads a stored bucket record (of any version this binary knows).
    pub fn decode(bytes: &[u8]) -> Result<BucketRecord, MetaError> {
        #[derive(Deserialize)]
        struct V1 {
            created: UnixMillis,
        }
        decode_upgraded(bytes, |o: V1| BucketRecord {
            created: o.created,
            class: None,
        })
    }
}

/// Standard HTTP headers S3 stores with an object and returns on GET/HEAD.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredHeaders {
    pub content_type: Option<String>,
    pub cache_control: Option<String>,
    pub content_disposition: Option<String>,
    pub content_encoding: Option<String>,
    pub content_language: Option<String>,
    /// The `Expires` header, as the client sent it (HTTP date).
    pub expires: Option<String>,
    /// `x-amz-meta-*` pairs, names without the prefix, in the order received.
    pub user: Vec<(String, String)>,
}

/// Additional checksums a client sent with the object (base64, as on the wire).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksums {
    pub crc32: Option<String>,
    pub crc32c: Option<String>,
    pub crc64nvme: Option<String>,
    pub sha1: Option<String>,
    pub sha256: Option<String>,
}

/// Where an object's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectData {
    /// Small objects live in the metadata record itself (encoded as one byte string,
    /// not element by element).
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Larger ones are a list of content-addressed blocks, in order, replicated.
    Blocks(Vec<BlockRef>),
    /// Blocks each kept in its storage class (erasure-coded ones, or a multipart
    /// object whose parts were written in different classes).
    Classed(Vec<ClassedBlock>),
}

/// A block and how it is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassedBlock {
    pub block: BlockRef,
    pub class: StorageClass,
}

impl ObjectData {
    /// The object's blocks, in order, each with its class.
    pub fn blocks(&self) -> Vec<ClassedBlock> {
        match self {
            ObjectData::Inline(_) => Vec::new(),
            ObjectData::Blocks(b) => b
                .iter()
                .map(|&block| ClassedBlock {
                    block,
                    class: StorageClass::Replicated,
                })
                .collect(),
            ObjectData::Classed(b) => b.clone(),
        }
    }

    /// The addresses of the object's blocks.
    pub fn hashes(&self) -> Vec<BlockHash> {
        match self {
            ObjectData::Inline(_) => Vec::new(),
            ObjectData::Blocks(b) => b.iter().map(|b| b.hash).collect(),
            ObjectData::Classed(b) => b.iter().map(|b| b.block.hash).collect(),
        }
    }

    /// Number of blocks.
    pub fn block_count(&self) -> usize {
        match self {
            ObjectData::Inline(_) => 0,
            ObjectData::Blocks(b) => b.len(),
            ObjectData::Classed(b) => b.len(),
        }
    }

    /// Blocks in order as one list: replicated ones stay [`ObjectData::Blocks`].
    pub fn from_blocks(blocks: Vec<ClassedBlock>) -> ObjectData {
        if blocks.iter().all(|b| b.class == StorageClass::Replicated) {
            ObjectData::Blocks(blocks.into_iter().map(|b| b.block).collect())
        } else {
            ObjectData::Classed(blocks)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    pub size: u64,
    /// The ETag without quotes: hex MD5, or `md5-of-md5s-N` for multipart objects.
    pub etag: String,
    pub last_modified: UnixMillis,
    pub headers: StoredHeaders,
    pub checksums: Checksums,
    /// Number of parts for an object made by multipart upload.
    pub parts_count: Option<u32>,
    pub data: ObjectData,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    pub initiated: UnixMillis,
    pub headers: StoredHeaders,
    /// The checksum algorithm named at creation, if any (e.g. "CRC32").
    pub checksum_algorithm: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub size: u64,
    /// Hex MD5 of the part, without quotes.
    pub etag: String,
    pub last_modified: UnixMillis,
    pub checksums: Checksums,
    pub data: ObjectData,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub secret: String,
    pub root: bool,
    pub created: UnixMillis,
}

/// Where the cluster keeps data: its nodes and how many copies of each block.
/// Versioned: every change bumps `version` (the placement of blocks follows it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub version: u64,
    /// Copies of each block wanted (capped by the number of nodes holding data).
    pub replication: u8,
    /// Copies fsynced before a write is acknowledged; 0: a majority of the copies.
    pub write_quorum: u8,
    pub nodes: Vec<LayoutNode>,
    /// The storage class of buckets that name none.
    pub default_class: StorageClass,
}

/// The replication factor of a new cluster.
pub const DEFAULT_REPLICATION: u8 = 3;

impl Layout {
    /// Reads a stored layout (of any version this binary knows).
    pub fn decode(bytes: &[u8]) -> Result<Layout, MetaError> {
        #[derive(Deserialize)]
        struct V1 {
            version: u64,
            replication: u8,
            write_quorum: u8,
            nodes: Vec<LayoutNode>,
        }
        decode_upgraded(bytes, |o: V1| Layout {
            version: o.version,
            replication: o.replication,
            write_quorum: o.write_quorum,
            nodes: o.nodes,
            default_class: StorageClass::Replicated,
        })
    }

    /// Nodes that take data.
    pub fn data_nodes(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.state == NodeState::Active && n.capacity > 0)
            .count()
    }

    /// Refuses a class this layout cannot place: an erasure-coded class needs a
    /// node for each of its shards.
    pub fn check_class(&self, class: StorageClass) -> Result<(), MetaError> {
        let have = self.data_nodes();
        if class.nodes_needed() > have {
            return Err(MetaError::Refused(format!(
                "storage class {class} puts each shard of a block on its own node: it needs \
                 {} nodes that take data, and the cluster has {have}",
                class.nodes_needed()
            )));
        }
        Ok(())
    }

    pub fn node(&self, id: u64) -> Option<&LayoutNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Copies each block gets: the replication factor, capped by the nodes that take
    /// data.
    pub fn copies(&self) -> usize {
        let holders = self.data_nodes();
        usize::from(self.replication.max(1)).min(holders.max(1))
    }

    /// Copies that must be fsynced before a write is acknowledged.
    pub fn quorum(&self) -> usize {
        let copies = self.copies();
        match self.write_quorum {
            0 => copies / 2 + 1,
            w => usize::from(w).min(copies),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutNode {
    pub id: u64,
    pub zone: String,
    /// Bytes this node offers; placement gives it a share of the blocks in proportion.
    pub capacity: u64,
    /// Where the other nodes reach it.
    pub rpc: String,
    pub state: NodeState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Holds its share of the blocks.
    Active,
    /// Being removed: takes no new blocks, its blocks move to their new places.
    Draining,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_version_is_refused() {
        let mut b = encode(&BucketRecord {
            created: 5,
            class: None,
        })
        .unwrap();
        assert_eq!(BucketRecord::decode(&b).unwrap().created, 5);
        b[0] = RECORD_VERSION + 1;
        let err = BucketRecord::decode(&b).unwrap_err().to_string();
        assert!(err.contains("newer"), "{err}");
        assert!(BucketRecord::decode(&[]).is_err());
    }

    #[test]
    fn version_1_records_read_as_having_no_class() {
        // As a binary of format 1 wrote them.
        let mut b = vec![1u8];
        b.extend(postcard::to_allocvec(&7i64).unwrap());
        let r = BucketRecord::decode(&b).unwrap();
        assert_eq!((r.created, r.class), (7, None));
        let node = LayoutNode {
            id: 9,
            zone: "z".into(),
            capacity: 100,
            rpc: "127.0.0.1:1".into(),
            state: NodeState::Active,
        };
        let mut l = vec![1u8];
        l.extend(postcard::to_allocvec(&(4u64, 3u8, 0u8, vec![node.clone()])).unwrap());
        let layout = Layout::decode(&l).unwrap();
        assert_eq!(layout.version, 4);
        assert_eq!(layout.nodes, vec![node]);
        assert_eq!(layout.default_class, StorageClass::Replicated);
        // And the current version round-trips.
        let c = StorageClass::Erasure { data: 3, parity: 2 };
        let now = Layout {
            default_class: c,
            ..layout
        };
        assert_eq!(Layout::decode(&encode(&now).unwrap()).unwrap(), now);
        let rec = BucketRecord {
            created: 1,
            class: Some(c),
        };
        assert_eq!(BucketRecord::decode(&encode(&rec).unwrap()).unwrap(), rec);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    proptest::proptest! {
        /// Arbitrary bytes never panic the decoder: a record is read or refused.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = decode::<ObjectRecord>(&bytes);
            let _ = decode::<UploadRecord>(&bytes);
            let _ = decode::<PartRecord>(&bytes);
            let _ = decode::<KeyRecord>(&bytes);
            let _ = BucketRecord::decode(&bytes);
            let _ = Layout::decode(&bytes);
        }

        /// Every record survives a round trip.
        #[test]
        fn object_records_round_trip(size in 0u64..1 << 40, etag in "[0-9a-f]{32}(-[0-9]{1,4})?", data in proptest::collection::vec(proptest::num::u8::ANY, 0..100), user in proptest::collection::vec(("[a-z]{1,8}", ".{0,20}"), 0..4)) {
            let r = ObjectRecord {
                size,
                etag,
                last_modified: 12345,
                headers: StoredHeaders { user, content_type: Some("a/b".into()), ..Default::default() },
                checksums: Checksums::default(),
                parts_count: Some(3),
                data: ObjectData::Inline(data),
            };
            proptest::prop_assert_eq!(decode::<ObjectRecord>(&encode(&r).unwrap()).unwrap(), r);
        }
    }
}
