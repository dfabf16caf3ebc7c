//! The frames of `PROTOCOL.md`, as serde types shared by the gateway and the client.
//!
//! Ids in frames are plain strings: a well-formed frame with a bad id is answered `invalid`, not
//! `bad_frame`, so validation (`UserId::parse`, `MessageId::parse`) happens after decoding.

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A message body: MessagePack `bin` on the wire (a `str` is accepted on input); a string in
/// JSON. A non-UTF-8 body cannot be written as a JSON string; the JSON codec sends `body_b64`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Body(pub Bytes);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Body({} bytes)", self.0.len())
    }
}

impl From<&str> for Body {
    fn from(s: &str) -> Self {
        Body(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Self {
        Body(Bytes::from(v))
    }
}

impl Serialize for Body {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            match std::str::from_utf8(&self.0) {
                Ok(text) => s.serialize_str(text),
                Err(_) => Err(serde::ser::Error::custom(
                    "a non-UTF-8 body cannot be a JSON string",
                )),
            }
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Body;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes or a string")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Body, E> {
                Ok(Body(Bytes::copy_from_slice(v)))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Body, E> {
                Ok(Body(Bytes::from(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Body, E> {
                Ok(Body(Bytes::copy_from_slice(v.as_bytes())))
            }
            fn visit_string<E>(self, v: String) -> Result<Body, E> {
                Ok(Body(Bytes::from(v.into_bytes())))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Body, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Body(Bytes::from(out)))
            }
        }
        d.deserialize_any(V)
    }
}

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// First frame: authenticate and set the resume point.
    Hello {
        /// Absent when the token was given at the upgrade (header or query parameter).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        #[serde(default)]
        last_seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<String>,
        /// Which of the user's devices this connection is (its own acknowledged position);
        /// absent: the `default` device.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
    },
    /// Store `body` in `to`'s inbox and deliver it.
    Send { id: String, to: String, body: Body },
    /// Cumulative acknowledgement up to `seq`.
    Ack { seq: u64 },
    /// Application keepalive.
    Ping,
    /// A fresh token for the session (after `welcome`), before the current one expires; it must
    /// name the same user.
    Auth { token: String },
}

/// Error codes of `PROTOCOL.md`, each with its fixed meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthorized,
    BadFrame,
    Invalid,
    TooLarge,
    RateLimited,
    InboxFull,
    Unavailable,
    Internal,
    /// The recipient may not be sent to under the node's recipient policy (`--recipients`).
    Forbidden,
    /// The session's token expired (and no fresh one came in an `auth` frame): close 1008
    /// follows.
    TokenExpired,
    /// A code this version does not know (a newer server); clients treat it as `internal`.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::Invalid => "invalid",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::InboxFull => "inbox_full",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unknown => "unknown",
        }
    }
}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome {
        user: String,
        node: String,
        epoch: String,
        head: u64,
        reset: bool,
        heartbeat_ms: u64,
        /// When the session's token expires (its `exp`, unix seconds): send `auth` with a fresh
        /// one before then. Absent from servers before token lifetimes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
        /// The device this session is (`default` when `hello` named none). Absent from servers
        /// before devices.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
        /// Delivery starts after this seq: the client's `last_seq`, or the device's position
        /// kept by the server when that is further (0 after `reset`). Absent from servers before
        /// devices.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume: Option<u64>,
    },
    Msg {
        seq: u64,
        from: String,
        id: String,
        ts: u64,
        body: Body,
    },
    Sent {
        id: String,
        to: String,
        seq: u64,
        duplicate: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    Reconnect {
        after_ms: u64,
    },
    Pong,
    /// The token of an `auth` frame was taken: the session now expires at `expires_at`.
    Authed {
        expires_at: u64,
    },
    /// The messages `from..=to` of this epoch are gone from the inbox before this device
    /// acknowledged them (the device stopped holding the inbox: silent past `device_ttl`, or the
    /// inbox was at `max_inbox`) and will never be delivered. The client's position moves to
    /// `to`.
    Gap {
        from: u64,
        to: u64,
    },
}

impl ServerFrame {
    /// The frame's `type`, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerFrame::Welcome { .. } => "welcome",
            ServerFrame::Msg { .. } => "msg",
            ServerFrame::Sent { .. } => "sent",
            ServerFrame::Error { .. } => "error",
            ServerFrame::Reconnect { .. } => "reconnect",
            ServerFrame::Pong => "pong",
            ServerFrame::Authed { .. } => "authed",
            ServerFrame::Gap { .. } => "gap",
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
            id: None,
            retry_after_ms: None,
        }
    }
}

impl ClientFrame {
    /// The frame's `type`, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Hello { .. } => "hello",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Ping => "ping",
            ClientFrame::Auth { .. } => "auth",
        }
    }
}
