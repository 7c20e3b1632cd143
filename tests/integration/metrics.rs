//! The metrics endpoint against real traffic, and the dashboard and alert rules against
//! the live endpoint: exact counter deltas, promtool on the scrape and the rules, every
//! metric the dashboard and rules name is exported (the per-peer cluster series by the
//! registry once a peer is named), a real Prometheus scrapes the server and answers the
//! dashboard's queries, and the dashboard matches Grafana's schema.

use crate::common::{self, require_tool, Raw, Server, PASSWORD};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "joe@example.org";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// GET `url` with curl; returns (status, body).
pub(crate) fn http_get(url: &str) -> (u16, String) {
    require_tool("curl");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}", url])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl status line");
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn scrape(addr: SocketAddr) -> Samples {
    let (status, body) = http_get(&format!("http://{addr}/metrics"));
    assert_eq!(status, 200, "{body}");
    Samples::parse(&body)
}

/// One sample line: metric name, labels, value.
type Row = (String, Vec<(String, String)>, f64);

/// The samples of one exposition, by name and labels.
struct Samples {
    text: String,
    rows: Vec<Row>,
}

impl Samples {
    fn parse(text: &str) -> Samples {
        let mut rows = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = value.parse().expect("sample value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closing brace");
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("label");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
                None => (series, Vec::new()),
            };
            rows.push((name.to_owned(), labels, value));
        }
        Samples {
            text: text.to_owned(),
            rows,
        }
    }

    /// Sum over the series of `name` whose labels include all of `want`.
    fn get(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.rows
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    fn has(&self, name: &str, want: &[(&str, &str)]) -> bool {
        self.rows.iter().any(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
    }

    fn names(&self) -> BTreeSet<&str> {
        self.rows.iter().map(|(n, _, _)| n.as_str()).collect()
    }
}

/// The sum of the series of `name` with all of `labels` on a live server.
pub(crate) fn metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape(addr).get(name, labels)
}

/// Scrapes until `done` holds, for at most 15 s.
fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&Samples) -> bool) -> Samples {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = scrape(addr);
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn tls_session(server: &Server) -> Raw {
    let mut c = Raw::tls(server.pop3s, &server.ca.ca_pem, "localhost").await;
    assert!(c.line().await.starts_with("+OK"));
    c
}

/// Delivers through the running server (admin socket); returns the stored size.
fn deliver(server: &Server, rcpt: &str) -> u64 {
    let out = server.cli(&["deliver", rcpt], &common::message("metrics", 20));
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {stdout:?}"))
}

/// A server with a user, a delivered message, one RETR session, and the storage gauges
/// counted: every metric family has something to show.
async fn busy_server() -> Server {
    let server = Server::start();
    server.with_user(USER);
    deliver(&server, USER);
    let mut c = tls_session(&server).await;
    assert!(c.login(USER, PASSWORD).await.starts_with("+OK"));
    assert!(c.cmd("RETR 1").await.starts_with("+OK"));
    c.multiline().await;
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    scrape_until(server.metrics, "storage gauges", |s| {
        s.has("mailgate_domain_messages", &[("domain", "example.org")])
    });
    server
}

#[test]
fn every_hosted_domain_has_storage_gauges_after_a_restart() {
    let mut server = Server::start();
    let tenants = ["a.example", "b.example", "c.example"];
    for (i, domain) in tenants.into_iter().enumerate() {
        let user = format!("joe@{domain}");
        server.with_user(&user);
        for n in 0..i {
            server.deliver(&user, &common::message(&format!("m{n}"), 1));
        }
    }
    // After a restart no store is open; every tenant still gets its series at the first
    // housekeeping pass, with what it holds.
    assert!(server.stop().success());
    server.spawn();
    let samples = scrape_until(server.metrics, "storage gauges of every tenant", |s| {
        tenants
            .iter()
            .all(|d| s.has("mailgate_domain_messages", &[("domain", d)]))
    });
    for (i, domain) in tenants.into_iter().enumerate() {
        let labels = [("domain", domain)];
        assert_eq!(samples.get("mailgate_domain_accounts", &labels), 1.0);
        assert_eq!(samples.get("mailgate_domain_messages", &labels), i as f64);
        let octets = samples.get("mailgate_domain_stored_bytes", &labels);
        assert_eq!(octets > 0.0, i > 0, "{domain}: {octets}");
    }
}

#[tokio::test]
async fn counters_move_by_exactly_the_traffic() {
    let server = Server::start();
    server.with_user(USER);
    let m = server.metrics;
    let before = scrape(m);

    let stored = deliver(&server, USER);
    let out = server.cli(&["deliver", "nobody@example.org"], &common::message("x", 1));
    assert_eq!(out.status.code(), Some(67));
    let counted = scrape_until(m, "the domain gauges to count the delivery", |s| {
        s.get("mailgate_domain_messages", &[("domain", "example.org")]) == 1.0
    });
    assert_eq!(
        counted.get("mailgate_domain_stored_bytes", &[("domain", "example.org")]),
        stored as f64
    );
    assert_eq!(
        counted.get("mailgate_domain_accounts", &[("domain", "example.org")]),
        1.0
    );

    // 1: good login, a malformed RETR, RETR, DELE, QUIT (UPDATE).
    let mut s1 = tls_session(&server).await;
    assert!(s1.login(USER, PASSWORD).await.starts_with("+OK"));
    assert!(s1.cmd("RETR x").await.starts_with("-ERR"));
    assert!(s1.cmd("RETR 1").await.starts_with("+OK"));
    s1.multiline().await;
    assert!(s1.cmd("DELE 1").await.starts_with("+OK"));
    assert!(s1.cmd("QUIT").await.starts_with("+OK"));
    // 2: a command before login, a wrong password.
    let mut s2 = tls_session(&server).await;
    assert!(s2.cmd("STAT").await.starts_with("-ERR"));
    assert!(s2.login(USER, "wrong").await.starts_with("-ERR [AUTH]"));
    assert!(s2.cmd("QUIT").await.starts_with("+OK"));
    // 3 holds the maildrop while 4 gets [IN-USE].
    let mut s3 = tls_session(&server).await;
    assert!(s3.login(USER, PASSWORD).await.starts_with("+OK"));
    let mut s4 = tls_session(&server).await;
    assert!(s4.login(USER, PASSWORD).await.starts_with("-ERR [IN-USE]"));
    assert!(s4.cmd("QUIT").await.starts_with("+OK"));
    assert!(s3.cmd("QUIT").await.starts_with("+OK"));
    // 5: cleartext, an unknown command, STLS, QUIT.
    let mut s5 = Raw::plain(server.pop3).await;
    assert!(s5.line().await.starts_with("+OK"));
    assert!(s5.cmd("XYZZY").await.starts_with("-ERR"));
    assert!(s5.cmd("STLS").await.starts_with("+OK"));
    let mut s5 = s5.starttls(&server.ca.ca_pem, "localhost").await;
    assert!(s5.cmd("QUIT").await.starts_with("+OK"));

    let after = scrape_until(m, "five finished sessions", |s| {
        s.get("mailgate_sessions_total", &[("outcome", "quit")])
            - before.get("mailgate_sessions_total", &[("outcome", "quit")])
            == 5.0
    });
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.get(name, labels) - before.get(name, labels);
    let cmd = |verb: &'static str, result: &'static str| {
        delta(
            "mailgate_commands_total",
            &[("protocol", "pop3"), ("command", verb), ("result", result)],
        )
    };
    let expected: &[(&str, f64, f64)] = &[
        ("USER ok", cmd("USER", "ok"), 4.0),
        ("PASS ok", cmd("PASS", "ok"), 2.0),
        ("PASS err (wrong, in use)", cmd("PASS", "err"), 2.0),
        ("RETR ok", cmd("RETR", "ok"), 1.0),
        ("RETR err (malformed)", cmd("RETR", "err"), 1.0),
        ("DELE ok", cmd("DELE", "ok"), 1.0),
        ("STAT err (before login)", cmd("STAT", "err"), 1.0),
        ("unknown err", cmd("unknown", "err"), 1.0),
        ("STLS ok", cmd("STLS", "ok"), 1.0),
        ("QUIT ok", cmd("QUIT", "ok"), 5.0),
        (
            "auth success",
            delta(
                "mailgate_auth_attempts_total",
                &[("mechanism", "user"), ("result", "success")],
            ),
            3.0,
        ),
        (
            "auth failure",
            delta(
                "mailgate_auth_attempts_total",
                &[("mechanism", "user"), ("result", "failure")],
            ),
            1.0,
        ),
        ("all auth", delta("mailgate_auth_attempts_total", &[]), 4.0),
        (
            "accepted pop3s",
            delta(
                "mailgate_connections_accepted_total",
                &[("listener", "pop3s")],
            ),
            4.0,
        ),
        (
            "accepted pop3",
            delta(
                "mailgate_connections_accepted_total",
                &[("listener", "pop3")],
            ),
            1.0,
        ),
        (
            "rejected",
            delta("mailgate_connections_rejected_total", &[]),
            0.0,
        ),
        (
            "sessions pop3s quit",
            delta(
                "mailgate_sessions_total",
                &[("listener", "pop3s"), ("outcome", "quit")],
            ),
            4.0,
        ),
        ("all sessions", delta("mailgate_sessions_total", &[]), 5.0),
        (
            "session durations",
            delta("mailgate_session_duration_seconds_count", &[]),
            5.0,
        ),
        (
            "TLS 1.3 handshakes pop3s",
            delta(
                "mailgate_tls_handshakes_total",
                &[
                    ("listener", "pop3s"),
                    ("result", "ok"),
                    ("version", "TLSv1.3"),
                ],
            ),
            4.0,
        ),
        (
            "TLS handshakes pop3 (STLS)",
            delta(
                "mailgate_tls_handshakes_total",
                &[("listener", "pop3"), ("result", "ok")],
            ),
            1.0,
        ),
        (
            "failed handshakes",
            delta("mailgate_tls_handshakes_total", &[("result", "failed")]),
            0.0,
        ),
        (
            "STLS upgrades",
            delta("mailgate_tls_upgrades_total", &[("protocol", "pop3")]),
            1.0,
        ),
        (
            "lock acquisitions timed",
            delta(
                "mailgate_lock_acquire_duration_seconds_count",
                &[("backend", "local")],
            ),
            3.0,
        ),
        (
            "lock contention",
            delta("mailgate_lock_contention_total", &[("backend", "local")]),
            1.0,
        ),
        ("lock losses", delta("mailgate_lock_losses_total", &[]), 0.0),
        (
            "RETR timed",
            delta(
                "mailgate_command_duration_seconds_count",
                &[("command", "RETR")],
            ),
            1.0,
        ),
        (
            "UPDATE timed",
            delta(
                "mailgate_command_duration_seconds_count",
                &[("command", "UPDATE")],
            ),
            1.0,
        ),
        (
            "TOP timed",
            delta(
                "mailgate_command_duration_seconds_count",
                &[("command", "TOP")],
            ),
            0.0,
        ),
        (
            "deliveries accepted",
            delta(
                "mailgate_deliveries_total",
                &[("protocol", "local"), ("result", "accepted")],
            ),
            1.0,
        ),
        (
            "deliveries unknown user",
            delta(
                "mailgate_deliveries_total",
                &[("protocol", "local"), ("result", "unknown_user")],
            ),
            1.0,
        ),
        (
            "all deliveries",
            delta("mailgate_deliveries_total", &[]),
            2.0,
        ),
        (
            "delivery latencies",
            delta(
                "mailgate_delivery_duration_seconds_count",
                &[("protocol", "local")],
            ),
            2.0,
        ),
        (
            "received bytes",
            delta("mailgate_received_bytes_total", &[("protocol", "local")]),
            stored as f64,
        ),
        (
            "active connections",
            after.get("mailgate_connections_active", &[]),
            0.0,
        ),
        ("ready", after.get("mailgate_ready", &[]), 1.0),
    ];
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(_, got, want)| got != want)
        .map(|(what, got, want)| format!("{what}: moved by {got}, expected {want}"))
        .collect();
    assert!(wrong.is_empty(), "{}\n\n{}", wrong.join("\n"), after.text);
    // RETR sends the dot-stuffed message and its status line: at least what was stored.
    let sent = delta("mailgate_sent_bytes_total", &[("command", "RETR")]);
    assert!(sent >= stored as f64, "sent {sent} < stored {stored}");

    // The gauges of one count are set one after the other, so a scrape may fall between
    // them: wait for both.
    let emptied = scrape_until(m, "the domain gauges to see the DELE", |s| {
        s.get("mailgate_domain_messages", &[("domain", "example.org")]) == 0.0
            && s.get("mailgate_domain_stored_bytes", &[("domain", "example.org")]) == 0.0
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    for cert in ["default", "example.org"] {
        let not_after = emptied.get(
            "mailgate_certificate_expiry_timestamp_seconds",
            &[("certificate", cert)],
        );
        assert!(not_after > now, "{cert}: {not_after}");
    }
    assert!(emptied.has(
        "mailgate_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))]
    ));
    // Removing the domain through the running server drops its gauges.
    let out = server.cli(&["domain", "remove", "example.org"], b"");
    assert!(out.status.success(), "{out:?}");
    let removed = scrape(m);
    assert!(!removed.has("mailgate_domain_messages", &[("domain", "example.org")]));
    assert!(!removed.has("mailgate_domain_accounts", &[("domain", "example.org")]));
    // CPU time is exported in whole seconds, so a young process may show 0.
    assert!(emptied.has("mailgate_process_cpu_seconds_total", &[]));
    for name in [
        "mailgate_process_resident_memory_bytes",
        "mailgate_process_open_fds",
    ] {
        assert!(emptied.get(name, &[]) > 0.0, "{name}");
    }
}

#[tokio::test]
async fn health_and_readiness_follow_the_server_state() {
    let mut server = Server::start_with(common::Options {
        shutdown_grace_secs: 20,
        // SIGTERM to the binary.
        process: true,
        ..Default::default()
    });
    server.with_user(USER);
    let base = format!("http://{}", server.metrics);
    assert_eq!(http_get(&format!("{base}/healthz")), (200, "ok\n".into()));
    assert_eq!(http_get(&format!("{base}/readyz")), (200, "ready\n".into()));
    assert_eq!(http_get(&format!("{base}/nope")).0, 404);
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
        .arg(format!("{base}/metrics"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "405");

    // A logged-in session keeps the server draining after SIGTERM: it must say it is
    // not ready (so a load balancer stops sending clients) while it still serves metrics.
    let mut c = tls_session(&server).await;
    assert!(c.login(USER, PASSWORD).await.starts_with("+OK"));
    let pid = server.pid();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let (code, body) = loop {
        let r = http_get(&format!("{base}/readyz"));
        if r.0 != 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, 503, "{body}");
    assert_eq!(body, "not ready: shutting down\n");
    let s = scrape(server.metrics);
    assert_eq!(s.get("mailgate_ready", &[]), 0.0);
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert!(server.stop().success());
}

#[tokio::test]
async fn promtool_accepts_the_live_scrape() {
    let server = busy_server().await;
    promtool_check_metrics(&scrape(server.metrics).text);
    // The per-peer cluster series, which a server that is not clustered lacks.
    promtool_check_metrics(&peer_registry_text());
}

/// `promtool check metrics` on an exposition: no errors, no lint warnings.
fn promtool_check_metrics(text: &str) {
    require_tool("promtool");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn promtool(args: &[&str], dir: &Path) {
    require_tool("promtool");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let dir = repo("deploy/prometheus");
    promtool(&["check", "rules", "alerts.yaml"], &dir);
    promtool(&["test", "rules", "alerts.test.yaml"], &dir);
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(repo("deploy/grafana/mailgate.json")).expect("dashboard");
    serde_json::from_str(&text).expect("dashboard JSON")
}

/// Every panel query of the dashboard (rows included), as (panel title, expr).
fn dashboard_exprs() -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_owned()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard()["panels"], &mut out);
    assert!(out.len() > 20, "dashboard has too few queries: {out:?}");
    out
}

/// Grafana's variables replaced by what an "All" selection and a short range send.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "15s")
        .replace("$instance", ".*")
        .replace("$domain", ".*")
}

/// Every `mailgate_*` name in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("mailgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The series labelled by a peer replica: a server that is not clustered has no peers, so
/// it exports none of them (`Metrics::cluster_peers` creates them from `cluster.peers`).
const PEER_SERIES: &[&str] = &[
    "mailgate_cluster_forwards_total",
    "mailgate_cluster_forwarded_recipients_total",
    "mailgate_cluster_peer_connect_duration_seconds_bucket",
    "mailgate_cluster_peer_connect_duration_seconds_sum",
    "mailgate_cluster_peer_connect_duration_seconds_count",
    "mailgate_cluster_peer_up",
];

/// What a metrics registry exports once it has a peer that was reached.
fn peer_registry_text() -> String {
    let m = mailgate::metrics::Metrics::new("local").expect("metrics");
    m.cluster_peers(&["peer"]);
    m.peer_connect("peer", Some(Duration::from_millis(1)));
    m.render()
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    let server = busy_server().await;
    let live = scrape(server.metrics);
    let exported = live.names();
    // The per-peer series cannot come from this server: they must come from the same
    // registry once a peer is named, and the list must name only those.
    let peer_registry = Samples::parse(&peer_registry_text());
    let with_peer = peer_registry.names();
    for name in PEER_SERIES {
        assert!(with_peer.contains(*name), "{name} not exported with a peer");
        assert!(
            !exported.contains(name),
            "{name} needs no peer: drop it from PEER_SERIES"
        );
    }
    let mut missing = Vec::new();
    for file in [
        "deploy/grafana/mailgate.json",
        "deploy/prometheus/alerts.yaml",
    ] {
        let text = std::fs::read_to_string(repo(file)).expect(file);
        let names = metric_names(&text);
        assert!(names.len() > 10, "{file}: {names:?}");
        for name in names {
            if !exported.contains(name.as_str()) && !PEER_SERIES.contains(&name.as_str()) {
                missing.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not exported by a live server (nor a peer series):\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_dashboard_query_parses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules: Vec<serde_json::Value> = dashboard_exprs()
        .iter()
        .enumerate()
        .map(|(i, (_, e))| serde_json::json!({ "record": format!("dashboard:query_{i}"), "expr": substitute(e) }))
        .collect();
    // JSON is YAML, so promtool reads this as a rules file.
    let file = serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
    std::fs::write(dir.path().join("dashboard.rules.json"), file.to_string()).expect("write");
    promtool(&["check", "rules", "dashboard.rules.json"], dir.path());
}

#[test]
fn dashboard_validates_against_grafana_schema() {
    require_tool("node");
    let npm = repo(".tools/npm");
    assert!(
        npm.join("node_modules/@grafana/schema").is_dir(),
        "{} lacks @grafana/schema: run scripts/test.sh, which installs it",
        npm.display()
    );
    let out = Command::new("node")
        .arg(repo("scripts/validate-dashboard.cjs"))
        .arg(&npm)
        .arg(repo("deploy/grafana/mailgate.json"))
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        require_tool("prometheus");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: mailgate\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .expect("config");
        // Prometheus cannot report a port it picked itself: take a free one and hand it over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(&format!("{}/-/ready", p.url)).0 != 200 {
            assert!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// Runs an instant query; returns (status, number of result series).
    fn query(&self, expr: &str) -> (String, usize) {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", "--data-urlencode"])
            .arg(format!("query={expr}"))
            .arg(format!("{}/api/v1/query", self.url))
            .output()
            .expect("curl");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        let status = v["status"].as_str().unwrap_or("?").to_owned();
        let n = v["data"]["result"].as_array().map_or(0, Vec::len);
        (status, n)
    }
}

#[tokio::test]
async fn prometheus_scrapes_mailgate_and_answers_dashboard_queries() {
    let server = busy_server().await;
    let prometheus = Prometheus::start(server.metrics);
    let exprs = dashboard_exprs();
    let find = |title: &str| {
        exprs
            .iter()
            .find(|(t, _)| t == title)
            .map(|(_, e)| substitute(e))
            .unwrap_or_else(|| panic!("no panel {title:?}"))
    };
    // A gauge (one scrape is enough) and a rate (needs two scrapes).
    for title in ["Messages stored", "Commands"] {
        let expr = find(title);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, n) = prometheus.query(&expr);
            assert_eq!(status, "success", "{expr}");
            if n > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{title}: no data from Prometheus for {expr}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    for (title, e) in &exprs {
        let (status, _) = prometheus.query(&substitute(e));
        assert_eq!(status, "success", "{title}: {e}");
    }
}
