//! `cairn bench`: a load generator for any S3 endpoint, and `--limits`, which measures
//! the machine's own bounds (hashing on one core, fsynced disk writes) to compare with.
//!
//! Each worker owns one keep-alive HTTP/1.1 connection (TCP_NODELAY) and sends its
//! requests one after another, signed with SigV4 (`UNSIGNED-PAYLOAD`). Bodies are
//! streamed from one shared random chunk, so large objects take no client memory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::BoxBody};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::sigv4::Signer;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Put,
    Get,
    Mixed,
}

pub struct Options {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    pub bucket: String,
    pub op: Op,
    pub size: u64,
    pub concurrency: usize,
    pub duration: Option<Duration>,
    pub ops: Option<u64>,
    pub keys: usize,
    /// The objects to read exist already: not written first.
    pub prepared: bool,
    /// Keys taken in order, each once per `keys` operations (not at random).
    pub in_order: bool,
    pub get_ratio: f64,
    pub pid: Option<u32>,
    pub json: bool,
}

#[derive(Serialize, Default, Clone)]
struct Latency {
    count: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Serialize)]
struct Report {
    endpoint: String,
    op: Op,
    object_size: u64,
    concurrency: usize,
    seconds: f64,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    ops_per_sec: f64,
    mib_per_sec: f64,
    put: Option<Latency>,
    get: Option<Latency>,
    server_cpu_us_per_op: Option<f64>,
    server_peak_rss_mib: Option<f64>,
}

pub(crate) type Body = BoxBody<Bytes, std::io::Error>;

pub(crate) struct Conn {
    host: String,
    addr: String,
    pub(crate) sender: Option<hyper::client::conn::http1::SendRequest<Body>>,
}

impl Conn {
    /// The `host:port` requests name.
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    pub(crate) async fn sender(
        &mut self,
    ) -> Result<&mut hyper::client::conn::http1::SendRequest<Body>> {
        let alive = self.sender.as_ref().is_some_and(|s| !s.is_closed());
        if !alive {
            let tcp = tokio::net::TcpStream::connect(&self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().context("no connection")?;
        // The previous response is read; wait until the connection takes the next.
        sender.ready().await?;
        Ok(sender)
    }
}

pub(crate) struct Shared {
    signer: Signer,
    bucket: String,
    chunk: Bytes,
    size: u64,
}

impl Shared {
    /// Requests to `bucket` signed with the given key, with bodies of `size` bytes
    /// cut from a random pool of `pool` bytes.
    pub(crate) fn new(
        access_key: &str,
        secret_key: &str,
        region: &str,
        bucket: &str,
        size: u64,
        pool: usize,
    ) -> Shared {
        let mut chunk = vec![0u8; pool.max(1)];
        rand::fill(&mut chunk[..]);
        Shared {
            signer: Signer {
                access_key: access_key.to_string(),
                secret_key: secret_key.to_string(),
                region: region.to_string(),
            },
            bucket: bucket.to_string(),
            chunk: Bytes::from(chunk),
            size,
        }
    }
}

/// A body of `size` bytes, distinct for every call: frames are zero-copy slices of a
/// random pool, starting at a random offset, so that blocks of different objects
/// differ (a store cannot deduplicate its way to better figures) and the client
/// spends no CPU making data.
fn body_of(pool: &Bytes, size: u64) -> Body {
    let n = pool.len();
    let start = rand::random_range(0..n);
    if size <= FRAME as u64 && start + size as usize <= n {
        return Full::new(pool.slice(start..start + size as usize))
            .map_err(|never| match never {})
            .boxed();
    }
    let pool = pool.clone();
    let s = futures::stream::unfold((0u64, start), move |(sent, at)| {
        let pool = pool.clone();
        async move {
            if sent >= size {
                return None;
            }
            let take = ((size - sent) as usize).min(FRAME).min(n - at);
            let next = if at + take == n { 0 } else { at + take };
            Some((
                Ok(http_body::Frame::data(pool.slice(at..at + take))),
                (sent + take as u64, next),
            ))
        }
    });
    StreamBody::new(s).boxed()
}

/// Largest body frame sent at once.
const FRAME: usize = 1 << 20;
/// Size of the random pool bodies are cut from.
const POOL: usize = 64 << 20;

pub(crate) async fn request(
    conn: &mut Conn,
    sh: &Shared,
    method: &str,
    key: Option<&str>,
    query: &str,
    put_size: Option<u64>,
) -> Result<(StatusCode, u64)> {
    let path = match key {
        Some(k) => format!("/{}/{}", sh.bucket, k),
        None => format!("/{}", sh.bucket),
    };
    let uri = if query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{query}")
    };
    let mut b = Request::builder()
        .method(method)
        .uri(&uri)
        .header("host", &conn.host);
    for (k, v) in sh.signer.sign(
        method,
        &conn.host,
        &path,
        query,
        time::OffsetDateTime::now_utc(),
    ) {
        b = b.header(k, v);
    }
    let body = match put_size {
        Some(n) => {
            b = b.header("content-length", n.to_string());
            body_of(&sh.chunk, n)
        }
        None => Empty::new().map_err(|never| match never {}).boxed(),
    };
    let req = b.body(body)?;
    let resp = conn.sender().await?.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame?.into_data() {
            n += d.len() as u64;
        }
    }
    Ok((status, n))
}

fn key_of(i: usize) -> String {
    format!("bench-{i:08}")
}

fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 (utime, stime), counted from 1 with the name as field 2.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn proc_peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn ticks_per_sec() -> f64 {
    // USER_HZ is 100 on every Linux architecture cairn runs on.
    100.0
}

fn summarize(h: &hdrhistogram::Histogram<u64>) -> Option<Latency> {
    if h.is_empty() {
        return None;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Some(Latency {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.5)),
        p90_ms: ms(h.value_at_quantile(0.9)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
    })
}

/// A connection (not yet open) to `endpoint`, an `http://HOST[:PORT]` URL.
pub(crate) fn conn_to(endpoint: &str) -> Result<Conn> {
    let url: http::Uri = endpoint
        .parse()
        .with_context(|| format!("'{endpoint}' is not a URL like http://127.0.0.1:9000"))?;
    if url.scheme_str() != Some("http") {
        bail!("cairn bench speaks plain http only");
    }
    let host = url
        .authority()
        .with_context(|| format!("'{endpoint}' has no host"))?
        .to_string();
    let addr = if url.port().is_some() {
        host.clone()
    } else {
        format!("{host}:80")
    };
    Ok(Conn {
        host,
        addr,
        sender: None,
    })
}

pub async fn run(o: Options) -> Result<()> {
    // Workers are spread over the endpoints (nodes of one cluster), worker w on
    // endpoint w mod n.
    let endpoints: Vec<String> = o
        .endpoint
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        bail!("--endpoint: give at least one URL");
    }
    for e in &endpoints {
        conn_to(e)?;
    }
    if o.duration.is_none() && o.ops.is_none() {
        bail!("give --duration or --ops");
    }
    let sh = Arc::new(Shared::new(
        &o.access_key,
        &o.secret_key,
        &o.region,
        &o.bucket,
        o.size,
        POOL,
    ));
    let new_conn = |w: usize| conn_to(&endpoints[w % endpoints.len()]);

    let mut c = new_conn(0)?;
    let (st, _) = request(&mut c, &sh, "PUT", None, "", None).await?;
    if !(st.is_success() || st == StatusCode::CONFLICT) {
        bail!("creating bucket {} failed: HTTP {st}", o.bucket);
    }
    let keys = o.keys.max(1);
    if o.op != Op::Put && !o.prepared {
        // Objects to read, written by `concurrency` writers.
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for w in 0..o.concurrency.min(keys) {
            let (sh, next, mut conn) = (sh.clone(), next.clone(), new_conn(w)?);
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= keys {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let (st, _) =
                        request(&mut conn, &sh, "PUT", Some(&key_of(i)), "", Some(sh.size)).await?;
                    if !st.is_success() {
                        bail!("preparing object {}: HTTP {st}", key_of(i));
                    }
                }
            }));
        }
        for t in tasks {
            t.await??;
        }
    }

    let cpu0 = o.pid.and_then(proc_cpu_ticks);
    let stop = Arc::new(AtomicBool::new(false));
    let issued = Arc::new(AtomicU64::new(0));
    let next_key = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = o.duration.map(|d| start + d);
    let mut tasks = Vec::new();
    for w in 0..o.concurrency {
        let (sh, stop, issued, mut conn) = (sh.clone(), stop.clone(), issued.clone(), new_conn(w)?);
        let (op, max_ops, ratio) = (o.op, o.ops, o.get_ratio);
        let next_key = o.in_order.then(|| next_key.clone());
        tasks.push(tokio::spawn(async move {
            let mut put_h =
                hdrhistogram::Histogram::<u64>::new(3).unwrap_or_else(|_| unreachable!());
            let mut get_h = put_h.clone();
            let (mut bytes, mut errors) = (0u64, 0u64);
            let mut first_error: Option<String> = None;
            let mut i = w;
            loop {
                if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if let Some(m) = max_ops
                    && issued.fetch_add(1, Ordering::Relaxed) >= m
                {
                    break;
                }
                i = i
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let is_get = match op {
                    Op::Put => false,
                    Op::Get => true,
                    Op::Mixed => ((i >> 11) as f64 / (1u64 << 53) as f64) < ratio,
                };
                let key = key_of(match &next_key {
                    Some(n) => n.fetch_add(1, Ordering::Relaxed) as usize % keys,
                    None => (i >> 20) % keys,
                });
                let t0 = Instant::now();
                let res = if is_get {
                    request(&mut conn, &sh, "GET", Some(&key), "", None).await
                } else {
                    request(&mut conn, &sh, "PUT", Some(&key), "", Some(sh.size)).await
                };
                let us = t0.elapsed().as_micros() as u64;
                match res {
                    Ok((st, n)) if st.is_success() => {
                        let h = if is_get { &mut get_h } else { &mut put_h };
                        let _ = h.record(us.max(1));
                        bytes += if is_get { n } else { sh.size };
                    }
                    other => {
                        errors += 1;
                        conn.sender = None;
                        if first_error.is_none() {
                            first_error = Some(match other {
                                Ok((st, _)) => format!("HTTP {st}"),
                                Err(e) => format!("{e:#}"),
                            });
                        }
                    }
                }
            }
            (put_h, get_h, bytes, errors, first_error)
        }));
    }
    let mut put_h = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut get_h = put_h.clone();
    let (mut bytes, mut errors) = (0u64, 0u64);
    let mut first_error = None;
    for t in tasks {
        let (p, g, b, e, fe) = t.await?;
        put_h.add(p)?;
        get_h.add(g)?;
        bytes += b;
        errors += e;
        first_error = first_error.or(fe);
    }
    stop.store(true, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    let ops = put_h.len() + get_h.len();
    let cpu = match (o.pid, cpu0) {
        (Some(pid), Some(c0)) => proc_cpu_ticks(pid)
            .map(|c1| (c1 - c0) as f64 / ticks_per_sec() * 1e6 / ops.max(1) as f64),
        _ => None,
    };
    let r = Report {
        endpoint: o.endpoint.clone(),
        op: o.op,
        object_size: o.size,
        concurrency: o.concurrency,
        seconds: secs,
        ops,
        errors,
        first_error,
        ops_per_sec: ops as f64 / secs,
        mib_per_sec: bytes as f64 / secs / (1 << 20) as f64,
        put: summarize(&put_h),
        get: summarize(&get_h),
        server_cpu_us_per_op: cpu,
        server_peak_rss_mib: o.pid.and_then(proc_peak_rss_mib),
    };
    if o.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{:?} {} B x{} for {:.1}s: {} ops ({} errors), {:.0} ops/s, {:.1} MiB/s",
            r.op,
            r.object_size,
            r.concurrency,
            r.seconds,
            r.ops,
            r.errors,
            r.ops_per_sec,
            r.mib_per_sec
        );
        for (name, l) in [("PUT", &r.put), ("GET", &r.get)] {
            if let Some(l) = l {
                println!(
                    "  {name} latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  (n={})",
                    l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count
                );
            }
        }
        if let Some(e) = &r.first_error {
            println!("  first error: {e}");
        }
        if let Some(c) = r.server_cpu_us_per_op {
            println!("  server CPU per op: {c:.1} us");
        }
        if let Some(m) = r.server_peak_rss_mib {
            println!("  server peak RSS (since its start): {m:.1} MiB");
        }
    }
    if errors > 0 && ops == 0 {
        bail!("every request failed");
    }
    Ok(())
}

#[derive(Serialize)]
struct Limits {
    md5_mib_per_sec_one_core: f64,
    blake3_mib_per_sec_one_core: f64,
    disk_fsynced_sequential_write_mib_per_sec: f64,
    /// 4 KiB rewritten in place, fdatasync each: the most small durable writes the
    /// disk takes (what a preallocated log can do).
    disk_small_fsynced_writes_per_sec: f64,
    /// 4 KiB appended, fsync each (the file grows: its inode is written too).
    disk_small_fsynced_appends_per_sec: f64,
}

fn rate(mib: f64, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    mib / t.elapsed().as_secs_f64()
}

/// Measures the machine's bounds: hashing on one core, fsynced writes into `dir`.
pub fn limits(dir: &Path, json: bool) -> Result<()> {
    use md5::Digest;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut buf = vec![0u8; 64 << 20];
    rand::fill(&mut buf[..]);
    let rounds = 4;
    let md5 = rate((rounds * 64) as f64, || {
        let mut h = md5::Md5::new();
        for _ in 0..rounds {
            h.update(&buf);
        }
        std::hint::black_box(h.finalize());
    });
    let blake = rate((rounds * 64) as f64, || {
        let mut h = blake3::Hasher::new();
        for _ in 0..rounds {
            h.update(&buf);
        }
        std::hint::black_box(h.finalize());
    });
    let path: PathBuf = dir.join(format!("cairn-limits-{}", std::process::id()));
    let seq = {
        let mut f = std::fs::File::create(&path)?;
        let chunk = &buf[..4 << 20];
        let n = 64;
        let t = Instant::now();
        for _ in 0..n {
            f.write_all(chunk)?;
            f.sync_all()?;
        }
        (n * 4) as f64 / t.elapsed().as_secs_f64()
    };
    let small = {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&path)?;
        f.write_all_at(&buf[..16 * 4096], 0)?;
        f.sync_all()?;
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_secs(2) {
            let slot = (n % 16) as usize * 4096;
            f.write_all_at(&buf[slot..slot + 4096], slot as u64)?;
            f.sync_data()?;
            n += 1;
        }
        n as f64 / t.elapsed().as_secs_f64()
    };
    let appends = {
        let mut f = std::fs::File::create(&path)?;
        let chunk = &buf[..4096];
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_secs(2) {
            f.write_all(chunk)?;
            f.sync_all()?;
            n += 1;
        }
        n as f64 / t.elapsed().as_secs_f64()
    };
    let _ = std::fs::remove_file(&path);
    let l = Limits {
        md5_mib_per_sec_one_core: md5,
        blake3_mib_per_sec_one_core: blake,
        disk_fsynced_sequential_write_mib_per_sec: seq,
        disk_small_fsynced_writes_per_sec: small,
        disk_small_fsynced_appends_per_sec: appends,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&l)?);
    } else {
        println!("MD5, one core:                     {md5:8.0} MiB/s");
        println!("BLAKE3, one core:                  {blake:8.0} MiB/s");
        println!("disk, fsynced sequential writes:   {seq:8.0} MiB/s (4 MiB writes, fsync each)");
        println!(
            "disk, small fsynced writes:        {small:8.0} /s (4 KiB rewritten in place + fdatasync)"
        );
        println!("disk, small fsynced appends:       {appends:8.0} /s (4 KiB appended + fsync)");
        let both = 1.0 / (1.0 / md5 + 1.0 / blake);
        println!(
            "16 MiB PUT bound (min of MD5+BLAKE3 on one core, disk): {:.0} MiB/s",
            both.min(seq)
        );
    }
    Ok(())
}
