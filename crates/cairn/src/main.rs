//! The `cairn` binary: command line, configuration, process wiring.

/// mimalloc: a node allocates and frees many small buffers per request on every
/// core; it spends far less time in the allocator than the system's malloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin_cli;
mod backup_cli;
mod bench;
mod chaos;
mod config;
mod datadir;
mod dev_cluster;
mod failover;
mod local_cluster;
mod logwriter;
mod netproxy;
mod pausebench;
mod server;
mod sigv4;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// cairn: a durable, S3-compatible object store.
///
/// `cairn serve` with no configuration serves S3 on http://127.0.0.1:9000 with data
/// under ./cairn-data, and prints the endpoint and access key.
#[derive(Parser)]
#[command(name = "cairn", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a cairn node (S3 endpoint plus admin endpoint with /health and /metrics).
    Serve(ServeArgs),
    /// Load-test any S3 endpoint (PUT, GET or mixed), or with --limits measure this
    /// machine's own bounds (hashing, fsynced disk writes) to compare with.
    Bench(BenchArgs),
    /// Join a cluster, remove a node, show the cluster's state (through a node's
    /// admin API)
    #[command(subcommand)]
    Cluster(admin_cli::ClusterCmd),
    /// Re-read every block on every node and check it against its BLAKE3 address
    /// (a bad copy is quarantined and fetched again from another node): start,
    /// pause, status (through a node's admin API)
    #[command(subcommand)]
    Scrub(admin_cli::ScrubCmd),
    /// Set a bucket's storage class (replicated or erasure-coded; through a
    /// node's admin API)
    #[command(subcommand)]
    Bucket(admin_cli::BucketCmd),
    /// Save the cluster's metadata (keys, buckets, objects, layout) to a file
    /// (through a node's admin API)
    #[command(subcommand)]
    Admin(admin_cli::AdminCmd),
    /// Start a local N-node cluster on loopback (separate `cairn serve` processes)
    /// to try cairn; writes DIR/cluster.json once it serves
    DevCluster(dev_cluster::DevClusterArgs),
    /// Fault-injection run: a local cluster, clients recording every operation,
    /// faults injected (kill -9, SIGSTOP, partitions, slow links, clock skew); then
    /// a verdict on the history (no lost write, linearizable). Exits non-zero on
    /// any loss, violation or unmet check
    Chaos(ChaosArgs),
    /// Back up buckets to a local folder or any S3 endpoint (full, incremental,
    /// differential), list the backups, make a backup key
    #[command(subcommand)]
    Backup(backup_cli::BackupCmd),
    /// Restore a backup (by id, or the latest at or before a time) into a running
    /// cairn or any S3 endpoint
    Restore(backup_cli::RestoreArgs),
}

#[derive(Args)]
struct ChaosArgs {
    /// Check a saved history again instead of running
    #[arg(long, value_name = "FILE")]
    check: Option<PathBuf>,
    /// How long the clients and the nemesis run
    #[arg(long, default_value = "60s")]
    duration: String,
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    #[arg(long, default_value_t = 3)]
    zones: usize,
    /// Concurrent clients (a client waiting on a paused node waits out its timeout)
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Keep every key in a replicated bucket (by default the `e/` keys are in an
    /// EC:3+2 bucket)
    #[arg(long)]
    replicated_only: bool,
    /// Keys the clients share
    #[arg(long, default_value_t = 9)]
    keys: usize,
    /// Fault kinds, comma-separated (kill, pause, partition, slow, clock, member,
    /// corrupt, disk; clock needs libfaketime, disk needs root to mount a tmpfs)
    #[arg(
        long,
        default_value = "kill,pause,partition,slow,clock,member,corrupt,disk"
    )]
    faults: String,
    /// Mean time between the starts of two faults
    #[arg(long, default_value = "4s")]
    fault_interval: String,
    /// A fault lasts from this to twice this
    #[arg(long, default_value = "3s")]
    fault_length: String,
    /// Nodes faulty at once, at most (a minority keeps the cluster available)
    #[arg(long, default_value_t = 2)]
    max_faulty: usize,
    /// A request without an answer after this is recorded as indeterminate
    #[arg(long, default_value = "5s")]
    request_timeout: String,
    /// Answered operations the run must reach
    #[arg(long, default_value_t = 100)]
    min_acked: usize,
    /// Seed of the clients' and the nemesis's choices (default: random)
    #[arg(long)]
    seed: Option<u64>,
    /// Where the history is saved (default: ./cairn-chaos-<time>.jsonl)
    #[arg(long, value_name = "FILE")]
    history: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    /// Measure the machine's bounds instead, writing test files in DIR
    #[arg(long, value_name = "DIR")]
    limits: Option<PathBuf>,
    /// S3 endpoint to load (http only); several, comma-separated (the nodes of one
    /// cluster), share the workers out between them
    #[arg(long, default_value = "http://127.0.0.1:9000")]
    endpoint: String,
    #[arg(long, env = "CAIRN_ACCESS_KEY", default_value = "")]
    access_key: String,
    #[arg(
        long,
        env = "CAIRN_SECRET_KEY",
        default_value = "",
        hide_env_values = true
    )]
    secret_key: String,
    /// Region to sign requests for
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Bucket to use (created if missing)
    #[arg(long, default_value = "cairn-bench")]
    bucket: String,
    /// Operation mix
    #[arg(long, value_enum, default_value = "put")]
    op: bench::Op,
    /// Object size, e.g. 4KiB, 16MiB, 2GiB [default: 4KiB; 256KiB with --paused-node]
    #[arg(long)]
    size: Option<String>,
    /// Requests in flight (one connection each)
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// How long to run, e.g. 10s [default: 10s unless --ops is given]
    #[arg(long)]
    duration: Option<String>,
    /// Stop after this many operations
    #[arg(long)]
    ops: Option<u64>,
    /// Number of distinct keys (objects written first for get and mixed)
    #[arg(long, default_value_t = 64)]
    keys: usize,
    /// Share of GETs in --op mixed
    #[arg(long, default_value_t = 0.7)]
    get_ratio: f64,
    /// With --op get or mixed: the --keys objects are there already (written by
    /// an earlier run with the same --bucket and --keys), read them as they are
    #[arg(long)]
    prepared: bool,
    /// Take the keys in order, each once per --keys operations, instead of at
    /// random (where about a third of --keys reads would read an object again,
    /// perhaps from the page cache)
    #[arg(long)]
    in_order: bool,
    /// Process id of the server, to report its CPU time per operation and peak RSS
    #[arg(long)]
    pid: Option<u32>,
    /// Measure leader failover instead: start a local cluster, kill its Raft leader
    /// --kills times under a write load of --concurrency writers, and report how long
    /// writes stopped each time
    #[arg(long)]
    failover: bool,
    /// With --failover: how many times the leader is killed
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// With --failover or --paused-node: nodes in the local cluster [default: 3;
    /// 5 with --paused-node]
    #[arg(long)]
    nodes: Option<usize>,
    /// Measure GET latency with one node stopped (SIGSTOP) instead: start a local
    /// cluster per --hedge-after value, send --rate GETs a second for --duration
    /// healthy, then as long with one follower paused, and report both
    #[arg(long)]
    paused_node: bool,
    /// With --paused-node: the hedge settings to compare, comma-separated
    #[arg(long, default_value = "auto,off")]
    hedge_after: String,
    /// With --paused-node: GETs sent per second (an open loop: each on its own
    /// connection, whether or not the earlier ones have answered)
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML file with any of the settings below (same names, with underscores, e.g.
    /// `data_dir = "/srv/cairn"`); flags and environment variables override it.
    #[arg(long, env = "CAIRN_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for data and metadata [default: ./cairn-data]
    #[arg(long, env = "CAIRN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address the S3 API listens on [default: 127.0.0.1:9000]
    #[arg(long, env = "CAIRN_S3_ADDRESS", value_name = "HOST:PORT")]
    s3_address: Option<String>,
    /// Address of the admin endpoint (/health, /metrics) [default: 127.0.0.1:9001]
    #[arg(long, env = "CAIRN_ADMIN_ADDRESS", value_name = "HOST:PORT")]
    admin_address: Option<String>,
    /// The region requests must be signed for (SigV4) [default: us-east-1]
    #[arg(long, env = "CAIRN_REGION", value_name = "NAME")]
    region: Option<String>,
    /// Serve virtual-hosted-style requests (http://BUCKET.DOMAIN/KEY) for this base
    /// domain; path-style requests always work
    #[arg(long, env = "CAIRN_BASE_DOMAIN", value_name = "DOMAIN")]
    base_domain: Option<String>,
    /// How long an unreferenced block is kept before it is removed [default: 1h]
    #[arg(long, value_name = "DURATION")]
    gc_grace: Option<String>,
    /// How often garbage collection and upload expiry run [default: 60s]
    #[arg(long, value_name = "DURATION")]
    gc_interval: Option<String>,
    /// Log format on stderr: text or json [default: text]; RUST_LOG sets the level
    #[arg(long, env = "CAIRN_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<String>,
    /// Address other nodes reach this one at; without it the node opens no RPC
    /// listener and is a cluster of one
    #[arg(long, env = "CAIRN_RPC_ADDRESS", value_name = "HOST:PORT")]
    rpc_address: Option<String>,
    /// Address other nodes reach this one at when it is not --rpc-address (a NAT,
    /// a container's port mapping, a proxy) [default: --rpc-address]
    #[arg(long, env = "CAIRN_RPC_ADVERTISE", value_name = "HOST:PORT")]
    rpc_advertise: Option<String>,
    /// Failure zone of this node (copies go to distinct zones) [default: z1]
    #[arg(long, env = "CAIRN_ZONE", value_name = "NAME")]
    zone: Option<String>,
    /// Space this node offers for data, e.g. 2TiB [default: its file system's size]
    #[arg(long, env = "CAIRN_CAPACITY", value_name = "SIZE")]
    capacity: Option<String>,
    /// Bytes per second this node copies at most when moving blocks to their places
    /// after a layout change or a node's return [default: 64MiB]
    #[arg(long, value_name = "SIZE")]
    rebalance_rate: Option<String>,
    /// How often blocks written here while their nodes were down are looked at
    /// again [default: 30s]
    #[arg(long, value_name = "DURATION")]
    move_interval: Option<String>,
    /// How long a node is down before its blocks get stand-in copies on other
    /// nodes (repair) [default: 10m]
    #[arg(long, value_name = "DURATION")]
    repair_after: Option<String>,
    /// How often every node checks all its blocks' copies with nothing changed
    /// [default: 1h]
    #[arg(long, value_name = "DURATION")]
    repair_interval: Option<String>,
    /// Raft log entries between two snapshots of the metadata [default: 50000]
    #[arg(long, value_name = "ENTRIES")]
    snapshot_every: Option<u64>,
    /// Raft log entries kept behind the latest snapshot, for followers a little
    /// behind; one further behind is sent the snapshot [default: 1000]
    #[arg(long, value_name = "ENTRIES")]
    log_keep: Option<u64>,
    /// How long a block received from another node is kept from garbage collection
    /// while the write that sent it may still be under way [default: 10m]
    #[arg(long, value_name = "DURATION")]
    receive_pin: Option<String>,
    /// When a block read also asks the next node while the first has not
    /// answered: auto (after the 95th percentile of recent reads), off, or a
    /// duration such as 20ms [default: auto]
    #[arg(long, value_name = "auto|off|DURATION")]
    hedge_after: Option<String>,
}

/// Logs go to stderr through a background writer thread (`logwriter.rs`), so that a
/// request never waits on the write of its log line. The guard writes out what is
/// buffered at exit.
fn init_logging(json: bool) -> logwriter::Guard {
    use std::io::IsTerminal;
    // openraft narrates every election and membership step at `info`: its warnings
    // and errors are what an operator needs by default.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = logwriter::LogWriter::start();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    if json {
        b.json().init();
    } else {
        b.init();
    }
    guard
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(a) => run_serve(a),
        Cmd::Bench(a) => run_bench(a),
        Cmd::Cluster(c) => admin_cli::run(c),
        Cmd::Scrub(c) => admin_cli::run_scrub(c),
        Cmd::Bucket(c) => admin_cli::run_bucket(c),
        Cmd::Admin(c) => admin_cli::run_admin(c),
        Cmd::DevCluster(a) => dev_cluster::run(a),
        Cmd::Chaos(a) => run_chaos(a),
        Cmd::Backup(c) => backup_cli::run_backup(c),
        Cmd::Restore(a) => backup_cli::run_restore(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    let cfg = config::Config::load(
        a.config.as_deref(),
        config::Overrides {
            data_dir: a.data_dir,
            s3_address: a.s3_address,
            admin_address: a.admin_address,
            region: a.region,
            base_domain: a.base_domain,
            gc_grace: a.gc_grace,
            gc_interval: a.gc_interval,
            log_format: a.log_format,
            rpc_address: a.rpc_address,
            rpc_advertise: a.rpc_advertise,
            zone: a.zone,
            capacity: a.capacity,
            rebalance_rate: a.rebalance_rate,
            move_interval: a.move_interval,
            repair_after: a.repair_after,
            repair_interval: a.repair_interval,
            snapshot_every: a.snapshot_every,
            log_keep: a.log_keep,
            receive_pin: a.receive_pin,
            hedge_after: a.hedge_after,
            // From the environment only: a secret on the command line shows in `ps`.
            cluster_secret: std::env::var("CAIRN_CLUSTER_SECRET").ok(),
        },
    )?;
    let _log_guard = init_logging(cfg.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cairn")
        .build()?;
    rt.block_on(server::serve(cfg))
}

fn run_chaos(a: ChaosArgs) -> anyhow::Result<()> {
    if let Some(file) = &a.check {
        return chaos::check_file(file);
    }
    let faults = a
        .faults
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(chaos::FaultKind::parse)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let history = a.history.unwrap_or_else(|| {
        PathBuf::from(format!(
            "cairn-chaos-{}.jsonl",
            time::OffsetDateTime::now_utc().unix_timestamp()
        ))
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(chaos::run(chaos::ChaosOptions {
        nodes: a.nodes,
        zones: a.zones,
        duration: config::parse_duration(&a.duration)?,
        clients: a.clients,
        keys: a.keys,
        faults,
        fault_interval: config::parse_duration(&a.fault_interval)?,
        fault_length: config::parse_duration(&a.fault_length)?,
        max_faulty: a.max_faulty,
        request_timeout: config::parse_duration(&a.request_timeout)?,
        min_acked: a.min_acked,
        seed: a.seed.unwrap_or_else(rand::random),
        history,
        erasure_coded: !a.replicated_only,
    }))
}

fn run_bench(a: BenchArgs) -> anyhow::Result<()> {
    if let Some(dir) = &a.limits {
        return bench::limits(dir, a.json);
    }
    if a.failover {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(failover::run(failover::FailoverOptions {
            nodes: a.nodes.unwrap_or(3),
            kills: a.kills,
            writers: a.concurrency,
            json: a.json,
        }));
    }
    if a.paused_node {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(pausebench::run(pausebench::PauseOptions {
            nodes: a.nodes.unwrap_or(5),
            hedges: a
                .hedge_after
                .split(',')
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect(),
            rate: a.rate,
            size: config::parse_size(a.size.as_deref().unwrap_or("256KiB"))? as u64,
            keys: a.keys,
            duration: config::parse_duration(a.duration.as_deref().unwrap_or("10s"))?,
            json: a.json,
        }));
    }
    if a.access_key.is_empty() || a.secret_key.is_empty() {
        anyhow::bail!(
            "give --access-key and --secret-key (or CAIRN_ACCESS_KEY / CAIRN_SECRET_KEY)"
        );
    }
    let duration = match (&a.duration, a.ops) {
        (Some(d), _) => Some(config::parse_duration(d)?),
        (None, None) => Some(std::time::Duration::from_secs(10)),
        (None, Some(_)) => None,
    };
    let size = config::parse_size(a.size.as_deref().unwrap_or("4KiB"))? as u64;
    if a.concurrency == 0 {
        anyhow::bail!("--concurrency must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench::run(bench::Options {
        endpoint: a.endpoint,
        access_key: a.access_key,
        secret_key: a.secret_key,
        region: a.region,
        bucket: a.bucket,
        op: a.op,
        size,
        concurrency: a.concurrency,
        duration,
        ops: a.ops,
        keys: a.keys,
        get_ratio: a.get_ratio,
        prepared: a.prepared,
        in_order: a.in_order,
        pid: a.pid,
        json: a.json,
    }))
}
