//! The edge against abuse (issue 13: M6, L1, L3, L4): `--dev` kept to loopback and off beside a
//! real key, the `Origin` allow-list, refusing `?token=`, authentication failures that tell the
//! client nothing more than `unauthorized`, and an admin port with a connection cap whose
//! `/readyz` answers from the store watchdog instead of pinging Redis itself.

mod common;

use std::time::Duration;

use common::*;
use ferry_gateway::auth::Authenticator;
use ferry_gateway::config::ConfigError;
use ferry_gateway::{Config, GatewayError, Listeners};
use ferry_shared::client::RawConnection;
use ferry_shared::{ClientFrame, ErrorCode, ServerFrame, UserId};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const APP: &str = "https://app.example.com";

/// A raw WebSocket upgrade of `target` (e.g. `/v1/ws?token=…`) with `headers`: the status and,
/// for a refusal, the body.
async fn upgrade(gw: &TestGateway, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: ferry.v1.json\r\n{extra}\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let head_end = loop {
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed without an answer");
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status == 101 {
        return (status, String::new());
    }
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("the refusal ends in time")
        .expect("read");
    (
        status,
        String::from_utf8_lossy(&raw[head_end..]).into_owned(),
    )
}

/// `GET path` on the WebSocket listener (the token endpoint, static files).
async fn get_ws_port(gw: &TestGateway, path: &str) -> (u16, String) {
    http_get(gw.addr, path).await.expect("GET")
}

async fn refused(gw: &TestGateway, reason: &str) -> f64 {
    let series = format!("ferry_connections_refused_total{{reason=\"{reason}\"}}");
    metric(gw, &series).await.unwrap_or(0.0)
}

/// A raw connection opened to `url` with `headers`, saying `hello` without a token: `welcome`.
async fn hello_without_token(url: &str, headers: &[(&str, &str)]) -> ServerFrame {
    let mut conn = RawConnection::connect(url, &["ferry.v1.msgpack"], headers)
        .await
        .expect("raw connects");
    let hello = ClientFrame::Hello {
        token: None,
        last_seq: 0,
        epoch: None,
        device: None,
    };
    conn.send_frame(&hello).await.expect("hello");
    next_frame(&mut conn).await
}

fn sign(secret: &str, user: &str, exp: u64) -> String {
    let claims = serde_json::json!({
        "sub": user,
        "iat": jsonwebtoken::get_current_timestamp(),
        "exp": exp,
    });
    let key = EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).expect("sign")
}

fn in_an_hour() -> u64 {
    jsonwebtoken::get_current_timestamp() + 3600
}

// --- M6: --dev ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_token_is_not_served_beside_a_real_key() {
    // --dev with --jwt-secret: the token endpoint would mint with the real secret.
    let gw = TestGateway::start_with(EngineKind::Embedded, |c| c.dev = true).await;
    let (status, body) = get_ws_port(&gw, "/dev/token?user=alice").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("--jwt-secret"), "says why: {body}");
    assert!(!body.contains("token\":"), "no token: {body}");
    // The rest of --dev stays (the demo page), and real tokens work.
    assert_eq!(get_ws_port(&gw, "/demo").await.0, 200);
    gw.raw("alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_token_is_served_without_a_key() {
    let gw = TestGateway::start_with(EngineKind::Embedded, |c| {
        c.dev = true;
        c.jwt_secret = None;
    })
    .await;
    let (status, body) = get_ws_port(&gw, "/dev/token?user=alice").await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let token = answer["token"].as_str().expect("a token").to_owned();
    gw.raw_hello(token, 0, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_refuses_to_start_on_a_remote_address() {
    let start = |tweak: fn(&mut Config)| async move {
        let mut config = Config::for_tests();
        tweak(&mut config);
        let listeners = Listeners {
            ws: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            admin: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            api: None,
        };
        let shutdown = CancellationToken::new();
        let run = ferry_gateway::run_with(listeners, config, shutdown.clone());
        let ended = tokio::time::timeout(Duration::from_millis(500), run).await;
        shutdown.cancel();
        ended
    };
    let remote: fn(&mut Config) = |c| c.listen = "0.0.0.0:0".parse().expect("addr");
    match start(remote).await {
        Ok(Err(GatewayError::Config(ConfigError::Invalid { flag, reason }))) => {
            assert_eq!(flag, "listen");
            assert!(reason.contains("--dev-allow-remote"), "{reason}");
        }
        Ok(other) => panic!("expected a refusal of --listen, got {other:?}"),
        Err(_) => panic!("--dev started on 0.0.0.0"),
    }
    // With the explicit flag it starts (and serves until stopped).
    let allowed: fn(&mut Config) = |c| {
        c.listen = "0.0.0.0:0".parse().expect("addr");
        c.dev_allow_remote = true;
    };
    assert!(start(allowed).await.is_err(), "it runs");
}

// --- L4: Origin and tokens ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_not_allowed_gets_403() {
    let gw = TestGateway::start_with(EngineKind::Embedded, |c| {
        c.allowed_origins = vec![APP.into(), "http://localhost:3000".into()];
    })
    .await;
    let before = refused(&gw, "origin").await;
    let (status, body) = upgrade(&gw, "/v1/ws", &[("Origin", "https://evil.example")]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("origin"), "{body}");
    assert!(!body.contains("evil"), "does not echo the origin: {body}");
    // A lookalike is not an exact match.
    let lookalike = format!("{APP}.evil.example");
    assert_eq!(
        upgrade(&gw, "/v1/ws", &[("Origin", &lookalike)]).await.0,
        403
    );
    assert_eq!(upgrade(&gw, "/v1/ws", &[("Origin", "null")]).await.0, 403);
    assert!(refused(&gw, "origin").await >= before + 3.0);

    // Listed origins (either of them), and no Origin at all (not a browser), are let in.
    assert_eq!(upgrade(&gw, "/v1/ws", &[("Origin", APP)]).await.0, 101);
    let local = [("Origin", "http://localhost:3000")];
    assert_eq!(upgrade(&gw, "/v1/ws", &local).await.0, 101);
    assert_eq!(upgrade(&gw, "/v1/ws", &[]).await.0, 101);
    let (mut conn, _) = gw.raw("alice").await;
    ping_pong(&mut conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_origin_is_allowed_when_none_is_configured() {
    let gw = TestGateway::start(EngineKind::Embedded).await;
    let evil = [("Origin", "https://evil.example")];
    assert_eq!(upgrade(&gw, "/v1/ws", &evil).await.0, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_token_can_be_refused() {
    let gw = TestGateway::start_with(EngineKind::Embedded, |c| c.refuse_query_token = true).await;
    let token = gw.token("alice");
    let before = refused(&gw, "query_token").await;
    let (status, body) = upgrade(&gw, &format!("/v1/ws?token={token}"), &[]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Authorization"), "says what to do: {body}");
    assert!(!body.contains(&token), "does not echo the token: {body}");
    assert!(refused(&gw, "query_token").await > before);

    // The header and `hello` still carry it.
    let bearer = format!("Bearer {token}");
    let welcome = hello_without_token(&gw.url(), &[("Authorization", &bearer)]).await;
    assert!(
        matches!(welcome, ServerFrame::Welcome { .. }),
        "{welcome:?}"
    );
    gw.raw("alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_token_works_by_default() {
    let gw = TestGateway::start(EngineKind::Embedded).await;
    let url = format!("{}?token={}", gw.url(), gw.token("alice"));
    let welcome = hello_without_token(&url, &[]).await;
    assert!(
        matches!(welcome, ServerFrame::Welcome { .. }),
        "{welcome:?}"
    );
}

/// A path the listener does not serve (a scanner, a browser's favicon) is a 404, counted as one
/// and not as a refused connection: `ferry_connections_refused_total` is for the capacity and
/// policy refusals the alerts watch (issue 14).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_is_not_a_refused_connection() {
    let gw = TestGateway::start(EngineKind::Embedded).await;
    let series = "ferry_http_not_found_total";
    let before = metric(&gw, series)
        .await
        .expect("the 404 counter is exported");
    for path in ["/favicon.ico", "/wp-login.php", "/v1/ws/../admin"] {
        let (status, body) = get_ws_port(&gw, path).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    assert!(metric(&gw, series).await >= Some(before + 3.0));
    let (_, exposition) = gw.get("/metrics").await.expect("scrape");
    assert!(
        !exposition.contains(r#"ferry_connections_refused_total{reason="not_found"}"#),
        "a 404 is not a refusal"
    );
}

// --- L3: authentication failures ---------------------------------------------------------------

/// `hello` with `token`: the `unauthorized` error's message (the connection then closes).
async fn hello_refusal(gw: &TestGateway, token: String) -> String {
    let mut conn = raw_open(gw, &["ferry.v1.msgpack"]).await;
    let hello = ClientFrame::Hello {
        token: Some(token),
        last_seq: 0,
        epoch: None,
        device: None,
    };
    conn.send_frame(&hello).await.expect("hello");
    let (message, _, _) = expect_error(&mut conn, ErrorCode::Unauthorized).await;
    expect_closed(&mut conn, 1008).await;
    message
}

async fn auth_failures(gw: &TestGateway, at: &str, reason: &str) -> f64 {
    let series = format!("ferry_auth_failures_total{{at=\"{at}\",reason=\"{reason}\"}}");
    metric(gw, &series).await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_failures_say_only_unauthorized() {
    let gw = TestGateway::start(EngineKind::Embedded).await;
    let cases = [
        (
            "bad_signature",
            sign("another-secret-of-at-least-32-bytes", "alice", in_an_hour()),
        ),
        ("expired", sign(SECRET, "alice", 1_000_000)),
        ("malformed", "not.a.jwt".to_owned()),
        ("claims", sign(SECRET, "no spaces allowed", in_an_hour())),
    ];
    for (reason, token) in cases {
        let before = auth_failures(&gw, "hello", reason).await;
        assert_eq!(hello_refusal(&gw, token).await, "unauthorized", "{reason}");
        let after = auth_failures(&gw, "hello", reason).await;
        assert!(after > before, "{reason} counted: {before} -> {after}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_say_only_unauthorized() {
    let gw = TestGateway::start(EngineKind::Embedded).await;
    let (mut conn, _) = gw.raw("alice").await;
    let before = auth_failures(&gw, "auth", "expired").await;
    let expired = sign(SECRET, "alice", 1_000_000);
    conn.send_frame(&ClientFrame::Auth { token: expired })
        .await
        .expect("auth");
    let (message, _, _) = expect_error(&mut conn, ErrorCode::Unauthorized).await;
    assert_eq!(message, "unauthorized");
    assert!(auth_failures(&gw, "auth", "expired").await > before);
    // Refused, nothing changed: the session goes on.
    ping_pong(&mut conn).await;
}

#[test]
fn every_auth_failure_has_a_bounded_reason_and_one_client_message() {
    let mut config = Config::for_tests();
    config.dev = false;
    config.jwt_secret = Some(SECRET.into());
    let auth = Authenticator::from_config(&config).expect("authenticator");
    let alice = UserId::parse("alice").expect("user");
    assert!(
        auth.verify(&auth.mint_dev_token(&alice, WAIT).expect("mint"))
            .is_ok()
    );
    let other = sign("another-secret-of-at-least-32-bytes", "alice", in_an_hour());
    for (token, reason) in [
        ("", "missing"),
        ("x.y.z", "malformed"),
        (other.as_str(), "bad_signature"),
    ] {
        let e = auth.verify(token).expect_err("refused");
        assert_eq!(e.reason(), reason);
        assert_eq!(e.client_message(), "unauthorized");
    }
}

// --- L1: the admin port -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_caps_its_connections() {
    let gw = TestGateway::start_with(EngineKind::Embedded, |c| c.admin_max_connections = 4).await;
    // Four connections that never send a request hold every slot.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(gw.admin).await.expect("connect"));
    }
    // Each of them is accepted (in order) before the next one below.
    for _ in 0..3 {
        let mut extra = TcpStream::connect(gw.admin).await.expect("connect");
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), extra.read_to_end(&mut answer))
            .await
            .expect("closed at once, not kept waiting");
        assert!(
            answer.is_empty() || read.is_err(),
            "served beyond the cap: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    // A slot freed is a slot served.
    drop(idle.pop());
    eventually("the admin port serves again", || async {
        gw.get("/healthz")
            .await
            .map(|(s, _)| s == 200)
            .unwrap_or(false)
    })
    .await;
}

/// `cmdstat_ping` calls in Redis's `INFO commandstats`.
fn redis_pings(gw: &TestGateway) -> u64 {
    let info: String =
        redis::from_redis_value(gw.redis().cmd(&["INFO", "commandstats"])).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_ping:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_does_not_ping_redis() {
    let gw = TestGateway::start(EngineKind::Redis).await;
    eventually("ready", || async {
        gw.get("/readyz")
            .await
            .map(|(s, _)| s == 200)
            .unwrap_or(false)
    })
    .await;
    let before = redis_pings(&gw);
    for _ in 0..50 {
        assert_eq!(gw.get("/readyz").await.expect("readyz").0, 200);
    }
    let pings = redis_pings(&gw) - before;
    assert!(pings < 10, "{pings} PINGs for 50 /readyz");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_watchdogs_last_check() {
    // A long grace: readiness must fail at the first failed check, not at the outage.
    let gw = TestGateway::start_with(EngineKind::Redis, |c| {
        c.store_check = Duration::from_millis(100);
        c.store_timeout = Duration::from_millis(300);
        c.store_outage_grace = Duration::from_secs(60);
    })
    .await;
    eventually("ready", || async {
        gw.get("/readyz")
            .await
            .map(|(s, _)| s == 200)
            .unwrap_or(false)
    })
    .await;
    gw.redis().pause();
    // Answered at once from the last result, never after a store timeout of its own.
    for _ in 0..5 {
        let asked = Instant::now();
        gw.get("/readyz").await.expect("readyz");
        let took = asked.elapsed();
        assert!(took < Duration::from_millis(250), "readyz took {took:?}");
    }
    eventually("unready after a failed check", || async {
        gw.get("/readyz")
            .await
            .map(|(s, _)| s == 503)
            .unwrap_or(false)
    })
    .await;
    let (_, body) = gw.get("/readyz").await.expect("readyz");
    assert_eq!(body, "store unreachable\n");
    gw.redis().resume();
    eventually("ready again", || async {
        gw.get("/readyz")
            .await
            .map(|(s, _)| s == 200)
            .unwrap_or(false)
    })
    .await;
    let (mut conn, _) = gw.raw("after-pause").await;
    ping_pong(&mut conn).await;
}
