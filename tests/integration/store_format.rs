//! A domain store written by the release before store format versions (format 1, kept in
//! `tests/fixtures/store-v1.tar.gz` with what its POP3 service showed in
//! `store-v1.json`) opens in today's server, is upgraded in place once, and keeps every
//! message, size and UIDL; seen marks then work on it.

use crate::common::{hex_sha256, require_tool, Options, Raw, Server, PASSWORD};
use std::path::Path;
use std::process::Command;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// (UIDL lines, (size, SHA-256) of each message as RETR sends it, unstuffed).
async fn listing(server: &Server, user: &str) -> (Vec<String>, Vec<(u64, String)>) {
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    c.line().await;
    let r = c.login(user, PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
    assert_eq!(c.cmd("UIDL").await, "+OK\r\n");
    let raw = String::from_utf8(c.multiline_raw().await).expect("utf8");
    let uidl: Vec<String> = raw
        .lines()
        .filter(|l| *l != ".")
        .map(str::to_owned)
        .collect();
    let mut messages = Vec::new();
    for n in 1..=uidl.len() {
        assert!(c.cmd(&format!("RETR {n}")).await.starts_with("+OK"));
        let body = c.multiline().await;
        messages.push((body.len() as u64, hex_sha256(&body)));
    }
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    (uidl, messages)
}

#[tokio::test]
async fn a_store_of_the_previous_format_is_upgraded_and_keeps_every_uidl() {
    require_tool("tar");
    let mut server = Server::start_with(Options {
        last: true,
        ..Options::default()
    });
    assert!(server.stop().success());
    let domains = server.dir.path().join("data/domains");
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(fixture("store-v1.tar.gz"))
        .arg("-C")
        .arg(&domains)
        .status()
        .expect("tar");
    assert!(status.success());
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("store-v1.json")).expect("expected listing"),
    )
    .expect("json");
    server.spawn();
    let upgraded = |log: &str| log.matches("store format upgraded").count();
    for user in ["joe@example.org", "ann@example.org"] {
        let (uidl, messages) = listing(&server, user).await;
        let want_uidl: Vec<String> = expected[user]["uidl"]
            .as_array()
            .expect("uidl")
            .iter()
            .map(|u| u.as_str().expect("uid").to_owned())
            .collect();
        assert_eq!(uidl, want_uidl, "{user}");
        let want: Vec<(u64, String)> = expected[user]["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                let size = m[0].as_u64().expect("size");
                (size, m[1].as_str().expect("sha256").to_owned())
            })
            .collect();
        assert_eq!(messages, want, "{user}");
    }
    assert_eq!(upgraded(&server.log_text()), 1, "{}", server.log_text());
    let line = server
        .log_text()
        .lines()
        .find(|l| l.contains("store format upgraded"))
        .map(str::to_owned)
        .expect("upgrade logged");
    assert!(line.contains("from=1 to=4 messages=5"), "{line}");

    // The RETRs above marked everything seen; a restart neither upgrades again nor
    // forgets.
    assert!(server.stop().success());
    server.spawn();
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    c.line().await;
    assert!(c
        .login("joe@example.org", PASSWORD)
        .await
        .starts_with("+OK"));
    assert_eq!(c.cmd("LAST").await, "+OK 4\r\n");
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert_eq!(upgraded(&server.log_text()), 1);
}
