//! Running one `redis-server` process: its command line and config, waiting until it answers,
//! free ports, fresh directories, and the watcher that kills what a dead test process left.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{READY_WITHIN, RedisServer};

/// Pause between two polls of a condition.
pub(super) const POLL: Duration = Duration::from_millis(10);

impl RedisServer {
    /// Spawns redis-server on `self.port` and waits until it answers `PING`.
    pub(super) fn launch(&mut self) -> Result<(), String> {
        let log_path = self.dir.join("redis.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot clone the log handle: {e}"))?;
        let mut command = self.command_line();
        command.stdin(Stdio::null()).stdout(log).stderr(log_err);
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
            if ping(self.port, self.access.acl.as_ref()) {
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

    /// The `redis-server` command line: everything but the ACL user, which is in a config file
    /// so the password is not on a command line.
    fn command_line(&self) -> Command {
        let mut command = Command::new("redis-server");
        if self.access.acl.is_some() {
            command.arg(self.dir.join("access.conf"));
        }
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            // For the watcher, should the test process die without dropping the server.
            .arg("--pidfile")
            .arg(self.dir.join("redis.pid"))
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
            ]);
        if let Some(primary) = self.options.replica_of {
            command.args(["--replicaof", "127.0.0.1", &primary.to_string()]);
        }
        if let (Some(certs), Some(tls_port)) = (&self.access.tls, self.tls_port) {
            command
                .args(["--tls-port", &tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(certs.server_cert())
                .arg("--tls-key-file")
                .arg(certs.server_key())
                .arg("--tls-ca-cert-file")
                .arg(certs.ca_file())
                // The certificate a node shows when it is the client: replication, cluster bus.
                .arg("--tls-client-cert-file")
                .arg(certs.client_cert())
                .arg("--tls-client-key-file")
                .arg(certs.client_key())
                .args([
                    "--tls-auth-clients",
                    if self.access.tls_auth_clients {
                        "yes"
                    } else {
                        "optional"
                    },
                ])
                .args(["--tls-replication", "yes"]);
        }
        if let Some(cluster) = self.cluster {
            command
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(self.dir.join("nodes.conf"))
                .args(["--cluster-port", &cluster.bus_port.to_string()])
                .args([
                    "--cluster-node-timeout",
                    &cluster.node_timeout_ms.to_string(),
                ])
                // A replica may take over however long it was cut off: tests pause nodes.
                .args(["--cluster-replica-validity-factor", "0"])
                // A replica syncs at once instead of waiting 5 s for others to share the sync.
                .args(["--repl-diskless-sync-delay", "0"])
                // Redis 7.0 leaves a replica out of CLUSTER SLOTS until its replication offset
                // moves; the primary's PING to its replicas moves it, every second instead of 10.
                .args(["--repl-ping-replica-period", "1"]);
            if self.access.tls.is_some() {
                command.args(["--tls-cluster", "yes"]);
            }
        }
        command
    }

    /// Writes `access.conf` with the ACL user, if there is one.
    pub(super) fn write_access_config(&self) {
        let Some((user, password)) = &self.access.acl else {
            return;
        };
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"');
        assert!(
            plain(user) && plain(password),
            "an ACL user name and password must be printable ASCII without spaces or quotes"
        );
        let config = format!(
            "user default off\n\
             user {user} on >{password} ~* &* +@all\n\
             masteruser {user}\n\
             masterauth {password}\n"
        );
        let path = self.dir.join("access.conf");
        fs::write(&path, config).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    pub(super) fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Removes the pid file of a server that has exited, so the watcher never kills a process
    /// that later got the same id.
    pub(super) fn forget_pid_file(&self) {
        let _ = fs::remove_file(self.dir.join("redis.pid"));
    }
}

/// A point in real time. Not tokio's clock, which the workspace otherwise requires: the testkit
/// blocks a thread while a real process starts or stops, and a paused tokio clock would never
/// reach the deadline.
#[allow(clippy::disallowed_types)]
pub(super) struct Deadline(std::time::Instant);

#[allow(clippy::disallowed_types)]
impl Deadline {
    pub(super) fn after(duration: Duration) -> Self {
        Self(std::time::Instant::now() + duration)
    }

    pub(super) fn passed(&self) -> bool {
        std::time::Instant::now() >= self.0
    }
}

/// Sends `SIG<name>` to the child we started, and only to it.
pub(super) fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether a server on `port` answers `PING` with `PONG` (not `LOADING`) right now,
/// authenticating first as the ACL user if there is one.
fn ping(port: u16, acl: Option<&(String, String)>) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut request = Vec::new();
    if let Some((user, password)) = acl {
        request.extend(resp_command(&["AUTH", user, password]));
    }
    request.extend(resp_command(&["PING"]));
    if stream.write_all(&request).is_err() {
        return false;
    }
    // One line per command: `+OK` for AUTH, then `+PONG`, `-LOADING …` or an error.
    let expected = if acl.is_some() { 2 } else { 1 };
    let mut answer = Vec::new();
    let mut chunk = [0u8; 256];
    while answer.windows(2).filter(|w| w == b"\r\n").count() < expected {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    let expected_answer: &[u8] = if acl.is_some() {
        b"+OK\r\n+PONG\r\n"
    } else {
        b"+PONG\r\n"
    };
    answer == expected_answer
}

/// A command in RESP, the form that takes any bytes in an argument.
fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend(format!("${}\r\n", arg.len()).into_bytes());
        out.extend(arg.as_bytes());
        out.extend(b"\r\n");
    }
    out
}

/// `count` distinct free loopback ports, found by binding them all at once.
pub(super) fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
        })
        .collect();
    listeners
        .iter()
        .map(|listener| {
            listener
                .local_addr()
                .map(|addr| addr.port())
                .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
        })
        .collect()
}

/// A path for a new directory, `ferry-<kind>-<test pid>-…` in the temp dir (not created), which
/// the watcher removes if the test process dies first.
pub(super) fn unique_dir(kind: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    watch_for_exit();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    std::env::temp_dir().join(format!(
        "ferry-{kind}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Starts, once per test process, a shell that waits for this process to end and then kills
/// every redis-server it left running (found through the pid files in its directories) and
/// removes those directories. Drop does that in the normal case; this covers servers held in
/// statics (`RedisCluster::shared`), aborts and signals. Best effort: without `sh` it does
/// nothing.
fn watch_for_exit() {
    static WATCHER: OnceLock<()> = OnceLock::new();
    WATCHER.get_or_init(|| {
        const SCRIPT: &str = r#"
            while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
            for f in "$2"/ferry-redis-"$1"-*/redis.pid; do
                [ -f "$f" ] || continue
                p=$(cat "$f")
                [ "$(ps -o comm= -p "$p" 2>/dev/null)" = redis-server ] && kill -9 "$p"
            done
            rm -rf "$2"/ferry-redis-"$1"-* "$2"/ferry-certs-"$1"-*
        "#;
        let _ = Command::new("sh")
            .args(["-c", SCRIPT, "ferry-testkit-watcher"])
            .arg(std::process::id().to_string())
            .arg(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    });
}
