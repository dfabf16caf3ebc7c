//! The `ferry-gateway` binary: parse flags (and `FERRY_*` variables), set up logging, bind, and
//! run until SIGTERM or Ctrl-C, then drain.

use anyhow::Context;
use clap::Parser;
use ferry_gateway::config::LogFormat;
use ferry_gateway::{Config, Listeners};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Err(e) = config.validate() {
        eprintln!("ferry-gateway: {e}");
        std::process::exit(2);
    }
    init_tracing(config.log_format);
    raise_open_files_limit();
    if config.dev {
        tracing::warn!(
            "--dev is INSECURE: anyone can get a token for any user from /dev/token; \
             never use it in production"
        );
    }
    // Registered before the ports are bound, so a SIGTERM from then on always drains (a handler
    // registered inside a spawned task could miss one sent while the task waits for a thread).
    let terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let listener = ferry_gateway::bind(config.listen, config.listen_backlog)
        .with_context(|| format!("binding --listen {}", config.listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding --admin-listen {}", config.admin_listen))?;
    let api = match config.api_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --api-listen {addr}"))?,
        ),
        None => None,
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(terminate, shutdown.clone()));
    let listeners = Listeners {
        ws: listener,
        admin,
        api,
    };
    ferry_gateway::run_with(listeners, config, shutdown).await?;
    Ok(())
}

/// Raises the soft limit on open files to the hard one: many container runtimes start a process
/// at 1,024, where a node would stop accepting at about 1,000 connections. Logged and exported
/// (`ferry_open_files_limit`).
fn raise_open_files_limit() {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, hard)) => {
            let now = match rlimit::increase_nofile_limit(hard) {
                Ok(now) => now,
                Err(e) => {
                    tracing::warn!(error = %e, soft, hard, "cannot raise the open files limit");
                    soft
                }
            };
            tracing::info!(before = soft, now, hard, "open files limit");
            ferry_gateway::metrics::OPEN_FILES_LIMIT.set(i64::try_from(now).unwrap_or(i64::MAX));
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}

async fn stop_on_signal(mut terminate: Signal, shutdown: CancellationToken) {
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
    }
    shutdown.cancel();
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
