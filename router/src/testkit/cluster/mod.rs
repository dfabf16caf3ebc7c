//! A real Redis Cluster for tests: `redis-server --cluster-enabled yes` nodes joined by
//! `redis-cli --cluster create`, which tests can fail over, crash, pause and reshard while
//! clients use it, and which reports where each slot lives by asking the nodes.
//!
//! Starting the default 3 primaries × 1 replica takes about 1.5 s (2-core machine: 0.2 s to
//! start the six processes, 1 s in `redis-cli --cluster create`, which sleeps a second while the
//! nodes meet, and up to 1 s until every replica is listed by CLUSTER SLOTS); with TLS about 2 s.

mod resharding;
mod topology;

use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

pub use resharding::SlotMigration;

use super::{RedisAccess, RedisOptions, RedisServer, TestCerts, text};
use topology::View;

/// How long a cluster may take to form, or to settle after a change.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);
/// Pause between two polls of the whole cluster.
const CLUSTER_POLL: Duration = Duration::from_millis(50);

/// The shape of a test cluster and how its nodes are reached.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Primaries, each serving an equal share of the slots; at least 3.
    pub primaries: usize,
    /// Replicas of each primary.
    pub replicas_per_primary: usize,
    /// `cluster-node-timeout`: a primary unreachable for this long is failed over, within a
    /// second or two more.
    pub node_timeout_ms: u64,
    /// `appendonly yes` (with `appendfsync everysec`) on every node.
    pub appendonly: bool,
    /// TLS for clients, replication and the cluster bus; seed URLs are then `rediss://`.
    pub tls: Option<Arc<TestCerts>>,
    /// With TLS, require a client certificate (`tls-auth-clients yes`) instead of `optional`.
    pub tls_auth_clients: bool,
    /// `(user, password)`: the only user, as for [`RedisAccess::acl`]; seed URLs carry it.
    pub acl: Option<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            primaries: 3,
            replicas_per_primary: 1,
            node_timeout_ms: 1000,
            appendonly: false,
            tls: None,
            tls_auth_clients: false,
            acl: None,
        }
    }
}

/// A running Redis Cluster. Nodes are named by their plain-TCP port (`RedisServer::port()`),
/// which the kit uses for its own commands even with TLS. Every node is killed and its
/// directory removed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// Each node's id (CLUSTER MYID), in the order of `nodes`; a node keeps it across restarts.
    ids: Vec<String>,
    options: ClusterOptions,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and returns once it has settled: `cluster_state:ok`
    /// on every node, all 16384 slots served, every replica in sync, and every node giving the
    /// same CLUSTER SLOTS.
    pub fn start(options: ClusterOptions) -> RedisCluster {
        assert!(
            options.primaries >= 3,
            "redis-cli --cluster create needs at least 3 primaries"
        );
        let access = RedisAccess {
            tls: options.tls.clone(),
            tls_auth_clients: options.tls_auth_clients,
            acl: options.acl.clone(),
        };
        let node_options = RedisOptions {
            appendonly: options.appendonly,
            ..RedisOptions::default()
        };
        let count = options.primaries * (1 + options.replicas_per_primary);
        let nodes: Vec<RedisServer> = thread::scope(|scope| {
            let starting: Vec<_> = (0..count)
                .map(|_| {
                    scope.spawn(|| {
                        RedisServer::start_node(
                            node_options,
                            access.clone(),
                            Some(options.node_timeout_ms),
                        )
                    })
                })
                .collect();
            starting
                .into_iter()
                .map(|node| node.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let mut cluster = RedisCluster {
            nodes,
            ids: Vec::new(),
            options,
        };
        cluster.create();
        cluster.ids = cluster
            .nodes
            .iter()
            .map(|node| text(node.cmd(&["CLUSTER", "MYID"])))
            .collect();
        cluster.wait_converged();
        cluster
    }

    /// One 3 × 1 cluster for the whole test process, started on first use, for tests that only
    /// read and write (each under its own key prefix) and never disrupt it. Its nodes are
    /// killed when the test process exits.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(|| RedisCluster::start(ClusterOptions::default()))
    }

    /// One URL per node: `redis://127.0.0.1:<port>/`, or `rediss://…:<tls port>/` with TLS,
    /// with `user:password@` when there is an ACL user.
    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| match self.options.tls {
                Some(_) => node.tls_url(),
                None => node.url(),
            })
            .collect()
    }

    /// The first seed URL.
    pub fn url(&self) -> String {
        self.seed_urls().swap_remove(0)
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// Every node, primaries and replicas, in no particular order.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The node listening on `port` (its plain or its TLS port).
    pub fn node_by_port(&self, port: u16) -> &RedisServer {
        &self.nodes[self.position(port)]
    }

    /// The node listening on `port`, to `kill()`, `stop()` or `restart()` it.
    pub fn node_by_port_mut(&mut self, port: u16) -> &mut RedisServer {
        let index = self.position(port);
        &mut self.nodes[index]
    }

    /// Runs one command on the node on `port` and returns the answer as `redis-cli` prints it;
    /// panics on an error (a key on another node gives a MOVED error).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        text(self.node_by_port(port).cmd(args))
    }

    /// The hash slot of `key`: CRC16 (XMODEM) of the key, or of its `{hash tag}`, mod 16384.
    pub fn slot_of(&self, key: &str) -> u16 {
        super::slot_of(key)
    }

    /// A hash tag (`{…}`, braces included) whose keys are all in `slot`.
    pub fn hash_tag_for_slot(&self, slot: u16) -> String {
        (0u64..)
            .map(|n| format!("{{t{n}}}"))
            .find(|tag| super::slot_of(tag) == slot)
            .unwrap_or_else(|| unreachable!("every slot has a tag"))
    }

    /// The port of the primary serving `slot`, as every answering node agrees (waits for that).
    pub fn primary_for_slot(&self, slot: u16) -> u16 {
        self.settle("agreement on slot owners", || {
            let views = self.agreed_views()?;
            let owner = views[0]
                .1
                .owner(slot)
                .ok_or_else(|| format!("slot {slot} is not served"))?;
            Ok(self.nodes[self.index_of(owner)?].port())
        })
    }

    /// The ports of the primaries serving slots, in slot order, as the nodes agree.
    pub fn primaries(&self) -> Vec<u16> {
        let views = self.settle("agreement on slot owners", || self.agreed_views());
        let mut ports = Vec::new();
        for range in &views[0].1.slots {
            let port = self.nodes[self
                .index_of(&range.primary)
                .unwrap_or_else(|e| panic!("{e}"))]
            .port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        ports
    }

    /// The ports of the replicas of the primary on `primary_port` that the cluster does not
    /// consider failed, as the first answering node sees them.
    pub fn replicas_of(&self, primary_port: u16) -> Vec<u16> {
        let primary_id = &self.ids[self.position(primary_port)];
        let views = self.settle("an answer", || self.views());
        let (_, view) = views
            .first()
            .unwrap_or_else(|| panic!("no node is running"));
        view.known
            .iter()
            .filter(|node| node.primary.as_ref() == Some(primary_id))
            .filter(|node| !node.flags.iter().any(|f| f == "fail"))
            .map(|node| {
                let index = self.index_of(&node.id).unwrap_or_else(|e| panic!("{e}"));
                self.nodes[index].port()
            })
            .collect()
    }

    /// Kills the primary on `port` with SIGKILL. Its replica takes over once the other nodes
    /// have found it failed: see [`RedisCluster::wait_for_new_primary`].
    pub fn kill_primary(&mut self, port: u16) {
        assert!(
            self.primaries().contains(&self.node_by_port(port).port()),
            "port {port} is not a primary serving slots"
        );
        self.node_by_port_mut(port).kill();
    }

    /// Waits until a running node serves `slot` as primary, all answering nodes agree on it
    /// and say `cluster_state:ok`, and returns that node's port. About 2–3 s after a primary
    /// is killed with the default 1 s node timeout.
    pub fn wait_for_new_primary(&self, slot: u16) -> u16 {
        self.settle("a running primary for the slot", || {
            let views = self.agreed_views()?;
            for (index, view) in &views {
                if !view.info.contains("cluster_state:ok") {
                    return Err(format!("port {} is not ok", self.nodes[*index].port()));
                }
            }
            let owner = views[0]
                .1
                .owner(slot)
                .ok_or_else(|| format!("slot {slot} is not served"))?;
            let node = &self.nodes[self.index_of(owner)?];
            if node.pid().is_none() {
                return Err(format!(
                    "slot {slot} is still on stopped port {}",
                    node.port()
                ));
            }
            Ok(node.port())
        })
    }

    /// Promotes the replica on `replica_port` with `CLUSTER FAILOVER` (its primary agreeing) and
    /// waits until every node sees it serving its former primary's slots, the former primary
    /// has become its replica, and the cluster has settled.
    pub fn failover(&self, replica_port: u16) {
        let index = self.position(replica_port);
        let view = View::of(&self.nodes[index]).unwrap_or_else(|e| panic!("{e}"));
        let primary_id = view
            .known
            .iter()
            .find(|node| node.id == self.ids[index])
            .and_then(|node| node.primary.clone())
            .unwrap_or_else(|| panic!("port {replica_port} is not a replica"));
        let slot = view
            .slots
            .iter()
            .find(|range| range.primary == primary_id)
            .map(|range| range.first)
            .unwrap_or_else(|| panic!("the primary of port {replica_port} serves no slot"));
        self.cli(replica_port, &["CLUSTER", "FAILOVER"]);
        self.settle("the failover", || {
            let owner = self.agreed_views()?[0].1.owner(slot).map(str::to_owned);
            if owner.as_deref() != Some(self.ids[index].as_str()) {
                return Err(format!("slot {slot} is still served by {owner:?}"));
            }
            self.convergence()
        });
    }

    /// Waits until the cluster has settled, as after `start`: every answering node is ok and
    /// agrees on the slot owners, no running node is seen failed, no slot is half migrated and
    /// every running replica is in sync.
    pub fn wait_converged(&self) {
        self.settle("convergence", || self.convergence());
    }

    /// Runs `redis-cli --cluster create` over every node.
    fn create(&self) {
        let addresses: Vec<String> = self
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.tls_port.unwrap_or(node.port)))
            .collect();
        let output = self
            .redis_cli()
            .args(["--cluster", "create"])
            .args(&addresses)
            .args([
                "--cluster-replicas",
                &self.options.replicas_per_primary.to_string(),
                "--cluster-yes",
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli (it comes with redis-server): {e}"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `redis-cli` with the cluster's TLS and ACL user (the password in `REDISCLI_AUTH`, not
    /// on the command line).
    fn redis_cli(&self) -> Command {
        let mut command = Command::new("redis-cli");
        command.stdin(Stdio::null());
        if let Some(certs) = &self.options.tls {
            command
                .arg("--tls")
                .arg("--cacert")
                .arg(certs.ca_file())
                .arg("--cert")
                .arg(certs.client_cert())
                .arg("--key")
                .arg(certs.client_key());
        }
        if let Some((user, password)) = &self.options.acl {
            command
                .args(["--user", user])
                .env("REDISCLI_AUTH", password);
        }
        command
    }

    /// The index in `nodes` of the node listening on `port`.
    fn position(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|node| node.port == port || node.tls_port == Some(port))
            .unwrap_or_else(|| panic!("no node of this cluster listens on port {port}"))
    }
}

impl Drop for RedisCluster {
    /// Kills every node at once (a clean shutdown would only wait for replicas); each node's
    /// own drop then removes its directory.
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}
