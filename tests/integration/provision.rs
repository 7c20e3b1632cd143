//! `[provision]`: domains and accounts from PHC hashes created by `serve` at start, never
//! overwritten; bad accounts files stop `serve` and `check-config` naming file and line.

use crate::common::cluster::{replica_name, Cluster, ClusterOptions};
use crate::common::{python, Options, Raw, Server, BIN, PASSWORD};
use base64::Engine;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SNI: &str = "localhost";

/// `mailgate hash-password`, at the embedded default argon2id cost.
fn hash_password(password: &str) -> String {
    let mut child = Command::new(BIN)
        .args(["hash-password", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hash-password");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write password");
    let out = child.wait_with_output().expect("hash-password");
    assert!(out.status.success(), "{out:?}");
    let phc = String::from_utf8(out.stdout).expect("utf-8");
    let phc = phc.trim().to_string();
    assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
    phc
}

fn provision_toml(accounts: &Path) -> String {
    format!(
        "[provision]\ndomains = [\"example.org\", \"Example.NET\"]\naccounts_file = \"{}\"\n",
        accounts.display()
    )
}

async fn plain_login(server: &Server, user: &str, password: &str) -> String {
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, SNI).await;
    assert!(c.line().await.starts_with("+OK"));
    let ir = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    c.cmd(&format!("AUTH PLAIN {ir}")).await
}

fn scram_login(server: &Server, user: &str, password: &str) -> String {
    let ca = server.ca.ca_pem.display().to_string();
    let port = server.pop3s.port().to_string();
    python("scram_login.py", &["127.0.0.1", &port, &ca, user, password])
}

#[tokio::test]
async fn serve_creates_domains_and_accounts_from_hashes_and_never_overwrites() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let accounts = secrets.path().join("accounts");
    let joe_hash = hash_password(PASSWORD);
    let ann_hash = hash_password("ann's passphrase");
    std::fs::write(
        &accounts,
        format!("# from a Secret\njoe@example.org {joe_hash}\nann@example.net\t{ann_hash}\n"),
    )
    .expect("write accounts");
    let mut server = Server::start_with(Options {
        extra: provision_toml(&accounts),
        ..Options::default()
    });
    let domains = server.cli(&["domain", "list"], b"");
    assert_eq!(
        String::from_utf8_lossy(&domains.stdout),
        "example.net\nexample.org\n"
    );
    let log = server.log_text();
    assert!(
        log.contains("provisioned account address=joe@example.org"),
        "{log}"
    );
    assert!(log.contains("accounts_created=2"), "{log}");
    for hash in [&joe_hash, &ann_hash] {
        assert!(
            !log.contains(&hash[hash.len() - 20..]),
            "a hash reached the log"
        );
    }

    // No SCRAM keys before a password login: SCRAM fails exactly like a wrong password.
    let right = scram_login(&server, "joe@example.org", PASSWORD);
    let wrong = scram_login(&server, "joe@example.org", "wrong");
    assert!(right.starts_with("FAIL -ERR [AUTH]"), "{right}");
    assert_eq!(right, wrong);

    // USER/PASS through poplib, and AUTH PLAIN.
    server.deliver("joe@example.org", &crate::common::message("hello", 2));
    let ca = server.ca.ca_pem.display().to_string();
    let port = server.pop3s.port().to_string();
    let out = python(
        "poplib_session.py",
        &["ssl", "localhost", &port, &ca, "joe@example.org", PASSWORD],
    );
    assert!(out.contains("\"stat\": [1, "), "{out}");
    let r = plain_login(&server, "ann@example.net", "ann's passphrase").await;
    assert!(r.starts_with("+OK"), "{r}");
    let r = plain_login(&server, "ann@example.net", "wrong").await;
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");

    // The first password login gave joe SCRAM keys, keeping the provisioned hash.
    let ok = scram_login(&server, "joe@example.org", PASSWORD);
    assert!(ok.starts_with("OK +OK"), "{ok}");
    // `user passwd` gives the account SCRAM keys.
    let out = server.cli(
        &["user", "passwd", "ann@example.net", "--password-stdin"],
        b"a new one\n",
    );
    assert!(out.status.success(), "{out:?}");
    let ok = scram_login(&server, "ann@example.net", "a new one");
    assert!(ok.starts_with("OK +OK"), "{ok}");

    // A restart with other hashes for existing accounts changes none of them.
    std::fs::write(
        &accounts,
        format!(
            "joe@example.org {}\nann@example.net {}\nnew@example.org {}\n",
            hash_password("changed"),
            hash_password("changed"),
            hash_password("newcomer")
        ),
    )
    .expect("rewrite accounts");
    assert!(server.stop().success());
    server.log.lock().expect("log").clear();
    server.spawn();
    let log = server.log_text();
    assert!(log.contains("accounts_created=1 accounts_kept=2"), "{log}");
    let r = plain_login(&server, "joe@example.org", PASSWORD).await;
    assert!(r.starts_with("+OK Logged in, 1 messages"), "{r}");
    assert!(plain_login(&server, "ann@example.net", "a new one")
        .await
        .starts_with("+OK"));
    assert!(plain_login(&server, "new@example.org", "newcomer")
        .await
        .starts_with("+OK"));
}

/// A config with nothing bound to a fixed port, for runs that must fail before listening.
fn write_config(dir: &Path, accounts: &Path) -> std::path::PathBuf {
    let config = dir.join("mailgate.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[pop3]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\n\
             [lmtp]\nlisten = \"\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n{}",
            dir.join("data").display(),
            provision_toml(accounts)
        ),
    )
    .expect("write config");
    config
}

#[test]
fn bad_accounts_files_stop_serve_and_check_config_naming_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let accounts = dir.path().join("accounts");
    let config = write_config(dir.path(), &accounts);
    let good = hash_password("pw");
    let tail = &good[good.len() - 20..];
    let cases = [
        (
            format!("joe@example.org {good}\njoe@example.com {good}\n"),
            "line 2: domain of joe@example.com is not in provision.domains",
        ),
        (
            format!("joe@example.org {}\n", good.replace("argon2id", "argon2i")),
            "line 1: password hash of joe@example.org: unsupported algorithm",
        ),
        (format!("{good}\n"), "line 1: expected two fields"),
        (
            format!("\n{good} joe@example.org\n"),
            "line 2: the first field is not a valid address",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(&accounts, &text).expect("write accounts");
        let check = crate::common::cli(&config, &["check-config"], b"");
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert!(!check.status.success(), "check-config accepted {text:?}");
        assert!(stderr.contains(&accounts.display().to_string()), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains(tail), "hash echoed: {stderr}");

        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("serve kept running with a bad accounts file");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().expect("serve output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!status.success());
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains(tail), "hash echoed: {stderr}");
    }
    // Nothing was created by the failed starts.
    assert!(!dir.path().join("data/domains/example.org").exists());

    std::fs::write(&accounts, format!("joe@example.org {good}\n")).expect("write accounts");
    let check = crate::common::cli(&config, &["check-config"], b"");
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{check:?}");
    assert!(
        stdout.contains("provision: 2 domain(s), 1 account(s) created at start when absent"),
        "{stdout}"
    );
}

/// An accounts file of 6000 accounts of example.org (one hash for all), and their names.
fn many_accounts(dir: &Path) -> (std::path::PathBuf, Vec<String>) {
    let accounts = dir.join("accounts");
    let hash = hash_password(PASSWORD);
    let names: Vec<String> = (0..6000)
        .map(|i| format!("customer-mailbox-{i:05}@example.org"))
        .collect();
    let file: String = names.iter().map(|n| format!("{n} {hash}\n")).collect();
    std::fs::write(&accounts, file).expect("write accounts");
    (accounts, names)
}

/// `user list` of a domain with thousands of accounts (an answer of ~150 KB, past the
/// request line's bound) lists every one.
#[tokio::test]
async fn user_list_of_thousands_of_accounts_is_whole() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let (accounts, names) = many_accounts(secrets.path());
    let server = Server::start_with(Options {
        extra: provision_toml(&accounts),
        ..Options::default()
    });
    let out = server.cli(&["user", "list", "example.org"], b"");
    assert!(out.status.success(), "{out:?}");
    let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(listed.len(), names.len());
    assert_eq!(listed.first(), names.first());
}

/// The same through a replica that is not the domain's home: the home's answer crosses
/// the replica link whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_list_of_thousands_of_accounts_is_whole_through_another_replica() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let (accounts, names) = many_accounts(secrets.path());
    let c = Cluster::start(ClusterOptions {
        replicas: 2,
        pins: vec![("example.org".into(), replica_name(0))],
        replica: Options {
            extra: format!(
                "[provision]\ndomains = [\"example.org\"]\naccounts_file = \"{}\"\n",
                accounts.display()
            ),
            ..Options::default()
        },
    });
    for args in [&["user", "list", "example.org"][..], &["user", "list"]] {
        let out = c.replicas[1].cli(args, b"");
        assert!(out.status.success(), "{args:?}: {out:?}");
        let listed = String::from_utf8_lossy(&out.stdout).lines().count();
        assert_eq!(listed, names.len(), "{args:?}");
    }
}
