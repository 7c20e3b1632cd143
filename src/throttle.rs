//! Failed-login throttling per client IP and per account name, in fixed windows: counted
//! in process for a single replica, or in Redis with expiring keys so the limits hold
//! across replicas. Names are counted whether or not such an account exists, so a
//! throttled answer reveals nothing about accounts. A client IP is counted as its group
//! (`config::client_group`: IPv6 by its `/ipv6_prefix_len` network, IPv4-mapped IPv6 as
//! IPv4), so a host cannot dodge the limit by changing addresses within its network.
//! Knows nothing about POP3.

use crate::config::{client_group, LimitsConfig};
use crate::redis_conn::{RedisConn, RedisConnError};
use ::redis::Script;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};
use tracing::warn;

/// The limits, shared by both implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Failures from one client IP per window before its logins are refused.
    pub per_ip: u32,
    /// Failures for one login name per window before logins to it are refused; 0 = off.
    pub per_account: u32,
    pub window: Duration,
    /// IPv6 clients are counted by their network of this many bits.
    pub ipv6_prefix_len: u8,
}

impl Limits {
    /// The `[limits]` failure counts and their window.
    pub fn from_config(limits: &LimitsConfig) -> Limits {
        Limits {
            per_ip: limits.max_auth_failures_per_ip,
            per_account: limits.max_auth_failures_per_account,
            window: limits.auth_failure_window(),
            ipv6_prefix_len: limits.ipv6_prefix_len,
        }
    }

    /// The address failures from `ip` are counted under.
    fn group(&self, ip: IpAddr) -> IpAddr {
        client_group(ip, self.ipv6_prefix_len)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("login throttle unavailable: {0}")]
pub struct ThrottleError(#[from] RedisConnError);

/// Where failures are counted.
pub enum Throttle {
    Local(LocalThrottle),
    Redis(RedisThrottle),
}

impl Throttle {
    pub fn local(limits: Limits) -> Throttle {
        Throttle::Local(LocalThrottle::new(limits))
    }

    pub fn redis(conn: RedisConn, limits: Limits) -> Throttle {
        Throttle::Redis(RedisThrottle { conn, limits })
    }

    /// True when `ip`, or the login name `account` (when known), has used up its failures
    /// for the current window.
    pub async fn is_blocked(
        &self,
        ip: IpAddr,
        account: Option<&str>,
    ) -> Result<bool, ThrottleError> {
        match self {
            Throttle::Local(t) => Ok(t.is_blocked(ip, account)),
            Throttle::Redis(t) => t.is_blocked(ip, account).await,
        }
    }

    /// Counts one failed login. A failure to count is logged, not returned: the login
    /// has failed either way.
    pub async fn record_failure(&self, ip: IpAddr, account: Option<&str>) {
        match self {
            Throttle::Local(t) => t.record_failure(ip, account),
            Throttle::Redis(t) => {
                if let Err(e) = t.record_failure(ip, account).await {
                    warn!(error = %e, "cannot count a failed login");
                }
            }
        }
    }
}

/// Longest login name kept as a key; longer names are cut (none can be an account).
const MAX_NAME: usize = 320;

/// The form of a login name that failures are counted under: trimmed, lower-case (as
/// addresses are stored), at most `MAX_NAME` bytes.
pub fn account_key(name: &str) -> String {
    let mut name = name.trim().to_ascii_lowercase();
    if name.len() > MAX_NAME {
        let mut end = MAX_NAME;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

/// In-process counters: correct for a single replica only.
pub struct LocalThrottle {
    limits: Limits,
    ips: Windows<IpAddr>,
    accounts: Windows<String>,
}

impl LocalThrottle {
    pub fn new(limits: Limits) -> Self {
        LocalThrottle {
            limits,
            ips: Windows::new(limits.per_ip, limits.window),
            accounts: Windows::new(limits.per_account, limits.window),
        }
    }

    pub fn is_blocked(&self, ip: IpAddr, account: Option<&str>) -> bool {
        self.ips.is_blocked(&self.limits.group(ip))
            || account.is_some_and(|a| self.accounts.is_blocked(&account_key(a)))
    }

    pub fn record_failure(&self, ip: IpAddr, account: Option<&str>) {
        self.ips.record(self.limits.group(ip));
        if let Some(a) = account {
            self.accounts.record(account_key(a));
        }
    }
}

/// Entries kept at most per map, so a flood of source addresses or names cannot grow
/// memory without bound.
const MAX_ENTRIES: usize = 100_000;

/// Counts per key in fixed windows that start at a key's first event, in at most a fixed
/// number of entries. Used for failed logins here and for unknown recipients by `smtp`.
pub struct Windows<K> {
    /// 0 turns this limit off.
    max: u32,
    window: Duration,
    /// Most keys kept; see [`Windows::record`] for what gives way when it is reached.
    capacity: usize,
    counts: Mutex<HashMap<K, (u32, Instant)>>,
}

impl<K: Hash + Eq + Clone> Windows<K> {
    /// At most `max` events per key in `window` (0: off), in at most 100 000 keys.
    pub fn new(max: u32, window: Duration) -> Self {
        Self::with_capacity(max, window, MAX_ENTRIES)
    }

    pub fn with_capacity(max: u32, window: Duration, capacity: usize) -> Self {
        Windows {
            max,
            window,
            capacity: capacity.max(1),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// The events counted for `key` in its current window.
    pub fn count(&self, key: &K) -> u32 {
        let map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some((n, start)) if start.elapsed() < self.window => *n,
            _ => 0,
        }
    }

    /// Whether `key` has used up its events for the current window.
    pub fn is_blocked(&self, key: &K) -> bool {
        self.max != 0 && self.count(key) >= self.max
    }

    /// Counts one event for `key` and returns its count in the current window. When the
    /// map is full, expired windows go first; if that frees nothing, the eighth of the
    /// keys with the fewest events (the oldest among equals) is dropped, so keys at or
    /// near their limit are the last to be forgotten.
    pub fn record(&self, key: K) -> u32 {
        if self.max == 0 {
            return 0;
        }
        // A panic while holding this mutex cannot leave the map inconsistent (single
        // inserts and removals), so a poisoned lock is still usable.
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity && !map.contains_key(&key) {
            let window = self.window;
            map.retain(|_, (_, start)| start.elapsed() < window);
            if map.len() >= self.capacity {
                evict_fewest(&mut map, self.capacity / 8 + 1);
            }
        }
        let entry = map.entry(key).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= self.window {
            *entry = (0, Instant::now());
        }
        entry.0 = entry.0.saturating_add(1);
        entry.0
    }

    /// Keys held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Removes the `n` entries with the fewest events, the oldest first among equals.
fn evict_fewest<K: Hash + Eq + Clone>(map: &mut HashMap<K, (u32, Instant)>, n: usize) {
    let mut ranked: Vec<(u32, Instant, K)> = map
        .iter()
        .map(|(k, (count, start))| (*count, *start, k.clone()))
        .collect();
    let n = n.min(ranked.len());
    if n == 0 {
        return;
    }
    ranked.select_nth_unstable_by(n - 1, |a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    for (_, _, key) in ranked.into_iter().take(n) {
        map.remove(&key);
    }
}

/// Counters in Redis, one expiring key per client IP and per login name.
pub struct RedisThrottle {
    conn: RedisConn,
    limits: Limits,
}

/// Adds one to each key; a key's first failure starts its window (the key expires with
/// it), as in the in-process counters.
static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"for _, key in ipairs(KEYS) do
    if redis.call('INCR', key) == 1 then
        redis.call('PEXPIRE', key, ARGV[1])
    end
end
return 0",
    )
});

/// The Redis key counting failures from the client group `group` (an IPv6 group
/// carries its prefix length, e.g. `2001:db8::/64`).
pub fn ip_key(group: IpAddr, ipv6_prefix_len: u8) -> String {
    match group {
        IpAddr::V4(v4) => format!("mailgate:authfail:ip:{v4}"),
        IpAddr::V6(v6) => format!("mailgate:authfail:ip:{v6}/{ipv6_prefix_len}"),
    }
}

/// The Redis key counting failures for a login name.
pub fn name_key(name: &str) -> String {
    format!("mailgate:authfail:user:{}", account_key(name))
}

impl RedisThrottle {
    async fn is_blocked(&self, ip: IpAddr, account: Option<&str>) -> Result<bool, ThrottleError> {
        let mut get = ::redis::cmd("MGET");
        get.arg(ip_key(self.limits.group(ip), self.limits.ipv6_prefix_len));
        let per_account = account.filter(|_| self.limits.per_account > 0);
        if let Some(a) = per_account {
            get.arg(name_key(a));
        }
        let counts: Vec<Option<u64>> = self.conn.query(&get).await?;
        let ip_count = counts.first().copied().flatten().unwrap_or(0);
        let name_count = counts.get(1).copied().flatten().unwrap_or(0);
        Ok(ip_count >= u64::from(self.limits.per_ip)
            || (per_account.is_some() && name_count >= u64::from(self.limits.per_account)))
    }

    async fn record_failure(&self, ip: IpAddr, account: Option<&str>) -> Result<(), ThrottleError> {
        let ip = ip_key(self.limits.group(ip), self.limits.ipv6_prefix_len);
        let name = account
            .filter(|_| self.limits.per_account > 0)
            .map(name_key);
        let mut keys = vec![ip.as_str()];
        if let Some(n) = &name {
            keys.push(n.as_str());
        }
        let window = self.limits.window.as_millis().to_string();
        let _: i64 = self.conn.eval(&RECORD, &keys, &[window.as_str()]).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_ip: u32, per_account: u32, window: Duration) -> Limits {
        Limits {
            per_ip,
            per_account,
            window,
            ipv6_prefix_len: 64,
        }
    }

    #[test]
    fn blocks_an_ip_after_max_failures_in_window() {
        let t = LocalThrottle::new(limits(2, 0, Duration::from_secs(60)));
        let ip: IpAddr = "::1".parse().expect("ip");
        assert!(!t.is_blocked(ip, None));
        t.record_failure(ip, Some("a@b"));
        assert!(!t.is_blocked(ip, None));
        t.record_failure(ip, None);
        assert!(t.is_blocked(ip, None));
        assert!(t.is_blocked(ip, Some("other@b")));
        let short = LocalThrottle::new(limits(1, 0, Duration::from_millis(0)));
        short.record_failure(ip, None);
        assert!(!short.is_blocked(ip, None), "window elapsed");
    }

    #[test]
    fn blocks_a_name_from_any_ip_whether_or_not_it_exists() {
        let t = LocalThrottle::new(limits(100, 2, Duration::from_secs(60)));
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        t.record_failure(a, Some("Joe@Example.org"));
        t.record_failure(b, Some(" joe@example.ORG"));
        assert!(t.is_blocked("192.0.2.3".parse().expect("ip"), Some("joe@example.org")));
        assert!(!t.is_blocked(a, Some("ann@example.org")));
        assert!(!t.is_blocked(a, None), "the IPs are not blocked");
    }

    #[test]
    fn an_ipv6_network_is_one_client_and_mapped_ipv4_is_ipv4() {
        let t = LocalThrottle::new(limits(2, 0, Duration::from_secs(60)));
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        t.record_failure(ip("2001:db8::1"), None);
        t.record_failure(ip("2001:db8::2"), None);
        assert!(t.is_blocked(ip("2001:db8::ffff"), None), "same /64");
        assert!(!t.is_blocked(ip("2001:db8:0:1::1"), None), "next /64");
        t.record_failure(ip("::ffff:192.0.2.9"), None);
        t.record_failure(ip("192.0.2.9"), None);
        assert!(t.is_blocked(ip("192.0.2.9"), None));
        assert!(t.is_blocked(ip("::ffff:192.0.2.9"), None));
        assert!(!t.is_blocked(ip("192.0.2.10"), None));
    }

    #[test]
    fn per_account_limit_zero_is_off() {
        let t = LocalThrottle::new(limits(100, 0, Duration::from_secs(60)));
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        for _ in 0..10 {
            t.record_failure(ip, Some("joe@example.org"));
        }
        assert!(!t.is_blocked(ip, Some("joe@example.org")));
    }

    #[test]
    fn a_full_map_stays_bounded_and_keeps_the_busiest_keys() {
        let w: Windows<IpAddr> = Windows::with_capacity(5, Duration::from_secs(60), 100);
        let attacker: IpAddr = "198.51.100.7".parse().expect("ip");
        for _ in 0..5 {
            w.record(attacker);
        }
        for i in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv6Addr::from(
                0x2001_0db8_u128 << 96 | u128::from(i),
            ));
            w.record(ip);
            assert!(w.len() <= 100, "{} keys after {i}", w.len());
        }
        assert!(
            w.is_blocked(&attacker),
            "the blocked key outlived the flood"
        );
        // Expired windows give way first.
        let short: Windows<u32> = Windows::with_capacity(5, Duration::ZERO, 10);
        for i in 0..1000 {
            short.record(i);
        }
        assert!(short.len() <= 10);
    }

    #[test]
    fn names_are_normalised_and_bounded() {
        assert_eq!(account_key(" Joe@Example.ORG "), "joe@example.org");
        let long = "é".repeat(400);
        let key = account_key(&long);
        assert!(key.len() <= MAX_NAME && key.len() >= MAX_NAME - 1);
        assert_eq!(name_key("Joe@X"), "mailgate:authfail:user:joe@x");
        assert_eq!(
            ip_key("2001:db8::".parse().expect("ip"), 64),
            "mailgate:authfail:ip:2001:db8::/64"
        );
        assert_eq!(
            ip_key("192.0.2.1".parse().expect("ip"), 64),
            "mailgate:authfail:ip:192.0.2.1"
        );
    }
}
