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

/// Messages imported with stored UIDLs (`DomainStore::begin_import`, written while the
/// server is stopped) are listed over POP3S with those UIDLs, byte-exact, in import
/// order; mail delivered afterwards gets mailgate's own UIDLs; UIDL n, LIST and a
/// deletion at UPDATE work on them, and the deleted one's UIDL is gone after a restart.
#[tokio::test]
async fn imported_messages_show_their_stored_uidls_over_pop3() {
    let mut server = Server::start();
    server.with_user("joe@example.org");
    assert!(server.stop().success());
    let imported: [(&str, &[u8]); 2] = [
        ("000000010000002a", b"Subject: one\r\n\r\nfirst\r\n"),
        (
            "<dovecot-2@example.org>",
            b"Subject: two\r\n\r\n.second\r\n",
        ),
    ];
    {
        let directory = mailgate::store::Directory::open(
            &server.dir.path().join("data"),
            mailgate::store::StoreOptions::default(),
        )
        .expect("open data dir");
        let store = directory.domain("example.org").expect("domain");
        for (uidl, body) in imported {
            let mut m = store
                .begin_import("joe", uidl)
                .expect("begin")
                .expect("new");
            m.write(&store, body).expect("write");
            m.commit(&store).expect("commit");
        }
        assert!(store
            .begin_import("joe", imported[0].0)
            .expect("again")
            .is_none());
    }
    server.spawn();
    server.deliver("joe@example.org", b"Subject: three\r\n\r\nthird\r\n");

    let mut c = crate::common::logged_in(&server, "joe@example.org").await;
    assert_eq!(c.cmd("UIDL").await, "+OK\r\n");
    let listing = String::from_utf8(c.multiline_raw().await).expect("utf8");
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines[0], "1 000000010000002a", "{listing}");
    assert_eq!(lines[1], "2 <dovecot-2@example.org>", "{listing}");
    let own = lines[2].strip_prefix("3 ").expect("third");
    assert!(
        own.len() == 24 && own.bytes().all(|b| b.is_ascii_hexdigit()),
        "{listing}"
    );
    assert_eq!(lines.len(), 4, "{listing}");
    assert_eq!(c.cmd("UIDL 2").await, "+OK 2 <dovecot-2@example.org>\r\n");
    for (n, (_, body)) in imported.iter().enumerate() {
        assert_eq!(
            c.cmd(&format!("LIST {}", n + 1)).await,
            format!("+OK {} {}\r\n", n + 1, body.len())
        );
        assert!(c.cmd(&format!("RETR {}", n + 1)).await.starts_with("+OK"));
        assert_eq!(c.multiline().await, body.to_vec());
    }
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));

    assert!(server.stop().success());
    server.spawn();
    let mut c = crate::common::logged_in(&server, "joe@example.org").await;
    assert_eq!(c.cmd("UIDL").await, "+OK\r\n");
    let listing = String::from_utf8(c.multiline_raw().await).expect("utf8");
    assert!(
        listing.starts_with("1 <dovecot-2@example.org>\r\n2 "),
        "{listing}"
    );
    assert!(!listing.contains("000000010000002a"), "{listing}");
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
}
