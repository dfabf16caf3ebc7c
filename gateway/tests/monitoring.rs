//! Every `ferry_*` and `process_*` metric that deploy/'s rules, dashboard and manifests name is
//! in `/metrics`, and the build, process and delivery-age series are there from the start.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::*;

/// The directories scanned, relative to the deploy directory.
const SCANNED: [&str; 2] = ["monitoring", "k8s"];
/// The metric name prefixes scanned for: the gateway's own, and the process collector's.
const PREFIXES: [&str; 2] = ["ferry_", "process_"];
/// Metrics the alerts cannot do without; the scan must find each of them.
const ALERT_METRICS: [&str; 4] = [
    "ferry_delivery_latency_seconds",
    "ferry_sends_total",
    "ferry_store_up",
    "ferry_connections_max",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_named_in_deploy_exists() {
    // FERRY_DEPLOY_DIR points the scan elsewhere (to try it on a fixture); the repo's by default.
    let deploy = std::env::var_os("FERRY_DEPLOY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy"));
    let mut named: BTreeMap<String, BTreeSet<PathBuf>> = BTreeMap::new();
    for dir in SCANNED {
        for file in files(&deploy.join(dir)) {
            let text = std::fs::read_to_string(&file).expect("read a deploy file");
            for name in PREFIXES.iter().flat_map(|p| metric_names(&text, p)) {
                named.entry(name).or_default().insert(file.clone());
            }
        }
    }
    assert!(
        !named.is_empty(),
        "no ferry_* metric named under {}/{{monitoring,k8s}}: are the files there?",
        deploy.display()
    );

    // A Redis gateway (store and pub/sub metrics too) and one message through it, so the
    // labelled series have samples.
    let gateway = TestGateway::start(EngineKind::Redis).await;
    let (mut alice, _) = gateway.raw("alice").await;
    let (mut bob, _) = gateway.raw("bob").await;
    raw_send(&mut alice, "m-1", "bob", "hi").await;
    raw_messages(&mut bob, 1).await;
    let (status, body) = gateway.get("/metrics").await.expect("scrape /metrics");
    assert_eq!(status, 200);
    // `# TYPE <name> <type>`
    let types: BTreeMap<&str, &str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
        .collect();

    let missing: Vec<String> = named
        .iter()
        .filter(|(name, _)| {
            let base = histogram_base(name)
                .filter(|b| matches!(types.get(b), Some(&"histogram" | &"summary")));
            !types.contains_key(name.as_str()) && base.is_none()
        })
        .map(|(name, files)| format!("{name} (in {files:?})"))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics named under deploy/ but not exported by the gateway:\n  {}",
        missing.join("\n  ")
    );
    for name in ALERT_METRICS {
        let seen = named
            .keys()
            .any(|n| n == name || histogram_base(n) == Some(name));
        assert!(seen, "{name} is named nowhere under {}", deploy.display());
    }
}

/// The `.yml`, `.yaml` and `.json` files under `dir`, recursively (none if it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let path = entry.expect("read a deploy directory").path();
        if path.is_dir() {
            found.extend(files(&path));
        } else if path
            .extension()
            .is_some_and(|e| e == "yml" || e == "yaml" || e == "json")
        {
            found.push(path);
        }
    }
    found
}

/// Every `<prefix>[a-z0-9_]+` in `text` that does not continue a longer identifier.
fn metric_names(text: &str, prefix: &str) -> Vec<String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let name_char = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let bytes = text.as_bytes();
    let mut names = Vec::new();
    let mut i = 0;
    while let Some(at) = text[i..].find(prefix).map(|at| at + i) {
        let mut end = at + prefix.len();
        while end < bytes.len() && name_char(bytes[end]) {
            end += 1;
        }
        let starts_word = at == 0 || !word(bytes[at - 1]);
        if starts_word && end > at + prefix.len() {
            names.push(text[at..end].to_string());
        }
        i = end;
    }
    names
}

/// The histogram a `_bucket`, `_sum` or `_count` series belongs to.
fn histogram_base(name: &str) -> Option<&str> {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
}

#[test]
fn scanner_finds_names_and_histogram_bases() {
    let text = r#"expr: histogram_quantile(0.99, sum by (le) (rate(ferry_delivery_latency_seconds_bucket{path="live"}[5m]))) / ferry_x_2
FERRY_REDIS_URL my_ferry_thing "ferry_" sum(ferry_sends_total) subprocess_x process_open_fds"#;
    assert_eq!(
        metric_names(text, "ferry_"),
        [
            "ferry_delivery_latency_seconds_bucket",
            "ferry_x_2",
            "ferry_sends_total"
        ]
    );
    assert_eq!(metric_names(text, "process_"), ["process_open_fds"]);
    assert_eq!(
        histogram_base("ferry_delivery_latency_seconds_bucket"),
        Some("ferry_delivery_latency_seconds")
    );
    assert_eq!(histogram_base("ferry_sends_total"), None);
}

/// Issue 14: the build's version, the process collector's series, and the age-at-delivery
/// histogram for both paths, before any message was delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_process_and_age_series_exist_from_the_start() {
    let gateway = TestGateway::start(EngineKind::Embedded).await;
    let version = env!("CARGO_PKG_VERSION");
    let build = format!("ferry_build_info{{version=\"{version}\"}}");
    assert_eq!(metric(&gateway, &build).await, Some(1.0), "{build}");
    for name in [
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
    ] {
        let value = metric(&gateway, name).await;
        assert!(value > Some(0.0), "{name}: {value:?}");
    }
    assert!(
        metric(&gateway, "process_cpu_seconds_total")
            .await
            .is_some()
    );
    let (_, body) = gateway.get("/metrics").await.expect("scrape /metrics");
    for path in ["live", "catchup"] {
        // The top finite bucket is past a week (0.01 s × 4^13).
        let top = format!(r#"ferry_delivery_age_seconds_bucket{{path="{path}",le="671088.64"}}"#);
        assert!(body.contains(&top), "{top} in:\n{body}");
    }
}
