//! One POP3 connection: owns the socket, timeouts and the AUTHORIZATION → TRANSACTION →
//! UPDATE state; the single `gate` that decides what is allowed when, and the single
//! `dispatch` over commands. Logins are `login`'s, the listing commands `maildrop`'s,
//! RETR/TOP and UPDATE `retrieve`'s; parsing and reply bytes come from `codec`. STLS
//! consumes the cleartext connection and continues over TLS.
//! Must not write protocol bytes other than through `Reply` and `BodyEncoder`.

use super::accounts::{Authenticator, LoginError};
use super::codec::{
    verb_of, BodyOptions, Capabilities, Command, ParseError, Reply, RespCode, MAX_COMMAND_LINE,
};
use super::forward::{self, Elsewhere, Handoff};
use super::{login, maildrop, retrieve};
use crate::auth;
use crate::cluster::{Cluster, Preamble};
use crate::config::Listener;
use crate::locks::{LockBackend, MaildropLock};
use crate::metrics::{self, Outcome};
use crate::net::{self, Io, Read, Refusal};
use crate::store::{Address, DomainStore, StoreError};
use bytes::BytesMut;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What POP3 sessions share: the connection layer, the authenticator, the maildrop
/// locks and, on a replica of a cluster, the cluster (where each domain is served).
/// Built once at start.
pub struct Service {
    pub net: Arc<net::Context>,
    pub logins: Arc<dyn Authenticator>,
    pub locks: Arc<dyn LockBackend>,
    pub cluster: Option<Arc<Cluster>>,
}

/// SASL mechanisms offered wherever authentication is allowed.
const SASL_MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256"];
const IMPLEMENTATION: &str = concat!("mailgate ", env!("CARGO_PKG_VERSION"));
/// Room reserved in the read buffer per read; command lines are at most 255 octets.
const READ_CHUNK: usize = 512;
/// Output is written to the socket once this much is buffered: during RETR/TOP, and
/// between the pieces of a LIST/UIDL listing and after it, so that a client pipelining
/// those commands without reading the answers cannot make the server hold them. (Other
/// replies are short, and at most one read's worth of commands, 512 octets, is answered
/// before the next flush.)
pub(super) const FLUSH_AT: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("message {0} ended before its recorded size")]
    Truncated(u64),
    #[error(transparent)]
    Login(#[from] LoginError),
    /// `limits.login_timeout_secs` passed before a login succeeded.
    #[error("not logged in within the login time limit")]
    LoginTimeout,
}

/// Maps an error to what the client is told, if anything, before hanging up (RFC
/// 2449/3206 codes). Every session error ends the connection, since after an I/O or
/// store failure mid-reply the stream can no longer be trusted.
fn error_reply(e: &SessionError) -> Option<Reply<'static>> {
    match e {
        SessionError::Io(_) => None,
        SessionError::LoginTimeout => {
            Some(err(None, "Login time limit reached, closing connection"))
        }
        SessionError::Store(_)
        | SessionError::Join(_)
        | SessionError::Truncated(_)
        | SessionError::Login(_) => Some(Reply::Err(
            Some(RespCode::SysTemp),
            Cow::Borrowed("Internal error, try again later"),
        )),
    }
}

/// The next line, or why there is none.
pub(super) enum Input {
    Line(BytesMut),
    TlsHello,
    TooLong,
    Closed,
    Timeout,
    Cancelled,
    LockLost,
    /// The login deadline passed (only while one is given).
    LoginDeadline,
}

/// A POP3 connection's I/O, and whether the last reply was `-ERR` (the result of the
/// command just answered, for the commands metric).
pub(super) struct Conn<S> {
    pub io: Io<S>,
    pub last_err: bool,
    /// Until the first line is complete, check whether the client started a TLS handshake.
    sniff_tls_hello: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(io: Io<S>) -> Self {
        Conn {
            io,
            last_err: false,
            sniff_tls_hello: false,
        }
    }

    pub fn reply(&mut self, r: &Reply<'_>) {
        self.last_err = matches!(r, Reply::Err(..));
        r.write_to(self.io.out());
    }

    /// Like `reply` for a reply that may be long: a listing is written in pieces of
    /// about `FLUSH_AT` octets, each sent (waiting for the client to take it) before the
    /// next is made, and output is sent once `FLUSH_AT` octets are pending.
    pub async fn send(&mut self, r: &Reply<'_>) -> Result<(), SessionError> {
        self.last_err = matches!(r, Reply::Err(..));
        match r.listing() {
            Some(mut listing) => {
                while !listing.write_to(self.io.out(), FLUSH_AT) {
                    self.flush().await?;
                }
            }
            None => r.write_to(self.io.out()),
        }
        if self.io.out().len() >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), SessionError> {
        Ok(self.io.flush().await?)
    }

    /// The next line of at most `max` octets, or why there is none. A line already
    /// received is taken at once (pipelined commands are answered together); otherwise
    /// the pending replies go out and the whole line must then arrive within the idle
    /// timeout (RFC 1939's autologout timer), so a client dripping a byte now and then
    /// cannot hold the connection. With a `deadline` (before login), no line is taken
    /// after it and no read waits past it, however busy the client keeps the connection.
    pub async fn next(
        &mut self,
        max: usize,
        cancel: &CancellationToken,
        lost: Option<&CancellationToken>,
        deadline: Option<Instant>,
    ) -> Result<Input, SessionError> {
        let mut line_deadline = None;
        loop {
            let login_left = match deadline {
                Some(at) => match at.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Ok(Input::LoginDeadline),
                },
                None => None,
            };
            if self.sniff_tls_hello && self.io.input().len() >= 2 {
                if self.io.input().starts_with(&[0x16, 0x03]) {
                    return Ok(Input::TlsHello);
                }
                self.sniff_tls_hello = false;
            }
            if let Some(line) = self.io.take_line(max) {
                self.sniff_tls_hello = false;
                return Ok(match line {
                    Ok(l) => Input::Line(l),
                    Err(_) => Input::TooLong,
                });
            }
            let until = match line_deadline {
                Some(at) => at,
                None => {
                    self.flush().await?;
                    let at = Instant::now() + self.io.idle();
                    line_deadline = Some(at);
                    at
                }
            };
            let line_left = until.saturating_duration_since(Instant::now());
            if line_left.is_zero() {
                return Ok(Input::Timeout);
            }
            let limit = login_left.map_or(line_left, |left| left.min(line_left));
            match self.io.fill(Some(limit), cancel, lost).await? {
                // Either deadline: the next turn says which.
                Read::Timeout | Read::More => {}
                Read::Closed => return Ok(Input::Closed),
                Read::Cancelled => return Ok(Input::Cancelled),
                Read::Lost => return Ok(Input::LockLost),
            }
        }
    }
}

/// Per-connection facts and counters.
pub(super) struct Ctx {
    pub service: Arc<Service>,
    pub peer: SocketAddr,
    pub listener: Listener,
    pub tls: bool,
    pub apop_timestamp: Option<String>,
    /// The session id (the front's, for a forwarded session).
    pub sid: u64,
    /// Set on a home for a session another replica forwarded: it is served here or not
    /// at all.
    pub forwarded: Option<Box<Preamble>>,
    bad_commands: u32,
    pub auth_failures: u32,
    /// When a session still not logged in is closed (`limits.login_timeout_secs` after
    /// it was accepted, or after a forwarded session reached this home).
    pub login_deadline: Instant,
    pub user: Option<String>,
    pub retrieved: u32,
    pub deleted: u32,
    pub bytes_out: u64,
}

impl Ctx {
    fn new(
        service: Arc<Service>,
        peer: SocketAddr,
        listener: Listener,
        sid: u64,
        apop_timestamp: Option<String>,
    ) -> Ctx {
        let login_deadline = Instant::now() + service.net.config.limits.login_timeout();
        Ctx {
            service,
            peer,
            listener,
            tls: false,
            apop_timestamp,
            sid,
            forwarded: None,
            bad_commands: 0,
            auth_failures: 0,
            login_deadline,
            user: None,
            retrieved: 0,
            deleted: 0,
            bytes_out: 0,
        }
    }

    /// The session's last log line.
    fn log_end(&self, outcome: Outcome, started: Instant) {
        info!(
            outcome = outcome.name(),
            user = self.user.as_deref().unwrap_or("-"),
            tls = self.tls,
            retrieved = self.retrieved,
            deleted = self.deleted,
            bytes_out = self.bytes_out,
            forwarded = self.forwarded.is_some(),
            duration_ms = started.elapsed().as_millis() as u64,
            "session end"
        );
    }

    pub fn net(&self) -> &net::Context {
        &self.service.net
    }

    pub fn body_options(&self) -> BodyOptions {
        BodyOptions {
            replace_nul: self.net().config.pop3.replace_nul,
        }
    }
}

/// The open maildrop of the TRANSACTION state.
pub(super) struct Txn {
    pub address: Address,
    pub store: Arc<DomainStore>,
    /// Taken out and released at UPDATE, before the final answer is sent.
    pub lock: Option<MaildropLock>,
    pub lost: CancellationToken,
    /// Ends the session without UPDATE: server shutdown, or the domain moving away.
    pub cancel: CancellationToken,
    pub listing: maildrop::Listing,
}

enum Phase {
    Authorization { user: Option<String> },
    Transaction(Box<Txn>),
}

/// What `serve` asks of its caller.
pub(super) enum Step {
    Done(Outcome),
    /// STLS accepted: hand the raw stream to the TLS handshake.
    StartTls,
    /// The login name belongs to another replica's domain: relay the session there.
    Forward(Box<Handoff>),
}

pub(super) fn err(code: Option<RespCode>, text: &'static str) -> Reply<'static> {
    Reply::Err(code, Cow::Borrowed(text))
}

pub(super) fn ok(text: &'static str) -> Reply<'static> {
    Reply::Ok(Cow::Borrowed(text))
}

/// The bytes a refused connection gets: `-ERR [SYS/TEMP]` on the cleartext port; on the
/// implicit-TLS port the client expects a handshake, not text, so nothing.
pub fn refusal(listener: Listener, reason: Refusal) -> Option<BytesMut> {
    if listener != Listener::Pop3 {
        return None;
    }
    let text = match reason {
        Refusal::TooManyConnections => "Too many connections, try again later",
        Refusal::TooManyFromPeer => "Too many connections from your address",
        Refusal::ShuttingDown => "Server shutting down",
        Refusal::NotAllowed => "Not allowed from your address",
    };
    let mut out = BytesMut::new();
    err(Some(RespCode::SysTemp), text).write_to(&mut out);
    Some(out)
}

/// Runs one connection to its end.
pub async fn run(stream: TcpStream, peer: SocketAddr, listener: Listener, service: Arc<Service>) {
    let net = service.net.clone();
    net::run_session(&net, listener, peer, |sid| async move {
        let started = Instant::now();
        let config = &service.net.config;
        let apop = config
            .pop3
            .apop
            .then(|| auth::apop::make_timestamp(&config.hostname));
        let mut ctx = Ctx::new(service.clone(), peer, listener, sid, apop);
        let outcome = connection(stream, &mut ctx).await;
        ctx.log_end(outcome, started);
        outcome
    })
    .await
}

/// Runs a session another replica forwarded after reading its login name: no greeting
/// (the front sent it), the client's address, TLS state and APOP timestamp from the
/// preamble, the login command first in `stream`.
pub async fn run_forwarded<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    preamble: Preamble,
    input: BytesMut,
    service: Arc<Service>,
) {
    let (listener, client, sid) = (preamble.listener, preamble.client, preamble.sid);
    let via = preamble.from.clone();
    net::run_forwarded(listener, client, sid, &via, async move {
        let started = Instant::now();
        let mut ctx = Ctx::new(service, client, listener, sid, preamble.apop.clone());
        ctx.tls = preamble.tls;
        ctx.forwarded = Some(Box::new(preamble));
        let idle = ctx.net().config.limits.idle_timeout();
        let mut conn = Conn::new(Io::with_input(stream, idle, READ_CHUNK, input));
        let outcome = match serve(&mut conn, &mut ctx).await {
            Step::Done(o) => o,
            // invariant: `gate` refuses STLS on a forwarded session, and a home never
            // forwards.
            Step::StartTls | Step::Forward(_) => Outcome::Error,
        };
        close_link(conn.io.into_stream()).await;
        ctx.log_end(outcome, started);
        outcome
    })
    .await
}

/// Ends a forwarded session's link with a TLS close_notify, so the front sees a clean end
/// rather than a truncated stream.
async fn close_link<S: AsyncWrite + Unpin>(mut stream: S) {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.shutdown()).await;
}

async fn connection(stream: TcpStream, ctx: &mut Ctx) -> Outcome {
    let idle = ctx.net().config.limits.idle_timeout();
    match ctx.listener {
        Listener::Pop3 => {
            let mut conn = Conn::new(Io::new(stream, idle, READ_CHUNK));
            greet(&mut conn, ctx);
            match serve(&mut conn, ctx).await {
                Step::Done(outcome) => outcome,
                Step::Forward(handoff) => forward::relay(conn, ctx, *handoff).await,
                Step::StartTls => {
                    // Anything the client pipelined after STLS is dropped with the
                    // buffers: it arrived before the handshake and must not be executed.
                    let Some(tls) = handshake(conn.io.into_stream(), ctx).await else {
                        return Outcome::TlsFailed;
                    };
                    ctx.net().metrics.tls_upgrade(metrics::PROTOCOL_POP3);
                    let mut conn = Conn::new(Io::new(tls, idle, READ_CHUNK));
                    let step = serve(&mut conn, ctx).await;
                    finish(step, conn, ctx).await
                }
            }
        }
        // Implicit TLS: the handshake comes before the greeting.
        _ => {
            let Some(tls) = handshake(stream, ctx).await else {
                return Outcome::TlsFailed;
            };
            let mut conn = Conn::new(Io::new(tls, idle, READ_CHUNK));
            greet(&mut conn, ctx);
            let step = serve(&mut conn, ctx).await;
            finish(step, conn, ctx).await
        }
    }
}

/// The end of a TLS connection's session: done, or relayed to the home.
async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
    step: Step,
    conn: Conn<S>,
    ctx: &Ctx,
) -> Outcome {
    match step {
        Step::Done(o) => o,
        Step::Forward(handoff) => forward::relay(conn, ctx, *handoff).await,
        // invariant: `gate` refuses STLS once the connection is TLS.
        Step::StartTls => Outcome::Error,
    }
}

async fn handshake(
    stream: TcpStream,
    ctx: &mut Ctx,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let tls = net::tls_accept(ctx.net(), stream, ctx.listener).await?;
    ctx.tls = true;
    Some(tls)
}

fn greet<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Conn<S>, ctx: &Ctx) {
    conn.reply(&Reply::Greeting {
        hostname: &ctx.net().config.hostname,
        apop_timestamp: ctx.apop_timestamp.as_deref(),
    });
}

/// The command loop for one transport (cleartext or TLS).
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Conn<S>, ctx: &mut Ctx) -> Step {
    let mut phase = Phase::Authorization { user: None };
    let step = command_loop(conn, ctx, &mut phase).await;
    let step = match step {
        Ok(step) => {
            // Deliver a final answer (e.g. "too many invalid commands") before closing.
            let _ = conn.flush().await;
            step
        }
        Err(e) => {
            if !matches!(e, SessionError::Io(_) | SessionError::LoginTimeout) {
                warn!(error = %e, "session failed");
            }
            if let Some(r) = error_reply(&e) {
                conn.reply(&r);
                let _ = conn.flush().await;
            }
            Step::Done(match e {
                SessionError::Io(_) => Outcome::Dropped,
                SessionError::LoginTimeout => Outcome::Timeout,
                _ => Outcome::Error,
            })
        }
    };
    if let Phase::Transaction(mut txn) = phase {
        if let Some(lock) = txn.lock.take() {
            lock.release().await;
        }
    }
    step
}

async fn command_loop<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &mut Ctx,
    phase: &mut Phase,
) -> Result<Step, SessionError> {
    // A TLS ClientHello (record type 0x16, version 3.x) as the first bytes on the
    // cleartext port is a client configured for POP3S on the wrong port: say so and
    // close rather than answer its binary record line by line.
    conn.sniff_tls_hello = ctx.listener == Listener::Pop3 && !ctx.tls;
    loop {
        let (cancel, lost, deadline) = match phase {
            Phase::Authorization { .. } => {
                (ctx.net().shutdown.clone(), None, Some(ctx.login_deadline))
            }
            Phase::Transaction(txn) => (txn.cancel.clone(), Some(txn.lost.clone()), None),
        };
        let input = conn
            .next(MAX_COMMAND_LINE, &cancel, lost.as_ref(), deadline)
            .await?;
        let line = match input {
            Input::Line(line) => line,
            Input::TooLong => {
                if bad_command(conn, ctx, err(None, "Line too long")) {
                    return Ok(Step::Done(Outcome::TooManyErrors));
                }
                continue;
            }
            Input::Closed => return Ok(Step::Done(Outcome::Dropped)),
            Input::TlsHello => {
                conn.reply(&err(
                    None,
                    "TLS handshake on the cleartext port: use STLS or the POP3S port",
                ));
                let _ = conn.flush().await;
                return Ok(Step::Done(Outcome::TlsFailed));
            }
            Input::LoginDeadline => return Err(SessionError::LoginTimeout),
            Input::Timeout => {
                conn.reply(&err(None, "Disconnected for inactivity"));
                let _ = conn.flush().await;
                return Ok(Step::Done(Outcome::Timeout));
            }
            Input::Cancelled
                if !ctx.net().abort.is_cancelled() && !ctx.net().shutdown.is_cancelled() =>
            {
                conn.reply(&err(
                    Some(RespCode::SysTemp),
                    "Domain moving to another server, no changes were made",
                ));
                let _ = conn.flush().await;
                return Ok(Step::Done(Outcome::Shutdown));
            }
            Input::Cancelled => {
                conn.reply(&err(Some(RespCode::SysTemp), "Server shutting down"));
                let _ = conn.flush().await;
                return Ok(Step::Done(Outcome::Shutdown));
            }
            Input::LockLost => {
                ctx.net().metrics.lock.losses.inc();
                conn.reply(&err(
                    Some(RespCode::SysTemp),
                    "Maildrop lock lost, no changes were made",
                ));
                let _ = conn.flush().await;
                return Ok(Step::Done(Outcome::LockLost));
            }
        };
        let command = match Command::parse(&line) {
            Ok(c) => c,
            Err(e) => {
                let reply = match e {
                    ParseError::Empty | ParseError::Unknown => err(None, "Unknown command"),
                    ParseError::Syntax(msg) => Reply::Err(None, Cow::Borrowed(msg)),
                };
                count_command(
                    ctx,
                    verb_of(&line).unwrap_or(metrics::COMMAND_UNKNOWN),
                    true,
                );
                if bad_command(conn, ctx, reply) {
                    return Ok(Step::Done(Outcome::TooManyErrors));
                }
                continue;
            }
        };
        drop(line);
        let verb = command.verb();
        if let Err(reply) = gate(&command, Gate::of(ctx, phase)) {
            count_command(ctx, verb, true);
            if bad_command(conn, ctx, reply) {
                return Ok(Step::Done(Outcome::TooManyErrors));
            }
            continue;
        }
        let step = dispatch(command, conn, ctx, phase).await;
        count_command(ctx, verb, step.is_err() || conn.last_err);
        if let Some(step) = step? {
            return Ok(step);
        }
    }
}

fn count_command(ctx: &Ctx, verb: &str, failed: bool) {
    ctx.net()
        .metrics
        .command(metrics::PROTOCOL_POP3, verb, failed);
}

/// Answers a bad command; true when the client has used up its allowance.
fn bad_command<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &mut Ctx,
    reply: Reply<'_>,
) -> bool {
    ctx.bad_commands += 1;
    if ctx.bad_commands >= ctx.net().config.limits.max_bad_commands {
        conn.reply(&err(None, "Too many invalid commands, closing connection"));
        return true;
    }
    conn.reply(&reply);
    false
}

/// The facts about a connection that decide what it may do.
#[derive(Debug, Clone, Copy)]
struct Gate {
    before_login: bool,
    tls: bool,
    cleartext_port: bool,
    plaintext_allowed: bool,
    apop: bool,
    /// `pop3.last`: LAST is answered.
    last: bool,
}

impl Gate {
    fn of(ctx: &Ctx, phase: &Phase) -> Gate {
        Gate {
            before_login: matches!(phase, Phase::Authorization { .. }),
            tls: ctx.tls,
            // STLS is the front's: a forwarded session is past it.
            cleartext_port: ctx.listener == Listener::Pop3 && ctx.forwarded.is_none(),
            plaintext_allowed: ctx.net().config.pop3.allow_plaintext_auth,
            apop: ctx.apop_timestamp.is_some(),
            last: ctx.net().config.pop3.last,
        }
    }
}

/// The one place that decides which command is allowed in which state, and with or
/// without TLS.
fn gate(command: &Command, g: Gate) -> Result<(), Reply<'static>> {
    use Command as C;
    let in_auth = g.before_login;
    match command {
        C::Capa | C::Quit => Ok(()),
        C::Stls => {
            if !in_auth {
                Err(err(None, "STLS is only valid before login"))
            } else if g.tls {
                Err(err(None, "Already using TLS"))
            } else if !g.cleartext_port {
                Err(err(None, "STLS is not offered here"))
            } else {
                Ok(())
            }
        }
        C::User(_) | C::Pass(_) | C::Apop { .. } | C::Auth { .. } | C::AuthList => {
            if !in_auth {
                Err(err(None, "Already logged in"))
            } else if !(g.tls || g.plaintext_allowed) {
                Err(err(
                    Some(RespCode::Auth),
                    "Plaintext authentication disallowed on non-secure connections, use STLS",
                ))
            } else if matches!(command, C::Apop { .. }) && !g.apop {
                Err(err(None, "APOP is not offered"))
            } else {
                Ok(())
            }
        }
        C::Stat
        | C::List(_)
        | C::Retr(_)
        | C::Dele(_)
        | C::Noop
        | C::Rset
        | C::Top { .. }
        | C::Uidl(_)
        | C::Last => {
            if in_auth {
                Err(err(None, "Command not valid before login"))
            } else if matches!(command, C::Last) && !g.last {
                Err(err(None, "LAST is not offered, use UIDL"))
            } else {
                Ok(())
            }
        }
    }
}

/// The single dispatch over commands. Returns `Some(step)` when the session ends or
/// switches to TLS.
async fn dispatch<S: AsyncRead + AsyncWrite + Unpin>(
    command: Command,
    conn: &mut Conn<S>,
    ctx: &mut Ctx,
    phase: &mut Phase,
) -> Result<Option<Step>, SessionError> {
    use Command as C;
    let txn = match phase {
        Phase::Authorization { user } => {
            let mechanism = match command {
                C::Capa => {
                    conn.reply(&capa(Gate::of(ctx, phase)));
                    return Ok(None);
                }
                C::Quit => {
                    conn.reply(&ok("Logging out"));
                    conn.flush().await?;
                    return Ok(Some(Step::Done(Outcome::Quit)));
                }
                C::Stls => {
                    conn.reply(&ok("Begin TLS negotiation"));
                    conn.flush().await?;
                    return Ok(Some(Step::StartTls));
                }
                C::User(name) => {
                    // A name refused here must not leave the previous one for PASS.
                    *user = None;
                    let replay = || format!("USER {name}\r\n").into_bytes();
                    if let Some(step) = elsewhere(conn, ctx, &name, replay).await {
                        return Ok(step);
                    }
                    *user = Some(name);
                    conn.reply(&ok("Send your password"));
                    return Ok(None);
                }
                C::Pass(password) => {
                    let Some(name) = user.take() else {
                        conn.reply(&err(None, "USER first"));
                        return Ok(None);
                    };
                    login::Mechanism::User { name, password }
                }
                C::Apop { user: name, digest } => {
                    *user = None;
                    let replay = || format!("APOP {name} {digest}\r\n").into_bytes();
                    if let Some(step) = elsewhere(conn, ctx, &name, replay).await {
                        return Ok(step);
                    }
                    login::Mechanism::Apop { name, digest }
                }
                C::AuthList => {
                    conn.reply(&Reply::Mechanisms(SASL_MECHANISMS));
                    return Ok(None);
                }
                C::Auth { mechanism, initial } => {
                    *user = None;
                    match mechanism.as_str() {
                        "PLAIN" => login::Mechanism::Plain { initial },
                        "SCRAM-SHA-256" => login::Mechanism::Scram { initial },
                        _ => {
                            conn.reply(&err(None, "Unsupported authentication mechanism"));
                            return Ok(None);
                        }
                    }
                }
                // invariant: `gate` lets only the commands above through before login.
                _ => {
                    conn.reply(&err(None, "Command not valid before login"));
                    return Ok(None);
                }
            };
            match login::login(conn, ctx, mechanism).await? {
                login::Attempt::LoggedIn(txn) => *phase = Phase::Transaction(txn),
                login::Attempt::Forward(handoff) => return Ok(Some(Step::Forward(handoff))),
                login::Attempt::Answered => {}
            }
            // Closes the connection once it has used up its failed logins.
            if ctx.auth_failures >= ctx.net().config.limits.max_auth_failures {
                conn.flush().await?;
                return Ok(Some(Step::Done(Outcome::TooManyErrors)));
            }
            return Ok(None);
        }
        Phase::Transaction(txn) => txn,
    };
    let listing = &mut txn.listing;
    match command {
        C::Capa => conn.reply(&capa(Gate::of(ctx, phase))),
        C::Noop => conn.reply(&maildrop::noop()),
        C::Stat => conn.reply(&maildrop::stat(listing)),
        C::List(n) => conn.send(&maildrop::list(listing, n)).await?,
        C::Uidl(n) => conn.send(&maildrop::uidl(listing, n)).await?,
        C::Last => conn.reply(&maildrop::last(listing)),
        C::Dele(n) => conn.reply(&maildrop::dele(listing, n)),
        C::Rset => conn.reply(&maildrop::rset(listing)),
        C::Retr(n) => retrieve::retrieve(conn, ctx, txn, n, None).await?,
        C::Top { msg, lines } => retrieve::retrieve(conn, ctx, txn, msg, Some(lines)).await?,
        C::Quit => {
            retrieve::update(conn, ctx, txn).await?;
            return Ok(Some(Step::Done(Outcome::Quit)));
        }
        // invariant: `gate` refuses the login commands after login.
        C::User(_) | C::Pass(_) | C::Apop { .. } | C::Auth { .. } | C::AuthList | C::Stls => {
            conn.reply(&err(None, "Already logged in"));
        }
    }
    Ok(None)
}

/// `Some` when `name`'s domain is not served here: the step that hands the session to
/// its home, or `None` after answering that it is unavailable for now.
async fn elsewhere<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &Ctx,
    name: &str,
    replay: impl FnOnce() -> Vec<u8>,
) -> Option<Option<Step>> {
    match forward::elsewhere(ctx, name, replay).await {
        Elsewhere::Here => None,
        Elsewhere::Forward(handoff) => Some(Some(Step::Forward(handoff))),
        Elsewhere::Unavailable => {
            conn.reply(&err(
                Some(RespCode::SysTemp),
                "Maildrop unavailable, try again later",
            ));
            Some(None)
        }
    }
}

/// CAPA for the connection's current state (RFC 2449 §5): only what it may use now.
fn capa(g: Gate) -> Reply<'static> {
    let auth_now = g.before_login && (g.tls || g.plaintext_allowed);
    Reply::Capa(Capabilities {
        user: auth_now,
        stls: g.before_login && !g.tls && g.cleartext_port,
        sasl: if auth_now { SASL_MECHANISMS } else { &[] },
        implementation: IMPLEMENTATION,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_commands() -> Vec<Command> {
        use Command as C;
        vec![
            C::User("joe@example.org".into()),
            C::Pass("secret words".into()),
            C::Apop {
                user: "joe@example.org".into(),
                digest: "0".repeat(32),
            },
            C::Auth {
                mechanism: "PLAIN".into(),
                initial: None,
            },
            C::AuthList,
            C::Capa,
            C::Stls,
            C::Quit,
            C::Stat,
            C::List(None),
            C::List(Some(1)),
            C::Retr(1),
            C::Dele(1),
            C::Noop,
            C::Rset,
            C::Top { msg: 1, lines: 0 },
            C::Uidl(None),
            C::Uidl(Some(1)),
            C::Last,
        ]
    }

    fn is_login(c: &Command) -> bool {
        matches!(
            c,
            Command::User(_)
                | Command::Pass(_)
                | Command::Apop { .. }
                | Command::Auth { .. }
                | Command::AuthList
        )
    }

    fn is_mail(c: &Command) -> bool {
        !is_login(c) && !matches!(c, Command::Capa | Command::Quit | Command::Stls)
    }

    /// Every command in every state and transport, against the rules written out
    /// independently of `gate`.
    #[test]
    fn every_command_in_every_state() {
        for before_login in [true, false] {
            for tls in [false, true] {
                for cleartext_port in [true, false] {
                    for plaintext_allowed in [false, true] {
                        for (apop, last) in [(false, false), (true, true), (false, true)] {
                            let g = Gate {
                                before_login,
                                tls,
                                cleartext_port,
                                plaintext_allowed,
                                apop,
                                last,
                            };
                            for c in all_commands() {
                                let expected = match &c {
                                    Command::Capa | Command::Quit => true,
                                    Command::Stls => before_login && !tls && cleartext_port,
                                    Command::Apop { .. } => {
                                        before_login && (tls || plaintext_allowed) && apop
                                    }
                                    c if is_login(c) => before_login && (tls || plaintext_allowed),
                                    Command::Last => !before_login && last,
                                    c if is_mail(c) => !before_login,
                                    _ => unreachable!("every command is classified"),
                                };
                                let got = gate(&c, g);
                                assert_eq!(got.is_ok(), expected, "{c:?} with {g:?}: {got:?}");
                                if let Err(Reply::Err(code, _)) = &got {
                                    let plaintext_refusal =
                                        is_login(&c) && before_login && !tls && !plaintext_allowed;
                                    assert_eq!(
                                        *code == Some(RespCode::Auth),
                                        plaintext_refusal,
                                        "{c:?} {g:?}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn capa_lines(g: Gate) -> String {
        let mut out = BytesMut::new();
        capa(g).write_to(&mut out);
        String::from_utf8(out.to_vec()).expect("utf8")
    }

    #[test]
    fn capa_tells_the_truth_for_the_state() {
        let base = Gate {
            before_login: true,
            tls: false,
            cleartext_port: true,
            plaintext_allowed: false,
            apop: false,
            last: false,
        };
        let c = capa_lines(base);
        assert!(
            c.contains("\r\nSTLS\r\n") && !c.contains("USER") && !c.contains("SASL"),
            "{c}"
        );
        let c = capa_lines(Gate { tls: true, ..base });
        assert!(
            !c.contains("STLS")
                && c.contains("\r\nUSER\r\n")
                && c.contains("SASL PLAIN SCRAM-SHA-256"),
            "{c}"
        );
        let c = capa_lines(Gate {
            plaintext_allowed: true,
            ..base
        });
        assert!(
            c.contains("STLS") && c.contains("USER") && c.contains("SASL"),
            "{c}"
        );
        let c = capa_lines(Gate {
            cleartext_port: false,
            tls: true,
            ..base
        });
        assert!(!c.contains("STLS"), "{c}");
        let c = capa_lines(Gate {
            before_login: false,
            tls: true,
            ..base
        });
        assert!(
            !c.contains("USER") && !c.contains("SASL") && !c.contains("STLS"),
            "{c}"
        );
        for must in [
            "TOP",
            "UIDL",
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "PIPELINING",
            "IMPLEMENTATION mailgate",
        ] {
            assert!(c.contains(must), "{must} missing: {c}");
        }
    }
}
