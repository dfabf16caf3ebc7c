//! The open-loop schedule and the message layout: message `k` is due at `t0 + k / rate`
//! whatever happened to the ones before it, who sends it and who receives it follow from `k`,
//! and its body carries `k` and its scheduled time so the recipient measures latency from the
//! schedule (no coordinated omission). Bodies are ASCII text, so a JSON client sends them as a
//! plain `body` string (as a JSON application would), not as `body_b64`.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::config::Pattern;

/// Bytes at the start of every body: the message number (8 hex digits) and its scheduled
/// offset in ns (16 hex digits).
pub const BODY_HEADER: usize = 24;
/// Message numbers must fit in the header's 8 hex digits.
pub(crate) const MAX_MESSAGES: u64 = 1 << 32;

/// When each message is due.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    /// Time zero of the run; every offset is from here.
    pub t0: Instant,
    /// Nanoseconds between two messages (`1e9 / rate`).
    pub interval_ns: f64,
    /// Messages in the schedule.
    pub total: u64,
}

impl Schedule {
    pub(crate) fn new(t0: Instant, rate: f64, total: u64) -> Self {
        Schedule {
            t0,
            interval_ns: 1e9 / rate,
            total,
        }
    }

    /// Message `k`'s scheduled offset from `t0`, in nanoseconds.
    pub(crate) fn offset_ns(&self, k: u64) -> u64 {
        (k as f64 * self.interval_ns) as u64
    }

    /// When message `k` is due.
    pub(crate) fn due(&self, k: u64) -> Instant {
        self.t0 + Duration::from_nanos(self.offset_ns(k))
    }

    /// When the last message is due.
    pub(crate) fn end(&self) -> Instant {
        self.due(self.total)
    }
}

/// Who sends message `k` and who receives it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Routing {
    /// A load run: user `k % connections` sends; the pattern picks the recipient.
    Load {
        connections: u64,
        pattern: Pattern,
        seed: u64,
    },
    /// A storm: user `k / backlog` receives; sender `k % senders` sends.
    Storm { backlog: u64, senders: u64 },
}

impl Routing {
    /// Index of the sender (into the run's users, or into the storm's senders).
    pub(crate) fn sender(&self, k: u64) -> usize {
        match *self {
            Routing::Load { connections, .. } => (k % connections) as usize,
            Routing::Storm { senders, .. } => (k % senders) as usize,
        }
    }

    /// Index of the recipient among the run's users.
    pub(crate) fn recipient(&self, k: u64) -> usize {
        match *self {
            Routing::Load {
                connections,
                pattern,
                seed,
            } => {
                let sender = k % connections;
                let step = match pattern {
                    Pattern::Ring => 1,
                    Pattern::Random => 1 + mix(seed ^ k) % (connections - 1),
                };
                ((sender + step) % connections) as usize
            }
            Routing::Storm { backlog, .. } => (k / backlog) as usize,
        }
    }
}

/// SplitMix64's finaliser: a fixed, well-spread hash of a message number.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A text body of `size` bytes (at least [`BODY_HEADER`]) carrying `k` (below
/// [`MAX_MESSAGES`]) and its scheduled offset, padded with dots.
pub(crate) fn encode_body(k: u64, offset_ns: u64, size: usize) -> Bytes {
    let mut body = BytesMut::with_capacity(size.max(BODY_HEADER));
    // Writing to a BytesMut cannot fail.
    let _ = write!(body, "{:08x}{offset_ns:016x}", k & (MAX_MESSAGES - 1));
    body.resize(size.max(BODY_HEADER), b'.');
    body.freeze()
}

/// The message number and scheduled offset a body carries; `None` if it is not ours.
pub(crate) fn decode_body(body: &[u8]) -> Option<(u64, u64)> {
    let hex = |range: std::ops::Range<usize>| {
        let digits = std::str::from_utf8(body.get(range)?).ok()?;
        u64::from_str_radix(digits, 16).ok()
    };
    Some((hex(0..8)?, hex(8..BODY_HEADER)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_at_any_size_as_text() {
        for size in [BODY_HEADER, 100, 1000] {
            let body = encode_body(42, 7_000_123, size);
            assert_eq!(body.len(), size);
            assert!(
                std::str::from_utf8(&body).is_ok(),
                "JSON sends it as a string"
            );
            assert_eq!(decode_body(&body), Some((42, 7_000_123)));
        }
        let last = encode_body(MAX_MESSAGES - 1, u64::MAX, 10);
        assert_eq!(last.len(), BODY_HEADER);
        assert_eq!(decode_body(&last), Some((MAX_MESSAGES - 1, u64::MAX)));
        assert_eq!(decode_body(b"short"), None);
        assert_eq!(decode_body(b"not hex, but long enough to be a body"), None);
    }

    #[test]
    fn the_schedule_is_fixed_by_k_alone() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 1000.0, 5000);
        assert_eq!(s.offset_ns(0), 0);
        assert_eq!(s.offset_ns(1500), 1_500_000_000);
        assert_eq!(s.due(2000), t0 + Duration::from_secs(2));
        assert_eq!(s.end(), t0 + Duration::from_secs(5));
    }

    #[test]
    fn recipients_are_never_the_sender() {
        for pattern in [Pattern::Random, Pattern::Ring] {
            let routing = Routing::Load {
                connections: 7,
                pattern,
                seed: 99,
            };
            let mut seen = [0u32; 7];
            for k in 0..7000 {
                let (from, to) = (routing.sender(k), routing.recipient(k));
                assert_ne!(from, to);
                assert!(to < 7);
                seen[to] += 1;
            }
            assert!(seen.iter().all(|&n| n > 500), "{pattern:?}: {seen:?}");
        }
        let ring = Routing::Load {
            connections: 3,
            pattern: Pattern::Ring,
            seed: 0,
        };
        assert_eq!((ring.sender(2), ring.recipient(2)), (2, 0));
        let storm = Routing::Storm {
            backlog: 3,
            senders: 2,
        };
        assert_eq!((storm.sender(7), storm.recipient(7)), (1, 2));
    }
}
