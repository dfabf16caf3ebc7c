//! Helpers shared by the router's integration tests: ids and messages, bounded waits, an engine
//! wrapper that records subscriptions, and `on_both_engines!`, which runs one test body against
//! the embedded engine, against a Redis engine on its own fresh `redis-server`, and against a
//! Redis engine in cluster mode on the process's shared Redis Cluster (under a prefix of its
//! own).

#![allow(dead_code, unused_macros)]

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_router::{
    AppendOutcome, Checked, DeviceInfo, Engine, EngineError, EngineOptions, InboxInfo,
    InboxMessage, InboxState, LiveEvent, LiveSink, NewMessage, Opened, Page, Position,
    SenderChecks, StoreReport, Stored,
};
use ferry_shared::{DeviceId, MessageId, UserId};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

/// The longest any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);
/// The longest a whole test body may take.
pub const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Defines `mod $name { fn embedded(); fn redis(); }`, two tests running `$body` (an async block
/// that uses the engine as `$engine`) on each engine built with `$options`.
macro_rules! on_both_engines {
    ($name:ident, $options:expr, |$engine:ident| $body:expr) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                let $engine: std::sync::Arc<dyn ferry_router::Engine> =
                    std::sync::Arc::new(ferry_router::EmbeddedEngine::new($options));
                common::bounded($body).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                let server = ferry_router::testkit::RedisServer::start();
                let $engine: std::sync::Arc<dyn ferry_router::Engine> = std::sync::Arc::new(
                    ferry_router::RedisEngine::connect(&server.url(), $options, 4)
                        .await
                        .expect("a valid URL"),
                );
                common::bounded($body).await;
                drop(server);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                let cluster = ferry_router::testkit::RedisCluster::shared();
                let target = ferry_router::RedisTarget {
                    urls: cluster.seed_urls(),
                    cluster: true,
                    ..ferry_router::RedisTarget::default()
                };
                let options = ferry_router::EngineOptions {
                    key_prefix: ferry_router::testkit::unique_prefix(),
                    ..$options
                };
                let $engine: std::sync::Arc<dyn ferry_router::Engine> = std::sync::Arc::new(
                    ferry_router::RedisEngine::connect_to(&target, options, 4)
                        .await
                        .expect("valid seed URLs"),
                );
                common::bounded($body).await;
            }
        }
    };
}

/// Runs a whole test body with an upper bound.
pub async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_LIMIT, body)
        .await
        .unwrap_or_else(|_| panic!("test body did not finish within {TEST_LIMIT:?}"));
}

/// Awaits `work` for at most `WAIT`.
pub async fn within<F: Future>(what: &str, work: F) -> F::Output {
    tokio::time::timeout(WAIT, work)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Options for tests: defaults with a short store timeout.
pub fn options() -> EngineOptions {
    EngineOptions {
        store_timeout: Duration::from_secs(2),
        live_buffer: 1024,
        ..EngineOptions::default()
    }
}

pub fn user(name: &str) -> UserId {
    UserId::parse(name).expect("a valid user id")
}

pub fn message(from: &str, to: &str, id: &str, body: &[u8]) -> NewMessage {
    NewMessage {
        from: user(from),
        to: user(to),
        id: MessageId::parse(id).expect("a valid message id"),
        ts: 1_764_086_400_000,
        body: Bytes::copy_from_slice(body),
        checks: SenderChecks::default(),
    }
}

/// Appends and expects it stored; returns the seq.
pub async fn stored(engine: &dyn Engine, msg: &NewMessage) -> u64 {
    match engine.append(msg).await {
        Ok(AppendOutcome::Stored { seq }) => seq,
        other => panic!("expected stored, got {other:?}"),
    }
}

/// Appends `n` messages from alice to `to` with ids `<prefix>-<i>`; returns their seqs.
pub async fn fill(engine: &dyn Engine, to: &str, prefix: &str, n: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!("body {i}");
        let msg = message("alice", to, &format!("{prefix}-{i}"), body.as_bytes());
        seqs.push(stored(engine, &msg).await);
    }
    seqs
}

/// The inbox state of `name`, which must exist.
pub async fn inbox_state(engine: &dyn Engine, name: &str) -> InboxState {
    engine
        .inbox_state(&user(name))
        .await
        .expect("inbox_state")
        .expect("the inbox has an epoch")
}

/// `name`'s current epoch (empty if it has none).
pub async fn epoch(engine: &dyn Engine, name: &str) -> String {
    engine
        .inbox_state(&user(name))
        .await
        .expect("inbox_state")
        .map(|s| s.epoch)
        .unwrap_or_default()
}

/// The default device, as a connection that names none is.
pub static DEFAULT_DEVICE: LazyLock<DeviceId> = LazyLock::new(DeviceId::default_device);

/// A position of the default device at `delivered` in `epoch`, without a stamp.
pub fn at(epoch: &str, delivered: u64) -> Position<'_> {
    Position {
        epoch,
        delivered,
        stamp: 0,
        device: &DEFAULT_DEVICE,
    }
}

/// Up to `limit` messages of `name`'s inbox after `after`, read in its current epoch.
pub async fn read(engine: &dyn Engine, name: &str, after: u64, limit: usize) -> Vec<InboxMessage> {
    let epoch = epoch(engine, name).await;
    match engine
        .read_after(&user(name), &at(&epoch, after), limit, usize::MAX)
        .await
    {
        Ok(Checked::Valid(page)) => page
            .entries
            .into_iter()
            .map(|entry| match entry {
                Stored::Message(msg) => msg,
                other => panic!("undecodable entry {other:?}"),
            })
            .collect(),
        other => panic!("read of {name} after {after}: {other:?}"),
    }
}

/// Trims `name`'s inbox up to `upto`, from a valid position in its current epoch.
pub async fn trim(engine: &dyn Engine, name: &str, upto: u64) {
    let state = inbox_state(engine, name).await;
    let trimmed = engine
        .trim(&user(name), &at(&state.epoch, state.head), upto)
        .await;
    assert_eq!(trimmed.expect("trim"), Checked::Valid(()), "trim of {name}");
}

/// The engine's live events, from now on.
pub fn live_events(engine: &dyn Engine) -> mpsc::UnboundedReceiver<LiveEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let sink: LiveSink = Arc::new(move |event| {
        let _ = tx.send(event);
    });
    engine.set_live_sink(sink);
    rx
}

/// Like `live_events`, but the sink holds every event until `Gate::open` is called: the engine's
/// own buffering between its appends and the sink is then certain to fill up.
pub fn gated_live_events(engine: &dyn Engine) -> (mpsc::UnboundedReceiver<LiveEvent>, Gate) {
    let (tx, rx) = mpsc::unbounded_channel();
    let gate = Gate::default();
    let held = gate.clone();
    let sink: LiveSink = Arc::new(move |event| {
        held.wait();
        let _ = tx.send(event);
    });
    engine.set_live_sink(sink);
    (rx, gate)
}

/// A one-way gate threads wait at until it opens (at most `WAIT`).
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    pub fn open(&self) {
        *self.0.0.lock().unwrap() = true;
        self.0.1.notify_all();
    }

    /// Called by the engine on a runtime worker: `block_in_place` hands the worker's other tasks
    /// to another thread meanwhile, so a held sink cannot starve the appends it waits for (with
    /// two workers, two held events did, now and then).
    fn wait(&self) {
        tokio::task::block_in_place(|| {
            let open = self.0.0.lock().unwrap();
            let _ = self.0.1.wait_timeout_while(open, WAIT, |open| !*open);
        });
    }
}

/// Opens `name`'s inbox without a claim: its (epoch, head).
pub async fn open(engine: &dyn Engine, name: &str) -> InboxState {
    let Opened { epoch, head, .. } = engine
        .open_inbox(&user(name), &DEFAULT_DEVICE, None)
        .await
        .expect("open_inbox");
    InboxState { epoch, head }
}

pub fn seqs(messages: &[InboxMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

/// The next live event, within `WAIT`.
pub async fn next_event(events: &mut mpsc::UnboundedReceiver<LiveEvent>) -> LiveEvent {
    within("a live event", events.recv())
        .await
        .expect("the live channel is open")
}

/// The next live event, which must be a message for `to`; returns its seq.
pub async fn next_message(events: &mut mpsc::UnboundedReceiver<LiveEvent>, to: &str) -> u64 {
    match next_event(events).await {
        LiveEvent::Message { user: u, live } if u == user(to) => live.entry.seq(),
        other => panic!("expected a message for {to}, got {other:?}"),
    }
}

/// Delegates to an engine and records subscribe (`+user`) and unsubscribe (`-user`) calls in the
/// order they were made.
pub struct Recorder {
    inner: Arc<dyn Engine>,
    calls: Mutex<Vec<String>>,
}

impl Recorder {
    pub fn new(inner: Arc<dyn Engine>) -> Arc<Recorder> {
        Arc::new(Recorder {
            inner,
            calls: Mutex::new(Vec::new()),
        })
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl Engine for Recorder {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn append(&self, msg: &NewMessage) -> BoxFuture<'static, Result<AppendOutcome, EngineError>> {
        self.inner.append(msg)
    }

    fn read_after(
        &self,
        user: &UserId,
        at: &Position<'_>,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'static, Result<Checked<Page>, EngineError>> {
        self.inner.read_after(user, at, limit, max_bytes)
    }

    fn trim(
        &self,
        user: &UserId,
        at: &Position<'_>,
        upto: u64,
    ) -> BoxFuture<'static, Result<Checked<()>, EngineError>> {
        self.inner.trim(user, at, upto)
    }

    fn check_position(
        &self,
        user: &UserId,
        at: &Position<'_>,
    ) -> BoxFuture<'static, Result<Checked<u64>, EngineError>> {
        self.inner.check_position(user, at)
    }

    fn open_inbox(
        &self,
        user: &UserId,
        device: &DeviceId,
        claim: Option<(&str, u64)>,
    ) -> BoxFuture<'static, Result<Opened, EngineError>> {
        self.inner.open_inbox(user, device, claim)
    }

    fn devices(&self, user: &UserId) -> BoxFuture<'static, Result<Vec<DeviceInfo>, EngineError>> {
        self.inner.devices(user)
    }

    fn remove_device(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> BoxFuture<'static, Result<bool, EngineError>> {
        self.inner.remove_device(user, device)
    }

    fn inbox_info(
        &self,
        user: &UserId,
    ) -> BoxFuture<'static, Result<Option<InboxInfo>, EngineError>> {
        self.inner.inbox_info(user)
    }

    fn delete_inbox(&self, user: &UserId) -> BoxFuture<'static, Result<bool, EngineError>> {
        self.inner.delete_inbox(user)
    }

    fn inbox_state(
        &self,
        user: &UserId,
    ) -> BoxFuture<'static, Result<Option<InboxState>, EngineError>> {
        self.inner.inbox_state(user)
    }

    fn end_epoch(
        &self,
        user: &UserId,
        epoch: &str,
    ) -> BoxFuture<'static, Result<bool, EngineError>> {
        self.inner.end_epoch(user, epoch)
    }

    fn subscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.calls.lock().unwrap().push(format!("+{user}"));
        self.inner.subscribe(user)
    }

    fn unsubscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.calls.lock().unwrap().push(format!("-{user}"));
        self.inner.unsubscribe(user)
    }

    fn set_live_sink(&self, sink: LiveSink) {
        self.inner.set_live_sink(sink);
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        self.inner.ping()
    }

    fn check(&self) -> BoxFuture<'_, Result<StoreReport, EngineError>> {
        self.inner.check()
    }
}

pub fn device(name: &str) -> DeviceId {
    DeviceId::parse(name).expect("a valid device id")
}

/// Opens `name`'s inbox as `device`, without a claim.
pub async fn open_as(engine: &dyn Engine, name: &str, device: &DeviceId) -> Opened {
    engine
        .open_inbox(&user(name), device, None)
        .await
        .expect("open_inbox")
}

/// Acknowledges up to `upto` as `device`, from a valid position in the current epoch.
pub async fn ack_as(engine: &dyn Engine, name: &str, device: &DeviceId, upto: u64) {
    let state = inbox_state(engine, name).await;
    let at = Position {
        epoch: &state.epoch,
        delivered: state.head,
        stamp: 0,
        device,
    };
    let trimmed = engine.trim(&user(name), &at, upto).await.expect("trim");
    assert_eq!(trimmed, Checked::Valid(()));
}
