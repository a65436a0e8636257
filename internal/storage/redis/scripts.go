package redis

// The Lua scripts. They hold no rule of idemsvc: the rules run in Go (package keys). readScript
// returns the stored value and Redis's clock in one round trip; casScript writes what the rule
// decided only if the value is still the one that was read, and allocates the fence; beginScript
// is the one-round-trip begin on an absent key; delScript is Delete. Every script touches only the
// keys it is given, which share one hash tag, so each runs on the one node that owns the slot,
// also on Redis Cluster.
//
// They need Redis 7.0 or later (PEXPIRETIME; SET PXAT and KEEPTTL are 6.0/6.2; TIME before a
// write needs effects replication, the only kind since 7.0).
//
// Redis does not undo what a script wrote when a later command in it fails (one that the ACL
// denies, say: a script error reaches the caller as a 500 while the write stands). So each
// writing script runs the commands that can fail for a reason other than a bug before its first
// write: the reads, PEXPIRETIME included, and PUBLISH, which needs the channel's permission. A
// failing script then leaves nothing written. Publishing before the write announces nothing
// early: no other client runs while a script does, and a watcher woken by the message reads
// (begins again) after the script has ended, so it sees the write (see watch.go). Open checks
// every permission the scripts need once, at the first contact (check.go).
//
// Every writing script answers with TIME, so that every reply also tells the Store where Redis's
// clock is (see clock.go):
//
//	{1, fence, seconds, microseconds}  it wrote (fence is '' for a delete)
//	{0, value, seconds, microseconds}  it did not; value is what is stored now (nil when none),
//	                                   read at that TIME: the caller decides again from it
//	                                   without another read

// readScript: KEYS[1] the record. Returns {value or nil, seconds, microseconds} of TIME, so that
// decisions use the clock of the node that owns the key, not the clock of the replica that asks.
const readScript = `
local v = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
return {v, t[1], t[2]}
`

// scriptLib is the part that casScript and beginScript share, so that the fence rule and the
// clock check exist once.
//
// put stores a record: KEYS[1] the record, KEYS[2] the key's fence counter (same hash tag);
// fence is the fence to keep, or 'new' to allocate one; rec the record without its fence; pxat
// the record's expiry (Unix ms on Redis's clock); floor the lowest fence a new lease may get
// (Unix µs of the decision time); fexp the counter's expiry (Unix ms on Redis's clock); now the
// script's TIME in Unix µs. It returns the fence written.
//
// Fences: a new lease gets max(counter + 1, floor, now). The counter makes fences strictly grow
// while it exists; it is kept at least until the key's latest record expires plus a margin
// (fexp), so it outlives every record, release and delete. The time floor keeps fences growing
// even when the counter is gone (expired long after the last record, or lost in a failover):
// every earlier fence was at most Redis's TIME when it was written plus the few leases handed
// out within one microsecond, so a later lease's TIME is above it unless the clock stepped back.
// The floor is the write's TIME, not only the decision's: a decision trails its write (by a
// round trip, or by up to clockBehind on a fast path), so a lease decided at a trailing estimate
// just after another was written could have got a fence below that one's (a review's find).
// In production floor is at most now (guess lowers it to now), so the fence is at most the
// TIME of its write but for those few leases within one microsecond. The numbers
// (about 1.8e15 today) are exact in Lua's doubles and in JSON, below 2^53. string.format('%d')
// prints them in full, where tostring would round to 14 digits.
//
// clock runs TIME and returns it with the time in Unix µs. guess checks a write that Go decided
// ahead, at its estimate of Redis's clock (est, Unix µs): it returns the floor to use, or nil
// when Redis's clock is more than ahead µs before the estimate or more than behind µs after it
// (clockAhead and clockBehind in clock.go). Then the decision might differ from the one Redis's
// clock gives, so the script writes nothing and the caller decides again on the reply. When the
// estimate is ahead of Redis's clock the floor comes down by as much, so that no fence exceeds
// the TIME of its write (in production, where the decision time is the estimate, the floor is
// then exactly that TIME).
const scriptLib = `
local function put(fence, rec, pxat, floor, fexp, now)
  local c = tonumber(redis.call('GET', KEYS[2]) or '0')
  local exp = redis.call('PEXPIRETIME', KEYS[2])
  if fence == 'new' then
    local f = c + 1
    if floor > f then f = floor end
    if now > f then f = now end
    fence = string.format('%d', f)
  end
  if tonumber(fence) > c then
    redis.call('SET', KEYS[2], fence, 'KEEPTTL')
  end
  if exp < fexp then
    redis.call('PEXPIREAT', KEYS[2], fexp)
  end
  redis.call('SET', KEYS[1], fence .. ':' .. rec, 'PXAT', pxat)
  return fence
end
local function clock()
  local t = redis.call('TIME')
  return t, tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function guess(now, est, ahead, behind, floor)
  if now < est - ahead or now > est + behind then return nil end
  if est > now then return floor - (est - now) end
  return floor
end
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
//	ARGV[10] '' when the value was read from Redis; when it was taken from the Store's cache and
//	         the decision made at its estimate of Redis's clock: that estimate, Unix µs
//	ARGV[11], ARGV[12] with ARGV[10]: how far (µs) Redis's clock may be before it, and after it
//	ARGV[13] '' or the instant, Unix µs on Redis's clock, from which the write must not land:
//	         the sooner of when the decision may no longer hold (keys.Record.NextChange: the
//	         record's or its lease's expiry) and the operation's deadline (Store.notAfter)
//
// It writes nothing when the record changed since it was read (or since the Store cached it),
// when the estimate was too far off, or when TIME has reached ARGV[13]: a holder's complete
// decided just before the record expired must not land after it (Redis keeps an expired key
// for up to a millisecond past PXAT, and another replica may already have answered that the
// record is gone), and a write whose caller was answered "unavailable" when its deadline passed
// must not land after that answer (see Store.notAfter). The reply then carries the current value and TIME, and the caller decides
// again. The stored value is the fence in decimal, ':', then the record in
// keys' codec. Comparing the whole value is cheap: every write replaces an in-progress record or
// none, and those are small; a completed record is never the base of a write while it lives.
const casScript = scriptLib + `
local t, now = clock()
local cur = redis.call('GET', KEYS[1])
if ARGV[13] ~= '' and now >= tonumber(ARGV[13]) then return {0, cur, t[1], t[2]} end
local floor = tonumber(ARGV[7])
if ARGV[10] ~= '' then
  floor = guess(now, tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12]), floor)
  if not floor then return {0, cur, t[1], t[2]} end
end
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return {0, cur, t[1], t[2]} end
elseif cur then
  return {0, cur, t[1], t[2]}
end
if ARGV[9] ~= '' then redis.call('PUBLISH', ARGV[9], '') end
local fence = ARGV[5]
if ARGV[3] == 'del' then
  redis.call('DEL', KEYS[1])
else
  fence = put(fence, ARGV[4], ARGV[6], floor, tonumber(ARGV[8]), now)
end
return {1, fence, t[1], t[2]}
`

// beginScript is begin in one round trip when the key is absent. Go decided the acquire ahead
// (on no record, which always acquires) at its estimate of Redis's clock, and built the record.
//
//	KEYS[1] the record, KEYS[2] the key's fence counter (same hash tag)
//	ARGV[1] the record to store, without its fence
//	ARGV[2] the record's expiry, Unix milliseconds on Redis's clock
//	ARGV[3] the decision time, Unix µs (the floor of the new fence)
//	ARGV[4] the fence counter's expiry, Unix milliseconds on Redis's clock
//	ARGV[5] the estimate of Redis's clock the decision was made at, Unix µs
//	ARGV[6], ARGV[7] how far (µs) Redis's clock may be before it, and after it
//	ARGV[8] '' or the instant, Unix µs on Redis's clock, from which it must not write: the
//	        operation's deadline (Store.notAfter)
//
// When a record is stored, the estimate is too far off, or TIME has reached ARGV[8], it writes
// nothing and returns the value and TIME, which serve the caller as its read (a replay or a
// conflict so costs one round trip in all). An acquire never publishes: nobody waits on an
// absent key.
const beginScript = scriptLib + `
local t, now = clock()
local cur = redis.call('GET', KEYS[1])
if cur then return {0, cur, t[1], t[2]} end
if ARGV[8] ~= '' and now >= tonumber(ARGV[8]) then return {0, false, t[1], t[2]} end
local floor = guess(now, tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[3]))
if not floor then return {0, false, t[1], t[2]} end
local fence = put('new', ARGV[1], ARGV[2], floor, tonumber(ARGV[4]), now)
return {1, fence, t[1], t[2]}
`

// delScript: KEYS[1] the record; ARGV[1] the channel; ARGV[2] the empty string or the instant,
// Unix µs on Redis's clock, from which it must not delete: the operation's deadline
// (Store.notAfter). Deletes whatever is there and wakes the watchers, and returns {1, seconds,
// microseconds} of TIME; returns {0, ...}, deleting nothing, once TIME has reached ARGV[2]. The
// fence counter stays.
const delScript = `
local t = redis.call('TIME')
if ARGV[2] ~= '' and tonumber(t[1]) * 1000000 + tonumber(t[2]) >= tonumber(ARGV[2]) then
  return {0, t[1], t[2]}
end
redis.call('PUBLISH', ARGV[1], '')
redis.call('DEL', KEYS[1])
return {1, t[1], t[2]}
`

// touchScript: KEYS[1] the record, KEYS[2] its fence counter. It sets the counter (or, without
// one, the record) again to its own value and TTL, a write that replicates, so that a WAIT after
// it covers every earlier write of the key: {1} when it wrote, {0} when neither key exists.
const touchScript = `
local k = KEYS[2]
local v = redis.call('GET', k)
if not v then
  k = KEYS[1]
  v = redis.call('GET', k)
end
if not v then return {0} end
redis.call('SET', k, v, 'KEEPTTL')
return {1}
`
