//! Positions checked by the store (issue 9): reads, trims and position checks act only on a
//! position the inbox still backs, and end the epoch when the inbox went back in time; `open`
//! ends it for a claim beyond the head; `end_epoch` is a compare-and-set; a read carries the head
//! it checked (issue 14). On both engines, plus what only Redis can do to an inbox (reused seqs,
//! a lost `meta`, an undecodable member).

#[macro_use]
mod common;

use std::sync::Arc;

use common::*;
use ferry_router::testkit::RedisServer;
use ferry_router::{Checked, Engine, Page, Position, RedisEngine, Stored};

fn position(epoch: &str, delivered: u64, stamp: u64) -> Position<'_> {
    Position {
        epoch,
        delivered,
        stamp,
        device: &DEFAULT_DEVICE,
    }
}

on_both_engines!(
    another_epoch_is_void_and_changes_nothing,
    options(),
    |engine| async move {
        fill(&*engine, "bob", "m", 3).await;
        let bob = user("bob");
        let stale = position("not-this-one", 3, 0);
        assert_eq!(
            engine
                .read_after(&bob, &stale, 10, usize::MAX)
                .await
                .unwrap(),
            Checked::Void
        );
        assert_eq!(engine.trim(&bob, &stale, 3).await.unwrap(), Checked::Void);
        assert_eq!(
            engine.check_position(&bob, &stale).await.unwrap(),
            Checked::Void
        );
        // Nothing was trimmed, and the epoch stands.
        assert_eq!(seqs(&read(&*engine, "bob", 0, 10).await), [1, 2, 3]);
        let state = inbox_state(&*engine, "bob").await;
        let current = position(&state.epoch, 1, 0);
        assert_eq!(
            engine.check_position(&bob, &current).await.unwrap(),
            Checked::Valid(3)
        );
    }
);

on_both_engines!(
    a_head_below_what_was_delivered_ends_the_epoch,
    options(),
    |engine| async move {
        fill(&*engine, "bob", "m", 3).await;
        let bob = user("bob");
        let before = inbox_state(&*engine, "bob").await;
        // A session that was delivered 5 of an inbox whose head is 3: the store went back.
        let ahead = position(&before.epoch, 5, 0);
        assert_eq!(engine.trim(&bob, &ahead, 5).await.unwrap(), Checked::Void);
        let after = inbox_state(&*engine, "bob").await;
        assert_ne!(after.epoch, before.epoch, "the epoch was ended");
        assert_eq!(after.head, 3, "the head and messages are kept");
        assert_eq!(seqs(&read(&*engine, "bob", 0, 10).await), [1, 2, 3]);
        // Every other session of the old epoch is void from now on.
        let behind = position(&before.epoch, 1, 0);
        assert_eq!(
            engine
                .read_after(&bob, &behind, 10, usize::MAX)
                .await
                .unwrap(),
            Checked::Void
        );
    }
);

on_both_engines!(
    open_ends_the_epoch_for_a_claim_beyond_the_head,
    options(),
    |engine| async move {
        let bob = user("bob");
        fill(&*engine, "bob", "m", 2).await;
        let epoch = inbox_state(&*engine, "bob").await.epoch;
        // Within the head, or of another epoch: nothing changes.
        let within = engine
            .open_inbox(&bob, &DEFAULT_DEVICE, Some((&epoch, 2)))
            .await
            .unwrap();
        assert_eq!((within.epoch.as_str(), within.head), (epoch.as_str(), 2));
        let other = engine
            .open_inbox(&bob, &DEFAULT_DEVICE, Some(("zzzz", 9)))
            .await
            .unwrap();
        assert_eq!(other.epoch, epoch);
        // Beyond the head of the same epoch: ended in the same step.
        let beyond = engine
            .open_inbox(&bob, &DEFAULT_DEVICE, Some((&epoch, 3)))
            .await
            .unwrap();
        assert_ne!(beyond.epoch, epoch);
        assert_eq!(beyond.head, 2);
        assert_eq!(inbox_state(&*engine, "bob").await.epoch, beyond.epoch);
    }
);

on_both_engines!(
    end_epoch_is_a_compare_and_set,
    options(),
    |engine| async move {
        let bob = user("bob");
        fill(&*engine, "bob", "m", 1).await;
        let epoch = inbox_state(&*engine, "bob").await.epoch;
        assert!(!engine.end_epoch(&bob, "another").await.unwrap());
        assert_eq!(inbox_state(&*engine, "bob").await.epoch, epoch);
        assert!(engine.end_epoch(&bob, &epoch).await.unwrap());
        assert!(!engine.end_epoch(&bob, &epoch).await.unwrap(), "ended once");
        assert!(!engine.end_epoch(&user("nobody"), &epoch).await.unwrap());
        assert_ne!(inbox_state(&*engine, "bob").await.epoch, epoch);
        // Messages and seqs go on under the new epoch.
        assert_eq!(fill(&*engine, "bob", "n", 1).await, [2]);
    }
);

on_both_engines!(
    stamps_order_the_writes_of_an_inbox,
    options(),
    |engine| async move {
        let bob = user("bob");
        let opened = engine
            .open_inbox(&bob, &DEFAULT_DEVICE, None)
            .await
            .unwrap();
        fill(&*engine, "bob", "m", 3).await;
        let messages = read(&*engine, "bob", 0, 10).await;
        let stamps: Vec<u64> = messages.iter().map(|m| m.stamp).collect();
        assert!(
            stamps.windows(2).all(|w| w[0] < w[1]),
            "increasing: {stamps:?}"
        );
        assert!(opened.stamp < stamps[0], "opened before the first write");
        // A position whose stamp covers what it delivered is valid.
        let at = position(&opened.epoch, 3, stamps[2]);
        assert!(matches!(
            engine.read_after(&bob, &at, 10, usize::MAX).await.unwrap(),
            Checked::Valid(page) if page.entries.is_empty()
        ));
    }
);

/// A page of bob's inbox read from `at`, which must be valid.
async fn page(engine: &dyn Engine, at: &Position<'_>, limit: usize) -> Page {
    match engine.read_after(&user("bob"), at, limit, usize::MAX).await {
        Ok(Checked::Valid(page)) => page,
        other => panic!("read from {}: {other:?}", at.delivered),
    }
}

// A read carries the head it checked (issue 14): a session whose complete read finds nothing
// after its position learns that everything up to that head is gone, and steps to it instead
// of reading nothing again at every position check.
on_both_engines!(
    a_read_carries_the_head_it_checked,
    options(),
    |engine| async move {
        fill(&*engine, "bob", "m", 5).await;
        let epoch = inbox_state(&*engine, "bob").await.epoch;
        let first = page(&*engine, &position(&epoch, 0, 0), 2).await;
        assert_eq!(
            (first.entries.len(), first.head),
            (2, 5),
            "a page cut by its limit"
        );
        let rest = page(&*engine, &position(&epoch, 3, 0), 10).await;
        assert_eq!((rest.entries.len(), rest.head), (2, 5));
        // The device acknowledged everything (on another connection) and the trim took it: a
        // connection still at 2 reads nothing, up to a head of 5.
        trim(&*engine, "bob", 5).await;
        let behind = page(&*engine, &position(&epoch, 2, 0), 10).await;
        assert!(behind.entries.is_empty() && !behind.cut);
        assert_eq!((behind.floor, behind.device_acked, behind.head), (5, 5, 5));
        assert_eq!(fill(&*engine, "bob", "n", 1).await, [6]);
        let next = page(&*engine, &position(&epoch, 2, 0), 10).await;
        assert_eq!((seqs_of(&next), next.head), (vec![6], 6));
    }
);

fn seqs_of(page: &Page) -> Vec<u64> {
    page.entries.iter().map(Stored::seq).collect()
}

async fn redis_engine(server: &RedisServer) -> Arc<dyn Engine> {
    Arc::new(
        RedisEngine::connect(&server.url(), options(), 2)
            .await
            .expect("a valid URL"),
    )
}

// The store went back under the same epoch and new appends reused seqs 3-5 up to the head the
// session had: only the stamps tell. The read ends the epoch instead of skipping them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_seq_ends_the_epoch() {
    let server = RedisServer::start();
    let engine = redis_engine(&server).await;
    let bob = user("bob");
    fill(&*engine, "bob", "m", 5).await;
    let delivered = read(&*engine, "bob", 0, 10).await;
    let epoch = inbox_state(&*engine, "bob").await.epoch;
    let session = position(&epoch, 5, delivered[4].stamp);
    // What a replica that missed the last three appends holds.
    server.cmd(&["HSET", "ferry:{u:bob}:meta", "seq", "2"]);
    server.cmd(&["ZREMRANGEBYSCORE", "ferry:{u:bob}:inbox", "3", "+inf"]);
    assert_eq!(fill(&*engine, "bob", "new", 3).await, [3, 4, 5]);
    assert_eq!(
        engine.check_position(&bob, &session).await.unwrap(),
        Checked::Void
    );
    let state = inbox_state(&*engine, "bob").await;
    assert_ne!(state.epoch, epoch);
    assert_eq!(state.head, 5);
    let ids: Vec<String> = read(&*engine, "bob", 0, 10)
        .await
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(ids, ["m-0", "m-1", "new-0", "new-1", "new-2"]);
}

// `meta` evicted alone: the new epoch adopts the messages left and counts on above them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_epoch_adopts_a_leftover_inbox() {
    let server = RedisServer::start();
    let engine = redis_engine(&server).await;
    fill(&*engine, "bob", "m", 3).await;
    trim(&*engine, "bob", 1).await;
    let before = inbox_state(&*engine, "bob").await;
    server.cmd(&["DEL", "ferry:{u:bob}:meta"]);
    let opened = open(&*engine, "bob").await;
    assert_ne!(opened.epoch, before.epoch);
    assert_eq!(opened.head, 3);
    assert_eq!(fill(&*engine, "bob", "n", 1).await, [4]);
    assert_eq!(seqs(&read(&*engine, "bob", 0, 10).await), [2, 3, 4]);
    // The same through an append, with no open first.
    server.cmd(&["DEL", "ferry:{u:bob}:meta"]);
    assert_eq!(fill(&*engine, "bob", "o", 1).await, [5]);
}

// A member that cannot be decoded comes back as such, once: the read moves it to quarantine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_member_is_read_once_and_quarantined() {
    let server = RedisServer::start();
    let engine = redis_engine(&server).await;
    let bob = user("bob");
    fill(&*engine, "bob", "m", 1).await;
    server.cmd(&["HINCRBY", "ferry:{u:bob}:meta", "seq", "1"]);
    server.cmd(&["ZADD", "ferry:{u:bob}:inbox", "2", "2:77:garbage"]);
    fill(&*engine, "bob", "n", 1).await;
    let epoch = epoch(&*engine, "bob").await;
    let Checked::Valid(Page { entries, .. }) = engine
        .read_after(&bob, &at(&epoch, 0), 10, usize::MAX)
        .await
        .unwrap()
    else {
        panic!("void");
    };
    assert!(matches!(entries[0], Stored::Message(ref m) if m.seq == 1));
    assert_eq!(entries[1], Stored::Undecodable { seq: 2, stamp: 77 });
    assert!(matches!(entries[2], Stored::Message(ref m) if m.seq == 3));
    assert_eq!(seqs(&read(&*engine, "bob", 0, 10).await), [1, 3]);
    assert_eq!(
        server.cmd(&["ZCARD", "ferry:{u:bob}:quarantine"]),
        redis::Value::Int(1)
    );
}
