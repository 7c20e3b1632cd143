//! Redis Sentinel: a `mailgate serve` with `[locks] redis_sentinels` against a real master,
//! one replica and three sentinels on 127.0.0.1. While logins and LMTP deliveries run
//! (a bounded loop that stops by itself), the master is killed with SIGKILL; the sentinels
//! promote the replica and mailgate follows by itself: logins succeed again within a
//! bounded pause, every delivery answered 250 is retrievable, and a held maildrop stays
//! exclusive (`-ERR [IN-USE]`) before and after the failover.

use crate::common::sentinel::{SentinelSet, MASTER_NAME};
use crate::common::{fetch_all, logged_in, message, pop3s, Options, Raw, Server, PASSWORD};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Long enough that a held lock outlives the failover: the holder retries its renewal
/// until two thirds of it have passed without a confirmation.
const TTL: Duration = Duration::from_secs(15);
/// The longest pause accepted between the kill and the first login that works again.
const MAX_PAUSE: Duration = Duration::from_secs(20);
/// Holds the maildrop through the failover.
const JOE: &str = "joe@example.org";
/// Receives the deliveries.
const ANN: &str = "ann@example.org";
/// Logs in and out again and again.
const BOB: &str = "bob@example.org";
const JOE_KEY: &str = "mailgate:lock:joe@example.org";

fn locks_toml(set: &SentinelSet) -> String {
    let sentinels: Vec<String> = set.addrs().iter().map(|a| format!("\"{a}\"")).collect();
    // redis_url's host is never asked (port 1 has no Redis): the sentinels name the
    // master; the URL gives the database only.
    format!(
        "\n[locks]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:1/0\"\n\
         redis_sentinels = [{}]\nredis_sentinel_master = \"{MASTER_NAME}\"\n\
         ttl_secs = {}\nredis_timeout_ms = 1000\n",
        sentinels.join(", "),
        TTL.as_secs()
    )
}

/// A second login to a held maildrop is refused as in use (retrying while Redis itself
/// is unavailable, which is a different answer).
async fn assert_in_use(server: &Server, user: &str) {
    let deadline = Instant::now() + MAX_PAUSE;
    loop {
        let mut c = pop3s(server).await;
        let r = c.login(user, PASSWORD).await;
        if r.starts_with("-ERR [SYS/TEMP]") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert!(
            r.starts_with("-ERR [IN-USE]"),
            "second login to {user}: {r}"
        );
        return;
    }
}

/// One LMTP delivery to `rcpt` of a message with `subject`; the reply to the data.
async fn lmtp_deliver(server: &Server, rcpt: &str, subject: &str) -> String {
    let mut l = Raw::plain(server.lmtp.expect("lmtp")).await;
    assert!(l.reply().await.starts_with("220 "));
    assert!(l.say("LHLO mx.test").await.starts_with("250"));
    let r = l.say("MAIL FROM:<sender@example.net>").await;
    if !r.starts_with("250") {
        return r;
    }
    let r = l.say(&format!("RCPT TO:<{rcpt}>")).await;
    if !r.starts_with("250") {
        return r;
    }
    assert!(l.say("DATA").await.starts_with("354"));
    let mut data = message(subject, 3);
    data.extend_from_slice(b".\r\n");
    l.send_bytes(&data).await;
    let r = l.reply().await;
    let _ = l.say("QUIT").await;
    r
}

/// One login attempt: when it started, and whether it worked.
type Attempt = (Instant, bool);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_follows_a_master_failover() {
    let mut set = SentinelSet::start();
    let server = Server::start_with(Options {
        process: true,
        extra: locks_toml(&set),
        ..Options::default()
    });
    for u in [JOE, ANN, BOB] {
        server.with_user(u);
    }
    let first_master = set.master.port;
    assert_eq!(set.master_port(), Some(first_master));

    // Before: one session holds joe's maildrop, a second is refused.
    let mut holder = logged_in(&server, JOE).await;
    assert_in_use(&server, JOE).await;
    // The lock has reached the replica, so the failover keeps it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while set.replica.get(JOE_KEY).is_none() {
        assert!(
            Instant::now() < deadline,
            "the lock never reached the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Load: deliveries to ann and logins of bob, until told to stop (or 90 s at most).
    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let attempts = Arc::new(Mutex::new(Vec::<Attempt>::new()));
    let bound = Instant::now() + Duration::from_secs(90);
    let deliveries = {
        let (server, stop, accepted) = (server.clone(), stop.clone(), accepted.clone());
        tokio::spawn(async move {
            let mut refused = Vec::new();
            for i in 0.. {
                if stop.load(Ordering::Relaxed) || Instant::now() > bound {
                    break;
                }
                let subject = format!("sentinel-{i}");
                let r = lmtp_deliver(&server, ANN, &subject).await;
                if r.starts_with("250") {
                    accepted.lock().expect("accepted").push(subject);
                } else {
                    refused.push(r);
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            refused
        })
    };
    let logins = {
        let (server, stop, attempts) = (server.clone(), stop.clone(), attempts.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) && Instant::now() < bound {
                let started = Instant::now();
                let mut c = pop3s(&server).await;
                let r = c.login(BOB, PASSWORD).await;
                let ok = r.starts_with("+OK");
                if ok {
                    assert!(c.cmd("STAT").await.starts_with("+OK"));
                    assert!(c.cmd("QUIT").await.starts_with("+OK"));
                } else {
                    // Redis unreachable, or (right after the failover) the lock of a session
                    // whose release went to the dead master, held until its TTL: both are
                    // temporary, and the second is what keeps a maildrop from being open
                    // twice.
                    assert!(
                        r.starts_with("-ERR [SYS/TEMP]") || r.starts_with("-ERR [IN-USE]"),
                        "login of {BOB}: {r}"
                    );
                }
                attempts.lock().expect("attempts").push((started, ok));
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let ok_since = |t: Instant| {
        attempts
            .lock()
            .expect("attempts")
            .iter()
            .find(|(at, ok)| *ok && *at > t)
            .map(|(at, _)| *at)
    };
    // Some work goes through before the kill.
    let warm = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        ok_since(warm).is_some(),
        "no login worked before the failover"
    );

    set.master.stop();
    let killed = Instant::now();
    // Service resumes by itself: a login started after the kill works (only the new
    // master can have taken its lock).
    let resumed = loop {
        if let Some(at) = ok_since(killed) {
            break at;
        }
        assert!(
            killed.elapsed() < MAX_PAUSE,
            "no login worked within {MAX_PAUSE:?} of the kill\n{}\n{}",
            server.log_text(),
            set.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pause = resumed.duration_since(killed);
    eprintln!(
        "figure: logins resumed {} ms after the master was killed",
        pause.as_millis()
    );
    let promoted = set.master_port();
    assert_eq!(promoted, Some(set.replica.port), "{}", set.logs());

    // After: the holder's lock moved with the data; a second login is still refused and
    // the holder's session goes on, then ends normally and frees the maildrop.
    assert_in_use(&server, JOE).await;
    assert!(holder.cmd("NOOP").await.starts_with("+OK"));
    assert!(holder.cmd("QUIT").await.starts_with("+OK"));
    let again = logged_in(&server, JOE).await;
    drop(again);

    // Deliveries keep going on the new master for a moment, then the load stops.
    let after = accepted.lock().expect("accepted").len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let refused = deliveries.await.expect("deliveries");
    logins.await.expect("logins");
    let accepted = accepted.lock().expect("accepted").clone();
    assert!(accepted.len() > after, "no delivery after the failover");
    eprintln!(
        "figure: {} deliveries answered 250, {} refused during the failover",
        accepted.len(),
        refused.len()
    );

    // Nothing answered 250 is lost.
    let server = Arc::try_unwrap(server).unwrap_or_else(|_| panic!("server still shared"));
    let messages = fetch_all(&server, ANN).await;
    let subjects: Vec<String> = messages
        .iter()
        .filter_map(|m| {
            String::from_utf8_lossy(m)
                .lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
        })
        .collect();
    for s in &accepted {
        assert_eq!(
            subjects.iter().filter(|x| *x == s).count(),
            1,
            "{s} answered 250 but is not in the maildrop once"
        );
    }
    // The connection follows the master: its log names both, in order.
    let log = server.wait_for_log(&format!(
        "redis master named by sentinel master=127.0.0.1:{}",
        set.replica.port
    ));
    let named: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("redis master named by sentinel"))
        .collect();
    assert!(
        named.len() >= 2
            && named[0].contains(&first_master.to_string())
            && named
                .last()
                .is_some_and(|l| l.contains(&set.replica.port.to_string())),
        "{named:?}"
    );
    assert!(!log.contains(&format!(":{first_master}/")), "{log}");
}
