package redis

// The Lua scripts. They hold no rule of idemsvc: the rules run in Go (package keys). readScript
// returns the stored value and Redis's clock in one round trip; casScript writes what the rule
// decided only if the value is still the one that was read, and allocates the fence; delScript is
// Delete. Every script touches only the keys it is given, which share one hash tag, so each runs
// on the one node that owns the slot, also on Redis Cluster.
//
// They need Redis 7.0 or later (PEXPIRETIME; SET PXAT and KEEPTTL are 6.0/6.2).

// readScript: KEYS[1] the record. Returns {value or nil, seconds, microseconds} of TIME, so that
// decisions use the clock of the node that owns the key, not the clock of the replica that asks.
const readScript = `
local v = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
return {v, t[1], t[2]}
`

// casScript writes one decision, compare-and-set.
//
//	KEYS[1] the record, KEYS[2] the key's fence counter (same hash tag)
//	ARGV[1] '1' when the record was read as present, '0' when absent
//	ARGV[2] the value that was read (compared byte for byte)
//	ARGV[3] 'put' or 'del'
//	ARGV[4] the record to store (put), without its fence
//	ARGV[5] the fence to keep, or 'new' to allocate one (put)
//	ARGV[6] the record's expiry, Unix milliseconds on Redis's clock (put)
//	ARGV[7] the lowest fence a new lease may get: the decision time in Unix microseconds (put)
//	ARGV[8] the fence counter's expiry, Unix milliseconds on Redis's clock (put)
//	ARGV[9] the channel to PUBLISH a change on, or ''
//
// Returns {1, fence} when it wrote, {0} when the record changed since it was read (the caller
// reads again and decides again). The stored value is the fence in decimal, ':', then the record
// in keys' codec. Comparing the whole value is cheap: every write replaces an in-progress record
// or none, and those are small; a completed record is never the base of a write while it lives.
//
// Fences: a new lease gets max(counter + 1, decision time in microseconds). The counter makes
// fences strictly grow while it exists; it is kept at least until the key's latest record expires
// plus a margin (ARGV[8]), so it outlives every record, release and delete. The time floor keeps
// fences growing even when the counter is gone (expired long after the last record, or lost in a
// failover): every earlier fence was at most its own decision time plus the few leases handed out
// within one microsecond, so a later lease's time is above it unless the clock stepped back. The
// numbers (about 1.8e15 today) are exact in Lua's doubles and in JSON, below 2^53.
// string.format('%d') prints them in full, where tostring would round to 14 digits.
const casScript = `
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return {0} end
elseif cur then
  return {0}
end
local fence = ARGV[5]
if ARGV[3] == 'del' then
  redis.call('DEL', KEYS[1])
else
  local c = tonumber(redis.call('GET', KEYS[2]) or '0')
  if fence == 'new' then
    local f = c + 1
    local floor = tonumber(ARGV[7])
    if floor > f then f = floor end
    fence = string.format('%d', f)
  end
  if tonumber(fence) > c then
    redis.call('SET', KEYS[2], fence, 'KEEPTTL')
  end
  local exp = tonumber(ARGV[8])
  if redis.call('PEXPIRETIME', KEYS[2]) < exp then
    redis.call('PEXPIREAT', KEYS[2], exp)
  end
  redis.call('SET', KEYS[1], fence .. ':' .. ARGV[4], 'PXAT', ARGV[6])
end
if ARGV[9] ~= '' then redis.call('PUBLISH', ARGV[9], '') end
return {1, fence}
`

// delScript: KEYS[1] the record; ARGV[1] the channel. Deletes whatever is there and wakes the
// watchers. The fence counter stays.
const delScript = `
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], '')
return 1
`
