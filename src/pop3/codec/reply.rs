//! POP3 replies as values. `Reply::write_to` is the only place POP3 reply bytes are made.
//! Pure: it appends to a `BytesMut` and never allocates per line.

use crate::wire::Uidls;
use bytes::{BufMut, BytesMut};
use std::borrow::Cow;

/// RFC 2449 / 3206 extended response codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespCode {
    InUse,
    Auth,
    SysTemp,
    SysPerm,
    LoginDelay,
}

impl RespCode {
    /// The code as it appears between the brackets.
    pub fn as_str(self) -> &'static str {
        match self {
            RespCode::InUse => "IN-USE",
            RespCode::Auth => "AUTH",
            RespCode::SysTemp => "SYS/TEMP",
            RespCode::SysPerm => "SYS/PERM",
            RespCode::LoginDelay => "LOGIN-DELAY",
        }
    }
}

/// One message of a session's snapshot, as listings need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgEntry {
    /// Exact octets RETR sends before dot-stuffing.
    pub octets: u64,
    /// Store id: the message's key in the account's `Uidls`.
    pub id: u64,
    pub deleted: bool,
}

/// What CAPA announces for the connection's current state.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities<'a> {
    pub user: bool,
    pub stls: bool,
    pub sasl: &'a [&'a str],
    pub implementation: &'a str,
}

/// A reply. Free text (`Ok`, `Err`, host names, capability names) is written with
/// control characters turned into spaces, so a value that came from a client can never
/// end the reply line early or inject another one.
#[derive(Debug)]
pub enum Reply<'a> {
    Ok(Cow<'a, str>),
    Err(Option<RespCode>, Cow<'a, str>),
    /// `apop_timestamp` includes its angle brackets, e.g. `<1234.5678@host>`.
    Greeting {
        hostname: &'a str,
        apop_timestamp: Option<&'a str>,
    },
    /// Raw SASL challenge bytes; `write_to` base64-encodes them (RFC 5034 §4).
    Challenge(&'a [u8]),
    Capa(Capabilities<'a>),
    /// The answer to `AUTH` alone: the SASL mechanisms, one per line.
    Mechanisms(&'a [&'a str]),
    Stat {
        count: usize,
        octets: u64,
    },
    Scan {
        msg: u32,
        octets: u64,
    },
    /// Entry `i` of the slice is message number `i + 1`; deleted entries are skipped.
    ScanListing(&'a [MsgEntry]),
    Unique {
        msg: u32,
        uidls: &'a Uidls,
        id: u64,
    },
    UniqueListing {
        uidls: &'a Uidls,
        msgs: &'a [MsgEntry],
    },
    /// The status line of RETR/TOP; the body follows through `BodyEncoder`.
    MessageFollows {
        octets: u64,
    },
}

/// Writes message `id`'s UIDL: its stored one, else the one computed from the nonce
/// (`wire::uidl`). Stored UIDLs are RFC 1939 tokens (printable, no space), checked when
/// they were stored and again when read.
fn write_uid(out: &mut BytesMut, uidls: &Uidls, id: u64) {
    // invariant: writing into a BytesMut cannot fail.
    let _ = uidls.write(out, id);
}

impl Reply<'_> {
    pub fn write_to(&self, out: &mut BytesMut) {
        match self {
            Reply::Ok(text) => {
                out.extend_from_slice(b"+OK");
                if !text.is_empty() {
                    out.put_u8(b' ');
                    put_text(out, text);
                }
                put_crlf(out);
            }
            Reply::Err(code, text) => {
                out.extend_from_slice(b"-ERR");
                if let Some(code) = code {
                    out.extend_from_slice(b" [");
                    out.extend_from_slice(code.as_str().as_bytes());
                    out.put_u8(b']');
                }
                if !text.is_empty() {
                    out.put_u8(b' ');
                    put_text(out, text);
                }
                put_crlf(out);
            }
            Reply::Greeting {
                hostname,
                apop_timestamp,
            } => {
                out.extend_from_slice(b"+OK ");
                put_text(out, hostname);
                out.extend_from_slice(b" POP3 ready");
                if let Some(ts) = apop_timestamp {
                    out.put_u8(b' ');
                    put_text(out, ts);
                }
                put_crlf(out);
            }
            Reply::Challenge(data) => {
                out.extend_from_slice(b"+ ");
                put_base64(out, data);
                put_crlf(out);
            }
            Reply::Capa(caps) => write_capa(out, caps),
            Reply::Mechanisms(mechanisms) => {
                out.extend_from_slice(b"+OK\r\n");
                for mechanism in *mechanisms {
                    put_text(out, mechanism);
                    put_crlf(out);
                }
                out.extend_from_slice(b".\r\n");
            }
            Reply::Stat { count, octets } => {
                out.extend_from_slice(b"+OK ");
                put_u64(out, *count as u64);
                out.put_u8(b' ');
                put_u64(out, *octets);
                put_crlf(out);
            }
            Reply::Scan { msg, octets } => {
                out.extend_from_slice(b"+OK ");
                put_u64(out, u64::from(*msg));
                out.put_u8(b' ');
                put_u64(out, *octets);
                put_crlf(out);
            }
            Reply::ScanListing(_) | Reply::UniqueListing { .. } => {
                if let Some(mut listing) = self.listing() {
                    listing.write_to(out, usize::MAX);
                }
            }
            Reply::Unique { msg, uidls, id } => {
                out.extend_from_slice(b"+OK ");
                put_u64(out, u64::from(*msg));
                out.put_u8(b' ');
                write_uid(out, uidls, *id);
                put_crlf(out);
            }
            Reply::MessageFollows { octets } => {
                out.extend_from_slice(b"+OK ");
                put_u64(out, *octets);
                out.extend_from_slice(b" octets\r\n");
            }
        }
    }
}

impl<'a> Reply<'a> {
    /// The writer of a multi-line listing (LIST or UIDL without an argument), which can
    /// write it in pieces; `None` for every other reply.
    pub fn listing(&self) -> Option<ListingWriter<'a>> {
        let (msgs, uidls) = match *self {
            Reply::ScanListing(msgs) => (msgs, None),
            Reply::UniqueListing { uidls, msgs } => (msgs, Some(uidls)),
            _ => return None,
        };
        Some(ListingWriter {
            msgs,
            uidls,
            next: 0,
            head_written: false,
            finished: false,
        })
    }
}

/// A LIST or UIDL listing written in pieces, so that a large maildrop's listing never
/// sits in memory whole: each `write_to` appends lines until the buffer holds `limit`
/// octets, and the caller sends them before asking for more.
#[derive(Debug)]
pub struct ListingWriter<'a> {
    msgs: &'a [MsgEntry],
    /// UIDL's account UIDLs; `None` for LIST.
    uidls: Option<&'a Uidls>,
    /// Index of the next entry to consider.
    next: usize,
    head_written: bool,
    finished: bool,
}

impl ListingWriter<'_> {
    /// Appends the status line (first call) and then lines until `out` holds at least
    /// `limit` octets or the listing is complete (terminator written): true when it is.
    /// Each call makes progress, so `out` ends at most one line past `limit`.
    pub fn write_to(&mut self, out: &mut BytesMut, limit: usize) -> bool {
        if self.finished {
            return true;
        }
        if !self.head_written {
            self.head_written = true;
            self.write_head(out);
        }
        while let Some(entry) = self.msgs.get(self.next) {
            if out.len() >= limit {
                return false;
            }
            self.next += 1;
            if entry.deleted {
                continue;
            }
            put_u64(out, self.next as u64);
            out.put_u8(b' ');
            match self.uidls {
                Some(uidls) => write_uid(out, uidls, entry.id),
                None => put_u64(out, entry.octets),
            }
            put_crlf(out);
        }
        out.extend_from_slice(b".\r\n");
        self.finished = true;
        true
    }

    fn write_head(&self, out: &mut BytesMut) {
        if self.uidls.is_some() {
            out.extend_from_slice(b"+OK\r\n");
            return;
        }
        let (count, octets) = self
            .msgs
            .iter()
            .filter(|m| !m.deleted)
            .fold((0u64, 0u64), |(n, sum), m| {
                (n + 1, sum.saturating_add(m.octets))
            });
        out.extend_from_slice(b"+OK ");
        put_u64(out, count);
        out.extend_from_slice(b" messages (");
        put_u64(out, octets);
        out.extend_from_slice(b" octets)\r\n");
    }
}

fn write_capa(out: &mut BytesMut, caps: &Capabilities<'_>) {
    out.extend_from_slice(
        b"+OK Capability list follows\r\n\
          TOP\r\n\
          UIDL\r\n\
          RESP-CODES\r\n\
          AUTH-RESP-CODE\r\n\
          PIPELINING\r\n",
    );
    if caps.user {
        out.extend_from_slice(b"USER\r\n");
    }
    if !caps.sasl.is_empty() {
        out.extend_from_slice(b"SASL");
        for mechanism in caps.sasl {
            out.put_u8(b' ');
            put_text(out, mechanism);
        }
        put_crlf(out);
    }
    if caps.stls {
        out.extend_from_slice(b"STLS\r\n");
    }
    if !caps.implementation.is_empty() {
        out.extend_from_slice(b"IMPLEMENTATION ");
        put_text(out, caps.implementation);
        put_crlf(out);
    }
    out.extend_from_slice(b".\r\n");
}

fn put_crlf(out: &mut BytesMut) {
    out.extend_from_slice(b"\r\n");
}

/// Appends `text`, replacing control characters (CR, LF, NUL, ...) with spaces.
fn put_text(out: &mut BytesMut, text: &str) {
    let start = out.len();
    out.extend_from_slice(text.as_bytes());
    for b in &mut out[start..] {
        if b.is_ascii_control() {
            *b = b' ';
        }
    }
}

/// Decimal without going through `String`: digits are produced backwards into a stack
/// buffer large enough for `u64::MAX`.
fn put_u64(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// RFC 4648 §4 base64 with padding.
fn put_base64(out: &mut BytesMut, data: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    out.reserve(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let b0 = group[0];
        let b1 = group.get(1).copied().unwrap_or(0);
        let b2 = group.get(2).copied().unwrap_or(0);
        let bits = u32::from(b0) << 16 | u32::from(b1) << 8 | u32::from(b2);
        let sextet = |n: u32| ALPHABET[((bits >> (18 - 6 * n)) & 0x3f) as usize];
        out.put_u8(sextet(0));
        out.put_u8(sextet(1));
        out.put_u8(if group.len() > 1 { sextet(2) } else { b'=' });
        out.put_u8(if group.len() > 2 { sextet(3) } else { b'=' });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(reply: &Reply<'_>) -> Vec<u8> {
        let mut out = BytesMut::new();
        reply.write_to(&mut out);
        out.to_vec()
    }

    fn bytes(reply: Reply<'_>) -> String {
        let mut out = BytesMut::new();
        reply.write_to(&mut out);
        String::from_utf8(out.to_vec()).expect("replies are UTF-8 in these tests")
    }

    fn entry(octets: u64, id: u64, deleted: bool) -> MsgEntry {
        MsgEntry {
            octets,
            id,
            deleted,
        }
    }

    #[test]
    fn single_line_replies() {
        let computed = Uidls::new(0xdead_beef, Vec::new());
        let cases: Vec<(Reply<'_>, &str)> = vec![
            (
                Reply::Ok("maildrop locked".into()),
                "+OK maildrop locked\r\n",
            ),
            (Reply::Ok("".into()), "+OK\r\n"),
            (Reply::Ok(String::from("owned").into()), "+OK owned\r\n"),
            (
                Reply::Err(None, "no such message".into()),
                "-ERR no such message\r\n",
            ),
            (Reply::Err(None, "".into()), "-ERR\r\n"),
            (
                Reply::Err(Some(RespCode::InUse), "maildrop busy".into()),
                "-ERR [IN-USE] maildrop busy\r\n",
            ),
            (
                Reply::Err(Some(RespCode::Auth), "nope".into()),
                "-ERR [AUTH] nope\r\n",
            ),
            (
                Reply::Err(Some(RespCode::SysTemp), "later".into()),
                "-ERR [SYS/TEMP] later\r\n",
            ),
            (
                Reply::Err(Some(RespCode::SysPerm), "never".into()),
                "-ERR [SYS/PERM] never\r\n",
            ),
            (
                Reply::Err(Some(RespCode::LoginDelay), "wait".into()),
                "-ERR [LOGIN-DELAY] wait\r\n",
            ),
            (
                Reply::Err(Some(RespCode::Auth), "".into()),
                "-ERR [AUTH]\r\n",
            ),
            (
                Reply::Greeting {
                    hostname: "mail.example.com",
                    apop_timestamp: None,
                },
                "+OK mail.example.com POP3 ready\r\n",
            ),
            (
                Reply::Greeting {
                    hostname: "mail.example.com",
                    apop_timestamp: Some("<1896.697170952@dbc.mtview.ca.us>"),
                },
                "+OK mail.example.com POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n",
            ),
            (Reply::Challenge(b""), "+ \r\n"),
            (
                Reply::Challenge(b"r=abc,s=QSXCR+Q6sek8bf92,i=4096"),
                "+ cj1hYmMscz1RU1hDUitRNnNlazhiZjkyLGk9NDA5Ng==\r\n",
            ),
            (
                Reply::Stat {
                    count: 2,
                    octets: 320,
                },
                "+OK 2 320\r\n",
            ),
            (
                Reply::Stat {
                    count: 0,
                    octets: 0,
                },
                "+OK 0 0\r\n",
            ),
            (
                Reply::Scan {
                    msg: 2,
                    octets: 200,
                },
                "+OK 2 200\r\n",
            ),
            (
                Reply::Unique {
                    msg: 1,
                    uidls: &computed,
                    id: 42,
                },
                "+OK 1 deadbeef000000000000002a\r\n",
            ),
            (
                Reply::MessageFollows { octets: 1205 },
                "+OK 1205 octets\r\n",
            ),
        ];
        for (reply, want) in cases {
            let shown = format!("{reply:?}");
            assert_eq!(bytes(reply), want, "{shown}");
        }
    }

    #[test]
    fn largest_numbers() {
        assert_eq!(
            bytes(Reply::Stat {
                count: usize::MAX,
                octets: u64::MAX
            }),
            format!("+OK {} {}\r\n", usize::MAX, u64::MAX)
        );
        assert_eq!(
            bytes(Reply::Scan {
                msg: u32::MAX,
                octets: u64::MAX
            }),
            format!("+OK {} {}\r\n", u32::MAX, u64::MAX)
        );
    }

    #[test]
    fn text_cannot_inject_lines() {
        assert_eq!(
            bytes(Reply::Ok("a\r\n+OK evil\n\0x".into())),
            "+OK a  +OK evil  x\r\n"
        );
        assert_eq!(
            bytes(Reply::Err(None, "bad\r\n.".into())),
            "-ERR bad  .\r\n"
        );
        assert_eq!(
            bytes(Reply::Greeting {
                hostname: "h\r\nx",
                apop_timestamp: Some("<1@h>\n")
            }),
            "+OK h  x POP3 ready <1@h> \r\n"
        );
        // Non-ASCII UTF-8 is left alone.
        assert_eq!(bytes(Reply::Ok("grüß".into())), "+OK grüß\r\n");
    }

    #[test]
    fn mechanisms() {
        assert_eq!(
            bytes(Reply::Mechanisms(&["PLAIN", "SCRAM-SHA-256"])),
            "+OK\r\nPLAIN\r\nSCRAM-SHA-256\r\n.\r\n"
        );
        assert_eq!(bytes(Reply::Mechanisms(&[])), "+OK\r\n.\r\n");
    }

    #[test]
    fn capa() {
        let full = Capabilities {
            user: true,
            stls: true,
            sasl: &["PLAIN", "SCRAM-SHA-256"],
            implementation: "mailgate",
        };
        assert_eq!(
            bytes(Reply::Capa(full)),
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n\
             PIPELINING\r\nUSER\r\nSASL PLAIN SCRAM-SHA-256\r\nSTLS\r\n\
             IMPLEMENTATION mailgate\r\n.\r\n"
        );
        let bare = Capabilities {
            user: false,
            stls: false,
            sasl: &[],
            implementation: "mg 1",
        };
        assert_eq!(
            bytes(Reply::Capa(bare)),
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n\
             PIPELINING\r\nIMPLEMENTATION mg 1\r\n.\r\n"
        );
        let nameless = Capabilities {
            user: false,
            stls: true,
            sasl: &["PLAIN"],
            implementation: "",
        };
        assert_eq!(
            bytes(Reply::Capa(nameless)),
            "+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n\
             PIPELINING\r\nSASL PLAIN\r\nSTLS\r\n.\r\n"
        );
    }

    #[test]
    fn scan_listing_skips_deleted_and_keeps_numbers() {
        let msgs = [
            entry(120, 1, false),
            entry(999, 2, true),
            entry(200, 3, false),
        ];
        assert_eq!(
            bytes(Reply::ScanListing(&msgs)),
            "+OK 2 messages (320 octets)\r\n1 120\r\n3 200\r\n.\r\n"
        );
        assert_eq!(
            bytes(Reply::ScanListing(&[])),
            "+OK 0 messages (0 octets)\r\n.\r\n"
        );
        let all_deleted = [entry(5, 1, true)];
        assert_eq!(
            bytes(Reply::ScanListing(&all_deleted)),
            "+OK 0 messages (0 octets)\r\n.\r\n"
        );
        let huge = [entry(u64::MAX, 1, false), entry(1, 2, false)];
        assert_eq!(
            bytes(Reply::ScanListing(&huge)),
            format!(
                "+OK 2 messages ({0} octets)\r\n1 {0}\r\n2 1\r\n.\r\n",
                u64::MAX
            )
        );
    }

    #[test]
    fn unique_listing() {
        let msgs = [
            entry(1, 7, false),
            entry(1, 8, true),
            entry(1, u64::MAX, false),
        ];
        let computed = Uidls::new(1, Vec::new());
        assert_eq!(
            bytes(Reply::UniqueListing {
                uidls: &computed,
                msgs: &msgs
            }),
            "+OK\r\n1 000000010000000000000007\r\n3 00000001ffffffffffffffff\r\n.\r\n"
        );
        assert_eq!(
            bytes(Reply::UniqueListing {
                uidls: &computed,
                msgs: &[]
            }),
            "+OK\r\n.\r\n"
        );
        // Stored UIDLs (imported mail) where present, computed ones for the rest.
        let stored = Uidls::new(1, vec![(u64::MAX, "0000000A507c2d5c".into())]);
        assert_eq!(
            bytes(Reply::UniqueListing {
                uidls: &stored,
                msgs: &msgs
            }),
            "+OK\r\n1 000000010000000000000007\r\n3 0000000A507c2d5c\r\n.\r\n"
        );
        assert_eq!(
            bytes(Reply::Unique {
                msg: 3,
                uidls: &stored,
                id: u64::MAX
            }),
            "+OK 3 0000000A507c2d5c\r\n"
        );
    }

    /// A listing written in pieces of every size is the listing written whole, and no
    /// piece holds more than `limit` plus one line.
    #[test]
    fn listings_in_pieces_match_the_whole() {
        let msgs: Vec<MsgEntry> = (0..300u64)
            .map(|i| entry(i * 977, i.wrapping_mul(0x9e37_79b9), i % 7 == 3))
            .collect();
        let computed = Uidls::new(0xdead_beef, Vec::new());
        let longest = "~".repeat(crate::wire::uidl::MAX_LEN);
        let stored = Uidls::new(
            1,
            msgs.iter()
                .step_by(2)
                .map(|m| (m.id, longest.as_str().into()))
                .collect(),
        );
        let replies = [
            Reply::ScanListing(&msgs),
            Reply::UniqueListing {
                uidls: &computed,
                msgs: &msgs,
            },
            Reply::ScanListing(&[]),
            Reply::UniqueListing {
                uidls: &computed,
                msgs: &msgs[3..4],
            },
            Reply::UniqueListing {
                uidls: &stored,
                msgs: &msgs,
            },
        ];
        // Longest line: "300 " and a 70-character stored UIDL, or a 20-digit size, and CRLF.
        const LONGEST_LINE: usize = 4 + crate::wire::uidl::MAX_LEN + 2;
        for reply in &replies {
            let whole = bytes_of(reply);
            for limit in (1..=600).chain([4096, usize::MAX]) {
                let mut writer = reply.listing().expect("a listing");
                let mut sent = Vec::new();
                let mut out = BytesMut::new();
                loop {
                    let done = writer.write_to(&mut out, limit);
                    if limit < usize::MAX {
                        assert!(out.len() < limit + LONGEST_LINE + 40, "{limit}");
                    }
                    sent.extend_from_slice(&out);
                    out.clear();
                    if done {
                        break;
                    }
                }
                assert_eq!(sent, whole, "limit {limit}");
                assert!(writer.write_to(&mut out, limit) && out.is_empty());
            }
        }
        assert!(Reply::Ok("".into()).listing().is_none());
    }

    #[test]
    fn uid_format() {
        let cases = [
            (0, 0, "000000000000000000000000"),
            (
                0xdead_beef,
                0x0123_4567_89ab_cdef,
                "deadbeef0123456789abcdef",
            ),
            (u32::MAX, u64::MAX, "ffffffffffffffffffffffff"),
            (1, 16, "000000010000000000000010"),
        ];
        for (nonce, id, want) in cases {
            assert_eq!(crate::wire::uidl(nonce, id), want);
            let mut out = BytesMut::new();
            write_uid(&mut out, &Uidls::new(nonce, Vec::new()), id);
            assert_eq!(&out[..], want.as_bytes());
        }
    }

    #[test]
    fn base64_rfc4648_vectors() {
        let cases: [(&[u8], &str); 8] = [
            (b"", ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
            (b"\x00\xff\xfe\x3e\x3f", "AP/+Pj8="),
        ];
        for (input, want) in cases {
            let mut out = BytesMut::new();
            put_base64(&mut out, input);
            assert_eq!(&out[..], want.as_bytes(), "{input:?}");
        }
    }

    #[test]
    fn numbers() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            12345,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = BytesMut::new();
            put_u64(&mut out, n);
            assert_eq!(&out[..], n.to_string().as_bytes());
        }
    }

    #[test]
    fn appends_to_existing_output() {
        let mut out = BytesMut::from(&b"+OK 1 octets\r\n"[..]);
        Reply::Ok("done".into()).write_to(&mut out);
        assert_eq!(&out[..], b"+OK 1 octets\r\n+OK done\r\n");
    }

    proptest::proptest! {
        #[test]
        fn text_replies_are_one_line(text in ".*") {
            let out = bytes(Reply::Err(Some(RespCode::Auth), text.as_str().into()));
            proptest::prop_assert!(out.ends_with("\r\n"));
            let body = &out[..out.len() - 2];
            proptest::prop_assert!(!body.contains('\r') && !body.contains('\n'));
        }

        #[test]
        fn base64_agrees_with_the_base64_crate(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..100)
        ) {
            use base64::Engine as _;
            let mut out = BytesMut::new();
            put_base64(&mut out, &data);
            let want = base64::engine::general_purpose::STANDARD.encode(&data);
            proptest::prop_assert_eq!(&out[..], want.as_bytes());
        }
    }
}
