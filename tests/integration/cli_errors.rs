//! The CLI's answers to the usual mistakes: each says `mailgate: `, names the offending
//! value once, says what was expected, and exits with its sysexits code; the admin
//! commands answer the same through the admin socket (server running) as directly on
//! the data dir (server stopped).

use crate::common::{cli, message, Server, BIN};
use std::process::{Command, Output};

/// sysexits(3), as the CLI uses them.
const USAGE: i32 = 64;
const DATAERR: i32 = 65;
const NOUSER: i32 = 67;
const CONFIG: i32 = 78;

/// One mistake and what its message must say.
struct Mistake<'a> {
    args: &'a [&'a str],
    stdin: &'a [u8],
    code: i32,
    /// The offending value as the message shows it; it must occur exactly once.
    value: &'a str,
    /// The words that tell the operator what was expected instead.
    expected: &'a str,
}

/// Checks one failed run against `m`; `what` names the case in assertion messages.
fn check(what: &str, out: &Output, m: &Mistake) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(m.code), "{what}: {stderr}");
    assert!(stdout.is_empty(), "{what}: printed {stdout:?}");
    let message = stderr
        .strip_prefix("mailgate: ")
        .unwrap_or_else(|| panic!("{what}: {stderr:?} does not start with `mailgate: `"));
    let message = message
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{what}: {stderr:?} does not end its line"));
    assert_eq!(
        message.matches(m.value).count(),
        1,
        "{what}: {stderr:?} should name {} once",
        m.value
    );
    assert!(
        message.contains(m.expected),
        "{what}: {stderr:?} should say {:?}",
        m.expected
    );
    let clauses: Vec<&str> = message.split(": ").map(str::trim).collect();
    for (i, clause) in clauses.iter().enumerate() {
        assert!(
            !clauses[i + 1..].contains(clause),
            "{what}: {stderr:?} says {clause:?} twice"
        );
    }
}

/// Account and domain mistakes, with the server running and then stopped.
#[test]
fn admin_mistakes_are_named_once_with_and_without_server() {
    let mut server = Server::binary();
    server.with_user("joe@ok.example");
    let mistakes = [
        // Addresses that are not local@domain, for every command that takes one.
        Mistake {
            args: &["user", "add", "notanaddress", "--password-stdin"],
            stdin: b"pw\n",
            code: DATAERR,
            value: "\"notanaddress\"",
            expected: "expected local@domain",
        },
        Mistake {
            args: &["user", "passwd", "notanaddress", "--password-stdin"],
            stdin: b"pw\n",
            code: DATAERR,
            value: "\"notanaddress\"",
            expected: "expected local@domain",
        },
        Mistake {
            args: &["user", "remove", "notanaddress"],
            stdin: b"",
            code: DATAERR,
            value: "\"notanaddress\"",
            expected: "expected local@domain",
        },
        Mistake {
            args: &["user", "quota", "notanaddress", "1M"],
            stdin: b"",
            code: DATAERR,
            value: "\"notanaddress\"",
            expected: "expected local@domain",
        },
        Mistake {
            args: &["user", "add", "a@../etc", "--password-stdin"],
            stdin: b"pw\n",
            code: DATAERR,
            value: "\"a@../etc\"",
            expected: "expected local@domain",
        },
        // Domains.
        Mistake {
            args: &["user", "add", "x@nosuch.example", "--password-stdin"],
            stdin: b"pw\n",
            code: NOUSER,
            value: "nosuch.example",
            expected: "mailgate domain list",
        },
        Mistake {
            args: &["user", "list", "nosuch.example"],
            stdin: b"",
            code: NOUSER,
            value: "nosuch.example",
            expected: "mailgate domain list",
        },
        Mistake {
            args: &["domain", "remove", "nosuch.example"],
            stdin: b"",
            code: NOUSER,
            value: "nosuch.example",
            expected: "mailgate domain list",
        },
        Mistake {
            args: &["domain", "add", "OK.example"],
            stdin: b"",
            code: DATAERR,
            value: "ok.example",
            expected: "already exists",
        },
        Mistake {
            args: &["domain", "add", "../etc"],
            stdin: b"",
            code: DATAERR,
            value: "\"../etc\"",
            expected: "expected",
        },
        Mistake {
            args: &["domain", "add", "a b"],
            stdin: b"",
            code: DATAERR,
            value: "\"a b\"",
            expected: "expected",
        },
        // Accounts that exist, or do not.
        Mistake {
            args: &["user", "add", "joe@ok.example", "--password-stdin"],
            stdin: b"pw\n",
            code: DATAERR,
            value: "joe@ok.example",
            expected: "already exists",
        },
        Mistake {
            args: &["user", "passwd", "ghost@ok.example", "--password-stdin"],
            stdin: b"pw\n",
            code: NOUSER,
            value: "ghost@ok.example",
            expected: "mailgate user list",
        },
        Mistake {
            args: &["user", "remove", "ghost@ok.example"],
            stdin: b"",
            code: NOUSER,
            value: "ghost@ok.example",
            expected: "mailgate user list",
        },
        Mistake {
            args: &["user", "quota", "ghost@ok.example", "1M"],
            stdin: b"",
            code: NOUSER,
            value: "ghost@ok.example",
            expected: "mailgate user list",
        },
        // Passwords.
        Mistake {
            args: &["user", "add", "ann@ok.example", "--password-stdin"],
            stdin: b"",
            code: DATAERR,
            value: "stdin",
            expected: "expected the password on its first line",
        },
        Mistake {
            args: &["user", "add", "ann@ok.example", "--password-stdin"],
            stdin: b"\n",
            code: DATAERR,
            value: "stdin",
            expected: "expected the password on its first line",
        },
        Mistake {
            args: &["user", "add", "ann@ok.example"],
            stdin: b"pw\n",
            code: USAGE,
            value: "--password-stdin",
            expected: "write the password to stdin",
        },
        Mistake {
            args: &["user", "passwd", "joe@ok.example"],
            stdin: b"pw\n",
            code: USAGE,
            value: "--password-stdin",
            expected: "write the password to stdin",
        },
        // Quotas.
        Mistake {
            args: &["user", "quota", "joe@ok.example", "12X"],
            stdin: b"",
            code: USAGE,
            value: "\"12X\"",
            expected: "K, M, G or T",
        },
        Mistake {
            args: &["user", "quota", "joe@ok.example", "abc"],
            stdin: b"",
            code: USAGE,
            value: "\"abc\"",
            expected: "expected octets",
        },
        Mistake {
            args: &["user", "quota", "joe@ok.example", "0"],
            stdin: b"",
            code: USAGE,
            value: "\"0\"",
            expected: "unlimited",
        },
        Mistake {
            args: &["user", "quota", "joe@ok.example", "99999999999T"],
            stdin: b"",
            code: USAGE,
            value: "\"99999999999T\"",
            expected: "at most",
        },
        Mistake {
            args: &["user", "quota", "joe@ok.example", "99999999999999999999"],
            stdin: b"",
            code: USAGE,
            value: "\"99999999999999999999\"",
            expected: "at most",
        },
        // Delivery.
        Mistake {
            args: &["deliver", "ghost@ok.example"],
            stdin: &message("x", 1),
            code: NOUSER,
            value: "ghost@ok.example",
            expected: "no such user",
        },
        Mistake {
            args: &["deliver", "joe@ok.example", "x@nosuch.example"],
            stdin: &message("x", 1),
            code: NOUSER,
            value: "x@nosuch.example",
            expected: "no such user",
        },
        Mistake {
            args: &["deliver", "bad address"],
            stdin: &message("x", 1),
            code: DATAERR,
            value: "\"bad address\"",
            expected: "expected local@domain",
        },
        Mistake {
            args: &["deliver", "--from", "not a sender", "joe@ok.example"],
            stdin: &message("x", 1),
            code: DATAERR,
            value: "\"not a sender\"",
            expected: "expected local@domain",
        },
    ];
    for running in [true, false] {
        if !running {
            assert!(server.stop().success());
        }
        let how = if running { "server" } else { "data dir" };
        for m in &mistakes {
            let out = server.cli(m.args, m.stdin);
            check(&format!("{how}: {}", m.args.join(" ")), &out, m);
        }
    }
    // Nothing was changed by the refused commands.
    let out = server.cli(&["user", "list"], b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "joe@ok.example\n");
}

/// A command line clap refuses names the missing argument and exits 2, as clap does.
#[test]
fn deliver_without_recipients_is_a_usage_error() {
    let server = Server::binary();
    let out = server.cli(&["deliver"], &message("x", 1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // Once in the error, once in the usage line under it.
    assert_eq!(stderr.matches("<RECIPIENTS>").count(), 2, "{stderr}");
    assert!(
        stderr.contains("required arguments were not provided"),
        "{stderr}"
    );
}

/// Configuration mistakes: a missing file, a file that is not TOML, a bad value.
#[test]
fn config_mistakes_are_named_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let absent = dir.path().join("absent.toml");
    let absent_text = absent.display().to_string();
    let out = cli(&absent, &["check-config"], b"");
    check(
        "missing file",
        &out,
        &Mistake {
            args: &[],
            stdin: b"",
            code: CONFIG,
            value: &absent_text,
            expected: "--config",
        },
    );
    let out = cli(&absent, &["domain", "list"], b"");
    check(
        "missing file, domain list",
        &out,
        &Mistake {
            args: &[],
            stdin: b"",
            code: CONFIG,
            value: &absent_text,
            expected: "--config",
        },
    );

    let path = dir.path().join("bad.toml");
    let path_text = path.display().to_string();
    std::fs::write(&path, "[pop3\nlisten = 1\n").expect("write");
    let out = cli(&path, &["check-config"], b"");
    check(
        "not TOML",
        &out,
        &Mistake {
            args: &[],
            stdin: b"",
            code: CONFIG,
            value: &path_text,
            expected: "expected",
        },
    );

    let data = dir.path().join("data");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[limits]\nmax_connections = \"lots\"\n",
            data.display()
        ),
    )
    .expect("write");
    let out = cli(&path, &["check-config"], b"");
    check(
        "bad value",
        &out,
        &Mistake {
            args: &[],
            stdin: b"",
            code: CONFIG,
            value: "\"lots\"",
            expected: "expected",
        },
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .env("MAILGATE_LIMITS__MAX_CONNECTIONS", "many")
        .output()
        .expect("run");
    check(
        "bad value from the environment",
        &out,
        &Mistake {
            args: &[],
            stdin: b"",
            code: CONFIG,
            value: "\"many\"",
            expected: "expected",
        },
    );

    std::fs::write(
        &path,
        format!(
            "data_dir = \"{}\"\n[pop3]\nlisten = \"nowhere\"\n",
            data.display()
        ),
    )
    .expect("write");
    let out = cli(&path, &["check-config"], b"");
    check(
        "bad listen address",
        &out,
        &Mistake {
            args: &[],
            stdin: b"",
            code: CONFIG,
            value: "\"nowhere\"",
            expected: "address:port",
        },
    );
}
