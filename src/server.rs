//! Listeners and their accept loops: binds the configured addresses, admits each
//! connection under the connection limits (`net`), runs the protocol its listener
//! serves in a tracked task and drains sessions on shutdown. On a replica of a cluster
//! also the replica listener: mutual TLS, the forwarding preamble, admission by the
//! original client's address, then the protocol its ALPN names. Speaks no protocol
//! itself: sessions and their refusals are `pop3`'s, `smtp`'s and `admin`'s.

use crate::cluster::frame::{self, Framed};
use crate::cluster::{preamble, Alpn, Cluster, Preamble, LINK_IDLE};
use crate::config::{Config, ListenAddr, Listener};
use crate::locks::LockBackend;
use crate::metrics::http::Readiness;
use crate::net::{self, ConnLimits, Refusal};
use crate::smtp::core::Protocol;
use crate::store::Directory;
use crate::wire::LineReader;
use crate::{admin, pop3, smtp};
use bytes::BytesMut;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind {
        listener: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid listen address for {listener}: {message}")]
    Address {
        listener: &'static str,
        message: String,
    },
}

/// What the listeners serve: each protocol with the state it uses, and what readiness
/// asks about. Built once at start.
pub struct Services {
    pub net: Arc<net::Context>,
    pub pop3: Arc<pop3::Service>,
    pub mail: Arc<smtp::Service>,
    /// Read by `/readyz`: the data dir must answer.
    pub directory: Arc<Directory>,
    /// Read by `/readyz`: the lock backend must answer.
    pub locks: Arc<dyn LockBackend>,
    /// True while the accept loops run (for `/readyz`).
    pub accepting: AtomicBool,
    /// On a replica of a cluster: the link and the homes.
    pub cluster: Option<Arc<Cluster>>,
    /// What admin requests from other replicas run with.
    pub admin: Arc<admin::Admin>,
}

/// Each step of the readiness check gets this long.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

impl Readiness for Services {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            if self.net.shutdown.is_cancelled() {
                return Err("shutting down".into());
            }
            if !self.accepting.load(Ordering::Acquire) {
                return Err("listeners not accepting yet".into());
            }
            let directory = self.directory.clone();
            let stores = tokio::task::spawn_blocking(move || directory.list_domains());
            match tokio::time::timeout(READY_TIMEOUT, stores).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => return Err(format!("data dir unusable: {e}")),
                Ok(Err(e)) => return Err(format!("data dir check failed: {e}")),
                Err(_) => return Err("data dir check timed out".into()),
            }
            match tokio::time::timeout(READY_TIMEOUT, self.locks.health()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("lock backend: {e}")),
                Err(_) => Err("lock backend did not answer in time".into()),
            }
        })
    }
}

/// The configured listeners, bound.
pub struct Listeners {
    pub pop3: Option<TcpListener>,
    pub pop3s: Option<TcpListener>,
    pub lmtp: Option<TcpListener>,
    /// LMTP on a unix socket (`lmtp.listen = "unix:/path"`), and its path.
    pub lmtp_unix: Option<(UnixListener, std::path::PathBuf)>,
    pub smtp: Option<TcpListener>,
    /// The replica listener (`cluster.listen`), on a replica of a cluster.
    pub cluster: Option<TcpListener>,
}

async fn bind_tcp(listener: Listener, addr: &str) -> Result<Option<TcpListener>, ServerError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            listener: listener.name(),
            addr: addr.to_owned(),
            source,
        })?;
    Ok(Some(l))
}

/// Binds a unix socket, replacing a stale socket file left by a previous run (but no
/// other kind of file), with `lmtp.socket_mode` and `lmtp.socket_group`.
fn bind_unix(config: &Config, path: &std::path::Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |source| ServerError::Bind {
        listener: Listener::Lmtp.name(),
        addr: format!("unix:{}", path.display()),
        source,
    };
    let invalid = |message: String| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            message,
        ))
    };
    let mode = config.lmtp.socket_mode_bits().map_err(invalid)?;
    let group = socket_group(&config.lmtp.socket_group).map_err(invalid)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    Ok(listener)
}

/// Resolves `lmtp.socket_group`: empty for none, a numeric gid, or a group name.
pub fn socket_group(name: &str) -> Result<Option<u32>, String> {
    if name.is_empty() {
        return Ok(None);
    }
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(Some(gid));
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(Some(g.gid.as_raw())),
        Ok(None) => Err(format!("lmtp.socket_group: no group named {name:?}")),
        Err(e) => Err(format!("lmtp.socket_group: looking up {name:?}: {e}")),
    }
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Listeners, ServerError> {
        let mut lmtp = None;
        let mut lmtp_unix = None;
        match ListenAddr::parse(&config.lmtp.listen, true) {
            Ok(None) => {}
            Ok(Some(ListenAddr::Tcp(_))) => {
                lmtp = bind_tcp(Listener::Lmtp, &config.lmtp.listen).await?
            }
            Ok(Some(ListenAddr::Unix(path))) => {
                lmtp_unix = Some((bind_unix(config, &path)?, path));
            }
            Err(message) => {
                return Err(ServerError::Address {
                    listener: Listener::Lmtp.name(),
                    message,
                })
            }
        }
        Ok(Listeners {
            pop3: bind_tcp(Listener::Pop3, &config.pop3.listen).await?,
            pop3s: bind_tcp(Listener::Pop3s, &config.pop3.tls_listen).await?,
            lmtp,
            lmtp_unix,
            smtp: bind_tcp(Listener::Smtp, &config.smtp.listen).await?,
            cluster: if config.cluster.enabled() {
                let addr = &config.cluster.listen;
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServerError::Bind {
                            listener: "cluster",
                            addr: addr.clone(),
                            source,
                        })?,
                )
            } else {
                None
            },
        })
    }

    /// The bound TCP address of each listener that is on.
    pub fn local_addrs(&self) -> Vec<(Listener, SocketAddr)> {
        let mut out = Vec::new();
        for (listener, l) in [
            (Listener::Pop3, &self.pop3),
            (Listener::Pop3s, &self.pop3s),
            (Listener::Lmtp, &self.lmtp),
            (Listener::Smtp, &self.smtp),
        ] {
            if let Some(addr) = l.as_ref().and_then(|l| l.local_addr().ok()) {
                out.push((listener, addr));
            }
        }
        out
    }
}

/// Runs the accept loops until `net.shutdown`, then waits for sessions to finish; after
/// the grace period `net.abort` ends the rest.
pub async fn run(listeners: Listeners, services: Arc<Services>) {
    let net = services.net.clone();
    let tracker = TaskTracker::new();
    let limits = Arc::new(ConnLimits::new(
        net.config.limits.max_connections,
        net.config.limits.max_connections_per_ip,
        net.config.limits.ipv6_prefix_len,
    ));
    for (listener, addr) in listeners.local_addrs() {
        info!(listener = listener.name(), addr = %addr, "listening");
    }
    if let Some((_, path)) = &listeners.lmtp_unix {
        info!(listener = Listener::Lmtp.name(), addr = %format!("unix:{}", path.display()), "listening");
    }
    let mut loops = Vec::new();
    for (l, listener) in [
        (listeners.pop3, Listener::Pop3),
        (listeners.pop3s, Listener::Pop3s),
        (listeners.lmtp, Listener::Lmtp),
        (listeners.smtp, Listener::Smtp),
    ] {
        if let Some(l) = l {
            loops.push(tokio::spawn(accept_loop(
                l,
                listener,
                services.clone(),
                limits.clone(),
                tracker.clone(),
            )));
        }
    }
    if let (Some(l), Some(cluster)) = (listeners.cluster, services.cluster.clone()) {
        if let Ok(addr) = l.local_addr() {
            info!(listener = "cluster", addr = %addr, "listening");
        }
        loops.push(tokio::spawn(cluster_accept_loop(
            l,
            cluster,
            services.clone(),
            limits.clone(),
            tracker.clone(),
        )));
    }
    let unix_path = listeners.lmtp_unix.as_ref().map(|(_, p)| p.clone());
    if let Some((l, _)) = listeners.lmtp_unix {
        loops.push(tokio::spawn(unix_accept_loop(
            l,
            services.clone(),
            limits.clone(),
            tracker.clone(),
        )));
    }
    services.accepting.store(true, Ordering::Release);
    net.shutdown.cancelled().await;
    services.accepting.store(false, Ordering::Release);
    for l in loops {
        let _ = l.await;
    }
    if let Some(path) = unix_path {
        let _ = std::fs::remove_file(path);
    }
    tracker.close();
    let active = tracker.len();
    info!(
        active,
        grace_secs = net.config.limits.shutdown_grace_secs,
        "shutting down: draining sessions"
    );
    if tokio::time::timeout(net.config.limits.shutdown_grace(), tracker.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = tracker.len(),
            "grace period over: closing remaining sessions without UPDATE"
        );
        net.abort.cancel();
        if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            warn!(remaining = tracker.len(), "sessions did not stop in time");
        }
    }
}

/// Runs the session `listener` serves on a TCP connection.
async fn serve(listener: Listener, stream: TcpStream, client: SocketAddr, services: Arc<Services>) {
    match listener {
        Listener::Pop3 | Listener::Pop3s => {
            pop3::run(stream, client, listener, services.pop3.clone()).await
        }
        Listener::Lmtp => {
            smtp::run_tcp(stream, client, Protocol::Lmtp, services.mail.clone()).await
        }
        Listener::Smtp => {
            smtp::run_tcp(stream, client, Protocol::Smtp, services.mail.clone()).await
        }
    }
}

/// Refuses a connection with the refusal of the protocol `listener` serves.
async fn refuse<S: tokio::io::AsyncWrite + Unpin>(
    listener: Listener,
    stream: S,
    client: impl std::fmt::Display,
    reason: Refusal,
    services: &Services,
) {
    let reply = match listener {
        Listener::Pop3 | Listener::Pop3s => pop3::refusal(listener, reason),
        Listener::Lmtp | Listener::Smtp => Some(smtp::refusal(reason)),
    };
    net::refuse(&services.net, stream, client, listener, reason, reply).await
}

async fn accept_loop(
    tcp: TcpListener,
    listener: Listener,
    services: Arc<Services>,
    limits: Arc<ConnLimits>,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::from_millis(5);
    while let Some(accepted) = accept_next(listener, &services, &mut backoff, tcp.accept()).await {
        let Some((stream, peer)) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        // The global place is taken now; the per-IP one in the task, once the client's
        // address is known (a PROXY header, read there, may name it).
        let reserved = limits.reserve();
        let services = services.clone();
        tracker.spawn(async move {
            let mut stream = stream;
            let Some(client) = net::client_addr(&services.net, listener, &mut stream, peer).await
            else {
                return;
            };
            match reserved.and_then(|r| r.admit(client.ip())) {
                Ok(permit) => {
                    serve(listener, stream, client, services).await;
                    drop(permit);
                }
                Err(reason) => refuse(listener, stream, client, reason, &services).await,
            }
        });
    }
    refuse_backlog(&tcp, listener, &services, &tracker).await;
}

/// Accepts with exponential back-off on errors (EMFILE and friends) instead of spinning;
/// `None` once shutdown begins.
async fn accept_next<T>(
    listener: Listener,
    services: &Services,
    backoff: &mut Duration,
    accept: impl std::future::Future<Output = std::io::Result<T>>,
) -> Option<Option<T>> {
    let accepted = tokio::select! {
        _ = services.net.shutdown.cancelled() => return None,
        r = accept => r,
    };
    match accepted {
        Ok(x) => {
            *backoff = Duration::from_millis(5);
            Some(Some(x))
        }
        Err(e) => {
            warn!(listener = listener.name(), error = %e, "accept failed");
            tokio::time::sleep(*backoff).await;
            *backoff = (*backoff * 2).min(Duration::from_secs(1));
            Some(None)
        }
    }
}

/// The LMTP accept loop on a unix socket: only the global connection limit applies.
async fn unix_accept_loop(
    unix: UnixListener,
    services: Arc<Services>,
    limits: Arc<ConnLimits>,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::from_millis(5);
    while let Some(accepted) =
        accept_next(Listener::Lmtp, &services, &mut backoff, unix.accept()).await
    {
        let Some((stream, _)) = accepted else {
            continue;
        };
        let admission = limits.reserve();
        let services = services.clone();
        tracker.spawn(async move {
            match admission {
                Ok(permit) => {
                    smtp::run_unix(stream, services.mail.clone()).await;
                    drop(permit);
                }
                Err(reason) => {
                    let peer = smtp::session::Peer::Unix;
                    refuse(Listener::Lmtp, stream, peer, reason, &services).await
                }
            }
        });
    }
}

/// The replica listener's accept loop: every connection is a peer's forwarded session
/// or admin request.
async fn cluster_accept_loop(
    tcp: TcpListener,
    cluster: Arc<Cluster>,
    services: Arc<Services>,
    limits: Arc<ConnLimits>,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::from_millis(5);
    // Connection errors are logged under the POP3 listener's name by `accept_next`;
    // nothing else is counted there.
    while let Some(accepted) =
        accept_next(Listener::Pop3, &services, &mut backoff, tcp.accept()).await
    {
        let Some((stream, peer)) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let reserved = limits.reserve();
        let (cluster, services, limits) = (cluster.clone(), services.clone(), limits.clone());
        tracker.spawn(async move {
            let Ok(reserved) = reserved else {
                // Over the global limit: closed; the front answers its client.
                return;
            };
            inbound(stream, peer, reserved, limits, &cluster, services).await
        });
    }
}

/// One connection on the replica listener: handshake and peer check, then the preamble,
/// the per-IP admission by the original client's address, and the protocol.
async fn inbound(
    stream: TcpStream,
    peer: SocketAddr,
    reserved: net::Reserved,
    limits: Arc<ConnLimits>,
    cluster: &Cluster,
    services: Arc<Services>,
) {
    let metrics = &services.net.metrics;
    let timeout = services.net.config.limits.tls_handshake_timeout();
    let (mut tls, alpn, replica) = match cluster.link.accept(stream, timeout).await {
        Ok(accepted) => accepted,
        Err(e) => {
            info!(peer = %peer, error = %e, "replica connection refused");
            metrics.inbound(crate::metrics::ForwardProtocol::Admin, false);
            return;
        }
    };
    let protocol = crate::cluster::forward_protocol(alpn);
    if alpn == Alpn::Pop3 {
        pop3_link(tls, peer, &replica, reserved, limits, services).await;
        return;
    }
    if alpn == Alpn::Admin {
        metrics.inbound(protocol, true);
        let _permit = reserved;
        admin::handle(tls, admin::Local::Replica, services.admin.clone()).await;
        return;
    }
    let (preamble, rest) = match read_preamble(&mut tls, timeout).await {
        Ok(p) => p,
        Err(e) => {
            info!(peer = %peer, replica, error = %e, "forwarded session refused");
            metrics.inbound(protocol, false);
            return;
        }
    };
    let permit = match reserved.admit(preamble.client.ip()) {
        Ok(p) => p,
        Err(reason) => {
            metrics.inbound(protocol, false);
            refuse(preamble.listener, tls, preamble.client, reason, &services).await;
            return;
        }
    };
    metrics.inbound(protocol, true);
    match alpn {
        Alpn::Lmtp => {
            smtp::run_forwarded(tls, preamble, rest, Protocol::Lmtp, services.mail.clone()).await
        }
        Alpn::Smtp => {
            smtp::run_forwarded(tls, preamble, rest, Protocol::Smtp, services.mail.clone()).await
        }
        // invariant: handled above.
        Alpn::Pop3 | Alpn::Admin => {}
    }
    drop(permit);
}

/// A POP3 link: framed sessions one after another (`cluster::frame`), each with its own
/// preamble and admission, until the front closes the link, leaves it idle for
/// `LINK_IDLE`, or a session does not end cleanly.
async fn pop3_link(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    replica: &str,
    reserved: net::Reserved,
    limits: Arc<ConnLimits>,
    services: Arc<Services>,
) {
    let metrics = &services.net.metrics;
    let protocol = crate::metrics::ForwardProtocol::Pop3;
    let mut link = Framed::new(tls);
    let mut reserved = Some(reserved);
    let mut wait = services.net.config.limits.tls_handshake_timeout();
    loop {
        let read = tokio::select! {
            r = read_preamble(&mut link, wait) => r,
            _ = services.net.shutdown.cancelled() => break,
        };
        let (preamble, rest) = match read {
            Ok(p) => p,
            // The front closed the idle link, or let it sit: the usual end.
            Err(_) if link.read_ended() || reserved.is_none() => break,
            Err(e) => {
                info!(peer = %peer, replica, error = %e, "forwarded session refused");
                metrics.inbound(protocol, false);
                break;
            }
        };
        let again = reserved.is_none();
        let slot = match reserved.take() {
            Some(r) => Ok(r),
            None => limits.reserve(),
        };
        let permit = match slot.and_then(|r| r.admit(preamble.client.ip())) {
            Ok(p) => p,
            Err(reason) => {
                metrics.inbound(protocol, false);
                refuse(
                    preamble.listener,
                    &mut link,
                    preamble.client,
                    reason,
                    &services,
                )
                .await;
                break;
            }
        };
        metrics.inbound(protocol, true);
        // On a reused link the front waits for this before it sends the session's first
        // command, so a link that went stale or a home that hangs costs it no more than
        // the connect timeout.
        if again {
            let acked = async {
                link.write_all(&[frame::ACK]).await?;
                link.flush().await
            };
            if acked.await.is_err() {
                break;
            }
        }
        pop3::run_forwarded(&mut link, preamble, rest, services.pop3.clone()).await;
        drop(permit);
        // What the client still sent before the front ended its side.
        let (mut rest, mut sink) = ((&mut link).take(MAX_LINK_DRAIN), tokio::io::sink());
        let idle = services.net.config.limits.idle_timeout();
        let drained = tokio::time::timeout(idle, tokio::io::copy(&mut rest, &mut sink)).await;
        if !matches!(drained, Ok(Ok(_))) || !link.reusable() {
            break;
        }
        link.next_session();
        wait = LINK_IDLE;
    }
    let mut tls = link.into_inner();
    let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
}

/// Most octets a front may still send after a session ended on its link.
const MAX_LINK_DRAIN: u64 = 1024 * 1024;

/// Reads the preamble line within `timeout`; returns it with the bytes that followed it.
async fn read_preamble<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(Preamble, BytesMut), String> {
    let mut buf = BytesMut::with_capacity(preamble::MAX_PREAMBLE);
    let mut lines = LineReader::new();
    let read = async {
        loop {
            match lines.next_line(&mut buf, preamble::MAX_PREAMBLE) {
                Some(Ok(line)) => return Ok(line),
                Some(Err(_)) => return Err("preamble too long".to_owned()),
                None => {}
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) => return Err("closed before the preamble".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let line = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| "no preamble in time".to_owned())??;
    let preamble = Preamble::parse(&line).map_err(|e| e.to_string())?;
    Ok((preamble, buf))
}

/// Answers the connections already waiting in the listen backlog at shutdown with a
/// refusal, instead of resetting them when the listener closes.
async fn refuse_backlog(
    tcp: &TcpListener,
    listener: Listener,
    services: &Arc<Services>,
    tracker: &TaskTracker,
) {
    for _ in 0..REFUSE_AT_SHUTDOWN_MAX {
        // A zero timeout still polls `accept` once, so only waiting connections are taken.
        let Ok(Ok((stream, peer))) = tokio::time::timeout(Duration::ZERO, tcp.accept()).await
        else {
            break;
        };
        let services = services.clone();
        tracker.spawn(async move {
            refuse(listener, stream, peer, Refusal::ShuttingDown, &services).await
        });
    }
}

/// Most connections answered at shutdown, so a flood cannot hold the drain up.
const REFUSE_AT_SHUTDOWN_MAX: usize = 1024;
