//! The Redis engine's command lanes: a few shared connections that carry every store command of
//! the node, pipelined.
//!
//! A lane is a task that owns one multiplexed connection (a `ConnectionManager` on a standalone
//! Redis, a cluster connection on a Redis Cluster; both reconnect by themselves) and a queue.
//! Commands are queued when they are *issued* (no checkout, no per-command ping), and the task
//! sends whatever is queued as one pipeline: one write and one read for many sessions' commands,
//! and the next pipeline as soon as the answers are back. On a cluster, the batch is split by
//! slot (the redis crate refuses a pipeline across slots), and the slots' pipelines go out at
//! once, each to the primary that owns it. So:
//! - commands of one lane reach Redis in the order they were issued (a sender's appends all go to
//!   the lane of its hash, which keeps its sends in order while several are in flight);
//! - a queue has a bound: a full one answers at once with `Unavailable` instead of growing;
//! - a script is called by `EVALSHA`; when Redis answers `NOSCRIPT` (after a restart, a failover
//!   to a replica with an empty script cache, or `SCRIPT FLUSH`; nothing ran, so it is safe) the
//!   lane sends those commands again as `EVAL` with the script's body, which runs it on the node
//!   that owns its keys and caches it there;
//! - with `--min-replicas-ack`, a pipeline that holds appends ends with one `WAIT`, whose answer
//!   covers every write before it on the connection: a group commit (per slot on a cluster);
//! - on a cluster, the redis crate follows `MOVED` and `ASK` and retries `TRYAGAIN` and a
//!   failover in progress a few times; what is still refused within the store timeout is
//!   `Unavailable`. Sending again is safe: appends are deduplicated, and everything else is
//!   idempotent or a compare-and-set.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::{mpsc, oneshot};

use crate::engine::EngineError;

/// Commands sent in one pipeline at most.
const MAX_PIPELINE: usize = 256;
/// Commands queued on one lane at most; more are refused (`Unavailable`).
const QUEUE: usize = 16_384;

/// A Lua script, called by its SHA-1.
#[derive(Debug)]
pub(crate) struct LuaScript {
    pub code: &'static str,
    pub hash: String,
}

impl LuaScript {
    pub fn new(code: &'static str) -> Self {
        Self {
            code,
            hash: redis::Script::new(code).get_hash().to_string(),
        }
    }

    /// `EVALSHA <hash> <keys.len()>`, to which the caller adds the keys and arguments.
    pub fn call(&'static self, keys: usize) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.hash).arg(keys);
        cmd
    }
}

/// What a command waits for after it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// The primary's answer.
    Primary,
    /// That many replicas' acknowledgement of the connection's writes (`WAIT`).
    Replicas(u32),
}

/// One queued command and where its answer goes.
struct Job {
    cmd: Cmd,
    /// The slot of the command's keys (used on a cluster).
    slot: u16,
    /// The script it calls, to load on `NOSCRIPT`.
    script: Option<&'static LuaScript>,
    durability: Durability,
    reply: oneshot::Sender<Result<Value, EngineError>>,
}

/// The lanes of one engine. Cloning is cheap; the lane tasks stop when every clone is gone.
#[derive(Clone)]
pub(crate) struct Lanes {
    lanes: Arc<[mpsc::Sender<Job>]>,
}

impl Lanes {
    /// Starts `count` lanes, each on a connection made by `connect` (no I/O here: each
    /// connects on its first command).
    pub fn start(
        count: usize,
        store_timeout: Duration,
        mut connect: impl FnMut() -> Result<Conn, EngineError>,
    ) -> Result<Lanes, EngineError> {
        let mut lanes = Vec::with_capacity(count.max(1));
        for _ in 0..count.max(1) {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(
                Lane {
                    conn: connect()?,
                    rx,
                    store_timeout,
                }
                .run(),
            );
            lanes.push(tx);
        }
        Ok(Lanes {
            lanes: lanes.into(),
        })
    }

    pub fn count(&self) -> usize {
        self.lanes.len()
    }

    /// Queues `cmd` on lane `lane` (modulo the count) now; the future is its answer.
    pub fn submit(
        &self,
        lane: usize,
        slot: u16,
        cmd: Cmd,
        script: Option<&'static LuaScript>,
        durability: Durability,
    ) -> oneshot::Receiver<Result<Value, EngineError>> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            cmd,
            slot,
            script,
            durability,
            reply,
        };
        if let Err(e) = self.lanes[lane % self.lanes.len()].try_send(job) {
            let (job, why) = match e {
                mpsc::error::TrySendError::Full(job) => (job, "the store queue is full"),
                mpsc::error::TrySendError::Closed(job) => (job, "the store lane has stopped"),
            };
            let _ = job.reply.send(Err(EngineError::Unavailable(why.into())));
        }
        answer
    }
}

/// A lane's connection.
pub(crate) enum Conn {
    /// A standalone Redis.
    Single(ConnectionManager),
    /// A Redis Cluster: commands go to the primary of their slot. The client makes a fresh
    /// connection when this one stops answering.
    Cluster {
        conn: ClusterConnection,
        client: Box<redis::cluster::ClusterClient>,
    },
}

impl Conn {
    /// A standalone connection that reconnects by itself, each attempt and answer bounded by
    /// `store_timeout`.
    pub fn single(client: &redis::Client, store_timeout: Duration) -> Result<Conn, EngineError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(store_timeout))
            .set_response_timeout(Some(store_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1))
            .set_pipeline_buffer_size(64);
        ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map(Conn::Single)
            .map_err(|e| EngineError::Internal(format!("cannot set up a connection: {e}")))
    }

    /// A cluster connection (it connects on its first command).
    pub fn cluster(client: &redis::cluster::ClusterClient) -> Conn {
        Conn::Cluster {
            conn: cluster_connection(client),
            client: Box::new(client.clone()),
        }
    }
}

fn cluster_connection(client: &redis::cluster::ClusterClient) -> ClusterConnection {
    client.get_pending_async_connection_with_config(redis::cluster::ClusterConfig::new())
}

/// One lane's task.
struct Lane {
    conn: Conn,
    rx: mpsc::Receiver<Job>,
    store_timeout: Duration,
}

impl Lane {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_PIPELINE);
        while let Some(first) = self.rx.recv().await {
            batch.push(first);
            while batch.len() < MAX_PIPELINE {
                match self.rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            // A caller that gave up (its timeout answered `unavailable`) needs no answer; its
            // command is dropped unsent, which a retry with the same id makes safe.
            batch.retain(|job| !job.reply.is_closed());
            if !batch.is_empty() {
                self.execute(&mut batch).await;
            }
            batch.clear();
        }
    }

    /// Runs `batch` (twice for the commands whose script Redis did not have: as `EVAL`).
    async fn execute(&mut self, batch: &mut Vec<Job>) {
        let answers = self.send_batch(batch).await;
        let mut missing = Vec::new();
        for (job, answer) in batch.drain(..).zip(answers) {
            match (answer, job.script) {
                (Err(e), Some(script)) if is_noscript(&e) => missing.push(Job {
                    cmd: as_eval(&job.cmd, script),
                    ..job
                }),
                (answer, _) => {
                    let _ = job.reply.send(answer);
                }
            }
        }
        if missing.is_empty() {
            return;
        }
        let answers = self.send_batch(&missing).await;
        for (job, answer) in missing.into_iter().zip(answers) {
            let _ = job.reply.send(answer);
        }
    }

    /// Sends `jobs`; an answer per job, in order.
    async fn send_batch(&mut self, jobs: &[Job]) -> Vec<Result<Value, EngineError>> {
        let timeout = self.store_timeout;
        match &mut self.conn {
            Conn::Single(conn) => {
                let refs: Vec<&Job> = jobs.iter().collect();
                pipeline(conn, &refs, timeout).await.0
            }
            Conn::Cluster { conn, client } => {
                // One pipeline per slot, in the jobs' order within each, all at once.
                let mut slots: Vec<(u16, Vec<usize>)> = Vec::new();
                for (i, job) in jobs.iter().enumerate() {
                    match slots.iter_mut().find(|(slot, _)| *slot == job.slot) {
                        Some((_, members)) => members.push(i),
                        None => slots.push((job.slot, vec![i])),
                    }
                }
                let sent = slots.iter().map(|(slot, members)| {
                    let mut conn = SlotConn {
                        conn: conn.clone(),
                        slot: *slot,
                    };
                    let refs: Vec<&Job> = members.iter().map(|&i| &jobs[i]).collect();
                    async move { pipeline(&mut conn, &refs, timeout).await }
                });
                let mut answers: Vec<Option<Result<Value, EngineError>>> =
                    (0..jobs.len()).map(|_| None).collect();
                let mut stuck = false;
                for ((_, members), (results, timed_out)) in slots.iter().zip(join_all(sent).await) {
                    stuck |= timed_out;
                    for (&i, result) in members.iter().zip(results) {
                        answers[i] = Some(result);
                    }
                }
                if stuck {
                    // The crate's connection can stay wedged after a failover (seen in the
                    // cluster-primary-kill fault scenario: a lane's pipelines, healthy shards'
                    // included, timed out from the failover to the end of the run). A fresh
                    // one rereads the slot map and connects to the current primaries.
                    tracing::debug!("a cluster pipeline timed out; replacing the connection");
                    *conn = cluster_connection(client);
                }
                answers
                    .into_iter()
                    .map(|a| a.unwrap_or_else(|| Err(EngineError::Internal("no answer".into()))))
                    .collect()
            }
        }
    }
}

/// A cluster connection bound to the primary of one slot.
struct SlotConn {
    conn: ClusterConnection,
    slot: u16,
}

/// Where a pipeline goes.
trait PipelineTarget {
    /// Sends `pipe`; retries once on a broken connection if that is safe here.
    async fn send(&mut self, pipe: &redis::Pipeline) -> redis::RedisResult<Vec<Value>>;
}

impl PipelineTarget for ConnectionManager {
    async fn send(&mut self, pipe: &redis::Pipeline) -> redis::RedisResult<Vec<Value>> {
        let count = pipe.len();
        let sent = self.send_packed_commands(pipe, 0, count).await;
        if matches!(&sent, Err(e) if e.is_io_error() || e.is_connection_dropped()) {
            // The connection broke (Redis restarted, the network dropped it) before or while the
            // pipeline went out; the manager reconnects for the next try. Sending the pipeline
            // again is safe: appends are deduplicated, and everything else is idempotent or a
            // compare-and-set.
            return self.send_packed_commands(pipe, 0, count).await;
        }
        sent
    }
}

impl PipelineTarget for SlotConn {
    async fn send(&mut self, pipe: &redis::Pipeline) -> redis::RedisResult<Vec<Value>> {
        // The cluster connection reconnects and retries by itself.
        let route = SingleNodeRoutingInfo::SpecificNode(Route::new(self.slot, SlotAddr::Master));
        self.conn
            .route_pipeline(pipe.clone(), 0, pipe.len(), route)
            .await
    }
}

/// Sends `jobs` as one pipeline (ending with `WAIT` when one of them needs replicas); an answer
/// per job, in order, and whether the pipeline went unanswered within `store_timeout`.
async fn pipeline(
    target: &mut impl PipelineTarget,
    jobs: &[&Job],
    store_timeout: Duration,
) -> (Vec<Result<Value, EngineError>>, bool) {
    let mut pipe = redis::pipe();
    let mut replicas = 0;
    for job in jobs {
        pipe.add_command(job.cmd.clone());
        if let Durability::Replicas(n) = job.durability {
            replicas = replicas.max(n);
        }
    }
    if replicas > 0 {
        // WAIT's own limit leaves room for its answer within the store timeout.
        let wait_ms = u64::try_from(store_timeout.mul_f64(0.75).as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        pipe.cmd("WAIT").arg(replicas).arg(wait_ms);
    }
    let count = pipe.len();
    let values = match tokio::time::timeout(store_timeout, target.send(&pipe)).await {
        Ok(Ok(values)) if values.len() == count => values,
        Ok(Ok(values)) => {
            let e =
                EngineError::Internal(format!("{} answers to a pipeline of {count}", values.len()));
            return (jobs.iter().map(|_| Err(e.clone())).collect(), false);
        }
        Ok(Err(e)) => {
            let e = redis_error(e);
            return (jobs.iter().map(|_| Err(e.clone())).collect(), false);
        }
        Err(_) => {
            let e = EngineError::Unavailable(format!("no answer within {store_timeout:?}"));
            return (jobs.iter().map(|_| Err(e.clone())).collect(), true);
        }
    };
    let mut values = values.into_iter();
    let mut answers: Vec<Result<Value, EngineError>> = values
        .by_ref()
        .take(jobs.len())
        .map(|value| match value {
            Value::ServerError(e) => Err(redis_error(e.into())),
            value => Ok(value),
        })
        .collect();
    if replicas > 0 {
        let acked = match values.next() {
            Some(Value::Int(n)) => n,
            _ => 0,
        };
        for (job, answer) in jobs.iter().zip(answers.iter_mut()) {
            if let Durability::Replicas(n) = job.durability
                && answer.is_ok()
                && acked < i64::from(n)
            {
                *answer = Err(EngineError::Unavailable(format!(
                    "{acked} of {n} replicas acknowledged the write in time"
                )));
            }
        }
    }
    (answers, false)
}

/// `EVALSHA <hash> <args…>` as `EVAL <body> <args…>`.
fn as_eval(cmd: &Cmd, script: &LuaScript) -> Cmd {
    let mut eval = redis::cmd("EVAL");
    eval.arg(script.code);
    for arg in cmd.args_iter().skip(2) {
        if let redis::Arg::Simple(bytes) = arg {
            eval.arg(bytes);
        }
    }
    eval
}

fn is_noscript(e: &EngineError) -> bool {
    matches!(e, EngineError::Internal(m) if m.starts_with("NOSCRIPT"))
}

/// Transient failures (the network, a Redis loading, failing over, a slot still moving after the
/// retries, out of memory, unable to persist or busy) are `Unavailable`, which the client may retry; anything else is `Internal`
/// (a `NOSCRIPT` keeps its code first, for the lane to see).
pub(crate) fn redis_error(e: RedisError) -> EngineError {
    let transient = match e.kind() {
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => true,
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        ) => true,
        ErrorKind::Server(ServerErrorKind::NoScript) => {
            return EngineError::Internal(format!("NOSCRIPT {e}"));
        }
        ErrorKind::Extension => matches!(e.code(), Some("OOM" | "MISCONF" | "BUSY")),
        _ => e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout(),
    };
    if transient {
        EngineError::Unavailable(e.to_string())
    } else {
        EngineError::Internal(e.to_string())
    }
}
