//! The delivery verifier: what every client task reports to as the run goes (a send's answer,
//! each event of a recipient's client), checked against the [`Ledger`]: every message answered
//! `sent` received, once within an epoch, at the seq it was given, and in increasing seq order
//! on its recipient's connection; or, if its recipient got a `reset` after the answer, reported
//! lost.
//!
//! The Rust client drops duplicate seqs itself and does not say how many it dropped, so
//! duplicates are counted at the application level: the same message (`from`, `id`) handed to
//! the application twice. Within one epoch that can only happen if it was stored twice; after a
//! `reset` the server replays the inbox from its start, so the recipient may be handed again
//! what it had before, which the protocol allows.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ferry_shared::client::{Event, SendError, Sent};
use tokio::time::Instant;

use crate::latency::Latency;
use crate::ledger::{Fate, Ledger, Receipt, Recipients, Tally};
use crate::schedule::{Routing, decode_body};
use crate::timeline::Timeline;

/// After the latest `reset`, how long the replays it started get before the messages still
/// missing count as reported lost rather than on their way (a replay follows the `welcome` at
/// once; this is slack for a busy machine).
const REPLAY_GRACE: Duration = Duration::from_secs(1);

/// Counters shared by every client task.
#[derive(Default)]
pub(crate) struct Stats {
    pub dispatched: AtomicU64,
    pub skipped_offline: AtomicU64,
    pub sent_ok: AtomicU64,
    pub sent_duplicate: AtomicU64,
    pub in_flight: AtomicI64,
    /// Messages delivered at least once.
    pub unique_delivered: AtomicU64,
    /// `Message` events handed to the application.
    pub deliveries: AtomicU64,
    pub out_of_order: AtomicU64,
    pub resets: AtomicU64,
    /// The latest `reset`, ns after `t0`; 0 before the first.
    pub last_reset_ns: AtomicU64,
    pub disconnects: AtomicU64,
    /// `welcome`s after a client's first (the client's own reconnects and resumes).
    pub resumes: AtomicU64,
    pub reconnect_requests: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Messages that are not this run's or reached the wrong user.
    pub foreign: AtomicU64,
    pub offline_now: AtomicI64,
    /// Latest `sent` answer and latest delivery, ns after `t0`.
    pub last_sent_ns: AtomicU64,
    pub last_delivery_ns: AtomicU64,
    /// `rate_limited` answers, every attempt's (a send retried three times counts three).
    pub rate_limited: AtomicU64,
    /// Sends that ended with an `error` answer of the gateway (any code) instead of `sent`.
    pub sends_refused: AtomicU64,
    send_errors: Mutex<BTreeMap<String, u64>>,
    event_errors: Mutex<BTreeMap<String, u64>>,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    *map.entry(key.to_owned()).or_default() += 1;
}

impl Stats {
    /// One `rate_limited` answer.
    pub(crate) fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Relaxed);
    }

    /// A send that got no `sent`, by protocol code or client-side reason.
    pub(crate) fn send_error(&self, error: &SendError) {
        let kind = match error {
            SendError::Rejected { code, .. } => {
                self.sends_refused.fetch_add(1, Relaxed);
                code.as_str()
            }
            SendError::Disconnected { .. } => "disconnected",
            SendError::Timeout => "timeout",
            SendError::IdInFlight => "id_in_flight",
            SendError::Encode(_) => "encode",
            SendError::Stopped => "stopped",
        };
        bump(&self.send_errors, kind);
    }

    pub(crate) fn send_errors(&self) -> BTreeMap<String, u64> {
        self.send_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn event_errors(&self) -> BTreeMap<String, u64> {
        self.event_errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What every receiving task checks against.
pub(crate) struct Verifier {
    pub ledger: Ledger,
    /// When each recipient last got `reset`, and when it was offline.
    pub recipients: Recipients,
    pub stats: Stats,
    /// Scheduled time → `sent` answer.
    pub sent_latency: Latency,
    /// Scheduled time → delivery to the recipient.
    pub delivery_latency: Latency,
    /// Scheduled time → handed to the client: how far the generator itself fell behind its
    /// schedule (the machine's cores, the in-flight bound).
    pub dispatch_lag: Latency,
    /// First deliveries and `sent` answers over time.
    pub timeline: Timeline,
    pub routing: Routing,
    /// Sender user ids, by sender index.
    pub senders: Vec<Arc<str>>,
    /// Time zero of body offsets and of the ledger's times.
    pub t0: Instant,
}

impl Verifier {
    /// A verifier for `total` messages to `recipients` users.
    pub(crate) fn new(
        total: u64,
        recipients: usize,
        routing: Routing,
        senders: Vec<Arc<str>>,
        t0: Instant,
    ) -> Self {
        Verifier {
            ledger: Ledger::new(total),
            recipients: Recipients::new(recipients),
            stats: Stats::default(),
            sent_latency: Latency::new(),
            delivery_latency: Latency::new(),
            dispatch_lag: Latency::new(),
            timeline: Timeline::none(),
            routing,
            senders,
            t0,
        }
    }

    /// The same, counting over `timeline`.
    pub(crate) fn with_timeline(self, timeline: Timeline) -> Self {
        Verifier { timeline, ..self }
    }

    fn since_t0_ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.t0).as_nanos()).unwrap_or(u64::MAX)
    }

    pub(crate) fn since_t0_ms(&self, at: Instant) -> u32 {
        u32::try_from(at.saturating_duration_since(self.t0).as_millis()).unwrap_or(u32::MAX)
    }

    /// A send's outcome, from the task of sender `who`; `scheduled` is when it was due.
    pub(crate) fn on_send(
        &self,
        who: usize,
        k: u64,
        scheduled: Instant,
        r: Result<Sent, SendError>,
    ) {
        let now = Instant::now();
        self.stats.in_flight.fetch_sub(1, Relaxed);
        match r {
            Ok(sent) => {
                self.ledger.answered(k, sent.seq, self.since_t0_ms(now));
                self.stats.sent_ok.fetch_add(1, Relaxed);
                if sent.duplicate {
                    self.stats.sent_duplicate.fetch_add(1, Relaxed);
                }
                self.sent_latency
                    .record(who, now.saturating_duration_since(scheduled));
                let at_ns = self.since_t0_ns(now);
                self.timeline.sent(at_ns);
                self.stats.last_sent_ns.fetch_max(at_ns, Relaxed);
            }
            Err(e) => {
                tracing::debug!(sender = who, k, error = %e, "a send got no `sent`");
                self.stats.send_error(&e);
            }
        }
    }

    /// Message `k`'s recipient got a `reset` after `k` was answered `sent`.
    fn reported(&self, k: u64, answered_ms: u32) -> bool {
        self.recipients
            .reset_after(self.routing.recipient(k), answered_ms)
    }

    /// The verdict over every message.
    pub(crate) fn tally(&self) -> Tally {
        self.ledger.tally(|k, answered_ms| {
            let recipient = self.routing.recipient(k);
            Fate {
                reported: self.reported(k, answered_ms),
                offline_recipient: self
                    .recipients
                    .offline_at(recipient, answered_ms)
                    .then_some(recipient),
            }
        })
    }

    /// No send waits for an answer, and every answered message was delivered, or was reported
    /// lost to its recipient through a `reset` that came at least [`REPLAY_GRACE`] ago.
    pub(crate) fn settled(&self) -> bool {
        let s = &self.stats;
        if s.in_flight.load(Relaxed) > 0 || s.offline_now.load(Relaxed) > 0 {
            return false;
        }
        if s.unique_delivered.load(Relaxed) >= s.sent_ok.load(Relaxed) {
            return true;
        }
        let last_reset_ns = s.last_reset_ns.load(Relaxed);
        let since_reset = self
            .since_t0_ns(Instant::now())
            .saturating_sub(last_reset_ns);
        last_reset_ns > 0
            && since_reset >= REPLAY_GRACE.as_nanos() as u64
            && self.ledger.all_accounted_for(|k, at| self.reported(k, at))
    }
}

/// One user's receiving side: checks each delivery and the seq order across its connections.
#[derive(Debug, Clone, Default)]
pub(crate) struct Receiver {
    /// The user's index.
    pub n: usize,
    /// The highest seq handed over in the current epoch.
    pub last_seq: u64,
    /// `welcome`s seen.
    pub welcomes: u64,
    /// `reset`s seen: which of this user's epochs (as its client saw them) it is in.
    pub resets: u32,
    /// The next message is the first after a `reset`. Its seq may be any: the new epoch keeps
    /// what the inbox still holds, which starts wherever acks had trimmed it.
    pub epoch_start: bool,
}

impl Receiver {
    pub(crate) fn new(n: usize) -> Self {
        Receiver {
            n,
            ..Receiver::default()
        }
    }

    /// Accounts for one event of this user's client.
    pub(crate) fn on_event(&mut self, v: &Verifier, event: Event) {
        let s = &v.stats;
        match event {
            Event::Message(m) => {
                let now = Instant::now();
                s.deliveries.fetch_add(1, Relaxed);
                if !std::mem::take(&mut self.epoch_start) && m.seq != self.last_seq + 1 {
                    s.out_of_order.fetch_add(1, Relaxed);
                }
                self.last_seq = self.last_seq.max(m.seq);
                let Some((k, offset_ns)) = decode_body(&m.body)
                    .filter(|&(k, _)| k < v.ledger.len())
                    .filter(|&(k, _)| v.routing.recipient(k) == self.n)
                    .filter(|&(k, _)| *v.senders[v.routing.sender(k)] == *m.from)
                    .filter(|&(k, _)| m.id.parse() == Ok(k))
                else {
                    s.foreign.fetch_add(1, Relaxed);
                    return;
                };
                let at_ns = v.since_t0_ns(now);
                if v.ledger.delivered(k, m.seq, self.resets) == Receipt::First {
                    s.unique_delivered.fetch_add(1, Relaxed);
                    v.timeline.delivered(at_ns);
                }
                let scheduled = v.t0 + Duration::from_nanos(offset_ns);
                v.delivery_latency
                    .record(self.n, now.saturating_duration_since(scheduled));
                s.last_delivery_ns.fetch_max(at_ns, Relaxed);
            }
            // Trimmed before this device acknowledged them: never delivered, so the ledger
            // counts them lost; the next seq after it is not out of order.
            Event::Gap { from, to } => {
                tracing::debug!(from, to, "gap event");
                self.last_seq = self.last_seq.max(to);
            }
            Event::Welcome(_) => {
                self.welcomes += 1;
                if self.welcomes > 1 {
                    s.resumes.fetch_add(1, Relaxed);
                }
            }
            Event::Reset { .. } => {
                let now = Instant::now();
                s.resets.fetch_add(1, Relaxed);
                s.last_reset_ns.fetch_max(v.since_t0_ns(now), Relaxed);
                v.recipients.reset(self.n, v.since_t0_ms(now));
                self.resets += 1;
                self.last_seq = 0;
                self.epoch_start = true;
            }
            Event::Error(code, message) => {
                tracing::debug!(code = code.as_str(), %message, "error event");
                bump(&s.event_errors, code.as_str());
            }
            Event::Reconnect { .. } => {
                s.reconnect_requests.fetch_add(1, Relaxed);
            }
            Event::Disconnected { close_code, .. } => {
                if close_code != Some(1000) {
                    s.disconnects.fetch_add(1, Relaxed);
                }
            }
            Event::ConnectFailed { .. } => {
                s.connect_failures.fetch_add(1, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Pattern;
    use crate::schedule::encode_body;
    use ferry_shared::ErrorCode;
    use ferry_shared::client::Delivered;

    fn message(seq: u64, from: &str, k: u64) -> Event {
        Event::Message(Delivered {
            seq,
            from: from.into(),
            id: k.to_string(),
            ts: 0,
            body: encode_body(k, 0, 16),
        })
    }

    fn reset() -> Event {
        Event::Reset {
            previous_epoch: Some("e1".into()),
            epoch: "e2".into(),
        }
    }

    /// Two users on a ring: user 1 receives the even `k`, from user 0 ("a").
    fn ring_of_two(total: u64) -> Verifier {
        let routing = Routing::Load {
            connections: 2,
            pattern: Pattern::Ring,
            seed: 0,
        };
        let senders = vec![Arc::from("a"), Arc::from("b")];
        Verifier::new(total, 2, routing, senders, Instant::now())
    }

    fn sent(v: &Verifier, k: u64, seq: u64) {
        v.stats.in_flight.fetch_add(1, Relaxed);
        let ok = Ok(Sent {
            seq,
            duplicate: false,
        });
        v.on_send(0, k, Instant::now(), ok);
    }

    async fn wait(ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
    }

    #[test]
    fn the_receiver_counts_gaps_strangers_and_duplicates() {
        let v = ring_of_two(10);
        let mut b = Receiver::new(1);
        b.on_event(&v, message(1, "a", 0));
        b.on_event(&v, message(3, "a", 2)); // seq 2 skipped
        b.on_event(&v, message(4, "a", 4));
        b.on_event(&v, message(5, "a", 4)); // the same message stored twice
        b.on_event(&v, message(6, "b", 6)); // wrong sender
        b.on_event(&v, message(7, "a", 1)); // meant for user 0
        let s = &v.stats;
        assert_eq!(s.out_of_order.load(Relaxed), 1);
        assert_eq!(s.foreign.load(Relaxed), 2);
        assert_eq!(s.unique_delivered.load(Relaxed), 3);
        let t = v.tally();
        assert_eq!((t.duplicates, t.duplicates_within_epoch), (1, 1));
        assert_eq!(v.delivery_latency.summary().count, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_loss_is_reported_only_by_a_reset_after_its_answer() {
        let v = ring_of_two(10);
        let mut b = Receiver::new(1);
        wait(10).await;
        sent(&v, 0, 1); // answered at 10 ms, then b is reset: reported
        wait(10).await;
        b.on_event(&v, message(1, "a", 0)); // delivered before the reset
        sent(&v, 2, 2); // answered at 20 ms, never delivered
        wait(10).await;
        b.on_event(&v, reset()); // at 30 ms
        wait(10).await;
        sent(&v, 4, 1); // answered at 40 ms, after the reset: lost in silence
        sent(&v, 6, 2); // delivered in the new epoch
        b.on_event(&v, message(2, "a", 6));
        let t = v.tally();
        assert_eq!((t.answered, t.delivered, t.lost), (4, 2, 2));
        assert_eq!((t.lost_reported, t.lost_unreported), (1, 1));
        assert_eq!(t.lost_last_answered_ms, Some(40));
        let silent: Vec<u64> = t.lost_unreported_examples.iter().map(|l| l.k).collect();
        assert_eq!(silent, vec![4]);
        assert_eq!(v.recipients.users_reset(), 1);
        // The first message of the new epoch may start anywhere; it is not a gap.
        assert_eq!(v.stats.out_of_order.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_loss_while_the_recipient_was_offline_is_counted_apart() {
        let v = ring_of_two(10);
        let mut b = Receiver::new(1);
        sent(&v, 0, 1); // lost while b is online
        wait(10).await;
        v.recipients.went_offline(1, 10);
        sent(&v, 2, 2); // lost while b is offline
        wait(10).await;
        v.recipients.came_back(1, 20);
        b.on_event(&v, reset());
        let t = v.tally();
        assert_eq!((t.lost, t.lost_reported, t.lost_offline), (2, 2, 1));
        assert_eq!(
            t.lost_offline_recipients.into_iter().collect::<Vec<_>>(),
            [1]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_reset_the_replay_is_allowed_and_order_is_checked_anew() {
        let v = ring_of_two(20);
        let mut b = Receiver::new(1);
        for (seq, k) in [(1, 0), (2, 2), (3, 4)] {
            sent(&v, k, seq);
            b.on_event(&v, message(seq, "a", k));
        }
        b.on_event(&v, reset());
        // The new epoch kept seqs 2 and 3 (1 was trimmed by an ack) and adds 4.
        sent(&v, 6, 4);
        for (seq, k) in [(2, 2), (3, 4), (4, 6)] {
            b.on_event(&v, message(seq, "a", k));
        }
        assert_eq!(v.stats.out_of_order.load(Relaxed), 0);
        b.on_event(&v, message(5, "a", 6)); // stored twice in the new epoch
        b.on_event(&v, message(7, "a", 8)); // seq 6 skipped
        let t = v.tally();
        assert_eq!(
            (
                t.duplicates,
                t.duplicates_within_epoch,
                t.duplicates_across_reset
            ),
            (3, 1, 2)
        );
        assert_eq!(v.stats.out_of_order.load(Relaxed), 1);
        // Message 6's latest delivery is the second copy, not the seq `sent` named; 8 was
        // never answered.
        assert_eq!((t.lost, t.seq_mismatch, t.unconfirmed), (0, 1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn deliveries_and_answers_count_as_during_sending_until_the_schedule_ends() {
        // Sending ends 1 s after t0.
        let v = ring_of_two(10).with_timeline(Timeline::new(1_000_000_000, 5));
        let mut b = Receiver::new(1);
        for (k, seq) in [(0, 1), (2, 2), (4, 3)] {
            sent(&v, k, seq);
        }
        wait(400).await;
        b.on_event(&v, message(1, "a", 0));
        b.on_event(&v, message(2, "a", 2));
        b.on_event(&v, message(2, "a", 2)); // stored twice: not a second delivery
        wait(1000).await; // 1.4 s: the drain
        b.on_event(&v, message(3, "a", 4));
        let p = v.timeline.pace();
        assert_eq!((p.sent_during_sending, p.delivered_during_sending), (3, 2));
        assert_eq!(p.delivered_per_sec_during_sending, 2.0);
        assert_eq!(p.delivered_per_second, [2, 1]);
        assert_eq!(p.sent_per_second, [3]);
        assert_eq!(v.stats.unique_delivered.load(Relaxed), 3);
    }

    #[test]
    fn refusals_and_rate_limited_answers_are_counted() {
        let v = ring_of_two(10);
        let rejected = |code| SendError::Rejected {
            code,
            message: String::new(),
            retry_after_ms: Some(100),
        };
        v.stats.rate_limited();
        v.stats.rate_limited();
        for error in [
            rejected(ErrorCode::RateLimited),
            rejected(ErrorCode::InboxFull),
            SendError::Timeout,
        ] {
            v.stats.in_flight.fetch_add(1, Relaxed);
            v.on_send(0, 0, Instant::now(), Err(error));
        }
        let s = &v.stats;
        assert_eq!(s.rate_limited.load(Relaxed), 2);
        assert_eq!(
            s.sends_refused.load(Relaxed),
            2,
            "a timeout is not a refusal"
        );
        assert_eq!(s.send_errors().len(), 3);
        assert_eq!(v.timeline.pace().sent_during_sending, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_drain_settles_when_every_missing_message_was_reported() {
        let v = ring_of_two(10);
        let mut b = Receiver::new(1);
        sent(&v, 0, 1);
        assert!(!v.settled(), "message 0 is on its way");
        wait(5).await;
        b.on_event(&v, reset());
        assert!(!v.settled(), "the reset's replay may still bring it");
        wait(999).await;
        assert!(!v.settled());
        wait(1).await;
        assert!(v.settled(), "reported lost, and the replay had its time");
        sent(&v, 2, 1);
        assert!(!v.settled(), "message 2 was answered after the reset");
        b.on_event(&v, message(1, "a", 2));
        assert!(v.settled());
    }
}
