//! Latency histograms (HdrHistogram, microseconds, 3 significant digits) shared by every client
//! task: a few mutex-guarded shards so tasks rarely meet, merged once at the end.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Shards per histogram; a task records into shard `user % SHARDS`.
const SHARDS: usize = 16;
/// Largest latency recorded exactly: one hour, in microseconds (longer ones saturate).
const MAX_US: u64 = 3_600_000_000;

/// One latency distribution, recorded from many tasks.
pub(crate) struct Latency {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latency {
    pub(crate) fn new() -> Self {
        Latency {
            shards: (0..SHARDS).map(|_| Mutex::new(empty())).collect(),
        }
    }

    /// Records one latency from task `who`.
    pub(crate) fn record(&self, who: usize, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.shards[who % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(us.max(1));
    }

    /// All shards merged.
    pub(crate) fn merged(&self) -> Histogram<u64> {
        let mut all = empty();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            // Same bounds on both sides, so adding cannot fail.
            let _ = all.add(&*shard);
        }
        all
    }

    /// The percentiles of everything recorded.
    pub(crate) fn summary(&self) -> Percentiles {
        Percentiles::of(&self.merged())
    }
}

fn empty() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("1 µs to an hour at 3 digits is valid")
}

/// A latency distribution's summary, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Latencies recorded.
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_merge_into_one_distribution() {
        let latency = Latency::new();
        for i in 1..=1000u64 {
            latency.record(i as usize, Duration::from_micros(i * 10));
        }
        let p = latency.summary();
        assert_eq!(p.count, 1000);
        assert!((p.p50_ms - 5.0).abs() < 0.05, "{p:?}");
        assert!((p.p99_ms - 9.9).abs() < 0.05, "{p:?}");
        assert!((p.max_ms - 10.0).abs() < 0.05, "{p:?}");
        assert_eq!(Latency::new().summary(), Percentiles::default());
    }
}
