//! The delivery verifier. Every message has a number `k`; the ledger records, per `k`, the seq
//! its `sent` answer named and what its recipient received, so that after the run every message
//! answered `sent` can be checked: received, exactly once, at the seq it was given, and in
//! increasing seq order on its recipient's connection.
//!
//! The Rust client drops duplicate seqs itself and does not say how many it dropped, so
//! duplicates are counted at the application level: the same message (`from`, `id`) handed to
//! the application twice, which can only happen if it was stored twice.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use ferry_shared::client::{Event, SendError, Sent};
use tokio::time::Instant;

use crate::latency::Latency;
use crate::schedule::{Routing, decode_body};

/// Per message: its `sent` seq and what its recipient got.
pub(crate) struct Ledger {
    /// The seq of the `sent` answer; 0 while unanswered (seqs start at 1).
    sent_seq: Box<[AtomicU64]>,
    /// The seq it was first delivered at; 0 while not delivered.
    delivered_seq: Box<[AtomicU64]>,
    /// Times the application was handed it (saturating).
    deliveries: Box<[AtomicU8]>,
}

/// The verdict over the whole ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Messages answered `sent`.
    pub answered: u64,
    /// Answered messages their recipient received.
    pub delivered: u64,
    /// Answered messages their recipient never received.
    pub lost: u64,
    /// Extra deliveries of one message (same `from` and `id`), after the client's drop by seq.
    pub duplicates: u64,
    /// Answered messages delivered at a seq other than the one `sent` named.
    pub seq_mismatch: u64,
    /// Messages delivered although their send had no `sent` answer (outcome unknown: timed
    /// out or cut by a disconnect, yet stored).
    pub unconfirmed: u64,
    /// The first few lost message numbers, for a look at the gateway's logs.
    pub lost_examples: Vec<u64>,
}

impl Ledger {
    pub(crate) fn new(total: u64) -> Self {
        let total = usize::try_from(total).unwrap_or(usize::MAX);
        Ledger {
            sent_seq: (0..total).map(|_| AtomicU64::new(0)).collect(),
            delivered_seq: (0..total).map(|_| AtomicU64::new(0)).collect(),
            deliveries: (0..total).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.sent_seq.len() as u64
    }

    /// Message `k` was answered `sent` with `seq`.
    pub(crate) fn answered(&self, k: u64, seq: u64) {
        self.sent_seq[k as usize].store(seq, Relaxed);
    }

    /// Message `k` was handed to its recipient at `seq`; whether it was the first time.
    pub(crate) fn delivered(&self, k: u64, seq: u64) -> bool {
        let i = k as usize;
        let before = self.deliveries[i]
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_add(1)))
            .unwrap_or(u8::MAX);
        if before == 0 {
            self.delivered_seq[i].store(seq, Relaxed);
        }
        before == 0
    }

    pub(crate) fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for k in 0..self.sent_seq.len() {
            let sent = self.sent_seq[k].load(Relaxed);
            let times = u64::from(self.deliveries[k].load(Relaxed));
            t.duplicates += times.saturating_sub(1);
            match (sent, times) {
                (0, 0) => {}
                (0, _) => t.unconfirmed += 1,
                (_, 0) => {
                    t.answered += 1;
                    t.lost += 1;
                    if t.lost_examples.len() < 10 {
                        t.lost_examples.push(k as u64);
                    }
                }
                (seq, _) => {
                    t.answered += 1;
                    t.delivered += 1;
                    if self.delivered_seq[k].load(Relaxed) != seq {
                        t.seq_mismatch += 1;
                    }
                }
            }
        }
        t
    }
}

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
    send_errors: Mutex<BTreeMap<String, u64>>,
    event_errors: Mutex<BTreeMap<String, u64>>,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    *map.entry(key.to_owned()).or_default() += 1;
}

impl Stats {
    /// A send that got no `sent`, by protocol code or client-side reason.
    pub(crate) fn send_error(&self, error: &SendError) {
        let kind = match error {
            SendError::Rejected { code, .. } => code.as_str(),
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
    pub stats: Stats,
    /// Scheduled time → `sent` answer.
    pub sent_latency: Latency,
    /// Scheduled time → delivery to the recipient.
    pub delivery_latency: Latency,
    pub routing: Routing,
    /// Sender user ids, by sender index.
    pub senders: Vec<Arc<str>>,
    /// Time zero of body offsets.
    pub t0: Instant,
}

impl Verifier {
    pub(crate) fn new(total: u64, routing: Routing, senders: Vec<Arc<str>>, t0: Instant) -> Self {
        Verifier {
            ledger: Ledger::new(total),
            stats: Stats::default(),
            sent_latency: Latency::new(),
            delivery_latency: Latency::new(),
            routing,
            senders,
            t0,
        }
    }

    fn since_t0_ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.t0).as_nanos()).unwrap_or(u64::MAX)
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
                self.ledger.answered(k, sent.seq);
                self.stats.sent_ok.fetch_add(1, Relaxed);
                if sent.duplicate {
                    self.stats.sent_duplicate.fetch_add(1, Relaxed);
                }
                self.sent_latency
                    .record(who, now.saturating_duration_since(scheduled));
                self.stats
                    .last_sent_ns
                    .fetch_max(self.since_t0_ns(now), Relaxed);
            }
            Err(e) => self.stats.send_error(&e),
        }
    }

    /// All answered messages are delivered and no send waits for an answer.
    pub(crate) fn settled(&self) -> bool {
        let s = &self.stats;
        s.in_flight.load(Relaxed) <= 0
            && s.offline_now.load(Relaxed) <= 0
            && s.unique_delivered.load(Relaxed) >= s.sent_ok.load(Relaxed)
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
                if m.seq != self.last_seq + 1 {
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
                if v.ledger.delivered(k, m.seq) {
                    s.unique_delivered.fetch_add(1, Relaxed);
                }
                let scheduled = v.t0 + std::time::Duration::from_nanos(offset_ns);
                v.delivery_latency
                    .record(self.n, now.saturating_duration_since(scheduled));
                s.last_delivery_ns.fetch_max(v.since_t0_ns(now), Relaxed);
            }
            Event::Welcome(_) => {
                self.welcomes += 1;
                if self.welcomes > 1 {
                    s.resumes.fetch_add(1, Relaxed);
                }
            }
            Event::Reset { .. } => {
                s.resets.fetch_add(1, Relaxed);
                self.last_seq = 0;
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

    #[test]
    fn the_receiver_counts_gaps_strangers_and_duplicates() {
        let routing = Routing::Load {
            connections: 2,
            pattern: Pattern::Ring,
            seed: 0,
        };
        let senders = vec![Arc::from("a"), Arc::from("b")];
        let v = Verifier::new(10, routing, senders, Instant::now());
        let mut b = Receiver::new(1); // user 1 receives the even k, from user 0 ("a")
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
        assert_eq!(v.ledger.tally().duplicates, 1);
        assert_eq!(v.delivery_latency.summary().count, 4);
    }

    #[test]
    fn the_tally_names_every_outcome() {
        let ledger = Ledger::new(6);
        ledger.answered(0, 1); // delivered once at its seq
        assert!(ledger.delivered(0, 1));
        ledger.answered(1, 2); // lost
        ledger.answered(2, 3); // delivered twice
        assert!(ledger.delivered(2, 3));
        assert!(!ledger.delivered(2, 4));
        ledger.answered(3, 5); // delivered at another seq
        ledger.delivered(3, 6);
        ledger.delivered(4, 7); // delivered without an answer
        let t = ledger.tally();
        assert_eq!(
            t,
            Tally {
                answered: 4,
                delivered: 3,
                lost: 1,
                duplicates: 1,
                seq_mismatch: 1,
                unconfirmed: 1,
                lost_examples: vec![1],
            }
        );
    }
}
