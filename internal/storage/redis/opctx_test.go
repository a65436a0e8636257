package redis

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// TestCancelledCallerDoesNotEndAnOperation: a caller's context without a deadline (an HTTP
// request's) bounds only an operation's start. Cancelled once the operation is on its way, the
// operation still runs to its end, and its answer is the outcome; cancelled before, the operation
// does not start. A caller's deadline still ends it.
func TestCancelledCallerDoesNotEndAnOperation(t *testing.T) {
	s, path := slowStore(t, 150*time.Millisecond, 2*time.Second)
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
