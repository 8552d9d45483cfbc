//! `cairn bench --failover`: how long writes stop when the Raft leader dies.
//!
//! Starts its own local cluster (`cairn dev-cluster` in a temporary directory), keeps
//! a small write load going through every node, and then, `kills` times: finds the
//! leader, kills it with SIGKILL, and measures the time from the kill to the first
//! acknowledged PUT that was sent after it (through a surviving node); then starts
//! the killed node again and waits until it has caught up before the next round.
//! Reports each figure and the median. The cluster is stopped and its directory
//! removed at the end, whatever happens.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::admin_cli::request as admin_request;
use crate::bench::{Shared, conn_to, request};

pub struct FailoverOptions {
    pub nodes: usize,
    pub kills: usize,
    pub writers: usize,
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    nodes: usize,
    writers: usize,
    /// Milliseconds from each kill to the first write acknowledged after it.
    failover_ms: Vec<f64>,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

/// The longest a round may wait for writes to resume before it counts as a failure.
const RESUME_LIMIT: Duration = Duration::from_secs(60);

struct NodeInfo {
    id: String,
    s3: String,
    admin: String,
    argv: Vec<String>,
    pid: u32,
}

/// The cluster this bench started; dropping it stops every process.
struct Cluster {
    dev: Child,
    dir: tempfile::TempDir,
    nodes: Vec<NodeInfo>,
    restarted: Vec<Child>,
    access_key: String,
    secret_key: String,
    admin_token: String,
    cluster_secret: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.restarted {
            terminate(c);
        }
        terminate(&mut self.dev);
    }
}

/// SIGTERM, then up to 30 s for a graceful stop, then SIGKILL.
fn terminate(c: &mut Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn start_cluster(nodes: usize) -> Result<Cluster> {
    let exe = std::env::current_exe().context("finding the cairn binary")?;
    for _ in 0..5 {
        let dir = tempfile::Builder::new()
            .prefix("cairn-failover-")
            .tempdir()
            .context("creating a temporary directory")?;
        // Ports below the kernel's ephemeral range; another try on other ports if
        // one is taken.
        let base = 20000 + (rand::random_range(0..600u32) * 20);
        let mut dev = Command::new(&exe)
            .args(["dev-cluster", "--nodes", &nodes.to_string(), "--zones"])
            .arg(nodes.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--base-port", &base.to_string()])
            .env_remove("CAIRN_ACCESS_KEY")
            .env_remove("CAIRN_SECRET_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting cairn dev-cluster")?;
        let json = dir.path().join("cluster.json");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(text) = std::fs::read_to_string(&json) {
                let doc: serde_json::Value = serde_json::from_str(&text)?;
                return Ok(Cluster {
                    nodes: parse_nodes(&doc)?,
                    access_key: field(&doc, "access_key")?,
                    secret_key: field(&doc, "secret_key")?,
                    admin_token: field(&doc, "admin_token")?,
                    cluster_secret: std::fs::read_to_string(dir.path().join("cluster_secret"))
                        .context("reading the cluster's secret")?
                        .trim()
                        .to_string(),
                    dev,
                    dir,
                    restarted: Vec::new(),
                });
            }
            if let Ok(Some(_)) = dev.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                terminate(&mut dev);
                bail!("the local cluster did not start within 120 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    bail!("the local cluster failed to start five times (ports in use?)")
}

fn field(v: &serde_json::Value, k: &str) -> Result<String> {
    v[k].as_str()
        .map(str::to_string)
        .with_context(|| format!("cluster.json has no '{k}'"))
}

fn parse_nodes(doc: &serde_json::Value) -> Result<Vec<NodeInfo>> {
    let nodes = doc["nodes"]
        .as_array()
        .context("cluster.json has no nodes")?;
    nodes
        .iter()
        .map(|n| {
            Ok(NodeInfo {
                id: field(n, "id")?,
                s3: field(n, "s3_endpoint")?,
                admin: field(n, "admin_endpoint")?,
                argv: n["argv"]
                    .as_array()
                    .context("a node without argv")?
                    .iter()
                    .filter_map(|a| a.as_str().map(str::to_string))
                    .collect(),
                pid: n["pid"].as_u64().context("a node without pid")? as u32,
            })
        })
        .collect()
}

async fn status(admin: &str) -> Option<serde_json::Value> {
    let fut = admin_request(admin, http::Method::GET, "/v1/cluster/status", None, None);
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Ok((st, v))) if st.is_success() => Some(v),
        _ => None,
    }
}

/// The index of the leader every node agrees on, once each has applied as far as
/// the leader had when asked.
async fn settled_leader(c: &Cluster) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(i) = agreed_leader(c).await {
            return Ok(i);
        }
        if Instant::now() > deadline {
            bail!("the cluster did not settle on a leader within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn agreed_leader(c: &Cluster) -> Option<usize> {
    let mut all = Vec::new();
    for n in &c.nodes {
        all.push(status(&n.admin).await?);
    }
    let leader = all[0]["leader"].as_str()?.to_string();
    let li = c.nodes.iter().position(|n| n.id == leader)?;
    let target = all[li]["applied_index"].as_u64()?;
    let agreed = all.iter().all(|s| {
        s["leader"].as_str() == Some(leader.as_str())
            && s["applied_index"].as_u64().is_some_and(|a| a >= target)
    });
    agreed.then_some(li)
}

fn restart(c: &mut Cluster, i: usize) -> Result<()> {
    let n = &c.nodes[i];
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(c.dir.path().join(format!("node{i}.log")))?;
    let (exe, args) = n.argv.split_first().context("an empty argv")?;
    let child = Command::new(exe)
        .args(args)
        .env("CAIRN_ACCESS_KEY", &c.access_key)
        .env("CAIRN_SECRET_KEY", &c.secret_key)
        .env("CAIRN_ADMIN_TOKEN", &c.admin_token)
        .env("CAIRN_CLUSTER_SECRET", &c.cluster_secret)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting node {i} again"))?;
    c.nodes[i].pid = child.id();
    c.restarted.push(child);
    Ok(())
}

fn kill9(pid: u32) -> Result<()> {
    let p = rustix::process::Pid::from_raw(pid as i32).context("a bad pid")?;
    rustix::process::kill_process(p, rustix::process::Signal::KILL)
        .with_context(|| format!("kill -9 {pid}"))?;
    // Until the process is gone, its ports may still answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Shared by the writers and the round loop.
#[derive(Default)]
struct Timeline {
    /// When the current round's kill happened.
    killed: Option<Instant>,
    /// The earliest acknowledgement of a PUT sent after `killed`.
    resumed: Option<Instant>,
}

pub async fn run(o: FailoverOptions) -> Result<()> {
    if o.nodes < 3 {
        bail!("--nodes: at least 3 (a leader's death must leave a majority)");
    }
    if o.kills == 0 || o.writers == 0 {
        bail!("--kills and --concurrency: at least 1");
    }
    let mut c = tokio::task::spawn_blocking(move || start_cluster(o.nodes)).await??;
    let sh = Arc::new(Shared::new(
        &c.access_key,
        &c.secret_key,
        "us-east-1",
        "cairn-failover",
        4096,
        1 << 20,
    ));
    let mut conn = conn_to(&c.nodes[0].s3)?;
    let (st, _) = request(&mut conn, &sh, "PUT", None, "", None).await?;
    if !(st.is_success() || st == http::StatusCode::CONFLICT) {
        bail!("creating the bucket failed: HTTP {st}");
    }
    let timeline: Arc<Mutex<Timeline>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let endpoints: Vec<String> = c.nodes.iter().map(|n| n.s3.clone()).collect();
    let mut writers = Vec::new();
    for w in 0..o.writers {
        let (sh, timeline, stop, endpoints) = (
            sh.clone(),
            timeline.clone(),
            stop.clone(),
            endpoints.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut conns = Vec::new();
            for e in &endpoints {
                conns.push(conn_to(e)?);
            }
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let node = (w + n) % conns.len();
                n += 1;
                let key = format!("w{w}-{n}");
                let sent = Instant::now();
                let put = request(&mut conns[node], &sh, "PUT", Some(&key), "", Some(4096));
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(30), put).await,
                    Ok(Ok((st, _))) if st.is_success()
                );
                if ok {
                    let done = Instant::now();
                    let mut t = timeline.lock().unwrap_or_else(|p| p.into_inner());
                    if t.killed.is_some_and(|k| sent >= k) && t.resumed.is_none_or(|r| done < r) {
                        t.resumed = Some(done);
                    }
                } else {
                    conns[node].sender = None;
                    // A dead node refuses at once: a short pause keeps this writer
                    // from spinning on it.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let mut figures = Vec::new();
    let result: Result<()> = async {
        for round in 0..o.kills {
            let leader = settled_leader(&c).await?;
            // A moment of load on the settled cluster before the kill.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let pid = c.nodes[leader].pid;
            // Timed from just before the signal: the figure errs long, not short.
            let killed = Instant::now();
            *timeline.lock().unwrap_or_else(|p| p.into_inner()) = Timeline {
                killed: Some(killed),
                resumed: None,
            };
            tokio::task::spawn_blocking(move || kill9(pid)).await??;
            let resumed = loop {
                if let Some(r) = timeline.lock().unwrap_or_else(|p| p.into_inner()).resumed {
                    break r;
                }
                if killed.elapsed() > RESUME_LIMIT {
                    bail!("round {round}: no write acknowledged within {RESUME_LIMIT:?} of the leader's kill");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            let ms = (resumed - killed).as_secs_f64() * 1000.0;
            if !o.json {
                println!("kill {:>2}: leader node {leader} killed, writes resumed after {ms:.0} ms", round + 1);
            }
            figures.push(ms);
            // Opening a log file and starting a process: brief, but not on the reactor.
            tokio::task::block_in_place(|| restart(&mut c, leader))?;
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    if let Err(e) = result {
        // The nodes' logs are kept for a look at what went wrong.
        let dir = std::mem::replace(&mut c.dir, tempfile::tempdir()?).keep();
        tokio::task::spawn_blocking(move || drop(c)).await?;
        return Err(e.context(format!("the cluster's logs are kept in {}", dir.display())));
    }
    tokio::task::spawn_blocking(move || drop(c)).await?;
    let mut sorted = figures.clone();
    sorted.sort_by(f64::total_cmp);
    let report = Report {
        nodes: o.nodes,
        writers: o.writers,
        median_ms: median(&sorted),
        min_ms: sorted[0],
        max_ms: sorted[sorted.len() - 1],
        failover_ms: figures,
    };
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "leader failover over {} kills ({} nodes, {} writers): median {:.0} ms, min {:.0} ms, max {:.0} ms",
            report.failover_ms.len(),
            report.nodes,
            report.writers,
            report.median_ms,
            report.min_ms,
            report.max_ms
        );
    }
    Ok(())
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}
