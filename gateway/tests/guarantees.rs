//! One test per guarantee of PROTOCOL.md (G1–G6) and the offline path, each on both engines and
//! on a Redis Cluster.

mod common;

use std::time::Duration;

use common::*;
use ferry_shared::client::{RawConnection, RawEvent};
use ferry_shared::{ClientFrame, ServerFrame};

every_engine! {
    // G1: `sent` means stored: the recipient, connecting only afterwards, finds every one.
    async fn g1_durable_acceptance(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut alice, _) = gw.raw("alice").await;
        let mut seqs = Vec::new();
        for i in 1..=5 {
            seqs.push(raw_send(&mut alice, &format!("m{i}"), "bob", "hi").await);
        }
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        if kind != EngineKind::Embedded {
            let inbox = gw.key("bob", "inbox");
            let count = gw.store_cmd(&inbox, &["ZCARD", &inbox]);
            assert_eq!(count, redis::Value::Int(5), "the inbox holds every sent message");
        }
        let (mut bob, welcome) = gw.raw("bob").await;
        assert_eq!(head_of(&welcome), 5);
        let got = raw_messages(&mut bob, 5).await;
        let ids: Vec<_> = got.iter().map(|(_, id)| id.as_str()).collect();
        assert_eq!(ids, ["m1", "m2", "m3", "m4", "m5"]);
    }

    // G2: live to every open connection of the recipient; and to the next one otherwise.
    async fn g2_delivery_live_and_on_next_connection(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut alice, _) = gw.raw("alice").await;
        let (mut bob1, _) = gw.raw("bob").await;
        let (mut bob2, _) = gw.raw("bob").await;
        raw_send(&mut alice, "live-1", "bob", "x").await;
        assert_eq!(raw_messages(&mut bob1, 1).await, [(1, "live-1".to_string())]);
        assert_eq!(raw_messages(&mut bob2, 1).await, [(1, "live-1".to_string())]);
        drop(bob1);
        drop(bob2);
        raw_send(&mut alice, "offline-2", "bob", "y").await;
        let (mut bob3, _) = gw.raw("bob").await;
        let got = raw_messages(&mut bob3, 2).await;
        assert_eq!(got, [(1, "live-1".to_string()), (2, "offline-2".to_string())]);
    }

    // A live message is encoded once per wire format on a node and shared by the recipient's
    // connections: one user's MessagePack and JSON connections each get it whole, in their own
    // format, and so does a second connection in the same format.
    async fn one_live_message_reaches_every_format(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut alice, _) = gw.raw("alice").await;
        let (mut packed, _) = gw.raw("bob").await;
        let (mut packed_too, _) = gw.raw("bob").await;
        let mut json = RawConnection::connect(&gw.url(), &["ferry.v1.json"], &[])
            .await
            .expect("connects");
        let hello = ClientFrame::Hello {
            token: Some(gw.token("bob")),
            last_seq: 0,
            epoch: None,
            device: None,
        };
        json.send_frame(&hello).await.expect("hello");
        assert!(matches!(next_frame(&mut json).await, ServerFrame::Welcome { .. }));
        raw_send(&mut alice, "m1", "bob", "héllo, bob").await;
        for conn in [&mut packed, &mut packed_too, &mut json] {
            match next_frame(conn).await {
                ServerFrame::Msg { seq, from, id, body, .. } => {
                    assert_eq!((seq, from.as_str(), id.as_str()), (1, "alice", "m1"));
                    assert_eq!(&body.0[..], "héllo, bob".as_bytes());
                }
                other => panic!("expected the message, got {other:?}"),
            }
        }
    }

    // G3: with several senders at once, one connection sees strictly increasing seqs, and each
    // sender's messages in the order it sent them.
    async fn g3_order(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (bob, mut bob_events) = gw.client("bob").await;
        let mut senders = Vec::new();
        for s in 0..3 {
            let (client, _events) = gw.client(&format!("sender{s}")).await;
            senders.push(tokio::spawn(async move {
                for i in 0..50 {
                    client.send("bob", &format!("s{s}-{i:03}"), "x").await.expect("sent");
                }
                client.close().await;
            }));
        }
        let got = messages(&mut bob_events, 150).await;
        for task in senders {
            task.await.expect("sender");
        }
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "strictly increasing: {got:?}");
        for s in 0..3 {
            let prefix = format!("s{s}-");
            let mine: Vec<_> = got.iter().filter(|(_, id)| id.starts_with(&prefix)).collect();
            assert_eq!(mine.len(), 50);
            assert!(mine.windows(2).all(|w| w[0].1 < w[1].1), "sender {s} order kept");
        }
        bob.close().await;
    }

    // G4: acknowledged messages, and those at or below the resume point, never come again.
    async fn g4_no_redelivery_after_ack(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut alice, _) = gw.raw("alice").await;
        for i in 1..=5 {
            raw_send(&mut alice, &format!("m{i}"), "bob", "x").await;
        }
        let (mut bob, welcome) = gw.raw("bob").await;
        let epoch = epoch_of(&welcome);
        assert_eq!(raw_messages(&mut bob, 5).await.len(), 5);
        bob.send_frame(&ClientFrame::Ack { seq: 3 }).await.expect("ack");
        // The ack is applied when the inbox no longer holds 1..=3.
        eventually("ack trimmed the inbox", || async {
            let (mut probe, _) = gw.raw_resume("bob", 0, Some(&epoch)).await;
            let first = raw_messages(&mut probe, 1).await;
            first[0].0 == 4
        })
        .await;
        drop(bob);
        // Resuming from 0 after the ack: only 4 and 5 remain.
        let (mut bob, _) = gw.raw_resume("bob", 0, Some(&epoch)).await;
        assert_eq!(raw_messages(&mut bob, 2).await.iter().map(|m| m.0).collect::<Vec<_>>(), [4, 5]);
        no_message(&mut bob, Duration::from_millis(200)).await;
        drop(bob);
        // Resuming from 5: nothing at all, and that resume acknowledged 4 and 5.
        let (mut bob, _) = gw.raw_resume("bob", 5, Some(&epoch)).await;
        no_message(&mut bob, Duration::from_millis(300)).await;
        drop(bob);
        let (mut bob, _) = gw.raw_resume("bob", 0, Some(&epoch)).await;
        no_message(&mut bob, Duration::from_millis(300)).await;
        raw_send(&mut alice, "m6", "bob", "x").await;
        assert_eq!(raw_messages(&mut bob, 1).await, [(6, "m6".to_string())]);
    }

    // The client's last ack, sent just before it closes while an earlier trim is still in
    // flight, is applied too (acks are coalesced to one trim at a time).
    async fn last_ack_before_close_is_applied(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut alice, _) = gw.raw("alice").await;
        for i in 1..=10 {
            raw_send(&mut alice, &format!("m{i}"), "bob", "x").await;
        }
        let (mut bob, welcome) = gw.raw("bob").await;
        let epoch = epoch_of(&welcome);
        assert_eq!(raw_messages(&mut bob, 10).await.len(), 10);
        bob.send_frame(&ClientFrame::Ack { seq: 5 }).await.expect("ack");
        bob.send_frame(&ClientFrame::Ack { seq: 10 }).await.expect("ack");
        bob.close(1000, "bye").await.expect("close");
        eventually("both acks applied", || async {
            let (mut probe, _) = gw.raw_resume("bob", 0, Some(&epoch)).await;
            // A resume from 0 replays whatever the inbox still holds.
            let first = probe.next_frame(Duration::from_millis(300)).await;
            !matches!(first, Ok(RawEvent::Frame(ServerFrame::Msg { .. })))
        })
        .await;
    }

    // G5: the same (sender, recipient, id) stores once; the retry is answered with the seq.
    async fn g5_idempotent_send(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut alice, _) = gw.raw("alice").await;
        alice.send_frame(&send_frame("dup", "bob", "once")).await.expect("send");
        let first = next_frame(&mut alice).await;
        alice.send_frame(&send_frame("dup", "bob", "once")).await.expect("send");
        let second = next_frame(&mut alice).await;
        let expected = |duplicate| ServerFrame::Sent {
            id: "dup".into(),
            to: "bob".into(),
            seq: 1,
            duplicate,
        };
        assert_eq!(first, expected(false));
        assert_eq!(second, expected(true));
        // Another sender may use the same id: it is a different message.
        let (mut carol, _) = gw.raw("carol").await;
        assert_eq!(raw_send(&mut carol, "dup", "bob", "other").await, 2);
        let (mut bob, _) = gw.raw("bob").await;
        assert_eq!(raw_messages(&mut bob, 2).await.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2]);
        no_message(&mut bob, Duration::from_millis(300)).await;
    }

    // G6: a connection sees only its own inbox, and its ack deletes only from it.
    async fn g6_isolation(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut alice, _) = gw.raw("alice").await;
        let (mut carol, _) = gw.raw("carol").await;
        raw_send(&mut alice, "for-bob", "bob", "secret").await;
        raw_send(&mut alice, "for-carol", "carol", "hello").await;
        assert_eq!(raw_messages(&mut carol, 1).await, [(1, "for-carol".to_string())]);
        // Carol acknowledges far beyond anything: it touches only her own inbox.
        carol.send_frame(&ClientFrame::Ack { seq: 1_000 }).await.expect("ack");
        no_message(&mut carol, Duration::from_millis(300)).await;
        let (mut bob, _) = gw.raw("bob").await;
        assert_eq!(raw_messages(&mut bob, 1).await, [(1, "for-bob".to_string())]);
    }

    // Offline path: everything sent while away arrives in order on the next connection, and a
    // resume from k gets exactly the seqs above k.
    async fn offline_resume_gets_exactly_what_was_missed(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (_, welcome) = gw.raw("bob").await;
        let epoch = epoch_of(&welcome);
        let (alice, _alice_events) = gw.client("alice").await;
        for i in 1..=20 {
            alice.send("bob", &format!("m{i:02}"), "x").await.expect("sent");
        }
        let (mut bob, welcome) = gw.raw_resume("bob", 7, Some(&epoch)).await;
        assert!(matches!(welcome, ServerFrame::Welcome { reset: false, head: 20, .. }));
        let got = raw_messages(&mut bob, 13).await;
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), (8..=20).collect::<Vec<_>>());
        no_message(&mut bob, Duration::from_millis(300)).await;
    }

    // The full client drops duplicates, acknowledges, and resumes after a cut connection.
    async fn client_resumes_after_disconnect(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (alice, _alice_events) = gw.client("alice").await;
        let (bob, mut bob_events) = gw.client("bob").await;
        for i in 1..=3 {
            alice.send("bob", &format!("a{i}"), "x").await.expect("sent");
        }
        assert_eq!(messages(&mut bob_events, 3).await.len(), 3);
        bob.ack_now().await.expect("ack");
        let (last_seq, epoch) = bob.position();
        assert_eq!(last_seq, 3);
        bob.close().await;
        for i in 4..=6 {
            alice.send("bob", &format!("a{i}"), "x").await.expect("sent");
        }
        let config = ferry_shared::client::ClientConfig {
            last_seq,
            epoch,
            ..gw.client_config("bob")
        };
        let (_bob, mut bob_events) = ferry_shared::client::Client::connect(config).await.expect("reconnect");
        let got = messages(&mut bob_events, 3).await;
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), [4, 5, 6]);
    }

    // A hello with an epoch the inbox does not have gets reset and a replay from the start.
    async fn unknown_epoch_gets_reset(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut alice, _) = gw.raw("alice").await;
        raw_send(&mut alice, "m1", "bob", "x").await;
        raw_send(&mut alice, "m2", "bob", "x").await;
        let (mut bob, welcome) = gw.raw_resume("bob", 2, Some("not-this-epoch")).await;
        assert!(matches!(welcome, ServerFrame::Welcome { reset: true, head: 2, .. }), "{welcome:?}");
        assert_eq!(raw_messages(&mut bob, 2).await.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2]);
        // A position beyond the head without an epoch is void too.
        let (_, welcome) = gw.raw_resume("carol", 9, None).await;
        assert!(matches!(welcome, ServerFrame::Welcome { reset: true, head: 0, .. }), "{welcome:?}");
    }

    // The epoch of an empty inbox, once reported, is kept when the first message arrives.
    async fn epoch_is_stable_from_first_report(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (_, welcome) = gw.raw("bob").await;
        let epoch = epoch_of(&welcome);
        let (mut alice, _) = gw.raw("alice").await;
        raw_send(&mut alice, "m1", "bob", "x").await;
        let (_, welcome) = gw.raw_resume("bob", 0, Some(&epoch)).await;
        assert_eq!(epoch_of(&welcome), epoch);
        assert!(matches!(welcome, ServerFrame::Welcome { reset: false, .. }));
    }
}
