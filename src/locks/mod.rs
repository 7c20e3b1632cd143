//! Exclusive maildrop locks (RFC 1939 §8: from authentication to the end of the session)
//! behind the `LockBackend` trait: `LocalLocks` in process for one replica, `RedisLocks`
//! in Redis for several. Knows nothing about POP3 or the store.

mod redis;

pub use self::redis::{domain_lock_pattern, RedisLocks};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another session holds the maildrop.
    #[error("maildrop is in use")]
    Busy,
    /// The lock service could not answer (a temporary failure).
    #[error("lock backend unavailable: {0}")]
    Unavailable(String),
}

/// Hands out maildrop locks keyed by a normalised `local@domain`.
pub trait LockBackend: Send + Sync + 'static {
    /// Takes the lock at once or fails with `Busy`; never waits for another holder.
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<MaildropLock, LockError>>;

    /// Whether the backend can hand out locks now (`/readyz`); a shared backend checks
    /// its service, the in-process one always can.
    fn health(&self) -> BoxFuture<'_, Result<(), LockError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Microseconds since the Unix epoch: lock log lines carry the wall clock so the
/// lines of several replicas on one host can be put in one order.
fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One held lock, as a backend implements it.
pub trait HeldLock: Send + Sync {
    /// Cancelled when the backend learns the lock is no longer ours.
    fn lost(&self) -> CancellationToken;
    /// Asks the backend whether the lock is still ours (checked before UPDATE).
    fn still_held(&self) -> BoxFuture<'_, bool>;
    /// Gives the lock up.
    fn release(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// A held maildrop lock; released by `release` or, as a fallback, on drop.
///
/// Logs `maildrop locked` when made and `maildrop unlocked` just before the backend gives
/// the lock up, each with `at_us` (wall clock), so the holders of one maildrop can be
/// audited across replicas.
pub struct MaildropLock {
    maildrop: String,
    inner: Option<Box<dyn HeldLock>>,
}

impl MaildropLock {
    /// Wraps a lock the backend has just taken.
    pub fn new(maildrop: &str, inner: Box<dyn HeldLock>) -> Self {
        info!(maildrop, at_us = unix_micros(), "maildrop locked");
        MaildropLock {
            maildrop: maildrop.to_owned(),
            inner: Some(inner),
        }
    }

    pub fn lost(&self) -> CancellationToken {
        match &self.inner {
            Some(l) => l.lost(),
            None => {
                let t = CancellationToken::new();
                t.cancel();
                t
            }
        }
    }

    pub async fn still_held(&self) -> bool {
        match &self.inner {
            Some(l) => l.still_held().await,
            None => false,
        }
    }

    pub async fn release(mut self) {
        if let Some(l) = self.inner.take() {
            self.log_unlocked();
            l.release().await;
        }
    }

    fn log_unlocked(&self) {
        info!(
            maildrop = self.maildrop.as_str(),
            at_us = unix_micros(),
            "maildrop unlocked"
        );
    }
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        if let Some(l) = self.inner.take() {
            self.log_unlocked();
            // Backends whose release needs I/O finish it in the background; the local
            // backend releases synchronously inside `release()` before the first await.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(l.release());
            }
        }
    }
}

/// In-process locks: correct for a single replica only.
#[derive(Default, Clone)]
pub struct LocalLocks {
    held: Arc<Mutex<HashSet<String>>>,
}

impl LocalLocks {
    pub fn new() -> Self {
        Self::default()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // A panic while holding this mutex cannot leave the set inconsistent (single
        // insert/remove), so a poisoned lock is still usable.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of maildrops locked now.
    pub fn count(&self) -> usize {
        self.held().len()
    }
}

impl LockBackend for LocalLocks {
    fn acquire<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<MaildropLock, LockError>> {
        let result = if self.held().insert(key.to_owned()) {
            Ok(MaildropLock::new(
                key,
                Box::new(LocalHeld {
                    locks: self.clone(),
                    key: Some(key.to_owned()),
                    lost: CancellationToken::new(),
                }),
            ))
        } else {
            Err(LockError::Busy)
        };
        Box::pin(std::future::ready(result))
    }
}

struct LocalHeld {
    locks: LocalLocks,
    key: Option<String>,
    lost: CancellationToken,
}

impl LocalHeld {
    fn unlock(&mut self) {
        if let Some(key) = self.key.take() {
            self.locks.held().remove(&key);
        }
    }
}

impl HeldLock for LocalHeld {
    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    fn still_held(&self) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(self.key.is_some()))
    }

    fn release(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        self.unlock();
        Box::pin(std::future::ready(()))
    }
}

impl Drop for LocalHeld {
    fn drop(&mut self) {
        self.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exclusive_until_released() {
        let locks = LocalLocks::new();
        let a = locks.acquire("joe@example.org").await.expect("first");
        assert!(matches!(
            locks.acquire("joe@example.org").await,
            Err(LockError::Busy)
        ));
        let b = locks
            .acquire("joe@example.com")
            .await
            .expect("other maildrop");
        assert!(a.still_held().await);
        assert_eq!(locks.count(), 2);
        a.release().await;
        let again = locks
            .acquire("joe@example.org")
            .await
            .expect("after release");
        drop(again);
        drop(b);
        assert_eq!(locks.count(), 0);
    }

    #[tokio::test]
    async fn dropped_lock_is_released() {
        let locks = LocalLocks::new();
        {
            let _held = locks.acquire("a@b").await.expect("lock");
            assert!(locks.acquire("a@b").await.is_err());
        }
        assert!(locks.acquire("a@b").await.is_ok());
        assert!(!locks
            .acquire("a@b")
            .await
            .expect("free")
            .lost()
            .is_cancelled());
    }
}
