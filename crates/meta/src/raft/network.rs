//! The Raft group's messages over the inter-node RPC (`cairn-net`), and the network
//! of a node without an RPC address (a cluster of one has no one to talk to).
//!
//! Each message is one RPC to a service of its own (`SVC_*`); bodies and answers are
//! a version byte and postcard. Besides openraft's three messages there are two of
//! cairn's: a write forwarded from a follower to the leader, and a follower's
//! question for the leader's read index (linearizable reads on any node).

use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{LogId, Member, NodeId, Raft, Request, Response, TypeConfig};
use cairn_net::{Peers, RpcError};

/// RPC service ids of the metadata group (`cairn-net` dispatches on them).
pub const SVC_APPEND: u8 = 1;
pub const SVC_VOTE: u8 = 2;
pub const SVC_SNAPSHOT: u8 = 3;
/// A follower's write, proposed by the leader.
pub const SVC_WRITE: u8 = 4;
/// The leader's read index, after it confirmed it still leads.
pub const SVC_READ_INDEX: u8 = 5;
/// A node asks to be added to the group ([`JoinRequest`]).
pub const SVC_JOIN: u8 = 6;
/// A node is to leave the group (its id, postcard `u64`).
pub const SVC_LEAVE: u8 = 7;
/// Whether a service id belongs to the metadata group.
pub fn is_meta_service(svc: u8) -> bool {
    (SVC_APPEND..=SVC_LEAVE).contains(&svc)
}

/// A node that asks to be added: who it is and where it is reached.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct JoinRequest {
    pub node_id: NodeId,
    pub member: Member,
}

/// Version of the bodies below.
const BODY_VERSION: u8 = 1;

pub fn encode<T: Serialize>(v: &T) -> Result<Bytes, String> {
    let mut out = vec![BODY_VERSION];
    postcard::to_io(v, &mut out).map_err(|e| format!("encoding a Raft message: {e}"))?;
    Ok(Bytes::from(out))
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    match b.split_first() {
        Some((&BODY_VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|e| format!("decoding a Raft message: {e}"))
        }
        Some((v, _)) => Err(format!(
            "Raft message format {v} is not one this node knows ({BODY_VERSION})"
        )),
        None => Err("empty Raft message".into()),
    }
}

/// Serves one metadata RPC on this node.
pub async fn handle(store: &crate::MetaStore, service: u8, body: Bytes) -> Result<Bytes, String> {
    let raft: &Raft = &store.raft();
    match service {
        SVC_JOIN => {
            let req: JoinRequest = decode(&body)?;
            let res: Result<(), String> = store
                .add_member(req.node_id, req.member)
                .await
                .map_err(|e| e.to_string());
            encode(&res)
        }
        SVC_LEAVE => {
            let id: NodeId = decode(&body)?;
            let res: Result<(), String> = store.remove_member(id).await.map_err(|e| e.to_string());
            encode(&res)
        }
        SVC_APPEND => encode(&raft.append_entries(decode(&body)?).await),
        SVC_VOTE => encode(&raft.vote(decode(&body)?).await),
        SVC_SNAPSHOT => encode(&raft.install_snapshot(decode(&body)?).await),
        SVC_WRITE => {
            let Request::Commands(cmds) = decode(&body)?;
            let res: Result<Response, String> =
                store.apply_forwarded(cmds).await.map_err(|e| e.to_string());
            encode(&res)
        }
        SVC_READ_INDEX => {
            let res: Result<Option<LogId>, String> = match crate::raft::read_index(raft).await {
                Ok(l) => Ok(l),
                Err(e) => Err(e.to_string()),
            };
            encode(&res)
        }
        other => Err(format!("unknown metadata service {other}")),
    }
}

/// Reaches the other members over `cairn-net`; without peers (a node with no RPC
/// address, a cluster of one) it reaches no one.
#[derive(Clone)]
pub struct NetNetwork {
    pub peers: Option<Peers>,
}

/// A connection to one member.
pub struct NetClient {
    peers: Option<Peers>,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for NetNetwork {
    type Network = NetClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        NetClient {
            peers: self.peers.clone(),
            target,
            addr: node.rpc.clone(),
        }
    }
}

impl NetClient {
    async fn send<Req: Serialize, Resp: DeserializeOwned, E>(
        &self,
        svc: u8,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, E>>
    where
        E: std::error::Error + DeserializeOwned,
        Result<Resp, E>: DeserializeOwned,
    {
        let Some(peers) = &self.peers else {
            return Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other("this node has no RPC address: it is a cluster of one"),
            )));
        };
        let body = encode(req)
            .map_err(|e| RPCError::Network(NetworkError::new(&std::io::Error::other(e))))?;
        let answer = peers
            .call_node(self.target, &self.addr, svc, body, option.hard_ttl())
            .await
            .map_err(|e| match e {
                RpcError::Connect { .. }
                | RpcError::Refused { .. }
                | RpcError::WrongNode { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                other => RPCError::Network(NetworkError::new(&other)),
            })?;
        let res: Result<Resp, E> = decode(&answer)
            .map_err(|e| RPCError::Network(NetworkError::new(&std::io::Error::other(e))))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for NetClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.send(SVC_APPEND, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(SVC_SNAPSHOT, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.send(SVC_VOTE, &rpc, &option).await
    }
}

/// The metadata group's RPC services, for a node that serves nothing else (the
/// server composes its own, dispatching with [`is_meta_service`]). The Raft node is
/// looked up at each call: it is replaced when the node joins a cluster.
pub struct RaftService {
    pub store: crate::MetaStore,
}

#[async_trait::async_trait]
impl cairn_net::Service for RaftService {
    async fn call(&self, _peer: NodeId, service: u8, body: Bytes) -> Result<Bytes, String> {
        handle(&self.store, service, body).await
    }
}
