//! The Redis engine: the cluster's shared truth, on a standalone Redis or a Redis Cluster. Store
//! commands go through a few shared, pipelined connections (`lanes.rs`), each bounded by
//! `store_timeout`; live delivery goes through dedicated pub/sub connections, one per shard
//! (`pubsub.rs`); the store watchdog's checks have a connection of their own.
//!
//! On a cluster every key of a user shares one hash tag, so each command and script touches one
//! slot and goes to the primary that owns it; nothing is ever read from a replica (a replica's
//! stale head would look like data loss). Appends publish with `SPUBLISH` and the live bus
//! subscribes with `SSUBSCRIBE` on the shard of each user.
//!
//! Every read, trim and position check is a script that first checks the session's `Position`
//! against the inbox (`script.rs`), so nothing is read or trimmed on the strength of a position
//! the store no longer backs. After the store restarts or fails over (its run id changes), the
//! engine audits its recent appends (`audit.rs`).
//!
//! Every operation is issued when it is called (its command is queued on its lane at once), so
//! its future is `'static` and the calls of one session keep their order.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferry_shared::{DeviceId, KeyKind, Keys, UserId, UserKey};
use futures_util::future::BoxFuture;
use futures_util::future::{join_all, select_ok};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ConnectionAddr, RedisWrite, ToRedisArgs, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::audit::{Appended, JOURNAL_CAP, Journal};
use crate::cluster::{NodeAddr, SLOTS, SlotMap, slot_of_user};
use crate::engine::{
    AppendOutcome, Checked, DeviceInfo, Engine, EngineError, EngineOptions, InboxInfo, InboxState,
    LiveSink, NewMessage, Opened, Page, Position, StoreReport, Stored,
};
use crate::epoch::new_epoch_bytes;
use crate::lanes::{Conn, Durability, Lanes, LuaScript, redis_error};
use crate::metrics::{self, StoreOp};
use crate::pubsub::{Connector, LiveBus, Source, TopologyReader};
use crate::record::{decode_stored, encode_payload};
use crate::redis_target::RedisTarget;
use crate::script::{
    AppendAnswer, OpenAnswer, SCRIPTS, VoidReason, int, parse_append, parse_checked, parse_devices,
    parse_info, parse_open, parse_state, string,
};

/// Dedupe keys per audit script call, so one call never blocks Redis for long.
const AUDIT_KEYS_PER_CALL: usize = 512;

/// An engine on a standalone Redis or a Redis Cluster (7 or later).
pub struct RedisEngine {
    /// What the `'static` futures of its operations share.
    core: Arc<Core>,
    /// The store watchdog's own connection (`ping`, `check`).
    watch: Watch,
    /// The pub/sub task's handle; dropping the engine stops the task.
    live: LiveBus,
}

/// The lanes, the names and the audit state.
struct Core {
    lanes: Lanes,
    /// On a Redis Cluster: commands are routed by the slot of their user.
    cluster: bool,
    /// Lanes `0..append_lanes` carry appends (by sender), the rest everything else (by
    /// recipient), so catch-up reads and acks never queue behind a flood of appends.
    append_lanes: usize,
    keys: Keys,
    options: EngineOptions,
    journal: Mutex<Journal>,
    store: Mutex<StoreIdentity>,
}

/// The watchdog's connection.
enum Watch {
    Single(ConnectionManager),
    /// A cluster connection, and a seed's address (for a slot map that leaves a host out).
    Cluster {
        conn: ClusterConnection,
        seed: NodeAddr,
    },
}

#[derive(Default)]
struct StoreIdentity {
    /// The primaries' `run_id`s at the last check: one never seen before means a restart or a
    /// failover.
    run_ids: Option<Vec<String>>,
    /// An audit is due (the run id changed) or running.
    audit_due: bool,
    audit_running: bool,
}

/// A user's key as a command argument, written straight into the command's buffer.
struct Key<'a>(UserKey<'a>);

impl ToRedisArgs for Key<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        // Writing into the command's own buffer cannot fail.
        let _ = write!(out.writer_for_next_arg(), "{}", self.0);
    }
}

/// A fresh epoch name as a command argument.
struct NewEpoch;

impl ToRedisArgs for NewEpoch {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        out.write_arg(&new_epoch_bytes());
    }
}

impl RedisEngine {
    /// Prepares the engine on a standalone Redis at `url`: `connect_to` with the URL alone.
    pub async fn connect(
        url: &str,
        options: EngineOptions,
        connections: usize,
    ) -> Result<RedisEngine, EngineError> {
        Self::connect_to(&RedisTarget::standalone(url), options, connections).await
    }

    /// Prepares the engine on `target` with `connections` pipelined store connections (at least
    /// 2: appends and the rest have their own). Nothing is connected yet (no I/O happens here
    /// but reading the TLS files): a Redis that is down now makes commands fail with
    /// `Unavailable` until it is back, and the pub/sub connections keep retrying with backoff.
    /// Fails only on settings that cannot work (`Internal`: a malformed URL, unreadable
    /// certificates), or outside a Tokio runtime.
    ///
    /// Live subscriptions: `subscribe` resolves once Redis confirmed it, which after a pub/sub drop
    /// is after the reconnect; if that takes longer than `store_timeout` it fails with
    /// `Unavailable` but stays requested until `unsubscribe` (the hub withdraws a failed join).
    /// After every reconnect or slot move the engine resubscribes the users concerned, then emits
    /// `LiveEvent::ResyncUsers` for them. See `pubsub.rs`.
    pub async fn connect_to(
        target: &RedisTarget,
        options: EngineOptions,
        connections: usize,
    ) -> Result<RedisEngine, EngineError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(EngineError::Internal(
                "RedisEngine::connect must be called inside a Tokio runtime".into(),
            ));
        }
        let resolved = target.resolve()?;
        let connections = connections.max(2);
        let timeout = options.store_timeout;
        let keys = Keys::new(options.key_prefix.clone());
        let seed = node_addr(resolved.nodes[0].addr());
        let connector = Connector::new(
            &resolved.nodes[0],
            resolved.tls.as_ref().map(|tls| Arc::clone(&tls.config)),
            timeout,
        );
        let (lanes, watch, live) = if resolved.cluster {
            let client = resolved.cluster_client(timeout)?;
            let lanes = Lanes::start(connections, timeout, || Ok(Conn::cluster(&client)))?;
            let conn = client
                .get_pending_async_connection_with_config(redis::cluster::ClusterConfig::new());
            let topology = topology_reader(conn.clone(), seed.clone());
            let live = LiveBus::start(Source::Cluster(topology), connector, keys.clone(), timeout);
            (lanes, Watch::Cluster { conn, seed }, live)
        } else {
            let client = resolved.client()?;
            let lanes = Lanes::start(connections, timeout, || Conn::single(&client, timeout))?;
            let watch_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1));
            let watch = ConnectionManager::new_lazy_with_config(client, watch_config)
                .map_err(|e| EngineError::Internal(format!("cannot set up a connection: {e}")))?;
            let live = LiveBus::start(Source::Standalone(seed), connector, keys.clone(), timeout);
            (lanes, Watch::Single(watch), live)
        };
        metrics::init();
        let core = Arc::new(Core {
            lanes,
            cluster: resolved.cluster,
            append_lanes: connections / 2,
            keys,
            journal: Mutex::new(Journal::new(options.audit_window, JOURNAL_CAP)),
            store: Mutex::new(StoreIdentity::default()),
            options,
        });
        Ok(RedisEngine { core, watch, live })
    }

    /// Reads every primary's run id and eviction policy (`INFO server memory`), and marks each
    /// shard up or down (`ferry_store_shard_up`). Fails when no primary answers (or the slot map
    /// cannot be read); primaries that did not answer, and slots without a primary (a failover
    /// in progress), are in the report's `shards_down`.
    async fn info(&self) -> Result<(Vec<String>, StoreReport), EngineError> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server").arg("memory");
        let answers = self.on_every_primary(&cmd).await?;
        let mut run_ids = Vec::with_capacity(answers.values.len());
        let mut report = StoreReport {
            shards_down: answers.down,
            ..StoreReport::default()
        };
        for value in answers.values {
            let info = string(&value)
                .ok_or_else(|| EngineError::Internal("INFO answered a non-string".into()))?;
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .map(|v| v.trim().to_string())
            };
            run_ids.push(field("run_id").unwrap_or_default());
            let policy = field("maxmemory_policy");
            if policy.as_deref().is_some_and(|p| p != "noeviction") {
                report.may_evict = true;
                report.eviction_policy = policy;
            } else if report.eviction_policy.is_none() {
                report.eviction_policy = policy;
            }
        }
        Ok((run_ids, report))
    }

    /// Runs `cmd` on every primary (the standalone server, or each shard's primary by the
    /// cluster's current slot map) at once. Sets each shard's `ferry_store_shard_up`. Fails if
    /// no primary answered (or the slot map could not be read); a cluster's primaries that did
    /// not answer, and slots without a primary, are listed in `down`.
    async fn on_every_primary(&self, cmd: &Cmd) -> Result<Answers, EngineError> {
        match &self.watch {
            Watch::Single(conn) => {
                let answer = conn.clone().send_packed_command(cmd).await;
                metrics::STORE_SHARD_UP
                    .with_label_values(&["slots-0"])
                    .set(i64::from(answer.is_ok()));
                Ok(Answers {
                    values: vec![answer.map_err(redis_error)?],
                    down: Vec::new(),
                })
            }
            Watch::Cluster { conn, seed } => {
                let map = read_slot_map(conn.clone(), seed.clone())
                    .await
                    .map_err(EngineError::Unavailable)?;
                let primaries = map.primaries();
                let asked = primaries.iter().map(|node| {
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: node.host.clone(),
                        port: node.port,
                    });
                    let mut conn = conn.clone();
                    let cmd = cmd.clone();
                    async move { conn.route_command(cmd, route).await }
                });
                let mut answers = Answers::default();
                let mut last_error = None;
                for (node, answer) in primaries.iter().zip(join_all(asked).await) {
                    let label = map.shard_label(node);
                    metrics::STORE_SHARD_UP
                        .with_label_values(&[&label])
                        .set(i64::from(answer.is_ok()));
                    match answer {
                        Ok(value) => answers.values.push(value),
                        Err(e) => {
                            answers.down.push(format!("{label} ({node}): {e}"));
                            last_error = Some(redis_error(e));
                        }
                    }
                }
                if !map.is_complete() {
                    answers
                        .down
                        .push("slots without a primary (the cluster is failing over)".into());
                }
                if answers.values.is_empty() {
                    return Err(last_error.unwrap_or_else(|| {
                        EngineError::Unavailable("no primary in the slot map".into())
                    }));
                }
                Ok(answers)
            }
        }
    }

    /// Notes the primaries' run ids; when one was never seen before (a restart, or a replica
    /// promoted), starts the audit of recent appends.
    fn observe_run_ids(&self, run_ids: Vec<String>) {
        let start = {
            let mut store = lock(&self.core.store);
            if let Some(seen) = &store.run_ids
                && run_ids.iter().any(|id| !seen.contains(id))
            {
                tracing::warn!(
                    "the store restarted or failed over (a new run id); auditing this node's \
                     recent appends"
                );
                store.audit_due = true;
            }
            store.run_ids = Some(run_ids);
            let start = store.audit_due && !store.audit_running;
            store.audit_running |= start;
            start
        };
        if start {
            tokio::spawn(audit(Arc::clone(&self.core)));
        }
    }
}

/// A node's address from its connection settings.
fn node_addr(addr: &ConnectionAddr) -> NodeAddr {
    match addr {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => NodeAddr {
            host: host.clone(),
            port: *port,
        },
        // Refused by `RedisTarget::resolve`.
        _ => NodeAddr {
            host: String::new(),
            port: 0,
        },
    }
}

/// Reads the cluster's slot map through `conn` (from any node).
/// What the primaries answered to one command.
#[derive(Default)]
struct Answers {
    values: Vec<Value>,
    /// The shards that did not answer, each with why.
    down: Vec<String>,
}

async fn read_slot_map(conn: ClusterConnection, seed: NodeAddr) -> Result<SlotMap, String> {
    // Asked of primaries only, the owners of slots spread over the range, at once: a replica
    // or a node that is down (frozen, failing over) must not stall the read.
    let asked = [0, SLOTS / 3, 2 * SLOTS / 3, SLOTS - 1].map(|slot| {
        let mut conn = conn.clone();
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
            slot,
            SlotAddr::Master,
        )));
        Box::pin(async move {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SLOTS");
            conn.route_command(cmd, route).await
        })
    });
    let (value, _) = select_ok(asked)
        .await
        .map_err(|e| format!("CLUSTER SLOTS failed: {e}"))?;
    SlotMap::parse(&value, &seed)
}

/// The live bus's way to read the slot map.
fn topology_reader(conn: ClusterConnection, seed: NodeAddr) -> TopologyReader {
    Arc::new(move || Box::pin(read_slot_map(conn.clone(), seed.clone())))
}

impl Core {
    fn key<'a>(&'a self, user: &'a UserId, kind: KeyKind<'a>) -> Key<'a> {
        Key(self.keys.key(user, kind))
    }

    /// The slot of `user`'s keys (0 on a standalone Redis, where it does not matter).
    fn slot(&self, user: &UserId) -> u16 {
        if self.cluster {
            slot_of_user(&self.keys, user)
        } else {
            0
        }
    }

    /// Publishes `live`, the message the append script stored for `to` without publishing it
    /// (replicas had to acknowledge it first), on `from`'s append lane. Not awaited: the
    /// sender's answer does not wait for it; a publish that fails leaves the message to the
    /// recipient's next catch-up read, like any live message missed.
    fn publish_after_wait(&self, from: &UserId, to: &UserId, live: Vec<u8>) {
        let mut cmd = redis::cmd(if self.cluster { "SPUBLISH" } else { "PUBLISH" });
        cmd.arg(self.key(to, KeyKind::Live)).arg(live);
        let published = self.lanes.submit(
            self.append_lane(from),
            self.slot(to),
            cmd,
            None,
            Durability::Primary,
        );
        // The lane drops a job whose caller is gone: keep the answer awaited.
        tokio::spawn(async move {
            if let Ok(Err(e)) = published.await {
                tracing::debug!(error = %e, "publish after WAIT failed");
            }
        });
    }

    /// The append lane of `sender`: all its appends in one FIFO.
    fn append_lane(&self, sender: &UserId) -> usize {
        spread(sender) % self.append_lanes
    }

    /// The lane of everything else about `user`'s inbox.
    fn inbox_lane(&self, user: &UserId) -> usize {
        self.append_lanes + spread(user) % (self.lanes.count() - self.append_lanes)
    }

    /// A position-checked script call: KEYS inbox, meta, devices; ARGV epoch, delivered, stamp,
    /// a new epoch, the device, then `extra`.
    fn checked_call(
        &self,
        script: &'static LuaScript,
        user: &UserId,
        at: &Position<'_>,
        extra: &[u64],
    ) -> oneshot::Receiver<Result<Value, EngineError>> {
        let mut cmd = script.call(3);
        cmd.arg(self.key(user, KeyKind::Inbox))
            .arg(self.key(user, KeyKind::Meta))
            .arg(self.key(user, KeyKind::Devices))
            .arg(at.epoch)
            .arg(at.delivered)
            .arg(at.stamp)
            .arg(NewEpoch)
            .arg(at.device.as_str());
        for arg in extra {
            cmd.arg(*arg);
        }
        self.submit(user, cmd, script)
    }

    /// Queues a script call about `user`'s inbox on its lane.
    fn submit(
        &self,
        user: &UserId,
        cmd: Cmd,
        script: &'static LuaScript,
    ) -> oneshot::Receiver<Result<Value, EngineError>> {
        self.lanes.submit(
            self.inbox_lane(user),
            self.slot(user),
            cmd,
            Some(script),
            Durability::Primary,
        )
    }

    /// The quota script on `user`'s bucket: `take` (answers the bytes granted) or `settle`.
    fn quota(
        &self,
        user: &UserId,
        bytes: i64,
        rate: u64,
        burst: u64,
        mode: &'static str,
    ) -> BoxFuture<'static, Result<u64, EngineError>> {
        let script = &SCRIPTS.quota;
        let mut cmd = script.call(1);
        cmd.arg(self.key(user, KeyKind::Quota))
            .arg(bytes)
            .arg(rate.max(1))
            .arg(burst)
            .arg(mode);
        let answer = self.submit(user, cmd, script);
        Box::pin(timed(
            StoreOp::Quota,
            self.options.store_timeout,
            async move {
                let value = received(answer).await?;
                int(&value).ok_or_else(|| {
                    EngineError::Internal(format!("unexpected quota answer: {value:?}"))
                })
            },
        ))
    }

    /// Moves an undecodable member out of `user`'s inbox into its quarantine set.
    async fn quarantine(&self, user: &UserId, seq: u64, member: Vec<u8>) {
        let script = &SCRIPTS.quarantine;
        let mut cmd = script.call(2);
        cmd.arg(self.key(user, KeyKind::Inbox))
            .arg(self.key(user, KeyKind::Quarantine))
            .arg(member)
            .arg(seq)
            .arg(millis(self.options.inbox_ttl));
        let answer = self.submit(user, cmd, script);
        let moved = timed(StoreOp::Repair, self.options.store_timeout, async {
            Ok(int(&received(answer).await?) == Some(1))
        })
        .await;
        match moved {
            Ok(true) => {
                metrics::UNDECODABLE.inc();
                tracing::warn!(
                    %user,
                    seq,
                    key = self.keys.quarantine(user),
                    "undecodable inbox member moved to quarantine"
                );
            }
            // Moved by another session already.
            Ok(false) => {}
            // Still in the inbox; the next read steps over it and tries again.
            Err(e) => tracing::debug!(%user, seq, error = %e, "quarantine failed"),
        }
    }
}

/// A stable spread of users over lanes.
fn spread(user: &UserId) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    user.hash(&mut hasher);
    hasher.finish() as usize
}

/// The answer of a queued command (the lane dropped it only if it stopped).
async fn received(
    answer: oneshot::Receiver<Result<Value, EngineError>>,
) -> Result<Value, EngineError> {
    answer.await.unwrap_or_else(|_| {
        Err(EngineError::Unavailable(
            "the store lane has stopped".into(),
        ))
    })
}

/// Runs one store operation within `timeout`, recording its duration and errors.
async fn timed<T>(
    op: StoreOp,
    timeout: Duration,
    work: impl Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    let started = Instant::now();
    let result = match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(EngineError::Unavailable(format!(
            "{} took longer than {timeout:?}",
            op.as_str()
        ))),
    };
    metrics::STORE_COMMAND_DURATION
        .with_label_values(&[op.as_str()])
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        metrics::STORE_ERRORS
            .with_label_values(&[op.as_str()])
            .inc();
        tracing::debug!(op = op.as_str(), error = %e, "store command failed");
    }
    result
}

/// Reads a checked script's answer, counting an epoch the script ended: the items after `ok`,
/// or `None` when the position was void.
fn checked_answer(user: &UserId, value: &Value) -> Result<Option<Vec<Value>>, EngineError> {
    match parse_checked(value)? {
        Ok(rest) => Ok(Some(rest.to_vec())),
        Err(reason) => {
            if let VoidReason::Ended(why) = reason {
                metrics::epoch_replaced(user, why);
            }
            Ok(None)
        }
    }
}

/// Milliseconds for `PX`/`PEXPIRE`, at least 1 (0 would delete the key or be refused).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A read entry and, when it could not be decoded, its raw member (to move out of the inbox).
type ReadEntry = (Stored, Option<Vec<u8>>);

/// The read script's page: its entries (the `ZRANGE … WITHSCORES` pairs, decoded), whether the
/// byte bound cut it, the floor, the device's position and the head.
type ReadPage = (Vec<ReadEntry>, bool, u64, u64, u64);

fn decode_page(items: &[Value]) -> Result<ReadPage, EngineError> {
    let bad = || EngineError::Internal("the read script answered a malformed page".into());
    let [Value::Array(pairs), cut, floor, device_acked, head] = items else {
        return Err(bad());
    };
    let entries = pairs
        .chunks(2)
        .map(|pair| {
            let [Value::BulkString(member), score] = pair else {
                return Err(bad());
            };
            let score = string(score)
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|s| *s >= 0.0)
                .ok_or_else(bad)?;
            // Scores are seqs, integers far below 2^53.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let seq = score as u64;
            Ok(match decode_stored(member, seq) {
                (stored, None) => (stored, None),
                (stored, Some(error)) => {
                    // Logged once, at warn, when it is moved to quarantine.
                    tracing::debug!(seq, %error, "undecodable inbox member; stepping over it");
                    (stored, Some(member.clone()))
                }
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((
        entries,
        int(cut) == Some(1),
        int(floor).ok_or_else(bad)?,
        int(device_acked).ok_or_else(bad)?,
        int(head).ok_or_else(bad)?,
    ))
}

/// The audit after a store restart or failover, run by its own task.
async fn audit(core: Arc<Core>) {
    metrics::STORE_AUDITS.inc();
    let groups = lock(&core.journal).recent_by_inbox(Instant::now());
    let appends: usize = groups.values().map(Vec::len).sum();
    let (mut ended, mut lost) = (0, 0);
    let mut failed = None;
    for ((user, epoch), entries) in &groups {
        for chunk in entries.chunks(AUDIT_KEYS_PER_CALL) {
            match audit_chunk(&core, user, epoch, chunk).await {
                Ok((found, ended_now)) => {
                    lost += found;
                    metrics::STORE_LOST_APPENDS.inc_by(found);
                    if ended_now {
                        ended += 1;
                        metrics::epoch_replaced(user, "append_lost");
                        break;
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
    }
    let mut store = lock(&core.store);
    store.audit_running = false;
    match failed {
        // Due again: the next store check starts another.
        Some(e) => tracing::warn!(error = %e, "audit incomplete; retried at the next check"),
        None => {
            store.audit_due = false;
            let message = "audit of recent appends done";
            if lost > 0 {
                tracing::warn!(
                    appends,
                    inboxes = groups.len(),
                    lost,
                    epochs_ended = ended,
                    "{message}: the store lost appends answered `sent`"
                );
            } else {
                tracing::info!(appends, inboxes = groups.len(), "{message}");
            }
        }
    }
}

async fn audit_chunk(
    core: &Core,
    user: &UserId,
    epoch: &str,
    chunk: &[Appended],
) -> Result<(u64, bool), EngineError> {
    let script = &SCRIPTS.audit;
    let mut cmd = script.call(chunk.len() + 1);
    cmd.arg(core.key(user, KeyKind::Meta));
    for entry in chunk {
        cmd.arg(core.key(user, KeyKind::Dedupe(&entry.from, &entry.id)));
    }
    cmd.arg(epoch).arg(NewEpoch);
    for entry in chunk {
        cmd.arg(entry.seq);
    }
    let answer = core.submit(user, cmd, script);
    timed(StoreOp::Repair, core.options.store_timeout, async {
        match received(answer).await? {
            Value::Array(items) => match items.as_slice() {
                [lost, ended] => Ok((int(lost).unwrap_or(0), int(ended) == Some(1))),
                _ => Err(EngineError::Internal("unexpected audit answer".into())),
            },
            other => Err(EngineError::Internal(format!(
                "unexpected audit answer: {other:?}"
            ))),
        }
    })
    .await
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves its state consistent before anything can panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Engine for RedisEngine {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn append(&self, msg: &NewMessage) -> BoxFuture<'static, Result<AppendOutcome, EngineError>> {
        let core = &self.core;
        let script = &SCRIPTS.append;
        let replicas = core.options.min_replicas_ack;
        let mut cmd = script.call(5);
        cmd.arg(core.key(&msg.to, KeyKind::Inbox))
            .arg(core.key(&msg.to, KeyKind::Meta))
            .arg(core.key(&msg.to, KeyKind::Dedupe(&msg.from, &msg.id)))
            .arg(core.key(&msg.to, KeyKind::Devices))
            .arg(core.key(&msg.to, KeyKind::Sender(&msg.from)))
            .arg(encode_payload(&msg.from, &msg.id, msg.ts, &msg.body))
            .arg(core.options.max_inbox)
            .arg(NewEpoch)
            .arg(millis(core.options.dedupe_window))
            .arg(millis(core.options.inbox_ttl))
            .arg(core.key(&msg.to, KeyKind::Live))
            .arg(if replicas > 0 { "1" } else { "0" })
            .arg(if core.cluster { "1" } else { "0" })
            .arg(millis(core.options.device_ttl))
            .arg(if msg.checks.known_recipient { "1" } else { "0" })
            .arg(msg.checks.max_share);
        let durability = if replicas > 0 {
            Durability::Replicas(replicas)
        } else {
            Durability::Primary
        };
        let answer = core.lanes.submit(
            core.append_lane(&msg.from),
            core.slot(&msg.to),
            cmd,
            Some(script),
            durability,
        );
        let core = Arc::clone(core);
        let (to, from, id) = (msg.to.clone(), msg.from.clone(), msg.id.clone());
        Box::pin(async move {
            let timeout = core.options.store_timeout;
            timed(StoreOp::Append, timeout, async {
                let AppendAnswer {
                    outcome,
                    detail,
                    publish,
                } = parse_append(&received(answer).await?)?;
                if let Some(live) = publish {
                    // Replicas have it (the answer passed `WAIT`): now it may be seen live.
                    core.publish_after_wait(&from, &to, live);
                }
                if let (AppendOutcome::Stored { seq }, Some(detail)) = (outcome, detail) {
                    if detail.adopted {
                        metrics::epoch_replaced(&to, "meta_lost");
                    }
                    lock(&core.journal).record(Appended {
                        at: Instant::now(),
                        to,
                        from,
                        id,
                        epoch: detail.epoch,
                        seq,
                    });
                }
                Ok(outcome)
            })
            .await
        })
    }

    fn read_after(
        &self,
        user: &UserId,
        at: &Position<'_>,
        limit: usize,
        max_bytes: usize,
    ) -> BoxFuture<'static, Result<Checked<Page>, EngineError>> {
        let core = Arc::clone(&self.core);
        let user = user.clone();
        // Redis reads numbers as signed 64-bit integers.
        let limit = limit.min(i64::MAX as usize) as u64;
        let max_bytes = max_bytes.min(i64::MAX as usize) as u64;
        let answer = core.checked_call(&SCRIPTS.read, &user, at, &[limit, max_bytes]);
        Box::pin(async move {
            let read = timed(StoreOp::Read, core.options.store_timeout, async {
                match checked_answer(&user, &received(answer).await?)? {
                    Some(items) => decode_page(&items).map(Some),
                    None => Ok(None),
                }
            });
            let Some((page, cut, floor, device_acked, head)) = read.await? else {
                return Ok(Checked::Void);
            };
            let mut entries = Vec::with_capacity(page.len());
            for (stored, raw) in page {
                if let Some(member) = raw {
                    core.quarantine(&user, stored.seq(), member).await;
                }
                entries.push(stored);
            }
            Ok(Checked::Valid(Page {
                entries,
                cut,
                floor,
                device_acked,
                head,
            }))
        })
    }

    fn trim(
        &self,
        user: &UserId,
        at: &Position<'_>,
        upto: u64,
    ) -> BoxFuture<'static, Result<Checked<()>, EngineError>> {
        let options = &self.core.options;
        let extra = [
            upto,
            options.max_devices as u64,
            millis(options.device_ttl),
            millis(options.inbox_ttl),
        ];
        let answer = self.core.checked_call(&SCRIPTS.trim, user, at, &extra);
        let (user, timeout) = (user.clone(), self.core.options.store_timeout);
        Box::pin(timed(StoreOp::Trim, timeout, async move {
            Ok(match checked_answer(&user, &received(answer).await?)? {
                Some(_) => Checked::Valid(()),
                None => Checked::Void,
            })
        }))
    }

    fn check_position(
        &self,
        user: &UserId,
        at: &Position<'_>,
    ) -> BoxFuture<'static, Result<Checked<u64>, EngineError>> {
        let options = &self.core.options;
        let extra = [options.max_devices as u64, millis(options.inbox_ttl)];
        let answer = self.core.checked_call(&SCRIPTS.position, user, at, &extra);
        let (user, timeout) = (user.clone(), self.core.options.store_timeout);
        Box::pin(timed(StoreOp::Position, timeout, async move {
            match checked_answer(&user, &received(answer).await?)? {
                Some(items) => match items.as_slice() {
                    [head] => int(head).map(Checked::Valid).ok_or_else(|| {
                        EngineError::Internal(format!("position script answered {head:?}"))
                    }),
                    other => Err(EngineError::Internal(format!(
                        "position script answered {other:?}"
                    ))),
                },
                None => Ok(Checked::Void),
            }
        }))
    }

    fn open_inbox(
        &self,
        user: &UserId,
        device: &DeviceId,
        claim: Option<(&str, u64)>,
    ) -> BoxFuture<'static, Result<Opened, EngineError>> {
        let core = &self.core;
        let script = &SCRIPTS.open;
        let (claimed_epoch, last_seq) = claim.unwrap_or(("", 0));
        let mut cmd = script.call(3);
        cmd.arg(core.key(user, KeyKind::Meta))
            .arg(core.key(user, KeyKind::Inbox))
            .arg(core.key(user, KeyKind::Devices))
            .arg(NewEpoch)
            .arg(millis(core.options.inbox_ttl))
            .arg(claimed_epoch)
            .arg(last_seq)
            .arg(device.as_str())
            .arg(core.options.max_devices);
        let answer = core.submit(user, cmd, script);
        let (user, timeout) = (user.clone(), core.options.store_timeout);
        Box::pin(timed(StoreOp::Open, timeout, async move {
            let OpenAnswer {
                opened,
                ended,
                adopted,
            } = parse_open(&received(answer).await?)?;
            if ended {
                metrics::epoch_replaced(&user, "resume_beyond_head");
            }
            if adopted {
                metrics::epoch_replaced(&user, "meta_lost");
            }
            Ok(opened)
        }))
    }

    fn devices(&self, user: &UserId) -> BoxFuture<'static, Result<Vec<DeviceInfo>, EngineError>> {
        let core = &self.core;
        let script = &SCRIPTS.devices;
        let mut cmd = script.call(2);
        cmd.arg(core.key(user, KeyKind::Meta))
            .arg(core.key(user, KeyKind::Devices));
        let answer = core.submit(user, cmd, script);
        let ttl = millis(core.options.device_ttl);
        Box::pin(timed(
            StoreOp::State,
            core.options.store_timeout,
            async move {
                let (epoch, now_ms, devices) = parse_devices(&received(answer).await?)?;
                Ok(devices.info(&epoch, now_ms, ttl))
            },
        ))
    }

    fn remove_device(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> BoxFuture<'static, Result<bool, EngineError>> {
        let core = &self.core;
        let script = &SCRIPTS.remove_device;
        let mut cmd = script.call(3);
        cmd.arg(core.key(user, KeyKind::Inbox))
            .arg(core.key(user, KeyKind::Meta))
            .arg(core.key(user, KeyKind::Devices))
            .arg(device.as_str())
            .arg(millis(core.options.device_ttl));
        let answer = core.submit(user, cmd, script);
        Box::pin(timed(
            StoreOp::Trim,
            core.options.store_timeout,
            async move { Ok(int(&received(answer).await?) == Some(1)) },
        ))
    }

    fn inbox_info(
        &self,
        user: &UserId,
    ) -> BoxFuture<'static, Result<Option<InboxInfo>, EngineError>> {
        let core = &self.core;
        let script = &SCRIPTS.info;
        let mut cmd = script.call(2);
        cmd.arg(core.key(user, KeyKind::Meta))
            .arg(core.key(user, KeyKind::Inbox));
        let answer = core.submit(user, cmd, script);
        Box::pin(timed(
            StoreOp::State,
            core.options.store_timeout,
            async move { parse_info(&received(answer).await?) },
        ))
    }

    fn take_quota(
        &self,
        user: &UserId,
        want: u64,
        rate: u64,
        burst: u64,
    ) -> BoxFuture<'static, Result<u64, EngineError>> {
        let want = i64::try_from(want).unwrap_or(i64::MAX);
        self.core.quota(user, want, rate, burst, "take")
    }

    fn settle_quota(
        &self,
        user: &UserId,
        owed: i64,
        rate: u64,
        burst: u64,
    ) -> BoxFuture<'static, Result<(), EngineError>> {
        let settled = self.core.quota(user, owed, rate, burst, "settle");
        Box::pin(async move { settled.await.map(drop) })
    }

    fn shares_quota(&self) -> bool {
        true
    }

    fn delete_inbox(&self, user: &UserId) -> BoxFuture<'static, Result<bool, EngineError>> {
        let core = &self.core;
        let script = &SCRIPTS.erase;
        let mut cmd = script.call(4);
        for kind in [
            KeyKind::Inbox,
            KeyKind::Meta,
            KeyKind::Devices,
            KeyKind::Quarantine,
        ] {
            cmd.arg(core.key(user, kind));
        }
        let answer = core.submit(user, cmd, script);
        Box::pin(timed(
            StoreOp::Trim,
            core.options.store_timeout,
            async move { Ok(int(&received(answer).await?) == Some(1)) },
        ))
    }

    fn inbox_state(
        &self,
        user: &UserId,
    ) -> BoxFuture<'static, Result<Option<InboxState>, EngineError>> {
        let core = &self.core;
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(core.key(user, KeyKind::Meta))
            .arg("epoch")
            .arg("seq");
        let answer = core.lanes.submit(
            core.inbox_lane(user),
            core.slot(user),
            cmd,
            None,
            Durability::Primary,
        );
        Box::pin(timed(
            StoreOp::State,
            core.options.store_timeout,
            async move { parse_state(&received(answer).await?) },
        ))
    }

    fn end_epoch(
        &self,
        user: &UserId,
        epoch: &str,
    ) -> BoxFuture<'static, Result<bool, EngineError>> {
        let core = &self.core;
        let script = &SCRIPTS.end_epoch;
        let mut cmd = script.call(1);
        cmd.arg(core.key(user, KeyKind::Meta))
            .arg(epoch)
            .arg(NewEpoch);
        let answer = core.submit(user, cmd, script);
        let (user, timeout) = (user.clone(), core.options.store_timeout);
        Box::pin(timed(StoreOp::Position, timeout, async move {
            let ended = int(&received(answer).await?) == Some(1);
            if ended {
                metrics::epoch_replaced(&user, "seq_reused");
            }
            Ok(ended)
        }))
    }

    fn subscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.live.subscribe(user)
    }

    fn unsubscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.live.unsubscribe(user)
    }

    fn set_live_sink(&self, sink: LiveSink) {
        self.live.set_sink(sink);
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(timed(
            StoreOp::Ping,
            self.core.options.store_timeout,
            async move { self.on_every_primary(&redis::cmd("PING")).await.map(|_| ()) },
        ))
    }

    fn check(&self) -> BoxFuture<'_, Result<StoreReport, EngineError>> {
        Box::pin(async move {
            let (run_ids, report) =
                timed(StoreOp::Check, self.core.options.store_timeout, self.info()).await?;
            metrics::STORE_MAY_EVICT.set(i64::from(report.may_evict));
            if run_ids.iter().all(|id| !id.is_empty()) {
                self.observe_run_ids(run_ids);
            }
            Ok(report)
        })
    }
}
