package bolt

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// pausingClock is a fake clock whose n-th call to now, counted from pause, blocks until
// release (reached is closed when it does): a way to hold the committer at a chosen point.
type pausingClock struct {
	mu      sync.Mutex
	t       time.Time
	left    int
	reached chan struct{}
	gate    chan struct{}
}

func (c *pausingClock) now() time.Time {
	c.mu.Lock()
	if c.left > 0 {
		if c.left--; c.left == 0 {
			r, g := c.reached, c.gate
			c.mu.Unlock()
			close(r)
			<-g
			c.mu.Lock()
		}
	}
	defer c.mu.Unlock()
	return c.t
}

func (c *pausingClock) set(t time.Time) { c.mu.Lock(); c.t = t; c.mu.Unlock() }

func (c *pausingClock) pause(n int) (reached <-chan struct{}, release func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.left, c.reached, c.gate = n, make(chan struct{}), make(chan struct{})
	g := c.gate
	return c.reached, func() { close(g) }
}

// TestGetDuringACommitAcrossExpiry: a holder's complete decided just before its record expires
// is still committing when the record's expiry passes and a get comes. The get must not answer
// "gone" while the complete is then acknowledged and the record is back: it used to (an
// audit's find). Now a get that finds an expired record decides in the group commit, after the
// writes queued before it.
func TestGetDuringACommitAcrossExpiry(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clk := &pausingClock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{Now: clk.now})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	res, err := s.Begin(ctx, "t", "k", keys.BeginRequest{Lease: time.Second, TTL: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	exp := res.Record.ExpiresAt
	clk.set(exp.Add(-time.Millisecond))

	reached, release := clk.pause(1) // hold the committer inside a filler write
	go func() { _ = s.Delete(ctx, "t", "filler1") }()
	<-reached
	done := make(chan error, 1)
	go func() {
		_, err := s.Complete(ctx, "t", "k", keys.CompleteRequest{Token: res.Record.Lease.Token,
			Response: keys.Response{Status: 200, Body: []byte("ok")}, TTL: time.Hour})
		done <- err
	}()
	time.Sleep(5 * time.Millisecond)
	go func() { _ = s.Delete(ctx, "t", "filler2") }() // behind the complete: the rest of its commit
	time.Sleep(5 * time.Millisecond)
	reached2, release2 := clk.pause(2) // 1: the complete decides (expiry - 1ms); 2: filler2 blocks
	release()
	<-reached2
	clk.set(exp.Add(time.Millisecond)) // the record expires while its transaction commits
	got := make(chan error, 1)
	var during keys.Record
	go func() {
		var err error
		during, err = s.Get(ctx, "t", "k")
		got <- err
	}()
	select {
	case err := <-got: // answered from the last commit, before the complete's
		release2()
		if cerr := <-done; errors.Is(err, keys.ErrNotFound) && cerr == nil {
			t.Fatal("get answered not found during the complete's commit, and the complete was then acknowledged")
		}
	case <-time.After(50 * time.Millisecond): // waiting for the commit, as it should
		release2()
		if cerr, gerr := <-done, <-got; cerr != nil || gerr != nil || during.State != keys.StateCompleted {
			t.Fatalf("complete = %v; get = %v %v, want the completed record", cerr, during.State, gerr)
		}
	}
}
