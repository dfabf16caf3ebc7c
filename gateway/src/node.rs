//! What every session on this node shares: settings, the engine, the hub, the authenticator,
//! the drain signal and the store watchdog's verdict.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ferry_router::{Engine, Hub};
use rand::Rng;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::addresses::Addresses;
use crate::admission::Admission;
use crate::auth::Authenticator;
use crate::config::Config;
use crate::store_watch::StoreHealth;
use crate::users::Users;

pub struct Node {
    pub config: Config,
    pub node_id: String,
    pub engine: Arc<dyn Engine>,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    /// Cancelled when the node starts draining (SIGTERM or the caller's shutdown).
    pub draining: CancellationToken,
    /// The store watchdog's verdict: readiness reads it, sessions wait for the next outage.
    pub store: watch::Sender<StoreHealth>,
    /// Pushes senders back when the node is behind on delivery.
    pub admission: Arc<Admission>,
    /// Catch-up reads running at once on this node, at most `--max-catchup-reads`.
    pub catchups: Arc<Semaphore>,
    /// Each user's connections and send bucket on this node.
    pub users: Arc<Users>,
    /// Connections per client address.
    pub addresses: Arc<Addresses>,
    /// Connections that have not finished `hello` yet, at most `--max-unauthenticated`.
    pub unauthenticated: Arc<Semaphore>,
}

impl Node {
    /// Resolves at this session's turn to leave a draining node: a uniformly random point in the
    /// first 80% of the drain window, so clients reconnect spread out and the last ones still
    /// finish within the window.
    pub async fn drain_turn(&self) {
        self.draining.cancelled().await;
        let window = self.config.drain_timeout.mul_f64(0.8);
        let delay = rand::rng().random_range(Duration::ZERO..=window);
        tokio::time::sleep(delay).await;
    }

    /// Resolves when the store watchdog declares an outage that starts after this call (not at
    /// the first poll), so a session subscribes before it starts serving.
    pub fn next_store_outage(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut health = self.store.subscribe();
        let seen = health.borrow_and_update().outages;
        async move {
            // An error means the sender, and so the node, is gone: no outage can come.
            if health.wait_for(|h| h.outages != seen).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// A jittered interval (±20%) around `base`, for the position check.
    pub fn jittered(base: Duration) -> Duration {
        base.mul_f64(rand::rng().random_range(0.8..1.2))
    }
}
