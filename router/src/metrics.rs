//! Every metric the router exports, in prometheus's default registry beside the gateway's. Label
//! values come from closed sets (`StoreOp`) or name a shard by its first slot (bounded by the
//! shards); never a user or message id.

use std::sync::LazyLock;

use prometheus::{
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, exponential_buckets,
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec,
};

// A registration can only fail on a duplicate or malformed name, which is a bug caught by the
// metrics test, never something a client, the network or Redis can cause.
const REGISTERED: &str = "metric registers once with a valid name";

/// A store operation, the `op` label of the store metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Append,
    Read,
    Trim,
    Open,
    State,
    /// The periodic position check, and ending an epoch a session found reused.
    Position,
    Ping,
    /// The store watchdog's check.
    Check,
    /// Moving an undecodable member out of an inbox, and auditing appends after a restart.
    Repair,
    /// Taking bytes from a sender's store quota (`Engine::take_quota`).
    Quota,
}

impl StoreOp {
    pub const ALL: [StoreOp; 10] = [
        StoreOp::Append,
        StoreOp::Read,
        StoreOp::Trim,
        StoreOp::Open,
        StoreOp::State,
        StoreOp::Position,
        StoreOp::Ping,
        StoreOp::Check,
        StoreOp::Repair,
        StoreOp::Quota,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Append => "append",
            StoreOp::Read => "read",
            StoreOp::Trim => "trim",
            StoreOp::Open => "open",
            StoreOp::State => "state",
            StoreOp::Position => "position",
            StoreOp::Ping => "ping",
            StoreOp::Check => "check",
            StoreOp::Repair => "repair",
            StoreOp::Quota => "quota",
        }
    }
}

pub static STORE_COMMAND_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "ferry_store_command_duration_seconds",
        "Time a store command took, including waiting for a pooled connection, by operation",
        &["op"],
        // 100 µs to about 3.3 s.
        exponential_buckets(0.000_1, 2.0, 16).expect("valid buckets")
    )
    .expect(REGISTERED)
});

pub static STORE_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_store_errors_total",
        "Store commands that failed (unavailable or unexpected answer), by operation",
        &["op"]
    )
    .expect(REGISTERED)
});

pub static PUBSUB_RECONNECTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "ferry_pubsub_reconnects_total",
        "Times a pub/sub connection (one per shard) came back after a drop and resubscribed \
         its users"
    )
    .expect(REGISTERED)
});

pub static LIVE_RESYNCS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "ferry_live_resyncs_total",
        "Resync events sent to the hub: live notifications may have been lost, every session \
         catches up from the store"
    )
    .expect(REGISTERED)
});

pub static LIVE_SHARD_CONNECTED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "ferry_live_shard_connected",
        "1 while this node's pub/sub connection to the shard is up (shard: its first slot, \
         `slots-0` for a standalone Redis)",
        &["shard"]
    )
    .expect(REGISTERED)
});

pub static LIVE_LOST_SUBSCRIPTIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "ferry_live_lost_subscriptions_total",
        "Subscriptions Redis dropped by itself (an unsolicited sunsubscribe: the slot moved); \
         each is made again where the slot lives, and its user catches up"
    )
    .expect(REGISTERED)
});

pub static LIVE_TOPOLOGY_CHANGES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "ferry_live_topology_changes_total",
        "Changes of the Redis Cluster slot map seen by the live bus (failovers, slot migrations)"
    )
    .expect(REGISTERED)
});

pub static STORE_SHARD_UP: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "ferry_store_shard_up",
        "1 when the shard's primary answered the last store check, 0 when not (shard: its \
         first slot, `slots-0` for a standalone Redis)",
        &["shard"]
    )
    .expect(REGISTERED)
});

/// Sets whether the live bus's connection to `shard` is up.
pub(crate) fn shard_connected(shard: &str, up: bool) {
    LIVE_SHARD_CONNECTED
        .with_label_values(&[shard])
        .set(i64::from(up));
}

/// Removes a shard's series once it owns no slot (so labels stay bounded by the shards).
pub(crate) fn forget_shard(shard: &str) {
    let _ = LIVE_SHARD_CONNECTED.remove_label_values(&[shard]);
    let _ = STORE_SHARD_UP.remove_label_values(&[shard]);
}

/// Why an inbox's epoch was replaced by Ferry (the `reason` label of `EPOCHS_REPLACED`).
pub const EPOCH_REASONS: [&str; 5] = [
    // A session's position check, read or trim found the head below what it delivered.
    "head_behind",
    // A seq at or below what a session delivered was stored after it: reused.
    "seq_reused",
    // A `hello` resumed beyond the head under the same epoch.
    "resume_beyond_head",
    // The audit after a store restart or failover found an append answered `sent` gone.
    "append_lost",
    // A new epoch adopted an inbox whose `meta` was gone (evicted or lost on its own).
    "meta_lost",
];

pub static EPOCHS_REPLACED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_epochs_replaced_total",
        "Inbox epochs Ferry replaced because the store lost or went back on data, by reason; \
         every connection of such an inbox's user learns `reset`",
        &["reason"]
    )
    .expect(REGISTERED)
});

pub static UNDECODABLE: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "ferry_store_undecodable_total",
        "Inbox members that could not be decoded, stepped over and moved to the inbox's \
         quarantine set"
    )
    .expect(REGISTERED)
});

pub static STORE_AUDITS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "ferry_store_audits_total",
        "Audits of this node's recent appends after the store restarted or failed over"
    )
    .expect(REGISTERED)
});

pub static STORE_LOST_APPENDS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "ferry_store_lost_appends_total",
        "Appends this node answered `sent` that its audit after a store restart or failover \
         found gone: the store lost them (their recipients learn `reset`)"
    )
    .expect(REGISTERED)
});

pub static STORE_MAY_EVICT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "ferry_store_may_evict",
        "1 when the store's maxmemory-policy is not noeviction, so it may evict inboxes under \
         memory pressure; 0 otherwise (as of the last store check)"
    )
    .expect(REGISTERED)
});

/// Registers every router metric and creates every labelled series, so they are exported (at 0)
/// before anything happens. Idempotent.
pub fn init() {
    for op in StoreOp::ALL {
        STORE_COMMAND_DURATION.with_label_values(&[op.as_str()]);
        STORE_ERRORS.with_label_values(&[op.as_str()]);
    }
    for reason in EPOCH_REASONS {
        EPOCHS_REPLACED.with_label_values(&[reason]);
    }
    LazyLock::force(&PUBSUB_RECONNECTS);
    LazyLock::force(&LIVE_RESYNCS);
    LazyLock::force(&UNDECODABLE);
    LazyLock::force(&STORE_AUDITS);
    LazyLock::force(&STORE_LOST_APPENDS);
    LazyLock::force(&STORE_MAY_EVICT);
    LazyLock::force(&LIVE_SHARD_CONNECTED);
    LazyLock::force(&LIVE_LOST_SUBSCRIPTIONS);
    LazyLock::force(&LIVE_TOPOLOGY_CHANGES);
    LazyLock::force(&STORE_SHARD_UP);
}

/// Counts an epoch replaced for `reason` (one of `EPOCH_REASONS`) and says so in the log.
pub(crate) fn epoch_replaced(user: &ferry_shared::UserId, reason: &'static str) {
    EPOCHS_REPLACED.with_label_values(&[reason]).inc();
    tracing::warn!(
        %user,
        reason,
        "the store lost or went back on this inbox; its epoch is replaced and every connection \
         of the user gets reset"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_series_exist() {
        init();
        init();
        let names: Vec<String> = prometheus::gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        for name in [
            "ferry_store_command_duration_seconds",
            "ferry_store_errors_total",
            "ferry_pubsub_reconnects_total",
            "ferry_live_resyncs_total",
            "ferry_epochs_replaced_total",
            "ferry_store_undecodable_total",
            "ferry_store_audits_total",
            "ferry_store_lost_appends_total",
            "ferry_store_may_evict",
            "ferry_live_lost_subscriptions_total",
            "ferry_live_topology_changes_total",
        ] {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing in {names:?}"
            );
        }
        let errors = prometheus::gather()
            .into_iter()
            .find(|f| f.name() == "ferry_store_errors_total")
            .unwrap();
        assert_eq!(errors.get_metric().len(), StoreOp::ALL.len());
    }
}
