//! `cairn bench` against a real server: its requests are signed and counted right.

mod common;

use common::*;

fn bench_with(srv: &Server, secret: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(binary())
        .args([
            "bench",
            "--endpoint",
            &srv.endpoint,
            "--access-key",
            ACCESS_KEY,
        ])
        .args([
            "--secret-key",
            secret,
            "--json",
            "--pid",
            &srv.child.id().to_string(),
        ])
        .args(args)
        .output()
        .unwrap()
}

fn run_bench(srv: &Server, args: &[&str]) -> serde_json::Value {
    let out = bench_with(srv, SECRET_KEY, args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_put_get_mixed() {
    let srv = Server::start();
    let r = run_bench(
        &srv,
        &[
            "--op",
            "put",
            "--size",
            "10KiB",
            "--concurrency",
            "4",
            "--ops",
            "40",
        ],
    );
    assert_eq!(r["ops"], 40);
    assert_eq!(r["errors"], 0);
    assert!(r["put"]["p50_ms"].as_f64().unwrap() > 0.0);
    assert!(r["server_cpu_us_per_op"].as_f64().is_some());
    let r = run_bench(
        &srv,
        &[
            "--op",
            "get",
            "--size",
            "5MiB",
            "--concurrency",
            "2",
            "--ops",
            "6",
            "--keys",
            "3",
        ],
    );
    assert_eq!(r["ops"], 6);
    assert_eq!(r["errors"], 0);
    assert!(r["mib_per_sec"].as_f64().unwrap() > 0.0);
    let r = run_bench(
        &srv,
        &[
            "--op", "mixed", "--size", "1KiB", "--ops", "30", "--keys", "5",
        ],
    );
    assert_eq!(r["ops"], 30);
    assert_eq!(r["errors"], 0);
    // The objects it wrote are really there, with distinct contents.
    let s3 = srv.client();
    let objs = s3
        .list_objects_v2()
        .bucket("cairn-bench")
        .send()
        .await
        .unwrap();
    assert!(objs.contents().len() >= 3);
    let etags: std::collections::HashSet<_> = objs
        .contents()
        .iter()
        .map(|o| o.e_tag().unwrap().to_string())
        .collect();
    assert_eq!(etags.len(), objs.contents().len());
    // A wrong key fails loudly.
    let out = bench_with(&srv, "wrong-secret-000", &["--ops", "2"]);
    assert!(!out.status.success());
}

#[test]
fn bench_limits_reports_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary())
        .args(["bench", "--json", "--limits"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "md5_mib_per_sec_one_core",
        "blake3_mib_per_sec_one_core",
        "disk_fsynced_sequential_write_mib_per_sec",
        "disk_small_fsynced_writes_per_sec",
        "disk_small_fsynced_appends_per_sec",
    ] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "test files are removed"
    );
}
