//! Names of one user's Redis keys and live channel. All of them carry the hash tag `{u:<user>}`,
//! so they share one Redis Cluster slot and one script may touch them together.

use crate::ids::{MessageId, UserId};

/// Key naming under a configurable prefix (`ferry` by default), so deployments can share a Redis.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new("ferry")
    }
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn user_key(&self, user: &UserId, suffix: &str) -> String {
        format!("{}:{{u:{}}}:{}", self.prefix, user, suffix)
    }

    /// Sorted set of unacknowledged messages; score = seq.
    pub fn inbox(&self, user: &UserId) -> String {
        self.user_key(user, "inbox")
    }

    /// Hash with `seq` (last allocated) and `epoch`.
    pub fn meta(&self, user: &UserId) -> String {
        self.user_key(user, "meta")
    }

    /// String holding the seq a `send` got, for the dedupe window. Sender and id are joined by
    /// `/`, which neither alphabet contains (both may contain `:`), so two different
    /// (sender, id) pairs never name one key.
    pub fn dedupe(&self, user: &UserId, sender: &UserId, id: &MessageId) -> String {
        self.user_key(user, &format!("dedupe:{sender}/{id}"))
    }

    /// Sorted set of inbox members that could not be decoded, moved out of the inbox (score =
    /// seq) and kept for a look until the inbox's TTL.
    pub fn quarantine(&self, user: &UserId) -> String {
        self.user_key(user, "quarantine")
    }

    /// Pub/sub channel carrying live notifications for `user`.
    pub fn live(&self, user: &UserId) -> String {
        self.user_key(user, "live")
    }

    /// The user a live channel name belongs to, if it is one of ours.
    pub fn user_of_live(&self, channel: &str) -> Option<UserId> {
        let rest = channel.strip_prefix(&self.prefix)?.strip_prefix(":{u:")?;
        let user = rest.strip_suffix("}:live")?;
        UserId::parse(user).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_hash_tag() {
        let k = Keys::default();
        let u = UserId::parse("bob@x").unwrap();
        let s = UserId::parse("al").unwrap();
        let id = MessageId::parse("m-1").unwrap();
        assert_eq!(k.inbox(&u), "ferry:{u:bob@x}:inbox");
        assert_eq!(k.meta(&u), "ferry:{u:bob@x}:meta");
        assert_eq!(k.dedupe(&u, &s, &id), "ferry:{u:bob@x}:dedupe:al/m-1");
        assert_eq!(k.quarantine(&u), "ferry:{u:bob@x}:quarantine");
        assert_eq!(k.live(&u), "ferry:{u:bob@x}:live");
        assert_eq!(k.user_of_live(&k.live(&u)), Some(u));
        assert_eq!(Keys::new("other").user_of_live("ferry:{u:bob}:live"), None);
    }

    #[test]
    fn dedupe_keys_of_different_senders_differ() {
        let k = Keys::default();
        let u = UserId::parse("bob").unwrap();
        let one = k.dedupe(
            &u,
            &UserId::parse("s").unwrap(),
            &MessageId::parse("x:1").unwrap(),
        );
        let other = k.dedupe(
            &u,
            &UserId::parse("s:x").unwrap(),
            &MessageId::parse("1").unwrap(),
        );
        assert_ne!(one, other);
    }
}
