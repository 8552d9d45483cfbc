//! Crashes, corruption, garbage collection, shutdown and full disks, with real
//! processes and real files.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use common::*;

fn count_block_files(data_dir: &std::path::Path) -> usize {
    let mut n = 0;
    for sub in std::fs::read_dir(data_dir.join("blocks")).unwrap() {
        n += std::fs::read_dir(sub.unwrap().path()).unwrap().count();
    }
    n
}

/// Concurrent PUTs and overwrites, kill -9 mid-flight, restart: every acknowledged
/// object reads back byte-identical; no unacknowledged object is half-visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_no_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let mut srv = Server::start_in(&data_dir, &[]);
    let s3 = srv.client();
    s3.create_bucket().bucket("crash").send().await.unwrap();

    // Per key: (last acknowledged version, version in flight).
    type State = HashMap<String, (Option<u64>, Option<u64>)>;
    let state: Arc<Mutex<State>> = Arc::new(Mutex::new(HashMap::new()));
    let size_of = |key_idx: usize, version: u64| -> usize {
        match (key_idx + version as usize) % 3 {
            0 => 1000,                // inline
            1 => 300_000,             // one block
            _ => (4 << 20) + 777_000, // two blocks
        }
    };
    let mut tasks = Vec::new();
    for w in 0..6usize {
        let s3 = s3.clone();
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            for version in 0..1000u64 {
                let key_idx = w * 2 + (version as usize % 2);
                let key = format!("k{key_idx}");
                let data = bytes(size_of(key_idx, version), (key_idx as u64) << 32 | version);
                state.lock().unwrap().entry(key.clone()).or_default().1 = Some(version);
                let res = s3
                    .put_object()
                    .bucket("crash")
                    .key(&key)
                    .body(ByteStream::from(data))
                    .send()
                    .await;
                if res.is_err() {
                    return;
                }
                let mut st = state.lock().unwrap();
                let e = st.get_mut(&key).unwrap();
                e.0 = Some(version);
                e.1 = None;
            }
        }));
    }
    // Let writes flow for a while, then kill -9 in the middle of them.
    let acked = |st: &State| st.values().filter(|v| v.0.is_some()).count();
    for _ in 0..400 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        if acked(&state.lock().unwrap()) >= 12 {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    srv.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let snapshot = state.lock().unwrap().clone();
    assert!(
        acked(&snapshot) >= 6,
        "too few writes were acknowledged before the kill: {snapshot:?}"
    );

    let srv = Server::start_in(&data_dir, &[]);
    let s3 = srv.client();
    let mut checked = 0;
    for (key, (last, inflight)) in &snapshot {
        let key_idx: usize = key[1..].parse().unwrap();
        let got = match s3.get_object().bucket("crash").key(key).send().await {
            Ok(o) => Some(o.body.collect().await.unwrap().into_bytes().to_vec()),
            Err(e) => {
                assert_eq!(err_of(&e).0, "NoSuchKey", "{key}");
                None
            }
        };
        let matches = |v: u64| {
            got.as_deref() == Some(&bytes(size_of(key_idx, v), (key_idx as u64) << 32 | v)[..])
        };
        let ok = match (last, inflight) {
            (Some(l), Some(i)) => matches(*l) || matches(*i),
            (Some(l), None) => matches(*l),
            (None, Some(i)) => got.is_none() || matches(*i),
            (None, None) => got.is_none(),
        };
        assert!(
            ok,
            "{key}: acknowledged {last:?}, in flight {inflight:?}, got {:?} bytes",
            got.map(|g| g.len())
        );
        checked += 1;
    }
    assert_eq!(checked, 12);
    // The writes since the last checkpoint were in the Raft log only: the restart
    // applied them again.
    assert!(
        srv.log_shows("applied again from the Raft log"),
        "{}",
        srv.log()
    );
    // A restart removes temp files of writes that were cut off.
    assert_eq!(std::fs::read_dir(data_dir.join("tmp")).unwrap().count(), 0);
}

/// A flipped byte in the second block: the GET never returns a wrong byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_in_second_block_is_never_served() {
    let srv = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("rot").send().await.unwrap();
    let data = bytes((8 << 20) + 1000, 42);
    s3.put_object()
        .bucket("rot")
        .key("v")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();
    // The second block: the one holding bytes [4 MiB, 8 MiB).
    let second = blake3_hex(&data[4 << 20..8 << 20]);
    let path = srv.dir.join("blocks").join(&second[..2]).join(&second);
    let mut raw = std::fs::read(&path).unwrap();
    let at = raw.len() / 2;
    raw[at] ^= 0x40;
    std::fs::write(&path, raw).unwrap();

    // Whole-object GET: the response starts with the good first block, then the
    // connection is cut. Every byte received must be right.
    let resp = s3.get_object().bucket("rot").key("v").send().await.unwrap();
    let mut stream = resp.body;
    let mut received = Vec::new();
    let mut failed = false;
    loop {
        match stream.next().await {
            Some(Ok(chunk)) => received.extend_from_slice(&chunk),
            Some(Err(_)) => {
                failed = true;
                break;
            }
            None => break,
        }
    }
    assert!(failed, "the body must end in an error, not look complete");
    assert!(received.len() < data.len());
    assert_eq!(received, data[..received.len()], "a wrong byte was served");

    // A ranged GET that starts in the bad block fails before the response starts.
    let e = s3
        .get_object()
        .bucket("rot")
        .key("v")
        .range("bytes=5000000-5000100")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e), ("InternalError".into(), 500));
    // The good parts still serve.
    let got = s3
        .get_object()
        .bucket("rot")
        .key("v")
        .range("bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().to_vec(),
        data[..100]
    );
    assert!(srv.log_shows("BLAKE3 mismatch"), "the corruption is logged");
}

/// `cairn scrub ARGS... --json` against a single server; its JSON.
fn scrub_json(srv: &Server, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(common::binary())
        .arg("scrub")
        .args(args)
        .args(["--json", "--admin-endpoint", &srv.admin, "--data-dir"])
        .arg(&srv.dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "scrub {args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// On a node of its own, scrub finds a bad copy it has nowhere to fetch again:
/// the copy is counted as unrepairable and kept in the quarantine, and a GET of
/// the object fails rather than serve it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_on_a_lone_node_reports_what_it_cannot_repair() {
    let srv = Server::start();
    let s3 = srv.client();
    s3.create_bucket().bucket("rot").send().await.unwrap();
    let data = bytes(100 << 10, 7);
    s3.put_object()
        .bucket("rot")
        .key("v")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();
    let h = blake3_hex(&data);
    let path = srv.dir.join("blocks").join(&h[..2]).join(&h);
    let mut raw = std::fs::read(&path).unwrap();
    let at = raw.len() / 2;
    raw[at] ^= 0x40;
    std::fs::write(&path, raw).unwrap();
    let srv = tokio::task::spawn_blocking(move || {
        // Only "start" and "pause" change anything; they print a table.
        let out = std::process::Command::new(common::binary())
            .args([
                "scrub",
                "start",
                "--admin-endpoint",
                &srv.admin,
                "--data-dir",
            ])
            .arg(&srv.dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let v = scrub_json(&srv, &["status"]);
            let n = &v["nodes"][0];
            if n["running"] == false && n["blocks_checked"].as_u64() >= Some(1) {
                assert_eq!(n["corrupt"].as_u64(), Some(1), "{v}");
                assert_eq!(n["unrepairable"].as_u64(), Some(1), "{v}");
                assert_eq!(n["repaired"].as_u64(), Some(0), "{v}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the pass did not end: {v}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        srv
    })
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_dir(srv.dir.join("quarantine"))
            .unwrap()
            .count(),
        1
    );
    assert!(!path.exists());
    let e = s3.get_object().bucket("rot").key("v").send().await;
    assert!(e.is_err(), "a GET served an object whose only copy is bad");
    assert!(srv.log_shows("no good copy of the block could be fetched"));
}

fn blake3_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// Overwritten and deleted data is removed from disk once the grace period passed;
/// data still named is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreferenced_blocks_are_collected_after_grace() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let srv = Server::start_in(&data_dir, &["--gc-grace", "1s", "--gc-interval", "200ms"]);
    let s3 = srv.client();
    s3.create_bucket().bucket("gcb").send().await.unwrap();
    let keep = bytes(5 << 20, 1);
    s3.put_object()
        .bucket("gcb")
        .key("keep")
        .body(ByteStream::from(keep.clone()))
        .send()
        .await
        .unwrap();
    s3.put_object()
        .bucket("gcb")
        .key("old")
        .body(ByteStream::from(bytes(5 << 20, 2)))
        .send()
        .await
        .unwrap();
    assert_eq!(count_block_files(&data_dir), 4);
    s3.put_object()
        .bucket("gcb")
        .key("old")
        .body(ByteStream::from(bytes(100_000, 3)))
        .send()
        .await
        .unwrap();
    s3.delete_object()
        .bucket("gcb")
        .key("keep-not")
        .send()
        .await
        .unwrap();
    // An orphan block file (as a crash between block write and commit leaves).
    let orphan = blake3_hex(b"orphan");
    let orphan_path = data_dir.join("blocks").join(&orphan[..2]).join(&orphan);
    std::fs::write(&orphan_path, b"whatever").unwrap();
    let mut n = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        n = count_block_files(&data_dir);
        if n == 4 {
            break;
        }
    }
    // Two blocks of 'keep', one of the new 'old', and the orphan (removed by the sweep,
    // which runs at start and then every few hours).
    assert_eq!(n, 4);
    assert!(orphan_path.exists());
    let got = s3
        .get_object()
        .bucket("gcb")
        .key("keep")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().to_vec(),
        keep
    );
    // And a shard no record names (as an erasure-coded write cut short leaves).
    let shard_owner = blake3_hex(b"orphan shard");
    let shard_dir = data_dir
        .join("blocks")
        .join(&shard_owner[..2])
        .join(format!("{shard_owner}.s"));
    std::fs::create_dir_all(&shard_dir).unwrap();
    std::fs::write(shard_dir.join("3+2.1"), b"whatever").unwrap();
    drop(srv);
    // The sweep at start removes the never-named block and shard once they are older
    // than the grace.
    std::thread::sleep(Duration::from_millis(1100));
    let _srv = Server::start_in(&data_dir, &["--gc-grace", "1s", "--gc-interval", "200ms"]);
    for _ in 0..100 {
        if !orphan_path.exists() && !shard_dir.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!orphan_path.exists(), "orphan block was not swept");
    assert!(!shard_dir.exists(), "orphan shard was not swept");
    assert_eq!(count_block_files(&data_dir), 3);
}

/// SIGTERM during an upload: the upload finishes, then the server exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_upload_finish() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let mut srv = Server::start_in(&data_dir, &[]);
    let s3 = srv.client();
    s3.create_bucket().bucket("term").send().await.unwrap();
    let data = bytes(6 << 20, 5);
    // A body that trickles in over about a second.
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = data
        .chunks(256 << 10)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    let slow = futures::stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(Duration::from_millis(40)).await;
        c
    });
    let body =
        http_body_util::StreamBody::new(Box::pin(slow.map(|r| r.map(http_body::Frame::data))));
    let sized = aws_smithy_types::body::SdkBody::from_body_1_x(SizedBody {
        inner: body,
        len: data.len() as u64,
    });
    let s3c = s3.clone();
    let upload = tokio::spawn(async move {
        s3c.put_object()
            .bucket("term")
            .key("slow")
            .content_length(6 << 20)
            .body(ByteStream::new(sized))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    srv.sigterm();
    let res = upload.await.unwrap();
    assert!(res.is_ok(), "upload in flight at SIGTERM failed: {res:?}");
    assert_eq!(srv.wait_exit(Duration::from_secs(30)), Some(0));
    let srv = Server::start_in(&data_dir, &[]);
    let got = srv
        .client()
        .get_object()
        .bucket("term")
        .key("slow")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().to_vec(),
        data
    );
}

use futures::StreamExt;

/// A body of known length for the SDK (which needs one to sign).
struct SizedBody<B> {
    inner: B,
    len: u64,
}

impl<B: http_body::Body + Unpin> http_body::Body for SizedBody<B> {
    type Data = B::Data;
    type Error = B::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len)
    }
}

/// A data directory of a newer format is refused with a clear message, untouched.
#[test]
fn newer_data_dir_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::write(data_dir.join("FORMAT"), "cairn-data 99\n").unwrap();
    let err = match Server::try_start_in(&data_dir, &[], &[]) {
        Ok(_) => panic!("a newer data directory was accepted"),
        Err(e) => e,
    };
    assert!(err.contains("newer than this cairn knows"), "{err}");
    assert_eq!(
        std::fs::read_to_string(data_dir.join("FORMAT")).unwrap(),
        "cairn-data 99\n"
    );
    assert_eq!(std::fs::read_dir(&data_dir).unwrap().count(), 1);
}

/// The admin endpoint answers health and metrics, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_health_and_metrics() {
    let srv = Server::start();
    let s3 = srv.client();
    s3.list_buckets().send().await.unwrap();
    let (status, body) = http_get(&srv.admin, "/health").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = http_get(&srv.admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("cairn_s3_requests_total"), "{body}");
    let (status, _) = http_get(&srv.admin, "/anything-else").await;
    assert_eq!(status, 404);
}

/// While the node starts, the admin port answers /health with 503 and the reason, and
/// the S3 port is not listening; once it serves, /health is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_until_the_node_serves() {
    use std::io::BufRead;
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (s3_port, admin_port) = (free_port(), free_port());
    let root = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(root.path().join("data"))
        .args(["--s3-address", &format!("127.0.0.1:{s3_port}")])
        .args(["--admin-address", &format!("127.0.0.1:{admin_port}")])
        .env("CAIRN_ACCESS_KEY", ACCESS_KEY)
        .env("CAIRN_SECRET_KEY", SECRET_KEY)
        .env("CAIRN_UNSAFE_TEST_START_DELAY_MS", "3000")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let _guard = Kill(child);
    let admin = format!("http://127.0.0.1:{admin_port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", admin_port))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the admin port never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = http_get(&admin, "/health").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("starting"), "{body}");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", s3_port))
            .await
            .is_err(),
        "the S3 port listens before the node can serve"
    );
    // Wait for the banner's last line, then health turns 200.
    let ready = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
            .any(|l| l.trim() == "ready")
    })
    .await
    .unwrap();
    assert!(ready, "the server never printed ready");
    let (status, body) = http_get(&admin, "/health").await;
    assert_eq!((status, body.trim()), (200, "ok"));
}

/// Generated credentials: printed once with the secret, stored 0600, reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_credentials_work_and_persist() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let env = [("CAIRN_ACCESS_KEY", ""), ("CAIRN_SECRET_KEY", "")];
    let srv = Server::try_start_in(&data_dir, &[], &env).unwrap();
    let line = |srv: &Server, p: &str| {
        srv.stdout_lines
            .iter()
            .find_map(|l| l.strip_prefix(p).map(|v| v.trim().to_string()))
    };
    let ak = line(&srv, "access key id:").unwrap();
    let sk = line(&srv, "secret key:").expect("the secret is printed at first start");
    let mode = std::fs::metadata(data_dir.join("credentials"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    client_for(&srv.endpoint, &ak, &sk)
        .create_bucket()
        .bucket("gen")
        .send()
        .await
        .unwrap();
    drop(srv);
    let srv = Server::try_start_in(&data_dir, &[], &env).unwrap();
    assert_eq!(line(&srv, "access key id:").unwrap(), ak);
    assert!(
        line(&srv, "secret key:").is_none(),
        "the secret is printed only once"
    );
    client_for(&srv.endpoint, &ak, &sk)
        .head_bucket()
        .bucket("gen")
        .send()
        .await
        .unwrap();
}

async fn http_get(base: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A 40 MiB tmpfs mounted under `root` (unmounted when dropped), or `None`, the
/// test `name` said to be skipped, where mounting is not allowed (not root).
fn small_disk(root: &std::path::Path, name: &str) -> Option<common::Mount> {
    let mnt = root.join("small-disk");
    std::fs::create_dir_all(&mnt).unwrap();
    common::tmpfs(&mnt, "40m", name)
}

/// A full disk fails writes with a clear error, loses nothing stored, and writes work
/// again once space is freed, without a restart. Runs on a size-limited tmpfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_clearly_and_recovers() {
    let root_guard = tempfile::tempdir().unwrap();
    let Some(guard) = small_disk(root_guard.path(), "full_disk_fails_clearly_and_recovers") else {
        return;
    };
    let mnt = guard.0.clone();
    let data_dir = mnt.join("data");
    let mut srv = Server::start_in(&data_dir, &[]);
    let s3 = srv.client();
    s3.create_bucket().bucket("full").send().await.unwrap();
    // Ballast that the "operator" deletes later to free space.
    std::fs::write(mnt.join("ballast"), vec![0u8; 12 << 20]).unwrap();
    let mut stored = Vec::new();
    let mut full_error = None;
    for i in 0..40u64 {
        let data = bytes(3 << 20, i);
        match s3
            .put_object()
            .bucket("full")
            .key(format!("o{i}"))
            .body(ByteStream::from(data.clone()))
            .send()
            .await
        {
            Ok(_) => stored.push((i, data)),
            Err(e) => {
                full_error = Some(err_of(&e));
                break;
            }
        }
    }
    assert_eq!(
        full_error,
        Some(("XCairnStorageFull".into(), 507)),
        "after {} objects",
        stored.len()
    );
    assert!(!stored.is_empty());
    assert!(srv.log_shows("disk full"), "the cause is logged");
    // Nothing stored was lost, and reads still work on the full disk.
    for (i, data) in &stored {
        let got = s3
            .get_object()
            .bucket("full")
            .key(format!("o{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            &got.body.collect().await.unwrap().into_bytes().to_vec(),
            data
        );
    }
    // Free space; writes succeed again without a restart.
    std::fs::remove_file(mnt.join("ballast")).unwrap();
    let data = bytes(3 << 20, 999);
    let mut ok = false;
    for _ in 0..50 {
        if s3
            .put_object()
            .bucket("full")
            .key("after")
            .body(ByteStream::from(data.clone()))
            .send()
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "writes did not resume after space was freed");
    let got = s3
        .get_object()
        .bucket("full")
        .key("after")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().to_vec(),
        data
    );
    srv.kill9();
    drop(guard);
}

/// Objects acknowledged just before the disk filled (applied, not yet in a durable
/// checkpoint of the metadata) are never read as missing while the metadata
/// database recovers from the checkpoint that failed: a GET answers the object,
/// or 503 while it recovers, never 404. Runs on a size-limited tmpfs. (Found by
/// `cairn chaos` with disk faults: the reopened database was read at its last
/// checkpoint.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_makes_acknowledged_objects_look_missing() {
    let root_guard = tempfile::tempdir().unwrap();
    let Some(guard) = small_disk(
        root_guard.path(),
        "a_full_disk_never_makes_acknowledged_objects_look_missing",
    ) else {
        return;
    };
    let mnt = guard.0.clone();
    let mut srv = Server::start_in(&mnt.join("data"), &[]);
    let s3 = srv.client();
    s3.create_bucket().bucket("full").send().await.unwrap();
    // Let the bucket reach a checkpoint; the objects below come after it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let objects: Vec<(String, Vec<u8>)> = (0..20u64)
        .map(|i| (format!("k{i}"), bytes(1000, i)))
        .collect();
    for (k, v) in &objects {
        s3.put_object()
            .bucket("full")
            .key(k)
            .body(ByteStream::from(v.clone()))
            .send()
            .await
            .unwrap();
    }
    // The disk fills at once.
    common::fill_disk(&mnt.join("ballast"));
    // Past the checkpoint interval: every read is the object or 503.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let (mut served, mut unavailable) = (0, 0);
    while std::time::Instant::now() < until {
        for (k, v) in &objects {
            match s3.get_object().bucket("full").key(k).send().await {
                Ok(got) => {
                    assert_eq!(&got.body.collect().await.unwrap().into_bytes().to_vec(), v);
                    served += 1;
                }
                Err(e) => {
                    let (code, status) = err_of(&e);
                    assert_eq!(status, 503, "{k}: {code} while the disk is full");
                    unavailable += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("with the disk full: {served} reads served, {unavailable} answered 503");
    // Space again: every object reads back, without a restart.
    std::fs::remove_file(mnt.join("ballast")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for (k, v) in &objects {
        loop {
            match s3.get_object().bucket("full").key(k).send().await {
                Ok(got) => {
                    assert_eq!(&got.body.collect().await.unwrap().into_bytes().to_vec(), v);
                    break;
                }
                Err(e) => {
                    assert_eq!(err_of(&e).1, 503, "{k}: {e:?}");
                    assert!(std::time::Instant::now() < deadline, "{k} never came back");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    srv.kill9();
    drop(guard);
}

/// A node started again on a full disk does not give up: once space is freed it
/// serves, everything stored before intact. Runs on a size-limited tmpfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_on_a_full_disk_serves_once_space_is_freed() {
    let root_guard = tempfile::tempdir().unwrap();
    let Some(guard) = small_disk(
        root_guard.path(),
        "a_node_started_on_a_full_disk_serves_once_space_is_freed",
    ) else {
        return;
    };
    let mnt = guard.0.clone();
    let data_dir = mnt.join("data");
    let mut srv = Server::start_in(&data_dir, &[]);
    let s3 = srv.client();
    s3.create_bucket().bucket("fulldisk").send().await.unwrap();
    let data = bytes(1 << 20, 7);
    s3.put_object()
        .bucket("fulldisk")
        .key("kept")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();
    srv.kill9();
    // Fill the disk to the last byte.
    common::fill_disk(&mnt.join("ballast"));
    // Start it again; free the space a few seconds into its start.
    let dir = data_dir.clone();
    let starting = std::thread::spawn(move || Server::try_start_in(&dir, &[], &[]));
    tokio::time::sleep(Duration::from_secs(4)).await;
    std::fs::remove_file(mnt.join("ballast")).unwrap();
    let mut srv = tokio::task::spawn_blocking(move || starting.join().unwrap())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the node did not serve once space was freed: {e}"));
    let s3 = srv.client();
    let mut ok = false;
    for _ in 0..100 {
        if s3
            .put_object()
            .bucket("fulldisk")
            .key("after")
            .body(ByteStream::from(vec![1u8; 4096]))
            .send()
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "writes did not resume: {}", srv.log());
    let got = s3
        .get_object()
        .bucket("fulldisk")
        .key("kept")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.body.collect().await.unwrap().into_bytes().to_vec(),
        data
    );
    srv.kill9();
    drop(guard);
}

/// Multipart uploads abandoned for longer than `multipart_expiry` are aborted and
/// their parts reclaimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_multipart_uploads_expire() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let conf = root.path().join("cairn.toml");
    std::fs::write(
        &conf,
        "multipart_expiry = \"2s\"\ngc_grace = \"1s\"\ngc_interval = \"200ms\"\n",
    )
    .unwrap();
    let srv = Server::start_in(&data_dir, &["--config", conf.to_str().unwrap()]);
    let s3 = srv.client();
    s3.create_bucket().bucket("mpx").send().await.unwrap();
    let up = s3
        .create_multipart_upload()
        .bucket("mpx")
        .key("left")
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap();
    s3.upload_part()
        .bucket("mpx")
        .key("left")
        .upload_id(id)
        .part_number(1)
        .body(ByteStream::from(bytes(5 << 20, 77)))
        .send()
        .await
        .unwrap();
    assert_eq!(count_block_files(&data_dir), 2);
    let mut gone = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ups = s3
            .list_multipart_uploads()
            .bucket("mpx")
            .send()
            .await
            .unwrap();
        if ups.uploads().is_empty() && count_block_files(&data_dir) == 0 {
            gone = true;
            break;
        }
    }
    assert!(
        gone,
        "the abandoned upload and its parts were not reclaimed"
    );
    let e = s3
        .list_parts()
        .bucket("mpx")
        .key("left")
        .upload_id(id)
        .send()
        .await
        .unwrap_err();
    assert_eq!(err_of(&e).0, "NoSuchUpload");
}
