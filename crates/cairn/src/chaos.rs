//! `cairn chaos`: real processes, real faults, a recorded history, a verdict.
//!
//! Starts a local cluster (`cairn dev-cluster` in a temporary directory: 5 nodes in
//! 3 zones, replication 3), runs concurrent clients doing PUT, conditional PUT
//! (`If-None-Match: *`), GET, DELETE and LIST on a few keys through random nodes,
//! each operation recorded with its call and return times and its answer, while a
//! nemesis injects faults (kill -9 and restart, SIGSTOP and SIGCONT). Then it heals
//! every fault, waits for the cluster to settle, reads every key through every
//! node, saves the history (JSON lines, see `cairn_chaos::history`) and checks it
//! (`cairn_chaos::check`): no acknowledged write lost, each key's history
//! linearizable, no damaged bytes, and the run did what it claims (every fault kind
//! happened, enough operations were acknowledged, a leader was killed).
//!
//! `cairn chaos --check FILE` gives the verdict on a saved history again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use cairn_chaos::{Call, Header, History, Limits, Op, Outcome, Verdict, history};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::bench::{Body, Conn, conn_to};
use crate::local_cluster::{self, Cluster};
use crate::netproxy::{self, Link, Links};
use crate::sigv4::Signer;

/// Kinds of fault the nemesis injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// kill -9, started again later.
    Kill,
    /// SIGSTOP, SIGCONT later.
    Pause,
    /// Some nodes (a minority) cut off from the rest: connections reset, or
    /// stalled (packets dropped) until healed.
    Partition,
    /// Every link to and from one node delayed by 50 to 300 ms.
    Slow,
    /// One node's wall clock set seconds to minutes ahead or behind (libfaketime;
    /// its monotonic clock runs on).
    Clock,
    /// A membership change with the leader killed under it: a node removed (it
    /// drains, then leaves, and is stopped), or a new node added in the place of
    /// the last one removed.
    Member,
    /// One byte flipped in a block file on one node's disk (its size kept): read
    /// repair or scrub must find the copy bad, never serve it, and replace it.
    Corrupt,
    /// The disk of one node full (its data on a tmpfs whose size is cut to what it
    /// holds), then space again; the node must recover without a restart.
    Disk,
}

impl FaultKind {
    pub fn parse(s: &str) -> Result<FaultKind> {
        match s {
            "kill" => Ok(FaultKind::Kill),
            "pause" => Ok(FaultKind::Pause),
            "partition" => Ok(FaultKind::Partition),
            "slow" => Ok(FaultKind::Slow),
            "clock" => Ok(FaultKind::Clock),
            "member" => Ok(FaultKind::Member),
            "corrupt" => Ok(FaultKind::Corrupt),
            "disk" => Ok(FaultKind::Disk),
            other => bail!(
                "unknown fault kind '{other}' (kinds: kill, pause, partition, slow, clock, member, corrupt, disk)"
            ),
        }
    }

    fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::Slow => "slow",
            FaultKind::Clock => "clock",
            FaultKind::Member => "member",
            FaultKind::Corrupt => "corrupt",
            FaultKind::Disk => "disk",
        }
    }
}

pub struct ChaosOptions {
    pub nodes: usize,
    pub zones: usize,
    pub duration: Duration,
    pub clients: usize,
    pub keys: usize,
    pub faults: Vec<FaultKind>,
    /// Mean time between the starts of two faults.
    pub fault_interval: Duration,
    /// Faults last between this and twice this.
    pub fault_length: Duration,
    /// Nodes faulty at once, at most.
    pub max_faulty: usize,
    pub request_timeout: Duration,
    pub min_acked: usize,
    pub seed: u64,
    pub history: PathBuf,
    /// The `e/` keys in a bucket of class `EC_CLASS` (else with the others).
    pub erasure_coded: bool,
}

/// A fault as it happened. Times are microseconds since the run began.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Fault {
    kind: FaultKind,
    /// The node it hit (for a partition: the first of the cut-off side).
    node: usize,
    /// A partition's cut-off side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    group: Vec<usize>,
    /// How a partition cuts ("cut" or "stall"), how much a slow node is delayed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    detail: String,
    /// Whether the node (or the cut-off side) held the Raft leader when it began.
    leader: bool,
    /// A clock fault: the node's clock against the real one, in seconds, as the
    /// node itself reported it while the fault lasted (none if it could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    observed_skew_s: Option<f64>,
    /// A clock fault: the offset set, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    skew_s: Option<i64>,
    /// A membership fault: the change under the leader's death.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    member: Option<MemberChange>,
    /// A corrupt fault: the block whose copy was flipped (hex), and whether that
    /// copy was good again (or gone) once the run was over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    block: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    repaired: Option<bool>,
    from_us: u64,
    to_us: u64,
    /// The links it set (healed when it ends).
    #[serde(skip)]
    links: Vec<(usize, usize)>,
}

/// The membership change of a `member` fault.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemberChange {
    /// The node removed, or added.
    node: usize,
    add: bool,
    /// When the change was seen complete (none: it never was).
    done_us: Option<u64>,
}

impl Fault {
    /// A fault of `kind` on `node` beginning at `from_us`, under way (its details
    /// filled in by the caller).
    fn new(kind: FaultKind, node: usize, leader: bool, from_us: u64) -> Fault {
        Fault {
            kind,
            node,
            group: Vec::new(),
            detail: String::new(),
            leader,
            observed_skew_s: None,
            skew_s: None,
            member: None,
            block: None,
            repaired: None,
            from_us,
            to_us: u64::MAX,
            links: Vec::new(),
        }
    }

    /// The nodes it makes faulty.
    fn nodes(&self) -> Vec<usize> {
        if self.group.is_empty() {
            vec![self.node]
        } else {
            self.group.clone()
        }
    }
}

/// What the run was, saved in the history's header.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunInfo {
    seed: u64,
    nodes: usize,
    zones: usize,
    clients: usize,
    faults_enabled: Vec<FaultKind>,
    faults: Vec<Fault>,
    min_acked: usize,
    settle_ms: u64,
    elections: Option<u64>,
    /// Check 4: the copies on disk of the blocks of every key's last value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    redundancy: Option<Redundancy>,
}

/// Check 4, as the run found it after healing: each key's last value's block
/// counted in the block files (that verify) on the disks of the nodes in the
/// cluster, and what the scrub run then found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Redundancy {
    copies_wanted: usize,
    /// Shards of each block of the erasure-coded bucket (each wanted once).
    #[serde(default)]
    shards_wanted: usize,
    blocks: usize,
    /// Of which in the erasure-coded bucket.
    #[serde(default)]
    ec_blocks: usize,
    /// Blocks with fewer good copies (or distinct good shards) on disk than
    /// wanted: key, block, count.
    short: Vec<(String, String, usize)>,
    /// How long the copies took to be complete (or the wait gave up).
    waited_ms: u64,
    scrub_checked: u64,
    scrub_corrupt: u64,
    scrub_repaired: u64,
    scrub_unrepairable: u64,
    /// The scrub did not end on every node in time.
    scrub_unfinished: bool,
}

const BUCKET: &str = "chaos";
/// Flags of every node of a chaos cluster.
const NODE_FLAGS: [&str; 6] = [
    "--gc-grace=1m",
    "--gc-interval=5s",
    "--receive-pin=1m",
    "--move-interval=5s",
    "--repair-after=10s",
    "--repair-interval=20s",
];
/// The node whose data is on a tmpfs of its own (for disk faults): the last.
fn disk_node(nodes: usize) -> usize {
    nodes - 1
}
/// Size of that tmpfs while no disk fault cuts it (only pages in use take memory).
const DISK_SIZE: &str = "8g";

/// A tmpfs mounted for a chaos run, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(at)?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!(
                "cannot mount a tmpfs at {} (disk faults need root)",
                at.display()
            );
        }
        Ok(Tmpfs(at.to_path_buf()))
    }

    /// Sets the size limit (`mount -o remount,size=`).
    fn resize(&self, size: &str) -> bool {
        std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Cuts the size limit to what the file system holds: every write that needs
    /// a new page fails with ENOSPC. Whether it could.
    fn fill(&self) -> bool {
        let Ok(st) = rustix::fs::statvfs(&self.0) else {
            return false;
        };
        let used_kib = (st.f_blocks - st.f_bfree) * st.f_frsize / 1024;
        // Pages taken between the look and the cut: a little more each try.
        [0, 256, 1024, 4096]
            .iter()
            .any(|extra| self.resize(&format!("{}k", used_kib + extra + 4)))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// How long check 4 waits for every block to have its copies, after healing.
const REDUNDANCY_WAIT: Duration = Duration::from_secs(120);
/// A run stops early (and says so) when the disk holding its cluster has less
/// than this free.
const MIN_FREE_DISK: u64 = 1 << 30;
/// Largest response body read (the largest value is 2 MiB).
const MAX_BODY: usize = 8 << 20;
/// A gap longer than this between two acknowledged operations counts as a window
/// of unavailability.
const UNAVAILABLE_GAP: Duration = Duration::from_secs(1);

/// The keys the clients use: three prefixes, so that LIST of a prefix matters;
/// those of `e/` are in the erasure-coded bucket.
fn keys(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{}/{}", ["a", "b", "e"][i % 3], i / 3))
        .collect()
}

/// The bucket of an erasure-coded class (`EC_CLASS`) that holds the `e/` keys.
const EC_BUCKET: &str = "chaos-ec";
const EC_CLASS: &str = "EC:3+2";

/// The bucket a key is in (`ec`: the run has an erasure-coded bucket).
fn bucket_of(key: &str, ec: bool) -> &'static str {
    if ec && key.starts_with("e/") {
        EC_BUCKET
    } else {
        BUCKET
    }
}

pub async fn run(o: ChaosOptions) -> Result<()> {
    if o.nodes < 3 {
        bail!("--nodes: at least 3");
    }
    if o.clients == 0 || o.keys == 0 {
        bail!("--clients and --keys: at least 1");
    }
    if o.max_faulty == 0 || o.max_faulty >= o.nodes {
        bail!("--max-faulty: from 1 to one less than the nodes");
    }
    let (nodes, zones) = (o.nodes, o.zones);
    let faketime = if o.faults.contains(&FaultKind::Clock) {
        Some(libfaketime().context(
            "clock faults need libfaketime (Debian's package faketime; or set CAIRN_LIBFAKETIME to its path)",
        )?)
    } else {
        None
    };
    // Each node's RPC port gets a proxy in front (the port after the nodes' own),
    // which the node advertises: every link between nodes can be cut, stalled or
    // slowed.
    let links = Links::new();
    let l2 = links.clone();
    // Disk faults: the last node's data on a tmpfs of its own.
    let with_disk = o.faults.contains(&FaultKind::Disk);
    if with_disk {
        let probe = tempfile::tempdir()?;
        drop(
            Tmpfs::mount(probe.path(), "1m")
                .context("disk faults need to mount a tmpfs (run as root, or leave out disk)")?,
        );
    }
    let disk_mount: Arc<Mutex<Option<Tmpfs>>> = Arc::default();
    let dm = disk_mount.clone();
    let mut c = tokio::task::spawn_blocking(move || {
        local_cluster::start_cluster_with(nodes, zones, "cairn-chaos-", nodes, |base, dir| {
            if with_disk {
                // Another attempt (ports in use) unmounts the last one's first.
                let mut slot = dm.lock().unwrap_or_else(|p| p.into_inner());
                *slot = None;
                *slot = Some(Tmpfs::mount(
                    &dir.join(format!("node{}", disk_node(nodes))),
                    DISK_SIZE,
                )?);
            }
            let proxy_base = proxy_port(base, nodes, 0);
            let mut listeners = Vec::new();
            for i in 0..nodes {
                listeners.push(std::net::TcpListener::bind((
                    "127.0.0.1",
                    (proxy_base + i) as u16,
                ))?);
            }
            for (i, l) in listeners.into_iter().enumerate() {
                let target = SocketAddr::from(([127, 0, 0, 1], (base as usize + 3 * i + 2) as u16));
                netproxy::spawn(l, target, i, l2.clone());
            }
            let mut args = vec!["--rpc-advertise-base".to_string(), proxy_base.to_string()];
            // Overwritten objects' blocks go within minutes, not the default hour
            // (nor ten minutes for copies received from peers): a long run reuses
            // its disk (and collection runs under the faults); membership changes
            // move blocks every 5 s rather than 30.
            for a in NODE_FLAGS {
                args.push("--serve-arg".into());
                args.push(a.to_string());
            }
            // Each node's wall clock is the real one plus the offset in its file,
            // read again every second; its monotonic clock (timers, Raft) is not
            // touched, nor the times the kernel puts on its files.
            if let Some(lib) = &faketime {
                for i in 0..nodes {
                    set_clock(dir, i, 0)?;
                }
                let file = dir.join("clock{i}");
                for (k, v) in [
                    ("LD_PRELOAD", lib.display().to_string()),
                    ("FAKETIME_TIMESTAMP_FILE", file.display().to_string()),
                    ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
                    ("FAKETIME_CACHE_DURATION", "1".into()),
                    ("NO_FAKE_STAT", "1".into()),
                ] {
                    args.push("--node-env".into());
                    args.push(format!("{k}={v}"));
                }
            }
            Ok(args)
        })
    })
    .await??;
    for (i, n) in c.nodes.iter().enumerate() {
        if let Ok(id) = u64::from_str_radix(&n.id, 16) {
            links.learn(id, i);
        }
    }
    // Every node must be reached through its proxy, for Raft and for blocks, or
    // the link faults would miss it.
    let proxy_base = proxy_port(c.base_port, nodes, 0);
    let proxied = match local_cluster::status(&c.nodes[0].admin).await {
        Some(st) => ["members", "nodes"].iter().all(|list| {
            st[*list].as_array().is_some_and(|l| {
                l.len() == c.nodes.len()
                    && l.iter().all(|m| {
                        let port = m["rpc_address"]
                            .as_str()
                            .and_then(|a| a.rsplit_once(':'))
                            .and_then(|(_, p)| p.parse::<usize>().ok());
                        port.is_some_and(|p| p >= proxy_base)
                    })
            })
        }),
        None => false,
    };
    if !proxied {
        bail!("the nodes do not advertise their proxies' addresses: link faults would miss them");
    }
    println!(
        "chaos: {} nodes in {} zones ({}), {} clients on {} keys{} for {:?}; faults: {}",
        o.nodes,
        o.zones,
        c.dir.path().display(),
        o.clients,
        o.keys,
        if o.erasure_coded {
            format!(" (e/ in an {EC_CLASS} bucket)")
        } else {
            String::new()
        },
        o.duration,
        o.faults
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let disk = disk_mount.lock().unwrap_or_else(|p| p.into_inner()).take();
    let res = run_on(&mut c, &links, disk.as_ref(), &o).await;
    // Every process goes, paused ones too (SIGTERM waits for SIGCONT).
    for n in &c.nodes {
        signal(n.pid, rustix::process::Signal::CONT);
    }
    // The nodes stop first, then the disk node's tmpfs is unmounted.
    let stop = move |c: Cluster, disk: Option<Tmpfs>| {
        tokio::task::spawn_blocking(move || {
            drop(c);
            drop(disk);
        })
    };
    match res {
        Ok(true) => {
            let path = c.dir.path().to_path_buf();
            stop(c, disk).await?;
            // What the mount point kept of the cluster's directory.
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&path)).await;
            Ok(())
        }
        Ok(false) => {
            let dir = std::mem::replace(&mut c.dir, tempfile::tempdir()?).keep();
            stop(c, disk).await?;
            bail!(
                "the run failed its checks; history in {}, the nodes' logs in {}",
                o.history.display(),
                dir.display()
            )
        }
        Err(e) => {
            let dir = std::mem::replace(&mut c.dir, tempfile::tempdir()?).keep();
            stop(c, disk).await?;
            Err(e.context(format!("the nodes' logs are kept in {}", dir.display())))
        }
    }
}

/// libfaketime's preload library: CAIRN_LIBFAKETIME, or where Debian and a
/// source install put it.
fn libfaketime() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CAIRN_LIBFAKETIME") {
        return Some(PathBuf::from(p));
    }
    let arch = std::env::consts::ARCH;
    [
        format!("/usr/lib/{arch}-linux-gnu/faketime/libfaketime.so.1"),
        "/usr/lib/faketime/libfaketime.so.1".into(),
        "/usr/local/lib/faketime/libfaketime.so.1".into(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// The port of node `i`'s RPC proxy (the one it advertises): after the nodes'
/// own 3 ports each.
fn proxy_port(base: u16, nodes: usize, i: usize) -> usize {
    base as usize + 3 * nodes + i
}

/// Sets node `i`'s clock to the real one plus `offset_s` seconds (its
/// libfaketime file, written whole).
fn set_clock(dir: &Path, i: usize, offset_s: i64) -> Result<()> {
    let path = dir.join(format!("clock{i}"));
    let tmp = dir.join(format!("clock{i}.tmp"));
    std::fs::write(&tmp, format!("{offset_s:+}\n"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("setting the clock in {}", path.display()))
}

/// Node `i`'s clock against this process's, in seconds, from its status.
async fn clock_skew(c: &Cluster, i: usize) -> Option<f64> {
    let before = cairn_types::now_millis();
    let st = local_cluster::status(&c.nodes[i].admin).await?;
    let after = cairn_types::now_millis();
    let theirs = st["clock_ms"].as_i64()?;
    Some((theirs - (before + after) / 2) as f64 / 1000.0)
}

/// The run itself; whether every check passed.
async fn run_on(
    c: &mut Cluster,
    links: &Links,
    disk: Option<&Tmpfs>,
    o: &ChaosOptions,
) -> Result<bool> {
    let signer = Arc::new(Signer {
        access_key: c.access_key.clone(),
        secret_key: c.secret_key.clone(),
        region: "us-east-1".into(),
    });
    let endpoints: Vec<String> = c.nodes.iter().map(|n| n.s3.clone()).collect();
    // Which nodes the clients use: all but one removed from the cluster (a node
    // added in its place comes back on the same ports).
    let serving: Arc<Vec<AtomicBool>> =
        Arc::new((0..c.nodes.len()).map(|_| AtomicBool::new(true)).collect());
    // A connection to every node, by node index.
    let conns = || {
        endpoints
            .iter()
            .map(|e| conn_to(e))
            .collect::<Result<Vec<Conn>>>()
    };
    create_bucket(&endpoints[0], &signer, BUCKET).await?;
    if o.erasure_coded {
        create_bucket(&endpoints[0], &signer, EC_BUCKET).await?;
        set_ec_class(c).await?;
    }
    let leader = local_cluster::settled_leader(c).await?;
    let term_before = term_of(c, leader).await;

    let started = Instant::now();
    let keys = keys(o.keys);
    let ops: Arc<Mutex<Vec<Op>>> = Arc::default();
    let next_id = Arc::new(AtomicU64::new(0));
    let next_value = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for client in 0..o.clients {
        let w = Worker {
            ec: o.erasure_coded,
            client: client as u32,
            signer: signer.clone(),
            keys: keys.clone(),
            ops: ops.clone(),
            next_id: next_id.clone(),
            next_value: next_value.clone(),
            started,
            timeout: o.request_timeout,
        };
        let (stop, seed, conns, serving) = (
            stop.clone(),
            o.seed.wrapping_add(1 + client as u64),
            conns()?,
            serving.clone(),
        );
        clients.push(tokio::spawn(async move {
            w.run(conns, &serving, stop, seed).await
        }));
    }

    let mut faults = Vec::new();
    let mut change = None;
    let res = nemesis(
        c,
        links,
        disk,
        o,
        started,
        &serving,
        &mut faults,
        &mut change,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for cl in clients {
        cl.await?;
    }
    res?;
    // Heal whatever is still broken.
    let now_us = started.elapsed().as_micros() as u64;
    for f in faults.iter_mut().filter(|f| f.to_us == u64::MAX) {
        heal(c, links, disk, f).await?;
        f.to_us = now_us;
    }
    // A membership change under way is seen through.
    if let Some(mut ch) = change {
        let deadline = Instant::now() + MEMBER_CHANGE_TIMEOUT;
        // Asked through the others: a node being added knows only itself at first.
        let all: Vec<usize> = (0..c.nodes.len())
            .filter(|&i| !c.nodes[i].gone && i != ch.node)
            .collect();
        while Instant::now() < deadline {
            if drive_change(c, &mut ch, &all, &serving).await? {
                if let Some(m) = faults[ch.fault].member.as_mut() {
                    m.done_us = Some(started.elapsed().as_micros() as u64);
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let settling = Instant::now();
    let leader = local_cluster::settled_leader(c)
        .await
        .context("after healing every fault")?;
    let settle = settling.elapsed();
    let elections = match (term_before, term_of(c, leader).await) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };

    // Every key read through every node.
    let fin = Worker {
        ec: o.erasure_coded,
        client: u32::MAX,
        signer: signer.clone(),
        keys: keys.clone(),
        ops: ops.clone(),
        next_id: next_id.clone(),
        next_value,
        started,
        timeout: o.request_timeout,
    };
    fin.final_reads(conns()?, &serving).await;

    // Scrub on every node (bad copies found and replaced), then check 4.
    let scrub = scrub_all(c).await;
    let mut ops_now = ops.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ops_now.sort_by_key(|op| (op.invoked_us, op.id));
    let redundancy = redundancy(c, &ops_now, scrub, o.erasure_coded).await;
    for f in faults.iter_mut().filter(|f| f.kind == FaultKind::Corrupt) {
        if let (Some(b), false) = (&f.block, c.nodes[f.node].gone) {
            let (dir, b) = (data_dir(c, f.node), b.clone());
            f.repaired = tokio::task::spawn_blocking(move || copy_state(&dir, &b) != Some(false))
                .await
                .ok();
        }
    }

    let mut ops = std::mem::take(&mut *ops.lock().unwrap_or_else(|p| p.into_inner()));
    ops.sort_by_key(|op| (op.invoked_us, op.id));
    let info = RunInfo {
        seed: o.seed,
        nodes: o.nodes,
        zones: o.zones,
        clients: o.clients,
        faults_enabled: o.faults.clone(),
        faults,
        min_acked: o.min_acked,
        settle_ms: settle.as_millis() as u64,
        elections,
        redundancy: Some(redundancy),
    };
    let h = History {
        header: Header {
            format: history::FORMAT,
            bucket: BUCKET.into(),
            keys,
            run: serde_json::to_value(&info)?,
        },
        ops,
    };
    // Writing the file and the search are long and blocking: off the reactor's
    // other tasks.
    tokio::task::block_in_place(|| {
        save(&h, &o.history)?;
        println!("history saved in {}", o.history.display());
        Ok(verdict(&h))
    })
}

/// Node `i`'s data directory (from its command line).
fn data_dir(c: &Cluster, i: usize) -> PathBuf {
    let argv = &c.nodes[i].argv;
    argv.iter()
        .position(|a| a == "--data-dir")
        .and_then(|p| argv.get(p + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| c.dir.path().join(format!("node{i}")))
}

/// The file of block `hex` in a data directory, or of a shard (`hex.s/k+m.i`).
fn block_file(dir: &Path, name: &str) -> PathBuf {
    dir.join("blocks").join(&name[..2]).join(name)
}

/// The start of the names of `EC_CLASS`'s shard files (`3+2.`), and its shard count.
const EC_SHARD_PREFIX: &str = "3+2.";
fn ec_shards() -> usize {
    5
}

/// Flips one byte of the payload of a block file in `dir` chosen by `pick` (its
/// size kept); the block's address, or `None` when there is no block file.
fn flip_random_block(dir: &Path, pick: u64) -> std::io::Result<Option<String>> {
    for g in 0..256u64 {
        let group = dir.join("blocks").join(format!("{:02x}", (pick + g) % 256));
        // Block files, and the shard files in the blocks' shard directories.
        let mut names: Vec<String> = Vec::new();
        let Ok(rd) = std::fs::read_dir(&group) else {
            continue;
        };
        for name in rd.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
            if name.len() == 64 {
                names.push(name);
            } else if name.len() == 66 && name.ends_with(".s") {
                let shards = std::fs::read_dir(group.join(&name)).into_iter().flatten();
                for f in shards.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
                    names.push(format!("{name}/{f}"));
                }
            }
        }
        if names.is_empty() {
            continue;
        }
        names.sort();
        let name = names.swap_remove((pick as usize / 256) % names.len());
        let path = group.join(&name);
        let mut bytes = std::fs::read(&path)?;
        let header = if name.contains(".s/") { 56 } else { 16 };
        if bytes.len() <= header {
            continue;
        }
        let at = header + (pick as usize) % (bytes.len() - header);
        bytes[at] ^= 0x20;
        std::fs::write(&path, &bytes)?;
        return Ok(Some(name));
    }
    Ok(None)
}

/// Whether the copy of block `hex` (or the shard `hex.s/k+m.i`) in `dir` is good
/// (`None`: there is none). A shard is checked against the BLAKE3 in its header.
fn copy_state(dir: &Path, name: &str) -> Option<bool> {
    let bytes = std::fs::read(block_file(dir, name)).ok()?;
    if name.contains(".s/") {
        return Some(
            bytes.len() >= 56 && blake3::hash(&bytes[56..]).as_bytes()[..] == bytes[16..48],
        );
    }
    Some(bytes.len() >= 16 && blake3::hash(&bytes[16..]).to_hex().as_str() == name)
}

/// What a scrub of every node found, summed.
#[derive(Default)]
struct ScrubSums {
    checked: u64,
    corrupt: u64,
    repaired: u64,
    unrepairable: u64,
    unfinished: bool,
}

/// Starts a scrub pass on every node (through a node in the cluster) and waits
/// until each has ended one.
async fn scrub_all(c: &Cluster) -> ScrubSums {
    use crate::admin_cli::request;
    let Some(via) = (0..c.nodes.len()).find(|&i| !c.nodes[i].gone) else {
        return ScrubSums::default();
    };
    let admin = c.nodes[via].admin.clone();
    let passes = |v: &serde_json::Value| -> Vec<(String, u64, bool)> {
        v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                (
                    n["node"].as_str().unwrap_or_default().to_string(),
                    n["passes"].as_u64().unwrap_or(0),
                    n["running"].as_bool().unwrap_or(true),
                )
            })
            .collect()
    };
    let before = match request(&admin, http::Method::GET, "/v1/cluster/scrub", None, None).await {
        Ok((st, v)) if st.is_success() => passes(&v),
        _ => {
            return ScrubSums {
                unfinished: true,
                ..ScrubSums::default()
            };
        }
    };
    let started = request(
        &admin,
        http::Method::POST,
        "/v1/cluster/scrub/start",
        Some(&c.admin_token),
        Some(serde_json::json!({})),
    )
    .await;
    if !matches!(started, Ok((st, _)) if st.is_success()) {
        return ScrubSums {
            unfinished: true,
            ..ScrubSums::default()
        };
    }
    let deadline = Instant::now() + REDUNDANCY_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok((st, v)) = request(&admin, http::Method::GET, "/v1/cluster/scrub", None, None).await
        else {
            continue;
        };
        if !st.is_success() {
            continue;
        }
        let now = passes(&v);
        let done = now.iter().all(|(id, p, running)| {
            !running && before.iter().find(|b| &b.0 == id).is_none_or(|b| *p > b.1)
        });
        if done || Instant::now() > deadline {
            let mut sums = ScrubSums {
                unfinished: !done,
                ..ScrubSums::default()
            };
            for n in v["nodes"].as_array().into_iter().flatten() {
                let f = |k: &str| n[k].as_u64().unwrap_or(0);
                sums.checked += f("blocks_checked");
                sums.corrupt += f("corrupt");
                sums.repaired += f("repaired");
                sums.unrepairable += f("unrepairable");
            }
            return sums;
        }
    }
}

/// Check 4: the block of each key's last value (as the final reads found it)
/// has its full count of good copies on the disks of the nodes in the cluster,
/// waiting up to `REDUNDANCY_WAIT` for repair and the mover to get there.
async fn redundancy(c: &Cluster, ops: &[Op], scrub: ScrubSums, ec: bool) -> Redundancy {
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for op in ops.iter().filter(|o| o.client == u32::MAX) {
        if let Outcome::Found { value } = op.outcome {
            last.insert(op.key.clone(), value);
        }
    }
    // Values above the inline limit (8 KiB) are one block each.
    let blocks: Vec<(String, String)> = last
        .into_iter()
        .filter(|(_, v)| history::size_of(*v) > 8 << 10)
        .map(|(k, v)| (k, blake3::hash(&history::body_of(v)).to_hex().to_string()))
        .collect();
    let mut copies_wanted = 3;
    for i in (0..c.nodes.len()).filter(|&i| !c.nodes[i].gone) {
        if let Some(st) = local_cluster::status(&c.nodes[i].admin).await
            && let Some(n) = st["layout"]["copies"].as_u64()
        {
            copies_wanted = n as usize;
            break;
        }
    }
    let dirs: Vec<PathBuf> = (0..c.nodes.len())
        .filter(|&i| !c.nodes[i].gone)
        .map(|i| data_dir(c, i))
        .collect();
    let started = Instant::now();
    let shards_wanted = if ec { ec_shards() } else { 0 };
    let short = loop {
        let (dirs, blocks) = (dirs.clone(), blocks.clone());
        let short: Vec<(String, String, usize)> = tokio::task::spawn_blocking(move || {
            blocks
                .iter()
                .filter_map(|(k, h)| {
                    let (n, wanted) = if shards_wanted > 0 && k.starts_with("e/") {
                        let n = (0..shards_wanted)
                            .filter(|i| {
                                let name = format!("{h}.s/{EC_SHARD_PREFIX}{i}");
                                dirs.iter().any(|d| copy_state(d, &name) == Some(true))
                            })
                            .count();
                        (n, shards_wanted)
                    } else {
                        let n = dirs
                            .iter()
                            .filter(|d| copy_state(d, h) == Some(true))
                            .count();
                        (n, copies_wanted)
                    };
                    (n < wanted).then(|| (k.clone(), h.clone(), n))
                })
                .collect()
        })
        .await
        .unwrap_or_default();
        if short.is_empty() || started.elapsed() > REDUNDANCY_WAIT {
            break short;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    Redundancy {
        copies_wanted,
        shards_wanted,
        blocks: blocks.len(),
        ec_blocks: blocks
            .iter()
            .filter(|(k, _)| shards_wanted > 0 && k.starts_with("e/"))
            .count(),
        short,
        waited_ms: started.elapsed().as_millis() as u64,
        scrub_checked: scrub.checked,
        scrub_corrupt: scrub.corrupt,
        scrub_repaired: scrub.repaired,
        scrub_unrepairable: scrub.unrepairable,
        scrub_unfinished: scrub.unfinished,
    }
}

/// Current Raft term as node `i` reports it./// Current Raft term as node `i` reports it.
async fn term_of(c: &Cluster, i: usize) -> Option<u64> {
    local_cluster::status(&c.nodes[i].admin).await?["term"].as_u64()
}

/// Makes `EC_BUCKET` erasure-coded (`EC_CLASS`), through the first node.
async fn set_ec_class(c: &Cluster) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let res = crate::admin_cli::request(
            &c.nodes[0].admin,
            http::Method::POST,
            "/v1/cluster/bucket-class",
            Some(&c.admin_token),
            Some(serde_json::json!({ "bucket": EC_BUCKET, "class": EC_CLASS })),
        )
        .await;
        match res {
            Ok((st, _)) if st.is_success() => return Ok(()),
            Ok((st, v)) if st == StatusCode::BAD_REQUEST => {
                bail!("the cluster refused {EC_CLASS} for {EC_BUCKET}: {v}")
            }
            Ok((st, v)) if Instant::now() > deadline => {
                bail!("setting the class of {EC_BUCKET} failed: HTTP {st} {v}")
            }
            Err(e) if Instant::now() > deadline => return Err(e),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn create_bucket(endpoint: &str, signer: &Signer, bucket: &str) -> Result<()> {
    let mut conn = conn_to(endpoint)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match s3(
            &mut conn,
            signer,
            "PUT",
            &format!("/{bucket}"),
            "",
            &[],
            None,
        )
        .await
        {
            Ok((st, _)) if st.is_success() || st == StatusCode::CONFLICT => return Ok(()),
            Ok((st, body)) if Instant::now() > deadline => {
                bail!(
                    "creating the bucket failed: HTTP {st} {}",
                    String::from_utf8_lossy(&body)
                )
            }
            Err(e) if Instant::now() > deadline => return Err(e.context("creating the bucket")),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn save(h: &History, path: &Path) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    h.write_to(std::io::BufWriter::new(f))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A request to send.
struct S3Request<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    extra: &'a [(&'a str, &'a str)],
    body: Option<Bytes>,
}

/// How one request ended.
enum Answer {
    /// An HTTP answer.
    Status(StatusCode, Bytes),
    /// Not sent: no connection could be made (changed nothing).
    NotSent(String),
    /// Sent, and then no answer: it may or may not have taken effect.
    Lost(String),
}

/// One S3 request, given up after `timeout`.
async fn send(conn: &mut Conn, signer: &Signer, timeout: Duration, req: S3Request<'_>) -> Answer {
    let S3Request {
        method,
        path,
        query,
        extra,
        body,
    } = req;
    // The connection first: refused means the request never left.
    let ready = tokio::time::timeout(timeout, conn.sender()).await;
    match ready {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            conn.sender = None;
            return Answer::NotSent(format!("{e:#}"));
        }
        Err(_) => {
            conn.sender = None;
            return Answer::NotSent("no connection within the timeout".into());
        }
    }
    match tokio::time::timeout(timeout, s3(conn, signer, method, path, query, extra, body)).await {
        Ok(Ok((st, b))) => Answer::Status(st, b),
        Ok(Err(e)) => {
            conn.sender = None;
            Answer::Lost(format!("{e:#}"))
        }
        Err(_) => {
            conn.sender = None;
            Answer::Lost(format!("no answer within {timeout:?}"))
        }
    }
}

/// Sends a signed request on `conn`; returns the status and body.
async fn s3(
    conn: &mut Conn,
    signer: &Signer,
    method: &str,
    path: &str,
    query: &str,
    extra: &[(&str, &str)],
    body: Option<Bytes>,
) -> Result<(StatusCode, Bytes)> {
    let uri = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    let host = conn.host().to_string();
    let mut b = Request::builder()
        .method(method)
        .uri(&uri)
        .header("host", &host);
    for (k, v) in signer.sign(method, &host, path, query, time::OffsetDateTime::now_utc()) {
        b = b.header(k, v);
    }
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let body: Body = match body {
        Some(bytes) => {
            b = b.header("content-length", bytes.len().to_string());
            Full::new(bytes).map_err(|never| match never {}).boxed()
        }
        None => Empty::new().map_err(|never| match never {}).boxed(),
    };
    let resp = conn.sender().await?.send_request(b.body(body)?).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame?.into_data() {
            if out.len() + d.len() > MAX_BODY {
                bail!("a response body over {MAX_BODY} bytes");
            }
            out.extend_from_slice(&d);
        }
    }
    Ok((status, Bytes::from(out)))
}

/// The `<Code>` of an S3 error body.
fn error_code(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.split_once("<Code>")
        .and_then(|(_, rest)| rest.split_once("</Code>"))
        .map(|(code, _)| code.to_string())
        .unwrap_or_default()
}

/// The keys of a ListObjectsV2 answer, and whether it was cut short.
fn listed_keys(body: &[u8]) -> (Vec<String>, bool) {
    let text = String::from_utf8_lossy(body);
    let mut keys = Vec::new();
    let mut rest = text.as_ref();
    while let Some((_, after)) = rest.split_once("<Key>") {
        match after.split_once("</Key>") {
            Some((k, more)) => {
                keys.push(k.to_string());
                rest = more;
            }
            None => break,
        }
    }
    (keys, text.contains("<IsTruncated>true</IsTruncated>"))
}

/// One client: a loop of random operations, each recorded.
struct Worker {
    /// The `e/` keys are in the erasure-coded bucket.
    ec: bool,
    client: u32,
    signer: Arc<Signer>,
    keys: Vec<String>,
    ops: Arc<Mutex<Vec<Op>>>,
    next_id: Arc<AtomicU64>,
    next_value: Arc<AtomicU64>,
    started: Instant,
    timeout: Duration,
}

impl Worker {
    async fn run(
        self,
        mut conns: Vec<Conn>,
        serving: &[AtomicBool],
        stop: Arc<AtomicBool>,
        seed: u64,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        while !stop.load(Ordering::Relaxed) {
            let live: Vec<usize> = (0..conns.len())
                .filter(|&i| serving[i].load(Ordering::Relaxed))
                .collect();
            let Some(&node) = live.get(rng.random_range(0..live.len().max(1))) else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let roll = rng.random_range(0..100u32);
            let key = if roll >= 90 {
                ["", "a/", "b/", "e/"][rng.random_range(0..4)].to_string()
            } else {
                self.keys[rng.random_range(0..self.keys.len())].clone()
            };
            // The erasure-coded bucket's values are all in blocks.
            let value = || self.value(bucket_of(&key, self.ec) == EC_BUCKET);
            let call = match roll {
                0..30 => Call::Put { value: value() },
                30..40 => Call::PutIfAbsent { value: value() },
                40..50 => Call::Delete,
                50..90 => Call::Get,
                _ => Call::List,
            };
            let sent = self.one(&mut conns[node], node, call, key).await;
            if !sent {
                // A node that is down refuses at once: no spinning on it.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// A value not written before; with `in_blocks`, one above the inline size.
    fn value(&self, in_blocks: bool) -> u64 {
        loop {
            let v = self.next_value.fetch_add(1, Ordering::Relaxed);
            if !in_blocks || history::size_of(v) > 8 << 10 {
                return v;
            }
        }
    }

    /// Reads every key through every node (after the cluster settled).
    async fn final_reads(&self, mut conns: Vec<Conn>, serving: &[AtomicBool]) {
        for key in &self.keys {
            for (node, conn) in conns.iter_mut().enumerate() {
                if !serving[node].load(Ordering::Relaxed) {
                    continue;
                }
                self.one(conn, node, Call::Get, key.clone()).await;
            }
        }
    }

    /// What an answer means for `call`, and whether the request was sent.
    fn outcome(&self, call: &Call, answer: Answer) -> (Outcome, bool) {
        match answer {
            Answer::NotSent(e) => (
                Outcome::Refused {
                    status: 0,
                    code: format!("not sent: {e}"),
                },
                false,
            ),
            Answer::Lost(error) => (Outcome::Unknown { error }, true),
            Answer::Status(st, body) => (outcome_of(call, st, &body), true),
        }
    }

    /// Runs one operation and records it; whether it was sent.
    async fn one(&self, conn: &mut Conn, node: usize, call: Call, key: String) -> bool {
        let path = format!("/{}/{key}", bucket_of(&key, self.ec));
        let invoked = self.started.elapsed();
        let bucket = format!("/{}", bucket_of(&key, self.ec));
        let query = format!("list-type=2&prefix={}", key.replace('/', "%2F"));
        let body = |v: u64| Some(Bytes::from(history::body_of(v)));
        let (method, path, query, extra, body): (_, &str, &str, &[(&str, &str)], _) = match &call {
            Call::Put { value } => ("PUT", &path, "", &[], body(*value)),
            Call::PutIfAbsent { value } => {
                ("PUT", &path, "", &[("if-none-match", "*")], body(*value))
            }
            Call::Delete => ("DELETE", &path, "", &[], None),
            Call::Get => ("GET", &path, "", &[], None),
            Call::List => ("GET", &bucket, &query, &[], None),
        };
        let req = S3Request {
            method,
            path,
            query,
            extra,
            body,
        };
        let answer = send(conn, &self.signer, self.timeout, req).await;
        let (mut outcome, sent) = self.outcome(&call, answer);
        // A LIST of every key lists the erasure-coded bucket too: each key is seen
        // at one moment within the operation, as the check wants.
        if let (Call::List, true, true, Outcome::Listed { keys }) =
            (&call, key.is_empty(), self.ec, &outcome)
        {
            let req = S3Request {
                method: "GET",
                path: &format!("/{EC_BUCKET}"),
                query: "list-type=2&prefix=",
                extra: &[],
                body: None,
            };
            let answer = send(conn, &self.signer, self.timeout, req).await;
            let mut keys = keys.clone();
            outcome = match self.outcome(&call, answer).0 {
                Outcome::Listed { keys: more } => {
                    keys.extend(more);
                    Outcome::Listed { keys }
                }
                // Not sent: the first half was, so the whole may not be retried.
                Outcome::Refused { status: 0, code } => Outcome::Refused { status: 503, code },
                other => other,
            };
        }
        let completed = self.started.elapsed();
        let op = Op {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            client: self.client,
            node: node as u32,
            key,
            call,
            invoked_us: invoked.as_micros() as u64,
            completed_us: completed.as_micros() as u64,
            outcome,
        };
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
        sent
    }
}

/// What an HTTP answer means for the operation.
fn outcome_of(call: &Call, st: StatusCode, body: &[u8]) -> Outcome {
    if st.is_server_error() {
        // 503 after a write was proposed: it may still commit.
        return Outcome::Unknown {
            error: format!("HTTP {} {}", st.as_u16(), error_code(body)),
        };
    }
    match (call, st.as_u16()) {
        (Call::Get, 200) => match history::value_of(body) {
            Ok(value) => Outcome::Found { value },
            Err(detail) => Outcome::Corrupt { detail },
        },
        (Call::Get, 404) if error_code(body) == "NoSuchKey" => Outcome::NotFound,
        (Call::List, 200) => match listed_keys(body) {
            (keys, false) => Outcome::Listed { keys },
            (_, true) => Outcome::Refused {
                status: 200,
                code: "listing cut short".into(),
            },
        },
        (Call::Put { .. } | Call::PutIfAbsent { .. }, 200) | (Call::Delete, 204 | 200) => {
            Outcome::Ok
        }
        (Call::PutIfAbsent { .. }, 412) => Outcome::PreconditionFailed,
        (_, status) => Outcome::Refused {
            status,
            code: error_code(body),
        },
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Ends a fault.
async fn heal(c: &mut Cluster, links: &Links, disk: Option<&Tmpfs>, f: &mut Fault) -> Result<()> {
    match f.kind {
        FaultKind::Disk => {
            let ok = disk.is_some_and(|d| tokio::task::block_in_place(|| d.resize(DISK_SIZE)));
            if !ok {
                bail!(
                    "the disk of node {} could not be given its space back",
                    f.node
                );
            }
            Ok(())
        }
        FaultKind::Clock => {
            f.observed_skew_s = clock_skew(c, f.node).await;
            tokio::task::block_in_place(|| set_clock(c.dir.path(), f.node, 0))
        }
        FaultKind::Kill | FaultKind::Member => {
            tokio::task::block_in_place(|| local_cluster::restart(c, f.node))
        }
        FaultKind::Pause => {
            signal(c.nodes[f.node].pid, rustix::process::Signal::CONT);
            Ok(())
        }
        // A flipped byte stays until read repair or scrub replaces the copy.
        FaultKind::Corrupt => Ok(()),
        FaultKind::Partition | FaultKind::Slow => {
            for &(a, b) in &f.links {
                links.set(a, b, None);
            }
            Ok(())
        }
    }
}

/// The leader as the first node that answers sees it.
async fn leader_of(c: &Cluster, among: &[usize]) -> Option<usize> {
    for &i in among {
        if let Some(s) = local_cluster::status(&c.nodes[i].admin).await
            && let Some(l) = s["leader"].as_str()
        {
            return c.nodes.iter().position(|n| n.id == l);
        }
    }
    None
}

/// Injects faults until the run's time is up, into `faults` (those still active
/// with `to_us == u64::MAX`); a membership change still under way is left in
/// `change`.
#[allow(clippy::too_many_arguments)]
async fn nemesis(
    c: &mut Cluster,
    links: &Links,
    disk: Option<&Tmpfs>,
    o: &ChaosOptions,
    started: Instant,
    serving: &[AtomicBool],
    faults: &mut Vec<Fault>,
    change: &mut Option<Change>,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(o.seed);
    // Faults under way: index in `faults`, when it ends.
    let mut active: Vec<(usize, Instant)> = Vec::new();
    let gap = |rng: &mut StdRng| {
        let mean = o.fault_interval.as_secs_f64();
        Duration::from_secs_f64(rng.random_range(mean * 0.5..=mean * 1.5))
    };
    let mut next_fault = Instant::now() + gap(&mut rng);
    let end = started + o.duration;
    let n = c.nodes.len();
    let mut kinds: Vec<FaultKind> = Vec::new();
    let mut disk_checked = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        if now.duration_since(disk_checked) > Duration::from_secs(1) {
            disk_checked = now;
            let dir = c.dir.path().to_path_buf();
            let free = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&dir))
                .await
                .ok()
                .and_then(|r| r.ok())
                .map_or(u64::MAX, |s| s.f_bavail.saturating_mul(s.f_frsize));
            if free < MIN_FREE_DISK {
                println!(
                    "{:>7.1}s  stopping early: {} MiB left on the disk of {}",
                    started.elapsed().as_secs_f64(),
                    free >> 20,
                    c.dir.path().display()
                );
                break;
            }
        }
        // Heal what is due.
        let mut k = 0;
        while k < active.len() {
            let (fi, until) = active[k];
            if until <= now {
                active.swap_remove(k);
                heal(c, links, disk, &mut faults[fi]).await?;
                faults[fi].to_us = started.elapsed().as_micros() as u64;
            } else {
                k += 1;
            }
        }
        // A membership change under way: looked at, finished when complete.
        if let Some(ch) = change.as_mut() {
            let up: Vec<usize> = (0..n)
                .filter(|&i| !c.nodes[i].gone && i != ch.node)
                .filter(|i| !active.iter().any(|&(fi, _)| faults[fi].nodes().contains(i)))
                .collect();
            if drive_change(c, ch, &up, serving).await? {
                if let Some(m) = faults[ch.fault].member.as_mut() {
                    m.done_us = Some(started.elapsed().as_micros() as u64);
                }
                println!(
                    "{:>7.1}s  node {} {}",
                    started.elapsed().as_secs_f64(),
                    ch.node,
                    if ch.add {
                        "added"
                    } else {
                        "removed, and stopped"
                    }
                );
                *change = None;
            }
        }
        // Faulty: hit by a fault, in a membership change, or out of the cluster.
        let mut faulty: Vec<usize> = active
            .iter()
            .flat_map(|&(fi, _)| faults[fi].nodes())
            .collect();
        faulty.extend(change.as_ref().map(|ch| ch.node));
        faulty.extend((0..n).filter(|&i| c.nodes[i].gone));
        faulty.sort_unstable();
        faulty.dedup();
        let room = o.max_faulty.saturating_sub(faulty.len());
        if now < next_fault || room == 0 || o.faults.is_empty() {
            continue;
        }
        next_fault = now + gap(&mut rng);
        // Kinds come in rounds, each a shuffle of all of them: every kind happens
        // early in a run, and all about as often.
        if kinds.is_empty() {
            kinds = o.faults.clone();
            kinds.shuffle(&mut rng);
        }
        let Some(kind) = kinds.pop() else {
            continue;
        };
        let healthy: Vec<usize> = (0..n).filter(|i| !faulty.contains(i)).collect();
        let leader = leader_of(c, &healthy).await;
        // The node on its own tmpfs stays in the cluster, for the disk faults.
        let removable: Vec<usize> = healthy
            .iter()
            .copied()
            .filter(|&i| disk.is_none() || i != disk_node(n))
            .collect();
        if kind == FaultKind::Disk {
            let target = disk_node(n);
            let ok = healthy.contains(&target)
                && disk.is_some_and(|d| tokio::task::block_in_place(|| d.fill()));
            if !ok {
                kinds.insert(0, kind);
                continue;
            }
            let length = o.fault_length.mul_f64(rng.random_range(1.0..2.0));
            println!(
                "{:>7.1}s  disk of node {target} full{} for {:.1}s",
                started.elapsed().as_secs_f64(),
                if leader == Some(target) {
                    " (leader)"
                } else {
                    ""
                },
                length.as_secs_f64()
            );
            active.push((faults.len(), Instant::now() + length));
            faults.push(Fault::new(
                kind,
                target,
                leader == Some(target),
                started.elapsed().as_micros() as u64,
            ));
            continue;
        }
        if kind == FaultKind::Member {
            // One change at a time, under a leader that can be killed; a removal
            // needs room for two faulty nodes (the leader and the one leaving).
            let gone = (0..n).find(|&i| c.nodes[i].gone);
            let need = if gone.is_some() { 1 } else { 2 };
            let ready = change.is_none()
                && room >= need
                && leader.is_some_and(|l| healthy.contains(&l))
                && healthy.len() >= 3;
            match (ready, leader) {
                (true, Some(l)) => {
                    let (fault, mut ch) =
                        member_fault(c, links, &mut rng, l, gone, &removable, started).await?;
                    let length = o.fault_length.mul_f64(rng.random_range(1.0..2.0));
                    println!(
                        "{:>7.1}s  member: {} node {} with the leader (node {l}) killed, for {:.1}s",
                        started.elapsed().as_secs_f64(),
                        if ch.add { "adding" } else { "removing" },
                        ch.node,
                        length.as_secs_f64()
                    );
                    ch.fault = faults.len();
                    *change = Some(ch);
                    active.push((faults.len(), Instant::now() + length));
                    faults.push(fault);
                }
                // Later, after the other kinds.
                _ => kinds.insert(0, kind),
            }
            continue;
        }
        if kind == FaultKind::Corrupt {
            // A block file of a healthy node; none yet (early in a run): later.
            let target = healthy[rng.random_range(0..healthy.len())];
            let (dir, pick) = (data_dir(c, target), rng.random::<u64>());
            let flipped = tokio::task::spawn_blocking(move || flip_random_block(&dir, pick))
                .await?
                .unwrap_or(None);
            let Some(block) = flipped else {
                kinds.insert(0, kind);
                continue;
            };
            let what = match block.split_once(".s/") {
                Some((h, shard)) => format!("shard {shard} of block {}", &h[..16]),
                None => format!("block {}", &block[..16]),
            };
            println!(
                "{:>7.1}s  corrupt node {target}: a byte of {what} flipped",
                started.elapsed().as_secs_f64(),
            );
            let at = started.elapsed().as_micros() as u64;
            let mut fault = Fault::new(kind, target, leader == Some(target), at);
            fault.detail = what;
            fault.block = Some(block);
            fault.to_us = at;
            faults.push(fault);
            continue;
        }
        // The first kill goes to the leader (a run must kill one); later faults
        // hit it a third of the time.
        let leader_killed = faults.iter().any(|f| f.kind == FaultKind::Kill && f.leader);
        let first_kill = kind == FaultKind::Kill && !leader_killed;
        let target = match leader {
            Some(l) if healthy.contains(&l) && (first_kill || rng.random_range(0..3) == 0) => l,
            _ => healthy[rng.random_range(0..healthy.len())],
        };
        let mut fault = Fault::new(kind, target, leader == Some(target), 0);
        match kind {
            FaultKind::Kill => {
                let pid = c.nodes[target].pid;
                tokio::task::spawn_blocking(move || local_cluster::kill9(pid)).await??
            }
            FaultKind::Pause => signal(c.nodes[target].pid, rustix::process::Signal::STOP),
            FaultKind::Partition => {
                // A minority side (the target and maybe more), cut from the rest.
                let size = rng.random_range(1..=room.min((n - 1) / 2).max(1));
                let mut side = vec![target];
                let mut others: Vec<usize> =
                    healthy.iter().copied().filter(|&i| i != target).collect();
                while side.len() < size && !others.is_empty() {
                    side.push(others.swap_remove(rng.random_range(0..others.len())));
                }
                side.sort_unstable();
                let how = if rng.random_bool(0.5) {
                    Link::Cut
                } else {
                    Link::Stall
                };
                for &a in &side {
                    for b in (0..n).filter(|b| !side.contains(b)) {
                        for (x, y) in [(a, b), (b, a)] {
                            links.set(x, y, Some(how));
                            fault.links.push((x, y));
                        }
                    }
                }
                fault.detail = if how == Link::Cut { "cut" } else { "stall" }.into();
                fault.leader = leader.is_some_and(|l| side.contains(&l));
                fault.group = side;
            }
            FaultKind::Slow => {
                let d = Duration::from_millis(rng.random_range(50..=300));
                for b in (0..n).filter(|&b| b != target) {
                    for (x, y) in [(target, b), (b, target)] {
                        links.set(x, y, Some(Link::Delay(d)));
                        fault.links.push((x, y));
                    }
                }
                fault.detail = format!("{} ms", d.as_millis());
            }
            FaultKind::Clock => {
                // Seconds to minutes (under S3's 15-minute signature window),
                // ahead or behind.
                let size = rng.random_range(2f64.ln()..300f64.ln()).exp().round() as i64;
                let offset = if rng.random_bool(0.5) { size } else { -size };
                tokio::task::block_in_place(|| set_clock(c.dir.path(), target, offset))?;
                fault.skew_s = Some(offset);
                fault.detail = format!("{offset:+} s");
            }
            // Started above.
            FaultKind::Member | FaultKind::Corrupt | FaultKind::Disk => {}
        }
        fault.from_us = started.elapsed().as_micros() as u64;
        let length = o.fault_length.mul_f64(rng.random_range(1.0..2.0));
        println!(
            "{:>7.1}s  {} node{} {}{}{} for {:.1}s",
            started.elapsed().as_secs_f64(),
            kind.name(),
            if fault.group.len() > 1 { "s" } else { "" },
            fault
                .nodes()
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(","),
            if fault.leader { " (leader)" } else { "" },
            if fault.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", fault.detail)
            },
            length.as_secs_f64()
        );
        active.push((faults.len(), Instant::now() + length));
        faults.push(fault);
    }
    Ok(())
}

/// How long a membership change may take to complete after every fault healed.
const MEMBER_CHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// A membership change under way.
struct Change {
    /// Its fault's index in the run's list.
    fault: usize,
    /// The node removed, or added.
    node: usize,
    add: bool,
    /// The node's id.
    id: String,
    /// The request that asked for the change, in flight: whether it was accepted.
    request: Option<tokio::task::JoinHandle<bool>>,
    /// When the request was last sent, the change last looked at.
    sent: Instant,
    polled: Instant,
    /// When it began, and when a slow change was last reported.
    began: Instant,
    told: Option<Instant>,
}

/// A change under way for longer than this is reported (where it stands) each
/// time this much more has passed.
const SLOW_CHANGE: Duration = Duration::from_secs(120);

/// Starts a membership change (node `gone` added again on its ports with a new
/// data directory, or a healthy follower removed) and kills the leader `l` a
/// moment after asking.
async fn member_fault(
    c: &mut Cluster,
    links: &Links,
    rng: &mut StdRng,
    l: usize,
    gone: Option<usize>,
    healthy: &[usize],
    started: Instant,
) -> Result<(Fault, Change)> {
    let (node, add) = match gone {
        Some(i) => {
            // A new node in its place: the same ports (and proxy), a new directory.
            let n = &mut c.nodes[i];
            let generation = started.elapsed().as_millis();
            let mut argv = n.argv.clone();
            if let Some(k) = argv.iter().position(|a| a == "--data-dir")
                && let Some(d) = argv.get_mut(k + 1)
            {
                *d = c
                    .dir
                    .path()
                    .join(format!("node{i}-{generation}"))
                    .display()
                    .to_string();
            }
            n.argv = argv;
            tokio::task::block_in_place(|| local_cluster::restart(c, i))?;
            c.nodes[i].gone = false;
            let deadline = Instant::now() + Duration::from_secs(60);
            let id = loop {
                if let Some(st) = local_cluster::status(&c.nodes[i].admin).await
                    && let Some(id) = st["node"].as_str()
                {
                    break id.to_string();
                }
                if Instant::now() > deadline {
                    bail!("a new node {i} did not start within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if let Ok(raw) = u64::from_str_radix(&id, 16) {
                links.learn(raw, i);
            }
            c.nodes[i].id = id;
            (i, true)
        }
        None => {
            let others: Vec<usize> = healthy.iter().copied().filter(|&i| i != l).collect();
            (others[rng.random_range(0..others.len())], false)
        }
    };
    let mut ch = Change {
        fault: 0,
        node,
        add,
        id: c.nodes[node].id.clone(),
        request: None,
        sent: Instant::now(),
        polled: Instant::now(),
        began: Instant::now(),
        told: None,
    };
    let via: Vec<usize> = healthy
        .iter()
        .copied()
        .filter(|&i| i != l && i != node)
        .collect();
    let via = via[rng.random_range(0..via.len())];
    ch.request = Some(request_change(c, &ch, via));
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
    let pid = c.nodes[l].pid;
    tokio::task::spawn_blocking(move || local_cluster::kill9(pid)).await??;
    let mut fault = Fault::new(
        FaultKind::Member,
        l,
        true,
        started.elapsed().as_micros() as u64,
    );
    fault.detail = format!("{} node {node}", if add { "add" } else { "remove" });
    fault.member = Some(MemberChange {
        node,
        add,
        done_us: None,
    });
    Ok((fault, ch))
}

/// Asks for a change in the background (a removal through node `via`, a join of
/// the new node to `via`); the task says whether it was accepted.
fn request_change(c: &Cluster, ch: &Change, via: usize) -> tokio::task::JoinHandle<bool> {
    let token = c.admin_token.clone();
    let (admin, path, body) = if ch.add {
        // Through `via`'s proxy, as the members know it.
        let member = format!("127.0.0.1:{}", proxy_port(c.base_port, c.nodes.len(), via));
        (
            c.nodes[ch.node].admin.clone(),
            "/v1/cluster/join",
            serde_json::json!({ "member": member }),
        )
    } else {
        (
            c.nodes[via].admin.clone(),
            "/v1/cluster/remove",
            serde_json::json!({ "node": ch.id, "force": false }),
        )
    };
    tokio::spawn(async move {
        let fut =
            crate::admin_cli::request(&admin, http::Method::POST, path, Some(&token), Some(body));
        matches!(
            tokio::time::timeout(Duration::from_secs(90), fut).await,
            Ok(Ok((st, _))) if st.is_success()
        )
    })
}

/// Looks at a membership change (at most twice a second) through the nodes `up`;
/// asks again if the request failed. Whether it is complete: then a removed node
/// is stopped and its directory deleted, an added one serves the clients.
async fn drive_change(
    c: &mut Cluster,
    ch: &mut Change,
    up: &[usize],
    serving: &[AtomicBool],
) -> Result<bool> {
    if ch.polled.elapsed() < Duration::from_millis(500) {
        return Ok(false);
    }
    ch.polled = Instant::now();
    let Some(l) = leader_of(c, up).await else {
        return Ok(false);
    };
    let Some(st) = local_cluster::status(&c.nodes[l].admin).await else {
        return Ok(false);
    };
    let listed = |list: &str| {
        st[list]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m["id"].as_str() == Some(ch.id.as_str())))
    };
    let (member, in_layout) = (listed("members"), listed("nodes"));
    if ch.began.elapsed() > SLOW_CHANGE && ch.told.is_none_or(|t| t.elapsed() > SLOW_CHANGE) {
        ch.told = Some(Instant::now());
        report_slow_change(c, ch, &st, up).await;
    }
    if ch.add && member && in_layout {
        serving[ch.node].store(true, Ordering::Relaxed);
        return Ok(true);
    }
    if !ch.add && !member && !in_layout {
        serving[ch.node].store(false, Ordering::Relaxed);
        let pid = c.nodes[ch.node].pid;
        tokio::task::spawn_blocking(move || local_cluster::stop(pid)).await??;
        c.nodes[ch.node].gone = true;
        let data = c.nodes[ch.node]
            .argv
            .iter()
            .position(|a| a == "--data-dir")
            .and_then(|k| c.nodes[ch.node].argv.get(k + 1))
            .map(PathBuf::from);
        if let Some(d) = data {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(d)).await;
        }
        return Ok(true);
    }
    // Asked again at once when the request failed (the leader died under it,
    // say); an accepted one is left to complete (and asked again only if it
    // has not after 30 s, which changes nothing if it was under way).
    if let Some(h) = ch.request.take_if(|h| h.is_finished()) {
        ch.sent = if h.await.unwrap_or(false) {
            Instant::now() + Duration::from_secs(28)
        } else {
            Instant::now() - Duration::from_secs(2)
        };
    }
    if ch.request.is_none() && ch.sent.elapsed() > Duration::from_secs(2) {
        let via: Vec<usize> = up.iter().copied().filter(|&i| i != ch.node).collect();
        if let Some(&v) = via.get(rand::random_range(0..via.len().max(1))) {
            ch.request = Some(request_change(c, ch, v));
            ch.sent = Instant::now();
        }
    }
    Ok(false)
}

/// Prints where a slow membership change stands: the node in the leader's
/// layout and membership, and each node's mover as it reports itself.
async fn report_slow_change(c: &Cluster, ch: &Change, leader: &serde_json::Value, up: &[usize]) {
    let find = |list: &str| {
        leader[list]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["id"].as_str() == Some(ch.id.as_str())))
            .cloned()
    };
    println!(
        "  change of node {} ({}) under way for {:.0}s: layout {} (version {}), member {}",
        ch.node,
        if ch.add { "addition" } else { "removal" },
        ch.began.elapsed().as_secs_f64(),
        find("nodes").map_or("absent".to_string(), |n| n["state"].to_string()),
        leader["layout"]["version"],
        find("members").map_or("no".to_string(), |m| format!("yes (voter {})", m["voter"])),
    );
    for &i in up.iter().chain(std::iter::once(&ch.node)) {
        let Some(st) = local_cluster::status(&c.nodes[i].admin).await else {
            println!("    node {i}: no status");
            continue;
        };
        let me = st["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["id"] == st["node"]))
            .map(|n| n["rebalance"].clone())
            .unwrap_or_default();
        println!(
            "    node {i}: {} term {} applied {}, mover {}",
            st["raft_state"], st["term"], st["applied_index"], me
        );
    }
}

/// Prints the summary of a history and its verdict; whether every check passed.
pub fn verdict(h: &History) -> bool {
    let info: Option<RunInfo> = serde_json::from_value(h.header.run.clone()).ok();
    let v = cairn_chaos::check(h, Limits::default());
    // Operations by kind and outcome.
    let mut table: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut acked = 0usize;
    for op in &h.ops {
        let kind = match op.call {
            Call::Put { .. } => "put",
            Call::PutIfAbsent { .. } => "put-if-absent",
            Call::Delete => "delete",
            Call::Get => "get",
            Call::List => "list",
        };
        let out = match &op.outcome {
            Outcome::Ok | Outcome::Found { .. } | Outcome::NotFound | Outcome::Listed { .. } => {
                "ok"
            }
            Outcome::PreconditionFailed => "412",
            Outcome::Corrupt { .. } => "corrupt",
            Outcome::Refused { status: 0, .. } => "not sent",
            Outcome::Refused { .. } => "refused",
            Outcome::Unknown { .. } => "unknown",
        };
        if out == "ok" || out == "412" {
            acked += 1;
        }
        *table.entry((kind, out)).or_default() += 1;
    }
    println!("operations: {} ({acked} answered)", h.ops.len());
    for ((kind, out), n) in &table {
        println!("  {kind:<14} {out:<9} {n}");
    }
    let mut ok = v.passed();
    if let Some(info) = &info {
        let mut by_kind: BTreeMap<FaultKind, usize> = BTreeMap::new();
        for f in &info.faults {
            *by_kind.entry(f.kind).or_default() += 1;
        }
        let leader_kills = info
            .faults
            .iter()
            .filter(|f| matches!(f.kind, FaultKind::Kill | FaultKind::Member) && f.leader)
            .count();
        println!(
            "faults: {} ({}); leaders killed: {leader_kills}",
            info.faults.len(),
            by_kind
                .iter()
                .map(|(k, n)| format!("{} {n}", k.name()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "settled {:.1}s after healing; elections during the run: {}",
            info.settle_ms as f64 / 1000.0,
            info.elections
                .map_or("unknown".to_string(), |e| e.to_string())
        );
        for k in &info.faults_enabled {
            if !by_kind.contains_key(k) {
                println!("CHECK FAILED: no {} fault happened", k.name());
                ok = false;
            }
        }
        // A clock fault counts once the node itself showed the skew.
        let clocks: Vec<&Fault> = info
            .faults
            .iter()
            .filter(|f| f.kind == FaultKind::Clock)
            .collect();
        let shown = clocks
            .iter()
            .filter(|f| match (f.skew_s, f.observed_skew_s) {
                (Some(set), Some(seen)) => (set as f64 - seen).abs() < 3.0,
                _ => false,
            })
            .count();
        if !clocks.is_empty() {
            println!(
                "clock faults: {} set, {shown} seen by the node as set",
                clocks.len()
            );
        }
        if info.faults_enabled.contains(&FaultKind::Clock) && shown == 0 {
            println!("CHECK FAILED: no node showed the clock skew set on it");
            ok = false;
        }
        // A membership change must complete, the leader killed under it or not.
        let changes: Vec<(&Fault, &MemberChange)> = info
            .faults
            .iter()
            .filter_map(|f| Some((f, f.member.as_ref()?)))
            .collect();
        if !changes.is_empty() {
            let adds = changes.iter().filter(|(_, m)| m.add).count();
            let slowest = changes
                .iter()
                .filter_map(|(f, m)| Some(m.done_us?.saturating_sub(f.from_us)))
                .max()
                .unwrap_or(0);
            println!(
                "membership changes: {} ({} removals, {adds} additions), the leader killed under each; the slowest took {:.1}s",
                changes.len(),
                changes.len() - adds,
                slowest as f64 / 1e6
            );
        }
        for (f, _) in changes.iter().filter(|(_, m)| m.done_us.is_none()) {
            println!(
                "CHECK FAILED: the change begun at {:.1}s ({}) never completed",
                f.from_us as f64 / 1e6,
                f.detail
            );
            ok = false;
        }
        if (info.faults_enabled.contains(&FaultKind::Kill)
            || info.faults_enabled.contains(&FaultKind::Member))
            && leader_kills == 0
        {
            println!("CHECK FAILED: no leader was killed");
            ok = false;
        }
        // Check 4: every block at its full count of good copies on disk.
        if let Some(r) = &info.redundancy {
            println!(
                "redundancy: {} blocks of the keys' last values ({} erasure-coded), {} with fewer than {} good copies (or {} distinct shards) on disk (after {:.1}s); scrub: {} blocks checked, {} bad copies, {} repaired, {} unrepairable{}",
                r.blocks,
                r.ec_blocks,
                r.short.len(),
                r.copies_wanted,
                r.shards_wanted,
                r.waited_ms as f64 / 1000.0,
                r.scrub_checked,
                r.scrub_corrupt,
                r.scrub_repaired,
                r.scrub_unrepairable,
                if r.scrub_unfinished {
                    " (the scrub did not end everywhere)"
                } else {
                    ""
                }
            );
            for (key, block, n) in &r.short {
                match r.shards_wanted > 0 && key.starts_with("e/") {
                    true => println!(
                        "CHECK FAILED: key {key}: block {} has {n} distinct good shards, {} wanted",
                        &block[..16],
                        r.shards_wanted
                    ),
                    false => println!(
                        "CHECK FAILED: key {key}: block {} has {n} good copies, {} wanted",
                        &block[..16],
                        r.copies_wanted
                    ),
                }
                ok = false;
            }
            if r.scrub_unfinished {
                println!("CHECK FAILED: the scrub did not end on every node");
                ok = false;
            }
        }
        let corrupts: Vec<&Fault> = info
            .faults
            .iter()
            .filter(|f| f.kind == FaultKind::Corrupt)
            .collect();
        if !corrupts.is_empty() {
            let fixed = corrupts
                .iter()
                .filter(|f| f.repaired != Some(false))
                .count();
            println!(
                "flipped copies: {}, {fixed} good again or gone by the end",
                corrupts.len()
            );
            for f in corrupts.iter().filter(|f| f.repaired == Some(false)) {
                println!(
                    "CHECK FAILED: the copy of {} flipped on node {} at {:.1}s is still bad",
                    f.detail,
                    f.node,
                    f.from_us as f64 / 1e6
                );
                ok = false;
            }
        }
        if acked < info.min_acked {
            println!(
                "CHECK FAILED: {acked} operations answered, fewer than the {} required",
                info.min_acked
            );
            ok = false;
        }
    }
    let windows = unavailability(h);
    println!(
        "unavailable (no answer for over {:?}): {} windows, {:.1}s in all{}",
        UNAVAILABLE_GAP,
        windows.len(),
        windows.iter().fold(0.0, |all, w| all + w.1),
        windows
            .iter()
            .take(5)
            .map(|(at, len)| format!(" [{at:.1}s +{len:.1}s]"))
            .collect::<String>()
    );
    print_verdict(&v);
    println!("{}", if ok { "PASSED" } else { "FAILED" });
    ok
}

/// Gaps between answered operations longer than `UNAVAILABLE_GAP`: (start s, length s).
fn unavailability(h: &History) -> Vec<(f64, f64)> {
    let mut done: Vec<u64> = h
        .ops
        .iter()
        .filter(|o| o.client != u32::MAX)
        .filter(|o| {
            matches!(
                o.outcome,
                Outcome::Ok
                    | Outcome::Found { .. }
                    | Outcome::NotFound
                    | Outcome::Listed { .. }
                    | Outcome::PreconditionFailed
            )
        })
        .map(|o| o.completed_us)
        .collect();
    done.sort_unstable();
    done.windows(2)
        .filter(|w| w[1] - w[0] > UNAVAILABLE_GAP.as_micros() as u64)
        .map(|w| (w[0] as f64 / 1e6, (w[1] - w[0]) as f64 / 1e6))
        .collect()
}

fn print_verdict(v: &Verdict) {
    println!(
        "checked {} keys ({} operations): {} lost writes, {} linearizability violations, {} damaged reads, {} phantom keys, {} undecided",
        v.keys,
        v.checked,
        v.lost.len(),
        v.violations.len(),
        v.corrupt.len(),
        v.phantom.len(),
        v.undecided.len()
    );
    for l in &v.lost {
        println!(
            "LOST: key {} value {:?} acknowledged at {:.3}s; last read found {:?}",
            l.key,
            l.write.call,
            l.write.completed_us as f64 / 1e6,
            l.found
        );
    }
    for viol in &v.violations {
        println!(
            "NOT LINEARIZABLE: key {} ({} operations fail together):",
            viol.key,
            viol.ops.len()
        );
        for op in &viol.ops {
            println!("  {}", serde_json::to_string(op).unwrap_or_default());
        }
    }
    for op in &v.corrupt {
        println!("DAMAGED: {}", serde_json::to_string(op).unwrap_or_default());
    }
    for (op, key) in &v.phantom {
        println!("PHANTOM: key {key} listed by op {}", op.id);
    }
    for k in &v.undecided {
        println!("UNDECIDED: key {k} (the search took too long)");
    }
    for k in &v.unread {
        println!("note: key {k} has no read after its last write");
    }
}

/// `cairn chaos --check FILE`.
pub fn check_file(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let h = History::read_from(std::io::BufReader::new(f))
        .with_context(|| format!("reading {}", path.display()))?;
    if verdict(&h) {
        Ok(())
    } else {
        bail!("the history in {} fails its checks", path.display())
    }
}
