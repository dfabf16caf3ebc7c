//! Redis-only behaviour: what the engine stores in Redis, and how it survives Redis losing data,
//! dropping the pub/sub connection, stopping, freezing and crashing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_router::testkit::{RedisOptions, RedisServer};
use ferry_router::{
    CatchUpReason, Checked, Engine, EngineError, EngineOptions, Hub, HubOptions, LiveSignal,
    Membership, RedisEngine, decode_member,
};
use redis::Value;
use tokio::time::Instant;

const SHORT_TIMEOUT: Duration = Duration::from_millis(300);

fn short_timeout() -> EngineOptions {
    EngineOptions {
        store_timeout: SHORT_TIMEOUT,
        ..options()
    }
}

async fn engine_on(server: &RedisServer, options: EngineOptions) -> Arc<dyn Engine> {
    Arc::new(
        RedisEngine::connect(&server.url(), options, 4)
            .await
            .expect("a valid URL"),
    )
}

/// Polls `check` until it holds, for at most `WAIT`.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn int(value: Value) -> i64 {
    match value {
        Value::Int(n) => n,
        Value::BulkString(b) => String::from_utf8(b).unwrap().parse().unwrap(),
        other => panic!("expected an integer, got {other:?}"),
    }
}

/// Subscribers of `user`'s live channel, as Redis counts them.
fn subscribers(server: &RedisServer, user: &str) -> i64 {
    let channel = format!("ferry:{{u:{user}}}:live");
    match server.cmd(&["PUBSUB", "NUMSUB", &channel]) {
        Value::Array(items) => int(items[1].clone()),
        other => panic!("unexpected NUMSUB answer {other:?}"),
    }
}

async fn next_signal(membership: &mut Membership) -> LiveSignal {
    within("a live signal", membership.next()).await
}

/// Waits for a resync, then appends and expects the message live (after any older ones).
async fn resync_then_live(engine: &dyn Engine, bob: &mut Membership, id: &str) {
    assert_eq!(
        next_signal(bob).await,
        LiveSignal::CatchUp(CatchUpReason::Resync)
    );
    let seq = stored(engine, &message("alice", "bob", id, b"x")).await;
    loop {
        match next_signal(bob).await {
            LiveSignal::Message(live) if live.entry.seq() == seq => break,
            LiveSignal::Message(live) => assert!(live.entry.seq() < seq),
            LiveSignal::CatchUp(_) => {}
        }
    }
}

fn assert_unavailable<T: std::fmt::Debug>(what: &str, result: Result<T, EngineError>) {
    assert!(
        matches!(result, Err(EngineError::Unavailable(_))),
        "{what}: expected unavailable, got {result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_share_the_hash_tag_and_carry_ttls() {
    let server = RedisServer::start();
    let engine = engine_on(
        &server,
        EngineOptions {
            inbox_ttl: Duration::from_secs(3600),
            dedupe_window: Duration::from_secs(60),
            ..options()
        },
    )
    .await;
    stored(&*engine, &message("alice", "bob", "m-1", b"hi")).await;
    let pttl = |key: &str| int(server.cmd(&["PTTL", key]));
    for key in ["ferry:{u:bob}:inbox", "ferry:{u:bob}:meta"] {
        let ttl = pttl(key);
        assert!(ttl > 3_500_000 && ttl <= 3_600_000, "{key}: {ttl}");
    }
    let dedupe = "ferry:{u:bob}:dedupe:alice/m-1";
    assert!((1..=60_000).contains(&pttl(dedupe)));
    assert_eq!(
        server.cmd(&["GET", dedupe]),
        Value::BulkString(b"1".to_vec())
    );
    assert_eq!(int(server.cmd(&["HGET", "ferry:{u:bob}:meta", "seq"])), 1);
    let Value::BulkString(epoch) = server.cmd(&["HGET", "ferry:{u:bob}:meta", "epoch"]) else {
        panic!("no epoch");
    };
    assert_eq!(epoch.len(), 12);
    let Value::Array(members) = server.cmd(&["ZRANGE", "ferry:{u:bob}:inbox", "0", "-1"]) else {
        panic!("no inbox");
    };
    let Value::BulkString(member) = &members[0] else {
        panic!("not a member: {members:?}");
    };
    assert!(member.starts_with(b"1:"));
    let decoded = decode_member(member).unwrap();
    assert_eq!(&decoded.body[..], b"hi");
    assert!(
        decoded.stamp > 1_700_000_000_000_000,
        "a stamp in µs of Redis's clock"
    );

    // The prefix is configurable.
    let other = engine_on(
        &server,
        EngineOptions {
            key_prefix: "other".into(),
            ..options()
        },
    )
    .await;
    stored(&*other, &message("alice", "bob", "m-1", b"x")).await;
    assert_eq!(int(server.cmd(&["ZCARD", "other:{u:bob}:inbox"])), 1);
}

/// A field of `INFO memory`, in bytes.
fn memory(server: &RedisServer, field: &str) -> u64 {
    let Value::BulkString(info) = server.cmd(&["INFO", "memory"]) else {
        panic!("no INFO");
    };
    let info = String::from_utf8(info).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in INFO memory"))
        .trim()
        .parse()
        .unwrap()
}

// Finding H2 (issue 13): a catch-up read loaded a whole page of members (256 of up to 64 KiB:
// 16 MiB) into the script before cutting it at the session's byte bound, so every
// `hello{last_seq:0}` cost Redis that much memory. Now it reads in small chunks and stops at
// the bound: Redis's peak memory rises by a chunk, not a page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_read_holds_a_bounded_number_of_bytes_in_redis() {
    let server = RedisServer::start();
    let engine = engine_on(&server, options()).await;
    let bob = user("bob");
    let body = vec![b'x'; 60 * 1024];
    for i in 0..200 {
        stored(&*engine, &message("alice", "bob", &format!("m{i}"), &body)).await;
    }
    let epoch = epoch(&*engine, "bob").await;
    let before = memory(&server, "used_memory");
    let peak_before = memory(&server, "used_memory_peak");
    let Checked::Valid(page) = engine
        .read_after(&bob, &at(&epoch, 0), 256, 256 * 1024)
        .await
        .unwrap()
    else {
        panic!("void");
    };
    assert_eq!(
        page.entries.len(),
        4,
        "256 KiB holds four members of 60 KiB"
    );
    assert!(page.cut);
    // A chunk of members (16 of 60 KiB here: under 1 MiB) may be loaded beyond the bound, and
    // the reply is copied once more on its way out; the page of 200 members was 12 MiB.
    let rise = memory(&server, "used_memory_peak").max(peak_before) - before;
    assert!(
        rise < 4 * 1024 * 1024,
        "a read raised Redis's peak memory by {rise} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_keys_start_a_new_epoch() {
    let server = RedisServer::start();
    let engine = engine_on(&server, options()).await;
    let bob = user("bob");
    let before = open(&*engine, "bob").await;
    fill(&*engine, "bob", "m", 2).await;
    server.cmd(&["FLUSHALL"]);
    assert_eq!(engine.inbox_state(&bob).await.unwrap(), None);
    let after = open(&*engine, "bob").await;
    assert_ne!(after.epoch, before.epoch);
    assert_eq!(after.head, 0);
    assert_eq!(
        stored(&*engine, &message("alice", "bob", "m-0", b"x")).await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_scripts_are_reloaded() {
    let server = RedisServer::start();
    let engine = engine_on(&server, options()).await;
    fill(&*engine, "bob", "m", 1).await;
    open(&*engine, "bob").await;
    server.cmd(&["SCRIPT", "FLUSH"]);
    assert_eq!(fill(&*engine, "bob", "n", 1).await, [2]);
    assert_eq!(open(&*engine, "bob").await.head, 2);
    assert_eq!(seqs(&read(&*engine, "bob", 0, 10).await), [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_subscribes_once_and_unsubscribes_on_last_leave() {
    let server = RedisServer::start();
    let engine = engine_on(&server, options()).await;
    let hub = Hub::new(engine, HubOptions::default());
    let one = hub.join(&user("bob")).await.unwrap();
    let two = hub.join(&user("bob")).await.unwrap();
    assert_eq!(subscribers(&server, "bob"), 1);
    drop(one);
    drop(two);
    eventually("the unsubscription", async || {
        subscribers(&server, "bob") == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pubsub_connection_reconnects_and_resyncs() {
    let server = RedisServer::start();
    let engine = engine_on(&server, options()).await;
    let hub = Hub::new(engine.clone(), HubOptions::default());
    let mut bob = hub.join(&user("bob")).await.unwrap();
    stored(&*engine, &message("alice", "bob", "m-1", b"x")).await;
    assert!(matches!(next_signal(&mut bob).await, LiveSignal::Message(m) if m.entry.seq() == 1));
    let reconnects = ferry_router::metrics::PUBSUB_RECONNECTS.get();
    assert_eq!(int(server.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"])), 1);
    resync_then_live(&*engine, &mut bob, "m-2").await;
    assert_eq!(subscribers(&server, "bob"), 1);
    assert!(ferry_router::metrics::PUBSUB_RECONNECTS.get() > reconnects);
    // And again: every drop is survived.
    server.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    resync_then_live(&*engine, &mut bob, "m-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_redis_fails_fast_and_recovers_on_restart() {
    let mut server = RedisServer::start();
    let engine = engine_on(&server, short_timeout()).await;
    let hub = Hub::new(engine.clone(), HubOptions::default());
    let mut bob = hub.join(&user("bob")).await.unwrap();
    server.stop();

    let limit = SHORT_TIMEOUT * 3;
    let bob_id = user("bob");
    let started = Instant::now();
    assert_unavailable(
        "append",
        engine.append(&message("a", "bob", "m", b"x")).await,
    );
    let position = at("e", 0);
    assert_unavailable(
        "read",
        engine.read_after(&bob_id, &position, 10, usize::MAX).await,
    );
    assert_unavailable("trim", engine.trim(&bob_id, &position, 1).await);
    assert_unavailable("position", engine.check_position(&bob_id, &position).await);
    assert_unavailable(
        "open",
        engine.open_inbox(&bob_id, &DEFAULT_DEVICE, None).await,
    );
    assert_unavailable("end", engine.end_epoch(&bob_id, "e").await);
    assert_unavailable("check", engine.check().await);
    assert_unavailable("state", engine.inbox_state(&bob_id).await);
    assert_unavailable("ping", engine.ping().await);
    assert!(
        started.elapsed() < limit * 6,
        "took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_unavailable("join", hub.join(&user("carol")).await);
    assert!(
        started.elapsed() < limit,
        "join took {:?}",
        started.elapsed()
    );
    assert_eq!(hub.users(), 1, "the failed join was undone");

    server.restart();
    eventually("the store", async || engine.ping().await.is_ok()).await;
    resync_then_live(&*engine, &mut bob, "after-restart").await;
    let mut carol = hub.join(&user("carol")).await.unwrap();
    stored(&*engine, &message("alice", "carol", "m-1", b"x")).await;
    assert!(matches!(next_signal(&mut carol).await, LiveSignal::Message(m) if m.entry.seq() == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_times_out_instead_of_hanging() {
    let server = RedisServer::start();
    let engine = engine_on(&server, short_timeout()).await;
    engine.ping().await.unwrap();
    server.pause();
    for _ in 0..2 {
        let started = Instant::now();
        assert_unavailable(
            "append",
            engine.append(&message("a", "bob", "m", b"x")).await,
        );
        let took = started.elapsed();
        assert!(
            took >= SHORT_TIMEOUT && took < SHORT_TIMEOUT * 3,
            "took {took:?}"
        );
    }
    let started = Instant::now();
    let position = at("e", 0);
    assert_unavailable(
        "read",
        engine
            .read_after(&user("bob"), &position, 1, usize::MAX)
            .await,
    );
    assert!(started.elapsed() < SHORT_TIMEOUT * 3);
    server.resume();
    eventually("the store", async || engine.ping().await.is_ok()).await;
    let seq = stored(&*engine, &message("a", "bob", "m2", b"x")).await;
    assert!(seq >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_with_appendfsync_always_keeps_every_stored_message() {
    let mut server = RedisServer::start_with(RedisOptions {
        appendonly: true,
        appendfsync_always: true,
        replica_of: None,
    });
    let engine = engine_on(&server, options()).await;
    let hub = Hub::new(engine.clone(), HubOptions::default());
    let mut bob = hub.join(&user("bob")).await.unwrap();
    let before = open(&*engine, "bob").await;
    fill(&*engine, "bob", "m", 3).await;
    let pid = server.pid();
    server.kill();
    server.restart();
    assert_ne!(server.pid(), pid);
    eventually("the store", async || engine.ping().await.is_ok()).await;
    let inbox = read(&*engine, "bob", 0, 10).await;
    assert_eq!(seqs(&inbox), [1, 2, 3]);
    assert_eq!(inbox_state(&*engine, "bob").await.epoch, before.epoch);
    // Live delivery resumes after a resync (skipping the three pre-crash live messages).
    loop {
        match next_signal(&mut bob).await {
            LiveSignal::Message(m) => assert!(m.entry.seq() <= 3),
            LiveSignal::CatchUp(CatchUpReason::Resync) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        stored(&*engine, &message("alice", "bob", "m-9", b"x")).await,
        4
    );
    assert!(matches!(next_signal(&mut bob).await, LiveSignal::Message(m) if m.entry.seq() == 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_needs_no_redis_but_a_valid_url() {
    for bad in ["not a url", "http://127.0.0.1:6379/"] {
        assert!(
            matches!(
                RedisEngine::connect(bad, options(), 2).await,
                Err(EngineError::Internal(_))
            ),
            "{bad}"
        );
    }
    let mut server = RedisServer::start();
    server.stop();
    let engine = engine_on(&server, short_timeout()).await;
    assert_unavailable("ping", engine.ping().await);
    assert_unavailable("subscribe", engine.subscribe(&user("bob")).await);
    server.restart();
    eventually("the store", async || engine.ping().await.is_ok()).await;
    let mut events = live_events(&*engine);
    eventually("the subscription", async || {
        engine.subscribe(&user("bob")).await.is_ok()
    })
    .await;
    stored(&*engine, &message("alice", "bob", "m-1", b"x")).await;
    assert_eq!(next_message(&mut events, "bob").await, 1);
}
