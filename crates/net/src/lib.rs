//! Inter-node RPC: one transport for Raft and for data, over TCP.
//!
//! A connection starts with a handshake in which both ends prove they hold the
//! cluster secret without sending it (challenge and response), and agree on the
//! protocol version; a peer that fails either is refused, and the refusal is logged
//! with its reason on both ends. After it, the connecting node sends requests, each
//! with an id, and the other answers them in any order (many requests share one
//! connection; a slow one does not hold up the rest).
//!
//! # Wire format
//!
//! Handshake (fixed layouts, integers little-endian):
//! - hello, client to server: `"CAIRNRPC" | version: u16 | node id: u64 | nonce: [32]`
//! - challenge, server to client: `"CAIRNRPC" | version: u16 | status: u8 | node id: u64
//!   | nonce: [32] | proof: [32]` (status 1: the client's version is refused)
//! - proof, client to server: `proof: [32]`
//! - verdict, server to client: `status: u8` (0 accepted, 1 wrong secret)
//!
//! A proof is the BLAKE3 keyed hash, under a key derived from the secret, of a label
//! (`server` or `client`), both nonces and both node ids: each side's proof is bound
//! to this connection and to its role, so neither can be replayed or reflected.
//!
//! Then frames: `len: u32 | kind: u8 | id: u64 | service: u8 | body`, `len` counting
//! what follows it. Kinds: request, response, error (body: a UTF-8 message).
//!
//! The handshake authenticates peers; it does not encrypt or sign later frames: run
//! the cluster on a network that only its nodes can reach.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

/// Node ids, as in the metadata's Raft group.
pub type NodeId = u64;

/// Version of this protocol. A peer speaking another is refused.
pub const PROTOCOL_VERSION: u16 = 1;
const MAGIC: &[u8; 8] = b"CAIRNRPC";
/// The largest frame accepted (a block of data plus headroom).
pub const MAX_FRAME: usize = 64 << 20;
const FRAME_HEAD: usize = 1 + 8 + 1;
/// A handshake that takes longer is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one connection serves at once; beyond, reading waits (backpressure).
const MAX_CONCURRENT: usize = 256;
/// Frames waiting to be written on one connection.
const WRITE_QUEUE: usize = 256;
/// Read buffer of a connection: small frames arriving together are taken with one
/// read; larger ones are read straight into their own buffer.
const READ_BUFFER: usize = 64 << 10;
/// Write buffer of a connection: frames queued together go out in one write;
/// larger ones are written straight from their own buffer.
const WRITE_BUFFER: usize = 64 << 10;

const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;
const KIND_ERROR: u8 = 3;
/// A liveness probe, answered by the transport itself (not a service) with
/// `KIND_PONG`: a client whose call timed out with nothing heard since asks
/// whether the connection still carries anything at all.
const KIND_PING: u8 = 4;
const KIND_PONG: u8 = 5;
/// How long a probed connection may stay silent before it is dropped (and the
/// next call makes a new one).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RpcError {
    #[error("cannot reach {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{addr} refused this node: {reason}")]
    Refused { addr: String, reason: String },
    #[error("{0}")]
    Protocol(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before the answer")]
    Closed,
    /// The remote handler failed; its message.
    #[error("remote: {0}")]
    Remote(String),
    /// Another node answers at the address a node was known by (it was replaced
    /// by a new node on the same address, say): the request was not sent.
    #[error("{addr} is node {found:016x}, not node {expected:016x}")]
    WrongNode {
        addr: String,
        expected: NodeId,
        found: NodeId,
    },
}

/// Who this node is to its peers.
#[derive(Clone)]
pub struct Identity {
    pub node_id: NodeId,
    key: [u8; 32],
}

impl Identity {
    /// This node's identity in a cluster whose secret is `secret`.
    pub fn new(node_id: NodeId, secret: &[u8]) -> Identity {
        Identity {
            node_id,
            key: blake3::derive_key("cairn cluster secret 2026-11 handshake proof", secret),
        }
    }

    fn proof(
        &self,
        label: &[u8],
        nc: &[u8; 32],
        ns: &[u8; 32],
        client: u64,
        server: u64,
    ) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(label);
        h.update(nc);
        h.update(ns);
        h.update(&client.to_le_bytes());
        h.update(&server.to_le_bytes());
        *h.finalize().as_bytes()
    }
}

fn check_proof(got: &[u8; 32], want: &[u8; 32]) -> bool {
    // blake3::Hash compares in constant time.
    blake3::Hash::from_bytes(*got) == blake3::Hash::from_bytes(*want)
}

/// What serves requests: one call per request, `service` naming the subsystem.
#[async_trait::async_trait]
pub trait Service: Send + Sync + 'static {
    async fn call(&self, peer: NodeId, service: u8, body: Bytes) -> Result<Bytes, String>;
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub id: u64,
    pub service: u8,
    pub body: Bytes,
}

impl Frame {
    /// The bytes before the body: length, kind, id, service.
    fn head(&self) -> [u8; 4 + FRAME_HEAD] {
        let mut h = [0u8; 4 + FRAME_HEAD];
        h[..4].copy_from_slice(&((FRAME_HEAD + self.body.len()) as u32).to_le_bytes());
        h[4] = self.kind;
        h[5..13].copy_from_slice(&self.id.to_le_bytes());
        h[13] = self.service;
        h
    }

    #[cfg(test)]
    fn encode(&self) -> Bytes {
        let mut b = BytesMut::from(&self.head()[..]);
        b.extend_from_slice(&self.body);
        b.freeze()
    }

    /// Decodes a frame's bytes after its length. Never panics.
    pub fn decode(mut b: Bytes) -> Result<Frame, RpcError> {
        if b.len() < FRAME_HEAD {
            return Err(RpcError::Protocol("short frame".into()));
        }
        let kind = b.get_u8();
        let id = b.get_u64_le();
        let service = b.get_u8();
        if !matches!(
            kind,
            KIND_REQUEST | KIND_RESPONSE | KIND_ERROR | KIND_PING | KIND_PONG
        ) {
            return Err(RpcError::Protocol(format!("unknown frame kind {kind}")));
        }
        Ok(Frame {
            kind,
            id,
            service,
            body: b,
        })
    }
}

async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> Result<Option<Frame>, RpcError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(RpcError::Protocol(format!("read: {e}"))),
    }
    let len = u32::from_le_bytes(len) as usize;
    if !(FRAME_HEAD..=MAX_FRAME).contains(&len) {
        return Err(RpcError::Protocol(format!("frame of {len} bytes refused")));
    }
    let mut buf = BytesMut::zeroed(len);
    r.read_exact(&mut buf)
        .await
        .map_err(|e| RpcError::Protocol(format!("read: {e}")))?;
    Frame::decode(buf.freeze()).map(Some)
}

/// Writes the frames queued on `rx` to `wr` until the queue closes or a write
/// fails: every frame waiting at that moment goes out before one flush.
async fn write_frames(wr: impl AsyncWrite + Unpin, mut rx: mpsc::Receiver<Frame>) {
    let mut wr = BufWriter::with_capacity(WRITE_BUFFER, wr);
    while let Some(mut f) = rx.recv().await {
        loop {
            let sent = async {
                wr.write_all(&f.head()).await?;
                wr.write_all(&f.body).await
            };
            if sent.await.is_err() {
                return;
            }
            match rx.try_recv() {
                Ok(next) => f = next,
                Err(_) => break,
            }
        }
        if wr.flush().await.is_err() {
            return;
        }
    }
}

fn nonce() -> [u8; 32] {
    rand::random()
}

async fn handshake_server(
    s: &mut TcpStream,
    me: &Identity,
    peer: SocketAddr,
) -> Result<NodeId, String> {
    let mut hello = [0u8; 8 + 2 + 8 + 32];
    s.read_exact(&mut hello)
        .await
        .map_err(|e| format!("reading hello: {e}"))?;
    if &hello[..8] != MAGIC {
        return Err("not a cairn RPC client".into());
    }
    let version = u16::from_le_bytes([hello[8], hello[9]]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&hello[10..18]);
    let client = u64::from_le_bytes(id);
    let mut nc = [0u8; 32];
    nc.copy_from_slice(&hello[18..50]);
    let ns = nonce();
    let refused = version != PROTOCOL_VERSION;
    let proof = if refused {
        [0u8; 32]
    } else {
        me.proof(b"server", &nc, &ns, client, me.node_id)
    };
    let mut ch = Vec::with_capacity(83);
    ch.extend_from_slice(MAGIC);
    ch.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    ch.push(refused as u8);
    ch.extend_from_slice(&me.node_id.to_le_bytes());
    ch.extend_from_slice(&ns);
    ch.extend_from_slice(&proof);
    s.write_all(&ch)
        .await
        .map_err(|e| format!("writing challenge: {e}"))?;
    if refused {
        return Err(format!(
            "node {client:016x} at {peer} speaks protocol version {version}, this node {PROTOCOL_VERSION}"
        ));
    }
    let mut pc = [0u8; 32];
    s.read_exact(&mut pc)
        .await
        .map_err(|e| format!("reading proof: {e}"))?;
    let ok = check_proof(&pc, &me.proof(b"client", &nc, &ns, client, me.node_id));
    s.write_all(&[(!ok) as u8])
        .await
        .map_err(|e| format!("writing verdict: {e}"))?;
    if !ok {
        return Err(format!(
            "node {client:016x} at {peer} does not hold this cluster's secret"
        ));
    }
    Ok(client)
}

async fn handshake_client(
    s: &mut TcpStream,
    me: &Identity,
    addr: &str,
) -> Result<NodeId, RpcError> {
    let refused = |reason: String| RpcError::Refused {
        addr: addr.to_string(),
        reason,
    };
    let io = |what: &str, e: std::io::Error| RpcError::Protocol(format!("{what} with {addr}: {e}"));
    let nc = nonce();
    let mut hello = Vec::with_capacity(50);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hello.extend_from_slice(&me.node_id.to_le_bytes());
    hello.extend_from_slice(&nc);
    s.write_all(&hello).await.map_err(|e| io("handshake", e))?;
    let mut ch = [0u8; 8 + 2 + 1 + 8 + 32 + 32];
    s.read_exact(&mut ch)
        .await
        .map_err(|e| io("handshake", e))?;
    if &ch[..8] != MAGIC {
        return Err(RpcError::Protocol(format!(
            "{addr} is not a cairn RPC endpoint"
        )));
    }
    let version = u16::from_le_bytes([ch[8], ch[9]]);
    if ch[10] != 0 {
        return Err(refused(format!(
            "it speaks protocol version {version}, this node {PROTOCOL_VERSION}"
        )));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&ch[11..19]);
    let server = u64::from_le_bytes(id);
    let mut ns = [0u8; 32];
    ns.copy_from_slice(&ch[19..51]);
    let mut proof = [0u8; 32];
    proof.copy_from_slice(&ch[51..83]);
    let server_ok = check_proof(&proof, &me.proof(b"server", &nc, &ns, me.node_id, server));
    // The proof goes out even when the server's failed, so that the server, too,
    // learns (and logs) that the secrets differ; it reveals nothing of the secret.
    let pc = me.proof(b"client", &nc, &ns, me.node_id, server);
    s.write_all(&pc).await.map_err(|e| io("handshake", e))?;
    let mut verdict = [0u8; 1];
    let verdict_ok = s.read_exact(&mut verdict).await.is_ok() && verdict[0] == 0;
    if !server_ok || !verdict_ok {
        return Err(refused(format!(
            "node {server:016x} does not hold this node's cluster secret (the secrets differ)"
        )));
    }
    Ok(server)
}

/// Serves RPC connections on `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    me: Identity,
    service: Arc<dyn Service>,
    mut stop: watch::Receiver<bool>,
) {
    let me = Arc::new(me);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an RPC connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let (me, service, stop) = (me.clone(), service.clone(), stop.clone());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut stream = stream;
            let peer_id = match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake_server(&mut stream, &me, peer),
            )
            .await
            {
                Ok(Ok(id)) => id,
                Ok(Err(reason)) => {
                    tracing::warn!(%peer, %reason, "RPC connection refused");
                    metrics::counter!("cairn_rpc_refused_total").increment(1);
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "RPC connection refused: the handshake timed out");
                    return;
                }
            };
            tracing::debug!(%peer, peer_id = format!("{peer_id:016x}"), "RPC connection accepted");
            serve_connection(stream, peer_id, service, stop).await;
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: NodeId,
    service: Arc<dyn Service>,
    mut stop: watch::Receiver<bool>,
) {
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let (tx, rx) = mpsc::channel::<Frame>(WRITE_QUEUE);
    let writer = tokio::spawn(write_frames(wr, rx));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut rd) => f,
            _ = stop.changed() => break,
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(peer = format!("{peer:016x}"), error = %e, "bad RPC frame; closing the connection");
                break;
            }
        };
        if frame.kind == KIND_PING {
            let pong = Frame {
                kind: KIND_PONG,
                id: frame.id,
                service: 0,
                body: Bytes::new(),
            };
            if tx.send(pong).await.is_err() {
                break;
            }
            continue;
        }
        if frame.kind != KIND_REQUEST {
            tracing::warn!(
                peer = format!("{peer:016x}"),
                "unexpected RPC frame kind; closing the connection"
            );
            break;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (service, tx) = (service.clone(), tx.clone());
        tokio::spawn(async move {
            let (kind, body) = match service.call(peer, frame.service, frame.body).await {
                Ok(b) => (KIND_RESPONSE, b),
                Err(m) => (KIND_ERROR, Bytes::from(m)),
            };
            let out = Frame {
                kind,
                id: frame.id,
                service: frame.service,
                body,
            };
            let _ = tx.send(out).await;
            drop(permit);
        });
    }
    drop(tx);
    let _ = writer.await;
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, RpcError>>>>>;

/// A connection to one peer. Cheap to clone; all clones share it.
#[derive(Clone)]
pub struct Client {
    addr: String,
    peer: NodeId,
    tx: mpsc::Sender<Frame>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    closed: watch::Receiver<bool>,
    life: Arc<Life>,
}

/// What tells a connection that still answers from one that no longer does.
struct Life {
    /// When the connection was made; times below are milliseconds after it.
    epoch: std::time::Instant,
    /// When the last frame arrived.
    heard: AtomicU64,
    /// A probe is under way.
    probing: std::sync::atomic::AtomicBool,
    closed_tx: Arc<watch::Sender<bool>>,
    reader: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Life {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

impl Client {
    /// Connects to `addr` and runs the handshake.
    pub async fn connect(addr: &str, me: &Identity, timeout: Duration) -> Result<Client, RpcError> {
        let connect = async {
            let mut s = TcpStream::connect(addr)
                .await
                .map_err(|e| RpcError::Connect {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
            let _ = s.set_nodelay(true);
            let peer = handshake_client(&mut s, me, addr).await?;
            Ok::<_, RpcError>((s, peer))
        };
        let (stream, peer) =
            tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| RpcError::Connect {
                    addr: addr.to_string(),
                    reason: format!("no handshake within {timeout:?}"),
                })??;
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
        let (tx, rx) = mpsc::channel::<Frame>(WRITE_QUEUE);
        let pending: Pending = Arc::default();
        let (closed_tx, closed) = watch::channel(false);
        let closed_tx = Arc::new(closed_tx);
        let c2 = closed_tx.clone();
        tokio::spawn(async move {
            write_frames(wr, rx).await;
            let _ = c2.send(true);
        });
        let life = Arc::new(Life {
            epoch: std::time::Instant::now(),
            heard: AtomicU64::new(0),
            probing: std::sync::atomic::AtomicBool::new(false),
            closed_tx: closed_tx.clone(),
            reader: Mutex::new(None),
        });
        let p = pending.clone();
        let a = addr.to_string();
        let l2 = life.clone();
        let reader = tokio::spawn(async move {
            loop {
                match read_frame(&mut rd).await {
                    Ok(Some(f)) => {
                        l2.heard.store(l2.now(), Ordering::Relaxed);
                        let waiter = p.lock().unwrap_or_else(|e| e.into_inner()).remove(&f.id);
                        if let Some(w) = waiter {
                            let res = match f.kind {
                                KIND_RESPONSE => Ok(f.body),
                                KIND_ERROR => Err(RpcError::Remote(
                                    String::from_utf8_lossy(&f.body).into_owned(),
                                )),
                                _ => Err(RpcError::Protocol("unexpected frame kind".into())),
                            };
                            let _ = w.send(res);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(addr = %a, error = %e, "bad RPC frame; closing the connection");
                        break;
                    }
                }
            }
            let _ = closed_tx.send(true);
            for (_, w) in p.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                let _ = w.send(Err(RpcError::Closed));
            }
        });
        *life.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(reader.abort_handle());
        Ok(Client {
            addr: addr.to_string(),
            peer,
            tx,
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            closed,
            life,
        })
    }

    /// After a call timed out with nothing heard since it was sent: sends a probe
    /// and drops the connection if nothing comes back within `PROBE_TIMEOUT` (a
    /// peer gone without closing, a connection stuck on the way). A peer that is
    /// alive but slow on one request answers the probe, and its connection stays.
    fn probe(&self) {
        let life = &self.life;
        if life.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let c = self.clone();
        tokio::spawn(async move {
            let sent = c.life.now();
            let ping = Frame {
                kind: KIND_PING,
                id: 0,
                service: 0,
                body: Bytes::new(),
            };
            let queued = tokio::time::timeout(PROBE_TIMEOUT, c.tx.send(ping)).await;
            if matches!(queued, Ok(Ok(()))) {
                tokio::time::sleep(PROBE_TIMEOUT).await;
            }
            if c.life.heard.load(Ordering::Relaxed) < sent.max(1) {
                tracing::warn!(addr = %c.addr, "an RPC connection answers nothing, not even a probe; dropping it");
                metrics::counter!("cairn_rpc_dead_connections_total").increment(1);
                if let Some(r) = c
                    .life
                    .reader
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                {
                    r.abort();
                }
                let _ = c.life.closed_tx.send(true);
                for (_, w) in c.pending.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                    let _ = w.send(Err(RpcError::Closed));
                }
            }
            c.life.probing.store(false, Ordering::Release);
        });
    }

    /// The peer's node id, as it proved in the handshake.
    pub fn peer(&self) -> NodeId {
        self.peer
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether the connection has closed (a new one is needed).
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Sends a request to `service` and waits for its answer up to `timeout`.
    pub async fn call(
        &self,
        service: u8,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        if body.len() + FRAME_HEAD > MAX_FRAME {
            return Err(RpcError::Protocol(format!(
                "a request of {} bytes exceeds the frame limit",
                body.len()
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let frame = Frame {
            kind: KIND_REQUEST,
            id,
            service,
            body,
        };
        let started = std::time::Instant::now();
        let sent_at = self.life.now();
        let res = tokio::time::timeout(timeout, async {
            self.tx.send(frame).await.map_err(|_| RpcError::Closed)?;
            rx.await.map_err(|_| RpcError::Closed)?
        })
        .await;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if matches!(res, Ok(Ok(_))) {
            metrics::histogram!("cairn_rpc_call_seconds", "service" => service_label(service))
                .record(started.elapsed().as_secs_f64());
        }
        if res.is_err() && self.life.heard.load(Ordering::Relaxed) <= sent_at {
            self.probe();
        }
        res.map_err(|_| RpcError::Timeout(timeout))?
    }
}

/// Connections to peers by address, made on first use and again after one closes.
/// Connecting to one peer holds up only the calls to that peer.
///
/// A connection is made by a task of its own, which every caller that wants
/// one meanwhile waits on: a caller that stops being polled (a request whose
/// client went quiet, a read that lost a race) can never hold the others up,
/// as one holding a lock across the connect could.
#[derive(Clone)]
pub struct Peers {
    me: Identity,
    connect_timeout: Duration,
    clients: Arc<Mutex<HashMap<String, Slot>>>,
}

/// The connection to one address: made, or being made (its outcome to come).
#[derive(Clone)]
enum Slot {
    Ready(Client),
    Connecting(watch::Receiver<Option<Result<Client, RpcError>>>),
}

impl Peers {
    pub fn new(me: Identity, connect_timeout: Duration) -> Peers {
        Peers {
            me,
            connect_timeout,
            clients: Arc::default(),
        }
    }

    /// A live connection to `addr`.
    pub async fn get(&self, addr: &str) -> Result<Client, RpcError> {
        let mut outcome = {
            let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
            match clients.get(addr) {
                Some(Slot::Ready(c)) if !c.is_closed() => return Ok(c.clone()),
                Some(Slot::Connecting(rx)) => rx.clone(),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    clients.insert(addr.to_string(), Slot::Connecting(rx.clone()));
                    let (me, timeout) = (self.me.clone(), self.connect_timeout);
                    let (all, addr) = (self.clients.clone(), addr.to_string());
                    tokio::spawn(async move {
                        let res = Client::connect(&addr, &me, timeout).await;
                        {
                            let mut clients = all.lock().unwrap_or_else(|e| e.into_inner());
                            match &res {
                                Ok(c) => {
                                    clients.insert(addr, Slot::Ready(c.clone()));
                                }
                                Err(_) => {
                                    clients.remove(&addr);
                                }
                            }
                        }
                        let _ = tx.send(Some(res));
                    });
                    rx
                }
            }
        };
        loop {
            if let Some(res) = outcome.borrow_and_update().clone() {
                return res;
            }
            if outcome.changed().await.is_err() {
                // The connecting task is gone without a word (the runtime
                // shutting down).
                return Err(RpcError::Connect {
                    addr: addr.to_string(),
                    reason: "the connection attempt was abandoned".into(),
                });
            }
        }
    }

    /// Calls `service` of node `node` at `addr`, connecting if needed. The request
    /// is not sent when another node answers there (as the handshake proved): a
    /// node started afresh on a former member's address must never be taken for
    /// that member (it would, say, grant that member's vote in an election).
    pub async fn call_node(
        &self,
        node: NodeId,
        addr: &str,
        service: u8,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        let c = self.get(addr).await?;
        if c.peer() != node {
            return Err(RpcError::WrongNode {
                addr: addr.to_string(),
                expected: node,
                found: c.peer(),
            });
        }
        c.call(service, body, timeout).await
    }

    /// Calls `service` at `addr`, connecting if needed, whichever node answers
    /// there (a join asks a member known only by its address).
    pub async fn call(
        &self,
        addr: &str,
        service: u8,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        let c = self.get(addr).await?;
        c.call(service, body, timeout).await
    }
}

/// The metrics label of a service number (the services are the layers' own).
fn service_label(service: u8) -> &'static str {
    const LABELS: [&str; 32] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
        "17", "18", "19", "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31",
    ];
    LABELS.get(service as usize).copied().unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes never panic the frame decoder, and an encoded frame
        /// decodes to itself.
        #[test]
        fn frames_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                         kind in 1u8..=3, id: u64, service: u8,
                                         body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Frame::decode(Bytes::from(bytes));
            let f = Frame { kind, id, service, body: Bytes::from(body) };
            let enc = f.encode();
            prop_assert_eq!(Frame::decode(enc.slice(4..)).unwrap(), f);
        }
    }
}
