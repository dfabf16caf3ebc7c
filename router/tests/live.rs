//! The live half of the `Engine` contract and the hub, on both engines: live events in seq order,
//! subscription order, overflow and resync, sessions, lag and leaving.

#[macro_use]
mod common;

use std::sync::Arc;

use common::*;
use ferry_router::{
    CatchUpReason, EngineOptions, Hub, HubOptions, LiveEvent, LiveSignal, Membership, Stored,
};

on_both_engines!(
    subscribed_appends_arrive_live_in_seq_order,
    options(),
    |engine| async move {
        let mut events = live_events(&*engine);
        engine.subscribe(&user("bob")).await.unwrap();
        let expected = fill(&*engine, "bob", "m", 50).await;
        let mut got = Vec::new();
        for _ in 0..50 {
            got.push(next_message(&mut events, "bob").await);
        }
        assert_eq!(got, expected);
        // Messages to users nobody subscribed are not delivered.
        fill(&*engine, "carol", "m", 3).await;
        stored(&*engine, &message("alice", "bob", "last", b"x")).await;
        assert_eq!(next_message(&mut events, "bob").await, 51);
    }
);

on_both_engines!(
    live_event_carries_the_message,
    options(),
    |engine| async move {
        let mut events = live_events(&*engine);
        engine.subscribe(&user("bob")).await.unwrap();
        stored(&*engine, &message("carol", "bob", "c-9", &[1, 2, 255])).await;
        let LiveEvent::Message { user: to, live } = next_event(&mut events).await else {
            panic!("expected a message");
        };
        let Stored::Message(msg) = &live.entry else {
            panic!("undecodable: {live:?}");
        };
        assert_eq!(
            live.epoch.as_str(),
            inbox_state(&*engine, "bob").await.epoch
        );
        assert_eq!(to, user("bob"));
        assert_eq!(msg.from, user("carol"));
        assert_eq!(msg.id.as_str(), "c-9");
        assert_eq!(&msg.body[..], &[1, 2, 255]);
        assert_eq!(read(&*engine, "bob", 0, 1).await[0], *msg);
    }
);

on_both_engines!(
    unsubscribe_stops_live_events,
    options(),
    |engine| async move {
        let mut events = live_events(&*engine);
        engine.subscribe(&user("bob")).await.unwrap();
        stored(&*engine, &message("alice", "bob", "m-1", b"x")).await;
        assert_eq!(next_message(&mut events, "bob").await, 1);
        engine.unsubscribe(&user("bob")).await.unwrap();
        // The unsubscribe resolves at once; a subscription made after it on the same
        // connection (a user of the same slot, so of the same shard on a cluster) is in effect
        // only once bob's is over.
        let carol = same_slot_as("bob");
        engine.subscribe(&user(&carol)).await.unwrap();
        stored(&*engine, &message("alice", "bob", "m-2", b"x")).await;
        stored(&*engine, &message("alice", &carol, "m-1", b"x")).await;
        // The later message arrives first: bob's never came.
        assert_eq!(next_message(&mut events, &carol).await, 1);
    }
);

on_both_engines!(
    requests_apply_in_call_order,
    options(),
    |engine| async move {
        let mut events = live_events(&*engine);
        let bob = user("bob");
        // Futures dropped unpolled still count, and the last request wins.
        drop(engine.subscribe(&bob));
        drop(engine.unsubscribe(&bob));
        let subscribed = engine.subscribe(&bob);
        let unsubscribed = engine.unsubscribe(&bob);
        let last = engine.subscribe(&bob);
        let (a, b, c) = tokio::join!(unsubscribed, last, subscribed);
        a.unwrap();
        b.unwrap();
        c.unwrap();
        stored(&*engine, &message("alice", "bob", "m-1", b"x")).await;
        assert_eq!(next_message(&mut events, "bob").await, 1);
    }
);

fn tiny_live_buffer() -> EngineOptions {
    EngineOptions {
        live_buffer: 2,
        ..options()
    }
}

on_both_engines!(
    live_overflow_resyncs_then_resumes,
    tiny_live_buffer(),
    |engine| async move {
        let (mut events, gate) = gated_live_events(&*engine);
        engine.subscribe(&user("bob")).await.unwrap();
        fill(&*engine, "bob", "m", 6).await;
        gate.open();
        // Whatever was left out is announced by a resync before anything newer arrives live.
        let mut seen = Vec::new();
        let mut resynced = false;
        while !resynced && seen.last() != Some(&6) {
            match next_event(&mut events).await {
                LiveEvent::Message { live, .. } => seen.push(live.entry.seq()),
                LiveEvent::Resync | LiveEvent::ResyncUsers(_) => resynced = true,
            }
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order: {seen:?}");
        assert!(
            resynced || seen == [1, 2, 3, 4, 5, 6],
            "lost without a resync: {seen:?}"
        );
        if engine.name() == "embedded" {
            // Nothing got past the sink while the six appends went in: the embedded bus's
            // buffer of two (and the one event its forwarder may hold) overflowed for certain.
            assert!(
                resynced && (seen == [1, 2] || seen == [1, 2, 3]),
                "{seen:?}"
            );
        }
        stored(&*engine, &message("alice", "bob", "after", b"x")).await;
        loop {
            match next_event(&mut events).await {
                LiveEvent::Message { live, .. } if live.entry.seq() == 7 => break,
                LiveEvent::Message { live, .. } => assert!(live.entry.seq() < 7),
                LiveEvent::Resync | LiveEvent::ResyncUsers(_) => {}
            }
        }
    }
);

/// A user whose keys share `name`'s Redis Cluster slot (whatever the key prefix: the slot is
/// the hash tag's, `{u:<user>}`).
fn same_slot_as(name: &str) -> String {
    let slot = ferry_router::testkit::slot_of(&format!("{{u:{name}}}"));
    (0..)
        .map(|i| format!("carol{i}"))
        .find(|other| ferry_router::testkit::slot_of(&format!("{{u:{other}}}")) == slot)
        .expect("every slot has users")
}

fn hub_with(engine: Arc<dyn ferry_router::Engine>, session_queue: usize) -> Arc<Hub> {
    Hub::new(engine, HubOptions { session_queue })
}

async fn next_signal(membership: &mut Membership) -> LiveSignal {
    within("a live signal", membership.next()).await
}

async fn next_seq(membership: &mut Membership) -> u64 {
    match next_signal(membership).await {
        LiveSignal::Message(live) => live.entry.seq(),
        other => panic!("expected a message, got {other:?}"),
    }
}

on_both_engines!(
    two_sessions_of_a_user_both_receive,
    options(),
    |engine| async move {
        let recorder = Recorder::new(engine);
        let hub = hub_with(recorder.clone(), 16);
        let bob = user("bob");
        let (one, two) = tokio::join!(hub.join(&bob), hub.join(&bob));
        let (mut one, mut two) = (one.unwrap(), two.unwrap());
        assert_eq!(one.user(), &user("bob"));
        assert_eq!((hub.sessions(), hub.users()), (2, 1));
        assert_eq!(
            recorder.calls(),
            ["+bob"],
            "one subscription per user and node"
        );
        stored(&*recorder, &message("alice", "bob", "m-1", b"x")).await;
        assert_eq!(next_seq(&mut one).await, 1);
        assert_eq!(next_seq(&mut two).await, 1);
    }
);

on_both_engines!(
    the_last_leaver_unsubscribes,
    options(),
    |engine| async move {
        let recorder = Recorder::new(engine);
        let hub = hub_with(recorder.clone(), 16);
        let one = hub.join(&user("bob")).await.unwrap();
        let mut two = hub.join(&user("bob")).await.unwrap();
        drop(one);
        assert_eq!((hub.sessions(), hub.users()), (1, 1));
        stored(&*recorder, &message("alice", "bob", "m-1", b"x")).await;
        assert_eq!(next_seq(&mut two).await, 1);
        drop(two);
        assert_eq!((hub.sessions(), hub.users()), (0, 0));
        assert_eq!(recorder.calls(), ["+bob", "-bob"]);
        // Joining again subscribes again, after the unsubscribe.
        let mut three = hub.join(&user("bob")).await.unwrap();
        assert_eq!(recorder.calls(), ["+bob", "-bob", "+bob"]);
        stored(&*recorder, &message("alice", "bob", "m-2", b"x")).await;
        assert_eq!(next_seq(&mut three).await, 2);
    }
);

on_both_engines!(a_cancelled_join_is_undone, options(), |engine| async move {
    let recorder = Recorder::new(engine);
    let hub = hub_with(recorder.clone(), 16);
    // Polled once, then dropped.
    let bob = user("bob");
    {
        let mut join = std::pin::pin!(hub.join(&bob));
        std::future::poll_fn(|cx| {
            let _ = join.as_mut().poll(cx);
            std::task::Poll::Ready(())
        })
        .await;
    }
    assert_eq!((hub.sessions(), hub.users()), (0, 0));
    let mut again = hub.join(&user("bob")).await.unwrap();
    assert_eq!(recorder.calls(), ["+bob", "-bob", "+bob"]);
    stored(&*recorder, &message("alice", "bob", "m-1", b"x")).await;
    assert_eq!(next_seq(&mut again).await, 1);
});

on_both_engines!(
    a_full_session_queue_catches_up_as_lagged,
    options(),
    |engine| async move {
        let hub = hub_with(engine.clone(), 2);
        let mut bob = hub.join(&user("bob")).await.unwrap();
        let mut marker = hub.join(&user("marker")).await.unwrap();
        fill(&*engine, "bob", "m", 5).await;
        // The dispatcher works in order: once the marker's message is out, bob's five were handled.
        stored(&*engine, &message("alice", "marker", "m-1", b"x")).await;
        assert_eq!(next_seq(&mut marker).await, 1);
        assert_eq!(
            next_signal(&mut bob).await,
            LiveSignal::CatchUp(CatchUpReason::Lagged)
        );
        // The flag is cleared and the stale queue discarded; newer messages arrive live again.
        stored(&*engine, &message("alice", "bob", "m-6", b"x")).await;
        assert_eq!(next_seq(&mut bob).await, 6);
    }
);

on_both_engines!(next_is_cancel_safe, options(), |engine| async move {
    let hub = hub_with(engine.clone(), 64);
    let mut bob = hub.join(&user("bob")).await.unwrap();
    let expected = fill(&*engine, "bob", "m", 20).await;
    let mut got = Vec::new();
    let mut ticks = tokio::time::interval(std::time::Duration::from_micros(50));
    while got.len() < expected.len() {
        tokio::select! {
            signal = bob.next() => match signal {
                LiveSignal::Message(live) => got.push(live.entry.seq()),
                other => panic!("unexpected {other:?}"),
            },
            _ = ticks.tick() => {}
        }
    }
    assert_eq!(got, expected);
});
