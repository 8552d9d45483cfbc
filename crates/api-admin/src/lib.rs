//! The admin endpoint: `GET /health`, `GET /metrics` (Prometheus text), and the
//! cluster's API: `GET /v1/cluster/status`, `POST /v1/cluster/join`,
//! `POST /v1/cluster/remove`, `POST /v1/cluster/replication`, `POST
//! /v1/cluster/class` and `POST /v1/cluster/bucket-class` (storage classes), and the scrub of
//! every node: `GET /v1/cluster/scrub`, `POST /v1/cluster/scrub/start`,
//! `POST /v1/cluster/scrub/pause`.
//!
//! `/health` answers 200 `ok` once the node serves S3, and 503 with the reason while
//! it starts or shuts down. What changes the cluster needs the admin token
//! (`Authorization: Bearer TOKEN`). Any other path is a 404.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;

/// Whether the node can serve, and if not, why.
#[derive(Clone)]
pub struct Health {
    state: Arc<RwLock<Result<(), String>>>,
}

impl Health {
    pub fn new(initial_reason: &str) -> Self {
        Health {
            state: Arc::new(RwLock::new(Err(initial_reason.to_string()))),
        }
    }

    pub fn set_ready(&self) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Ok(());
    }

    pub fn set_unavailable(&self, reason: &str) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Err(reason.to_string());
    }

    pub fn get(&self) -> Result<(), String> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What the admin API asks of the cluster (implemented by the server).
#[async_trait::async_trait]
pub trait ClusterAdmin: Send + Sync {
    /// This node's view of the cluster, as JSON.
    async fn status(&self) -> serde_json::Value;
    /// Makes this node leave its own cluster of one and join the one `member`
    /// (an RPC address) belongs to.
    async fn join(&self, member: &str) -> Result<serde_json::Value, (StatusCode, String)>;
    /// Removes a node (id in hex): drains it (its blocks move to their new places,
    /// then it leaves), or with `force` takes it out at once (a dead node; its
    /// blocks are copied again from the other copies).
    async fn remove(
        &self,
        node: &str,
        force: bool,
    ) -> Result<serde_json::Value, (StatusCode, String)>;
    /// Sets the replication factor and the write quorum (0: a majority of the
    /// copies); blocks are copied or trimmed to the new count in the background.
    async fn set_replication(
        &self,
        replication: u8,
        write_quorum: u8,
    ) -> Result<serde_json::Value, (StatusCode, String)>;
    /// Sets the storage class of new objects: of `bucket`'s (`default`: back to
    /// the cluster's), or with no bucket the cluster's default.
    async fn set_class(
        &self,
        bucket: Option<&str>,
        class: &str,
    ) -> Result<serde_json::Value, (StatusCode, String)>;
    /// Every bucket with its own settings (its storage class, `null` for the
    /// cluster's default), and the default; as of every change acknowledged
    /// before the call.
    async fn buckets(&self) -> Result<serde_json::Value, (StatusCode, String)>;
    /// The whole metadata state as a snapshot file, as of every write
    /// acknowledged before the call: the file, open and already unlinked (it
    /// goes once read), its length, and what it holds (JSON).
    async fn export_snapshot(
        &self,
    ) -> Result<(tokio::fs::File, u64, serde_json::Value), (StatusCode, String)>;
    /// Asks every node's scrub for its status, or to `start` (a pass now, or go
    /// on with a paused one) or `pause`; answers each node's scrub status.
    async fn scrub(&self, command: &str) -> Result<serde_json::Value, (StatusCode, String)>;
}

#[derive(Clone)]
pub struct Admin {
    pub health: Health,
    pub metrics: PrometheusHandle,
    /// Set once the node's metadata is open.
    pub cluster: Arc<OnceLock<Arc<dyn ClusterAdmin>>>,
    /// The admin token; set at start.
    pub token: Arc<OnceLock<String>>,
}

/// Bodies of admin requests are small JSON documents.
const MAX_BODY: usize = 64 << 10;

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    text(status, format!("{v}\n"), "application/json")
}

fn error_json(status: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": msg }))
}

/// Compares in time independent of where the strings differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// The body of an admin response: whole, or streamed from a file.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

fn boxed(r: Response<Full<Bytes>>) -> Response<Body> {
    use http_body_util::BodyExt;
    r.map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

/// Bytes read from a snapshot file per frame of the response.
const SNAPSHOT_FRAME: usize = 1 << 20;

impl Admin {
    pub async fn handle<B>(&self, req: Request<B>) -> Result<Response<Body>, Infallible>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if req.method() == Method::GET && req.uri().path() == "/v1/cluster/snapshot" {
            return Ok(self.snapshot(&req).await);
        }
        Ok(boxed(self.handle_whole(req).await))
    }

    /// `GET /v1/cluster/snapshot`: the metadata state, streamed (memory stays
    /// at one frame whatever its size), with what it holds in headers.
    async fn snapshot<B>(&self, req: &Request<B>) -> Response<Body> {
        use futures::StreamExt;
        use http_body_util::BodyExt;
        use tokio::io::AsyncReadExt;
        let Some(cluster) = self.cluster.get().cloned() else {
            return boxed(error_json(
                StatusCode::SERVICE_UNAVAILABLE,
                "the node is starting",
            ));
        };
        if let Err(refused) = self.authorized(req) {
            return boxed(refused);
        }
        let (file, len, info) = match cluster.export_snapshot().await {
            Ok(x) => x,
            Err((status, msg)) => return boxed(error_json(status, &msg)),
        };
        let frames = futures::stream::unfold(Some(file), |file| async move {
            let mut file = file?;
            let mut buf = vec![0u8; SNAPSHOT_FRAME];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(http_body::Frame::data(Bytes::from(buf))), Some(file)))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
        let body = http_body_util::StreamBody::new(StreamExt::boxed(frames));
        let mut r = Response::new(body.boxed_unsync());
        let h = r.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
        if let Ok(v) = http::HeaderValue::from_str(&info.to_string()) {
            h.insert("x-cairn-snapshot", v);
        }
        r
    }

    async fn handle_whole<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if req.uri().path().starts_with("/v1/cluster/") {
            return self.cluster_api(req).await;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n",
                "text/plain",
            );
        }
        match req.uri().path() {
            "/health" => match self.health.get() {
                Ok(()) => text(StatusCode::OK, "ok\n", "text/plain"),
                Err(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{reason}\n"),
                    "text/plain",
                ),
            },
            "/metrics" => text(
                StatusCode::OK,
                self.metrics.render(),
                "text/plain; version=0.0.4",
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
        }
    }

    /// Refuses a request without the admin token.
    #[allow(clippy::result_large_err)]
    fn authorized<B>(&self, req: &Request<B>) -> Result<(), Response<Full<Bytes>>> {
        let given = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if self.token.get().is_some_and(|t| same_secret(t, given)) {
            return Ok(());
        }
        tracing::warn!("admin request refused: missing or wrong admin token");
        Err(error_json(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer TOKEN)",
        ))
    }

    async fn cluster_api<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use http_body_util::BodyExt;
        let Some(cluster) = self.cluster.get().cloned() else {
            return error_json(StatusCode::SERVICE_UNAVAILABLE, "the node is starting");
        };
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        match (method, path.as_str()) {
            (Method::GET, "/v1/cluster/status") => json(StatusCode::OK, &cluster.status().await),
            (Method::GET, "/v1/cluster/scrub") => match cluster.scrub("status").await {
                Ok(v) => json(StatusCode::OK, &v),
                Err((status, msg)) => error_json(status, &msg),
            },
            (Method::GET, "/v1/cluster/buckets") => {
                if let Err(refused) = self.authorized(&req) {
                    return refused;
                }
                match cluster.buckets().await {
                    Ok(v) => json(StatusCode::OK, &v),
                    Err((status, msg)) => error_json(status, &msg),
                }
            }
            (
                Method::POST,
                p @ ("/v1/cluster/join"
                | "/v1/cluster/remove"
                | "/v1/cluster/replication"
                | "/v1/cluster/class"
                | "/v1/cluster/bucket-class"
                | "/v1/cluster/scrub/start"
                | "/v1/cluster/scrub/pause"),
            ) => {
                if let Err(refused) = self.authorized(&req) {
                    return refused;
                }
                let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY)
                    .collect()
                    .await
                {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return error_json(StatusCode::BAD_REQUEST, &format!("body: {e}")),
                };
                let doc = serde_json::from_slice::<serde_json::Value>(&body).ok();
                let field = |name: &str| {
                    doc.as_ref()
                        .and_then(|v| v.get(name))
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                };
                let small = |name: &str| {
                    doc.as_ref()
                        .and_then(|v| v.get(name))
                        .and_then(|m| m.as_u64())
                        .and_then(|n| u8::try_from(n).ok())
                };
                let res = if let Some(cmd) = p.strip_prefix("/v1/cluster/scrub/") {
                    cluster.scrub(cmd).await
                } else if p == "/v1/cluster/replication" {
                    let wq = doc.as_ref().and_then(|v| v.get("write_quorum"));
                    match (small("replication"), wq.map(|_| small("write_quorum"))) {
                        (Some(r), None) => cluster.set_replication(r, 0).await,
                        (Some(r), Some(Some(w))) => cluster.set_replication(r, w).await,
                        _ => {
                            return error_json(
                                StatusCode::BAD_REQUEST,
                                "the body must be JSON: {\"replication\": N, \"write_quorum\": W} \
                                 (numbers up to 255; write_quorum optional, 0 for a majority)",
                            );
                        }
                    }
                } else if p == "/v1/cluster/class" || p == "/v1/cluster/bucket-class" {
                    let bucket = field("bucket");
                    match (field("class"), p == "/v1/cluster/bucket-class", bucket) {
                        (Some(c), false, _) => cluster.set_class(None, &c).await,
                        (Some(c), true, Some(b)) => cluster.set_class(Some(&b), &c).await,
                        _ => {
                            return error_json(
                                StatusCode::BAD_REQUEST,
                                "the body must be JSON: {\"class\": \"EC:3+2\"} (or \"replicated\"), \
                                 with \"bucket\": \"NAME\" for a bucket (whose class may also be \"default\")",
                            );
                        }
                    }
                } else if p == "/v1/cluster/join" {
                    let Some(member) = field("member") else {
                        return error_json(
                            StatusCode::BAD_REQUEST,
                            "the body must be JSON: {\"member\": \"HOST:PORT\"}",
                        );
                    };
                    cluster.join(&member).await
                } else {
                    let Some(node) = field("node") else {
                        return error_json(
                            StatusCode::BAD_REQUEST,
                            "the body must be JSON: {\"node\": \"NODE ID\", \"force\": false}",
                        );
                    };
                    let force = doc
                        .as_ref()
                        .and_then(|v| v.get("force"))
                        .and_then(|f| f.as_bool())
                        .unwrap_or(false);
                    cluster.remove(&node, force).await
                };
                match res {
                    Ok(v) => json(StatusCode::OK, &v),
                    Err((status, msg)) => error_json(status, &msg),
                }
            }
            _ => error_json(StatusCode::NOT_FOUND, "no such cluster API"),
        }
    }
}
