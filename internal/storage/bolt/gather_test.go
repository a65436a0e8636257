package bolt

import (
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// gatherCommitter is a committer whose loop never starts (running), for gather alone.
func gatherCommitter(lastSize int, lastTook, maxWait time.Duration) *committer {
	c := newCommitter(nil, 64)
	c.running, c.lastSize, c.lastTook, c.maxGather = true, lastSize, lastTook, maxWait
	return c
}

// queue adds n calls to c's queue as do does.
func (c *committer) queue(n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for range n {
		c.enqueueLocked(&call{done: make(chan error, 1)})
	}
}

// startGather runs gather in a goroutine, as the loop does (with mu held), and returns a channel
// closed when it returns.
func (c *committer) startGather() <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.mu.Lock()
		c.gather()
		c.mu.Unlock()
	}()
	return done
}

// TestGatherWaitsForTheWritersOnTheirWay: behind a group of 10, with 5 writes queued during it,
// the next group waits for 10 more, and goes on the write that makes 15, long before its bound.
func TestGatherWaitsForTheWritersOnTheirWay(t *testing.T) {
	c := gatherCommitter(10, 2*time.Minute, time.Minute) // bounded at a minute: never reached here
	c.queue(5)
	done := c.startGather()
	for c.waiting() != 15 {
		time.Sleep(time.Millisecond)
	}
	c.queue(9)
	select {
	case <-done:
		t.Fatal("gather ended with 14 of the 15 writes it waits for")
	case <-time.After(20 * time.Millisecond):
	}
	c.queue(1)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("gather did not end on the 15th write")
	}
	if g := c.gathers.Load(); g != 1 {
		t.Errorf("gathers = %d, want 1", g)
	}
	if c.want != 0 || len(c.enough) != 0 {
		t.Errorf("after the wait: want %d, %d signals left; want none", c.want, len(c.enough))
	}
}

// waiting returns the queue length gather waits for (0: none).
func (c *committer) waiting() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.want
}

// TestGatherIsBounded: when the writers do not come (open-loop clients, say), the wait ends at
// half the last group's time.
func TestGatherIsBounded(t *testing.T) {
	c := gatherCommitter(10, 60*time.Millisecond, time.Minute)
	c.queue(3)
	t0 := time.Now()
	select {
	case <-c.startGather():
	case <-time.After(10 * time.Second):
		t.Fatal("gather did not end at its bound")
	}
	if took := time.Since(t0); took < 30*time.Millisecond {
		t.Errorf("gather ended after %s, before its bound of 30ms, with none of the writes it waits for", took)
	}
	if took := time.Duration(c.gatherNanos.Load()); took < 30*time.Millisecond {
		t.Errorf("GatherTime %s, want at least 30ms", took)
	}
}

// TestGatherDoesNotWaitForFewWriters: behind a small group, after the queue emptied, or with a
// full group queued, the next group goes at once.
func TestGatherDoesNotWaitForFewWriters(t *testing.T) {
	for _, tc := range []struct {
		name             string
		lastSize, queued int
	}{
		{"behind a group of 7", gatherMinGroup - 1, 1},
		{"a full group queued", 64, 64},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := gatherCommitter(tc.lastSize, time.Minute, time.Minute)
			c.queue(tc.queued)
			select {
			case <-c.startGather():
			case <-time.After(10 * time.Second):
				t.Fatal("gather waited")
			}
			if g := c.gathers.Load(); g != 0 {
				t.Errorf("gathers = %d, want 0", g)
			}
		})
	}
	t.Run("after the queue emptied", func(t *testing.T) {
		c := gatherCommitter(64, time.Minute, time.Minute)
		c.loop() // the queue is empty: it ends at once, as a committer does when the load is gone
		if c.running || c.lastSize != 0 {
			t.Errorf("after the loop: running %v, last group %d; want false and 0", c.running, c.lastSize)
		}
	})
}

// TestGatherUnderLoad: 32 writers in a closed loop against a real file make groups that gather,
// and every write is answered.
func TestGatherUnderLoad(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for w := range 32 {
		wg.Go(func() {
			for i := range 40 {
				k := strconv.Itoa(w) + "-" + strconv.Itoa(i)
				if _, err := s.Begin(t.Context(), "t", k, keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := s.CommitStats()
	if st.Calls != 32*40 || st.Gathers == 0 || st.GatherTime <= 0 {
		t.Errorf("%d calls in %d groups, %d of them gathered in %s; want 1280 calls and some gathered",
			st.Calls, st.Commits, st.Gathers, st.GatherTime)
	}
	t.Logf("%d calls in %d groups (%.1f a group), %d gathered in %s", st.Calls, st.Commits,
		float64(st.Calls)/float64(st.Commits), st.Gathers, st.GatherTime)
}

// TestGatherDrainsALateSignal: the write that reaches the mark after the timer ended the wait,
// but before gather took mu back, leaves a signal; gather drains it, so that it does not end the
// next wait. The test holds mu across the timer's end. (From an audit by a helper.)
func TestGatherDrainsALateSignal(t *testing.T) {
	c := gatherCommitter(10, 100*time.Millisecond, time.Minute) // bound: 50 ms
	c.queue(1)
	done := c.startGather()
	for c.waiting() == 0 {
		select {
		case <-done:
			t.Fatal("gather ended before the test saw it wait")
		default:
		}
	}
	c.mu.Lock() // held while the timer ends the select: gather then waits for mu
	for c.gathers.Load() == 0 {
		time.Sleep(100 * time.Microsecond)
	}
	if c.want == 0 {
		c.mu.Unlock()
		t.Fatal("want reset before gather took mu back")
	}
	for range 10 { // the write that reaches the mark signals, with mu still held
		c.enqueueLocked(&call{done: make(chan error, 1)})
	}
	if len(c.enough) != 1 {
		c.mu.Unlock()
		t.Fatalf("%d signals after the late write; want 1", len(c.enough))
	}
	c.mu.Unlock()
	<-done
	if len(c.enough) != 0 || c.want != 0 {
		t.Fatalf("after gather: %d signals left, want %d; want none", len(c.enough), c.want)
	}
}

// TestGatherStaleTimerTick: a timer that fired while the signal won the select leaves no tick
// that ends the next wait at once, with Go 1.23's timers and with GODEBUG=asynctimerchan=1, which
// keeps such a tick in the channel. (From an audit by a helper.)
func TestGatherStaleTimerTick(t *testing.T) {
	for _, godebug := range []string{"", "asynctimerchan=1"} {
		t.Run("GODEBUG="+godebug, func(t *testing.T) {
			t.Setenv("GODEBUG", godebug)
			c := gatherCommitter(10, 2*time.Minute, time.Minute)
			c.timer = time.NewTimer(time.Nanosecond) // fired, its tick not received
			time.Sleep(10 * time.Millisecond)
			c.queue(1)
			done := c.startGather()
			select {
			case <-done:
				t.Fatal("gather ended at once, with 1 of the 11 writes it waits for and a bound of a minute: a stale tick")
			case <-time.After(50 * time.Millisecond):
			}
			c.queue(10)
			<-done
		})
	}
}
