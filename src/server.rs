//! Listeners and their limits: binds the configured addresses, accepts connections
//! under a global semaphore and a per-IP cap (of the client's address, which a trusted
//! load balancer's PROXY header may name), runs each session in a tracked task and
//! drains them on shutdown. Speaks no protocol itself; replies come from the sessions.

use crate::auth::cache::VerifiedCache;
use crate::auth::pool::HashPool;
use crate::auth::HashParams;
use crate::config::Config;
use crate::config::ListenAddr;
use crate::locks::LockBackend;
use crate::metrics::{self, Metrics};
use crate::pop3::session::{self, Listener};
use crate::proxy;
use crate::smtp::core::Protocol;
use crate::smtp::session as smtp_session;
use crate::store::Directory;
use crate::throttle::Throttle;
use crate::tls::TlsManager;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

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

/// Everything sessions share, built once at start.
pub struct Shared {
    pub config: Arc<Config>,
    pub directory: Arc<Directory>,
    pub locks: Arc<dyn LockBackend>,
    pub tls: Arc<TlsManager>,
    pub acceptor: TlsAcceptor,
    /// Failed logins per client IP and per name: in process, or in Redis with the locks.
    pub throttle: Throttle,
    /// Dedicated argon2id threads, one per core: bounds concurrent hashing and keeps
    /// one working buffer per thread.
    pub hasher: HashPool,
    /// Key for stand-in SCRAM salts of unknown users; kept in the data dir so an unknown
    /// name gets the same salt across restarts, like a real account.
    pub secret: [u8; 32],
    pub hash_params: HashParams,
    pub verified: VerifiedCache,
    /// Closed at SIGTERM: sessions not logged in end at once, others may finish.
    pub shutdown: CancellationToken,
    /// Closed when the grace period is over: every session ends without UPDATE.
    pub abort: CancellationToken,
    /// Every layer counts what it does here.
    pub metrics: Arc<Metrics>,
    /// True while the accept loops run (for `/readyz`).
    pub accepting: AtomicBool,
}

impl Shared {
    pub fn new(
        config: Arc<Config>,
        directory: Arc<Directory>,
        locks: Arc<dyn LockBackend>,
        throttle: Throttle,
        tls: Arc<TlsManager>,
        secret: [u8; 32],
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Shared> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hasher = HashPool::new(threads)?;
        let acceptor = TlsAcceptor::from(tls.server_config());
        Ok(Shared {
            throttle,
            hash_params: config.auth.argon2,
            verified: VerifiedCache::new(
                Duration::from_secs(config.auth.cache_ttl_secs),
                config.auth.cache_entries,
            ),
            config,
            directory,
            locks,
            tls,
            acceptor,
            hasher,
            secret,
            shutdown: CancellationToken::new(),
            abort: CancellationToken::new(),
            metrics,
            accepting: AtomicBool::new(false),
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
}

async fn bind_tcp(name: &'static str, addr: &str) -> Result<Option<TcpListener>, ServerError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            listener: name,
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
        listener: "lmtp",
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
            Ok(Some(ListenAddr::Tcp(_))) => lmtp = bind_tcp("lmtp", &config.lmtp.listen).await?,
            Ok(Some(ListenAddr::Unix(path))) => {
                lmtp_unix = Some((bind_unix(config, &path)?, path));
            }
            Err(message) => {
                return Err(ServerError::Address {
                    listener: "lmtp",
                    message,
                })
            }
        }
        Ok(Listeners {
            pop3: bind_tcp("pop3", &config.pop3.listen).await?,
            pop3s: bind_tcp("pop3s", &config.pop3.tls_listen).await?,
            lmtp,
            lmtp_unix,
            smtp: bind_tcp("smtp", &config.smtp.listen).await?,
        })
    }

    pub fn local_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut out = Vec::new();
        for (name, l) in [
            ("pop3", &self.pop3),
            ("pop3s", &self.pop3s),
            ("lmtp", &self.lmtp),
            ("smtp", &self.smtp),
        ] {
            if let Some(addr) = l.as_ref().and_then(|l| l.local_addr().ok()) {
                out.push((name, addr));
            }
        }
        out
    }
}

/// Runs the accept loops until `shared.shutdown`, then waits for sessions to finish;
/// after the grace period `shared.abort` ends the rest.
pub async fn run(listeners: Listeners, shared: Arc<Shared>) {
    let tracker = TaskTracker::new();
    let limits = Arc::new(ConnLimits::new(
        shared.config.limits.max_connections,
        shared.config.limits.max_connections_per_ip,
    ));
    for (name, addr) in listeners.local_addrs() {
        info!(listener = name, addr = %addr, "listening");
    }
    if let Some((_, path)) = &listeners.lmtp_unix {
        info!(listener = "lmtp", addr = %format!("unix:{}", path.display()), "listening");
    }
    let mut loops = Vec::new();
    for (l, service) in [
        (listeners.pop3, Service::Pop3(Listener::Pop3)),
        (listeners.pop3s, Service::Pop3(Listener::Pop3s)),
        (listeners.lmtp, Service::Mail(Protocol::Lmtp)),
        (listeners.smtp, Service::Mail(Protocol::Smtp)),
    ] {
        if let Some(l) = l {
            loops.push(tokio::spawn(accept_loop(
                l,
                service,
                shared.clone(),
                limits.clone(),
                tracker.clone(),
            )));
        }
    }
    let unix_path = listeners.lmtp_unix.as_ref().map(|(_, p)| p.clone());
    if let Some((l, _)) = listeners.lmtp_unix {
        loops.push(tokio::spawn(unix_accept_loop(
            l,
            shared.clone(),
            limits.clone(),
            tracker.clone(),
        )));
    }
    shared.accepting.store(true, Ordering::Release);
    shared.shutdown.cancelled().await;
    shared.accepting.store(false, Ordering::Release);
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
        grace_secs = shared.config.limits.shutdown_grace_secs,
        "shutting down: draining sessions"
    );
    if tokio::time::timeout(shared.config.limits.shutdown_grace(), tracker.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = tracker.len(),
            "grace period over: closing remaining sessions without UPDATE"
        );
        shared.abort.cancel();
        if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .is_err()
        {
            warn!(remaining = tracker.len(), "sessions did not stop in time");
        }
    }
}

/// What a TCP listener serves: POP3 (cleartext or implicit TLS), or LMTP/SMTP.
#[derive(Debug, Clone, Copy)]
enum Service {
    Pop3(Listener),
    Mail(Protocol),
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Pop3(l) => l.name(),
            Service::Mail(p) => p.name(),
        }
    }

    async fn run(self, stream: TcpStream, client: SocketAddr, shared: Arc<Shared>) {
        match self {
            Service::Pop3(l) => session::run(stream, client, l, shared).await,
            Service::Mail(p) => smtp_session::run_tcp(stream, client, p, shared).await,
        }
    }

    async fn refuse(
        self,
        stream: TcpStream,
        client: SocketAddr,
        reason: Refusal,
        shared: Arc<Shared>,
    ) {
        match self {
            Service::Pop3(l) => session::refuse(stream, client, l, reason, shared).await,
            Service::Mail(p) => {
                let client = smtp_session::Peer::Tcp(client);
                smtp_session::refuse(stream, client, p.name(), reason, shared).await
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    service: Service,
    shared: Arc<Shared>,
    limits: Arc<ConnLimits>,
    tracker: TaskTracker,
) {
    let name = service.name();
    let mut backoff = Duration::from_millis(5);
    while let Some(accepted) = accept_next(name, &shared, &mut backoff, listener.accept()).await {
        let Some((stream, peer)) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        // The global place is taken now; the per-IP one in the task, once the client's
        // address is known (a PROXY header, read there, may name it).
        let reserved = limits.reserve();
        let shared = shared.clone();
        tracker.spawn(async move {
            let mut stream = stream;
            let Some(client) = client_addr(&shared, name, &mut stream, peer).await else {
                return;
            };
            match reserved.and_then(|r| r.admit(client.ip())) {
                Ok(permit) => {
                    service.run(stream, client, shared).await;
                    drop(permit);
                }
                Err(reason) => service.refuse(stream, client, reason, shared).await,
            }
        });
    }
    refuse_backlog(&listener, service, &shared, &tracker).await;
}

/// Accepts with exponential back-off on errors (EMFILE and friends) instead of spinning;
/// `None` once shutdown begins.
async fn accept_next<T>(
    name: &'static str,
    shared: &Shared,
    backoff: &mut Duration,
    accept: impl std::future::Future<Output = std::io::Result<T>>,
) -> Option<Option<T>> {
    let accepted = tokio::select! {
        _ = shared.shutdown.cancelled() => return None,
        r = accept => r,
    };
    match accepted {
        Ok(x) => {
            *backoff = Duration::from_millis(5);
            Some(Some(x))
        }
        Err(e) => {
            warn!(listener = name, error = %e, "accept failed");
            tokio::time::sleep(*backoff).await;
            *backoff = (*backoff * 2).min(Duration::from_secs(1));
            Some(None)
        }
    }
}

/// The LMTP accept loop on a unix socket: only the global connection limit applies.
async fn unix_accept_loop(
    listener: UnixListener,
    shared: Arc<Shared>,
    limits: Arc<ConnLimits>,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::from_millis(5);
    while let Some(accepted) = accept_next("lmtp", &shared, &mut backoff, listener.accept()).await {
        let Some((stream, _)) = accepted else {
            continue;
        };
        let admission = limits.reserve();
        let shared = shared.clone();
        tracker.spawn(async move {
            match admission {
                Ok(permit) => {
                    smtp_session::run_unix(stream, shared).await;
                    drop(permit);
                }
                Err(reason) => {
                    smtp_session::refuse(stream, smtp_session::Peer::Unix, "lmtp", reason, shared)
                        .await
                }
            }
        });
    }
}

/// The TLS handshake of an implicit-TLS connection or after STLS/STARTTLS, under the
/// handshake timeout, counted by listener, result and version.
pub async fn tls_accept(
    shared: &Shared,
    stream: TcpStream,
    listener: &'static str,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let timeout = shared.config.limits.tls_handshake_timeout();
    let counter = |result, version| {
        shared
            .metrics
            .tls_handshakes
            .with_label_values(&[listener, result, version])
            .inc();
    };
    match tokio::time::timeout(timeout, shared.acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let (_, conn) = tls.get_ref();
            let version = match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_2) => metrics::TLS_1_2,
                Some(rustls::ProtocolVersion::TLSv1_3) => metrics::TLS_1_3,
                // Not reached: the server config enables only TLS 1.2 and 1.3.
                _ => metrics::TLS_VERSION_NONE,
            };
            counter(metrics::TLS_OK, version);
            tracing::debug!(version = ?conn.protocol_version(), sni = conn.server_name().unwrap_or("-"), "TLS established");
            Some(tls)
        }
        Ok(Err(e)) => {
            counter(metrics::TLS_FAILED, metrics::TLS_VERSION_NONE);
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            counter(metrics::TLS_TIMEOUT, metrics::TLS_VERSION_NONE);
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// The address a connection accepted on `listener` (a `config::PROXY_LISTENERS` name)
/// speaks for: the socket's `peer`, or, on a listener in `proxy_protocol.listeners`, the
/// source address of the PROXY header that a peer in `trusted_networks` must send first
/// (v2 `LOCAL` and v1 `UNKNOWN` keep the socket's peer). `None`: the connection is refused
/// and must be dropped without a byte written; the refusal is already logged and counted.
/// Call it in the connection's task, never in an accept loop (it may wait up to
/// `header_timeout_secs`), and apply the per-IP limit to what it returns.
pub async fn client_addr(
    shared: &Shared,
    listener: &'static str,
    stream: &mut TcpStream,
    peer: SocketAddr,
) -> Option<SocketAddr> {
    let config = &shared.config.proxy_protocol;
    if !config.expects_header(listener) {
        return Some(peer);
    }
    let reason = if !config.trusts(peer.ip()) {
        info!(peer = %peer, listener, reason = metrics::REASON_PROXY_UNTRUSTED,
            "connection refused: peer is not in proxy_protocol.trusted_networks");
        metrics::REASON_PROXY_UNTRUSTED
    } else {
        match proxy::read_header(stream, config.header_timeout()).await {
            Ok(client) => {
                let client = client.unwrap_or(peer);
                debug!(proxy = %peer, client = %client, listener, "PROXY header");
                return Some(client);
            }
            // A balancer's plain TCP health check connects and closes without a byte.
            Err(e @ proxy::ProxyError::Closed(0)) => {
                debug!(peer = %peer, listener, reason = metrics::REASON_PROXY_HEADER, error = %e,
                    "connection refused");
                metrics::REASON_PROXY_HEADER
            }
            Err(e) => {
                info!(peer = %peer, listener, reason = metrics::REASON_PROXY_HEADER, error = %e,
                    "connection refused");
                metrics::REASON_PROXY_HEADER
            }
        }
    };
    shared
        .metrics
        .connections_rejected
        .with_label_values(&[listener, reason])
        .inc();
    None
}

/// Answers the connections already waiting in the listen backlog at shutdown with a
/// refusal, instead of resetting them when the listener closes.
async fn refuse_backlog(
    listener: &TcpListener,
    service: Service,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
) {
    for _ in 0..REFUSE_AT_SHUTDOWN_MAX {
        // A zero timeout still polls `accept` once, so only waiting connections are taken.
        let Ok(Ok((stream, peer))) = tokio::time::timeout(Duration::ZERO, listener.accept()).await
        else {
            break;
        };
        let refusal = service.refuse(stream, peer, Refusal::ShuttingDown, shared.clone());
        tracker.spawn(refusal);
    }
}

/// Most connections answered at shutdown, so a flood cannot hold the drain up.
const REFUSE_AT_SHUTDOWN_MAX: usize = 1024;

/// Why a connection was refused before a session started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooManyFromPeer,
    ShuttingDown,
}

impl Refusal {
    /// The `reason` label of the rejected-connections metric.
    pub fn metric_reason(self) -> &'static str {
        match self {
            Refusal::TooManyConnections => metrics::REASON_LIMIT,
            Refusal::TooManyFromPeer => metrics::REASON_PER_IP_LIMIT,
            Refusal::ShuttingDown => metrics::REASON_SHUTDOWN,
        }
    }
}

/// Global and per-IP connection limits.
pub struct ConnLimits {
    total: Arc<Semaphore>,
    per_ip_max: usize,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A connection's place in the global limit, taken when it is accepted; `admit` adds the
/// per-IP place once the client's address is known.
pub struct Reserved {
    total: OwnedSemaphorePermit,
    per_ip_max: usize,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Reserved {
    pub fn admit(self, ip: IpAddr) -> Result<Admission, Refusal> {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_ip_max {
            return Err(Refusal::TooManyFromPeer);
        }
        *n += 1;
        drop(map);
        Ok(Admission {
            _total: self.total,
            ip,
            per_ip: self.per_ip,
        })
    }
}

/// Holds one connection's place in both limits until dropped.
pub struct Admission {
    _total: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl ConnLimits {
    pub fn new(total: usize, per_ip_max: usize) -> Self {
        ConnLimits {
            total: Arc::new(Semaphore::new(total)),
            per_ip_max,
            per_ip: Arc::default(),
        }
    }

    /// A place in the global limit only.
    pub fn reserve(&self) -> Result<Reserved, Refusal> {
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::TooManyConnections)?;
        Ok(Reserved {
            total,
            per_ip_max: self.per_ip_max,
            per_ip: self.per_ip.clone(),
        })
    }

    /// Places in both limits, for a client whose address is known at accept.
    pub fn admit(&self, ip: IpAddr) -> Result<Admission, Refusal> {
        self.reserve()?.admit(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total_limits() {
        let limits = ConnLimits::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().expect("ip");
        let b: IpAddr = "127.0.0.2".parse().expect("ip");
        let a1 = limits.admit(a).expect("a1");
        let _a2 = limits.admit(a).expect("a2");
        assert_eq!(limits.admit(a).err(), Some(Refusal::TooManyFromPeer));
        let _b1 = limits.admit(b).expect("b1");
        assert_eq!(limits.admit(b).err(), Some(Refusal::TooManyConnections));
        drop(a1);
        assert!(limits.admit(a).is_ok());
    }

    #[test]
    fn a_reserved_place_counts_before_its_address_is_known() {
        let limits = ConnLimits::new(2, 1);
        let a: IpAddr = "203.0.113.7".parse().expect("ip");
        let pending = limits.reserve().expect("reserve");
        let b = limits.admit("127.0.0.1".parse().expect("ip")).expect("b");
        // Both places are taken: one by a connection still waiting for its header.
        assert_eq!(limits.reserve().err(), Some(Refusal::TooManyConnections));
        let a1 = pending.admit(a).expect("a1");
        assert_eq!(
            limits.reserve().err().map(Refusal::metric_reason),
            Some(metrics::REASON_LIMIT)
        );
        drop(a1);
        let again = limits.reserve().expect("reserve");
        let _a2 = again.admit(a).expect("a2");
        // A refused per-IP admission gives its global place back.
        drop(b);
        let third = limits.reserve().expect("reserve");
        assert_eq!(third.admit(a).err(), Some(Refusal::TooManyFromPeer));
        assert!(limits.reserve().is_ok());
    }
}
