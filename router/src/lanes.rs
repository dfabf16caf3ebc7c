//! The Redis engine's command lanes: a few shared connections that carry every store command of
//! the node, pipelined.
//!
//! A lane is a task that owns one multiplexed connection (a `ConnectionManager`, which
//! reconnects by itself) and a queue. Commands are queued when they are *issued* (no checkout, no
//! per-command ping), and the task sends whatever is queued as one pipeline: one write and one
//! read for many sessions' commands, and the next pipeline as soon as the answers are back. So:
//! - commands of one lane reach Redis in the order they were issued (a sender's appends all go to
//!   the lane of its hash, which keeps its sends in order while several are in flight);
//! - a queue has a bound: a full one answers at once with `Unavailable` instead of growing;
//! - a script is called by `EVALSHA`; the lane loads it and sends those commands again when Redis
//!   answers `NOSCRIPT` (after a restart or `SCRIPT FLUSH`; nothing ran, so it is safe);
//! - with `--min-replicas-ack`, a pipeline that holds appends ends with one `WAIT`, whose answer
//!   covers every write before it on the connection: a group commit.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
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
    /// Starts `count` lanes on `client` (no I/O here: each connects on its first command).
    pub fn start(
        client: &redis::Client,
        count: usize,
        store_timeout: Duration,
    ) -> Result<Lanes, EngineError> {
        let mut lanes = Vec::with_capacity(count.max(1));
        for _ in 0..count.max(1) {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(store_timeout))
                .set_response_timeout(Some(store_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(1))
                .set_pipeline_buffer_size(64);
            let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
                .map_err(|e| EngineError::Internal(format!("cannot set up a connection: {e}")))?;
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(
                Lane {
                    conn,
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
        cmd: Cmd,
        script: Option<&'static LuaScript>,
        durability: Durability,
    ) -> oneshot::Receiver<Result<Value, EngineError>> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            cmd,
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

/// One lane's task.
struct Lane {
    conn: ConnectionManager,
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

    /// Runs `batch` as one pipeline (twice for the commands whose script Redis did not have).
    async fn execute(&mut self, batch: &mut Vec<Job>) {
        let answers = self.pipeline(batch).await;
        let mut missing = Vec::new();
        for (job, answer) in batch.drain(..).zip(answers) {
            match answer {
                Err(e) if job.script.is_some() && is_noscript(&e) => missing.push(job),
                answer => {
                    let _ = job.reply.send(answer);
                }
            }
        }
        if missing.is_empty() {
            return;
        }
        if let Err(e) = self.load_scripts(&missing).await {
            for job in missing {
                let _ = job.reply.send(Err(e.clone()));
            }
            return;
        }
        let answers = self.pipeline(&missing).await;
        for (job, answer) in missing.into_iter().zip(answers) {
            let _ = job.reply.send(answer);
        }
    }

    /// Sends `jobs` as one pipeline; an answer per job, in order.
    async fn pipeline(&mut self, jobs: &[Job]) -> Vec<Result<Value, EngineError>> {
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
            let wait_ms = u64::try_from(self.store_timeout.mul_f64(0.75).as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            pipe.cmd("WAIT").arg(replicas).arg(wait_ms);
        }
        let count = pipe.len();
        let mut sent = self.send(&pipe, count).await;
        if matches!(&sent, Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped()) {
            // The connection broke (Redis restarted, the network dropped it) before or while the
            // pipeline went out; the manager reconnects for the next try. Sending the pipeline
            // again is safe: appends are deduplicated, and everything else is idempotent or a
            // compare-and-set.
            sent = self.send(&pipe, count).await;
        }
        let values = match sent {
            Ok(Ok(values)) if values.len() == count => values,
            Ok(Ok(values)) => {
                let e = EngineError::Internal(format!(
                    "{} answers to a pipeline of {count}",
                    values.len()
                ));
                return jobs.iter().map(|_| Err(e.clone())).collect();
            }
            Ok(Err(e)) => {
                let e = redis_error(e);
                return jobs.iter().map(|_| Err(e.clone())).collect();
            }
            Err(_) => {
                let e =
                    EngineError::Unavailable(format!("no answer within {:?}", self.store_timeout));
                return jobs.iter().map(|_| Err(e.clone())).collect();
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
        answers
    }

    async fn send(
        &mut self,
        pipe: &redis::Pipeline,
        count: usize,
    ) -> Result<redis::RedisResult<Vec<Value>>, tokio::time::error::Elapsed> {
        let sent = self.conn.send_packed_commands(pipe, 0, count);
        tokio::time::timeout(self.store_timeout, sent).await
    }

    async fn load_scripts(&mut self, jobs: &[Job]) -> Result<(), EngineError> {
        let mut loaded: Vec<&str> = Vec::new();
        for script in jobs.iter().filter_map(|job| job.script) {
            if loaded.contains(&script.hash.as_str()) {
                continue;
            }
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(script.code);
            let loading = self.conn.send_packed_command(&load);
            match tokio::time::timeout(self.store_timeout, loading).await {
                Ok(Ok(_)) => loaded.push(&script.hash),
                Ok(Err(e)) => return Err(redis_error(e)),
                Err(_) => return Err(EngineError::Unavailable("SCRIPT LOAD timed out".into())),
            }
        }
        Ok(())
    }
}

fn is_noscript(e: &EngineError) -> bool {
    matches!(e, EngineError::Internal(m) if m.starts_with("NOSCRIPT"))
}

/// Transient failures (the network, a Redis loading, failing over, out of memory, unable to
/// persist or busy) are `Unavailable`, which the client may retry; anything else is `Internal`
/// (a `NOSCRIPT` keeps its code first, for the lane to see).
pub(crate) fn redis_error(e: RedisError) -> EngineError {
    let transient = match e.kind() {
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => true,
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly,
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
