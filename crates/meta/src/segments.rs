//! The Raft log's files: numbered records in preallocated segment files.
//!
//! A segment is a file `{first index:020}.seg` of `SEGMENT_BYTES` (larger only to fit
//! one oversized group), written full of zeros before it is used, so that appending a
//! record rewrites blocks the file system has already allocated: an `O_DSYNC` write
//! then costs one device flush and no journal commit for a changed file size (see
//! `cairn bench --limits`: in-place synchronous writes run ~2.5× faster than
//! appends here). A helper thread prepares the next segment (`spare`) while the
//! current one fills.
//!
//! A segment starts with a header (`magic | version | first index | seed | crc`),
//! then records `len: u32 | index: u64 | chain: u64 | payload` as in the command
//! log (`log.rs`): `chain` is the CRC-64/NVME of the previous record's chain (the
//! header's seed for the first record), `len`, `index` and the payload. Reading
//! stops at the first record that is torn, does not chain or does not follow its
//! predecessor's index. A segment's seed is the chain of the last record before it,
//! so a whole log checks from the first retained segment to the last record.
//!
//! Appends are durable on return. Truncation (Raft drops an uncommitted tail) moves
//! the write position back: the next record overwrites the first dropped one and
//! its chain no longer matches what follows, so the stale tail can never be read
//! back; segments wholly after the truncation point are deleted durably first.
//! Purging (after a snapshot) deletes whole segments whose records are all purged.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::log::{Chain, chain_of, next_record};

/// Largest size of a segment file. Large enough that creating one is rare (a 4 KiB-PUT
/// load fills one in seconds), small enough that zero-filling the next takes a
/// fraction of a second of disk time.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;
/// Size of the first segment: each next one doubles up to the largest, so a small
/// store keeps a small log.
const FIRST_SEGMENT_BYTES: u64 = 4 << 20;
const HEADER_LEN: u64 = 64;
const MAGIC: &[u8; 8] = b"CAIRNSEG";
/// Version of the segment format. A binary refuses a newer one.
pub(crate) const SEGMENT_VERSION: u32 = 1;
const RECORD_HEAD: usize = 4 + 8 + 8;
/// Larger lengths are taken as garbage.
pub(crate) const MAX_RECORD: usize = 256 << 20;
const SPARE: &str = "spare";

/// Where one record's payload is: readable by any thread with a positional read.
#[derive(Clone, Debug)]
pub(crate) struct Loc {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u32,
}

impl Loc {
    /// Reads the payload (blocking).
    pub fn read(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.len as usize];
        self.file.read_exact_at(&mut buf, self.offset)?;
        Ok(buf)
    }
}

struct Segment {
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    /// Offset after the last record.
    end: u64,
    /// Per record: offset of its head, payload length, chain after it.
    records: Vec<(u64, u32, Chain)>,
    seed: Chain,
}

impl Segment {
    fn last_chain(&self) -> Chain {
        self.records.last().map_or(self.seed, |r| r.2)
    }
    fn next_index(&self) -> u64 {
        self.first + self.records.len() as u64
    }
    fn loc(&self, i: usize) -> Loc {
        let (off, len, _) = self.records[i];
        Loc {
            file: self.file.clone(),
            offset: off + RECORD_HEAD as u64,
            len,
        }
    }
}

/// The log's files, owned by the log thread.
pub(crate) struct SegmentLog {
    dir: PathBuf,
    /// `SEGMENT_BYTES` but in tests.
    segment_bytes: u64,
    skip_sync: bool,
    segments: Vec<Segment>,
    /// Index the next record must have while the log is empty.
    empty_next: u64,
    spare: Option<std::thread::JoinHandle<io::Result<()>>>,
    buf: Vec<u8>,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.seg")
}

fn open_rw(path: &Path, skip_sync: bool) -> io::Result<File> {
    OpenOptions::new()
        .custom_flags(if skip_sync { 0 } else { libc::O_DSYNC })
        .read(true)
        .write(true)
        .open(path)
}

fn sync_dir(dir: &Path, skip_sync: bool) -> io::Result<()> {
    if skip_sync {
        return Ok(());
    }
    File::open(dir)?.sync_all()
}

fn with_path(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Writes a zero-filled file of `size` bytes at `path` (through a temporary name),
/// durably.
fn create_zeroed(dir: &Path, path: &Path, size: u64, skip_sync: bool) -> io::Result<()> {
    // A name of its own: two preparations never write the same file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.join(format!(
        "{}.{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("segment"),
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| with_path(&tmp, e))?;
    let filled = (|| {
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        if !skip_sync {
            f.sync_all()?;
        }
        Ok(())
    })();
    if let Err(e) = filled {
        // A full disk must not keep a half-made file.
        let _ = fs::remove_file(&tmp);
        return Err(with_path(&tmp, e));
    }
    fs::rename(&tmp, path).map_err(|e| with_path(path, e))?;
    sync_dir(dir, skip_sync)
}

fn header(first: u64, seed: &Chain) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&first.to_le_bytes());
    h[24..32].copy_from_slice(seed);
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, &h[..32]);
    h[32..40].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What a segment's header says, or why it is not one.
fn parse_header(h: &[u8; HEADER_LEN as usize]) -> Result<(u64, Chain), String> {
    if &h[..8] != MAGIC {
        return Err("not a log segment (bad magic)".into());
    }
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, &h[..32]);
    if h[32..40] != crc.to_le_bytes() {
        return Err("segment header checksum mismatch".into());
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version > SEGMENT_VERSION {
        return Err(format!(
            "segment format {version} is newer than this binary's ({SEGMENT_VERSION}): upgrade cairn"
        ));
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[16..24]);
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&h[24..32]);
    Ok((u64::from_le_bytes(first), seed))
}

/// What a reader of the log wants of each record as the log is opened (its index
/// and payload), so that opening reads every record once.
pub(crate) type OnRecord<'a> = &'a mut dyn FnMut(u64, &[u8]) -> io::Result<()>;

/// Reads a segment's records: from the header while they are whole, chain and
/// number consecutively.
fn scan_segment(path: &Path, skip_sync: bool, on_record: OnRecord<'_>) -> io::Result<Segment> {
    let file = open_rw(path, skip_sync).map_err(|e| with_path(path, e))?;
    let size = file.metadata()?.len();
    let mut h = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0)
        .map_err(|e| with_path(path, e))?;
    let (first, seed) = parse_header(&h).map_err(|m| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {m}", path.display()),
        )
    })?;
    let mut reader = io::BufReader::with_capacity(
        1 << 20,
        crate::log::AtReader {
            file: &file,
            pos: HEADER_LEN,
        }
        .take(size - HEADER_LEN),
    );
    let mut records = Vec::new();
    let (mut end, mut chain) = (HEADER_LEN, seed);
    let mut payload = Vec::new();
    loop {
        let want = Some(Some(first + records.len() as u64));
        let Some((index, c)) = next_record(&mut reader, want, &chain, MAX_RECORD, &mut payload)?
        else {
            break;
        };
        on_record(index, &payload)?;
        records.push((end, payload.len() as u32, c));
        chain = c;
        end += (RECORD_HEAD + payload.len()) as u64;
    }
    Ok(Segment {
        first,
        path: path.to_path_buf(),
        file: Arc::new(file),
        size,
        end,
        records,
        seed,
    })
}

impl Drop for SegmentLog {
    /// Waits for the next segment's preparation: a log opened again on the same
    /// directory in this process must not find a file still being written.
    fn drop(&mut self) {
        if let Some(h) = self.spare.take() {
            let _ = h.join();
        }
    }
}

impl SegmentLog {
    /// Opens the log in `dir` (created if missing) and reads every segment.
    /// Returns the log and the location of every record, from the first retained.
    /// A log whose segments do not follow each other is refused with the file named.
    /// Segments are `segment_bytes` long (`SEGMENT_BYTES` but in tests).
    /// `on_record` sees every record read, in order.
    pub(crate) fn open_sized(
        dir: &Path,
        skip_sync: bool,
        segment_bytes: u64,
        on_record: OnRecord<'_>,
    ) -> io::Result<(SegmentLog, u64, Vec<Loc>)> {
        fs::create_dir_all(dir).map_err(|e| with_path(dir, e))?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| with_path(dir, e))? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            if let Some(first) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u64>().ok())
            {
                names.push((first, entry.path()));
            }
        }
        names.sort();
        let mut segments: Vec<Segment> = Vec::new();
        for (named, path) in names {
            let seg = scan_segment(&path, skip_sync, &mut *on_record)?;
            let bad = |why: String| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {why}; the Raft log is damaged", path.display()),
                )
            };
            if seg.first != named {
                return Err(bad(format!("its header says it starts at {}", seg.first)));
            }
            if let Some(prev) = segments.last()
                && (seg.first != prev.next_index() || seg.seed != prev.last_chain())
            {
                return Err(bad(format!(
                    "it does not follow {} (which ends before index {})",
                    prev.path.display(),
                    prev.next_index()
                )));
            }
            segments.push(seg);
        }
        let first = segments.first().map_or(0, |s| s.first);
        let locs = segments
            .iter()
            .flat_map(|s| (0..s.records.len()).map(move |i| s.loc(i)))
            .collect();
        let empty_next = segments.last().map_or(0, |s| s.next_index());
        let log = SegmentLog {
            dir: dir.to_path_buf(),
            segment_bytes,
            skip_sync,
            segments,
            empty_next,
            spare: None,
            buf: Vec::new(),
        };
        Ok((log, first, locs))
    }

    /// Index of the next record.
    pub fn next_index(&self) -> u64 {
        self.segments
            .last()
            .map_or(self.empty_next, |s| s.next_index())
    }

    /// Size of the next segment: twice the last, within bounds.
    fn next_size(&self) -> u64 {
        let first = FIRST_SEGMENT_BYTES.min(self.segment_bytes);
        self.segments
            .last()
            .map_or(first, |s| s.size.saturating_mul(2))
            .clamp(first, self.segment_bytes)
    }

    /// Starts preparing the next segment on a helper thread.
    fn prepare_spare(&mut self) {
        let (dir, skip_sync, size) = (self.dir.clone(), self.skip_sync, self.next_size());
        self.spare = std::thread::Builder::new()
            .name("meta-log-prep".into())
            .spawn(move || create_zeroed(&dir, &dir.join(SPARE), size, skip_sync))
            .ok();
    }

    /// Appends `payloads` as records numbered from [`SegmentLog::next_index`] (or from
    /// `first` if the log holds no record: after a purge or truncation of all).
    /// Durable on return. On error nothing counts as written.
    pub fn append(&mut self, first: u64, payloads: &[&[u8]]) -> io::Result<Vec<Loc>> {
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        let has_records =
            self.segments.last().is_some_and(|s| !s.records.is_empty()) || self.segments.len() > 1;
        if has_records && first != self.next_index() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "log entry {first} appended where {} is next",
                    self.next_index()
                ),
            ));
        }
        if !has_records && first != self.next_index() {
            // An empty log may start anywhere: its (empty) segment is replaced.
            self.empty_next = first;
            if let Some(seg) = self.segments.pop() {
                self.remove_durably(&[seg.path])?;
            }
        }
        let bytes: u64 = payloads
            .iter()
            .map(|p| (RECORD_HEAD + p.len()) as u64)
            .sum();
        if let Some(p) = payloads.iter().find(|p| p.len() > MAX_RECORD) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("log entry of {} bytes exceeds the limit", p.len()),
            ));
        }
        let fits = self
            .segments
            .last()
            .is_some_and(|s| s.end + bytes <= s.size);
        if !fits {
            self.roll(bytes)?;
        }
        let Some(seg) = self.segments.last_mut() else {
            return Err(io::Error::other("no active log segment"));
        };
        self.buf.clear();
        let mut chain = seg.last_chain();
        let mut heads = Vec::with_capacity(payloads.len());
        let mut at = seg.end;
        for (index, p) in (seg.next_index()..).zip(payloads) {
            chain = chain_of(&chain, index, p);
            self.buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
            self.buf.extend_from_slice(&index.to_le_bytes());
            self.buf.extend_from_slice(&chain);
            self.buf.extend_from_slice(p);
            heads.push((at, p.len() as u32, chain));
            at += (RECORD_HEAD + p.len()) as u64;
        }
        // One write of the whole group; durable on return (O_DSYNC).
        seg.file
            .write_all_at(&self.buf, seg.end)
            .map_err(|e| with_path(&seg.path, e))?;
        let start = seg.records.len();
        seg.records.extend(heads);
        seg.end = at;
        if self.buf.capacity() > 8 << 20 {
            self.buf = Vec::new();
        }
        Ok((start..seg.records.len()).map(|i| seg.loc(i)).collect())
    }

    /// Starts a new segment able to hold `bytes` of records after its header.
    fn roll(&mut self, bytes: u64) -> io::Result<()> {
        let (first, seed) = match self.segments.last() {
            Some(s) => (s.next_index(), s.last_chain()),
            None => (self.empty_next, [0u8; 8]),
        };
        // An active segment without records is replaced, not followed.
        if self.segments.last().is_some_and(|s| s.records.is_empty())
            && let Some(seg) = self.segments.pop()
        {
            self.remove_durably(&[seg.path])?;
        }
        // After a truncation the segment may hold a stale tail that still chains:
        // end it with an empty record head before the log goes on elsewhere.
        if let Some(s) = self.segments.last()
            && s.end + RECORD_HEAD as u64 <= s.size
        {
            s.file
                .write_all_at(&[0u8; RECORD_HEAD], s.end)
                .map_err(|e| with_path(&s.path, e))?;
        }
        let path = self.dir.join(segment_name(first));
        let need = HEADER_LEN + bytes;
        let spare = self.dir.join(SPARE);
        if let Some(h) = self.spare.take() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "preparing the next log segment failed"),
                Err(_) => tracing::warn!("the log segment preparation thread panicked"),
            }
        }
        let spare_size = fs::metadata(&spare).map(|m| m.len()).unwrap_or(0);
        if spare_size >= need {
            fs::rename(&spare, &path).map_err(|e| with_path(&path, e))?;
        } else {
            let _ = fs::remove_file(&spare);
            create_zeroed(&self.dir, &path, need.max(self.next_size()), self.skip_sync)?;
        }
        let file = open_rw(&path, self.skip_sync).map_err(|e| with_path(&path, e))?;
        file.write_all_at(&header(first, &seed), 0)
            .map_err(|e| with_path(&path, e))?;
        // The new name must be durable before records in it are acknowledged.
        sync_dir(&self.dir, self.skip_sync).map_err(|e| with_path(&self.dir, e))?;
        let size = file.metadata()?.len();
        self.segments.push(Segment {
            first,
            path,
            file: Arc::new(file),
            size,
            end: HEADER_LEN,
            records: Vec::new(),
            seed,
        });
        if !spare.exists() {
            self.prepare_spare();
        }
        Ok(())
    }

    fn remove_durably(&self, paths: &[PathBuf]) -> io::Result<()> {
        for p in paths {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(with_path(p, e)),
            }
        }
        sync_dir(&self.dir, self.skip_sync).map_err(|e| with_path(&self.dir, e))
    }

    /// Drops the records from `index` on. Segments that start at or after it are
    /// deleted (durably) first; in the segment holding `index - 1` the write
    /// position moves back, so the next record overwrites the first dropped one.
    pub fn truncate(&mut self, index: u64) -> io::Result<()> {
        if index >= self.next_index() {
            return Ok(());
        }
        let mut doomed = Vec::new();
        while self.segments.last().is_some_and(|s| s.first >= index) {
            if let Some(s) = self.segments.pop() {
                doomed.push(s.path);
            }
        }
        if !doomed.is_empty() {
            self.remove_durably(&doomed)?;
        }
        match self.segments.last_mut() {
            Some(seg) => {
                let keep = (index - seg.first) as usize;
                if keep < seg.records.len() {
                    seg.end = seg.records[keep].0;
                    seg.records.truncate(keep);
                }
            }
            None => self.empty_next = index,
        }
        Ok(())
    }

    /// Forgets the records up to `index` (inclusive): whole segments holding only
    /// such records are deleted. Records of a partly purged segment stay on disk
    /// (the caller records how far the log is purged). The segment being written
    /// is kept; once it holds nothing retained, the next record may start anywhere.
    pub fn purge(&mut self, index: u64) -> io::Result<()> {
        let mut doomed = Vec::new();
        while self.segments.len() > 1 && self.segments[1].first <= index + 1 {
            doomed.push(self.segments.remove(0).path);
        }
        if self.next_index() <= index + 1 {
            // Everything is purged: the log is empty and continues at `index + 1`.
            for s in self.segments.drain(..) {
                doomed.push(s.path);
            }
            self.empty_next = index + 1;
        }
        if doomed.is_empty() {
            return Ok(());
        }
        self.remove_durably(&doomed)
    }
}

#[cfg(test)]
mod tests;
