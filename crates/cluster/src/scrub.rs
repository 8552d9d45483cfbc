//! Scrub: every node re-reads each of its block files and checks it against its
//! BLAKE3 address, on a schedule and on demand.
//!
//! A pass walks the 256 fan-out directories in order, at most `rate` bytes a
//! second, and saves where it stands (with its counts) in `scrub.state` after each
//! directory, so that a pass resumes after a restart. A copy that fails its check
//! (or cannot be read) is moved to the quarantine and fetched again from another
//! node that holds a good one; one with no good copy anywhere is counted as
//! unrepairable and logged. A pass starts `interval` after the last one ended (the
//! first `interval` after the node first started), or at once on `start`; `pause` holds it where it is (kept across restarts) until
//! the next `start`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_blocks::BlockError;
use cairn_types::{BlockHash, ShardId};
use serde::{Deserialize, Serialize};

use crate::{Blocks, lock};

/// Settings of the scrub.
#[derive(Clone, Debug)]
pub struct ScrubSettings {
    /// Time from the end of one pass to the start of the next.
    pub interval: Duration,
    /// Bytes per second a pass reads at most.
    pub rate: u64,
}

impl Default for ScrubSettings {
    fn default() -> Self {
        ScrubSettings {
            interval: Duration::from_secs(30 * 86400),
            rate: 32 << 20,
        }
    }
}

const GROUPS: u32 = 256;

/// A node's scrub, as status shows it and as `scrub.state` keeps it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScrubStatus {
    /// A pass is under way (possibly paused).
    pub running: bool,
    /// Held by `pause` until the next `start`.
    pub paused: bool,
    /// Fan-out directories (of 256) the current or last pass has done.
    pub groups_done: u32,
    /// Counts of the current or last pass.
    pub blocks_checked: u64,
    pub bytes_checked: u64,
    pub corrupt: u64,
    pub repaired: u64,
    pub unrepairable: u64,
    /// When the current or last pass started and when the last one ended (ms since
    /// the epoch; 0: never).
    pub started_ms: u64,
    pub last_done_ms: u64,
    pub passes: u64,
    /// When the node first started (ms since the epoch): its first pass is due
    /// one interval later, not at once, so a new node does not begin by reading
    /// its whole disk.
    #[serde(default)]
    pub since_ms: u64,
}

impl ScrubStatus {
    pub fn encode(&self) -> bytes::Bytes {
        let mut out = vec![1u8];
        out.extend_from_slice(&serde_json::to_vec(self).unwrap_or_default());
        bytes::Bytes::from(out)
    }

    pub fn decode(b: &[u8]) -> Option<ScrubStatus> {
        match b.split_first() {
            Some((1, rest)) => serde_json::from_slice(rest).ok(),
            _ => None,
        }
    }
}

/// What an operator asks of a node's scrub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScrubCommand {
    Status = 0,
    Start = 1,
    Pause = 2,
}

impl ScrubCommand {
    pub fn from_byte(b: u8) -> Option<ScrubCommand> {
        match b {
            0 => Some(ScrubCommand::Status),
            1 => Some(ScrubCommand::Start),
            2 => Some(ScrubCommand::Pause),
            _ => None,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn state_path(root: &Path) -> PathBuf {
    root.join("scrub.state")
}

/// The saved state; a node without one (new) starts its schedule now.
fn load(path: &Path) -> ScrubStatus {
    let saved = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    saved.unwrap_or_else(|| {
        let st = ScrubStatus {
            since_ms: now_ms(),
            ..ScrubStatus::default()
        };
        if let Err(e) = save(path, &st) {
            tracing::warn!(error = %e, "scrub: cannot save its state");
        }
        st
    })
}

fn save(path: &Path, st: &ScrubStatus) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(st).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// The scrub of one node: its state, shared with the RPC handler.
#[derive(Clone)]
pub struct Scrub {
    state: Arc<Mutex<ScrubStatus>>,
    wake: Arc<tokio::sync::Notify>,
    path: PathBuf,
}

impl Scrub {
    /// The scrub of the node whose block store is under `root`; [`Scrub::run`]
    /// takes it up where it was left.
    pub fn new(root: &Path) -> Scrub {
        Scrub {
            state: Arc::default(),
            wake: Arc::default(),
            path: state_path(root),
        }
    }

    pub fn status(&self) -> ScrubStatus {
        lock(&self.state).clone()
    }

    /// Writes `st` to `scrub.state` on a blocking thread.
    async fn persist(&self, st: ScrubStatus) {
        let path = self.path.clone();
        let _ = tokio::task::spawn_blocking(move || save(&path, &st)).await;
    }

    /// Carries out an operator's command; answers the status after it.
    pub async fn command(&self, c: ScrubCommand) -> ScrubStatus {
        let after = {
            let mut st = lock(&self.state);
            match c {
                ScrubCommand::Status => {}
                ScrubCommand::Start => {
                    st.paused = false;
                    if !st.running {
                        begin(&mut st);
                    }
                }
                ScrubCommand::Pause => st.paused = st.running,
            }
            st.clone()
        };
        if c != ScrubCommand::Status {
            self.persist(after.clone()).await;
        }
        self.wake.notify_one();
        after
    }

    /// Runs passes until `stop` turns true.
    pub async fn run(
        self,
        blocks: Blocks,
        settings: ScrubSettings,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let path = self.path.clone();
        if let Ok(st) = tokio::task::spawn_blocking(move || load(&path)).await {
            *lock(&self.state) = st;
        }
        loop {
            if *stop.borrow() {
                return;
            }
            let wait = {
                let mut st = lock(&self.state);
                if st.paused {
                    None
                } else if st.running {
                    Some(Duration::ZERO)
                } else {
                    let due =
                        st.last_done_ms.max(st.since_ms) + settings.interval.as_millis() as u64;
                    let now = now_ms();
                    if due <= now {
                        begin(&mut st);
                        Some(Duration::ZERO)
                    } else {
                        Some(Duration::from_millis(due - now))
                    }
                }
            };
            match wait {
                Some(d) if d.is_zero() => {
                    self.pass(&blocks, &settings, &stop).await;
                    continue;
                }
                Some(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d.min(Duration::from_secs(3600))) => {}
                        _ = self.wake.notified() => {}
                        _ = stop.changed() => {}
                    }
                }
                None => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    }

    /// Goes on with the running pass until it ends, is paused or `stop`.
    async fn pass(
        &self,
        blocks: &Blocks,
        settings: &ScrubSettings,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) {
        let store = blocks.store().clone();
        let started = Instant::now();
        let mut read: u64 = 0;
        loop {
            let group = {
                let st = lock(&self.state);
                if st.paused || !st.running || *stop.borrow() {
                    return;
                }
                st.groups_done
            };
            if group >= GROUPS {
                let st = {
                    let mut st = lock(&self.state);
                    st.running = false;
                    st.last_done_ms = now_ms();
                    st.passes += 1;
                    st.clone()
                };
                self.persist(st.clone()).await;
                tracing::info!(
                    checked = st.blocks_checked,
                    corrupt = st.corrupt,
                    repaired = st.repaired,
                    unrepairable = st.unrepairable,
                    "scrub pass done"
                );
                metrics::gauge!("cairn_scrub_running").set(0.0);
                return;
            }
            metrics::gauge!("cairn_scrub_running").set(1.0);
            let s = store.clone();
            let hashes = match tokio::task::spawn_blocking(move || s.list_group(group as u8)).await
            {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "scrub: listing blocks failed; retrying in a minute");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    continue;
                }
                Err(_) => return,
            };
            for hash in hashes {
                if lock(&self.state).paused || *stop.borrow() {
                    // The directory is checked again from its start on resume.
                    return;
                }
                let s = store.clone();
                let res = tokio::task::spawn_blocking(move || {
                    let mut buf = Vec::new();
                    s.get_into(&hash, &mut buf).map(|()| buf.len() as u64)
                })
                .await;
                let n = match res {
                    Ok(Ok(n)) => n,
                    Ok(Err(BlockError::NotFound(_))) => continue, // collected meanwhile
                    // Its bytes do not count as checked.
                    Ok(Err(e)) => {
                        self.bad_copy(blocks, hash, &e).await;
                        0
                    }
                    Err(_) => return,
                };
                self.checked(n, &mut read, started, settings).await;
            }
            let s = store.clone();
            let shards = tokio::task::spawn_blocking(move || s.list_shards_group(group as u8))
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default();
            for id in shards {
                if lock(&self.state).paused || *stop.borrow() {
                    return;
                }
                let s = store.clone();
                let res = tokio::task::spawn_blocking(move || {
                    let mut buf = Vec::new();
                    s.get_shard_into(&id, &mut buf).map(|_| buf.len() as u64)
                })
                .await;
                let n = match res {
                    Ok(Ok(n)) => n,
                    Ok(Err(BlockError::NotFound(_))) => continue,
                    Ok(Err(e)) => {
                        self.bad_shard(blocks, id, &e).await;
                        0
                    }
                    Err(_) => return,
                };
                self.checked(n, &mut read, started, settings).await;
            }
            let st = {
                let mut st = lock(&self.state);
                st.groups_done = group + 1;
                st.clone()
            };
            metrics::gauge!("cairn_scrub_progress_ratio")
                .set(f64::from(st.groups_done) / f64::from(GROUPS));
            self.persist(st).await;
        }
    }

    /// Counts one file checked (`n` bytes; `read` in this pass so far), then waits
    /// as long as the rate asks.
    async fn checked(&self, n: u64, read: &mut u64, started: Instant, settings: &ScrubSettings) {
        *read += n;
        {
            let mut st = lock(&self.state);
            st.blocks_checked += 1;
            st.bytes_checked += n;
        }
        metrics::counter!("cairn_scrub_blocks_checked_total").increment(1);
        metrics::counter!("cairn_scrub_bytes_checked_total").increment(n);
        if settings.rate > 0 {
            let due = Duration::from_secs_f64(*read as f64 / settings.rate as f64);
            let ahead = due.saturating_sub(started.elapsed());
            if !ahead.is_zero() {
                tokio::time::sleep(ahead).await;
            }
        }
    }

    /// A copy failed its check: quarantined, and fetched again from another node.
    async fn bad_copy(&self, blocks: &Blocks, hash: BlockHash, e: &BlockError) {
        tracing::error!(block = %hash, error = %e, "scrub: a block copy failed its check");
        let repaired = blocks.replace_local_copy(hash).await;
        self.count_repair(hash, repaired);
    }

    /// A shard failed its check: quarantined, and rebuilt from the block's others.
    async fn bad_shard(&self, blocks: &Blocks, id: ShardId, e: &BlockError) {
        tracing::error!(shard = ?id, error = %e, "scrub: a shard failed its check");
        let repaired = blocks.replace_local_shard(id).await;
        self.count_repair(id.block, repaired);
    }

    fn count_repair(&self, hash: BlockHash, repaired: Result<(), crate::DataError>) {
        metrics::counter!("cairn_scrub_corrupt_total").increment(1);
        lock(&self.state).corrupt += 1;
        let mut st = lock(&self.state);
        match repaired {
            Ok(()) => {
                st.repaired += 1;
                metrics::counter!("cairn_scrub_repaired_total").increment(1);
                tracing::info!(block = %hash, "scrub: the block was fetched again from another node");
            }
            Err(err) => {
                st.unrepairable += 1;
                metrics::counter!("cairn_scrub_unrepairable_total").increment(1);
                tracing::error!(block = %hash, error = %err, "scrub: no good copy of the block could be fetched; the bad one is in the quarantine");
            }
        }
    }
}

/// A new pass, from the first directory.
fn begin(st: &mut ScrubStatus) {
    *st = ScrubStatus {
        running: true,
        paused: false,
        started_ms: now_ms(),
        last_done_ms: st.last_done_ms,
        passes: st.passes,
        since_ms: st.since_ms,
        ..ScrubStatus::default()
    };
    metrics::gauge!("cairn_scrub_progress_ratio").set(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_node_schedules_its_first_pass_an_interval_after_its_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path());
        let before = now_ms();
        let st = load(&path);
        assert!(!st.running);
        assert!(st.since_ms >= before && st.since_ms <= now_ms());
        // Kept: a restart does not move the schedule.
        assert_eq!(load(&path), st);
        // A state saved before the field existed reads as "since ever".
        std::fs::write(&path, br#"{"running":false,"paused":false,"groups_done":0,"blocks_checked":0,"bytes_checked":0,"corrupt":0,"repaired":0,"unrepairable":0,"started_ms":0,"last_done_ms":0,"passes":0}"#).unwrap();
        assert_eq!(load(&path).since_ms, 0);
    }
}
