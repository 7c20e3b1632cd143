//! Postfix from Debian, run privately by the test, relays into mailgate over LMTP (TCP and
//! unix socket) for several domains. Also the Postfix and swaks harness itself: instances
//! start side by side, answer SMTP with STARTTLS that swaks verifies, refuse to relay, and
//! queue and quickly retry mail while their LMTP target is down.

use crate::common::postfix::{Postfix, HOSTNAME};
use crate::common::swaks::swaks;
use crate::common::{fetch_all, free_port, Options, Server};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);
/// How long Postfix may take to retry a deferred message with the test's 1-2 s backoff.
const RETRY_WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn postfix_relays_into_mailgate_over_lmtp() {
    let sockets = tempfile::tempdir().expect("socket dir");
    // Postfix's lmtp client runs as user postfix: it must reach the socket's directory,
    // and the socket is made for group postfix (`lmtp.socket_group`), mode 0660.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(sockets.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod socket dir");
    let socket = sockets.path().join("lmtp.sock");
    let unix = format!("unix:{}", socket.display());
    for lmtp_listen in [None, Some(unix.clone())] {
        let server = Server::start_with(Options {
            lmtp_listen: lmtp_listen.clone(),
            lmtp_socket_group: "postfix".into(),
            ..Options::default()
        });
        server.with_user("joe@example.org");
        server.with_user("ann@example.net");
        let target = match server.lmtp {
            Some(addr) => addr.to_string(),
            None => unix.clone(),
        };
        let pf = Postfix::start(&target, &["example.org", "example.net"]);
        // A dot line, 8-bit text and a long body arrive as sent.
        let mut message =
            "Subject: relayed\r\n\r\n.leading dot\r\n8-bit: caf\u{e9}\r\n".to_string();
        for i in 0..500 {
            message.push_str(&format!("line {i} of the body\r\n"));
        }
        let id = pf.send(
            "sender@example.com",
            &["joe@example.org", "ann@example.net", "nobody@example.org"],
            message.as_bytes(),
        );
        for rcpt in ["joe@example.org", "ann@example.net"] {
            let line = pf.wait_for_log(&format!("{id}: to=<{rcpt}>"), WAIT);
            assert!(line.contains("status=sent (250 2.0.0"), "{target}: {line}");
        }
        // An unknown user is refused at LMTP's RCPT, so Postfix bounces at once.
        let line = pf.wait_for_log(&format!("{id}: to=<nobody@example.org>"), WAIT);
        assert!(line.contains("status=bounced"), "{target}: {line}");
        assert!(line.contains("550 5.1.1"), "{target}: {line}");
        pf.wait_for_log(&format!("{id}: removed"), WAIT);
        assert!(pf.queue().is_empty(), "{target}: {:?}", pf.queue());

        // A 250 means stored: both maildrops hold the message behind the trace headers
        // (mailgate's Return-Path and Received, then Postfix's Received).
        for rcpt in ["joe@example.org", "ann@example.net"] {
            let stored = fetch_all(&server, rcpt).await;
            assert_eq!(stored.len(), 1, "{target}: {rcpt}");
            let stored = String::from_utf8_lossy(&stored[0]).into_owned();
            let trace = stored
                .strip_suffix(message.as_str())
                .unwrap_or_else(|| panic!("{target}: {rcpt} got:\n{stored}"));
            assert!(
                trace.starts_with("Return-Path: <sender@example.com>\r\nReceived: from "),
                "{target}: {trace}"
            );
            assert!(
                trace.contains("by mail.test (mailgate) with LMTP"),
                "{trace}"
            );
            assert!(
                trace.contains(&format!("by {HOSTNAME} (Postfix) with ESMTP id {id}")),
                "{trace}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postfix_delivers_to_mailgate_as_mx_over_starttls() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let target = format!("smtp:{}", server.smtp.expect("smtp listener"));
    let pf = Postfix::start(&target, &["example.org"]);
    let message = "Subject: via MX\r\n\r\n.dot line\r\nbody\r\n";
    let id = pf.send(
        "sender@example.com",
        &["joe@example.org", "nobody@example.org"],
        message.as_bytes(),
    );
    let line = pf.wait_for_log(&format!("{id}: to=<joe@example.org>"), WAIT);
    assert!(line.contains("status=sent (250 2.0.0"), "{line}");
    let line = pf.wait_for_log(&format!("{id}: to=<nobody@example.org>"), WAIT);
    assert!(
        line.contains("status=bounced") && line.contains("550 5.1.1"),
        "{line}"
    );
    // Postfix logs the TLS session it set up with mailgate.
    let log = pf.log();
    assert!(
        log.contains("TLS connection established to 127.0.0.1"),
        "{log}"
    );
    let stored = fetch_all(&server, "joe@example.org").await;
    assert_eq!(stored.len(), 1);
    let stored = String::from_utf8_lossy(&stored[0]).into_owned();
    assert!(stored.ends_with(message), "{stored}");
    assert!(
        stored.contains("by mail.test (mailgate) with ESMTPS id"),
        "{stored}"
    );
}

#[test]
fn postfix_instance_starts_and_accepts_smtp() {
    // Nothing listens on the LMTP targets: this test stops at Postfix's queue.
    let a = Postfix::start(&format!("127.0.0.1:{}", free_port()), &["example.org"]);
    let b = Postfix::start(
        &format!("127.0.0.1:{}", free_port()),
        &["example.org", "example.net"],
    );
    assert_ne!(a.smtp_addr(), b.smtp_addr());
    assert_ne!(a.config_dir(), b.config_dir());
    for pf in [&a, &b] {
        assert!(pf.status(), "postfix status; log:\n{}", pf.log());
        let stream = TcpStream::connect(pf.smtp_addr()).expect("connect smtpd");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut greeting = String::new();
        BufReader::new(stream)
            .read_line(&mut greeting)
            .expect("greeting");
        assert_eq!(greeting, format!("220 {HOSTNAME} ESMTP\r\n"));
    }

    // STARTTLS with the certificate verified against the instance's CA; a hosted
    // recipient is accepted and a foreign one refused, then the message is queued.
    let ca = a.ca_pem().display().to_string();
    let run = swaks(
        &a.smtp_addr().to_string(),
        &[
            "-tls",
            "--tls-verify",
            "--tls-ca-path",
            &ca,
            "--tls-sni",
            HOSTNAME,
            "--from",
            "sender@example.com",
            "--to",
            "joe@example.org,eve@elsewhere.test",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert!(run.transcript.contains("=== TLS started"), "{}", run.dump());
    assert_eq!(
        run.replies_to("STARTTLS")
            .iter()
            .map(|r| r.code)
            .collect::<Vec<_>>(),
        [220]
    );
    let rcpt = run.replies_to("RCPT TO");
    assert_eq!(rcpt.len(), 2, "{}", run.dump());
    assert_eq!(rcpt[0].code, 250, "{}", run.dump());
    assert_eq!(rcpt[1].code, 554, "{}", run.dump());
    assert!(rcpt[1].text().contains("Relay access denied"), "{rcpt:?}");
    let data = run.data_replies();
    assert_eq!(data.len(), 1, "{}", run.dump());
    assert_eq!(data[0].code, 250);
    let id = data[0]
        .text()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    a.wait_for_log(&format!("{id}: to=<joe@example.org>"), WAIT);
    assert!(!a.log().contains("eve@elsewhere.test>, relay"));

    // Stopped on drop: the port no longer answers.
    let addr = a.smtp_addr();
    drop(a);
    assert!(
        TcpStream::connect(addr).is_err(),
        "smtpd still up after drop"
    );
    assert!(b.status(), "stopping one instance stopped the other");
}

#[test]
fn postfix_defers_and_retries_while_lmtp_target_is_down() {
    let sockets = tempfile::tempdir().expect("socket dir");
    let unix = format!("unix:{}", sockets.path().join("lmtp.sock").display());
    let targets = [
        (format!("127.0.0.1:{}", free_port()), "Connection refused"),
        (format!("[::1]:{}", free_port()), "Connection refused"),
        (unix, "No such file or directory"),
    ];
    let instances: Vec<Postfix> = targets
        .iter()
        .map(|(target, _)| Postfix::start(target, &["example.org", "example.net"]))
        .collect();
    let message = b"Subject: deferred\r\n\r\n.leading dot\r\nbody\r\n";
    let ids: Vec<String> = instances
        .iter()
        .map(|pf| {
            pf.send(
                "sender@example.com",
                &["joe@example.org", "ann@example.net"],
                message,
            )
        })
        .collect();
    for ((pf, id), (target, reason)) in instances.iter().zip(&ids).zip(&targets) {
        let line = pf.wait_for_log(&format!("{id}: to=<joe@example.org>"), WAIT);
        assert!(line.contains("status=deferred"), "{target}: {line}");
        assert!(line.contains(reason), "{target}: {line}");

        // Retried within seconds, not after the default minutes of backoff (the bound is
        // generous: a loaded CI host can starve qmgr for a while).
        let deadline = Instant::now() + RETRY_WAIT;
        while pf
            .log()
            .lines()
            .filter(|l| l.contains(&format!("{id}: to=<joe@example.org>")))
            .count()
            < 2
        {
            assert!(
                Instant::now() < deadline,
                "{target}: no retry; log:\n{}",
                pf.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }

        let queue = pf.queue();
        assert_eq!(queue.len(), 1, "{target}: {queue:?}");
        assert_eq!(&queue[0].queue_id, id);
        assert!(
            ["deferred", "active"].contains(&queue[0].queue_name.as_str()),
            "{queue:?}"
        );
        if queue[0].queue_name == "deferred" {
            for (rcpt, why) in &queue[0].recipients {
                assert!(why.contains(reason), "{target}: {rcpt}: {why}");
            }
        }
        let mut rcpts: Vec<&str> = queue[0]
            .recipients
            .iter()
            .map(|(a, _)| a.as_str())
            .collect();
        rcpts.sort();
        assert_eq!(rcpts, ["ann@example.net", "joe@example.org"]);
    }
}
