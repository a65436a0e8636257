package redis

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
)

// slowPath is a TCP proxy to Redis that, while slow is set, delivers what the client sends
// delay late, in order (a congested path, a brief partition); answers come back at once. What
// it has read it delivers even after the client went away, as a kernel delivers what it
// buffered.
type slowPath struct {
	addr  string
	delay time.Duration
	slow  atomic.Bool
}

func newSlowPath(t *testing.T, target string, delay time.Duration) *slowPath {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &slowPath{addr: ln.Addr().String(), delay: delay}
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				_ = c.Close()
				continue
			}
			wg.Go(func() { _, _ = io.Copy(c, s); _ = c.Close() })
			wg.Go(func() {
				defer s.Close()
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if p.slow.Load() {
							time.Sleep(p.delay)
						}
						if _, err := s.Write(buf[:n]); err != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			})
		}
	})
	return p
}

// lateStores are two replicas on one Redis: a, whose path to Redis turns slow (400 ms, past
// its 100 ms timeout), and b, whose path is not.
func lateStores(t *testing.T) (a, b *Store, path *slowPath) {
	url := redistest.URL(t)
	prefix := redistest.Prefix(t)
	host := strings.TrimPrefix(url, "redis://")
	host = host[:strings.IndexByte(host, '/')]
	path = newSlowPath(t, host, 400*time.Millisecond)
	a, err := Open(context.Background(), strings.Replace(url, host, path.addr, 1), Options{Prefix: prefix, Timeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if c, err := a.rd.client(t.Context()); err == nil && c.Mode() == rueidis.ClientModeCluster {
		// The client learns the nodes' own addresses from the cluster and goes around the proxy.
		t.Skip("the slow path proxies one Redis; IDEMSVC_TEST_REDIS_URL is a cluster")
	}
	// A replica that has served knows where Redis's clock is.
	if _, err := a.Get(t.Context(), "t", "warm-up"); !errors.Is(err, keys.ErrNotFound) {
		t.Fatalf("Get = %v, want not found", err)
	}
	return a, openTest(t, url, prefix, nil), path
}

// TestLateDeleteDoesNotLand: a Delete answered unavailable (its deadline passed while its
// script was on the way) never lands after that answer. It did: a review delayed one replica's
// traffic by 400 ms, and its Delete, which had returned unavailable, removed a record that
// another replica completed after it; the operation then ran a second time.
func TestLateDeleteDoesNotLand(t *testing.T) {
	a, b, path := lateStores(t)
	ctx := t.Context()
	path.slow.Store(true)
	if err := a.Delete(ctx, "t", "order-1"); !errors.Is(err, keys.ErrUnavailable) {
		t.Fatalf("Delete on the slow replica = %v, want unavailable", err)
	}
	res, err := b.Begin(ctx, "t", "order-1", testReq)
	if err != nil || res.Outcome != keys.Acquired {
		t.Fatalf("Begin = %v, %v; want acquired", res.Outcome, err)
	}
	if _, err := b.Complete(ctx, "t", "order-1", keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * path.delay / 2) // the Delete's script has reached Redis
	res, err = b.Begin(ctx, "t", "order-1", testReq)
	if err != nil || res.Outcome != keys.Replayed {
		t.Errorf("Begin after the late Delete arrived = %v, %v; want replayed: the completed record is gone, and the operation runs again", res.Outcome, err)
	}
}

// casSlowsPath turns the path slow as a compare-and-set is sent: the read before it was quick.
type casSlowsPath struct {
	driver
	path *slowPath
}

func (d casSlowsPath) cas(ctx context.Context, keys [2]string, args []string) (reply, error) {
	d.path.slow.Store(true)
	return d.driver.cas(ctx, keys, args)
}

// TestLateAcquireDoesNotLand: a Begin answered unavailable never takes the key after that
// answer; a lease nobody holds would make every begin 409 until it expired. Both ways a begin
// takes a key: in one round trip (beginScript, decided ahead at the estimate of Redis's clock),
// and after a read (casScript on the absent record), which a replica does when the keys it
// sees are mostly stored already. The first was refused already, late by more than its clock
// window (clockBehind); the second landed.
func TestLateAcquireDoesNotLand(t *testing.T) {
	for _, after := range []bool{false, true} {
		name := map[bool]string{false: "one-round-trip", true: "after-a-read"}[after]
		t.Run(name, func(t *testing.T) {
			a, b, path := lateStores(t)
			ctx := t.Context()
			if after {
				a.fresh.Store(-freshCap)
				a.d = casSlowsPath{a.d, path}
			} else {
				path.slow.Store(true)
			}
			if _, err := a.Begin(ctx, "t", "k", testReq); !errors.Is(err, keys.ErrUnavailable) {
				t.Fatalf("Begin on the slow replica = %v, want unavailable", err)
			}
			time.Sleep(3 * path.delay / 2)
			if res, err := b.Begin(ctx, "t", "k", testReq); err != nil || res.Outcome != keys.Acquired {
				t.Errorf("Begin after the late one arrived = %v, %v; want acquired", res.Outcome, err)
			}
		})
	}
}

// TestRefusedForTheDeadline: a write refused because Redis's clock had passed its deadline as a
// stale estimate put it (trailing Redis's clock by more than the store's timeout) is tried again
// at once with the estimate that the refusal's reply put right, and goes through: it is neither
// a failure nor a compare-and-set lost to other writers again and again.
func TestRefusedForTheDeadline(t *testing.T) {
	url, prefix := redistest.URL(t), redistest.Prefix(t)
	s, err := Open(context.Background(), url, Options{Prefix: prefix, Timeout: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	d := &countingDriver{driver: s.d}
	s.d = d
	ctx := t.Context()
	res, err := s.Begin(ctx, "t", "k", testReq)
	if err != nil {
		t.Fatal(err)
	}
	for _, op := range []struct {
		name, want string // the scripts it runs: reads/cas/begins/deletes
		run        func() error
	}{
		{"Complete", "0/2/0/0", func() error {
			_, err := s.Complete(ctx, "t", "k", keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp})
			return err
		}},
		{"Delete", "0/0/0/2", func() error { return s.Delete(ctx, "t", "k") }},
	} {
		s.clock.offset.Add(int64(-time.Second))
		d.dels.Store(0)
		d.counts()
		if err := op.run(); err != nil {
			t.Errorf("%s with the estimate 1 s behind = %v, want nil", op.name, err)
		}
		got, _ := d.counts()
		if got = fmt.Sprintf("%s/%d", got, d.dels.Load()); got != op.want {
			t.Errorf("%s ran %s scripts (reads/cas/begins/deletes), want %s: refused, then written", op.name, got, op.want)
		}
	}
}
