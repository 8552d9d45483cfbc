//! A local cluster for the tools that need one of their own (`cairn bench
//! --failover`, `cairn chaos`): `cairn dev-cluster` in a temporary directory, its
//! nodes killed, paused and started again by pid, and asked for their status.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::admin_cli::request as admin_request;

pub struct NodeInfo {
    pub id: String,
    pub s3: String,
    pub admin: String,
    pub argv: Vec<String>,
    /// Its own environment variables (`dev-cluster --node-env`).
    pub env: Vec<(String, String)>,
    pub pid: u32,
    /// Stopped for good (removed from the cluster): not asked for its status.
    pub gone: bool,
}

/// The cluster this bench started; dropping it stops every process.
pub struct Cluster {
    pub dev: Child,
    /// The first port: node i uses 3 from base + 3i; the 4 × nodes ports from
    /// here on are the cluster's.
    pub base_port: u16,
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeInfo>,
    pub restarted: Vec<Child>,
    pub access_key: String,
    pub secret_key: String,
    pub admin_token: String,
    pub cluster_secret: String,
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
pub fn terminate(c: &mut Child) {
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

/// Starts `nodes` nodes in `zones` zones, in a temporary directory named from
/// `prefix`.
pub fn start_cluster(nodes: usize, zones: usize, prefix: &str) -> Result<Cluster> {
    start_cluster_with(nodes, zones, prefix, nodes, |_, _| Ok(Vec::new()))
}

/// As [`start_cluster`], with `slots` (at least `nodes`) nodes' worth of ports, 4
/// per node: the nodes use 3 each from the first port, the caller the rest.
/// `extra` is called with the first port and the cluster's directory of each
/// attempt and returns more `dev-cluster` flags, or an error to try other ports.
pub fn start_cluster_with(
    nodes: usize,
    zones: usize,
    prefix: &str,
    slots: usize,
    mut extra: impl FnMut(u16, &Path) -> Result<Vec<String>>,
) -> Result<Cluster> {
    let exe = std::env::current_exe().context("finding the cairn binary")?;
    // Ports below the kernel's ephemeral range; another try on other ports if one
    // is taken.
    let slot = 4 * slots.max(nodes).max(5) as u32;
    for _ in 0..5 {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .context("creating a temporary directory")?;
        let base = 20000 + rand::random_range(0..12000 / slot) * slot;
        let Ok(more) = extra(base as u16, dir.path()) else {
            continue;
        };
        let mut dev = Command::new(&exe)
            .args(["dev-cluster", "--nodes", &nodes.to_string(), "--zones"])
            .arg(zones.to_string())
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--base-port", &base.to_string()])
            .args(more)
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
                    base_port: base as u16,
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
                env: n["env"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                            .collect()
                    })
                    .unwrap_or_default(),
                pid: n["pid"].as_u64().context("a node without pid")? as u32,
                gone: false,
            })
        })
        .collect()
}

pub async fn status(admin: &str) -> Option<serde_json::Value> {
    let fut = admin_request(admin, http::Method::GET, "/v1/cluster/status", None, None);
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Ok((st, v))) if st.is_success() => Some(v),
        _ => None,
    }
}

/// The index of the leader every node agrees on, once each has applied as far as
/// the leader had when asked.
pub async fn settled_leader(c: &Cluster) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(i) = agreed_leader(c).await {
            return Ok(i);
        }
        if Instant::now() > deadline {
            let mut views = String::new();
            for (i, n) in c.nodes.iter().enumerate().filter(|(_, n)| !n.gone) {
                let view = match status(&n.admin).await {
                    Some(s) => format!(
                        "{} {} leader {} term {} applied {} members {}",
                        s["node"].as_str().unwrap_or("?"),
                        s["raft_state"].as_str().unwrap_or("?"),
                        s["leader"].as_str().unwrap_or("none"),
                        s["term"],
                        s["applied_index"],
                        s["members"]
                            .as_array()
                            .map(|m| m
                                .iter()
                                .map(|m| format!(
                                    "{}{}",
                                    m["id"].as_str().unwrap_or("?"),
                                    if m["voter"].as_bool() == Some(true) {
                                        "*"
                                    } else {
                                        ""
                                    }
                                ))
                                .collect::<Vec<_>>()
                                .join(","))
                            .unwrap_or_default()
                    ),
                    None => {
                        let log = c.dir.path().join(format!("node{i}.log"));
                        let (alive, tail) = tokio::task::block_in_place(|| {
                            let alive = std::fs::read_to_string(format!("/proc/{}/stat", n.pid))
                                .is_ok_and(|st| !st.contains(") Z "));
                            (alive, log_tail(&log, 3))
                        });
                        format!(
                            "no answer (process {}); its log ends:\n    {}",
                            if alive { "running" } else { "gone" },
                            tail.join("\n    ")
                        )
                    }
                };
                views.push_str(&format!("\n  node {i}: {view}"));
            }
            bail!("the cluster did not settle on a leader within 60 s; the nodes' views:{views}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn agreed_leader(c: &Cluster) -> Option<usize> {
    // (index, status) of every node still in the cluster.
    let mut all = Vec::new();
    for (i, n) in c.nodes.iter().enumerate().filter(|(_, n)| !n.gone) {
        all.push((i, status(&n.admin).await?));
    }
    let leader = all.first()?.1["leader"].as_str()?.to_string();
    let li = c.nodes.iter().position(|n| n.id == leader && !n.gone)?;
    let target = all.iter().find(|(i, _)| *i == li)?.1["applied_index"].as_u64()?;
    let agreed = all.iter().all(|(_, s)| {
        s["leader"].as_str() == Some(leader.as_str())
            && s["applied_index"].as_u64().is_some_and(|a| a >= target)
    });
    agreed.then_some(li)
}

/// Starts node `i` again with its original command line and environment, its output appended to
/// `node{i}.log` in the cluster's directory.
pub fn restart(c: &mut Cluster, i: usize) -> Result<()> {
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
        .envs(n.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting node {i} again"))?;
    c.nodes[i].pid = child.id();
    c.restarted.push(child);
    Ok(())
}

/// The last `n` lines of the file at `path` (from its last 4 KiB; each cut to
/// 300 characters).
fn log_tail(path: &Path, n: usize) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map_or(0, |m| m.len());
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let _ = f.take(4096).read_to_end(&mut buf);
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<String> = text
        .lines()
        .rev()
        .take(n)
        .map(|l| l.chars().take(300).collect())
        .collect();
    lines.reverse();
    lines
}

/// SIGTERM, then waits (up to 30 s) until the process is gone, then SIGKILL.
pub fn stop(pid: u32) -> Result<()> {
    let p = rustix::process::Pid::from_raw(pid as i32).context("a bad pid")?;
    let _ = rustix::process::kill_process(p, rustix::process::Signal::CONT);
    rustix::process::kill_process(p, rustix::process::Signal::TERM)
        .with_context(|| format!("kill -TERM {pid}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill9(pid)
}

/// SIGKILL, then waits (up to 10 s) until the process is gone.
pub fn kill9(pid: u32) -> Result<()> {
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
