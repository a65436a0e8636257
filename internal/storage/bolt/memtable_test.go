package bolt

import (
	"fmt"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// heapAfterGC is the live heap, in bytes. It collects twice: bbolt keeps the page buffers of a
// commit in a sync.Pool, which one collection only moves to its victim cache. A 10,000-record
// fill transaction with random keys (TestScale) dirties that many pages (40 MiB), which the
// second collection frees; the store's own transactions (at most DefaultMaxBatchSize writes)
// leave far fewer.
func heapAfterGC() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// TestMemtableHeapPerLogByte: 120 groups of 64 puts of 2 KiB bodies, distinct ids, in the
// active memtable, which holds each record and its encoding: about 2.5 heap bytes per byte of
// the log. With the encodings left where wtx.put cut them, in the arrays that append left behind
// as a group's payload grew, about 6 (an audit's find, and its test).
func TestMemtableHeapPerLogByte(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), FileName), Options{CheckpointInterval: time.Hour, CheckpointBytes: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	body := make([]byte, 2048)
	h0, w0, n := heapAfterGC(), s.wal.size, 0
	for range 120 {
		batch := make([]*call, 64)
		for i := range batch {
			k := fmt.Sprintf("k%09d", n)
			n++
			rec := &keys.Record{Key: k, State: keys.StateCompleted, Fingerprint: "sha256:0123456789abcdef",
				Response:  &keys.Response{Status: 201, Headers: map[string][]string{"Content-Type": {"application/json"}}, Body: body},
				CreatedAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour), TTL: time.Hour}
			id := keys.StorageID("tenant", k)
			batch[i] = &call{done: make(chan error, 1), fn: func(tx *wtx) error { tx.put(id, rec); return nil }}
		}
		s.comm.commit(batch)
	}
	h1, logBytes := heapAfterGC(), s.wal.size-w0
	ratio := float64(h1-h0) / float64(logBytes)
	t.Logf("log %.1f MiB, heap +%.1f MiB: %.2f heap bytes per log byte", float64(logBytes)/(1<<20), float64(h1-h0)/(1<<20), ratio)
	if ratio > 3 {
		t.Errorf("the memtable holds %.2f heap bytes per log byte", ratio)
	}
	runtime.KeepAlive(s)
}
