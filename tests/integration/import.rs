//! `mailgate import dovecot` against a real Dovecot 2.3: mail delivered over Dovecot's
//! LMTP (some of it then deleted over POP3), imported into a running `mailgate serve`,
//! and read back over POP3 from both servers: the same UIDLs, LIST sizes and bytes, the
//! same passwords for every scheme, fetchmail's UIDL memory still valid, reruns adding
//! nothing (nor bringing back what a user deleted), and the hostile inputs reported per
//! account.

use crate::common::cluster::{replica_name, Cluster, ClusterOptions};
use crate::common::dovecot::{hash, Dovecot};
use crate::common::{fetchmail, require_tool, write_private, Options, Raw, Server};
use std::path::Path;

const DOMAIN: &str = "example.org";

/// The accounts: address, scheme and password.
const ACCOUNTS: &[(&str, &str, &str)] = &[
    ("argon@example.org", "ARGON2ID", "argon's secret"),
    ("sha@example.org", "SHA512-CRYPT", "sha's secret"),
    ("blf@example.org", "BLF-CRYPT", "blf's secret"),
    ("plain@example.org", "PLAIN", "plain's secret"),
    ("md5@example.org", "MD5-CRYPT", "md5's secret"),
    ("yes@example.org", "YESCRYPT", "yes's secret"),
];

/// `{CRYPT}` yescrypt, as Debian's crypt(3) writes it and `doveadm pw` cannot: made with
/// `mkpasswd -m yescrypt "yes's secret"` (whois 5.5.17, libxcrypt 4.4.33, Debian 12).
const YESCRYPT_FIELD: &str =
    "{CRYPT}$y$j9T$M79NVF2CE3kmaPj/DxPSf1$GhJ0atlP1C/S4Cv1t0BYxXgJLPKwLR5SWQGYM251k.B";

/// The passwd-file field of an account: `doveadm pw`'s, or the yescrypt one above.
fn password_field(scheme: &str, password: &str) -> String {
    match scheme {
        "YESCRYPT" => {
            assert_eq!(password, "yes's secret", "YESCRYPT_FIELD's password");
            YESCRYPT_FIELD.to_owned()
        }
        _ => hash(scheme, password),
    }
}

/// What a POP3 session shows of a maildrop: UIDL and LIST lines and every body.
#[derive(Debug, PartialEq, Eq)]
struct Shown {
    uidl: Vec<String>,
    list: Vec<String>,
    bodies: Vec<Vec<u8>>,
}

async fn multiline_lines(c: &mut Raw, cmd: &str) -> Vec<String> {
    let r = c.cmd(cmd).await;
    assert!(r.starts_with("+OK"), "{cmd}: {r}");
    String::from_utf8(c.multiline().await)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Logs in (a failed login panics) and reads everything.
async fn show(mut c: Raw, user: &str, password: &str) -> Shown {
    let greeting = c.line().await;
    assert!(greeting.starts_with("+OK"), "{greeting}");
    let r = c.login(user, password).await;
    assert!(r.starts_with("+OK"), "login {user}: {r}");
    let uidl = multiline_lines(&mut c, "UIDL").await;
    let list = multiline_lines(&mut c, "LIST").await;
    let mut bodies = Vec::new();
    for i in 1..=list.len() {
        let r = c.cmd(&format!("RETR {i}")).await;
        assert!(r.starts_with("+OK"), "RETR {i}: {r}");
        bodies.push(c.multiline().await);
    }
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    Shown { uidl, list, bodies }
}

async fn dovecot_shows(dovecot: &Dovecot, user: &str, password: &str) -> Shown {
    show(Raw::plain(dovecot.pop3).await, user, password).await
}

async fn mailgate_shows(server: &Server, user: &str, password: &str) -> Shown {
    let c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    show(c, user, password).await
}

/// Messages of varied sizes and line ends: CRLF, bare LF, dot-led lines, > 64 KiB.
fn messages(tag: &str) -> Vec<Vec<u8>> {
    let mut large = format!("Subject: {tag} large\r\nFrom: a@example.net\r\n\r\n").into_bytes();
    for i in 0..1500 {
        large.extend_from_slice(
            format!("{i:05} the quick brown fox jumps over the lazy dog\r\n").as_bytes(),
        );
    }
    assert!(large.len() > 64 * 1024);
    vec![
        format!("Subject: {tag} small\r\nFrom: a@example.net\r\n\r\nhello\r\n").into_bytes(),
        format!("Subject: {tag} bare\nFrom: a@example.net\n\nline one\nline two\n").into_bytes(),
        large,
        format!("Subject: {tag} dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n")
            .into_bytes(),
        format!("Subject: {tag} last\r\n\r\nbye\r\n").into_bytes(),
    ]
}

fn import(server: &Server, passwd: &Path, template: &str, extra: &[&str]) -> std::process::Output {
    let passwd = passwd.to_str().expect("path");
    let mut args = vec![
        "import",
        "dovecot",
        "--domain",
        DOMAIN,
        "--passwd-file",
        passwd,
        "--maildir",
        template,
    ];
    args.extend_from_slice(extra);
    server.cli(&args, b"")
}

/// `import` of every account's `maildir:~/Maildir`, which must succeed; its report.
fn imported_ok(server: &Server, passwd: &Path, extra: &[&str]) -> String {
    let out = import(server, passwd, "maildir:~/Maildir", extra);
    assert!(out.status.success(), "{out:?}");
    text(&out.stdout)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A fetchmail rc polling `user` at 127.0.0.1:`port` over POP3S with UIDLs kept.
fn fetchmail_rc(
    dir: &Path,
    name: &str,
    port: u16,
    ca: &Path,
    user: &str,
    password: &str,
) -> std::path::PathBuf {
    let rc = dir.join(name);
    write_private(
        &rc,
        &format!(
            "set no bouncemail\npoll localhost port {port} protocol pop3 uidl\n  user \"{user}\" there with password \"{password}\" is root here\n  ssl sslcertck sslcertfile \"{ca}\" keep\n  mda \"/bin/sh -c 'cat >> {mbox}'\"\n",
            ca = ca.display(),
            mbox = dir.join("fetched.mbox").display(),
        ),
    );
    rc
}

#[tokio::test]
async fn a_dovecot_domain_moves_over_with_uidls_bytes_and_passwords() {
    require_tool("fetchmail");
    let mut server = Server::start_with(Options {
        process: true,
        ..Options::default()
    });
    let accounts: Vec<(&str, String)> = ACCOUNTS
        .iter()
        .map(|(user, scheme, password)| (*user, password_field(scheme, password)))
        .collect();
    let dovecot = Dovecot::start(&server.ca, &accounts);
    for (user, _, _) in ACCOUNTS {
        for m in messages(user) {
            dovecot.deliver(user, &m);
        }
    }
    // Expunged mail exists in the Maildirs' history: DELE + QUIT in Dovecot.
    for (user, _, password, number) in [
        (ACCOUNTS[0].0, (), ACCOUNTS[0].2, 2),
        (ACCOUNTS[1].0, (), ACCOUNTS[1].2, 1),
    ] {
        let mut c = Raw::plain(dovecot.pop3).await;
        c.line().await;
        assert!(c.login(user, password).await.starts_with("+OK"));
        assert!(c.cmd(&format!("DELE {number}")).await.starts_with("+OK"));
        assert!(c.cmd("QUIT").await.starts_with("+OK"));
    }
    let mut before = Vec::new();
    for (user, _, password) in ACCOUNTS {
        before.push(dovecot_shows(&dovecot, user, password).await);
    }
    assert_eq!(before[0].list.len(), 4);
    // fetchmail keeps the UIDLs it has seen, against Dovecot.
    let fm = tempfile::tempdir().expect("tempdir");
    let (fm_user, _, fm_password) = ACCOUNTS[2];
    let rc = fetchmail_rc(
        fm.path(),
        "dovecot.rc",
        dovecot.pop3s.port(),
        &server.ca.ca_pem,
        fm_user,
        fm_password,
    );
    let out = fetchmail(&rc, fm.path());
    assert!(out.status.success(), "fetchmail against Dovecot: {out:?}");

    // Hostile accounts next to the good ones: an unknown scheme, another domain, no
    // Maildir, a malformed dovecot-uidlist, yescrypt asking for 4 GiB per login.
    let broken_home = dovecot.dir.path().join("mail/broken");
    std::fs::create_dir_all(broken_home.join("Maildir/cur")).expect("mkdir");
    std::fs::write(
        broken_home.join("Maildir/cur/1.a.host:2,"),
        b"Subject: x\n\nx\n",
    )
    .expect("mail");
    std::fs::write(
        broken_home.join("Maildir/dovecot-uidlist"),
        b"3 V1 N2\n1 no-colon\n",
    )
    .expect("uidlist");
    let mut passwd = std::fs::read_to_string(&dovecot.passwd).expect("passwd");
    let home = |local: &str| {
        dovecot
            .dir
            .path()
            .join("mail")
            .join(local)
            .display()
            .to_string()
    };
    passwd.push_str(&format!(
        "weird@example.org:{{NOPE}}abc:0:0::{}::\n",
        home("weird")
    ));
    passwd.push_str(&format!(
        "other@elsewhere.org:{{PLAIN}}x:0:0::{}::\n",
        home("other")
    ));
    passwd.push_str(&format!("ghost:{{PLAIN}}x:0:0::{}::\n", home("ghost")));
    passwd.push_str(&format!("broken:{{PLAIN}}x:0:0::{}::\n", home("broken")));
    passwd.push_str(&format!(
        "costly@example.org:{}:0:0::{}::\n",
        YESCRYPT_FIELD.replace("$j9T$", "$jHT$"),
        home("costly")
    ));
    passwd.push_str("no fields here\n");
    let hostile = dovecot.dir.path().join("passwd-hostile");
    std::fs::write(&hostile, passwd).expect("write");

    // A template with an unknown variable changes nothing.
    let out = import(
        &server,
        &dovecot.passwd,
        "maildir:/var/vmail/%q/Maildir",
        &[],
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(text(&out.stderr).contains("%q"), "{out:?}");
    // A dry run reads everything and changes nothing.
    let out = import(
        &server,
        &dovecot.passwd,
        "maildir:~/Maildir",
        &["--dry-run"],
    );
    assert!(out.status.success(), "{out:?}");
    let report = text(&out.stdout);
    assert_eq!(
        report.matches(": would import: ").count(),
        ACCOUNTS.len(),
        "{report}"
    );
    // On a terminal (script(1) gives it one) the same run draws a progress bar over the
    // accounts between the report lines; without one (above) it prints no bar.
    require_tool("script");
    assert!(!text(&out.stderr).contains("accounts, eta"), "{out:?}");
    let command = format!(
        "{} --config {} import dovecot --domain {DOMAIN} --passwd-file {} --maildir 'maildir:~/Maildir' --dry-run",
        crate::common::BIN,
        server.config.display(),
        dovecot.passwd.display()
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("COLUMNS", "120")
        .output()
        .expect("script");
    assert!(tty.status.success(), "{tty:?}");
    let screen = text(&tty.stdout);
    assert!(
        screen.contains("import [") && screen.contains("accounts, eta"),
        "{screen}"
    );
    assert_eq!(
        screen.matches(": would import: ").count(),
        ACCOUNTS.len(),
        "{screen}"
    );
    assert!(
        report.contains("argon@example.org: would import: 4 message(s)"),
        "{report}"
    );
    let domains = server.cli(&["domain", "list"], b"");
    assert!(!text(&domains.stdout).contains(DOMAIN), "{domains:?}");

    // The import with the hostile lines: the good accounts in, the others reported.
    let out = import(&server, &hostile, "maildir:~/Maildir", &[]);
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    let report = text(&out.stdout);
    for (user, _, _) in ACCOUNTS {
        assert!(report.contains(&format!("{user}: imported: ")), "{report}");
    }
    for (user, why) in [
        ("weird@example.org", "NOPE"),
        ("other@elsewhere.org", "another domain"),
        ("ghost@example.org", "no Maildir"),
        ("broken@example.org", "dovecot-uidlist"),
        (
            "costly@example.org",
            "yescrypt) hash too costly (4194304; the accepted maximum is 65536)",
        ),
    ] {
        let line = report
            .lines()
            .find(|l| l.starts_with(&format!("{user}: failed: ")))
            .unwrap_or_else(|| panic!("no failure line for {user}: {report}"));
        assert!(line.contains(why), "{line}");
    }
    let bad_line = ACCOUNTS.len() + 6;
    assert!(
        report.contains(&format!("line {bad_line}: expected user:password")),
        "{report}"
    );
    let summary = format!(
        "summary: {} account(s) imported, 0 skipped-existing, 6 failed",
        ACCOUNTS.len()
    );
    assert!(report.contains(&summary), "{report}");
    let users = text(&server.cli(&["user", "list", DOMAIN], b"").stdout);
    let mut listed: Vec<&str> = users.lines().collect();
    listed.sort_unstable();
    let mut expected: Vec<&str> = ACCOUNTS.iter().map(|a| a.0).collect();
    expected.sort_unstable();
    assert_eq!(listed, expected);

    // Both servers show the same maildrops, and the same passwords log in.
    for ((user, _, password), dovecot_view) in ACCOUNTS.iter().zip(&before) {
        let mailgate_view = mailgate_shows(&server, user, password).await;
        assert_eq!(&mailgate_view, dovecot_view, "{user}");
        // The first login upgraded a legacy hash; the password still works.
        mailgate_shows(&server, user, password).await;
    }
    // The crypt hashes came over as they were and were replaced at the first login.
    for (user, _, _) in ACCOUNTS.iter().filter(|a| a.1.contains("CRYPT")) {
        server.wait_for_log(&format!("upgraded to the configured cost address={user}"));
    }
    let log = server.log_text();
    for (user, scheme, _) in ACCOUNTS.iter().filter(|a| a.1.contains("CRYPT")) {
        let line = log
            .lines()
            .find(|l| l.contains("password hash upgraded") && l.contains(user))
            .unwrap_or_else(|| panic!("no upgrade of {user}: {log}"));
        assert!(
            line.contains(&format!("from={scheme}"))
                || line.contains(&format!("from=\"{scheme}\"")),
            "{line}"
        );
        assert!(line.contains("scram=true"), "{line}");
    }
    // fetchmail's UIDL memory from Dovecot holds for mailgate: nothing new.
    let rc = fetchmail_rc(
        fm.path(),
        "mailgate.rc",
        server.pop3s.port(),
        &server.ca.ca_pem,
        fm_user,
        fm_password,
    );
    let out = fetchmail(&rc, fm.path());
    assert_eq!(
        out.status.code(),
        Some(1),
        "fetchmail against mailgate: {out:?}"
    );
    let seen = before[2].list.len();
    assert!(
        text(&out.stdout).contains(&format!("{seen} messages ({seen} seen)")),
        "{out:?}"
    );

    // A dry run now asks the server what it has: nothing new.
    let report = imported_ok(&server, &dovecot.passwd, &["--dry-run"]);
    assert!(
        report.contains(&format!(
            "{}: would import: 0 message(s), 0 octets on disk, {} imported before",
            ACCOUNTS[0].0,
            before[0].list.len()
        )),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "summary: 0 account(s) would be imported, {} skipped-existing, 0 failed",
            ACCOUNTS.len()
        )),
        "{report}"
    );

    // A rerun adds nothing, and reads no message the server already has.
    let report = imported_ok(&server, &dovecot.passwd, &[]);
    assert_eq!(
        report.matches(": skipped-existing: 0 message(s)").count(),
        ACCOUNTS.len(),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "{}: skipped-existing: 0 message(s), 0 octets, {} already there, 0 deleted since",
            ACCOUNTS[0].0,
            before[0].list.len()
        )),
        "{report}"
    );
    assert!(
        report.contains(" 0 failed; 0 message(s), 0 octets read in "),
        "{report}"
    );
    for ((user, _, password), dovecot_view) in ACCOUNTS.iter().zip(&before) {
        assert_eq!(
            &mailgate_shows(&server, user, password).await,
            dovecot_view,
            "{user}"
        );
    }

    // New mail gets a mailgate UIDL, unlike every imported one.
    let (user, _, password) = ACCOUNTS[0];
    server.deliver(user, b"Subject: after the move\r\n\r\nnew\r\n");
    let after = mailgate_shows(&server, user, password).await;
    assert_eq!(after.uidl.len(), before[0].uidl.len() + 1);
    let newest = after
        .uidl
        .last()
        .expect("uidl")
        .split(' ')
        .nth(1)
        .expect("uidl");
    let imported: Vec<&str> = before
        .iter()
        .flat_map(|s| &s.uidl)
        .filter_map(|l| l.split(' ').nth(1))
        .collect();
    assert!(!imported.contains(&newest), "{newest} collides");

    // Mail the user deletes on mailgate stays deleted when the import runs again.
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    assert!(c.line().await.starts_with("+OK"));
    assert!(c.login(user, password).await.starts_with("+OK"));
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    assert!(c.cmd("DELE 2").await.starts_with("+OK"));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    let report = imported_ok(&server, &dovecot.passwd, &[]);
    let kept = before[0].uidl.len() - 2;
    assert!(
        report.contains(&format!(
            "{user}: skipped-existing: 0 message(s), 0 octets, {kept} already there, 2 deleted since"
        )),
        "{report}"
    );
    let now = mailgate_shows(&server, user, password).await;
    assert_eq!(now.uidl.len(), after.uidl.len() - 2, "{now:?}");
    assert_eq!(
        now.bodies[..],
        after.bodies[2..],
        "the deleted messages stayed deleted"
    );

    // Mail deleted on Dovecot since the import is deleted here by a rerun with
    // --mirror-deletions, and only by one: never under a POP3 session on the maildrop.
    let (user, _, password) = ACCOUNTS[1];
    let on_mailgate = mailgate_shows(&server, user, password).await;
    assert_eq!(on_mailgate, before[1]);
    let mut c = Raw::plain(dovecot.pop3).await;
    c.line().await;
    assert!(c.login(user, password).await.starts_with("+OK"));
    assert!(c.cmd("DELE 1").await.starts_with("+OK"));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    let on_dovecot = dovecot_shows(&dovecot, user, password).await;
    assert_eq!(on_dovecot.list.len() + 1, before[1].list.len());
    imported_ok(&server, &dovecot.passwd, &[]);
    assert_eq!(mailgate_shows(&server, user, password).await, on_mailgate);
    let mut held = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    assert!(held.line().await.starts_with("+OK"));
    assert!(held.login(user, password).await.starts_with("+OK"));
    let out = import(
        &server,
        &dovecot.passwd,
        "maildir:~/Maildir",
        &["--mirror-deletions"],
    );
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let report = text(&out.stdout);
    assert!(
        report.contains(&format!("{user}: failed: "))
            && report.contains("in use by a POP3 session"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "{}: skipped-existing: 0 message(s), 0 octets, {kept} already there, 2 deleted since, 0 deleted to match the source",
            ACCOUNTS[0].0
        )),
        "mail delivered to mailgate is never mirrored away: {report}"
    );
    assert!(held.cmd("QUIT").await.starts_with("+OK"));
    assert_eq!(mailgate_shows(&server, user, password).await, on_mailgate);
    let report = imported_ok(&server, &dovecot.passwd, &["--mirror-deletions"]);
    assert!(
        report.contains(&format!(
            "{user}: skipped-existing: 0 message(s), 0 octets, {} already there, 0 deleted since, 1 deleted to match the source",
            on_dovecot.list.len()
        )),
        "{report}"
    );
    assert_eq!(mailgate_shows(&server, user, password).await, on_dovecot);

    // Every hash is argon2id now: imported plaintext at once, legacy ones at login.
    server.stop();
    // With no server to ask, a dry run opens nothing and counts every message as new.
    let report = imported_ok(&server, &dovecot.passwd, &["--dry-run"]);
    assert!(
        report.contains(&format!(
            "{user}: would import: {} message(s)",
            on_dovecot.list.len()
        )) && report.contains("no server running to ask what is already imported"),
        "{report}"
    );
    let directory = mailgate::store::Directory::open(
        &server.dir.path().join("data"),
        mailgate::store::StoreOptions::default(),
    )
    .expect("open data dir");
    let store = directory.domain(DOMAIN).expect("domain");
    for (user, scheme, _) in ACCOUNTS {
        let local = user.split('@').next().expect("local");
        let account = store.account(local).expect("read").expect("account");
        assert!(
            account.credentials.phc.starts_with("$argon2id$"),
            "{scheme}: {}",
            account.credentials.phc
        );
        assert!(
            account.credentials.scram.is_some(),
            "{scheme}: no SCRAM keys"
        );
    }
}

/// In a cluster the import runs on any replica: run on mailgate-1 for a domain pinned to
/// mailgate-0, the domain is created at its home and the accounts and mail land there;
/// both replicas show what Dovecot showed. A mirroring rerun through mailgate-1 finds
/// the maildrop lock a session through mailgate-1 (forwarded to the home) holds, and
/// once the session ends it deletes what was deleted on Dovecot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_the_import_lands_at_the_home_through_any_replica() {
    let c = Cluster::start(ClusterOptions {
        replicas: 2,
        pins: vec![(DOMAIN.into(), replica_name(0))],
        replica: Options::default(),
    });
    let (user, scheme, password) = ACCOUNTS[0];
    let dovecot = Dovecot::start(&c.ca, &[(user, password_field(scheme, password))]);
    for m in messages(user) {
        dovecot.deliver(user, &m);
    }
    let before = dovecot_shows(&dovecot, user, password).await;
    let front = &c.replicas[1];
    let report = imported_ok(front, &dovecot.passwd, &[]);
    assert!(
        report.contains(&format!(
            "{user}: imported: {} message(s)",
            before.list.len()
        )),
        "{report}"
    );
    assert_eq!(c.home_record(DOMAIN).get("home"), Some(&replica_name(0)));
    let store_of = |r: &Server| r.dir.path().join("data/domains").join(DOMAIN);
    assert!(store_of(&c.replicas[0]).is_dir());
    assert!(!store_of(front).exists());
    for replica in &c.replicas {
        assert_eq!(mailgate_shows(replica, user, password).await, before);
    }

    let mut d = Raw::plain(dovecot.pop3).await;
    d.line().await;
    assert!(d.login(user, password).await.starts_with("+OK"));
    assert!(d.cmd("DELE 2").await.starts_with("+OK"));
    assert!(d.cmd("QUIT").await.starts_with("+OK"));
    let on_dovecot = dovecot_shows(&dovecot, user, password).await;
    let mut held = Raw::tls(front.pop3s, &front.ca.ca_pem, "localhost").await;
    assert!(held.line().await.starts_with("+OK"));
    assert!(held.login(user, password).await.starts_with("+OK"));
    let mirror = ["--mirror-deletions"];
    let out = import(front, &dovecot.passwd, "maildir:~/Maildir", &mirror);
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(
        text(&out.stdout).contains("in use by a POP3 session"),
        "{out:?}"
    );
    assert!(held.cmd("QUIT").await.starts_with("+OK"));
    let report = imported_ok(front, &dovecot.passwd, &mirror);
    assert!(
        report.contains(", 1 deleted to match the source"),
        "{report}"
    );
    for replica in &c.replicas {
        assert_eq!(mailgate_shows(replica, user, password).await, on_dovecot);
    }
}
