//! The task that owns the node's pub/sub connection: connects, brings the connection to the
//! desired set of users, forwards messages to the hub, and reconnects after a drop.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_shared::{Keys, UserId};
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use super::Request;
use super::backoff::Backoff;
use crate::engine::{EpochName, Live, LiveEvent, LiveSink, Stored};
use crate::metrics;
use crate::record::{decode_stored, split_live};

/// A connection up this long resets the reconnection backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How often a quiet connection is checked with `PING`.
const HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// Channels per `SUBSCRIBE`/`UNSUBSCRIBE` command, so a resubscription of many users is a few
/// reasonably sized commands rather than one huge one or thousands of tiny ones.
const CHANNELS_PER_COMMAND: usize = 512;
/// Requests applied together before the connection is told.
const REQUESTS_PER_BATCH: usize = 1024;

/// The task that owns the pub/sub connection.
pub(super) struct LiveTask {
    /// Opens each new pub/sub connection.
    client: redis::Client,
    /// Channel names for users and back.
    keys: Keys,
    /// Limit on connecting and on each command's confirmation.
    store_timeout: Duration,
    requests: mpsc::UnboundedReceiver<Request>,
    /// Where live events go, once the hub has set it.
    sink: Arc<OnceLock<LiveSink>>,
    /// Users this node wants live messages for; every connection is brought to this set.
    desired: HashSet<UserId>,
    /// Subscribe requests waiting for a connection.
    waiting: Vec<oneshot::Sender<()>>,
}

/// What woke the connected task.
enum Step {
    Request(Option<Request>),
    Message(Option<redis::Msg>),
    /// Time to check that the connection still answers.
    Health,
}

/// Why the task stops using a connection.
enum Ended {
    /// The connection dropped or stopped answering: reconnect.
    Dropped,
    /// The engine was dropped: stop.
    Stopped,
}

impl LiveTask {
    pub(super) fn new(
        client: redis::Client,
        keys: Keys,
        store_timeout: Duration,
        requests: mpsc::UnboundedReceiver<Request>,
        sink: Arc<OnceLock<LiveSink>>,
    ) -> Self {
        Self {
            client,
            keys,
            store_timeout,
            requests,
            sink,
            desired: HashSet::new(),
            waiting: Vec::new(),
        }
    }

    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::default();
        let mut had_connection = false;
        loop {
            let connect = Self::connect(self.client.clone(), self.store_timeout);
            let Some(connected) = self.offline(connect).await else {
                return;
            };
            let (mut sink, stream) = match connected {
                Ok(pubsub) => pubsub.split(),
                Err(reason) => {
                    tracing::debug!(%reason, "pub/sub connection failed");
                    if !self.wait_backoff(&mut backoff).await {
                        return;
                    }
                    continue;
                }
            };
            let mut subscribed = HashSet::new();
            let everyone: Vec<UserId> = self.desired.iter().cloned().collect();
            if let Err(reason) = self.reconcile(&mut sink, &mut subscribed, everyone).await {
                tracing::warn!(%reason, "pub/sub resubscription failed");
                if !self.wait_backoff(&mut backoff).await {
                    return;
                }
                continue;
            }
            for done in self.waiting.drain(..) {
                let _ = done.send(());
            }
            if had_connection {
                metrics::PUBSUB_RECONNECTS.inc();
                tracing::info!(
                    users = subscribed.len(),
                    "pub/sub reconnected and resubscribed"
                );
                // Anything published while it was away was missed.
                self.emit(LiveEvent::Resync);
                metrics::LIVE_RESYNCS.inc();
            }
            had_connection = true;
            let up_since = Instant::now();
            match self.connected(sink, stream, subscribed).await {
                Ended::Stopped => return,
                Ended::Dropped => {
                    tracing::warn!("pub/sub connection dropped; reconnecting");
                    // A connection that keeps dropping at once is retried ever more slowly.
                    if up_since.elapsed() >= STABLE_AFTER {
                        backoff = Backoff::default();
                    }
                    if !self.wait_backoff(&mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    async fn connect(
        client: redis::Client,
        store_timeout: Duration,
    ) -> Result<redis::aio::PubSub, String> {
        match tokio::time::timeout(store_timeout, client.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no connection within {store_timeout:?}")),
        }
    }

    /// Runs `work` while there is no connection, recording requests meanwhile. `None` when the
    /// engine was dropped.
    /// Waits out the next backoff delay while still taking requests; false when the engine
    /// is gone and the task should stop.
    async fn wait_backoff(&mut self, backoff: &mut Backoff) -> bool {
        self.offline(tokio::time::sleep(backoff.next_delay()))
            .await
            .is_some()
    }

    async fn offline<F: Future>(&mut self, work: F) -> Option<F::Output> {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return Some(output),
                request = self.requests.recv() => {
                    let request = request?;
                    if request.subscribe {
                        self.desired.insert(request.user);
                        self.waiting.retain(|done| !done.is_closed());
                        self.waiting.push(request.done);
                    } else {
                        self.desired.remove(&request.user);
                        let _ = request.done.send(());
                    }
                }
            }
        }
    }

    /// Serves one connection until it ends.
    async fn connected(
        &mut self,
        mut sink: PubSubSink,
        mut stream: PubSubStream,
        mut subscribed: HashSet<UserId>,
    ) -> Ended {
        let start = Instant::now() + HEALTH_INTERVAL;
        let mut health = tokio::time::interval_at(start, HEALTH_INTERVAL);
        health.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                biased;
                request = self.requests.recv() => Step::Request(request),
                message = stream.next() => Step::Message(message),
                _ = health.tick() => Step::Health,
            };
            match step {
                Step::Request(None) => return Ended::Stopped,
                Step::Request(Some(request)) => {
                    if let Err(reason) = self.apply(&mut sink, &mut subscribed, request).await {
                        tracing::warn!(%reason, "pub/sub command failed");
                        return Ended::Dropped;
                    }
                }
                Step::Message(Some(message)) => self.forward(&message),
                Step::Message(None) => return Ended::Dropped,
                Step::Health => {
                    let ping =
                        tokio::time::timeout(self.store_timeout, sink.ping::<redis::Value>());
                    if !matches!(ping.await, Ok(Ok(_))) {
                        tracing::warn!("pub/sub connection does not answer PING");
                        return Ended::Dropped;
                    }
                }
            }
        }
    }

    /// Applies `first` and every request queued behind it, then brings the connection in line.
    async fn apply(
        &mut self,
        sink: &mut PubSubSink,
        subscribed: &mut HashSet<UserId>,
        first: Request,
    ) -> Result<(), String> {
        let mut batch = vec![first];
        while batch.len() < REQUESTS_PER_BATCH {
            match self.requests.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        let mut touched = Vec::with_capacity(batch.len());
        let mut subscribes = Vec::new();
        let mut unsubscribes = Vec::new();
        for request in batch {
            if request.subscribe {
                self.desired.insert(request.user.clone());
                subscribes.push(request.done);
            } else {
                self.desired.remove(&request.user);
                unsubscribes.push(request.done);
            }
            touched.push(request.user);
        }
        let result = self.reconcile(sink, subscribed, touched).await;
        // An unsubscription is in effect either way: confirmed, or its connection is gone.
        for done in unsubscribes {
            let _ = done.send(());
        }
        match result {
            Ok(()) => subscribes.into_iter().for_each(|done| {
                let _ = done.send(());
            }),
            Err(_) => self.waiting.extend(subscribes),
        }
        result
    }

    /// Subscribes or unsubscribes each of `users` so the connection matches the desired set.
    async fn reconcile(
        &self,
        sink: &mut PubSubSink,
        subscribed: &mut HashSet<UserId>,
        users: Vec<UserId>,
    ) -> Result<(), String> {
        let mut add = Vec::new();
        let mut remove = Vec::new();
        let mut seen = HashSet::new();
        for user in users {
            if !seen.insert(user.clone()) {
                continue;
            }
            match (self.desired.contains(&user), subscribed.contains(&user)) {
                (true, false) => add.push(user),
                (false, true) => remove.push(user),
                _ => {}
            }
        }
        for chunk in remove.chunks(CHANNELS_PER_COMMAND) {
            let channels: Vec<String> = chunk.iter().map(|u| self.keys.live(u)).collect();
            self.confirm(sink.unsubscribe(&channels)).await?;
            chunk.iter().for_each(|u| {
                subscribed.remove(u);
            });
        }
        for chunk in add.chunks(CHANNELS_PER_COMMAND) {
            let channels: Vec<String> = chunk.iter().map(|u| self.keys.live(u)).collect();
            self.confirm(sink.subscribe(&channels)).await?;
            subscribed.extend(chunk.iter().cloned());
        }
        Ok(())
    }

    async fn confirm(
        &self,
        command: impl Future<Output = redis::RedisResult<()>>,
    ) -> Result<(), String> {
        match tokio::time::timeout(self.store_timeout, command).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("not confirmed within {:?}", self.store_timeout)),
        }
    }

    /// Hands one received message to the hub.
    fn forward(&mut self, message: &redis::Msg) {
        let Some(user) = self.keys.user_of_live(message.get_channel_name()) else {
            return;
        };
        if !self.desired.contains(&user) {
            return;
        }
        // An undecodable message still goes to the sessions, which catch up from the inbox
        // and step over the bad member there (seq 0: nothing can be told of it here).
        let live = match split_live(message.get_payload_bytes()) {
            Ok((epoch, member)) => {
                let (entry, error) = decode_stored(member, 0);
                if let Some(e) = error {
                    tracing::debug!(error = %e, "undecodable live message");
                }
                Live::new(EpochName::new(epoch), entry)
            }
            Err(e) => {
                tracing::debug!(error = %e, "undecodable live message");
                Live::new(EpochName::new(""), Stored::Undecodable { seq: 0, stamp: 0 })
            }
        };
        self.emit(LiveEvent::Message {
            user,
            live: Arc::new(live),
        });
    }

    /// Calls the hub's sink (nothing is subscribed before there is one).
    fn emit(&self, event: LiveEvent) {
        if let Some(sink) = self.sink.get() {
            sink(event);
        }
    }
}
