package bolt

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

type epochClock struct {
	mu sync.RWMutex
	t  atomic.Int64
}

func (c *epochClock) now() time.Time { return time.Unix(0, c.t.Load()) }

type mstate struct {
	state    int // 0 none, 1 in progress, 2 completed
	token    string
	body     string
	leaseEnd time.Time
	expires  time.Time
}

// TestAuditStress: per-key sequential workers (exact model per key), checkpoints every
// millisecond, sweeps and clock steps concurrently, restarts in between; fences must grow
// per tenant in real-time order.
func TestAuditStress(t *testing.T) {
	dur := 3 * time.Second
	clk := &epochClock{}
	clk.t.Store(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	path := filepath.Join(t.TempDir(), FileName)
	var maxFence [2]atomic.Uint64
	models := make([]map[string]*mstate, 4)
	for i := range models {
		models[i] = map[string]*mstate{}
	}
	for round := range 3 {
		s, err := Open(path, Options{Now: clk.now, CheckpointInterval: time.Millisecond, CheckpointBytes: 4096})
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var failed atomic.Bool
		fail := func(format string, a ...any) {
			failed.Store(true)
			t.Errorf(format, a...)
		}
		// clock and sweeper
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				time.Sleep(2 * time.Millisecond)
				clk.mu.Lock()
				clk.t.Add(int64(time.Second))
				clk.mu.Unlock()
				if _, err := s.Sweep(ctx, 1000); err != nil {
					fail("sweep: %v", err)
					return
				}
			}
		}()
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(w), uint64(round)))
				tenant := fmt.Sprintf("t%d", w%2)
				m := models[w]
				for !failed.Load() {
					select {
					case <-stop:
						return
					default:
					}
					key := fmt.Sprintf("w%d-k%d", w, rng.IntN(6))
					st := m[key]
					if st == nil {
						st = &mstate{}
						m[key] = st
					}
					clk.mu.RLock()
					now := clk.now()
					if st.state != 0 && !now.Before(st.expires) {
						st.state = 0
					}
					switch op := rng.IntN(10); {
					case op < 4: // begin
						before := maxFence[w%2].Load()
						res, err := s.Begin(ctx, tenant, key, keys.BeginRequest{Lease: 3 * time.Second, TTL: 5 * time.Second})
						switch {
						case st.state == 2:
							if err != nil || res.Outcome != keys.Replayed || string(res.Record.Response.Body) != st.body {
								fail("%s begin: want replay %q, got %v %v", key, st.body, res.Outcome, err)
							}
						case st.state == 1 && now.Before(st.leaseEnd):
							if !errors.Is(err, keys.ErrInProgress) {
								fail("%s begin: want in progress, got %v %v", key, res.Outcome, err)
							}
						default:
							if err != nil || (res.Outcome != keys.Acquired && res.Outcome != keys.TakenOver) {
								fail("%s begin (state %d): want acquire, got %v %v", key, st.state, res.Outcome, err)
								break
							}
							if f := res.Record.Lease.Fence; f <= before {
								fail("%s: fence %d <= %d acknowledged before", key, f, before)
							}
							for {
								cur := maxFence[w%2].Load()
								if res.Record.Lease.Fence <= cur || maxFence[w%2].CompareAndSwap(cur, res.Record.Lease.Fence) {
									break
								}
							}
							leaseEnd := now.Add(3 * time.Second)
							*st = mstate{state: 1, token: res.Record.Lease.Token, leaseEnd: leaseEnd, expires: now.Add(5 * time.Second)}
						}
					case op < 7: // complete
						body := fmt.Sprintf("b%d", rng.Int())
						_, err := s.Complete(ctx, tenant, key, keys.CompleteRequest{Token: st.token, Response: keys.Response{Status: 200, Body: []byte(body)}})
						if st.state == 1 {
							if err != nil {
								fail("%s complete: %v", key, err)
							}
							st.state, st.body, st.expires = 2, body, now.Add(5*time.Second)
						} else if err == nil && st.state == 0 {
							fail("%s complete of nothing succeeded", key)
						}
					case op < 8:
						if err := s.Delete(ctx, tenant, key); err != nil {
							fail("%s delete: %v", key, err)
						}
						st.state = 0
					default:
						rec, err := s.Get(ctx, tenant, key)
						switch st.state {
						case 0:
							if !errors.Is(err, keys.ErrNotFound) {
								fail("%s get: want none, got %+v %v", key, rec.State, err)
							}
						case 1:
							if err != nil || rec.State != keys.StateInProgress {
								fail("%s get: want in progress, got %v %v", key, rec.State, err)
							}
						case 2:
							if err != nil || rec.Response == nil || string(rec.Response.Body) != st.body {
								fail("%s get: want %q, got %v", key, st.body, err)
							}
						}
					}
					clk.mu.RUnlock()
				}
			}()
		}
		time.Sleep(dur)
		close(stop)
		wg.Wait()
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if failed.Load() {
			return
		}
		st := s.CommitStats()
		t.Logf("round %d: %d commits, %d checkpoints", round, st.Commits, st.Checkpoints)
	}
}
