//! The server HTTP API (`--api-listen`): backends publish messages and manage inboxes with an API
//! key, without a WebSocket. HTTP/1.1 on hyper, JSON in and out, on its own listener so that it
//! can stay inside the cluster network. docs/openapi.yaml is its contract.
//!
//! Everything is bounded: connections (`MAX_CONNECTIONS`, more are closed at once), the time to
//! send a request head (`HEADER_READ_TIMEOUT`, which also ends idle keep-alive connections) and
//! body (`BODY_READ_TIMEOUT`), the body's size (`Api::body_limit`), the recipients of a publish
//! (`--api-max-recipients`) and each key's rate (`--api-rate`, `--api-burst`).

mod inbox;
mod keys;
mod publish;
mod reply;
mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferry_shared::{DeviceId, UserId};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HeaderMap};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub use keys::{ApiKeys, KeysError};
pub use routes::ROUTES;

use crate::config::Config;
use crate::metrics;
use crate::node::Node;
use keys::ApiKey;
use reply::{ApiError, Reply};
use routes::{Route, path_id};

/// KiB of message the node's publishes in flight may hold at once (a body times its
/// recipients); a publish waits up to `--store-timeout` for room, then is answered 503.
pub const IN_FLIGHT_KIB: u32 = 64 * 1024;
/// API connections open at once; one more is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time for a request head, from when the connection waits for one: it also closes keep-alive
/// connections idle this long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a request body, from when its head arrived.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// When the node drains, how long requests in flight get to finish.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// hyper's read buffer, which bounds a request head (a larger one is answered 431).
const READ_BUFFER: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// Bytes a recipient may take in a request body: a 128-byte user id, its quotes, a comma and
/// some whitespace.
const BYTES_PER_RECIPIENT: usize = 140;
/// Room for the rest of a publish request: `id`, `from`, field names, whitespace.
const BODY_SLACK: usize = 4096;

/// The largest request body the API reads (`Api::body_limit`).
pub fn body_limit(config: &Config) -> usize {
    config
        .max_body_bytes
        .saturating_mul(3)
        .saturating_add(
            config
                .api_max_recipients
                .saturating_mul(BYTES_PER_RECIPIENT),
        )
        .saturating_add(BODY_SLACK)
}

/// The API's settings and keys, shared by its connections.
pub struct Api {
    keys: ApiKeys,
    /// `--api-max-recipients`.
    max_recipients: usize,
    /// Largest request body read: a `--max-body-bytes` body three times over (base64 takes 4/3,
    /// JSON escapes of non-ASCII text up to 3), and every recipient.
    body_limit: usize,
    /// What the node's publishes in flight may hold, in KiB of message (a body stored for N
    /// recipients counts N times: each append carries its own copy to the store).
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl Api {
    /// Reads `--api-keys-file`; `None` when the API is off.
    pub fn from_config(config: &Config) -> Result<Option<Api>, KeysError> {
        let (Some(_), Some(path)) = (config.api_listen, &config.api_keys_file) else {
            return Ok(None);
        };
        let keys = ApiKeys::load(path, config.api_rate, config.api_burst())?;
        for name in keys.names() {
            for outcome in publish::OUTCOMES {
                metrics::API_MESSAGES.with_label_values(&[name, outcome]);
            }
        }
        Ok(Some(Api {
            keys,
            max_recipients: config.api_max_recipients,
            body_limit: body_limit(config),
            in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_KIB as usize)),
        }))
    }

    /// Answers one request and counts it.
    async fn answer(&self, node: &Node, request: Request<Incoming>, peer: SocketAddr) -> Reply {
        let route = Route::parse(request.uri().path());
        let template = route.as_ref().map_or("unmatched", Route::template);
        let reply = match self.handle(node, route, request, peer).await {
            Ok(reply) => reply,
            Err(e) => e.reply(),
        };
        metrics::API_REQUESTS
            .with_label_values(&[template, reply.status().as_str()])
            .inc();
        reply
    }

    async fn handle(
        &self,
        node: &Node,
        route: Option<Route>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Reply, ApiError> {
        let key = self.authenticate(request.headers(), peer)?;
        let Some(route) = route else {
            return Err(ApiError::NotFound(
                "no such route (docs/openapi.yaml lists them)".into(),
            ));
        };
        let engine = node.engine.as_ref();
        match (request.method(), &route) {
            (&Method::POST, Route::Messages) => {
                publish::publish(self, engine, &node.config, key, request).await
            }
            (&Method::GET, Route::Inbox(user)) => {
                let user = path_id(user, "user", UserId::parse)?;
                self.charge(key, 1)?;
                inbox::info(engine, &user).await
            }
            (&Method::DELETE, Route::Inbox(user)) => {
                let user = path_id(user, "user", UserId::parse)?;
                self.charge(key, 1)?;
                let reply = inbox::delete(engine, &user).await?;
                tracing::info!(key = %key.name, %user, "inbox deleted through the API");
                Ok(reply)
            }
            (&Method::GET, Route::Devices(user)) => {
                let user = path_id(user, "user", UserId::parse)?;
                self.charge(key, 1)?;
                inbox::devices(engine, &user).await
            }
            (&Method::DELETE, Route::Device(user, device)) => {
                let user = path_id(user, "user", UserId::parse)?;
                let device = path_id(device, "device", DeviceId::parse)?;
                self.charge(key, 1)?;
                let reply = inbox::remove_device(engine, &user, &device).await?;
                tracing::info!(key = %key.name, %user, %device, "device removed through the API");
                Ok(reply)
            }
            _ => Err(ApiError::MethodNotAllowed {
                allow: route.allow(),
            }),
        }
    }

    /// The key the request's `Authorization: Bearer <secret>` names; a refusal is logged with
    /// the peer and the reason, never with what was presented.
    fn authenticate(&self, headers: &HeaderMap, peer: SocketAddr) -> Result<&ApiKey, ApiError> {
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()));
        let refusal = match presented {
            None => Refusal::NoKey,
            Some(secret) => match self.keys.find(secret) {
                Some(key) => return Ok(key),
                None if looks_like_jwt(secret) => Refusal::UserToken,
                None => Refusal::UnknownKey,
            },
        };
        let reason = refusal.label();
        metrics::API_REFUSALS.with_label_values(&[reason]).inc();
        tracing::info!(%peer, reason, "HTTP API request refused");
        Err(ApiError::Unauthorized(refusal.message()))
    }

    /// Takes `cost` tokens of `key`'s bucket, or refuses the whole request.
    fn charge(&self, key: &ApiKey, cost: u32) -> Result<(), ApiError> {
        key.take(cost).map_err(|retry_after_ms| {
            metrics::API_REFUSALS
                .with_label_values(&["rate_limited"])
                .inc();
            // At debug: a backend over its rate would write a line per request; the refusal
            // counter shows it.
            tracing::debug!(key = %key.name, cost, retry_after_ms, "HTTP API request rate-limited");
            ApiError::RateLimited { retry_after_ms }
        })
    }
}

/// Why a request carried no usable key.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    NoKey,
    UnknownKey,
    UserToken,
}

impl Refusal {
    /// The `reason` label of `ferry_api_refusals_total`.
    fn label(self) -> &'static str {
        match self {
            Refusal::NoKey => "no_key",
            Refusal::UnknownKey => "unknown_key",
            Refusal::UserToken => "user_token",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::NoKey => "give an API key as `Authorization: Bearer <key>`",
            Refusal::UnknownKey => "unknown API key",
            Refusal::UserToken => "a user token (JWT) is not an API key",
        }
    }
}

/// The credentials of an `Authorization: Bearer <credentials>` header (the scheme in any case).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let credentials = rest.trim_ascii();
    (!credentials.is_empty()).then_some(credentials)
}

/// Whether `credentials` look like a compact JWT (a JSON header, three dot-separated parts),
/// to tell a caller who confused a user token with an API key.
fn looks_like_jwt(credentials: &[u8]) -> bool {
    credentials.starts_with(b"eyJ") && credentials.iter().filter(|&&b| b == b'.').count() == 2
}

/// Accepts until the node drains, then lets the requests in flight finish (for `DRAIN_GRACE` at
/// most) and closes every connection.
pub async fn serve(listener: TcpListener, node: Arc<Node>, api: Arc<Api>) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .max_buf_size(READ_BUFFER)
        .max_headers(MAX_HEADERS);
    let http = Arc::new(http);
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = node.draining.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if connections.len() >= MAX_CONNECTIONS {
            metrics::API_REFUSALS.with_label_values(&["capacity"]).inc();
            tracing::debug!(%peer, "API connection refused: at capacity");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let span = tracing::debug_span!("api_conn", %peer);
        let conn = connection(http.clone(), stream, peer, node.clone(), api.clone());
        connections.spawn(tracing::Instrument::instrument(conn, span));
    }
    drop(listener);
    let finished = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN_GRACE, finished).await.is_err() {
        tracing::warn!(
            left = connections.len(),
            "API requests still running after the drain grace; closing them"
        );
    }
    // Dropping the set aborts what is left.
}

/// Serves one connection's requests until it closes, or finishes the one in flight and closes
/// when the node drains.
async fn connection(
    http: Arc<http1::Builder>,
    stream: TcpStream,
    peer: SocketAddr,
    node: Arc<Node>,
    api: Arc<Api>,
) {
    let draining = node.draining.clone();
    let service = service_fn(move |request| {
        let (node, api) = (node.clone(), api.clone());
        async move { Ok::<_, Infallible>(api.answer(&node, request, peer).await) }
    });
    let conn = http.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "API connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert!(looks_like_jwt(b"eyJhbGciOi.eyJzdWIi.c2ln"));
        assert!(!looks_like_jwt(b"eyJhbGciOi.eyJzdWIi"));
        assert!(!looks_like_jwt(b"ferry-api-key.with.dots"));
    }
}
