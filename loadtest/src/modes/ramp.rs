//! The connection ramp: idle authenticated connections opened in steps, the gateway's RSS
//! sampled after each, and the memory per connection as RSS growth ÷ connections.

use std::sync::Arc;
use std::time::Duration;

use ferry_shared::client::Client;
use futures_util::StreamExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{ProcWatch, meet, patience};
use crate::clients::Connector;
use crate::config::RampConfig;
use crate::procstat;
use crate::report::{RampReport, RampStep};

/// Connections closed at once when the ramp ends.
const CLOSE_CONCURRENCY: usize = 1000;

/// Runs a connection ramp: see [`RampConfig`].
pub async fn run_ramp(config: RampConfig) -> anyhow::Result<RampReport> {
    config.validate()?;
    let target = &config.target;
    // Idle clients: acks and sends never happen, so their settings do not matter.
    let connector = Arc::new(Connector::new(
        target,
        Duration::from_secs(1),
        Duration::from_secs(30),
    ));
    let watch = ProcWatch::start(target);
    let loadgen_before = procstat::sample(None).map(|s| s.rss_bytes).unwrap_or(0);
    let gateway_before = watch.gateway_rss();
    let started = Instant::now();
    let mut clients: Vec<Client> = Vec::with_capacity(config.connections);
    let mut drains = JoinSet::new();
    let mut steps = Vec::new();
    let (mut failed, mut first_error) = (0, None);
    let mut next = 0;
    while next < config.connections {
        let end = (next + config.step).min(config.connections);
        let batch = (next..end).map(|n| (n, target.user_id(n))).collect();
        let (conns, stats) = connector.connect_all(batch, patience(target)).await;
        failed += stats.failed;
        first_error = first_error.or(stats.first_error);
        for conn in conns.into_iter().flatten() {
            let mut events = conn.events;
            // An idle client still gets its welcome and must be drained.
            drains.spawn(async move { while events.recv().await.is_some() {} });
            clients.push(conn.client);
        }
        next = end;
        tokio::time::sleep(config.settle).await;
        let step = RampStep {
            connections: clients.len(),
            secs: started.elapsed().as_secs_f64(),
            gateway_rss_bytes: watch.gateway_rss(),
            loadgen_rss_bytes: procstat::sample(None).map(|s| s.rss_bytes).unwrap_or(0),
        };
        tracing::info!(
            connections = step.connections,
            gateway_rss = step.gateway_rss_bytes,
            "ramp step"
        );
        steps.push(step);
    }
    let connected = clients.len();
    let gateway_after = watch.gateway_rss();
    let loadgen_after = steps.last().map_or(loadgen_before, |s| s.loadgen_rss_bytes);
    let gateway = watch.finish().gateway;
    if let Some(barrier) = &config.barrier {
        // Held open until the go file exists: whoever waits samples memory meanwhile.
        let met = meet(barrier, &connected.to_string()).await;
        if let Err(e) = met {
            tracing::error!(error = %e, "the barrier failed; closing");
            first_error.get_or_insert_with(|| format!("{e:#}"));
        }
    }

    futures_util::stream::iter(clients)
        .for_each_concurrent(CLOSE_CONCURRENCY, |client| client.close())
        .await;
    while drains.join_next().await.is_some() {}

    let per_connection = |before: u64, after: u64| {
        (connected > 0).then(|| (after as f64 - before as f64) / connected as f64)
    };
    Ok(RampReport {
        mode: "ramp",
        run_id: target.run_id.clone(),
        connections: config.connections,
        connected,
        connect_failed: failed,
        first_error,
        steps,
        gateway_rss_before: gateway_before,
        gateway_rss_after: gateway_after,
        gateway_bytes_per_connection: gateway_before
            .zip(gateway_after)
            .and_then(|(b, a)| per_connection(b, a)),
        loadgen_bytes_per_connection: per_connection(loadgen_before, loadgen_after).unwrap_or(0.0),
        gateway,
    })
}
