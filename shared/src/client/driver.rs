//! The background task that owns a client's socket: it reads frames, drops duplicates, hands
//! events to the application, answers waiting sends, sends coalesced acks, watches for a silent
//! server, and reconnects and resumes when the connection ends.
//!
//! One task per client and one `select!` loop; no allocation per message beyond decoding.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use super::config::ClientConfig;
use super::delivery::{Delivery, Shared};
use super::error::{ClientError, SendError};
use super::events::{Delivered, Event, Welcome};
use super::sends::{Reply, Sends};
use super::state::{Acks, Backoff, Cursor};
use super::transport::{Ws, close_parts, open_session, to_message, to_wire};
use crate::frame::{ClientFrame, ErrorCode, ServerFrame};

/// Commands handled in one go before the writes are flushed.
const COMMAND_BATCH: usize = 64;
/// How long a client-side close waits for the server's close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a [`Client`](super::Client) handle asks of its driver.
pub(crate) enum Command {
    /// Write an encoded `send`; answer `reply` when its `sent` or `error` arrives.
    Send {
        id: Arc<str>,
        frame: Message,
        reply: Reply,
    },
    /// Acknowledge everything delivered, now.
    AckNow { reply: oneshot::Sender<()> },
    /// Send an app-level `ping`; answer with the round trip time when `pong` arrives.
    Ping {
        reply: oneshot::Sender<Result<Duration, ClientError>>,
    },
    /// Close with 1000 and stop.
    Close { reply: oneshot::Sender<()> },
}

type Handshake = Pin<Box<dyn Future<Output = Result<(Ws, Welcome), ClientError>> + Send>>;

/// The connection's state.
enum Conn {
    Open(Box<Open>),
    /// Reconnect at this instant.
    Waiting(Instant),
    /// Upgrade, `hello`, `welcome` in progress.
    Connecting(Handshake),
    /// No connection and none coming.
    Stopped,
}

/// An open connection.
struct Open {
    ws: Ws,
    /// Which connection this is (from 1), so acks never cross connections.
    conn: u64,
    /// Silence after which the server is presumed gone (2.5 heartbeats).
    idle_limit: Option<Duration>,
    /// When anything last arrived.
    last_rx: Instant,
    /// When to look at `last_rx` next.
    idle_check: Option<Instant>,
    /// The server is draining: reconnect no earlier than this.
    drain_at: Option<Instant>,
    /// With a token source: when to fetch a fresh token and send it in `auth`.
    refresh_at: Option<Instant>,
}

enum ConnEvent {
    Read(Option<Result<Message, tungstenite::Error>>),
    RetryDue,
    Handshake(Box<Result<(Ws, Welcome), ClientError>>),
}

/// What the loop does next.
enum Flow {
    Continue,
    /// Stop after handing over what is queued (reconnecting is off, or refused for good).
    Stop,
    /// Close with 1000, then stop; answer the `Close` command if there was one.
    Close(Option<oneshot::Sender<()>>),
}

pub(crate) struct Driver {
    config: Arc<ClientConfig>,
    commands: mpsc::Receiver<Command>,
    delivery: Delivery,
    sends: Sends,
    pings: std::collections::VecDeque<(Instant, oneshot::Sender<Result<Duration, ClientError>>)>,
    conn: Conn,
    /// The latest connection's number.
    conn_seq: u64,
    /// The duplicate filter: what was received (the resume point is what was delivered).
    cursor: Cursor,
    /// The epoch the last `hello` named, for `Event::Reset`.
    hello_epoch: Option<String>,
    backoff: Backoff,
    /// Failed connection attempts in a row.
    attempt: u32,
    /// The last connection's close code, for sends it leaves unanswered.
    last_close: Option<u16>,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    /// A token being fetched from the token source, to send in `auth`.
    refreshing: Option<BoxFuture<'static, Result<String, String>>>,
    /// New sends are held until then: the server answered `rate_limited`, and its
    /// `retry_after_ms` applies to the client's sending, not only to the refused send.
    hold_until: Option<Instant>,
}

impl Driver {
    /// A driver for a connection that just got its first `welcome`.
    pub(crate) fn new(
        config: Arc<ClientConfig>,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        ws: Ws,
        welcome: Welcome,
    ) -> Self {
        let delivery = Delivery::new(events, shared, Acks::new(config.ack_interval));
        let mut driver = Driver {
            cursor: Cursor::new(delivery.position()),
            hello_epoch: delivery.position().epoch.clone(),
            backoff: Backoff {
                min: config.backoff_min,
                max: config.backoff_max,
            },
            config,
            commands,
            delivery,
            sends: Sends::default(),
            pings: Default::default(),
            conn: Conn::Stopped,
            conn_seq: 0,
            attempt: 0,
            last_close: None,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            timer_at: None,
            refreshing: None,
            hold_until: None,
        };
        driver.opened(ws, welcome);
        driver
    }

    /// Runs until the client is closed, every handle is dropped, or the connection ends for
    /// good.
    pub(crate) async fn run(mut self) {
        let flow = loop {
            self.arm_timer();
            let can_read = !self.delivery.backed_up();
            let flow = tokio::select! {
                () = self.delivery.room(), if self.delivery.has_queued() => {
                    self.delivery.drain();
                    Flow::Continue
                }
                command = self.commands.recv() => self.on_commands(command).await,
                event = next_conn_event(&mut self.conn, can_read) => {
                    self.on_conn_event(event).await
                }
                () = &mut self.timer, if self.timer_at.is_some() => {
                    self.timer_at = None;
                    self.on_timer().await
                }
                token = async { self.refreshing.as_mut().expect("guarded").await },
                    if self.refreshing.is_some() =>
                {
                    self.refreshing = None;
                    self.on_fresh_token(token).await
                }
            };
            match flow {
                Flow::Continue => {}
                other => break other,
            }
        };
        let reply = match flow {
            Flow::Close(reply) => {
                self.close_connection().await;
                reply
            }
            _ => None,
        };
        self.finish(reply).await;
    }

    fn push(&mut self, event: Event) {
        self.delivery.push(event, self.conn_seq);
    }

    // ---- connection lifecycle ----

    /// Adopts a connection that got its `welcome`.
    fn opened(&mut self, ws: Ws, welcome: Welcome) {
        self.conn_seq += 1;
        self.attempt = 0;
        let now = Instant::now();
        let idle_limit = (welcome.heartbeat_ms > 0).then(|| {
            let heartbeat = Duration::from_millis(welcome.heartbeat_ms);
            heartbeat * 2 + heartbeat / 2
        });
        self.conn = Conn::Open(Box::new(Open {
            ws,
            conn: self.conn_seq,
            idle_limit,
            last_rx: now,
            idle_check: idle_limit.map(|limit| now + limit),
            drain_at: None,
            refresh_at: self.refresh_time(welcome.expires_at),
        }));
        self.refreshing = None;
        tracing::debug!(
            node = %welcome.node, device = welcome.device.as_deref(), epoch = %welcome.epoch,
            head = welcome.head, reset = welcome.reset, resumed_from = welcome.resumed_from,
            "welcome"
        );
        self.cursor
            .on_welcome(&welcome.epoch, welcome.reset, welcome.resumed_from);
        let reset = welcome.reset.then(|| Event::Reset {
            previous_epoch: self.hello_epoch.take(),
            epoch: welcome.epoch.clone(),
        });
        self.push(Event::Welcome(welcome));
        if let Some(reset) = reset {
            self.push(reset);
        }
    }

    async fn on_conn_event(&mut self, event: ConnEvent) -> Flow {
        match event {
            ConnEvent::Read(item) => self.on_read(item).await,
            ConnEvent::RetryDue => {
                let resume = self.delivery.position().clone();
                self.hello_epoch = resume.epoch.clone();
                let config = Arc::clone(&self.config);
                self.conn =
                    Conn::Connecting(Box::pin(
                        async move { open_session(&config, &resume).await },
                    ));
                Flow::Continue
            }
            ConnEvent::Handshake(result) => match *result {
                Ok((ws, welcome)) => {
                    self.opened(ws, welcome);
                    self.write_held().await
                }
                Err(error) => self.connect_failed(error),
            },
        }
    }

    /// A reconnect attempt failed: try again after a backoff, unless retrying cannot help.
    fn connect_failed(&mut self, error: ClientError) -> Flow {
        let will_retry = !error.is_permanent();
        tracing::info!(%error, will_retry, "reconnect failed");
        self.push(Event::ConnectFailed { error, will_retry });
        if !will_retry {
            return Flow::Stop;
        }
        self.conn = Conn::Waiting(Instant::now() + self.next_backoff());
        Flow::Continue
    }

    fn next_backoff(&mut self) -> Duration {
        let delay = self.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// The connection ended: written sends get `Disconnected` (their callers retry with the
    /// same id), held ones wait for the next connection, and a reconnect is scheduled (after
    /// the drain delay if the server asked for one).
    async fn disconnected(&mut self, close_code: Option<u16>, reason: String) -> Flow {
        let drain_at = match std::mem::replace(&mut self.conn, Conn::Stopped) {
            Conn::Open(open) => open.drain_at,
            _ => None,
        };
        tracing::debug!(?close_code, %reason, "disconnected");
        self.last_close = close_code;
        self.sends.connection_lost(close_code);
        for (_, reply) in self.pings.drain(..) {
            let _ = reply.send(Err(ClientError::NotConnected));
        }
        self.push(Event::Disconnected { close_code, reason });
        if !self.config.reconnect {
            return Flow::Stop;
        }
        let now = Instant::now();
        let at = match drain_at {
            Some(at) => at.max(now),
            None => now + self.next_backoff(),
        };
        self.conn = Conn::Waiting(at);
        Flow::Continue
    }

    /// Client-side close: a last ack, close 1000, and a short wait for the server's close
    /// (answers to sends that arrive meanwhile still reach their callers).
    async fn close_connection(&mut self) {
        if let Conn::Open(open) = &mut self.conn {
            if let Some(seq) = self.delivery.take_ack(open.conn)
                && let Some(ack) = encode(&self.config, &ClientFrame::Ack { seq })
            {
                let _ = open.ws.feed(ack).await;
            }
            let frame = CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            };
            let (ws, sends, codec) = (&mut open.ws, &mut self.sends, self.config.codec);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                if ws.close(Some(frame)).await.is_err() {
                    return;
                }
                while let Some(Ok(message)) = ws.next().await {
                    if let Some(Ok(frame)) = to_wire(message).map(|w| codec.decode_server(&w)) {
                        sends.answer(frame);
                    }
                }
            })
            .await;
        }
        self.conn = Conn::Stopped;
        self.last_close = Some(1000);
        self.push(Event::Disconnected {
            close_code: Some(1000),
            reason: "closed by client".to_owned(),
        });
    }

    /// Answers everyone still waiting, then hands the application what is queued.
    async fn finish(mut self, close_reply: Option<oneshot::Sender<()>>) {
        self.conn = Conn::Stopped;
        self.commands.close();
        self.sends.stop(self.last_close);
        for (_, reply) in self.pings.drain(..) {
            let _ = reply.send(Err(ClientError::Stopped));
        }
        while let Ok(command) = self.commands.try_recv() {
            refuse(command);
        }
        if let Some(reply) = close_reply {
            let _ = reply.send(());
        }
        self.delivery.flush().await;
        tracing::debug!("client stopped");
    }

    // ---- reading ----

    async fn on_read(&mut self, item: Option<Result<Message, tungstenite::Error>>) -> Flow {
        let Conn::Open(open) = &mut self.conn else {
            return Flow::Continue;
        };
        let message = match item {
            Some(Ok(message)) => message,
            Some(Err(tungstenite::Error::ConnectionClosed)) | None => {
                return self
                    .disconnected(None, "connection closed".to_owned())
                    .await;
            }
            Some(Err(e)) => return self.disconnected(None, e.to_string()).await,
        };
        open.last_rx = Instant::now();
        if let Message::Close(frame) = message {
            // tungstenite queued the close reply; flush it before letting the socket go.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, open.ws.flush()).await;
            let (code, reason) = close_parts(frame);
            return self.disconnected(code, reason).await;
        }
        let Some(wire) = to_wire(message) else {
            return Flow::Continue; // ping / pong: tungstenite answers pings itself
        };
        match self.config.codec.decode_server(&wire) {
            Ok(frame) => {
                let moves_position =
                    matches!(frame, ServerFrame::Msg { .. } | ServerFrame::Gap { .. });
                self.on_frame(frame);
                // An ack interval of zero acknowledges every message (and gap) as it is handed
                // over (MQTT-style), not on the next timer tick.
                if moves_position
                    && self.config.ack_interval.is_zero()
                    && let Err(e) = self.ack().await
                {
                    return self.disconnected(None, e.to_string()).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable frame from the server");
                self.push(Event::Error(
                    ErrorCode::BadFrame,
                    format!("undecodable frame from the server: {e}"),
                ));
            }
        }
        Flow::Continue
    }

    fn on_frame(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Msg {
                seq,
                from,
                id,
                ts,
                body,
            } => {
                if self.cursor.accept(seq) {
                    let body = body.0;
                    self.push(Event::Message(Delivered {
                        seq,
                        from,
                        id,
                        ts,
                        body,
                    }));
                } else {
                    tracing::trace!(seq, "duplicate dropped");
                }
            }
            ServerFrame::Gap { from, to } => self.on_gap(from, to),
            ServerFrame::Sent { .. } | ServerFrame::Error { .. } => {
                if let ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    retry_after_ms: Some(wait),
                    ..
                } = &frame
                    && self.config.hold_sends_on_rate_limited
                {
                    let until = Instant::now() + Duration::from_millis(*wait);
                    self.hold_until = Some(self.hold_until.map_or(until, |at| at.max(until)));
                }
                match self.sends.answer(frame) {
                    None => {}
                    // Not tied to a send, or to one nobody waits for any more.
                    Some(ServerFrame::Error { code, message, .. }) => {
                        self.push(Event::Error(code, message));
                    }
                    Some(_) => tracing::debug!("sent for no waiting send"),
                }
            }
            ServerFrame::Reconnect { after_ms } => {
                if let Conn::Open(open) = &mut self.conn {
                    open.drain_at = Some(Instant::now() + Duration::from_millis(after_ms));
                }
                self.push(Event::Reconnect { after_ms });
            }
            ServerFrame::Pong => {
                if let Some((sent_at, reply)) = self.pings.pop_front() {
                    let _ = reply.send(Ok(sent_at.elapsed()));
                }
            }
            ServerFrame::Welcome { .. } => {
                tracing::warn!("a second welcome on one connection, ignored");
            }
            ServerFrame::Authed { expires_at } => {
                tracing::debug!(expires_at, "fresh token taken");
                let refresh_at = self.refresh_time(Some(expires_at));
                if let Conn::Open(open) = &mut self.conn {
                    open.refresh_at = refresh_at;
                }
            }
        }
    }

    /// A `gap`: the part of it the application was not told of yet reaches it as
    /// `Event::Gap`, and counts as received (a `msg` in it would be a duplicate).
    fn on_gap(&mut self, from: u64, to: u64) {
        if from > to {
            tracing::warn!(from, to, "a gap that names no seqs, ignored");
            return;
        }
        match self.cursor.skip(from, to) {
            Some((from, to)) => {
                tracing::debug!(from, to, "gap: messages trimmed unacknowledged");
                self.push(Event::Gap { from, to });
            }
            None => tracing::trace!(from, to, "gap of seqs already reported"),
        }
    }

    // ---- commands and writing ----

    async fn on_commands(&mut self, first: Option<Command>) -> Flow {
        let Some(mut command) = first else {
            return Flow::Close(None); // every handle is gone
        };
        let mut wrote = false;
        let mut handled = 0;
        loop {
            let result = match command {
                Command::Close { reply } => return Flow::Close(Some(reply)),
                Command::Send { id, frame, reply } => {
                    let connected = matches!(self.conn, Conn::Open(_)) && self.hold_until.is_none();
                    match self.sends.begin(id, frame, reply, connected) {
                        Some(frame) => self.feed(frame).await,
                        None => Ok(false),
                    }
                }
                Command::AckNow { reply } => {
                    let result = self.ack().await;
                    let _ = reply.send(());
                    result.map(|()| false)
                }
                Command::Ping { reply } => match &self.conn {
                    Conn::Open(_) => match encode(&self.config, &ClientFrame::Ping) {
                        Some(ping) => {
                            self.pings.push_back((Instant::now(), reply));
                            self.feed(ping).await
                        }
                        None => Ok(false),
                    },
                    _ => {
                        let _ = reply.send(Err(ClientError::NotConnected));
                        Ok(false)
                    }
                },
            };
            match result {
                Ok(w) => wrote |= w,
                Err(e) => return self.disconnected(None, e.to_string()).await,
            }
            // At most a batch before the flush; the next command is taken off the channel only
            // if it is handled in this batch (one taken and dropped would be lost).
            handled += 1;
            if handled == COMMAND_BATCH {
                break;
            }
            match self.commands.try_recv() {
                Ok(next) => command = next,
                Err(_) => break,
            }
        }
        if wrote
            && let Conn::Open(open) = &mut self.conn
            && let Err(e) = open.ws.flush().await
        {
            return self.disconnected(None, e.to_string()).await;
        }
        Flow::Continue
    }

    /// Writes without flushing; `Ok(true)` when something was written.
    async fn feed(&mut self, frame: Message) -> Result<bool, tungstenite::Error> {
        match &mut self.conn {
            Conn::Open(open) => open.ws.feed(frame).await.map(|()| true),
            _ => Ok(false),
        }
    }

    /// Writes the sends held while disconnected, in order.
    async fn write_held(&mut self) -> Flow {
        let Conn::Open(open) = &mut self.conn else {
            return Flow::Continue;
        };
        let mut wrote = false;
        while let Some(frame) = self.sends.next_held() {
            wrote = true;
            if let Err(e) = open.ws.feed(frame).await {
                return self.disconnected(None, e.to_string()).await;
            }
        }
        if wrote && let Err(e) = open.ws.flush().await {
            return self.disconnected(None, e.to_string()).await;
        }
        Flow::Continue
    }

    /// Sends the cumulative ack now, if one is pending and this connection may take it (with no
    /// connection, the next `hello` acknowledges instead).
    async fn ack(&mut self) -> Result<(), tungstenite::Error> {
        let Conn::Open(open) = &mut self.conn else {
            return Ok(());
        };
        if let Some(seq) = self.delivery.take_ack(open.conn)
            && let Some(ack) = encode(&self.config, &ClientFrame::Ack { seq })
        {
            tracing::trace!(seq, "ack");
            open.ws.send(ack).await?;
        }
        Ok(())
    }

    // ---- timers ----

    /// Points the one timer at the earliest of the ack deadline, the idle check and the end of
    /// a hold on sends.
    fn arm_timer(&mut self) {
        let next = match &self.conn {
            Conn::Open(open) => [
                self.delivery.ack_due_at(),
                open.idle_check,
                self.hold_until,
                open.refresh_at.filter(|_| self.refreshing.is_none()),
            ]
            .into_iter()
            .flatten()
            .min(),
            _ => None,
        };
        if next != self.timer_at {
            if let Some(at) = next {
                self.timer.as_mut().reset(at);
            }
            self.timer_at = next;
        }
    }

    async fn on_timer(&mut self) -> Flow {
        let now = Instant::now();
        let Conn::Open(open) = &mut self.conn else {
            return Flow::Continue;
        };
        if let (Some(limit), Some(check)) = (open.idle_limit, open.idle_check)
            && now >= check
        {
            if self.delivery.backed_up() {
                // Not reading (the application is behind), so silence proves nothing.
                open.last_rx = now;
            } else if now.duration_since(open.last_rx) >= limit {
                let reason = format!("nothing from the server for {} ms", limit.as_millis());
                return self.disconnected(None, reason).await;
            }
            open.idle_check = Some(open.last_rx + limit);
        }
        if self.delivery.ack_due_at().is_some_and(|at| at <= now)
            && let Err(e) = self.ack().await
        {
            return self.disconnected(None, e.to_string()).await;
        }
        if self.refreshing.is_none()
            && let Conn::Open(open) = &mut self.conn
            && open.refresh_at.is_some_and(|at| at <= now)
            && let Some(source) = &self.config.token_source
        {
            open.refresh_at = None;
            self.refreshing = Some(source());
        }
        if self.hold_until.is_some_and(|at| at <= now) {
            self.hold_until = None;
            return self.write_held().await;
        }
        Flow::Continue
    }

    /// When to fetch the next token for a session whose token expires at `expires_at` (unix
    /// seconds): at 80 % of the time left, and at least a second before it. `None` without a
    /// token source (or an expiry).
    fn refresh_time(&self, expires_at: Option<u64>) -> Option<Instant> {
        self.config.token_source.as_ref()?;
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let left = Duration::from_secs(expires_at?.saturating_sub(unix_now));
        let at = left
            .mul_f64(0.8)
            .min(left.saturating_sub(Duration::from_secs(1)));
        Some(Instant::now() + at)
    }

    /// A token from the token source: sent in `auth`; on failure asked again in a second.
    async fn on_fresh_token(&mut self, token: Result<String, String>) -> Flow {
        let Conn::Open(open) = &mut self.conn else {
            return Flow::Continue;
        };
        match token {
            Ok(token) => {
                if let Some(frame) = encode(&self.config, &ClientFrame::Auth { token })
                    && let Err(e) = open.ws.send(frame).await
                {
                    return self.disconnected(None, e.to_string()).await;
                }
            }
            Err(why) => {
                tracing::warn!(%why, "the token source failed; asking again in a second");
                open.refresh_at = Some(Instant::now() + Duration::from_secs(1));
            }
        }
        Flow::Continue
    }
}

/// Answers a command the stopped client cannot carry out.
fn refuse(command: Command) {
    match command {
        Command::Send { reply, .. } => {
            let _ = reply.send(Err(SendError::Stopped));
        }
        Command::Ping { reply } => {
            let _ = reply.send(Err(ClientError::Stopped));
        }
        Command::AckNow { reply } | Command::Close { reply } => {
            let _ = reply.send(());
        }
    }
}

fn encode(config: &ClientConfig, frame: &ClientFrame) -> Option<Message> {
    match config.codec.encode_client(frame) {
        Ok(wire) => Some(to_message(wire)),
        Err(e) => {
            tracing::error!(error = %e, kind = frame.kind(), "cannot encode frame");
            None
        }
    }
}

/// The next thing that happens to the connection in its current state.
async fn next_conn_event(conn: &mut Conn, can_read: bool) -> ConnEvent {
    match conn {
        Conn::Open(open) if can_read => ConnEvent::Read(open.ws.next().await),
        Conn::Waiting(at) => {
            tokio::time::sleep_until(*at).await;
            ConnEvent::RetryDue
        }
        Conn::Connecting(handshake) => ConnEvent::Handshake(Box::new(handshake.as_mut().await)),
        Conn::Open(_) | Conn::Stopped => std::future::pending().await,
    }
}
