//! Crash rounds: the `mailgate serve` binary killed with SIGKILL at random moments, then
//! restarted on the same data dir, and the store's promises checked through real
//! clients (LMTP in, POP3S out): every message answered `250` for a recipient is in that
//! recipient's maildrop byte for byte (the sent message behind the trace headers); a
//! message whose reply was in flight may be there, but whole; nothing refused or never
//! sent is there; no UIDL ever names two messages; a QUIT with many DELE marks is applied
//! all or not at all; an admin operation is done or not done, never half; the stores
//! open without a repair or an error line in the log. Rounds are cheap (small stores,
//! mostly short messages); `CRASH_ROUNDS=N` runs N times as many, `CRASH_SEED=S` replays
//! a round sequence (each test prints its seed).

use crate::common::cluster::{replica_name, Cluster, ClusterOptions};
use crate::common::{tls_connector, Options, Server, PASSWORD};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DOMAIN: &str = "crash.test";
const SENDER: &str = "s@sender.test";
const HELO: &str = "mta.crash.test";
/// Bounds every read and write of the test's clients: a server that stops answering
/// while alive fails the round instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a check after a restart waits for a maildrop (a killed replica's Redis
/// lock lives until its TTL) or a domain's home to be usable again.
const SETTLE: Duration = Duration::from_secs(30);

fn address(local: &str) -> String {
    format!("{local}@{DOMAIN}")
}

/// `ci` rounds, times `CRASH_ROUNDS` (default 1) for longer local sessions.
fn rounds(ci: usize) -> usize {
    let factor = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1);
    ci * factor.max(1)
}

/// The test's random source: `CRASH_SEED` or a fresh seed, printed so a failing
/// sequence of rounds can be run again.
fn seeded(test: &str) -> (StdRng, u64) {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (replay: CRASH_SEED={seed})");
    (StdRng::seed_from_u64(seed), seed)
}

type Io<T> = Result<T, String>;

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// A client connection whose every failure is a value: the server may die under it.
struct Conn {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
}

impl Conn {
    async fn tcp(addr: SocketAddr) -> Io<Conn> {
        let s = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect {addr}: timeout"))?
            .map_err(|e| format!("connect {addr}: {e}"))?;
        Ok(Conn {
            stream: Box::new(s),
            buf: Vec::new(),
        })
    }

    async fn tls(addr: SocketAddr, ca: &Path) -> Io<Conn> {
        let s = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect {addr}: timeout"))?
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = tokio::time::timeout(IO_TIMEOUT, tls_connector(ca).connect(name, s))
            .await
            .map_err(|_| "TLS handshake: timeout".to_owned())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        Ok(Conn {
            stream: Box::new(tls),
            buf: Vec::new(),
        })
    }

    async fn send(&mut self, data: &[u8]) -> Io<()> {
        let write = async {
            self.stream.write_all(data).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(IO_TIMEOUT, write)
            .await
            .map_err(|_| "write: timeout".to_owned())?
            .map_err(|e| format!("write: {e}"))
    }

    async fn line(&mut self) -> Io<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                return Ok(self.buf.drain(..=i).collect());
            }
            let mut chunk = [0u8; 16384];
            let n = tokio::time::timeout(IO_TIMEOUT, self.stream.read(&mut chunk))
                .await
                .map_err(|_| "read: timeout".to_owned())?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("read: connection closed".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn text_line(&mut self) -> Io<String> {
        Ok(String::from_utf8_lossy(&self.line().await?).into_owned())
    }

    /// An SMTP/LMTP reply with its continuation lines.
    async fn reply(&mut self) -> Io<String> {
        let mut text = String::new();
        loop {
            let line = self.text_line().await?;
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(text);
            }
        }
    }

    async fn say(&mut self, line: &str) -> Io<String> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// A POP3 command and its status line.
    async fn cmd(&mut self, line: &str) -> Io<String> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        self.text_line().await
    }

    /// A POP3 multi-line body, dot-stuffing undone, without the terminator.
    async fn multiline(&mut self) -> Io<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let line = self.line().await?;
            if line == b".\r\n" {
                return Ok(out);
            }
            let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
            out.extend_from_slice(unstuffed);
        }
    }
}

/// A POP3S session of `user` with `password`, in TRANSACTION; `Err` carries the refusal.
async fn pop3_login(addr: SocketAddr, ca: &Path, user: &str, password: &str) -> Io<Conn> {
    let mut c = Conn::tls(addr, ca).await?;
    let greeting = c.text_line().await?;
    if !greeting.starts_with("+OK") {
        return Err(greeting);
    }
    let r = c.cmd(&format!("USER {user}")).await?;
    if !r.starts_with("+OK") {
        return Err(r);
    }
    let r = c.cmd(&format!("PASS {password}")).await?;
    if !r.starts_with("+OK") {
        return Err(r);
    }
    Ok(c)
}

/// `pop3_login` with [`PASSWORD`], retried while the answer is "try later" (a killed
/// replica's lock until its TTL, a domain without a serving home yet).
async fn pop3_session(addr: SocketAddr, ca: &Path, user: &str) -> Conn {
    let deadline = Instant::now() + SETTLE;
    loop {
        match pop3_login(addr, ca, user, PASSWORD).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    e.contains("[IN-USE]") || e.contains("[SYS/TEMP]") || e.starts_with("read:"),
                    "login {user} through {addr}: {e}"
                );
                assert!(Instant::now() < deadline, "login {user}: still {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Every message of a POP3 session: (UIDL, octets from LIST, RETR content).
async fn retrieve_all(c: &mut Conn) -> Io<Vec<(String, usize, Vec<u8>)>> {
    let (order, sizes) = uidl_sizes(c).await?;
    let mut out = Vec::new();
    // A fresh session numbers its messages 1.. in UIDL order.
    for (i, uid) in order.into_iter().enumerate() {
        let n = i + 1;
        let r = c.cmd(&format!("RETR {n}")).await?;
        if !r.starts_with("+OK") {
            return Err(format!("RETR {n}: {r}"));
        }
        let body = c.multiline().await?;
        let octets = sizes[&uid];
        out.push((uid, octets, body));
    }
    Ok(out)
}

/// A message with a unique `X-Crash-Id`, CRLF line ends, some lines starting with a dot
/// (dot-stuffed on the wire); large ones span several 64 KiB store chunks.
fn make_message(rng: &mut StdRng, id: &str, big: bool) -> Vec<u8> {
    let mut m = format!(
        "From: <{SENDER}>\r\nTo: <crash@{DOMAIN}>\r\nSubject: crash round {id}\r\nX-Crash-Id: {id}\r\n\r\n"
    )
    .into_bytes();
    let target = if big {
        rng.gen_range(65_537..200_000)
    } else {
        rng.gen_range(40..3_000)
    };
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.:";
    while m.len() < target {
        if rng.gen_ratio(1, 15) {
            m.push(b'.');
        }
        let len = rng.gen_range(0..120);
        m.extend((0..len).map(|_| CHARS[rng.gen_range(0..CHARS.len())]));
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// The bytes of DATA for `message`: dot-stuffed, with the terminator.
fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

fn crash_id(stored: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stored);
    text.split("\r\nX-Crash-Id: ")
        .nth(1)
        .and_then(|r| r.split("\r\n").next())
        .map(str::to_owned)
}

/// Checks that `stored` is exactly the trace headers the server adds (Return-Path, then
/// Received with its continuation lines, naming the recipient when it was the only one)
/// followed by the message as sent.
fn check_stored(stored: &[u8], sent: &Sent, rcpt: &str) -> Result<(), String> {
    let Some(prefix) = stored
        .len()
        .checked_sub(sent.message.len())
        .filter(|&at| stored[at..] == sent.message[..])
        .map(|at| String::from_utf8_lossy(&stored[..at]).into_owned())
    else {
        return Err(format!(
            "{}: stored {} octets do not end with the {} sent",
            sent.id,
            stored.len(),
            sent.message.len()
        ));
    };
    let head = format!("Return-Path: <{SENDER}>\r\nReceived: from {HELO} ([");
    let lines: Vec<&str> = prefix.split_inclusive("\r\n").collect();
    let single = sent.accepted == 1;
    let ok = prefix.starts_with(&head)
        && lines.len() == if single { 5 } else { 4 }
        && lines.iter().all(|l| l.ends_with("\r\n"))
        && lines[2].starts_with("\tby mail.test (mailgate) with LMTP id ")
        && lines[2..].iter().all(|l| l.starts_with('\t'))
        && (!single || lines[3] == format!("\tfor <{rcpt}>;\r\n"));
    if ok {
        Ok(())
    } else {
        Err(format!("{}: unexpected trace headers {prefix:?}", sent.id))
    }
}

/// What a recipient of a sent message may find in its maildrop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// RCPT or the final reply refused it, or DATA never began: must not be there.
    Absent,
    /// The body went out, the final reply was not read: there whole, or not at all.
    Maybe,
    /// Answered 250: must be there.
    Acked,
}

struct Sent {
    id: String,
    message: Vec<u8>,
    rcpts: Vec<(String, Fate)>,
    /// Recipients accepted at RCPT: the trace headers name the recipient when only one was.
    accepted: usize,
}

impl Sent {
    fn fate(&self, rcpt: &str) -> Option<Fate> {
        self.rcpts.iter().find(|(r, _)| r == rcpt).map(|(_, f)| *f)
    }
}

/// What one LMTP client did until it stopped: everything it tried, and the error that
/// stopped it (with when), if any.
#[derive(Default)]
struct Delivered {
    sent: Vec<Sent>,
    error: Option<(Instant, String)>,
}

/// How one LMTP load client runs.
#[derive(Clone)]
struct Load {
    addr: SocketAddr,
    users: Vec<String>,
    /// At most this many messages.
    max: usize,
    /// One message in `big` is larger than a store chunk (0: none).
    big: u32,
    /// Stops the client between messages.
    stop: Arc<AtomicBool>,
}

/// The senders' results once they end; none may have failed before the kill.
async fn join_senders(
    senders: Vec<tokio::task::JoinHandle<Delivered>>,
    killed: Instant,
    ctx: &str,
) -> Vec<Delivered> {
    let mut delivered = Vec::new();
    for s in senders {
        let d = s.await.expect("sender");
        if let Some((at, e)) = &d.error {
            assert!(
                *at >= killed,
                "{ctx}: a delivery failed before the kill: {e}"
            );
        }
        delivered.push(d);
    }
    delivered
}

/// Delivers messages (each to 1–3 users) over one LMTP connection after another, until
/// `max`, `stop` or an error (the kill).
async fn lmtp_load(load: Load, tag: String, seed: u64) -> Delivered {
    let Load {
        addr,
        users,
        max,
        big,
        stop,
    } = load;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Delivered::default();
    let mut n = 0;
    while n < max && !stop.load(Ordering::SeqCst) {
        let mut c = match Conn::tcp(addr).await {
            Ok(c) => c,
            Err(e) => {
                out.error = Some((Instant::now(), e));
                return out;
            }
        };
        let result = async {
            let r = c.reply().await?;
            if !r.starts_with("220") {
                return Err(format!("greeting: {r}"));
            }
            let r = c.say(&format!("LHLO {HELO}")).await?;
            if !r.starts_with("250") {
                return Err(format!("LHLO: {r}"));
            }
            // A few messages per connection, then a fresh one.
            for _ in 0..rng.gen_range(1..6) {
                if n == max || stop.load(Ordering::SeqCst) {
                    break;
                }
                let id = format!("{tag}-{n}");
                n += 1;
                let large = big > 0 && rng.gen_ratio(1, big);
                let message = make_message(&mut rng, &id, large);
                let count = rng.gen_range(1..=3.min(users.len()));
                let rcpts: Vec<(String, Fate)> = users
                    .choose_multiple(&mut rng, count)
                    .map(|u| (u.clone(), Fate::Absent))
                    .collect();
                out.sent.push(Sent {
                    id,
                    message,
                    rcpts,
                    accepted: 0,
                });
                let sent = out.sent.last_mut().expect("just pushed");
                lmtp_transaction(&mut c, sent).await?;
            }
            c.say("QUIT").await.map(drop)
        }
        .await;
        if let Err(e) = result {
            out.error = Some((Instant::now(), e));
            return out;
        }
    }
    out
}

/// One MAIL/RCPT/DATA exchange, recording each recipient's fate as the replies come. A
/// temporary refusal (4xx, e.g. while a domain moves) is an answer, not an error: that
/// recipient does not get the message, as an MTA would retry it later.
async fn lmtp_transaction(c: &mut Conn, sent: &mut Sent) -> Io<()> {
    let r = c.say(&format!("MAIL FROM:<{SENDER}>")).await?;
    if !r.starts_with("250") {
        return Err(format!("MAIL: {r}"));
    }
    let mut accepted = Vec::new();
    for (i, (rcpt, _)) in sent.rcpts.iter().enumerate() {
        let r = c.say(&format!("RCPT TO:<{rcpt}>")).await?;
        if r.starts_with("250") {
            accepted.push(i);
        } else if !r.starts_with('4') {
            return Err(format!("RCPT {rcpt}: {r}"));
        }
    }
    sent.accepted = accepted.len();
    if accepted.is_empty() {
        let r = c.say("RSET").await?;
        return if r.starts_with("250") {
            Ok(())
        } else {
            Err(format!("RSET: {r}"))
        };
    }
    let r = c.say("DATA").await?;
    if !r.starts_with("354") {
        return Err(format!("DATA: {r}"));
    }
    for &i in &accepted {
        sent.rcpts[i].1 = Fate::Maybe;
    }
    c.send(&dot_stuffed(&sent.message)).await?;
    let mut refused = None;
    for &i in &accepted {
        let r = c.reply().await?;
        if r.starts_with("250") {
            sent.rcpts[i].1 = Fate::Acked;
        } else if r.starts_with("451 4.4.0 ") {
            // A front replica lost its link to the home after the body went out: the
            // home's own answer, and so the outcome, is unknown (the fate stays Maybe).
        } else {
            sent.rcpts[i].1 = Fate::Absent;
            if !r.starts_with('4') {
                refused = Some(format!("{} for {}: {r}", sent.id, sent.rcpts[i].0));
            }
        }
    }
    refused.map_or(Ok(()), Err)
}

/// What POP3 readers saw before a kill: (user, UIDL) → (the message's id, the SHA-256
/// of its content).
type Seen = HashMap<(String, String), (String, String)>;

/// Reads whole maildrops over POP3S (without deleting) until an error (the kill),
/// recording what each UIDL named.
async fn pop3_reader(
    addr: SocketAddr,
    ca: std::path::PathBuf,
    users: Vec<String>,
    seed: u64,
) -> (Seen, Option<(Instant, String)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = Seen::new();
    for _ in 0..1000 {
        let user = users.choose(&mut rng).expect("users").clone();
        let result = async {
            let mut c = pop3_login(addr, &ca, &user, PASSWORD).await?;
            for (uid, _, content) in retrieve_all(&mut c).await? {
                let id = crash_id(&content).ok_or_else(|| format!("{uid}: no id"))?;
                seen.insert(
                    (user.clone(), uid),
                    (id, crate::common::hex_sha256(&content)),
                );
            }
            let r = c.cmd("QUIT").await?;
            if r.starts_with("+OK") {
                Ok(())
            } else {
                Err(format!("QUIT: {r}"))
            }
        }
        .await;
        if let Err(e) = result {
            return (seen, Some((Instant::now(), e)));
        }
    }
    (seen, None)
}

/// Every UIDL ever seen in a test, with the message it named; one that names another
/// message later (after a deletion, a kill, a restart) fails the round.
#[derive(Default)]
struct Uidls(HashMap<(String, String), String>);

impl Uidls {
    fn record(&mut self, user: &str, uid: &str, id: &str, ctx: &str) {
        let key = (user.to_owned(), uid.to_owned());
        if let Some(before) = self.0.get(&key) {
            assert_eq!(
                before, id,
                "{ctx}: UIDL {uid} of {user} named {before} and now names {id}"
            );
        } else {
            self.0.insert(key, id.to_owned());
        }
    }
}

/// What a test keeps across its rounds: every UIDL seen, and the tallies.
#[derive(Default)]
struct Books {
    uidls: Uidls,
    tally: Tally,
}

/// Tallies of the delivery checks, for the summary line.
#[derive(Default, Debug)]
struct Tally {
    acked: usize,
    in_flight_kept: usize,
    in_flight_gone: usize,
}

/// After a restart: each user's maildrop (read through `server`) against what the
/// clients were told. Optionally empties the maildrops afterwards (a clean QUIT).
async fn check_maildrops(
    server: &Server,
    users: &[String],
    sent: &[&Sent],
    seen: &Seen,
    books: &mut Books,
    empty: bool,
    ctx: &str,
) {
    let Books { uidls, tally } = books;
    let by_id: HashMap<&str, &Sent> = sent.iter().map(|s| (s.id.as_str(), *s)).collect();
    for ((user, uid), (id, _)) in seen {
        uidls.record(user, uid, id, ctx);
    }
    for user in users {
        let mut c = pop3_session(server.pop3s, &server.ca.ca_pem, user).await;
        let messages = retrieve_all(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: reading {user}: {e}"));
        let mut present = BTreeSet::new();
        for (uid, octets, content) in &messages {
            assert_eq!(
                *octets,
                content.len(),
                "{ctx}: {user} {uid}: LIST size and RETR differ"
            );
            let id = crash_id(content)
                .unwrap_or_else(|| panic!("{ctx}: {user} {uid}: a message without its id"));
            let s = by_id.get(id.as_str()).unwrap_or_else(|| {
                panic!(
                    "{ctx}: {user} has {id}, which was never sent in this round (or was deleted)"
                )
            });
            match s.fate(user) {
                Some(Fate::Acked) => tally.acked += 1,
                Some(Fate::Maybe) => tally.in_flight_kept += 1,
                other => panic!("{ctx}: {user} has {id}, whose fate was {other:?}"),
            }
            if let Err(e) = check_stored(content, s, user) {
                panic!("{ctx}: {user}: {e}");
            }
            assert!(present.insert(id.clone()), "{ctx}: {user} has {id} twice");
            uidls.record(user, uid, &id, ctx);
            if let Some((_, sha)) = seen.get(&(user.clone(), uid.clone())) {
                assert_eq!(
                    *sha,
                    crate::common::hex_sha256(content),
                    "{ctx}: {user} UIDL {uid} named other content before the kill"
                );
            }
        }
        for s in sent {
            match s.fate(user) {
                Some(Fate::Acked) => assert!(
                    present.contains(&s.id),
                    "{ctx}: {} was answered 250 for {user} and is lost",
                    s.id
                ),
                Some(Fate::Maybe) if !present.contains(&s.id) => tally.in_flight_gone += 1,
                _ => {}
            }
        }
        if empty {
            for n in 1..=messages.len() {
                let r = c.cmd(&format!("DELE {n}")).await.expect("DELE");
                assert!(r.starts_with("+OK"), "{ctx}: DELE {n}: {r}");
            }
        }
        let quit = Instant::now();
        let r = c.cmd("QUIT").await.unwrap_or_else(|e| {
            panic!(
                "{ctx}: QUIT after {:?} for {} messages: {e}; log since the restart:\n{}",
                quit.elapsed(),
                messages.len(),
                log_tail(server, 60)
            )
        });
        assert!(r.starts_with("+OK"), "{ctx}: QUIT: {r}");
    }
}

/// The last `n` lines of `server`'s log.
fn log_tail(server: &Server, n: usize) -> String {
    let log = server.log.lock().expect("log");
    log[log.len().saturating_sub(n)..].join("\n")
}

/// Fails on a log line since line `from` that speaks of a panic, an error, corruption
/// or a repair, or (unless `warnings` are expected, as on a replica whose peer was
/// killed) any warning; returns the new length.
fn check_log(server: &Server, from: usize, warnings: bool, ctx: &str) -> usize {
    let log = server.log.lock().expect("log");
    for line in log.iter().skip(from) {
        // sled's recovery dropping large values (our 64 KiB chunks) written for log
        // entries that never became durable: mail not yet acknowledged, which the
        // maildrop checks account for. Not a repair of durable data.
        if line.contains("sled::pagecache::blob_io: removing ")
            && line.contains(" blobs that have a higher lsn than our stable log")
        {
            continue;
        }
        let lower = line.to_lowercase();
        let bad = line.contains(" ERROR ")
            || (!warnings && line.contains(" WARN "))
            || lower.contains("panicked")
            || lower.contains("corrupt")
            || lower.contains("repair");
        assert!(!bad, "{ctx}: the server logged {line}");
    }
    log.len()
}

/// A `serve` process for single-replica rounds.
fn process_server() -> Server {
    Server::start_with(Options {
        process: true,
        max_connections_per_ip: 1000,
        auth_failure_delay_ms: 1,
        ..Options::default()
    })
}

/// Starts the load, kills the server at a random moment in it, joins the clients,
/// restarts the server and returns what the clients did (a client error before the
/// kill fails the round).
async fn delivery_round_kill(
    server: &mut Server,
    rng: &mut StdRng,
    users: &[String],
    clients: usize,
    readers: usize,
    round: usize,
    ctx: &str,
) -> (Vec<Delivered>, Seen) {
    let load = Load {
        addr: server.lmtp.expect("lmtp"),
        users: users.to_vec(),
        max: 200,
        big: 8,
        stop: Arc::default(),
    };
    let senders: Vec<_> = (0..clients)
        .map(|k| tokio::spawn(lmtp_load(load.clone(), format!("r{round}c{k}"), rng.gen())))
        .collect();
    let pop3: Vec<_> = (0..readers)
        .map(|_| {
            tokio::spawn(pop3_reader(
                server.pop3s,
                server.ca.ca_pem.clone(),
                users.to_vec(),
                rng.gen(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..800))).await;
    let killed = Instant::now();
    server.kill9();
    let delivered = join_senders(senders, killed, ctx).await;
    let mut seen = Seen::new();
    for r in pop3 {
        let (s, error) = r.await.expect("reader");
        if let Some((at, e)) = error {
            assert!(
                at >= killed,
                "{ctx}: a POP3 reader failed before the kill: {e}"
            );
        }
        seen.extend(s);
    }
    server.spawn();
    (delivered, seen)
}

/// LMTP delivery under load, killed at a random moment: every 250 is kept byte for
/// byte, nothing refused or unsent appears, in-flight messages are whole or absent, no
/// UIDL names two messages, before or after the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_rounds_lmtp_delivery_under_load() {
    let (mut rng, seed) = seeded("crash_rounds_lmtp_delivery_under_load");
    let mut server = process_server();
    server.cli_ok(&["domain", "add", DOMAIN], b"");
    let users: Vec<String> = (0..4).map(|i| address(&format!("u{i}"))).collect();
    for u in &users {
        server.add_user(u, PASSWORD);
    }
    let mut books = Books::default();
    let mut log_at = 0;
    let total = rounds(40);
    let started = Instant::now();
    for round in 0..total {
        let ctx = format!("seed {seed} round {round}");
        let clients = rng.gen_range(2..=4);
        let (delivered, seen) =
            delivery_round_kill(&mut server, &mut rng, &users, clients, 1, round, &ctx).await;
        log_at = check_log(&server, log_at, false, &ctx);
        let sent: Vec<&Sent> = delivered.iter().flat_map(|d| &d.sent).collect();
        check_maildrops(&server, &users, &sent, &seen, &mut books, true, &ctx).await;
        log_at = check_log(&server, log_at, false, &ctx);
    }
    eprintln!(
        "crash_rounds_lmtp_delivery_under_load: {total} rounds in {:?}, seed {seed}: {:?}, {} UIDLs",
        started.elapsed(),
        books.tally,
        books.uidls.0.len()
    );
    assert!(
        books.tally.acked > 0,
        "no delivery was acknowledged in any round"
    );
}

/// Delivers `count` small messages to `user` over `lanes` LMTP connections at once;
/// every one must be answered 250 (the server is not being killed).
async fn top_up(server: &Server, user: &str, count: usize, next: &mut usize, lanes: usize) {
    let lmtp = server.lmtp.expect("lmtp");
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let ids: Vec<String> = (lane..count)
            .step_by(lanes)
            .map(|k| format!("stock-{}", *next + k))
            .collect();
        let user = user.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::tcp(lmtp).await.expect("lmtp");
            assert!(c.reply().await.expect("greeting").starts_with("220"));
            assert!(c
                .say(&format!("LHLO {HELO}"))
                .await
                .expect("LHLO")
                .starts_with("250"));
            let mut rng = StdRng::seed_from_u64(ids.len() as u64);
            for id in ids {
                let mut sent = Sent {
                    message: make_message(&mut rng, &id, false),
                    id,
                    rcpts: vec![(user.clone(), Fate::Absent)],
                    accepted: 0,
                };
                lmtp_transaction(&mut c, &mut sent)
                    .await
                    .expect("top-up delivery");
            }
            let _ = c.say("QUIT").await;
        }));
    }
    for t in tasks {
        t.await.expect("top-up lane");
    }
    *next += count;
}

/// The maildrop as UIDL → octets, from UIDL and LIST.
async fn uidl_sizes(c: &mut Conn) -> Io<(Vec<String>, BTreeMap<String, usize>)> {
    let r = c.cmd("UIDL").await?;
    if !r.starts_with("+OK") {
        return Err(format!("UIDL: {r}"));
    }
    let uidls = String::from_utf8_lossy(&c.multiline().await?).into_owned();
    let r = c.cmd("LIST").await?;
    if !r.starts_with("+OK") {
        return Err(format!("LIST: {r}"));
    }
    let sizes = String::from_utf8_lossy(&c.multiline().await?).into_owned();
    let order: Vec<String> = uidls
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    let octets: Vec<usize> = sizes
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    if order.len() != octets.len() {
        return Err(format!("UIDL {} lines, LIST {}", order.len(), octets.len()));
    }
    let map = order.iter().cloned().zip(octets).collect();
    Ok((order, map))
}

/// A session marks 50–300 messages deleted and sends QUIT; the server is killed at a
/// random moment around it. After the restart the marked messages are all gone or all
/// there (all gone when `+OK` was read), the others untouched, and new mail never gets
/// an old UIDL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_rounds_quit_with_many_dele_marks() {
    let (mut rng, seed) = seeded("crash_rounds_quit_with_many_dele_marks");
    let mut server = process_server();
    server.cli_ok(&["domain", "add", DOMAIN], b"");
    let user = address("q");
    server.add_user(&user, PASSWORD);
    let mut ever: BTreeSet<String> = BTreeSet::new();
    let mut stock: BTreeMap<String, usize> = BTreeMap::new();
    let mut next = 0;
    let (mut applied, mut not_applied, mut killed_before_quit) = (0, 0, 0);
    let mut log_at = 0;
    let total = rounds(35);
    let started = Instant::now();
    for round in 0..total {
        let ctx = format!("seed {seed} round {round}");
        let want = rng.gen_range(60..=320);
        if want > stock.len() {
            top_up(&server, &user, want - stock.len(), &mut next, 4).await;
        }
        let mut c = pop3_session(server.pop3s, &server.ca.ca_pem, &user).await;
        let (order, now) = uidl_sizes(&mut c).await.expect("listing");
        for (uid, octets) in &stock {
            assert_eq!(now.get(uid), Some(octets), "{ctx}: {uid} changed");
        }
        for uid in now.keys().filter(|u| !stock.contains_key(*u)) {
            assert!(
                ever.insert(uid.clone()),
                "{ctx}: new mail got the old UIDL {uid}"
            );
        }
        stock = now;
        let marks = rng.gen_range(50..=300.min(order.len()));
        let mut numbers: Vec<usize> = (1..=order.len()).collect();
        numbers.shuffle(&mut rng);
        numbers.truncate(marks);
        let marked: BTreeSet<String> = numbers.iter().map(|n| order[n - 1].clone()).collect();
        let dele: String = numbers.iter().map(|n| format!("DELE {n}\r\n")).collect();
        c.send(dele.as_bytes()).await.expect("DELE");
        for _ in 0..marks {
            let r = c.text_line().await.expect("DELE reply");
            assert!(r.starts_with("+OK"), "{ctx}: {r}");
        }
        let before_quit = rng.gen_ratio(1, 8);
        let quit_ok = if before_quit {
            killed_before_quit += 1;
            server.kill9();
            false
        } else {
            c.send(b"QUIT\r\n").await.expect("QUIT");
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..10_000)));
            server.kill9();
            c.text_line().await.is_ok_and(|r| r.starts_with("+OK"))
        };
        drop(c);
        server.spawn();
        log_at = check_log(&server, log_at, false, &ctx);
        let mut c = pop3_session(server.pop3s, &server.ca.ca_pem, &user).await;
        let (_, after) = uidl_sizes(&mut c).await.expect("listing after");
        assert!(c.cmd("QUIT").await.expect("QUIT").starts_with("+OK"));
        let gone: BTreeSet<&String> = marked.iter().filter(|u| !after.contains_key(*u)).collect();
        assert!(
            gone.is_empty() || gone.len() == marked.len(),
            "{ctx}: QUIT applied {} of {} marks",
            gone.len(),
            marked.len()
        );
        assert!(
            !quit_ok || !gone.is_empty(),
            "{ctx}: QUIT answered +OK but nothing was deleted"
        );
        assert!(
            !before_quit || gone.is_empty(),
            "{ctx}: deleted without QUIT"
        );
        for (uid, octets) in &stock {
            if !marked.contains(uid) {
                assert_eq!(
                    after.get(uid),
                    Some(octets),
                    "{ctx}: unmarked {uid} changed"
                );
            }
        }
        for uid in after.keys() {
            assert!(
                stock.contains_key(uid),
                "{ctx}: {uid} appeared from nowhere"
            );
        }
        if gone.is_empty() {
            not_applied += 1;
        } else {
            applied += 1;
        }
        stock = after;
        log_at = check_log(&server, log_at, false, &ctx);
    }
    eprintln!(
        "crash_rounds_quit_with_many_dele_marks: {total} rounds in {:?}, seed {seed}: {applied} applied, {not_applied} not applied ({killed_before_quit} killed before QUIT)",
        started.elapsed()
    );
}

/// One account's possible states: absent, or present with this password.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Acct {
    Absent,
    Present(String),
}

/// What the admin operations may have left: each thing's possible states. A finished
/// operation leaves one; an interrupted one leaves the state before and the state after.
#[derive(Default)]
struct Model {
    accounts: BTreeMap<String, BTreeSet<Acct>>,
    /// Accounts whose quota is toggled: `true` = 1 KiB, `false` = unlimited.
    quotas: BTreeMap<String, BTreeSet<bool>>,
    domains: BTreeMap<String, BTreeSet<bool>>,
}

fn one<T: Ord + Clone>(set: &BTreeSet<T>) -> Option<T> {
    (set.len() == 1)
        .then(|| set.iter().next().cloned())
        .flatten()
}

/// One admin operation chosen among those whose target is in a known state: its
/// arguments, stdin, and the state it leads to.
enum Op {
    Account(String, Acct),
    Quota(String, bool),
    Domain(String, bool),
}

fn pick_op(rng: &mut StdRng, model: &Model, n: usize) -> (Vec<String>, Vec<u8>, Op) {
    loop {
        match rng.gen_range(0..10) {
            0..=5 => {
                let (name, states) = model
                    .accounts
                    .iter()
                    .collect::<Vec<_>>()
                    .choose(rng)
                    .map(|(n, s)| ((*n).clone(), (*s).clone()))
                    .expect("accounts");
                let password = format!("pw-{n}");
                let stdin = format!("{password}\n").into_bytes();
                let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
                match one(&states) {
                    Some(Acct::Absent) => {
                        return (
                            args(&["user", "add", &name, "--password-stdin"]),
                            stdin,
                            Op::Account(name, Acct::Present(password)),
                        )
                    }
                    Some(Acct::Present(_)) if rng.gen_ratio(1, 3) => {
                        return (
                            args(&["user", "remove", &name]),
                            Vec::new(),
                            Op::Account(name, Acct::Absent),
                        )
                    }
                    Some(Acct::Present(_)) => {
                        return (
                            args(&["user", "passwd", &name, "--password-stdin"]),
                            stdin,
                            Op::Account(name, Acct::Present(password)),
                        )
                    }
                    None => {}
                }
            }
            6..=7 => {
                let name = model.quotas.keys().cloned().collect::<Vec<_>>();
                let name = name.choose(rng).expect("quota accounts").clone();
                let limited = rng.gen_bool(0.5);
                let limit = if limited { "1K" } else { "unlimited" };
                return (
                    vec!["user".into(), "quota".into(), name.clone(), limit.into()],
                    Vec::new(),
                    Op::Quota(name, limited),
                );
            }
            _ => {
                let name = model.domains.keys().cloned().collect::<Vec<_>>();
                let name = name.choose(rng).expect("domains").clone();
                if let Some(present) = one(&model.domains[&name]) {
                    let verb = if present { "remove" } else { "add" };
                    return (
                        vec!["domain".into(), verb.into(), name.clone()],
                        Vec::new(),
                        Op::Domain(name, !present),
                    );
                }
            }
        }
    }
}

/// Applies `op`'s outcome: `done` = the command succeeded; otherwise either state.
fn settle(model: &mut Model, op: &Op, done: bool) {
    fn set<T: Ord + Clone>(states: &mut BTreeSet<T>, to: &T, done: bool) {
        if done {
            states.clear();
        }
        states.insert(to.clone());
    }
    match op {
        Op::Account(name, to) => set(model.accounts.get_mut(name).expect("account"), to, done),
        Op::Quota(name, to) => set(model.quotas.get_mut(name).expect("quota"), to, done),
        Op::Domain(name, to) => set(model.domains.get_mut(name).expect("domain"), to, done),
    }
}

/// Whether `user`'s quota refuses a 4 KiB message at RCPT (limited to 1 KiB) or takes
/// it (unlimited).
async fn quota_limited(lmtp: SocketAddr, user: &str) -> bool {
    let mut c = Conn::tcp(lmtp).await.expect("lmtp");
    assert!(c.reply().await.expect("greeting").starts_with("220"));
    assert!(c
        .say(&format!("LHLO {HELO}"))
        .await
        .expect("LHLO")
        .starts_with("250"));
    let r = c
        .say(&format!("MAIL FROM:<{SENDER}> SIZE=4096"))
        .await
        .expect("MAIL");
    assert!(r.starts_with("250"), "{r}");
    let r = c.say(&format!("RCPT TO:<{user}>")).await.expect("RCPT");
    let _ = c.say("QUIT").await;
    match &r[..3] {
        "250" => false,
        "552" => true,
        _ => panic!("RCPT {user}: {r}"),
    }
}

/// Reads the state after a restart and narrows the model to it; fails when the state
/// is none of the possible ones.
async fn observe(server: &Server, model: &mut Model, ctx: &str) {
    let listed = server.cli_ok(&["domain", "list"], b"");
    let listed: BTreeSet<&str> = listed.lines().map(str::trim).collect();
    for (name, states) in model.domains.iter_mut() {
        let present = listed.contains(name.as_str());
        assert!(
            states.contains(&present),
            "{ctx}: domain {name} present={present}, expected one of {states:?}"
        );
        if present {
            // Its store opens and answers.
            server.cli_ok(&["user", "list", name], b"");
        }
        *states = BTreeSet::from([present]);
    }
    let users = server.cli_ok(&["user", "list", DOMAIN], b"");
    let users: BTreeSet<&str> = users.lines().map(str::trim).collect();
    for (name, states) in model.accounts.iter_mut() {
        let state = if users.contains(name.as_str()) {
            let mut works = Vec::new();
            for s in states.iter() {
                if let Acct::Present(pw) = s {
                    if let Ok(mut c) = pop3_login(server.pop3s, &server.ca.ca_pem, name, pw).await {
                        let _ = c.cmd("QUIT").await;
                        works.push(s.clone());
                    }
                }
            }
            assert_eq!(
                works.len(),
                1,
                "{ctx}: {name} exists; passwords that work: {works:?} of {states:?}"
            );
            works.remove(0)
        } else {
            Acct::Absent
        };
        assert!(
            states.contains(&state),
            "{ctx}: {name} is {state:?}, expected one of {states:?}"
        );
        *states = BTreeSet::from([state]);
    }
    let lmtp = server.lmtp.expect("lmtp");
    for (name, states) in model.quotas.iter_mut() {
        let limited = quota_limited(lmtp, name).await;
        assert!(
            states.contains(&limited),
            "{ctx}: quota of {name} limited={limited}, expected one of {states:?}"
        );
        *states = BTreeSet::from([limited]);
    }
}

/// Admin operations (user add/passwd/remove, quota, domain add/remove) through the CLI
/// while LMTP deliveries run, the server killed at a random moment: every operation is
/// done or not done, an existing account takes exactly one of its possible passwords,
/// every listed domain's store opens, and the deliveries keep their promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_rounds_admin_operations_under_delivery() {
    let (mut rng, seed) = seeded("crash_rounds_admin_operations_under_delivery");
    let mut server = process_server();
    server.cli_ok(&["domain", "add", DOMAIN], b"");
    let receivers: Vec<String> = (0..2).map(|i| address(&format!("d{i}"))).collect();
    let mut model = Model::default();
    for u in &receivers {
        server.add_user(u, PASSWORD);
    }
    for i in 0..2 {
        let q = address(&format!("q{i}"));
        server.add_user(&q, PASSWORD);
        model.quotas.insert(q, BTreeSet::from([false]));
    }
    for i in 0..5 {
        let a = address(&format!("a{i}"));
        if i < 3 {
            server.add_user(&a, PASSWORD);
            model
                .accounts
                .insert(a, BTreeSet::from([Acct::Present(PASSWORD.into())]));
        } else {
            model.accounts.insert(a, BTreeSet::from([Acct::Absent]));
        }
    }
    for i in 0..2 {
        model
            .domains
            .insert(format!("x{i}.admin.test"), BTreeSet::from([false]));
    }
    let mut books = Books::default();
    let (mut done, mut interrupted) = (0, 0);
    let mut log_at = 0;
    let total = rounds(25);
    let started = Instant::now();
    for round in 0..total {
        let ctx = format!("seed {seed} round {round}");
        let stop = Arc::new(AtomicBool::new(false));
        let admin = {
            let (stop, config) = (stop.clone(), server.config.clone());
            let mut model = std::mem::take(&mut model);
            let mut rng = StdRng::seed_from_u64(rng.gen());
            let tag = round * 1000;
            std::thread::spawn(move || {
                let (mut done, mut interrupted) = (0, 0);
                for n in 0..200 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let (args, stdin, op) = pick_op(&mut rng, &model, tag + n);
                    settle(&mut model, &op, false);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let out = crate::common::cli(&config, &args, &stdin);
                    if out.status.success() {
                        settle(&mut model, &op, true);
                        done += 1;
                    } else {
                        assert!(
                            stop.load(Ordering::SeqCst),
                            "{args:?} failed while the server ran: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        interrupted += 1;
                    }
                }
                (model, done, interrupted)
            })
        };
        let load = Load {
            addr: server.lmtp.expect("lmtp"),
            users: receivers.clone(),
            max: 100,
            big: 8,
            stop: Arc::default(),
        };
        let senders: Vec<_> = (0..2)
            .map(|k| tokio::spawn(lmtp_load(load.clone(), format!("r{round}c{k}"), rng.gen())))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..1500))).await;
        stop.store(true, Ordering::SeqCst);
        let killed = Instant::now();
        server.kill9();
        let delivered = join_senders(senders, killed, &ctx).await;
        let (m, d, i) = tokio::task::spawn_blocking(move || admin.join())
            .await
            .expect("join")
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        model = m;
        done += d;
        interrupted += i;
        server.spawn();
        log_at = check_log(&server, log_at, false, &ctx);
        observe(&server, &mut model, &ctx).await;
        let sent: Vec<&Sent> = delivered.iter().flat_map(|d| &d.sent).collect();
        check_maildrops(
            &server,
            &receivers,
            &sent,
            &Seen::new(),
            &mut books,
            true,
            &ctx,
        )
        .await;
        log_at = check_log(&server, log_at, false, &ctx);
    }
    eprintln!(
        "crash_rounds_admin_operations_under_delivery: {total} rounds in {:?}, seed {seed}: {done} operations done, {interrupted} interrupted; deliveries {:?}",
        started.elapsed(),
        books.tally
    );
}

/// Every message of `users` through `server` as (user, UIDL) → SHA-256 of the content.
async fn snapshot(server: &Server, users: &[String]) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    for user in users {
        let mut c = pop3_session(server.pop3s, &server.ca.ca_pem, user).await;
        let messages = retrieve_all(&mut c).await.expect("messages");
        for (uid, _, content) in messages {
            out.insert((user.clone(), uid), crate::common::hex_sha256(&content));
        }
        assert!(c.cmd("QUIT").await.expect("QUIT").starts_with("+OK"));
    }
    out
}

/// Waits until `DOMAIN`'s record is active and exactly one replica holds a live copy of
/// its store, the record's home; returns that replica's index.
async fn one_home(c: &Cluster, ctx: &str) -> usize {
    let deadline = Instant::now() + SETTLE;
    loop {
        let record = c.home_record(DOMAIN);
        let holders: Vec<usize> = (0..c.replicas.len())
            .filter(|&i| {
                c.replicas[i]
                    .dir
                    .path()
                    .join("data/domains")
                    .join(DOMAIN)
                    .is_dir()
            })
            .collect();
        if record.get("state").map(String::as_str) == Some("active") {
            if let [only] = holders[..] {
                if record.get("home") == Some(&replica_name(only)) {
                    return only;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{ctx}: record {record:?}, copies on {holders:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three replicas with `DOMAIN` homed on replica 0. First rounds: the home is killed
/// while LMTP deliveries come through replica 1 and POP3 readers through replica 2 (both
/// forwarded to it); after its restart every promise holds through each replica. Then
/// rounds of `domain move` between replicas 0 and 1 with deliveries through replica 2,
/// either side killed at a random moment: nothing lost, no UIDL changed, the domain
/// active on exactly one home that holds the only live copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_rounds_cluster_home_and_moves() {
    let (mut rng, seed) = seeded("crash_rounds_cluster_home_and_moves");
    let mut c = Cluster::start(ClusterOptions {
        pins: vec![(DOMAIN.to_owned(), replica_name(0))],
        replica: Options {
            max_connections_per_ip: 1000,
            auth_failure_delay_ms: 1,
            ..Options::default()
        },
        ..ClusterOptions::default()
    });
    c.replicas[1].cli_ok(&["domain", "add", DOMAIN], b"");
    let users: Vec<String> = (0..3).map(|i| address(&format!("c{i}"))).collect();
    for u in &users {
        c.replicas[2].add_user(u, PASSWORD);
    }
    let mut books = Books::default();
    let started = Instant::now();
    let home_rounds = rounds(4);
    for round in 0..home_rounds {
        let ctx = format!("seed {seed} home round {round}");
        let load = Load {
            addr: c.replicas[1].lmtp.expect("lmtp"),
            users: users.clone(),
            max: 60,
            big: 8,
            stop: Arc::default(),
        };
        let senders: Vec<_> = (0..3)
            .map(|k| tokio::spawn(lmtp_load(load.clone(), format!("h{round}c{k}"), rng.gen())))
            .collect();
        let reader = tokio::spawn(pop3_reader(
            c.replicas[2].pop3s,
            c.replicas[2].ca.ca_pem.clone(),
            users.clone(),
            rng.gen(),
        ));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..800))).await;
        let killed = Instant::now();
        c.replicas[0].kill9();
        load.stop.store(true, Ordering::SeqCst);
        let delivered = join_senders(senders, killed, &ctx).await;
        let (seen, error) = reader.await.expect("reader");
        if let Some((at, e)) = error {
            assert!(
                at >= killed,
                "{ctx}: a POP3 reader failed before the kill: {e}"
            );
        }
        c.replicas[0].spawn();
        assert_eq!(one_home(&c, &ctx).await, 0, "{ctx}");
        let sent: Vec<&Sent> = delivered.iter().flat_map(|d| &d.sent).collect();
        for i in [1, 2] {
            check_maildrops(
                &c.replicas[i],
                &users,
                &sent,
                &seen,
                &mut books,
                false,
                &ctx,
            )
            .await;
        }
        check_maildrops(&c.replicas[0], &users, &sent, &seen, &mut books, true, &ctx).await;
    }
    let home_time = started.elapsed();

    let mut all_sent: Vec<Sent> = Vec::new();
    let mut home = 0;
    let move_rounds = rounds(4);
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    // How long a move takes here: the average with each move that ended before its
    // kill, a quarter more after each that did not. The kill is drawn from that span,
    // so it lands in every phase of a move.
    let mut move_ms: u64 = 400;
    for round in 0..move_rounds {
        let ctx = format!("seed {seed} move round {round}");
        let before = snapshot(&c.replicas[2], &users).await;
        let target = 1 - home;
        let victim = if rng.gen_bool(0.5) { home } else { target };
        let config = c.replicas[2].config.clone();
        let to = replica_name(target);
        let move_started = Instant::now();
        let mover = std::thread::spawn(move || {
            let out = crate::common::cli(
                &config,
                &["domain", "move", DOMAIN, "--to", &to, "--grace", "1"],
                b"",
            );
            (out, Instant::now())
        });
        let load = Load {
            addr: c.replicas[2].lmtp.expect("lmtp"),
            users: users.clone(),
            max: 40,
            big: 0,
            stop: Arc::default(),
        };
        let senders: Vec<_> = (0..2)
            .map(|k| tokio::spawn(lmtp_load(load.clone(), format!("m{round}c{k}"), rng.gen())))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=move_ms))).await;
        let state = c
            .home_record(DOMAIN)
            .get("state")
            .cloned()
            .unwrap_or_default();
        let killed = Instant::now();
        c.replicas[victim].kill9();
        let (out, ended) = tokio::task::spawn_blocking(move || mover.join().expect("mover"))
            .await
            .expect("join");
        move_ms = if ended < killed {
            (move_ms + (ended - move_started).as_millis() as u64) / 2
        } else {
            (move_ms * 5 / 4).min(10_000)
        };
        load.stop.store(true, Ordering::SeqCst);
        for d in join_senders(senders, killed, &ctx).await {
            all_sent.extend(d.sent);
        }
        c.replicas[victim].spawn();
        let outcome = match out.status.code() {
            Some(0) => "moved",
            Some(75) => "failed (try later)",
            _ => panic!("{ctx}: the move ended with {out:?}\n{}", c.logs()),
        };
        home = one_home(&c, &ctx).await;
        *outcomes
            .entry(format!(
                "{outcome}, {} killed while {state}, home {}",
                if victim == target { "target" } else { "source" },
                replica_name(home)
            ))
            .or_default() += 1;
        let after = snapshot(&c.replicas[home], &users).await;
        for r in 0..c.replicas.len() {
            if r != home {
                assert_eq!(
                    snapshot(&c.replicas[r], &users).await,
                    after,
                    "{ctx}: replica {r} differs"
                );
            }
        }
        for (key, sha) in &before {
            assert_eq!(
                after.get(key),
                Some(sha),
                "{ctx}: {key:?} lost or changed by the move"
            );
        }
        let sent: Vec<&Sent> = all_sent.iter().collect();
        check_maildrops(
            &c.replicas[home],
            &users,
            &sent,
            &Seen::new(),
            &mut books,
            false,
            &ctx,
        )
        .await;
    }
    for r in &c.replicas {
        check_log(r, 0, true, &format!("seed {seed}"));
    }
    eprintln!(
        "crash_rounds_cluster_home_and_moves: {home_rounds} home rounds in {home_time:?}, {move_rounds} move rounds, {:?} in all, seed {seed}: deliveries {:?}; moves {outcomes:?}",
        started.elapsed(),
        books.tally
    );
}
