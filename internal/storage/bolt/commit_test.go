package bolt

import (
	"path/filepath"
	"testing"
	"time"

	"go.etcd.io/bbolt"
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
