//! The Lua scripts that make each decision one atomic round trip. Every script reads
//! the clock with `TIME`, so that all nodes share Redis's clock, not their own.

use std::sync::LazyLock;

use redis::Script;

/// Renews a member's lease and registration, and forgets members whose lease ended.
/// KEYS: nodes, node info key. ARGV: member, lease ms, info JSON.
pub static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return now
"#,
    )
});

/// The registrations of every live member.
/// KEYS: nodes. ARGV: node info key prefix.
pub static LIVE_NODES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local out = {}
for _, m in ipairs(live) do
  local info = redis.call('GET', ARGV[1] .. m)
  if info then table.insert(out, info) end
end
return out
"#,
    )
});

/// Admits one connection under several caps at once, or none of them.
/// KEYS: nodes, then one key per check. ARGV: member, slot key ttl ms, then per check
/// a kind (`c` concurrent or `r` rate) and two numbers (`c`: limit, unused; `r`: per
/// second, burst). Returns `{1}` when admitted, `{0, i, seen}` when check `i` (from 0,
/// in the order asked) refused, `seen` being the connections open under a concurrent cap.
pub static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local member = ARGV[1]
local ttl = tonumber(ARGV[2])
local writes = {}
for i = 2, #KEYS do
  local a = 3 + (i - 2) * 3
  local kind, x, y = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local key = KEYS[i]
  if kind == 'c' then
    local fields = redis.call('HGETALL', key)
    local total = 0
    for j = 1, #fields, 2 do
      local until_ms = redis.call('ZSCORE', KEYS[1], fields[j])
      if until_ms and tonumber(until_ms) >= now then
        total = total + tonumber(fields[j + 1])
      else
        -- The member's lease ended: it died holding these, so they are free.
        redis.call('HDEL', key, fields[j])
      end
    end
    if total + 1 > x then return {0, i - 2, total} end
    table.insert(writes, {'c', key})
  else
    local b = redis.call('HMGET', key, 'tokens', 'ts')
    local tokens = tonumber(b[1]) or y
    local ts = tonumber(b[2]) or now
    tokens = math.min(y, tokens + math.max(0, now - ts) * x / 1000)
    if tokens < 1 then return {0, i - 2, 0} end
    table.insert(writes, {'r', key, tokens - 1, math.ceil(y / x * 1000) + 1000})
  end
end
for _, w in ipairs(writes) do
  if w[1] == 'c' then
    redis.call('HINCRBY', w[2], member, 1)
    redis.call('PEXPIRE', w[2], ttl)
  else
    redis.call('HSET', w[2], 'tokens', tostring(w[3]), 'ts', now)
    redis.call('PEXPIRE', w[2], w[4])
  end
end
return {1}
"#,
    )
});

/// Counts a failed password check; locks the address out at the limit.
/// KEYS: failures, locked. ARGV: max failures, window ms, lockout ms. Returns 1 when
/// this failure locked the address out.
pub static AUTH_FAILURE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#,
    )
});

/// Leases up to `want` bytes of a budget shared by every node: a token bucket of
/// `per_sec` bytes per second holding at most `burst` bytes, refilled by Redis's clock.
/// KEYS: budget. ARGV: per second, burst, want. Returns the bytes granted (all there
/// are, up to `want`) and, when short, the ms until the shortfall is refilled.
pub static LEASE_BUDGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local grant = math.max(0, math.min(want, math.floor(tokens)))
tokens = tokens - grant
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
local retry = 0
if grant < want then retry = math.ceil((want - grant - tokens) / rate * 1000) end
return {grant, math.max(0, retry)}
"#,
    )
});
