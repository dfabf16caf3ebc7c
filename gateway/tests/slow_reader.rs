//! A recipient that stops reading while thousands of messages arrive: the gateway keeps serving
//! everyone else, its session stops queueing (lags) instead of buffering without bound, and
//! nothing is lost: when the reader reads again, or reconnects, every seq arrives once, in order.

mod common;

use std::time::Duration;

use common::*;
use ferry_shared::ServerFrame;
use ferry_shared::client::{RawConnection, RawEvent};
use tokio::sync::Mutex;

/// Messages in the flood.
const FLOOD: u64 = 2000;
/// Body size: the flood (16 MiB) must be well over what the socket buffers absorb (a few MiB on
/// loopback; a 2 MiB flood went out without the session ever lagging on the Redis engine).
const BODY_BYTES: usize = 8 * 1024;
/// Sends written before their answers are read.
const WINDOW: u64 = 100;
/// Upper bound on any of these tests' phases.
const PHASE: Duration = Duration::from_secs(15);

/// The lag metrics are process-wide: one slow-reader test at a time, so each test's readings
/// are its own.
static SERIAL: Mutex<()> = Mutex::const_new(());

async fn slow_gateway(kind: EngineKind) -> TestGateway {
    slow_gateway_with(kind, |_| {}).await
}

/// `slow_gateway` with `tweak` applied last.
async fn slow_gateway_with(
    kind: EngineKind,
    tweak: impl FnOnce(&mut ferry_gateway::Config),
) -> TestGateway {
    TestGateway::start_with(kind, |c| {
        c.outbound_queue = 16;
        c.outbound_queue_bytes = 64 * 1024;
        c.write_timeout = Duration::from_secs(30);
        c.catchup_page = 8;
        c.send_rate = 1_000_000.0;
        c.send_burst = 1_000_000;
        c.store_bytes_rate = 1e12;
        tweak(c);
    })
    .await
}

/// How the gateway saw the flood.
#[derive(Debug, Default)]
struct Observed {
    /// Highest `ferry_sessions_lagging` seen while flooding.
    max_lagging: f64,
}

/// Sends `from..=to` (ids `m<seq>`, `BODY_BYTES` bodies) to `recipient`, pipelined by `WINDOW`,
/// checking each answer is `sent` with the expected seq; samples the lag gauge after each window.
async fn flood(
    gateway: &TestGateway,
    sender: &mut RawConnection,
    recipient: &str,
    from: u64,
    to: u64,
    observed: &mut Observed,
) {
    let body = "x".repeat(BODY_BYTES);
    let mut next = from;
    while next <= to {
        let end = (next + WINDOW - 1).min(to);
        for seq in next..=end {
            let frame = send_frame(&format!("m{seq}"), recipient, &body);
            sender.send_frame(&frame).await.expect("send");
        }
        for seq in next..=end {
            match next_frame(sender).await {
                ServerFrame::Sent {
                    id,
                    seq: got,
                    duplicate: false,
                    ..
                } if id == format!("m{seq}") => {
                    assert_eq!(got, seq, "seq of m{seq}");
                }
                other => panic!("answer to m{seq}: {other:?}"),
            }
        }
        let lagging = metric(gateway, "ferry_sessions_lagging")
            .await
            .unwrap_or(0.0);
        observed.max_lagging = observed.max_lagging.max(lagging);
        next = end + 1;
    }
}

/// Reads `msg` frames until seq `last`; every seq from `first` to `last` must come exactly once
/// and in order, and nothing after it.
async fn read_all_in_order(conn: &mut RawConnection, first: u64, last: u64) {
    let deadline = tokio::time::Instant::now() + PHASE;
    let mut expected = first;
    while expected <= last {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = conn.next_frame(left).await.unwrap_or_else(|e| {
            panic!("{e}: only seqs {first}..{expected} of {first}..={last} arrived")
        });
        match event {
            RawEvent::Frame(ServerFrame::Msg { seq, id, body, .. }) => {
                assert_eq!(seq, expected, "seqs arrive once each, in order");
                assert_eq!(id, format!("m{seq}"));
                assert_eq!(body.0.len(), BODY_BYTES);
                expected += 1;
            }
            RawEvent::Frame(_) => {}
            RawEvent::Closed { code, reason } => {
                panic!("closed ({code:?}, {reason}) after seq {}", expected - 1)
            }
        }
    }
    no_message(conn, Duration::from_millis(300)).await;
}

async fn lagged_catchups(gateway: &TestGateway) -> f64 {
    let series = r#"ferry_catchup_reads_total{reason="lagged"}"#;
    metric(gateway, series).await.unwrap_or(0.0)
}

async fn position_catchups(gateway: &TestGateway) -> f64 {
    let series = r#"ferry_catchup_reads_total{reason="position"}"#;
    metric(gateway, series).await.unwrap_or(0.0)
}

/// Reads `msg` frames until none comes for `quiet`: their seqs, which must increase by one each
/// (no `gap` either).
async fn read_until_quiet(conn: &mut RawConnection, quiet: Duration) -> Vec<u64> {
    let mut seqs: Vec<u64> = Vec::new();
    loop {
        match conn.next_frame(quiet).await {
            Err(_) => return seqs,
            Ok(RawEvent::Frame(ServerFrame::Msg { seq, .. })) => {
                if let Some(last) = seqs.last() {
                    assert_eq!(seq, last + 1, "in order, nothing skipped");
                }
                seqs.push(seq);
            }
            Ok(RawEvent::Frame(ServerFrame::Gap { from, to })) => {
                panic!("gap {from}..={to}: the device acknowledged those seqs itself")
            }
            Ok(RawEvent::Frame(_)) => {}
            Ok(RawEvent::Closed { code, reason }) => panic!("closed ({code:?}, {reason})"),
        }
    }
}

/// The default device's position kept by the store for `user`, as a new connection's
/// `welcome` reports it (`resume`, with no position of its own).
async fn kept_position(gateway: &TestGateway, user: &str) -> u64 {
    match gateway.raw(user).await.1 {
        ServerFrame::Welcome {
            resume: Some(resume),
            ..
        } => resume,
        other => panic!("expected a welcome with resume, got {other:?}"),
    }
}

both_engines! {
    async fn a_slow_reader_gets_everything_once_in_order(kind: EngineKind) {
        let _serial = SERIAL.lock().await;
        let gateway = slow_gateway(kind).await;
        let lagged_before = lagged_catchups(&gateway).await;
        let (mut bystander, _) = gateway.raw("bystander").await;
        let (mut sender, _) = gateway.raw("sender").await;
        // The reader says hello, then reads nothing while the flood arrives.
        let (mut reader, _) = gateway.raw("slow").await;

        let mut observed = Observed::default();
        tokio::time::timeout(PHASE, flood(&gateway, &mut sender, "slow", 1, FLOOD, &mut observed))
            .await
            .expect("the flood is stored in time");

        // The gateway still serves everyone else.
        ping_pong(&mut bystander).await;
        raw_send(&mut bystander, "b1", "sender", "still here").await;
        // The reader's session stopped queueing live messages and lagged.
        let lagged = lagged_catchups(&gateway).await - lagged_before;
        assert!(
            observed.max_lagging >= 1.0 || lagged > 0.0,
            "the slow session never lagged: {observed:?}, lagged catch-up reads {lagged}"
        );

        read_all_in_order(&mut reader, 1, FLOOD).await;
        // Caught up: the session is no longer lagging.
        eventually("no session lagging", || async {
            metric(&gateway, "ferry_sessions_lagging").await == Some(0.0)
        })
        .await;
        // And it is live again.
        raw_send(&mut sender, &format!("m{}", FLOOD + 1), "slow", &"x".repeat(BODY_BYTES)).await;
        read_all_in_order(&mut reader, FLOOD + 1, FLOOD + 1).await;
    }

    async fn a_slow_reader_that_reconnects_gets_the_rest_in_order(kind: EngineKind) {
        let _serial = SERIAL.lock().await;
        let gateway = slow_gateway(kind).await;
        let (mut bystander, _) = gateway.raw("bystander").await;
        let (mut sender, _) = gateway.raw("sender").await;
        let (mut reader, welcome) = gateway.raw("slow").await;
        let epoch = epoch_of(&welcome);

        // The reader keeps up with the first 50, then stops reading.
        let mut observed = Observed::default();
        flood(&gateway, &mut sender, "slow", 1, 100, &mut observed).await;
        let got = raw_messages(&mut reader, 50).await;
        assert_eq!(got.last().map(|m| m.0), Some(50));
        tokio::time::timeout(PHASE, flood(&gateway, &mut sender, "slow", 101, FLOOD, &mut observed))
            .await
            .expect("the flood is stored in time");
        ping_pong(&mut bystander).await;

        // It drops the connection with most of the flood unread, and resumes from 50.
        drop(reader);
        let (mut reader, welcome) = gateway.raw_resume("slow", 50, Some(&epoch)).await;
        match welcome {
            ServerFrame::Welcome { reset, head, .. } => {
                assert!(!reset, "same epoch, same inbox");
                assert_eq!(head, FLOOD);
            }
            other => panic!("expected welcome, got {other:?}"),
        }
        read_all_in_order(&mut reader, 51, FLOOD).await;
        ping_pong(&mut bystander).await;
    }

    // Two connections of one device (issue 14): one lags while the other reads the flood and
    // acknowledges it, so the trim takes what the lagging one never had. Its catch-up finds the
    // rest gone and steps to the head that read checked, once: it does not read nothing again
    // at every position check (the false FerryCatchUpStorm), and it is told of no gap (its
    // device acknowledged those seqs, G3).
    async fn seqs_acknowledged_on_another_connection_are_read_for_once(kind: EngineKind) {
        let _serial = SERIAL.lock().await;
        const CHECK: Duration = Duration::from_millis(100);
        let gateway = slow_gateway_with(kind, |c| c.position_check = CHECK).await;
        let (mut sender, _) = gateway.raw("sender").await;
        let (mut reader, _) = gateway.raw("multi").await;
        // The same (default) device; it reads nothing while the flood arrives.
        let (mut slow, _) = gateway.raw("multi").await;
        let mut observed = Observed::default();
        tokio::time::timeout(PHASE, flood(&gateway, &mut sender, "multi", 1, FLOOD, &mut observed))
            .await
            .expect("the flood is stored in time");
        read_all_in_order(&mut reader, 1, FLOOD).await;
        reader
            .send_frame(&ferry_shared::ClientFrame::Ack { seq: FLOOD })
            .await
            .expect("ack");
        let deadline = tokio::time::Instant::now() + PHASE;
        while kept_position(&gateway, "multi").await < FLOOD {
            assert!(tokio::time::Instant::now() < deadline, "the ack is never applied");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The lagging connection gets what its socket and queue held, then nothing.
        let got = read_until_quiet(&mut slow, Duration::from_millis(500)).await;
        assert!(
            got.last() < Some(&FLOOD),
            "the second connection never fell behind ({} messages): {observed:?}",
            got.len()
        );
        let before = position_catchups(&gateway).await;
        tokio::time::sleep(CHECK * 15).await;
        let reads = position_catchups(&gateway).await - before;
        assert!(
            reads <= 1.0,
            "{reads} position catch-up reads in 15 checks: the empty read repeats"
        );
        // Still live, from the head it stepped to.
        raw_send(&mut sender, &format!("m{}", FLOOD + 1), "multi", "after").await;
        assert_eq!(
            read_until_quiet(&mut slow, Duration::from_millis(500)).await,
            [FLOOD + 1]
        );
    }

    // A session that lags while its inbox is full and its device no longer holds it (silent past
    // --device-ttl: it only listens) loses the oldest messages to new ones. It is told so in
    // the session: a `gap` before the next `msg`, never a silent skip (G2, G3).
    async fn a_lagging_session_is_told_of_its_gap(kind: EngineKind) {
        let _serial = SERIAL.lock().await;
        const INBOX: u64 = 100;
        let gateway = TestGateway::start_with(kind, |c| {
            c.outbound_queue = 16;
            c.outbound_queue_bytes = 64 * 1024;
            c.write_timeout = Duration::from_secs(30);
            c.catchup_page = 8;
            c.send_rate = 1_000_000.0;
            c.send_burst = 1_000_000;
            c.store_bytes_rate = 1e12;
            c.max_inbox = INBOX;
            // One sender floods here: no share bound (recipients.rs tests the share).
            c.max_inbox_share = 1.0;
            c.device_ttl = Duration::from_millis(500);
        })
        .await;
        let (mut sender, _) = gateway.raw("sender").await;
        let (mut reader, _) = gateway.raw("slow").await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let mut observed = Observed::default();
        tokio::time::timeout(PHASE, flood(&gateway, &mut sender, "slow", 1, FLOOD, &mut observed))
            .await
            .expect("the flood is stored in time: a device that no longer holds blocks nobody");

        // Every seq comes once, in order, as a message or inside exactly one gap; the last
        // INBOX are still stored, so they arrive as messages.
        let deadline = tokio::time::Instant::now() + PHASE;
        let (mut next, mut gaps) = (1, 0);
        while next <= FLOOD {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match reader.next_frame(left).await.expect("frames in time") {
                RawEvent::Frame(ServerFrame::Msg { seq, .. }) => {
                    assert_eq!(seq, next, "in order, nothing skipped without a gap");
                    next += 1;
                }
                RawEvent::Frame(ServerFrame::Gap { from, to }) => {
                    assert_eq!(from, next, "a gap starts where delivery stopped");
                    assert!(to >= from && to <= FLOOD - INBOX, "{from}..={to}");
                    next = to + 1;
                    gaps += 1;
                }
                RawEvent::Frame(_) => {}
                RawEvent::Closed { code, reason } => panic!("closed ({code:?}, {reason})"),
            }
        }
        assert!(gaps >= 1, "the session lost messages and was told");
        assert!(metric(&gateway, r#"ferry_gaps_total{at="session"}"#).await >= Some(1.0));
    }
}
