package storagetest

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// Tenants, concurrency, watching and waiting, reopening, closing.

func (s *suite) tenantTests() []subtest {
	return []subtest{
		{"Isolated", func(t *testing.T) {
			e := s.env(t)
			ra, rb := req, req
			rb.Fingerprint = "fp-b" // no mismatch across tenants
			a := e.acquireIn("a", "key", ra)
			b := e.acquireIn("b", "key", rb) // not in progress: another tenant's key
			if _, err := e.s.Get(e.ctx, "c", "key"); !errors.Is(err, keys.ErrNotFound) {
				t.Errorf("Get under tenant c: %v, want ErrNotFound", err)
			}
			// a's token means nothing under b.
			_, err := e.s.Complete(e.ctx, "b", "key", keys.CompleteRequest{Token: a.Lease.Token, Response: response("a")})
			wantErr(t, "Complete under b with a's token", err, keys.ErrLeaseLost)
			wantErr(t, "Release under b with a's token", e.s.Release(e.ctx, "b", "key", a.Lease.Token), keys.ErrLeaseLost)
			// Completing a leaves b in progress; deleting a leaves b alone.
			if _, err := e.s.Complete(e.ctx, "a", "key", keys.CompleteRequest{Token: a.Lease.Token, Response: response("a")}); err != nil {
				t.Fatalf("Complete under a: %v", err)
			}
			res, err := e.s.Begin(e.ctx, "b", "key", rb)
			if !errors.Is(err, keys.ErrInProgress) {
				t.Errorf("Begin under b after a completed: %v %v, want ErrInProgress", res.Outcome, err)
			}
			wantErr(t, "Delete under a", e.s.Delete(e.ctx, "a", "key"), nil)
			checkRecord(t, "Get under b", e.getIn("b", "key"), b.Public())
		}},
		{"NoCollision", func(t *testing.T) {
			e := s.env(t)
			pairs := [][2]string{{"a", "bc"}, {"ab", "c"}, {"abc", "d"}, {"a", "b\x01c"}}
			recs := map[[2]string]keys.Record{}
			for _, p := range pairs {
				recs[p] = e.acquireIn(p[0], p[1], req)
			}
			for _, p := range pairs {
				checkRecord(t, fmt.Sprintf("Get(%q, %q)", p[0], p[1]), e.getIn(p[0], p[1]), recs[p].Public())
			}
			wantErr(t, "Delete", e.s.Delete(e.ctx, "a", "bc"), nil)
			for _, p := range pairs[1:] {
				checkRecord(t, fmt.Sprintf("Get(%q, %q)", p[0], p[1]), e.getIn(p[0], p[1]), recs[p].Public())
			}
		}},
		{"FencesRevealNoOtherTenant", func(t *testing.T) {
			// A tenant's fences may not count another tenant's leases: the gap between two of
			// a's fences must not grow with b's activity in between.
			e := s.env(t)
			f1 := e.acquireIn("a", "k1", req).Lease.Fence
			for i := range 50 {
				e.acquireIn("b", fmt.Sprintf("k%d", i), req)
			}
			if f2 := e.acquireIn("a", "k2", req).Lease.Fence; f2 > f1+1 {
				t.Errorf("a's fences went %d -> %d across 50 leases of tenant b", f1, f2)
			}
		}},
	}
}

const goroutines = 64

// together runs f(i) for i in [0, goroutines) at once and waits for them all.
func together(f func(i int)) {
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range goroutines {
		wg.Go(func() {
			<-start
			f(i)
		})
	}
	close(start)
	wg.Wait()
}

type beginCall struct {
	res keys.BeginResult
	err error
}

// oneWinner checks that exactly one of calls got outcome and all the others ErrInProgress with
// the winner's record, and returns the winner's record.
func oneWinner(t *testing.T, calls []beginCall, outcome keys.Outcome) keys.Record {
	t.Helper()
	var winners []keys.Record
	for _, c := range calls {
		switch {
		case c.err == nil && c.res.Outcome == outcome:
			winners = append(winners, c.res.Record)
		case errors.Is(c.err, keys.ErrInProgress):
		default:
			t.Errorf("Begin = %v, %v; want %v or ErrInProgress", c.res.Outcome, c.err, outcome)
		}
	}
	if len(winners) != 1 {
		t.Fatalf("%d begins got %v, want exactly 1", len(winners), outcome)
	}
	for _, c := range calls {
		if c.err != nil {
			checkRecord(t, "in-progress result", c.res.Record, winners[0].Public())
		}
	}
	return winners[0]
}

func (s *suite) concurrentTests() []subtest {
	return []subtest{
		{"BeginSameKey", func(t *testing.T) {
			e := s.env(t)
			calls := make([]beginCall, goroutines)
			together(func(i int) {
				res, err := e.s.Begin(e.ctx, tenant, "key", req)
				calls[i] = beginCall{res, err}
			})
			won := oneWinner(t, calls, keys.Acquired)
			e.wantRecord("key", won.Public())
		}},
		{"TakeOverSameKey", func(t *testing.T) {
			e := s.env(t)
			first := e.acquire("key", req)
			e.advanceTo(first.Lease.ExpiresAt)
			calls := make([]beginCall, goroutines)
			together(func(i int) {
				res, err := e.s.Begin(e.ctx, tenant, "key", req)
				calls[i] = beginCall{res, err}
			})
			won := oneWinner(t, calls, keys.TakenOver)
			checkFenceAbove(t, "takeover", won.Lease.Fence, first.Lease.Fence)
			e.wantRecord("key", won.Public())
		}},
		{"CompleteAndReplay", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			resp := response("many")
			want := completedFrom(held, resp, e.now(), 0)
			together(func(i int) {
				if i%2 == 0 {
					got, err := e.s.Complete(e.ctx, tenant, "key", keys.CompleteRequest{Token: held.Lease.Token, Response: response("many")})
					if err != nil {
						t.Errorf("Complete: %v", err)
						return
					}
					checkRecord(t, "Complete", got, want)
					return
				}
				res, err := e.s.Begin(e.ctx, tenant, "key", req)
				switch {
				case errors.Is(err, keys.ErrInProgress):
					checkRecord(t, "in-progress result", res.Record, held.Public())
				case err != nil || res.Outcome != keys.Replayed:
					t.Errorf("Begin = %v, %v; want replayed or ErrInProgress", res.Outcome, err)
				default:
					checkRecord(t, "replayed record", res.Record, want)
				}
			})
			e.wantReplay("key", req, want)
		}},
		{"DistinctKeys", func(t *testing.T) {
			e := s.env(t)
			want := make([]keys.Record, goroutines)
			together(func(i int) {
				k := fmt.Sprintf("key-%d", i)
				res, err := e.s.Begin(e.ctx, tenant, k, req)
				if err != nil || res.Outcome != keys.Acquired {
					t.Errorf("Begin(%q) = %v, %v; want acquired", k, res.Outcome, err)
					return
				}
				resp := response(k)
				if _, err := e.s.Complete(e.ctx, tenant, k, keys.CompleteRequest{Token: res.Record.Lease.Token, Response: resp}); err != nil {
					t.Errorf("Complete(%q): %v", k, err)
					return
				}
				want[i] = completedFrom(res.Record, resp, e.now(), 0)
			})
			if t.Failed() {
				return
			}
			for i, w := range want {
				e.wantRecord(fmt.Sprintf("key-%d", i), w)
			}
		}},
	}
}

func (s *suite) watchTests() []subtest {
	changes := []struct {
		name   string
		change func(e *env, held keys.Record)
	}{
		{"Complete", func(e *env, held keys.Record) { e.complete("key", held.Lease.Token, response("w"), 0) }},
		{"Release", func(e *env, held keys.Record) {
			wantErr(e.t, "Release", e.s.Release(e.ctx, tenant, "key", held.Lease.Token), nil)
		}},
		{"Delete", func(e *env, held keys.Record) { wantErr(e.t, "Delete", e.s.Delete(e.ctx, tenant, "key"), nil) }},
		{"TakeOver", func(e *env, held keys.Record) {
			e.advanceTo(held.Lease.ExpiresAt)
			e.takeOver("key", req)
		}},
	}
	var tests []subtest
	for _, c := range changes {
		tests = append(tests, subtest{c.name, func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			ch, stop := e.s.Watch(tenant, "key")
			defer stop()
			ch2, stop2 := e.s.Watch(tenant, "key") // a second watcher of the same key
			defer stop2()
			c.change(e, held)
			waitClosed(t, "first watcher", ch)
			waitClosed(t, "second watcher", ch2)
		}})
	}
	tests = append(tests, subtest{"StopThenChange", func(t *testing.T) {
		e := s.env(t)
		held := e.acquire("key", req)
		_, stop := e.s.Watch(tenant, "key")
		stop()
		stop() // harmless
		ch, stop2 := e.s.Watch(tenant, "key")
		defer stop2()
		e.complete("key", held.Lease.Token, response("w"), 0)
		waitClosed(t, "watcher", ch)
		// A new watch after the change waits for the next one.
		ch3, stop3 := e.s.Watch(tenant, "key")
		defer stop3()
		wantErr(t, "Delete", e.s.Delete(e.ctx, tenant, "key"), nil)
		waitClosed(t, "watcher after the change", ch3)
	}})
	return tests
}

// watchSignal reports each Watch call on watched, so that a test knows a waiter is waiting.
type watchSignal struct {
	keys.Store
	watched chan struct{}
}

func (w *watchSignal) Watch(tenant, key string) (<-chan struct{}, func()) {
	ch, stop := w.Store.Watch(tenant, key)
	select {
	case w.watched <- struct{}{}:
	default:
	}
	return ch, stop
}

// waiter starts keys.BeginWait on "key" for up to wait, once the holder holds it, and returns
// a channel with its result after it has begun waiting.
func (e *env) waiter(wait time.Duration) <-chan beginCall {
	e.t.Helper()
	ws := &watchSignal{Store: e.s, watched: make(chan struct{}, 1)}
	done := make(chan beginCall, 1)
	go func() {
		res, err := keys.BeginWait(e.ctx, ws, e.clock.Now, tenant, "key", req, wait)
		done <- beginCall{res, err}
	}()
	select {
	case <-ws.watched:
	case c := <-done:
		e.t.Fatalf("BeginWait returned %v, %v before waiting", c.res.Outcome, c.err)
	case <-time.After(5 * time.Second):
		e.t.Fatal("BeginWait did not start waiting within 5s")
	}
	return done
}

func waitResult(t *testing.T, done <-chan beginCall) beginCall {
	t.Helper()
	select {
	case c := <-done:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("BeginWait did not return within 10s")
		return beginCall{}
	}
}

func (s *suite) beginWaitTests() []subtest {
	return []subtest{
		{"ReplayAfterComplete", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			done := e.waiter(time.Minute)
			resp := response("waited")
			want := completedFrom(held, resp, e.now(), 0)
			e.complete("key", held.Lease.Token, resp, 0)
			c := waitResult(t, done)
			if c.err != nil || c.res.Outcome != keys.Replayed {
				t.Fatalf("BeginWait = %v, %v; want replayed", c.res.Outcome, c.err)
			}
			checkRecord(t, "replayed record", c.res.Record, want)
		}},
		{"AcquireAfterRelease", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			done := e.waiter(time.Minute)
			wantErr(t, "Release", e.s.Release(e.ctx, tenant, "key", held.Lease.Token), nil)
			c := waitResult(t, done)
			if c.err != nil || c.res.Outcome != keys.Acquired {
				t.Fatalf("BeginWait = %v, %v; want acquired", c.res.Outcome, c.err)
			}
			checkFenceAbove(t, "waiter", c.res.Record.Lease.Fence, held.Lease.Fence)
			checkRecord(t, "acquired record", c.res.Record, inProgress("key", req, e.now(), c.res.Record.Lease.Token, c.res.Record.Lease.Fence))
		}},
		{"AcquireAfterDelete", func(t *testing.T) {
			e := s.env(t)
			e.acquire("key", req)
			done := e.waiter(time.Minute)
			wantErr(t, "Delete", e.s.Delete(e.ctx, tenant, "key"), nil)
			c := waitResult(t, done)
			if c.err != nil || c.res.Outcome != keys.Acquired {
				t.Fatalf("BeginWait = %v, %v; want acquired", c.res.Outcome, c.err)
			}
		}},
		{"TakeOverAfterLeaseExpiry", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			done := e.waiter(time.Minute)
			e.advanceTo(held.Lease.ExpiresAt) // not signalled: the waiter times the lease itself
			c := waitResult(t, done)
			if c.err != nil || c.res.Outcome != keys.TakenOver {
				t.Fatalf("BeginWait = %v, %v; want takeover", c.res.Outcome, c.err)
			}
			checkFenceAbove(t, "waiter", c.res.Record.Lease.Fence, held.Lease.Fence)
		}},
		{"InProgressWhenWaitEnds", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			done := e.waiter(50 * time.Millisecond)
			c := waitResult(t, done)
			if !errors.Is(c.err, keys.ErrInProgress) {
				t.Fatalf("BeginWait = %v, %v; want ErrInProgress", c.res.Outcome, c.err)
			}
			checkRecord(t, "in-progress result", c.res.Record, held.Public())
		}},
	}
}

func (s *suite) reopenTests() []subtest {
	return []subtest{
		{"KeepsEverything", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("in-progress", req)
			e.clock.Advance(time.Second)
			held = e.renew("in-progress", held, 2*time.Minute) // the renewed lease must survive
			done := e.acquire("completed", req)
			resp := response("durable")
			resp.Body = append(resp.Body, make([]byte, 64<<10)...) // a large body too
			completed := e.complete("completed", done.Lease.Token, resp, 0)
			released := e.acquire("released", req)
			wantErr(t, "Release", e.s.Release(e.ctx, tenant, "released", released.Lease.Token), nil)
			deleted := e.acquire("deleted", req)
			wantErr(t, "Delete", e.s.Delete(e.ctx, tenant, "deleted"), nil)
			expiring := e.acquire("expiring", keys.BeginRequest{Fingerprint: fp, Lease: time.Second, TTL: time.Hour})
			e.clock.Advance(time.Second)

			e.s = e.f.Reopen(t, e.s, e.clock)

			e.wantRecord("in-progress", held.Public())
			e.wantRecord("completed", completed)
			e.wantReplay("completed", req, completed)
			e.wantGone("released")
			e.wantGone("deleted")
			e.wantBeginErr("in-progress", req, keys.ErrInProgress)
			// The holder's token still works after the reopen.
			got := e.complete("in-progress", held.Lease.Token, response("after"), 0)
			checkRecord(t, "completed after reopen", got, completedFrom(held, response("after"), e.now(), 0))
			// Each key's fences keep growing; the expiry index survived.
			for _, old := range []keys.Record{released, deleted} {
				next := e.acquire(old.Key, req)
				checkFenceAbove(t, "begin after reopen", next.Lease.Fence, old.Lease.Fence)
			}
			e.advanceTo(expiring.ExpiresAt)
			e.wantSweep(1)
			e.wantGone("expiring")
			next := e.acquire("expiring", req)
			checkFenceAbove(t, "begin after reopen", next.Lease.Fence, expiring.Lease.Fence)
			e.wantRecord("completed", completed)
		}},
		{"Twice", func(t *testing.T) {
			e := s.env(t)
			first := e.acquire("key", req)
			e.s = e.f.Reopen(t, e.s, e.clock)
			e.s = e.f.Reopen(t, e.s, e.clock)
			e.wantRecord("key", first.Public())
			e.advanceTo(first.Lease.ExpiresAt)
			next := e.takeOver("key", req)
			checkFenceAbove(t, "takeover after reopen", next.Lease.Fence, first.Lease.Fence)
		}},
	}
}

// renew renews held's lease to now+d, which must succeed, and returns the renewed record.
func (e *env) renew(key string, held keys.Record, d time.Duration) keys.Record {
	e.t.Helper()
	got, err := e.s.Renew(e.ctx, tenant, key, keys.RenewRequest{Token: held.Lease.Token, Lease: d})
	if err != nil {
		e.t.Fatalf("Renew(%q): %v", key, err)
	}
	want := held
	want.Lease.ExpiresAt = e.now().Add(d)
	checkRecord(e.t, "renewed record", got, want)
	return got
}

func (s *suite) closeTests() []subtest {
	return []subtest{
		{"ThenError", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			ch, stop := e.s.Watch(tenant, "key")
			defer stop()
			if err := e.s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			ctx := e.ctx
			calls := []struct {
				name string
				call func() error
			}{
				{"Begin", func() error { _, err := e.s.Begin(ctx, tenant, "key", req); return err }},
				{"Complete", func() error {
					_, err := e.s.Complete(ctx, tenant, "key", keys.CompleteRequest{Token: held.Lease.Token, Response: response("x")})
					return err
				}},
				{"Renew", func() error {
					_, err := e.s.Renew(ctx, tenant, "key", keys.RenewRequest{Token: held.Lease.Token, Lease: lease})
					return err
				}},
				{"Release", func() error { return e.s.Release(ctx, tenant, "key", held.Lease.Token) }},
				{"Get", func() error { _, err := e.s.Get(ctx, tenant, "key"); return err }},
				{"Delete", func() error { return e.s.Delete(ctx, tenant, "key") }},
				{"Sweep", func() error { _, err := e.s.Sweep(ctx, 10); return err }},
				{"Ping", func() error { return e.s.Ping(ctx) }},
			}
			for _, c := range calls {
				if err := c.call(); err == nil {
					t.Errorf("%s after Close: no error", c.name)
				}
			}
			_ = ch // a watch may or may not be woken by Close; it must not panic
			_, stop2 := e.s.Watch(tenant, "key")
			stop2()
		}},
	}
}

func (s *suite) pingTests() []subtest {
	return []subtest{
		{"OK", func(t *testing.T) {
			e := s.env(t)
			wantErr(t, "Ping", e.s.Ping(e.ctx), nil)
			e.acquire("key", req)
			wantErr(t, "Ping", e.s.Ping(e.ctx), nil)
		}},
	}
}
