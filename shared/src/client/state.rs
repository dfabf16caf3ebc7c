//! The client's bookkeeping, free of I/O so it can be tested alone: the duplicate filter
//! (`Cursor`), ack coalescing (`Acks`) and reconnect / retry delays (`Backoff`).

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// A resume point: everything up to `last_seq` of inbox incarnation `epoch` is processed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Position {
    /// Highest seq handed to the application (0: none).
    pub(crate) last_seq: u64,
    /// The inbox incarnation `last_seq` belongs to; `None` before the first `welcome`.
    pub(crate) epoch: Option<String>,
}

/// The duplicate filter: the highest seq received (queued for the application) or passed over
/// in the current epoch. G4 says duplicates are only ever messages at or below it, so a seq
/// comparison is all it takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Cursor {
    /// A `msg` at or below it is a duplicate: received, announced by a `gap`, or at or below a
    /// `welcome`'s resume point.
    last_seq: u64,
    /// The highest seq the application is told of, by a message or a gap (a resume point does
    /// not count: the `gap` that explains one may follow it). A gap leaves out what is at or
    /// below it.
    reported: u64,
    epoch: Option<String>,
}

impl Cursor {
    /// Starts from the resume point the first `hello` gives.
    pub(crate) fn new(position: &Position) -> Self {
        Cursor {
            last_seq: position.last_seq,
            reported: position.last_seq,
            epoch: position.epoch.clone(),
        }
    }

    /// Adopts a `welcome` whose resume point is `resumed_from`: a reset (which voids the old
    /// position) or an epoch we did not know (none yet) starts from it; the same epoch keeps
    /// what was received, moved up to it when the server kept this device further.
    pub(crate) fn on_welcome(&mut self, epoch: &str, reset: bool, resumed_from: u64) {
        if reset || self.epoch.as_deref() != Some(epoch) {
            self.last_seq = resumed_from;
            self.reported = 0;
            self.epoch = Some(epoch.to_owned());
        } else {
            self.last_seq = self.last_seq.max(resumed_from);
        }
    }

    /// A `gap` announcing that `from..=to` (with `from <= to`) will never be delivered: the
    /// part of it the application was not told of yet, which now counts as received; `None`
    /// if it was told of all of it.
    pub(crate) fn skip(&mut self, from: u64, to: u64) -> Option<(u64, u64)> {
        if to <= self.reported {
            return None;
        }
        let from = from.max(self.reported + 1);
        self.reported = to;
        self.last_seq = self.last_seq.max(to);
        Some((from, to))
    }

    /// Whether a `msg` with this seq is new; if so it becomes the highest received.
    pub(crate) fn accept(&mut self, seq: u64) -> bool {
        if seq <= self.last_seq {
            return false;
        }
        self.last_seq = seq;
        self.reported = seq;
        true
    }
}

/// Cumulative ack coalescing on one connection. An ack is due `interval` after the oldest
/// delivery it covers, so acks on a busy connection are at least `interval` apart and a
/// delivered message is acknowledged at most `interval` after it was delivered.
#[derive(Debug, Clone)]
pub(crate) struct Acks {
    interval: Duration,
    /// Highest seq the server knows is processed on this connection (by `hello` or `ack`).
    acked: u64,
    /// Highest seq delivered to the application.
    delivered: u64,
    /// When the oldest unacknowledged delivery happened; `None` when nothing is pending.
    since: Option<Instant>,
}

impl Acks {
    pub(crate) fn new(interval: Duration) -> Self {
        Acks {
            interval,
            acked: 0,
            delivered: 0,
            since: None,
        }
    }

    /// A new connection: the server holds `acked` (the `hello`'s resume point, or 0 after a
    /// reset); the application holds `delivered`.
    pub(crate) fn restart(&mut self, acked: u64, delivered: u64, now: Instant) {
        self.acked = acked;
        self.delivered = delivered;
        self.since = (delivered > acked).then_some(now);
    }

    /// The application was handed `seq`.
    pub(crate) fn delivered(&mut self, seq: u64, now: Instant) {
        self.delivered = self.delivered.max(seq);
        if self.delivered > self.acked && self.since.is_none() {
            self.since = Some(now);
        }
    }

    /// When the next ack is due, if one is pending.
    pub(crate) fn due_at(&self) -> Option<Instant> {
        self.since.map(|t| t + self.interval)
    }

    /// The seq to acknowledge now, if any; afterwards nothing is pending.
    pub(crate) fn take(&mut self) -> Option<u64> {
        self.since = None;
        (self.delivered > self.acked).then(|| {
            self.acked = self.delivered;
            self.acked
        })
    }

    /// Forgets a pending deadline without acknowledging (the connection cannot take an ack for
    /// these deliveries; the next `restart` recomputes).
    pub(crate) fn defer(&mut self) {
        self.since = None;
    }
}

/// Jittered exponential backoff: attempt `n` waits between half of and the whole of
/// `min * 2^n`, capped at `max` and never below `min` ("equal jitter": spread out, never zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub(crate) min: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    /// The wait before attempt `attempt` (0 for the first retry).
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let max = self.max.max(self.min);
        let cap = self
            .min
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(max);
        let half = cap / 2;
        let spread = u64::try_from((cap - half).as_nanos()).unwrap_or(u64::MAX);
        let jitter = Duration::from_nanos(rand::rng().random_range(0..=spread));
        (half + jitter).clamp(self.min, max)
    }
}

/// Waits `retry_after`, plus up to as much again, so pipelined sends that were rate limited
/// together do not all come back at the same instant.
pub(crate) fn rate_limit_delay(retry_after: Duration) -> Duration {
    let spread = u64::try_from(retry_after.as_nanos()).unwrap_or(u64::MAX);
    retry_after + Duration::from_nanos(rand::rng().random_range(0..=spread))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn cursor_drops_duplicates_within_an_epoch() {
        let mut c = Cursor::new(&Position {
            last_seq: 5,
            epoch: Some("e1".into()),
        });
        c.on_welcome("e1", false, 5);
        assert!(!c.accept(4));
        assert!(!c.accept(5));
        assert!(c.accept(6));
        assert!(!c.accept(6));
        assert!(c.accept(9), "a gap (acked elsewhere) is fine");
        assert!(!c.accept(7));
        // Reconnect in the same epoch from a lower delivered point: what was received stays.
        c.on_welcome("e1", false, 6);
        assert!(!c.accept(8));
        assert!(c.accept(10));
    }

    #[test]
    fn cursor_starts_over_on_reset_and_adopts_a_first_epoch() {
        let mut c = Cursor::new(&Position {
            last_seq: 7,
            epoch: Some("old".into()),
        });
        c.on_welcome("new", true, 0);
        assert!(c.accept(1), "after a reset seq 1 is new again");
        let mut fresh = Cursor::new(&Position {
            last_seq: 3,
            epoch: None,
        });
        fresh.on_welcome("e", false, 3);
        assert!(!fresh.accept(3));
        assert!(fresh.accept(4));
    }

    #[test]
    fn cursor_moves_up_to_a_resume_point_kept_by_the_server() {
        let mut c = Cursor::new(&Position {
            last_seq: 3,
            epoch: Some("e1".into()),
        });
        c.on_welcome("e1", false, 9);
        assert!(
            !c.accept(9),
            "acknowledged by another connection of the device"
        );
        assert!(c.accept(10));
        c.on_welcome("e1", false, 4);
        assert!(
            !c.accept(10),
            "a lower resume point forgets nothing received"
        );
        let mut lost = Cursor::new(&Position::default());
        lost.on_welcome("e1", false, 5);
        assert!(!lost.accept(5));
        assert!(lost.accept(6));
    }

    #[test]
    fn cursor_skips_gaps_and_trims_what_was_received() {
        let mut c = Cursor::new(&Position {
            last_seq: 4,
            epoch: Some("e1".into()),
        });
        c.on_welcome("e1", false, 4);
        assert_eq!(c.skip(5, 8), Some((5, 8)));
        assert!(!c.accept(7), "a seq of a gap is never delivered");
        assert!(c.accept(9));
        assert_eq!(c.skip(9, 12), Some((10, 12)), "9 was received");
        assert_eq!(c.skip(3, 12), None, "all of it was received or skipped");
        assert!(c.accept(13));
        // A device back after its messages were trimmed: the resume point is past the gap,
        // and the gap that follows it is still reported whole.
        c.on_welcome("e1", false, 20);
        assert_eq!(c.skip(14, 20), Some((14, 20)));
        assert!(!c.accept(20));
        assert!(c.accept(21));
        // After a reset nothing of the new epoch was reported (and seqs start at 1).
        c.on_welcome("e2", true, 0);
        assert_eq!(c.skip(0, 3), Some((1, 3)));
    }

    #[test]
    fn acks_coalesce_and_are_at_least_an_interval_apart() {
        let t0 = Instant::now();
        let mut a = Acks::new(100 * MS);
        a.restart(0, 0, t0);
        assert_eq!(a.due_at(), None, "nothing delivered, nothing due");
        a.delivered(1, t0);
        a.delivered(2, t0 + 30 * MS);
        a.delivered(3, t0 + 60 * MS);
        assert_eq!(
            a.due_at(),
            Some(t0 + 100 * MS),
            "due an interval after the oldest"
        );
        assert_eq!(a.take(), Some(3), "one cumulative ack covers all three");
        assert_eq!(a.due_at(), None);
        assert_eq!(a.take(), None, "nothing new: no ack");
        a.delivered(4, t0 + 150 * MS);
        assert_eq!(a.due_at(), Some(t0 + 250 * MS));
        a.delivered(3, t0 + 160 * MS);
        assert_eq!(a.take(), Some(4), "never goes backwards");
    }

    #[test]
    fn acks_restart_from_the_resume_point() {
        let t0 = Instant::now();
        let mut a = Acks::new(Duration::ZERO);
        a.restart(10, 10, t0);
        assert_eq!(a.due_at(), None, "hello acknowledged everything delivered");
        a.delivered(10, t0);
        assert_eq!(a.take(), None);
        // Delivered beyond what hello said (queued while reconnecting): due at once.
        a.restart(10, 12, t0);
        assert_eq!(a.due_at(), Some(t0));
        a.defer();
        assert_eq!(a.due_at(), None);
        // After a reset the server holds nothing of the new epoch.
        a.restart(0, 0, t0);
        a.delivered(1, t0);
        assert_eq!(a.take(), Some(1));
    }

    #[test]
    fn backoff_stays_within_bounds_and_grows() {
        let b = Backoff {
            min: 100 * MS,
            max: 2000 * MS,
        };
        for attempt in [0, 1, 2, 3, 4, 5, 10, 31, 32, 1000, u32::MAX] {
            for _ in 0..200 {
                let d = b.delay(attempt);
                assert!(d >= b.min && d <= b.max, "attempt {attempt}: {d:?}");
            }
        }
        for _ in 0..200 {
            assert!(
                b.delay(3) >= 400 * MS,
                "attempt 3 waits at least half of 800 ms"
            );
            assert!(
                b.delay(20) >= 1000 * MS,
                "capped attempts wait at least half the max"
            );
        }
        let odd = Backoff {
            min: 50 * MS,
            max: 10 * MS,
        };
        assert_eq!(odd.delay(3), 50 * MS, "a max below the min is the min");
    }

    #[test]
    fn rate_limit_delay_waits_at_least_retry_after() {
        for _ in 0..200 {
            let d = rate_limit_delay(40 * MS);
            assert!(d >= 40 * MS && d <= 80 * MS, "{d:?}");
        }
        assert_eq!(rate_limit_delay(Duration::ZERO), Duration::ZERO);
    }
}
