//! Moving hash slots from one primary to another while clients use them, the way the Redis
//! Cluster specification describes manual resharding: IMPORTING on the target, MIGRATING on the
//! source, MIGRATE the keys in batches, then SETSLOT NODE on every primary.
//!
//! It is safe under load: once the source is MIGRATING, a key it does not have (new, or already
//! moved) is redirected to the target with ASK, so no key is created on the source after the
//! migration opens, and "no key left" stays true until the slot changes owner.

use std::ops::RangeInclusive;
use std::thread;
use std::time::Duration;

use super::RedisCluster;
use crate::testkit::{query, text};

/// How long MIGRATE may take to hand a batch of keys to the target.
const MIGRATE_TIMEOUT_MS: u32 = 10_000;
/// Keys per MIGRATE when nothing asks for fewer.
const BATCH: usize = 100;

/// A slot half way from one primary to another: open (IMPORTING/MIGRATING) until `finish`, so a
/// test can move some keys, look at what clients see, then finish. Dropped without `finish`,
/// it leaves the slot open.
pub struct SlotMigration<'a> {
    cluster: &'a RedisCluster,
    slot: u16,
    /// The indexes in `cluster.nodes` of the slot's primary and of the one it moves to.
    source: usize,
    target: usize,
    source_link: redis::Connection,
    target_link: redis::Connection,
}

impl RedisCluster {
    /// Moves `slot` to the primary on `to_port` (with its keys, whatever clients do meanwhile)
    /// and waits until every node agrees; nothing to do if that primary serves it already.
    pub fn migrate_slot(&self, slot: u16, to_port: u16) {
        self.migrate_slots(slot..=slot, to_port);
    }

    /// Moves every slot of `slots` to the primary on `to_port`, one after the other, then waits
    /// until every node agrees. Slots it serves already are left alone.
    pub fn migrate_slots(&self, slots: RangeInclusive<u16>, to_port: u16) {
        let target = self.position(to_port);
        let views = self.settle("agreement on slot owners", || self.agreed_views());
        let owners = &views[0].1;
        let moving: Vec<u16> = slots
            .filter(|&slot| owners.owner(slot) != Some(self.ids[target].as_str()))
            .collect();
        for &slot in &moving {
            let mut migration = self.begin_migration(slot, to_port);
            while migration.move_keys(BATCH) > 0 {}
            migration.hand_over();
        }
        self.wait_for_owner(&moving, target);
    }

    /// As [`RedisCluster::migrate_slot`], one key at a time with `pause` after opening the
    /// migration, after each key and before closing it, so that clients meet the slot half
    /// moved (ASK redirects; TRYAGAIN for a multi-key command over moved and unmoved keys).
    pub fn migrate_slot_slowly(&self, slot: u16, to_port: u16, pause: Duration) {
        let mut migration = self.begin_migration(slot, to_port);
        thread::sleep(pause);
        while migration.move_keys(1) > 0 {
            thread::sleep(pause);
        }
        migration.finish();
    }

    /// Opens the migration of `slot` to the primary on `to_port`: `CLUSTER SETSLOT <slot>
    /// IMPORTING <source>` on it, then `MIGRATING <target>` on the slot's primary. Panics if
    /// that primary is already the one on `to_port`.
    pub fn begin_migration(&self, slot: u16, to_port: u16) -> SlotMigration<'_> {
        let source = self.position(self.primary_for_slot(slot));
        let target = self.position(to_port);
        assert_ne!(source, target, "port {to_port} already serves slot {slot}");
        let link = |index: usize| {
            let node = &self.nodes[index];
            node.connect()
                .unwrap_or_else(|e| panic!("port {}: {e}", node.port))
        };
        let mut migration = SlotMigration {
            cluster: self,
            slot,
            source,
            target,
            source_link: link(source),
            target_link: link(target),
        };
        let slot = slot.to_string();
        let (source_id, target_id) = (&self.ids[source], &self.ids[target]);
        migration.on_target(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", source_id]);
        migration.on_source(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", target_id]);
        migration
    }

    /// Waits until every answering node says the node at `target` serves each of `slots`.
    fn wait_for_owner(&self, slots: &[u16], target: usize) {
        let target_id = self.ids[target].as_str();
        self.settle("agreement on the migrated slots", || {
            let views = self.agreed_views()?;
            match slots
                .iter()
                .find(|&&slot| views[0].1.owner(slot) != Some(target_id))
            {
                Some(slot) => Err(format!("slot {slot} has not changed owner everywhere")),
                None => Ok(()),
            }
        });
    }
}

impl SlotMigration<'_> {
    /// Moves up to `max` of the slot's keys from the source to the target with one MIGRATE,
    /// and returns how many it moved: 0 once the source has none left.
    pub fn move_keys(&mut self, max: usize) -> usize {
        let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(self.slot)
            .arg(max)
            .query(&mut self.source_link)
            .unwrap_or_else(|e| panic!("CLUSTER GETKEYSINSLOT {} failed: {e}", self.slot));
        if keys.is_empty() {
            return 0;
        }
        let target = &self.cluster.nodes[self.target];
        let mut migrate = redis::cmd("MIGRATE");
        // The source connects to the target as a client, over TLS when the cluster bus is TLS.
        migrate
            .arg("127.0.0.1")
            .arg(target.tls_port.unwrap_or(target.port))
            .arg("")
            .arg(0)
            .arg(MIGRATE_TIMEOUT_MS);
        if let Some((user, password)) = &self.cluster.options.acl {
            migrate.arg("AUTH2").arg(user).arg(password);
        }
        migrate.arg("KEYS").arg(&keys);
        // The command holds the password: only the error goes into the message.
        if let Err(e) = migrate.query::<redis::Value>(&mut self.source_link) {
            panic!(
                "MIGRATE of {} keys of slot {} from port {} to port {} failed: {e}",
                keys.len(),
                self.slot,
                self.cluster.nodes[self.source].port,
                target.port
            );
        }
        keys.len()
    }

    /// How many keys of the slot the source still has.
    pub fn keys_left(&mut self) -> usize {
        redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(self.slot)
            .query(&mut self.source_link)
            .unwrap_or_else(|e| panic!("CLUSTER COUNTKEYSINSLOT {} failed: {e}", self.slot))
    }

    /// Moves the keys left, gives the slot to the target and waits until every node agrees.
    pub fn finish(mut self) {
        while self.move_keys(BATCH) > 0 {}
        let (cluster, slot, target) = (self.cluster, self.slot, self.target);
        self.hand_over();
        cluster.wait_for_owner(&[slot], target);
    }

    /// `CLUSTER SETSLOT <slot> NODE <target>` on the target, the source, then every other
    /// answering primary (replicas refuse SETSLOT and learn it from them). The source must have
    /// no key of the slot left.
    fn hand_over(mut self) {
        let slot = self.slot.to_string();
        let target_id = self.cluster.ids[self.target].clone();
        let set_node = ["CLUSTER", "SETSLOT", &slot, "NODE", &target_id];
        self.on_target(&set_node);
        self.on_source(&set_node);
        let others = self
            .cluster
            .nodes
            .iter()
            .enumerate()
            .filter(|(index, node)| {
                *index != self.source && *index != self.target && node.is_answering()
            });
        for (_, node) in others {
            if text(node.cmd(&["ROLE"])).starts_with("master") {
                node.cmd(&set_node);
            }
        }
    }

    fn on_source(&mut self, args: &[&str]) {
        let port = self.cluster.nodes[self.source].port;
        checked(port, args, query(&mut self.source_link, args));
    }

    fn on_target(&mut self, args: &[&str]) {
        let port = self.cluster.nodes[self.target].port;
        checked(port, args, query(&mut self.target_link, args));
    }
}

/// Panics if `answer`, to `args` on the node on `port`, is an error.
fn checked(port: u16, args: &[&str], answer: redis::RedisResult<redis::Value>) {
    if let Err(e) = answer {
        panic!("{args:?} on port {port} failed: {e}");
    }
}
