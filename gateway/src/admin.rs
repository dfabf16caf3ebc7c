//! The admin listener: `/healthz` (the process is alive), `/readyz` (the node is not draining and
//! the store watchdog's last check answered; a load balancer stops sending new connections when it
//! fails) and `/metrics` (Prometheus text format). It serves `--admin-max-connections` at once and
//! closes any more at once, and nothing it answers reaches the store: whoever can reach the port
//! can cost the node a bounded amount of work, and Redis none.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::http;
use crate::metrics;
use crate::node::Node;

/// Serves until `stop` is cancelled. It outlives the drain so readiness reports it.
pub async fn serve(listener: TcpListener, node: Arc<Node>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(node.config.admin_max_connections));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    let node = node.clone();
                    tokio::spawn(async move {
                        answer(stream, node).await;
                        drop(slot);
                    });
                }
                // Closed unanswered: writing even a 503 would be work done for a caller that is
                // already over its share.
                Err(_) => {
                    metrics::CONNECTIONS_REFUSED
                        .with_label_values(&["admin_capacity"])
                        .inc();
                    drop(stream);
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, node: Arc<Node>) {
    let Ok(request) = http::read_request(&mut stream, Duration::from_secs(5)).await else {
        return;
    };
    let _ = match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/healthz") => http::respond_text(&mut stream, 200, "ok\n").await,
        ("GET", "/readyz") => {
            let (status, text) = readiness(&node);
            http::respond_text(&mut stream, status, text).await
        }
        ("GET", "/metrics") => {
            // Off the runtime's threads: the process collector reads /proc, and counting the
            // open descriptors lists them all (one per connection) on kernels before 6.2.
            let body = tokio::task::spawn_blocking(metrics::render)
                .await
                .unwrap_or_else(|e| format!("# metrics rendering failed: {e}\n"));
            let kind = "text/plain; version=0.0.4; charset=utf-8";
            http::respond(&mut stream, 200, kind, body.as_bytes()).await
        }
        _ => http::respond_text(&mut stream, 404, "not found\n").await,
    };
}

/// Ready: not draining, and the watchdog's last store check (every `--store-check`, bounded by
/// `--store-timeout`; the first one at start-up) answered. Readiness fails at the first failed
/// check, well before the outage grace sends sessions away; it is read, never checked here, so a
/// probe costs the store nothing and answers at once even when the store hangs.
fn readiness(node: &Node) -> (u16, &'static str) {
    if node.draining.is_cancelled() {
        return (503, "draining\n");
    }
    let health = *node.store.borrow();
    if health.outage || !health.up {
        return (503, "store unreachable\n");
    }
    (200, "ready\n")
}
