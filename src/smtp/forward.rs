//! Deliveries for another replica's domains: a [`Leg`] is one transaction relayed to one
//! home over the replica link, speaking the client's own dialect (LMTP, or SMTP for the
//! inbound MX) as a client. The session opens a leg at the first RCPT for that home,
//! relays each RCPT's answer, streams the DATA bytes to every leg as they arrive (still
//! dot-stuffed, never whole) and collects the homes' answers after the final dot. The
//! home writes its own trace headers from the preamble (the client's address) and the
//! HELO name the leg passes on.

use super::codec::{MailFrom, Reply};
use crate::cluster::{forward_protocol, Alpn, Cluster, Preamble};
use crate::config::Listener;
use crate::metrics::{ForwardResult, Metrics, RecipientResult};
use crate::wire::LineReader;
use bytes::BytesMut;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::{debug, warn};

/// Longest reply line accepted from a home.
const MAX_REPLY_LINE: usize = 1024;
/// Most lines in one reply from a home.
const MAX_REPLY_LINES: usize = 64;

/// The answer for a recipient whose home did not answer.
pub fn unreachable() -> Reply {
    Reply::new(451, "4.4.0", "Home replica unreachable, try again later")
}

/// The answer for recipients of a second home in one SMTP transaction (RFC 5321 §3.3:
/// the client sends them again in another transaction).
pub fn other_home() -> Reply {
    Reply::new(
        452,
        "4.5.3",
        "Recipient on another home replica, send it in a new transaction",
    )
}

#[derive(Debug, thiserror::Error)]
enum LegError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed reply")]
    Malformed,
}

/// Who the client is, for the preamble.
pub struct Origin<'a> {
    pub client: SocketAddr,
    pub listener: Listener,
    pub tls: bool,
    pub sid: u64,
    pub helo: &'a str,
}

/// One transaction relayed to one home.
pub struct Leg {
    pub peer: String,
    protocol: Alpn,
    stream: Option<TlsStream<TcpStream>>,
    rbuf: BytesMut,
    lines: LineReader,
    timeout: Duration,
    /// Recipients the home accepted, in RCPT order: the LMTP replies after DATA.
    accepted: usize,
    /// Whether the home answered DATA with 354 and is taking the message.
    in_data: bool,
}

impl Leg {
    /// Connects to `peer`, greets as the client did and opens the transaction with the
    /// client's MAIL FROM. `Err` is the reply for the recipient that asked for it.
    pub async fn open(
        cluster: &Cluster,
        peer: &str,
        protocol: Alpn,
        origin: Origin<'_>,
        mail: &MailFrom,
        timeout: Duration,
        metrics: &Metrics,
    ) -> Result<Leg, Reply> {
        let stream = cluster
            .connect(peer, protocol)
            .await
            .map_err(|_| unreachable())?;
        let mut leg = Leg {
            peer: peer.to_owned(),
            protocol,
            stream: Some(stream),
            rbuf: BytesMut::new(),
            lines: LineReader::new(),
            timeout,
            accepted: 0,
            in_data: false,
        };
        let preamble = Preamble {
            hop: 1,
            from: cluster.name().to_owned(),
            client: origin.client,
            listener: origin.listener,
            tls: origin.tls,
            sid: origin.sid,
            apop: None,
            helo: Some(origin.helo.to_owned()),
        };
        let greet = match protocol {
            Alpn::Lmtp => "LHLO",
            _ => "EHLO",
        };
        let mut mail_line = format!("MAIL FROM:<{}>", mail.from);
        if let Some(size) = mail.size {
            mail_line.push_str(&format!(" SIZE={size}"));
        }
        if mail.eight_bit {
            mail_line.push_str(" BODY=8BITMIME");
        }
        if mail.smtputf8 {
            mail_line.push_str(" SMTPUTF8");
        }
        let opened = async {
            leg.send(&preamble.encode()).await?;
            leg.expect(220).await?;
            leg.send(format!("{greet} {}\r\n", origin.helo).as_bytes())
                .await?;
            leg.expect(250).await?;
            leg.send(format!("{mail_line}\r\n").as_bytes()).await?;
            leg.reply().await
        };
        match opened.await {
            Ok(r) if r.code == 250 => Ok(leg),
            Ok(r) => {
                metrics.forward(peer, forward_protocol(protocol), ForwardResult::Refused);
                Err(r)
            }
            Err(e) => {
                warn!(peer, error = %e, "home did not open the transaction");
                metrics.forward(peer, forward_protocol(protocol), ForwardResult::Error);
                Err(unreachable())
            }
        }
    }

    /// Relays one RCPT; the home's answer (or 451 4.4.0 when it broke).
    pub async fn rcpt(&mut self, to: &str) -> Reply {
        let asked = async {
            self.send(format!("RCPT TO:<{to}>\r\n").as_bytes()).await?;
            self.reply().await
        };
        match asked.await {
            Ok(r) => {
                if r.code == 250 {
                    self.accepted += 1;
                }
                r
            }
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "home broke off at RCPT");
                self.stream = None;
                unreachable()
            }
        }
    }

    /// Starts DATA at the home when it accepted someone; false when the leg is dead.
    pub async fn data(&mut self) -> bool {
        if self.accepted == 0 || self.stream.is_none() {
            return false;
        }
        let started = async {
            self.send(b"DATA\r\n").await?;
            self.reply().await
        };
        match started.await {
            Ok(r) if r.code == 354 => {
                self.in_data = true;
                true
            }
            Ok(r) => {
                debug!(peer = %self.peer, code = r.code, "home refused DATA");
                self.stream = None;
                false
            }
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "home broke off at DATA");
                self.stream = None;
                false
            }
        }
    }

    /// Passes message bytes (dot-stuffed, as the client sent them) to the home.
    pub async fn write(&mut self, data: &[u8]) {
        if !self.in_data {
            return;
        }
        if let Err(e) = self.send(data).await {
            warn!(peer = %self.peer, error = %e, "home broke off during DATA");
            self.stream = None;
            self.in_data = false;
        }
    }

    /// The home's answers after the final dot: one per accepted recipient (LMTP) or one
    /// (SMTP); 451 4.4.0 for each one missing.
    pub async fn finish(&mut self, metrics: &Metrics) -> Vec<Reply> {
        let wanted = match self.protocol {
            Alpn::Lmtp => self.accepted,
            _ => usize::from(self.accepted > 0),
        };
        let mut replies = Vec::with_capacity(wanted);
        while replies.len() < wanted && self.in_data {
            match self.reply().await {
                Ok(r) => replies.push(r),
                Err(e) => {
                    warn!(peer = %self.peer, error = %e, "home broke off after DATA");
                    self.stream = None;
                    self.in_data = false;
                }
            }
        }
        let complete = replies.len() == wanted;
        replies.resize_with(wanted, unreachable);
        for r in &replies {
            let result = match r.code {
                200..=299 => RecipientResult::Delivered,
                500..=599 => RecipientResult::Rejected,
                _ => RecipientResult::Deferred,
            };
            let count = match self.protocol {
                Alpn::Lmtp => 1,
                _ => self.accepted,
            };
            for _ in 0..count {
                metrics.forwarded_recipient(&self.peer, result);
            }
        }
        metrics.forward(
            &self.peer,
            forward_protocol(self.protocol),
            if complete {
                ForwardResult::Ok
            } else {
                ForwardResult::Error
            },
        );
        self.in_data = false;
        replies
    }

    /// Ends the leg: QUIT, without waiting for the answer.
    pub async fn close(mut self) {
        if let Some(mut s) = self.stream.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                let _ = s.write_all(b"QUIT\r\n").await;
                let _ = s.shutdown().await;
            })
            .await;
        }
    }

    async fn send(&mut self, data: &[u8]) -> Result<(), LegError> {
        let stream = self.stream.as_mut().ok_or(LegError::Malformed)?;
        match tokio::time::timeout(self.timeout, stream.write_all(data)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(LegError::Timeout(self.timeout)),
        }
    }

    async fn expect(&mut self, code: u16) -> Result<(), LegError> {
        let r = self.reply().await?;
        if r.code == code {
            Ok(())
        } else {
            Err(LegError::Malformed)
        }
    }

    /// Reads one (possibly multi-line) reply.
    async fn reply(&mut self) -> Result<Reply, LegError> {
        let mut lines: Vec<Cow<'static, str>> = Vec::new();
        loop {
            let line = self.line().await?;
            let (code, last, text) = parse_reply_line(&line).ok_or(LegError::Malformed)?;
            if lines.len() >= MAX_REPLY_LINES {
                return Err(LegError::Malformed);
            }
            lines.push(Cow::Owned(text.to_owned()));
            if last {
                return Ok(Reply::plain(code, lines));
            }
        }
    }

    async fn line(&mut self) -> Result<String, LegError> {
        loop {
            match self.lines.next_line(&mut self.rbuf, MAX_REPLY_LINE) {
                Some(Ok(line)) => {
                    return String::from_utf8(line.to_vec()).map_err(|_| LegError::Malformed)
                }
                Some(Err(_)) => return Err(LegError::Malformed),
                None => {}
            }
            let stream = self.stream.as_mut().ok_or(LegError::Malformed)?;
            self.rbuf.reserve(1024);
            let n = match tokio::time::timeout(self.timeout, stream.read_buf(&mut self.rbuf)).await
            {
                Ok(r) => r?,
                Err(_) => return Err(LegError::Timeout(self.timeout)),
            };
            if n == 0 {
                return Err(LegError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// `250-text` / `250 text` / `250`: the code, whether it is the last line, the text.
fn parse_reply_line(line: &str) -> Option<(u16, bool, &str)> {
    let code = line.get(..3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let code: u16 = code.parse().ok()?;
    if !(200..600).contains(&code) {
        return None;
    }
    let mut rest = line[3..].chars();
    match rest.next() {
        None => Some((code, true, "")),
        Some(' ') => Some((code, true, rest.as_str())),
        Some('-') => Some((code, false, rest.as_str())),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines() {
        assert_eq!(
            parse_reply_line("250 2.1.5 OK"),
            Some((250, true, "2.1.5 OK"))
        );
        assert_eq!(
            parse_reply_line("250-PIPELINING"),
            Some((250, false, "PIPELINING"))
        );
        assert_eq!(parse_reply_line("354"), Some((354, true, "")));
        for bad in ["", "25", "abc ok", "250x", "999 nope", "100 low", "２50 x"] {
            assert_eq!(parse_reply_line(bad), None, "{bad}");
        }
    }

    #[test]
    fn relayed_replies_keep_the_home_text() {
        let r = Reply::plain(
            452,
            vec![Cow::Borrowed("4.2.2 Mailbox full, try again later")],
        );
        let mut out = BytesMut::new();
        r.write_to(&mut out);
        assert_eq!(&out[..], b"452 4.2.2 Mailbox full, try again later\r\n");
        let mut out = BytesMut::new();
        unreachable().write_to(&mut out);
        assert!(out.starts_with(b"451 4.4.0 "));
        let mut out = BytesMut::new();
        other_home().write_to(&mut out);
        assert!(out.starts_with(b"452 4.5.3 "));
    }
}
