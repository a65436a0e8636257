// Package redis is the Redis backend of idemsvc: a keys.Store that many idemsvc replicas share.
//
// # Design
//
// The rules stay in package keys, the one source of them. An operation decides in Go with
// keys.DecideX on a snapshot of the stored record and the time, and, when the rule writes, runs
// casScript: it writes only if the stored value is still, byte for byte, the one decided on,
// allocates the fence of a new lease, sets the record's expiry and publishes the change. When the
// value changed in between, the operation reads and decides again (at most 10 times, with
// jittered backoff; every lost attempt means another writer won). So among concurrent begins on
// one key, on any number of replicas, exactly one write lands.
//
// The snapshot is a read (readScript: the value and Redis's TIME), except where the Store can
// decide ahead of the write and so save the read's round trip:
//
//   - Begin decides on "no record" at its estimate of Redis's clock (clock.go) and sends the new
//     record with beginScript, which stores it (with the fence rule of casScript) when the key is
//     absent and Redis's TIME is close enough to the estimate. When a record is stored, or the
//     estimate is off, it writes nothing and returns the value and TIME: that is the read, and
//     begin goes on as above.
//   - Complete, Renew and Release decide on the value this Store wrote for the lease (its begin or
//     renew: the cache of cache.go) at the estimate, when no time the rule compares with (lease
//     end, expiry) is near it, and send that decision to casScript, which compares the cached
//     value with the stored one and checks TIME too. A stale cache (another replica wrote) or a
//     wrong estimate makes it write nothing and return the value and TIME: again, that is the
//     read.
//
// Either way every write is a compare-and-set of a value against the stored one, decided by the
// rule on that value at a time the script checked; a wrong guess costs one round trip, never a
// wrong write. Round trips:
//
//	Begin     1 to acquire an absent key, and for replay, in progress and mismatch;
//	          2 to take over, or when the estimate of Redis's clock is off, or to acquire
//	          while this Store's recent begins mostly found stored keys (it then reads
//	          first, so that replays do not carry a record: see Store.fresh)
//	Complete  1 when this Store began (or last renewed) the lease, else 2; 1 for the same
//	          complete again
//	Renew     the same as Complete; Release too (1 when it writes nothing)
//	Get, Delete, Ping  1
//	Watch     0 when this Store already subscribes to the key's channel, else 1 (SUBSCRIBE)
//
// plus 2 for each compare-and-set lost to a concurrent writer. So a begin+complete pair through
// one replica is 2 round trips (it was 4 when every operation read first). The scripts are sent
// once and then called by hash (EVALSHA, falling back to EVAL after a SCRIPT FLUSH or a restart).
//
// Each (tenant, key) has two Redis keys that share one hash tag, so every script touches one slot
// and the store also runs on Redis Cluster:
//
//	<prefix>:{<id>}:r  the record: "<fence>:" then keys' binary codec; PEXPIREAT its ExpiresAt
//	<prefix>:{<id>}:f  the fence counter; it expires a day after the key's latest record
//	<prefix>:{<id>}:c  the pub/sub channel the writes publish on (a channel, not a key)
//
// where <id> is keys.StorageID(tenant, key) with every byte outside '!'..'~', and '%', '{' and
// '}', written as %XX (readable in redis-cli, and no brace can break the hash tag). Records
// expire through Redis's own expiry, so Sweep has nothing to do. See scripts.go for the fences.
//
// The client is rueidis, chosen by measurement over go-redis: with 64 goroutines its automatic
// pipelining gave about twice the begin+complete pairs per second (BenchmarkBeginComplete); with
// one goroutine the two were even. Redis 7.0 or later is needed.
//
// # Clock
//
// Lease and expiry decisions use the time of the Redis node that owns the key, so replicas with
// skewed clocks agree: read by TIME inside the scripts, or, when the Store decides ahead,
// estimated from the TIME of earlier replies and checked by the writing script against its own
// TIME (within 1ms ahead and 25ms behind, and only when no lease end or expiry lies within that
// window, so the decision is the one Redis's clock gives; see clock.go). On Redis Cluster the
// one estimate serves every node: nodes whose clocks are further apart than that window cost the
// fast paths' round trip now and then, and stay correct.
//
// Options.Now, when set, replaces that clock for decisions: the conformance suite drives a fake
// clock through it. Redis expiries are then placed at the same distance from Redis's own time (or
// its estimate) as the record's ExpiresAt is from the fake now.
//
// # Failures
//
// When Redis cannot be reached, answers too slowly (Options.Timeout, or the caller's deadline)
// or says it cannot serve (LOADING, READONLY, OOM, MISCONF, ...), every operation returns an error wrapping
// keys.ErrUnavailable, and Ping too. A write whose reply was lost is reported so, never as done:
// it may have landed (a begin then holds the key until its lease runs out; a complete repeated
// with the same token and response tells), but only before the error was returned: a script
// still on its way when the deadline passed writes nothing when it arrives (Store.notAfter).
// The store reconnects by itself.
//
// # Limits
//
// Redis replicates asynchronously, and acknowledges a write before any replica has it. When a
// primary fails over, or restarts without its data, its last writes can be lost:
//   - a lost lease lets another caller acquire the key while the first still executes: the
//     operation runs twice (the first holder's complete then fails with lease lost or not found);
//   - a lost completed record lets a retry execute the operation again;
//   - a lost release or delete brings back a held key, which frees itself when its lease ends.
//
// Fences keep growing even then, since they are floored by the Redis clock (unless the new
// primary's clock is behind the old one's). Eviction loses records the same way: run Redis with
// maxmemory-policy noeviction (a full Redis then answers OOM, which is keys.ErrUnavailable); the
// Store refuses any other policy (see below) unless Options.AllowEviction.
// min-replicas-to-write and AOF (appendfsync everysec or always) narrow the window; nothing in
// Redis closes it. Callers that cannot afford a second execution must make the operation itself
// reject it (a unique constraint downstream, or a check of the fence).
//
// # Lost data
//
// The Store keeps a data marker in Redis (<prefix>:{%marker}, a random value without expiry; on
// Redis Cluster one in each range of slots, <prefix>:{%marker-N}), set at the first contact. Ping, when it reads the policy (at most once a second), reads it too:
// when it is gone (a restart without persistence, a failover to a replica without it, FLUSHDB,
// FLUSHALL, eviction) the Store puts a new one and calls Options.OnDataLoss; a replica that then
// finds another value than the one it saw learns of the same loss. It cannot tell a loss that
// happened while no replica ran from a new Redis, nor a partial loss (a restart from an older
// snapshot that still holds the marker). It only tells: the records are gone either way.
//
// # Redis configuration
//
// The Store checks Redis at the first contact (at Open, or, when Redis cannot be reached then,
// when it first answers; see check.go): version 7.0 or later; maxmemory-policy noeviction (any
// other policy, volatile-* included since every key of the Store expires, lets Redis evict
// stored responses and held leases, and the next begin executes again), unless
// Options.AllowEviction; and every permission below, by a probe on a key and channel under the
// prefix. Open fails when Redis answers and a check fails (an error wrapping ErrMisconfigured
// that names the policy, or the command, key or channel denied); until the checks pass,
// operations and Ping fail. Ping reads the policy again at most once a second, and fails while
// it evicts (unless AllowEviction): /readyz follows a CONFIG SET.
//
// The ACL the Store needs, for the default prefix "idem" (ACL(prefix) returns it for another):
//
//	ACL SETUSER idemsvc on >PASSWORD +hello +info +ping +time +evalsha +eval +evalsha_ro +eval_ro
//	    +subscribe +get +set +del +pexpiretime +pexpireat +publish ~idem* &idem*
//
// That is: on the connection HELLO (without it the client falls back to RESP2 and AUTH, which
// works too), INFO (the checks and Ping's policy read), PING, TIME; the scripts through EVALSHA,
// and EVAL after a SCRIPT FLUSH or a restart, and the read script through EVALSHA_RO and EVAL_RO;
// SUBSCRIBE for watchers (never UNSUBSCRIBE: see watch.go); inside the scripts GET, SET, DEL, TIME, PEXPIRETIME,
// PEXPIREAT and PUBLISH; the keys ~PREFIX* and the channels &PREFIX* (Redis 7 grants no
// channel by default: acl-pubsub-default resetchannels). Add +select when the URL names a
// database other than 0. The client also tries CLUSTER SLOTS when it connects; a NOPERM there
// is fine on a single node (it then treats Redis as one). On Redis Cluster the client must be
// allowed to learn the slots and to follow ASK: add +cluster|slots +cluster|shards +asking
// (CLUSTER SHARDS on Redis 8), on every node (Redis Cluster does not share ACLs). Without it the client treats the node it was
// given as the whole Redis, so the checks refuse a node that reports redis_mode:cluster to a
// client that is not in cluster mode (TestClusterACLWithoutSlots).
//
// # Redis Sentinel
//
// A URL with master_set names Sentinels (the host, and more with addr=); rueidis asks them for
// the master, checks it with ROLE, and sends every command there (INFO, TIME, the scripts, the
// marker, SUBSCRIBE: Nodes is the master alone). It switches on Sentinel's +switch-master, and
// asks again every sentinelRefresh, in case it missed the event. The pub/sub connection is the
// hub's and does not break when its master is merely demoted, so the hub closes it when the
// client has switched (watch.go). The URL's credentials are the master's; the Sentinels get
// Options.Sentinel. The user needs +role besides the ACL above (sentinelACL), and a user on the
// Sentinels SentinelACL. A forced failover loses the writes the old master acknowledged after
// its replica's promotion and before the switch (TestSentinelFailover logs how many): Sentinel
// does not stop the old master; with Options.MinReplicas none is lost (they answer 503: the old
// master has no replica left to acknowledge them). TLS and unix sockets are refused with
// master_set.
//
// # Redis Cluster
//
// Commands without a key (INFO, PING, TIME) go to any one node: the checks read INFO on every
// node (version, policy), but the ACL probe runs on the node of its probe key only and Ping
// pings one node. There is a data marker in each range of slots (see markerKeys), so that a loss
// of any master's data is noticed. While a key's slot is being migrated, a script whose two keys
// are not all on one side gets TRYAGAIN (it did not run): the operation tries again, for about
// half a second (maxAttempts).
package redis

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// Options tune a Store. The zero value is ready to use.
type Options struct {
	// Now, when set, replaces Redis's clock (TIME, read inside the scripts) as the clock of every
	// rule decision. It is for tests, which drive a fake clock; production leaves it nil so that
	// all replicas use the one clock of the Redis node.
	Now func() time.Time
	// Prefix namespaces every Redis key and channel of the store, so that tests (or several
	// deployments on one Redis) stay apart. It must not contain '{' or '}'. Default "idem".
	Prefix string
	// Timeout bounds each operation, all its round trips included, within the caller's context.
	// Default 2s.
	Timeout time.Duration
	// AllowEviction lets the Store serve a Redis whose maxmemory-policy may evict keys (any but
	// noeviction). Redis then drops stored responses and held leases when memory runs short,
	// and the next begin on such a key acquires it again: the operation runs twice. Without it,
	// Open fails on such a Redis, and Ping (readiness) fails while Redis's policy is one. A
	// caller that sets it should warn: see Store.EvictionPolicy and OnEvictionPolicy.
	AllowEviction bool
	// OnEvictionPolicy, when set, is called with Redis's maxmemory-policy when the Store first
	// reads it (at the first contact with Redis, at Open or later) and whenever a later read
	// (by Ping, at most once a second) finds another one; "" when INFO does not tell. It is
	// called whether or not the policy evicts (see Store.EvictionPolicy), synchronously, from
	// Open, an operation or Ping: it must not block or call the Store.
	OnEvictionPolicy func(policy string)
	// OnDataLoss, when set, is called when the Store finds that Redis lost its data since it
	// last looked (see "Lost data" in the package doc), with what it found. It is called
	// synchronously from Ping: it must not block or call the Store.
	OnDataLoss func(found string)
	// TLS: files that complete a rediss:// URL (see TLSFiles); zero for none.
	TLS TLSFiles
	// MinReplicas, when above 0, acknowledges a write (a begin that acquired, a complete, a
	// renew, a release, a delete) only once that many replicas have it: each writing script
	// goes with a WAIT, on a connection of its own, and a write that fewer replicas acknowledged
	// within the operation's time answers keys.ErrUnavailable (503: it may be on the master, as
	// after a timeout). A failover to the most advanced replica (Sentinel's and Cluster's
	// choice) then loses no answered write; the price is a replication round trip per write, and
	// 503 for every write while fewer replicas are connected.
	MinReplicas int
	// Sentinel: the credentials of the Sentinels, for a URL with master_set whose Sentinels
	// require them (requirepass, or an ACL user, in sentinel.conf); zero for none. The URL's
	// own credentials are the master's.
	Sentinel SentinelAuth
}

// SentinelAuth are the credentials idemsvc gives the Sentinels (see "Redis Sentinel" in the
// package doc). An empty Username is the default user.
type SentinelAuth struct {
	Username, Password string
}

// TLSFiles are PEM files for a rediss:// URL: the CA that signed Redis's certificate, when it
// is not one the system trusts (a managed Redis's private CA), and a client certificate and its
// key, for a Redis that requires one (tls-auth-clients yes). The client certificate is read
// again at every connection, so that a renewed one needs no restart.
type TLSFiles struct {
	CAFile, CertFile, KeyFile string
}

// DefaultPrefix is the Prefix when Options.Prefix is empty.
const DefaultPrefix = "idem"

const (
	defaultTimeout = 2 * time.Second
	// fenceMargin is how long a key's fence counter outlives its latest record.
	fenceMargin = 24 * time.Hour
	// maxAttempts bounds the compare-and-set retries of one operation. Each failed attempt means
	// another writer succeeded on the same key, so the store as a whole always makes progress.
	maxAttempts = 10
)

var _ keys.Store = (*Store)(nil)

// Store is a keys.Store on Redis. It is safe for concurrent use.
type Store struct {
	d       driver
	rd      *rueidisDriver // the driver under d; nil in tests that make their own
	prefix  string
	now     func() time.Time
	timeout time.Duration
	hub     *hub
	closed  atomic.Bool
	// clock estimates Redis's clock, for the decisions made ahead (see clock.go).
	clock *redisClock
	// cache holds the values this Store wrote for leases in progress (see cache.go).
	cache *valueCache
	// decoded holds the decodings of completed records' values last read (see cache.go).
	decoded *decodedCache
	// fresh scores the keys that recent begins found: up by freshUp for an absent key, down by
	// one for a stored one, within ±freshCap. Begin decides ahead (beginScript) while it is not
	// negative, and reads first when stored keys have outnumbered absent ones freshUp to one:
	// beginScript carries the record it would write, which a replay sends for nothing, and a
	// read first costs an acquire a second round trip.
	fresh atomic.Int32

	// The checks of the server (check.go). checked is set once they have passed; until then
	// checking is the run in flight, and checkErr the last run's error, at checkAt.
	checked  atomic.Bool
	checkMu  sync.Mutex
	checking *checkRun
	checkErr error
	checkAt  time.Time
	checkWG  sync.WaitGroup
	// life ends when the Store closes: it bounds the checks' runs.
	life          context.Context
	lifeEnd       context.CancelFunc
	allowEviction bool
	onPolicy      func(string)
	// policy is Redis's maxmemory-policy as last read (nil before); policyAt when it was last
	// read or claimed by a Ping, on clock.mono's scale.
	policy   atomic.Pointer[string]
	policyAt atomic.Int64
	policyMu sync.Mutex
	// markers holds the value of each data marker (markerKeys) as this Store last saw it; a
	// marker not in it has not been seen yet.
	markerMu   sync.Mutex
	markers    map[string]string
	onDataLoss func(string)
	// clustered is set when the checks found Redis Cluster (the client in cluster mode).
	clustered atomic.Bool
}

const (
	freshUp  = 3
	freshCap = 48
)

// learnFresh scores one begin's key: absent or stored.
func (s *Store) learnFresh(absent bool) { keys.LearnFresh(&s.fresh, absent, freshUp, 1, freshCap) }

// driver is the little that Store needs from a Redis client: rueidisDriver; tests wrap it to
// lose replies or count round trips.
type driver interface {
	// read runs readScript on the record key.
	read(ctx context.Context, key string) (reply, error)
	// cas runs casScript.
	cas(ctx context.Context, keys [2]string, args []string) (reply, error)
	// begin runs beginScript.
	begin(ctx context.Context, keys [2]string, args []string) (reply, error)
	// del runs delScript: wrote reports whether it deleted (it does not once Redis's clock has
	// reached notAfter).
	del(ctx context.Context, key, channel, notAfter string) (reply, error)
	// settle returns once Options.MinReplicas replicas have the key's record and fence as the
	// master holds them (nil at once without MinReplicas).
	settle(ctx context.Context, keys [2]string) error
	// time runs TIME.
	time(ctx context.Context) (sec, usec int64, err error)
	ping(ctx context.Context) error
	// info runs INFO section.
	info(ctx context.Context, section string) (string, error)
	// marker stores candidate at key unless key exists, and returns key's value afterwards and
	// whether it stored it.
	marker(ctx context.Context, key, candidate string) (current string, created bool, err error)
	// gets runs GET on each of keys, at once: each value, and whether its key exists.
	gets(ctx context.Context, keys []string) []gotValue
	// slots returns the ranges of hash slots of a Redis Cluster (CLUSTER SLOTS), each served by
	// one master; none on a single Redis.
	slots(ctx context.Context) ([][2]uint16, error)
	// unavailable reports whether a failure means Redis cannot serve now (network, timeout,
	// LOADING, READONLY, ...), as opposed to a bug (a script error, a wrong type).
	unavailable(err error) bool
	// denied reports whether a failure is Redis's ACL refusing a command, key or channel, at the
	// top level or inside a script.
	denied(err error) bool
	close()
}

// gotValue is the answer to one GET of driver.gets: the value, whether the key exists, or why
// there is no answer.
type gotValue struct {
	value string
	ok    bool
	err   error
}

// reply is a script's answer.
type reply struct {
	wrote bool
	fence string // when it wrote a record: its fence, in decimal
	// When it did not write (and from readScript): the stored value, verbatim, and whether there
	// is one.
	val    string
	exists bool
	// sec, usec are Redis's TIME while the script ran.
	sec, usec int64
}

func (r reply) time() time.Time { return time.Unix(r.sec, r.usec*1000).UTC() }

func newStore(d driver, opts Options) (*Store, error) {
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if strings.ContainsAny(opts.Prefix, "{}") {
		return nil, fmt.Errorf("redis: prefix %q may not contain '{' or '}'", opts.Prefix)
	}
	if opts.Timeout <= 0 {
		opts.Timeout = defaultTimeout
	}
	life, end := context.WithCancel(context.Background())
	return &Store{
		d: d, prefix: opts.Prefix, now: opts.Now, timeout: opts.Timeout,
		clock: newRedisClock(), cache: newValueCache(), decoded: newDecodedCache(),
		life: life, lifeEnd: end, allowEviction: opts.AllowEviction, onPolicy: opts.OnEvictionPolicy,
		onDataLoss: opts.OnDataLoss,
	}, nil
}

// encodeValue returns keys' encoding of rec as a string, without copying it: the bytes are
// written once, into a slice that nothing else holds, and never written again.
func encodeValue(rec *keys.Record) string {
	b := keys.AppendRecord(nil, rec)
	return unsafe.String(unsafe.SliceData(b), len(b))
}

// The scripts' arguments for clockAhead and clockBehind, which never change.
var clockAheadArg, clockBehindArg = strconv.FormatInt(clockAhead.Microseconds(), 10), strconv.FormatInt(clockBehind.Microseconds(), 10)

// decimals sets dst[i] to the decimal form of vs[i], all in one allocation (a script call's
// numbers: timestamps, each its own allocation with strconv).
func decimals(dst []string, vs ...int64) {
	b := make([]byte, 0, 20*len(vs)) // room for any int64: b never moves
	var ends [8]int
	for i, v := range vs {
		b = strconv.AppendInt(b, v, 10)
		ends[i] = len(b)
	}
	all := unsafe.String(unsafe.SliceData(b), len(b))
	start := 0
	for i := range vs {
		dst[i], start = all[start:ends[i]], ends[i]
	}
}

// names are the Redis names of one (tenant, key).
type names struct {
	rec, fence, channel string
}

func (s *Store) names(tenant, key string) names {
	var scratch [256]byte
	base := append(scratch[:0], s.prefix...)
	base = append(base, ":{"...)
	base = appendEscapedID(base, keys.AppendStorageID(make([]byte, 0, 128), tenant, key))
	base = append(base, "}:"...)
	// Three strings, one allocation each: the names are kept apart (in caches and in the pub/sub
	// hub), so one backing string for all three would keep all three alive.
	name := func(suffix byte) string {
		var b strings.Builder
		b.Grow(len(base) + 1)
		b.Write(base)
		b.WriteByte(suffix)
		return b.String()
	}
	return names{rec: name('r'), fence: name('f'), channel: name('c')}
}

// appendEscapedID appends the storage id id to b, readable in redis-cli and free of the braces
// that would break the hash tag: bytes outside '!'..'~', and '%', '{', '}', become %XX.
func appendEscapedID(b, id []byte) []byte {
	const hex = "0123456789ABCDEF"
	for _, c := range id {
		if c < '!' || c > '~' || c == '%' || c == '{' || c == '}' {
			b = append(b, '%', hex[c>>4], hex[c&15])
			continue
		}
		b = append(b, c)
	}
	return b
}

// snapshot is what a decision is made on: the stored record, verbatim, and the clocks. It comes
// from a script's reply (a read, or a write that did not happen), or, for a decision made ahead,
// from the Store's cache and its estimate of Redis's clock.
type snapshot struct {
	raw    string
	exists bool
	rec    *keys.Record // nil when absent
	// now is the decision time: Redis's TIME (or its estimate), or Options.Now.
	now time.Time
	// offset is Redis's TIME (or its estimate) minus now; zero in production.
	offset time.Duration
	// est, when set, is the estimate of Redis's clock that the decision was made at, ahead of
	// the write: the script then checks it against TIME (see clock.go).
	est time.Time
}

var _ keys.Clocked = (*Store)(nil)

// Now implements keys.Clocked: the Store's estimate of Redis's clock (Options.Now when set;
// the host's clock until a reply has told where Redis's is).
func (s *Store) Now() time.Time {
	if s.now != nil {
		return s.now()
	}
	if est, ok := s.clock.now(); ok {
		return est
	}
	return time.Now()
}

// call runs one script and learns Redis's clock from its reply.
func (s *Store) call(run func() (reply, error)) (reply, error) {
	sent := time.Now()
	r, err := run()
	if err == nil {
		s.clock.observe(sent, time.Now(), r.time())
	}
	return r, err
}

func (s *Store) read(ctx context.Context, n names) (snapshot, error) {
	r, err := s.call(func() (reply, error) { return s.d.read(ctx, n.rec) })
	if err != nil {
		return snapshot{}, s.edge(err)
	}
	if r.exists {
		if rec := s.decoded.get(n.rec, r.val); rec != nil {
			return s.snapWith(r, rec), nil
		}
	}
	snap, err := s.snap(r)
	if err == nil && snap.rec != nil {
		s.decoded.put(n.rec, r.val, snap.rec)
	}
	return snap, err
}

// snap is the record and clock that a script saw.
func (s *Store) snap(r reply) (snapshot, error) {
	if !r.exists {
		return s.snapWith(r, nil), nil
	}
	rec, err := decodeValue(r.val)
	if err != nil {
		return snapshot{}, err
	}
	return s.snapWith(r, &rec), nil
}

// snapWith is snap with the record already decoded (nil when none).
func (s *Store) snapWith(r reply, rec *keys.Record) snapshot {
	redisNow := r.time()
	snap := snapshot{raw: r.val, exists: r.exists, now: redisNow, rec: rec}
	if s.now != nil {
		snap.now = s.now()
		snap.offset = redisNow.Sub(snap.now)
	}
	return snap
}

// ahead returns the clocks of a decision made ahead of the write, at the estimate of Redis's
// clock (its record is for the caller to fill in), and false while there is no estimate yet.
func (s *Store) ahead() (snapshot, bool) {
	est, ok := s.clock.now()
	if !ok {
		return snapshot{}, false
	}
	snap := snapshot{now: est, est: est}
	if s.now != nil {
		snap.now = s.now()
		snap.offset = est.Sub(snap.now)
	}
	return snap, true
}

// cached returns a snapshot of n's record as this Store last wrote it, for a decision made
// ahead; false when it holds none (or has no estimate of the clock yet).
func (s *Store) cached(n names) (snapshot, bool) {
	raw, ok := s.cache.get(n.rec)
	if !ok {
		return snapshot{}, false
	}
	snap, ok := s.ahead()
	if !ok {
		return snapshot{}, false
	}
	rec, err := decodeValue(raw)
	if err != nil {
		s.cache.drop(n.rec)
		return snapshot{}, false
	}
	snap.raw, snap.exists, snap.rec = raw, true, &rec
	return snap, true
}

// steady reports whether a decision made ahead on snap holds at every time Redis's clock may
// show when the write runs (the script checks that it is within clockAhead before and
// clockBehind after the estimate): no time the rules compare with (the lease's end, the record's
// expiry; "live" is now < t) lies in that window.
func (snap snapshot) steady() bool {
	if snap.rec == nil {
		return true
	}
	lo, hi := snap.now.Add(-clockAhead), snap.now.Add(clockBehind)
	for _, t := range [...]time.Time{snap.rec.Lease.ExpiresAt, snap.rec.ExpiresAt} {
		if t.After(lo) && !t.After(hi) {
			return false
		}
	}
	return true
}

func decodeValue(raw string) (keys.Record, error) {
	i := strings.IndexByte(raw, ':')
	if i < 0 {
		return keys.Record{}, errors.New("redis: stored value has no fence")
	}
	fence, err := strconv.ParseUint(raw[:i], 10, 64)
	if err != nil {
		return keys.Record{}, fmt.Errorf("redis: stored value has a bad fence: %w", err)
	}
	// DecodeRecord copies what it keeps and never writes to its input: no need to copy raw.
	r, err := keys.DecodeRecord(unsafe.Slice(unsafe.StringData(raw[i+1:]), len(raw)-i-1))
	if err != nil {
		return keys.Record{}, err
	}
	r.Lease.Fence = fence
	return r, nil
}

// redisMillis turns a time on the decision clock into Unix milliseconds on Redis's clock,
// rounded up so that Redis never removes a record while the rules still see it live.
func (snap snapshot) redisMillis(t time.Time) int64 {
	t = t.Add(snap.offset)
	ms := t.UnixMilli()
	if t.After(time.UnixMilli(ms)) {
		ms++
	}
	return ms
}

type casWrite struct {
	del      bool
	rec      *keys.Record // put
	newFence bool         // put: allocate a fence for a new lease
	publish  bool
}

// casResult is what a compare-and-set did.
type casResult struct {
	wrote bool
	fence uint64 // of the record written
	// reply is the script's; when it did not write, it holds the current value and TIME.
	reply reply
}

// cas writes w if the record is still snap, and keeps the cache: the value it wrote when that
// holds a lease in progress, else nothing for the key.
func (s *Store) cas(ctx context.Context, n names, snap snapshot, w casWrite) (casResult, error) {
	present := "0"
	if snap.exists {
		present = "1"
	}
	channel := ""
	if w.publish {
		channel = n.channel
	}
	args := []string{present, snap.raw, "put", "", "", "0", "0", "0", channel, "", "", "", ""}
	// Not at or after the operation's deadline, nor once the decision stops holding: that
	// instant on Redis's clock, rounded up to TIME's microseconds, so that every decision made
	// on TIME sees the record change exactly there. Not the latter with Options.Now: the script
	// cannot see that clock, which stands still while Redis's moves.
	until := s.notAfter(ctx)
	deadline := until != 0 // whether until is the deadline's, not the decision's end
	if snap.rec != nil && s.now == nil {
		if next := snap.rec.NextChange(snap.now); !next.IsZero() {
			us := next.UnixMicro()
			if next.After(time.UnixMicro(us)) {
				us++
			}
			if until == 0 || us < until {
				until, deadline = us, false
			}
		}
	}
	args[12] = microsArg(until)
	if w.del {
		args[2] = "del"
	} else {
		rec := *w.rec
		fence := "new"
		if !w.newFence {
			fence = strconv.FormatUint(rec.Lease.Fence, 10)
		}
		rec.Lease.Fence = 0 // the value's prefix is the fence
		args[3] = encodeValue(&rec)
		args[4] = fence
		expires := snap.redisMillis(rec.ExpiresAt)
		decimals(args[5:8], expires, snap.now.UnixMicro(), expires+fenceMargin.Milliseconds())
	}
	if !snap.est.IsZero() {
		args[9] = strconv.FormatInt(snap.est.UnixMicro(), 10)
		args[10], args[11] = clockAheadArg, clockBehindArg
	}
	r, err := s.call(func() (reply, error) { return s.d.cas(ctx, [2]string{n.rec, n.fence}, args) })
	if err != nil || !r.wrote || w.del || w.rec.State != keys.StateInProgress {
		s.cache.drop(n.rec)
	}
	if err != nil {
		// A write whose reply is lost is reported unavailable, never done: it may or may not
		// have landed.
		return casResult{}, s.edge(err)
	}
	if !r.wrote && deadline && s.late(ctx, r) {
		// Refused for the deadline, not lost to another writer: deciding again would not help.
		return casResult{}, s.edge(errLate)
	}
	if !r.wrote || w.del {
		return casResult{wrote: r.wrote, reply: r}, nil
	}
	f, err := strconv.ParseUint(r.fence, 10, 64)
	if err != nil {
		return casResult{}, fmt.Errorf("redis: script returned a bad fence %q", r.fence)
	}
	if w.rec.State == keys.StateInProgress {
		s.cache.put(n.rec, r.fence+":"+args[3])
	}
	return casResult{wrote: true, fence: f, reply: r}, nil
}

// errLate is a write that a script refused because Redis's clock had passed the operation's
// deadline (notAfter): the operation failed, unavailable, and wrote nothing.
var errLate = fmt.Errorf("%w: the operation's deadline passed on Redis's clock before its write ran", context.DeadlineExceeded)

// late reports whether a script that refused to write, answering r, did so because the
// operation's deadline had passed on Redis's clock: r's TIME is at or past notAfter, computed
// again with the estimate that r just put right. When it is not, the estimate was off (it
// trailed by more than the time left), and the operation decides again.
func (s *Store) late(ctx context.Context, r reply) bool {
	until := s.notAfter(ctx)
	return until == 0 || r.sec*1_000_000+r.usec >= until
}

// notAfter is the instant, in Unix µs on Redis's clock, from which a write sent now under ctx
// must not land, or 0 when there is none (no deadline, or no estimate of Redis's clock yet).
//
// When ctx's deadline passes, the operation fails with keys.ErrUnavailable, and the caller may
// tell its client so (503). The script may still be on its way: rueidis sends a command whose
// caller has given up, and a request already in a socket arrives when it arrives. Landing after
// the answer, a Delete would remove a record another replica completed meanwhile (a review
// delayed one replica's traffic by 400 ms: its Delete, answered unavailable, wiped a complete
// made after it), and an acquire would leave a lease nobody holds. So every writing script
// writes nothing once Redis's clock reaches this instant: the deadline, as the estimate of
// Redis's clock puts it. The estimate trails Redis's clock (see redisClock), so Redis's clock
// is past this instant when the deadline passes, and a write is refused after it for certain
// (and a moment before it, by the estimate's lag, when the operation fails anyway). A step back
// of Redis's clock defeats it, as it does every time bound; so does, on Redis Cluster, where one
// estimate serves every node, a node whose clock trails the one the estimate learned from, by
// that skew.
func (s *Store) notAfter(ctx context.Context) int64 {
	dl, ok := ctx.Deadline()
	if !ok {
		return 0
	}
	est, ok := s.clock.now()
	if !ok {
		return 0
	}
	return est.Add(time.Until(dl)).UnixMicro()
}

// microsArg is a script's argument for the instant us (Unix µs): empty for none (0).
func microsArg(us int64) string {
	if us == 0 {
		return ""
	}
	return strconv.FormatInt(us, 10)
}

// op runs one operation: it bounds ctx by the store's timeout and retries attempt while it
// reports a lost compare-and-set, with jittered backoff.
func (s *Store) op(ctx context.Context, name, key string, attempt func(ctx context.Context) (done bool, err error)) error {
	opCtx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	if !s.checked.Load() {
		if err := s.ready(opCtx); err != nil {
			return s.wrap(ctx, name, key, err)
		}
	}
	for i := 0; ; i++ {
		done, err := attempt(opCtx)
		if err != nil {
			if !tryAgain(err) || i+1 == maxAttempts {
				return s.wrap(ctx, name, key, err)
			}
		} else if done {
			return nil
		}
		if i+1 == maxAttempts {
			return fmt.Errorf("%s %q: %w: %d concurrent writes in a row won over this one",
				name, key, keys.ErrUnavailable, maxAttempts)
		}
		// Up to 0.1, 0.2, 0.4 ... 25.6ms: spreads the losers so one of them wins next.
		backoff := time.Duration(rand.Int64N(int64(100*time.Microsecond) << i))
		if err != nil {
			// TRYAGAIN: the key's slot is being migrated (Redis Cluster) and the script did not
			// run; the migration moves the key's two Redis keys within milliseconds.
			backoff = min(5*time.Millisecond<<i, 100*time.Millisecond)
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-opCtx.Done():
			t.Stop()
			return s.wrap(ctx, name, key, s.edge(opCtx.Err()))
		}
	}
}

// edge translates a driver error: failures that mean Redis cannot serve now (network, timeout,
// LOADING, READONLY, ...) wrap keys.ErrUnavailable; others (a script error, say) stay internal.
func (s *Store) edge(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) || s.d.unavailable(err) {
		if s.d.denied(err) {
			// The ACL changed since the checks passed: run them again (ready), so that every
			// operation and Ping reports the misconfiguration, naming what is missing, until the
			// ACL is fixed, instead of each request finding it out.
			s.checked.Store(false)
		}
		return fmt.Errorf("%w: %w", keys.ErrUnavailable, err)
	}
	return fmt.Errorf("redis: %w", err)
}

// wrap names the operation and key. When the caller's context ended (its deadline passed,
// which the client may notice a moment before ctx.Err says so), the error also wraps the
// context's error, next to keys.ErrUnavailable.
func (s *Store) wrap(ctx context.Context, name, key string, err error) error {
	if errors.Is(err, keys.ErrUnavailable) {
		cerr := ctx.Err()
		if dl, ok := ctx.Deadline(); ok && cerr == nil && !time.Now().Before(dl) {
			cerr = context.DeadlineExceeded
		}
		if cerr != nil && !errors.Is(err, cerr) {
			return fmt.Errorf("%s %q: %w: %w", name, key, err, cerr)
		}
	}
	return fmt.Errorf("%s %q: %w", name, key, err)
}

// Begin implements keys.Store. It returns an error wrapping keys.ErrUnavailable when Redis
// cannot be reached; then it acquired nothing as far as the caller knows (a lease whose reply was
// lost holds the key until it expires).
func (s *Store) Begin(ctx context.Context, tenant, key string, req keys.BeginRequest) (keys.BeginResult, error) {
	n := s.names(tenant, key)
	var res keys.BeginResult
	first := true
	err := s.op(ctx, "begin", key, func(ctx context.Context) (bool, error) {
		var snap snapshot
		var err error
		switch {
		case first && s.fresh.Load() >= 0:
			first = false
			var done bool
			done, snap, err = s.beginAhead(ctx, n, key, req, &res)
			if err != nil {
				return false, err
			}
			s.learnFresh(done || !snap.exists)
			if done {
				return true, nil
			}
		case first:
			first = false
			if snap, err = s.read(ctx, n); err != nil {
				return false, err
			}
			s.learnFresh(!snap.exists)
		default:
			if snap, err = s.read(ctx, n); err != nil {
				return false, err
			}
		}
		var w keys.Write
		res, w, err = keys.DecideBegin(snap.rec, snap.now, key, req)
		switch {
		case err != nil:
			return true, err
		case w == keys.WriteNone:
			// A replay answers a record that a complete reported unavailable may have left on
			// the master alone: not before the replicas have it (Options.MinReplicas).
			return true, s.edge(s.d.settle(ctx, [2]string{n.rec, n.fence}))
		}
		out, err := s.cas(ctx, n, snap, casWrite{
			rec: &res.Record, newFence: true, publish: res.Outcome == keys.TakenOver,
		})
		res.Record.Lease.Fence = out.fence
		return out.wrote, err
	})
	if err != nil && !errors.Is(err, keys.ErrInProgress) {
		return keys.BeginResult{}, err
	}
	return res, err
}

// beginAhead is begin's first attempt. It decides the acquire ahead, at the estimate of Redis's
// clock, as if the key were absent, and sends the record with beginScript: when the key is absent
// and the estimate holds, that is the whole begin (done). Otherwise the script's reply is the
// snapshot to decide on, as a read would be; with no estimate yet, it reads.
func (s *Store) beginAhead(ctx context.Context, n names, key string, req keys.BeginRequest, res *keys.BeginResult) (bool, snapshot, error) {
	snap, ok := s.ahead()
	if !ok {
		snap, err := s.read(ctx, n)
		return false, snap, err
	}
	r, w, err := keys.DecideBegin(nil, snap.now, key, req)
	if err != nil || w != keys.WritePut {
		return false, snapshot{}, fmt.Errorf("redis: begin on no record decided %v, %v", w, err)
	}
	rec := r.Record
	rec.Lease.Fence = 0 // the value's prefix is the fence
	body := encodeValue(&rec)
	expires := snap.redisMillis(rec.ExpiresAt)
	args := []string{body, "", "", "", "", clockAheadArg, clockBehindArg, ""}
	decimals(args[1:5], expires, snap.now.UnixMicro(), expires+fenceMargin.Milliseconds(), snap.est.UnixMicro())
	args[7] = microsArg(s.notAfter(ctx))
	rep, err := s.call(func() (reply, error) { return s.d.begin(ctx, [2]string{n.rec, n.fence}, args) })
	if err != nil {
		return false, snapshot{}, s.edge(err) // as in cas: a lost reply is never an acquire
	}
	if !rep.wrote {
		snap, err := s.snap(rep)
		return false, snap, err
	}
	fence, err := strconv.ParseUint(rep.fence, 10, 64)
	if err != nil {
		return false, snapshot{}, fmt.Errorf("redis: script returned a bad fence %q", rep.fence)
	}
	r.Record.Lease.Fence = fence
	*res = r
	s.cache.put(n.rec, rep.fence+":"+body)
	return true, snapshot{}, nil
}

// update runs a rule on a stored record (complete, renew, release): snapshot, decide, and when the
// rule writes, compare-and-set, again while the write loses to another writer. decide returns the
// write and whether to make it.
//
// Its first attempt decides ahead when the cache holds the value this Store wrote for the key
// (the holder's begin or renew ran here) and the decision does not depend on the exact time
// (steady): the compare-and-set against the cached value is then the whole operation. When the
// value changed meanwhile, or the estimate was off, the script's reply serves as the read.
func (s *Store) update(ctx context.Context, name, key string, n names, decide func(snapshot) (casWrite, bool, error)) error {
	first := true
	return s.op(ctx, name, key, func(ctx context.Context) (bool, error) {
		var snap snapshot
		var err error
		if first {
			first = false
			var done bool
			if done, snap, err = s.updateAhead(ctx, n, decide); done || err != nil {
				return done, err
			}
		} else if snap, err = s.read(ctx, n); err != nil {
			return false, err
		}
		w, write, err := decide(snap)
		switch {
		case err != nil:
			return true, err
		case !write:
			// The same complete again answers the record as read: see Begin's replay.
			return true, s.edge(s.d.settle(ctx, [2]string{n.rec, n.fence}))
		}
		out, err := s.cas(ctx, n, snap, w)
		return out.wrote, err
	})
}

// updateAhead is update's first attempt: done when it wrote, else the snapshot to decide on.
func (s *Store) updateAhead(ctx context.Context, n names, decide func(snapshot) (casWrite, bool, error)) (bool, snapshot, error) {
	if c, ok := s.cached(n); ok && c.steady() {
		if w, write, err := decide(c); err == nil && write {
			out, err := s.cas(ctx, n, c, w)
			if err != nil || out.wrote {
				return out.wrote, snapshot{}, err
			}
			snap, err := s.snap(out.reply)
			return false, snap, err
		}
	}
	snap, err := s.read(ctx, n)
	return false, snap, err
}

// Complete implements keys.Store. It returns an error wrapping keys.ErrUnavailable when Redis
// cannot be reached; then the response may or may not be stored, and the same Complete again
// tells which.
func (s *Store) Complete(ctx context.Context, tenant, key string, req keys.CompleteRequest) (keys.Record, error) {
	var rec keys.Record
	err := s.update(ctx, "complete", key, s.names(tenant, key), func(snap snapshot) (casWrite, bool, error) {
		var w keys.Write
		var err error
		rec, w, err = keys.DecideComplete(snap.rec, snap.now, req)
		return casWrite{rec: &rec, publish: true}, w == keys.WritePut, err
	})
	if err != nil {
		return keys.Record{}, err
	}
	return rec.Public(), nil
}

// Renew implements keys.Store. It returns an error wrapping keys.ErrUnavailable when Redis
// cannot be reached.
func (s *Store) Renew(ctx context.Context, tenant, key string, req keys.RenewRequest) (keys.Record, error) {
	var rec keys.Record
	err := s.update(ctx, "renew", key, s.names(tenant, key), func(snap snapshot) (casWrite, bool, error) {
		var w keys.Write
		var err error
		rec, w, err = keys.DecideRenew(snap.rec, snap.now, req)
		return casWrite{rec: &rec}, w == keys.WritePut, err
	})
	if err != nil {
		return keys.Record{}, err
	}
	return rec, nil
}

// Release implements keys.Store. It returns an error wrapping keys.ErrUnavailable when Redis
// cannot be reached.
func (s *Store) Release(ctx context.Context, tenant, key, token string) error {
	return s.update(ctx, "release", key, s.names(tenant, key), func(snap snapshot) (casWrite, bool, error) {
		w, err := keys.DecideRelease(snap.rec, snap.now, token)
		return casWrite{del: true, publish: true}, w == keys.WriteDelete, err
	})
}

// Get implements keys.Store: one round trip. It returns an error wrapping keys.ErrUnavailable
// when Redis cannot be reached.
func (s *Store) Get(ctx context.Context, tenant, key string) (keys.Record, error) {
	n := s.names(tenant, key)
	var rec keys.Record
	err := s.op(ctx, "get", key, func(ctx context.Context) (bool, error) {
		snap, err := s.read(ctx, n)
		if err != nil {
			return false, err
		}
		rec, err = keys.DecideGet(snap.rec, snap.now)
		return true, err
	})
	return rec, err
}

// Delete implements keys.Store: one round trip. The key's fence counter stays, so the next lease
// still gets a larger fence. It returns an error wrapping keys.ErrUnavailable when Redis cannot be
// reached.
func (s *Store) Delete(ctx context.Context, tenant, key string) error {
	n := s.names(tenant, key)
	s.cache.drop(n.rec)
	return s.op(ctx, "delete", key, func(ctx context.Context) (bool, error) {
		until := microsArg(s.notAfter(ctx))
		r, err := s.call(func() (reply, error) { return s.d.del(ctx, n.rec, n.channel, until) })
		if err == nil && !r.wrote && s.late(ctx, r) {
			err = errLate
		}
		return r.wrote || err != nil, s.edge(err) // not deleted, not late: the estimate was off
	})
}

// Watch implements keys.Store through pub/sub: a write script publishes on the key's channel and
// every Store subscribed to it, on any replica, closes its watchers' channels. See hub.
func (s *Store) Watch(tenant, key string) (<-chan struct{}, func()) {
	return s.hub.watch(s.names(tenant, key).channel)
}

// Sweep implements keys.Store: Redis removes expired records by itself, so it returns 0, nil
// (or an error once the Store is closed).
func (s *Store) Sweep(ctx context.Context, max int) (int, error) {
	if s.closed.Load() {
		return 0, fmt.Errorf("sweep: %w", errClosed)
	}
	return 0, nil
}

// Ping returns nil when Redis answers and the Store can serve, else an error wrapping
// keys.ErrUnavailable: Redis cannot be reached, or the checks of the server have not passed yet
// (see Open; the error then wraps ErrMisconfigured too when Redis answered and failed them), or
// Redis's maxmemory-policy evicts and Options.AllowEviction is not set (wrapping
// ErrMisconfigured). Ping reads the policy again at most once a second (INFO memory, besides
// PING), so that a policy changed at runtime shows within about a second. After a script was
// refused a command or channel by the ACL, it runs the checks again (see edge), so that it
// fails, naming what is missing, until the ACL is fixed.
func (s *Store) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	if !s.checked.Load() {
		if err := s.ready(ctx); err != nil {
			return fmt.Errorf("ping: %w", err)
		}
	}
	var err error
	if s.policyDue() {
		var info string
		if info, err = s.d.info(ctx, "memory"); err == nil {
			s.setPolicy(infoField(info, "maxmemory_policy"))
			// Monitoring: it reports a loss, it does not fail readiness, nor use up its time.
			mctx, cancel := shareOf(ctx, 2)
			_ = s.checkMarker(mctx)
			cancel()
			// And PING, which INFO does not stand for: Redis answers INFO while it loads its
			// data and refuses everything else (an audit's find: /readyz answered 200 once a
			// second while every request got 503 LOADING).
			err = s.d.ping(ctx)
		}
	} else {
		err = s.d.ping(ctx)
	}
	if err != nil {
		if errors.Is(err, keys.ErrUnavailable) {
			return fmt.Errorf("ping: %w", err)
		}
		return fmt.Errorf("ping: %w: %v", keys.ErrUnavailable, err)
	}
	if err := s.policyError(); err != nil {
		return fmt.Errorf("ping: %w: %w", keys.ErrUnavailable, err)
	}
	return nil
}

// Close wakes and stops the watchers and closes the connections; it waits for pending
// operations. Every operation afterwards fails. Closing again does nothing.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	s.lifeEnd()
	s.hub.close()
	s.d.close()
	s.checkMu.Lock() // ready starts no run once it sees closed
	s.checkMu.Unlock()
	s.checkWG.Wait()
	return nil
}
