//! What each node of a test cluster says about the cluster (CLUSTER INFO, SLOTS, NODES and its
//! replication state), and whether the nodes agree: the condition every cluster change waits for.

use std::collections::BTreeSet;
use std::thread;

use redis::Value;

use super::{CLUSTER_POLL, RedisCluster, SETTLE_WITHIN};
use crate::testkit::process::Deadline;
use crate::testkit::{RedisServer, query, text};

/// The number of hash slots in a Redis Cluster.
pub(super) const SLOTS: u16 = 16384;

/// A run of slots and the nodes serving it, by node id, as CLUSTER SLOTS lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SlotRange {
    pub(super) first: u16,
    pub(super) last: u16,
    pub(super) primary: String,
    /// Redis 7.0 leaves out failed replicas and those whose replication offset is still 0.
    pub(super) replicas: BTreeSet<String>,
}

/// One line of CLUSTER NODES: a node as another node sees it.
#[derive(Debug, Clone)]
pub(super) struct KnownNode {
    pub(super) id: String,
    /// `myself`, `master`, `slave`, `fail?`, `fail`, `handshake`, `noaddr`, …
    pub(super) flags: Vec<String>,
    /// The id of its primary, for a replica.
    pub(super) primary: Option<String>,
    /// A slot of this node is being migrated or imported (`[slot->-id]`, `[slot-<-id]`).
    pub(super) open_slots: bool,
}

/// Everything one node says about the cluster, read on one connection.
#[derive(Debug)]
pub(super) struct View {
    /// CLUSTER INFO.
    pub(super) info: String,
    /// CLUSTER SLOTS, sorted by first slot.
    pub(super) slots: Vec<SlotRange>,
    /// CLUSTER NODES.
    pub(super) known: Vec<KnownNode>,
    /// INFO replication.
    pub(super) replication: String,
}

impl View {
    /// Asks `node`; `Err` says why it did not answer.
    pub(super) fn of(node: &RedisServer) -> Result<View, String> {
        let failed = |e: redis::RedisError| format!("port {}: {e}", node.port());
        let mut connection = node.connect().map_err(failed)?;
        let mut ask = |args: &[&str]| query(&mut connection, args).map_err(failed);
        let info = text(ask(&["CLUSTER", "INFO"])?);
        let slots = parse_slots(ask(&["CLUSTER", "SLOTS"])?)?;
        let known = text(ask(&["CLUSTER", "NODES"])?)
            .lines()
            .filter_map(parse_known_node)
            .collect();
        let replication = text(ask(&["INFO", "replication"])?);
        Ok(View {
            info,
            slots,
            known,
            replication,
        })
    }

    /// The id of the primary serving `slot`, if any.
    pub(super) fn owner(&self, slot: u16) -> Option<&str> {
        self.slots
            .iter()
            .find(|range| (range.first..=range.last).contains(&slot))
            .map(|range| range.primary.as_str())
    }

    pub(super) fn is_replica(&self) -> bool {
        self.replication.contains("role:slave")
    }

    /// `cluster_state:ok` with every slot served.
    fn healthy(&self) -> bool {
        self.info.contains("cluster_state:ok")
            && self.info.contains(&format!("cluster_slots_ok:{SLOTS}"))
    }

    /// The slot ranges and their primaries, without replicas.
    fn owners(&self) -> Vec<(u16, u16, &str)> {
        self.slots
            .iter()
            .map(|range| (range.first, range.last, range.primary.as_str()))
            .collect()
    }
}

impl RedisCluster {
    /// What every node that can answer (running, not paused) says, with its index in `nodes`.
    pub(super) fn views(&self) -> Result<Vec<(usize, View)>, String> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| node.is_answering())
            .map(|(index, node)| View::of(node).map(|view| (index, view)))
            .collect()
    }

    /// The views of the answering nodes, once they all agree on who serves which slot.
    pub(super) fn agreed_views(&self) -> Result<Vec<(usize, View)>, String> {
        let views = self.views()?;
        let Some((first_index, first)) = views.first() else {
            return Err("no node is running".to_owned());
        };
        for (index, view) in &views[1..] {
            if view.owners() != first.owners() {
                return Err(format!(
                    "port {} and port {} disagree on slot owners: {:?} / {:?}",
                    self.nodes[*first_index].port(),
                    self.nodes[*index].port(),
                    first.owners(),
                    view.owners()
                ));
            }
        }
        Ok(views)
    }

    /// `Ok` once the cluster has settled: every answering node says `cluster_state:ok`, every
    /// slot is served, all of them agree on the owners, none knows of a failed, handshaking or
    /// unknown node among the running ones or of a slot being migrated, and every running
    /// replica is in sync and listed by CLUSTER SLOTS everywhere. `Err` says what is not yet so.
    pub(super) fn convergence(&self) -> Result<(), String> {
        let views = self.agreed_views()?;
        let replicas: Vec<&str> = views
            .iter()
            .filter(|(_, view)| view.is_replica())
            .map(|(index, _)| self.ids[*index].as_str())
            .collect();
        let running: Vec<&str> = views
            .iter()
            .map(|(index, _)| self.ids[*index].as_str())
            .collect();
        for (index, view) in &views {
            let port = self.nodes[*index].port();
            if !view.healthy() {
                return Err(format!("port {port} is not ok: {}", view.info));
            }
            check_coverage(&view.slots).map_err(|e| format!("port {port}: {e}"))?;
            for range in &view.slots {
                self.index_of(&range.primary)?;
            }
            if view.is_replica() && !view.replication.contains("master_link_status:up") {
                return Err(format!("replica on port {port} is not in sync"));
            }
            for node in &view.known {
                let running_node = running.contains(&node.id.as_str());
                let troubled = node
                    .flags
                    .iter()
                    .any(|flag| matches!(flag.as_str(), "fail" | "fail?" | "handshake" | "noaddr"));
                if node.open_slots || node.flags.iter().any(|flag| flag == "handshake") {
                    return Err(format!("port {port} sees an unsettled node: {node:?}"));
                }
                if running_node && troubled {
                    return Err(format!("port {port} sees running node {node:?} as failed"));
                }
            }
            for id in &self.ids {
                if !view.known.iter().any(|node| &node.id == id) {
                    return Err(format!("port {port} does not know node {id}"));
                }
            }
            for replica in &replicas {
                // A replica of a primary without slots has nothing to be listed under.
                let primary = view.known.iter().find(|node| node.id == *replica);
                let serving = primary
                    .and_then(|node| node.primary.as_deref())
                    .is_some_and(|id| view.slots.iter().any(|range| range.primary == id));
                if serving
                    && !view
                        .slots
                        .iter()
                        .any(|range| range.replicas.contains(*replica))
                {
                    return Err(format!(
                        "port {port} does not list replica {replica} in CLUSTER SLOTS yet"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Polls `check` until it gives `Ok`, for at most `SETTLE_WITHIN`; panics with its last
    /// error, saying it was waiting for `what`.
    pub(super) fn settle<T>(&self, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
        let deadline = Deadline::after(SETTLE_WITHIN);
        loop {
            match check() {
                Ok(value) => return value,
                Err(e) => assert!(
                    !deadline.passed(),
                    "the cluster did not settle ({what}) within {SETTLE_WITHIN:?}: {e}"
                ),
            }
            thread::sleep(CLUSTER_POLL);
        }
    }

    /// The index in `nodes` of the node with this id.
    pub(super) fn index_of(&self, id: &str) -> Result<usize, String> {
        self.ids
            .iter()
            .position(|known| known == id)
            .ok_or_else(|| format!("node {id} is not one of this cluster's"))
    }
}

/// Checks that `slots` (sorted) covers every slot exactly once.
fn check_coverage(slots: &[SlotRange]) -> Result<(), String> {
    let mut next = 0u32;
    for range in slots {
        if u32::from(range.first) != next {
            return Err(format!("slot {next} is not served"));
        }
        next = u32::from(range.last) + 1;
    }
    if next != u32::from(SLOTS) {
        return Err(format!("slot {next} is not served"));
    }
    Ok(())
}

/// CLUSTER SLOTS: `[[first, last, [ip, port, id, …] (primary), [ip, port, id, …]…], …]`.
fn parse_slots(value: Value) -> Result<Vec<SlotRange>, String> {
    let unexpected = |what: &Value| format!("unexpected CLUSTER SLOTS answer: {what:?}");
    let Value::Array(ranges) = &value else {
        return Err(unexpected(&value));
    };
    let mut slots = ranges
        .iter()
        .map(|range| {
            let Value::Array(fields) = range else {
                return Err(unexpected(range));
            };
            let slot = |field: Option<&Value>| match field {
                Some(Value::Int(n)) => u16::try_from(*n).map_err(|_| unexpected(range)),
                _ => Err(unexpected(range)),
            };
            let node_id = |node: &Value| match node {
                Value::Array(parts) => match parts.get(2) {
                    Some(Value::BulkString(id)) => Ok(String::from_utf8_lossy(id).into_owned()),
                    _ => Err(unexpected(range)),
                },
                _ => Err(unexpected(range)),
            };
            let mut nodes = fields.iter().skip(2).map(node_id);
            Ok(SlotRange {
                first: slot(fields.first())?,
                last: slot(fields.get(1))?,
                primary: nodes.next().ok_or_else(|| unexpected(range))??,
                replicas: nodes.collect::<Result<_, _>>()?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    slots.sort_by_key(|range| range.first);
    Ok(slots)
}

/// `<id> <ip:port@bus> <flags> <primary id or -> <ping> <pong> <epoch> <link> <slot>…`
fn parse_known_node(line: &str) -> Option<KnownNode> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 8 {
        return None;
    }
    Some(KnownNode {
        id: fields[0].to_owned(),
        flags: fields[2].split(',').map(str::to_owned).collect(),
        primary: (fields[3] != "-").then(|| fields[3].to_owned()),
        open_slots: fields[8..].iter().any(|slot| slot.starts_with('[')),
    })
}
