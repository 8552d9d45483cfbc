//! The `cairn` binary: command line, configuration, process wiring.

mod config;
mod datadir;
mod server;

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
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(a) => run_serve(a),
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
        },
    )?;
    init_logging(cfg.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cairn")
        .build()?;
    rt.block_on(server::serve(cfg))
}
