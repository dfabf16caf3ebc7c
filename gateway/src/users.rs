//! What a node keeps per user across that user's connections: how many are open (at most
//! `--max-connections-per-user`) and the user's send buckets, one counting sends (`--send-rate`,
//! `--send-burst`) and one counting the bytes of bodies stored (`--store-bytes-rate`, with a
//! burst of that many bytes times `STORE_BURST_SECONDS`), so that one user's connections share
//! one rate and a reconnect does not refill it.
//!
//! On a store shared by several nodes (Redis), the bytes bucket also has a cluster-wide bound:
//! the user's quota in the store (`Engine::take_quota`, same rate and burst), which the node
//! leases in chunks of a quarter second's worth. Sends spend the lease; when it runs low the
//! node asks for the next chunk in the background, so no send waits for the store. A node may
//! spend at most one chunk (and one body) ahead of what the store granted it, so a user stores
//! at most the burst, plus the rate over time, plus that margin per node, whatever the number of
//! nodes its connections are spread over.
//!
//! A user's entry lives while the user has a connection, and after the last one closes until
//! its buckets have refilled and no request to the store's quota is out: forgetting a full
//! bucket loses nothing. The lease is settled with the store then: what the node spent ahead of
//! its grants is charged to the user's quota, and what it was granted and did not spend is given
//! back, so neither a reconnect loop nor a user's coming and going moves the cluster-wide bound. Closed users' entries are
//! swept every `SWEEP_EVERY` disconnects, so the map is bounded by the users connected now and
//! those that left within about `--send-burst / --send-rate` seconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use ferry_router::Engine;
use ferry_shared::UserId;

use crate::limits::TokenBucket;

/// The burst of the store bytes bucket, in seconds of its rate.
const STORE_BURST_SECONDS: f64 = 4.0;

/// Disconnects between two sweeps of closed users' entries.
const SWEEP_EVERY: u32 = 256;

pub struct Users {
    max_connections: usize,
    rate: f64,
    burst: f64,
    bytes_rate: f64,
    /// The store's quota shared by every node, when the engine has one.
    quota: Option<Arc<dyn Engine>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    users: HashMap<UserId, User>,
    disconnects: u32,
}

struct User {
    connections: usize,
    sends: TokenBucket,
    bytes: TokenBucket,
    lease: Lease,
}

/// This node's lease on the user's quota in the store: bytes granted and not spent yet
/// (negative: spent ahead of a grant), and whether a request for more is out.
#[derive(Default)]
struct Lease {
    balance: i64,
    asking: bool,
}

impl User {
    /// Nothing would be lost by forgetting it (once its lease is settled with the store): no
    /// connection, full buckets, no request out.
    fn forgettable(&self) -> bool {
        self.connections == 0 && self.sends.is_full() && self.bytes.is_full() && !self.lease.asking
    }
}

/// One of a user's connection slots on this node, given back when dropped.
pub struct Slot {
    users: Arc<Users>,
    user: UserId,
}

impl Users {
    pub fn new(
        max_connections: usize,
        rate: f64,
        burst: u32,
        bytes_rate: f64,
        quota: Option<Arc<dyn Engine>>,
    ) -> Arc<Users> {
        Arc::new(Users {
            max_connections,
            rate,
            burst: f64::from(burst),
            bytes_rate,
            quota,
            state: Mutex::default(),
        })
    }

    /// The bytes leased from the store at a time, and spent at most ahead of its grants.
    fn chunk(&self) -> i64 {
        // `as` saturates; validation keeps the rate at least 1.
        ((self.bytes_rate / 4.0).ceil() as i64).max(1)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection slot for `user`, or `None` when the user has `--max-connections-per-user`
    /// connections on this node already.
    pub fn connect(self: &Arc<Self>, user: &UserId) -> Option<Slot> {
        let mut state = self.lock();
        let entry = state.users.entry(user.clone()).or_insert_with(|| User {
            connections: 0,
            sends: TokenBucket::new(self.rate, self.burst),
            bytes: TokenBucket::new(self.bytes_rate, self.bytes_rate * STORE_BURST_SECONDS),
            lease: Lease::default(),
        });
        if entry.connections >= self.max_connections {
            return None;
        }
        entry.connections += 1;
        Some(Slot {
            users: Arc::clone(self),
            user: user.clone(),
        })
    }

    /// Takes one of `user`'s send tokens, or says in how many milliseconds one is there.
    pub fn take_send(&self, user: &UserId) -> Result<(), u64> {
        let mut state = self.lock();
        match state.users.get_mut(user) {
            Some(entry) => entry.sends.take(),
            // Only a connected user sends; an entry is never swept while it has a connection.
            None => Ok(()),
        }
    }

    /// Takes `bytes` of `user`'s store budget (a body about to be stored), or says in how many
    /// milliseconds they are there. A body larger than the burst is never refused for it (the
    /// body limit bounds it), it empties the bucket.
    ///
    /// On a shared store, the node's lease on the user's quota pays too (see the module docs).
    pub fn take_bytes(self: &Arc<Self>, user: &UserId, bytes: usize) -> Result<(), u64> {
        let mut state = self.lock();
        let Some(entry) = state.users.get_mut(user) else {
            return Ok(());
        };
        let chunk = self.chunk();
        if self.quota.is_some() && entry.lease.balance < -chunk {
            // A chunk spent ahead of the store's grants: wait for the next one.
            let owed = (-entry.lease.balance - chunk) as f64;
            self.ask(user, &mut entry.lease);
            return Err(((owed * 1000.0 / self.bytes_rate).ceil() as u64).max(1));
        }
        let burst = self.bytes_rate * STORE_BURST_SECONDS;
        // `as` saturates; a body is at most --max-body-bytes.
        let wanted = (bytes as f64).min(burst) as u32;
        entry.bytes.take_n(wanted)?;
        if self.quota.is_some() {
            entry.lease.balance = entry.lease.balance.saturating_sub(bytes as i64);
            if entry.lease.balance < chunk / 2 {
                self.ask(user, &mut entry.lease);
            }
        }
        Ok(())
    }

    /// Asks the store for enough of `user`'s quota to bring the lease back to a chunk, unless a
    /// request is out already.
    fn ask(self: &Arc<Self>, user: &UserId, lease: &mut Lease) {
        let Some(engine) = &self.quota else {
            return;
        };
        if lease.asking {
            return;
        }
        lease.asking = true;
        let want = (self.chunk() - lease.balance).max(1) as u64;
        let grant = engine.take_quota(user, want, self.quota_rate(), self.quota_burst());
        let (users, user) = (Arc::clone(self), user.clone());
        tokio::spawn(async move {
            let granted = grant.await;
            let mut state = users.lock();
            let Some(entry) = state.users.get_mut(&user) else {
                return;
            };
            entry.lease.asking = false;
            match granted {
                Ok(bytes) => {
                    let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
                    entry.lease.balance = entry.lease.balance.saturating_add(bytes);
                }
                // The next send asks again; appends fail too while the store is away.
                Err(e) => tracing::debug!(error = %e, "store quota request failed"),
            }
        });
    }

    /// Users with an entry (connected, or left with a bucket still refilling).
    pub fn len(&self) -> usize {
        self.lock().users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn disconnect(&self, user: &UserId) {
        let mut state = self.lock();
        if let Some(entry) = state.users.get_mut(user) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.forgettable()
                && let Some(entry) = state.users.remove(user)
            {
                self.settle(user, &entry.lease);
            }
        }
        state.disconnects += 1;
        if state.disconnects >= SWEEP_EVERY {
            state.disconnects = 0;
            state.users.retain(|user, entry| {
                let keep = !entry.forgettable();
                if !keep {
                    self.settle(user, &entry.lease);
                }
                keep
            });
        }
    }

    /// Settles a lease the node forgets with the store's quota (see the module docs).
    fn settle(&self, user: &UserId, lease: &Lease) {
        let Some(engine) = &self.quota else {
            return;
        };
        if lease.balance == 0 {
            return;
        }
        let settled =
            engine.settle_quota(user, -lease.balance, self.quota_rate(), self.quota_burst());
        tokio::spawn(async move {
            if let Err(e) = settled.await {
                tracing::debug!(error = %e, "settling a store quota lease failed");
            }
        });
    }

    /// The store quota's rate and burst, in whole bytes.
    fn quota_rate(&self) -> u64 {
        // `as` saturates; validation keeps the rate finite and at least 1.
        self.bytes_rate.ceil() as u64
    }

    fn quota_burst(&self) -> u64 {
        (self.bytes_rate * STORE_BURST_SECONDS).ceil() as u64
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.users.disconnect(&self.user);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slots_are_bounded_and_buckets_outlive_a_reconnect() {
        let users = Users::new(2, 1.0, 2, 1000.0, None);
        let alice = UserId::parse("alice").unwrap();
        let one = users.connect(&alice).expect("a slot");
        let two = users.connect(&alice).expect("a slot");
        assert!(users.connect(&alice).is_none(), "two at most");
        assert!(users.take_send(&alice).is_ok());
        assert!(users.take_send(&alice).is_ok());
        assert_eq!(users.take_send(&alice), Err(1000));
        drop((one, two));
        assert_eq!(users.len(), 1, "kept while the bucket refills");
        let again = users.connect(&alice).expect("a slot");
        assert!(
            users.take_send(&alice).is_err(),
            "a reconnect does not refill it"
        );
        drop(again);
        tokio::time::advance(Duration::from_secs(3)).await;
        let third = users.connect(&alice).expect("a slot");
        assert!(users.take_bytes(&alice, 3000).is_ok());
        assert!(
            users.take_bytes(&alice, 1000).is_ok(),
            "4,000 bytes at once"
        );
        assert_eq!(users.take_bytes(&alice, 500), Err(500));
        tokio::time::advance(Duration::from_secs(4)).await;
        drop(third);
        assert_eq!(
            users.len(),
            0,
            "a full bucket is forgotten when its user leaves"
        );
    }
}
