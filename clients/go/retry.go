package idemclient

import (
	"math/rand/v2"
	"time"
)

// RetryPolicy says which failed calls the client repeats and how long it waits in between.
//
// A call is retried only when a repetition can succeed and is safe:
//
//   - on a transport error (no response: connection refused or reset, a timed-out attempt);
//   - on 502, 503 and 504 (idemsvc or its store unreachable), and 429;
//   - on 500 (ErrInternal) from Complete only: a response not recorded makes the work run again
//     once the lease runs out, and the same complete again is safe;
//   - on 409 in-progress from Begin, only when RetryInProgress is set.
//
// Every other 4xx is final: the same request would get the same answer.
//
// The wait before attempt n+1 is a random duration between 0 and min(MaxDelay,
// BaseDelay*2^(n-1)) ("full jitter"), or the response's Retry-After when it has one, but never
// more than MaxRetryAfter (30s by default): a proxy may ask for up to a day, and a call without a
// deadline would otherwise wait that long for each retry. The client gives up at once, returning
// the last error, when that wait would end after the context's deadline. When the context is
// cancelled during the wait, the call returns at once with an error that matches the context's
// error (context.Canceled or context.DeadlineExceeded) and wraps the last error.
//
// All endpoints are safe to repeat. Complete with the same token and response answers 200 again,
// renew extends again, release of a released key answers 204. Begin is the one to think about: if
// a begin acquired the key but its 201 was lost (a transport error after the server answered),
// the repeated begin finds the key held by that unseen lease and gets ErrInProgress until the
// lease runs out (after BeginOptions.Lease, or the server's default lease without one). The
// operation then runs once, later, by whoever begins after the expiry; it is never run twice.
// Keep leases short where this delay matters.
type RetryPolicy struct {
	// MaxAttempts is the most attempts of one call, the first included. 1 disables retries;
	// 0 means the default, 4.
	MaxAttempts int
	// BaseDelay is the backoff's first ceiling; 0 means 100ms.
	BaseDelay time.Duration
	// MaxDelay caps the backoff (not a Retry-After); 0 means 2s.
	MaxDelay time.Duration
	// MaxRetryAfter caps the wait that a response's Retry-After asks for; 0 means 30s, which is
	// idemsvc's default lease, so that its Retry-After on a 409 in-progress (the time left on the
	// holder's lease) is honoured in full unless its leases are configured longer.
	MaxRetryAfter time.Duration
	// AttemptTimeout bounds one attempt (a begin's Wait is added to it); 0 means 10s. It makes a
	// hung connection a transport error that can be retried.
	AttemptTimeout time.Duration
	// RetryInProgress makes Begin retry a 409 in-progress, after its Retry-After (at most
	// MaxRetryAfter). Prefer
	// BeginOptions.Wait, which waits on the server and answers as soon as the holder finishes.
	RetryInProgress bool
}

// DefaultRetryPolicy returns the policy a Client has unless WithRetry says otherwise: 4 attempts,
// backoff from 100ms to 2s, a Retry-After honoured up to 30s, 10s per attempt, no retry of
// in-progress.
func DefaultRetryPolicy() RetryPolicy {
	return RetryPolicy{MaxAttempts: 4, BaseDelay: 100 * time.Millisecond, MaxDelay: 2 * time.Second,
		MaxRetryAfter: 30 * time.Second, AttemptTimeout: 10 * time.Second}
}

func (p RetryPolicy) withDefaults() RetryPolicy {
	d := DefaultRetryPolicy()
	if p.MaxAttempts <= 0 {
		p.MaxAttempts = d.MaxAttempts
	}
	if p.BaseDelay <= 0 {
		p.BaseDelay = d.BaseDelay
	}
	if p.MaxDelay <= 0 {
		p.MaxDelay = d.MaxDelay
	}
	if p.MaxRetryAfter <= 0 {
		p.MaxRetryAfter = d.MaxRetryAfter
	}
	if p.AttemptTimeout <= 0 {
		p.AttemptTimeout = d.AttemptTimeout
	}
	return p
}

// backoff returns the full-jitter wait before the attempt after attempt (1-based).
func (p RetryPolicy) backoff(attempt int) time.Duration {
	ceiling := p.BaseDelay
	for i := 1; i < attempt && ceiling < p.MaxDelay; i++ {
		ceiling *= 2
	}
	ceiling = min(ceiling, p.MaxDelay)
	if ceiling <= 0 {
		return 0
	}
	return rand.N(ceiling + 1)
}

// delay returns the wait before the attempt after attempt (1-based), whose answer had the
// Retry-After retryAfter (0: none): that, up to MaxRetryAfter, else the backoff.
func (p RetryPolicy) delay(attempt int, retryAfter time.Duration) time.Duration {
	if retryAfter > 0 {
		return min(retryAfter, p.MaxRetryAfter)
	}
	return p.backoff(attempt)
}
