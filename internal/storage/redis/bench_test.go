package redis

import (
	"runtime"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
)

// BenchmarkBeginComplete measures begin+complete pairs on fresh keys from one goroutine and from
// 64, and reports the scripts (round trips) per pair: 2 when both fast paths are taken, 4 on the
// read path; and the fast paths missed for the clock, per pair.
func BenchmarkBeginComplete(b *testing.B) {
	for _, g := range []int{1, 64} {
		b.Run("goroutines="+strconv.Itoa(g), func(b *testing.B) {
			s, d := counted(b, redistest.URL(b), redistest.Prefix(b), nil)
			ctx := b.Context()
			var seq atomic.Int64
			one := func() {
				key := "k" + strconv.FormatInt(seq.Add(1), 10)
				res, err := s.Begin(ctx, "t", key, testReq)
				if err != nil {
					b.Error(err)
					return
				}
				req := keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp}
				if _, err := s.Complete(ctx, "t", key, req); err != nil {
					b.Error(err)
				}
			}
			if g == 1 {
				for b.Loop() {
					one()
				}
			} else {
				// RunParallel starts parallelism × GOMAXPROCS goroutines.
				b.SetParallelism(max(1, g/runtime.GOMAXPROCS(0)))
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						one()
					}
				})
			}
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pairs/s")
			b.ReportMetric(float64(d.total())/float64(b.N), "scripts/pair")
			b.ReportMetric(float64(d.clockMisses.Load())/float64(b.N), "misses/pair")
		})
	}
}

// BenchmarkReplay measures begins of completed keys (replays) from one goroutine, the store's
// own cost of a replay without HTTP; allocs/op is steady where ns/op follows the machine.
//
//	go test -run '^$' -bench Replay -benchmem ./internal/storage/redis/
func BenchmarkReplay(b *testing.B) {
	s := openTest(b, redistest.URL(b), redistest.Prefix(b), nil)
	ctx := b.Context()
	const n = 100
	for i := range n {
		key := "r" + strconv.Itoa(i)
		res, err := s.Begin(ctx, "t", key, testReq)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := s.Complete(ctx, "t", key, keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp}); err != nil {
			b.Fatal(err)
		}
	}
	i := 0
	for b.Loop() {
		res, err := s.Begin(ctx, "t", "r"+strconv.Itoa(i%n), testReq)
		if err != nil || res.Outcome != keys.Replayed {
			b.Fatalf("replay: %v, %v", res.Outcome, err)
		}
		i++
	}
}

// BenchmarkWatchAcrossStores measures how long after a complete starts on store A a watcher
// of the key on store B (another replica on the same Redis) is woken, and reports the median,
// p99 and maximum, next to the median duration of the complete itself.
func BenchmarkWatchAcrossStores(b *testing.B) {
	url, prefix := redistest.URL(b), redistest.Prefix(b)
	a, other := openTest(b, url, prefix, nil), openTest(b, url, prefix, nil)
	ctx := b.Context()
	var delays, completes []time.Duration
	i := 0
	for b.Loop() {
		key := "w" + strconv.Itoa(i)
		i++
		res, err := a.Begin(ctx, "t", key, testReq)
		if err != nil {
			b.Fatal(err)
		}
		changed, stop := other.Watch("t", key)
		start := time.Now()
		req := keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp}
		if _, err := a.Complete(ctx, "t", key, req); err != nil {
			b.Fatal(err)
		}
		completes = append(completes, time.Since(start))
		select {
		case <-changed:
			delays = append(delays, time.Since(start))
		case <-time.After(time.Second):
			b.Fatal("the watcher was not woken within 1s")
		}
		stop()
	}
	b.StopTimer()
	slices.Sort(delays)
	slices.Sort(completes)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(delays[len(delays)/2]), "wake-p50-ms")
	b.ReportMetric(ms(delays[len(delays)*99/100]), "wake-p99-ms")
	b.ReportMetric(ms(delays[len(delays)-1]), "wake-max-ms")
	b.ReportMetric(ms(completes[len(completes)/2]), "complete-p50-ms")
}
