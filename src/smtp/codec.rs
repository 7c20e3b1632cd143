//! SMTP/LMTP command parsing and reply encoding (RFC 5321, 2033, 1870, 6152, 6531,
//! 3463). Pure: std and `bytes` only; no tokio, no store, no tracing. Line framing and
//! DATA's dot-unstuffing are the shared codec pieces in `pop3::codec`.

use crate::wire::POSTMASTER;
use bytes::{BufMut, BytesMut};
use std::borrow::Cow;

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF; we take the
/// text-line limit (§4.5.3.1.6, 1000 octets) so long parameter lists never fail.
pub const MAX_COMMAND_LINE: usize = 1000;
/// RFC 5321 §4.5.3.1.3: a path is at most 256 octets including the angle brackets.
pub const MAX_PATH: usize = 256;
/// Longest HELO/EHLO/LHLO argument (a domain or address literal).
pub const MAX_HELO: usize = 255;
/// Digits in a SIZE= value: enough for any u64.
const MAX_SIZE_DIGITS: usize = 20;

/// A parsed command line. Paths are without their angle brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    Lhlo(String),
    Mail(MailFrom),
    Rcpt(String),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    /// Known verbs we do not offer (AUTH, BDAT, TURN, ...): 502, not 500.
    NotImplemented,
}

/// `MAIL FROM:<path> [params]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailFrom {
    /// The reverse path; empty for the null sender `<>` (bounces).
    pub from: String,
    /// SIZE= (RFC 1870): the client's estimate of the message size.
    pub size: Option<u64>,
    /// BODY=8BITMIME (RFC 6152); BODY=7BIT is the default.
    pub eight_bit: bool,
    /// SMTPUTF8 (RFC 6531): addresses and headers may be UTF-8.
    pub smtputf8: bool,
}

/// Why a line is not a command we can act on; each maps to one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// 500 5.5.2: no such verb.
    Unknown,
    /// 501 5.5.4: arguments where none belong, or missing ones.
    Syntax(&'static str),
    /// 501 5.1.7 / 5.1.3: the path is not `<...>` or too long.
    BadPath(&'static str),
    /// 555 5.5.4: a MAIL/RCPT parameter we do not support.
    Parameter,
    /// 553 5.6.7: a non-ASCII address without SMTPUTF8 (RFC 6531 §3.5).
    NonAscii,
}

impl ParseError {
    pub fn reply(&self, rcpt: bool) -> Reply {
        match self {
            ParseError::Unknown => Reply::new(500, "5.5.2", "Command unrecognized"),
            ParseError::Syntax(text) => Reply::new(501, "5.5.4", *text),
            ParseError::BadPath(text) => {
                Reply::new(501, if rcpt { "5.1.3" } else { "5.1.7" }, *text)
            }
            ParseError::Parameter => Reply::new(555, "5.5.4", "Unsupported parameter"),
            ParseError::NonAscii => Reply::new(
                553,
                "5.6.7",
                "Non-ASCII address needs SMTPUTF8 on MAIL FROM",
            ),
        }
    }
}

/// Parses one command line (without its CRLF). `smtputf8` says whether the current
/// transaction declared SMTPUTF8, which RCPT needs to accept a UTF-8 path.
pub fn parse(line: &[u8], smtputf8: bool) -> Result<Command, ParseError> {
    let line = std::str::from_utf8(line).map_err(|_| {
        // Only SMTPUTF8 paths may carry 8-bit bytes, and those must be UTF-8.
        ParseError::Syntax("Invalid characters in command")
    })?;
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    if verb.len() > 10 || !verb.is_ascii() {
        return Err(ParseError::Unknown);
    }
    // Upper-cased on the stack: no allocation per command.
    let mut buf = [0u8; 10];
    let upper = &mut buf[..verb.len()];
    upper.copy_from_slice(verb.as_bytes());
    upper.make_ascii_uppercase();
    let none = |cmd: Command| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(ParseError::Syntax("Syntax error: no arguments allowed"))
        }
    };
    match &*upper {
        b"HELO" => Ok(Command::Helo(helo_name(rest)?)),
        b"EHLO" => Ok(Command::Ehlo(helo_name(rest)?)),
        b"LHLO" => Ok(Command::Lhlo(helo_name(rest)?)),
        b"MAIL" => parse_mail(rest).map(Command::Mail),
        b"RCPT" => parse_rcpt(rest, smtputf8).map(Command::Rcpt),
        b"DATA" => none(Command::Data),
        b"RSET" => none(Command::Rset),
        b"QUIT" => none(Command::Quit),
        b"STARTTLS" => none(Command::StartTls),
        // NOOP and HELP may carry a string that is ignored (RFC 5321 §4.1.1.9, §4.1.1.8).
        b"NOOP" => Ok(Command::Noop),
        b"HELP" => Ok(Command::Help),
        b"VRFY" if !rest.trim().is_empty() => Ok(Command::Vrfy),
        b"EXPN" if !rest.trim().is_empty() => Ok(Command::Expn),
        b"VRFY" | b"EXPN" => Err(ParseError::Syntax("Syntax error: argument required")),
        b"AUTH" | b"BDAT" | b"TURN" | b"ETRN" | b"ATRN" | b"SEND" | b"SOML" | b"SAML" | b"BURL" => {
            Ok(Command::NotImplemented)
        }
        _ => Err(ParseError::Unknown),
    }
}

fn helo_name(rest: &str) -> Result<String, ParseError> {
    let name = rest.trim();
    if name.is_empty() {
        return Err(ParseError::Syntax("Syntax error: a host name is required"));
    }
    // One token of printable ASCII; it ends up in the Received: header.
    if name.len() > MAX_HELO || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ParseError::Syntax("Syntax error: invalid host name"));
    }
    Ok(name.to_owned())
}

/// Splits `FROM:<path> params` / `TO:<path> params` after the keyword. A space after
/// the colon is tolerated, as most servers do, since some clients send one.
fn path_and_params<'a>(rest: &'a str, keyword: &str) -> Result<(&'a str, &'a str), ParseError> {
    let head = rest.get(..keyword.len()).ok_or(ParseError::Syntax(
        "Syntax error: expected FROM:<address> or TO:<address>",
    ))?;
    if !head.eq_ignore_ascii_case(keyword) {
        return Err(ParseError::Syntax(
            "Syntax error: expected FROM:<address> or TO:<address>",
        ));
    }
    let after = rest[keyword.len()..].trim_start_matches(' ');
    if !after.starts_with('<') {
        return Err(ParseError::BadPath("Address must be in angle brackets"));
    }
    let end = after
        .find('>')
        .ok_or(ParseError::BadPath("Missing closing angle bracket"))?;
    if end + 1 > MAX_PATH {
        return Err(ParseError::BadPath("Address too long"));
    }
    let params = &after[end + 1..];
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(ParseError::BadPath("Garbage after the address"));
    }
    Ok((&after[1..end], params.trim()))
}

/// Drops an RFC 5321 source route (`@a,@b:user@d`), which servers must accept and ignore.
fn strip_route(path: &str) -> Result<&str, ParseError> {
    if !path.starts_with('@') {
        return Ok(path);
    }
    match path.find(':') {
        Some(i) => Ok(&path[i + 1..]),
        None => Err(ParseError::BadPath("Invalid source route")),
    }
}

fn check_mailbox(path: &str, smtputf8: bool) -> Result<(), ParseError> {
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(ParseError::BadPath("Invalid characters in address"));
    }
    if !path.is_ascii() && !smtputf8 {
        return Err(ParseError::NonAscii);
    }
    let Some(at) = path.rfind('@') else {
        return Err(ParseError::BadPath("Address needs a domain"));
    };
    if at == 0 || at + 1 == path.len() {
        return Err(ParseError::BadPath("Invalid address"));
    }
    Ok(())
}

fn parse_mail(rest: &str) -> Result<MailFrom, ParseError> {
    let (path, params) = path_and_params(rest, "FROM:")?;
    let mut mail = MailFrom::default();
    for param in params.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        let is = |name: &str| key.eq_ignore_ascii_case(name);
        match value {
            Some(v) if is("SIZE") => {
                if v.is_empty()
                    || v.len() > MAX_SIZE_DIGITS
                    || !v.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(ParseError::Syntax("Syntax error in SIZE parameter"));
                }
                // More digits than u64 holds: larger than any limit anyway.
                mail.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            Some(v) if is("BODY") && v.eq_ignore_ascii_case("8BITMIME") => mail.eight_bit = true,
            Some(v) if is("BODY") && v.eq_ignore_ascii_case("7BIT") => mail.eight_bit = false,
            None if is("SMTPUTF8") => mail.smtputf8 = true,
            _ => return Err(ParseError::Parameter),
        }
    }
    let path = strip_route(path)?;
    if !path.is_empty() {
        check_mailbox(path, mail.smtputf8)?;
    }
    mail.from = path.to_owned();
    Ok(mail)
}

fn parse_rcpt(rest: &str, smtputf8: bool) -> Result<String, ParseError> {
    let (path, params) = path_and_params(rest, "TO:")?;
    if !params.is_empty() {
        return Err(ParseError::Parameter);
    }
    let path = strip_route(path)?;
    // RFC 5321 §4.5.1: `<Postmaster>` without a domain must be accepted.
    if path.eq_ignore_ascii_case("postmaster") {
        return Ok(POSTMASTER.to_owned());
    }
    check_mailbox(path, smtputf8)?;
    Ok(path.to_owned())
}

/// One reply: a code, an enhanced status code (RFC 3463) and text, possibly over
/// several lines (EHLO). The only way protocol bytes reach the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// `x.y.z`; `None` for the greeting and the EHLO reply, which carry none.
    pub status: Option<&'static str>,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    pub fn new(code: u16, status: &'static str, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: Some(status),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced status code.
    pub fn plain(code: u16, lines: Vec<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: None,
            lines,
        }
    }

    pub fn write_to(&self, out: &mut BytesMut) {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            out.put_slice(self.code.to_string().as_bytes());
            out.put_u8(if i == last { b' ' } else { b'-' });
            if let Some(status) = self.status {
                out.put_slice(status.as_bytes());
                out.put_u8(b' ');
            }
            out.put_slice(line.as_bytes());
            out.put_slice(b"\r\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Result<Command, ParseError> {
        parse(line.as_bytes(), false)
    }

    #[test]
    fn verbs_are_case_insensitive_and_take_their_arguments() {
        assert_eq!(
            p("ehlo client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(
            p("HELO [127.0.0.1]"),
            Ok(Command::Helo("[127.0.0.1]".into()))
        );
        assert_eq!(p("LHLO mx"), Ok(Command::Lhlo("mx".into())));
        assert_eq!(p("DATA"), Ok(Command::Data));
        assert_eq!(p("rset"), Ok(Command::Rset));
        assert_eq!(p("NOOP anything at all"), Ok(Command::Noop));
        assert_eq!(p("QUIT"), Ok(Command::Quit));
        assert_eq!(p("VRFY joe"), Ok(Command::Vrfy));
        assert_eq!(p("StartTLS"), Ok(Command::StartTls));
        assert_eq!(p("AUTH PLAIN AGpvZQBw"), Ok(Command::NotImplemented));
        assert_eq!(p("BDAT 100 LAST"), Ok(Command::NotImplemented));
    }

    #[test]
    fn mail_from_with_parameters() {
        assert_eq!(
            p("MAIL FROM:<a@b.example> SIZE=1234 BODY=8BITMIME"),
            Ok(Command::Mail(MailFrom {
                from: "a@b.example".into(),
                size: Some(1234),
                eight_bit: true,
                smtputf8: false,
            }))
        );
        assert_eq!(
            p("mail from:<>"),
            Ok(Command::Mail(MailFrom::default())),
            "null sender"
        );
        assert_eq!(
            p("MAIL FROM: <a@b>"),
            Ok(Command::Mail(MailFrom {
                from: "a@b".into(),
                ..MailFrom::default()
            })),
            "a space after the colon is tolerated"
        );
        assert_eq!(
            p("MAIL FROM:<@relay.example,@r2.example:a@b>"),
            Ok(Command::Mail(MailFrom {
                from: "a@b".into(),
                ..MailFrom::default()
            })),
            "source routes are ignored"
        );
        let utf8 = parse("MAIL FROM:<jöe@b.example> SMTPUTF8".as_bytes(), false);
        assert_eq!(
            utf8,
            Ok(Command::Mail(MailFrom {
                from: "jöe@b.example".into(),
                smtputf8: true,
                ..MailFrom::default()
            }))
        );
        assert_eq!(
            p("MAIL FROM:<a@b> SIZE=99999999999999999999"),
            Ok(Command::Mail(MailFrom {
                from: "a@b".into(),
                size: Some(u64::MAX),
                ..MailFrom::default()
            }))
        );
    }

    #[test]
    fn rcpt_to() {
        assert_eq!(
            p("RCPT TO:<Joe@Example.org>"),
            Ok(Command::Rcpt("Joe@Example.org".into()))
        );
        assert_eq!(
            parse("RCPT TO:<jöe@example.org>".as_bytes(), true),
            Ok(Command::Rcpt("jöe@example.org".into()))
        );
        assert_eq!(
            p("RCPT TO:<PostMaster>"),
            Ok(Command::Rcpt("postmaster".into()))
        );
    }

    #[test]
    fn lines_that_must_fail() {
        let cases: &[(&str, ParseError)] = &[
            ("", ParseError::Unknown),
            ("FOO", ParseError::Unknown),
            ("EXTRAORDINARILYLONGVERB x", ParseError::Unknown),
            (
                "EHLO",
                ParseError::Syntax("Syntax error: a host name is required"),
            ),
            (
                "EHLO two\tparts",
                ParseError::Syntax("Syntax error: invalid host name"),
            ),
            (
                "DATA now",
                ParseError::Syntax("Syntax error: no arguments allowed"),
            ),
            (
                "QUIT please",
                ParseError::Syntax("Syntax error: no arguments allowed"),
            ),
            (
                "VRFY",
                ParseError::Syntax("Syntax error: argument required"),
            ),
            (
                "MAIL TO:<a@b>",
                ParseError::Syntax("Syntax error: expected FROM:<address> or TO:<address>"),
            ),
            (
                "MAIL",
                ParseError::Syntax("Syntax error: expected FROM:<address> or TO:<address>"),
            ),
            (
                "MAIL FROM:a@b",
                ParseError::BadPath("Address must be in angle brackets"),
            ),
            (
                "MAIL FROM:<a@b",
                ParseError::BadPath("Missing closing angle bracket"),
            ),
            (
                "MAIL FROM:<a@b>x",
                ParseError::BadPath("Garbage after the address"),
            ),
            (
                "MAIL FROM:<ab>",
                ParseError::BadPath("Address needs a domain"),
            ),
            (
                "MAIL FROM:<a b@c>",
                ParseError::BadPath("Invalid characters in address"),
            ),
            (
                "MAIL FROM:<@a>",
                ParseError::BadPath("Invalid source route"),
            ),
            (
                "MAIL FROM:<a@b> SIZE=",
                ParseError::Syntax("Syntax error in SIZE parameter"),
            ),
            (
                "MAIL FROM:<a@b> SIZE=12k",
                ParseError::Syntax("Syntax error in SIZE parameter"),
            ),
            ("MAIL FROM:<a@b> BODY=BINARYMIME", ParseError::Parameter),
            ("MAIL FROM:<a@b> RET=HDRS", ParseError::Parameter),
            ("MAIL FROM:<a@b> SMTPUTF8=yes", ParseError::Parameter),
            ("MAIL FROM:<jöe@b>", ParseError::NonAscii),
            ("RCPT TO:<jöe@example.org>", ParseError::NonAscii),
            ("RCPT TO:<a@b> NOTIFY=NEVER", ParseError::Parameter),
            ("RCPT TO:<a@>", ParseError::BadPath("Invalid address")),
            ("RCPT TO:<>", ParseError::BadPath("Address needs a domain")),
            (
                "RCPT FROM:<a@b>",
                ParseError::Syntax("Syntax error: expected FROM:<address> or TO:<address>"),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(p(line).as_ref(), Err(want), "{line:?}");
        }
        let long = format!("RCPT TO:<{}@example.org>", "a".repeat(300));
        assert_eq!(p(&long), Err(ParseError::BadPath("Address too long")));
        assert!(parse(b"HELO \xff\xfe", false).is_err());
        assert!(parse(b"RCPT TO:<a\0b@c>", false).is_err());
        // An SMTP-smuggling CR inside a path is rejected, never passed on.
        assert!(parse(b"MAIL FROM:<a\rb@c>", false).is_err());
    }

    /// A pipelined transcript framed by `LineReader` and parsed gives the same commands
    /// whatever the read sizes, and an overlong line is one error, not a buffer.
    #[test]
    fn transcript_in_every_chunk_size() {
        use crate::wire::LineReader;
        let mut input =
            b"EHLO c\r\nMAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<j@example.org>\nDATA\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 3 * MAX_COMMAND_LINE));
        input.extend_from_slice(b"\r\nQUIT\r\n");
        let want = vec![
            Ok(Command::Ehlo("c".into())),
            Ok(Command::Mail(MailFrom {
                from: "a@b".into(),
                size: Some(10),
                ..MailFrom::default()
            })),
            Ok(Command::Rcpt("j@example.org".into())),
            Ok(Command::Data),
            Err(()),
            Ok(Command::Quit),
        ];
        for chunk in 1..=512 {
            let mut reader = LineReader::new();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in input.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(line) = reader.next_line(&mut buf, MAX_COMMAND_LINE) {
                    got.push(
                        line.map_err(drop)
                            .and_then(|l| parse(&l, false).map_err(drop)),
                    );
                }
                assert!(buf.len() < MAX_COMMAND_LINE, "chunk {chunk}");
            }
            assert_eq!(got, want, "chunk {chunk}");
        }
    }

    #[test]
    fn replies_encode_single_and_multi_line() {
        let mut out = BytesMut::new();
        Reply::new(250, "2.1.0", "OK").write_to(&mut out);
        Reply::plain(
            250,
            vec!["mx.example".into(), "PIPELINING".into(), "SIZE 100".into()],
        )
        .write_to(&mut out);
        assert_eq!(
            &out[..],
            b"250 2.1.0 OK\r\n250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n"
        );
    }
}
