//! Bounded under attack (issue 14): what a hostile POP3 client can make the server hold
//! or keep, and what it is told.

use crate::common::cluster::{replica_name, Cluster, ClusterOptions};
use crate::common::redis_server::Resp;
use crate::common::{logged_in, pop3s, python, rss_kib, Options, Raw, Server, PASSWORD};
use base64::Engine as _;
use mailgate::store::{Directory, StoreOptions};
use std::time::{Duration, Instant};

/// Puts `count` small messages in `local@domain`'s maildrop through the library, while
/// the server is stopped; the expected LIST and UIDL listings (without status lines).
fn fill_maildrop(server: &Server, domain: &str, local: &str, count: usize) -> (Vec<u8>, Vec<u8>) {
    let dir = Directory::open(
        &server.dir.path().join("data"),
        StoreOptions {
            cache_capacity: 64 * 1024 * 1024,
            idle_close: Duration::from_secs(60),
            ..StoreOptions::default()
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

fn proxied(opts: Options) -> Server {
    Server::start_with(Options {
        allow_plaintext_auth: true,
        extra: "[proxy_protocol]\nlisteners = [\"pop3\"]\ntrusted_networks = [\"127.0.0.1\"]\n"
            .into(),
        ..opts
    })
}

/// A cleartext POP3 connection whose PROXY v1 header names `client`, and its first line
/// (the greeting, or the refusal).
async fn from(server: &Server, client: &str) -> (Raw, String) {
    let family = if client.contains(':') { "TCP6" } else { "TCP4" };
    let dest = if client.contains(':') {
        "::1"
    } else {
        "127.0.0.1"
    };
    let header = format!("PROXY {family} {client} {dest} 40000 110\r\n");
    let mut c = Raw::plain_after(server.pop3, header.as_bytes()).await;
    let greeting = c.line().await;
    (c, greeting)
}

/// The per-IP connection limit counts an IPv6 client's /64 as one client, and an
/// IPv4-mapped address as the IPv4 address it maps.
#[tokio::test(flavor = "multi_thread")]
async fn per_ip_limit_groups_ipv6_by_prefix_and_maps_ipv4() {
    let server = proxied(Options {
        max_connections_per_ip: 1,
        ..Options::default()
    });
    let (_v4, g) = from(&server, "192.0.2.7").await;
    assert!(g.starts_with("+OK"), "{g}");
    let (_, g) = from(&server, "::ffff:192.0.2.7").await;
    assert!(
        g.starts_with("-ERR [SYS/TEMP] Too many connections from your address"),
        "the mapped address is the same client: {g}"
    );
    let (_v6, g) = from(&server, "2001:db8:1:2::1").await;
    assert!(g.starts_with("+OK"), "{g}");
    let (_, g) = from(&server, "2001:db8:1:2:ffff:ffff:ffff:fffe").await;
    assert!(
        g.starts_with("-ERR [SYS/TEMP] Too many connections from your address"),
        "another address of the same /64: {g}"
    );
    let (_next, g) = from(&server, "2001:db8:1:3::1").await;
    assert!(g.starts_with("+OK"), "the next /64 is another client: {g}");
}

/// A session that does not log in within `login_timeout_secs` is told so and closed,
/// however often it sends CAPA, and also in the middle of a SASL exchange; a session
/// that logged in is not affected.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_not_logged_in_by_the_deadline_are_closed() {
    let server = Server::start_with(Options {
        login_timeout_secs: Some(2),
        ..Options::default()
    });
    server.with_user("joe@example.org");
    let started = Instant::now();
    let mut busy = pop3s(&server).await;
    let mut capas = 0;
    let end = loop {
        busy.send("CAPA\r\n").await;
        let line = busy.line().await;
        if !line.starts_with("+OK") {
            break line;
        }
        busy.multiline_raw().await;
        capas += 1;
        assert!(started.elapsed() < Duration::from_secs(15), "never closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(end, "-ERR Login time limit reached, closing connection\r\n");
    assert!(capas >= 3, "CAPA was answered until the deadline ({capas})");
    assert!(busy.closed().await);

    // Waiting for a SASL response does not stretch it.
    let mut sasl = pop3s(&server).await;
    assert_eq!(sasl.cmd("AUTH PLAIN").await, "+ \r\n");
    assert_eq!(
        sasl.line().await,
        "-ERR Login time limit reached, closing connection\r\n"
    );
    assert!(sasl.closed().await);

    let mut c = logged_in(&server, "joe@example.org").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(c.cmd("NOOP").await.starts_with("+OK"));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    server.wait_for_log("outcome=\"timeout\"");
}

/// Every failed login is logged at info with the client's address (the one a PROXY
/// header named, IPv4-mapped shown as IPv4), the name, the mechanism and the reason
/// class, in a form a fail2ban filter can match; the password never is.
#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_are_logged_without_the_password() {
    const SECRET: &str = "Tr0ub4dor&3-never-logged";
    let server = proxied(Options {
        max_auth_failures_per_ip: 3,
        ..Options::default()
    });
    server.with_user("joe@example.org");
    let (mut c, _) = from(&server, "::ffff:192.0.2.7").await;
    assert!(c.cmd("USER joe@example.org").await.starts_with("+OK"));
    assert!(c
        .cmd(&format!("PASS {SECRET}"))
        .await
        .starts_with("-ERR [AUTH]"));
    let plain =
        base64::engine::general_purpose::STANDARD.encode(format!("\0ghost@example.org\0{SECRET}"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {plain}"))
        .await
        .starts_with("-ERR [AUTH]"));
    let (mut c, _) = from(&server, "2001:db8::5").await;
    assert!(c.cmd("AUTH PLAIN").await.starts_with("+ "));
    assert!(
        c.cmd("AAAA").await.starts_with("-ERR [AUTH]"),
        "no name in it"
    );
    // The third failure from 192.0.2.7 reached the per-IP limit: throttled now.
    let (mut c, _) = from(&server, "192.0.2.7").await;
    assert!(c.cmd("USER ann@example.org").await.starts_with("+OK"));
    assert!(c
        .cmd(&format!("PASS {SECRET}"))
        .await
        .starts_with("-ERR [AUTH]"));
    let (mut c, _) = from(&server, "192.0.2.7").await;
    assert!(c.cmd("USER joe@example.org").await.starts_with("+OK"));
    assert!(c
        .cmd(&format!("PASS {PASSWORD}"))
        .await
        .starts_with("-ERR [LOGIN-DELAY]"));

    let log = server.wait_for_log("reason=\"throttled\"");
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("login failed")).collect();
    let expect = [
        "client=192.0.2.7 user=\"joe@example.org\" mechanism=\"user\" reason=\"credentials\"",
        "client=192.0.2.7 user=\"ghost@example.org\" mechanism=\"plain\" reason=\"credentials\"",
        "client=2001:db8::5 user=\"\" mechanism=\"plain\" reason=\"malformed\"",
        "client=192.0.2.7 user=\"ann@example.org\" mechanism=\"user\" reason=\"credentials\"",
        "client=192.0.2.7 user=\"joe@example.org\" mechanism=\"user\" reason=\"throttled\"",
    ];
    assert_eq!(failed.len(), expect.len(), "{failed:#?}");
    for (line, want) in failed.iter().zip(expect) {
        assert!(line.contains(want), "{line}\nwants {want}");
        assert!(line.contains(" INFO "), "{line}");
    }
    // The fail2ban filter of docs/OPERATIONS.md (`login failed client=<HOST> `) finds
    // the client in each.
    let hosts: Vec<&str> = failed
        .iter()
        .filter_map(|l| l.split("login failed client=").nth(1)?.split(' ').next())
        .collect();
    assert_eq!(
        hosts,
        [
            "192.0.2.7",
            "192.0.2.7",
            "2001:db8::5",
            "192.0.2.7",
            "192.0.2.7"
        ]
    );
    assert!(
        !log.contains(SECRET) && !log.contains(&plain),
        "a password was logged"
    );
}

/// `AUTH` alone lists the mechanisms (as Outlook expects) where AUTH is allowed, and is
/// refused like AUTH where it is not.
#[tokio::test(flavor = "multi_thread")]
async fn auth_without_a_mechanism_lists_them() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let mut c = pop3s(&server).await;
    assert_eq!(c.cmd("AUTH").await, "+OK\r\n");
    assert_eq!(c.multiline_raw().await, b"PLAIN\r\nSCRAM-SHA-256\r\n.\r\n");
    // Still in AUTHORIZATION: a login works after it.
    assert!(c
        .login("joe@example.org", PASSWORD)
        .await
        .starts_with("+OK"));
    assert_eq!(c.cmd("AUTH").await, "-ERR Already logged in\r\n");
    let mut clear = Raw::plain(server.pop3).await;
    clear.line().await;
    assert!(
        clear.cmd("AUTH").await.starts_with("-ERR [AUTH]"),
        "cleartext before STLS"
    );
}

/// SCRAM: an authzid naming another account fails like a wrong password; the own name
/// (any ASCII case) is fine. User names and passwords are SASLprep-ed: a client that
/// prepares a password containing a no-break space logs in, so does a name written with
/// a full-width letter, and USER/PASS still takes the password as it was set.
#[test]
fn scram_refuses_a_foreign_authzid_and_applies_saslprep() {
    let server = Server::start();
    server.with_user("joe@example.org");
    server.with_user("ann@example.org");
    server.add_user("nbsp@example.org", "correct\u{00A0}horse");
    let ca = server.ca.ca_pem.display().to_string();
    let port = server.pop3s.port().to_string();
    let scram = |user: &str, password: &str, authzid: &str| {
        python(
            "scram_login.py",
            &["127.0.0.1", &port, &ca, user, password, authzid],
        )
    };
    let refused = scram("joe@example.org", PASSWORD, "ann@example.org");
    assert!(refused.starts_with("FAIL -ERR [AUTH]"), "{refused}");
    let own = scram("joe@example.org", PASSWORD, "Joe@Example.org");
    assert!(own.starts_with("OK +OK"), "{own}");
    let prepared = scram("nbsp@example.org", "correct horse", "");
    assert!(prepared.starts_with("OK +OK"), "{prepared}");
    let fullwidth = scram("\u{FF4A}oe@example.org", PASSWORD, "");
    assert!(fullwidth.starts_with("OK +OK"), "{fullwidth}");
    server.wait_for_log(
        "user=\"joe@example.org\" mechanism=\"scram-sha-256\" reason=\"credentials\"",
    );
}

/// USER/PASS takes the password exactly as set (no SASLprep: argon2 hashes the bytes).
#[tokio::test(flavor = "multi_thread")]
async fn user_pass_keeps_the_password_as_set() {
    let server = Server::start();
    server.add_domain("example.org");
    server.add_user("nbsp@example.org", "correct\u{00A0}horse");
    let mut c = pop3s(&server).await;
    assert!(c.cmd("USER nbsp@example.org").await.starts_with("+OK"));
    assert!(c.cmd("PASS correct\u{00A0}horse").await.starts_with("+OK"));
}

/// On a cluster, the home of a forwarded session logs a failed login with the original
/// client's address (here the one a PROXY header gave the front), and counts it in Redis
/// under the client's group: an IPv6 client by its /64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_logs_and_counts_the_original_client_of_a_forwarded_login() {
    let c = Cluster::start(ClusterOptions {
        replicas: 2,
        pins: vec![("a.example".into(), replica_name(0))],
        replica: Options {
            allow_plaintext_auth: true,
            extra: "[proxy_protocol]\nlisteners = [\"pop3\"]\ntrusted_networks = [\"127.0.0.1\"]\n"
                .into(),
            ..Options::default()
        },
    });
    let front = &c.replicas[1];
    let out = front.cli(&["domain", "add", "a.example"], b"");
    assert!(out.status.success(), "{out:?}");
    front.add_user("joe@a.example", PASSWORD);
    let (mut p, g) = from(front, "2001:db8:5::7").await;
    assert!(g.starts_with("+OK"), "{g}");
    assert!(p.cmd("USER joe@a.example").await.starts_with("+OK"));
    assert!(p.cmd("PASS wrong").await.starts_with("-ERR [AUTH]"));
    let home = &c.replicas[0];
    home.wait_for_log(
        "login failed client=2001:db8:5::7 user=\"joe@a.example\" mechanism=\"user\"",
    );
    assert!(
        !front.log_text().contains("login failed"),
        "the home answers and logs the attempt"
    );
    assert_eq!(
        c.redis
            .cmd(&["GET", "mailgate:authfail:ip:2001:db8:5::/64"]),
        Resp::Bulk(Some("1".into()))
    );
}

/// An IPv4 client of a listener bound to `[::]` arrives as `::ffff:127.0.0.1`; it is
/// logged, limited and throttled as `127.0.0.1`.
#[tokio::test(flavor = "multi_thread")]
async fn ipv4_mapped_peers_of_a_dual_stack_listener_are_ipv4() {
    let server = Server::start_with(Options {
        listen_host: "[::]".into(),
        allow_plaintext_auth: true,
        ..Options::default()
    });
    server.with_user("joe@example.org");
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], server.pop3.port()));
    let mut c = Raw::plain(v4).await;
    assert!(c.line().await.starts_with("+OK"));
    assert!(c.cmd("USER joe@example.org").await.starts_with("+OK"));
    assert!(c.cmd("PASS wrong").await.starts_with("-ERR [AUTH]"));
    let log = server.wait_for_log("login failed client=127.0.0.1 ");
    assert!(!log.contains("::ffff:"), "{log}");
}
