//! A connection's outbound queue and the task that writes it to the socket. The queue is bounded
//! in messages and bytes; live messages are offered only when there is room (else the session
//! lags and catches up from the inbox later), and a socket that takes nothing for the write
//! timeout is closed. Memory per connection stays bounded whatever the client does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{Sink, SinkExt};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// How a message reached the client, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Live,
    CatchUp,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Live => "live",
            Path::CatchUp => "catchup",
        }
    }
}

/// One thing to write.
#[derive(Debug)]
pub enum Item {
    Frame {
        message: Message,
        /// The frame type, for `ferry_frames_out_total`.
        kind: &'static str,
        /// For `msg` frames: how it was delivered and when it was stored (Unix ms).
        delivery: Option<(Path, u64)>,
    },
    Ping,
    Close {
        code: u16,
        reason: &'static str,
    },
}

impl Item {
    fn bytes(&self) -> usize {
        match self {
            Item::Frame { message, .. } => message.len(),
            Item::Ping | Item::Close { .. } => 0,
        }
    }
}

/// The session's end of the queue.
pub struct Outbound {
    tx: mpsc::Sender<(Item, usize)>,
    /// Bytes queued and not yet written.
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    /// Woken whenever the writer has written a batch.
    room: Arc<Notify>,
    /// Cancelled when the writer stops (socket error, write timeout, close written).
    writer_done: CancellationToken,
}

/// The queue was closed: the writer has stopped.
#[derive(Debug)]
pub struct Closed;

impl Outbound {
    /// Creates the queue and spawns its writer on `sink`.
    pub fn spawn<S>(sink: S, max_items: usize, max_bytes: usize, write_timeout: Duration) -> Self
    where
        S: Sink<Message, Error = WsError> + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(max_items.max(1));
        let bytes = Arc::new(AtomicUsize::new(0));
        let room = Arc::new(Notify::new());
        let writer_done = CancellationToken::new();
        let writer = Writer {
            sink,
            rx,
            bytes: bytes.clone(),
            room: room.clone(),
            write_timeout,
        };
        let done = writer_done.clone();
        tokio::spawn(async move {
            writer.run().await;
            done.cancel();
        });
        Self {
            tx,
            bytes,
            max_bytes,
            room,
            writer_done,
        }
    }

    /// Free message slots.
    pub fn free_slots(&self) -> usize {
        self.tx.capacity()
    }

    /// Whether one more message may be queued without passing either bound.
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0 && self.bytes.load(Ordering::Relaxed) < self.max_bytes
    }

    /// Waits until `has_room`.
    pub async fn wait_room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_room() || self.writer_done.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// Queues without waiting; gives the item back when the queue is full or closed.
    pub fn try_push(&self, item: Item) -> Result<(), Item> {
        let size = item.bytes();
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.tx.try_send((item, size)).map_err(|e| {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full((item, _))
                | mpsc::error::TrySendError::Closed((item, _)) => item,
            }
        })
    }

    /// Queues, waiting for a slot (used for answers, which must not be dropped; the write
    /// timeout bounds the wait).
    pub async fn push(&self, item: Item) -> Result<(), Closed> {
        let size = item.bytes();
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.tx.send((item, size)).await.map_err(|_| {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            Closed
        })
    }

    /// Resolves when the writer has stopped.
    pub async fn closed(&self) {
        self.writer_done.cancelled().await
    }

    /// Queues a close frame and waits (bounded) for the writer to write it and stop.
    pub async fn close(&self, code: u16, reason: &'static str, within: Duration) {
        if self.push(Item::Close { code, reason }).await.is_ok() {
            let _ = tokio::time::timeout(within, self.closed()).await;
        }
    }
}

struct Writer<S> {
    sink: S,
    rx: mpsc::Receiver<(Item, usize)>,
    bytes: Arc<AtomicUsize>,
    room: Arc<Notify>,
    write_timeout: Duration,
}

/// Most items written before one flush.
const BATCH: usize = 64;

/// Why the writer stopped.
enum Stop {
    /// The close frame is written.
    Closed,
    /// The socket failed, or took nothing for the write timeout.
    Failed,
}

impl<S> Writer<S>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut delivered = Vec::with_capacity(BATCH);
        loop {
            if self.rx.recv_many(&mut batch, BATCH).await == 0 {
                let _ = tokio::time::timeout(self.write_timeout, self.sink.close()).await;
                return;
            }
            let written: usize = batch.iter().map(|(_, size)| size).sum();
            let result = self.write_batch(&mut batch, &mut delivered).await;
            self.bytes.fetch_sub(written, Ordering::Relaxed);
            self.room.notify_waiters();
            record_deliveries(&delivered);
            delivered.clear();
            if result.is_err() {
                return;
            }
        }
    }

    /// Writes a batch and flushes it. Each write has its own timeout, so a slow socket that
    /// keeps taking data stays open and one that takes nothing is closed.
    async fn write_batch(
        &mut self,
        batch: &mut Vec<(Item, usize)>,
        delivered: &mut Vec<(Path, u64)>,
    ) -> Result<(), Stop> {
        let mut closing = false;
        for (item, _) in batch.drain(..) {
            let message = match item {
                Item::Frame {
                    message,
                    kind,
                    delivery,
                } => {
                    metrics::FRAMES_OUT.with_label_values(&[kind]).inc();
                    delivered.extend(delivery);
                    message
                }
                Item::Ping => Message::Ping(Default::default()),
                Item::Close { code, reason } => {
                    closing = true;
                    Message::Close(Some(CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    }))
                }
            };
            self.step(|sink| sink.feed(message)).await?;
            if closing {
                break;
            }
        }
        self.step(|sink| sink.flush()).await?;
        if closing { Err(Stop::Closed) } else { Ok(()) }
    }

    /// One socket operation, bounded by the write timeout.
    async fn step<'a, F, Fut>(&'a mut self, op: F) -> Result<(), Stop>
    where
        F: FnOnce(&'a mut S) -> Fut,
        Fut: std::future::Future<Output = Result<(), WsError>> + 'a,
    {
        match tokio::time::timeout(self.write_timeout, op(&mut self.sink)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "socket write failed");
                Err(Stop::Failed)
            }
            Err(_) => {
                tracing::info!("socket took nothing for the write timeout; closing");
                metrics::SESSION_CLOSES
                    .with_label_values(&["write_timeout"])
                    .inc();
                Err(Stop::Failed)
            }
        }
    }
}

fn record_deliveries(delivered: &[(Path, u64)]) {
    if delivered.is_empty() {
        return;
    }
    let now = now_ms();
    for (path, stored_ms) in delivered {
        metrics::DELIVERED.with_label_values(&[path.label()]).inc();
        let latency = now.saturating_sub(*stored_ms) as f64 / 1000.0;
        metrics::DELIVERY_LATENCY
            .with_label_values(&[path.label()])
            .observe(latency);
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
