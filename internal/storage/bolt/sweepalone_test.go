package bolt

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/storage/storagetest"
)

// TestSweepAloneReportsItsWork: when a checkpoint's transaction fails with a frozen
// memtable (here an apply that bbolt refuses, standing in for ENOSPC), checkpointWith runs the
// sweep alone and commits it, yet returns the checkpoint's error: Sweep then reports 0 removed
// and an error, and stops after one chunk, though it removed records (a reviewer's find).
func TestSweepAloneReportsItsWork(t *testing.T) {
	clock := storagetest.NewClock(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{Now: clock.Now, CheckpointInterval: time.Hour, SweepChunk: 4})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		pairOf(t, s, "t", fmt.Sprintf("k%d", i), "b", time.Minute)
	}
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Hour)
	// A frozen memtable whose apply fails (bbolt refuses a bucket with an empty name).
	bad := newMemtable()
	bad.fences[""] = 1
	s.memMu.Lock()
	s.frozen, s.frozenThrough = bad, 0
	s.memMu.Unlock()

	n, err := s.Sweep(context.Background(), 100)
	left := 0
	_ = s.db.View(func(tx *bbolt.Tx) error { left = tx.Bucket(bucketRecords).Stats().KeyN; return nil })
	t.Logf("Sweep = %d, %v; records left in the file: %d", n, err, left)
	if n != 10-left {
		t.Errorf("Sweep reported %d removed; the file lost %d", n, 10-left)
	}
	if left != 0 {
		t.Errorf("%d expired records left after Sweep(100) (err %v)", left, err)
	}
	s.memMu.Lock()
	s.frozen = nil
	s.memMu.Unlock()
	_ = s.Close()
}
