//! Metadata stores of several nodes in one process, talking Raft over real loopback
//! sockets: writes and linearizable reads through any node, failover.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_meta::raft::Member;
use cairn_meta::raft::network::RaftService;
use cairn_meta::{
    Command, MetaError, MetaOptions, MetaStore, ObjectData, ObjectRecord, WriteCondition,
};
use cairn_net::{Identity, Peers};
use tokio::net::TcpListener;
use tokio::sync::watch;

struct Node {
    store: MetaStore,
    addr: String,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn start(id: u64, join: bool) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let me = Identity::new(id, b"cluster secret");
    let store = MetaStore::open_with(
        &dir.path().join("meta.redb"),
        MetaOptions {
            node_id: id,
            rpc_address: addr.clone(),
            peers: Some(Peers::new(me.clone(), Duration::from_secs(2))),
            join,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (stop, rx) = watch::channel(false);
    let svc = Arc::new(RaftService {
        store: store.clone(),
    });
    tokio::spawn(cairn_net::serve(listener, me, svc, rx));
    Node {
        store,
        addr,
        stop,
        _dir: dir,
    }
}

fn obj(etag: &str) -> ObjectRecord {
    ObjectRecord {
        size: 1,
        etag: etag.into(),
        last_modified: 1,
        headers: Default::default(),
        checksums: Default::default(),
        parts_count: None,
        data: ObjectData::Inline(etag.as_bytes().to_vec()),
    }
}

async fn create_bucket(store: &MetaStore, name: &str) {
    store
        .apply(Command::CreateBucket {
            bucket: name.into(),
            now: 1,
        })
        .await
        .unwrap();
}

fn put(key: &str, etag: &str) -> Command {
    Command::PutObject {
        bucket: "b".into(),
        key: key.into(),
        record: obj(etag),
        cond: WriteCondition::None,
    }
}

fn member(n: &Node, zone: &str) -> Member {
    Member {
        rpc: n.addr.clone(),
        zone: zone.into(),
    }
}

/// Three nodes: node 1 starts the group; 2 joins through it, 3 through node 2 (a
/// follower, which passes the request to the leader). With three members all vote.
async fn three() -> Vec<Node> {
    let n1 = start(1, false).await;
    let n2 = start(2, true).await;
    let n3 = start(3, true).await;
    n1.store.add_member(2, member(&n2, "z2")).await.unwrap();
    let voters = |n: &Node| -> BTreeSet<u64> {
        n.store
            .raft()
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    };
    assert_eq!(voters(&n1), BTreeSet::from([1]), "two members: one voter");
    n2.store.add_member(3, member(&n3, "z3")).await.unwrap();
    assert_eq!(voters(&n1), BTreeSet::from([1, 2, 3]));
    vec![n1, n2, n3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_any_node_are_read_at_once_on_every_node() {
    let nodes = three().await;
    create_bucket(&nodes[0].store, "b").await;
    // At once, no retry: the bucket exists on the followers for a linearizable read.
    for n in &nodes[1..] {
        assert_eq!(n.store.object("b", "k").await.unwrap(), None);
    }
    // A write through a follower is forwarded to the leader.
    for (i, n) in nodes.iter().enumerate() {
        n.store
            .apply(put(&format!("k{i}"), &format!("e{i}")))
            .await
            .unwrap();
        for m in &nodes {
            let got = m.store.object("b", &format!("k{i}")).await.unwrap();
            assert_eq!(got.map(|r| r.etag), Some(format!("e{i}")));
        }
    }
    let q = cairn_meta::ListQuery {
        max: 100,
        ..Default::default()
    };
    let first = nodes[0].store.list("b", q.clone()).await.unwrap();
    assert_eq!(first.entries.len(), 3);
    for n in &nodes[1..] {
        assert_eq!(
            n.store.list("b", q.clone()).await.unwrap().entries,
            first.entries
        );
    }
    // Conditions are checked by the state machine, the same on every node.
    let dup = nodes[2]
        .store
        .apply(Command::CreateBucket {
            bucket: "b".into(),
            now: 2,
        })
        .await;
    assert!(
        matches!(dup, Err(MetaError::BucketAlreadyOwnedByYou)),
        "{dup:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_after_the_leader_stops() {
    let mut nodes = three().await;
    create_bucket(&nodes[0].store, "b").await;
    for i in 0..20 {
        nodes[i % 3]
            .store
            .apply(put(&format!("k{i}"), "v1"))
            .await
            .unwrap();
    }
    // Stop the leader (node 1): its Raft and its RPC server.
    let leader = nodes.remove(0);
    leader.stop.send(true).unwrap();
    leader.store.close().await.unwrap();
    drop(leader);
    let stopped = Instant::now();
    let resumed = loop {
        match nodes[0].store.apply(put("after", "v2")).await {
            Ok(_) => break stopped.elapsed(),
            Err(MetaError::Unavailable) if stopped.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("writes did not resume: {e}"),
        }
    };
    eprintln!("writes resumed {resumed:?} after the leader stopped");
    // Every acknowledged write reads back on both survivors.
    for n in &nodes {
        for i in 0..20 {
            let got = n.store.object("b", &format!("k{i}")).await.unwrap();
            assert_eq!(got.map(|r| r.etag), Some("v1".to_string()));
        }
        assert!(n.store.object("b", "after").await.unwrap().is_some());
    }
}

/// A node that started as a cluster of one (with its own generated key) leaves it
/// and is added to another cluster, whose data it then serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_its_own_joins_another_cluster() {
    let n1 = start(1, false).await;
    create_bucket(&n1.store, "b").await;
    n1.store.apply(put("k", "e1")).await.unwrap();
    let n2 = start(2, false).await;
    n2.store
        .apply(Command::PutKey {
            access_key: "MINE".into(),
            record: cairn_meta::KeyRecord {
                secret: "s".into(),
                root: true,
                created: 1,
            },
        })
        .await
        .unwrap();
    // A node with buckets cannot join.
    let n3 = start(3, false).await;
    create_bucket(&n3.store, "mine").await;
    assert!(matches!(
        n3.store.reset_for_join().await,
        Err(MetaError::Refused(_))
    ));

    n2.store.reset_for_join().await.unwrap();
    assert!(
        n2.store.key("MINE").is_none(),
        "its own key went with its cluster"
    );
    n1.store.add_member(2, member(&n2, "z1")).await.unwrap();
    let got = n2.store.object("b", "k").await.unwrap();
    assert_eq!(got.map(|r| r.etag), Some("e1".into()));
    n2.store.apply(put("k2", "e2")).await.unwrap();
    let got = n1.store.object("b", "k2").await.unwrap();
    assert_eq!(got.map(|r| r.etag), Some("e2".into()));
}

/// Concurrent reads on the followers (sharing barrier rounds) while the leader
/// overwrites a key: a read that starts after a write was acknowledged sees it or a
/// later one, and no reader goes back in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_follower_reads_never_miss_an_acknowledged_write() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let nodes = three().await;
    create_bucket(&nodes[0].store, "b").await;
    nodes[0].store.apply(put("k", "0")).await.unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..8 {
        let store = nodes[1 + r % 2].store.clone();
        let (acked, done) = (acked.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let (mut last, mut reads) = (0u64, 0u64);
            while !done.load(Ordering::Acquire) {
                let floor = acked.load(Ordering::Acquire);
                let rec = store.object("b", "k").await.unwrap().unwrap();
                let v: u64 = rec.etag.parse().unwrap();
                assert!(v >= floor, "read {v} after {floor} was acknowledged");
                assert!(v >= last, "read {v} after having read {last}");
                last = v;
                reads += 1;
            }
            reads
        }));
    }
    for v in 1..=200u64 {
        nodes[0]
            .store
            .apply(put("k", &v.to_string()))
            .await
            .unwrap();
        acked.store(v, Ordering::Release);
    }
    done.store(true, Ordering::Release);
    for r in readers {
        assert!(r.await.unwrap() > 0);
    }
}
