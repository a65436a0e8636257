package bolt

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// TestSweepAndBeginInOneCommit: a sweep and a begin of the key it removes share a transaction
// of the group commit, the sweep first. Once the begin is acknowledged, a get must find its
// record: the sweep's removal used to leave the swept record in the replay cache until the
// sweep dropped it after the commit, and a get in between answered not found. (Found by an
// audit: 200 of 200 rounds.)
func TestSweepAndBeginInOneCommit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	var mu sync.Mutex
	clock := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	var gate atomic.Pointer[chan struct{}]
	now := func() time.Time { // the first call after a gate is set waits for it
		if g := gate.Swap(nil); g != nil {
			<-*g
		}
		mu.Lock()
		defer mu.Unlock()
		return clock
	}
	advance := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{Now: now})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	hits, rounds := 0, 50
	for i := range rounds {
		key := fmt.Sprintf("k%d", i)
		res, err := s.Begin(ctx, "t", key, keys.BeginRequest{Fingerprint: "fp", Lease: time.Second, TTL: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Complete(ctx, "t", key, keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 200, Body: []byte("x")}}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Get(ctx, "t", key); err != nil { // fills the replay cache
			t.Fatal(err)
		}
		advance(2 * time.Second) // the completed record has expired

		// Hold the committer in a filler write, so that the sweep and then the begin queue up
		// and share the next transaction.
		g := make(chan struct{})
		gate.Store(&g)
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); _ = s.Delete(ctx, "t", "filler") }()
		time.Sleep(2 * time.Millisecond)
		go func() { defer wg.Done(); _, _ = s.Sweep(ctx, 1000) }()
		time.Sleep(2 * time.Millisecond)
		go func() { time.Sleep(2 * time.Millisecond); close(g) }()

		res2, err := s.Begin(ctx, "t", key, keys.BeginRequest{Fingerprint: "fp", Lease: time.Minute, TTL: time.Minute})
		if err != nil || res2.Outcome != keys.Acquired {
			t.Fatalf("begin: %v %v", res2.Outcome, err)
		}
		if _, err := s.Get(ctx, "t", key); errors.Is(err, keys.ErrNotFound) {
			hits++
		}
		wg.Wait()
	}
	if hits > 0 {
		t.Errorf("get answered not found for a record acquired just before, in %d of %d rounds", hits, rounds)
	}
}
