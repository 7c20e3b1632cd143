//! One LMTP or SMTP connection: owns the socket, timeouts and the transaction's
//! stores. Commands go through `codec` and `core`; recipients and messages through
//! `delivery` on blocking threads. DATA is streamed: dot-unstuffed, CRLF-normalised
//! and written to every recipient's store in chunks, never held whole. STARTTLS
//! consumes the cleartext connection and continues over TLS.
//! Must not write protocol bytes other than through `Reply`.

use super::codec::{self, Reply, MAX_COMMAND_LINE};
use super::core::{
    self as smtp_core, verdict_reply, Core, CoreLimits, Probe, ProbeLimits, Protocol, Step,
};
use super::forward::{self, Leg, Origin};
use crate::cluster::{Alpn, Cluster, Preamble, Route};
use crate::config::Listener;
use crate::delivery::{self, Batch, Quotas, Verdict};
use crate::metrics::{self, Outcome};
use crate::net::{self, Io, Read, Refusal};
use crate::store::Directory;
use crate::throttle::Windows;
use crate::wire::{CrlfNormalizer, DotUnstuffer};
use bytes::{Buf, BytesMut};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

/// What LMTP and SMTP sessions share: the connection layer, the stores and, on a
/// replica of a cluster, the cluster (where each recipient's domain is served).
pub struct Service {
    pub net: Arc<net::Context>,
    pub directory: Arc<Directory>,
    pub cluster: Option<Arc<Cluster>>,
    /// Refused recipients per SMTP client address, in `smtp.unknown_recipient_window_secs`.
    pub unknown_recipients: Windows<IpAddr>,
}

/// Message bytes gathered before one blocking write to the stores.
const WRITE_CHUNK: usize = 64 * 1024;
/// Room reserved in the read buffer per read; grows only while a client pipelines.
const READ_CHUNK: usize = 4096;

/// Where a connection comes from, as logged and written into Received:.
#[derive(Debug, Clone)]
pub enum Peer {
    Tcp(std::net::SocketAddr),
    /// LMTP over a unix socket: the MTA is local.
    Unix,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// How a command loop ended.
enum End {
    Done(Outcome),
    /// STARTTLS was accepted: hand the stream to TLS.
    StartTls,
}

/// The next command line, or why there is none.
enum Input {
    Line(BytesMut),
    TooLong,
    Closed,
    Timeout,
    Shutdown,
}

/// The next command line. A line already received is taken at once, so a pipelining
/// client's commands are answered together (RFC 2920); otherwise the replies are flushed
/// and the whole line must arrive within `limit` of them going out (RFC 5321
/// §4.5.3.2.7: the server's wait for the next command): a client that drips a byte now
/// and then cannot hold the connection past it.
async fn next_line<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    limit: Duration,
    ctx: &Ctx,
) -> std::io::Result<Input> {
    let mut deadline = None;
    loop {
        if let Some(line) = io.take_line(MAX_COMMAND_LINE) {
            return Ok(match line {
                Ok(l) => Input::Line(l),
                Err(_) => Input::TooLong,
            });
        }
        let until = match deadline {
            Some(at) => at,
            None => {
                io.flush().await?;
                let at = Instant::now() + limit;
                deadline = Some(at);
                at
            }
        };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Input::Timeout);
        }
        match io.fill(Some(left), &ctx.service.net.shutdown, None).await? {
            Read::More => {}
            Read::Closed => return Ok(Input::Closed),
            // The next turn finds the deadline passed.
            Read::Timeout => {}
            // Only POP3 passes a `lost` token.
            Read::Cancelled | Read::Lost => return Ok(Input::Shutdown),
        }
    }
}

fn reply<S>(io: &mut Io<S>, r: &Reply) {
    r.write_to(io.out());
}

/// Per-connection facts and counters.
struct Ctx {
    service: Arc<Service>,
    peer: Peer,
    protocol: Protocol,
    bad_commands: u32,
    /// When the transaction in progress began (MAIL accepted).
    transaction_started: Option<Instant>,
    accepted: u64,
    rejected: u64,
    /// Recipients refused with 550 in this connection (RSET does not reset it).
    refused_recipients: u32,
    bytes_in: u64,
    /// The session id (the front's, for a forwarded session).
    sid: u64,
    /// Whether the client's connection is TLS.
    tls: bool,
    /// Set on a home for a session another replica forwarded: served here or not at all.
    forwarded: Option<Box<Preamble>>,
    /// The transaction's legs to other replicas' domains.
    legs: Vec<Leg>,
    /// For each accepted recipient, in RCPT order: `None` here, or the index of its leg.
    homes: Vec<Option<usize>>,
}

impl Ctx {
    fn new(service: Arc<Service>, peer: Peer, protocol: Protocol, sid: u64) -> Ctx {
        Ctx {
            service,
            peer,
            protocol,
            bad_commands: 0,
            transaction_started: None,
            accepted: 0,
            rejected: 0,
            refused_recipients: 0,
            bytes_in: 0,
            sid,
            tls: false,
            forwarded: None,
            legs: Vec::new(),
            homes: Vec::new(),
        }
    }

    /// The session's last log line.
    fn log_end(&self, outcome: Outcome, started: Instant) {
        info!(
            outcome = outcome.name(),
            tls = self.tls,
            accepted = self.accepted,
            rejected = self.rejected,
            bytes_in = self.bytes_in,
            forwarded = self.forwarded.is_some(),
            duration_ms = started.elapsed().as_millis() as u64,
            "session end"
        );
    }

    fn net(&self) -> &net::Context {
        &self.service.net
    }

    fn label(&self) -> &'static str {
        match self.protocol {
            Protocol::Lmtp => metrics::PROTOCOL_LMTP,
            Protocol::Smtp => metrics::PROTOCOL_SMTP,
        }
    }

    /// How long the next read may wait: the idle timeout, cut short by the end of the
    /// transaction's time budget.
    fn read_limit(&self) -> Duration {
        let delivery = &self.net().config.delivery;
        let idle = delivery.idle_timeout();
        match self.transaction_started {
            Some(t) => idle.min(delivery.transaction_timeout().saturating_sub(t.elapsed())),
            None => idle,
        }
    }

    fn transaction_expired(&self) -> bool {
        self.transaction_started
            .is_some_and(|t| t.elapsed() >= self.net().config.delivery.transaction_timeout())
    }

    fn count(&mut self, verdict: Verdict, elapsed: Duration, stored: Option<u64>) {
        if verdict == Verdict::Accepted {
            self.accepted += 1;
        } else {
            self.rejected += 1;
        }
        let stored = stored.filter(|_| verdict == Verdict::Accepted);
        self.net()
            .metrics
            .observe_delivery(self.label(), verdict_label(verdict), elapsed, stored);
    }
}

/// The `result` label of the deliveries metric for a verdict.
fn verdict_label(v: Verdict) -> &'static str {
    match v {
        Verdict::Accepted => metrics::DELIVERY_ACCEPTED,
        Verdict::UnknownUser => metrics::DELIVERY_UNKNOWN_USER,
        Verdict::RelayDenied => metrics::DELIVERY_RELAY_DENIED,
        Verdict::QuotaFull | Verdict::QuotaTooSmall => metrics::DELIVERY_OVER_QUOTA,
        Verdict::TooBig => metrics::DELIVERY_TOO_BIG,
        Verdict::TempFail | Verdict::StorageFull => metrics::DELIVERY_TEMP_FAILURE,
    }
}

/// The listener a protocol's connections are counted under.
fn listener_of(protocol: Protocol) -> Listener {
    match protocol {
        Protocol::Lmtp => Listener::Lmtp,
        Protocol::Smtp => Listener::Smtp,
    }
}

/// The 421 a connection refused before its session (limits, shutdown) gets.
pub fn refusal(reason: Refusal) -> BytesMut {
    let reply = match reason {
        Refusal::TooManyConnections => {
            Reply::new(421, "4.7.0", "Too many connections, try again later")
        }
        Refusal::TooManyFromPeer => {
            Reply::new(421, "4.7.0", "Too many connections from your address")
        }
        Refusal::ShuttingDown => Reply::new(421, "4.3.2", "Server shutting down"),
        Refusal::NotAllowed => Reply::new(421, "4.7.1", "Not allowed from your address"),
    };
    let mut out = BytesMut::new();
    reply.write_to(&mut out);
    out
}

/// Runs one TCP connection (LMTP or SMTP) to its end.
pub async fn run_tcp(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    protocol: Protocol,
    service: Arc<Service>,
) {
    run(Conn::Tcp(stream), Peer::Tcp(peer), protocol, service).await
}

/// Runs one LMTP connection on the unix socket to its end.
pub async fn run_unix(stream: tokio::net::UnixStream, service: Arc<Service>) {
    run(Conn::Unix(stream), Peer::Unix, Protocol::Lmtp, service).await
}

enum Conn {
    Tcp(TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn run(conn: Conn, peer: Peer, protocol: Protocol, service: Arc<Service>) {
    let net = service.net.clone();
    let listener = listener_of(protocol);
    net::run_session(&net, listener, peer.clone(), |sid| async move {
        let started = Instant::now();
        let mut ctx = Ctx::new(service, peer, protocol, sid);
        let (outcome, tls) = match conn {
            Conn::Tcp(stream) => connection_tcp(stream, &mut ctx).await,
            Conn::Unix(stream) => {
                let mut core = new_core(&ctx, false);
                let idle = ctx.net().config.delivery.idle_timeout();
                let mut io = Io::new(stream, idle, READ_CHUNK);
                reply(&mut io, &core.greeting());
                (finish(serve(&mut io, &mut core, &mut ctx).await), false)
            }
        };
        ctx.tls = tls;
        ctx.log_end(outcome, started);
        outcome
    })
    .await
}

/// Runs a session another replica forwarded (ALPN `mailgate-lmtp/1` or
/// `mailgate-smtp/1`): the front speaks for the client, whose address, TLS state and HELO
/// name come in the preamble.
pub async fn run_forwarded<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    preamble: Preamble,
    input: BytesMut,
    protocol: Protocol,
    service: Arc<Service>,
) {
    let listener = listener_of(protocol);
    let (client, sid) = (preamble.client, preamble.sid);
    let via = preamble.from.clone();
    net::run_forwarded(listener, client, sid, &via, async move {
        let started = Instant::now();
        let tls = preamble.tls;
        let mut ctx = Ctx::new(service, Peer::Tcp(client), protocol, sid);
        ctx.tls = tls;
        ctx.forwarded = Some(Box::new(preamble));
        let mut core = new_core(&ctx, tls);
        let idle = ctx.net().config.delivery.idle_timeout();
        let mut io = Io::with_input(stream, idle, READ_CHUNK, input);
        reply(&mut io, &core.greeting());
        let outcome = finish(serve(&mut io, &mut core, &mut ctx).await);
        // A clean TLS end (close_notify), so the front sees the home finish.
        let mut stream = io.into_stream();
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
        ctx.log_end(outcome, started);
        outcome
    })
    .await
}

fn new_core(ctx: &Ctx, tls_active: bool) -> Core {
    let config = &ctx.net().config;
    let d = &config.delivery;
    Core::new(
        ctx.protocol,
        &config.hostname,
        CoreLimits {
            max_message_bytes: d.max_message_bytes,
            max_recipients: d.max_recipients,
        },
        tls_active,
    )
}

fn finish(end: End) -> Outcome {
    match end {
        End::Done(o) => o,
        // invariant: `core` offers STARTTLS only on a cleartext TCP connection.
        End::StartTls => Outcome::Error,
    }
}

async fn connection_tcp(stream: TcpStream, ctx: &mut Ctx) -> (Outcome, bool) {
    let idle = ctx.net().config.delivery.idle_timeout();
    let mut core = new_core(ctx, false);
    let mut io = Io::new(stream, idle, READ_CHUNK);
    reply(&mut io, &core.greeting());
    match serve(&mut io, &mut core, ctx).await {
        End::Done(o) => (o, false),
        End::StartTls => {
            // Whatever the client pipelined after STARTTLS is dropped with the buffers: it
            // came before the handshake and must not be executed (RFC 3207 §4.2,
            // CVE-2011-0411).
            let listener = listener_of(ctx.protocol);
            let Some(tls) = net::tls_accept(ctx.net(), io.into_stream(), listener).await else {
                return (Outcome::TlsFailed, false);
            };
            ctx.net().metrics.tls_upgrade(ctx.label());
            core.tls_started();
            ctx.tls = true;
            let mut io = Io::new(tls, idle, READ_CHUNK);
            (finish(serve(&mut io, &mut core, ctx).await), true)
        }
    }
}

/// The command loop for one transport.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    core: &mut Core,
    ctx: &mut Ctx,
) -> End {
    let end = command_loop(io, core, ctx).await;
    // Best effort: the last replies (221, 421) go out before the connection closes.
    let _ = io.flush().await;
    close_legs(ctx).await;
    end
}

/// Ends the transaction's legs to other replicas.
async fn close_legs(ctx: &mut Ctx) {
    ctx.homes.clear();
    for leg in ctx.legs.drain(..) {
        leg.close().await;
    }
}

async fn command_loop<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    core: &mut Core,
    ctx: &mut Ctx,
) -> End {
    let max_bad = ctx.net().config.limits.max_bad_commands;
    loop {
        if ctx.transaction_expired() {
            reply(
                io,
                &Reply::new(421, "4.4.2", "Transaction took too long, closing"),
            );
            return End::Done(Outcome::Timeout);
        }
        let input = match next_line(io, ctx.read_limit(), ctx).await {
            Ok(i) => i,
            Err(e) => {
                debug!(error = %e, "connection error");
                return End::Done(Outcome::Dropped);
            }
        };
        let line = match input {
            Input::Line(l) => l,
            Input::TooLong => {
                reply(io, &Reply::new(500, "5.5.2", "Line too long"));
                if bad_command(io, ctx, max_bad) {
                    return End::Done(Outcome::TooManyErrors);
                }
                continue;
            }
            Input::Closed => return End::Done(Outcome::Dropped),
            Input::Timeout => {
                reply(io, &Reply::new(421, "4.4.2", "Timeout, closing connection"));
                return End::Done(Outcome::Timeout);
            }
            Input::Shutdown => {
                reply(io, &Reply::new(421, "4.3.2", "Server shutting down"));
                return End::Done(Outcome::Shutdown);
            }
        };
        let step = match codec::parse(&line, core.smtputf8()) {
            Ok(cmd) => core.command(cmd),
            Err(e) => {
                reply(io, &core.parse_error(&e, &line));
                if bad_command(io, ctx, max_bad) {
                    return End::Done(Outcome::TooManyErrors);
                }
                continue;
            }
        };
        match step {
            Step::Reply(r) => {
                reply(io, &r);
                // 500-503: unknown, malformed or out-of-order commands.
                if (500..=503).contains(&r.code) && bad_command(io, ctx, max_bad) {
                    return End::Done(Outcome::TooManyErrors);
                }
            }
            Step::CheckRecipient(to) => {
                let limits = probe_limits(ctx);
                let ip = client_ip(ctx);
                let used_up =
                    limits.is_some_and(|l| !l.admits(ctx.service.unknown_recipients.count(&ip)));
                if used_up {
                    info!(recipient = %to, "too many unknown recipients from this address");
                    reply(io, &smtp_core::too_many_unknown());
                    return End::Done(Outcome::TooManyErrors);
                }
                let r = recipient(core, ctx, to).await;
                let close = match limits {
                    Some(limits) if r.code == 550 => refused_recipient(ctx, limits, ip).await,
                    _ => false,
                };
                reply(io, &r);
                if close {
                    reply(io, &smtp_core::too_many_unknown());
                    return End::Done(Outcome::TooManyErrors);
                }
            }
            Step::Data => {
                reply(
                    io,
                    &Reply::plain(354, vec!["End data with <CR><LF>.<CR><LF>".into()]),
                );
                let result = receive_data(io, core, ctx).await;
                core.data_done();
                match result {
                    Ok(replies) => {
                        for r in &replies {
                            reply(io, r);
                        }
                    }
                    Err(outcome) => {
                        if outcome == Outcome::Timeout {
                            reply(
                                io,
                                &Reply::new(421, "4.4.2", "Timeout during DATA, closing"),
                            );
                        } else if outcome == Outcome::Shutdown {
                            reply(io, &Reply::new(421, "4.3.2", "Server shutting down"));
                        }
                        return End::Done(outcome);
                    }
                }
            }
            Step::StartTls(r) => {
                reply(io, &r);
                if io.flush().await.is_err() {
                    return End::Done(Outcome::Dropped);
                }
                return End::StartTls;
            }
            Step::Quit(r) => {
                reply(io, &r);
                return End::Done(Outcome::Quit);
            }
        }
        // The transaction's time budget runs from MAIL to the end of DATA.
        if core.in_transaction() {
            ctx.transaction_started.get_or_insert_with(Instant::now);
        } else {
            ctx.transaction_started = None;
            if !ctx.homes.is_empty() || !ctx.legs.is_empty() {
                close_legs(ctx).await;
            }
        }
    }
}

/// Where one RCPT goes: `postmaster` is mapped first; then the recipient's domain is
/// served here (checked against the store), on another replica (asked there, over the
/// transaction's leg to that home) or nowhere for now (451).
async fn recipient(core: &mut Core, ctx: &mut Ctx, to: String) -> Reply {
    let started = Instant::now();
    let postmaster = &ctx.net().config.delivery.postmaster;
    // The store is asked (off the async threads) only for `postmaster`.
    let routed = if delivery::may_reroute(postmaster, &to) {
        let (directory, postmaster) = (ctx.service.directory.clone(), postmaster.clone());
        let rcpt = to.clone();
        tokio::task::spawn_blocking(move || delivery::route(&directory, &postmaster, &rcpt))
            .await
            .unwrap_or_else(|_| to.clone())
    } else {
        to.clone()
    };
    let route = match (&ctx.service.cluster, routed.rsplit_once('@')) {
        (Some(cluster), Some((_, domain))) => cluster.route(domain, ctx.forwarded.is_some()).await,
        _ => Route::Local,
    };
    let home = match &route {
        Route::Forward(peer) => Some(peer.clone()),
        _ => None,
    };
    // SMTP answers DATA once, so one transaction goes to one home (RFC 5321 §3.3: the
    // client sends the others again).
    if core.protocol() == Protocol::Smtp && !matches!(route, Route::Unavailable(_)) {
        let first = ctx
            .homes
            .first()
            .map(|h| h.map(|i| ctx.legs[i].peer.clone()));
        if first.is_some_and(|first| first != home) {
            core.recipient(Verdict::TempFail, routed);
            return forward::other_home();
        }
    }
    match route {
        Route::Local => {
            let size = core.envelope().and_then(|e| e.mail.size).unwrap_or(0);
            let directory = ctx.service.directory.clone();
            let quotas = Quotas::from_config(&ctx.net().config.delivery);
            let rcpt = routed.clone();
            let verdict = tokio::task::spawn_blocking(move || {
                delivery::check_recipient(&directory, &rcpt, size, quotas)
            })
            .await
            .unwrap_or(Verdict::TempFail);
            if verdict == Verdict::Accepted {
                ctx.homes.push(None);
            } else {
                debug!(recipient = %to, ?verdict, "recipient refused");
                ctx.count(verdict, started.elapsed(), None);
            }
            core.recipient(verdict, routed)
        }
        Route::Unavailable(why) => {
            debug!(recipient = %to, reason = why.describe(), "recipient's domain unavailable");
            core.recipient(Verdict::TempFail, routed);
            Reply::new(451, "4.3.0", why.describe())
        }
        Route::Forward(peer) => {
            let index = match ctx.legs.iter().position(|l| l.peer == peer) {
                Some(i) => i,
                None => match open_leg(core, ctx, &peer).await {
                    Ok(leg) => {
                        ctx.legs.push(leg);
                        ctx.legs.len() - 1
                    }
                    Err(refused) => {
                        core.recipient(Verdict::TempFail, routed);
                        return refused;
                    }
                },
            };
            let answer = ctx.legs[index].rcpt(&routed).await;
            let verdict = if answer.code == 250 {
                ctx.homes.push(Some(index));
                Verdict::Accepted
            } else {
                Verdict::TempFail
            };
            core.recipient(verdict, routed);
            answer
        }
    }
}

/// Opens the transaction at another replica for its first recipient there.
async fn open_leg(core: &Core, ctx: &Ctx, peer: &str) -> Result<Leg, Reply> {
    let Some(cluster) = &ctx.service.cluster else {
        return Err(forward::unreachable());
    };
    let Some(envelope) = core.envelope() else {
        return Err(Reply::new(503, "5.5.1", "Need MAIL before RCPT"));
    };
    let client = match &ctx.peer {
        Peer::Tcp(a) => *a,
        // LMTP on the unix socket: the MTA is on this host.
        Peer::Unix => std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let alpn = match ctx.protocol {
        Protocol::Lmtp => Alpn::Lmtp,
        Protocol::Smtp => Alpn::Smtp,
    };
    let origin = Origin {
        client,
        listener: listener_of(ctx.protocol),
        tls: ctx.tls,
        sid: ctx.sid,
        helo: core.helo_name().unwrap_or("unknown"),
    };
    let timeout = ctx.net().config.delivery.idle_timeout();
    Leg::open(
        cluster,
        peer,
        alpn,
        origin,
        &envelope.mail,
        timeout,
        &ctx.net().metrics,
    )
    .await
}

/// The refused-recipient limits of this session: SMTP from the client itself. LMTP comes
/// from the MTA (`lmtp.allow_from`), which must not be slowed down for the unknown users
/// of its queue; a home leaves them to the replica the client reached, which counts the
/// refusals it relays too.
fn probe_limits(ctx: &Ctx) -> Option<ProbeLimits> {
    if ctx.protocol != Protocol::Smtp || ctx.forwarded.is_some() {
        return None;
    }
    let smtp = &ctx.net().config.smtp;
    Some(ProbeLimits {
        delay_after: smtp.unknown_recipients_before_delay,
        max_per_connection: smtp.max_unknown_recipients,
        max_per_ip: smtp.max_unknown_recipients_per_ip,
    })
}

/// The client group refused recipients are counted under: the address, an IPv6 client by
/// its network of `limits.ipv6_prefix_len` bits (as the connection limit counts them).
fn client_ip(ctx: &Ctx) -> IpAddr {
    match &ctx.peer {
        Peer::Tcp(a) => {
            crate::config::client_group(a.ip(), ctx.net().config.limits.ipv6_prefix_len)
        }
        Peer::Unix => IpAddr::from([127, 0, 0, 1]),
    }
}

/// Counts a refused recipient and waits as long as the limits say; true when the
/// connection must close after this answer.
async fn refused_recipient(ctx: &mut Ctx, limits: ProbeLimits, ip: IpAddr) -> bool {
    ctx.refused_recipients = ctx.refused_recipients.saturating_add(1);
    let from_ip = ctx.service.unknown_recipients.record(ip);
    match limits.refused(ctx.refused_recipients, from_ip) {
        Probe::Answer => false,
        Probe::Delay => {
            let delay = ctx.net().config.smtp.unknown_recipient_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = ctx.net().shutdown.cancelled() => {}
            }
            false
        }
        Probe::Close => {
            info!(
                refused = ctx.refused_recipients,
                from_address = from_ip,
                "too many unknown recipients: closing"
            );
            true
        }
    }
}

/// Counts a bad command; true when the connection must close (after a 421 queued).
fn bad_command<S>(io: &mut Io<S>, ctx: &mut Ctx, max: u32) -> bool {
    ctx.bad_commands += 1;
    if ctx.bad_commands >= max {
        reply(
            io,
            &Reply::new(421, "4.7.0", "Too many errors, closing connection"),
        );
        return true;
    }
    false
}

/// `Return-Path:` and `Received:` (RFC 5321 §4.4), the first lines of every copy.
fn trace_headers(core: &Core, ctx: &Ctx, from: &str, recipients: &[String]) -> Vec<u8> {
    let now = time::OffsetDateTime::now_utc();
    let date = now
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let helo = core.helo_name().unwrap_or("unknown");
    let from_part = match &ctx.peer {
        Peer::Tcp(a) => format!("{helo} ([{}])", a.ip()),
        Peer::Unix => helo.to_owned(),
    };
    let id: u64 = rand::random();
    // "for" only names a single recipient: copies for several must not reveal the others.
    let for_part = match recipients {
        [one] => format!("\r\n\tfor <{one}>"),
        _ => String::new(),
    };
    format!(
        "Return-Path: <{from}>\r\nReceived: from {from_part}\r\n\tby {host} (mailgate) with {with} id {id:016x}{for_part};\r\n\t{date}\r\n",
        host = ctx.net().config.hostname,
        with = core.received_with(),
    )
    .into_bytes()
}

/// Streams one message from the client into the recipients' stores and returns the
/// replies: one (SMTP) or one per accepted recipient (LMTP). `Err` ends the connection;
/// whatever was stored of the message is discarded.
async fn receive_data<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    core: &Core,
    ctx: &mut Ctx,
) -> Result<Vec<Reply>, Outcome> {
    let started = Instant::now();
    let Some(envelope) = core.envelope().cloned() else {
        return Ok(vec![Reply::new(503, "5.5.1", "Need MAIL before DATA")]);
    };
    let max = ctx.net().config.delivery.max_message_bytes;
    let directory = ctx.service.directory.clone();
    // Recipients served here; the others go to their homes over the legs.
    let local: Vec<String> = envelope
        .recipients
        .iter()
        .zip(ctx.homes.iter().copied().chain(std::iter::repeat(None)))
        .filter(|(_, home)| home.is_none())
        .map(|(r, _)| r.clone())
        .collect();
    let recipients = local.clone();
    let mut batch = blocking(move || Batch::begin(&directory, &recipients)).await?;
    let mut relaying = false;
    for leg in &mut ctx.legs {
        relaying |= leg.data().await;
    }
    let mut staged = trace_headers(core, ctx, &envelope.mail.from, &envelope.recipients);
    let mut unstuffer = DotUnstuffer::new();
    let mut normalizer = CrlfNormalizer::new();
    let mut decoded = BytesMut::with_capacity(WRITE_CHUNK);
    let mut body_octets = 0u64;
    let mut too_big = false;
    loop {
        if !io.input().is_empty() {
            let before = decoded.len();
            let step = unstuffer.decode(io.input(), &mut decoded);
            if relaying {
                // The homes get the bytes as the client sent them, dot-stuffing and all.
                let raw = io.input().split_to(step.consumed);
                for leg in &mut ctx.legs {
                    leg.write(&raw).await;
                }
            } else {
                io.input().advance(step.consumed);
            }
            ctx.bytes_in += step.consumed as u64;
            body_octets += (decoded.len() - before) as u64;
            if body_octets > max {
                // Keep reading to the terminator so the client gets its 552, but store
                // nothing more.
                too_big = true;
                decoded.clear();
                staged.clear();
            } else {
                normalizer.push(&decoded, &mut staged);
                decoded.clear();
            }
            if staged.len() >= WRITE_CHUNK && !too_big {
                let chunk = std::mem::take(&mut staged);
                let (b, mut chunk) = blocking(move || {
                    batch.write(&chunk);
                    (batch, chunk)
                })
                .await?;
                batch = b;
                chunk.clear();
                staged = chunk;
            }
            if step.done {
                break;
            }
            continue;
        }
        if ctx.transaction_expired() {
            discard(batch);
            return Err(Outcome::Timeout);
        }
        // SIGTERM lets a DATA in progress finish; only the end of the grace period
        // (`abort`) cuts it off.
        match io
            .fill(Some(ctx.read_limit()), &ctx.net().abort, None)
            .await
        {
            Ok(Read::More) => {}
            Ok(Read::Timeout) => {
                discard(batch);
                return Err(Outcome::Timeout);
            }
            Ok(Read::Cancelled | Read::Lost) => {
                discard(batch);
                return Err(Outcome::Shutdown);
            }
            Ok(Read::Closed) | Err(_) => {
                discard(batch);
                debug!("client went away during DATA; nothing stored");
                return Err(Outcome::Dropped);
            }
        }
    }
    let verdicts = if too_big {
        discard(batch);
        vec![Verdict::TooBig; local.len()]
    } else if !serves_here(ctx, &local).await {
        // Fencing: this replica stopped being the home of a local recipient's domain
        // while the message came in; the client sends it again to the new home.
        discard(batch);
        vec![Verdict::TempFail; local.len()]
    } else {
        normalizer.finish(&mut staged);
        let quotas = Quotas::from_config(&ctx.net().config.delivery);
        let count = local.len();
        match core.protocol() {
            Protocol::Lmtp => {
                blocking(move || {
                    batch.write(&staged);
                    batch.finish_each(quotas)
                })
                .await?
            }
            // One reply for all: every recipient shares the first refusal's verdict.
            Protocol::Smtp => {
                let result = blocking(move || {
                    batch.write(&staged);
                    batch.finish_all(quotas)
                })
                .await?;
                match result {
                    Ok(()) => vec![Verdict::Accepted; count],
                    Err((_, v)) => vec![v; count],
                }
            }
        }
    };
    let elapsed = started.elapsed();
    for v in &verdicts {
        ctx.count(*v, elapsed, Some(body_octets));
    }
    info!(
        from = %envelope.mail.from,
        recipients = envelope.recipients.len(),
        accepted = verdicts.iter().filter(|v| **v == Verdict::Accepted).count(),
        forwarded = envelope.recipients.len() - local.len(),
        octets = body_octets,
        "message received"
    );
    let here = data_replies(core.protocol(), &verdicts);
    if ctx.legs.is_empty() {
        return Ok(here);
    }
    let metrics = ctx.net().metrics.clone();
    let mut there = Vec::with_capacity(ctx.legs.len());
    for leg in &mut ctx.legs {
        there.push(std::collections::VecDeque::from(leg.finish(&metrics).await));
    }
    Ok(match core.protocol() {
        // In RCPT order, each recipient's answer from where it was delivered.
        Protocol::Lmtp => {
            let mut here = here.into_iter();
            ctx.homes
                .iter()
                .map(|home| {
                    let next = match home {
                        None => here.next(),
                        Some(i) => there.get_mut(*i).and_then(|q| q.pop_front()),
                    };
                    next.unwrap_or_else(forward::unreachable)
                })
                .collect()
        }
        // One transaction, one home: its answer is the answer.
        Protocol::Smtp => vec![there
            .first_mut()
            .and_then(|q| q.pop_front())
            .unwrap_or_else(forward::unreachable)],
    })
}

/// Whether every domain of `local` is still served here (always, outside a cluster).
async fn serves_here(ctx: &Ctx, local: &[String]) -> bool {
    let Some(cluster) = &ctx.service.cluster else {
        return true;
    };
    let mut domains: Vec<&str> = local
        .iter()
        .filter_map(|r| r.rsplit_once('@').map(|(_, d)| d))
        .collect();
    domains.sort_unstable();
    domains.dedup();
    for domain in domains {
        if !cluster.may_commit(domain).await {
            return false;
        }
    }
    true
}

/// The replies to the end of DATA: LMTP answers once per recipient in RCPT order
/// (RFC 2033 §4.2); SMTP once for the message.
fn data_replies(protocol: Protocol, verdicts: &[Verdict]) -> Vec<Reply> {
    let delivered = || Reply::new(250, "2.0.0", "Message accepted for delivery");
    match protocol {
        Protocol::Lmtp => verdicts
            .iter()
            .map(|v| match v {
                Verdict::Accepted => delivered(),
                other => verdict_reply(*other),
            })
            .collect(),
        Protocol::Smtp => {
            let reply = match verdicts.iter().find(|v| **v != Verdict::Accepted) {
                None => delivered(),
                Some(v) => verdict_reply(*v),
            };
            vec![reply]
        }
    }
}

/// Runs store work on a blocking thread; a panic there ends the connection.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Outcome> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        warn!(error = %e, "store task failed");
        Outcome::Error
    })
}

/// Drops an unfinished message on a blocking thread (removing its parts touches sled).
fn discard(batch: Batch) {
    tokio::task::spawn_blocking(move || drop(batch));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lmtp_answers_per_recipient_smtp_once() {
        let verdicts = [Verdict::Accepted, Verdict::UnknownUser, Verdict::QuotaFull];
        let lmtp = data_replies(Protocol::Lmtp, &verdicts);
        assert_eq!(
            lmtp.iter().map(|r| r.code).collect::<Vec<_>>(),
            vec![250, 550, 452]
        );
        let smtp = data_replies(Protocol::Smtp, &verdicts);
        assert_eq!(smtp.len(), 1);
        assert_eq!(
            smtp[0].code, 550,
            "the first failure speaks for the message"
        );
        let ok = data_replies(Protocol::Smtp, &[Verdict::Accepted, Verdict::Accepted]);
        assert_eq!(ok[0].code, 250);
    }
}
