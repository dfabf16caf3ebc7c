//! The Lua scripts the Redis engine runs, and the parsing of their answers.
//!
//! Each script touches only one user's keys (all with the hash tag `{u:<user>}`) and, for append,
//! publishes on that user's channel, so it is atomic and valid on Redis Cluster. Redis scripts do
//! not roll back, so every check comes before the first write. Scripts are loaded once and called
//! by SHA; `redis::Script` reloads them when Redis answers NOSCRIPT (after a restart or
//! `SCRIPT FLUSH`).

use redis::{Script, Value};

use crate::engine::{AppendOutcome, EngineError, InboxState};

/// KEYS: inbox, meta, dedupe.
/// ARGV: payload, max_inbox, new epoch, dedupe window (ms), inbox ttl (ms), live channel.
/// Returns `{0, seq}` stored, `{1, seq}` duplicate, `{2}` inbox full.
///
/// Numbers are formatted with `%d`: Lua's default number-to-string conversion switches to
/// exponent notation above 1e14.
const APPEND: &str = r#"
local dup = redis.call('GET', KEYS[3])
if dup then
  return {1, dup}
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return {2}
end
redis.call('HSETNX', KEYS[2], 'epoch', ARGV[3])
local seq = string.format('%d', redis.call('HINCRBY', KEYS[2], 'seq', 1))
local member = seq .. ':' .. ARGV[1]
redis.call('ZADD', KEYS[1], seq, member)
redis.call('SET', KEYS[3], seq, 'PX', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[6], member)
return {0, seq}
"#;

/// KEYS: meta, inbox. ARGV: new epoch, inbox ttl (ms).
/// Returns `{epoch, seq or false}`.
const OPEN: &str = r#"
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return state
"#;

/// The engine's scripts, hashed once.
pub(crate) struct Scripts {
    pub append: Script,
    pub open: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            append: Script::new(APPEND),
            open: Script::new(OPEN),
        }
    }
}

/// Reads the append script's answer.
pub(crate) fn parse_append(value: &Value) -> Result<AppendOutcome, EngineError> {
    let bad = || EngineError::Internal(format!("unexpected append answer: {value:?}"));
    let Value::Array(items) = value else {
        return Err(bad());
    };
    match items.as_slice() {
        [code, seq] if int(code) == Some(0) => Ok(AppendOutcome::Stored {
            seq: int(seq).ok_or_else(bad)?,
        }),
        [code, seq] if int(code) == Some(1) => Ok(AppendOutcome::Duplicate {
            seq: int(seq).ok_or_else(bad)?,
        }),
        [code] if int(code) == Some(2) => Ok(AppendOutcome::InboxFull),
        _ => Err(bad()),
    }
}

/// Reads an `{epoch, seq}` pair (from the open script or `HMGET meta epoch seq`): `None` when
/// the epoch is missing.
pub(crate) fn parse_state(value: &Value) -> Result<Option<InboxState>, EngineError> {
    let bad = || EngineError::Internal(format!("unexpected inbox state: {value:?}"));
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let [epoch, head] = items.as_slice() else {
        return Err(bad());
    };
    let epoch = match epoch {
        Value::Nil => return Ok(None),
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    let head = match head {
        Value::Nil => 0,
        other => int(other).ok_or_else(bad)?,
    };
    Ok(Some(InboxState { epoch, head }))
}

/// An unsigned integer sent as an integer or a decimal string.
fn int(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn append_answers() {
        let stored = Value::Array(vec![Value::Int(0), bulk("7")]);
        assert_eq!(
            parse_append(&stored).unwrap(),
            AppendOutcome::Stored { seq: 7 }
        );
        let dup = Value::Array(vec![Value::Int(1), bulk("3")]);
        assert_eq!(
            parse_append(&dup).unwrap(),
            AppendOutcome::Duplicate { seq: 3 }
        );
        let full = Value::Array(vec![Value::Int(2)]);
        assert_eq!(parse_append(&full).unwrap(), AppendOutcome::InboxFull);
        assert!(parse_append(&Value::Okay).is_err());
        assert!(parse_append(&Value::Array(vec![Value::Int(0), bulk("x")])).is_err());
    }

    #[test]
    fn state_answers() {
        assert_eq!(
            parse_state(&Value::Array(vec![Value::Nil, Value::Nil])).unwrap(),
            None
        );
        assert_eq!(
            parse_state(&Value::Array(vec![bulk("e1"), Value::Nil])).unwrap(),
            Some(InboxState {
                epoch: "e1".into(),
                head: 0
            })
        );
        assert_eq!(
            parse_state(&Value::Array(vec![bulk("e1"), bulk("12")])).unwrap(),
            Some(InboxState {
                epoch: "e1".into(),
                head: 12
            })
        );
        assert!(parse_state(&Value::Nil).is_err());
    }
}
