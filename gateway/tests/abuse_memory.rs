//! Memory under abuse (issue 13, H1 and H3), measured on a real `ferry-gateway` process: its peak
//! RSS (`/proc/<pid>/status`) and `ferry_outbound_queued_bytes` from its `/metrics`, against
//! bounds derived from the limits. It runs the embedded engine, so the process's memory is the
//! gateway's alone. Stops only the process it started.
//!
//! `FERRY_TEST_GATEWAY_BIN` runs another build instead of the one cargo built for these tests
//! (one from before the fixes, to see these tests fail). Such a build may lack the gauge, so the
//! gauge is read only from the binary built here; the RSS bounds apply to every build.

mod common;
mod process;

use std::net::SocketAddr;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{WAIT, http_get, next_frame, raw_send, send_frame, series_value};
use ferry_shared::ServerFrame;
use ferry_shared::client::{RawConnection, RawEvent};
use ferry_shared::{ClientFrame, ErrorCode};
use process::{Started, built_gateway, gateway_command, start_until_serving};
use tokio::time::Instant;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The gateway's defaults these bounds are derived from (`config.rs`; the gateway runs with them).
const OUTBOUND_QUEUE: u64 = 256;
const OUTBOUND_QUEUE_BYTES: u64 = MIB;
const MAX_CONNECTIONS_PER_USER: usize = 16;
/// `outbound.rs` `ANSWER_SLACK`: answers queued beyond `--outbound-queue`, at most.
const ANSWER_SLACK: u64 = 64;
/// An answer to a refused `send`, encoded, at most: the `id` echo is cut to 64 bytes
/// (`sends.rs` `ECHOED_ID`) and the message is under 200 bytes (`abuse.rs` checks both); the
/// rest is the frame's keys, code and `retry_after_ms`.
const MAX_ANSWER: u64 = 512;
/// Allowance for what the allocator keeps after a burst (freed memory is not always returned
/// to the system at once, and each worker thread has an arena of its own), and for the small
/// state of the connections the test opens.
const ALLOCATOR_SLACK: u64 = 8 * MIB;

/// H1: a user sends, on each of its connections, frames with an `id` near the frame limit
/// (900 KB), beyond the send rate, and never reads. Before the fix every refusal echoed the whole
/// `id` (the rate check came first, so a rate-limited send did too), so each connection's
/// outbound queue filled with answers up to its byte bound (1 MiB and one answer more) on top
/// of what the kernel's socket buffers took. On a 2-core machine the RSS grew by about 73 MiB
/// before the fix (5e3f36d) and about 17 MiB after (the connections' read buffers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_to_a_reader_that_never_reads_hold_little() {
    let gateway = Gateway::start(&[]);
    gateway.warm_up().await;
    let baseline = gateway.reset_peak();

    // 320 sends in all: the user's send burst is 200, so 120 are beyond the send rate.
    const CONNECTIONS: usize = MAX_CONNECTIONS_PER_USER;
    const SENDS: usize = 20;
    let token = gateway.token("alice").await;
    let mut alice = Vec::new();
    for _ in 0..CONNECTIONS {
        alice.push(gateway.hello(&token).await.expect("welcomed"));
    }
    const SENDS_IN: &str = "ferry_frames_in_total{type=\"send\"}";
    let read_before = gateway.series(SENDS_IN).await;
    let gauge = gateway.watch_gauge();
    let filler = Arc::new("x".repeat(900_000));
    let deadline = Instant::now() + Duration::from_secs(8);
    let floods: Vec<_> = alice
        .into_iter()
        .enumerate()
        .map(|(c, mut conn)| {
            let filler = filler.clone();
            tokio::spawn(async move {
                let mut sent = 0;
                for n in 0..SENDS {
                    let frame = send_frame(&format!("{c:02}-{n:02}-{filler}"), "bob", "hi");
                    match tokio::time::timeout_at(deadline, conn.send_frame(&frame)).await {
                        Ok(Ok(())) => sent += 1,
                        // A gateway that stops reading the client (or closes it) ends the
                        // flood early.
                        _ => break,
                    }
                }
                (conn, sent)
            })
        })
        .collect();
    let mut alice = Vec::new();
    let mut sent = 0;
    for flood in floods {
        let (conn, n) = flood.await.expect("a flood");
        alice.push(conn);
        sent += n;
    }
    // Every frame sent is read and refused (or the deadline passes, on a gateway that stopped
    // reading).
    let read = gateway
        .wait_for_series(SENDS_IN, read_before + sent, deadline)
        .await
        - read_before;
    let peak = gateway.peak_growth(baseline);
    let now = gateway.rss_growth(baseline);
    let queued_max = gauge.stop();
    eprintln!(
        "H1: {sent} sends of 900 KB ids written on {CONNECTIONS} connections, {read} read; RSS \
         growth: peak {} KiB, now {} KiB; gauge at most {queued_max:?} bytes",
        peak / KIB,
        now / KIB,
    );

    // Each connection holds at most one frame in its read buffer (--max-frame-bytes, 1 MiB) and
    // its answers (ANSWER_BOUND); each worker thread (one per core) decodes one frame at a time,
    // a copy of the message and of its `id`: 2 MiB.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let decoding = workers.min(CONNECTIONS) as u64;
    let queued_bound = CONNECTIONS as u64 * ANSWER_BOUND;
    let bound = CONNECTIONS as u64 * (MIB + ANSWER_BOUND) + decoding * 2 * MIB + ALLOCATOR_SLACK;
    assert!(
        peak <= bound,
        "{CONNECTIONS} connections refusing {read} sends grew the gateway's RSS by {} KiB \
         (bound {} KiB)",
        peak / KIB,
        bound / KIB
    );
    if let Some(queued_max) = queued_max {
        assert!(
            queued_max <= queued_bound,
            "up to {queued_max} bytes queued (bound {queued_bound})"
        );
    }
    assert!(
        read >= (CONNECTIONS * SENDS) as u64,
        "the gateway read only {read} of {} sends",
        CONNECTIONS * SENDS
    );
    drop(alice);
    gateway.expect_nothing_queued().await;
}

/// The answers one connection can have queued: the queue takes answers while it holds fewer than
/// `--outbound-queue` + `ANSWER_SLACK` frames, each at most `MAX_ANSWER` bytes: 160 KiB.
const ANSWER_BOUND: u64 = (OUTBOUND_QUEUE + ANSWER_SLACK) * MAX_ANSWER;

/// H3: one user opens 300 connections that never read, and another user sends it 8 MiB of
/// live messages. Before the fix all of them were welcomed, and each held its outbound queue of
/// frames (shared by the user's connections), its session and its socket buffers. On a 2-core
/// machine the RSS grew by about 39 MiB before the fix (5e3f36d) and about 11 MiB after (the
/// inbox's 8 MiB, mostly). Outside the RSS, each connection also held about 1.5 MB of kernel
/// socket buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_slow_connections_of_one_user_hold_little() {
    // The sender is not the bottleneck: 128 sends of 64 KiB at once are within these rates.
    // (Given as FERRY_* variables, which a build without --store-bytes-rate ignores.)
    let gateway = Gateway::start(&[
        ("FERRY_SEND_RATE", "10000"),
        ("FERRY_SEND_BURST", "10000"),
        ("FERRY_STORE_BYTES_RATE", "1000000000"),
    ]);
    gateway.warm_up().await;
    let baseline = gateway.reset_peak();

    const CONNECTIONS: usize = 300;
    const BODY: usize = 64 * 1024;
    const MESSAGES: usize = 128; // 8 MiB
    let token = gateway.token("bob").await;
    let mut bob = Vec::new();
    let mut refused = 0;
    for _ in 0..CONNECTIONS {
        match gateway.hello(&token).await {
            Some(conn) => bob.push(conn),
            None => refused += 1,
        }
    }
    let gauge = gateway.watch_gauge();
    let mut alice = gateway.raw("alice").await;
    let body = "b".repeat(BODY);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut stored = 0;
    for n in 0..MESSAGES {
        if !send_until_stored(&mut alice, &format!("m-{n}"), &body, deadline).await {
            break;
        }
        stored += 1;
    }
    // Every session of bob's has its queue full and lags (the rest waits in the inbox), or the
    // deadline passes.
    let lagging = gateway
        .wait_for_series("ferry_sessions_lagging", bob.len() as u64, deadline)
        .await;
    let peak = gateway.peak_growth(baseline);
    let now = gateway.rss_growth(baseline);
    let queued_max = gauge.stop();
    eprintln!(
        "H3: {} of {CONNECTIONS} connections welcomed, {refused} refused, {lagging} lagging, \
         {stored} messages stored; RSS growth: peak {} KiB, now {} KiB; gauge at most \
         {queued_max:?} bytes",
        bob.len(),
        peak / KIB,
        now / KIB,
    );

    // Each welcomed connection queues live messages while it holds less than
    // --outbound-queue-bytes, so at most that plus one message (64 KiB and its frame) more.
    let per_connection = OUTBOUND_QUEUE_BYTES + BODY as u64 + KIB;
    let queued_bound = MAX_CONNECTIONS_PER_USER as u64 * per_connection;
    // In memory the queues hold less than the gauge counts: a live message is encoded once for
    // all of a user's sessions, so the frames they hold are at most the 8 MiB sent. Beside
    // them: the inbox's 8 MiB (the embedded engine keeps it in memory); each welcomed
    // connection's session (about 7.5 KB idle, see docs/OPERATIONS.md) and its queue's slots,
    // 64 KiB allowed for both; the sender's read buffer (its frames are read one at a time),
    // 1 MiB allowed.
    let sent_bytes = (MESSAGES * BODY) as u64;
    let bound = 2 * sent_bytes + MAX_CONNECTIONS_PER_USER as u64 * 64 * KIB + MIB + ALLOCATOR_SLACK;
    assert!(
        peak <= bound,
        "{} slow connections of one user grew the gateway's RSS by {} KiB (bound {} KiB)",
        bob.len(),
        peak / KIB,
        bound / KIB
    );
    if let Some(queued_max) = queued_max {
        assert!(
            queued_max <= queued_bound,
            "up to {queued_max} bytes queued (bound {queued_bound})"
        );
    }
    // After the memory checks, so that a build without the cap fails on memory.
    assert_eq!(bob.len(), MAX_CONNECTIONS_PER_USER, "connections welcomed");
    assert_eq!(refused, CONNECTIONS - MAX_CONNECTIONS_PER_USER);
    assert_eq!(stored, MESSAGES, "messages stored");
    drop((bob, alice));
    gateway.expect_nothing_queued().await;
}

/// Sends `body` to bob as `id` until it is stored, retrying with the same id after
/// `rate_limited` as a client should (a node behind on delivery refuses sends for a moment):
/// whether it was stored before `deadline`.
async fn send_until_stored(
    conn: &mut RawConnection,
    id: &str,
    body: &str,
    deadline: Instant,
) -> bool {
    let frame = send_frame(id, "bob", body);
    loop {
        let send = conn.send_frame(&frame);
        if !matches!(tokio::time::timeout_at(deadline, send).await, Ok(Ok(()))) {
            return false;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match conn.next_frame(left).await {
                Ok(RawEvent::Frame(ServerFrame::Sent { id: got, .. })) if got == id => {
                    return true;
                }
                Ok(RawEvent::Frame(ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    retry_after_ms,
                    ..
                })) => {
                    let wait = Duration::from_millis(retry_after_ms.unwrap_or(10));
                    tokio::time::sleep(wait).await;
                    break;
                }
                Ok(RawEvent::Frame(ServerFrame::Error { code, message, .. })) => {
                    panic!("send {id} refused: {code:?} {message}")
                }
                Ok(RawEvent::Frame(_)) => continue,
                Ok(RawEvent::Closed { .. }) | Err(_) => return false,
            }
        }
    }
}

/// A `ferry-gateway` process of this test's own, `--dev` on loopback ports chosen by the system.
/// Dropping it kills it (by its PID: it is this test's child).
struct Gateway {
    child: Child,
    ws: SocketAddr,
    admin: SocketAddr,
    /// Whether the binary is the one built here, which has `ferry_outbound_queued_bytes`.
    has_gauge: bool,
}

impl Gateway {
    /// Starts the gateway with `env` as its only `FERRY_*` settings, and waits until it serves.
    fn start(env: &[(&str, &str)]) -> Self {
        let other = std::env::var_os("FERRY_TEST_GATEWAY_BIN");
        let bin = other.clone().unwrap_or_else(|| built_gateway().into());
        let mut command = gateway_command(
            bin,
            &[
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
        );
        command.envs(env.iter().copied()).env("FERRY_LOG", "info");
        let Started {
            mut child,
            serving,
            rest,
        } = start_until_serving(command);
        // The rest of the log is read and dropped, so the gateway never blocks on a full pipe.
        std::thread::spawn(move || rest.map_while(Result::ok).for_each(drop));
        let Some(serving) = serving else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway exited before serving");
        };
        let addr = |key: &str| -> SocketAddr {
            let start = serving.find(&format!("{key}=Some(")).expect(key) + key.len() + 6;
            let end = start + serving[start..].find(')').expect("a closing parenthesis");
            serving[start..end].parse().expect("an address")
        };
        Gateway {
            ws: addr("listen"),
            admin: addr("admin"),
            child,
            has_gauge: other.is_none(),
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/ws", self.ws)
    }

    /// A token for `user` from the `--dev` token endpoint.
    async fn token(&self, user: &str) -> String {
        let (status, body) = http_get(self.ws, &format!("/dev/token?user={user}"))
            .await
            .expect("GET /dev/token");
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("a JSON answer");
        json["token"].as_str().expect("a token").to_string()
    }

    /// A msgpack connection that said `hello` with `token`: `None` when it was refused.
    async fn hello(&self, token: &str) -> Option<RawConnection> {
        let mut conn = RawConnection::connect(&self.url(), &["ferry.v1.msgpack"], &[])
            .await
            .expect("raw connects");
        let hello = ClientFrame::Hello {
            token: Some(token.to_string()),
            last_seq: 0,
            epoch: None,
            device: None,
        };
        conn.send_frame(&hello).await.expect("hello");
        match next_frame(&mut conn).await {
            ServerFrame::Welcome { .. } => Some(conn),
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                ..
            } => None,
            other => panic!("expected welcome or rate_limited, got {other:?}"),
        }
    }

    /// A msgpack connection of `user`, welcomed.
    async fn raw(&self, user: &str) -> RawConnection {
        let token = self.token(user).await;
        self.hello(&token).await.expect("welcomed")
    }

    /// What the gateway does on its first connections (handshake, hello, a message stored,
    /// delivered and acknowledged), so that the baseline includes its one-time allocations.
    async fn warm_up(&self) {
        let mut sender = self.raw("warm-sender").await;
        let mut recipient = self.raw("warm-recipient").await;
        let seq = raw_send(&mut sender, "w-1", "warm-recipient", "hello").await;
        common::raw_messages(&mut recipient, 1).await;
        recipient
            .send_frame(&ClientFrame::Ack { seq })
            .await
            .expect("ack");
        common::ping_pong(&mut recipient).await;
        for mut conn in [sender, recipient] {
            conn.close(1000, "bye").await.expect("close");
            while let Ok(RawEvent::Frame(_)) = conn.next_frame(WAIT).await {}
        }
        self.metrics().await;
    }

    fn status_kib(&self, field: &str) -> u64 {
        let path = format!("/proc/{}/status", self.child.id());
        let status = std::fs::read_to_string(&path).expect("the gateway's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in {path}"))
    }

    /// Resets the gateway's peak RSS to its current RSS (`clear_refs` 5), which it returns in
    /// bytes: the baseline.
    fn reset_peak(&self) -> u64 {
        let path = format!("/proc/{}/clear_refs", self.child.id());
        std::fs::write(&path, "5").expect("reset the peak RSS");
        self.status_kib("VmRSS") * KIB
    }

    /// The peak RSS since `reset_peak`, over the baseline, in bytes.
    fn peak_growth(&self, baseline: u64) -> u64 {
        (self.status_kib("VmHWM") * KIB).saturating_sub(baseline)
    }

    /// The current RSS over the baseline, in bytes.
    fn rss_growth(&self, baseline: u64) -> u64 {
        (self.status_kib("VmRSS") * KIB).saturating_sub(baseline)
    }

    async fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").await.expect("/metrics");
        assert_eq!(status, 200);
        body
    }

    /// The value of `series` now (0 when it is not exported).
    async fn series(&self, series: &str) -> u64 {
        series_value(&self.metrics().await, series).map_or(0, |v| v as u64)
    }

    /// Polls `series` until it reaches `at_least` or `deadline` passes; its last value.
    async fn wait_for_series(&self, series: &str, at_least: u64, deadline: Instant) -> u64 {
        loop {
            let value = self.series(series).await;
            if value >= at_least || Instant::now() >= deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Scrapes `ferry_outbound_queued_bytes` every 20 ms until stopped (nothing without the
    /// gauge).
    fn watch_gauge(&self) -> GaugeWatch {
        let max = Arc::new(AtomicU64::new(0));
        let task = self.has_gauge.then(|| {
            let (admin, max) = (self.admin, max.clone());
            tokio::spawn(async move {
                loop {
                    if let Ok((_, body)) = http_get(admin, "/metrics").await {
                        let value =
                            series_value(&body, GAUGE).expect("the gauge is exported") as u64;
                        max.fetch_max(value, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        });
        GaugeWatch { max, task }
    }

    /// Once every connection is closed, nothing stays counted as queued.
    async fn expect_nothing_queued(&self) {
        if !self.has_gauge {
            return;
        }
        common::eventually("the gauge back at 0", || async {
            self.metrics()
                .await
                .lines()
                .any(|l| l == format!("{GAUGE} 0"))
        })
        .await;
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const GAUGE: &str = "ferry_outbound_queued_bytes";

/// The highest value of the gauge seen while it was watched.
struct GaugeWatch {
    max: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl GaugeWatch {
    /// The highest value seen (`None` without the gauge).
    fn stop(self) -> Option<u64> {
        let task = self.task?;
        task.abort();
        Some(self.max.load(Ordering::Relaxed))
    }
}
