//! The client's errors: `ClientError` for connections, `SendError` for one `send`.

use tokio_tungstenite::tungstenite;

use crate::codec::{DecodeError, EncodeError};
use crate::frame::ErrorCode;

/// Why a connection could not be opened, or failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket error: connect refused, reset, address in use.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A WebSocket protocol error other than a refused upgrade.
    #[error("websocket error: {0}")]
    WebSocket(Box<tungstenite::Error>),
    /// The server answered the upgrade request with an HTTP status other than 101.
    #[error("upgrade refused with HTTP {status}")]
    Handshake {
        /// The HTTP status, e.g. 400 for unknown subprotocols.
        status: u16,
        /// The response body, if any (lossily decoded as UTF-8).
        body: Option<String>,
    },
    /// The server closed the connection before `welcome`.
    #[error("connection closed (code {code:?}): {reason}")]
    Closed {
        /// The WebSocket close code; `None` when the TCP connection ended without a close frame.
        code: Option<u16>,
        /// The close frame's reason text.
        reason: String,
    },
    /// The token source failed (it is asked again at the next attempt).
    #[error("no token: {0}")]
    Token(String),
    /// The server answered `hello` with an `error` frame.
    #[error("server error {}: {message}", .code.as_str())]
    Server {
        /// The protocol error code, e.g. `unauthorized`.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server broke the protocol (an undecodable frame, a frame out of place).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A frame could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The operation did not finish in time (`connect_timeout`, or a `RawConnection` read).
    #[error("timed out")]
    Timeout,
    /// The configuration cannot work (bad URL, zero capacity, inverted backoff).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The client is between connections (reconnecting), so there is nothing to ping.
    #[error("not connected")]
    NotConnected,
    /// The client has stopped: closed, or gave up reconnecting.
    #[error("client stopped")]
    Stopped,
}

impl From<tungstenite::Error> for ClientError {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Http(response) => ClientError::Handshake {
                status: response.status().as_u16(),
                body: response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned()),
            },
            tungstenite::Error::Io(e) => ClientError::Io(e),
            e => ClientError::WebSocket(Box::new(e)),
        }
    }
}

impl From<DecodeError> for ClientError {
    fn from(e: DecodeError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

impl ClientError {
    /// Whether reconnecting cannot help: the token is refused or a frame was bad (the server
    /// says so with an `error` before it closes), the upgrade is refused for a reason other than
    /// load, or the config is bad. A bare close, even 1008, is not: before `welcome` it is the
    /// server's `hello` timeout, which a server too busy to read the `hello` in time also sends
    /// (a reconnect storm), so the client tries again after its backoff.
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::Server { code, .. } => {
                matches!(code, ErrorCode::Unauthorized | ErrorCode::BadFrame)
            }
            ClientError::Handshake { status, .. } => {
                (400..500).contains(status) && *status != 408 && *status != 429
            }
            ClientError::Config(_) | ClientError::Encode(_) | ClientError::Stopped => true,
            _ => false,
        }
    }
}

/// Why a `send` did not get `sent`.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The server answered `error` for this id. [`Client::send`](super::Client::send) returns
    /// this for codes it does not retry (`invalid`, `too_large`, `inbox_full`, `internal`, ...);
    /// [`Client::send_once`](super::Client::send_once) for every code.
    #[error("send rejected: {}: {message}", .code.as_str())]
    Rejected {
        /// The protocol error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
        /// For `rate_limited`: when the server will take another send.
        retry_after_ms: Option<u64>,
    },
    /// The connection dropped before an answer: the message may or may not be stored.
    /// Retrying with the same id is safe (G5). `send` returns this only when reconnecting is
    /// off, or when the server closed with 1009 (a message too big for it, which a retry would
    /// repeat).
    #[error("disconnected before an answer (close code {close_code:?}); outcome unknown")]
    Disconnected {
        /// The close code of the connection that dropped, if it sent one.
        close_code: Option<u16>,
    },
    /// `send_timeout` elapsed; the outcome is unknown and retrying with the same id is safe.
    #[error("no answer within the send timeout; outcome unknown")]
    Timeout,
    /// Another send with this id is still waiting for its answer on this client.
    #[error("a send with this id is already in flight")]
    IdInFlight,
    /// The body cannot be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The client stopped (closed, or gave up reconnecting) before an answer. Nothing was
    /// written unless `send` was retrying after a disconnect, in which case the outcome is
    /// unknown and another client may retry with the same id.
    #[error("client stopped")]
    Stopped,
}

impl SendError {
    /// The protocol error code, for a rejection.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            SendError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_errors_are_the_ones_a_retry_cannot_fix() {
        let server = |code| ClientError::Server {
            code,
            message: String::new(),
        };
        let http = |status| ClientError::Handshake { status, body: None };
        let closed = |code| ClientError::Closed {
            code: Some(code),
            reason: String::new(),
        };
        assert!(server(ErrorCode::Unauthorized).is_permanent());
        assert!(!server(ErrorCode::Unavailable).is_permanent());
        assert!(http(400).is_permanent() && http(401).is_permanent());
        assert!(!http(429).is_permanent() && !http(503).is_permanent());
        assert!(!closed(1008).is_permanent(), "a hello timeout is retried");
        assert!(!closed(1013).is_permanent() && !closed(1012).is_permanent());
        assert!(!ClientError::Timeout.is_permanent());
        assert!(!ClientError::Io(std::io::ErrorKind::ConnectionRefused.into()).is_permanent());
    }

    #[test]
    fn messages_name_the_protocol_code() {
        let e = SendError::Rejected {
            code: ErrorCode::InboxFull,
            message: "full".into(),
            retry_after_ms: None,
        };
        assert_eq!(e.to_string(), "send rejected: inbox_full: full");
        assert_eq!(e.code(), Some(ErrorCode::InboxFull));
        let c = ClientError::Server {
            code: ErrorCode::Unauthorized,
            message: "expired".into(),
        };
        assert_eq!(c.to_string(), "server error unauthorized: expired");
    }
}
