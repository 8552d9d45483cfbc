//! The records stored in the metadata tables, and their versioned encoding.
//!
//! Every value is one format-version byte followed by the postcard encoding of the
//! record. A binary refuses a record whose version byte is newer than it knows.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use cairn_types::{BlockRef, UnixMillis};

use crate::MetaError;

/// Format version of every record written by this binary.
pub const RECORD_VERSION: u8 = 1;

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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRecord {
    pub created: UnixMillis,
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
    /// Larger ones are a list of content-addressed blocks, in order.
    Blocks(Vec<BlockRef>),
}

impl ObjectData {
    pub fn blocks(&self) -> &[BlockRef] {
        match self {
            ObjectData::Inline(_) => &[],
            ObjectData::Blocks(b) => b,
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
}

/// The replication factor of a new cluster.
pub const DEFAULT_REPLICATION: u8 = 3;

impl Layout {
    pub fn node(&self, id: u64) -> Option<&LayoutNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Copies each block gets: the replication factor, capped by the nodes that take
    /// data.
    pub fn copies(&self) -> usize {
        let holders = self
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Active && n.capacity > 0)
            .count();
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
        let mut b = encode(&BucketRecord { created: 5 }).unwrap();
        assert_eq!(decode::<BucketRecord>(&b).unwrap().created, 5);
        b[0] = RECORD_VERSION + 1;
        let err = decode::<BucketRecord>(&b).unwrap_err().to_string();
        assert!(err.contains("newer"), "{err}");
        assert!(decode::<BucketRecord>(&[]).is_err());
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
            let _ = decode::<BucketRecord>(&bytes);
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
