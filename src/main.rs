//! The `mailgate` command line: `serve`, the operator commands (through the admin
//! socket when a server runs, directly on the data dir otherwise) and `check-config`.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mailgate::admin::{self, exit, Request, Response};
use mailgate::auth::{self, Credentials};
use mailgate::config::{Config, LockBackendKind};
use mailgate::delivery::Quotas;
use mailgate::locks::{LocalLocks, LockBackend, RedisLocks};
use mailgate::metrics::{self, Metrics};
use mailgate::provision::Plan;
use mailgate::redis_conn::RedisConn;
use mailgate::server::{self, Listeners, Shared};
use mailgate::store::{Address, Directory};
use mailgate::throttle::Throttle;
use mailgate::tls::{self, CertPaths, TlsManager};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "mailgate",
    version,
    about = "TLS-first multi-tenant mail gateway"
)]
struct Cli {
    /// Configuration file (TOML); `MAILGATE_SECTION__KEY` variables override it. The
    /// container image sets `MAILGATE_CONFIG`, so `kubectl exec ... -- mailgate user add`
    /// finds the same file as `serve`.
    #[arg(long, global = true, value_name = "FILE", env = "MAILGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every configured listener until SIGTERM/SIGINT, then drain.
    Serve,
    /// Manage hosted domains.
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Manage accounts.
    #[command(subcommand)]
    User(UserCmd),
    /// Deliver one RFC 5322 message from stdin (exit 0, 67 unknown user, 75 try later).
    Deliver {
        /// Envelope sender, recorded as Return-Path.
        #[arg(long, short = 'f')]
        from: Option<String>,
        #[arg(required = true)]
        recipients: Vec<String>,
    },
    /// Validate configuration and certificates, and reach Redis when locks live there.
    CheckConfig,
    /// Print the argon2id PHC hash of a password, for `[provision] accounts_file`.
    HashPassword {
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Subcommand)]
enum DomainCmd {
    Add { name: String },
    List,
    Remove { name: String },
}

#[derive(Args)]
struct PasswordArgs {
    /// Read the password from the first line of stdin.
    #[arg(long)]
    password_stdin: bool,
    /// Also keep the password as an APOP secret (stored reversibly, hence opt-in).
    #[arg(long)]
    apop: bool,
}

#[derive(Subcommand)]
enum UserCmd {
    Add {
        address: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    Passwd {
        address: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
    Remove {
        address: String,
    },
    List {
        domain: Option<String>,
    },
    /// Set an account's maildrop quota: octets with an optional K/M/G suffix (1024-based),
    /// `unlimited`, or `default` for `delivery.account_quota_bytes`.
    Quota {
        address: String,
        limit: String,
    },
}

/// Parses `mailgate user quota`'s limit: `None` for `default`, `Some(0)` for `unlimited`.
fn parse_quota(limit: &str) -> Result<Option<u64>> {
    match limit.to_ascii_lowercase().as_str() {
        "default" => return Ok(None),
        "unlimited" => return Ok(Some(0)),
        _ => {}
    }
    let (digits, unit) = match limit.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&limit[..i], c.to_ascii_uppercase()),
        _ => (limit, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => bail!("quota {limit:?}: unit must be K, M, G or T"),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("quota {limit:?}: not a number of octets"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .with_context(|| format!("quota {limit:?} is too large"))?;
    if bytes == 0 {
        bail!("quota 0: use `unlimited` for no limit");
    }
    Ok(Some(bytes))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Cmd::Serve);
    init_logging(serving);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("mailgate: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(serving: bool) {
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAILGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> Result<u8> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Cmd::Serve => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(Arc::new(config)))?;
            Ok(0)
        }
        Cmd::CheckConfig => check_config(&config),
        Cmd::HashPassword { password_stdin } => {
            let password = read_password(password_stdin)?;
            println!(
                "{}",
                auth::make_credentials(&password, &config.auth.argon2)?.phc
            );
            Ok(0)
        }
        Cmd::Domain(cmd) => {
            let request = match cmd {
                DomainCmd::Add { name } => Request::DomainAdd { name },
                DomainCmd::List => Request::DomainList,
                DomainCmd::Remove { name } => Request::DomainRemove { name },
            };
            admin_command(&config, request, None)
        }
        Cmd::User(cmd) => {
            let request = match cmd {
                UserCmd::Add { address, password } => Request::UserAdd {
                    credentials: credentials(&config, &address, &password)?,
                    address,
                },
                UserCmd::Passwd { address, password } => Request::UserPasswd {
                    credentials: credentials(&config, &address, &password)?,
                    address,
                },
                UserCmd::Remove { address } => Request::UserRemove { address },
                UserCmd::List { domain } => Request::UserList { domain },
                UserCmd::Quota { address, limit } => Request::UserQuota {
                    bytes: parse_quota(&limit)?,
                    address,
                },
            };
            admin_command(&config, request, None)
        }
        Cmd::Deliver { from, recipients } => admin_command(
            &config,
            Request::Deliver { from, recipients },
            Some(Box::new(std::io::stdin().lock())),
        ),
    }
}

/// Reads the password and hashes it here, so it never crosses the admin socket.
fn credentials(config: &Config, address: &str, args: &PasswordArgs) -> Result<Credentials> {
    Address::parse(address).with_context(|| format!("invalid address {address:?}"))?;
    let password = read_password(args.password_stdin)?;
    let mut creds = auth::make_credentials(&password, &config.auth.argon2)?;
    if args.apop {
        creds.apop_secret = Some(password);
    }
    Ok(creds)
}

/// The first line of stdin, without its line end; `--password-stdin` is required so a
/// password is never expected on the command line.
fn read_password(password_stdin: bool) -> Result<String> {
    if !password_stdin {
        bail!("missing password: pass --password-stdin and write the password to stdin");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("missing password: stdin was empty");
    }
    Ok(password.to_owned())
}

/// Sends a request to the running server, or runs it on the data dir when none runs.
fn admin_command(config: &Config, request: Request, mut body: Option<Box<dyn Read>>) -> Result<u8> {
    let socket = config.admin_socket();
    let response = match admin::call(
        &socket,
        &request,
        body.as_mut().map(|b| &mut **b as &mut dyn Read),
    )? {
        Some(r) => r,
        None => {
            let directory = Directory::open(&config.data_dir, config.store_options())
                .with_context(|| format!("opening data dir {}", config.data_dir.display()))?;
            let body = body.unwrap_or_else(|| Box::new(std::io::empty()));
            let quotas = Quotas::from_config(&config.delivery);
            let r = admin::execute(&directory, request, body, quotas, None);
            directory.flush_all()?;
            r
        }
    };
    Ok(print_response(&response))
}

fn print_response(r: &Response) -> u8 {
    for line in &r.lines {
        println!("{line}");
    }
    if let Some(e) = &r.error {
        eprintln!("mailgate: {e}");
    }
    if r.ok {
        0
    } else if r.exit_code == 0 {
        exit::SOFTWARE
    } else {
        r.exit_code
    }
}

fn default_cert_paths(config: &Config) -> (CertPaths, bool) {
    let (cert, key, self_signed) = config.default_cert();
    (CertPaths { cert, key }, self_signed)
}

fn domain_cert_paths(config: &Config) -> std::collections::BTreeMap<String, CertPaths> {
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

fn check_config(config: &Config) -> Result<u8> {
    tls::install_crypto_provider();
    let (default, self_signed) = default_cert_paths(config);
    if self_signed && !(default.cert.exists() && default.key.exists()) {
        println!(
            "tls: no certificate configured; a self-signed one will be made at {}",
            default.cert.display()
        );
        let domains = domain_cert_paths(config);
        // The default pair does not exist yet: stand the first domain's in for it.
        if let Some(first) = domains.values().next().cloned() {
            TlsManager::load(first, domains).context("loading per-domain certificates")?;
        }
    } else {
        let manager =
            TlsManager::load(default, domain_cert_paths(config)).context("loading certificates")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for (name, not_after) in manager.expiry() {
            if not_after < now {
                bail!("certificate {name} has expired");
            }
            println!(
                "tls: certificate {name} valid for {} more days",
                (not_after - now) / 86_400
            );
        }
    }
    check_data_dir(&config.data_dir)?;
    check_provision(config)?;
    check_locks(config)?;
    if config.delivery.postmaster.is_empty() {
        println!(
            "delivery.postmaster: unset (mail to postmaster is refused for domains without a postmaster account; RFC 5321 asks for it)"
        );
    } else {
        println!("delivery.postmaster: {}", config.delivery.postmaster);
    }
    if config.lmtp.listen.starts_with("unix:") {
        server::socket_group(&config.lmtp.socket_group).map_err(anyhow::Error::msg)?;
    }
    for (name, addr) in [
        ("pop3.listen", &config.pop3.listen),
        ("pop3.tls_listen", &config.pop3.tls_listen),
        ("lmtp.listen", &config.lmtp.listen),
        ("smtp.listen", &config.smtp.listen),
        ("metrics.listen", &config.metrics.listen),
    ] {
        if addr.is_empty() {
            println!("{name}: disabled");
        } else {
            println!("{name}: {addr}");
        }
    }
    println!("configuration OK");
    Ok(0)
}

/// Reads the provisioning plan as `serve` would, so a bad accounts file fails here.
fn check_provision(config: &Config) -> Result<()> {
    let plan = Plan::load(&config.provision)?;
    if !plan.domains.is_empty() || config.provision.accounts_file.is_some() {
        println!(
            "provision: {} domain(s), {} account(s) created at start when absent",
            plan.domains.len(),
            plan.accounts.len()
        );
    }
    Ok(())
}

/// Reports where locks live; for Redis, that it answers (the URL shown redacted).
fn check_locks(config: &Config) -> Result<()> {
    let locks = &config.locks;
    match locks.backend {
        LockBackendKind::Local => {
            println!("locks: local (in process; correct for a single replica only)");
            Ok(())
        }
        LockBackendKind::Redis => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let url = locks.redis_url.to_string();
            let rtt = runtime.block_on(async {
                let conn = RedisConn::open(
                    locks.redis_url.expose(),
                    locks.redis_ca_file.as_deref(),
                    locks.redis_timeout(),
                )?;
                conn.ping().await
            });
            match rtt {
                Ok(rtt) => {
                    println!(
                        "locks: redis at {url} reachable ({:.1} ms), lock TTL {} s",
                        rtt.as_secs_f64() * 1000.0,
                        locks.ttl_secs
                    );
                    Ok(())
                }
                Err(e) => bail!("locks: redis at {url} unreachable: {e}"),
            }
        }
    }
}

fn check_data_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        let meta = std::fs::metadata(dir).with_context(|| format!("data_dir {}", dir.display()))?;
        if !meta.is_dir() {
            bail!("data_dir {} is not a directory", dir.display());
        }
        if meta.permissions().readonly() {
            bail!("data_dir {} is not writable", dir.display());
        }
        println!("data_dir: {}", dir.display());
    } else {
        println!("data_dir: {} (created at first start)", dir.display());
    }
    Ok(())
}

fn create_data_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating data_dir {}", dir.display()))?;
    }
    Ok(())
}

async fn serve(config: Arc<Config>) -> Result<()> {
    tls::install_crypto_provider();
    let plan = Plan::load(&config.provision)?;
    create_data_dir(&config.data_dir)?;
    let (default, self_signed) = default_cert_paths(&config);
    if self_signed && tls::ensure_self_signed(&default, &config.hostname)? {
        warn!(cert = %default.cert.display(), "no certificate configured: made a self-signed one");
    }
    let tls = Arc::new(
        TlsManager::load(default, domain_cert_paths(&config)).context("loading certificates")?,
    );
    let directory = Arc::new(
        Directory::open(&config.data_dir, config.store_options())
            .with_context(|| format!("opening data dir {}", config.data_dir.display()))?,
    );
    provision(plan, directory.clone()).await?;
    let admin_listener = admin::bind(&config.admin_socket()).await?;
    let listeners = Listeners::bind(&config).await?;
    let metrics_listener = bind_metrics(&config.metrics.listen).await?;
    let metrics = Arc::new(Metrics::new(config.locks.backend.name())?);
    metrics.set_certificate_expiry(&tls.expiry());
    let (locks, throttle) = coordination(&config, &metrics.lock).await?;
    let secret = load_or_create_secret(&config.data_dir.join("secret"))?;
    let shared = Arc::new(Shared::new(
        config.clone(),
        directory.clone(),
        locks,
        throttle,
        tls.clone(),
        secret,
        metrics.clone(),
    )?);

    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        directory.clone(),
        Quotas::from_config(&config.delivery),
        metrics,
        shared.abort.clone(),
    ));
    // Scrapes and probes keep working while sessions drain; the endpoint stops with them.
    let metrics_task = metrics_listener.map(|l| {
        tokio::spawn(metrics::http::serve(
            l,
            shared.clone(),
            shared.abort.clone(),
        ))
    });
    let housekeeping = tokio::spawn(housekeeping(shared.clone()));
    let signals = tokio::spawn(wait_for_signal(shared.clone()));

    server::run(listeners, shared.clone()).await;

    shared.abort.cancel();
    signals.abort();
    let _ = admin_task.await;
    let _ = housekeeping.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let _ = std::fs::remove_file(config.admin_socket());
    let dir = directory.clone();
    tokio::task::spawn_blocking(move || dir.flush_all()).await??;
    info!("stopped");
    Ok(())
}

/// Creates the configured domains and accounts that are absent, before any listener.
async fn provision(plan: Plan, directory: Arc<Directory>) -> Result<()> {
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

/// The maildrop locks and the login-failure counters: in process, or both in Redis. A
/// Redis that does not answer at start is logged, not fatal: logins fail with
/// [SYS/TEMP] until it does, and then work without a restart.
async fn coordination(
    config: &Config,
    lock_metrics: &mailgate::metrics::LockMetrics,
) -> Result<(Arc<dyn LockBackend>, Throttle)> {
    let limits = config.limits.throttle();
    let locks = &config.locks;
    match locks.backend {
        LockBackendKind::Local => {
            let locks: Arc<dyn LockBackend> = Arc::new(LocalLocks::new());
            Ok((locks, Throttle::local(limits)))
        }
        LockBackendKind::Redis => {
            let conn = RedisConn::open(
                locks.redis_url.expose(),
                locks.redis_ca_file.as_deref(),
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
            Ok((redis_locks, Throttle::redis(conn, limits)))
        }
    }
}

/// Binds `[metrics] listen` (unless empty) and logs it like the other listeners.
async fn bind_metrics(addr: &str) -> Result<Option<tokio::net::TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (metrics)"))?;
    let local = listener.local_addr()?;
    info!(listener = "metrics", addr = %local, "listening");
    Ok(Some(listener))
}

/// The server's 32-byte secret, made on first start (mode 0600).
fn load_or_create_secret(path: &Path) -> Result<[u8; 32]> {
    if let Ok(bytes) = std::fs::read(path) {
        return <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
            anyhow::anyhow!(
                "{} is not a 32-byte secret; remove it to make a new one",
                path.display()
            )
        });
    }
    let secret: [u8; 32] = rand::random();
    mailgate::fsutil::write_atomically(path, &secret, 0o600)
        .with_context(|| format!("creating {}", path.display()))?;
    Ok(secret)
}

/// Certificate reload, the certificate and storage gauges, and idle-store closing, until
/// shutdown is complete.
async fn housekeeping(shared: Arc<Shared>) {
    let period = std::time::Duration::from_secs(shared.config.tls.reload_interval_secs);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.abort.cancelled() => return,
            _ = tick.tick() => {}
        }
        let tls = shared.tls.clone();
        let directory = shared.directory.clone();
        let metrics = shared.metrics.clone();
        let result = tokio::task::spawn_blocking(move || {
            let reloaded = tls.reload_changed();
            metrics.set_certificate_expiry(&tls.expiry());
            // Counted before closing, so a store is counted at least once while open.
            metrics.refresh_storage(&directory);
            let closed = directory.close_idle();
            if closed > 0 {
                release_freed_memory();
            }
            (reloaded, closed)
        })
        .await;
        match result {
            Ok((Ok(n), closed)) => {
                if n > 0 {
                    info!(replaced = n, "certificates reloaded");
                }
                if closed > 0 {
                    info!(closed, "closed idle domain stores");
                }
            }
            Ok((Err(e), _)) => warn!(error = %e, "certificate reload failed; keeping the old one"),
            Err(e) => warn!(error = %e, "housekeeping task failed"),
        }
    }
}

/// Hands memory freed by closed stores back to the kernel. sled frees a closed store's
/// page cache, but glibc keeps the pages in its arenas: measured after an LMTP burst of
/// 200 MB, RSS stayed at 235 MiB with the store closed and fell to 58 MiB after
/// `malloc_trim` (docs/BENCHMARKS.md). Other C libraries return memory themselves.
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

async fn wait_for_signal(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "shutdown requested"),
        _ = int.recv() => info!(signal = "SIGINT", "shutdown requested"),
    }
    shared.shutdown.cancel();
}
