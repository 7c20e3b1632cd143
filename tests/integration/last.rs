//! LAST (RFC 1460) with `pop3.last = true`: seen marks kept in the store across sessions
//! and restarts, written at UPDATE only; and clients that keep mail on the server
//! (LAST-based, UIDL-based, fetchmail, mpop) polling twice fetch nothing twice.

use crate::common::{
    count_subjects, fetchmail, message, python, require_tool, write_private, Options, Raw, Server,
    PASSWORD,
};
use std::process::Command;

const JOE: &str = "joe@example.org";

fn last_server() -> Server {
    let server = Server::start_with(Options {
        last: true,
        ..Options::default()
    });
    server.with_user(JOE);
    server
}

async fn session(server: &Server) -> Raw {
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    assert!(c.line().await.starts_with("+OK"));
    let r = c.login(JOE, PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
    c
}

/// LAST in a new session.
async fn last(server: &Server) -> String {
    let mut c = session(server).await;
    let r = c.cmd("LAST").await;
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    r
}

async fn retr(c: &mut Raw, n: u32) {
    assert!(c.cmd(&format!("RETR {n}")).await.starts_with("+OK"));
    c.multiline().await;
}

#[tokio::test]
async fn last_counts_what_earlier_sessions_retrieved() {
    let mut server = last_server();
    for i in 1..=5 {
        server.deliver(JOE, &message(&format!("m{i}"), 3));
    }
    assert_eq!(last(&server).await, "+OK 0\r\n");
    // Retrieve 2 of 5 and QUIT: the marks are written at UPDATE.
    let mut c = session(&server).await;
    retr(&mut c, 1).await;
    retr(&mut c, 2).await;
    assert_eq!(c.cmd("LAST").await, "+OK 2\r\n");
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out\r\n");
    assert_eq!(last(&server).await, "+OK 2\r\n");

    // A dropped connection changes nothing.
    let mut c = session(&server).await;
    retr(&mut c, 3).await;
    drop(c);
    server.wait_active("pop3s", 0).await;
    assert_eq!(last(&server).await, "+OK 2\r\n");

    // TOP of part of a message is not a retrieval; TOP of all of it is.
    let mut c = session(&server).await;
    assert!(c.cmd("TOP 4 0").await.starts_with("+OK"));
    c.multiline().await;
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert_eq!(last(&server).await, "+OK 2\r\n");
    let mut c = session(&server).await;
    assert!(c.cmd("TOP 4 99").await.starts_with("+OK"));
    c.multiline().await;
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert_eq!(last(&server).await, "+OK 4\r\n");

    // RSET returns LAST to its value at login, and so does what QUIT writes.
    let mut c = session(&server).await;
    retr(&mut c, 5).await;
    assert_eq!(c.cmd("LAST").await, "+OK 5\r\n");
    assert!(c.cmd("RSET").await.starts_with("+OK"));
    assert_eq!(c.cmd("LAST").await, "+OK 4\r\n");
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert_eq!(last(&server).await, "+OK 4\r\n");

    // Kept across a restart.
    assert!(server.stop().success());
    server.spawn();
    assert_eq!(last(&server).await, "+OK 4\r\n");

    // Deleting renumbers: seen were 1, 2, 4 of 5; without message 1 they are 1 and 3 of 4.
    let mut c = session(&server).await;
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    assert_eq!(c.cmd("LAST").await, "+OK 4\r\n");
    assert!(c.cmd("DELE 4").await.starts_with("+OK"));
    assert_eq!(c.cmd("LAST").await, "+OK 2\r\n");
    assert!(c.cmd("RSET").await.starts_with("+OK"));
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    assert!(c
        .cmd("QUIT")
        .await
        .starts_with("+OK Logging out, 1 messages deleted"));
    let mut c = session(&server).await;
    assert!(c.cmd("STAT").await.starts_with("+OK 4 "));
    assert_eq!(c.cmd("LAST").await, "+OK 3\r\n");
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
}

#[tokio::test]
async fn with_last_off_nothing_is_marked() {
    let server = Server::start();
    server.with_user(JOE);
    server.deliver(JOE, &message("m1", 1));
    let mut c = session(&server).await;
    retr(&mut c, 1).await;
    assert!(c.cmd("LAST").await.starts_with("-ERR"));
    // No deletion and no mark to write: UPDATE has nothing to do.
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out\r\n");
}

/// Runs `tests/clients/keep_poll.py` once: (how it chose, subjects fetched).
fn keep_poll(server: &Server, state: &std::path::Path) -> (String, Vec<String>) {
    let out = python(
        "keep_poll.py",
        &[
            "localhost",
            &server.pop3s.port().to_string(),
            &server.ca.ca_pem.display().to_string(),
            JOE,
            PASSWORD,
            &state.display().to_string(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let fetched = v["fetched"]
        .as_array()
        .expect("fetched")
        .iter()
        .map(|s| s.as_str().expect("subject").to_owned())
        .collect();
    (v["mode"].as_str().expect("mode").to_owned(), fetched)
}

/// fetchmail keeping mail, UIDs remembered in its idfile: the number of new messages.
fn fetchmail_keep(server: &Server) -> String {
    let dir = server.dir.path();
    let rc = dir.join("fetchmailrc-keep");
    let text = format!(
        "set no bouncemail\npoll localhost port {port} protocol pop3 uidl\n  user \"{JOE}\" there with password \"{PASSWORD}\" is root here\n  ssl sslcertck sslcertfile \"{ca}\" keep\n  mda \"/bin/sh -c 'cat >> {mbox}'\"\n",
        port = server.pop3s.port(),
        ca = server.ca.ca_pem.display(),
        mbox = dir.join("fetchmail-keep.mbox").display(),
    );
    write_private(&rc, &text);
    let out = fetchmail(&rc, dir);
    // 0: mail fetched; 1: no new mail.
    assert!(matches!(out.status.code(), Some(0 | 1)), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    stdout
}

/// mpop keeping mail with --only-new: its log of what it retrieved.
fn mpop_keep(server: &Server) -> String {
    require_tool("mpop");
    let dir = server.dir.path();
    let mbox = dir.join("mpop-keep.mbox");
    if !mbox.exists() {
        std::fs::write(&mbox, "").expect("mbox");
    }
    let out = Command::new("mpop")
        .arg("--host=localhost")
        .arg(format!("--port={}", server.pop3s.port()))
        .args(["--tls=on", "--tls-starttls=off", "--auth=plain"])
        .arg(format!("--user={JOE}"))
        .arg(format!("--passwordeval=echo '{PASSWORD}'"))
        .arg(format!("--tls-trust-file={}", server.ca.ca_pem.display()))
        .arg(format!("--delivery=mbox,{}", mbox.display()))
        .arg(format!(
            "--uidls-file={}",
            dir.join("mpop-keep-uidls").display()
        ))
        .args(["--keep=on", "--only-new=on"])
        .env("HOME", dir)
        .output()
        .expect("mpop");
    assert!(out.status.success(), "mpop: {out:?}");
    std::fs::read_to_string(&mbox).expect("mbox")
}

#[test]
fn clients_keeping_mail_fetch_each_message_once() {
    for last in [false, true] {
        let server = Server::start_with(Options {
            last,
            ..Options::default()
        });
        server.with_user(JOE);
        server.deliver(JOE, &message("first", 1));
        server.deliver(JOE, &message("second", 1));
        let mode = if last { "last" } else { "uidl" };
        let state = server.dir.path().join("keep-poll-uids");
        let first = keep_poll(&server, &state);
        assert_eq!(
            first,
            (mode.to_owned(), vec!["first".into(), "second".into()])
        );
        assert_eq!(
            keep_poll(&server, &state),
            (mode.to_owned(), vec![]),
            "last={last}"
        );
        let fetched = fetchmail_keep(&server);
        assert!(fetched.contains("2 messages for"), "{fetched}");
        let again = fetchmail_keep(&server);
        assert!(again.contains("2 messages (2 seen)"), "{again}");
        let mbox = mpop_keep(&server);
        assert_eq!(
            (
                count_subjects(&mbox, "first"),
                count_subjects(&mbox, "second")
            ),
            (1, 1)
        );
        let mbox = mpop_keep(&server);
        assert_eq!(
            (
                count_subjects(&mbox, "first"),
                count_subjects(&mbox, "second")
            ),
            (1, 1)
        );
        // A new message is fetched once, by each client.
        server.deliver(JOE, &message("third", 1));
        assert_eq!(
            keep_poll(&server, &state),
            (mode.to_owned(), vec!["third".into()])
        );
        assert_eq!(keep_poll(&server, &state), (mode.to_owned(), vec![]));
        let fetched = fetchmail_keep(&server);
        assert!(fetched.contains("3 messages (2 seen)"), "{fetched}");
        let mbox = mpop_keep(&server);
        assert_eq!(count_subjects(&mbox, "third"), 1);
        let mbox = mpop_keep(&server);
        assert_eq!(count_subjects(&mbox, "third"), 1, "last={last}");
    }
}
