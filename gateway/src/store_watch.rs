//! The store watchdog: checks the store every `--store-check` (readiness follows the last check)
//! and, when it has failed every check for `--store-outage-grace`, declares an outage: every
//! session is asked to reconnect, so clients move to a node that still reaches the store. On a Redis Cluster a check
//! fails only when no primary answers (this node is cut off); some shards down is logged and
//! exported per shard (`ferry_store_shard_up`), not an outage, since every node sees the same. The first check that
//! answers ends the outage. The check also reads the store's eviction policy (exported as
//! `ferry_store_may_evict`, logged when it turns evicting) and lets the engine notice a store
//! that restarted or failed over (the Redis engine then audits its recent appends).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::node::Node;

/// What the watchdog knows about the store, published through `Node::store`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// The last check answered in time: `/readyz` reads it. Seeded by the check at start-up,
    /// then set by every check without notifying receivers (sessions wait for outages only, and
    /// waking every one of them each `--store-check` would cost more than the check).
    pub up: bool,
    /// True from the declaration of an outage until a check answers again.
    pub outage: bool,
    /// Outages declared since the node started. A session leaves when this moves past the value
    /// it saw when it started, so a session that began during an outage (its `hello` reached the
    /// store) is not sent away by that same outage.
    pub outages: u64,
}

/// A change of the outage state, from a check result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Started { failing_for: Duration },
    Ended { lasted: Duration },
}

/// Turns check results into outage starts and ends.
#[derive(Debug)]
struct Outage {
    grace: Duration,
    /// When the first check of the current run of failures started.
    failing_since: Option<Instant>,
    /// When the current outage was declared.
    declared_at: Option<Instant>,
}

impl Outage {
    fn new(grace: Duration) -> Self {
        Self {
            grace,
            failing_since: None,
            declared_at: None,
        }
    }

    /// One check that started at `started` and ended at `now`, answered or not.
    fn observe(&mut self, answered: bool, started: Instant, now: Instant) -> Option<Change> {
        if answered {
            self.failing_since = None;
            let declared_at = self.declared_at.take()?;
            return Some(Change::Ended {
                lasted: now.duration_since(declared_at),
            });
        }
        let since = *self.failing_since.get_or_insert(started);
        let failing_for = now.duration_since(since);
        if self.declared_at.is_some() || failing_for < self.grace {
            return None;
        }
        self.declared_at = Some(now);
        Some(Change::Started { failing_for })
    }
}

/// Checks the store until `stop` is cancelled.
pub async fn run(node: Arc<Node>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(node.config.store_check);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut outage = Outage::new(node.config.store_outage_grace);
    let mut evicting = false;
    let mut shards_down = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let started = Instant::now();
        let answered =
            match tokio::time::timeout(node.config.store_timeout, node.engine.check()).await {
                Ok(Ok(report)) => {
                    if report.may_evict && !evicting {
                        tracing::error!(
                            policy = report.eviction_policy.as_deref().unwrap_or(""),
                            "Redis may now evict Ferry's keys (an evicting maxmemory-policy); set \
                         maxmemory-policy to noeviction"
                        );
                    }
                    evicting = report.may_evict;
                    // A partial outage of a Redis Cluster: every node sees the same, so moving
                    // clients would not help; readiness stays, and the users of those shards
                    // get `unavailable` until the cluster fails over.
                    if !report.shards_down.is_empty() && !shards_down {
                        tracing::warn!(
                            down = ?report.shards_down,
                            "Redis Cluster shards unreachable: their users' sends and reads are \
                             unavailable until they fail over (readiness is kept)"
                        );
                    } else if report.shards_down.is_empty() && shards_down {
                        tracing::info!("every Redis Cluster shard answers again");
                    }
                    shards_down = !report.shards_down.is_empty();
                    true
                }
                _ => false,
            };
        metrics::STORE_UP.set(i64::from(answered));
        node.store.send_if_modified(|health| {
            health.up = answered;
            false
        });
        match outage.observe(answered, started, Instant::now()) {
            None => {}
            Some(Change::Started { failing_for }) => {
                metrics::STORE_OUTAGES.inc();
                tracing::warn!(
                    failing_for = ?failing_for,
                    sessions = metrics::CONNECTIONS_OPEN.get(),
                    "store unreachable; failing readiness and asking every session to reconnect"
                );
                node.store.send_modify(|health| {
                    health.outage = true;
                    health.outages += 1;
                });
            }
            Some(Change::Ended { lasted }) => {
                tracing::info!(lasted = ?lasted, "store reachable again; outage over");
                node.store.send_modify(|health| health.outage = false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn an_outage_starts_after_the_grace_and_ends_at_the_first_answer() {
        let t0 = Instant::now();
        let mut outage = Outage::new(500 * MS);
        assert_eq!(outage.observe(true, t0, t0 + MS), None);
        assert_eq!(outage.observe(false, t0 + 100 * MS, t0 + 300 * MS), None);
        assert_eq!(outage.observe(false, t0 + 300 * MS, t0 + 500 * MS), None);
        assert_eq!(
            outage.observe(false, t0 + 500 * MS, t0 + 700 * MS),
            Some(Change::Started {
                failing_for: 600 * MS
            })
        );
        // Declared once per outage.
        assert_eq!(outage.observe(false, t0 + 700 * MS, t0 + 900 * MS), None);
        assert_eq!(
            outage.observe(true, t0 + 900 * MS, t0 + 1000 * MS),
            Some(Change::Ended { lasted: 300 * MS })
        );
        assert_eq!(outage.observe(true, t0 + 1100 * MS, t0 + 1101 * MS), None);
    }

    #[test]
    fn an_answer_within_the_grace_resets_the_count() {
        let t0 = Instant::now();
        let mut outage = Outage::new(500 * MS);
        assert_eq!(outage.observe(false, t0, t0 + 400 * MS), None);
        assert_eq!(outage.observe(true, t0 + 400 * MS, t0 + 401 * MS), None);
        assert_eq!(outage.observe(false, t0 + 500 * MS, t0 + 700 * MS), None);
        assert_eq!(outage.observe(false, t0 + 700 * MS, t0 + 900 * MS), None);
        assert!(
            outage
                .observe(false, t0 + 900 * MS, t0 + 1000 * MS)
                .is_some()
        );
    }
}
