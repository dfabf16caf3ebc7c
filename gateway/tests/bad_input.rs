//! Bad input at every layer (upgrade, hello, frames, values, limits) gets exactly the error and
//! close code of `PROTOCOL.md`, and never disturbs another connection on the same gateway.

mod common;

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use ferry_shared::client::{ClientError, RawConnection, RawEvent};
use ferry_shared::{Body, ClientFrame, ErrorCode, ServerFrame};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const MSGPACK: &str = "ferry.v1.msgpack";
const JSON: &str = "ferry.v1.json";

/// Bytes no MessagePack decoder accepts (0xc1 is never used).
const JUNK: &[u8] = b"\xc1\xff\x00garbage\x93";

/// A connection of another user, opened before the bad input, that must still be served after
/// it; `check` also opens a fresh connection.
struct Bystander {
    conn: RawConnection,
}

impl Bystander {
    async fn open(gateway: &TestGateway) -> Self {
        let (conn, _) = gateway.raw("bystander").await;
        Self { conn }
    }

    async fn check(mut self, gateway: &TestGateway) {
        ping_pong(&mut self.conn).await;
        raw_send(&mut self.conn, "after-bad-input", "bystander-peer", "ok").await;
        let (mut fresh, _) = gateway.raw("newcomer").await;
        ping_pong(&mut fresh).await;
    }
}

/// A connection that said `hello` with `token` (or none) and has not read the answer.
async fn hello_with(gateway: &TestGateway, token: Option<String>) -> RawConnection {
    let mut conn = raw_open(gateway, &[MSGPACK]).await;
    let hello = ClientFrame::Hello {
        token,
        last_seq: 0,
        epoch: None,
        device: None,
    };
    conn.send_frame(&hello).await.expect("send hello");
    conn
}

/// A JSON connection that said `hello` (as literal JSON text) and read `welcome`.
async fn raw_json(gateway: &TestGateway, user: &str) -> RawConnection {
    let mut conn = raw_open(gateway, &[JSON]).await;
    assert_eq!(conn.subprotocol(), Some(JSON));
    let hello = json!({ "type": "hello", "token": gateway.token(user) });
    conn.send_text(hello.to_string()).await.expect("send hello");
    match next_frame(&mut conn).await {
        ServerFrame::Welcome { user: got, .. } => assert_eq!(got, user),
        other => panic!("expected welcome, got {other:?}"),
    }
    conn
}

/// A MessagePack map of string keys to string values, written by hand so that tests can send
/// frames the client's types cannot express.
fn msgpack_map(pairs: &[(&str, &str)]) -> Vec<u8> {
    fn push_str(out: &mut Vec<u8>, s: &str) {
        let len = u8::try_from(s.len()).expect("short strings only");
        assert!(len < 32, "fixstr only");
        out.push(0xa0 | len);
        out.extend_from_slice(s.as_bytes());
    }
    let len = u8::try_from(pairs.len()).expect("small maps only");
    assert!(len < 16, "fixmap only");
    let mut out = vec![0x80 | len];
    for (key, value) in pairs {
        push_str(&mut out, key);
        push_str(&mut out, value);
    }
    out
}

/// Waits `d` and not a millisecond more, as a client with a precise timer would: tokio's
/// `sleep` rounds up to its 1 ms tick, which would hide a `retry_after_ms` that is too short.
async fn wait_exactly(d: Duration) {
    let until = tokio::time::Instant::now() + d;
    tokio::time::sleep(d.saturating_sub(Duration::from_millis(2))).await;
    while tokio::time::Instant::now() < until {
        tokio::task::yield_now().await;
    }
}

fn sign_hs256(secret: &str, claims: &serde_json::Value) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).expect("sign")
}

fn claims(user: &str, exp: u64) -> serde_json::Value {
    json!({ "sub": user, "iat": jsonwebtoken::get_current_timestamp(), "exp": exp })
}

fn in_an_hour() -> u64 {
    jsonwebtoken::get_current_timestamp() + 3600
}

/// Sends `frame` and expects an `error` with `code` carrying the send's id; the connection
/// stays open (a ping is still answered).
async fn send_refused(conn: &mut RawConnection, frame: ClientFrame, code: ErrorCode) -> String {
    let ClientFrame::Send { id, .. } = &frame else {
        panic!("send_refused takes a send")
    };
    let id = id.clone();
    conn.send_frame(&frame).await.expect("send");
    let (message, got_id, _) = expect_error(conn, code).await;
    let got_id = got_id.expect("the error names the send");
    if id.len() <= 64 {
        assert_eq!(got_id, id, "the error names the send");
    } else {
        // An id too long to be valid is echoed cut to a valid id's length (issue 13, H1).
        assert!(got_id.len() <= 64, "echoed {} bytes", got_id.len());
        let kept = got_id.trim_end_matches('…');
        assert!(id.starts_with(kept), "{got_id} is a prefix of the id");
    }
    ping_pong(conn).await;
    message
}

both_engines! {
    async fn junk_bytes_after_hello_are_a_bad_frame(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let (mut conn, _) = gateway.raw("junk").await;
        conn.send_binary(JUNK).await.expect("send junk");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    async fn junk_bytes_instead_of_hello_are_a_bad_frame(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let mut conn = raw_open(&gateway, &[MSGPACK]).await;
        conn.send_binary(JUNK).await.expect("send junk");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    async fn text_on_a_msgpack_connection_is_a_bad_frame(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let (mut conn, _) = gateway.raw("texter").await;
        conn.send_text(r#"{"type":"ping"}"#).await.expect("send text");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    async fn binary_on_a_json_connection_is_a_bad_frame(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let mut conn = raw_json(&gateway, "binary-on-json").await;
        // A well-formed MessagePack ping: only its kind is wrong.
        conn.send_binary(msgpack_map(&[("type", "ping")])).await.expect("send binary");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    async fn a_frame_before_hello_is_unauthorized(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let mut conn = raw_open(&gateway, &[MSGPACK]).await;
        conn.send_frame(&send_frame("early", "someone", "hi")).await.expect("send");
        expect_error(&mut conn, ErrorCode::Unauthorized).await;
        expect_closed(&mut conn, 1008).await;

        let mut conn = raw_open(&gateway, &[MSGPACK]).await;
        conn.send_frame(&ClientFrame::Ping).await.expect("ping");
        expect_error(&mut conn, ErrorCode::Unauthorized).await;
        expect_closed(&mut conn, 1008).await;

        // `auth` is not `hello`, even with a good token.
        let mut conn = raw_open(&gateway, &[MSGPACK]).await;
        let auth = ClientFrame::Auth { token: gateway.token("early") };
        conn.send_frame(&auth).await.expect("auth");
        expect_error(&mut conn, ErrorCode::Unauthorized).await;
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    async fn an_unknown_type_is_a_bad_frame(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let (mut conn, _) = gateway.raw("unknown-type").await;
        conn.send_binary(msgpack_map(&[("type", "subscribe")])).await.expect("send");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;

        let mut conn = raw_json(&gateway, "unknown-type-json").await;
        conn.send_text(r#"{"type":"subscribe","to":"x"}"#).await.expect("send");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    // Issue 13, M3: a frame may not hold more array elements and map entries (1,024) or nest
    // deeper (16) than a frame ever needs, even in a field the frame ignores.
    async fn msgpack_over_the_element_or_depth_bound_is_a_bad_frame(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        // `{"type":"ping","x":[nil × 500,000]}`: once a ping.
        let (mut conn, _) = gateway.raw("many-nils").await;
        let mut nils = b"\x82\xa4type\xa4ping\xa1x\xdd".to_vec();
        nils.extend_from_slice(&500_000u32.to_be_bytes());
        nils.resize(nils.len() + 500_000, 0xc0);
        conn.send_binary(nils).await.expect("send");
        let (message, ..) = expect_error(&mut conn, ErrorCode::BadFrame).await;
        assert_eq!(message, "undecodable frame: more than 1024 array elements and map entries");
        expect_closed(&mut conn, 1008).await;

        // A hello with an array nested 100,000 deep in a field it ignores.
        let mut conn = raw_open(&gateway, &[MSGPACK]).await;
        let mut deep = b"\x82\xa4type\xa5hello\xa1x".to_vec();
        deep.resize(deep.len() + 100_000, 0x91);
        deep.push(0xc0);
        conn.send_binary(deep).await.expect("send");
        let (message, ..) = expect_error(&mut conn, ErrorCode::BadFrame).await;
        assert_eq!(message, "undecodable frame: nested deeper than 16");
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    // The same bound in JSON: `{"type":"ping","x":[0,0,…]}` of 200,000 values, and an array
    // nested 100,000 deep in a hello.
    async fn json_over_the_element_or_depth_bound_is_a_bad_frame(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let mut conn = raw_json(&gateway, "many-zeros").await;
        let zeros = vec!["0"; 200_000].join(",");
        conn.send_text(format!(r#"{{"type":"ping","x":[{zeros}]}}"#)).await.expect("send");
        let (message, ..) = expect_error(&mut conn, ErrorCode::BadFrame).await;
        assert_eq!(message, "undecodable frame: more than 1024 array elements and map entries");
        expect_closed(&mut conn, 1008).await;

        let mut conn = raw_open(&gateway, &[JSON]).await;
        let deep = format!(r#"{{"type":"hello","x":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
        conn.send_text(deep).await.expect("send");
        let (message, ..) = expect_error(&mut conn, ErrorCode::BadFrame).await;
        assert_eq!(message, "undecodable frame: nested deeper than 16");
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    async fn a_missing_field_is_a_bad_frame(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        // A send without its body.
        let (mut conn, _) = gateway.raw("missing-body").await;
        let frame = msgpack_map(&[("type", "send"), ("id", "m1"), ("to", "someone")]);
        conn.send_binary(frame).await.expect("send");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;

        // An ack without its seq, in JSON.
        let mut conn = raw_json(&gateway, "missing-seq").await;
        conn.send_text(r#"{"type":"ack"}"#).await.expect("send");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;

        // An auth without its token, in JSON; one whose token is not a string.
        let mut conn = raw_json(&gateway, "auth-no-token").await;
        conn.send_text(r#"{"type":"auth"}"#).await.expect("send");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;
        let mut conn = raw_json(&gateway, "auth-number").await;
        conn.send_text(r#"{"type":"auth","token":7}"#).await.expect("send");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;

        // A frame without a type.
        let (mut conn, _) = gateway.raw("missing-type").await;
        conn.send_binary(msgpack_map(&[("id", "m1")])).await.expect("send");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    async fn an_expired_token_is_unauthorized(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        // A minute in the past: well beyond the 5 s leeway.
        let exp = jsonwebtoken::get_current_timestamp() - 60;
        let token = sign_hs256(SECRET, &claims("expired", exp));
        let mut conn = hello_with(&gateway, Some(token)).await;
        expect_error(&mut conn, ErrorCode::Unauthorized).await;
        expect_closed(&mut conn, 1008).await;

        // The same claims with a future exp are accepted: only the expiry was wrong.
        let token = sign_hs256(SECRET, &claims("expired", in_an_hour()));
        let mut conn = hello_with(&gateway, Some(token)).await;
        assert!(matches!(next_frame(&mut conn).await, ServerFrame::Welcome { .. }));
        bystander.check(&gateway).await;
    }

    async fn a_token_signed_with_another_key_is_unauthorized(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let other = "another-secret-of-at-least-32-bytes-long";
        let token = sign_hs256(other, &claims("forger", in_an_hour()));
        let mut conn = hello_with(&gateway, Some(token)).await;
        expect_error(&mut conn, ErrorCode::Unauthorized).await;
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    async fn an_alg_none_token_is_unauthorized(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims("mallory", in_an_hour()).to_string());
        let token = format!("{header}.{payload}.");
        let mut conn = hello_with(&gateway, Some(token)).await;
        expect_error(&mut conn, ErrorCode::Unauthorized).await;
        expect_closed(&mut conn, 1008).await;

        // Not a JWT at all.
        let mut conn = hello_with(&gateway, Some("not-a-jwt".into())).await;
        expect_error(&mut conn, ErrorCode::Unauthorized).await;
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    async fn a_message_over_max_frame_bytes_closes_with_1009(kind: EngineKind) {
        let gateway = TestGateway::start_with(kind, |c| {
            c.max_frame_bytes = 4096;
            c.max_body_bytes = 1024;
        })
        .await;
        let bystander = Bystander::open(&gateway).await;
        let (mut conn, _) = gateway.raw("big-frame").await;
        let body = Body(vec![b'x'; 6000].into());
        let frame = ClientFrame::Send { id: "big".into(), to: "someone".into(), body };
        conn.send_frame(&frame).await.expect("send");
        // An error frame may precede the close; if it does, it says too_large.
        loop {
            match conn.next_frame(WAIT).await.expect("a close in time") {
                RawEvent::Closed { code, reason } => {
                    assert_eq!(code, Some(1009), "close code (reason: {reason:?})");
                    break;
                }
                RawEvent::Frame(ServerFrame::Error { code, .. }) => {
                    assert_eq!(code, ErrorCode::TooLarge);
                }
                RawEvent::Frame(other) => {
                    panic!("expected a 1009 close, got {other:?}")
                }
            }
        }
        bystander.check(&gateway).await;
    }

    async fn a_body_over_max_body_bytes_is_too_large(kind: EngineKind) {
        let gateway = TestGateway::start_with(kind, |c| {
            c.max_frame_bytes = 4096;
            c.max_body_bytes = 1024;
        })
        .await;
        let bystander = Bystander::open(&gateway).await;
        let (mut conn, _) = gateway.raw("big-body").await;
        let body = Body(vec![b'x'; 1025].into());
        let frame = ClientFrame::Send { id: "big-1".into(), to: "someone".into(), body };
        send_refused(&mut conn, frame, ErrorCode::TooLarge).await;
        // Exactly at the limit is fine.
        let body = Body(vec![b'x'; 1024].into());
        let frame = ClientFrame::Send { id: "big-2".into(), to: "someone".into(), body };
        conn.send_frame(&frame).await.expect("send");
        assert!(matches!(next_frame(&mut conn).await, ServerFrame::Sent { seq: 1, .. }));
        bystander.check(&gateway).await;
    }

    async fn an_invalid_recipient_is_invalid(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let (mut conn, _) = gateway.raw("bad-recipient").await;
        for to in ["a b", "", "slash/ed", &"u".repeat(129)] {
            send_refused(&mut conn, send_frame("m1", to, "hi"), ErrorCode::Invalid).await;
        }
        raw_send(&mut conn, "m1", "good.recipient", "hi").await;
        bystander.check(&gateway).await;
    }

    async fn an_invalid_message_id_is_invalid(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let (mut conn, _) = gateway.raw("bad-id").await;
        for id in ["has space", "", "at@sign", &"i".repeat(65)] {
            send_refused(&mut conn, send_frame(id, "someone", "hi"), ErrorCode::Invalid).await;
        }
        raw_send(&mut conn, &"i".repeat(64), "someone", "hi").await;
        bystander.check(&gateway).await;
    }

    async fn an_empty_body_is_invalid(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let (mut conn, _) = gateway.raw("empty-body").await;
        send_refused(&mut conn, send_frame("m1", "someone", ""), ErrorCode::Invalid).await;
        assert_eq!(raw_send(&mut conn, "m1", "someone", "x").await, 1, "nothing was stored");
        bystander.check(&gateway).await;
    }

    async fn an_ack_beyond_what_was_delivered_is_clamped(kind: EngineKind) {
        // The recipient reads two messages and then stops reading while a flood arrives. Far
        // more is stored (~14 MiB) than the socket buffers and outbound queue hold (~5 MiB
        // measured on loopback), so much of it is stored but not delivered on this connection
        // when the recipient acks far beyond. Clamped, that ack removes only what was
        // delivered; unclamped, it would empty the inbox and lose the rest.
        const FLOOD: u64 = 300;
        let gateway = TestGateway::start_with(kind, |c| {
            c.send_rate = 10_000.0;
            c.send_burst = 10_000;
            c.store_bytes_rate = 1e9;
        })
        .await;
        let (mut sender, _) = gateway.raw("clamp-sender").await;
        let (mut slow, welcome) = gateway.raw("clamp-reader").await;
        let ServerFrame::Welcome { epoch, .. } = welcome else { unreachable!() };
        raw_send(&mut sender, "first", "clamp-reader", "1").await;
        raw_send(&mut sender, "second", "clamp-reader", "2").await;
        let got = raw_messages(&mut slow, 2).await;
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2]);

        let big = "b".repeat(48 * 1024);
        for i in 0..FLOOD {
            raw_send(&mut sender, &format!("flood-{i}"), "clamp-reader", &big).await;
        }
        slow.send_frame(&ClientFrame::Ack { seq: 1_000_000 }).await.expect("ack");
        // `slow` stays open: closing a socket with unread data resets the connection, and the
        // gateway could lose the ack still in its receive buffer.

        // Once the trim is done, the inbox starts after what the first connection delivered
        // (at least 2) and still holds the end of the flood.
        let last = FLOOD + 2;
        let deadline = tokio::time::Instant::now() + WAIT;
        let (mut reader, first) = loop {
            let (mut conn, _) = gateway.raw_resume("clamp-reader", 0, Some(&epoch)).await;
            let first = match conn.next_frame(WAIT).await {
                Ok(RawEvent::Frame(ServerFrame::Msg { seq, .. })) => seq,
                other => panic!(
                    "nothing left after acking 1000000 with at most {last} stored: the ack removed \
                     messages never delivered on its connection (not clamped): {other:?}"
                ),
            };
            if first > 2 {
                break (conn, first);
            }
            assert!(tokio::time::Instant::now() < deadline, "the ack never trimmed 1 and 2");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(first <= last, "first seq {first} after the ack");
        let rest = raw_messages(&mut reader, usize::try_from(last - first).unwrap()).await;
        let seqs: Vec<u64> = rest.iter().map(|m| m.0).collect();
        assert_eq!(seqs, (first + 1..=last).collect::<Vec<_>>(), "the unacked rest, in order");

        // And the next message still arrives after it.
        raw_send(&mut sender, "after", "clamp-reader", "3").await;
        assert_eq!(raw_messages(&mut reader, 1).await[0], (last + 1, "after".to_string()));
        drop(slow);
    }

    async fn a_send_flood_is_rate_limited(kind: EngineKind) {
        let gateway = TestGateway::start_with(kind, |c| {
            c.send_rate = 5.0;
            c.send_burst = 5;
        })
        .await;
        let bystander = Bystander::open(&gateway).await;
        let (mut conn, _) = gateway.raw("flooder").await;
        for i in 0..10 {
            conn.send_frame(&send_frame(&format!("f{i}"), "flooded", "x")).await.expect("send");
        }
        let (mut sent, mut limited) = (0, 0);
        for i in 0..10 {
            let want = format!("f{i}");
            match next_frame(&mut conn).await {
                ServerFrame::Sent { id, .. } if id == want => sent += 1,
                ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    id: Some(id),
                    retry_after_ms: Some(retry),
                    ..
                } if id == want => {
                    assert!(retry > 0, "retry_after_ms must be positive");
                    limited += 1;
                }
                other => panic!("answer to {want}: {other:?}"),
            }
        }
        assert!(sent >= 5, "the burst of 5 is accepted ({sent} sent)");
        assert!(limited >= 1, "10 quick sends pass a 5/s rate ({sent} sent)");

        // Waiting exactly retry_after_ms is enough, every time ("retry_after_ms says when").
        for round in 0..5 {
            // Empty the bucket: a refused send stops the node reading until a token is there,
            // so sends are refused or stored until one is stored, which takes the last token.
            for n in 0.. {
                let spend = format!("s{round}-{n}");
                conn.send_frame(&send_frame(&spend, "flooded", "x")).await.expect("send");
                match next_frame(&mut conn).await {
                    ServerFrame::Sent { .. } => break,
                    ServerFrame::Error { code: ErrorCode::RateLimited, .. } => {}
                    other => panic!("answer to {spend}: {other:?}"),
                }
            }
            let id = format!("r{round}");
            conn.send_frame(&send_frame(&id, "flooded", "x")).await.expect("send");
            let (_, got_id, retry) = expect_error(&mut conn, ErrorCode::RateLimited).await;
            assert_eq!(got_id.as_deref(), Some(id.as_str()));
            let retry = retry.expect("rate_limited carries retry_after_ms");
            assert!(retry > 0 && retry <= 200, "retry_after_ms {retry} at 5/s");
            wait_exactly(Duration::from_millis(retry)).await;
            conn.send_frame(&send_frame(&id, "flooded", "x")).await.expect("send");
            match next_frame(&mut conn).await {
                ServerFrame::Sent { id: got, .. } if got == id => {}
                other => panic!("after waiting retry_after_ms ({retry} ms): {other:?}"),
            }
        }
        bystander.check(&gateway).await;
    }

    async fn a_full_inbox_refuses_until_acked(kind: EngineKind) {
        let gateway = TestGateway::start_with(kind, |c| {
            c.max_inbox = 3;
            // One sender fills it here: no share bound (see recipients.rs for the share).
            c.max_inbox_share = 1.0;
        }).await;
        let bystander = Bystander::open(&gateway).await;
        let (mut sender, _) = gateway.raw("filler").await;
        for i in 1..=3 {
            assert_eq!(raw_send(&mut sender, &format!("m{i}"), "full", "x").await, i);
        }
        let message = send_refused(&mut sender, send_frame("m4", "full", "x"), ErrorCode::InboxFull)
            .await;
        assert!(!message.is_empty());
        // Another recipient is not affected.
        raw_send(&mut sender, "other", "not-full", "x").await;

        let (mut recipient, _) = gateway.raw("full").await;
        let got = raw_messages(&mut recipient, 3).await;
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2, 3]);
        recipient.send_frame(&ClientFrame::Ack { seq: 3 }).await.expect("ack");

        // The trim is asynchronous: retry m4 (the same id, as a client would) until it is taken.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            sender.send_frame(&send_frame("m4", "full", "x")).await.expect("send");
            match next_frame(&mut sender).await {
                ServerFrame::Sent { id, seq, duplicate, .. } if id == "m4" => {
                    assert_eq!((seq, duplicate), (4, false));
                    break;
                }
                ServerFrame::Error { code: ErrorCode::InboxFull, id: Some(id), .. }
                    if id == "m4" => {}
                other => panic!("answer to m4: {other:?}"),
            }
            assert!(tokio::time::Instant::now() < deadline, "the inbox never had room again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(raw_messages(&mut recipient, 1).await[0], (4, "m4".to_string()));
        bystander.check(&gateway).await;
    }

    async fn no_hello_in_time_closes_with_1008(kind: EngineKind) {
        let gateway = TestGateway::start_with(kind, |c| {
            c.hello_timeout = Duration::from_millis(300);
        })
        .await;
        let bystander = Bystander::open(&gateway).await;
        let mut conn = raw_open(&gateway, &[MSGPACK]).await;
        let started = tokio::time::Instant::now();
        expect_closed(&mut conn, 1008).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "closed after {took:?}, hello_timeout is 300 ms");
        bystander.check(&gateway).await;
    }

    async fn a_token_at_the_upgrade_replaces_the_one_in_hello(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;

        let bearer = format!("Bearer {}", gateway.token("by-header"));
        let headers = [("Authorization", bearer.as_str())];
        let mut conn = RawConnection::connect(&gateway.url(), &[MSGPACK], &headers)
            .await
            .expect("connects");
        let hello = ClientFrame::Hello { token: None, last_seq: 0, epoch: None, device: None };
        conn.send_frame(&hello).await.expect("hello");
        match next_frame(&mut conn).await {
            ServerFrame::Welcome { user, .. } => assert_eq!(user, "by-header"),
            other => panic!("expected welcome, got {other:?}"),
        }
        raw_send(&mut conn, "h1", "by-query", "from the header").await;

        let url = format!("{}?token={}", gateway.url(), gateway.token("by-query"));
        let mut conn = RawConnection::connect(&url, &[MSGPACK], &[]).await.expect("connects");
        conn.send_frame(&hello).await.expect("hello");
        match next_frame(&mut conn).await {
            ServerFrame::Welcome { user, .. } => assert_eq!(user, "by-query"),
            other => panic!("expected welcome, got {other:?}"),
        }
        let got = raw_messages(&mut conn, 1).await;
        assert_eq!(got, [(1, "h1".to_string())]);
        bystander.check(&gateway).await;
    }

    async fn no_token_anywhere_is_unauthorized(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let mut conn = hello_with(&gateway, None).await;
        expect_error(&mut conn, ErrorCode::Unauthorized).await;
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    async fn a_second_hello_is_a_bad_frame(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let bystander = Bystander::open(&gateway).await;
        let (mut conn, _) = gateway.raw("twice").await;
        let hello = ClientFrame::Hello {
            token: Some(gateway.token("someone-else")),
            last_seq: 0,
            epoch: None,
            device: None,
        };
        conn.send_frame(&hello).await.expect("hello again");
        expect_error(&mut conn, ErrorCode::BadFrame).await;
        expect_closed(&mut conn, 1008).await;
        bystander.check(&gateway).await;
    }

    async fn the_json_subprotocol_works_end_to_end(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        let mut alice = raw_json(&gateway, "json-alice").await;
        let mut bob = raw_json(&gateway, "json-bob").await;

        let send = json!({ "type": "send", "id": "j-1", "to": "json-bob", "body": "héllo bob" });
        alice.send_text(send.to_string()).await.expect("send");
        match next_frame(&mut alice).await {
            ServerFrame::Sent { id, to, seq, duplicate } => {
                let got = (id.as_str(), to.as_str(), seq, duplicate);
                assert_eq!(got, ("j-1", "json-bob", 1, false));
            }
            other => panic!("expected sent, got {other:?}"),
        }
        match next_frame(&mut bob).await {
            ServerFrame::Msg { seq, from, id, body, .. } => {
                assert_eq!((seq, from.as_str(), id.as_str()), (1, "json-alice", "j-1"));
                assert_eq!(&body.0[..], "héllo bob".as_bytes());
            }
            other => panic!("expected msg, got {other:?}"),
        }
        bob.send_text(r#"{"type":"ack","seq":1}"#).await.expect("ack");
        bob.send_text(r#"{"type":"ping","future_field":[1,2]}"#).await.expect("ping");
        assert_eq!(next_frame(&mut bob).await, ServerFrame::Pong);

        // A body that is not UTF-8, from a MessagePack sender, reaches the JSON client intact
        // (as body_b64 on the wire).
        let (mut mp, _) = gateway.raw("msgpack-carol").await;
        let bytes: &[u8] = &[0xff, 0x00, 0x80, 0xfe, b'a'];
        let frame = ClientFrame::Send {
            id: "bin-1".into(),
            to: "json-bob".into(),
            body: Body(bytes.to_vec().into()),
        };
        mp.send_frame(&frame).await.expect("send");
        assert!(matches!(next_frame(&mut mp).await, ServerFrame::Sent { seq: 2, .. }));
        match next_frame(&mut bob).await {
            ServerFrame::Msg { seq, from, body, .. } => {
                assert_eq!((seq, from.as_str()), (2, "msgpack-carol"));
                assert_eq!(&body.0[..], bytes);
            }
            other => panic!("expected msg, got {other:?}"),
        }

        // And a JSON client can send a binary body as body_b64.
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        let send = json!({ "type": "send", "id": "j-2", "to": "msgpack-carol", "body_b64": b64 });
        alice.send_text(send.to_string()).await.expect("send");
        assert!(matches!(next_frame(&mut alice).await, ServerFrame::Sent { .. }));
        match next_frame(&mut mp).await {
            ServerFrame::Msg { id, body, .. } => {
                assert_eq!(id, "j-2");
                assert_eq!(&body.0[..], bytes);
            }
            other => panic!("expected msg, got {other:?}"),
        }
    }
}

/// Refusals at the HTTP upgrade happen before any engine is touched, so they run on the
/// embedded engine only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_refusals_are_http_statuses() {
    let gateway = TestGateway::start(EngineKind::Embedded).await;
    let bystander = Bystander::open(&gateway).await;

    match RawConnection::connect(&gateway.url(), &["chat", "ferry.v2"], &[]).await {
        Err(ClientError::Handshake { status, .. }) => assert_eq!(status, 400),
        other => panic!("unknown subprotocols: {other:?}"),
    }
    let (status, _) = http_get(gateway.addr, "/v1/ws").await.expect("plain GET");
    assert_eq!(status, 426, "a GET without an upgrade");
    let (status, _) = http_get(gateway.addr, "/nope").await.expect("GET /nope");
    assert_eq!(status, 404);
    let url = format!("ws://{}/v2/ws", gateway.addr);
    match RawConnection::connect(&url, &[MSGPACK], &[]).await {
        Err(ClientError::Handshake { status, .. }) => assert_eq!(status, 404),
        other => panic!("upgrade on an unknown path: {other:?}"),
    }
    // Offering an unknown one alongside a known one is fine, and no offer means MessagePack.
    let conn = RawConnection::connect(&gateway.url(), &["chat", JSON], &[])
        .await
        .expect("json");
    assert_eq!(conn.subprotocol(), Some(JSON));
    let conn = RawConnection::connect(&gateway.url(), &[], &[])
        .await
        .expect("no offer");
    assert_eq!(conn.subprotocol(), None);
    bystander.check(&gateway).await;
}
