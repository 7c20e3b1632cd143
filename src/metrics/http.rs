//! The operators' HTTP endpoint on `[metrics] listen`: `/metrics` (Prometheus text
//! format), `/healthz` (the process answers) and `/readyz` (listeners accepting, data
//! dir readable, lock backend reachable; 503 with the reason otherwise). HTTP/1.1 by
//! hyper; this module only routes three GET paths and must not serve anything else.
//! What "ready" means is the server's to say, through [`Readiness`].

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
/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether the server should get traffic now: `Err` says why not. The check bounds its
/// own time (a probe must not hang on a lock backend that does not answer).
pub trait Readiness: Send + Sync {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("metrics connection refused: too many open");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, &shared).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(error = %e, "metrics connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn route(req: Request<Incoming>, shared: &Endpoint) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let ready = ready(shared).await.is_ok();
            shared.metrics.set_ready(ready);
            let mut r = text(StatusCode::OK, shared.metrics.render());
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match ready(shared).await {
            Ok(()) => {
                shared.metrics.set_ready(true);
                text(StatusCode::OK, "ready\n".into())
            }
            Err(reason) => {
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

async fn ready(shared: &Endpoint) -> Result<(), String> {
    shared.readiness.check().await
}
