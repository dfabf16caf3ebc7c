//! The server HTTP API (docs/openapi.yaml) against a real gateway: publishes are stored and
//! delivered like `send`s (live, on resume, idempotent per recipient, one answer per recipient),
//! inboxes and devices are read and managed, keys and user tokens are not interchangeable, each
//! key has its own rate, bad input is refused with the documented status, and every documented
//! route is served (and every served route documented).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use ferry_gateway::{Config, Listeners};
use ferry_shared::client::RawConnection;
use ferry_shared::{ClientFrame, ErrorCode, ServerFrame};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// API keys of the tests (at least 32 bytes each).
const KEY: &str = "ferry-test-api-key-0123456789abcdef";
const OTHER_KEY: &str = "ferry-test-api-key-rotated-9876543210";

/// A gateway with the API on and `KEY` (named `backend`) configured.
async fn api_gateway(kind: EngineKind, tweak: impl FnOnce(&mut Config)) -> TestGateway {
    TestGateway::start_with(kind, |c| {
        with_api(c, &[("backend", KEY)]);
        tweak(c);
    })
    .await
}

/// An API answer: status, headers (lower-case names) and the JSON body (`Null` when empty).
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    json: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `error.code` of an error answer.
    fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or_default()
    }

    fn message(&self) -> &str {
        self.json["error"]["message"].as_str().unwrap_or_default()
    }

    /// The answer must be `status` with `error.code` `code`.
    fn refused(&self, status: u16, code: &str) -> &Self {
        assert_eq!((self.status, self.code()), (status, code), "{self:?}");
        self
    }
}

/// Writes `request` (head and body, on a connection of its own) and reads the whole answer.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect to the API");
    stream.write_all(request).await.expect("write the request");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("the API answers in time")
        .expect("read the answer");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = &raw[split + 4..];
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let json = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "answer body is not JSON ({e}): {}",
                String::from_utf8_lossy(body)
            )
        })
    };
    Answer {
        status,
        headers,
        json,
    }
}

/// `method path` with `key` as the bearer token (none with `None`) and `body` as raw bytes.
async fn call_raw(
    gateway: &TestGateway,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> Answer {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    exchange(gateway.api.expect("the API is on"), &request).await
}

/// `method path` with `KEY`, and `body` as JSON when given.
async fn call(gateway: &TestGateway, method: &str, path: &str, body: Option<Value>) -> Answer {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    call_raw(gateway, method, path, Some(KEY), body.as_bytes()).await
}

/// `POST /v1/messages` with `key`.
async fn publish_with(gateway: &TestGateway, key: &str, request: Value) -> Answer {
    let body = request.to_string();
    call_raw(gateway, "POST", "/v1/messages", Some(key), body.as_bytes()).await
}

async fn publish(gateway: &TestGateway, request: Value) -> Answer {
    publish_with(gateway, KEY, request).await
}

/// The next `msg` on `conn` (other frames are skipped): (seq, from, id, body).
async fn next_msg(conn: &mut RawConnection) -> (u64, String, String, Vec<u8>) {
    loop {
        if let ServerFrame::Msg {
            seq,
            from,
            id,
            body,
            ..
        } = next_frame(conn).await
        {
            return (seq, from, id, body.0.to_vec());
        }
    }
}

every_engine! {
    // A publish is stored and delivered live, then again on a resume from 0: it is in the inbox.
    async fn a_publish_is_delivered_live_and_stored(kind: EngineKind) {
        let gw = api_gateway(kind, |_| {}).await;
        let (mut bob, welcome) = gw.raw("bob").await;
        let answer = publish(&gw, json!({"id": "n-1", "to": "bob", "body": "hi bob"})).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert_eq!(answer.json, json!({"results": [{"to": "bob", "seq": 1, "duplicate": false}]}));
        let live = next_msg(&mut bob).await;
        assert_eq!(live, (1, "app".into(), "n-1".into(), b"hi bob".to_vec()));

        let answer = publish(&gw, json!({"id": "n-2", "to": ["bob"], "from": "bots", "body": "2"}))
            .await;
        assert_eq!(answer.json["results"][0]["seq"], 2, "{answer:?}");
        assert_eq!(next_msg(&mut bob).await.1, "bots");
        drop(bob);

        let (mut again, _) = gw.raw_resume("bob", 0, Some(&epoch_of(&welcome))).await;
        assert_eq!(next_msg(&mut again).await, live);
        assert_eq!(next_msg(&mut again).await.2, "n-2");
    }

    // The recipient policy binds clients' sends, not the backend: under `--recipients known`
    // and a share of one message, the API publishes to a user who never connected, twice.
    async fn a_publish_is_not_bound_by_the_recipient_policy(kind: EngineKind) {
        let gw = api_gateway(kind, |c| {
            c.recipients = ferry_gateway::config::Recipients::Known;
            c.max_inbox = 2;
            c.max_inbox_share = 0.5;
        })
        .await;
        for (id, seq) in [("p-1", 1), ("p-2", 2)] {
            let answer = publish(&gw, json!({"id": id, "to": "newcomer", "body": "hi"})).await;
            assert_eq!(answer.json["results"][0]["seq"], seq, "{answer:?}");
        }
    }

    // One publish to 1,000 users: each gets its own answer in the request's order; the one
    // whose inbox is full gets `inbox_full`, the rest are stored. Repeated, every stored one is
    // a duplicate with its original seq.
    async fn a_publish_to_a_thousand_users_answers_each(kind: EngineKind) {
        let gw = api_gateway(kind, |c| c.max_inbox = 2).await;
        for id in ["f-1", "f-2"] {
            let answer = publish(&gw, json!({"id": id, "to": "full", "body": "x"})).await;
            assert!(answer.json["results"][0]["seq"].is_u64(), "{answer:?}");
        }
        let mut to: Vec<String> = (0..999).map(|i| format!("user-{i}")).collect();
        to.insert(500, "full".into());
        let request = json!({"id": "group-1", "to": to, "body": "to everyone"});

        let first = publish(&gw, request.clone()).await;
        assert_eq!(first.status, 200);
        let results = first.json["results"].as_array().expect("results").clone();
        assert_eq!(results.len(), 1000);
        for (result, user) in results.iter().zip(&to) {
            assert_eq!(result["to"], user.as_str());
            if user == "full" {
                assert_eq!(result["error"]["code"], "inbox_full", "{result}");
                assert!(result["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            } else {
                assert_eq!(result, &json!({"to": user, "seq": 1, "duplicate": false}));
            }
        }

        let second = publish(&gw, request).await;
        let again = second.json["results"].as_array().expect("results");
        for (again, first) in again.iter().zip(&results) {
            if first["to"] == "full" {
                assert_eq!(again["error"]["code"], "inbox_full");
            } else {
                assert_eq!(again["seq"], first["seq"]);
                assert_eq!(again["duplicate"], true, "{again}");
            }
        }
        let (mut user, _) = gw.raw("user-998").await;
        assert_eq!(next_msg(&mut user).await.2, "group-1");
        no_message(&mut user, Duration::from_millis(200)).await;
    }

    // A recipient named twice in one call is a duplicate the second time.
    async fn a_recipient_named_twice_is_a_duplicate(kind: EngineKind) {
        let gw = api_gateway(kind, |_| {}).await;
        let to = ["twice", "other", "twice"];
        let answer = publish(&gw, json!({"id": "t-1", "to": to, "body": "x"})).await;
        assert_eq!(
            answer.json["results"],
            json!([
                {"to": "twice", "seq": 1, "duplicate": false},
                {"to": "other", "seq": 1, "duplicate": false},
                {"to": "twice", "seq": 1, "duplicate": true},
            ])
        );
    }

    // The inbox's state, then its erasure: it is gone, and its connected session is sent away
    // to reconnect into a new epoch.
    async fn inbox_info_and_erasure(kind: EngineKind) {
        let gw = api_gateway(kind, |c| c.position_check = Duration::from_millis(200))
            .await;
        call(&gw, "GET", "/v1/users/carol/inbox", None).await.refused(404, "not_found");
        let (mut carol, welcome) = gw.raw("carol").await;
        for id in ["c-1", "c-2"] {
            let answer = publish(&gw, json!({"id": id, "to": "carol", "body": "x"})).await;
            assert_eq!(answer.status, 200);
        }
        assert_eq!(raw_messages(&mut carol, 2).await.len(), 2);
        let answer = call(&gw, "GET", "/v1/users/carol/inbox", None).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let epoch = epoch_of(&welcome);
        assert_eq!(
            answer.json,
            json!({"user": "carol", "epoch": epoch, "head": 2, "floor": 0, "oldest": 1, "count": 2})
        );

        let answer = call(&gw, "DELETE", "/v1/users/carol/inbox", None).await;
        assert_eq!((answer.status, &answer.json), (200, &json!({"deleted": true})));
        call(&gw, "GET", "/v1/users/carol/inbox", None).await.refused(404, "not_found");
        loop {
            match next_frame(&mut carol).await {
                ServerFrame::Reconnect { .. } => break,
                ServerFrame::Msg { seq, .. } => panic!("message {seq} after the erasure"),
                _ => continue,
            }
        }
        assert_eq!(expect_close(&mut carol).await, Some(1012));
        let (_, again) = gw.raw_resume("carol", 2, Some(&epoch)).await;
        assert_ne!(epoch_of(&again), epoch);

        let answer = call(&gw, "DELETE", "/v1/users/nobody/inbox", None).await;
        assert_eq!((answer.status, &answer.json), (200, &json!({"deleted": false})));
    }

    // A device that said `hello` is listed; removed, it is gone; removed again, 404.
    async fn devices_are_listed_and_removed(kind: EngineKind) {
        let gw = api_gateway(kind, |_| {}).await;
        let answer = call(&gw, "GET", "/v1/users/dave/devices", None).await;
        assert_eq!((answer.status, &answer.json), (200, &json!({"devices": []})));
        let (_phone, _) = gw.raw_device_hello(gw.token("dave"), 0, None, Some("phone")).await;
        let answer = call(&gw, "GET", "/v1/users/dave/devices", None).await;
        let devices = answer.json["devices"].as_array().expect("devices").clone();
        let phone = devices
            .iter()
            .find(|d| d["device"] == "phone")
            .unwrap_or_else(|| panic!("phone in {devices:?}"));
        assert_eq!((&phone["acked"], &phone["holding"]), (&json!(0), &json!(true)));
        let now_ms = jsonwebtoken::get_current_timestamp() * 1000;
        let seen = phone["last_seen_ms"].as_u64().expect("last_seen_ms");
        assert!(seen + 60_000 > now_ms && seen < now_ms + 60_000, "{seen} vs {now_ms}");

        let answer = call(&gw, "DELETE", "/v1/users/dave/devices/phone", None).await;
        assert_eq!((answer.status, &answer.json), (204, &Value::Null));
        let answer = call(&gw, "GET", "/v1/users/dave/devices", None).await;
        assert!(!answer.json.to_string().contains("\"phone\""), "{answer:?}");
        call(&gw, "DELETE", "/v1/users/dave/devices/phone", None).await.refused(404, "not_found");
        let answer = call(&gw, "DELETE", "/v1/users/dave/devices/a%20b", None).await;
        answer.refused(400, "invalid");
        assert!(answer.message().contains("device"), "{answer:?}");
    }
}

both_engines! {
    // `body_b64` carries any bytes; a body over --max-body-bytes (after decoding) and a request
    // over the read limit are 413.
    async fn binary_bodies_and_size_limits(kind: EngineKind) {
        let gw = api_gateway(kind, |c| c.max_body_bytes = 1024).await;
        let (mut bob, _) = gw.raw("bob").await;
        let bytes = vec![0xff, 0x00, 0xfe, 0x80, b'x'];
        let answer = publish(&gw, json!({"id": "b-1", "to": "bob", "body_b64": B64.encode(&bytes)}))
            .await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(next_msg(&mut bob).await.3, bytes);

        let fits = "x".repeat(1024);
        assert_eq!(publish(&gw, json!({"id": "b-2", "to": "bob", "body": fits})).await.status, 200);
        let over = "x".repeat(1025);
        publish(&gw, json!({"id": "b-3", "to": "bob", "body": over.clone()}))
            .await
            .refused(413, "too_large");
        publish(&gw, json!({"id": "b-4", "to": "bob", "body_b64": B64.encode(over)}))
            .await
            .refused(413, "too_large");

        // Past the read limit: refused from the declared length, before the body is read...
        let limit = ferry_gateway::api::body_limit(&gw.config);
        let api = gw.api.expect("the API is on");
        let head = format!(
            "POST /v1/messages HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Length: {}\r\n\r\n",
            limit + 1
        );
        let answer = exchange(api, head.as_bytes()).await;
        answer.refused(413, "too_large");
        assert_eq!(answer.header("connection"), Some("close"));
        // ...or while it is read, without a length.
        let mut chunked = format!(
            "POST /v1/messages HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            limit + 1
        )
        .into_bytes();
        chunked.extend(std::iter::repeat_n(b' ', limit + 1));
        exchange(api, &chunked).await.refused(413, "too_large");
        // Only the body that fits was stored.
        let (seq, _, id, _) = next_msg(&mut bob).await;
        assert_eq!((seq, id.as_str()), (2, "b-2"));
        no_message(&mut bob, Duration::from_millis(200)).await;
    }

    // An API key is not a user token and a user token is not an API key; no key or a wrong one
    // is refused with `WWW-Authenticate: Bearer`.
    async fn keys_and_user_tokens_are_not_interchangeable(kind: EngineKind) {
        let gw = api_gateway(kind, |_| {}).await;
        let mut conn = raw_open(&gw, &["ferry.v1.msgpack"]).await;
        let hello = ClientFrame::Hello {
            token: Some(KEY.into()),
            last_seq: 0,
            epoch: None,
            device: None,
        };
        conn.send_frame(&hello).await.expect("send hello");
        expect_error(&mut conn, ErrorCode::Unauthorized).await;
        expect_closed(&mut conn, 1008).await;

        let request = json!({"id": "u-1", "to": "bob", "body": "x"}).to_string();
        let user_token = gw.token("alice");
        let presented = [
            (Some(user_token.as_str()), "user token"),
            (None, "Authorization"),
            (Some(&KEY[..KEY.len() - 1]), "unknown"),
            (Some(OTHER_KEY), "unknown"),
        ];
        for (key, says) in presented {
            let answer = call_raw(&gw, "POST", "/v1/messages", key, request.as_bytes()).await;
            answer.refused(401, "unauthorized");
            assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
            assert!(answer.message().contains(says), "{answer:?}");
            assert!(!answer.message().contains(KEY) && !answer.message().contains(&user_token));
        }
        let answer = call_raw(&gw, "GET", "/v1/users/bob/inbox", None, b"").await;
        answer.refused(401, "unauthorized");
        let basic = format!(
            "GET /v1/users/bob/inbox HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
             Authorization: Basic {KEY}\r\n\r\n"
        );
        exchange(gw.api.expect("api"), basic.as_bytes()).await.refused(401, "unauthorized");
        let refused = metric(&gw, "ferry_api_refusals_total{reason=\"user_token\"}").await;
        assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
    }

    // Two keys are valid at once (rotation), each with its own bucket; a call the bucket cannot
    // pay for whole is refused with 429 and Retry-After, and costs nothing.
    async fn two_keys_with_their_own_rates(kind: EngineKind) {
        let gw = TestGateway::start_with(kind, |c| {
            with_api(c, &[("old", KEY), ("new", OTHER_KEY)]);
            c.api_rate = 1.0;
            c.api_burst = Some(3);
            c.api_max_recipients = 3;
        })
        .await;
        let three = json!({"id": "r-1", "to": ["a", "b", "c"], "body": "x"});
        assert_eq!(publish_with(&gw, KEY, three.clone()).await.status, 200);
        let answer = publish_with(&gw, KEY, json!({"id": "r-2", "to": "a", "body": "x"})).await;
        answer.refused(429, "rate_limited");
        assert_eq!(answer.header("retry-after"), Some("1"));
        let retry = answer.json["error"]["retry_after_ms"].as_u64().expect("retry_after_ms");
        assert!((1..=1000).contains(&retry), "{retry}");

        let answer = publish_with(&gw, OTHER_KEY, three).await;
        assert_eq!(answer.status, 200, "the other key has its own bucket");
        // Dedupe is per (from, to, id), whichever key publishes.
        assert_eq!(answer.json["results"][0]["duplicate"], true, "{answer:?}");
        let answer = publish_with(&gw, OTHER_KEY, json!({"id": "r-3", "to": "a", "body": "x"}))
            .await;
        answer.refused(429, "rate_limited");
        let answer = call_raw(&gw, "GET", "/v1/users/a/inbox", Some(OTHER_KEY), b"").await;
        answer.refused(429, "rate_limited");
        // Four recipients are more than --api-max-recipients, whatever the bucket holds.
        let four = json!({"id": "r-4", "to": ["a", "b", "c", "d"], "body": "x"});
        publish_with(&gw, KEY, four).await.refused(400, "invalid");
    }

    // Bad input gets the documented status and code, and the API goes on serving.
    async fn bad_input_is_refused(kind: EngineKind) {
        let gw = api_gateway(kind, |_| {}).await;
        let post = |body: String| {
            let gw = &gw;
            async move { call_raw(gw, "POST", "/v1/messages", Some(KEY), body.as_bytes()).await }
        };
        let shapes = ["", "not json", "{\"id\": \"n\"", "[]", r#"{"id":5,"to":"a","body":"x"}"#];
        for body in shapes {
            post(body.to_owned()).await.refused(400, "bad_request");
        }
        let many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
        let invalid = [
            (json!({"id": "n", "to": many, "body": "x"}), "to"),
            (json!({"id": "n", "to": [], "body": "x"}), "to"),
            (json!({"id": "a b", "to": "a", "body": "x"}), "id"),
            (json!({"id": "n", "to": ["a", "b/c"], "body": "x"}), "to[1]"),
            (json!({"id": "n", "to": "a", "from": "x y", "body": "x"}), "from"),
            (json!({"id": "n", "to": "a", "body": "x", "body_b64": "eA=="}), "body_b64"),
            (json!({"id": "n", "to": "a", "body_b64": "not base64!"}), "body_b64"),
            (json!({"id": "n", "to": "a", "body": ""}), "body"),
        ];
        for (request, field) in invalid {
            let answer = post(request.to_string()).await;
            answer.refused(400, "invalid");
            assert!(answer.message().starts_with(field), "{field}: {answer:?}");
        }
        let answer = call(&gw, "GET", "/v1/users/a%20b/inbox", None).await;
        answer.refused(400, "invalid");
        assert!(answer.message().starts_with("user"), "{answer:?}");
        call(&gw, "GET", "/v1/nothing", None).await.refused(404, "not_found");
        call(&gw, "GET", "/v1/users/a/inbox/x", None).await.refused(404, "not_found");
        for (method, path, allow) in [
            ("GET", "/v1/messages", "POST"),
            ("PUT", "/v1/users/a/inbox", "GET, DELETE"),
            ("POST", "/v1/users/a/devices", "GET"),
            ("GET", "/v1/users/a/devices/phone", "DELETE"),
        ] {
            let answer = call(&gw, method, path, None).await;
            answer.refused(405, "method_not_allowed");
            assert_eq!(answer.header("allow"), Some(allow));
        }
        // A head over hyper's buffer: 431, from hyper itself.
        let huge = format!(
            "GET /v1/users/a/inbox HTTP/1.1\r\nHost: t\r\nX-Junk: {}\r\n\r\n",
            "j".repeat(128 * 1024)
        );
        let mut stream = TcpStream::connect(gw.api.expect("api")).await.expect("connect");
        let _ = stream.write_all(huge.as_bytes()).await;
        let mut answer = vec![0; 64];
        let n = tokio::time::timeout(WAIT, stream.read(&mut answer)).await.expect("answered");
        let head = String::from_utf8_lossy(&answer[..n.unwrap_or(0)]).into_owned();
        assert!(head.is_empty() || head.starts_with("HTTP/1.1 431"), "{head}");

        let answer = publish(&gw, json!({"id": "after", "to": "a", "body": "still serving"})).await;
        assert_eq!(answer.status, 200, "{answer:?}");
    }

    // Every (path, method) docs/openapi.yaml documents answers one of its documented statuses
    // (with a key, and 401 without), and the documented routes are exactly the served ones.
    async fn every_documented_route_is_served(kind: EngineKind) {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
        let doc = std::fs::read_to_string(path).expect("read docs/openapi.yaml");
        let operations = documented_operations(&doc);
        let documented: BTreeSet<(String, String)> =
            operations.iter().map(|(m, p, _)| (m.clone(), p.clone())).collect();
        let served: BTreeSet<(String, String)> = ferry_gateway::api::ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(documented, served, "documented vs served routes");

        let gw = api_gateway(kind, |_| {}).await;
        for (method, path, statuses) in &operations {
            let concrete = path.replace("{user}", "alice").replace("{device}", "phone");
            let publish = json!({"id": "doc-1", "to": "alice", "body": "hi"});
            let body = (method == "POST").then_some(publish);
            let answer = call(&gw, method, &concrete, body).await;
            assert!(
                statuses.contains(&answer.status),
                "{method} {path}: {answer:?} not in {statuses:?}"
            );
            let unauthorized = call_raw(&gw, method, &concrete, None, b"").await;
            assert_eq!(unauthorized.status, 401, "{method} {path}");
            assert!(statuses.contains(&401), "{method} {path} documents 401");
        }
    }

    // When the node drains, the API stops accepting.
    async fn the_api_stops_when_the_node_drains(kind: EngineKind) {
        let gw = api_gateway(kind, |c| c.drain_timeout = Duration::ZERO).await;
        let api = gw.api.expect("api");
        assert_eq!(call(&gw, "GET", "/v1/users/a/devices", None).await.status, 200);
        gw.begin_drain();
        eventually("the API listener closed", || async {
            TcpStream::connect(api).await.is_err()
        })
        .await;
    }
}

/// (METHOD, path template, documented statuses) of every operation under `paths:`, by a line
/// scan of the document's layout: paths at indent 2, methods at 4, `responses:` at 6, statuses
/// (quoted) at 8.
fn documented_operations(doc: &str) -> Vec<(String, String, Vec<u16>)> {
    const METHODS: [&str; 7] = ["get", "put", "post", "delete", "patch", "head", "options"];
    let mut operations: Vec<(String, String, Vec<u16>)> = Vec::new();
    let (mut in_paths, mut path, mut in_responses) = (false, None::<String>, false);
    for line in doc.lines() {
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent == 0 {
            in_paths = text == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        match indent {
            2 => path = text.strip_suffix(':').map(str::to_owned),
            4 => {
                in_responses = false;
                let method = text.strip_suffix(':').filter(|m| METHODS.contains(m));
                if let (Some(path), Some(method)) = (&path, method) {
                    operations.push((method.to_uppercase(), path.clone(), Vec::new()));
                }
            }
            6 => in_responses = text == "responses:",
            8 if in_responses => {
                let status = text.strip_prefix('"').and_then(|t| t.strip_suffix("\":"));
                if let (Some(status), Some(operation)) = (status, operations.last_mut()) {
                    operation.2.push(status.parse().expect("a numeric status"));
                }
            }
            _ => {}
        }
    }
    assert!(!operations.is_empty(), "no operation found under paths:");
    for (method, path, statuses) in &operations {
        assert!(!statuses.is_empty(), "{method} {path} documents no status");
    }
    operations
}

// A keys file the gateway cannot use stops it at start, with an error that names the line and
// not the secret; and `run` (without an API listener) refuses a config that turns the API on.
#[tokio::test]
async fn a_bad_keys_file_refuses_start() {
    let secret = "too-short-secret";
    let mut config = test_config();
    with_api(&mut config, &[("backend", secret)]);
    let bind = || TcpListener::bind("127.0.0.1:0");
    let listeners = Listeners {
        ws: bind().await.expect("bind"),
        admin: bind().await.expect("bind"),
        api: Some(bind().await.expect("bind")),
    };
    let run = ferry_gateway::run_with(listeners, config.clone(), CancellationToken::new());
    let err = tokio::time::timeout(WAIT, run)
        .await
        .expect("refused at once")
        .expect_err("a short secret is refused");
    let text = err.to_string();
    assert!(text.contains("--api-keys-file line 1"), "{text}");
    assert!(
        !text.contains(secret) && !format!("{err:?}").contains(secret),
        "{text}"
    );

    let run = ferry_gateway::run(
        bind().await.expect("bind"),
        bind().await.expect("bind"),
        config.clone(),
        CancellationToken::new(),
    );
    let err = tokio::time::timeout(WAIT, run)
        .await
        .expect("refused at once")
        .expect_err("no API listener for --api-listen");
    assert!(err.to_string().contains("api-listen"), "{err}");
    if let Some(path) = &config.api_keys_file {
        let _ = std::fs::remove_file(path);
    }
}
