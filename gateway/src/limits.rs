//! Per-connection send rate: a token bucket (`--send-rate` per second, `--send-burst` deep, full
//! at the start). Written here rather than taken from a crate because it must run on tokio's
//! clock (paused-clock tests) and tell the client exactly when to retry (`retry_after_ms`).

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

    /// Takes one token, or says in how many milliseconds one is there (rounded up, so a client
    /// that waits exactly that long finds it).
    pub fn take(&mut self) -> Result<(), u64> {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait_ms = (1.0 - self.tokens) / self.rate * 1000.0;
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
}
