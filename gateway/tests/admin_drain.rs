//! The admin endpoints (liveness, readiness, metrics), the drain of a node that is shutting down,
//! and the keepalive that closes silent connections.

mod common;

use std::time::Duration;

use common::*;
use ferry_shared::ServerFrame;
use ferry_shared::client::RawConnection;

/// Every series `DESIGN.md` (Observability) requires.
const REQUIRED_SERIES: [&str; 13] = [
    "ferry_connections_open",
    "ferry_hellos_total",
    "ferry_frames_in_total",
    "ferry_frames_out_total",
    "ferry_sends_total",
    "ferry_messages_delivered_total",
    "ferry_delivery_latency_seconds",
    "ferry_catchup_reads_total",
    "ferry_sessions_lagging",
    "ferry_store_command_duration_seconds",
    "ferry_store_errors_total",
    "ferry_pubsub_reconnects_total",
    "ferry_drains_total",
];

async fn status(gateway: &TestGateway, path: &str) -> u16 {
    gateway.get(path).await.map(|(s, _)| s).unwrap_or(0)
}

both_engines! {
    async fn liveness_and_readiness(kind: EngineKind) {
        let mut gateway = TestGateway::start(kind).await;
        assert_eq!(gateway.get("/healthz").await.expect("healthz"), (200, "ok\n".into()));
        assert_eq!(status(&gateway, "/readyz").await, 200);
        assert_eq!(status(&gateway, "/nope").await, 404);
        if kind == EngineKind::Embedded {
            return;
        }

        // Without its store the node is not ready, but it is alive.
        let redis = gateway.redis.as_mut().expect("a Redis gateway");
        tokio::task::block_in_place(|| redis.stop());
        eventually("readyz 503 without Redis", || async {
            status(&gateway, "/readyz").await == 503
        })
        .await;
        assert_eq!(status(&gateway, "/healthz").await, 200);

        let redis = gateway.redis.as_mut().expect("a Redis gateway");
        tokio::task::block_in_place(|| redis.restart());
        eventually("readyz 200 with Redis back", || async {
            status(&gateway, "/readyz").await == 200
        })
        .await;
        // And it serves again.
        let (mut conn, _) = gateway.raw("after-restart").await;
        raw_send(&mut conn, "m1", "someone", "back").await;
    }

    async fn metrics_has_every_required_series_and_no_user_ids(kind: EngineKind) {
        let gateway = TestGateway::start(kind).await;
        // Distinctive names, so that finding them anywhere in /metrics means a user-id label.
        let alice = "zq-metrics-alice-8841";
        let bob = "zq-metrics-bob-8841";
        let (mut a, _) = gateway.raw(alice).await;
        let (mut b, _) = gateway.raw(bob).await;
        raw_send(&mut a, "zq-msg-id-8841", bob, "hello").await;
        let got = raw_messages(&mut b, 1).await;
        b.send_frame(&ferry_shared::ClientFrame::Ack { seq: got[0].0 }).await.expect("ack");
        ping_pong(&mut b).await;

        let (code, body) = gateway.get("/metrics").await.expect("metrics");
        assert_eq!(code, 200);
        for series in REQUIRED_SERIES {
            assert!(
                body.contains(&format!("# TYPE {series} ")),
                "{series} missing from /metrics:\n{body}"
            );
        }
        // Only the letters: "8841" alone can turn up in a metric's value (a duration's sum).
        for secret in ["zq-", "metrics-alice", "msg-id"] {
            assert!(!body.contains(secret), "a user or message id in /metrics:\n{body}");
        }
        let sends = metric(&gateway, r#"ferry_sends_total{outcome="stored"}"#).await;
        assert!(sends.unwrap_or(0.0) >= 1.0, "the send was counted");
        // The node's identity, once, as an info series.
        let node = metric(&gateway, r#"ferry_node_info{node="gw-test"}"#).await;
        assert_eq!(node, Some(1.0), "ferry_node_info names the node:\n{body}");
        let max = metric(&gateway, "ferry_connections_max").await;
        assert_eq!(max, Some(gateway.config.max_connections as f64));
    }

    async fn a_drain_moves_every_session_and_loses_nothing(kind: EngineKind) {
        let mut gateway = TestGateway::start_with(kind, |c| {
            c.drain_timeout = Duration::from_secs(1);
        })
        .await;
        let (mut alice, _) = gateway.raw("drain-alice").await;
        let (mut bob, _) = gateway.raw("drain-bob").await;
        raw_send(&mut alice, "before-drain", "drain-carol", "kept").await;

        let drains_before = metric(&gateway, "ferry_drains_total").await.unwrap_or(0.0);
        gateway.begin_drain();
        // Checked while the sessions are still open: each waits for its client to answer the
        // close (which these do only when they read, below) before the node can finish.
        eventually("readyz 503 while draining", || async {
            status(&gateway, "/readyz").await == 503
        })
        .await;
        assert_eq!(status(&gateway, "/healthz").await, 200, "draining is not dying");
        eventually("new connections refused", || async {
            RawConnection::connect(&gateway.url(), &["ferry.v1.msgpack"], &[]).await.is_err()
        })
        .await;
        eventually("the drain counted", || async {
            metric(&gateway, "ferry_drains_total").await.unwrap_or(0.0) > drains_before
        })
        .await;

        for conn in [&mut alice, &mut bob] {
            match next_frame(conn).await {
                ServerFrame::Reconnect { .. } => {}
                other => panic!("expected reconnect, got {other:?}"),
            }
            expect_closed(conn, 1012).await;
        }

        // The message answered `sent` before the drain is in the store, for any other node.
        // (The embedded engine's state ends with its process: nothing to check there.)
        let other = match kind {
            EngineKind::Redis | EngineKind::RedisCluster => {
                Some(gateway.another_node("gw-after-drain").await)
            }
            EngineKind::Embedded => None,
        };
        let _redis = gateway.redis.take();
        // The sessions are gone, so `run` returns well before the window plus its margin.
        tokio::time::timeout(Duration::from_secs(4), gateway.stop())
            .await
            .expect("the drained gateway stops in time");
        if let Some(other) = other {
            let (mut carol, _) = other.raw("drain-carol").await;
            assert_eq!(raw_messages(&mut carol, 1).await, [(1, "before-drain".to_string())]);
        }
    }

    async fn a_silent_client_is_closed_after_two_heartbeats(kind: EngineKind) {
        let gateway = TestGateway::start_with(kind, |c| {
            c.heartbeat = Duration::from_millis(200);
        })
        .await;
        let (mut conn, welcome) = gateway.raw("silent").await;
        assert!(matches!(welcome, ServerFrame::Welcome { heartbeat_ms: 200, .. }));

        // Not closed after one heartbeat of silence (this read answers the server's ping)...
        tokio::time::sleep(Duration::from_millis(200)).await;
        match conn.next_frame(Duration::from_millis(50)).await {
            Err(ferry_shared::client::ClientError::Timeout) => {}
            other => panic!("open after one heartbeat, got {other:?}"),
        }
        // ...but closed after five, which include two with no answer to any ping.
        // (A RawConnection answers pings only while it reads, so not reading is silence.)
        tokio::time::sleep(Duration::from_millis(1000)).await;
        expect_closed(&mut conn, 1000).await;

        let (mut other, _) = gateway.raw("talkative").await;
        ping_pong(&mut other).await;
    }

    async fn application_pings_keep_a_connection_open(kind: EngineKind) {
        let gateway = TestGateway::start_with(kind, |c| {
            c.heartbeat = Duration::from_millis(200);
        })
        .await;
        let (mut conn, _) = gateway.raw("pinger").await;
        // Six heartbeats during which the client reads nothing (so answers no WebSocket ping)
        // and only sends `ping` frames.
        const PINGS: usize = 12;
        for _ in 0..PINGS {
            tokio::time::sleep(Duration::from_millis(100)).await;
            conn.send_frame(&ferry_shared::ClientFrame::Ping).await.expect("ping");
        }
        for i in 0..PINGS {
            match next_frame(&mut conn).await {
                ServerFrame::Pong => {}
                other => panic!("pong {i}: got {other:?}"),
            }
        }
        ping_pong(&mut conn).await;
    }
}
