//! Backups a server takes on its own: one job per `[[backup]]` section of its
//! config file, each with a target, an interval, how often a backup is full
//! (the others incremental or differential) and a retention policy.
//!
//! A job keeps no state of its own: what is due is read from the backups at
//! its target (the newest, and the newest full one), so a restart, or another
//! node taking over, goes on where the schedule stands. Only the node that
//! leads the cluster runs jobs; the target's lock keeps any two runs apart.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::engine::{self, Endpoint, Retention};
use crate::manifest::{Kind, Manifest};
use crate::repo::Repo;
use crate::{BackupError, BackupKey, target};

/// A `[[backup]]` section as the config file spells it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// A folder (a path or file:///path) or s3://bucket/prefix.
    pub target: String,
    /// The S3 endpoint of an s3:// target.
    pub target_endpoint: Option<String>,
    /// Keys of an s3:// target [default: CAIRN_TARGET_ACCESS_KEY and
    /// CAIRN_TARGET_SECRET_KEY].
    pub target_access_key: Option<String>,
    pub target_secret_key: Option<String>,
    /// The backup key (64 hex digits) [default: CAIRN_BACKUP_KEY; none: not
    /// encrypted].
    pub key_file: Option<PathBuf>,
    /// The buckets backed up (default: every bucket).
    #[serde(default)]
    pub buckets: Vec<String>,
    /// Time between backups (`1d`).
    pub interval: String,
    /// A backup is full when the last full one is this old (`7d`); none: only
    /// the first.
    pub full_every: Option<String>,
    /// The type of the backups that are not full: incremental (default) or
    /// differential.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Retention, applied after each backup: the newest N full backups with
    /// what counts from them...
    pub keep_full: Option<usize>,
    /// ...and every backup within this long (needs keep_full).
    pub keep_within: Option<String>,
}

/// A validated job.
#[derive(Clone)]
pub struct Job {
    pub target: String,
    s3: Option<(String, String, String)>,
    key: Option<BackupKey>,
    /// Sorted, as a manifest lists them.
    pub buckets: Vec<String>,
    pub interval: Duration,
    pub full_every: Option<Duration>,
    pub kind: Kind,
    pub retention: Option<Retention>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("target", &self.target)
            .field("buckets", &self.buckets)
            .field("interval", &self.interval)
            .field("full_every", &self.full_every)
            .field("kind", &self.kind)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl JobConfig {
    /// Checks every field (the key file read, the target's location parsed);
    /// errors name the field.
    pub fn validate(self) -> Result<Job, BackupError> {
        let bad = |field: &str, e: String| BackupError::Usage(format!("backup.{field}: {e}"));
        let dur =
            |field: &str, v: &str| engine::parse_duration(v).map_err(|e| bad(field, e.to_string()));
        let interval = dur("interval", &self.interval)?;
        if interval < Duration::from_secs(1) {
            return Err(bad("interval", "must be at least 1s".into()));
        }
        let full_every = self
            .full_every
            .as_deref()
            .map(|v| dur("full_every", v))
            .transpose()?;
        let kind = match self.kind.as_deref().unwrap_or("incremental") {
            "incremental" => Kind::Incremental,
            "differential" => Kind::Differential,
            other => {
                return Err(bad(
                    "type",
                    format!(
                        "'{other}' is not incremental or differential (full backups are set by full_every)"
                    ),
                ));
            }
        };
        let retention = match (self.keep_full, self.keep_within.as_deref()) {
            (None, None) => None,
            (Some(0), _) => return Err(bad("keep_full", "must be at least 1".into())),
            (Some(n), within) => Some(Retention {
                keep_full: n,
                keep_within: within
                    .map(|w| dur("keep_within", w))
                    .transpose()?
                    .unwrap_or_default(),
            }),
            (None, Some(_)) => {
                return Err(bad(
                    "keep_within",
                    "needs keep_full (how many full backups to keep)".into(),
                ));
            }
        };
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let s3 = if self.target.starts_with("s3://") {
            let endpoint = self
                .target_endpoint
                .clone()
                .ok_or_else(|| bad("target_endpoint", "an s3:// target needs one".into()))?;
            let ak = self
                .target_access_key
                .clone()
                .or_else(|| env("CAIRN_TARGET_ACCESS_KEY"))
                .ok_or_else(|| {
                    bad(
                        "target_access_key",
                        "missing (or CAIRN_TARGET_ACCESS_KEY)".into(),
                    )
                })?;
            let sk = self
                .target_secret_key
                .clone()
                .or_else(|| env("CAIRN_TARGET_SECRET_KEY"))
                .ok_or_else(|| {
                    bad(
                        "target_secret_key",
                        "missing (or CAIRN_TARGET_SECRET_KEY)".into(),
                    )
                })?;
            Some((endpoint, ak, sk))
        } else {
            None
        };
        let key = match (&self.key_file, env("CAIRN_BACKUP_KEY")) {
            (Some(f), _) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| bad("key_file", format!("{}: {e}", f.display())))?;
                Some(BackupKey::parse(&text).map_err(|e| bad("key_file", e.to_string()))?)
            }
            (None, Some(k)) => {
                Some(BackupKey::parse(&k).map_err(|e| bad("key_file", e.to_string()))?)
            }
            (None, None) => None,
        };
        let mut buckets = self.buckets;
        buckets.sort();
        buckets.dedup();
        let job = Job {
            target: self.target,
            s3,
            key,
            buckets,
            interval,
            full_every,
            kind,
            retention,
        };
        job.open_target()?;
        Ok(job)
    }
}

/// When the backups a job counts from were taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    /// The newest backup's start.
    pub last: Option<time::OffsetDateTime>,
    /// The newest full backup's start.
    pub last_full: Option<time::OffsetDateTime>,
}

impl Job {
    fn open_target(&self) -> Result<Box<dyn target::Target>, BackupError> {
        let s3 = self
            .s3
            .as_ref()
            .map(|(e, a, s)| (e.as_str(), a.as_str(), s.as_str()));
        target::open(&self.target, s3)
    }

    /// The backup due at `now`, if any.
    pub fn due(&self, now: time::OffsetDateTime, taken: Taken) -> Option<Kind> {
        let Some(last) = taken.last else {
            return Some(Kind::Full);
        };
        if now - last < self.interval {
            return None;
        }
        let full = match (self.full_every, taken.last_full) {
            (_, None) => true,
            (Some(every), Some(f)) => now - f >= every,
            (None, Some(_)) => false,
        };
        Some(if full { Kind::Full } else { self.kind })
    }

    /// How long from `now` until the next backup is due (zero: now).
    pub fn wait(&self, now: time::OffsetDateTime, taken: Taken) -> Duration {
        match taken.last {
            None => Duration::ZERO,
            Some(last) => {
                let next = last + self.interval;
                if next <= now {
                    Duration::ZERO
                } else {
                    (next - now).try_into().unwrap_or(self.interval)
                }
            }
        }
    }

    /// Whether `m` is one of this job's backups: of its buckets (any, for a job
    /// of every bucket, whose target is its own).
    fn counts(&self, m: &Manifest) -> bool {
        self.buckets.is_empty() || m.buckets == self.buckets
    }

    /// When this job's backups at its target were taken.
    pub async fn taken(&self) -> Result<Taken, BackupError> {
        let t = self.open_target()?;
        let repo = Repo::open(t.as_ref(), self.key.as_ref(), true).await?;
        let all = repo.manifests().await?;
        let mut taken = Taken::default();
        for m in all.iter().filter(|m| self.counts(m)) {
            let at = parse_time(&m.time)?;
            taken.last = taken.last.max(Some(at));
            if m.kind == Kind::Full {
                taken.last_full = taken.last_full.max(Some(at));
            }
        }
        Ok(taken)
    }

    /// Takes one backup of `kind` from `source`, then applies the retention
    /// policy; the new backup, and what the prune did.
    pub async fn run_once(
        &self,
        source: &Endpoint,
        kind: Kind,
        progress: &dyn engine::Progress,
    ) -> Result<(Manifest, Option<engine::PruneReport>), BackupError> {
        let t = self.open_target()?;
        let repo = Repo::open(t.as_ref(), self.key.as_ref(), true).await?;
        let opts = engine::BackupOptions {
            buckets: self.buckets.clone(),
            kind: Some(kind),
        };
        let m = engine::backup(source, &repo, &opts, progress).await?;
        let pruned = match &self.retention {
            Some(r) => Some(engine::prune(&repo, r).await?),
            None => None,
        };
        Ok((m, pruned))
    }
}

/// How often a node that does not lead checks whether it leads now, and the
/// longest a failed run waits before it is tried again.
const CHECK_EVERY: Duration = Duration::from_secs(60);

/// Logs what a scheduled backup has to say.
struct Logged;

impl engine::Progress for Logged {
    fn object_done(&self, _: u64) {}
    fn note(&self, text: &str) {
        tracing::warn!(text, "scheduled backup");
    }
}

impl Job {
    /// Runs the job until `stop` turns true: while `leads()` says this node
    /// leads its cluster, takes each backup when it is due, then prunes.
    /// Failures are logged and counted, and tried again.
    pub async fn run(
        self,
        source: Endpoint,
        leads: std::sync::Arc<dyn Fn() -> bool + Send + Sync>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let check = CHECK_EVERY.min(self.interval);
        let label = [("target", self.target.clone())];
        let mut pause = Duration::ZERO;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
            pause = check;
            if !leads() {
                continue;
            }
            let taken = match self.taken().await {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(target = %self.target, error = %e, "scheduled backup: cannot read the target's backups");
                    metrics::counter!("cairn_backup_runs_total", "target" => self.target.clone(), "result" => "error").increment(1);
                    continue;
                }
            };
            let now = time::OffsetDateTime::now_utc();
            let Some(kind) = self.due(now, taken) else {
                pause = self
                    .wait(now, taken)
                    .max(Duration::from_secs(1))
                    .min(self.interval);
                continue;
            };
            let started = std::time::Instant::now();
            tracing::info!(target = %self.target, kind = %kind, "scheduled backup starting");
            let run = self.run_once(&source, kind, &Logged);
            let res = tokio::select! {
                r = run => r,
                // Cut short, it is invisible (no manifest), and its lock is
                // taken over by the next run.
                _ = stop.changed() => return,
            };
            let secs = started.elapsed().as_secs_f64();
            match res {
                Ok((m, pruned)) => {
                    tracing::info!(
                        target = %self.target,
                        id = %m.id,
                        kind = %m.kind,
                        objects = m.objects,
                        bytes_new = m.bytes_new,
                        bytes_stored = m.bytes_stored,
                        seconds = secs,
                        pruned = pruned.as_ref().map_or(0, |p| p.deleted.len()),
                        "scheduled backup done"
                    );
                    metrics::counter!("cairn_backup_runs_total", "target" => self.target.clone(), "result" => "ok").increment(1);
                    metrics::counter!("cairn_backup_bytes_stored_total", &label)
                        .increment(m.bytes_stored);
                    metrics::gauge!("cairn_backup_last_success_timestamp_seconds", &label)
                        .set(time::OffsetDateTime::now_utc().unix_timestamp() as f64);
                    metrics::gauge!("cairn_backup_last_duration_seconds", &label).set(secs);
                    pause = Duration::ZERO; // the next is computed from the target
                }
                Err(e) => {
                    tracing::warn!(target = %self.target, error = %e, seconds = secs, "scheduled backup failed; trying again");
                    metrics::counter!("cairn_backup_runs_total", "target" => self.target.clone(), "result" => "error").increment(1);
                }
            }
        }
    }
}

fn parse_time(s: &str) -> Result<time::OffsetDateTime, BackupError> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| BackupError::Corrupt(format!("a backup's time '{s}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(interval: &str, full_every: Option<&str>, kind: Option<&str>) -> Job {
        JobConfig {
            target: "/nonexistent/backups".into(),
            interval: interval.into(),
            full_every: full_every.map(str::to_string),
            kind: kind.map(str::to_string),
            ..Default::default()
        }
        .validate()
        .unwrap()
    }

    fn at(days: i64, hours: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(days) + time::Duration::hours(hours)
    }

    #[test]
    fn weekly_full_and_daily_incremental() {
        let j = job("1d", Some("7d"), None);
        // Nothing yet: a full one at once.
        assert_eq!(j.due(at(0, 0), Taken::default()), Some(Kind::Full));
        assert_eq!(j.wait(at(0, 0), Taken::default()), Duration::ZERO);
        let mut taken = Taken {
            last: Some(at(0, 0)),
            last_full: Some(at(0, 0)),
        };
        assert_eq!(j.due(at(0, 23), taken), None);
        assert_eq!(j.wait(at(0, 23), taken), Duration::from_secs(3600));
        for day in 1..7 {
            assert_eq!(
                j.due(at(day, 0), taken),
                Some(Kind::Incremental),
                "day {day}"
            );
            taken.last = Some(at(day, 0));
        }
        assert_eq!(j.due(at(7, 0), taken), Some(Kind::Full));
        // A server down for days: one backup when it is back, not one per missed day.
        assert_eq!(j.wait(at(30, 0), taken), Duration::ZERO);
    }

    #[test]
    fn differential_and_only_the_first_full() {
        let j = job("12h", None, Some("differential"));
        let taken = Taken {
            last: Some(at(0, 0)),
            last_full: Some(at(0, 0)),
        };
        assert_eq!(j.due(at(0, 12), taken), Some(Kind::Differential));
        assert_eq!(j.due(at(400, 0), taken), Some(Kind::Differential));
        // Backups of the job's buckets but no full one (pruned away): a full one.
        let no_full = Taken {
            last: Some(at(0, 0)),
            last_full: None,
        };
        assert_eq!(j.due(at(1, 0), no_full), Some(Kind::Full));
    }

    #[test]
    fn bad_sections_are_refused_naming_the_field() {
        let base = JobConfig {
            target: "/tmp/x".into(),
            interval: "1d".into(),
            ..Default::default()
        };
        let cases: Vec<(JobConfig, &str)> = vec![
            (
                JobConfig {
                    interval: "soon".into(),
                    ..base.clone()
                },
                "backup.interval",
            ),
            (
                JobConfig {
                    interval: "0s".into(),
                    ..base.clone()
                },
                "backup.interval",
            ),
            (
                JobConfig {
                    kind: Some("full".into()),
                    ..base.clone()
                },
                "backup.type",
            ),
            (
                JobConfig {
                    keep_within: Some("30d".into()),
                    ..base.clone()
                },
                "backup.keep_within",
            ),
            (
                JobConfig {
                    keep_full: Some(0),
                    ..base.clone()
                },
                "backup.keep_full",
            ),
            (
                JobConfig {
                    target: "s3://b/p".into(),
                    ..base.clone()
                },
                "backup.target_endpoint",
            ),
            (
                JobConfig {
                    key_file: Some("/nonexistent/key".into()),
                    ..base.clone()
                },
                "backup.key_file",
            ),
            (
                JobConfig {
                    target: "ftp://x".into(),
                    ..base.clone()
                },
                "not a backup target",
            ),
        ];
        for (c, want) in cases {
            let e = c
                .clone()
                .validate()
                .expect_err(&format!("{c:?} was accepted"));
            assert!(e.to_string().contains(want), "{c:?}: {e}");
        }
        assert!(base.clone().validate().is_ok());
        // An S3 target with its endpoint and keys (nothing is sent yet).
        let s3 = JobConfig {
            target: "s3://vault/cairn".into(),
            target_endpoint: Some("http://127.0.0.1:9".into()),
            target_access_key: Some("AK".into()),
            target_secret_key: Some("SK".into()),
            ..base
        };
        assert_eq!(s3.validate().unwrap().target, "s3://vault/cairn");
    }
}
