package redis

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/redis/rueidis"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
)

// TestCancelledCallerDoesNotEndAnOperation: a caller's context without a deadline (an HTTP
// request's) bounds only an operation's start. Cancelled once the operation is on its way, the
// operation still runs to its end, and its answer is the outcome; cancelled before, the operation
// does not start. A caller's deadline still ends it.
func TestCancelledCallerDoesNotEndAnOperation(t *testing.T) {
	url := redistest.URL(t)
	prefix := redistest.Prefix(t)
	host := strings.TrimPrefix(url, "redis://")
	host = host[:strings.IndexByte(host, '/')]
	path := newSlowPath(t, host, 150*time.Millisecond)
	s, err := Open(context.Background(), strings.Replace(url, host, path.addr, 1), Options{Prefix: prefix, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if c, err := s.rd.client(t.Context()); err == nil && c.Mode() == rueidis.ClientModeCluster {
		t.Skip("the slow path proxies one Redis; IDEMSVC_TEST_REDIS_URL is a cluster")
	}
	if _, err := s.Get(t.Context(), "t", "warm-up"); !errors.Is(err, keys.ErrNotFound) {
		t.Fatalf("Get = %v, want not found", err)
	}
	path.slow.Store(true)

	ctx, cancel := context.WithCancel(t.Context())
	time.AfterFunc(30*time.Millisecond, cancel) // while the begin's script is on the slow path
	start := time.Now()
	res, err := s.Begin(ctx, "t", "order-1", testReq)
	if err != nil || res.Outcome != keys.Acquired {
		t.Fatalf("Begin cancelled on its way = %v, %v after %v; want acquired", res.Outcome, err, time.Since(start))
	}
	if took := time.Since(start); took < path.delay {
		t.Errorf("Begin returned after %v, before its script could reach Redis (%v)", took, path.delay)
	}

	// Cancelled before: not started.
	if _, err := s.Begin(ctx, "t", "order-2", testReq); !errors.Is(err, keys.ErrUnavailable) || !errors.Is(err, context.Canceled) {
		t.Errorf("Begin with a cancelled context = %v, want unavailable and canceled", err)
	}
	path.slow.Store(false)
	if _, err := s.Get(t.Context(), "t", "order-2"); !errors.Is(err, keys.ErrNotFound) {
		t.Errorf("Get of the key a cancelled Begin named = %v, want not found", err)
	}

	// A deadline ends it.
	path.slow.Store(true)
	short, cancelShort := context.WithTimeout(t.Context(), 30*time.Millisecond)
	defer cancelShort()
	start = time.Now()
	if _, err := s.Get(short, "t", "order-1"); !errors.Is(err, keys.ErrUnavailable) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Get with a 30ms deadline = %v, want unavailable and deadline exceeded", err)
	}
	if took := time.Since(start); took > path.delay {
		t.Errorf("Get with a 30ms deadline returned after %v", took)
	}
}
