//! A cache of recently verified password logins, so a client that logs in every few
//! minutes costs one argon2id run per TTL instead of one per login (Dovecot's
//! `auth_cache` plays the same role). It holds only keyed digests, never a password,
//! and an entry counts only while the account's stored hash is unchanged, so a password
//! change takes effect at once.

use super::hmac_sha256;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Login digest → (when verified, digest of the stored hash it was verified against).
type Entries = HashMap<[u8; 32], (Instant, [u8; 32])>;

pub struct VerifiedCache {
    /// Random per process: digests are useless outside it.
    key: [u8; 32],
    ttl: Duration,
    capacity: usize,
    entries: Mutex<Entries>,
}

impl VerifiedCache {
    /// A cache keeping entries for `ttl`, at most `capacity` of them; a zero TTL or
    /// capacity disables it.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        VerifiedCache {
            key: rand::random(),
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.capacity > 0
    }

    fn digests(&self, address: &str, password: &[u8], phc: &str) -> ([u8; 32], [u8; 32]) {
        let login = hmac_sha256(&self.key, &[address.as_bytes(), b"\0", password]);
        let stored = hmac_sha256(&self.key, &[phc.as_bytes()]);
        (login, stored)
    }

    /// True when this address logged in with this password within the TTL and its
    /// stored hash is still `phc`.
    pub fn check(&self, address: &str, password: &[u8], phc: &str) -> bool {
        if !self.enabled() {
            return false;
        }
        let (login, stored) = self.digests(address, password, phc);
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        matches!(entries.get(&login), Some((at, s)) if at.elapsed() < self.ttl && *s == stored)
    }

    /// Records a successful verification.
    pub fn insert(&self, address: &str, password: &[u8], phc: &str) {
        if !self.enabled() {
            return;
        }
        let (login, stored) = self.digests(address, password, phc);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(login, (Instant::now(), stored));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_only_for_same_password_and_hash() {
        let c = VerifiedCache::new(Duration::from_secs(60), 10);
        assert!(!c.check("a@b", b"pw", "$argon2id$1"));
        c.insert("a@b", b"pw", "$argon2id$1");
        assert!(c.check("a@b", b"pw", "$argon2id$1"));
        assert!(!c.check("a@b", b"pw2", "$argon2id$1"), "other password");
        assert!(!c.check("c@b", b"pw", "$argon2id$1"), "other user");
        assert!(
            !c.check("a@b", b"pw", "$argon2id$2"),
            "password was changed"
        );
    }

    #[test]
    fn expiry_capacity_and_disabled() {
        let c = VerifiedCache::new(Duration::from_millis(0), 10);
        c.insert("a@b", b"pw", "h");
        assert!(!c.check("a@b", b"pw", "h"));
        let c = VerifiedCache::new(Duration::from_secs(60), 2);
        for i in 0..5 {
            c.insert(&format!("u{i}@b"), b"pw", "h");
            assert!(c.len() <= 2);
        }
        assert!(c.check("u4@b", b"pw", "h"));
    }
}
