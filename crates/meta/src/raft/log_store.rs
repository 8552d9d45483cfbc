//! The Raft log store: openraft's `RaftLogStorage` on the segment files
//! (`segments.rs`), with the vote and the purge point in a small state file.
//!
//! One thread (`meta-log`) does every write, in the order openraft asked for them
//! (appends, truncations, purges, votes: openraft requires them serialized). It
//! takes all appends waiting at that moment and writes them with one synchronous
//! write (group commit), then tells openraft they are durable. Entries are readable
//! as soon as `append` returns: the newest are kept in memory (bounded by
//! `MEMORY_BUDGET`), older ones are read back from their segment on a blocking
//! thread.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::{Entry, NodeId, TypeConfig};
use crate::segments::{Loc, SegmentLog};

/// Version of the encoding of entries in the log and of the state file.
pub const ENTRY_VERSION: u8 = 1;
/// Bytes of written entries kept in memory for readers (replication to followers
/// reads the newest entries).
const MEMORY_BUDGET: usize = 32 << 20;
/// Entries one write takes at most (each entry holds a batch of commands).
const MAX_GROUP_ENTRIES: usize = 1024;
/// Pending write requests. Beyond, `append` waits (backpressure).
const QUEUE_DEPTH: usize = 1024;
const STATE_FILE: &str = "state";
/// After a full disk stops an append, it is tried again this often.
const FULL_DISK_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

type SResult<T> = Result<T, StorageError<NodeId>>;

fn io_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::error(e.to_string())).into()
}

fn read_err(e: impl ToString) -> StorageError<NodeId> {
    StorageIOError::read_logs(AnyError::error(e.to_string())).into()
}

/// Encodes an entry as stored: a version byte, then postcard.
pub(crate) fn encode_entry(e: &Entry) -> io::Result<Vec<u8>> {
    let mut out = vec![ENTRY_VERSION];
    postcard::to_io(e, &mut out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(out)
}

pub(crate) fn decode_entry(bytes: &[u8]) -> io::Result<Entry> {
    match bytes.split_first() {
        Some((&ENTRY_VERSION, rest)) => postcard::from_bytes(rest)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad log entry: {e}"))),
        Some((v, _)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("log entry format {v} is not one this binary knows ({ENTRY_VERSION})"),
        )),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "empty log entry",
        )),
    }
}

/// The log id of an encoded entry, decoding nothing else (it is the entry's
/// first field).
fn decode_log_id(bytes: &[u8]) -> io::Result<LogId<NodeId>> {
    match bytes.split_first() {
        Some((&ENTRY_VERSION, rest)) => postcard::take_from_bytes::<LogId<NodeId>>(rest)
            .map(|(id, _)| id)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad log entry: {e}"))),
        _ => decode_entry(bytes).map(|e| e.log_id),
    }
}

/// What survives restarts besides the entries.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct StateFile {
    vote: Option<Vote<NodeId>>,
    purged: Option<LogId<NodeId>>,
}

fn read_state(dir: &Path) -> io::Result<StateFile> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match bytes.split_first() {
            Some((&ENTRY_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: unknown format", path.display()),
            )),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(e) => Err(e),
    }
}

/// Replaces the state file durably (temporary file, fsync, rename, directory fsync).
fn write_state(dir: &Path, st: &StateFile, skip_sync: bool) -> io::Result<()> {
    use std::io::Write;
    let mut bytes = vec![ENTRY_VERSION];
    postcard::to_io(st, &mut bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let tmp = dir.join("state.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    if !skip_sync {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(STATE_FILE))?;
    if !skip_sync {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// One retained entry as readers see it.
struct Slot {
    log_id: LogId<NodeId>,
    /// In memory: until written, and while within the memory budget after.
    entry: Option<Arc<Entry>>,
    /// On disk, once written.
    loc: Option<Loc>,
    bytes: usize,
}

/// The log as readers see it.
struct View {
    vote: Option<Vote<NodeId>>,
    purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
    /// Index of `slots[0]`.
    first: u64,
    slots: VecDeque<Slot>,
    /// Bytes of written entries held in memory, and the first slot that may hold one.
    mem_bytes: usize,
    mem_from: u64,
}

impl View {
    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        self.slots.back().map(|s| s.log_id).or(self.purged)
    }

    fn next_index(&self) -> u64 {
        self.first + self.slots.len() as u64
    }

    fn slot_mut(&mut self, index: u64) -> Option<&mut Slot> {
        let i = index.checked_sub(self.first)?;
        self.slots.get_mut(i as usize)
    }

    /// Drops in-memory copies of written entries, oldest first, beyond the budget.
    fn trim(&mut self) {
        while self.mem_bytes > MEMORY_BUDGET && self.mem_from < self.next_index() {
            let idx = self.mem_from;
            if let Some(s) = self.slot_mut(idx) {
                if s.loc.is_none() {
                    break; // not written yet: must stay
                }
                if s.entry.take().is_some() {
                    let b = s.bytes;
                    self.mem_bytes -= b;
                }
            }
            self.mem_from += 1;
        }
    }
}

struct Shared {
    view: Mutex<View>,
}

impl Shared {
    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Job {
    Append {
        entries: Vec<Arc<Entry>>,
        callback: LogFlushed<TypeConfig>,
    },
    Truncate(u64, oneshot::Sender<io::Result<()>>),
    Purge(LogId<NodeId>, oneshot::Sender<io::Result<()>>),
    SaveVote(Vote<NodeId>, oneshot::Sender<io::Result<()>>),
}

/// openraft's log store. Cloning shares the same log.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
}

/// Reads entries for replication and recovery.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir` and starts its writer thread. Blocking.
    pub fn open(dir: &Path, skip_sync: bool) -> io::Result<LogStore> {
        Self::open_sized(dir, skip_sync, crate::segments::SEGMENT_BYTES)
    }

    pub(crate) fn open_sized(
        dir: &Path,
        skip_sync: bool,
        segment_bytes: u64,
    ) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let state = read_state(dir)?;
        let purged_next = state.purged.map_or(0, |p| p.index + 1);
        // Each record's log id, read as the segments are scanned (the record was
        // just read to check its chain): only the entry's first field is decoded.
        let mut ids: Vec<LogId<NodeId>> = Vec::new();
        let mut on_record = |index: u64, payload: &[u8]| -> io::Result<()> {
            if index < purged_next {
                return Ok(());
            }
            let id = decode_log_id(payload)?;
            if id.index != index {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("log record {index} holds entry {id}"),
                ));
            }
            ids.push(id);
            Ok(())
        };
        let (segments, first, locs) =
            SegmentLog::open_sized(&dir.join("log"), skip_sync, segment_bytes, &mut on_record)?;
        let skip = purged_next.saturating_sub(first) as usize;
        let mut slots = VecDeque::with_capacity(ids.len());
        for (log_id, loc) in ids.into_iter().zip(locs.into_iter().skip(skip)) {
            slots.push_back(Slot {
                log_id,
                entry: None,
                bytes: loc.len as usize,
                loc: Some(loc),
            });
        }
        let index = first + (skip + slots.len()) as u64;
        let view_first = if slots.is_empty() {
            purged_next.max(index)
        } else {
            purged_next.max(first)
        };
        if !slots.is_empty() && view_first > purged_next && state.purged.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: the log starts at {view_first} but is purged only up to {}",
                    dir.display(),
                    purged_next - 1
                ),
            ));
        }
        let shared = Arc::new(Shared {
            view: Mutex::new(View {
                vote: state.vote,
                purged: state.purged,
                committed: None,
                first: view_first,
                mem_from: view_first,
                slots,
                mem_bytes: 0,
            }),
        });
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = Writer {
            dir: dir.to_path_buf(),
            skip_sync,
            segments,
            shared: shared.clone(),
            state,
        };
        std::thread::Builder::new()
            .name("meta-log".into())
            .spawn(move || writer.run(rx))?;
        Ok(LogStore { shared, jobs: tx })
    }

    async fn call<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<io::Result<T>>) -> Job,
    ) -> io::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(job(tx))
            .await
            .map_err(|_| io::Error::other("the log writer has stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("the log writer has stopped"))?
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry>> {
        read_entries(&self.shared, range).await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> SResult<Vec<Entry>> {
        read_entries(&self.shared, range).await
    }
}

enum Found {
    Mem(Arc<Entry>),
    Disk(Loc),
}

async fn read_entries(shared: &Shared, range: impl RangeBounds<u64>) -> SResult<Vec<Entry>> {
    let found: Vec<Found> = {
        let v = shared.view();
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(v.first);
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        }
        .min(v.next_index());
        (start..end.max(start))
            .filter_map(|i| {
                let s = &v.slots[(i - v.first) as usize];
                match (&s.entry, &s.loc) {
                    (Some(e), _) => Some(Found::Mem(e.clone())),
                    (None, Some(l)) => Some(Found::Disk(l.clone())),
                    (None, None) => None,
                }
            })
            .collect()
    };
    if found.iter().all(|f| matches!(f, Found::Mem(_))) {
        return Ok(found
            .into_iter()
            .filter_map(|f| match f {
                Found::Mem(e) => Some(Entry::clone(&e)),
                Found::Disk(_) => None,
            })
            .collect());
    }
    tokio::task::spawn_blocking(move || {
        found
            .into_iter()
            .map(|f| match f {
                Found::Mem(e) => Ok(Entry::clone(&e)),
                Found::Disk(l) => l.read().and_then(|b| decode_entry(&b)),
            })
            .collect::<io::Result<Vec<Entry>>>()
    })
    .await
    .map_err(read_err)?
    .map_err(read_err)
}

impl LogStore {
    /// The vote saved last.
    pub(crate) fn vote(&self) -> Option<Vote<NodeId>> {
        self.shared.view().vote
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> SResult<LogState<TypeConfig>> {
        let v = self.shared.view();
        Ok(LogState {
            last_purged_log_id: v.purged,
            last_log_id: v.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader {
            shared: self.shared.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> SResult<()> {
        let vote = *vote;
        self.call(|tx| Job::SaveVote(vote, tx)).await.map_err(|e| {
            StorageError::from(StorageIOError::write_vote(AnyError::error(e.to_string())))
        })?;
        self.shared.view().vote = Some(vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> SResult<Option<Vote<NodeId>>> {
        Ok(self.shared.view().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> SResult<()> {
        // Kept in memory only: after a restart the leader commits again what the
        // log holds, and reads wait for that (linearizable reads).
        self.shared.view().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> SResult<Option<LogId<NodeId>>> {
        Ok(self.shared.view().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> SResult<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Arc<Entry>> = entries.into_iter().map(Arc::new).collect();
        let Some(start) = entries.first().map(|e| e.log_id.index) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        {
            let mut v = self.shared.view();
            // An empty log continues wherever the first entry says (after a
            // snapshot was installed, say); otherwise entries follow the last one.
            let next = if v.slots.is_empty() {
                start
            } else {
                v.next_index()
            };
            if let Some((i, e)) = (next..).zip(&entries).find(|(i, e)| e.log_id.index != *i) {
                return Err(io_err(format!(
                    "entry {} appended where {i} is next",
                    e.log_id
                )));
            }
            if v.slots.is_empty() {
                v.first = start;
                v.mem_from = start;
            }
            for e in &entries {
                v.slots.push_back(Slot {
                    log_id: e.log_id,
                    entry: Some(e.clone()),
                    loc: None,
                    bytes: 0,
                });
            }
        }
        self.jobs
            .send(Job::Append { entries, callback })
            .await
            .map_err(|_| io_err("the log writer has stopped"))
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.call(|tx| Job::Truncate(log_id.index, tx))
            .await
            .map_err(io_err)?;
        let mut v = self.shared.view();
        let keep = log_id.index.saturating_sub(v.first) as usize;
        while v.slots.len() > keep {
            if let Some(s) = v.slots.pop_back()
                && s.entry.is_some()
                && s.loc.is_some()
            {
                v.mem_bytes -= s.bytes;
            }
        }
        let next = v.next_index();
        v.mem_from = v.mem_from.min(next);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> SResult<()> {
        self.call(|tx| Job::Purge(log_id, tx))
            .await
            .map_err(io_err)?;
        let mut v = self.shared.view();
        while v.first <= log_id.index {
            if let Some(s) = v.slots.pop_front()
                && s.entry.is_some()
                && s.loc.is_some()
            {
                v.mem_bytes -= s.bytes;
            }
            v.first += 1;
        }
        v.mem_from = v.mem_from.max(v.first);
        if v.purged.is_none_or(|p| p < log_id) {
            v.purged = Some(log_id);
        }
        Ok(())
    }
}

/// Runs `op` until it succeeds or fails for another reason than a full disk,
/// waiting `FULL_DISK_RETRY` between tries (the error logged once).
fn when_not_full<T>(what: &str, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut logged = false;
    loop {
        match op() {
            Err(e) if crate::MetaError::from_storage(e.to_string()).is_no_space() => {
                if !logged {
                    tracing::error!(error = %e, "{what} failed: the disk is full; retrying");
                    logged = true;
                }
                std::thread::sleep(FULL_DISK_RETRY);
            }
            other => return other,
        }
    }
}

/// The log's writer thread.
struct Writer {
    dir: PathBuf,
    skip_sync: bool,
    segments: SegmentLog,
    shared: Arc<Shared>,
    state: StateFile,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut next: Option<Job> = None;
        loop {
            let job = match next.take() {
                Some(j) => j,
                None => match rx.blocking_recv() {
                    Some(j) => j,
                    None => return,
                },
            };
            match job {
                Job::Append { entries, callback } => {
                    let mut group = vec![(entries, callback)];
                    let mut count = group[0].0.len();
                    // Take every append waiting now: one write for all.
                    while count < MAX_GROUP_ENTRIES {
                        match rx.try_recv() {
                            Ok(Job::Append { entries, callback }) => {
                                count += entries.len();
                                group.push((entries, callback));
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.append(group);
                }
                // A full disk makes each of these wait and try again, as appends
                // do: an error would stop the node's Raft core for good.
                Job::Truncate(index, reply) => {
                    let res =
                        when_not_full("truncating the Raft log", || self.segments.truncate(index));
                    let _ = reply.send(res);
                }
                Job::Purge(log_id, reply) => {
                    let res = when_not_full("purging the Raft log", || self.purge(log_id));
                    let _ = reply.send(res);
                }
                Job::SaveVote(vote, reply) => {
                    let mut st = self.state.clone();
                    st.vote = Some(vote);
                    let res = when_not_full("saving the Raft vote", || {
                        write_state(&self.dir, &st, self.skip_sync)
                    });
                    if res.is_ok() {
                        self.state = st;
                    }
                    let _ = reply.send(res);
                }
            }
        }
    }

    fn purge(&mut self, log_id: LogId<NodeId>) -> io::Result<()> {
        let mut st = self.state.clone();
        if st.purged.is_some_and(|p| p >= log_id) {
            return Ok(());
        }
        st.purged = Some(log_id);
        // The purge point is durable before any segment goes.
        write_state(&self.dir, &st, self.skip_sync)?;
        self.state = st;
        self.segments.purge(log_id.index)
    }

    fn append(&mut self, group: Vec<(Vec<Arc<Entry>>, LogFlushed<TypeConfig>)>) {
        let started = std::time::Instant::now();
        let mut encoded: Vec<Vec<u8>> = Vec::new();
        let mut first = None;
        let mut failed = None;
        for (entries, _) in &group {
            for e in entries {
                first.get_or_insert(e.log_id.index);
                match encode_entry(e) {
                    Ok(b) => encoded.push(b),
                    Err(err) => failed = Some(err),
                }
            }
        }
        let res = match (failed, first) {
            (Some(e), _) => Err(e),
            (None, None) => Ok(Vec::new()),
            (None, Some(first)) => loop {
                let refs: Vec<&[u8]> = encoded.iter().map(|b| b.as_slice()).collect();
                match self.segments.append(first, &refs) {
                    Err(e) if crate::MetaError::from_storage(e.to_string()).is_no_space() => {
                        tracing::error!(error = %e, "the Raft log cannot grow: the disk is full; retrying");
                        std::thread::sleep(FULL_DISK_RETRY);
                    }
                    other => break other,
                }
            },
        };
        metrics::histogram!("cairn_meta_log_write_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("cairn_meta_log_group_entries").record(encoded.len() as f64);
        match res {
            Ok(locs) => {
                {
                    let mut v = self.shared.view();
                    let indexes = first.unwrap_or(0)..;
                    for (index, (loc, bytes)) in indexes.zip(locs.into_iter().zip(&encoded)) {
                        let mut held = 0;
                        if let Some(s) = v.slot_mut(index) {
                            s.loc = Some(loc);
                            s.bytes = bytes.len();
                            if s.entry.is_some() {
                                held = bytes.len();
                            }
                        }
                        v.mem_bytes += held;
                    }
                    v.trim();
                }
                for (_, cb) in group {
                    cb.log_io_completed(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "writing the Raft log failed");
                for (_, cb) in group {
                    cb.log_io_completed(Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
        }
    }
}
