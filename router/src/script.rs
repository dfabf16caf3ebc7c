//! The Lua scripts the Redis engine runs, and the parsing of their answers.
//!
//! Each script touches only one user's keys (all with the hash tag `{u:<user>}`) and, for append,
//! publishes on that user's channel, so it is atomic and valid on Redis Cluster. Redis scripts do
//! not roll back, so every check comes before the first write. Scripts are called by SHA; the
//! lanes (`lanes.rs`) load them when Redis answers NOSCRIPT (after a restart or `SCRIPT FLUSH`).

use std::sync::LazyLock;

use redis::Value;

use crate::engine::{AppendOutcome, EngineError, InboxState};
use crate::lanes::LuaScript;

/// Lua that checks a session's position before a read, trim or position check. KEYS: inbox,
/// meta. ARGV: epoch, delivered, stamp, a new epoch. It returns `{why}` when the position is void:
/// `epoch` when the inbox has another epoch already; and when the inbox went back in time under
/// the same epoch (its head below `delivered`, or a member at or below `delivered` stored after
/// `stamp`: a reused seq) it ends the epoch, the compare being the epoch match just made in the
/// same atomic script, and says why (`head_behind`, `seq_reused`). A member is
/// `<seq>:<stamp>:<payload>` (`record.rs`); one without a stamp counts as stamp 0.
///
/// Inline code, not a Lua function: a script defines its functions again on every call, which
/// costs measurably on the per-message path.
macro_rules! verify_position {
    () => {
        r#"
local why = nil
local state = redis.call('HMGET', KEYS[2], 'epoch', 'seq')
if state[1] ~= ARGV[1] then
  why = 'epoch'
else
  local delivered = tonumber(ARGV[2])
  local stamp = tonumber(ARGV[3])
  if tonumber(state[2] or '0') < delivered then
    why = 'head_behind'
  elseif stamp > 0 and delivered > 0 then
    local top = redis.call('ZRANGE', KEYS[1], ARGV[2], '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, 1)
    if top[1] and (tonumber(string.match(top[1], '^%d+:(%d+):')) or 0) > stamp then
      why = 'seq_reused'
    end
  end
  if why then
    redis.call('HSET', KEYS[2], 'epoch', ARGV[4])
  end
end
if why then
  return {why}
end
"#
    };
}

/// KEYS: inbox, meta, dedupe.
/// ARGV: payload, max_inbox, new epoch, dedupe window (ms), inbox ttl (ms), live channel, `1` when
/// replicas must acknowledge, `1` on a Redis Cluster (publish with `SPUBLISH`, to the shard's
/// subscribers only).
/// Returns `{0, seq, epoch, adopted}` stored, `{1, seq}` duplicate, `{2}` inbox full.
///
/// - When replicas must acknowledge, the script does not publish: it returns the live message
///   last (`{0, seq, epoch, adopted, live}`, and `{1, seq, live}` for a duplicate whose message
///   is still there), and the engine publishes it once `WAIT` has confirmed the write, so that a
///   recipient never sees live what a failover to a replica could take back. A duplicate writes
///   too (its dedupe key's TTL), so that `WAIT` covers the original.
///
/// - The epoch is created if absent. A new incarnation adopts whatever inbox is left under the
///   key (`meta` was evicted or lost on its own): those messages stay deliverable under the new
///   epoch, and seqs go on above them, so no seq is ever stored twice (the same code as in
///   `OPEN`; this script is kept whole so that `loadtest/bench.sh` can load it as it is).
/// - The stamp is Redis's clock (`TIME`) in microseconds: the seconds, then six digits.
/// - Numbers are formatted with `%d`: Lua's default number-to-string conversion switches to
///   exponent notation above 1e14.
const APPEND: &str = r#"
local dup = redis.call('GET', KEYS[3])
if dup then
  if ARGV[7] == '1' then
    local ttl = redis.call('PTTL', KEYS[3])
    if ttl > 0 then
      redis.call('PEXPIRE', KEYS[3], ttl)
    end
    local epoch = redis.call('HGET', KEYS[2], 'epoch')
    local stored = redis.call('ZRANGE', KEYS[1], dup, dup, 'BYSCORE')
    if epoch and stored[1] then
      return {1, dup, epoch .. ':' .. stored[1]}
    end
  end
  return {1, dup}
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return {2}
end
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local adopted = 0
if not epoch then
  epoch = ARGV[3]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
  local top = redis.call('ZRANGE', KEYS[1], '+inf', '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, 1, 'WITHSCORES')
  if top[2] then
    adopted = 1
    if tonumber(top[2]) > tonumber(redis.call('HGET', KEYS[2], 'seq') or '0') then
      redis.call('HSET', KEYS[2], 'seq', string.format('%d', tonumber(top[2])))
    end
  end
end
local seq = string.format('%d', redis.call('HINCRBY', KEYS[2], 'seq', 1))
local now = redis.call('TIME')
local member = seq .. ':' .. now[1] .. string.format('%06d', tonumber(now[2])) .. ':' .. ARGV[1]
redis.call('ZADD', KEYS[1], seq, member)
redis.call('SET', KEYS[3], seq, 'PX', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
if ARGV[7] == '1' then
  return {0, seq, epoch, adopted, epoch .. ':' .. member}
end
if ARGV[8] == '1' then
  redis.call('SPUBLISH', ARGV[6], epoch .. ':' .. member)
else
  redis.call('PUBLISH', ARGV[6], epoch .. ':' .. member)
end
return {0, seq, epoch, adopted}
"#;

/// KEYS: meta, inbox. ARGV: new epoch, inbox ttl (ms), claimed epoch (`` if none), claimed
/// last_seq. Creates the epoch (adopting a leftover inbox) as `APPEND` does; a claim beyond the
/// head under the same epoch ends that epoch.
/// Returns `{epoch, head, stamp, ended, adopted}`.
const OPEN: &str = r#"
local adopted = 0
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  local top = redis.call('ZRANGE', KEYS[2], '+inf', '-inf', 'BYSCORE', 'REV', 'LIMIT', 0, 1, 'WITHSCORES')
  if top[2] then
    adopted = 1
    if tonumber(top[2]) > tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') then
      redis.call('HSET', KEYS[1], 'seq', string.format('%d', tonumber(top[2])))
    end
  end
end
local state = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local head = tonumber(state[2] or '0')
local ended = 0
if ARGV[3] ~= '' and ARGV[3] == state[1] and tonumber(ARGV[4]) > head then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
  state[1] = ARGV[1]
  ended = 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local now = redis.call('TIME')
return {state[1], string.format('%d', head), now[1] .. string.format('%06d', tonumber(now[2])), ended, adopted}
"#;

/// KEYS: inbox, meta. ARGV: epoch, delivered, stamp, new epoch, limit, max bytes.
/// Returns `{'ok', {member, score, ...}, cut}`, or `{why}` (see `verify_position!`). The page
/// stops before the member that would pass the byte bound (the first is always returned), so a
/// read never brings more than the session's queue can take; `cut` is 1 when it did.
const READ: &str = concat!(
    verify_position!(),
    r#"
local page = redis.call('ZRANGE', KEYS[1], '(' .. ARGV[2], '+inf', 'BYSCORE', 'LIMIT', 0, ARGV[5], 'WITHSCORES')
local max = tonumber(ARGV[6])
local bytes = 0
local cut = 0
for i = 1, #page, 2 do
  bytes = bytes + #page[i]
  if bytes > max and i > 1 then
    for j = #page, i, -1 do
      page[j] = nil
    end
    cut = 1
    break
  end
end
return {'ok', page, cut}
"#
);

/// KEYS: inbox, meta. ARGV: epoch, delivered, stamp, new epoch, upto.
/// Returns `{'ok'}` or `{why}`.
const TRIM: &str = concat!(
    verify_position!(),
    r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[5])
return {'ok'}
"#
);

/// KEYS: inbox, meta. ARGV: epoch, delivered, stamp, new epoch.
/// Returns `{'ok', head}` or `{why}`.
const POSITION: &str = concat!(
    verify_position!(),
    r#"
return {'ok', state[2] or '0'}
"#
);

/// KEYS: meta. ARGV: epoch, new epoch. Returns 1 if `epoch` was current and is ended now.
const END_EPOCH: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
  return 1
end
return 0
"#;

/// KEYS: inbox, quarantine. ARGV: member, seq, ttl (ms). Moves the exact member out of the
/// inbox into the quarantine set (kept for a look, with the inbox's TTL). Returns 1 if moved.
const QUARANTINE: &str = r#"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return 1
end
return 0
"#;

/// KEYS: meta, then the dedupe key of each audited append. ARGV: the epoch they were stored in,
/// a new epoch, then each append's seq. An append whose dedupe key is gone (or names another
/// seq) was lost by the store after it was answered `sent`: if that epoch is still the inbox's,
/// it ends, so the recipient learns `reset`. Returns `{lost, ended}`: the appends found lost (up
/// to the first, when it ends the epoch), and 1 if it ended the epoch. An epoch that changed
/// already (the whole inbox was lost, or a session ended it) is not ended again, but its lost
/// appends are still counted.
const AUDIT: &str = r#"
local current = redis.call('HGET', KEYS[1], 'epoch')
local lost = 0
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[i + 1] then
    lost = lost + 1
    if current == ARGV[1] then
      redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
      return {lost, 1}
    end
  end
end
return {lost, 0}
"#;

/// The engine's scripts, hashed once, called by SHA through the lanes.
pub(crate) struct Scripts {
    pub append: LuaScript,
    pub open: LuaScript,
    pub read: LuaScript,
    pub trim: LuaScript,
    pub position: LuaScript,
    pub end_epoch: LuaScript,
    pub quarantine: LuaScript,
    pub audit: LuaScript,
}

pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    append: LuaScript::new(APPEND),
    open: LuaScript::new(OPEN),
    read: LuaScript::new(READ),
    trim: LuaScript::new(TRIM),
    position: LuaScript::new(POSITION),
    end_epoch: LuaScript::new(END_EPOCH),
    quarantine: LuaScript::new(QUARANTINE),
    audit: LuaScript::new(AUDIT),
});

/// Why a checked script found a session's position void: the epoch had changed already, or the
/// script ended it now for the reason given (a `ferry_epochs_replaced_total` reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VoidReason {
    EpochChanged,
    Ended(&'static str),
}

/// The answer of a checked script: its payload (the items after `ok`), or why it was void.
pub(crate) fn parse_checked(value: &Value) -> Result<Result<&[Value], VoidReason>, EngineError> {
    let bad = || EngineError::Internal(format!("unexpected checked answer: {value:?}"));
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let (status, rest) = items.split_first().ok_or_else(bad)?;
    let status = match status {
        Value::BulkString(bytes) => bytes.as_slice(),
        Value::SimpleString(s) => s.as_bytes(),
        _ => return Err(bad()),
    };
    Ok(match status {
        b"ok" => Ok(rest),
        b"epoch" => Err(VoidReason::EpochChanged),
        b"head_behind" => Err(VoidReason::Ended("head_behind")),
        b"seq_reused" => Err(VoidReason::Ended("seq_reused")),
        _ => return Err(bad()),
    })
}

/// What the append script stored, beyond the outcome: the epoch and whether it adopted a
/// leftover inbox. `None` for a duplicate or a full inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppendDetail {
    pub epoch: String,
    pub adopted: bool,
}

/// The append script's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppendAnswer {
    pub outcome: AppendOutcome,
    pub detail: Option<AppendDetail>,
    /// The live message for the engine to publish once replicas have the write (only when
    /// replicas must acknowledge).
    pub publish: Option<Vec<u8>>,
}

/// Reads the open script's answer: the state, the stamp, whether it ended the claimed epoch
/// and whether it adopted a leftover inbox.
pub(crate) fn parse_open(value: &Value) -> Result<(InboxState, u64, bool, bool), EngineError> {
    let bad = || EngineError::Internal(format!("unexpected open answer: {value:?}"));
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let [epoch, head, stamp, ended, adopted] = items.as_slice() else {
        return Err(bad());
    };
    let epoch = string(epoch).ok_or_else(bad)?;
    let state = InboxState {
        epoch,
        head: int(head).ok_or_else(bad)?,
    };
    let stamp = int(stamp).ok_or_else(bad)?;
    Ok((state, stamp, int(ended) == Some(1), int(adopted) == Some(1)))
}

/// Reads the append script's answer.
pub(crate) fn parse_append(value: &Value) -> Result<AppendAnswer, EngineError> {
    let bad = || EngineError::Internal(format!("unexpected append answer: {value:?}"));
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let bytes = |v: &Value| match v {
        Value::BulkString(b) => Some(b.clone()),
        _ => None,
    };
    let answer = |outcome, detail, publish| AppendAnswer {
        outcome,
        detail,
        publish,
    };
    match items.as_slice() {
        [code, seq, epoch, adopted, rest @ ..] if int(code) == Some(0) && rest.len() <= 1 => {
            Ok(answer(
                AppendOutcome::Stored {
                    seq: int(seq).ok_or_else(bad)?,
                },
                Some(AppendDetail {
                    epoch: string(epoch).ok_or_else(bad)?,
                    adopted: int(adopted) == Some(1),
                }),
                rest.first().map(|v| bytes(v).ok_or_else(bad)).transpose()?,
            ))
        }
        [code, seq, rest @ ..] if int(code) == Some(1) && rest.len() <= 1 => Ok(answer(
            AppendOutcome::Duplicate {
                seq: int(seq).ok_or_else(bad)?,
            },
            None,
            rest.first().map(|v| bytes(v).ok_or_else(bad)).transpose()?,
        )),
        [code] if int(code) == Some(2) => Ok(answer(AppendOutcome::InboxFull, None, None)),
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
        other => string(other).ok_or_else(bad)?,
    };
    let head = match head {
        Value::Nil => 0,
        other => int(other).ok_or_else(bad)?,
    };
    Ok(Some(InboxState { epoch, head }))
}

/// A UTF-8 string sent as a bulk or simple string.
pub(crate) fn string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// An unsigned integer sent as an integer or a decimal string.
pub(crate) fn int(value: &Value) -> Option<u64> {
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
        let stored = Value::Array(vec![Value::Int(0), bulk("7"), bulk("e1"), Value::Int(0)]);
        let detail = Some(AppendDetail {
            epoch: "e1".into(),
            adopted: false,
        });
        assert_eq!(
            parse_append(&stored).unwrap(),
            AppendAnswer {
                outcome: AppendOutcome::Stored { seq: 7 },
                detail: detail.clone(),
                publish: None
            }
        );
        let to_publish = Value::Array(vec![
            Value::Int(0),
            bulk("7"),
            bulk("e1"),
            Value::Int(0),
            bulk("e1:7:1:x"),
        ]);
        assert_eq!(
            parse_append(&to_publish).unwrap(),
            AppendAnswer {
                outcome: AppendOutcome::Stored { seq: 7 },
                detail,
                publish: Some(b"e1:7:1:x".to_vec())
            }
        );
        let dup = Value::Array(vec![Value::Int(1), bulk("3")]);
        assert_eq!(
            parse_append(&dup).unwrap(),
            AppendAnswer {
                outcome: AppendOutcome::Duplicate { seq: 3 },
                detail: None,
                publish: None
            }
        );
        let dup = Value::Array(vec![Value::Int(1), bulk("3"), bulk("e1:3:1:x")]);
        assert_eq!(
            parse_append(&dup).unwrap().publish,
            Some(b"e1:3:1:x".to_vec())
        );
        let full = Value::Array(vec![Value::Int(2)]);
        assert_eq!(
            parse_append(&full).unwrap().outcome,
            AppendOutcome::InboxFull
        );
        assert!(parse_append(&Value::Okay).is_err());
        assert!(parse_append(&Value::Array(vec![Value::Int(0), bulk("x")])).is_err());
        assert!(
            parse_append(&Value::Array(vec![Value::Int(1), bulk("3"), Value::Int(1)])).is_err()
        );
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

    #[test]
    fn checked_answers() {
        let ok = Value::Array(vec![bulk("ok"), bulk("12")]);
        assert_eq!(parse_checked(&ok).unwrap(), Ok(&[bulk("12")][..]));
        let changed = Value::Array(vec![bulk("epoch")]);
        assert_eq!(
            parse_checked(&changed).unwrap(),
            Err(VoidReason::EpochChanged)
        );
        let ended = Value::Array(vec![bulk("seq_reused")]);
        assert_eq!(
            parse_checked(&ended).unwrap(),
            Err(VoidReason::Ended("seq_reused"))
        );
        assert!(parse_checked(&Value::Array(vec![bulk("what")])).is_err());
        assert!(parse_checked(&Value::Nil).is_err());
    }
}
