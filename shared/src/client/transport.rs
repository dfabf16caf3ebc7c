//! Opening a connection: TCP (optionally from a chosen source address), the WebSocket upgrade
//! with its subprotocol and token, and the `hello` / `welcome` exchange. Also the conversions
//! between tungstenite messages and the codec's `Wire`.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use super::config::{ClientConfig, TokenPlacement};
use super::error::ClientError;
use super::events::Welcome;
use super::state::Position;
use crate::codec::{Codec, EncodeError, Wire};
use crate::frame::{Body, ClientFrame, ServerFrame};

/// One client WebSocket.
pub(crate) type Ws = WebSocketStream<TcpStream>;

/// tungstenite's buffers are sized for many mostly idle connections in one process (its
/// defaults allocate 128 KiB per connection eagerly); larger messages still get through.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

/// Opens a TCP connection (from `local_addr` if given) and upgrades it, offering
/// `subprotocols` and adding `headers`. Returns the socket and the subprotocol the server chose.
pub(crate) async fn dial(
    url: &str,
    local_addr: Option<IpAddr>,
    subprotocols: &[&str],
    headers: &[(&str, &str)],
) -> Result<(Ws, Option<String>), ClientError> {
    let mut request = url.into_client_request()?;
    if request.uri().scheme_str() != Some("ws") {
        return Err(ClientError::Config(format!(
            "{url}: only ws:// URLs are supported"
        )));
    }
    let bad_header = |what: String| ClientError::Config(format!("bad header: {what}"));
    if !subprotocols.is_empty() {
        let offer = HeaderValue::from_str(&subprotocols.join(", "))
            .map_err(|e| bad_header(e.to_string()))?;
        request.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, offer);
    }
    for (name, value) in headers {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad_header(e.to_string()))?;
        let value = HeaderValue::from_str(value).map_err(|e| bad_header(e.to_string()))?;
        request.headers_mut().append(name, value);
    }
    let host = request
        .uri()
        .host()
        .ok_or_else(|| ClientError::Config(format!("{url}: no host")))?;
    let port = request.uri().port_u16().unwrap_or(80);
    let stream = tcp_connect(host, port, local_addr).await?;
    let (ws, response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())).await?;
    let chosen = response
        .headers()
        .get(SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((ws, chosen))
}

/// Connects to the first address of `host` that works, binding `local_addr` first when given.
/// Nagle is off: frames are small and latency matters.
async fn tcp_connect(
    host: &str,
    port: u16,
    local_addr: Option<IpAddr>,
) -> Result<TcpStream, ClientError> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(format!("{host}:{port}")).await? {
        let attempt = async {
            let stream = match local_addr {
                None => TcpStream::connect(addr).await?,
                Some(local) => {
                    let socket = if addr.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    // Lets port-0 binds reuse ports still in TIME_WAIT from earlier runs.
                    socket.set_reuseaddr(true)?;
                    socket.bind(SocketAddr::new(local, 0))?;
                    socket.connect(addr).await?
                }
            };
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        };
        if local_addr.is_some_and(|local| local.is_ipv4() != addr.is_ipv4()) {
            continue;
        }
        match attempt.await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(match last_error {
        Some(e) => ClientError::Io(e),
        None => ClientError::Config(format!("{host} has no address of the local_addr's family")),
    })
}

/// Opens a session: connect, upgrade, `hello` with `resume`, and wait for `welcome`, all within
/// `connect_timeout`. The socket is returned right after `welcome`, before any `msg`.
pub(crate) async fn open_session(
    config: &ClientConfig,
    resume: &Position,
) -> Result<(Ws, Welcome), ClientError> {
    let open = async {
        let token = match &config.token_source {
            Some(source) => Cow::Owned(source().await.map_err(ClientError::Token)?),
            None => Cow::Borrowed(config.token.as_str()),
        };
        let url = match config.token_in {
            TokenPlacement::Query => Cow::Owned(with_query_token(&config.url, &token)),
            _ => Cow::Borrowed(config.url.as_str()),
        };
        let bearer;
        let mut headers = Vec::new();
        if config.token_in == TokenPlacement::Header {
            bearer = format!("Bearer {token}");
            headers.push((AUTHORIZATION.as_str(), bearer.as_str()));
        }
        let subprotocol = config.codec.subprotocol();
        let (mut ws, _) = dial(&url, config.local_addr, &[subprotocol], &headers).await?;
        let hello = ClientFrame::Hello {
            token: (config.token_in == TokenPlacement::Hello).then(|| token.into_owned()),
            last_seq: resume.last_seq,
            epoch: resume.epoch.clone(),
            device: config.device.clone(),
        };
        ws.send(to_message(config.codec.encode_client(&hello)?))
            .await?;
        let welcome = await_welcome(&mut ws, config.codec, resume.last_seq).await?;
        Ok((ws, welcome))
    };
    tokio::time::timeout(config.connect_timeout, open)
        .await
        .unwrap_or(Err(ClientError::Timeout))
}

/// Reads until `welcome`; an `error` or a close before it is the refusal. `last_seq` is what
/// the `hello` gave.
async fn await_welcome(ws: &mut Ws, codec: Codec, last_seq: u64) -> Result<Welcome, ClientError> {
    loop {
        let message = match ws.next().await {
            Some(Ok(message)) => message,
            Some(Err(tungstenite::Error::ConnectionClosed)) | None => {
                return Err(ClientError::Closed {
                    code: None,
                    reason: String::new(),
                });
            }
            Some(Err(e)) => return Err(e.into()),
        };
        let wire = match message {
            Message::Close(frame) => {
                let (code, reason) = close_parts(frame);
                return Err(ClientError::Closed { code, reason });
            }
            other => match to_wire(other) {
                Some(wire) => wire,
                None => continue,
            },
        };
        return match codec.decode_server(&wire)? {
            ServerFrame::Welcome {
                user,
                node,
                epoch,
                head,
                reset,
                heartbeat_ms,
                expires_at,
                device,
                resume,
            } => Ok(Welcome {
                user,
                device,
                node,
                epoch,
                head,
                reset,
                heartbeat_ms,
                resumed_from: resume_point(reset, last_seq, resume),
                expires_at,
            }),
            ServerFrame::Error { code, message, .. } => Err(ClientError::Server { code, message }),
            other => Err(ClientError::Protocol(format!(
                "expected welcome, got {}",
                other.kind()
            ))),
        };
    }
}

/// Where delivery resumes after a `hello` that gave `last_seq`: the server's `resume` (servers
/// before devices give none: `last_seq`, or 0 after a reset), never below `last_seq` unless
/// the position was reset.
fn resume_point(reset: bool, last_seq: u64, resume: Option<u64>) -> u64 {
    let resume = resume.unwrap_or(0);
    if reset { resume } else { resume.max(last_seq) }
}

/// Appends `token=<token>` to a URL's query, percent-encoding anything outside the unreserved
/// set (a JWT needs none).
pub(crate) fn with_query_token(url: &str, token: &str) -> String {
    let (base, fragment) = match url.split_once('#') {
        Some((base, fragment)) => (base, Some(fragment)),
        None => (url, None),
    };
    let separator = if base.contains('?') { '&' } else { '?' };
    let mut out = format!("{base}{separator}token=");
    for b in token.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

/// A codec message as a tungstenite message.
pub(crate) fn to_message(wire: Wire) -> Message {
    match wire {
        Wire::Binary(data) => Message::Binary(data),
        Wire::Text(text) => Message::Text(text.into()),
    }
}

/// A data message as the codec's `Wire`; `None` for control messages.
pub(crate) fn to_wire(message: Message) -> Option<Wire> {
    match message {
        Message::Binary(data) => Some(Wire::Binary(data)),
        Message::Text(text) => Some(Wire::Text(text.as_str().to_owned())),
        _ => None,
    }
}

/// A close frame's code and reason.
pub(crate) fn close_parts(
    frame: Option<tungstenite::protocol::CloseFrame>,
) -> (Option<u16>, String) {
    match frame {
        Some(frame) => (Some(frame.code.into()), frame.reason.as_str().to_owned()),
        None => (None, String::new()),
    }
}

/// Encodes a `send`. A JSON connection cannot carry a non-UTF-8 body as a string, so such a
/// body goes as `body_b64`, the extension the gateway's codec accepts.
pub(crate) fn encode_send(
    codec: Codec,
    id: &str,
    to: &str,
    body: Bytes,
) -> Result<Message, EncodeError> {
    if codec == Codec::Json && std::str::from_utf8(&body).is_err() {
        #[derive(serde::Serialize)]
        struct SendB64<'a> {
            r#type: &'static str,
            id: &'a str,
            to: &'a str,
            body_b64: String,
        }
        let text = serde_json::to_string(&SendB64 {
            r#type: "send",
            id,
            to,
            body_b64: B64.encode(&body),
        })?;
        return Ok(Message::Text(text.into()));
    }
    let frame = ClientFrame::Send {
        id: id.to_owned(),
        to: to.to_owned(),
        body: Body(body),
    };
    Ok(to_message(codec.encode_client(&frame)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_token_is_appended_and_escaped() {
        assert_eq!(
            with_query_token("ws://h:1/v1/ws", "a.b-c_d"),
            "ws://h:1/v1/ws?token=a.b-c_d"
        );
        assert_eq!(
            with_query_token("ws://h/v1/ws?x=1#f", "a b&c"),
            "ws://h/v1/ws?x=1&token=a%20b%26c#f"
        );
    }

    #[test]
    fn sends_encode_in_both_codecs_and_binary_json_bodies_use_b64() {
        let body = Bytes::from_static(&[0xff, 0x00]);
        let json = encode_send(Codec::Json, "m1", "bob", body.clone()).unwrap();
        let Message::Text(text) = &json else {
            panic!("json is text")
        };
        assert_eq!(
            text.as_str(),
            r#"{"type":"send","id":"m1","to":"bob","body_b64":"/wA="}"#
        );
        let decoded = Codec::Json.decode_client(&to_wire(json).unwrap()).unwrap();
        assert_eq!(
            decoded,
            ClientFrame::Send {
                id: "m1".into(),
                to: "bob".into(),
                body: Body(body.clone())
            }
        );
        let mp = encode_send(Codec::MsgPack, "m1", "bob", body.clone()).unwrap();
        assert!(matches!(mp, Message::Binary(_)));
        let frame = Codec::MsgPack.decode_client(&to_wire(mp).unwrap()).unwrap();
        assert!(matches!(frame, ClientFrame::Send { body: b, .. } if b.0 == body));
        let text = encode_send(Codec::Json, "m2", "bob", Bytes::from_static(b"hi")).unwrap();
        assert!(matches!(&text, Message::Text(t) if t.as_str().contains(r#""body":"hi""#)));
    }

    #[test]
    fn the_resume_point_is_the_servers_and_never_below_the_hello() {
        assert_eq!(resume_point(false, 5, None), 5, "a server before devices");
        assert_eq!(resume_point(true, 5, None), 0);
        assert_eq!(
            resume_point(false, 5, Some(9)),
            9,
            "kept further for the device"
        );
        assert_eq!(
            resume_point(false, 5, Some(2)),
            5,
            "hello acknowledged up to 5"
        );
        assert_eq!(resume_point(true, 5, Some(0)), 0);
    }

    #[test]
    fn control_messages_are_not_wire() {
        assert_eq!(to_wire(Message::Ping(Bytes::new())), None);
        assert_eq!(
            to_wire(Message::text("x")),
            Some(Wire::Text("x".to_owned()))
        );
        assert_eq!(close_parts(None), (None, String::new()));
    }
}
