//! What a run found: one report per mode, printed as a human summary (`Display`) or as one JSON
//! object, and the list of failures that makes the exit code non-zero.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::config::{ClientCodec, OnRateLimited, Pattern};
use crate::latency::Percentiles;
use crate::procstat::{CpuPerMessage, ProcDelta};
use crate::timeline::Pace;

/// The result of a load run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub run_id: String,
    pub connections: usize,
    pub connected: usize,
    pub connect_failed: usize,
    pub connect_secs: f64,
    /// The subprotocol the clients spoke.
    pub codec: ClientCodec,
    /// The clients' ack coalescing interval (0: every delivery acknowledged at once).
    pub ack_interval_ms: f64,
    /// Sends without an answer allowed per connection (0: no limit).
    pub max_in_flight: usize,
    /// What senders did with a `rate_limited` answer.
    pub on_rate_limited: OnRateLimited,
    pub rate_target: f64,
    pub duration_secs: f64,
    pub body_bytes: usize,
    pub pattern: Pattern,
    /// Users that went offline for part of the run.
    pub offline_users: usize,
    /// Messages in the schedule.
    pub scheduled: u64,
    /// Scheduled while their sender was offline, so never sent.
    pub skipped_offline: u64,
    /// Sends handed to a client.
    pub dispatched: u64,
    /// Scheduled but still held back by `--max-in-flight` when sending ended (the gateway did
    /// not keep up with the rate), so never sent.
    pub not_dispatched: u64,
    /// Sends answered `sent`.
    pub sent: u64,
    /// Of those, answered `duplicate: true` (a retry found it stored).
    pub sent_duplicate: u64,
    /// `rate_limited` answers, every attempt's: how often the gateway pushed a send back.
    pub rate_limited: u64,
    /// Sends that ended with an `error` answer instead of `sent` (with `--on-rate-limited
    /// give-up`, the `rate_limited` ones among them): refused, never stored, never lost.
    pub sends_refused: u64,
    /// Sends that got no `sent`, by protocol code or client-side reason.
    pub send_errors: BTreeMap<String, u64>,
    /// Unix time (ms) of the run's `t0`, the start of sending: `*_ms` times count from it.
    pub t0_unix_ms: u64,
    /// Messages answered `sent` that their recipient received.
    pub delivered: u64,
    /// Messages answered `sent` that their recipient had not received when the run ended
    /// (after the drain; if the drain timed out, `drained` is false and this includes messages
    /// still waiting in their inboxes). `lost_reported + lost_unreported`.
    pub lost: u64,
    /// Lost, and their recipient got a `reset` after the `sent` answer: the loss was reported.
    pub lost_reported: u64,
    /// Lost without a later `reset` of their recipient: lost in silence.
    pub lost_unreported: u64,
    /// The earliest `sent` answer of any lost message, ms after `t0` (`null` if none was
    /// lost): every message answered `sent` before it was delivered.
    pub lost_first_answered_ms: Option<u32>,
    /// The latest `sent` answer of any lost message, ms after `t0` (`null` if none was lost):
    /// every message answered `sent` after it was delivered.
    pub lost_last_answered_ms: Option<u32>,
    /// Users that got a `reset` (their position was void: the store lost their inbox's state).
    pub users_reset: usize,
    /// Lost messages answered while their recipient was offline: no session of the recipient
    /// saw them go, so only the server's own checks can have reported them (the audit after a
    /// store restart or failover, or a new epoch).
    pub lost_offline: u64,
    /// The recipients of those.
    pub lost_offline_users: Vec<String>,
    /// Extra deliveries of one message (same `from` and `id`) to the application:
    /// `duplicates_within_epoch + duplicates_across_reset`.
    pub duplicates: u64,
    /// Extra deliveries with no `reset` of the recipient since the previous one: the message
    /// was stored twice, or delivered twice in one epoch.
    pub duplicates_within_epoch: u64,
    /// Extra deliveries after a `reset` of the recipient: the new epoch's replay of what the
    /// client had before, which the protocol allows.
    pub duplicates_across_reset: u64,
    /// Duplicate seqs dropped by the client before the application: not exposed by the Rust
    /// client, so `null`.
    pub duplicates_dropped_by_seq: Option<u64>,
    /// Deliveries whose seq was not the one after the previous delivery on that user's
    /// connection (a skipped or reordered seq), within an epoch: the first delivery after a
    /// `reset` may have any seq.
    pub out_of_order: u64,
    /// Messages delivered at a seq other than the one their `sent` named.
    pub seq_mismatch: u64,
    /// Delivered although the send got no `sent` (outcome unknown, yet stored).
    pub unconfirmed_delivered: u64,
    /// Messages that were not this run's, or reached the wrong user.
    pub foreign: u64,
    pub resets: u64,
    /// Connections that ended other than by this run closing them.
    pub disconnects: u64,
    /// `welcome`s after a user's first (client reconnects and offline returns).
    pub resumes: u64,
    pub reconnect_requests: u64,
    pub reconnect_failures: u64,
    /// `error` events not tied to a send, by code.
    pub event_errors: BTreeMap<String, u64>,
    /// Every answered message arrived before the drain timeout, or was reported lost through a
    /// `reset` at least a second before it (time for the reset's replay).
    pub drained: bool,
    pub drain_secs: f64,
    /// `sent` answers per second, from the start of sending to the last answer.
    pub sent_per_sec: f64,
    /// Deliveries per second, from the start of sending to the last delivery.
    pub delivered_per_sec: f64,
    /// Deliveries and `sent` answers while sending was on, and per second.
    #[serde(flatten)]
    pub pace: Pace,
    /// Scheduled send time → `sent` answer.
    pub latency_sent: Percentiles,
    /// Scheduled send time → delivery to the recipient.
    pub latency_delivery: Percentiles,
    /// Scheduled send time → handed to the client: the generator's own lag.
    pub dispatch_lag: Percentiles,
    /// CPU per delivered message, from the first scheduled send to the end of the drain.
    pub cpu_per_message: CpuPerMessage,
    /// From before connecting to after closing.
    pub gateway: Option<ProcDelta>,
    pub redis: Option<ProcDelta>,
    /// This process (it shares the machine with the gateway).
    pub loadgen: Option<ProcDelta>,
    /// A few lost message numbers.
    pub lost_examples: Vec<u64>,
    /// A few messages lost in silence, for a look at the gateway's logs.
    pub lost_unreported_examples: Vec<LostMessage>,
    /// The verdict accepted losses reported through `reset` and replays after one
    /// (`--allow-reported-loss`).
    pub allow_reported_loss: bool,
}

/// One lost message.
#[derive(Debug, Clone, Serialize)]
pub struct LostMessage {
    /// The message's `id` (its number in the run).
    pub id: String,
    pub from: String,
    pub to: String,
    /// The seq its `sent` named.
    pub seq: u64,
    /// When `sent` arrived, ms after `t0`.
    pub answered_ms: u32,
}

/// The result of a connection ramp.
#[derive(Debug, Clone, Serialize)]
pub struct RampReport {
    pub mode: &'static str,
    pub run_id: String,
    pub connections: usize,
    pub connected: usize,
    pub connect_failed: usize,
    pub first_error: Option<String>,
    pub steps: Vec<RampStep>,
    pub gateway_rss_before: Option<u64>,
    pub gateway_rss_after: Option<u64>,
    /// Gateway RSS growth ÷ connections open, bytes.
    pub gateway_bytes_per_connection: Option<f64>,
    /// The load generator's own RSS growth ÷ connections, bytes.
    pub loadgen_bytes_per_connection: f64,
    pub gateway: Option<ProcDelta>,
}

/// One step of a ramp.
#[derive(Debug, Clone, Serialize)]
pub struct RampStep {
    /// Connections open after this step.
    pub connections: usize,
    /// Seconds since the ramp started.
    pub secs: f64,
    pub gateway_rss_bytes: Option<u64>,
    pub loadgen_rss_bytes: u64,
}

/// The result of a reconnect storm.
#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    pub mode: &'static str,
    pub run_id: String,
    pub connections: usize,
    pub connected: usize,
    pub senders: usize,
    pub backlog_per_user: usize,
    /// Backlog messages answered `sent` while everyone was down.
    pub stored: u64,
    pub send_errors: BTreeMap<String, u64>,
    pub reconnected: usize,
    pub reconnect_failed: usize,
    pub first_error: Option<String>,
    /// When the storm started (every client reconnecting), Unix time in ms: several
    /// generators storming one cluster are put on one clock by it.
    pub storm_unix_ms: u64,
    /// From the storm's start until the last client got its `welcome`.
    pub resumed_secs: f64,
    /// From the storm's start until the last stored message was delivered.
    pub caught_up_secs: Option<f64>,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub seq_mismatch: u64,
    pub resets: u64,
    pub gateway: Option<ProcDelta>,
    pub redis: Option<ProcDelta>,
}

/// A report that can say what went wrong.
pub trait Verdict: Serialize + fmt::Display {
    /// What failed; empty when the run passed.
    fn failures(&self) -> Vec<String>;
}

fn nonzero(out: &mut Vec<String>, what: &str, n: u64) {
    if n > 0 {
        out.push(format!("{what}: {n}"));
    }
}

impl Verdict for Report {
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.allow_reported_loss {
            nonzero(&mut out, "lost without a reset", self.lost_unreported);
            nonzero(
                &mut out,
                "duplicates within an epoch",
                self.duplicates_within_epoch,
            );
        } else {
            if self.lost > 0 {
                out.push(format!(
                    "lost: {} ({} reported through reset)",
                    self.lost, self.lost_reported
                ));
            }
            nonzero(&mut out, "duplicates", self.duplicates);
        }
        nonzero(&mut out, "out of order", self.out_of_order);
        nonzero(&mut out, "seq mismatch", self.seq_mismatch);
        nonzero(&mut out, "connections failed", self.connect_failed as u64);
        if self.dispatched > 0 && self.sent == 0 {
            // Nothing accepted means nothing to lose: without this a run whose every send was
            // refused (a wrong ACL, a dead store) would pass.
            out.push(format!(
                "no send was answered `sent` ({} dispatched; errors {:?})",
                self.dispatched, self.send_errors
            ));
        }
        if !self.drained {
            out.push(format!(
                "drain timed out after {:.1} s (lost counts messages still waiting in inboxes)",
                self.drain_secs
            ));
        }
        out
    }
}

impl Verdict for RampReport {
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        nonzero(&mut out, "connections failed", self.connect_failed as u64);
        out
    }
}

impl Verdict for StormReport {
    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        nonzero(&mut out, "lost", self.lost);
        nonzero(&mut out, "out of order", self.out_of_order);
        nonzero(&mut out, "duplicates", self.duplicates);
        nonzero(&mut out, "seq mismatch", self.seq_mismatch);
        nonzero(&mut out, "reconnects failed", self.reconnect_failed as u64);
        if self.caught_up_secs.is_none() {
            out.push("not caught up before the timeout".into());
        }
        out
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn proc_line(f: &mut fmt::Formatter<'_>, who: &str, p: &Option<ProcDelta>) -> fmt::Result {
    match p {
        Some(p) => writeln!(
            f,
            "{who:<9} pid {}: RSS {:.1} → {:.1} MiB, CPU {:.2} s ({:.2} cores)",
            p.pid,
            mib(p.before.rss_bytes),
            mib(p.after.rss_bytes),
            p.cpu_secs,
            p.cores
        ),
        None => Ok(()),
    }
}

fn us(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), |v| format!("{v:.1}"))
}

fn latency_line(f: &mut fmt::Formatter<'_>, what: &str, p: &Percentiles) -> fmt::Result {
    writeln!(
        f,
        "{what:<9} ms  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  ({} samples)",
        p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms, p.count
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "run {}: {} connections ({} failed, {:.1} s to connect), {:.0} msg/s for {:.0} s, \
             {} B bodies, {:?}, {} offline",
            self.run_id,
            self.connected,
            self.connect_failed,
            self.connect_secs,
            self.rate_target,
            self.duration_secs,
            self.body_bytes,
            self.pattern,
            self.offline_users
        )?;
        writeln!(
            f,
            "clients   {:?}, acks every {} ms, {} in flight per connection, \
             rate_limited: {:?}",
            self.codec,
            self.ack_interval_ms,
            match self.max_in_flight {
                0 => "no limit on sends".to_owned(),
                n => format!("at most {n} sends"),
            },
            self.on_rate_limited
        )?;
        writeln!(
            f,
            "messages  scheduled {}  skipped (sender offline) {}  not sent (behind schedule) {}  \
             sent {} ({} duplicate)  delivered {}",
            self.scheduled,
            self.skipped_offline,
            self.not_dispatched,
            self.sent,
            self.sent_duplicate,
            self.delivered
        )?;
        writeln!(
            f,
            "verify    lost {}  duplicates {}  out of order {}  seq mismatch {}  \
             unconfirmed {}  foreign {}  (drained: {}, {:.1} s)",
            self.lost,
            self.duplicates,
            self.out_of_order,
            self.seq_mismatch,
            self.unconfirmed_delivered,
            self.foreign,
            self.drained,
            self.drain_secs
        )?;
        writeln!(
            f,
            "resets    {} ({} users)  lost reported {}  lost silently {}  \
             duplicates after a reset {}  within an epoch {}{}",
            self.resets,
            self.users_reset,
            self.lost_reported,
            self.lost_unreported,
            self.duplicates_across_reset,
            self.duplicates_within_epoch,
            if self.allow_reported_loss {
                "  (reported losses allowed)"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "errors    send {:?}  events {:?}  disconnects {}  resumes {}",
            self.send_errors, self.event_errors, self.disconnects, self.resumes
        )?;
        writeln!(
            f,
            "pushback  rate_limited answers {}  sends refused {}",
            self.rate_limited, self.sends_refused
        )?;
        writeln!(
            f,
            "rate      sent {:.0} msg/s  delivered {:.0} msg/s (whole run); during sending \
             ({:.1} s): sent {:.0} msg/s, delivered {:.0} msg/s",
            self.sent_per_sec,
            self.delivered_per_sec,
            self.pace.sending_secs,
            self.pace.sent_per_sec_during_sending,
            self.pace.delivered_per_sec_during_sending
        )?;
        latency_line(f, "sent", &self.latency_sent)?;
        latency_line(f, "delivery", &self.latency_delivery)?;
        latency_line(f, "dispatch", &self.dispatch_lag)?;
        let c = &self.cpu_per_message;
        writeln!(
            f,
            "cpu/msg   gateway {} µs  redis {} µs  loadgen {} µs  ({} delivered in {:.1} s \
             from the first send to the end of the drain)",
            us(c.gateway_us),
            us(c.redis_us),
            us(c.loadgen_us),
            c.delivered,
            c.window_secs
        )?;
        proc_line(f, "gateway", &self.gateway)?;
        proc_line(f, "redis", &self.redis)?;
        proc_line(f, "loadgen", &self.loadgen)
    }
}

impl fmt::Display for RampReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ramp {}: {} of {} connections open ({} failed{})",
            self.run_id,
            self.connected,
            self.connections,
            self.connect_failed,
            self.first_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )?;
        for step in &self.steps {
            writeln!(
                f,
                "  {:>7} connections at {:>6.1} s: gateway RSS {} MiB, loadgen RSS {:.1} MiB",
                step.connections,
                step.secs,
                step.gateway_rss_bytes
                    .map(|b| format!("{:.1}", mib(b)))
                    .unwrap_or_else(|| "?".into()),
                mib(step.loadgen_rss_bytes)
            )?;
        }
        match self.gateway_bytes_per_connection {
            Some(b) => writeln!(
                f,
                "gateway   {:.0} bytes ({:.2} KiB) of RSS per idle authenticated connection",
                b,
                b / 1024.0
            )?,
            None => writeln!(f, "gateway   RSS not sampled (no --gateway-pid)")?,
        }
        writeln!(
            f,
            "loadgen   {:.0} bytes of RSS per client",
            self.loadgen_bytes_per_connection
        )?;
        proc_line(f, "gateway", &self.gateway)
    }
}

impl fmt::Display for StormReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "storm {}: {} clients ({} connected), {} messages stored for them while down \
             ({} per client, {} senders)",
            self.run_id,
            self.connections,
            self.connected,
            self.stored,
            self.backlog_per_user,
            self.senders
        )?;
        writeln!(
            f,
            "resume    {} reconnected ({} failed) in {:.2} s; caught up in {}",
            self.reconnected,
            self.reconnect_failed,
            self.resumed_secs,
            self.caught_up_secs
                .map(|s| format!("{s:.2} s"))
                .unwrap_or_else(|| "— (timeout)".into())
        )?;
        writeln!(
            f,
            "verify    delivered {}  lost {}  duplicates {}  out of order {}  seq mismatch {}  \
             resets {}  send errors {:?}",
            self.delivered,
            self.lost,
            self.duplicates,
            self.out_of_order,
            self.seq_mismatch,
            self.resets,
            self.send_errors
        )?;
        proc_line(f, "gateway", &self.gateway)?;
        proc_line(f, "redis", &self.redis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_is_strict_unless_reported_losses_are_allowed() {
        let reported = Report {
            drained: true,
            lost: 3,
            lost_reported: 3,
            duplicates: 2,
            duplicates_across_reset: 2,
            ..Report::default()
        };
        assert_eq!(
            reported.failures(),
            ["lost: 3 (3 reported through reset)", "duplicates: 2"]
        );
        let allowed = Report {
            allow_reported_loss: true,
            ..reported.clone()
        };
        assert!(allowed.failures().is_empty(), "{:?}", allowed.failures());
        let silent = Report {
            lost: 4,
            lost_unreported: 1,
            ..allowed.clone()
        };
        assert_eq!(silent.failures(), ["lost without a reset: 1"]);
        let twice = Report {
            duplicates: 3,
            duplicates_within_epoch: 1,
            out_of_order: 1,
            ..allowed.clone()
        };
        assert_eq!(
            twice.failures(),
            ["duplicates within an epoch: 1", "out of order: 1"]
        );
        let stuck = Report {
            drained: false,
            ..allowed
        };
        assert_eq!(stuck.failures().len(), 1);
    }

    #[test]
    fn a_run_where_nothing_was_accepted_fails() {
        let refused = Report {
            drained: true,
            dispatched: 1100,
            sent: 0,
            send_errors: BTreeMap::from([("internal".to_string(), 1100)]),
            ..Report::default()
        };
        assert_eq!(refused.failures().len(), 1, "{:?}", refused.failures());
        assert!(refused.failures()[0].contains("no send was answered `sent`"));
        let idle = Report {
            drained: true,
            ..Report::default()
        };
        assert!(
            idle.failures().is_empty(),
            "nothing dispatched, nothing to judge"
        );
    }
}
