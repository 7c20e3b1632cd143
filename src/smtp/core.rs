//! The SMTP/LMTP state machine: command + state → reply or a request to the session
//! (look up a recipient, stream DATA, start TLS, close). Pure: no sockets, no store, no
//! clock. The one place that decides which command is allowed when.

use super::codec::{Command, MailFrom, ParseError, Reply};
use crate::delivery::Verdict;
use std::borrow::Cow;

/// Which dialect a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// RFC 2033: LHLO, one reply per recipient after DATA, no STARTTLS.
    Lmtp,
    /// RFC 5321 inbound: HELO/EHLO, one reply after DATA, STARTTLS.
    Smtp,
}

/// What the session must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Reply(Reply),
    /// A syntactically valid RCPT: the session decides with the store, then calls
    /// [`Core::recipient`] with the verdict.
    CheckRecipient(String),
    /// Answer 354 and stream the message; then [`Core::data_done`].
    Data,
    /// Answer 220 and hand the connection to TLS; then [`Core::tls_started`].
    StartTls(Reply),
    /// Answer and close.
    Quit(Reply),
}

/// The reply that tells the client a verdict (at RCPT, or per recipient after DATA).
pub fn verdict_reply(verdict: Verdict) -> Reply {
    match verdict {
        Verdict::Accepted => Reply::new(250, "2.1.5", "OK"),
        Verdict::UnknownUser => Reply::new(550, "5.1.1", "No such user here"),
        Verdict::RelayDenied => Reply::new(550, "5.7.1", "Relaying denied"),
        Verdict::QuotaFull => Reply::new(452, "4.2.2", "Mailbox full, try again later"),
        Verdict::QuotaTooSmall => Reply::new(552, "5.2.2", "Message exceeds the mailbox quota"),
        Verdict::TooBig => Reply::new(552, "5.3.4", "Message too big"),
        Verdict::TempFail => Reply::new(451, "4.3.0", "Temporary failure, try again later"),
        // RFC 3463 X.3.1: mail system full.
        Verdict::StorageFull => Reply::new(452, "4.3.1", "Mail system full, try again later"),
    }
}

/// Limits the state machine enforces itself.
#[derive(Debug, Clone, Copy)]
pub struct CoreLimits {
    pub max_message_bytes: u64,
    pub max_recipients: usize,
}

/// The envelope of the transaction in progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub mail: MailFrom,
    /// Accepted recipients in RCPT order (LMTP answers DATA once per entry).
    pub recipients: Vec<String>,
}

#[derive(Debug)]
pub struct Core {
    protocol: Protocol,
    hostname: String,
    limits: CoreLimits,
    /// STARTTLS may be offered: SMTP on a connection not yet encrypted.
    tls_available: bool,
    tls_active: bool,
    /// The client's HELO/EHLO/LHLO name, once given.
    helo: Option<String>,
    /// EHLO or LHLO (extensions in use) rather than HELO.
    extended: bool,
    envelope: Option<Envelope>,
    /// RCPT commands seen in this transaction, accepted or not, for the recipient cap.
    rcpt_attempts: usize,
    /// A RCPT is being checked by the session.
    pending_rcpt: Option<String>,
}

impl Core {
    pub fn new(protocol: Protocol, hostname: &str, limits: CoreLimits, tls_active: bool) -> Core {
        Core {
            protocol,
            hostname: hostname.to_owned(),
            limits,
            tls_available: protocol == Protocol::Smtp && !tls_active,
            tls_active,
            helo: None,
            extended: false,
            envelope: None,
            rcpt_attempts: 0,
            pending_rcpt: None,
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    pub fn greeting(&self) -> Reply {
        let service = match self.protocol {
            Protocol::Lmtp => "LMTP",
            Protocol::Smtp => "ESMTP",
        };
        Reply::plain(
            220,
            vec![format!("{} {service} mailgate ready", self.hostname).into()],
        )
    }

    pub fn helo_name(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// True between MAIL and the end of DATA.
    pub fn in_transaction(&self) -> bool {
        self.envelope.is_some()
    }

    /// The envelope, for the session to deliver after DATA.
    pub fn envelope(&self) -> Option<&Envelope> {
        self.envelope.as_ref()
    }

    /// The `with` protocol of the Received: header (RFC 3848).
    pub fn received_with(&self) -> &'static str {
        match (self.protocol, self.extended, self.tls_active) {
            (Protocol::Lmtp, _, false) => "LMTP",
            (Protocol::Lmtp, _, true) => "LMTPS",
            (Protocol::Smtp, false, _) => "SMTP",
            (Protocol::Smtp, true, false) => "ESMTP",
            (Protocol::Smtp, true, true) => "ESMTPS",
        }
    }

    /// The RCPT `smtputf8` allowance of the transaction in progress.
    pub fn smtputf8(&self) -> bool {
        self.envelope.as_ref().is_some_and(|e| e.mail.smtputf8)
    }

    /// A line the codec could not parse.
    pub fn parse_error(&self, e: &ParseError, line: &[u8]) -> Reply {
        let rcpt = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"RCPT");
        e.reply(rcpt)
    }

    fn reset(&mut self) {
        self.envelope = None;
        self.rcpt_attempts = 0;
        self.pending_rcpt = None;
    }

    fn hello_verb(&self) -> &'static str {
        match self.protocol {
            Protocol::Lmtp => "LHLO",
            Protocol::Smtp => "EHLO/HELO",
        }
    }

    pub fn command(&mut self, cmd: Command) -> Step {
        let bad_sequence = |text: &'static str| Step::Reply(Reply::new(503, "5.5.1", text));
        match cmd {
            Command::Lhlo(name) if self.protocol == Protocol::Lmtp => self.hello(name, true),
            Command::Ehlo(name) if self.protocol == Protocol::Smtp => self.hello(name, true),
            Command::Helo(name) if self.protocol == Protocol::Smtp => self.hello(name, false),
            Command::Lhlo(_) | Command::Ehlo(_) | Command::Helo(_) => Step::Reply(Reply::new(
                500,
                "5.5.1",
                match self.protocol {
                    Protocol::Lmtp => "This is LMTP: use LHLO",
                    Protocol::Smtp => "This is SMTP: use EHLO or HELO",
                },
            )),
            Command::Mail(mail) => {
                if self.helo.is_none() {
                    return Step::Reply(Reply::new(
                        503,
                        "5.5.1",
                        format!("Send {} first", self.hello_verb()),
                    ));
                }
                if self.envelope.is_some() {
                    return bad_sequence("Nested MAIL command");
                }
                if mail.size.is_some_and(|s| s > self.limits.max_message_bytes) {
                    return Step::Reply(verdict_reply(Verdict::TooBig));
                }
                if (mail.smtputf8 || mail.eight_bit) && !self.extended {
                    return Step::Reply(ParseError::Parameter.reply(false));
                }
                self.envelope = Some(Envelope {
                    mail,
                    recipients: Vec::new(),
                });
                Step::Reply(Reply::new(250, "2.1.0", "OK"))
            }
            Command::Rcpt(to) => {
                if self.envelope.is_none() {
                    return bad_sequence("Need MAIL before RCPT");
                }
                if self.rcpt_attempts >= self.limits.max_recipients {
                    return Step::Reply(Reply::new(452, "4.5.3", "Too many recipients"));
                }
                self.rcpt_attempts += 1;
                self.pending_rcpt = Some(to.clone());
                Step::CheckRecipient(to)
            }
            Command::Data => match &self.envelope {
                None => bad_sequence("Need MAIL before DATA"),
                Some(e) if e.recipients.is_empty() => {
                    Step::Reply(Reply::new(554, "5.5.1", "No valid recipients"))
                }
                Some(_) => Step::Data,
            },
            Command::Rset => {
                self.reset();
                Step::Reply(Reply::new(250, "2.0.0", "OK"))
            }
            Command::Noop => Step::Reply(Reply::new(250, "2.0.0", "OK")),
            Command::Quit => Step::Quit(Reply::new(
                221,
                "2.0.0",
                format!("{} closing connection", self.hostname),
            )),
            // LMTP requires VRFY to be answered (RFC 2033 §4.3); 252 verifies nothing,
            // which is what we want: no address harvesting.
            Command::Vrfy => Step::Reply(Reply::new(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => Step::Reply(Reply::new(502, "5.5.1", "EXPN not available")),
            Command::Help => Step::Reply(Reply::new(
                214,
                "2.0.0",
                "See RFC 5321 (SMTP) and RFC 2033 (LMTP)",
            )),
            Command::StartTls => {
                if !self.tls_available {
                    return Step::Reply(if self.tls_active {
                        Reply::new(503, "5.5.1", "TLS already active")
                    } else {
                        Reply::new(502, "5.5.1", "STARTTLS not available")
                    });
                }
                if self.envelope.is_some() {
                    return bad_sequence("STARTTLS not allowed during a mail transaction");
                }
                Step::StartTls(Reply::new(220, "2.0.0", "Ready to start TLS"))
            }
            Command::NotImplemented => {
                Step::Reply(Reply::new(502, "5.5.1", "Command not implemented"))
            }
        }
    }

    fn hello(&mut self, name: String, extended: bool) -> Step {
        // A new HELO/EHLO is also an implicit RSET (RFC 5321 §4.1.4).
        self.reset();
        self.helo = Some(name);
        self.extended = extended;
        if !extended {
            return Step::Reply(Reply::plain(250, vec![self.hostname.clone().into()]));
        }
        let mut lines: Vec<Cow<'static, str>> = vec![
            self.hostname.clone().into(),
            "PIPELINING".into(),
            format!("SIZE {}", self.limits.max_message_bytes).into(),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
            "SMTPUTF8".into(),
        ];
        if self.tls_available {
            lines.push("STARTTLS".into());
        }
        Step::Reply(Reply::plain(250, lines))
    }

    /// The session's verdict on the RCPT it was asked to check; `to` is where an
    /// accepted recipient's copy goes (the RCPT address, or where `postmaster` leads).
    pub fn recipient(&mut self, verdict: Verdict, to: String) -> Reply {
        if self.pending_rcpt.take().is_none() {
            return Reply::new(503, "5.5.1", "No recipient pending");
        }
        if verdict == Verdict::Accepted {
            if let Some(e) = &mut self.envelope {
                e.recipients.push(to);
            }
        }
        verdict_reply(verdict)
    }

    /// DATA is over (delivered, refused, or aborted): the transaction ends.
    pub fn data_done(&mut self) {
        self.reset();
    }

    /// The TLS handshake after STARTTLS succeeded: the client must greet again
    /// (RFC 3207 §4.2), and STARTTLS is no longer offered.
    pub fn tls_started(&mut self) {
        self.reset();
        self.helo = None;
        self.extended = false;
        self.tls_available = false;
        self.tls_active = true;
    }
}

/// Limits on refused recipients (`550` at RCPT), which is how account names are guessed:
/// past `delay_after` each refusal is slowed down, past a maximum the client is sent
/// away. A maximum of 0 is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeLimits {
    pub delay_after: u32,
    /// Refusals in one connection, RSET or not.
    pub max_per_connection: u32,
    /// Refusals from one client address within the window.
    pub max_per_ip: u32,
}

/// What a refused recipient costs the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Answer at once.
    Answer,
    /// Wait before answering.
    Delay,
    /// Answer, then `421` and close.
    Close,
}

impl ProbeLimits {
    /// Whether a client whose address already has `ip_count` refusals in the window may
    /// have a recipient looked up at all.
    pub fn admits(&self, ip_count: u32) -> bool {
        self.max_per_ip == 0 || ip_count < self.max_per_ip
    }

    /// The cost of a refusal, given the counts including it.
    pub fn refused(&self, connection: u32, ip: u32) -> Probe {
        let over = |max: u32, n: u32| max != 0 && n >= max;
        if over(self.max_per_connection, connection) || over(self.max_per_ip, ip) {
            Probe::Close
        } else if connection.max(ip) > self.delay_after {
            Probe::Delay
        } else {
            Probe::Answer
        }
    }
}

/// The reply that sends a guessing client away.
pub fn too_many_unknown() -> Reply {
    Reply::new(
        421,
        "4.7.0",
        "Too many unknown recipients, closing connection",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::codec::parse;

    const LIMITS: CoreLimits = CoreLimits {
        max_message_bytes: 1000,
        max_recipients: 2,
    };

    fn run(core: &mut Core, line: &str) -> Step {
        match parse(line.as_bytes(), core.smtputf8()) {
            Ok(cmd) => core.command(cmd),
            Err(e) => Step::Reply(core.parse_error(&e, line.as_bytes())),
        }
    }

    fn code(step: &Step) -> u16 {
        match step {
            Step::Reply(r) | Step::StartTls(r) | Step::Quit(r) => r.code,
            Step::CheckRecipient(_) => 0,
            Step::Data => 354,
        }
    }

    fn lines(step: &Step) -> Vec<String> {
        match step {
            Step::Reply(r) => r.lines.iter().map(|l| l.to_string()).collect(),
            other => panic!("not a reply: {other:?}"),
        }
    }

    #[test]
    fn smtp_transaction_in_order() {
        let mut c = Core::new(Protocol::Smtp, "mx.test", LIMITS, false);
        assert_eq!(
            code(&run(&mut c, "MAIL FROM:<a@b>")),
            503,
            "MAIL before EHLO"
        );
        let ehlo = run(&mut c, "EHLO client");
        let caps = lines(&ehlo);
        assert_eq!(caps[0], "mx.test");
        for cap in [
            "PIPELINING",
            "SIZE 1000",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "STARTTLS",
        ] {
            assert!(caps.iter().any(|c| c == cap), "{cap} missing from {caps:?}");
        }
        assert_eq!(code(&run(&mut c, "RCPT TO:<x@y>")), 503, "RCPT before MAIL");
        assert_eq!(code(&run(&mut c, "DATA")), 503, "DATA before MAIL");
        assert_eq!(code(&run(&mut c, "MAIL FROM:<a@b> SIZE=1001")), 552);
        assert_eq!(code(&run(&mut c, "MAIL FROM:<a@b> SIZE=1000")), 250);
        assert_eq!(code(&run(&mut c, "MAIL FROM:<a@b>")), 503, "nested MAIL");
        assert_eq!(code(&run(&mut c, "DATA")), 554, "DATA without recipients");
        assert_eq!(
            run(&mut c, "RCPT TO:<joe@example.org>"),
            Step::CheckRecipient("joe@example.org".into())
        );
        assert_eq!(
            c.recipient(Verdict::UnknownUser, "joe@example.org".into())
                .code,
            550
        );
        assert_eq!(
            run(&mut c, "RCPT TO:<ann@example.org>"),
            Step::CheckRecipient("ann@example.org".into())
        );
        assert_eq!(
            c.recipient(Verdict::Accepted, "ann@example.org".into())
                .code,
            250
        );
        assert_eq!(
            code(&run(&mut c, "RCPT TO:<bob@example.org>")),
            452,
            "recipient cap counts attempts"
        );
        assert_eq!(
            code(&run(&mut c, "STARTTLS")),
            503,
            "STARTTLS inside a transaction"
        );
        assert_eq!(run(&mut c, "DATA"), Step::Data);
        assert_eq!(
            c.envelope().map(|e| e.recipients.clone()),
            Some(vec!["ann@example.org".to_string()])
        );
        assert_eq!(c.received_with(), "ESMTP");
        c.data_done();
        assert!(!c.in_transaction());
        assert_eq!(code(&run(&mut c, "MAIL FROM:<>")), 250, "a new transaction");
        assert_eq!(code(&run(&mut c, "RSET")), 250);
        assert!(!c.in_transaction());
        assert_eq!(code(&run(&mut c, "VRFY joe")), 252);
        assert_eq!(code(&run(&mut c, "EXPN list")), 502);
        assert_eq!(code(&run(&mut c, "AUTH PLAIN x")), 502);
        assert_eq!(code(&run(&mut c, "LHLO x")), 500);
        assert_eq!(code(&run(&mut c, "FROB")), 500);
        assert_eq!(code(&run(&mut c, "QUIT")), 221);
    }

    #[test]
    fn starttls_resets_and_is_offered_once() {
        let mut c = Core::new(Protocol::Smtp, "mx.test", LIMITS, false);
        assert_eq!(
            code(&run(&mut c, "STARTTLS")),
            220,
            "allowed before EHLO too"
        );
        run(&mut c, "EHLO client");
        assert!(matches!(run(&mut c, "STARTTLS"), Step::StartTls(_)));
        c.tls_started();
        assert_eq!(
            code(&run(&mut c, "MAIL FROM:<a@b>")),
            503,
            "must EHLO again after TLS"
        );
        let caps = lines(&run(&mut c, "EHLO client"));
        assert!(!caps.iter().any(|c| c == "STARTTLS"), "{caps:?}");
        assert_eq!(code(&run(&mut c, "STARTTLS")), 503);
        assert_eq!(c.received_with(), "ESMTPS");
    }

    #[test]
    fn helo_gets_no_extensions() {
        let mut c = Core::new(Protocol::Smtp, "mx.test", LIMITS, false);
        assert_eq!(lines(&run(&mut c, "HELO client")), vec!["mx.test"]);
        assert_eq!(code(&run(&mut c, "MAIL FROM:<a@b> BODY=8BITMIME")), 555);
        assert_eq!(code(&run(&mut c, "MAIL FROM:<a@b>")), 250);
        assert_eq!(c.received_with(), "SMTP");
    }

    #[test]
    fn lmtp_dialect() {
        let mut c = Core::new(Protocol::Lmtp, "mx.test", LIMITS, false);
        assert_eq!(code(&run(&mut c, "EHLO x")), 500, "LMTP has no EHLO");
        assert_eq!(code(&run(&mut c, "HELO x")), 500);
        assert_eq!(code(&run(&mut c, "STARTTLS")), 502);
        let caps = lines(&run(&mut c, "LHLO mta"));
        assert!(!caps.iter().any(|c| c == "STARTTLS"));
        assert!(caps.iter().any(|c| c == "PIPELINING"));
        assert_eq!(code(&run(&mut c, "VRFY joe")), 252);
        assert_eq!(c.received_with(), "LMTP");
    }

    #[test]
    fn smtputf8_rcpt_needs_it_on_mail() {
        let mut c = Core::new(Protocol::Smtp, "mx.test", LIMITS, false);
        run(&mut c, "EHLO x");
        run(&mut c, "MAIL FROM:<a@b>");
        assert_eq!(code(&run(&mut c, "RCPT TO:<jöe@example.org>")), 553);
        run(&mut c, "RSET");
        run(&mut c, "MAIL FROM:<a@b> SMTPUTF8");
        assert_eq!(
            run(&mut c, "RCPT TO:<jöe@example.org>"),
            Step::CheckRecipient("jöe@example.org".into())
        );
    }

    #[test]
    fn verdict_replies() {
        let cases = [
            (Verdict::Accepted, 250, "2.1.5"),
            (Verdict::UnknownUser, 550, "5.1.1"),
            (Verdict::RelayDenied, 550, "5.7.1"),
            (Verdict::QuotaFull, 452, "4.2.2"),
            (Verdict::QuotaTooSmall, 552, "5.2.2"),
            (Verdict::TooBig, 552, "5.3.4"),
            (Verdict::TempFail, 451, "4.3.0"),
            (Verdict::StorageFull, 452, "4.3.1"),
        ];
        for (v, code, status) in cases {
            let r = verdict_reply(v);
            assert_eq!((r.code, r.status), (code, Some(status)), "{v:?}");
        }
    }

    #[test]
    fn refused_recipients_slow_down_then_close() {
        let limits = ProbeLimits {
            delay_after: 2,
            max_per_connection: 4,
            max_per_ip: 10,
        };
        let by_connection: Vec<Probe> = (1..=4).map(|n| limits.refused(n, n)).collect();
        assert_eq!(
            by_connection,
            [Probe::Answer, Probe::Answer, Probe::Delay, Probe::Close]
        );
        // A fresh connection from an address with a history is slowed at once, and
        // sent away before any lookup once the address used up its refusals.
        assert_eq!(limits.refused(1, 5), Probe::Delay);
        assert_eq!(limits.refused(1, 10), Probe::Close);
        assert!(limits.admits(9));
        assert!(!limits.admits(10));
        let off = ProbeLimits {
            delay_after: u32::MAX,
            max_per_connection: 0,
            max_per_ip: 0,
        };
        assert_eq!(off.refused(1000, 1000), Probe::Answer);
        assert!(off.admits(u32::MAX));
    }
}
