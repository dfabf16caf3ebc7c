//! The command line: `ferry-loadtest [--json] run|ramp|storm [flags]`, parsed with clap and
//! turned into the typed configs of [`crate::config`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};

use crate::config::{
    Auth, Barrier, ClientCodec, LoadConfig, Offline, OnRateLimited, Pattern, RampConfig,
    StormConfig, Target,
};

/// Ferry's load generator and delivery verifier.
#[derive(Debug, Parser)]
#[command(name = "ferry-loadtest", version, about)]
pub struct Cli {
    /// Print the report as one JSON object instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub mode: Mode,
}

/// What to measure.
#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Send at a fixed rate open loop, then verify every accepted message arrived once, in order.
    Run(RunArgs),
    /// Open idle authenticated connections in steps; report gateway RSS per connection.
    Ramp(RampArgs),
    /// Drop every client at once, store a backlog, reconnect all at once; time to resume and
    /// catch up.
    Storm(StormArgs),
}

/// Where to connect and as whom (every mode).
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// Gateway WebSocket URL; repeat for several gateways (users are spread over them).
    #[arg(long = "url", default_value = "ws://127.0.0.1:8080/v1/ws")]
    pub urls: Vec<String>,

    /// Mint HS256 tokens with this secret (the gateway's --jwt-secret).
    #[arg(
        long,
        env = "FERRY_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "dev"
    )]
    pub jwt_secret: Option<String>,

    /// Fetch tokens from a --dev gateway's /dev/token instead.
    #[arg(long)]
    pub dev: bool,

    /// Names this run's users lt-<run-id>-<n> [default: random].
    #[arg(long)]
    pub run_id: Option<String>,

    /// Spread connections over source addresses 127.0.0.1..=127.0.0.N (0: the system's choice).
    #[arg(long, default_value_t = 0)]
    pub source_addrs: u8,

    /// Connections opened at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,

    /// Limit on one connection attempt.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// The gateway's PID, for its RSS and CPU time (and CPU per delivered message).
    #[arg(long)]
    pub gateway_pid: Option<u32>,

    /// Redis's PID, for its CPU time (and CPU per delivered message).
    #[arg(long)]
    pub redis_pid: Option<u32>,

    /// The subprotocol the clients speak.
    #[arg(long, value_enum, default_value_t = ClientCodec::Msgpack)]
    pub codec: ClientCodec,
}

/// Several generator processes meeting at one point of a ramp or a storm (both or neither).
#[derive(Debug, Args)]
pub struct BarrierArgs {
    /// On reaching the barrier, write this file (what this process holds), then wait for
    /// --go-file.
    #[arg(long, requires = "go_file")]
    pub ready_file: Option<PathBuf>,

    /// Wait at the barrier until this file exists (at most 10 minutes).
    #[arg(long, requires = "ready_file")]
    pub go_file: Option<PathBuf>,
}

impl BarrierArgs {
    fn into_barrier(self) -> Option<Barrier> {
        Some(Barrier {
            ready_file: self.ready_file?,
            go_file: self.go_file?,
        })
    }
}

/// `run`: the load run.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Connections, one user each.
    #[arg(short, long, default_value_t = 1000)]
    pub connections: usize,
    /// Aggregate send rate, messages per second.
    #[arg(short, long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// How long to send.
    #[arg(short, long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Body size in bytes (at least 16).
    #[arg(short, long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Who each message goes to.
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pub pattern: Pattern,
    /// The clients' ack coalescing interval: one cumulative ack at most this long after a
    /// delivery; 0 acknowledges every delivery at once.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub ack_interval: Duration,
    /// Share of the users that go offline for part of the run.
    #[arg(long, default_value_t = 0.0)]
    pub offline_fraction: f64,
    /// When they go offline, from the start of sending.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub offline_at: Duration,
    /// How long they stay offline before resuming.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub offline_for: Duration,
    /// Longest wait, after sending, for every accepted message to arrive.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Sends without an answer per connection; 0: no limit (every message leaves at its
    /// scheduled time).
    #[arg(long, default_value_t = 1000)]
    pub max_in_flight: usize,
    /// Limit on one send, including the client's retries.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub send_timeout: Duration,
    /// What a sender does with a `rate_limited` answer: send again after `retry_after_ms`, or
    /// give the message up (refused). Each answer is counted either way.
    #[arg(long, value_enum, default_value_t = OnRateLimited::Retry)]
    pub on_rate_limited: OnRateLimited,
    /// Seed of the recipient choice and of who goes offline [default: random].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Pass although messages were lost, if each loss was reported to its recipient through a
    /// `reset` after the `sent` answer, and count a message delivered again after a reset as
    /// the new epoch's replay. Losses without a reset, duplicates or disorder within an epoch,
    /// and seq mismatches still fail. For faults where the store loses data.
    #[arg(long)]
    pub allow_reported_loss: bool,
}

/// `ramp`: memory per idle connection.
#[derive(Debug, Args)]
pub struct RampArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Connections in all.
    #[arg(short, long, default_value_t = 10_000)]
    pub connections: usize,
    /// Connections per step.
    #[arg(long, default_value_t = 1000)]
    pub step: usize,
    /// Wait after each step before sampling the gateway's RSS.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Every connection open: wait here before closing.
    #[command(flatten)]
    pub barrier: BarrierArgs,
}

/// `storm`: every client drops and resumes at once.
#[derive(Debug, Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Clients that drop and resume.
    #[arg(short, long, default_value_t = 1000)]
    pub connections: usize,
    /// Messages stored for each client while it is down.
    #[arg(long, default_value_t = 10)]
    pub backlog: usize,
    /// Extra connections that send the backlog.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Body size in bytes (at least 16).
    #[arg(short, long, default_value_t = 100)]
    pub body_bytes: usize,
    /// The clients' ack coalescing interval.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub ack_interval: Duration,
    /// Longest wait for everyone to be resumed and caught up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Sends without an answer per sender connection.
    #[arg(long, default_value_t = 1000)]
    pub max_in_flight: usize,
    /// The backlog stored, every client down: wait here before all reconnect.
    #[command(flatten)]
    pub barrier: BarrierArgs,
}

impl TargetArgs {
    pub fn into_target(self) -> anyhow::Result<Target> {
        let auth = match (self.jwt_secret, self.dev) {
            (Some(secret), _) => Auth::Secret(secret),
            (None, true) => Auth::DevEndpoint,
            (None, false) => bail!("give --jwt-secret (the gateway's) or --dev"),
        };
        let mut target = Target::new(String::new(), auth);
        target.urls = self.urls;
        if let Some(run_id) = self.run_id {
            target.run_id = run_id;
        }
        target.source_addrs = self.source_addrs;
        target.connect_concurrency = self.connect_concurrency;
        target.connect_timeout = self.connect_timeout;
        target.gateway_pid = self.gateway_pid;
        target.redis_pid = self.redis_pid;
        target.codec = self.codec;
        Ok(target)
    }
}

impl RunArgs {
    pub fn into_config(self) -> anyhow::Result<LoadConfig> {
        let mut config = LoadConfig::new(self.target.into_target()?);
        config.connections = self.connections;
        config.rate = self.rate;
        config.duration = self.duration;
        config.body_bytes = self.body_bytes;
        config.pattern = self.pattern;
        config.ack_interval = self.ack_interval;
        config.offline = (self.offline_fraction > 0.0).then_some(Offline {
            fraction: self.offline_fraction,
            at: self.offline_at,
            duration: self.offline_for,
        });
        config.drain = self.drain;
        config.max_in_flight = self.max_in_flight;
        config.send_timeout = self.send_timeout;
        config.on_rate_limited = self.on_rate_limited;
        if let Some(seed) = self.seed {
            config.seed = seed;
        }
        config.allow_reported_loss = self.allow_reported_loss;
        config.validate()?;
        Ok(config)
    }
}

impl RampArgs {
    pub fn into_config(self) -> anyhow::Result<RampConfig> {
        let config = RampConfig {
            target: self.target.into_target()?,
            connections: self.connections,
            step: self.step,
            settle: self.settle,
            barrier: self.barrier.into_barrier(),
        };
        config.validate()?;
        Ok(config)
    }
}

impl StormArgs {
    pub fn into_config(self) -> anyhow::Result<StormConfig> {
        let config = StormConfig {
            target: self.target.into_target()?,
            connections: self.connections,
            backlog: self.backlog,
            senders: self.senders,
            body_bytes: self.body_bytes,
            ack_interval: self.ack_interval,
            timeout: self.timeout,
            max_in_flight: self.max_in_flight,
            barrier: self.barrier.into_barrier(),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ferry-loadtest").chain(args.iter().copied()))
            .expect("parses")
    }

    #[test]
    fn run_flags_become_a_load_config() {
        let cli = parse(&[
            "--json",
            "run",
            "--jwt-secret",
            "s3cret",
            "--url",
            "ws://a:1/v1/ws",
            "--url",
            "ws://b:2/v1/ws",
            "-c",
            "50",
            "-r",
            "500",
            "-d",
            "3s",
            "--pattern",
            "ring",
            "--offline-fraction",
            "0.2",
            "--offline-at",
            "1s",
            "--offline-for",
            "1500ms",
            "--source-addrs",
            "4",
            "--run-id",
            "r9",
            "--seed",
            "7",
        ]);
        assert!(cli.json);
        let Mode::Run(args) = cli.mode else {
            panic!("not run")
        };
        let c = args.into_config().unwrap();
        assert_eq!(c.target.urls.len(), 2);
        assert_eq!((c.connections, c.total_messages()), (50, 1500));
        assert_eq!(c.pattern, Pattern::Ring);
        assert_eq!(c.target.user_id(3), "lt-r9-3");
        assert_eq!(c.seed, 7);
        assert!(!c.allow_reported_loss, "strict unless asked");
        assert_eq!(c.target.codec, ClientCodec::Msgpack, "as the Rust client");
        assert_eq!(c.max_in_flight, 1000);
        assert_eq!(c.on_rate_limited, OnRateLimited::Retry);
        let o = c.offline.unwrap();
        assert_eq!(
            (o.at, o.duration),
            (Duration::from_secs(1), Duration::from_millis(1500))
        );
    }

    #[test]
    fn json_clients_are_asked_for() {
        let Mode::Storm(args) = parse(&["storm", "--dev", "--codec", "json"]).mode else {
            panic!("not storm")
        };
        assert_eq!(args.into_config().unwrap().target.codec, ClientCodec::Json);
    }

    #[test]
    fn the_independent_generators_settings_parse() {
        let Mode::Run(args) = parse(&[
            "run",
            "--dev",
            "--codec",
            "json",
            "--max-in-flight",
            "0",
            "--ack-interval",
            "0",
            "--on-rate-limited",
            "give-up",
            "--gateway-pid",
            "10",
            "--redis-pid",
            "11",
        ])
        .mode
        else {
            panic!("not run")
        };
        let c = args.into_config().unwrap();
        assert_eq!(c.target.codec, ClientCodec::Json);
        assert_eq!((c.max_in_flight, c.ack_interval), (0, Duration::ZERO));
        assert_eq!(c.on_rate_limited, OnRateLimited::GiveUp);
        assert_eq!(
            (c.target.gateway_pid, c.target.redis_pid),
            (Some(10), Some(11))
        );
    }

    #[test]
    fn a_barrier_needs_both_files() {
        let Mode::Storm(args) = parse(&[
            "storm",
            "--dev",
            "--ready-file",
            "/tmp/r",
            "--go-file",
            "/tmp/g",
        ])
        .mode
        else {
            panic!("not storm")
        };
        let barrier = args.into_config().unwrap().barrier.unwrap();
        assert_eq!(barrier.go_file, PathBuf::from("/tmp/g"));
        let half = ["ferry-loadtest", "ramp", "--dev", "--ready-file", "/tmp/r"];
        assert!(Cli::try_parse_from(half).is_err());
        let Mode::Ramp(args) = parse(&["ramp", "--dev"]).mode else {
            panic!("not ramp")
        };
        assert!(args.into_config().unwrap().barrier.is_none());
    }

    #[test]
    fn reported_losses_are_allowed_only_when_asked() {
        let Mode::Run(args) = parse(&["run", "--dev", "--allow-reported-loss"]).mode else {
            panic!("not run")
        };
        assert!(args.into_config().unwrap().allow_reported_loss);
    }

    #[test]
    fn a_token_source_is_required() {
        let Mode::Ramp(args) = parse(&["ramp", "-c", "10"]).mode else {
            panic!("not ramp")
        };
        assert!(args.into_config().is_err());
        let Mode::Storm(args) = parse(&["storm", "--dev"]).mode else {
            panic!("not storm")
        };
        assert!(matches!(
            args.into_config().unwrap().target.auth,
            Auth::DevEndpoint
        ));
    }
}
