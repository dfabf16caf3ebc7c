//! Names of one user's Redis keys and live channel. All of them carry the hash tag `{u:<user>}`,
//! so they share one Redis Cluster slot and one script may touch them together.

use std::fmt;

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

    /// One of `user`'s keys, formatted where it is written (a command buffer) rather than into
    /// a `String` of its own. `to_string()` gives the name.
    pub fn key<'a>(&'a self, user: &'a UserId, kind: KeyKind<'a>) -> UserKey<'a> {
        UserKey {
            prefix: &self.prefix,
            user,
            kind,
        }
    }

    /// Sorted set of unacknowledged messages; score = seq.
    pub fn inbox(&self, user: &UserId) -> String {
        self.key(user, KeyKind::Inbox).to_string()
    }

    /// Hash with `seq` (last allocated) and `epoch`.
    pub fn meta(&self, user: &UserId) -> String {
        self.key(user, KeyKind::Meta).to_string()
    }

    /// String holding the seq a `send` got, for the dedupe window (see `KeyKind::Dedupe`).
    pub fn dedupe(&self, user: &UserId, sender: &UserId, id: &MessageId) -> String {
        self.key(user, KeyKind::Dedupe(sender, id)).to_string()
    }

    /// Sorted set of inbox members that could not be decoded, moved out of the inbox (score =
    /// seq) and kept for a look until the inbox's TTL.
    pub fn quarantine(&self, user: &UserId) -> String {
        self.key(user, KeyKind::Quarantine).to_string()
    }

    /// Pub/sub channel carrying live notifications for `user`.
    pub fn live(&self, user: &UserId) -> String {
        self.key(user, KeyKind::Live).to_string()
    }

    /// The user a live channel name belongs to, if it is one of ours.
    pub fn user_of_live(&self, channel: &str) -> Option<UserId> {
        let rest = channel.strip_prefix(&self.prefix)?.strip_prefix(":{u:")?;
        let user = rest.strip_suffix("}:live")?;
        UserId::parse(user).ok()
    }
}

/// Which of a user's keys.
#[derive(Debug, Clone, Copy)]
pub enum KeyKind<'a> {
    Inbox,
    Meta,
    Quarantine,
    Live,
    /// The user's devices and their positions (a hash).
    Devices,
    /// The dedupe key of (sender, id). They are joined by `/`, which neither alphabet contains
    /// (both may contain `:`), so two different (sender, id) pairs never name one key.
    Dedupe(&'a UserId, &'a MessageId),
    /// The seqs of a sender's messages in the inbox (a sorted set), for its share.
    Sender(&'a UserId),
    /// The user's store quota as a sender (a hash: tokens, at).
    Quota,
}

/// A user's key, as `Display`: `<prefix>:{u:<user>}:<suffix>`.
#[derive(Debug, Clone, Copy)]
pub struct UserKey<'a> {
    prefix: &'a str,
    user: &'a UserId,
    kind: KeyKind<'a>,
}

impl fmt::Display for UserKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{{u:{}}}:", self.prefix, self.user)?;
        match self.kind {
            KeyKind::Inbox => f.write_str("inbox"),
            KeyKind::Meta => f.write_str("meta"),
            KeyKind::Quarantine => f.write_str("quarantine"),
            KeyKind::Live => f.write_str("live"),
            KeyKind::Devices => f.write_str("devices"),
            KeyKind::Dedupe(sender, id) => write!(f, "dedupe:{sender}/{id}"),
            KeyKind::Sender(sender) => write!(f, "from:{sender}"),
            KeyKind::Quota => f.write_str("quota"),
        }
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
        assert_eq!(
            k.key(&u, KeyKind::Sender(&s)).to_string(),
            "ferry:{u:bob@x}:from:al"
        );
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
