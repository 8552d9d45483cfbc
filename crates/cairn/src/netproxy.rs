//! A fault-injecting TCP proxy in front of each node's RPC port (`cairn chaos`).
//!
//! Node i advertises its proxy's port (`--rpc-advertise`), so every connection
//! another node opens to it, Raft and block traffic alike, goes through the proxy.
//! The proxy reads the RPC hello's first bytes to learn which node is calling
//! (`"CAIRNRPC" | version: u16 | node id: u64`, see `cairn_net`), then forwards
//! bytes both ways, consulting the state of each directed link:
//! - cut: the connection is closed and new ones are refused (a partition that
//!   resets connections);
//! - stalled: nothing is forwarded until the link heals (packets dropped: the
//!   sender's bytes wait in buffers and its requests time out);
//! - delayed: every chunk waits before it is forwarded.
//!
//! A change of any link wakes every connection, which applies it at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A link that is not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Cut,
    Stall,
    Delay(Duration),
}

/// The state of every directed link between nodes (by index), and the node ids
/// the hellos carry.
pub struct Links {
    links: Mutex<HashMap<(usize, usize), Link>>,
    ids: Mutex<HashMap<u64, usize>>,
    changed: watch::Sender<u64>,
}

impl Links {
    pub fn new() -> Arc<Links> {
        Arc::new(Links {
            links: Mutex::default(),
            ids: Mutex::default(),
            changed: watch::channel(0).0,
        })
    }

    /// Which node index a node id is.
    pub fn learn(&self, id: u64, index: usize) {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, index);
    }

    fn index_of(&self, id: u64) -> Option<usize> {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied()
    }

    /// Sets the link from `from` to `to` (`None`: open).
    pub fn set(&self, from: usize, to: usize, link: Option<Link>) {
        {
            let mut l = self.links.lock().unwrap_or_else(|p| p.into_inner());
            match link {
                Some(k) => l.insert((from, to), k),
                None => l.remove(&(from, to)),
            };
        }
        self.changed.send_modify(|g| *g += 1);
    }

    fn get(&self, from: Option<usize>, to: usize) -> Option<Link> {
        let from = from?;
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(from, to))
            .copied()
    }
}

/// Length of the part of the RPC hello that names the caller.
const HELLO: usize = 8 + 2 + 8;

/// Serves the proxy for node `node` (whose RPC port is `target`) on `listener`
/// until the runtime stops.
pub fn spawn(listener: std::net::TcpListener, target: SocketAddr, node: usize, links: Arc<Links>) {
    tokio::spawn(async move {
        let _ = listener.set_nonblocking(true);
        let Ok(listener) = TcpListener::from_std(listener) else {
            return;
        };
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let links = links.clone();
            tokio::spawn(async move {
                let _ = serve(conn, target, node, links).await;
            });
        }
    });
}

async fn serve(
    mut inbound: TcpStream,
    target: SocketAddr,
    node: usize,
    links: Arc<Links>,
) -> std::io::Result<()> {
    let _ = inbound.set_nodelay(true);
    let mut hello = [0u8; HELLO];
    tokio::time::timeout(Duration::from_secs(10), inbound.read_exact(&mut hello))
        .await
        .map_err(|_| std::io::Error::other("no hello"))??;
    let caller = (&hello[..8] == b"CAIRNRPC")
        .then(|| u64::from_le_bytes(hello[10..18].try_into().unwrap_or([0; 8])))
        .and_then(|id| links.index_of(id));
    let mut changed = links.changed.subscribe();
    // Until the link lets it through, the connection waits (or goes).
    if !pass(&links, caller, node, &mut changed).await {
        return Ok(());
    }
    let mut outbound = TcpStream::connect(target).await?;
    let _ = outbound.set_nodelay(true);
    outbound.write_all(&hello).await?;
    let (ri, wi) = inbound.into_split();
    let (ro, wo) = outbound.into_split();
    let up = pump(ri, wo, links.clone(), caller, Some(node));
    let down = pump(ro, wi, links, Some(node), caller);
    // Either direction ending ends both.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    Ok(())
}

/// Waits while the link from `from` to `to` is stalled; whether it may carry
/// bytes (false: cut).
async fn pass(
    links: &Links,
    from: Option<usize>,
    to: usize,
    changed: &mut watch::Receiver<u64>,
) -> bool {
    loop {
        match links.get(from, to) {
            Some(Link::Cut) => return false,
            Some(Link::Stall) => {
                if changed.changed().await.is_err() {
                    return false;
                }
            }
            _ => return true,
        }
    }
}

/// Forwards bytes from `r` to `w` as the link from `from` to `to` allows.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    links: Arc<Links>,
    from: Option<usize>,
    to: Option<usize>,
) {
    let mut changed = links.changed.subscribe();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            c = changed.changed() => {
                if c.is_err() {
                    return;
                }
                // A cut closes an idle connection at once.
                if let Some(to) = to
                    && links.get(from, to) == Some(Link::Cut)
                {
                    return;
                }
                continue;
            }
        };
        if let Some(to) = to {
            if !pass(&links, from, to, &mut changed).await {
                return;
            }
            if let Some(Link::Delay(d)) = links.get(from, to) {
                tokio::time::sleep(d).await;
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// The start of an RPC hello from node id `id`.
    fn hello_of(id: u64) -> Vec<u8> {
        let mut hello = Vec::from(&b"CAIRNRPC"[..]);
        hello.extend_from_slice(&1u16.to_le_bytes());
        hello.extend_from_slice(&id.to_le_bytes());
        hello
    }

    /// A connection through the proxy that says it is node id 7.
    async fn dial(proxy: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        let hello = hello_of(7);
        s.write_all(&hello).await.unwrap();
        let mut back = [0u8; HELLO];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back[..], &hello[..], "the hello is forwarded as it came");
        s
    }

    async fn round_trip(s: &mut TcpStream, within: Duration) -> Option<Duration> {
        let t = tokio::time::Instant::now();
        s.write_all(b"ping").await.ok()?;
        let mut b = [0u8; 4];
        match tokio::time::timeout(within, s.read_exact(&mut b)).await {
            Ok(Ok(_)) if &b == b"ping" => Some(t.elapsed()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn links_are_cut_stalled_and_delayed_as_set() {
        let target = echo().await;
        let links = Links::new();
        links.learn(7, 0);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = l.local_addr().unwrap();
        spawn(l, target, 1, links.clone());
        let short = Duration::from_millis(300);

        let mut s = dial(proxy).await;
        assert!(round_trip(&mut s, Duration::from_secs(5)).await.is_some());

        // Stalled: nothing comes back until the link heals, then it does.
        links.set(0, 1, Some(Link::Stall));
        assert!(round_trip(&mut s, short).await.is_none());
        links.set(0, 1, None);
        let mut b = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&b, b"ping");

        // Delayed: each way waits.
        links.set(0, 1, Some(Link::Delay(Duration::from_millis(200))));
        let took = round_trip(&mut s, Duration::from_secs(5)).await.unwrap();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        links.set(0, 1, None);

        // Cut: the open connection closes, and a new one is closed after its hello.
        links.set(0, 1, Some(Link::Cut));
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        let mut s2 = TcpStream::connect(proxy).await.unwrap();
        s2.write_all(&hello_of(7)).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), s2.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

        // Another caller's link is not this one: it goes through.
        links.learn(8, 2);
        let mut s3 = TcpStream::connect(proxy).await.unwrap();
        s3.write_all(&hello_of(8)).await.unwrap();
        let mut back = [0u8; HELLO];
        s3.read_exact(&mut back).await.unwrap();
        assert!(round_trip(&mut s3, Duration::from_secs(5)).await.is_some());
    }
}
