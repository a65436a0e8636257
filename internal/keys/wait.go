package keys

import (
	"context"
	"errors"
	"time"
)

// maxWaitPoll bounds how long BeginWait sleeps between two begins even without a signal, so that
// a lost notification costs at most this much latency, never a whole wait.
const maxWaitPoll = 250 * time.Millisecond

// minWaitPoll bounds how often a waiter polls: with a store whose clock (Redis's) runs behind
// the caller's, the lease may look expired here while the store still holds it.
const minWaitPoll = 10 * time.Millisecond

// BeginWait is Begin that, when a live lease holds the key, waits up to wait for the holder to
// complete (then it replays), release or lose its lease (then it tries to acquire), and returns
// ErrInProgress when the wait ends first. now is the store's clock, used to time the lease's
// expiry. A wait of 0 is a plain Begin.
func BeginWait(ctx context.Context, s Store, now func() time.Time, tenant, key string, req BeginRequest, wait time.Duration) (BeginResult, error) {
	return BeginWaitUntil(ctx, s, now, tenant, key, req, wait, nil)
}

// Clocked is a Store whose rules run on a clock other than the host's (Redis's TIME, shared by
// every replica): Now is its best estimate of that clock, on which the times of its records
// are. The HTTP server measures a wait's polls and a 409's Retry-After on it, so that a
// replica whose own clock is off still reads the lease's expiry right.
type Clocked interface {
	Now() time.Time
}

// BeginWaitUntil is BeginWait whose wait also ends, with ErrInProgress, when stop is closed (a
// server that shuts down). Only the waiting stops early: a store call under way is never cut
// short, so the answer is always one that the store gave.
func BeginWaitUntil(ctx context.Context, s Store, now func() time.Time, tenant, key string, req BeginRequest, wait time.Duration, stop <-chan struct{}) (BeginResult, error) {
	res, err := s.Begin(ctx, tenant, key, req)
	if wait <= 0 || !errors.Is(err, ErrInProgress) {
		return res, err
	}
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		// Watch before the next begin, so a change between the begin and the wait is not missed.
		changed, unwatch := s.Watch(tenant, key)
		res, err = s.Begin(ctx, tenant, key, req)
		if !errors.Is(err, ErrInProgress) {
			unwatch()
			return res, err
		}
		sleep := min(max(res.Record.Lease.ExpiresAt.Sub(now()), minWaitPoll), maxWaitPoll)
		poll := time.NewTimer(sleep)
		select {
		case <-changed:
		case <-poll.C:
		case <-deadline.C:
			poll.Stop()
			unwatch()
			return res, err
		case <-stop:
			poll.Stop()
			unwatch()
			return res, err
		case <-ctx.Done():
			poll.Stop()
			unwatch()
			return res, ctx.Err()
		}
		poll.Stop()
		unwatch()
	}
}
