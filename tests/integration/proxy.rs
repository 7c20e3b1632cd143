//! The PROXY protocol on the real server: a trusted peer's v1 or v2 header names the
//! client for logs, the per-IP limit and login throttling; a header from an untrusted
//! peer, a bad header or none at all closes the connection without a byte; listeners not
//! configured for it read no header.

use crate::common::{Options, Raw, Server, PASSWORD};
use crate::metrics::http_get;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SNI: &str = "localhost";
const USER: &str = "joe@example.org";

fn v1(client: &str, port: u16) -> Vec<u8> {
    format!("PROXY TCP4 {client} 10.0.0.1 {port} 110\r\n").into_bytes()
}

/// A v2 PROXY header (IPv6 when `client` is), built from the specification.
fn v2(client: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21".to_vec();
    let mut addresses = Vec::new();
    match client {
        SocketAddr::V4(a) => {
            h.push(0x11);
            addresses.extend_from_slice(&a.ip().octets());
            addresses.extend_from_slice(&[10, 0, 0, 1]);
        }
        SocketAddr::V6(a) => {
            h.push(0x21);
            addresses.extend_from_slice(&a.ip().octets());
            addresses.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        }
    }
    addresses.extend_from_slice(&client.port().to_be_bytes());
    addresses.extend_from_slice(&995u16.to_be_bytes());
    // A TLV (type NOOP) such as load balancers add.
    addresses.extend_from_slice(&[0x04, 0x00, 0x03, 1, 2, 3]);
    h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    h.extend_from_slice(&addresses);
    h
}

/// A v2 LOCAL header, as a load balancer's health check sends.
fn v2_local() -> Vec<u8> {
    b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec()
}

fn proxy_server(listeners: &str, trusted: &str, opts: Options) -> Server {
    Server::start_with(Options {
        extra: format!(
            "[proxy_protocol]\nlisteners = {listeners}\ntrusted_networks = {trusted}\nheader_timeout_secs = 1\n"
        ),
        ..opts
    })
}

/// The rejected-connections counter for `listener` and `reason`.
fn rejected(server: &Server, listener: &str, reason: &str) -> f64 {
    let (status, body) = http_get(&format!("http://{}/metrics", server.metrics));
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find(|l| {
            l.starts_with("mailgate_connections_rejected_total{")
                && l.contains(&format!("listener=\"{listener}\""))
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.parse().expect("sample value"))
        .unwrap_or_else(|| panic!("no rejected series for {listener}/{reason}:\n{body}"))
}

/// Sends `bytes` first, then asserts that the server closes without writing a byte.
async fn closed_without_a_byte(addr: SocketAddr, bytes: &[u8]) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut got = Vec::new();
    // EOF, or a reset when the server closed with our bytes unread: either way, nothing.
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the server must close the connection");
    assert!(
        got.is_empty(),
        "the server wrote {:?}",
        String::from_utf8_lossy(&got)
    );
    started.elapsed()
}

#[tokio::test]
async fn trusted_v1_header_on_pop3_names_the_client() {
    let server = proxy_server(
        r#"["pop3", "pop3s"]"#,
        r#"["127.0.0.0/8"]"#,
        Options::default(),
    );
    let mut c = Raw::plain_after(server.pop3, &v1("203.0.113.7", 51234)).await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("+OK"), "{greeting}");
    assert!(c.cmd("CAPA").await.starts_with("+OK"));
    c.multiline().await;
    // STLS still works behind the header.
    assert!(c.cmd("STLS").await.starts_with("+OK"));
    let mut c = c.starttls(&server.ca.ca_pem, SNI).await;
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    server.wait_for_log("peer=203.0.113.7:51234");
    let log = server.log_text();
    let end = log
        .lines()
        .find(|l| l.contains("session end") && l.contains("peer=203.0.113.7:51234"))
        .unwrap_or_else(|| panic!("no session end line for the claimed client:\n{log}"));
    assert!(end.contains("outcome=\"quit\""), "{end}");
}

#[tokio::test]
async fn trusted_v2_header_then_tls_on_pop3s() {
    let server = proxy_server(
        r#"["pop3", "pop3s"]"#,
        r#"["127.0.0.1"]"#,
        Options::default(),
    );
    server.with_user(USER);
    let client: SocketAddr = "[2001:db8::7]:4000".parse().expect("addr");
    let mut c = Raw::tls_after(server.pop3s, &v2(client), &server.ca.ca_pem, SNI).await;
    assert!(c.line().await.starts_with("+OK"));
    let r = c.login(USER, PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
    assert!(c.cmd("STAT").await.starts_with("+OK 0 0"));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    server.wait_for_log("peer=[2001:db8::7]:4000");

    // LOCAL (a health check) keeps the socket's address.
    let mut c = Raw::plain_after(server.pop3, &v2_local()).await;
    assert!(c.line().await.starts_with("+OK"));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    let mut c = Raw::plain_after(server.pop3, b"PROXY UNKNOWN\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    server.wait_for_log("peer=127.0.0.1:");
}

#[tokio::test]
async fn per_ip_limit_counts_the_claimed_address() {
    let server = proxy_server(
        r#"["pop3"]"#,
        r#"["127.0.0.0/8"]"#,
        Options {
            max_connections_per_ip: 1,
            ..Options::default()
        },
    );
    // All from 127.0.0.1, which alone would allow one.
    let mut a = Raw::plain_after(server.pop3, &v1("203.0.113.7", 1000)).await;
    assert!(a.line().await.starts_with("+OK"));
    let mut b = Raw::plain_after(server.pop3, &v1("203.0.113.8", 1001)).await;
    assert!(b.line().await.starts_with("+OK"));
    let mut same = Raw::plain_after(server.pop3, &v1("203.0.113.7", 1002)).await;
    let r = same.line().await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert!(same.closed().await);
    assert_eq!(rejected(&server, "pop3", "per_ip_limit"), 1.0);
    server.wait_for_log("peer=203.0.113.7:1002");
    // The same address again once the first has left.
    assert!(a.cmd("QUIT").await.starts_with("+OK"));
    assert!(a.closed().await);
    server.wait_active("pop3", 1).await;
    let mut again = Raw::plain_after(server.pop3, &v1("203.0.113.7", 1003)).await;
    assert!(again.line().await.starts_with("+OK"));
    assert!(b.cmd("QUIT").await.starts_with("+OK"));
}

#[tokio::test]
async fn login_throttling_counts_the_claimed_address() {
    let server = proxy_server(
        r#"["pop3s"]"#,
        r#"["127.0.0.0/8"]"#,
        Options {
            max_auth_failures_per_ip: 2,
            ..Options::default()
        },
    );
    server.with_user(USER);
    let from = |port| {
        format!("198.51.100.9:{port}")
            .parse::<SocketAddr>()
            .expect("addr")
    };
    let mut c = Raw::tls_after(server.pop3s, &v2(from(1)), &server.ca.ca_pem, SNI).await;
    c.line().await;
    for _ in 0..2 {
        assert!(c.login(USER, "wrong").await.starts_with("-ERR [AUTH]"));
    }
    // That address is throttled now, even with the right password...
    let mut d = Raw::tls_after(server.pop3s, &v2(from(2)), &server.ca.ca_pem, SNI).await;
    d.line().await;
    let r = d.login(USER, PASSWORD).await;
    assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "{r}");
    // ...another client behind the same balancer is not.
    let other = v1("203.0.113.7", 3);
    let mut e = Raw::tls_after(server.pop3s, &other, &server.ca.ca_pem, SNI).await;
    e.line().await;
    let r = e.login(USER, PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
}

#[tokio::test]
async fn header_from_an_untrusted_peer_closes_the_connection() {
    let server = proxy_server(r#"["pop3"]"#, r#"["10.0.0.0/8"]"#, Options::default());
    let elapsed = closed_without_a_byte(server.pop3, &v1("203.0.113.7", 1)).await;
    assert!(
        elapsed < Duration::from_millis(900),
        "closed at once, not after the header timeout: {elapsed:?}"
    );
    // No header either: still closed, never greeted.
    closed_without_a_byte(server.pop3, b"").await;
    assert_eq!(rejected(&server, "pop3", "proxy_untrusted"), 2.0);
    assert_eq!(rejected(&server, "pop3", "proxy_header"), 0.0);
    server.wait_for_log("peer is not in proxy_protocol.trusted_networks");
    assert!(
        !server.log_text().contains("203.0.113.7"),
        "an untrusted header was believed"
    );
    // pop3s is not in the list: it reads no header and works as always.
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    assert!(c.line().await.starts_with("+OK"));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
}

#[tokio::test]
async fn trusted_peer_without_a_valid_header_is_closed() {
    let server = proxy_server(
        r#"["pop3"]"#,
        r#"["127.0.0.0/8", "::1"]"#,
        Options::default(),
    );
    // Garbage is refused at once...
    for garbage in [
        &b"USER joe\r\n"[..],
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        &[0x16, 0x03, 0x01],
    ] {
        let elapsed = closed_without_a_byte(server.pop3, garbage).await;
        assert!(
            elapsed < Duration::from_millis(900),
            "{garbage:?}: {elapsed:?}"
        );
    }
    // ...an oversized v2 header before its TLVs arrive...
    let mut big = v2("192.0.2.1:1".parse().expect("addr"));
    big[14..16].copy_from_slice(&[0xff, 0xff]);
    closed_without_a_byte(server.pop3, &big[..16]).await;
    // ...half a header or none: after the header timeout (1 s).
    for partial in [&b"PROXY TCP4 203.0.113.7"[..], b""] {
        let elapsed = closed_without_a_byte(server.pop3, partial).await;
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
            "{partial:?}: {elapsed:?}"
        );
    }
    assert_eq!(rejected(&server, "pop3", "proxy_header"), 6.0);
    assert!(!server.log_text().contains("203.0.113.7"));
    // pop3s is not in the list: it reads no header and works as always.
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    assert!(c.line().await.starts_with("+OK"));
    // And a good header on pop3 still works.
    let mut c = Raw::plain_after(server.pop3, &v1("203.0.113.9", 9)).await;
    assert!(c.line().await.starts_with("+OK"));
}
