//! The RPC transport between real sockets on loopback.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_net::{Client, Identity, NodeId, Peers, RpcError, Service, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const T: Duration = Duration::from_secs(10);

/// Service 1 echoes the body reversed with the caller's id appended; 2 sleeps for
/// the number of milliseconds in the body; 3 fails.
struct Test;

#[async_trait::async_trait]
impl Service for Test {
    async fn call(&self, peer: NodeId, service: u8, body: Bytes) -> Result<Bytes, String> {
        match service {
            1 => {
                let mut v: Vec<u8> = body.iter().rev().copied().collect();
                v.extend_from_slice(&peer.to_le_bytes());
                Ok(Bytes::from(v))
            }
            2 => {
                let ms = u64::from_le_bytes(body[..8].try_into().map_err(|_| "bad body")?);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(body)
            }
            _ => Err(format!("service {service} failed on purpose")),
        }
    }
}

async fn server(id: NodeId, secret: &[u8]) -> (String, watch::Sender<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (tx, rx) = watch::channel(false);
    tokio::spawn(serve(l, Identity::new(id, secret), Arc::new(Test), rx));
    (addr, tx)
}

#[tokio::test]
async fn calls_are_answered_and_multiplexed() {
    let (addr, _stop) = server(2, b"s3cret").await;
    let c = Client::connect(&addr, &Identity::new(7, b"s3cret"), T)
        .await
        .unwrap();
    assert_eq!(c.peer(), 2);
    // A slow request does not hold up the fast ones behind it.
    let slow = {
        let c = c.clone();
        tokio::spawn(async move {
            c.call(2, Bytes::from(800u64.to_le_bytes().to_vec()), T)
                .await
        })
    };
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(format!("request {i}"));
            let got = c.call(1, body.clone(), T).await.unwrap();
            let mut want: Vec<u8> = body.iter().rev().copied().collect();
            want.extend_from_slice(&7u64.to_le_bytes());
            assert_eq!(got, want);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "fast calls waited for the slow one"
    );
    slow.await.unwrap().unwrap();
}

#[tokio::test]
async fn large_bodies_round_trip() {
    let (addr, _stop) = server(2, b"k").await;
    let c = Client::connect(&addr, &Identity::new(1, b"k"), T)
        .await
        .unwrap();
    let body: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    let got = c.call(1, Bytes::from(body.clone()), T).await.unwrap();
    assert_eq!(
        &got[..body.len()],
        body.iter().rev().copied().collect::<Vec<u8>>().as_slice()
    );
}

/// Frames of every size around the connection's buffers, sent at once, each come
/// back whole and to their own caller.
#[tokio::test]
async fn mixed_sizes_sent_together_round_trip() {
    let (addr, _stop) = server(2, b"k").await;
    let c = Client::connect(&addr, &Identity::new(1, b"k"), T)
        .await
        .unwrap();
    let sizes = [
        0usize,
        1,
        13,
        65_000,
        65_522,
        65_536,
        65_550,
        131_072,
        200_003,
        1 << 20,
    ];
    let mut tasks = Vec::new();
    for round in 0..8usize {
        for (i, &n) in sizes.iter().enumerate() {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let body: Vec<u8> = (0..n).map(|j| ((j + i + round) % 253) as u8).collect();
                let got = c.call(1, Bytes::from(body.clone()), T).await.unwrap();
                let mut want: Vec<u8> = body.iter().rev().copied().collect();
                want.extend_from_slice(&1u64.to_le_bytes());
                assert_eq!(got.len(), want.len(), "size {n}");
                assert!(got == want, "size {n}: bytes differ");
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn a_wrong_secret_is_refused_both_ways() {
    let (addr, _stop) = server(2, b"right").await;
    match Client::connect(&addr, &Identity::new(1, b"wrong"), T).await {
        Err(RpcError::Refused { reason, .. }) => assert!(reason.contains("secret"), "{reason}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a client with the wrong secret was accepted"),
    }
    // The server, too, is checked: a server without the secret is not trusted.
    let (addr, _stop2) = server(3, b"impostor").await;
    match Client::connect(&addr, &Identity::new(1, b"right"), T).await {
        Err(RpcError::Refused { reason, .. }) => {
            assert!(reason.contains("secrets differ"), "{reason}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a server with the wrong secret was trusted"),
    }
}

#[tokio::test]
async fn another_protocol_version_is_refused_with_a_reason() {
    let (addr, _stop) = server(2, b"k").await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut hello = b"CAIRNRPC".to_vec();
    hello.extend_from_slice(&99u16.to_le_bytes());
    hello.extend_from_slice(&5u64.to_le_bytes());
    hello.extend_from_slice(&[0u8; 32]);
    s.write_all(&hello).await.unwrap();
    let mut ch = [0u8; 83];
    s.read_exact(&mut ch).await.unwrap();
    assert_eq!(&ch[..8], b"CAIRNRPC");
    assert_eq!(
        u16::from_le_bytes([ch[8], ch[9]]),
        cairn_net::PROTOCOL_VERSION
    );
    assert_eq!(ch[10], 1, "status: refused");
    // And the server closes the connection.
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).await.unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn garbage_closes_only_its_own_connection() {
    let (addr, _stop) = server(2, b"k").await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&[0xAB; 300]).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .unwrap();
    let c = Client::connect(&addr, &Identity::new(1, b"k"), T)
        .await
        .unwrap();
    assert!(c.call(1, Bytes::from_static(b"ok"), T).await.is_ok());
}

#[tokio::test]
async fn timeouts_and_remote_errors_are_reported() {
    let (addr, _stop) = server(2, b"k").await;
    let c = Client::connect(&addr, &Identity::new(1, b"k"), T)
        .await
        .unwrap();
    let r = c
        .call(
            2,
            Bytes::from(2000u64.to_le_bytes().to_vec()),
            Duration::from_millis(100),
        )
        .await;
    assert_eq!(r, Err(RpcError::Timeout(Duration::from_millis(100))));
    match c.call(3, Bytes::new(), T).await {
        Err(RpcError::Remote(m)) => assert!(m.contains("on purpose"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The connection still serves.
    assert!(c.call(1, Bytes::from_static(b"x"), T).await.is_ok());
}

#[tokio::test]
async fn peers_reconnect_after_a_restart() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(serve(l, Identity::new(2, b"k"), Arc::new(Test), rx));
    let peers = Peers::new(Identity::new(1, b"k"), T);
    assert!(
        peers
            .call(&addr.to_string(), 1, Bytes::from_static(b"a"), T)
            .await
            .is_ok()
    );
    // Stop the server (its listener and connections go), then start it again.
    stop.send(true).unwrap();
    task.await.unwrap();
    let mut tries = 0;
    let l = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let (_stop2, rx2) = watch::channel(false);
    tokio::spawn(serve(l, Identity::new(2, b"k"), Arc::new(Test), rx2));
    // The old connection is dead; at most one call fails before a new one is made.
    let mut ok = false;
    for _ in 0..3 {
        if peers
            .call(&addr.to_string(), 1, Bytes::from_static(b"b"), T)
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "no call succeeded after the restart");
}

/// A node replaced by another on the same address: a call meant for the old one
/// is not sent to the new one (it names both), and a call for the new one works.
#[tokio::test]
async fn a_call_for_one_node_is_not_sent_to_another_at_its_address() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(serve(l, Identity::new(2, b"k"), Arc::new(Test), rx));
    let peers = Peers::new(Identity::new(1, b"k"), T);
    let a = addr.to_string();
    let got = peers.call_node(2, &a, 1, Bytes::from_static(b"x"), T).await;
    assert!(got.is_ok(), "{got:?}");
    stop.send(true).unwrap();
    task.await.unwrap();
    let l = loop {
        if let Ok(l) = TcpListener::bind(addr).await {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (_stop2, rx2) = watch::channel(false);
    tokio::spawn(serve(l, Identity::new(3, b"k"), Arc::new(Test), rx2));
    let mut wrong = None;
    for _ in 0..3 {
        match peers.call_node(2, &a, 1, Bytes::from_static(b"x"), T).await {
            Err(e @ RpcError::WrongNode { .. }) => {
                wrong = Some(e);
                break;
            }
            Ok(_) => panic!("a call for node 2 was answered by node 3"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let e = wrong.expect("no WrongNode error");
    assert_eq!(
        e.to_string(),
        format!("{a} is node 0000000000000003, not node 0000000000000002")
    );
    let got = peers.call_node(3, &a, 1, Bytes::from_static(b"y"), T).await;
    assert!(got.is_ok(), "{got:?}");
}

/// Forwards connections to `target`; those accepted before `stall_before` turns
/// past their number stop carrying bytes (kept open: a peer gone without closing,
/// or a link that drops every packet).
async fn forwarder(target: String, stall_before: Arc<std::sync::atomic::AtomicU64>) -> String {
    use std::sync::atomic::Ordering;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok((inbound, _)) = l.accept().await {
            let (me, stall) = (n, stall_before.clone());
            n += 1;
            let outbound = TcpStream::connect(&target).await.unwrap();
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            for (mut r, mut w) in [(ri, wo), (ro, wi)].map(|(r, w)| {
                (
                    Box::new(r) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(w) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                )
            }) {
                let stall = stall.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    loop {
                        let Ok(k) = r.read(&mut buf).await else {
                            return;
                        };
                        if k == 0 {
                            return;
                        }
                        while stall.load(Ordering::Relaxed) > me {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if w.write_all(&buf[..k]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    addr
}

/// A connection that goes silent without closing is dropped once a probe after a
/// timed-out call goes unanswered, and the next calls go over a new one; a peer
/// merely slow on one request keeps its connection (it answers the probe).
#[tokio::test]
async fn a_silent_connection_is_dropped_and_made_again() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (target, _stop) = server(2, b"k").await;
    let stall = Arc::new(AtomicU64::new(0));
    let via = forwarder(target, stall.clone()).await;
    let peers = Peers::new(Identity::new(1, b"k"), T);
    let short = Duration::from_millis(200);
    assert!(
        peers
            .call_node(2, &via, 1, Bytes::from_static(b"a"), short)
            .await
            .is_ok()
    );
    // Slow on one request: timed out, yet the connection still serves after the
    // probe's time.
    let slow = peers
        .call_node(
            2,
            &via,
            2,
            Bytes::from(1000u64.to_le_bytes().to_vec()),
            short,
        )
        .await;
    assert_eq!(slow, Err(RpcError::Timeout(short)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = peers.get(&via).await.unwrap();
    assert!(!c.is_closed(), "a live connection was dropped");
    // The first connection goes silent: calls time out, then a new connection
    // answers.
    stall.store(1, Ordering::Relaxed);
    let r = peers
        .call_node(2, &via, 1, Bytes::from_static(b"b"), short)
        .await;
    assert_eq!(r, Err(RpcError::Timeout(short)));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if peers
            .call_node(2, &via, 1, Bytes::from_static(b"c"), short)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no call got through a new connection"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.is_closed(), "the silent connection was kept");
}

/// A caller left unpolled while its connection is being made (a request whose
/// client went quiet, the loser of a hedged read) holds up no other caller of
/// that peer: they get a connection once that attempt has timed out.
#[tokio::test]
async fn a_caller_left_unpolled_while_connecting_holds_up_no_one() {
    use std::sync::atomic::AtomicU64;
    let (target, _stop) = server(2, b"k").await;
    // The first connection through the forwarder stalls (its handshake too).
    let via = forwarder(target, Arc::new(AtomicU64::new(1))).await;
    let peers = Peers::new(Identity::new(1, b"k"), Duration::from_millis(500));
    let mut first = Box::pin(peers.call_node(2, &via, 1, Bytes::from_static(b"a"), T));
    // Polled for a moment (the connection begun), then kept and never polled.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), first.as_mut())
            .await
            .is_err()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let call = peers.call_node(
            2,
            &via,
            1,
            Bytes::from_static(b"b"),
            Duration::from_millis(500),
        );
        match tokio::time::timeout(Duration::from_secs(3), call).await {
            Ok(Ok(_)) => break,
            Ok(Err(_)) => {} // the stalled attempt's own failure
            Err(_) => panic!("a call waited on the connection of a caller no one polls"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no call got through a new connection"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(first);
}
