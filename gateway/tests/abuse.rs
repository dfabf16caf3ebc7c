//! Abuse resistance (issue 13): one ordinary authenticated user cannot make a node hold much
//! for it. No frame echoes more than a small slice of client input; a node takes at most
//! `--max-connections-per-user` connections of one user; the send rate is per user, shared by
//! the user's connections on a node and kept across a reconnect; pings and acks are limited.

mod common;

use std::time::Duration;

use common::*;
use ferry_shared::{ClientFrame, ErrorCode, ServerFrame};

/// The most of a client's input any frame may echo (a message id's longest).
const ECHO: usize = 64;

both_engines! {
    // Found from outside: a `send` with a 900 KB `id` was answered `invalid` echoing all of it.
    async fn an_invalid_send_echoes_a_bounded_id(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut alice, _) = gw.raw("alice").await;
        let id = "x".repeat(900_000);
        alice.send_frame(&send_frame(&id, "bob", "hi")).await.expect("send");
        match next_frame(&mut alice).await {
            ServerFrame::Error { code, id: echoed, message, .. } => {
                assert_eq!(code, ErrorCode::Invalid);
                let echoed = echoed.unwrap_or_default();
                assert!(echoed.len() <= ECHO, "id echoed with {} bytes", echoed.len());
                assert!(message.len() <= 200, "message of {} bytes", message.len());
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    // The same through the rate check, which comes before the id is validated.
    async fn a_rate_limited_send_echoes_a_bounded_id(kind: EngineKind) {
        let gw = TestGateway::start_with(kind, |c| {
            c.send_rate = 1.0;
            c.send_burst = 1;
        })
        .await;
        let (mut alice, _) = gw.raw("alice").await;
        raw_send(&mut alice, "m1", "bob", "hi").await;
        let id = "y".repeat(900_000);
        alice.send_frame(&send_frame(&id, "bob", "hi")).await.expect("send");
        let (_, echoed, retry) = expect_error(&mut alice, ErrorCode::RateLimited).await;
        assert!(retry.is_some());
        assert!(echoed.unwrap_or_default().len() <= ECHO);
    }

    // Found from outside: a first frame `{"type": "<900 KB>"}` got 900 KB back.
    async fn an_unknown_type_before_hello_is_not_echoed(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let mut conn = raw_open(&gw, &["ferry.v1.json"]).await;
        let frame = format!(r#"{{"type":"{}"}}"#, "z".repeat(900_000));
        conn.send_text(frame).await.expect("send");
        let (message, _, _) = expect_error(&mut conn, ErrorCode::BadFrame).await;
        assert!(message.len() <= 200, "message of {} bytes", message.len());
        expect_closed(&mut conn, 1008).await;
    }

    // Found from outside: one user opened 300 connections to one node, all welcomed.
    async fn a_node_takes_a_bounded_number_of_connections_per_user(kind: EngineKind) {
        let gw = TestGateway::start_with(kind, |c| c.max_connections_per_user = 3).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(gw.raw("alice").await);
        }
        let mut conn = raw_open(&gw, &["ferry.v1.msgpack"]).await;
        let hello = ClientFrame::Hello {
            token: Some(gw.token("alice")),
            last_seq: 0,
            epoch: None,
            device: None,
        };
        conn.send_frame(&hello).await.expect("hello");
        let (message, _, _) = expect_error(&mut conn, ErrorCode::RateLimited).await;
        assert!(message.contains("connections"), "{message}");
        expect_closed(&mut conn, 1013).await;
        // Another user is not affected, and a slot frees when a connection ends.
        gw.raw("bob").await;
        let (mut first, _) = held.remove(0);
        first.close(1000, "bye").await.expect("close");
        drop(first);
        eventually("a slot freed", || async {
            let mut conn = raw_open(&gw, &["ferry.v1.msgpack"]).await;
            conn.send_frame(&hello).await.is_ok()
                && matches!(
                    conn.next_frame(WAIT).await,
                    Ok(ferry_shared::client::RawEvent::Frame(ServerFrame::Welcome { .. }))
                )
        })
        .await;
    }

    // The send rate is the user's on a node: two connections share it, and a reconnect does not
    // refill it.
    async fn the_send_rate_is_per_user_and_survives_a_reconnect(kind: EngineKind) {
        let gw = TestGateway::start_with(kind, |c| {
            c.send_rate = 0.5;
            c.send_burst = 3;
        })
        .await;
        let (mut one, _) = gw.raw("alice").await;
        let (mut two, _) = gw.raw("alice").await;
        raw_send(&mut one, "a1", "bob", "hi").await;
        raw_send(&mut two, "a2", "bob", "hi").await;
        raw_send(&mut one, "a3", "bob", "hi").await;
        two.send_frame(&send_frame("a4", "bob", "hi")).await.expect("send");
        expect_error(&mut two, ErrorCode::RateLimited).await;
        drop((one, two));
        let (mut again, _) = gw.raw("alice").await;
        again.send_frame(&send_frame("a5", "bob", "hi")).await.expect("send");
        let (_, id, retry) = expect_error(&mut again, ErrorCode::RateLimited).await;
        assert_eq!(id.as_deref(), Some("a5"));
        assert!(retry.is_some_and(|ms| ms <= 2_000), "{retry:?}");
        // Another user has a bucket of its own.
        let (mut bob, _) = gw.raw("bob").await;
        raw_send(&mut bob, "b1", "alice", "hi").await;
    }

    // Pings beyond their rate are not answered at once: the node stops reading the client for a
    // while rather than answer a flood.
    async fn a_ping_flood_is_throttled(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut alice, _) = gw.raw("alice").await;
        for _ in 0..1_000 {
            alice.send_frame(&ClientFrame::Ping).await.expect("ping");
        }
        let mut pongs = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Ok(ferry_shared::client::RawEvent::Frame(frame))) =
            tokio::time::timeout_at(deadline, alice.next_frame(WAIT)).await
        {
            if frame == ServerFrame::Pong {
                pongs += 1;
            }
        }
        assert!(pongs < 1_000, "every ping was answered at once");
        assert!(pongs >= 10, "some pings are answered ({pongs})");
    }
}
