//! The one configuration tree: built-in defaults < TOML file < `MAILGATE_SECTION__KEY`
//! environment variables, validated once and then shared read-only as `Arc<Config>`.
//! Reads no sockets and opens no stores.

use crate::auth::HashParams;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "configuration file {0} does not exist: expected --config or MAILGATE_CONFIG to name an existing file"
    )]
    MissingFile(PathBuf),
    #[error("invalid configuration: {}", describe(.0))]
    Figment(Box<figment::Error>),
    #[error("invalid configuration: `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// A figment error as figment words it, except that a file is named as it was given:
/// figment shows it relative to the working directory when that is shorter, so the same
/// mistake would read differently depending on where the command ran.
fn describe(error: &figment::Error) -> String {
    let each = error.clone().into_iter().map(|e| {
        let mut text = e.kind.to_string();
        if let (Some(profile), Some(md)) = (&e.profile, &e.metadata) {
            if !e.path.is_empty() {
                text.push_str(&format!(" for key {:?}", md.interpolate(profile, &e.path)));
            }
        }
        match e.metadata.as_ref().map(|md| (md, &md.source)) {
            Some((md, Some(figment::Source::File(path)))) => {
                text.push_str(&format!(" in {} {}", path.display(), md.name));
            }
            Some((md, Some(source))) => text.push_str(&format!(" in {source} {}", md.name)),
            Some((md, None)) => text.push_str(&format!(" in {}", md.name)),
            None => {}
        }
        text
    });
    each.collect::<Vec<_>>().join("\n")
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        ConfigError::Figment(Box::new(e))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Root of all state: `domains/<domain>/` stores, the admin socket, the
    /// self-signed certificate made on first start.
    pub data_dir: PathBuf,
    /// Name used in the greeting (and, later, in Received: headers).
    pub hostname: String,
    pub pop3: Pop3Config,
    pub lmtp: LmtpConfig,
    pub smtp: SmtpConfig,
    pub delivery: DeliveryConfig,
    pub tls: TlsConfig,
    pub locks: LocksConfig,
    pub limits: LimitsConfig,
    pub store: StoreConfig,
    pub auth: AuthConfig,
    pub metrics: MetricsConfig,
    pub provision: ProvisionConfig,
    pub proxy_protocol: ProxyProtocolConfig,
    pub cluster: ClusterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            hostname: "localhost".into(),
            pop3: Pop3Config::default(),
            lmtp: LmtpConfig::default(),
            smtp: SmtpConfig::default(),
            delivery: DeliveryConfig::default(),
            tls: TlsConfig::default(),
            locks: LocksConfig::default(),
            limits: LimitsConfig::default(),
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            metrics: MetricsConfig::default(),
            provision: ProvisionConfig::default(),
            proxy_protocol: ProxyProtocolConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3Config {
    /// Cleartext listener offering STLS; empty disables it.
    pub listen: String,
    /// Implicit-TLS (POP3S) listener; empty disables it.
    pub tls_listen: String,
    /// USER/PASS/AUTH before TLS. Off by default: passwords must not cross the wire in clear.
    pub allow_plaintext_auth: bool,
    /// Offer APOP (a greeting timestamp) for accounts that opted in with an APOP secret.
    pub apop: bool,
    /// Replace NUL octets in messages sent to clients (Dovecot's `outlook-no-nuls`).
    pub replace_nul: bool,
    /// LAST (RFC 1460). Off: `-ERR`, and clients use UIDL. On: messages retrieved in a
    /// session that ends in UPDATE are marked seen in the store, and LAST is the highest
    /// seen message number, across sessions.
    pub last: bool,
    /// Connections on both POP3 listeners together at once, within
    /// `limits.max_connections`.
    pub max_connections: usize,
}

impl Default for Pop3Config {
    fn default() -> Self {
        Pop3Config {
            listen: "0.0.0.0:110".into(),
            tls_listen: "0.0.0.0:995".into(),
            allow_plaintext_auth: false,
            apop: false,
            replace_nul: false,
            last: false,
            max_connections: 8000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmtpConfig {
    /// LMTP listener for MTAs (RFC 2033): `address:port` or `unix:/path/to/socket`;
    /// empty disables it. LMTP has no authentication: keep it on loopback, a unix
    /// socket or a network only the MTA reaches.
    pub listen: String,
    /// Permissions of the unix socket, octal. The MTA's user needs write access: put it
    /// in `socket_group`, or widen the mode.
    pub socket_mode: String,
    /// Group of the unix socket (a name or a numeric gid), e.g. `postfix`; empty keeps
    /// the server's own group. Changing to a group the server is not in needs root.
    pub socket_group: String,
    /// Client addresses (CIDRs or single addresses) allowed to use LMTP over TCP; any
    /// other gets `421 4.7.1` and is closed. LMTP has no authentication: this is the
    /// server's own check behind the firewall's. The unix socket is guarded by its mode.
    pub allow_from: Vec<Network>,
    /// Connections on this listener at once, within `limits.max_connections`.
    pub max_connections: usize,
}

impl Default for LmtpConfig {
    fn default() -> Self {
        LmtpConfig {
            listen: "127.0.0.1:24".into(),
            socket_mode: "0660".into(),
            socket_group: String::new(),
            allow_from: vec![Network::loopback_v4(), Network::loopback_v6()],
            max_connections: 500,
        }
    }
}

impl LmtpConfig {
    /// `socket_mode` as permission bits.
    pub fn socket_mode_bits(&self) -> Result<u32, String> {
        u32::from_str_radix(&self.socket_mode, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| format!("{:?} is not an octal mode like \"0660\"", self.socket_mode))
    }

    /// Whether a client at `ip` may use LMTP over TCP. An IPv4 client on a dual-stack
    /// socket (`::ffff:10.1.2.3`) counts as its IPv4 address.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow_from.iter().any(|n| n.0.contains(&ip))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Inbound SMTP (MX) listener for hosted domains only, with STARTTLS; empty (the
    /// default) disables it.
    pub listen: String,
    /// Connections on this listener at once, within `limits.max_connections`: keep the
    /// per-listener caps' sum at most that, and no listener can starve another.
    pub max_connections: usize,
    /// Refused recipients (`550`: no such user, relaying denied) a connection, or a client
    /// address within `unknown_recipient_window_secs`, gets at full speed; each further
    /// one waits `unknown_recipient_delay_ms`. Guessing account names costs time.
    pub unknown_recipients_before_delay: u32,
    pub unknown_recipient_delay_ms: u64,
    /// Refused recipients in one connection (RSET does not reset it) after which it is
    /// closed with `421 4.7.0`; 0 turns this off.
    pub max_unknown_recipients: u32,
    /// Refused recipients from one client address within the window after which its
    /// further RCPTs get `421 4.7.0` (and the connection closes) before any lookup; 0
    /// turns this off.
    pub max_unknown_recipients_per_ip: u32,
    pub unknown_recipient_window_secs: u64,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: String::new(),
            max_connections: 1500,
            unknown_recipients_before_delay: 3,
            unknown_recipient_delay_ms: 1000,
            max_unknown_recipients: 10,
            max_unknown_recipients_per_ip: 50,
            unknown_recipient_window_secs: 600,
        }
    }
}

impl SmtpConfig {
    pub fn unknown_recipient_delay(&self) -> Duration {
        Duration::from_millis(self.unknown_recipient_delay_ms)
    }
    pub fn unknown_recipient_window(&self) -> Duration {
        Duration::from_secs(self.unknown_recipient_window_secs)
    }
}

/// Limits of mail coming in over LMTP and SMTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Largest message accepted, in octets as stored (advertised as SIZE).
    pub max_message_bytes: u64,
    /// Most recipients in one transaction; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Default size of every maildrop, in octets; 0 = unlimited. `mailgate user quota`
    /// overrides it per account.
    pub account_quota_bytes: u64,
    /// Size of all maildrops of a domain together, in octets; 0 = unlimited.
    pub domain_quota_bytes: u64,
    /// A client silent this long is disconnected with `421` (RFC 5321 §4.5.3.2: 5 min).
    pub idle_timeout_secs: u64,
    /// Longest a whole transaction (MAIL FROM to the end of DATA) may take.
    pub transaction_timeout_secs: u64,
    /// Where mail for `postmaster` goes (RFC 5321 §4.5.1: every hosted domain must take
    /// it, and bare `<postmaster>` too): a hosted account, used for the domains that have
    /// no `postmaster` account of their own. Empty: such mail is refused (550 5.1.1).
    pub postmaster: String,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            max_message_bytes: 50 * 1024 * 1024,
            max_recipients: 100,
            account_quota_bytes: 0,
            domain_quota_bytes: 0,
            idle_timeout_secs: 300,
            transaction_timeout_secs: 1800,
            postmaster: String::new(),
        }
    }
}

impl DeliveryConfig {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn transaction_timeout(&self) -> Duration {
        Duration::from_secs(self.transaction_timeout_secs)
    }
}

/// Where a listener binds: a TCP address or a unix socket path (`unix:/path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// Parses a listen setting; `None` for an empty (disabled) one.
    pub fn parse(value: &str, unix_allowed: bool) -> Result<Option<ListenAddr>, String> {
        if value.is_empty() {
            return Ok(None);
        }
        if let Some(path) = value.strip_prefix("unix:") {
            if !unix_allowed {
                return Err(format!("{value:?}: a unix socket is not allowed here"));
            }
            if path.is_empty() || !path.starts_with('/') {
                return Err(format!("{value:?}: a unix socket needs an absolute path"));
            }
            return Ok(Some(ListenAddr::Unix(PathBuf::from(path))));
        }
        value
            .parse::<SocketAddr>()
            .map(|a| Some(ListenAddr::Tcp(a)))
            .map_err(|_| format!("{value:?} is not an address:port (use [::]:110 for IPv6)"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// HTTP listener for `/metrics`, `/healthz` and `/readyz`; empty disables it. Serves
    /// no secrets, but put it on an address only the monitoring network reaches.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "0.0.0.0:9898".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain; with `key` unset too, a self-signed pair is made under
    /// `data_dir/tls/` on first start.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Per-domain certificates chosen by SNI.
    pub domains: BTreeMap<String, CertFiles>,
    /// How often certificate files are checked for changes (and idle stores closed).
    pub reload_interval_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            domains: BTreeMap::new(),
            reload_interval_secs: crate::tls::RELOAD_INTERVAL.as_secs(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Domains and accounts `serve` creates at start when they are absent (see `provision`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisionConfig {
    /// Hosted domains to create when absent; existing ones are left alone.
    pub domains: Vec<String>,
    /// File of `address PHC-hash` lines (argon2id); each account is created when absent,
    /// never changed when present. Every address's domain must be in `domains`.
    pub accounts_file: Option<PathBuf>,
}

/// Several replicas serving the same domains: each domain has one home replica (recorded
/// in Redis), and every replica forwards what belongs to another over a mutual-TLS
/// replica-to-replica listener. Off while `name` is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This replica's name, one of `peers`; empty (the default): not clustered.
    pub name: String,
    /// The replica-to-replica listener: mutual TLS with `ca`, nothing else.
    pub listen: String,
    /// This replica's certificate chain and key (PEM), presented both as a server and as
    /// a client; it must name this replica (DNS SAN = `name`).
    pub cert: String,
    pub key: String,
    /// The private cluster CA (PEM): a peer must present a certificate it signed.
    pub ca: String,
    /// The cluster-wide server secret (at least 32 bytes), the same file on every
    /// replica, so stand-in answers for unknown users match on every replica.
    pub secret_file: String,
    /// Longest a connection to a peer (TCP and TLS) may take before its domains are
    /// answered with a temporary failure.
    pub connect_timeout_ms: u64,
    /// Every replica, this one included: name = "host:port" of its `listen`.
    pub peers: BTreeMap<String, String>,
    /// Optional: domain = replica name, the home given to the domain when it is created.
    pub pins: BTreeMap<String, String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: String::new(),
            listen: "0.0.0.0:7025".into(),
            cert: String::new(),
            key: String::new(),
            ca: String::new(),
            secret_file: String::new(),
            connect_timeout_ms: 2000,
            peers: BTreeMap::new(),
            pins: BTreeMap::new(),
        }
    }
}

impl ClusterConfig {
    /// Whether this replica runs in a cluster.
    pub fn enabled(&self) -> bool {
        !self.name.is_empty()
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

/// A replica name: what a peer certificate must carry as a DNS name, so lowercase
/// letters, digits and inner hyphens (a StatefulSet pod name).
fn valid_replica_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Where maildrop locks and login-failure counters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockBackendKind {
    /// In process: correct for one replica only.
    Local,
    /// In Redis, shared by every replica that uses the same `redis_url`.
    Redis,
}

impl LockBackendKind {
    /// The name used in the config file, and as the `backend` label of the lock metrics.
    pub fn name(self) -> &'static str {
        match self {
            LockBackendKind::Local => "local",
            LockBackendKind::Redis => "redis",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocksConfig {
    pub backend: LockBackendKind,
    /// `redis://[user:password@]host:port/db` or `rediss://...` (TLS); used when `backend`
    /// is `redis`. Its password never reaches a log or an error message.
    pub redis_url: RedisUrl,
    /// PEM CA certificates trusted for `rediss://` instead of the system roots.
    pub redis_ca_file: Option<PathBuf>,
    /// Redis Sentinel addresses (`host:port`): when set, the master is the one these name
    /// as `redis_sentinel_master` and the connection follows a failover; `redis_url` then
    /// gives only the database, the credentials and TLS. Empty: `redis_url`'s host.
    pub redis_sentinels: Vec<String>,
    /// The name the sentinels monitor the master under; required with `redis_sentinels`.
    pub redis_sentinel_master: String,
    /// Lifetime of a Redis lock without renewal: how long a crashed replica's maildrops
    /// stay locked. Sessions renew every third of it.
    pub ttl_secs: u64,
    /// Bound on every Redis call: with Redis slow or down, a login fails after at most
    /// about this long.
    pub redis_timeout_ms: u64,
}

impl Default for LocksConfig {
    fn default() -> Self {
        LocksConfig {
            backend: LockBackendKind::Local,
            redis_url: RedisUrl::new("redis://127.0.0.1:6379/0"),
            redis_ca_file: None,
            redis_sentinels: Vec::new(),
            redis_sentinel_master: String::new(),
            ttl_secs: 30,
            redis_timeout_ms: 1000,
        }
    }
}

impl LocksConfig {
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }
    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }
    /// The Sentinel set to ask for the master, or `None` for `redis_url`'s host.
    pub fn redis_sentinels(&self) -> Option<crate::redis_conn::Sentinels> {
        (!self.redis_sentinels.is_empty()).then(|| crate::redis_conn::Sentinels {
            addrs: self.redis_sentinels.clone(),
            master: self.redis_sentinel_master.clone(),
        })
    }
}

/// A Redis URL that may hold a password: `Debug` and `Display` show it redacted, so
/// printing the configuration cannot leak it; `expose` is for the Redis client only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn new(url: &str) -> RedisUrl {
        RedisUrl(url.to_owned())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", crate::redis_conn::redact_url(&self.0))
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::redis_conn::redact_url(&self.0))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// RFC 1939 §3: the autologout timer must be at least 10 minutes; shorter values are
    /// for tests.
    pub idle_timeout_secs: u64,
    pub tls_handshake_timeout_secs: u64,
    /// Pause before answering a failed login.
    pub auth_failure_delay_ms: u64,
    /// Failed logins in one connection before it is closed.
    pub max_auth_failures: u32,
    /// Failed logins per client IP within `auth_failure_window_secs` before further
    /// logins from it are refused with [LOGIN-DELAY].
    pub max_auth_failures_per_ip: u32,
    /// Failed logins for one login name (existing or not) within the window before
    /// further logins to it are refused with [LOGIN-DELAY]; 0 turns this off. Counted in
    /// Redis across replicas when `locks.backend` is `redis`.
    pub max_auth_failures_per_account: u32,
    pub auth_failure_window_secs: u64,
    /// Unknown or malformed commands in one connection before it is closed.
    pub max_bad_commands: u32,
    /// How long sessions may finish after SIGTERM before they are closed without UPDATE.
    pub shutdown_grace_secs: u64,
    /// A POP3 session not logged in this long after it was accepted is told `-ERR` and
    /// closed, however busy it keeps the connection (the idle timeout alone lets a
    /// client that sends CAPA now and then hold a connection for ever).
    pub login_timeout_secs: u64,
    /// IPv6 clients count as their network of this prefix length for the per-IP
    /// connection limit and the per-IP failed-login throttle: one host usually holds a
    /// whole /64, so counting single addresses limits nothing. 128 counts addresses.
    pub ipv6_prefix_len: u8,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            max_connections_per_ip: 100,
            idle_timeout_secs: 600,
            tls_handshake_timeout_secs: 30,
            auth_failure_delay_ms: 2000,
            max_auth_failures: 3,
            max_auth_failures_per_ip: 20,
            max_auth_failures_per_account: 20,
            auth_failure_window_secs: 300,
            max_bad_commands: 10,
            shutdown_grace_secs: 10,
            login_timeout_secs: 60,
            ipv6_prefix_len: 64,
        }
    }
}

impl LimitsConfig {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.tls_handshake_timeout_secs)
    }
    pub fn auth_failure_delay(&self) -> Duration {
        Duration::from_millis(self.auth_failure_delay_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
    pub fn auth_failure_window(&self) -> Duration {
        Duration::from_secs(self.auth_failure_window_secs)
    }
    pub fn login_timeout(&self) -> Duration {
        Duration::from_secs(self.login_timeout_secs)
    }
}

/// The address a client's connections and failed logins are counted under: IPv4 as it
/// is (an IPv4-mapped IPv6 address, `::ffff:a.b.c.d`, counts as IPv4), IPv6 as its
/// network of `ipv6_prefix_len` bits (host bits zero).
pub fn client_group(ip: IpAddr, ipv6_prefix_len: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u32::from(ipv6_prefix_len.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
        v4 => v4,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// sled page cache of each open domain store.
    pub cache_capacity_mib: u64,
    /// A domain store unused this long is closed (each open store costs a thread and a cache).
    pub idle_close_secs: u64,
    /// Free space to keep on the data dir's file system: below it deliveries and new
    /// accounts are refused (`452 4.3.1`) while deletions still run, so users can make
    /// room. 0 disables the check.
    pub min_free_bytes: u64,
    /// Most domain stores open at once; past it the least recently used idle one closes.
    pub max_open_stores: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_capacity_mib: 8,
            idle_close_secs: 300,
            min_free_bytes: 64 * 1024 * 1024,
            max_open_stores: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Cost of new password hashes; existing hashes keep the cost they were made with.
    pub argon2: HashParams,
    /// How long a verified password login is remembered (keyed digests only), so
    /// frequent pollers skip argon2id; 0 disables.
    pub cache_ttl_secs: u64,
    /// Most remembered logins.
    pub cache_entries: usize,
    /// Password hashing threads; 0 = one per CPU. Either way no more than fit in the
    /// hashing memory budget (`hash_memory_mib`).
    pub hash_threads: usize,
    /// Logins that may wait for a hashing thread; more are answered [SYS/TEMP] at once.
    pub hash_queue: usize,
    /// Memory the hashing threads may use, in MiB, each counted at the largest hash it
    /// may verify (`auth::HashParams::max_memory_bytes`); 0 = half the cgroup's memory
    /// limit, or no bound without one.
    pub hash_memory_mib: u64,
    /// Replace a legacy hash (an imported `{SHA512-CRYPT}`, `{SHA256-CRYPT}`,
    /// `{BLF-CRYPT}`, `{MD5-CRYPT}`, yescrypt or argon2i one) by argon2id with SCRAM
    /// keys at the account's first successful password login. Off: such hashes stay as
    /// imported (argon2id hashes of a lower cost are still rehashed).
    pub upgrade_legacy_hashes: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            argon2: HashParams::default(),
            cache_ttl_secs: 300,
            cache_entries: 100_000,
            hash_threads: 0,
            hash_queue: 64,
            hash_memory_mib: 0,
            upgrade_legacy_hashes: true,
        }
    }
}

/// The kinds of client listener: what a connection came in on. The one list of them: the
/// `listener` label of the connection metrics, the names `proxy_protocol.listeners`
/// accepts, and what the server runs on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    /// POP3 on the cleartext port (110), STLS offered.
    Pop3,
    /// POP3 over implicit TLS (995, RFC 8314).
    Pop3s,
    /// LMTP from the MTA, on TCP or a unix socket.
    Lmtp,
    /// Inbound SMTP for hosted domains.
    Smtp,
}

impl Listener {
    pub const ALL: [Listener; 4] = [
        Listener::Pop3,
        Listener::Pop3s,
        Listener::Lmtp,
        Listener::Smtp,
    ];

    /// The name in configuration, logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Listener::Pop3 => "pop3",
            Listener::Pop3s => "pop3s",
            Listener::Lmtp => "lmtp",
            Listener::Smtp => "smtp",
        }
    }

    pub fn from_name(name: &str) -> Option<Listener> {
        Listener::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// The PROXY protocol (v1 and v2) from load balancers in front of some listeners, so that
/// per-IP limits, login throttling, logs and metrics see the client's address, not the
/// balancer's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyProtocolConfig {
    /// Listeners (`Listener` names) whose connections start with a PROXY header.
    /// Empty, the default: no header is read anywhere.
    pub listeners: Vec<String>,
    /// Peers allowed to send the header. A connection from any other peer to one of
    /// `listeners` is closed at once: a header from anyone else must never be believed.
    pub trusted_networks: Vec<Network>,
    /// Time a trusted peer has to send its whole header.
    pub header_timeout_secs: u64,
}

impl Default for ProxyProtocolConfig {
    fn default() -> Self {
        ProxyProtocolConfig {
            listeners: Vec::new(),
            trusted_networks: Vec::new(),
            header_timeout_secs: 5,
        }
    }
}

impl ProxyProtocolConfig {
    /// Whether connections on `listener` start with a header.
    pub fn expects_header(&self, listener: Listener) -> bool {
        self.listeners.iter().any(|l| l == listener.name())
    }

    /// Whether `peer` may send a header. An IPv4 peer on a dual-stack socket
    /// (`::ffff:10.1.2.3`) counts as its IPv4 address.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted_networks.iter().any(|n| n.0.contains(&peer))
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }
}

/// An IPv4 or IPv6 network in CIDR notation; a bare address is a single host (/32, /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Network(ipnet::IpNet);

impl TryFrom<String> for Network {
    type Error = String;

    fn try_from(s: String) -> Result<Network, String> {
        let net = match s.parse::<ipnet::IpNet>() {
            Ok(net) => net,
            Err(_) => s.parse::<IpAddr>().map(ipnet::IpNet::from).map_err(|_| {
                format!("{s:?} is not a network (10.0.0.0/8, fd00::/8) or an IP address")
            })?,
        };
        Ok(Network(net.trunc()))
    }
}

impl Network {
    fn loopback_v4() -> Network {
        Network(ipnet::IpNet::from(ipnet::Ipv4Net::new_assert(
            std::net::Ipv4Addr::new(127, 0, 0, 0),
            8,
        )))
    }

    fn loopback_v6() -> Network {
        Network(ipnet::IpNet::from(IpAddr::from(
            std::net::Ipv6Addr::LOCALHOST,
        )))
    }
}

impl From<Network> for String {
    fn from(n: Network) -> String {
        n.0.to_string()
    }
}

impl Config {
    /// Loads defaults, then `file` (which must exist when given), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        // `MAILGATE_LOG` is the log filter and `MAILGATE_CONFIG` the file, both read by
        // main, not config keys.
        Self::load_from(
            file,
            Env::prefixed("MAILGATE_")
                .ignore(&["log", "config"])
                .split("__"),
        )
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::MissingFile(path.to_path_buf()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: Config = figment.merge(env).extract()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: addresses, pairs of settings, sane limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        if self.hostname.trim().is_empty()
            || self
                .hostname
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return invalid(
                "hostname",
                format!("{:?} is not a host name", self.hostname),
            );
        }
        for (key, value) in [
            ("pop3.listen", &self.pop3.listen),
            ("pop3.tls_listen", &self.pop3.tls_listen),
            ("metrics.listen", &self.metrics.listen),
        ] {
            if !value.is_empty() && value.parse::<SocketAddr>().is_err() {
                return invalid(
                    key,
                    format!("{value:?} is not an address:port (use [::]:110 for IPv6)"),
                );
            }
        }
        if let Err(e) = ListenAddr::parse(&self.lmtp.listen, true) {
            return invalid("lmtp.listen", e);
        }
        if !self.delivery.postmaster.is_empty()
            && crate::wire::Address::parse(&self.delivery.postmaster).is_err()
        {
            return invalid(
                "delivery.postmaster",
                format!("{:?} is not an address", self.delivery.postmaster),
            );
        }
        if let Err(e) = self.lmtp.socket_mode_bits() {
            return invalid("lmtp.socket_mode", e);
        }
        if let Err(e) = ListenAddr::parse(&self.smtp.listen, false) {
            return invalid("smtp.listen", e);
        }
        // Two listeners on one fixed address:port would fail at bind; say which.
        let fixed_port = |a: &str| a.parse::<SocketAddr>().is_ok_and(|a| a.port() != 0);
        let listeners = [
            ("pop3.listen", &self.pop3.listen),
            ("pop3.tls_listen", &self.pop3.tls_listen),
            ("lmtp.listen", &self.lmtp.listen),
            ("smtp.listen", &self.smtp.listen),
            ("metrics.listen", &self.metrics.listen),
        ];
        for (i, (key, value)) in listeners.iter().enumerate() {
            if let Some((other, _)) = listeners[..i]
                .iter()
                .find(|(_, v)| fixed_port(v) && *v == *value)
            {
                return invalid(key, format!("{value:?} is already used by {other}"));
            }
        }
        self.validate_proxy_protocol()?;
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return invalid(
                "tls.cert",
                "tls.cert and tls.key must be set together".into(),
            );
        }
        if self.locks.backend == LockBackendKind::Redis {
            self.validate_redis()?;
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_connections", l.max_connections as u64),
            (
                "limits.max_connections_per_ip",
                l.max_connections_per_ip as u64,
            ),
            ("limits.idle_timeout_secs", l.idle_timeout_secs),
            (
                "limits.tls_handshake_timeout_secs",
                l.tls_handshake_timeout_secs,
            ),
            ("limits.max_auth_failures", u64::from(l.max_auth_failures)),
            (
                "limits.max_auth_failures_per_ip",
                u64::from(l.max_auth_failures_per_ip),
            ),
            (
                "limits.auth_failure_window_secs",
                l.auth_failure_window_secs,
            ),
            ("limits.max_bad_commands", u64::from(l.max_bad_commands)),
            ("limits.login_timeout_secs", l.login_timeout_secs),
            ("limits.ipv6_prefix_len", u64::from(l.ipv6_prefix_len)),
            ("store.cache_capacity_mib", self.store.cache_capacity_mib),
            ("store.max_open_stores", self.store.max_open_stores as u64),
            (
                "delivery.max_message_bytes",
                self.delivery.max_message_bytes,
            ),
            (
                "delivery.max_recipients",
                self.delivery.max_recipients as u64,
            ),
            (
                "delivery.idle_timeout_secs",
                self.delivery.idle_timeout_secs,
            ),
            (
                "delivery.transaction_timeout_secs",
                self.delivery.transaction_timeout_secs,
            ),
            ("tls.reload_interval_secs", self.tls.reload_interval_secs),
            ("auth.hash_queue", self.auth.hash_queue as u64),
            (
                "proxy_protocol.header_timeout_secs",
                self.proxy_protocol.header_timeout_secs,
            ),
        ] {
            if value == 0 {
                return invalid(key, "must be greater than 0".into());
            }
        }
        if l.ipv6_prefix_len > 128 {
            return invalid("limits.ipv6_prefix_len", "must be at most 128".into());
        }
        if let Err(e) = self.auth.argon2.validate() {
            return invalid("auth.argon2", e.to_string());
        }
        for domain in &self.provision.domains {
            if let Err(e) = crate::wire::address::validate_domain(domain) {
                return invalid("provision.domains", e.to_string());
            }
        }
        self.validate_cluster()
    }

    /// A cluster needs Redis (the home records and the locks live there), its own
    /// certificates, the shared secret and a peer list naming this replica.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        let c = &self.cluster;
        if !c.enabled() {
            return Ok(());
        }
        if !valid_replica_name(&c.name) {
            return invalid(
                "cluster.name",
                format!(
                    "{:?} is not a replica name: expected lowercase letters, digits and inner hyphens (a pod name)",
                    c.name
                ),
            );
        }
        if self.locks.backend != LockBackendKind::Redis {
            return invalid(
                "locks.backend",
                "a cluster needs \"redis\": the domain homes and the locks are shared there".into(),
            );
        }
        if c.listen.parse::<SocketAddr>().is_err() {
            return invalid(
                "cluster.listen",
                format!("{:?} is not an address:port", c.listen),
            );
        }
        for (key, value) in [
            ("cluster.cert", &c.cert),
            ("cluster.key", &c.key),
            ("cluster.ca", &c.ca),
            ("cluster.secret_file", &c.secret_file),
        ] {
            if value.is_empty() {
                return invalid(key, "must be set when cluster.name is".into());
            }
        }
        if c.connect_timeout_ms == 0 {
            return invalid(
                "cluster.connect_timeout_ms",
                "must be greater than 0".into(),
            );
        }
        for (name, addr) in &c.peers {
            if !valid_replica_name(name) {
                return invalid(
                    "cluster.peers",
                    format!("{name:?} is not a replica name: expected lowercase letters, digits and inner hyphens"),
                );
            }
            match addr.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {}
                _ => {
                    return invalid(
                        "cluster.peers",
                        format!("{name}: {addr:?} is not host:port"),
                    )
                }
            }
        }
        if !c.peers.contains_key(&c.name) {
            return invalid(
                "cluster.peers",
                format!("must list this replica, {:?}, too", c.name),
            );
        }
        for (domain, replica) in &c.pins {
            if let Err(e) = crate::wire::address::validate_domain(domain) {
                return invalid("cluster.pins", e.to_string());
            }
            if !c.peers.contains_key(replica) {
                return invalid(
                    "cluster.pins",
                    format!("{domain}: {replica:?} is not in cluster.peers"),
                );
            }
        }
        Ok(())
    }

    fn validate_proxy_protocol(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        let p = &self.proxy_protocol;
        if let Some(name) = p
            .listeners
            .iter()
            .find(|l| Listener::from_name(l).is_none())
        {
            let names: Vec<&str> = Listener::ALL.iter().map(|l| l.name()).collect();
            return invalid(
                "proxy_protocol.listeners",
                format!("{name:?} is not a listener (one of {})", names.join(", ")),
            );
        }
        if p.expects_header(Listener::Lmtp) && self.lmtp.listen.starts_with("unix:") {
            return invalid(
                "proxy_protocol.listeners",
                "lmtp listens on a unix socket, which carries no client address to replace".into(),
            );
        }
        if !p.listeners.is_empty() && p.trusted_networks.is_empty() {
            return invalid(
                "proxy_protocol.trusted_networks",
                "must name the load balancers' networks when proxy_protocol.listeners is set"
                    .into(),
            );
        }
        Ok(())
    }

    fn validate_redis(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        let l = &self.locks;
        if let Err(e) = crate::redis_conn::check_url(l.redis_url.expose()) {
            return invalid("locks.redis_url", e.to_string());
        }
        if l.redis_ca_file.is_some() && !l.redis_url.expose().starts_with("rediss://") {
            return invalid(
                "locks.redis_ca_file",
                "is only used with a rediss:// redis_url".into(),
            );
        }
        if l.redis_timeout_ms == 0 {
            return invalid("locks.redis_timeout_ms", "must be greater than 0".into());
        }
        if l.redis_sentinels.is_empty() && !l.redis_sentinel_master.is_empty() {
            return invalid(
                "locks.redis_sentinel_master",
                "is only used with locks.redis_sentinels; name the sentinels too".into(),
            );
        }
        if let Some(sentinels) = l.redis_sentinels() {
            match crate::redis_conn::check_sentinels(&sentinels) {
                Err(crate::redis_conn::RedisConnError::InvalidSentinel { key, message }) => {
                    return invalid(key, message)
                }
                Err(e) => return invalid("locks.redis_sentinels", e.to_string()),
                Ok(()) => {}
            }
        }
        // A renewal, started a third of the TTL before the session would give the lock
        // up, must end (at worst by timing out) before the lock can expire.
        if l.ttl_secs.saturating_mul(1000) < l.redis_timeout_ms.saturating_mul(3) {
            return invalid(
                "locks.ttl_secs",
                format!(
                    "must be at least three times locks.redis_timeout_ms ({} ms)",
                    l.redis_timeout_ms
                ),
            );
        }
        Ok(())
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }

    /// The default certificate pair: configured, or the self-signed one in `data_dir/tls/`.
    pub fn default_cert(&self) -> (PathBuf, PathBuf, bool) {
        match (&self.tls.cert, &self.tls.key) {
            (Some(c), Some(k)) => (c.clone(), k.clone(), false),
            _ => (
                self.data_dir.join("tls/selfsigned.crt"),
                self.data_dir.join("tls/selfsigned.key"),
                true,
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in_jail(file: Option<&str>) -> Result<Config, ConfigError> {
        Config::load(file.map(Path::new))
    }

    #[test]
    fn defaults_need_no_file() {
        Jail::expect_with(|_| {
            let c = load_in_jail(None).map_err(|e| e.to_string())?;
            assert_eq!(c, Config::default());
            assert_eq!(c.pop3.listen, "0.0.0.0:110");
            assert_eq!(c.metrics.listen, "0.0.0.0:9898");
            assert!(!c.pop3.allow_plaintext_auth);
            Ok(())
        });
    }

    #[test]
    fn lmtp_allow_from_defaults_to_loopback_and_takes_cidrs() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let lmtp = LmtpConfig::default();
        assert!(lmtp.allows(ip("127.0.0.1")) && lmtp.allows(ip("127.9.9.9")));
        assert!(lmtp.allows(ip("::1")) && lmtp.allows(ip("::ffff:127.0.0.1")));
        assert!(!lmtp.allows(ip("10.0.0.5")) && !lmtp.allows(ip("2001:db8::1")));
        Jail::expect_with(|jail| {
            jail.create_file(
                "m.toml",
                "[lmtp]\nallow_from = [\"10.0.0.0/8\", \"192.0.2.7\"]\n",
            )?;
            let c = load_in_jail(Some("m.toml")).map_err(|e| e.to_string())?;
            assert!(c.lmtp.allows(ip("10.1.2.3")) && c.lmtp.allows(ip("::ffff:192.0.2.7")));
            assert!(!c.lmtp.allows(ip("127.0.0.1")) && !c.lmtp.allows(ip("192.0.2.8")));
            jail.create_file("bad.toml", "[lmtp]\nallow_from = [\"10.0.0.0/33\"]\n")?;
            assert!(load_in_jail(Some("bad.toml")).is_err());
            Ok(())
        });
    }

    #[test]
    fn file_then_env_override() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "m.toml",
                r#"
                data_dir = "/var/lib/mailgate"
                hostname = "mail.example.com"
                [pop3]
                listen = "[::]:1110"
                allow_plaintext_auth = true
                [tls.domains."example.org"]
                cert = "a.crt"
                key = "a.key"
                [provision]
                domains = ["example.org", "example.net"]
                "#,
            )?;
            jail.set_env(
                "MAILGATE_PROVISION__ACCOUNTS_FILE",
                "/etc/mailgate/accounts",
            );
            jail.set_env("MAILGATE_POP3__TLS_LISTEN", "127.0.0.1:0");
            jail.set_env("MAILGATE_LIMITS__IDLE_TIMEOUT_SECS", "5");
            let c = load_in_jail(Some("m.toml")).map_err(|e| e.to_string())?;
            assert_eq!(c.data_dir, PathBuf::from("/var/lib/mailgate"));
            assert_eq!(c.pop3.listen, "[::]:1110");
            assert_eq!(c.pop3.tls_listen, "127.0.0.1:0");
            assert!(c.pop3.allow_plaintext_auth);
            assert_eq!(c.limits.idle_timeout_secs, 5);
            assert_eq!(c.tls.domains["example.org"].cert, PathBuf::from("a.crt"));
            assert_eq!(c.provision.domains, vec!["example.org", "example.net"]);
            assert_eq!(
                c.provision.accounts_file,
                Some(PathBuf::from("/etc/mailgate/accounts"))
            );
            Ok(())
        });
    }

    const CLUSTER_OK: &str = r#"
        [locks]
        backend = "redis"
        [cluster]
        name = "mailgate-0"
        cert = "c.pem"
        key = "k.pem"
        ca = "ca.pem"
        secret_file = "secret"
        [cluster.peers]
        "mailgate-0" = "mailgate-0.mailgate-headless:7025"
        "mailgate-1" = "10.0.0.2:7025"
        [cluster.pins]
        "big.example" = "mailgate-1"
        "#;

    #[test]
    fn cluster_config_loads_and_validates() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", CLUSTER_OK)?;
            let c = load_in_jail(Some("c.toml")).map_err(|e| e.to_string())?;
            assert!(c.cluster.enabled());
            assert_eq!(c.cluster.listen, "0.0.0.0:7025");
            assert_eq!(c.cluster.connect_timeout(), Duration::from_secs(2));
            assert_eq!(c.cluster.peers.len(), 2);
            assert_eq!(c.cluster.pins["big.example"], "mailgate-1");
            // The pod name arrives by environment in the chart.
            jail.set_env("MAILGATE_CLUSTER__NAME", "mailgate-1");
            let c = load_in_jail(Some("c.toml")).map_err(|e| e.to_string())?;
            assert_eq!(c.cluster.name, "mailgate-1");
            Ok(())
        });
        assert!(!Config::default().cluster.enabled());
    }

    #[test]
    fn cluster_mistakes_name_the_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "backend = \"redis\"",
                "backend = \"local\"",
                "locks.backend",
            ),
            (
                "name = \"mailgate-0\"",
                "name = \"Mailgate_0\"",
                "cluster.name",
            ),
            ("cert = \"c.pem\"", "cert = \"\"", "cluster.cert"),
            (
                "secret_file = \"secret\"",
                "secret_file = \"\"",
                "cluster.secret_file",
            ),
            (
                "\"mailgate-0\" = \"mailgate-0.mailgate-headless:7025\"",
                "\"mailgate-9\" = \"x:7025\"",
                "cluster.peers",
            ),
            ("\"10.0.0.2:7025\"", "\"10.0.0.2\"", "cluster.peers"),
            (
                "\"big.example\" = \"mailgate-1\"",
                "\"big.example\" = \"mailgate-7\"",
                "cluster.pins",
            ),
            (
                "\"big.example\" = \"mailgate-1\"",
                "\"bad domain\" = \"mailgate-1\"",
                "cluster.pins",
            ),
            (
                "ca = \"ca.pem\"",
                "ca = \"ca.pem\"\nlisten = \"7025\"",
                "cluster.listen",
            ),
            (
                "ca = \"ca.pem\"",
                "ca = \"ca.pem\"\nconnect_timeout_ms = 0",
                "cluster.connect_timeout_ms",
            ),
        ];
        for (from, to, key) in cases {
            assert!(CLUSTER_OK.contains(from), "{from}");
            let text = CLUSTER_OK.replacen(from, to, 1);
            Jail::expect_with(|jail| {
                jail.create_file("c.toml", &text)?;
                let err = load_in_jail(Some("c.toml")).expect_err(&text).to_string();
                assert!(err.contains(key), "{text}: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn clients_are_grouped_by_ipv6_prefix_and_mapped_ipv4_is_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let cases = [
            ("192.0.2.7", 64, "192.0.2.7"),
            ("::ffff:192.0.2.7", 64, "192.0.2.7"),
            ("::ffff:192.0.2.7", 128, "192.0.2.7"),
            ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", 64, "2001:db8:1:2::"),
            ("2001:db8:1:2::1", 64, "2001:db8:1:2::"),
            ("2001:db8:1:2:ffff::", 56, "2001:db8:1::"),
            ("2001:db8:1:2:3:4:5:6", 128, "2001:db8:1:2:3:4:5:6"),
            ("2001:db8:1:2:3:4:5:6", 1, "::"),
            ("2001:db8:1:2:3:4:5:6", 0, "::"),
            ("2001:db8:1:2:3:4:5:6", 200, "2001:db8:1:2:3:4:5:6"),
            ("::1", 64, "::"),
        ];
        for (addr, prefix, group) in cases {
            assert_eq!(client_group(ip(addr), prefix), ip(group), "{addr}/{prefix}");
        }
        // Two addresses of one /64 are one client; the next /64 is another.
        assert_eq!(
            client_group(ip("2001:db8::1"), 64),
            client_group(ip("2001:db8::ffff:1"), 64)
        );
        assert_ne!(
            client_group(ip("2001:db8::1"), 64),
            client_group(ip("2001:db8:0:1::1"), 64)
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[pop3]\nlisten_typo = \"x\"\n", "listen_typo"),
            ("bogus = 1\n", "bogus"),
            ("[pop3]\nlisten = \"nonsense\"\n", "pop3.listen"),
            ("[limits]\nmax_connections = \"many\"\n", "max_connections"),
            ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
            ("[limits]\nlogin_timeout_secs = 0\n", "limits.login_timeout_secs"),
            ("[limits]\nipv6_prefix_len = 0\n", "limits.ipv6_prefix_len"),
            ("[limits]\nipv6_prefix_len = 129\n", "limits.ipv6_prefix_len"),
            ("[tls]\ncert = \"x.crt\"\n", "tls.cert"),
            ("[locks]\nbackend = \"zookeeper\"\n", "locks.backend"),
            (
                "[locks]\nbackend = \"redis\"\nredis_url = \"http://x\"\n",
                "locks.redis_url",
            ),
            (
                "[locks]\nbackend = \"redis\"\nttl_secs = 2\n",
                "locks.ttl_secs",
            ),
            (
                "[locks]\nbackend = \"redis\"\nredis_ca_file = \"ca.pem\"\n",
                "locks.redis_ca_file",
            ),
            ("[metrics]\nlisten = \"9898\"\n", "metrics.listen"),
            (
                "[pop3]\nlisten = \"127.0.0.1:9898\"\n[metrics]\nlisten = \"127.0.0.1:9898\"\n",
                "metrics.listen",
            ),
            ("hostname = \"two words\"\n", "hostname"),
            ("[lmtp]\nlisten = \"unix:relative.sock\"\n", "lmtp.listen"),
            ("[smtp]\nlisten = \"unix:/run/smtp.sock\"\n", "smtp.listen"),
            (
                "[pop3]\nlisten = \"127.0.0.1:2424\"\n[lmtp]\nlisten = \"127.0.0.1:2424\"\n",
                "lmtp.listen",
            ),
            ("[delivery]\nmax_recipients = 0\n", "delivery.max_recipients"),
            ("[lmtp]\nsocket_mode = \"0999\"\n", "lmtp.socket_mode"),
            ("[delivery]\npostmaster = \"root\"\n", "delivery.postmaster"),
            ("[lmtp]\nsocket_mode = \"17777\"\n", "lmtp.socket_mode"),
            (
                "[proxy_protocol]\nlisteners = [\"imap\"]\ntrusted_networks = [\"10.0.0.0/8\"]\n",
                "proxy_protocol.listeners",
            ),
            (
                "[proxy_protocol]\nlisteners = [\"pop3s\"]\n",
                "proxy_protocol.trusted_networks",
            ),
            (
                "[proxy_protocol]\nlisteners = [\"pop3s\"]\ntrusted_networks = [\"10.0.0.0/33\"]\n",
                "proxy_protocol.trusted_networks",
            ),
            (
                "[proxy_protocol]\ntrusted_networks = [\"load-balancer\"]\n",
                "proxy_protocol.trusted_networks",
            ),
            (
                "[proxy_protocol]\nheader_timeout_secs = 0\n",
                "proxy_protocol.header_timeout_secs",
            ),
            (
                "[lmtp]\nlisten = \"unix:/run/lmtp.sock\"\n[proxy_protocol]\nlisteners = [\"lmtp\"]\ntrusted_networks = [\"10.0.0.0/8\"]\n",
                "proxy_protocol.listeners",
            ),
            (
                "[provision]\ndomains = [\"example.org\", \"../etc\"]\n",
                "provision.domains",
            ),
            ("[provision]\naccounts = \"a\"\n", "accounts"),
        ];
        for (toml, key) in cases {
            Jail::expect_with(|jail| {
                jail.create_file("m.toml", toml)?;
                let err = load_in_jail(Some("m.toml")).expect_err(toml).to_string();
                assert!(
                    err.contains(key),
                    "{toml:?}: error {err:?} does not name {key}"
                );
                Ok(())
            });
        }
    }

    #[test]
    fn proxy_protocol_section() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "m.toml",
                r#"
                [proxy_protocol]
                listeners = ["pop3s", "smtp"]
                trusted_networks = ["10.0.0.0/8", "192.0.2.7", "fd00::/8", "2001:db8::1", "172.16.1.2/12"]
                header_timeout_secs = 2
                "#,
            )?;
            let c = load_in_jail(Some("m.toml")).map_err(|e| e.to_string())?;
            let p = &c.proxy_protocol;
            assert!(p.expects_header(Listener::Pop3s) && p.expects_header(Listener::Smtp));
            assert!(!p.expects_header(Listener::Pop3) && !p.expects_header(Listener::Lmtp));
            assert_eq!(p.header_timeout(), Duration::from_secs(2));
            let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
            for trusted in [
                "10.0.0.1",
                "10.255.255.255",
                "192.0.2.7",
                "fd12::1",
                "2001:db8::1",
                "172.31.0.1",
                "::ffff:10.1.2.3",
            ] {
                assert!(p.trusts(ip(trusted)), "{trusted}");
            }
            for untrusted in ["11.0.0.1", "192.0.2.8", "2001:db8::2", "127.0.0.1", "::1"] {
                assert!(!p.trusts(ip(untrusted)), "{untrusted}");
            }
            // Host bits are cleared; a bare address is one host.
            let shown: Vec<String> = p
                .trusted_networks
                .iter()
                .map(|n| String::from(*n))
                .collect();
            assert_eq!(
                shown,
                [
                    "10.0.0.0/8",
                    "192.0.2.7/32",
                    "fd00::/8",
                    "2001:db8::1/128",
                    "172.16.0.0/12"
                ]
            );

            jail.set_env("MAILGATE_PROXY_PROTOCOL__LISTENERS", "[pop3]");
            let c = load_in_jail(Some("m.toml")).map_err(|e| e.to_string())?;
            assert_eq!(c.proxy_protocol.listeners, ["pop3"]);
            Ok(())
        });
        Jail::expect_with(|_| {
            let c = load_in_jail(None).map_err(|e| e.to_string())?;
            assert!(c.proxy_protocol.listeners.is_empty());
            assert_eq!(c.proxy_protocol.header_timeout_secs, 5);
            Ok(())
        });
    }

    #[test]
    fn redis_backend_from_file_and_env_never_shows_the_password() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "m.toml",
                r#"
                [locks]
                backend = "redis"
                ttl_secs = 3
                "#,
            )?;
            jail.set_env(
                "MAILGATE_LOCKS__REDIS_URL",
                "rediss://mailgate:hunter2hunter2@redis.example:6380/2",
            );
            jail.set_env("MAILGATE_LOCKS__REDIS_CA_FILE", "ca.pem");
            let c = load_in_jail(Some("m.toml")).map_err(|e| e.to_string())?;
            assert_eq!(c.locks.backend, LockBackendKind::Redis);
            assert_eq!(c.locks.ttl(), Duration::from_secs(3));
            assert_eq!(c.locks.redis_timeout(), Duration::from_secs(1));
            assert_eq!(
                c.locks.redis_url.expose(),
                "rediss://mailgate:hunter2hunter2@redis.example:6380/2"
            );
            let shown = format!("{c:?} {}", c.locks.redis_url);
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("rediss://mailgate:***@redis.example:6380/2"));

            jail.set_env(
                "MAILGATE_LOCKS__REDIS_URL",
                "redis://:hunter2hunter2@redis.example:port/2",
            );
            let err = load_in_jail(Some("m.toml"))
                .expect_err("bad port")
                .to_string();
            assert!(err.contains("locks.redis_url"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn redis_sentinels_from_file_and_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "m.toml",
                r#"
                [locks]
                backend = "redis"
                redis_url = "redis://:hunter2hunter2@ignored-host:6379/3"
                redis_sentinels = ["10.0.0.5:26379", "sentinel-1.redis:26379", "[::1]:26380"]
                redis_sentinel_master = "mymaster"
                "#,
            )?;
            let c = load_in_jail(Some("m.toml")).map_err(|e| e.to_string())?;
            let s = c.locks.redis_sentinels().expect("sentinels set");
            assert_eq!(
                s.addrs,
                ["10.0.0.5:26379", "sentinel-1.redis:26379", "[::1]:26380"]
            );
            assert_eq!(s.master, "mymaster");
            let shown = format!("{c:?}");
            assert!(!shown.contains("hunter2"), "{shown}");

            jail.set_env(
                "MAILGATE_LOCKS__REDIS_SENTINELS",
                "[\"127.0.0.1:26379\",\"127.0.0.1:26380\"]",
            );
            jail.set_env("MAILGATE_LOCKS__REDIS_SENTINEL_MASTER", "other");
            let c = load_in_jail(Some("m.toml")).map_err(|e| e.to_string())?;
            let s = c.locks.redis_sentinels().expect("sentinels set");
            assert_eq!(s.addrs, ["127.0.0.1:26379", "127.0.0.1:26380"]);
            assert_eq!(s.master, "other");
            Ok(())
        });
        // Empty (the default): redis_url's host, as before.
        Jail::expect_with(|_| {
            let c = load_in_jail(None).map_err(|e| e.to_string())?;
            assert!(c.locks.redis_sentinels.is_empty());
            assert_eq!(c.locks.redis_sentinels(), None);
            Ok(())
        });
    }

    #[test]
    fn redis_sentinel_errors_name_the_key() {
        let base =
            "[locks]\nbackend = \"redis\"\nredis_url = \"redis://:hunter2hunter2@h:6379/0\"\n";
        let cases: &[(&str, &str)] = &[
            // The master name is required with sentinels.
            (
                "redis_sentinels = [\"127.0.0.1:26379\"]\n",
                "locks.redis_sentinel_master",
            ),
            (
                "redis_sentinels = [\"127.0.0.1:26379\"]\nredis_sentinel_master = \"my master\"\n",
                "locks.redis_sentinel_master",
            ),
            // A master name without sentinels does nothing: say so.
            (
                "redis_sentinel_master = \"mymaster\"\n",
                "locks.redis_sentinel_master",
            ),
            (
                "redis_sentinels = [\"127.0.0.1\"]\nredis_sentinel_master = \"m\"\n",
                "locks.redis_sentinels",
            ),
            (
                "redis_sentinels = [\"127.0.0.1:0\"]\nredis_sentinel_master = \"m\"\n",
                "locks.redis_sentinels",
            ),
            (
                "redis_sentinels = [\"h:99999\"]\nredis_sentinel_master = \"m\"\n",
                "locks.redis_sentinels",
            ),
            (
                "redis_sentinels = [\":26379\"]\nredis_sentinel_master = \"m\"\n",
                "locks.redis_sentinels",
            ),
            (
                "redis_sentinels = [\"::1:26379\"]\nredis_sentinel_master = \"m\"\n",
                "locks.redis_sentinels",
            ),
            (
                "redis_sentinels = [\"redis://h:26379\"]\nredis_sentinel_master = \"m\"\n",
                "locks.redis_sentinels",
            ),
            (
                "redis_sentinels = [\"127.0.0.1:26379\", \"\"]\nredis_sentinel_master = \"m\"\n",
                "locks.redis_sentinels",
            ),
            ("redis_sentinels = \"127.0.0.1:26379\"\n", "redis_sentinels"),
        ];
        for (extra, key) in cases {
            let text = format!("{base}{extra}");
            Jail::expect_with(|jail| {
                jail.create_file("c.toml", &text)?;
                let err = load_in_jail(Some("c.toml")).expect_err(&text).to_string();
                assert!(err.contains(key), "{text}: {err}");
                assert!(!err.contains("hunter2"), "{text}: {err}");
                Ok(())
            });
        }
    }

    #[test]
    fn bad_env_value_names_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("MAILGATE_LIMITS__MAX_BAD_COMMANDS", "lots");
            let err = load_in_jail(None).expect_err("must fail").to_string();
            assert!(
                err.to_lowercase().contains("limits.max_bad_commands"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn the_log_filter_and_config_file_variables_are_not_keys() {
        Jail::expect_with(|jail| {
            jail.set_env("MAILGATE_LOG", "debug");
            jail.set_env("MAILGATE_CONFIG", "/etc/mailgate/mailgate.toml");
            assert_eq!(
                load_in_jail(None).map_err(|e| e.to_string())?,
                Config::default()
            );
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        Jail::expect_with(|_| {
            let err = load_in_jail(Some("absent.toml")).expect_err("must fail");
            assert!(matches!(err, ConfigError::MissingFile(_)));
            Ok(())
        });
    }

    #[test]
    fn a_file_is_named_as_given_wherever_the_command_runs() {
        Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[pop3\nlisten = 1\n")?;
            let absolute = jail.directory().join("bad.toml");
            let sub = jail.directory().join("sub");
            std::fs::create_dir(&sub).map_err(|e| e.to_string())?;
            // From the file's directory and from below it, figment itself would show
            // `bad.toml` and `../bad.toml`: the message names the path given, once.
            for cwd in [jail.directory().to_path_buf(), sub] {
                std::env::set_current_dir(&cwd).map_err(|e| e.to_string())?;
                let err = Config::load(Some(&absolute))
                    .expect_err("not TOML")
                    .to_string();
                let shown = absolute.display().to_string();
                assert_eq!(err.matches(&shown).count(), 1, "{err}");
                assert!(err.contains("invalid table header"), "{err}");
            }
            jail.set_env("MAILGATE_POP3__APOP", "maybe");
            let err = load_in_jail(None).expect_err("not a bool").to_string();
            assert!(err.contains("\"POP3.APOP\""), "{err}");
            assert!(err.contains("environment variable"), "{err}");
            Ok(())
        });
    }
}
