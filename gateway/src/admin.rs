//! The admin listener: `/healthz` (the process is alive), `/readyz` (the node is not draining, the
//! store watchdog sees no outage and the store answers now; a load balancer stops sending new
//! connections when it fails) and `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::http;
use crate::metrics;
use crate::node::Node;

/// Serves until `stop` is cancelled. It outlives the drain so readiness reports it.
pub async fn serve(listener: TcpListener, node: Arc<Node>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, node.clone()));
            }
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
            let (status, text) = readiness(&node).await;
            http::respond_text(&mut stream, status, text).await
        }
        ("GET", "/metrics") => {
            let body = metrics::render();
            let kind = "text/plain; version=0.0.4; charset=utf-8";
            http::respond(&mut stream, 200, kind, body.as_bytes()).await
        }
        _ => http::respond_text(&mut stream, 404, "not found\n").await,
    };
}

async fn readiness(node: &Node) -> (u16, &'static str) {
    if node.draining.is_cancelled() {
        return (503, "draining\n");
    }
    // The watchdog's verdict first: during an outage a lucky ping must not make the node look
    // ready while its sessions are being sent away.
    if node.store.borrow().outage {
        return (503, "store unreachable\n");
    }
    let timeout = node.config.store_timeout;
    match tokio::time::timeout(timeout, node.engine.ping()).await {
        Ok(Ok(())) => (200, "ready\n"),
        _ => (503, "store unreachable\n"),
    }
}
