//! A real `redis-server` for the tests: its own process on a free 127.0.0.1 port, no
//! persistence, a temporary dir, stopped by pid on `Drop`; optionally with a password, an
//! ACL user or TLS. Also a minimal RESP client for poking at keys.

use super::{free_port, require_tool};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Default, Clone)]
pub struct RedisOptions {
    /// `requirepass`: the default user's password.
    pub requirepass: Option<String>,
    /// An ACL user limited to `mailgate:*` keys; the default user is switched off.
    pub acl_user: Option<(String, String)>,
    /// TLS only (no plaintext port): certificate, key and the CA that issued them.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// `replicaof 127.0.0.1 PORT`: a replica of the redis-server on that port (with
    /// `requirepass` as `masterauth`).
    pub replicaof: Option<u16>,
}

pub struct RedisServer {
    pub port: u16,
    pub opts: RedisOptions,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// A RESP reply, as far as the tests need one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Vec<Resp>),
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(RedisOptions::default())
    }

    pub fn start_with(opts: RedisOptions) -> RedisServer {
        require_tool("redis-server");
        // A port found free can be taken before redis binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                port,
                opts: opts.clone(),
                dir: tempfile::tempdir().expect("redis dir"),
                child: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start on any of 5 ports");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Starts redis-server on `self.port`; false when it exits before it is ready.
    fn spawn(&mut self) -> bool {
        let log = self.log_path();
        let _ = std::fs::remove_file(&log);
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(["--daemonize", "no"]);
        match &self.opts.tls {
            Some((cert, key, ca)) => {
                cmd.args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca);
            }
            None => {
                cmd.args(["--port", &port]);
            }
        }
        if let Some(pw) = &self.opts.requirepass {
            cmd.args(["--requirepass", pw]);
        }
        if let Some(master) = self.opts.replicaof {
            cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
            if let Some(pw) = &self.opts.requirepass {
                cmd.args(["--masterauth", pw]);
            }
        }
        if let Some((user, pw)) = &self.opts.acl_user {
            cmd.args(["--user", "default", "off"]);
            cmd.args([
                "--user",
                user,
                "on",
                &format!(">{pw}"),
                "~mailgate:*",
                "+@all",
            ]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Ready to accept connections") {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().expect("wait redis").is_some() {
                return false;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server not ready after 10 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `redis://` or `rediss://` with the configured credentials, database 0.
    pub fn url(&self) -> String {
        let scheme = if self.opts.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = match (&self.opts.acl_user, &self.opts.requirepass) {
            (Some((user, pw)), _) => format!("{user}:{pw}@"),
            (None, Some(pw)) => format!(":{pw}@"),
            (None, None) => String::new(),
        };
        format!("{scheme}://{auth}127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis running").id()
    }

    /// Kills redis-server at once (no persistence, so every key is gone).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGSTOP / SIGCONT: a Redis that accepts connections but answers nothing.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// One command over a plain connection (after AUTH when configured).
    pub fn cmd(&self, args: &[&str]) -> Resp {
        assert!(
            self.opts.tls.is_none(),
            "raw commands need the plaintext port"
        );
        let stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect redis");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut writer = stream;
        let auth: Option<Vec<&str>> = match (&self.opts.acl_user, &self.opts.requirepass) {
            (Some((user, pw)), _) => Some(vec!["AUTH", user, pw]),
            (None, Some(pw)) => Some(vec!["AUTH", pw]),
            (None, None) => None,
        };
        if let Some(auth) = auth {
            send(&mut writer, &auth);
            assert_eq!(read(&mut reader), Resp::Simple("OK".into()));
        }
        send(&mut writer, args);
        read(&mut reader)
    }

    /// The value of a key, if any.
    pub fn get(&self, key: &str) -> Option<String> {
        match self.cmd(&["GET", key]) {
            Resp::Bulk(v) => v,
            other => panic!("GET {key}: {other:?}"),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A frozen process still dies on SIGKILL.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One command to any Redis (or Sentinel) on a 127.0.0.1 port, without AUTH; `None`
/// when nothing answers.
pub fn command_at(port: u16, args: &[&str]) -> Option<Resp> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut writer = stream;
    send(&mut writer, args);
    Some(read(&mut reader))
}

fn send(w: &mut TcpStream, args: &[&str]) {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    w.write_all(&out).expect("write redis");
}

fn read(r: &mut BufReader<TcpStream>) -> Resp {
    let mut line = String::new();
    r.read_line(&mut line).expect("read redis");
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(1);
    match kind {
        "+" => Resp::Simple(rest.into()),
        "-" => Resp::Error(rest.into()),
        ":" => Resp::Int(rest.parse().expect("int")),
        "$" => {
            let n: i64 = rest.parse().expect("len");
            if n < 0 {
                return Resp::Bulk(None);
            }
            let mut buf = vec![0u8; n as usize + 2];
            r.read_exact(&mut buf).expect("bulk");
            buf.truncate(n as usize);
            Resp::Bulk(Some(String::from_utf8_lossy(&buf).into_owned()))
        }
        "*" => {
            let n: i64 = rest.parse().expect("len");
            Resp::Array((0..n.max(0)).map(|_| read(r)).collect())
        }
        _ => panic!("unexpected RESP line {line:?}"),
    }
}
