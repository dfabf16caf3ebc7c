//! The Redis engine's journal of recent appends, for the audit after the store restarted or
//! failed over.
//!
//! Redis can lose writes it already acknowledged: a crash with `appendfsync everysec` loses up
//! to about a second, a failover to a replica loses whatever the replica had not received. The
//! inbox then goes back in time under the same epoch, and seqs get reused. A session that is
//! ahead of the store notices (`Position` checks); a recipient that was offline cannot. So each
//! node remembers what it appended in the last `audit_window` (recipient, sender, id, epoch,
//! seq), and when the store's run id changes it checks that each append's dedupe key still
//! names its seq. One that does not was lost after it was answered `sent`: the script ends that
//! inbox's epoch, and its recipient learns `reset` instead of missing it in silence.
//!
//! The journal is bounded by age and by count; what falls out of it is no longer checked.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use ferry_shared::{MessageId, UserId};
use tokio::time::Instant;

/// At most this many appends are remembered, whatever the window (about 100 bytes each).
pub(crate) const JOURNAL_CAP: usize = 1_000_000;

/// One append this node answered `Stored`.
#[derive(Debug, Clone)]
pub(crate) struct Appended {
    pub at: Instant,
    pub to: UserId,
    pub from: UserId,
    pub id: MessageId,
    pub epoch: String,
    pub seq: u64,
}

/// Recent appends, oldest first.
#[derive(Debug)]
pub(crate) struct Journal {
    window: Duration,
    cap: usize,
    entries: VecDeque<Appended>,
}

impl Journal {
    pub fn new(window: Duration, cap: usize) -> Self {
        Self {
            window,
            cap,
            entries: VecDeque::new(),
        }
    }

    pub fn record(&mut self, entry: Appended) {
        if self.window.is_zero() {
            return;
        }
        self.forget_before(entry.at);
        if self.entries.len() >= self.cap {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
    }

    /// The appends of the last window, grouped by (recipient, epoch), for the audit.
    pub fn recent_by_inbox(&mut self, now: Instant) -> BTreeMap<(UserId, String), Vec<Appended>> {
        self.forget_before(now);
        let mut groups: BTreeMap<(UserId, String), Vec<Appended>> = BTreeMap::new();
        for entry in &self.entries {
            groups
                .entry((entry.to.clone(), entry.epoch.clone()))
                .or_default()
                .push(entry.clone());
        }
        groups
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .entries
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) > self.window)
        {
            self.entries.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at: Instant, to: &str, epoch: &str, seq: u64) -> Appended {
        Appended {
            at,
            to: UserId::parse(to).unwrap(),
            from: UserId::parse("alice").unwrap(),
            id: MessageId::parse(&format!("m{seq}")).unwrap(),
            epoch: epoch.into(),
            seq,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn remembers_the_window_and_at_most_the_cap() {
        let mut journal = Journal::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        journal.record(entry(t0, "bob", "e1", 1));
        journal.record(entry(t0 + Duration::from_secs(5), "bob", "e1", 2));
        journal.record(entry(t0 + Duration::from_secs(11), "carol", "e2", 1));
        assert_eq!(journal.len(), 2, "the first one is older than the window");
        journal.record(entry(t0 + Duration::from_secs(12), "bob", "e3", 3));
        journal.record(entry(t0 + Duration::from_secs(12), "bob", "e3", 4));
        assert_eq!(journal.len(), 3, "the cap drops the oldest");
        let groups = journal.recent_by_inbox(t0 + Duration::from_secs(12));
        let bob = UserId::parse("bob").unwrap();
        let carol = UserId::parse("carol").unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[&(bob, "e3".into())].len(), 2);
        assert_eq!(groups[&(carol, "e2".into())].len(), 1);
        assert!(
            journal
                .recent_by_inbox(t0 + Duration::from_secs(30))
                .is_empty()
        );
    }

    #[test]
    fn a_zero_window_remembers_nothing() {
        let mut journal = Journal::new(Duration::ZERO, 10);
        journal.record(entry(Instant::now(), "bob", "e1", 1));
        assert_eq!(journal.len(), 0);
    }
}
