//! POP3 command parsing (RFC 1939, 2449, 2595, 5034): one line in, one `Command` out.

/// A parsed command. Arguments are validated here (numbers, lengths); state rules are
/// the session's business. `Debug` redacts secrets.
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    User(String),
    /// The rest of the line after `PASS ` (spaces belong to the password).
    Pass(String),
    Apop { user: String, digest: String },
    Auth { mechanism: String, initial: Option<String> },
    Capa,
    Stls,
    Quit,
    Stat,
    List(Option<u32>),
    Retr(u32),
    Dele(u32),
    Noop,
    Rset,
    Top { msg: u32, lines: u32 },
    Uidl(Option<u32>),
    Last,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty command")]
    Empty,
    #[error("unknown command")]
    Unknown,
    #[error("{0}")]
    Syntax(&'static str),
}

impl Command {
    pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
        let _ = line;
        todo!()
    }

    /// The verb in upper case, for metrics and logs.
    pub fn verb(&self) -> &'static str {
        todo!()
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.verb())
    }
}
