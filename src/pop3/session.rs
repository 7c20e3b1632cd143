//! One POP3 connection: owns the socket, timeouts and the AUTHORIZATION → TRANSACTION →
//! UPDATE state; parsing and reply bytes come from `codec`, mail from the store (through
//! `spawn_blocking`). STLS consumes the cleartext connection and continues over TLS.
//! Must not write protocol bytes other than through `Reply` and `BodyEncoder`.

use super::codec::{
    verb_of, BodyEncoder, BodyOptions, Capabilities, Command, LineReader, MsgEntry, ParseError,
    Reply, RespCode, MAX_COMMAND_LINE, MAX_SASL_LINE,
};
use crate::auth::{self, scram};
use crate::locks::{LockError, MaildropLock};
use crate::metrics::{self, ActiveGuard, Outcome};
use crate::server::{Refusal, Shared};
use crate::store::{Account, Address, DomainStore, StoreError};
use base64::Engine as _;
use bytes::BytesMut;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

/// The listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Cleartext port 110, STLS offered.
    Pop3,
    /// Implicit TLS port 995 (RFC 8314).
    Pop3s,
}

impl Listener {
    pub fn name(self) -> &'static str {
        match self {
            Listener::Pop3 => "pop3",
            Listener::Pop3s => "pop3s",
        }
    }
}

/// SASL mechanisms offered wherever authentication is allowed.
const SASL_MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256"];
const IMPLEMENTATION: &str = concat!("mailgate ", env!("CARGO_PKG_VERSION"));
/// Output is written to the socket once this much is buffered during RETR/TOP.
const FLUSH_AT: usize = 32 * 1024;
/// A write buffer grown larger than this is given back after a flush, so idle sessions
/// stay small.
const KEEP_WBUF: usize = 4 * 1024;
/// Reads larger than this are refused a bigger read buffer; lines are at most this long.
const RBUF_INITIAL: usize = 512;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("write timed out")]
    WriteTimeout,
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("message {0} ended before its recorded size")]
    Truncated(u64),
    #[error(transparent)]
    Hasher(#[from] crate::auth::pool::PoolStopped),
}

/// Maps an error to what the client is told and says whether to hang up
/// (RFC 2449/3206 codes). Every session error ends the connection, since after an
/// I/O or store failure mid-reply the stream can no longer be trusted.
fn error_reply(e: &SessionError) -> Option<Reply<'static>> {
    match e {
        SessionError::Io(_) | SessionError::WriteTimeout => None,
        SessionError::Store(_)
        | SessionError::Join(_)
        | SessionError::Truncated(_)
        | SessionError::Hasher(_) => Some(Reply::Err(
            Some(RespCode::SysTemp),
            Cow::Borrowed("Internal error, try again later"),
        )),
    }
}

/// Buffered connection I/O: a read buffer fed to the line reader and a write buffer that
/// is flushed only when the session needs more input, so pipelined commands are answered
/// in order with few writes.
struct Io<S> {
    stream: S,
    rbuf: BytesMut,
    wbuf: BytesMut,
    lines: LineReader,
    idle: Duration,
    /// Until the first line is complete, check whether the client started a TLS handshake.
    sniff_tls_hello: bool,
    /// Whether the last reply was `-ERR`: the result of the command just answered.
    last_err: bool,
}

enum Input {
    Line(BytesMut),
    TlsHello,
    TooLong,
    Closed,
    Timeout,
    Cancelled,
    LockLost,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    fn new(stream: S, idle: Duration) -> Self {
        Io {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            lines: LineReader::new(),
            idle,
            sniff_tls_hello: false,
            last_err: false,
        }
    }

    fn reply(&mut self, r: &Reply<'_>) {
        self.last_err = matches!(r, Reply::Err(..));
        r.write_to(&mut self.wbuf);
    }

    async fn flush(&mut self) -> Result<(), SessionError> {
        if !self.wbuf.is_empty() {
            match tokio::time::timeout(self.idle, self.stream.write_all(&self.wbuf)).await {
                Err(_) => return Err(SessionError::WriteTimeout),
                Ok(r) => r?,
            }
            self.wbuf.clear();
            if self.wbuf.capacity() > FLUSH_AT * 2 + KEEP_WBUF {
                self.wbuf = BytesMut::new();
            }
        }
        match tokio::time::timeout(self.idle, self.stream.flush()).await {
            Err(_) => Err(SessionError::WriteTimeout),
            Ok(r) => Ok(r?),
        }
    }

    /// The next line, or why there is none. Flushes pending replies before waiting.
    async fn next(
        &mut self,
        max: usize,
        cancel: &CancellationToken,
        lost: Option<&CancellationToken>,
    ) -> Result<Input, SessionError> {
        loop {
            if self.sniff_tls_hello && self.rbuf.len() >= 2 {
                if self.rbuf.starts_with(&[0x16, 0x03]) {
                    return Ok(Input::TlsHello);
                }
                self.sniff_tls_hello = false;
            }
            if let Some(line) = self.lines.next_line(&mut self.rbuf, max) {
                self.sniff_tls_hello = false;
                return Ok(match line {
                    Ok(l) => Input::Line(l),
                    Err(_) => Input::TooLong,
                });
            }
            self.flush().await?;
            if self.rbuf.capacity() - self.rbuf.len() < RBUF_INITIAL / 2 {
                self.rbuf.reserve(RBUF_INITIAL);
            }
            let lost_fut = async {
                match lost {
                    Some(t) => t.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(Input::Cancelled),
                _ = lost_fut => return Ok(Input::LockLost),
                r = tokio::time::timeout(self.idle, self.stream.read_buf(&mut self.rbuf)) => match r {
                    Err(_) => return Ok(Input::Timeout),
                    Ok(Ok(0)) => return Ok(Input::Closed),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.into()),
                },
            }
        }
    }
}

/// Per-connection facts and counters.
struct Ctx {
    shared: Arc<Shared>,
    peer: SocketAddr,
    listener: Listener,
    tls: bool,
    apop_timestamp: Option<String>,
    bad_commands: u32,
    auth_failures: u32,
    user: Option<String>,
    retrieved: u32,
    deleted: u32,
    bytes_out: u64,
}

impl Ctx {
    fn body_options(&self) -> BodyOptions {
        BodyOptions {
            replace_nul: self.shared.config.pop3.replace_nul,
        }
    }
}

/// The open maildrop of the TRANSACTION state.
struct Txn {
    address: Address,
    store: Arc<DomainStore>,
    /// Taken out and released at UPDATE, before the final answer is sent.
    lock: Option<MaildropLock>,
    lost: CancellationToken,
    msgs: Vec<MsgEntry>,
    nonce: u32,
    /// Highest message number accessed, for LAST (RFC 1460).
    highest: u32,
}

impl Txn {
    fn entry(&self, n: u32) -> Result<MsgEntry, Reply<'static>> {
        match (n as usize).checked_sub(1).and_then(|i| self.msgs.get(i)) {
            None => Err(err(None, "No such message")),
            Some(m) if m.deleted => Err(err(None, "Message is deleted")),
            Some(m) => Ok(*m),
        }
    }

    fn totals(&self) -> (usize, u64) {
        self.msgs
            .iter()
            .filter(|m| !m.deleted)
            .fold((0, 0), |(c, o), m| (c + 1, o + m.octets))
    }
}

enum Phase {
    Authorization { user: Option<String> },
    Transaction(Box<Txn>),
}

/// What `serve` asks of its caller.
enum Step {
    Done(Outcome),
    /// STLS accepted: hand the raw stream to the TLS handshake.
    StartTls,
}

fn err(code: Option<RespCode>, text: &'static str) -> Reply<'static> {
    Reply::Err(code, Cow::Borrowed(text))
}

fn ok(text: &'static str) -> Reply<'static> {
    Reply::Ok(Cow::Borrowed(text))
}

/// Greets a refused connection where the protocol allows it, then closes.
pub async fn refuse(
    mut stream: TcpStream,
    peer: SocketAddr,
    listener: Listener,
    reason: Refusal,
    shared: Arc<Shared>,
) {
    let text = match reason {
        Refusal::TooManyConnections => "Too many connections, try again later",
        Refusal::TooManyFromPeer => "Too many connections from your address",
        Refusal::ShuttingDown => "Server shutting down",
    };
    shared
        .metrics
        .connections_rejected
        .with_label_values(&[listener.name(), reason.metric_reason()])
        .inc();
    info!(peer = %peer, listener = listener.name(), reason = ?reason, "connection refused");
    // On the implicit-TLS port the client expects a handshake, not text: just close.
    if listener == Listener::Pop3 {
        let mut out = BytesMut::new();
        err(Some(RespCode::SysTemp), text).write_to(&mut out);
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&out)).await;
    }
}

/// Runs one connection to its end.
pub async fn run(stream: TcpStream, peer: SocketAddr, listener: Listener, shared: Arc<Shared>) {
    let sid = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("session", sid, peer = %peer, listener = listener.name());
    async move {
        let started = Instant::now();
        let m = shared.metrics.clone();
        m.connections_accepted
            .with_label_values(&[listener.name()])
            .inc();
        let _active = ActiveGuard::new(m.connections_active.with_label_values(&[listener.name()]));
        let mut ctx = Ctx {
            apop_timestamp: shared
                .config
                .pop3
                .apop
                .then(|| auth::apop::make_timestamp(&shared.config.hostname)),
            shared,
            peer,
            listener,
            tls: false,
            bad_commands: 0,
            auth_failures: 0,
            user: None,
            retrieved: 0,
            deleted: 0,
            bytes_out: 0,
        };
        let outcome = connection(stream, &mut ctx).await;
        m.observe_session(listener.name(), outcome, started.elapsed());
        info!(
            outcome = outcome.name(),
            user = ctx.user.as_deref().unwrap_or("-"),
            tls = ctx.tls,
            retrieved = ctx.retrieved,
            deleted = ctx.deleted,
            bytes_out = ctx.bytes_out,
            duration_ms = started.elapsed().as_millis() as u64,
            "session end"
        );
    }
    .instrument(span)
    .await
}

async fn connection(stream: TcpStream, ctx: &mut Ctx) -> Outcome {
    let idle = ctx.shared.config.limits.idle_timeout();
    match ctx.listener {
        Listener::Pop3s => {
            let Some(tls) = handshake(stream, ctx).await else {
                return Outcome::TlsFailed;
            };
            let mut io = Io::new(tls, idle);
            greet(&mut io, ctx);
            finish(serve(&mut io, ctx).await)
        }
        Listener::Pop3 => {
            let mut io = Io::new(stream, idle);
            greet(&mut io, ctx);
            match serve(&mut io, ctx).await {
                Step::Done(outcome) => outcome,
                Step::StartTls => {
                    // Anything the client pipelined after STLS is dropped with `io`:
                    // it arrived before the handshake and must not be executed.
                    let Some(tls) = handshake(io.stream, ctx).await else {
                        return Outcome::TlsFailed;
                    };
                    ctx.shared
                        .metrics
                        .tls_upgrades
                        .with_label_values(&[metrics::PROTOCOL_POP3])
                        .inc();
                    let mut io = Io::new(tls, idle);
                    finish(serve(&mut io, ctx).await)
                }
            }
        }
    }
}

fn finish(step: Step) -> Outcome {
    match step {
        Step::Done(o) => o,
        // invariant: `gate` refuses STLS once the connection is TLS.
        Step::StartTls => Outcome::Error,
    }
}

async fn handshake(
    stream: TcpStream,
    ctx: &mut Ctx,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let tls = crate::server::tls_accept(&ctx.shared, stream, ctx.listener.name()).await?;
    ctx.tls = true;
    Some(tls)
}

fn greet<S: AsyncRead + AsyncWrite + Unpin>(io: &mut Io<S>, ctx: &Ctx) {
    io.reply(&Reply::Greeting {
        hostname: &ctx.shared.config.hostname,
        apop_timestamp: ctx.apop_timestamp.as_deref(),
    });
}

/// The command loop for one transport (cleartext or TLS).
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(io: &mut Io<S>, ctx: &mut Ctx) -> Step {
    let mut phase = Phase::Authorization { user: None };
    let step = command_loop(io, ctx, &mut phase).await;
    let step = match step {
        Ok(step) => {
            // Deliver a final answer (e.g. "too many invalid commands") before closing.
            let _ = io.flush().await;
            step
        }
        Err(e) => {
            if !matches!(e, SessionError::Io(_) | SessionError::WriteTimeout) {
                warn!(error = %e, "session failed");
            }
            if let Some(r) = error_reply(&e) {
                io.reply(&r);
                let _ = io.flush().await;
            }
            Step::Done(match e {
                SessionError::Io(_) | SessionError::WriteTimeout => Outcome::Dropped,
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
    io: &mut Io<S>,
    ctx: &mut Ctx,
    phase: &mut Phase,
) -> Result<Step, SessionError> {
    // A TLS ClientHello (record type 0x16, version 3.x) as the first bytes on the
    // cleartext port is a client configured for POP3S on the wrong port: say so and
    // close rather than answer its binary record line by line.
    io.sniff_tls_hello = ctx.listener == Listener::Pop3 && !ctx.tls;
    loop {
        let (cancel, lost) = match phase {
            Phase::Authorization { .. } => (ctx.shared.shutdown.clone(), None),
            Phase::Transaction(txn) => (ctx.shared.abort.clone(), Some(txn.lost.clone())),
        };
        let input = io.next(MAX_COMMAND_LINE, &cancel, lost.as_ref()).await?;
        let line = match input {
            Input::Line(line) => line,
            Input::TooLong => {
                if bad_command(io, ctx, err(None, "Line too long")) {
                    return Ok(Step::Done(Outcome::TooManyErrors));
                }
                continue;
            }
            Input::Closed => return Ok(Step::Done(Outcome::Dropped)),
            Input::TlsHello => {
                io.reply(&err(
                    None,
                    "TLS handshake on the cleartext port: use STLS or the POP3S port",
                ));
                let _ = io.flush().await;
                return Ok(Step::Done(Outcome::TlsFailed));
            }
            Input::Timeout => {
                io.reply(&err(None, "Disconnected for inactivity"));
                let _ = io.flush().await;
                return Ok(Step::Done(Outcome::Timeout));
            }
            Input::Cancelled => {
                io.reply(&err(Some(RespCode::SysTemp), "Server shutting down"));
                let _ = io.flush().await;
                return Ok(Step::Done(Outcome::Shutdown));
            }
            Input::LockLost => {
                ctx.shared.metrics.lock.losses.inc();
                io.reply(&err(
                    Some(RespCode::SysTemp),
                    "Maildrop lock lost, no changes were made",
                ));
                let _ = io.flush().await;
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
                if bad_command(io, ctx, reply) {
                    return Ok(Step::Done(Outcome::TooManyErrors));
                }
                continue;
            }
        };
        drop(line);
        let verb = command.verb();
        if let Err(reply) = gate(&command, Gate::of(ctx, phase)) {
            count_command(ctx, verb, true);
            if bad_command(io, ctx, reply) {
                return Ok(Step::Done(Outcome::TooManyErrors));
            }
            continue;
        }
        let step = dispatch(command, io, ctx, phase).await;
        count_command(ctx, verb, step.is_err() || io.last_err);
        if let Some(step) = step? {
            return Ok(step);
        }
    }
}

fn count_command(ctx: &Ctx, verb: &str, failed: bool) {
    let result = if failed {
        metrics::RESULT_ERR
    } else {
        metrics::RESULT_OK
    };
    ctx.shared
        .metrics
        .commands
        .with_label_values(&[metrics::PROTOCOL_POP3, verb, result])
        .inc();
}

fn count_auth(ctx: &Ctx, mechanism: &str, result: &LoginResult) {
    let result = match result {
        LoginResult::Verified { .. } => metrics::AUTH_SUCCESS,
        LoginResult::Failed(_) => metrics::AUTH_FAILURE,
        LoginResult::Throttled => metrics::AUTH_THROTTLED,
        LoginResult::Unavailable => metrics::AUTH_UNAVAILABLE,
        LoginResult::Aborted => metrics::AUTH_ABORTED,
    };
    ctx.shared
        .metrics
        .auth_attempts
        .with_label_values(&[mechanism, result])
        .inc();
}

/// Answers a bad command; true when the client has used up its allowance.
fn bad_command<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    ctx: &mut Ctx,
    reply: Reply<'_>,
) -> bool {
    ctx.bad_commands += 1;
    if ctx.bad_commands >= ctx.shared.config.limits.max_bad_commands {
        io.reply(&err(None, "Too many invalid commands, closing connection"));
        return true;
    }
    io.reply(&reply);
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
}

impl Gate {
    fn of(ctx: &Ctx, phase: &Phase) -> Gate {
        Gate {
            before_login: matches!(phase, Phase::Authorization { .. }),
            tls: ctx.tls,
            cleartext_port: ctx.listener == Listener::Pop3,
            plaintext_allowed: ctx.shared.config.pop3.allow_plaintext_auth,
            apop: ctx.apop_timestamp.is_some(),
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
        C::User(_) | C::Pass(_) | C::Apop { .. } | C::Auth { .. } => {
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
    io: &mut Io<S>,
    ctx: &mut Ctx,
    phase: &mut Phase,
) -> Result<Option<Step>, SessionError> {
    use Command as C;
    let txn = match phase {
        Phase::Authorization { user } => {
            match command {
                C::Capa => io.reply(&capa(Gate::of(ctx, phase))),
                C::Quit => {
                    io.reply(&ok("Logging out"));
                    io.flush().await?;
                    return Ok(Some(Step::Done(Outcome::Quit)));
                }
                C::Stls => {
                    io.reply(&ok("Begin TLS negotiation"));
                    io.flush().await?;
                    return Ok(Some(Step::StartTls));
                }
                C::User(name) => {
                    *user = Some(name);
                    io.reply(&ok("Send your password"));
                }
                C::Pass(password) => {
                    let Some(name) = user.take() else {
                        io.reply(&err(None, "USER first"));
                        return Ok(None);
                    };
                    let result = password_login(ctx, &name, password.as_bytes()).await?;
                    count_auth(ctx, metrics::MECH_USER, &result);
                    if let Some(txn) = login_result(io, ctx, result).await? {
                        *phase = Phase::Transaction(txn);
                    }
                    return hang_up_after_failures(io, ctx).await;
                }
                C::Apop { user: name, digest } => {
                    *user = None;
                    let result = apop_login(ctx, &name, &digest).await?;
                    count_auth(ctx, metrics::MECH_APOP, &result);
                    if let Some(txn) = login_result(io, ctx, result).await? {
                        *phase = Phase::Transaction(txn);
                    }
                    return hang_up_after_failures(io, ctx).await;
                }
                C::Auth { mechanism, initial } => {
                    *user = None;
                    let (mech, result) = match mechanism.as_str() {
                        "PLAIN" => (metrics::MECH_PLAIN, sasl_plain(io, ctx, initial).await?),
                        "SCRAM-SHA-256" => {
                            (metrics::MECH_SCRAM, sasl_scram(io, ctx, initial).await?)
                        }
                        _ => {
                            io.reply(&err(None, "Unsupported authentication mechanism"));
                            return Ok(None);
                        }
                    };
                    count_auth(ctx, mech, &result);
                    if let Some(txn) = login_result(io, ctx, result).await? {
                        *phase = Phase::Transaction(txn);
                    }
                    return hang_up_after_failures(io, ctx).await;
                }
                // invariant: `gate` lets only the commands above through before login.
                _ => io.reply(&err(None, "Command not valid before login")),
            }
            return Ok(None);
        }
        Phase::Transaction(txn) => txn,
    };
    match command {
        C::Capa => io.reply(&capa(Gate::of(ctx, phase))),
        C::Noop => io.reply(&ok("")),
        C::Stat => {
            let (count, octets) = txn.totals();
            io.reply(&Reply::Stat { count, octets });
        }
        C::List(None) => io.reply(&Reply::ScanListing(&txn.msgs)),
        C::List(Some(n)) => match txn.entry(n) {
            Ok(m) => io.reply(&Reply::Scan {
                msg: n,
                octets: m.octets,
            }),
            Err(r) => io.reply(&r),
        },
        C::Uidl(None) => io.reply(&Reply::UniqueListing {
            nonce: txn.nonce,
            msgs: &txn.msgs,
        }),
        C::Uidl(Some(n)) => match txn.entry(n) {
            Ok(m) => io.reply(&Reply::Unique {
                msg: n,
                nonce: txn.nonce,
                id: m.id,
            }),
            Err(r) => io.reply(&r),
        },
        C::Last => io.reply(&Reply::Ok(Cow::Owned(txn.highest.to_string()))),
        C::Dele(n) => match txn.entry(n) {
            Ok(_) => {
                txn.msgs[n as usize - 1].deleted = true;
                txn.highest = txn.highest.max(n);
                io.reply(&ok("Marked to be deleted"));
            }
            Err(r) => io.reply(&r),
        },
        C::Rset => {
            for m in &mut txn.msgs {
                m.deleted = false;
            }
            txn.highest = 0;
            let (count, octets) = txn.totals();
            io.reply(&Reply::Ok(Cow::Owned(format!(
                "{count} messages ({octets} octets)"
            ))));
        }
        C::Retr(n) => match txn.entry(n) {
            Ok(m) => {
                let opts = ctx.body_options();
                let started = Instant::now();
                send_message(io, ctx, &txn.store, m, BodyEncoder::full(opts), None).await?;
                observe_command(ctx, metrics::COMMAND_RETR, started);
                txn.highest = txn.highest.max(n);
                ctx.retrieved += 1;
            }
            Err(r) => io.reply(&r),
        },
        C::Top { msg, lines } => match txn.entry(msg) {
            Ok(m) => {
                let opts = ctx.body_options();
                let head = ok("Top of message follows");
                let started = Instant::now();
                send_message(
                    io,
                    ctx,
                    &txn.store,
                    m,
                    BodyEncoder::top(lines, opts),
                    Some(head),
                )
                .await?;
                observe_command(ctx, metrics::COMMAND_TOP, started);
                txn.highest = txn.highest.max(msg);
            }
            Err(r) => io.reply(&r),
        },
        C::Quit => {
            update(io, ctx, txn).await?;
            return Ok(Some(Step::Done(Outcome::Quit)));
        }
        // invariant: `gate` refuses the login commands after login.
        C::User(_) | C::Pass(_) | C::Apop { .. } | C::Auth { .. } | C::Stls => {
            io.reply(&err(None, "Already logged in"));
        }
    }
    Ok(None)
}

/// Records the latency of a timed command (`metrics::TIMED_COMMANDS`).
fn observe_command(ctx: &Ctx, command: &str, started: Instant) {
    ctx.shared
        .metrics
        .command_duration
        .with_label_values(&[command])
        .observe(started.elapsed().as_secs_f64());
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

/// The UPDATE state (RFC 1939 §6): applies the DELE marks, then gives the maildrop
/// lock up *before* the client reads the answer, so a client that reconnects at once
/// never finds its own session's lock still held.
async fn update<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    ctx: &mut Ctx,
    txn: &mut Txn,
) -> Result<(), SessionError> {
    apply_marks(io, ctx, txn).await?;
    if let Some(lock) = txn.lock.take() {
        lock.release().await;
    }
    io.flush().await
}

/// Applies the DELE marks in one atomic batch, but only while the maildrop lock is
/// still ours; writes the answer without sending it.
async fn apply_marks<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    ctx: &mut Ctx,
    txn: &mut Txn,
) -> Result<(), SessionError> {
    let ids: Vec<u64> = txn
        .msgs
        .iter()
        .filter(|m| m.deleted)
        .map(|m| m.id)
        .collect();
    if ids.is_empty() {
        io.reply(&ok("Logging out"));
        return Ok(());
    }
    let held = match &txn.lock {
        Some(lock) => lock.still_held().await,
        None => false,
    };
    if !held {
        ctx.shared.metrics.lock.losses.inc();
        warn!(user = %txn.address, "maildrop lock lost before UPDATE; nothing deleted");
        io.reply(&err(
            Some(RespCode::SysTemp),
            "Maildrop lock lost, no messages deleted",
        ));
        return Ok(());
    }
    let store = txn.store.clone();
    let local = txn.address.local.clone();
    let count = ids.len();
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || store.delete_messages(&local, &ids)).await?;
    observe_command(ctx, metrics::COMMAND_UPDATE, started);
    match result {
        Ok(()) => {
            ctx.deleted = count as u32;
            io.reply(&Reply::Ok(Cow::Owned(format!(
                "Logging out, {count} messages deleted"
            ))));
        }
        Err(e) => {
            warn!(error = %e, "UPDATE failed");
            io.reply(&err(
                Some(RespCode::SysTemp),
                "Some deleted messages not removed",
            ));
        }
    }
    Ok(())
}

/// Streams one message (or its top) through the dot-stuffer in store-sized chunks.
async fn send_message<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    ctx: &mut Ctx,
    store: &Arc<DomainStore>,
    m: MsgEntry,
    mut encoder: BodyEncoder,
    head: Option<Reply<'static>>,
) -> Result<(), SessionError> {
    // RETR must deliver every recorded octet; TOP legitimately stops early.
    let whole = head.is_none();
    let sent = ctx.shared.metrics.sent_bytes.with_label_values(&[if whole {
        metrics::COMMAND_RETR
    } else {
        metrics::COMMAND_TOP
    }]);
    let mut buf = Vec::with_capacity(crate::store::CHUNK_SIZE);
    let mut offset = 0u64;
    // The first chunk is read before the +OK, so a message that cannot be read gets a
    // clean -ERR instead of a truncated reply.
    let (returned, n) = read_chunk(store, m.id, offset, buf).await?;
    buf = returned;
    if n == 0 && m.octets > 0 {
        return Err(SessionError::Truncated(m.id));
    }
    io.reply(&head.unwrap_or(Reply::MessageFollows { octets: m.octets }));
    let mut n = n;
    while n > 0 {
        offset += n as u64;
        let more = encoder.encode(&buf[..n], &mut io.wbuf);
        if io.wbuf.len() >= FLUSH_AT {
            ctx.bytes_out += io.wbuf.len() as u64;
            sent.inc_by(io.wbuf.len() as u64);
            io.flush().await?;
        }
        if !more || offset >= m.octets {
            break;
        }
        let (returned, read) = read_chunk(store, m.id, offset, buf).await?;
        buf = returned;
        n = read;
    }
    if whole && offset < m.octets {
        return Err(SessionError::Truncated(m.id));
    }
    encoder.finish(&mut io.wbuf);
    ctx.bytes_out += io.wbuf.len() as u64;
    sent.inc_by(io.wbuf.len() as u64);
    Ok(())
}

async fn read_chunk(
    store: &Arc<DomainStore>,
    id: u64,
    offset: u64,
    mut buf: Vec<u8>,
) -> Result<(Vec<u8>, usize), SessionError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        buf.clear();
        let n = store.read_body(id, offset, &mut buf)?;
        Ok((buf, n))
    })
    .await?
}

/// A login attempt's result before the maildrop is opened.
enum LoginResult {
    /// Credentials verified.
    Verified {
        address: Address,
        store: Arc<DomainStore>,
        account: Box<Account>,
    },
    /// Wrong password, unknown user, malformed name: all look the same to the client.
    /// Carries the login name, when there was one, for the per-name failure count.
    Failed(Option<String>),
    /// Too many recent failures from this address or for this name.
    Throttled,
    /// The failure counters (in Redis) could not be read: try again later.
    Unavailable,
    /// The exchange was cancelled or malformed; already answered.
    Aborted,
}

/// Looks an address up; `None` for anything that is not an existing account.
async fn find_account(
    ctx: &Ctx,
    name: &str,
) -> Result<Option<(Address, Arc<DomainStore>, Box<Account>)>, SessionError> {
    let Ok(address) = Address::parse(name) else {
        return Ok(None);
    };
    let directory = ctx.shared.directory.clone();
    let found = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let store = match directory.domain(&address.domain) {
            Ok(s) => s,
            Err(StoreError::UnknownDomain(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(store
            .account(&address.local)?
            .map(|account| (address, store, Box::new(account))))
    })
    .await??;
    Ok(found)
}

/// `Some` when the client IP or the login name may not try now (or the throttle cannot
/// tell). Asked before any password work, with the name whether or not it exists.
async fn throttled(ctx: &Ctx, name: &str) -> Option<LoginResult> {
    match ctx
        .shared
        .throttle
        .is_blocked(ctx.peer.ip(), Some(name))
        .await
    {
        Ok(false) => None,
        Ok(true) => Some(LoginResult::Throttled),
        Err(e) => {
            warn!(error = %e, "cannot check login failures");
            Some(LoginResult::Unavailable)
        }
    }
}

async fn password_login(
    ctx: &mut Ctx,
    name: &str,
    password: &[u8],
) -> Result<LoginResult, SessionError> {
    if let Some(refused) = throttled(ctx, name).await {
        return Ok(refused);
    }
    let failed = || LoginResult::Failed(Some(name.to_owned()));
    let found = find_account(ctx, name).await?;
    let shared = ctx.shared.clone();
    let password = password.to_vec();
    let Some((address, store, account)) = found else {
        shared.hasher.dummy(password, shared.hash_params).await?;
        return Ok(failed());
    };
    let key = address.to_string();
    if shared
        .verified
        .check(&key, &password, &account.credentials.phc)
    {
        return Ok(LoginResult::Verified {
            address,
            store,
            account,
        });
    }
    let (ok, password) = shared
        .hasher
        .verify(account.credentials.clone(), password)
        .await?;
    if !ok {
        return Ok(failed());
    }
    shared
        .verified
        .insert(&key, &password, &account.credentials.phc);
    Ok(LoginResult::Verified {
        address,
        store,
        account,
    })
}

async fn apop_login(ctx: &mut Ctx, name: &str, digest: &str) -> Result<LoginResult, SessionError> {
    if let Some(refused) = throttled(ctx, name).await {
        return Ok(refused);
    }
    let failed = || LoginResult::Failed(Some(name.to_owned()));
    let Some(timestamp) = ctx.apop_timestamp.as_deref() else {
        return Ok(failed());
    };
    Ok(match find_account(ctx, name).await? {
        Some((address, store, account)) => match &account.credentials.apop_secret {
            Some(secret) if auth::apop::verify(timestamp, secret, digest) => {
                LoginResult::Verified {
                    address,
                    store,
                    account,
                }
            }
            _ => failed(),
        },
        None => failed(),
    })
}

/// Reads one SASL client response line; `None` when the client cancelled with `*`
/// (already answered) or sent something undecodable (already answered).
async fn sasl_response<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    ctx: &mut Ctx,
    challenge: &[u8],
) -> Result<Option<Vec<u8>>, SessionError> {
    io.reply(&Reply::Challenge(challenge));
    let cancel = ctx.shared.shutdown.clone();
    let line = match io.next(MAX_SASL_LINE, &cancel, None).await? {
        Input::Line(l) => l,
        Input::TooLong => {
            io.reply(&err(None, "Authentication response too long"));
            return Ok(None);
        }
        Input::Closed | Input::Timeout | Input::Cancelled | Input::LockLost | Input::TlsHello => {
            return Err(SessionError::Io(
                std::io::ErrorKind::ConnectionAborted.into(),
            ));
        }
    };
    decode_sasl(io, &line)
}

fn decode_sasl<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    data: &[u8],
) -> Result<Option<Vec<u8>>, SessionError> {
    if data == b"*" {
        io.reply(&err(None, "Authentication cancelled"));
        return Ok(None);
    }
    // RFC 5034 §4: "=" stands for an empty initial response.
    if data == b"=" {
        return Ok(Some(Vec::new()));
    }
    match base64::engine::general_purpose::STANDARD.decode(data) {
        Ok(v) => Ok(Some(v)),
        Err(_) => {
            io.reply(&err(None, "Invalid base64 in authentication response"));
            Ok(None)
        }
    }
}

async fn sasl_plain<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    ctx: &mut Ctx,
    initial: Option<String>,
) -> Result<LoginResult, SessionError> {
    let decoded = match initial {
        Some(ir) => decode_sasl(io, ir.as_bytes())?,
        None => sasl_response(io, ctx, b"").await?,
    };
    let Some(decoded) = decoded else {
        return Ok(LoginResult::Aborted);
    };
    let Ok(msg) = auth::plain::parse(&decoded) else {
        return Ok(LoginResult::Failed(None));
    };
    // We authorise no proxy logins: an authzid other than the authcid fails.
    if !msg.authzid.is_empty() && !msg.authzid.eq_ignore_ascii_case(msg.authcid) {
        return Ok(LoginResult::Failed(Some(msg.authcid.to_owned())));
    }
    let (authcid, password) = (msg.authcid.to_owned(), msg.password.as_bytes().to_vec());
    password_login(ctx, &authcid, &password).await
}

async fn sasl_scram<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    ctx: &mut Ctx,
    initial: Option<String>,
) -> Result<LoginResult, SessionError> {
    let first = match initial {
        Some(ir) => decode_sasl(io, ir.as_bytes())?,
        None => sasl_response(io, ctx, b"").await?,
    };
    let Some(first) = first else {
        return Ok(LoginResult::Aborted);
    };
    let Ok(client_first) = scram::ClientFirst::parse(&first) else {
        io.reply(&err(None, "Malformed SCRAM message"));
        return Ok(LoginResult::Aborted);
    };
    if let Some(refused) = throttled(ctx, &client_first.username).await {
        return Ok(refused);
    }
    let failed = || LoginResult::Failed(Some(client_first.username.clone()));
    let found = find_account(ctx, &client_first.username).await?;
    // Unknown users, and accounts made from a PHC hash alone (no SCRAM keys), get
    // stand-in keys no proof matches: the exchange fails like a wrong password.
    let keys = found
        .as_ref()
        .and_then(|(_, _, account)| account.credentials.scram.clone())
        .unwrap_or_else(|| {
            scram::fake_keys(
                &client_first.username,
                &ctx.shared.secret,
                ctx.shared.hash_params.scram_iterations,
            )
        });
    let server_first = scram::ServerFirst::new(&client_first, keys);
    let Some(client_final) = sasl_response(io, ctx, server_first.message.as_bytes()).await? else {
        return Ok(LoginResult::Aborted);
    };
    let Ok(server_final) = server_first.finish(&client_final) else {
        return Ok(failed());
    };
    let Some((address, store, account)) = found else {
        return Ok(failed());
    };
    // RFC 5034 §4: additional data with success goes in a challenge; the client answers
    // with an empty line.
    match sasl_response(io, ctx, server_final.as_bytes()).await? {
        Some(empty) if empty.is_empty() => Ok(LoginResult::Verified {
            address,
            store,
            account,
        }),
        Some(_) => Ok(failed()),
        None => Ok(LoginResult::Aborted),
    }
}

/// Answers a login attempt; on success opens the maildrop (lock, then snapshot).
async fn login_result<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    ctx: &mut Ctx,
    result: LoginResult,
) -> Result<Option<Box<Txn>>, SessionError> {
    let (address, store, account) = match result {
        LoginResult::Verified {
            address,
            store,
            account,
        } => (address, store, account),
        LoginResult::Aborted => return Ok(None),
        LoginResult::Throttled => {
            ctx.auth_failures += 1;
            io.reply(&err(
                Some(RespCode::LoginDelay),
                "Too many failed logins, try again later",
            ));
            return Ok(None);
        }
        LoginResult::Unavailable => {
            io.reply(&err(
                Some(RespCode::SysTemp),
                "Login service unavailable, try again later",
            ));
            return Ok(None);
        }
        LoginResult::Failed(name) => {
            ctx.auth_failures += 1;
            ctx.shared
                .throttle
                .record_failure(ctx.peer.ip(), name.as_deref())
                .await;
            io.flush().await?;
            tokio::time::sleep(ctx.shared.config.limits.auth_failure_delay()).await;
            io.reply(&err(Some(RespCode::Auth), "Authentication failed"));
            return Ok(None);
        }
    };
    let key = address.to_string();
    let started = Instant::now();
    let acquired = ctx.shared.locks.acquire(&key).await;
    let lock_metrics = &ctx.shared.metrics.lock;
    lock_metrics
        .acquire_duration
        .observe(started.elapsed().as_secs_f64());
    let lock = match acquired {
        Ok(lock) => lock,
        Err(LockError::Busy) => {
            lock_metrics.contention.inc();
            io.reply(&err(
                Some(RespCode::InUse),
                "Maildrop is locked by another session",
            ));
            return Ok(None);
        }
        Err(LockError::Unavailable(e)) => {
            warn!(error = %e, "maildrop lock unavailable");
            io.reply(&err(
                Some(RespCode::SysTemp),
                "Maildrop lock service unavailable, try again later",
            ));
            return Ok(None);
        }
    };
    let snap_store = store.clone();
    let local = address.local.clone();
    let snapshot = tokio::task::spawn_blocking(move || snap_store.snapshot(&local)).await?;
    let msgs: Vec<MsgEntry> = match snapshot {
        Ok(list) => list
            .into_iter()
            .map(|m| MsgEntry {
                octets: m.octets,
                id: m.id,
                deleted: false,
            })
            .collect(),
        Err(e) => {
            warn!(error = %e, "cannot open maildrop");
            lock.release().await;
            io.reply(&err(
                Some(RespCode::SysTemp),
                "Cannot open maildrop, try again later",
            ));
            return Ok(None);
        }
    };
    ctx.user = Some(key);
    let lost = lock.lost();
    let txn = Box::new(Txn {
        address,
        store,
        lock: Some(lock),
        lost,
        msgs,
        nonce: account.uid_nonce,
        highest: 0,
    });
    let (count, octets) = txn.totals();
    io.reply(&Reply::Ok(Cow::Owned(format!(
        "Logged in, {count} messages ({octets} octets)"
    ))));
    Ok(Some(txn))
}

/// Closes the connection once it has used up its failed logins.
async fn hang_up_after_failures<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    ctx: &mut Ctx,
) -> Result<Option<Step>, SessionError> {
    if ctx.auth_failures >= ctx.shared.config.limits.max_auth_failures {
        io.flush().await?;
        return Ok(Some(Step::Done(Outcome::TooManyErrors)));
    }
    Ok(None)
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
            Command::User(_) | Command::Pass(_) | Command::Apop { .. } | Command::Auth { .. }
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
                        for apop in [false, true] {
                            let g = Gate {
                                before_login,
                                tls,
                                cleartext_port,
                                plaintext_allowed,
                                apop,
                            };
                            for c in all_commands() {
                                let expected = match &c {
                                    Command::Capa | Command::Quit => true,
                                    Command::Stls => before_login && !tls && cleartext_port,
                                    Command::Apop { .. } => {
                                        before_login && (tls || plaintext_allowed) && apop
                                    }
                                    c if is_login(c) => before_login && (tls || plaintext_allowed),
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
