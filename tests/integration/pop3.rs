//! POP3 behaviour against the real server with a raw client: byte-exact replies, state
//! rules, TLS, locking, UPDATE semantics, limits and hostile input.

use crate::common::{message, Options, Raw, Server, PASSWORD};
use std::time::{Duration, Instant};

const SNI: &str = "localhost";

async fn tls_login(server: &Server, user: &str) -> Raw {
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    assert!(c.line().await.starts_with("+OK"));
    let r = c.login(user, PASSWORD).await;
    assert!(r.starts_with("+OK"), "login {user}: {r}");
    c
}

#[tokio::test]
async fn greeting_capa_and_states() {
    let server = Server::start();
    let mut c = Raw::plain(server.pop3).await;
    let greeting = c.line().await;
    assert!(
        greeting.starts_with("+OK mail.test POP3 ready"),
        "{greeting}"
    );
    assert!(greeting.ends_with("\r\n"));
    assert_eq!(c.cmd("CAPA").await, "+OK Capability list follows\r\n");
    let caps = String::from_utf8(c.multiline_raw().await).expect("utf8");
    for cap in [
        "TOP\r\n",
        "UIDL\r\n",
        "RESP-CODES\r\n",
        "AUTH-RESP-CODE\r\n",
        "PIPELINING\r\n",
        "STLS\r\n",
        "IMPLEMENTATION mailgate",
    ] {
        assert!(caps.contains(cap), "missing {cap:?} in {caps:?}");
    }
    // Plaintext auth is off: neither USER nor SASL is announced before TLS.
    assert!(
        !caps.contains("USER\r\n") && !caps.contains("SASL"),
        "{caps}"
    );
    for cmd in [
        "STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 0", "UIDL", "LAST",
    ] {
        let r = c.cmd(cmd).await;
        assert!(r.starts_with("-ERR"), "{cmd} before login: {r}");
    }
    assert_eq!(c.cmd("QUIT").await, "+OK Logging out\r\n");
    assert!(c.closed().await);
}

#[tokio::test]
async fn plaintext_auth_refused_before_stls_then_allowed() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let mut c = Raw::plain(server.pop3).await;
    c.line().await;
    for cmd in [
        "USER joe@example.org",
        "PASS x",
        "AUTH PLAIN AGpvZUBleGFtcGxlLm9yZwB4",
        "APOP joe@example.org 0123456789abcdef0123456789abcdef",
    ] {
        let r = c.cmd(cmd).await;
        assert!(r.starts_with("-ERR"), "{cmd}: {r}");
    }
    assert!(c
        .cmd("USER joe@example.org")
        .await
        .starts_with("-ERR [AUTH]"));
    assert_eq!(c.cmd("STLS").await, "+OK Begin TLS negotiation\r\n");
    let mut c = c.starttls(&server.ca.ca_pem, SNI).await;
    c.send("CAPA\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    let caps = String::from_utf8(c.multiline_raw().await).expect("utf8");
    assert!(
        caps.contains("USER\r\n") && caps.contains("SASL PLAIN SCRAM-SHA-256\r\n"),
        "{caps}"
    );
    assert!(
        !caps.contains("STLS"),
        "STLS offered again after TLS: {caps}"
    );
    assert!(c.cmd("STLS").await.starts_with("-ERR"));
    let r = c.login("joe@example.org", PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
}

#[tokio::test]
async fn stls_discards_pipelined_commands() {
    let server = Server::start_with(Options {
        allow_plaintext_auth: true,
        ..Options::default()
    });
    server.with_user("joe@example.org");
    let mut c = Raw::plain(server.pop3).await;
    c.line().await;
    // A man in the middle appends commands after STLS; they must not run inside TLS.
    c.send(&format!(
        "STLS\r\nUSER joe@example.org\r\nPASS {PASSWORD}\r\n"
    ))
    .await;
    assert_eq!(c.line().await, "+OK Begin TLS negotiation\r\n");
    let mut c = c.starttls(&server.ca.ca_pem, SNI).await;
    let r = c.cmd("STAT").await;
    assert!(r.starts_with("-ERR"), "injected login took effect: {r}");
    assert!(
        c.cmd("PASS whatever").await.starts_with("-ERR"),
        "injected USER took effect"
    );
}

#[tokio::test]
async fn retr_list_uidl_top_are_byte_exact() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let m1 = b"Subject: one\r\n\r\n.leading dot\r\n..two dots\r\nend\r\n".to_vec();
    // Bare LF is normalised to CRLF at delivery, once.
    let m2_in = b"Subject: two\nX: y\n\nbody 1\nbody 2\n.\nlast".to_vec();
    let m2 = b"Subject: two\r\nX: y\r\n\r\nbody 1\r\nbody 2\r\n.\r\nlast\r\n".to_vec();
    server.deliver("joe@example.org", &m1);
    server.deliver("Joe@Example.ORG", &m2_in);
    let mut c = tls_login(&server, "JOE@example.org").await;
    assert_eq!(
        c.cmd("STAT").await,
        format!("+OK 2 {}\r\n", m1.len() + m2.len())
    );
    assert_eq!(
        c.cmd("LIST").await,
        format!("+OK 2 messages ({} octets)\r\n", m1.len() + m2.len())
    );
    assert_eq!(
        c.multiline_raw().await,
        format!("1 {}\r\n2 {}\r\n.\r\n", m1.len(), m2.len()).into_bytes()
    );
    assert_eq!(c.cmd("LIST 2").await, format!("+OK 2 {}\r\n", m2.len()));
    assert_eq!(
        c.cmd("RETR 1").await,
        format!("+OK {} octets\r\n", m1.len())
    );
    assert_eq!(
        c.multiline_raw().await,
        b"Subject: one\r\n\r\n..leading dot\r\n...two dots\r\nend\r\n.\r\n".to_vec()
    );
    assert!(c.cmd("RETR 2").await.starts_with("+OK"));
    assert_eq!(c.multiline().await, m2);
    assert!(c.cmd("TOP 2 0").await.starts_with("+OK"));
    assert_eq!(
        c.multiline_raw().await,
        b"Subject: two\r\nX: y\r\n\r\n.\r\n".to_vec()
    );
    assert!(c.cmd("TOP 2 2").await.starts_with("+OK"));
    assert_eq!(
        c.multiline_raw().await,
        b"Subject: two\r\nX: y\r\n\r\nbody 1\r\nbody 2\r\n.\r\n".to_vec()
    );
    assert!(c.cmd("TOP 2 99").await.starts_with("+OK"));
    assert_eq!(c.multiline().await, m2);
    assert_eq!(c.cmd("UIDL").await, "+OK\r\n");
    let uidl = String::from_utf8(c.multiline_raw().await).expect("utf8");
    let uids: Vec<&str> = uidl
        .lines()
        .filter(|l| *l != ".")
        .map(|l| l.split(' ').nth(1).expect("uid"))
        .collect();
    assert_eq!(uids.len(), 2);
    assert_ne!(uids[0], uids[1]);
    assert!(uids
        .iter()
        .all(|u| u.len() <= 70 && u.bytes().all(|b| (0x21..=0x7e).contains(&b))));
    assert_eq!(c.cmd("UIDL 2").await, format!("+OK 2 {}\r\n", uids[1]));
    // LAST is off by default (`pop3.last`), as in Dovecot: clients fall back to UIDL.
    assert_eq!(
        c.cmd("LAST").await,
        "-ERR LAST is not offered, use UIDL\r\n"
    );
    for bad in [
        "RETR 0",
        "RETR 3",
        "LIST 0",
        "TOP 9 1",
        "UIDL 4294967295",
        "DELE 3",
        "RETR 99999999999",
        "RETR x",
        "TOP 1",
    ] {
        assert!(c.cmd(bad).await.starts_with("-ERR"), "{bad}");
    }
    assert!(c.cmd("NOOP").await.starts_with("+OK"));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
}

#[tokio::test]
async fn dele_rset_quit_and_drop_semantics() {
    let server = Server::start();
    server.with_user("joe@example.org");
    for i in 0..3 {
        server.deliver("joe@example.org", &message(&format!("m{i}"), 3));
    }
    // DELE then drop: nothing deleted.
    let mut c = tls_login(&server, "joe@example.org").await;
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    drop(c);
    server.wait_active("pop3s", 0).await;
    let mut c = tls_login(&server, "joe@example.org").await;
    assert!(c.cmd("STAT").await.starts_with("+OK 3 "));
    // A deleted message vanishes from STAT/LIST/UIDL; RETR/TOP/DELE of it fail.
    assert!(c.cmd("DELE 2").await.starts_with("+OK"));
    assert!(c.cmd("STAT").await.starts_with("+OK 2 "));
    assert!(c.cmd("LIST").await.starts_with("+OK 2 messages"));
    let list = String::from_utf8(c.multiline_raw().await).expect("utf8");
    assert!(
        list.starts_with("1 ") && list.contains("\r\n3 ") && !list.contains("\r\n2 "),
        "{list}"
    );
    assert!(c.cmd("UIDL").await.starts_with("+OK"));
    assert!(!String::from_utf8(c.multiline_raw().await)
        .expect("utf8")
        .contains("\r\n2 "));
    for cmd in ["RETR 2", "TOP 2 0", "DELE 2", "LIST 2", "UIDL 2"] {
        assert!(
            c.cmd(cmd).await.starts_with("-ERR"),
            "{cmd} of deleted message"
        );
    }
    // RSET clears the marks.
    assert!(c.cmd("RSET").await.starts_with("+OK"));
    assert!(c.cmd("STAT").await.starts_with("+OK 3 "));
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    assert!(c.cmd("DELE 3").await.starts_with("+OK"));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    let mut c = tls_login(&server, "joe@example.org").await;
    assert!(c.cmd("STAT").await.starts_with("+OK 1 "));
    assert!(c.cmd("TOP 1 0").await.starts_with("+OK"));
    let top = String::from_utf8(c.multiline_raw().await).expect("utf8");
    assert!(
        top.contains("Subject: m1\r\n"),
        "the survivor is the middle message: {top}"
    );
}

#[tokio::test]
async fn maildrop_lock_in_use() {
    let server = Server::start();
    server.with_user("joe@example.org");
    server.with_user("ann@example.org");
    let mut a = tls_login(&server, "joe@example.org").await;
    let mut b = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    b.line().await;
    let r = b.login("joe@example.org", PASSWORD).await;
    assert!(r.starts_with("-ERR [IN-USE]"), "{r}");
    // Other maildrops are unaffected.
    let mut other = tls_login(&server, "ann@example.org").await;
    assert!(other.cmd("QUIT").await.starts_with("+OK"));
    assert!(a.cmd("QUIT").await.starts_with("+OK"));
    assert!(a.closed().await);
    // The refused session may try again once the maildrop is free.
    let r = b.login("joe@example.org", PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
}

#[tokio::test]
async fn wrong_password_and_unknown_user_look_the_same() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let mut c = tls_login(&server, "joe@example.org").await;
    c.cmd("QUIT").await;
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    c.line().await;
    let wrong = c.login("joe@example.org", "nope").await;
    let unknown_user = c.login("nobody@example.org", PASSWORD).await;
    let unknown_domain = c.login("joe@example.com", PASSWORD).await;
    assert_eq!(wrong, "-ERR [AUTH] Authentication failed\r\n");
    assert_eq!(unknown_user, wrong);
    assert_eq!(unknown_domain, wrong);
    // Three failures end the connection.
    assert!(c.closed().await);
}

#[tokio::test]
async fn pass_takes_the_rest_of_the_line() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    c.line().await;
    // PASSWORD contains spaces.
    assert!(PASSWORD.contains(' '));
    assert!(
        c.cmd("PASS first").await.starts_with("-ERR"),
        "PASS without USER"
    );
    assert!(c
        .login("joe@example.org", PASSWORD)
        .await
        .starts_with("+OK"));
}

#[tokio::test]
async fn two_domains_with_the_same_local_part_are_apart() {
    let server = Server::start();
    server.with_user("joe@example.org");
    server.with_user("joe@example.net");
    server.deliver("joe@example.org", &message("for org", 1));
    server.deliver("joe@example.net", &message("for net", 1));
    server.deliver("joe@example.net", &message("for net 2", 1));
    let mut org = tls_login(&server, "joe@example.org").await;
    let mut net = tls_login(&server, "joe@example.net").await;
    assert!(org.cmd("STAT").await.starts_with("+OK 1 "));
    assert!(net.cmd("STAT").await.starts_with("+OK 2 "));
    assert!(org.cmd("RETR 1").await.starts_with("+OK"));
    assert!(String::from_utf8(org.multiline().await)
        .expect("utf8")
        .contains("Subject: for org\r\n"));
    assert!(org.cmd("RETR 2").await.starts_with("-ERR"));
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let server = Server::start();
    server.with_user("joe@example.org");
    server.deliver("joe@example.org", &message("p", 2));
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    c.line().await;
    c.send(&format!("USER joe@example.org\r\nPASS {PASSWORD}\r\nSTAT\r\nBOGUS\r\nLIST 1\r\nUIDL 1\r\nNOOP\r\nQUIT\r\n")).await;
    assert!(c.line().await.starts_with("+OK"));
    assert!(c.line().await.starts_with("+OK Logged in"));
    assert!(c.line().await.starts_with("+OK 1 "));
    assert!(c.line().await.starts_with("-ERR"));
    assert!(c.line().await.starts_with("+OK 1 "));
    assert!(c.line().await.starts_with("+OK 1 "));
    assert!(c.line().await.starts_with("+OK"));
    assert!(c.line().await.starts_with("+OK Logging out"));
    assert!(c.closed().await);
}

#[tokio::test]
async fn uidl_is_stable_across_sessions_and_restarts() {
    let mut server = Server::start();
    server.with_user("joe@example.org");
    for i in 0..3 {
        server.deliver("joe@example.org", &message(&format!("u{i}"), 1));
    }
    async fn uidl(server: &Server) -> Vec<String> {
        let mut c = tls_login(server, "joe@example.org").await;
        assert!(c.cmd("UIDL").await.starts_with("+OK"));
        let body = String::from_utf8(c.multiline_raw().await).expect("utf8");
        c.cmd("QUIT").await;
        body.lines()
            .filter(|l| *l != ".")
            .map(|l| l.split(' ').nth(1).expect("uid").to_string())
            .collect()
    }
    let first = uidl(&server).await;
    assert_eq!(first, uidl(&server).await);
    let status = server.stop();
    assert!(status.success(), "exit status {status}");
    server.spawn();
    assert_eq!(first, uidl(&server).await, "UIDs changed across a restart");
    // Deleting the first message keeps the others' UIDs, and new mail gets a fresh one.
    let mut c = tls_login(&server, "joe@example.org").await;
    c.cmd("DELE 1").await;
    c.cmd("QUIT").await;
    server.deliver("joe@example.org", &message("u3", 1));
    let after = uidl(&server).await;
    assert_eq!(&after[..2], &first[1..]);
    assert!(!first.contains(&after[2]), "a UID was reused");
}

#[tokio::test]
async fn big_message_streams_intact() {
    use sha2::{Digest, Sha256};
    let server = Server::start();
    server.with_user("big@example.org");
    // 20 MiB with lines starting with dots, so stuffing happens all the way through.
    let mut m = b"Subject: big\r\n\r\n".to_vec();
    let mut i = 0u64;
    while m.len() < 20 * 1024 * 1024 {
        let line = if i.is_multiple_of(7) {
            format!(".{i:0>70}\r\n")
        } else {
            format!("{i:0>76}\r\n")
        };
        m.extend_from_slice(line.as_bytes());
        i += 1;
    }
    let want = Sha256::digest(&m);
    server.deliver("big@example.org", &m);
    let mut c = tls_login(&server, "big@example.org").await;
    assert_eq!(c.cmd("LIST 1").await, format!("+OK 1 {}\r\n", m.len()));
    assert_eq!(c.cmd("RETR 1").await, format!("+OK {} octets\r\n", m.len()));
    let got = c.multiline().await;
    assert_eq!(got.len(), m.len());
    assert_eq!(Sha256::digest(&got), want);
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
}

#[tokio::test]
async fn garbage_and_overlong_lines_get_err_then_close() {
    let server = Server::start_with(Options {
        max_bad_commands: 5,
        ..Options::default()
    });
    let mut c = Raw::plain(server.pop3).await;
    c.line().await;
    assert!(c.cmd("HELO there").await.starts_with("-ERR"));
    c.send_bytes(b"\x00\xff\xfe garbage\r\n").await;
    assert!(c.line().await.starts_with("-ERR"));
    // 10 KiB without a line end: one -ERR, then the session goes on.
    c.send_bytes(&vec![b'A'; 10 * 1024]).await;
    c.send("\r\n").await;
    assert_eq!(c.line().await, "-ERR Line too long\r\n");
    assert!(c.cmd("NOOP").await.starts_with("-ERR"));
    // The fifth bad command closes the connection.
    let last = c.cmd("XYZZY").await;
    assert!(last.starts_with("-ERR Too many"), "{last}");
    assert!(c.closed().await);
}

#[tokio::test]
async fn huge_line_does_not_grow_memory_or_hang() {
    let server = Server::start();
    let mut c = Raw::plain(server.pop3).await;
    c.line().await;
    let chunk = vec![b'x'; 1024 * 1024];
    for _ in 0..8 {
        c.send_bytes(&chunk).await;
    }
    c.send("\r\nCAPA\r\n").await;
    assert_eq!(c.line().await, "-ERR Line too long\r\n");
    assert!(c.line().await.starts_with("+OK Capability"));
}

#[tokio::test]
async fn tls_client_hello_on_cleartext_port() {
    let server = Server::start();
    // A TLS client pointed at port 110 by mistake must fail fast, not hang.
    let stream = tokio::net::TcpStream::connect(server.pop3)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("sni");
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        crate::common::tls_connector(&server.ca.ca_pem).connect(name, stream),
    )
    .await;
    assert!(matches!(result, Ok(Err(_))), "handshake must fail promptly");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The server is still healthy.
    let mut c = Raw::plain(server.pop3).await;
    assert!(c.line().await.starts_with("+OK"));
}

#[tokio::test]
async fn idle_timeout_closes_session() {
    let server = Server::start_with(Options {
        idle_timeout_secs: 1,
        ..Options::default()
    });
    server.with_user("joe@example.org");
    let mut c = tls_login(&server, "joe@example.org").await;
    let started = Instant::now();
    let line = c.line().await;
    assert!(line.starts_with("-ERR"), "{line}");
    assert!(c.closed().await);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The lock was released: a new session gets in.
    let mut again = tls_login(&server, "joe@example.org").await;
    assert!(again.cmd("QUIT").await.starts_with("+OK"));
}

#[tokio::test]
async fn connections_per_ip_are_capped() {
    let server = Server::start_with(Options {
        max_connections_per_ip: 2,
        ..Options::default()
    });
    let mut a = Raw::plain(server.pop3).await;
    let mut b = Raw::plain(server.pop3).await;
    assert!(a.line().await.starts_with("+OK"));
    assert!(b.line().await.starts_with("+OK"));
    let mut c = Raw::plain(server.pop3).await;
    let r = c.line().await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert!(c.closed().await);
    drop(a);
    server.wait_active("pop3", 1).await;
    let mut d = Raw::plain(server.pop3).await;
    assert!(d.line().await.starts_with("+OK"));
}

#[tokio::test]
async fn sni_selects_the_domain_certificate() {
    let server = Server::start();
    // The default certificate does not name example.org, so only the per-domain one
    // can satisfy verification for this SNI.
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "mail.example.org").await;
    assert!(c.line().await.starts_with("+OK"));
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    assert!(c.line().await.starts_with("+OK"));
}

#[tokio::test]
async fn nul_bytes_are_replaced_only_when_configured() {
    let raw = b"Subject: nul\r\n\r\na\x00b\r\n".to_vec();
    for (replace, expect) in [(false, b"a\x00b".as_slice()), (true, b"a\x80b".as_slice())] {
        let server = Server::start_with(Options {
            replace_nul: replace,
            ..Options::default()
        });
        server.with_user("joe@example.org");
        server.deliver("joe@example.org", &raw);
        let mut c = tls_login(&server, "joe@example.org").await;
        assert!(c.cmd("RETR 1").await.starts_with("+OK"));
        let got = c.multiline().await;
        assert!(
            got.windows(3).any(|w| w == expect),
            "replace_nul={replace}: {got:?}"
        );
    }
}

#[tokio::test]
async fn sigterm_ends_sessions_without_update() {
    // The binary: SIGTERM itself.
    let mut server = Server::start_with(Options {
        shutdown_grace_secs: 1,
        process: true,
        ..Options::default()
    });
    server.with_user("joe@example.org");
    server.deliver("joe@example.org", &message("keep", 1));
    let mut c = tls_login(&server, "joe@example.org").await;
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    let status = server.stop();
    assert!(status.success(), "exit status {status}");
    let last = c.try_line().await;
    assert!(
        last.as_deref()
            .is_none_or(|l| l.starts_with("-ERR [SYS/TEMP]")),
        "{last:?}"
    );
    server.spawn();
    let mut c = tls_login(&server, "joe@example.org").await;
    assert!(
        c.cmd("STAT").await.starts_with("+OK 1 "),
        "DELE applied without QUIT"
    );
}

#[tokio::test]
async fn auth_plain_and_cancel() {
    use base64::Engine;
    let server = Server::start();
    server.with_user("joe@example.org");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    c.line().await;
    assert_eq!(c.cmd("AUTH PLAIN").await, "+ \r\n");
    assert_eq!(c.cmd("*").await, "-ERR Authentication cancelled\r\n");
    assert!(c.cmd("AUTH CRAM-MD5").await.starts_with("-ERR"));
    assert_eq!(c.cmd("AUTH PLAIN").await, "+ \r\n");
    assert!(c.cmd("!!notbase64").await.starts_with("-ERR"));
    let r = c
        .cmd(&format!(
            "AUTH PLAIN {}",
            b64(&format!("\0joe@example.org\0{PASSWORD}"))
        ))
        .await;
    assert!(r.starts_with("+OK"), "{r}");
    c.cmd("QUIT").await;
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    c.line().await;
    assert_eq!(c.cmd("AUTH PLAIN").await, "+ \r\n");
    let r = c
        .cmd(&b64(&format!(
            "joe@example.org\0joe@example.org\0{PASSWORD}"
        )))
        .await;
    assert!(r.starts_with("+OK"), "{r}");
    c.cmd("QUIT").await;
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    c.line().await;
    let r = c
        .cmd(&format!(
            "AUTH PLAIN {}",
            b64(&format!("admin@example.org\0joe@example.org\0{PASSWORD}"))
        ))
        .await;
    assert!(
        r.starts_with("-ERR [AUTH]"),
        "proxy authorization must fail: {r}"
    );
}

#[tokio::test]
async fn ipv6_listeners() {
    let server = Server::start_with(Options {
        listen_host: "[::1]".into(),
        ..Options::default()
    });
    server.with_user("joe@example.org");
    assert!(server.pop3s.is_ipv6() && server.pop3.is_ipv6());
    let mut c = tls_login(&server, "joe@example.org").await;
    assert!(c.cmd("STAT").await.starts_with("+OK 0 0"));
    let mut plain = Raw::plain(server.pop3).await;
    assert!(plain.line().await.starts_with("+OK"));
}

#[tokio::test]
async fn failed_logins_per_ip_get_login_delay() {
    let server = Server::start_with(Options {
        max_auth_failures_per_ip: 2,
        ..Options::default()
    });
    server.with_user("joe@example.org");
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    c.line().await;
    assert!(c
        .login("joe@example.org", "wrong")
        .await
        .starts_with("-ERR [AUTH]"));
    assert!(c
        .login("joe@example.org", "wrong")
        .await
        .starts_with("-ERR [AUTH]"));
    // The address is now throttled: even the right password is refused, on any connection.
    let mut d = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    d.line().await;
    let r = d.login("joe@example.org", PASSWORD).await;
    assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "{r}");
    assert!(
        !server.log_text().contains(PASSWORD),
        "a password reached the log"
    );
}

#[tokio::test]
async fn certificates_reload_without_restart() {
    let server = Server::start();
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "mail.example.org").await;
    assert!(c.line().await.starts_with("+OK"));
    // Renew example.org's certificate from another CA, in place.
    let other_dir = server.dir.path().join("renewed");
    std::fs::create_dir_all(&other_dir).expect("mkdir");
    let other = crate::common::TestCa::new(&other_dir);
    let (cert, key) = other.issue("example-org", &["example.org", "mail.example.org"]);
    let target = server.dir.path();
    std::fs::copy(&key, target.join("example-org.key")).expect("copy key");
    std::fs::copy(&cert, target.join("example-org.crt")).expect("copy cert");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let stream = tokio::net::TcpStream::connect(server.pop3s)
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from("mail.example.org").expect("sni");
        if crate::common::tls_connector(&other.ca_pem)
            .connect(name, stream)
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "renewed certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The default certificate was not touched.
    let mut d = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    assert!(d.line().await.starts_with("+OK"));
}

#[tokio::test]
async fn eight_bit_clean() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let mut m = b"Subject: =?utf-8?q?8bit?=\r\nContent-Transfer-Encoding: 8bit\r\n\r\n".to_vec();
    m.extend((0u8..=255).filter(|b| *b != b'\r' && *b != b'\n'));
    m.extend_from_slice("\r\nGr\u{fc}\u{df}e, \u{65e5}\u{672c}\r\n".as_bytes());
    server.deliver("joe@example.org", &m);
    let mut c = tls_login(&server, "joe@example.org").await;
    assert_eq!(c.cmd("LIST 1").await, format!("+OK 1 {}\r\n", m.len()));
    assert!(c.cmd("RETR 1").await.starts_with("+OK"));
    assert_eq!(c.multiline().await, m);
}

#[tokio::test]
async fn reconnect_right_after_quit_is_never_in_use() {
    let server = Server::start();
    server.with_user("joe@example.org");
    server.deliver("joe@example.org", &message("again", 1));
    // The lock is released before the QUIT answer is sent, so a client that logs in
    // again the moment it reads "+OK" must never see [IN-USE].
    for i in 0..100 {
        let mut c = tls_login(&server, "joe@example.org").await;
        if i % 2 == 0 {
            assert!(c.cmd("DELE 1").await.starts_with("+OK"));
            assert!(c.cmd("RSET").await.starts_with("+OK"));
        }
        assert!(c.cmd("QUIT").await.starts_with("+OK"));
    }
}
