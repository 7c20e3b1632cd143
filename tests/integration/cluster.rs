//! Cluster mode: three `mailgate serve` processes sharing one real redis-server, each
//! domain homed on one of them. Every domain answers through every replica (POP3S, STLS,
//! AUTH PLAIN, SCRAM with an independent client, APOP) with the home's bytes; LMTP
//! (also from Postfix) splits one message over three homes; inbound SMTP keeps one
//! transaction on one home; maildrop locks hold across replicas; a killed home fails its
//! own domains fast and nothing else; the replica link refuses foreign certificates;
//! throttling counts the original client address; Redis restarted empty is repaired;
//! two copies at one epoch hold the domain; `cluster status` reports all of it.

use crate::common::cluster::{
    link_client, replica_name, Cluster, ClusterOptions, CONNECT_TIMEOUT, TTL,
};
use crate::common::postfix::{Postfix, HOSTNAME};
use crate::common::redis_server::Resp;
use crate::common::{
    fetch_all, logged_in, message, pop3s, python, stat_count, Options, Raw, Server, PASSWORD,
};
use crate::metrics::metric;
use std::net::IpAddr;
use std::time::{Duration, Instant};

const SNI: &str = "localhost";
/// `DOMAINS[i]` is pinned to replica `i`.
const DOMAINS: [&str; 3] = ["a.example", "b.example", "c.example"];
const APOP_SECRET: &str = "apop s3cret";

fn joe(i: usize) -> String {
    format!("joe@{}", DOMAINS[i])
}

fn other_ip() -> IpAddr {
    "127.0.0.2".parse().expect("ip")
}

fn lock_key(user: &str) -> String {
    format!("mailgate:lock:{user}")
}

/// Three replicas, domain `i` pinned to replica `i`, created through replica `i+1` (the
/// request goes to the home) and its user `joe` added through replica `i+2`.
fn three(replica: Options) -> Cluster {
    let cluster = Cluster::start(ClusterOptions {
        pins: DOMAINS
            .iter()
            .enumerate()
            .map(|(i, d)| (d.to_string(), replica_name(i)))
            .collect(),
        replica,
        ..ClusterOptions::default()
    });
    for (i, domain) in DOMAINS.iter().enumerate() {
        let out = cluster.replicas[(i + 1) % 3].cli(&["domain", "add", domain], b"");
        assert!(
            out.status.success(),
            "domain add {domain}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("domain {domain} added (home {})\n", replica_name(i))
        );
        cluster.replicas[(i + 2) % 3].add_user(&joe(i), PASSWORD);
    }
    cluster
}

/// Waits until no session holds `user`'s maildrop lock (a session that just ended may
/// release it a moment after its connection closed).
async fn unlocked(cluster: &Cluster, user: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while cluster.redis.get(&lock_key(user)).is_some() {
        assert!(Instant::now() < deadline, "{user}: lock not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// QUIT, the connection closes, the lock is gone.
async fn quit(cluster: &Cluster, mut c: Raw, user: &str) {
    let r = c.cmd("QUIT").await;
    assert!(r.starts_with("+OK"), "QUIT: {r}");
    assert!(c.closed().await, "open after QUIT");
    unlocked(cluster, user).await;
}

/// Everything a client sees of a maildrop, as raw wire bytes.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    stat: String,
    list: Vec<u8>,
    uidl: Vec<u8>,
    top: Vec<u8>,
    messages: Vec<Vec<u8>>,
}

async fn snapshot(cluster: &Cluster, server: &Server, user: &str) -> Snapshot {
    let mut c = logged_in(server, user).await;
    let stat = c.cmd("STAT").await;
    let count = stat_count(&stat);
    let multi = async |c: &mut Raw, cmd: &str| {
        let r = c.cmd(cmd).await;
        assert!(r.starts_with("+OK"), "{cmd}: {r}");
        let mut out = r.into_bytes();
        out.extend(c.multiline_raw().await);
        out
    };
    let list = multi(&mut c, "LIST").await;
    let uidl = multi(&mut c, "UIDL").await;
    let top = multi(&mut c, "TOP 2 1").await;
    let mut messages = Vec::new();
    for n in 1..=count {
        messages.push(multi(&mut c, &format!("RETR {n}")).await);
    }
    quit(cluster, c, user).await;
    Snapshot {
        stat,
        list,
        uidl,
        top,
        messages,
    }
}

/// The APOP timestamp of a greeting.
fn timestamp(greeting: &str) -> String {
    let start = greeting.find('<').expect("APOP timestamp");
    let end = greeting.rfind('>').expect("APOP timestamp");
    greeting[start..=end].to_owned()
}

fn apop_digest(timestamp: &str, secret: &str) -> String {
    use md5::{Digest, Md5};
    Md5::digest(format!("{timestamp}{secret}").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn auth_plain(user: &str, password: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    format!("AUTH PLAIN {b64}")
}

/// Scrapes `name{labels}` until it is at least `min`, for at most 5 s; returns it.
fn metric_at_least(server: &Server, name: &str, labels: &[(&str, &str)], min: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(server.metrics, name, labels);
        if v >= min {
            return v;
        }
        if Instant::now() > deadline {
            let (_, text) = crate::metrics::http_get(&format!("http://{}/metrics", server.metrics));
            let family: Vec<&str> = text.lines().filter(|l| l.starts_with(name)).collect();
            panic!(
                "{name}{labels:?} = {v}, expected at least {min}:\n{}",
                family.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (at most 5 s) until `server` has logged at least `n` lines matching `pred`;
/// returns how many it has.
fn logged(server: &Server, n: usize, pred: impl Fn(&str) -> bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = server.log_text();
        let found = log.lines().filter(|l| pred(l)).count();
        if found >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{found} of {n} lines logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `message` dot-stuffed and terminated, as DATA sends it.
fn data(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_domain_answers_through_every_replica_with_the_homes_bytes() {
    let c = three(Options {
        apop: true,
        ..Options::default()
    });
    let dotted: &[u8] = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\ncaf\xc3\xa9\r\n";
    for (i, domain) in DOMAINS.iter().enumerate() {
        // Delivered and provisioned through other replicas: the admin requests go home.
        let via = &c.replicas[(i + 1) % 3];
        via.deliver(&joe(i), &message(&format!("first {i}"), 3));
        via.deliver(&joe(i), dotted);
        via.deliver(&joe(i), &message("long", 3000));
        let apop = format!("apop@{domain}");
        let out = c.replicas[(i + 2) % 3].cli(
            &["user", "add", &apop, "--password-stdin", "--apop"],
            format!("{APOP_SECRET}\n").as_bytes(),
        );
        assert!(out.status.success(), "{out:?}");
    }
    for (i, domain) in DOMAINS.iter().enumerate() {
        let user = joe(i);
        let home = &c.replicas[i];
        let reference = snapshot(&c, home, &user).await;
        assert_eq!(reference.messages.len(), 3, "{reference:?}");
        let wrong_at_home = {
            let mut p = pop3s(home).await;
            p.login(&user, "wrong").await
        };
        assert!(wrong_at_home.starts_with("-ERR [AUTH]"), "{wrong_at_home}");
        for (r, front) in c.replicas.iter().enumerate() {
            let through = format!("{user} through {}", replica_name(r));
            // USER/PASS over POP3S: the same listings and bytes as at the home.
            assert_eq!(snapshot(&c, front, &user).await, reference, "{through}");

            // STLS on the cleartext port, then AUTH PLAIN with an initial response.
            let mut p = Raw::plain(front.pop3).await;
            assert!(p.line().await.starts_with("+OK"));
            assert!(p.cmd("CAPA").await.starts_with("+OK"));
            let capa = String::from_utf8(p.multiline_raw().await).expect("capa");
            assert!(capa.contains("STLS\r\n"), "{through}: {capa}");
            assert!(p.cmd("STLS").await.starts_with("+OK"));
            let mut p = p.starttls(&front.ca.ca_pem, SNI).await;
            let r = p.cmd(&auth_plain(&user, PASSWORD)).await;
            assert!(r.starts_with("+OK"), "{through}: AUTH PLAIN: {r}");
            assert_eq!(p.cmd("STAT").await, reference.stat, "{through}");
            let mut uidl = p.cmd("UIDL").await.into_bytes();
            uidl.extend(p.multiline_raw().await);
            assert_eq!(uidl, reference.uidl, "{through}: UIDL after STLS");
            quit(&c, p, &user).await;

            // SCRAM-SHA-256 with an independent client (it checks the server signature).
            let out = python(
                "scram_login.py",
                &[
                    "127.0.0.1",
                    &front.pop3s.port().to_string(),
                    &front.ca.ca_pem.display().to_string(),
                    &user,
                    PASSWORD,
                ],
            );
            assert_eq!(
                out.trim_end(),
                format!("OK {}", reference.stat.trim_end()),
                "{through}: SCRAM"
            );
            unlocked(&c, &user).await;

            // APOP with the timestamp of the front's greeting.
            let apop = format!("apop@{domain}");
            let mut p = Raw::tls(front.pop3s, &front.ca.ca_pem, SNI).await;
            let greeting = p.line().await;
            let digest = apop_digest(&timestamp(&greeting), APOP_SECRET);
            let r = p.cmd(&format!("APOP {apop} {digest}")).await;
            assert!(r.starts_with("+OK"), "{through}: APOP: {r}");
            assert_eq!(p.cmd("STAT").await, "+OK 0 0\r\n");
            quit(&c, p, &apop).await;
            let mut p = Raw::tls(front.pop3s, &front.ca.ca_pem, SNI).await;
            p.line().await;
            let r = p
                .cmd(&format!(
                    "APOP {apop} {}",
                    apop_digest("<1.2@elsewhere>", APOP_SECRET)
                ))
                .await;
            assert!(
                r.starts_with("-ERR [AUTH]"),
                "{through}: APOP, other timestamp: {r}"
            );
            quit(&c, p, &apop).await;

            // A wrong password reads as at the home.
            let mut p = pop3s(front).await;
            assert_eq!(p.login(&user, "wrong").await, wrong_at_home, "{through}");
            quit(&c, p, &user).await;
        }
    }
    // Replica 1 relayed a.example's six sessions to mailgate-0 (USER/PASS, AUTH PLAIN,
    // SCRAM, APOP twice, the wrong password), all ending cleanly, even SCRAM's, whose
    // Python client closes without close_notify (see
    // `a_client_hanging_up_is_not_a_broken_link`).
    let forwards = |result: &str| {
        metric(
            c.replicas[1].metrics,
            "mailgate_cluster_forwards_total",
            &[
                ("peer", "mailgate-0"),
                ("protocol", "pop3"),
                ("result", result),
            ],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while forwards("ok") + forwards("error") < 6.0 {
        assert!(Instant::now() < deadline, "forwards not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(forwards("ok"), 6.0);
    assert_eq!(forwards("error"), 0.0);
    assert_eq!(forwards("unreachable") + forwards("refused"), 0.0);
}

/// A client may end a relayed session without QUIT, and over TLS without close_notify
/// (most do when they exit): the link to the home did not break, so the forward is
/// counted `ok`, not `error` ("the link broke mid-way").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hanging_up_is_not_a_broken_link() {
    let c = three(Options::default());
    let front = &c.replicas[1];
    let user = joe(0);
    // Hangs up after QUIT, politely without, and abruptly without.
    let p = logged_in(front, &user).await;
    quit(&c, p, &user).await;
    let mut p = logged_in(front, &user).await;
    p.shutdown().await;
    assert!(p.closed().await);
    unlocked(&c, &user).await;
    let p = logged_in(front, &user).await;
    drop(p);
    unlocked(&c, &user).await;
    let count = |result: &str| {
        metric(
            front.metrics,
            "mailgate_cluster_forwards_total",
            &[
                ("peer", "mailgate-0"),
                ("protocol", "pop3"),
                ("result", result),
            ],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while count("ok") + count("error") < 3.0 {
        assert!(Instant::now() < deadline, "forwards not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        (count("ok"), count("error")),
        (3.0, 0.0),
        "(ok, error) after three sessions that ended normally"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lmtp_message_to_three_homes_lands_once_in_each_with_replies_in_rcpt_order() {
    let c = three(Options::default());
    // A maildrop on c.example too small for the message: its home refuses it after
    // DATA, so the order of the per-recipient replies shows.
    let small = format!("small@{}", DOMAINS[2]);
    c.replicas[0].add_user(&small, PASSWORD);
    let out = c.replicas[0].cli(&["user", "quota", &small, "100"], b"");
    assert!(out.status.success(), "{out:?}");

    let front = &c.replicas[1];
    let mut l = Raw::plain_from(other_ip(), front.lmtp.expect("lmtp")).await;
    assert!(l.reply().await.starts_with("220 "));
    assert!(l.say("LHLO mx.test").await.starts_with("250"));
    assert!(l
        .say("MAIL FROM:<sender@example.net>")
        .await
        .starts_with("250"));
    let rcpts = [
        (joe(0), "250 "),
        (small.clone(), "250 "),
        ("nobody@b.example".to_owned(), "550 5.1.1"),
        (joe(1), "250 "),
        ("nobody@a.example".to_owned(), "550 5.1.1"),
        (joe(2), "250 "),
    ];
    for (rcpt, want) in &rcpts {
        let r = l.say(&format!("RCPT TO:<{rcpt}>")).await;
        assert!(r.starts_with(want), "RCPT {rcpt}: {r}");
    }
    assert!(l.say("DATA").await.starts_with("354"));
    let mut body =
        b"From: sender@example.net\r\nSubject: three homes\r\n\r\n.leading dot\r\n".to_vec();
    for n in 0..200 {
        body.extend_from_slice(format!("line {n} of the body\r\n").as_bytes());
    }
    l.send_bytes(&data(&body)).await;
    // One reply per accepted recipient, in RCPT order: joe@a, small@c, joe@b, joe@c.
    let mut replies = Vec::new();
    for _ in 0..4 {
        replies.push(l.reply().await);
    }
    assert!(replies[0].starts_with("250 2.0.0"), "{replies:?}");
    assert!(
        replies[1].starts_with("552 5.2.2") || replies[1].starts_with("452 4.2.2"),
        "{replies:?}"
    );
    assert!(replies[2].starts_with("250 2.0.0"), "{replies:?}");
    assert!(replies[3].starts_with("250 2.0.0"), "{replies:?}");

    // A second transaction on the same connection, to two remote homes.
    assert!(l
        .say("MAIL FROM:<sender@example.net>")
        .await
        .starts_with("250"));
    for i in [0, 2] {
        let r = l.say(&format!("RCPT TO:<{}>", joe(i))).await;
        assert!(r.starts_with("250"), "{r}");
    }
    assert!(l.say("DATA").await.starts_with("354"));
    l.send_bytes(&data(&message("second", 2))).await;
    for _ in 0..2 {
        let r = l.reply().await;
        assert!(r.starts_with("250 2.0.0"), "{r}");
    }
    assert!(l.say("QUIT").await.starts_with("221"));

    for i in 0..3 {
        let stored = fetch_all(&c.replicas[i], &joe(i)).await;
        let expected = if i == 1 { 1 } else { 2 };
        assert_eq!(stored.len(), expected, "{}", joe(i));
        let first = String::from_utf8_lossy(&stored[0]).into_owned();
        assert!(
            first.ends_with(std::str::from_utf8(&body).expect("utf8")),
            "{}: {first}",
            joe(i)
        );
        // Each home wrote the trace header for the original client, not the front.
        assert!(
            first.contains("Received: from mx.test ([127.0.0.2])"),
            "{}: {first}",
            joe(i)
        );
        assert!(first.contains("with LMTP"), "{first}");
    }
    assert!(fetch_all(&c.replicas[2], &small).await.is_empty());
    for peer in ["mailgate-0", "mailgate-2"] {
        metric_at_least(
            front,
            "mailgate_cluster_forwarded_recipients_total",
            &[("peer", peer), ("result", "delivered")],
            2.0,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_delivers_to_every_home_through_one_replica() {
    let c = three(Options::default());
    let front = &c.replicas[1];
    let pf = Postfix::start(&front.lmtp.expect("lmtp").to_string(), &DOMAINS);
    let mut message = "Subject: via postfix\r\n\r\n.leading dot\r\n".to_string();
    for i in 0..300 {
        message.push_str(&format!("line {i} of the body\r\n"));
    }
    let id = pf.send(
        "sender@example.com",
        &[&joe(0), &joe(1), &joe(2), "nobody@c.example"],
        message.as_bytes(),
    );
    let wait = Duration::from_secs(20);
    for i in 0..3 {
        let line = pf.wait_for_log(&format!("{id}: to=<{}>", joe(i)), wait);
        assert!(line.contains("status=sent (250 2.0.0"), "{line}");
    }
    let line = pf.wait_for_log(&format!("{id}: to=<nobody@c.example>"), wait);
    assert!(
        line.contains("status=bounced") && line.contains("550 5.1.1"),
        "{line}"
    );
    for i in 0..3 {
        let stored = fetch_all(&c.replicas[i], &joe(i)).await;
        assert_eq!(stored.len(), 1, "{}", joe(i));
        let stored = String::from_utf8_lossy(&stored[0]).into_owned();
        assert!(stored.ends_with(message.as_str()), "{stored}");
        assert!(
            stored.contains(&format!("by {HOSTNAME} (Postfix) with ESMTP id {id}")),
            "{stored}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_maildrop_is_in_use_through_every_replica() {
    let c = three(Options::default());
    let user = joe(0);
    let first = logged_in(&c.replicas[1], &user).await;
    assert!(c.redis.get(&lock_key(&user)).is_some());
    for (r, s) in c.replicas.iter().enumerate() {
        let mut p = pop3s(s).await;
        let got = p.login(&user, PASSWORD).await;
        assert!(
            got.starts_with("-ERR [IN-USE]"),
            "through {}: {got}",
            replica_name(r)
        );
        // Other maildrops meanwhile, through the same replica.
        let other = logged_in(s, &joe(2)).await;
        quit(&c, other, &joe(2)).await;
    }
    quit(&c, first, &user).await;
    let second = logged_in(&c.replicas[2], &user).await;
    quit(&c, second, &user).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_home_fails_only_its_domains_fast_and_recovers_after_restart() {
    let mut c = three(Options::default());
    c.replicas[2].deliver(&joe(0), &message("kept", 2));
    // A session through replica 1 holds a.example's maildrop at its home, mailgate-0.
    let mut held = logged_in(&c.replicas[1], &joe(0)).await;
    assert!(held.cmd("DELE 1").await.starts_with("+OK"));

    c.replicas[0].kill9();
    let killed = Instant::now();
    assert!(held.closed().await, "the relayed session outlived its home");

    // Its domain: a temporary failure at USER and AUTH, within the connect timeout.
    let limit = CONNECT_TIMEOUT + Duration::from_millis(500);
    for front in [1, 2] {
        let s = &c.replicas[front];
        let mut p = pop3s(s).await;
        let t = Instant::now();
        let r = p.cmd(&format!("USER {}", joe(0))).await;
        let took = t.elapsed();
        assert!(
            r.starts_with("-ERR [SYS/TEMP]"),
            "USER through {front}: {r}"
        );
        assert!(took < limit, "USER answered after {took:?}");
        let r = p.cmd(&auth_plain(&joe(0), PASSWORD)).await;
        assert!(
            r.starts_with("-ERR [SYS/TEMP]"),
            "AUTH through {front}: {r}"
        );
        let scram_first = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .encode(format!("n,,n={},r=0123456789abcdef", joe(0)))
        };
        let r = p.cmd(&format!("AUTH SCRAM-SHA-256 {scram_first}")).await;
        assert!(
            r.starts_with("-ERR [SYS/TEMP]"),
            "SCRAM through {front}: {r}"
        );
        eprintln!(
            "figure: USER for a dead home's domain answered in {} ms",
            took.as_millis()
        );
        // The others answer as before, through either replica.
        for i in [1, 2] {
            let p = logged_in(s, &joe(i)).await;
            quit(&c, p, &joe(i)).await;
        }
    }
    // LMTP: 451 4.4.0 at RCPT for the dead home, delivery for the others.
    let mut l = Raw::plain(c.replicas[2].lmtp.expect("lmtp")).await;
    assert!(l.reply().await.starts_with("220 "));
    assert!(l.say("LHLO mx.test").await.starts_with("250"));
    assert!(l
        .say("MAIL FROM:<sender@example.net>")
        .await
        .starts_with("250"));
    let t = Instant::now();
    let r = l.say(&format!("RCPT TO:<{}>", joe(0))).await;
    assert!(r.starts_with("451 4.4.0"), "{r}");
    assert!(t.elapsed() < limit, "RCPT answered after {:?}", t.elapsed());
    for i in [1, 2] {
        let r = l.say(&format!("RCPT TO:<{}>", joe(i))).await;
        assert!(r.starts_with("250"), "{r}");
    }
    assert!(l.say("DATA").await.starts_with("354"));
    l.send_bytes(&data(&message("while 0 is down", 1))).await;
    for _ in 0..2 {
        let r = l.reply().await;
        assert!(r.starts_with("250 2.0.0"), "{r}");
    }
    assert!(l.say("QUIT").await.starts_with("221"));
    assert_eq!(fetch_all(&c.replicas[1], &joe(1)).await.len(), 1);

    // On the dead replica itself, the CLI reads the status without its server, and
    // refuses to change stores behind the cluster's back.
    let out = c.replicas[0].cli(&["cluster", "status", "--json"], b"");
    assert!(out.status.success(), "{out:?}");
    let offline: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(offline["replicas"][0]["reachable"], false, "{offline}");
    assert_eq!(offline["replicas"][1]["reachable"], true, "{offline}");
    assert_eq!(
        offline["domains"].as_array().map(Vec::len),
        Some(3),
        "{offline}"
    );
    for args in [&["domain", "list"][..], &["user", "list", DOMAINS[0]][..]] {
        let out = c.replicas[0].cli(args, b"");
        assert_eq!(out.status.code(), Some(75), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(
                "in a cluster, run admin commands on a replica where `mailgate serve` runs"
            ),
            "{err}"
        );
    }

    // The status says so; the fronts counted the failures.
    let out = c.replicas[1].cli(&["cluster", "status", "--json"], b"");
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let reachable: Vec<(String, bool)> = status["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| {
            (
                r["name"].as_str().expect("name").to_owned(),
                r["reachable"].as_bool().expect("reachable"),
            )
        })
        .collect();
    assert_eq!(
        reachable,
        vec![
            ("mailgate-0".to_owned(), false),
            ("mailgate-1".to_owned(), true),
            ("mailgate-2".to_owned(), true)
        ]
    );
    metric_at_least(
        &c.replicas[1],
        "mailgate_cluster_forwards_total",
        &[
            ("peer", "mailgate-0"),
            ("protocol", "pop3"),
            ("result", "unreachable"),
        ],
        1.0,
    );
    assert_eq!(
        metric(
            c.replicas[1].metrics,
            "mailgate_cluster_peer_up",
            &[("peer", "mailgate-0")]
        ),
        0.0
    );

    // Back with the same data dir: the killed session's lock runs out, its DELE was
    // never applied.
    c.replicas[0].spawn();
    let restarted = Instant::now();
    loop {
        let mut p = pop3s(&c.replicas[1]).await;
        let r = p.login(&joe(0), PASSWORD).await;
        if r.starts_with("+OK") {
            assert!(
                p.cmd("STAT").await.starts_with("+OK 1 "),
                "a DELE was applied"
            );
            quit(&c, p, &joe(0)).await;
            break;
        }
        assert!(
            r.starts_with("-ERR [IN-USE]") || r.starts_with("-ERR [SYS/TEMP]"),
            "{r}"
        );
        assert!(
            killed.elapsed() < TTL + Duration::from_secs(4),
            "no login {:?} after the kill: {r}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "figure: a.example served again {} ms after the restart ({} ms after the kill)",
        restarted.elapsed().as_millis(),
        killed.elapsed().as_millis()
    );
    let mut l = Raw::plain(c.replicas[2].lmtp.expect("lmtp")).await;
    l.reply().await;
    assert!(l.say("LHLO mx.test").await.starts_with("250"));
    assert!(l.say("MAIL FROM:<>").await.starts_with("250"));
    let r = l.say(&format!("RCPT TO:<{}>", joe(0))).await;
    assert!(r.starts_with("250"), "{r}");
    assert!(l.say("QUIT").await.starts_with("221"));

    // A home that accepts connections but never answers (SIGSTOP): the same answers,
    // bounded by cluster.connect_timeout_ms.
    freeze(&c.replicas[0], true);
    let mut p = pop3s(&c.replicas[1]).await;
    let t = Instant::now();
    let r = p.cmd(&format!("USER {}", joe(0))).await;
    let took = t.elapsed();
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "USER, home frozen: {r}");
    assert!(took < limit, "USER answered after {took:?}");
    let mut l = Raw::plain(c.replicas[2].lmtp.expect("lmtp")).await;
    l.reply().await;
    assert!(l.say("LHLO mx.test").await.starts_with("250"));
    assert!(l.say("MAIL FROM:<>").await.starts_with("250"));
    let t = Instant::now();
    let r = l.say(&format!("RCPT TO:<{}>", joe(0))).await;
    let rcpt_took = t.elapsed();
    freeze(&c.replicas[0], false);
    assert!(r.starts_with("451 4.4.0"), "RCPT, home frozen: {r}");
    assert!(rcpt_took < limit, "RCPT answered after {rcpt_took:?}");
    eprintln!(
        "figure: home frozen: USER answered in {} ms, RCPT in {} ms (connect timeout {} ms)",
        took.as_millis(),
        rcpt_took.as_millis(),
        CONNECT_TIMEOUT.as_millis()
    );
}

/// SIGSTOP / SIGCONT a replica's process.
fn freeze(server: &Server, frozen: bool) {
    let sig = if frozen { "-STOP" } else { "-CONT" };
    let ok = std::process::Command::new("kill")
        .arg(sig)
        .arg(server.pid().to_string())
        .status()
        .expect("kill");
    assert!(ok.success());
    // The signal takes effect asynchronously: wait until the kernel reports the process
    // stopped (or running again), so the test does not race it.
    let stat = format!("/proc/{}/stat", server.pid());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&stat).expect("proc stat");
        // The state follows the parenthesised command name.
        let state = text.rsplit(") ").next().and_then(|r| r.chars().next());
        if (state == Some('T')) == frozen {
            return;
        }
        assert!(Instant::now() < deadline, "{sig} not in effect: {text}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What a replica link answers a forwarded `USER` for `joe@a.example`: its first line,
/// or how the connection was refused.
async fn link_answer(
    c: &Cluster,
    roots: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<String, String> {
    let mut raw = link_client(c.links[0], roots, "mailgate-0", b"mailgate-pop3/1", client)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let head = format!(
        "MAILGATE-FORWARD/1 hop=1 from=mailgate-1 client=127.0.0.9:40000 listener=pop3s tls=1 sid=77\r\nUSER {}\r\n",
        joe(0)
    );
    // A POP3 link is framed: a 4-octet length, then the octets.
    let mut frame = (head.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(head.as_bytes());
    raw.try_send(&frame)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let line = raw.line_bytes().await.ok_or_else(|| "closed".to_owned())?;
    let reply = line
        .get(4..)
        .ok_or_else(|| format!("short frame {line:?}"))?;
    Ok(String::from_utf8_lossy(reply).into_owned())
}

/// A peer with a good certificate that sends garbage on a POP3 link: each connection is
/// closed without a byte, counted as rejected, and the home goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_link_closes_on_hostile_preambles() {
    let c = three(Options::default());
    let roots = c.ca.ca_pem.clone();
    let own = c.ca.dir.join("mailgate-1.crt");
    let own_key = c.ca.dir.join("mailgate-1.key");
    let framed = |payload: &[u8]| {
        let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(payload);
        frame
    };
    let good = "MAILGATE-FORWARD/1 hop=1 from=mailgate-1 client=127.0.0.9:40000 listener=pop3s tls=1 sid=77";
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("not a preamble", framed(b"USER joe@a.example\r\n")),
        (
            "a second hop",
            framed(format!("{}\r\n", good.replace("hop=1", "hop=2")).as_bytes()),
        ),
        (
            "no client",
            framed(format!("{}\r\n", good.replace("client=127.0.0.9:40000 ", "")).as_bytes()),
        ),
        ("a preamble without end", framed(&vec![b'A'; 4000])),
        (
            "a frame over the limit",
            (1u32 << 20).to_be_bytes().to_vec(),
        ),
        (
            "no framing",
            format!("{good}\r\nUSER joe@a.example\r\n").into_bytes(),
        ),
        ("binary", vec![0xff; 64]),
    ];
    let count = hostile.len() as f64;
    for (what, bytes) in hostile {
        let mut raw = link_client(
            c.links[0],
            &roots,
            "mailgate-0",
            b"mailgate-pop3/1",
            Some((&own, &own_key)),
        )
        .await
        .expect("handshake");
        raw.try_send(&bytes).await.expect("write");
        assert!(raw.closed().await, "{what}: the link stayed open");
    }
    let rejected = metric(
        c.replicas[0].metrics,
        "mailgate_cluster_inbound_total",
        &[("protocol", "pop3"), ("result", "rejected")],
    );
    assert_eq!(rejected, count, "{}", c.logs());
    // The home serves the next session as before.
    let ok = link_answer(&c, &roots, Some((&own, &own_key))).await;
    assert!(ok.as_deref().is_ok_and(|l| l.starts_with("+OK")), "{ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_link_refuses_certificates_not_from_the_cluster_ca() {
    let c = three(Options::default());
    let roots = c.ca.ca_pem.clone();
    let own = c.ca.dir.join("mailgate-1.crt");
    let own_key = c.ca.dir.join("mailgate-1.key");
    // The control: replica 1's own certificate gets a POP3 session at the home.
    let ok = link_answer(&c, &roots, Some((&own, &own_key))).await;
    assert!(
        ok.as_deref().is_ok_and(|l| l.starts_with("+OK")),
        "{ok:?}\n{}",
        c.logs()
    );

    let other_dir = c.dir.path().join("other-ca");
    std::fs::create_dir(&other_dir).expect("dir");
    let other = crate::common::TestCa::new(&other_dir);
    let (foreign, foreign_key) = other.issue_replica("mailgate-1", &["mailgate-1"]);
    let (intruder, intruder_key) = c.ca.issue_replica("intruder", &["intruder"]);
    let cases: [(&str, Option<(&std::path::Path, &std::path::Path)>); 3] = [
        ("no certificate", None),
        (
            "another CA's certificate for mailgate-1",
            Some((&foreign, &foreign_key)),
        ),
        (
            "the cluster CA's certificate for no replica",
            Some((&intruder, &intruder_key)),
        ),
    ];
    for (what, client) in cases {
        let answer = link_answer(&c, &roots, client).await;
        assert!(answer.is_err(), "{what}: {answer:?}");
    }
    logged(&c.replicas[0], 3, |l| {
        l.contains("replica connection refused")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_counts_the_original_client_address_at_the_home() {
    let c = three(Options {
        max_auth_failures_per_ip: 3,
        ..Options::default()
    });
    let (front, home) = (&c.replicas[1], &c.replicas[0]);
    let user = joe(0);
    let from_other = async |s: &Server| {
        let mut p = Raw::tls_from(other_ip(), s.pop3s, &s.ca.ca_pem, SNI).await;
        assert!(p.line().await.starts_with("+OK"));
        p
    };
    for _ in 0..3 {
        let mut p = from_other(front).await;
        let r = p.login(&user, "wrong").await;
        assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    }
    // The home counted 127.0.0.2, the client, not 127.0.0.1, the front.
    assert_eq!(
        c.redis.get("mailgate:authfail:ip:127.0.0.2").as_deref(),
        Some("3"),
        "{}",
        c.logs()
    );
    assert_eq!(c.redis.get("mailgate:authfail:ip:127.0.0.1"), None);
    // 127.0.0.2 is refused everywhere, even with the right password.
    for (what, s, u) in [
        ("through the front", front, user.clone()),
        ("at the home", home, user.clone()),
        ("for the front's own domain", front, joe(1)),
    ] {
        let mut p = from_other(s).await;
        let r = p.login(&u, PASSWORD).await;
        assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "127.0.0.2 {what}: {r}");
    }
    // 127.0.0.1 is not.
    for s in [front, home] {
        let p = logged_in(s, &user).await;
        quit(&c, p, &user).await;
    }
    // The home's log names the client's address for the relayed sessions.
    // Four sessions from 127.0.0.2 went through the front: three failures, one refusal.
    let relayed = logged(home, 4, |l| {
        l.contains("peer=127.0.0.2:")
            && l.contains("via=\"mailgate-1\"")
            && l.contains("session end")
    });
    assert_eq!(relayed, 4, "{}", home.log_text());
}

/// Waits until every domain's home record is `before` again.
async fn records_back(
    c: &Cluster,
    before: &[std::collections::BTreeMap<String, String>],
    deadline: Instant,
) {
    loop {
        let now: Vec<_> = DOMAINS.iter().map(|d| c.home_record(d)).collect();
        if now == before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "records not back: {now:?}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until each domain `i` logs in through replica `i + shift` (not its home),
/// accepting only `[SYS/TEMP]` meanwhile.
async fn logins_work_through(c: &Cluster, shift: usize, deadline: Instant) {
    for i in 0..3 {
        let front = &c.replicas[(i + shift) % 3];
        loop {
            let mut p = pop3s(front).await;
            let r = p.login(&joe(i), PASSWORD).await;
            if r.starts_with("+OK") {
                quit(c, p, &joe(i)).await;
                break;
            }
            assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
            assert!(Instant::now() < deadline, "{} still refused: {r}", joe(i));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_repaired_by_the_replicas() {
    let mut c = three(Options::default());
    let before: Vec<_> = DOMAINS.iter().map(|d| c.home_record(d)).collect();
    for (i, r) in before.iter().enumerate() {
        assert_eq!(r.get("home"), Some(&replica_name(i)), "{r:?}");
        assert_eq!(r.get("state").map(String::as_str), Some("active"));
    }
    c.redis.restart();
    let restarted = Instant::now();
    assert!(c.home_record(DOMAINS[0]).is_empty(), "redis kept its data");
    let deadline = restarted + Duration::from_secs(8);
    records_back(&c, &before, deadline).await;
    let records_took = restarted.elapsed();
    // Logins through a replica that is not the home work again.
    logins_work_through(&c, 1, deadline).await;
    eprintln!(
        "figure: home records back {} ms, logins through every replica {} ms after redis restarted empty",
        records_took.as_millis(),
        restarted.elapsed().as_millis()
    );

    // The same without a reconnection: FLUSHALL under the replicas' feet.
    assert_eq!(c.redis.cmd(&["FLUSHALL"]), Resp::Simple("OK".into()));
    let flushed = Instant::now();
    let deadline = flushed + Duration::from_secs(8);
    records_back(&c, &before, deadline).await;
    logins_work_through(&c, 2, deadline).await;
    eprintln!(
        "figure: logins through every replica {} ms after FLUSHALL",
        flushed.elapsed().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_at_one_epoch_hold_the_domain_and_nothing_is_deleted() {
    let mut c = three(Options::default());
    c.replicas[1].deliver(&joe(0), &message("precious", 2));
    let original = c.replicas[0].dir.path().join("data/domains/a.example");
    let copy = c.replicas[1].dir.path().join("data/domains/a.example");
    assert!(original.is_dir());
    assert!(c.replicas[1].stop().success());
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&original)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(status.success());
    c.replicas[1].spawn();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.home_record(DOMAINS[0]);
        if r.get("state").map(String::as_str) == Some("held") {
            assert_eq!(r.get("epoch").map(String::as_str), Some("1"), "{r:?}");
            break;
        }
        assert!(Instant::now() < deadline, "not held: {r:?}\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every replica refuses its logins for now (once its cached view has expired).
    for (r, s) in c.replicas.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let mut p = pop3s(s).await;
            let got = p.cmd(&format!("USER {}", joe(0))).await;
            if got.starts_with("-ERR [SYS/TEMP]") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "through {}: {got}",
                replica_name(r)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut l = Raw::plain(c.replicas[2].lmtp.expect("lmtp")).await;
    l.reply().await;
    assert!(l.say("LHLO mx.test").await.starts_with("250"));
    assert!(l.say("MAIL FROM:<>").await.starts_with("250"));
    let r = l.say(&format!("RCPT TO:<{}>", joe(0))).await;
    assert!(r.starts_with("451 "), "{r}");
    // The other domains are unaffected, the replica with the copy's own included.
    for i in [1, 2] {
        let p = logged_in(&c.replicas[0], &joe(i)).await;
        quit(&c, p, &joe(i)).await;
    }
    // Nothing deleted; both replicas count the held domain.
    assert!(original.is_dir() && copy.is_dir());
    for s in [&c.replicas[0], &c.replicas[1]] {
        metric_at_least(s, "mailgate_cluster_domains", &[("state", "held")], 1.0);
    }
    let out = c.replicas[2].cli(&["cluster", "status", "--json"], b"");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let a = status["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .find(|d| d["name"] == DOMAINS[0])
        .cloned()
        .expect("a.example listed");
    assert_eq!(a["state"], "held", "{status}");
    // Still held a few announcements later: neither copy gives way by itself.
    tokio::time::sleep(TTL).await;
    assert_eq!(
        c.home_record(DOMAINS[0]).get("state").map(String::as_str),
        Some("held")
    );
    assert!(original.is_dir() && copy.is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_and_domain_commands_from_any_replica() {
    let c = three(Options::default());
    // A domain without a pin goes to its rendezvous target, whichever replica is asked.
    let out = c.replicas[2].cli(&["domain", "add", "d.example"], b"");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let home = text
        .strip_prefix("domain d.example added (home ")
        .and_then(|r| r.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();
    assert_eq!(c.home_record("d.example").get("home"), Some(&home));
    for (i, s) in c.replicas.iter().enumerate() {
        let has = s.dir.path().join("data/domains/d.example").is_dir();
        assert_eq!(has, replica_name(i) == home, "{}", replica_name(i));
    }
    c.replicas[0].add_user("joe@d.example", PASSWORD);
    for s in &c.replicas {
        let p = logged_in(s, "joe@d.example").await;
        quit(&c, p, "joe@d.example").await;
    }
    // Every account of the cluster, whichever replica is asked.
    for s in &c.replicas {
        let out = s.cli(&["user", "list"], b"");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "joe@a.example\njoe@b.example\njoe@c.example\njoe@d.example\n"
        );
    }
    // An existing domain is refused, naming its home.
    let out = c.replicas[2].cli(&["domain", "add", DOMAINS[0]], b"");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists (home mailgate-0)"), "{err}");

    let mut homed = [0u64; 3];
    for d in DOMAINS.iter().chain(["d.example"].iter()) {
        let h = c.home_record(d)["home"].clone();
        homed[(0..3).find(|i| replica_name(*i) == h).expect("a replica")] += 1;
    }
    for (r, s) in c.replicas.iter().enumerate() {
        let out = s.cli(&["domain", "list"], b"");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "a.example\nb.example\nc.example\nd.example\n",
            "through {}",
            replica_name(r)
        );
        let out = s.cli(&["cluster", "status", "--json"], b"");
        assert!(out.status.success(), "{out:?}");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let replicas = status["replicas"].as_array().expect("replicas");
        assert_eq!(replicas.len(), 3, "{status}");
        for (i, entry) in replicas.iter().enumerate() {
            assert_eq!(entry["name"], replica_name(i).as_str(), "{status}");
            assert_eq!(entry["reachable"], true, "{status}");
            assert_eq!(entry["version"], env!("CARGO_PKG_VERSION"), "{status}");
            assert_eq!(entry["domains"], homed[i], "{status}");
        }
        let domains: Vec<(String, String, String, u64)> = status["domains"]
            .as_array()
            .expect("domains")
            .iter()
            .map(|d| {
                (
                    d["name"].as_str().expect("name").to_owned(),
                    d["home"].as_str().expect("home").to_owned(),
                    d["state"].as_str().expect("state").to_owned(),
                    d["epoch"].as_u64().expect("epoch"),
                )
            })
            .collect();
        let mut expected: Vec<(String, String, String, u64)> = DOMAINS
            .iter()
            .enumerate()
            .map(|(i, d)| (d.to_string(), replica_name(i), "active".into(), 1))
            .collect();
        expected.push(("d.example".into(), home.clone(), "active".into(), 1));
        assert_eq!(domains, expected);
    }
    // The table form says the same.
    let out = c.replicas[0].cli(&["cluster", "status"], b"");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rows.contains(&vec![
            "REPLICA",
            "REACHABLE",
            "VERSION",
            "DOMAINS",
            "DRAINING"
        ]),
        "{text}"
    );
    for i in 0..3 {
        let name = replica_name(i);
        let count = homed[i].to_string();
        assert!(
            rows.contains(&vec![
                name.as_str(),
                "yes",
                env!("CARGO_PKG_VERSION"),
                count.as_str(),
                "no"
            ]),
            "{text}"
        );
        let name = replica_name(i);
        assert!(
            rows.contains(&vec![DOMAINS[i], name.as_str(), "active", "1"]),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_transaction_stays_on_one_home() {
    let c = three(Options::default());
    let front = &c.replicas[1];
    let mut s = Raw::plain(front.smtp.expect("smtp")).await;
    assert!(s.reply().await.starts_with("220 "));
    let ehlo = s.say("EHLO mx.test").await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(s.say("STARTTLS").await.starts_with("220"));
    let mut s = s.starttls(&front.ca.ca_pem, SNI).await;
    assert!(s.say("EHLO mx.test").await.starts_with("250"));

    // First recipient on mailgate-0: a second one there is fine, one elsewhere is not.
    let second_a = format!("ann@{}", DOMAINS[0]);
    c.replicas[2].add_user(&second_a, PASSWORD);
    assert!(s
        .say("MAIL FROM:<sender@example.net>")
        .await
        .starts_with("250"));
    let r = s.say(&format!("RCPT TO:<{}>", joe(0))).await;
    assert!(r.starts_with("250"), "{r}");
    for other in [joe(1), joe(2)] {
        let r = s.say(&format!("RCPT TO:<{other}>")).await;
        assert!(r.starts_with("452 4.5.3"), "{other}: {r}");
    }
    let r = s.say(&format!("RCPT TO:<{second_a}>")).await;
    assert!(r.starts_with("250"), "{r}");
    assert!(s.say("DATA").await.starts_with("354"));
    s.send_bytes(&data(&message("to a", 2))).await;
    let r = s.reply().await;
    assert!(r.starts_with("250 2.0.0"), "{r}");

    // The refused ones in their own transactions: the front's own domain, then mailgate-2.
    for i in [1, 2] {
        assert!(s
            .say("MAIL FROM:<sender@example.net>")
            .await
            .starts_with("250"));
        let r = s.say(&format!("RCPT TO:<{}>", joe(i))).await;
        assert!(r.starts_with("250"), "{r}");
        assert!(s.say("DATA").await.starts_with("354"));
        s.send_bytes(&data(&message(&format!("to {i}"), 2))).await;
        let r = s.reply().await;
        assert!(r.starts_with("250 2.0.0"), "{r}");
    }
    // A local first recipient: a remote one is refused the same way.
    assert!(s
        .say("MAIL FROM:<sender@example.net>")
        .await
        .starts_with("250"));
    assert!(s
        .say(&format!("RCPT TO:<{}>", joe(1)))
        .await
        .starts_with("250"));
    let r = s.say(&format!("RCPT TO:<{}>", joe(0))).await;
    assert!(r.starts_with("452 4.5.3"), "{r}");
    assert!(s.say("RSET").await.starts_with("250"));
    assert!(s.say("QUIT").await.starts_with("221"));

    for (user, home, n) in [
        (joe(0), 0, 1),
        (second_a.clone(), 0, 1),
        (joe(1), 1, 1),
        (joe(2), 2, 1),
    ] {
        let stored = fetch_all(&c.replicas[home], &user).await;
        assert_eq!(stored.len(), n, "{user}");
        let text = String::from_utf8_lossy(&stored[0]).into_owned();
        // The home knew the client used TLS with the front.
        assert!(text.contains("with ESMTPS"), "{user}: {text}");
    }
}

/// RFC 1939: after `-ERR` to USER the client starts over. A name refused for now must
/// not leave the previous USER in place for the next PASS (that PASS carries the
/// refused name's password, and would log into or count a failure against another
/// account).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_user_name_does_not_leave_the_previous_one_for_pass() {
    let c = three(Options::default());
    let mut p = pop3s(&c.replicas[1]).await;
    // Relayed to mailgate-0 at USER; there b.example is another replica's.
    let r = p.cmd(&format!("USER {}", joe(0))).await;
    assert!(r.starts_with("+OK"), "{r}");
    let r = p.cmd(&format!("USER {}", joe(1))).await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    // Every joe has the same password: a PASS meant for joe@b.example.
    let r = p.cmd(&format!("PASS {PASSWORD}")).await;
    assert!(
        !r.starts_with("+OK"),
        "PASS for the refused {} logged into {}: {r}",
        joe(1),
        joe(0)
    );
    assert_eq!(c.redis.get(&lock_key(&joe(0))), None);
}

/// Guessing users of another replica's domain through a front: the front counts the
/// home's 550s and closes the client; the home, which sees the session forwarded,
/// counts nothing of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_guessing_is_cut_off_at_the_front_for_every_home() {
    let c = three(Options {
        smtp_extra: "unknown_recipients_before_delay = 1\nunknown_recipient_delay_ms = 100\n\
                     max_unknown_recipients = 3\n"
            .into(),
        ..Options::default()
    });
    let (front, home) = (&c.replicas[1], &c.replicas[0]);
    let mut s = Raw::plain(front.smtp.expect("smtp")).await;
    assert!(s.reply().await.starts_with("220 "));
    assert!(s.say("EHLO guesser.test").await.starts_with("250"));
    assert!(s.say("MAIL FROM:<a@guesser.test>").await.starts_with("250"));
    for n in 0..3 {
        let r = s.say(&format!("RCPT TO:<guess{n}@{}>", DOMAINS[0])).await;
        assert!(r.starts_with("550 5.1.1"), "{r}");
    }
    assert!(s.line().await.starts_with("421 4.7.0"));
    assert!(s.closed().await);
    let closing = "too many unknown recipients: closing";
    front.wait_for_log(closing);
    assert!(!home.log_text().contains(closing));
}
