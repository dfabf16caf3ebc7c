//! The start of a session: wait for `hello` (within the hello timeout), authenticate, join the
//! hub (so live delivery is on before the inbox is read), open the inbox for the connection's
//! device, decide the resume point, and answer `welcome` (and `gap`, when the device comes back
//! to find messages it never acknowledged trimmed).

use std::time::Duration;

use ferry_router::{DeviceSeen, EngineError, Membership};
use ferry_shared::{ClientFrame, Codec, DeviceId, ErrorCode, ServerFrame, UserId};
use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::auth::{AuthAt, AuthError, Verified};
use crate::close;
use crate::metrics;
use crate::node::Node;
use crate::session::{Incoming, classify};
use crate::users::Slot;

/// A session that said a good `hello`.
pub struct Opened {
    pub user: UserId,
    /// The token's expiry: the session ends then unless an `auth` frame brings a fresh token.
    pub token: Verified,
    pub membership: Membership,
    /// One of the user's connection slots on this node, held for the session's life.
    pub slot: Slot,
    pub device: DeviceId,
    pub epoch: String,
    /// Delivery starts after this seq: the client's `last_seq`, the device's position kept by
    /// the store when further, or the floor after a gap.
    pub resume: u64,
    /// What the client acknowledged by its `hello` (its `last_seq`, 0 after `reset`).
    pub acked: u64,
    /// The store time of the opening: everything at or below `resume` was stored by then.
    pub stamp: u64,
    pub welcome: ServerFrame,
    /// The `gap` that follows `welcome`, if the device lost messages.
    pub gap: Option<ServerFrame>,
}

/// Why the session ends before `welcome`: an optional error frame, then a close.
pub struct Refusal {
    pub error: Option<(ErrorCode, String)>,
    pub close: u16,
    pub reason: &'static str,
    /// `ferry_hellos_total` outcome.
    pub outcome: &'static str,
}

impl Refusal {
    fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            error: Some((ErrorCode::Unauthorized, message.into())),
            close: close::POLICY,
            reason: "unauthorized",
            outcome: "unauthorized",
        }
    }

    fn bad_frame(message: impl Into<String>) -> Self {
        Self {
            error: Some((ErrorCode::BadFrame, message.into())),
            close: close::POLICY,
            reason: "bad frame",
            outcome: "bad_frame",
        }
    }

    fn unavailable(e: EngineError) -> Self {
        tracing::warn!(error = %e, "store unavailable at hello");
        Self {
            error: Some((
                ErrorCode::Unavailable,
                "the store is unavailable; retry later".into(),
            )),
            close: close::TRY_AGAIN_LATER,
            reason: "store unavailable",
            outcome: "unavailable",
        }
    }
}

/// Runs the hello phase on `stream`.
pub async fn hello<St>(
    stream: &mut St,
    node: &Node,
    codec: Codec,
    upgrade_token: Option<String>,
) -> Result<Opened, Refusal>
where
    St: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let deadline = Instant::now() + node.config.hello_timeout;
    let frame = loop {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let Ok(next) = next else {
            return Err(Refusal {
                error: None,
                close: close::POLICY,
                reason: "hello timeout",
                outcome: "timeout",
            });
        };
        match classify(next, codec) {
            Incoming::Frame(frame) => break frame,
            Incoming::Control => continue,
            Incoming::Bad(message) => return Err(Refusal::bad_frame(message)),
            Incoming::TooBig => {
                return Err(Refusal {
                    error: Some((ErrorCode::TooLarge, "message over max_frame_bytes".into())),
                    close: close::TOO_BIG,
                    reason: "message too big",
                    outcome: "bad_frame",
                });
            }
            Incoming::Gone => {
                return Err(Refusal {
                    error: None,
                    close: close::NORMAL,
                    reason: "closed before hello",
                    outcome: "timeout",
                });
            }
        }
    };
    metrics::FRAMES_IN.with_label_values(&[frame.kind()]).inc();
    let started = Instant::now();
    let ClientFrame::Hello {
        token,
        last_seq,
        epoch: client_epoch,
        device,
    } = frame
    else {
        return Err(Refusal::unauthorized("hello must be the first frame"));
    };
    let Some(token) = token.or(upgrade_token) else {
        AuthError::Missing.record(AuthAt::Hello);
        return Err(Refusal::unauthorized("no token in hello or at the upgrade"));
    };
    // Why a token failed stays in the log and metrics; the client hears `unauthorized`.
    let token = node.auth.verify_with_expiry(&token).map_err(|e| {
        e.record(AuthAt::Hello);
        tracing::info!(error = %e, reason = e.reason(), "hello refused");
        Refusal::unauthorized(e.client_message())
    })?;
    let user = token.user.clone();
    let device = match device.as_deref().map(DeviceId::parse) {
        None => DeviceId::default_device(),
        Some(Ok(device)) => device,
        Some(Err(e)) => {
            return Err(Refusal {
                error: Some((ErrorCode::Invalid, e.to_string())),
                close: close::POLICY,
                reason: "bad device id",
                outcome: "bad_frame",
            });
        }
    };

    let Some(slot) = node.users.connect(&user) else {
        tracing::info!(%user, "hello refused: too many connections for this user");
        return Err(Refusal {
            error: Some((
                ErrorCode::RateLimited,
                "too many connections for this user on this node".into(),
            )),
            close: close::TRY_AGAIN_LATER,
            reason: "too many connections for this user",
            outcome: "too_many_connections",
        });
    };
    // Live delivery first, then the inbox: a message stored in between is both live and read,
    // and the session drops the copy at or below what it delivered.
    let membership = node.hub.join(&user).await.map_err(Refusal::unavailable)?;
    let claim = client_epoch.as_deref().map(|epoch| (epoch, last_seq));
    let inbox = node
        .engine
        .open_inbox(&user, &device, claim)
        .await
        .map_err(Refusal::unavailable)?;

    // The position is void when it names another incarnation, one this inbox never reached (a
    // client that kept a seq beyond the head; the engine then ended the epoch, so the epochs
    // differ), or no incarnation at all (a `last_seq` without `epoch`): replay from the start
    // rather than skip, and trim nothing on its strength.
    let reset = match client_epoch.as_deref() {
        Some(epoch) => epoch != inbox.epoch,
        None => last_seq > 0,
    };
    let acked = if reset { 0 } else { last_seq };
    let (resume, gap) = resume_point(acked, reset, client_epoch.is_some(), &inbox);
    if gap.is_some() {
        metrics::GAPS.with_label_values(&["resume"]).inc();
    }
    metrics::HELLOS.with_label_values(&["ok"]).inc();
    metrics::HELLO_DURATION.observe(started.elapsed().as_secs_f64());
    tracing::debug!(%user, %device, resume, reset, head = inbox.head, ?gap, "welcome");
    let welcome = ServerFrame::Welcome {
        user: user.to_string(),
        node: node.node_id.clone(),
        epoch: inbox.epoch.clone(),
        head: inbox.head,
        reset,
        heartbeat_ms: duration_ms(node.config.heartbeat),
        expires_at: Some(token.expires_at),
        device: Some(device.to_string()),
        resume: Some(resume),
    };
    Ok(Opened {
        user,
        token,
        membership,
        slot,
        device,
        epoch: inbox.epoch,
        resume,
        acked,
        stamp: inbox.stamp,
        welcome,
        gap: gap.map(|(from, to)| ServerFrame::Gap { from, to }),
    })
}

/// Where delivery starts, and the gap the device must be told of. `acked` is what the client
/// acknowledged (its `last_seq`, 0 after `reset`); `named_epoch` whether it named an epoch.
///
/// The device's position kept by the store counts when it is further (a client that lost its
/// own), after `reset` too when it is of this epoch (the client's epoch was stale, the device's
/// position is not). Everything at or below the floor is trimmed: a device whose position is
/// below it lost what lies between and is told so. A new device whose client names no position
/// in this epoch starts at the floor without a gap, and so does a client after `reset` whose
/// device holds no position of this epoch: it gets the inbox from its start.
fn resume_point(
    acked: u64,
    reset: bool,
    named_epoch: bool,
    inbox: &ferry_router::Opened,
) -> (u64, Option<(u64, u64)>) {
    let kept = match inbox.device {
        DeviceSeen::At(position) => Some(position),
        DeviceSeen::New | DeviceSeen::OtherEpoch => None,
    };
    let resume = acked.max(kept.unwrap_or(0));
    if resume >= inbox.floor {
        return (resume, None);
    }
    let fresh = if reset {
        kept.is_none()
    } else {
        inbox.device == DeviceSeen::New && !named_epoch
    };
    if fresh {
        return (if reset { 0 } else { inbox.floor }, None);
    }
    (inbox.floor, Some((resume + 1, inbox.floor)))
}

pub fn duration_ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}
