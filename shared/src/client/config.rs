//! What a client connects to and how it behaves when things go wrong.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use crate::client::error::ClientError;
use crate::codec::Codec;
use crate::ids::DeviceId;

/// Fetches a fresh token (for example from the application's backend); `Err` says why not.
pub type TokenSource = std::sync::Arc<
    dyn Fn() -> futures_util::future::BoxFuture<'static, Result<String, String>> + Send + Sync,
>;

/// Where the token travels (`PROTOCOL.md`, Authentication).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TokenPlacement {
    /// In the `hello` frame, as browsers must.
    #[default]
    Hello,
    /// As `Authorization: Bearer <token>` on the upgrade request; `hello` omits it.
    Header,
    /// As the `token` query parameter of the upgrade URL; `hello` omits it.
    Query,
}

/// How to connect, resume, acknowledge and reconnect. Build one with [`ClientConfig::new`] and
/// change the fields that matter:
///
/// ```
/// use std::time::Duration;
/// use ferry_shared::client::ClientConfig;
/// use ferry_shared::Codec;
///
/// let config = ClientConfig {
///     codec: Codec::Json,
///     ack_interval: Duration::from_millis(50),
///     ..ClientConfig::new("ws://127.0.0.1:8080/v1/ws", "eyJ...")
/// };
/// assert!(config.reconnect);
/// ```
#[derive(Clone)]
pub struct ClientConfig {
    /// The gateway's WebSocket endpoint, `ws://host:port/v1/ws` (TLS is not supported).
    pub url: String,
    /// The JWT that authenticates this client; sent where `token_in` says. Unused when
    /// `token_source` is set.
    pub token: String,
    /// Where fresh tokens come from: called before every (re)connect, and before the session's
    /// token expires (the client then sends it in an `auth` frame), so a session outlives any
    /// one token. `None`: `token` for every connect, and the session ends when it expires
    /// (`token_expired`).
    pub token_source: Option<TokenSource>,
    /// The subprotocol to ask for: MessagePack (default) or JSON.
    pub codec: Codec,
    /// Resume point of the first `hello`: everything up to here is already processed.
    pub last_seq: u64,
    /// The inbox incarnation `last_seq` belongs to (`None` for a client with no history).
    pub epoch: Option<String>,
    /// Which of the user's devices this client is, sent in every `hello` (1 to 64 bytes of
    /// `A-Z a-z 0-9 . _ - :`). Each device has its own acknowledged position in the inbox, so
    /// what this client has not acknowledged stays there for it whatever the user's other
    /// devices acknowledge. Keep it stable across restarts, beside `last_seq` and `epoch`.
    /// `None`: the user's `default` device.
    pub device: Option<String>,
    /// Acks are coalesced: one cumulative `ack` at most this long after a delivery (zero acks
    /// every delivery at once).
    pub ack_interval: Duration,
    /// After a `rate_limited` answer, hold every new send for its `retry_after_ms` (the
    /// server is behind; not only the refused send should wait). On by default; a load
    /// generator that drives the server open loop turns it off.
    pub hold_sends_on_rate_limited: bool,
    /// Reconnect and resume after a disconnect or a server drain, instead of stopping.
    pub reconnect: bool,
    /// Shortest wait before a reconnect or a retried `unavailable` send.
    pub backoff_min: Duration,
    /// Longest wait before a reconnect or a retried `unavailable` send.
    pub backoff_max: Duration,
    /// Where the token travels.
    pub token_in: TokenPlacement,
    /// Source address to bind, e.g. one of `127.0.0.x`, so a load generator is not limited by
    /// the ephemeral ports of one address. `None` lets the system choose.
    pub local_addr: Option<IpAddr>,
    /// Limit on TCP connect + upgrade + `hello`/`welcome`, for every (re)connect.
    pub connect_timeout: Duration,
    /// Limit on [`Client::send`](super::Client::send) including its retries (`None`: retry until
    /// answered or the client stops). The outcome of a timed-out send is unknown; retrying with
    /// the same id is safe (G5).
    pub send_timeout: Option<Duration>,
    /// Capacity of the [`Events`](super::Events) channel. While it is full the client stops
    /// reading the socket (backpressure reaches the gateway, which catches up from the inbox).
    pub event_capacity: usize,
}

impl ClientConfig {
    /// A config with the defaults: MessagePack, no resume point, acks coalesced over 250 ms,
    /// reconnect with backoff between 100 ms and 5 s, token in `hello`, 10 s connect timeout,
    /// 30 s send timeout, 256 buffered events.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            token: token.into(),
            token_source: None,
            codec: Codec::MsgPack,
            last_seq: 0,
            epoch: None,
            device: None,
            ack_interval: Duration::from_millis(250),
            hold_sends_on_rate_limited: true,
            reconnect: true,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            token_in: TokenPlacement::Hello,
            local_addr: None,
            connect_timeout: Duration::from_secs(10),
            send_timeout: Some(Duration::from_secs(30)),
            event_capacity: 256,
        }
    }

    /// Checks what can be checked before connecting.
    pub(crate) fn validate(&self) -> Result<(), ClientError> {
        let bad = |why: &str| Err(ClientError::Config(why.to_owned()));
        if !self.url.starts_with("ws://") {
            return bad("url must start with ws:// (wss:// is not supported)");
        }
        if let Some(device) = &self.device
            && let Err(e) = DeviceId::parse(device)
        {
            return bad(&e.to_string());
        }
        if self.event_capacity == 0 {
            return bad("event_capacity must be at least 1");
        }
        if self.backoff_min.is_zero() {
            return bad("backoff_min must be above zero");
        }
        if self.backoff_max < self.backoff_min {
            return bad("backoff_max must be at least backoff_min");
        }
        Ok(())
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("codec", &self.codec)
            .field("last_seq", &self.last_seq)
            .field("epoch", &self.epoch)
            .field("device", &self.device)
            .field("ack_interval", &self.ack_interval)
            .field(
                "hold_sends_on_rate_limited",
                &self.hold_sends_on_rate_limited,
            )
            .field("reconnect", &self.reconnect)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("token_in", &self.token_in)
            .field("local_addr", &self.local_addr)
            .field("connect_timeout", &self.connect_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("event_capacity", &self.event_capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_do_not() {
        let ok = ClientConfig::new("ws://127.0.0.1:1/v1/ws", "t");
        assert!(ok.validate().is_ok());
        assert!(
            !format!("{ok:?}").contains("\"t\""),
            "the token is not logged"
        );
        let phone = ClientConfig {
            device: Some("phone-1:a.b_c".into()),
            ..ok.clone()
        };
        assert!(phone.validate().is_ok());
        let cases = [
            ClientConfig::new("wss://h/v1/ws", "t"),
            ClientConfig::new("http://h/v1/ws", "t"),
            ClientConfig {
                event_capacity: 0,
                ..ok.clone()
            },
            ClientConfig {
                backoff_min: Duration::ZERO,
                ..ok.clone()
            },
            ClientConfig {
                backoff_max: Duration::from_millis(1),
                ..ok.clone()
            },
            ClientConfig {
                device: Some(String::new()),
                ..ok.clone()
            },
            ClientConfig {
                device: Some("my phone".into()),
                ..ok.clone()
            },
        ];
        for bad in cases {
            assert!(
                matches!(bad.validate(), Err(ClientError::Config(_))),
                "{bad:?}"
            );
        }
    }
}
