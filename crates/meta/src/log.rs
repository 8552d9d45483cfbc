//! The command log of data directory format 2 (`meta.log`), read once to upgrade
//! such a directory (`store.rs::upgrade_command_log`); its record format and chain
//! are also those of the Raft log's segments (`segments.rs`).
//!
//! A record is `len: u32 LE | seq: u64 LE | chain: u64 LE | payload (len bytes)`,
//! where `chain` is the CRC-64/NVME of the previous record's chain (zero for the
//! first record of a cycle), `len`, `seq` and the payload (hardware-accelerated:
//! the log's own checksum costs next to nothing beside the write). Reading stops at the
//! first record that is incomplete, does not chain or does not follow its
//! predecessor's sequence number: a torn write, the stale tail of an older cycle or
//! a group whose write failed all end the log there. The writer (`CommandLog`) is
//! kept for tests, which make such logs.

use std::fs::File;
#[cfg(test)]
use std::fs::OpenOptions;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

const HEADER: usize = 4 + 8 + 8;
/// Larger lengths are taken as garbage (the largest command, a multipart completion
/// of 10 000 parts, is far smaller).
const MAX_PAYLOAD: usize = 64 << 20;

pub(crate) type Chain = [u8; 8];

/// One record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogRecord {
    pub seq: u64,
    pub payload: Vec<u8>,
}

#[cfg(test)]
pub(crate) struct CommandLog {
    file: File,
    /// Offset where the next record goes: the end of the current cycle.
    end: u64,
    /// Sequence number of the next record.
    next_seq: u64,
    /// Chain value of the last record of the current cycle.
    chain: Chain,
    buf: Vec<u8>,
}

pub(crate) fn chain_of(prev: &Chain, seq: u64, payload: &[u8]) -> Chain {
    let mut h = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
    h.update(prev);
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize().to_le_bytes()
}

/// Reads a file from offset 0 with positional reads (the file's cursor is shared
/// with every handle of it and never moved).
pub(crate) struct AtReader<'a> {
    pub file: &'a File,
    pub pos: u64,
}

impl Read for AtReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads the current cycle of the log at `path` up to the record numbered `until`
/// (for recovery while the log is being appended to: records up to `until` are
/// complete and durable, later ones may be in the middle of being written).
pub(crate) fn read_until(path: &Path, until: u64) -> io::Result<Vec<LogRecord>> {
    let file = File::open(path)?;
    let (mut records, ..) = scan(
        AtReader {
            file: &file,
            pos: 0,
        },
        u64::MAX,
    )?;
    // `scan` checks sequence numbers only between records: cut at `until`.
    records.retain(|r| r.seq <= until);
    Ok(records)
}

/// Reads the current cycle: records from offset 0 while they are whole and chain,
/// not beyond `limit` bytes. Returns them with the offset after the last and its chain.
pub(crate) fn scan(reader: impl Read, limit: u64) -> io::Result<(Vec<LogRecord>, u64, Chain)> {
    let mut r = BufReader::with_capacity(1 << 20, reader.take(limit));
    let mut out: Vec<LogRecord> = Vec::new();
    let (mut end, mut chain) = (0u64, [0u8; 8]);
    loop {
        let want = out.last().map(|p: &LogRecord| p.seq.checked_add(1));
        let mut payload = Vec::new();
        let Some((seq, c)) = next_record(&mut r, want, &chain, MAX_PAYLOAD, &mut payload)? else {
            break;
        };
        chain = c;
        end += (HEADER + payload.len()) as u64;
        out.push(LogRecord { seq, payload });
    }
    Ok((out, end, chain))
}

/// Reads the next record into `payload` if it is whole, no longer than `max`,
/// numbered `want` (when given; `Some(None)` matches nothing) and chains from `chain`.
/// Returns its number and chain, or `None` where the log ends.
pub(crate) fn next_record(
    r: &mut impl Read,
    want: Option<Option<u64>>,
    chain: &Chain,
    max: usize,
    payload: &mut Vec<u8>,
) -> io::Result<Option<(u64, Chain)>> {
    let mut head = [0u8; HEADER];
    if !read_full(r, &mut head)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&head[4..12]);
    let seq = u64::from_le_bytes(seq_bytes);
    if len > max || want.is_some_and(|w| w != Some(seq)) {
        return Ok(None);
    }
    payload.resize(len, 0);
    if !read_full(r, payload)? {
        return Ok(None);
    }
    let c = chain_of(chain, seq, payload);
    if c[..] != head[12..] {
        return Ok(None);
    }
    Ok(Some((seq, c)))
}

/// Fills `buf`; false if the input ended first.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
impl CommandLog {
    /// Opens (or creates) the log and reads its current cycle. The next record gets
    /// sequence number `after + 1` or follows the last record read, whichever is
    /// later. Blocking.
    pub fn open(path: &Path, after: u64, skip_sync: bool) -> io::Result<(Self, Vec<LogRecord>)> {
        use std::os::unix::fs::OpenOptionsExt;
        // O_DSYNC: each append is durable when its write returns, with one system
        // call instead of a write and an fdatasync (measurably faster here).
        let file = OpenOptions::new()
            .custom_flags(if skip_sync { 0 } else { libc::O_DSYNC })
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let (records, end, chain) = scan(
            AtReader {
                file: &file,
                pos: 0,
            },
            u64::MAX,
        )?;
        let next_seq = records
            .last()
            .map_or(0, |r| r.seq.saturating_add(1))
            .max(after.saturating_add(1));
        let mut log = CommandLog {
            file,
            end,
            next_seq,
            chain,
            buf: Vec::new(),
        };
        // Records that do not lead up to `next_seq` cannot be continued: start over.
        if records
            .last()
            .is_none_or(|r| r.seq.saturating_add(1) != next_seq)
        {
            log.new_cycle();
        }
        Ok((log, records))
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes in the current cycle.
    pub fn cycle_bytes(&self) -> u64 {
        self.end
    }

    /// Appends one record per payload and makes them durable. On error nothing
    /// counts as written: the next append goes to the same place.
    pub fn append<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> io::Result<u64> {
        self.buf.clear();
        let mut chain = self.chain;
        let first = self.next_seq;
        for (i, p) in payloads.iter().enumerate() {
            let p = p.as_ref();
            if p.len() > MAX_PAYLOAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "metadata command of {} bytes exceeds the log's limit",
                        p.len()
                    ),
                ));
            }
            let seq = first + i as u64;
            chain = chain_of(&chain, seq, p);
            self.buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
            self.buf.extend_from_slice(&seq.to_le_bytes());
            self.buf.extend_from_slice(&chain);
            self.buf.extend_from_slice(p);
        }
        // One write of the whole group; durable on return (O_DSYNC).
        self.file.write_all_at(&self.buf, self.end)?;
        self.end += self.buf.len() as u64;
        self.chain = chain;
        self.next_seq = first + payloads.len() as u64;
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
        Ok(first)
    }

    /// Starts a new cycle at offset 0. Only once every record so far is durable
    /// elsewhere (a checkpoint): the old records are overwritten from here on.
    pub fn new_cycle(&mut self) {
        self.end = 0;
        self.chain = [0u8; 8];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, after: u64) -> (CommandLog, Vec<LogRecord>) {
        CommandLog::open(&dir.join("log"), after, true).unwrap()
    }

    fn payloads(recs: &[LogRecord]) -> Vec<(u64, Vec<u8>)> {
        recs.iter().map(|r| (r.seq, r.payload.clone())).collect()
    }

    #[test]
    fn records_survive_reopen_in_order() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, recs) = open(d.path(), 0);
        assert!(recs.is_empty());
        assert_eq!(log.append(&[b"a".to_vec(), b"bb".to_vec()]).unwrap(), 1);
        assert_eq!(log.append(&[vec![7u8; 5000]]).unwrap(), 3);
        drop(log);
        let (log, recs) = open(d.path(), 0);
        assert_eq!(
            payloads(&recs),
            vec![
                (1, b"a".to_vec()),
                (2, b"bb".to_vec()),
                (3, vec![7u8; 5000])
            ]
        );
        assert_eq!(log.next_seq(), 4);
    }

    #[test]
    fn a_torn_tail_ends_the_log() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = open(d.path(), 0);
        log.append(&[b"one".to_vec(), b"two".to_vec()]).unwrap();
        let end = log.cycle_bytes();
        drop(log);
        let f = OpenOptions::new()
            .write(true)
            .open(d.path().join("log"))
            .unwrap();
        // Flip a byte of the second record's payload.
        f.write_all_at(b"X", end - 1).unwrap();
        drop(f);
        let (log, recs) = open(d.path(), 0);
        assert_eq!(payloads(&recs), vec![(1, b"one".to_vec())]);
        assert_eq!(log.next_seq(), 2);
        assert_eq!(log.cycle_bytes(), (HEADER + 3) as u64);
    }

    #[test]
    fn a_new_cycle_hides_the_old_tail() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = open(d.path(), 0);
        log.append(&[vec![1u8; 100], vec![2u8; 100], vec![3u8; 100]])
            .unwrap();
        log.new_cycle();
        // Same length as the first old record: the old second record sits right after.
        log.append(&[vec![4u8; 100]]).unwrap();
        drop(log);
        let (log, recs) = open(d.path(), 3);
        assert_eq!(payloads(&recs), vec![(4, vec![4u8; 100])]);
        assert_eq!(log.next_seq(), 5);
    }

    #[test]
    fn records_already_checkpointed_are_not_continued() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = open(d.path(), 0);
        log.append(&[b"x".to_vec()]).unwrap();
        drop(log);
        // The checkpoint says 10 commands are applied: the log restarts after them.
        let (mut log, recs) = open(d.path(), 10);
        assert_eq!(recs.len(), 1);
        assert_eq!(log.next_seq(), 11);
        assert_eq!(log.cycle_bytes(), 0);
        log.append(&[b"y".to_vec()]).unwrap();
        drop(log);
        let (_, recs) = open(d.path(), 10);
        assert_eq!(payloads(&recs), vec![(11, b"y".to_vec())]);
    }

    #[test]
    fn read_until_stops_at_the_given_record() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = open(d.path(), 0);
        log.append(&[b"a".to_vec(), b"b".to_vec(), b"c".to_vec()])
            .unwrap();
        let recs = read_until(&d.path().join("log"), 2).unwrap();
        assert_eq!(
            payloads(&recs),
            vec![(1, b"a".to_vec()), (2, b"b".to_vec())]
        );
    }

    proptest::proptest! {
        #[test]
        fn scanning_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            let _ = scan(&bytes[..], u64::MAX).unwrap();
        }

        #[test]
        fn a_cut_log_reads_back_a_prefix(
            sizes in proptest::collection::vec(0usize..300, 1..20),
            cut in 0usize..8000,
        ) {
            let d = tempfile::tempdir().unwrap();
            let (mut log, _) = open(d.path(), 0);
            let all: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| vec![i as u8; n]).collect();
            for p in &all {
                log.append(std::slice::from_ref(p)).unwrap();
            }
            let bytes = std::fs::read(d.path().join("log")).unwrap();
            let cut = cut.min(bytes.len());
            let (recs, end, _) = scan(&bytes[..cut], u64::MAX).unwrap();
            proptest::prop_assert!(end as usize <= cut);
            for (i, r) in recs.iter().enumerate() {
                proptest::prop_assert_eq!(r.seq, i as u64 + 1);
                proptest::prop_assert_eq!(&r.payload, &all[i]);
            }
            if cut == bytes.len() {
                proptest::prop_assert_eq!(recs.len(), all.len());
            }
        }
    }
}
