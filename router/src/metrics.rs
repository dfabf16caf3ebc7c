//! Every metric the router exports, in prometheus's default registry beside the gateway's. Label
//! values come from closed sets (`StoreOp`); never a user or message id.

use std::sync::LazyLock;

use prometheus::{
    HistogramVec, IntCounter, IntCounterVec, exponential_buckets, register_histogram_vec,
    register_int_counter, register_int_counter_vec,
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
    Ping,
}

impl StoreOp {
    pub const ALL: [StoreOp; 6] = [
        StoreOp::Append,
        StoreOp::Read,
        StoreOp::Trim,
        StoreOp::Open,
        StoreOp::State,
        StoreOp::Ping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Append => "append",
            StoreOp::Read => "read",
            StoreOp::Trim => "trim",
            StoreOp::Open => "open",
            StoreOp::State => "state",
            StoreOp::Ping => "ping",
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
        "Times the pub/sub connection came back after a drop and resubscribed every user"
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

/// Registers every router metric and creates every labelled series, so they are exported (at 0)
/// before anything happens. Idempotent.
pub fn init() {
    for op in StoreOp::ALL {
        STORE_COMMAND_DURATION.with_label_values(&[op.as_str()]);
        STORE_ERRORS.with_label_values(&[op.as_str()]);
    }
    LazyLock::force(&PUBSUB_RECONNECTS);
    LazyLock::force(&LIVE_RESYNCS);
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
