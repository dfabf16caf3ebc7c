//! What a client tells its application: `Event`s on a bounded channel, and the values they
//! carry.

use bytes::Bytes;
use tokio::sync::mpsc;

pub use tokio::sync::mpsc::error::TryRecvError;

use super::error::ClientError;
use crate::frame::ErrorCode;

/// The server's `welcome`, with the resume point it settled on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The authenticated user (the token's `sub`).
    pub user: String,
    /// The device the server took this connection for: the config's `device`, or `default`.
    /// `None` from servers before devices.
    pub device: Option<String>,
    /// The gateway node serving this connection.
    pub node: String,
    /// The inbox's current incarnation.
    pub epoch: String,
    /// The highest seq ever allocated in the inbox (0 if none).
    pub head: u64,
    /// The `hello`'s position named another incarnation: it is void and the inbox is replayed
    /// from its start. An [`Event::Reset`] follows this welcome.
    pub reset: bool,
    /// The server's WebSocket ping interval; the client treats a silence of 2.5 intervals as a
    /// dead connection.
    pub heartbeat_ms: u64,
    /// Where delivery resumes: the client's position is at least here from now on. The
    /// server's `resume`: the `hello`'s `last_seq`; or the position the server kept for this
    /// device when that is further (the client's own was lost or is behind; the seqs between
    /// were acknowledged by another connection of the same device); or the end of the
    /// [`Event::Gap`] that follows at once. From servers before devices: the `hello`'s
    /// `last_seq`. 0 after a reset.
    pub resumed_from: u64,
    /// When the session's token expires (unix seconds), if the server says.
    pub expires_at: Option<u64>,
}

/// One message from the inbox, delivered once: duplicates (seq at or below one already
/// delivered in this epoch) are dropped before they reach the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Its seq in this user's inbox.
    pub seq: u64,
    /// The sender's user id.
    pub from: String,
    /// The id the sender chose.
    pub id: String,
    /// Unix time in milliseconds when the gateway stored it.
    pub ts: u64,
    /// The body.
    pub body: Bytes,
}

/// The answer to a successful `send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// The message's seq in the recipient's inbox.
    pub seq: u64,
    /// This id was already stored (an earlier attempt got through); nothing new was written.
    pub duplicate: bool,
}

/// Something that happened on the connection, in the order it happened.
#[derive(Debug)]
pub enum Event {
    /// A connection was established: first on connect, then after every reconnect.
    Welcome(Welcome),
    /// The `welcome` just before said `reset`: the old position and dedupe state are void, and
    /// messages from seq 1 of `epoch` follow. Messages stored under the old epoch and never
    /// delivered are gone.
    Reset {
        /// The epoch the discarded position belonged to.
        previous_epoch: Option<String>,
        /// The epoch adopted.
        epoch: String,
    },
    /// A message, never a duplicate. The client acknowledges it (coalesced) once it is here.
    Message(Delivered),
    /// The messages `from..=to` of this epoch were trimmed from the inbox before this device
    /// acknowledged them (it was silent longer than the server keeps a device's messages, or
    /// the inbox was full while it lagged) and will never be delivered. The position moves to
    /// `to` as if they had been; the application should recover them from elsewhere (e.g.
    /// re-sync its history from its own backend). Seqs the application already got (as
    /// messages, or in an earlier gap) are left out, so `from` may be above the server's.
    Gap {
        /// The first seq that is gone.
        from: u64,
        /// The last seq that is gone; messages after it follow as usual.
        to: u64,
    },
    /// The server sent an `error` not tied to a send (or tied to one this client no longer
    /// waits for), or a frame the client could not decode (`bad_frame`).
    Error(ErrorCode, String),
    /// The server is draining: the client reconnects after `after_ms` (if reconnecting is on).
    Reconnect {
        /// The delay the server asked for.
        after_ms: u64,
    },
    /// The connection ended. With `reconnect` on, a reconnect follows (watch for `Welcome` or
    /// `ConnectFailed`); otherwise this is the last event.
    Disconnected {
        /// The close code the server sent (1000 when this client closed); `None` without one.
        close_code: Option<u16>,
        /// The close reason, or what went wrong.
        reason: String,
    },
    /// A reconnect attempt failed. Unless `will_retry`, the client has given up (the token or
    /// the request is refused for good) and this is the last event.
    ConnectFailed {
        /// Why the attempt failed.
        error: ClientError,
        /// Whether another attempt follows after a backoff.
        will_retry: bool,
    },
}

/// The receiving end of a client's events. `recv` returns `None` once the client has stopped
/// and every event was received.
///
/// Drain it: while it is full the client stops reading its socket, which also holds back the
/// answers to `send`. If it is dropped, messages are no longer delivered, so they are not
/// acknowledged and stay in the inbox; the rest of the client keeps working.
#[derive(Debug)]
pub struct Events {
    pub(crate) rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` when the client has stopped and nothing is left.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Result<Event, TryRecvError> {
        self.rx.try_recv()
    }

    /// Events ready now, without waiting.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether no event is ready now.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}
