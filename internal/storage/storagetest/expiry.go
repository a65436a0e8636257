package storagetest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// Retention: a record past its expires_at does not exist, swept or not.

func (s *suite) ttlTests() []subtest {
	return []subtest{
		{"CompletedNotServedAtExpiry", func(t *testing.T) {
			e := s.env(t)
			r := keys.BeginRequest{Fingerprint: fp, Lease: lease, TTL: time.Hour}
			held := e.acquire("key", r)
			e.clock.Advance(time.Second)
			done := e.complete("key", held.Lease.Token, response("x"), 0)
			if want := e.now().Add(time.Hour); !done.ExpiresAt.Equal(want) {
				t.Fatalf("expires_at %s, want %s (the begin's TTL from completion)", showTime(done.ExpiresAt), showTime(want))
			}
			e.advanceTo(done.ExpiresAt.Add(-time.Nanosecond))
			e.wantReplay("key", r, done)
			e.wantRecord("key", done)

			e.advanceTo(done.ExpiresAt) // expired at expires_at itself, before any sweep
			e.wantGone("key")
			_, err := e.s.Complete(e.ctx, tenant, "key", keys.CompleteRequest{Token: held.Lease.Token, Response: response("x")})
			wantErr(t, "Complete of an expired record", err, keys.ErrNotFound)
			_, err = e.s.Renew(e.ctx, tenant, "key", keys.RenewRequest{Token: held.Lease.Token, Lease: lease})
			wantErr(t, "Renew of an expired record", err, keys.ErrNotFound)
			wantErr(t, "Release of an expired record", e.s.Release(e.ctx, tenant, "key", held.Lease.Token), nil)
			r.Fingerprint = "fp-new" // the old fingerprint no longer binds the key
			next := e.acquire("key", r)
			checkFenceAbove(t, "begin after expiry", next.Lease.Fence, held.Lease.Fence)
			checkRecord(t, "fresh record", next, inProgress("key", r, e.now(), next.Lease.Token, next.Lease.Fence))
		}},
		{"InProgressNotServedAtExpiry", func(t *testing.T) {
			e := s.env(t)
			r := keys.BeginRequest{Fingerprint: fp, Lease: lease, TTL: time.Minute}
			held := e.acquire("key", r)
			if want := Start.Add(time.Minute); !held.ExpiresAt.Equal(want) {
				t.Fatalf("expires_at %s, want %s", showTime(held.ExpiresAt), showTime(want))
			}
			e.advanceTo(held.ExpiresAt)
			e.wantGone("key")
			next := e.acquire("key", r) // a fresh acquire, not a takeover of a dead record
			checkRecord(t, "fresh record", next, inProgress("key", r, e.now(), next.Lease.Token, next.Lease.Fence))
		}},
		{"LeaseLongerThanTTL", func(t *testing.T) {
			e := s.env(t)
			r := keys.BeginRequest{Fingerprint: fp, Lease: time.Minute, TTL: time.Second}
			held := e.acquire("key", r)
			if want := Start.Add(time.Minute); !held.ExpiresAt.Equal(want) {
				t.Errorf("expires_at %s, want the lease's end %s", showTime(held.ExpiresAt), showTime(want))
			}
			e.advanceTo(held.Lease.ExpiresAt.Add(-time.Nanosecond))
			e.wantBeginErr("key", r, keys.ErrInProgress)
		}},
		{"CompleteOverridesBegin", func(t *testing.T) {
			for _, c := range []struct {
				name     string
				complete time.Duration
			}{{"Shorter", 5 * time.Minute}, {"Longer", 48 * time.Hour}} {
				t.Run(c.name, func(t *testing.T) {
					t.Parallel()
					e := s.env(t)
					held := e.acquire("key", req)
					e.clock.Advance(time.Second)
					resp := response("ttl")
					done := e.complete("key", held.Lease.Token, resp, c.complete)
					want := completedFrom(held, resp, e.now(), c.complete)
					checkRecord(t, "completed record", done, want)
					e.advanceTo(want.ExpiresAt.Add(-time.Nanosecond))
					e.wantRecord("key", want)
					e.advanceTo(want.ExpiresAt)
					e.wantGone("key")
				})
			}
		}},
	}
}

// wantSweep sweeps once and checks how many records went (none for a self-expiring store).
func (e *env) wantSweep(want int) {
	e.t.Helper()
	if e.f.ExpiresItself {
		want = 0
	}
	got, err := e.s.Sweep(e.ctx, keys.SweepBatch)
	if err != nil || got != want {
		e.t.Errorf("Sweep = %d, %v; want %d, nil", got, err, want)
	}
}

// population is a mix of records, some of which have expired at the clock's current time.
type population struct {
	live    map[string]keys.Record // key to its public record
	expired []string
}

// populate writes records under tenants "t1" and "t2" and moves the clock 10 minutes ahead,
// to the instant the last expired record expires. The live ones include in-progress records
// whose lease ran out, records renewed or completed past their first expiry, an expired key
// begun again and a record that expires a nanosecond later.
func (e *env) populate() population {
	e.t.Helper()
	p := population{live: map[string]keys.Record{}}
	short := keys.BeginRequest{Fingerprint: fp, Lease: 30 * time.Second, TTL: time.Minute}
	for _, tn := range []string{"t1", "t2"} {
		for i := range 3 {
			k := fmt.Sprintf("%s/live-completed-%d", tn, i)
			h := e.acquireIn(tn, k, req)
			e.completeIn(tn, k, h.Lease.Token, 0)
			k = fmt.Sprintf("%s/live-in-progress-%d", tn, i)
			e.acquireIn(tn, k, keys.BeginRequest{Fingerprint: fp, Lease: time.Hour, TTL: ttl})
			k = fmt.Sprintf("%s/expired-completed-%d", tn, i)
			h = e.acquireIn(tn, k, short)
			e.completeIn(tn, k, h.Lease.Token, 0)
			p.expired = append(p.expired, tn+"\x00"+k)
			k = fmt.Sprintf("%s/expired-in-progress-%d", tn, i)
			e.acquireIn(tn, k, short)
			p.expired = append(p.expired, tn+"\x00"+k)
		}
		k := tn + "/lease-over"
		e.acquireIn(tn, k, keys.BeginRequest{Fingerprint: fp, Lease: time.Second, TTL: ttl})
		k = tn + "/renewed-past-ttl"
		h := e.acquireIn(tn, k, short)
		if _, err := e.s.Renew(e.ctx, tn, k, keys.RenewRequest{Token: h.Lease.Token, Lease: time.Hour}); err != nil {
			e.t.Fatalf("Renew(%q): %v", k, err)
		}
		k = tn + "/completed-past-ttl"
		h = e.acquireIn(tn, k, short)
		e.completeIn(tn, k, h.Lease.Token, ttl)
		k = tn + "/completed-before-ttl"
		h = e.acquireIn(tn, k, req)
		e.completeIn(tn, k, h.Lease.Token, time.Minute)
		p.expired = append(p.expired, tn+"\x00"+k)
		k = tn + "/begun-again"
		e.acquireIn(tn, k, short)
		k = tn + "/at-expiry"
		e.acquireIn(tn, k, keys.BeginRequest{Fingerprint: fp, Lease: time.Second, TTL: 10 * time.Minute})
		p.expired = append(p.expired, tn+"\x00"+k)
		k = tn + "/just-live" // expires a nanosecond after the sweep
		e.acquireIn(tn, k, keys.BeginRequest{Fingerprint: fp, Lease: time.Second, TTL: 10*time.Minute + time.Nanosecond})
	}
	e.clock.Advance(2 * time.Minute)
	for _, tn := range []string{"t1", "t2"} {
		e.acquireIn(tn, tn+"/begun-again", req) // over its own expired record
	}
	e.advanceTo(Start.Add(10 * time.Minute))
	for _, tn := range []string{"t1", "t2"} {
		for _, k := range []string{
			"/live-completed-0", "/live-completed-1", "/live-completed-2",
			"/live-in-progress-0", "/live-in-progress-1", "/live-in-progress-2",
			"/lease-over", "/renewed-past-ttl", "/completed-past-ttl", "/begun-again", "/just-live",
		} {
			p.live[tn+"\x00"+tn+k] = e.getIn(tn, tn+k)
		}
	}
	return p
}

func (e *env) completeIn(tn, key, token string, ttl time.Duration) {
	e.t.Helper()
	_, err := e.s.Complete(e.ctx, tn, key, keys.CompleteRequest{Token: token, Response: response(key), TTL: ttl})
	if err != nil {
		e.t.Fatalf("Complete(%q, %q): %v", tn, key, err)
	}
}

// check checks that every live record is unchanged and no expired one is served.
func (p population) check(e *env) {
	e.t.Helper()
	for id, want := range p.live {
		tn, k := split(id)
		checkRecord(e.t, fmt.Sprintf("Get(%q, %q)", tn, k), e.getIn(tn, k), want)
	}
	for _, id := range p.expired {
		tn, k := split(id)
		if rec, err := e.s.Get(e.ctx, tn, k); err == nil {
			e.t.Errorf("Get(%q, %q) = %s, want ErrNotFound", tn, k, show(rec))
		}
	}
}

func split(id string) (tenant, key string) {
	for i := range len(id) {
		if id[i] == 0 {
			return id[:i], id[i+1:]
		}
	}
	return "", id
}

func (s *suite) sweepTests() []subtest {
	return []subtest{
		{"OnlyExpired", func(t *testing.T) {
			e := s.env(t)
			p := e.populate()
			p.check(e)
			e.wantSweep(len(p.expired))
			p.check(e)
			e.wantSweep(0)
			// The next begin on a swept key starts afresh.
			tn, k := split(p.expired[0])
			e.acquireIn(tn, k, req)
		}},
		{"Max", func(t *testing.T) {
			e := s.env(t)
			p := e.populate()
			want := len(p.expired)
			for want > 0 {
				n := min(want, 3)
				if e.f.ExpiresItself {
					n = 0
				}
				got, err := e.s.Sweep(e.ctx, 3)
				if err != nil || got != n {
					t.Fatalf("Sweep(3) = %d, %v; want %d, nil", got, err, n)
				}
				if e.f.ExpiresItself {
					break
				}
				want -= n
			}
			e.wantSweep(0)
			p.check(e)
		}},
		{"All", func(t *testing.T) {
			e := s.env(t)
			const expired, live = keys.SweepBatch + 37, 5
			r := keys.BeginRequest{Fingerprint: fp, Lease: time.Second, TTL: time.Minute}
			var wg sync.WaitGroup
			errs := make(chan error, 16)
			for g := range 16 {
				wg.Go(func() {
					for i := g; i < expired; i += 16 {
						if _, err := e.s.Begin(e.ctx, tenant, fmt.Sprintf("expired-%d", i), r); err != nil {
							errs <- err
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatalf("Begin: %v", err)
			}
			for i := range live {
				e.acquire(fmt.Sprintf("live-%d", i), req)
			}
			e.clock.Advance(time.Minute)
			want := map[string]keys.Record{}
			for i := range live {
				k := fmt.Sprintf("live-%d", i)
				want[k] = e.get(k)
			}
			counting := &sweepCounter{Store: e.s}
			got, err := keys.SweepAll(e.ctx, counting)
			wantTotal, wantCalls := expired, 2
			if e.f.ExpiresItself {
				wantTotal, wantCalls = 0, 1
			}
			if err != nil || got != wantTotal {
				t.Errorf("SweepAll = %d, %v; want %d, nil", got, err, wantTotal)
			}
			if counting.calls < wantCalls {
				t.Errorf("SweepAll swept in %d calls, want at least %d", counting.calls, wantCalls)
			}
			for k, w := range want {
				e.wantRecord(k, w)
			}
			e.wantGone("expired-0")
			e.wantGone(fmt.Sprintf("expired-%d", expired-1))
		}},
	}
}

// sweepCounter counts Sweep calls and checks that none removes more than it was allowed.
type sweepCounter struct {
	keys.Store
	calls int
}

func (c *sweepCounter) Sweep(ctx context.Context, max int) (int, error) {
	c.calls++
	n, err := c.Store.Sweep(ctx, max)
	if n > max {
		return n, fmt.Errorf("Sweep(%d) removed %d", max, n)
	}
	return n, err
}
