//! Ids, hashes and small shared types used by every cairn crate.
//!
//! Nothing here does I/O. The block address ([`BlockHash`]) is the BLAKE3 hash of
//! a block's bytes; everything that stores, fetches or verifies a block names it so.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Version of the on-disk layout of a data directory. A binary refuses to open a
/// directory whose recorded version is newer than this (see `cairn::datadir`).
///
/// 2: the metadata command log (`meta.log`) holds commands the database file may not.
/// 3: metadata changes are entries of a Raft log (`raft/`); the node has an id
/// (`node_id`). A format-2 `meta.log` is applied and removed at open.
pub const DATA_DIR_FORMAT_VERSION: u32 = 3;

/// The content address of a block: BLAKE3 of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// Hashes `data` into its address.
    pub fn of(data: &[u8]) -> Self {
        BlockHash(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the 64-character lowercase hex form, as used in block file names.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(BlockHash(out))
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One block of an object: its address and its length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    pub hash: BlockHash,
    pub len: u32,
}

/// Milliseconds since the Unix epoch (UTC); the time unit stored in metadata.
pub type UnixMillis = i64;

/// The current wall-clock time in [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let h = BlockHash::of(b"hello");
        assert_eq!(BlockHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(BlockHash::from_hex("zz"), None);
        assert_eq!(BlockHash::from_hex(&"g".repeat(64)), None);
    }
}
