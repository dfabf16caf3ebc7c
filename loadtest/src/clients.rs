//! Opening many client connections: a token and a config per user (URL and source address
//! spread by user number), bounded concurrency, and retries of refusals that may pass later.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use ferry_shared::client::{Client, ClientConfig, Events};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::auth::Tokens;
use crate::config::Target;

/// Events buffered per client before its driver stops reading.
const EVENT_CAPACITY: usize = 1024;
/// First and longest wait between two connection attempts of one user.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// One connected user.
pub(crate) struct Conn {
    /// What it connected with; a reconnect copies it with a resume point.
    pub config: ClientConfig,
    pub client: Client,
    pub events: Events,
}

/// How connecting a batch went.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectStats {
    pub ok: usize,
    pub failed: usize,
    pub secs: f64,
    /// The first failure, to show why.
    pub first_error: Option<String>,
}

/// Builds client configs and opens connections for one run.
pub(crate) struct Connector {
    target: Target,
    tokens: Tokens,
    ack_interval: Duration,
    send_timeout: Duration,
    /// Whether clients hold their sends after `rate_limited` (the Rust client's default); off
    /// for an open-loop run that gives refused messages up.
    hold_sends: bool,
}

impl Connector {
    /// Clients that do not hold their sends after `rate_limited`: they keep sending on their
    /// schedule, as an open-loop generator does.
    pub(crate) fn open_loop(mut self) -> Self {
        self.hold_sends = false;
        self
    }

    pub(crate) fn new(target: &Target, ack_interval: Duration, send_timeout: Duration) -> Self {
        Connector {
            target: target.clone(),
            tokens: Tokens::new(&target.auth),
            ack_interval,
            send_timeout,
            hold_sends: true,
        }
    }

    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// The config of user `name`, connection number `n` (which picks URL and source address).
    pub(crate) async fn config_for(&self, n: usize, name: &str) -> anyhow::Result<ClientConfig> {
        let url = self.target.url_for(n);
        let token = self.tokens.token(url, name).await?;
        Ok(ClientConfig {
            codec: self.target.codec.codec(),
            ack_interval: self.ack_interval,
            hold_sends_on_rate_limited: self.hold_sends,
            local_addr: self.target.source_for(n),
            connect_timeout: self.target.connect_timeout,
            send_timeout: Some(self.send_timeout),
            event_capacity: EVENT_CAPACITY,
            backoff_min: RETRY_MIN,
            backoff_max: Duration::from_secs(2),
            ..ClientConfig::new(url, token)
        })
    }

    /// Connects with `config`, retrying failures that may pass (refused, overloaded, timed
    /// out) until `give_up_at`.
    pub(crate) async fn connect(
        &self,
        config: &ClientConfig,
        give_up_at: Instant,
    ) -> anyhow::Result<(Client, Events)> {
        let mut wait = RETRY_MIN;
        loop {
            let error = match Client::connect(config.clone()).await {
                Ok(connected) => return Ok(connected),
                Err(e) => e,
            };
            if error.is_permanent() || Instant::now() + wait > give_up_at {
                bail!("connecting {}: {error}", config.url);
            }
            tracing::debug!(%error, ?wait, "connect failed, retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// Connects every `(n, name)` with at most the target's concurrency at once, each retrying
    /// for up to `patience` from its turn; the results in the order given.
    pub(crate) async fn connect_all(
        self: &Arc<Self>,
        users: Vec<(usize, String)>,
        patience: Duration,
    ) -> (Vec<anyhow::Result<Conn>>, ConnectStats) {
        let started = Instant::now();
        let permits = Arc::new(Semaphore::new(self.target.connect_concurrency));
        let mut tasks = JoinSet::new();
        let count = users.len();
        for (slot, (n, name)) in users.into_iter().enumerate() {
            let (me, permits) = (Arc::clone(self), Arc::clone(&permits));
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let give_up_at = Instant::now() + patience;
                let result = async {
                    let config = me.config_for(n, &name).await?;
                    let (client, events) = me.connect(&config, give_up_at).await?;
                    Ok(Conn {
                        config,
                        client,
                        events,
                    })
                }
                .await;
                (slot, result)
            });
        }
        let mut results: Vec<Option<anyhow::Result<Conn>>> = (0..count).map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((slot, result)) => results[slot] = Some(result),
                Err(e) => tracing::error!(error = %e, "a connect task failed"),
            }
        }
        let results: Vec<_> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("connect task failed"))))
            .collect();
        let mut stats = ConnectStats {
            secs: started.elapsed().as_secs_f64(),
            ..ConnectStats::default()
        };
        for result in &results {
            match result {
                Ok(_) => stats.ok += 1,
                Err(e) => {
                    stats.failed += 1;
                    stats.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        (results, stats)
    }
}
