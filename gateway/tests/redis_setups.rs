//! How the gateway meets the Redis setups that decide durability (issue 9): `--min-replicas-ack`
//! with a real replica, an evicting `maxmemory-policy`, and a Redis that comes back from a
//! restart older than what it had answered (the audit of recent appends).

mod common;

use std::time::Duration;

use common::*;
use ferry_gateway::GatewayError;
use ferry_router::testkit::RedisServer;
use ferry_shared::client::SendError;
use ferry_shared::{ErrorCode, ServerFrame};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn is_unavailable(answer: &Result<ferry_shared::client::Sent, SendError>) -> bool {
    matches!(
        answer,
        Err(SendError::Rejected {
            code: ErrorCode::Unavailable,
            ..
        })
    )
}

/// A gateway with `--min-replicas-ack 1` (and a store timeout of 600 ms) on a Redis with one
/// replica, in sync.
async fn gateway_with_a_replica() -> (TestGateway, RedisServer) {
    let gw = TestGateway::start_with(EngineKind::Redis, |c| {
        c.min_replicas_ack = 1;
        c.store_timeout = Duration::from_millis(600);
    })
    .await;
    let replica = gw.redis().start_replica();
    (gw, replica)
}

// `sent` waits for the replica: with it in sync a send is answered; with it frozen the answer is
// `unavailable`; once it is back the retry with the same id is answered with the original seq,
// and the message is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_ack_waits_for_the_replica() {
    let (gw, replica) = gateway_with_a_replica().await;
    let (alice, _events) = gw.client("alice").await;
    let first = alice.send("bob", "first", "x").await.expect("sent");
    assert_eq!((first.seq, first.duplicate), (1, false));

    replica.pause();
    let frozen = alice.send_once("bob", "second", "y").await;
    assert!(is_unavailable(&frozen), "{frozen:?}");
    replica.resume();
    let retried = alice.send("bob", "second", "y").await.expect("sent");
    assert_eq!(retried.seq, 2, "the original append, not a second one");
    assert_eq!(
        replica.cmd(&["ZCARD", "ferry:{u:bob}:inbox"]),
        redis::Value::Int(2),
        "the replica has both"
    );
    let (mut bob, _) = gw.raw("bob").await;
    assert_eq!(
        raw_messages(&mut bob, 2).await,
        [(1, "first".to_string()), (2, "second".to_string())]
    );
    no_message(&mut bob, Duration::from_millis(300)).await;
}

// A connected recipient sees a message live only once the replicas have it: what it saw can
// then not vanish in a failover to one of them (which would end its epoch: `reset`). The retry
// that gets the write acknowledged publishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_ack_delivers_live_only_what_the_replica_has() {
    let (gw, replica) = gateway_with_a_replica().await;
    let (alice, _events) = gw.client("alice").await;
    let (mut bob, _) = gw.raw("bob").await;
    alice.send("bob", "first", "x").await.expect("sent");
    assert_eq!(raw_messages(&mut bob, 1).await, [(1, "first".to_string())]);

    replica.pause();
    let frozen = alice.send_once("bob", "second", "y").await;
    assert!(is_unavailable(&frozen), "{frozen:?}");
    no_message(&mut bob, Duration::from_millis(500)).await;
    replica.resume();
    let retried = alice.send("bob", "second", "y").await.expect("sent");
    assert_eq!((retried.seq, retried.duplicate), (2, true));
    assert_eq!(raw_messages(&mut bob, 1).await, [(2, "second".to_string())]);
    // A message acknowledged at once is live at once.
    alice.send("bob", "third", "z").await.expect("sent");
    assert_eq!(raw_messages(&mut bob, 1).await, [(3, "third".to_string())]);
}

// Without any replica, nothing is answered `sent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_replicas_ack_without_replicas_is_unavailable() {
    let gw = TestGateway::start_with(EngineKind::Redis, |c| {
        c.min_replicas_ack = 1;
        c.store_timeout = Duration::from_millis(300);
    })
    .await;
    let (alice, _events) = gw.client("alice").await;
    let answer = alice.send_once("bob", "m", "x").await;
    assert!(is_unavailable(&answer), "{answer:?}");
}

async fn run_on(redis: &RedisServer, allow: bool) -> Result<(), GatewayError> {
    let mut config = test_config();
    config.redis_url = Some(redis.url().into());
    config.allow_redis_eviction = allow;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let shutdown = CancellationToken::new();
    let run = ferry_gateway::run(listener, admin, config, shutdown.clone());
    // A refusal comes before serving; a gateway that serves is stopped after a moment.
    tokio::select! {
        result = run => result,
        () = tokio::time::sleep(Duration::from_secs(2)) => Ok(()),
    }
}

// A Redis that may evict Ferry's keys is refused at start-up unless allowed; the store check
// exports the policy and follows it when it changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_refused_unless_allowed() {
    let redis = RedisServer::start();
    redis.cmd(&["CONFIG", "SET", "maxmemory", "1gb"]);
    redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "volatile-lru"]);
    match run_on(&redis, false).await {
        Err(GatewayError::EvictingStore(policy)) => assert_eq!(policy, "volatile-lru"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Without a memory limit now, the policy still counts: a limit set later would evict.
    redis.cmd(&["CONFIG", "SET", "maxmemory", "0"]);
    redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    assert!(matches!(
        run_on(&redis, false).await,
        Err(GatewayError::EvictingStore(_))
    ));
    redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    assert!(run_on(&redis, false).await.is_ok());

    redis.cmd(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let gw = TestGateway::start_on(EngineKind::Redis, Some(redis), |c| {
        c.allow_redis_eviction = true;
        c.store_check = Duration::from_millis(100);
        c.store_outage_grace = Duration::from_millis(500);
    })
    .await;
    eventually("the metric shows eviction", || async {
        metric(&gw, "ferry_store_may_evict").await == Some(1.0)
    })
    .await;
    gw.redis()
        .cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    eventually("the metric follows the policy", || async {
        metric(&gw, "ferry_store_may_evict").await == Some(0.0)
    })
    .await;
}

// Redis comes back from a crash older than what it answered (it reloads a snapshot that lacks
// the last append, as a machine crash with `appendfsync everysec` or a failover to a lagging
// replica leaves it). The recipient was offline, so no session can notice: the node's audit of
// its recent appends does, and the recipient's resume gets `reset` instead of missing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_lost_in_a_restart_is_reported_by_reset() {
    let mut gw = TestGateway::start_with(EngineKind::Redis, |c| {
        c.store_check = Duration::from_millis(100);
        c.store_outage_grace = Duration::from_secs(5);
    })
    .await;
    let (_, welcome) = gw.raw("bob").await;
    let epoch = epoch_of(&welcome);
    let (mut alice, _) = gw.raw("alice").await;
    raw_send(&mut alice, "m1", "bob", "x").await;
    raw_send(&mut alice, "m2", "bob", "x").await;
    gw.redis().cmd(&["SAVE"]);
    // Answered `sent`, then lost: the snapshot Redis comes back from does not have it.
    assert_eq!(raw_send(&mut alice, "m3", "bob", "x").await, 3);
    gw.redis_mut().kill();
    gw.redis_mut().restart();
    eventually("the audit", || async {
        metric(&gw, "ferry_epochs_replaced_total{reason=\"append_lost\"}").await >= Some(1.0)
    })
    .await;
    let (mut bob, welcome) = gw.raw_resume("bob", 0, Some(&epoch)).await;
    assert!(
        matches!(
            welcome,
            ServerFrame::Welcome {
                reset: true,
                head: 2,
                ..
            }
        ),
        "{welcome:?}"
    );
    assert_eq!(
        raw_messages(&mut bob, 2).await,
        [(1, "m1".to_string()), (2, "m2".to_string())]
    );

    // Redis comes back with nothing at all: the inbox's new epoch tells the clients; the audit
    // still counts the appends it lost (only this test restarts Redis in this binary).
    let before = metric(&gw, "ferry_store_lost_appends_total")
        .await
        .unwrap_or(0.0);
    raw_send(&mut alice, "m4", "bob", "x").await;
    gw.redis().cmd(&["FLUSHALL"]);
    gw.redis().cmd(&["SAVE"]);
    gw.redis_mut().kill();
    gw.redis_mut().restart();
    eventually("the audit counts the lost append", || async {
        metric(&gw, "ferry_store_lost_appends_total").await > Some(before)
    })
    .await;
}
