//! swaks, a real SMTP/LMTP client, run against a listener; its transcript is split into
//! exchanges (what the client sent, the replies that followed) so tests check the reply
//! to each command and, for LMTP, to each recipient after the end of DATA. No
//! `--pipeline`: with it several commands share one exchange.

use super::require_tool;
use std::net::SocketAddr;
use std::process::Command;

/// One SMTP/LMTP reply: its code and the text of each of its lines (code and separator
/// removed), e.g. `250` and `["2.1.5 Ok"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// All lines' text joined with `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// Lines the client sent, then the replies the server gave before the client went on.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    pub sent: Vec<String>,
    pub replies: Vec<Reply>,
}

/// A finished swaks run.
pub struct Swaks {
    /// swaks's exit code: 0 all went well, 2 no connection, 24 no recipient accepted,
    /// 25 DATA refused, 26 the message refused after DATA (for LMTP: by every
    /// recipient), 28 AUTH failed, 29 TLS failed; see `swaks --help`, EXIT CODES.
    pub code: Option<i32>,
    /// The transcript from stdout: ` -> ` / ` ~> ` client lines (plain / TLS), `<-  `,
    /// `<** `, `<~  `, `<~* ` server lines (plain or TLS, success or error), `=== `
    /// information.
    pub transcript: String,
    /// swaks's own errors (`*** ` lines).
    pub stderr: String,
}

/// Runs swaks against `target` (`"127.0.0.1:PORT"`, `"[::1]:PORT"` or
/// `"unix:/path/to/socket"`) with `args`, e.g. `["--protocol", "LMTP", "--from", "a@b",
/// "--to", "x@example.org,y@example.org"]`, or `["-tls", "--tls-verify", "--tls-ca-path",
/// ca, "--tls-sni", "localhost"]` for STARTTLS against a verified certificate.
pub fn swaks(target: &str, args: &[&str]) -> Swaks {
    require_tool("swaks");
    let mut cmd = Command::new("swaks");
    match target.strip_prefix("unix:") {
        Some(path) => {
            cmd.args(["--socket", path]);
        }
        None => {
            let addr: SocketAddr = target
                .parse()
                .unwrap_or_else(|e| panic!("swaks target {target:?}: {e}"));
            cmd.args(["--server", &addr.ip().to_string()])
                .args(["--port", &addr.port().to_string()]);
        }
    }
    // Every wait for the server is bounded.
    let out = cmd
        .args(["--timeout", "20"])
        .args(args)
        .output()
        .expect("run swaks");
    Swaks {
        code: out.status.code(),
        transcript: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Swaks {
    /// The transcript as exchanges, in order.
    pub fn exchanges(&self) -> Vec<Exchange> {
        let mut out: Vec<Exchange> = Vec::new();
        let mut current = Exchange::default();
        let mut reply: Vec<String> = Vec::new();
        for line in self.transcript.lines() {
            if let Some(sent) = line.strip_prefix(" -> ").or(line.strip_prefix(" ~> ")) {
                if !current.replies.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
                current.sent.push(sent.to_string());
            } else if let Some(got) = ["<-  ", "<** ", "<~  ", "<~* "]
                .iter()
                .find_map(|p| line.strip_prefix(p))
            {
                reply.push(got.to_string());
                // `250-...` continues a reply; `250 ...` or a bare `250` ends it.
                if got.as_bytes().get(3) != Some(&b'-') {
                    current.replies.push(parse_reply(&reply, self));
                    reply.clear();
                }
            }
        }
        if !current.sent.is_empty() || !current.replies.is_empty() {
            out.push(current);
        }
        out
    }

    /// The replies to every command that starts with `command` (case-insensitive), e.g.
    /// `"RCPT TO"` gives one reply per recipient in order, `"MAIL FROM"`, `"LHLO"`.
    pub fn replies_to(&self, command: &str) -> Vec<Reply> {
        let command = command.to_ascii_uppercase();
        self.exchanges()
            .into_iter()
            .filter(|e| {
                e.sent
                    .first()
                    .is_some_and(|s| s.to_ascii_uppercase().starts_with(&command))
            })
            .flat_map(|e| e.replies)
            .collect()
    }

    /// The replies after the message's final `.`: one per accepted recipient, in RCPT
    /// order, for LMTP; one for SMTP. Empty when DATA never got its `354`.
    pub fn data_replies(&self) -> Vec<Reply> {
        let exchanges = self.exchanges();
        exchanges
            .iter()
            .position(|e| e.replies.iter().any(|r| r.code == 354))
            .and_then(|i| exchanges.get(i + 1))
            .map(|e| e.replies.clone())
            .unwrap_or_default()
    }

    /// The exit code, transcript and errors, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "swaks exit {:?}\n{}{}",
            self.code, self.transcript, self.stderr
        )
    }
}

fn parse_reply(lines: &[String], run: &Swaks) -> Reply {
    let code = lines[0]
        .get(..3)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not a reply line {:?} in:\n{}", lines[0], run.dump()));
    Reply {
        code,
        lines: lines
            .iter()
            .map(|l| l.get(4..).unwrap_or_default().to_string())
            .collect(),
    }
}
