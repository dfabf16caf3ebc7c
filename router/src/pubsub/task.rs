//! The task that owns the node's pub/sub connections: one per shard (a standalone Redis is one
//! shard with every slot), each brought to the users this node wants whose slot the shard owns.
//!
//! Per shard, subscription changes go out in rounds: whatever changed since the last round is
//! sent as one write of pipelined commands (in cluster mode one `SSUBSCRIBE` per slot, since
//! Redis refuses channels of several slots in one), and the next round starts when every reply
//! of this one is in. A subscribe request resolves when its channel is confirmed.
//!
//! Each connection has a reader task, which hands messages straight to the hub's sink and
//! everything else (confirmations, errors, the end of the connection) to this task.
//!
//! A user whose subscription was lost (its shard's connection dropped, its slot moved: Redis then
//! sends an unsolicited `sunsubscribe`, or a subscribe is answered `MOVED`) is subscribed again
//! where its slot now lives, and once that is confirmed it gets `LiveEvent::ResyncUsers`: what
//! was published meanwhile was missed, and its sessions catch up from the inbox.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use ferry_shared::{Keys, UserId};
use futures_util::future::BoxFuture;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::Request;
use super::backoff::Backoff;
use super::conn::{Connector, Incoming, Reader, Socket};
use crate::cluster::{NodeAddr, SlotMap, slot_of_user};
use crate::engine::{EpochName, Live, LiveEvent, LiveSink, Stored};
use crate::metrics;
use crate::record::{decode_stored, split_live};

/// A connection up this long resets its reconnection backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How often a quiet connection is checked with `PING`.
const HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// Channels per subscription command at most.
const CHANNELS_PER_COMMAND: usize = 512;
/// Requests taken together before the connections are told.
const REQUESTS_PER_BATCH: usize = 1024;
/// How often a cluster's slot map is read when all is well, and when something is moving (a
/// shard is down, slots have no owner, or a subscription was lost).
const TOPOLOGY_EVERY: Duration = Duration::from_secs(5);
const TOPOLOGY_UNSETTLED: Duration = Duration::from_millis(250);
/// Pause before a shard retries subscriptions that were refused (e.g. `MOVED` before the
/// slot map caught up).
const RETRY_REFUSED: Duration = Duration::from_millis(200);

/// Reads the cluster's slot map (`CLUSTER SLOTS`).
pub(crate) type TopologyReader =
    Arc<dyn Fn() -> BoxFuture<'static, Result<SlotMap, String>> + Send + Sync>;

/// Where the task finds its shards.
pub(crate) enum Source {
    /// One server, which owns every slot; plain `SUBSCRIBE`.
    Standalone(NodeAddr),
    /// A Redis Cluster; `SSUBSCRIBE` on the primary that owns each user's slot.
    Cluster(TopologyReader),
}

/// What a connection's reader task and the helper tasks report.
enum Control {
    Connected {
        addr: NodeAddr,
        id: u64,
        result: Result<(WriteHalf<Box<dyn Socket>>, AbortHandle), String>,
    },
    Incoming {
        addr: NodeAddr,
        id: u64,
        incoming: Incoming,
    },
    Closed {
        addr: NodeAddr,
        id: u64,
        reason: String,
    },
    Topology(Result<SlotMap, String>),
}

/// A shard's connection.
enum Link {
    /// Not connected; the next attempt is at `retry_at`.
    Down {
        retry_at: Instant,
    },
    Connecting {
        id: u64,
    },
    Up {
        id: u64,
        writer: WriteHalf<Box<dyn Socket>>,
        reader: AbortHandle,
        since: Instant,
        /// When the connection last said anything.
        heard: Instant,
        /// A `PING` is out, sent at this time.
        pinged: Option<Instant>,
    },
}

/// One subscription command awaiting its replies.
struct Pending {
    subscribe: bool,
    /// Channels not yet confirmed, and their users.
    channels: HashMap<Bytes, UserId>,
}

/// One shard: a primary (or the standalone server) and this node's subscriptions on it.
struct Shard {
    label: String,
    link: Link,
    backoff: Backoff,
    /// Users confirmed subscribed on the current connection.
    subscribed: HashSet<UserId>,
    /// Users to bring in line with the desired set at the next round.
    touched: HashSet<UserId>,
    /// Users owed a resync once their subscription here is confirmed.
    resync: HashSet<UserId>,
    /// The commands of the round in flight, oldest first; empty when no round is.
    round: VecDeque<Pending>,
    /// A round that does not complete by then means the connection is stuck.
    round_deadline: Option<Instant>,
    /// No round starts before this (after refused subscriptions).
    hold_until: Option<Instant>,
    had_connection: bool,
}

impl Shard {
    fn new(label: String) -> Self {
        Self {
            label,
            link: Link::Down {
                retry_at: Instant::now(),
            },
            backoff: Backoff::default(),
            subscribed: HashSet::new(),
            touched: HashSet::new(),
            resync: HashSet::new(),
            round: VecDeque::new(),
            round_deadline: None,
            hold_until: None,
            had_connection: false,
        }
    }

    fn is_up(&self) -> bool {
        matches!(self.link, Link::Up { .. })
    }

    fn link_id(&self) -> Option<u64> {
        match self.link {
            Link::Up { id, .. } | Link::Connecting { id } => Some(id),
            Link::Down { .. } => None,
        }
    }
}

/// The live task.
pub(super) struct LiveTask {
    source: Source,
    connector: Arc<Connector>,
    keys: Keys,
    store_timeout: Duration,
    requests: mpsc::UnboundedReceiver<Request>,
    sink: Arc<OnceLock<LiveSink>>,
    control_tx: mpsc::UnboundedSender<Control>,
    control: mpsc::UnboundedReceiver<Control>,
    /// Users this node wants live messages for, with their slot.
    desired: HashMap<UserId, u16>,
    /// Subscribe requests waiting for their user's confirmation.
    waiting: HashMap<UserId, Vec<oneshot::Sender<()>>>,
    /// Which shard owns each slot.
    map: SlotMap,
    shards: HashMap<NodeAddr, Shard>,
    next_id: u64,
    /// The slot map is being read, and when it was last asked for.
    topology_reading: bool,
    topology_next: Instant,
    /// Users to resync, gathered while handling one event.
    resync_now: Vec<UserId>,
}

impl LiveTask {
    pub(super) fn new(
        source: Source,
        connector: Connector,
        keys: Keys,
        store_timeout: Duration,
        requests: mpsc::UnboundedReceiver<Request>,
        sink: Arc<OnceLock<LiveSink>>,
    ) -> Self {
        let (control_tx, control) = mpsc::unbounded_channel();
        let mut shards = HashMap::new();
        let map = match &source {
            Source::Standalone(addr) => {
                let map = SlotMap::single(addr.clone());
                shards.insert(addr.clone(), Shard::new(map.shard_label(addr)));
                map
            }
            Source::Cluster(_) => SlotMap::default(),
        };
        Self {
            source,
            connector: Arc::new(connector),
            keys,
            store_timeout,
            requests,
            sink,
            control_tx,
            control,
            desired: HashMap::new(),
            waiting: HashMap::new(),
            map,
            shards,
            next_id: 0,
            topology_reading: false,
            topology_next: Instant::now(),
            resync_now: Vec::new(),
        }
    }

    fn sharded(&self) -> bool {
        matches!(self.source, Source::Cluster(_))
    }

    pub(super) async fn run(mut self) {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                request = self.requests.recv() => {
                    let Some(request) = request else {
                        self.stop();
                        return;
                    };
                    self.take_requests(request);
                }
                Some(control) = self.control.recv() => self.handle(control),
                () = tokio::time::sleep_until(wake) => self.timers(),
            }
            self.flush().await;
        }
    }

    /// Stops every connection's reader.
    fn stop(&mut self) {
        for shard in self.shards.values_mut() {
            if let Link::Up { reader, .. } = &shard.link {
                reader.abort();
            }
        }
    }

    // ---- requests ----

    fn take_requests(&mut self, first: Request) {
        self.apply(first);
        for _ in 1..REQUESTS_PER_BATCH {
            match self.requests.try_recv() {
                Ok(request) => self.apply(request),
                Err(_) => break,
            }
        }
    }

    fn apply(&mut self, request: Request) {
        let user = request.user;
        if request.subscribe {
            let slot = slot_of_user(&self.keys, &user);
            self.desired.insert(user.clone(), slot);
            match self.map.owner(slot).cloned() {
                Some(owner) => {
                    let channel = Bytes::from(self.keys.live(&user));
                    let shard = self.shard(&owner);
                    // Not while an unsubscribe of the user is out: its confirmation will end
                    // the subscription, and the user is subscribed again after it.
                    let leaving = shard
                        .round
                        .iter()
                        .any(|p| !p.subscribe && p.channels.contains_key(&channel));
                    if shard.is_up() && shard.subscribed.contains(&user) && !leaving {
                        let _ = request.done.send(());
                        return;
                    }
                    shard.touched.insert(user.clone());
                }
                // Placed when the slot map is known.
                None => self.topology_soon(),
            }
            let waiting = self.waiting.entry(user).or_default();
            waiting.retain(|done| !done.is_closed());
            waiting.push(request.done);
        } else {
            self.desired.remove(&user);
            // Withdrawn: nothing to wait for any more.
            for done in self.waiting.remove(&user).unwrap_or_default() {
                let _ = done.send(());
            }
            for shard in self.shards.values_mut() {
                if shard.subscribed.contains(&user) {
                    shard.touched.insert(user.clone());
                }
                shard.resync.remove(&user);
            }
            let _ = request.done.send(());
        }
    }

    /// The shard of `addr`, created (to be connected) if new; a new shard's series reads 0
    /// until it connects, so an alert on `== 0` sees a shard that never came up.
    fn shard(&mut self, addr: &NodeAddr) -> &mut Shard {
        let label = self.map.shard_label(addr);
        self.shards.entry(addr.clone()).or_insert_with(|| {
            metrics::shard_connected(&label, false);
            Shard::new(label)
        })
    }

    // ---- events ----

    fn handle(&mut self, control: Control) {
        match control {
            Control::Connected { addr, id, result } => self.connected(&addr, id, result),
            Control::Incoming { addr, id, incoming } => self.incoming(&addr, id, incoming),
            Control::Closed { addr, id, reason } => {
                let current = self.shards.get(&addr).and_then(Shard::link_id) == Some(id);
                if current {
                    tracing::warn!(shard = %addr, %reason, "pub/sub connection dropped; reconnecting");
                    self.lose_link(&addr);
                }
            }
            Control::Topology(result) => self.topology(result),
        }
    }

    fn connected(
        &mut self,
        addr: &NodeAddr,
        id: u64,
        result: Result<(WriteHalf<Box<dyn Socket>>, AbortHandle), String>,
    ) {
        let owned: Vec<UserId> = self.owned_by(addr);
        let Some(shard) = self.shards.get_mut(addr) else {
            if let Ok((_, reader)) = result {
                reader.abort();
            }
            return;
        };
        if shard.link_id() != Some(id) {
            if let Ok((_, reader)) = result {
                reader.abort();
            }
            return;
        }
        match result {
            Ok((writer, reader)) => {
                let now = Instant::now();
                shard.link = Link::Up {
                    id,
                    writer,
                    reader,
                    since: now,
                    heard: now,
                    pinged: None,
                };
                if shard.had_connection {
                    metrics::PUBSUB_RECONNECTS.inc();
                    tracing::info!(shard = %addr, users = owned.len(), "pub/sub reconnected; resubscribing");
                    // What was published while it was away was missed.
                    shard.resync.extend(owned.iter().cloned());
                }
                shard.had_connection = true;
                shard.subscribed.clear();
                shard.touched.extend(owned);
                metrics::shard_connected(&shard.label, true);
            }
            Err(reason) => {
                tracing::debug!(shard = %addr, %reason, "pub/sub connection failed");
                shard.link = Link::Down {
                    retry_at: Instant::now() + shard.backoff.next_delay(),
                };
                if self.sharded() {
                    self.topology_soon();
                }
            }
        }
    }

    /// The desired users whose slot `addr` owns.
    fn owned_by(&self, addr: &NodeAddr) -> Vec<UserId> {
        self.desired
            .iter()
            .filter(|(_, slot)| self.map.owner(**slot) == Some(addr))
            .map(|(user, _)| user.clone())
            .collect()
    }

    fn incoming(&mut self, addr: &NodeAddr, id: u64, incoming: Incoming) {
        let keys = self.keys.clone();
        let sharded = self.sharded();
        let Some(shard) = self.shards.get_mut(addr) else {
            return;
        };
        let Link::Up {
            id: current,
            heard,
            pinged,
            ..
        } = &mut shard.link
        else {
            return;
        };
        if *current != id {
            return;
        }
        *heard = Instant::now();
        let mut lost = None;
        let mut moved = false;
        match incoming {
            Incoming::Pong => *pinged = None,
            Incoming::Subscribed(channel) => {
                if let Some(user) = confirm(&mut shard.round, true, &channel) {
                    shard.subscribed.insert(user.clone());
                    if shard.resync.remove(&user) {
                        self.resync_now.push(user.clone());
                    }
                    for done in self.waiting.remove(&user).unwrap_or_default() {
                        let _ = done.send(());
                    }
                    if !self.desired.contains_key(&user) {
                        shard.touched.insert(user);
                    }
                }
            }
            Incoming::Unsubscribed(channel) => {
                if let Some(user) = confirm(&mut shard.round, false, &channel) {
                    shard.subscribed.remove(&user);
                    if self.desired.contains_key(&user) {
                        // Wanted again since the unsubscribe went out.
                        shard.touched.insert(user);
                    }
                } else if let Some(user) = channel_user(&keys, &channel)
                    && shard.subscribed.remove(&user)
                {
                    // Unsolicited: Redis dropped the subscription (its slot moved away).
                    metrics::LIVE_LOST_SUBSCRIPTIONS.inc();
                    lost = Some(user);
                }
            }
            Incoming::Error(error) => {
                // An error answers a subscription command as a whole.
                if let Some(pending) = shard.round.pop_front() {
                    tracing::debug!(shard = %addr, %error, "pub/sub command refused");
                    for (_, user) in pending.channels {
                        if pending.subscribe {
                            shard.touched.insert(user);
                        } else {
                            // Not subscribed there any more either way.
                            shard.subscribed.remove(&user);
                        }
                    }
                    shard.hold_until = Some(Instant::now() + RETRY_REFUSED);
                    moved = error.starts_with("MOVED") || error.starts_with("ASK");
                } else {
                    tracing::warn!(shard = %addr, %error, "pub/sub error without a pending command");
                }
            }
            Incoming::Message { .. } | Incoming::Other => {}
        }
        if shard.round.is_empty() {
            shard.round_deadline = None;
        }
        if let Some(user) = lost
            && self.desired.contains_key(&user)
        {
            tracing::info!(shard = %addr, %user, "subscription dropped by Redis; moving it");
            shard.resync.insert(user.clone());
            shard.touched.insert(user);
            moved = true;
        }
        if moved && sharded {
            self.topology_soon();
        }
    }

    /// A shard's connection is gone: its subscriptions with it.
    fn lose_link(&mut self, addr: &NodeAddr) {
        let sharded = self.sharded();
        let Some(shard) = self.shards.get_mut(addr) else {
            return;
        };
        if let Link::Up { reader, since, .. } = &shard.link {
            reader.abort();
            // A connection that keeps dropping at once is retried ever more slowly.
            if since.elapsed() >= STABLE_AFTER {
                shard.backoff = Backoff::default();
            }
        }
        shard.link = Link::Down {
            retry_at: Instant::now() + shard.backoff.next_delay(),
        };
        shard.subscribed.clear();
        shard.round.clear();
        shard.round_deadline = None;
        metrics::shard_connected(&shard.label, false);
        if sharded {
            self.topology_soon();
        }
    }

    fn topology(&mut self, result: Result<SlotMap, String>) {
        self.topology_reading = false;
        let map = match result {
            Ok(map) => map,
            Err(reason) => {
                tracing::debug!(%reason, "reading the cluster's slot map failed");
                return;
            }
        };
        if map == self.map {
            return;
        }
        let before = std::mem::replace(&mut self.map, map);
        metrics::LIVE_TOPOLOGY_CHANGES.inc();
        let mut moved = 0usize;
        let users: Vec<(UserId, u16)> = self.desired.iter().map(|(u, s)| (u.clone(), *s)).collect();
        for (user, slot) in users {
            let (old, new) = (before.owner(slot).cloned(), self.map.owner(slot).cloned());
            if old == new {
                continue;
            }
            if let Some(old) = old.and_then(|a| self.shards.get_mut(&a)) {
                // The old owner no longer publishes for this slot; Redis drops such
                // subscriptions itself.
                old.subscribed.remove(&user);
                old.touched.remove(&user);
                old.resync.remove(&user);
            }
            if let Some(new) = new {
                moved += 1;
                let waiting = self.waiting.contains_key(&user);
                let shard = self.shard(&new);
                shard.touched.insert(user.clone());
                if !waiting {
                    shard.resync.insert(user);
                }
            }
        }
        // Relabel (a shard's first slot may have changed) and drop the shards that own nothing.
        let primaries: HashSet<NodeAddr> = self.map.primaries().into_iter().collect();
        let gone: Vec<NodeAddr> = self
            .shards
            .keys()
            .filter(|a| !primaries.contains(*a))
            .cloned()
            .collect();
        for addr in gone {
            if let Some(shard) = self.shards.remove(&addr) {
                metrics::shard_connected(&shard.label, false);
                metrics::forget_shard(&shard.label);
                if let Link::Up { reader, .. } = shard.link {
                    reader.abort();
                }
            }
        }
        for (addr, shard) in &mut self.shards {
            let label = self.map.shard_label(addr);
            if label != shard.label {
                metrics::forget_shard(&shard.label);
                metrics::shard_connected(&label, shard.is_up());
                shard.label = label;
            }
        }
        for addr in primaries {
            self.shard(&addr);
        }
        tracing::info!(
            shards = self.shards.len(),
            moved_users = moved,
            complete = self.map.is_complete(),
            "cluster slot map changed"
        );
    }

    fn topology_soon(&mut self) {
        let soon = Instant::now() + TOPOLOGY_UNSETTLED;
        if self.topology_next > soon {
            self.topology_next = soon;
        }
    }

    // ---- timers ----

    fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + HEALTH_INTERVAL;
        if let Source::Cluster(_) = self.source
            && !self.topology_reading
        {
            wake = wake.min(self.topology_next);
        }
        for shard in self.shards.values() {
            match &shard.link {
                Link::Down { retry_at } => wake = wake.min(*retry_at),
                Link::Connecting { .. } => {}
                Link::Up { heard, pinged, .. } => {
                    wake = wake.min(match pinged {
                        Some(sent) => *sent + self.store_timeout,
                        None => *heard + HEALTH_INTERVAL,
                    });
                }
            }
            if let Some(deadline) = shard.round_deadline {
                wake = wake.min(deadline);
            }
            if let Some(hold) = shard.hold_until {
                wake = wake.min(hold);
            }
        }
        wake
    }

    fn timers(&mut self) {
        let now = Instant::now();
        if let Source::Cluster(read) = &self.source
            && !self.topology_reading
            && now >= self.topology_next
        {
            self.topology_reading = true;
            let unsettled = !self.map.is_complete()
                || self.shards.values().any(|s| !s.is_up())
                || self
                    .desired
                    .values()
                    .any(|slot| self.map.owner(*slot).is_none());
            self.topology_next = now
                + if unsettled {
                    TOPOLOGY_UNSETTLED
                } else {
                    TOPOLOGY_EVERY
                };
            let reading = read();
            let control = self.control_tx.clone();
            tokio::spawn(async move {
                let _ = control.send(Control::Topology(reading.await));
            });
        }
        let mut stuck = Vec::new();
        let mut connect = Vec::new();
        for (addr, shard) in &mut self.shards {
            if shard.hold_until.is_some_and(|hold| now >= hold) {
                shard.hold_until = None;
            }
            if shard.round_deadline.is_some_and(|deadline| now >= deadline) {
                stuck.push((addr.clone(), "subscriptions not confirmed in time"));
                continue;
            }
            match &mut shard.link {
                Link::Down { retry_at } if now >= *retry_at => {
                    self.next_id += 1;
                    shard.link = Link::Connecting { id: self.next_id };
                    connect.push((addr.clone(), self.next_id));
                }
                Link::Up {
                    pinged: Some(sent), ..
                } if now >= *sent + self.store_timeout => {
                    stuck.push((addr.clone(), "no answer to PING"));
                }
                _ => {}
            }
        }
        for (addr, reason) in stuck {
            tracing::warn!(shard = %addr, reason, "pub/sub connection stuck; reconnecting");
            self.lose_link(&addr);
        }
        for (addr, id) in connect {
            self.spawn_connect(addr, id);
        }
    }

    fn spawn_connect(&self, addr: NodeAddr, id: u64) {
        let connector = Arc::clone(&self.connector);
        let control = self.control_tx.clone();
        let sink = Arc::clone(&self.sink);
        let keys = self.keys.clone();
        tokio::spawn(async move {
            let result = match connector.connect(&addr).await {
                Ok((reader, writer)) => {
                    let read = tokio::spawn(read_loop(
                        reader,
                        addr.clone(),
                        id,
                        control.clone(),
                        sink,
                        keys,
                    ));
                    Ok((writer, read.abort_handle()))
                }
                Err(reason) => Err(reason),
            };
            let _ = control.send(Control::Connected { addr, id, result });
        });
    }

    // ---- writing ----

    /// Sends what is due on every connection: pings, and each idle shard's next round. Then
    /// hands out the resyncs gathered.
    async fn flush(&mut self) {
        let now = Instant::now();
        let mut broken = Vec::new();
        let addrs: Vec<NodeAddr> = self.shards.keys().cloned().collect();
        for addr in addrs {
            let commands = self.next_round(&addr, now);
            let Some(shard) = self.shards.get_mut(&addr) else {
                continue;
            };
            let Link::Up {
                writer,
                heard,
                pinged,
                ..
            } = &mut shard.link
            else {
                continue;
            };
            let mut out = commands;
            if pinged.is_none() && now >= *heard + HEALTH_INTERVAL {
                out.extend(redis::cmd("PING").get_packed_command());
                *pinged = Some(now);
            }
            if out.is_empty() {
                continue;
            }
            let write = tokio::time::timeout(self.store_timeout, writer.write_all(&out)).await;
            if !matches!(write, Ok(Ok(()))) {
                broken.push(addr);
            }
        }
        for addr in broken {
            tracing::warn!(shard = %addr, "pub/sub write failed; reconnecting");
            self.lose_link(&addr);
        }
        if !self.resync_now.is_empty() {
            let users = std::mem::take(&mut self.resync_now);
            metrics::LIVE_RESYNCS.inc();
            self.emit(LiveEvent::ResyncUsers(users));
        }
    }

    /// The commands of `addr`'s next round, if it is idle, up and has changes; records them as
    /// pending.
    fn next_round(&mut self, addr: &NodeAddr, now: Instant) -> Vec<u8> {
        let sharded = self.sharded();
        let Some(shard) = self.shards.get_mut(addr) else {
            return Vec::new();
        };
        if !shard.is_up()
            || !shard.round.is_empty()
            || shard.touched.is_empty()
            || shard.hold_until.is_some()
        {
            return Vec::new();
        }
        let mut add: HashMap<u16, Vec<UserId>> = HashMap::new();
        let mut remove: HashMap<u16, Vec<UserId>> = HashMap::new();
        for user in std::mem::take(&mut shard.touched) {
            let wanted = self
                .desired
                .get(&user)
                .filter(|slot| self.map.owner(**slot) == Some(addr));
            match (wanted, shard.subscribed.contains(&user)) {
                (Some(slot), false) => add.entry(*slot).or_default().push(user),
                (None, true) => {
                    let slot = slot_of_user(&self.keys, &user);
                    remove.entry(slot).or_default().push(user);
                }
                (Some(_), true) => {
                    for done in self.waiting.remove(&user).unwrap_or_default() {
                        let _ = done.send(());
                    }
                }
                (None, false) => {}
            }
        }
        let (subscribe, unsubscribe) = if sharded {
            ("SSUBSCRIBE", "SUNSUBSCRIBE")
        } else {
            ("SUBSCRIBE", "UNSUBSCRIBE")
        };
        let mut out = Vec::new();
        let mut command = |name: &str, users: &[UserId], subscribe: bool| {
            let mut cmd = redis::cmd(name);
            let mut channels = HashMap::with_capacity(users.len());
            for user in users {
                let channel = self.keys.live(user);
                cmd.arg(&channel);
                channels.insert(Bytes::from(channel), user.clone());
            }
            out.extend(cmd.get_packed_command());
            shard.round.push_back(Pending {
                subscribe,
                channels,
            });
        };
        // Sharded: one command per slot, both ways (Redis refuses channels of several slots in
        // one SSUBSCRIBE or SUNSUBSCRIBE with CROSSSLOT). Standalone: any mix.
        let batches = |by_slot: HashMap<u16, Vec<UserId>>| -> Vec<Vec<UserId>> {
            if sharded {
                by_slot.into_values().collect()
            } else {
                vec![by_slot.into_values().flatten().collect()]
            }
        };
        for users in batches(remove) {
            for chunk in users.chunks(CHANNELS_PER_COMMAND) {
                command(unsubscribe, chunk, false);
            }
        }
        for users in batches(add) {
            for chunk in users.chunks(CHANNELS_PER_COMMAND) {
                command(subscribe, chunk, true);
            }
        }
        if !shard.round.is_empty() {
            shard.round_deadline = Some(now + self.store_timeout);
        }
        out
    }

    /// Calls the hub's sink (nothing is subscribed before there is one).
    fn emit(&self, event: LiveEvent) {
        if let Some(sink) = self.sink.get() {
            sink(event);
        }
    }
}

/// Marks `channel` confirmed in the oldest pending command if it expects it; its user.
fn confirm(round: &mut VecDeque<Pending>, subscribe: bool, channel: &Bytes) -> Option<UserId> {
    let head = round.front_mut()?;
    if head.subscribe != subscribe {
        return None;
    }
    let user = head.channels.remove(channel)?;
    if head.channels.is_empty() {
        round.pop_front();
    }
    Some(user)
}

fn channel_user(keys: &Keys, channel: &[u8]) -> Option<UserId> {
    keys.user_of_live(std::str::from_utf8(channel).ok()?)
}

/// Reads one connection until it ends: messages go straight to the hub's sink, everything else
/// to the live task.
async fn read_loop(
    mut reader: Reader<ReadHalf<Box<dyn Socket>>>,
    addr: NodeAddr,
    id: u64,
    control: mpsc::UnboundedSender<Control>,
    sink: Arc<OnceLock<LiveSink>>,
    keys: Keys,
) {
    let reason = loop {
        match reader.next().await {
            Ok(Some(frame)) => match Incoming::from(frame) {
                Incoming::Message { channel, payload } => {
                    if let (Some(sink), Some(user)) = (sink.get(), channel_user(&keys, &channel)) {
                        sink(LiveEvent::Message {
                            user,
                            live: Arc::new(live_of(&payload)),
                        });
                    }
                }
                incoming => {
                    let event = Control::Incoming {
                        addr: addr.clone(),
                        id,
                        incoming,
                    };
                    if control.send(event).is_err() {
                        return;
                    }
                }
            },
            Ok(None) => break "closed by the server".to_owned(),
            Err(e) => break e.to_string(),
        }
    };
    let _ = control.send(Control::Closed { addr, id, reason });
}

/// A live message's payload, decoded. An undecodable one still goes to the sessions, which catch
/// up from the inbox and step over the bad member there (seq 0: nothing can be told of it here).
fn live_of(payload: &[u8]) -> Live {
    match split_live(payload) {
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
    }
}
