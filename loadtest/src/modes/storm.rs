//! The reconnect storm: every client drops at once, a backlog is stored for each while they are
//! down, then all reconnect at the same moment resuming from their positions; the report says
//! how long until all were resumed (`welcome`) and caught up (every stored message delivered).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use anyhow::bail;
use ferry_shared::client::{ClientConfig, Event, Events};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ProcWatch, meet, patience, unix_ms};
use crate::clients::{Conn, Connector};
use crate::config::StormConfig;
use crate::report::StormReport;
use crate::schedule::{Routing, encode_body};
use crate::verify::{Receiver, Verifier};

/// How often the storm looks whether everyone is resumed and caught up.
const POLL: Duration = Duration::from_millis(5);

/// Runs a reconnect storm: see [`StormConfig`].
pub async fn run_storm(config: StormConfig) -> anyhow::Result<StormReport> {
    config.validate()?;
    let target = &config.target;
    let connector = Arc::new(Connector::new(
        target,
        config.ack_interval,
        Duration::from_secs(30),
    ));
    let watch = ProcWatch::start(target);
    let users: Vec<Arc<str>> = (0..config.connections)
        .map(|n| Arc::from(target.user_id(n)))
        .collect();
    let senders: Vec<Arc<str>> = (0..config.senders)
        .map(|i| Arc::from(format!("lt-{}-s{i}", target.run_id)))
        .collect();
    let (conns, sender_conns) = connect(&connector, &users, &senders).await?;
    let routing = Routing::Storm {
        backlog: config.backlog.max(1) as u64,
        senders: config.senders as u64,
    };
    let total = (config.connections * config.backlog) as u64;
    let v = Arc::new(Verifier::new(
        total,
        users.len(),
        routing,
        senders,
        Instant::now(),
    ));

    // 1. Every client drops at once, keeping its position.
    let (configs, receivers) = drop_all(conns, &v).await;
    // 2. A backlog is stored for each while they are down.
    send_backlog(sender_conns, &users, &v, &config).await;
    if let Some(barrier) = &config.barrier {
        let note = format!("{} {}", users.len(), v.stats.sent_ok.load(Relaxed));
        meet(barrier, &note).await?;
    }
    // 3. All reconnect at once, resuming.
    let storm_unix_ms = unix_ms(Instant::now());
    let storm = resume_all(&connector, configs, receivers, &v, config.timeout).await;

    let procs = watch.finish();
    let tally = v.tally();
    let s = &v.stats;
    Ok(StormReport {
        mode: "storm",
        run_id: target.run_id.clone(),
        connections: config.connections,
        connected: config.connections,
        senders: config.senders,
        backlog_per_user: config.backlog,
        stored: s.sent_ok.load(Relaxed),
        send_errors: s.send_errors(),
        reconnected: storm.reconnected,
        reconnect_failed: storm.failed,
        first_error: storm.first_error,
        storm_unix_ms,
        resumed_secs: storm.resumed_secs,
        caught_up_secs: storm.caught_up_secs,
        delivered: tally.delivered,
        lost: tally.lost,
        duplicates: tally.duplicates,
        out_of_order: s.out_of_order.load(Relaxed),
        seq_mismatch: tally.seq_mismatch,
        resets: s.resets.load(Relaxed),
        gateway: procs.gateway,
        redis: procs.redis,
    })
}

/// Connects the users (numbered from 0) and the senders (numbered after them).
async fn connect(
    connector: &Arc<Connector>,
    users: &[Arc<str>],
    senders: &[Arc<str>],
) -> anyhow::Result<(Vec<Conn>, Vec<Conn>)> {
    let patience = patience(connector.target());
    let named = |names: &[Arc<str>], first: usize| {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| (first + i, name.to_string()))
            .collect()
    };
    let (conns, stats) = connector.connect_all(named(users, 0), patience).await;
    let (sender_conns, sender_stats) = connector
        .connect_all(named(senders, users.len()), patience)
        .await;
    if stats.failed + sender_stats.failed > 0 {
        bail!(
            "{} connections failed; the first: {}",
            stats.failed + sender_stats.failed,
            stats
                .first_error
                .or(sender_stats.first_error)
                .unwrap_or_default()
        );
    }
    Ok((
        conns.into_iter().collect::<anyhow::Result<_>>()?,
        sender_conns.into_iter().collect::<anyhow::Result<_>>()?,
    ))
}

/// How the reconnect went.
struct Storm {
    reconnected: usize,
    failed: usize,
    first_error: Option<String>,
    resumed_secs: f64,
    caught_up_secs: Option<f64>,
}

/// Reconnects every client at the same instant, resuming from `configs`' positions, and waits
/// (up to `timeout`) until all are resumed and every stored message is delivered.
async fn resume_all(
    connector: &Arc<Connector>,
    configs: Vec<ClientConfig>,
    receivers: Vec<Receiver>,
    v: &Arc<Verifier>,
    timeout: Duration,
) -> Storm {
    let count = configs.len();
    let stored = v.stats.sent_ok.load(Relaxed);
    let storm_at = Instant::now();
    let deadline = storm_at + timeout;
    let stop = CancellationToken::new();
    let resumed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let last_welcome_ns = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for (resume, rx) in configs.into_iter().zip(receivers) {
        let (v, connector, stop) = (Arc::clone(v), Arc::clone(connector), stop.clone());
        let (resumed, failed, last_welcome_ns) = (
            Arc::clone(&resumed),
            Arc::clone(&failed),
            Arc::clone(&last_welcome_ns),
        );
        tasks.spawn(async move {
            let (client, mut events) = match connector.connect(&resume, deadline).await {
                Ok(connected) => connected,
                Err(e) => {
                    failed.fetch_add(1, Relaxed);
                    return Some(format!("{e:#}"));
                }
            };
            let at = storm_at.elapsed().as_nanos();
            last_welcome_ns.fetch_max(u64::try_from(at).unwrap_or(u64::MAX), Relaxed);
            resumed.fetch_add(1, Relaxed);
            let rx = receive_until(rx, &mut events, &v, &stop).await;
            client.close().await;
            receive_until(rx, &mut events, &v, &CancellationToken::new()).await;
            None
        });
    }
    let caught_up = loop {
        let everyone = resumed.load(Relaxed) + failed.load(Relaxed) >= count;
        if everyone && v.stats.unique_delivered.load(Relaxed) >= stored {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(POLL).await;
    };
    let since_t0_ns = u64::try_from((storm_at - v.t0).as_nanos()).unwrap_or(0);
    let last_delivery_ns = v.stats.last_delivery_ns.load(Relaxed);
    let resumed_secs = last_welcome_ns.load(Relaxed) as f64 / 1e9;
    let caught_up_secs = caught_up.then(|| {
        let delivered = last_delivery_ns.saturating_sub(since_t0_ns) as f64 / 1e9;
        delivered.max(resumed_secs)
    });
    stop.cancel();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Some(e)) = joined {
            first_error.get_or_insert(e);
        }
    }
    Storm {
        reconnected: resumed.load(Relaxed),
        failed: failed.load(Relaxed),
        first_error,
        resumed_secs,
        caught_up_secs,
    }
}

/// Closes every client at the same moment; each one's config with its resume point, and its
/// receiving side.
async fn drop_all(conns: Vec<Conn>, v: &Arc<Verifier>) -> (Vec<ClientConfig>, Vec<Receiver>) {
    let mut configs = Vec::with_capacity(conns.len());
    let mut clients = Vec::with_capacity(conns.len());
    let mut receiving = JoinSet::new();
    for (n, conn) in conns.into_iter().enumerate() {
        let v = Arc::clone(v);
        let mut events = conn.events;
        receiving.spawn(async move {
            let mut rx = Receiver::new(n);
            while let Some(event) = events.recv().await {
                rx.on_event(&v, event);
            }
            rx
        });
        configs.push(conn.config);
        clients.push(conn.client);
    }
    clients
        .iter()
        .map(|c| c.clone().close())
        .collect::<FuturesUnordered<_>>()
        .collect::<Vec<()>>()
        .await;
    let mut receivers: Vec<Receiver> = Vec::with_capacity(configs.len());
    while let Some(joined) = receiving.join_next().await {
        if let Ok(rx) = joined {
            receivers.push(rx);
        }
    }
    receivers.sort_by_key(|rx| rx.n);
    for (config, client) in configs.iter_mut().zip(&clients) {
        (config.last_seq, config.epoch) = client.position();
    }
    (configs, receivers)
}

/// The senders store `backlog` messages for every user, pipelined; returns when all are
/// answered.
async fn send_backlog(
    senders: Vec<Conn>,
    users: &[Arc<str>],
    v: &Arc<Verifier>,
    config: &StormConfig,
) {
    let total = v.ledger.len();
    let mut tasks = JoinSet::new();
    for (i, conn) in senders.into_iter().enumerate() {
        let (v, users) = (Arc::clone(v), users.to_vec());
        let (body_bytes, max) = (config.body_bytes, config.max_in_flight);
        let step = config.senders as u64;
        tasks.spawn(async move {
            let Conn {
                client, mut events, ..
            } = conn;
            let drain = tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    match event {
                        Event::Disconnected { close_code, reason } if close_code != Some(1000) => {
                            tracing::warn!(sender = i, ?close_code, %reason, "a sender lost its connection");
                        }
                        Event::ConnectFailed { error, will_retry } => {
                            tracing::warn!(sender = i, %error, will_retry, "a sender could not reconnect");
                        }
                        _ => {}
                    }
                }
            });
            let mut inflight = FuturesUnordered::new();
            let mut k = i as u64;
            while k < total || !inflight.is_empty() {
                if k < total && inflight.len() < max {
                    let to = Arc::clone(&users[v.routing.recipient(k)]);
                    let now = Instant::now();
                    let offset = u64::try_from((now - v.t0).as_nanos()).unwrap_or(0);
                    let body = encode_body(k, offset, body_bytes);
                    let client = client.clone();
                    v.stats.in_flight.fetch_add(1, Relaxed);
                    inflight.push(async move {
                        let result = client.send(&to, &k.to_string(), body).await;
                        (k, now, result)
                    });
                    k += step;
                    continue;
                }
                if let Some((k, at, result)) = inflight.next().await {
                    v.on_send(i, k, at, result);
                }
            }
            client.close().await;
            let _ = drain.await;
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Hands `events` to `rx` until the client stops or `stop` is cancelled.
async fn receive_until(
    mut rx: Receiver,
    events: &mut Events,
    v: &Verifier,
    stop: &CancellationToken,
) -> Receiver {
    loop {
        tokio::select! {
            biased;
            event = events.recv() => match event {
                Some(event) => rx.on_event(v, event),
                None => return rx,
            },
            () = stop.cancelled() => return rx,
        }
    }
}
