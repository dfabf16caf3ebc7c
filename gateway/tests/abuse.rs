//! Abuse resistance (issue 13): one ordinary authenticated user cannot make a node hold much
//! for it. No frame echoes more than a small slice of client input; a node takes at most
//! `--max-connections-per-user` connections of one user; the send rate is per user, shared by
//! the user's connections on a node and kept across a reconnect; pings and acks are limited;
//! connections per client address (behind a trusted proxy, the address it forwards) and
//! connections not yet authenticated are bounded.

mod common;

use std::time::Duration;

use common::*;
use ferry_shared::client::{ClientError, RawConnection};
use ferry_shared::{ClientFrame, ErrorCode, ServerFrame};
use tokio::net::TcpStream;

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

    // Sends refused by the user's rate were answered at once, so a client that reads its
    // answers made the node decode and refuse a send per frame, as fast as it could write. Now
    // a refusal stops reading the client until a token is there: refusals come at most at the
    // rate sends are accepted.
    async fn a_send_flood_is_paced_by_the_rate(kind: EngineKind) {
        let gw = TestGateway::start_with(kind, |c| {
            c.send_rate = 100.0;
            c.send_burst = 1;
        })
        .await;
        let (mut alice, _) = gw.raw("alice").await;
        const N: usize = 100;
        for i in 0..N {
            alice.send_frame(&send_frame(&format!("f-{i}"), "bob", "x")).await.expect("send");
        }
        let (mut stored, mut refused) = (0, 0);
        while stored + refused < N {
            match next_frame(&mut alice).await {
                ServerFrame::Sent { .. } => stored += 1,
                ServerFrame::Error { code: ErrorCode::RateLimited, .. } => refused += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(refused <= stored + 1, "{refused} refused, {stored} stored");
    }

    // A pause for a refused send is the node's doing, not a silent client: a pause longer than
    // the heartbeat's two intervals must not close the connection as dead.
    async fn a_long_pause_is_not_taken_for_a_dead_client(kind: EngineKind) {
        let gw = TestGateway::start_with(kind, |c| {
            c.store_bytes_rate = 1_000.0;
            c.heartbeat = Duration::from_millis(200);
        })
        .await;
        let (mut alice, _) = gw.raw("alice").await;
        let body = "b".repeat(3_000);
        raw_send(&mut alice, "big-1", "bob", &body).await;
        alice.send_frame(&send_frame("big-2", "bob", &body)).await.expect("send");
        let (_, _, retry) = expect_error(&mut alice, ErrorCode::RateLimited).await;
        let retry = retry.expect("retry_after_ms");
        assert!(retry > 1_000, "a pause of {retry} ms, over two heartbeats");
        tokio::time::sleep(Duration::from_millis(retry + 100)).await;
        raw_send(&mut alice, "big-2", "bob", &body).await;
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

    // No per-address cap: one host could take all of a node's --max-connections.
    async fn a_node_takes_a_bounded_number_of_connections_per_address(kind: EngineKind) {
        let gw = TestGateway::start_with(kind, |c| c.max_connections_per_address = 3).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(raw_open(&gw, &["ferry.v1.msgpack"]).await);
        }
        let refused = RawConnection::connect(&gw.url(), &["ferry.v1.msgpack"], &[]).await;
        assert!(matches!(refused, Err(ClientError::Handshake { status: 503, .. })), "{:?}", refused.err());
        drop(held.pop());
        eventually("a slot freed", || async {
            RawConnection::connect(&gw.url(), &["ferry.v1.msgpack"], &[]).await.is_ok()
        })
        .await;
    }

    // Behind a trusted proxy the forwarded address counts; from anyone else X-Forwarded-For is
    // ignored (a client cannot pick the address it is counted under).
    async fn only_a_trusted_proxy_names_the_client_address(kind: EngineKind) {
        let gw = TestGateway::start_with(kind, |c| {
            c.max_connections_per_address = 1;
            c.trusted_proxies = vec!["127.0.0.0/8".parse().expect("cidr")];
        })
        .await;
        let url = gw.url();
        let a = RawConnection::connect(&url, &[], &[("X-Forwarded-For", "192.0.2.1")]).await;
        let b = RawConnection::connect(&url, &[], &[("X-Forwarded-For", "10.9.9.9, 192.0.2.2")]).await;
        assert!(a.is_ok() && b.is_ok(), "two clients behind the proxy");
        let again = RawConnection::connect(&url, &[], &[("X-Forwarded-For", "192.0.2.1")]).await;
        assert!(matches!(again, Err(ClientError::Handshake { status: 503, .. })));
        drop((a, b));

        let direct = TestGateway::start_with(kind, |c| c.max_connections_per_address = 1).await;
        let url = direct.url();
        let a = RawConnection::connect(&url, &[], &[("X-Forwarded-For", "192.0.2.1")]).await;
        assert!(a.is_ok());
        let b = RawConnection::connect(&url, &[], &[("X-Forwarded-For", "192.0.2.2")]).await;
        assert!(matches!(b, Err(ClientError::Handshake { status: 503, .. })), "not trusted");
    }

    // Connections that never authenticate hold at most --max-unauthenticated slots.
    async fn anonymous_connections_have_a_budget(kind: EngineKind) {
        let gw = TestGateway::start_with(kind, |c| c.max_unauthenticated = 2).await;
        let idle_a = TcpStream::connect(gw.addr).await.expect("connect");
        let idle_b = TcpStream::connect(gw.addr).await.expect("connect");
        eventually("the budget is spent", || async {
            matches!(
                RawConnection::connect(&gw.url(), &[], &[]).await,
                Err(ClientError::Handshake { status: 503, .. })
            )
        })
        .await;
        drop((idle_a, idle_b));
        // Authenticated connections leave the budget: more than two can be open.
        eventually("the budget is back", || async {
            RawConnection::connect(&gw.url(), &[], &[]).await.is_ok()
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(gw.raw("alice").await);
        }
    }

    // H4: nothing bounded what one sender stores. Now bytes stored per second per user.
    async fn bytes_stored_per_second_are_bounded_per_user(kind: EngineKind) {
        let gw = TestGateway::start_with(kind, |c| c.store_bytes_rate = 1_000.0).await;
        let (mut alice, _) = gw.raw("alice").await;
        let body = "b".repeat(1_500);
        raw_send(&mut alice, "big-1", "bob", &body).await;
        raw_send(&mut alice, "big-2", "bob", &body).await;
        alice.send_frame(&send_frame("big-3", "bob", &body)).await.expect("send");
        let (message, id, retry) = expect_error(&mut alice, ErrorCode::RateLimited).await;
        assert!(message.contains("bytes"), "{message}");
        assert_eq!(id.as_deref(), Some("big-3"));
        assert!(retry.is_some_and(|ms| ms > 0 && ms <= 2_000), "{retry:?}");
        // Small sends of another user are not affected.
        let (mut carol, _) = gw.raw("carol").await;
        raw_send(&mut carol, "c-1", "bob", "hi").await;
    }
}
