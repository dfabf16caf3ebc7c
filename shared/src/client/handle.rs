//! `Client`: the cloneable handle an application holds. It connects, sends with retries,
//! forces acks, pings, reports the resume point and closes; the socket itself belongs to the
//! driver task.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use super::config::ClientConfig;
use super::delivery::Shared;
use super::driver::{Command, Driver};
use super::error::{ClientError, SendError};
use super::events::{Events, Sent};
use super::state::{Backoff, Position, rate_limit_delay};
use super::transport::{encode_send, open_session};
use crate::codec::Codec;
use crate::frame::ErrorCode;

/// Commands buffered between the handles and the driver; a full buffer makes callers wait.
const COMMAND_CAPACITY: usize = 64;

/// A connected Ferry client. Cheap to clone; every clone drives the same connection. Dropping
/// every clone closes the connection (like [`Client::close`], without waiting).
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    user: String,
    /// The device the server took this client for (from the first `welcome`).
    device: Option<String>,
    codec: Codec,
    reconnect: bool,
    backoff: Backoff,
    send_timeout: Option<Duration>,
}

impl Client {
    /// Connects, sends `hello` with the config's resume point and waits for `welcome`, then
    /// starts the task that owns the socket. The first event is that `Welcome` (followed by
    /// `Reset` if the resume point was void).
    ///
    /// Fails with the server's refusal: [`ClientError::Handshake`] for an HTTP status,
    /// [`ClientError::Server`] for an `error` frame (e.g. `unauthorized`),
    /// [`ClientError::Closed`] for a close before `welcome`. The first connection is not
    /// retried, even with `reconnect` on. Must be called within a Tokio runtime.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Events), ClientError> {
        config.validate()?;
        let resume = Position {
            last_seq: config.last_seq,
            epoch: config.epoch.clone(),
        };
        let (ws, welcome) = open_session(&config, &resume).await?;
        let (command_tx, command_rx) = mpsc::channel(COMMAND_CAPACITY);
        let (event_tx, event_rx) = mpsc::channel(config.event_capacity);
        let shared = Arc::new(Shared {
            position: std::sync::Mutex::new(resume),
        });
        let span = tracing::debug_span!("ferry_client", user = %welcome.user);
        let client = Client {
            inner: Arc::new(Inner {
                commands: command_tx,
                shared: Arc::clone(&shared),
                user: welcome.user.clone(),
                device: welcome.device.clone(),
                codec: config.codec,
                reconnect: config.reconnect,
                backoff: Backoff {
                    min: config.backoff_min,
                    max: config.backoff_max,
                },
                send_timeout: config.send_timeout,
            }),
        };
        let driver = Driver::new(Arc::new(config), shared, command_rx, event_tx, ws, welcome);
        tokio::spawn(driver.run().instrument(span));
        Ok((client, Events { rx: event_rx }))
    }

    /// Stores `body` in `to`'s inbox under the message id `id` and waits for `sent`.
    ///
    /// Sends are pipelined: call it from many tasks at once (or join the futures) and each is
    /// matched to its answer by `id`. On `unavailable` it retries with the same `id` after a
    /// jittered backoff, on `rate_limited` after the server's `retry_after_ms`, and after a
    /// reconnect it sends again whatever was unanswered: the same `id` makes every retry safe
    /// (G5), and a retry that finds the message stored answers `duplicate: true`. Any other
    /// error code is [`SendError::Rejected`]. Gives up with [`SendError::Timeout`] after the
    /// config's `send_timeout`.
    pub async fn send(
        &self,
        to: &str,
        id: &str,
        body: impl Into<Bytes>,
    ) -> Result<Sent, SendError> {
        let frame = encode_send(self.inner.codec, id, to, body.into())?;
        let id: Arc<str> = Arc::from(id);
        let retrying = async {
            let mut unavailable = 0u32;
            loop {
                let error = match self.attempt(&id, frame.clone()).await {
                    Ok(sent) => return Ok(sent),
                    Err(error) => error,
                };
                let wait = match &error {
                    SendError::Rejected {
                        code: ErrorCode::Unavailable,
                        ..
                    } => {
                        unavailable = unavailable.saturating_add(1);
                        self.inner.backoff.delay(unavailable - 1)
                    }
                    SendError::Rejected {
                        code: ErrorCode::RateLimited,
                        retry_after_ms,
                        ..
                    } => match retry_after_ms {
                        Some(ms) => rate_limit_delay(Duration::from_millis(*ms)),
                        None => self.inner.backoff.delay(0),
                    },
                    // Resubmitted at once: the driver holds it until the next welcome.
                    SendError::Disconnected { close_code }
                        if self.inner.reconnect && *close_code != Some(1009) =>
                    {
                        Duration::ZERO
                    }
                    _ => return Err(error),
                };
                tracing::debug!(id = %id, %error, ?wait, "send retried");
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
        };
        self.with_timeout(retrying).await
    }

    /// One attempt at a `send`, without retries: the answer as the server gave it, so tests can
    /// see `unavailable` and `rate_limited` (with `retry_after_ms`) as
    /// [`SendError::Rejected`]. Sent when the connection is up (held while reconnecting); a
    /// connection that drops before the answer gives [`SendError::Disconnected`].
    pub async fn send_once(
        &self,
        to: &str,
        id: &str,
        body: impl Into<Bytes>,
    ) -> Result<Sent, SendError> {
        let frame = encode_send(self.inner.codec, id, to, body.into())?;
        self.with_timeout(self.attempt(&Arc::from(id), frame)).await
    }

    async fn attempt(
        &self,
        id: &Arc<str>,
        frame: tokio_tungstenite::tungstenite::Message,
    ) -> Result<Sent, SendError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Send {
            id: Arc::clone(id),
            frame,
            reply,
        };
        self.inner
            .commands
            .send(command)
            .await
            .map_err(|_| SendError::Stopped)?;
        answer.await.unwrap_or(Err(SendError::Stopped))
    }

    async fn with_timeout(
        &self,
        send: impl Future<Output = Result<Sent, SendError>>,
    ) -> Result<Sent, SendError> {
        match self.inner.send_timeout {
            Some(limit) => tokio::time::timeout(limit, send)
                .await
                .unwrap_or(Err(SendError::Timeout)),
            None => send.await,
        }
    }

    /// Sends the cumulative `ack` for everything delivered so far now, instead of at the end of
    /// the `ack_interval`. Returns once it is written (or at once if there is nothing to
    /// acknowledge, or no connection: the next `hello` acknowledges instead).
    pub async fn ack_now(&self) -> Result<(), ClientError> {
        let (reply, done) = oneshot::channel();
        self.inner
            .commands
            .send(Command::AckNow { reply })
            .await
            .map_err(|_| ClientError::Stopped)?;
        done.await.map_err(|_| ClientError::Stopped)
    }

    /// Sends an application `ping` and returns the time until its `pong`.
    /// [`ClientError::NotConnected`] while reconnecting; no timeout of its own.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let (reply, pong) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Ping { reply })
            .await
            .map_err(|_| ClientError::Stopped)?;
        pong.await.unwrap_or(Err(ClientError::Stopped))
    }

    /// The resume point: the highest seq handed to the application as an event, and its
    /// epoch. Give both to a later [`ClientConfig`] to resume where this client stopped.
    pub fn position(&self) -> (u64, Option<String>) {
        let position = self.inner.shared.position();
        (position.last_seq, position.epoch.clone())
    }

    /// The user the token authenticated (from the first `welcome`).
    pub fn user(&self) -> &str {
        &self.inner.user
    }

    /// The device the server took this client for (from the first `welcome`): the config's
    /// `device`, or `default`. `None` from servers before devices.
    pub fn device(&self) -> Option<&str> {
        self.inner.device.as_deref()
    }

    /// Whether the client has stopped (closed, or gave up reconnecting).
    pub fn is_stopped(&self) -> bool {
        self.inner.commands.is_closed()
    }

    /// Acknowledges what was delivered, closes with 1000 and stops the client (for every
    /// clone). Sends still waiting get an error; events already queued can still be received.
    pub async fn close(self) {
        let (reply, done) = oneshot::channel();
        if self
            .inner
            .commands
            .send(Command::Close { reply })
            .await
            .is_ok()
        {
            let _ = done.await;
        }
    }
}
