package redis

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/rueidis"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// The checks of the server, run once at the first contact: at Open when Redis answers, else by
// the first operation or Ping that reaches it. Until they pass, every operation and Ping fails:
// with keys.ErrUnavailable while Redis cannot be reached, and with ErrMisconfigured too when
// Redis answers but cannot serve idemsvc safely (older than 7.0, an evicting maxmemory-policy, a
// permission missing). Open returns the latter as its error. The checks:
//
//   - INFO server: redis_version 7.0 or later;
//   - INFO memory: maxmemory_policy noeviction, unless Options.AllowEviction;
//   - a probe of every command and channel the Store uses, under the Store's prefix, through
//     the paths the Store uses: PING, TIME, EVAL of a probe script that runs each command the
//     scripts run (pcall, so that it names every one the ACL denies) on a probe key and
//     channel, EVAL_RO and EVALSHA_RO of the read script, EVAL of the write script (a delete
//     of the absent probe record, which publishes), EVALSHA of the begin script (it stores a
//     probe record, with a 10s expiry) and of the delete script (it deletes it), and
//     SUBSCRIBE of the probe channel on a dedicated connection, as the hub's. The
//     probe key is <prefix>:{%probe-<token>}:r (and :f, whose counter expires within 10s;
//     :c the channel), which no key of a record can be: appendEscapedID writes '%' only before two
//     hex digits.
//
// Afterwards the maxmemory-policy is read again by Ping, at most once per policyRecheck (Ping
// backs /readyz, which load balancers may call often); the Pings in between send PING. No
// operation pays for any of it but one atomic load.

// ErrMisconfigured is wrapped by the errors of a Redis that answers but cannot serve idemsvc
// safely: a version older than 7.0, a maxmemory-policy that evicts (without
// Options.AllowEviction), or an ACL that denies a command, key or channel the Store needs. Open
// returns such an error when it finds it; found later (Redis was unreachable at Open, or its
// policy changed), operations and Ping return it wrapped together with keys.ErrUnavailable.
var ErrMisconfigured = errors.New("redis: misconfigured")

const (
	// policyRecheck is how often Ping reads the maxmemory-policy again.
	policyRecheck = time.Second
	// checkPause is how long a failed check is reported again before the next attempt, so that
	// a misconfigured Redis costs one probe a second, not one per request.
	checkPause = time.Second
	// probeTTL bounds how long the probe's keys live if it is interrupted.
	probeTTL = 10 * time.Second
)

// ACL returns the Redis ACL rules the Store needs for prefix (DefaultPrefix when empty), as for
// ACL SETUSER; a URL that selects a database other than 0 needs +select as well.
func ACL(prefix string) string {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return "+hello +info +ping +time +evalsha +eval +evalsha_ro +eval_ro +subscribe " +
		"+get +set +del +pexpiretime +pexpireat +publish ~" + prefix + "* &" + prefix + "*"
}

// clusterACL is what the Store needs besides ACL's rules on Redis Cluster: the client learns
// the slots with CLUSTER SLOTS (CLUSTER SHARDS on Redis 8 and later), and follows an ASK
// redirect (a key already moved by a migration in progress) with ASKING.
const clusterACL = "+cluster|slots +cluster|shards +asking"

// sentinelACL is what the Store needs besides ACL's rules behind Redis Sentinel, on the master
// and on every replica that may become it: the client asks a server the Sentinels name for its
// ROLE, and takes it only when it says master.
const sentinelACL = "+role"

// SentinelACL is the ACL of a user on the Sentinels themselves, when they require one: the
// client asks for the master and the other Sentinels (SENTINEL GET-MASTER-ADDR-BY-NAME,
// SENTINEL SENTINELS), subscribes to their events (+switch-master, ...: the channels below) and
// keeps its connection alive with PING.
const SentinelACL = "+hello +auth +ping +sentinel|get-master-addr-by-name +sentinel|sentinels " +
	"+subscribe +unsubscribe &+sentinel &+slave &-sdown &+sdown &+switch-master &+reboot"

// aclHint is the ACL an error message suggests: ACL's, with +select when the URL names a
// database other than 0, clusterACL on Redis Cluster, and sentinelACL behind Sentinel.
func (s *Store) aclHint() string {
	acl := ACL(s.prefix)
	if s.rd != nil && s.rd.main.opt.SelectDB != 0 {
		acl += " +select"
	}
	if s.clustered.Load() {
		acl += " " + clusterACL
	}
	if s.sentinel() {
		acl += " " + sentinelACL
	}
	return acl
}

// sentinel reports whether the Store reaches Redis through Sentinel (a URL with master_set).
func (s *Store) sentinel() bool { return s.rd != nil && s.rd.main.opt.Sentinel.MasterSet != "" }

// probeScript runs every command the scripts run, on a probe key and channel, and returns the
// ones that failed with Redis's reasons. KEYS[1] the probe key; ARGV[1] the probe channel;
// ARGV[2] an expiry, Unix ms, a few seconds away.
const probeScript = `
local failed = {}
local function try(...)
  local r = redis.pcall(...)
  if type(r) == 'table' and r.err and (string.find(r.err, 'NOPERM', 1, true) or
      string.find(r.err, 'user executing the script', 1, true) or
      string.find(r.err, 'ACL failure in script', 1, true)) then
    failed[#failed + 1] = select(1, ...) .. ' (' .. r.err .. ')'
  end
end
try('TIME')
try('GET', KEYS[1])
try('PEXPIRETIME', KEYS[1])
try('PUBLISH', ARGV[1], '')
try('SET', KEYS[1], 'probe', 'PXAT', ARGV[2])
try('SET', KEYS[1], 'probe', 'KEEPTTL')
try('PEXPIREAT', KEYS[1], ARGV[2])
try('DEL', KEYS[1])
return failed
`

// checkRun is a run of the checks in flight.
type checkRun struct {
	done chan struct{}
	err  error
}

// ready returns nil once the checks have passed; until then it runs them (one run at a time,
// shared by the callers, and at most once per checkPause after a failure) and returns their
// error, which wraps keys.ErrUnavailable.
func (s *Store) ready(ctx context.Context) error {
	if s.checked.Load() {
		return nil
	}
	s.checkMu.Lock()
	switch {
	case s.closed.Load():
		s.checkMu.Unlock()
		return errClosed
	case s.checked.Load():
		s.checkMu.Unlock()
		return nil
	case s.checking == nil && s.checkErr != nil && time.Since(s.checkAt) < checkPause:
		err := s.checkErr
		s.checkMu.Unlock()
		return err
	}
	run := s.checking
	if run == nil {
		run = &checkRun{done: make(chan struct{})}
		s.checking = run
		s.checkWG.Add(1)
		go func() {
			defer s.checkWG.Done()
			ctx, cancel := context.WithTimeout(s.life, s.timeout)
			err := s.check(ctx)
			cancel()
			if err != nil && !errors.Is(err, keys.ErrUnavailable) && !errors.Is(err, errClosed) {
				err = fmt.Errorf("%w: %w", keys.ErrUnavailable, err) // ErrMisconfigured
			}
			s.checkMu.Lock()
			s.checking, s.checkErr, s.checkAt = nil, err, time.Now()
			if err == nil {
				s.checked.Store(true)
			}
			s.checkMu.Unlock()
			run.err = err
			close(run.done)
		}()
	}
	s.checkMu.Unlock()
	select {
	case <-run.done:
		return run.err
	case <-ctx.Done():
		return fmt.Errorf("%w: %w", keys.ErrUnavailable, ctx.Err())
	}
}

// check runs the checks once. Its error wraps ErrMisconfigured when Redis answered and failed
// one, keys.ErrUnavailable when Redis could not be reached or could not serve for now
// (LOADING, OOM, ...), or is errClosed. Without a rueidis driver (tests) it passes.
func (s *Store) check(ctx context.Context) error {
	d := s.rd
	if d == nil {
		return nil
	}
	c, err := d.client(ctx)
	if err != nil {
		if s.sentinel() {
			return s.checkErrorf("connecting through Sentinel, master_set="+d.main.opt.Sentinel.MasterSet+
				" (to the Sentinels, with their own credentials, IDEMSVC_REDIS_SENTINEL_USERNAME and _PASSWORD: HELLO or AUTH, "+
				"SENTINEL GET-MASTER-ADDR-BY-NAME, SUBSCRIBE, whose user needs the ACL "+strconv.Quote(SentinelACL)+
				"; to the master, with the URL's: HELLO or AUTH, SELECT, ROLE)", err)
		}
		return s.checkErrorf("connecting (HELLO, AUTH, SELECT)", err)
	}
	info, err := infoEvery(ctx, c, "server")
	if err != nil {
		return s.checkErrorf("INFO server", err)
	}
	if err := checkVersion(info); err != nil {
		return err
	}
	s.clustered.Store(c.Mode() == rueidis.ClientModeCluster)
	if infoField(info, "redis_mode") == "cluster" && c.Mode() != rueidis.ClientModeCluster {
		// rueidis asks for the slots (CLUSTER SLOTS; CLUSTER SHARDS on Redis 8) and, refused,
		// treats the node as a single Redis: every key of another node then fails with MOVED.
		return fmt.Errorf("%w: Redis runs as a cluster, but the client could not learn its slots "+
			"(CLUSTER SLOTS, or CLUSTER SHARDS on Redis 8, refused?): the Redis user needs the ACL %q "+
			"on every node; restart idemsvc after granting it", ErrMisconfigured, s.aclHint()+" "+clusterACL)
	}
	if info, err = infoEvery(ctx, c, "memory"); err != nil {
		return s.checkErrorf("INFO memory", err)
	}
	s.policyAt.Store(time.Since(s.clock.epoch).Nanoseconds())
	s.setPolicy(infoField(info, "maxmemory_policy"))
	if err := s.policyError(); err != nil {
		return err
	}
	if err := c.Do(ctx, c.B().Ping().Build()).Error(); err != nil {
		return s.checkErrorf("PING", err)
	}
	sent := time.Now()
	sec, usec, err := d.time(ctx)
	if err != nil {
		return s.checkErrorf("TIME", err)
	}
	s.clock.observe(sent, time.Now(), time.Unix(sec, usec*1000))
	if err := s.probe(ctx, c, sec*1000+usec/1000); err != nil {
		return err
	}
	// The data marker: put at the first check; at a later one (the checks run again after the
	// ACL refused a script something, see Store.edge) compared as Ping compares it, so that a
	// loss of data meanwhile is reported, not adopted (a review's find).
	if err := s.checkMarker(ctx); !permitted(err) {
		return s.checkErrorf("the data marker (GET and SET NX GET; CLUSTER SLOTS on a cluster)", err)
	}
	return nil
}

// permitted reports whether a probe's step passed as far as the checks care: it succeeded, or
// Redis refused it for a reason that passes (out of memory under noeviction, writes refused after
// a failed save, loading, busy), which it checks only after the ACL has let the command through.
// A full Redis must not stop the start: it answers what it can, and the writes fail with 503.
func permitted(err error) bool {
	if err == nil {
		return true
	}
	re, isReply := rueidis.IsRedisErr(err)
	if !isReply {
		return false
	}
	switch code, _, _ := strings.Cut(re.Error(), " "); code {
	case "NOPERM", "NOAUTH", "WRONGPASS":
		return false
	}
	return transientReply(re.Error()) && !deniedInScript(re.Error())
}

// markerKey is the data marker's key on a single Redis: <prefix>:{%marker}, which no record's
// key can be (see the probe key above).
func (s *Store) markerKey() string { return s.prefix + ":{%marker}" }

// markerKeys returns the keys of the data markers: markerKey on a single Redis; on Redis Cluster
// one in each range of slots that the cluster reports, so that a loss of any master's data is
// noticed (a marker lives on one node: FLUSHALL on another went unnoticed, an audit's find).
// The key whose tag is "%marker" is markerKey, in whichever range holds its slot.
func (s *Store) markerKeys(ctx context.Context) ([]string, error) {
	ranges, err := s.d.slots(ctx)
	if err != nil {
		return nil, err
	}
	if len(ranges) == 0 {
		return []string{s.markerKey()}, nil
	}
	keys := make([]string, 0, len(ranges))
	for _, r := range ranges {
		if tag, ok := markerTag(r[0], r[1]); ok {
			keys = append(keys, s.prefix+":{"+tag+"}")
		}
	}
	return keys, nil
}

// markerTag returns the first of "%marker", "%marker-1", "%marker-2", ... whose hash slot is in
// [lo, hi]. It reads markerTagFirst, so that a cluster of many small ranges (slots moved one by
// one) costs one pass over its slots, not some 16,384 hashes per range and check.
func markerTag(lo, hi uint16) (string, bool) {
	first := markerTagFirst()
	best := -1
	for sl := int(lo); sl <= int(hi) && sl < len(first); sl++ {
		if i := int(first[sl]); best < 0 || i < best {
			best = i
		}
	}
	if best < 0 {
		return "", false
	}
	return markerTagName(best), true
}

// markerTagName is the i-th candidate tag of a data marker: "%marker", "%marker-1", ...
func markerTagName(i int) string {
	if i == 0 {
		return "%marker"
	}
	return "%marker-" + strconv.Itoa(i)
}

// markerTagFirst is, for each hash slot, the least i whose tag ("%marker", "%marker-i") hashes
// to it: every slot is reached within a few hundred thousand tags, computed once.
var markerTagFirst = sync.OnceValue(func() []int32 {
	first := make([]int32, 16384)
	for i := range first {
		first[i] = -1
	}
	for i, left := 0, len(first); left > 0; i++ {
		if sl := hashSlot(markerTagName(i)); first[sl] < 0 {
			first[sl] = int32(i)
			left--
		}
	}
	return first
})

// hashSlot is Redis Cluster's hash slot of a key's hash tag (or of a key without one): CRC16
// (XMODEM) modulo 16384.
func hashSlot(tag string) uint16 {
	var crc uint16
	for i := 0; i < len(tag); i++ {
		crc ^= uint16(tag[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc % 16384
}

// checkMarker compares each data marker with what this Store last saw, and calls OnDataLoss when
// one is gone (this Store puts a new one) or another one (another replica put it after finding
// it gone): once per check, however many markers. A marker not seen yet (at the first contact,
// in a range that a resharding made, or after a loss whose new marker could not be put) is read,
// and put when there is none, without a report. Ping calls it when it reads the policy, at most
// once a second; its errors are Ping's business only as far as the policy's read already is: it
// reads first (all markers at once, so that a node that does not answer delays only its own),
// and writes only when a marker is gone, so a Redis that refuses writes (out of memory) keeps
// passing. A marker that could not be read is compared at the next check. Markers of ranges
// that are no longer reported are forgotten.
func (s *Store) checkMarker(ctx context.Context) error {
	s.markerMu.Lock()
	defer s.markerMu.Unlock()
	if s.markers == nil {
		s.markers = map[string]string{}
	}
	names, err := s.markerKeys(ctx)
	if err != nil {
		return err
	}
	for k := range s.markers {
		if !slices.Contains(names, k) {
			delete(s.markers, k)
		}
	}
	var found string
	var firstErr error
	for i, got := range s.d.gets(ctx, names) {
		key := names[i]
		last, seen := s.markers[key]
		switch {
		case got.err != nil:
			firstErr = cmp.Or(firstErr, got.err)
			continue
		case !seen && got.ok:
			s.markers[key] = got.value
			continue
		case !seen:
			// none yet: put one below
		case !got.ok:
			found = "the data marker that idemsvc keeps in Redis was gone"
			delete(s.markers, key)
		case got.value != last:
			if found == "" {
				found = "the data marker that idemsvc keeps in Redis was replaced (another replica found it gone)"
			}
			s.markers[key] = got.value
			continue
		default:
			continue
		}
		// Put a marker (or take the one another replica put meanwhile); if Redis refuses now,
		// the next check does.
		current, _, err := s.d.marker(ctx, key, keys.NewToken())
		if err != nil {
			firstErr = cmp.Or(firstErr, err)
			continue
		}
		s.markers[key] = current
	}
	if found != "" && s.onDataLoss != nil {
		s.onDataLoss(found + ": Redis lost data since it was last checked (a restart without " +
			"persistence, a failover to a replica without it, FLUSHDB or FLUSHALL, eviction, or a " +
			"restore from a backup), so completed records and held leases may be gone and their " +
			"keys may run again")
	}
	return firstErr
}

// probe exercises every command, key pattern and channel pattern the Store uses (see above);
// nowMs is Redis's clock.
func (s *Store) probe(ctx context.Context, c rueidis.Client, nowMs int64) error {
	d := s.rd
	base := s.prefix + ":{%probe-" + keys.NewToken() + "}:"
	rec, fence, channel := base+"r", base+"f", base+"c"
	expires := strconv.FormatInt(nowMs+probeTTL.Milliseconds(), 10)

	failed, err := c.Do(ctx, c.B().Eval().Script(probeScript).Numkeys(1).Key(rec).Arg(channel, expires).Build()).AsStrSlice()
	if err != nil {
		return s.checkErrorf("EVAL", err)
	}
	if len(failed) > 0 {
		return fmt.Errorf("%w: the Redis user may not run, inside a script on %s and channel %s: %s; it needs the ACL %q",
			ErrMisconfigured, rec, channel, strings.Join(failed, ", "), s.aclHint())
	}
	if err := c.Do(ctx, c.B().EvalRo().Script(readScript).Numkeys(1).Key(rec).Build()).Error(); err != nil {
		return s.checkErrorf("EVAL_RO (the read script)", err)
	}
	if _, err := d.read(ctx, rec); err != nil {
		return s.checkErrorf("EVALSHA_RO (the read script)", err)
	}
	// casScript deleting the absent record, as a release would a present one: DEL, PUBLISH.
	cas := c.B().Eval().Script(casScript).Numkeys(2).Key(rec, fence).
		Arg("0", "", "del", "", "", "0", "0", "0", channel, "", "", "", "").Build()
	if err := c.Do(ctx, cas).Error(); err != nil {
		return s.checkErrorf("EVAL (the write script)", err)
	}
	now := strconv.FormatInt(nowMs*1000, 10)
	wide := strconv.FormatInt(time.Minute.Microseconds(), 10) // whatever the estimate, it holds
	if _, err := d.begin(ctx, [2]string{rec, fence}, []string{"probe", expires, now, expires, now, wide, wide, ""}); !permitted(err) {
		return s.checkErrorf("EVALSHA (the begin script)", err)
	}
	if _, err := d.del(ctx, rec, channel, ""); !permitted(err) {
		return s.checkErrorf("EVALSHA (the delete script)", err)
	}
	sc, err := d.subClient(ctx)
	if err != nil {
		return s.checkErrorf("connecting for pub/sub", err)
	}
	if err := probeSubscribe(ctx, sc, channel); err != nil {
		return s.checkErrorf("SUBSCRIBE of "+channel, err)
	}
	return nil
}

// probeSubscribe SUBSCRIBEs channel on a dedicated connection of the pub/sub client, as the hub
// does (watch.go), and closes that connection: like the hub, it never UNSUBSCRIBEs (see watch.go).
func probeSubscribe(ctx context.Context, c rueidis.Client, channel string) error {
	dc, _ := c.Dedicate()
	defer dc.Close()
	dc.SetPubSubHooks(rueidis.PubSubHooks{OnMessage: func(rueidis.PubSubMessage) {}})
	return dc.Do(ctx, dc.B().Subscribe().Channel(channel).Build()).Error()
}

// checkErrorf classifies a check's failure: Redis's refusals of the credentials, the database
// or a permission, and its other error replies but those that mean it cannot serve for now,
// are configuration (ErrMisconfigured); the rest is unavailability.
func (s *Store) checkErrorf(step string, err error) error {
	if errors.Is(err, errClosed) {
		return err
	}
	re, isReply := rueidis.IsRedisErr(err)
	if !isReply {
		return s.edge(err) // keys.ErrUnavailable: network, timeout
	}
	code, _, _ := strings.Cut(re.Error(), " ")
	switch {
	case code == "NOPERM" || deniedInScript(re.Error()):
		return fmt.Errorf("%w: %s: the Redis user lacks a permission: %w; it needs the ACL %q",
			ErrMisconfigured, step, err, s.aclHint())
	case code == "NOAUTH" || code == "WRONGPASS" || !transientReply(re.Error()):
		return fmt.Errorf("%w: %s: %w", ErrMisconfigured, step, err)
	}
	return fmt.Errorf("%w: %s: %w", keys.ErrUnavailable, step, err)
}

// infoField returns a field of INFO's reply, "" when absent.
func infoField(info, name string) string {
	for line := range strings.Lines(info) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+":"); ok {
			return v
		}
	}
	return ""
}

// setPolicy records the maxmemory-policy just read ("" when INFO did not tell) and tells
// Options.OnEvictionPolicy when it differs from the one known.
func (s *Store) setPolicy(p string) {
	s.policyMu.Lock()
	defer s.policyMu.Unlock()
	old := s.policy.Load()
	s.policy.Store(&p)
	if s.onPolicy != nil && (old == nil || *old != p) {
		s.onPolicy(p)
	}
}

// EvictionPolicy returns Redis's maxmemory-policy as last read (at the first contact, then by
// Ping at most once a second), and whether it lets Redis evict the Store's records and leases:
// every policy but noeviction does (the volatile ones too: every key of the Store expires). It
// returns "", false until Redis has answered, or when its INFO does not tell. A Store opened
// with Options.AllowEviction keeps serving under an evicting policy: its caller should warn
// (see also Options.OnEvictionPolicy).
func (s *Store) EvictionPolicy() (policy string, evicts bool) {
	p := s.policy.Load()
	if p == nil {
		return "", false
	}
	return *p, mayEvict(*p)
}

func mayEvict(policy string) bool { return policy != "" && policy != "noeviction" }

// policyError returns the error for an evicting policy, nil when the policy is noeviction,
// unknown, or allowed.
func (s *Store) policyError() error {
	p, ev := s.EvictionPolicy()
	if !ev || s.allowEviction {
		return nil
	}
	return fmt.Errorf("%w: Redis's maxmemory-policy is %s, which lets Redis evict stored "+
		"responses and held leases when memory runs short (a retry would then execute the "+
		"operation again): set maxmemory-policy noeviction, or set IDEMSVC_REDIS_ALLOW_EVICTION=true "+
		"(Options.AllowEviction) to accept the risk", ErrMisconfigured, p)
}

// policyDue reports whether it is this Ping's turn to read the policy again (at most once per
// policyRecheck, by one caller).
func (s *Store) policyDue() bool {
	now := time.Since(s.clock.epoch).Nanoseconds()
	last := s.policyAt.Load()
	return now-last >= int64(policyRecheck) && s.policyAt.CompareAndSwap(last, now)
}
