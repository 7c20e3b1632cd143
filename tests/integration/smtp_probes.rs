//! Issue 14's defences at the doors: guessing recipients over SMTP is slowed down and
//! sent away (LMTP is not), LMTP takes only the addresses of `lmtp.allow_from`, each
//! listener has its own connection cap, the probes are answered while a flood holds the
//! metrics port, readiness outlives a Redis outage on a single server, the CLI never
//! opens stores a server holds, and what `serve` creates is private.

use crate::common::{self, free_port, pop3s, Options, Raw, Server};
use crate::metrics::{http_get, metric};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

const JOE: &str = "joe@example.org";

/// A strict set of recipient limits, so a test reaches them in a few commands.
fn strict() -> Options {
    Options {
        smtp_extra: "unknown_recipients_before_delay = 2\nunknown_recipient_delay_ms = 300\n\
                     max_unknown_recipients = 4\nmax_unknown_recipients_per_ip = 7\n"
            .into(),
        ..Options::default()
    }
}

async fn smtp(server: &Server) -> Raw {
    let mut c = Raw::plain(server.smtp.expect("smtp")).await;
    assert!(c.reply().await.starts_with("220 "));
    assert!(c.say("EHLO guesser.test").await.starts_with("250"));
    assert!(c.say("MAIL FROM:<a@guesser.test>").await.starts_with("250"));
    c
}

/// A RCPT and its reply, with how long the reply took.
async fn rcpt(c: &mut Raw, to: &str) -> (String, Duration) {
    let started = Instant::now();
    let r = c.say(&format!("RCPT TO:<{to}>")).await;
    (r, started.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn guessing_recipients_is_slowed_then_closed_and_rset_does_not_reset_it() {
    let server = Server::start_with(strict());
    server.with_user(JOE);
    let mut c = smtp(&server).await;
    // Two refusals at full speed (no lower bound to check), then each waits.
    for n in 1..=2 {
        let (r, _) = rcpt(&mut c, &format!("guess{n}@example.org")).await;
        assert!(r.starts_with("550 5.1.1"), "{r}");
    }
    assert!(c.say("RSET").await.starts_with("250"));
    assert!(c.say("MAIL FROM:<a@guesser.test>").await.starts_with("250"));
    let (r, took) = rcpt(&mut c, "guess3@example.org").await;
    assert!(r.starts_with("550 5.1.1"), "{r}");
    assert!(took >= Duration::from_millis(300), "not slowed: {took:?}");
    // A real account still answers 250 at once: only refusals cost.
    assert!(rcpt(&mut c, JOE).await.0.starts_with("250"));
    // The fourth refusal in the connection, RSET or not, is the last.
    let (r, _) = rcpt(&mut c, "guess4@example.org").await;
    assert!(r.starts_with("550 5.1.1"), "{r}");
    assert!(c.line().await.starts_with("421 4.7.0"));
    assert!(c.closed().await);

    // The address keeps its count: a new connection is slowed from its first refusal,
    // and sent away at the address's seventh.
    let mut c = smtp(&server).await;
    let (r, took) = rcpt(&mut c, "guess5@example.org").await;
    assert!(r.starts_with("550"), "{r}");
    assert!(took >= Duration::from_millis(300), "not slowed: {took:?}");
    rcpt(&mut c, "relay@elsewhere.test").await;
    let (r, _) = rcpt(&mut c, "guess7@example.org").await;
    assert!(r.starts_with("550"), "{r}");
    assert!(c.line().await.starts_with("421 4.7.0"));
    assert!(c.closed().await);

    // Past its limit the address gets 421 before any lookup, for real accounts too.
    let mut c = smtp(&server).await;
    assert!(rcpt(&mut c, JOE).await.0.starts_with("421 4.7.0"));
    assert!(c.closed().await);
    assert!(server
        .log_text()
        .contains("too many unknown recipients: closing"));
}

#[tokio::test(flavor = "multi_thread")]
async fn lmtp_from_the_mta_is_never_slowed_or_closed_for_unknown_users() {
    let server = Server::start_with(strict());
    server.with_user(JOE);
    let mut c = Raw::plain(server.lmtp.expect("lmtp")).await;
    assert!(c.reply().await.starts_with("220 "));
    assert!(c.say("LHLO mta.test").await.starts_with("250"));
    for round in 0..3 {
        assert!(c.say("MAIL FROM:<a@b.test>").await.starts_with("250"));
        for n in 0..10 {
            let (r, _) = rcpt(&mut c, &format!("gone{round}-{n}@example.org")).await;
            assert!(r.starts_with("550 5.1.1"), "{r}");
        }
        assert!(rcpt(&mut c, JOE).await.0.starts_with("250"));
        assert!(c.say("RSET").await.starts_with("250"));
    }
    assert!(c.say("QUIT").await.starts_with("221"));
}

#[tokio::test(flavor = "multi_thread")]
async fn lmtp_refuses_addresses_outside_allow_from() {
    let server = Server::start_with(Options {
        lmtp_extra: "allow_from = [\"10.0.0.0/8\", \"fd00::/8\"]\n".into(),
        ..Options::default()
    });
    let mut c = Raw::plain(server.lmtp.expect("lmtp")).await;
    assert!(c.line().await.starts_with("421 4.7.1"));
    assert!(c.closed().await);
    let labels = [("listener", "lmtp"), ("reason", "not_allowed")];
    assert_eq!(
        metric(
            server.metrics,
            "mailgate_connections_rejected_total",
            &labels
        ),
        1.0
    );
    server.wait_for_log("NotAllowed");
    // SMTP is not LMTP: its clients are everyone.
    let mut s = Raw::plain(server.smtp.expect("smtp")).await;
    assert!(s.reply().await.starts_with("220 "));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pop3_flood_leaves_lmtp_its_places() {
    let server = Server::start_with(Options {
        pop3_extra: "max_connections = 3\n".into(),
        limits_extra: "max_connections = 5\n".into(),
        ..Options::default()
    });
    server.with_user(JOE);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(pop3s(&server).await);
    }
    // POP3's cap is full (both ports share it), the global limit is not.
    let mut refused = Raw::plain(server.pop3).await;
    assert!(refused.line().await.starts_with("-ERR [SYS/TEMP]"));
    let mut lmtp = Raw::plain(server.lmtp.expect("lmtp")).await;
    assert!(lmtp.reply().await.starts_with("220 "));
    assert!(lmtp.say("LHLO mta.test").await.starts_with("250"));
    drop(held);
}

/// Opens `n` connections to the metrics port and sends nothing on them.
async fn hold(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    held
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_are_answered_while_a_flood_holds_the_metrics_port() {
    let server = Server::start();
    let base = format!("http://{}", server.metrics);
    let flood = hold(server.metrics, 64).await;
    // Let the accept loop take all of them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, body) = tokio::task::spawn_blocking({
        let url = format!("{base}/readyz");
        move || http_get(&url)
    })
    .await
    .expect("curl");
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (code, _) = tokio::task::spawn_blocking({
        let url = format!("{base}/healthz");
        move || http_get(&url)
    })
    .await
    .expect("curl");
    assert_eq!(code, 200);
    // The held-back places serve the probes only.
    let (code, body) = tokio::task::spawn_blocking({
        let url = format!("{base}/metrics");
        move || http_get(&url)
    })
    .await
    .expect("curl");
    assert_eq!(code, 503, "{body}");
    drop(flood);
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_outlives_redis_on_a_single_server_and_mail_still_comes_in() {
    let server = Server::start_with(Options {
        extra: format!(
            "[locks]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{}\"\nredis_timeout_ms = 200\n",
            free_port()
        ),
        ..Options::default()
    });
    server.with_user(JOE);
    let (code, body) = http_get(&format!("http://{}/readyz", server.metrics));
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ready, degraded: lock backend"), "{body}");
    assert_eq!(metric(server.metrics, "mailgate_ready", &[]), 1.0);
    let mut c = Raw::plain(server.lmtp.expect("lmtp")).await;
    assert!(c.reply().await.starts_with("220 "));
    assert!(c.say("LHLO mta.test").await.starts_with("250"));
    assert!(c.say("MAIL FROM:<a@b.test>").await.starts_with("250"));
    assert!(c.say(&format!("RCPT TO:<{JOE}>")).await.starts_with("250"));
    assert!(c.say("DATA").await.starts_with("354"));
    assert!(c
        .say("Subject: redis is down\r\n\r\nstill here\r\n.")
        .await
        .starts_with("250"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_never_opens_stores_a_running_server_holds() {
    let server = Server::start();
    server.with_user(JOE);
    std::fs::remove_file(server.dir.path().join("data/admin.sock")).expect("remove socket");
    let out = server.cli(&["domain", "add", "new.test"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(
        stderr.contains("in use by another mailgate process"),
        "{stderr}"
    );
    assert!(!server.dir.path().join("data/domains/new.test").exists());
}

/// The modes of everything under `dir` that grants group or others anything.
fn shared_files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let entry = entry.expect("entry");
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                todo.push(entry.path());
            }
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                out.push(format!("{} {mode:o}", entry.path().display()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_keeps_the_data_dir_and_what_it_creates_private() {
    let mut server = Server::start_with(Options {
        process: true,
        ..Options::default()
    });
    assert!(server.stop().success());
    let data = server.dir.path().join("data");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = server.cli(&["check-config"], b"");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("data_dir: warning: mode 0755 lets any user list it"),
        "{stdout}"
    );
    server.spawn();
    let mode = std::fs::metadata(&data).expect("data").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o750);
    server.with_user(JOE);
    server.deliver(JOE, &common::message("private", 3));
    let shared = shared_files(&data);
    assert!(shared.is_empty(), "readable by others: {shared:?}");
}
