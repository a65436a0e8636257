package bolt

import (
	"context"
	"errors"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

// TestSweepShareBesideWriters: a sweep's transaction counts the writers' calls it shares, takes
// that many records (within its bounds) beside them, takes a whole chunk only when no writer has
// committed for quietAfter, and still takes the small share just after writers committed.
func TestSweepShareBesideWriters(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{SweepChunk: 1000, SweepChunkBusy: 128})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	c := s.comm
	var budgets []int
	sweepCall := func() *call {
		return &call{background: true, done: make(chan error, 1), fn: func(*bbolt.Tx) error {
			budgets = append(budgets, s.sweepBudget(500))
			return nil
		}}
	}
	writer := func() *call {
		return &call{done: make(chan error, 1), fn: func(*bbolt.Tx) error { return nil }}
	}
	batch := func(writers int) {
		var b []*call
		for range writers {
			b = append(b, writer())
		}
		c.commit(append(b, sweepCall()))
	}

	batch(0) // no writer has ever committed: idle
	batch(40)
	batch(3)
	batch(300)
	batch(0) // right after writers: still busy
	c.lastForeground = time.Now().Add(-2 * quietAfter)
	batch(0)
	want := []int{500, 40, minSweepChunkBusy, 128, minSweepChunkBusy, 500}
	if len(budgets) != len(want) {
		t.Fatalf("budgets %v, want %v", budgets, want)
	}
	for i := range want {
		if budgets[i] != want[i] {
			t.Errorf("budgets %v, want %v", budgets, want)
			break
		}
	}
}

// TestPanicInABatchIsIsolated: a function that panics in a shared transaction (a damaged page
// it reads, say) fails alone, with ErrDamaged, as a function that returns an error does; the
// others of its batch are committed. It used to fail the whole batch.
func TestPanicInABatchIsIsolated(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	put := func(k string) *call {
		return &call{done: make(chan error, 1), fn: func(tx *bbolt.Tx) error {
			return tx.Bucket(bucketFences).Put([]byte(k), []byte("1"))
		}}
	}
	bad := &call{done: make(chan error, 1), fn: func(*bbolt.Tx) error { panic("a damaged page") }}
	batch := []*call{put("a"), bad, put("b")}
	s.comm.commit(batch)
	for i, cl := range batch {
		err := <-cl.done
		if (cl == bad) != errors.Is(err, ErrDamaged) || cl != bad && err != nil {
			t.Errorf("call %d: %v", i, err)
		}
	}
	_ = s.db.View(func(tx *bbolt.Tx) error {
		for _, k := range []string{"a", "b"} {
			if tx.Bucket(bucketFences).Get([]byte(k)) == nil {
				t.Errorf("%s was not committed beside the panicking call", k)
			}
		}
		return nil
	})
}

// TestCommitStats: every committed write is counted once, in as many commits as the group
// commit made, and bbolt's page writes and their time are reported.
func TestCommitStats(t *testing.T) {
	t.Parallel()
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const n = 40
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			res, err := s.Begin(t.Context(), "t", "stats-"+strconv.Itoa(i), keys.BeginRequest{Lease: time.Minute, TTL: time.Hour})
			if err != nil || res.Outcome != keys.Acquired {
				t.Errorf("begin %d: %v, %v", i, res.Outcome, err)
			}
		})
	}
	wg.Wait()
	st := s.CommitStats()
	if st.Calls != n || st.Commits < 1 || st.Commits > n {
		t.Errorf("%d calls in %d commits after %d begins", st.Calls, st.Commits, n)
	}
	if st.CommitTime <= 0 || st.Pages < int64(st.Commits) || st.WriteTime <= 0 {
		t.Errorf("commit time %v, %d pages written in %v", st.CommitTime, st.Pages, st.WriteTime)
	}
}

// TestSweepNothingDueCommitsNothing: a sweep that finds nothing expired commits no transaction
// (each synced a new meta page: with IDEMSVC_SWEEP_INTERVAL=1ms, thousands a second); one that
// finds something does.
func TestSweepNothingDueCommitsNothing(t *testing.T) {
	t.Parallel()
	clock := storagetest.NewClock(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	if _, err := s.Begin(ctx, "t", "k", keys.BeginRequest{Lease: time.Second, TTL: time.Minute}); err != nil {
		t.Fatal(err)
	}
	commits := s.comm.commits.Load()
	for range 10 {
		if n, err := s.Sweep(ctx, 100); n != 0 || err != nil {
			t.Fatalf("Sweep = %d, %v; want nothing due", n, err)
		}
	}
	if got := s.comm.commits.Load() - commits; got != 0 {
		t.Errorf("10 sweeps with nothing due committed %d transactions, want 0", got)
	}
	clock.Advance(2 * time.Minute)
	if n, err := s.Sweep(ctx, 100); n != 1 || err != nil {
		t.Fatalf("Sweep after the TTL = %d, %v; want 1", n, err)
	}
	if got := s.comm.commits.Load() - commits; got == 0 {
		t.Error("the sweep that removed a record committed nothing")
	}
}
