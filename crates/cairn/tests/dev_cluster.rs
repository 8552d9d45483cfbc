//! Real clusters of `cairn serve` processes started with `cairn dev-cluster`: reads
//! after writes on every node, nodes stopped and restarted, blocks counted on disk
//! where placement puts them, nodes added and removed.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{admin_get, bytes, client_for, err_of};

/// A `cairn dev-cluster` process and what its cluster.json says.
struct Dev {
    child: Child,
    dir: tempfile::TempDir,
    doc: serde_json::Value,
    /// Nodes started again by the test (index → process).
    restarted: HashMap<usize, Child>,
}

impl Dev {
    fn start(nodes: usize, zones: usize, serve_args: &[&str]) -> Dev {
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("cairn-dev-")
                .tempdir()
                .unwrap();
            // Below the kernel's ephemeral range (32768 and up), where a client's
            // outgoing connection could hold a port a node wants to listen on.
            let base = 20000 + (rand_u16() % 630) * 20;
            let mut cmd = Command::new(common::binary());
            cmd.args([
                "dev-cluster",
                "--nodes",
                &nodes.to_string(),
                "--zones",
                &zones.to_string(),
                "--data-dir",
                dir.path().to_str().unwrap(),
                "--base-port",
                &base.to_string(),
            ]);
            for a in serve_args {
                cmd.arg(format!("--serve-arg={a}"));
            }
            cmd.env("CAIRN_ACCESS_KEY", common::ACCESS_KEY)
                .env("CAIRN_SECRET_KEY", common::SECRET_KEY)
                .env("RUST_LOG", "info,openraft=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let mut child = cmd.spawn().unwrap();
            let json = dir.path().join("cluster.json");
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                if let Ok(text) = std::fs::read_to_string(&json) {
                    let doc = serde_json::from_str(&text).unwrap();
                    return Dev {
                        child,
                        dir,
                        doc,
                        restarted: HashMap::new(),
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // a port in use: try other ports
                }
                assert!(Instant::now() < deadline, "dev-cluster did not start");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("dev-cluster failed to start five times");
    }

    fn node(&self, i: usize) -> &serde_json::Value {
        &self.doc["nodes"][i]
    }

    fn client(&self, i: usize) -> aws_sdk_s3::Client {
        client_for(
            self.node(i)["s3_endpoint"].as_str().unwrap(),
            common::ACCESS_KEY,
            common::SECRET_KEY,
        )
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        PathBuf::from(self.node(i)["data_dir"].as_str().unwrap())
    }

    fn id(&self, i: usize) -> u64 {
        u64::from_str_radix(self.node(i)["id"].as_str().unwrap(), 16).unwrap()
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.restarted.remove(&i) {
            let _ = c.kill();
            let _ = c.wait();
            return;
        }
        let pid = self.node(i)["pid"].as_u64().unwrap();
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        wait_gone(pid);
    }

    /// Starts node `i` again with its argv from cluster.json.
    fn restart(&mut self, i: usize) {
        self.restart_with(i, &[]);
    }

    /// As `restart`, with `extra` set in its environment.
    fn restart_with(&mut self, i: usize, extra: &[(&str, &str)]) {
        let argv = self.argv(i);
        self.spawn_as(i, argv, extra);
    }

    /// Starts a new node, with an empty data directory of its own, on node `i`'s
    /// addresses (node `i` stopped): a machine reinstalled under the same address.
    fn start_new_at(&mut self, i: usize) {
        let mut argv = self.argv(i);
        let at = argv.iter().position(|a| a == "--data-dir").unwrap() + 1;
        let fresh = self.dir.path().join(format!("node{i}-new"));
        argv[at] = fresh.to_str().unwrap().to_string();
        self.spawn_as(i, argv, &[]);
    }

    fn argv(&self, i: usize) -> Vec<String> {
        self.node(i)["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    }

    /// Runs `argv` as node `i` and waits until it is healthy.
    fn spawn_as(&mut self, i: usize, argv: Vec<String>, extra: &[(&str, &str)]) {
        let log_path = self.dir.path().join(format!("node{i}.restart.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .envs(self.env())
            .envs(extra.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let admin = self.node(i)["admin_endpoint"].as_str().unwrap().to_string();
        // Kept first: a node that never becomes healthy is still stopped with
        // the cluster.
        let child = self.restarted.entry(i).insert_entry(child).into_mut();
        let up = wait_healthy_or_exit(&admin, child, &log_path);
        assert!(up, "node {i} exited when started again");
    }

    fn env(&self) -> Vec<(String, String)> {
        let secret = std::fs::read_to_string(self.dir.path().join("cluster_secret")).unwrap();
        vec![
            ("CAIRN_ACCESS_KEY".into(), common::ACCESS_KEY.into()),
            ("CAIRN_SECRET_KEY".into(), common::SECRET_KEY.into()),
            ("CAIRN_CLUSTER_SECRET".into(), secret.trim().to_string()),
            (
                "CAIRN_ADMIN_TOKEN".into(),
                self.doc["admin_token"].as_str().unwrap().to_string(),
            ),
        ]
    }

    fn status(&self, i: usize) -> serde_json::Value {
        let out = Command::new(common::binary())
            .args([
                "cluster",
                "status",
                "--json",
                "--admin-endpoint",
                self.node(i)["admin_endpoint"].as_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Index of the node that is the Raft leader.
    fn leader(&self) -> usize {
        let st = self.status(0);
        let leader = st["leader"].as_str().unwrap().to_string();
        (0..self.doc["nodes"].as_array().unwrap().len())
            .find(|i| self.node(*i)["id"].as_str() == Some(leader.as_str()))
            .unwrap()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        for (_, mut c) in self.restarted.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    ((t ^ std::process::id().wrapping_mul(2654435761)) % 65521) as u16
}

fn wait_gone(pid: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        // A zombie child of dev-cluster is gone for our purposes.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `admin` to answer healthy; false when `child` exited first (a port was
/// taken), with its log shown.
fn wait_healthy_or_exit(admin: &str, child: &mut Child, log: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            eprintln!("node exited ({status}) before it was healthy:\n{text}");
            return false;
        }
        if health_ok(admin) {
            return true;
        }
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{admin} did not become healthy within 60 s; its log:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn health_ok(admin: &str) -> bool {
    admin_get(admin, "/health").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
}

/// `GET path` on an admin endpoint: the whole response, or `None` when nothing
/// answers.
/// The block files under a data directory, by address.
fn block_files(data_dir: &Path) -> HashSet<String> {
    let mut out = HashSet::new();
    for d in std::fs::read_dir(data_dir.join("blocks")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            out.insert(f.unwrap().file_name().to_string_lossy().into_owned());
        }
    }
    out
}

fn hash_hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

async fn put(c: &aws_sdk_s3::Client, key: &str, body: &[u8]) {
    c.put_object()
        .bucket("bkt")
        .key(key)
        .body(body.to_vec().into())
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {key}: {e:?}"));
}

async fn get(c: &aws_sdk_s3::Client, key: &str) -> Vec<u8> {
    let got = c
        .get_object()
        .bucket("bkt")
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {key}: {e:?}"));
    got.body.collect().await.unwrap().into_bytes().to_vec()
}

/// 64 KiB objects: one block each.
fn object(i: usize) -> Vec<u8> {
    bytes(64 << 10, i as u64 + 1)
}

/// A client per node, and bucket `bkt` holding `count` objects `k{i}` (`object(i)`,
/// written through the nodes in turn).
fn with_objects(
    dev: &Dev,
    nodes: usize,
    count: usize,
) -> (tokio::runtime::Runtime, Vec<aws_sdk_s3::Client>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..nodes).map(|i| dev.client(i)).collect();
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
        for i in 0..count {
            put(&c[i % nodes], &format!("k{i}"), &object(i)).await;
        }
    });
    (rt, c)
}

/// A config file holding `text`, and the `--config` flag naming it.
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cairn.toml");
    std::fs::write(&path, text).unwrap();
    let flag = format!("--config={}", path.display());
    (dir, flag)
}

/// Test 1: a PUT through one node is read at once (no sleep, no retry) through the
/// others, objects in blocks and inline alike, and listed the same everywhere; every
/// block has a copy on each of the three nodes.
#[test]
fn a_write_on_one_node_is_read_at_once_on_the_others() {
    let dev = Dev::start(3, 3, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c: Vec<_> = (0..3).map(|i| dev.client(i)).collect();
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
        for i in 0..12 {
            let body = if i % 3 == 0 {
                bytes(100, i as u64)
            } else {
                object(i)
            };
            let key = format!("k{i}");
            put(&c[i % 3], &key, &body).await;
            for (j, other) in c.iter().enumerate() {
                assert_eq!(get(other, &key).await, body, "{key} through node {j}");
            }
        }
        let mut listings = Vec::new();
        for other in &c {
            let l = other.list_objects_v2().bucket("bkt").send().await.unwrap();
            listings.push(
                l.contents()
                    .iter()
                    .map(|o| (o.key().unwrap().to_string(), o.e_tag().unwrap().to_string()))
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(listings[0].len(), 12);
        assert_eq!(listings[0], listings[1]);
        assert_eq!(listings[0], listings[2]);
    });
    for i in 0..3 {
        let files = block_files(&dev.data_dir(i));
        for k in (0..12).filter(|k| k % 3 != 0) {
            assert!(
                files.contains(&hash_hex(&object(k))),
                "node {i} lacks the block of k{k}"
            );
        }
    }
}

/// Test 3: three nodes, three copies. With any one node stopped every object is
/// readable and writable; with two stopped, requests fail with 503 (never stale
/// data, never a partial object); restarted, everything is served again.
#[test]
fn three_nodes_survive_one_down_and_refuse_cleanly_with_two_down() {
    let mut dev = Dev::start(3, 3, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..3).map(|i| dev.client(i)).collect();
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
        for i in 0..6 {
            put(&c[i % 3], &format!("k{i}"), &object(i)).await;
        }
    });
    let mut n = 6;
    for down in 0..3 {
        dev.kill9(down);
        let up: Vec<usize> = (0..3).filter(|i| *i != down).collect();
        rt.block_on(async {
            for &u in &up {
                // Writes: new objects, through each live node.
                put(&c[u], &format!("k{n}"), &object(n)).await;
                n += 1;
                for k in 0..n {
                    assert_eq!(
                        get(&c[u], &format!("k{k}")).await,
                        object(k),
                        "k{k} via node {u} with node {down} down"
                    );
                }
            }
        });
        dev.restart(down);
    }
    // Two down: 503, and nothing half-written.
    dev.kill9(1);
    dev.kill9(2);
    rt.block_on(async {
        let t = Instant::now();
        let e = c[0]
            .put_object()
            .bucket("bkt")
            .key("refused")
            .body(object(99).into())
            .send()
            .await
            .expect_err("a write succeeded with two of three nodes down");
        assert_eq!(err_of(&e), ("ServiceUnavailable".into(), 503), "{e:?}");
        let e = c[0]
            .get_object()
            .bucket("bkt")
            .key("k0")
            .send()
            .await
            .expect_err("a read was served without a quorum");
        assert_eq!(err_of(&e), ("ServiceUnavailable".into(), 503), "{e:?}");
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "took {:?}",
            t.elapsed()
        );
    });
    // Status still answers without quorum, and says it may be behind.
    let st = dev.status(0);
    assert_eq!(st["current"], false, "{st}");
    dev.restart(1);
    dev.restart(2);
    rt.block_on(async {
        for cu in &c {
            for k in 0..n {
                assert_eq!(get(cu, &format!("k{k}")).await, object(k));
            }
            let e = cu.head_object().bucket("bkt").key("refused").send().await;
            assert!(e.is_err(), "the refused write became visible");
        }
    });
}

/// The placement the cluster uses, computed from its status.
fn placement(st: &serde_json::Value) -> cairn_placement::Placement {
    let specs: Vec<cairn_placement::NodeSpec> = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| cairn_placement::NodeSpec {
            id: u64::from_str_radix(n["id"].as_str().unwrap(), 16).unwrap(),
            zone: n["zone"].as_str().unwrap().to_string(),
            capacity: if n["state"] == "active" {
                n["capacity"].as_u64().unwrap()
            } else {
                0
            },
        })
        .collect();
    cairn_placement::Placement::new(&specs, st["layout"]["copies"].as_u64().unwrap() as usize)
}

/// Waits (up to 60 s) until node `at` sees exactly `left` nodes in the layout
/// and as members: the removed one gone, no other with it.
fn wait_until_left(dev: &Dev, at: usize, left: usize) {
    eventually(Duration::from_secs(60), || {
        let st = dev.status(at);
        let n = st["nodes"].as_array().unwrap().len();
        let members = st["members"].as_array().unwrap().len();
        (n == left && members == left)
            .then_some(())
            .ok_or_else(|| format!("the node has not left, or took another along: {st}"))
    });
}

/// Waits (up to `limit`) for `check` to hold; panics with its last message otherwise.
fn eventually(limit: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// Whether each object's block is on exactly the nodes placement names (node `i`
/// has id `ids[i]` and data directory `dirs[i]`), counted on disk.
fn at_placement(
    p: &cairn_placement::Placement,
    ids: &[u64],
    dirs: &[PathBuf],
    objects: &[Vec<u8>],
) -> Result<(), String> {
    let on_disk: Vec<HashSet<String>> = dirs.iter().map(|d| block_files(d)).collect();
    for (k, body) in objects.iter().enumerate() {
        let h = hash_hex(body);
        let want: HashSet<u64> = p
            .nodes(&cairn_types::BlockHash::from_hex(&h).unwrap())
            .into_iter()
            .collect();
        let have: HashSet<u64> = (0..ids.len())
            .filter(|i| on_disk[*i].contains(&h))
            .map(|i| ids[i])
            .collect();
        if have != want {
            return Err(format!(
                "object {k}'s block is on {have:x?}, placement says {want:x?}"
            ));
        }
    }
    Ok(())
}

/// Where each block is, by node index.
fn holders(dev: &Dev, nodes: usize) -> Vec<HashSet<String>> {
    (0..nodes).map(|i| block_files(&dev.data_dir(i))).collect()
}

/// Test 4: five nodes, three copies. With two nodes stopped every object stays
/// readable and writable (blocks go to the next nodes in placement order); once they
/// are back, the blocks written meanwhile are moved to their placement nodes and the
/// stand-in copies removed.
#[test]
fn five_nodes_survive_two_down_and_blocks_return_to_their_places() {
    let mut dev = Dev::start(5, 3, &["--move-interval=1s"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..5).map(|i| dev.client(i)).collect();
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
        for i in 0..10 {
            put(&c[i % 5], &format!("k{i}"), &object(i)).await;
        }
    });
    let leader = dev.leader();
    // Two nodes other than the leader (the leader's death is test 2's).
    let down: Vec<usize> = (0..5).filter(|i| *i != leader).take(2).collect();
    for &d in &down {
        dev.kill9(d);
    }
    let up: Vec<usize> = (0..5).filter(|i| !down.contains(i)).collect();
    rt.block_on(async {
        for i in 10..40 {
            put(&c[up[i % 3]], &format!("k{i}"), &object(i)).await;
        }
        for &u in &up {
            for k in 0..40 {
                assert_eq!(
                    get(&c[u], &format!("k{k}")).await,
                    object(k),
                    "k{k} via node {u}"
                );
            }
        }
    });
    for &d in &down {
        dev.restart(d);
    }
    let st = dev.status(leader);
    let p = placement(&st);
    let ids: Vec<u64> = (0..5).map(|i| dev.id(i)).collect();
    let dirs: Vec<PathBuf> = (0..5).map(|i| dev.data_dir(i)).collect();
    let written: Vec<Vec<u8>> = (10..40).map(object).collect();
    eventually(Duration::from_secs(60), || {
        at_placement(&p, &ids, &dirs, &written)
    });
    rt.block_on(async {
        for k in 0..40 {
            assert_eq!(get(&c[down[0]], &format!("k{k}")).await, object(k));
        }
    });
}

/// Test 6: a removed node drains first: its blocks are copied to their new places,
/// so that every block again has its three copies (counted on disk) before the node
/// leaves; nothing is lost, and a copy gone bad on it is not what the others get. The others all stay members (five less one: three
/// voters and a learner) and agree on the leader.
#[test]
fn a_removed_node_drains_before_it_leaves() {
    let dev = Dev::start(5, 5, &["--move-interval=1s"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..5).map(|i| dev.client(i)).collect();
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
        for i in 0..40 {
            put(&c[i % 5], &format!("k{i}"), &object(i)).await;
        }
    });
    let before = holders(&dev, 5);
    let on_4 = (0..40)
        .filter(|k| before[4].contains(&hash_hex(&object(*k))))
        .count();
    assert!(on_4 > 12, "node 4 held only {on_4} of 40 blocks before");
    // A copy gone bad on the drained node is fetched again from a good one on
    // the way: the drain does not wait for the scrub.
    let bad = (0..40)
        .find(|k| before[4].contains(&hash_hex(&object(*k))))
        .unwrap();
    flip_byte(&block_path(&dev, 4, &object(bad)));
    let gone = dev.node(4)["id"].as_str().unwrap().to_string();
    dev.cluster_ok(&["remove", &gone]);
    wait_until_left(&dev, 0, 4);
    let leader = dev.status(0)["leader"].clone();
    for i in 1..4 {
        let st = dev.status(i);
        assert_eq!(st["leader"], leader, "node {i} sees another leader: {st}");
        assert_eq!(st["members"].as_array().unwrap().len(), 4, "node {i}: {st}");
    }
    let after = holders(&dev, 5);
    for k in 0..40 {
        let h = hash_hex(&object(k));
        let copies = (0..4).filter(|i| after[*i].contains(&h)).count();
        assert_eq!(
            copies, 3,
            "block of k{k} has {copies} copies on the remaining nodes"
        );
    }
    assert!(
        after[4].is_empty(),
        "the drained node still holds {} blocks",
        after[4].len()
    );
    for i in 0..4 {
        let path = block_path(&dev, i, &object(bad));
        assert!(
            !path.exists() || holds(&path, &object(bad)),
            "node {i} got the bad copy of k{bad}"
        );
    }
    rt.block_on(async {
        for cu in &c[..4] {
            for k in 0..40 {
                assert_eq!(get(cu, &format!("k{k}")).await, object(k));
            }
        }
    });
}

/// A node started again while its cluster has no quorum, with a root key to put
/// (a new secret in its environment), serves and waits for the others instead
/// of exiting; once they are back the new secret works.
#[test]
fn a_node_started_without_quorum_waits_for_it() {
    let mut dev = Dev::start(3, 3, &[]);
    for i in 0..3 {
        dev.kill9(i);
    }
    let secret = "a-new-secret-for-the-root-key";
    dev.restart_with(0, &[("CAIRN_SECRET_KEY", secret)]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        health_ok(dev.node(0)["admin_endpoint"].as_str().unwrap()),
        "node 0 stopped serving while the others were down"
    );
    // The operator gives every node the new secret.
    dev.restart_with(1, &[("CAIRN_SECRET_KEY", secret)]);
    dev.restart_with(2, &[("CAIRN_SECRET_KEY", secret)]);
    let c = client_for(
        dev.node(0)["s3_endpoint"].as_str().unwrap(),
        common::ACCESS_KEY,
        secret,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    eventually(Duration::from_secs(60), || {
        rt.block_on(c.list_buckets().send())
            .map(|_| ())
            .map_err(|e| format!("the new secret is refused: {e:?}"))
    });
}

/// Copies the files under `from` to `to` (directories made as needed).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// A follower whose disk is full when the leader dies: the two left need its
/// vote, and saving it (then the new leader's first entries) waits for space
/// instead of stopping the follower's Raft for good. Once space is freed a
/// leader is elected, writes resume and the follower serves them. The follower
/// runs on a tmpfs of its own (needs root).
#[test]
fn a_follower_on_a_full_disk_votes_once_space_is_freed() {
    let mut dev = Dev::start(3, 3, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..3).map(|i| dev.client(i)).collect();
    let before = bytes(100_000, 1);
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
        put(&c[0], "before", &before).await;
    });
    let leader = dev.leader();
    let full = (0..3).find(|i| *i != leader).unwrap();
    let other = (0..3).find(|i| *i != leader && *i != full).unwrap();
    // The follower's directory moved onto a tmpfs.
    dev.kill9(full);
    let data = dev.data_dir(full);
    let moved = data.with_extension("moved");
    std::fs::rename(&data, &moved).unwrap();
    std::fs::create_dir(&data).unwrap();
    let Some(mount) = common::tmpfs(
        &data,
        "512m",
        "a_follower_on_a_full_disk_votes_once_space_is_freed",
    ) else {
        return;
    };
    copy_tree(&moved, &data);
    dev.restart(full);
    rt.block_on(async { assert_eq!(get(&c[full], "before").await, before) });
    common::fill_disk(&data.join("ballast"));
    dev.kill9(leader);
    // No leader without the full node's vote: writes fail meanwhile.
    std::thread::sleep(Duration::from_secs(5));
    let during = rt.block_on(
        c[other]
            .put_object()
            .bucket("bkt")
            .key("during")
            .body(bytes(10, 3).into())
            .send(),
    );
    assert!(during.is_err(), "a write was acknowledged without a quorum");
    std::fs::remove_file(data.join("ballast")).unwrap();
    let after = bytes(100_000, 2);
    eventually(Duration::from_secs(60), || {
        rt.block_on(
            c[other]
                .put_object()
                .bucket("bkt")
                .key("after")
                .body(after.clone().into())
                .send(),
        )
        .map(|_| ())
        .map_err(|e| format!("writes did not resume: {e:?}"))
    });
    rt.block_on(async {
        for i in [full, other] {
            assert_eq!(get(&c[i], "before").await, before);
            assert_eq!(get(&c[i], "after").await, after);
        }
    });
    // The node off its tmpfs, the tmpfs unmounted, then the cluster's directory
    // (holding the mount point) can go.
    dev.kill9(full);
    drop(mount);
    drop(dev);
}

/// The failure detector's verdict on node `of`, as node `at` exports it in its
/// metrics (0 up, 1 suspect, 2 down).
fn health_metric(dev: &Dev, at: usize, of: usize) -> Option<u32> {
    let admin = dev.node(at)["admin_endpoint"].as_str().unwrap();
    let text = admin_get(admin, "/metrics")?;
    let prefix = format!("cairn_node_health{{node=\"{:016x}\"}} ", dev.id(of));
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u32)
}

/// How long until node `at` judges node `of` to be `want` (polled every 50 ms,
/// at most `limit`).
fn time_until_health(dev: &Dev, at: usize, of: usize, want: u32, limit: Duration) -> Duration {
    let t = Instant::now();
    while health_metric(dev, at, of) != Some(want) {
        assert!(
            t.elapsed() < limit,
            "node {at} did not judge node {of} {want} within {limit:?} (now {:?})",
            health_metric(dev, at, of)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    t.elapsed()
}

/// Every node judges the others by heartbeats (phi accrual): a node killed -9 is
/// declared down within the 10 s bound by both others, a stopped (SIGSTOP) one too,
/// and each is up again once it answers; status shows the state and phi.
#[test]
fn a_killed_or_paused_node_is_declared_down_and_up_again() {
    let mut dev = Dev::start(3, 3, &[]);
    let bound = Duration::from_secs(10);
    for at in 0..3 {
        for of in (0..3).filter(|of| *of != at) {
            time_until_health(&dev, at, of, 0, bound);
        }
    }
    dev.kill9(2);
    let down0 = time_until_health(&dev, 0, 2, 2, bound);
    let down1 = time_until_health(&dev, 1, 2, 2, bound);
    eprintln!("a killed node was declared down after {down0:?} (node 0), {down1:?} (node 1)");
    let st = dev.status(0);
    let entry = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"].as_str() == dev.node(2)["id"].as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["health"], "down", "{entry}");
    assert!(entry["phi"].as_f64().unwrap() >= 8.0, "{entry}");
    dev.restart(2);
    let up = time_until_health(&dev, 0, 2, 0, bound);
    eprintln!("and up again {up:?} after it served");
    // Stopped, not dead: its connections stay open, its answers stop.
    let pid = dev.node(1)["pid"].as_u64().unwrap().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let paused = time_until_health(&dev, 0, 1, 2, bound);
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    eprintln!("a stopped node was declared down after {paused:?}");
    time_until_health(&dev, 0, 1, 0, bound);
    time_until_health(&dev, 2, 1, 0, bound);
}

/// The sum over every node of a counter in its metrics.
fn metric_total(dev: &Dev, nodes: usize, name: &str) -> f64 {
    (0..nodes)
        .filter_map(|i| admin_get(dev.node(i)["admin_endpoint"].as_str().unwrap(), "/metrics"))
        .flat_map(|text| {
            text.lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// A read whose first node does not answer (stopped with SIGSTOP, its connections
/// open) asks the next one after the hedge delay: with one node paused, every
/// object reads back through every other node at once. The failure detector is
/// kept from judging the paused node (its thresholds out of reach), so only the
/// hedge can take a read elsewhere.
#[test]
fn reads_hedge_around_a_paused_node() {
    let (_cfg, flag) = config_file("phi_suspect = 90\nphi_down = 99\n");
    let dev = Dev::start(5, 3, &[&flag]);
    let (rt, c) = with_objects(&dev, 5, 30);
    let leader = dev.leader();
    let paused = (0..5).find(|i| *i != leader).unwrap();
    let pid = dev.node(paused)["pid"].as_u64().unwrap().to_string();
    // Every copy written (the third of each block follows the acknowledgement).
    std::thread::sleep(Duration::from_secs(1));
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let up: Vec<usize> = (0..5).filter(|i| *i != paused).collect();
    let slowest = rt.block_on(async {
        let mut slowest = Duration::ZERO;
        for &u in &up {
            for k in 0..30 {
                let t = Instant::now();
                let got =
                    tokio::time::timeout(Duration::from_secs(10), get(&c[u], &format!("k{k}")))
                        .await
                        .unwrap_or_else(|_| {
                            panic!("k{k} via node {u} waited 10 s on the paused node")
                        });
                assert_eq!(got, object(k), "k{k} via node {u}");
                slowest = slowest.max(t.elapsed());
            }
        }
        slowest
    });
    let hedged = metric_total(&dev, 5, "cairn_block_hedged_reads_total");
    let wins = metric_total(&dev, 5, "cairn_block_hedge_wins_total");
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    eprintln!("slowest GET with a node paused: {slowest:?}; {hedged} hedged reads, {wins} won");
    assert!(hedged >= 1.0, "no read was hedged");
    assert!(wins >= 1.0, "no hedged read answered first");
    assert!(slowest < Duration::from_secs(2), "a GET took {slowest:?}");
}

/// `cairn scrub ARGS... --admin-endpoint (node 0's) --admin-token ...`, which must
/// succeed; its output.
fn scrub_cmd(dev: &Dev, args: &[&str]) -> String {
    let out = Command::new(common::binary())
        .arg("scrub")
        .args(args)
        .args([
            "--admin-endpoint",
            dev.node(0)["admin_endpoint"].as_str().unwrap(),
            "--admin-token",
            dev.doc["admin_token"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "scrub {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Each node's scrub status, by node index.
fn scrub_status(dev: &Dev, nodes: usize) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&scrub_cmd(dev, &["status", "--json"])).unwrap();
    (0..nodes)
        .map(|i| {
            v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["node"].as_str() == dev.node(i)["id"].as_str())
                .unwrap_or_else(|| panic!("no scrub status of node {i}: {v}"))
                .clone()
        })
        .collect()
}

/// The path of a block's file on a node.
fn block_path(dev: &Dev, i: usize, data: &[u8]) -> PathBuf {
    let h = hash_hex(data);
    dev.data_dir(i).join("blocks").join(&h[..2]).join(&h)
}

/// Flips one byte of a block's payload in its file (the size stays the same).
fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(path, &bytes).unwrap();
}

/// A block file holds exactly `data` after its 16-byte header.
fn holds(path: &Path, data: &[u8]) -> bool {
    std::fs::read(path).is_ok_and(|b| b.len() == 16 + data.len() && &b[16..] == data)
}

/// Scrub finds a byte flipped in a block file (same size), quarantines that copy
/// and fetches a good one from another node; a pass can be paused and goes on
/// where it stopped; a GET through a node whose copy is bad answers the right
/// bytes from another node and repairs the copy (read repair).
#[test]
fn scrub_and_reads_repair_flipped_bytes() {
    // Slow enough (four 64 KiB blocks a second) to catch a pass running.
    let (_cfg, flag) = config_file("scrub_rate = \"256KiB\"\n");
    let dev = Dev::start(3, 3, &[&flag]);
    let (rt, c) = with_objects(&dev, 3, 12);
    // Every copy in place (three nodes, three copies: each node holds each block).
    eventually(Duration::from_secs(20), || {
        for i in 0..3 {
            for k in 0..12 {
                if !holds(&block_path(&dev, i, &object(k)), &object(k)) {
                    return Err(format!("node {i} lacks k{k}"));
                }
            }
        }
        Ok(())
    });
    // No pass runs yet (the first is due an interval after the first start).
    eventually(Duration::from_secs(20), || {
        let st = scrub_status(&dev, 3);
        match st.iter().all(|n| n["running"] == false) {
            true => Ok(()),
            false => Err(format!("{st:?}")),
        }
    });
    let bad = block_path(&dev, 1, &object(0));
    flip_byte(&bad);
    assert!(!holds(&bad, &object(0)));
    scrub_cmd(&dev, &["start"]);
    // Paused mid-pass: it stays where it is.
    let out = scrub_cmd(&dev, &["pause"]);
    assert!(out.contains("paused"), "{out}");
    // A block being read as the pause came is counted: then nothing more.
    std::thread::sleep(Duration::from_millis(500));
    let before: Vec<u64> = scrub_status(&dev, 3)
        .iter()
        .map(|n| n["blocks_checked"].as_u64().unwrap())
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let st = scrub_status(&dev, 3);
    for (i, n) in st.iter().enumerate() {
        assert_eq!(n["paused"], true, "node {i}: {n}");
        assert_eq!(
            n["blocks_checked"].as_u64().unwrap(),
            before[i],
            "node {i} went on while paused"
        );
    }
    scrub_cmd(&dev, &["start"]);
    eventually(Duration::from_secs(60), || {
        let st = scrub_status(&dev, 3);
        match st
            .iter()
            .all(|n| n["running"] == false && n["blocks_checked"].as_u64() >= Some(12))
        {
            true => Ok(()),
            false => Err(format!("{st:?}")),
        }
    });
    let st = scrub_status(&dev, 3);
    assert_eq!(
        (st[1]["corrupt"].as_u64(), st[1]["repaired"].as_u64()),
        (Some(1), Some(1)),
        "{}",
        st[1]
    );
    assert_eq!(st[1]["unrepairable"].as_u64(), Some(0));
    for i in [0, 2] {
        assert_eq!(st[i]["corrupt"].as_u64(), Some(0), "node {i}: {}", st[i]);
    }
    assert!(holds(&bad, &object(0)), "the bad copy was not replaced");
    let quarantined = std::fs::read_dir(dev.data_dir(1).join("quarantine"))
        .unwrap()
        .count();
    assert_eq!(quarantined, 1);
    assert_eq!(metric_total(&dev, 3, "cairn_scrub_repaired_total"), 1.0);
    let table = scrub_cmd(&dev, &["status"]);
    assert!(table.contains("idle") && table.contains("100"), "{table}");
    // Read repair: node 2's copy of k1 goes bad; a GET through node 2 answers the
    // right bytes, and the copy is good again soon after.
    let bad = block_path(&dev, 2, &object(1));
    flip_byte(&bad);
    rt.block_on(async {
        assert_eq!(get(&c[2], "k1").await, object(1));
    });
    eventually(Duration::from_secs(10), || match holds(&bad, &object(1)) {
        true => Ok(()),
        false => Err("node 2's copy of k1 is still bad".into()),
    });
    assert_eq!(metric_total(&dev, 3, "cairn_read_repairs_total"), 1.0);
}

/// Repair: a node down for longer than `repair_after` has its blocks stood in for
/// on the other nodes (every block has three live copies again, counted on disk,
/// and status counts no block at risk); once it is back, each block is again on
/// exactly its placement nodes (the stand-in copies dropped).
#[test]
fn a_node_down_past_repair_after_is_stood_in_for_then_restored() {
    let mut dev = Dev::start(4, 4, &["--repair-after=2s", "--move-interval=1s"]);
    let n = 24;
    let (rt, c) = with_objects(&dev, 4, n);
    let leader = dev.leader();
    let st = dev.status(leader);
    let p = placement(&st);
    let ids: Vec<u64> = (0..4).map(|i| dev.id(i)).collect();
    let dirs: Vec<PathBuf> = (0..4).map(|i| dev.data_dir(i)).collect();
    let objects: Vec<Vec<u8>> = (0..n).map(object).collect();
    eventually(Duration::from_secs(30), || {
        at_placement(&p, &ids, &dirs, &objects)
    });
    let down = (0..4).find(|i| *i != leader).unwrap();
    let placed_there = objects
        .iter()
        .filter(|o| {
            p.nodes(&cairn_types::BlockHash::from_hex(&hash_hex(o)).unwrap())
                .contains(&ids[down])
        })
        .count();
    assert!(placed_there > 0, "no block placed on node {down}");
    dev.kill9(down);
    let up: Vec<usize> = (0..4).filter(|i| *i != down).collect();
    // Three live nodes, three copies wanted: each block ends on all three.
    eventually(Duration::from_secs(60), || {
        let on = holders(&dev, 4);
        for (k, o) in objects.iter().enumerate() {
            let h = hash_hex(o);
            let live = up.iter().filter(|i| on[**i].contains(&h)).count();
            if live < 3 {
                return Err(format!("k{k} has {live} live copies"));
            }
        }
        Ok(())
    });
    eventually(Duration::from_secs(30), || {
        let st = dev.status(leader);
        match (
            st["redundancy"]["blocks_at_risk"].as_u64(),
            metric_total(&dev, 4, "cairn_repair_copies_total"),
        ) {
            (Some(0), made) if made >= placed_there as f64 => Ok(()),
            other => Err(format!("at risk, stand-ins: {other:?}")),
        }
    });
    rt.block_on(async {
        for &u in &up {
            for k in 0..n {
                assert_eq!(get(&c[u], &format!("k{k}")).await, object(k));
            }
        }
    });
    // Back: the blocks go home, the stand-ins go.
    dev.restart(down);
    eventually(Duration::from_secs(60), || {
        at_placement(&p, &ids, &dirs, &objects)
    });
}

/// The mover never copies a block no record names (garbage waiting out its
/// grace): after the replication factor rises from 3 to 4, the blocks of live
/// objects reach the fourth node, those of deleted objects do not. (Found by
/// `cairn chaos`: passes copied garbage to nodes that had already collected their
/// copy, and it stayed there until the six-hourly sweep; the disk filled.)
#[test]
fn the_mover_copies_no_block_that_no_record_names() {
    let dev = Dev::start(4, 4, &["--move-interval=1s", "--gc-grace=1h"]);
    let (rt, c) = with_objects(&dev, 4, 12);
    let deleted: Vec<usize> = (0..12).filter(|i| i % 2 == 0).collect();
    rt.block_on(async {
        for &i in &deleted {
            c[0].delete_object()
                .bucket("bkt")
                .key(format!("k{i}"))
                .send()
                .await
                .unwrap();
        }
    });
    let copies = |i: usize| {
        let h = hash_hex(&object(i));
        holders(&dev, 4).iter().filter(|d| d.contains(&h)).count()
    };
    eventually(Duration::from_secs(20), || {
        match (0..12).all(|i| copies(i) == 3) {
            true => Ok(()),
            false => Err("not every block at 3 copies yet".into()),
        }
    });
    dev.cluster_ok(&["set-replication", "4"]);
    // The live objects' blocks reach every node: the passes ran.
    eventually(Duration::from_secs(60), || {
        for i in (0..12).filter(|i| i % 2 == 1) {
            if copies(i) != 4 {
                return Err(format!("k{i} has {} copies", copies(i)));
            }
        }
        Ok(())
    });
    // A few more passes' time: the deleted ones stay where they were.
    std::thread::sleep(Duration::from_secs(3));
    for &i in &deleted {
        assert_eq!(copies(i), 3, "the deleted k{i}'s block was copied");
    }
}

/// A new node started on a member's address (the member's machine reinstalled)
/// is not taken for that member: with the third member down, the one left has no
/// quorum and refuses writes, rather than electing itself with the newcomer's
/// vote and committing with it. (Found by `cairn chaos`: a node added on a
/// removed node's ports voted as that node, and a leader without the newest
/// committed entries was elected.)
#[test]
fn a_new_node_on_a_members_address_does_not_stand_in_for_it() {
    let mut dev = Dev::start(3, 3, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..3).map(|i| dev.client(i)).collect();
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
    });
    // A second term, so that the log's newest entries are not of the first
    // (a new node's own log is of term 1).
    let first = dev.leader();
    dev.kill9(first);
    let kept = (first + 1) % 3;
    eventually(Duration::from_secs(30), || {
        let st = dev.status(kept);
        match st["leader"].as_str() {
            Some(l) if l != dev.node(first)["id"].as_str().unwrap() => Ok(()),
            _ => Err(format!("no new leader: {st}")),
        }
    });
    dev.restart(first);
    rt.block_on(async {
        for k in 0..4 {
            put(&c[k % 3], &format!("k{k}"), &object(k)).await;
        }
    });
    // Node 2's machine is reinstalled: a new node on its addresses, not joined.
    dev.kill9(2);
    dev.start_new_at(2);
    // Node 1 down: node 0 alone is no quorum, whatever answers at node 2's address.
    dev.kill9(1);
    std::thread::sleep(Duration::from_secs(3));
    rt.block_on(async {
        let e = c[0]
            .put_object()
            .bucket("bkt")
            .key("refused")
            .body(object(99).into())
            .send()
            .await
            .expect_err("a write was acknowledged by one member and a stranger");
        assert_eq!(err_of(&e), ("ServiceUnavailable".into(), 503), "{e:?}");
    });
    let st = dev.status(0);
    assert_ne!(
        st["leader"].as_str(),
        Some(dev.node(0)["id"].as_str().unwrap()),
        "node 0 leads without a quorum: {st}"
    );
    // Node 1 back: a quorum again; every acknowledged object is there.
    dev.restart(1);
    rt.block_on(async {
        put(&c[0], "after", &object(7)).await;
        for k in 0..4 {
            assert_eq!(get(&c[0], &format!("k{k}")).await, object(k));
            assert_eq!(get(&c[1], &format!("k{k}")).await, object(k));
        }
        let e = c[1].head_object().bucket("bkt").key("refused").send().await;
        assert!(e.is_err(), "the refused write became visible");
    });
}

/// A drain whose first pass could not place every block (a node its blocks go
/// to was down) finishes once that node is back: the node leaves, every block
/// has its three copies on the others and every object reads back. (Found by
/// `cairn chaos`: the node stayed draining until the next layout change.)
#[test]
fn a_drain_held_up_by_a_dead_node_finishes_when_it_returns() {
    let mut dev = Dev::start(4, 4, &["--move-interval=1s"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..4).map(|i| dev.client(i)).collect();
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
        for i in 0..30 {
            put(&c[i % 4], &format!("k{i}"), &object(i)).await;
        }
    });
    // A follower down; another follower removed: with three nodes left every
    // block needs a copy on the dead one.
    let leader = dev.leader();
    let mut followers = (0..4).filter(|&i| i != leader);
    let (down, leaving) = (followers.next().unwrap(), followers.next().unwrap());
    dev.kill9(down);
    let gone = dev.node(leaving)["id"].as_str().unwrap().to_string();
    let admin = dev.node(leader)["admin_endpoint"]
        .as_str()
        .unwrap()
        .to_string();
    dev.cluster_ok_at(&admin, &["remove", &gone]);
    std::thread::sleep(Duration::from_secs(3));
    let st = dev.status(leader);
    assert!(
        st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"].as_str() == Some(gone.as_str())),
        "the node left while a node its blocks go to was down: {st}"
    );
    dev.restart(down);
    wait_until_left(&dev, leader, 3);
    let after = holders(&dev, 4);
    let kept: Vec<usize> = (0..4).filter(|&i| i != leaving).collect();
    for k in 0..30 {
        let h = hash_hex(&object(k));
        let copies = kept.iter().filter(|&&i| after[i].contains(&h)).count();
        assert_eq!(
            copies, 3,
            "block of k{k} has {copies} copies on the remaining nodes"
        );
    }
    assert!(
        after[leaving].is_empty(),
        "the drained node still holds blocks"
    );
    rt.block_on(async {
        for &i in &kept {
            for k in 0..30 {
                assert_eq!(get(&c[i], &format!("k{k}")).await, object(k));
            }
        }
    });
}

/// Test 5: a node added to a loaded cluster takes its share: once the mover is done
/// every block is exactly at its placement nodes (counted on disk), the new node
/// holds within 10 points of the share placement predicts, and every object reads
/// back during the move and after it.
#[test]
fn an_added_node_takes_its_share() {
    let mut dev = Dev::start(3, 4, &["--move-interval=1s"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..3).map(|i| dev.client(i)).collect();
    let small = |i: usize| bytes(16 << 10, i as u64 + 1000);
    const N: usize = 200;
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
        for i in 0..N {
            put(&c[i % 3], &format!("k{i}"), &small(i)).await;
        }
    });
    // A fourth node, in a zone of its own, started like the others and joined.
    let data = dev.dir.path().join("node3");
    let mut started = None;
    for attempt in 0..5 {
        // Ports nobody listens on right now; a node that could not bind them exits,
        // and the next attempt takes others.
        let free: Vec<String> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect::<Vec<_>>()
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let (s3, admin, rpc) = (&free[0], &free[1], &free[2]);
        let log_path = dev.dir.path().join(format!("node3.{attempt}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(common::binary())
            .args([
                "serve",
                "--data-dir",
                data.to_str().unwrap(),
                "--s3-address",
                s3,
                "--admin-address",
                admin,
                "--rpc-address",
                rpc,
                "--zone",
                "z4",
                "--move-interval=1s",
            ])
            .envs(dev.env())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let admin = format!("http://{admin}");
        if wait_healthy_or_exit(&admin, &mut child, &log_path) {
            started = Some((child, admin, log_path));
            break;
        }
    }
    let (child, admin, log_path) = started.expect("the fourth node did not start in five attempts");
    dev.restarted.insert(3, child);
    let out = dev.cluster_cmd_at(
        &admin,
        &["join", dev.node(0)["rpc_address"].as_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "join: {}\nthe joining node's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    // Reads while blocks move.
    rt.block_on(async {
        for i in 0..N {
            assert_eq!(get(&c[i % 3], &format!("k{i}")).await, small(i));
        }
    });
    let st = dev.status(0);
    assert_eq!(st["nodes"].as_array().unwrap().len(), 4, "{st}");
    let p = placement(&st);
    let mut ids: Vec<u64> = (0..3).map(|i| dev.id(i)).collect();
    let new_id = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| u64::from_str_radix(n["id"].as_str().unwrap(), 16).unwrap())
        .find(|id| !ids.contains(id))
        .unwrap();
    ids.push(new_id);
    let dirs: Vec<PathBuf> = (0..3)
        .map(|i| dev.data_dir(i))
        .chain([data.clone()])
        .collect();
    let all: Vec<Vec<u8>> = (0..N).map(small).collect();
    eventually(Duration::from_secs(90), || {
        at_placement(&p, &ids, &dirs, &all)
    });
    let moved = block_files(&data).len() as f64 / N as f64;
    let predicted = p.share(new_id) * p.copies() as f64;
    assert!(
        (moved - predicted).abs() <= 0.10,
        "the new node holds {:.1}% of the blocks, placement predicts {:.1}%",
        moved * 100.0,
        predicted * 100.0
    );
    rt.block_on(async {
        for i in 0..N {
            assert_eq!(get(&c[(i + 1) % 3], &format!("k{i}")).await, small(i));
        }
    });
}

/// Test 8: a node down while many writes go by, with the log compacted meanwhile
/// (a snapshot every 20 entries, none kept behind it), comes back through a snapshot
/// sent by the leader and then serves exactly the cluster's data: objects written,
/// overwritten and deleted while it was away.
#[test]
fn a_node_back_from_far_behind_catches_up_by_snapshot() {
    let mut dev = Dev::start(3, 3, &["--snapshot-every=20", "--log-keep=0"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..3).map(|i| dev.client(i)).collect();
    let small = |i: usize, version: u64| bytes(2000 + i, version * 1000 + i as u64);
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
        for i in 0..20 {
            put(&c[i % 3], &format!("k{i}"), &small(i, 1)).await;
        }
    });
    let leader = dev.leader();
    let away = (leader + 1) % 3;
    let other = 3 - leader - away;
    dev.kill9(away);
    // The away node holds at most the log the leader had when it died.
    let before = dev.status(leader)["last_log_index"].as_u64().unwrap();
    // Many writes while it is away: new objects, overwrites (k0..k9), deletions
    // (k10..k14), 64 KiB objects whose blocks the away node misses.
    rt.block_on(async {
        for i in 20..120 {
            put(
                &c[if i % 2 == 0 { leader } else { other }],
                &format!("k{i}"),
                &small(i, 1),
            )
            .await;
        }
        for i in 0..10 {
            put(&c[leader], &format!("k{i}"), &small(i, 2)).await;
        }
        for i in 10..15 {
            c[other]
                .delete_object()
                .bucket("bkt")
                .key(format!("k{i}"))
                .send()
                .await
                .unwrap();
        }
        for i in 0..5 {
            put(&c[leader], &format!("big{i}"), &object(i)).await;
        }
    });
    // The leader drops the entries the away node needs once its snapshot covers them.
    eventually(Duration::from_secs(30), || {
        let purged = dev.status(leader)["purged_index"].as_u64().unwrap_or(0);
        if purged > before {
            Ok(())
        } else {
            Err(format!(
                "the leader kept its log from {before} on (purged to {purged}): no snapshot is needed"
            ))
        }
    });
    dev.restart(away);
    let target = dev.status(leader)["applied_index"].as_u64().unwrap();
    eventually(Duration::from_secs(60), || {
        let got = dev.status(away)["applied_index"].as_u64().unwrap_or(0);
        if got >= target {
            Ok(())
        } else {
            Err(format!("the returned node applied {got} of {target}"))
        }
    });
    // Log lines are written out by a background thread: a moment's grace.
    let log_path = dev.dir.path().join(format!("node{away}.restart.log"));
    eventually(Duration::from_secs(10), || {
        let log = std::fs::read_to_string(&log_path).unwrap();
        if log.contains("installed a metadata snapshot sent by the leader") {
            Ok(())
        } else {
            Err(format!(
                "the returned node caught up without a snapshot:\n{log}"
            ))
        }
    });
    rt.block_on(async {
        let cu = &c[away];
        for i in 0..120 {
            let key = format!("k{i}");
            if (10..15).contains(&i) {
                let e = cu.head_object().bucket("bkt").key(&key).send().await;
                assert!(e.is_err(), "{key} was deleted while the node was away");
                continue;
            }
            let version = if i < 10 { 2 } else { 1 };
            assert_eq!(
                get(cu, &key).await,
                small(i, version),
                "{key} via the returned node"
            );
        }
        for i in 0..5 {
            assert_eq!(get(cu, &format!("big{i}")).await, object(i));
        }
        let mut names = Vec::new();
        let mut token = None;
        loop {
            let l = cu
                .list_objects_v2()
                .bucket("bkt")
                .set_continuation_token(token.clone())
                .send()
                .await
                .unwrap();
            names.extend(l.contents().iter().map(|o| o.key().unwrap().to_string()));
            token = l.next_continuation_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        assert_eq!(names.len(), 120 - 5 + 5, "{names:?}");
    });
}

/// Test 2: the Raft leader is killed (kill -9) under a write load spread over every
/// node: writes resume on the others (bound 10 s; the figure is printed, the target
/// is a `cairn bench --failover` figure), and every acknowledged object reads back
/// through every node, the old leader's too once it is back.
#[test]
fn writes_resume_after_the_leader_is_killed() {
    use std::sync::{Arc, Mutex};
    let mut dev = Dev::start(3, 3, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..3).map(|i| dev.client(i)).collect();
    // Objects inline in metadata and objects with a block, alternately.
    let body = |n: u64| bytes(if n.is_multiple_of(2) { 3000 } else { 70 << 10 }, n);
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
    });
    let leader = dev.leader();
    // Acknowledged writes: key, seed of the body, sent, acknowledged.
    type Acked = Vec<(String, u64, Instant, Instant)>;
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
            rt.spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let seed = w * 1_000_000 + n;
                    let key = format!("w{w}-{n}");
                    let node = (w + n) as usize % 3;
                    n += 1;
                    let t0 = Instant::now();
                    let r = c[node]
                        .put_object()
                        .bucket("bkt")
                        .key(&key)
                        .body(body(seed).into())
                        .send()
                        .await;
                    if r.is_ok() {
                        acked.lock().unwrap().push((key, seed, t0, Instant::now()));
                    } else {
                        // Indeterminate (the node died under it) or refused: not
                        // counted; a short pause spares a dead node's port a storm.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let before = acked.lock().unwrap().len();
    assert!(
        before >= 10,
        "only {before} writes acknowledged before the kill"
    );
    dev.kill9(leader);
    let killed = Instant::now();
    let resumed = loop {
        let first = acked
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.2 >= killed)
            .map(|a| a.3)
            .min();
        if let Some(t) = first {
            break t - killed;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no write acknowledged within 10 s of the leader's kill"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("writes resumed {resumed:?} after the leader's kill -9");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        for w in writers {
            w.await.unwrap();
        }
    });
    let acked = acked.lock().unwrap().clone();
    let after = acked.iter().filter(|a| a.2 >= killed).count();
    assert!(
        after >= 10,
        "only {after} writes acknowledged after the kill"
    );
    dev.restart(leader);
    rt.block_on(async {
        for (i, cu) in c.iter().enumerate() {
            for (key, seed, _, _) in &acked {
                assert_eq!(get(cu, key).await, body(*seed), "{key} via node {i}");
            }
        }
    });
}

impl Dev {
    /// `cairn cluster ARGS... --admin-endpoint ADMIN --admin-token (the cluster's)`.
    fn cluster_cmd_at(&self, admin: &str, args: &[&str]) -> std::process::Output {
        Command::new(common::binary())
            .arg("cluster")
            .args(args)
            .args([
                "--admin-endpoint",
                admin,
                "--admin-token",
                self.doc["admin_token"].as_str().unwrap(),
            ])
            .output()
            .unwrap()
    }

    /// `cluster_cmd_at` node 0.
    fn cluster_cmd(&self, args: &[&str]) -> std::process::Output {
        self.cluster_cmd_at(self.node(0)["admin_endpoint"].as_str().unwrap(), args)
    }

    /// `cluster_cmd_at`, which must succeed.
    fn cluster_ok_at(&self, admin: &str, args: &[&str]) {
        let out = self.cluster_cmd_at(admin, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `cairn admin snapshot save FILE` through node 1, which must succeed.
    fn save_snapshot(&self, file: &Path) {
        let out = Command::new(common::binary())
            .args(["admin", "snapshot", "save", file.to_str().unwrap()])
            .args([
                "--admin-endpoint",
                self.node(1)["admin_endpoint"].as_str().unwrap(),
                "--admin-token",
                self.doc["admin_token"].as_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `cluster_ok_at` node 0.
    fn cluster_ok(&self, args: &[&str]) {
        self.cluster_ok_at(self.node(0)["admin_endpoint"].as_str().unwrap(), args);
    }
}

/// The replication factor is a cluster setting: bad values are refused and change
/// nothing; lowered, every block ends on exactly its fewer placement nodes (the
/// others' copies trimmed, counted on disk); raised past the node count, every node
/// holds every block. Every object reads back throughout.
#[test]
fn the_replication_factor_changes_and_blocks_follow() {
    let dev = Dev::start(4, 4, &["--move-interval=1s"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..4).map(|i| dev.client(i)).collect();
    const N: usize = 30;
    let all: Vec<Vec<u8>> = (0..N).map(object).collect();
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
        for (i, body) in all.iter().enumerate() {
            put(&c[i % 4], &format!("k{i}"), body).await;
        }
    });
    let ids: Vec<u64> = (0..4).map(|i| dev.id(i)).collect();
    let dirs: Vec<PathBuf> = (0..4).map(|i| dev.data_dir(i)).collect();
    let version = dev.status(0)["layout"]["version"].as_u64().unwrap();
    for bad in [
        &["set-replication", "0"][..],
        &["set-replication", "2", "--write-quorum", "3"],
    ] {
        let out = dev.cluster_cmd(bad);
        assert!(!out.status.success(), "{bad:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("quorum"), "{bad:?}: {err}");
    }
    let st = dev.status(0);
    assert_eq!(st["layout"]["version"].as_u64().unwrap(), version, "{st}");
    assert_eq!(st["layout"]["copies"], 3, "{st}");

    // A change made through one node shows in every node's status from the
    // moment it is acknowledged, even on a node that was stopped while it was made
    // (asked the instant it runs again, before the leader has sent it the change).
    let leader = dev.leader();
    let behind = (1..4).find(|i| *i != leader).unwrap();
    let pid = dev.node(behind)["pid"].as_u64().unwrap().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    dev.cluster_ok(&["set-replication", "2"]);
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let st = dev.status(behind);
    assert_eq!(st["current"], true, "{st}");
    assert_eq!(
        st["layout"]["copies"], 2,
        "node {behind} answered from behind: {st}"
    );
    let st = dev.status(1);
    assert_eq!(st["layout"]["copies"], 2, "{st}");
    assert_eq!(st["layout"]["quorum"], 2, "{st}");
    let p = placement(&st);
    eventually(Duration::from_secs(60), || {
        at_placement(&p, &ids, &dirs, &all)
    });
    rt.block_on(async {
        for i in 0..N {
            assert_eq!(get(&c[(i + 1) % 4], &format!("k{i}")).await, all[i]);
        }
    });

    dev.cluster_ok(&["set-replication", "5", "--write-quorum", "1"]);
    let st = dev.status(2);
    assert_eq!(st["layout"]["copies"], 4, "capped by the node count: {st}");
    assert_eq!(st["layout"]["quorum"], 1, "{st}");
    eventually(Duration::from_secs(60), || {
        let on_disk = holders(&dev, 4);
        for (k, body) in all.iter().enumerate() {
            let h = hash_hex(body);
            let n = on_disk.iter().filter(|d| d.contains(&h)).count();
            if n != 4 {
                return Err(format!("k{k}'s block has {n} copies of 4"));
            }
        }
        Ok(())
    });
    rt.block_on(async {
        for i in 0..N {
            assert_eq!(get(&c[(i + 2) % 4], &format!("k{i}")).await, all[i]);
        }
    });
}

/// Deleted objects free their blocks on every node that holds a copy, not only on
/// the first to collect them (counted on disk); blocks still named stay.
#[test]
fn deleting_objects_frees_their_blocks_on_every_node() {
    let dev = Dev::start(
        3,
        3,
        &["--gc-grace=1s", "--gc-interval=1s", "--receive-pin=2s"],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..3).map(|i| dev.client(i)).collect();
    const N: usize = 12;
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
        for i in 0..N {
            put(&c[i % 3], &format!("k{i}"), &object(i)).await;
        }
    });
    let on_disk = holders(&dev, 3);
    for i in 0..N {
        let h = hash_hex(&object(i));
        assert!(on_disk.iter().all(|d| d.contains(&h)), "k{i} lacks a copy");
    }
    rt.block_on(async {
        for i in 0..N / 2 {
            c[(i + 1) % 3]
                .delete_object()
                .bucket("bkt")
                .key(format!("k{i}"))
                .send()
                .await
                .unwrap();
        }
    });
    eventually(Duration::from_secs(60), || {
        let on_disk = holders(&dev, 3);
        for i in 0..N / 2 {
            let h = hash_hex(&object(i));
            let left = on_disk.iter().filter(|d| d.contains(&h)).count();
            if left > 0 {
                return Err(format!("deleted k{i} still has {left} copies on disk"));
            }
        }
        Ok(())
    });
    let on_disk = holders(&dev, 3);
    rt.block_on(async {
        for i in N / 2..N {
            let h = hash_hex(&object(i));
            assert!(on_disk.iter().all(|d| d.contains(&h)), "k{i} lost a copy");
            assert_eq!(get(&c[i % 3], &format!("k{i}")).await, object(i));
        }
    });
}

/// `cairn bucket set-class BUCKET CLASS` through node 0's admin API.
fn set_class(dev: &Dev, bucket: &str, class: &str) -> std::process::Output {
    Command::new(common::binary())
        .args(["bucket", "set-class", bucket, class])
        .args([
            "--admin-endpoint",
            dev.node(0)["admin_endpoint"].as_str().unwrap(),
            "--admin-token",
            dev.doc["admin_token"].as_str().unwrap(),
        ])
        .output()
        .unwrap()
}

/// A cluster of `nodes` in 3 zones, a client per node, and bucket `bkt` of class
/// EC:3+2 holding `count` objects `k{i}` (`object(i)`, written through the nodes in
/// turn).
fn with_ec_objects(
    nodes: usize,
    serve_args: &[&str],
    count: usize,
) -> (Dev, tokio::runtime::Runtime, Vec<aws_sdk_s3::Client>) {
    let dev = Dev::start(nodes, 3, serve_args);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..nodes).map(|i| dev.client(i)).collect();
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
    });
    let out = set_class(&dev, "bkt", "EC:3+2");
    assert!(out.status.success(), "{out:?}");
    rt.block_on(async {
        for i in 0..count {
            put(&c[i % nodes], &format!("k{i}"), &object(i)).await;
        }
    });
    (dev, rt, c)
}

/// The shard files of the block `data` on each node: (node index, shard index,
/// file path).
fn shard_files(dev: &Dev, nodes: usize, data: &[u8]) -> Vec<(usize, u8, PathBuf)> {
    let h = hash_hex(data);
    let mut out = Vec::new();
    for i in 0..nodes {
        let dir = dev
            .data_dir(i)
            .join("blocks")
            .join(&h[..2])
            .join(format!("{h}.s"));
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let index = name.strip_prefix("3+2.").unwrap().parse().unwrap();
            out.push((i, index, e.path()));
        }
    }
    out.sort_by_key(|x| x.1);
    out
}

/// An EC:3+2 bucket: each block is five shards on five distinct nodes (no whole
/// copy), reads answer the right bytes with any two shards gone (files deleted,
/// then nodes killed) and write the missing shards back; with three shards gone a
/// read fails rather than answer wrong bytes; a write needs four live nodes; a
/// class the cluster cannot place is refused.
#[test]
fn an_erasure_coded_bucket_reads_through_two_lost_shards() {
    let mut dev = Dev::start(5, 3, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c: Vec<_> = (0..5).map(|i| dev.client(i)).collect();
    rt.block_on(async {
        c[0].create_bucket().bucket("bkt").send().await.unwrap();
    });
    let out = set_class(&dev, "bkt", "EC:4+2");
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("needs 6 nodes"), "{msg}");
    let out = set_class(&dev, "nope", "EC:3+2");
    assert!(!out.status.success());
    let out = set_class(&dev, "bkt", "EC:3+1x");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("EC:k+m"));
    let out = set_class(&dev, "bkt", "EC:3+2");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("EC:3+2"));
    // One block, three blocks (4 MiB each, the last short), a small block.
    let objs: Vec<Vec<u8>> = vec![
        bytes(100 << 10, 1),
        bytes((9 << 20) + 3, 2),
        bytes((10 << 10) + 1, 3),
    ];
    rt.block_on(async {
        for (i, o) in objs.iter().enumerate() {
            put(&c[i % 5], &format!("e{i}"), o).await;
        }
        for (n, cn) in c.iter().enumerate() {
            for (i, o) in objs.iter().enumerate() {
                assert_eq!(&get(cn, &format!("e{i}")).await, o, "e{i} via node {n}");
            }
        }
    });
    // Five shards on five nodes, one each, each a third of the block (rounded up
    // to even) plus its 56-byte header; no whole copy anywhere.
    // (The fifth may still be on its way: a write returns after four.)
    eventually(Duration::from_secs(20), || {
        let n = shard_files(&dev, 5, &objs[0]).len();
        (n == 5).then_some(()).ok_or(format!("{n} shards"))
    });
    let shards = shard_files(&dev, 5, &objs[0]);
    assert_eq!(
        shards.iter().map(|s| s.1).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    let nodes: HashSet<usize> = shards.iter().map(|s| s.0).collect();
    assert_eq!(nodes.len(), 5, "{shards:?}");
    let third = (100usize << 10).div_ceil(3);
    let shard_len = third + (third & 1);
    for s in &shards {
        assert_eq!(
            std::fs::metadata(&s.2).unwrap().len() as usize,
            56 + shard_len
        );
    }
    for i in 0..5 {
        assert!(!block_path(&dev, i, &objs[0]).exists());
    }
    // Two data shards of e0 deleted: read through a node that held neither, right
    // bytes (rebuilt from the parity); the two are written back.
    let gone = [shards[1].clone(), shards[2].clone()];
    for g in &gone {
        std::fs::remove_file(&g.2).unwrap();
    }
    let reader = (0..5).find(|n| !gone.iter().any(|g| g.0 == *n)).unwrap();
    rt.block_on(async {
        assert_eq!(get(&c[reader], "e0").await, objs[0]);
    });
    eventually(Duration::from_secs(20), || {
        match gone.iter().all(|g| g.2.exists()) {
            true => Ok(()),
            false => Err("the lost shards were not written back".into()),
        }
    });
    // Three shards of e2 deleted: the read fails, no wrong byte is served.
    let small = shard_files(&dev, 5, &objs[2]);
    assert_eq!(small.len(), 5);
    for s in &small[..3] {
        std::fs::remove_file(&s.2).unwrap();
    }
    rt.block_on(async {
        let e = c[0].get_object().bucket("bkt").key("e2").send().await;
        match e {
            Err(e) => assert!(err_of(&e).1 >= 500, "{e:?}"),
            Ok(o) => assert!(
                o.body.collect().await.is_err(),
                "a GET answered without enough shards"
            ),
        }
    });
    // A byte flipped in a shard of e1's first block: scrub finds it, quarantines
    // it and rebuilds it from the other shards.
    let first = &objs[1][..4 << 20];
    let victim = shard_files(&dev, 5, first).remove(0);
    let good = std::fs::read(&victim.2).unwrap();
    flip_byte(&victim.2);
    scrub_cmd(&dev, &["start"]);
    eventually(Duration::from_secs(60), || {
        let st = scrub_status(&dev, 5);
        let repaired: u64 = st.iter().map(|n| n["repaired"].as_u64().unwrap_or(0)).sum();
        let done = st.iter().all(|n| n["running"] == false);
        match done && repaired == 1 && std::fs::read(&victim.2).ok() == Some(good.clone()) {
            true => Ok(()),
            false => Err(format!("the flipped shard was not rebuilt: {st:?}")),
        }
    });
    // One node down: writes go on (four shards), reads too. Two down: reads go on,
    // a write (needing four live nodes) is refused with 503.
    let leader = dev.leader();
    let down: Vec<usize> = (0..5).filter(|i| *i != leader).take(2).collect();
    let up: Vec<usize> = (0..5).filter(|i| !down.contains(i)).collect();
    dev.kill9(down[0]);
    let late = bytes(300 << 10, 9);
    rt.block_on(async {
        put(&c[up[0]], "late", &late).await;
    });
    dev.kill9(down[1]);
    rt.block_on(async {
        for &u in &up {
            for (i, o) in objs.iter().enumerate().take(2) {
                assert_eq!(&get(&c[u], &format!("e{i}")).await, o, "e{i} via node {u}");
            }
            assert_eq!(get(&c[u], "late").await, late);
        }
        let e = c[up[1]]
            .put_object()
            .bucket("bkt")
            .key("refused")
            .body(bytes(100 << 10, 11).into())
            .send()
            .await
            .unwrap_err();
        assert_eq!(err_of(&e).1, 503, "{e:?}");
    });
}

/// A node of six removed from under an EC:3+2 bucket: its shards move to the nodes
/// placement now names before it leaves (one of them gone bad on the way); each
/// block then has its five shards on five distinct remaining nodes and reads
/// back whole.
#[test]
fn a_drained_node_takes_its_shards_to_their_new_places() {
    let (dev, rt, c) = with_ec_objects(6, &["--move-interval=1s"], 20);
    let on_5 = (0..20)
        .filter(|k| shard_files(&dev, 6, &object(*k)).iter().any(|s| s.0 == 5))
        .count();
    assert!(on_5 > 5, "node 5 held shards of only {on_5} of 20 blocks");
    // A shard gone bad on the drained node is rebuilt from the others on the
    // way: the drain does not wait for the scrub.
    let bad = (0..20)
        .flat_map(|k| shard_files(&dev, 6, &object(k)))
        .find(|s| s.0 == 5)
        .unwrap();
    flip_byte(&bad.2);
    let gone = dev.node(5)["id"].as_str().unwrap().to_string();
    dev.cluster_ok(&["remove", &gone]);
    wait_until_left(&dev, 0, 5);
    // The others' shards that the new layout places elsewhere move too.
    eventually(Duration::from_secs(60), || {
        for k in 0..20 {
            let shards = shard_files(&dev, 6, &object(k));
            let nodes: HashSet<usize> = shards.iter().map(|s| s.0).collect();
            let indices: Vec<u8> = shards.iter().map(|s| s.1).collect();
            if indices != [0, 1, 2, 3, 4] || nodes.len() != 5 || nodes.contains(&5) {
                return Err(format!("k{k}: {shards:?}"));
            }
        }
        Ok(())
    });
    rt.block_on(async {
        for cu in &c[..5] {
            for k in 0..20 {
                assert_eq!(get(cu, &format!("k{k}")).await, object(k));
            }
        }
    });
}

/// Index → number of live copies of each shard of the block `data` (nodes of
/// `skip` left out).
fn shard_census(dev: &Dev, nodes: usize, data: &[u8], skip: &[usize]) -> Vec<usize> {
    let mut n = vec![0; 5];
    for s in shard_files(dev, nodes, data) {
        if !skip.contains(&s.0) {
            n[usize::from(s.1)] += 1;
        }
    }
    n
}

/// EC:3+2 repair: a shard file gone from its node is rebuilt there by the next
/// check; the shards of a node down past `repair_after` are rebuilt from the
/// others on stand-ins (the blocks have five live shards again), and once the
/// node is back the stand-ins are dropped (one shard of each index left).
#[test]
fn lost_shards_are_rebuilt_and_stand_ins_go_when_the_node_returns() {
    let (mut dev, rt, c) = with_ec_objects(
        6,
        &[
            "--move-interval=1s",
            "--repair-after=2s",
            "--repair-interval=2s",
        ],
        12,
    );
    eventually(Duration::from_secs(20), || {
        match (0..12).all(|k| shard_census(&dev, 6, &object(k), &[]) == [1; 5]) {
            true => Ok(()),
            false => Err("the writes' fifth shards did not arrive".into()),
        }
    });
    let lost = shard_files(&dev, 6, &object(0)).remove(2);
    std::fs::remove_file(&lost.2).unwrap();
    eventually(Duration::from_secs(30), || match lost.2.exists() {
        true => Ok(()),
        false => Err("a deleted shard was not rebuilt".into()),
    });
    let leader = dev.leader();
    let victim = (0..6).find(|i| *i != leader).unwrap();
    dev.kill9(victim);
    eventually(Duration::from_secs(60), || {
        for k in 0..12 {
            let n = shard_census(&dev, 6, &object(k), &[victim]);
            if n.contains(&0) {
                return Err(format!("k{k}: live shards {n:?}"));
            }
        }
        Ok(())
    });
    dev.restart(victim);
    eventually(Duration::from_secs(60), || {
        for k in 0..12 {
            let n = shard_census(&dev, 6, &object(k), &[]);
            if n != [1; 5] {
                return Err(format!("k{k}: shards {n:?}"));
            }
        }
        Ok(())
    });
    rt.block_on(async {
        for k in 0..12 {
            assert_eq!(get(&c[victim], &format!("k{k}")).await, object(k));
        }
    });
}

/// A cluster shrunk below an EC:3+2 bucket's width (five nodes, one removed):
/// the drain completes with two shards of a block on one node at most, and
/// blocks are written and read as before.
#[test]
fn a_cluster_shrunk_below_the_class_width_doubles_up_shards() {
    let (dev, rt, c) = with_ec_objects(5, &["--move-interval=1s"], 10);
    let gone = dev.node(4)["id"].as_str().unwrap().to_string();
    dev.cluster_ok(&["remove", &gone]);
    wait_until_left(&dev, 0, 4);
    rt.block_on(async {
        for i in 10..20 {
            put(&c[i % 4], &format!("k{i}"), &object(i)).await;
        }
    });
    eventually(Duration::from_secs(60), || {
        for k in 0..20 {
            let shards = shard_files(&dev, 5, &object(k));
            let indices: Vec<u8> = shards.iter().map(|s| s.1).collect();
            let per_node = (0..5).map(|n| shards.iter().filter(|s| s.0 == n).count());
            if indices != [0, 1, 2, 3, 4]
                || shards.iter().any(|s| s.0 == 4)
                || per_node.clone().max() != Some(2)
            {
                return Err(format!("k{k}: {shards:?}"));
            }
        }
        Ok(())
    });
    rt.block_on(async {
        for cu in &c[..4] {
            for k in 0..20 {
                assert_eq!(get(cu, &format!("k{k}")).await, object(k));
            }
        }
    });
    // Setting the class again is refused now (four nodes).
    let out = set_class(&dev, "bkt", "EC:3+2");
    assert!(!out.status.success());
}

/// Every key of `bkt` with its bytes, read through `c`.
async fn bucket_contents(c: &aws_sdk_s3::Client) -> Vec<(String, Vec<u8>)> {
    let listed = c.list_objects_v2().bucket("bkt").send().await.unwrap();
    let mut out = Vec::new();
    for o in listed.contents() {
        let key = o.key().unwrap().to_string();
        let body = get(c, &key).await;
        out.push((key, body));
    }
    out
}

/// Disaster recovery of a cluster's metadata: a snapshot saved through one
/// node, every node stopped and restored from it, started again: the cluster
/// elects a leader, every node serves the objects of the snapshot's moment
/// (with their bytes; the ones deleted since are back, the ones written since
/// are gone), and takes writes again.
#[test]
fn a_cluster_restored_from_a_snapshot_is_back_at_its_moment() {
    let mut dev = Dev::start(3, 3, &[]);
    let (rt, c) = with_objects(&dev, 3, 6);
    let then = rt.block_on(bucket_contents(&c[1]));
    assert_eq!(then.len(), 6);
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("cluster.snap");
    dev.save_snapshot(&snap);
    rt.block_on(async {
        for i in 6..9 {
            put(&c[i % 3], &format!("k{i}"), &object(i)).await;
        }
        c[2].delete_object()
            .bucket("bkt")
            .key("k0")
            .send()
            .await
            .unwrap();
    });
    for i in 0..3 {
        dev.kill9(i);
    }
    for i in 0..3 {
        let out = Command::new(common::binary())
            .args([
                "admin",
                "snapshot",
                "restore",
                snap.to_str().unwrap(),
                "--data-dir",
            ])
            .arg(dev.data_dir(i))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "node {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for i in 0..3 {
        dev.restart(i);
    }
    rt.block_on(async {
        for (i, cl) in c.iter().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    match cl.list_objects_v2().bucket("bkt").send().await {
                        Ok(_) => break bucket_contents(cl).await,
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("node {i} did not serve after the restore"));
            assert_eq!(got, then, "node {i} is not at the snapshot's moment");
        }
        put(&c[1], "after", &object(20)).await;
        assert_eq!(get(&c[2], "after").await, object(20));
    });
}

/// Scheduled backups runs counted as done by node `i` (0 when it answers none).
fn backup_runs(dev: &Dev, i: usize) -> f64 {
    admin_get(dev.node(i)["admin_endpoint"].as_str().unwrap(), "/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("cairn_backup_runs_total") && l.contains("result=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The ids of the backups at a target, oldest first.
fn backups_at(target: &Path) -> Vec<String> {
    let out = Command::new(common::binary())
        .args([
            "backup",
            "list",
            "--json",
            "--target",
            target.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// Every node of a cluster has the same `[[backup]]` section; only the leader
/// takes the backups, and when it is killed the next leader goes on with the
/// schedule at the same target (taking over a lock the dead one may have left).
#[test]
fn scheduled_backups_are_taken_by_the_leader_and_go_on_after_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("backups");
    let (_cfg, flag) = config_file(&format!(
        "[[backup]]\ntarget = \"{}\"\nbuckets = [\"bkt\"]\ninterval = \"1s\"\n",
        target.display()
    ));
    let mut dev = Dev::start(3, 3, &[&flag]);
    let (rt, _) = with_objects(&dev, 3, 6);
    eventually(Duration::from_secs(60), || {
        let n = backups_at(&target).len();
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} backups"))
        }
    });
    let leader = dev.leader();
    for i in 0..3 {
        let runs = backup_runs(&dev, i);
        if i == leader {
            assert!(runs >= 1.0, "the leader took no backup");
        } else {
            assert_eq!(runs, 0.0, "node {i}, not the leader, took backups");
        }
    }
    dev.kill9(leader);
    let before = backups_at(&target).len();
    eventually(Duration::from_secs(60), || {
        let n = backups_at(&target).len();
        if n >= before + 2 {
            Ok(())
        } else {
            Err(format!("{n} backups, {before} when the leader died"))
        }
    });
    let others: f64 = (0..3)
        .filter(|i| *i != leader)
        .map(|i| backup_runs(&dev, i))
        .sum();
    assert!(others >= 2.0, "no other node went on with the schedule");
    // The newest backup restores every object.
    let newest = backups_at(&target).last().unwrap().clone();
    let up = (0..3).find(|i| *i != leader).unwrap();
    let out = Command::new(common::binary())
        .args([
            "restore",
            "--target",
            target.to_str().unwrap(),
            "--id",
            &newest,
        ])
        .args(["--bucket", "bkt", "--to-bucket", "back", "--endpoint"])
        .arg(dev.node(up)["s3_endpoint"].as_str().unwrap())
        .env("CAIRN_ACCESS_KEY", common::ACCESS_KEY)
        .env("CAIRN_SECRET_KEY", common::SECRET_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rt.block_on(async {
        let cl = dev.client(up);
        for k in 0..6 {
            let got = cl
                .get_object()
                .bucket("back")
                .key(format!("k{k}"))
                .send()
                .await
                .unwrap()
                .body
                .collect()
                .await
                .unwrap()
                .into_bytes();
            assert_eq!(got.as_ref(), &object(k)[..], "k{k}");
        }
    });
}
