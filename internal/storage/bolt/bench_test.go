package bolt

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// BenchmarkBeginComplete measures begin then complete on fresh keys, fsync on, with 1 and 64
// writers, for bbolt's DB.Batch (its defaults, and tuned) and for this package's group commit. One op is one begin
// plus one complete (two committed writes); ops/s is reported, and from bbolt's own counters the
// pages written per op and the time spent writing them and syncing (write-µs/op), and the
// process's CPU time per op (cpu-µs/op, user and system: checkpoints included), which moves less
// with a shared machine's speed than ops/s does.
//
// The writers take their keys from one shared counter, so that each commit's keys are
// neighbours on a few leaves; the "writer-streams" variant gives each writer its own run of keys,
// as idembench's workers (and independent clients) do, so that a commit's writes land on as many
// leaves as it has writers. That variant is the one that resembles the HTTP load.
//
//	go test -run '^$' -bench BeginComplete -benchtime 3s -count 3 ./internal/storage/bolt/
func BenchmarkBeginComplete(b *testing.B) {
	for _, g := range []int{1, 64} {
		b.Run(fmt.Sprintf("group-commit-%d/goroutines=%d", DefaultMaxBatchSize, g), func(b *testing.B) {
			benchBeginComplete(b, Options{}, g, false)
		})
	}
	b.Run(fmt.Sprintf("group-commit-%d-writer-streams/goroutines=64", DefaultMaxBatchSize), func(b *testing.B) {
		benchBeginComplete(b, Options{}, 64, true)
	})
}

func benchBeginComplete(b *testing.B, opts Options, goroutines int, streams bool) {
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
	before := s.db.Stats().TxStats
	b.ResetTimer()
	cpu := processCPU()
	var wg sync.WaitGroup
	for w := range goroutines {
		prefix := "bench-"
		if streams {
			prefix = "bench-" + strconv.Itoa(w) + "-"
		}
		wg.Go(func() {
			for {
				i := next.Add(1)
				if i > int64(b.N) {
					return
				}
				key := prefix + strconv.FormatInt(i, 10)
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
	cpu = processCPU() - cpu
	b.StopTimer()
	after := s.db.Stats().TxStats
	d := after.Sub(&before)
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
	b.ReportMetric(float64(d.GetWrite())/float64(b.N), "pages/op")
	b.ReportMetric(float64(d.GetWriteTime().Microseconds())/float64(b.N), "write-µs/op")
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/op")
}

// BenchmarkSweep measures a sweep's transaction of 1000 expired records in random key order
// among 100,000 live ones, fsync included; the refill between transactions is not timed. One op
// is one record removed.
//
//	go test -run '^$' -bench Sweep -count 5 ./internal/storage/bolt/
func BenchmarkSweep(b *testing.B) {
	now := time.Now()
	s, err := Open(filepath.Join(b.TempDir(), FileName), Options{Now: func() time.Time { return now }})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	body := make([]byte, 200)
	fill := func(from, to int, expires time.Time) {
		err := s.db.Update(func(tx *bbolt.Tx) error {
			var a keyScratch
			for i := from; i < to; i++ {
				key := fmt.Sprintf("%016x-%d", mix(uint64(i)), i)
				rec := keys.Record{Key: key, State: keys.StateCompleted, Fingerprint: "sha256:0123456789abcdef",
					Lease:     keys.Lease{Token: "tok", Fence: uint64(i + 1)},
					Response:  &keys.Response{Status: 201, Headers: map[string][]string{"Content-Type": {"application/json"}}, Body: body},
					CreatedAt: now, CompletedAt: now, ExpiresAt: expires, TTL: time.Hour}
				if err := putRecord(tx, keys.StorageID("tenant", key), keys.AppendRecord(nil, &rec), time.Time{}, false, rec.ExpiresAt, &a); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	for lo := 0; lo < 100_000; lo += 10_000 {
		fill(lo, lo+10_000, now.Add(time.Hour))
	}
	const chunk = 1000
	next := 100_000
	b.ResetTimer()
	for i := 0; i < b.N; i += chunk {
		b.StopTimer()
		fill(next, next+chunk, now.Add(-time.Second))
		next += chunk
		b.StartTimer()
		if n, err := s.Sweep(context.Background(), chunk); err != nil || n != chunk {
			b.Fatalf("sweep = %d, %v", n, err)
		}
	}
}

// BenchmarkLogAppend: the log's append (a frame of about 1 KiB, written and synced, as one
// connection's commits are) into a new segment file, which each append grows, and into the
// spare, a file written before, which each append writes over. On ext4 a sync that grows a file
// also commits its new size to the journal.
//
//	go test -run '^$' -bench LogAppend -benchtime 2000x ./internal/storage/bolt/
func BenchmarkLogAppend(b *testing.B) {
	payload := appendOp(nil, opDel, bytes.Repeat([]byte("k"), 1000), nil)
	for _, spare := range []bool{false, true} {
		b.Run(fmt.Sprintf("spare=%v", spare), func(b *testing.B) {
			base := filepath.Join(b.TempDir(), FileName)
			if spare { // a segment as long as the run's, retired as the spare
				w, err := openWAL(base, 1)
				if err != nil {
					b.Fatal(err)
				}
				for range b.N + 1 {
					if err := w.append(payload); err != nil {
						b.Fatal(err)
					}
				}
				_ = w.close()
				if err := retireSegment(base, 1); err != nil {
					b.Fatal(err)
				}
				if _, err := os.Stat(spareName(base)); err != nil {
					b.Fatal("no spare: ", err)
				}
			}
			w, err := openWAL(base, 2)
			if err != nil {
				b.Fatal(err)
			}
			defer w.close()
			cpu := processCPU()
			b.ResetTimer()
			for range b.N {
				if err := w.append(payload); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64((processCPU()-cpu).Microseconds())/float64(b.N), "cpu-µs/op")
		})
	}
}

// BenchmarkDiskFlush measures what a commit's fdatasync costs on the disk under b.TempDir (set
// TMPDIR to probe another one): one op writes N 4 KiB pages at random page offsets of a 64 MiB
// file, as a bbolt commit writes its dirty pages, then fdatasyncs; sync-µs/op is the
// fdatasync's time. Where it grows with N (sync-µs/page stops falling), a commit costs in
// proportion to the pages it writes, and the pages/op of BenchmarkBeginComplete are the cost.
//
//	go test -run '^$' -bench DiskFlush ./internal/storage/bolt/
func BenchmarkDiskFlush(b *testing.B) {
	const fileSize = 64 << 20
	for _, n := range []int{1, 8, 32, 80} {
		b.Run(fmt.Sprintf("pages=%d", n), func(b *testing.B) {
			f, err := os.Create(filepath.Join(b.TempDir(), "flush"))
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			if err := f.Truncate(fileSize); err != nil {
				b.Fatal(err)
			}
			page := make([]byte, 4096)
			rng := rand.New(rand.NewPCG(1, 2))
			var syncing time.Duration
			b.ResetTimer()
			for range b.N {
				for range n {
					if _, err := f.WriteAt(page, int64(rng.IntN(fileSize/4096))*4096); err != nil {
						b.Fatal(err)
					}
				}
				t := time.Now()
				if err := syscall.Fdatasync(int(f.Fd())); err != nil {
					b.Fatal(err)
				}
				syncing += time.Since(t)
			}
			b.ReportMetric(float64(syncing.Microseconds())/float64(b.N), "sync-µs/op")
			b.ReportMetric(float64(syncing.Microseconds())/float64(b.N*n), "sync-µs/page")
		})
	}
}
