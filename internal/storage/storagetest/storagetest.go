// Package storagetest is the conformance suite that every keys.Store backend runs: a subtest for
// every outcome of CONTRACT.md's tables at the store level, plus lease takeover and fences,
// expiry and sweeping, tenant isolation, concurrency, watching and waiting, and reopening.
// A backend's test is a few lines that call Run with a Factory.
//
// Every subtest gets its own fresh store and its own fake Clock, so time moves only when the
// test says so and no test sleeps for a lease. Assertions compare whole records.
package storagetest

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// Factory opens the stores that the suite tests.
type Factory struct {
	// Open returns a new store that reads the time from clock.Now and shares no record and no
	// watcher with any other store Open returned (a new file, a new key prefix). The factory
	// closes the store in t.Cleanup; the suite may have closed it already, which the cleanup
	// must tolerate. Open fails t when the store cannot be opened.
	Open func(t *testing.T, clock *Clock) keys.Store

	// Reopen shuts s down the way a clean exit does (for bolt: closes the file) and returns a
	// new store over the same data, reading the time from clock.Now (for Redis: a new client on
	// the same server and key prefix). s was returned by Open or Reopen in the same test.
	// Every backend must provide it: Run fails without it.
	Reopen func(t *testing.T, s keys.Store, clock *Clock) keys.Store

	// ExpiresItself says that the backend's records vanish by themselves when they expire (as
	// Redis keys do), so its Sweep returns 0, nil. The sweep subtests then check that, and
	// still check that nothing live goes and nothing expired is served.
	ExpiresItself bool
}

// Run runs the conformance suite against the stores f opens. Its subtests run in parallel.
func Run(t *testing.T, f Factory) {
	if f.Open == nil || f.Reopen == nil {
		t.Fatal("storagetest: the Factory needs both Open and Reopen")
	}
	s := &suite{f: f}
	groups := []struct {
		name  string
		tests []subtest
	}{
		{"Begin", s.beginTests()},
		{"Complete", s.completeTests()},
		{"Renew", s.renewTests()},
		{"Release", s.releaseTests()},
		{"Get", s.getTests()},
		{"Delete", s.deleteTests()},
		{"Fence", s.fenceTests()},
		{"TTL", s.ttlTests()},
		{"Sweep", s.sweepTests()},
		{"Tenants", s.tenantTests()},
		{"Concurrent", s.concurrentTests()},
		{"Watch", s.watchTests()},
		{"BeginWait", s.beginWaitTests()},
		{"Reopen", s.reopenTests()},
		{"Close", s.closeTests()},
		{"Ping", s.pingTests()},
	}
	for _, g := range groups {
		t.Run(g.name, func(t *testing.T) {
			t.Parallel()
			for _, st := range g.tests {
				t.Run(st.name, func(t *testing.T) {
					t.Parallel()
					st.fn(t)
				})
			}
		})
	}
}

type subtest struct {
	name string
	fn   func(t *testing.T)
}

type suite struct{ f Factory }

// The values most subtests use.
const (
	tenant = "tenant-1"
	lease  = 30 * time.Second
	ttl    = 24 * time.Hour
	fp     = "fp-1"
)

// req is the begin request most subtests use.
var req = keys.BeginRequest{Fingerprint: fp, Lease: lease, TTL: ttl}

// response returns a response to store: several headers, one with two values, and a body
// that is not valid UTF-8, so that any re-encoding on the way shows.
func response(body string) keys.Response {
	return keys.Response{
		Status: 201,
		Headers: map[string][]string{
			"Content-Type": {"application/json"},
			"Location":     {"/v1/orders/42"},
			"X-Multi":      {"one", "two"},
		},
		Body: []byte(`{"id":42,"note":"` + body + "\"}\x00\xff\xfe"),
	}
}

// env is one subtest's store and clock.
type env struct {
	t     *testing.T
	ctx   context.Context
	clock *Clock
	s     keys.Store
	f     Factory
}

func (s *suite) env(t *testing.T) *env {
	clock := NewClock(Start)
	return &env{t: t, ctx: t.Context(), clock: clock, s: s.f.Open(t, clock), f: s.f}
}

func (e *env) now() time.Time { return e.clock.Now() }

// acquire begins key, which must acquire, and returns the new record (with its token).
func (e *env) acquire(key string, r keys.BeginRequest) keys.Record {
	e.t.Helper()
	return e.acquireIn(tenant, key, r)
}

func (e *env) acquireIn(tn, key string, r keys.BeginRequest) keys.Record {
	e.t.Helper()
	res, err := e.s.Begin(e.ctx, tn, key, r)
	if err != nil {
		e.t.Fatalf("Begin(%q, %q): %v, want it to acquire", tn, key, err)
	}
	if res.Outcome != keys.Acquired {
		e.t.Fatalf("Begin(%q, %q): outcome %v, want acquired", tn, key, res.Outcome)
	}
	return res.Record
}

// takeOver begins key, which must take over, and returns the new record.
func (e *env) takeOver(key string, r keys.BeginRequest) keys.Record {
	e.t.Helper()
	res, err := e.s.Begin(e.ctx, tenant, key, r)
	if err != nil {
		e.t.Fatalf("Begin(%q): %v, want it to take over", key, err)
	}
	if res.Outcome != keys.TakenOver {
		e.t.Fatalf("Begin(%q): outcome %v, want takeover", key, res.Outcome)
	}
	return res.Record
}

// complete completes key with token, which must succeed, and returns the completed record.
func (e *env) complete(key, token string, resp keys.Response, ttl time.Duration) keys.Record {
	e.t.Helper()
	rec, err := e.s.Complete(e.ctx, tenant, key, keys.CompleteRequest{Token: token, Response: resp, TTL: ttl})
	if err != nil {
		e.t.Fatalf("Complete(%q): %v", key, err)
	}
	return rec
}

// get returns the live record of key, which must exist.
func (e *env) get(key string) keys.Record {
	e.t.Helper()
	return e.getIn(tenant, key)
}

func (e *env) getIn(tn, key string) keys.Record {
	e.t.Helper()
	rec, err := e.s.Get(e.ctx, tn, key)
	if err != nil {
		e.t.Fatalf("Get(%q, %q): %v", tn, key, err)
	}
	return rec
}

// wantGone checks that key has no live record.
func (e *env) wantGone(key string) {
	e.t.Helper()
	rec, err := e.s.Get(e.ctx, tenant, key)
	if !errors.Is(err, keys.ErrNotFound) {
		e.t.Errorf("Get(%q) = %s, %v; want ErrNotFound", key, show(rec), err)
	}
}

// wantRecord checks that key's live record is want.
func (e *env) wantRecord(key string, want keys.Record) {
	e.t.Helper()
	checkRecord(e.t, fmt.Sprintf("Get(%q)", key), e.get(key), want)
}

// wantBeginErr begins key and checks that it fails with target, returning the result.
func (e *env) wantBeginErr(key string, r keys.BeginRequest, target error) keys.BeginResult {
	e.t.Helper()
	res, err := e.s.Begin(e.ctx, tenant, key, r)
	if !errors.Is(err, target) {
		e.t.Fatalf("Begin(%q, fingerprint %q) = %v %s, %v; want %v", key, r.Fingerprint, res.Outcome,
			show(res.Record), err, target)
	}
	return res
}

// wantReplay begins key and checks that it replays want.
func (e *env) wantReplay(key string, r keys.BeginRequest, want keys.Record) {
	e.t.Helper()
	res, err := e.s.Begin(e.ctx, tenant, key, r)
	if err != nil || res.Outcome != keys.Replayed {
		e.t.Fatalf("Begin(%q, fingerprint %q) = %v, %v; want replayed", key, r.Fingerprint, res.Outcome, err)
	}
	checkRecord(e.t, "replayed record", res.Record, want)
}

// advanceTo moves the subtest's clock to t.
func (e *env) advanceTo(t time.Time) { e.clock.advanceTo(t) }

// wantErr checks that err matches target (nil for success).
func wantErr(t testing.TB, what string, err, target error) {
	t.Helper()
	switch {
	case target == nil && err != nil:
		t.Errorf("%s: %v, want no error", what, err)
	case target != nil && !errors.Is(err, target):
		t.Errorf("%s: %v, want %v", what, err, target)
	}
}

// inProgress is the record a begin at now writes for a new lease.
func inProgress(key string, r keys.BeginRequest, now time.Time, token string, fence uint64) keys.Record {
	leaseEnd := now.Add(r.Lease)
	expires := now.Add(r.TTL)
	if leaseEnd.After(expires) {
		expires = leaseEnd
	}
	return keys.Record{
		Key:         key,
		State:       keys.StateInProgress,
		Fingerprint: r.Fingerprint,
		Lease:       keys.Lease{Token: token, Fence: fence, ExpiresAt: leaseEnd},
		CreatedAt:   now,
		ExpiresAt:   expires,
		TTL:         r.TTL,
	}
}

// completedFrom is the public record that completing held at now with ttl (the record's own
// when zero) gives.
func completedFrom(held keys.Record, resp keys.Response, now time.Time, ttl time.Duration) keys.Record {
	if ttl == 0 {
		ttl = held.TTL
	}
	r := held.Public()
	r.State = keys.StateCompleted
	r.Response = &resp
	r.CompletedAt = now
	r.ExpiresAt = now.Add(ttl)
	r.TTL = ttl
	return r
}

// checkToken checks that a lease token carries at least 128 bits.
func checkToken(t testing.TB, token string) {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil || len(b) < 16 {
		t.Errorf("token %q: want at least 128 bits, base64url", token)
	}
}

// checkFenceAbove checks that a new lease's fence is larger than every earlier one.
func checkFenceAbove(t testing.TB, what string, got uint64, earlier ...uint64) {
	t.Helper()
	for _, e := range earlier {
		if got <= e {
			t.Errorf("%s: fence %d, want larger than the earlier fence %d", what, got, e)
		}
	}
}

// checkRecord compares two whole records.
func checkRecord(t testing.TB, what string, got, want keys.Record) {
	t.Helper()
	if g, w := show(got), show(want); g != w {
		t.Errorf("%s:\n got %s\nwant %s", what, g, w)
	}
}

// show prints every field of a record, times in UTC with nanoseconds, headers sorted and the
// body quoted byte for byte, so that two records print the same exactly when they are equal
// (nil and empty headers, values and bodies count as equal).
func show(r keys.Record) string {
	var b strings.Builder
	fmt.Fprintf(&b, "{key=%q state=%q fingerprint=%q lease={token=%q fence=%d expires=%s} created=%s completed=%s expires=%s ttl=%s",
		r.Key, r.State, r.Fingerprint, r.Lease.Token, r.Lease.Fence, showTime(r.Lease.ExpiresAt),
		showTime(r.CreatedAt), showTime(r.CompletedAt), showTime(r.ExpiresAt), r.TTL)
	if r.Response == nil {
		b.WriteString(" response=nil}")
		return b.String()
	}
	fmt.Fprintf(&b, " response={status=%d headers={", r.Response.Status)
	for i, name := range slices.Sorted(maps.Keys(r.Response.Headers)) {
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprintf(&b, "%q:%q", name, r.Response.Headers[name])
	}
	fmt.Fprintf(&b, "} body=%q}}", r.Response.Body)
	return b.String()
}

func showTime(t time.Time) string {
	if t.IsZero() {
		return "zero"
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// waitClosed fails t unless ch is closed within a few seconds.
func waitClosed(t testing.TB, what string, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: the watch channel was not closed within 5s", what)
	}
}
