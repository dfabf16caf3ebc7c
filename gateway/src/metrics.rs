//! Every metric the gateway exports, defined in one place, in prometheus's default registry
//! (the router registers its store and pub/sub metrics there too, and the prometheus crate's
//! `process` feature registers its process collector there on Linux: `process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds` and the rest). Label
//! values come from closed sets: frame types, outcomes, paths and reasons; never a user, message
//! or connection id.

use std::sync::LazyLock;

use prometheus::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, exponential_buckets,
    register_histogram, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec,
};

// A registration can only fail on a duplicate or malformed name, which is a bug caught by the
// metrics test, never something a client or the network can cause.
const REGISTERED: &str = "metric registers once with a valid name";

pub static CONNECTIONS_OPEN: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "ferry_connections_open",
        "WebSocket connections open on this node"
    )
    .expect(REGISTERED)
});

/// Always 1, labelled with this node's id (`--node-id`): one series per process, to join other
/// series on, as `*_info` metrics conventionally are.
pub static NODE_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("ferry_node_info", "This gateway node's id", &["node"])
        .expect(REGISTERED)
});

/// Always 1, labelled with the gateway's version (the crate's): one series per process, to
/// count versions during a rollout and join other series on.
pub static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "ferry_build_info",
        "This gateway's build: its version",
        &["version"]
    )
    .expect(REGISTERED)
});

/// The node's connection limit (`--max-connections`), so alerts can compare
/// `ferry_connections_open` with it.
pub static CONNECTIONS_MAX: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "ferry_connections_max",
        "WebSocket connections this node accepts before refusing with 503"
    )
    .expect(REGISTERED)
});

pub static CONNECTIONS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_connections_refused_total",
        "Connections refused before the WebSocket opened (admin_capacity: on the admin port), \
         by reason",
        &["reason"]
    )
    .expect(REGISTERED)
});

/// Requests for a path the listener does not serve (scanners, a browser's favicon): not a
/// refusal, so kept out of `ferry_connections_refused_total`, which the alerts watch.
pub static HTTP_NOT_FOUND: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "ferry_http_not_found_total",
        "Requests answered 404 on the WebSocket listener (an unknown path)"
    )
    .expect(REGISTERED)
});

/// Tokens refused, by where (`hello`, `auth`) and why (`AuthError::REASONS`). The client only
/// ever learns `unauthorized`; this and the log say why.
pub static AUTH_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_auth_failures_total",
        "Tokens refused at hello or in an auth frame, by reason",
        &["at", "reason"]
    )
    .expect(REGISTERED)
});

pub static HELLOS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_hellos_total",
        "Hello frames by outcome",
        &["outcome"]
    )
    .expect(REGISTERED)
});

pub static OPEN_FILES_LIMIT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "ferry_open_files_limit",
        "The process's soft limit on open files, raised to the hard limit at start"
    )
    .expect(REGISTERED)
});

pub static GAPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_gaps_total",
        "Gap frames sent: a device was told of messages trimmed before it acknowledged them \
         (at resume, or in a session)",
        &["at"]
    )
    .expect(REGISTERED)
});

pub static FRAMES_IN: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_frames_in_total",
        "Frames received from clients, by type",
        &["type"]
    )
    .expect(REGISTERED)
});

pub static FRAMES_OUT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_frames_out_total",
        "Frames queued to clients, by type",
        &["type"]
    )
    .expect(REGISTERED)
});

pub static SENDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("ferry_sends_total", "Send frames by outcome", &["outcome"])
        .expect(REGISTERED)
});

pub static DELIVERED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_messages_delivered_total",
        "Messages written to a client socket, by path (live, catchup)",
        &["path"]
    )
    .expect(REGISTERED)
});

pub static DELIVERY_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "ferry_delivery_latency_seconds",
        "Time from a message being stored to its write to the recipient's socket, by path",
        &["path"],
        exponential_buckets(0.000_25, 2.0, 16).expect(REGISTERED)
    )
    .expect(REGISTERED)
});

/// How old a message is when it reaches its recipient's socket, from seconds to days: the
/// latency histogram above stops at 8 s, while a message kept for an offline recipient is
/// minutes to days old when its catch-up delivers it. 14 buckets ×4 from 10 ms to 7.8 days: past
/// the default `--device-ttl` (7 days), after which a silent device no longer holds the inbox.
pub static DELIVERY_AGE: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "ferry_delivery_age_seconds",
        "Age of a message (time since it was stored) when it is written to the recipient's \
         socket, by path; up to days for messages kept for offline recipients",
        &["path"],
        exponential_buckets(0.01, 4.0, 14).expect(REGISTERED)
    )
    .expect(REGISTERED)
});

pub static CATCHUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_catchup_reads_total",
        "Catch-up reads from the inbox, by the reason the catch-up started",
        &["reason"]
    )
    .expect(REGISTERED)
});

pub static LAGGING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "ferry_sessions_lagging",
        "Sessions that stopped taking live messages because their socket was slow"
    )
    .expect(REGISTERED)
});

/// Kept by `outbound.rs`: added when a frame is queued, taken back when it leaves the queue
/// (handed to the socket, or dropped with the queue when the connection ends). A live message's
/// frame is shared by its recipient's sessions and counts in each queue that holds it, so this
/// can exceed the memory those frames take.
pub static OUTBOUND_QUEUED_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "ferry_outbound_queued_bytes",
        "Bytes of frames queued in this node's connections' outbound queues, not yet handed to \
         the socket"
    )
    .expect(REGISTERED)
});

pub static ADMISSION_RATE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "ferry_admission_rate",
        "Sends per second the node accepts while it is behind on delivery (admission control); \
         0 while sends are not limited"
    )
    .expect(REGISTERED)
});

pub static CATCHUP_WAITING: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "ferry_catchup_reads_waiting",
        "Sessions waiting for one of the node's --max-catchup-reads slots"
    )
    .expect(REGISTERED)
});

pub static DRAINS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!("ferry_drains_total", "Times this node started draining")
        .expect(REGISTERED)
});

pub static STORE_OUTAGES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "ferry_store_outages_total",
        "Store outages declared by the watchdog (the store failed every check for the grace)"
    )
    .expect(REGISTERED)
});

pub static STORE_UP: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "ferry_store_up",
        "1 when the watchdog's last store check answered in time, else 0"
    )
    .expect(REGISTERED)
});

pub static SESSION_CLOSES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_session_closes_total",
        "Sessions ended, by reason",
        &["reason"]
    )
    .expect(REGISTERED)
});

pub static HELLO_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "ferry_hello_duration_seconds",
        "Time from hello to welcome (authentication, subscription, inbox open)",
        exponential_buckets(0.000_25, 2.0, 16).expect(REGISTERED)
    )
    .expect(REGISTERED)
});

pub static API_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_api_requests_total",
        "HTTP API requests answered, by route template and status code",
        &["route", "status"]
    )
    .expect(REGISTERED)
});

pub static API_REFUSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_api_refusals_total",
        "HTTP API requests refused for their key (no_key, unknown_key, user_token) or rate \
         (rate_limited), and connections closed at capacity",
        &["reason"]
    )
    .expect(REGISTERED)
});

/// Labelled by the key's name from --api-keys-file: a closed set the operator writes.
pub static API_MESSAGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "ferry_api_messages_total",
        "Recipient-messages published through the HTTP API, by key name and outcome",
        &["key", "outcome"]
    )
    .expect(REGISTERED)
});

/// Touches every metric so that all series exist from the start (and a registration bug shows
/// at start-up, not on the first rare event).
pub fn init() {
    CONNECTIONS_OPEN.get();
    CONNECTIONS_MAX.get();
    LAGGING.get();
    OUTBOUND_QUEUED_BYTES.get();
    ADMISSION_RATE.get();
    CATCHUP_WAITING.get();
    DRAINS.get();
    STORE_OUTAGES.get();
    STORE_UP.get();
    HELLO_DURATION.get_sample_count();
    HTTP_NOT_FOUND.get();
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    for reason in REFUSAL_REASONS {
        CONNECTIONS_REFUSED.with_label_values(&[reason]);
    }
    for at in crate::auth::AuthAt::ALL {
        for reason in crate::auth::AuthError::REASONS {
            AUTH_FAILURES.with_label_values(&[at.label(), reason]);
        }
    }
    for outcome in [
        "ok",
        "unauthorized",
        "bad_frame",
        "timeout",
        "unavailable",
        "too_many_connections",
    ] {
        HELLOS.with_label_values(&[outcome]);
    }
    for kind in ["hello", "send", "ack", "ping", "auth"] {
        FRAMES_IN.with_label_values(&[kind]);
    }
    for kind in [
        "welcome",
        "msg",
        "sent",
        "error",
        "reconnect",
        "pong",
        "authed",
        "gap",
    ] {
        FRAMES_OUT.with_label_values(&[kind]);
    }
    for at in ["resume", "session"] {
        GAPS.with_label_values(&[at]);
    }
    for outcome in SEND_OUTCOMES {
        SENDS.with_label_values(&[outcome]);
    }
    for path in ["live", "catchup"] {
        DELIVERED.with_label_values(&[path]);
        DELIVERY_LATENCY.with_label_values(&[path]);
        DELIVERY_AGE.with_label_values(&[path]);
    }
    for reason in [
        "resume",
        "gap",
        "lagged",
        "resync",
        "position",
        "epoch",
        "undecodable",
    ] {
        CATCHUPS.with_label_values(&[reason]);
    }
    for reason in CLOSE_REASONS {
        SESSION_CLOSES.with_label_values(&[reason]);
    }
    for reason in API_REFUSAL_REASONS {
        API_REFUSALS.with_label_values(&[reason]);
    }
    ferry_router::metrics::init();
}

/// Why a connection was refused before its WebSocket opened (`server.rs`, `admin.rs`).
pub const REFUSAL_REASONS: [&str; 9] = [
    "capacity",
    "unauthenticated",
    "address",
    "draining",
    "bad_request",
    "protocol",
    "origin",
    "query_token",
    "admin_capacity",
];

pub const SEND_OUTCOMES: [&str; 8] = [
    "stored",
    "duplicate",
    "invalid",
    "too_large",
    "rate_limited",
    "inbox_full",
    "unavailable",
    "internal",
];

pub const API_REFUSAL_REASONS: [&str; 5] = [
    "no_key",
    "unknown_key",
    "user_token",
    "rate_limited",
    "capacity",
];

pub const CLOSE_REASONS: [&str; 10] = [
    "client",
    "protocol",
    "unauthorized",
    "token_expired",
    "heartbeat",
    "write_timeout",
    "drain",
    "epoch_changed",
    "store_unavailable",
    "store_outage",
];

/// The exposition text for `/metrics`.
pub fn render() -> String {
    let families = prometheus::gather();
    prometheus::TextEncoder::new()
        .encode_to_string(&families)
        .unwrap_or_else(|e| format!("# metrics encoding failed: {e}\n"))
}
