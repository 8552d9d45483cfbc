//! `cairn bench --paused-node`: GET latency with one node stopped (SIGSTOP), with
//! and without hedged block reads.
//!
//! For each hedge setting asked for, starts its own local cluster (`cairn
//! dev-cluster` in a temporary directory, every node given `--hedge-after`),
//! writes `keys` objects of `size` bytes, then sends GETs at a steady rate through
//! every node but one follower for `duration` (healthy), stops that follower with
//! SIGSTOP and sends the same load again (paused), then resumes it. Reports each phase's GET
//! latency percentiles. A paused node keeps its connections open and answers
//! nothing: a read that asked it waits until a hedge, the failure detector or the
//! block timeout takes it elsewhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::bench::{Shared, conn_to, request};
use crate::local_cluster::{Cluster, settled_leader, start_cluster_with};

pub struct PauseOptions {
    pub nodes: usize,
    pub hedges: Vec<String>,
    /// GETs sent per second.
    pub rate: u64,
    pub size: u64,
    pub keys: usize,
    pub duration: Duration,
    pub json: bool,
}

#[derive(Serialize, Clone, Copy, Default)]
struct Phase {
    gets: u64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

#[derive(Serialize)]
struct Run {
    hedge_after: String,
    healthy: Phase,
    paused: Phase,
    /// Paused p99 over healthy p99.
    p99_ratio: f64,
}

#[derive(Serialize)]
struct Report {
    nodes: usize,
    rate: u64,
    size: u64,
    keys: usize,
    phase_seconds: f64,
    runs: Vec<Run>,
}

pub async fn run(o: PauseOptions) -> Result<()> {
    if o.nodes < 4 {
        bail!("--nodes: at least 4 (some reads must go to another node than the gateway)");
    }
    if o.rate == 0 || o.keys == 0 || o.hedges.is_empty() {
        bail!("--rate, --keys and --hedge-after: at least one");
    }
    for h in &o.hedges {
        h.parse::<cairn_cluster::Hedge>()
            .map_err(|e| anyhow::anyhow!("--hedge-after: {e}"))?;
    }
    let mut runs = Vec::new();
    for hedge in &o.hedges {
        let flag = format!("--serve-arg=--hedge-after={hedge}");
        let nodes = o.nodes;
        let c = tokio::task::spawn_blocking(move || {
            start_cluster_with(nodes, 3, "cairn-pausebench-", nodes, |_, _| {
                Ok(vec![flag.clone()])
            })
        })
        .await??;
        let res = one_run(&c, &o, hedge).await;
        let c = match res {
            Ok(r) => {
                if !o.json {
                    println!(
                        "hedge {hedge:>5}: healthy p50 {:.1} ms p99 {:.1} ms | one node paused p50 {:.1} ms p99 {:.1} ms p99.9 {:.1} ms max {:.0} ms | p99 ×{:.2}",
                        r.healthy.p50_ms,
                        r.healthy.p99_ms,
                        r.paused.p50_ms,
                        r.paused.p99_ms,
                        r.paused.p999_ms,
                        r.paused.max_ms,
                        r.p99_ratio
                    );
                }
                runs.push(r);
                c
            }
            Err(e) => {
                let mut c = c;
                let dir = std::mem::replace(&mut c.dir, tempfile::tempdir()?).keep();
                tokio::task::spawn_blocking(move || drop(c)).await?;
                return Err(e.context(format!("the cluster's logs are kept in {}", dir.display())));
            }
        };
        tokio::task::spawn_blocking(move || drop(c)).await?;
    }
    if o.json {
        let report = Report {
            nodes: o.nodes,
            rate: o.rate,
            size: o.size,
            keys: o.keys,
            phase_seconds: o.duration.as_secs_f64(),
            runs,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

async fn one_run(c: &Cluster, o: &PauseOptions, hedge: &str) -> Result<Run> {
    let leader = settled_leader(c).await?;
    // The node to stop: a follower, so that metadata keeps its leader.
    let victim = (0..c.nodes.len())
        .find(|i| *i != leader)
        .unwrap_or_default();
    let gateways: Vec<String> = (0..c.nodes.len())
        .filter(|i| *i != victim)
        .map(|i| c.nodes[i].s3.clone())
        .collect();
    let sh = Arc::new(Shared::new(
        &c.access_key,
        &c.secret_key,
        "us-east-1",
        "cairn-pausebench",
        o.size,
        64 << 20,
    ));
    let mut conn = conn_to(&gateways[0])?;
    let (st, _) = request(&mut conn, &sh, "PUT", None, "", None).await?;
    if !(st.is_success() || st == http::StatusCode::CONFLICT) {
        bail!("creating the bucket failed: HTTP {st}");
    }
    for i in 0..o.keys {
        let mut conn = conn_to(&gateways[i % gateways.len()])?;
        let (st, _) = request(&mut conn, &sh, "PUT", Some(&key(i)), "", Some(o.size)).await?;
        if !st.is_success() {
            bail!("writing {}: HTTP {st}", key(i));
        }
    }
    // Every copy in place before reading (writes finish the third copy in the
    // background).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let healthy = load(&sh, &gateways, o, None).await?;
    let pid = c.nodes[victim].pid;
    let paused = load(&sh, &gateways, o, Some(pid)).await?;
    if !o.json {
        eprintln!("hedge {hedge}: node {victim} was paused; every other node served GETs");
    }
    Ok(Run {
        hedge_after: hedge.to_string(),
        healthy,
        paused,
        p99_ratio: paused.p99_ms / healthy.p99_ms.max(1e-3),
    })
}

fn key(i: usize) -> String {
    format!("obj-{i:06}")
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// GETs sent at a steady `o.rate` per second for `o.duration`, each on its own
/// connection to the next gateway, whether or not the earlier ones have answered
/// (an open loop: a request stuck on the paused node does not hold back the
/// others, so every request's latency counts as a user would see it). With
/// `pause`, that process is stopped for the phase and resumed once it ends
/// (requests still waiting on it then finish, and count with their whole latency).
async fn load(
    sh: &Arc<Shared>,
    gateways: &[String],
    o: &PauseOptions,
    pause: Option<u32>,
) -> Result<Phase> {
    if let Some(pid) = pause {
        signal(pid, rustix::process::Signal::STOP);
    }
    let start = Instant::now();
    let deadline = start + o.duration;
    let every = Duration::from_secs_f64(1.0 / o.rate.max(1) as f64);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = Vec::new();
    let mut dropped = 0u64;
    let mut n = 0u64;
    loop {
        let at = start + every * n as u32;
        if at >= deadline {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            dropped += 1;
            n += 1;
            continue;
        };
        let (sh, keys) = (sh.clone(), o.keys);
        let gateway = gateways[n as usize % gateways.len()].clone();
        n += 1;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let k = key(rand::random_range(0..keys));
            let mut conn = conn_to(&gateway)?;
            // Timed from when it was due: a late start counts against it.
            let res = request(&mut conn, &sh, "GET", Some(&k), "", None).await;
            let us = at.elapsed().as_micros() as u64;
            Ok::<_, anyhow::Error>(match res {
                Ok((st, _)) if st.is_success() => Some(us.max(1)),
                _ => None,
            })
        }));
    }
    if let Some(pid) = pause {
        signal(pid, rustix::process::Signal::CONT);
    }
    let mut all = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut errors = dropped;
    for t in tasks {
        match t.await?? {
            Some(us) => all.record(us)?,
            None => errors += 1,
        }
    }
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    Ok(Phase {
        gets: all.len(),
        errors,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: all.max() as f64 / 1000.0,
    })
}

/// GETs a phase keeps waiting at most; one due beyond counts as an error.
const MAX_IN_FLIGHT: usize = 2048;
