//! The admin endpoint: `GET /health` and `GET /metrics` (Prometheus text).
//!
//! `/health` answers 200 `ok` once the node serves S3, and 503 with the reason while
//! it starts or shuts down. Nothing else is served; any other path is a 404.

use std::convert::Infallible;
use std::sync::{Arc, RwLock};

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

#[derive(Clone)]
pub struct Admin {
    pub health: Health,
    pub metrics: PrometheusHandle,
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

impl Admin {
    pub async fn handle<B>(&self, req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Ok(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n",
                "text/plain",
            ));
        }
        Ok(match req.uri().path() {
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
        })
    }
}
