//! The client against an in-process fake gateway: a real WebSocket server on 127.0.0.1:0 that
//! each test scripts frame by frame, so every exchange of `PROTOCOL.md` the client takes part
//! in is exercised without the real gateway.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::transport::{to_message, to_wire};
use super::*;
use crate::codec::Codec;
use crate::frame::{Body, ClientFrame, ErrorCode, ServerFrame};

const WAIT: Duration = Duration::from_secs(5);

/// A fake gateway: accepts upgrades (negotiating the subprotocol like the real one) and hands
/// each connection to the test.
struct FakeGateway {
    url: String,
    conns: mpsc::Receiver<FakeConn>,
}

/// One accepted connection, with what its upgrade request said.
struct FakeConn {
    ws: WebSocketStream<TcpStream>,
    codec: Codec,
    peer: SocketAddr,
    query: Option<String>,
    authorization: Option<String>,
}

impl FakeGateway {
    async fn start() -> FakeGateway {
        Self::start_with(None).await
    }

    /// A gateway that refuses every upgrade with `status`, if given.
    async fn start_with(refuse: Option<u16>) -> FakeGateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/ws", listener.local_addr().unwrap());
        let (tx, conns) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Some(conn) = accept(stream, peer, refuse).await {
                        let _ = tx.send(conn).await;
                    }
                });
            }
        });
        FakeGateway { url, conns }
    }

    async fn next_conn(&mut self) -> FakeConn {
        tokio::time::timeout(WAIT, self.conns.recv())
            .await
            .expect("a connection in time")
            .expect("the listener runs")
    }
}

// tungstenite's `Callback` fixes the closure's error type (an HTTP response).
#[allow(clippy::result_large_err)]
async fn accept(stream: TcpStream, peer: SocketAddr, refuse: Option<u16>) -> Option<FakeConn> {
    let mut seen = (Codec::MsgPack, None, None);
    let callback = |request: &Request, mut response: Response| {
        if let Some(status) = refuse {
            let mut refusal = ErrorResponse::new(Some("refused".to_owned()));
            *refusal.status_mut() = StatusCode::from_u16(status).unwrap();
            return Err(refusal);
        }
        let offered = request
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok());
        let offers: Vec<&str> = offered.map(|o| o.split(',').collect()).unwrap_or_default();
        let Some(codec) = Codec::negotiate(offers.iter().copied()) else {
            let mut refusal = ErrorResponse::new(Some("unknown subprotocol".to_owned()));
            *refusal.status_mut() = StatusCode::BAD_REQUEST;
            return Err(refusal);
        };
        if offered.is_some() {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(codec.subprotocol()),
            );
        }
        let authorization = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        seen = (
            codec,
            request.uri().query().map(str::to_owned),
            authorization,
        );
        Ok(response)
    };
    let ws = tokio_tungstenite::accept_hdr_async(stream, callback)
        .await
        .ok()?;
    let (codec, query, authorization) = seen;
    Some(FakeConn {
        ws,
        codec,
        peer,
        query,
        authorization,
    })
}

impl FakeConn {
    /// The next frame from the client; `None` once it closed.
    async fn recv(&mut self) -> Option<ClientFrame> {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time");
            match message {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(message)) => {
                    if let Some(wire) = to_wire(message) {
                        return Some(self.codec.decode_client(&wire).expect("a client frame"));
                    }
                }
            }
        }
    }

    async fn expect(&mut self) -> ClientFrame {
        self.recv().await.expect("the client sent a frame")
    }

    /// Whether the client stays silent for `d`.
    async fn silent_for(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, self.ws.next()).await.is_err()
    }

    /// The close code the client closes with (after any data frames).
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await.ok()? {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code.into()),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    async fn send(&mut self, frame: ServerFrame) {
        let wire = self.codec.encode_server(&frame).unwrap();
        self.ws.send(to_message(wire)).await.unwrap();
    }

    /// Reads `hello` and answers `welcome` as a server before devices would; returns the
    /// hello's (token, last_seq, epoch).
    async fn welcome(
        &mut self,
        epoch: &str,
        head: u64,
        reset: bool,
    ) -> (Option<String>, u64, Option<String>) {
        let ClientFrame::Hello {
            token,
            last_seq,
            epoch: hello_epoch,
            ..
        } = self.answer_hello(welcome(epoch, head, reset, 25_000)).await
        else {
            unreachable!()
        };
        (token, last_seq, hello_epoch)
    }

    /// Reads `hello`, answers with `welcome`, and returns the hello.
    async fn answer_hello(&mut self, welcome: ServerFrame) -> ClientFrame {
        let hello = self.expect().await;
        assert!(
            matches!(hello, ClientFrame::Hello { .. }),
            "hello must come first, got {hello:?}"
        );
        self.send(welcome).await;
        hello
    }

    async fn msg(&mut self, seq: u64) {
        self.send(msg(seq)).await;
    }

    async fn close(&mut self, code: u16) {
        let frame = CloseFrame {
            code: code.into(),
            reason: "bye".into(),
        };
        let _ = self.ws.close(Some(frame)).await;
    }
}

/// A `welcome` from a server before devices (no `device`, no `resume`).
fn welcome(epoch: &str, head: u64, reset: bool, heartbeat_ms: u64) -> ServerFrame {
    ServerFrame::Welcome {
        user: "alice".into(),
        node: "gw-1".into(),
        epoch: epoch.into(),
        head,
        reset,
        heartbeat_ms,
        expires_at: None,
        device: None,
        resume: None,
    }
}

/// A `welcome` from a server with devices: delivery resumes after `resume`.
fn device_welcome(device: &str, epoch: &str, head: u64, resume: u64) -> ServerFrame {
    ServerFrame::Welcome {
        user: "alice".into(),
        node: "gw-1".into(),
        epoch: epoch.into(),
        head,
        reset: false,
        heartbeat_ms: 25_000,
        expires_at: None,
        device: Some(device.into()),
        resume: Some(resume),
    }
}

/// The `device` a `hello` named.
fn hello_device(hello: &ClientFrame) -> Option<&str> {
    match hello {
        ClientFrame::Hello { device, .. } => device.as_deref(),
        other => panic!("expected a hello, got {other:?}"),
    }
}

fn msg(seq: u64) -> ServerFrame {
    ServerFrame::Msg {
        seq,
        from: "bob".into(),
        id: format!("b-{seq}"),
        ts: 1_764_086_400_000 + seq,
        body: Body::from(format!("m{seq}").as_str()),
    }
}

fn sent(id: &str, seq: u64, duplicate: bool) -> ServerFrame {
    ServerFrame::Sent {
        id: id.into(),
        to: "bob".into(),
        seq,
        duplicate,
    }
}

fn send_error(id: &str, code: ErrorCode, retry_after_ms: Option<u64>) -> ServerFrame {
    ServerFrame::Error {
        code,
        message: code.as_str().into(),
        id: Some(id.into()),
        retry_after_ms,
    }
}

fn config(url: &str) -> ClientConfig {
    ClientConfig {
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        ..ClientConfig::new(url, "tok")
    }
}

async fn next(events: &mut Events) -> Event {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event in time")
        .expect("the client runs")
}

async fn next_message(events: &mut Events) -> Delivered {
    match next(events).await {
        Event::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Connects with `cfg` (default: `config(&gw.url)`) through a plain `welcome` at epoch e1.
async fn connect(gw: &mut FakeGateway, cfg: Option<ClientConfig>) -> (Client, Events, FakeConn) {
    let cfg = cfg.unwrap_or_else(|| config(&gw.url));
    let connecting = tokio::spawn(Client::connect(cfg));
    let mut conn = gw.next_conn().await;
    conn.welcome("e1", 0, false).await;
    let (client, mut events) = connecting.await.unwrap().unwrap();
    assert!(matches!(next(&mut events).await, Event::Welcome(_)));
    (client, events, conn)
}

fn expect_send(frame: ClientFrame) -> (String, String, Bytes) {
    match frame {
        ClientFrame::Send { id, to, body } => (id, to, body.0),
        other => panic!("expected a send, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_carries_the_resume_point_and_duplicates_are_dropped() {
    let mut gw = FakeGateway::start().await;
    let connecting = tokio::spawn(Client::connect(ClientConfig {
        last_seq: 2,
        epoch: Some("e1".into()),
        ..config(&gw.url)
    }));
    let mut conn = gw.next_conn().await;
    let hello = conn.welcome("e1", 5, false).await;
    assert_eq!(hello, (Some("tok".into()), 2, Some("e1".into())));
    for seq in [2, 3, 4, 3, 1, 5] {
        conn.msg(seq).await;
    }
    let (client, mut events) = connecting.await.unwrap().unwrap();
    assert_eq!(client.user(), "alice");
    let Event::Welcome(w) = next(&mut events).await else {
        panic!("welcome first")
    };
    assert_eq!((w.epoch.as_str(), w.head, w.resumed_from), ("e1", 5, 2));
    let m = next_message(&mut events).await;
    assert_eq!((m.seq, m.from.as_str(), m.id.as_str()), (3, "bob", "b-3"));
    assert_eq!(m.body, Bytes::from_static(b"m3"));
    assert_eq!(next_message(&mut events).await.seq, 4);
    assert_eq!(next_message(&mut events).await.seq, 5);
    assert_eq!(client.position(), (5, Some("e1".into())));
    assert!(events.is_empty());
}

#[tokio::test]
async fn pipelined_sends_are_matched_by_id() {
    let mut gw = FakeGateway::start().await;
    let (client, _events, mut conn) = connect(&mut gw, None).await;
    let sends = tokio::spawn({
        let client = client.clone();
        async move {
            tokio::join!(
                client.send("bob", "a", "1"),
                client.send("bob", "b", "2"),
                client.send("bob", "c", "3"),
            )
        }
    });
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (id, to, _) = expect_send(conn.expect().await);
        assert_eq!(to, "bob");
        ids.push(id);
    }
    ids.sort();
    assert_eq!(ids, ["a", "b", "c"]);
    conn.send(send_error("c", ErrorCode::InboxFull, None)).await;
    conn.send(sent("b", 8, true)).await;
    conn.send(sent("a", 7, false)).await;
    let (a, b, c) = sends.await.unwrap();
    assert_eq!(
        a.unwrap(),
        Sent {
            seq: 7,
            duplicate: false
        }
    );
    assert_eq!(
        b.unwrap(),
        Sent {
            seq: 8,
            duplicate: true
        }
    );
    assert_eq!(c.unwrap_err().code(), Some(ErrorCode::InboxFull));
}

// Many more sends at once than the driver handles in one batch, from several threads so that
// new ones are queued while a batch runs: none is dropped between batches (one taken off the
// channel at the end of a full batch was, before the batch loop stopped taking a command it
// would not handle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_sends_than_a_batch_all_go_out() {
    let mut gw = FakeGateway::start().await;
    let (client, _events, mut conn) = connect(&mut gw, None).await;
    const SENDS: usize = 3000;
    let sends = tokio::spawn({
        let client = client.clone();
        async move {
            futures_util::future::join_all((0..SENDS).map(|i| {
                let client = client.clone();
                async move { client.send("bob", &format!("m{i}"), "x").await }
            }))
            .await
        }
    });
    let mut ids = Vec::new();
    for seq in 1..=SENDS as u64 {
        let (id, _, _) = expect_send(conn.expect().await);
        conn.send(sent(&id, seq, false)).await;
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), SENDS, "every send went out once");
    let answers = sends.await.unwrap();
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
}

#[tokio::test]
async fn send_retries_unavailable_and_rate_limited_with_the_same_id() {
    let mut gw = FakeGateway::start().await;
    let (client, _events, mut conn) = connect(&mut gw, None).await;
    let started = Instant::now();
    let send = tokio::spawn(async move { client.send("bob", "m1", "x").await });
    assert_eq!(expect_send(conn.expect().await).0, "m1");
    conn.send(send_error("m1", ErrorCode::Unavailable, None))
        .await;
    assert_eq!(expect_send(conn.expect().await).0, "m1");
    conn.send(send_error("m1", ErrorCode::RateLimited, Some(30)))
        .await;
    assert_eq!(expect_send(conn.expect().await).0, "m1");
    assert!(
        started.elapsed() >= Duration::from_millis(40),
        "backoff + retry_after"
    );
    conn.send(sent("m1", 3, true)).await;
    assert_eq!(
        send.await.unwrap().unwrap(),
        Sent {
            seq: 3,
            duplicate: true
        }
    );
}

// `retry_after_ms` holds the client's other sends too: a `rate_limited` answer pauses writing,
// so a busy client does not keep the server answering refusals.
#[tokio::test]
async fn rate_limited_holds_every_send_for_the_wait() {
    let mut gw = FakeGateway::start().await;
    let (client, _events, mut conn) = connect(&mut gw, None).await;
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.send_once("bob", "m1", "x").await }
    });
    assert_eq!(expect_send(conn.expect().await).0, "m1");
    conn.send(send_error("m1", ErrorCode::RateLimited, Some(300)))
        .await;
    assert!(first.await.unwrap().is_err());
    let refused_at = Instant::now();
    let second = tokio::spawn(async move { client.send("bob", "m2", "y").await });
    assert!(
        conn.silent_for(Duration::from_millis(200)).await,
        "held while the server asked to wait"
    );
    assert_eq!(expect_send(conn.expect().await).0, "m2");
    assert!(refused_at.elapsed() >= Duration::from_millis(250));
    conn.send(sent("m2", 1, false)).await;
    assert!(second.await.unwrap().is_ok());
}

#[tokio::test]
async fn send_once_returns_the_servers_answer_as_is() {
    let mut gw = FakeGateway::start().await;
    let (client, _events, mut conn) = connect(&mut gw, None).await;
    let c = client.clone();
    let once = tokio::spawn(async move { c.send_once("bob", "m1", "x").await });
    conn.expect().await;
    conn.send(send_error("m1", ErrorCode::RateLimited, Some(250)))
        .await;
    match once.await.unwrap() {
        Err(SendError::Rejected {
            code: ErrorCode::RateLimited,
            retry_after_ms: Some(250),
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let c = client.clone();
    let once = tokio::spawn(async move { c.send_once("bob", "m2", "x").await });
    conn.expect().await;
    conn.send(send_error("m2", ErrorCode::Unavailable, None))
        .await;
    assert_eq!(
        once.await.unwrap().unwrap_err().code(),
        Some(ErrorCode::Unavailable)
    );
    assert!(
        conn.silent_for(Duration::from_millis(100)).await,
        "no retry"
    );
}

#[tokio::test]
async fn a_second_send_with_an_id_in_flight_is_refused() {
    let mut gw = FakeGateway::start().await;
    let (client, _events, mut conn) = connect(&mut gw, None).await;
    let c = client.clone();
    let first = tokio::spawn(async move { c.send("bob", "same", "1").await });
    conn.expect().await;
    let second = client.send("bob", "same", "2").await;
    assert!(matches!(second, Err(SendError::IdInFlight)), "{second:?}");
    conn.send(sent("same", 1, false)).await;
    assert!(first.await.unwrap().is_ok());
}

#[tokio::test]
async fn acks_are_coalesced() {
    let mut gw = FakeGateway::start().await;
    let cfg = ClientConfig {
        ack_interval: Duration::from_millis(50),
        ..config(&gw.url)
    };
    let (_client, mut events, mut conn) = connect(&mut gw, Some(cfg)).await;
    for seq in 1..=3 {
        conn.msg(seq).await;
    }
    for seq in 1..=3 {
        assert_eq!(next_message(&mut events).await.seq, seq);
    }
    assert_eq!(conn.expect().await, ClientFrame::Ack { seq: 3 });
    assert!(conn.silent_for(Duration::from_millis(150)).await, "one ack");
    conn.msg(4).await;
    assert_eq!(next_message(&mut events).await.seq, 4);
    assert_eq!(conn.expect().await, ClientFrame::Ack { seq: 4 });
}

#[tokio::test]
async fn an_ack_interval_of_zero_acks_every_message() {
    let mut gw = FakeGateway::start().await;
    let cfg = ClientConfig {
        ack_interval: Duration::ZERO,
        ..config(&gw.url)
    };
    let (_client, mut events, mut conn) = connect(&mut gw, Some(cfg)).await;
    for seq in 1..=3 {
        conn.msg(seq).await;
    }
    for seq in 1..=3 {
        assert_eq!(conn.expect().await, ClientFrame::Ack { seq });
        assert_eq!(next_message(&mut events).await.seq, seq);
    }
}

#[tokio::test]
async fn ack_now_and_close_acknowledge_at_once() {
    let mut gw = FakeGateway::start().await;
    let cfg = ClientConfig {
        ack_interval: Duration::from_secs(3600),
        ..config(&gw.url)
    };
    let (client, mut events, mut conn) = connect(&mut gw, Some(cfg)).await;
    conn.msg(1).await;
    next_message(&mut events).await;
    client.ack_now().await.unwrap();
    assert_eq!(conn.expect().await, ClientFrame::Ack { seq: 1 });
    conn.msg(2).await;
    next_message(&mut events).await;
    let closing = tokio::spawn(client.close());
    assert_eq!(conn.expect().await, ClientFrame::Ack { seq: 2 });
    assert_eq!(conn.close_code().await, Some(1000));
    closing.await.unwrap();
    match next(&mut events).await {
        Event::Disconnected {
            close_code: Some(1000),
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    assert!(events.recv().await.is_none(), "the client stopped");
}

#[tokio::test]
async fn reconnect_resumes_and_resends_unanswered_sends() {
    let mut gw = FakeGateway::start().await;
    let (client, mut events, mut conn) = connect(&mut gw, None).await;
    conn.msg(1).await;
    conn.msg(2).await;
    next_message(&mut events).await;
    next_message(&mut events).await;
    let c = client.clone();
    let send = tokio::spawn(async move { c.send("bob", "s1", "x").await });
    assert_eq!(expect_send(conn.expect().await).0, "s1");
    conn.close(1011).await;
    match next(&mut events).await {
        Event::Disconnected {
            close_code: Some(1011),
            reason,
        } => assert_eq!(reason, "bye"),
        other => panic!("{other:?}"),
    }
    let mut conn = gw.next_conn().await;
    let (_, last_seq, epoch) = conn.welcome("e1", 3, false).await;
    assert_eq!((last_seq, epoch.as_deref()), (2, Some("e1")));
    assert_eq!(expect_send(conn.expect().await).0, "s1", "same id again");
    conn.send(sent("s1", 9, true)).await;
    assert_eq!(
        send.await.unwrap().unwrap(),
        Sent {
            seq: 9,
            duplicate: true
        }
    );
    let Event::Welcome(w) = next(&mut events).await else {
        panic!("welcome after reconnect")
    };
    assert_eq!(w.resumed_from, 2);
    conn.msg(2).await;
    conn.msg(3).await;
    assert_eq!(next_message(&mut events).await.seq, 3, "2 was a duplicate");
}

#[tokio::test]
async fn sends_made_while_disconnected_go_out_after_welcome() {
    let mut gw = FakeGateway::start().await;
    let cfg = ClientConfig {
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_millis(200),
        ..config(&gw.url)
    };
    let (client, mut events, mut conn) = connect(&mut gw, Some(cfg)).await;
    conn.close(1001).await;
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected { .. }
    ));
    let c = client.clone();
    let send = tokio::spawn(async move { c.send("bob", "late", "x").await });
    let mut conn = gw.next_conn().await;
    conn.welcome("e1", 0, false).await;
    assert_eq!(expect_send(conn.expect().await).0, "late");
    conn.send(sent("late", 1, false)).await;
    assert!(send.await.unwrap().is_ok());
}

#[tokio::test]
async fn drain_reconnects_after_the_delay_the_server_asks() {
    let mut gw = FakeGateway::start().await;
    let (_client, mut events, mut conn) = connect(&mut gw, None).await;
    let asked = Instant::now();
    conn.send(ServerFrame::Reconnect { after_ms: 150 }).await;
    conn.close(1012).await;
    assert!(matches!(
        next(&mut events).await,
        Event::Reconnect { after_ms: 150 }
    ));
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected {
            close_code: Some(1012),
            ..
        }
    ));
    let mut conn = gw.next_conn().await;
    assert!(asked.elapsed() >= Duration::from_millis(150));
    conn.welcome("e1", 0, false).await;
    assert!(matches!(next(&mut events).await, Event::Welcome(_)));
}

#[tokio::test]
async fn reset_discards_the_position() {
    let mut gw = FakeGateway::start().await;
    let connecting = tokio::spawn(Client::connect(ClientConfig {
        last_seq: 7,
        epoch: Some("old".into()),
        ..config(&gw.url)
    }));
    let mut conn = gw.next_conn().await;
    conn.welcome("new", 2, true).await;
    conn.msg(1).await;
    let (client, mut events) = connecting.await.unwrap().unwrap();
    assert!(matches!(next(&mut events).await, Event::Welcome(w) if w.reset));
    match next(&mut events).await {
        Event::Reset {
            previous_epoch,
            epoch,
        } => assert_eq!(
            (previous_epoch.as_deref(), epoch.as_str()),
            (Some("old"), "new")
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(next_message(&mut events).await.seq, 1, "seq 1 is new again");
    assert_eq!(client.position(), (1, Some("new".into())));
}

#[tokio::test]
async fn every_hello_names_the_device() {
    let mut gw = FakeGateway::start().await;
    let connecting = tokio::spawn(Client::connect(ClientConfig {
        device: Some("laptop-1".into()),
        ..config(&gw.url)
    }));
    let mut conn = gw.next_conn().await;
    let hello = conn
        .answer_hello(device_welcome("laptop-1", "e1", 0, 0))
        .await;
    assert_eq!(hello_device(&hello), Some("laptop-1"));
    let (client, mut events) = connecting.await.unwrap().unwrap();
    assert_eq!(client.device(), Some("laptop-1"));
    let Event::Welcome(w) = next(&mut events).await else {
        panic!("welcome first")
    };
    assert_eq!(w.device.as_deref(), Some("laptop-1"));
    conn.close(1011).await;
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected { .. }
    ));
    let mut conn = gw.next_conn().await;
    let hello = conn
        .answer_hello(device_welcome("laptop-1", "e1", 0, 0))
        .await;
    assert_eq!(
        hello_device(&hello),
        Some("laptop-1"),
        "and after a reconnect"
    );

    // Without one, the hello names none (the user's `default` device).
    let connecting = tokio::spawn(Client::connect(config(&gw.url)));
    let mut conn = gw.next_conn().await;
    let hello = conn
        .answer_hello(device_welcome("default", "e1", 0, 0))
        .await;
    assert_eq!(hello_device(&hello), None);
    let (client, _events) = connecting.await.unwrap().unwrap();
    assert_eq!(client.device(), Some("default"));

    let bad = ClientConfig {
        device: Some("my laptop".into()),
        ..config(&gw.url)
    };
    assert!(matches!(
        Client::connect(bad).await,
        Err(ClientError::Config(_))
    ));
}

// A gap right after `welcome`: the device was away too long and the server trimmed what it had
// not acknowledged. Delivery resumes past it (the welcome's `resume` is its end), the
// application hears of it whole, and the position is acknowledged past it.
#[tokio::test]
async fn a_gap_at_welcome_reaches_the_application_and_moves_the_position() {
    let mut gw = FakeGateway::start().await;
    let connecting = tokio::spawn(Client::connect(ClientConfig {
        last_seq: 2,
        epoch: Some("e1".into()),
        device: Some("phone".into()),
        ack_interval: Duration::from_secs(3600),
        ..config(&gw.url)
    }));
    let mut conn = gw.next_conn().await;
    conn.answer_hello(device_welcome("phone", "e1", 8, 7)).await;
    conn.send(ServerFrame::Gap { from: 3, to: 7 }).await;
    conn.msg(6).await; // inside the gap: never delivered
    conn.msg(8).await;
    let (client, mut events) = connecting.await.unwrap().unwrap();
    let Event::Welcome(w) = next(&mut events).await else {
        panic!("welcome first")
    };
    assert_eq!(w.resumed_from, 7);
    match next(&mut events).await {
        Event::Gap { from, to } => assert_eq!((from, to), (3, 7)),
        other => panic!("expected the gap, got {other:?}"),
    }
    assert_eq!(next_message(&mut events).await.seq, 8);
    assert_eq!(client.position(), (8, Some("e1".into())));
    client.ack_now().await.unwrap();
    assert_eq!(conn.expect().await, ClientFrame::Ack { seq: 8 });
    assert!(events.is_empty());

    conn.close(1011).await;
    next(&mut events).await;
    let mut conn = gw.next_conn().await;
    let (_, last_seq, epoch) = conn.welcome("e1", 8, false).await;
    assert_eq!((last_seq, epoch.as_deref()), (8, Some("e1")));
}

// Gaps mid-session, before the next `msg`: each is acknowledged at once with an ack interval of
// zero, and the part of a gap that was already received is left out of the event.
#[tokio::test]
async fn gaps_mid_session_skip_only_what_was_not_received() {
    let mut gw = FakeGateway::start().await;
    let cfg = ClientConfig {
        device: Some("phone".into()),
        ack_interval: Duration::ZERO,
        ..config(&gw.url)
    };
    let (client, mut events, mut conn) = connect(&mut gw, Some(cfg)).await;
    conn.msg(1).await;
    conn.msg(2).await;
    conn.send(ServerFrame::Gap { from: 3, to: 5 }).await;
    conn.msg(6).await;
    conn.send(ServerFrame::Gap { from: 2, to: 7 }).await; // 2 and 6 were received
    conn.send(ServerFrame::Gap { from: 1, to: 6 }).await; // all of it was
    conn.send(ServerFrame::Gap { from: 9, to: 8 }).await; // names no seqs
    conn.msg(7).await; // skipped by a gap: a duplicate
    conn.msg(8).await;
    for seq in [1, 2, 5, 6, 7, 8] {
        assert_eq!(conn.expect().await, ClientFrame::Ack { seq });
    }
    assert_eq!(next_message(&mut events).await.seq, 1);
    assert_eq!(next_message(&mut events).await.seq, 2);
    assert!(matches!(
        next(&mut events).await,
        Event::Gap { from: 3, to: 5 }
    ));
    assert_eq!(next_message(&mut events).await.seq, 6);
    assert!(matches!(
        next(&mut events).await,
        Event::Gap { from: 7, to: 7 }
    ));
    assert_eq!(next_message(&mut events).await.seq, 8);
    assert_eq!(client.position(), (8, Some("e1".into())));
    assert!(events.is_empty());
}

// The server kept this device further than the client's own position (another connection of
// the device acknowledged more, or the client lost its position): the position moves there,
// acks never go below it, and what is at or below it is a duplicate.
#[tokio::test]
async fn a_resume_point_above_the_position_moves_it_there() {
    let mut gw = FakeGateway::start().await;
    let connecting = tokio::spawn(Client::connect(ClientConfig {
        last_seq: 3,
        epoch: Some("e1".into()),
        device: Some("tablet".into()),
        ack_interval: Duration::ZERO,
        ..config(&gw.url)
    }));
    let mut conn = gw.next_conn().await;
    conn.answer_hello(device_welcome("tablet", "e1", 11, 9))
        .await;
    let (client, mut events) = connecting.await.unwrap().unwrap();
    let Event::Welcome(w) = next(&mut events).await else {
        panic!("welcome first")
    };
    assert_eq!(w.resumed_from, 9);
    assert_eq!(client.position(), (9, Some("e1".into())));
    for seq in [5, 9, 10, 11] {
        conn.msg(seq).await;
    }
    assert_eq!(next_message(&mut events).await.seq, 10);
    assert_eq!(next_message(&mut events).await.seq, 11);
    // The jump is acknowledged, so the server's record of the device catches up.
    assert_eq!(conn.expect().await, ClientFrame::Ack { seq: 9 });
    assert_eq!(conn.expect().await, ClientFrame::Ack { seq: 10 });
    assert_eq!(conn.expect().await, ClientFrame::Ack { seq: 11 });
    assert!(events.is_empty());

    // A client with no position at all: the device's position is where it starts.
    let connecting = tokio::spawn(Client::connect(ClientConfig {
        device: Some("tablet".into()),
        ..config(&gw.url)
    }));
    let mut conn = gw.next_conn().await;
    conn.answer_hello(device_welcome("tablet", "e1", 11, 11))
        .await;
    conn.msg(11).await;
    conn.msg(12).await;
    let (client, mut events) = connecting.await.unwrap().unwrap();
    next(&mut events).await;
    assert_eq!(next_message(&mut events).await.seq, 12);
    assert_eq!(client.position(), (12, Some("e1".into())));
}

#[tokio::test]
async fn refusals_carry_the_code_or_status() {
    let mut gw = FakeGateway::start().await;
    let connecting = tokio::spawn(Client::connect(config(&gw.url)));
    let mut conn = gw.next_conn().await;
    conn.expect().await;
    conn.send(ServerFrame::error(ErrorCode::Unauthorized, "expired"))
        .await;
    conn.close(1008).await;
    match connecting.await.unwrap() {
        Err(ClientError::Server {
            code: ErrorCode::Unauthorized,
            message,
        }) => assert_eq!(message, "expired"),
        other => panic!("{:?}", other.map(|_| ())),
    }

    let connecting = tokio::spawn(Client::connect(config(&gw.url)));
    let mut conn = gw.next_conn().await;
    conn.expect().await;
    conn.close(1013).await;
    match connecting.await.unwrap() {
        Err(ClientError::Closed {
            code: Some(1013), ..
        }) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }

    let refusing = FakeGateway::start_with(Some(401)).await;
    match Client::connect(config(&refusing.url)).await {
        Err(ClientError::Handshake { status: 401, body }) => {
            assert_eq!(body.as_deref(), Some("refused"));
        }
        other => panic!("{:?}", other.map(|_| ())),
    }

    let nobody = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/ws", nobody.local_addr().unwrap());
    drop(nobody);
    assert!(matches!(
        Client::connect(config(&url)).await,
        Err(ClientError::Io(_))
    ));
}

#[tokio::test]
async fn connect_times_out_without_welcome() {
    let mut gw = FakeGateway::start().await;
    let cfg = ClientConfig {
        connect_timeout: Duration::from_millis(100),
        ..config(&gw.url)
    };
    let connecting = tokio::spawn(Client::connect(cfg));
    let _conn = gw.next_conn().await;
    assert!(matches!(
        connecting.await.unwrap(),
        Err(ClientError::Timeout)
    ));
}

#[tokio::test]
async fn token_travels_where_configured() {
    let mut gw = FakeGateway::start().await;
    for (placement, want_query, want_header) in [
        (TokenPlacement::Header, None, Some("Bearer a.b-c")),
        (TokenPlacement::Query, Some("token=a.b-c"), None),
    ] {
        let connecting = tokio::spawn(Client::connect(ClientConfig {
            token: "a.b-c".into(),
            token_in: placement,
            ..config(&gw.url)
        }));
        let mut conn = gw.next_conn().await;
        assert_eq!(conn.query.as_deref(), want_query);
        assert_eq!(conn.authorization.as_deref(), want_header);
        let (token, _, _) = conn.welcome("e1", 0, false).await;
        assert_eq!(token, None, "hello omits a token given at the upgrade");
        connecting.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn local_addr_sets_the_source_address() {
    let mut gw = FakeGateway::start().await;
    let local = "127.0.0.2".parse().unwrap();
    let connecting = tokio::spawn(Client::connect(ClientConfig {
        local_addr: Some(local),
        ..config(&gw.url)
    }));
    let mut conn = gw.next_conn().await;
    assert_eq!(conn.peer.ip(), local);
    conn.welcome("e1", 0, false).await;
    connecting.await.unwrap().unwrap();
}

#[tokio::test]
async fn json_codec_carries_binary_bodies() {
    let mut gw = FakeGateway::start().await;
    let cfg = ClientConfig {
        codec: Codec::Json,
        ..config(&gw.url)
    };
    let (client, mut events, mut conn) = connect(&mut gw, Some(cfg)).await;
    assert_eq!(conn.codec, Codec::Json);
    let c = client.clone();
    let send = tokio::spawn(async move { c.send("bob", "j1", vec![0xff, 0x00]).await });
    let (_, _, body) = expect_send(conn.expect().await);
    assert_eq!(&body[..], [0xff, 0x00]);
    conn.send(sent("j1", 1, false)).await;
    assert!(send.await.unwrap().is_ok());
    conn.send(ServerFrame::Msg {
        seq: 1,
        from: "bob".into(),
        id: "x".into(),
        ts: 1,
        body: Body(Bytes::from_static(&[0x80, 0x81])),
    })
    .await;
    assert_eq!(&next_message(&mut events).await.body[..], [0x80, 0x81]);
}

#[tokio::test]
async fn a_slow_reader_loses_nothing() {
    let mut gw = FakeGateway::start().await;
    let cfg = ClientConfig {
        event_capacity: 1,
        ..config(&gw.url)
    };
    let (_client, mut events, mut conn) = connect(&mut gw, Some(cfg)).await;
    let writer = tokio::spawn(async move {
        for seq in 1..=100 {
            conn.msg(seq).await;
        }
        conn
    });
    for seq in 1..=100 {
        if seq % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(next_message(&mut events).await.seq, seq);
    }
    let _conn = writer.await.unwrap();
}

#[tokio::test]
async fn without_reconnect_the_client_stops() {
    let mut gw = FakeGateway::start().await;
    let cfg = ClientConfig {
        reconnect: false,
        ..config(&gw.url)
    };
    let (client, mut events, mut conn) = connect(&mut gw, Some(cfg)).await;
    let c = client.clone();
    let in_flight = tokio::spawn(async move { c.send("bob", "s1", "x").await });
    conn.expect().await;
    conn.close(1000).await;
    assert!(matches!(
        in_flight.await.unwrap(),
        Err(SendError::Disconnected {
            close_code: Some(1000)
        })
    ));
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected { .. }
    ));
    assert!(events.recv().await.is_none());
    assert!(client.is_stopped());
    assert!(matches!(
        client.send("bob", "s2", "x").await,
        Err(SendError::Stopped)
    ));
    assert!(matches!(client.ping().await, Err(ClientError::Stopped)));
}

#[tokio::test]
async fn a_refused_reconnect_gives_up_with_an_event() {
    let mut gw = FakeGateway::start().await;
    let (_client, mut events, mut conn) = connect(&mut gw, None).await;
    conn.close(1011).await;
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected { .. }
    ));
    let mut conn = gw.next_conn().await;
    conn.expect().await;
    conn.send(ServerFrame::error(ErrorCode::Unauthorized, "expired"))
        .await;
    conn.close(1008).await;
    match next(&mut events).await {
        Event::ConnectFailed {
            error: ClientError::Server { code, .. },
            will_retry: false,
        } => assert_eq!(code, ErrorCode::Unauthorized),
        other => panic!("{other:?}"),
    }
    assert!(events.recv().await.is_none());
}

#[tokio::test]
async fn a_silent_server_is_dropped_and_a_ping_is_answered() {
    let mut gw = FakeGateway::start().await;
    let connecting = tokio::spawn(Client::connect(config(&gw.url)));
    let mut conn = gw.next_conn().await;
    conn.expect().await;
    conn.send(welcome("e1", 0, false, 200)).await; // silence limit: 500 ms
    let (client, mut events) = connecting.await.unwrap().unwrap();
    next(&mut events).await;
    let c = client.clone(); // dropping every handle would close the client
    let pinging = tokio::spawn(async move { c.ping().await });
    assert_eq!(conn.expect().await, ClientFrame::Ping);
    conn.send(ServerFrame::Pong).await;
    assert!(pinging.await.unwrap().is_ok());
    match next(&mut events).await {
        Event::Disconnected {
            close_code: None,
            reason,
        } => assert!(reason.contains("nothing from the server"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let mut conn = gw.next_conn().await;
    conn.welcome("e1", 0, false).await;
    assert!(matches!(next(&mut events).await, Event::Welcome(_)));
}

#[tokio::test]
async fn connection_level_errors_are_events() {
    let mut gw = FakeGateway::start().await;
    let (_client, mut events, mut conn) = connect(&mut gw, None).await;
    conn.send(ServerFrame::error(ErrorCode::Internal, "oops"))
        .await;
    conn.send(send_error("nobody-waits", ErrorCode::Invalid, None))
        .await;
    conn.ws.send(Message::text("not msgpack")).await.unwrap();
    for want in [ErrorCode::Internal, ErrorCode::Invalid, ErrorCode::BadFrame] {
        match next(&mut events).await {
            Event::Error(code, _) => assert_eq!(code, want),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn raw_connection_speaks_frames_and_sees_closes() {
    let mut gw = FakeGateway::start().await;
    let dialing = tokio::spawn({
        let url = gw.url.clone();
        async move { RawConnection::connect(&url, &["ferry.v1.json"], &[("x-test", "1")]).await }
    });
    let mut conn = gw.next_conn().await;
    let mut raw = dialing.await.unwrap().unwrap();
    assert_eq!(raw.subprotocol(), Some("ferry.v1.json"));
    assert_eq!(raw.codec(), Codec::Json);
    raw.send_frame(&ClientFrame::Ping).await.unwrap();
    assert_eq!(conn.expect().await, ClientFrame::Ping);
    raw.send_text(r#"{"type":"ack","seq":4}"#).await.unwrap();
    assert_eq!(conn.expect().await, ClientFrame::Ack { seq: 4 });
    conn.send(ServerFrame::Pong).await;
    let frame = raw.next_frame(WAIT).await.unwrap();
    assert_eq!(frame, RawEvent::Frame(ServerFrame::Pong));
    assert!(matches!(
        raw.next_frame(Duration::from_millis(50)).await,
        Err(ClientError::Timeout)
    ));
    conn.close(1008).await;
    let closed = RawEvent::Closed {
        code: Some(1008),
        reason: "bye".into(),
    };
    assert_eq!(raw.next_frame(WAIT).await.unwrap(), closed);
    assert_eq!(raw.next_frame(WAIT).await.unwrap(), closed, "stays closed");

    match RawConnection::connect(&gw.url, &["ferry.v2"], &[]).await {
        Err(ClientError::Handshake { status: 400, .. }) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
    let dialing = tokio::spawn({
        let url = gw.url.clone();
        async move { RawConnection::connect(&url, &[], &[]).await }
    });
    let _conn = gw.next_conn().await;
    let raw = dialing.await.unwrap().unwrap();
    assert_eq!((raw.subprotocol(), raw.codec()), (None, Codec::MsgPack));
}
