//! Start-up and the server's life: [`start`] loads the certificates, opens the stores,
//! applies the provisioning plan, binds every listener and the admin socket, and spawns
//! the accept loops, the metrics endpoint and housekeeping; it returns a [`Running`]
//! server with its bound addresses and a shutdown handle, so `main` and the tests start
//! a server the same way. Signals are the caller's: `main` turns SIGTERM into
//! [`Running::shutdown`].

use crate::admin::{self, AdminError};
use crate::auth::cache::VerifiedCache;
use crate::auth::pool::{self as hash_pool, HashPool};
use crate::cluster::{self, Cluster, ClusterError};
use crate::config::{Config, Listener, LockBackendKind};
use crate::delivery::Quotas;
use crate::fsutil;
use crate::locks::{LocalLocks, LockBackend, RedisLocks};
use crate::metrics::{self, LockMetrics, Metrics, MetricsError};
use crate::net;
use crate::pop3::{self, Accounts};
use crate::provision::{Plan, ProvisionError};
use crate::redis_conn::{RedisConn, RedisConnError};
use crate::server::{self, Listeners, ServerError, Services};
use crate::smtp;
use crate::store::{Directory, DomainStore, StoreError, StoreOptions, Usage};
use crate::throttle::{self, Throttle};
use crate::tls::{self, CertPaths, TlsError, TlsManager};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why the server could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error("creating data_dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data_dir {path} is in use by another mailgate process: a server already serving it, or a CLI command working on it (it holds {lock})")]
    DataDirBusy { path: PathBuf, lock: PathBuf },
    #[error("locking data_dir {path}: {source}")]
    DataDirLock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading certificates: {0}")]
    Tls(#[from] TlsError),
    #[error("opening data dir {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
    #[error("flushing the stores: {0}")]
    Flush(StoreError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot listen on {addr} (metrics): {source}")]
    MetricsBind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Redis(#[from] RedisConnError),
    #[error("server secret {path}: {message}")]
    Secret { path: PathBuf, message: String },
    #[error("starting the password hashing threads: {0}")]
    Hasher(std::io::Error),
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// A started server.
pub struct Running {
    /// The bound address of each TCP listener that is on.
    pub listeners: Vec<(Listener, SocketAddr)>,
    /// The metrics endpoint, when on.
    pub metrics: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), AppError>>,
}

impl Running {
    /// Where `listener` listens, when it is on and on TCP.
    pub fn addr(&self, listener: Listener) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(l, _)| *l == listener)
            .map(|(_, a)| *a)
    }

    /// Begins a graceful shutdown, as SIGTERM does: stop accepting, end sessions that
    /// are not logged in, let the others finish within the grace period.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// The token [`Running::shutdown`] cancels, for a signal handler.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server has stopped and flushed its stores.
    pub async fn wait(self) -> Result<(), AppError> {
        self.task.await?
    }
}

/// The default certificate's paths, and whether it is the self-signed one made on
/// first start (no `[tls] cert`/`key` configured).
pub fn default_cert_paths(config: &Config) -> (CertPaths, bool) {
    let (cert, key, self_signed) = config.default_cert();
    (CertPaths { cert, key }, self_signed)
}

/// The per-domain (SNI) certificates, by lower-cased domain.
pub fn domain_cert_paths(config: &Config) -> std::collections::BTreeMap<String, CertPaths> {
    config
        .tls
        .domains
        .iter()
        .map(|(d, f)| {
            (
                d.to_ascii_lowercase(),
                CertPaths {
                    cert: f.cert.clone(),
                    key: f.key.clone(),
                },
            )
        })
        .collect()
}

/// Opens the stores of `config.data_dir`.
pub fn open_directory(config: &Config) -> Result<Directory, AppError> {
    Directory::open(&config.data_dir, StoreOptions::from_config(&config.store)).map_err(|source| {
        AppError::Store {
            path: config.data_dir.clone(),
            source,
        }
    })
}

/// The exclusive lock on a data dir (`flock` on `data_dir/.lock`): held by `serve` for
/// its whole life and by the CLI while it works on the stores directly, so the two
/// never open the same stores. The kernel lets it go when the process ends, however.
#[derive(Debug)]
pub struct DataDirLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the data dir's lock (making the data dir, 0700, when absent), or says that
/// another process holds it.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, AppError> {
    create_data_dir(dir)?;
    let lock = dir.join(".lock");
    let err = |source| AppError::DataDirLock {
        path: dir.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(err)?;
    use nix::fcntl::{Flock, FlockArg};
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(DataDirLock { _lock: held }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(AppError::DataDirBusy {
            path: dir.to_path_buf(),
            lock,
        }),
        Err((_, errno)) => Err(err(std::io::Error::from(errno))),
    }
}

/// What is wrong with the data dir's mode: other users may list or even write to it.
/// Group access is left alone: Kubernetes gives the volume to the pod's `fsGroup`.
pub fn data_dir_mode_problem(dir: &Path) -> Result<Option<String>, AppError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::metadata(dir) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AppError::DataDir {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    Ok(if mode & 0o002 != 0 {
        Some(format!(
            "mode {mode:04o} lets any user write to it (0700 is best)"
        ))
    } else if mode & 0o005 != 0 {
        Some(format!(
            "mode {mode:04o} lets any user list it (0700 is best)"
        ))
    } else {
        None
    })
}

/// Takes other users' access to the data dir away when this process owns it (a volume
/// root owned by someone else is left as it is, with a warning). What the server
/// creates inside is private either way: `serve` runs with umask 077.
fn tighten_data_dir(dir: &Path) -> Result<(), AppError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(problem) = data_dir_mode_problem(dir)? else {
        return Ok(());
    };
    let meta = std::fs::metadata(dir).map_err(|source| AppError::DataDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        warn!(data_dir = %dir.display(), "{problem}, and it belongs to another user: chmod o-rwx it");
        return Ok(());
    }
    let mode = meta.permissions().mode() & 0o7770;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        AppError::DataDir {
            path: dir.to_path_buf(),
            source,
        }
    })?;
    warn!(data_dir = %dir.display(), "{problem}: changed to {mode:04o}");
    Ok(())
}

/// Descriptors the server needs besides its connections: listeners, the stores' files,
/// Redis, the admin socket.
const SPARE_FILES: u64 = 256;
/// The soft open-files limit is raised at most to this (Linux's default `nr_open`), also
/// when the hard limit is unlimited.
const MAX_OPEN_FILES: u64 = 1 << 20;

/// Raises the soft limit on open files to the hard one, as nginx and Go's runtime do:
/// every connection is a descriptor, and the usual soft default of 1024 makes accepts
/// fail (EMFILE) long before `limits.max_connections` (10 000). Warns when even the
/// hard limit is below what the connection limits allow. Returns the soft limit now.
fn raise_open_files_limit(max_connections: usize) -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!(error = %e, "cannot read the open-files limit");
            return None;
        }
    };
    let target = hard.min(MAX_OPEN_FILES);
    let now = if soft < target {
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => target,
            Err(e) => {
                warn!(error = %e, soft, hard, "cannot raise the open-files limit");
                soft
            }
        }
    } else {
        soft
    };
    let wanted = max_connections as u64 + SPARE_FILES;
    if now < wanted {
        warn!(
            open_files = now,
            max_connections,
            "the open-files limit (ulimit -n) is below limits.max_connections: accepts will \
             fail before it is reached; raise the hard limit (systemd LimitNOFILE) or lower \
             the connection limits"
        );
    }
    Some(now)
}

/// Starts the server: everything is bound and running when this returns. A bad plan,
/// certificate or address stops it before anything is created or bound.
pub async fn start(config: Arc<Config>) -> Result<Running, AppError> {
    tls::install_crypto_provider();
    let plan = Plan::load(&config.provision, &config.auth.argon2)?;
    create_data_dir(&config.data_dir)?;
    tighten_data_dir(&config.data_dir)?;
    let data_lock = lock_data_dir(&config.data_dir)?;
    raise_open_files_limit(config.limits.max_connections);
    let (default, self_signed) = default_cert_paths(&config);
    if self_signed && tls::ensure_self_signed(&default, &config.hostname)? {
        warn!(cert = %default.cert.display(), "no certificate configured: made a self-signed one");
    }
    let tls = Arc::new(TlsManager::load(default, domain_cert_paths(&config))?);
    let directory = Arc::new(open_directory(&config)?);
    let metrics = Arc::new(Metrics::new(config.locks.backend.name())?);
    let (locks, throttle, redis) = coordination(&config, &metrics.lock).await?;
    // A replica of a cluster: the link's certificates and the shared secret must be
    // good before anything is bound; then this replica's copies are announced, so
    // routing works from the first connection.
    let (cluster, secret) = match (config.cluster.enabled(), redis) {
        (true, Some(redis)) => {
            let secret = cluster::load_secret(&config.cluster.secret_file)?;
            let cluster = Arc::new(Cluster::open(&config, redis, metrics.clone())?);
            cluster.tick(&directory).await;
            (Some(cluster), secret)
        }
        _ => (
            None,
            load_or_create_secret(&config.data_dir.join("secret"))?,
        ),
    };
    match &cluster {
        Some(cluster) => provision_clustered(plan, directory.clone(), cluster).await?,
        None => provision(plan, directory.clone()).await?,
    }
    let admin_listener = admin::bind(&config.admin_socket()).await?;
    let listeners = Listeners::bind(&config).await?;
    let metrics_listener = bind_metrics(&config.metrics.listen).await?;
    metrics.touch_commands(metrics::PROTOCOL_POP3, pop3::codec::VERBS);
    metrics.set_certificate_expiry(&tls.expiry());

    let net = Arc::new(net::Context::new(
        config.clone(),
        metrics.clone(),
        TlsAcceptor::from(tls.server_config()),
    ));
    let logins = Accounts {
        directory: directory.clone(),
        throttle,
        hasher: hash_pool(&config)?,
        verified: VerifiedCache::new(
            Duration::from_secs(config.auth.cache_ttl_secs),
            config.auth.cache_entries,
        ),
        hash_params: config.auth.argon2,
        secret,
    };
    let services = Arc::new(Services {
        pop3: Arc::new(pop3::Service {
            net: net.clone(),
            logins: Arc::new(logins),
            locks: locks.clone(),
            cluster: cluster.clone(),
        }),
        mail: Arc::new(smtp::Service {
            net: net.clone(),
            directory: directory.clone(),
            cluster: cluster.clone(),
            unknown_recipients: throttle::Windows::new(
                config.smtp.max_unknown_recipients_per_ip,
                config.smtp.unknown_recipient_window(),
            ),
        }),
        admin: Arc::new(admin::Admin {
            directory: directory.clone(),
            quotas: Quotas::from_config(&config.delivery),
            hashes: config.auth.argon2,
            metrics: metrics.clone(),
            cluster: cluster.clone(),
            locks: locks.clone(),
        }),
        net: net.clone(),
        directory: directory.clone(),
        locks,
        accepting: AtomicBool::new(false),
        last_ready: tokio::sync::Mutex::new(None),
        cluster,
    });
    let running = Running {
        listeners: listeners.local_addrs(),
        metrics: metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
        shutdown: net.shutdown.clone(),
        task: tokio::spawn(run(
            config,
            services,
            listeners,
            admin_listener,
            metrics_listener,
            tls,
            data_lock,
        )),
    };
    Ok(running)
}

/// Runs until shutdown is complete, then flushes the stores.
async fn run(
    config: Arc<Config>,
    services: Arc<Services>,
    listeners: Listeners,
    admin_listener: tokio::net::UnixListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    tls: Arc<TlsManager>,
    data_lock: DataDirLock,
) -> Result<(), AppError> {
    let net = services.net.clone();
    let directory = services.directory.clone();
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        services.admin.clone(),
        net.abort.clone(),
    ));
    let cluster_task = services
        .cluster
        .clone()
        .map(|c| tokio::spawn(cluster_duties(c, directory.clone(), net.abort.clone())));
    // Scrapes and probes keep working while sessions drain; the endpoint stops with them.
    let metrics_task = metrics_listener.map(|l| {
        tokio::spawn(metrics::http::serve(
            l,
            net.metrics.clone(),
            services.clone(),
            net.abort.clone(),
        ))
    });
    let housekeeping = tokio::spawn(housekeeping(
        net.clone(),
        directory.clone(),
        tls,
        services.cluster.clone(),
    ));

    server::run(listeners, services).await;

    net.abort.cancel();
    let _ = admin_task.await;
    if let Some(task) = cluster_task {
        let _ = task.await;
    }
    let _ = housekeeping.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let _ = std::fs::remove_file(config.admin_socket());
    tokio::task::spawn_blocking(move || directory.flush_all())
        .await?
        .map_err(AppError::Flush)?;
    // Only now may the CLI work on the stores directly.
    drop(data_lock);
    info!("stopped");
    Ok(())
}

fn create_data_dir(dir: &Path) -> Result<(), AppError> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| AppError::DataDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

/// Creates the configured domains and accounts that are absent, before any listener.
async fn provision(plan: Plan, directory: Arc<Directory>) -> Result<(), AppError> {
    if plan.domains.is_empty() && plan.accounts.is_empty() {
        return Ok(());
    }
    let report = tokio::task::spawn_blocking(move || plan.apply(&directory)).await??;
    for domain in &report.domains_created {
        info!(%domain, "provisioned domain");
    }
    for address in &report.accounts_created {
        info!(%address, "provisioned account");
    }
    info!(
        domains_created = report.domains_created.len(),
        accounts_created = report.accounts_created.len(),
        accounts_kept = report.accounts_kept,
        "provisioning done"
    );
    Ok(())
}

/// A replica's part in a cluster: announce its copies, heartbeat, re-read rotated link
/// certificates and probe the other replicas, every third of the lock TTL (at least
/// every second), until the end.
async fn cluster_duties(
    cluster: Arc<Cluster>,
    directory: Arc<Directory>,
    abort: CancellationToken,
) {
    let period = (cluster.ttl() / 3).max(Duration::from_secs(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = abort.cancelled() => return,
            _ = tick.tick() => {
                cluster.tick(&directory).await;
                cluster.probe_peers().await;
            }
        }
    }
}

/// `[provision]` on a replica of a cluster: a listed domain is created only by its home
/// (its record, else its pin, else its rendezvous target), and its accounts only there.
async fn provision_clustered(
    plan: Plan,
    directory: Arc<Directory>,
    cluster: &Arc<Cluster>,
) -> Result<(), AppError> {
    if plan.domains.is_empty() {
        return Ok(());
    }
    let mut mine = Vec::new();
    for domain in &plan.domains {
        let home = cluster.provision_home(domain).await?;
        if home != cluster.name() {
            info!(%domain, %home, "provisioning left to the domain's home");
            continue;
        }
        if !directory.has_domain(domain) {
            match cluster.create_here(&directory, domain).await {
                Ok(()) => info!(%domain, "provisioned domain"),
                // Another replica created it first: it is that replica's.
                Err(ClusterError::Exists { home, .. }) if home != cluster.name() => continue,
                Err(ClusterError::Exists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        mine.push(domain.clone());
    }
    provision(plan.only(&mine), directory).await
}

/// The maildrop locks and the login-failure counters: in process, or both in Redis (and
/// the Redis connection, which a cluster shares). A Redis that does not answer at start
/// is logged, not fatal: logins fail with [SYS/TEMP] until it does, and then work
/// without a restart.
async fn coordination(
    config: &Config,
    lock_metrics: &LockMetrics,
) -> Result<(Arc<dyn LockBackend>, Throttle, Option<RedisConn>), AppError> {
    let limits = throttle::Limits::from_config(&config.limits);
    let locks = &config.locks;
    match locks.backend {
        LockBackendKind::Local => {
            let locks: Arc<dyn LockBackend> = Arc::new(LocalLocks::new());
            Ok((locks, Throttle::local(limits), None))
        }
        LockBackendKind::Redis => {
            let conn = RedisConn::open(
                locks.redis_url.expose(),
                locks.redis_ca_file.as_deref(),
                locks.redis_sentinels().as_ref(),
                locks.redis_timeout(),
            )?;
            match conn.ping().await {
                Ok(rtt) => info!(
                    url = conn.url(),
                    ttl_secs = locks.ttl_secs,
                    rtt_us = rtt.as_micros() as u64,
                    "maildrop locks and login throttling in redis"
                ),
                Err(e) => warn!(
                    url = conn.url(),
                    error = %e,
                    "redis unreachable at start: logins fail with [SYS/TEMP] until it answers"
                ),
            }
            let redis_locks: Arc<dyn LockBackend> = Arc::new(RedisLocks::new(
                conn.clone(),
                locks.ttl(),
                lock_metrics.clone(),
            ));
            Ok((
                redis_locks,
                Throttle::redis(conn.clone(), limits),
                Some(conn),
            ))
        }
    }
}

/// Binds `[metrics] listen` (unless empty) and logs it like the other listeners.
async fn bind_metrics(addr: &str) -> Result<Option<tokio::net::TcpListener>, AppError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let bind_error = |source| AppError::MetricsBind {
        addr: addr.to_owned(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    info!(listener = "metrics", addr = %local, "listening");
    Ok(Some(listener))
}

/// The password hashing threads: one per CPU (or `auth.hash_threads`), no more than fit
/// in the hashing memory budget, so a pod's memory limit holds on a node with many CPUs.
fn hash_pool(config: &Config) -> Result<HashPool, AppError> {
    let auth = &config.auth;
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let budget = hash_pool::memory_budget(auth.hash_memory_mib, hash_pool::cgroup_memory_limit());
    let per_thread = auth.argon2.max_memory_bytes();
    let threads = hash_pool::thread_count(auth.hash_threads, cpus, budget, per_thread);
    if auth.hash_threads > threads {
        warn!(
            requested = auth.hash_threads,
            threads, "auth.hash_threads cut to what the hashing memory budget holds"
        );
    }
    info!(
        threads,
        queue = auth.hash_queue,
        budget_mib = budget.map(|b| b / (1024 * 1024)),
        per_thread_mib = per_thread / (1024 * 1024),
        "password hashing pool"
    );
    HashPool::new(threads, auth.hash_queue, auth.argon2)
        .map(|pool| pool.upgrading_legacy(auth.upgrade_legacy_hashes))
        .map_err(AppError::Hasher)
}

/// The server's 32-byte secret, made on first start (mode 0600). Made only when the file
/// does not exist: any other error reading it stops the start, since a new secret would
/// silently change what it keys.
fn load_or_create_secret(path: &Path) -> Result<[u8; 32], AppError> {
    let failed = |message: String| AppError::Secret {
        path: path.to_path_buf(),
        message,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            return <[u8; 32]>::try_from(bytes.as_slice())
                .map_err(|_| failed("not a 32-byte secret; remove it to make a new one".into()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(format!("cannot read: {e}"))),
    }
    let secret: [u8; 32] = rand::random();
    fsutil::write_atomically(path, &secret, 0o600)
        .map_err(|e| failed(format!("cannot create: {e}")))?;
    Ok(secret)
}

/// Open domain stores whose storage gauges are refreshed per housekeeping tick, so a
/// tick's work is bounded however many domains are open (a store counts its usage once,
/// then keeps it current, but recounts after removals).
const STORAGE_DOMAINS_PER_TICK: usize = 4;

/// The per-domain storage gauges of every hosted domain.
///
/// Open stores are refreshed round-robin, at most `STORAGE_DOMAINS_PER_TICK` per tick,
/// and record their usage in their directory when it changed. A closed store cannot
/// change while the server runs, so its gauges are set from the usage it recorded when
/// it was last closed, once per close; a domain that never recorded one (a store of an older
/// release) is opened once to be counted, and records its usage when it closes again.
#[derive(Default)]
struct StorageGauges {
    /// The last open domain refreshed; the next tick starts after it.
    cursor: String,
    /// Closed domains whose gauges are set from their recorded usage.
    from_record: std::collections::BTreeSet<String>,
}

/// Records an open store's usage; `None` when its domain was removed meanwhile: then
/// `forget_domain` has run or is about to, and the failed write of the usage file into
/// the removed directory is no storage problem worth a warning.
fn record_open_usage(
    directory: &Directory,
    name: &str,
    store: &DomainStore,
) -> Option<Result<Usage, StoreError>> {
    let result = store.record_usage();
    directory.has_domain(name).then_some(result)
}

impl StorageGauges {
    /// Blocking (sled, files); call from `spawn_blocking`.
    fn tick(&mut self, directory: &Directory, metrics: &Metrics, cluster: Option<&Cluster>) {
        // In a cluster only a domain's home exports its series; a copy that is not (or
        // no longer) the home's has its series removed.
        let exported = |name: &str| cluster.is_none_or(|c| c.homed_here(name));
        let set = |name: &str, u: Usage| {
            if exported(name) {
                metrics.set_domain_storage(name, u.accounts, u.messages, u.octets)
            } else {
                metrics.forget_domain(name)
            }
        };
        let open = directory.open_domains();
        // `open` is sorted by name: continue after the cursor, wrapping around.
        let start = open.partition_point(|(name, _)| name.as_str() <= self.cursor.as_str());
        let picked: Vec<_> = open[start..]
            .iter()
            .chain(&open[..start])
            .take(STORAGE_DOMAINS_PER_TICK)
            .collect();
        for (name, store) in picked {
            match record_open_usage(directory, name, store) {
                None => {}
                Some(Ok(usage)) => set(name, usage),
                Some(Err(e)) => warn!(domain = %name, error = %e, "counting domain usage failed"),
            }
            self.cursor.clone_from(name);
        }
        let hosted = match directory.list_domains() {
            Ok(hosted) => hosted,
            Err(e) => {
                warn!(error = %e, "listing domains for the storage gauges failed");
                return;
            }
        };
        // `open` is sorted by name.
        let is_open = |d: &str| open.binary_search_by(|(o, _)| o.as_str().cmp(d)).is_ok();
        // A domain open now records its usage again when it closes: read it then.
        self.from_record
            .retain(|d| hosted.binary_search(d).is_ok() && !is_open(d));
        for name in hosted {
            if self.from_record.contains(&name) || is_open(&name) {
                continue;
            }
            let usage = match directory.recorded_usage(&name) {
                Some(usage) => usage,
                None => match directory.domain(&name).and_then(|s| s.record_usage()) {
                    Ok(usage) => {
                        info!(domain = %name, "counted a domain that had no recorded usage");
                        usage
                    }
                    // Removed since it was listed: nothing to count.
                    Err(_) if !directory.has_domain(&name) => continue,
                    Err(e) => {
                        warn!(domain = %name, error = %e, "counting domain usage failed");
                        continue;
                    }
                },
            };
            set(&name, usage);
            self.from_record.insert(name);
        }
    }
}

/// Certificate reload, the certificate and storage gauges, and idle-store closing, until
/// shutdown is complete.
/// Below the free-space reserve, rewrites the open stores whose files hold much more
/// than their live mail (mail was deleted: sled keeps the space inside its files), so the
/// file system gets the space back and delivery resumes (blocking).
fn compact_where_worth_it(directory: &Directory) {
    for (domain, store) in directory.open_domains() {
        match store.worth_compacting() {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                warn!(%domain, error = %e, "cannot tell whether the store needs compacting");
                continue;
            }
        }
        drop(store);
        match directory.compact(&domain) {
            Ok(c) => {
                info!(%domain, before = c.before, after = c.after, "store compacted to give deleted mail's space back")
            }
            Err(StoreError::Sealed(_)) => {
                info!(%domain, "store in use or being moved; compaction tried again later")
            }
            Err(e) => warn!(%domain, error = %e, "store compaction failed; the store is unchanged"),
        }
    }
}

async fn housekeeping(
    net: Arc<net::Context>,
    directory: Arc<Directory>,
    tls: Arc<TlsManager>,
    cluster: Option<Arc<Cluster>>,
) {
    let period = Duration::from_secs(net.config.tls.reload_interval_secs);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let gauges = Arc::new(std::sync::Mutex::new(StorageGauges::default()));
    let mut ended_at_trim = net.metrics.connections_ended();
    loop {
        tokio::select! {
            _ = net.abort.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ended = net.metrics.connections_ended();
        let sessions_ended = ended.saturating_sub(ended_at_trim);
        let tls = tls.clone();
        let directory = directory.clone();
        let metrics = net.metrics.clone();
        let gauges = gauges.clone();
        let cluster = cluster.clone();
        let result = tokio::task::spawn_blocking(move || {
            let reloaded = tls.reload_changed();
            metrics.set_certificate_expiry(&tls.expiry());
            // Counted before closing, so a store is counted at least once while open.
            gauges.lock().unwrap_or_else(|p| p.into_inner()).tick(
                &directory,
                &metrics,
                cluster.as_deref(),
            );
            let closed = directory.close_idle();
            let trim = closed > 0 || sessions_ended >= TRIM_AFTER_SESSIONS;
            if trim {
                release_freed_memory();
            }
            // In a cluster a move may be copying the store, and moving the domain gives
            // a compact copy anyway: compaction is for a server on its own.
            if cluster.is_none() {
                compact_where_worth_it(&directory);
            }
            (reloaded, closed, trim)
        })
        .await;
        if let Ok((_, _, true)) = result {
            ended_at_trim = ended;
        }
        match result {
            Ok((Ok(n), closed, _)) => {
                if n > 0 {
                    info!(replaced = n, "certificates reloaded");
                }
                if closed > 0 {
                    info!(closed, "closed idle domain stores");
                }
            }
            Ok((Err(e), _, _)) => {
                warn!(error = %e, "certificate reload failed; keeping the old one")
            }
            Err(e) => warn!(error = %e, "housekeeping task failed"),
        }
    }
}

/// Sessions that must have ended since the last trim for housekeeping to trim again: a
/// burst of connections leaves their buffers (TLS ones are tens of KiB each) in glibc's
/// arenas, so 5 000 idle connections once opened kept ~85 MiB of RSS after they closed
/// (tests/integration/hostile.rs); a trickle of sessions is not worth the walk.
const TRIM_AFTER_SESSIONS: u64 = 32;

/// Hands memory freed by closed stores and ended sessions back to the kernel. sled frees
/// a closed store's page cache, but glibc keeps the pages in its arenas: measured after
/// an LMTP burst of 200 MB, RSS stayed at 235 MiB with the store closed and fell to
/// 58 MiB after `malloc_trim` (docs/BENCHMARKS.md). Other C libraries return memory
/// themselves.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_freed_memory() {
    // SAFETY: malloc_trim takes no pointers and only walks glibc's own arenas under
    // their locks; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{getrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let now = raise_open_files_limit(100).expect("raised");
        let (soft, after) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        assert_eq!(soft, now);
        assert_eq!(after, hard, "the hard limit is left alone");
        assert!(soft >= hard.min(MAX_OPEN_FILES), "soft {soft}, hard {hard}");
    }

    #[test]
    fn the_secret_is_made_only_when_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret");
        let made = load_or_create_secret(&path).expect("made");
        assert_eq!(load_or_create_secret(&path).expect("read"), made);

        // A file that exists but cannot be read (here ELOOP: a link to itself; EACCES
        // and EIO go the same way) stops the start and is left as it was.
        let looped = dir.path().join("looped");
        std::os::unix::fs::symlink(&looped, &looped).expect("symlink");
        let err = load_or_create_secret(&looped).expect_err("unreadable");
        assert!(err.to_string().contains("cannot read"), "{err}");
        assert!(std::fs::symlink_metadata(&looped)
            .expect("still there")
            .file_type()
            .is_symlink());

        std::fs::write(&path, b"short").expect("write");
        let err = load_or_create_secret(&path).expect_err("wrong size");
        assert!(err.to_string().contains("not a 32-byte secret"), "{err}");
        assert_eq!(std::fs::read(&path).expect("kept"), b"short");
    }

    #[test]
    fn storage_gauges_follow_open_domains_round_robin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let directory = Directory::open(dir.path(), Default::default()).expect("dir");
        let names: Vec<String> = (0..STORAGE_DOMAINS_PER_TICK + 2)
            .map(|i| format!("d{i}.example"))
            .collect();
        for n in &names {
            directory.add_domain(n).expect("add");
            directory.domain(n).expect("open");
        }
        let m = Metrics::new("local").expect("metrics");
        let mut gauges = StorageGauges::default();
        gauges.tick(&directory, &m, None);
        let count = |m: &Metrics| m.render().matches(metrics::DOMAIN_ACCOUNTS).count();
        // HELP, TYPE and one line per counted domain.
        assert_eq!(count(&m), 2 + STORAGE_DOMAINS_PER_TICK);
        gauges.tick(&directory, &m, None);
        assert_eq!(count(&m), 2 + names.len(), "the second tick wraps around");
        directory.remove_domain(&names[0]).expect("remove");
        m.forget_domain(&names[0]);
        gauges.tick(&directory, &m, None);
        assert!(!m.render().contains(&format!("domain=\"{}\"", names[0])));
        assert_eq!(count(&m), 2 + names.len() - 1);
    }

    /// A domain removed while housekeeping counts it (found by the crash rounds: `domain
    /// remove` racing the gauges logged "counting domain usage failed").
    #[test]
    fn a_domain_removed_while_counted_is_skipped_without_a_warning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let directory = Directory::open(dir.path(), Default::default()).expect("dir");
        directory.add_domain("gone.example").expect("add");
        let store = directory.domain("gone.example").expect("open");
        directory.remove_domain("gone.example").expect("remove");
        assert!(
            store.record_usage().is_err(),
            "the usage file cannot be written into the removed directory"
        );
        assert!(record_open_usage(&directory, "gone.example", &store).is_none());
        directory.add_domain("kept.example").expect("add");
        let kept = directory.domain("kept.example").expect("open");
        assert!(matches!(
            record_open_usage(&directory, "kept.example", &kept),
            Some(Ok(_))
        ));
    }

    #[test]
    fn every_hosted_domain_gets_gauges_and_closed_ones_stay_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = StoreOptions {
            idle_close: Duration::ZERO,
            ..StoreOptions::default()
        };
        let directory = Directory::open(dir.path(), opts).expect("dir");
        for name in ["recorded.example", "unrecorded.example"] {
            directory.add_domain(name).expect("add");
        }
        // One closes after use (recording its usage); the other's record is lost, as
        // for a store of an older release.
        let store = directory.domain("recorded.example").expect("open");
        store
            .create_account(
                "u",
                &crate::store::Account::new(crate::auth::Credentials {
                    phc: "x".into(),
                    scram: None,
                    apop_secret: None,
                }),
            )
            .expect("account");
        drop(store);
        assert_eq!(directory.close_idle(), 2);
        let unrecorded = dir.path().join("domains/unrecorded.example");
        std::fs::remove_file(unrecorded.join(crate::store::USAGE_FILE)).expect("rm");

        let m = Metrics::new("local").expect("metrics");
        let mut gauges = StorageGauges::default();
        gauges.tick(&directory, &m, None);
        let text = m.render();
        assert!(
            text.contains("mailgate_domain_accounts{domain=\"recorded.example\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mailgate_domain_messages{domain=\"unrecorded.example\"} 0"),
            "{text}"
        );
        // Only the store without a record was opened, to be counted.
        let open: Vec<String> = directory
            .open_domains()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(open, vec!["unrecorded.example".to_owned()]);
        assert_eq!(directory.close_idle(), 1);
        assert!(directory.recorded_usage("unrecorded.example").is_some());
        gauges.tick(&directory, &m, None);
        assert!(directory.open_domains().is_empty());
    }
}
