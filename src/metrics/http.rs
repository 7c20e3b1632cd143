//! The operators' HTTP endpoint on `[metrics] listen`: `/metrics` (Prometheus text
//! format), `/healthz` (the process answers) and `/readyz` (listeners accepting, data
//! dir readable, lock backend reachable; 503 with the reason otherwise). HTTP/1.1 by
//! hyper; this module only routes three GET paths and must not serve anything else.
//! What "ready" means is the server's to say, through [`Readiness`]. A few
//! connections are held back for the probes: when scrapers or a flood hold all the
//! others, `/healthz` and `/readyz` are still answered.

use super::Metrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Concurrent scrape connections; scrapers and probes need a handful, and the bound
/// keeps a flood on this port from costing more than that.
const MAX_CONNECTIONS: usize = 64;
/// Connections taken only when the others are all in use; they serve `/healthz` and
/// `/readyz` only, one request each, with a short header timeout, so a flood that
/// reaches them too holds each for at most `PROBE_HEADER_TIMEOUT`.
const PROBE_RESERVE: usize = 8;
/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const PROBE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether the server should get traffic now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    Yes,
    /// Serving, though a part is failing (which): taking this server out of service
    /// would not help its clients.
    Degraded(String),
    /// Not serving: why.
    No(String),
}

/// What "ready" means is the server's to say. The check bounds its own time (a probe
/// must not hang on a lock backend that does not answer) and its cost (probes and
/// scrapes come at any rate).
pub trait Readiness: Send + Sync {
    fn check(&self) -> Pin<Box<dyn Future<Output = Ready> + Send + '_>>;
}

/// What the endpoint reads: the registry, and the server's readiness.
struct Endpoint {
    metrics: Arc<Metrics>,
    readiness: Arc<dyn Readiness>,
}

/// Serves until `cancel`; connections in progress finish on their own.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<dyn Readiness>,
    cancel: CancellationToken,
) {
    let shared = Arc::new(Endpoint { metrics, readiness });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let reserve = Arc::new(Semaphore::new(PROBE_RESERVE));
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(listener = "metrics", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (permit, probes_only) = match permits.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            Err(_) => match reserve.clone().try_acquire_owned() {
                Ok(p) => (p, true),
                Err(_) => {
                    debug!("metrics connection refused: too many open");
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, &shared, probes_only).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new());
            if probes_only {
                builder
                    .header_read_timeout(PROBE_HEADER_TIMEOUT)
                    .keep_alive(false);
            } else {
                builder.header_read_timeout(HEADER_TIMEOUT);
            }
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(error = %e, "metrics connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn route(
    req: Request<Incoming>,
    shared: &Endpoint,
    probes_only: bool,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" if probes_only => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy: too many connections\n".into(),
        ),
        "/metrics" => {
            let ready = !matches!(ready(shared).await, Ready::No(_));
            shared.metrics.set_ready(ready);
            let mut r = text(StatusCode::OK, shared.metrics.render());
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match ready(shared).await {
            Ready::Yes => {
                shared.metrics.set_ready(true);
                text(StatusCode::OK, "ready\n".into())
            }
            Ready::Degraded(what) => {
                shared.metrics.set_ready(true);
                text(StatusCode::OK, format!("ready, degraded: {what}\n"))
            }
            Ready::No(reason) => {
                shared.metrics.set_ready(false);
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                )
            }
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn ready(shared: &Endpoint) -> Ready {
    shared.readiness.check().await
}
