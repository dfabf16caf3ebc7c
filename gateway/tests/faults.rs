//! Store and pub/sub faults on a real Redis: nothing answered `sent` is lost, live delivery
//! recovers within about a second of the subscriber reconnecting, a stopped store gives
//! `unavailable` (never a hang), retries store exactly once, and lost data shows as `reset`.

mod common;

use std::time::Duration;

use common::*;
use ferry_router::testkit::RedisOptions;
use ferry_shared::client::{RawConnection, SendError};
use ferry_shared::{ErrorCode, ServerFrame};
use tokio::time::Instant;

const AOF_ALWAYS: RedisOptions = RedisOptions {
    appendonly: true,
    appendfsync_always: true,
    replica_of: None,
};

fn assert_unavailable(answer: &Result<ferry_shared::client::Sent, SendError>) {
    assert!(
        matches!(
            answer,
            Err(SendError::Rejected {
                code: ErrorCode::Unavailable,
                ..
            })
        ),
        "expected unavailable: {answer:?}"
    );
}

/// Bob connected and received three messages from alice: his connection and his inbox's epoch.
async fn bob_received_three(gw: &TestGateway) -> (RawConnection, String) {
    let (mut alice, _) = gw.raw("alice").await;
    let (mut bob, welcome) = gw.raw("bob").await;
    for i in 1..=3 {
        raw_send(&mut alice, &format!("m{i}"), "bob", "x").await;
    }
    assert_eq!(raw_messages(&mut bob, 3).await.len(), 3);
    (bob, epoch_of(&welcome))
}

fn kill_pubsub(gw: &TestGateway) {
    gw.redis().cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
}

// With traffic flowing, the node's pub/sub connection is killed again and again; the recipient
// still gets every message, exactly once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_kill_under_traffic_loses_nothing() {
    let gw = TestGateway::start(EngineKind::Redis).await;
    let (bob, mut bob_events) = gw.client("bob").await;
    let (alice, _alice_events) = gw.client("alice").await;
    let total = 300;
    let sender = tokio::spawn(async move {
        for i in 0..total {
            alice
                .send("bob", &format!("m{i:04}"), "x")
                .await
                .expect("sent");
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        alice
    });
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        kill_pubsub(&gw);
    }
    let got = messages(&mut bob_events, total).await;
    let alice = sender.await.expect("sender");
    let seqs: Vec<u64> = got.iter().map(|m| m.0).collect();
    assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
    let reconnects = metric(&gw, "ferry_pubsub_reconnects_total")
        .await
        .unwrap_or(0.0);
    assert!(reconnects >= 1.0, "the kills were seen: {reconnects}");
    alice.close().await;
    bob.close().await;
}

// A message published while the node had no subscriber is lost live; the resync after the
// reconnect delivers it within about a second (the position check alone would take 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_missed_while_unsubscribed_arrives_after_resync() {
    let gw = TestGateway::start(EngineKind::Redis).await;
    let (mut bob, _) = gw.raw("bob").await;
    let (mut alice, _) = gw.raw("alice").await;
    raw_send(&mut alice, "before", "bob", "x").await;
    assert_eq!(raw_messages(&mut bob, 1).await[0].0, 1);
    for round in 0..3 {
        kill_pubsub(&gw);
        let id = format!("during-{round}");
        raw_send(&mut alice, &id, "bob", "x").await;
        let started = Instant::now();
        let got = raw_messages(&mut bob, 1).await;
        assert_eq!(got[0].1, id);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "recovered in {:?}",
            started.elapsed()
        );
    }
}

// Redis stopped: sends get `unavailable` quickly, the gateway and its other connections keep
// working, and after Redis is back a retry with the same id stores the message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_stopped_gives_unavailable_and_retry_stores_once() {
    let mut gw = TestGateway::start_redis_with(AOF_ALWAYS, |c| {
        c.store_timeout = Duration::from_millis(400);
    })
    .await;
    let (alice, _alice_events) = gw.client("alice").await;
    let (mut other, _) = gw.raw("carol").await;
    alice
        .send("bob", "first", "x")
        .await
        .expect("sent before the fault");

    gw.redis_mut().stop();
    let started = Instant::now();
    let failed = alice.send_once("bob", "retry-me", "y").await;
    assert_unavailable(&failed);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no hang: {:?}",
        started.elapsed()
    );
    // The node itself is fine: another connection still answers.
    other
        .send_frame(&ferry_shared::ClientFrame::Ping)
        .await
        .expect("ping");
    assert_eq!(next_frame(&mut other).await, ServerFrame::Pong);
    // Readiness follows the store watchdog's next check (every --store-check).
    eventually("not ready without the store", || async {
        gw.get("/readyz")
            .await
            .map(|(s, _)| s == 503)
            .unwrap_or(false)
    })
    .await;

    gw.redis_mut().restart();
    // The full client retries `unavailable` with the same id until it is stored.
    let sent = alice
        .send("bob", "retry-me", "y")
        .await
        .expect("stored after recovery");
    assert_eq!(sent.seq, 2);
    let again = alice.send("bob", "retry-me", "y").await.expect("answered");
    assert_eq!((again.seq, again.duplicate), (2, true));
    // A hello right after the restart may still find the live bus reconnecting (`unavailable`,
    // close 1013): a client retries, so does this test.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut bob = loop {
        let mut conn = raw_open(&gw, &["ferry.v1.msgpack"]).await;
        let hello = ferry_shared::ClientFrame::Hello {
            token: Some(gw.token("bob")),
            last_seq: 0,
            epoch: None,
            device: None,
        };
        conn.send_frame(&hello).await.expect("hello");
        if let Ok(ferry_shared::client::RawEvent::Frame(ServerFrame::Welcome { .. })) =
            conn.next_frame(WAIT).await
        {
            break conn;
        }
        assert!(tokio::time::Instant::now() < deadline, "bob never got in");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let got = raw_messages(&mut bob, 2).await;
    assert_eq!(got, [(1, "first".to_string()), (2, "retry-me".to_string())]);
    no_message(&mut bob, Duration::from_millis(300)).await;
}

// Redis frozen mid-send (SIGSTOP): the append may or may not have happened when `unavailable`
// comes back; the retry with the same id never stores it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_frozen_mid_send_never_stores_twice() {
    let gw = TestGateway::start_with(EngineKind::Redis, |c| {
        c.store_timeout = Duration::from_millis(300);
    })
    .await;
    let (alice, _alice_events) = gw.client("alice").await;
    gw.redis().pause();
    let failed = alice.send_once("bob", "maybe", "x").await;
    gw.redis().resume();
    assert_unavailable(&failed);
    let sent = alice
        .send("bob", "maybe", "x")
        .await
        .expect("answered after resume");
    assert_eq!(sent.seq, 1);
    let (mut bob, _) = gw.raw("bob").await;
    assert_eq!(raw_messages(&mut bob, 1).await, [(1, "maybe".to_string())]);
    no_message(&mut bob, Duration::from_millis(300)).await;
}

// With appendonly yes and appendfsync always, a Redis crash (SIGKILL) keeps every message that
// was answered `sent`, and the inbox keeps its epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_crash_with_aof_always_keeps_every_sent_message() {
    let mut gw = TestGateway::start_redis_with(AOF_ALWAYS, |_| {}).await;
    let (_, welcome) = gw.raw("bob").await;
    let epoch = epoch_of(&welcome);
    let (alice, _alice_events) = gw.client("alice").await;
    for i in 1..=50 {
        alice
            .send("bob", &format!("m{i:02}"), "x")
            .await
            .expect("sent");
    }
    gw.redis_mut().kill();
    gw.redis_mut().restart();
    let (mut bob, welcome) = gw.raw_resume("bob", 0, Some(&epoch)).await;
    assert!(
        matches!(&welcome, ServerFrame::Welcome { reset: false, head: 50, epoch: e, .. } if *e == epoch),
        "{welcome:?}"
    );
    let got = raw_messages(&mut bob, 50).await;
    assert_eq!(
        got.iter().map(|m| m.0).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>()
    );
}

// An inbox whose keys were deleted (as after data loss) answers the next hello with reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_inbox_keys_give_reset() {
    let gw = TestGateway::start(EngineKind::Redis).await;
    let (bob, epoch) = bob_received_three(&gw).await;
    drop(bob);
    gw.redis()
        .cmd(&["DEL", "ferry:{u:bob}:inbox", "ferry:{u:bob}:meta"]);
    let (_, welcome) = gw.raw_resume("bob", 3, Some(&epoch)).await;
    match welcome {
        ServerFrame::Welcome {
            reset,
            head,
            epoch: new_epoch,
            ..
        } => {
            assert!(reset, "the client learns its position is void");
            assert_eq!(head, 0);
            assert_ne!(new_epoch, epoch);
        }
        other => panic!("{other:?}"),
    }
}

// Data lost under a live connection: the position check notices the new epoch and asks the
// client to reconnect, so it learns `reset` instead of waiting on a position that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoch_change_under_a_live_session_asks_for_reconnect() {
    let gw = TestGateway::start_with(EngineKind::Redis, |c| {
        c.position_check = Duration::from_millis(200);
    })
    .await;
    let (mut bob, _) = gw.raw("bob").await;
    gw.redis().cmd(&["FLUSHALL"]);
    let frame = next_frame(&mut bob).await;
    assert_eq!(frame, ServerFrame::Reconnect { after_ms: 0 });
    assert_eq!(expect_close(&mut bob).await, Some(1012));
}

// The store went back in time under a live session (a failover to a lagging replica): the head
// is below what the session delivered. The session asks for a reconnect, and the resume gets
// `reset` rather than new messages being taken for ones the client already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_going_back_under_a_live_session_gives_reset() {
    let gw = TestGateway::start_with(EngineKind::Redis, |c| {
        c.position_check = Duration::from_millis(200);
    })
    .await;
    let (mut bob, epoch) = bob_received_three(&gw).await;
    // What a replica that missed the last two appends would hold.
    gw.redis().cmd(&["HSET", "ferry:{u:bob}:meta", "seq", "1"]);
    gw.redis()
        .cmd(&["ZREMRANGEBYSCORE", "ferry:{u:bob}:inbox", "2", "+inf"]);
    assert_eq!(
        next_frame(&mut bob).await,
        ServerFrame::Reconnect { after_ms: 0 }
    );
    assert_eq!(expect_close(&mut bob).await, Some(1012));
    let (_, welcome) = gw.raw_resume("bob", 3, Some(&epoch)).await;
    assert!(
        matches!(
            welcome,
            ServerFrame::Welcome {
                reset: true,
                head: 1,
                ..
            }
        ),
        "{welcome:?}"
    );
}

// Sender and recipient on different nodes of one Redis; one user on two nodes at once: both
// connections get every message live, and each keeps its own position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_inboxes() {
    let node_a = TestGateway::start(EngineKind::Redis).await;
    let node_b = node_a.another_node("gw-b").await;
    let (mut alice, _) = node_a.raw("alice").await;
    let (mut bob_a, _) = node_a.raw("bob").await;
    let (mut bob_b, welcome) = node_b.raw("bob").await;
    assert!(matches!(&welcome, ServerFrame::Welcome { node, .. } if node == "gw-b"));
    for i in 1..=10 {
        raw_send(&mut alice, &format!("m{i}"), "bob", "x").await;
    }
    let want: Vec<u64> = (1..=10).collect();
    assert_eq!(
        raw_messages(&mut bob_a, 10)
            .await
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>(),
        want
    );
    assert_eq!(
        raw_messages(&mut bob_b, 10)
            .await
            .iter()
            .map(|m| m.0)
            .collect::<Vec<_>>(),
        want
    );
}
