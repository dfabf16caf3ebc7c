//! The per-message record of a run and the verdict over it. Every message has a number `k`;
//! the ledger keeps, per `k`, the seq and time of its `sent` answer and how its recipient
//! received it, and per user the time of its latest `reset`. After the run, every message
//! answered `sent` is either delivered (once within an epoch, at its seq) or lost, and a lost
//! one was either reported to its recipient through a `reset` or lost in silence.
//!
//! A loss is *reported* when its recipient got a `reset` after the sender got `sent`. The
//! answer's time, not the send's: a send may be retried for seconds (Redis down, a node
//! draining), so a reset between the first attempt and the append that stored the message says
//! nothing about it, and counting from the dispatch would excuse a loss that came later. Only
//! a reset that arrives after the client was told the message is stored can stand for "what
//! was stored is gone". Times are whole milliseconds after `t0`; a reset in the same
//! millisecond as the answer does not count (the strict side).
//!
//! A lost message answered while its recipient was offline is counted apart: no session of the
//! recipient could see that loss happen, so whatever reported it was the server's own check.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};

/// How many lost messages the tally names, of each kind.
const EXAMPLES: usize = 10;

/// Per message: its `sent` answer and what its recipient got. About 25 bytes a message.
pub(crate) struct Ledger {
    /// The seq of the `sent` answer; 0 while unanswered (seqs start at 1).
    sent_seq: Box<[AtomicU64]>,
    /// When the `sent` answer arrived, ms after `t0`.
    answered_ms: Box<[AtomicU32]>,
    /// The seq of its latest delivery; 0 while not delivered. The latest, not the first: a
    /// send retried because its answer was cut off may be stored again after the store lost
    /// the first copy, which the recipient may have had (at another seq) before its `reset`;
    /// `sent` names the copy that stayed.
    delivered_seq: Box<[AtomicU64]>,
    /// Times the application was handed it (saturating).
    deliveries: Box<[AtomicU8]>,
    /// The `reset`s its recipient had got at its latest delivery: a later delivery after more
    /// of them is a replay of a new epoch, not a duplicate within one.
    delivered_resets: Box<[AtomicU32]>,
    duplicates_within_epoch: AtomicU64,
    duplicates_across_reset: AtomicU64,
}

/// What one delivery of a message was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Receipt {
    /// Its first delivery.
    First,
    /// Delivered again in the same epoch: it was stored twice (or the client's drop by seq
    /// failed).
    AgainWithinEpoch,
    /// Delivered again after a `reset` of its recipient: the new epoch's replay, allowed.
    AgainAfterReset,
}

/// What the run knows of a message besides the ledger: told by the verifier to the tally.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fate {
    /// Its recipient got a `reset` after the `sent` answer.
    pub reported: bool,
    /// Its recipient (this user) was offline when the `sent` answer came.
    pub offline_recipient: Option<usize>,
}

/// A lost message, for a look at the gateway's logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lost {
    pub k: u64,
    /// The seq its `sent` named.
    pub seq: u64,
    /// When `sent` arrived, ms after `t0`.
    pub answered_ms: u32,
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
    /// Of those, lost with a `reset` of the recipient after the `sent` answer.
    pub lost_reported: u64,
    /// Of those, lost without such a reset: in silence.
    pub lost_unreported: u64,
    /// Lost, answered while the recipient was offline.
    pub lost_offline: u64,
    /// The recipients of those.
    pub lost_offline_recipients: BTreeSet<usize>,
    /// The earliest `sent` answer of a lost message, ms after `t0`: every message answered
    /// before it was delivered.
    pub lost_first_answered_ms: Option<u32>,
    /// The latest `sent` answer of a lost message, ms after `t0`: every message answered after
    /// it was delivered.
    pub lost_last_answered_ms: Option<u32>,
    /// Extra deliveries of one message (same `from` and `id`), after the client's drop by seq:
    /// `duplicates_within_epoch + duplicates_across_reset`.
    pub duplicates: u64,
    pub duplicates_within_epoch: u64,
    pub duplicates_across_reset: u64,
    /// Answered messages whose latest delivery was at a seq other than the one `sent` named.
    pub seq_mismatch: u64,
    /// Messages delivered although their send had no `sent` answer (outcome unknown: timed
    /// out or cut by a disconnect, yet stored).
    pub unconfirmed: u64,
    /// The first few lost message numbers.
    pub lost_examples: Vec<u64>,
    /// The first few messages lost in silence.
    pub lost_unreported_examples: Vec<Lost>,
}

impl Ledger {
    pub(crate) fn new(total: u64) -> Self {
        let total = usize::try_from(total).unwrap_or(usize::MAX);
        Ledger {
            sent_seq: (0..total).map(|_| AtomicU64::new(0)).collect(),
            answered_ms: (0..total).map(|_| AtomicU32::new(0)).collect(),
            delivered_seq: (0..total).map(|_| AtomicU64::new(0)).collect(),
            deliveries: (0..total).map(|_| AtomicU8::new(0)).collect(),
            delivered_resets: (0..total).map(|_| AtomicU32::new(0)).collect(),
            duplicates_within_epoch: AtomicU64::new(0),
            duplicates_across_reset: AtomicU64::new(0),
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.sent_seq.len() as u64
    }

    /// Message `k` was answered `sent` with `seq`, `at_ms` after `t0`.
    pub(crate) fn answered(&self, k: u64, seq: u64, at_ms: u32) {
        self.answered_ms[k as usize].store(at_ms, Relaxed);
        self.sent_seq[k as usize].store(seq, Relaxed);
    }

    /// Message `k` was handed to its recipient at `seq`, after the recipient's `resets`-th
    /// reset. Only the recipient's task delivers `k`, so this is never called concurrently for
    /// one `k`.
    pub(crate) fn delivered(&self, k: u64, seq: u64, resets: u32) -> Receipt {
        let i = k as usize;
        let before = self.deliveries[i]
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_add(1)))
            .unwrap_or(u8::MAX);
        let previous_resets = self.delivered_resets[i].swap(resets, Relaxed);
        self.delivered_seq[i].store(seq, Relaxed);
        if before == 0 {
            Receipt::First
        } else if previous_resets == resets {
            self.duplicates_within_epoch.fetch_add(1, Relaxed);
            Receipt::AgainWithinEpoch
        } else {
            self.duplicates_across_reset.fetch_add(1, Relaxed);
            Receipt::AgainAfterReset
        }
    }

    /// Every answered message was delivered or reported lost (`reported(k, answered_ms)`: its
    /// recipient got a `reset` after the answer).
    pub(crate) fn all_accounted_for(&self, reported: impl Fn(u64, u32) -> bool) -> bool {
        (0..self.sent_seq.len()).all(|i| {
            self.sent_seq[i].load(Relaxed) == 0
                || self.deliveries[i].load(Relaxed) > 0
                || reported(i as u64, self.answered_ms[i].load(Relaxed))
        })
    }

    /// The verdict; `fate(k, answered_ms)` tells what else is known of `k`.
    pub(crate) fn tally(&self, fate: impl Fn(u64, u32) -> Fate) -> Tally {
        let mut t = Tally {
            duplicates_within_epoch: self.duplicates_within_epoch.load(Relaxed),
            duplicates_across_reset: self.duplicates_across_reset.load(Relaxed),
            ..Tally::default()
        };
        t.duplicates = t.duplicates_within_epoch + t.duplicates_across_reset;
        for i in 0..self.sent_seq.len() {
            let k = i as u64;
            let sent = self.sent_seq[i].load(Relaxed);
            let times = self.deliveries[i].load(Relaxed);
            match (sent, times) {
                (0, 0) => {}
                (0, _) => t.unconfirmed += 1,
                (seq, 0) => {
                    let answered_ms = self.answered_ms[i].load(Relaxed);
                    t.answered += 1;
                    t.lost += 1;
                    t.lost_first_answered_ms = Some(
                        t.lost_first_answered_ms
                            .map_or(answered_ms, |first| first.min(answered_ms)),
                    );
                    t.lost_last_answered_ms = t.lost_last_answered_ms.max(Some(answered_ms));
                    if t.lost_examples.len() < EXAMPLES {
                        t.lost_examples.push(k);
                    }
                    let fate = fate(k, answered_ms);
                    if let Some(recipient) = fate.offline_recipient {
                        t.lost_offline += 1;
                        t.lost_offline_recipients.insert(recipient);
                    }
                    if fate.reported {
                        t.lost_reported += 1;
                    } else {
                        t.lost_unreported += 1;
                        if t.lost_unreported_examples.len() < EXAMPLES {
                            t.lost_unreported_examples.push(Lost {
                                k,
                                seq,
                                answered_ms,
                            });
                        }
                    }
                }
                (seq, _) => {
                    t.answered += 1;
                    t.delivered += 1;
                    if self.delivered_seq[i].load(Relaxed) != seq {
                        t.seq_mismatch += 1;
                    }
                }
            }
        }
        t
    }
}

/// What the verifier knows of each recipient over time: its latest `reset` and when it was
/// offline, in ms after `t0`, each plus one (0: never).
pub(crate) struct Recipients {
    last_reset: Box<[AtomicU32]>,
    offline_since: Box<[AtomicU32]>,
    online_again: Box<[AtomicU32]>,
}

fn array(users: usize) -> Box<[AtomicU32]> {
    (0..users).map(|_| AtomicU32::new(0)).collect()
}

fn at(times: &[AtomicU32], user: usize) -> Option<u32> {
    let t = times.get(user)?.load(Relaxed);
    t.checked_sub(1)
}

impl Recipients {
    pub(crate) fn new(users: usize) -> Self {
        Recipients {
            last_reset: array(users),
            offline_since: array(users),
            online_again: array(users),
        }
    }

    /// User `user` got a reset `at_ms` after `t0`.
    pub(crate) fn reset(&self, user: usize, at_ms: u32) {
        if let Some(last) = self.last_reset.get(user) {
            last.fetch_max(at_ms.saturating_add(1), Relaxed);
        }
    }

    /// User `user` got a reset strictly after `at_ms`.
    pub(crate) fn reset_after(&self, user: usize, at_ms: u32) -> bool {
        at(&self.last_reset, user).is_some_and(|reset| reset > at_ms)
    }

    /// Users that got at least one reset.
    pub(crate) fn users_reset(&self) -> usize {
        self.last_reset
            .iter()
            .filter(|l| l.load(Relaxed) > 0)
            .count()
    }

    /// User `user` closed its client for its offline window at `at_ms`.
    pub(crate) fn went_offline(&self, user: usize, at_ms: u32) {
        if let Some(since) = self.offline_since.get(user) {
            since.store(at_ms.saturating_add(1), Relaxed);
        }
    }

    /// User `user` got its `welcome` back at `at_ms`.
    pub(crate) fn came_back(&self, user: usize, at_ms: u32) {
        if let Some(again) = self.online_again.get(user) {
            again.store(at_ms.saturating_add(1), Relaxed);
        }
    }

    /// User `user` had no client open at `at_ms` (its one offline window).
    pub(crate) fn offline_at(&self, user: usize, at_ms: u32) -> bool {
        at(&self.offline_since, user).is_some_and(|since| since <= at_ms)
            && at(&self.online_again, user).is_none_or(|again| at_ms < again)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_names_every_outcome() {
        let ledger = Ledger::new(6);
        ledger.answered(0, 1, 10); // delivered once at its seq
        assert_eq!(ledger.delivered(0, 1, 0), Receipt::First);
        ledger.answered(1, 2, 20); // lost
        ledger.answered(2, 3, 30); // stored twice: delivered twice in one epoch, at 3 and 4
        assert_eq!(ledger.delivered(2, 3, 0), Receipt::First);
        assert_eq!(ledger.delivered(2, 4, 0), Receipt::AgainWithinEpoch);
        ledger.answered(3, 5, 40); // delivered at another seq
        ledger.delivered(3, 6, 0);
        ledger.delivered(4, 7, 0); // delivered without an answer
        let t = ledger.tally(|_, _| Fate::default());
        assert_eq!(
            t,
            Tally {
                answered: 4,
                delivered: 3,
                lost: 1,
                lost_reported: 0,
                lost_unreported: 1,
                lost_offline: 0,
                lost_offline_recipients: BTreeSet::new(),
                lost_first_answered_ms: Some(20),
                lost_last_answered_ms: Some(20),
                duplicates: 1,
                duplicates_within_epoch: 1,
                duplicates_across_reset: 0,
                seq_mismatch: 2,
                unconfirmed: 1,
                lost_examples: vec![1],
                lost_unreported_examples: vec![Lost {
                    k: 1,
                    seq: 2,
                    answered_ms: 20
                }],
            }
        );
    }

    #[test]
    fn a_delivery_after_a_reset_is_a_replay_and_one_more_in_that_epoch_a_duplicate() {
        let ledger = Ledger::new(1);
        ledger.answered(0, 4, 0);
        assert_eq!(ledger.delivered(0, 4, 0), Receipt::First);
        assert_eq!(ledger.delivered(0, 4, 1), Receipt::AgainAfterReset);
        assert_eq!(ledger.delivered(0, 4, 1), Receipt::AgainWithinEpoch);
        assert_eq!(ledger.delivered(0, 4, 3), Receipt::AgainAfterReset);
        let t = ledger.tally(|_, _| Fate::default());
        assert_eq!(
            (
                t.duplicates,
                t.duplicates_within_epoch,
                t.duplicates_across_reset
            ),
            (3, 1, 2)
        );
        assert_eq!((t.delivered, t.seq_mismatch), (1, 0));
    }

    #[test]
    fn the_copy_that_stayed_is_the_one_sent_names() {
        // Stored at seq 4 and delivered; its answer was cut off, and the store lost it. The
        // retry stored it again at seq 5, answered `sent`, and the reset's replay delivered it.
        let ledger = Ledger::new(1);
        assert_eq!(ledger.delivered(0, 4, 0), Receipt::First);
        ledger.answered(0, 5, 10);
        assert_eq!(ledger.delivered(0, 5, 1), Receipt::AgainAfterReset);
        let t = ledger.tally(|_, _| Fate::default());
        assert_eq!(
            (t.delivered, t.seq_mismatch, t.duplicates_across_reset),
            (1, 0, 1)
        );
    }

    #[test]
    fn losses_are_split_by_the_report() {
        let ledger = Ledger::new(4);
        for k in 0..4 {
            ledger.answered(k, k + 1, 100 * k as u32);
        }
        ledger.delivered(3, 4, 0);
        // Message 1's loss was reported, 0's and 2's were not; 1 and 2 went to user 7 while it
        // was offline.
        let t = ledger.tally(|k, _| Fate {
            reported: k == 1,
            offline_recipient: (k > 0).then_some(7),
        });
        assert_eq!((t.lost, t.lost_reported, t.lost_unreported), (3, 1, 2));
        assert_eq!((t.lost_offline, t.lost_offline_recipients.len()), (2, 1));
        assert_eq!(
            (t.lost_first_answered_ms, t.lost_last_answered_ms),
            (Some(0), Some(200))
        );
        assert_eq!(t.lost_examples, vec![0, 1, 2]);
        let silent: Vec<u64> = t.lost_unreported_examples.iter().map(|l| l.k).collect();
        assert_eq!(silent, vec![0, 2]);
        assert!(!ledger.all_accounted_for(|k, _| k == 1));
        assert!(ledger.all_accounted_for(|k, _| k != 3));
    }

    #[test]
    fn only_a_reset_after_the_answer_reports() {
        let users = Recipients::new(3);
        assert!(!users.reset_after(0, 0), "no reset yet");
        users.reset(0, 500);
        users.reset(0, 200); // an earlier one, recorded late, changes nothing
        assert!(users.reset_after(0, 499));
        assert!(
            !users.reset_after(0, 500),
            "the same millisecond does not count"
        );
        assert!(!users.reset_after(0, 501));
        assert!(
            !users.reset_after(1, 0),
            "another user's reset reports nothing"
        );
        users.reset(7, 1); // not a user of this run: ignored
        assert_eq!(users.users_reset(), 1);
    }

    #[test]
    fn a_user_is_offline_from_its_close_until_its_welcome() {
        let users = Recipients::new(2);
        assert!(!users.offline_at(0, 0));
        users.went_offline(0, 0);
        assert!(users.offline_at(0, 0) && users.offline_at(0, 10_000));
        users.came_back(0, 7000);
        assert!(users.offline_at(0, 6999));
        assert!(!users.offline_at(0, 7000));
        assert!(!users.offline_at(1, 100), "never offline");
    }
}
