//! The `Engine` trait: the store and live bus Ferry runs on, and the types that cross it.
//! Two implementations: `RedisEngine` (a cluster's shared truth) and `EmbeddedEngine` (one node).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_shared::{MessageId, UserId};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

/// One stored message, as read from an inbox or received live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    pub seq: u64,
    pub from: UserId,
    pub id: MessageId,
    /// Unix time in milliseconds when the gateway stored it.
    pub ts: u64,
    pub body: Bytes,
}

/// A message to append to `to`'s inbox.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub from: UserId,
    pub to: UserId,
    pub id: MessageId,
    pub ts: u64,
    pub body: Bytes,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored as `seq` and published live.
    Stored { seq: u64 },
    /// The same sender, recipient and id were stored within the dedupe window as `seq`;
    /// nothing was written.
    Duplicate { seq: u64 },
    /// The inbox holds `max_inbox` unacknowledged messages; nothing was written.
    InboxFull,
}

/// An inbox's incarnation and the highest seq ever allocated in it (0 if none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxState {
    pub epoch: String,
    pub head: u64,
}

/// Something the node's live bus tells the hub.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// `msg` was stored in `user`'s inbox.
    Message {
        user: UserId,
        msg: Arc<InboxMessage>,
    },
    /// Live notifications may have been lost (the pub/sub connection dropped and is back, or a
    /// buffer overflowed): every session must catch up from the store.
    Resync,
}

/// Settings shared by both engines.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Prefix of every Redis key and channel.
    pub key_prefix: String,
    /// Unacknowledged messages per inbox before `InboxFull`.
    pub max_inbox: u64,
    /// An inbox untouched this long expires; a new epoch follows.
    pub inbox_ttl: Duration,
    /// How long a (sender, recipient, id) is remembered for dedupe.
    pub dedupe_window: Duration,
    /// A store command slower than this fails with `EngineError::Unavailable`.
    pub store_timeout: Duration,
    /// Capacity of the channel from the live bus to the hub.
    pub live_buffer: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            key_prefix: "ferry".into(),
            max_inbox: 10_000,
            inbox_ttl: Duration::from_secs(30 * 24 * 3600),
            dedupe_window: Duration::from_secs(60),
            store_timeout: Duration::from_secs(2),
            live_buffer: 65_536,
        }
    }
}

/// Why a store operation failed. The gateway maps these to protocol error codes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The store could not be reached in time; the operation may or may not have happened.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something unexpected.
    #[error("store fault: {0}")]
    Internal(String),
}

/// The store and live bus. Object-safe, so the gateway holds an `Arc<dyn Engine>` chosen at start.
///
/// Every operation on one user's data is atomic. `subscribe` and `unsubscribe` take effect in the
/// order they are *called*: the request is queued when the method is called, not when the future
/// is first polled, and dropping the future does not cancel it.
pub trait Engine: Send + Sync + 'static {
    /// "redis" or "embedded", for logs and metrics.
    fn name(&self) -> &'static str;

    /// Dedupe check, capacity check, epoch creation, seq allocation, store, TTL refresh and live
    /// publish, atomically, checks before writes.
    fn append<'a>(
        &'a self,
        msg: &'a NewMessage,
    ) -> BoxFuture<'a, Result<AppendOutcome, EngineError>>;

    /// Up to `limit` messages with seq above `after`, in seq order.
    fn read_after<'a>(
        &'a self,
        user: &'a UserId,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<InboxMessage>, EngineError>>;

    /// Deletes every message with seq at or below `upto` (a cumulative ack).
    fn trim<'a>(&'a self, user: &'a UserId, upto: u64) -> BoxFuture<'a, Result<(), EngineError>>;

    /// The inbox's epoch (created and stored now if absent) and head; refreshes its TTL.
    /// Called at `hello`.
    fn open_inbox<'a>(&'a self, user: &'a UserId)
    -> BoxFuture<'a, Result<InboxState, EngineError>>;

    /// The inbox's epoch and head without creating anything: `None` if the inbox has no epoch
    /// (never reported, expired or lost). Used by the periodic position check.
    fn inbox_state<'a>(
        &'a self,
        user: &'a UserId,
    ) -> BoxFuture<'a, Result<Option<InboxState>, EngineError>>;

    /// Starts live delivery of `user`'s messages to this node; resolves once it is in effect.
    /// An `Unavailable` error means it was not in effect within `store_timeout`; the request
    /// still stands (and takes effect when the live bus is back) until `unsubscribe`.
    fn subscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>>;

    /// Stops live delivery of `user`'s messages to this node.
    fn unsubscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>>;

    /// The node's live events. The hub takes it once; later calls return `None`.
    fn take_live_events(&self) -> Option<mpsc::Receiver<LiveEvent>>;

    /// Whether the store answers now (for `/readyz`).
    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>>;
}
