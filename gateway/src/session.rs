//! One WebSocket connection after the upgrade: the hello phase, then the loop that takes frames
//! from the client, live messages from the hub and timer ticks, and keeps the rule that makes
//! delivery correct: the inbox is the truth, a live message is only a hint.
//!
//! `delivered` is the highest seq written to this client. A live message at `delivered + 1` goes
//! out at once; one at or below is dropped; one further ahead, a pub/sub resync, a slow socket or
//! the periodic position check starts a catch-up, which reads the inbox after `delivered`, a page
//! at a time, while the outbound queue has room. While catching up, live messages are ignored:
//! each was stored before it reached us, so the next page read includes it.
//!
//! The session's `Position` (epoch, `delivered`, and `stamp`: a store time by which everything
//! up to `delivered` had been stored) is checked by the store before every read and trim. When
//! the store lost the inbox or went back in time under it, those come back `Void` and the
//! session sends the client away (`reconnect`, close 1012): its resume then gets `reset`. A live
//! message of another epoch starts a catch-up (whose read checks the position), and one at or
//! below `delivered` stored after `stamp` is a reused seq: the session ends the epoch itself.
//! An entry that cannot be decoded is stepped over; the read moved it out of the inbox. A read
//! that found everything after `delivered` also vouches for the inbox's head it checked: the
//! seqs up to it that are gone are stepped over (`step_over_to_head`).
//!
//! A session leaves with `reconnect` when the node drains (1012) or when the store watchdog
//! declares an outage (1013): a node that cannot reach the store can neither store nor deliver.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use ferry_router::{
    CatchUpReason, Checked, EngineError, InboxMessage, Live, LiveSignal, Membership, NewMessage,
    Page, Position, Stored,
};
use ferry_shared::{
    Body, ClientFrame, Codec, DeviceId, ErrorCode, MessageId, ServerFrame, UserId, Wire,
};
use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::auth::{AuthAt, SendTo};
use crate::close;
use crate::config::Recipients;
use crate::hello::{self, Opened};
use crate::limits::TokenBucket;
use crate::metrics;
use crate::node::Node;
use crate::outbound::{Frame, Item, Outbound, Path, WriteFailed, now_ms};
use crate::sends::{Refused, Sends};
use crate::users::Slot;

/// How long a closing session waits for its close frame to be written and answered.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Pause before retrying a catch-up read that failed (the store is down or slow).
const CATCHUP_RETRY: Duration = Duration::from_millis(250);
/// Sends of one connection in flight at most; beyond it the session stops reading the socket
/// until the oldest is answered (TCP pushes back on the client).
const SENDS_IN_FLIGHT: usize = 64;
/// Pings, acks and `auth`s a client may send per second, and at once: far above what any client needs
/// (the JS client pings every 20 s and acks every 250 ms), far below a flood.
const CONTROL_RATE: f64 = 20.0;
const CONTROL_BURST: f64 = 100.0;
/// The most of a decoder's error message a `bad_frame` carries: it may quote the client's input.
const BAD_FRAME_ECHO: usize = 160;
/// A session starts at most one trim per this interval: acks coalesce, so a client that acks
/// every message costs the store what one that acks every quarter second does. The last ack is
/// applied at once when the session ends.
const TRIM_EVERY: Duration = Duration::from_millis(250);

/// What arrived from the client.
pub enum Incoming {
    Frame(ClientFrame),
    /// Ping, pong or a raw frame: activity, nothing to do.
    Control,
    /// Undecodable, or the wrong message kind for the subprotocol.
    Bad(String),
    /// Over `max_frame_bytes`.
    TooBig,
    /// Closed or broken.
    Gone,
}

/// Sorts one item of the WebSocket stream.
pub fn classify(next: Option<Result<Message, WsError>>, codec: Codec) -> Incoming {
    let wire = match next {
        Some(Ok(Message::Binary(data))) => Wire::Binary(data),
        Some(Ok(Message::Text(text))) => Wire::Text(text.as_str().to_owned()),
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
            return Incoming::Control;
        }
        Some(Ok(Message::Close(_))) | None => return Incoming::Gone,
        Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {
            return Incoming::TooBig;
        }
        Some(Err(e)) => {
            tracing::debug!(error = %e, "websocket read failed");
            return Incoming::Gone;
        }
    };
    match codec.decode_client(&wire) {
        Ok(frame) => Incoming::Frame(frame),
        Err(e) => Incoming::Bad(truncated(e.to_string(), BAD_FRAME_ECHO)),
    }
}

/// `text` cut to at most `max` bytes (at a character boundary), marked with `…` when cut.
pub fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub('…'.len_utf8());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Encodes a server frame for the queue.
pub fn encode(codec: Codec, frame: &ServerFrame, delivery: Option<(Path, u64)>) -> Item {
    let message = match codec.encode_server(frame) {
        Ok(Wire::Binary(data)) => Message::Binary(data),
        Ok(Wire::Text(text)) => Message::Text(text.into()),
        Err(e) => {
            // Only a bug can get here (every server frame encodes); tell the client, not silence.
            tracing::error!(error = %e, kind = frame.kind(), "cannot encode a server frame");
            let fallback = ServerFrame::error(ErrorCode::Internal, "frame encoding failed");
            return encode(codec, &fallback, None);
        }
    };
    Item::Frame(Frame {
        message,
        kind: frame.kind(),
        delivery,
    })
}

/// The `msg` frame of `msg` for `codec`.
fn msg_message(codec: Codec, msg: &InboxMessage) -> Message {
    let frame = ServerFrame::Msg {
        seq: msg.seq,
        from: msg.from.to_string(),
        id: msg.id.to_string(),
        ts: msg.ts,
        body: Body(msg.body.clone()),
    };
    match encode(codec, &frame, None) {
        Item::Frame(frame) => frame.message,
        // `encode` makes a frame of every server frame.
        Item::Ping | Item::Close(..) => Message::Binary(Bytes::new()),
    }
}

/// The `msg` frame of a live message for `codec`: encoded once, by the first of the user's
/// sessions on the node, then shared (the bytes are reference-counted).
fn shared_msg(codec: Codec, msg: &InboxMessage, frames: &[OnceLock<Bytes>; 2]) -> Message {
    let slot = match codec {
        Codec::MsgPack => &frames[0],
        Codec::Json => &frames[1],
    };
    let bytes = slot.get_or_init(|| match msg_message(codec, msg) {
        Message::Text(text) => Bytes::from(text),
        message => message.into_data(),
    });
    match codec {
        Codec::MsgPack => Message::Binary(bytes.clone()),
        // Made from a `String` above, so it is UTF-8.
        Codec::Json => Utf8Bytes::try_from(bytes.clone())
            .map(Message::Text)
            .unwrap_or_else(|_| msg_message(codec, msg)),
    }
}

/// Runs a connection from just after the upgrade to its close.
pub async fn run<St>(
    mut stream: St,
    out: Outbound,
    node: Arc<Node>,
    codec: Codec,
    token: Option<String>,
    anonymous: Option<OwnedSemaphorePermit>,
) where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    // Boxed: the hello phase (frames, the token, the inbox opening, the welcome) would otherwise
    // size every session's task for its whole life.
    let Some((mut session, span)) =
        Box::pin(open(&mut stream, out, node, codec, token, anonymous)).await
    else {
        return;
    };
    let lifetime = async {
        let reason = session.run(&mut stream).await;
        metrics::SESSION_CLOSES
            .with_label_values(&[reason.label])
            .inc();
        tracing::debug!(reason = reason.label, "session ends");
        if let Some(code) = reason.close {
            session.out.close(code, reason.label, CLOSE_GRACE).await;
            drain_reads(&mut stream).await;
        }
        session.finish().await;
    };
    tracing::Instrument::instrument(lifetime, span).await;
}

/// The hello phase: a session that said a good `hello` and was answered `welcome` (and `gap`),
/// with its tracing span; `None` when it was refused (and closed).
async fn open<St>(
    stream: &mut St,
    mut out: Outbound,
    node: Arc<Node>,
    codec: Codec,
    token: Option<String>,
    anonymous: Option<OwnedSemaphorePermit>,
) -> Option<(Session, tracing::Span)>
where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let hello = hello::hello(stream, &node, codec, token).await;
    // Authenticated (or refused): no longer in the budget of anonymous connections.
    drop(anonymous);
    let opened = match hello {
        Ok(opened) => opened,
        Err(refusal) => {
            metrics::HELLOS.with_label_values(&[refusal.outcome]).inc();
            if let Some((code, message)) = refusal.error {
                out.push(encode(codec, &ServerFrame::error(code, message), None));
            }
            out.close(refusal.close, refusal.reason, CLOSE_GRACE).await;
            drain_reads(stream).await;
            return None;
        }
    };
    let span = tracing::info_span!("session", user = %opened.user);
    out.push(encode(codec, &opened.welcome, None));
    if let Some(gap) = &opened.gap {
        out.push(encode(codec, gap, None));
    }
    Some((Session::new(node, codec, out, opened), span))
}

/// After a close frame went out, read (and drop) until the client answers or a grace period
/// passes, so the TCP connection is not reset under frames the client still had in flight.
async fn drain_reads<St>(stream: &mut St)
where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

/// Why the loop ended, and the close code to send (none when the socket is already gone).
struct End {
    label: &'static str,
    close: Option<u16>,
}

impl End {
    fn closing(label: &'static str, code: u16) -> Self {
        Self {
            label,
            close: Some(code),
        }
    }
}

struct Session {
    node: Arc<Node>,
    codec: Codec,
    out: Outbound,
    user: UserId,
    /// The device this connection is: its acks move that device's position.
    device: DeviceId,
    membership: Membership,
    /// When the session's token stops being good (its `exp` plus the leeway); an `auth` frame
    /// with a fresh token moves it.
    token_expiry: Instant,
    /// Whom the token lets the user send to (read under `--recipients token`); an `auth` frame
    /// with a fresh token replaces it.
    send_to: SendTo,
    epoch: String,
    /// Highest seq written to the client (the resume point at first).
    delivered: u64,
    /// A store time by which every seq up to `delivered` had been stored (see the module docs).
    stamp: u64,
    /// Set while a catch-up is due: why it started (for metrics).
    catching_up: Option<&'static str>,
    /// Don't read for catch-up before this (after a failed read).
    catchup_retry_at: Option<Instant>,
    /// In the `ferry_sessions_lagging` gauge.
    lagging: bool,
    /// Pings and acks: a client may send them at `CONTROL_RATE`; beyond, it is not read for a
    /// while.
    controls: TokenBucket,
    /// The user's connection slot on this node, given back when the session ends.
    _slot: Slot,
    /// Sends issued to the store and not answered yet, oldest first.
    sends: Sends,
    /// The client is not read before this: it retried a refused send too early.
    paused_until: Option<Instant>,
    /// The last send admission control refused, and until when its client was told to wait.
    refused: Option<(Box<str>, Instant)>,
    /// Highest seq the client acknowledged (clamped to `delivered`).
    ack_wanted: u64,
    /// The highest seq this session stepped over without its stamp (0 if none): the end of a
    /// `gap` it announced, or a head below which a complete catch-up read found nothing more
    /// (see `catch_up_page`). A late live copy of such a seq is no sign of a reused seq.
    stepped_over_to: u64,
    /// Highest seq trimmed from the inbox by this session.
    ack_done: u64,
    /// The one trim in flight, if any, and the seq it trims up to.
    trim: Option<Trim>,
    /// When the next trim may start (`TRIM_EVERY` after the last one started).
    next_trim_at: Instant,
    last_activity: Instant,
}

impl Session {
    fn new(node: Arc<Node>, codec: Codec, out: Outbound, opened: Opened) -> Self {
        let controls = TokenBucket::new(CONTROL_RATE, CONTROL_BURST);
        let mut session = Self {
            codec,
            out,
            user: opened.user,
            device: opened.device,
            membership: opened.membership,
            token_expiry: Instant::now() + opened.token.remaining(),
            send_to: opened.token.send_to,
            epoch: opened.epoch,
            delivered: opened.resume,
            stamp: opened.stamp,
            catching_up: None,
            catchup_retry_at: None,
            lagging: false,
            controls,
            _slot: opened.slot,
            sends: Sends::default(),
            paused_until: None,
            refused: None,
            ack_wanted: 0,
            ack_done: 0,
            stepped_over_to: 0,
            trim: None,
            next_trim_at: Instant::now(),
            last_activity: Instant::now(),
            node,
        };
        // Giving last_seq acknowledges everything up to it (what the client said, not where the
        // store's position or a gap made delivery start: a client that did not get the `gap`
        // hears of it again).
        session.on_ack(opened.acked);
        session.start_catch_up("resume");
        session
    }

    async fn run<St>(&mut self, stream: &mut St) -> End
    where
        St: Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let node = self.node.clone();
        let drain_turn = node.drain_turn();
        tokio::pin!(drain_turn);
        let store_outage = node.next_store_outage();
        tokio::pin!(store_outage);
        let mut heartbeat = tokio::time::interval_at(
            Instant::now() + node.config.heartbeat,
            node.config.heartbeat,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let position_check = tokio::time::sleep(Node::jittered(node.config.position_check));
        tokio::pin!(position_check);
        let token_expiry = tokio::time::sleep_until(self.token_expiry);
        tokio::pin!(token_expiry);

        loop {
            let trim_due = self.trim_due();
            if token_expiry.deadline() != self.token_expiry {
                token_expiry.as_mut().reset(self.token_expiry);
            }
            tokio::select! {
                () = &mut token_expiry => {
                    let error = ServerFrame::error(
                        ErrorCode::TokenExpired,
                        "the session's token expired; reconnect with a fresh one, or send `auth` \
                         before it expires",
                    );
                    self.reply(error);
                    return End::closing("token_expired", close::POLICY);
                }
                () = &mut drain_turn => {
                    return Box::pin(self.leave("drain", close::SERVICE_RESTART)).await;
                }
                // This node cannot store or deliver: move the client to one that can.
                () = &mut store_outage => {
                    return Box::pin(self.leave("store_outage", close::TRY_AGAIN_LATER)).await;
                }
                written = self.out.write(), if self.out.has_pending() => {
                    if let Err(failed) = written {
                        let label = match failed {
                            WriteFailed::Stalled => "write_timeout",
                            WriteFailed::Closed | WriteFailed::Broken => "client",
                        };
                        return End { label, close: None };
                    }
                }
                () = wait_until(self.paused_until), if self.paused_until.is_some() => {
                    self.paused_until = None;
                    // Not reading was the node's choice: the client's pongs wait in the socket.
                    self.last_activity = Instant::now();
                }
                // The client is read while its answers have room, its sends are few enough and
                // admission control has not paused it.
                next = stream.next(),
                    if self.sends.len() < SENDS_IN_FLIGHT
                        && self.out.takes_answers()
                        && self.paused_until.is_none() =>
                {
                    self.last_activity = Instant::now();
                    match classify(next, self.codec) {
                        // Handlers are boxed: their state exists while they run, not for the
                        // whole life of every (mostly idle) connection.
                        Incoming::Frame(frame) => {
                            if let Some(end) = Box::pin(self.on_frame(frame)).await {
                                return end;
                            }
                        }
                        Incoming::Control => {}
                        Incoming::Bad(message) => {
                            self.reply(ServerFrame::error(ErrorCode::BadFrame, message));
                            return End::closing("protocol", close::POLICY);
                        }
                        Incoming::TooBig => {
                            let error = ServerFrame::error(
                                ErrorCode::TooLarge,
                                "message over max_frame_bytes",
                            );
                            self.reply(error);
                            return End::closing("protocol", close::TOO_BIG);
                        }
                        Incoming::Gone => return End { label: "client", close: None },
                    }
                }
                signal = self.membership.next() => {
                    if let Some(end) = Box::pin(self.on_live(signal)).await {
                        return end;
                    }
                }
                slot = wait_catch_up(&node, self.catchup_retry_at),
                    if self.catching_up.is_some() && self.out.has_room() =>
                {
                    if let Some(end) = Box::pin(self.catch_up_page(slot)).await {
                        return end;
                    }
                }
                answer = self.sends.next_answer(), if self.out.takes_answers() => self.reply(answer),
                step = trim_step(&mut self.trim, trim_due) => match step {
                    TrimStep::Due => self.start_trim(),
                    TrimStep::Done(upto, done) => {
                        if let Some(end) = Box::pin(self.on_trimmed(upto, done)).await {
                            return end;
                        }
                    }
                },
                _ = heartbeat.tick() => {
                    if self.paused_until.is_none()
                        && self.last_activity.elapsed() > node.config.heartbeat * 2
                    {
                        return End::closing("heartbeat", close::NORMAL);
                    }
                    self.out.push(Item::Ping);
                }
                () = &mut position_check => {
                    if let Some(end) = Box::pin(self.check_position()).await {
                        return end;
                    }
                    let next = Instant::now() + Node::jittered(node.config.position_check);
                    position_check.as_mut().reset(next);
                }
            }
        }
    }

    /// Handles one client frame; `Some` ends the session.
    async fn on_frame(&mut self, frame: ClientFrame) -> Option<End> {
        metrics::FRAMES_IN.with_label_values(&[frame.kind()]).inc();
        match frame {
            ClientFrame::Send { id, to, body } => self.on_send(id, to, body),
            ClientFrame::Ack { seq } => {
                self.on_ack(seq);
                self.throttle_controls();
            }
            ClientFrame::Ping => {
                self.reply(ServerFrame::Pong);
                self.throttle_controls();
            }
            ClientFrame::Auth { token } => {
                // A token check is a signature check: paced like pings and acks.
                self.throttle_controls();
                return self.on_auth(&token);
            }
            ClientFrame::Hello { .. } => {
                let error = ServerFrame::error(ErrorCode::BadFrame, "hello was already said");
                self.reply(error);
                return Some(End::closing("protocol", close::POLICY));
            }
        }
        None
    }

    /// Counts a ping, an ack or an `auth`; past their rate the client is not read until a token is there.
    fn throttle_controls(&mut self) {
        if let Err(wait_ms) = self.controls.take() {
            self.pause_for(wait_ms);
        }
    }

    /// A fresh token: the session now lasts as long as it does. One that does not verify is
    /// refused and changes nothing (the current token still holds); one naming another user ends
    /// the session.
    fn on_auth(&mut self, token: &str) -> Option<End> {
        match self.node.auth.verify_with_expiry(token) {
            Ok(fresh) if fresh.user == self.user => {
                self.token_expiry = Instant::now() + fresh.remaining();
                self.reply(ServerFrame::Authed {
                    expires_at: fresh.expires_at,
                });
                self.send_to = fresh.send_to;
                None
            }
            Ok(other) => {
                tracing::info!(user = %self.user, other = %other.user, "auth for another user");
                let error =
                    ServerFrame::error(ErrorCode::Unauthorized, "the token names another user");
                self.reply(error);
                Some(End::closing("unauthorized", close::POLICY))
            }
            Err(e) => {
                e.record(AuthAt::Auth);
                tracing::info!(user = %self.user, error = %e, reason = e.reason(), "auth refused");
                self.reply(ServerFrame::error(
                    ErrorCode::Unauthorized,
                    e.client_message(),
                ));
                None
            }
        }
    }

    /// Queues an answer (the loop writes it; while the queue is full, nothing more is read from
    /// the client).
    fn reply(&mut self, frame: ServerFrame) {
        self.out.push(encode(self.codec, &frame, None));
    }

    /// Checks a `send` and issues it to the store; its answer goes out in its turn.
    fn on_send(&mut self, id: String, to: String, body: Body) {
        match self.check_send(&id, &to, body) {
            Ok(msg) => {
                let append = self.node.engine.append(&msg);
                self.sends.issued(id, to, append);
            }
            Err(refused) => self.sends.refused(id, refused),
        }
    }

    /// Stops reading the client for `wait_ms`, when a rate refused its send: the frames it sent
    /// meanwhile wait in the socket until a token is there, so a client cannot make the node
    /// decode and refuse sends faster than the rate it is allowed.
    fn pause_for(&mut self, wait_ms: u64) {
        let until = Instant::now() + Duration::from_millis(wait_ms);
        self.paused_until = Some(self.paused_until.map_or(until, |paused| paused.max(until)));
    }

    /// The message a `send` asks to store, or why it is refused.
    fn check_send(&mut self, id: &str, to: &str, body: Body) -> Result<NewMessage, Refused> {
        let invalid = |m: String| Refused::new(ErrorCode::Invalid, m);
        if let Err(retry_ms) = self.node.users.take_send(&self.user) {
            self.pause_for(retry_ms);
            return Err(Refused {
                retry_after_ms: Some(retry_ms),
                ..Refused::new(ErrorCode::RateLimited, "send rate exceeded")
            });
        }
        let now = Instant::now();
        let early_retry = match &self.refused {
            Some((refused_id, until)) if **refused_id == *id && now < *until => Some(*until),
            _ => None,
        };
        let behind = |retry_ms: u64| Refused {
            retry_after_ms: Some(retry_ms),
            ..Refused::new(
                ErrorCode::RateLimited,
                "the node is behind on delivery; retry with the same id",
            )
        };
        if let Some(until) = early_retry {
            // The client retries before it was told to: it is not read again until then, so
            // a client that ignores `retry_after_ms` cannot make the node answer a storm.
            self.paused_until = Some(until);
            let wait = until.saturating_duration_since(now).as_millis().max(1);
            return Err(behind(u64::try_from(wait).unwrap_or(u64::MAX)));
        }
        match self.node.admission.admit() {
            Ok(()) => self.refused = None,
            Err(retry_ms) => {
                // Refused at once (the answer is cheap), so the sends the node does accept are
                // delivered promptly rather than queued behind the excess: a client that is
                // not read, or that holds its sends, makes every later message wait.
                let until = now + Duration::from_millis(retry_ms);
                self.refused = Some((id.into(), until));
                return Err(behind(retry_ms));
            }
        }
        let message_id = MessageId::parse(id).map_err(|e| invalid(e.to_string()))?;
        let recipient = UserId::parse(to).map_err(|e| invalid(format!("to: {e}")))?;
        if self.node.config.recipients == Recipients::Token && !self.send_to.allows(&recipient) {
            let message = format!("{to} is not among the users this token may send to");
            return Err(Refused::new(ErrorCode::Forbidden, message));
        }
        if body.0.is_empty() {
            return Err(invalid("empty body".into()));
        }
        let max = self.node.config.max_body_bytes;
        if body.0.len() > max {
            let message = format!("body of {} bytes is over {max}", body.0.len());
            return Err(Refused::new(ErrorCode::TooLarge, message));
        }
        if let Err(retry_ms) = self.node.users.take_bytes(&self.user, body.0.len()) {
            self.pause_for(retry_ms);
            return Err(Refused {
                retry_after_ms: Some(retry_ms),
                ..Refused::new(ErrorCode::RateLimited, "bytes stored per second exceeded")
            });
        }
        Ok(NewMessage {
            from: self.user.clone(),
            to: recipient,
            id: message_id,
            ts: now_ms(),
            body: body.0,
            checks: self.node.config.sender_checks(),
        })
    }

    /// The position the store checks reads and trims against.
    fn position(&self) -> Position<'_> {
        Position {
            epoch: &self.epoch,
            delivered: self.delivered,
            stamp: self.stamp,
            device: &self.device,
        }
    }

    /// A cumulative ack, clamped to what this connection delivered (G6). The trim follows when
    /// `trim_due` says so: at most one in flight and one per `TRIM_EVERY`, the highest seq wins.
    fn on_ack(&mut self, seq: u64) {
        self.ack_wanted = self.ack_wanted.max(seq.min(self.delivered));
    }

    /// When a trim should start: none is in flight, an ack is not applied yet, and the interval
    /// has passed (`None`: nothing to do).
    fn trim_due(&self) -> Option<Instant> {
        (self.trim.is_none() && self.ack_wanted > self.ack_done).then_some(self.next_trim_at)
    }

    fn start_trim(&mut self) {
        let upto = self.ack_wanted;
        let trim = self.node.engine.trim(&self.user, &self.position(), upto);
        self.trim = Some((upto, trim));
        self.next_trim_at = Instant::now() + TRIM_EVERY;
    }

    async fn on_trimmed(
        &mut self,
        upto: u64,
        done: Result<Checked<()>, EngineError>,
    ) -> Option<End> {
        match done {
            Ok(Checked::Valid(())) => {
                self.ack_done = self.ack_done.max(upto);
                None
            }
            Ok(Checked::Void) => Some(self.position_void().await),
            // The messages stay in the inbox; the client's next ack (or resume) trims them.
            Err(e) => {
                tracing::warn!(error = %e, "trim failed");
                None
            }
        }
    }

    async fn on_live(&mut self, signal: LiveSignal) -> Option<End> {
        let live = match signal {
            LiveSignal::Message(live) => live,
            LiveSignal::CatchUp(CatchUpReason::Lagged) => {
                self.lag();
                return None;
            }
            LiveSignal::CatchUp(CatchUpReason::Resync) => {
                self.start_catch_up("resync");
                return None;
            }
        };
        let Live {
            epoch,
            entry,
            frames,
        } = &*live;
        let msg = match entry {
            Stored::Message(msg) if epoch.as_str() == self.epoch => msg,
            // Another incarnation's message: the catch-up's read checks the position (the
            // inbox's epoch changed, or this is a stale one from before the session's).
            Stored::Message(_) => {
                self.start_catch_up("epoch");
                return None;
            }
            // Stepped over by the catch-up, which reads it from the inbox.
            Stored::Undecodable { .. } => {
                self.start_catch_up("undecodable");
                return None;
            }
        };
        if msg.seq <= self.delivered {
            // Seqs up to a session's gap, or to a head a read vouched for, were stepped over
            // without their stamps: a late live copy of one is no sign of a reused seq.
            if msg.stamp > self.stamp && msg.seq > self.stepped_over_to {
                // Stored after everything this connection delivered, yet at or below it: the
                // store went back in time and reuses seqs. End the epoch for every connection.
                return Some(self.seq_reused().await);
            }
            return None;
        }
        if self.catching_up.is_some() {
            return None;
        }
        if msg.seq > self.delivered + 1 {
            self.start_catch_up("gap");
            return None;
        }
        if !self.out.has_room() {
            self.lag();
            return None;
        }
        self.deliver(msg, Path::Live, Some(frames));
        None
    }

    /// Queues `msg` (live: with the encodings `frames` shared by the user's sessions).
    fn deliver(&mut self, msg: &InboxMessage, path: Path, frames: Option<&[OnceLock<Bytes>; 2]>) {
        if path == Path::Live {
            self.node
                .admission
                .delivered(now_ms().saturating_sub(msg.ts));
        }
        let message = match frames {
            Some(frames) => shared_msg(self.codec, msg, frames),
            None => msg_message(self.codec, msg),
        };
        let item = Item::Frame(Frame {
            message,
            kind: "msg",
            delivery: Some((path, msg.ts)),
        });
        match self.out.try_push(item) {
            Ok(()) => self.step_to(msg.seq, msg.stamp),
            Err(_) => self.lag(),
        }
    }

    /// `seq` is delivered (or stepped over), stored at `stamp`.
    fn step_to(&mut self, seq: u64, stamp: u64) {
        self.delivered = seq;
        self.stamp = self.stamp.max(stamp);
    }

    fn lag(&mut self) {
        if !self.lagging {
            self.lagging = true;
            metrics::LAGGING.inc();
        }
        self.start_catch_up("lagged");
    }

    fn start_catch_up(&mut self, reason: &'static str) {
        self.catching_up.get_or_insert(reason);
    }

    /// Reads one page after `delivered` into the queue's free slots; `Some` ends the session
    /// (the position is void).
    /// `_slot` is one of the node's `--max-catchup-reads`, held until the page is read.
    async fn catch_up_page(&mut self, _slot: Option<OwnedSemaphorePermit>) -> Option<End> {
        let reason = self.catching_up?;
        let page = self
            .node
            .config
            .catchup_page
            .min(self.out.free_slots())
            .max(1);
        metrics::CATCHUPS.with_label_values(&[reason]).inc();
        let read =
            self.node
                .engine
                .read_after(&self.user, &self.position(), page, self.out.free_bytes());
        match read.await {
            Ok(Checked::Valid(Page {
                entries,
                cut,
                floor,
                device_acked,
                head,
            })) => {
                self.catchup_retry_at = None;
                // Trimmed before this device acknowledged them (it stopped holding the inbox):
                // the client is told, never left to skip them in silence. What lies between
                // `delivered` and the device's position was acknowledged by another connection
                // of this device.
                let held = self.delivered.max(device_acked);
                if floor > held {
                    metrics::GAPS.with_label_values(&["session"]).inc();
                    self.reply(ServerFrame::Gap {
                        from: held + 1,
                        to: floor,
                    });
                    self.delivered = floor;
                    self.stepped_over_to = floor;
                }
                // Acknowledged by another connection of this device, and still stored for the
                // user's other devices: stepped over, never delivered again to this device (G4).
                let acknowledged = device_acked;
                let mut complete = entries.len() < page && !cut;
                for entry in &entries {
                    if entry.seq() <= self.delivered {
                        continue;
                    }
                    if entry.seq() <= acknowledged {
                        self.step_to(entry.seq(), entry.stamp());
                        continue;
                    }
                    // The byte bound holds for catch-up too; the rest is read again later.
                    if !self.out.has_room() {
                        complete = false;
                        break;
                    }
                    match entry {
                        Stored::Message(msg) => self.deliver(msg, Path::CatchUp, None),
                        // Logged, counted and moved out of the inbox by the read.
                        Stored::Undecodable { seq, stamp } => self.step_to(*seq, *stamp),
                    }
                }
                // Found everything after `delivered` and took it: what is left up to the head
                // this read checked is gone.
                if complete && entries.last().is_none_or(|e| e.seq() <= self.delivered) {
                    self.step_over_to_head(head);
                }
                if complete {
                    self.catching_up = None;
                    if self.lagging {
                        self.lagging = false;
                        metrics::LAGGING.dec();
                    }
                }
                None
            }
            Ok(Checked::Void) => Some(self.position_void().await),
            Err(e) => {
                tracing::warn!(error = %e, "catch-up read failed; will retry");
                self.catchup_retry_at = Some(Instant::now() + CATCHUP_RETRY);
                None
            }
        }
    }

    /// After a complete read (not cut by the byte bound, fewer entries than asked, every entry
    /// taken): moves `delivered` up to the `head` that read checked. Without it, a session whose
    /// missing seqs are gone (this device acknowledged them on another connection, and the trim
    /// took them) reads nothing at every position check, since the head stays above
    /// `delivered`: the empty reads that made `FerryCatchUpStorm` fire (issue 14).
    ///
    /// Nothing that exists is skipped (G2, G3). The read ran in one atomic step with the head it
    /// returns, and a seq is allocated and stored in one step (the append), so every seq after
    /// the read's last entry up to `head` had been stored and was gone again when it ran. Gone
    /// by a trim, or to make room in a full inbox: then it is at or below `floor`, and the read
    /// either told the client of it (the `gap` above) or it is at or below `device_acked`,
    /// acknowledged by this device on another connection, which G3 lets a connection skip. Or
    /// moved out as undecodable by another session's read, which this read would have stepped
    /// over too. (A store that evicts keys loses messages outright; `ferry_store_may_evict`
    /// warns of it.)
    fn step_over_to_head(&mut self, head: u64) {
        if head > self.delivered {
            self.delivered = head;
            // Their stamps are unknown, so `stamp` stays: the store's check finds no member
            // above the old `delivered` to compare with it, and a late live copy of one is told
            // apart by `stepped_over_to`.
            self.stepped_over_to = head;
        }
    }

    /// The periodic position check against the inbox's head: a catch-up if something stored was
    /// not delivered (a lost live notification), a reconnect if the position is void.
    async fn check_position(&mut self) -> Option<End> {
        let check = self
            .node
            .engine
            .check_position(&self.user, &self.position());
        match check.await {
            Ok(Checked::Valid(head)) => {
                if head > self.delivered {
                    self.start_catch_up("position");
                }
                None
            }
            Ok(Checked::Void) => Some(self.position_void().await),
            Err(e) => {
                tracing::debug!(error = %e, "position check failed");
                None
            }
        }
    }

    /// A live message showed a reused seq: ends the epoch (if nobody did yet), then sends the
    /// client away like any void position.
    async fn seq_reused(&mut self) -> End {
        // Leaving anyway on an error: the store checks of the other sessions still find it.
        let end = self.node.engine.end_epoch(&self.user, &self.epoch);
        if let Err(e) = end.await {
            tracing::warn!(error = %e, "ending the reused epoch failed");
        }
        self.position_void().await
    }

    /// The inbox's epoch changed under the session (its data was lost, or it went back in time
    /// and was ended): the client reconnects at once and learns `reset` at its next `hello`.
    async fn position_void(&mut self) -> End {
        tracing::warn!("the inbox's epoch changed under the session; asking for a reconnect");
        self.reply(ServerFrame::Reconnect { after_ms: 0 });
        End::closing("epoch_changed", close::SERVICE_RESTART)
    }

    /// Asks the client to reconnect (to any node) within a second, spread so that a node's
    /// clients do not all arrive at once, then closes with `code`.
    async fn leave(&mut self, label: &'static str, code: u16) -> End {
        // The sends in flight are answered first (each bounded by the store timeout), so a
        // draining node loses no `sent`.
        while !self.sends.is_empty() {
            let answer = self.sends.next_answer().await;
            self.reply(answer);
        }
        let after_ms = rand::random_range(0..=1000);
        self.reply(ServerFrame::Reconnect { after_ms });
        End::closing(label, code)
    }

    /// Finishes the acknowledgements (the trim in flight, then the client's last ack if it came
    /// while that trim ran; each bounded by the store timeout) and leaves the lag gauge right.
    async fn finish(&mut self) {
        let timeout = self.node.config.store_timeout;
        if let Some((upto, trim)) = self.trim.take()
            && let Ok(Ok(Checked::Valid(()))) = tokio::time::timeout(timeout, trim).await
        {
            self.ack_done = self.ack_done.max(upto);
        }
        if self.ack_wanted > self.ack_done {
            let trim = self
                .node
                .engine
                .trim(&self.user, &self.position(), self.ack_wanted);
            match tokio::time::timeout(timeout, trim).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "last trim failed; the next hello acknowledges it")
                }
                Err(_) => tracing::warn!("last trim timed out; the next hello acknowledges it"),
            }
        }
        if self.lagging {
            metrics::LAGGING.dec();
        }
    }
}

/// Resolves when a due catch-up page may be read: after the pause that follows a failed read,
/// with one of the node's catch-up slots (`None` only if the node's semaphore was closed).
async fn wait_catch_up(node: &Node, retry_at: Option<Instant>) -> Option<OwnedSemaphorePermit> {
    if let Some(at) = retry_at {
        tokio::time::sleep_until(at).await;
    }
    if let Ok(slot) = node.catchups.clone().try_acquire_owned() {
        return Some(slot);
    }
    // Counted while waiting, also when the wait is cancelled (another branch of the loop won).
    struct Waiting;
    impl Drop for Waiting {
        fn drop(&mut self) {
            metrics::CATCHUP_WAITING.dec();
        }
    }
    metrics::CATCHUP_WAITING.inc();
    let _waiting = Waiting;
    node.catchups.clone().acquire_owned().await.ok()
}

/// A trim in flight: the seq it trims up to, and its answer.
type Trim = (u64, BoxFuture<'static, Result<Checked<()>, EngineError>>);

/// Resolves at `at` (never without one).
async fn wait_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the trim branch of the session's loop resolved with.
enum TrimStep {
    /// A trim should start now.
    Due,
    /// The trim up to this seq finished.
    Done(u64, Result<Checked<()>, EngineError>),
}

/// Resolves when the trim in flight finishes, or when the next one is due (`due`, from
/// `Session::trim_due`).
async fn trim_step(trim: &mut Option<Trim>, due: Option<Instant>) -> TrimStep {
    if let Some((upto, running)) = trim.as_mut() {
        let upto = *upto;
        let done = running.await;
        *trim = None;
        return TrimStep::Done(upto, done);
    }
    match due {
        Some(at) => {
            tokio::time::sleep_until(at).await;
            TrimStep::Due
        }
        None => std::future::pending().await,
    }
}
