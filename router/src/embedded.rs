//! The embedded engine: the Redis engine's semantics in one process, for a single node (a
//! laptop, a demo, the single-process tests). Nothing survives the process, so every inbox gets a
//! new epoch after a restart and clients learn through `reset` that their inboxes were lost.
//!
//! One mutex orders everything: an append stores, allocates its seq and hands the live event to
//! the bus under it, so live events leave in seq order, as Redis's single-threaded scripts do.
//!
//! Live bus overflow: the append never waits for the hub. When the hub's channel is full, the
//! message is not sent and a `Resync` is owed; a task sends it as soon as there is room, and until
//! then further live messages are dropped. That is safe because every dropped message is already
//! in the store that the resync makes every session read.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ferry_shared::{DeviceId, MessageId, UserId};
use futures_util::future::{self, BoxFuture};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::Instant;

use crate::devices::{Devices, opening_position};
use crate::engine::{
    AppendOutcome, Checked, DeviceInfo, Engine, EngineError, EngineOptions, EpochName, InboxInfo,
    InboxMessage, InboxState, Live, LiveEvent, LiveSink, NewMessage, Opened, Page, Position,
    StoreReport, Stored,
};
use crate::epoch::new_epoch;
use crate::metrics;

/// How often expired inboxes of users who never came back are swept out, at most.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// An engine without Redis.
pub struct EmbeddedEngine {
    options: EngineOptions,
    /// When the engine started, on the runtime's clock and as unix milliseconds: device times
    /// follow the runtime's clock (so tests can advance it) but read as wall-clock times.
    started: (Instant, u64),
    state: Arc<Mutex<State>>,
    /// The live events until the hub sets its sink.
    live_events: Mutex<Option<mpsc::Receiver<LiveEvent>>>,
}

/// (recipient, sender, id): what a dedupe entry remembers a `send` by.
type DedupeKey = (UserId, UserId, MessageId);

struct State {
    inboxes: HashMap<UserId, Inbox>,
    /// The seq each recent `send` got, until it expires.
    dedupe: HashMap<DedupeKey, Remembered>,
    /// Dedupe entries in expiry order (the window is fixed), for lazy purging.
    dedupe_expiry: VecDeque<(DedupeKey, Instant)>,
    /// When expired inboxes are next swept out.
    next_sweep: Instant,
    /// Users this node wants live messages for.
    subscribed: HashSet<UserId>,
    live: mpsc::Sender<LiveEvent>,
    /// A `Resync` is owed to the hub (a task is waiting for room to send it).
    resync_owed: bool,
    /// The engine's clock for stamps: one tick per append, so stamps order an inbox's writes.
    clock: u64,
    /// The last seq of each erased inbox, until the inbox would have expired: a new one counts
    /// on from it, so a seq is never given twice (a retried send answered from the dedupe
    /// window names an erased message, never another one).
    erased: HashMap<UserId, (u64, Instant)>,
}

struct Inbox {
    epoch: String,
    /// The last allocated seq.
    seq: u64,
    messages: BTreeMap<u64, InboxMessage>,
    /// The highest seq trimmed.
    floor: u64,
    devices: Devices,
    /// The seqs of the messages each sender holds here, for senders whose appends counted
    /// their share (`SenderChecks::max_share`); trimmed with the messages.
    senders: HashMap<UserId, BTreeSet<u64>>,
    /// The inbox is gone at this instant unless an append or open refreshes it.
    expires: Instant,
}

/// A position found void by `State::verify`.
struct Void;

struct Remembered {
    seq: u64,
    expires: Instant,
}

impl EmbeddedEngine {
    pub fn new(options: EngineOptions) -> EmbeddedEngine {
        let (live, live_events) = mpsc::channel(options.live_buffer.max(1));
        metrics::init();
        let state = State {
            inboxes: HashMap::new(),
            dedupe: HashMap::new(),
            dedupe_expiry: VecDeque::new(),
            next_sweep: Instant::now() + SWEEP_INTERVAL,
            subscribed: HashSet::new(),
            live,
            resync_owed: false,
            clock: 0,
            erased: HashMap::new(),
        };
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        EmbeddedEngine {
            options,
            started: (Instant::now(), unix_ms),
            state: Arc::new(Mutex::new(state)),
            live_events: Mutex::new(Some(live_events)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Unix milliseconds at `now`, on the runtime's clock.
    fn unix_ms(&self, now: Instant) -> u64 {
        let since = u64::try_from((now - self.started.0).as_millis()).unwrap_or(u64::MAX);
        self.started.1.saturating_add(since)
    }

    fn device_ttl_ms(&self) -> u64 {
        u64::try_from(self.options.device_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    fn append_now(&self, msg: &NewMessage) -> AppendOutcome {
        let now = Instant::now();
        let mut guard = self.lock();
        let state = &mut *guard;
        state.purge(now);
        let key = (msg.to.clone(), msg.from.clone(), msg.id.clone());
        if let Some(seen) = state.dedupe.get(&key).filter(|r| r.expires > now) {
            return AppendOutcome::Duplicate { seq: seen.seq };
        }
        let (now_ms, ttl_ms) = (self.unix_ms(now), self.device_ttl_ms());
        // Whether the sender's share counts this message, on the inbox as it is before room is
        // made (as the append script decides it).
        let counted = match state.live_inbox(&msg.to, now) {
            Some(inbox) => {
                if let Some(refused) = inbox.refuses(msg) {
                    return refused;
                }
                inbox.counts_share(msg)
            }
            None if msg.checks.known_recipient => return AppendOutcome::UnknownRecipient,
            None => msg.checks.max_share > 0 && msg.checks.max_share / 4 == 0,
        };
        if let Some(inbox) = state.live_inbox(&msg.to, now)
            && inbox.messages.len() as u64 >= self.options.max_inbox
            && !inbox.make_room(self.options.max_inbox, now_ms, ttl_ms)
        {
            return AppendOutcome::InboxFull;
        }
        state.clock += 1;
        let stamp = state.clock;
        if !state.inboxes.contains_key(&msg.to) {
            let inbox = state.new_inbox(&msg.to, now);
            state.inboxes.insert(msg.to.clone(), inbox);
        }
        let Some(inbox) = state.inboxes.get_mut(&msg.to) else {
            return AppendOutcome::InboxFull;
        };
        inbox.seq += 1;
        inbox.expires = now + self.options.inbox_ttl;
        let seq = inbox.seq;
        let epoch = EpochName::new(&inbox.epoch);
        let stored = InboxMessage {
            seq,
            from: msg.from.clone(),
            id: msg.id.clone(),
            ts: msg.ts,
            body: msg.body.clone(),
            stamp,
        };
        inbox.messages.insert(seq, stored.clone());
        if counted {
            inbox
                .senders
                .entry(msg.from.clone())
                .or_default()
                .insert(seq);
        }
        let expires = now + self.options.dedupe_window;
        state
            .dedupe
            .insert(key.clone(), Remembered { seq, expires });
        state.dedupe_expiry.push_back((key, expires));
        if state.subscribed.contains(&msg.to) {
            let live = Live::new(epoch, Stored::Message(stored));
            self.publish(state, msg.to.clone(), live);
        }
        AppendOutcome::Stored { seq }
    }

    /// Hands a stored message to the live bus, or owes the hub a resync (see the module docs).
    fn publish(&self, state: &mut State, user: UserId, live: Live) {
        if state.resync_owed {
            return;
        }
        let event = LiveEvent::Message {
            user,
            live: Arc::new(live),
        };
        match state.live.try_send(event) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!("live buffer full; sessions will catch up from the store");
                state.resync_owed = true;
                let shared = Arc::clone(&self.state);
                let live = state.live.clone();
                tokio::spawn(async move {
                    // Fails only when the hub is gone, and then nobody needs the resync.
                    let Ok(permit) = live.reserve().await else {
                        return;
                    };
                    let mut state = lock(&shared);
                    permit.send(LiveEvent::Resync);
                    state.resync_owed = false;
                    metrics::LIVE_RESYNCS.inc();
                });
            }
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Nothing under the lock can leave the state half-changed in a way a panic would expose.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inbox {
    fn new(now: Instant) -> Self {
        Self {
            epoch: new_epoch(),
            seq: 0,
            messages: BTreeMap::new(),
            floor: 0,
            devices: Devices::default(),
            senders: HashMap::new(),
            expires: now,
        }
    }

    /// Deletes every message at or below `upto`.
    fn trim(&mut self, upto: u64) {
        let Some(first_kept) = upto.checked_add(1) else {
            self.messages.clear();
            self.senders.clear();
            self.floor = upto;
            return;
        };
        self.messages = self.messages.split_off(&first_kept);
        self.senders.retain(|_, seqs| {
            *seqs = seqs.split_off(&first_kept);
            !seqs.is_empty()
        });
        self.floor = self.floor.max(upto);
    }

    /// Why `msg` may not be stored here under its checks, if it may not (after the dedupe
    /// check, before the inbox's own bound, as the append script checks).
    fn refuses(&self, msg: &NewMessage) -> Option<AppendOutcome> {
        if msg.checks.known_recipient && self.devices.records.is_empty() {
            return Some(AppendOutcome::UnknownRecipient);
        }
        let held = self.senders.get(&msg.from).map_or(0, BTreeSet::len) as u64;
        (self.counts_share(msg) && held >= msg.checks.max_share).then_some(AppendOutcome::ShareFull)
    }

    /// Whether `msg` counts against its sender's share: a share is given, and the inbox holds a
    /// quarter of one already (as the append script counts).
    fn counts_share(&self, msg: &NewMessage) -> bool {
        let share = msg.checks.max_share;
        share > 0 && self.messages.len() as u64 >= share / 4
    }

    /// Trims up to the lowest position of the holding devices.
    fn trim_to_devices(&mut self, now_ms: u64, ttl_ms: u64) {
        if let Some(low) = self.devices.low(&self.epoch, self.floor, now_ms, ttl_ms)
            && low > self.floor
        {
            self.trim(low);
        }
    }

    /// At `max_inbox`: drops the oldest messages to make room for one more, unless the most
    /// advanced holding device has `max` unacknowledged already, or the user has no device at
    /// all (nobody has ever read this inbox: it is not trimmed from under a first device). True
    /// if there is room now.
    fn make_room(&mut self, max: u64, now_ms: u64, ttl_ms: u64) -> bool {
        if self.devices.records.is_empty() {
            return false;
        }
        if let Some(high) = self.devices.high(&self.epoch, self.floor, now_ms, ttl_ms)
            && self.messages.range(high.saturating_add(1)..).count() as u64 >= max
        {
            return false;
        }
        let drop = self.messages.len() as u64 + 1 - max;
        if let Some(&upto) = self.messages.keys().nth(drop as usize - 1) {
            self.trim(upto);
        }
        true
    }
}

impl State {
    /// A new inbox for `user`, counting on from an erased one's seq.
    fn new_inbox(&mut self, user: &UserId, now: Instant) -> Inbox {
        let mut inbox = Inbox::new(now);
        if let Some((seq, expires)) = self.erased.remove(user)
            && expires > now
        {
            inbox.seq = seq;
        }
        inbox
    }

    /// `user`'s inbox unless it has expired (an expired one is removed).
    fn live_inbox(&mut self, user: &UserId, now: Instant) -> Option<&mut Inbox> {
        if self.inboxes.get(user).is_some_and(|i| i.expires <= now) {
            self.inboxes.remove(user);
        }
        self.inboxes.get_mut(user)
    }

    /// Checks a session's position as the Redis engine's scripts do (`script.rs`): `None` when
    /// it holds, or `Some(Void)` (ending the epoch when the inbox went back under it, which this
    /// engine never does by itself but tests can't rule out for a future one).
    fn verify(&mut self, user: &UserId, at: &Position, now: Instant) -> Option<Void> {
        let Some(inbox) = self.live_inbox(user, now) else {
            return Some(Void);
        };
        if inbox.epoch != at.epoch {
            return Some(Void);
        }
        let reused = at.stamp > 0
            && inbox
                .messages
                .range(..=at.delivered)
                .next_back()
                .is_some_and(|(_, msg)| msg.stamp > at.stamp);
        let why = if inbox.seq < at.delivered {
            "head_behind"
        } else if reused {
            "seq_reused"
        } else {
            return None;
        };
        inbox.epoch = new_epoch();
        metrics::epoch_replaced(user, why);
        Some(Void)
    }

    /// Forgets expired dedupe entries, and now and then expired inboxes.
    fn purge(&mut self, now: Instant) {
        while let Some((_, expires)) = self.dedupe_expiry.front() {
            if *expires > now {
                break;
            }
            if let Some((key, expires)) = self.dedupe_expiry.pop_front()
                && self.dedupe.get(&key).is_some_and(|r| r.expires == expires)
            {
                self.dedupe.remove(&key);
            }
        }
        if now >= self.next_sweep {
            self.inboxes.retain(|_, inbox| inbox.expires > now);
            self.erased.retain(|_, (_, expires)| *expires > now);
            self.next_sweep = now + SWEEP_INTERVAL;
        }
    }
}

impl Engine for EmbeddedEngine {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn append(&self, msg: &NewMessage) -> BoxFuture<'static, Result<AppendOutcome, EngineError>> {
        Box::pin(future::ready(Ok(self.append_now(msg))))
    }

    fn read_after(
        &self,
        user: &UserId,
        at: &Position<'_>,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'static, Result<Checked<Page>, EngineError>> {
        let now = Instant::now();
        let mut state = self.lock();
        let answer = match state.verify(user, at, now) {
            Some(Void) => Checked::Void,
            None => Checked::Valid(match state.live_inbox(user, now) {
                Some(inbox) if at.delivered < u64::MAX => {
                    let mut page = Page {
                        floor: inbox.floor,
                        head: inbox.seq,
                        device_acked: inbox
                            .devices
                            .records
                            .get(at.device.as_str())
                            .and_then(|r| r.acked_in(&inbox.epoch))
                            .unwrap_or(0),
                        ..Page::default()
                    };
                    let mut bytes = 0;
                    for msg in inbox
                        .messages
                        .range(at.delivered + 1..)
                        .take(limit)
                        .map(|(_, m)| m)
                    {
                        // The same bound as the Redis engine's, on what a stored member weighs.
                        bytes +=
                            msg.body.len() + msg.from.as_str().len() + msg.id.as_str().len() + 32;
                        if bytes > max_bytes && !page.entries.is_empty() {
                            page.cut = true;
                            break;
                        }
                        page.entries.push(Stored::Message(msg.clone()));
                    }
                    page
                }
                _ => Page::default(),
            }),
        };
        Box::pin(future::ready(Ok(answer)))
    }

    fn trim(
        &self,
        user: &UserId,
        at: &Position<'_>,
        upto: u64,
    ) -> BoxFuture<'static, Result<Checked<()>, EngineError>> {
        let now = Instant::now();
        let mut state = self.lock();
        let answer = match state.verify(user, at, now) {
            Some(Void) => Checked::Void,
            None => {
                let (now_ms, ttl_ms) = (self.unix_ms(now), self.device_ttl_ms());
                if let Some(inbox) = state.live_inbox(user, now) {
                    let epoch = inbox.epoch.clone();
                    inbox.devices.touch(
                        at.device.as_str(),
                        upto,
                        &epoch,
                        now_ms,
                        self.options.max_devices,
                    );
                    inbox.trim_to_devices(now_ms, ttl_ms);
                }
                Checked::Valid(())
            }
        };
        Box::pin(future::ready(Ok(answer)))
    }

    fn check_position(
        &self,
        user: &UserId,
        at: &Position<'_>,
    ) -> BoxFuture<'static, Result<Checked<u64>, EngineError>> {
        let now = Instant::now();
        let mut state = self.lock();
        let answer = match state.verify(user, at, now) {
            Some(Void) => Checked::Void,
            None => {
                let now_ms = self.unix_ms(now);
                Checked::Valid(state.live_inbox(user, now).map_or(0, |inbox| {
                    let epoch = inbox.epoch.clone();
                    let cap = self.options.max_devices;
                    inbox
                        .devices
                        .touch(at.device.as_str(), 0, &epoch, now_ms, cap);
                    inbox.seq
                }))
            }
        };
        Box::pin(future::ready(Ok(answer)))
    }

    fn open_inbox(
        &self,
        user: &UserId,
        device: &DeviceId,
        claim: Option<(&str, u64)>,
    ) -> BoxFuture<'static, Result<Opened, EngineError>> {
        let now = Instant::now();
        let now_ms = self.unix_ms(now);
        let mut guard = self.lock();
        let state = &mut *guard;
        state.purge(now);
        if state.live_inbox(user, now).is_none() {
            let inbox = state.new_inbox(user, now);
            state.inboxes.insert(user.clone(), inbox);
        }
        let stamp = state.clock;
        let opened = state
            .inboxes
            .get_mut(user)
            .map(|inbox| {
                inbox.expires = now + self.options.inbox_ttl;
                if claim
                    .is_some_and(|(epoch, last_seq)| epoch == inbox.epoch && last_seq > inbox.seq)
                {
                    inbox.epoch = new_epoch();
                    metrics::epoch_replaced(user, "resume_beyond_head");
                }
                let epoch = inbox.epoch.clone();
                let known = inbox.devices.records.contains_key(device.as_str());
                let claimed = claim
                    .filter(|(claimed, _)| *claimed == epoch)
                    .map(|(_, last_seq)| last_seq);
                let before = inbox.devices.touch(
                    device.as_str(),
                    opening_position(known, claimed, inbox.floor),
                    &epoch,
                    now_ms,
                    self.options.max_devices,
                );
                Opened {
                    epoch,
                    head: inbox.seq,
                    stamp,
                    floor: inbox.floor,
                    device: before,
                }
            })
            .ok_or_else(|| EngineError::Internal("inbox vanished while opened".into()));
        Box::pin(future::ready(opened))
    }

    fn inbox_state(
        &self,
        user: &UserId,
    ) -> BoxFuture<'static, Result<Option<InboxState>, EngineError>> {
        let mut state = self.lock();
        let answer = state
            .live_inbox(user, Instant::now())
            .map(|inbox| InboxState {
                epoch: inbox.epoch.clone(),
                head: inbox.seq,
            });
        Box::pin(future::ready(Ok(answer)))
    }

    fn devices(&self, user: &UserId) -> BoxFuture<'static, Result<Vec<DeviceInfo>, EngineError>> {
        let now = Instant::now();
        let (now_ms, ttl_ms) = (self.unix_ms(now), self.device_ttl_ms());
        let mut state = self.lock();
        let answer = state.live_inbox(user, now).map_or_else(Vec::new, |inbox| {
            inbox.devices.info(&inbox.epoch, now_ms, ttl_ms)
        });
        Box::pin(future::ready(Ok(answer)))
    }

    fn remove_device(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> BoxFuture<'static, Result<bool, EngineError>> {
        let now = Instant::now();
        let (now_ms, ttl_ms) = (self.unix_ms(now), self.device_ttl_ms());
        let mut state = self.lock();
        let removed = state.live_inbox(user, now).is_some_and(|inbox| {
            let removed = inbox.devices.records.remove(device.as_str()).is_some();
            if removed {
                inbox.trim_to_devices(now_ms, ttl_ms);
            }
            removed
        });
        Box::pin(future::ready(Ok(removed)))
    }

    fn inbox_info(
        &self,
        user: &UserId,
    ) -> BoxFuture<'static, Result<Option<InboxInfo>, EngineError>> {
        let mut state = self.lock();
        let answer = state
            .live_inbox(user, Instant::now())
            .map(|inbox| InboxInfo {
                epoch: inbox.epoch.clone(),
                head: inbox.seq,
                floor: inbox.floor,
                oldest: inbox.messages.keys().next().copied(),
                count: inbox.messages.len() as u64,
            });
        Box::pin(future::ready(Ok(answer)))
    }

    fn delete_inbox(&self, user: &UserId) -> BoxFuture<'static, Result<bool, EngineError>> {
        let now = Instant::now();
        let mut state = self.lock();
        let deleted = match state.inboxes.remove(user) {
            Some(inbox) => {
                // The seq counter outlives the erasure, as `meta`'s `seq` does in Redis.
                let expires = now + self.options.inbox_ttl;
                state.erased.insert(user.clone(), (inbox.seq, expires));
                inbox.expires > now
            }
            None => false,
        };
        Box::pin(future::ready(Ok(deleted)))
    }

    fn end_epoch(
        &self,
        user: &UserId,
        epoch: &str,
    ) -> BoxFuture<'static, Result<bool, EngineError>> {
        let mut state = self.lock();
        let ended = match state.live_inbox(user, Instant::now()) {
            Some(inbox) if inbox.epoch == epoch => {
                inbox.epoch = new_epoch();
                metrics::epoch_replaced(user, "seq_reused");
                true
            }
            _ => false,
        };
        Box::pin(future::ready(Ok(ended)))
    }

    fn subscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.lock().subscribed.insert(user.clone());
        Box::pin(future::ready(Ok(())))
    }

    fn unsubscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.lock().subscribed.remove(user);
        Box::pin(future::ready(Ok(())))
    }

    fn set_live_sink(&self, sink: LiveSink) {
        let taken = self
            .live_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut events) = taken else {
            tracing::error!("the engine's live sink was already set; the second one is ignored");
            return;
        };
        // The appends hand events over under the engine's lock, in seq order, through a channel;
        // this task calls the sink outside that lock (the hub's own lock is taken the other way
        // round when a session joins).
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                sink(event);
            }
        });
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(future::ready(Ok(())))
    }

    fn check(&self) -> BoxFuture<'_, Result<StoreReport, EngineError>> {
        Box::pin(future::ready(Ok(StoreReport::default())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn send(to: &str, id: &str) -> NewMessage {
        NewMessage {
            from: UserId::parse("alice").unwrap(),
            to: UserId::parse(to).unwrap(),
            id: MessageId::parse(id).unwrap(),
            ts: 1,
            body: Bytes::from_static(b"x"),
            checks: Default::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dedupe_entries_expire_and_are_purged() {
        let options = EngineOptions {
            dedupe_window: Duration::from_secs(60),
            ..EngineOptions::default()
        };
        let engine = EmbeddedEngine::new(options);
        for i in 0..100 {
            engine.append(&send("bob", &format!("m{i}"))).await.unwrap();
        }
        assert_eq!(engine.lock().dedupe.len(), 100);
        let again = engine.append(&send("bob", "m7")).await.unwrap();
        assert_eq!(again, AppendOutcome::Duplicate { seq: 8 });
        tokio::time::advance(Duration::from_secs(61)).await;
        let later = engine.append(&send("bob", "m7")).await.unwrap();
        assert_eq!(later, AppendOutcome::Stored { seq: 101 });
        let state = engine.lock();
        assert_eq!(state.dedupe.len(), 1, "expired entries are purged");
        assert_eq!(state.dedupe_expiry.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn untouched_inboxes_expire_with_a_new_epoch() {
        let options = EngineOptions {
            inbox_ttl: Duration::from_secs(3600),
            ..EngineOptions::default()
        };
        let engine = EmbeddedEngine::new(options);
        let bob = UserId::parse("bob").unwrap();
        let first = engine
            .open_inbox(&bob, &DeviceId::default_device(), None)
            .await
            .unwrap();
        engine.append(&send("bob", "m1")).await.unwrap();
        tokio::time::advance(Duration::from_secs(1800)).await;
        assert_eq!(engine.inbox_state(&bob).await.unwrap().unwrap().head, 1);
        tokio::time::advance(Duration::from_secs(1801)).await;
        assert_eq!(engine.inbox_state(&bob).await.unwrap(), None);
        let device = DeviceId::default_device();
        let at = Position {
            epoch: &first.epoch,
            delivered: 0,
            stamp: first.stamp,
            device: &device,
        };
        assert_eq!(
            engine.read_after(&bob, &at, 10, usize::MAX).await.unwrap(),
            Checked::Void,
            "the expired epoch is gone"
        );
        let second = engine
            .open_inbox(&bob, &DeviceId::default_device(), None)
            .await
            .unwrap();
        assert_ne!(second.epoch, first.epoch);
        assert_eq!(second.head, 0);
        // Users who never come back are swept out by later activity.
        engine
            .open_inbox(
                &UserId::parse("carol").unwrap(),
                &DeviceId::default_device(),
                None,
            )
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(3601)).await;
        engine.append(&send("dave", "m1")).await.unwrap();
        assert_eq!(engine.lock().inboxes.len(), 1);
    }
}
