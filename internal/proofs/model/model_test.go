package model

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/bolt"
	"github.com/idemsvc/idemsvc/internal/storage/redis"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

// The number of rapid checks (state machines run from scratch) and their average length. The
// short run is what CI does in a few seconds; IDEMSVC_PROOFS=long runs the long one. An explicit
// -rapid.checks / -rapid.steps (or RAPID_CHECKS / RAPID_STEPS) wins over both.
const (
	shortChecks, shortSteps = 15, 100
	longChecks, longSteps   = 2000, 100
)

func TestMain(m *testing.M) {
	flag.Parse()
	long := os.Getenv("IDEMSVC_PROOFS") == "long"
	setDefault("rapid.checks", "RAPID_CHECKS", shortChecks, longChecks, long)
	setDefault("rapid.steps", "RAPID_STEPS", shortSteps, longSteps, long)
	os.Exit(m.Run())
}

// setDefault sets a rapid flag unless the command line or the environment already did.
func setDefault(name, env string, short, long int, isLong bool) {
	set := os.Getenv(env) != ""
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	if set {
		return
	}
	v := short
	if isLong {
		v = long
	}
	if err := flag.Set(name, strconv.Itoa(v)); err != nil {
		panic(err)
	}
}

// The names the machine works on. The tenants "a" and "ab" with the keys "bc" and "c" are the
// pair that a naive concatenation of tenant and key would confuse ("a"+"bc" == "ab"+"c"); the
// third key has the characters that Redis key names and URLs treat specially.
var (
	tenantNames = []string{"a", "ab"}
	keyNames    = []string{"bc", "c", "{c}%/."}

	fingerprints = []string{"", "f1", "f2"}
	// Leases and TTLs: at least 30 s, because the Redis backend sets real Redis expiries at the
	// same distance from Redis's clock as the fake clock's (a shorter TTL could vanish in real
	// time while the model still holds it live).
	leases = []time.Duration{time.Second, 10 * time.Second, time.Minute}
	ttls   = []time.Duration{30 * time.Second, 2 * time.Minute, 10 * time.Minute}
	// Advances hit the boundaries exactly (a lease of 1 s after 1 s has expired: expiry is
	// "now is not before expires_at") and just before them.
	advances = []time.Duration{
		time.Nanosecond, time.Millisecond, 999 * time.Millisecond, time.Second, time.Second,
		10 * time.Second, 10 * time.Second, 30*time.Second - time.Nanosecond, 30 * time.Second,
		time.Minute, 2 * time.Minute, 10 * time.Minute,
	}
	responses = []keys.Response{
		{Status: 201, Headers: map[string][]string{"Content-Type": {"application/json"}}, Body: []byte(`{"id":1}`)},
		{Status: 200},
		{Status: 500, Headers: map[string][]string{"X-A": {"1", "2"}, "X-B": {""}}, Body: []byte{0, 1, 2, 0xff}},
	}
)

// ref names one record.
type ref struct{ tenant, key string }

func (r ref) String() string { return r.tenant + "/" + r.key }

// mrec is the model's record: what the contract says is stored for a ref.
type mrec struct {
	state     keys.State
	fp        string
	token     string // the current lease, or the lease that completed the record
	fence     uint64
	leaseExp  time.Time
	created   time.Time
	completed time.Time
	expires   time.Time
	ttl       time.Duration
	resp      *keys.Response
}

// machine is one run of the state machine: a fresh store and its model.
type machine struct {
	store keys.Store
	clock *storagetest.Clock
	// expiresItself: the backend drops expired records by itself (Redis), so Sweep returns 0.
	expiresItself bool

	// recs holds what the store physically keeps: a record stays, expired, until a sweep,
	// delete or new begin removes or replaces it; a release or delete removes it at once.
	recs map[ref]*mrec
	// maxFence is the largest fence ever handed out per ref.
	maxFence map[ref]uint64
	// tokens are every lease token ever handed out per ref, in order.
	tokens map[ref][]string
	seen   map[string]bool // every token ever handed out

	// outcomes counts what the actions met, over all checks, so the log shows that the
	// interesting cases (takeover, stale holders, expiry, replay) were exercised.
	outcomes map[string]int
}

func (m *machine) saw(outcome string) { m.outcomes[outcome]++ }

func (m *machine) now() time.Time { return m.clock.Now() }

// live returns the model's record of r when it has not expired, else nil.
func (m *machine) live(r ref) *mrec {
	if rec := m.recs[r]; rec != nil && m.now().Before(rec.expires) {
		return rec
	}
	return nil
}

// drawRef draws a ref, three times in four one that has a record (live or not) when there is
// one, so that operations meet records more often than absent keys.
func (m *machine) drawRef(t *rapid.T) ref {
	var stored []ref
	for r := range m.recs {
		stored = append(stored, r)
	}
	if len(stored) == 0 || rapid.IntRange(0, 3).Draw(t, "any ref") == 0 {
		return m.drawAnyRef(t)
	}
	slices.SortFunc(stored, cmpRef)
	return rapid.SampledFrom(stored).Draw(t, "stored ref")
}

func cmpRef(a, b ref) int {
	if a.tenant != b.tenant {
		return strings.Compare(a.tenant, b.tenant)
	}
	return strings.Compare(a.key, b.key)
}

// drawAnyRef draws any of the refs.
func (m *machine) drawAnyRef(t *rapid.T) ref {
	return ref{
		tenant: rapid.SampledFrom(tenantNames).Draw(t, "tenant"),
		key:    rapid.SampledFrom(keyNames).Draw(t, "key"),
	}
}

// drawToken picks whose token an operation on r carries: the holder's (the current lease, or
// the one that completed the record, even if the record expired), a stale holder's (an earlier
// lease on r that was taken over, released, deleted or expired), or a foreign one (fresh, or
// another ref's).
func (m *machine) drawToken(t *rapid.T, r ref) (who, token string) {
	choices := []string{"foreign"}
	cur := m.recs[r]
	if cur != nil {
		choices = append(choices, "holder", "holder") // the holder twice as often
	}
	var stale []string
	for _, tok := range m.tokens[r] {
		if cur == nil || tok != cur.token {
			stale = append(stale, tok)
		}
	}
	if len(stale) > 0 {
		choices = append(choices, "stale", "stale")
	}
	switch who = rapid.SampledFrom(choices).Draw(t, "who"); who {
	case "holder":
		return who, cur.token
	case "stale":
		return who, rapid.SampledFrom(stale).Draw(t, "stale token")
	}
	var others []string
	for o, toks := range m.tokens {
		if o != r {
			others = append(others, toks...)
		}
	}
	slices.Sort(others) // map order must not decide what rapid draws
	if len(others) > 0 && rapid.Bool().Draw(t, "another ref's token") {
		return who, rapid.SampledFrom(others).Draw(t, "foreign token")
	}
	return who, keys.NewToken()
}

// begin checks every outcome of begin: a mismatch never sees the record, a replay returns the
// exact stored response, a live lease answers in progress without its token, and a new lease
// (acquired, or taken over from an expired lease) has a fresh token and a larger fence.
func (m *machine) begin(t *rapid.T) {
	r := m.drawRef(t)
	fp := rapid.SampledFrom(fingerprints).Draw(t, "fingerprint")
	if rec := m.recs[r]; rec != nil && rapid.Bool().Draw(t, "the stored record's fingerprint") {
		fp = rec.fp // a retry of the same request, more often than a mismatch
	}
	req := keys.BeginRequest{
		Fingerprint: fp,
		Lease:       rapid.SampledFrom(leases).Draw(t, "lease"),
		TTL:         rapid.SampledFrom(ttls).Draw(t, "ttl"),
	}
	now := m.now()
	cur := m.live(r)
	res, err := m.store.Begin(context.Background(), r.tenant, r.key, req)
	op := fmt.Sprintf("begin %s fp=%q", r, req.Fingerprint)

	switch {
	case cur != nil && cur.fp != "" && cur.fp != req.Fingerprint:
		m.saw("begin: fingerprint mismatch")
		expectErr(t, op, err, keys.ErrFingerprintMismatch)
		if res.Record.Response != nil || res.Record.Lease.Token != "" {
			t.Fatalf("%s: a mismatched fingerprint saw the record: %+v", op, res.Record)
		}
	case cur != nil && cur.state == keys.StateCompleted:
		m.saw("begin: replayed")
		expectErr(t, op, err, nil)
		if res.Outcome != keys.Replayed {
			t.Fatalf("%s: outcome %v, want replayed", op, res.Outcome)
		}
		checkRecord(t, op, res.Record, r, cur, false)
	case cur != nil && now.Before(cur.leaseExp):
		m.saw("begin: in progress")
		expectErr(t, op, err, keys.ErrInProgress)
		if res.Record.Lease.Token != "" {
			t.Fatalf("%s: in progress shows the holder's token", op)
		}
		if !res.Record.Lease.ExpiresAt.Equal(cur.leaseExp) || res.Record.Lease.Fence != cur.fence {
			t.Fatalf("%s: in progress shows lease %+v, want fence %d until %v", op, res.Record.Lease, cur.fence, cur.leaseExp)
		}
	default:
		expectErr(t, op, err, nil)
		want := keys.Acquired
		if cur != nil {
			want = keys.TakenOver // an in-progress record whose lease ran out
		}
		m.saw("begin: " + want.String())
		if m.recs[r] != nil && cur == nil {
			m.saw("begin: acquired over an expired record")
		}
		if res.Outcome != want {
			t.Fatalf("%s: outcome %v, want %v", op, res.Outcome, want)
		}
		lease := res.Record.Lease
		if lease.Token == "" || m.seen[lease.Token] {
			t.Fatalf("%s: new lease token %q is empty or was handed out before", op, lease.Token)
		}
		if lease.Fence <= m.maxFence[r] {
			t.Fatalf("%s: new fence %d does not grow: %d was handed out before on this key", op, lease.Fence, m.maxFence[r])
		}
		next := &mrec{
			state: keys.StateInProgress, fp: req.Fingerprint, token: lease.Token, fence: lease.Fence,
			leaseExp: now.Add(req.Lease), created: now, ttl: req.TTL,
		}
		next.expires = later(now.Add(req.TTL), next.leaseExp)
		if cur != nil {
			next.created = cur.created
			if cur.fp != "" {
				next.fp = cur.fp
			}
		}
		checkRecord(t, op, res.Record, r, next, true)
		m.recs[r] = next
		m.maxFence[r] = lease.Fence
		m.tokens[r] = append(m.tokens[r], lease.Token)
		m.seen[lease.Token] = true
	}
}

// complete checks that only the current holder completes (even after its lease ran out, as long
// as nobody took over), that the same complete again is accepted, and that nobody else is.
func (m *machine) complete(t *rapid.T) {
	r := m.drawRef(t)
	who, token := m.drawToken(t, r)
	resp := rapid.SampledFrom(responses).Draw(t, "response")
	cur := m.live(r)
	if cur != nil && cur.resp != nil && rapid.Bool().Draw(t, "same response again") {
		resp = cloneResponse(*cur.resp)
	}
	ttl := rapid.SampledFrom(append([]time.Duration{0}, ttls...)).Draw(t, "complete ttl")
	now := m.now()

	var want error
	var next *mrec // the record after a successful complete
	switch {
	case cur == nil:
		want = keys.ErrNotFound
	case cur.state == keys.StateCompleted:
		want = keys.ErrAlreadyCompleted
		if token == cur.token && sameResponse(cur.resp, &resp) {
			want, next = nil, cur // the same complete again
		}
	case token != cur.token:
		want = keys.ErrLeaseLost
	default: // the holder completes, even after its lease ran out, as long as nobody took over
		n := *cur
		if ttl == 0 {
			ttl = cur.ttl
		}
		n.state, n.resp, n.completed = keys.StateCompleted, &resp, now
		n.expires, n.ttl = now.Add(ttl), ttl
		next = &n
	}

	rec, err := m.store.Complete(context.Background(), r.tenant, r.key,
		keys.CompleteRequest{Token: token, Response: cloneResponse(resp), TTL: ttl})
	op := fmt.Sprintf("complete %s by %s", r, who)
	m.saw("complete by " + who + ": " + errName(want))
	if who == "stale" && err == nil {
		t.Fatalf("%s: a stale holder's complete was accepted", op)
	}
	expectErr(t, op, err, want)
	if next != nil {
		checkRecord(t, op, rec, r, next, false)
		m.recs[r] = next
	}
}

// renew checks that only the current holder of an in-progress record renews.
func (m *machine) renew(t *rapid.T) {
	r := m.drawRef(t)
	who, token := m.drawToken(t, r)
	lease := rapid.SampledFrom(leases).Draw(t, "lease")
	now := m.now()
	cur := m.live(r)

	var want error
	var next *mrec
	switch {
	case cur == nil:
		want = keys.ErrNotFound
	case cur.state != keys.StateInProgress || token != cur.token:
		want = keys.ErrLeaseLost
	default: // the holder renews, even after its lease ran out, as long as nobody took over
		n := *cur
		n.leaseExp = now.Add(lease)
		n.expires = later(cur.expires, n.leaseExp)
		next = &n
	}

	rec, err := m.store.Renew(context.Background(), r.tenant, r.key, keys.RenewRequest{Token: token, Lease: lease})
	op := fmt.Sprintf("renew %s by %s", r, who)
	m.saw("renew by " + who + ": " + errName(want))
	if who == "stale" && err == nil {
		t.Fatalf("%s: a stale holder's renew was accepted", op)
	}
	expectErr(t, op, err, want)
	if next != nil {
		checkRecord(t, op, rec, r, next, true)
		m.recs[r] = next
	}
}

// release checks that only the current holder releases, and that a release of nothing is a
// no-op.
func (m *machine) release(t *rapid.T) {
	r := m.drawRef(t)
	who, token := m.drawToken(t, r)
	cur := m.live(r)

	var want error
	switch {
	case cur == nil: // a retried release: nothing to do
	case cur.state == keys.StateCompleted:
		want = keys.ErrAlreadyCompleted
	case token != cur.token:
		want = keys.ErrLeaseLost
	}

	err := m.store.Release(context.Background(), r.tenant, r.key, token)
	op := fmt.Sprintf("release %s by %s", r, who)
	outcome := errName(want)
	if cur == nil {
		outcome = "no record"
	}
	m.saw("release by " + who + ": " + outcome)
	if who == "stale" && err == nil && cur != nil {
		t.Fatalf("%s: a stale holder's release was accepted", op)
	}
	expectErr(t, op, err, want)
	if cur != nil && want == nil {
		delete(m.recs, r)
	}
}

// delete removes a record whether or not it exists; its key's next fence must still grow.
func (m *machine) delete(t *rapid.T) {
	r := m.drawRef(t)
	expectErr(t, "delete "+r.String(), m.store.Delete(context.Background(), r.tenant, r.key), nil)
	delete(m.recs, r)
}

// advance moves the clock by a fixed step, or to a stored record's lease end or expiry (or a
// nanosecond before it), so the boundaries are met exactly.
func (m *machine) advance(t *rapid.T) {
	var ends []time.Time
	now := m.now()
	for _, r := range slices.SortedFunc(maps.Keys(m.recs), cmpRef) {
		rec := m.recs[r]
		for _, end := range []time.Time{rec.leaseExp, rec.expires} {
			if end.After(now) {
				ends = append(ends, end)
			}
		}
	}
	if len(ends) == 0 || rapid.Bool().Draw(t, "fixed step") {
		m.clock.Advance(rapid.SampledFrom(advances).Draw(t, "advance"))
		return
	}
	end := rapid.SampledFrom(ends).Draw(t, "advance to")
	d := end.Sub(now) - rapid.SampledFrom([]time.Duration{0, time.Nanosecond}).Draw(t, "short of it by")
	m.clock.Advance(d)
}

// sweep runs keys.SweepAll: it must remove exactly the expired records the store still keeps
// (none on a backend whose records expire by themselves), and no live one.
func (m *machine) sweep(t *rapid.T) {
	expired := 0
	for r, rec := range m.recs {
		if !m.now().Before(rec.expires) {
			expired++
			delete(m.recs, r)
		}
	}
	want := expired
	if m.expiresItself {
		want = 0
	}
	m.saw(fmt.Sprintf("sweep: %d expired records stored", min(expired, 2)))
	n, err := keys.SweepAll(context.Background(), m.store)
	expectErr(t, "sweep", err, nil)
	if n != want {
		t.Fatalf("sweep removed %d records, want %d (the expired ones)", n, want)
	}
	// The check after this action reads every ref: a live record that was swept fails there.
}

// check runs after every action: every ref reads as the model says, and an expired record is
// never served.
func (m *machine) check(t *rapid.T) {
	for _, tenant := range tenantNames {
		for _, key := range keyNames {
			r := ref{tenant, key}
			rec, err := m.store.Get(context.Background(), tenant, key)
			op := "get " + r.String()
			want := m.live(r)
			if want == nil && m.recs[r] != nil {
				m.saw("get: expired record not served")
			}
			if want == nil {
				if err == nil {
					t.Fatalf("%s: served %+v, but the model has no live record (expired, released, deleted or never begun)", op, rec)
				}
				expectErr(t, op, err, keys.ErrNotFound)
				continue
			}
			expectErr(t, op, err, nil)
			checkRecord(t, op, rec, r, want, false)
		}
	}
}

// checkRecord compares a record a store returned with the model's. withToken says whether the
// store must show the lease token (begin's acquire, renew) or must hide it (all others).
func checkRecord(t *rapid.T, op string, got keys.Record, r ref, want *mrec, withToken bool) {
	t.Helper()
	var diffs []string
	diff := func(field string, g, w any) { diffs = append(diffs, fmt.Sprintf("%s = %v, want %v", field, g, w)) }
	if got.Key != r.key {
		diff("key", got.Key, r.key)
	}
	if got.State != want.state {
		diff("state", got.State, want.state)
	}
	if got.Fingerprint != want.fp {
		diff("fingerprint", got.Fingerprint, want.fp)
	}
	wantToken := ""
	if withToken {
		wantToken = want.token
	}
	if got.Lease.Token != wantToken {
		diff("lease.token", got.Lease.Token, wantToken)
	}
	if got.Lease.Fence != want.fence {
		diff("lease.fence", got.Lease.Fence, want.fence)
	}
	for _, c := range []struct {
		name     string
		got, wnt time.Time
	}{
		{"lease.expires_at", got.Lease.ExpiresAt, want.leaseExp},
		{"created_at", got.CreatedAt, want.created},
		{"completed_at", got.CompletedAt, want.completed},
		{"expires_at", got.ExpiresAt, want.expires},
	} {
		if !c.got.Equal(c.wnt) {
			diff(c.name, c.got, c.wnt)
		}
	}
	if got.TTL != want.ttl {
		diff("ttl", got.TTL, want.ttl)
	}
	if !sameResponse(got.Response, want.resp) {
		diff("response", fmtResponse(got.Response), fmtResponse(want.resp))
	}
	if len(diffs) > 0 {
		t.Fatalf("%s: the record differs from the model:\n  %s", op, joinLines(diffs))
	}
}

// sameResponse is the model's own equality of stored responses: status, every header value in
// order, body byte for byte. (A nil and an empty body or header map are the same.)
func sameResponse(a, b *keys.Response) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	if a.Status != b.Status || !bytes.Equal(a.Body, b.Body) || len(a.Headers) != len(b.Headers) {
		return false
	}
	for name, va := range a.Headers {
		vb, ok := b.Headers[name]
		if !ok || !slices.Equal(va, vb) {
			return false
		}
	}
	return true
}

func cloneResponse(r keys.Response) keys.Response {
	r.Body = bytes.Clone(r.Body)
	if r.Headers != nil {
		h := make(map[string][]string, len(r.Headers))
		for k, v := range r.Headers {
			h[k] = slices.Clone(v)
		}
		r.Headers = h
	}
	return r
}

func fmtResponse(r *keys.Response) string {
	if r == nil {
		return "<none>"
	}
	names := slices.Sorted(maps.Keys(r.Headers))
	s := fmt.Sprintf("{%d", r.Status)
	for _, n := range names {
		s += fmt.Sprintf(" %s:%q", n, r.Headers[n])
	}
	return s + fmt.Sprintf(" body %q}", r.Body)
}

func joinLines(lines []string) string {
	out := ""
	for i, l := range lines {
		if i > 0 {
			out += "\n  "
		}
		out += l
	}
	return out
}

// errName names an expected outcome for the log.
func errName(err error) string {
	if err == nil {
		return "accepted"
	}
	return err.Error()
}

// expectErr fails unless err is want (nil for success), by errors.Is.
func expectErr(t *rapid.T, op string, err, want error) {
	t.Helper()
	switch {
	case want == nil && err != nil:
		t.Fatalf("%s: error %v, want success", op, err)
	case want != nil && !errors.Is(err, want):
		t.Fatalf("%s: error %v, want %v", op, err, want)
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// run runs the state machine against stores that open returns, a fresh one per check.
func run(t *testing.T, expiresItself bool, open func(clock *storagetest.Clock) (keys.Store, func())) {
	checks := 0
	outcomes := map[string]int{}
	rapid.Check(t, func(rt *rapid.T) {
		checks++
		clock := storagetest.NewClock(storagetest.Start)
		store, closeStore := open(clock)
		defer closeStore()
		m := &machine{
			store: store, clock: clock, expiresItself: expiresItself,
			recs: map[ref]*mrec{}, maxFence: map[ref]uint64{}, tokens: map[ref][]string{}, seen: map[string]bool{},
			outcomes: outcomes,
		}
		rt.Repeat(map[string]func(*rapid.T){
			"begin":    m.begin,
			"complete": m.complete,
			"renew":    m.renew,
			"release":  m.release,
			"delete":   m.delete,
			"advance":  m.advance,
			"sweep":    m.sweep,
			"":         m.check,
		})
	})
	t.Logf("model: %d state machines run; outcomes met:", checks)
	for _, o := range slices.Sorted(maps.Keys(outcomes)) {
		t.Logf("  %6d  %s", outcomes[o], o)
	}
}

func TestModelBolt(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	var n atomic.Int64
	run(t, false, func(clock *storagetest.Clock) (keys.Store, func()) {
		d := filepath.Join(dir, strconv.FormatInt(n.Add(1), 10))
		s, err := bolt.OpenDir(d, bolt.Options{Now: clock.Now})
		if err != nil {
			t.Fatalf("open bolt: %v", err)
		}
		return s, func() {
			if err := s.Close(); err != nil {
				t.Errorf("close bolt: %v", err)
			}
			_ = os.RemoveAll(d)
		}
	})
}

func TestModelRedis(t *testing.T) {
	t.Parallel()
	url := redistest.URL(t)
	prefix := redistest.Prefix(t)
	var n atomic.Int64
	run(t, true, func(clock *storagetest.Clock) (keys.Store, func()) {
		s, err := redis.Open(context.Background(), url, redis.Options{
			Now: clock.Now, Prefix: prefix + "-" + strconv.FormatInt(n.Add(1), 10),
		})
		if err != nil {
			t.Fatalf("open redis: %v", err)
		}
		return s, func() { _ = s.Close() }
	})
}
