package bolt

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// TestScale measures the store at scale, for docs/BENCHMARKS.md: the Go heap as the store grows
// from 10k to 1M records, disk per record (a completed record with a 200-byte body), start to
// ready with 1M records on disk, the sweep rate, and the p99 of concurrent begin+complete
// while a large sweep runs against without one. It is a measurement, not a timed test: it
// runs only with IDEMSVC_SCALE=1, logs its figures, and fails only on functional errors.
//
//	IDEMSVC_SCALE=1 go test -run TestScale -v -timeout 30m ./internal/storage/bolt/
func TestScale(t *testing.T) {
	if os.Getenv("IDEMSVC_SCALE") == "" {
		t.Skip("a measurement: set IDEMSVC_SCALE=1 (IDEMSVC_SCALE_RECORDS=N, default 1000000)")
	}
	total := 1_000_000
	if v, err := strconv.Atoi(os.Getenv("IDEMSVC_SCALE_RECORDS")); err == nil && v > 0 {
		total = v
	}
	dir := t.TempDir()
	now := time.Now()
	s, err := OpenDir(dir, scaleOptions(now))
	if err != nil {
		t.Fatal(err)
	}
	body := make([]byte, 200)
	fill := func(s *Store, from, to int, prefix string, expires time.Time) {
		t.Helper()
		for lo := from; lo < to; lo += 10_000 {
			err := s.db.Update(func(tx *bbolt.Tx) error {
				var a keyScratch
				for i := lo; i < min(lo+10_000, to); i++ {
					// Keys in random order, as clients make them: the records that expire
					// together are scattered over the tree, not side by side.
					key := fmt.Sprintf("%016x-%s-%d", mix(uint64(i)), prefix, i)
					rec := keys.Record{Key: key, State: keys.StateCompleted, Fingerprint: "sha256:0123456789abcdef",
						Lease:     keys.Lease{Token: "tok", Fence: uint64(i + 1)},
						Response:  &keys.Response{Status: 201, Headers: map[string][]string{"Content-Type": {"application/json"}}, Body: body},
						CreatedAt: now, CompletedAt: now, ExpiresAt: expires, TTL: 24 * time.Hour}
					if err := putRecord(tx, keys.StorageID("tenant", key), keys.AppendRecord(nil, &rec), time.Time{}, false, rec.ExpiresAt, &a); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	heap := func() float64 { return float64(heapAfterGC()) / (1 << 20) }
	size := func() int64 {
		fi, err := os.Stat(s.Path())
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}

	done := 0
	for _, n := range []int{10_000, 100_000, total} {
		if n > total || n <= done {
			continue
		}
		fill(s, done, n, "live", now.Add(24*time.Hour))
		done = n
		st := s.db.Stats()
		t.Logf("scale: %d records: Go heap %.1f MiB, file %.1f MiB, %.0f bytes per record on disk, %d free pages (freelist %d KiB)",
			n, heap(), float64(size())/(1<<20), float64(size())/float64(n), st.FreePageN+st.PendingPageN, st.FreelistInuse>>10)
	}

	// Start to ready: open the file and answer a ping, as run does before it serves.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	s, err = OpenDir(dir, scaleOptions(now))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Logf("scale: open to ready with %d records on disk: %s", total, time.Since(start))
	defer s.Close()

	// Sweeping: expired records among the live ones, removed while writers run.
	const expired = 200_000
	fill(s, 0, expired, "expired", now.Add(-time.Second))
	var next atomic.Int64 // fresh keys across both measurements
	measure := func(d time.Duration, during func()) (p99 time.Duration, ops int64) {
		var (
			mu   sync.Mutex
			lats []time.Duration
			stop atomic.Bool
			wg   sync.WaitGroup
		)
		req := keys.BeginRequest{Lease: 30 * time.Second, TTL: time.Hour}
		for range 16 {
			wg.Go(func() {
				var mine []time.Duration
				for !stop.Load() {
					key := "load-" + strconv.FormatInt(next.Add(1), 10)
					t0 := time.Now()
					res, err := s.Begin(context.Background(), "tenant", key, req)
					if err == nil {
						_, err = s.Complete(context.Background(), "tenant", key, keys.CompleteRequest{Token: res.Record.Lease.Token, Response: keys.Response{Status: 200}})
					}
					if err != nil {
						t.Error(err)
						return
					}
					mine = append(mine, time.Since(t0))
				}
				mu.Lock()
				lats = append(lats, mine...)
				mu.Unlock()
			})
		}
		if during != nil {
			during()
		} else {
			time.Sleep(d)
		}
		stop.Store(true)
		wg.Wait()
		slices.Sort(lats)
		if len(lats) == 0 {
			return 0, 0
		}
		return lats[len(lats)*99/100], int64(len(lats))
	}
	// The sweep's rate alone, then its rate and the writers' p99 while 16 writers run.
	t0 := time.Now()
	if n, err := keys.SweepAll(context.Background(), s); err != nil || n != expired {
		t.Errorf("SweepAll alone = %d, %v; want %d", n, err, expired)
	}
	aloneTook := time.Since(t0)
	t.Logf("scale: swept %d expired records among %d live in %s with nothing else running: %.0f records/s",
		expired, total, aloneTook, float64(expired)/aloneTook.Seconds())
	fill(s, 0, expired, "expired-again", now.Add(-time.Second))
	quietP99, quietOps := measure(3*time.Second, nil)
	var swept int
	var sweepTook time.Duration
	busyP99, busyOps := measure(0, func() {
		t0 := time.Now()
		n, err := keys.SweepAll(context.Background(), s)
		sweepTook = time.Since(t0)
		if err != nil {
			t.Error(err)
		}
		swept = n
	})
	if swept != expired {
		t.Errorf("swept %d, want %d", swept, expired)
	}
	t.Logf("scale: swept %d expired records among %d live in %s: %.0f records/s, with 16 writers running (they made %.0f records/s)",
		swept, total, sweepTook, float64(swept)/sweepTook.Seconds(), float64(busyOps)/sweepTook.Seconds())
	t.Logf("scale: begin+complete p99 %s without a sweep (%d pairs in 3s), %s during it (%d pairs): ratio %.2f",
		quietP99, quietOps, busyP99, busyOps, float64(busyP99)/float64(quietP99))
}

// scaleOptions are the store's defaults, with the sweep's chunks from IDEMSVC_SCALE_CHUNK and
// IDEMSVC_SCALE_CHUNK_BUSY when set, to compare sizes.
func scaleOptions(now time.Time) Options {
	o := Options{Now: func() time.Time { return now }}
	o.SweepChunk, _ = strconv.Atoi(os.Getenv("IDEMSVC_SCALE_CHUNK"))
	o.SweepChunkBusy, _ = strconv.Atoi(os.Getenv("IDEMSVC_SCALE_CHUNK_BUSY"))
	return o
}

// mix is a bijective 64-bit hash (splitmix64's finaliser), for keys in random order.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}
