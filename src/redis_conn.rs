//! The one Redis connection that the Redis lock backend and the login throttle share:
//! checks and redacts `redis_url`, keeps an auto-reconnecting multiplexed connection (the
//! `redis` crate's `ConnectionManager`) and bounds every call with a timeout, so a slow or
//! absent Redis costs a caller at most that long. Knows nothing about locks or POP3. Must
//! never log or return the URL's password: errors carry the redacted URL and are scrubbed.

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{FromRedisValue, IntoConnectionInfo, Script};
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

/// The shared connection. Cheap to clone; every clone uses the same connection.
#[derive(Clone)]
pub struct RedisConn {
    inner: Arc<Inner>,
}

struct Inner {
    client: ::redis::Client,
    config: ConnectionManagerConfig,
    current: Mutex<Current>,
    timeout: Duration,
    /// The URL with its password hidden, for logs and messages.
    url: String,
    secrets: Vec<String>,
}

struct Current {
    manager: ConnectionManager,
    since: Instant,
}

impl RedisConn {
    /// Prepares the connection without connecting (the first call connects), so a server
    /// starts while Redis is down and recovers when it comes up. Must run inside a tokio
    /// runtime. `ca_file` replaces the system roots for `rediss://`.
    pub fn open(
        url: &str,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<RedisConn, RedisConnError> {
        let info = connection_info(url)?;
        let secrets = secrets_of(url);
        let client = match ca_file {
            None => ::redis::Client::open(info),
            Some(path) => {
                let root_cert = std::fs::read(path).map_err(|source| RedisConnError::CaFile {
                    path: path.to_path_buf(),
                    source,
                })?;
                ::redis::Client::build_with_tls(
                    info,
                    ::redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
            }
        }
        .map_err(|e| RedisConnError::InvalidUrl {
            url: redact_url(url),
            reason: scrub(&e.to_string(), &secrets),
        })?;
        // One reconnect attempt per failure, shared by every waiting caller: while Redis
        // is down each call fails at once (or at `timeout`) instead of queueing behind a
        // retry schedule, and nothing piles up.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(0);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| RedisConnError::Failed(scrub(&e.to_string(), &secrets)))?;
        Ok(RedisConn {
            inner: Arc::new(Inner {
                client,
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

    fn manager(&self) -> ConnectionManager {
        let current = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        current.manager.clone()
    }

    /// Replaces the connection after a failure, at most once per timeout period. The
    /// manager reconnects by itself after I/O errors, but not after every failure (a
    /// half-open socket only times out; an error while reconnecting that is not I/O,
    /// such as a Redis still loading its data, leaves it failed for good), so a fresh one
    /// is the way back in every case.
    fn failed(&self) {
        let mut current = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.since.elapsed() < self.inner.timeout {
            return;
        }
        match ConnectionManager::new_lazy_with_config(
            self.inner.client.clone(),
            self.inner.config.clone(),
        ) {
            Ok(manager) => {
                *current = Current {
                    manager,
                    since: Instant::now(),
                }
            }
            Err(e) => tracing::warn!(
                error = %scrub(&e.to_string(), &self.inner.secrets),
                "cannot renew the redis connection"
            ),
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
        let mut conn = self.manager();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    /// Runs a Lua script (EVALSHA, loading it when Redis does not know it) within the
    /// timeout.
    pub async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, RedisConnError> {
        let mut conn = self.manager();
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(*k);
        }
        for a in args {
            invocation.arg(*a);
        }
        self.bounded(invocation.invoke_async(&mut conn)).await
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
