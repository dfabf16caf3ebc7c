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

/// One thing to write. Small (the frame is boxed), so the queue's slots cost little on the
/// many connections that are idle.
#[derive(Debug)]
pub enum Item {
    Frame(Box<Frame>),
    Ping,
    /// A close code and reason (boxed, rare: keeps the item two words).
    Close(Box<(u16, &'static str)>),
}

/// An encoded frame and what the metrics need to know of it.
#[derive(Debug)]
pub struct Frame {
    pub message: Message,
    /// The frame type, for `ferry_frames_out_total`.
    pub kind: &'static str,
    /// For `msg` frames: how it was delivered and when it was stored (Unix ms).
    pub delivery: Option<(Path, u64)>,
}

impl Item {
    fn bytes(&self) -> usize {
        match self {
            Item::Frame(frame) => frame.message.len(),
            Item::Ping | Item::Close(_) => 0,
        }
    }
}

/// The session's end of the queue.
pub struct Outbound {
    tx: mpsc::Sender<Item>,
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
        self.tx.try_send(item).map_err(|e| {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(item) | mpsc::error::TrySendError::Closed(item) => {
                    item
                }
            }
        })
    }

    /// Queues, waiting for a slot (used for answers, which must not be dropped; the write
    /// timeout bounds the wait).
    pub async fn push(&self, item: Item) -> Result<(), Closed> {
        let size = item.bytes();
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.tx.send(item).await.map_err(|_| {
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
        if self
            .push(Item::Close(Box::new((code, reason))))
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(within, self.closed()).await;
        }
    }
}

struct Writer<S> {
    sink: S,
    rx: mpsc::Receiver<Item>,
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
        loop {
            let Some(first) = self.rx.recv().await else {
                let _ = tokio::time::timeout(self.write_timeout, self.sink.close()).await;
                return;
            };
            let (written, result) = self.write_batch(first).await;
            self.bytes.fetch_sub(written, Ordering::Relaxed);
            self.room.notify_waiters();
            if result.is_err() {
                return;
            }
        }
    }

    /// Writes `first` and whatever else is queued (up to `BATCH` items), then flushes. Each
    /// write has its own timeout, so a slow socket that keeps taking data stays open and one
    /// that takes nothing is closed. Nothing is allocated for the batch: an idle connection
    /// holds no buffer here. Returns the bytes taken off the queue.
    async fn write_batch(&mut self, first: Item) -> (usize, Result<(), Stop>) {
        let mut next = Some(first);
        let mut written = 0;
        let mut count = 0;
        while let Some(item) = next.take() {
            written += item.bytes();
            count += 1;
            let (message, closing) = match item {
                Item::Frame(frame) => {
                    let Frame {
                        message,
                        kind,
                        delivery,
                    } = *frame;
                    metrics::FRAMES_OUT.with_label_values(&[kind]).inc();
                    if let Some((path, stored_ms)) = delivery {
                        record_delivery(path, stored_ms);
                    }
                    (message, false)
                }
                Item::Ping => (Message::Ping(Default::default()), false),
                Item::Close(close) => {
                    let (code, reason) = *close;
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    };
                    (Message::Close(Some(frame)), true)
                }
            };
            if let Err(stop) = self.step(|sink| sink.feed(message)).await {
                return (written, Err(stop));
            }
            if closing {
                let flushed = self.step(|sink| sink.flush()).await;
                return (written, flushed.and(Err(Stop::Closed)));
            }
            if count < BATCH {
                next = self.rx.try_recv().ok();
            }
        }
        (written, self.step(|sink| sink.flush()).await)
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

fn record_delivery(path: Path, stored_ms: u64) {
    metrics::DELIVERED.with_label_values(&[path.label()]).inc();
    let latency = now_ms().saturating_sub(stored_ms) as f64 / 1000.0;
    metrics::DELIVERY_LATENCY
        .with_label_values(&[path.label()])
        .observe(latency);
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
