package soak

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/server/servertest"
	"github.com/idemsvc/idemsvc/internal/storage/bolt"
)

// TestMain fails the package when any goroutine outlives the tests: the server, the store, the
// sweeper and the clients must all be gone after shutdown.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const (
	workers = 16
	// ttl is the retention of the soak's records, short so that the sweeper removes them while
	// the soak runs and the data file reaches a steady size.
	ttl           = 2 * time.Second
	sweepInterval = 250 * time.Millisecond
)

// settings are the soak's durations: short for CI, long with IDEMSVC_PROOFS=long, or
// IDEMSVC_SOAK_DURATION.
func settings(t *testing.T) (warmup, soak, sample time.Duration) {
	warmup, soak, sample = 2*time.Second, 10*time.Second, time.Second
	if os.Getenv("IDEMSVC_PROOFS") == "long" {
		warmup, soak, sample = 10*time.Second, 5*time.Minute, 5*time.Second
	}
	if v := os.Getenv("IDEMSVC_SOAK_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < time.Second {
			t.Fatalf("IDEMSVC_SOAK_DURATION=%q: want a Go duration of at least 1s", v)
		}
		soak = d
		sample = max(time.Second, d/60)
	}
	return warmup, soak, sample
}

// sample is one measurement of the process.
type sample struct {
	at         time.Duration
	goroutines int
	heapMiB    float64 // after runtime.GC
	fds        int
	fileMiB    float64
}

func measure(at time.Duration, path string) sample {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	s := sample{at: at, goroutines: runtime.NumGoroutine(), heapMiB: float64(ms.HeapAlloc) / (1 << 20)}
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		s.fds = len(ents)
	}
	if fi, err := os.Stat(path); err == nil {
		s.fileMiB = float64(fi.Size()) / (1 << 20)
	}
	return s
}

func TestSoak(t *testing.T) {
	warmup, soakFor, every := settings(t)
	srv := servertest.Start(t, servertest.Options{})
	store := srv.Store.(*bolt.Store)

	// The sweeper, as cmd/idemsvc runs it; it reports how many records it removed.
	var swept atomic.Int64
	sweepCtx, stopSweeper := context.WithCancel(context.Background())
	sweeperDone := make(chan struct{})
	go func() {
		defer close(sweeperDone)
		_ = keys.RunSweeper(sweepCtx, store, sweepInterval, func(n int, err error) {
			if err != nil {
				t.Errorf("sweep: %v", err)
			}
			swept.Add(int64(n))
		})
	}()
	defer func() { stopSweeper(); <-sweeperDone }()

	transport := &http.Transport{MaxIdleConnsPerHost: workers}
	defer transport.CloseIdleConnections()
	client := &http.Client{Transport: transport, Timeout: 30 * time.Second}
	l := &load{t: t, url: srv.URL, client: client}

	// Warm up at full speed: that is the peak the soak then runs at half of.
	l.run(context.Background(), warmup, nil)
	peak := float64(l.iterations.Load()) / warmup.Seconds()
	if peak < 1 {
		t.Fatalf("warm-up: %d iterations in %s", l.iterations.Load(), warmup)
	}
	rate := peak / 2
	l.reset()

	// Quiet: every worker's connection idle. The baseline is taken with the server warm.
	idle := func() sample {
		transport.CloseIdleConnections()
		deadline := time.Now().Add(5 * time.Second)
		s := measure(0, store.Path())
		for time.Now().Before(deadline) { // the server's side of the closed connections ends
			time.Sleep(100 * time.Millisecond)
			next := measure(0, store.Path())
			if next.goroutines >= s.goroutines && next.fds >= s.fds {
				return next
			}
			s = next
		}
		return s
	}
	base := idle()
	var samples []sample
	var mu sync.Mutex
	start := time.Now()
	l.run(context.Background(), soakFor, func(ctx context.Context) {
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				s := measure(time.Since(start), store.Path())
				mu.Lock()
				samples = append(samples, s)
				mu.Unlock()
			}
		}
	}, rate)
	elapsed := time.Since(start)
	// Let the last records expire and be swept, then measure the quiet server again.
	time.Sleep(ttl + 4*sweepInterval)
	end := idle()

	written, iterations := l.written.Load(), l.iterations.Load()
	maxHeap, maxG, maxFile := base.heapMiB, base.goroutines, base.fileMiB
	for _, s := range samples {
		maxHeap, maxG, maxFile = max(maxHeap, s.heapMiB), max(maxG, s.goroutines), max(maxFile, s.fileMiB)
		t.Logf("  %6s  goroutines %4d  heap %6.1f MiB  fds %4d  file %6.2f MiB", s.at.Round(time.Second), s.goroutines, s.heapMiB, s.fds, s.fileMiB)
	}
	t.Logf("soak: %s, %d workers at %.0f iterations/s (half of the peak %.0f/s), %d iterations, %d requests, "+
		"%d errors, goroutines %d->%d (max %d), heap %.1f->%.1f MiB (max %.1f), fds %d->%d, file %.2f->%.2f MiB (max %.2f), "+
		"records written %d, swept %d",
		elapsed.Round(time.Second), workers, float64(iterations)/elapsed.Seconds(), peak, iterations, l.requests.Load(),
		l.errors.Load(), base.goroutines, end.goroutines, maxG, base.heapMiB, end.heapMiB, maxHeap,
		base.fds, end.fds, base.fileMiB, end.fileMiB, maxFile, written, swept.Load())

	if n := l.errors.Load(); n > 0 {
		t.Errorf("%d requests failed under load; first: %s", n, l.firstError())
	}
	if iterations < int64(rate*elapsed.Seconds()/4) {
		t.Errorf("the soak made %d iterations in %s, under a quarter of the %.0f/s it aimed at", iterations, elapsed, rate)
	}
	// Goroutines and descriptors: back to the quiet server's own, give or take a couple.
	if end.goroutines > base.goroutines+3 {
		t.Errorf("goroutines %d after the load, %d before: a leak", end.goroutines, base.goroutines)
	}
	if end.fds > base.fds+3 {
		t.Errorf("open files %d after the load, %d before: a leak", end.fds, base.fds)
	}
	// The heap after a GC: the server keeps no state per request or key, so the quiet server's
	// heap must come back to where it was (give or take 2 MiB of noise, or half of it), and
	// under load stay within a generous factor of it (requests in flight live there too).
	if limit := base.heapMiB + max(2, base.heapMiB/2); end.heapMiB > limit {
		t.Errorf("heap after GC of the quiet server grew from %.1f MiB to %.1f, above %.1f MiB", base.heapMiB, end.heapMiB, limit)
	}
	if limit := 2*base.heapMiB + 16; maxHeap > limit {
		t.Errorf("heap after GC under load reached %.1f MiB, above %.1f MiB (%.1f MiB quiet)", maxHeap, limit, base.heapMiB)
	}
	// The second half of the soak must not hold more than the first: no slow growth.
	if n := len(samples); n >= 4 {
		firstMax, secondMax := 0.0, 0.0
		for i, s := range samples {
			if i < n/2 {
				firstMax = max(firstMax, s.heapMiB)
			} else {
				secondMax = max(secondMax, s.heapMiB)
			}
		}
		if secondMax > 1.5*firstMax+2 {
			t.Errorf("heap after GC grew during the soak: at most %.1f MiB in the first half, %.1f in the second", firstMax, secondMax)
		}
	}
	// Storage: every completed record expires after ttl and the sweeper removes it, so once
	// the load has stopped for longer than that, the store holds (almost) none of them. (Keys
	// whose begin was cut off by the end of a run hold a lease of 30 s; they are not counted.)
	if held := written - swept.Load(); held > 2*workers {
		t.Errorf("%d records completed, %d swept: %d expired records still held", written, swept.Load(), held)
	}
	// The file: bbolt reuses the pages of removed records, so it stops growing once the
	// records written within one ttl fit; one doubling (bbolt grows by doubling) is allowed.
	if fileLimit := 2*base.fileMiB + 1; maxFile > fileLimit {
		t.Errorf("the data file grew from %.2f MiB to %.2f MiB, above %.2f MiB", base.fileMiB, maxFile, fileLimit)
	}
}

// load is the soak's traffic: workers that begin, complete and replay fresh keys, with a GET,
// a release and a delete now and then, and check every answer.
type load struct {
	t      *testing.T
	url    string
	client *http.Client

	iterations, requests, errors, written atomic.Int64
	mu                                    sync.Mutex
	first                                 string
	round                                 atomic.Int64
}

// reset restarts the counts of iterations and requests (not of the records written).
func (l *load) reset() {
	l.iterations.Store(0)
	l.requests.Store(0)
}

func (l *load) firstError() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.first
}

func (l *load) fail(format string, args ...any) {
	l.errors.Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.first == "" {
		l.first = fmt.Sprintf(format, args...)
	}
}

// run runs the workers for d, each paced so that together they make rate iterations per
// second (no pacing when rate is absent), and runs during alongside them.
func (l *load) run(ctx context.Context, d time.Duration, during func(ctx context.Context), rate ...float64) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	round := l.round.Add(1)
	var wg sync.WaitGroup
	if during != nil {
		wg.Add(1)
		go func() { defer wg.Done(); during(ctx) }()
	}
	var interval time.Duration
	if len(rate) > 0 && rate[0] > 0 {
		interval = time.Duration(float64(time.Second) * workers / rate[0])
	}
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			next := time.Now()
			for i := 0; ctx.Err() == nil; i++ {
				if interval > 0 {
					next = next.Add(interval)
					if wait := time.Until(next); wait > 0 {
						select {
						case <-ctx.Done():
							return
						case <-time.After(wait):
						}
					}
				}
				l.iteration(ctx, fmt.Sprintf("soak-%d-%d-%d", round, w, i), i)
			}
		}()
	}
	wg.Wait()
}

// iteration is one key's life: begin, complete, replay; every 10th also a GET, every 25th a
// release and a new begin first, every 50th a delete at the end.
func (l *load) iteration(ctx context.Context, key string, i int) {
	body := make([]byte, 64+i%192)
	_, _ = rand.Read(body)
	fp := "sha256:" + key
	begin := fmt.Sprintf(`{"fingerprint":%q,"ttl_ms":%d}`, fp, ttl.Milliseconds())
	rec, ok := l.call(ctx, "POST", key, "begin", begin, 201)
	if !ok {
		return
	}
	if i%25 == 0 { // the attempt fails: release, and the next begin acquires again
		if _, ok := l.call(ctx, "POST", key, "release", fmt.Sprintf(`{"token":%q}`, rec.Lease.Token), 204); !ok {
			return
		}
		if rec, ok = l.call(ctx, "POST", key, "begin", begin, 201); !ok {
			return
		}
	}
	resp := fmt.Sprintf(`{"status":201,"headers":{"Content-Type":["application/json"]},"body":%q}`,
		base64.StdEncoding.EncodeToString(body))
	if _, ok := l.call(ctx, "POST", key, "complete", fmt.Sprintf(`{"token":%q,"response":%s}`, rec.Lease.Token, resp), 200); !ok {
		return
	}
	l.written.Add(1)
	replay, ok := l.call(ctx, "POST", key, "begin", begin, 200)
	if !ok {
		return
	}
	if replay.Response == nil || !bytes.Equal(replay.Response.Body, body) {
		l.fail("%s: the replay does not carry the stored body", key)
	}
	if i%10 == 0 {
		l.call(ctx, "GET", key, "", "", 200)
	}
	if i%50 == 0 {
		if _, ok := l.call(ctx, "DELETE", key, "", "", 204); ok {
			l.written.Add(-1)
		}
	}
	l.iterations.Add(1)
}

type record struct {
	Lease    struct{ Token string }
	Response *struct{ Body []byte }
}

// call makes one request and checks its status. A request cut short by the end of the run is
// not an error.
func (l *load) call(ctx context.Context, method, key, op, body string, want int) (record, bool) {
	path := l.url + "/v1/keys/" + key
	if op != "" {
		path += "/" + op
	}
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, path, rd)
	if err != nil {
		l.fail("%v", err)
		return record{}, false
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	l.requests.Add(1)
	resp, err := l.client.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			l.fail("%s %s: %v", method, path, err)
		}
		return record{}, false
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != want {
		if ctx.Err() == nil {
			l.fail("%s %s: %d, want %d: %s %v", method, path, resp.StatusCode, want, data, err)
		}
		return record{}, false
	}
	var rec record
	if len(data) > 0 {
		if err := json.Unmarshal(data, &rec); err != nil {
			l.fail("%s %s: %v: %s", method, path, err, data)
			return record{}, false
		}
	}
	return rec, true
}
