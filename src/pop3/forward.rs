//! Handing a POP3 session to its domain's home replica. The front replica greets, answers
//! CAPA and STLS, and reads until it knows the login name; then [`elsewhere`] asks the
//! cluster where the name's domain lives, and a session homed on another replica is
//! relayed there ([`relay`]): the preamble (client address, TLS, session id, APOP
//! timestamp), the login command again, whatever the client already sent after it, then
//! bytes both ways until either side closes. The home checks the password, throttles,
//! locks and runs UPDATE; the client cannot tell which replica it reached.

use super::session::{Conn, Ctx};
use crate::cluster::frame::{self, Framed};
use crate::cluster::{Alpn, Cluster, Preamble, Route};
use crate::metrics::{ForwardProtocol, ForwardResult, Outcome};
use crate::store::Address;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::{debug, info};

/// A session on its way to its home: the connected link and the command to replay there.
pub(super) struct Handoff {
    pub peer: String,
    pub link: Framed<TlsStream<TcpStream>>,
    /// The preamble went ahead already (a reused link, acknowledged by the home).
    pub preamble_sent: bool,
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
        Route::Forward(peer) => match link_to(cluster, ctx, &peer).await {
            Some((link, preamble_sent)) => Elsewhere::Forward(Box::new(Handoff {
                peer,
                link,
                preamble_sent,
                replay: replay(),
            })),
            None => Elsewhere::Unavailable,
        },
    }
}

/// A link to `peer` for this session: an idle one whose home acknowledged the preamble
/// within the connect timeout (`true`: the preamble is sent), else a new connection.
/// `None` when the home cannot be reached (counted and logged by `connect`).
async fn link_to(
    cluster: &Cluster,
    ctx: &Ctx,
    peer: &str,
) -> Option<(Framed<TlsStream<TcpStream>>, bool)> {
    let (link, reused) = cluster.connect_pop3(peer).await.ok()?;
    let mut link = Framed::new(link);
    if !reused {
        return Some((link, false));
    }
    let preamble = preamble(cluster, ctx);
    // The acknowledgement and, failing it, a new connection share one connect timeout, so
    // a home that hangs is answered for within it as when nothing was pooled.
    let linked = async {
        match acknowledged(&mut link, &preamble).await {
            Ok(()) => return Some(true),
            Err(e) => debug!(peer, error = %e, "idle link gone; connecting anew"),
        }
        let fresh = cluster.connect(peer, Alpn::Pop3).await.ok()?;
        link = Framed::new(fresh);
        Some(false)
    };
    match tokio::time::timeout(cluster.link.connect_timeout(), linked).await {
        Ok(Some(preamble_sent)) => Some((link, preamble_sent)),
        Ok(None) => None,
        Err(_) => {
            debug!(peer, "the home did not answer on its idle link in time");
            let metrics = cluster.metrics();
            metrics.peer_connect(peer, None);
            metrics.forward(peer, ForwardProtocol::Pop3, ForwardResult::Unreachable);
            None
        }
    }
}

/// The session's preamble line.
fn preamble(cluster: &Cluster, ctx: &Ctx) -> Vec<u8> {
    Preamble {
        hop: 1,
        from: cluster.name().to_owned(),
        client: ctx.peer,
        listener: ctx.listener,
        tls: ctx.tls,
        sid: ctx.sid,
        apop: ctx.apop_timestamp.clone(),
        helo: None,
    }
    .encode()
}

/// Relays the rest of the session to the home. Replies already queued are flushed
/// first; bytes the client sent after the login command go to the home in order. A link
/// whose session ended cleanly on both sides goes back to the cluster for the next one.
pub(super) async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Conn<S>,
    ctx: &Ctx,
    handoff: Handoff,
) -> Outcome {
    let Some(cluster) = &ctx.service.cluster else {
        // invariant: a handoff is only made through the cluster.
        return Outcome::Error;
    };
    let metrics = &ctx.net().metrics;
    let peer = handoff.peer.clone();
    if conn.flush().await.is_err() {
        metrics.forward(&peer, ForwardProtocol::Pop3, ForwardResult::Error);
        return Outcome::Dropped;
    }
    let (mut client, pending) = conn.io.into_parts();
    let mut head = if handoff.preamble_sent {
        Vec::new()
    } else {
        preamble(cluster, ctx)
    };
    head.extend_from_slice(&handoff.replay);
    head.extend_from_slice(&pending);
    drop(pending);
    let idle = ctx.net().config.limits.idle_timeout();
    let mut link = handoff.link;
    let (link, first) = match exchange(&mut link, &head, idle).await {
        Ok(first) => (link, first),
        Err(e) => {
            debug!(peer = %peer, error = %e, "home did not take the session");
            metrics.forward(&peer, ForwardProtocol::Pop3, ForwardResult::Error);
            return Outcome::Error;
        }
    };
    if tokio::time::timeout(idle, client.write_all(&first))
        .await
        .is_err()
    {
        metrics.forward(&peer, ForwardProtocol::Pop3, ForwardResult::Error);
        return Outcome::Dropped;
    }
    info!(peer = %peer, "session forwarded to the domain's home");
    let (result, reusable) = pipe(client, link, ctx).await;
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
    if let Some(link) = reusable {
        cluster.reuse_pop3(&peer, link.into_inner());
    }
    Outcome::Forwarded
}

/// Sends the preamble alone and reads the home's acknowledgement.
async fn acknowledged<L: AsyncRead + AsyncWrite + Unpin>(
    link: &mut L,
    preamble: &[u8],
) -> std::io::Result<()> {
    link.write_all(preamble).await?;
    link.flush().await?;
    let mut ack = [0u8; 1];
    link.read_exact(&mut ack).await?;
    if ack[0] != frame::ACK {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no acknowledgement from the home",
        ));
    }
    Ok(())
}

/// Writes `head` and waits for the home's first octets (it always answers the login
/// command it was handed).
async fn exchange<L: AsyncRead + AsyncWrite + Unpin>(
    link: &mut L,
    head: &[u8],
    idle: Duration,
) -> std::io::Result<Vec<u8>> {
    link.write_all(head).await?;
    link.flush().await?;
    let mut first = vec![0; 4096];
    let n = tokio::time::timeout(idle, link.read(&mut first))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    first.truncate(n);
    Ok(first)
}

/// Bytes read from the home at a time: one full TLS record toward the client (RETR
/// replies are the bulk of a session), without growing an idle session much.
const RELAY_BUFFER: usize = 16 * 1024;

/// How a relay ended.
enum End {
    /// The home ended the session.
    Home(std::io::Result<u64>),
    /// The client closed its sending side.
    Client(std::io::Result<u64>),
    /// The front's grace period is over.
    Abort,
}

/// Copies bytes both ways until the home ends the session (whatever the client still
/// holds open) or the client closes (the home is told and given the idle timeout to
/// finish). The home enforces the session's own timeouts. Returns the octets sent each
/// way as far as known, and the link when both sides ended it cleanly.
async fn pipe<C, L>(
    client: C,
    link: Framed<L>,
    ctx: &Ctx,
) -> (std::io::Result<(u64, u64)>, Option<Framed<L>>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_in, mut client_out) = tokio::io::split(client);
    let (link_in, mut link_out) = tokio::io::split(link);
    let mut link_in = tokio::io::BufReader::with_capacity(RELAY_BUFFER, link_in);
    let end = {
        let up = tokio::io::copy(&mut client_in, &mut link_out);
        // Large reads from the link: fewer, fuller TLS records toward the client.
        let down = tokio::io::copy_buf(&mut link_in, &mut client_out);
        tokio::pin!(up, down);
        tokio::select! {
            d = &mut down => End::Home(d),
            u = &mut up => End::Client(u),
            _ = ctx.net().abort.cancelled() => End::Abort,
        }
    };
    let result = match end {
        End::Home(down) => {
            let _ = client_out.shutdown().await;
            // The home has ended; say so back, and the link is free again.
            let _ = link_out.shutdown().await;
            down.map(|d| (0, d))
        }
        // The client hung up, with or without a TLS close_notify: its own doing, not a
        // broken link; only what the home sends afterwards can fail the relay.
        End::Client(up) => {
            let _ = link_out.shutdown().await;
            let idle = ctx.net().config.limits.idle_timeout();
            let down =
                tokio::time::timeout(idle, tokio::io::copy_buf(&mut link_in, &mut client_out))
                    .await
                    .unwrap_or(Err(std::io::ErrorKind::TimedOut.into()));
            let _ = client_out.shutdown().await;
            down.map(|d| (up.unwrap_or(0), d))
        }
        End::Abort => return (Err(std::io::ErrorKind::Interrupted.into()), None),
    };
    let link = link_in.into_inner().unsplit(link_out);
    let reusable = (result.is_ok() && link.reusable()).then_some(link);
    (result, reusable)
}
