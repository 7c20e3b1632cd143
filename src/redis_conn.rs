//! The one Redis connection that the Redis lock backend, the login throttle and the
//! cluster's home records share: checks and redacts `redis_url`, keeps an auto-reconnecting
//! multiplexed connection (the `redis` crate's `ConnectionManager`) and bounds every call
//! with a timeout, so a slow or absent Redis costs a caller at most that long. With Redis
//! Sentinel addresses it asks the sentinels for the current master, and asks again after a
//! failure, so the connection follows a failover. Knows nothing about locks or POP3. Must
//! never log or return the URL's password: errors carry the redacted URL and are scrubbed.

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use ::redis::{
    ConnectionAddr, ConnectionInfo, FromRedisValue, IntoConnectionInfo, RedisResult, Script,
    TlsCertificates, TlsMode,
};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RedisConnError {
    /// `url` is already redacted.
    #[error("invalid redis_url {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot read redis_ca_file {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid {key}: {message}")]
    InvalidSentinel { key: &'static str, message: String },
    #[error("redis did not answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The text is scrubbed of the URL's password.
    #[error("redis: {0}")]
    Failed(String),
}

/// Shown instead of a secret.
const REDACTED: &str = "***";

/// `url` with its password replaced by `***`. A user-info without a colon may itself be a
/// password (`redis://secret@host`), so it is hidden whole; so is a query that mentions a
/// password (`redis+unix:///s?pass=...`), and a string that is not a URL at all, since
/// nothing tells which part of it is secret.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return REDACTED.to_owned();
    };
    let start = scheme_end + 3;
    // The last '@' ends the user-info even when an unencoded password holds '/', '?',
    // '#' or '@': redis URLs have no other place for an '@'.
    let (head, rest) = match url[start..].rfind('@').map(|i| start + i) {
        None => (url[..start].to_owned(), &url[start..]),
        Some(at) => {
            let shown = match url[start..at].split_once(':') {
                Some((user, _)) => format!("{user}:{REDACTED}"),
                None => REDACTED.to_owned(),
            };
            (format!("{}{shown}", &url[..start]), &url[at..])
        }
    };
    match rest.split_once('?') {
        Some((path, query)) if query.to_ascii_lowercase().contains("pass") => {
            format!("{head}{path}?{REDACTED}")
        }
        _ => format!("{head}{rest}"),
    }
}

/// The strings that must never appear in anything printed: the password as written in
/// the URL and percent-decoded (or a colon-less user-info, which may be a password).
fn secrets_of(url: &str) -> Vec<String> {
    let Some(scheme_end) = url.find("://") else {
        return vec![url.to_owned()];
    };
    let start = scheme_end + 3;
    let Some(at) = url[start..].rfind('@').map(|i| start + i) else {
        return Vec::new();
    };
    let userinfo = &url[start..at];
    let raw = match userinfo.split_once(':') {
        Some((_, password)) => password,
        None => userinfo,
    };
    let mut out = Vec::new();
    if !raw.is_empty() {
        out.push(raw.to_owned());
        let decoded = percent_decode(raw);
        if decoded != raw {
            out.push(decoded);
        }
    }
    out
}

/// Lossy percent-decoding, enough to know what a password looks like once decoded.
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                // Two hex digits make at most 0xff.
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `text` with every secret replaced by `***`.
fn scrub(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_owned(), |t, s| t.replace(s.as_str(), REDACTED))
}

/// Checks that `url` is a `redis://` or `rediss://` URL the client accepts, without any
/// I/O. Errors name the redacted URL only.
pub fn check_url(url: &str) -> Result<(), RedisConnError> {
    connection_info(url).map(|_| ())
}

fn connection_info(url: &str) -> Result<::redis::ConnectionInfo, RedisConnError> {
    let invalid = |reason: String| RedisConnError::InvalidUrl {
        url: redact_url(url),
        reason: scrub(&reason, &secrets_of(url)),
    };
    let scheme = url.split_once("://").map(|(s, _)| s);
    if !matches!(scheme, Some("redis" | "rediss")) {
        return Err(invalid(
            "use redis://HOST:PORT/DB or rediss://HOST:PORT/DB".into(),
        ));
    }
    url.into_connection_info()
        .map_err(|e| invalid(e.to_string()))
}

/// A Redis Sentinel set that names the master, instead of the fixed host of `redis_url`
/// (which then gives only the database, the credentials and TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sentinels {
    /// `host:port` of each sentinel (`[v6]:port` for an IPv6 literal).
    pub addrs: Vec<String>,
    /// The name the sentinels monitor the master under.
    pub master: String,
}

/// Splits a sentinel address `host:port` (`[::1]:26379` for IPv6) without any I/O. The
/// error says what is wrong; the caller names the key.
pub fn parse_sentinel_addr(addr: &str) -> Result<(String, u16), String> {
    let bad = |why: &str| Err(format!("{addr:?} is not host:port ({why})"));
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad("no port");
    };
    let host = match host.strip_prefix('[') {
        Some(v6) => match v6.strip_suffix(']') {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
            _ => return bad("a bracketed host must be an IPv6 address"),
        },
        None if host.contains(':') => return bad("write an IPv6 address as [addr]:port"),
        None => host,
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'));
    if !host_ok {
        return bad("empty host or a character a host name cannot hold");
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok((host.to_owned(), p)),
        _ => bad("the port must be 1 to 65535"),
    }
}

/// Checks a Sentinel set without any I/O: at least one address, each `host:port`, and a
/// master name. Errors name the key.
pub fn check_sentinels(s: &Sentinels) -> Result<(), RedisConnError> {
    if s.addrs.is_empty() {
        return Err(RedisConnError::InvalidSentinel {
            key: "locks.redis_sentinels",
            message: "name at least one sentinel".into(),
        });
    }
    for a in &s.addrs {
        parse_sentinel_addr(a).map_err(|message| RedisConnError::InvalidSentinel {
            key: "locks.redis_sentinels",
            message,
        })?;
    }
    let name_ok = !s.master.is_empty()
        && s.master
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if !name_ok {
        return Err(RedisConnError::InvalidSentinel {
            key: "locks.redis_sentinel_master",
            message: "the sentinels' name for the master is required with \
                      locks.redis_sentinels (e.g. \"mymaster\"; no spaces or quotes)"
                .into(),
        });
    }
    Ok(())
}

/// The shared connection. Cheap to clone; every clone uses the same connection.
#[derive(Clone)]
pub struct RedisConn {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    config: ConnectionManagerConfig,
    current: Mutex<Current>,
    timeout: Duration,
    /// The URL with its password hidden, for logs and messages.
    url: String,
    secrets: Vec<String>,
}

/// Where the master is.
enum Target {
    /// At `redis_url`'s host, always.
    Fixed(::redis::Client),
    /// Wherever the sentinels say. The async mutex lets one caller ask while the others
    /// wait for its answer instead of asking too; `master` is the last address found, so a
    /// change is logged once.
    Sentinel {
        client: tokio::sync::Mutex<SentinelClient>,
        master: Mutex<Option<String>>,
    },
}

struct Current {
    /// `None` (Sentinel only) until the sentinels have been asked, and again after a
    /// failure: the next call asks them where the master is now.
    manager: Option<ConnectionManager>,
    since: Instant,
}

/// A `SentinelClient` that reaches the master with `info`'s database, credentials and TLS
/// (and `certs` as the trusted roots). The sentinels are asked without credentials, over
/// TLS when `info` is TLS.
fn sentinel_client(
    info: &ConnectionInfo,
    sentinels: &Sentinels,
    certs: Option<TlsCertificates>,
) -> Result<SentinelClient, String> {
    let tls = match info.addr() {
        ConnectionAddr::TcpTls { insecure, .. } => Some(*insecure),
        _ => None,
    };
    let mut addrs = Vec::with_capacity(sentinels.addrs.len());
    for a in &sentinels.addrs {
        let (host, port) = parse_sentinel_addr(a)?;
        addrs.push(match tls {
            None => ConnectionAddr::Tcp(host, port),
            Some(insecure) => ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                tls_params: None,
            },
        });
    }
    let redis = info.redis_settings();
    let mut builder =
        SentinelClientBuilder::new(addrs, &sentinels.master, SentinelServerType::Master)
            .map_err(|e| e.to_string())?
            .set_client_to_redis_db(redis.db())
            .set_client_to_redis_protocol(redis.protocol());
    if let Some(user) = redis.username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = redis.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(insecure) = tls {
        let mode = if insecure {
            TlsMode::Insecure
        } else {
            TlsMode::Secure
        };
        builder = builder.set_client_to_redis_tls_mode(mode);
        if let Some(certs) = certs {
            builder = builder
                .set_client_to_sentinel_certificates(certs.clone())
                .set_client_to_redis_certificates(certs);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

impl RedisConn {
    /// Prepares the connection without connecting (the first call connects), so a server
    /// starts while Redis is down and recovers when it comes up. Must run inside a tokio
    /// runtime. `ca_file` replaces the system roots for `rediss://`. With `sentinels` the
    /// master is the one they name, found on the first call and again after each failure;
    /// `url` then gives only the database, the credentials and TLS.
    pub fn open(
        url: &str,
        ca_file: Option<&Path>,
        sentinels: Option<&Sentinels>,
        timeout: Duration,
    ) -> Result<RedisConn, RedisConnError> {
        let info = connection_info(url)?;
        let secrets = secrets_of(url);
        let invalid = |reason: String| RedisConnError::InvalidUrl {
            url: redact_url(url),
            reason: scrub(&reason, &secrets),
        };
        let certs = match ca_file {
            None => None,
            Some(path) => {
                let root_cert = std::fs::read(path).map_err(|source| RedisConnError::CaFile {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                })
            }
        };
        let target = match sentinels {
            Some(s) => {
                check_sentinels(s)?;
                let client = sentinel_client(&info, s, certs).map_err(|reason| {
                    RedisConnError::InvalidSentinel {
                        key: "locks.redis_sentinels",
                        message: scrub(&reason, &secrets),
                    }
                })?;
                Target::Sentinel {
                    client: tokio::sync::Mutex::new(client),
                    master: Mutex::new(None),
                }
            }
            None => Target::Fixed(
                match certs {
                    None => ::redis::Client::open(info),
                    Some(certs) => ::redis::Client::build_with_tls(info, certs),
                }
                .map_err(|e| invalid(e.to_string()))?,
            ),
        };
        // One reconnect attempt per failure, shared by every waiting caller: while Redis
        // is down each call fails at once (or at `timeout`) instead of queueing behind a
        // retry schedule, and nothing piles up.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(0);
        let manager = match &target {
            Target::Fixed(client) => Some(
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map_err(|e| RedisConnError::Failed(scrub(&e.to_string(), &secrets)))?,
            ),
            Target::Sentinel { .. } => None,
        };
        Ok(RedisConn {
            inner: Arc::new(Inner {
                target,
                config,
                current: Mutex::new(Current {
                    manager,
                    since: Instant::now(),
                }),
                timeout,
                url: redact_url(url),
                secrets,
            }),
        })
    }

    /// The URL with its password hidden.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    fn cached(&self) -> Option<ConnectionManager> {
        let current = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        current.manager.clone()
    }

    /// The connection to the master; with Sentinel, asks the sentinels first when there is
    /// none. Runs inside the caller's timeout.
    async fn manager(&self) -> RedisResult<ConnectionManager> {
        if let Some(manager) = self.cached() {
            return Ok(manager);
        }
        match &self.inner.target {
            // Only `failed` empties the slot, and for a fixed target it refills it.
            Target::Fixed(client) => {
                ConnectionManager::new_lazy_with_config(client.clone(), self.inner.config.clone())
            }
            Target::Sentinel { client, master } => {
                let mut sentinel = client.lock().await;
                // Another caller may have found the master while this one waited.
                if let Some(manager) = self.cached() {
                    return Ok(manager);
                }
                // Boxed: the crate's lookup is a deep future, and every caller's future
                // would otherwise contain it (past rustc's layout depth limit in POP3 login).
                let found = Box::pin(sentinel.async_get_client()).await?;
                let address = found.get_connection_info().addr().to_string();
                let manager =
                    ConnectionManager::new_lazy_with_config(found, self.inner.config.clone())?;
                let mut current = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
                *current = Current {
                    manager: Some(manager.clone()),
                    since: Instant::now(),
                };
                let mut last = master.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_deref() != Some(address.as_str()) {
                    tracing::info!(master = %address, "redis master named by sentinel");
                    *last = Some(address);
                }
                Ok(manager)
            }
        }
    }

    /// Replaces the connection after a failure, at most once per timeout period. The
    /// manager reconnects by itself after I/O errors, but not after every failure (a
    /// half-open socket only times out; an error while reconnecting that is not I/O,
    /// such as a Redis still loading its data, leaves it failed for good), so a fresh one
    /// is the way back in every case. With Sentinel the slot is emptied instead, so the
    /// next call asks the sentinels where the master is now (a failover, or a demoted
    /// master answering READONLY).
    fn failed(&self) {
        let mut current = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.since.elapsed() < self.inner.timeout {
            return;
        }
        match &self.inner.target {
            Target::Sentinel { .. } => current.manager = None,
            Target::Fixed(client) => {
                match ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    self.inner.config.clone(),
                ) {
                    Ok(manager) => {
                        *current = Current {
                            manager: Some(manager),
                            since: Instant::now(),
                        }
                    }
                    Err(e) => tracing::warn!(
                        error = %scrub(&e.to_string(), &self.inner.secrets),
                        "cannot renew the redis connection"
                    ),
                }
            }
        }
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, RedisConnError> {
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.failed();
                Err(RedisConnError::Failed(scrub(
                    &e.to_string(),
                    &self.inner.secrets,
                )))
            }
            Err(_) => {
                self.failed();
                Err(RedisConnError::Timeout(self.inner.timeout))
            }
        }
    }

    /// Runs one command within the timeout.
    pub async fn query<T: FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T, RedisConnError> {
        self.bounded(async {
            let mut conn = self.manager().await?;
            cmd.query_async(&mut conn).await
        })
        .await
    }

    /// Runs a Lua script (EVALSHA, loading it when Redis does not know it) within the
    /// timeout.
    pub async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, RedisConnError> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(*k);
        }
        for a in args {
            invocation.arg(*a);
        }
        self.bounded(async {
            let mut conn = self.manager().await?;
            invocation.invoke_async(&mut conn).await
        })
        .await
    }

    /// PING; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, RedisConnError> {
        let started = Instant::now();
        let pong: String = self.query(&::redis::cmd("PING")).await?;
        if pong != "PONG" {
            return Err(RedisConnError::Failed(format!(
                "unexpected PING answer {pong:?}"
            )));
        }
        Ok(started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_every_form_of_password() {
        let cases = [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            (
                "redis://:s3cret@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            ("redis://mail:s3cret@h:1/2", "redis://mail:***@h:1/2"),
            ("rediss://mail:s3cret@h/", "rediss://mail:***@h/"),
            // A user-info without a colon may be a bare password.
            ("redis://s3cret@h:6379", "redis://***@h:6379"),
            // Unencoded '/', '#', '@' and '?' in the password.
            ("redis://u:s3/c#r@t?x@h:1/0", "redis://u:***@h:1/0"),
            ("redis://:@h", "redis://:***@h"),
            ("not a url with s3cret", "***"),
            (
                "redis+unix:///r.sock?db=1&pass=s3cret",
                "redis+unix:///r.sock?***",
            ),
            (
                "redis://h:1/0?protocol=resp3",
                "redis://h:1/0?protocol=resp3",
            ),
        ];
        for (url, want) in cases {
            let got = redact_url(url);
            assert_eq!(got, want, "{url}");
            assert!(!got.contains("s3"), "{got}");
        }
    }

    #[test]
    fn secrets_include_the_decoded_password() {
        assert_eq!(
            secrets_of("redis://u:p%40ss%2Fw@h"),
            vec!["p%40ss%2Fw".to_owned(), "p@ss/w".to_owned()]
        );
        assert_eq!(secrets_of("redis://h:1"), Vec::<String>::new());
        assert_eq!(secrets_of("redis://tok@h"), vec!["tok".to_owned()]);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
        let text = "auth failed for p@ss/w (p%40ss%2Fw)";
        let scrubbed = scrub(text, &secrets_of("redis://u:p%40ss%2Fw@h"));
        assert_eq!(scrubbed, "auth failed for *** (***)");
    }

    #[test]
    fn sentinel_addresses_are_host_and_port() {
        for (addr, host, port) in [
            ("127.0.0.1:26379", "127.0.0.1", 26379),
            (
                "sentinel-0.sentinel.redis.svc:26379",
                "sentinel-0.sentinel.redis.svc",
                26379,
            ),
            ("[::1]:26380", "::1", 26380),
            ("s_1:1", "s_1", 1),
        ] {
            assert_eq!(
                parse_sentinel_addr(addr),
                Ok((host.to_owned(), port)),
                "{addr}"
            );
        }
        for bad in [
            "",
            "host",
            ":26379",
            "host:",
            "host:0",
            "host:65536",
            "host:port",
            "::1:26379",
            "[nope]:26379",
            "redis://host:26379",
            "user@host:26379",
            "two words:26379",
        ] {
            assert!(parse_sentinel_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sentinel_sets_need_addresses_and_a_master() {
        let set = |addrs: &[&str], master: &str| Sentinels {
            addrs: addrs.iter().map(|a| a.to_string()).collect(),
            master: master.into(),
        };
        assert!(check_sentinels(&set(&["127.0.0.1:26379"], "mymaster")).is_ok());
        let key_of = |s: &Sentinels| match check_sentinels(s) {
            Err(RedisConnError::InvalidSentinel { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(key_of(&set(&[], "m")), "locks.redis_sentinels");
        assert_eq!(key_of(&set(&["h"], "m")), "locks.redis_sentinels");
        assert_eq!(key_of(&set(&["h:1"], "")), "locks.redis_sentinel_master");
        assert_eq!(key_of(&set(&["h:1"], "a b")), "locks.redis_sentinel_master");
    }

    /// Opening with sentinels does no I/O, and nothing it reports shows the password.
    #[tokio::test]
    async fn sentinel_open_checks_without_io_and_hides_the_password() {
        let s = Sentinels {
            addrs: vec!["127.0.0.1:1".into()],
            master: "mymaster".into(),
        };
        let url = "redis://:topsecret@ignored:6379/2";
        let conn = RedisConn::open(url, None, Some(&s), Duration::from_millis(300))
            .expect("no I/O at open");
        assert_eq!(conn.url(), "redis://:***@ignored:6379/2");
        // Nobody listens on port 1: the call fails, within the timeout, without the secret.
        let e = conn.ping().await.expect_err("no sentinel").to_string();
        assert!(!e.contains("topsecret"), "{e}");
        let bad = Sentinels {
            addrs: vec!["nope".into()],
            master: "m".into(),
        };
        let e = RedisConn::open(url, None, Some(&bad), Duration::from_secs(1))
            .err()
            .expect("bad address")
            .to_string();
        assert!(e.contains("locks.redis_sentinels"), "{e}");
        assert!(!e.contains("topsecret"), "{e}");
    }

    #[test]
    fn url_checks_name_only_the_redacted_url() {
        assert!(check_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_url("rediss://u:pw@localhost/1").is_ok());
        for bad in [
            "http://:topsecret@h/",
            "redis://:topsecret@h:notaport/0",
            "redis://:topsecret@h:6379/notadb",
            "topsecret",
            "redis+unix:///tmp/r.sock?pass=topsecret",
        ] {
            let e = check_url(bad).expect_err(bad).to_string();
            assert!(!e.contains("topsecret"), "{bad}: {e}");
            assert!(e.contains("redis_url"), "{e}");
        }
    }
}
