//! Password work under attack and over time: the hashing pool stays within its memory
//! budget and refuses with [SYS/TEMP] when its queue is full, failed logins answer at one
//! deadline whether or not the name exists, and a right password upgrades a hash or SCRAM
//! keys made with less than the configured cost.

use crate::common::{rss_kib, Options, Raw, Server, PASSWORD};
use base64::Engine;
use mailgate::auth::{self, HashParams};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1024;

/// One USER/PASS attempt over cleartext POP3; the PASS reply.
async fn try_login(server: &Server, user: &str, password: &str) -> String {
    let mut c = Raw::plain(server.pop3).await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("+OK"), "{greeting}");
    let r = c.cmd(&format!("USER {user}")).await;
    assert!(r.starts_with("+OK"), "USER: {r}");
    c.cmd(&format!("PASS {password}")).await
}

/// Failed logins in flight at once.
const FLOOD: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_failed_logins_stays_in_the_hashing_budget() {
    // As on a node with 64 CPUs: 64 hashing threads asked for, 128 MiB allowed for them.
    // Each thread counts at the largest hash it may verify (64 MiB), so 2 run; each keeps
    // a 16 MiB argon2 buffer. Without the budget the 64 threads kept 1 GiB.
    let server = Server::start_with(Options {
        process: true,
        allow_plaintext_auth: true,
        max_connections_per_ip: 1000,
        max_auth_failures_per_ip: 100_000,
        max_auth_failures_per_account: 0,
        argon2_memory_kib: 16 * 1024,
        extra: "[auth]\nhash_threads = 64\nhash_queue = 8\nhash_memory_mib = 128\n".into(),
        ..Options::default()
    });
    server.with_user("joe@example.org");
    server.add_user("ann@example.org", PASSWORD);
    let pid = server.pid();
    let log = server.log_text();
    assert!(log.contains("password hashing pool"), "{log}");
    assert!(log.contains("threads=2"), "{log}");
    // joe logs in once: his next logins are served from the verified-login cache.
    let r = try_login(&server, "joe@example.org", PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
    let before = rss_kib(pid);

    let peak = Arc::new(AtomicU64::new(before));
    let flooding = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, flooding) = (peak.clone(), flooding.clone());
        tokio::spawn(async move {
            while flooding.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let server = Arc::new(server);
    let mut flood = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let server = server.clone();
        flood.push(tokio::spawn(async move {
            // Half to a known name with a wrong password, half to unknown names.
            let user = if i % 2 == 0 {
                "joe@example.org".to_string()
            } else {
                format!("ghost{i}@example.org")
            };
            try_login(&server, &user, "wrong password").await
        }));
    }
    // Meanwhile real users are served: joe at once (cached), ann (cold) within retries.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = try_login(&server, "joe@example.org", PASSWORD).await;
    assert!(r.starts_with("+OK"), "joe during the flood: {r}");
    let mut ann = String::new();
    for _ in 0..100 {
        ann = try_login(&server, "ann@example.org", PASSWORD).await;
        if !ann.starts_with("-ERR [SYS/TEMP]") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ann.starts_with("+OK"), "ann during the flood: {ann}");

    let (mut failed, mut busy) = (0, 0);
    for attempt in flood {
        let r = tokio::time::timeout(Duration::from_secs(120), attempt)
            .await
            .expect("flood bounded")
            .expect("join");
        if r.starts_with("-ERR [AUTH]") {
            failed += 1;
        } else if r.starts_with("-ERR [SYS/TEMP] Too many logins in progress") {
            busy += 1;
        } else {
            panic!("unexpected answer {r}");
        }
    }
    flooding.store(false, Ordering::Relaxed);
    sampler.await.expect("sampler");
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "flood of {FLOOD}: {failed} failed, {busy} refused busy; RSS {} MiB before, peak {} MiB",
        before / MIB,
        peak / MIB
    );
    assert!(failed > 0, "some attempts were hashed");
    assert!(busy > 0, "a full queue refused some");
    // Two threads' buffers (2 x 16 MiB), connections and slack: far below 64 x 16 MiB.
    assert!(
        peak < before + 160 * MIB,
        "RSS grew from {before} KiB to {peak} KiB"
    );
}

/// `mailgate hash-password` PHC of `password` at `params`, made by the library.
fn phc(password: &str, params: &HashParams) -> String {
    auth::make_credentials(password, params).expect("hash").phc
}

fn provision(server_dir: &std::path::Path, lines: &str) -> String {
    let accounts = server_dir.join("accounts");
    std::fs::write(&accounts, lines).expect("accounts file");
    format!(
        "[provision]\ndomains = [\"example.org\"]\naccounts_file = \"{}\"\n",
        accounts.display()
    )
}

/// Seconds until a failed USER/PASS is answered.
async fn failure_time(server: &Server, user: &str) -> f64 {
    let mut c = Raw::plain(server.pop3).await;
    assert!(c.line().await.starts_with("+OK"));
    assert!(c.cmd(&format!("USER {user}")).await.starts_with("+OK"));
    let started = Instant::now();
    let r = c.cmd("PASS wrong password").await;
    let took = started.elapsed().as_secs_f64();
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    took
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::test]
async fn failed_logins_answer_at_one_deadline_known_or_not() {
    // joe's stored hash is the costliest accepted (64 MiB, 3 passes: hundreds of ms);
    // an unknown name costs the configured 1 MiB. Both answer at the 2 s deadline.
    let secrets = tempfile::tempdir().expect("tempdir");
    let costly = HashParams {
        memory_kib: 64 * 1024,
        iterations: 3,
        ..HashParams::cheap()
    };
    let extra = provision(
        secrets.path(),
        &format!("joe@example.org {}\n", phc(PASSWORD, &costly)),
    );
    let server = Server::start_with(Options {
        allow_plaintext_auth: true,
        auth_failure_delay_ms: 2000,
        extra,
        ..Options::default()
    });
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..3 {
        known.push(failure_time(&server, "joe@example.org").await);
        unknown.push(failure_time(&server, &format!("ghost{i}@example.org")).await);
    }
    let (known, unknown) = (median(known), median(unknown));
    eprintln!("failed login answered after {known:.3} s (known), {unknown:.3} s (unknown)");
    assert!(known >= 1.95 && unknown >= 1.95, "{known} {unknown}");
    // The work of joe's hash is inside the deadline, not added to it.
    assert!((known - unknown).abs() < 0.15, "{known} vs {unknown}");
}

/// The SCRAM iteration count (`i=`) the server announces for `user`.
async fn scram_iterations(server: &Server, user: &str) -> u32 {
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    assert!(c.line().await.starts_with("+OK"));
    let b64 = base64::engine::general_purpose::STANDARD;
    let first = b64.encode(format!("n,,n={user},r=clientnonce0123"));
    let r = c.cmd(&format!("AUTH SCRAM-SHA-256 {first}")).await;
    let challenge = r.strip_prefix("+ ").unwrap_or_else(|| panic!("{r}"));
    let server_first =
        String::from_utf8(b64.decode(challenge.trim()).expect("base64")).expect("utf-8");
    assert!(c.cmd("*").await.starts_with("-ERR"));
    server_first
        .split(',')
        .find_map(|a| a.strip_prefix("i="))
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("{server_first}"))
}

/// The stored PHC string of `local@example.org`, read from the stopped server's data dir.
fn stored_phc(server: &Server, local: &str) -> String {
    let directory = mailgate::store::Directory::open(
        &server.dir.path().join("data"),
        mailgate::store::StoreOptions::default(),
    )
    .expect("open data dir");
    let store = directory.domain("example.org").expect("domain");
    let account = store.account(local).expect("read").expect("account");
    account.credentials.phc
}

#[tokio::test]
async fn a_right_password_upgrades_weaker_hashes_and_scram_keys() {
    // ann comes from an accounts file with a hash cheaper than configured; joe was made
    // with 4096 SCRAM rounds. The configuration then asks for 2 passes and 5000 rounds.
    let secrets = tempfile::tempdir().expect("tempdir");
    let extra = provision(
        secrets.path(),
        &format!("ann@example.org {}\n", phc("ann's", &HashParams::cheap())),
    );
    let mut server = Server::start_with(Options {
        extra,
        ..Options::default()
    });
    server.add_user("joe@example.org", PASSWORD);
    assert_eq!(scram_iterations(&server, "joe@example.org").await, 4096);
    assert!(server.stop().success());
    let ann_before = stored_phc(&server, "ann");
    let joe_before = stored_phc(&server, "joe");
    assert!(ann_before.contains("m=1024,t=1,p=1"), "{ann_before}");
    let config = std::fs::read_to_string(&server.config).expect("config");
    let config = config
        .replace("iterations = 1\n", "iterations = 2\n")
        .replace("scram_iterations = 4096", "scram_iterations = 5000");
    std::fs::write(&server.config, config).expect("config");
    server.spawn();

    // A wrong password upgrades nothing; unknown names already show the new count.
    assert!(try_login_tls(&server, "joe@example.org", "wrong")
        .await
        .starts_with("-ERR [AUTH]"));
    assert_eq!(scram_iterations(&server, "joe@example.org").await, 4096);
    assert_eq!(scram_iterations(&server, "ghost@example.org").await, 5000);
    // The right one does, for the hash and the SCRAM keys alike.
    assert!(try_login_tls(&server, "joe@example.org", PASSWORD)
        .await
        .starts_with("+OK"));
    assert!(try_login_tls(&server, "ann@example.org", "ann's")
        .await
        .starts_with("+OK"));
    assert_eq!(scram_iterations(&server, "joe@example.org").await, 5000);
    server.wait_for_log("password hash upgraded to the configured cost address=joe@example.org");
    let log = server
        .wait_for_log("password hash upgraded to the configured cost address=ann@example.org");
    assert!(!log.contains(PASSWORD) && !log.contains("ann's"), "{log}");
    // The new hashes still log in (the cache is per process: restart to be sure).
    assert!(server.stop().success());
    let (ann, joe) = (stored_phc(&server, "ann"), stored_phc(&server, "joe"));
    assert!(ann.contains("m=1024,t=2,p=1") && ann != ann_before, "{ann}");
    assert!(joe.contains("m=1024,t=2,p=1") && joe != joe_before, "{joe}");
    server.spawn();
    assert!(try_login_tls(&server, "ann@example.org", "ann's")
        .await
        .starts_with("+OK"));
    assert!(try_login_tls(&server, "joe@example.org", PASSWORD)
        .await
        .starts_with("+OK"));
}

/// One USER/PASS attempt over POP3S; the PASS reply.
async fn try_login_tls(server: &Server, user: &str, password: &str) -> String {
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    assert!(c.line().await.starts_with("+OK"));
    c.login(user, password).await
}

// Made with `openssl passwd -6 -salt Xq3Zp9Lm` and Python's crypt (libxcrypt),
// `crypt.crypt(password, '$2y$05$abcdefghijklmnopqrstuu')`, of the passwords below.
const SHA512_CRYPT: &str = "$6$Xq3Zp9Lm$KeKwt7zj6L3uoD/lzx0ujct4NGEVO3U7N0Pr8VmDWp5Rs9iS9ZZMYKWyf.WjSxoYNaNKcOwEzGPc52oVEZu9b.";
const BLF_CRYPT: &str = "$2y$05$abcdefghijklmnopqrstuu680Yiaj5hFUaJTH/rTAcbA2PQEGfiZu";

/// Accounts provisioned with Dovecot's `{SHA512-CRYPT}` and `{BLF-CRYPT}` hashes log in
/// over POP3S with USER/PASS; that first login replaces the hash by argon2id at the
/// configured cost and adds SCRAM keys (a SCRAM-SHA-256 login, which failed before,
/// now succeeds), logged with the schemes and never the password; the password still
/// works after a restart.
#[tokio::test]
async fn imported_legacy_hashes_log_in_and_become_argon2id_with_scram() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let extra = provision(
        secrets.path(),
        &format!(
            "sha@example.org {{SHA512-CRYPT}}{SHA512_CRYPT}\nblf@example.org {{BLF-CRYPT}}{BLF_CRYPT}\n"
        ),
    );
    let mut server = Server::start_with(Options {
        extra,
        ..Options::default()
    });
    let scram = |server: &Server, user: &str| {
        let (ca, port) = (
            server.ca.ca_pem.display().to_string(),
            server.pop3s.port().to_string(),
        );
        crate::common::python("scram_login.py", &["127.0.0.1", &port, &ca, user, "pencil"])
    };
    for user in ["sha@example.org", "blf@example.org"] {
        assert!(
            scram(&server, user).starts_with("FAIL"),
            "no SCRAM keys yet"
        );
        assert!(try_login_tls(&server, user, "pencil!")
            .await
            .starts_with("-ERR [AUTH]"));
        let r = try_login_tls(&server, user, "pencil").await;
        assert!(r.starts_with("+OK"), "{user}: {r}");
        let r = scram(&server, user);
        assert!(r.starts_with("OK"), "{user}: {r}");
    }
    server.wait_for_log("upgraded to the configured cost address=sha@example.org");
    let log = server.wait_for_log("upgraded to the configured cost address=blf@example.org");
    for (user, from) in [("sha", "SHA512-CRYPT"), ("blf", "BLF-CRYPT")] {
        let line = log
            .lines()
            .find(|l| l.contains("password hash upgraded") && l.contains(user))
            .unwrap_or_else(|| panic!("{log}"));
        assert!(
            line.contains(&format!("from=\"{from}\"")) || line.contains(&format!("from={from}")),
            "{line}"
        );
        assert!(
            line.contains("to=") && line.contains("ARGON2ID") && line.contains("scram=true"),
            "{line}"
        );
    }
    assert!(!log.contains("pencil"), "{log}");
    assert!(server.stop().success());
    for local in ["sha", "blf"] {
        let phc = stored_phc(&server, local);
        assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{phc}");
    }
    server.spawn();
    for user in ["sha@example.org", "blf@example.org"] {
        assert!(try_login_tls(&server, user, "pencil")
            .await
            .starts_with("+OK"));
        let r = scram(&server, user);
        assert!(r.starts_with("OK"), "{user}: {r}");
    }
}
