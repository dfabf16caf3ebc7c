//! Jittered exponential backoff for reconnecting the pub/sub connection.

use std::time::Duration;

use rand::Rng;

/// First reconnect delay after a drop (before jitter).
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Jittered exponential backoff between reconnection attempts.
pub(super) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    /// A delay between half and all of the current step; the step doubles up to the maximum.
    pub(super) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(BACKOFF_MAX);
        step.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= BACKOFF_FIRST / 2 && first <= BACKOFF_FIRST);
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(*delays.last().unwrap() >= BACKOFF_MAX / 2);
    }
}
