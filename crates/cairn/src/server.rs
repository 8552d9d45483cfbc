//! Process wiring of `cairn serve`: open the data directory, start the admin endpoint,
//! then (once the node can serve) the S3 endpoint; stop gracefully on SIGTERM/Ctrl-C.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use cairn_api_admin::{Admin, ClusterAdmin, Health};
use cairn_api_s3::{Cairn, S3Settings};
use cairn_blocks::BlockStore;
use cairn_cluster::{Blocks, DataSettings};
use cairn_meta::{Command, KeyRecord, LayoutNode, MetaOptions, MetaStore, NodeState};
use cairn_net::{Identity, Peers};
use cairn_types::now_millis;

use crate::config::Config;
use crate::datadir;

/// Largest request header section accepted, as S3 does (8 KiB of it user metadata
/// and signature, with room to spare); beyond it the client gets an S3 error.
const MAX_HEADER_BYTES: usize = 16 << 10;

pub async fn serve(cfg: Config) -> Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .context("metrics buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let health = Health::new("starting: opening the data directory");
    let admin = Admin {
        health: health.clone(),
        metrics,
        cluster: Default::default(),
        token: Default::default(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Ok(v) = std::env::var("CAIRN_UNSAFE_TEST_SKIP_FSYNC") {
        tracing::error!(skip = %v, "CAIRN_UNSAFE_TEST_SKIP_FSYNC is set: acknowledged writes may be lost on a power cut; this is a test hook only");
    }

    // The admin port comes up first so that /health can say why S3 is not there yet.
    let admin_listener = TcpListener::bind(cfg.admin_address)
        .await
        .with_context(|| format!("binding the admin address {}", cfg.admin_address))?;
    let admin_addr = admin_listener.local_addr()?;
    let admin_task = {
        let admin = admin.clone();
        let svc = move |req: Request<Incoming>| {
            let admin = admin.clone();
            async move { admin.handle(req).await }
        };
        tokio::spawn(accept_loop(
            admin_listener,
            svc,
            stop_rx.clone(),
            cfg.shutdown_grace,
        ))
    };

    if let Some(ms) = std::env::var("CAIRN_UNSAFE_TEST_START_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        // Test hook: stretches the start so a test can see /health answer 503.
        tracing::warn!(
            ms,
            "CAIRN_UNSAFE_TEST_START_DELAY_MS is set: delaying the start; this is a test hook only"
        );
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let dir = cfg.data_dir.clone();
    let meta_cache = cfg.meta_cache;
    let d = dir.clone();
    let (blocks, node_id, token) =
        tokio::task::spawn_blocking(move || -> Result<(BlockStore, u64, String)> {
            datadir::prepare(&d)?;
            let node_id = datadir::node_id(&d)?;
            // CAIRN_ADMIN_TOKEN sets it (one token for a whole cluster), else the
            // data directory's.
            let token = match std::env::var("CAIRN_ADMIN_TOKEN") {
                Ok(t) if !t.is_empty() => t,
                _ => datadir::admin_token(&d)?,
            };
            let blocks = BlockStore::open(&d).context("opening the block store")?;
            Ok((blocks, node_id, token))
        })
        .await??;
    let _ = admin.token.set(token);
    // The RPC listener is bound first: its address is this node's in the group.
    let rpc = match (cfg.rpc_address, &cfg.cluster_secret) {
        (Some(addr), Some(secret)) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the RPC address {addr}"))?;
            // The bound address (the port, when 0 was asked for) is the one to advertise.
            let addr = l.local_addr().unwrap_or(addr);
            let me = Identity::new(node_id, secret.as_bytes());
            Some((l, addr, me))
        }
        _ => None,
    };
    // Where the other nodes reach this one: the bound address unless told otherwise.
    let advertised: Option<String> = rpc
        .as_ref()
        .map(|r| cfg.rpc_advertise.clone().unwrap_or_else(|| r.1.to_string()));
    let meta = MetaStore::open_with(
        &dir.join("meta.redb"),
        MetaOptions {
            node_id,
            memory: meta_cache,
            rpc_address: advertised.clone().unwrap_or_default(),
            peers: rpc
                .as_ref()
                .map(|r| Peers::new(r.2.clone(), RPC_CONNECT_TIMEOUT)),
            join: false,
            zone: cfg.zone.clone(),
            snapshot_every: cfg.snapshot_every,
            log_keep: cfg.log_keep,
        },
    )
    .await
    .context("opening the metadata store")?;
    let rpc_addr = rpc.as_ref().map(|r| r.1);
    let data = Blocks::new(
        blocks.clone(),
        &meta,
        meta.peers().cloned(),
        DataSettings {
            recent_pin: cfg.receive_pin,
            health: cfg.health.clone(),
            hedge: cfg.hedge,
            ..DataSettings::default()
        },
    )
    .await;
    let capacity = match cfg.capacity {
        Some(c) => c,
        None => {
            let d = dir.clone();
            tokio::task::spawn_blocking(move || file_system_size(&d)).await??
        }
    };
    let entry = LayoutNode {
        id: node_id,
        zone: cfg.zone.clone(),
        capacity,
        rpc: advertised.clone().unwrap_or_default(),
        state: NodeState::Active,
    };
    let _ = admin.cluster.set(Arc::new(NodeCluster {
        meta: meta.clone(),
        data: data.clone(),
        peers: meta.peers().cloned(),
        rpc: advertised.clone(),
        zone: cfg.zone.clone(),
        entry: entry.clone(),
    }));
    let mover = cairn_cluster::mover::Mover::new(
        data.clone(),
        meta.clone(),
        cairn_cluster::mover::MoverSettings {
            rate: cfg.rebalance_rate,
            interval: cfg.move_interval,
            repair_after: cfg.repair_after,
            repair_interval: cfg.repair_interval,
        },
    );
    let mover_task = tokio::spawn(mover.run(stop_rx.clone()));
    let scrub_task = tokio::spawn(data.scrub().clone().run(
        data.clone(),
        cairn_cluster::scrub::ScrubSettings {
            interval: cfg.scrub_interval,
            rate: cfg.scrub_rate,
        },
        stop_rx.clone(),
    ));
    // The layout learns this node's zone, capacity and address (again, if they
    // changed); without a quorum now, it keeps trying in the background.
    tokio::spawn(keep_in_layout(meta.clone(), entry));
    let rpc_task = rpc.map(|(listener, addr, me)| {
        tracing::info!(rpc = %addr, node = format!("{node_id:016x}"), zone = %cfg.zone, "RPC listener open");
        let svc = Arc::new(NodeService {
            meta: meta.clone(),
            data: data.clone(),
        });
        tokio::spawn(cairn_net::serve(listener, me, svc, stop_rx.clone()))
    });
    let key = ensure_root_key(&cfg, &meta).await?;

    let cairn = Cairn::new(
        meta.clone(),
        data.clone(),
        S3Settings {
            region: cfg.region.clone(),
            block_size: cfg.block_size,
            inline_max: cfg.inline_max,
            base_domain: cfg.base_domain.clone(),
            block_memory: cfg.block_memory,
        },
    );
    let s3 = cairn_api_s3::service(cairn)
        .map_err(|e| anyhow::anyhow!("building the S3 service: {e:?}"))?;
    let ops_task = tokio::spawn(cairn_ops::run(
        meta.clone(),
        blocks.clone(),
        cairn_ops::OpsSettings {
            gc_grace: cfg.gc_grace,
            gc_interval: cfg.gc_interval,
            multipart_expiry: cfg.multipart_expiry,
            // Every node has removed its copy by then: a received block's pin has
            // run out, and a few collection rounds have passed.
            forget_delay: (cfg.receive_pin + cfg.gc_interval * 2).max(cfg.gc_interval * 5),
            ..Default::default()
        },
        stop_rx.clone(),
    ));

    let s3_listener = TcpListener::bind(cfg.s3_address)
        .await
        .with_context(|| format!("binding the S3 address {}", cfg.s3_address))?;
    let s3_addr = s3_listener.local_addr()?;
    health.set_ready();
    print_banner(s3_addr, admin_addr, rpc_addr, &cfg, &key);
    tracing::info!(s3 = %s3_addr, admin = %admin_addr, data_dir = %cfg.data_dir.display(), "cairn is serving");

    let s3_task = {
        let svc = move |req: Request<Incoming>| {
            let s3 = s3.clone();
            async move { Ok::<_, Infallible>(handle_s3(&s3, req).await) }
        };
        tokio::spawn(accept_loop(
            s3_listener,
            svc,
            stop_rx.clone(),
            cfg.shutdown_grace,
        ))
    };

    // Scheduled backups read this node's own S3 endpoint with the root key.
    for job in cfg.backups.clone() {
        let ip = match s3_addr.ip() {
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => "[::1]".to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let url = format!("http://{ip}:{}", s3_addr.port());
        let source = cairn_backup::engine::Endpoint::new(&url, &key.access_key, &key.secret_key)
            .with_settings(Arc::new(MetaBucketSettings(meta.clone())));
        let m = meta.clone();
        tracing::info!(target = %job.target, interval = ?job.interval, "scheduled backups");
        tokio::spawn(job.run(source, Arc::new(move || m.is_leader()), stop_rx.clone()));
    }

    shutdown_signal().await;
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    health.set_unavailable("shutting down");
    let _ = stop_tx.send(true);
    let _ = s3_task.await;
    let _ = admin_task.await;
    if let Some(t) = rpc_task {
        let _ = t.await;
    }
    let _ = ops_task.await;
    // A copy in flight is abandoned: the mover resumes from its saved place.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), mover_task).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), scrub_task).await;
    // So that the next start has little to apply again from the Raft log.
    if let Err(e) = meta.close().await {
        tracing::warn!(error = %e, "final metadata checkpoint failed; the next start applies the log");
    }
    tracing::info!("stopped");
    Ok(())
}

/// The buckets' own settings, for this node's scheduled backups.
struct MetaBucketSettings(MetaStore);

#[async_trait::async_trait]
impl cairn_backup::engine::BucketSettings for MetaBucketSettings {
    async fn classes(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Option<String>>, cairn_backup::BackupError> {
        self.0.read_barrier().await.map_err(|e| {
            cairn_backup::BackupError::Source(format!("the buckets' settings: {e}"))
        })?;
        Ok(self
            .0
            .buckets()
            .into_iter()
            .map(|(name, b)| (name, b.class.map(|c| c.to_string())))
            .collect())
    }
}

/// How long connecting to a peer (with the handshake) may take.
const RPC_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The RPC services this node offers its peers.
struct NodeService {
    meta: MetaStore,
    data: Blocks,
}

#[async_trait::async_trait]
impl cairn_net::Service for NodeService {
    async fn call(
        &self,
        _peer: u64,
        service: u8,
        body: bytes::Bytes,
    ) -> Result<bytes::Bytes, String> {
        if cairn_meta::raft::network::is_meta_service(service) {
            cairn_meta::raft::network::handle(&self.meta, service, body).await
        } else if cairn_cluster::is_block_service(service) {
            self.data.handle(service, body).await
        } else {
            Err(format!("unknown service {service}"))
        }
    }
}

/// The cluster operations of the admin API on this node.
struct NodeCluster {
    meta: MetaStore,
    data: Blocks,
    peers: Option<Peers>,
    /// The RPC address other nodes reach this one at.
    rpc: Option<String>,
    zone: String,
    /// This node's entry in the layout.
    entry: LayoutNode,
}

/// The size of the file system holding `dir`: a node's capacity unless configured.
fn file_system_size(dir: &std::path::Path) -> Result<u64> {
    let st = rustix::fs::statvfs(dir)
        .with_context(|| format!("reading the size of the file system of {}", dir.display()))?;
    Ok((st.f_blocks.saturating_mul(st.f_frsize)).max(1))
}

/// Puts this node's entry in the layout (keeping a drain under way), retrying until
/// the cluster answers.
async fn keep_in_layout(meta: MetaStore, entry: LayoutNode) {
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match register(&meta, &entry).await {
            Ok(()) => return,
            Err(e @ cairn_meta::MetaError::Refused(_)) => {
                tracing::warn!(error = %e, "this node stays out of the layout");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot update this node's layout entry yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}

async fn register(meta: &MetaStore, entry: &LayoutNode) -> Result<(), cairn_meta::MetaError> {
    meta.read_barrier().await?;
    if !meta.is_member(entry.id) {
        // Removed from its cluster: it must not put itself back.
        return Err(cairn_meta::MetaError::Refused(
            "this node is not a member of its cluster (it was removed)".into(),
        ));
    }
    let mut entry = entry.clone();
    if let Some(cur) = meta.layout().node(entry.id) {
        entry.state = cur.state;
    }
    meta.set_layout_node(entry).await
}

/// How long a status call waits to have caught up with the cluster's commits.
const STATUS_BARRIER: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a joining node waits to have caught up with its new cluster.
const JOIN_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(60);

#[async_trait::async_trait]
impl ClusterAdmin for NodeCluster {
    async fn status(&self) -> serde_json::Value {
        // What any node answers includes every change acknowledged before the
        // call (a setting changed through one node shows on the next status from
        // another), unless the cluster cannot confirm it in time: status still
        // answers then, for it is how an operator sees a cluster without quorum,
        // and says its view may be behind.
        let current = matches!(
            tokio::time::timeout(STATUS_BARRIER, self.meta.read_barrier()).await,
            Ok(Ok(()))
        );
        let raft = self.meta.raft();
        let m = raft.metrics().borrow().clone();
        let voters: std::collections::BTreeSet<u64> =
            m.membership_config.membership().voter_ids().collect();
        let members: Vec<serde_json::Value> = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| {
                serde_json::json!({
                    "id": format!("{id:016x}"),
                    "rpc_address": n.rpc,
                    "zone": n.zone,
                    "voter": voters.contains(id),
                })
            })
            .collect();
        let layout = self.meta.layout();
        let reports = futures::future::join_all(layout.nodes.iter().map(|n| {
            tokio::time::timeout(std::time::Duration::from_secs(2), self.data.report_of(n.id))
        }))
        .await;
        let health: std::collections::HashMap<u64, cairn_cluster::health::PeerHealth> = self
            .data
            .health()
            .into_iter()
            .map(|p| (p.node, p))
            .collect();
        let nodes: Vec<serde_json::Value> = layout
            .nodes
            .iter()
            .zip(reports)
            .map(|(n, r)| {
                let mut v = serde_json::json!({
                    "id": format!("{:016x}", n.id),
                    "zone": n.zone,
                    "capacity": n.capacity,
                    "rpc_address": n.rpc,
                    "state": match n.state {
                        NodeState::Active => "active",
                        NodeState::Draining => "draining",
                    },
                    "voter": voters.contains(&n.id),
                    "reachable": matches!(r, Ok(Ok(_))),
                });
                // The failure detector's verdict on the node (this node: up).
                match health.get(&n.id) {
                    Some(h) => {
                        v["health"] = h.health.as_str().into();
                        v["phi"] = ((h.phi * 100.0).round() / 100.0).into();
                        v["silent_ms"] = (h.silent_for.as_millis() as u64).into();
                        if let Some(rtt) = h.rtt {
                            v["rtt_ms"] = ((rtt.as_secs_f64() * 1e5).round() / 100.0).into();
                        }
                    }
                    None => {
                        v["health"] = "up".into();
                        v["phi"] = 0.0.into();
                    }
                }
                if let Ok(Ok(r)) = r {
                    let mv = &r.mover;
                    v["fs_bytes"] = r.fs_bytes.into();
                    v["used_bytes"] = r.used_bytes.into();
                    v["rebalance"] = serde_json::json!({
                        "layout_version": mv.layout_version,
                        "running": mv.running,
                        "full_pass": mv.full,
                        "percent": (f64::from(mv.groups_done) * 100.0 / 256.0).round(),
                        "blocks_checked": mv.blocks_checked,
                        "blocks_copied": mv.blocks_copied,
                        "bytes_copied": mv.bytes_copied,
                        "blocks_removed": mv.blocks_removed,
                        "blocks_left": mv.blocks_left,
                    });
                    // Blocks this node is the first live holder of that its last
                    // full pass left short of copies.
                    v["blocks_at_risk"] = mv.blocks_at_risk.into();
                    v["repair_copies"] = mv.repair_copies.into();
                }
                v
            })
            .collect();
        // Each block is counted by one node (its first live holder); a node that
        // did not answer leaves its share unknown.
        let at_risk: u64 = nodes
            .iter()
            .filter_map(|n| n.get("blocks_at_risk").and_then(|x| x.as_u64()))
            .sum();
        let all_counted = nodes.iter().all(|n| n.get("blocks_at_risk").is_some());
        serde_json::json!({
            "node": format!("{:016x}", m.id),
            "rpc_address": self.rpc,
            "zone": self.zone,
            // This node's wall clock (ms since the epoch): a skewed clock shows
            // against the others' (cairn's correctness does not rest on it).
            "clock_ms": now_millis(),
            "raft_state": format!("{:?}", m.state),
            "leader": m.current_leader.map(|l| format!("{l:016x}")),
            "term": m.current_term,
            "last_log_index": m.last_log_index,
            "applied_index": m.last_applied.map(|l| l.index),
            "snapshot_index": m.snapshot.map(|l| l.index),
            "purged_index": m.purged.map(|l| l.index),
            // False when the cluster could not confirm within two seconds that
            // this node has applied every committed change (no quorum, say):
            // members and layout may then be behind.
            "current": current,
            "members": members,
            "layout": {
                "version": layout.version,
                "replication": layout.replication,
                "default_class": layout.default_class.to_string(),
                "write_quorum": layout.write_quorum,
                "copies": layout.copies(),
                "quorum": layout.quorum(),
            },
            "nodes": nodes,
            "redundancy": {
                "blocks_at_risk": at_risk,
                "complete": all_counted,
            },
        })
    }

    async fn join(&self, member: &str) -> Result<serde_json::Value, (http::StatusCode, String)> {
        use http::StatusCode;
        let (Some(peers), Some(rpc)) = (&self.peers, self.rpc.clone()) else {
            return Err((
                StatusCode::CONFLICT,
                "this node has no RPC address: start it with --rpc-address (and the cluster secret) to join a cluster".into(),
            ));
        };
        // The member must answer (and hold the secret) before this node gives up
        // its own cluster.
        peers.get(member).await.map_err(|e| {
            (
                StatusCode::BAD_GATEWAY,
                format!("cannot join through {member}: {e}"),
            )
        })?;
        let me = self.meta.node_id();
        // A join cut short (the leader died under it, the answer was lost) is
        // taken up again: this node is already in the group of `member`.
        let resuming = {
            let raft = self.meta.raft();
            let m = raft.metrics();
            let m = m.borrow();
            let cfg = m.membership_config.membership();
            cfg.get_node(&me).is_some()
                && cfg
                    .nodes()
                    .any(|(id, n)| *id != me && n.rpc == member.trim())
        };
        if !resuming {
            self.meta
                .reset_for_join()
                .await
                .map_err(|e| (StatusCode::CONFLICT, e.to_string()))?;
        }
        let req = cairn_meta::raft::network::JoinRequest {
            node_id: me,
            member: cairn_meta::raft::Member {
                rpc,
                zone: self.zone.clone(),
            },
        };
        let body = cairn_meta::raft::network::encode(&req)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e))?;
        let answer = peers
            .call(
                member,
                cairn_meta::raft::network::SVC_JOIN,
                body,
                JOIN_CATCH_UP,
            )
            .await
            .map_err(|e| (StatusCode::BAD_GATEWAY, format!("{member}: {e}")))?;
        let res: Result<(), String> =
            cairn_meta::raft::network::decode(&answer).map_err(|e| (StatusCode::BAD_GATEWAY, e))?;
        res.map_err(|e| (StatusCode::CONFLICT, e))?;
        // Serve only once this node knows the cluster and has caught up.
        let raft = self.meta.raft();
        raft.wait(Some(JOIN_CATCH_UP))
            .metrics(
                |m| {
                    m.current_leader.is_some()
                        && m.membership_config.membership().get_node(&me).is_some()
                },
                "joined",
            )
            .await
            .map_err(|e| {
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("waiting to catch up: {e}"),
                )
            })?;
        self.meta.read_barrier().await.map_err(|e| {
            (
                StatusCode::GATEWAY_TIMEOUT,
                format!("waiting to catch up: {e}"),
            )
        })?;
        register(&self.meta, &self.entry).await.map_err(|e| {
            (
                StatusCode::GATEWAY_TIMEOUT,
                format!("adding this node to the layout: {e}"),
            )
        })?;
        tracing::info!(through = %member, "this node joined a cluster");
        Ok(self.status().await)
    }

    async fn remove(
        &self,
        node: &str,
        force: bool,
    ) -> Result<serde_json::Value, (http::StatusCode, String)> {
        self.remove_node(node, force).await
    }

    async fn set_replication(
        &self,
        replication: u8,
        write_quorum: u8,
    ) -> Result<serde_json::Value, (http::StatusCode, String)> {
        use http::StatusCode;
        let res = self
            .meta
            .apply(cairn_meta::Command::SetReplication {
                replication,
                write_quorum,
            })
            .await;
        match res {
            Ok(_) => {}
            Err(cairn_meta::MetaError::Refused(msg)) => return Err((StatusCode::BAD_REQUEST, msg)),
            Err(e) => return Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        }
        let layout = self.meta.layout();
        tracing::info!(
            replication,
            write_quorum,
            version = layout.version,
            "replication changed; blocks are copied or trimmed to it in the background"
        );
        Ok(serde_json::json!({
            "replication": layout.replication,
            "write_quorum": layout.write_quorum,
            "copies": layout.copies(),
            "quorum": layout.quorum(),
            "layout_version": layout.version,
        }))
    }

    async fn export_snapshot(
        &self,
    ) -> Result<(tokio::fs::File, u64, serde_json::Value), (http::StatusCode, String)> {
        let unavailable = |e: String| (http::StatusCode::SERVICE_UNAVAILABLE, e);
        let (path, info) = self
            .meta
            .export_snapshot()
            .await
            .map_err(|e| unavailable(format!("cannot write a metadata snapshot: {e}")))?;
        let opened = tokio::fs::File::open(&path).await;
        // Unlinked at once: the open file is all that is left, gone once read.
        let _ = tokio::fs::remove_file(&path).await;
        let file = opened.map_err(|e| unavailable(format!("reading the snapshot: {e}")))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| unavailable(format!("reading the snapshot: {e}")))?
            .len();
        tracing::info!(last_log = ?info.last_log_index, bytes = len, "metadata snapshot exported");
        Ok((
            file,
            len,
            serde_json::json!({
                "last_log_index": info.last_log_index,
                "last_log_term": info.last_log_term,
                "members": info.members.iter().map(|m| format!("{m:016x}")).collect::<Vec<_>>(),
            }),
        ))
    }

    async fn buckets(&self) -> Result<serde_json::Value, (http::StatusCode, String)> {
        self.meta.read_barrier().await.map_err(|e| {
            (
                http::StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot confirm the cluster's latest state: {e}"),
            )
        })?;
        let buckets: Vec<serde_json::Value> = self
            .meta
            .buckets()
            .into_iter()
            .map(|(name, b)| {
                serde_json::json!({
                    "name": name,
                    "created": b.created,
                    "class": b.class.map(|c| c.to_string()),
                })
            })
            .collect();
        Ok(serde_json::json!({
            "default_class": self.meta.layout().default_class.to_string(),
            "buckets": buckets,
        }))
    }

    async fn set_class(
        &self,
        bucket: Option<&str>,
        class: &str,
    ) -> Result<serde_json::Value, (http::StatusCode, String)> {
        use http::StatusCode;
        let parsed = match (bucket, class.trim()) {
            (Some(_), "default") => None,
            _ => Some(
                class
                    .parse::<cairn_types::StorageClass>()
                    .map_err(|e| (StatusCode::BAD_REQUEST, e))?,
            ),
        };
        let cmd = match (bucket, parsed) {
            (Some(b), c) => cairn_meta::Command::SetBucketClass {
                bucket: b.to_string(),
                class: c,
            },
            (None, Some(c)) => cairn_meta::Command::SetDefaultClass { class: c },
            (None, None) => return Err((StatusCode::BAD_REQUEST, "no class given".into())),
        };
        match self.meta.apply(cmd).await {
            Ok(_) => {}
            Err(cairn_meta::MetaError::Refused(msg)) => return Err((StatusCode::BAD_REQUEST, msg)),
            Err(cairn_meta::MetaError::NoSuchBucket) => {
                return Err((
                    StatusCode::NOT_FOUND,
                    format!("no bucket '{}'", bucket.unwrap_or_default()),
                ));
            }
            Err(e) => return Err((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        }
        let default = self.meta.layout().default_class;
        tracing::info!(
            bucket,
            class,
            "storage class set; new objects are written in it"
        );
        Ok(match bucket {
            Some(b) => serde_json::json!({
                "bucket": b,
                "class": parsed.map(|c| c.to_string()).unwrap_or_else(|| "default".into()),
                "effective": parsed.unwrap_or(default).to_string(),
            }),
            None => serde_json::json!({ "default_class": default.to_string() }),
        })
    }

    async fn scrub(&self, command: &str) -> Result<serde_json::Value, (http::StatusCode, String)> {
        use cairn_cluster::scrub::ScrubCommand;
        let cmd = match command {
            "status" => ScrubCommand::Status,
            "start" => ScrubCommand::Start,
            "pause" => ScrubCommand::Pause,
            other => {
                return Err((
                    http::StatusCode::NOT_FOUND,
                    format!("no scrub command '{other}' (status, start, pause)"),
                ));
            }
        };
        if cmd != ScrubCommand::Status {
            tracing::info!(command, "scrub command for every node");
        }
        let nodes: Vec<serde_json::Value> = self
            .data
            .scrub_all(cmd)
            .await
            .into_iter()
            .map(|(id, res)| match res {
                Ok(st) => {
                    let mut v = serde_json::to_value(&st).unwrap_or_default();
                    v["node"] = format!("{id:016x}").into();
                    v["percent"] =
                        ((f64::from(st.groups_done) * 1000.0 / 256.0).round() / 10.0).into();
                    v
                }
                Err(e) => serde_json::json!({ "node": format!("{id:016x}"), "error": e }),
            })
            .collect();
        Ok(serde_json::json!({ "nodes": nodes }))
    }
}

impl NodeCluster {
    async fn remove_node(
        &self,
        node: &str,
        force: bool,
    ) -> Result<serde_json::Value, (http::StatusCode, String)> {
        use http::StatusCode;
        let id = u64::from_str_radix(node.trim(), 16).map_err(|_| {
            (
                StatusCode::BAD_REQUEST,
                format!(
                    "'{node}' is not a node id (16 hex digits, as `cairn cluster status` shows)"
                ),
            )
        })?;
        let unavailable =
            |e: cairn_meta::MetaError| (StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        self.meta.read_barrier().await.map_err(unavailable)?;
        let layout = self.meta.layout();
        let member = self.meta.is_member(id);
        let Some(entry) = layout.node(id).cloned().or_else(|| {
            member.then(|| LayoutNode {
                id,
                zone: String::new(),
                capacity: 0,
                rpc: String::new(),
                state: NodeState::Draining,
            })
        }) else {
            return Err((
                StatusCode::NOT_FOUND,
                format!("no node {id:016x} in the cluster"),
            ));
        };
        let others = layout
            .nodes
            .iter()
            .filter(|n| n.id != id && n.state == NodeState::Active && n.capacity > 0)
            .count();
        if others == 0 {
            return Err((
                StatusCode::CONFLICT,
                "this is the last node that holds data: add another before removing it".into(),
            ));
        }
        if force || layout.node(id).is_none() {
            self.meta
                .remove_member(id)
                .await
                .map_err(|e| (StatusCode::CONFLICT, e.to_string()))?;
            tracing::warn!(
                node = format!("{id:016x}"),
                "node removed without draining; its blocks are copied again from the other copies"
            );
            return Ok(serde_json::json!({"node": format!("{id:016x}"), "state": "removed"}));
        }
        let mut entry = entry;
        entry.state = NodeState::Draining;
        self.meta
            .set_layout_node(entry)
            .await
            .map_err(|e| (StatusCode::CONFLICT, e.to_string()))?;
        tracing::info!(
            node = format!("{id:016x}"),
            "node draining: its blocks move to their new places, then it leaves"
        );
        Ok(serde_json::json!({"node": format!("{id:016x}"), "state": "draining"}))
    }
}

/// What the banner prints for the key: the secret only when it was just generated.
struct ShownKey {
    access_key: String,
    new_secret: Option<String>,
    /// The secret, for this node's own scheduled backups; never printed.
    secret_key: String,
}

fn print_banner(
    s3: SocketAddr,
    admin: SocketAddr,
    rpc: Option<SocketAddr>,
    cfg: &Config,
    key: &ShownKey,
) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "cairn {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "S3 endpoint:    http://{s3}");
    let _ = writeln!(out, "admin endpoint: http://{admin}");
    if let Some(rpc) = rpc {
        let _ = writeln!(out, "RPC address:    {rpc} (zone {})", cfg.zone);
    }
    let _ = writeln!(out, "region:         {}", cfg.region);
    let _ = writeln!(out, "data directory: {}", cfg.data_dir.display());
    let _ = writeln!(out, "access key id:  {}", key.access_key);
    if let Some(secret) = &key.new_secret {
        let _ = writeln!(out, "secret key:     {secret}");
        let _ = writeln!(
            out,
            "(generated now and shown once; also stored in {} with mode 0600)",
            cfg.data_dir.join("credentials").display()
        );
    }
    let _ = writeln!(out, "ready");
    let _ = out.flush();
}

/// Makes sure the root key exists: the pair from CAIRN_ACCESS_KEY / CAIRN_SECRET_KEY if
/// set, else the one stored in `<data-dir>/credentials`, else a newly generated one.
async fn ensure_root_key(cfg: &Config, meta: &MetaStore) -> Result<ShownKey> {
    let env_ak = std::env::var("CAIRN_ACCESS_KEY")
        .ok()
        .filter(|s| !s.is_empty());
    let env_sk = std::env::var("CAIRN_SECRET_KEY")
        .ok()
        .filter(|s| !s.is_empty());
    let (pair, new_secret) = match (env_ak, env_sk) {
        (Some(access_key), Some(secret_key)) => (
            datadir::KeyPair {
                access_key,
                secret_key,
            },
            false,
        ),
        (Some(_), None) | (None, Some(_)) => {
            anyhow::bail!("set both CAIRN_ACCESS_KEY and CAIRN_SECRET_KEY, or neither")
        }
        (None, None) => {
            let dir = cfg.data_dir.clone();
            match tokio::task::spawn_blocking(move || datadir::read_credentials(&dir)).await?? {
                Some(p) => (p, false),
                None => {
                    let p = datadir::generate_key_pair();
                    let dir = cfg.data_dir.clone();
                    let (ak, sk) = (p.access_key.clone(), p.secret_key.clone());
                    tokio::task::spawn_blocking(move || {
                        datadir::write_credentials(
                            &dir,
                            &datadir::KeyPair {
                                access_key: ak,
                                secret_key: sk,
                            },
                        )
                    })
                    .await??;
                    (p, true)
                }
            }
        }
    };
    if pair.access_key.len() < 3 || pair.secret_key.len() < 8 {
        anyhow::bail!(
            "the access key must have at least 3 characters and the secret key at least 8"
        );
    }
    let existing = meta.key(&pair.access_key);
    if existing
        .as_ref()
        .is_none_or(|k| k.secret != pair.secret_key || !k.root)
    {
        let record = KeyRecord {
            secret: pair.secret_key.clone(),
            root: true,
            created: existing.map(|k| k.created).unwrap_or_else(now_millis),
        };
        let cmd = Command::PutKey {
            access_key: pair.access_key.clone(),
            record: record.clone(),
        };
        if meta.peers().is_none() {
            meta.apply(cmd).await?;
        } else {
            // A node of a cluster started again without a quorum (or before it
            // has applied the key it already holds) serves anyway; the key is
            // seen to in the background.
            match tokio::time::timeout(ROOT_KEY_WAIT, meta.apply(cmd.clone())).await {
                Ok(Ok(_)) => {}
                Ok(Err(cairn_meta::MetaError::Unavailable)) | Err(_) => {
                    tracing::warn!(
                        "the cluster cannot take the root key now; retrying in the background"
                    );
                    tokio::spawn(put_root_key_later(
                        meta.clone(),
                        pair.access_key.clone(),
                        record,
                    ));
                }
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }
    Ok(ShownKey {
        new_secret: new_secret.then(|| pair.secret_key.clone()),
        access_key: pair.access_key,
        secret_key: pair.secret_key,
    })
}

/// How long a node of a cluster waits at start for its root key to be put
/// before it serves and retries in the background.
const ROOT_KEY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Puts the root key once the cluster can take it, unless it is there by then.
async fn put_root_key_later(meta: MetaStore, access_key: String, record: KeyRecord) {
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
        if meta.read_barrier().await.is_ok()
            && meta
                .key(&access_key)
                .is_some_and(|k| k.secret == record.secret && k.root)
        {
            return;
        }
        let cmd = Command::PutKey {
            access_key: access_key.clone(),
            record: record.clone(),
        };
        match tokio::time::timeout(ROOT_KEY_WAIT, meta.apply(cmd)).await {
            Ok(Ok(_)) => {
                tracing::info!("root key in place");
                return;
            }
            Ok(Err(cairn_meta::MetaError::Unavailable)) | Err(_) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the root key could not be put in place");
                return;
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops cairn");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Accepts connections until `stop`, then lets open ones finish for up to `grace`.
async fn accept_loop<S, F, RB>(
    listener: TcpListener,
    svc: S,
    mut stop: watch::Receiver<bool>,
    grace: std::time::Duration,
) where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<RB>, Infallible>> + Send + 'static,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Small responses must not wait for Nagle's algorithm.
                let _ = stream.set_nodelay(true);
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.max_headers(256).keep_alive(true);
                let conn = builder.serve_connection(TokioIo::new(stream), service_fn(svc.clone()));
                let fut = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = fut.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "requests still running after the shutdown grace period; closing them");
        }
    }
}

fn request_id() -> String {
    format!("{:016X}", rand::random::<u64>())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn xml_error(status: StatusCode, code: &str, message: &str, id: &str) -> Response<s3s::Body> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{}</Message><RequestId>{id}</RequestId></Error>",
        xml_escape(message)
    );
    let mut r = Response::new(s3s::Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/xml"),
    );
    r
}

/// One S3 request: a request id in a tracing span and in the response (header and error
/// body), a log line, and metrics.
async fn handle_s3(s3: &s3s::service::S3Service, req: Request<Incoming>) -> Response<s3s::Body> {
    let id = request_id();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let span = tracing::info_span!("s3", request_id = %id, %method, %path);
    let start = Instant::now();
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    // `Expect: 100-continue` with an empty body gets no "100 Continue" (RFC 9110 allows
    // that, and hyper does so); some clients (the AWS CLI's botocore) then misread the
    // next response on the same connection. Closing that connection after the answer
    // keeps them working.
    let close_after = req
        .headers()
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        && req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
    let mut resp = if header_bytes > MAX_HEADER_BYTES {
        xml_error(
            StatusCode::BAD_REQUEST,
            "RequestHeaderSectionTooLarge",
            &format!(
                "Your request header section exceeds the maximum allowed size ({MAX_HEADER_BYTES} bytes)."
            ),
            &id,
        )
    } else {
        match s3
            .call(req.map(s3s::Body::from))
            .instrument(span.clone())
            .await
        {
            Ok(r) => r,
            Err(e) => {
                span.in_scope(|| tracing::error!(error = ?e, "request failed inside the S3 layer"));
                xml_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                    &id,
                )
            }
        }
    };
    let status = resp.status();
    if status.is_client_error() || status.is_server_error() {
        add_request_id_to_error(&mut resp, &id);
    }
    if status == StatusCode::NOT_MODIFIED {
        *resp.body_mut() = s3s::Body::empty();
        resp.headers_mut().remove(http::header::CONTENT_TYPE);
        resp.headers_mut().remove(http::header::CONTENT_LENGTH);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-amz-request-id", v);
    }
    if close_after {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    let elapsed = start.elapsed();
    span.in_scope(|| {
        if status.is_server_error() {
            tracing::warn!(
                status = status.as_u16(),
                ms = elapsed.as_secs_f64() * 1000.0,
                "request"
            );
        } else {
            tracing::info!(
                status = status.as_u16(),
                ms = elapsed.as_secs_f64() * 1000.0,
                "request"
            );
        }
    });
    let m = method.as_str().to_string();
    metrics::counter!("cairn_s3_requests_total", "method" => m.clone(), "status" => status.as_u16().to_string())
        .increment(1);
    metrics::histogram!("cairn_s3_request_duration_seconds", "method" => m)
        .record(elapsed.as_secs_f64());
    resp
}

/// Puts `<RequestId>` into an S3 XML error body that lacks it.
fn add_request_id_to_error(resp: &mut Response<s3s::Body>, id: &str) {
    let Some(bytes) = resp.body().bytes() else {
        return;
    };
    if bytes.len() > 64 << 10 {
        return;
    }
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return;
    };
    if text.contains("<RequestId>") || !text.contains("</Error>") {
        return;
    }
    let patched = text.replacen(
        "</Error>",
        &format!("<RequestId>{id}</RequestId></Error>"),
        1,
    );
    let len = patched.len();
    *resp.body_mut() = s3s::Body::from(patched);
    if let Ok(v) = HeaderValue::from_str(&len.to_string()) {
        resp.headers_mut().insert(http::header::CONTENT_LENGTH, v);
    }
}
