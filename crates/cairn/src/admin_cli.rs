//! `cairn cluster ...`: commands that talk to a node's admin API.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

#[derive(Args)]
pub struct Endpoint {
    /// The node's admin endpoint
    #[arg(
        long,
        env = "CAIRN_ADMIN_ENDPOINT",
        default_value = "http://127.0.0.1:9001"
    )]
    pub(crate) admin_endpoint: String,
    /// The admin token [default: CAIRN_ADMIN_TOKEN, else DATA_DIR/admin_token]
    #[arg(long)]
    admin_token: Option<String>,
    /// The node's data directory, where its admin token is
    #[arg(long, env = "CAIRN_DATA_DIR", default_value = "cairn-data")]
    data_dir: PathBuf,
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Make the node at --admin-endpoint (empty, with an RPC address) join the
    /// cluster that MEMBER (a member's RPC address) belongs to
    Join {
        #[arg(value_name = "MEMBER")]
        member: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Remove NODE (its id, as `cluster status` shows it): it drains (its blocks
    /// are copied to their new places) and then leaves the cluster
    Remove {
        #[arg(value_name = "NODE")]
        node: String,
        /// Take the node out at once, without draining (a node that is dead for
        /// good): its blocks are copied again from the other copies
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Set how many copies each block has (capped by the number of nodes) and how
    /// many must be fsynced before a write is acknowledged; existing blocks are
    /// copied or trimmed to the new count in the background
    SetReplication {
        /// Copies of each block, at least 1
        #[arg(value_name = "N")]
        replication: u8,
        /// Copies fsynced before a write is acknowledged, at most N [default: a
        /// majority of the copies]
        #[arg(long, value_name = "W")]
        write_quorum: Option<u8>,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Set the storage class of the buckets that name none: `replicated`, or
    /// `EC:k+m` (each block cut into k data and m parity shards on k+m nodes; any
    /// k give it back). Objects written before keep their class
    SetClass {
        #[arg(value_name = "CLASS")]
        class: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Show the cluster as the node at --admin-endpoint sees it
    Status {
        /// Print JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

impl Endpoint {
    /// The token given (`--admin-token` or CAIRN_ADMIN_TOKEN), or with
    /// `from_data_dir` the one in the data directory, if any.
    pub(crate) fn token_if_any(&self, from_data_dir: bool) -> Option<String> {
        if let Some(t) = &self.admin_token {
            return Some(t.clone());
        }
        if let Ok(t) = std::env::var("CAIRN_ADMIN_TOKEN")
            && !t.is_empty()
        {
            return Some(t);
        }
        if !from_data_dir {
            return None;
        }
        let t = std::fs::read_to_string(self.data_dir.join("admin_token")).ok()?;
        Some(t.trim().to_string())
    }

    fn token(&self) -> Result<String> {
        self.token_if_any(true).with_context(|| {
            format!(
                "no admin token: give --admin-token, set CAIRN_ADMIN_TOKEN, or point --data-dir at the node's data directory (no readable {})",
                self.data_dir.join("admin_token").display()
            )
        })
    }
}

/// One HTTP/1.1 request to the admin API; its response, the body unread.
async fn send(
    endpoint: &str,
    method: http::Method,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Result<http::Response<hyper::body::Incoming>> {
    let uri: http::Uri = format!("{}{path}", endpoint.trim_end_matches('/'))
        .parse()
        .with_context(|| format!("bad admin endpoint '{endpoint}'"))?;
    let host = uri
        .host()
        .context("the admin endpoint has no host")?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, format!("{host}:{port}"));
    if let Some(t) = token {
        b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = match body {
        Some(v) => {
            b = b.header(http::header::CONTENT_TYPE, "application/json");
            Full::new(bytes::Bytes::from(v.to_string()))
        }
        None => Full::new(bytes::Bytes::new()),
    };
    Ok(sender.send_request(b.body(body)?).await?)
}

/// One HTTP/1.1 request to the admin API; the status and the body as JSON.
pub async fn request(
    endpoint: &str,
    method: http::Method,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> Result<(http::StatusCode, serde_json::Value)> {
    let resp = send(endpoint, method, path, token, body).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::json!({ "error": String::from_utf8_lossy(&bytes) }));
    Ok((status, v))
}

fn fail(status: http::StatusCode, v: &serde_json::Value) -> anyhow::Error {
    let msg = v
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or("no detail");
    anyhow::anyhow!("{msg} (HTTP {status})")
}

/// A POST that changes the cluster, with the admin token; the answer's JSON, or the
/// error it gave.
async fn post(
    endpoint: &Endpoint,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    authorized(endpoint, http::Method::POST, path, Some(body)).await
}

/// A request with the admin token, which must succeed; its answer.
async fn authorized(
    endpoint: &Endpoint,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    let token = endpoint.token()?;
    let (status, v) = request(&endpoint.admin_endpoint, method, path, Some(&token), body).await?;
    if !status.is_success() {
        return Err(fail(status, &v));
    }
    Ok(v)
}

pub fn run(cmd: ClusterCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            ClusterCmd::Join { member, endpoint } => {
                let v = post(
                    &endpoint,
                    "/v1/cluster/join",
                    serde_json::json!({ "member": member }),
                )
                .await?;
                println!(
                    "node {} joined the cluster of {member}",
                    v.get("node").and_then(|n| n.as_str()).unwrap_or("?")
                );
                Ok(())
            }
            ClusterCmd::SetReplication {
                replication,
                write_quorum,
                endpoint,
            } => {
                let v = post(
                    &endpoint,
                    "/v1/cluster/replication",
                    serde_json::json!({
                        "replication": replication,
                        "write_quorum": write_quorum.unwrap_or(0),
                    }),
                )
                .await?;
                println!(
                    "replication {} ({} copies now, {} to acknowledge a write), layout version {}",
                    v["replication"], v["copies"], v["quorum"], v["layout_version"]
                );
                Ok(())
            }
            ClusterCmd::SetClass { class, endpoint } => {
                let v = post(
                    &endpoint,
                    "/v1/cluster/class",
                    serde_json::json!({ "class": class }),
                )
                .await?;
                println!(
                    "default storage class {}",
                    v["default_class"].as_str().unwrap_or("?")
                );
                Ok(())
            }
            ClusterCmd::Remove {
                node,
                force,
                endpoint,
            } => {
                let v = post(
                    &endpoint,
                    "/v1/cluster/remove",
                    serde_json::json!({ "node": node, "force": force }),
                )
                .await?;
                match v.get("state").and_then(|s| s.as_str()) {
                    Some("draining") => println!(
                        "node {node} is draining: its blocks move to their new places, then it leaves (follow with `cairn cluster status`)"
                    ),
                    _ => println!("node {node} was removed from the cluster"),
                }
                Ok(())
            }
            ClusterCmd::Status { json, endpoint } => {
                let (status, v) = request(
                    &endpoint.admin_endpoint,
                    http::Method::GET,
                    "/v1/cluster/status",
                    None,
                    None,
                )
                .await?;
                if !status.is_success() {
                    return Err(fail(status, &v));
                }
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    return Ok(());
                }
                let s = |k: &str| {
                    v.get(k)
                        .map(|x| x.to_string().trim_matches('"').to_string())
                        .unwrap_or_default()
                };
                println!(
                    "node {} ({}), zone {}, Raft {}",
                    s("node"),
                    s("rpc_address"),
                    s("zone"),
                    s("raft_state")
                );
                println!(
                    "leader {}, term {}, last log {}, applied {}, snapshot at {}",
                    s("leader"),
                    s("term"),
                    s("last_log_index"),
                    s("applied_index"),
                    s("snapshot_index")
                );
                if v.get("current").and_then(|x| x.as_bool()) == Some(false) {
                    println!(
                        "this node could not confirm it is up to date with the cluster \
                         (no quorum?): what follows may be behind"
                    );
                }
                if let Some(r) = v.get("redundancy") {
                    let n = r.get("blocks_at_risk").and_then(|x| x.as_u64()).unwrap_or(0);
                    let complete = r.get("complete").and_then(|x| x.as_bool()) == Some(true);
                    println!(
                        "blocks with fewer live copies than wanted: {n}{}",
                        if complete { "" } else { " (some nodes did not answer)" }
                    );
                }
                let layout = v.get("layout").cloned().unwrap_or_default();
                println!(
                    "layout version {}, {} copies per block, {} to acknowledge a write",
                    layout.get("version").cloned().unwrap_or_default(),
                    layout.get("copies").cloned().unwrap_or_default(),
                    layout.get("quorum").cloned().unwrap_or_default(),
                );
                println!(
                    "{:<18} {:<22} {:<8} {:<9} {:<14} {:<8} {:>10} {:>10}  rebalance",
                    "node", "rpc address", "zone", "state", "health", "role", "capacity", "used"
                );
                for m in v
                    .get("nodes")
                    .and_then(|m| m.as_array())
                    .into_iter()
                    .flatten()
                {
                    let f = |k: &str| {
                        m.get(k)
                            .map(|x| x.to_string().trim_matches('"').to_string())
                            .unwrap_or_default()
                    };
                    let role = if m.get("voter").and_then(|x| x.as_bool()) == Some(true) {
                        "voter"
                    } else {
                        "learner"
                    };
                    let gib = |k: &str| {
                        m.get(k)
                            .and_then(|x| x.as_u64())
                            .map(|b| format!("{:.1}G", b as f64 / (1u64 << 30) as f64))
                            .unwrap_or_else(|| "?".into())
                    };
                    let state = if m.get("reachable").and_then(|x| x.as_bool()) == Some(false) {
                        format!("{}!", f("state"))
                    } else {
                        f("state")
                    };
                    let rebalance = match m.get("rebalance") {
                        Some(r) if r.get("running").and_then(|x| x.as_bool()) == Some(true) => {
                            format!(
                                "{}% ({} copied)",
                                r.get("percent").cloned().unwrap_or_default(),
                                r.get("blocks_copied").cloned().unwrap_or_default()
                            )
                        }
                        Some(r) => match r.get("blocks_left").and_then(|x| x.as_u64()) {
                            Some(0) | None => "done".into(),
                            Some(n) => format!("{n} blocks waiting"),
                        },
                        None => "unreachable".into(),
                    };
                    // The failure detector's verdict, with phi when not up.
                    let health = match f("health").as_str() {
                        "up" | "" => f("health"),
                        h => format!("{h} (phi {})", f("phi")),
                    };
                    println!(
                        "{:<18} {:<22} {:<8} {:<9} {:<14} {:<8} {:>10} {:>10}  {rebalance}",
                        f("id"),
                        f("rpc_address"),
                        f("zone"),
                        state,
                        health,
                        role,
                        gib("capacity"),
                        gib("used_bytes"),
                    );
                }
                Ok(())
            }
        }
    })
}

#[derive(Subcommand)]
pub enum BucketCmd {
    /// Set how BUCKET's new objects are stored: `replicated`, `EC:k+m` (each
    /// block cut into k data and m parity shards on k+m nodes; any k give it
    /// back), or `default` (the cluster's). Objects written before keep their class
    SetClass {
        #[arg(value_name = "BUCKET")]
        bucket: String,
        #[arg(value_name = "CLASS")]
        class: String,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// List the buckets with their own settings (storage class)
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

pub fn run_bucket(cmd: BucketCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            BucketCmd::SetClass {
                bucket,
                class,
                endpoint,
            } => {
                let v = post(
                    &endpoint,
                    "/v1/cluster/bucket-class",
                    serde_json::json!({ "bucket": bucket, "class": class }),
                )
                .await?;
                println!(
                    "bucket {bucket}: storage class {} ({})",
                    v["class"].as_str().unwrap_or("?"),
                    v["effective"].as_str().unwrap_or("?")
                );
                Ok(())
            }
            BucketCmd::List { json, endpoint } => {
                let v =
                    authorized(&endpoint, http::Method::GET, "/v1/cluster/buckets", None).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    return Ok(());
                }
                let default = v["default_class"].as_str().unwrap_or("?");
                for b in v["buckets"].as_array().into_iter().flatten() {
                    println!(
                        "{:<40} {}",
                        b["name"].as_str().unwrap_or("?"),
                        match b["class"].as_str() {
                            Some(c) => c.to_string(),
                            None => format!("{default} (the cluster's default)"),
                        }
                    );
                }
                Ok(())
            }
        }
    })
}

#[derive(Subcommand)]
pub enum ScrubCmd {
    /// Start a scrub pass on every node now (a paused one goes on where it stopped)
    Start {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Pause every node's scrub where it is, until the next `scrub start`
    Pause {
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Show each node's scrub: progress, blocks checked, bad copies found, repaired
    Status {
        /// Print JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        endpoint: Endpoint,
    },
}

pub fn run_scrub(cmd: ScrubCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (v, json) = match cmd {
            ScrubCmd::Start { endpoint } => (
                post(&endpoint, "/v1/cluster/scrub/start", serde_json::json!({})).await?,
                false,
            ),
            ScrubCmd::Pause { endpoint } => (
                post(&endpoint, "/v1/cluster/scrub/pause", serde_json::json!({})).await?,
                false,
            ),
            ScrubCmd::Status { json, endpoint } => {
                let (status, v) = request(
                    &endpoint.admin_endpoint,
                    http::Method::GET,
                    "/v1/cluster/scrub",
                    None,
                    None,
                )
                .await?;
                if !status.is_success() {
                    return Err(fail(status, &v));
                }
                (v, json)
            }
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        println!(
            "{:<18} {:<8} {:>6} {:>10} {:>8} {:>8} {:>12}  last pass ended",
            "node", "scrub", "done", "checked", "bad", "repaired", "unrepairable"
        );
        for n in v
            .get("nodes")
            .and_then(|n| n.as_array())
            .into_iter()
            .flatten()
        {
            let f = |k: &str| {
                n.get(k)
                    .map(|x| x.to_string().trim_matches('"').to_string())
                    .unwrap_or_default()
            };
            if let Some(e) = n.get("error") {
                println!("{:<18} unreachable: {}", f("node"), e);
                continue;
            }
            let b = |k: &str| n.get(k).and_then(|x| x.as_bool()) == Some(true);
            let state = if b("paused") {
                "paused"
            } else if b("running") {
                "running"
            } else {
                "idle"
            };
            let ended = match n.get("last_done_ms").and_then(|x| x.as_u64()) {
                Some(0) | None => "never".to_string(),
                Some(ms) => {
                    let ago = (cairn_types::now_millis().max(0) as u64).saturating_sub(ms) / 1000;
                    format!("{ago} s ago")
                }
            };
            println!(
                "{:<18} {:<8} {:>5}% {:>10} {:>8} {:>8} {:>12}  {ended}",
                f("node"),
                state,
                f("percent"),
                f("blocks_checked"),
                f("corrupt"),
                f("repaired"),
                f("unrepairable"),
            );
        }
        Ok(())
    })
}

#[derive(Subcommand)]
pub enum AdminCmd {
    /// The cluster's metadata (keys, buckets, objects, layout, membership) as
    /// one file, for disaster recovery
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Save the metadata as of now (every write acknowledged before) to FILE,
    /// checked whole once written
    Save {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        endpoint: Endpoint,
    },
    /// Replace a stopped node's metadata with FILE's (the old metadata is moved
    /// aside, not deleted). Restore every node of the cluster from the same
    /// file, then start them
    Restore {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The stopped node's data directory
        #[arg(long, env = "CAIRN_DATA_DIR")]
        data_dir: PathBuf,
    },
}

pub fn run_admin(cmd: AdminCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            AdminCmd::Snapshot(SnapshotCmd::Save { file, endpoint }) => {
                save_snapshot(&endpoint, &file).await
            }
            AdminCmd::Snapshot(SnapshotCmd::Restore { file, data_dir }) => {
                if !data_dir.join("node_id").exists() {
                    anyhow::bail!(
                        "{} is not the data directory of a node that has run (no node_id)",
                        data_dir.display()
                    );
                }
                let node = crate::datadir::node_id(&data_dir)?;
                let (info, aside) =
                    cairn_meta::restore_snapshot(&data_dir.join("meta.redb"), &file, node)
                        .await
                        .with_context(|| format!("restoring {}", file.display()))?;
                println!(
                    "restored the metadata as of log entry {} (term {}) into {}; the metadata \
                     it replaced is in {}. Start the node (and the others, restored alike)",
                    info.last_log_index.map_or("none".into(), |i| i.to_string()),
                    info.last_log_term.map_or("none".into(), |t| t.to_string()),
                    data_dir.display(),
                    aside.display()
                );
                Ok(())
            }
        }
    })
}

/// Streams the snapshot into a temporary file next to `file`, fsyncs it,
/// checks it whole, and only then gives it its name (an existing file is
/// never replaced).
async fn save_snapshot(endpoint: &Endpoint, file: &std::path::Path) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    if file.exists() {
        anyhow::bail!("{} exists: give a new file name", file.display());
    }
    let token = endpoint.token()?;
    let resp = send(
        &endpoint.admin_endpoint,
        http::Method::GET,
        "/v1/cluster/snapshot",
        Some(&token),
        None,
    )
    .await?;
    let status = resp.status();
    if !status.is_success() {
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::json!({ "error": String::from_utf8_lossy(&bytes) }));
        return Err(fail(status, &v));
    }
    let info: serde_json::Value = resp
        .headers()
        .get("x-cairn-snapshot")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    let name = file
        .file_name()
        .context("FILE must name a file")?
        .to_string_lossy()
        .to_string();
    let tmp = file.with_file_name(format!(".{name}.partial"));
    let mut out = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("creating {}", tmp.display()))?;
    let res = async {
        let mut body = resp.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                n += data.len() as u64;
                out.write_all(&data).await?;
            }
        }
        out.sync_all().await?;
        let (check, file) = (tmp.clone(), file.to_path_buf());
        tokio::task::spawn_blocking(move || {
            cairn_meta::raft::state_machine::check_snapshot_file(&check)
                .context("the snapshot received is not whole")?;
            // A link fails if FILE appeared meanwhile: nothing is replaced.
            std::fs::hard_link(&check, &file)
                .with_context(|| format!("naming {}", file.display()))?;
            let dir = match file.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            std::fs::File::open(dir)?.sync_all()?;
            anyhow::Ok(())
        })
        .await??;
        anyhow::Ok(n)
    }
    .await;
    let _ = tokio::fs::remove_file(&tmp).await;
    let n = res?;
    println!(
        "saved the metadata as of log entry {} (term {}, {} members) to {}: {n} bytes, checked",
        info["last_log_index"],
        info["last_log_term"],
        info["members"].as_array().map_or(0, |m| m.len()),
        file.display()
    );
    Ok(())
}
