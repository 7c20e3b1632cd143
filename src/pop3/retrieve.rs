//! Reading and removing mail: RETR and TOP streamed from the store in chunks through the
//! dot-stuffer (never a whole message in memory), and the UPDATE state at QUIT, which
//! applies the DELE marks (and, with `pop3.last`, the seen marks) in one atomic
//! transaction while the maildrop lock is still ours.

use super::codec::{BodyEncoder, MsgEntry, Reply, RespCode};
use super::session::{err, ok, Conn, Ctx, SessionError, Txn, FLUSH_AT};
use crate::metrics;
use crate::store::DomainStore;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

/// RETR (`top: None`), or TOP with the header and the first `lines` lines of the body.
pub(super) async fn retrieve<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &mut Ctx,
    txn: &mut Txn,
    n: u32,
    top: Option<u32>,
) -> Result<(), SessionError> {
    let m = match txn.listing.entry(n) {
        Ok(m) => m,
        Err(r) => {
            conn.reply(&r);
            return Ok(());
        }
    };
    let started = Instant::now();
    let (encoder, head, command) = match top {
        None => (
            BodyEncoder::full(ctx.body_options()),
            None,
            metrics::COMMAND_RETR,
        ),
        Some(lines) => (
            BodyEncoder::top(lines, ctx.body_options()),
            Some(ok("Top of message follows")),
            metrics::COMMAND_TOP,
        ),
    };
    let whole = send_message(conn, ctx, &txn.store, m, encoder, head).await?;
    ctx.net()
        .metrics
        .command_duration(command, started.elapsed());
    if whole {
        txn.listing.retrieved(n);
    }
    if top.is_none() {
        ctx.retrieved += 1;
    }
    Ok(())
}

/// The UPDATE state (RFC 1939 §6): applies the DELE marks, then gives the maildrop
/// lock up *before* the client reads the answer, so a client that reconnects at once
/// never finds its own session's lock still held.
pub(super) async fn update<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &mut Ctx,
    txn: &mut Txn,
) -> Result<(), SessionError> {
    apply_marks(conn, ctx, txn).await?;
    if let Some(lock) = txn.lock.take() {
        lock.release().await;
    }
    conn.flush().await
}

/// Applies the DELE marks, and the seen marks when `pop3.last` is on, in one atomic
/// transaction, but only while the maildrop lock is still ours; writes the answer
/// without sending it.
async fn apply_marks<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &mut Ctx,
    txn: &mut Txn,
) -> Result<(), SessionError> {
    let ids = txn.listing.marked();
    let seen = if ctx.net().config.pop3.last {
        txn.listing.newly_seen()
    } else {
        Vec::new()
    };
    if ids.is_empty() && seen.is_empty() {
        conn.reply(&ok("Logging out"));
        return Ok(());
    }
    let held = match &txn.lock {
        Some(lock) => lock.still_held().await,
        None => false,
    };
    if !held {
        ctx.net().metrics.lock.losses.inc();
        warn!(user = %txn.address, "maildrop lock lost before UPDATE; nothing deleted");
        conn.reply(&err(
            Some(RespCode::SysTemp),
            "Maildrop lock lost, no messages deleted",
        ));
        return Ok(());
    }
    // Fencing: only the domain's current home may change its maildrops.
    // During a move's grace the old home still commits; its seal stops that after.
    if let Some(cluster) = &ctx.service.cluster {
        if !cluster.may_commit(&txn.address.domain).await {
            warn!(user = %txn.address, "no longer the domain's home before UPDATE; nothing deleted");
            conn.reply(&err(
                Some(RespCode::SysTemp),
                "Maildrop moved or unavailable, no messages deleted",
            ));
            return Ok(());
        }
    }
    let store = txn.store.clone();
    let local = txn.address.local.clone();
    let count = ids.len();
    let started = Instant::now();
    let result =
        tokio::task::spawn_blocking(move || store.update_maildrop(&local, &ids, &seen)).await?;
    ctx.net()
        .metrics
        .command_duration(metrics::COMMAND_UPDATE, started.elapsed());
    match result {
        Ok(()) if count == 0 => conn.reply(&ok("Logging out")),
        Ok(()) => {
            ctx.deleted = count as u32;
            conn.reply(&Reply::Ok(Cow::Owned(format!(
                "Logging out, {count} messages deleted"
            ))));
        }
        Err(e) => {
            warn!(error = %e, "UPDATE failed");
            conn.reply(&err(
                Some(RespCode::SysTemp),
                "Some deleted messages not removed",
            ));
        }
    }
    Ok(())
}

/// Streams one message (or its top) through the dot-stuffer in store-sized chunks;
/// whether the client got the whole message.
async fn send_message<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    ctx: &mut Ctx,
    store: &Arc<DomainStore>,
    m: MsgEntry,
    mut encoder: BodyEncoder,
    head: Option<Reply<'static>>,
) -> Result<bool, SessionError> {
    // RETR must deliver every recorded octet; TOP legitimately stops early.
    let whole = head.is_none();
    let sent = ctx.net().metrics.sent_bytes(if whole {
        metrics::COMMAND_RETR
    } else {
        metrics::COMMAND_TOP
    });
    let mut buf = Vec::with_capacity(crate::store::CHUNK_SIZE);
    let mut offset = 0u64;
    // The first chunk is read before the +OK, so a message that cannot be read gets a
    // clean -ERR instead of a truncated reply.
    let (returned, n) = read_chunk(store, m.id, offset, buf).await?;
    buf = returned;
    if n == 0 && m.octets > 0 {
        return Err(SessionError::Truncated(m.id));
    }
    conn.reply(&head.unwrap_or(Reply::MessageFollows { octets: m.octets }));
    let mut n = n;
    while n > 0 {
        offset += n as u64;
        let more = encoder.encode(&buf[..n], conn.io.out());
        let pending = conn.io.out().len();
        if pending >= FLUSH_AT {
            ctx.bytes_out += pending as u64;
            sent.inc_by(pending as u64);
            conn.flush().await?;
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
    let complete = offset >= m.octets && !encoder.cut();
    encoder.finish(conn.io.out());
    let pending = conn.io.out().len();
    ctx.bytes_out += pending as u64;
    sent.inc_by(pending as u64);
    Ok(complete)
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
