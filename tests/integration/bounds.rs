//! Bounded under attack (issue 14): what a hostile POP3 client can make the server hold
//! or keep, and what it is told.

use crate::common::{logged_in, Options, Server};
use mailgate::store::{Directory, StoreOptions};
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Puts `count` small messages in `local@domain`'s maildrop through the library, while
/// the server is stopped; the expected LIST and UIDL listings (without status lines).
fn fill_maildrop(server: &Server, domain: &str, local: &str, count: usize) -> (Vec<u8>, Vec<u8>) {
    let dir = Directory::open(
        &server.dir.path().join("data"),
        StoreOptions {
            cache_capacity: 64 * 1024 * 1024,
            idle_close: Duration::from_secs(60),
        },
    )
    .expect("open data dir");
    let store = dir.domain(domain).expect("domain");
    for i in 0..count {
        let mut m = store.begin_message(local).expect("begin");
        let body = format!("Subject: m{i}\r\n\r\n{}\r\n", "x".repeat(i % 50));
        m.write(&store, body.as_bytes()).expect("write");
        m.commit(&store).expect("commit");
    }
    let nonce = store
        .account(local)
        .expect("read")
        .expect("account")
        .uid_nonce;
    let (mut list, mut uidl) = (Vec::new(), Vec::new());
    for (n, m) in store.snapshot(local).expect("snapshot").iter().enumerate() {
        list.extend_from_slice(format!("{} {}\r\n", n + 1, m.octets).as_bytes());
        uidl.extend_from_slice(
            format!("{} {}\r\n", n + 1, mailgate::wire::uidl(nonce, m.id)).as_bytes(),
        );
    }
    dir.flush_all().expect("flush");
    (list, uidl)
}

/// Many pipelined UIDL and LIST commands over a 20 000-message maildrop, whose answers
/// the client never reads, leave the server's RSS within a few MiB: listings are sent in
/// 32 KiB pieces, each waiting for the socket. A client that reads gets them byte-exact.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_listings_nobody_reads_keep_memory_bounded() {
    const MESSAGES: usize = 20_000;
    const PIPELINED: usize = 400;
    let mut server = Server::start_with(Options {
        process: true,
        ..Options::default()
    });
    server.with_user("joe@example.org");
    assert!(server.stop().success());
    let filled = Instant::now();
    let (list, uidl) = fill_maildrop(&server, "example.org", "joe", MESSAGES);
    eprintln!("{MESSAGES} messages stored in {:?}", filled.elapsed());
    server.spawn();

    // A client that reads gets every listing byte for byte, also when pipelined.
    let mut c = logged_in(&server, "joe@example.org").await;
    c.send("UIDL\r\nLIST\r\nUIDL\r\n").await;
    for (status, body) in [
        ("+OK\r\n".to_owned(), &uidl),
        (format!("+OK {MESSAGES} messages"), &list),
        ("+OK\r\n".to_owned(), &uidl),
    ] {
        let line = c.line().await;
        assert!(line.starts_with(&status), "{line}");
        let got = c.multiline_raw().await;
        assert_eq!(got.len(), body.len() + 3);
        assert!(
            got[..body.len()] == body[..] && got.ends_with(b".\r\n"),
            "listing differs"
        );
    }
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    drop(c);

    let pid = server.pid();
    let before = rss_kib(pid);
    let mut c = logged_in(&server, "joe@example.org").await;
    let mut pipeline = String::new();
    for i in 0..PIPELINED {
        pipeline.push_str(if i % 2 == 0 { "UIDL\r\n" } else { "LIST\r\n" });
    }
    c.send(&pipeline).await;
    // Bounded: 3 s of sampling, never reading.
    let mut peak = before;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let growth_mib = peak.saturating_sub(before) as f64 / 1024.0;
    eprintln!("RSS before {before} KiB, peak {peak} KiB, growth {growth_mib:.1} MiB");
    assert!(growth_mib < 16.0, "RSS grew by {growth_mib:.1} MiB");
    // The session still works: the first answers are whole.
    for i in 0..4 {
        let line = c.line().await;
        assert!(line.starts_with("+OK"), "{line}");
        let got = c.multiline_raw().await;
        let body = if i % 2 == 0 { &uidl } else { &list };
        assert!(got[..body.len()] == body[..], "listing {i} differs");
    }
}
