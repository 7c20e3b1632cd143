//! Connection admission: a global limit taken at accept and a per-IP limit taken once the
//! client's address is known (a PROXY header may name it). The per-IP limit counts a
//! client's group (`config::client_group`: IPv4 as it is, IPv4-mapped IPv6 as IPv4,
//! IPv6 by its network of `limits.ipv6_prefix_len` bits). Knows no protocol.

use crate::config::client_group;
use crate::metrics::Rejected;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a connection was refused before a session started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    TooManyFromPeer,
    ShuttingDown,
}

impl Refusal {
    /// The `reason` label of the rejected-connections metric.
    pub fn metric_reason(self) -> Rejected {
        match self {
            Refusal::TooManyConnections => Rejected::Limit,
            Refusal::TooManyFromPeer => Rejected::PerIpLimit,
            Refusal::ShuttingDown => Rejected::Shutdown,
        }
    }
}

/// Global and per-IP connection limits.
pub struct ConnLimits {
    total: Arc<Semaphore>,
    per_ip_max: usize,
    ipv6_prefix_len: u8,
    /// Connections per client group.
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A connection's place in the global limit, taken when it is accepted; `admit` adds the
/// per-IP place once the client's address is known.
pub struct Reserved {
    total: OwnedSemaphorePermit,
    per_ip_max: usize,
    ipv6_prefix_len: u8,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Reserved {
    pub fn admit(self, ip: IpAddr) -> Result<Admission, Refusal> {
        let ip = client_group(ip, self.ipv6_prefix_len);
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_ip_max {
            return Err(Refusal::TooManyFromPeer);
        }
        *n += 1;
        drop(map);
        Ok(Admission {
            _total: self.total,
            ip,
            per_ip: self.per_ip,
        })
    }
}

/// Holds one connection's place in both limits until dropped.
pub struct Admission {
    _total: OwnedSemaphorePermit,
    /// The client's group.
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl ConnLimits {
    pub fn new(total: usize, per_ip_max: usize, ipv6_prefix_len: u8) -> Self {
        ConnLimits {
            total: Arc::new(Semaphore::new(total)),
            per_ip_max,
            ipv6_prefix_len,
            per_ip: Arc::default(),
        }
    }

    /// A place in the global limit only.
    pub fn reserve(&self) -> Result<Reserved, Refusal> {
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::TooManyConnections)?;
        Ok(Reserved {
            total,
            per_ip_max: self.per_ip_max,
            ipv6_prefix_len: self.ipv6_prefix_len,
            per_ip: self.per_ip.clone(),
        })
    }

    /// Places in both limits, for a client whose address is known at accept.
    pub fn admit(&self, ip: IpAddr) -> Result<Admission, Refusal> {
        self.reserve()?.admit(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total_limits() {
        let limits = ConnLimits::new(3, 2, 64);
        let a: IpAddr = "127.0.0.1".parse().expect("ip");
        let b: IpAddr = "127.0.0.2".parse().expect("ip");
        let a1 = limits.admit(a).expect("a1");
        let _a2 = limits.admit(a).expect("a2");
        assert_eq!(limits.admit(a).err(), Some(Refusal::TooManyFromPeer));
        let _b1 = limits.admit(b).expect("b1");
        assert_eq!(limits.admit(b).err(), Some(Refusal::TooManyConnections));
        drop(a1);
        assert!(limits.admit(a).is_ok());
    }

    #[test]
    fn a_reserved_place_counts_before_its_address_is_known() {
        let limits = ConnLimits::new(2, 1, 64);
        let a: IpAddr = "203.0.113.7".parse().expect("ip");
        let pending = limits.reserve().expect("reserve");
        let b = limits.admit("127.0.0.1".parse().expect("ip")).expect("b");
        // Both places are taken: one by a connection still waiting for its header.
        assert_eq!(limits.reserve().err(), Some(Refusal::TooManyConnections));
        let a1 = pending.admit(a).expect("a1");
        assert_eq!(
            limits.reserve().err().map(Refusal::metric_reason),
            Some(Rejected::Limit)
        );
        drop(a1);
        let again = limits.reserve().expect("reserve");
        let _a2 = again.admit(a).expect("a2");
        // A refused per-IP admission gives its global place back.
        drop(b);
        let third = limits.reserve().expect("reserve");
        assert_eq!(third.admit(a).err(), Some(Refusal::TooManyFromPeer));
        assert!(limits.reserve().is_ok());
    }

    #[test]
    fn ipv6_counts_by_prefix_and_mapped_ipv4_as_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let limits = ConnLimits::new(10, 2, 64);
        let _a = limits.admit(ip("2001:db8::1")).expect("a");
        let _b = limits.admit(ip("2001:db8::2:3")).expect("b");
        assert_eq!(
            limits.admit(ip("2001:db8::ffff:ffff:ffff:ffff")).err(),
            Some(Refusal::TooManyFromPeer),
            "a third address of the same /64"
        );
        let c = limits.admit(ip("2001:db8:0:1::1")).expect("another /64");
        let _m = limits.admit(ip("::ffff:192.0.2.1")).expect("mapped");
        let _v4 = limits.admit(ip("192.0.2.1")).expect("v4");
        assert_eq!(
            limits.admit(ip("192.0.2.1")).err(),
            Some(Refusal::TooManyFromPeer),
            "::ffff:192.0.2.1 and 192.0.2.1 are one client"
        );
        drop(c);
        // /128 counts single addresses.
        let exact = ConnLimits::new(10, 1, 128);
        let _x = exact.admit(ip("2001:db8::1")).expect("x");
        assert!(exact.admit(ip("2001:db8::2")).is_ok());
        assert!(exact.admit(ip("2001:db8::1")).is_err());
    }
}
