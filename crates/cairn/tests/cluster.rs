//! A node with an RPC address: the cluster secret guards it, and its settings are
//! checked at start.

mod common;

use std::time::Duration;

use common::*;

const SECRET: &str = "a-cluster-secret-of-some-length";

fn rpc_address(srv: &Server) -> String {
    srv.stdout_lines
        .iter()
        .find_map(|l| l.strip_prefix("RPC address:"))
        .and_then(|v| v.split_whitespace().next())
        .expect("the banner names the RPC address")
        .to_string()
}

#[test]
fn an_rpc_address_needs_a_cluster_secret() {
    let d = tempfile::tempdir().unwrap();
    let err = Server::try_start_in(
        &d.path().join("data"),
        &["--rpc-address", "127.0.0.1:0"],
        &[],
    )
    .err()
    .expect("started without a cluster secret");
    assert!(err.contains("cluster_secret"), "{err}");
    let err = Server::try_start_in(
        &d.path().join("data2"),
        &["--rpc-address", "127.0.0.1:0"],
        &[("CAIRN_CLUSTER_SECRET", "short")],
    )
    .err()
    .expect("started with a short cluster secret");
    assert!(err.contains("at least 16"), "{err}");
}

#[test]
fn a_peer_without_the_secret_is_refused_and_the_refusal_logged() {
    let d = tempfile::tempdir().unwrap();
    let srv = Server::try_start_in(
        &d.path().join("data"),
        &["--rpc-address", "127.0.0.1:0", "--zone", "z2"],
        &[("CAIRN_CLUSTER_SECRET", SECRET)],
    )
    .unwrap();
    let addr = rpc_address(&srv);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let wrong = cairn_net::Identity::new(99, b"not-the-cluster-secret");
        match cairn_net::Client::connect(&addr, &wrong, Duration::from_secs(5)).await {
            Err(cairn_net::RpcError::Refused { reason, .. }) => {
                assert!(reason.contains("secret"), "{reason}")
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a peer without the secret was accepted"),
        }
        // The right secret gets in, and the node answers as the leader of its
        // cluster of one.
        let right = cairn_net::Identity::new(98, SECRET.as_bytes());
        let c = cairn_net::Client::connect(&addr, &right, Duration::from_secs(5))
            .await
            .unwrap();
        let answer = c
            .call(
                cairn_meta::raft::network::SVC_READ_INDEX,
                bytes::Bytes::from_static(&[1]),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert!(!answer.is_empty());
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !srv.log_shows("does not hold this cluster's secret") {
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal in the log:\n{}",
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(srv.log_shows("RPC connection refused"));
}

fn cairn(args: &[&str]) -> std::process::Output {
    std::process::Command::new(binary())
        .args(args)
        .env_remove("CAIRN_ADMIN_TOKEN")
        .output()
        .unwrap()
}

/// Two real nodes: the second, which started as a cluster of its own, joins the
/// first with `cairn cluster join`; then a PUT through one node reads back at once
/// through the other.
#[test]
fn a_node_joins_with_cluster_join_and_serves_the_same_data() {
    let d = tempfile::tempdir().unwrap();
    let env = [("CAIRN_CLUSTER_SECRET", SECRET)];
    let a = Server::try_start_in(
        &d.path().join("a/data"),
        &["--rpc-address", "127.0.0.1:0", "--zone", "z1"],
        &env,
    )
    .unwrap();
    let b = Server::try_start_in(
        &d.path().join("b/data"),
        &["--rpc-address", "127.0.0.1:0", "--zone", "z2"],
        &env,
    )
    .unwrap();
    let b_data = d.path().join("b/data");
    let b_data = b_data.to_str().unwrap();
    // A wrong admin token changes nothing.
    let out = cairn(&[
        "cluster",
        "join",
        &rpc_address(&a),
        "--admin-endpoint",
        &b.admin,
        "--admin-token",
        "wrong",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin token"),
        "{out:?}"
    );
    // The right one (read from the node's data directory) joins.
    let b_joins = |member: &str| {
        cairn(&[
            "cluster",
            "join",
            member,
            "--admin-endpoint",
            &b.admin,
            "--data-dir",
            b_data,
        ])
    };
    let out = b_joins(&rpc_address(&a));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cairn(&["cluster", "status", "--json", "--admin-endpoint", &a.admin]);
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 2, "{status}");
    // Joining again through a member of its cluster (a join whose answer was
    // lost, asked again) completes and changes nothing.
    let out = b_joins(&rpc_address(&a));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cairn(&["cluster", "status", "--json", "--admin-endpoint", &a.admin]);
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["members"], status["members"]);
    assert_eq!(again["nodes"].as_array().unwrap().len(), 2, "{again}");
    // A third node's address is not a member: a node of a cluster of two
    // cannot move to it.
    let c = Server::try_start_in(
        &d.path().join("c/data"),
        &["--rpc-address", "127.0.0.1:0", "--zone", "z3"],
        &env,
    )
    .unwrap();
    let out = b_joins(&rpc_address(&c));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already a member"),
        "{out:?}"
    );
    drop(c);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (ca, cb) = (a.client(), b.client());
        ca.create_bucket().bucket("shared").send().await.unwrap();
        for (i, (from, to)) in [(&ca, &cb), (&cb, &ca)].into_iter().enumerate() {
            let key = format!("k{i}");
            let body = bytes(3000, i as u64);
            from.put_object()
                .bucket("shared")
                .key(&key)
                .body(body.clone().into())
                .send()
                .await
                .unwrap();
            let got = to
                .get_object()
                .bucket("shared")
                .key(&key)
                .send()
                .await
                .unwrap();
            assert_eq!(
                got.body.collect().await.unwrap().into_bytes().as_ref(),
                &body[..]
            );
        }
        let listed = cb.list_objects_v2().bucket("shared").send().await.unwrap();
        assert_eq!(listed.contents().len(), 2);

        // Objects in blocks: with two nodes, each block has a copy on both.
        let big = bytes(10 << 20, 7);
        ca.put_object()
            .bucket("shared")
            .key("big")
            .body(big.clone().into())
            .send()
            .await
            .unwrap();
        let got = cb
            .get_object()
            .bucket("shared")
            .key("big")
            .send()
            .await
            .unwrap();
        assert_eq!(
            got.body.collect().await.unwrap().into_bytes().as_ref(),
            &big[..]
        );
    });
    let expect = block_hashes(&bytes(10 << 20, 7), 4 << 20);
    for node in ["a", "b"] {
        let on_disk = block_files(&d.path().join(node).join("data"));
        for h in &expect {
            assert!(on_disk.contains(h), "node {node} lacks block {h}");
        }
    }

    // The metadata saved through one node holds a write just made through the
    // other; the file is checked whole, never replaces one, and needs the token.
    rt.block_on(async {
        a.client()
            .put_object()
            .bucket("shared")
            .key("just-written-through-a")
            .body(bytes(10, 9).into())
            .send()
            .await
            .unwrap();
    });
    let snap = d.path().join("meta.snap");
    let save = |token: &[&str]| {
        let mut args = vec!["admin", "snapshot", "save", snap.to_str().unwrap()];
        args.extend_from_slice(&["--admin-endpoint", &b.admin]);
        args.extend_from_slice(token);
        cairn(&args)
    };
    let out = save(&["--admin-token", "wrong"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin token"),
        "{out:?}"
    );
    assert!(!snap.exists());
    let out = save(&["--data-dir", b_data]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 members"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let saved = std::fs::read(&snap).unwrap();
    let holds = |needle: &[u8]| saved.windows(needle.len()).any(|w| w == needle);
    assert!(
        holds(b"just-written-through-a"),
        "the snapshot lacks the last write"
    );
    assert!(holds(b"shared"));
    let out = save(&["--data-dir", b_data]);
    assert!(!out.status.success(), "an existing file was replaced");
    assert_eq!(std::fs::read(&snap).unwrap(), saved);
    // No copy is left in the node's data directory, nor a partial file here.
    let left: Vec<_> = walk_files(d.path())
        .into_iter()
        .filter(|p| {
            let name = p.to_string_lossy();
            name.contains("export-") || name.contains(".partial")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The BLAKE3 addresses of `data` cut into blocks.
fn block_hashes(data: &[u8], block: usize) -> Vec<String> {
    data.chunks(block)
        .map(|c| blake3::hash(c).to_hex().to_string())
        .collect()
}

/// The block files under a data directory, by address.
fn block_files(data_dir: &std::path::Path) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    for d in std::fs::read_dir(data_dir.join("blocks")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            out.insert(f.unwrap().file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// Every file under `dir`.
fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Every bucket, and every object of each with its bytes, through S3.
async fn everything(s3: &aws_sdk_s3::Client) -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    for b in s3.list_buckets().send().await.unwrap().buckets() {
        let name = b.name().unwrap().to_string();
        let listed = s3.list_objects_v2().bucket(&name).send().await.unwrap();
        out.push((name.clone(), String::new(), Vec::new()));
        for o in listed.contents() {
            let key = o.key().unwrap().to_string();
            let got = s3
                .get_object()
                .bucket(&name)
                .key(&key)
                .send()
                .await
                .unwrap();
            let data = got.body.collect().await.unwrap().into_bytes().to_vec();
            out.push((name.clone(), key, data));
        }
    }
    out
}

/// `cairn admin snapshot restore` puts a stopped node's metadata back to a saved
/// snapshot: buckets and objects made since are gone, deleted ones are back
/// with their bytes. It changes nothing while the node runs, from a damaged
/// file, or on a node the snapshot's cluster does not count.
#[test]
fn a_node_restored_from_a_snapshot_is_back_at_its_moment() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("n/data");
    let mut srv = Server::start_in(&data, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s3 = srv.client();
    let then = rt.block_on(async {
        s3.create_bucket().bucket("keep").send().await.unwrap();
        for (k, n) in [("small", 100), ("big", 5 << 20)] {
            s3.put_object()
                .bucket("keep")
                .key(k)
                .body(bytes(n, n as u64).into())
                .send()
                .await
                .unwrap();
        }
        everything(&s3).await
    });
    let snap = d.path().join("saved.snap");
    let out = cairn(&[
        "admin",
        "snapshot",
        "save",
        snap.to_str().unwrap(),
        "--admin-endpoint",
        &srv.admin,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let later = rt.block_on(async {
        s3.create_bucket().bucket("later").send().await.unwrap();
        s3.delete_object()
            .bucket("keep")
            .key("small")
            .send()
            .await
            .unwrap();
        s3.put_object()
            .bucket("keep")
            .key("new")
            .body(bytes(10, 1).into())
            .send()
            .await
            .unwrap();
        everything(&s3).await
    });
    assert_ne!(later, then);
    let restore = |file: &std::path::Path, dir: &std::path::Path| {
        cairn(&[
            "admin",
            "snapshot",
            "restore",
            file.to_str().unwrap(),
            "--data-dir",
            dir.to_str().unwrap(),
        ])
    };
    // Refused while the node runs; it serves on, unchanged.
    let out = restore(&snap, &data);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stop the node"),
        "{out:?}"
    );
    assert_eq!(rt.block_on(everything(&s3)), later);
    srv.sigterm();
    assert_eq!(srv.wait_exit(Duration::from_secs(30)), Some(0));
    // A damaged file is refused.
    let mut bad = std::fs::read(&snap).unwrap();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    let bad_file = d.path().join("bad.snap");
    std::fs::write(&bad_file, &bad).unwrap();
    let out = restore(&bad_file, &data);
    assert!(!out.status.success(), "a damaged snapshot was restored");
    // Another cluster's node is refused.
    let other = Server::start_in(&d.path().join("o/data"), &[]);
    drop(other);
    let out = restore(&snap, &d.path().join("o/data"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a member"),
        "{out:?}"
    );
    // Nothing changed so far: the node starts as it stopped.
    let mut again = Server::start_in(&data, &[]);
    assert_eq!(rt.block_on(everything(&again.client())), later);
    again.sigterm();
    assert_eq!(again.wait_exit(Duration::from_secs(30)), Some(0));

    let out = restore(&snap, &data);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("before-restore"));
    let srv = Server::start_in(&data, &[]);
    let s3 = srv.client();
    assert_eq!(
        rt.block_on(everything(&s3)),
        then,
        "not back at the snapshot's moment"
    );
    // It takes writes again.
    rt.block_on(async {
        s3.put_object()
            .bucket("keep")
            .key("after")
            .body(bytes(10, 2).into())
            .send()
            .await
            .unwrap();
    });
}
