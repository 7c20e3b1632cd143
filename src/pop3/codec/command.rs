//! POP3 command parsing (RFC 1939, 2449, 2595, 5034): one line in, one `Command` out.
//! Pure: it checks syntax only; which command is allowed when is the session's business.

/// RFC 2449 §4: a command line is at most 255 octets including the CRLF.
pub const MAX_COMMAND_LINE: usize = 255;
/// A SASL continuation line (RFC 5034); longer than a command because it carries base64.
pub const MAX_SASL_LINE: usize = 4096;
/// Longest user name accepted by USER and APOP, in octets.
pub const MAX_USER_LEN: usize = 255;
/// RFC 4422 §3.1: a SASL mechanism name is 1 to 20 characters.
pub const MAX_MECHANISM_LEN: usize = 20;
/// RFC 1939 §7: the APOP digest is an MD5 digest in 32 hexadecimal digits.
pub const APOP_DIGEST_LEN: usize = 32;

/// A parsed command. Arguments are validated here (numbers, lengths); state rules are
/// the session's business. `Debug` redacts secrets.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    User(String),
    /// The rest of the line after `PASS ` (spaces belong to the password).
    Pass(String),
    /// `digest` is normalised to lower-case hex.
    Apop {
        user: String,
        digest: String,
    },
    /// `mechanism` is upper-cased. `initial` is the base64 initial response as sent;
    /// RFC 5034's `=` (an empty initial response) becomes `Some("")`.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
    /// `AUTH` alone: list the SASL mechanisms (not in RFC 5034, but Outlook sends it and
    /// other servers answer it).
    AuthList,
    Capa,
    Stls,
    Quit,
    Stat,
    List(Option<u32>),
    Retr(u32),
    Dele(u32),
    Noop,
    Rset,
    Top {
        msg: u32,
        lines: u32,
    },
    Uidl(Option<u32>),
    Last,
}

/// Why a line is not a command. `Display` is short enough to follow `-ERR `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    Unknown,
    Syntax(&'static str),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Empty => f.write_str("empty command"),
            ParseError::Unknown => f.write_str("unknown command"),
            ParseError::Syntax(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for ParseError {}

const NO_ARGUMENTS: ParseError = ParseError::Syntax("no arguments expected");
const MISSING_ARGUMENT: ParseError = ParseError::Syntax("missing argument");
const TOO_MANY_ARGUMENTS: ParseError = ParseError::Syntax("too many arguments");

impl Command {
    pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Err(ParseError::Empty);
        }
        let line = std::str::from_utf8(line).map_err(|_| ParseError::Syntax("invalid UTF-8"))?;
        // RFC 1939 §3: the keyword is separated from its arguments by a single space.
        let (verb, rest) = match line.split_once(' ') {
            Some((verb, rest)) => (verb, Some(rest)),
            None => (line, None),
        };
        // Every keyword is 3 or 4 characters; anything longer is unknown without copying.
        let mut upper = [0u8; 4];
        let keyword = upper.get_mut(..verb.len()).ok_or(ParseError::Unknown)?;
        keyword.copy_from_slice(verb.as_bytes());
        keyword.make_ascii_uppercase();
        let args = Args(rest);
        let cmd = match &*keyword {
            b"USER" => Command::User(args.one(user_name)?),
            b"PASS" => match rest {
                Some(password) if !password.is_empty() => Command::Pass(password.to_owned()),
                _ => return Err(ParseError::Syntax("missing password")),
            },
            b"APOP" => {
                let (user, digest) = args.two(user_name, apop_digest)?;
                Command::Apop { user, digest }
            }
            b"AUTH" if rest.is_none_or(|r| r.trim().is_empty()) => Command::AuthList,
            b"AUTH" => {
                let (mechanism, initial) = args.one_and_maybe(mechanism, initial_response)?;
                Command::Auth { mechanism, initial }
            }
            b"CAPA" => args.none(Command::Capa)?,
            b"STLS" => args.none(Command::Stls)?,
            b"QUIT" => args.none(Command::Quit)?,
            b"STAT" => args.none(Command::Stat)?,
            b"LIST" => Command::List(args.maybe(number)?),
            b"RETR" => Command::Retr(args.one(number)?),
            b"DELE" => Command::Dele(args.one(number)?),
            b"NOOP" => args.none(Command::Noop)?,
            b"RSET" => args.none(Command::Rset)?,
            b"TOP" => {
                let (msg, lines) = args.two(number, number)?;
                Command::Top { msg, lines }
            }
            b"UIDL" => Command::Uidl(args.maybe(number)?),
            b"LAST" => args.none(Command::Last)?,
            _ => return Err(ParseError::Unknown),
        };
        Ok(cmd)
    }

    /// The verb in upper case, for metrics and logs.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::User(_) => "USER",
            Command::Pass(_) => "PASS",
            Command::Apop { .. } => "APOP",
            Command::Auth { .. } | Command::AuthList => "AUTH",
            Command::Capa => "CAPA",
            Command::Stls => "STLS",
            Command::Quit => "QUIT",
            Command::Stat => "STAT",
            Command::List(_) => "LIST",
            Command::Retr(_) => "RETR",
            Command::Dele(_) => "DELE",
            Command::Noop => "NOOP",
            Command::Rset => "RSET",
            Command::Top { .. } => "TOP",
            Command::Uidl(_) => "UIDL",
            Command::Last => "LAST",
        }
    }
}

/// Every keyword `Command::parse` knows, upper-case: the bounded set of verbs that
/// metrics may use as a label.
pub const VERBS: &[&str] = &[
    "USER", "PASS", "APOP", "AUTH", "CAPA", "STLS", "QUIT", "STAT", "LIST", "RETR", "DELE", "NOOP",
    "RSET", "TOP", "UIDL", "LAST",
];

/// The known keyword a line starts with, even when its arguments do not parse, so a
/// malformed command is still counted under its verb; `None` for anything else.
pub fn verb_of(line: &[u8]) -> Option<&'static str> {
    let word = line.trim_ascii_end().split(|&b| b == b' ').next()?;
    VERBS
        .iter()
        .copied()
        .find(|v| v.as_bytes().eq_ignore_ascii_case(word))
}

/// The arguments after the keyword. Words are split on spaces, and runs of spaces are
/// tolerated between them, because some clients pad numeric arguments.
struct Args<'a>(Option<&'a str>);

impl<'a> Args<'a> {
    fn words(&self) -> impl Iterator<Item = &'a str> {
        self.0.unwrap_or("").split(' ').filter(|w| !w.is_empty())
    }

    fn none(&self, cmd: Command) -> Result<Command, ParseError> {
        match self.words().next() {
            None => Ok(cmd),
            Some(_) => Err(NO_ARGUMENTS),
        }
    }

    fn maybe<T>(&self, arg: fn(&str) -> Result<T, ParseError>) -> Result<Option<T>, ParseError> {
        let mut words = self.words();
        let first = words.next().map(arg).transpose()?;
        match words.next() {
            None => Ok(first),
            Some(_) => Err(TOO_MANY_ARGUMENTS),
        }
    }

    fn one<T>(&self, arg: fn(&str) -> Result<T, ParseError>) -> Result<T, ParseError> {
        self.maybe(arg)?.ok_or(MISSING_ARGUMENT)
    }

    fn one_and_maybe<T, U>(
        &self,
        first: fn(&str) -> Result<T, ParseError>,
        second: fn(&str) -> Result<U, ParseError>,
    ) -> Result<(T, Option<U>), ParseError> {
        let mut words = self.words();
        let a = first(words.next().ok_or(MISSING_ARGUMENT)?)?;
        let b = words.next().map(second).transpose()?;
        match words.next() {
            None => Ok((a, b)),
            Some(_) => Err(TOO_MANY_ARGUMENTS),
        }
    }

    fn two<T, U>(
        &self,
        first: fn(&str) -> Result<T, ParseError>,
        second: fn(&str) -> Result<U, ParseError>,
    ) -> Result<(T, U), ParseError> {
        let (a, b) = self.one_and_maybe(first, second)?;
        Ok((a, b.ok_or(MISSING_ARGUMENT)?))
    }
}

/// A message number or line count: ASCII digits only (no sign), within `u32`.
fn number(word: &str) -> Result<u32, ParseError> {
    if !word.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::Syntax("invalid number"));
    }
    // Only digits remain, so the one way to fail is overflow.
    word.parse()
        .map_err(|_| ParseError::Syntax("number out of range"))
}

/// A login name: printable, no whitespace (UTF-8 allowed for RFC 6856 addresses).
fn user_name(word: &str) -> Result<String, ParseError> {
    let printable = word.chars().all(|c| !c.is_control() && !c.is_whitespace());
    if word.len() > MAX_USER_LEN || !printable {
        return Err(ParseError::Syntax("invalid user name"));
    }
    Ok(word.to_owned())
}

fn apop_digest(word: &str) -> Result<String, ParseError> {
    if word.len() != APOP_DIGEST_LEN || !word.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ParseError::Syntax("invalid digest"));
    }
    Ok(word.to_ascii_lowercase())
}

/// RFC 4422 §3.1 mechanism names: upper-case letters, digits, `-` and `_`; clients may
/// send lower case, so it is accepted and upper-cased.
fn mechanism(word: &str) -> Result<String, ParseError> {
    let valid = word
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if word.len() > MAX_MECHANISM_LEN || !valid {
        return Err(ParseError::Syntax("invalid mechanism"));
    }
    Ok(word.to_ascii_uppercase())
}

/// The initial response stays base64 for the session to decode; checking the alphabet
/// here keeps junk out of the SASL layer. RFC 5034 §4: a lone `=` is an empty response.
fn initial_response(word: &str) -> Result<String, ParseError> {
    if word == "=" {
        return Ok(String::new());
    }
    let base64 = word
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if !base64 {
        return Err(ParseError::Syntax("invalid initial response"));
    }
    Ok(word.to_owned())
}

/// Stands in for a secret in `Debug` output.
struct Redacted;

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::User(name) => f.debug_tuple("User").field(name).finish(),
            Command::Pass(_) => f.debug_tuple("Pass").field(&Redacted).finish(),
            Command::Apop { user, .. } => f
                .debug_struct("Apop")
                .field("user", user)
                .field("digest", &Redacted)
                .finish(),
            Command::Auth { mechanism, initial } => f
                .debug_struct("Auth")
                .field("mechanism", mechanism)
                .field("initial", &initial.as_ref().map(|_| Redacted))
                .finish(),
            Command::List(msg) => f.debug_tuple("List").field(msg).finish(),
            Command::Retr(msg) => f.debug_tuple("Retr").field(msg).finish(),
            Command::Dele(msg) => f.debug_tuple("Dele").field(msg).finish(),
            Command::Top { msg, lines } => f
                .debug_struct("Top")
                .field("msg", msg)
                .field("lines", lines)
                .finish(),
            Command::Uidl(msg) => f.debug_tuple("Uidl").field(msg).finish(),
            Command::AuthList => f.write_str("AUTH"),
            Command::Capa
            | Command::Stls
            | Command::Quit
            | Command::Stat
            | Command::Noop
            | Command::Rset
            | Command::Last => f.write_str(self.verb()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Command {
        match Command::parse(line.as_bytes()) {
            Ok(cmd) => cmd,
            Err(e) => panic!("{line:?} failed: {e}"),
        }
    }

    #[test]
    fn valid_commands() {
        let digest = "c4c9334bac560ecc979e58001b3e22fb";
        let cases: Vec<(&str, Command)> = vec![
            ("USER alice", Command::User("alice".into())),
            (
                "user alice@example.com",
                Command::User("alice@example.com".into()),
            ),
            (
                "USER jörg@exämple.de",
                Command::User("jörg@exämple.de".into()),
            ),
            ("USER  alice", Command::User("alice".into())),
            ("USER alice ", Command::User("alice".into())),
            ("PASS secret", Command::Pass("secret".into())),
            ("PASS  two  spaces ", Command::Pass(" two  spaces ".into())),
            ("pass a b c", Command::Pass("a b c".into())),
            (
                "APOP mrose c4c9334bac560ecc979e58001b3e22fb",
                Command::Apop {
                    user: "mrose".into(),
                    digest: digest.into(),
                },
            ),
            (
                "apop mrose C4C9334BAC560ECC979E58001B3E22FB",
                Command::Apop {
                    user: "mrose".into(),
                    digest: digest.into(),
                },
            ),
            (
                "AUTH PLAIN",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: None,
                },
            ),
            (
                "auth scram-sha-256",
                Command::Auth {
                    mechanism: "SCRAM-SHA-256".into(),
                    initial: None,
                },
            ),
            (
                "AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: Some("AGFsaWNlAHNlY3JldA==".into()),
                },
            ),
            (
                "AUTH PLAIN =",
                Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: Some(String::new()),
                },
            ),
            ("AUTH", Command::AuthList),
            ("auth ", Command::AuthList),
            ("CAPA", Command::Capa),
            ("capa", Command::Capa),
            ("CaPa ", Command::Capa),
            ("STLS", Command::Stls),
            ("QUIT", Command::Quit),
            ("STAT", Command::Stat),
            ("LIST", Command::List(None)),
            ("LIST 1", Command::List(Some(1))),
            ("LIST 007", Command::List(Some(7))),
            ("list 4294967295", Command::List(Some(u32::MAX))),
            ("RETR 2", Command::Retr(2)),
            ("RETR 0", Command::Retr(0)),
            ("DELE 3", Command::Dele(3)),
            ("NOOP", Command::Noop),
            ("RSET", Command::Rset),
            ("TOP 1 0", Command::Top { msg: 1, lines: 0 }),
            ("TOP 1  10", Command::Top { msg: 1, lines: 10 }),
            ("top  5 20  ", Command::Top { msg: 5, lines: 20 }),
            ("UIDL", Command::Uidl(None)),
            ("UIDL 9", Command::Uidl(Some(9))),
            ("LAST", Command::Last),
        ];
        for (line, want) in cases {
            assert_eq!(ok(line), want, "{line:?}");
        }
    }

    #[test]
    fn invalid_commands() {
        let long_user = format!("USER {}", "u".repeat(MAX_USER_LEN + 1));
        let syntax = |m| ParseError::Syntax(m);
        let cases: Vec<(&[u8], ParseError)> = vec![
            (b"", ParseError::Empty),
            (b"   ", ParseError::Empty),
            (b" \t ", ParseError::Empty),
            (b"HELO", ParseError::Unknown),
            (b"XTND XMIT", ParseError::Unknown),
            (b"STATS", ParseError::Unknown),
            (b"ST", ParseError::Unknown),
            (b" STAT", ParseError::Unknown),
            (b"STAT\t", ParseError::Unknown),
            (b"EHLO example.com", ParseError::Unknown),
            (b"STAT\xff", syntax("invalid UTF-8")),
            (b"USER \xc3", syntax("invalid UTF-8")),
            (b"USER", syntax("missing argument")),
            (b"USER ", syntax("missing argument")),
            (b"USER a b", syntax("too many arguments")),
            (b"USER a\tb", syntax("invalid user name")),
            (b"USER a\x00", syntax("invalid user name")),
            (b"USER a\x7f", syntax("invalid user name")),
            (long_user.as_bytes(), syntax("invalid user name")),
            (b"PASS", syntax("missing password")),
            (b"PASS ", syntax("missing password")),
            (b"APOP mrose", syntax("missing argument")),
            (
                b"APOP mrose c4c9334bac560ecc979e58001b3e22f",
                syntax("invalid digest"),
            ),
            (
                b"APOP mrose c4c9334bac560ecc979e58001b3e22fbb",
                syntax("invalid digest"),
            ),
            (
                b"APOP mrose g4c9334bac560ecc979e58001b3e22fb",
                syntax("invalid digest"),
            ),
            (
                b"APOP mrose c4c9334bac560ecc979e58001b3e22fb x",
                syntax("too many arguments"),
            ),
            (b"AUTH PL@IN", syntax("invalid mechanism")),
            (b"AUTH ABCDEFGHIJKLMNOPQRSTU", syntax("invalid mechanism")),
            (b"AUTH PLAIN a b", syntax("too many arguments")),
            (b"AUTH PLAIN a*b", syntax("invalid initial response")),
            (b"AUTH PLAIN *", syntax("invalid initial response")),
            (b"CAPA x", syntax("no arguments expected")),
            (b"STLS now", syntax("no arguments expected")),
            (b"QUIT 1", syntax("no arguments expected")),
            (b"STAT 1", syntax("no arguments expected")),
            (b"NOOP x", syntax("no arguments expected")),
            (b"RSET x", syntax("no arguments expected")),
            (b"LAST 1", syntax("no arguments expected")),
            (b"LIST x", syntax("invalid number")),
            (b"LIST 1 2", syntax("too many arguments")),
            (b"LIST -1", syntax("invalid number")),
            (b"LIST +1", syntax("invalid number")),
            (b"LIST 1.0", syntax("invalid number")),
            (b"LIST 0x1", syntax("invalid number")),
            (b"LIST \xd9\xa1", syntax("invalid number")),
            (b"LIST 4294967296", syntax("number out of range")),
            (
                b"LIST 99999999999999999999999",
                syntax("number out of range"),
            ),
            (b"RETR", syntax("missing argument")),
            (b"RETR ", syntax("missing argument")),
            (b"RETR 1 2", syntax("too many arguments")),
            (b"RETR 1\t", syntax("invalid number")),
            (b"DELE", syntax("missing argument")),
            (b"DELE a", syntax("invalid number")),
            (b"TOP", syntax("missing argument")),
            (b"TOP 1", syntax("missing argument")),
            (b"TOP 1 2 3", syntax("too many arguments")),
            (b"TOP 1 -2", syntax("invalid number")),
            (b"TOP x 2", syntax("invalid number")),
            (b"UIDL 1 2", syntax("too many arguments")),
            (b"UIDL one", syntax("invalid number")),
        ];
        for (line, want) in cases {
            assert_eq!(
                Command::parse(line),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn verbs_are_upper_case() {
        let cases = [
            ("user a", "USER"),
            ("pass a", "PASS"),
            ("apop a c4c9334bac560ecc979e58001b3e22fb", "APOP"),
            ("auth plain", "AUTH"),
            ("auth", "AUTH"),
            ("capa", "CAPA"),
            ("stls", "STLS"),
            ("quit", "QUIT"),
            ("stat", "STAT"),
            ("list", "LIST"),
            ("retr 1", "RETR"),
            ("dele 1", "DELE"),
            ("noop", "NOOP"),
            ("rset", "RSET"),
            ("top 1 1", "TOP"),
            ("uidl", "UIDL"),
            ("last", "LAST"),
        ];
        for (line, verb) in cases {
            assert_eq!(ok(line).verb(), verb);
        }
    }

    #[test]
    fn debug_redacts_secrets() {
        for line in [
            "PASS hunter2 with spaces",
            "AUTH PLAIN AGFsaWNlAGh1bnRlcjI=",
            "APOP alice c4c9334bac560ecc979e58001b3e22fb",
        ] {
            let cmd = ok(line);
            let secret = line.rsplit(' ').next().unwrap_or_default();
            for shown in [format!("{cmd:?}"), format!("{cmd:#?}")] {
                assert!(!shown.contains(secret), "{shown} leaks {secret}");
                assert!(!shown.contains("hunter2"), "{shown}");
                assert!(shown.contains("<redacted>"), "{shown}");
            }
        }
        assert_eq!(format!("{:?}", ok("USER alice")), r#"User("alice")"#);
        assert_eq!(
            format!("{:?}", ok("AUTH PLAIN")),
            r#"Auth { mechanism: "PLAIN", initial: None }"#
        );
        assert_eq!(format!("{:?}", ok("TOP 1 2")), "Top { msg: 1, lines: 2 }");
        assert_eq!(format!("{:?}", ok("STAT")), "STAT");
        assert_eq!(format!("{:?}", ok("LIST 3")), "List(Some(3))");
    }

    #[test]
    fn errors_read_well_after_err() {
        assert_eq!(ParseError::Empty.to_string(), "empty command");
        assert_eq!(ParseError::Unknown.to_string(), "unknown command");
        assert_eq!(
            ParseError::Syntax("invalid number").to_string(),
            "invalid number"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(line in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = Command::parse(&line);
        }

        #[test]
        fn numbers_round_trip(n in proptest::num::u32::ANY, m in proptest::num::u32::ANY) {
            proptest::prop_assert_eq!(ok(&format!("RETR {n}")), Command::Retr(n));
            proptest::prop_assert_eq!(
                ok(&format!("TOP {n} {m}")),
                Command::Top { msg: n, lines: m }
            );
        }

        #[test]
        fn passwords_are_kept_verbatim(pw in "[ -~]{1,200}") {
            proptest::prop_assert_eq!(ok(&format!("PASS {pw}")), Command::Pass(pw.clone()));
        }
    }

    #[test]
    fn verb_of_names_known_keywords_only() {
        assert_eq!(verb_of(b"retr abc"), Some("RETR"));
        assert_eq!(verb_of(b"TOP\r\n"), Some("TOP"));
        assert_eq!(verb_of(b"uidl"), Some("UIDL"));
        assert_eq!(verb_of(b"XYZZY 1"), None);
        assert_eq!(verb_of(b""), None);
        for v in VERBS {
            assert_eq!(verb_of(v.as_bytes()), Some(*v));
        }
    }
}
