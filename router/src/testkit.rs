//! Test support (feature `testkit`): a real `redis-server` on a free loopback port in a fresh
//! directory, which tests can stop, crash, pause, restart and query. Panics are its error
//! reporting: it only runs in tests.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a starting or restarting server may take to answer `PING` (an AOF reload included).
const READY_WITHIN: Duration = Duration::from_secs(20);
/// How long a stopping server may take to exit before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(10);
/// Pause between two polls of a condition.
const POLL: Duration = Duration::from_millis(10);

/// How the server persists.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisOptions {
    /// `appendonly yes`: data survives a restart (and with `appendfsync_always`, a crash).
    pub appendonly: bool,
    /// `appendfsync always` instead of `everysec`.
    pub appendfsync_always: bool,
    /// Start as a replica of the server on this loopback port.
    pub replica_of: Option<u16>,
}

/// A `redis-server` child process, stopped and its directory removed on drop.
pub struct RedisServer {
    /// `None` while stopped.
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    options: RedisOptions,
}

impl RedisServer {
    /// Starts a server without persistence.
    pub fn start() -> RedisServer {
        Self::start_with(RedisOptions::default())
    }

    pub fn start_with(options: RedisOptions) -> RedisServer {
        let dir = unique_dir();
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
            options,
        };
        // Another process may take the free port before redis-server binds it: try a few.
        let mut failures = Vec::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.launch() {
                Ok(()) => return server,
                Err(e) => failures.push(e),
            }
        }
        panic!("redis-server did not start: {failures:#?}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id, `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server with SIGTERM (a clean shutdown) and waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(&child, "CONT");
        signal(&child, "TERM");
        let deadline = Deadline::after(STOP_WITHIN);
        while !deadline.passed() {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the server with SIGKILL, as a crash would, and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is answered.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal(child, "STOP");
        }
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal(child, "CONT");
        }
    }

    /// Starts a replica of this server (without persistence) and waits until it is in sync.
    pub fn start_replica(&self) -> RedisServer {
        let replica = Self::start_with(RedisOptions {
            replica_of: Some(self.port),
            ..RedisOptions::default()
        });
        let deadline = Deadline::after(READY_WITHIN);
        loop {
            let info = match replica.cmd(&["INFO", "replication"]) {
                redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                redis::Value::VerbatimString { text, .. } => text,
                _ => String::new(),
            };
            if info.contains("master_link_status:up") {
                return replica;
            }
            assert!(!deadline.passed(), "the replica did not sync: {info}");
            thread::sleep(POLL);
        }
    }

    /// Stops the server if it runs, and starts it again on the same port and directory, so an
    /// append-only file (or, without one, a `dump.rdb` made by `SAVE`) is reloaded. Returns once
    /// it answers `PING`.
    pub fn restart(&mut self) {
        self.stop();
        let mut last = String::new();
        for _ in 0..5 {
            match self.launch() {
                Ok(()) => return,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not restart on port {}: {last}", self.port);
    }

    /// Runs one command and returns its answer; panics on an error.
    pub fn cmd(&self, args: &[&str]) -> redis::Value {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("redis {args:?} failed: {e}"))
    }

    /// Runs one command on a fresh connection.
    pub fn try_cmd(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut connection = client.get_connection_with_timeout(Duration::from_secs(5))?;
        connection.set_read_timeout(Some(Duration::from_secs(5)))?;
        let Some((name, rest)) = args.split_first() else {
            panic!("cmd needs at least a command name");
        };
        let mut cmd = redis::cmd(name);
        for arg in rest {
            cmd.arg(*arg);
        }
        cmd.query(&mut connection)
    }

    /// Spawns redis-server on `self.port` and waits until it answers `PING`.
    fn launch(&mut self) -> Result<(), String> {
        let log_path = self.dir.join("redis.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot clone the log handle: {e}"))?;
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .args([
                "--appendonly",
                if self.options.appendonly { "yes" } else { "no" },
            ])
            .args([
                "--appendfsync",
                if self.options.appendfsync_always {
                    "always"
                } else {
                    "everysec"
                },
            ])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(primary) = self.options.replica_of {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not on PATH; the tests need redis-server 7 or later \
                 (e.g. `apt-get install redis-server`)"
            ),
            Err(e) => panic!("cannot run redis-server: {e}"),
        };
        let deadline = Deadline::after(READY_WITHIN);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server exited with {status}: {}",
                    self.log_tail()
                ));
            }
            if ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if deadline.passed() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no PONG within {READY_WITHIN:?}: {}",
                    self.log_tail()
                ));
            }
            thread::sleep(POLL);
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A point in real time. Not tokio's clock, which the workspace otherwise requires: the testkit
/// blocks a thread while a real process starts or stops, and a paused tokio clock would never
/// reach the deadline.
#[allow(clippy::disallowed_types)]
struct Deadline(std::time::Instant);

#[allow(clippy::disallowed_types)]
impl Deadline {
    fn after(duration: Duration) -> Self {
        Self(std::time::Instant::now() + duration)
    }

    fn passed(&self) -> bool {
        std::time::Instant::now() >= self.0
    }
}

/// Sends `SIG<name>` to the child we started, and only to it.
fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether a server on `port` answers `PING` with `PONG` (not `LOADING`) right now.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut answer = [0u8; 16];
    matches!(stream.read(&mut answer), Ok(n) if answer[..n].starts_with(b"+PONG"))
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

fn unique_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    std::env::temp_dir().join(format!(
        "ferry-redis-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}
