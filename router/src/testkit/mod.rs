//! Test support (feature `testkit`): real `redis-server` processes on free loopback ports in fresh
//! directories, which tests can stop, crash, pause, restart and query: a single server (with TLS
//! and an ACL user if asked), a Redis Cluster, and the certificates TLS needs. Panics are its
//! error reporting: it only runs in tests.
//!
//! Every server keeps a plain-TCP port on 127.0.0.1 for the kit's own control commands, even when
//! clients are meant to use TLS. Directories and processes go away when their owner is dropped;
//! if the test process dies first (a `static`, an abort, a signal), a watcher process started on
//! first use kills what is left within half a second.

mod cluster;
mod process;
mod tls;

use std::fs;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

pub use cluster::{ClusterOptions, RedisCluster, SlotMigration};
pub use tls::TestCerts;

use process::{Deadline, POLL, free_ports, signal, unique_dir};

/// How long a starting or restarting server may take to answer `PING` (an AOF reload included).
const READY_WITHIN: Duration = Duration::from_secs(20);
/// How long a stopping server may take to exit before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// How the server persists.
#[derive(Debug, Clone, Copy, Default)]
pub struct RedisOptions {
    /// `appendonly yes`: data survives a restart (and with `appendfsync_always`, a crash).
    pub appendonly: bool,
    /// `appendfsync always` instead of `everysec`.
    pub appendfsync_always: bool,
    /// Start as a replica of the server on this loopback port (its `tls_port()` when the replica
    /// has TLS, since replication then runs over TLS).
    pub replica_of: Option<u16>,
}

/// Who may talk to the server and how. Kept apart from [`RedisOptions`] so the tests that spell
/// out every field of that struct keep compiling. The default is plain TCP and the passwordless
/// `default` user, as before.
#[derive(Clone, Default)]
pub struct RedisAccess {
    /// Also listen with TLS on `tls_port()`, with this CA's server certificate.
    pub tls: Option<Arc<TestCerts>>,
    /// With TLS, require a client certificate signed by the CA (`tls-auth-clients yes`); without
    /// it one is checked if sent but not required (`optional`).
    pub tls_auth_clients: bool,
    /// `(user, password)`: this user may run anything, and the `default` user is disabled, so a
    /// client that does not authenticate is refused. The server and its replicas authenticate to
    /// one another as this user.
    pub acl: Option<(String, String)>,
}

impl std::fmt::Debug for RedisAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAccess")
            .field("tls", &self.tls)
            .field("tls_auth_clients", &self.tls_auth_clients)
            .field("acl_user", &self.acl.as_ref().map(|(user, _)| user))
            .finish_non_exhaustive()
    }
}

/// What a cluster node needs on top of a standalone server.
#[derive(Debug, Clone, Copy)]
struct ClusterMode {
    /// The cluster bus port, chosen free rather than left at `port + 10000`, which may be taken
    /// or past 65535.
    bus_port: u16,
    /// `cluster-node-timeout`: how long a node may be unreachable before it is failed over.
    node_timeout_ms: u64,
}

/// A `redis-server` child process, stopped and its directory removed on drop.
pub struct RedisServer {
    /// `None` while stopped.
    child: Option<Child>,
    /// The plain-TCP port, which the kit's control commands use even when clients use TLS.
    port: u16,
    /// The TLS port, when the server has TLS.
    tls_port: Option<u16>,
    /// `Some` for a node of a [`RedisCluster`].
    cluster: Option<ClusterMode>,
    dir: PathBuf,
    options: RedisOptions,
    access: RedisAccess,
    /// Set between `pause()` and `resume()`, so a cluster does not wait for a frozen node.
    paused: AtomicBool,
}

impl RedisServer {
    /// Starts a server without persistence.
    pub fn start() -> RedisServer {
        Self::start_with(RedisOptions::default())
    }

    pub fn start_with(options: RedisOptions) -> RedisServer {
        Self::start_with_access(options, RedisAccess::default())
    }

    /// Starts a server with TLS and/or an ACL user as `access` says.
    pub fn start_with_access(options: RedisOptions, access: RedisAccess) -> RedisServer {
        Self::start_node(options, access, None)
    }

    /// Starts a standalone server, or a cluster node when `node_timeout_ms` is given.
    fn start_node(
        options: RedisOptions,
        access: RedisAccess,
        node_timeout_ms: Option<u64>,
    ) -> RedisServer {
        let dir = unique_dir("redis");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let mut server = RedisServer {
            child: None,
            port: 0,
            tls_port: None,
            cluster: None,
            dir,
            options,
            access,
            paused: AtomicBool::new(false),
        };
        server.write_access_config();
        // Another process may take a free port before redis-server binds it: try a few.
        let mut failures = Vec::new();
        for _ in 0..5 {
            let ports = free_ports(3);
            server.port = ports[0];
            server.tls_port = server.access.tls.is_some().then_some(ports[1]);
            server.cluster = node_timeout_ms.map(|node_timeout_ms| ClusterMode {
                bus_port: ports[2],
                node_timeout_ms,
            });
            match server.launch() {
                Ok(()) => return server,
                Err(e) => failures.push(e),
            }
        }
        panic!("redis-server did not start: {failures:#?}");
    }

    /// `redis://127.0.0.1:<port>/`, with `user:password@` when the server has an ACL user.
    pub fn url(&self) -> String {
        format!("redis://{}127.0.0.1:{}/", self.userinfo(), self.port)
    }

    /// `rediss://127.0.0.1:<tls port>/`, with `user:password@` when the server has an ACL user.
    /// Panics if the server has no TLS.
    pub fn tls_url(&self) -> String {
        format!("rediss://{}127.0.0.1:{}/", self.userinfo(), self.tls_port())
    }

    /// The plain-TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS port. Panics if the server has no TLS.
    pub fn tls_port(&self) -> u16 {
        self.tls_port
            .unwrap_or_else(|| panic!("the server on port {} has no TLS", self.port))
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
        self.paused.store(false, Ordering::Relaxed);
        signal(&child, "CONT");
        signal(&child, "TERM");
        let deadline = Deadline::after(STOP_WITHIN);
        while !deadline.passed() {
            if let Ok(Some(_)) = child.try_wait() {
                self.forget_pid_file();
                return;
            }
            thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
        self.forget_pid_file();
    }

    /// Kills the server with SIGKILL, as a crash would, and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.paused.store(false, Ordering::Relaxed);
            self.forget_pid_file();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing is answered.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal(child, "STOP");
            self.paused.store(true, Ordering::Relaxed);
        }
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal(child, "CONT");
            self.paused.store(false, Ordering::Relaxed);
        }
    }

    /// Starts a replica of this server (without persistence, with the same TLS and ACL user) and
    /// waits until it is in sync.
    pub fn start_replica(&self) -> RedisServer {
        let replica = Self::start_with_access(
            RedisOptions {
                replica_of: Some(self.tls_port.unwrap_or(self.port)),
                ..RedisOptions::default()
            },
            self.access.clone(),
        );
        let deadline = Deadline::after(READY_WITHIN);
        loop {
            let info = text(replica.cmd(&["INFO", "replication"]));
            if info.contains("master_link_status:up") {
                return replica;
            }
            assert!(!deadline.passed(), "the replica did not sync: {info}");
            thread::sleep(POLL);
        }
    }

    /// Stops the server if it runs, and starts it again on the same port and directory, so an
    /// append-only file (or, without one, a `dump.rdb` made by `SAVE`) is reloaded. Returns once
    /// it answers `PING`. A cluster node rejoins with its saved cluster configuration.
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
        let mut connection = self.connect()?;
        query(&mut connection, args)
    }

    /// A new plain-TCP connection, authenticated when the server has an ACL user.
    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(self.url())?;
        let connection = client.get_connection_with_timeout(Duration::from_secs(5))?;
        connection.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(connection)
    }

    /// Whether the server runs and is not paused, so it can answer.
    fn is_answering(&self) -> bool {
        self.child.is_some() && !self.paused.load(Ordering::Relaxed)
    }

    /// `user:password@`, percent-encoded, or nothing without an ACL user.
    fn userinfo(&self) -> String {
        match &self.access.acl {
            Some((user, password)) => format!("{}:{}@", url_encode(user), url_encode(password)),
            None => String::new(),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `args` (command name first) on `connection`.
fn query(connection: &mut redis::Connection, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let Some((name, rest)) = args.split_first() else {
        panic!("a command needs at least a name");
    };
    let mut cmd = redis::cmd(name);
    for arg in rest {
        cmd.arg(*arg);
    }
    cmd.query(connection)
}

/// A reply as `redis-cli` would print it: strings as they are, one element per line.
fn text(value: redis::Value) -> String {
    match value {
        redis::Value::Nil => String::new(),
        redis::Value::Int(n) => n.to_string(),
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        redis::Value::SimpleString(s) => s,
        redis::Value::Okay => "OK".to_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        redis::Value::Double(x) => x.to_string(),
        redis::Value::Boolean(b) => b.to_string(),
        redis::Value::Array(items) | redis::Value::Set(items) => lines(items),
        redis::Value::Map(pairs) => lines(pairs.into_iter().flat_map(|(k, v)| [k, v])),
        other => format!("{other:?}"),
    }
}

fn lines(items: impl IntoIterator<Item = redis::Value>) -> String {
    items.into_iter().map(text).collect::<Vec<_>>().join("\n")
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for a URL's userinfo.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A key prefix no other user of this test process takes, for tests sharing one Redis (the
/// shared cluster): `t<pid>-<n>`.
pub fn unique_prefix() -> String {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The Redis Cluster hash slot of `key` (CRC16 of the key, or of its `{hash tag}`, mod 16384):
/// the router's own function.
pub fn slot_of(key: &str) -> u16 {
    crate::cluster::slot_of_key(key.as_bytes())
}
