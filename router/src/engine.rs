//! The `Engine` trait: the store and live bus Ferry runs on, and the types that cross it.
//! Two implementations: `RedisEngine` (a cluster's shared truth) and `EmbeddedEngine` (one node).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use ferry_shared::{DeviceId, MessageId, UserId};
use futures_util::future::BoxFuture;

/// One stored message, as read from an inbox or received live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    pub seq: u64,
    pub from: UserId,
    pub id: MessageId,
    /// Unix time in milliseconds when the gateway stored it.
    pub ts: u64,
    pub body: Bytes,
    /// When the store wrote it, on the store's own clock (microseconds; 0 if unknown). Within
    /// one inbox a later write has a later stamp, which is how a seq reused after the store
    /// went back in time is told apart from a copy of one already delivered.
    pub stamp: u64,
}

/// One inbox entry, read or received live: a message, or a member that cannot be decoded
/// (written by something else, or damaged). Sessions step over the latter; the Redis engine
/// moves it out of the inbox when it reads it, and counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Message(InboxMessage),
    /// `seq` and `stamp` as far as they could be read (0 when unknown).
    Undecodable {
        seq: u64,
        stamp: u64,
    },
}

impl Stored {
    pub fn seq(&self) -> u64 {
        match self {
            Stored::Message(msg) => msg.seq,
            Stored::Undecodable { seq, .. } => *seq,
        }
    }

    pub fn stamp(&self) -> u64 {
        match self {
            Stored::Message(msg) => msg.stamp,
            Stored::Undecodable { stamp, .. } => *stamp,
        }
    }
}

/// A page of an inbox read: its entries in seq order, and whether the byte bound cut it short
/// (then more may follow even though fewer than the limit came).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    pub entries: Vec<Stored>,
    pub cut: bool,
    /// Every seq at or below `floor` is gone from the inbox (trimmed).
    pub floor: u64,
    /// The reading device's acknowledged position in this epoch (0 if none): what lies between
    /// it and `floor` was trimmed before the device acknowledged it, a gap it must be told of.
    pub device_acked: u64,
    /// The inbox's head (its highest seq allocated) when the read ran, read in the same atomic
    /// step as the entries. A seq is allocated and stored in one step, so a read that was not
    /// cut short and returned fewer entries than asked shows every seq after its last entry up
    /// to `head` gone from the inbox.
    pub head: u64,
}

/// An epoch's name, held inline so that a live message carries it without an allocation.
/// Ferry's epochs are 12 characters; a longer name (written by something else) is held as empty,
/// which equals no session's epoch, so such a message makes the session check with the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EpochName {
    len: u8,
    bytes: [u8; EpochName::MAX],
}

impl EpochName {
    const MAX: usize = 23;

    pub fn new(name: &str) -> Self {
        let mut bytes = [0; Self::MAX];
        if name.len() > Self::MAX {
            return Self { len: 0, bytes };
        }
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        Self {
            len: name.len() as u8,
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ever built from a `&str` cut at its end.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::fmt::Debug for EpochName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// A live notification: an entry stored in the inbox incarnation `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub epoch: EpochName,
    pub entry: Stored,
    /// The edge's encodings of this entry, one slot per wire format, made by the first session
    /// that writes it and shared by the user's other sessions on the node.
    pub frames: [OnceLock<Bytes>; 2],
}

impl Live {
    pub fn new(epoch: EpochName, entry: Stored) -> Self {
        Self {
            epoch,
            entry,
            frames: Default::default(),
        }
    }
}

/// Where a session stands in an inbox, as the store checks it before every read and trim: the
/// incarnation, the highest seq delivered, and a store time by which everything at or below
/// that seq had been stored (a message's stamp, or the time the inbox was opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position<'a> {
    pub epoch: &'a str,
    pub delivered: u64,
    pub stamp: u64,
    /// The session's device: a trim acknowledges for it, a read reports its position, and each
    /// check refreshes when it was last seen.
    pub device: &'a DeviceId,
}

/// The answer of an operation checked against a session's `Position`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked<T> {
    /// The position holds; the operation was done.
    Valid(T),
    /// The position is void and nothing was done: the inbox has another epoch now. Either its
    /// data was lost, or the check found that it went back in time (its head below `delivered`,
    /// or a seq at or below `delivered` stored after `stamp`) and ended the epoch itself, so
    /// that every connection of the user learns `reset`.
    Void,
}

/// A message to append to `to`'s inbox.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub from: UserId,
    pub to: UserId,
    pub id: MessageId,
    pub ts: u64,
    pub body: Bytes,
    /// What the append checks of the sender beyond the inbox's own bounds.
    pub checks: SenderChecks,
}

/// The recipient policy an append enforces for its sender (the gateway's `--recipients` and
/// `--max-inbox-share`); the default checks nothing, as for the server API, whose backend may
/// publish to anyone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderChecks {
    /// The recipient must be known: it has a device record (it connected, and has not been
    /// erased or removed every device since). Otherwise `UnknownRecipient`.
    pub known_recipient: bool,
    /// At most this many of the sender's messages may be in the recipient's inbox at once
    /// (0: no bound). Beyond it, `ShareFull`. Messages are counted once the inbox holds a
    /// quarter of the share (so that an inbox that is read costs nothing to count): a sender
    /// holds at most a share and a quarter.
    pub max_share: u64,
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
    /// The inbox holds `max_share` messages of this sender; nothing was written.
    ShareFull,
    /// The recipient is not known and the checks ask for a known one; nothing was written.
    UnknownRecipient,
}

/// An inbox's incarnation and the highest seq ever allocated in it (0 if none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxState {
    pub epoch: String,
    pub head: u64,
}

/// An inbox as `hello` finds it: its state, and the store time of the opening (every seq at or
/// below `head` was stored by then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub epoch: String,
    pub head: u64,
    pub stamp: u64,
    /// Every seq at or below `floor` is gone from the inbox (trimmed).
    pub floor: u64,
    /// The device as the store knew it before this opening.
    pub device: DeviceSeen,
}

/// What the store knew of a device when `hello` opened its inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSeen {
    /// No record: a new device, or one evicted by the device cap.
    New,
    /// A record of another epoch: its position is void.
    OtherEpoch,
    /// Its acknowledged position in this epoch.
    At(u64),
}

/// One device of a user, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device: String,
    /// Its acknowledged position in the current epoch (0 if its record is of another one).
    pub acked: u64,
    /// When it was last seen (a `hello`, an ack or a position check), unix milliseconds.
    pub last_seen_ms: u64,
    /// Whether it holds the inbox: seen within `device_ttl`. One that does not no longer keeps
    /// messages from being trimmed.
    pub holding: bool,
}

/// An inbox's state for the server API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxInfo {
    pub epoch: String,
    /// The highest seq ever allocated in this inbox (0 if none).
    pub head: u64,
    /// Every seq at or below it is gone (trimmed).
    pub floor: u64,
    /// The lowest seq stored, if any.
    pub oldest: Option<u64>,
    /// Messages stored.
    pub count: u64,
}

/// What the store check found besides an answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreReport {
    /// The store's eviction policy (Redis's `maxmemory-policy`), if it has one.
    pub eviction_policy: Option<String>,
    /// Whether the store may evict Ferry's keys under memory pressure: its policy is not
    /// `noeviction` (with or without a memory limit now: one set later would make it evict).
    /// Eviction can take an inbox's `meta` or its messages.
    pub may_evict: bool,
    /// On a Redis Cluster, the shards whose primary did not answer this check, and slots with
    /// no primary at all (each with why): their users' commands are `unavailable` until the
    /// cluster fails over. The check itself fails only when no primary answers.
    pub shards_down: Vec<String>,
}

/// Where the engine hands its live events: the hub's dispatch, called from the engine's own task
/// (the Redis engine's pub/sub task), so a live message takes no extra task hop. It must not
/// block.
pub type LiveSink = Arc<dyn Fn(LiveEvent) + Send + Sync>;

/// Something the node's live bus tells the hub.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    /// Something was stored in `user`'s inbox.
    Message { user: UserId, live: Arc<Live> },
    /// Live notifications may have been lost (a buffer overflowed): every session must catch up
    /// from the store.
    Resync,
    /// Live notifications for these users may have been lost (their shard's pub/sub connection
    /// dropped and is back, or their slot moved): their sessions must catch up from the store.
    ResyncUsers(Vec<UserId>),
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
    /// Capacity of the embedded engine's channel from its appends to the hub.
    pub live_buffer: usize,
    /// Replicas that must acknowledge an append before it is answered (`WAIT`); 0: none.
    pub min_replicas_ack: u32,
    /// A device silent this long stops holding the inbox: messages it did not acknowledge may
    /// then be trimmed, and it learns of the gap when it comes back.
    pub device_ttl: Duration,
    /// Devices kept per user; a new one beyond it evicts the one seen longest ago.
    pub max_devices: usize,
    /// How long the Redis engine remembers its appends, to check after a store restart or
    /// failover that each is still there (a store that lost acknowledged writes ends the epoch
    /// of every inbox that lost one, so its recipients learn `reset`).
    pub audit_window: Duration,
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
            min_replicas_ack: 0,
            device_ttl: Duration::from_secs(7 * 24 * 3600),
            max_devices: 16,
            audit_window: Duration::from_secs(10),
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
    /// publish, atomically, checks before writes. Issued when called: the appends of one sender
    /// reach the store in the order of the calls, however many are in flight.
    fn append(&self, msg: &NewMessage) -> BoxFuture<'static, Result<AppendOutcome, EngineError>>;

    /// Up to `limit` entries with seq above `at.delivered`, in seq order, once `at` is checked;
    /// fewer when they would pass `max_bytes` (but at least one, whatever its size).
    fn read_after(
        &self,
        user: &UserId,
        at: &Position<'_>,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'static, Result<Checked<Page>, EngineError>>;

    /// A cumulative ack of `at.device` up to `upto` (at most `at.delivered`), once `at` is
    /// checked: the device's position moves up to `upto`, and every message at or below the
    /// lowest position of the user's holding devices is deleted.
    fn trim(
        &self,
        user: &UserId,
        at: &Position<'_>,
        upto: u64,
    ) -> BoxFuture<'static, Result<Checked<()>, EngineError>>;

    /// The inbox's head, once `at` is checked (the periodic position check).
    fn check_position(
        &self,
        user: &UserId,
        at: &Position<'_>,
    ) -> BoxFuture<'static, Result<Checked<u64>, EngineError>>;

    /// Opens the inbox at `hello`: creates and stores its epoch if absent and refreshes its TTL.
    /// `claim` is the client's resume point (epoch, last_seq): a `last_seq` beyond the head of
    /// that same epoch means the store went back in time, and the epoch is ended (replaced) in
    /// the same atomic step. `device` is recorded as seen (a new one at the floor, evicting the
    /// device seen longest ago when the user has `max_devices`).
    fn open_inbox(
        &self,
        user: &UserId,
        device: &DeviceId,
        claim: Option<(&str, u64)>,
    ) -> BoxFuture<'static, Result<Opened, EngineError>>;

    /// The user's devices, in name order.
    fn devices(&self, user: &UserId) -> BoxFuture<'static, Result<Vec<DeviceInfo>, EngineError>>;

    /// Forgets a device (it no longer holds the inbox; what only it held is trimmed). True if
    /// it was known.
    fn remove_device(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> BoxFuture<'static, Result<bool, EngineError>>;

    /// Takes up to `want` bytes from `user`'s store quota, a token bucket of `burst` bytes
    /// refilled at `rate` bytes per second, kept in the store so that every node shares it (the
    /// gateway leases from it in chunks, see `users.rs`): how many bytes it granted. An engine
    /// that serves one node has no quota of its own to share and grants everything.
    fn take_quota(
        &self,
        user: &UserId,
        want: u64,
        rate: u64,
        burst: u64,
    ) -> BoxFuture<'static, Result<u64, EngineError>> {
        let _ = (user, rate, burst);
        Box::pin(std::future::ready(Ok(want)))
    }

    /// Settles a node's lease on `user`'s quota when the node forgets it: charges `owed` bytes
    /// spent ahead of the grants (the bucket may go below zero), or gives back `-owed` bytes
    /// granted and not spent.
    fn settle_quota(
        &self,
        user: &UserId,
        owed: i64,
        rate: u64,
        burst: u64,
    ) -> BoxFuture<'static, Result<(), EngineError>> {
        let _ = (user, owed, rate, burst);
        Box::pin(std::future::ready(Ok(())))
    }

    /// Whether `take_quota` is shared by several nodes (a store of its own).
    fn shares_quota(&self) -> bool {
        false
    }

    /// The inbox's state, without creating anything: `None` if it has no epoch.
    fn inbox_info(
        &self,
        user: &UserId,
    ) -> BoxFuture<'static, Result<Option<InboxInfo>, EngineError>>;

    /// Erases the inbox: its messages, epoch, floor and devices. Only the seq counter is kept
    /// (no personal data), so that a seq is never given twice: a `send` retried within the
    /// dedupe window is answered with the seq it got, which names nothing now. Connected
    /// sessions find their position void and reconnect to a new epoch. True if there was an
    /// inbox.
    fn delete_inbox(&self, user: &UserId) -> BoxFuture<'static, Result<bool, EngineError>>;

    /// The inbox's epoch and head without creating anything: `None` if the inbox has no epoch
    /// (never reported, expired or lost).
    fn inbox_state(
        &self,
        user: &UserId,
    ) -> BoxFuture<'static, Result<Option<InboxState>, EngineError>>;

    /// Ends the inbox's incarnation `epoch` if it is still the current one (compare and set):
    /// a session saw a reused seq (counted as `seq_reused`). True if it was ended now.
    fn end_epoch(
        &self,
        user: &UserId,
        epoch: &str,
    ) -> BoxFuture<'static, Result<bool, EngineError>>;

    /// Starts live delivery of `user`'s messages to this node; resolves once it is in effect.
    /// An `Unavailable` error means it was not in effect within `store_timeout`; the request
    /// still stands (and takes effect when the live bus is back) until `unsubscribe`.
    fn subscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>>;

    /// Stops live delivery of `user`'s messages to this node.
    fn unsubscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>>;

    /// Where live events go from now on (the hub sets it once). Events before it are dropped,
    /// which is safe: nobody is subscribed before there is a hub.
    fn set_live_sink(&self, sink: LiveSink);

    /// Whether the store answers now (for `/readyz`).
    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>>;

    /// The store watchdog's periodic check, on a connection of its own so a busy store path never
    /// looks like an outage: answers like `ping`, reports the store's eviction policy, and lets
    /// the engine notice a store that restarted or failed over (the Redis engine then audits its
    /// recent appends).
    fn check(&self) -> BoxFuture<'_, Result<StoreReport, EngineError>>;
}
