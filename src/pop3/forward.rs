//! Handing a POP3 session to its domain's home replica. The front replica greets, answers
//! CAPA and STLS, and reads until it knows the login name; then [`elsewhere`] asks the
//! cluster where the name's domain lives, and a session homed on another replica is
//! relayed there ([`relay`]): the preamble (client address, TLS, session id, APOP
//! timestamp), the login command again, whatever the client already sent after it, then
//! bytes both ways until either side closes. The home checks the password, throttles,
//! locks and runs UPDATE; the client cannot tell which replica it reached.

use super::session::{Conn, Ctx};
use crate::cluster::{Alpn, Preamble, Route};
use crate::metrics::{ForwardProtocol, ForwardResult, Outcome};
use crate::store::Address;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::{debug, info};

/// A session on its way to its home: the connected link and the command to replay there.
pub(super) struct Handoff {
    pub peer: String,
    pub link: TlsStream<TcpStream>,
    pub replay: Vec<u8>,
}

/// Where a login for `name` goes, when not here.
pub(super) enum Elsewhere {
    /// Served by this replica.
    Here,
    /// Connected to the home: hand the session over.
    Forward(Box<Handoff>),
    /// Answer "try again later".
    Unavailable,
}

/// Asks the cluster (if any) where `name`'s domain is served and, for another replica,
/// connects to it. `replay` is the command that carries the name, sent again at the home.
pub(super) async fn elsewhere(
    ctx: &Ctx,
    name: &str,
    replay: impl FnOnce() -> Vec<u8>,
) -> Elsewhere {
    let Some(cluster) = &ctx.service.cluster else {
        return Elsewhere::Here;
    };
    // A name that is no address fails here like an unknown one.
    let Ok(address) = Address::parse(name) else {
        return Elsewhere::Here;
    };
    match cluster
        .route(&address.domain, ctx.forwarded.is_some())
        .await
    {
        Route::Local => Elsewhere::Here,
        Route::Unavailable(why) => {
            info!(domain = %address.domain, reason = why.describe(), "login refused for now");
            Elsewhere::Unavailable
        }
        Route::Forward(peer) => match cluster.connect(&peer, Alpn::Pop3).await {
            Ok(link) => Elsewhere::Forward(Box::new(Handoff {
                peer,
                link,
                replay: replay(),
            })),
            // Counted and logged by `connect`.
            Err(_) => Elsewhere::Unavailable,
        },
    }
}

/// Relays the rest of the session to the home. Replies already queued are flushed
/// first; bytes the client sent after the login command go to the home in order.
pub(super) async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Conn<S>,
    ctx: &Ctx,
    handoff: Handoff,
) -> Outcome {
    let Some(cluster) = &ctx.service.cluster else {
        // invariant: a handoff is only made through the cluster.
        return Outcome::Error;
    };
    let Handoff {
        peer,
        mut link,
        replay,
    } = handoff;
    let metrics = &ctx.net().metrics;
    if conn.flush().await.is_err() {
        metrics.forward(&peer, ForwardProtocol::Pop3, ForwardResult::Error);
        return Outcome::Dropped;
    }
    let (client, pending) = conn.io.into_parts();
    let preamble = Preamble {
        hop: 1,
        from: cluster.name().to_owned(),
        client: ctx.peer,
        listener: ctx.listener,
        tls: ctx.tls,
        sid: ctx.sid,
        apop: ctx.apop_timestamp.clone(),
        helo: None,
    };
    let mut head = preamble.encode();
    head.extend_from_slice(&replay);
    head.extend_from_slice(&pending);
    drop(pending);
    let idle = ctx.net().config.limits.idle_timeout();
    match tokio::time::timeout(idle, link.write_all(&head)).await {
        Ok(Ok(())) => {}
        _ => {
            metrics.forward(&peer, ForwardProtocol::Pop3, ForwardResult::Error);
            return Outcome::Error;
        }
    }
    info!(peer = %peer, "session forwarded to the domain's home");
    let result = pipe(client, link, ctx).await;
    let label = match result {
        Ok((up, down)) => {
            debug!(up, down, "relay ended");
            ForwardResult::Ok
        }
        Err(e) => {
            debug!(error = %e, "relay broke");
            ForwardResult::Error
        }
    };
    metrics.forward(&peer, ForwardProtocol::Pop3, label);
    Outcome::Forwarded
}

/// How a relay ended.
enum End {
    /// The home closed: the session is over.
    Home(std::io::Result<u64>),
    /// The client closed its sending side.
    Client(std::io::Result<u64>),
    /// The front's grace period is over.
    Abort,
}

/// Copies bytes both ways until the home closes (the session is over, whatever the
/// client still holds open) or the client does (the home is told and given the idle
/// timeout to finish). The home enforces the session's own timeouts. Returns the octets
/// sent each way as far as known.
async fn pipe<C, L>(client: C, link: L, ctx: &Ctx) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_in, mut client_out) = tokio::io::split(client);
    let (mut link_in, mut link_out) = tokio::io::split(link);
    let end = {
        let up = tokio::io::copy(&mut client_in, &mut link_out);
        let down = tokio::io::copy(&mut link_in, &mut client_out);
        tokio::pin!(up, down);
        tokio::select! {
            d = &mut down => End::Home(d),
            u = &mut up => End::Client(u),
            _ = ctx.net().abort.cancelled() => End::Abort,
        }
    };
    match end {
        End::Home(down) => {
            let _ = client_out.shutdown().await;
            Ok((0, down?))
        }
        // The client hung up, with or without a TLS close_notify: its own doing, not a
        // broken link; only what the home sends afterwards can fail the relay.
        End::Client(up) => {
            let _ = link_out.shutdown().await;
            let idle = ctx.net().config.limits.idle_timeout();
            let down = tokio::time::timeout(idle, tokio::io::copy(&mut link_in, &mut client_out))
                .await
                .unwrap_or(Ok(0));
            let _ = client_out.shutdown().await;
            Ok((up.unwrap_or(0), down.unwrap_or(0)))
        }
        End::Abort => Err(std::io::ErrorKind::Interrupted.into()),
    }
}
