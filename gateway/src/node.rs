//! What every session on this node shares: settings, the engine, the hub, the authenticator,
//! and the drain signal.

use std::sync::Arc;
use std::time::Duration;

use ferry_router::{Engine, Hub};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Config;

pub struct Node {
    pub config: Config,
    pub node_id: String,
    pub engine: Arc<dyn Engine>,
    pub hub: Arc<Hub>,
    pub auth: Authenticator,
    /// Cancelled when the node starts draining (SIGTERM or the caller's shutdown).
    pub draining: CancellationToken,
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

    /// A jittered interval (±20%) around `base`, for the position check.
    pub fn jittered(base: Duration) -> Duration {
        base.mul_f64(rand::rng().random_range(0.8..1.2))
    }
}
