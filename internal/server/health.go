package server

import (
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// storeHealth turns store outages into a few log lines. Every request answered 503 for the store
// used to log its own warning, so an outage wrote a line per request and per /readyz probe, and
// its end was never logged. Now:
//   - the first failure logs "store unavailable", with its cause and request id;
//   - a lasting outage is logged again once a minute, with the count of failed requests;
//   - the first operation the store answers after a logged outage logs "store available again",
//     with how long it lasted and how many requests failed;
//   - a store that flaps (a request fails, the next one succeeds, and so on) logs the start of
//     an outage at most once per healthQuiet; the outages in between are counted in the next
//     start line, and an outage whose start was not logged ends silently.
//
// Each failed request keeps its access line (its request id, its 503 and the problem). A nil
// storeHealth logs nothing.
type storeHealth struct {
	logger *zap.Logger
	down   atomic.Bool // read by every successful operation: its only cost while all is well

	mu       sync.Mutex
	since    time.Time // the first failure of the current outage
	failed   int       // requests failed in the current outage
	logged   bool      // whether the current outage's start was logged
	lastLine time.Time // the last start or reminder logged
	unlogged int       // outages since the last logged start whose start was not logged
	unfailed int       // and their failed requests
}

const (
	healthReminder = time.Minute      // how often a lasting outage is logged again
	healthQuiet    = 10 * time.Second // the least time between two logged starts
)

// failure records a request answered 503 because the store is unavailable (err says why). The
// line, if any, is written after the lock is released: a log output that blocks must not hold
// every other failing request too.
func (h *storeHealth) failure(err error, requestID string) {
	if h == nil {
		return
	}
	now := time.Now()
	var msg string
	var fields []zap.Field
	h.mu.Lock()
	if !h.down.Load() {
		h.down.Store(true)
		h.since, h.failed, h.logged = now, 0, false
	}
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

// success records an operation the store answered: the end of an outage, if one was going on.
func (h *storeHealth) success() {
	if h == nil || !h.down.Load() {
		return
	}
	h.mu.Lock()
	if !h.down.Load() {
		h.mu.Unlock()
		return
	}
	h.down.Store(false)
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
