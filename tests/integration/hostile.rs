//! Hostile clients (issue 15), in one place: idle floods, slow drips, overlong lines, NUL
//! bytes and invalid UTF-8, login floods, TLS garbage and cut handshakes, 10 000
//! pipelined commands, a second STLS/STARTTLS and oversized AUTH, against the
//! `mailgate serve` binary (so its RSS can be read) with real TLS. For every attack: the
//! server stays up, a real user is served meanwhile (an LMTP delivery, then a POP3S login,
//! STAT and RETR of it), and the server's RSS comes back near its baseline once the
//! attackers are gone. Figures are printed (`--nocapture`) and written into
//! docs/SECURITY.md; no timing is asserted.

use crate::common::{logged_in, message, rss_kib, stat_count, Options, Raw, Server, TIMEOUT};
use base64::Engine as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The real user, served during every attack.
const USER: &str = "joe@example.org";
/// The account attacks that log in use, so they never hold the real user's maildrop.
const VICTIM: &str = "eve@example.org";

/// How far above its baseline the server's RSS may stay once an attack is over and a
/// short settle has passed. A few MiB is noise (glibc keeps some freed memory in its
/// arenas; tokio keeps some task slabs); a leak of per-connection state after 5 000
/// connections is tens of MiB (see the per-connection figures in docs/SECURITY.md).
const SETTLE_MARGIN_KIB: u64 = 16 * 1024;
/// How long RSS may take to come back (housekeeping runs every second in tests).
const SETTLE: Duration = Duration::from_secs(10);

/// Raises this process's open-file limit to its hard limit, so it can hold thousands of
/// connections; the server binary started after it inherits the limit.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let soft = hard.min(1 << 20);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("setrlimit");
    soft
}

/// The server binary with the real user and the victim account, hardly limited per IP
/// (every attacker is 127.0.0.1), `extra` TOML appended; warmed up (one real-user round,
/// so first-use allocations such as the hashing buffers are in the baseline).
async fn hostile_server(opts: Options) -> (Server, Memory) {
    raise_nofile();
    let server = Server::start_with(Options {
        process: true,
        max_connections_per_ip: 20_000,
        ..opts
    });
    server.with_user(USER);
    server.with_user(VICTIM);
    Box::pin(serve_real_user(&server, "warm-up")).await;
    let memory = Memory::baseline(&server).await;
    (server, memory)
}

/// The server's memory before an attack.
struct Memory {
    pid: u32,
    baseline: u64,
}

impl Memory {
    async fn baseline(server: &Server) -> Memory {
        let pid = server.pid();
        // One housekeeping tick (reload interval 1 s) after the warm-up.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Memory {
            pid,
            baseline: rss_kib(pid),
        }
    }

    /// Waits (bounded) until RSS is within the margin of the baseline; fails with the
    /// figures when it stays above. Returns the settled RSS.
    async fn assert_back(&self, attack: &str) -> u64 {
        let until = Instant::now() + SETTLE;
        loop {
            let now = rss_kib(self.pid);
            if now <= self.baseline + SETTLE_MARGIN_KIB {
                eprintln!(
                    "{attack}: RSS baseline {} KiB, settled {now} KiB",
                    self.baseline
                );
                return now;
            }
            assert!(
                Instant::now() < until,
                "{attack}: RSS stayed at {now} KiB, baseline {} KiB (margin {SETTLE_MARGIN_KIB} KiB)",
                self.baseline
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A real user's round: an LMTP delivery, then over POP3S a login, STAT, RETR of the
/// delivered message (checked), DELE and QUIT.
async fn serve_real_user(server: &Server, tag: &str) {
    let lmtp = server.lmtp.expect("lmtp listener");
    let mut c = Raw::plain(lmtp).await;
    let greeting = c.reply().await;
    assert!(greeting.starts_with("220"), "{greeting}");
    for (cmd, code) in [
        ("LHLO client.test".to_owned(), "250"),
        ("MAIL FROM:<a@example.net>".to_owned(), "250"),
        (format!("RCPT TO:<{USER}>"), "250"),
        ("DATA".to_owned(), "354"),
    ] {
        let r = c.say(&cmd).await;
        assert!(r.starts_with(code), "LMTP {cmd}: {r}");
    }
    let body = message(tag, 3);
    c.send_bytes(&body).await;
    let r = c.say(".").await;
    assert!(r.starts_with("250"), "LMTP end of data: {r}");
    c.say("QUIT").await;

    let mut p = logged_in(server, USER).await;
    let n = stat_count(&p.cmd("STAT").await);
    assert!(n >= 1, "the delivered message is there");
    let r = p.cmd(&format!("RETR {n}")).await;
    assert!(r.starts_with("+OK"), "RETR: {r}");
    let got = p.multiline().await;
    assert!(
        got.ends_with(&body) && got.starts_with(b"Return-Path: <a@example.net>\r\n"),
        "the message as delivered, after its trace headers: {}",
        String::from_utf8_lossy(&got)
    );
    assert!(p.cmd(&format!("DELE {n}")).await.starts_with("+OK"));
    assert!(p.cmd("QUIT").await.starts_with("+OK"));
}

/// Runs `attack` while the real user is served in rounds (at least one, begun with the
/// attack); then checks that the server is still up and its memory came back.
async fn under_attack<T>(
    server: &Server,
    memory: &Memory,
    name: &str,
    attack: impl Future<Output = T>,
) -> T {
    let done = AtomicBool::new(false);
    // Boxed: the futures of a whole attack are too big for a test thread's stack.
    let (out, rounds) = tokio::join!(
        Box::pin(async {
            let out = attack.await;
            done.store(true, Ordering::Release);
            out
        }),
        Box::pin(async {
            let mut rounds = 0;
            loop {
                Box::pin(serve_real_user(server, &format!("{name} {rounds}"))).await;
                rounds += 1;
                if done.load(Ordering::Acquire) {
                    return rounds;
                }
            }
        })
    );
    eprintln!("{name}: the real user was served {rounds} times during the attack");
    Box::pin(serve_real_user(server, &format!("{name} after"))).await;
    memory.assert_back(name).await;
    out
}

/// Opens `n` connections with `open`, 64 at a time, and returns them all.
async fn hold<T, F, Fut>(n: usize, open: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    const WORKERS: usize = 64;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let open = open.clone();
        let share = n / WORKERS + usize::from(w < n % WORKERS);
        set.spawn(async move {
            let mut held = Vec::with_capacity(share);
            for _ in 0..share {
                held.push(open().await);
            }
            held
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(held) = set.join_next().await {
        all.extend(held.expect("opener"));
    }
    all
}

/// A TLS client session over `stream`, SNI `localhost`, trusting the test CA.
async fn tls_over(
    stream: TcpStream,
    connector: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("sni");
    tokio::time::timeout(TIMEOUT, connector.connect(name, stream))
        .await
        .expect("handshake timeout")
        .expect("handshake")
}

/// Reads one line (through `\n`) byte by byte, so nothing after it is consumed.
async fn read_line<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        let n = tokio::time::timeout(TIMEOUT, s.read(&mut b))
            .await
            .expect("read timeout")
            .expect("read");
        assert!(n == 1, "closed after {:?}", String::from_utf8_lossy(&line));
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Reads until the server closes; true when it did within `within` (bytes before the
/// close, such as a last reply or a TLS alert, are skipped).
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let until = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// One idle flood: `n` connections opened with `open` and held while the real user is
/// served; prints and returns the RSS they cost per connection (KiB), after checking
/// the server counts them all.
async fn flood<T, F, Fut>(
    server: &Server,
    memory: &Memory,
    name: &str,
    listener: &str,
    n: usize,
    open: F,
) -> f64
where
    T: Send + 'static,
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let before = rss_kib(memory.pid);
    let started = Instant::now();
    let held = hold(n, open).await;
    let opened = started.elapsed();
    server.wait_active(listener, n as u64).await;
    Box::pin(serve_real_user(server, name)).await;
    let during = rss_kib(memory.pid);
    let per_conn = during.saturating_sub(before) as f64 / n as f64;
    eprintln!(
        "{name}: {n} connections opened in {opened:?}; RSS {before} -> {during} KiB, \
         {per_conn:.1} KiB per connection"
    );
    drop(held);
    server.wait_active(listener, 0).await;
    Box::pin(serve_real_user(server, &format!("{name} after"))).await;
    memory.assert_back(name).await;
    per_conn
}

/// 5 000 idle connections at once on POP3 (greeted), POP3S (handshaken and greeted),
/// and 1 000 each on SMTP (greeted) and SMTP after STARTTLS: the server holds them,
/// serves the real user meanwhile, and gives the memory back once they are gone. The
/// bound per connection is far above the measured figure (docs/SECURITY.md): only a
/// buffer kept per idle connection would break it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_floods() {
    const POP3: usize = 5_000;
    const SMTP: usize = 1_000;
    const PLAIN_BOUND_KIB: f64 = 48.0;
    const TLS_BOUND_KIB: f64 = 96.0;
    let limit = raise_nofile();
    assert!(
        limit as usize > 2 * POP3 + 200,
        "RLIMIT_NOFILE hard limit {limit} is too low for {POP3} connections"
    );
    let (server, memory) = hostile_server(Options::default()).await;
    let connector = crate::common::tls_connector(&server.ca.ca_pem);

    let addr = server.pop3;
    let plain = flood(
        &server,
        &memory,
        "POP3 idle",
        "pop3",
        POP3,
        move || async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            assert!(read_line(&mut s).await.starts_with("+OK"));
            s
        },
    )
    .await;

    let (addr, c) = (server.pop3s, connector.clone());
    let tls = flood(&server, &memory, "POP3S idle", "pop3s", POP3, move || {
        let c = c.clone();
        async move { greeted_tls(addr, &c).await }
    })
    .await;

    let addr = server.smtp.expect("smtp");
    let smtp = flood(
        &server,
        &memory,
        "SMTP idle",
        "smtp",
        SMTP,
        move || async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            assert!(read_line(&mut s).await.starts_with("220"));
            s
        },
    )
    .await;

    let c = connector.clone();
    let smtp_tls = flood(
        &server,
        &memory,
        "SMTP STARTTLS idle",
        "smtp",
        SMTP,
        move || {
            let c = c.clone();
            async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                assert!(read_line(&mut s).await.starts_with("220"));
                s.write_all(b"EHLO flood.test\r\n").await.expect("ehlo");
                while read_line(&mut s).await.starts_with("250-") {}
                s.write_all(b"STARTTLS\r\n").await.expect("starttls");
                assert!(read_line(&mut s).await.starts_with("220"));
                tls_over(s, &c).await
            }
        },
    )
    .await;

    for (what, got, bound) in [
        ("POP3", plain, PLAIN_BOUND_KIB),
        ("POP3S", tls, TLS_BOUND_KIB),
        ("SMTP", smtp, PLAIN_BOUND_KIB),
        ("SMTP STARTTLS", smtp_tls, TLS_BOUND_KIB),
    ] {
        assert!(
            got < bound,
            "{what}: {got:.1} KiB per idle connection (bound {bound} KiB)"
        );
    }
}

/// A POP3S connection past its greeting.
async fn greeted_tls(
    addr: SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let s = TcpStream::connect(addr).await.expect("connect");
    let mut t = tls_over(s, connector).await;
    assert!(read_line(&mut t).await.starts_with("+OK"));
    t
}

/// Any client stream, cleartext or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Sends `bytes` one at a time (repeating them), 250 ms apart, until the server closes;
/// the last line it sent and how long it took. Bounded: 15 s.
async fn drip(mut s: Box<dyn Stream>, bytes: &'static [u8]) -> (String, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    for i in 0usize.. {
        assert!(started.elapsed() < Duration::from_secs(15), "never closed");
        // A write after the server closed may fail; the read below tells.
        let _ = s.write_all(&bytes[i % bytes.len()..][..1]).await;
        let _ = s.flush().await;
        let pause = tokio::time::sleep(Duration::from_millis(250));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => {
                        let text = String::from_utf8_lossy(&got).into_owned();
                        let last = text.lines().last().unwrap_or("").to_owned();
                        return (last, started.elapsed());
                    }
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                },
                _ = &mut pause => break,
            }
        }
    }
    panic!("the byte counter ran out")
}

/// A client that sends one byte at a time with pauses shorter than the idle timeout is
/// closed all the same: before login by the login time limit, after it (and on SMTP and
/// LMTP, which have no login) because a command line must be whole within the idle
/// timeout. The expected last words are checked; the timeouts are 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_drip_is_cut_off_by_the_timeouts() {
    const DRIPPERS: usize = 20;
    let (server, memory) = hostile_server(Options {
        login_timeout_secs: Some(2),
        idle_timeout_secs: 2,
        extra: "[delivery]\nidle_timeout_secs = 2\ntransaction_timeout_secs = 4\n".into(),
        ..Options::default()
    })
    .await;
    for k in 0..DRIPPERS {
        server.add_user(&format!("drip{k}@example.org"), crate::common::PASSWORD);
    }
    let connector = crate::common::tls_connector(&server.ca.ca_pem);
    let (pop3, pop3s) = (server.pop3, server.pop3s);
    let (smtp, lmtp) = (server.smtp.expect("smtp"), server.lmtp.expect("lmtp"));

    let attack = async {
        let mut set = tokio::task::JoinSet::new();
        for k in 0..DRIPPERS {
            let connector = connector.clone();
            set.spawn(async move {
                let (what, s, bytes, want): (&str, Box<dyn Stream>, &'static [u8], &str) =
                    match k % 5 {
                        0 => {
                            let mut s = TcpStream::connect(pop3).await.expect("connect");
                            read_line(&mut s).await;
                            let want = "-ERR Login time limit reached, closing connection";
                            let s: Box<dyn Stream> = Box::new(s);
                            ("POP3 before login", s, &b"CAPA\r\n"[..], want)
                        }
                        1 => {
                            let want = "-ERR Login time limit reached, closing connection";
                            let t = greeted_tls(pop3s, &connector).await;
                            let s: Box<dyn Stream> = Box::new(t);
                            ("POP3S before login", s, &b"USER eve@example.org"[..], want)
                        }
                        2 => {
                            let mut t = greeted_tls(pop3s, &connector).await;
                            let login = format!(
                                "USER drip{k}@example.org\r\nPASS {}\r\n",
                                crate::common::PASSWORD
                            );
                            t.write_all(login.as_bytes()).await.expect("login");
                            read_line(&mut t).await;
                            let r = read_line(&mut t).await;
                            assert!(r.starts_with("+OK"), "{r}");
                            let want = "-ERR Disconnected for inactivity";
                            let s: Box<dyn Stream> = Box::new(t);
                            ("POP3S logged in", s, &b"NOOP"[..], want)
                        }
                        3 => {
                            let mut s = TcpStream::connect(smtp).await.expect("connect");
                            read_line(&mut s).await;
                            let s: Box<dyn Stream> = Box::new(s);
                            ("SMTP", s, &b"NOOP"[..], "421 4.4.2")
                        }
                        _ => {
                            let mut s = TcpStream::connect(lmtp).await.expect("connect");
                            read_line(&mut s).await;
                            let s: Box<dyn Stream> = Box::new(s);
                            ("LMTP", s, &b"LHLO drip.test"[..], "421 4.4.2")
                        }
                    };
                let (last, took) = drip(s, bytes).await;
                assert!(last.starts_with(want), "{what}: last words {last:?}");
                (what, took)
            });
        }
        let mut worst = Duration::ZERO;
        while let Some(r) = set.join_next().await {
            let (what, took) = r.expect("dripper");
            eprintln!("slow drip on {what}: closed after {took:?}");
            worst = worst.max(took);
        }
        worst
    };
    let worst = Box::pin(under_attack(&server, &memory, "slow drip", attack)).await;
    eprintln!("slow drip: {DRIPPERS} drippers, the last closed after {worst:?}");
}

/// Builds a real TLS ClientHello (as the first bytes a TLS client sends).
fn client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("sni");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("hello");
    hello
}

/// Where a TLS handshake starts: a POP3S connection, or a POP3 or SMTP connection after
/// STLS/STARTTLS was accepted. Returns the raw TCP stream, ready for TLS bytes.
#[derive(Clone, Copy, Debug)]
enum TlsPort {
    Pop3s,
    Pop3Stls,
    SmtpStarttls,
}

async fn tls_start(server_addrs: (SocketAddr, SocketAddr, SocketAddr), port: TlsPort) -> TcpStream {
    let (pop3, pop3s, smtp) = server_addrs;
    match port {
        TlsPort::Pop3s => TcpStream::connect(pop3s).await.expect("connect"),
        TlsPort::Pop3Stls => {
            let mut s = TcpStream::connect(pop3).await.expect("connect");
            read_line(&mut s).await;
            s.write_all(b"STLS\r\n").await.expect("stls");
            assert!(read_line(&mut s).await.starts_with("+OK"));
            s
        }
        TlsPort::SmtpStarttls => {
            let mut s = TcpStream::connect(smtp).await.expect("connect");
            read_line(&mut s).await;
            s.write_all(b"EHLO garbage.test\r\nSTARTTLS\r\n")
                .await
                .expect("starttls");
            while read_line(&mut s).await.starts_with("250") {}
            s
        }
    }
}

/// On every TLS port: random bytes, half a ClientHello then silence (closed by the
/// 5 s handshake timeout), half a ClientHello then a close, and a plain-text POP3
/// command on POP3S are all closed; TLS on the cleartext POP3 port is told to use STLS
/// or POP3S, TLS on the SMTP port gets `500`s; garbage to the metrics port gets `400`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_garbage_and_truncated_handshakes() {
    const ROUNDS: usize = 25;
    let (server, memory) = hostile_server(Options::default()).await;
    let addrs = (server.pop3, server.pop3s, server.smtp.expect("smtp"));
    let hello = client_hello();
    let metrics = server.metrics;
    let attack = async {
        let mut set = tokio::task::JoinSet::new();
        for round in 0..ROUNDS {
            for port in [TlsPort::Pop3s, TlsPort::Pop3Stls, TlsPort::SmtpStarttls] {
                let hello = hello.clone();
                set.spawn(async move {
                    // Random bytes.
                    let mut s = tls_start(addrs, port).await;
                    let junk: Vec<u8> = (0..2048).map(|_| rand::random::<u8>()).collect();
                    let _ = s.write_all(&junk).await;
                    assert!(
                        closed_within(&mut s, Duration::from_secs(10)).await,
                        "{port:?}: random bytes"
                    );
                    // Half a ClientHello, then nothing: the handshake timeout (5 s).
                    if round % 5 == 0 {
                        let mut s = tls_start(addrs, port).await;
                        s.write_all(&hello[..hello.len() / 2]).await.expect("half");
                        assert!(
                            closed_within(&mut s, Duration::from_secs(15)).await,
                            "{port:?}: half a hello, then silence"
                        );
                    }
                    // Half a ClientHello, then a close.
                    let mut s = tls_start(addrs, port).await;
                    s.write_all(&hello[..hello.len() / 2]).await.expect("half");
                    drop(s);
                });
            }
            let hello = hello.clone();
            let (pop3, pop3s, smtp) = addrs;
            set.spawn(async move {
                // Plain text on POP3S.
                let mut s = TcpStream::connect(pop3s).await.expect("connect");
                s.write_all(b"USER eve@example.org\r\n")
                    .await
                    .expect("write");
                assert!(
                    closed_within(&mut s, Duration::from_secs(10)).await,
                    "plain text on POP3S"
                );
                // TLS on the cleartext POP3 port.
                let mut c = Raw::plain(pop3).await;
                c.line().await;
                c.send_bytes(&hello).await;
                assert_eq!(
                    c.line().await,
                    "-ERR TLS handshake on the cleartext port: use STLS or the POP3S port\r\n"
                );
                assert!(c.closed().await);
                // TLS on the SMTP port: its bytes are read as (bad) command lines.
                let mut c = Raw::plain(smtp).await;
                c.reply().await;
                c.send_bytes(&hello).await;
                c.send_bytes(b"\r\n").await;
                let r = c.reply().await;
                assert!(
                    r.starts_with("500 5.5.2") || r.starts_with("501 5.5.4"),
                    "TLS on the SMTP port: {r}"
                );
                // Garbage on the metrics port.
                let mut s = TcpStream::connect(metrics).await.expect("connect");
                s.write_all(&hello).await.expect("write");
                let mut answer = Vec::new();
                let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut answer)).await;
                assert!(
                    answer.starts_with(b"HTTP/1.1 400"),
                    "metrics: {:?}",
                    String::from_utf8_lossy(&answer)
                );
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("attacker");
        }
    };
    Box::pin(under_attack(&server, &memory, "TLS garbage", attack)).await;
    for l in ["pop3", "pop3s", "smtp"] {
        server.wait_active(l, 0).await;
    }
}

/// Splits a TLS POP3S session of the victim into a line reader and a writer.
async fn victim_session(
    server: &Server,
) -> (
    tokio::io::BufReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>>,
    tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>,
) {
    let connector = crate::common::tls_connector(&server.ca.ca_pem);
    let mut t = greeted_tls(server.pop3s, &connector).await;
    t.write_all(format!("USER {VICTIM}\r\nPASS {}\r\n", crate::common::PASSWORD).as_bytes())
        .await
        .expect("login");
    assert!(read_line(&mut t).await.starts_with("+OK"));
    let r = read_line(&mut t).await;
    assert!(r.starts_with("+OK"), "{r}");
    let (r, w) = tokio::io::split(t);
    (tokio::io::BufReader::new(r), w)
}

/// 10 000 pipelined commands in one write: POP3 NOOP/STAT/LIST/UIDL (both listings and
/// single messages) and SMTP MAIL/NOOP/RSET with PIPELINING are all answered, in order,
/// and the server's RSS stays bounded while it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_pipelined_commands() {
    const COMMANDS: usize = 10_000;
    const MESSAGES: usize = 5;
    const PEAK_BOUND_KIB: u64 = 32 * 1024;
    let (server, memory) = hostile_server(Options::default()).await;
    for i in 0..MESSAGES {
        server.deliver(VICTIM, &message(&format!("m{i}"), 2));
    }
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pid) = (peak.clone(), sampling.clone(), memory.pid);
        tokio::spawn(async move {
            while sampling.load(Ordering::Acquire) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let pop3 = async {
        let (mut r, mut w) = victim_session(&server).await;
        let mut script = String::new();
        let mut expect = Vec::new();
        for i in 0..COMMANDS {
            let (cmd, lines) = match i % 6 {
                0 => ("NOOP".to_owned(), 0),
                1 => ("STAT".to_owned(), 0),
                2 => ("LIST".to_owned(), MESSAGES + 1),
                3 => (format!("LIST {}", i % MESSAGES + 1), 0),
                4 => ("UIDL".to_owned(), MESSAGES + 1),
                _ => (format!("UIDL {}", i % MESSAGES + 1), 0),
            };
            script.push_str(&cmd);
            script.push_str("\r\n");
            expect.push((cmd, lines));
        }
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            w.write_all(script.as_bytes()).await.expect("pipeline");
            w
        });
        let mut line = String::new();
        for (cmd, lines) in &expect {
            line.clear();
            r.read_line(&mut line).await.expect("reply");
            assert!(line.starts_with("+OK"), "{cmd}: {line}");
            if let Some(n) = cmd.strip_prefix("LIST ").or(cmd.strip_prefix("UIDL ")) {
                assert!(line.starts_with(&format!("+OK {n} ")), "{cmd}: {line}");
            }
            for _ in 0..*lines {
                line.clear();
                r.read_line(&mut line).await.expect("listing");
            }
            if *lines > 0 {
                assert_eq!(line, ".\r\n", "{cmd}: end of the listing");
            }
        }
        let took = started.elapsed();
        let mut w = writer.await.expect("writer");
        w.write_all(b"QUIT\r\n").await.expect("quit");
        line.clear();
        r.read_line(&mut line).await.expect("quit");
        assert!(line.starts_with("+OK"), "{line}");
        took
    };

    let smtp = async {
        let mut c = TcpStream::connect(server.smtp.expect("smtp"))
            .await
            .expect("connect");
        assert!(read_line(&mut c).await.starts_with("220"));
        c.write_all(b"EHLO pipe.test\r\n").await.expect("ehlo");
        let mut caps = Vec::new();
        loop {
            let l = read_line(&mut c).await;
            caps.push(l.clone());
            if l.starts_with("250 ") {
                break;
            }
        }
        assert!(caps.iter().any(|l| l.contains("PIPELINING")), "{caps:?}");
        let mut script = String::new();
        let mut expect = Vec::new();
        for i in 0..COMMANDS {
            let (cmd, want) = match i % 4 {
                0 => ("MAIL FROM:<a@example.net>", "250 2.1.0"),
                1 => ("NOOP", "250 2.0.0"),
                2 => ("RSET", "250 2.0.0"),
                _ => ("NOOP", "250 2.0.0"),
            };
            script.push_str(cmd);
            script.push_str("\r\n");
            expect.push((cmd, want));
        }
        let (r, mut w) = c.into_split();
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            w.write_all(script.as_bytes()).await.expect("pipeline");
            w
        });
        let mut r = tokio::io::BufReader::new(r);
        let mut line = String::new();
        for (cmd, want) in &expect {
            line.clear();
            r.read_line(&mut line).await.expect("reply");
            assert!(line.starts_with(want), "{cmd}: {line}");
        }
        let took = started.elapsed();
        let mut w = writer.await.expect("writer");
        w.write_all(b"QUIT\r\n").await.expect("quit");
        took
    };

    let (pop3_took, smtp_took) = Box::pin(under_attack(
        &server,
        &memory,
        "10 000 pipelined commands",
        async { tokio::join!(Box::pin(pop3), Box::pin(smtp)) },
    ))
    .await;
    sampling.store(false, Ordering::Release);
    sampler.await.expect("sampler");
    let peak = peak.load(Ordering::Relaxed);
    let rate = |d: Duration| COMMANDS as f64 / d.as_secs_f64();
    eprintln!(
        "pipelined: POP3 {COMMANDS} in {pop3_took:?} ({:.0}/s), SMTP {COMMANDS} in \
         {smtp_took:?} ({:.0}/s); RSS baseline {} KiB, peak {peak} KiB",
        rate(pop3_took),
        rate(smtp_took),
        memory.baseline
    );
    assert!(
        peak <= memory.baseline + PEAK_BOUND_KIB,
        "RSS peaked at {peak} KiB, baseline {} KiB",
        memory.baseline
    );
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A POP3S connection before login, past its greeting.
async fn pop3s(addr: SocketAddr, ca: &Path) -> Raw {
    let mut c = Raw::tls(addr, ca, "localhost").await;
    assert!(c.line().await.starts_with("+OK"));
    c
}

/// An SMTP connection past EHLO.
async fn smtp_ehlo(addr: SocketAddr) -> Raw {
    let mut c = Raw::plain(addr).await;
    assert!(c.reply().await.starts_with("220"));
    assert!(c.say("EHLO hostile.test").await.starts_with("250"));
    c
}

/// Overlong lines, NUL bytes and invalid UTF-8, a second STLS/STARTTLS and oversized
/// AUTH (PLAIN, SCRAM-SHA-256, APOP): each gets its protocol's error and the session
/// goes on (or ends, where the protocol says so), many times over, while the real user
/// is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_commands_get_protocol_errors() {
    const ROUNDS: usize = 20;
    let (server, memory) = hostile_server(Options {
        apop: true,
        auth_failure_delay_ms: 10,
        max_bad_commands: 50,
        // The deliveries grow the domain store's sled cache; closing the idle store is
        // what gives (most of) that back, so it closes after 2 s here (300 s by default).
        extra: "[delivery]\nmax_message_bytes = 1048576\n[store]\nidle_close_secs = 2\n".into(),
        ..Options::default()
    })
    .await;
    let ca = server.ca.ca_pem.clone();
    let (pop3, pop3s_addr) = (server.pop3, server.pop3s);
    let (smtp, lmtp) = (server.smtp.expect("smtp"), server.lmtp.expect("lmtp"));

    let overlong = move |ca: std::path::PathBuf, round: usize| async move {
        // POP3: a command line over 255 octets, and one of 1 MiB.
        let mut c = pop3s(pop3s_addr, &ca).await;
        assert_eq!(
            c.cmd(&format!("NOOP {}", "x".repeat(300))).await,
            "-ERR Line too long\r\n"
        );
        c.send_bytes(&vec![b'y'; 1 << 20]).await;
        assert_eq!(c.cmd("").await, "-ERR Line too long\r\n");
        assert!(
            c.cmd("CAPA").await.starts_with("+OK"),
            "the session goes on"
        );
        c.multiline_raw().await;
        // SMTP: a command line over 1000 octets.
        let mut s = smtp_ehlo(smtp).await;
        let r = s
            .say(&format!("MAIL FROM:<{}@example.net>", "a".repeat(1200)))
            .await;
        assert_eq!(r, "500 5.5.2 Line too long\r\n");
        assert!(s.say("NOOP").await.starts_with("250"));
        // DATA: a 100 KiB header line is no command: stored as sent (RFC 5321
        // §4.5.3.1: no limit where none is needed); a message over max_message_bytes,
        // in one line, gets 552 and the session goes on. Once only: what the store
        // writes stays partly in the process after it closes (docs/SECURITY.md), and
        // this suite is about connections.
        if round >= 1 {
            return;
        }
        let mut l = Raw::plain(lmtp).await;
        l.reply().await;
        for cmd in [
            "LHLO hostile.test".to_owned(),
            "MAIL FROM:<a@example.net>".to_owned(),
            format!("RCPT TO:<{VICTIM}>"),
            "DATA".to_owned(),
        ] {
            l.say(&cmd).await;
        }
        let mut long = format!(
            "Subject: long\r\nX-Long: {}\r\n\r\nbody\r\n",
            "h".repeat(100 << 10)
        );
        long.push_str(".\r\n");
        l.send(&long).await;
        let r = l.reply().await;
        assert!(r.starts_with("250"), "a long header line: {r}");
        for cmd in [
            "MAIL FROM:<a@example.net>".to_owned(),
            format!("RCPT TO:<{VICTIM}>"),
            "DATA".to_owned(),
        ] {
            l.say(&cmd).await;
        }
        l.send_bytes(&vec![b'z'; 2 << 20]).await;
        let r = l.say("\r\n.").await;
        assert!(r.starts_with("552 5.3.4"), "over max_message_bytes: {r}");
        assert!(l.say("NOOP").await.starts_with("250"));
    };

    let bad_bytes = move |ca: std::path::PathBuf| async move {
        let mut c = pop3s(pop3s_addr, &ca).await;
        for line in [
            &b"NO\0OP\r\n"[..],
            b"USER jo\0e@example.org\r\n",
            b"USER jo\xffe@example.org\r\n",
            b"\xc3\x28\xa0\xa1\r\n",
        ] {
            c.send_bytes(line).await;
            let r = c.line().await;
            assert!(
                r.starts_with("-ERR"),
                "{:?}: {r}",
                String::from_utf8_lossy(line)
            );
        }
        for password in [&b"correct\0horse"[..], b"correct\xff\xfehorse"] {
            assert!(c.cmd(&format!("USER {VICTIM}")).await.starts_with("+OK"));
            let mut pass = b"PASS ".to_vec();
            pass.extend_from_slice(password);
            pass.extend_from_slice(b"\r\n");
            c.send_bytes(&pass).await;
            let r = c.line().await;
            assert!(r.starts_with("-ERR"), "{r}");
        }
        // Each on a connection of its own: the third failed login closes one.
        for sasl in [
            &b"\0jo\0e@example.org\0pw"[..],
            b"\0jo\xffe@example.org\0pw",
            b"\0eve@example.org\0\xff\xfe",
        ] {
            let mut c = pop3s(pop3s_addr, &ca).await;
            let r = c.cmd(&format!("AUTH PLAIN {}", b64(sasl))).await;
            assert!(r.starts_with("-ERR"), "{sasl:?}: {r}");
            assert!(
                c.cmd("CAPA").await.starts_with("+OK"),
                "the session goes on"
            );
            c.multiline_raw().await;
        }
        let mut s = smtp_ehlo(smtp).await;
        for (line, want) in [
            (&b"EH\0LO x\r\n"[..], '5'),
            (b"MAIL FROM:<a\0b@example.net>\r\n", '5'),
            (b"MAIL FROM:<a\xffb@example.net>\r\n", '5'),
            (b"MAIL FROM:<a@example.net>\r\n", '2'),
            (b"RCPT TO:<e\0ve@example.org>\r\n", '5'),
            (b"RCPT TO:<ev\xc3\x28e@example.org>\r\n", '5'),
            (b"RSET\r\n", '2'),
        ] {
            s.send_bytes(line).await;
            let r = s.reply().await;
            assert!(
                r.starts_with(want) && !r.starts_with("421"),
                "{:?}: {r}",
                String::from_utf8_lossy(line)
            );
        }
    };

    let second_tls = move |ca: std::path::PathBuf| async move {
        let mut c = Raw::plain(pop3).await;
        c.line().await;
        assert!(c.cmd("STLS").await.starts_with("+OK"));
        let mut c = c.starttls(&ca, "localhost").await;
        assert_eq!(c.cmd("STLS").await, "-ERR Already using TLS\r\n");
        let mut c = pop3s(pop3s_addr, &ca).await;
        assert_eq!(c.cmd("STLS").await, "-ERR Already using TLS\r\n");
        let mut s = smtp_ehlo(smtp).await;
        assert!(s.say("STARTTLS").await.starts_with("220"));
        let mut s = s.starttls(&ca, "localhost").await;
        let ehlo = s.say("EHLO hostile.test").await;
        assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
        assert!(s.say("STARTTLS").await.starts_with("503 5.5.1"));
        assert!(s.say("NOOP").await.starts_with("250"));
    };

    let oversized_auth = move |ca: std::path::PathBuf| async move {
        let mut c = pop3s(pop3s_addr, &ca).await;
        // An initial response that makes the command line longer than 255 octets.
        let ir = b64(format!("\0{VICTIM}\0{}", "p".repeat(300)).as_bytes());
        assert_eq!(
            c.cmd(&format!("AUTH PLAIN {ir}")).await,
            "-ERR Line too long\r\n"
        );
        // A continuation over 4096 octets.
        assert_eq!(c.cmd("AUTH PLAIN").await, "+ \r\n");
        assert_eq!(
            c.cmd(&"A".repeat(5000)).await,
            "-ERR Authentication response too long\r\n"
        );
        // One within the line limit whose fields are over 255 octets.
        assert_eq!(c.cmd("AUTH PLAIN").await, "+ \r\n");
        let fat = b64(format!("\0{VICTIM}\0{}", "p".repeat(2000)).as_bytes());
        assert!(c.cmd(&fat).await.starts_with("-ERR [AUTH]"));
        // SCRAM-SHA-256: a client-first over 2048 octets, a continuation over 4096, and
        // an oversized client-final.
        assert_eq!(c.cmd("AUTH SCRAM-SHA-256").await, "+ \r\n");
        let first = b64(format!("n,,n={VICTIM},r={}", "a".repeat(2100)).as_bytes());
        assert_eq!(c.cmd(&first).await, "-ERR Malformed SCRAM message\r\n");
        assert_eq!(c.cmd("AUTH SCRAM-SHA-256").await, "+ \r\n");
        assert_eq!(
            c.cmd(&"A".repeat(5000)).await,
            "-ERR Authentication response too long\r\n"
        );
        let first = b64(format!("n,,n={VICTIM},r=clientnonce").as_bytes());
        let challenge = c.cmd(&format!("AUTH SCRAM-SHA-256 {first}")).await;
        assert!(challenge.starts_with("+ "), "{challenge}");
        assert_eq!(
            c.cmd(&"A".repeat(5000)).await,
            "-ERR Authentication response too long\r\n"
        );
        let challenge = c.cmd(&format!("AUTH SCRAM-SHA-256 {first}")).await;
        assert!(challenge.starts_with("+ "), "{challenge}");
        let fat_final = b64(format!("c=biws,r={}", "b".repeat(2900)).as_bytes());
        assert!(c.cmd(&fat_final).await.starts_with("-ERR [AUTH]"));
        assert!(
            c.cmd("CAPA").await.starts_with("+OK"),
            "the session goes on"
        );
        c.multiline_raw().await;
        // APOP: over-long arguments (a connection of its own: two failed logins above).
        let mut c = pop3s(pop3s_addr, &ca).await;
        let digest = "0".repeat(32);
        assert_eq!(
            c.cmd(&format!("APOP {VICTIM} {}", "0".repeat(300))).await,
            "-ERR Line too long\r\n"
        );
        assert!(c
            .cmd(&format!("APOP {VICTIM} {}", "0".repeat(33)))
            .await
            .starts_with("-ERR"));
        assert_eq!(
            c.cmd(&format!("APOP {} {digest}", "n".repeat(260))).await,
            "-ERR Line too long\r\n"
        );
        assert!(c
            .cmd(&format!("APOP {}@example.org {digest}", "n".repeat(200)))
            .await
            .starts_with("-ERR"));
        assert!(
            c.cmd("CAPA").await.starts_with("+OK"),
            "the session goes on"
        );
        c.multiline_raw().await;
    };

    let attack = async {
        let mut set = tokio::task::JoinSet::new();
        for round in 0..ROUNDS {
            set.spawn(overlong(ca.clone(), round));
            set.spawn(bad_bytes(ca.clone()));
            set.spawn(second_tls(ca.clone()));
            set.spawn(oversized_auth(ca.clone()));
        }
        while let Some(r) = set.join_next().await {
            r.expect("attacker");
        }
    };
    Box::pin(under_attack(&server, &memory, "malformed commands", attack)).await;
}

/// A cleartext POP3 connection whose PROXY v1 header names `client`, past its greeting.
async fn from(addr: SocketAddr, client: &str) -> Raw {
    let header = format!("PROXY TCP4 {client} 127.0.0.1 40000 110\r\n");
    let mut c = Raw::plain_after(addr, header.as_bytes()).await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("+OK"), "{client}: {greeting}");
    c
}

/// Login floods through a trusted PROXY-protocol source: many failed logins from one
/// address get `[AUTH]` until its per-IP limit, then `[LOGIN-DELAY]` even with the right
/// password; many addresses guessing one account get `[LOGIN-DELAY]` for that account
/// once its limit is reached, also from a fresh address. Another user, from another
/// address, logs in throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_floods_are_throttled_while_others_log_in() {
    const PER_IP: u32 = 10;
    const PER_ACCOUNT: u32 = 15;
    const FLOOD: u32 = 60;
    let (server, memory) = hostile_server(Options {
        allow_plaintext_auth: true,
        auth_failure_delay_ms: 10,
        max_auth_failures_per_ip: PER_IP,
        max_auth_failures_per_account: PER_ACCOUNT,
        extra: "[proxy_protocol]\nlisteners = [\"pop3\"]\ntrusted_networks = [\"127.0.0.1\"]\n"
            .into(),
        ..Options::default()
    })
    .await;
    server.add_user("ann@example.org", crate::common::PASSWORD);
    let addr = server.pop3;

    let one_ip = async {
        let mut answers = Vec::new();
        for i in 0..FLOOD {
            let mut c = from(addr, "198.51.100.1").await;
            assert!(c
                .cmd(&format!("USER guess{i}@example.org"))
                .await
                .starts_with("+OK"));
            answers.push(c.cmd("PASS wrong").await);
        }
        for (i, a) in answers.iter().enumerate() {
            let want = if (i as u32) < PER_IP {
                "-ERR [AUTH]"
            } else {
                "-ERR [LOGIN-DELAY]"
            };
            assert!(a.starts_with(want), "one IP, attempt {i}: {a}");
        }
        let mut c = from(addr, "198.51.100.1").await;
        assert!(c.cmd(&format!("USER {VICTIM}")).await.starts_with("+OK"));
        let r = c.cmd(&format!("PASS {}", crate::common::PASSWORD)).await;
        assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "the throttled IP: {r}");
    };

    let one_account = async {
        let mut answers = Vec::new();
        for i in 0..FLOOD {
            let mut c = from(addr, &format!("203.0.113.{}", i + 1)).await;
            assert!(c.cmd(&format!("USER {VICTIM}")).await.starts_with("+OK"));
            answers.push(c.cmd("PASS wrong").await);
        }
        for (i, a) in answers.iter().enumerate() {
            let want = if (i as u32) < PER_ACCOUNT {
                "-ERR [AUTH]"
            } else {
                "-ERR [LOGIN-DELAY]"
            };
            assert!(a.starts_with(want), "one account, attempt {i}: {a}");
        }
        let mut c = from(addr, "192.0.2.200").await;
        assert!(c.cmd(&format!("USER {VICTIM}")).await.starts_with("+OK"));
        let r = c.cmd(&format!("PASS {}", crate::common::PASSWORD)).await;
        assert!(
            r.starts_with("-ERR [LOGIN-DELAY]"),
            "the throttled account: {r}"
        );
    };

    let legitimate = async {
        let mut logins = 0;
        for _ in 0..10 {
            let mut c = from(addr, "192.0.2.10").await;
            let r = c.login("ann@example.org", crate::common::PASSWORD).await;
            assert!(r.starts_with("+OK"), "the other user: {r}");
            assert!(c.cmd("QUIT").await.starts_with("+OK"));
            logins += 1;
        }
        logins
    };

    let ((), (), logins) = Box::pin(under_attack(&server, &memory, "login floods", async {
        tokio::join!(
            Box::pin(one_ip),
            Box::pin(one_account),
            Box::pin(legitimate)
        )
    }))
    .await;
    eprintln!("login floods: {FLOOD} from one IP, {FLOOD} against one account; {logins} logins of another user");
}
