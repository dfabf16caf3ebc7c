//! The Lua scripts the Redis engine runs, and the parsing of their answers.
//!
//! Each script touches only one user's keys (all with the hash tag `{u:<user>}`) and, for append,
//! publishes on that user's channel, so it is atomic and valid on Redis Cluster. Redis scripts do
//! not roll back, so every check comes before the first write. Scripts are called by SHA; the
//! lanes (`lanes.rs`) load them when Redis answers NOSCRIPT (after a restart or `SCRIPT FLUSH`).

use std::sync::LazyLock;

use redis::Value;

use crate::devices::{Devices, Record};
use crate::engine::{AppendOutcome, DeviceSeen, EngineError, InboxInfo, InboxState, Opened};
use crate::lanes::LuaScript;

/// Lua that checks a session's position before a read, trim or position check. KEYS: inbox,
/// meta (then devices). ARGV: epoch, delivered, stamp, a new epoch (then the device). It returns `{why}` when the position is void:
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
local state = redis.call('HMGET', KEYS[2], 'epoch', 'seq', 'floor')
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

/// Lua that sets `now_ms`: Redis's clock in unix milliseconds (device times).
macro_rules! now_ms {
    () => {
        r#"
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"#
    };
}

/// Lua that records device `dev` as seen at `now_ms` with its position moved up to `acked` in
/// `epoch`, in the devices hash `dkey` (a field per device: `<acked>:<seen ms>:<epoch>`), as
/// `devices.rs` `Devices::touch` does: a new device beyond `cap` evicts the device seen longest
/// ago. Sets `before`: the position it had in `epoch`, `'x'` for a record of another epoch, nil
/// if it had no record. The hash lives as long as the inbox (`ttl`).
macro_rules! touch_device {
    () => {
        r#"
local before = nil
local rec = redis.call('HGET', dkey, dev)
if rec then
  local a, e = string.match(rec, '^(%d+):%d+:(.*)$')
  before = 'x'
  if a and e == epoch then
    before = tonumber(a)
  end
else
  while redis.call('HLEN', dkey) >= cap do
    local all = redis.call('HGETALL', dkey)
    local oldest, oldest_seen = all[1], nil
    for i = 1, #all, 2 do
      local seen = tonumber(string.match(all[i + 1], '^%d+:(%d+):') or '0')
      if not oldest_seen or seen < oldest_seen then
        oldest, oldest_seen = all[i], seen
      end
    end
    redis.call('HDEL', dkey, oldest)
  end
end
if before and before ~= 'x' and before > acked then
  acked = before
end
redis.call('HSET', dkey, dev, string.format('%d', acked) .. ':' .. string.format('%d', now_ms) .. ':' .. epoch)
redis.call('PEXPIRE', dkey, ttl)
"#
    };
}

/// Lua that sets `low` and `high`: the lowest and highest position among the devices in `dkey`
/// that hold the inbox (seen within `dttl` ms of `now_ms`), a position of another epoch than
/// `epoch` counting as `floor` (`Devices::low`, `Devices::high`). Both nil when none holds.
macro_rules! holding_devices {
    () => {
        r#"
local low, high = nil, nil
local all = redis.call('HGETALL', dkey)
for i = 1, #all, 2 do
  local a, seen, e = string.match(all[i + 1], '^(%d+):(%d+):(.*)$')
  if a and tonumber(seen) + dttl >= now_ms then
    local pos = floor
    if e == epoch and tonumber(a) > floor then
      pos = tonumber(a)
    end
    if not low or pos < low then
      low = pos
    end
    if not high or pos > high then
      high = pos
    end
  end
end
"#
    };
}

/// Lua that trims the inbox (KEYS[1], meta KEYS[2]) up to `low` when that passes `floor`, and
/// moves the floor there.
macro_rules! trim_to_low {
    () => {
        r#"
if low and low > floor then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', low)
  redis.call('HSET', KEYS[2], 'floor', string.format('%d', low))
end
"#
    };
}

/// KEYS: inbox, meta, dedupe, devices, the sender's share (`KeyKind::Sender`).
/// ARGV: payload, max_inbox, new epoch, dedupe window (ms), inbox ttl (ms), live channel, `1` when
/// replicas must acknowledge, `1` on a Redis Cluster (publish with `SPUBLISH`, to the shard's
/// subscribers only), device ttl (ms), `1` when the recipient must be known, the sender's
/// share (0: none).
/// Returns `{0, seq, epoch, adopted}` stored, `{1, seq}` duplicate, `{2}` inbox full, `{3}`
/// unknown recipient, `{4}` the sender's share is full.
///
/// - A known recipient has a devices hash (it connected, and was not erased or left without
///   devices since).
/// - The share key holds the seqs of the sender's messages, counted only when a share is given
///   and the inbox already holds a quarter of a share: an inbox that is read costs nothing more,
///   and a sender holds at most 1.25 shares (a quarter stored before counting began). The key is
///   pruned only when it reaches the share: seqs below the inbox's lowest have left the inbox
///   (trims and room-making take the lowest seqs first), so what is left is the sender's
///   messages still there. It never holds more than the share, and expires with the inbox's ttl
///   from the sender's last counted append.
///
/// - When replicas must acknowledge, the script does not publish: it returns the live message
///   last (`{0, seq, epoch, adopted, live}`, and `{1, seq, live}` for a duplicate whose message
///   is still there), and the engine publishes it once `WAIT` has confirmed the write, so that a
///   recipient never sees live what a failover to a replica could take back. A duplicate writes
///   too (its dedupe key's TTL), so that `WAIT` covers the original.
///
/// - At `max_inbox`, the oldest messages make room as long as the most advanced holding device
///   has fewer than `max_inbox` above its position, or no device holds (see `devices.rs`); the
///   floor moves up past them, and devices below it learn of the gap. A user without any device
///   record (nobody ever read the inbox) gets `{2}` as before.
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
if ARGV[10] == '1' and redis.call('EXISTS', KEYS[4]) == 0 then
  return {3}
end
local card = redis.call('ZCARD', KEYS[1])
local share = tonumber(ARGV[11])
local counted = share > 0 and card >= math.floor(share / 4)
if counted and redis.call('ZCARD', KEYS[5]) >= share then
  local lowest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]
  if lowest then
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', '(' .. lowest)
  else
    redis.call('DEL', KEYS[5])
  end
  if redis.call('ZCARD', KEYS[5]) >= share then
    return {4}
  end
end
local max = tonumber(ARGV[2])
if card >= max then
  local state = redis.call('HMGET', KEYS[2], 'epoch', 'floor')
  local epoch, floor = state[1], tonumber(state[2] or '0')
  local clock = redis.call('TIME')
  local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  -- The highest position among holding devices (as `holding_devices!`).
  local high = nil
  local all = redis.call('HGETALL', KEYS[4])
  for i = 1, #all, 2 do
    local a, seen, e = string.match(all[i + 1], '^(%d+):(%d+):(.*)$')
    if a and tonumber(seen) + tonumber(ARGV[9]) >= now_ms then
      local pos = floor
      if e == epoch and tonumber(a) > floor then
        pos = tonumber(a)
      end
      if not high or pos > high then
        high = pos
      end
    end
  end
  if #all == 0 or (high and redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%d', high), '+inf') >= max) then
    return {2}
  end
  local last = redis.call('ZRANGE', KEYS[1], card - max, card - max, 'WITHSCORES')
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, card - max)
  redis.call('HSET', KEYS[2], 'floor', last[2])
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
redis.call('PEXPIRE', KEYS[4], ARGV[5])
if counted then
  redis.call('ZADD', KEYS[5], seq, seq)
  redis.call('PEXPIRE', KEYS[5], ARGV[5])
end
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

/// KEYS: meta, inbox, devices. ARGV: new epoch, inbox ttl (ms), claimed epoch (`` if none),
/// claimed last_seq, device, device cap. Creates the epoch (adopting a leftover inbox) as
/// `APPEND` does; a claim beyond the head under the same epoch ends that epoch. Records the
/// device as seen (a new one at the floor).
/// Returns `{epoch, head, stamp, ended, adopted, floor, before}`, `before` being the device's
/// position before (`` when it had no record, `x` for a record of another epoch).
const OPEN: &str = concat!(
    r#"
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
local floor = tonumber(redis.call('HGET', KEYS[1], 'floor') or '0')
local dkey, dev, epoch, acked, cap, ttl = KEYS[3], ARGV[5], state[1], floor, tonumber(ARGV[6]), ARGV[2]
-- Where the device is recorded (`devices.rs` `opening_position`).
if redis.call('HEXISTS', dkey, dev) == 1 then
  acked = 0
elseif ARGV[3] ~= '' and ARGV[3] == epoch and tonumber(ARGV[4]) < floor then
  acked = tonumber(ARGV[4])
end
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
"#,
    touch_device!(),
    r#"
return {state[1], string.format('%d', head), now[1] .. string.format('%06d', tonumber(now[2])), ended, adopted, string.format('%d', floor), (before == 'x' and 'x') or (before and string.format('%d', before)) or ''}
"#
);

/// KEYS: inbox, meta, devices. ARGV: epoch, delivered, stamp, new epoch, device, limit, max
/// bytes. Returns `{'ok', {member, score, ...}, cut, floor, device acked, head}`, or `{why}` (see
/// `verify_position!`); `head` is the meta's `seq` that `verify_position!` read. The page
/// stops before the member that would pass the byte bound (the first is always returned), so a
/// read never brings more than the session's queue can take; `cut` is 1 when it did.
///
/// Members are read 16 at a time, so that the script holds at most one chunk beyond
/// the bound: a whole page read at once was up to `limit` members of the largest size (256 of
/// 64 KiB: 16 MiB of Redis's memory for each catch-up, however little the session could take).
const READ: &str = concat!(
    verify_position!(),
    r#"
local limit, max = tonumber(ARGV[6]), tonumber(ARGV[7])
local page, count, bytes, cut = {}, 0, 0, 0
local after = '(' .. ARGV[2]
while count < limit and cut == 0 do
  local want = math.min(16, limit - count)
  local chunk = redis.call('ZRANGE', KEYS[1], after, '+inf', 'BYSCORE', 'LIMIT', 0, want, 'WITHSCORES')
  for i = 1, #chunk, 2 do
    bytes = bytes + #chunk[i]
    if bytes > max and count > 0 then
      cut = 1
      break
    end
    page[#page + 1] = chunk[i]
    page[#page + 1] = chunk[i + 1]
    count = count + 1
  end
  if #chunk < 2 * want then
    break
  end
  after = '(' .. chunk[#chunk]
end
local acked = '0'
local rec = redis.call('HGET', KEYS[3], ARGV[5])
if rec then
  local a, e = string.match(rec, '^(%d+):%d+:(.*)$')
  if a and e == ARGV[1] then
    acked = a
  end
end
return {'ok', page, cut, state[3] or '0', acked, state[2] or '0'}
"#
);

/// KEYS: inbox, meta, devices. ARGV: epoch, delivered, stamp, new epoch, device, upto, device
/// cap, device ttl (ms), inbox ttl (ms). Moves the device's position up to `upto`, then trims
/// up to the lowest position of the holding devices. Returns `{'ok'}` or `{why}`.
const TRIM: &str = concat!(
    verify_position!(),
    now_ms!(),
    r#"
local floor = tonumber(state[3] or '0')
local dkey, dev, epoch, acked, cap, dttl, ttl = KEYS[3], ARGV[5], ARGV[1], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
"#,
    touch_device!(),
    holding_devices!(),
    trim_to_low!(),
    r#"
return {'ok'}
"#
);

/// KEYS: inbox, meta, devices. ARGV: epoch, delivered, stamp, new epoch, device, device cap,
/// inbox ttl (ms). Records the device as seen. Returns `{'ok', head}` or `{why}`.
const POSITION: &str = concat!(
    verify_position!(),
    now_ms!(),
    r#"
local dkey, dev, epoch, acked, cap, ttl = KEYS[3], ARGV[5], ARGV[1], 0, tonumber(ARGV[6]), ARGV[7]
"#,
    touch_device!(),
    r#"
return {'ok', state[2] or '0'}
"#
);

/// KEYS: meta, devices. Returns `{epoch or '', now ms, field, value, ...}`.
const DEVICES: &str = concat!(
    now_ms!(),
    r#"
return {redis.call('HGET', KEYS[1], 'epoch') or '', string.format('%d', now_ms), redis.call('HGETALL', KEYS[2])}
"#
);

/// KEYS: inbox, meta, devices. ARGV: device, device ttl (ms). Forgets the device, then trims up
/// to the lowest position of the holding devices left. Returns 1 if it was known.
const REMOVE_DEVICE: &str = concat!(
    r#"
if redis.call('HDEL', KEYS[3], ARGV[1]) == 0 then
  return 0
end
local state = redis.call('HMGET', KEYS[2], 'epoch', 'floor')
local epoch, floor = state[1], tonumber(state[2] or '0')
local dkey, dttl = KEYS[3], tonumber(ARGV[2])
"#,
    now_ms!(),
    holding_devices!(),
    trim_to_low!(),
    r#"
return 1
"#
);

/// KEYS: inbox, meta, devices, quarantine. Erases the inbox: its messages, devices, epoch and
/// floor; `meta` keeps only `seq` (and its TTL), so a new epoch counts on from it and no seq is
/// given twice. Returns 1 if there was an inbox.
const ERASE: &str = r#"
local existed = redis.call('EXISTS', KEYS[1], KEYS[3]) + redis.call('HEXISTS', KEYS[2], 'epoch')
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
redis.call('HDEL', KEYS[2], 'epoch', 'floor')
if existed > 0 then
  return 1
end
return 0
"#;

/// KEYS: meta, inbox. Returns `{epoch or '', head, floor, oldest or '', count}`.
const INFO: &str = r#"
local state = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'floor')
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {state[1] or '', state[2] or '0', state[3] or '0', first[2] or '', redis.call('ZCARD', KEYS[2])}
"#;

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
    pub devices: LuaScript,
    pub remove_device: LuaScript,
    pub info: LuaScript,
    pub erase: LuaScript,
    pub quota: LuaScript,
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
    devices: LuaScript::new(DEVICES),
    remove_device: LuaScript::new(REMOVE_DEVICE),
    info: LuaScript::new(INFO),
    erase: LuaScript::new(ERASE),
    quota: LuaScript::new(QUOTA),
});

/// KEYS: the sender's quota. ARGV: bytes, rate (bytes per second), burst (bytes), `take` or
/// `settle`. The bucket is refilled at `rate` since it was last used, up to `burst`; then `take`
/// grants at most what it holds of the bytes wanted and returns the grant, and `settle` charges
/// the bytes (a node's spending ahead of its grants, which may take the bucket below zero: the
/// user then waits until it has refilled) or, when negative, gives them back (a lease not
/// spent), and returns 0. A bucket untouched
/// for as long as it takes to refill is full, so the key expires then (and reads as full).
const QUOTA: &str = r#"
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local want, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1] or ARGV[3])
local at = tonumber(state[2] or now_ms)
if now_ms > at then
  tokens = math.min(burst, tokens + (now_ms - at) * rate / 1000)
end
local granted = 0
if ARGV[4] == 'settle' then
  tokens = math.min(burst, tokens - want)
else
  granted = math.max(0, math.min(want, math.floor(tokens)))
  tokens = tokens - granted
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.3f', tokens), 'at', string.format('%d', now_ms))
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil((burst - tokens) * 1000 / rate) + 1000))
return granted
"#;

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

/// The open script's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OpenAnswer {
    pub opened: Opened,
    /// It ended the claimed epoch (a resume beyond the head).
    pub ended: bool,
    /// It adopted a leftover inbox.
    pub adopted: bool,
}

/// Reads the open script's answer.
pub(crate) fn parse_open(value: &Value) -> Result<OpenAnswer, EngineError> {
    let bad = || EngineError::Internal(format!("unexpected open answer: {value:?}"));
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let [epoch, head, stamp, ended, adopted, floor, before] = items.as_slice() else {
        return Err(bad());
    };
    let device = match string(before).ok_or_else(bad)?.as_str() {
        "" => DeviceSeen::New,
        "x" => DeviceSeen::OtherEpoch,
        _ => DeviceSeen::At(int(before).ok_or_else(bad)?),
    };
    Ok(OpenAnswer {
        opened: Opened {
            epoch: string(epoch).ok_or_else(bad)?,
            head: int(head).ok_or_else(bad)?,
            stamp: int(stamp).ok_or_else(bad)?,
            floor: int(floor).ok_or_else(bad)?,
            device,
        },
        ended: int(ended) == Some(1),
        adopted: int(adopted) == Some(1),
    })
}

/// Reads the info script's answer: `None` when the inbox has no epoch.
pub(crate) fn parse_info(value: &Value) -> Result<Option<InboxInfo>, EngineError> {
    let bad = || EngineError::Internal(format!("unexpected info answer: {value:?}"));
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let [epoch, head, floor, oldest, count] = items.as_slice() else {
        return Err(bad());
    };
    let epoch = string(epoch).ok_or_else(bad)?;
    if epoch.is_empty() {
        return Ok(None);
    }
    let oldest = match string(oldest).ok_or_else(bad)?.as_str() {
        "" => None,
        _ => Some(int(oldest).ok_or_else(bad)?),
    };
    Ok(Some(InboxInfo {
        epoch,
        head: int(head).ok_or_else(bad)?,
        floor: int(floor).ok_or_else(bad)?,
        oldest,
        count: int(count).ok_or_else(bad)?,
    }))
}

/// Reads the devices script's answer: the inbox's epoch (`` if none), Redis's clock (unix ms)
/// and the devices hash.
pub(crate) fn parse_devices(value: &Value) -> Result<(String, u64, Devices), EngineError> {
    let bad = || EngineError::Internal(format!("unexpected devices answer: {value:?}"));
    let Value::Array(items) = value else {
        return Err(bad());
    };
    let [epoch, now_ms, Value::Array(fields)] = items.as_slice() else {
        return Err(bad());
    };
    let mut devices = Devices::default();
    for pair in fields.chunks(2) {
        let [name, record] = pair else {
            return Err(bad());
        };
        let (name, record) = (
            string(name).ok_or_else(bad)?,
            string(record).ok_or_else(bad)?,
        );
        // `<acked>:<seen ms>:<epoch>`; one that does not parse is left out of the list.
        let mut parts = record.splitn(3, ':');
        if let (Some(Ok(acked)), Some(Ok(seen_ms)), Some(epoch)) = (
            parts.next().map(str::parse),
            parts.next().map(str::parse),
            parts.next(),
        ) {
            devices.records.insert(
                name,
                Record {
                    acked,
                    epoch: epoch.to_owned(),
                    seen_ms,
                },
            );
        }
    }
    Ok((
        string(epoch).ok_or_else(bad)?,
        int(now_ms).ok_or_else(bad)?,
        devices,
    ))
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
        [code] => match int(code) {
            Some(2) => Ok(answer(AppendOutcome::InboxFull, None, None)),
            Some(3) => Ok(answer(AppendOutcome::UnknownRecipient, None, None)),
            Some(4) => Ok(answer(AppendOutcome::ShareFull, None, None)),
            _ => Err(bad()),
        },
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
