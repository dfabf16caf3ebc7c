//! The WebSocket listener: accepts connections up to `--max-connections`, reads the upgrade
//! request, checks its `Origin` (`--allowed-origins`) and where it carries a token
//! (`--refuse-query-token`), negotiates the subprotocol, answers `101`, and runs a session. It
//! also serves the JavaScript client; in `--dev`, the demo page and (without a configured key)
//! the token endpoint too. Refusals are plain HTTP statuses, counted by reason; a path it does not
//! serve is a 404, counted apart (`ferry_http_not_found_total`).

use std::sync::Arc;

use ferry_shared::{Codec, UserId};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;

use crate::addresses::Counted;
use crate::http::{self, Request};
use crate::metrics;
use crate::node::Node;
use crate::outbound::Outbound;
use crate::session;

/// The JavaScript client (`ferry.v1.json`), its TypeScript declarations and the `--dev` demo
/// page, compiled into the binary.
const CLIENT_JS: &str = include_str!("../static/ferry-client.js");
const CLIENT_DTS: &str = include_str!("../static/ferry-client.d.ts");
const DEMO_HTML: &str = include_str!("../static/demo.html");
const JS_TYPE: &str = "text/javascript; charset=utf-8";
const TS_TYPE: &str = "application/typescript; charset=utf-8";
const HTML_TYPE: &str = "text/html; charset=utf-8";
/// Bytes of frames gathered before tungstenite writes them without waiting for the flush.
const WRITE_GATHER: usize = 16 * 1024;

/// Accepts until the node drains; every connection task is tracked so drain can wait for them.
pub async fn accept_loop(listener: TcpListener, node: Arc<Node>, tracker: TaskTracker) {
    let slots = Arc::new(Semaphore::new(node.config.max_connections));
    loop {
        let accepted = tokio::select! {
            () = node.draining.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let permit = slots.clone().try_acquire_owned().ok();
        let anonymous = node.unauthenticated.clone().try_acquire_owned().ok();
        // A trusted proxy's connections are counted under the address it forwards, once the
        // request head is read.
        let counted =
            (!node.addresses.is_trusted(peer.ip())).then(|| node.addresses.count(peer.ip()));
        let node = node.clone();
        tracker.spawn(async move {
            let span = tracing::debug_span!("conn", %peer);
            let _permit = permit.as_ref();
            let refused = if permit.is_none() {
                Some(("capacity", "node at connection capacity"))
            } else if anonymous.is_none() {
                Some((
                    "unauthenticated",
                    "too many connections not yet authenticated",
                ))
            } else if matches!(counted, Some(None)) {
                Some(("address", "too many connections from this address"))
            } else {
                None
            };
            if let Some((reason, text)) = refused {
                metrics::CONNECTIONS_REFUSED
                    .with_label_values(&[reason])
                    .inc();
                refuse(stream, 503, text).await;
                return;
            }
            let entry = Entry {
                peer,
                counted: counted.flatten(),
                anonymous,
            };
            tracing::Instrument::instrument(serve(stream, node, entry), span).await;
        });
    }
}

async fn refuse(mut stream: TcpStream, status: u16, text: &str) {
    let _ = http::respond_text(&mut stream, status, text).await;
}

/// What a connection holds from its accept: its peer, its count against its client address
/// (for a trusted proxy's connection, taken once the request head names the client), and its
/// place in the budget of connections not yet authenticated (given back after `hello`).
struct Entry {
    peer: std::net::SocketAddr,
    counted: Option<Counted>,
    anonymous: Option<OwnedSemaphorePermit>,
}

async fn serve(mut stream: TcpStream, node: Arc<Node>, mut entry: Entry) {
    let request = match http::read_request(&mut stream, node.config.hello_timeout).await {
        Ok(request) => request,
        Err(e) => {
            tracing::debug!(error = %e, "no request");
            if matches!(e, http::HttpError::Malformed(_) | http::HttpError::TooLarge) {
                metrics::CONNECTIONS_REFUSED
                    .with_label_values(&["bad_request"])
                    .inc();
                refuse(stream, 400, &e.to_string()).await;
            }
            return;
        }
    };
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/v1/ws") => {
            if entry.counted.is_none() {
                let forwarded = request.header("x-forwarded-for");
                let client = node
                    .addresses
                    .client(entry.peer.ip(), forwarded)
                    .unwrap_or(entry.peer.ip());
                let Some(counted) = node.addresses.count(client) else {
                    metrics::CONNECTIONS_REFUSED
                        .with_label_values(&["address"])
                        .inc();
                    refuse(stream, 503, "too many connections from this address").await;
                    return;
                };
                entry.counted = Some(counted);
            }
            let _counted = entry.counted;
            upgrade(stream, request, node, entry.anonymous).await;
        }
        ("GET", "/dev/token") if node.config.dev_token_enabled() => {
            dev_token(stream, &request, &node).await;
        }
        ("GET", "/dev/token") if node.config.dev => {
            metrics::HTTP_NOT_FOUND.inc();
            let text = "no /dev/token beside a configured key (--jwt-secret, --jwt-public-key): \
                        it would sign tokens for any user with it; get tokens from the issuer";
            refuse(stream, 404, text).await;
        }
        ("GET", "/v1/ferry-client.js") => {
            let _ = http::respond(&mut stream, 200, JS_TYPE, CLIENT_JS.as_bytes()).await;
        }
        ("GET", "/v1/ferry-client.d.ts") => {
            let _ = http::respond(&mut stream, 200, TS_TYPE, CLIENT_DTS.as_bytes()).await;
        }
        ("GET", "/" | "/demo") if node.config.dev => {
            let _ = http::respond(&mut stream, 200, HTML_TYPE, DEMO_HTML.as_bytes()).await;
        }
        // Scanners and browsers (a favicon) ask for anything: counted apart from the refusals,
        // whose rate the alerts watch.
        _ => {
            metrics::HTTP_NOT_FOUND.inc();
            refuse(stream, 404, "not found; the WebSocket endpoint is /v1/ws").await;
        }
    }
}

/// A refused upgrade: the status, the `ferry_connections_refused_total` reason, and the text.
struct Refused {
    status: u16,
    reason: &'static str,
    text: String,
}

impl Refused {
    fn protocol(status: u16, text: impl Into<String>) -> Self {
        Self {
            status,
            reason: "protocol",
            text: text.into(),
        }
    }
}

/// Checks the upgrade request; the chosen codec and the token given at the upgrade, if any.
fn check_upgrade(
    request: &Request,
    node: &Node,
) -> Result<(Codec, Option<String>, String), Refused> {
    let has = |name: &str, token: &str| {
        request
            .header_values(name)
            .any(|v| v.eq_ignore_ascii_case(token))
    };
    if !has("upgrade", "websocket") || !has("connection", "upgrade") {
        return Err(Refused::protocol(426, "a WebSocket upgrade is required"));
    }
    if request.header("sec-websocket-version") != Some("13") {
        return Err(Refused::protocol(400, "Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = request.header("sec-websocket-key") else {
        return Err(Refused::protocol(400, "Sec-WebSocket-Key is missing"));
    };
    let Some(codec) = Codec::negotiate(request.header_values("sec-websocket-protocol")) else {
        let message = format!(
            "unknown subprotocol; offer {} or {}",
            Codec::MSGPACK_SUBPROTOCOL,
            Codec::JSON_SUBPROTOCOL
        );
        return Err(Refused::protocol(400, message));
    };
    check_origin(request, node)?;
    let query_token = request.query_param("token");
    if query_token.is_some() && node.config.refuse_query_token {
        return Err(Refused {
            status: 400,
            reason: "query_token",
            text: "a token in the URL is refused here (URLs end up in access logs): send it in \
                   hello, or as Authorization: Bearer <token>"
                .into(),
        });
    }
    let token = request
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_string()))
        .or(query_token);
    Ok((codec, token, derive_accept_key(key.as_bytes())))
}

/// With `--allowed-origins`, every `Origin` header of the upgrade must be listed. A request
/// without one is let in: browsers always send it on a WebSocket upgrade, other clients (apps,
/// servers) do not, and they could send any value anyway. So the check keeps other sites' pages
/// from opening sessions from their visitors' browsers; it keeps no other client out.
fn check_origin(request: &Request, node: &Node) -> Result<(), Refused> {
    let mut origins = request.headers.iter().filter(|(name, _)| name == "origin");
    if origins.all(|(_, origin)| node.config.origin_allowed(origin)) {
        return Ok(());
    }
    Err(Refused {
        status: 403,
        reason: "origin",
        text: "origin not allowed".into(),
    })
}

async fn upgrade(
    mut stream: TcpStream,
    request: Request,
    node: Arc<Node>,
    anonymous: Option<OwnedSemaphorePermit>,
) {
    let Some((codec, token, rest)) = handshake(&mut stream, request, &node).await else {
        return;
    };
    let ws =
        WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(ws_config(&node)))
            .await;
    let (sink, reader) = futures_util::StreamExt::split(ws);
    let config = &node.config;
    let out = Outbound::new(
        Box::pin(sink),
        config.outbound_queue,
        config.outbound_queue_bytes,
        config.write_timeout,
    );
    metrics::CONNECTIONS_OPEN.inc();
    session::run(reader, out, node.clone(), codec, token, anonymous).await;
    metrics::CONNECTIONS_OPEN.dec();
}

/// Answers the upgrade (`101`, or a refusal). On success: the codec, the token given at the
/// upgrade, and the bytes that arrived past the request head. Everything else of the request
/// is freed here, before the long-lived session starts.
async fn handshake(
    stream: &mut TcpStream,
    request: Request,
    node: &Node,
) -> Option<(Codec, Option<String>, Vec<u8>)> {
    let (codec, token, accept) = match check_upgrade(&request, node) {
        Ok(ok) => ok,
        Err(refused) => {
            tracing::debug!(
                reason = refused.reason,
                status = refused.status,
                "upgrade refused"
            );
            metrics::CONNECTIONS_REFUSED
                .with_label_values(&[refused.reason])
                .inc();
            let _ = http::respond_text(stream, refused.status, &refused.text).await;
            return None;
        }
    };
    // Echo a subprotocol only when the client offered one (RFC 6455 §4.2.2).
    let offered = request
        .header_values("sec-websocket-protocol")
        .next()
        .is_some();
    let protocol_line = if offered {
        format!("Sec-WebSocket-Protocol: {}\r\n", codec.subprotocol())
    } else {
        String::new()
    };
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{protocol_line}\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(stream, head.as_bytes())
        .await
        .ok()?;
    Some((codec, token, request.rest.to_vec()))
}

/// Buffers sized for many idle connections rather than one fast one: tungstenite allocates its
/// read buffer eagerly (128 KiB by default); `--ws-read-buffer` (1 KiB) holds a `hello` and a
/// burst of small frames, the buffer grows for a larger frame. Frames handed over together are
/// gathered (up to `WRITE_GATHER` bytes) and go out in one write at the flush; the write buffer
/// is only allocated once something is written.
fn ws_config(node: &Node) -> WebSocketConfig {
    let max = node.config.max_frame_bytes;
    WebSocketConfig::default()
        .read_buffer_size(node.config.ws_read_buffer)
        .write_buffer_size(WRITE_GATHER)
        .max_write_buffer_size(max.saturating_mul(2).max(64 * 1024))
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// `GET /dev/token?user=alice` → `{"user":"alice","token":"…"}`; only with `--dev` and no
/// configured key.
async fn dev_token(mut stream: TcpStream, request: &Request, node: &Node) {
    let user = request.query_param("user").unwrap_or_default();
    let answer = UserId::parse(&user)
        .map_err(|e| (400, e.to_string()))
        .and_then(|user| {
            let token = node
                .auth
                .mint_dev_token(&user, node.config.dev_token_ttl)
                .map_err(|e| (400, e.to_string()))?;
            Ok(serde_json::json!({ "user": user.as_str(), "token": token }).to_string())
        });
    let _ = match answer {
        Ok(body) => http::respond(&mut stream, 200, "application/json", body.as_bytes()).await,
        Err((status, text)) => http::respond_text(&mut stream, status, &text).await,
    };
}
