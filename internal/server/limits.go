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
// on takes its length (or the largest request, when the length is not told) before it is read.
type bodyBudget struct {
	sem      *semaphore.Weighted
	maxBytes int64
	held     prometheus.Gauge
}

func newBodyBudget(size, maxRequestBytes int64, held prometheus.Gauge) *bodyBudget {
	if size <= 0 {
		size = DefaultBodyBuffer
	}
	size = max(size, 4*maxRequestBytes)
	return &bodyBudget{sem: semaphore.NewWeighted(size), maxBytes: maxRequestBytes, held: held}
}

// take reserves room for r's body; release gives it back. Only JSON bodies are read into memory
// (decode reads any other body 512 bytes at a time, to answer 415). A JSON body longer than the
// largest request is errPayloadTooLarge at once, as decode would answer after reading it. With
// no room within bodyBudgetWait (or r's context ending first) take fails with errBusy.
func (b *bodyBudget) take(r *http.Request) (release func(), err error) {
	n := r.ContentLength
	switch {
	case r.Body == nil || r.Body == http.NoBody || (n >= 0 && n < budgetedBody):
		return noRelease, nil
	case !jsonMediaType(r.Header["Content-Type"]): // Header.Get, without canonicalizing
		return noRelease, nil
	case n > b.maxBytes:
		return nil, errPayloadTooLarge
	case n < 0:
		n = b.maxBytes // the reader stops there
	}
	if !b.sem.TryAcquire(n) {
		ctx, cancel := context.WithTimeout(r.Context(), bodyBudgetWait)
		defer cancel()
		if err := b.sem.Acquire(ctx, n); err != nil {
			return nil, errBusy
		}
	}
	b.held.Add(float64(n))
	return func() { b.held.Sub(float64(n)); b.sem.Release(n) }, nil
}

func noRelease() {}
