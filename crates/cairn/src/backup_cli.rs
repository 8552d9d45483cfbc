//! `cairn backup` and `cairn restore`: backups of a cairn's buckets to a local
//! folder or any S3 endpoint (see the cairn-backup crate).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use cairn_backup::engine::{self, BackupOptions, Endpoint, RestoreOptions, Summary};
use cairn_backup::manifest::Kind;
use cairn_backup::repo::Repo;
use cairn_backup::{BackupKey, target};
use clap::{Args, Subcommand};

/// Where backups are kept, and the key that seals them.
#[derive(Args, Clone)]
pub struct TargetArgs {
    /// A folder (a path or file:///path) or an S3 location (s3://bucket/prefix,
    /// with --target-endpoint)
    #[arg(long, value_name = "TARGET")]
    target: String,
    /// The S3 endpoint of an s3:// target
    #[arg(long, value_name = "URL")]
    target_endpoint: Option<String>,
    #[arg(long, env = "CAIRN_TARGET_ACCESS_KEY", hide_env_values = true)]
    target_access_key: Option<String>,
    #[arg(long, env = "CAIRN_TARGET_SECRET_KEY", hide_env_values = true)]
    target_secret_key: Option<String>,
    /// The backup key (64 hex digits, `cairn backup keygen FILE`): backups are
    /// encrypted with it, and cannot be read without it. Also CAIRN_BACKUP_KEY
    #[arg(long, value_name = "FILE")]
    key_file: Option<PathBuf>,
}

/// The endpoint a cairn serves S3 on by default.
const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:9000";

/// The cairn (or S3 endpoint) backed up or restored into. Its buckets' own
/// settings (storage class) are recorded and restored through its admin API
/// when an admin token is given (or, for the default endpoint, found in the
/// data directory).
#[derive(Args)]
pub struct EndpointArgs {
    #[arg(long, default_value = DEFAULT_ENDPOINT)]
    endpoint: String,
    #[arg(long, env = "CAIRN_ACCESS_KEY", hide_env_values = true)]
    access_key: Option<String>,
    #[arg(long, env = "CAIRN_SECRET_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    #[command(flatten)]
    admin: crate::admin_cli::Endpoint,
}

#[derive(Subcommand)]
pub enum BackupCmd {
    /// Back up buckets (all by default). Prints the new backup's id last
    Create {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        source: EndpointArgs,
        /// A bucket to back up (repeat for more; default: every bucket)
        #[arg(long = "bucket", value_name = "B")]
        buckets: Vec<String>,
        /// full, incremental (what changed since the last backup of these
        /// buckets) or differential (since the last full one); a first backup
        /// is full
        #[arg(long = "type", default_value = "incremental")]
        kind: String,
        /// Print the backup as a JSON object
        #[arg(long)]
        json: bool,
    },
    /// List the backups at a target, oldest first
    List {
        #[command(flatten)]
        target: TargetArgs,
        /// A JSON array
        #[arg(long)]
        json: bool,
    },
    /// Check the backups at a target: manifests, chains, every chunk there
    /// with its size (--read-data: read and checked). Exits non-zero naming
    /// each bad file
    Verify {
        #[command(flatten)]
        target: TargetArgs,
        /// Only this backup (and the backups it needs)
        #[arg(long)]
        id: Option<String>,
        /// Read every chunk and check it against its name
        #[arg(long)]
        read_data: bool,
    },
    /// Delete the backups a retention policy does not keep (never one a kept
    /// backup needs), then the chunks no kept backup names
    Prune {
        #[command(flatten)]
        target: TargetArgs,
        /// Keep the newest N full backups of each bucket set and the backups
        /// that count from them
        #[arg(long, value_name = "N")]
        keep_full: usize,
        /// Keep every backup taken within this long (12h, 30d, 2w)
        #[arg(long, value_name = "DURATION", default_value = "0s")]
        keep_within: String,
    },
    /// Write a new random backup key to FILE (readable by its owner only)
    Keygen { file: PathBuf },
}

/// Restore a backup into a running cairn (or any S3 endpoint).
#[derive(Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    dest: EndpointArgs,
    /// The backup to restore
    #[arg(long, conflicts_with = "at", required_unless_present = "at")]
    id: Option<String>,
    /// Restore the latest backup taken at or before this time (RFC 3339)
    #[arg(long)]
    at: Option<String>,
    /// A bucket of the backup to restore (repeat for more; default: all)
    #[arg(long = "bucket", value_name = "B")]
    buckets: Vec<String>,
    /// Restore into this bucket (needs exactly one --bucket)
    #[arg(long, value_name = "B2")]
    to_bucket: Option<String>,
    /// Restore only keys that start with this
    #[arg(long)]
    prefix: Option<String>,
    /// Restore into a bucket that is not empty, deleting what the backup does
    /// not hold
    #[arg(long)]
    force: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn key_of(t: &TargetArgs) -> Result<Option<BackupKey>> {
    let text = match (&t.key_file, std::env::var("CAIRN_BACKUP_KEY").ok()) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the backup key {}", f.display()))?,
        (None, Some(k)) if !k.trim().is_empty() => k,
        _ => return Ok(None),
    };
    Ok(Some(BackupKey::parse(&text)?))
}

fn open_target(t: &TargetArgs) -> Result<Box<dyn target::Target>> {
    let s3 = match (
        &t.target_endpoint,
        &t.target_access_key,
        &t.target_secret_key,
    ) {
        (Some(e), Some(a), Some(s)) => Some((e.as_str(), a.as_str(), s.as_str())),
        _ => None,
    };
    Ok(target::open(&t.target, s3)?)
}

fn endpoint(e: &EndpointArgs) -> Result<Endpoint> {
    let (Some(a), Some(s)) = (&e.access_key, &e.secret_key) else {
        bail!(
            "the keys of {} are needed: --access-key and --secret-key, or CAIRN_ACCESS_KEY and CAIRN_SECRET_KEY",
            e.endpoint
        );
    };
    let ep = Endpoint::new(&e.endpoint, a, s);
    let local = e.endpoint.trim_end_matches('/') == DEFAULT_ENDPOINT;
    Ok(match e.admin.token_if_any(local) {
        Some(token) => ep.with_settings(std::sync::Arc::new(AdminSettings {
            admin: e.admin.admin_endpoint.clone(),
            token,
        })),
        None => ep,
    })
}

/// Bucket settings through a cairn's admin API.
struct AdminSettings {
    admin: String,
    token: String,
}

impl AdminSettings {
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, cairn_backup::BackupError> {
        let fail = |e: String| {
            cairn_backup::BackupError::Source(format!(
                "the buckets' settings at {}: {e}",
                self.admin
            ))
        };
        let (status, v) =
            crate::admin_cli::request(&self.admin, method, path, Some(&self.token), body)
                .await
                .map_err(|e| fail(format!("{e:#}")))?;
        if !status.is_success() {
            let msg = v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or(v.to_string());
            return Err(fail(format!("HTTP {status}: {msg}")));
        }
        Ok(v)
    }
}

#[async_trait::async_trait]
impl engine::BucketSettings for AdminSettings {
    async fn classes(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Option<String>>, cairn_backup::BackupError> {
        let v = self
            .call(http::Method::GET, "/v1/cluster/buckets", None)
            .await?;
        Ok(v["buckets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| {
                let class = b["class"].as_str().map(str::to_string);
                Some((b["name"].as_str()?.to_string(), class))
            })
            .collect())
    }

    async fn set_class(
        &self,
        bucket: &str,
        class: Option<&str>,
    ) -> Result<(), cairn_backup::BackupError> {
        self.call(
            http::Method::POST,
            "/v1/cluster/bucket-class",
            Some(serde_json::json!({ "bucket": bucket, "class": class.unwrap_or("default") })),
        )
        .await?;
        Ok(())
    }
}

fn print_summary(s: &Summary) {
    println!(
        "{}  {:<12}  {}  {} objects, {} bytes new, {} bytes stored  buckets {}{}",
        s.time,
        s.kind.to_string(),
        s.id,
        s.objects,
        s.bytes_new,
        s.bytes_stored,
        s.buckets.join(","),
        s.parent
            .as_ref()
            .map(|p| format!("  (parent {p})"))
            .unwrap_or_default()
    );
}

/// A progress bar on a terminal (objects, bytes, rate, time left), plain lines
/// every few seconds otherwise.
fn progress() -> Box<dyn engine::Progress> {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        Box::new(Bar {
            bar: indicatif::ProgressBar::new(0),
            objects: 0.into(),
            total: 0.into(),
        })
    } else {
        Box::new(Lines::new())
    }
}

struct Bar {
    bar: indicatif::ProgressBar,
    objects: std::sync::atomic::AtomicU64,
    total: std::sync::atomic::AtomicU64,
}

impl engine::Progress for Bar {
    /// The bar grows while the listing runs ahead of the backup.
    fn listed(&self, objects: u64, bytes: u64, _complete: bool) {
        self.begin(objects, bytes);
    }

    fn begin(&self, objects: u64, bytes: u64) {
        self.total
            .store(objects, std::sync::atomic::Ordering::Relaxed);
        self.bar.set_length(bytes);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left",
        ) {
            self.bar.set_style(style.progress_chars("=> "));
        }
        self.bar.set_message(format!("0/{objects} objects"));
    }

    fn object_done(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.objects.fetch_add(1, Relaxed) + 1;
        self.bar.inc(bytes);
        self.bar
            .set_message(format!("{n}/{} objects", self.total.load(Relaxed)));
    }

    fn note(&self, text: &str) {
        self.bar.println(format!("warning: {text}"));
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Objects done, as plain lines every few seconds.
struct Lines {
    total: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<std::time::Instant>,
    started: std::time::Instant,
}

impl Lines {
    fn new() -> Lines {
        let now = std::time::Instant::now();
        Lines {
            total: 0.into(),
            done: 0.into(),
            bytes: 0.into(),
            last: std::sync::Mutex::new(now),
            started: now,
        }
    }
}

impl engine::Progress for Lines {
    fn begin(&self, objects: u64, bytes: u64) {
        self.total
            .store(objects, std::sync::atomic::Ordering::Relaxed);
        eprintln!("{objects} objects, {:.1} MiB", bytes as f64 / 1048576.0);
    }

    fn note(&self, text: &str) {
        eprintln!("warning: {text}");
    }

    fn object_done(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.done.fetch_add(1, Relaxed) + 1;
        let b = self.bytes.fetch_add(bytes, Relaxed) + bytes;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= std::time::Duration::from_secs(5) {
            *last = std::time::Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            eprintln!(
                "{n}/{} objects, {:.1} MiB ({:.1} MiB/s)",
                self.total.load(Relaxed),
                b as f64 / 1048576.0,
                b as f64 / 1048576.0 / secs
            );
        }
    }
}

pub fn run_backup(cmd: BackupCmd) -> Result<()> {
    match cmd {
        BackupCmd::Keygen { file } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key = BackupKey::generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .with_context(|| {
                    format!(
                        "writing a new key to {} (an existing file is never replaced)",
                        file.display()
                    )
                })?;
            writeln!(f, "{}", key.to_hex())?;
            f.sync_all()?;
            eprintln!(
                "a new backup key is in {}: keep a copy elsewhere, without it the backups cannot be read",
                file.display()
            );
            Ok(())
        }
        BackupCmd::Verify {
            target,
            id,
            read_data,
        } => runtime()?.block_on(async move {
            let t = open_target(&target)?;
            let key = key_of(&target)?;
            let repo = Repo::open(t.as_ref(), key.as_ref(), false).await?;
            let r = engine::verify(&repo, id.as_deref(), read_data).await?;
            for p in &r.problems {
                eprintln!("bad: {p}");
            }
            println!(
                "{} backups, {} chunks{}: {} problems",
                r.backups,
                r.chunks,
                if read_data {
                    " read and checked"
                } else {
                    " there with their sizes"
                },
                r.problems.len()
            );
            if !r.problems.is_empty() {
                bail!("the backups at {} are damaged", t.describe());
            }
            Ok(())
        }),
        BackupCmd::Prune {
            target,
            keep_full,
            keep_within,
        } => runtime()?.block_on(async move {
            let keep = engine::Retention {
                keep_full,
                keep_within: engine::parse_duration(&keep_within)?,
            };
            let t = open_target(&target)?;
            let key = key_of(&target)?;
            let repo = Repo::open(t.as_ref(), key.as_ref(), false).await?;
            let r = engine::prune(&repo, &keep).await?;
            for id in &r.deleted {
                println!("deleted backup {id}");
            }
            println!(
                "{} backups kept, {} deleted; {} chunks deleted ({} bytes){}",
                r.kept.len(),
                r.deleted.len(),
                r.chunks_deleted,
                r.bytes_freed,
                match r.temporary_removed {
                    0 => String::new(),
                    n => format!("; {n} files left half written by cut-short backups removed"),
                }
            );
            Ok(())
        }),
        BackupCmd::List { target, json } => runtime()?.block_on(async move {
            let t = open_target(&target)?;
            let key = key_of(&target)?;
            let repo = Repo::open(t.as_ref(), key.as_ref(), false).await?;
            let (all, bad) = repo.manifests_checked().await?;
            for e in &bad {
                eprintln!("warning: {e}");
            }
            let all: Vec<Summary> = all.iter().map(Summary::from).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no backups at {}", t.describe());
            } else {
                all.iter().for_each(print_summary);
            }
            Ok(())
        }),
        BackupCmd::Create {
            target,
            source,
            buckets,
            kind,
            json,
        } => runtime()?.block_on(async move {
            let kind: Kind = kind.parse().map_err(anyhow::Error::msg)?;
            let t = open_target(&target)?;
            let key = key_of(&target)?;
            let src = endpoint(&source)?;
            let repo = Repo::open(t.as_ref(), key.as_ref(), true).await?;
            let opts = BackupOptions {
                buckets,
                kind: Some(kind),
            };
            let m = engine::backup(&src, &repo, &opts, progress().as_ref()).await?;
            let s = Summary::from(&m);
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_summary(&s);
                println!("{}", s.id);
            }
            Ok(())
        }),
    }
}

pub fn run_restore(a: RestoreArgs) -> Result<()> {
    runtime()?.block_on(async move {
        let t = open_target(&a.target)?;
        let key = key_of(&a.target)?;
        let dest = endpoint(&a.dest)?;
        let repo = Repo::open(t.as_ref(), key.as_ref(), false).await?;
        // A damaged manifest keeps out only the backups that need it.
        let (all, bad) = repo.manifests_checked().await?;
        for e in &bad {
            eprintln!("warning: {e}");
        }
        let m = match (&a.id, &a.at) {
            (Some(id), _) => all
                .iter()
                .find(|m| &m.id == id)
                .with_context(|| format!("no backup {id} at {}", t.describe()))?,
            (None, Some(at)) => {
                let at = parse_time(at)?;
                let mut best = None;
                for m in &all {
                    if parse_time(&m.time)? <= at {
                        best = Some(m);
                    }
                }
                best.with_context(|| {
                    format!(
                        "no backup at {} was taken at or before {}",
                        t.describe(),
                        a.at.as_deref().unwrap_or("")
                    )
                })?
            }
            (None, None) => bail!("give --id ID or --at TIME"),
        };
        let opts = RestoreOptions {
            buckets: a.buckets,
            to_bucket: a.to_bucket,
            prefix: a.prefix,
            force: a.force,
        };
        let report = engine::restore(&repo, &all, m, &dest, &opts, progress().as_ref()).await?;
        println!(
            "restored backup {} ({}): {} objects, {} bytes{}",
            m.id,
            m.time,
            report.objects,
            report.bytes,
            if report.deleted > 0 {
                format!(", {} objects deleted", report.deleted)
            } else {
                String::new()
            }
        );
        if !report.failed.is_empty() {
            for f in &report.failed {
                eprintln!("not restored: {f}");
            }
            bail!(
                "{} objects were not restored: their backup is damaged",
                report.failed.len()
            );
        }
        Ok(())
    })
}

fn parse_time(s: &str) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .with_context(|| {
            format!("'{s}' is not a time as RFC 3339 writes it (2026-11-24T10:00:00Z)")
        })
}
