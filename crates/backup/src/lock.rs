//! One writer at a time per target: a backup or a prune holds `lock` there for
//! as long as it runs. The lock says who holds it and until when; its holder
//! renews it while working, so a lock past its time was left by a holder that
//! died, and is taken over (and reported). So is the lock of a process of this
//! machine that is gone (killed, say), without waiting for its time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::BackupError;
use crate::target::Target;

/// The lock's name at a target.
pub const LOCK_NAME: &str = "lock";
/// How long a lock holds without being renewed.
pub const LOCK_TTL: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Who holds it: host and process.
    pub holder: String,
    /// What for ("backup", "prune").
    pub operation: String,
    /// A value of this holding alone, to tell it from a later one.
    pub token: String,
    /// The holder's machine and process.
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub since: u64,
    pub expires: u64,
}

/// This machine's name.
fn host() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Whether the lock was left by a process of this machine that is gone (where
/// the process table can be read: /proc).
fn holder_gone(l: &LockInfo) -> bool {
    l.pid != 0
        && l.host == host()
        && std::path::Path::new("/proc/self").exists()
        && !std::path::Path::new(&format!("/proc/{}", l.pid)).exists()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A held lock; [`Lock::release`] gives it back (a lock dropped without that
/// expires after [`LOCK_TTL`]).
pub struct Lock {
    info: LockInfo,
    /// A stale lock this one replaced, for the caller to report.
    pub took_over: Option<LockInfo>,
}

impl Lock {
    /// Takes the lock of `target` for `operation`, or says who holds it.
    pub async fn acquire(target: &dyn Target, operation: &str) -> Result<Lock, BackupError> {
        let host = host();
        let now = now_secs();
        let info = LockInfo {
            holder: format!("{host} pid {}", std::process::id()),
            host,
            pid: std::process::id(),
            operation: operation.to_string(),
            token: format!("{:032x}", rand::random::<u128>()),
            since: now,
            expires: now + LOCK_TTL.as_secs(),
        };
        let body = Bytes::from(serde_json::to_vec(&info).unwrap_or_default());
        let mut took_over = None;
        for _ in 0..3 {
            if target.put_new(LOCK_NAME, body.clone()).await? {
                return Ok(Lock { info, took_over });
            }
            let Some(held) = target.get(LOCK_NAME).await? else {
                continue; // released meanwhile
            };
            match serde_json::from_slice::<LockInfo>(&held) {
                Ok(other) if other.expires > now_secs() && !holder_gone(&other) => {
                    return Err(BackupError::Locked(format!(
                        "{} is running a {} there (since {}s ago; the lock expires in {}s unless renewed)",
                        other.holder,
                        other.operation,
                        now_secs().saturating_sub(other.since),
                        other.expires.saturating_sub(now_secs())
                    )));
                }
                Ok(other) => took_over = Some(other),
                Err(_) => {
                    took_over = Some(LockInfo {
                        holder: "unknown (unreadable lock)".into(),
                        host: String::new(),
                        pid: 0,
                        operation: String::new(),
                        token: String::new(),
                        since: 0,
                        expires: 0,
                    })
                }
            }
            target.delete(LOCK_NAME).await?;
        }
        Err(BackupError::Locked(
            "the lock changed hands while it was being taken; try again".into(),
        ))
    }

    /// Pushes the lock's expiry on; fails if another holder has taken it.
    pub async fn renew(&mut self, target: &dyn Target) -> Result<(), BackupError> {
        self.check(target).await?;
        self.info.expires = now_secs() + LOCK_TTL.as_secs();
        let body = Bytes::from(serde_json::to_vec(&self.info).unwrap_or_default());
        target.put(LOCK_NAME, body).await
    }

    /// Gives the lock back (if it is still this one's).
    pub async fn release(self, target: &dyn Target) -> Result<(), BackupError> {
        self.check(target).await?;
        target.delete(LOCK_NAME).await
    }

    async fn check(&self, target: &dyn Target) -> Result<(), BackupError> {
        let held = target.get(LOCK_NAME).await?;
        let mine = held
            .and_then(|b| serde_json::from_slice::<LockInfo>(&b).ok())
            .is_some_and(|l| l.token == self.info.token);
        if mine {
            Ok(())
        } else {
            Err(BackupError::Locked(
                "this run's lock was taken over (it was not renewed in time)".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::LocalTarget;

    #[tokio::test]
    async fn one_holder_at_a_time_and_a_stale_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let t = LocalTarget::new(dir.path());
        let mut a = Lock::acquire(&t, "backup").await.unwrap();
        assert!(a.took_over.is_none());
        let err = Lock::acquire(&t, "prune").await.err().unwrap();
        assert!(err.to_string().contains("running a backup"), "{err}");
        a.renew(&t).await.unwrap();
        a.release(&t).await.unwrap();
        // Free again; then a lock left by a dead holder, past its time.
        let b = Lock::acquire(&t, "prune").await.unwrap();
        let mut stale: LockInfo =
            serde_json::from_slice(&t.get(LOCK_NAME).await.unwrap().unwrap()).unwrap();
        stale.expires = now_secs() - 1;
        t.put(LOCK_NAME, Bytes::from(serde_json::to_vec(&stale).unwrap()))
            .await
            .unwrap();
        let c = Lock::acquire(&t, "backup").await.unwrap();
        assert_eq!(
            c.took_over.as_ref().map(|l| l.operation.as_str()),
            Some("prune")
        );
        // The old holder finds it has lost the lock, and leaves it alone.
        assert!(b.release(&t).await.is_err());
        assert!(t.get(LOCK_NAME).await.unwrap().is_some());
        c.release(&t).await.unwrap();
        assert!(t.get(LOCK_NAME).await.unwrap().is_none());
        // A lock in time, but of a process of this machine that is gone.
        let d = Lock::acquire(&t, "backup").await.unwrap();
        let mut dead: LockInfo =
            serde_json::from_slice(&t.get(LOCK_NAME).await.unwrap().unwrap()).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        dead.pid = child.id();
        child.wait().unwrap();
        t.put(LOCK_NAME, Bytes::from(serde_json::to_vec(&dead).unwrap()))
            .await
            .unwrap();
        let e = Lock::acquire(&t, "prune").await.unwrap();
        assert!(e.took_over.is_some());
        assert!(d.release(&t).await.is_err());
        e.release(&t).await.unwrap();
    }
}
