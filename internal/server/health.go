package server

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// storeHealth turns store outages into a few log lines. Every request answered 503 for the store
// used to log its own warning, so an outage wrote a line per request and per /readyz probe, and
// its end was never logged. Now:
//   - the first failure logs "store unavailable", with its cause and request id;
//   - a lasting outage is logged again once a minute, with the count of failed requests;
//   - the outage ends when the store answers again the kind of operation that failed: a write
//     (a begin that takes the key, complete, renew, release, delete) if writes failed, else a
//     read too (get, a begin that replays, a refusal, /readyz's ping). Then, if its start was
//     logged, "store available again" says how long it lasted and how many requests failed. A
//     store that answers reads but refuses writes (a full disk, Redis at maxmemory) stays down
//     until a write succeeds: a replay or a /readyz probe used to end such an outage, and the
//     next write began another;
//   - a store that flaps (a request fails, the next one succeeds, and so on) logs the start of
//     an outage at most once per healthQuiet; the outages in between are counted in the next
//     start line, and an outage whose start was not logged ends silently.
//
// Each failed request keeps its access line (its request id, its 503 and the problem). A nil
// storeHealth logs nothing.
type storeHealth struct {
	logger *zap.Logger
	// down holds the kinds of operation (opRead, opWrite) that failed in the current outage and
	// have not succeeded since; zero when there is none. Read by every successful operation: its
	// only cost while all is well.
	down atomic.Uint32

	mu       sync.Mutex
	since    time.Time // the first failure of the current outage
	failed   int       // requests failed in the current outage
	logged   bool      // whether the current outage's start was logged
	lastLine time.Time // the last start or reminder logged
	unlogged int       // outages since the last logged start whose start was not logged
	unfailed int       // and their failed requests
}

// The kinds of store operation whose failures and successes storeHealth tells apart.
const (
	opRead  uint32 = 1 << iota // the store answered without writing (or failed to)
	opWrite                    // the store wrote (or failed to)
)

const (
	healthReminder = time.Minute      // how often a lasting outage is logged again
	healthQuiet    = 10 * time.Second // the least time between two logged starts
)

// healthPatience is how long a store call may run before its caller's going away says that the
// store hangs rather than that the caller left: a healthy store answers in milliseconds.
const healthPatience = 500 * time.Millisecond

// callerLeft reports whether a store call begun at start failed only because its caller went
// away (ctx cancelled: the client closed its connection, or a probe gave up) before the store had
// taken healthPatience. Such a call says nothing of the store. One abandoned later does: clients
// and probes that give up after a second or two are waiting on a store that hangs, and that
// outage must show where operators look (a review of the first version, which counted every
// cancelled call as the caller's).
func callerLeft(ctx context.Context, start time.Time) bool {
	return errors.Is(ctx.Err(), context.Canceled) && time.Since(start) < healthPatience
}

// observe records how a store call of kind (opRead or opWrite), begun at start with the request's
// context ctx, ended, and returns its result for the metrics: ok; rejected (a refusal, such as
// not found or in progress, is the store's answer: a read that succeeded); unavailable (an
// outage, logged); cancelled (unavailable only because its client left: see callerLeft); or
// error.
func (h *storeHealth) observe(ctx context.Context, kind uint32, start time.Time, err error) string {
	switch {
	case err == nil:
		h.success(kind)
		return "ok"
	case errors.Is(err, keys.ErrUnavailable) && callerLeft(ctx, start):
		// That says nothing of the store, and is no outage (a chaos audit saw a client's
		// timeout logged as "store unavailable" and counted where operators alert).
		return "cancelled"
	case errors.Is(err, keys.ErrUnavailable):
		h.failure(err, requestID(ctx), kind) // logs the outage, not every request
		return "unavailable"
	case errors.Is(err, keys.ErrNotFound), errors.Is(err, keys.ErrInProgress),
		errors.Is(err, keys.ErrFingerprintMismatch), errors.Is(err, keys.ErrLeaseLost),
		errors.Is(err, keys.ErrAlreadyCompleted):
		h.success(opRead)
		return "rejected"
	default:
		return "error"
	}
}

// failure records an operation of kind (opRead or opWrite) that failed because the store is
// unavailable (err says why): its request is answered 503. The line, if any, is written after
// the lock is released: a log output that blocks must not hold every other failing request too.
func (h *storeHealth) failure(err error, requestID string, kind uint32) {
	if h == nil {
		return
	}
	now := time.Now()
	var msg string
	var fields []zap.Field
	h.mu.Lock()
	down := h.down.Load()
	if down == 0 {
		h.since, h.failed, h.logged = now, 0, false
	}
	h.down.Store(down | kind)
	h.failed++
	switch {
	case !h.logged && (h.lastLine.IsZero() || now.Sub(h.lastLine) >= healthQuiet):
		h.logged, h.lastLine = true, now
		msg = "store unavailable: requests get 503 until it answers again"
		fields = []zap.Field{zap.String("request_id", requestID), zap.Error(err)}
		if h.unlogged > 0 {
			fields = append(fields, zap.Int("brief_outages_before", h.unlogged), zap.Int("their_failed_requests", h.unfailed))
			h.unlogged, h.unfailed = 0, 0
		}
	case h.logged && now.Sub(h.lastLine) >= healthReminder:
		h.lastLine = now
		msg = "store still unavailable"
		fields = []zap.Field{zap.Duration("for", now.Sub(h.since)), zap.Int("failed_requests", h.failed),
			zap.String("request_id", requestID), zap.Error(err)}
	}
	h.mu.Unlock()
	if msg != "" {
		h.logger.Warn(msg, fields...)
	}
}

// success records an operation of kind that the store answered: the end of an outage, if one
// was going on and no other kind of operation has failed in it without succeeding since.
func (h *storeHealth) success(kind uint32) {
	if kind == opWrite {
		kind = opRead | opWrite // a store that wrote also reads: every write reads the key first
	}
	if h == nil || h.down.Load()&kind == 0 {
		return
	}
	h.mu.Lock()
	down := h.down.Load()
	if down&kind == 0 {
		h.mu.Unlock()
		return
	}
	h.down.Store(down &^ kind)
	if down&^kind != 0 { // writes still fail
		h.mu.Unlock()
		return
	}
	logged, since, failed := h.logged, h.since, h.failed
	if !logged {
		h.unlogged++
		h.unfailed += h.failed
	}
	h.mu.Unlock()
	if logged {
		h.logger.Info("store available again", zap.Duration("after", time.Since(since)), zap.Int("failed_requests", failed))
	}
}
