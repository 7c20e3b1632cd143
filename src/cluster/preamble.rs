//! The first line of every forwarded connection on the replica link: who the client is
//! (address, listener, TLS), the front's session id, the greeting's APOP timestamp and the
//! client's HELO name, and the hop count. Believed only on the mutual-TLS link. Pure: no
//! I/O.

use crate::config::Listener;
use std::net::SocketAddr;

/// The version word that starts the line; a home refuses any other.
const MAGIC: &str = "MAILGATE-FORWARD/1";
/// Longest preamble line accepted, CRLF included.
pub const MAX_PREAMBLE: usize = 1024;
/// A session crosses the link once: a home never forwards again.
pub const MAX_HOPS: u8 = 1;

/// What a forwarded session carries from the replica the client reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    /// Crossings of the replica link so far, this one included.
    pub hop: u8,
    /// The forwarding replica's name.
    pub from: String,
    /// The client's address as the front saw it (after any PROXY header).
    pub client: SocketAddr,
    /// The listener the client connected to.
    pub listener: Listener,
    /// Whether the client's connection is TLS (implicit, STLS or STARTTLS).
    pub tls: bool,
    /// The front's session id, so both replicas' logs name one session.
    pub sid: u64,
    /// POP3: the APOP timestamp the front's greeting showed.
    pub apop: Option<String>,
    /// LMTP/SMTP: the client's LHLO/EHLO/HELO name.
    pub helo: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    #[error("not a forwarding preamble")]
    Magic,
    #[error("preamble field {0:?} missing or malformed")]
    Field(&'static str),
    #[error("hop limit exceeded ({0})")]
    Hops(u8),
}

/// A value fit for the space-separated line: printable, no spaces, not empty.
fn token(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| b.is_ascii_graphic())
}

impl Preamble {
    /// The line with its CRLF. Fields that would not survive the line (spaces, control
    /// characters) are left out.
    pub fn encode(&self) -> Vec<u8> {
        let mut line = format!(
            "{MAGIC} hop={} from={} client={} listener={} tls={} sid={}",
            self.hop,
            self.from,
            self.client,
            self.listener.name(),
            u8::from(self.tls),
            self.sid
        );
        if let Some(apop) = self.apop.as_deref().filter(|v| token(v)) {
            line.push_str(" apop=");
            line.push_str(apop);
        }
        if let Some(helo) = self.helo.as_deref().filter(|v| token(v)) {
            line.push_str(" helo=");
            line.push_str(helo);
        }
        line.push_str("\r\n");
        line.truncate(MAX_PREAMBLE - 2);
        let mut bytes = line.into_bytes();
        if !bytes.ends_with(b"\r\n") {
            bytes.extend_from_slice(b"\r\n");
        }
        bytes
    }

    /// Parses a line without its line ending.
    pub fn parse(line: &[u8]) -> Result<Preamble, PreambleError> {
        if line.len() > MAX_PREAMBLE - 2 {
            return Err(PreambleError::Field("length"));
        }
        let text = std::str::from_utf8(line).map_err(|_| PreambleError::Magic)?;
        let mut words = text.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(PreambleError::Magic);
        }
        let (mut hop, mut from, mut client, mut listener, mut tls, mut sid) =
            (None, None, None, None, None, None);
        let (mut apop, mut helo) = (None, None);
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                return Err(PreambleError::Field("key=value"));
            };
            if !token(value) {
                return Err(PreambleError::Field("value"));
            }
            match key {
                "hop" => hop = value.parse::<u8>().ok(),
                "from" => from = Some(value.to_owned()),
                "client" => client = value.parse::<SocketAddr>().ok(),
                "listener" => listener = Listener::from_name(value),
                "tls" => {
                    tls = match value {
                        "0" => Some(false),
                        "1" => Some(true),
                        _ => None,
                    }
                }
                "sid" => sid = value.parse::<u64>().ok(),
                "apop" => apop = Some(value.to_owned()),
                "helo" => helo = Some(value.to_owned()),
                // Unknown keys are left for later versions to add.
                _ => {}
            }
        }
        let hop = hop.ok_or(PreambleError::Field("hop"))?;
        if hop == 0 || hop > MAX_HOPS {
            return Err(PreambleError::Hops(hop));
        }
        Ok(Preamble {
            hop,
            from: from.ok_or(PreambleError::Field("from"))?,
            client: client.ok_or(PreambleError::Field("client"))?,
            listener: listener.ok_or(PreambleError::Field("listener"))?,
            tls: tls.ok_or(PreambleError::Field("tls"))?,
            sid: sid.ok_or(PreambleError::Field("sid"))?,
            apop,
            helo,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Preamble {
        Preamble {
            hop: 1,
            from: "mailgate-1".into(),
            client: "[2001:db8::7]:50123".parse().expect("addr"),
            listener: Listener::Pop3s,
            tls: true,
            sid: 42,
            apop: Some("<1234.5678@mail.example>".into()),
            helo: None,
        }
    }

    #[test]
    fn round_trips() {
        let p = sample();
        let line = p.encode();
        assert!(line.ends_with(b"\r\n"));
        assert_eq!(Preamble::parse(&line[..line.len() - 2]), Ok(p));
        let lmtp = Preamble {
            listener: Listener::Lmtp,
            tls: false,
            apop: None,
            helo: Some("mx.example.net".into()),
            client: "127.0.0.1:25".parse().expect("addr"),
            ..sample()
        };
        let line = lmtp.encode();
        assert_eq!(Preamble::parse(&line[..line.len() - 2]), Ok(lmtp));
    }

    #[test]
    fn values_that_do_not_fit_are_left_out() {
        let p = Preamble {
            helo: Some("two words".into()),
            apop: Some(String::new()),
            ..sample()
        };
        let line = p.encode();
        let parsed = Preamble::parse(&line[..line.len() - 2]).expect("parses");
        assert_eq!(parsed.helo, None);
        assert_eq!(parsed.apop, None);
    }

    #[test]
    fn hostile_lines_fail() {
        let good = String::from_utf8(sample().encode()).expect("utf8");
        let good = good.trim_end();
        let cases: Vec<(String, PreambleError)> = vec![
            (String::new(), PreambleError::Magic),
            ("USER joe".into(), PreambleError::Magic),
            (good.replace("/1", "/2"), PreambleError::Magic),
            (good.replace("hop=1", "hop=2"), PreambleError::Hops(2)),
            (good.replace("hop=1", "hop=0"), PreambleError::Hops(0)),
            (good.replace("hop=1 ", ""), PreambleError::Field("hop")),
            (
                good.replace("tls=1", "tls=yes"),
                PreambleError::Field("tls"),
            ),
            (
                good.replace("listener=pop3s", "listener=imap"),
                PreambleError::Field("listener"),
            ),
            (
                good.replace("client=[2001:db8::7]:50123", "client=nowhere"),
                PreambleError::Field("client"),
            ),
            (
                good.replace("sid=42", "sid=-1"),
                PreambleError::Field("sid"),
            ),
            (
                good.replace("from=", "from"),
                PreambleError::Field("key=value"),
            ),
            (format!("{good} x="), PreambleError::Field("value")),
        ];
        for (line, expected) in cases {
            assert_eq!(Preamble::parse(line.as_bytes()), Err(expected), "{line}");
        }
        assert_eq!(Preamble::parse(&[0xff, 0xfe]), Err(PreambleError::Magic));
        let long = format!("{good} future={}", "x".repeat(MAX_PREAMBLE));
        assert_eq!(
            Preamble::parse(long.as_bytes()),
            Err(PreambleError::Field("length"))
        );
        // Later versions may add keys.
        assert!(Preamble::parse(format!("{good} future=1").as_bytes()).is_ok());
    }
}
