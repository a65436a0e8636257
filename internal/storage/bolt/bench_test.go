package bolt

import (
	"fmt"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// BenchmarkBeginComplete measures begin then complete on fresh keys, fsync on, with 1 and 64
// writers, for bbolt's DB.Batch (its defaults, and tuned) and for this package's group commit. One op is one begin
// plus one complete (two committed writes); ops/s is reported.
//
//	go test -run '^$' -bench BeginComplete -benchtime 3s -count 3 ./internal/storage/bolt/
func BenchmarkBeginComplete(b *testing.B) {
	configs := []struct {
		name  string
		size  int
		delay time.Duration
	}{
		{"bbolt-batch-1000-10ms", 1000, 10 * time.Millisecond},
		{"bbolt-batch-64-1ms", 64, time.Millisecond},
		{fmt.Sprintf("group-commit-%d", DefaultMaxBatchSize), DefaultMaxBatchSize, 0},
	}
	for _, c := range configs {
		for _, g := range []int{1, 64} {
			b.Run(fmt.Sprintf("%s/goroutines=%d", c.name, g), func(b *testing.B) {
				benchBeginComplete(b, Options{MaxBatchSize: c.size, MaxBatchDelay: c.delay}, g)
			})
		}
	}
}

func benchBeginComplete(b *testing.B, opts Options, goroutines int) {
	s, err := Open(filepath.Join(b.TempDir(), FileName), opts)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := b.Context()
	req := keys.BeginRequest{Fingerprint: "fp", Lease: 30 * time.Second, TTL: 24 * time.Hour}
	resp := keys.Response{
		Status:  201,
		Headers: map[string][]string{"Content-Type": {"application/json"}},
		Body:    []byte(`{"id":42,"status":"created"}`),
	}
	var next atomic.Int64
	b.ResetTimer()
	var wg sync.WaitGroup
	for range goroutines {
		wg.Go(func() {
			for {
				i := next.Add(1)
				if i > int64(b.N) {
					return
				}
				key := "bench-" + strconv.FormatInt(i, 10)
				res, err := s.Begin(ctx, "bench", key, req)
				if err != nil || res.Outcome != keys.Acquired {
					b.Errorf("Begin(%q) = %v, %v", key, res.Outcome, err)
					return
				}
				_, err = s.Complete(ctx, "bench", key, keys.CompleteRequest{Token: res.Record.Lease.Token, Response: resp})
				if err != nil {
					b.Errorf("Complete(%q): %v", key, err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}
