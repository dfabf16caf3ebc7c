//! A sender's store quota kept in the store (issue 13, H4): one token bucket per user that every
//! node takes from, so the bytes a user stores per second are bounded across the cluster. The
//! embedded engine serves one node and grants everything (its node's own bucket is the bound).

#[macro_use]
mod common;

use common::*;

on_both_engines!(
    a_quota_grants_what_its_bucket_holds,
    options(),
    |engine| async move {
        let alice = user("alice");
        // A burst of 1,000 bytes refilled at one byte per second: nothing refills during the test.
        let take = |want| {
            let engine = engine.clone();
            let alice = alice.clone();
            async move { engine.take_quota(&alice, want, 1, 1_000).await.unwrap() }
        };
        if !engine.shares_quota() {
            assert_eq!(take(5_000).await, 5_000);
            return;
        }
        assert_eq!(take(600).await, 600);
        assert_eq!(take(600).await, 400, "what is left");
        assert_eq!(take(100).await, 0);
        // Every user has a bucket of its own.
        assert_eq!(
            engine
                .take_quota(&user("bob"), 700, 1, 1_000)
                .await
                .unwrap(),
            700
        );
    }
);

on_both_engines!(
    a_quota_refills_at_its_rate,
    options(),
    |engine| async move {
        if !engine.shares_quota() {
            return;
        }
        let alice = user("alice");
        assert_eq!(
            engine
                .take_quota(&alice, 10_000, 10_000, 10_000)
                .await
                .unwrap(),
            10_000
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // About 2,000 bytes came back (10,000 per second); never more than the burst.
        let refilled = engine
            .take_quota(&alice, 10_000, 10_000, 10_000)
            .await
            .unwrap();
        assert!((1_500..=10_000).contains(&refilled), "{refilled}");
    }
);

// A node that forgets its lease settles it: bytes spent ahead of the grants are charged (the
// bucket may go below zero and the user waits for it to refill), unspent ones given back.
on_both_engines!(a_lease_is_settled, options(), |engine| async move {
    if !engine.shares_quota() {
        return;
    }
    let alice = user("alice");
    assert_eq!(
        engine.take_quota(&alice, 1_000, 1, 1_000).await.unwrap(),
        1_000
    );
    engine.settle_quota(&alice, 500, 1, 1_000).await.unwrap();
    engine.settle_quota(&alice, -300, 1, 1_000).await.unwrap();
    // 300 given back, 500 owed: nothing to grant until 200 more have refilled.
    assert_eq!(engine.take_quota(&alice, 100, 1, 1_000).await.unwrap(), 0);
    engine.settle_quota(&alice, -5_000, 1, 1_000).await.unwrap();
    // Given back beyond the burst, the bucket is full, no more.
    assert_eq!(
        engine.take_quota(&alice, 5_000, 1, 1_000).await.unwrap(),
        1_000
    );
});
