//! The load run: connect every user, send the schedule, drain, close, verify, report.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::bail;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::send::SendPolicy;
use super::user::{RunShared, run_user};
use super::{ProcChange, ProcWatch, patience, unix_ms};
use crate::clients::{ConnectStats, Connector};
use crate::config::{LoadConfig, OnRateLimited};
use crate::procstat::CpuPerMessage;
use crate::report::{LostMessage, Report};
use crate::schedule::{Routing, Schedule, mix};
use crate::timeline::Timeline;
use crate::verify::{Receiver, Verifier};

/// Time between the last connection and the first scheduled message.
const LEAD: Duration = Duration::from_millis(200);
/// How often the drain looks whether everything arrived.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// Limit on the users' closing after the drain.
const CLOSE_WITHIN: Duration = Duration::from_secs(30);

/// Runs a load run and verifies it: see [`LoadConfig`]. An error means the run could not be
/// carried out (bad settings, connections refused); what the run found is in the [`Report`].
pub async fn run_load(config: LoadConfig) -> anyhow::Result<Report> {
    config.validate()?;
    let watch = ProcWatch::start(&config.target);
    let (run, connected, mut tasks) = start(&config).await?;
    // CPU per message counts from the first scheduled send to the end of the drain.
    tokio::time::sleep_until(run.schedule.t0).await;
    let window = ProcWatch::start(&config.target);
    tokio::time::sleep_until(run.schedule.end()).await;
    let (drained, drain_secs) = drain(&run, config.drain).await;
    let in_window = window.finish();
    let cpu = CpuPerMessage::new(
        run.verifier.stats.unique_delivered.load(Relaxed),
        in_window.gateway.as_ref(),
        in_window.redis.as_ref(),
        in_window.loadgen.as_ref(),
        in_window.secs,
    );
    run.stop.cancel();
    let closing = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_WITHIN, closing).await.is_err() {
        tracing::warn!("users still closing after {CLOSE_WITHIN:?}; reporting without them");
    }
    let outcome = Outcome {
        connected,
        drained,
        drain_secs,
        procs: watch.finish(),
        cpu,
    };
    Ok(report(&config, &run, outcome))
}

/// Connects every user and starts their tasks; sending begins at `t0`, shortly after.
async fn start(
    config: &LoadConfig,
) -> anyhow::Result<(Arc<RunShared>, ConnectStats, JoinSet<Receiver>)> {
    let target = &config.target;
    let count = config.connections;
    let users: Vec<Arc<str>> = (0..count).map(|n| Arc::from(target.user_id(n))).collect();
    let mut connector = Connector::new(target, config.ack_interval, config.send_timeout);
    if config.on_rate_limited == OnRateLimited::GiveUp {
        // Refused messages are given up, and the others stay on their schedule: the pushback
        // shows in what is refused, not in how late the rest is.
        connector = connector.open_loop();
    }
    let connector = Arc::new(connector);
    let named = users.iter().map(|u| u.to_string()).enumerate().collect();
    let (conns, connected) = connector.connect_all(named, patience(target)).await;
    if connected.failed > 0 {
        bail!(
            "{} of {count} connections failed; the first: {}",
            connected.failed,
            connected.first_error.unwrap_or_default()
        );
    }
    let conns = conns.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let t0 = Instant::now() + LEAD;
    let total = config.total_messages();
    let routing = Routing::Load {
        connections: count as u64,
        pattern: config.pattern,
        seed: config.seed,
    };
    let schedule = Schedule::new(t0, config.rate, total);
    let run = Arc::new(RunShared {
        verifier: Verifier::new(total, count, routing, users.clone(), t0)
            .with_timeline(timeline(config, &schedule)),
        schedule,
        users,
        body_bytes: config.body_bytes,
        max_in_flight: config.max_in_flight,
        send_policy: SendPolicy {
            on_rate_limited: config.on_rate_limited,
            timeout: config.send_timeout,
        },
        offline_window: config.offline.map(|o| (t0 + o.at, t0 + o.at + o.duration)),
        connector,
        stop: CancellationToken::new(),
    });
    let offline = offline_users(config);
    let mut tasks = JoinSet::new();
    for (n, conn) in conns.into_iter().enumerate() {
        tasks.spawn(run_user(Arc::clone(&run), n, conn, offline[n]));
    }
    Ok((run, connected, tasks))
}

/// A timeline over the sending window, counting per second until the users must have closed.
fn timeline(config: &LoadConfig, schedule: &Schedule) -> Timeline {
    let whole = config.duration + config.drain + CLOSE_WITHIN + LEAD;
    let seconds = usize::try_from(whole.as_secs() + 2).unwrap_or(usize::MAX);
    Timeline::new(schedule.offset_ns(schedule.total), seconds)
}

/// Waits until sending is over and every answered message arrived (or `limit` passed):
/// whether it did, and how long it took. The user tasks may still be handing out the last
/// messages due when the schedule ends: until they have, nothing is settled.
async fn drain(run: &RunShared, limit: Duration) -> (bool, f64) {
    let start = Instant::now();
    let drained = loop {
        if run.sending_over() && run.verifier.settled() {
            break true;
        }
        if start.elapsed() >= limit {
            break false;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    (drained, start.elapsed().as_secs_f64())
}

/// What the run observed besides the verifier's counts.
struct Outcome {
    connected: ConnectStats,
    drained: bool,
    drain_secs: f64,
    /// From before connecting to after closing.
    procs: ProcChange,
    /// From the first scheduled send to the end of the drain.
    cpu: CpuPerMessage,
}

fn report(config: &LoadConfig, run: &RunShared, outcome: Outcome) -> Report {
    let Outcome {
        connected,
        drained,
        drain_secs,
        procs,
        cpu,
    } = outcome;
    let (count, total) = (config.connections, run.schedule.total);
    let v = &run.verifier;
    let s = &v.stats;
    let tally = v.tally();
    let per_sec = |n: u64, last_ns: u64| {
        let secs = last_ns as f64 / 1e9;
        if secs > 0.0 { n as f64 / secs } else { 0.0 }
    };
    Report {
        mode: "run",
        run_id: config.target.run_id.clone(),
        connections: count,
        connected: connected.ok,
        connect_failed: connected.failed,
        connect_secs: connected.secs,
        codec: config.target.codec,
        ack_interval_ms: config.ack_interval.as_secs_f64() * 1e3,
        max_in_flight: config.max_in_flight,
        on_rate_limited: config.on_rate_limited,
        rate_target: config.rate,
        duration_secs: config.duration.as_secs_f64(),
        body_bytes: config.body_bytes,
        pattern: config.pattern,
        offline_users: offline_users(config).iter().filter(|&&o| o).count(),
        scheduled: total,
        skipped_offline: s.skipped_offline.load(Relaxed),
        dispatched: s.dispatched.load(Relaxed),
        not_dispatched: total
            .saturating_sub(s.dispatched.load(Relaxed))
            .saturating_sub(s.skipped_offline.load(Relaxed)),
        sent: s.sent_ok.load(Relaxed),
        sent_duplicate: s.sent_duplicate.load(Relaxed),
        rate_limited: s.rate_limited.load(Relaxed),
        sends_refused: s.sends_refused.load(Relaxed),
        send_errors: s.send_errors(),
        t0_unix_ms: unix_ms(v.t0),
        delivered: tally.delivered,
        lost: tally.lost,
        lost_reported: tally.lost_reported,
        lost_unreported: tally.lost_unreported,
        lost_first_answered_ms: tally.lost_first_answered_ms,
        lost_last_answered_ms: tally.lost_last_answered_ms,
        users_reset: v.recipients.users_reset(),
        lost_offline: tally.lost_offline,
        lost_offline_users: tally
            .lost_offline_recipients
            .iter()
            .map(|&n| run.users[n].to_string())
            .collect(),
        duplicates: tally.duplicates,
        duplicates_within_epoch: tally.duplicates_within_epoch,
        duplicates_across_reset: tally.duplicates_across_reset,
        duplicates_dropped_by_seq: None,
        out_of_order: s.out_of_order.load(Relaxed),
        seq_mismatch: tally.seq_mismatch,
        unconfirmed_delivered: tally.unconfirmed,
        foreign: s.foreign.load(Relaxed),
        resets: s.resets.load(Relaxed),
        disconnects: s.disconnects.load(Relaxed),
        resumes: s.resumes.load(Relaxed),
        reconnect_requests: s.reconnect_requests.load(Relaxed),
        reconnect_failures: s.connect_failures.load(Relaxed),
        event_errors: s.event_errors(),
        drained,
        drain_secs,
        sent_per_sec: per_sec(s.sent_ok.load(Relaxed), s.last_sent_ns.load(Relaxed)),
        delivered_per_sec: per_sec(
            s.unique_delivered.load(Relaxed),
            s.last_delivery_ns.load(Relaxed),
        ),
        pace: v.timeline.pace(),
        latency_sent: v.sent_latency.summary(),
        latency_delivery: v.delivery_latency.summary(),
        dispatch_lag: v.dispatch_lag.summary(),
        cpu_per_message: cpu,
        gateway: procs.gateway,
        redis: procs.redis,
        loadgen: procs.loadgen,
        lost_examples: tally.lost_examples,
        lost_unreported_examples: tally
            .lost_unreported_examples
            .iter()
            .map(|l| LostMessage {
                id: l.k.to_string(),
                from: run.users[v.routing.sender(l.k)].to_string(),
                to: run.users[v.routing.recipient(l.k)].to_string(),
                seq: l.seq,
                answered_ms: l.answered_ms,
            })
            .collect(),
        allow_reported_loss: config.allow_reported_loss,
    }
}

/// Which users go offline: the `fraction` of them that a seeded hash ranks first.
fn offline_users(config: &LoadConfig) -> Vec<bool> {
    let count = config.connections;
    let mut offline = vec![false; count];
    let Some(o) = &config.offline else {
        return offline;
    };
    let wanted = ((o.fraction * count as f64).round() as usize).min(count);
    let mut ranked: Vec<usize> = (0..count).collect();
    ranked.sort_by_key(|&n| mix(config.seed ^ (n as u64).rotate_left(32)));
    for &n in &ranked[..wanted] {
        offline[n] = true;
    }
    offline
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Auth, Offline, Target};

    #[test]
    fn the_offline_fraction_is_exact_and_seeded() {
        let mut config = LoadConfig::new(Target::new("ws://h:1/v1/ws", Auth::DevEndpoint));
        config.connections = 200;
        assert!(offline_users(&config).iter().all(|&o| !o));
        config.offline = Some(Offline {
            fraction: 0.25,
            at: Duration::ZERO,
            duration: Duration::ZERO,
        });
        let a = offline_users(&config);
        assert_eq!(a.iter().filter(|&&o| o).count(), 50);
        assert_eq!(a, offline_users(&config));
        config.seed ^= 1;
        assert_ne!(a, offline_users(&config));
    }
}
