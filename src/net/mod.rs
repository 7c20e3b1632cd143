//! The connection layer every protocol shares, below the protocols: what a connection
//! carries ([`Context`]), admission under the connection limits (`limits`), whom a
//! connection speaks for (the socket's peer, or a trusted balancer's PROXY header:
//! [`client_addr`], `proxy`), the TLS handshake ([`tls_accept`]), buffered line I/O
//! (`io::Io`), refusing a connection ([`refuse`]) and running one session under its
//! span, id and metrics ([`run_session`]). Speaks no protocol: the bytes a refusal
//! writes come from the protocol, and nothing here reads a store.

pub mod io;
pub mod limits;
pub mod proxy;

pub use io::{Io, Read};
pub use limits::{Admission, ConnLimits, Refusal, Reserved};

use crate::config::{Config, Listener};
use crate::metrics::{self, Handshake, Metrics, Outcome, Rejected};
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

/// What every connection of every protocol may use: the configuration, the metrics, the
/// TLS acceptor and the two shutdown tokens. Built once at start.
pub struct Context {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Serves the certificates of the `TlsManager`, reloaded in place.
    pub acceptor: TlsAcceptor,
    /// Closed at SIGTERM: sessions not logged in end at once, others may finish.
    pub shutdown: CancellationToken,
    /// Closed when the grace period is over: every session ends without UPDATE.
    pub abort: CancellationToken,
}

impl Context {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>, acceptor: TlsAcceptor) -> Context {
        Context {
            config,
            metrics,
            acceptor,
            shutdown: CancellationToken::new(),
            abort: CancellationToken::new(),
        }
    }
}

/// Session ids, one sequence for every protocol, so a `sid` names one session in the log.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Runs one session of `listener` in its `session` span (id, peer, listener), counted as
/// accepted and active while it runs and by its outcome and length when it ends. The
/// session gets its id (a forward passes it to the home) and logs its own end line (its
/// fields are the protocol's).
pub async fn run_session<F>(
    ctx: &Context,
    listener: Listener,
    peer: impl Display,
    session: impl FnOnce(u64) -> F,
) where
    F: Future<Output = Outcome>,
{
    let sid = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("session", sid, peer = %peer, listener = listener.name());
    async move {
        let started = Instant::now();
        let active = ctx.metrics.connection_accepted(listener);
        let outcome = session(sid).await;
        drop(active);
        ctx.metrics
            .observe_session(listener, outcome, started.elapsed());
    }
    .instrument(span)
    .await
}

/// Runs a session forwarded by replica `via` in a span with the front's session id, so
/// both replicas' logs name it alike. The front counted the connection; the home counts
/// only what it does (commands, logins, deliveries).
pub async fn run_forwarded<F>(
    listener: Listener,
    peer: impl Display,
    sid: u64,
    via: &str,
    session: F,
) where
    F: Future<Output = Outcome>,
{
    let span = tracing::info_span!("session", sid, peer = %peer, listener = listener.name(), via);
    session.instrument(span).await;
}

/// Refuses a connection before its session: counts and logs it, then writes `reply` (the
/// protocol's refusal, or nothing where the client expects a TLS handshake) within a
/// few seconds and closes.
pub async fn refuse<S: AsyncWrite + Unpin>(
    ctx: &Context,
    mut stream: S,
    peer: impl Display,
    listener: Listener,
    reason: Refusal,
    reply: Option<bytes::BytesMut>,
) {
    ctx.metrics
        .connection_rejected(listener, reason.metric_reason());
    info!(peer = %peer, listener = listener.name(), reason = ?reason, "connection refused");
    if let Some(out) = reply {
        let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, stream.write_all(&out)).await;
    }
}

/// How long a refusal may take to write before the connection is closed anyway.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The TLS handshake of an implicit-TLS connection or after STLS/STARTTLS, under the
/// handshake timeout, counted by listener, result and version.
pub async fn tls_accept<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &Context,
    stream: S,
    listener: Listener,
) -> Option<tokio_rustls::server::TlsStream<S>> {
    let timeout = ctx.config.limits.tls_handshake_timeout();
    match tokio::time::timeout(timeout, ctx.acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let (_, conn) = tls.get_ref();
            let version = match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_2) => metrics::TLS_1_2,
                Some(rustls::ProtocolVersion::TLSv1_3) => metrics::TLS_1_3,
                // Not reached: the server config enables only TLS 1.2 and 1.3.
                _ => metrics::TLS_VERSION_NONE,
            };
            ctx.metrics.tls_handshake(listener, Handshake::Ok(version));
            debug!(version = ?conn.protocol_version(), sni = conn.server_name().unwrap_or("-"), "TLS established");
            Some(tls)
        }
        Ok(Err(e)) => {
            ctx.metrics.tls_handshake(listener, Handshake::Failed);
            debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            ctx.metrics.tls_handshake(listener, Handshake::TimedOut);
            debug!("TLS handshake timed out");
            None
        }
    }
}

/// The address a connection accepted on `listener` speaks for: the socket's `peer`, or,
/// on a listener in `proxy_protocol.listeners`, the source address of the PROXY header
/// that a peer in `trusted_networks` must send first (v2 `LOCAL` and v1 `UNKNOWN` keep
/// the socket's peer). `None`: the connection is refused and must be dropped without a
/// byte written; the refusal is already logged and counted. Call it in the connection's
/// task, never in an accept loop (it may wait up to `header_timeout_secs`), and apply the
/// per-IP limit to what it returns. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, an
/// IPv4 client of a dual-stack listener or in a PROXY header) comes back as IPv4, so
/// logs, limits and throttling see one form of each client.
pub async fn client_addr(
    ctx: &Context,
    listener: Listener,
    stream: &mut TcpStream,
    peer: SocketAddr,
) -> Option<SocketAddr> {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let config = &ctx.config.proxy_protocol;
    if !config.expects_header(listener) {
        return Some(canonical(peer));
    }
    let name = listener.name();
    let reason = if !config.trusts(peer.ip()) {
        info!(peer = %peer, listener = name, reason = metrics::REASON_PROXY_UNTRUSTED,
            "connection refused: peer is not in proxy_protocol.trusted_networks");
        Rejected::ProxyUntrusted
    } else {
        match proxy::read_header(stream, config.header_timeout()).await {
            Ok(client) => {
                let client = canonical(client.unwrap_or(peer));
                debug!(proxy = %peer, client = %client, listener = name, "PROXY header");
                return Some(client);
            }
            // A balancer's plain TCP health check connects and closes without a byte.
            Err(e @ proxy::ProxyError::Closed(0)) => {
                debug!(peer = %peer, listener = name, reason = metrics::REASON_PROXY_HEADER,
                    error = %e, "connection refused");
                Rejected::ProxyHeader
            }
            Err(e) => {
                info!(peer = %peer, listener = name, reason = metrics::REASON_PROXY_HEADER,
                    error = %e, "connection refused");
                Rejected::ProxyHeader
            }
        }
    };
    ctx.metrics.connection_rejected(listener, reason);
    None
}
