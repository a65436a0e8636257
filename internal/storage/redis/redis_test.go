package redis

import (
	"context"
	"errors"
	"math"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

func TestConformance(t *testing.T) {
	url := redistest.URL(t)
	storagetest.Run(t, storagetest.Factory{
		Open: func(t *testing.T, clock *storagetest.Clock) keys.Store {
			return openTest(t, url, redistest.Prefix(t), clock.Now)
		},
		Reopen: func(t *testing.T, s keys.Store, clock *storagetest.Clock) keys.Store {
			prefix := s.(*Store).prefix
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			return openTest(t, url, prefix, clock.Now)
		},
		ExpiresItself: true,
	})
}

// openTest opens a store and closes it when the test ends.
func openTest(t testing.TB, url, prefix string, now func() time.Time) *Store {
	t.Helper()
	s, err := Open(context.Background(), url, Options{Prefix: prefix, Now: now})
	if err != nil {
		t.Fatalf("Open(%s): %v", url, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

var (
	testReq  = keys.BeginRequest{Fingerprint: "fp", Lease: 30 * time.Second, TTL: time.Hour}
	testResp = keys.Response{Status: 201, Headers: map[string][]string{"Content-Type": {"application/json"}}, Body: []byte(`{"id":42}`)}
)

// TestOneWinnerAcrossStores: 64 begins on one key through two Store instances (two replicas)
// on one Redis, for many keys: exactly one acquires each key, every other one sees it in
// progress, and after the winner completes every begin on either store replays its response.
func TestOneWinnerAcrossStores(t *testing.T) {
	url := redistest.URL(t)
	prefix := redistest.Prefix(t)
	oneWinnerAcrossStores(t, openTest(t, url, prefix, nil), openTest(t, url, prefix, nil))
}

// conformanceOn runs the conformance suite, oneWinnerAcrossStores and watchAcrossStores on the
// Redis of two URLs (a cluster's or Sentinel's, each given a different way in): a store opened on
// the first and reopened on the second, and two stores of one prefix, one on each.
func conformanceOn(t *testing.T, urls []string) {
	storagetest.Run(t, storagetest.Factory{
		Open: func(t *testing.T, clock *storagetest.Clock) keys.Store {
			return openTest(t, urls[0], "idemtest-"+keys.NewToken(), clock.Now)
		},
		Reopen: func(t *testing.T, s keys.Store, clock *storagetest.Clock) keys.Store {
			prefix := s.(*Store).prefix
			if err := s.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			return openTest(t, urls[1], prefix, clock.Now)
		},
		ExpiresItself: true,
	})
	t.Run("OneWinnerAcrossStores", func(t *testing.T) {
		prefix := "idemtest-" + keys.NewToken()
		oneWinnerAcrossStores(t, openTest(t, urls[0], prefix, nil), openTest(t, urls[1], prefix, nil))
	})
	t.Run("WatchAcrossStores", func(t *testing.T) {
		prefix := "idemtest-" + keys.NewToken()
		watchAcrossStores(t, openTest(t, urls[0], prefix, nil), openTest(t, urls[1], prefix, nil))
	})
}

// oneWinnerAcrossStores is TestOneWinnerAcrossStores on two given stores of one prefix.
func oneWinnerAcrossStores(t *testing.T, a, b *Store) {
	stores := [2]*Store{a, b}
	ctx := t.Context()
	for k := range 20 {
		key := "key-" + string(rune('a'+k))
		var (
			mu      sync.Mutex
			winners []keys.BeginResult
			wg      sync.WaitGroup
		)
		start := make(chan struct{})
		for i := range 64 {
			wg.Go(func() {
				<-start
				res, err := stores[i%2].Begin(ctx, "tenant", key, testReq)
				switch {
				case err == nil && res.Outcome == keys.Acquired:
					mu.Lock()
					winners = append(winners, res)
					mu.Unlock()
				case errors.Is(err, keys.ErrInProgress):
				default:
					t.Errorf("Begin(%q) = %v, %v; want acquired or ErrInProgress", key, res.Outcome, err)
				}
			})
		}
		close(start)
		wg.Wait()
		if len(winners) != 1 {
			t.Fatalf("key %q: %d begins acquired, want exactly 1", key, len(winners))
		}
		won := winners[0].Record
		if _, err := stores[1].Complete(ctx, "tenant", key, keys.CompleteRequest{Token: won.Lease.Token, Response: testResp}); err != nil {
			t.Fatalf("Complete(%q): %v", key, err)
		}
		for i, s := range stores {
			res, err := s.Begin(ctx, "tenant", key, testReq)
			if err != nil || res.Outcome != keys.Replayed || !keys.SameResponse(res.Record.Response, &testResp) {
				t.Errorf("store %d: Begin(%q) after complete = %v, %v; want the response replayed", i, key, res.Outcome, err)
			}
		}
	}
}

// TestWatchAcrossStores: a watcher on store B is woken when store A completes, releases or
// deletes, and the delay is reported.
func TestWatchAcrossStores(t *testing.T) {
	url := redistest.URL(t)
	prefix := redistest.Prefix(t)
	watchAcrossStores(t, openTest(t, url, prefix, nil), openTest(t, url, prefix, nil))
}

// watchAcrossStores is TestWatchAcrossStores on two given stores of one prefix.
func watchAcrossStores(t *testing.T, a, b *Store) {
	ctx := t.Context()
	for _, tc := range []struct {
		name   string
		change func(key string, held keys.Record) error
	}{
		{"Complete", func(key string, held keys.Record) error {
			_, err := a.Complete(ctx, "t", key, keys.CompleteRequest{Token: held.Lease.Token, Response: testResp})
			return err
		}},
		{"Release", func(key string, held keys.Record) error { return a.Release(ctx, "t", key, held.Lease.Token) }},
		{"Delete", func(key string, held keys.Record) error { return a.Delete(ctx, "t", key) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := "watch-" + tc.name
			res, err := a.Begin(ctx, "t", key, testReq)
			if err != nil {
				t.Fatal(err)
			}
			changed, stop := b.Watch("t", key)
			defer stop()
			select {
			case <-changed:
				t.Fatal("woken before any change")
			case <-time.After(50 * time.Millisecond):
			}
			start := time.Now()
			if err := tc.change(key, res.Record); err != nil {
				t.Fatal(err)
			}
			select {
			case <-changed:
				t.Logf("woken %v after the change returned on the other store", time.Since(start))
			case <-time.After(200 * time.Millisecond):
				// Within keys.BeginWait's 250ms poll a missed message would go unnoticed:
				// fail well below it.
				t.Fatal("the watcher on the other store was not woken within 200ms")
			}
		})
	}
	t.Run("RenewDoesNotWake", func(t *testing.T) {
		res, err := a.Begin(ctx, "t", "renewed", testReq)
		if err != nil {
			t.Fatal(err)
		}
		changed, stop := b.Watch("t", "renewed")
		defer stop()
		if _, err := a.Renew(ctx, "t", "renewed", keys.RenewRequest{Token: res.Record.Lease.Token, Lease: time.Minute}); err != nil {
			t.Fatal(err)
		}
		select {
		case <-changed:
			t.Error("a renew woke the watcher")
		case <-time.After(100 * time.Millisecond):
		}
	})
}

// TestBeginWaitAcrossStores: a waiter on B acquires promptly when the holder on A releases.
func TestBeginWaitAcrossStores(t *testing.T) {
	url := redistest.URL(t)
	prefix := redistest.Prefix(t)
	a, b := openTest(t, url, prefix, nil), openTest(t, url, prefix, nil)
	ctx := t.Context()
	held, err := a.Begin(ctx, "t", "key", testReq)
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		res keys.BeginResult
		err error
		at  time.Time
	}
	done := make(chan result, 1)
	go func() {
		res, err := keys.BeginWait(ctx, b, time.Now, "t", "key", testReq, 10*time.Second)
		done <- result{res, err, time.Now()}
	}()
	time.Sleep(100 * time.Millisecond) // let the waiter wait
	released := time.Now()
	if err := a.Release(ctx, "t", "key", held.Record.Lease.Token); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil || r.res.Outcome != keys.Acquired {
		t.Fatalf("BeginWait = %v, %v; want acquired", r.res.Outcome, r.err)
	}
	if r.res.Record.Lease.Fence <= held.Record.Lease.Fence {
		t.Errorf("fence %d, want above %d", r.res.Record.Lease.Fence, held.Record.Lease.Fence)
	}
	t.Logf("the waiter acquired %v after the release", r.at.Sub(released))
}

func TestNames(t *testing.T) {
	s := &Store{prefix: "idem"}
	for _, tc := range []struct {
		name, tenant, key, want string
	}{
		{"Plain", "default", "order-1", "idem:{%07defaultorder-1}:r"},
		{"Braces", "t", "a{b}c", "idem:{%01ta%7Bb%7Dc}:r"},
		{"Percent", "t", "100%", "idem:{%01t100%25}:r"},
		{"Bytes", "acme", "c d\xff", "idem:{%04acmec%20d%FF}:r"},
		{"Long", "t", strings.Repeat("k", 300), "idem:{%01t" + strings.Repeat("k", 300) + "}:r"}, // past names' scratch
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := s.names(tc.tenant, tc.key)
			if n.rec != tc.want {
				t.Errorf("record key %q, want %q", n.rec, tc.want)
			}
			// Redis hashes the text between the first '{' and the next '}': one tag for all.
			tag := func(k string) string {
				i := strings.IndexByte(k, '{')
				return k[i : i+strings.IndexByte(k[i:], '}')]
			}
			if tag(n.fence) != tag(n.rec) || tag(n.channel) != tag(n.rec) {
				t.Errorf("hash tags differ: %q %q %q", n.rec, n.fence, n.channel)
			}
		})
	}
}

func TestBadPrefix(t *testing.T) {
	if s, err := Open(t.Context(), "redis://127.0.0.1:1", Options{Prefix: "a{b"}); err == nil {
		s.Close()
		t.Error("Open with a prefix holding '{' succeeded")
	}
}

// TestRedisExpiry: with Redis's own clock, the record key carries the record's expiry and the
// fence counter outlives it.
func TestRedisExpiry(t *testing.T) {
	url := redistest.URL(t)
	s := openTest(t, url, redistest.Prefix(t), nil)
	res, err := s.Begin(t.Context(), "t", "key", keys.BeginRequest{Lease: time.Second, TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	c, err := s.d.(*rueidisDriver).client(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	n := s.names("t", "key")
	expiry := func(k string) time.Time {
		ms, err := c.Do(t.Context(), c.B().Pexpiretime().Key(k).Build()).AsInt64()
		if err != nil || ms < 0 {
			t.Fatalf("PEXPIRETIME %s = %d, %v", k, ms, err)
		}
		return time.UnixMilli(ms)
	}
	want := res.Record.ExpiresAt
	if got := expiry(n.rec); got.Before(want) || got.After(want.Add(time.Millisecond)) {
		t.Errorf("record expires in Redis at %v, want %v (rounded up to the ms)", got, want)
	}
	if got := expiry(n.fence); got.Before(want.Add(fenceMargin)) {
		t.Errorf("fence counter expires at %v, want at least %v", got, want.Add(fenceMargin))
	}
	// A delete keeps the counter; the next lease's fence is larger.
	if err := s.Delete(t.Context(), "t", "key"); err != nil {
		t.Fatal(err)
	}
	expiry(n.fence)
	next, err := s.Begin(t.Context(), "t", "key", testReq)
	if err != nil || next.Record.Lease.Fence <= res.Record.Lease.Fence {
		t.Fatalf("Begin after delete: fence %d, %v; want above %d", next.Record.Lease.Fence, err, res.Record.Lease.Fence)
	}
}

func TestDecimals(t *testing.T) {
	vs := []int64{0, -1, 1764244800123456, math.MaxInt64, math.MinInt64, 42}
	got := make([]string, len(vs))
	decimals(got, vs...)
	for i, v := range vs {
		if want := strconv.FormatInt(v, 10); got[i] != want {
			t.Errorf("decimals[%d] = %q, want %q", i, got[i], want)
		}
	}
}
