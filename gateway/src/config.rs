//! The gateway's settings: one typed struct read from flags and `FERRY_*` environment variables,
//! validated before any port is bound.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, ValueEnum};
use ferry_router::SenderChecks;

/// Every setting of a gateway node. Each flag `--some-name` can also be given as the environment
/// variable `FERRY_SOME_NAME`; a flag on the command line wins over the variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "ferry-gateway", version, about = "Ferry's WebSocket gateway")]
pub struct Config {
    /// WebSocket listener [with --dev the default is 127.0.0.1:8080].
    #[arg(
        long,
        env = "FERRY_LISTEN",
        default_value = "0.0.0.0:8080",
        default_value_ifs = dev_default("127.0.0.1:8080")
    )]
    pub listen: SocketAddr,

    /// Admin listener: /healthz, /readyz, /metrics [with --dev the default is 127.0.0.1:9090].
    #[arg(
        long,
        env = "FERRY_ADMIN_LISTEN",
        default_value = "0.0.0.0:9090",
        default_value_ifs = dev_default("127.0.0.1:9090")
    )]
    pub admin_listen: SocketAddr,

    /// `redis://` or `rediss://` URL (`rediss://user:password@host:port/db`); without one the
    /// embedded (single-node) engine is used. With --redis-cluster, one or more seed nodes,
    /// comma-separated. Its password is never logged; --redis-password-file keeps it out of the
    /// process list too.
    #[arg(long, env = "FERRY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<RedisUrl>,

    /// Prefix of every Redis key and channel, so several deployments can share one Redis.
    #[arg(long, env = "FERRY_KEY_PREFIX", default_value = "ferry")]
    pub key_prefix: String,

    /// This node's name in `welcome`, logs and metrics [default: the host name].
    #[arg(long, env = "FERRY_NODE_ID")]
    pub node_id: Option<String>,

    /// HS256 shared secret for verifying tokens.
    #[arg(long, env = "FERRY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<JwtSecret>,

    /// Path of a PEM public key for verifying tokens, with --jwt-alg RS256 or ES256.
    #[arg(long, env = "FERRY_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// The one algorithm tokens may be signed with.
    #[arg(
        long,
        env = "FERRY_JWT_ALG",
        value_enum,
        ignore_case = true,
        default_value = "HS256"
    )]
    pub jwt_alg: JwtAlg,

    /// Required `iss` of every token, when set.
    #[arg(long, env = "FERRY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` of every token, when set.
    #[arg(long, env = "FERRY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Allow running without a JWT key; serve the demo page and a token endpoint. Insecure.
    /// (`FERRY_DEV` takes true/false, 1/0, yes/no, on/off.)
    #[arg(long, env = "FERRY_DEV", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub dev: bool,

    /// Largest WebSocket message accepted, in bytes.
    #[arg(long, env = "FERRY_MAX_FRAME_BYTES", default_value_t = 1_048_576)]
    pub max_frame_bytes: usize,

    /// Largest `send` body, in bytes.
    #[arg(long, env = "FERRY_MAX_BODY_BYTES", default_value_t = 65_536)]
    pub max_body_bytes: usize,

    /// Unacknowledged messages per inbox before `inbox_full`.
    #[arg(long, env = "FERRY_MAX_INBOX", default_value_t = 10_000)]
    pub max_inbox: u64,

    /// An inbox untouched this long expires (a new epoch follows).
    #[arg(long, env = "FERRY_INBOX_TTL", default_value = "30d", value_parser = parse_duration)]
    pub inbox_ttl: Duration,

    /// A device silent this long (no connection, ack or position check) stops holding its
    /// user's inbox: what it did not acknowledge may be trimmed once the user's other devices
    /// acknowledge it, and it is told of the gap when it comes back.
    #[arg(long, env = "FERRY_DEVICE_TTL", default_value = "7d", value_parser = parse_duration)]
    pub device_ttl: Duration,

    /// Devices kept per user; a new one beyond it evicts the device seen longest ago.
    #[arg(long, env = "FERRY_MAX_DEVICES", default_value_t = 16)]
    pub max_devices: usize,

    /// How long a `send` id is remembered for deduplication.
    #[arg(long, env = "FERRY_DEDUPE_WINDOW", default_value = "60s", value_parser = parse_duration)]
    pub dedupe_window: Duration,

    /// Token bucket for `send`, per user across the user's connections on this node (kept
    /// across a reconnect): sends per second.
    #[arg(long, env = "FERRY_SEND_RATE", default_value_t = 100.0)]
    pub send_rate: f64,

    /// Token bucket for `send`, per user on this node: the bucket's size (it starts full).
    #[arg(long, env = "FERRY_SEND_BURST", default_value_t = 200)]
    pub send_burst: u32,

    /// Bytes of message bodies one user may have stored per second, across the user's
    /// connections on this node (with a burst of four seconds' worth); beyond, `rate_limited`.
    #[arg(long, env = "FERRY_STORE_BYTES_RATE", default_value_t = 1_048_576.0)]
    pub store_bytes_rate: f64,

    /// Who a `send` may name: `any` user; only `known` users (those who have connected and
    /// still have a device record); or those the sender's `token` names in its `send_to` claim.
    /// Others are refused with `forbidden`. The server HTTP API may publish to anyone either way.
    #[arg(
        long,
        env = "FERRY_RECIPIENTS",
        value_enum,
        ignore_case = true,
        default_value = "any"
    )]
    pub recipients: Recipients,

    /// The share of an inbox (of --max-inbox) one sender's `send`s may hold at once, so that no
    /// single sender fills an inbox alone; beyond it, `inbox_full`. Counted once the inbox holds a
    /// quarter of a share, so a sender holds at most 1.25 shares. 1 turns the bound off. The
    /// server HTTP API's publishes neither count nor are bounded.
    #[arg(long, env = "FERRY_MAX_INBOX_SHARE", default_value_t = 0.5)]
    pub max_inbox_share: f64,

    /// Connections from one client address this node takes at once (the address a trusted
    /// proxy forwards, see --trusted-proxies); one more is refused with 503.
    #[arg(
        long,
        env = "FERRY_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 4096
    )]
    pub max_connections_per_address: usize,

    /// Connections that have not finished `hello` yet (reading the upgrade request, waiting for
    /// `hello`, checking the token) this node holds at once; one more is refused with 503. The
    /// budget of anonymous clients.
    #[arg(long, env = "FERRY_MAX_UNAUTHENTICATED", default_value_t = 1024)]
    pub max_unauthenticated: usize,

    /// Proxies whose `X-Forwarded-For` names the client address (CIDRs, comma-separated, e.g.
    /// `10.0.0.0/8`): the last entry is taken for a connection from one of them, and from no
    /// one else. Empty: the peer address counts.
    #[arg(long, env = "FERRY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Connections of one user this node takes at once; one more is refused at `hello`
    /// (`rate_limited`, close 1013).
    #[arg(long, env = "FERRY_MAX_CONNECTIONS_PER_USER", default_value_t = 16)]
    pub max_connections_per_user: usize,

    /// A store command slower than this fails (`unavailable`, or close 1013 at `hello`).
    #[arg(long, env = "FERRY_STORE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub store_timeout: Duration,

    /// Interval of the node's store check (a ping bounded by --store-timeout).
    #[arg(long, env = "FERRY_STORE_CHECK", default_value = "1s", value_parser = parse_duration)]
    pub store_check: Duration,

    /// A store failing every check this long is an outage: readiness fails and every session is
    /// asked to reconnect to another node. At least --store-check.
    #[arg(long, env = "FERRY_STORE_OUTAGE_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub store_outage_grace: Duration,

    /// Time allowed between the upgrade and `hello`.
    #[arg(long, env = "FERRY_HELLO_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub hello_timeout: Duration,

    /// Ping interval; silence for two intervals closes the connection.
    #[arg(long, env = "FERRY_HEARTBEAT", default_value = "25s", value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// Window over which a draining node spreads `reconnect` (0 sends them all at once).
    #[arg(long, env = "FERRY_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Log format.
    #[arg(long, env = "FERRY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Connections the kernel queues for the WebSocket listener before they are accepted
    /// (capped by net.core.somaxconn).
    #[arg(long, env = "FERRY_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,

    /// Open WebSocket connections accepted at once; further upgrades are refused.
    #[arg(long, env = "FERRY_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Bound of each connection's outbound queue, in messages; beyond it the session lags and
    /// catches up from the inbox.
    #[arg(long, env = "FERRY_OUTBOUND_QUEUE", default_value_t = 256)]
    pub outbound_queue: usize,

    /// Bound of each connection's outbound queue, in bytes.
    #[arg(long, env = "FERRY_OUTBOUND_QUEUE_BYTES", default_value_t = 1_048_576)]
    pub outbound_queue_bytes: usize,

    /// A socket that accepts nothing for this long is closed.
    #[arg(long, env = "FERRY_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Messages read from the inbox per catch-up page.
    #[arg(long, env = "FERRY_CATCHUP_PAGE", default_value_t = 256)]
    pub catchup_page: usize,

    /// Initial WebSocket read buffer per connection, in bytes (it grows for a larger frame).
    /// Small suits many idle connections; larger costs memory and saves CPU on busy ones.
    #[arg(long, env = "FERRY_WS_READ_BUFFER", default_value_t = 1024)]
    pub ws_read_buffer: usize,

    /// Interval of each session's position check against the inbox head (jittered ±20%).
    #[arg(long, env = "FERRY_POSITION_CHECK", default_value = "30s", value_parser = parse_duration)]
    pub position_check: Duration,

    /// Redis command connections in the pool (each one multiplexed).
    #[arg(long, env = "FERRY_REDIS_POOL_SIZE", default_value_t = 8)]
    pub redis_pool_size: usize,

    /// Lifetime of tokens minted by the --dev token endpoint.
    #[arg(long, env = "FERRY_DEV_TOKEN_TTL", default_value = "1h", value_parser = parse_duration)]
    pub dev_token_ttl: Duration,

    /// Redis replicas that must acknowledge each append (`WAIT`) before it is answered `sent`;
    /// when fewer do within the store timeout the answer is `unavailable` (retry with the same
    /// id). 0: answer once the primary has it.
    #[arg(long, env = "FERRY_MIN_REPLICAS_ACK", default_value_t = 0)]
    pub min_replicas_ack: u32,

    /// Start even when Redis has an evicting `maxmemory-policy` (any but noeviction). Eviction
    /// can take an inbox's keys; Ferry then reports the loss through `reset`, but messages are
    /// gone. (`FERRY_ALLOW_REDIS_EVICTION` takes true/false, 1/0, yes/no, on/off.)
    #[arg(long, env = "FERRY_ALLOW_REDIS_EVICTION", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub allow_redis_eviction: bool,

    /// Catch-up reads running at once on this node, at most; further sessions wait their turn,
    /// so a storm of catch-ups cannot crowd out the store for live traffic.
    #[arg(long, env = "FERRY_MAX_CATCHUP_READS", default_value_t = 64)]
    pub max_catchup_reads: usize,

    /// How long each node remembers its appends, to check them after Redis restarts or fails
    /// over (a lost one ends its inbox's epoch, so the recipient learns `reset`). Below
    /// --dedupe-window; 0 turns the audit off.
    #[arg(long, env = "FERRY_APPEND_AUDIT_WINDOW", default_value = "10s", value_parser = parse_duration)]
    pub append_audit_window: Duration,

    /// --redis-url names seed nodes of a Redis Cluster: keys and scripts go to the primary of
    /// each user's slot, live messages use sharded pub/sub. (`FERRY_REDIS_CLUSTER` takes
    /// true/false, 1/0, yes/no, on/off.)
    #[arg(long, env = "FERRY_REDIS_CLUSTER", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub redis_cluster: bool,

    /// File holding the Redis password (the ACL user's, with the user in --redis-url); it
    /// replaces a password in the URL. A trailing newline is ignored.
    #[arg(long, env = "FERRY_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,

    /// PEM file of the certificate authorities trusted for `rediss://` (e.g. a managed Redis's
    /// CA); without it, the system's roots.
    #[arg(long, env = "FERRY_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM client certificate for Redis servers that require mutual TLS, with --redis-client-key.
    #[arg(long, env = "FERRY_REDIS_CLIENT_CERT")]
    pub redis_client_cert: Option<PathBuf>,

    /// PEM private key of --redis-client-cert.
    #[arg(long, env = "FERRY_REDIS_CLIENT_KEY")]
    pub redis_client_key: Option<PathBuf>,

    /// Listener of the server HTTP API (backends publish and manage inboxes with an API key);
    /// off when absent. Keep it inside the cluster network.
    #[arg(long, env = "FERRY_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,

    /// File of API keys, one `<name> <secret>` per line (`#` starts a comment line); several
    /// lines are several keys valid at once (rotation). Read at start. Needed by --api-listen.
    #[arg(long, env = "FERRY_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Recipients of one `POST /v1/messages`, at most.
    #[arg(long, env = "FERRY_API_MAX_RECIPIENTS", default_value_t = 1000)]
    pub api_max_recipients: usize,

    /// Per-key token bucket of the HTTP API: recipient-messages per second (a publish to N
    /// recipients takes N).
    #[arg(long, env = "FERRY_API_RATE", default_value_t = 5000.0)]
    pub api_rate: f64,

    /// Per-key token bucket of the HTTP API: the bucket's size (it starts full) [default:
    /// --api-rate]. At least --api-max-recipients.
    #[arg(long, env = "FERRY_API_BURST")]
    pub api_burst: Option<u32>,

    /// With --dev, allow listening on addresses other than loopback. --dev hands out tokens for
    /// any user, so without this it refuses a --listen, --admin-listen or --api-listen that is
    /// not 127.0.0.1 / ::1. (`FERRY_DEV_ALLOW_REMOTE` takes true/false, 1/0, yes/no, on/off.)
    #[arg(long, env = "FERRY_DEV_ALLOW_REMOTE", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub dev_allow_remote: bool,

    /// With --dev and a JWT key, serve /dev/token anyway, minting with that key. Only for a
    /// local multi-node trial whose nodes share a throwaway secret (`deploy/local/up.sh`): it
    /// hands anyone a token for any user, signed with the real key. Without it, /dev/token is
    /// off whenever a key is configured.
    #[arg(long, env = "FERRY_DEV_TOKEN_WITH_KEY", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub dev_token_with_key: bool,

    /// Origins allowed to open a WebSocket, comma-separated and exact (`https://app.example.com`,
    /// scheme and host and any port, no path). An upgrade whose `Origin` header is not listed
    /// gets 403; one without an `Origin` (not a browser) is allowed. Unset: any origin.
    #[arg(long, env = "FERRY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Refuse a token in the upgrade URL (`?token=`, 400): URLs end up in proxies' access logs.
    /// The token then travels in `hello` or as `Authorization: Bearer`.
    /// (`FERRY_REFUSE_QUERY_TOKEN` takes true/false, 1/0, yes/no, on/off.)
    #[arg(long, env = "FERRY_REFUSE_QUERY_TOKEN", action = ArgAction::SetTrue, value_parser = BoolishValueParser::new())]
    pub refuse_query_token: bool,

    /// Connections the admin listener serves at once; more are closed at once.
    #[arg(long, env = "FERRY_ADMIN_MAX_CONNECTIONS", default_value_t = 64)]
    pub admin_max_connections: usize,
}

/// The Redis URL setting (one URL, or comma-separated cluster seeds). Its `Debug` hides the
/// password, so that logging the config never leaks it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The setting as given, password included, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Each URL of the setting.
    pub fn urls(&self) -> Vec<String> {
        self.0
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl From<String> for RedisUrl {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for RedisUrl {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self
            .urls()
            .iter()
            .map(|u| ferry_router::redact_url(u))
            .collect();
        write!(f, "RedisUrl({urls:?})")
    }
}

/// The algorithm tokens must be signed with; exactly one is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum JwtAlg {
    /// HMAC-SHA256 with --jwt-secret.
    #[value(name = "HS256")]
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256, with --jwt-public-key.
    #[value(name = "RS256")]
    Rs256,
    /// ECDSA P-256 with SHA-256, with --jwt-public-key.
    #[value(name = "ES256")]
    Es256,
}

/// Who a `send` may name (`--recipients`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Recipients {
    /// Any valid user id.
    Any,
    /// Users with a device record: they connected, and were not erased or left without devices
    /// since.
    Known,
    /// Users the sender's token names in its `send_to` claim (an array of user ids, or `["*"]`
    /// for anyone): the app decides when it mints the token.
    Token,
}

/// How log events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event.
    Json,
}

/// Shortest HS256 secret accepted, in bytes: HS256 wants a key of at least 256 bits, and a shorter
/// one can be guessed offline from any one token (issue 13, L7).
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// The HS256 secret. Its `Debug` is redacted so that logging the config never leaks it.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSecret(String);

impl JwtSecret {
    /// The secret itself, for building keys.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for JwtSecret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for JwtSecret {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl fmt::Debug for JwtSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JwtSecret(<redacted>)")
    }
}

/// Why a configuration is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no JWT key configured: give --jwt-secret (HS256) or --jwt-public-key with --jwt-alg \
         RS256 or ES256, or run with --dev (insecure, for development only)"
    )]
    NoJwtKey,
    #[error("--jwt-secret and --jwt-public-key exclude each other: configure one key")]
    BothJwtKeys,
    #[error("{0}")]
    JwtAlgMismatch(&'static str),
    #[error("--{flag} must not be zero")]
    Zero { flag: &'static str },
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

/// The conditional default of a listener under --dev (given as a flag, or as `FERRY_DEV` with any
/// of the spellings of true it takes): loopback. A spelling not listed here (`FERRY_DEV=TRUE`)
/// leaves the public default, which validation then refuses under --dev: it fails closed.
fn dev_default(addr: &'static str) -> [(&'static str, &'static str, Option<&'static str>); 6] {
    ["true", "1", "yes", "on", "y", "t"].map(|yes| ("dev", yes, Some(addr)))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 10s, 500ms, 30d)"))
}

impl Config {
    /// Parses `args` (the first item is the program name) without reading the process
    /// environment: clap's `env` attribute reads the real environment even in
    /// `try_parse_from`, so this strips every `env` binding first and tests stay hermetic.
    /// The binary uses `Config::parse()`, which does read `FERRY_*` variables.
    pub fn from_args<'a, I: IntoIterator<Item = &'a str>>(args: I) -> Result<Config, clap::Error> {
        let matches = Self::command()
            .mut_args(|arg| arg.env(None))
            .try_get_matches_from(args)?;
        Self::from_arg_matches(&matches)
    }

    /// A `--dev` config for tests: both listeners on `127.0.0.1:0`, every other setting at its
    /// default. Reads no environment variable.
    pub fn for_tests() -> Config {
        let args = [
            "ferry-gateway",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ];
        Self::from_args(args).expect("the built-in test arguments parse")
    }

    /// The HTTP API's bucket size: `--api-burst`, else `--api-rate` (rounded up).
    pub fn api_burst(&self) -> u32 {
        // `as` saturates; validation keeps the rate finite and positive.
        self.api_burst
            .unwrap_or_else(|| self.api_rate.ceil() as u32)
    }

    /// What the store checks of a `send`'s sender (`--recipients`, `--max-inbox-share`).
    pub fn sender_checks(&self) -> SenderChecks {
        let max_share = if self.max_inbox_share >= 1.0 {
            0
        } else {
            // At least one message, whatever the fraction: a share of 0 would mean no bound.
            ((self.max_inbox as f64 * self.max_inbox_share).ceil() as u64).max(1)
        };
        SenderChecks {
            known_recipient: self.recipients == Recipients::Known,
            max_share,
        }
    }

    /// This node's name: `--node-id`, else the host name, else `ferry`.
    pub fn node_id(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().map(|h| h.trim().to_owned()))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "ferry".to_owned())
    }

    /// Refuses settings the gateway cannot run with. Pure: it reads no file (the JWT key file
    /// is read by `Authenticator::from_config`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_jwt()?;
        self.validate_edge()?;
        self.validate_names()?;
        self.validate_limits()?;
        self.validate_durations()
    }

    pub(crate) fn validate_jwt(&self) -> Result<(), ConfigError> {
        match (&self.jwt_secret, &self.jwt_public_key, self.jwt_alg) {
            (Some(_), Some(_), _) => return Err(ConfigError::BothJwtKeys),
            (None, None, JwtAlg::Hs256) if !self.dev => return Err(ConfigError::NoJwtKey),
            (Some(_), None, JwtAlg::Rs256 | JwtAlg::Es256) => {
                return Err(ConfigError::JwtAlgMismatch(
                    "--jwt-secret is an HS256 key: use --jwt-alg HS256, or give --jwt-public-key \
                     for RS256 / ES256",
                ));
            }
            (None, Some(_), JwtAlg::Hs256) => {
                return Err(ConfigError::JwtAlgMismatch(
                    "--jwt-public-key needs --jwt-alg RS256 or ES256 (HS256 uses --jwt-secret)",
                ));
            }
            (None, None, JwtAlg::Rs256 | JwtAlg::Es256) => {
                return Err(ConfigError::JwtAlgMismatch(
                    "--jwt-alg RS256 / ES256 needs --jwt-public-key",
                ));
            }
            _ => {}
        }
        if self
            .jwt_secret
            .as_ref()
            .is_some_and(|s| s.expose().len() < MIN_JWT_SECRET_BYTES)
        {
            return Err(invalid(
                "jwt-secret",
                "the JWT secret must be at least 32 bytes (HS256 wants 256 bits); generate one \
                 with `openssl rand -base64 48`",
            ));
        }
        if self
            .jwt_public_key
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("jwt-public-key", "must not be empty"));
        }
        if self.jwt_issuer.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(invalid("jwt-issuer", "must not be empty when set"));
        }
        if self.jwt_audience.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(invalid("jwt-audience", "must not be empty when set"));
        }
        Ok(())
    }

    /// Whether `/dev/token` is served: with --dev and no configured key. Beside a real key
    /// (--jwt-secret, --jwt-public-key) it is not (404): it would sign tokens for any user with
    /// the key that production tokens verify against.
    pub fn dev_token_enabled(&self) -> bool {
        self.dev
            && (self.dev_token_with_key
                || (self.jwt_secret.is_none() && self.jwt_public_key.is_none()))
    }

    /// The origins of --allowed-origins, trimmed; empty entries are skipped, so an empty
    /// `FERRY_ALLOWED_ORIGINS` means unset.
    fn listed_origins(&self) -> impl Iterator<Item = &str> {
        self.allowed_origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
    }

    /// Whether an upgrade with this `Origin` header may open a WebSocket: any origin when
    /// --allowed-origins is unset, else only those listed (exactly, ASCII case aside).
    pub fn origin_allowed(&self, origin: &str) -> bool {
        let mut listed = self.listed_origins().peekable();
        listed.peek().is_none() || listed.any(|allowed| allowed.eq_ignore_ascii_case(origin.trim()))
    }

    /// --dev kept to loopback, the origin list, the admin port's cap.
    fn validate_edge(&self) -> Result<(), ConfigError> {
        if self.dev_allow_remote && !self.dev {
            return Err(invalid("dev-allow-remote", "needs --dev"));
        }
        if self.dev_token_with_key && !self.dev {
            return Err(invalid("dev-token-with-key", "needs --dev"));
        }
        if self.dev && !self.dev_allow_remote {
            let listeners = [
                ("listen", Some(self.listen)),
                ("admin-listen", Some(self.admin_listen)),
                ("api-listen", self.api_listen),
            ];
            let remote = |addr: &Option<SocketAddr>| addr.is_some_and(|a| !a.ip().is_loopback());
            if let Some((flag, _)) = listeners.iter().find(|(_, addr)| remote(addr)) {
                return Err(invalid(
                    flag,
                    "is not a loopback address (127.0.0.1 or ::1), and --dev is for a local \
                     trial (without a key, /dev/token gives anyone a token for any user): listen \
                     on loopback, or add --dev-allow-remote",
                ));
            }
        }
        if let Some(bad) = self.listed_origins().find(|o| !is_origin(o)) {
            return Err(invalid(
                "allowed-origins",
                &format!(
                    "{bad:?} is not an origin: give scheme://host[:port] (http or https, no path \
                     or trailing slash), comma-separated; leave it unset to allow any origin"
                ),
            ));
        }
        if self.admin_max_connections == 0 {
            return Err(ConfigError::Zero {
                flag: "admin-max-connections",
            });
        }
        Ok(())
    }

    fn validate_names(&self) -> Result<(), ConfigError> {
        if let Some(setting) = &self.redis_url {
            let urls = setting.urls();
            if urls.is_empty()
                || urls
                    .iter()
                    .any(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
            {
                return Err(invalid(
                    "redis-url",
                    "must start with redis:// or rediss:// (with --redis-cluster: one or more \
                     seed URLs, comma-separated)",
                ));
            }
            if urls.len() > 1 && !self.redis_cluster {
                return Err(invalid(
                    "redis-url",
                    "several URLs are seed nodes of a Redis Cluster: add --redis-cluster",
                ));
            }
        }
        let redis_files = [
            ("redis-cluster", self.redis_cluster),
            ("redis-password-file", self.redis_password_file.is_some()),
            ("redis-ca-file", self.redis_ca_file.is_some()),
            ("redis-client-cert", self.redis_client_cert.is_some()),
            ("redis-client-key", self.redis_client_key.is_some()),
        ];
        if self.redis_url.is_none()
            && let Some((flag, _)) = redis_files.iter().find(|(_, set)| *set)
        {
            return Err(invalid(flag, "needs --redis-url"));
        }
        if self.redis_client_cert.is_some() != self.redis_client_key.is_some() {
            return Err(invalid(
                "redis-client-cert",
                "and --redis-client-key go together (a certificate and its key)",
            ));
        }
        let tls = self
            .redis_url
            .as_ref()
            .is_some_and(|u| u.urls().iter().all(|u| u.starts_with("rediss://")));
        if !tls && (self.redis_ca_file.is_some() || self.redis_client_cert.is_some()) {
            return Err(invalid(
                "redis-ca-file",
                "and --redis-client-cert need rediss:// URLs (TLS)",
            ));
        }
        let prefix = &self.key_prefix;
        if prefix.is_empty()
            || prefix.contains(['{', '}'])
            || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "key-prefix",
                "must be non-empty, without braces (they would change Redis Cluster hash tags) \
                 or whitespace",
            ));
        }
        if let Some(id) = &self.node_id
            && (id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(invalid("node-id", "must be non-empty, without whitespace"));
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err(invalid("admin-listen", "must differ from --listen"));
        }
        self.validate_api()
    }

    fn validate_api(&self) -> Result<(), ConfigError> {
        let Some(api) = self.api_listen else {
            if self.api_keys_file.is_some() {
                return Err(invalid("api-keys-file", "needs --api-listen"));
            }
            return Ok(());
        };
        if api.port() != 0 && (api == self.listen || api == self.admin_listen) {
            return Err(invalid(
                "api-listen",
                "must differ from --listen and --admin-listen",
            ));
        }
        match &self.api_keys_file {
            None => Err(invalid(
                "api-keys-file",
                "is required with --api-listen (the API takes only configured keys)",
            )),
            Some(path) if path.as_os_str().is_empty() => {
                Err(invalid("api-keys-file", "must not be empty"))
            }
            Some(_) => Ok(()),
        }
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let counts = [
            ("max-frame-bytes", self.max_frame_bytes),
            ("max-body-bytes", self.max_body_bytes),
            ("max-connections", self.max_connections),
            ("outbound-queue", self.outbound_queue),
            ("outbound-queue-bytes", self.outbound_queue_bytes),
            ("catchup-page", self.catchup_page),
            ("ws-read-buffer", self.ws_read_buffer),
            ("redis-pool-size", self.redis_pool_size),
            ("max-catchup-reads", self.max_catchup_reads),
            ("max-devices", self.max_devices),
            ("max-connections-per-user", self.max_connections_per_user),
            (
                "max-connections-per-address",
                self.max_connections_per_address,
            ),
            ("max-unauthenticated", self.max_unauthenticated),
        ];
        if let Some((flag, _)) = counts.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Zero { flag });
        }
        if self.max_inbox == 0 {
            return Err(ConfigError::Zero { flag: "max-inbox" });
        }
        if self.send_burst == 0 {
            return Err(ConfigError::Zero { flag: "send-burst" });
        }
        if self.listen_backlog == 0 {
            return Err(ConfigError::Zero {
                flag: "listen-backlog",
            });
        }
        if self.api_max_recipients == 0 {
            return Err(ConfigError::Zero {
                flag: "api-max-recipients",
            });
        }
        if !(self.api_rate.is_finite() && self.api_rate > 0.0) {
            return Err(invalid(
                "api-rate",
                "must be a positive number of recipient-messages per second",
            ));
        }
        if self.api_burst == Some(0) {
            return Err(ConfigError::Zero { flag: "api-burst" });
        }
        let burst = usize::try_from(self.api_burst()).unwrap_or(usize::MAX);
        if burst < self.api_max_recipients {
            return Err(invalid(
                "api-burst",
                "(default --api-rate) must be at least --api-max-recipients (a publish to that \
                 many recipients takes that many tokens at once)",
            ));
        }
        if !(self.max_inbox_share > 0.0 && self.max_inbox_share <= 1.0) {
            return Err(invalid(
                "max-inbox-share",
                "must be a fraction above 0 and at most 1 (1: no bound)",
            ));
        }
        if !(self.store_bytes_rate.is_finite() && self.store_bytes_rate >= 1.0) {
            return Err(invalid(
                "store-bytes-rate",
                "must be at least 1 byte per second",
            ));
        }
        if !(self.send_rate.is_finite() && self.send_rate > 0.0) {
            return Err(invalid(
                "send-rate",
                "must be a positive number of sends per second",
            ));
        }
        if self.max_body_bytes > self.max_frame_bytes {
            return Err(invalid(
                "max-body-bytes",
                "must not exceed --max-frame-bytes (a send carrying it would not fit in a frame)",
            ));
        }
        if self.outbound_queue_bytes < self.max_body_bytes {
            return Err(invalid(
                "outbound-queue-bytes",
                "must be at least --max-body-bytes (the largest message must fit in the queue)",
            ));
        }
        Ok(())
    }

    fn validate_durations(&self) -> Result<(), ConfigError> {
        // Zero would mean "never wait", "expire at once" or "spin"; sub-millisecond TTLs round to
        // zero in Redis. `drain_timeout` may be zero: every `reconnect` goes out at once.
        let durations = [
            ("inbox-ttl", self.inbox_ttl),
            ("device-ttl", self.device_ttl),
            ("dedupe-window", self.dedupe_window),
            ("store-timeout", self.store_timeout),
            ("store-check", self.store_check),
            ("store-outage-grace", self.store_outage_grace),
            ("hello-timeout", self.hello_timeout),
            ("heartbeat", self.heartbeat),
            ("write-timeout", self.write_timeout),
            ("position-check", self.position_check),
            ("dev-token-ttl", self.dev_token_ttl),
        ];
        if let Some((flag, _)) = durations.iter().find(|(_, d)| d.as_millis() == 0) {
            return Err(invalid(flag, "must be at least 1ms"));
        }
        if self.store_outage_grace < self.store_check {
            return Err(invalid(
                "store-outage-grace",
                "must be at least --store-check (an outage needs at least one failed check)",
            ));
        }
        if self.dedupe_window > self.inbox_ttl {
            return Err(invalid(
                "dedupe-window",
                "must not exceed --inbox-ttl (a retry would be answered `duplicate` for a \
                 message that expired with its inbox)",
            ));
        }
        if self.append_audit_window >= self.dedupe_window {
            return Err(invalid(
                "append-audit-window",
                "must be below --dedupe-window (the audit checks appends by their dedupe keys)",
            ));
        }
        if self.min_replicas_ack > 0 && self.redis_url.is_none() {
            return Err(invalid(
                "min-replicas-ack",
                "needs --redis-url (the embedded engine has no replicas)",
            ));
        }
        Ok(())
    }
}

/// `scheme://host[:port]` as browsers send it in `Origin`: http or https, a host, nothing after.
fn is_origin(s: &str) -> bool {
    let Some(host) = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
    else {
        return false;
    };
    !host.is_empty()
        && !host.starts_with(':')
        && !host
            .chars()
            .any(|c| matches!(c, '/' | '?' | '#' | '*' | '@') || c.is_whitespace())
}

fn invalid(flag: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        flag,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HS256 secret long enough to be accepted (34 bytes).
    const SECRET: &str = "a-test-secret-of-at-least-32-bytes";

    fn parse(extra: &[&str]) -> Config {
        let args = std::iter::once("ferry-gateway").chain(extra.iter().copied());
        Config::from_args(args).expect("arguments parse")
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn defaults_match_the_design_table() {
        let c = parse(&[]);
        assert_eq!(c.listen, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.admin_listen, "0.0.0.0:9090".parse().expect("addr"));
        assert_eq!(c.redis_url, None);
        assert_eq!(c.key_prefix, "ferry");
        assert_eq!(c.node_id, None);
        assert_eq!(c.jwt_secret, None);
        assert_eq!(c.jwt_public_key, None);
        assert_eq!(c.jwt_alg, JwtAlg::Hs256);
        assert_eq!((&c.jwt_issuer, &c.jwt_audience), (&None, &None));
        assert!(!c.dev);
        assert_eq!(c.max_frame_bytes, 1_048_576);
        assert_eq!(c.max_body_bytes, 65_536);
        assert_eq!(c.max_inbox, 10_000);
        assert_eq!(
            c.sender_checks(),
            SenderChecks {
                known_recipient: false,
                max_share: 5_000
            }
        );
        assert_eq!(c.inbox_ttl, secs(30 * 24 * 3600));
        assert_eq!(c.dedupe_window, secs(60));
        assert_eq!((c.send_rate, c.send_burst), (100.0, 200));
        assert_eq!(c.store_timeout, secs(2));
        assert_eq!((c.store_check, c.store_outage_grace), (secs(1), secs(5)));
        assert_eq!(c.hello_timeout, secs(10));
        assert_eq!(c.heartbeat, secs(25));
        assert_eq!(c.drain_timeout, secs(30));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.max_connections, 100_000);
        assert_eq!((c.outbound_queue, c.outbound_queue_bytes), (256, 1_048_576));
        assert_eq!(c.write_timeout, secs(10));
        assert_eq!(c.catchup_page, 256);
        assert_eq!(c.ws_read_buffer, 1024);
        assert_eq!(c.position_check, secs(30));
        assert_eq!(c.redis_pool_size, 8);
        assert_eq!(c.dev_token_ttl, secs(3600));
        assert_eq!(c.min_replicas_ack, 0);
        assert!(!c.allow_redis_eviction);
        assert_eq!(c.append_audit_window, secs(10));
        assert_eq!(c.max_catchup_reads, 64);
        assert_eq!(c.listen_backlog, 4096);
        assert!(!c.redis_cluster);
        assert_eq!(c.redis_password_file, None);
        assert_eq!(
            (c.redis_ca_file, c.redis_client_cert, c.redis_client_key),
            (None, None, None)
        );
        assert_eq!(c.api_max_recipients, 1000);
        assert_eq!((c.api_rate, c.api_burst), (5000.0, None));
        assert_eq!((c.api_listen, c.api_keys_file), (None, None));
    }

    /// The flag names are an interface (DESIGN.md's table, then the additions).
    const FLAGS: [&str; 63] = [
        "listen",
        "admin-listen",
        "redis-url",
        "key-prefix",
        "node-id",
        "jwt-secret",
        "jwt-public-key",
        "jwt-alg",
        "jwt-issuer",
        "jwt-audience",
        "dev",
        "max-frame-bytes",
        "max-body-bytes",
        "max-inbox",
        "inbox-ttl",
        "device-ttl",
        "max-devices",
        "dedupe-window",
        "send-rate",
        "send-burst",
        "store-bytes-rate",
        "recipients",
        "max-inbox-share",
        "max-connections-per-address",
        "max-unauthenticated",
        "trusted-proxies",
        "max-connections-per-user",
        "store-timeout",
        "store-check",
        "store-outage-grace",
        "hello-timeout",
        "heartbeat",
        "drain-timeout",
        "log-format",
        "listen-backlog",
        "max-connections",
        "outbound-queue",
        "outbound-queue-bytes",
        "write-timeout",
        "catchup-page",
        "ws-read-buffer",
        "position-check",
        "redis-pool-size",
        "dev-token-ttl",
        "min-replicas-ack",
        "allow-redis-eviction",
        "max-catchup-reads",
        "append-audit-window",
        "redis-cluster",
        "redis-password-file",
        "redis-ca-file",
        "redis-client-cert",
        "redis-client-key",
        "api-listen",
        "api-keys-file",
        "api-max-recipients",
        "api-rate",
        "api-burst",
        "dev-allow-remote",
        "dev-token-with-key",
        "allowed-origins",
        "refuse-query-token",
        "admin-max-connections",
    ];

    #[test]
    fn every_flag_has_its_ferry_env_var() {
        let cmd = Config::command();
        let mut longs = Vec::new();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let want = format!("FERRY_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(want.as_str()),
                "--{long}"
            );
            longs.push(long);
        }
        assert_eq!(longs, FLAGS);
    }

    #[test]
    fn durations_parse() {
        let c = parse(&[
            "--hello-timeout",
            "500ms",
            "--heartbeat",
            "10s",
            "--inbox-ttl",
            "30d",
        ]);
        assert_eq!(c.hello_timeout, Duration::from_millis(500));
        assert_eq!(c.heartbeat, secs(10));
        assert_eq!(c.inbox_ttl, secs(30 * 86_400));
        assert!(Config::from_args(["ferry-gateway", "--heartbeat", "10"]).is_err());
        assert!(Config::from_args(["ferry-gateway", "--heartbeat", "soon"]).is_err());
    }

    #[test]
    fn enums_parse() {
        let c = parse(&["--jwt-alg", "rs256", "--log-format", "json"]);
        assert_eq!((c.jwt_alg, c.log_format), (JwtAlg::Rs256, LogFormat::Json));
        assert_eq!(parse(&["--jwt-alg", "ES256"]).jwt_alg, JwtAlg::Es256);
        assert!(Config::from_args(["ferry-gateway", "--jwt-alg", "none"]).is_err());
        let c = parse(&[
            "--recipients",
            "known",
            "--max-inbox",
            "3",
            "--max-inbox-share",
            "0.1",
        ]);
        assert_eq!(
            c.sender_checks(),
            SenderChecks {
                known_recipient: true,
                max_share: 1
            }
        );
        let off = parse(&["--max-inbox-share", "1"]).sender_checks();
        assert_eq!(off.max_share, 0);
        assert!(Config::from_args(["ferry-gateway", "--recipients", "friends"]).is_err());
    }

    #[test]
    fn for_tests_is_a_valid_dev_config() {
        let c = Config::for_tests();
        assert!(c.dev);
        assert_eq!(c.listen, "127.0.0.1:0".parse().expect("addr"));
        assert_eq!(c.admin_listen, "127.0.0.1:0".parse().expect("addr"));
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn secret_is_redacted() {
        let c = parse(&["--jwt-secret", "hunter2-hunter2"]);
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(
            c.jwt_secret.as_ref().map(JwtSecret::expose),
            Some("hunter2-hunter2")
        );
    }

    #[test]
    fn redis_password_is_redacted() {
        let c = parse(&[
            "--redis-url",
            "rediss://ferry:hunter2@a:6380,rediss://ferry:hunter2@b:6380",
        ]);
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("ferry:<redacted>@b:6380"), "{debug}");
        let redis_url = c.redis_url.expect("set");
        assert_eq!(redis_url.urls().len(), 2);
        assert!(redis_url.expose().contains("hunter2"));
        let help = Config::command().render_long_help().to_string();
        assert!(!help.contains("hunter2"));
    }

    #[test]
    fn node_id_falls_back_to_the_host_name() {
        assert_eq!(parse(&["--node-id", "n1"]).node_id(), "n1");
        assert!(!parse(&[]).node_id().is_empty());
    }

    #[test]
    fn jwt_key_rules() {
        let err = |args: &[&str]| parse(args).validate().err();
        assert_eq!(err(&[]), Some(ConfigError::NoJwtKey));
        let msg = ConfigError::NoJwtKey.to_string();
        for flag in ["--jwt-secret", "--jwt-public-key", "--dev"] {
            assert!(msg.contains(flag), "{msg}");
        }
        assert_eq!(err(&["--dev"]), None);
        assert_eq!(err(&["--jwt-secret", SECRET]), None);
        assert_eq!(err(&["--jwt-secret", &SECRET[..32]]), None);
        let short = err(&["--jwt-secret", &SECRET[..31]]).map(|e| e.to_string());
        assert!(
            short.is_some_and(|e| e.contains("the JWT secret must be at least 32 bytes")),
            "a 31-byte secret is refused"
        );
        assert_eq!(
            err(&["--jwt-public-key", "k.pem", "--jwt-alg", "RS256"]),
            None
        );
        assert_eq!(
            err(&["--jwt-public-key", "k.pem", "--jwt-alg", "ES256"]),
            None
        );
        assert_eq!(
            err(&[
                "--jwt-secret",
                "s",
                "--jwt-public-key",
                "k.pem",
                "--jwt-alg",
                "RS256"
            ]),
            Some(ConfigError::BothJwtKeys)
        );
        let mismatch = |args: &[&str]| matches!(err(args), Some(ConfigError::JwtAlgMismatch(_)));
        assert!(mismatch(&["--jwt-public-key", "k.pem"]));
        assert!(mismatch(&["--jwt-public-key", "k.pem", "--dev"]));
        assert!(mismatch(&["--jwt-alg", "RS256"]));
        assert!(mismatch(&["--jwt-alg", "ES256", "--dev"]));
        assert!(mismatch(&["--jwt-secret", "s", "--jwt-alg", "ES256"]));
        assert!(err(&["--jwt-secret", ""]).is_some());
        assert!(err(&["--dev", "--jwt-issuer", ""]).is_some());
        assert!(err(&["--dev", "--jwt-audience", ""]).is_some());
    }

    #[test]
    fn limit_rules() {
        let flag_of = |args: &[&str]| match parse(&[&["--dev"][..], args].concat()).validate() {
            Ok(()) => None,
            Err(ConfigError::Zero { flag } | ConfigError::Invalid { flag, .. }) => Some(flag),
            Err(other) => panic!("unexpected {other}"),
        };
        for flag in [
            "max-frame-bytes",
            "max-body-bytes",
            "max-inbox",
            "send-burst",
            "max-connections",
            "outbound-queue",
            "outbound-queue-bytes",
            "catchup-page",
            "ws-read-buffer",
            "redis-pool-size",
            "max-catchup-reads",
            "listen-backlog",
            "send-rate",
            "max-inbox-share",
        ] {
            assert_eq!(flag_of(&[format!("--{flag}").as_str(), "0"]), Some(flag));
        }
        for share in ["1.5", "NaN", "-0.5"] {
            let arg = format!("--max-inbox-share={share}");
            assert_eq!(flag_of(&[arg.as_str()]), Some("max-inbox-share"));
        }
        for flag in [
            "inbox-ttl",
            "dedupe-window",
            "store-timeout",
            "store-check",
            "store-outage-grace",
            "hello-timeout",
            "heartbeat",
            "write-timeout",
            "position-check",
            "dev-token-ttl",
        ] {
            assert_eq!(flag_of(&[format!("--{flag}").as_str(), "0s"]), Some(flag));
        }
        assert_eq!(flag_of(&["--drain-timeout", "0s"]), None);
        assert_eq!(
            flag_of(&["--store-check", "2s", "--store-outage-grace", "1s"]),
            Some("store-outage-grace")
        );
        assert_eq!(
            flag_of(&["--store-check", "1s", "--store-outage-grace", "1s"]),
            None
        );
        // Point 6 of issue 9: a dedupe entry outliving its inbox would answer `duplicate` for a
        // message that expired with the inbox.
        assert_eq!(
            flag_of(&["--inbox-ttl", "30s", "--dedupe-window", "31s"]),
            Some("dedupe-window")
        );
        assert_eq!(
            flag_of(&["--inbox-ttl", "30s", "--dedupe-window", "30s"]),
            None
        );
        assert_eq!(
            flag_of(&["--dedupe-window", "10s", "--append-audit-window", "10s"]),
            Some("append-audit-window")
        );
        assert_eq!(flag_of(&["--append-audit-window", "0s"]), None);
        assert_eq!(
            flag_of(&["--min-replicas-ack", "1"]),
            Some("min-replicas-ack")
        );
        assert_eq!(
            flag_of(&[
                "--min-replicas-ack",
                "1",
                "--redis-url",
                "redis://127.0.0.1:6379"
            ]),
            None
        );
        assert_eq!(flag_of(&["--send-rate", "NaN"]), Some("send-rate"));
        assert_eq!(flag_of(&["--send-rate", "0.5"]), None);
        assert_eq!(
            flag_of(&["--max-frame-bytes", "1000", "--max-body-bytes", "1001"]),
            Some("max-body-bytes")
        );
        assert_eq!(
            flag_of(&["--outbound-queue-bytes", "1000"]),
            Some("outbound-queue-bytes")
        );
        assert!(Config::from_args(["ferry-gateway", "--max-inbox", "-1"]).is_err());
    }

    #[test]
    fn name_rules() {
        let flag_of = |args: &[&str]| match parse(&[&["--dev"][..], args].concat()).validate() {
            Err(ConfigError::Invalid { flag, .. }) => Some(flag),
            _ => None,
        };
        assert_eq!(flag_of(&["--redis-url", "redis://127.0.0.1:6379"]), None);
        assert_eq!(flag_of(&["--redis-url", "rediss://r.example:6380/0"]), None);
        assert_eq!(flag_of(&["--redis-url", "http://x"]), Some("redis-url"));
        assert_eq!(flag_of(&["--redis-url", ""]), Some("redis-url"));
        assert_eq!(
            flag_of(&["--redis-url", "redis://a:1,redis://b:1"]),
            Some("redis-url")
        );
        let cluster = ["--redis-cluster", "--redis-url", "redis://a:1, redis://b:1"];
        assert_eq!(flag_of(&cluster), None);
        assert_eq!(
            flag_of(&["--redis-cluster", "--redis-url", "redis://a:1,http://b"]),
            Some("redis-url")
        );
        assert_eq!(flag_of(&["--redis-url", ","]), Some("redis-url"));
        for flag in ["--redis-password-file", "--redis-ca-file"] {
            assert!(flag_of(&[flag, "/x"]).is_some(), "{flag} without a URL");
        }
        assert_eq!(flag_of(&["--redis-cluster"]), Some("redis-cluster"));
        let tls = ["--redis-url", "rediss://a:1"];
        assert_eq!(
            flag_of(&[&tls[..], &["--redis-ca-file", "/ca"]].concat()),
            None
        );
        assert_eq!(
            flag_of(&[&tls[..], &["--redis-client-cert", "/c"]].concat()),
            Some("redis-client-cert")
        );
        assert_eq!(
            flag_of(
                &[
                    &tls[..],
                    &["--redis-client-cert", "/c", "--redis-client-key", "/k"]
                ]
                .concat()
            ),
            None
        );
        assert_eq!(
            flag_of(&["--redis-url", "redis://a:1", "--redis-ca-file", "/ca"]),
            Some("redis-ca-file")
        );
        assert_eq!(flag_of(&["--key-prefix", "app{1}"]), Some("key-prefix"));
        assert_eq!(flag_of(&["--key-prefix", ""]), Some("key-prefix"));
        assert_eq!(flag_of(&["--key-prefix", "staging:ferry"]), None);
        assert_eq!(flag_of(&["--node-id", "a b"]), Some("node-id"));
        assert_eq!(
            flag_of(&[
                "--listen",
                "0.0.0.0:80",
                "--admin-listen",
                "0.0.0.0:80",
                "--dev-allow-remote"
            ]),
            Some("admin-listen")
        );
    }

    #[test]
    fn dev_stays_on_loopback() {
        let addr = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        // --dev moves the default listeners to loopback; without it they stay public.
        let dev = parse(&["--dev"]);
        assert_eq!(dev.listen, addr("127.0.0.1:8080"));
        assert_eq!(dev.admin_listen, addr("127.0.0.1:9090"));
        assert_eq!(dev.validate(), Ok(()));
        let stated = parse(&["--dev", "--listen", "127.0.0.1:1234"]);
        assert_eq!(stated.listen, addr("127.0.0.1:1234"));
        assert_eq!(parse(&["--dev", "--listen", "[::1]:80"]).validate(), Ok(()));

        let flag_of = |args: &[&str]| match parse(args).validate() {
            Ok(()) => None,
            Err(ConfigError::Invalid { flag, reason }) => {
                assert!(reason.contains("--dev-allow-remote"), "{reason}");
                Some(flag)
            }
            Err(other) => panic!("unexpected {other}"),
        };
        assert_eq!(
            flag_of(&["--dev", "--listen", "0.0.0.0:8080"]),
            Some("listen")
        );
        assert_eq!(
            flag_of(&["--dev", "--admin-listen", "10.0.0.1:9090"]),
            Some("admin-listen")
        );
        assert_eq!(flag_of(&["--dev", "--listen", "[::]:8080"]), Some("listen"));
        let api = ["--api-listen", "0.0.0.0:8081", "--api-keys-file", "/keys"];
        assert_eq!(
            flag_of(&[&["--dev"][..], &api[..]].concat()),
            Some("api-listen")
        );
        let remote = ["--dev", "--listen", "0.0.0.0:8080", "--dev-allow-remote"];
        assert_eq!(flag_of(&remote), None);
        // Without --dev the flag means nothing: refused, not ignored.
        assert!(matches!(
            parse(&["--jwt-secret", SECRET, "--dev-allow-remote"]).validate(),
            Err(ConfigError::Invalid {
                flag: "dev-allow-remote",
                ..
            })
        ));
        // Production listens where it is told.
        assert_eq!(parse(&["--jwt-secret", SECRET]).validate(), Ok(()));
    }

    #[test]
    fn dev_token_needs_dev_and_no_key() {
        assert!(parse(&["--dev"]).dev_token_enabled());
        assert!(!parse(&["--dev", "--jwt-secret", "s"]).dev_token_enabled());
        let key = ["--dev", "--jwt-public-key", "k.pem", "--jwt-alg", "ES256"];
        assert!(!parse(&key).dev_token_enabled());
        assert!(!parse(&["--jwt-secret", "s"]).dev_token_enabled());
        let local = ["--dev", "--jwt-secret", "s", "--dev-token-with-key"];
        assert!(
            parse(&local).dev_token_enabled(),
            "the local cluster's explicit choice"
        );
        assert!(parse(&["--dev-token-with-key"]).validate().is_err());
    }

    #[test]
    fn origin_and_token_rules() {
        let c = parse(&[]);
        assert!(c.allowed_origins.is_empty());
        assert!(!c.refuse_query_token);
        assert_eq!(c.admin_max_connections, 64);
        assert!(c.origin_allowed("https://anything.example"));

        let c = parse(&[
            "--dev",
            "--allowed-origins",
            "https://app.example.com, http://localhost:3000",
            "--refuse-query-token",
        ]);
        assert_eq!(c.validate(), Ok(()));
        assert!(c.refuse_query_token);
        assert_eq!(c.allowed_origins.len(), 2);
        assert!(c.origin_allowed("https://app.example.com"));
        assert!(c.origin_allowed("https://APP.example.com"));
        assert!(c.origin_allowed("http://localhost:3000"));
        for refused in [
            "https://app.example.com.evil.example",
            "http://app.example.com",
            "https://app.example.com:444",
            "http://localhost:3001",
            "null",
            "",
        ] {
            assert!(!c.origin_allowed(refused), "{refused}");
        }

        let flag_of =
            |origins: &str| match parse(&["--dev", "--allowed-origins", origins]).validate() {
                Ok(()) => None,
                Err(ConfigError::Invalid { flag, .. }) => Some(flag),
                Err(other) => panic!("unexpected {other}"),
            };
        for good in [
            "https://a.example",
            "http://10.0.0.1:8080",
            "https://[::1]:443",
        ] {
            assert_eq!(flag_of(good), None, "{good}");
        }
        for bad in [
            "a.example",
            "https://a.example/",
            "https://a.example/app",
            "*",
            "https://*.example",
            "null",
            "https://",
            "ws://a.example",
        ] {
            assert_eq!(flag_of(bad), Some("allowed-origins"), "{bad}");
        }
        // Empty entries are skipped: an empty FERRY_ALLOWED_ORIGINS means unset.
        assert_eq!(flag_of("https://a.example,"), None);
        let empty = parse(&["--allowed-origins", ""]);
        assert_eq!(flag_of(""), None);
        assert!(empty.origin_allowed("https://anything.example"));
        assert!(matches!(
            parse(&["--dev", "--admin-max-connections", "0"]).validate(),
            Err(ConfigError::Zero {
                flag: "admin-max-connections"
            })
        ));
    }

    #[test]
    fn api_rules() {
        let flag_of = |args: &[&str]| match parse(&[&["--dev"][..], args].concat()).validate() {
            Ok(()) => None,
            Err(ConfigError::Zero { flag } | ConfigError::Invalid { flag, .. }) => Some(flag),
            Err(other) => panic!("unexpected {other}"),
        };
        let api = ["--api-listen", "127.0.0.1:8081", "--api-keys-file", "/keys"];
        let with = |extra: &[&str]| flag_of(&[&api[..], extra].concat());
        assert_eq!(with(&[]), None);
        assert_eq!(
            flag_of(&["--api-listen", "127.0.0.1:8081"]),
            Some("api-keys-file")
        );
        assert_eq!(
            flag_of(&["--api-keys-file", "/keys"]),
            Some("api-keys-file")
        );
        let mut no_path = parse(&[&["--dev"][..], &api[..]].concat());
        no_path.api_keys_file = Some(PathBuf::new());
        assert!(matches!(
            no_path.validate(),
            Err(ConfigError::Invalid {
                flag: "api-keys-file",
                ..
            })
        ));
        for clash in ["--listen", "--admin-listen"] {
            assert_eq!(
                with(&[clash, "127.0.0.1:8081"]),
                Some("api-listen"),
                "{clash}"
            );
        }
        assert_eq!(
            with(&["--api-max-recipients", "0"]),
            Some("api-max-recipients")
        );
        for rate in ["0", "NaN", "inf"] {
            assert_eq!(with(&["--api-rate", rate]), Some("api-rate"), "{rate}");
        }
        assert_eq!(with(&["--api-burst", "0"]), Some("api-burst"));
        // A publish to --api-max-recipients must fit in the bucket.
        assert_eq!(with(&["--api-rate", "999"]), Some("api-burst"));
        assert_eq!(with(&["--api-rate", "999", "--api-burst", "1000"]), None);
        assert_eq!(
            with(&["--api-rate", "10", "--api-max-recipients", "10"]),
            None
        );
        assert_eq!(
            with(&["--api-rate", "9.5", "--api-max-recipients", "10"]),
            None
        );
        assert_eq!(parse(&[]).api_burst(), 5000, "the rate's by default");
        assert_eq!(parse(&["--api-rate", "9.5"]).api_burst(), 10);
        // The limits hold without the listener too (so a later --api-listen is no surprise).
        assert_eq!(flag_of(&["--api-rate", "0"]), Some("api-rate"));
    }
}
