//! `cairn bench --failover`: how long writes stop when the Raft leader dies.
//!
//! Starts its own local cluster (`cairn dev-cluster` in a temporary directory), keeps
//! a small write load going through every node, and then, `kills` times: finds the
//! leader, kills it with SIGKILL, and measures the time from the kill to the first
//! acknowledged PUT that was sent after it (through a surviving node); then starts
//! the killed node again and waits until it has caught up before the next round.
//! Reports each figure and the median. The cluster is stopped and its directory
//! removed at the end, whatever happens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::bench::{Shared, conn_to, request};
use crate::local_cluster::{kill9, restart, settled_leader, start_cluster};

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
    let mut c =
        tokio::task::spawn_blocking(move || start_cluster(o.nodes, o.nodes, "cairn-failover-"))
            .await??;
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
