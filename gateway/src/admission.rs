//! Admission control: when the node cannot deliver what it stores, senders are pushed back
//! (`rate_limited` with `retry_after_ms`) instead of the inboxes growing faster than they drain.
//!
//! Every `WINDOW` the controller looks at how delivery went on this node: the share of live
//! messages that reached their socket later than `TARGET` after they were accepted, and how many
//! sessions are lagging (too slow to take live messages, catching up from the store). While
//! either says the node is behind, the node-wide rate of accepted sends is cut to nine tenths of
//! what the node delivered live in the window (not below half of what it accepted: a node's
//! recipients may be on other nodes), then not again for a few windows, while the messages
//! accepted before the cut drain; while delivery is healthy it grows back by 5% a
//! window, and the limit is lifted once it is twice what senders ask for. One slow client
//! cannot trigger it: lagging counts only when a tenth of the sessions lag. A refused sender is
//! told to wait in proportion to the demand over what is admitted, so refusals do not come back
//! as a storm of retries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics;

/// How often the controller decides.
const WINDOW: Duration = Duration::from_millis(100);
/// A live message delivered later than this after it was accepted counts as late.
const TARGET_MS: u64 = 200;
/// Windows after a cut in which the node is not cut again: messages accepted before the cut
/// still arrive late for a while, and cutting on them would take the rate to its floor.
const COOLDOWN_WINDOWS: u32 = 3;
/// The node is behind when more than this share of live deliveries were late...
const LATE_SHARE: f64 = 0.1;
/// ...or when more than this share of its sessions lag (and at least `LAGGING_MIN` do).
const LAGGING_SHARE: f64 = 0.1;
const LAGGING_MIN: i64 = 10;
/// The limit never goes below this rate (sends per second), so the node always accepts some.
const MIN_RATE: f64 = 100.0;
/// Seconds of the rate that may be taken at once.
const BURST_SECS: f64 = 0.1;
/// `retry_after_ms` of a refused send, before it is scaled by the pressure (see `retry_ms`).
const RETRY_BASE_MS: f64 = 250.0;
const RETRY_MAX_MS: f64 = 10_000.0;

/// The node's admission controller.
#[derive(Default)]
pub struct Admission {
    /// Live deliveries in this window, and how many of them were late.
    delivered: AtomicU64,
    late: AtomicU64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug, Default)]
struct Bucket {
    /// `None` while sends are not limited.
    rate: Option<f64>,
    tokens: f64,
    refilled: Option<Instant>,
    /// Sends admitted and refused in this window.
    admitted: u64,
    refused: u64,
    /// Demand over admissions in the last window (1: everything asked for was admitted).
    pressure: f64,
    /// Windows left before the next cut may come.
    cooldown: u32,
}

impl Admission {
    /// A live message reached its socket `latency_ms` after it was accepted.
    pub fn delivered(&self, latency_ms: u64) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if latency_ms > TARGET_MS {
            self.late.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether a send may be accepted now; else the milliseconds to wait.
    pub fn admit(&self) -> Result<(), u64> {
        let mut bucket = self.lock();
        let Some(rate) = bucket.rate else {
            bucket.admitted += 1;
            return Ok(());
        };
        let now = Instant::now();
        let elapsed = bucket
            .refilled
            .map_or(0.0, |at| now.duration_since(at).as_secs_f64());
        bucket.tokens = (bucket.tokens + elapsed * rate).min((rate * BURST_SECS).max(1.0));
        bucket.refilled = Some(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.admitted += 1;
            return Ok(());
        }
        bucket.refused += 1;
        Err(retry_ms(bucket.pressure))
    }

    /// One decision, from this window's figures.
    fn decide(&self, lagging: i64, sessions: i64) {
        let delivered = self.delivered.swap(0, Ordering::Relaxed);
        let late = self.late.swap(0, Ordering::Relaxed);
        let late_share = if delivered == 0 {
            0.0
        } else {
            late as f64 / delivered as f64
        };
        let lagging_limit = ((sessions as f64 * LAGGING_SHARE) as i64).max(LAGGING_MIN);
        let behind = late_share > LATE_SHARE || lagging > lagging_limit;
        let mut bucket = self.lock();
        let admitted_rate = bucket.admitted as f64 / WINDOW.as_secs_f64();
        bucket.pressure = (bucket.admitted + bucket.refused) as f64 / bucket.admitted.max(1) as f64;
        bucket.admitted = 0;
        bucket.refused = 0;
        let cooling = bucket.cooldown > 0;
        bucket.cooldown = bucket.cooldown.saturating_sub(1);
        bucket.rate = match (bucket.rate, behind) {
            (None, false) => None,
            (Some(rate), true) if cooling => Some(rate),
            (current, true) => {
                // Just under what the node delivered live in the window, so the backlog drains
                // (but not below half of what it admitted: its recipients may be elsewhere).
                bucket.cooldown = COOLDOWN_WINDOWS;
                let delivered_rate = delivered as f64 / WINDOW.as_secs_f64();
                let target = delivered_rate.max(admitted_rate * 0.5) * 0.9;
                let cut = current.map_or(target, |rate| rate.min(target));
                Some(cut.max(MIN_RATE))
            }
            // Healthy again: grow back, and lift the limit once it is twice the demand.
            (Some(rate), false) => {
                let grown = rate * 1.05 + 10.0;
                (grown < 2.0 * admitted_rate.max(MIN_RATE)).then_some(grown)
            }
        };
        metrics::ADMISSION_RATE.set(bucket.rate.map_or(0, |r| r as i64));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // Nothing under the lock can panic.
        self.bucket.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How long a refused sender should wait: long enough that what was refused can be admitted at
/// the allowed rate by then, so retries spread out instead of coming back as a storm (a retry
/// costs the node a read and an answer). `pressure` is demand over admissions: 4 means a
/// quarter was admitted, so a refused send waits about a second. Jittered ±50%.
fn retry_ms(pressure: f64) -> u64 {
    let jitter = rand::random_range(0.5..1.5);
    (RETRY_BASE_MS * pressure.max(1.0) * jitter).clamp(1.0, RETRY_MAX_MS) as u64
}

/// Decides every `WINDOW` until `stop`.
pub async fn run(admission: Arc<Admission>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(WINDOW);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        admission.decide(metrics::LAGGING.get(), metrics::CONNECTIONS_OPEN.get());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(admission: &Admission, sends: u64, delivered: u64, late: u64, lagging: i64) {
        for _ in 0..sends {
            let _ = admission.admit();
        }
        for i in 0..delivered {
            admission.delivered(if i < late { TARGET_MS + 1 } else { 1 });
        }
        admission.decide(lagging, 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn limits_while_behind_and_lifts_when_healthy() {
        let admission = Admission::default();
        // Healthy: no limit at any demand.
        window(&admission, 500, 500, 0, 0);
        assert_eq!(admission.lock().rate, None);
        // A few late or lagging are not "behind".
        window(&admission, 500, 500, 40, 50);
        assert_eq!(admission.lock().rate, None);
        // Behind: nine tenths of what was delivered live (500 in 0.1 s = 5,000/s).
        window(&admission, 500, 500, 100, 0);
        assert_eq!(admission.lock().rate, Some(4500.0));
        // Now sends beyond the rate are refused with a wait.
        tokio::time::advance(Duration::from_millis(10)).await;
        let refused = (0..1000).filter(|_| admission.admit().is_err()).count();
        assert!(refused > 900, "{refused}");
        // The refused wait long enough for the rate to take them: here about a quarter second
        // times the pressure of the last window (1: nothing was refused yet).
        assert!(matches!(admission.admit(), Err(ms) if (125..=375).contains(&ms)));
        // Still behind, but just cut: it waits for the cut to show.
        for _ in 0..COOLDOWN_WINDOWS {
            window(&admission, 0, 0, 0, 200);
            assert_eq!(admission.lock().rate, Some(4500.0));
        }
        // Still behind (lagging) after that: cut again.
        window(&admission, 0, 0, 0, 200);
        let cut = admission.lock().rate.unwrap();
        assert!((MIN_RATE..4500.0).contains(&cut), "{cut}");
        // Healthy with demand far below: it grows back, and is lifted within a second.
        let mut rates = Vec::new();
        for _ in 0..10 {
            window(&admission, 1, 10, 0, 0);
            rates.push(admission.lock().rate);
        }
        assert!(
            rates.windows(2).all(|w| w[1].is_none() || w[1] > w[0]),
            "{rates:?}"
        );
        assert_eq!(admission.lock().rate, None, "{rates:?}");
    }
}
