//! Prometheus metrics: every metric name is a constant in this module, every label value
//! comes from a small fixed set (listener, protocol, command, result, mechanism, reason,
//! backend, hosted domain, certificate name, configured peer replica, home state), and one
//! `Metrics` value of handles is built at start-up and passed to every layer through
//! `net::Context`. Nothing here may be labelled with a user name, an address or a client
//! IP. `http` serves the registry.

pub mod http;

use crate::config::Listener;
use prometheus::core::Collector;
use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

// ---- metric names (the contract with the dashboard and the alert rules) ----

pub const CONNECTIONS_ACCEPTED: &str = "mailgate_connections_accepted_total";
pub const CONNECTIONS_REJECTED: &str = "mailgate_connections_rejected_total";
pub const CONNECTIONS_ACTIVE: &str = "mailgate_connections_active";
pub const TLS_HANDSHAKES: &str = "mailgate_tls_handshakes_total";
pub const TLS_UPGRADES: &str = "mailgate_tls_upgrades_total";
pub const SESSIONS: &str = "mailgate_sessions_total";
pub const SESSION_DURATION: &str = "mailgate_session_duration_seconds";
pub const COMMANDS: &str = "mailgate_commands_total";
pub const COMMAND_DURATION: &str = "mailgate_command_duration_seconds";
pub const AUTH_ATTEMPTS: &str = "mailgate_auth_attempts_total";
pub const SENT_BYTES: &str = "mailgate_sent_bytes_total";
pub const LOCK_ACQUIRE_DURATION: &str = "mailgate_lock_acquire_duration_seconds";
pub const LOCK_CONTENTION: &str = "mailgate_lock_contention_total";
pub const LOCK_LOSSES: &str = "mailgate_lock_losses_total";
pub const LOCK_RENEWALS: &str = "mailgate_lock_renewals_total";
pub const REDIS_ERRORS: &str = "mailgate_redis_errors_total";
pub const DELIVERIES: &str = "mailgate_deliveries_total";
pub const DELIVERY_DURATION: &str = "mailgate_delivery_duration_seconds";
pub const RECEIVED_BYTES: &str = "mailgate_received_bytes_total";
pub const DOMAIN_ACCOUNTS: &str = "mailgate_domain_accounts";
pub const DOMAIN_MESSAGES: &str = "mailgate_domain_messages";
pub const DOMAIN_STORED_BYTES: &str = "mailgate_domain_stored_bytes";
pub const CERTIFICATE_EXPIRY: &str = "mailgate_certificate_expiry_timestamp_seconds";
pub const BUILD_INFO: &str = "mailgate_build_info";
pub const READY: &str = "mailgate_ready";
pub const CLUSTER_FORWARDS: &str = "mailgate_cluster_forwards_total";
pub const CLUSTER_FORWARDED_RECIPIENTS: &str = "mailgate_cluster_forwarded_recipients_total";
pub const CLUSTER_PEER_CONNECT_DURATION: &str = "mailgate_cluster_peer_connect_duration_seconds";
pub const CLUSTER_PEER_UP: &str = "mailgate_cluster_peer_up";
pub const CLUSTER_DOMAINS: &str = "mailgate_cluster_domains";
pub const CLUSTER_HOME_CONFLICTS: &str = "mailgate_cluster_home_conflicts_total";
pub const CLUSTER_INBOUND: &str = "mailgate_cluster_inbound_total";
pub const CLUSTER_MOVES: &str = "mailgate_cluster_moves_total";
pub const CLUSTER_MOVE_FROZEN: &str = "mailgate_cluster_move_frozen_seconds";
/// The process collector's namespace: its metrics become `mailgate_process_*`.
pub const PROCESS_NAMESPACE: &str = "mailgate";

// ---- label values: the fixed sets ----

pub const REASON_LIMIT: &str = "limit";
pub const REASON_PER_IP_LIMIT: &str = "per_ip_limit";
pub const REASON_SHUTDOWN: &str = "shutdown";
/// A PROXY-protocol listener got no valid header in time from a trusted peer.
pub const REASON_PROXY_HEADER: &str = "proxy_header";
/// A PROXY-protocol listener was reached by a peer outside `trusted_networks`.
pub const REASON_PROXY_UNTRUSTED: &str = "proxy_untrusted";
/// A client outside the listener's allowlist (`lmtp.allow_from`).
pub const REASON_NOT_ALLOWED: &str = "not_allowed";

/// Why a connection was refused before its session: the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// `limits.max_connections` reached.
    Limit,
    /// `limits.max_connections_per_ip` reached for the client's address.
    PerIpLimit,
    /// Accepted while shutting down (the listen backlog at SIGTERM).
    Shutdown,
    /// A trusted peer sent no valid PROXY header in time.
    ProxyHeader,
    /// A peer outside `proxy_protocol.trusted_networks` reached a PROXY listener.
    ProxyUntrusted,
    /// A client outside `lmtp.allow_from` reached LMTP.
    NotAllowed,
}

impl Rejected {
    const ALL: [Rejected; 6] = [
        Rejected::Limit,
        Rejected::PerIpLimit,
        Rejected::Shutdown,
        Rejected::ProxyHeader,
        Rejected::ProxyUntrusted,
        Rejected::NotAllowed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rejected::Limit => REASON_LIMIT,
            Rejected::PerIpLimit => REASON_PER_IP_LIMIT,
            Rejected::Shutdown => REASON_SHUTDOWN,
            Rejected::ProxyHeader => REASON_PROXY_HEADER,
            Rejected::ProxyUntrusted => REASON_PROXY_UNTRUSTED,
            Rejected::NotAllowed => REASON_NOT_ALLOWED,
        }
    }
}

/// How a TLS handshake ended: the `result` and `version` labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// Completed with this protocol version (`TLS_1_2`, `TLS_1_3`).
    Ok(&'static str),
    Failed,
    TimedOut,
}

pub const TLS_OK: &str = "ok";
pub const TLS_FAILED: &str = "failed";
pub const TLS_TIMEOUT: &str = "timeout";
/// Version label of a handshake that did not complete.
pub const TLS_VERSION_NONE: &str = "none";
pub const TLS_1_2: &str = "TLSv1.2";
pub const TLS_1_3: &str = "TLSv1.3";

/// How a session (POP3, LMTP or SMTP) ended: the `outcome` label and the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Quit,
    Timeout,
    Dropped,
    Shutdown,
    /// POP3 only: the maildrop lock was lost.
    LockLost,
    TooManyErrors,
    TlsFailed,
    Error,
    /// Handed to the domain's home replica after the login name (POP3); the home counts
    /// the rest of the session.
    Forwarded,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Quit => "quit",
            Outcome::Timeout => "timeout",
            Outcome::Dropped => "dropped",
            Outcome::Shutdown => "shutdown",
            Outcome::LockLost => "lock_lost",
            Outcome::TooManyErrors => "too_many_errors",
            Outcome::TlsFailed => "tls_failed",
            Outcome::Error => "error",
            Outcome::Forwarded => "forwarded",
        }
    }
}

pub const SESSION_OUTCOMES: &[Outcome] = &[
    Outcome::Quit,
    Outcome::Timeout,
    Outcome::Dropped,
    Outcome::Shutdown,
    Outcome::LockLost,
    Outcome::TooManyErrors,
    Outcome::TlsFailed,
    Outcome::Error,
    Outcome::Forwarded,
];

/// Counts a session in the active-connections gauge for as long as it lives, even if
/// its task panics, and as ended when it is dropped.
pub struct ActiveGuard(prometheus::IntGauge, Arc<AtomicU64>);

impl ActiveGuard {
    fn new(gauge: prometheus::IntGauge, ended: Arc<AtomicU64>) -> Self {
        gauge.inc();
        ActiveGuard(gauge, ended)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
        self.1.fetch_add(1, Ordering::Relaxed);
    }
}

pub const PROTOCOL_POP3: &str = "pop3";
/// Command label of a line that is no known command.
pub const COMMAND_UNKNOWN: &str = "unknown";
/// Command label of the DELE commit at QUIT (RFC 1939 UPDATE state) in the latency histogram.
pub const COMMAND_UPDATE: &str = "UPDATE";
pub const COMMAND_RETR: &str = "RETR";
pub const COMMAND_TOP: &str = "TOP";
pub const TIMED_COMMANDS: &[&str] = &[COMMAND_RETR, COMMAND_TOP, COMMAND_UPDATE];
pub const RESULT_OK: &str = "ok";
pub const RESULT_ERR: &str = "err";

/// SASL and legacy login mechanisms, lower-case.
pub const MECH_USER: &str = "user";
pub const MECH_APOP: &str = "apop";
pub const MECH_PLAIN: &str = "plain";
pub const MECH_SCRAM: &str = "scram-sha-256";
const MECHANISMS: &[&str] = &[MECH_USER, MECH_APOP, MECH_PLAIN, MECH_SCRAM];
pub const AUTH_SUCCESS: &str = "success";
pub const AUTH_FAILURE: &str = "failure";
/// Refused with [LOGIN-DELAY] before the credentials were checked.
pub const AUTH_THROTTLED: &str = "throttled";
/// The client cancelled or sent a malformed exchange.
pub const AUTH_ABORTED: &str = "aborted";
/// The shared failure counters (Redis) could not be read; answered [SYS/TEMP].
pub const AUTH_UNAVAILABLE: &str = "unavailable";
const AUTH_RESULTS: &[&str] = &[
    AUTH_SUCCESS,
    AUTH_FAILURE,
    AUTH_THROTTLED,
    AUTH_ABORTED,
    AUTH_UNAVAILABLE,
];

/// Lock renewal results (`LockMetrics::renewals_*`).
pub const RENEWAL_OK: &str = "ok";
pub const RENEWAL_FAILED: &str = "failed";
/// Redis operations whose errors are counted (`LockMetrics::redis_errors`).
pub const REDIS_ACQUIRE: &str = "acquire";
pub const REDIS_RENEW: &str = "renew";
pub const REDIS_RELEASE: &str = "release";
/// The ownership check before UPDATE (`HeldLock::still_held`).
pub const REDIS_CHECK: &str = "check";
/// The readiness probe (`LockBackend::health`).
pub const REDIS_PING: &str = "ping";
const REDIS_OPERATIONS: &[&str] = &[
    REDIS_ACQUIRE,
    REDIS_RENEW,
    REDIS_RELEASE,
    REDIS_CHECK,
    REDIS_PING,
];

/// Delivery protocols: `mailgate deliver`, LMTP and inbound SMTP.
pub const PROTOCOL_LOCAL: &str = "local";
pub const PROTOCOL_LMTP: &str = "lmtp";
pub const PROTOCOL_SMTP: &str = "smtp";
const DELIVERY_PROTOCOLS: &[&str] = &[PROTOCOL_LOCAL, PROTOCOL_LMTP, PROTOCOL_SMTP];
pub const DELIVERY_ACCEPTED: &str = "accepted";
pub const DELIVERY_UNKNOWN_USER: &str = "unknown_user";
/// A recipient outside the hosted domains (an open-relay attempt).
pub const DELIVERY_RELAY_DENIED: &str = "relay_denied";
pub const DELIVERY_OVER_QUOTA: &str = "over_quota";
pub const DELIVERY_TOO_BIG: &str = "too_big";
/// Malformed recipient or sender: a permanent failure that is the sender's fault.
pub const DELIVERY_BAD_INPUT: &str = "bad_input";
pub const DELIVERY_TEMP_FAILURE: &str = "temp_failure";
const DELIVERY_RESULTS: &[&str] = &[
    DELIVERY_ACCEPTED,
    DELIVERY_UNKNOWN_USER,
    DELIVERY_RELAY_DENIED,
    DELIVERY_OVER_QUOTA,
    DELIVERY_TOO_BIG,
    DELIVERY_BAD_INPUT,
    DELIVERY_TEMP_FAILURE,
];

/// Admin requests forwarded to a domain's home replica (the other protocols are above).
pub const PROTOCOL_ADMIN: &str = "admin";

/// What a replica forwards to a domain's home: the `protocol` label of the cluster metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardProtocol {
    /// A POP3 session, after the login name named the domain.
    Pop3,
    /// An LMTP delivery, after the recipients named the domain.
    Lmtp,
    /// An inbound SMTP delivery, after the recipients named the domain.
    Smtp,
    /// An admin socket request about a domain homed elsewhere.
    Admin,
}

impl ForwardProtocol {
    pub const ALL: [ForwardProtocol; 4] = [
        ForwardProtocol::Pop3,
        ForwardProtocol::Lmtp,
        ForwardProtocol::Smtp,
        ForwardProtocol::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ForwardProtocol::Pop3 => PROTOCOL_POP3,
            ForwardProtocol::Lmtp => PROTOCOL_LMTP,
            ForwardProtocol::Smtp => PROTOCOL_SMTP,
            ForwardProtocol::Admin => PROTOCOL_ADMIN,
        }
    }
}

/// How forwarding a session or request to a peer ended: the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardResult {
    /// The home took it and the exchange ran to its end.
    Ok,
    /// No connection or TLS handshake within `cluster.connect_timeout_ms`.
    Unreachable,
    /// The home answered but refused the forward (e.g. hop limit reached, fenced).
    Refused,
    /// The link broke mid-way.
    Error,
}

impl ForwardResult {
    pub const ALL: [ForwardResult; 4] = [
        ForwardResult::Ok,
        ForwardResult::Unreachable,
        ForwardResult::Refused,
        ForwardResult::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ForwardResult::Ok => "ok",
            ForwardResult::Unreachable => "unreachable",
            ForwardResult::Refused => "refused",
            ForwardResult::Error => "error",
        }
    }
}

/// The verdict on one recipient of a delivery forwarded to its home: the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientResult {
    /// The home stored it (2xx).
    Delivered,
    /// The home refused it for good (5xx).
    Rejected,
    /// Answered 4xx, by the home or because the home could not be reached: the sender retries.
    Deferred,
}

impl RecipientResult {
    pub const ALL: [RecipientResult; 3] = [
        RecipientResult::Delivered,
        RecipientResult::Rejected,
        RecipientResult::Deferred,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RecipientResult::Delivered => "delivered",
            RecipientResult::Rejected => "rejected",
            RecipientResult::Deferred => "deferred",
        }
    }
}

/// A domain on this replica's volume by its home record in Redis, as this replica sees
/// it: the `state` label of `mailgate_cluster_domains`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HomeState {
    /// Homed here and served here.
    Active,
    /// A move is under way.
    Moving,
    /// Two replicas claimed it with the same epoch; neither serves it until an operator
    /// picks one.
    Held,
    /// The record names another replica: this copy is not served.
    Elsewhere,
    /// No valid view of the record (Redis unreachable): its clients get temporary failures.
    Unknown,
}

impl HomeState {
    pub const ALL: [HomeState; 5] = [
        HomeState::Active,
        HomeState::Moving,
        HomeState::Held,
        HomeState::Elsewhere,
        HomeState::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HomeState::Active => "active",
            HomeState::Moving => "moving",
            HomeState::Held => "held",
            HomeState::Elsewhere => "elsewhere",
            HomeState::Unknown => "unknown",
        }
    }
}

/// Result label of a forwarded session offered to this replica's internal listener.
pub const INBOUND_OK: &str = "ok";
/// Refused before it started: bad certificate, ALPN or preamble, or hop limit reached.
pub const INBOUND_REJECTED: &str = "rejected";

/// Result label of a domain move run by this replica: the domain now lives elsewhere.
pub const MOVE_MOVED: &str = "moved";
/// The move failed; the domain stayed (or went back) here.
pub const MOVE_FAILED: &str = "failed";

/// Git commit baked in at build time (`MAILGATE_GIT_COMMIT=$(git rev-parse --short HEAD)
/// cargo build`); builds without it say "unknown" rather than needing git to build.
pub const GIT_COMMIT: &str = match option_env!("MAILGATE_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

/// Latency buckets from 1 ms to 30 s, for commands, lock acquisition and delivery.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Session lengths from 100 ms to 1 h.
const SESSION_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// How long a moved domain was frozen: from 10 ms to 5 min (a long grace).
const FROZEN_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Connect plus TLS handshake to a peer replica, from 0.5 ms (same host) to 2 s (the
/// default `cluster.connect_timeout_ms`).
const PEER_CONNECT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering metrics: {0}")]
    Register(#[from] prometheus::Error),
}

/// Lock metrics, cloneable so a lock backend can own a copy and count what only it sees:
/// renewals and Redis errors. Acquire latency, contention and losses are counted by the
/// session, which sees every backend's answers (a backend must not count them again).
#[derive(Clone)]
pub struct LockMetrics {
    /// Time to take a maildrop lock, whatever the answer.
    pub acquire_duration: Histogram,
    /// Acquisitions refused because another session holds the maildrop ([IN-USE]).
    pub contention: IntCounter,
    /// Locks found lost while held (lost token fired, or gone before UPDATE).
    pub losses: IntCounter,
    /// TTL renewals of held locks that succeeded; Redis backend only.
    pub renewals_ok: IntCounter,
    /// TTL renewals that failed (the lock may be lost); Redis backend only.
    pub renewals_failed: IntCounter,
    /// Redis commands that failed, by operation (`REDIS_*`); Redis backend only.
    redis_errors: IntCounterVec,
}

impl LockMetrics {
    /// Counts a failed Redis command; `operation` is a `REDIS_*`.
    pub fn redis_error(&self, operation: &'static str) {
        self.redis_errors.with_label_values(&[operation]).inc();
    }
}

/// Handles to every metric, registered once in one registry.
pub struct Metrics {
    registry: Registry,
    /// Sessions ended since start (not exported: `mailgate_sessions_total` counts them
    /// by outcome), for housekeeping to know when freed memory is worth handing back.
    connections_ended: Arc<AtomicU64>,
    connections_accepted: IntCounterVec,
    connections_rejected: IntCounterVec,
    connections_active: IntGaugeVec,
    tls_handshakes: IntCounterVec,
    tls_upgrades: IntCounterVec,
    sessions: IntCounterVec,
    session_duration: HistogramVec,
    commands: IntCounterVec,
    command_duration: HistogramVec,
    auth_attempts: IntCounterVec,
    sent_bytes: IntCounterVec,
    pub lock: LockMetrics,
    deliveries: IntCounterVec,
    delivery_duration: HistogramVec,
    received_bytes: IntCounterVec,
    domain_accounts: IntGaugeVec,
    domain_messages: IntGaugeVec,
    domain_stored_bytes: IntGaugeVec,
    certificate_expiry: GaugeVec,
    ready: IntGauge,
    cluster: ClusterMetrics,
}

/// The replica-set metrics. The per-peer series exist once `Metrics::cluster_peers` names
/// the peers (never on a replica that is not clustered); the rest exist from the start,
/// at zero on a replica that is not clustered.
struct ClusterMetrics {
    forwards: IntCounterVec,
    forwarded_recipients: IntCounterVec,
    peer_connect_duration: HistogramVec,
    peer_up: IntGaugeVec,
    domains: IntGaugeVec,
    home_conflicts: IntCounter,
    inbound: IntCounterVec,
    moves: IntCounterVec,
    move_frozen: prometheus::Histogram,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    register(r, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    register(r, IntGaugeVec::new(Opts::new(name, help), labels)?)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(r, HistogramVec::new(opts, labels)?)
}

fn register<C: Collector + Clone + 'static>(r: &Registry, c: C) -> prometheus::Result<C> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    /// Builds and registers everything. `lock_backend` is the configured backend name
    /// (validated by `Config`), used as the `backend` label of the lock metrics.
    pub fn new(lock_backend: &str) -> Result<Metrics, MetricsError> {
        let r = Registry::new();
        let renewals = counter(
            &r,
            LOCK_RENEWALS,
            "TTL renewals of held maildrop locks by result (Redis backend).",
            &["backend", "result"],
        )?;
        let m = Metrics {
            connections_ended: Arc::default(),
            connections_accepted: counter(
                &r,
                CONNECTIONS_ACCEPTED,
                "Connections admitted to a session, by listener.",
                &["listener"],
            )?,
            connections_rejected: counter(
                &r,
                CONNECTIONS_REJECTED,
                "Connections refused before a session started, by listener and reason.",
                &["listener", "reason"],
            )?,
            connections_active: gauge(
                &r,
                CONNECTIONS_ACTIVE,
                "Sessions running now, by listener.",
                &["listener"],
            )?,
            tls_handshakes: counter(
                &r,
                TLS_HANDSHAKES,
                "TLS handshakes (implicit TLS and STLS), by listener, result and protocol version.",
                &["listener", "result", "version"],
            )?,
            tls_upgrades: counter(
                &r,
                TLS_UPGRADES,
                "Cleartext connections upgraded to TLS (STLS, STARTTLS), by protocol.",
                &["protocol"],
            )?,
            sessions: counter(
                &r,
                SESSIONS,
                "Finished sessions by listener and outcome.",
                &["listener", "outcome"],
            )?,
            session_duration: histogram(
                &r,
                SESSION_DURATION,
                "Session length from accept to close, by listener.",
                &["listener"],
                SESSION_BUCKETS,
            )?,
            commands: counter(
                &r,
                COMMANDS,
                "Protocol commands by protocol, verb and result (ok: +OK, err: -ERR).",
                &["protocol", "command", "result"],
            )?,
            command_duration: histogram(
                &r,
                COMMAND_DURATION,
                "Time to produce RETR/TOP replies and to commit DELE marks at QUIT (UPDATE).",
                &["command"],
                LATENCY_BUCKETS,
            )?,
            auth_attempts: counter(
                &r,
                AUTH_ATTEMPTS,
                "Login attempts by mechanism and result; throttled = refused with [LOGIN-DELAY].",
                &["mechanism", "result"],
            )?,
            sent_bytes: counter(
                &r,
                SENT_BYTES,
                "Message bytes sent to clients (after dot-stuffing), by command.",
                &["command"],
            )?,
            lock: LockMetrics {
                acquire_duration: histogram(
                    &r,
                    LOCK_ACQUIRE_DURATION,
                    "Time to acquire a maildrop lock, whatever the answer, by backend.",
                    &["backend"],
                    LATENCY_BUCKETS,
                )?
                .with_label_values(&[lock_backend]),
                contention: counter(
                    &r,
                    LOCK_CONTENTION,
                    "Lock acquisitions refused because the maildrop is in use ([IN-USE]).",
                    &["backend"],
                )?
                .with_label_values(&[lock_backend]),
                losses: counter(
                    &r,
                    LOCK_LOSSES,
                    "Held maildrop locks found lost; the session ends without UPDATE.",
                    &["backend"],
                )?
                .with_label_values(&[lock_backend]),
                renewals_ok: renewals.with_label_values(&[lock_backend, RENEWAL_OK]),
                renewals_failed: renewals.with_label_values(&[lock_backend, RENEWAL_FAILED]),
                redis_errors: {
                    let v = counter(
                        &r,
                        REDIS_ERRORS,
                        "Failed Redis commands by operation (Redis lock backend).",
                        &["operation"],
                    )?;
                    for op in REDIS_OPERATIONS {
                        v.with_label_values(&[op]);
                    }
                    v
                },
            },
            deliveries: counter(
                &r,
                DELIVERIES,
                "Message deliveries by protocol and result.",
                &["protocol", "result"],
            )?,
            delivery_duration: histogram(
                &r,
                DELIVERY_DURATION,
                "Time from the start of a delivery until it is durable (or refused), by protocol.",
                &["protocol"],
                LATENCY_BUCKETS,
            )?,
            received_bytes: counter(
                &r,
                RECEIVED_BYTES,
                "Message bytes stored by accepted deliveries (one copy), by protocol.",
                &["protocol"],
            )?,
            domain_accounts: gauge(
                &r,
                DOMAIN_ACCOUNTS,
                "Accounts of a hosted domain (recounted while its store is open).",
                &["domain"],
            )?,
            domain_messages: gauge(
                &r,
                DOMAIN_MESSAGES,
                "Messages stored for a hosted domain (recounted while its store is open).",
                &["domain"],
            )?,
            domain_stored_bytes: gauge(
                &r,
                DOMAIN_STORED_BYTES,
                "Message bytes stored for a hosted domain (recounted while its store is open).",
                &["domain"],
            )?,
            certificate_expiry: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        CERTIFICATE_EXPIRY,
                        "Not-after of each loaded certificate as Unix time, by name (default or SNI domain).",
                    ),
                    &["certificate"],
                )?,
            )?,
            ready: register(
                &r,
                IntGauge::new(
                    READY,
                    "1 when /readyz would answer 200 (listeners bound, stores and locks usable).",
                )?,
            )?,
            cluster: ClusterMetrics {
                forwards: counter(
                    &r,
                    CLUSTER_FORWARDS,
                    "Sessions and requests this replica forwarded to a domain's home, by peer, protocol and result.",
                    &["peer", "protocol", "result"],
                )?,
                forwarded_recipients: counter(
                    &r,
                    CLUSTER_FORWARDED_RECIPIENTS,
                    "Recipients of LMTP/SMTP deliveries forwarded to their home, by peer and result (deferred: 4xx, home unreachable included).",
                    &["peer", "result"],
                )?,
                peer_connect_duration: histogram(
                    &r,
                    CLUSTER_PEER_CONNECT_DURATION,
                    "Time to connect to a peer replica and finish the mutual-TLS handshake, successful attempts only.",
                    &["peer"],
                    PEER_CONNECT_BUCKETS,
                )?,
                peer_up: gauge(
                    &r,
                    CLUSTER_PEER_UP,
                    "1 when the last connection attempt to the peer succeeded, 0 when it failed.",
                    &["peer"],
                )?,
                domains: gauge(
                    &r,
                    CLUSTER_DOMAINS,
                    "Domains on this replica's volume by the state of their home record as this replica sees it.",
                    &["state"],
                )?,
                home_conflicts: register(
                    &r,
                    IntCounter::new(
                        CLUSTER_HOME_CONFLICTS,
                        "Announcements that found another replica claiming a domain with the same epoch (the domain became held).",
                    )?,
                )?,
                inbound: counter(
                    &r,
                    CLUSTER_INBOUND,
                    "Forwarded sessions offered on the replica listener, by protocol and result (rejected: certificate, ALPN, preamble or hop limit).",
                    &["protocol", "result"],
                )?,
                moves: counter(
                    &r,
                    CLUSTER_MOVES,
                    "Domain moves run by this replica (the domain's old home), by result.",
                    &["result"],
                )?,
                move_frozen: register(
                    &r,
                    prometheus::Histogram::with_opts(
                        HistogramOpts::new(
                            CLUSTER_MOVE_FROZEN,
                            "How long each domain moved away from this replica was frozen (not served): the grace and the final delta.",
                        )
                        .buckets(FROZEN_BUCKETS.to_vec()),
                    )?,
                )?,
            },
            registry: r,
        };
        m.touch_all();
        let build = register(
            &m.registry,
            Gauge::with_opts(
                Opts::new(
                    BUILD_INFO,
                    "Always 1; the labels say which build is running.",
                )
                .const_label("version", env!("CARGO_PKG_VERSION"))
                .const_label("commit", GIT_COMMIT),
            )?,
        )?;
        build.set(1.0);
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                PROCESS_NAMESPACE,
            ),
        ))?;
        Ok(m)
    }

    fn touch_all(&self) {
        for l in Listener::ALL.map(Listener::name) {
            self.connections_accepted.with_label_values(&[l]);
            self.connections_active.with_label_values(&[l]);
            self.session_duration.with_label_values(&[l]);
            for reason in Rejected::ALL {
                self.connections_rejected
                    .with_label_values(&[l, reason.name()]);
            }
            for v in [TLS_1_2, TLS_1_3] {
                self.tls_handshakes.with_label_values(&[l, TLS_OK, v]);
            }
            for result in [TLS_FAILED, TLS_TIMEOUT] {
                self.tls_handshakes
                    .with_label_values(&[l, result, TLS_VERSION_NONE]);
            }
            for outcome in SESSION_OUTCOMES {
                self.sessions.with_label_values(&[l, outcome.name()]);
            }
        }
        self.tls_upgrades.with_label_values(&[PROTOCOL_POP3]);
        self.tls_upgrades.with_label_values(&[PROTOCOL_SMTP]);
        for c in TIMED_COMMANDS {
            self.command_duration.with_label_values(&[c]);
        }
        for mech in MECHANISMS {
            for result in AUTH_RESULTS {
                self.auth_attempts.with_label_values(&[mech, result]);
            }
        }
        for c in [COMMAND_RETR, COMMAND_TOP] {
            self.sent_bytes.with_label_values(&[c]);
        }
        for p in DELIVERY_PROTOCOLS {
            self.delivery_duration.with_label_values(&[p]);
            self.received_bytes.with_label_values(&[p]);
            for result in DELIVERY_RESULTS {
                self.deliveries.with_label_values(&[p, result]);
            }
        }
        for state in HomeState::ALL {
            self.cluster.domains.with_label_values(&[state.name()]);
        }
        for p in ForwardProtocol::ALL {
            for result in [INBOUND_OK, INBOUND_REJECTED] {
                self.cluster.inbound.with_label_values(&[p.name(), result]);
            }
        }
        for result in [MOVE_MOVED, MOVE_FAILED] {
            self.cluster.moves.with_label_values(&[result]);
        }
    }

    /// The exposition text of every registered metric.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        // Encoding into a Vec fails only on metric families the registry itself rejected
        // at registration, so an error leaves whatever was written.
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Creates the command series of a protocol's verbs (and `COMMAND_UNKNOWN`), so their
    /// rates exist before the first command.
    pub fn touch_commands(&self, protocol: &'static str, verbs: &[&str]) {
        for verb in verbs.iter().chain([&COMMAND_UNKNOWN]) {
            for result in [RESULT_OK, RESULT_ERR] {
                self.commands.with_label_values(&[protocol, verb, result]);
            }
        }
    }

    /// Counts a connection admitted to a session on `listener`; the guard keeps it in
    /// the active gauge until dropped.
    pub fn connection_accepted(&self, listener: Listener) -> ActiveGuard {
        self.connections_accepted
            .with_label_values(&[listener.name()])
            .inc();
        ActiveGuard::new(
            self.connections_active
                .with_label_values(&[listener.name()]),
            self.connections_ended.clone(),
        )
    }

    /// Sessions ended since start, on every listener.
    pub fn connections_ended(&self) -> u64 {
        self.connections_ended.load(Ordering::Relaxed)
    }

    /// Counts a connection refused before its session.
    pub fn connection_rejected(&self, listener: Listener, reason: Rejected) {
        self.connections_rejected
            .with_label_values(&[listener.name(), reason.name()])
            .inc();
    }

    /// Counts a TLS handshake (implicit TLS, STLS or STARTTLS) on `listener`.
    pub fn tls_handshake(&self, listener: Listener, result: Handshake) {
        let (result, version) = match result {
            Handshake::Ok(version) => (TLS_OK, version),
            Handshake::Failed => (TLS_FAILED, TLS_VERSION_NONE),
            Handshake::TimedOut => (TLS_TIMEOUT, TLS_VERSION_NONE),
        };
        self.tls_handshakes
            .with_label_values(&[listener.name(), result, version])
            .inc();
    }

    /// Counts a cleartext connection upgraded to TLS; `protocol` is a `PROTOCOL_*`.
    pub fn tls_upgrade(&self, protocol: &'static str) {
        self.tls_upgrades.with_label_values(&[protocol]).inc();
    }

    /// Counts one command of `protocol` by verb and whether it was answered with an error.
    pub fn command(&self, protocol: &'static str, verb: &str, failed: bool) {
        let result = if failed { RESULT_ERR } else { RESULT_OK };
        self.commands
            .with_label_values(&[protocol, verb, result])
            .inc();
    }

    /// Records the latency of a timed command (`TIMED_COMMANDS`).
    pub fn command_duration(&self, command: &'static str, elapsed: Duration) {
        self.command_duration
            .with_label_values(&[command])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a login attempt: `mechanism` a `MECH_*`, `result` an `AUTH_*`.
    pub fn auth_attempt(&self, mechanism: &'static str, result: &'static str) {
        self.auth_attempts
            .with_label_values(&[mechanism, result])
            .inc();
    }

    /// The counter of message bytes sent by `command` (`COMMAND_RETR`, `COMMAND_TOP`).
    pub fn sent_bytes(&self, command: &'static str) -> IntCounter {
        self.sent_bytes.with_label_values(&[command])
    }

    /// Counts one finished session of `listener` by how it ended and how long it took.
    pub fn observe_session(&self, listener: Listener, outcome: Outcome, elapsed: Duration) {
        self.sessions
            .with_label_values(&[listener.name(), outcome.name()])
            .inc();
        self.session_duration
            .with_label_values(&[listener.name()])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one finished delivery: `result` is one of the `DELIVERY_*` values and
    /// `stored` the size of the stored message when it was accepted.
    pub fn observe_delivery(
        &self,
        protocol: &str,
        result: &str,
        elapsed: Duration,
        stored: Option<u64>,
    ) {
        self.deliveries.with_label_values(&[protocol, result]).inc();
        self.delivery_duration
            .with_label_values(&[protocol])
            .observe(elapsed.as_secs_f64());
        if let Some(bytes) = stored {
            self.received_bytes
                .with_label_values(&[protocol])
                .inc_by(bytes);
        }
    }

    /// Creates the per-peer series of the other replicas (names from `cluster.peers`), so
    /// their rates start at zero. `mailgate_cluster_peer_up` is left to the first
    /// connection attempt: a peer never tried is neither up nor down.
    pub fn cluster_peers(&self, peers: &[&str]) {
        let c = &self.cluster;
        for &peer in peers {
            c.peer_connect_duration.with_label_values(&[peer]);
            for p in ForwardProtocol::ALL {
                for result in ForwardResult::ALL {
                    c.forwards
                        .with_label_values(&[peer, p.name(), result.name()]);
                }
            }
            for result in RecipientResult::ALL {
                c.forwarded_recipients
                    .with_label_values(&[peer, result.name()]);
            }
        }
    }

    /// Counts one session or request forwarded to `peer` (a configured replica name).
    pub fn forward(&self, peer: &str, protocol: ForwardProtocol, result: ForwardResult) {
        self.cluster
            .forwards
            .with_label_values(&[peer, protocol.name(), result.name()])
            .inc();
    }

    /// Counts one recipient of a delivery forwarded to its home `peer`, by verdict.
    pub fn forwarded_recipient(&self, peer: &str, result: RecipientResult) {
        self.cluster
            .forwarded_recipients
            .with_label_values(&[peer, result.name()])
            .inc();
    }

    /// Records a connection attempt to `peer`: `Some(time to connect and handshake)` when
    /// it succeeded, `None` when it failed or timed out.
    pub fn peer_connect(&self, peer: &str, elapsed: Option<Duration>) {
        let c = &self.cluster;
        if let Some(elapsed) = elapsed {
            c.peer_connect_duration
                .with_label_values(&[peer])
                .observe(elapsed.as_secs_f64());
        }
        c.peer_up
            .with_label_values(&[peer])
            .set(i64::from(elapsed.is_some()));
    }

    /// Sets the domain counts by home state from one refresh: every state is set, those
    /// not in `counts` to 0 (a state named twice counts the sum).
    pub fn set_cluster_domains(&self, counts: &[(HomeState, i64)]) {
        for state in HomeState::ALL {
            let n = counts
                .iter()
                .filter(|(s, _)| *s == state)
                .map(|(_, n)| n)
                .sum();
            self.cluster
                .domains
                .with_label_values(&[state.name()])
                .set(n);
        }
    }

    /// Counts an announcement that found another replica claiming a domain with the same
    /// epoch.
    pub fn home_conflict(&self) {
        self.cluster.home_conflicts.inc();
    }

    /// Counts a domain move run by this replica; a successful one with how long the
    /// domain was frozen.
    pub fn domain_move(&self, frozen: Option<std::time::Duration>) {
        let result = if frozen.is_some() {
            MOVE_MOVED
        } else {
            MOVE_FAILED
        };
        self.cluster.moves.with_label_values(&[result]).inc();
        if let Some(f) = frozen {
            self.cluster.move_frozen.observe(f.as_secs_f64());
        }
    }

    /// Counts a forwarded session offered on the replica listener: accepted, or rejected
    /// before it started.
    pub fn inbound(&self, protocol: ForwardProtocol, accepted: bool) {
        let result = if accepted {
            INBOUND_OK
        } else {
            INBOUND_REJECTED
        };
        self.cluster
            .inbound
            .with_label_values(&[protocol.name(), result])
            .inc();
    }

    /// Drops the storage gauges of a removed domain (`domain` normalised, as stored).
    pub fn forget_domain(&self, domain: &str) {
        for g in [
            &self.domain_accounts,
            &self.domain_messages,
            &self.domain_stored_bytes,
        ] {
            // Absent when the domain was never counted: nothing to drop.
            let _ = g.remove_label_values(&[domain]);
        }
    }

    /// Sets the expiry gauge of every loaded certificate (names come from the config).
    pub fn set_certificate_expiry(&self, certs: &[(String, i64)]) {
        for (name, not_after) in certs {
            self.certificate_expiry
                .with_label_values(&[name])
                .set(*not_after as f64);
        }
    }

    /// Sets `mailgate_ready` to what `/readyz` answered.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Sets the storage gauges of a hosted domain (`domain` normalised, as stored) from
    /// a count its caller made.
    pub fn set_domain_storage(&self, domain: &str, accounts: u64, messages: u64, octets: u64) {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.domain_accounts
            .with_label_values(&[domain])
            .set(clamp(accounts));
        self.domain_messages
            .with_label_values(&[domain])
            .set(clamp(messages));
        self.domain_stored_bytes
            .with_label_values(&[domain])
            .set(clamp(octets));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_prefixed_and_exported_from_the_start() {
        let m = Metrics::new("local").expect("metrics");
        // The protocols name their verbs at start (`app::start`); one is enough here.
        m.touch_commands(PROTOCOL_POP3, &["QUIT"]);
        m.set_certificate_expiry(&[("default".into(), 1_900_000_000)]);
        let text = m.render();
        for name in [
            CONNECTIONS_ACCEPTED,
            CONNECTIONS_REJECTED,
            CONNECTIONS_ACTIVE,
            TLS_HANDSHAKES,
            TLS_UPGRADES,
            SESSIONS,
            SESSION_DURATION,
            COMMANDS,
            COMMAND_DURATION,
            AUTH_ATTEMPTS,
            SENT_BYTES,
            LOCK_ACQUIRE_DURATION,
            LOCK_CONTENTION,
            LOCK_LOSSES,
            LOCK_RENEWALS,
            REDIS_ERRORS,
            DELIVERIES,
            DELIVERY_DURATION,
            RECEIVED_BYTES,
            CERTIFICATE_EXPIRY,
            BUILD_INFO,
            READY,
            CLUSTER_DOMAINS,
            CLUSTER_HOME_CONFLICTS,
            CLUSTER_INBOUND,
            "mailgate_process_cpu_seconds_total",
            "mailgate_process_resident_memory_bytes",
            "mailgate_process_open_fds",
        ] {
            assert!(name.starts_with("mailgate_"), "{name}");
            assert!(
                text.contains(&format!("\n{name}")),
                "{name} missing from:\n{text}"
            );
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("mailgate_"), "{line}");
        }
    }

    #[test]
    fn cluster_metrics_count_by_peer_and_fixed_labels() {
        let m = Metrics::new("local").expect("metrics");
        let c = &m.cluster;
        let per_peer = [
            CLUSTER_FORWARDS,
            CLUSTER_FORWARDED_RECIPIENTS,
            CLUSTER_PEER_CONNECT_DURATION,
            CLUSTER_PEER_UP,
        ];
        // Not clustered: no peer series, the fixed ones at zero.
        let text = m.render();
        for name in per_peer {
            assert!(!text.contains(&format!("\n{name}")), "{name} in:\n{text}");
        }
        for state in HomeState::ALL {
            assert_eq!(c.domains.with_label_values(&[state.name()]).get(), 0);
        }

        m.cluster_peers(&["b", "c"]);
        let text = m.render();
        assert!(text.contains(
            r#"mailgate_cluster_forwards_total{peer="c",protocol="admin",result="unreachable"} 0"#
        ));
        assert!(text.contains(
            r#"mailgate_cluster_forwarded_recipients_total{peer="b",result="deferred"} 0"#
        ));
        assert!(
            text.contains(r#"mailgate_cluster_peer_connect_duration_seconds_count{peer="b"} 0"#)
        );
        assert!(
            !text.contains(CLUSTER_PEER_UP),
            "untried peers are neither up nor down"
        );

        m.forward("b", ForwardProtocol::Pop3, ForwardResult::Ok);
        m.forward("b", ForwardProtocol::Pop3, ForwardResult::Ok);
        m.forward("c", ForwardProtocol::Lmtp, ForwardResult::Refused);
        let forwards = |peer, p: ForwardProtocol, r: ForwardResult| {
            c.forwards
                .with_label_values(&[peer, p.name(), r.name()])
                .get()
        };
        assert_eq!(forwards("b", ForwardProtocol::Pop3, ForwardResult::Ok), 2);
        assert_eq!(
            forwards("c", ForwardProtocol::Lmtp, ForwardResult::Refused),
            1
        );
        assert_eq!(forwards("c", ForwardProtocol::Pop3, ForwardResult::Ok), 0);

        m.forwarded_recipient("b", RecipientResult::Delivered);
        m.forwarded_recipient("b", RecipientResult::Deferred);
        m.forwarded_recipient("b", RecipientResult::Deferred);
        let recipients = |r: RecipientResult| {
            c.forwarded_recipients
                .with_label_values(&["b", r.name()])
                .get()
        };
        assert_eq!(recipients(RecipientResult::Delivered), 1);
        assert_eq!(recipients(RecipientResult::Rejected), 0);
        assert_eq!(recipients(RecipientResult::Deferred), 2);

        // A success is timed and marks the peer up; a failure only marks it down.
        m.peer_connect("b", Some(Duration::from_millis(3)));
        m.peer_connect("c", None);
        let up = |peer| c.peer_up.with_label_values(&[peer]).get();
        let timed = |peer| c.peer_connect_duration.with_label_values(&[peer]);
        assert_eq!((up("b"), up("c")), (1, 0));
        assert_eq!(
            (timed("b").get_sample_count(), timed("c").get_sample_count()),
            (1, 0)
        );
        assert!((timed("b").get_sample_sum() - 0.003).abs() < 1e-9);
        m.peer_connect("b", None);
        assert_eq!(up("b"), 0);

        // Every state is set at each refresh, unnamed ones to zero.
        m.set_cluster_domains(&[(HomeState::Active, 3), (HomeState::Held, 1)]);
        m.set_cluster_domains(&[(HomeState::Active, 2), (HomeState::Elsewhere, 4)]);
        let domains: Vec<i64> = HomeState::ALL
            .iter()
            .map(|s| c.domains.with_label_values(&[s.name()]).get())
            .collect();
        assert_eq!(domains, [2, 0, 0, 4, 0]);

        m.home_conflict();
        assert_eq!(c.home_conflicts.get(), 1);

        m.domain_move(Some(std::time::Duration::from_millis(300)));
        m.domain_move(None);
        let moves = |r| c.moves.with_label_values(&[r]).get();
        assert_eq!((moves(MOVE_MOVED), moves(MOVE_FAILED)), (1, 1));
        assert_eq!(c.move_frozen.get_sample_count(), 1);
        assert!((c.move_frozen.get_sample_sum() - 0.3).abs() < 1e-9);

        m.inbound(ForwardProtocol::Smtp, true);
        m.inbound(ForwardProtocol::Smtp, false);
        m.inbound(ForwardProtocol::Smtp, false);
        let inbound = |r| c.inbound.with_label_values(&[PROTOCOL_SMTP, r]).get();
        assert_eq!((inbound(INBOUND_OK), inbound(INBOUND_REJECTED)), (1, 2));

        let text = m.render();
        for name in per_peer {
            assert!(text.contains(&format!("\n{name}")), "{name} missing");
        }
    }
}
