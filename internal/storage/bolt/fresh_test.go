package bolt

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// fileReads is how many read transactions bbolt has begun: begin's read of the file before the
// group, and each group's own.
func fileReads(s *Store) int { return s.db.Stats().TxN }

// TestBeginReadsTheFileOnceForFreshKeys: while begins mostly find no record, a begin on a key
// that the memtables do not hold reads the file in the group alone; once begins find records
// there, it reads before the group again, so that a replay does not wait for a commit. Either
// way its answers are the same.
func TestBeginReadsTheFileOnceForFreshKeys(t *testing.T) {
	t.Parallel()
	s, _ := openLogStore(t)
	ctx := context.Background()
	req := keys.BeginRequest{Fingerprint: "f", Lease: time.Minute, TTL: time.Hour}

	// Fresh keys, one at a time: one read transaction each, the group's.
	const n = 40
	before := fileReads(s)
	for i := range n {
		if res, err := s.Begin(ctx, "t", fmt.Sprintf("fresh%d", i), req); err != nil || res.Outcome != keys.Acquired {
			t.Fatalf("begin fresh%d: %v, %v", i, res.Outcome, err)
		}
	}
	if got := fileReads(s) - before; got > n {
		t.Errorf("%d begins on fresh keys began %d read transactions, want %d (the groups' alone)", n, got, n)
	}

	// Completed records that only the file holds, and no replay cache: replays from the file.
	const done = 20
	for i := range done {
		pairOf(t, s, "t", fmt.Sprintf("done%d", i), "body", time.Hour)
	}
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	s.cache = nil
	// replay begins on key and reports whether the begin went to the group.
	replay := func(key string) (grouped bool) {
		t.Helper()
		s.comm.lastForeground.Store(0)
		res, err := s.Begin(ctx, "t", key, keys.BeginRequest{Fingerprint: "f", TTL: time.Hour})
		if err != nil || res.Outcome != keys.Replayed || string(res.Record.Response.Body) != "body" {
			t.Fatalf("begin %s: %v, %v, %q; want a replay of %q", key, res.Outcome, err, res.Record.Response.Body, "body")
		}
		return s.comm.lastForeground.Load() != 0
	}
	// The first ones go to the group (begins were all fresh) until begin reads first again:
	// at most freshCap/freshDown+1 of them.
	i := 0
	for ; i < done && s.fresh.Load() >= 0; i++ {
		if !replay(fmt.Sprintf("done%d", i)) {
			t.Fatalf("replay %d did not go to the group, while fresh is %d", i, s.fresh.Load())
		}
	}
	if i == 0 || i > freshCap/freshDown+1 {
		t.Fatalf("%d replays went to the group before begin read first again, want 1 to %d", i, freshCap/freshDown+1)
	}
	// The next ones are answered from the read before the group, without it.
	for ; i < done; i++ {
		if replay(fmt.Sprintf("done%d", i)) {
			t.Errorf("replay %d went to the group, while fresh is %d", i, s.fresh.Load())
		}
	}
	// Fresh keys again: after enough of them, begin reads in the group alone again.
	for i := range 2 * freshCap {
		if _, err := s.Begin(ctx, "t", fmt.Sprintf("again%d", i), req); err != nil {
			t.Fatal(err)
		}
	}
	if s.fresh.Load() < 0 {
		t.Errorf("after %d fresh keys, fresh is %d, want 0 or more", 2*freshCap, s.fresh.Load())
	}
}

// TestDeleteBetweenBeginsReadsIsNotCached: a Delete that runs whole between begin's read of the
// memtables and its read of the file (a completed key that only the file holds, begins reading
// first) may make that begin replay the old record, which overlapped the Delete; but the record
// must not reach the replay cache, where a begin after the Delete returned would find it. An
// audit found begin noting the cache's generation after its memtable read, which let it in.
func TestDeleteBetweenBeginsReadsIsNotCached(t *testing.T) {
	t.Parallel()
	s, _ := openLogStore(t)
	ctx := context.Background()
	req := keys.BeginRequest{Fingerprint: "f", Lease: time.Minute, TTL: time.Hour}
	pairOf(t, s, "t", "k", "old", time.Hour)
	if err := s.checkpoint(); err != nil { // only the file holds k now
		t.Fatal(err)
	}
	s.fresh.Store(-freshCap) // replays dominate: begin reads the file before the group
	deleted := false
	s.afterMemoryRead = func() {
		if !deleted {
			deleted = true
			if err := s.Delete(ctx, "t", "k"); err != nil {
				t.Error(err)
			}
		}
	}
	res, err := s.Begin(ctx, "t", "k", req)
	if err != nil || !deleted {
		t.Fatalf("begin overlapping the Delete: %v, %v (deleted %v)", res.Outcome, err, deleted)
	}
	s.afterMemoryRead = nil
	res, err = s.Begin(ctx, "t", "k", req)
	if err != nil || res.Outcome != keys.Acquired {
		t.Errorf("begin after the Delete returned: %v, %v; want acquired, not the deleted record", res.Outcome, err)
	}
}
