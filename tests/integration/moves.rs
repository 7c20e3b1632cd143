//! Moving domains between replicas (`mailgate domain move`, `cluster rebalance`,
//! `cluster drain`, `cluster cleanup`) with real `mailgate serve` processes and a real
//! redis-server: a move under client load loses and duplicates nothing, keeps every
//! UIDL through every replica and never opens a maildrop twice; new mail after it gets
//! new ids; a move whose target is killed leaves the domain at home with nothing lost;
//! a fourth replica fills up by rebalancing and empties by draining.

use crate::common::cluster::{replica_name, Cluster, ClusterOptions};
use crate::common::{
    assert_one_holder_at_a_time, message, pop3s, stat_count, Options, Raw, Server, PASSWORD,
};
use crate::metrics::metric;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DOMAIN: &str = "move.example";

fn user(local: &str) -> String {
    format!("{local}@{DOMAIN}")
}

async fn login(server: &Server, user: &str) -> Result<Raw, String> {
    let mut c = pop3s(server).await;
    let r = c.cmd(&format!("USER {user}")).await;
    if !r.starts_with("+OK") {
        return Err(r);
    }
    let r = c.cmd(&format!("PASS {PASSWORD}")).await;
    if r.starts_with("+OK") {
        Ok(c)
    } else {
        Err(r)
    }
}

/// Every message of `user` as (UIDL, Subject), in maildrop order, through `server`.
async fn listing(server: &Server, user: &str) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = loop {
        match login(server, user).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "login {user}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let count = stat_count(&c.cmd("STAT").await);
    assert!(c.cmd("UIDL").await.starts_with("+OK"));
    let uidls = String::from_utf8(c.multiline_raw().await).expect("utf8");
    let uidls: Vec<String> = uidls
        .lines()
        .filter(|l| *l != ".")
        .map(|l| l.split_whitespace().nth(1).expect("uid").to_owned())
        .collect();
    assert_eq!(uidls.len(), count);
    let mut out = Vec::new();
    for (n, uid) in uidls.into_iter().enumerate() {
        assert!(c.cmd(&format!("TOP {} 0", n + 1)).await.starts_with("+OK"));
        let head = String::from_utf8_lossy(&c.multiline_raw().await).into_owned();
        let subject = head
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .unwrap_or_default()
            .to_owned();
        out.push((uid, subject));
    }
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    out
}

/// One LMTP delivery of a message with `subject` to `rcpt` through `server`: the final
/// reply (RCPT's when it was refused).
async fn lmtp(server: &Server, rcpt: &str, subject: &str) -> String {
    let mut l = Raw::plain(server.lmtp.expect("lmtp")).await;
    assert!(l.reply().await.starts_with("220 "));
    assert!(l.say("LHLO mx.test").await.starts_with("250"));
    assert!(l.say("MAIL FROM:<s@example.net>").await.starts_with("250"));
    let r = l.say(&format!("RCPT TO:<{rcpt}>")).await;
    if !r.starts_with("250") {
        return r;
    }
    assert!(l.say("DATA").await.starts_with("354"));
    let mut body = message(subject, 20);
    body.extend_from_slice(b".\r\n");
    l.send_bytes(&body).await;
    let r = l.reply().await;
    let _ = l.say("QUIT").await;
    r
}

/// Three replicas with `DOMAIN` pinned to replica 0, users joe, ann and bob.
fn cluster() -> Cluster {
    let c = Cluster::start(ClusterOptions {
        pins: vec![(DOMAIN.to_owned(), replica_name(0))],
        replica: Options {
            max_connections_per_ip: 1000,
            ..Options::default()
        },
        ..ClusterOptions::default()
    });
    c.replicas[1].cli_ok(&["domain", "add", DOMAIN], b"");
    for u in ["joe", "ann", "bob"] {
        c.replicas[2].add_user(&user(u), PASSWORD);
    }
    c
}

/// Starts moving `DOMAIN` to mailgate-1 through replica 2 with a grace of `grace` s and
/// returns once the record says `moving`; the thread gives the CLI's output.
async fn frozen_move(c: &Cluster, grace: u64) -> std::thread::JoinHandle<std::process::Output> {
    let config = c.replicas[2].config.clone();
    let mover = std::thread::spawn(move || {
        let grace = grace.to_string();
        let args = [
            "domain",
            "move",
            DOMAIN,
            "--to",
            "mailgate-1",
            "--grace",
            &grace,
        ];
        crate::common::cli(&config, &args, b"")
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.home_record(DOMAIN).get("state").map(String::as_str) != Some("moving") {
        if mover.is_finished() {
            let out = mover.join().expect("mover");
            panic!("the move ended before the freeze: {out:?}\n{}", c.logs());
        }
        assert!(Instant::now() < deadline, "never frozen:\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    mover
}

#[derive(Default)]
struct Load {
    accepted: BTreeSet<String>,
    refused: Vec<String>,
    logins: usize,
    login_refusals: Vec<String>,
}

/// A move under LMTP deliveries and POP3 sessions through the other replicas: nothing
/// lost or duplicated, every UIDL unchanged through every replica, the held session
/// ended without UPDATE, new mail gets ids above every old one, the old copy is kept
/// renamed and `cluster cleanup` removes it, and no maildrop was ever open twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_moves_under_load_keeping_every_uidl() {
    let c = cluster();
    let joe = user("joe");
    // Some big messages so the pre-copy has something to copy.
    for n in 0..12 {
        c.replicas[1].deliver(&joe, &message(&format!("before-{n}"), 1 + n * 3000));
    }
    for n in 0..3 {
        c.replicas[1].deliver(&user("bob"), &message(&format!("bob-{n}"), 5));
        c.replicas[1].deliver(&user("ann"), &message(&format!("ann-{n}"), 5));
    }
    let before = listing(&c.replicas[0], &joe).await;
    for r in &c.replicas[1..] {
        assert_eq!(
            listing(r, &joe).await,
            before,
            "same UIDLs through every replica"
        );
    }
    let bob_before = listing(&c.replicas[2], &user("bob")).await;

    // Bob holds a session with a deletion pending: it is ended without UPDATE.
    let mut held = login(&c.replicas[2], &user("bob")).await.expect("bob");
    assert!(held.cmd("DELE 1").await.starts_with("+OK"));

    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(Load::default()));
    let deliveries = {
        let (stop, load) = (stop.clone(), load.clone());
        let server = &c.replicas[2];
        let joe = joe.clone();
        async move {
            for k in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let subject = format!("during-{k}");
                let r = lmtp(server, &joe, &subject).await;
                let mut l = load.lock().expect("load");
                if r.starts_with("250") {
                    l.accepted.insert(subject);
                } else {
                    assert!(r.starts_with('4'), "only temporary refusals: {r}");
                    l.refused.push(r);
                }
            }
        }
    };
    let sessions = {
        let (stop, load) = (stop.clone(), load.clone());
        let server = &c.replicas[1];
        async move {
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match login(server, &user("ann")).await {
                    Ok(mut s) => {
                        assert!(s.cmd("STAT").await.starts_with("+OK"));
                        let r = s.cmd("RETR 1").await;
                        assert!(r.starts_with("+OK"), "{r}");
                        s.multiline_raw().await;
                        let q = s.cmd("QUIT").await;
                        assert!(q.starts_with("+OK"), "{q}");
                        load.lock().expect("load").logins += 1;
                    }
                    Err(e) => {
                        assert!(e.starts_with("-ERR [SYS/TEMP]"), "{e}");
                        load.lock().expect("load").login_refusals.push(e);
                    }
                }
            }
        }
    };
    let mover = {
        let stop = stop.clone();
        let server = &c.replicas[2];
        async move {
            // Load first, then the move through a replica that is neither home.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let config = server.config.clone();
            let out = tokio::task::spawn_blocking(move || {
                crate::common::cli(
                    &config,
                    &[
                        "domain",
                        "move",
                        DOMAIN,
                        "--to",
                        "mailgate-1",
                        "--grace",
                        "2",
                    ],
                    b"",
                )
            })
            .await
            .expect("cli");
            tokio::time::sleep(Duration::from_millis(500)).await;
            stop.store(true, Ordering::Relaxed);
            out
        }
    };
    let ((), (), out) = tokio::join!(deliveries, sessions, mover);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}\n{}", c.logs());
    assert!(stdout.contains("moved to mailgate-1 (epoch 3)"), "{stdout}");
    assert!(
        stderr.contains("pre-copy done"),
        "progress streamed: {stderr}"
    );
    assert!(stderr.contains("UIDLs equal"), "{stderr}");
    let frozen_ms: u64 = stdout
        .split("unavailable for ")
        .nth(1)
        .and_then(|r| r.split(" ms").next())
        .and_then(|n| n.parse().ok())
        .expect("freeze time");
    eprintln!("move under load: domain unavailable for {frozen_ms} ms\n{stderr}");
    let record = c.home_record(DOMAIN);
    assert_eq!(record["home"], "mailgate-1");
    assert_eq!(record["state"], "active");
    assert_eq!(record["epoch"], "3");
    let old_home = c.replicas[0].metrics;
    assert_eq!(
        metric(
            old_home,
            "mailgate_cluster_moves_total",
            &[("result", "moved")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            old_home,
            "mailgate_cluster_moves_total",
            &[("result", "failed")]
        ),
        0.0
    );
    assert_eq!(
        metric(old_home, "mailgate_cluster_move_frozen_seconds_count", &[]),
        1.0
    );

    // The held session was ended, its deletion not applied.
    let ended = held.line().await;
    assert!(ended.starts_with("-ERR [SYS/TEMP]"), "{ended}");
    assert!(held.closed().await);

    let load = std::mem::take(&mut *load.lock().expect("load"));
    assert!(!load.accepted.is_empty() && load.logins > 0, "no load ran");
    eprintln!(
        "load: {} deliveries accepted, {} refused; {} logins, {} refused",
        load.accepted.len(),
        load.refused.len(),
        load.logins,
        load.login_refusals.len()
    );
    // Through every replica: the same listing; the old UIDLs unchanged; every accepted
    // delivery exactly once; nothing refused visible.
    let after = listing(&c.replicas[0], &joe).await;
    for r in &c.replicas[1..] {
        assert_eq!(listing(r, &joe).await, after);
    }
    assert_eq!(after[..before.len()], before[..]);
    let during: Vec<&String> = after[before.len()..].iter().map(|(_, s)| s).collect();
    let unique: BTreeSet<&String> = during.iter().copied().collect();
    assert_eq!(unique.len(), during.len(), "a delivery duplicated");
    let during: BTreeSet<String> = during.into_iter().cloned().collect();
    assert_eq!(during, load.accepted, "accepted and stored differ");
    assert_eq!(listing(&c.replicas[1], &user("bob")).await, bob_before);

    // New mail on the new home never reuses an id: its UIDL is new and its id (the
    // UIDL's last 16 hex digits) above every old one.
    c.replicas[0].deliver(&joe, &message("after-the-move", 2));
    let newest = listing(&c.replicas[2], &joe).await;
    let (uid, subject) = newest.last().expect("new message");
    assert_eq!(subject, "after-the-move");
    let id = |u: &str| u64::from_str_radix(&u[8..], 16).expect("hex id");
    assert!(
        after.iter().all(|(u, _)| u != uid && id(u) < id(uid)),
        "{uid}"
    );

    // The old copy is renamed on the old home, and cleanup removes it.
    let domains = c.replicas[0].dir.path().join("data/domains");
    let names = || -> Vec<String> {
        std::fs::read_dir(&domains)
            .expect("domains")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(!names().contains(&DOMAIN.to_owned()));
    assert!(
        names()
            .iter()
            .any(|n| n.starts_with(".moved-move.example-")),
        "{:?}",
        names()
    );
    let kept = c.replicas[1].cli_ok(&["cluster", "cleanup", "--older-than", "1d"], b"");
    assert!(kept.contains("mailgate-0: 1 newer copies kept"), "{kept}");
    let removed = c.replicas[1].cli_ok(&["cluster", "cleanup", "--older-than", "0s"], b"");
    assert!(
        removed.contains("mailgate-0: removed old copy of move.example"),
        "{removed}"
    );
    assert!(!names().iter().any(|n| n.starts_with(".moved-")));

    let holders =
        assert_one_holder_at_a_time(|| c.replicas.iter().map(|r| r.log_text()).collect()).await;
    assert!(holders.sessions > load.logins);
}

/// The mover's target is killed during the pre-copy: the move fails, the domain stays
/// active at home with every message, and the target's partial copy is gone when it
/// restarts. The same after the freeze (killed during the grace): the domain is active
/// at home again, one epoch up. A move to the restarted target then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_target_dies_leaves_the_domain_at_home() {
    let mut c = Cluster::start(ClusterOptions {
        pins: vec![(DOMAIN.to_owned(), replica_name(0))],
        ..ClusterOptions::default()
    });
    c.replicas[1].cli_ok(&["domain", "add", DOMAIN], b"");
    let joe = user("joe");
    c.replicas[2].add_user(&joe, PASSWORD);
    // About 12 MB, so the copy takes long enough to be interrupted.
    for n in 0..20 {
        c.replicas[1].deliver(&joe, &message(&format!("big-{n}"), 50_000));
    }
    let before = listing(&c.replicas[2], &joe).await;
    let staging = c.replicas[1]
        .dir
        .path()
        .join("data/domains/.incoming-move.example");
    let config = c.replicas[2].config.clone();
    let mover = std::thread::spawn(move || {
        crate::common::cli(
            &config,
            &["domain", "move", DOMAIN, "--to", "mailgate-1"],
            b"",
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let copied = || -> u64 {
        std::fs::read_dir(&staging)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    while copied() < 1_000_000 {
        assert!(
            Instant::now() < deadline,
            "the copy never started:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    c.replicas[1].kill9();
    let out = mover.join().expect("mover");
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let record = c.home_record(DOMAIN);
    assert_eq!(
        (record["home"].as_str(), record["state"].as_str()),
        ("mailgate-0", "active")
    );
    assert_eq!(record["epoch"], "1", "never frozen");
    assert_eq!(listing(&c.replicas[2], &joe).await, before);
    c.replicas[1].spawn();
    assert!(!staging.exists(), "the partial copy is removed at start");

    // Killed after the freeze: a session holds the domain in the grace.
    let mut held = login(&c.replicas[0], &joe).await.expect("joe");
    let mover = frozen_move(&c, 3).await;
    // Frozen: new logins wait.
    let refused = login(&c.replicas[1], &joe).await.err().expect("refused");
    assert!(refused.starts_with("-ERR [SYS/TEMP]"), "{refused}");
    c.replicas[1].kill9();
    let out = mover.join().expect("mover");
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let home = c.replicas[0].metrics;
    assert_eq!(
        metric(
            home,
            "mailgate_cluster_moves_total",
            &[("result", "failed")]
        ),
        2.0
    );
    let ended = held.line().await;
    assert!(ended.starts_with("-ERR [SYS/TEMP]"), "{ended}");
    let record = c.home_record(DOMAIN);
    assert_eq!(
        (record["home"].as_str(), record["state"].as_str()),
        ("mailgate-0", "active")
    );
    assert_eq!(record["epoch"], "2");
    assert_eq!(listing(&c.replicas[2], &joe).await, before);
    // Mail flows at home again.
    c.replicas[2].deliver(&joe, &message("after-the-failure", 2));
    assert_eq!(listing(&c.replicas[0], &joe).await.len(), before.len() + 1);

    c.replicas[1].spawn();
    let out = c.replicas[0].cli_ok(&["domain", "move", DOMAIN, "--to", "mailgate-1"], b"");
    assert!(out.contains("moved to mailgate-1 (epoch 4)"), "{out}");
    let moved = listing(&c.replicas[0], &joe).await;
    assert_eq!(moved[..before.len()], before[..]);
    assert_eq!(moved.len(), before.len() + 1);
}

/// Wrong moves are refused with a clear error and the usage exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_moves_are_refused() {
    let c = cluster();
    let run = |args: &[&str]| {
        let out = c.replicas[1].cli(args, b"");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, e) = run(&["domain", "move", DOMAIN, "--to", "mailgate-9"]);
    assert_eq!(code, Some(64), "{e}");
    assert!(
        e.contains("mailgate-9 is not a replica of this cluster"),
        "{e}"
    );
    let (code, e) = run(&["domain", "move", DOMAIN, "--to", "mailgate-0"]);
    assert_eq!(code, Some(64), "{e}");
    assert!(e.contains("already lives on mailgate-0"), "{e}");
    let (code, e) = run(&["domain", "move", "nowhere.example", "--to", "mailgate-1"]);
    assert_eq!(code, Some(67), "{e}");
    let (code, e) = run(&["domain", "move", "../x", "--to", "mailgate-1"]);
    assert_eq!(code, Some(65), "{e}");
    let (code, e) = run(&["cluster", "cleanup", "--older-than", "soon"]);
    assert_eq!(code, Some(64), "{e}");
    assert!(e.contains("expected a number with a unit"), "{e}");
    let (code, e) = run(&["cluster", "drain", "mailgate-7"]);
    assert_eq!(code, Some(64), "{e}");
    let record = c.home_record(DOMAIN);
    assert_eq!(
        (record["home"].as_str(), record["epoch"].as_str()),
        ("mailgate-0", "1")
    );
}

/// Four replicas configured, the fourth started after the domains were created:
/// `rebalance` moves to it the domains whose hash now names it (and only those), all
/// reachable throughout; `drain` moves them all away again; `undrain` lets them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_fills_by_rebalance_and_empties_by_drain() {
    let mut c = Cluster::start(ClusterOptions {
        replicas: 4,
        ..ClusterOptions::default()
    });
    c.replicas[3].stop();
    c.redis.cmd(&["DEL", "mailgate:replica:mailgate-3"]);
    let domains: Vec<String> = (0..16).map(|i| format!("d{i}.example")).collect();
    for d in &domains {
        c.replicas[0].cli_ok(&["domain", "add", d], b"");
        c.replicas[1].add_user(&format!("joe@{d}"), PASSWORD);
        c.replicas[2].deliver(&format!("joe@{d}"), &message(d, 3));
    }
    let homes = |c: &Cluster| -> BTreeMap<String, String> {
        domains
            .iter()
            .map(|d| (d.clone(), c.home_record(d)["home"].clone()))
            .collect()
    };
    let before = homes(&c);
    assert!(before.values().all(|h| h != "mailgate-3"));

    c.replicas[3].spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.redis.get("mailgate:replica:mailgate-3").is_none() {
        assert!(Instant::now() < deadline, "no heartbeat");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let plan = c.replicas[1].cli_ok(&["cluster", "rebalance", "--dry-run"], b"");
    let planned: Vec<&str> = plan
        .lines()
        .filter(|l| l.starts_with("would move"))
        .collect();
    assert!(
        (1..=8).contains(&planned.len()) && planned.iter().all(|l| l.ends_with("to mailgate-3")),
        "about a quarter move, all to the new replica: {plan}"
    );
    assert_eq!(homes(&c), before, "a dry run moves nothing");

    // Logins to every domain through replica 0 while the rebalance runs.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (stop, server, domains) = (stop.clone(), &c.replicas[0], domains.clone());
        async move {
            let (mut ok, mut later) = (0, 0);
            for round in 0..10_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let d = &domains[round % domains.len()];
                match login(server, &format!("joe@{d}")).await {
                    Ok(mut s) => {
                        assert_eq!(stat_count(&s.cmd("STAT").await), 1, "{d}");
                        assert!(s.cmd("QUIT").await.starts_with("+OK"));
                        ok += 1;
                    }
                    Err(e) => {
                        assert!(e.starts_with("-ERR [SYS/TEMP]"), "{d}: {e}");
                        later += 1;
                    }
                }
            }
            (ok, later)
        }
    };
    let rebalance = {
        let (stop, config) = (stop.clone(), c.replicas[2].config.clone());
        async move {
            let out = tokio::task::spawn_blocking(move || {
                crate::common::cli(&config, &["cluster", "rebalance", "--pause-ms", "100"], b"")
            })
            .await
            .expect("cli");
            stop.store(true, Ordering::Relaxed);
            out
        }
    };
    let ((ok, later), out) = tokio::join!(prober, rebalance);
    assert!(out.status.success(), "{out:?}\n{}", c.logs());
    eprintln!("during the rebalance: {ok} logins served, {later} answered try-later");
    let after = homes(&c);
    let moved: Vec<&String> = domains.iter().filter(|d| before[*d] != after[*d]).collect();
    assert_eq!(moved.len(), planned.len());
    assert!(moved.iter().all(|d| after[*d] == "mailgate-3"));
    for d in &domains {
        assert_eq!(
            listing(&c.replicas[3], &format!("joe@{d}")).await.len(),
            1,
            "{d}"
        );
    }
    let again = c.replicas[0].cli_ok(&["cluster", "rebalance", "--dry-run"], b"");
    assert!(again.contains("nothing to move"), "{again}");

    // Drain: everything leaves mailgate-3; new domains never land there.
    let out = c.replicas[1].cli_ok(&["cluster", "drain", "mailgate-3", "--pause-ms", "0"], b"");
    assert!(out.contains("moved to"), "{out}");
    let status = c.replicas[2].cli_ok(&["cluster", "status", "--json"], b"");
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    let draining: Vec<bool> = (0..4)
        .map(|i| {
            status["replicas"][i]["draining"]
                .as_bool()
                .expect("draining")
        })
        .collect();
    assert_eq!(draining, [false, false, false, true], "{status}");
    assert_eq!(status["replicas"][3]["domains"], 0, "{status}");
    let drained = homes(&c);
    assert!(drained.values().all(|h| h != "mailgate-3"), "{drained:?}");
    assert_eq!(
        domains.iter().filter(|d| drained[*d] != before[*d]).count(),
        0,
        "back where the hash over the others puts them"
    );
    for i in 0..8 {
        let d = format!("new{i}.example");
        let added = c.replicas[3].cli_ok(&["domain", "add", &d], b"");
        assert!(!added.contains("mailgate-3"), "{added}");
    }
    for d in &domains {
        assert_eq!(
            listing(&c.replicas[3], &format!("joe@{d}")).await.len(),
            1,
            "{d}"
        );
    }
    c.replicas[0].cli_ok(&["cluster", "undrain", "mailgate-3"], b"");
    let plan = c.replicas[1].cli_ok(&["cluster", "rebalance", "--dry-run"], b"");
    assert!(
        plan.lines().filter(|l| l.starts_with("would move")).count() >= planned.len(),
        "{plan}"
    );
}

/// The home is killed during its move's grace: the domain stays frozen everywhere until
/// the move's lease expires, the target drops its partial copy, and the restarted home
/// serves the domain again (one epoch up) with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_killed_mid_move_gets_its_domain_back() {
    let mut c = cluster();
    let joe = user("joe");
    for n in 0..5 {
        c.replicas[1].deliver(&joe, &message(&format!("m{n}"), 50));
    }
    let before = listing(&c.replicas[1], &joe).await;
    let _held = login(&c.replicas[0], &joe).await.expect("joe");
    let mover = frozen_move(&c, 30).await;
    c.replicas[0].kill9();
    let out = mover.join().expect("mover");
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    // Frozen while the home is away: every replica answers "try later".
    let refused = login(&c.replicas[2], &joe).await.err().expect("refused");
    assert!(refused.starts_with("-ERR [SYS/TEMP]"), "{refused}");
    let staging = c.replicas[1]
        .dir
        .path()
        .join("data/domains/.incoming-move.example");
    let deadline = Instant::now() + Duration::from_secs(10);
    while staging.exists() {
        assert!(
            Instant::now() < deadline,
            "the target kept its partial copy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.replicas[0].spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.home_record(DOMAIN).get("state").map(String::as_str) != Some("active") {
        assert!(Instant::now() < deadline, "still frozen:\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record = c.home_record(DOMAIN);
    assert_eq!(
        (record["home"].as_str(), record["epoch"].as_str()),
        ("mailgate-0", "2")
    );
    assert_eq!(listing(&c.replicas[2], &joe).await, before);
    c.replicas[1].deliver(&joe, &message("after", 2));
    assert_eq!(listing(&c.replicas[0], &joe).await.len(), before.len() + 1);
}
