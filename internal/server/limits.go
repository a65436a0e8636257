package server

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/semaphore"

	"github.com/idemsvc/idemsvc/internal/keys"
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

// budget bounds bytes that requests hold at once (bodies being read, large answers being
// written). With several tenants, one tenant may hold at most half of it, so that one tenant's
// stalled clients cannot keep every other tenant waiting (a security audit's find: 86
// connections that each declared 1.5 MB and sent one byte made every other tenant's complete
// over 4 KiB wait 5 s for a 503 "Server busy"). A tenant over its share waits on its own
// semaphore, not in the shared queue, so it never stands before another tenant's request there.
type budget struct {
	sem  *semaphore.Weighted
	size int64
	held prometheus.Gauge
	wait time.Duration // for room: bodyBudgetWait unless Options.BudgetWait says otherwise

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

func newBudget(size int64, tenants int, held prometheus.Gauge) *budget {
	b := &budget{sem: semaphore.NewWeighted(size), size: size, held: held, wait: bodyBudgetWait}
	if tenants > 1 {
		b.perTenant = size / 2
		b.shares = make(map[string]*tenantShare)
	}
	return b
}

// reserve takes n bytes for tenant, waiting at most wait (or until ctx ends) for room; release
// gives them back. It returns false when there was no room in time.
func (b *budget) reserve(ctx context.Context, tenant string, n int64, wait time.Duration) (release func(), ok bool) {
	share := b.share(tenant)
	if !b.acquire(ctx, share, n, wait) {
		if share != nil {
			b.unshare(tenant, share)
		}
		return nil, false
	}
	b.held.Add(float64(n))
	return func() {
		b.held.Sub(float64(n))
		b.sem.Release(n)
		if share != nil {
			share.sem.Release(n)
			b.unshare(tenant, share)
		}
	}, true
}

// acquire takes n from share (when not nil) and then from the whole budget, or nothing,
// waiting for both together at most wait.
func (b *budget) acquire(ctx context.Context, share *tenantShare, n int64, wait time.Duration) bool {
	deadline := time.Now().Add(wait)
	if share != nil && !take(ctx, share.sem, n, deadline) {
		return false
	}
	if !take(ctx, b.sem, n, deadline) {
		if share != nil {
			share.sem.Release(n)
		}
		return false
	}
	return true
}

// take takes n from sem: at once when there is room, else waiting until deadline (or ctx's end).
func take(ctx context.Context, sem *semaphore.Weighted, n int64, deadline time.Time) bool {
	if sem.TryAcquire(n) {
		return true
	}
	if !time.Now().Before(deadline) {
		return false
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	return sem.Acquire(ctx, n) == nil
}

// share returns tenant's semaphore, counting one more user, or nil when there are no shares.
func (b *budget) share(tenant string) *tenantShare {
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
func (b *budget) unshare(tenant string, sh *tenantShare) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if sh.refs--; sh.refs == 0 {
		delete(b.shares, tenant)
	}
}

// bodyBudget bounds the bytes of request bodies being read at once: a body from budgetedBody
// on takes its length (or the largest its request may be, when the length is not told) before
// it is read.
type bodyBudget struct{ *budget }

func newBodyBudget(size, maxRequestBytes int64, tenants int, held prometheus.Gauge) bodyBudget {
	if size <= 0 {
		size = DefaultBodyBuffer
	}
	return bodyBudget{newBudget(max(size, 4*maxRequestBytes), tenants, held)}
}

// take reserves room for the body of r, a request of tenant that may be at most maxBytes long;
// release gives it back. Only JSON bodies are read into memory (decode reads any other body 512
// bytes at a time, to answer 415). A JSON body longer than maxBytes is errPayloadTooLarge at
// once, as decode would answer after reading it. With no room within bodyBudgetWait (or r's
// context ending first) take fails with errBusy.
func (b bodyBudget) take(r *http.Request, tenant string, maxBytes int64) (release func(), err error) {
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
	release, ok := b.reserve(r.Context(), tenant, n, b.wait)
	if !ok {
		return nil, errBusy
	}
	return release, nil
}

// largeAnswer is the size of a stored body from which an answer that carries it (a GET, a
// replay) is written under the answer budget.
const largeAnswer = 64 << 10

// errBusyAnswering: the answer budget had no room for a large answer in time (503, "Server
// busy").
var errBusyAnswering = errors.New("server busy: too many large stored responses being written")

// answerCost is what writing a record with a stored body of body bytes holds until its client
// has read it: the body and its encoding (base64, four bytes for three), and room for the rest.
func answerCost(body int) int64 {
	n := int64(body)
	return n + (n+2)/3*4 + 16<<10
}

// newAnswerBudget is the answer budget: the size of the body budget, and room for four of the
// largest answers at least.
func newAnswerBudget(bodies bodyBudget, l keys.Limits, tenants int, held prometheus.Gauge) *budget {
	return newBudget(max(bodies.size, 4*answerCost(l.MaxBodyBytes)), tenants, held)
}

// capacity is the most one reservation can ever get: the tenant's share, or the whole.
func (b *budget) capacity() int64 {
	if b.shares != nil {
		return b.perTenant
	}
	return b.size
}

func noRelease() {}
