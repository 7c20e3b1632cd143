//! Connection admission: a listener's own cap and the global limit, taken at accept, and a
//! per-IP limit taken once the client's address is known (a PROXY header may name it).
//! The per-IP limit counts a client's group (`config::client_group`: IPv4 as it is,
//! IPv4-mapped IPv6 as IPv4, IPv6 by its network of `limits.ipv6_prefix_len` bits).
//! Knows no protocol.

use crate::config::{client_group, Config, Listener};
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
    /// The client's address is not in the listener's allowlist.
    NotAllowed,
}

impl Refusal {
    /// The `reason` label of the rejected-connections metric.
    pub fn metric_reason(self) -> Rejected {
        match self {
            Refusal::TooManyConnections => Rejected::Limit,
            Refusal::TooManyFromPeer => Rejected::PerIpLimit,
            Refusal::ShuttingDown => Rejected::Shutdown,
            Refusal::NotAllowed => Rejected::NotAllowed,
        }
    }
}

/// Per-listener, global and per-IP connection limits.
pub struct ConnLimits {
    /// POP3 (both ports), LMTP, SMTP: each listener's own cap, so a flood on one cannot
    /// take every place of the global limit.
    listeners: [Arc<Semaphore>; 3],
    total: Arc<Semaphore>,
    per_ip_max: usize,
    ipv6_prefix_len: u8,
    /// Connections per client group.
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A connection's place in the global limit, taken when it is accepted; `admit` adds the
/// per-IP place once the client's address is known.
pub struct Reserved {
    listener: Option<OwnedSemaphorePermit>,
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
            _listener: self.listener,
            _total: self.total,
            ip,
            per_ip: self.per_ip,
        })
    }
}

/// Holds one connection's place in both limits until dropped.
pub struct Admission {
    _listener: Option<OwnedSemaphorePermit>,
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
    /// `listeners`: the caps of POP3 (both ports), LMTP and SMTP.
    pub fn new(
        total: usize,
        per_ip_max: usize,
        listeners: [usize; 3],
        ipv6_prefix_len: u8,
    ) -> Self {
        ConnLimits {
            listeners: listeners.map(|n| Arc::new(Semaphore::new(n))),
            total: Arc::new(Semaphore::new(total)),
            per_ip_max,
            ipv6_prefix_len,
            per_ip: Arc::default(),
        }
    }

    /// The limits `[limits]` and each listener's `max_connections` set.
    pub fn from_config(config: &Config) -> Self {
        ConnLimits::new(
            config.limits.max_connections,
            config.limits.max_connections_per_ip,
            [
                config.pop3.max_connections,
                config.lmtp.max_connections,
                config.smtp.max_connections,
            ],
            config.limits.ipv6_prefix_len,
        )
    }

    /// A place in `listener`'s cap (none for the replica link) and the global limit.
    pub fn reserve(&self, listener: Option<Listener>) -> Result<Reserved, Refusal> {
        let own = match listener {
            Some(l) => {
                let slot = match l {
                    Listener::Pop3 | Listener::Pop3s => 0,
                    Listener::Lmtp => 1,
                    Listener::Smtp => 2,
                };
                let permit = self.listeners[slot]
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Refusal::TooManyConnections)?;
                Some(permit)
            }
            None => None,
        };
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::TooManyConnections)?;
        Ok(Reserved {
            listener: own,
            total,
            per_ip_max: self.per_ip_max,
            ipv6_prefix_len: self.ipv6_prefix_len,
            per_ip: self.per_ip.clone(),
        })
    }

    /// Places in every limit, for a client whose address is known at accept.
    pub fn admit(&self, listener: Option<Listener>, ip: IpAddr) -> Result<Admission, Refusal> {
        self.reserve(listener)?.admit(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total_limits() {
        let limits = ConnLimits::new(3, 2, [9, 9, 9], 64);
        let a: IpAddr = "127.0.0.1".parse().expect("ip");
        let b: IpAddr = "127.0.0.2".parse().expect("ip");
        let a1 = limits.admit(None, a).expect("a1");
        let _a2 = limits.admit(None, a).expect("a2");
        assert_eq!(limits.admit(None, a).err(), Some(Refusal::TooManyFromPeer));
        let _b1 = limits.admit(None, b).expect("b1");
        assert_eq!(
            limits.admit(None, b).err(),
            Some(Refusal::TooManyConnections)
        );
        drop(a1);
        assert!(limits.admit(None, a).is_ok());
    }

    #[test]
    fn a_reserved_place_counts_before_its_address_is_known() {
        let limits = ConnLimits::new(2, 1, [9, 9, 9], 64);
        let a: IpAddr = "203.0.113.7".parse().expect("ip");
        let pending = limits.reserve(None).expect("reserve");
        let b = limits
            .admit(None, "127.0.0.1".parse().expect("ip"))
            .expect("b");
        // Both places are taken: one by a connection still waiting for its header.
        assert_eq!(
            limits.reserve(None).err(),
            Some(Refusal::TooManyConnections)
        );
        let a1 = pending.admit(a).expect("a1");
        assert_eq!(
            limits.reserve(None).err().map(Refusal::metric_reason),
            Some(Rejected::Limit)
        );
        drop(a1);
        let again = limits.reserve(None).expect("reserve");
        let _a2 = again.admit(a).expect("a2");
        // A refused per-IP admission gives its global place back.
        drop(b);
        let third = limits.reserve(None).expect("reserve");
        assert_eq!(third.admit(a).err(), Some(Refusal::TooManyFromPeer));
        assert!(limits.reserve(None).is_ok());
    }

    #[test]
    fn a_flood_on_one_listener_leaves_the_others_their_places() {
        let limits = ConnLimits::new(10, 100, [3, 2, 5], 64);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let pop3: Vec<_> = (0..3)
            .map(|_| limits.admit(Some(Listener::Pop3s), ip).expect("pop3"))
            .collect();
        assert_eq!(
            limits.admit(Some(Listener::Pop3), ip).err(),
            Some(Refusal::TooManyConnections),
            "both POP3 ports share one cap"
        );
        let _lmtp = limits.admit(Some(Listener::Lmtp), ip).expect("lmtp");
        let _lmtp2 = limits.admit(Some(Listener::Lmtp), ip).expect("lmtp");
        assert!(limits.admit(Some(Listener::Lmtp), ip).is_err());
        drop(pop3);
        assert!(limits.admit(Some(Listener::Pop3), ip).is_ok());
        // A refused listener place takes no global place.
        let _smtp: Vec<_> = (0..5)
            .map(|_| limits.admit(Some(Listener::Smtp), ip).expect("smtp"))
            .collect();
        assert!(limits.admit(Some(Listener::Smtp), ip).is_err());
        assert!(limits.admit(None, ip).is_ok());
    }

    #[test]
    fn ipv6_counts_by_prefix_and_mapped_ipv4_as_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let limits = ConnLimits::new(10, 2, [9, 9, 9], 64);
        let _a = limits.admit(None, ip("2001:db8::1")).expect("a");
        let _b = limits.admit(None, ip("2001:db8::2:3")).expect("b");
        assert_eq!(
            limits
                .admit(None, ip("2001:db8::ffff:ffff:ffff:ffff"))
                .err(),
            Some(Refusal::TooManyFromPeer),
            "a third address of the same /64"
        );
        let c = limits
            .admit(None, ip("2001:db8:0:1::1"))
            .expect("another /64");
        let _m = limits.admit(None, ip("::ffff:192.0.2.1")).expect("mapped");
        let _v4 = limits.admit(None, ip("192.0.2.1")).expect("v4");
        assert_eq!(
            limits.admit(None, ip("192.0.2.1")).err(),
            Some(Refusal::TooManyFromPeer),
            "::ffff:192.0.2.1 and 192.0.2.1 are one client"
        );
        drop(c);
        // /128 counts single addresses.
        let exact = ConnLimits::new(10, 1, [9, 9, 9], 128);
        let _x = exact.admit(None, ip("2001:db8::1")).expect("x");
        assert!(exact.admit(None, ip("2001:db8::2")).is_ok());
        assert!(exact.admit(None, ip("2001:db8::1")).is_err());
    }
}
