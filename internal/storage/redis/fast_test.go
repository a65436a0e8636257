package redis

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

// The fast paths: begin in one round trip on an absent key, and complete, renew and release in
// one when the same Store did the begin. These tests count the scripts each operation runs and
// make the clock estimate and the cache wrong on purpose.

// countingDriver counts the scripts a Store runs, and the fast paths that missed because Redis's
// clock was too far from the estimate (a goroutine descheduled for longer than clockBehind between
// taking the estimate and the script's run, say, on a loaded machine).
type countingDriver struct {
	driver
	reads, cases, begins, dels, clockMisses atomic.Int64
}

func (d *countingDriver) read(ctx context.Context, key string) (reply, error) {
	d.reads.Add(1)
	return d.driver.read(ctx, key)
}

func (d *countingDriver) cas(ctx context.Context, keys [2]string, args []string) (reply, error) {
	d.cases.Add(1)
	r, err := d.driver.cas(ctx, keys, args)
	d.clockMissed(r, err, args[9:12])
	return r, err
}

func (d *countingDriver) begin(ctx context.Context, keys [2]string, args []string) (reply, error) {
	d.begins.Add(1)
	r, err := d.driver.begin(ctx, keys, args)
	if !r.exists { // else it found a record: no fast path to miss
		d.clockMissed(r, err, args[4:7])
	}
	return r, err
}

// clockMissed counts a write that the script refused for the clock: est, ahead, behind are its
// arguments (µs; est is empty for a write decided on a read).
func (d *countingDriver) clockMissed(r reply, err error, check []string) {
	if err != nil || r.wrote || check[0] == "" {
		return
	}
	est, _ := strconv.ParseInt(check[0], 10, 64)
	ahead, _ := strconv.ParseInt(check[1], 10, 64)
	behind, _ := strconv.ParseInt(check[2], 10, 64)
	if now := r.sec*1_000_000 + r.usec; now < est-ahead || now > est+behind {
		d.clockMisses.Add(1)
	}
}

func (d *countingDriver) del(ctx context.Context, key, channel, notAfter string) (reply, error) {
	d.dels.Add(1)
	return d.driver.del(ctx, key, channel, notAfter)
}

// counts is what the driver counted since the last call, as "reads/cas/begins", and how many
// fast paths missed for the clock.
func (d *countingDriver) counts() (string, int64) {
	return fmt.Sprintf("%d/%d/%d", d.reads.Swap(0), d.cases.Swap(0), d.begins.Swap(0)), d.clockMisses.Swap(0)
}

// want checks the counts since the last call. When a fast path missed for the clock, the counts
// show its fallback instead: want then reports false and checks nothing.
func (d *countingDriver) want(t testing.TB, what, want string) bool {
	t.Helper()
	got, missed := d.counts()
	if missed > 0 {
		t.Logf("%s: %d fast path(s) missed for the clock (ran %s scripts); not checked", what, missed, got)
		return false
	}
	if got != want {
		t.Errorf("%s ran %s scripts (reads/cas/begins), want %s", what, got, want)
	}
	return true
}

func (d *countingDriver) total() int64 {
	return d.reads.Load() + d.cases.Load() + d.begins.Load() + d.dels.Load()
}

// counted opens a store whose scripts are counted.
func counted(t testing.TB, url, prefix string, now func() time.Time) (*Store, *countingDriver) {
	s := openTest(t, url, prefix, now)
	d := &countingDriver{driver: s.d}
	s.d = d
	return s, d
}

// redisTime reads Redis's clock.
func redisTime(t *testing.T, s *Store) time.Time {
	t.Helper()
	sec, usec, err := s.d.time(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return time.Unix(sec, usec*1000).UTC()
}

// wantWithin checks that got lies in [lo, hi].
func wantWithin(t *testing.T, what string, got, lo, hi time.Time) {
	t.Helper()
	if got.Before(lo) || got.After(hi) {
		t.Errorf("%s = %v, want within [%v, %v] (Redis's clock around the call)", what, got, lo, hi)
	}
}

// TestFastPathRoundTrips: on a fresh key, begin and complete take one script each; a replay
// one; renew and release of a lease begun here one each; with Redis's clock and with a fake one.
func TestFastPathRoundTrips(t *testing.T) {
	url := redistest.URL(t)
	for _, fake := range []bool{false, true} {
		t.Run("fake="+strconv.FormatBool(fake), func(t *testing.T) {
			var now func() time.Time
			if fake {
				now = storagetest.NewClock(storagetest.Start).Now
			}
			s, d := counted(t, url, redistest.Prefix(t), now)
			ctx := t.Context()
			steps, checked := 0, 0
			step := func(what, want string) {
				t.Helper()
				steps++
				if d.want(t, what, want) {
					checked++
				}
			}
			defer func() {
				if checked < steps*3/4 {
					t.Errorf("only %d of %d steps without a clock miss", checked, steps)
				}
			}()
			for i := range 20 { // not just once: the estimate must stay good
				key := "pair-" + strconv.Itoa(i)
				res, err := s.Begin(ctx, "t", key, testReq)
				if err != nil || res.Outcome != keys.Acquired {
					t.Fatalf("Begin = %v, %v", res.Outcome, err)
				}
				step("Begin on an absent key", "0/0/1")
				req := keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp}
				rec, err := s.Complete(ctx, "t", key, req)
				if err != nil || rec.State != keys.StateCompleted {
					t.Fatalf("Complete = %v, %v", rec.State, err)
				}
				step("Complete of a lease begun here", "0/1/0")
				res, err = s.Begin(ctx, "t", key, testReq)
				if err != nil || res.Outcome != keys.Replayed || !keys.SameResponse(res.Record.Response, &testResp) {
					t.Fatalf("Begin after complete = %v, %v; want the response replayed", res.Outcome, err)
				}
				step("Begin that replays", "0/0/1")
				if _, err := s.Complete(ctx, "t", key, req); err != nil {
					t.Fatalf("the same Complete again: %v", err)
				}
				step("the same Complete again", "1/0/0")
			}
			res, err := s.Begin(ctx, "t", "held", testReq)
			if err != nil {
				t.Fatal(err)
			}
			step("Begin", "0/0/1")
			if _, err := s.Begin(ctx, "t", "held", testReq); !errors.Is(err, keys.ErrInProgress) {
				t.Fatalf("second Begin: %v, want ErrInProgress", err)
			}
			step("Begin in progress", "0/0/1")
			renewed, err := s.Renew(ctx, "t", "held", keys.RenewRequest{Token: res.Record.Lease.Token, Lease: time.Minute})
			if err != nil {
				t.Fatal(err)
			}
			step("Renew", "0/1/0")
			if renewed.Lease.Fence != res.Record.Lease.Fence || renewed.Lease.Token != res.Record.Lease.Token {
				t.Errorf("Renew changed the lease: %+v, was %+v", renewed.Lease, res.Record.Lease)
			}
			if got, err := s.Get(ctx, "t", "held"); err != nil || !got.Lease.ExpiresAt.Equal(renewed.Lease.ExpiresAt) {
				t.Errorf("Get after Renew: lease ends %v, %v; want %v", got.Lease.ExpiresAt, err, renewed.Lease.ExpiresAt)
			}
			step("Get", "1/0/0")
			if _, err := s.Renew(ctx, "t", "held", keys.RenewRequest{Token: res.Record.Lease.Token, Lease: time.Minute}); err != nil {
				t.Fatal(err)
			}
			step("Renew again (on the renewed value)", "0/1/0")
			if err := s.Release(ctx, "t", "held", res.Record.Lease.Token); err != nil {
				t.Fatal(err)
			}
			step("Release", "0/1/0")
			if _, err := s.Get(ctx, "t", "held"); !errors.Is(err, keys.ErrNotFound) {
				t.Errorf("Get after Release: %v, want ErrNotFound", err)
			}
			if n := s.cache.len(); n != 0 {
				t.Errorf("%d values cached after every lease ended, want none", n)
			}
		})
	}
}

// TestStaleClockEstimate: with the estimate of Redis's clock far off either way, begin and
// complete fall back to Redis's own clock, write the right times, and the estimate recovers.
func TestStaleClockEstimate(t *testing.T) {
	s, d := counted(t, redistest.URL(t), redistest.Prefix(t), nil)
	ctx := t.Context()
	for _, skew := range []time.Duration{10 * time.Minute, -10 * time.Minute, clockAhead + 100*time.Millisecond, -clockBehind - 10*time.Millisecond} {
		t.Run(skew.String(), func(t *testing.T) {
			key := "skew" + skew.String()
			s.clock.offset.Add(int64(skew))
			before := redisTime(t, s)
			res, err := s.Begin(ctx, "t", key, testReq)
			after := redisTime(t, s)
			if err != nil || res.Outcome != keys.Acquired {
				t.Fatalf("Begin = %v, %v", res.Outcome, err)
			}
			if got, missed := d.counts(); got != "0/1/1" || missed != 1 {
				t.Errorf("Begin with a bad estimate ran %s scripts (reads/cas/begins), %d missed for the clock; want 0/1/1, 1: the fast one, then the compare-and-set", got, missed)
			}
			wantWithin(t, "created_at", res.Record.CreatedAt, before, after)
			wantWithin(t, "lease.expires_at", res.Record.Lease.ExpiresAt, before.Add(testReq.Lease), after.Add(testReq.Lease))
			if res.Record.Lease.Fence > uint64(after.UnixMicro()) {
				t.Errorf("fence %d is above Redis's clock at the write (%d µs)", res.Record.Lease.Fence, after.UnixMicro())
			}
			if got, err := s.Get(ctx, "t", key); err != nil || !got.CreatedAt.Equal(res.Record.CreatedAt) {
				t.Errorf("Get = created %v, %v; want %v", got.CreatedAt, err, res.Record.CreatedAt)
			}
			d.counts()

			s.clock.offset.Add(int64(skew))
			req := keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp}
			before = redisTime(t, s)
			rec, err := s.Complete(ctx, "t", key, req)
			after = redisTime(t, s)
			if err != nil || rec.State != keys.StateCompleted {
				t.Fatalf("Complete = %v, %v", rec.State, err)
			}
			if got, missed := d.counts(); got != "0/2/0" || missed != 1 {
				t.Errorf("Complete with a bad estimate ran %s scripts, %d missed for the clock; want 0/2/0, 1: the fast one, then the compare-and-set", got, missed)
			}
			wantWithin(t, "completed_at", rec.CompletedAt, before, after)
			wantWithin(t, "expires_at", rec.ExpiresAt, before.Add(testReq.TTL), after.Add(testReq.TTL))

			// The replies put the estimate right: the next pair is fast again.
			res, err = s.Begin(ctx, "t", key+"-next", testReq)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.Complete(ctx, "t", key+"-next", keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp}); err != nil {
				t.Fatal(err)
			}
			d.want(t, "the next begin+complete", "0/1/1")
		})
	}
}

// TestStaleCache: when another replica changed a record after this Store cached it, complete,
// renew and release fall back (the reply of the failed compare-and-set serving as the read)
// and answer what the record now says.
func TestStaleCache(t *testing.T) {
	url, prefix := redistest.URL(t), redistest.Prefix(t)
	a, da := counted(t, url, prefix, nil)
	b := openTest(t, url, prefix, nil)
	ctx := t.Context()
	begin := func(key string) keys.Record {
		t.Helper()
		res, err := a.Begin(ctx, "t", key, testReq)
		if err != nil {
			t.Fatal(err)
		}
		da.counts()
		return res.Record
	}
	want := func(what, counts string) {
		t.Helper()
		if got, _ := da.counts(); got != counts {
			t.Errorf("%s ran %s scripts (reads/cas/begins), want %s", what, got, counts)
		}
	}

	// B takes the key over: A's holder has lost its lease.
	held := begin("taken")
	if err := b.Release(ctx, "t", "taken", held.Lease.Token); err != nil {
		t.Fatal(err)
	}
	other, err := b.Begin(ctx, "t", "taken", testReq)
	if err != nil {
		t.Fatal(err)
	}
	req := keys.CompleteRequest{Token: held.Lease.Token, Response: testResp}
	if _, err := a.Complete(ctx, "t", "taken", req); !errors.Is(err, keys.ErrLeaseLost) {
		t.Errorf("Complete by the old holder: %v, want ErrLeaseLost", err)
	}
	want("Complete with a stale cache, lease lost", "0/1/0")
	if _, err := a.Renew(ctx, "t", "taken", keys.RenewRequest{Token: held.Lease.Token, Lease: time.Minute}); !errors.Is(err, keys.ErrLeaseLost) {
		t.Errorf("Renew by the old holder: %v, want ErrLeaseLost", err)
	}
	if err := a.Release(ctx, "t", "taken", held.Lease.Token); !errors.Is(err, keys.ErrLeaseLost) {
		t.Errorf("Release by the old holder: %v, want ErrLeaseLost", err)
	}
	if got, err := a.Get(ctx, "t", "taken"); err != nil || got.Lease.Fence != other.Record.Lease.Fence {
		t.Errorf("Get = fence %d, %v; want B's lease, fence %d", got.Lease.Fence, err, other.Record.Lease.Fence)
	}
	if other.Record.Lease.Fence <= held.Lease.Fence {
		t.Errorf("B's fence %d, want above A's %d", other.Record.Lease.Fence, held.Lease.Fence)
	}
	da.counts()

	// B renews A's lease (the holder renewing through another replica): A's complete then
	// writes on the renewed record.
	held = begin("renewed")
	renewed, err := b.Renew(ctx, "t", "renewed", keys.RenewRequest{Token: held.Lease.Token, Lease: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	rec, err := a.Complete(ctx, "t", "renewed", keys.CompleteRequest{Token: held.Lease.Token, Response: testResp})
	if err != nil || rec.State != keys.StateCompleted || !rec.Lease.ExpiresAt.Equal(renewed.Lease.ExpiresAt) {
		t.Fatalf("Complete after a renew elsewhere = %v (lease ends %v), %v; want completed, lease ending %v",
			rec.State, rec.Lease.ExpiresAt, err, renewed.Lease.ExpiresAt)
	}
	want("Complete with a stale cache that succeeds", "0/2/0")

	// B completes first with the same response: A's complete is the same complete again.
	held = begin("completed")
	req = keys.CompleteRequest{Token: held.Lease.Token, Response: testResp}
	first, err := b.Complete(ctx, "t", "completed", req)
	if err != nil {
		t.Fatal(err)
	}
	rec, err = a.Complete(ctx, "t", "completed", req)
	if err != nil || !rec.CompletedAt.Equal(first.CompletedAt) {
		t.Errorf("the same Complete on A = completed at %v, %v; want B's record, %v", rec.CompletedAt, err, first.CompletedAt)
	}
	want("Complete already done elsewhere", "0/1/0")
	req.Response.Status = 500
	if _, err := a.Complete(ctx, "t", "completed", req); !errors.Is(err, keys.ErrAlreadyCompleted) {
		t.Errorf("another Complete: %v, want ErrAlreadyCompleted", err)
	}

	// B deletes it: A's complete finds nothing.
	held = begin("deleted")
	if err := b.Delete(ctx, "t", "deleted"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Complete(ctx, "t", "deleted", keys.CompleteRequest{Token: held.Lease.Token, Response: testResp}); !errors.Is(err, keys.ErrNotFound) {
		t.Errorf("Complete after a delete elsewhere: %v, want ErrNotFound", err)
	}
	want("Complete after a delete elsewhere", "0/1/0")

	// A cached value that does not decode (it cannot happen; it must not matter): read instead.
	held = begin("garbage")
	a.cache.put(a.names("t", "garbage").rec, "not a value")
	if _, err := a.Complete(ctx, "t", "garbage", keys.CompleteRequest{Token: held.Lease.Token, Response: testResp}); err != nil {
		t.Errorf("Complete with a garbled cache entry: %v", err)
	}
	want("Complete with a garbled cache entry", "1/1/0")
}

// TestFencesGrowFast: fences grow across release, delete and takeover when every begin,
// release and complete takes its fast path, on one store and across two.
func TestFencesGrowFast(t *testing.T) {
	url, prefix := redistest.URL(t), redistest.Prefix(t)
	a, da := counted(t, url, prefix, nil)
	b := openTest(t, url, prefix, nil)
	ctx := t.Context()
	var last uint64
	acquire := func(s *Store, what string) keys.Record {
		t.Helper()
		res, err := s.Begin(ctx, "t", "key", testReq)
		if err != nil || res.Outcome == keys.Replayed {
			t.Fatalf("%s: Begin = %v, %v", what, res.Outcome, err)
		}
		if res.Record.Lease.Fence <= last {
			t.Fatalf("%s: fence %d, want above %d", what, res.Record.Lease.Fence, last)
		}
		last = res.Record.Lease.Fence
		return res.Record
	}
	for i := range 5 {
		held := acquire(a, "begin")
		if err := a.Release(ctx, "t", "key", held.Lease.Token); err != nil {
			t.Fatal(err)
		}
		acquire(a, "after release")
		if err := a.Delete(ctx, "t", "key"); err != nil {
			t.Fatal(err)
		}
		held = acquire(a, "after delete")
		if err := b.Release(ctx, "t", "key", held.Lease.Token); err != nil {
			t.Fatal(err)
		}
		acquire(b, "on the other store after release")
		if err := b.Delete(ctx, "t", "key"); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			// On A: 3 fast begins, a fast release, a delete, and the release on B (no script on A).
			da.want(t, "A's 3 begins and release", "0/1/3")
		}
	}
	// A lease that was taken over: a short one, run out on Redis's clock.
	res, err := a.Begin(ctx, "t", "short", keys.BeginRequest{Lease: 5 * time.Millisecond, TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	taken, err := b.Begin(ctx, "t", "short", testReq)
	if err != nil || taken.Outcome != keys.TakenOver || taken.Record.Lease.Fence <= res.Record.Lease.Fence {
		t.Fatalf("takeover = %v fence %d, %v; want taken over with a fence above %d", taken.Outcome, taken.Record.Lease.Fence, err, res.Record.Lease.Fence)
	}
	if _, err := a.Complete(ctx, "t", "short", keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp}); !errors.Is(err, keys.ErrLeaseLost) {
		t.Errorf("Complete by the holder taken over: %v, want ErrLeaseLost", err)
	}
}

// TestSteady: a decision made ahead is only taken when no time the rules compare with lies
// within the estimate's tolerance; else the store reads. With a fake clock the window can be
// hit exactly.
func TestSteady(t *testing.T) {
	clock := storagetest.NewClock(storagetest.Start)
	s, d := counted(t, redistest.URL(t), redistest.Prefix(t), clock.Now)
	ctx := t.Context()
	for _, tc := range []struct {
		name  string
		at    func(held keys.Record) time.Time // where to put the clock before completing
		reads string
	}{
		{"FarFromExpiry", func(h keys.Record) time.Time { return h.CreatedAt }, "0/1/0"},
		{"JustBeforeExpiry", func(h keys.Record) time.Time { return h.ExpiresAt.Add(-clockBehind) }, "1/1/0"},
		{"WellBeforeLeaseEnd", func(h keys.Record) time.Time { return h.Lease.ExpiresAt.Add(-clockBehind - time.Millisecond) }, "0/1/0"},
		{"JustBeforeLeaseEnd", func(h keys.Record) time.Time { return h.Lease.ExpiresAt.Add(-time.Millisecond) }, "1/1/0"},
		{"JustAfterLeaseEnd", func(h keys.Record) time.Time { return h.Lease.ExpiresAt.Add(clockAhead / 2) }, "1/1/0"},
		{"WellAfterLeaseEnd", func(h keys.Record) time.Time { return h.Lease.ExpiresAt.Add(2 * clockAhead) }, "0/1/0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := "steady-" + tc.name
			res, err := s.Begin(ctx, "t", key, testReq)
			if err != nil {
				t.Fatal(err)
			}
			held := res.Record
			clock.Advance(tc.at(held).Sub(clock.Now()))
			d.counts()
			rec, err := s.Complete(ctx, "t", key, keys.CompleteRequest{Token: held.Lease.Token, Response: testResp})
			if err != nil || !rec.CompletedAt.Equal(clock.Now()) {
				t.Fatalf("Complete = completed at %v, %v; want %v", rec.CompletedAt, err, clock.Now())
			}
			if tc.reads == "0/1/0" {
				d.want(t, "Complete", tc.reads)
			} else if got, _ := d.counts(); got != tc.reads {
				t.Errorf("Complete ran %s scripts (reads/cas/begins), want %s", got, tc.reads)
			}
		})
	}
	// Past the expiry the cached record says "not found": never answered from the cache.
	res, err := s.Begin(ctx, "t", "gone", testReq)
	if err != nil {
		t.Fatal(err)
	}
	clock.Advance(res.Record.ExpiresAt.Sub(clock.Now()) + time.Second)
	d.counts()
	if _, err := s.Complete(ctx, "t", "gone", keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp}); !errors.Is(err, keys.ErrNotFound) {
		t.Errorf("Complete past the expiry: %v, want ErrNotFound", err)
	}
	if got, _ := d.counts(); got != "1/0/0" {
		t.Errorf("Complete past the expiry ran %s scripts, want a read only", got)
	}
}

// TestRedisClockEstimate: the estimate trails Redis's clock by little, and a reply whose TIME
// contradicts it puts it right.
func TestRedisClockEstimate(t *testing.T) {
	s := openTest(t, redistest.URL(t), redistest.Prefix(t), nil)
	est, ok := s.clock.now()
	if !ok {
		t.Fatal("no estimate after Open")
	}
	if rt := redisTime(t, s); est.After(rt) || rt.Sub(est) > 50*time.Millisecond {
		t.Errorf("estimate %v, Redis's clock just after %v: want a little behind", est, rt)
	}
	c := newRedisClock()
	base := time.Unix(1_800_000_000, 0)
	sent := time.Now()
	c.observe(sent, sent.Add(time.Millisecond), base)
	got, _ := c.now()
	if d := got.Sub(base); d < -time.Millisecond || d > 100*time.Millisecond {
		t.Errorf("estimate %v after one reply, want about %v", got, base)
	}
	// A later reply whose TIME is an hour behind (Redis's clock stepped back): start again.
	sent = time.Now()
	c.observe(sent, sent, base.Add(-time.Hour))
	got, _ = c.now()
	if d := got.Sub(base.Add(-time.Hour)); d < 0 || d > 100*time.Millisecond {
		t.Errorf("estimate %v after Redis's clock stepped back, want about %v", got, base.Add(-time.Hour))
	}
	// A reply that took long says little: it does not lower the estimate.
	before, _ := c.now()
	sent = time.Now()
	c.observe(sent.Add(-time.Second), sent.Add(time.Second), base.Add(-time.Hour))
	after, _ := c.now()
	if after.Before(before) {
		t.Errorf("a slow reply lowered the estimate from %v to %v", before, after)
	}
}

func TestValueCacheBounded(t *testing.T) {
	c := newValueCache()
	const max = cacheShards * cacheShardSize
	for i := range 3 * max {
		c.put("k"+strconv.Itoa(i), "v")
	}
	if n := c.len(); n > max || n < max*9/10 {
		t.Errorf("%d entries after %d puts, want at most %d (and about as many)", n, 3*max, max)
	}
	c.put("x", "1")
	c.put("x", "2")
	if v, ok := c.get("x"); !ok || v != "2" {
		t.Errorf("get = %q, %v; want the latest put", v, ok)
	}
	c.drop("x")
	if _, ok := c.get("x"); ok {
		t.Error("get after drop found it")
	}
}

// TestBeginChoosesByWhatItFinds: a Store whose begins keep finding stored keys (replays) reads
// first, a script without the record it would write; once absent keys come back, it decides
// ahead again.
func TestBeginChoosesByWhatItFinds(t *testing.T) {
	s, d := counted(t, redistest.URL(t), redistest.Prefix(t), nil)
	ctx := t.Context()
	res, err := s.Begin(ctx, "t", "done", testReq)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Complete(ctx, "t", "done", keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp}); err != nil {
		t.Fatal(err)
	}
	replay := func() {
		t.Helper()
		if res, err := s.Begin(ctx, "t", "done", testReq); err != nil || res.Outcome != keys.Replayed {
			t.Fatalf("Begin = %v, %v; want a replay", res.Outcome, err)
		}
	}
	// One absent key so far: the score is freshUp, and freshUp*4+1 replays take it to
	// -3*freshUp-1; then it takes 4 absent keys to be positive again.
	for range freshUp * 4 {
		replay()
	}
	d.counts()
	replay()
	d.want(t, "a replay after many", "1/0/0")
	for i := range 4 {
		key := "new-" + strconv.Itoa(i)
		if _, err := s.Begin(ctx, "t", key, testReq); err != nil {
			t.Fatal(err)
		}
	}
	d.counts()
	if _, err := s.Begin(ctx, "t", "new-more", testReq); err != nil {
		t.Fatal(err)
	}
	d.want(t, "a begin on an absent key after absent ones again", "0/0/1")
}

// TestDecodedCacheFollowsOtherReplicas: replica A replays a key from the decoding it cached;
// replica B deletes the key and completes it again with another response; A's next reads show
// B's response, because an entry serves only the very bytes it decoded.
func TestDecodedCacheFollowsOtherReplicas(t *testing.T) {
	url, prefix := redistest.URL(t), redistest.Prefix(t)
	a := openTest(t, url, prefix, nil)
	b := openTest(t, url, prefix, nil)
	ctx := t.Context()
	pair := func(s *Store, body string) {
		t.Helper()
		res, err := s.Begin(ctx, "t", "k", testReq)
		if err != nil || res.Outcome != keys.Acquired {
			t.Fatalf("begin: %v, %v", res.Outcome, err)
		}
		_, err = s.Complete(ctx, "t", "k", keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 200, Body: []byte(body)}})
		if err != nil {
			t.Fatal(err)
		}
	}
	replay := func(s *Store) string {
		t.Helper()
		res, err := s.Begin(ctx, "t", "k", testReq)
		if err != nil || res.Outcome != keys.Replayed {
			t.Fatalf("replay: %v, %v", res.Outcome, err)
		}
		rec, err := s.Get(ctx, "t", "k")
		if err != nil || string(rec.Response.Body) != string(res.Record.Response.Body) {
			t.Fatalf("get: %v, %v; the replay said %q", rec.Response, err, res.Record.Response.Body)
		}
		return string(res.Record.Response.Body)
	}

	pair(a, "first")
	for range 3 {
		if got := replay(a); got != "first" {
			t.Fatalf("A replays %q, want first", got)
		}
	}
	if a.decoded.get(a.names("t", "k").rec, mustRead(t, a)) == nil {
		t.Fatal("A's replays left no decoding in its cache")
	}
	if err := b.Delete(ctx, "t", "k"); err != nil {
		t.Fatal(err)
	}
	pair(b, "second")
	if got := replay(a); got != "second" {
		t.Fatalf("A replays %q after B completed the key again, want second", got)
	}
}

// mustRead returns the value stored for ("t", "k").
func mustRead(t *testing.T, s *Store) string {
	t.Helper()
	r, err := s.d.read(t.Context(), s.names("t", "k").rec)
	if err != nil || !r.exists {
		t.Fatalf("read: %v (exists %v)", err, r.exists)
	}
	return r.val
}

func TestDecodedCacheBounded(t *testing.T) {
	c := newDecodedCache()
	rec := &keys.Record{State: keys.StateCompleted}
	value := strings.Repeat("v", 1000)
	for i := range 10_000 {
		c.put("k"+strconv.Itoa(i), value+strconv.Itoa(i), rec)
	}
	total := 0
	for i := range c.shards {
		sh := &c.shards[i]
		if sh.bytes > decodedShardBytes {
			t.Errorf("shard %d holds %d bytes, more than %d", i, sh.bytes, decodedShardBytes)
		}
		n := 0
		for k, e := range sh.m {
			n += len(k) + len(e.raw)
		}
		if n != sh.bytes {
			t.Errorf("shard %d counts %d bytes, holds %d", i, sh.bytes, n)
		}
		total += n
	}
	if total < cacheShards*decodedShardBytes/2 {
		t.Errorf("%d bytes cached in all, want most of %d", total, cacheShards*decodedShardBytes)
	}
	c.put("x", "1", rec)
	if c.get("x", "2") != nil || c.get("x", "1") != rec {
		t.Error("an entry served another value than the one it decoded, or not its own")
	}
	c.put("x", "3", &keys.Record{State: keys.StateInProgress})
	if c.get("x", "3") != nil {
		t.Error("cached an in-progress record")
	}
}

// TestFenceFloorIsTheWritesTime: with the key's fence counter lost (a failover, the case the
// time floor is for), a lease begun after another still gets a larger fence when the replica's
// estimate of Redis's clock trails by up to clockBehind, which the fast path accepts. The floor
// was the decision time, 20 ms before the write here, and the fence went down (a review's find).
func TestFenceFloorIsTheWritesTime(t *testing.T) {
	url, prefix := redistest.URL(t), redistest.Prefix(t)
	a, b := openTest(t, url, prefix, nil), openTest(t, url, prefix, nil)
	ctx := t.Context()
	first, err := a.Begin(ctx, "t", "k", testReq)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx, "t", "k", first.Record.Lease.Token); err != nil {
		t.Fatal(err)
	}
	c, err := b.rd.client(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Do(ctx, c.B().Del().Key(b.names("t", "k").fence).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	b.clock.offset.Add(int64(-20 * time.Millisecond)) // b's estimate trails Redis's clock by 20 ms
	second, err := b.Begin(ctx, "t", "k", testReq)
	if err != nil || second.Outcome != keys.Acquired {
		t.Fatalf("Begin = %v, %v; want acquired", second.Outcome, err)
	}
	if second.Record.Lease.Fence <= first.Record.Lease.Fence {
		t.Errorf("fence %d after fence %d: fences must grow", second.Record.Lease.Fence, first.Record.Lease.Fence)
	}
}
