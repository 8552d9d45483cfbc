//! The local block store: content-addressed, checksummed, fsynced block files.
//!
//! A block is stored once under its BLAKE3 address in
//! `<root>/blocks/<first two hex digits>/<64 hex digits>`. A write goes to a temp file
//! in `<root>/tmp`, is fsynced, renamed into place, and the fan-out directory is
//! fsynced: once [`BlockStore::put`] returns, the block survives a power cut. Every read
//! re-hashes the bytes and refuses a block whose hash does not match its name, so no
//! byte of a corrupt block is ever handed out.
//!
//! An erasure-coded block is kept as shards instead (`<hex>.s/<k>+<m>.<i>` next
//! to where its whole copy would be), each file carrying its payload's BLAKE3 in
//! its header; pins, garbage collection and the sweep treat a block's shards with
//! the block.
//!
//! Everything here is blocking file I/O: async callers run it on `spawn_blocking`.
//!
//! Garbage collection coordinates with writers through pins: a writer pins the
//! blocks of an object before it writes (or finds) them and keeps the pin until the
//! object's manifest is committed; [`BlockStore::delete_unless`] never removes a pinned
//! block (see `DESIGN.md`, "never while a manifest that names them may still commit").

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cairn_types::{BlockHash, ShardId};

/// File header: magic, format version, reserved, payload length.
const MAGIC: &[u8; 4] = b"CRNB";
/// Version of the block file format written by this binary.
pub const BLOCK_FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 16;
/// A shard file's header: magic, format version, reserved, payload length, the
/// payload's BLAKE3 (a shard is named by its block and place, not by its bytes),
/// then the length of the whole block (what decoding trims the padding to).
const SHARD_MAGIC: &[u8; 4] = b"CRNS";
pub const SHARD_FORMAT_VERSION: u8 = 1;
const SHARD_HEADER_LEN: usize = 56;
/// Suffix of the directory holding a block's shards, next to where its whole copy
/// would be: `<root>/blocks/ab/<hex>.s/<k>+<m>.<i>`.
const SHARD_DIR_SUFFIX: &str = ".s";
/// Largest block a header may claim (the largest configurable block size).
const MAX_BLOCK_LEN: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("block {0} not found")]
    NotFound(BlockHash),
    #[error("block {hash} at {path} is corrupt: {reason}")]
    Corrupt {
        hash: BlockHash,
        path: PathBuf,
        reason: String,
    },
    #[error("no space left on device while writing {path}")]
    NoSpace { path: PathBuf },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl BlockError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        if is_no_space(&source) {
            return BlockError::NoSpace {
                path: path.to_path_buf(),
            };
        }
        BlockError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || e.raw_os_error() == Some(28)
}

pub type Result<T> = std::result::Result<T, BlockError>;

/// Counts of in-flight writers per block; see the module docs.
type Pins = HashMap<BlockHash, usize>;

#[derive(Clone)]
pub struct BlockStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    blocks: PathBuf,
    tmp: PathBuf,
    pins: Mutex<Pins>,
}

/// Keeps its blocks safe from garbage collection until dropped.
pub struct PinGuard {
    store: BlockStore,
    hashes: Vec<BlockHash>,
}

impl PinGuard {
    /// Adds one more block to this guard (pinned at once).
    pub fn add(&mut self, hash: BlockHash) {
        let mut pins = self.store.lock_pins();
        *pins.entry(hash).or_insert(0) += 1;
        self.hashes.push(hash);
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut pins = self.store.lock_pins();
        for h in &self.hashes {
            if let Some(n) = pins.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(h);
                }
            }
        }
    }
}

impl BlockStore {
    /// Opens (creating if needed) the store under `root`, and removes temp files left
    /// by a previous run: they belong to writes that were never acknowledged.
    pub fn open(root: &Path) -> Result<Self> {
        let blocks = root.join("blocks");
        let tmp = root.join("tmp");
        for d in [root, &blocks, &tmp] {
            fs::create_dir_all(d).map_err(|e| BlockError::io("create dir", d, e))?;
        }
        for i in 0..=255u8 {
            let d = blocks.join(format!("{i:02x}"));
            fs::create_dir_all(&d).map_err(|e| BlockError::io("create dir", &d, e))?;
        }
        sync_dir(&blocks)?;
        sync_dir(root)?;
        let store = BlockStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                blocks,
                tmp,
                pins: Mutex::new(HashMap::new()),
            }),
        };
        let removed = store.clean_tmp()?;
        if removed > 0 {
            tracing::info!(removed, "removed leftover temp files from an earlier run");
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn lock_pins(&self) -> std::sync::MutexGuard<'_, Pins> {
        // A panic while holding this lock cannot leave the map inconsistent (each
        // critical section is a single insert/remove), so a poisoned lock is usable.
        self.inner.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An empty pin guard; blocks are added with [`PinGuard::add`].
    pub fn pin(&self) -> PinGuard {
        PinGuard {
            store: self.clone(),
            hashes: Vec::new(),
        }
    }

    pub fn path_of(&self, hash: &BlockHash) -> PathBuf {
        let hex = hash.to_hex();
        self.inner.blocks.join(&hex[..2]).join(hex)
    }

    /// Removes every file in the temp directory. Returns how many were removed.
    pub fn clean_tmp(&self) -> Result<usize> {
        let tmp = &self.inner.tmp;
        let mut n = 0;
        let rd = fs::read_dir(tmp).map_err(|e| BlockError::io("read dir", tmp, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| BlockError::io("read dir", tmp, e))?;
            let p = entry.path();
            fs::remove_file(&p).map_err(|e| BlockError::io("remove", &p, e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Whether a block file with this address is present (its content is not checked).
    pub fn contains(&self, hash: &BlockHash) -> bool {
        self.path_of(hash).exists()
    }

    /// Stores `data` under `hash` (which the caller computed as `BlockHash::of(data)`
    /// in its single pass over the bytes) and returns once it is durable. A block that
    /// is already present is not written again.
    ///
    /// The caller must hold a pin on `hash` (see the module docs).
    pub fn put(&self, hash: &BlockHash, data: &[u8]) -> Result<()> {
        debug_assert_eq!(&BlockHash::of(data), hash);
        let dest = self.path_of(hash);
        if dest.exists() {
            return Ok(());
        }
        let tmp = self
            .inner
            .tmp
            .join(format!("{}.{:016x}", hash.to_hex(), rand::random::<u64>()));
        let res = write_block_file(&tmp, data)
            .and_then(|()| fs::rename(&tmp, &dest).map_err(|e| BlockError::io("rename", &dest, e)));
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let dir = dest.parent().unwrap_or(&self.inner.blocks);
        sync_dir(dir)
    }

    /// Reads a whole block and verifies it against its address.
    pub fn get(&self, hash: &BlockHash) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        self.get_into(hash, &mut data)?;
        Ok(data)
    }

    /// Reads a whole block into `data` (replacing its contents; a buffer with room for
    /// the block is not reallocated) and verifies it against its address.
    pub fn get_into(&self, hash: &BlockHash, data: &mut Vec<u8>) -> Result<()> {
        let path = self.path_of(hash);
        read_checked(&path, *hash, false, data)?;
        if BlockHash::of(data) != *hash {
            return Err(BlockError::Corrupt {
                hash: *hash,
                path,
                reason: "BLAKE3 mismatch".into(),
            });
        }
        Ok(())
    }

    /// The directory of a block's shards.
    fn shard_dir(&self, block: &BlockHash) -> PathBuf {
        let hex = block.to_hex();
        self.inner
            .blocks
            .join(&hex[..2])
            .join(format!("{hex}{SHARD_DIR_SUFFIX}"))
    }

    pub fn shard_path(&self, id: &ShardId) -> PathBuf {
        self.shard_dir(&id.block).join(id.file_name())
    }

    /// Whether this shard's file is present (its content is not checked).
    pub fn has_shard(&self, id: &ShardId) -> bool {
        self.shard_path(id).exists()
    }

    /// Stores one shard and returns once it is durable; a shard already present is
    /// not written again. The caller must hold a pin on the shard's block.
    pub fn put_shard(&self, id: &ShardId, block_len: u64, data: &[u8]) -> Result<()> {
        let dest = self.shard_path(id);
        if dest.exists() {
            return Ok(());
        }
        let dir = self.shard_dir(&id.block);
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(|e| BlockError::io("create dir", &dir, e))?;
            sync_dir(dir.parent().unwrap_or(&self.inner.blocks))?;
        }
        let tmp = self.inner.tmp.join(format!(
            "{}.{}.{:016x}",
            id.block.to_hex(),
            id.file_name(),
            rand::random::<u64>()
        ));
        let mut header = [0u8; SHARD_HEADER_LEN];
        header[..4].copy_from_slice(SHARD_MAGIC);
        header[4] = SHARD_FORMAT_VERSION;
        header[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        header[16..48].copy_from_slice(blake3::hash(data).as_bytes());
        header[48..56].copy_from_slice(&block_len.to_le_bytes());
        let res = write_file(&tmp, &header, data)
            .and_then(|()| fs::rename(&tmp, &dest).map_err(|e| BlockError::io("rename", &dest, e)));
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(&dir)
    }

    /// Reads one shard into `data` and checks it against the BLAKE3 in its header;
    /// returns the length of the whole block.
    pub fn get_shard_into(&self, id: &ShardId, data: &mut Vec<u8>) -> Result<u64> {
        let path = self.shard_path(id);
        let header = read_checked(&path, id.block, true, data)?;
        if blake3::hash(data).as_bytes()[..] != header[16..48] {
            return Err(BlockError::Corrupt {
                hash: id.block,
                path,
                reason: format!("shard {} fails its BLAKE3", id.file_name()),
            });
        }
        let block_len = u64::from_le_bytes(header[48..56].try_into().unwrap_or([0; 8]));
        if block_len > MAX_BLOCK_LEN {
            return Err(BlockError::Corrupt {
                hash: id.block,
                path,
                reason: format!("shard header claims a block of {block_len} bytes"),
            });
        }
        Ok(block_len)
    }

    /// The shards of `block` on this node.
    pub fn shards_of(&self, block: &BlockHash) -> Result<Vec<ShardId>> {
        let dir = self.shard_dir(block);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(BlockError::io("read dir", &dir, e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| BlockError::io("read dir", &dir, e))?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| ShardId::parse(*block, n))
            {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Moves a shard that failed its check into the quarantine (see
    /// [`BlockStore::quarantine`]).
    pub fn quarantine_shard(&self, id: &ShardId) -> Result<Option<PathBuf>> {
        let name = format!("{}.{}", id.block.to_hex(), id.file_name());
        self.quarantine_file(&self.shard_path(id), &name)
    }

    /// Removes this node's copy of a shard that its placement node is known to
    /// hold (see [`BlockStore::remove_surplus_copy`]).
    pub fn remove_surplus_shard(&self, id: &ShardId) -> Result<bool> {
        let path = self.shard_path(id);
        let removed = match fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(BlockError::io("remove", &path, e)),
        };
        // Left empty: removed (another shard written meanwhile keeps it).
        let _ = fs::remove_dir(self.shard_dir(&id.block));
        Ok(removed)
    }

    /// The shards on disk whose block address starts with the byte `group`.
    pub fn list_shards_group(&self, group: u8) -> Result<Vec<ShardId>> {
        let mut out = Vec::new();
        let d = self.inner.blocks.join(format!("{group:02x}"));
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(BlockError::io("read dir", &d, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| BlockError::io("read dir", &d, e))?;
            let block = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(SHARD_DIR_SUFFIX))
                .and_then(BlockHash::from_hex);
            if let Some(b) = block {
                out.extend(self.shards_of(&b)?);
            }
        }
        Ok(out)
    }

    /// Every shard on disk.
    pub fn list_shards(&self) -> Result<Vec<ShardId>> {
        let mut out = Vec::new();
        for i in 0..=255u8 {
            out.extend(self.list_shards_group(i)?);
        }
        Ok(out)
    }

    /// Deletes the block unless it is pinned or `still_needed` says it is referenced.
    /// Both are checked under the pin lock, so a writer that pins the block afterwards
    /// finds it missing and writes it again. Returns whether the file was removed.
    pub fn delete_unless(
        &self,
        hash: &BlockHash,
        still_needed: impl FnOnce() -> bool,
    ) -> Result<bool> {
        let pins = self.lock_pins();
        if pins.contains_key(hash) || still_needed() {
            return Ok(false);
        }
        let path = self.path_of(hash);
        let mut removed = match fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(BlockError::io("remove", &path, e)),
        };
        let dir = self.shard_dir(hash);
        match fs::remove_dir_all(&dir) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(BlockError::io("remove", &dir, e)),
        }
        drop(pins);
        Ok(removed)
    }

    /// Removes this node's copy of a block whatever pins it: only for a copy that
    /// every node placement names for the block is known to hold (the block stays
    /// available, so a writer's pin, which guards against its loss, is not needed
    /// here). Returns whether a file was removed.
    pub fn remove_surplus_copy(&self, hash: &BlockHash) -> Result<bool> {
        let path = self.path_of(hash);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(BlockError::io("remove", &path, e)),
        }
    }

    /// Moves this node's copy of a block that failed its check out of the store,
    /// into `<root>/quarantine/` (kept for a look, never read again), so that a good
    /// copy can be written in its place. Returns where it went, or `None` when there
    /// was no file.
    pub fn quarantine(&self, hash: &BlockHash) -> Result<Option<PathBuf>> {
        self.quarantine_file(&self.path_of(hash), &hash.to_hex())
    }

    fn quarantine_file(&self, path: &Path, name: &str) -> Result<Option<PathBuf>> {
        let dir = self.inner.root.join("quarantine");
        fs::create_dir_all(&dir).map_err(|e| BlockError::io("create", &dir, e))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let dest = dir.join(format!("{name}.{stamp}"));
        match fs::rename(path, &dest) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BlockError::io("rename", path, e)),
        }
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        sync_dir(&dir)?;
        Ok(Some(dest))
    }

    /// Every block address present on disk (for scrub and orphan sweeps).
    pub fn list(&self) -> Result<Vec<BlockHash>> {
        let mut out = Vec::new();
        for i in 0..=255u8 {
            out.extend(self.list_group(i)?);
        }
        Ok(out)
    }

    /// The block addresses on disk that start with the byte `group` (one of 256
    /// fan-out directories: a walk over all blocks in bounded memory).
    pub fn list_group(&self, group: u8) -> Result<Vec<BlockHash>> {
        let mut out = Vec::new();
        let d = self.inner.blocks.join(format!("{group:02x}"));
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(BlockError::io("read dir", &d, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| BlockError::io("read dir", &d, e))?;
            if let Some(h) = entry.file_name().to_str().and_then(BlockHash::from_hex) {
                out.push(h);
            }
        }
        Ok(out)
    }
}

fn write_block_file(path: &Path, data: &[u8]) -> Result<()> {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4] = BLOCK_FORMAT_VERSION;
    header[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
    write_file(path, &header, data)
}

/// Writes a new file of `header` and `data` and fsyncs it.
fn write_file(path: &Path, header: &[u8], data: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| BlockError::io("create", path, e))?;
    f.write_all(header)
        .and_then(|()| f.write_all(data))
        .map_err(|e| BlockError::io("write", path, e))?;
    if unsafe_test_skip_fsync("block") {
        return Ok(());
    }
    f.sync_all().map_err(|e| BlockError::io("fsync", path, e))
}

/// Reads a block file (or, `shard`, a shard file) into `data`: checks its magic,
/// version and length, not its hash. Returns the header (its first 16 bytes for a
/// block, 56 for a shard).
fn read_checked(
    path: &Path,
    hash: BlockHash,
    shard: bool,
    data: &mut Vec<u8>,
) -> Result<[u8; SHARD_HEADER_LEN]> {
    data.clear();
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(BlockError::NotFound(hash));
        }
        Err(e) => return Err(BlockError::io("open", path, e)),
    };
    let corrupt = |reason: String| BlockError::Corrupt {
        hash,
        path: path.to_path_buf(),
        reason,
    };
    let (magic, version, header_len) = match shard {
        false => (MAGIC, BLOCK_FORMAT_VERSION, HEADER_LEN),
        true => (SHARD_MAGIC, SHARD_FORMAT_VERSION, SHARD_HEADER_LEN),
    };
    let mut header = [0u8; SHARD_HEADER_LEN];
    if let Err(e) = f.read_exact(&mut header[..header_len]) {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return Err(corrupt("file shorter than its header".into()));
        }
        return Err(BlockError::io("read", path, e));
    }
    if &header[..4] != magic {
        return Err(corrupt("bad magic".into()));
    }
    if header[4] > version {
        return Err(corrupt(format!(
            "format version {} is newer than this binary knows ({version})",
            header[4]
        )));
    }
    let len = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
    if len > MAX_BLOCK_LEN {
        return Err(corrupt(format!("header claims {len} bytes")));
    }
    data.reserve_exact(len as usize);
    (&mut f)
        .take(len)
        .read_to_end(data)
        .map_err(|e| BlockError::io("read", path, e))?;
    let mut extra = [0u8; 1];
    let longer = f
        .read(&mut extra)
        .map_err(|e| BlockError::io("read", path, e))?
        > 0;
    if data.len() as u64 != len || longer {
        return Err(corrupt(format!(
            "length {}{} differs from header {len}",
            data.len(),
            if longer { "+" } else { "" }
        )));
    }
    Ok(header)
}

/// fsyncs a directory so that a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| BlockError::io("open dir", dir, e))?;
    if unsafe_test_skip_fsync("dir") {
        return Ok(());
    }
    f.sync_all()
        .map_err(|e| BlockError::io("fsync dir", dir, e))
}

/// Test hook for the power-cut test: `CAIRN_UNSAFE_TEST_SKIP_FSYNC` names fsyncs to
/// leave out (`block`, `dir`, `meta`), so that the test can show it would catch each
/// one missing. Never set it outside that test: it breaks durability.
pub fn unsafe_test_skip_fsync(what: &str) -> bool {
    static SKIP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let skip =
        SKIP.get_or_init(|| std::env::var("CAIRN_UNSAFE_TEST_SKIP_FSYNC").unwrap_or_default());
    !skip.is_empty() && skip.split(',').any(|s| s == what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, BlockStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = BlockStore::open(dir.path()).unwrap();
        (dir, s)
    }

    #[test]
    fn put_get_round_trip_and_dedup() {
        let (_d, s) = store();
        let data = vec![7u8; 100_000];
        let h = BlockHash::of(&data);
        s.put(&h, &data).unwrap();
        s.put(&h, &data).unwrap();
        assert_eq!(s.get(&h).unwrap(), data);
        assert_eq!(s.list().unwrap(), vec![h]);
    }

    #[test]
    fn flipped_byte_is_refused() {
        let (_d, s) = store();
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let h = BlockHash::of(&data);
        s.put(&h, &data).unwrap();
        let p = s.path_of(&h);
        let mut raw = fs::read(&p).unwrap();
        raw[HEADER_LEN + 1234] ^= 0x01;
        fs::write(&p, raw).unwrap();
        assert!(matches!(s.get(&h), Err(BlockError::Corrupt { .. })));
    }

    #[test]
    fn truncated_and_extended_files_are_refused() {
        let (_d, s) = store();
        let data = vec![1u8; 1000];
        let h = BlockHash::of(&data);
        s.put(&h, &data).unwrap();
        let p = s.path_of(&h);
        let raw = fs::read(&p).unwrap();
        fs::write(&p, &raw[..raw.len() - 1]).unwrap();
        assert!(matches!(s.get(&h), Err(BlockError::Corrupt { .. })));
        let mut longer = raw.clone();
        longer.push(0);
        fs::write(&p, &longer).unwrap();
        assert!(matches!(s.get(&h), Err(BlockError::Corrupt { .. })));
        fs::write(&p, &raw[..3]).unwrap();
        assert!(matches!(s.get(&h), Err(BlockError::Corrupt { .. })));
    }

    #[test]
    fn missing_block_is_not_found() {
        let (_d, s) = store();
        assert!(matches!(
            s.get(&BlockHash::of(b"x")),
            Err(BlockError::NotFound(_))
        ));
    }

    #[test]
    fn leftover_temp_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let _s = BlockStore::open(dir.path()).unwrap();
        }
        fs::write(dir.path().join("tmp").join("abc.123"), b"partial").unwrap();
        let _s = BlockStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn pinned_blocks_are_not_deleted() {
        let (_d, s) = store();
        let data = b"pinned".to_vec();
        let h = BlockHash::of(&data);
        let mut pin = s.pin();
        pin.add(h);
        s.put(&h, &data).unwrap();
        assert!(!s.delete_unless(&h, || false).unwrap());
        assert!(s.contains(&h));
        drop(pin);
        assert!(!s.delete_unless(&h, || true).unwrap());
        assert!(s.delete_unless(&h, || false).unwrap());
        assert!(!s.contains(&h));
    }

    #[test]
    fn a_quarantined_copy_makes_way_for_a_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlockStore::open(dir.path()).unwrap();
        let data = b"the bytes of a block".to_vec();
        let h = BlockHash::of(&data);
        s.put(&h, &data).unwrap();
        let path = s.path_of(&h);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(s.get(&h), Err(BlockError::Corrupt { .. })));
        // put sees a file there and writes nothing: the bad copy must go first.
        s.put(&h, &data).unwrap();
        assert!(matches!(s.get(&h), Err(BlockError::Corrupt { .. })));
        let moved = s.quarantine(&h).unwrap().unwrap();
        assert!(moved.starts_with(dir.path().join("quarantine")));
        assert_eq!(std::fs::read(&moved).unwrap(), bytes);
        assert!(!s.contains(&h));
        assert_eq!(s.quarantine(&h).unwrap(), None);
        s.put(&h, &data).unwrap();
        assert_eq!(s.get(&h).unwrap(), data);
        // The quarantine is not part of the store: listing shows the good copy once.
        assert_eq!(s.list().unwrap(), vec![h]);
    }

    #[test]
    fn shards_are_stored_checked_listed_and_collected_with_their_block() {
        let (_d, s) = store();
        let block = BlockHash::of(b"the whole block");
        let id = |index| ShardId {
            block,
            data: 3,
            parity: 2,
            index,
        };
        let mut pin = s.pin();
        pin.add(block);
        s.put_shard(&id(1), 9, b"shard one").unwrap();
        s.put_shard(&id(4), 9, b"shard four").unwrap();
        // Written again: kept as it is.
        s.put_shard(&id(1), 9, b"something else").unwrap();
        let mut buf = Vec::new();
        assert_eq!(s.get_shard_into(&id(1), &mut buf).unwrap(), 9);
        assert_eq!(buf, b"shard one");
        assert!(matches!(
            s.get_shard_into(&id(0), &mut buf),
            Err(BlockError::NotFound(_))
        ));
        assert_eq!(s.shards_of(&block).unwrap(), vec![id(1), id(4)]);
        assert_eq!(s.list_shards().unwrap(), vec![id(1), id(4)]);
        assert!(s.list().unwrap().is_empty(), "shards are not whole blocks");
        // A flipped byte fails the check; quarantined, it makes way for a good one.
        let path = s.shard_path(&id(4));
        let mut raw = std::fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        std::fs::write(&path, raw).unwrap();
        let e = s.get_shard_into(&id(4), &mut buf).unwrap_err();
        assert!(matches!(e, BlockError::Corrupt { .. }), "{e}");
        assert!(s.quarantine_shard(&id(4)).unwrap().is_some());
        s.put_shard(&id(4), 9, b"shard four").unwrap();
        s.get_shard_into(&id(4), &mut buf).unwrap();
        assert_eq!(buf, b"shard four");
        // A header claiming another length is refused.
        let mut raw = std::fs::read(&path).unwrap();
        raw.truncate(raw.len() - 2);
        std::fs::write(&path, raw).unwrap();
        assert!(s.get_shard_into(&id(4), &mut buf).is_err());
        // Collected with the block (once unpinned).
        assert!(!s.delete_unless(&block, || false).unwrap());
        drop(pin);
        assert!(s.delete_unless(&block, || false).unwrap());
        assert!(s.list_shards().unwrap().is_empty());
        assert!(!s.has_shard(&id(1)));
    }

    #[test]
    fn a_surplus_shard_is_removed_with_its_empty_directory() {
        let (_d, s) = store();
        let block = BlockHash::of(b"b");
        let id = ShardId {
            block,
            data: 2,
            parity: 1,
            index: 2,
        };
        s.put_shard(&id, 1, b"xx").unwrap();
        assert!(s.remove_surplus_shard(&id).unwrap());
        assert!(!s.remove_surplus_shard(&id).unwrap());
        assert!(!s.shard_dir(&block).exists());
    }
}
