//! A connection's outbound queue, written to the socket by the session's own task (no writer
//! task: a message wakes one task, not two). The queue is bounded in messages and bytes; live
//! messages are offered only when there is room (else the session lags and catches up from the
//! inbox later), and the session stops reading the client while the queue is full, so answers
//! never pile up either. Frames ready together go out in one socket write, and a socket that
//! takes nothing for the write timeout is closed. Memory per connection stays bounded whatever
//! the client does, and an idle connection holds no buffer here. What all of a node's queues
//! hold is `ferry_outbound_queued_bytes`: every byte added to a queue is taken back when it
//! leaves, whichever way (handed to the socket, cleared after a close or failure, or dropped
//! with the connection).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Sink;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

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
    Frame(Frame),
    Ping,
    /// A close code and reason.
    Close(u16, &'static str),
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
            Item::Ping | Item::Close(..) => 0,
        }
    }
}

/// Most frames handed to the socket before a flush, so one busy connection cannot hold its
/// task (and the others on the same worker) for long.
const BATCH: usize = 64;

/// Answers queued beyond the bounds at most (see `Outbound::takes_answers`).
const ANSWER_SLACK: usize = 64;
const ANSWER_SLACK_BYTES: usize = 64 * 1024;

/// The socket's write half.
pub type Socket = Pin<Box<dyn Sink<Message, Error = WsError> + Send>>;

/// Why writing stopped for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailed {
    /// The close frame went out: nothing more may be written.
    Closed,
    /// The socket failed.
    Broken,
    /// The socket took nothing for the write timeout.
    Stalled,
}

/// A connection's outbound queue and the socket it is written to.
pub struct Outbound {
    socket: Socket,
    queue: VecDeque<Item>,
    /// Bytes queued and not yet handed to the socket; always this queue's share of
    /// `ferry_outbound_queued_bytes`.
    bytes: usize,
    max_items: usize,
    max_bytes: usize,
    write_timeout: Duration,
    /// Frames handed to the socket and not flushed yet.
    unflushed: bool,
    /// Since when the socket has taken nothing while there was something to write.
    stalled_since: Option<Instant>,
    /// Set once writing failed or the close frame went out.
    failed: Option<WriteFailed>,
}

/// What one poll of the socket achieved.
enum Step {
    /// Frames were handed over; more may follow.
    Progress,
    /// Everything queued is written and flushed.
    Flushed,
}

impl Outbound {
    pub fn new(
        socket: Socket,
        max_items: usize,
        max_bytes: usize,
        write_timeout: Duration,
    ) -> Self {
        Self {
            socket,
            queue: VecDeque::new(),
            bytes: 0,
            max_items: max_items.max(1),
            max_bytes,
            write_timeout,
            unflushed: false,
            stalled_since: None,
            failed: None,
        }
    }

    /// Free message slots.
    pub fn free_slots(&self) -> usize {
        self.max_items.saturating_sub(self.queue.len())
    }

    /// Free bytes.
    pub fn free_bytes(&self) -> usize {
        self.max_bytes.saturating_sub(self.bytes)
    }

    /// Whether one more message may be queued without passing either bound.
    pub fn has_room(&self) -> bool {
        self.queue.len() < self.max_items && self.bytes < self.max_bytes
    }

    /// Whether answers (to sends, pings) may still be queued: the bounds plus a margin for them,
    /// so that a client whose queue is full of messages it does not read still has its acks
    /// read, but one that sends without reading is stopped.
    pub fn takes_answers(&self) -> bool {
        self.queue.len() < self.max_items + ANSWER_SLACK
            && self.bytes < self.max_bytes + ANSWER_SLACK_BYTES
    }

    /// Whether there is something to write or flush.
    pub fn has_pending(&self) -> bool {
        self.failed.is_none() && (!self.queue.is_empty() || self.unflushed)
    }

    /// Whether writing has stopped for good (and why).
    pub fn failed(&self) -> Option<WriteFailed> {
        self.failed
    }

    /// Queues a message if both bounds allow it; gives it back otherwise.
    pub fn try_push(&mut self, item: Item) -> Result<(), Item> {
        if !self.has_room() || self.failed.is_some() {
            return Err(item);
        }
        self.push(item);
        Ok(())
    }

    /// Queues an answer or a control frame whatever the bounds: the session stops reading the
    /// client while `takes_answers` is false, so at most a margin passes the bounds.
    pub fn push(&mut self, item: Item) {
        if self.failed.is_some() {
            return;
        }
        let bytes = item.bytes();
        self.bytes += bytes;
        metrics::OUTBOUND_QUEUED_BYTES.add(bytes as i64);
        self.queue.push_back(item);
    }

    /// Writes what is queued: frames go to the socket while it takes them, then one flush.
    /// Resolves once everything is flushed, or with why writing stopped for good. Cancel-safe:
    /// a frame leaves the queue only when the socket has taken it.
    pub async fn write(&mut self) -> Result<(), WriteFailed> {
        if let Some(failed) = self.failed {
            return Err(failed);
        }
        loop {
            let since = *self.stalled_since.get_or_insert_with(Instant::now);
            let deadline = since + self.write_timeout;
            let step = std::future::poll_fn(|cx| self.poll_step(cx));
            match tokio::time::timeout_at(deadline, step).await {
                Ok(Ok(Step::Progress)) => self.stalled_since = None,
                Ok(Ok(Step::Flushed)) => {
                    self.stalled_since = None;
                    return Ok(());
                }
                Ok(Err(failed)) => return Err(self.fail(failed)),
                Err(_) => {
                    tracing::info!("socket took nothing for the write timeout; closing");
                    metrics::SESSION_CLOSES
                        .with_label_values(&["write_timeout"])
                        .inc();
                    return Err(self.fail(WriteFailed::Stalled));
                }
            }
        }
    }

    /// Queues a close frame and writes until it is out (or `within` passes).
    pub async fn close(&mut self, code: u16, reason: &'static str, within: Duration) {
        self.push(Item::Close(code, reason));
        let _ = tokio::time::timeout(within, self.write()).await;
    }

    fn fail(&mut self, failed: WriteFailed) -> WriteFailed {
        self.failed = Some(failed);
        self.clear();
        failed
    }

    /// Drops everything queued (nothing more will be written), giving its bytes back.
    fn clear(&mut self) {
        self.queue.clear();
        metrics::OUTBOUND_QUEUED_BYTES.sub(self.bytes as i64);
        self.bytes = 0;
    }

    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Result<Step, WriteFailed>> {
        let mut progress = false;
        let mut handed = 0;
        while handed < BATCH && !self.queue.is_empty() {
            match self.socket.as_mut().poll_ready(cx) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(broken(e))),
                Poll::Ready(Ok(())) => {}
            }
            let Some(item) = self.queue.pop_front() else {
                break;
            };
            let bytes = item.bytes();
            self.bytes -= bytes;
            metrics::OUTBOUND_QUEUED_BYTES.sub(bytes as i64);
            let (message, closing) = into_message(item);
            if let Err(e) = self.socket.as_mut().start_send(message) {
                return Poll::Ready(Err(broken(e)));
            }
            self.unflushed = true;
            progress = true;
            handed += 1;
            if closing {
                // Nothing may follow a close frame.
                self.clear();
                return match self.socket.as_mut().poll_flush(cx) {
                    Poll::Ready(_) => Poll::Ready(Err(WriteFailed::Closed)),
                    Poll::Pending => Poll::Pending,
                };
            }
        }
        match self.socket.as_mut().poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.unflushed = false;
                if !self.queue.is_empty() {
                    return Poll::Ready(Ok(Step::Progress));
                }
                // A burst grew the queue: give the memory back once it is written.
                if self.queue.capacity() > 32 {
                    self.queue = VecDeque::new();
                }
                Poll::Ready(Ok(Step::Flushed))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(broken(e))),
            Poll::Pending if progress => Poll::Ready(Ok(Step::Progress)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A connection that ends with frames still queued gives their bytes back to the gauge.
impl Drop for Outbound {
    fn drop(&mut self) {
        self.clear();
    }
}

fn broken(e: WsError) -> WriteFailed {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => WriteFailed::Closed,
        e => {
            tracing::debug!(error = %e, "socket write failed");
            WriteFailed::Broken
        }
    }
}

/// The message for `item` (counting it in the metrics), and whether it is the close frame.
fn into_message(item: Item) -> (Message, bool) {
    match item {
        Item::Frame(Frame {
            message,
            kind,
            delivery,
        }) => {
            metrics::FRAMES_OUT.with_label_values(&[kind]).inc();
            if let Some((path, stored_ms)) = delivery {
                record_delivery(path, stored_ms);
            }
            (message, false)
        }
        Item::Ping => (Message::Ping(Default::default()), false),
        Item::Close(code, reason) => {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            (Message::Close(Some(frame)), true)
        }
    }
}

/// One observation, in two histograms: the latency one resolves the live path's milliseconds
/// (up to 8 s), the age one the minutes to days a message kept for an offline recipient waits.
fn record_delivery(path: Path, stored_ms: u64) {
    metrics::DELIVERED.with_label_values(&[path.label()]).inc();
    let age = now_ms().saturating_sub(stored_ms) as f64 / 1000.0;
    metrics::DELIVERY_LATENCY
        .with_label_values(&[path.label()])
        .observe(age);
    metrics::DELIVERY_AGE
        .with_label_values(&[path.label()])
        .observe(age);
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
