//! The Redis engine: the cluster's shared truth. Store commands go through a small
//! `deadpool-redis` pool of multiplexed connections, each bounded by `store_timeout`; live
//! delivery goes through one dedicated pub/sub connection (`pubsub.rs`).
//!
//! Every read, trim and position check is a script that first checks the session's `Position`
//! against the inbox (`script.rs`), so nothing is read or trimmed on the strength of a position
//! the store no longer backs. After the store restarts or fails over (its run id changes), the
//! engine audits its recent appends (`audit.rs`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_redis::{Pool, PoolError, Runtime};
use ferry_shared::{Keys, UserId};
use futures_util::future::BoxFuture;
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::audit::{Appended, JOURNAL_CAP, Journal};
use crate::engine::{
    AppendOutcome, Checked, Engine, EngineError, EngineOptions, InboxState, LiveEvent, NewMessage,
    Opened, Position, StoreReport, Stored,
};
use crate::epoch::new_epoch;
use crate::metrics::{self, StoreOp};
use crate::pubsub::LiveBus;
use crate::record::{decode_stored, encode_payload};
use crate::script::{
    Scripts, VoidReason, int, parse_append, parse_checked, parse_open, parse_state, string,
};

/// Dedupe keys per audit script call, so one call never blocks Redis for long.
const AUDIT_KEYS_PER_CALL: usize = 512;

/// An engine on a standalone Redis (7 or later).
pub struct RedisEngine {
    /// Connections for store commands.
    pool: Pool,
    /// What survives between the engine's handle and the audit task it spawns.
    shared: Arc<Shared>,
    /// Key and channel names under the configured prefix.
    keys: Keys,
    options: EngineOptions,
    scripts: Scripts,
    /// The pub/sub task's handle; dropping the engine stops the task.
    live: LiveBus,
    /// The live events until the hub takes them.
    live_events: Mutex<Option<mpsc::Receiver<LiveEvent>>>,
}

/// The store identity seen by the last check, and the appends to audit when it changes.
struct Shared {
    journal: Mutex<Journal>,
    store: Mutex<StoreIdentity>,
}

#[derive(Default)]
struct StoreIdentity {
    /// Redis's `run_id` at the last check: a new one means a restart or a failover.
    run_id: Option<String>,
    /// An audit is due (the run id changed) or running.
    audit_due: bool,
    audit_running: bool,
}

impl RedisEngine {
    /// Prepares the engine on `url` with up to `pool_size` store
    /// connections. Nothing is connected yet (no I/O happens here): a Redis that is down now makes
    /// commands fail with `Unavailable` until it is back, and the pub/sub task keeps retrying with
    /// backoff. Fails only on a malformed URL (`Internal`), or outside a Tokio runtime.
    /// `rediss://` is refused as malformed until a TLS feature of the redis crate is enabled.
    ///
    /// Live subscriptions: `subscribe` resolves once Redis confirmed it, which after a pub/sub drop
    /// is after the reconnect; if that takes longer than `store_timeout` it fails with
    /// `Unavailable` but stays requested until `unsubscribe` (the hub withdraws a failed join).
    /// After every reconnect the engine resubscribes every requested user, then emits
    /// `LiveEvent::Resync`. See `pubsub.rs`.
    pub async fn connect(
        url: &str,
        options: EngineOptions,
        pool_size: usize,
    ) -> Result<RedisEngine, EngineError> {
        // The URL may carry a password: errors name the problem, never the URL.
        let client = redis::Client::open(url)
            .map_err(|e| EngineError::Internal(format!("invalid Redis URL: {e}")))?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(EngineError::Internal(
                "RedisEngine::connect must be called inside a Tokio runtime".into(),
            ));
        }
        let pool = deadpool_redis::Config::from_url(url)
            .builder()
            .map_err(|e| EngineError::Internal(format!("invalid Redis URL: {e}")))?
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| EngineError::Internal(format!("cannot build the Redis pool: {e}")))?;
        let keys = Keys::new(options.key_prefix.clone());
        let (live, live_events) = LiveBus::start(
            client,
            keys.clone(),
            options.store_timeout,
            options.live_buffer,
        );
        metrics::init();
        let shared = Arc::new(Shared {
            journal: Mutex::new(Journal::new(options.audit_window, JOURNAL_CAP)),
            store: Mutex::new(StoreIdentity::default()),
        });
        Ok(RedisEngine {
            pool,
            shared,
            keys,
            options,
            scripts: Scripts::new(),
            live,
            live_events: Mutex::new(Some(live_events)),
        })
    }

    /// Runs one store operation within `store_timeout`, recording its duration and errors.
    async fn timed<T>(
        &self,
        op: StoreOp,
        work: impl Future<Output = Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        let started = Instant::now();
        let timeout = self.options.store_timeout;
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

    async fn connection(&self) -> Result<deadpool_redis::Connection, EngineError> {
        self.pool.get().await.map_err(pool_error)
    }

    async fn query(&self, cmd: &redis::Cmd) -> Result<Value, EngineError> {
        let mut conn = self.connection().await?;
        cmd.query_async(&mut conn).await.map_err(redis_error)
    }
}

/// Milliseconds for `PX`/`PEXPIRE`, at least 1 (0 would delete the key or be refused).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A read entry and, when it could not be decoded, its raw member (to move out of the inbox).
type ReadEntry = (Stored, Option<Vec<u8>>);

/// The `ZRANGE … WITHSCORES` pairs of a read, decoded.
fn decode_page(items: &[Value]) -> Result<Vec<ReadEntry>, EngineError> {
    let bad = || EngineError::Internal("the read script answered a malformed page".into());
    let [Value::Array(pairs)] = items else {
        return Err(bad());
    };
    pairs
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
        .collect()
}

impl RedisEngine {
    /// Invokes one of the position-checked scripts for `user` at `at` with `extra` arguments.
    async fn checked(
        &self,
        script: &redis::Script,
        user: &UserId,
        at: &Position,
        extra: Option<u64>,
    ) -> Result<Result<Vec<Value>, VoidReason>, EngineError> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.keys.inbox(user))
            .key(self.keys.meta(user))
            .arg(&at.epoch)
            .arg(at.delivered)
            .arg(at.stamp)
            .arg(new_epoch());
        if let Some(extra) = extra {
            invocation.arg(extra);
        }
        let mut conn = self.connection().await?;
        let value: Value = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(match parse_checked(&value)? {
            Ok(rest) => Ok(rest.to_vec()),
            Err(reason) => {
                if let VoidReason::Ended(why) = reason {
                    metrics::epoch_replaced(user, why);
                }
                Err(reason)
            }
        })
    }

    /// Moves an undecodable member out of `user`'s inbox into its quarantine set.
    async fn quarantine(&self, user: &UserId, seq: u64, member: Vec<u8>) {
        let moved = self
            .timed(StoreOp::Repair, async {
                let mut invocation = self.scripts.quarantine.prepare_invoke();
                invocation
                    .key(self.keys.inbox(user))
                    .key(self.keys.quarantine(user))
                    .arg(member)
                    .arg(seq)
                    .arg(millis(self.options.inbox_ttl));
                let mut conn = self.connection().await?;
                let moved: i64 = invocation
                    .invoke_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                Ok(moved == 1)
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

    /// Reads the store's run id and eviction policy (`INFO server memory`).
    async fn info(&self) -> Result<(String, StoreReport), EngineError> {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server").arg("memory");
        let info = string(&self.query(&cmd).await?)
            .ok_or_else(|| EngineError::Internal("INFO answered a non-string".into()))?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|v| v.trim().to_string())
        };
        let run_id = field("run_id").unwrap_or_default();
        let policy = field("maxmemory_policy");
        let may_evict = policy.as_deref().is_some_and(|p| p != "noeviction");
        Ok((
            run_id,
            StoreReport {
                eviction_policy: policy,
                may_evict,
            },
        ))
    }

    /// Notes the store's run id; when it changed, starts the audit of recent appends.
    fn observe_run_id(&self, run_id: String) {
        let start = {
            let mut store = lock(&self.shared.store);
            match &store.run_id {
                Some(seen) if *seen != run_id => {
                    tracing::warn!(
                        "the store restarted or failed over (new run id); auditing this node's \
                         recent appends"
                    );
                    store.audit_due = true;
                }
                _ => {}
            }
            store.run_id = Some(run_id);
            let start = store.audit_due && !store.audit_running;
            store.audit_running |= start;
            start
        };
        if start {
            let engine = self.audit_handle();
            tokio::spawn(async move { engine.audit().await });
        }
    }

    /// What the audit task needs, without the engine itself (the task must not keep it alive).
    fn audit_handle(&self) -> Auditor {
        Auditor {
            pool: self.pool.clone(),
            keys: self.keys.clone(),
            audit: self.scripts.audit.clone(),
            shared: Arc::clone(&self.shared),
            store_timeout: self.options.store_timeout,
        }
    }
}

/// The audit after a store restart or failover, run by its own task.
struct Auditor {
    pool: Pool,
    keys: Keys,
    audit: redis::Script,
    shared: Arc<Shared>,
    store_timeout: Duration,
}

impl Auditor {
    async fn audit(self) {
        metrics::STORE_AUDITS.inc();
        let groups = lock(&self.shared.journal).recent_by_inbox(Instant::now());
        let appends: usize = groups.values().map(Vec::len).sum();
        let (mut ended, mut lost) = (0, 0);
        let mut failed = None;
        for ((user, epoch), entries) in &groups {
            for chunk in entries.chunks(AUDIT_KEYS_PER_CALL) {
                match self.audit_chunk(user, epoch, chunk).await {
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
        let mut store = lock(&self.shared.store);
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
        &self,
        user: &UserId,
        epoch: &str,
        chunk: &[Appended],
    ) -> Result<(u64, bool), EngineError> {
        let mut invocation = self.audit.prepare_invoke();
        invocation.key(self.keys.meta(user));
        for entry in chunk {
            invocation.key(self.keys.dedupe(user, &entry.from, &entry.id));
        }
        invocation.arg(epoch).arg(new_epoch());
        for entry in chunk {
            invocation.arg(entry.seq);
        }
        let work = async {
            let mut conn = self.pool.get().await.map_err(pool_error)?;
            let (lost, ended): (u64, i64) = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok((lost, ended == 1))
        };
        tokio::time::timeout(self.store_timeout, work)
            .await
            .unwrap_or_else(|_| Err(EngineError::Unavailable("audit timed out".into())))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves its state consistent before anything can panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Engine for RedisEngine {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn append<'a>(
        &'a self,
        msg: &'a NewMessage,
    ) -> BoxFuture<'a, Result<AppendOutcome, EngineError>> {
        Box::pin(self.timed(StoreOp::Append, async move {
            let payload = encode_payload(&msg.from, &msg.id, msg.ts, &msg.body);
            let replicas = self.options.min_replicas_ack;
            let mut invocation = self.scripts.append.prepare_invoke();
            invocation
                .key(self.keys.inbox(&msg.to))
                .key(self.keys.meta(&msg.to))
                .key(self.keys.dedupe(&msg.to, &msg.from, &msg.id))
                .arg(payload)
                .arg(self.options.max_inbox)
                .arg(new_epoch())
                .arg(millis(self.options.dedupe_window))
                .arg(millis(self.options.inbox_ttl))
                .arg(self.keys.live(&msg.to))
                .arg(if replicas > 0 { "1" } else { "0" });
            let mut conn = self.connection().await?;
            let value: Value = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            let (outcome, detail) = parse_append(&value)?;
            if replicas > 0 && outcome != AppendOutcome::InboxFull {
                // On the same connection: WAIT covers the writes this connection made.
                let timeout = millis(self.options.store_timeout.mul_f64(0.75));
                let mut wait = redis::cmd("WAIT");
                wait.arg(replicas).arg(timeout);
                let acked: i64 = wait.query_async(&mut conn).await.map_err(redis_error)?;
                if acked < i64::from(replicas) {
                    return Err(EngineError::Unavailable(format!(
                        "{acked} of {replicas} replicas acknowledged the append in time"
                    )));
                }
            }
            if let (AppendOutcome::Stored { seq }, Some(detail)) = (outcome, detail) {
                if detail.adopted {
                    metrics::epoch_replaced(&msg.to, "meta_lost");
                }
                lock(&self.shared.journal).record(Appended {
                    at: Instant::now(),
                    to: msg.to.clone(),
                    from: msg.from.clone(),
                    id: msg.id.clone(),
                    epoch: detail.epoch,
                    seq,
                });
            }
            Ok(outcome)
        }))
    }

    fn read_after<'a>(
        &'a self,
        user: &'a UserId,
        at: &'a Position,
        limit: usize,
    ) -> BoxFuture<'a, Result<Checked<Vec<Stored>>, EngineError>> {
        Box::pin(async move {
            let read = self.timed(StoreOp::Read, async {
                // Redis reads the count as a signed 64-bit integer.
                let limit = limit.min(i64::MAX as usize) as u64;
                match self
                    .checked(&self.scripts.read, user, at, Some(limit))
                    .await?
                {
                    Ok(items) => decode_page(&items).map(Some),
                    Err(_) => Ok(None),
                }
            });
            let Some(page) = read.await? else {
                return Ok(Checked::Void);
            };
            let mut entries = Vec::with_capacity(page.len());
            for (stored, raw) in page {
                if let Some(member) = raw {
                    self.quarantine(user, stored.seq(), member).await;
                }
                entries.push(stored);
            }
            Ok(Checked::Valid(entries))
        })
    }

    fn trim<'a>(
        &'a self,
        user: &'a UserId,
        at: &'a Position,
        upto: u64,
    ) -> BoxFuture<'a, Result<Checked<()>, EngineError>> {
        Box::pin(self.timed(StoreOp::Trim, async move {
            Ok(
                match self
                    .checked(&self.scripts.trim, user, at, Some(upto))
                    .await?
                {
                    Ok(_) => Checked::Valid(()),
                    Err(_) => Checked::Void,
                },
            )
        }))
    }

    fn check_position<'a>(
        &'a self,
        user: &'a UserId,
        at: &'a Position,
    ) -> BoxFuture<'a, Result<Checked<u64>, EngineError>> {
        Box::pin(self.timed(StoreOp::Position, async move {
            match self.checked(&self.scripts.position, user, at, None).await? {
                Ok(items) => match items.as_slice() {
                    [head] => int(head).map(Checked::Valid).ok_or_else(|| {
                        EngineError::Internal(format!("position script answered {head:?}"))
                    }),
                    other => Err(EngineError::Internal(format!(
                        "position script answered {other:?}"
                    ))),
                },
                Err(_) => Ok(Checked::Void),
            }
        }))
    }

    fn open_inbox<'a>(
        &'a self,
        user: &'a UserId,
        claim: Option<(&'a str, u64)>,
    ) -> BoxFuture<'a, Result<Opened, EngineError>> {
        Box::pin(self.timed(StoreOp::Open, async move {
            let (claimed_epoch, last_seq) = claim.unwrap_or(("", 0));
            let mut invocation = self.scripts.open.prepare_invoke();
            invocation
                .key(self.keys.meta(user))
                .key(self.keys.inbox(user))
                .arg(new_epoch())
                .arg(millis(self.options.inbox_ttl))
                .arg(claimed_epoch)
                .arg(last_seq);
            let mut conn = self.connection().await?;
            let value: Value = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            let (state, stamp, ended, adopted) = parse_open(&value)?;
            if ended {
                metrics::epoch_replaced(user, "resume_beyond_head");
            }
            if adopted {
                metrics::epoch_replaced(user, "meta_lost");
            }
            Ok(Opened {
                epoch: state.epoch,
                head: state.head,
                stamp,
            })
        }))
    }

    fn inbox_state<'a>(
        &'a self,
        user: &'a UserId,
    ) -> BoxFuture<'a, Result<Option<InboxState>, EngineError>> {
        Box::pin(self.timed(StoreOp::State, async move {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(self.keys.meta(user)).arg("epoch").arg("seq");
            parse_state(&self.query(&cmd).await?)
        }))
    }

    fn end_epoch<'a>(
        &'a self,
        user: &'a UserId,
        epoch: &'a str,
    ) -> BoxFuture<'a, Result<bool, EngineError>> {
        Box::pin(self.timed(StoreOp::Position, async move {
            let mut invocation = self.scripts.end_epoch.prepare_invoke();
            invocation
                .key(self.keys.meta(user))
                .arg(epoch)
                .arg(new_epoch());
            let mut conn = self.connection().await?;
            let ended: i64 = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            if ended == 1 {
                metrics::epoch_replaced(user, "seq_reused");
            }
            Ok(ended == 1)
        }))
    }

    fn subscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.live.subscribe(user)
    }

    fn unsubscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.live.unsubscribe(user)
    }

    fn take_live_events(&self) -> Option<mpsc::Receiver<LiveEvent>> {
        lock(&self.live_events).take()
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(self.timed(StoreOp::Ping, async move {
            self.query(&redis::cmd("PING")).await.map(|_| ())
        }))
    }

    fn check(&self) -> BoxFuture<'_, Result<StoreReport, EngineError>> {
        Box::pin(async move {
            let (run_id, report) = self.timed(StoreOp::Check, self.info()).await?;
            metrics::STORE_MAY_EVICT.set(i64::from(report.may_evict));
            if !run_id.is_empty() {
                self.observe_run_id(run_id);
            }
            Ok(report)
        })
    }
}

/// No pooled connection could be had: Redis is down, refusing, or the pool is closed.
fn pool_error(e: PoolError) -> EngineError {
    match e {
        PoolError::Backend(e) => match redis_error(e) {
            EngineError::Internal(m) | EngineError::Unavailable(m) => {
                EngineError::Unavailable(format!("no store connection: {m}"))
            }
        },
        other => EngineError::Unavailable(format!("no store connection: {other}")),
    }
}

/// Transient failures (the network, a Redis loading, failing over, out of memory, unable to
/// persist or busy) are `Unavailable`, which the client may retry; anything else is `Internal`.
fn redis_error(e: RedisError) -> EngineError {
    let transient = match e.kind() {
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => true,
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly,
        ) => true,
        ErrorKind::Extension => matches!(e.code(), Some("OOM" | "MISCONF" | "BUSY")),
        _ => e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout(),
    };
    if transient {
        EngineError::Unavailable(e.to_string())
    } else {
        EngineError::Internal(e.to_string())
    }
}
