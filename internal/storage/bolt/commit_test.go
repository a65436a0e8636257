package bolt

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

// TestSweepShareBesideWriters: a sweep's chunk takes a whole chunk only when no group of writers
// has run for quietAfter; beside writers, twice the records its checkpoint wrote, at least
// SweepChunkBusy, at most SweepChunk.
func TestSweepShareBesideWriters(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{SweepChunk: 1000, SweepChunkBusy: 128})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var budgets []int
	budgets = append(budgets, s.sweepBudget(500, 0)) // no writer has ever run: idle
	if _, err := s.Begin(t.Context(), "t", "k", keys.BeginRequest{Lease: time.Minute, TTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	budgets = append(budgets, s.sweepBudget(500, 3), s.sweepBudget(500, 200), s.sweepBudget(100, 200), s.sweepBudget(5000, 900))
	s.comm.lastForeground.Store(time.Now().Add(-2 * quietAfter).UnixNano())
	budgets = append(budgets, s.sweepBudget(500, 200))
	if want := []int{500, 128, 400, 100, 1000, 500}; !slices.Equal(budgets, want) {
		t.Errorf("budgets %v, want %v", budgets, want)
	}
}

// TestPanicInABatchIsIsolated: a function that panics in a group (a damaged page it reads, say)
// fails alone, with ErrDamaged, as a function that returns an error does, and what it wrote
// before it panicked is undone; the others of its group are written. It used to fail the whole
// group.
func TestPanicInABatchIsIsolated(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	rec := func(k string) *keys.Record {
		return &keys.Record{Key: k, State: keys.StateInProgress, ExpiresAt: time.Now().Add(time.Hour)}
	}
	put := func(k string) *call {
		return &call{done: make(chan error, 1), fn: func(tx *wtx) error {
			tx.put(keys.StorageID("t", k), rec(k))
			return nil
		}}
	}
	bad := &call{done: make(chan error, 1), fn: func(tx *wtx) error {
		tx.put(keys.StorageID("t", "a"), rec("overwritten"))
		tx.put(keys.StorageID("t", "c"), rec("c"))
		tx.nextFence("t")
		panic("a damaged page")
	}}
	failing := &call{done: make(chan error, 1), fn: func(tx *wtx) error {
		tx.del(keys.StorageID("t", "a"))
		return errors.New("a failure")
	}}
	batch := []*call{put("a"), bad, failing, put("b")}
	s.comm.commit(batch)
	for i, cl := range batch {
		err := <-cl.done
		if cl == bad && !errors.Is(err, ErrDamaged) || cl == failing && err == nil || cl != bad && cl != failing && err != nil {
			t.Errorf("call %d: %v", i, err)
		}
	}
	for _, c := range []struct {
		key, want string
	}{{"a", "a"}, {"b", "b"}, {"c", ""}} {
		got, err := s.Get(t.Context(), "t", c.key)
		switch {
		case c.want == "" && !errors.Is(err, keys.ErrNotFound):
			t.Errorf("%s, written by the call that panicked: %+v, %v; want not found", c.key, got, err)
		case c.want != "" && (err != nil || got.Key != c.want):
			t.Errorf("%s: %+v, %v; want the record of %s", c.key, got, err, c.want)
		}
	}
	if err := s.comm.do(func(tx *wtx) error {
		if f := tx.nextFence("t"); f != 1 {
			t.Errorf("the first fence kept is %d: the call that panicked took one", f)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
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
	if st.CommitTime <= 0 || st.WALBytes < n*20 || st.WALTime <= 0 {
		t.Errorf("commit time %v, %d bytes of log written in %v", st.CommitTime, st.WALBytes, st.WALTime)
	}
	before := st.Pages
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	if st = s.CommitStats(); st.Checkpoints < 1 || st.CheckpointTime <= 0 || st.Pages <= before || st.WriteTime <= 0 {
		t.Errorf("after a checkpoint: %d checkpoints in %v, %d pages written in %v", st.Checkpoints, st.CheckpointTime, st.Pages, st.WriteTime)
	}
}

// TestSweepNothingDueCommitsNothing: a sweep that finds nothing expired commits no transaction
// (each synced a new meta page: with IDEMSVC_SWEEP_INTERVAL=1ms, thousands a second); one that
// finds something does.
func TestSweepNothingDueCommitsNothing(t *testing.T) {
	t.Parallel()
	clock := storagetest.NewClock(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{Now: clock.Now, CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	if _, err := s.Begin(ctx, "t", "k", keys.BeginRequest{Lease: time.Second, TTL: time.Minute}); err != nil {
		t.Fatal(err)
	}
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	commits := func() int64 { st := s.db.Stats(); return st.TxStats.GetWrite() } // pages written
	before := commits()
	for range 10 {
		if n, err := s.Sweep(ctx, 100); n != 0 || err != nil {
			t.Fatalf("Sweep = %d, %v; want nothing due", n, err)
		}
	}
	if got := commits() - before; got != 0 {
		t.Errorf("10 sweeps with nothing due wrote %d pages, want 0", got)
	}
	clock.Advance(2 * time.Minute)
	if n, err := s.Sweep(ctx, 100); n != 1 || err != nil {
		t.Fatalf("Sweep after the TTL = %d, %v; want 1", n, err)
	}
	if got := commits() - before; got == 0 {
		t.Error("the sweep that removed a record wrote nothing")
	}
}
