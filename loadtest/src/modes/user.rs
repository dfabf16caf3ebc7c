//! One user of a load run, as one task: it sends its share of the schedule open loop (message
//! `k = n, n + C, n + 2C, …` at its due time, pipelined, never waiting for earlier answers;
//! a due message goes out before anything else the task has to do), drains and checks its
//! client's events, and, if it is one of the offline users, closes for the offline window and
//! comes back resuming from the position it held.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use ferry_shared::client::{Client, Events, SendError, Sent};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use super::send::{SendPolicy, send};
use crate::clients::{Conn, Connector};
use crate::schedule::{Schedule, encode_body};
use crate::verify::{Receiver, Verifier};

/// How late after the end of the schedule a due message may still go out (timer lag); later
/// than that, what the in-flight bound held back counts as not sent.
const LATE_LIMIT: Duration = Duration::from_secs(1);
/// How long a leaving user waits for its sends in flight before it closes anyway.
const LEAVE_GRACE: Duration = Duration::from_secs(2);

/// What every user task of a run shares.
pub(crate) struct RunShared {
    pub verifier: Verifier,
    pub schedule: Schedule,
    /// Every user's id, by index.
    pub users: Vec<Arc<str>>,
    pub body_bytes: usize,
    /// Sends without an answer per connection; 0: no limit.
    pub max_in_flight: usize,
    pub send_policy: SendPolicy,
    /// When the offline users are away: `[from, until)`.
    pub offline_window: Option<(Instant, Instant)>,
    pub connector: Arc<Connector>,
    /// Cancelled when the run ends: every user closes and drains.
    pub stop: CancellationToken,
}

impl RunShared {
    /// Every message of the schedule was handed to a client or skipped (its sender was
    /// offline), or it is too late to send the rest: nothing more will go out.
    pub(crate) fn sending_over(&self) -> bool {
        let s = &self.verifier.stats;
        let handled = s.dispatched.load(Relaxed) + s.skipped_offline.load(Relaxed);
        handled >= self.schedule.total || Instant::now() >= self.schedule.end() + LATE_LIMIT
    }
}

type SendOutcome = (u64, Instant, Result<Sent, SendError>);

/// One send, owned so that many can be pipelined in one `FuturesUnordered`.
async fn send_one(
    run: Arc<RunShared>,
    client: Client,
    to: Arc<str>,
    k: u64,
    due: Instant,
    body: bytes::Bytes,
) -> SendOutcome {
    let id = k.to_string();
    let stats = &run.verifier.stats;
    let result = send(&client, &to, &id, body, run.send_policy, stats).await;
    (k, due, result)
}

/// A timer re-armed in place rather than re-created on every turn of the loop.
struct Alarm {
    sleep: Pin<Box<Sleep>>,
    at: Option<Instant>,
}

impl Alarm {
    fn new() -> Self {
        Alarm {
            sleep: Box::pin(sleep_until(Instant::now())),
            at: None,
        }
    }

    fn set(&mut self, at: Option<Instant>) {
        if at != self.at {
            if let Some(at) = at {
                self.sleep.as_mut().reset(at);
            }
            self.at = at;
        }
    }
}

/// The sending side of one user: its next message in the schedule and its offline window.
struct Sender {
    n: usize,
    /// The next message of this user's share (`n`, `n + C`, …).
    next_k: u64,
    /// `[from, until)` when this user is offline.
    window: Option<(Instant, Instant)>,
    inflight: FuturesUnordered<SendFuture>,
}

type SendFuture = Pin<Box<dyn Future<Output = SendOutcome> + Send>>;

impl Sender {
    /// When the next message is due, if any is left.
    fn next_due(&self, run: &RunShared) -> Option<Instant> {
        (self.next_k < run.schedule.total).then(|| run.schedule.due(self.next_k))
    }

    fn can_send(&self, run: &RunShared) -> bool {
        run.max_in_flight == 0 || self.inflight.len() < run.max_in_flight
    }

    /// Sends every message that is due, up to the in-flight bound; those due while this user is
    /// offline are skipped, and after the end of sending nothing more goes out.
    fn dispatch_due(&mut self, run: &Arc<RunShared>, client: &Client) {
        let v = &run.verifier;
        let now = Instant::now();
        if now >= run.schedule.end() + LATE_LIMIT {
            // Sending is over: what the in-flight bound held back is never sent.
            self.next_k = run.schedule.total;
        }
        while let Some(due) = self.next_due(run).filter(|&due| due <= now) {
            if !self.can_send(run) {
                return;
            }
            let k = self.next_k;
            self.next_k += run.users.len() as u64;
            if self
                .window
                .is_some_and(|(from, until)| due >= from && due < until)
            {
                v.stats.skipped_offline.fetch_add(1, Relaxed);
                continue;
            }
            let to = Arc::clone(&run.users[v.routing.recipient(k)]);
            let body = encode_body(k, run.schedule.offset_ns(k), run.body_bytes);
            v.stats.dispatched.fetch_add(1, Relaxed);
            v.stats.in_flight.fetch_add(1, Relaxed);
            v.dispatch_lag
                .record(self.n, now.saturating_duration_since(due));
            let send = send_one(Arc::clone(run), client.clone(), to, k, due, body);
            self.inflight.push(Box::pin(send));
        }
    }
}

/// Runs user `n` until the run stops; its receiving side's final state.
pub(crate) async fn run_user(
    run: Arc<RunShared>,
    n: usize,
    conn: Conn,
    goes_offline: bool,
) -> Receiver {
    let v = &run.verifier;
    let mut rx = Receiver::new(n);
    let Conn {
        config,
        mut client,
        mut events,
    } = conn;
    let window = run.offline_window.filter(|_| goes_offline);
    let mut sender = Sender {
        n,
        next_k: n as u64,
        window,
        inflight: FuturesUnordered::new(),
    };
    let mut leave_at = window.map(|(from, _)| from);
    let mut leaving_since: Option<Instant> = None;
    let (mut alarm, mut leave) = (Alarm::new(), Alarm::new());
    loop {
        alarm.set(sender.next_due(&run));
        leave.set(leave_at);
        let can_send = sender.can_send(&run);
        tokio::select! {
            biased;
            () = run.stop.cancelled() => break,
            // First, so that a busy receiving side never holds a due message back.
            () = &mut alarm.sleep, if alarm.at.is_some() && can_send => {
                alarm.at = None;
                sender.dispatch_due(&run, &client);
            }
            event = events.recv() => match event {
                Some(event) => rx.on_event(v, event),
                None => {
                    tracing::warn!(user = n, "client stopped for good");
                    break;
                }
            },
            Some((k, due, result)) = sender.inflight.next(), if !sender.inflight.is_empty() => {
                v.on_send(n, k, due, result);
            }
            () = &mut leave.sleep, if leave.at.is_some() => {
                (leave.at, leave_at) = (None, None);
                leaving_since = Some(Instant::now());
            }
        }
        let Some(since) = leaving_since else {
            continue;
        };
        if !sender.inflight.is_empty() && since.elapsed() < LEAVE_GRACE {
            continue;
        }
        leaving_since = None;
        match go_offline(&run, &config, client, &mut events, &mut rx, window).await {
            Some((c, e)) => (client, events) = (c, e),
            None => return finish(&run, sender, &mut rx).await,
        }
    }
    close_and_drain(&client, &mut events, &mut rx, v).await;
    finish(&run, sender, &mut rx).await
}

/// Takes the outcome of the sends still in flight; the receiving side's final state.
async fn finish(run: &RunShared, mut sender: Sender, rx: &mut Receiver) -> Receiver {
    while let Some((k, due, result)) = sender.inflight.next().await {
        run.verifier.on_send(sender.n, k, due, result);
    }
    std::mem::take(rx)
}

/// Closes the client for the offline window and comes back resuming from its position; `None`
/// if the run stopped meanwhile or the user could not come back.
async fn go_offline(
    run: &RunShared,
    config: &ferry_shared::client::ClientConfig,
    client: Client,
    events: &mut Events,
    rx: &mut Receiver,
    window: Option<(Instant, Instant)>,
) -> Option<(Client, Events)> {
    let v = &run.verifier;
    let (_, until) = window?;
    v.stats.offline_now.fetch_add(1, Relaxed);
    v.recipients
        .went_offline(rx.n, v.since_t0_ms(Instant::now()));
    close_and_drain(&client, events, rx, v).await;
    let back = tokio::select! {
        () = run.stop.cancelled() => None,
        back = come_back(&run.connector, config, &client, until) => back,
    };
    if back.is_some() {
        v.recipients.came_back(rx.n, v.since_t0_ms(Instant::now()));
    }
    v.stats.offline_now.fetch_sub(1, Relaxed);
    back
}

/// Closes the client (a last ack, close 1000) and takes every event it still had.
async fn close_and_drain(client: &Client, events: &mut Events, rx: &mut Receiver, v: &Verifier) {
    client.clone().close().await;
    while let Some(event) = events.recv().await {
        rx.on_event(v, event);
    }
}

/// Waits for `until`, then reconnects resuming from the position `old` held; `None` if it
/// cannot.
async fn come_back(
    connector: &Connector,
    config: &ferry_shared::client::ClientConfig,
    old: &Client,
    until: Instant,
) -> Option<(Client, Events)> {
    let (last_seq, epoch) = old.position();
    sleep_until(until).await;
    let resume = ferry_shared::client::ClientConfig {
        last_seq,
        epoch,
        ..config.clone()
    };
    let give_up_at = Instant::now() + connector.target().connect_timeout * 3;
    match connector.connect(&resume, give_up_at).await {
        Ok(connected) => Some(connected),
        Err(e) => {
            tracing::warn!(error = %e, "an offline user could not come back");
            None
        }
    }
}
