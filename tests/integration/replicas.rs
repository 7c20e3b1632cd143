//! Two replicas sharing one real redis-server: maildrop locks across replicas, crashes of
//! a replica and of Redis, stolen locks, shared login throttling, Redis AUTH and TLS, and
//! a bounded stress test that audits every lock holder from both replicas' logs.

use crate::common::redis_server::{RedisOptions, RedisServer, Resp};
use crate::common::{
    assert_one_holder_at_a_time, cli, logged_in, message, pop3s, Options, Raw, Server, TestCa,
    PASSWORD,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// A short lock TTL so crash recovery is quick to test; renewals run every second.
const TTL: Duration = Duration::from_secs(3);
const JOE: &str = "joe@example.org";
const ANN: &str = "ann@example.org";
const JOE_KEY: &str = "mailgate:lock:joe@example.org";

fn locks_toml(url: &str) -> String {
    format!(
        "\n[locks]\nbackend = \"redis\"\nredis_url = \"{url}\"\nttl_secs = {}\nredis_timeout_ms = 1000\n",
        TTL.as_secs()
    )
}

/// One replica using `redis` for its locks and login-failure counters.
fn replica(redis: &RedisServer, opts: Options) -> Server {
    let extra = format!("{}{}", opts.extra, locks_toml(&redis.url()));
    Server::start_with(Options { extra, ..opts })
}

/// Two replicas, each with its own data dir holding the same domain and users.
fn replicas(redis: &RedisServer, opts: Options, users: &[&str]) -> (Server, Server) {
    let a = replica(redis, opts.clone());
    let b = replica(redis, opts);
    for s in [&a, &b] {
        for u in users {
            s.with_user(u);
        }
    }
    (a, b)
}

/// The number of messages in a maildrop, read in a session of its own (retrying while a
/// session that just ended still holds the lock).
async fn count(server: &Server, user: &str) -> usize {
    let deadline = Instant::now() + TTL * 2;
    loop {
        let mut c = pop3s(server).await;
        let r = c.login(user, PASSWORD).await;
        if r.starts_with("-ERR [IN-USE]") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert!(r.starts_with("+OK"), "login {user}: {r}");
        let stat = c.cmd("STAT").await;
        assert!(c.cmd("QUIT").await.starts_with("+OK"));
        return stat
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("STAT: {stat}"));
    }
}

#[tokio::test]
async fn replicas_share_maildrop_locks() {
    let redis = RedisServer::start();
    let (a, b) = replicas(&redis, Options::default(), &[JOE, ANN]);
    let mut on_a = logged_in(&a, JOE).await;
    let token = redis.get(JOE_KEY).expect("the lock is a key in redis");
    assert_eq!(token.len(), 32, "{token}");
    let Resp::Int(pttl) = redis.cmd(&["PTTL", JOE_KEY]) else {
        panic!("PTTL")
    };
    assert!(pttl > 0 && pttl <= TTL.as_millis() as i64, "{pttl}");

    let mut on_b = pop3s(&b).await;
    for name in [JOE, "JOE@Example.ORG"] {
        let r = on_b.login(name, PASSWORD).await;
        assert!(r.starts_with("-ERR [IN-USE]"), "{name} on B: {r}");
    }
    // Other maildrops are unaffected, on either replica.
    for s in [&a, &b] {
        let mut ann = logged_in(s, ANN).await;
        assert!(ann.cmd("QUIT").await.starts_with("+OK"));
    }
    assert!(on_a.cmd("QUIT").await.starts_with("+OK"));
    assert!(on_a.closed().await);
    // Released by compare-and-delete: the key is gone, and B gets in.
    let deadline = Instant::now() + Duration::from_secs(2);
    while redis.get(JOE_KEY).is_some() {
        assert!(Instant::now() < deadline, "lock not released after QUIT");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = on_b.login(JOE, PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
    assert_ne!(
        redis.get(JOE_KEY),
        Some(token),
        "a new session has a new token"
    );
}

#[tokio::test]
async fn killed_replica_lock_expires_and_its_deletions_are_not_applied() {
    let redis = RedisServer::start();
    // The binaries, to kill -9 one.
    let process = Options {
        process: true,
        ..Options::default()
    };
    let (mut a, b) = replicas(&redis, process, &[JOE]);
    a.deliver(JOE, &message("one", 1));
    a.deliver(JOE, &message("two", 1));
    let mut on_a = logged_in(&a, JOE).await;
    assert!(on_a.cmd("DELE 1").await.starts_with("+OK"));
    assert!(on_a.cmd("DELE 2").await.starts_with("+OK"));
    a.kill9();
    let killed = Instant::now();

    let mut on_b = pop3s(&b).await;
    let r = on_b.login(JOE, PASSWORD).await;
    assert!(r.starts_with("-ERR [IN-USE]"), "A's lock outlives A: {r}");
    let margin = Duration::from_millis(1500);
    loop {
        let r = on_b.login(JOE, PASSWORD).await;
        if r.starts_with("+OK") {
            break;
        }
        assert!(r.starts_with("-ERR [IN-USE]"), "{r}");
        assert!(
            killed.elapsed() < TTL + margin,
            "still locked {:?} after the crash",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "figure: B logged in {} ms after A was killed (TTL {} ms)",
        killed.elapsed().as_millis(),
        TTL.as_millis()
    );
    assert!(on_b.cmd("QUIT").await.starts_with("+OK"));

    // A never reached UPDATE: its DELE marks are gone with it.
    a.spawn();
    assert_eq!(count(&a, JOE).await, 2, "a DELE mark was applied");
}

/// Logs in and out until a login succeeds (each failure must be [SYS/TEMP], or [IN-USE]
/// while a lock whose release Redis never completed runs out its TTL); returns how long
/// that took. Fails after 5 s.
async fn recovered(server: &Server) -> Duration {
    let start = Instant::now();
    loop {
        let mut c = pop3s(server).await;
        let r = c.login(JOE, PASSWORD).await;
        if r.starts_with("+OK") {
            assert!(c.cmd("QUIT").await.starts_with("+OK"));
            return start.elapsed();
        }
        assert!(
            r.starts_with("-ERR [SYS/TEMP]") || r.starts_with("-ERR [IN-USE]"),
            "{r}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no recovery after redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn redis_outage_ends_sessions_and_fails_logins_fast_then_recovers() {
    let mut redis = RedisServer::start();
    // The binary: the same process must survive the outage.
    let a = replica(
        &redis,
        Options {
            process: true,
            ..Options::default()
        },
    );
    a.with_user(JOE);
    a.deliver(JOE, &message("one", 1));
    a.deliver(JOE, &message("two", 1));
    let pid = a.pid();
    let mut s = logged_in(&a, JOE).await;
    assert!(s.cmd("DELE 1").await.starts_with("+OK"));

    redis.stop();
    let stopped = Instant::now();
    // The lock can no longer be renewed: the session ends by itself, without UPDATE.
    let line = s.try_line().await.unwrap_or_default();
    assert!(
        line.starts_with("-ERR [SYS/TEMP]"),
        "session not ended: {line:?}"
    );
    assert!(s.closed().await);
    let ended = stopped.elapsed();
    assert!(ended < TTL, "session outlived its lock: {ended:?}");
    // Readiness says Redis is gone but stays 200 outside a cluster: every replica
    // shares the outage, and deliveries do not need Redis. The session's loss is counted.
    let readyz = format!("http://{}/readyz", a.metrics);
    let (code, body) = crate::metrics::http_get(&readyz);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ready, degraded: lock backend"), "{body}");
    let losses = |a: &Server| {
        crate::metrics::metric(
            a.metrics,
            "mailgate_lock_losses_total",
            &[("backend", "redis")],
        )
    };
    assert_eq!(losses(&a), 1.0);
    // The backend counted its failed Redis calls and the renewals before the outage.
    let m = |name: &str, labels: &[(&str, &str)]| crate::metrics::metric(a.metrics, name, labels);
    let errors = m("mailgate_redis_errors_total", &[("operation", "renew")])
        + m("mailgate_redis_errors_total", &[("operation", "ping")]);
    assert!(errors >= 1.0, "redis errors not counted: {errors}");
    assert!(
        m(
            "mailgate_lock_renewals_total",
            &[("backend", "redis"), ("result", "failed")]
        ) >= 1.0
    );
    eprintln!(
        "figure: session ended {} ms after redis died",
        ended.as_millis()
    );

    // New logins fail fast with [SYS/TEMP].
    let worst = slowest_refused_login(&a, 5, Duration::from_secs(1)).await;
    eprintln!(
        "figure: login with redis down answered [SYS/TEMP] in at most {} ms",
        worst.as_millis()
    );

    // Redis comes back (empty, on the same port): logins work without a restart.
    redis.restart();
    let back = recovered(&a).await;
    assert_eq!(crate::metrics::http_get(&readyz).0, 200);
    eprintln!(
        "figure: first successful login {} ms after redis restarted",
        back.as_millis()
    );

    // A Redis that accepts connections but never answers: bounded by the timeout.
    redis.freeze(true);
    let worst = slowest_refused_login(&a, 2, Duration::from_millis(1500)).await;
    redis.freeze(false);
    eprintln!(
        "figure: login with redis frozen answered [SYS/TEMP] in at most {} ms",
        worst.as_millis()
    );
    let back = recovered(&a).await;
    eprintln!(
        "figure: first successful login {} ms after redis thawed",
        back.as_millis()
    );

    assert_eq!(a.pid(), pid, "mailgate was restarted");
    // Nothing was deleted by the session that lost its lock.
    assert_eq!(count(&a, JOE).await, 2);
    // Logins refused while Redis was down took no lock, so lost none.
    assert_eq!(losses(&a), 1.0);
}

#[tokio::test]
async fn stolen_lock_ends_the_owning_session_without_update() {
    let redis = RedisServer::start();
    let a = replica(&redis, Options::default());
    a.with_user(JOE);
    a.deliver(JOE, &message("one", 1));
    a.deliver(JOE, &message("two", 1));

    // Deleted behind the session's back: the next renewal finds it gone.
    let mut s = logged_in(&a, JOE).await;
    assert!(s.cmd("DELE 1").await.starts_with("+OK"));
    assert_eq!(redis.cmd(&["DEL", JOE_KEY]), Resp::Int(1));
    let line = s.try_line().await.unwrap_or_default();
    assert_eq!(
        line,
        "-ERR [SYS/TEMP] Maildrop lock lost, no changes were made\r\n"
    );
    assert!(s.closed().await);

    // Taken by another owner just before QUIT: UPDATE checks the token and deletes nothing.
    let mut s = logged_in(&a, JOE).await;
    assert!(s.cmd("DELE 1").await.starts_with("+OK"));
    assert_eq!(
        redis.cmd(&["SET", JOE_KEY, "someone-else", "PX", "60000"]),
        Resp::Simple("OK".into())
    );
    let r = s.cmd("QUIT").await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert_eq!(
        redis.get(JOE_KEY).as_deref(),
        Some("someone-else"),
        "the other owner's lock was released"
    );
    assert_eq!(redis.cmd(&["DEL", JOE_KEY]), Resp::Int(1));

    assert_eq!(count(&a, JOE).await, 2, "a stolen session deleted mail");
    let log = a.wait_for_log("locks_lost_total=2");
    assert!(log.contains("maildrop lock lost"), "{log}");
    assert!(log.contains("locks_lost_total=2"), "not counted: {log}");
}

#[tokio::test]
async fn login_failures_on_one_replica_throttle_the_other() {
    let redis = RedisServer::start();
    let opts = Options {
        max_auth_failures_per_ip: 5,
        max_auth_failures_per_account: 2,
        ..Options::default()
    };
    let (a, b) = replicas(&redis, opts, &[JOE, ANN]);
    async fn fail(server: &Server, user: &str, times: usize) {
        let mut c = pop3s(server).await;
        for _ in 0..times {
            let r = c.login(user, "wrong").await;
            assert!(r.starts_with("-ERR [AUTH]"), "{r}");
        }
    }
    // Two failures for joe on A: joe is refused on B, even with the right password.
    fail(&a, JOE, 2).await;
    let mut c = pop3s(&b).await;
    let joe_refused = c.login(JOE, PASSWORD).await;
    assert!(
        joe_refused.starts_with("-ERR [LOGIN-DELAY]"),
        "{joe_refused}"
    );
    // A name without an account is counted and refused the same way.
    fail(&b, "nobody@example.org", 2).await;
    let mut c = pop3s(&a).await;
    let nobody_refused = c.login("nobody@example.org", PASSWORD).await;
    assert_eq!(
        nobody_refused, joe_refused,
        "the answer tells accounts apart"
    );
    // The IP has four failures of five: ann still gets in, on either replica.
    for s in [&a, &b] {
        let mut ann = logged_in(s, ANN).await;
        assert!(ann.cmd("QUIT").await.starts_with("+OK"));
    }
    // A fifth failure from this IP: every login from it is refused on both replicas.
    fail(&b, ANN, 1).await;
    for s in [&a, &b] {
        let mut c = pop3s(s).await;
        let r = c.login(ANN, PASSWORD).await;
        assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "{r}");
    }
    // The counters are expiring keys shared in Redis.
    for key in [
        "mailgate:authfail:ip:127.0.0.1",
        "mailgate:authfail:user:joe@example.org",
        "mailgate:authfail:user:nobody@example.org",
    ] {
        let Resp::Int(pttl) = redis.cmd(&["PTTL", key]) else {
            panic!("PTTL {key}")
        };
        assert!(pttl > 0, "{key} has no expiry: {pttl}");
    }
}

#[tokio::test]
async fn redis_acl_user_auth_and_the_password_is_never_printed() {
    const SECRET: &str = "Zq8-pw-ACL-secret";
    const WRONG: &str = "Wr0ng-pw-never-shown";
    let redis = RedisServer::start_with(RedisOptions {
        acl_user: Some(("mailgate".into(), SECRET.into())),
        ..RedisOptions::default()
    });
    let a = replica(&redis, Options::default());
    a.with_user(JOE);
    // The ACL user may only touch mailgate:* keys; locks and counters stay inside.
    let mut s = logged_in(&a, JOE).await;
    assert!(redis.get(JOE_KEY).is_some());
    assert!(s.cmd("QUIT").await.starts_with("+OK"));
    let mut c = pop3s(&a).await;
    assert!(c.login(JOE, "wrong").await.starts_with("-ERR [AUTH]"));
    assert_eq!(
        redis
            .get("mailgate:authfail:user:joe@example.org")
            .as_deref(),
        Some("1")
    );

    let out = a.cli(&["check-config"], b"");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("redis at redis://mailgate:***@127.0.0.1") && text.contains("reachable"),
        "{text}"
    );

    // The wrong password: check-config fails and says so without showing it; a server
    // with it starts, refuses logins with [SYS/TEMP] and never logs it either.
    let config = std::fs::read_to_string(&a.config).expect("config");
    let wrong_config = a.dir.path().join("wrong.toml");
    std::fs::write(&wrong_config, config.replace(SECRET, WRONG)).expect("write");
    let out = cli(&wrong_config, &["check-config"], b"");
    let wrong_text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{wrong_text}");
    assert!(
        wrong_text.contains("unreachable") && wrong_text.contains("mailgate:***@"),
        "{wrong_text}"
    );
    let wrong_url = redis.url().replace(SECRET, WRONG);
    let b = Server::start_with(Options {
        extra: locks_toml(&wrong_url),
        ..Options::default()
    });
    b.with_user(JOE);
    let mut c = pop3s(&b).await;
    let r = c.login(JOE, PASSWORD).await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");

    // A port where nothing listens.
    let dead = wrong_config.with_file_name("dead.toml");
    let port = redis.port.to_string();
    std::fs::write(
        &dead,
        config.replace(&format!("127.0.0.1:{port}"), "127.0.0.1:9"),
    )
    .expect("write");
    let out = cli(&dead, &["check-config"], b"");
    let dead_text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && dead_text.contains("unreachable"),
        "{dead_text}"
    );

    for shown in [text, wrong_text, dead_text, a.log_text(), b.log_text()] {
        assert!(
            !shown.contains(SECRET) && !shown.contains(WRONG),
            "a redis password was printed:\n{shown}"
        );
    }
    assert!(b.log_text().contains("redis unreachable at start"));
}

#[tokio::test]
async fn rediss_with_a_private_ca_and_requirepass() {
    const SECRET: &str = "tls-requirepass-secret";
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path());
    let (cert, key) = ca.issue("redis", &["127.0.0.1"]);
    let redis = RedisServer::start_with(RedisOptions {
        requirepass: Some(SECRET.into()),
        tls: Some((cert, key, ca.ca_pem.clone())),
        ..RedisOptions::default()
    });
    assert!(redis.url().starts_with("rediss://:"));
    let extra = format!(
        "{}redis_ca_file = \"{}\"\n",
        locks_toml(&redis.url()),
        ca.ca_pem.display()
    );
    let a = Server::start_with(Options {
        extra,
        ..Options::default()
    });
    a.with_user(JOE);
    let mut s = logged_in(&a, JOE).await;
    let mut other = pop3s(&a).await;
    let r = other.login(JOE, PASSWORD).await;
    assert!(r.starts_with("-ERR [IN-USE]"), "{r}");
    assert!(s.cmd("QUIT").await.starts_with("+OK"));
    let out = a.cli(&["check-config"], b"");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains("reachable"), "{text}");
    assert!(text.contains("rediss://:***@127.0.0.1"), "{text}");
    assert!(!a.log_text().contains(SECRET) && !text.contains(SECRET));
}

/// What one stress client saw.
#[derive(Default)]
struct Seen {
    sessions: usize,
    busy: usize,
    /// (replica, user, UID) of every message whose deletion QUIT confirmed.
    deleted: Vec<(usize, String, String)>,
}

async fn uidls(server: &Server, user: &str) -> BTreeSet<String> {
    let deadline = Instant::now() + TTL * 2;
    loop {
        let mut c = Raw::plain(server.pop3).await;
        c.line().await;
        let r = c.login(user, PASSWORD).await;
        if r.starts_with("-ERR [IN-USE]") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert!(r.starts_with("+OK"), "{r}");
        assert!(c.cmd("UIDL").await.starts_with("+OK"));
        let listing = String::from_utf8(c.multiline_raw().await).expect("utf8");
        assert!(c.cmd("QUIT").await.starts_with("+OK"));
        return listing
            .lines()
            .filter(|l| *l != ".")
            .map(|l| l.split_whitespace().nth(1).expect("uid").to_owned())
            .collect();
    }
}

/// 2 replicas × 50 clients on 5 maildrops for a few seconds: the lock log of both
/// replicas never shows two holders of one maildrop, and every message that disappeared
/// was confirmed deleted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_hold_one_maildrop_at_once() {
    const CLIENTS: usize = 50;
    const MESSAGES: usize = 30;
    const ROUNDS: usize = 300;
    const RUN_FOR: Duration = Duration::from_secs(3);
    let users: Vec<String> = (0..5).map(|i| format!("u{i}@example.org")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let redis = RedisServer::start();
    let opts = Options {
        allow_plaintext_auth: true,
        max_connections_per_ip: 4 * CLIENTS,
        ..Options::default()
    };
    let (a, b) = replicas(&redis, opts, &names);
    let servers = [&a, &b];
    for s in servers {
        for m in 0..MESSAGES {
            let mut args = vec!["deliver"];
            args.extend(names.iter());
            let out = s.cli(&args, &message(&format!("m{m}"), 2));
            assert!(out.status.success(), "deliver");
        }
    }
    let mut before = BTreeMap::new();
    for (r, s) in servers.iter().enumerate() {
        for u in &users {
            before.insert((r, u.clone()), uidls(s, u).await);
        }
    }

    let deadline = Instant::now() + RUN_FOR;
    let mut tasks = tokio::task::JoinSet::new();
    for (r, s) in servers.iter().enumerate() {
        for c in 0..CLIENTS {
            let (addr, users) = (s.pop3, users.clone());
            tasks.spawn(async move {
                let mut seen = Seen::default();
                // A refused login is retried on the same connection (the session stays in
                // AUTHORIZATION), so the test does not churn through ephemeral ports.
                let mut idle: Option<Raw> = None;
                for round in 0..ROUNDS {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let user = &users[(c + round) % users.len()];
                    let mut conn = match idle.take() {
                        Some(conn) => conn,
                        None => {
                            let mut conn = Raw::plain(addr).await;
                            conn.line().await;
                            conn
                        }
                    };
                    let reply = conn.login(user, PASSWORD).await;
                    if reply.starts_with("-ERR [IN-USE]") {
                        seen.busy += 1;
                        idle = Some(conn);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    assert!(reply.starts_with("+OK"), "{user}: {reply}");
                    seen.sessions += 1;
                    let stat = conn.cmd("STAT").await;
                    if stat.starts_with("+OK 0 ") {
                        assert!(conn.cmd("QUIT").await.starts_with("+OK"));
                        continue;
                    }
                    let uid = conn.cmd("UIDL 1").await;
                    let uid = uid.split_whitespace().nth(2).expect("uid").to_owned();
                    assert!(conn.cmd("DELE 1").await.starts_with("+OK"));
                    assert!(conn.cmd("NOOP").await.starts_with("+OK"));
                    let quit = conn.cmd("QUIT").await;
                    assert_eq!(quit, "+OK Logging out, 1 messages deleted\r\n");
                    seen.deleted.push((r, user.clone(), uid));
                }
                if let Some(mut conn) = idle {
                    assert!(conn.cmd("QUIT").await.starts_with("+OK"));
                }
                seen
            });
        }
    }
    let mut all = Seen::default();
    while let Some(done) = tasks.join_next().await {
        let seen = done.expect("client task");
        all.sessions += seen.sessions;
        all.busy += seen.busy;
        all.deleted.extend(seen.deleted);
    }
    eprintln!(
        "figure: {} sessions, {} [IN-USE] refusals, {} deletions in {:?} on 2 replicas",
        all.sessions,
        all.busy,
        all.deleted.len(),
        RUN_FOR
    );
    assert!(all.sessions >= 20 && all.busy > 0, "no contention");

    // Every holder, from both replicas' logs: per maildrop, never two at once.
    let holders = assert_one_holder_at_a_time(|| vec![a.log_text(), b.log_text()]).await;
    assert!(holders.sessions >= all.sessions);
    assert_eq!(holders.maildrops, users.len());

    // No message lost, none deleted twice.
    let deleted: BTreeSet<_> = all.deleted.iter().cloned().collect();
    assert_eq!(deleted.len(), all.deleted.len(), "a message deleted twice");
    for (r, s) in servers.iter().enumerate() {
        for u in &users {
            let after = uidls(s, u).await;
            let gone: BTreeSet<String> = deleted
                .iter()
                .filter(|(dr, du, _)| *dr == r && du == u)
                .map(|(_, _, uid)| uid.clone())
                .collect();
            let expected: BTreeSet<String> =
                before[&(r, u.clone())].difference(&gone).cloned().collect();
            assert!(gone.is_subset(&before[&(r, u.clone())]));
            assert_eq!(after, expected, "replica {r} {u}");
        }
    }
}

/// Makes `n` logins that must fail with [SYS/TEMP] (Redis unusable), each within
/// `limit`; returns the slowest answer.
async fn slowest_refused_login(server: &Server, n: usize, limit: Duration) -> Duration {
    let mut worst = Duration::ZERO;
    for _ in 0..n {
        let mut c = pop3s(server).await;
        assert!(c.cmd(&format!("USER {JOE}")).await.starts_with("+OK"));
        let t = Instant::now();
        let r = c.cmd(&format!("PASS {PASSWORD}")).await;
        let took = t.elapsed();
        assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
        assert!(took < limit, "login took {took:?}");
        worst = worst.max(took);
    }
    worst
}
