//! The Redis engine's live bus: the node's pub/sub connections (one per shard; a standalone
//! Redis is one shard), owned by one task that keeps the set of users this node wants, survives
//! drops and slot moves, and feeds `LiveEvent`s to the hub.
//!
//! - `subscribe`/`unsubscribe` queue a request on an unbounded channel when they are *called*, so
//!   requests take effect in call order, and a dropped future cancels nothing.
//! - The task records each request in the *desired* set at once, whatever the connections'
//!   state. A subscribe resolves when the shard that owns the user's slot has confirmed it;
//!   while that connection is down, after the reconnect. The caller gives up after
//!   `store_timeout` (`Unavailable`), but the request stays in the desired set: it is withdrawn by
//!   an `unsubscribe`, which the hub sends when a join fails. An unsubscribe resolves at once.
//! - A drop is seen when the connection ends (EOF or a reset, e.g. after `CLIENT KILL TYPE
//!   pubsub` or a Redis restart), or when a `PING` sent after 10 s of silence goes unanswered
//!   for `store_timeout`. The shard reconnects with jittered exponential backoff (50 ms doubling
//!   to 2 s), subscribes its users again, and only then sends them `LiveEvent::ResyncUsers`:
//!   anything published while it was away was missed.
//! - In cluster mode (`SSUBSCRIBE`, sharded pub/sub), the task reads the slot map every 5 s, and
//!   within 250 ms after a sign that it moved: an unsolicited `sunsubscribe`, a `MOVED` answer,
//!   a dropped shard. Users whose slot changed owner are subscribed at the new one and resynced.
//! - Messages go straight from each connection's reader to the hub's sink
//!   (`Engine::set_live_sink`): no channel and no task hop between the socket and the sessions'
//!   queues. The sink never waits (a session whose queue is full is flagged to catch up
//!   instead).

mod backoff;
mod conn;
mod task;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_shared::{Keys, UserId};
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{EngineError, LiveSink};
pub(crate) use conn::Connector;
use task::LiveTask;
pub(crate) use task::{Source, TopologyReader};

/// Handle to the live task; the task stops when this is dropped.
pub(crate) struct LiveBus {
    requests: mpsc::UnboundedSender<Request>,
    store_timeout: Duration,
    /// Where the task hands live events, once the hub has set it.
    sink: Arc<OnceLock<LiveSink>>,
}

struct Request {
    user: UserId,
    subscribe: bool,
    /// Answered once the request is in effect.
    done: oneshot::Sender<()>,
}

impl LiveBus {
    /// Starts the live task (inside the current Tokio runtime).
    pub fn start(
        source: Source,
        connector: Connector,
        keys: Keys,
        store_timeout: Duration,
    ) -> LiveBus {
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let sink = Arc::new(OnceLock::new());
        let task = LiveTask::new(
            source,
            connector,
            keys,
            store_timeout,
            requests_rx,
            Arc::clone(&sink),
        );
        tokio::spawn(task.run());
        LiveBus {
            requests,
            store_timeout,
            sink,
        }
    }

    /// Sets where live events go (once; a second sink is ignored).
    pub fn set_sink(&self, sink: LiveSink) {
        if self.sink.set(sink).is_err() {
            tracing::error!("the engine's live sink was already set; the second one is ignored");
        }
    }

    pub fn subscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.request(user, true)
    }

    pub fn unsubscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.request(user, false)
    }

    fn request(
        &self,
        user: &UserId,
        subscribe: bool,
    ) -> BoxFuture<'static, Result<(), EngineError>> {
        let (done, confirmed) = oneshot::channel();
        // Queued now, not when the future is first polled: this is what orders requests.
        let queued = self.requests.send(Request {
            user: user.clone(),
            subscribe,
            done,
        });
        let store_timeout = self.store_timeout;
        Box::pin(async move {
            let stopped = || EngineError::Unavailable("the live bus has stopped".into());
            queued.map_err(|_| stopped())?;
            match tokio::time::timeout(store_timeout, confirmed).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(stopped()),
                Err(_) => Err(EngineError::Unavailable(format!(
                    "pub/sub {} not confirmed within {store_timeout:?}",
                    if subscribe {
                        "subscription"
                    } else {
                        "unsubscription"
                    }
                ))),
            }
        })
    }
}
