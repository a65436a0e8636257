package server

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/semaphore"
)

// Bounds on what clients can make the server hold at once (a security audit's finds: 800
// stalled completes of 1.5 MB held 1.4 GB; 5,000 waiting begins 550 MB and a begin each per
// 250 ms each).

// errBusy: the body budget had no room for a request's body in time (503, "Server busy").
var errBusy = errors.New("server busy: too many request bodies being read")

// errShuttingDown: /readyz after Unready (503, "Shutting down").
var errShuttingDown = errors.New("shutting down")

// DefaultMaxWaiters is Options.MaxWaiters when zero.
const DefaultMaxWaiters = 1000

// DefaultBodyBuffer is the least of Options.BodyBuffer when zero.
const DefaultBodyBuffer = 128 << 20

// budgetedBody is the size from which a request body is read under the body budget: below it
// (every begin, and completes of small responses) a body costs less than its connection.
const budgetedBody = 4 << 10

// bodyBudgetWait is how long a request waits for room in the body budget before it is answered
// 503 unavailable (errBusy).
const bodyBudgetWait = 5 * time.Second

// waiters bounds the begins that wait for a holder (wait_ms): in all, and, with several
// tenants, to half of that per tenant. A begin beyond either bound does not wait: it answers 409
// in-progress with Retry-After at once, as with wait_ms 0, which a client must handle anyway.
type waiters struct {
	max, perTenant int
	waiting        prometheus.Gauge
	mu             sync.Mutex
	total          int
	byTenant       map[string]int
}

func newWaiters(limit, tenants int, waiting prometheus.Gauge) *waiters {
	if limit <= 0 {
		limit = DefaultMaxWaiters
	}
	per := limit
	if tenants > 1 {
		per = max(1, limit/2)
	}
	return &waiters{max: limit, perTenant: per, waiting: waiting, byTenant: make(map[string]int)}
}

// enter takes a place for a waiting begin of tenant; it returns false when there is none.
func (ws *waiters) enter(tenant string) bool {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	if ws.total >= ws.max || ws.byTenant[tenant] >= ws.perTenant {
		return false
	}
	ws.total++
	ws.byTenant[tenant]++
	ws.waiting.Inc()
	return true
}

func (ws *waiters) leave(tenant string) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	ws.total--
	ws.waiting.Dec()
	if ws.byTenant[tenant]--; ws.byTenant[tenant] == 0 {
		delete(ws.byTenant, tenant)
	}
}

// bodyBudget bounds the bytes of request bodies being read at once: a body from budgetedBody
// on takes its length (or the largest its request may be, when the length is not told) before
// it is read. With several tenants, one tenant's bodies may take at most half of it, so that
// one tenant's stalled bodies cannot keep every other tenant's completes waiting (a security
// audit's find: 86 connections that each declared 1.5 MB and sent one byte made every other
// tenant's complete over 4 KiB wait 5 s for a 503 "Server busy"). A tenant over its share waits
// on its own semaphore, not in the shared queue, so it never stands before another tenant's
// request there.
type bodyBudget struct {
	sem      *semaphore.Weighted
	maxBytes int64
	held     prometheus.Gauge

	perTenant int64 // 0: one tenant, no shares
	mu        sync.Mutex
	shares    map[string]*tenantShare
}

// tenantShare is one tenant's semaphore and how many of its requests use it, so that it is
// dropped when none does.
type tenantShare struct {
	sem  *semaphore.Weighted
	refs int
}

func newBodyBudget(size, maxRequestBytes int64, tenants int, held prometheus.Gauge) *bodyBudget {
	if size <= 0 {
		size = DefaultBodyBuffer
	}
	size = max(size, 4*maxRequestBytes)
	b := &bodyBudget{sem: semaphore.NewWeighted(size), maxBytes: maxRequestBytes, held: held}
	if tenants > 1 {
		b.perTenant = size / 2
		b.shares = make(map[string]*tenantShare)
	}
	return b
}

// take reserves room for the body of r, a request of tenant that may be at most maxBytes long;
// release gives it back. Only JSON bodies are read into memory (decode reads any other body 512
// bytes at a time, to answer 415). A JSON body longer than maxBytes is errPayloadTooLarge at
// once, as decode would answer after reading it. With no room within bodyBudgetWait (or r's
// context ending first) take fails with errBusy.
func (b *bodyBudget) take(r *http.Request, tenant string, maxBytes int64) (release func(), err error) {
	n := r.ContentLength
	switch {
	case r.Body == nil || r.Body == http.NoBody || (n >= 0 && n < budgetedBody):
		return noRelease, nil
	case !jsonMediaType(r.Header["Content-Type"]): // Header.Get, without canonicalizing
		return noRelease, nil
	case n > maxBytes:
		return nil, errPayloadTooLarge
	case n < 0:
		n = maxBytes // the reader stops there
	}
	ctx, cancel := context.WithTimeout(r.Context(), bodyBudgetWait)
	defer cancel()
	share := b.share(tenant)
	if share != nil {
		if err := acquire(ctx, share.sem, n); err != nil {
			b.unshare(tenant, share)
			return nil, errBusy
		}
	}
	if err := acquire(ctx, b.sem, n); err != nil {
		if share != nil {
			share.sem.Release(n)
			b.unshare(tenant, share)
		}
		return nil, errBusy
	}
	b.held.Add(float64(n))
	return func() {
		b.held.Sub(float64(n))
		b.sem.Release(n)
		if share != nil {
			share.sem.Release(n)
			b.unshare(tenant, share)
		}
	}, nil
}

func acquire(ctx context.Context, sem *semaphore.Weighted, n int64) error {
	if sem.TryAcquire(n) {
		return nil
	}
	return sem.Acquire(ctx, n)
}

// share returns tenant's semaphore, counting one more user, or nil when there are no shares.
func (b *bodyBudget) share(tenant string) *tenantShare {
	if b.shares == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	sh := b.shares[tenant]
	if sh == nil {
		sh = &tenantShare{sem: semaphore.NewWeighted(b.perTenant)}
		b.shares[tenant] = sh
	}
	sh.refs++
	return sh
}

// unshare counts one user of tenant's semaphore less, and drops it when none is left.
func (b *bodyBudget) unshare(tenant string, sh *tenantShare) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if sh.refs--; sh.refs == 0 {
		delete(b.shares, tenant)
	}
}

func noRelease() {}
