//! Devices (PROTOCOL.md, Devices): each connection names its device in `hello`, and each device
//! has its own acknowledged position, so one device's ack never takes what another has not
//! acknowledged. A device silent past `device_ttl`, or lagging while the inbox is at
//! `max_inbox`, stops holding the inbox and is told exactly what it lost (`gap`); the device
//! cap evicts the device seen longest ago; a device without a local position resumes from its
//! server-side one. On every engine, through real WebSocket connections; the devices' positions
//! are read through the HTTP API.

mod common;

use std::time::Duration;

use common::*;
use ferry_shared::client::RawConnection;
use ferry_shared::{ClientFrame, ErrorCode, ServerFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "devices-test-key-0123456789abcdef0123456789";

/// A gateway with the HTTP API on (to read positions), and `tweak` applied.
async fn gateway(kind: EngineKind, tweak: impl FnOnce(&mut ferry_gateway::Config)) -> TestGateway {
    TestGateway::start_with(kind, |c| {
        with_api(c, &[("test", KEY)]);
        tweak(c);
    })
    .await
}

/// `GET path` on the HTTP API: the JSON body.
async fn api_get(gw: &TestGateway, path: &str) -> serde_json::Value {
    let addr = gw.api.expect("the API is on");
    let mut stream = TcpStream::connect(addr).await.expect("connect to the API");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("the API answers in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).expect("a JSON body")
}

/// `device`'s acknowledged position, as the API lists it (None if unknown).
async fn acked(gw: &TestGateway, user: &str, device: &str) -> Option<u64> {
    let list = api_get(gw, &format!("/v1/users/{user}/devices")).await;
    list["devices"]
        .as_array()
        .expect("a device list")
        .iter()
        .find(|d| d["device"] == device)
        .map(|d| d["acked"].as_u64().expect("acked"))
}

/// Waits until `device` of `user` has acknowledged `seq` in the store.
async fn wait_acked(gw: &TestGateway, user: &str, device: &str, seq: u64) {
    eventually(&format!("{device} acked {seq}"), || async {
        acked(gw, user, device).await == Some(seq)
    })
    .await;
}

/// Connects `user` as `device`, resuming at (last_seq, epoch).
async fn device_hello(
    gw: &TestGateway,
    user: &str,
    device: &str,
    last_seq: u64,
    epoch: Option<&str>,
) -> (RawConnection, ServerFrame) {
    gw.raw_device_hello(gw.token(user), last_seq, epoch, Some(device))
        .await
}

fn resume_of(welcome: &ServerFrame) -> u64 {
    match welcome {
        ServerFrame::Welcome {
            resume: Some(resume),
            ..
        } => *resume,
        other => panic!("a welcome with resume, got {other:?}"),
    }
}

async fn ack(conn: &mut RawConnection, seq: u64) {
    conn.send_frame(&ClientFrame::Ack { seq })
        .await
        .expect("ack");
}

/// Sends `n` messages from a fresh connection of `from` to `to`, ids `<prefix><i>`; their seqs.
async fn send_many(gw: &TestGateway, from: &str, to: &str, prefix: &str, n: usize) -> Vec<u64> {
    let (mut sender, _) = gw.raw(from).await;
    let mut seqs = Vec::new();
    for i in 1..=n {
        seqs.push(raw_send(&mut sender, &format!("{prefix}{i}"), to, "hi").await);
    }
    seqs
}

every_engine! {
    // The finding: an ack from the phone trimmed the inbox for every device, so the laptop,
    // offline meanwhile, never saw those messages.
    async fn a_device_offline_gets_what_another_device_acknowledged(kind: EngineKind) {
        let gw = gateway(kind, |_| {}).await;
        let (mut phone, welcome) = device_hello(&gw, "bob", "phone", 0, None).await;
        let epoch = epoch_of(&welcome);
        let (mut laptop, _) = device_hello(&gw, "bob", "laptop", 0, None).await;
        laptop.close(1000, "bye").await.expect("close");
        let sent = send_many(&gw, "alice", "bob", "m", 5).await;
        assert_eq!(sent, [1, 2, 3, 4, 5]);
        let got = raw_messages(&mut phone, 5).await;
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), sent);
        ack(&mut phone, 5).await;
        wait_acked(&gw, "bob", "phone", 5).await;
        // The laptop comes back: everything, in order, no gap.
        let (mut laptop, welcome) = device_hello(&gw, "bob", "laptop", 0, Some(&epoch)).await;
        assert_eq!(resume_of(&welcome), 0);
        let got = raw_messages(&mut laptop, 5).await;
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), sent);
        ack(&mut laptop, 5).await;
        wait_acked(&gw, "bob", "laptop", 5).await;
        let inbox = api_get(&gw, "/v1/users/bob/inbox").await;
        assert_eq!((inbox["count"].as_u64(), inbox["floor"].as_u64()), (Some(0), Some(5)));
        // The phone, back without a local position, resumes from its server-side one.
        let (_phone, welcome) = device_hello(&gw, "bob", "phone", 0, None).await;
        assert_eq!(resume_of(&welcome), 5);
    }

    // A device silent past --device-ttl stops holding the inbox; when it comes back it is told
    // exactly what it lost, then gets what follows.
    async fn a_silent_device_is_told_of_its_gap(kind: EngineKind) {
        let gw = gateway(kind, |c| c.device_ttl = Duration::from_secs(1)).await;
        let (mut laptop, welcome) = device_hello(&gw, "bob", "laptop", 0, None).await;
        let epoch = epoch_of(&welcome);
        laptop.close(1000, "bye").await.expect("close");
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        let (mut phone, _) = device_hello(&gw, "bob", "phone", 0, Some(&epoch)).await;
        send_many(&gw, "alice", "bob", "m", 3).await;
        raw_messages(&mut phone, 3).await;
        ack(&mut phone, 3).await;
        eventually("the inbox trimmed past the silent laptop", || async {
            api_get(&gw, "/v1/users/bob/inbox").await["floor"] == 3
        })
        .await;
        let (mut laptop, welcome) = device_hello(&gw, "bob", "laptop", 0, Some(&epoch)).await;
        assert_eq!(resume_of(&welcome), 3, "delivery starts after the gap");
        assert_eq!(next_frame(&mut laptop).await, ServerFrame::Gap { from: 1, to: 3 });
        send_many(&gw, "carol", "bob", "c", 1).await;
        assert_eq!(raw_messages(&mut laptop, 1).await[0].0, 4);
        // Not acknowledged past the gap yet: a resume without a position hears of it again.
        laptop.close(1000, "bye").await.expect("close");
        let (mut laptop, _) = device_hello(&gw, "bob", "laptop", 0, None).await;
        assert_eq!(next_frame(&mut laptop).await, ServerFrame::Gap { from: 1, to: 3 });
        assert_eq!(raw_messages(&mut laptop, 1).await[0].0, 4);
        ack(&mut laptop, 4).await;
        wait_acked(&gw, "bob", "laptop", 4).await;
        let (_laptop, welcome) = device_hello(&gw, "bob", "laptop", 0, None).await;
        assert_eq!(resume_of(&welcome), 4);
        assert!(metric(&gw, "ferry_gaps_total{at=\"resume\"}").await >= Some(2.0));
    }

    // Senders are never blocked by a device that lags: at max_inbox the oldest messages make
    // room past it, and it learns of the gap.
    async fn a_lagging_device_does_not_fill_the_inbox(kind: EngineKind) {
        let gw = gateway(kind, |c| {
            c.max_inbox = 5;
            // One sender fills the inbox here: no share bound (recipients.rs tests the share).
            c.max_inbox_share = 1.0;
        })
        .await;
        let (laptop, welcome) = device_hello(&gw, "bob", "laptop", 0, None).await;
        let epoch = epoch_of(&welcome);
        drop(laptop);
        let (mut phone, _) = device_hello(&gw, "bob", "phone", 0, Some(&epoch)).await;
        let (mut alice, _) = gw.raw("alice").await;
        for i in 1..=8 {
            assert_eq!(raw_send(&mut alice, &format!("m{i}"), "bob", "hi").await, i);
            raw_messages(&mut phone, 1).await;
            ack(&mut phone, i).await;
            wait_acked(&gw, "bob", "phone", i).await;
        }
        let (mut laptop, welcome) = device_hello(&gw, "bob", "laptop", 0, Some(&epoch)).await;
        assert_eq!(resume_of(&welcome), 3);
        assert_eq!(next_frame(&mut laptop).await, ServerFrame::Gap { from: 1, to: 3 });
        let got = raw_messages(&mut laptop, 5).await;
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), [4, 5, 6, 7, 8]);
    }

    // At most --max-devices per user: a new one evicts the device seen longest ago, which then
    // comes back as a new device (no server-side position).
    async fn the_device_cap_evicts_the_device_seen_longest_ago(kind: EngineKind) {
        let gw = gateway(kind, |c| c.max_devices = 2).await;
        let (mut a, _) = device_hello(&gw, "bob", "a", 0, None).await;
        let (b, _) = device_hello(&gw, "bob", "b", 0, None).await;
        drop(b);
        send_many(&gw, "alice", "bob", "m", 2).await;
        raw_messages(&mut a, 2).await;
        ack(&mut a, 2).await;
        wait_acked(&gw, "bob", "a", 2).await;
        a.close(1000, "bye").await.expect("close");
        // b is seen again after a's last ack, then c arrives: a is the one seen longest ago.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (b, _) = device_hello(&gw, "bob", "b", 0, None).await;
        drop(b);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (c, _) = device_hello(&gw, "bob", "c", 0, None).await;
        drop(c);
        assert_eq!(acked(&gw, "bob", "a").await, None, "a was evicted");
        assert_eq!(acked(&gw, "bob", "b").await, Some(0));
        // Back without a local position, a starts as a new device, at the floor (b holds the
        // inbox from 0): both messages again.
        let (mut a, welcome) = device_hello(&gw, "bob", "a", 0, None).await;
        assert_eq!(resume_of(&welcome), 0);
        let got = raw_messages(&mut a, 2).await;
        assert_eq!(got.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2]);
    }

    // A device evicted by the cap that comes back naming its epoch (even with last_seq 0) is
    // told of what was trimmed meanwhile, and again at its next hello if it did not acknowledge
    // past it.
    async fn an_evicted_device_naming_its_epoch_is_told_of_its_gap(kind: EngineKind) {
        let gw = gateway(kind, |c| c.max_devices = 1).await;
        let (a, welcome) = device_hello(&gw, "bob", "a", 0, None).await;
        let epoch = epoch_of(&welcome);
        drop(a);
        let (mut b, _) = device_hello(&gw, "bob", "b", 0, Some(&epoch)).await;
        send_many(&gw, "alice", "bob", "m", 3).await;
        raw_messages(&mut b, 3).await;
        ack(&mut b, 3).await;
        wait_acked(&gw, "bob", "b", 3).await;
        b.close(1000, "bye").await.expect("close");
        for _ in 0..2 {
            let (mut a, welcome) = device_hello(&gw, "bob", "a", 0, Some(&epoch)).await;
            assert_eq!(resume_of(&welcome), 3);
            assert_eq!(next_frame(&mut a).await, ServerFrame::Gap { from: 1, to: 3 });
            a.close(1000, "bye").await.expect("close");
        }
    }

    // A client whose epoch is stale gets `reset`, yet its device's position in the current
    // epoch still counts: what the device acknowledged is not delivered again (G4), even while
    // another device holds it.
    async fn a_reset_resumes_from_the_device_position(kind: EngineKind) {
        let gw = gateway(kind, |_| {}).await;
        let (laptop, welcome) = device_hello(&gw, "bob", "laptop", 0, None).await;
        let epoch = epoch_of(&welcome);
        drop(laptop);
        let (mut phone, _) = device_hello(&gw, "bob", "phone", 0, Some(&epoch)).await;
        send_many(&gw, "alice", "bob", "m", 3).await;
        raw_messages(&mut phone, 3).await;
        ack(&mut phone, 2).await;
        wait_acked(&gw, "bob", "phone", 2).await;
        phone.close(1000, "bye").await.expect("close");
        let (mut phone, welcome) = device_hello(&gw, "bob", "phone", 7, Some("stale-epoch")).await;
        assert!(matches!(welcome, ServerFrame::Welcome { reset: true, resume: Some(2), .. }), "{welcome:?}");
        assert_eq!(raw_messages(&mut phone, 1).await[0].0, 3);
    }

    // A device id outside the alphabet is refused before anything is opened.
    async fn a_bad_device_id_is_refused(kind: EngineKind) {
        let gw = gateway(kind, |_| {}).await;
        for bad in ["", "a b", "ü", &"d".repeat(65)] {
            let mut conn = raw_open(&gw, &["ferry.v1.json"]).await;
            let hello = ClientFrame::Hello {
                token: Some(gw.token("bob")),
                last_seq: 0,
                epoch: None,
                device: Some(bad.to_string()),
            };
            conn.send_frame(&hello).await.expect("hello");
            let (message, _, _) = expect_error(&mut conn, ErrorCode::Invalid).await;
            assert!(message.contains("device id"), "{message}");
            expect_closed(&mut conn, 1008).await;
        }
        assert!(api_get(&gw, "/v1/users/bob/devices").await["devices"]
            .as_array()
            .expect("a list")
            .is_empty());
    }
}
