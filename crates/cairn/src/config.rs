//! The node's configuration: defaults, then a TOML file (`--config`), then environment
//! variables and flags. Validated once at start, with errors that name the bad key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Everything `cairn serve` can be told, as the TOML file spells it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub s3_address: Option<String>,
    pub admin_address: Option<String>,
    pub region: Option<String>,
    pub base_domain: Option<String>,
    pub block_size: Option<String>,
    pub inline_max: Option<String>,
    pub block_memory: Option<String>,
    pub meta_cache: Option<String>,
    pub gc_grace: Option<String>,
    pub gc_interval: Option<String>,
    pub multipart_expiry: Option<String>,
    pub shutdown_grace: Option<String>,
    pub log_format: Option<String>,
    pub rpc_address: Option<String>,
    pub rpc_advertise: Option<String>,
    pub zone: Option<String>,
    pub capacity: Option<String>,
    pub cluster_secret: Option<String>,
    pub rebalance_rate: Option<String>,
    pub move_interval: Option<String>,
    pub repair_after: Option<String>,
    pub repair_interval: Option<String>,
    pub snapshot_every: Option<u64>,
    pub log_keep: Option<u64>,
    pub receive_pin: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub phi_suspect: Option<f64>,
    pub phi_down: Option<f64>,
    pub hedge_after: Option<String>,
    pub scrub_interval: Option<String>,
    pub scrub_rate: Option<String>,
    /// Scheduled backups: one `[[backup]]` section each.
    #[serde(default)]
    pub backup: Vec<cairn_backup::schedule::JobConfig>,
}

/// The shortest cluster secret accepted: it is all that keeps strangers out.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub s3_address: SocketAddr,
    pub admin_address: SocketAddr,
    pub region: String,
    pub base_domain: Option<String>,
    pub block_size: usize,
    pub inline_max: usize,
    pub block_memory: usize,
    pub meta_cache: usize,
    pub gc_grace: Duration,
    pub gc_interval: Duration,
    pub multipart_expiry: Duration,
    pub shutdown_grace: Duration,
    pub log_json: bool,
    /// Where this node listens for other nodes; `None`: no RPC listener, a cluster
    /// of one.
    pub rpc_address: Option<SocketAddr>,
    /// Where other nodes reach this one, when not at `rpc_address` (behind a NAT,
    /// a container's port mapping or a proxy).
    pub rpc_advertise: Option<String>,
    /// The failure zone this node is in (copies of a block go to distinct zones).
    pub zone: String,
    /// Bytes this node offers for data; `None`: the size of its file system.
    pub capacity: Option<u64>,
    /// Shared by every node of the cluster; never sent over the wire.
    pub cluster_secret: Option<String>,
    /// Bytes per second this node copies at most when moving blocks to their places.
    pub rebalance_rate: u64,
    /// How often blocks stored outside their placement are looked at again.
    pub move_interval: Duration,
    /// How long a node is down before its blocks get stand-in copies.
    pub repair_after: Duration,
    /// How often a full pass checks every block's copies with nothing changed.
    pub repair_interval: Duration,
    /// Raft log entries between two metadata snapshots.
    pub snapshot_every: u64,
    /// Raft log entries kept behind the latest snapshot.
    pub log_keep: u64,
    /// How long a block received from another node is kept from garbage collection
    /// while the write that sent it may not have committed yet.
    pub receive_pin: Duration,
    /// The failure detector: heartbeat interval and phi thresholds.
    pub health: cairn_cluster::health::HealthSettings,
    /// When a block read also asks the next node.
    pub hedge: cairn_cluster::Hedge,
    /// Time from the end of one scrub pass to the start of the next.
    pub scrub_interval: Duration,
    /// Bytes per second a scrub pass reads at most.
    pub scrub_rate: u64,
    /// Scheduled backups (run by the node that leads the cluster).
    pub backups: Vec<cairn_backup::schedule::Job>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("s3_address", &self.s3_address)
            .field("admin_address", &self.admin_address)
            .field("rpc_address", &self.rpc_address)
            .field("rpc_advertise", &self.rpc_advertise)
            .field("zone", &self.zone)
            .field("capacity", &self.capacity)
            .field(
                "cluster_secret",
                &self.cluster_secret.as_ref().map(|_| "(set)"),
            )
            .finish_non_exhaustive()
    }
}

/// Parses `30s`, `5m`, `2h`, `7d`, `250ms` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("'{s}' is not a duration like 30s, 5m, 2h, 7d"))?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        u => bail!("unknown unit '{u}' in '{s}' (use ms, s, m, h or d)"),
    };
    Ok(d)
}

/// Parses `4MiB`, `512KiB`, `2TiB`, `1048576`, `1M` (powers of two).
pub fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .with_context(|| format!("'{s}' is not a size like 4MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => bail!("unknown unit '{u}' in '{s}' (use KiB, MiB, GiB or TiB)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("'{s}' is too large"))
}

/// Values given on the command line (or by environment), which win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub s3_address: Option<String>,
    pub admin_address: Option<String>,
    pub region: Option<String>,
    pub base_domain: Option<String>,
    pub gc_grace: Option<String>,
    pub gc_interval: Option<String>,
    pub log_format: Option<String>,
    pub rpc_address: Option<String>,
    pub rpc_advertise: Option<String>,
    pub zone: Option<String>,
    pub capacity: Option<String>,
    pub cluster_secret: Option<String>,
    pub rebalance_rate: Option<String>,
    pub move_interval: Option<String>,
    pub repair_after: Option<String>,
    pub repair_interval: Option<String>,
    pub snapshot_every: Option<u64>,
    pub log_keep: Option<u64>,
    pub receive_pin: Option<String>,
    pub hedge_after: Option<String>,
}

impl Config {
    pub fn load(file: Option<&Path>, o: Overrides) -> Result<Config> {
        let fc: FileConfig = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config file {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("config file {}", p.display()))?
            }
            None => FileConfig::default(),
        };
        fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
            flag.or(file)
        }
        let addr = |key: &str, v: String| -> Result<SocketAddr> {
            v.parse()
                .with_context(|| format!("{key}: '{v}' is not an address like 127.0.0.1:9000"))
        };
        // HOST:PORT where HOST may be a name (resolved when dialled).
        let host_port = |key: &str, v: String| -> Result<String> {
            match v.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(v),
                _ => bail!("{key}: '{v}' is not HOST:PORT"),
            }
        };
        let dur = |key: &str, v: Option<String>, default: Duration| -> Result<Duration> {
            match v {
                Some(v) => parse_duration(&v).with_context(|| key.to_string()),
                None => Ok(default),
            }
        };
        let size = |key: &str, v: Option<String>, default: usize| -> Result<usize> {
            match v {
                Some(v) => parse_size(&v).with_context(|| key.to_string()),
                None => Ok(default),
            }
        };
        let s3d = cairn_api_s3::S3Settings::default();
        let opsd = cairn_ops::OpsSettings::default();
        let moverd = cairn_cluster::mover::MoverSettings::default();
        let cfg = Config {
            data_dir: o
                .data_dir
                .or(fc.data_dir)
                .unwrap_or_else(|| PathBuf::from("cairn-data")),
            s3_address: addr(
                "s3_address",
                pick(o.s3_address, fc.s3_address).unwrap_or_else(|| "127.0.0.1:9000".into()),
            )?,
            admin_address: addr(
                "admin_address",
                pick(o.admin_address, fc.admin_address).unwrap_or_else(|| "127.0.0.1:9001".into()),
            )?,
            region: pick(o.region, fc.region).unwrap_or(s3d.region),
            base_domain: pick(o.base_domain, fc.base_domain),
            block_size: size("block_size", fc.block_size, s3d.block_size)?,
            inline_max: size("inline_max", fc.inline_max, s3d.inline_max)?,
            block_memory: size("block_memory", fc.block_memory, s3d.block_memory)?,
            meta_cache: size("meta_cache", fc.meta_cache, cairn_meta::DEFAULT_CACHE_BYTES)?,
            gc_grace: dur("gc_grace", pick(o.gc_grace, fc.gc_grace), opsd.gc_grace)?,
            gc_interval: dur(
                "gc_interval",
                pick(o.gc_interval, fc.gc_interval),
                opsd.gc_interval,
            )?,
            multipart_expiry: dur(
                "multipart_expiry",
                fc.multipart_expiry,
                opsd.multipart_expiry,
            )?,
            shutdown_grace: dur("shutdown_grace", fc.shutdown_grace, Duration::from_secs(30))?,
            log_json: match pick(o.log_format, fc.log_format).as_deref() {
                None | Some("text") => false,
                Some("json") => true,
                Some(other) => bail!("log_format: '{other}' is not one of text, json"),
            },
            rpc_address: pick(o.rpc_address, fc.rpc_address)
                .map(|v| addr("rpc_address", v))
                .transpose()?,
            rpc_advertise: pick(o.rpc_advertise, fc.rpc_advertise)
                .map(|v| host_port("rpc_advertise", v))
                .transpose()?,
            zone: pick(o.zone, fc.zone).unwrap_or_else(|| "z1".into()),
            capacity: pick(o.capacity, fc.capacity)
                .map(|v| parse_size(&v).map(|n| n as u64).context("capacity"))
                .transpose()?,
            cluster_secret: pick(o.cluster_secret, fc.cluster_secret),
            rebalance_rate: size(
                "rebalance_rate",
                pick(o.rebalance_rate, fc.rebalance_rate),
                moverd.rate as usize,
            )? as u64,
            repair_after: dur(
                "repair_after",
                pick(o.repair_after, fc.repair_after),
                moverd.repair_after,
            )?,
            repair_interval: dur(
                "repair_interval",
                pick(o.repair_interval, fc.repair_interval),
                moverd.repair_interval,
            )?,
            move_interval: dur(
                "move_interval",
                pick(o.move_interval, fc.move_interval),
                moverd.interval,
            )?,
            snapshot_every: pick(o.snapshot_every, fc.snapshot_every)
                .unwrap_or(cairn_meta::DEFAULT_SNAPSHOT_EVERY),
            log_keep: pick(o.log_keep, fc.log_keep).unwrap_or(cairn_meta::DEFAULT_LOG_KEEP),
            receive_pin: dur(
                "receive_pin",
                pick(o.receive_pin, fc.receive_pin),
                cairn_cluster::DataSettings::default().recent_pin,
            )?,
            health: {
                let d = cairn_cluster::health::HealthSettings::default();
                cairn_cluster::health::HealthSettings {
                    interval: dur("heartbeat_interval", fc.heartbeat_interval, d.interval)?,
                    suspect_phi: fc.phi_suspect.unwrap_or(d.suspect_phi),
                    down_phi: fc.phi_down.unwrap_or(d.down_phi),
                    ..d
                }
            },
            hedge: match pick(o.hedge_after, fc.hedge_after) {
                Some(v) => v
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("hedge_after: {e}"))?,
                None => cairn_cluster::Hedge::Auto,
            },
            scrub_interval: dur(
                "scrub_interval",
                fc.scrub_interval,
                cairn_cluster::scrub::ScrubSettings::default().interval,
            )?,
            scrub_rate: size(
                "scrub_rate",
                fc.scrub_rate,
                cairn_cluster::scrub::ScrubSettings::default().rate as usize,
            )? as u64,
            backups: fc
                .backup
                .into_iter()
                .map(|j| j.validate())
                .collect::<Result<_, _>>()?,
        };
        cfg.health.validate().map_err(anyhow::Error::msg)?;
        if cfg.snapshot_every == 0 {
            bail!("snapshot_every: must be at least 1 log entry");
        }
        if cfg.zone.is_empty() || cfg.zone.len() > 64 {
            bail!("zone: must be 1 to 64 characters");
        }
        if cfg.capacity == Some(0) {
            bail!("capacity: must be more than 0 (leave it out to use the file system's size)");
        }
        if cfg.rpc_advertise.is_some() && cfg.rpc_address.is_none() {
            bail!("rpc_advertise: needs rpc_address (the address to listen on)");
        }
        match (&cfg.rpc_address, &cfg.cluster_secret) {
            (Some(_), None) => bail!(
                "cluster_secret: required with rpc_address (set it in the config file or CAIRN_CLUSTER_SECRET)"
            ),
            (_, Some(s)) if s.len() < MIN_SECRET_LEN => {
                bail!("cluster_secret: must be at least {MIN_SECRET_LEN} characters")
            }
            _ => {}
        }
        if !(64 << 10..=64 << 20).contains(&cfg.block_size) {
            bail!("block_size: must be between 64KiB and 64MiB");
        }
        if cfg.inline_max > 64 << 10 || cfg.inline_max >= cfg.block_size {
            bail!("inline_max: must be at most 64KiB and below block_size");
        }
        if cfg.block_memory < 2 * cfg.block_size {
            bail!(
                "block_memory: must hold at least two blocks ({} bytes)",
                2 * cfg.block_size
            );
        }
        if cfg.meta_cache < 4 << 20 {
            bail!("meta_cache: must be at least 4MiB");
        }
        if cfg.region.is_empty() {
            bail!("region: must not be empty");
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("12").unwrap(), Duration::from_secs(12));
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("x").is_err());
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert!(parse_size("4PB").is_err());
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "data_dri = \"x\"\n").unwrap();
        let err = format!(
            "{:#}",
            Config::load(Some(&p), Overrides::default()).unwrap_err()
        );
        assert!(err.contains("data_dri"), "{err}");
        std::fs::write(&p, "s3_address = \"nope\"\n").unwrap();
        let err = format!(
            "{:#}",
            Config::load(Some(&p), Overrides::default()).unwrap_err()
        );
        assert!(err.contains("s3_address"), "{err}");
    }

    #[test]
    fn an_advertised_rpc_address_is_checked() {
        let with = |address: Option<&str>, advertise: &str| {
            Config::load(
                None,
                Overrides {
                    rpc_address: address.map(str::to_string),
                    rpc_advertise: Some(advertise.to_string()),
                    cluster_secret: Some("a-secret-long-enough-for-it".into()),
                    ..Overrides::default()
                },
            )
        };
        let cfg = with(Some("127.0.0.1:9002"), "node-a.example:19002").unwrap();
        assert_eq!(cfg.rpc_advertise.as_deref(), Some("node-a.example:19002"));
        for bad in ["node-a.example", ":9002", "host:0", "host:99999"] {
            let err = format!("{:#}", with(Some("127.0.0.1:9002"), bad).unwrap_err());
            assert!(err.contains("rpc_advertise"), "{bad}: {err}");
        }
        let err = format!("{:#}", with(None, "host:9002").unwrap_err());
        assert!(err.contains("needs rpc_address"), "{err}");
    }

    #[test]
    fn failure_detector_settings_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "heartbeat_interval = \"200ms\"\nphi_suspect = 2.5\nphi_down = 10\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&p), Overrides::default()).unwrap();
        assert_eq!(cfg.health.interval, Duration::from_millis(200));
        assert_eq!((cfg.health.suspect_phi, cfg.health.down_phi), (2.5, 10.0));
        for (text, key) in [
            ("phi_down = 1.0\n", "phi_down"),
            ("phi_suspect = -1.0\n", "phi_suspect"),
            ("heartbeat_interval = \"0s\"\n", "heartbeat_interval"),
            ("heartbeat_interval = \"soon\"\n", "heartbeat_interval"),
        ] {
            std::fs::write(&p, text).unwrap();
            let err = format!(
                "{:#}",
                Config::load(Some(&p), Overrides::default()).unwrap_err()
            );
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
