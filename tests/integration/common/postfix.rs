//! A private Postfix instance for the tests: its own `config_directory`, queue, data dir
//! and log file in a temporary directory, its smtpd on a free 127.0.0.1 port (STARTTLS
//! with a certificate from its own test CA), and every virtual domain handed to one LMTP
//! target. It runs in the foreground as the test's child and is stopped on `Drop`; it
//! never uses or touches the system's Postfix (`/etc/postfix`, `/var/spool/postfix`).
//! Needs root and the `postfix` user and `postdrop` group that Debian's package creates.

use super::{free_port, require_tool, TestCa};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long Postfix gets to start, and each SMTP reply to arrive.
const STARTUP: Duration = Duration::from_secs(30);
const REPLY: Duration = Duration::from_secs(20);
/// The host name Postfix uses in its greeting and `Received:` header.
pub const HOSTNAME: &str = "postfix.test";

pub struct Postfix {
    /// Root of the instance: `etc/` (main.cf, master.cf), `queue/`, `data/`, `maillog`,
    /// `tls/`. World-traversable, as Postfix's unprivileged daemons need.
    dir: tempfile::TempDir,
    smtp: SocketAddr,
    ca: TestCa,
    /// `postfix start-fg`: the script whose child is the master, so the test reaps both.
    child: Option<Child>,
}

/// A message in the instance's queue, from `postqueue -j`.
#[derive(Debug, Clone)]
pub struct Queued {
    pub queue_id: String,
    /// `incoming`, `active`, `deferred`, `hold` or `maildrop`.
    pub queue_name: String,
    /// (address, why it is still queued), in queue-file order.
    pub recipients: Vec<(String, String)>,
}

impl Postfix {
    /// Starts an instance that delivers every recipient in `domains` over LMTP to
    /// `lmtp_target`: `"127.0.0.1:PORT"`, `"[::1]:PORT"` or `"unix:/path/to/socket"` (the
    /// syntax of mailgate's `listen`), or over SMTP with mandatory STARTTLS to
    /// `"smtp:127.0.0.1:PORT"` (mailgate as the domains' MX). Other domains are refused
    /// at RCPT (no relaying).
    pub fn start(lmtp_target: &str, domains: &[&str]) -> Postfix {
        for tool in ["postfix", "postconf", "postqueue"] {
            require_tool(tool);
        }
        let dir = tempfile::tempdir().expect("postfix dir");
        let root = dir.path().to_path_buf();
        for sub in ["etc", "queue", "data", "tls"] {
            std::fs::create_dir(root.join(sub)).expect("postfix subdir");
        }
        // The daemons run as `postfix` and open the data dir and the log by path.
        set_mode(&root, 0o755);
        chown_postfix(&root.join("data"));
        let ca = TestCa::new(&root.join("tls"));
        let (cert, key) = ca.issue("smtpd", &[HOSTNAME, "127.0.0.1"]);
        let mut postfix = Postfix {
            dir,
            smtp: "127.0.0.1:0".parse().expect("addr"),
            ca,
            child: None,
        };
        let main_cf = main_cf(&root, lmtp_target, domains, &cert, &key);
        std::fs::write(postfix.config_dir().join("main.cf"), main_cf).expect("main.cf");
        // A port found free can be taken before the master binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            postfix.smtp = SocketAddr::from(([127, 0, 0, 1], port));
            std::fs::write(postfix.config_dir().join("master.cf"), master_cf(port))
                .expect("master.cf");
            if postfix.spawn() {
                return postfix;
            }
        }
        panic!(
            "postfix did not start on any of 5 ports; log:\n{}",
            postfix.log()
        );
    }

    /// Its smtpd: plain SMTP, STARTTLS offered with a certificate for `127.0.0.1` and
    /// [`HOSTNAME`] issued by [`Postfix::ca_pem`].
    pub fn smtp_addr(&self) -> SocketAddr {
        self.smtp
    }

    /// The CA that issued its smtpd's certificate.
    pub fn ca_pem(&self) -> &Path {
        &self.ca.ca_pem
    }

    /// Its `config_directory`, for `postconf -c`, `postqueue -c`, `postsuper -c`.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// True while `postfix status` finds its master running.
    pub fn status(&self) -> bool {
        self.postfix(&["status"]).status.success()
    }

    /// Everything the instance has logged so far (its `maillog_file`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Waits for a log line containing `needle` and returns the first one; fails the test
    /// with the whole log after `timeout`. Lines arrive through postlogd, so shortly after
    /// the event.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no postfix log line with {needle:?} after {timeout:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The messages still queued (`postqueue -j`), in no particular order.
    pub fn queue(&self) -> Vec<Queued> {
        let out = Command::new("postqueue")
            .arg("-c")
            .arg(self.config_dir())
            .arg("-j")
            .output()
            .expect("run postqueue");
        assert!(
            out.status.success(),
            "postqueue -j: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("postqueue -j line {line:?}: {e}"));
                let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                Queued {
                    queue_id: text(&v["queue_id"]),
                    queue_name: text(&v["queue_name"]),
                    recipients: v["recipients"]
                        .as_array()
                        .map(|rs| {
                            rs.iter()
                                .map(|r| (text(&r["address"]), text(&r["delay_reason"])))
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Submits `message` (CRLF line ends; dot-stuffed here) over SMTP to its smtpd and
    /// returns the queue id; fails the test on any reply other than success.
    pub fn send(&self, from: &str, to: &[&str], message: &[u8]) -> String {
        let stream = TcpStream::connect_timeout(&self.smtp, REPLY).expect("connect smtpd");
        stream.set_read_timeout(Some(REPLY)).expect("read timeout");
        stream
            .set_write_timeout(Some(REPLY))
            .expect("write timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut writer = stream;
        let mut step = |line: &[u8], want: u16| {
            if !line.is_empty() {
                writer.write_all(line).expect("write smtpd");
                writer.write_all(b"\r\n").expect("write smtpd");
            }
            let (code, text) = smtp_reply(&mut reader);
            assert_eq!(
                code,
                want,
                "smtpd answered {:?} with {code} {text}",
                String::from_utf8_lossy(line)
            );
            text
        };
        step(b"", 220);
        step(b"EHLO client.test", 250);
        step(format!("MAIL FROM:<{from}>").as_bytes(), 250);
        for rcpt in to {
            step(format!("RCPT TO:<{rcpt}>").as_bytes(), 250);
        }
        step(b"DATA", 354);
        let mut data = dot_stuff(message);
        data.push(b'.');
        let queued = step(&data, 250);
        step(b"QUIT", 221);
        queued
            .rsplit("queued as ")
            .next()
            .map(|id| id.trim().to_string())
            .filter(|id| !id.is_empty() && !id.contains(' '))
            .unwrap_or_else(|| panic!("no queue id in {queued:?}"))
    }

    /// `postfix -c DIR ARGS`. Its diagnostics go to the maillog, not to stderr, unless
    /// stderr is a terminal.
    fn postfix(&self, args: &[&str]) -> Output {
        Command::new("postfix")
            .arg("-c")
            .arg(self.config_dir())
            .args(args)
            .output()
            .expect("run postfix")
    }

    /// Runs `postfix start-fg` and waits for its smtpd greeting; false when the master
    /// exits first (the port was taken).
    fn spawn(&mut self) -> bool {
        let mut child = Command::new("postfix")
            .arg("-c")
            .arg(self.config_dir())
            .arg("start-fg")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: no signal Postfix sends to a group reaches the tests.
            .process_group(0)
            .spawn()
            .expect("spawn postfix");
        let deadline = Instant::now() + STARTUP;
        loop {
            if child.try_wait().expect("wait postfix").is_some() {
                return false;
            }
            if let Some(greeting) = greeting(self.smtp) {
                assert!(
                    greeting.starts_with(&format!("220 {HOSTNAME} ")),
                    "something else answers on {}: {greeting}",
                    self.smtp
                );
                self.child = Some(child);
                return true;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("postfix not ready after {STARTUP:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The master's pid from its pid file.
    fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("queue/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = self.postfix(&["stop"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // `postfix stop` did not end it: kill the master (and so its daemons) by pid.
        if let Some(pid) = self.master_pid() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(format!("-{pid}"))
                .status();
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn main_cf(root: &Path, lmtp_target: &str, domains: &[&str], cert: &Path, key: &Path) -> String {
    let smtp = lmtp_target.strip_prefix("smtp:");
    let (transport, protocols) = match lmtp_target.strip_prefix("unix:") {
        None if smtp.is_some() => {
            let addr: SocketAddr = smtp
                .unwrap_or_default()
                .parse()
                .unwrap_or_else(|e| panic!("SMTP target {lmtp_target:?}: {e}"));
            // Brackets: the host itself, no MX lookup.
            (format!("smtp:[{}]:{}", addr.ip(), addr.port()), "ipv4")
        }
        Some(path) => {
            assert!(
                path.starts_with('/'),
                "LMTP socket {path:?} must be absolute"
            );
            (format!("lmtp:unix:{path}"), "ipv4")
        }
        None => {
            let addr: SocketAddr = lmtp_target
                .parse()
                .unwrap_or_else(|e| panic!("LMTP target {lmtp_target:?}: {e}"));
            let protocols = if addr.is_ipv6() { "all" } else { "ipv4" };
            (format!("lmtp:inet:{addr}"), protocols)
        }
    };
    // To an MX, TLS is mandatory here so the test proves STARTTLS works with Postfix's
    // client (not verified: Postfix does not match IP addresses in certificates).
    let smtp_tls = if smtp.is_some() { "encrypt" } else { "none" };
    let root = root.display();
    format!(
        r#"compatibility_level = 3.6
config_directory = {root}/etc
queue_directory = {root}/queue
data_directory = {root}/data
maillog_file = {root}/maillog
# Postfix writes its log only under an allowed prefix.
maillog_file_prefixes = {root}
mail_owner = postfix
setgid_group = postdrop
myhostname = {HOSTNAME}
mydomain = test
myorigin = $myhostname
smtpd_banner = $myhostname ESMTP
inet_interfaces = 127.0.0.1
inet_protocols = {protocols}
# No trusted clients, so the only accepted recipients are those in the virtual domains.
mynetworks =
mydestination =
relay_domains =
smtpd_relay_restrictions = reject_unauth_destination
virtual_mailbox_domains = {domains}
virtual_transport = {transport}
local_transport = error:5.1.1 local delivery is disabled
default_transport = error:5.7.1 relaying is disabled
alias_maps =
alias_database =
# Messages reach the LMTP server as submitted, plus Postfix's Received: header.
local_header_rewrite_clients =
# Loopback only: no DNS, also not for the LMTP target.
smtp_dns_support_level = disabled
lmtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
# A deferred message is retried within about a second.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtpd_tls_security_level = may
smtp_tls_security_level = {smtp_tls}
smtp_tls_loglevel = 1
smtpd_tls_chain_files = {key}, {cert}
biff = no
"#,
        domains = domains.join(", "),
        key = key.display(),
        cert = cert.display(),
    )
}

/// The services a relay needs, none chrooted; smtpd on 127.0.0.1:`port`; `postlog` writes
/// `maillog_file`.
fn master_cf(port: u16) -> String {
    format!(
        "127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60   1 pickup
cleanup   unix  n - n -    0 cleanup
qmgr      unix  n - n 300  1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -    - trivial-rewrite
bounce    unix  - - n -    0 bounce
defer     unix  - - n -    0 bounce
trace     unix  - - n -    0 bounce
verify    unix  - - n -    1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -    - proxymap
smtp      unix  - - n -    - smtp
showq     unix  n - n -    - showq
error     unix  - - n -    - error
retry     unix  - - n -    - error
discard   unix  - - n -    - discard
lmtp      unix  - - n -    - lmtp
anvil     unix  - - n -    1 anvil
scache    unix  - - n -    1 scache
postlog   unix-dgram n - n - 1 postlogd
"
    )
}

/// The first line of an SMTP greeting on `addr`, if something answers there.
fn greeting(addr: SocketAddr) -> Option<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(REPLY)).ok()?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).ok()?;
    let _ = (&stream).write_all(b"QUIT\r\n");
    Some(line.trim_end().to_string())
}

/// One SMTP reply (all lines of a multi-line one): the code and the text of its lines.
fn smtp_reply(reader: &mut BufReader<TcpStream>) -> (u16, String) {
    let mut text = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("read smtpd reply");
        let line = line.trim_end();
        let code = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not an SMTP reply: {line:?}"));
        text.push(line.get(4..).unwrap_or_default().to_string());
        if line.as_bytes().get(3) != Some(&b'-') {
            return (code, text.join("\n"));
        }
    }
}

/// `message` with a dot doubled at the start of every line and a final CRLF.
fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 8);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn chown_postfix(path: &Path) {
    let status = Command::new("chown")
        .arg("postfix:postfix")
        .arg(path)
        .status()
        .expect("run chown");
    assert!(
        status.success(),
        "chown postfix {} (the tests run Postfix as root; its package creates the user)",
        path.display()
    );
}
