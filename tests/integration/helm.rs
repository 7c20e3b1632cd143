//! The Helm chart, offline. `tests/helm/check_chart.py` lints, renders and dry-run
//! installs `helm/mailgate` with every `ci/*-values.yaml` through Helm's own Go SDK
//! (helm-python-sdk), validates every object against the Kubernetes schemas
//! (kubernetes-validate, strict) and checks what the objects say; then each rendered
//! mailgate.toml is loaded by the real `mailgate check-config`, with the container's
//! environment (Redis URL expanded the way the kubelet does) and the files the chart
//! mounts made here: certificates, an accounts file, a Redis CA, a real redis-server,
//! and in cluster mode the replicas' certificate (every replica name, from a test CA),
//! the CA and the server secret, with the first pod's name as the downward API gives it.
//! With no certificate named (no values at all), check-config must say it will make the
//! self-signed one in the data dir.

use crate::common::redis_server::{RedisOptions, RedisServer};
use crate::common::sentinel::{SentinelSet, MASTER_NAME};
use crate::common::{TestCa, BIN};
use mailgate::auth::{make_credentials, HashParams};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The venv `scripts/test.sh` installs the pinned helm-python-sdk and kubernetes-validate into.
fn venv_python(repo: &Path) -> PathBuf {
    let python = repo.join(".tools/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: ./scripts/test.sh installs helm-python-sdk and kubernetes-validate there",
        python.display()
    );
    python
}

/// Writes `contents` to `path`, making its directories.
fn put(path: &str, contents: &[u8]) {
    let path = Path::new(path);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, contents).expect("write");
}

/// The Redis the rendered URL would reach, here: the same scheme, user and password, on
/// 127.0.0.1 (with a certificate for it when the URL says rediss://).
struct LocalRedis {
    /// Runs until the check is done (stopped on drop); none behind sentinels.
    _server: Option<RedisServer>,
    url: String,
    /// With `redis.external.sentinels`: a Sentinel set whose master has the same
    /// password, standing in for the rendered sentinels.
    sentinels: Option<SentinelSet>,
}

/// Expands the container's env as the kubelet would, with `password` for the Redis
/// password Secret, and starts a redis-server matching the resulting URL.
fn redis_for(
    env: &[Value],
    ca: &TestCa,
    ca_file: Option<&str>,
    sentinel_master: Option<&str>,
) -> LocalRedis {
    const PASSWORD: &str = "k8s-secret-0123456789";
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    for e in env {
        let name = e["name"].as_str().expect("env name").to_string();
        let value = match (&e["value"], &e["valueFrom"]["secretKeyRef"]) {
            (Value::String(v), _) => {
                let mut v = v.clone();
                for (k, val) in &vars {
                    v = v.replace(&format!("$({k})"), val);
                }
                v
            }
            (_, Value::Object(_)) if name == "REDIS_PASSWORD" => PASSWORD.to_string(),
            // The pod's own fields (the replica name) play no part in the URL.
            _ if e["valueFrom"]["fieldRef"].is_object() => continue,
            _ => panic!("no test value for env {e}"),
        };
        vars.insert(name, value);
    }
    let url = vars
        .get("MAILGATE_LOCKS__REDIS_URL")
        .expect("MAILGATE_LOCKS__REDIS_URL");
    assert!(!url.contains("$("), "unexpanded reference in {url}");
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let (userinfo, hostpart) = rest.rsplit_once('@').unwrap_or(("", rest));
    let (_, db) = hostpart.split_once('/').expect("db");
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    assert_eq!(password, PASSWORD, "the Secret's password is in the URL");
    if let Some(master) = sentinel_master {
        assert_eq!(master, MASTER_NAME, "the ci values name the test's master");
        assert!(
            user.is_empty() && scheme == "redis",
            "sentinel ci values: requirepass only"
        );
        // Nothing listens on port 1: check-config passes only through the sentinels.
        return LocalRedis {
            _server: None,
            url: format!("redis://:{PASSWORD}@127.0.0.1:1/{db}"),
            sentinels: Some(SentinelSet::start_with(Some(PASSWORD))),
        };
    }
    let tls = (scheme == "rediss").then(|| {
        let (cert, key) = ca.issue("redis", &["127.0.0.1", "localhost"]);
        let ca_file = ca_file.expect("rediss:// with a private CA needs redis_ca_file");
        put(ca_file, &std::fs::read(&ca.ca_pem).expect("ca"));
        (cert, key, ca.ca_pem.clone())
    });
    let opts = RedisOptions {
        requirepass: user.is_empty().then(|| password.to_string()),
        acl_user: (!user.is_empty()).then(|| (user.to_string(), password.to_string())),
        tls,
        replicaof: None,
    };
    let server = RedisServer::start_with(opts);
    let url = format!("{scheme}://{userinfo}@127.0.0.1:{}/{db}", server.port);
    LocalRedis {
        _server: Some(server),
        url,
        sentinels: None,
    }
}

#[test]
fn chart_renders_validates_and_its_config_passes_check_config() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = venv_python(repo);
    let out = tempfile::tempdir().expect("tempdir");
    let checked = Command::new(&python)
        .arg(repo.join("tests/helm/check_chart.py"))
        .arg(repo.join("helm/mailgate"))
        .arg(repo)
        .arg(out.path())
        .output()
        .expect("run check_chart.py");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(checked.status.success(), "check_chart.py failed:\n{report}");
    assert!(report.contains("chart OK"), "{report}");

    let mut names: Vec<PathBuf> = std::fs::read_dir(out.path())
        .expect("out")
        .map(|e| e.expect("entry").path())
        .collect();
    names.sort();
    let ci_files = std::fs::read_dir(repo.join("helm/mailgate/ci"))
        .expect("ci")
        .count();
    assert_eq!(names.len(), ci_files, "one rendered config per values file");
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(ca_dir.path());
    for dir in names {
        let name = dir.file_name().expect("name").to_string_lossy().to_string();
        let needs: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("needs.json")).expect("needs.json"),
        )
        .expect("needs.json is JSON");
        let mut ca_file = None;
        let mut accounts = 0;
        for file in needs["files"].as_array().expect("files") {
            match file["kind"].as_str().expect("kind") {
                "cert_pair" => {
                    let domain = file["name"].as_str().expect("name");
                    let names = if domain == "default" {
                        vec!["localhost".to_string()]
                    } else {
                        vec![domain.to_string(), format!("mail.{domain}")]
                    };
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    let (cert, key) = ca.issue(&format!("{name}-{domain}"), &names);
                    put(
                        file["cert"].as_str().expect("cert"),
                        &std::fs::read(cert).expect("cert"),
                    );
                    put(
                        file["key"].as_str().expect("key"),
                        &std::fs::read(key).expect("key"),
                    );
                }
                "accounts" => {
                    let mut lines = String::from("# as the Secret would hold it\n");
                    for domain in file["domains"].as_array().expect("domains") {
                        let phc = make_credentials("pw", &HashParams::cheap())
                            .expect("hash")
                            .phc;
                        lines.push_str(&format!(
                            "postmaster@{} {phc}\n",
                            domain.as_str().expect("domain")
                        ));
                        accounts += 1;
                    }
                    put(file["path"].as_str().expect("path"), lines.as_bytes());
                }
                "ca" => ca_file = Some(file["path"].as_str().expect("path").to_string()),
                "cluster" => {
                    // One certificate for every replica, with the CA, as the chart's
                    // Secret holds them; the server secret as its Secret would.
                    let names: Vec<&str> = file["names"]
                        .as_array()
                        .expect("names")
                        .iter()
                        .map(|n| n.as_str().expect("replica name"))
                        .collect();
                    let (cert, key) = ca.issue(&format!("{name}-cluster"), &names);
                    for (k, from) in [("cert", &cert), ("key", &key), ("ca", &ca.ca_pem)] {
                        put(
                            file[k].as_str().expect("cluster file"),
                            &std::fs::read(from).expect("cluster file"),
                        );
                    }
                    put(
                        file["secret_file"].as_str().expect("secret_file"),
                        b"0123456789abcdef0123456789abcdef0123456789abcdef",
                    );
                }
                other => panic!("{name}: unknown file kind {other}"),
            }
        }
        let redis = match &needs["redis"] {
            Value::Null => None,
            r => Some(redis_for(
                r["env"].as_array().expect("env"),
                &ca,
                ca_file.as_deref(),
                r["sentinel_master"].as_str(),
            )),
        };
        assert_eq!(redis.is_some(), needs["backend"] == "redis", "{name}");
        let mut cmd = Command::new(BIN);
        cmd.arg("check-config")
            .env("MAILGATE_CONFIG", dir.join("mailgate.toml"))
            .env("MAILGATE_LOG", "warn");
        if let Some(r) = &redis {
            cmd.env("MAILGATE_LOCKS__REDIS_URL", &r.url);
            // The rendered sentinels are cluster names: point at the local ones.
            if let Some(set) = &r.sentinels {
                let list: Vec<String> = set.addrs().iter().map(|a| format!("\"{a}\"")).collect();
                cmd.env(
                    "MAILGATE_LOCKS__REDIS_SENTINELS",
                    format!("[{}]", list.join(",")),
                );
            }
        }
        for (k, v) in needs["env"].as_object().expect("env") {
            cmd.env(k, v.as_str().expect("env value"));
        }
        let run = cmd.output().expect("check-config");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(
            run.status.success() && text.contains("configuration OK"),
            "{name}: check-config refused the chart's config:\n{text}\n{}",
            std::fs::read_to_string(dir.join("mailgate.toml")).unwrap_or_default()
        );
        if redis.is_some() {
            assert!(text.contains("reachable"), "{name}: {text}");
        }
        // With no certificate named, serve makes its own in the data dir on the volume.
        let self_signed = format!(
            "a self-signed one will be made at {}",
            dir.join("root/var/lib/mailgate/data/tls/selfsigned.crt")
                .display()
        );
        assert_eq!(
            text.contains(&self_signed),
            needs["self_signed"] == true,
            "{name}: self-signed expected: {}\n{text}",
            needs["self_signed"]
        );
        if accounts > 0 {
            assert!(
                text.contains(&format!("{accounts} account(s) created at start")),
                "{name}: {text}"
            );
        }
    }
}

/// The container image's own config (deploy/mailgate.toml, used without the chart) passes
/// check-config as shipped.
#[test]
fn image_default_config_passes_check_config() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/mailgate.toml");
    let run = Command::new(BIN)
        .arg("check-config")
        .env("MAILGATE_CONFIG", &config)
        .output()
        .expect("check-config");
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && text.contains("configuration OK"),
        "{text}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(text.contains("a self-signed one will be made"), "{text}");
    assert!(text.contains("pop3.tls_listen: 0.0.0.0:1995"), "{text}");
}
