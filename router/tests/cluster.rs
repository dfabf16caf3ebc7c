//! The Redis engine on a Redis Cluster that changes under it: pub/sub connections killed, a slot
//! moved, a coordinated failover, a primary killed and replaced by its replica (whose script
//! cache is empty), scripts flushed, replicas frozen. Each test has a cluster of its own
//! (3 primaries × 1 replica), since it disrupts it. The behaviour tests that don't disrupt run
//! on the shared cluster through `on_both_engines!`.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_router::testkit::{ClusterOptions, RedisCluster};
use ferry_router::{
    AppendOutcome, Engine, EngineError, EngineOptions, LiveEvent, RedisEngine, RedisTarget,
};
use ferry_shared::UserId;
use tokio::sync::mpsc;

/// Longer than `WAIT`: a failover takes the node timeout (1 s) and an election.
const FAILOVER_WAIT: Duration = Duration::from_secs(30);

async fn engine_on(cluster: &RedisCluster) -> Arc<RedisEngine> {
    let target = RedisTarget {
        urls: cluster.seed_urls(),
        cluster: true,
        ..RedisTarget::default()
    };
    let options = EngineOptions {
        store_timeout: Duration::from_secs(1),
        ..options()
    };
    Arc::new(
        RedisEngine::connect_to(&target, options, 4)
            .await
            .expect("valid seed URLs"),
    )
}

/// A Redis engine on `cluster` with its live events, and `per_shard` users of every shard
/// subscribed.
async fn subscribed_engine(
    cluster: &RedisCluster,
    per_shard: usize,
) -> (
    Arc<RedisEngine>,
    mpsc::UnboundedReceiver<LiveEvent>,
    Vec<String>,
) {
    let engine = engine_on(cluster).await;
    let events = live_events(&*engine);
    let users = users_on_every_shard(cluster, per_shard);
    for name in &users {
        within("subscribe", engine.subscribe(&user(name)))
            .await
            .expect("subscribed");
    }
    (engine, events, users)
}

/// Runs the kit's blocking call without stalling the runtime.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// The slot of `name`'s keys under the engine's default prefix.
fn slot(cluster: &RedisCluster, name: &str) -> u16 {
    cluster.slot_of(&format!("ferry:{{u:{name}}}:meta"))
}

/// How many connections are subscribed to `name`'s live channel on the primary on `port`.
fn subscribers(cluster: &RedisCluster, port: u16, name: &str) -> i64 {
    let channel = format!("ferry:{{u:{name}}}:live");
    match cluster
        .node_by_port(port)
        .cmd(&["PUBSUB", "SHARDNUMSUB", &channel])
    {
        redis::Value::Array(pair) => match pair.as_slice() {
            [_, redis::Value::Int(n)] => *n,
            other => panic!("PUBSUB SHARDNUMSUB answered {other:?}"),
        },
        other => panic!("PUBSUB SHARDNUMSUB answered {other:?}"),
    }
}

/// `subscribers` on the primary that owns `name`'s slot.
fn subscribers_at_owner(cluster: &RedisCluster, name: &str) -> i64 {
    subscribers(cluster, cluster.primary_for_slot(slot(cluster, name)), name)
}

/// Users spread over every primary, `per_shard` of each.
fn users_on_every_shard(cluster: &RedisCluster, per_shard: usize) -> Vec<String> {
    let mut counts: HashMap<u16, usize> = cluster
        .primaries()
        .into_iter()
        .map(|port| (port, 0))
        .collect();
    let mut users = Vec::new();
    for i in 0.. {
        let name = format!("u{i}");
        let owner = cluster.primary_for_slot(slot(cluster, &name));
        let count = counts.get_mut(&owner).expect("a primary");
        if *count < per_shard {
            *count += 1;
            users.push(name);
        }
        if counts.values().all(|&c| c == per_shard) {
            break;
        }
    }
    users
}

/// Appends until stored: during a failover or a move, appends may be `Unavailable` for a while,
/// and the retry is safe (the same id is a duplicate, never a second message).
async fn stored_eventually(engine: &dyn Engine, from: &str, to: &str, id: &str) -> u64 {
    let msg = message(from, to, id, b"x");
    let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
    loop {
        match engine.append(&msg).await {
            Ok(AppendOutcome::Stored { seq } | AppendOutcome::Duplicate { seq }) => return seq,
            Ok(other) => panic!("append of {id} to {to}: {other:?}"),
            Err(EngineError::Unavailable(why)) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "append of {id} to {to} still unavailable: {why}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("append of {id} to {to}: {e:?}"),
        }
    }
}

/// What became of one round of appends: who got its message live, who was told to resync.
#[derive(Default)]
struct Outcome {
    live: HashSet<UserId>,
    resynced: HashSet<UserId>,
}

/// Appends one message to each user; each must then get it live or be told to resync (the
/// engine's contract: a live message missed is always followed by a resync of its user).
async fn round(
    engine: &dyn Engine,
    events: &mut mpsc::UnboundedReceiver<LiveEvent>,
    users: &[String],
    tag: &str,
) -> Outcome {
    let mut outcome = Outcome::default();
    // Events from before this round's appends.
    while let Ok(event) = events.try_recv() {
        if let LiveEvent::ResyncUsers(some) = event {
            outcome.resynced.extend(some);
        }
    }
    let earlier = std::mem::take(&mut outcome.resynced);
    let mut expected = HashMap::new();
    for name in users {
        let seq = stored_eventually(engine, "alice", name, &format!("{tag}-{name}")).await;
        expected.insert(user(name), seq);
    }
    let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
    while !expected.is_empty() {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("neither live nor resynced: {:?}", expected.keys()))
            .expect("the sink is open");
        match event {
            LiveEvent::Message { user, live } => {
                if expected.get(&user) == Some(&live.entry.seq()) {
                    expected.remove(&user);
                    outcome.live.insert(user);
                }
            }
            LiveEvent::ResyncUsers(some) => {
                for user in some {
                    expected.remove(&user);
                    outcome.resynced.insert(user);
                }
            }
            LiveEvent::Resync => panic!("the Redis engine resyncs by user"),
        }
    }
    outcome.resynced.extend(earlier);
    outcome
}

/// Rounds until one delivers every message live (the subscriptions are where they belong
/// again); returns every user resynced on the way.
async fn until_all_live(
    engine: &dyn Engine,
    events: &mut mpsc::UnboundedReceiver<LiveEvent>,
    users: &[String],
    tag: &str,
) -> HashSet<UserId> {
    let mut resynced = HashSet::new();
    for attempt in 0..20 {
        let outcome = round(engine, events, users, &format!("{tag}{attempt}")).await;
        resynced.extend(outcome.resynced);
        if outcome.live.len() == users.len() {
            return resynced;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("live delivery did not come back for every user after {tag}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pubsub_connections_resubscribe_every_slot_and_resync() {
    bounded(async {
        let cluster = RedisCluster::start(ClusterOptions::default());
        // Many slots on every shard: a resubscribe that put several slots in one SSUBSCRIBE
        // would be refused with CROSSSLOT.
        let (engine, mut events, users) = subscribed_engine(&cluster, 8).await;
        until_all_live(&*engine, &mut events, &users, "before").await;

        for port in cluster.primaries() {
            cluster.cli(port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
        }
        // Every user is subscribed again, on its slot's primary, and told to resync.
        let mut resynced = HashSet::new();
        let wanted: HashSet<UserId> = users.iter().map(|n| user(n)).collect();
        while !wanted.is_subset(&resynced) {
            match within("resyncs after the kill", events.recv()).await {
                Some(LiveEvent::ResyncUsers(some)) => resynced.extend(some),
                Some(_) => {}
                None => panic!("the sink closed"),
            }
        }
        for name in &users {
            assert_eq!(subscribers_at_owner(&cluster, name), 1, "{name}");
        }
        until_all_live(&*engine, &mut events, &users, "after").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_slot_is_followed_and_its_users_resynced() {
    bounded(async {
        let cluster = RedisCluster::start(ClusterOptions::default());
        let (engine, mut events, users) = subscribed_engine(&cluster, 2).await;
        until_all_live(&*engine, &mut events, &users, "before").await;

        let bob = users[0].clone();
        let from = cluster.primary_for_slot(slot(&cluster, &bob));
        let to = cluster
            .primaries()
            .into_iter()
            .find(|&p| p != from)
            .expect("another primary");
        blocking(|| cluster.migrate_slot(slot(&cluster, &bob), to));

        // Redis drops the slot's subscriptions with an unsolicited sunsubscribe; the engine
        // subscribes the user at the new owner and resyncs it.
        let resynced = until_all_live(&*engine, &mut events, &users, "after").await;
        assert!(
            resynced.contains(&user(&bob)),
            "bob was resynced: {resynced:?}"
        );
        assert_eq!(subscribers(&cluster, to, &bob), 1, "at the new owner");
        // The inbox moved with its slot: nothing was lost, nothing repeated.
        let seqs: Vec<u64> = read(&*engine, &bob, 0, 100)
            .await
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_and_a_killed_primary_keep_the_store_and_live_path_working() {
    bounded(async {
        let mut cluster = RedisCluster::start(ClusterOptions::default());
        let (engine, mut events, users) = subscribed_engine(&cluster, 2).await;
        until_all_live(&*engine, &mut events, &users, "start").await;
        within("check", engine.check())
            .await
            .expect("every primary answers");

        // A coordinated failover: the replica takes over with everything.
        let bob = users[0].clone();
        let bob_slot = slot(&cluster, &bob);
        let primary = cluster.primary_for_slot(bob_slot);
        let replica = cluster.replicas_of(primary)[0];
        blocking(|| cluster.failover(replica));
        until_all_live(&*engine, &mut events, &users, "after-failover").await;

        // The new primary is killed: the check names its shard while its slots have no
        // primary, and still answers (the other shards are up).
        let killed = cluster.primary_for_slot(bob_slot);
        blocking(|| cluster.kill_primary(killed));
        let report = within("check", engine.check())
            .await
            .expect("the other primaries answer");
        assert!(!report.shards_down.is_empty(), "the dead primary is named");
        let promoted = blocking(|| cluster.wait_for_new_primary(bob_slot));
        assert_ne!(promoted, killed);
        // Scripts were never loaded on the promoted node (Redis 7 does not replicate SCRIPT
        // LOAD): the engine's EVALSHA gets NOSCRIPT and sends the script itself.
        let deadline = tokio::time::Instant::now() + FAILOVER_WAIT;
        while !engine
            .check()
            .await
            .is_ok_and(|report| report.shards_down.is_empty())
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a shard stayed down"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resynced = until_all_live(&*engine, &mut events, &users, "after-kill").await;
        assert!(
            resynced.contains(&user(&bob)),
            "bob was resynced: {resynced:?}"
        );

        // Scripts flushed everywhere: the same recovery.
        for port in cluster.primaries() {
            cluster.cli(port, &["SCRIPT", "FLUSH"]);
        }
        until_all_live(&*engine, &mut events, &users, "after-flush").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_replicas_change_nothing_since_only_primaries_are_read() {
    bounded(async {
        let cluster = RedisCluster::start(ClusterOptions::default());
        let (engine, mut events, users) = subscribed_engine(&cluster, 2).await;
        let primaries = cluster.primaries();
        let replicas: Vec<u16> = primaries
            .iter()
            .flat_map(|&p| cluster.replicas_of(p))
            .collect();
        for &port in &replicas {
            cluster.node_by_port(port).pause();
        }
        let resynced = until_all_live(&*engine, &mut events, &users, "frozen").await;
        assert!(resynced.is_empty(), "nothing to resync: {resynced:?}");
        for name in &users {
            let messages = read(&*engine, name, 0, 10).await;
            assert_eq!(messages.len(), 1, "{name}'s inbox, as just written");
        }
        within("check", engine.check())
            .await
            .expect("primaries answer");
        for &port in &replicas {
            cluster.node_by_port(port).resume();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribes_leave_no_subscription_behind() {
    bounded(async {
        // Not disruptive: the shared cluster, under the default prefix no other test here uses
        // on it.
        let cluster = RedisCluster::shared();
        // Several slots on every shard: an unsubscribe naming channels of several slots in one
        // SUNSUBSCRIBE is refused with CROSSSLOT and would leave them all subscribed.
        let (engine, _events, users) = subscribed_engine(cluster, 8).await;
        let counts = |expected: i64| {
            users
                .iter()
                .filter(|name| subscribers_at_owner(cluster, name) != expected)
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(counts(1), Vec::<String>::new(), "not subscribed");
        for name in &users {
            within("unsubscribe", engine.unsubscribe(&user(name)))
                .await
                .expect("unsubscribed");
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = counts(0);
            if left.is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still subscribed in Redis: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}
