//! Test harness: a real gateway on `127.0.0.1:0` over either engine (Redis tests start their own
//! `redis-server` on a free port), tokens, raw and full clients, and small HTTP helpers.
#![allow(dead_code)] // each test binary uses part of the harness

use std::net::SocketAddr;
use std::time::Duration;

use ferry_gateway::Config;
use ferry_gateway::auth::Authenticator;
use ferry_router::testkit::{RedisCluster, RedisOptions, RedisServer};
use ferry_shared::client::{Client, ClientConfig, Event, Events, RawConnection, RawEvent};
use ferry_shared::{ClientFrame, ServerFrame, UserId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The secret every test gateway verifies HS256 tokens with.
pub const SECRET: &str = "ferry-test-secret-of-at-least-32-bytes!";
/// Upper bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Embedded,
    Redis,
    /// The process's shared 3 × 1 Redis Cluster (`RedisCluster::shared()`), under a key prefix
    /// of the gateway's own.
    RedisCluster,
}

/// Runs the same async test body on both engines, as `<name>::embedded` and `<name>::redis`.
#[macro_export]
macro_rules! both_engines {
    ($(async fn $name:ident($kind:ident: EngineKind) $body:block)*) => {$(
        $crate::engine_tests! { [embedded: Embedded, redis: Redis]
            async fn $name($kind: EngineKind) $body }
    )*};
}

/// `both_engines!` plus a third test, `<name>::redis_cluster`, on a Redis Cluster.
#[macro_export]
macro_rules! every_engine {
    ($(async fn $name:ident($kind:ident: EngineKind) $body:block)*) => {$(
        $crate::engine_tests! { [embedded: Embedded, redis: Redis, redis_cluster: RedisCluster]
            async fn $name($kind: EngineKind) $body }
    )*};
}

/// `mod <name>` with one test per `<test>: <EngineKind variant>` pair, each running the body.
#[macro_export]
macro_rules! engine_tests {
    ([$($test:ident: $variant:ident),*] async fn $name:ident($kind:ident: EngineKind) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn body($kind: EngineKind) $body
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() { body(EngineKind::$variant).await }
            )*
        }
    };
}

/// A running gateway. Dropping it stops the gateway task and the Redis it started.
pub struct TestGateway {
    pub kind: EngineKind,
    pub config: Config,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTP API's listener, when the config turned it on (see `with_api`).
    pub api: Option<SocketAddr>,
    pub redis: Option<RedisServer>,
    auth: Authenticator,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), ferry_gateway::GatewayError>>>,
}

/// The test configuration: HS256 with `SECRET`, loopback ports, defaults otherwise.
pub fn test_config() -> Config {
    let mut config = Config::for_tests();
    config.dev = false;
    config.jwt_secret = Some(SECRET.into());
    config.node_id = Some("gw-test".into());
    config
}

impl TestGateway {
    pub async fn start(kind: EngineKind) -> Self {
        Self::start_with(kind, |_| {}).await
    }

    pub async fn start_with(kind: EngineKind, tweak: impl FnOnce(&mut Config)) -> Self {
        let redis = match kind {
            EngineKind::Redis => Some(RedisServer::start()),
            EngineKind::Embedded => None,
            EngineKind::RedisCluster => {
                let cluster = RedisCluster::shared();
                let mut config = test_config();
                config.redis_url = Some(cluster.seed_urls().join(",").into());
                config.redis_cluster = true;
                config.key_prefix = ferry_router::testkit::unique_prefix();
                tweak(&mut config);
                return Self::launch(kind, None, config).await;
            }
        };
        Self::start_on(kind, redis, tweak).await
    }

    /// A Redis gateway on a server started with `options` (AOF tests).
    pub async fn start_redis_with(options: RedisOptions, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_on(
            EngineKind::Redis,
            Some(RedisServer::start_with(options)),
            tweak,
        )
        .await
    }

    /// A gateway on `redis` (a server the test set up), or the embedded engine with `None`.
    pub async fn start_on(
        kind: EngineKind,
        redis: Option<RedisServer>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = test_config();
        config.redis_url = redis.as_ref().map(|r| r.url().into());
        tweak(&mut config);
        Self::launch(kind, redis, config).await
    }

    /// Another gateway node on the same Redis as `self` (same config otherwise).
    pub async fn another_node(&self, node_id: &str) -> TestGateway {
        let mut config = self.config.clone();
        config.node_id = Some(node_id.into());
        Self::launch(self.kind, None, config).await
    }

    async fn launch(kind: EngineKind, redis: Option<RedisServer>, config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let api_listener = match config.api_listen {
            Some(at) => Some(TcpListener::bind(at).await.expect("bind api")),
            None => None,
        };
        let addr = listener.local_addr().expect("addr");
        let admin = admin_listener.local_addr().expect("admin addr");
        let api = api_listener
            .as_ref()
            .map(|l| l.local_addr().expect("api addr"));
        let auth = Authenticator::from_config(&config).expect("authenticator");
        let shutdown = CancellationToken::new();
        let listeners = ferry_gateway::Listeners {
            ws: listener,
            admin: admin_listener,
            api: api_listener,
        };
        let task = tokio::spawn(ferry_gateway::run_with(
            listeners,
            config.clone(),
            shutdown.clone(),
        ));
        let gateway = Self {
            kind,
            config,
            addr,
            admin,
            api,
            redis,
            auth,
            shutdown,
            task: Some(task),
        };
        eventually("gateway ready", || async {
            gateway
                .get("/healthz")
                .await
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
        })
        .await;
        gateway
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn redis(&self) -> &RedisServer {
        self.redis
            .as_ref()
            .expect("this test gateway runs on Redis")
    }

    /// Runs one command on the Redis node that holds `key` (its slot's primary on a cluster).
    pub fn store_cmd(&self, key: &str, args: &[&str]) -> redis::Value {
        match self.kind {
            EngineKind::RedisCluster => {
                let cluster = RedisCluster::shared();
                let port = cluster.primary_for_slot(cluster.slot_of(key));
                cluster.node_by_port(port).cmd(args)
            }
            _ => self.redis().cmd(args),
        }
    }

    /// A key of `user` under this gateway's prefix, e.g. `key("bob", "inbox")`.
    pub fn key(&self, user: &str, suffix: &str) -> String {
        format!("{}:{{u:{user}}}:{suffix}", self.config.key_prefix)
    }

    pub fn redis_mut(&mut self) -> &mut RedisServer {
        self.redis
            .as_mut()
            .expect("this test gateway runs on Redis")
    }

    pub fn token(&self, user: &str) -> String {
        self.token_for(user, Duration::from_secs(3600))
    }

    /// A token for `user` that expires `ttl` from now (whole seconds).
    pub fn token_for(&self, user: &str, ttl: Duration) -> String {
        let user = UserId::parse(user).expect("valid user");
        self.auth.mint_dev_token(&user, ttl).expect("mint")
    }

    pub fn client_config(&self, user: &str) -> ClientConfig {
        ClientConfig {
            ack_interval: Duration::from_millis(20),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(500),
            ..ClientConfig::new(self.url(), self.token(user))
        }
    }

    /// A full client (resume, acks, retries, reconnects), connected.
    pub async fn client(&self, user: &str) -> (Client, Events) {
        Client::connect(self.client_config(user))
            .await
            .expect("client connects")
    }

    /// A raw msgpack connection that has said `hello` and read `welcome`.
    pub async fn raw(&self, user: &str) -> (RawConnection, ServerFrame) {
        self.raw_resume(user, 0, None).await
    }

    pub async fn raw_resume(
        &self,
        user: &str,
        last_seq: u64,
        epoch: Option<&str>,
    ) -> (RawConnection, ServerFrame) {
        self.raw_hello(self.token(user), last_seq, epoch).await
    }

    /// A raw msgpack connection that has said `hello` with `token` and read `welcome`.
    pub async fn raw_hello(
        &self,
        token: String,
        last_seq: u64,
        epoch: Option<&str>,
    ) -> (RawConnection, ServerFrame) {
        self.raw_device_hello(token, last_seq, epoch, None).await
    }

    /// `raw_hello` as device `device` (`None`: the default device).
    pub async fn raw_device_hello(
        &self,
        token: String,
        last_seq: u64,
        epoch: Option<&str>,
        device: Option<&str>,
    ) -> (RawConnection, ServerFrame) {
        let mut conn = RawConnection::connect(&self.url(), &["ferry.v1.msgpack"], &[])
            .await
            .expect("raw connects");
        let hello = ClientFrame::Hello {
            token: Some(token),
            last_seq,
            epoch: epoch.map(str::to_string),
            device: device.map(str::to_string),
        };
        conn.send_frame(&hello).await.expect("send hello");
        let welcome = next_frame(&mut conn).await;
        assert!(
            matches!(welcome, ServerFrame::Welcome { .. }),
            "{welcome:?}"
        );
        (conn, welcome)
    }

    /// `GET path` on the admin listener: (status, body).
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.admin, path).await
    }

    /// Starts the drain (as SIGTERM does) without waiting for it.
    pub fn begin_drain(&self) {
        self.shutdown.cancel();
    }

    /// Drains and waits for `run` to return.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let ended = tokio::time::timeout(Duration::from_secs(60), task).await;
            let result = ended
                .expect("gateway drains in time")
                .expect("gateway task");
            result.expect("gateway run returns Ok");
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
        // A keys file `with_api` wrote (read at start, so another node started from this one
        // has read it already).
        if let Some(path) = &self.config.api_keys_file
            && path.starts_with(std::env::temp_dir())
            && path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ferry-test-api-keys-"))
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Turns the HTTP API on (on `127.0.0.1:0`) with `keys` as (name, secret), written to a keys file
/// of the test's own under the temp directory (the gateway reads it once, at start).
pub fn with_api(config: &mut Config, keys: &[(&str, &str)]) {
    static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("ferry-test-api-keys-{}-{n}", std::process::id()));
    let text: String = keys
        .iter()
        .map(|(name, secret)| format!("{name} {secret}\n"))
        .collect();
    std::fs::write(&path, text).expect("write the API keys file");
    config.api_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.api_keys_file = Some(path);
}

/// A minimal HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("http timeout"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The next frame, failing the test on a close or after `WAIT`.
pub async fn next_frame(conn: &mut RawConnection) -> ServerFrame {
    match conn.next_frame(WAIT).await.expect("a frame in time") {
        RawEvent::Frame(frame) => frame,
        RawEvent::Closed { code, reason } => {
            panic!("closed ({code:?}, {reason}) instead of a frame")
        }
    }
}

/// Reads until the connection closes (skipping frames); the close code.
pub async fn expect_close(conn: &mut RawConnection) -> Option<u16> {
    loop {
        match conn.next_frame(WAIT).await.expect("a close in time") {
            RawEvent::Closed { code, .. } => return code,
            RawEvent::Frame(_) => continue,
        }
    }
}

/// Sends `send` frames on a raw connection and returns the answer to the last one.
pub fn send_frame(id: &str, to: &str, body: &str) -> ClientFrame {
    ClientFrame::Send {
        id: id.into(),
        to: to.into(),
        body: body.into(),
    }
}

/// Reads `msg` frames until `n` have arrived (other frames are skipped); their (seq, id).
pub async fn raw_messages(conn: &mut RawConnection, n: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        if let ServerFrame::Msg { seq, id, .. } = next_frame(conn).await {
            got.push((seq, id));
        }
    }
    got
}

/// Receives client events until `n` messages have arrived; their (seq, id).
pub async fn messages(events: &mut Events, n: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while got.len() < n {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages arrived: {got:?}", got.len()))
            .expect("client still running");
        if let Event::Message(m) = event {
            got.push((m.seq, m.id));
        }
    }
    got
}

/// Asserts that no `msg` arrives on `conn` within `quiet`.
pub async fn no_message(conn: &mut RawConnection, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match conn.next_frame(left).await {
            Err(_) => return, // timeout: nothing came
            Ok(RawEvent::Frame(ServerFrame::Msg { seq, id, .. })) => {
                panic!("unexpected message seq {seq} id {id}")
            }
            Ok(RawEvent::Frame(_)) => continue,
            Ok(RawEvent::Closed { code, .. }) => panic!("closed ({code:?}) while waiting"),
        }
    }
}

/// Polls `check` until it holds, failing after `WAIT`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of a metric series (first line starting with `series`) from `/metrics`.
pub async fn metric(gateway: &TestGateway, series: &str) -> Option<f64> {
    let (_, body) = gateway.get("/metrics").await.ok()?;
    series_value(&body, series)
}

/// The value of `series` (its name and labels, exactly) in Prometheus exposition text.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// Sends (raw) and expects `sent`: its seq.
pub async fn raw_send(conn: &mut RawConnection, id: &str, to: &str, body: &str) -> u64 {
    conn.send_frame(&send_frame(id, to, body))
        .await
        .expect("send");
    loop {
        match next_frame(conn).await {
            ServerFrame::Sent { id: got, seq, .. } if got == id => return seq,
            ServerFrame::Error {
                code,
                message,
                id: Some(got),
                ..
            } if got == id => {
                panic!("send {id} failed: {code:?} {message}")
            }
            _ => continue,
        }
    }
}

/// The epoch a `welcome` reports.
pub fn epoch_of(welcome: &ServerFrame) -> String {
    match welcome {
        ServerFrame::Welcome { epoch, .. } => epoch.clone(),
        other => panic!("not a welcome: {other:?}"),
    }
}

/// The head a `welcome` reports.
pub fn head_of(welcome: &ServerFrame) -> u64 {
    match welcome {
        ServerFrame::Welcome { head, .. } => *head,
        other => panic!("not a welcome: {other:?}"),
    }
}

/// Sends an application `ping` and waits for its `pong`, skipping other frames.
pub async fn ping_pong(conn: &mut RawConnection) {
    conn.send_frame(&ClientFrame::Ping)
        .await
        .expect("send ping");
    while !matches!(next_frame(conn).await, ServerFrame::Pong) {}
}

/// A raw WebSocket to `gateway` offering `subprotocols`, before any `hello`.
pub async fn raw_open(gateway: &TestGateway, subprotocols: &[&str]) -> RawConnection {
    RawConnection::connect(&gateway.url(), subprotocols, &[])
        .await
        .expect("raw connects")
}

/// The next frame must be an `error` with `code`: its (message, id, retry_after_ms).
pub async fn expect_error(
    conn: &mut RawConnection,
    code: ferry_shared::ErrorCode,
) -> (String, Option<String>, Option<u64>) {
    match next_frame(conn).await {
        ServerFrame::Error {
            code: got,
            message,
            id,
            retry_after_ms,
        } if got == code => (message, id, retry_after_ms),
        other => panic!("expected error {}, got {other:?}", code.as_str()),
    }
}

/// The next event must be the close, with `code` (no frame before it).
pub async fn expect_closed(conn: &mut RawConnection, code: u16) {
    match conn.next_frame(WAIT).await.expect("a close in time") {
        RawEvent::Closed { code: got, reason } => {
            assert_eq!(got, Some(code), "close code (reason: {reason:?})")
        }
        RawEvent::Frame(frame) => panic!("expected close {code}, got {frame:?}"),
    }
}
