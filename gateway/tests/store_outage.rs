//! One node cut off from its store: after `--store-outage-grace` of failed checks it fails
//! readiness and sends every session away (`reconnect`, close 1013), an outage shorter than the
//! grace evicts no one, the node serves again when the store is back, and nothing answered `sent`
//! before the outage is lost.
//!
//! Redis only: the embedded engine lives in the gateway's process and its ping always answers,
//! so the watchdog never declares an outage there.

mod common;

use std::time::Duration;

use common::*;
use ferry_shared::ServerFrame;
use ferry_shared::client::RawConnection;

async fn outage_gateway() -> TestGateway {
    TestGateway::start_with(EngineKind::Redis, |c| {
        c.store_check = Duration::from_millis(100);
        c.store_outage_grace = Duration::from_millis(500);
        c.store_timeout = Duration::from_millis(200);
    })
    .await
}

async fn readyz(gateway: &TestGateway) -> u16 {
    gateway.get("/readyz").await.map(|(s, _)| s).unwrap_or(0)
}

/// Past any `msg` already queued, the next frame is `reconnect` with a delay of at most a second,
/// then the close is 1013.
async fn expect_sent_away(conn: &mut RawConnection) {
    loop {
        match next_frame(conn).await {
            ServerFrame::Msg { .. } => continue,
            ServerFrame::Reconnect { after_ms } => {
                assert!(after_ms <= 1000, "after_ms {after_ms}");
                break;
            }
            other => panic!("expected reconnect, got {other:?}"),
        }
    }
    expect_closed(conn, 1013).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_its_store_sends_every_session_away_and_recovers() {
    let gateway = outage_gateway().await;
    let (mut alice, _) = gateway.raw("outage-alice").await;
    let (mut bob, _) = gateway.raw("outage-bob").await;
    let outages_before = metric(&gateway, "ferry_store_outages_total")
        .await
        .unwrap_or(0.0);

    gateway.redis().pause();
    for conn in [&mut alice, &mut bob] {
        expect_sent_away(conn).await;
    }
    let (status, body) = gateway.get("/readyz").await.expect("readyz");
    assert_eq!((status, body.as_str()), (503, "store unreachable\n"));
    assert_eq!(gateway.get("/healthz").await.expect("healthz").0, 200);
    let outages = metric(&gateway, "ferry_store_outages_total").await;
    assert!(outages.unwrap_or(0.0) > outages_before, "{outages:?}");

    gateway.redis().resume();
    eventually("readyz 200 with the store back", || async {
        readyz(&gateway).await == 200
    })
    .await;
    let (mut alice, _) = gateway.raw("outage-alice").await;
    let (mut bob, _) = gateway.raw("outage-bob").await;
    let seq = raw_send(&mut alice, "after-outage", "outage-bob", "back").await;
    assert_eq!(
        raw_messages(&mut bob, 1).await,
        [(seq, "after-outage".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_shorter_than_the_grace_evicts_no_one() {
    let gateway = outage_gateway().await;
    let (mut conn, _) = gateway.raw("blip").await;

    gateway.redis().pause();
    // Holds the outage longer than the store timeout (so checks fail) and shorter than the grace.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gateway.redis().resume();

    // Still served a second and a half later, well past when an outage would have been
    // declared (`ping_pong` fails the test on a close).
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < quiet_until {
        ping_pong(&mut conn).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ping_pong(&mut conn).await;
    assert_eq!(readyz(&gateway).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_before_the_outage_reaches_the_evicted_client() {
    let gateway = outage_gateway().await;
    let (mut alice, _) = gateway.raw("kept-alice").await;
    let (mut bob, welcome) = gateway.raw("kept-bob").await;
    let epoch = epoch_of(&welcome);
    let seq = raw_send(&mut alice, "before-outage", "kept-bob", "kept").await;

    gateway.redis().pause();
    // Bob never acknowledged it; whatever he read live, the inbox still holds it.
    expect_sent_away(&mut bob).await;
    expect_sent_away(&mut alice).await;
    gateway.redis().resume();

    eventually("readyz 200 with the store back", || async {
        readyz(&gateway).await == 200
    })
    .await;
    let (mut bob, welcome) = gateway.raw_resume("kept-bob", 0, Some(&epoch)).await;
    assert_eq!(epoch_of(&welcome), epoch, "the inbox kept its epoch");
    assert_eq!(
        raw_messages(&mut bob, 1).await,
        [(seq, "before-outage".into())]
    );
    no_message(&mut bob, Duration::from_millis(300)).await;
}
