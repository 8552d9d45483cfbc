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

/// How an object's blocks are kept: whole copies on `replication` nodes (the
/// cluster's replication factor), or erasure-coded (Reed-Solomon): each block cut
/// into `data` shards plus `parity` shards computed from them, one shard per node,
/// any `data` of which give the block back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StorageClass {
    #[default]
    Replicated,
    Erasure {
        data: u8,
        parity: u8,
    },
}

/// Bounds of an erasure-coding scheme: data shards, parity shards, and both.
pub const MAX_DATA_SHARDS: u8 = 16;
pub const MAX_PARITY_SHARDS: u8 = 8;

impl StorageClass {
    /// Shards (or copies, for a replicated class: 1) each block is cut into.
    pub fn shards(&self) -> usize {
        match *self {
            StorageClass::Replicated => 1,
            StorageClass::Erasure { data, parity } => usize::from(data) + usize::from(parity),
        }
    }

    /// Nodes the class needs at least (a replicated class: 1).
    pub fn nodes_needed(&self) -> usize {
        self.shards()
    }
}

impl fmt::Display for StorageClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageClass::Replicated => f.write_str("replicated"),
            StorageClass::Erasure { data, parity } => write!(f, "EC:{data}+{parity}"),
        }
    }
}

impl std::str::FromStr for StorageClass {
    type Err = String;

    /// `replicated`, or `EC:k+m` (k data shards, 2 to 16; m parity shards, 1 to 8).
    fn from_str(s: &str) -> Result<StorageClass, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("replicated") {
            return Ok(StorageClass::Replicated);
        }
        let bad = || {
            format!(
                "'{s}' is not a storage class: use 'replicated' or 'EC:k+m' with k data \
                 shards (2 to {MAX_DATA_SHARDS}) and m parity shards (1 to {MAX_PARITY_SHARDS}), e.g. EC:3+2"
            )
        };
        let rest = t
            .strip_prefix("EC:")
            .or_else(|| t.strip_prefix("ec:"))
            .ok_or_else(bad)?;
        let (k, m) = rest.split_once('+').ok_or_else(bad)?;
        let data: u8 = k.trim().parse().map_err(|_| bad())?;
        let parity: u8 = m.trim().parse().map_err(|_| bad())?;
        if !(2..=MAX_DATA_SHARDS).contains(&data) || !(1..=MAX_PARITY_SHARDS).contains(&parity) {
            return Err(bad());
        }
        Ok(StorageClass::Erasure { data, parity })
    }
}

/// One shard of an erasure-coded block: shard `index` (data shards first, then
/// parity) of the block `block` cut into `data` + `parity` shards.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId {
    pub block: BlockHash,
    pub data: u8,
    pub parity: u8,
    pub index: u8,
}

impl ShardId {
    /// The shard's file name in its block's shard directory: `k+m.i`.
    pub fn file_name(&self) -> String {
        format!("{}+{}.{}", self.data, self.parity, self.index)
    }

    /// Parses [`ShardId::file_name`] for `block`; `None` for anything else.
    pub fn parse(block: BlockHash, name: &str) -> Option<ShardId> {
        let (scheme, index) = name.split_once('.')?;
        let (k, m) = scheme.split_once('+')?;
        let digits =
            |x: &str| !x.is_empty() && x.len() <= 3 && x.bytes().all(|b| b.is_ascii_digit());
        if !digits(k) || !digits(m) || !digits(index) {
            return None;
        }
        let id = ShardId {
            block,
            data: k.parse().ok()?,
            parity: m.parse().ok()?,
            index: index.parse().ok()?,
        };
        let ok = (1..=MAX_DATA_SHARDS).contains(&id.data)
            && (1..=MAX_PARITY_SHARDS).contains(&id.parity)
            && id.index < id.data + id.parity;
        (ok && id.file_name() == name).then_some(id)
    }

    /// The class the shard belongs to.
    pub fn class(&self) -> StorageClass {
        StorageClass::Erasure {
            data: self.data,
            parity: self.parity,
        }
    }
}

impl fmt::Debug for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Shard({} {}+{}.{})",
            &self.block.to_hex()[..16],
            self.data,
            self.parity,
            self.index
        )
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

    #[test]
    fn storage_classes_parse_and_print() {
        for (text, class) in [
            ("EC:3+2", StorageClass::Erasure { data: 3, parity: 2 }),
            (
                "ec:16+8",
                StorageClass::Erasure {
                    data: 16,
                    parity: 8,
                },
            ),
            ("replicated", StorageClass::Replicated),
        ] {
            let c: StorageClass = text.parse().unwrap();
            assert_eq!(c, class);
            assert_eq!(c.to_string().parse::<StorageClass>().unwrap(), c);
        }
        for bad in [
            "EC:1+1", "EC:3+0", "EC:17+2", "EC:3+9", "EC:3", "EC:a+b", "RS:3+2", "", "EC:+2",
            "EC:300+2",
        ] {
            let e = bad.parse::<StorageClass>().unwrap_err();
            assert!(e.contains("EC:k+m"), "{bad}: {e}");
        }
        assert_eq!(StorageClass::Erasure { data: 3, parity: 2 }.shards(), 5);
    }

    #[test]
    fn shard_file_names_round_trip_and_nothing_else_parses() {
        let b = BlockHash::of(b"x");
        let id = ShardId {
            block: b,
            data: 3,
            parity: 2,
            index: 4,
        };
        assert_eq!(id.file_name(), "3+2.4");
        assert_eq!(ShardId::parse(b, "3+2.4"), Some(id));
        for bad in [
            "3+2.5",
            "3+2",
            "03+2.1",
            "3+2.01",
            "3+0.1",
            "x+2.1",
            "3+2.1.tmp",
            "",
            "+.",
            "3+2.-1",
        ] {
            assert_eq!(ShardId::parse(b, bad), None, "{bad}");
        }
    }
}
