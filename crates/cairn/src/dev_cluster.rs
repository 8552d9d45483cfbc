//! `cairn dev-cluster`: a local cluster of N `cairn serve` processes on loopback, for
//! trying cairn and for tests.
//!
//! Node i (from 0) uses port P+3i for S3, P+3i+1 for admin, P+3i+2 for RPC, zone
//! `z{i mod K + 1}`, and `DIR/node{i}` for data (its log in `DIR/node{i}.log`). The
//! nodes share one key pair, one cluster secret and one admin token, kept in DIR (mode
//! 0600) so that a second run on the same DIR finds the same cluster. Once every node
//! serves and a leader is elected, `DIR/cluster.json` is written (temp file, rename).
//! A node that dies is not restarted; its `argv` and `env` (the variables given
//! with `--node-env`) let a script start it again.
//! Ctrl-C or SIGTERM stops every node.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::admin_cli::request;
use crate::datadir;

#[derive(Args)]
pub struct DevClusterArgs {
    /// Number of nodes
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Number of zones the nodes are spread over
    #[arg(long, default_value_t = 3)]
    zones: usize,
    /// Directory for the nodes' data, logs and cluster.json
    #[arg(long, default_value = "cairn-cluster")]
    data_dir: PathBuf,
    /// First port: node i listens on P+3i (S3), P+3i+1 (admin), P+3i+2 (RPC)
    #[arg(long, default_value_t = 9000)]
    base_port: u16,
    /// Node i tells the others to reach it at 127.0.0.1:PORT+i instead of its RPC
    /// port: for a proxy in front of each node (fault injection, `cairn chaos`)
    #[arg(long, value_name = "PORT")]
    rpc_advertise_base: Option<u16>,
    /// Further flags for every node's `cairn serve` (repeat for each flag)
    #[arg(long = "serve-arg", value_name = "ARG", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// An environment variable for every node, `{i}` in VALUE replaced by the
    /// node's index (repeat for each variable; e.g. a per-node clock for
    /// fault injection)
    #[arg(long = "node-env", value_name = "KEY=VALUE", value_parser = parse_env)]
    node_env: Vec<(String, String)>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}

struct Node {
    index: usize,
    zone: String,
    data_dir: PathBuf,
    s3: String,
    admin: String,
    rpc: String,
    argv: Vec<String>,
    /// Its own environment variables (besides the cluster's keys).
    env: Vec<(String, String)>,
    child: Option<Child>,
    id: String,
}

/// How long a node may take to start, and the cluster to elect a leader.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(a: DevClusterArgs) -> Result<()> {
    if a.nodes == 0 || a.nodes > 99 {
        bail!("--nodes: between 1 and 99");
    }
    if a.zones == 0 {
        bail!("--zones: at least 1");
    }
    let last = u32::from(a.base_port) + 3 * a.nodes as u32;
    if last > 65535 {
        bail!("--base-port: the nodes' ports would pass 65535");
    }
    if let Some(p) = a.rpc_advertise_base
        && u32::from(p) + a.nodes as u32 > 65535
    {
        bail!("--rpc-advertise-base: the advertised ports would pass 65535");
    }
    std::fs::create_dir_all(&a.data_dir)
        .with_context(|| format!("creating {}", a.data_dir.display()))?;
    let dir = std::fs::canonicalize(&a.data_dir)?;
    let keys = match (
        std::env::var("CAIRN_ACCESS_KEY")
            .ok()
            .filter(|s| !s.is_empty()),
        std::env::var("CAIRN_SECRET_KEY")
            .ok()
            .filter(|s| !s.is_empty()),
    ) {
        (Some(access_key), Some(secret_key)) => datadir::KeyPair {
            access_key,
            secret_key,
        },
        (None, None) => match datadir::read_credentials(&dir)? {
            Some(k) => k,
            None => {
                let k = datadir::generate_key_pair();
                datadir::write_credentials(&dir, &k)?;
                k
            }
        },
        _ => bail!("set both CAIRN_ACCESS_KEY and CAIRN_SECRET_KEY, or neither"),
    };
    let secret = datadir::secret_file(&dir.join("cluster_secret"))?;
    let token = datadir::admin_token(&dir)?;
    let exe = std::env::current_exe().context("finding the cairn binary")?;

    let mut nodes: Vec<Node> = (0..a.nodes)
        .map(|i| {
            let port = |k: usize| a.base_port as usize + 3 * i + k;
            let zone = format!("z{}", i % a.zones + 1);
            let data_dir = dir.join(format!("node{i}"));
            let (s3, admin, rpc) = (
                format!("127.0.0.1:{}", port(0)),
                format!("127.0.0.1:{}", port(1)),
                format!("127.0.0.1:{}", port(2)),
            );
            let mut argv = vec![
                exe.display().to_string(),
                "serve".into(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--s3-address".into(),
                s3.clone(),
                "--admin-address".into(),
                admin.clone(),
                "--rpc-address".into(),
                rpc.clone(),
                "--zone".into(),
                zone.clone(),
            ];
            if let Some(p) = a.rpc_advertise_base {
                argv.push("--rpc-advertise".into());
                argv.push(format!("127.0.0.1:{}", p as usize + i));
            }
            argv.extend(a.serve_args.iter().cloned());
            Node {
                index: i,
                zone,
                data_dir,
                s3: format!("http://{s3}"),
                admin: format!("http://{admin}"),
                rpc,
                argv,
                env: a
                    .node_env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.replace("{i}", &i.to_string())))
                    .collect(),
                child: None,
                id: String::new(),
            }
        })
        .collect();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let env = [
        ("CAIRN_ACCESS_KEY", keys.access_key.as_str()),
        ("CAIRN_SECRET_KEY", keys.secret_key.as_str()),
        ("CAIRN_CLUSTER_SECRET", secret.as_str()),
        ("CAIRN_ADMIN_TOKEN", token.as_str()),
    ];
    let started = rt.block_on(async {
        for n in &mut nodes {
            let log = std::fs::File::create(dir.join(format!("node{}.log", n.index)))?;
            let child = Command::new(&n.argv[0])
                .args(&n.argv[1..])
                .envs(env)
                .envs(n.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting node {}", n.index))?;
            n.child = Some(child);
        }
        for n in &mut nodes {
            wait_healthy(n).await?;
        }
        // Every node but the first joins the first, unless it is a member already
        // (a second run on the same directory).
        let first_rpc = nodes[0].rpc.clone();
        for n in nodes.iter_mut().skip(1) {
            let st = status(&n.admin).await?;
            let members = st["members"].as_array().map(|m| m.len()).unwrap_or(0);
            if members > 1 {
                continue;
            }
            let (code, v) = request(
                &n.admin,
                http::Method::POST,
                "/v1/cluster/join",
                Some(&token),
                Some(serde_json::json!({ "member": first_rpc })),
            )
            .await?;
            if !code.is_success() {
                bail!(
                    "node {} could not join: {} (HTTP {code})",
                    n.index,
                    v["error"]
                );
            }
        }
        // Every node knows the leader and sees every node in the layout.
        let deadline = Instant::now() + START_TIMEOUT;
        for n in &mut nodes {
            loop {
                let st = status(&n.admin).await?;
                let layout_nodes = st["nodes"].as_array().map(|m| m.len()).unwrap_or(0);
                if !st["leader"].is_null() && layout_nodes == a.nodes {
                    n.id = st["node"].as_str().unwrap_or_default().to_string();
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "node {} did not see the whole cluster within {START_TIMEOUT:?}: {st}",
                        n.index
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    if let Err(e) = started {
        stop_all(&mut nodes);
        return Err(e);
    }
    write_cluster_json(&dir, &keys, &token, &nodes)?;
    println!(
        "cairn dev-cluster: {} nodes in {} zones",
        a.nodes,
        a.zones.min(a.nodes)
    );
    for n in &nodes {
        println!(
            "node{} {}  S3 {}  admin {}  RPC {}  zone {}",
            n.index, n.id, n.s3, n.admin, n.rpc, n.zone
        );
    }
    println!("access key id:  {}", keys.access_key);
    println!("secret key:     {}", keys.secret_key);
    println!("cluster file:   {}", dir.join("cluster.json").display());
    println!("ready (Ctrl-C stops every node)");

    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut reported = vec![false; nodes.len()];
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            for (n, seen) in nodes.iter_mut().zip(reported.iter_mut()) {
                if *seen {
                    continue;
                }
                if let Some(Ok(Some(st))) = n.child.as_mut().map(|c| c.try_wait()) {
                    *seen = true;
                    eprintln!(
                        "node{} exited ({st}); it is not restarted (its argv is in cluster.json)",
                        n.index
                    );
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    stop_all(&mut nodes);
    println!("stopped");
    Ok(())
}

async fn status(admin: &str) -> Result<serde_json::Value> {
    let (code, v) = request(admin, http::Method::GET, "/v1/cluster/status", None, None).await?;
    if !code.is_success() {
        bail!("{admin}: HTTP {code}: {v}");
    }
    Ok(v)
}

async fn wait_healthy(n: &mut Node) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(Ok(Some(st))) = n.child.as_mut().map(|c| c.try_wait()) {
            bail!(
                "node {} exited at start ({st}); see {}.log",
                n.index,
                n.data_dir.display()
            );
        }
        if let Ok((code, _)) = request(&n.admin, http::Method::GET, "/health", None, None).await
            && code.is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "node {} did not become healthy within {START_TIMEOUT:?}",
                n.index
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn stop_all(nodes: &mut [Node]) {
    for n in nodes.iter() {
        if let Some(c) = &n.child
            && let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in nodes.iter_mut() {
        if let Some(c) = &mut n.child {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn write_cluster_json(
    dir: &Path,
    keys: &datadir::KeyPair,
    token: &str,
    nodes: &[Node],
) -> Result<()> {
    let doc = serde_json::json!({
        "access_key": keys.access_key,
        "secret_key": keys.secret_key,
        "admin_token": token,
        "nodes": nodes.iter().map(|n| serde_json::json!({
            "id": n.id,
            "pid": n.child.as_ref().map(|c| c.id()),
            "zone": n.zone,
            "data_dir": n.data_dir,
            "s3_endpoint": n.s3,
            "admin_endpoint": n.admin,
            "rpc_address": n.rpc,
            "argv": n.argv,
            "env": n.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        })).collect::<Vec<_>>(),
    });
    datadir::write_durably(
        &dir.join("cluster.json"),
        serde_json::to_string_pretty(&doc)?.as_bytes(),
        0o600,
    )
}
