//! Redis Cluster's shape as Ferry needs it: the slot of a user's keys, and which primary owns
//! each slot (from `CLUSTER SLOTS`), with a short, stable name per shard for metrics.

use std::collections::BTreeMap;
use std::fmt;

use ferry_shared::{KeyKind, Keys, UserId};
use redis::Value;

use crate::script::string;

/// Slots in a Redis Cluster.
pub(crate) const SLOTS: u16 = 16_384;

/// The slot of `key`, by Redis's rule: the CRC16 of its hash tag (the part between the first
/// `{` and the next `}`, when not empty), else of the whole key.
pub(crate) fn slot_of_key(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS
}

/// The slot of all of `user`'s keys and its live channel (they share one hash tag).
pub(crate) fn slot_of_user(keys: &Keys, user: &UserId) -> u16 {
    slot_of_key(keys.key(user, KeyKind::Meta).to_string().as_bytes())
}

/// A node's address, as `CLUSTER SLOTS` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct NodeAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Which primary owns each slot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SlotMap {
    /// First slot of each range → (last slot, owner).
    ranges: BTreeMap<u16, (u16, NodeAddr)>,
}

impl SlotMap {
    /// A map in which `owner` has every slot (a standalone server).
    pub fn single(owner: NodeAddr) -> Self {
        Self {
            ranges: BTreeMap::from([(0, (SLOTS - 1, owner))]),
        }
    }

    /// Reads a `CLUSTER SLOTS` answer. An empty host means "the node you asked", `asked`.
    pub fn parse(value: &Value, asked: &NodeAddr) -> Result<SlotMap, String> {
        let Value::Array(entries) = value else {
            return Err(format!("CLUSTER SLOTS answered {value:?}"));
        };
        let mut ranges = BTreeMap::new();
        for entry in entries {
            let Value::Array(fields) = entry else {
                return Err("a CLUSTER SLOTS entry is not an array".into());
            };
            let [
                Value::Int(first),
                Value::Int(last),
                Value::Array(primary),
                ..,
            ] = fields.as_slice()
            else {
                return Err("a CLUSTER SLOTS entry lacks its range or primary".into());
            };
            let (Ok(first), Ok(last)) = (u16::try_from(*first), u16::try_from(*last)) else {
                return Err("a CLUSTER SLOTS range is out of bounds".into());
            };
            if first > last || last >= SLOTS {
                return Err("a CLUSTER SLOTS range is out of bounds".into());
            }
            let owner = match primary.as_slice() {
                [host, Value::Int(port), ..] => {
                    let host = string(host).ok_or("a CLUSTER SLOTS host is not a string")?;
                    NodeAddr {
                        host: if host.is_empty() || host == "?" {
                            asked.host.clone()
                        } else {
                            host
                        },
                        port: u16::try_from(*port)
                            .map_err(|_| "a CLUSTER SLOTS port is invalid")?,
                    }
                }
                _ => return Err("a CLUSTER SLOTS primary lacks host or port".into()),
            };
            ranges.insert(first, (last, owner));
        }
        Ok(SlotMap { ranges })
    }

    /// The primary that owns `slot`, `None` while no node does (the cluster is not ok).
    pub fn owner(&self, slot: u16) -> Option<&NodeAddr> {
        let (_, (last, owner)) = self.ranges.range(..=slot).next_back()?;
        (slot <= *last).then_some(owner)
    }

    /// Every primary that owns slots, each once.
    pub fn primaries(&self) -> Vec<NodeAddr> {
        let mut primaries: Vec<NodeAddr> = self.ranges.values().map(|(_, o)| o.clone()).collect();
        primaries.sort();
        primaries.dedup();
        primaries
    }

    /// Whether every slot has an owner.
    pub fn is_complete(&self) -> bool {
        let mut next = 0u32;
        for (&first, &(last, _)) in &self.ranges {
            if u32::from(first) != next {
                return false;
            }
            next = u32::from(last) + 1;
        }
        next == u32::from(SLOTS)
    }

    /// A short name for `node`'s shard on metrics: the first slot it owns, `slots-<n>`. It
    /// stays across a failover (the promoted replica owns the same slots), and there are never
    /// more names than shards.
    pub fn shard_label(&self, node: &NodeAddr) -> String {
        self.ranges
            .iter()
            .find(|(_, (_, owner))| owner == node)
            .map_or_else(|| "none".to_owned(), |(first, _)| format!("slots-{first}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> NodeAddr {
        NodeAddr {
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn slots_follow_redis() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot_of_key(b"123456789"), 12_739);
        assert_eq!(slot_of_key(b"foo"), 12_182);
        assert_eq!(
            slot_of_key(b"{user1000}.following"),
            slot_of_key(b"user1000")
        );
        assert_eq!(slot_of_key(b"foo{}{bar}"), slot_of_key(b"foo{}{bar}"));
        assert_ne!(slot_of_key(b"foo{}{bar}"), slot_of_key(b"bar"));
        assert_eq!(slot_of_key(b"foo{{bar}}zap"), slot_of_key(b"{bar"));
        let keys = Keys::new("ferry");
        let user = UserId::parse("alice").expect("valid");
        assert_eq!(slot_of_user(&keys, &user), slot_of_key(b"u:alice"));
        assert_eq!(
            slot_of_user(&keys, &user),
            slot_of_key(keys.live(&user).as_bytes())
        );
    }

    #[test]
    fn cluster_slots_are_read() {
        let entry = |first: i64, last: i64, host: &str, port: i64| {
            Value::Array(vec![
                Value::Int(first),
                Value::Int(last),
                Value::Array(vec![bulk(host), Value::Int(port), bulk("id")]),
                Value::Array(vec![bulk(host), Value::Int(port + 100), bulk("replica")]),
            ])
        };
        let answer = Value::Array(vec![
            entry(5461, 10922, "127.0.0.1", 7001),
            entry(0, 5460, "", 7000),
            entry(10923, 16383, "127.0.0.1", 7002),
        ]);
        let map = SlotMap::parse(&answer, &addr(7000)).expect("parses");
        assert!(map.is_complete());
        assert_eq!(map.owner(0), Some(&addr(7000)));
        assert_eq!(map.owner(5461), Some(&addr(7001)));
        assert_eq!(map.owner(16383), Some(&addr(7002)));
        assert_eq!(map.primaries(), vec![addr(7000), addr(7001), addr(7002)]);
        assert_eq!(map.shard_label(&addr(7001)), "slots-5461");
        assert_eq!(map.shard_label(&addr(9999)), "none");

        let partial = Value::Array(vec![entry(0, 100, "127.0.0.1", 7000)]);
        let map = SlotMap::parse(&partial, &addr(7000)).expect("parses");
        assert!(!map.is_complete());
        assert_eq!(map.owner(101), None);
        assert!(SlotMap::parse(&Value::Int(1), &addr(7000)).is_err());
        let bad = Value::Array(vec![entry(0, 20000, "h", 1)]);
        assert!(SlotMap::parse(&bad, &addr(7000)).is_err());
        assert!(SlotMap::single(addr(1)).is_complete());
    }
}
