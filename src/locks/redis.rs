//! Maildrop locks in Redis, shared by every replica: one key per maildrop holding a random
//! per-session token with a TTL. Taken with `SET NX PX`, kept alive by a token-checking
//! renewal well inside the TTL, released by a token-checking delete, so a replica can never
//! renew or release a lock it no longer owns. A crashed replica's locks expire by
//! themselves after the TTL.

use super::{BoxFuture, HeldLock, LockBackend, LockError, MaildropLock};
use crate::metrics::{self, LockMetrics};
use crate::redis_conn::RedisConn;
use ::redis::Script;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument};

/// Prefix of every lock key, so the keys are easy to find and to grant in a Redis ACL
/// (`~mailgate:*`).
const KEY_PREFIX: &str = "mailgate:lock:";

/// Extends the lock only while it still holds our token. Returns 1 when extended, 0 when
/// the key is gone or belongs to another session.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0",
    )
});

/// Deletes the lock only while it still holds our token.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

/// The Redis key of a maildrop (`local@domain`, compared without regard to case).
pub fn lock_key(maildrop: &str) -> String {
    format!("{KEY_PREFIX}{}", maildrop.to_ascii_lowercase())
}

/// A `SCAN MATCH` pattern for the lock keys of every maildrop of `domain` (a validated,
/// lower-case name: no glob characters).
pub fn domain_lock_pattern(domain: &str) -> String {
    format!("{KEY_PREFIX}*@{}", domain.to_ascii_lowercase())
}

/// A fresh session token: 128 random bits from the thread's CSPRNG, as 32 hex digits,
/// so no two sessions (on any replica) ever share one.
pub fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// When a held lock is renewed and when its holder gives up, derived from the TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    /// Renew this long after the last confirmed renewal (a third of the TTL).
    pub every: Duration,
    /// After a failed renewal, try again this soon.
    pub retry: Duration,
    /// Declare the lock lost when it has not been confirmed for this long (two thirds of
    /// the TTL), which leaves a third of the TTL before Redis could hand it to anyone
    /// else. With the configured TTL at least three Redis timeouts, an attempt started
    /// before this point ends before the lock could expire.
    pub give_up_after: Duration,
}

impl Renewal {
    pub fn for_ttl(ttl: Duration) -> Renewal {
        Renewal {
            every: ttl / 3,
            retry: (ttl / 10).max(Duration::from_millis(100)),
            give_up_after: ttl * 2 / 3,
        }
    }
}

/// Maildrop locks in Redis.
#[derive(Clone)]
pub struct RedisLocks {
    inner: Arc<Inner>,
}

struct Inner {
    conn: RedisConn,
    ttl: Duration,
    /// Renewals and Redis errors, which only the backend sees.
    metrics: LockMetrics,
    /// Locks lost while held (taken by someone else, or not confirmed in time), for the
    /// `locks_lost_total` field of the log line.
    lost: AtomicU64,
}

impl RedisLocks {
    pub fn new(conn: RedisConn, ttl: Duration, metrics: LockMetrics) -> RedisLocks {
        RedisLocks {
            inner: Arc::new(Inner {
                conn,
                ttl,
                metrics,
                lost: AtomicU64::new(0),
            }),
        }
    }
}

impl Inner {
    fn ttl_ms(&self) -> String {
        self.ttl.as_millis().to_string()
    }

    /// True when the lock was ours and now runs for a full TTL again.
    async fn renew(
        &self,
        key: &str,
        token: &str,
    ) -> Result<bool, crate::redis_conn::RedisConnError> {
        let result: Result<i64, _> = self
            .conn
            .eval(&RENEW, &[key], &[token, &self.ttl_ms()])
            .await;
        match result {
            Ok(1) => {
                self.metrics.renewals_ok.inc();
                Ok(true)
            }
            Ok(_) => {
                self.metrics.renewals_failed.inc();
                Ok(false)
            }
            Err(e) => {
                self.metrics.renewals_failed.inc();
                self.redis_error(metrics::REDIS_RENEW);
                Err(e)
            }
        }
    }

    async fn delete_if_ours(
        &self,
        key: &str,
        token: &str,
    ) -> Result<(), crate::redis_conn::RedisConnError> {
        let result: Result<i64, _> = self.conn.eval(&RELEASE, &[key], &[token]).await;
        result
            .map(drop)
            .inspect_err(|_| self.redis_error(metrics::REDIS_RELEASE))
    }

    fn redis_error(&self, operation: &'static str) {
        self.metrics.redis_error(operation);
    }

    /// Marks the lock lost once: the session sees `lost` and ends without UPDATE.
    fn lose(&self, key: &str, lost: &CancellationToken, reason: &'static str) {
        if lost.is_cancelled() {
            return;
        }
        lost.cancel();
        let total = self.lost.fetch_add(1, Ordering::Relaxed) + 1;
        warn!(
            lock = key,
            reason,
            locks_lost_total = total,
            "maildrop lock lost; the session ends without UPDATE"
        );
    }
}

impl LockBackend for RedisLocks {
    fn acquire<'a>(&'a self, maildrop: &'a str) -> BoxFuture<'a, Result<MaildropLock, LockError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let key = lock_key(maildrop);
            let token = new_token();
            let sent = Instant::now();
            let mut set = ::redis::cmd("SET");
            set.arg(&key)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(inner.ttl_ms());
            match inner.conn.query::<Option<String>>(&set).await {
                Ok(Some(_)) => {}
                Ok(None) => return Err(LockError::Busy),
                Err(e) => {
                    inner.redis_error(metrics::REDIS_ACQUIRE);
                    // The SET may still have been applied after we stopped waiting: take it
                    // back if it is ours, so the user is not locked out for a whole TTL.
                    let inner = inner.clone();
                    let (key, token) = (key.clone(), token.clone());
                    tokio::spawn(async move {
                        let _ = inner.delete_if_ours(&key, &token).await;
                    });
                    return Err(LockError::Unavailable(e.to_string()));
                }
            }
            let held = RedisHeld {
                inner: inner.clone(),
                key,
                token,
                lost: CancellationToken::new(),
                stop: CancellationToken::new(),
                confirmed: Arc::new(Mutex::new(sent)),
            };
            tokio::spawn(held.keeper().instrument(tracing::Span::current()));
            Ok(MaildropLock::new(maildrop, Box::new(held)))
        })
    }

    /// Ready only while Redis answers a PING: without it no login can take its lock.
    fn health(&self) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(async move {
            self.inner.conn.ping().await.map(drop).map_err(|e| {
                self.inner.redis_error(metrics::REDIS_PING);
                LockError::Unavailable(e.to_string())
            })
        })
    }
}

struct RedisHeld {
    inner: Arc<Inner>,
    key: String,
    token: String,
    /// Cancelled when the lock is no longer ours.
    lost: CancellationToken,
    /// Stops the renewal task when the lock is released or dropped.
    stop: CancellationToken,
    /// When the request behind the last confirmed renewal (or the SET) was sent: Redis
    /// keeps the key for at least a TTL from then.
    confirmed: Arc<Mutex<Instant>>,
}

impl RedisHeld {
    fn keeper(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let inner = self.inner.clone();
        let (key, token) = (self.key.clone(), self.token.clone());
        let (lost, stop) = (self.lost.clone(), self.stop.clone());
        let confirmed = self.confirmed.clone();
        async move {
            let plan = Renewal::for_ttl(inner.ttl);
            let last = || *confirmed.lock().unwrap_or_else(|p| p.into_inner());
            let mut next = last() + plan.every;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(next) => {}
                }
                let give_up_at = last() + plan.give_up_after;
                if Instant::now() >= give_up_at {
                    inner.lose(&key, &lost, "not confirmed by redis in time");
                    return;
                }
                let sent = Instant::now();
                let renewed = inner.renew(&key, &token).await;
                // Released while the renewal was on its way: the release may have
                // deleted the key first, which is no loss.
                if stop.is_cancelled() {
                    return;
                }
                match renewed {
                    Ok(true) => {
                        *confirmed.lock().unwrap_or_else(|p| p.into_inner()) = sent;
                        next = sent + plan.every;
                    }
                    Ok(false) => {
                        inner.lose(&key, &lost, "taken over or expired");
                        return;
                    }
                    Err(e) => {
                        warn!(lock = key.as_str(), error = %e, "maildrop lock renewal failed; retrying");
                        next = (Instant::now() + plan.retry).min(give_up_at);
                    }
                }
            }
        }
    }
}

impl HeldLock for RedisHeld {
    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Renews the lock (token-checked), so the caller holds it for a full TTL from now:
    /// an UPDATE that follows cannot outlive it.
    fn still_held(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            if self.lost.is_cancelled() {
                return false;
            }
            let sent = Instant::now();
            match self.inner.renew(&self.key, &self.token).await {
                Ok(true) => {
                    *self.confirmed.lock().unwrap_or_else(|p| p.into_inner()) = sent;
                    true
                }
                Ok(false) => {
                    self.inner
                        .lose(&self.key, &self.lost, "taken over or expired");
                    false
                }
                Err(e) => {
                    warn!(lock = self.key.as_str(), error = %e, "cannot confirm the maildrop lock");
                    false
                }
            }
        })
    }

    fn release(self: Box<Self>) -> BoxFuture<'static, ()> {
        self.stop.cancel();
        Box::pin(async move {
            if let Err(e) = self.inner.delete_if_ours(&self.key, &self.token).await {
                warn!(
                    lock = self.key.as_str(),
                    error = %e,
                    "cannot release the maildrop lock; it expires after its TTL"
                );
            }
        })
    }
}

impl Drop for RedisHeld {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_per_maildrop_whatever_the_case() {
        assert_eq!(lock_key("joe@example.org"), "mailgate:lock:joe@example.org");
        assert_eq!(lock_key("Joe@Example.ORG"), lock_key("joe@example.org"));
        assert_ne!(lock_key("joe@example.org"), lock_key("joe@example.com"));
        assert_ne!(lock_key("a:b@example.org"), lock_key("a@b:example.org"));
    }

    #[test]
    fn tokens_are_128_random_bits_in_hex() {
        let tokens: std::collections::HashSet<String> = (0..1000).map(|_| new_token()).collect();
        assert_eq!(tokens.len(), 1000);
        for t in &tokens {
            assert_eq!(t.len(), 32);
            assert!(t
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
    }

    #[test]
    fn renewal_runs_well_inside_the_ttl() {
        let r = Renewal::for_ttl(Duration::from_secs(30));
        assert_eq!(r.every, Duration::from_secs(10));
        assert_eq!(r.retry, Duration::from_secs(3));
        assert_eq!(r.give_up_after, Duration::from_secs(20));
        let short = Renewal::for_ttl(Duration::from_millis(600));
        assert_eq!(short.retry, Duration::from_millis(100));
        for secs in [1, 3, 30, 3600] {
            let ttl = Duration::from_secs(secs);
            let r = Renewal::for_ttl(ttl);
            assert!(r.every < r.give_up_after && r.give_up_after < ttl, "{r:?}");
            // A renewal attempt started just before giving up, bounded by the Redis
            // timeout (at most a third of the TTL), still ends before the lock expires.
            assert!(r.give_up_after + ttl / 3 <= ttl);
        }
    }
}
