//! Real clients against the real server: Python's poplib (POP3S, STLS, APOP), fetchmail,
//! mpop, an independent SCRAM-SHA-256 client, and curl (`pop3s://`, `pop3://` with STLS,
//! plain).

use crate::common::{
    count_subjects, fetchmail, hex_sha256, message, python, require_tool, write_private, Options,
    Server, PASSWORD,
};
use std::process::Command;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("bad JSON from client ({e}): {s}"))
}

#[test]
fn poplib_pop3s_and_stls_fetch_and_delete() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let m1 = message("first", 5);
    let m2 = b"Subject: second\r\n\r\n.dot line\r\n\r\nafter blank\r\n".to_vec();
    server.deliver("joe@example.org", &m1);
    server.deliver("joe@example.org", &m2);
    let ca = server.ca.ca_pem.display().to_string();
    let port = server.pop3s.port().to_string();
    let out = json(&python(
        "poplib_session.py",
        &["ssl", "localhost", &port, &ca, "joe@example.org", PASSWORD],
    ));
    assert_eq!(out["stat"], serde_json::json!([2, m1.len() + m2.len()]));
    assert_eq!(
        out["sha256"],
        serde_json::json!([hex_sha256(&m1), hex_sha256(&m2)])
    );
    assert_eq!(out["sizes"], serde_json::json!([m1.len(), m2.len()]));
    assert_eq!(
        out["top0"],
        serde_json::json!([
            "From: a@example.net",
            "To: b@example.org",
            "Subject: first",
            ""
        ])
    );
    assert_eq!(out["uidl"].as_array().map(Vec::len), Some(2));
    assert!(out["quit"].as_str().is_some_and(|q| q.starts_with("+OK")));

    // The same over STLS on the cleartext port, then delete everything.
    let port = server.pop3.port().to_string();
    let again = json(&python(
        "poplib_session.py",
        &[
            "stls",
            "localhost",
            &port,
            &ca,
            "joe@example.org",
            PASSWORD,
            "--delete",
        ],
    ));
    assert_eq!(again["uidl"], out["uidl"], "UIDL differs between sessions");
    let capa: Vec<String> = serde_json::from_value(again["capa"].clone()).expect("capa");
    assert!(
        capa.contains(&"USER".to_string()) && !capa.contains(&"STLS".to_string()),
        "{capa:?}"
    );
    let port = server.pop3s.port().to_string();
    let empty = json(&python(
        "poplib_session.py",
        &["ssl", "localhost", &port, &ca, "joe@example.org", PASSWORD],
    ));
    assert_eq!(empty["stat"], serde_json::json!([0, 0]));
}

#[test]
fn poplib_plaintext_only_when_allowed() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let port = server.pop3.port().to_string();
    let script = format!(
        "import poplib,sys\nc=poplib.POP3('127.0.0.1',{port},timeout=10)\ntry:\n c.user('joe@example.org')\nexcept poplib.error_proto as e:\n print(e)\n sys.exit(0)\nsys.exit(1)\n"
    );
    require_tool("python3");
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3");
    assert!(out.status.success(), "USER accepted in clear: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("[AUTH]"));
    drop(server);

    let server = Server::start_with(Options {
        allow_plaintext_auth: true,
        ..Options::default()
    });
    server.with_user("joe@example.org");
    server.deliver("joe@example.org", &message("clear", 1));
    let ca = server.ca.ca_pem.display().to_string();
    let port = server.pop3.port().to_string();
    let out = json(&python(
        "poplib_session.py",
        &[
            "plain",
            "127.0.0.1",
            &port,
            &ca,
            "joe@example.org",
            PASSWORD,
        ],
    ));
    assert_eq!(out["stat"][0], 1);
}

#[test]
fn poplib_apop_for_opted_in_accounts() {
    let server = Server::start_with(Options {
        apop: true,
        ..Options::default()
    });
    server.add_domain("example.org");
    let out = server.cli(
        &[
            "user",
            "add",
            "apop@example.org",
            "--password-stdin",
            "--apop",
        ],
        b"s3cret\n",
    );
    assert!(out.status.success());
    server.with_user("plain@example.org");
    let ca = server.ca.ca_pem.display().to_string();
    let port = server.pop3s.port().to_string();
    let ok = json(&python(
        "poplib_session.py",
        &[
            "ssl",
            "localhost",
            &port,
            &ca,
            "apop@example.org",
            "s3cret",
            "--apop",
        ],
    ));
    assert!(ok["login"].as_str().is_some_and(|l| l.starts_with("+OK")));
    assert!(ok["welcome"]
        .as_str()
        .is_some_and(|w| w.contains('<') && w.contains("@mail.test>")));
    // An account without an APOP secret cannot use APOP, even with the right password.
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/poplib_session.py");
    let out = Command::new("python3")
        .arg(path)
        .args([
            "ssl",
            "localhost",
            &port,
            &ca,
            "plain@example.org",
            PASSWORD,
            "--apop",
        ])
        .output()
        .expect("python3");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("-ERR [AUTH]"),
        "{out:?}"
    );
}

#[test]
fn scram_sha_256_with_an_independent_client() {
    let server = Server::start();
    server.with_user("joe@example.org");
    server.deliver("joe@example.org", &message("scram", 1));
    let ca = server.ca.ca_pem.display().to_string();
    let port = server.pop3s.port().to_string();
    let ok = python(
        "scram_login.py",
        &["127.0.0.1", &port, &ca, "joe@example.org", PASSWORD],
    );
    assert!(ok.starts_with("OK +OK 1 "), "{ok}");
    let bad = python(
        "scram_login.py",
        &["127.0.0.1", &port, &ca, "joe@example.org", "wrong"],
    );
    assert!(bad.starts_with("FAIL -ERR [AUTH]"), "{bad}");
    let unknown = python(
        "scram_login.py",
        &["127.0.0.1", &port, &ca, "ghost@example.org", PASSWORD],
    );
    assert_eq!(unknown, bad, "unknown user must look like a wrong password");
}

fn curl(args: &[&str]) -> std::process::Output {
    require_tool("curl");
    Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .expect("curl")
}

#[test]
fn curl_pop3s_stls_and_plain() {
    let server = Server::start();
    server.with_user("joe@example.org");
    let m = message("via curl", 3);
    server.deliver("joe@example.org", &m);
    let ca = server.ca.ca_pem.display().to_string();
    let user = format!("joe@example.org:{PASSWORD}");
    let pop3s = format!("pop3s://localhost:{}", server.pop3s.port());
    let pop3 = format!("pop3://localhost:{}", server.pop3.port());
    // curl with the test CA and the account; `extra` before the URL.
    let fetch = |ca: &str, extra: &[&str], url: String| {
        let mut args = vec!["--cacert", ca, "-u", &user];
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args)
    };

    let out = fetch(&ca, &[], format!("{pop3s}/1"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, m, "pop3s RETR differs");

    let out = fetch(&ca, &["--ssl-reqd"], format!("{pop3}/1"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, m, "STLS RETR differs");

    // Listing (LIST) over STLS.
    let out = fetch(&ca, &["--ssl-reqd"], format!("{pop3}/"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("1 {}\r\n", m.len())
    );

    // Without TLS the login is refused: plaintext auth is off.
    let out = curl(&[
        "-u",
        &user,
        &format!("pop3://127.0.0.1:{}/1", server.pop3.port()),
    ]);
    assert!(!out.status.success(), "plaintext login accepted: {out:?}");

    // With a wrong CA the handshake fails: the certificate is really checked.
    let other = crate::common::TestCa::new(&server.dir.path().join("other-ca").tap_mkdir());
    let out = fetch(
        &other.ca_pem.display().to_string(),
        &[],
        format!("{pop3s}/1"),
    );
    assert!(!out.status.success());
}

#[test]
fn curl_plaintext_when_allowed_and_dele() {
    let server = Server::start_with(Options {
        allow_plaintext_auth: true,
        ..Options::default()
    });
    server.with_user("joe@example.org");
    server.deliver("joe@example.org", &message("one", 1));
    let user = format!("joe@example.org:{PASSWORD}");
    let url = format!("pop3://127.0.0.1:{}/1", server.pop3.port());
    let out = curl(&["-u", &user, &url]);
    assert!(out.status.success(), "{out:?}");
    let out = curl(&["-u", &user, "-X", "DELE", "-I", &url]);
    assert!(out.status.success(), "{out:?}");
    let out = curl(&[
        "-u",
        &user,
        &format!("pop3://127.0.0.1:{}/", server.pop3.port()),
    ]);
    assert!(out.status.success());
    assert!(
        out.stdout.trim_ascii().is_empty(),
        "message survived DELE+QUIT: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).expect("mkdir");
        self
    }
}

#[test]
fn fetchmail_over_pop3s_and_stls() {
    require_tool("fetchmail");
    let server = Server::start();
    server.with_user("joe@example.org");
    server.deliver("joe@example.org", &message("fetch one", 3));
    server.deliver(
        "joe@example.org",
        &b"Subject: fetch two\r\n\r\n.dot\r\n"[..],
    );
    let dir = server.dir.path();
    let mbox = dir.join("fetchmail.mbox");
    for (i, (port, flags)) in [
        (server.pop3s.port(), "ssl sslcertck"),
        (server.pop3.port(), "sslproto tls1.2+ sslcertck"),
    ]
    .into_iter()
    .enumerate()
    {
        let rc = dir.join(format!("fetchmailrc{i}"));
        write_private(
            &rc,
            &format!(
                "set no bouncemail\npoll localhost port {port} protocol pop3 uidl\n  user \"joe@example.org\" there with password \"{PASSWORD}\" is root here\n  {flags} sslcertfile \"{ca}\" keep\n  mda \"/bin/sh -c 'cat >> {mbox}'\"\n",
                ca = server.ca.ca_pem.display(),
                mbox = mbox.display(),
            ),
        );
        let out = fetchmail(&rc, dir);
        if i == 0 {
            assert!(out.status.success(), "fetchmail ({flags}): {out:?}");
        } else {
            // Over STLS it logs in, finds both UIDs already fetched (UIDL is stable
            // across sessions and transports) and exits 1: "no new mail".
            assert_eq!(out.status.code(), Some(1), "fetchmail ({flags}): {out:?}");
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("2 messages (2 seen)"),
                "{out:?}"
            );
        }
    }
    let text = std::fs::read_to_string(&mbox).expect("mbox");
    assert_eq!(count_subjects(&text, "fetch one"), 1, "{text}");
    assert_eq!(count_subjects(&text, "fetch two"), 1, "{text}");
    assert!(text.contains("\n.dot"), "dot-stuffing not undone: {text}");
}

#[test]
fn mpop_over_pop3s_deletes_what_it_fetched() {
    require_tool("mpop");
    let server = Server::start();
    server.with_user("joe@example.org");
    server.deliver("joe@example.org", &message("mpop one", 2));
    server.deliver("joe@example.org", &message("mpop two", 2));
    let dir = server.dir.path();
    let mbox = dir.join("mpop.mbox");
    std::fs::write(&mbox, "").expect("mbox");
    let run = |keep: &str| {
        Command::new("mpop")
            .arg("--host=localhost")
            .arg(format!("--port={}", server.pop3s.port()))
            .args([
                "--tls=on",
                "--tls-starttls=off",
                "--auth=plain",
                "--user=joe@example.org",
            ])
            .arg(format!("--passwordeval=echo '{PASSWORD}'"))
            .arg(format!("--tls-trust-file={}", server.ca.ca_pem.display()))
            .arg(format!("--delivery=mbox,{}", mbox.display()))
            .arg(format!("--uidls-file={}", dir.join("mpop-uidls").display()))
            .arg(format!("--keep={keep}"))
            .arg("--only-new=off")
            .env("HOME", dir)
            .output()
            .expect("mpop")
    };
    let out = run("off");
    assert!(out.status.success(), "mpop: {out:?}");
    let text = std::fs::read_to_string(&mbox).expect("mbox");
    assert_eq!(count_subjects(&text, "mpop one"), 1, "{text}");
    assert_eq!(count_subjects(&text, "mpop two"), 1, "{text}");
    // mpop deleted what it fetched: a second run finds nothing.
    let out = run("off");
    assert!(out.status.success(), "mpop: {out:?}");
    let text = std::fs::read_to_string(&mbox).expect("mbox");
    assert_eq!(count_subjects(&text, "mpop one"), 1, "{text}");
}
