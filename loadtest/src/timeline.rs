//! When things happened in a load run: first deliveries and `sent` answers counted per second
//! since `t0`, and how many of each came while sending was still on (from `t0`, the first
//! scheduled send, to the end of the schedule). A node that stores faster than it delivers
//! shows it here: delivered/s during sending falls behind while the whole run's figure, which
//! includes the drain, hides it. A few counters per second of the run, whatever its size.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Counts by time since `t0`.
pub(crate) struct Timeline {
    /// The end of sending, ns after `t0` (0: no sending window, nothing counts as during it).
    sending_ns: u64,
    /// First deliveries in second `i` after `t0`; the last bucket also takes everything later.
    delivered: Box<[AtomicU64]>,
    /// `sent` answers in second `i` after `t0`; the same layout.
    sent: Box<[AtomicU64]>,
    delivered_while_sending: AtomicU64,
    sent_while_sending: AtomicU64,
}

/// The timeline's figures, for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Pace {
    /// From `t0` to the end of the schedule, seconds.
    pub sending_secs: f64,
    /// Messages first delivered by the end of sending.
    pub delivered_during_sending: u64,
    /// `delivered_during_sending ÷ sending_secs`.
    pub delivered_per_sec_during_sending: f64,
    /// `sent` answers (messages stored) by the end of sending.
    pub sent_during_sending: u64,
    /// `sent_during_sending ÷ sending_secs`.
    pub sent_per_sec_during_sending: f64,
    /// First deliveries in each whole second after `t0` (the last entry also holds anything
    /// later); trailing empty seconds left out.
    pub delivered_per_second: Vec<u64>,
    /// `sent` answers in each whole second after `t0`, the same way.
    pub sent_per_second: Vec<u64>,
}

fn buckets(seconds: usize) -> Box<[AtomicU64]> {
    (0..seconds).map(|_| AtomicU64::new(0)).collect()
}

impl Timeline {
    /// A timeline whose sending ends `sending_ns` after `t0`, counting per second for
    /// `seconds` seconds.
    pub(crate) fn new(sending_ns: u64, seconds: usize) -> Self {
        Timeline {
            sending_ns,
            delivered: buckets(seconds),
            sent: buckets(seconds),
            delivered_while_sending: AtomicU64::new(0),
            sent_while_sending: AtomicU64::new(0),
        }
    }

    /// A timeline that counts nothing (a storm has no sending window).
    pub(crate) fn none() -> Self {
        Timeline::new(0, 0)
    }

    fn count(&self, series: &[AtomicU64], during: &AtomicU64, at_ns: u64) {
        if let Some(last) = series.len().checked_sub(1) {
            let second = usize::try_from(at_ns / 1_000_000_000).unwrap_or(usize::MAX);
            series[second.min(last)].fetch_add(1, Relaxed);
        }
        if self.sending_ns > 0 && at_ns <= self.sending_ns {
            during.fetch_add(1, Relaxed);
        }
    }

    /// A message was delivered for the first time, `at_ns` after `t0`.
    pub(crate) fn delivered(&self, at_ns: u64) {
        self.count(&self.delivered, &self.delivered_while_sending, at_ns);
    }

    /// A `sent` answer came, `at_ns` after `t0`.
    pub(crate) fn sent(&self, at_ns: u64) {
        self.count(&self.sent, &self.sent_while_sending, at_ns);
    }

    pub(crate) fn pace(&self) -> Pace {
        let secs = self.sending_ns as f64 / 1e9;
        let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let series = |buckets: &[AtomicU64]| {
            let mut counts: Vec<u64> = buckets.iter().map(|b| b.load(Relaxed)).collect();
            while counts.last() == Some(&0) {
                counts.pop();
            }
            counts
        };
        let delivered = self.delivered_while_sending.load(Relaxed);
        let sent = self.sent_while_sending.load(Relaxed);
        Pace {
            sending_secs: secs,
            delivered_during_sending: delivered,
            delivered_per_sec_during_sending: per_sec(delivered),
            sent_during_sending: sent,
            sent_per_sec_during_sending: per_sec(sent),
            delivered_per_second: series(&self.delivered),
            sent_per_second: series(&self.sent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn only_what_came_before_the_end_of_sending_counts_as_during_it() {
        // Sending for 2.5 s; counting for 4 s.
        let t = Timeline::new(5 * S / 2, 4);
        for at in [0, S / 2, S, 2 * S, 5 * S / 2] {
            t.delivered(at); // the end of sending itself still counts
        }
        t.delivered(5 * S / 2 + 1); // a nanosecond late: the drain
        t.delivered(3 * S);
        t.delivered(60 * S); // past the last bucket: counted in it
        for at in [S / 10, S / 5, 3 * S] {
            t.sent(at);
        }
        let p = t.pace();
        assert_eq!(p.sending_secs, 2.5);
        assert_eq!(p.delivered_during_sending, 5);
        assert_eq!(p.delivered_per_sec_during_sending, 2.0);
        assert_eq!(
            (p.sent_during_sending, p.sent_per_sec_during_sending),
            (2, 0.8)
        );
        assert_eq!(p.delivered_per_second, [2, 1, 3, 2]);
        assert_eq!(p.sent_per_second, [2, 0, 0, 1]);
    }

    #[test]
    fn trailing_quiet_seconds_are_left_out_and_no_window_counts_nothing() {
        let t = Timeline::new(10 * S, 30);
        t.delivered(S + 1);
        let p = t.pace();
        assert_eq!(p.delivered_per_second, [0, 1]);
        assert!(p.sent_per_second.is_empty());
        assert_eq!(p.delivered_per_sec_during_sending, 0.1);

        let none = Timeline::none();
        none.delivered(0);
        none.sent(5 * S);
        assert_eq!(none.pace(), Pace::default());
    }
}
