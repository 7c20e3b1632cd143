//! Mail coming in over LMTP and SMTP: Python's smtplib as the MTA, a raw client for the
//! byte-exact and hostile cases, and POP3S to read back what was stored.

use crate::common::swaks::swaks;
use crate::common::{fetch_all, python, rss_kib, Options, Raw, Server};
use crate::metrics::http_get;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Splits a stored message into its two trace headers (Return-Path, Received with its
/// continuation lines) and the rest.
fn split_trace(stored: &[u8]) -> (String, String, Vec<u8>) {
    let text = stored;
    let first_end = text.windows(2).position(|w| w == b"\r\n").expect("line") + 2;
    let return_path = String::from_utf8_lossy(&text[..first_end]).into_owned();
    let mut end = first_end;
    loop {
        let next = text[end..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("line")
            + end
            + 2;
        end = next;
        if text.get(end) != Some(&b'\t') {
            break;
        }
    }
    let received = String::from_utf8_lossy(&text[first_end..end]).into_owned();
    (return_path, received, text[end..].to_vec())
}

fn send(
    mode: &str,
    target: &str,
    server: &Server,
    message: &[u8],
    from: &str,
    rcpts: &[&str],
) -> serde_json::Value {
    let file = server.dir.path().join("message.eml");
    std::fs::write(&file, message).expect("write message");
    let ca = server.ca.ca_pem.display().to_string();
    let file = file.display().to_string();
    let mut args = vec![mode, target, ca.as_str(), file.as_str(), from];
    args.extend_from_slice(rcpts);
    let out = python("smtp_send.py", &args);
    serde_json::from_str(&out).expect("json from smtp_send.py")
}

fn codes(v: &serde_json::Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|r| r[0].as_u64().expect("code"))
        .collect()
}

/// A message exercising what must survive the trip: a leading dot, 8-bit text, bare LF
/// and bare CR line ends (normalised), no final line end (added).
const MESSAGE: &[u8] = b"From: sender@example.net\r\nTo: joe@example.org\r\nSubject: in\r\n\r\n.leading dot\r\nbare lf\nbare cr\rcaf\xc3\xa9\r\nlast line";
const STORED_BODY: &[u8] = b"From: sender@example.net\r\nTo: joe@example.org\r\nSubject: in\r\n\r\n.leading dot\r\nbare lf\r\nbare cr\r\ncaf\xc3\xa9\r\nlast line\r\n";

/// Asserts that `/metrics` has exactly this sample line.
fn assert_sample(server: &Server, sample: &str) {
    let (_, metrics) = http_get(&format!("http://{}/metrics", server.metrics));
    let deliveries: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("deliveries_total"))
        .collect();
    assert!(
        metrics.lines().any(|l| l == sample),
        "{sample} not in:\n{}",
        deliveries.join("\n")
    );
}

/// Checks the EHLO/LHLO extensions smtplib saw (lower-cased) and returns them.
fn assert_extensions(features: &serde_json::Value) -> String {
    let features = features.to_string();
    for f in [
        "pipelining",
        "size",
        "8bitmime",
        "enhancedstatuscodes",
        "smtputf8",
    ] {
        assert!(features.contains(f), "{f} not in {features}");
    }
    features
}

fn lmtp_addr(server: &Server) -> String {
    server.lmtp.expect("lmtp listener").to_string()
}

fn smtp_addr(server: &Server) -> SocketAddr {
    server.smtp.expect("smtp listener")
}

#[tokio::test(flavor = "multi_thread")]
async fn lmtp_smtplib_delivers_to_two_domains_byte_exact() {
    let server = Server::start();
    server.with_user("joe@example.org");
    server.with_user("ann@example.net");
    let out = send(
        "lmtp",
        &lmtp_addr(&server),
        &server,
        MESSAGE,
        "sender@example.net",
        &["joe@example.org", "ann@example.net"],
    );
    assert_eq!(codes(&out["rcpt"]), vec![250, 250], "{out}");
    assert_eq!(
        codes(&out["data"]),
        vec![250, 250],
        "one reply per recipient: {out}"
    );
    let features = assert_extensions(&out["features"]);
    assert!(
        !features.contains("starttls"),
        "LMTP offers no STARTTLS: {features}"
    );
    for user in ["joe@example.org", "ann@example.net"] {
        let messages = fetch_all(&server, user).await;
        assert_eq!(messages.len(), 1, "{user}");
        let (return_path, received, rest) = split_trace(&messages[0]);
        assert_eq!(return_path, "Return-Path: <sender@example.net>\r\n");
        assert!(
            received.starts_with("Received: from client.test ([127.0.0.1])\r\n\tby mail.test (mailgate) with LMTP id "),
            "{received:?}"
        );
        assert!(
            !received.contains("for <"),
            "several recipients are not named: {received:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&rest),
            String::from_utf8_lossy(STORED_BODY)
        );
    }
    assert_sample(
        &server,
        "mailgate_deliveries_total{protocol=\"lmtp\",result=\"accepted\"} 2",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_starttls_smtplib_delivers() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let out = send(
        "starttls",
        &smtp_addr(&server).to_string(),
        &server,
        MESSAGE,
        "sender@example.net",
        &["joe@example.org"],
    );
    let features = assert_extensions(&out["features"]);
    assert!(features.contains("starttls"), "{features}");
    assert_eq!(out["starttls"][0], 220, "{out}");
    assert!(
        !out["tls_features"].to_string().contains("starttls"),
        "{out}"
    );
    assert_eq!(codes(&out["data"]), vec![250], "{out}");
    let messages = fetch_all(&server, "joe@example.org").await;
    let (_, received, rest) = split_trace(&messages[0]);
    assert!(received.contains("with ESMTPS id "), "{received:?}");
    assert!(
        received.contains("\tfor <joe@example.org>;"),
        "{received:?}"
    );
    assert_eq!(rest, STORED_BODY);
}

#[tokio::test(flavor = "multi_thread")]
async fn lmtp_on_a_unix_socket() {
    let sockdir = tempfile::tempdir().expect("tempdir");
    let path = sockdir.path().join("lmtp.sock");
    let server = Server::start_with(Options {
        lmtp_listen: Some(format!("unix:{}", path.display())),
        ..Options::default()
    });
    server.with_user("joe@example.org");
    let out = send(
        "lmtp-unix",
        &path.display().to_string(),
        &server,
        MESSAGE,
        "",
        &["joe@example.org"],
    );
    assert_eq!(codes(&out["data"]), vec![250], "{out}");
    let messages = fetch_all(&server, "joe@example.org").await;
    let (return_path, received, _) = split_trace(&messages[0]);
    assert_eq!(return_path, "Return-Path: <>\r\n", "null sender");
    assert!(
        received.starts_with("Received: from client.test\r\n"),
        "{received:?}"
    );
    let mode = std::fs::metadata(&path).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.ok(), Some(0o660));
}

/// A raw SMTP/LMTP client: reads whole (multi-line) replies.
struct Client(Raw);

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let mut c = Client(Raw::plain(addr).await);
        let greeting = c.reply().await;
        assert!(greeting.starts_with("220 "), "{greeting}");
        c
    }

    /// One reply, all its lines joined.
    async fn reply(&mut self) -> String {
        let mut out = String::new();
        loop {
            let line = self.0.line().await;
            out.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return out;
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.0.send(&format!("{line}\r\n")).await;
        self.reply().await
    }
}

fn assert_reply(reply: &str, prefix: &str) {
    assert!(
        reply.starts_with(prefix),
        "expected {prefix:?}, got {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_is_never_an_open_relay() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let mut c = Client::connect(smtp_addr(&server)).await;
    assert_reply(&c.cmd("EHLO attacker.test").await, "250-mail.test");
    assert_reply(&c.cmd("MAIL FROM:<spam@attacker.test>").await, "250 2.1.0");
    for victim in [
        "victim@gmail.example",
        "joe@example.org.attacker.test",
        "joe@org",
        "joe@[127.0.0.1]",
    ] {
        assert_reply(&c.cmd(&format!("RCPT TO:<{victim}>")).await, "550 5.7.1");
    }
    assert_reply(
        &c.cmd("RCPT TO:<@example.org:victim@elsewhere.test>").await,
        "550 5.7.1",
    );
    assert_reply(&c.cmd("RCPT TO:<nobody@example.org>").await, "550 5.1.1");
    assert_reply(&c.cmd("RCPT TO:<\"joe\"@example.org>").await, "550 5.1.1");
    assert_reply(&c.cmd("DATA").await, "554 5.5.1");
    assert_reply(&c.cmd("RCPT TO:<Joe@EXAMPLE.org>").await, "250 2.1.5");
    assert_reply(&c.cmd("QUIT").await, "221 2.0.0");
    assert_sample(
        &server,
        "mailgate_deliveries_total{protocol=\"smtp\",result=\"relay_denied\"} 5",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_out_of_order_and_garbage() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let mut c = Client::connect(smtp_addr(&server)).await;
    assert_reply(&c.cmd("MAIL FROM:<a@b.test>").await, "503 5.5.1");
    assert_reply(&c.cmd("LHLO x").await, "500 5.5.1");
    assert_reply(&c.cmd("HELO client.test").await, "250 mail.test");
    assert_reply(&c.cmd("RCPT TO:<joe@example.org>").await, "503 5.5.1");
    assert_reply(&c.cmd("DATA").await, "503 5.5.1");
    assert_reply(
        &c.cmd("MAIL FROM:<a@b.test> BODY=8BITMIME").await,
        "555 5.5.4",
    );
    assert_reply(&c.cmd("MAIL FROM:a@b.test").await, "501 5.1.7");
    assert_reply(&c.cmd("BDAT 10 LAST").await, "502 5.5.1");
    assert_reply(&c.cmd("VRFY joe").await, "252 2.5.0");
    assert_reply(&c.cmd("NOOP").await, "250 2.0.0");
    assert_reply(&c.cmd("QUIT").await, "221");
    assert!(c.0.closed().await);

    // Ten bad commands close the connection with 421.
    let mut c = Client::connect(smtp_addr(&server)).await;
    for _ in 0..9 {
        assert_reply(&c.cmd("XYZZY").await, "500 5.5.2");
    }
    c.0.send("XYZZY\r\n").await;
    assert_reply(&c.reply().await, "500 5.5.2");
    assert_reply(&c.reply().await, "421 4.7.0");
    assert!(c.0.closed().await);

    // LMTP wants LHLO.
    let mut c = Client::connect(server.lmtp.expect("lmtp")).await;
    assert_reply(&c.cmd("EHLO x").await, "500 5.5.1");
    assert_reply(&c.cmd("STARTTLS").await, "502 5.5.1");
    assert_reply(&c.cmd("LHLO mta.test").await, "250-mail.test");
    assert_reply(&c.cmd("VRFY joe@example.org").await, "252");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_megabyte_line_gets_500_and_bounded_memory() {
    // The binary: its RSS is the server's alone.
    let server = Server::start_with(Options {
        process: true,
        ..Options::default()
    });
    let before = rss_kib(server.pid());
    let mut c = Client::connect(smtp_addr(&server)).await;
    let chunk = vec![b'A'; 1024 * 1024];
    for _ in 0..10 {
        c.0.send_bytes(&chunk).await;
    }
    c.0.send("\r\n").await;
    assert_reply(&c.reply().await, "500 5.5.2 Line too long");
    assert_reply(&c.cmd("EHLO client.test").await, "250-mail.test");
    let grown = rss_kib(server.pid()).saturating_sub(before);
    assert!(grown < 4096, "RSS grew by {grown} KiB for a 10 MB line");
}

#[tokio::test(flavor = "multi_thread")]
async fn size_limit_at_mail_and_at_end_of_data() {
    let server = Server::start_with(Options {
        extra: "[delivery]\nmax_message_bytes = 100000\n".into(),
        ..Options::default()
    });
    server.with_user("joe@example.org");
    let mut c = Client::connect(smtp_addr(&server)).await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.contains("250-SIZE 100000\r\n"), "{ehlo}");
    assert_reply(
        &c.cmd("MAIL FROM:<a@b.test> SIZE=100001").await,
        "552 5.3.4",
    );
    assert_reply(&c.cmd("MAIL FROM:<a@b.test> SIZE=1000").await, "250");
    assert_reply(&c.cmd("RCPT TO:<joe@example.org>").await, "250");
    assert_reply(&c.cmd("DATA").await, "354");
    let line = format!("{}\r\n", "x".repeat(998));
    for _ in 0..200 {
        c.0.send(&line).await;
    }
    assert_reply(&c.cmd(".").await, "552 5.3.4");
    // The session goes on, and nothing was stored.
    assert_reply(&c.cmd("NOOP").await, "250");
    assert!(fetch_all(&server, "joe@example.org").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_discards_pipelined_commands() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let mut c = Client::connect(smtp_addr(&server)).await;
    c.cmd("EHLO client.test").await;
    // The injected MAIL rides in the same packet as STARTTLS (CVE-2011-0411).
    c.0.send("STARTTLS\r\nMAIL FROM:<injected@attacker.test>\r\n")
        .await;
    assert_reply(&c.reply().await, "220 2.0.0");
    let raw = c.0.starttls(&server.ca.ca_pem, "localhost").await;
    let mut c = Client(raw);
    assert_reply(&c.cmd("RCPT TO:<joe@example.org>").await, "503 5.5.1");
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_reply(&c.cmd("RCPT TO:<joe@example.org>").await, "503 5.5.1");
    assert_reply(&c.cmd("STARTTLS").await, "503 5.5.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_gone_mid_data_stores_nothing() {
    let server = Server::start();
    server.with_user("joe@example.org");
    {
        let mut c = Client::connect(server.lmtp.expect("lmtp")).await;
        c.cmd("LHLO mta.test").await;
        c.cmd("MAIL FROM:<a@b.test>").await;
        assert_reply(&c.cmd("RCPT TO:<joe@example.org>").await, "250");
        assert_reply(&c.cmd("DATA").await, "354");
        // Past one store chunk, so parts of it were written before the drop.
        let line = format!("{}\r\n", "y".repeat(998));
        for _ in 0..300 {
            c.0.send(&line).await;
        }
    }
    // The server notices the close; then a complete delivery still works and is alone.
    server.wait_active("lmtp", 0).await;
    assert!(fetch_all(&server, "joe@example.org").await.is_empty());
    let mut c = Client::connect(server.lmtp.expect("lmtp")).await;
    c.cmd("LHLO mta.test").await;
    c.cmd("MAIL FROM:<a@b.test>").await;
    c.cmd("RCPT TO:<joe@example.org>").await;
    c.cmd("DATA").await;
    assert_reply(&c.cmd("Subject: whole\r\n\r\nbody\r\n.").await, "250 2.0.0");
    let messages = fetch_all(&server, "joe@example.org").await;
    assert_eq!(messages.len(), 1);
    assert!(messages[0].ends_with(b"Subject: whole\r\n\r\nbody\r\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn smuggled_end_of_data_stays_in_the_body() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let mut c = Client::connect(smtp_addr(&server)).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@b.test>").await;
    c.cmd("RCPT TO:<joe@example.org>").await;
    assert_reply(&c.cmd("DATA").await, "354");
    c.0.send("Subject: s\r\n\r\nbefore\n.\nMAIL FROM:<x@y.test>\r\n\r.\rRCPT TO:<joe@example.org>\r\nafter\r\n.\r\n").await;
    assert_reply(&c.reply().await, "250 2.0.0");
    assert_reply(&c.cmd("QUIT").await, "221");
    let messages = fetch_all(&server, "joe@example.org").await;
    assert_eq!(messages.len(), 1, "one message, not two");
    let (_, _, body) = split_trace(&messages[0]);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "Subject: s\r\n\r\nbefore\r\n.\r\nMAIL FROM:<x@y.test>\r\n\r\n.\r\nRCPT TO:<joe@example.org>\r\nafter\r\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lmtp_per_recipient_replies_with_unknown_and_over_quota() {
    let server = Server::start_with(Options {
        extra: "[delivery]\nmax_recipients = 4\n".into(),
        ..Options::default()
    });
    server.with_user("joe@example.org");
    server.with_user("ann@example.org");
    server.with_user("bob@example.org");
    for (user, quota) in [("ann@example.org", "1K"), ("bob@example.org", "3K")] {
        let out = server.cli(&["user", "quota", user, quota], b"");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bad = server.cli(&["user", "quota", "ann@example.org", "12X"], b"");
    assert!(!bad.status.success());
    let message = format!("Subject: q\r\n\r\n{}\r\n", "z".repeat(1800));
    let lmtp = server.lmtp.expect("lmtp");
    // bob has room for one 2 KiB message: the first transaction fills it.
    for (round, want) in [(0, "250"), (1, "452 4.2.2")] {
        let mut c = Client::connect(lmtp).await;
        c.cmd("LHLO mta.test").await;
        // Pipelined, as Postfix does: every reply comes back in order.
        c.0.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<joe@example.org>\r\nRCPT TO:<nobody@example.org>\r\nRCPT TO:<ann@example.org>\r\nRCPT TO:<bob@example.org>\r\nRCPT TO:<extra@example.org>\r\nDATA\r\n").await;
        assert_reply(&c.reply().await, "250 2.1.0");
        assert_reply(&c.reply().await, "250 2.1.5");
        assert_reply(&c.reply().await, "550 5.1.1");
        assert_reply(&c.reply().await, "250 2.1.5");
        assert_reply(&c.reply().await, "250 2.1.5");
        assert_reply(&c.reply().await, "452 4.5.3");
        assert_reply(&c.reply().await, "354");
        c.0.send(&message).await;
        c.0.send(".\r\n").await;
        // One reply per accepted recipient, in RCPT order: joe, ann, bob.
        assert_reply(&c.reply().await, "250 2.0.0");
        assert_reply(&c.reply().await, "552 5.2.2");
        assert_reply(&c.reply().await, want);
        assert_reply(&c.cmd("QUIT").await, "221");
        assert_eq!(fetch_all(&server, "joe@example.org").await.len(), round + 1);
    }
    // Local delivery honours the same quota: all or nothing, EX_TEMPFAIL.
    let local = server.cli(
        &["deliver", "joe@example.org", "ann@example.org"],
        message.as_bytes(),
    );
    assert_eq!(
        local.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );
    let stderr = String::from_utf8_lossy(&local.stderr);
    assert!(
        stderr.contains("ann@example.org: mailbox over quota"),
        "{stderr}"
    );
    assert_eq!(fetch_all(&server, "joe@example.org").await.len(), 2);
    assert!(fetch_all(&server, "ann@example.org").await.is_empty());
    assert_eq!(fetch_all(&server, "bob@example.org").await.len(), 1);
    // A full mailbox is refused at RCPT once the client announces the size.
    let mut c = Client::connect(smtp_addr(&server)).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@b.test> SIZE=2000").await;
    assert_reply(&c.cmd("RCPT TO:<bob@example.org>").await, "452 4.2.2");
    assert_reply(&c.cmd("RCPT TO:<ann@example.org>").await, "552 5.2.2");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_client_gets_421() {
    let server = Server::start_with(Options {
        extra: "[delivery]\nidle_timeout_secs = 1\n".into(),
        ..Options::default()
    });
    let mut c = Client::connect(smtp_addr(&server)).await;
    let started = Instant::now();
    assert_reply(&c.reply().await, "421 4.4.2");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(c.0.closed().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn transaction_time_budget_and_per_ip_cap() {
    let server = Server::start_with(Options {
        max_connections_per_ip: 1,
        extra: "[delivery]\ntransaction_timeout_secs = 1\n".into(),
        ..Options::default()
    });
    server.with_user("joe@example.org");
    let mut c = Client::connect(smtp_addr(&server)).await;
    // A second connection from the same address is refused with 421.
    let mut second = Raw::plain(smtp_addr(&server)).await;
    assert_reply(&second.line().await, "421 4.7.0");
    assert!(second.closed().await);
    c.cmd("EHLO client.test").await;
    assert_reply(&c.cmd("MAIL FROM:<a@b.test>").await, "250");
    assert_reply(&c.cmd("RCPT TO:<joe@example.org>").await, "250");
    assert_reply(&c.cmd("DATA").await, "354");
    // The idle timeout (5 minutes) is far away; the transaction budget is not.
    let started = Instant::now();
    c.0.send("slow line\r\n").await;
    assert_reply(&c.reply().await, "421 4.4.2");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(c.0.closed().await);
    assert!(fetch_all(&server, "joe@example.org").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn smtputf8_sender_is_kept() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let mut c = Client::connect(smtp_addr(&server)).await;
    c.cmd("EHLO client.test").await;
    assert_reply(&c.cmd("MAIL FROM:<jöe@exämple.net>").await, "553 5.6.7");
    assert_reply(
        &c.cmd("MAIL FROM:<jöe@exämple.net> SMTPUTF8 BODY=8BITMIME")
            .await,
        "250",
    );
    // The store holds ASCII mailboxes only: a UTF-8 local part is no user here.
    assert_reply(&c.cmd("RCPT TO:<jöe@example.org>").await, "550 5.1.1");
    assert_reply(&c.cmd("RCPT TO:<joe@example.org>").await, "250");
    assert_reply(&c.cmd("DATA").await, "354");
    assert_reply(&c.cmd("Subject: Grüße\r\n\r\nhi\r\n.").await, "250 2.0.0");
    let messages = fetch_all(&server, "joe@example.org").await;
    let (return_path, _, body) = split_trace(&messages[0]);
    assert_eq!(return_path, "Return-Path: <jöe@exämple.net>\r\n");
    assert_eq!(body, "Subject: Grüße\r\n\r\nhi\r\n".as_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_header_on_smtp_names_the_client_in_received() {
    let server = Server::start_with(Options {
        extra: "[proxy_protocol]\nlisteners = [\"smtp\"]\ntrusted_networks = [\"127.0.0.0/8\"]\n"
            .into(),
        ..Options::default()
    });
    server.with_user("joe@example.org");
    let header = b"PROXY TCP4 198.51.100.9 192.0.2.1 40000 25\r\n";
    let mut c = Client(Raw::plain_after(smtp_addr(&server), header).await);
    assert_reply(&c.reply().await, "220 ");
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@b.test>").await;
    assert_reply(&c.cmd("RCPT TO:<joe@example.org>").await, "250");
    c.cmd("DATA").await;
    assert_reply(&c.cmd("Subject: p\r\n\r\nx\r\n.").await, "250");
    let messages = fetch_all(&server, "joe@example.org").await;
    let (_, received, _) = split_trace(&messages[0]);
    assert!(
        received.starts_with("Received: from client.test ([198.51.100.9])"),
        "{received:?}"
    );
    // LMTP is not in the list: no header is read there.
    let mut c = Client::connect(server.lmtp.expect("lmtp")).await;
    assert_reply(&c.cmd("LHLO mta.test").await, "250-mail.test");
}

/// `code status` of each reply, e.g. `250 2.1.5`.
fn statuses(replies: &[crate::common::swaks::Reply]) -> Vec<String> {
    replies
        .iter()
        .map(|r| format!("{} {}", r.code, r.text().split(' ').next().unwrap_or("")))
        .collect()
}

#[test]
fn swaks_lmtp_multi_recipient_with_unknown_and_over_quota() {
    let server = Server::start();
    for user in ["joe@example.org", "ann@example.org", "kim@example.net"] {
        server.with_user(user);
    }
    let out = server.cli(&["user", "quota", "ann@example.org", "1K"], b"");
    assert!(out.status.success());
    let body = format!("Subject: swaks\r\n\r\n{}", "q".repeat(3000));
    let run = swaks(
        &lmtp_addr(&server),
        &[
            "--protocol",
            "LMTP",
            "--from",
            "sender@example.com",
            "--to",
            "joe@example.org,nobody@example.org,ann@example.org,kim@example.net",
            "--body",
            &body,
        ],
    );
    assert_eq!(
        statuses(&run.replies_to("RCPT TO")),
        ["250 2.1.5", "550 5.1.1", "250 2.1.5", "250 2.1.5"],
        "{}",
        run.dump()
    );
    // One reply per accepted recipient, in RCPT order: joe, ann (over quota), kim.
    assert_eq!(
        statuses(&run.data_replies()),
        ["250 2.0.0", "552 5.2.2", "250 2.0.0"],
        "{}",
        run.dump()
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for (user, n) in [
        ("joe@example.org", 1),
        ("ann@example.org", 0),
        ("kim@example.net", 1),
    ] {
        assert_eq!(rt.block_on(fetch_all(&server, user)).len(), n, "{user}");
    }
}

#[test]
fn swaks_smtp_starttls_relay_and_unknown_user() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let ca = server.ca.ca_pem.display().to_string();
    let run = swaks(
        &smtp_addr(&server).to_string(),
        &[
            "-tls",
            "--tls-verify",
            "--tls-ca-path",
            &ca,
            "--tls-sni",
            "localhost",
            "--from",
            "sender@example.com",
            "--to",
            "joe@example.org,victim@elsewhere.test,nobody@example.org",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.dump());
    let ehlos = run.replies_to("EHLO");
    assert_eq!(ehlos.len(), 2, "before and after TLS: {}", run.dump());
    assert!(ehlos[0].text().contains("STARTTLS"));
    assert!(!ehlos[1].text().contains("STARTTLS"));
    assert_eq!(
        statuses(&run.replies_to("RCPT TO")),
        ["250 2.1.5", "550 5.7.1", "550 5.1.1"],
        "{}",
        run.dump()
    );
    assert_eq!(
        statuses(&run.data_replies()),
        ["250 2.0.0"],
        "{}",
        run.dump()
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let messages = rt.block_on(fetch_all(&server, "joe@example.org"));
    let (_, received, _) = split_trace(&messages[0]);
    assert!(received.contains("with ESMTPS"), "{received}");
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_before_250_loses_nothing_after_250_keeps_it() {
    // The binary, to kill -9.
    let mut server = Server::start_with(Options {
        process: true,
        ..Options::default()
    });
    server.with_user("joe@example.org");
    // Acknowledged, then the server dies at once: the message must be there.
    let mut c = Client::connect(server.lmtp.expect("lmtp")).await;
    c.cmd("LHLO mta.test").await;
    c.cmd("MAIL FROM:<a@b.test>").await;
    c.cmd("RCPT TO:<joe@example.org>").await;
    c.cmd("DATA").await;
    assert_reply(&c.cmd("Subject: acked\r\n\r\nkept\r\n.").await, "250 2.0.0");
    // Another one in the middle of its DATA, past one stored chunk.
    let mut d = Client::connect(server.lmtp.expect("lmtp")).await;
    d.cmd("LHLO mta.test").await;
    d.cmd("MAIL FROM:<a@b.test>").await;
    d.cmd("RCPT TO:<joe@example.org>").await;
    assert_reply(&d.cmd("DATA").await, "354");
    let line = format!("{}\r\n", "w".repeat(998));
    for _ in 0..200 {
        d.0.send(&line).await;
    }
    // Let the server take those bytes in (and store a chunk) before it dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill9();
    server.spawn();
    let messages = fetch_all(&server, "joe@example.org").await;
    assert_eq!(messages.len(), 1, "only the acknowledged message survives");
    assert!(messages[0].ends_with(b"Subject: acked\r\n\r\nkept\r\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn postmaster_is_accepted_for_every_hosted_domain() {
    let server = Server::start_with(Options {
        extra: "[delivery]\npostmaster = \"admin@example.org\"\n".into(),
        ..Options::default()
    });
    server.with_user("admin@example.org");
    server.with_user("postmaster@example.net");
    let mut c = Client::connect(smtp_addr(&server)).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@b.test>").await;
    // Bare <Postmaster> and postmaster@ a domain without its own account go to admin@;
    // example.net has its own postmaster; a foreign domain's postmaster is relaying.
    assert_reply(&c.cmd("RCPT TO:<Postmaster>").await, "250 2.1.5");
    assert_reply(
        &c.cmd("RCPT TO:<POSTMASTER@example.org>").await,
        "250 2.1.5",
    );
    assert_reply(
        &c.cmd("RCPT TO:<postmaster@example.net>").await,
        "250 2.1.5",
    );
    assert_reply(
        &c.cmd("RCPT TO:<postmaster@elsewhere.test>").await,
        "550 5.7.1",
    );
    assert_reply(&c.cmd("DATA").await, "354");
    assert_reply(
        &c.cmd("Subject: pm\r\n\r\nfor the postmaster\r\n.").await,
        "250",
    );
    // One copy for admin@ (both RCPTs led there), one for example.net's own postmaster.
    assert_eq!(fetch_all(&server, "admin@example.org").await.len(), 1);
    assert_eq!(fetch_all(&server, "postmaster@example.net").await.len(), 1);

    // Without delivery.postmaster, bare <postmaster> is refused as an unknown user.
    let plain = Server::start();
    plain.with_user("joe@example.org");
    let mut c = Client::connect(smtp_addr(&plain)).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@b.test>").await;
    assert_reply(&c.cmd("RCPT TO:<postmaster>").await, "550 5.1.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn domain_quota_counts_every_maildrop_of_the_domain() {
    let server = Server::start_with(Options {
        extra: "[delivery]\ndomain_quota_bytes = 3000\n".into(),
        ..Options::default()
    });
    server.with_user("joe@example.org");
    server.with_user("ann@example.org");
    server.with_user("kim@example.net");
    let body = format!("Subject: d\r\n\r\n{}\r\n", "d".repeat(1800));
    let lmtp = server.lmtp.expect("lmtp");
    for (rcpt, want) in [
        ("joe@example.org", "250 2.0.0"),
        ("ann@example.org", "452 4.2.2"),
        ("kim@example.net", "250 2.0.0"),
    ] {
        let mut c = Client::connect(lmtp).await;
        c.cmd("LHLO mta.test").await;
        c.cmd("MAIL FROM:<a@b.test>").await;
        assert_reply(&c.cmd(&format!("RCPT TO:<{rcpt}>")).await, "250");
        c.cmd("DATA").await;
        c.0.send(&body).await;
        assert_reply(&c.cmd(".").await, want);
    }
    // Room again once joe's message is deleted over POP3.
    let mut p = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    p.line().await;
    p.login("joe@example.org", crate::common::PASSWORD).await;
    p.cmd("DELE 1").await;
    assert!(p.cmd("QUIT").await.starts_with("+OK"));
    let mut c = Client::connect(lmtp).await;
    c.cmd("LHLO mta.test").await;
    c.cmd("MAIL FROM:<a@b.test>").await;
    c.cmd("RCPT TO:<ann@example.org>").await;
    c.cmd("DATA").await;
    c.0.send(&body).await;
    assert_reply(&c.cmd(".").await, "250 2.0.0");
}

fn sigterm(server: &Server) {
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(server.pid().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_data_finish_within_the_grace_period() {
    // The binary, to signal.
    let mut server = Server::start_with(Options {
        shutdown_grace_secs: 2,
        process: true,
        ..Options::default()
    });
    server.with_user("joe@example.org");
    let lmtp = server.lmtp.expect("lmtp");
    // One transaction finishes after SIGTERM, inside the grace period.
    let mut c = Client::connect(lmtp).await;
    c.cmd("LHLO mta.test").await;
    c.cmd("MAIL FROM:<a@b.test>").await;
    c.cmd("RCPT TO:<joe@example.org>").await;
    assert_reply(&c.cmd("DATA").await, "354");
    c.0.send("Subject: during shutdown\r\n\r\nfirst half\r\n")
        .await;
    // Another is idle between commands: it is told at once.
    let mut idle = Client::connect(lmtp).await;
    sigterm(&server);
    assert_reply(&idle.reply().await, "421 4.3.2");
    c.0.send("second half\r\n").await;
    assert_reply(&c.cmd(".").await, "250 2.0.0");
    // A third, mid-DATA when the grace period ends, is cut off and leaves nothing.
    let status = server.stop();
    assert!(status.success());
    server.spawn();
    let mut late = Client::connect(server.lmtp.expect("lmtp")).await;
    late.cmd("LHLO mta.test").await;
    late.cmd("MAIL FROM:<a@b.test>").await;
    late.cmd("RCPT TO:<joe@example.org>").await;
    assert_reply(&late.cmd("DATA").await, "354");
    late.0
        .send("Subject: too late\r\n\r\nnever finished\r\n")
        .await;
    sigterm(&server);
    let started = Instant::now();
    assert_reply(&late.reply().await, "421 4.3.2");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    server.stop();
    server.spawn();
    let messages = fetch_all(&server, "joe@example.org").await;
    assert_eq!(messages.len(), 1);
    assert!(messages[0].ends_with(b"first half\r\nsecond half\r\n"));
}
