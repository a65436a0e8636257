package idemclient

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestRetryInProgressAgainstIdemsvc retries a begin of a key that another caller holds for an
// hour, against the real idemsvc, whose 409 says Retry-After: 3600 (less the time since the
// hold: parallel tests may start the subtests many seconds after it, on a busy machine).
func TestRetryInProgressAgainstIdemsvc(t *testing.T) {
	t.Parallel()
	url := startIdemsvc(t)
	holder := newTestClient(t, url)
	if _, err := holder.Begin(context.Background(), "held", BeginOptions{Lease: time.Hour}); err != nil {
		t.Fatal(err)
	}
	p := RetryPolicy{MaxAttempts: 3, BaseDelay: time.Millisecond, MaxDelay: time.Millisecond, RetryInProgress: true}

	t.Run("CancelledWhileWaiting", func(t *testing.T) {
		t.Parallel()
		c := newTestClient(t, url, WithRetry(p))
		ctx, cancel := context.WithCancel(context.Background())
		time.AfterFunc(200*time.Millisecond, cancel)
		start := time.Now()
		_, err := c.Begin(ctx, "held", BeginOptions{})
		if !errors.Is(err, context.Canceled) || !errors.Is(err, ErrInProgress) {
			t.Errorf("Begin cancelled while waiting to retry = %v, want context.Canceled and the last error, ErrInProgress", err)
		}
		if elapsed := time.Since(start); elapsed > 5*time.Second {
			t.Errorf("returned after %v, want at the cancel", elapsed)
		}
	})
	t.Run("RetryAfterCapped", func(t *testing.T) {
		t.Parallel()
		p := p
		p.MaxRetryAfter = 300 * time.Millisecond
		c := newTestClient(t, url, WithRetry(p))
		start := time.Now()
		done := make(chan error, 1)
		go func() {
			_, err := c.Begin(context.Background(), "held", BeginOptions{}) // no deadline
			done <- err
		}()
		var err error
		select {
		case err = <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("still waiting after 10s: the Retry-After of an hour is not capped by MaxRetryAfter")
		}
		var e *Error
		if !errors.Is(err, ErrInProgress) || !errors.As(err, &e) || e.RetryAfter < 50*time.Minute {
			t.Fatalf("Begin = %v, want ErrInProgress with the Retry-After of a lease of an hour", err)
		}
		// Two waits of MaxRetryAfter, not of an hour each.
		if elapsed := time.Since(start); elapsed < 2*p.MaxRetryAfter {
			t.Errorf("gave up after %v, want about %v", elapsed, 2*p.MaxRetryAfter)
		}
	})
}
