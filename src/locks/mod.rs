//! Exclusive maildrop locks (RFC 1939 §8: from authentication to the end of the session)
//! behind the `LockBackend` trait. This module ships the in-process backend; a shared
//! backend (Redis) plugs in behind the same trait. Knows nothing about POP3 or the store.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

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
pub struct MaildropLock {
    inner: Option<Box<dyn HeldLock>>,
}

impl MaildropLock {
    pub fn new(inner: Box<dyn HeldLock>) -> Self {
        MaildropLock { inner: Some(inner) }
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
            l.release().await;
        }
    }
}

impl Drop for MaildropLock {
    fn drop(&mut self) {
        if let Some(l) = self.inner.take() {
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
            Ok(MaildropLock::new(Box::new(LocalHeld {
                locks: self.clone(),
                key: Some(key.to_owned()),
                lost: CancellationToken::new(),
            })))
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
