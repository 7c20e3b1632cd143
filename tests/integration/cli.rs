//! The `mailgate` command line, with and without a running server on the same data dir:
//! domains, accounts, delivery exit codes, config errors.

use crate::common::{cli, message, Raw, Server, BIN, PASSWORD};
use std::process::Command;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The admin commands behave the same through the socket (server running) and directly
/// on the data dir (server stopped).
#[test]
fn admin_commands_with_and_without_server() {
    let mut server = Server::binary();
    for running in [true, false] {
        if !running {
            assert!(server.stop().success());
        }
        let domain = if running {
            "one.example"
        } else {
            "two.example"
        };
        let user = format!("joe@{domain}");
        let out = server.cli(&["domain", "add", domain], b"");
        assert!(out.status.success(), "{}", text(&out));
        let out = server.cli(&["domain", "add", &domain.to_uppercase()], b"");
        assert_eq!(
            out.status.code(),
            Some(65),
            "duplicate domain: {}",
            text(&out)
        );
        assert!(text(&out).contains("already exists"));

        let out = server.cli(&["user", "add", &user, "--password-stdin"], b"pw one\n");
        assert!(out.status.success(), "{}", text(&out));
        let out = server.cli(&["user", "add", &user, "--password-stdin"], b"pw two\n");
        assert_eq!(
            out.status.code(),
            Some(65),
            "duplicate account: {}",
            text(&out)
        );
        let out = server.cli(
            &["user", "add", "x@unknown.example", "--password-stdin"],
            b"pw\n",
        );
        assert_eq!(
            out.status.code(),
            Some(67),
            "unknown domain: {}",
            text(&out)
        );
        assert!(text(&out).contains("unknown domain"));
        let out = server.cli(
            &["user", "add", "not-an-address", "--password-stdin"],
            b"pw\n",
        );
        assert!(!out.status.success());
        assert!(text(&out).contains("invalid address"), "{}", text(&out));
        let out = server.cli(&["user", "add", &format!("ann@{domain}")], b"pw\n");
        assert!(!out.status.success());
        assert!(text(&out).contains("--password-stdin"), "{}", text(&out));
        let out = server.cli(
            &["user", "add", &format!("ann@{domain}"), "--password-stdin"],
            b"",
        );
        assert!(!out.status.success(), "empty password accepted");

        let out = server.cli(&["user", "list", domain], b"");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{user}\n"));
        let out = server.cli(
            &["deliver", "--from", "sender@example.net", &user],
            &message("cli", 1),
        );
        assert!(out.status.success(), "{}", text(&out));
        let out = server.cli(&["deliver", &format!("ghost@{domain}")], &message("x", 1));
        assert_eq!(out.status.code(), Some(67), "{}", text(&out));
        // A refused delivery's body may be large; the answer must still arrive.
        let big = vec![b'x'; 4 << 20];
        let out = server.cli(&["deliver", &format!("ghost@{domain}")], &big);
        assert_eq!(out.status.code(), Some(67), "{}", text(&out));
        let out = server.cli(&["deliver", "ghost@nowhere.example"], &message("x", 1));
        assert_eq!(out.status.code(), Some(67), "{}", text(&out));
        let out = server.cli(&["deliver", "bad address"], &message("x", 1));
        assert_eq!(out.status.code(), Some(65), "{}", text(&out));
        // One unknown recipient refuses the whole delivery, so a retry never duplicates.
        let out = server.cli(
            &["deliver", &user, &format!("ghost@{domain}")],
            &message("x", 1),
        );
        assert_eq!(out.status.code(), Some(67));

        let out = server.cli(
            &["user", "passwd", &user, "--password-stdin"],
            format!("{PASSWORD}\n").as_bytes(),
        );
        assert!(out.status.success(), "{}", text(&out));
        let out = server.cli(
            &[
                "user",
                "passwd",
                &format!("ghost@{domain}"),
                "--password-stdin",
            ],
            b"x\n",
        );
        assert_eq!(out.status.code(), Some(67));
        let out = server.cli(&["domain", "list"], b"");
        assert!(String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == domain));
    }
    server.spawn();
    // Both domains' accounts and mail survived, whichever way they were made.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        for domain in ["one.example", "two.example"] {
            let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
            c.line().await;
            let r = c.login(&format!("joe@{domain}"), PASSWORD).await;
            assert!(r.starts_with("+OK"), "{domain}: {r}");
            assert!(c.cmd("STAT").await.starts_with("+OK 1 "));
            assert!(c.cmd("RETR 1").await.starts_with("+OK"));
            let m = c.multiline().await;
            assert!(
                m.starts_with(b"Return-Path: <sender@example.net>\r\n"),
                "{}",
                String::from_utf8_lossy(&m)
            );
            c.cmd("QUIT").await;
        }
    });
    let out = server.cli(&["user", "remove", "joe@one.example"], b"");
    assert!(out.status.success());
    let out = server.cli(&["user", "remove", "joe@one.example"], b"");
    assert_eq!(out.status.code(), Some(67));
    let out = server.cli(&["domain", "remove", "two.example"], b"");
    assert!(out.status.success(), "{}", text(&out));
    let out = server.cli(&["domain", "list"], b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one.example\n");
}

#[test]
fn config_errors_name_the_key_and_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[pop3]\nlisten = \"127.0.0.1:0\"\nbogus_key = 1\n").expect("write");
    let out = cli(&path, &["check-config"], b"");
    assert!(!out.status.success());
    assert!(text(&out).contains("bogus_key"), "{}", text(&out));

    let out = Command::new(BIN)
        .args(["check-config", "--config", "/nonexistent/mailgate.toml"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(text(&out).contains("does not exist"));

    std::fs::write(
        &path,
        format!("data_dir = \"{}\"\n", dir.path().join("d").display()),
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env("MAILGATE_LIMITS__MAX_CONNECTIONS", "lots")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        text(&out).to_lowercase().contains("max_connections"),
        "{}",
        text(&out)
    );

    let out = cli(&path, &["check-config"], b"");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("configuration OK"));

    std::fs::write(
        &path,
        "[tls]\ncert = \"/nonexistent.crt\"\nkey = \"/nonexistent.key\"\n",
    )
    .expect("write");
    let out = cli(&path, &["check-config"], b"");
    assert!(!out.status.success());
    assert!(text(&out).contains("/nonexistent.crt"), "{}", text(&out));

    // A unix LMTP socket for a group that does not exist is caught before start.
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[lmtp]\nlisten = \"unix:{}\"\nsocket_group = \"no-such-group-here\"\n",
            dir.path().join("d").display(),
            dir.path().join("lmtp.sock").display()
        ),
    )
    .expect("write");
    let out = cli(&path, &["check-config"], b"");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("lmtp.socket_group: no group named \"no-such-group-here\""),
        "{}",
        text(&out)
    );
}

#[test]
fn serve_refuses_a_second_server_on_the_same_data_dir() {
    let server = Server::binary();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&server.config)
        .env("MAILGATE_POP3__LISTEN", "127.0.0.1:0")
        .env("MAILGATE_POP3__TLS_LISTEN", "127.0.0.1:0")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(text(&out).contains("already serving"), "{}", text(&out));
}

#[test]
fn admin_socket_answers_garbage_with_usage_errors() {
    use std::io::{Read, Write};
    let server = Server::binary();
    let socket = server.dir.path().join("data/admin.sock");
    let ask = |request: &[u8]| -> serde_json::Value {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .expect("timeout");
        let _ = s.write_all(request);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer");
        serde_json::from_str(answer.trim()).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    };
    let cases: [&[u8]; 4] = [
        b"not json\n",
        b"{\"op\":\"format_disk\"}\n",
        b"\x00\xff\xfe\n",
        b"",
    ];
    for case in cases {
        let r = ask(case);
        assert_eq!(r["ok"], false, "{case:?}: {r}");
        assert_eq!(r["exit_code"], 64, "{case:?}: {r}");
    }
    // A request line longer than the limit is refused without being buffered whole.
    let r = ask(&vec![b'{'; 1 << 20]);
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().is_some_and(|e| e.contains("too long")),
        "{r}"
    );
    // The server is still healthy.
    let out = server.cli(&["domain", "list"], b"");
    assert!(out.status.success());
}

/// `MAILGATE_CONFIG` names the file when `--config` is absent (the container image sets
/// it, so `kubectl exec ... -- mailgate ...` needs no flag); `--config` still wins.
#[test]
fn config_file_from_the_environment() {
    let server = Server::binary();
    let run = |args: &[&str], config: &std::path::Path| {
        Command::new(BIN)
            .args(args)
            .env("MAILGATE_CONFIG", config)
            .output()
            .expect("mailgate")
    };
    let out = run(&["domain", "add", "env.example"], &server.config);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&["domain", "list"], &server.config);
    assert!(text(&out).contains("env.example"), "{}", text(&out));
    let absent = server.dir.path().join("absent.toml");
    let out = run(&["check-config"], &absent);
    assert!(!out.status.success());
    assert!(text(&out).contains("absent.toml"), "{}", text(&out));
    let out = run(
        &[
            "--config",
            &server.config.display().to_string(),
            "domain",
            "list",
        ],
        &absent,
    );
    assert!(out.status.success(), "{}", text(&out));
}
