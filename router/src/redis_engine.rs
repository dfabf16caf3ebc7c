//! The Redis engine: the cluster's shared truth. Store commands go through a small
//! `deadpool-redis` pool of multiplexed connections, each bounded by `store_timeout`; live
//! delivery goes through one dedicated pub/sub connection (`pubsub.rs`).

use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::{Pool, PoolError, Runtime};
use ferry_shared::{Keys, UserId};
use futures_util::future::BoxFuture;
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::engine::{
    AppendOutcome, Engine, EngineError, EngineOptions, InboxMessage, InboxState, LiveEvent,
    NewMessage,
};
use crate::epoch::new_epoch;
use crate::metrics::{self, StoreOp};
use crate::pubsub::LiveBus;
use crate::record::{decode_member, encode_payload};
use crate::script::{Scripts, parse_append, parse_state};

/// An engine on a standalone Redis (7 or later).
pub struct RedisEngine {
    /// Connections for store commands.
    pool: Pool,
    /// Key and channel names under the configured prefix.
    keys: Keys,
    options: EngineOptions,
    scripts: Scripts,
    /// The pub/sub task's handle; dropping the engine stops the task.
    live: LiveBus,
    /// The live events until the hub takes them.
    live_events: Mutex<Option<mpsc::Receiver<LiveEvent>>>,
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
        Ok(RedisEngine {
            pool,
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
                .arg(self.keys.live(&msg.to));
            let mut conn = self.connection().await?;
            let value: Value = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            parse_append(&value)
        }))
    }

    fn read_after<'a>(
        &'a self,
        user: &'a UserId,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<InboxMessage>, EngineError>> {
        Box::pin(self.timed(StoreOp::Read, async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(self.keys.inbox(user))
                .arg(format!("({after}"))
                .arg("+inf")
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                // Redis reads the count as a signed 64-bit integer.
                .arg(limit.min(i64::MAX as usize));
            let Value::Array(members) = self.query(&cmd).await? else {
                return Err(EngineError::Internal("ZRANGE answered a non-array".into()));
            };
            members
                .iter()
                .map(|member| match member {
                    Value::BulkString(bytes) => decode_member(bytes)
                        .map_err(|e| EngineError::Internal(format!("inbox of {user}: {e}"))),
                    other => Err(EngineError::Internal(format!(
                        "ZRANGE answered {other:?} as a member"
                    ))),
                })
                .collect()
        }))
    }

    fn trim<'a>(&'a self, user: &'a UserId, upto: u64) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(self.timed(StoreOp::Trim, async move {
            let mut cmd = redis::cmd("ZREMRANGEBYSCORE");
            cmd.arg(self.keys.inbox(user)).arg("-inf").arg(upto);
            self.query(&cmd).await.map(|_| ())
        }))
    }

    fn open_inbox<'a>(
        &'a self,
        user: &'a UserId,
    ) -> BoxFuture<'a, Result<InboxState, EngineError>> {
        Box::pin(self.timed(StoreOp::Open, async move {
            let mut invocation = self.scripts.open.prepare_invoke();
            invocation
                .key(self.keys.meta(user))
                .key(self.keys.inbox(user))
                .arg(new_epoch())
                .arg(millis(self.options.inbox_ttl));
            let mut conn = self.connection().await?;
            let value: Value = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(redis_error)?;
            parse_state(&value)?
                .ok_or_else(|| EngineError::Internal("open script returned no epoch".into()))
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

    fn subscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.live.subscribe(user)
    }

    fn unsubscribe(&self, user: &UserId) -> BoxFuture<'static, Result<(), EngineError>> {
        self.live.unsubscribe(user)
    }

    fn take_live_events(&self) -> Option<mpsc::Receiver<LiveEvent>> {
        self.live_events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(self.timed(StoreOp::Ping, async move {
            self.query(&redis::cmd("PING")).await.map(|_| ())
        }))
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
