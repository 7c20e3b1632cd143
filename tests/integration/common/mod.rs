//! Test harness: a real mailgate server on `127.0.0.1:0` with a temporary data dir and
//! certificates from a test CA, stopped on `Drop`. By default it runs in this process
//! (`mailgate::app::start` on a runtime of its own, addresses from the start-up API, its
//! log captured by thread); `Options::process` runs the `mailgate serve` binary instead,
//! for tests of signals, `kill -9` and the process's memory. Helpers for the CLI, a raw
//! POP3 client (cleartext, STLS, implicit TLS) and external clients.

pub mod cluster;
pub mod dovecot;
pub mod postfix;
pub mod redis_server;
pub mod sentinel;
pub mod swaks;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_mailgate");
pub const PASSWORD: &str = "correct horse battery";

/// A test CA with leaf certificates, written as PEM files.
pub struct TestCa {
    pub dir: PathBuf,
    pub ca_pem: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new(dir: &Path) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mailgate test CA");
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let ca = params.self_signed(&ca_key).expect("ca cert");
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).expect("write ca");
        TestCa {
            dir: dir.to_path_buf(),
            ca_pem,
            ca,
            ca_key,
        }
    }

    /// Issues a leaf for `names` (DNS names or IP literals); returns (cert, key) paths.
    pub fn issue(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        self.issue_for(stem, names, Vec::new())
    }

    /// `issue`, with the extended key usages `usages` (none: any use).
    fn issue_for(
        &self,
        stem: &str,
        names: &[&str],
        usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
    ) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).expect("leaf params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].clone());
        params.extended_key_usages = usages;
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("leaf cert");
        let cert_path = self.dir.join(format!("{stem}.crt"));
        let key_path = self.dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }
}

/// Knobs a test can turn; everything else uses test-friendly defaults.
#[derive(Clone)]
pub struct Options {
    pub allow_plaintext_auth: bool,
    pub apop: bool,
    pub idle_timeout_secs: u64,
    pub max_connections_per_ip: usize,
    pub max_bad_commands: u32,
    pub replace_nul: bool,
    /// `pop3.last`: LAST from persistent seen marks.
    pub last: bool,
    pub shutdown_grace_secs: u64,
    pub max_auth_failures_per_ip: u32,
    pub max_auth_failures_per_account: u32,
    /// `limits.auth_failure_delay_ms`.
    pub auth_failure_delay_ms: u64,
    /// `auth.argon2.memory_kib` (the other costs stay at their cheapest).
    pub argon2_memory_kib: u32,
    /// `limits.login_timeout_secs`, when not the server's default.
    pub login_timeout_secs: Option<u64>,
    /// Host part of both listen addresses (`[::1]` for IPv6).
    pub listen_host: String,
    /// `lmtp.listen`: empty is off; `None` means `{listen_host}:0`.
    pub lmtp_listen: Option<String>,
    /// `smtp.listen`, likewise.
    pub smtp_listen: Option<String>,
    /// `lmtp.socket_group`: who may connect to a unix LMTP socket.
    pub lmtp_socket_group: String,
    /// Extra TOML appended verbatim.
    pub extra: String,
    /// `data_dir`; `None` is `data` in the server's temporary directory.
    pub data_dir: Option<PathBuf>,
    /// Extra keys of the `[pop3]`, `[lmtp]`, `[smtp]` and `[limits]` tables the
    /// template writes (TOML cannot reopen a table, so `extra` cannot add to them).
    pub pop3_extra: String,
    pub lmtp_extra: String,
    pub smtp_extra: String,
    pub limits_extra: String,
    /// Run the `mailgate serve` binary (for signals, `kill -9`, the process's RSS)
    /// instead of a server in this process.
    pub process: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            allow_plaintext_auth: false,
            apop: false,
            idle_timeout_secs: 600,
            max_connections_per_ip: 100,
            max_bad_commands: 10,
            replace_nul: false,
            last: false,
            shutdown_grace_secs: 5,
            listen_host: "127.0.0.1".into(),
            max_auth_failures_per_ip: 1000,
            max_auth_failures_per_account: 1000,
            auth_failure_delay_ms: 50,
            argon2_memory_kib: 1024,
            login_timeout_secs: None,
            lmtp_listen: None,
            smtp_listen: None,
            lmtp_socket_group: String::new(),
            extra: String::new(),
            data_dir: None,
            pop3_extra: String::new(),
            lmtp_extra: String::new(),
            smtp_extra: String::new(),
            limits_extra: String::new(),
            process: false,
        }
    }
}

pub struct Server {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub ca: TestCa,
    pub pop3: SocketAddr,
    pub pop3s: SocketAddr,
    /// LMTP on TCP, when configured so.
    pub lmtp: Option<SocketAddr>,
    /// Inbound SMTP, when configured.
    pub smtp: Option<SocketAddr>,
    /// Listener names the binary must report before `spawn` returns.
    expected: Vec<&'static str>,
    /// The `/metrics`, `/healthz`, `/readyz` endpoint.
    pub metrics: SocketAddr,
    /// The binary, when `Options::process`.
    process: bool,
    child: Option<Child>,
    /// The thread copying the binary's stderr into `log`; joined when it exits, so a
    /// stopped server's log is complete.
    reader: Option<std::thread::JoinHandle<()>>,
    in_process: Option<InProcess>,
    pub log: Log,
}

/// A server running in this process, on a runtime of its own whose threads are named
/// after it, so its log lines can be told from other servers'.
struct InProcess {
    runtime: tokio::runtime::Runtime,
    running: mailgate::app::Running,
}

/// A server's log lines.
type Log = Arc<Mutex<Vec<String>>>;
/// The log buffer of each in-process server, by the number in its threads' names.
static LOGS: Mutex<Vec<(u64, Log)>> = Mutex::new(Vec::new());
static NEXT_SERVER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
const THREAD_PREFIX: &str = "mailgate-test-";

/// Routes each formatted log line to the buffer of the server whose thread wrote it.
struct RoutedLog;

struct LineWriter(Vec<u8>);

impl std::io::Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let thread = std::thread::current();
        let Some(id) = thread
            .name()
            .and_then(|n| n.strip_prefix(THREAD_PREFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return;
        };
        let log = LOGS
            .lock()
            .expect("logs")
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, l)| l.clone());
        if let Some(log) = log {
            let text = String::from_utf8_lossy(&self.0);
            let mut log = log.lock().expect("log");
            log.extend(text.lines().map(str::to_owned));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RoutedLog {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter(Vec::new())
    }
}

/// The log format of `mailgate serve` at `info`, into the servers' buffers.
fn capture_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(RoutedLog)
            .try_init();
    });
}

/// Python and curl must exist; in CI a missing tool is a failure, never a skip.
pub fn require_tool(name: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success());
    assert!(
        matches!(found, Ok(true)),
        "{name} is required for the integration tests (the README test command installs it)"
    );
}

/// A 127.0.0.1 port that was free a moment ago; a helper that binds it must retry with
/// another when it is taken in between.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(Options::default())
    }

    /// The `mailgate serve` binary with the default options, for tests of the CLI and
    /// the process itself.
    pub fn binary() -> Server {
        Self::start_with(Options {
            process: true,
            ..Options::default()
        })
    }

    pub fn start_with(opts: Options) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new(dir.path());
        let (cert, key) = ca.issue("default", &["localhost", "127.0.0.1"]);
        let (org_cert, org_key) = ca.issue("example-org", &["example.org", "mail.example.org"]);
        let config = dir.path().join("mailgate.toml");
        let port0 = format!("{}:0", opts.listen_host);
        let lmtp_listen = opts.lmtp_listen.clone().unwrap_or_else(|| port0.clone());
        let smtp_listen = opts.smtp_listen.clone().unwrap_or(port0);
        let toml = format!(
            r#"
data_dir = "{data}"
hostname = "mail.test"

[pop3]
listen = "{host}:0"
tls_listen = "{host}:0"
allow_plaintext_auth = {plain}
apop = {apop}
replace_nul = {nul}
last = {last}
{pop3_extra}

[lmtp]
listen = "{lmtp}"
socket_group = "{lmtp_group}"
{lmtp_extra}

[smtp]
listen = "{smtp}"
{smtp_extra}

[metrics]
listen = "{host}:0"

[tls]
reload_interval_secs = 1
cert = "{cert}"
key = "{key}"
[tls.domains."example.org"]
cert = "{org_cert}"
key = "{org_key}"

[limits]
idle_timeout_secs = {idle}
auth_failure_delay_ms = {failure_delay}
max_auth_failures = 3
max_auth_failures_per_ip = {per_ip_failures}
max_auth_failures_per_account = {per_account_failures}
max_connections_per_ip = {per_ip}
max_bad_commands = {bad}
shutdown_grace_secs = {grace}
tls_handshake_timeout_secs = 5
{limits_extra}
{login_timeout}
[auth.argon2]
memory_kib = {argon2_memory}
iterations = 1
parallelism = 1
scram_iterations = 4096
{extra}
"#,
            data = opts
                .data_dir
                .clone()
                .unwrap_or_else(|| dir.path().join("data"))
                .display(),
            host = opts.listen_host,
            lmtp = lmtp_listen,
            lmtp_group = opts.lmtp_socket_group,
            smtp = smtp_listen,
            per_ip_failures = opts.max_auth_failures_per_ip,
            per_account_failures = opts.max_auth_failures_per_account,
            failure_delay = opts.auth_failure_delay_ms,
            argon2_memory = opts.argon2_memory_kib,
            plain = opts.allow_plaintext_auth,
            apop = opts.apop,
            nul = opts.replace_nul,
            last = opts.last,
            cert = cert.display(),
            key = key.display(),
            org_cert = org_cert.display(),
            org_key = org_key.display(),
            idle = opts.idle_timeout_secs,
            per_ip = opts.max_connections_per_ip,
            bad = opts.max_bad_commands,
            grace = opts.shutdown_grace_secs,
            login_timeout = opts
                .login_timeout_secs
                .map(|secs| format!("login_timeout_secs = {secs}\n"))
                .unwrap_or_default(),
            extra = opts.extra,
            pop3_extra = opts.pop3_extra,
            lmtp_extra = opts.lmtp_extra,
            smtp_extra = opts.smtp_extra,
            limits_extra = opts.limits_extra,
        );
        std::fs::write(&config, toml).expect("write config");
        let mut expected = vec!["pop3", "pop3s", "metrics"];
        if !lmtp_listen.is_empty() {
            expected.push("lmtp");
        }
        if !smtp_listen.is_empty() {
            expected.push("smtp");
        }
        let mut server = Server {
            dir,
            config,
            ca,
            pop3: "0.0.0.0:0".parse().expect("addr"),
            pop3s: "0.0.0.0:0".parse().expect("addr"),
            lmtp: None,
            smtp: None,
            expected,
            metrics: "0.0.0.0:0".parse().expect("addr"),
            process: opts.process,
            child: None,
            reader: None,
            in_process: None,
            log: Arc::default(),
        };
        server.spawn();
        server
    }

    /// Starts (or restarts) the server and waits for its listeners.
    pub fn spawn(&mut self) {
        if self.process {
            self.spawn_process();
        } else {
            self.start_in_process();
        }
    }

    fn start_in_process(&mut self) {
        capture_logs();
        let id = NEXT_SERVER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LOGS.lock().expect("logs").push((id, self.log.clone()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("{THREAD_PREFIX}{id}"))
            .enable_all()
            .build()
            .expect("runtime");
        let config = mailgate::config::Config::load(Some(&self.config)).expect("config");
        // Started on the server's own threads (so start-up is logged as its own), and
        // waited for without `block_on`, which async tests may not call.
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let _ = tx.send(mailgate::app::start(Arc::new(config)).await);
        });
        let running = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(running)) => running,
            Ok(Err(e)) => panic!("server did not start: {e}\nlog:\n{}", self.log_text()),
            Err(_) => panic!("server did not start in time; log:\n{}", self.log_text()),
        };
        use mailgate::config::Listener;
        self.pop3 = running.addr(Listener::Pop3).expect("pop3");
        self.pop3s = running.addr(Listener::Pop3s).expect("pop3s");
        self.lmtp = running.addr(Listener::Lmtp);
        self.smtp = running.addr(Listener::Smtp);
        self.metrics = running.metrics.expect("metrics");
        self.in_process = Some(InProcess { runtime, running });
    }

    /// Starts the `mailgate serve` binary and reads its listeners from its log.
    fn spawn_process(&mut self) {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .env("MAILGATE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mailgate");
        let stderr = child.stderr.take().expect("stderr");
        let log = self.log.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let plain = strip_ansi(&line);
                if let Some(rest) = plain.split("listening listener=").nth(1) {
                    let mut parts = rest.split_whitespace();
                    let name = parts.next().unwrap_or("").to_string();
                    let addr = parts
                        .next()
                        .and_then(|a| a.strip_prefix("addr="))
                        .unwrap_or("")
                        .to_string();
                    let _ = tx.send((name, addr));
                }
                log.lock().expect("log").push(plain);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen: std::collections::HashMap<String, String> = Default::default();
        while !self.expected.iter().all(|name| seen.contains_key(*name)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((name, addr)) => {
                    seen.insert(name.trim_matches('"').to_string(), addr);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "server did not start; log:\n{}",
                        self.log.lock().expect("log").join("\n")
                    );
                }
            }
        }
        let tcp = |name: &str| seen.get(name).and_then(|a| a.parse::<SocketAddr>().ok());
        self.pop3 = tcp("pop3").expect("pop3");
        self.pop3s = tcp("pop3s").expect("pop3s");
        self.metrics = tcp("metrics").expect("metrics");
        self.lmtp = tcp("lmtp");
        self.smtp = tcp("smtp");
        self.child = Some(child);
        self.reader = Some(reader);
    }

    /// Sends SIGTERM (in process: the same shutdown) and waits for the server to stop;
    /// returns the exit status (in process: 0 when it stopped cleanly).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        use std::os::unix::process::ExitStatusExt;
        if let Some(InProcess { runtime, running }) = self.in_process.take() {
            running.shutdown();
            let (tx, rx) = std::sync::mpsc::channel();
            runtime.spawn(async move {
                let _ = tx.send(running.wait().await);
            });
            let result = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("server did not stop after shutdown");
            runtime.shutdown_background();
            return match result {
                Ok(()) => std::process::ExitStatus::from_raw(0),
                Err(e) => {
                    eprintln!("server stopped with an error: {e}");
                    std::process::ExitStatus::from_raw(1 << 8)
                }
            };
        }
        let mut child = self.child.take().expect("server running");
        signal(&child, "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.join_reader();
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The binary's pid (`Options::process` only).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("a running process: start the server with Options::process")
            .id()
    }

    /// SIGKILL, like a crashed node: no shutdown, no lock release (`Options::process`).
    pub fn kill9(&mut self) {
        let mut child = self
            .child
            .take()
            .expect("a running process: start the server with Options::process");
        child.kill().expect("kill -9");
        child.wait().expect("wait");
        self.join_reader();
    }

    /// Waits (at most 5 s) for the stderr reader of an exited binary to reach the end.
    fn join_reader(&mut self) {
        let Some(reader) = self.reader.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if reader.is_finished() {
            let _ = reader.join();
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// Waits up to 10 s for `needle` in the log and returns the log. A line the server
    /// wrote before answering reaches the test through a pipe and a reader thread, so
    /// it may arrive after the answer: check log lines through this, not `log_text`.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log_text();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "log never showed {needle:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `listener` has exactly `n` sessions running, as the server counts
    /// them (`mailgate_connections_active`): the way to know it has noticed a client
    /// leave, instead of sleeping.
    pub async fn wait_active(&self, listener: &str, n: u64) {
        let series = format!("mailgate_connections_active{{listener=\"{listener}\"}} ");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut http = TcpStream::connect(self.metrics).await.expect("metrics");
            http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
                .await
                .expect("request");
            let mut body = String::new();
            http.read_to_string(&mut body).await.expect("response");
            let now = body
                .lines()
                .find_map(|l| l.strip_prefix(&series))
                .and_then(|v| v.trim().parse::<u64>().ok());
            if now == Some(n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{listener}: {now:?} sessions, waited for {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `mailgate --config ... ARGS` with `stdin`.
    pub fn cli(&self, args: &[&str], stdin: &[u8]) -> Output {
        cli(&self.config, args, stdin)
    }

    /// `cli`, which must succeed: its stdout.
    pub fn cli_ok(&self, args: &[&str], stdin: &[u8]) -> String {
        let out = self.cli(args, stdin);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn add_domain(&self, domain: &str) {
        let out = self.cli(&["domain", "add", domain], b"");
        assert!(
            out.status.success(),
            "domain add {domain}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn add_user(&self, address: &str, password: &str) {
        let out = self.cli(
            &["user", "add", address, "--password-stdin"],
            format!("{password}\n").as_bytes(),
        );
        assert!(
            out.status.success(),
            "user add {address}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn deliver(&self, rcpt: &str, message: &[u8]) {
        let out = self.cli(&["deliver", rcpt], message);
        assert!(
            out.status.success(),
            "deliver to {rcpt}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A domain with one user, the usual start of a test.
    pub fn with_user(&self, address: &str) {
        let domain = address.split('@').nth(1).expect("domain");
        let listed = self.cli(&["domain", "list"], b"");
        if !String::from_utf8_lossy(&listed.stdout)
            .lines()
            .any(|l| l == domain)
        {
            self.add_domain(domain);
        }
        self.add_user(address, PASSWORD);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Like the process's kill: the runtime's tasks are dropped where they are.
        if let Some(server) = self.in_process.take() {
            drop(server.running);
            server.runtime.shutdown_background();
        }
    }
}

pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

pub fn cli(config: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cli");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("cli output");
    let _ = writer.join();
    out
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A message with a header and `body_lines` lines of body.
pub fn message(subject: &str, body_lines: usize) -> Vec<u8> {
    let mut m = format!("From: a@example.net\r\nTo: b@example.org\r\nSubject: {subject}\r\n\r\n")
        .into_bytes();
    for i in 0..body_lines {
        m.extend_from_slice(format!("line {i}\r\n").as_bytes());
    }
    m
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// A raw POP3 client for byte-exact checks.
pub struct Raw {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
}

pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn tls_connector(ca: &Path) -> tokio_rustls::TlsConnector {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(cert.expect("ca cert")).expect("add root");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

impl Raw {
    pub async fn plain(addr: SocketAddr) -> Raw {
        let s = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timeout")
            .expect("connect");
        Raw {
            stream: Box::new(s),
            buf: Vec::new(),
        }
    }

    pub async fn tls(addr: SocketAddr, ca: &Path, sni: &str) -> Raw {
        let s = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("sni");
        let tls = tokio::time::timeout(TIMEOUT, tls_connector(ca).connect(name, s))
            .await
            .expect("tls timeout")
            .expect("tls");
        Raw {
            stream: Box::new(tls),
            buf: Vec::new(),
        }
    }

    /// Connects and sends `prefix` (e.g. a PROXY protocol header) before anything else.
    pub async fn plain_after(addr: SocketAddr, prefix: &[u8]) -> Raw {
        let mut c = Raw::plain(addr).await;
        c.send_bytes(prefix).await;
        c
    }

    /// Connects, sends `prefix` in cleartext, then runs the TLS handshake.
    pub async fn tls_after(addr: SocketAddr, prefix: &[u8], ca: &Path, sni: &str) -> Raw {
        Raw::plain_after(addr, prefix).await.starttls(ca, sni).await
    }

    /// Upgrades after a `+OK` to STLS; bytes buffered so far are dropped like a client must.
    pub async fn starttls(self, ca: &Path, sni: &str) -> Raw {
        let Raw { stream, .. } = self;
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("sni");
        let tls = tokio::time::timeout(TIMEOUT, tls_connector(ca).connect(name, stream))
            .await
            .expect("timeout")
            .expect("tls");
        Raw {
            stream: Box::new(tls),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, data: &str) {
        self.send_bytes(data.as_bytes()).await;
    }

    pub async fn send_bytes(&mut self, data: &[u8]) {
        self.stream.write_all(data).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    /// One line including its CRLF; panics on EOF.
    pub async fn line(&mut self) -> String {
        self.try_line()
            .await
            .expect("connection closed while waiting for a line")
    }

    pub async fn try_line(&mut self) -> Option<String> {
        let bytes = self.line_bytes().await?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub async fn line_bytes(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                return Some(self.buf.drain(..=i).collect());
            }
            let mut chunk = [0u8; 16384];
            let n = tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk))
                .await
                .expect("read timeout")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a command and returns the first reply line.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.line().await
    }

    /// Reads a multi-line body after its status line: raw bytes up to and including the
    /// terminating ".\r\n".
    pub async fn multiline_raw(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let line = self.line_bytes().await.expect("eof in multi-line reply");
            let end = line == b".\r\n";
            out.extend_from_slice(&line);
            if end {
                return out;
            }
        }
    }

    /// Reads a multi-line body and undoes dot-stuffing (without the terminator).
    pub async fn multiline(&mut self) -> Vec<u8> {
        let raw = self.multiline_raw().await;
        let body = &raw[..raw.len() - 3];
        let mut out = Vec::with_capacity(body.len());
        let mut at_start = true;
        let mut i = 0;
        while i < body.len() {
            if at_start && body[i] == b'.' {
                i += 1;
            }
            let b = body[i];
            out.push(b);
            at_start = b == b'\n';
            i += 1;
        }
        out
    }

    /// True when the server closed the connection (EOF) within the timeout.
    pub async fn closed(&mut self) -> bool {
        self.line_bytes().await.is_none()
    }

    /// An SMTP/LMTP reply, its continuation lines included.
    pub async fn reply(&mut self) -> String {
        let mut text = String::new();
        loop {
            let line = self.line().await;
            text.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return text;
            }
        }
    }

    /// Sends an SMTP/LMTP command line and returns its reply.
    pub async fn say(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }

    pub async fn login(&mut self, user: &str, password: &str) -> String {
        let r = self.cmd(&format!("USER {user}")).await;
        assert!(r.starts_with("+OK"), "USER: {r}");
        self.cmd(&format!("PASS {password}")).await
    }
}

/// Every message in `user`'s maildrop (password [`PASSWORD`]), read over POP3S with RETR.
/// The message count of a STAT reply.
pub fn stat_count(stat: &str) -> usize {
    stat.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("STAT: {stat}"))
}

pub async fn fetch_all(server: &Server, user: &str) -> Vec<Vec<u8>> {
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    c.line().await;
    let r = c.login(user, PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
    let count = stat_count(&c.cmd("STAT").await);
    let mut out = Vec::new();
    for i in 1..=count {
        let r = c.cmd(&format!("RETR {i}")).await;
        assert!(r.starts_with("+OK"), "{r}");
        out.push(c.multiline().await);
    }
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    out
}

/// Writes a file only its owner may read (mail clients refuse rc files others can).
pub fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("create");
    std::io::Write::write_all(&mut f, text.as_bytes()).expect("write");
}

/// Runs fetchmail once with the rc file `rc`, its state (idfile) kept in `home`.
pub fn fetchmail(rc: &Path, home: &Path) -> Output {
    require_tool("fetchmail");
    Command::new("fetchmail")
        .args(["--nosyslog", "-N", "-f"])
        .arg(rc)
        .env("FETCHMAILHOME", home)
        .env("HOME", home)
        .output()
        .expect("fetchmail")
}

/// How many messages in an mbox (or MDA output) carry this exact Subject line.
pub fn count_subjects(mbox: &str, subject: &str) -> usize {
    mbox.lines()
        .filter(|l| l.trim_end() == format!("Subject: {subject}"))
        .count()
}

/// The SHA-256 of `data` in lower-case hex.
pub fn hex_sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs a Python client script from `tests/clients/` with arguments; returns stdout and
/// fails the test with its stderr when it exits non-zero.
pub fn python(script: &str, args: &[&str]) -> String {
    require_tool("python3");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(maildrop, at_us, locked)` for every lock event in a replica's log.
fn lock_events(log: &str) -> Vec<(String, u64, bool)> {
    let mut out = Vec::new();
    for line in log.lines() {
        let locked = if line.contains("maildrop locked ") {
            true
        } else if line.contains("maildrop unlocked ") {
            false
        } else {
            continue;
        };
        let field = |name: &str| {
            line.split(name)
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("no {name} in {line}"))
                .trim_matches('"')
                .to_owned()
        };
        let at: u64 = field(" at_us=").parse().expect("at_us");
        out.push((field(" maildrop="), at, locked));
    }
    out
}

/// What [`assert_one_holder_at_a_time`] saw.
pub struct Holders {
    /// Lock events (sessions that held a maildrop).
    pub sessions: usize,
    /// Distinct maildrops locked.
    pub maildrops: usize,
}

/// Reads the lock log lines of every replica (`logs` gives each one's log), waiting up
/// to 5 s until every lock taken was released, and checks that no maildrop ever had two
/// holders at once.
pub async fn assert_one_holder_at_a_time(logs: impl Fn() -> Vec<String>) -> Holders {
    let events =
        || -> Vec<(String, u64, bool)> { logs().iter().flat_map(|l| lock_events(l)).collect() };
    let settle = std::time::Instant::now() + Duration::from_secs(5);
    let mut all_events = events();
    while all_events.iter().filter(|e| e.2).count() != all_events.iter().filter(|e| !e.2).count() {
        assert!(
            std::time::Instant::now() < settle,
            "a lock was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        all_events = events();
    }
    let sessions = all_events.iter().filter(|e| e.2).count();
    let mut per_key: std::collections::BTreeMap<String, Vec<(u64, bool)>> = Default::default();
    for (key, at, locked) in all_events {
        per_key.entry(key).or_default().push((at, locked));
    }
    let maildrops = per_key.len();
    for (key, mut evs) in per_key {
        // At one microsecond, an unlock sorts before a lock (false < true).
        evs.sort();
        let mut held = 0;
        for (at, locked) in evs {
            held += if locked { 1 } else { -1 };
            assert!((0..=1).contains(&held), "{key}: {held} holders at {at} µs");
        }
        assert_eq!(held, 0, "{key}");
    }
    Holders {
        sessions,
        maildrops,
    }
}

/// A POP3S connection to `server` (SNI `localhost`), past its greeting.
pub async fn pop3s(server: &Server) -> Raw {
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    let greeting = c.line().await;
    assert!(greeting.starts_with("+OK"), "{greeting}");
    c
}

/// A POP3S session of `user` (password [`PASSWORD`]) in the TRANSACTION state.
pub async fn logged_in(server: &Server, user: &str) -> Raw {
    let mut c = pop3s(server).await;
    let r = c.login(user, PASSWORD).await;
    assert!(r.starts_with("+OK"), "login {user}: {r}");
    c
}

/// Process `pid`'s resident set (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}
