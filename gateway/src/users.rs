//! What a node keeps per user across that user's connections: how many are open (at most
//! `--max-connections-per-user`) and the user's send buckets, one counting sends (`--send-rate`,
//! `--send-burst`) and one counting the bytes of bodies stored (`--store-bytes-rate`, with a
//! burst of that many bytes times `STORE_BURST_SECONDS`), so that one user's connections share
//! one rate and a reconnect does not refill it.
//!
//! A user's entry lives while the user has a connection, and after the last one closes until
//! its bucket has refilled: forgetting a full bucket loses nothing. Closed users' entries are
//! swept every `SWEEP_EVERY` disconnects, so the map is bounded by the users connected now and
//! those that left within about `--send-burst / --send-rate` seconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

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
}

/// One of a user's connection slots on this node, given back when dropped.
pub struct Slot {
    users: Arc<Users>,
    user: UserId,
}

impl Users {
    pub fn new(max_connections: usize, rate: f64, burst: u32, bytes_rate: f64) -> Arc<Users> {
        Arc::new(Users {
            max_connections,
            rate,
            burst: f64::from(burst),
            bytes_rate,
            state: Mutex::default(),
        })
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
    pub fn take_bytes(&self, user: &UserId, bytes: usize) -> Result<(), u64> {
        let mut state = self.lock();
        let Some(entry) = state.users.get_mut(user) else {
            return Ok(());
        };
        let burst = self.bytes_rate * STORE_BURST_SECONDS;
        // `as` saturates; a body is at most --max-body-bytes.
        let wanted = (bytes as f64).min(burst) as u32;
        entry.bytes.take_n(wanted)
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
            if entry.connections == 0 && entry.sends.is_full() && entry.bytes.is_full() {
                state.users.remove(user);
            }
        }
        state.disconnects += 1;
        if state.disconnects >= SWEEP_EVERY {
            state.disconnects = 0;
            state
                .users
                .retain(|_, e| e.connections > 0 || !e.sends.is_full() || !e.bytes.is_full());
        }
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
        let users = Users::new(2, 1.0, 2, 1000.0);
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
