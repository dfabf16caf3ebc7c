//! What a load run is asked to do: the typed settings of every mode, built by the CLI or by a
//! test, and checked before any connection is opened.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure};
use serde::Serialize;

/// How the load generator gets a token for each of its users.
#[derive(Clone)]
pub enum Auth {
    /// Mint HS256 tokens with the gateway's `--jwt-secret`.
    Secret(String),
    /// Ask a `--dev` gateway's `GET /dev/token?user=…`.
    DevEndpoint,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::Secret(_) => f.write_str("Secret(<redacted>)"),
            Auth::DevEndpoint => f.write_str("DevEndpoint"),
        }
    }
}

/// Where the clients connect and as whom: shared by every mode.
#[derive(Debug, Clone)]
pub struct Target {
    /// Gateway WebSocket endpoints (`ws://host:port/v1/ws`); user `n` uses `urls[n % len]`.
    pub urls: Vec<String>,
    /// Where tokens come from.
    pub auth: Auth,
    /// Names this run's users (`lt-<run_id>-<n>`), so runs never share inboxes on one Redis.
    pub run_id: String,
    /// Spread connections over the source addresses 127.0.0.1 ..= 127.0.0.N (about 28k
    /// ephemeral ports each); 0 lets the system choose.
    pub source_addrs: u8,
    /// Connections being opened at once.
    pub connect_concurrency: usize,
    /// Limit on one connection attempt (TCP, upgrade, `hello`/`welcome`).
    pub connect_timeout: Duration,
    /// The gateway's process id, for its RSS and CPU time before and after.
    pub gateway_pid: Option<u32>,
    /// Redis's process id, for its CPU time (per delivered message in a load run).
    pub redis_pid: Option<u32>,
    /// The subprotocol every client speaks.
    pub codec: ClientCodec,
}

/// The subprotocol the clients ask for (`ferry.v1.json` or `ferry.v1.msgpack`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClientCodec {
    Json,
    /// The Rust client's default.
    #[default]
    Msgpack,
}

impl ClientCodec {
    pub fn codec(self) -> ferry_shared::Codec {
        match self {
            ClientCodec::Json => ferry_shared::Codec::Json,
            ClientCodec::Msgpack => ferry_shared::Codec::MsgPack,
        }
    }
}

impl Target {
    /// One gateway URL, a fresh random run id, the system's source address, 200 connections
    /// opened at once, 10 s per attempt, MessagePack.
    pub fn new(url: impl Into<String>, auth: Auth) -> Self {
        Target {
            urls: vec![url.into()],
            auth,
            run_id: format!("{:08x}", rand::random::<u32>()),
            source_addrs: 0,
            connect_concurrency: 200,
            connect_timeout: Duration::from_secs(10),
            gateway_pid: None,
            redis_pid: None,
            codec: ClientCodec::Msgpack,
        }
    }

    /// The user id of this run's `n`-th user.
    pub fn user_id(&self, n: usize) -> String {
        format!("lt-{}-{n}", self.run_id)
    }

    /// The gateway URL user `n` connects to.
    pub fn url_for(&self, n: usize) -> &str {
        &self.urls[n % self.urls.len()]
    }

    /// The source address user `n` binds, if addresses are spread.
    pub fn source_for(&self, n: usize) -> Option<IpAddr> {
        let count = usize::from(self.source_addrs);
        (count > 0).then(|| {
            let last = u8::try_from(1 + n % count).unwrap_or(1);
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
        })
    }

    fn validate(&self) -> anyhow::Result<()> {
        ensure!(!self.urls.is_empty(), "at least one --url is needed");
        for url in &self.urls {
            ensure!(
                url.starts_with("ws://"),
                "{url}: URLs must start with ws://"
            );
        }
        ensure!(
            !self.run_id.is_empty() && self.run_id.len() <= 32,
            "the run id must be 1 to 32 characters"
        );
        ensure!(
            self.connect_concurrency > 0,
            "connect concurrency must be at least 1"
        );
        if let Auth::Secret(secret) = &self.auth {
            ensure!(!secret.is_empty(), "the JWT secret is empty");
        }
        Ok(())
    }
}

/// Who each message goes to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// A random other user (fixed by the run's seed, so a run can be repeated).
    #[default]
    Random,
    /// The next user: `n` sends to `n + 1`, the last to the first.
    Ring,
}

/// What a sender does with a `rate_limited` answer (every one is counted either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnRateLimited {
    /// Send again with the same id after the answer's `retry_after_ms` (plus up to as much
    /// again), as the Rust client does; the latency still counts from the scheduled time.
    #[default]
    Retry,
    /// Give the message up: it was pushed back, and counts as refused, never as lost.
    GiveUp,
}

/// A fraction of the users going offline for part of a run.
#[derive(Debug, Clone, Copy)]
pub struct Offline {
    /// Share of the users that go offline, in 0..=1.
    pub fraction: f64,
    /// When they go offline, from the start of sending.
    pub at: Duration,
    /// How long they stay offline; then they reconnect, resuming from the position they held.
    pub duration: Duration,
}

/// A load run (`ferry-loadtest run`, or [`run_load`](crate::run_load)).
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Where to connect, as whom.
    pub target: Target,
    /// Connections, one user each.
    pub connections: usize,
    /// Aggregate send rate, messages per second: message `k` is due at `t0 + k / rate`.
    pub rate: f64,
    /// How long messages are sent.
    pub duration: Duration,
    /// Size of each body in bytes (at least 16: the message number and its scheduled time).
    pub body_bytes: usize,
    /// Who each message goes to.
    pub pattern: Pattern,
    /// The clients' ack coalescing interval: a cumulative `ack` at most this long after a
    /// delivery. Zero acknowledges each delivery at once (within the client's next timer tick,
    /// about a millisecond, so deliveries read in one burst share one cumulative ack).
    pub ack_interval: Duration,
    /// Users offline for part of the run, if any.
    pub offline: Option<Offline>,
    /// After sending stops, the longest wait for every answered message to arrive.
    pub drain: Duration,
    /// Sends without an answer per connection; past it the connection's next sends wait (their
    /// latency still counts from their scheduled time). 0: no limit, every message goes out
    /// at its scheduled time whatever is still unanswered.
    pub max_in_flight: usize,
    /// Limit on one send including the client's retries.
    pub send_timeout: Duration,
    /// What a sender does with a `rate_limited` answer.
    pub on_rate_limited: OnRateLimited,
    /// Seed of the random recipient choice and of who goes offline.
    pub seed: u64,
    /// The verdict accepts messages lost with a `reset` of their recipient after the `sent`
    /// answer, and a message delivered again after such a reset (a fault where the store lost
    /// data is expected to cause both). Silent losses, and duplicates and disorder within an
    /// epoch, still fail the run.
    pub allow_reported_loss: bool,
}

impl LoadConfig {
    /// 100 connections at 1,000 msg/s for 10 s, 100-byte bodies, random recipients, acks every
    /// 100 ms, nobody offline, 10 s drain, at most 1,000 sends in flight per connection,
    /// `rate_limited` sends retried, any loss a failure.
    pub fn new(target: Target) -> Self {
        LoadConfig {
            target,
            connections: 100,
            rate: 1000.0,
            duration: Duration::from_secs(10),
            body_bytes: 100,
            pattern: Pattern::Random,
            ack_interval: Duration::from_millis(100),
            offline: None,
            drain: Duration::from_secs(10),
            max_in_flight: 1000,
            send_timeout: Duration::from_secs(30),
            on_rate_limited: OnRateLimited::Retry,
            seed: rand::random(),
            allow_reported_loss: false,
        }
    }

    /// Messages the schedule holds: `rate × duration`.
    pub fn total_messages(&self) -> u64 {
        (self.rate * self.duration.as_secs_f64()).floor() as u64
    }

    /// Refuses settings the run cannot work with.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.target.validate()?;
        ensure!(self.connections >= 2, "at least 2 connections are needed");
        ensure!(
            self.rate.is_finite() && self.rate > 0.0,
            "the rate must be above 0"
        );
        ensure!(
            self.body_bytes >= crate::schedule::BODY_HEADER,
            "bodies must be at least {} bytes",
            crate::schedule::BODY_HEADER
        );
        ensure!(
            self.total_messages() <= 1 << 30,
            "rate × duration must stay under 2^30 messages"
        );
        if let Some(offline) = &self.offline
            && !(0.0..=1.0).contains(&offline.fraction)
        {
            bail!("the offline fraction must be in 0..=1");
        }
        Ok(())
    }
}

/// A meeting point of several generator processes that share one measurement (connections
/// beyond what one process may hold): each writes its ready file when it gets there, then
/// waits until the go file exists.
#[derive(Debug, Clone)]
pub struct Barrier {
    /// Written (with a short note: what this process holds) on arrival.
    pub ready_file: PathBuf,
    /// Waited for, for at most [`Barrier::WAIT_LIMIT`].
    pub go_file: PathBuf,
}

impl Barrier {
    /// The longest wait for the go file.
    pub const WAIT_LIMIT: Duration = Duration::from_secs(600);
}

/// A connection ramp (`ferry-loadtest ramp`): idle authenticated connections opened in steps,
/// the gateway's RSS sampled after each.
#[derive(Debug, Clone)]
pub struct RampConfig {
    /// Where to connect, as whom.
    pub target: Target,
    /// Connections in all.
    pub connections: usize,
    /// Connections opened per step.
    pub step: usize,
    /// Wait after each step before sampling memory.
    pub settle: Duration,
    /// Where to wait, every connection open, before closing (several processes ramping at
    /// once, memory sampled by whoever holds the go file).
    pub barrier: Option<Barrier>,
}

impl RampConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        self.target.validate()?;
        ensure!(
            self.connections > 0 && self.step > 0,
            "connections and step must be at least 1"
        );
        Ok(())
    }
}

/// A reconnect storm (`ferry-loadtest storm`): every client drops at once, a backlog is stored
/// for each, then all reconnect at once and resume.
#[derive(Debug, Clone)]
pub struct StormConfig {
    /// Where to connect, as whom.
    pub target: Target,
    /// Clients that drop and resume.
    pub connections: usize,
    /// Messages stored for each client while it is down.
    pub backlog: usize,
    /// Extra connections that send the backlog.
    pub senders: usize,
    /// Size of each body in bytes.
    pub body_bytes: usize,
    /// The clients' ack coalescing interval.
    pub ack_interval: Duration,
    /// Longest wait for all to be resumed and caught up.
    pub timeout: Duration,
    /// Sends without an answer per sender connection.
    pub max_in_flight: usize,
    /// Where to wait, the backlog stored and every client down, before all reconnect (several
    /// processes storming one cluster at the same instant).
    pub barrier: Option<Barrier>,
}

impl StormConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        self.target.validate()?;
        ensure!(
            self.connections > 0 && self.senders > 0,
            "connections and senders must be at least 1"
        );
        ensure!(
            self.body_bytes >= crate::schedule::BODY_HEADER,
            "bodies must be at least {} bytes",
            crate::schedule::BODY_HEADER
        );
        ensure!(self.max_in_flight > 0, "max in flight must be at least 1");
        ensure!(
            (self.connections as u64).saturating_mul(self.backlog as u64) <= 1 << 30,
            "connections × backlog must stay under 2^30 messages"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target::new("ws://127.0.0.1:1/v1/ws", Auth::Secret("s".into()))
    }

    #[test]
    fn users_urls_and_sources_are_spread() {
        let mut t = target();
        t.urls.push("ws://127.0.0.1:2/v1/ws".into());
        t.run_id = "r1".into();
        assert_eq!(t.user_id(7), "lt-r1-7");
        assert_eq!(t.url_for(3), "ws://127.0.0.1:2/v1/ws");
        assert_eq!(t.source_for(0), None);
        t.source_addrs = 4;
        assert_eq!(t.source_for(0), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(t.source_for(6), Some("127.0.0.3".parse().unwrap()));
        let secret = Auth::Secret("hunter2-hunter2".into());
        assert!(!format!("{secret:?}").contains("hunter2"));
    }

    #[test]
    fn bad_settings_are_refused() {
        let ok = LoadConfig::new(target());
        assert!(ok.validate().is_ok());
        assert_eq!(ok.total_messages(), 10_000);
        let unbounded = LoadConfig {
            max_in_flight: 0,
            ack_interval: Duration::ZERO,
            ..ok.clone()
        };
        assert!(unbounded.validate().is_ok(), "0 in flight means no limit");
        let bad = [
            LoadConfig {
                connections: 1,
                ..ok.clone()
            },
            LoadConfig {
                body_bytes: 8,
                ..ok.clone()
            },
            LoadConfig {
                rate: 0.0,
                ..ok.clone()
            },
            LoadConfig {
                offline: Some(Offline {
                    fraction: 1.5,
                    at: Duration::ZERO,
                    duration: Duration::ZERO,
                }),
                ..ok.clone()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
        let mut wss = ok.clone();
        wss.target.urls = vec!["wss://h/v1/ws".into()];
        assert!(wss.validate().is_err());
    }
}
