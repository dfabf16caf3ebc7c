//! Rates: a token bucket per user on a node for sends (`--send-rate` per second, `--send-burst`
//! deep, full at the start; `users.rs`), one per connection for pings and acks, and one per HTTP
//! API key (`--api-rate`, `--api-burst`). Written here rather
//! than taken from a crate because it must run on tokio's clock (paused-clock tests) and tell the
//! client exactly when to retry (`retry_after_ms`).

use tokio::time::Instant;

#[derive(Debug)]
pub struct TokenBucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens the bucket holds.
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            updated: Instant::now(),
        }
    }

    /// Whether the bucket has refilled to its burst.
    pub fn is_full(&self) -> bool {
        let elapsed = Instant::now()
            .saturating_duration_since(self.updated)
            .as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Takes one token, or says in how many milliseconds one is there (rounded up, so a client
    /// that waits exactly that long finds it).
    pub fn take(&mut self) -> Result<(), u64> {
        self.take_n(1)
    }

    /// Takes `n` tokens at once, or none and says in how many milliseconds `n` are there. `n`
    /// above the burst never fits (the caller's configuration rules that out).
    pub fn take_n(&mut self, n: u32) -> Result<(), u64> {
        let n = f64::from(n);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            let wait_ms = (n - self.tokens) / self.rate * 1000.0;
            // `as` saturates; a rate so low that this overflows is refused by config validation.
            Err((wait_ms.ceil() as u64).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let mut bucket = TokenBucket::new(10.0, 3.0);
        for _ in 0..3 {
            assert!(bucket.take().is_ok());
        }
        let wait = bucket.take().unwrap_err();
        assert_eq!(wait, 100);
        tokio::time::advance(Duration::from_millis(wait)).await;
        assert!(bucket.take().is_ok());
        assert!(bucket.take().is_err());
        tokio::time::advance(Duration::from_millis(30)).await;
        assert_eq!(bucket.take(), Err(70), "70 ms of the 100 are left");
        tokio::time::advance(Duration::from_micros(69_500)).await;
        assert_eq!(bucket.take(), Err(1), "rounded up, never 0");
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert!(bucket.take().is_ok(), "refills to the burst, not beyond");
        }
        assert!(bucket.take().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn take_n_is_all_or_nothing() {
        let mut bucket = TokenBucket::new(10.0, 5.0);
        assert_eq!(bucket.take_n(3), Ok(()));
        assert_eq!(
            bucket.take_n(3),
            Err(100),
            "two left: one more takes 100 ms"
        );
        assert_eq!(bucket.take_n(2), Ok(()), "the refused call took nothing");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(bucket.take_n(5), Ok(()));
    }
}
