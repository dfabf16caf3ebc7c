//! Ferry's gateway: the edge of the system. `run_with` takes bound listeners, a configuration and
//! a shutdown token, and serves WebSocket sessions, the admin endpoints and the server HTTP API
//! until the node has drained. `main.rs` only parses flags, sets up logging, binds and calls it.

pub mod addresses;
pub mod admin;
pub mod admission;
pub mod api;
pub mod auth;
pub mod close;
pub mod config;
pub mod hello;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod sends;
pub mod server;
pub mod session;
pub mod store_watch;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use ferry_router::{
    EmbeddedEngine, Engine, EngineError, EngineOptions, Hub, HubOptions, RedisEngine, RedisTarget,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("authentication key: {0}")]
    Auth(#[from] auth::AuthError),
    #[error("HTTP API: {0}")]
    ApiKeys(#[from] api::KeysError),
    #[error("store: {0}")]
    Store(#[from] ferry_router::EngineError),
    #[error(
        "Redis may evict Ferry's keys (maxmemory-policy is {0}): an evicted inbox loses \
         messages that were answered `sent`. Set maxmemory-policy to noeviction, or start with \
         --allow-redis-eviction to accept that"
    )]
    EvictingStore(String),
}

/// Binds the WebSocket listener with a listen backlog of `backlog` connections (the standard
/// library's 128 overflows in a reconnect storm: SYNs are dropped and clients wait out a
/// retransmit; the kernel caps it at `net.core.somaxconn`).
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Time allowed past the drain window for the last sessions to close.
const DRAIN_MARGIN: Duration = Duration::from_secs(5);

/// The engine the configuration asks for: Redis with `--redis-url`, else the embedded one.
pub async fn build_engine(config: &Config) -> Result<Arc<dyn Engine>, GatewayError> {
    let options = EngineOptions {
        key_prefix: config.key_prefix.clone(),
        max_inbox: config.max_inbox,
        inbox_ttl: config.inbox_ttl,
        dedupe_window: config.dedupe_window,
        store_timeout: config.store_timeout,
        min_replicas_ack: config.min_replicas_ack,
        device_ttl: config.device_ttl,
        max_devices: config.max_devices,
        audit_window: config.append_audit_window,
        ..EngineOptions::default()
    };
    Ok(match redis_target(config)? {
        Some(target) => {
            Arc::new(RedisEngine::connect_to(&target, options, config.redis_pool_size).await?)
        }
        None => Arc::new(EmbeddedEngine::new(options)),
    })
}

/// Where the Redis settings point, the password file read; `None` for the embedded engine.
pub fn redis_target(config: &Config) -> Result<Option<RedisTarget>, GatewayError> {
    let Some(setting) = &config.redis_url else {
        return Ok(None);
    };
    let password = match &config.redis_password_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                EngineError::Internal(format!(
                    "cannot read --redis-password-file {}: {e}",
                    path.display()
                ))
            })?;
            let password = text.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                return Err(EngineError::Internal(format!(
                    "--redis-password-file {} is empty",
                    path.display()
                ))
                .into());
            }
            Some(password.to_owned())
        }
        None => None,
    };
    Ok(Some(RedisTarget {
        urls: setting.urls(),
        cluster: config.redis_cluster,
        password,
        ca_file: config.redis_ca_file.clone(),
        client_cert: config.redis_client_cert.clone(),
        client_key: config.redis_client_key.clone(),
    }))
}

/// Refuses a store that may evict Ferry's keys, unless `--allow-redis-eviction`. A store that
/// does not answer now is not refused: the node starts (commands fail until it is back), and
/// the store watchdog's checks export the policy as `ferry_store_may_evict`. Whether the store
/// answered: readiness starts from it.
async fn check_eviction(engine: &dyn Engine, config: &Config) -> Result<bool, GatewayError> {
    match tokio::time::timeout(config.store_timeout, engine.check()).await {
        Ok(Ok(report)) if report.may_evict => {
            let policy = report.eviction_policy.unwrap_or_default();
            if !config.allow_redis_eviction {
                return Err(GatewayError::EvictingStore(policy));
            }
            tracing::warn!(
                %policy,
                "Redis may evict Ferry's keys; allowed by --allow-redis-eviction"
            );
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "store check at start-up failed");
            return Ok(false);
        }
        Err(_) => {
            tracing::warn!("store check at start-up timed out");
            return Ok(false);
        }
    }
    Ok(true)
}

/// The listeners a node serves on, bound by the caller (`main`, or a test on port 0).
pub struct Listeners {
    /// WebSocket sessions (`--listen`).
    pub ws: TcpListener,
    /// `/healthz`, `/readyz`, `/metrics` (`--admin-listen`).
    pub admin: TcpListener,
    /// The server HTTP API (`--api-listen`), when it is on.
    pub api: Option<TcpListener>,
}

/// `run_with` without the HTTP API (its configuration must not turn it on).
pub async fn run(
    listener: TcpListener,
    admin_listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let listeners = Listeners {
        ws: listener,
        admin: admin_listener,
        api: None,
    };
    run_with(listeners, config, shutdown).await
}

/// Serves until `shutdown` is cancelled, then drains: readiness fails, no new connections are
/// accepted (the HTTP API finishes its requests in flight and closes), each session gets
/// `reconnect` at a random point of the drain window and a 1012 close, and `run_with` returns
/// when every session has ended (or the window plus a margin passed).
pub async fn run_with(
    listeners: Listeners,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    config.validate()?;
    if config.api_listen.is_some() != listeners.api.is_some() {
        return Err(config::ConfigError::Invalid {
            flag: "api-listen",
            reason: "the API listener must be bound exactly when --api-listen is set".into(),
        }
        .into());
    }
    metrics::init();
    if config.device_ttl < config.position_check * 3 {
        // A connected device is seen at each position check: one that only listens stops
        // holding its inbox between two checks.
        tracing::warn!(
            device_ttl = ?config.device_ttl,
            position_check = ?config.position_check,
            "--device-ttl is under three --position-check intervals: a connected device that does \
             not acknowledge may stop holding its inbox and be told of gaps"
        );
    }
    if config.dev && !config.dev_token_enabled() {
        tracing::info!("--dev with a configured JWT key: /dev/token is off (404)");
    }
    let auth = auth::Authenticator::from_config(&config)?;
    let api = api::Api::from_config(&config)?;
    let engine = build_engine(&config).await?;
    let store_up = check_eviction(engine.as_ref(), &config).await?;
    let hub = Hub::new(
        engine.clone(),
        HubOptions {
            session_queue: config.outbound_queue,
        },
    );
    let catchups = Arc::new(tokio::sync::Semaphore::new(config.max_catchup_reads));
    let addresses = addresses::Addresses::new(
        config.max_connections_per_address,
        config.trusted_proxies.clone(),
    );
    let unauthenticated = Arc::new(tokio::sync::Semaphore::new(config.max_unauthenticated));
    let users = users::Users::new(
        config.max_connections_per_user,
        config.send_rate,
        config.send_burst,
        config.store_bytes_rate,
        engine.shares_quota().then(|| engine.clone()),
    );
    let node = Arc::new(node::Node {
        node_id: config.node_id(),
        config,
        engine,
        hub,
        auth,
        draining: shutdown.clone(),
        store: tokio::sync::watch::Sender::new(store_watch::StoreHealth {
            up: store_up,
            ..store_watch::StoreHealth::default()
        }),
        admission: Arc::default(),
        catchups,
        users,
        addresses,
        unauthenticated,
    });
    let Listeners {
        ws: listener,
        admin: admin_listener,
        api: api_listener,
    } = listeners;
    tracing::info!(
        node = %node.node_id,
        engine = node.engine.name(),
        listen = ?listener.local_addr().ok(),
        admin = ?admin_listener.local_addr().ok(),
        api = ?api_listener.as_ref().and_then(|l| l.local_addr().ok()),
        "gateway serving"
    );

    // Every connection's and session's span is a child of this one, so each log line names
    // the node.
    let span = tracing::info_span!("gateway", node = %node.node_id);
    // The admin listener and the store watchdog outlive the drain, so readiness reports it and
    // sessions still waiting for their turn can leave a node that lost its store.
    let after_drain = CancellationToken::new();
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        node.clone(),
        after_drain.clone(),
    ));
    let watchdog = tokio::spawn(tracing::Instrument::instrument(
        store_watch::run(node.clone(), after_drain.clone()),
        span.clone(),
    ));
    let admission = tokio::spawn(admission::run(node.admission.clone(), after_drain.clone()));
    // The API stops at the drain's start, with the WebSocket listener.
    let api = api_listener.zip(api).map(|(listener, api)| {
        let serve = api::serve(listener, node.clone(), Arc::new(api));
        tokio::spawn(tracing::Instrument::instrument(serve, span.clone()))
    });
    metrics::NODE_INFO
        .with_label_values(&[&node.node_id])
        .set(1);
    let max_connections = i64::try_from(node.config.max_connections).unwrap_or(i64::MAX);
    metrics::CONNECTIONS_MAX.set(max_connections);
    let tracker = TaskTracker::new();
    tracing::Instrument::instrument(
        server::accept_loop(listener, node.clone(), tracker.clone()),
        span,
    )
    .await;

    metrics::DRAINS.inc();
    tracing::info!(sessions = tracker.len(), "draining");
    tracker.close();
    let window = node.config.drain_timeout + DRAIN_MARGIN;
    if tokio::time::timeout(window, tracker.wait()).await.is_err() {
        tracing::warn!(
            left = tracker.len(),
            "drain window passed with sessions still open"
        );
    }
    if let Some(api) = api {
        let _ = api.await;
    }
    after_drain.cancel();
    let _ = admin.await;
    let _ = watchdog.await;
    let _ = admission.await;
    tracing::info!("drained");
    Ok(())
}
