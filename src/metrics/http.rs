//! The operators' HTTP endpoint on `[metrics] listen`: `/metrics` (Prometheus text
//! format), `/healthz` (the process answers) and `/readyz` (listeners accepting, data
//! dir readable, lock backend reachable; 503 with the reason otherwise). HTTP/1.1 by
//! hyper; this module only routes three GET paths and must not serve anything else.

use crate::server::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
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
/// The whole readiness check (lock backend round trip included) gets this long.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves until `cancel`; connections in progress finish on their own.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
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

async fn route(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let ready = readiness(shared).await.is_ok();
            shared.metrics.ready.set(i64::from(ready));
            let mut r = text(StatusCode::OK, shared.metrics.render());
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match readiness(shared).await {
            Ok(()) => {
                shared.metrics.ready.set(1);
                text(StatusCode::OK, "ready\n".into())
            }
            Err(reason) => {
                shared.metrics.ready.set(0);
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

/// Why the server should not get traffic now, if it should not.
async fn readiness(shared: &Shared) -> Result<(), String> {
    if shared.shutdown.is_cancelled() {
        return Err("shutting down".into());
    }
    if !shared.accepting.load(Ordering::Acquire) {
        return Err("listeners not accepting yet".into());
    }
    let directory = shared.directory.clone();
    let stores = tokio::task::spawn_blocking(move || directory.list_domains());
    match tokio::time::timeout(READY_TIMEOUT, stores).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => return Err(format!("data dir unusable: {e}")),
        Ok(Err(e)) => return Err(format!("data dir check failed: {e}")),
        Err(_) => return Err("data dir check timed out".into()),
    }
    match tokio::time::timeout(READY_TIMEOUT, shared.locks.health()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("lock backend: {e}")),
        Err(_) => Err("lock backend did not answer in time".into()),
    }
}
