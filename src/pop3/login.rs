//! Logging in: USER/PASS, APOP and SASL (PLAIN, SCRAM-SHA-256, RFC 5034) exchanges, the
//! answers to a failed or throttled attempt, and on success opening the maildrop (its
//! lock, then a snapshot of its messages). Which names and secrets are good is the
//! `Authenticator`'s to say; this file only talks to the client and counts.

use super::accounts::{Admit, Login, LoginError};
use super::codec::{MsgEntry, Reply, RespCode, MAX_SASL_LINE};
use super::forward::{self, Elsewhere, Handoff};
use super::maildrop::Listing;
use super::session::{err, Conn, Ctx, Input, SessionError, Txn};
use crate::auth::pool::PoolError;
use crate::auth::{self, sasl, scram};
use crate::locks::LockError;
use crate::metrics;
use base64::Engine as _;
use std::borrow::Cow;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};

/// How the client asked to log in.
pub(super) enum Mechanism {
    /// USER then PASS.
    User {
        name: String,
        password: String,
    },
    Apop {
        name: String,
        digest: String,
    },
    /// AUTH PLAIN, with or without an initial response.
    Plain {
        initial: Option<String>,
    },
    /// AUTH SCRAM-SHA-256, with or without an initial response.
    Scram {
        initial: Option<String>,
    },
}

/// A login attempt's result before the maildrop is opened.
enum LoginResult {
    Verified(Login),
    /// Wrong password, unknown user, malformed name: all look the same to the client.
    /// Carries the login name, when there was one, for the per-name failure count.
    Failed(Option<String>),
    /// Too many recent failures from this address or for this name (the name tried).
    Throttled(String),
    /// The failure counters (in Redis) could not be read: try again later.
    Unavailable,
    /// The password hashing queue is full: try again later.
    Busy,
    /// The exchange was cancelled or malformed; already answered.
    Aborted,
    /// The name's domain lives on another replica, now connected: the home answers.
    Forward(Box<Handoff>),
}

/// How a login attempt ended for the session.
pub(super) enum Attempt {
    LoggedIn(Box<Txn>),
    /// Answered (refused, failed or cancelled); still in AUTHORIZATION.
    Answered,
    /// Hand the session to the home replica, which answers the attempt.
    Forward(Box<Handoff>),
}

impl LoginResult {
    /// The `result` label of the auth-attempts metric.
    fn metric(&self) -> &'static str {
        match self {
            LoginResult::Verified(_) => metrics::AUTH_SUCCESS,
            LoginResult::Failed(_) => metrics::AUTH_FAILURE,
            LoginResult::Throttled(_) => metrics::AUTH_THROTTLED,
            LoginResult::Unavailable | LoginResult::Busy => metrics::AUTH_UNAVAILABLE,
            LoginResult::Aborted => metrics::AUTH_ABORTED,
            // invariant: not counted here; the home counts the attempt it answers.
            LoginResult::Forward(_) => metrics::AUTH_ABORTED,
        }
    }

    /// Verified, or failed for `name`.
    fn of(found: Option<Login>, name: &str) -> LoginResult {
        match found {
            Some(login) => LoginResult::Verified(login),
            None => LoginResult::Failed(Some(name.to_owned())),
        }
    }
}

/// Runs one login attempt to its answer; the open maildrop when it succeeded.
pub(super) async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &mut Ctx,
    mechanism: Mechanism,
) -> Result<Attempt, SessionError> {
    // A failure is answered at a fixed deadline from here, whatever the work took.
    let started = tokio::time::Instant::now();
    let (label, result) = match mechanism {
        Mechanism::User { name, password } => (
            metrics::MECH_USER,
            password_login(ctx, &name, password.as_bytes()).await?,
        ),
        Mechanism::Apop { name, digest } => {
            (metrics::MECH_APOP, apop_login(ctx, &name, &digest).await?)
        }
        Mechanism::Plain { initial } => {
            (metrics::MECH_PLAIN, sasl_plain(conn, ctx, initial).await?)
        }
        Mechanism::Scram { initial } => {
            (metrics::MECH_SCRAM, sasl_scram(conn, ctx, initial).await?)
        }
    };
    if let LoginResult::Forward(handoff) = result {
        return Ok(Attempt::Forward(handoff));
    }
    ctx.net().metrics.auth_attempt(label, result.metric());
    log_failure(ctx, label, &result);
    Ok(match login_result(conn, ctx, result, started).await? {
        Some(txn) => Attempt::LoggedIn(txn),
        None => Attempt::Answered,
    })
}

/// One info line per failed login, for fail2ban and forensics: the client's address
/// (the original client's on a home serving a forwarded session), the name tried
/// (escaped, as a client chose it), the mechanism and the reason class:
/// `credentials` (unknown name, wrong password or proof, a foreign authzid: the client
/// is not told which), `malformed` (no name could be read) or `throttled`. Never a
/// password or SASL message.
fn log_failure(ctx: &Ctx, mechanism: &str, result: &LoginResult) {
    let (name, reason) = match result {
        LoginResult::Failed(Some(name)) => (name.as_str(), "credentials"),
        LoginResult::Failed(None) => ("", "malformed"),
        LoginResult::Throttled(name) => (name.as_str(), "throttled"),
        _ => return,
    };
    info!(client = %ctx.peer.ip(), user = ?name, mechanism, reason, "login failed");
}

/// `Some` when `name`'s domain is not served here: forwarded to its home, or refused for
/// now. `replay` is the command that carries the name, for the home.
async fn routed(ctx: &Ctx, name: &str, replay: impl FnOnce() -> Vec<u8>) -> Option<LoginResult> {
    match forward::elsewhere(ctx, name, replay).await {
        Elsewhere::Here => None,
        Elsewhere::Forward(handoff) => Some(LoginResult::Forward(handoff)),
        Elsewhere::Unavailable => Some(LoginResult::Unavailable),
    }
}

/// `AUTH <mechanism> <initial response>` carrying `message` (RFC 5034: `=` for empty).
fn auth_command(mechanism: &str, message: &[u8]) -> Vec<u8> {
    let encoded = if message.is_empty() {
        "=".to_owned()
    } else {
        base64::engine::general_purpose::STANDARD.encode(message)
    };
    format!("AUTH {mechanism} {encoded}\r\n").into_bytes()
}

/// `Some` when the client IP or the login name may not try now (or the throttle cannot
/// tell). Asked before any password work, with the name whether or not it exists.
async fn throttled(ctx: &Ctx, name: &str) -> Option<LoginResult> {
    match ctx.service.logins.admit(ctx.peer.ip(), name).await {
        Admit::Allowed => None,
        Admit::Throttled => Some(LoginResult::Throttled(name.to_owned())),
        Admit::Unavailable => Some(LoginResult::Unavailable),
    }
}

async fn password_login(
    ctx: &Ctx,
    name: &str,
    password: &[u8],
) -> Result<LoginResult, SessionError> {
    if let Some(refused) = throttled(ctx, name).await {
        return Ok(refused);
    }
    match ctx.service.logins.password(name, password).await {
        Ok(found) => Ok(LoginResult::of(found, name)),
        Err(LoginError::Hasher(PoolError::Busy)) => Ok(LoginResult::Busy),
        Err(e) => Err(e.into()),
    }
}

async fn apop_login(ctx: &Ctx, name: &str, digest: &str) -> Result<LoginResult, SessionError> {
    if let Some(refused) = throttled(ctx, name).await {
        return Ok(refused);
    }
    let Some(timestamp) = ctx.apop_timestamp.as_deref() else {
        return Ok(LoginResult::Failed(Some(name.to_owned())));
    };
    let found = ctx.service.logins.apop(name, timestamp, digest).await?;
    Ok(LoginResult::of(found, name))
}

/// Reads one SASL client response line; `None` when the client cancelled with `*`
/// (already answered) or sent something undecodable (already answered).
async fn sasl_response<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &Ctx,
    challenge: &[u8],
) -> Result<Option<Vec<u8>>, SessionError> {
    conn.reply(&Reply::Challenge(challenge));
    let cancel = ctx.net().shutdown.clone();
    let deadline = Some(ctx.login_deadline);
    let line = match conn.next(MAX_SASL_LINE, &cancel, None, deadline).await? {
        Input::Line(l) => l,
        Input::LoginDeadline => return Err(SessionError::LoginTimeout),
        Input::TooLong => {
            conn.reply(&err(None, "Authentication response too long"));
            return Ok(None);
        }
        Input::Closed | Input::Timeout | Input::Cancelled | Input::LockLost | Input::TlsHello => {
            return Err(SessionError::Io(
                std::io::ErrorKind::ConnectionAborted.into(),
            ));
        }
    };
    Ok(decode_sasl(conn, &line))
}

fn decode_sasl<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    data: &[u8],
) -> Option<Vec<u8>> {
    match sasl::decode_response(data) {
        sasl::Response::Message(m) => Some(m),
        sasl::Response::Cancelled => {
            conn.reply(&err(None, "Authentication cancelled"));
            None
        }
        sasl::Response::Invalid => {
            conn.reply(&err(None, "Invalid base64 in authentication response"));
            None
        }
    }
}

/// The client's first SASL message: the initial response, or an answer to an empty
/// challenge.
async fn sasl_first<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &Ctx,
    initial: Option<String>,
) -> Result<Option<Vec<u8>>, SessionError> {
    match initial {
        Some(ir) => Ok(decode_sasl(conn, ir.as_bytes())),
        None => sasl_response(conn, ctx, b"").await,
    }
}

async fn sasl_plain<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &Ctx,
    initial: Option<String>,
) -> Result<LoginResult, SessionError> {
    let Some(decoded) = sasl_first(conn, ctx, initial).await? else {
        return Ok(LoginResult::Aborted);
    };
    let Ok(msg) = auth::plain::parse(&decoded) else {
        return Ok(LoginResult::Failed(None));
    };
    if let Some(elsewhere) = routed(ctx, msg.authcid, || auth_command("PLAIN", &decoded)).await {
        return Ok(elsewhere);
    }
    // We authorise no proxy logins: an authzid other than the authcid fails.
    if !auth::is_own_authzid(msg.authzid, msg.authcid) {
        return Ok(LoginResult::Failed(Some(msg.authcid.to_owned())));
    }
    password_login(ctx, msg.authcid, msg.password.as_bytes()).await
}

async fn sasl_scram<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &Ctx,
    initial: Option<String>,
) -> Result<LoginResult, SessionError> {
    let Some(first) = sasl_first(conn, ctx, initial).await? else {
        return Ok(LoginResult::Aborted);
    };
    let Ok(client_first) = scram::ClientFirst::parse(&first) else {
        conn.reply(&err(None, "Malformed SCRAM message"));
        return Ok(LoginResult::Aborted);
    };
    let name = client_first.username.as_str();
    if let Some(elsewhere) = routed(ctx, name, || auth_command("SCRAM-SHA-256", &first)).await {
        return Ok(elsewhere);
    }
    if let Some(refused) = throttled(ctx, name).await {
        return Ok(refused);
    }
    let failed = || LoginResult::Failed(Some(name.to_owned()));
    // We authorise no proxy logins: an authzid other than the username fails like a
    // wrong password, before any key is looked up.
    if !auth::is_own_authzid(client_first.authzid.as_deref().unwrap_or(""), name) {
        return Ok(failed());
    }
    // Unknown users, and accounts made from a PHC hash alone (no SCRAM keys), get
    // stand-in keys no proof matches: the exchange fails like a wrong password.
    let (keys, found) = ctx.service.logins.scram(name).await?;
    let server_first = scram::ServerFirst::new(&client_first, keys);
    let Some(client_final) = sasl_response(conn, ctx, server_first.message.as_bytes()).await?
    else {
        return Ok(LoginResult::Aborted);
    };
    let Ok(server_final) = server_first.finish(&client_final) else {
        return Ok(failed());
    };
    let Some(login) = found else {
        return Ok(failed());
    };
    // RFC 5034 §4: additional data with success goes in a challenge; the client answers
    // with an empty line.
    match sasl_response(conn, ctx, server_final.as_bytes()).await? {
        Some(empty) if empty.is_empty() => Ok(LoginResult::Verified(login)),
        Some(_) => Ok(failed()),
        None => Ok(LoginResult::Aborted),
    }
}

/// Answers a login attempt that began at `started`; on success opens the maildrop (lock,
/// then snapshot).
///
/// A failure is answered `limits.auth_failure_delay` after `started` (or when the work is
/// done, if it took longer): a known name with a costlier stored hash, an unknown one or
/// a malformed one all answer at the same moment, and the delay is not added to the work.
async fn login_result<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &mut Ctx,
    result: LoginResult,
    started: tokio::time::Instant,
) -> Result<Option<Box<Txn>>, SessionError> {
    let login = match result {
        LoginResult::Verified(login) => login,
        // invariant: `login` hands a forward to the session before answering.
        LoginResult::Aborted | LoginResult::Forward(_) => return Ok(None),
        LoginResult::Throttled(_) => {
            ctx.auth_failures += 1;
            conn.reply(&err(
                Some(RespCode::LoginDelay),
                "Too many failed logins, try again later",
            ));
            return Ok(None);
        }
        LoginResult::Unavailable => {
            conn.reply(&err(
                Some(RespCode::SysTemp),
                "Login service unavailable, try again later",
            ));
            return Ok(None);
        }
        LoginResult::Busy => {
            conn.reply(&err(
                Some(RespCode::SysTemp),
                "Too many logins in progress, try again later",
            ));
            return Ok(None);
        }
        LoginResult::Failed(name) => {
            ctx.auth_failures += 1;
            ctx.service
                .logins
                .failed(ctx.peer.ip(), name.as_deref())
                .await;
            conn.flush().await?;
            tokio::time::sleep_until(started + ctx.net().config.limits.auth_failure_delay()).await;
            conn.reply(&err(Some(RespCode::Auth), "Authentication failed"));
            return Ok(None);
        }
    };
    let Login {
        address,
        store,
        account,
    } = login;
    let key = address.to_string();
    let started = Instant::now();
    let acquired = ctx.service.locks.acquire(&key).await;
    let lock_metrics = &ctx.net().metrics.lock;
    lock_metrics
        .acquire_duration
        .observe(started.elapsed().as_secs_f64());
    let lock = match acquired {
        Ok(lock) => lock,
        Err(LockError::Busy) => {
            lock_metrics.contention.inc();
            conn.reply(&err(
                Some(RespCode::InUse),
                "Maildrop is locked by another session",
            ));
            return Ok(None);
        }
        Err(LockError::Unavailable(e)) => {
            warn!(error = %e, "maildrop lock unavailable");
            conn.reply(&err(
                Some(RespCode::SysTemp),
                "Maildrop lock service unavailable, try again later",
            ));
            return Ok(None);
        }
    };
    let snap_store = store.clone();
    let local = address.local.clone();
    let nonce = account.uid_nonce;
    // The messages first, then their stored UIDLs: a message imported in between has
    // its UIDL in the second read, so no listed message shows a computed one by mistake.
    let snapshot = tokio::task::spawn_blocking(move || {
        let messages = snap_store.snapshot(&local)?;
        Ok::<_, crate::store::StoreError>((messages, snap_store.uidls(&local, nonce)?))
    })
    .await?;
    let (msgs, uidls): (Vec<(MsgEntry, bool)>, _) = match snapshot {
        Ok((list, uidls)) => (
            list.into_iter()
                .map(|m| {
                    let entry = MsgEntry {
                        octets: m.octets,
                        id: m.id,
                        deleted: false,
                    };
                    (entry, m.seen)
                })
                .collect(),
            uidls,
        ),
        Err(e) => {
            warn!(error = %e, "cannot open maildrop");
            lock.release().await;
            conn.reply(&err(
                Some(RespCode::SysTemp),
                "Cannot open maildrop, try again later",
            ));
            return Ok(None);
        }
    };
    ctx.user = Some(key);
    let lost = lock.lost();
    // A move of the domain ends its open sessions through this token (a child of the
    // server's abort, so shutdown still ends them too).
    let abort = &ctx.net().abort;
    let cancel = match &ctx.service.cluster {
        Some(cluster) => cluster.eviction(&address.domain, abort),
        None => abort.clone(),
    };
    if cancel.is_cancelled() && !abort.is_cancelled() {
        // The domain's sessions were just evicted for a move: this one would end at its
        // first command, so it is refused before it is told it logged in.
        lock.release().await;
        conn.reply(&err(
            Some(RespCode::SysTemp),
            "Domain moving to another server, try again later",
        ));
        return Ok(None);
    }
    let txn = Box::new(Txn {
        address,
        store,
        lock: Some(lock),
        lost,
        cancel,
        listing: Listing::new(msgs, uidls),
    });
    let (count, octets) = txn.listing.totals();
    conn.reply(&Reply::Ok(Cow::Owned(format!(
        "Logged in, {count} messages ({octets} octets)"
    ))));
    Ok(Some(txn))
}
