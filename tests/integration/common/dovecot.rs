//! A private Dovecot 2.3 started by `tests/dovecot/dovecot.sh` (its own config, base_dir
//! and loopback ports, certificate from the test CA), with an LMTP client to fill it.
//! Stopped on `Drop`, by the master pid Dovecot recorded.

use super::{free_port, require_tool, TestCa};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Dovecot {
    pub dir: tempfile::TempDir,
    pub pop3: SocketAddr,
    pub pop3s: SocketAddr,
    pub lmtp: SocketAddr,
    /// The passwd-file, the one the import reads too.
    pub passwd: PathBuf,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dovecot/dovecot.sh")
}

/// The Debian packages' binaries the instance needs; a failure (never a skip) when one
/// is missing.
pub fn require_dovecot() {
    for tool in [
        "dovecot",
        "doveadm",
        "/usr/lib/dovecot/pop3",
        "/usr/lib/dovecot/lmtp",
    ] {
        require_tool(tool);
    }
}

/// `doveadm pw -s SCHEME -p PASSWORD`: the passwd-file field, `{SCHEME}...`.
pub fn hash(scheme: &str, password: &str) -> String {
    let out = Command::new("doveadm")
        .args(["pw", "-s", scheme, "-p", password])
        .output()
        .expect("doveadm pw");
    assert!(out.status.success(), "doveadm pw -s {scheme}: {out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// The uid and gid Dovecot stores mail as (the package's unprivileged user).
fn mail_owner() -> (u32, u32) {
    let user = nix::unistd::User::from_name("dovenull")
        .expect("getpwnam")
        .expect("the dovecot-core package makes the user dovenull");
    (user.uid.as_raw(), user.gid.as_raw())
}

impl Dovecot {
    /// Starts Dovecot with these accounts (full address, passwd-file password field);
    /// each gets a home under the instance's directory and mail in `~/Maildir`.
    pub fn start(ca: &TestCa, accounts: &[(&str, String)]) -> Dovecot {
        require_dovecot();
        let dir = tempfile::tempdir().expect("tempdir");
        // Dovecot's processes run as other users and must reach the homes.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let (cert, key) = ca.issue("dovecot", &["localhost", "127.0.0.1"]);
        std::fs::copy(cert, dir.path().join("server.crt")).expect("cert");
        std::fs::copy(key, dir.path().join("server.key")).expect("key");
        let (uid, gid) = mail_owner();
        let mut passwd = String::new();
        for (user, field) in accounts {
            let home = Dovecot::home_in(dir.path(), user);
            std::fs::create_dir_all(&home).expect("home");
            nix::unistd::chown(
                &home,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .expect("chown home");
            passwd.push_str(&format!(
                "{user}:{field}:{uid}:{gid}::{}::\n",
                home.display()
            ));
        }
        let passwd_path = dir.path().join("passwd");
        std::fs::write(&passwd_path, passwd).expect("passwd");
        for _ in 0..3 {
            let (pop3, pop3s, lmtp) = (free_port(), free_port(), free_port());
            let out = Command::new(script())
                .arg("start")
                .arg(dir.path())
                .args([pop3, pop3s, lmtp].map(|p| p.to_string()))
                .output()
                .expect("dovecot.sh");
            if out.status.success() {
                let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
                return Dovecot {
                    pop3: at(pop3),
                    pop3s: at(pop3s),
                    lmtp: at(lmtp),
                    passwd: passwd_path,
                    dir,
                };
            }
            // A port taken between free_port and Dovecot's bind: stop what started, retry.
            let _ = Command::new(script()).arg("stop").arg(dir.path()).status();
            eprintln!("dovecot start failed, retrying: {out:?}");
        }
        panic!("dovecot did not start on free ports");
    }

    fn home_in(dir: &Path, user: &str) -> PathBuf {
        dir.join("mail")
            .join(user.split('@').next().expect("local part"))
    }

    /// Delivers `message` (sent as it is, dot-stuffed) to `rcpt` over LMTP.
    pub fn deliver(&self, rcpt: &str, message: &[u8]) {
        let stream = TcpStream::connect(self.lmtp).expect("lmtp connect");
        stream
            .set_read_timeout(Some(super::TIMEOUT))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut writer = stream;
        let mut reply = |expect: &str| loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("lmtp reply");
            assert!(
                line.starts_with(expect),
                "LMTP: expected {expect}, got {line:?}"
            );
            if line.as_bytes().get(3) != Some(&b'-') {
                return;
            }
        };
        reply("220");
        for (cmd, expect) in [
            ("LHLO test.local".to_owned(), "250"),
            ("MAIL FROM:<sender@example.net>".to_owned(), "250"),
            (format!("RCPT TO:<{rcpt}>"), "250"),
            ("DATA".to_owned(), "354"),
        ] {
            writer
                .write_all(format!("{cmd}\r\n").as_bytes())
                .expect("lmtp write");
            reply(expect);
        }
        let mut data = Vec::with_capacity(message.len() + 64);
        let mut at_start = true;
        for &b in message {
            if at_start && b == b'.' {
                data.push(b'.');
            }
            data.push(b);
            at_start = b == b'\n';
        }
        // The terminating dot must follow a CRLF (a message ending in a bare LF gets
        // an empty last line, the same for Dovecot and, through its Maildir, mailgate).
        if !data.ends_with(b"\r\n") {
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b".\r\nQUIT\r\n");
        writer.write_all(&data).expect("lmtp data");
        reply("250");
        reply("221");
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}
