//! Connections per client address: at most `--max-connections-per-address` open at once from
//! one address, so one host cannot take a node's `--max-connections` alone. Behind a proxy every
//! connection comes from the proxy's address: for a peer inside `--trusted-proxies`, the client
//! address is the last entry of its `X-Forwarded-For` (what that proxy saw), and only then.
//! Nothing else is taken from `X-Forwarded-For`: a client cannot choose the address it is
//! counted under.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::IpNet;

pub struct Addresses {
    max_per_address: usize,
    trusted: Vec<IpNet>,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its address, given back when dropped.
pub struct Counted {
    addresses: Arc<Addresses>,
    address: IpAddr,
}

impl Addresses {
    pub fn new(max_per_address: usize, trusted: Vec<IpNet>) -> Arc<Addresses> {
        Arc::new(Addresses {
            max_per_address,
            trusted,
            open: Mutex::default(),
        })
    }

    /// Whether `peer` is a proxy whose `X-Forwarded-For` is believed.
    pub fn is_trusted(&self, peer: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&peer))
    }

    /// The client's address: `peer`, or for a trusted proxy the last `X-Forwarded-For` entry it
    /// added (`None` when a trusted proxy sent none, or one that is not an address).
    pub fn client(&self, peer: IpAddr, forwarded_for: Option<&str>) -> Option<IpAddr> {
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let last = forwarded_for?.rsplit(',').next()?.trim();
        last.parse().ok()
    }

    /// Counts a connection from `address`, or `None` when it has the most open already.
    pub fn count(self: &Arc<Self>, address: IpAddr) -> Option<Counted> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(address).or_insert(0);
        if *n >= self.max_per_address {
            return None;
        }
        *n += 1;
        Some(Counted {
            addresses: Arc::clone(self),
            address,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self
            .addresses
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_address_and_trusts_only_listed_proxies() {
        let proxy: IpNet = "10.0.0.0/8".parse().unwrap();
        let addresses = Addresses::new(2, vec![proxy]);
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let a = addresses.count(client).expect("first");
        let _b = addresses.count(client).expect("second");
        assert!(addresses.count(client).is_none(), "two at most");
        drop(a);
        assert!(addresses.count(client).is_some());
        let peer: IpAddr = "10.1.2.3".parse().unwrap();
        let forwarded = Some("203.0.113.9, 198.51.100.4");
        assert_eq!(
            addresses.client(peer, forwarded),
            Some("198.51.100.4".parse().unwrap())
        );
        assert_eq!(addresses.client(peer, None), None);
        assert_eq!(addresses.client(peer, Some("not-an-ip")), None);
        assert_eq!(
            addresses.client(client, forwarded),
            Some(client),
            "not trusted"
        );
        assert!(addresses.open.lock().unwrap().len() <= 1);
    }
}
