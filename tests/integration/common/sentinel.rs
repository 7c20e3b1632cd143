//! A Redis Sentinel set for the tests: a master and one replica (`redis-server
//! --replicaof`), and three sentinels (`redis-server CONF --sentinel`, each with a
//! writable config file of its own, since a sentinel rewrites it) watching them under
//! [`MASTER_NAME`] with a short `down-after-milliseconds`, so a killed master is replaced
//! within seconds. Every process on a free 127.0.0.1 port, stopped by pid on `Drop`.

use super::redis_server::{command_at, RedisOptions, RedisServer, Resp};
use super::{free_port, require_tool};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The name the sentinels know the master by.
pub const MASTER_NAME: &str = "mymaster";
/// How long a master may be silent before a sentinel thinks it down.
const DOWN_AFTER_MS: u64 = 1000;
/// How soon a failed failover is tried again (by another sentinel).
const FAILOVER_TIMEOUT_MS: u64 = 3000;

pub struct Sentinel {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Sentinel {
    /// A sentinel watching the master on `master_port` (quorum 2), with its password.
    fn start(master_port: u16, password: Option<&str>) -> Sentinel {
        for _ in 0..5 {
            let mut s = Sentinel {
                port: free_port(),
                dir: tempfile::tempdir().expect("sentinel dir"),
                child: None,
            };
            if s.spawn(master_port, password) {
                return s;
            }
        }
        panic!("redis sentinel did not start on any of 5 ports");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sentinel.log")
    }

    fn spawn(&mut self, master_port: u16, password: Option<&str>) -> bool {
        let conf = self.dir.path().join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndaemonize no\ndir \"{dir}\"\nlogfile \"{log}\"\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
             sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n",
            port = self.port,
            dir = self.dir.path().display(),
            log = self.log_path().display(),
        );
        let auth = password
            .map(|pw| format!("sentinel auth-pass {MASTER_NAME} {pw}\n"))
            .unwrap_or_default();
        std::fs::write(&conf, text + &auth).expect("sentinel.conf");
        let mut child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server --sentinel");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            if text.contains("+monitor master") {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().expect("wait sentinel").is_some() {
                return false;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis sentinel not ready after 10 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `SENTINEL <args> mymaster` as a list of replies.
    fn ask(&self, what: &str) -> Vec<Resp> {
        match command_at(self.port, &["SENTINEL", what, MASTER_NAME]) {
            Some(Resp::Array(items)) => items,
            _ => Vec::new(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct SentinelSet {
    /// The first master; `stop` kills it with SIGKILL.
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Sentinel>,
}

impl SentinelSet {
    /// Master, replica and three sentinels, returned once every sentinel knows the
    /// replica and the two other sentinels (only then can they agree on a failover).
    pub fn start() -> SentinelSet {
        Self::start_with(None)
    }

    /// The same, with `password` as `requirepass` on master and replica (the sentinels
    /// themselves ask for none).
    pub fn start_with(password: Option<&str>) -> SentinelSet {
        require_tool("redis-server");
        let opts = RedisOptions {
            requirepass: password.map(str::to_owned),
            ..RedisOptions::default()
        };
        let master = RedisServer::start_with(opts.clone());
        let replica = RedisServer::start_with(RedisOptions {
            replicaof: Some(master.port),
            ..opts
        });
        let sentinels: Vec<Sentinel> = (0..3)
            .map(|_| Sentinel::start(master.port, password))
            .collect();
        let set = SentinelSet {
            master,
            replica,
            sentinels,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !set
            .sentinels
            .iter()
            .all(|s| s.ask("REPLICAS").len() == 1 && s.ask("SENTINELS").len() == 2)
        {
            assert!(
                Instant::now() < deadline,
                "sentinels did not find each other and the replica in 30 s:\n{}",
                set.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        set
    }

    /// `host:port` of every sentinel, as `locks.redis_sentinels` lists them.
    pub fn addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    /// The master's port as the first sentinel that answers names it.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|s| {
            match command_at(
                s.port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
            ) {
                Some(Resp::Array(items)) => match items.get(1) {
                    Some(Resp::Bulk(Some(port))) => port.parse().ok(),
                    _ => None,
                },
                _ => None,
            }
        })
    }

    /// Every sentinel's log, for failure messages.
    pub fn logs(&self) -> String {
        self.sentinels
            .iter()
            .enumerate()
            .map(|(i, s)| format!("--- sentinel {i} ---\n{}\n", s.log_text()))
            .collect()
    }
}
