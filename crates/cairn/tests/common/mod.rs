//! Starts real `cairn serve` processes on ephemeral loopback ports for end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

pub const ACCESS_KEY: &str = "CRNTESTE2EACCESS0001";
pub const SECRET_KEY: &str = "e2e-secret-key-0123456789abcdefghijklmn";

pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    pub endpoint: String,
    pub admin: String,
    pub stdout_lines: Vec<String>,
    log: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_cairn")
}

impl Server {
    /// Starts a server on a new data directory.
    pub fn start() -> Server {
        let dir = tempfile::Builder::new()
            .prefix("cairn-e2e-")
            .tempdir()
            .unwrap();
        let mut srv = Server::start_in(&dir.path().join("data"), &[]);
        // Removed after the process is killed (fields drop after `Drop::drop`).
        srv._tmp = Some(dir);
        srv
    }

    /// Starts a server on `data_dir` with extra flags; waits until it serves.
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Server {
        Self::try_start_in(data_dir, extra, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start_in(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        let parent = data_dir.parent().unwrap().to_path_buf();
        std::fs::create_dir_all(&parent).unwrap();
        let log = parent.join("server.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--s3-address",
                "127.0.0.1:0",
                "--admin-address",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("CAIRN_ACCESS_KEY", ACCESS_KEY)
            .env("CAIRN_SECRET_KEY", SECRET_KEY)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(logf);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut endpoint = None;
        let mut admin = None;
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.wait();
                return Err(format!(
                    "cairn exited before serving: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            let t = line.trim().to_string();
            if let Some(v) = t.strip_prefix("S3 endpoint:") {
                endpoint = Some(v.trim().to_string());
            }
            if let Some(v) = t.strip_prefix("admin endpoint:") {
                admin = Some(v.trim().to_string());
            }
            let done = t == "ready";
            lines.push(t);
            if done {
                break;
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        Ok(Server {
            child,
            dir: data_dir.to_path_buf(),
            endpoint: endpoint.unwrap(),
            admin: admin.unwrap(),
            stdout_lines: lines,
            log,
            _tmp: None,
        })
    }

    pub fn client(&self) -> aws_sdk_s3::Client {
        client_for(&self.endpoint, ACCESS_KEY, SECRET_KEY)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the log shows `needle` within a few seconds (logs are written by a
    /// background thread).
    pub fn log_shows(&self, needle: &str) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for the process to exit; returns its status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client_for(endpoint: &str, ak: &str, sk: &str) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(ak, sk, None, None, "test"))
        .force_path_style(true)
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// The S3 error code and HTTP status of a failed SDK call.
pub fn err_of<E>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> (String, u16)
where
    E: aws_sdk_s3::error::ProvideErrorMetadata,
{
    use aws_sdk_s3::error::ProvideErrorMetadata;
    let status = e.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
    (e.code().unwrap_or("").to_string(), status)
}

/// Deterministic pseudo-random bytes.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    let mut h = md5::Md5::new();
    h.update(data);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A tmpfs mounted at a directory, unmounted (lazily) when dropped.
pub struct Mount(pub PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `size` (as mount takes it: "40m") at the directory `at`, or
/// says the test `name` is skipped and answers `None` where mounting is not
/// allowed (not root).
pub fn tmpfs(at: &Path, size: &str, name: &str) -> Option<Mount> {
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED {name}: cannot mount a tmpfs here (needs root)");
        return None;
    }
    Some(Mount(at.to_path_buf()))
}

/// Writes zeros to `path` until the disk it is on is full (the last bytes too).
pub fn fill_disk(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.write_all(&[0u8; 512]);
    let _ = f.sync_all();
}

/// A plain HTTP GET of `path` at `admin` (http://HOST:PORT): the whole response.
pub fn admin_get(admin: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = admin.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Some(out)
}
