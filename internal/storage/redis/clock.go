package redis

import (
	"math"
	"sync/atomic"
	"time"
)

// The estimate of Redis's clock, which lets Begin and Complete decide before they reach Redis and
// so save the read's round trip (see the package doc).
//
// Every script reply carries Redis's TIME, taken while the script ran, so between the moment the
// call was sent and the moment its reply arrived. Measured on this process's monotonic clock, a
// reply thus bounds the offset θ = Redis time - monotonic time:
//
//	TIME - received  <=  θ  <=  TIME - sent
//
// The estimate keeps the largest lower bound seen, so it is below Redis's clock by about the
// shortest one-way trip (tens of µs on a LAN), and not by the delay of a busy moment. When a
// reply's upper bound falls below the estimate, the estimate was wrong (Redis's clock stepped back
// or runs slower than ours, or another node of a cluster answered): it starts again from that
// reply's lower bound. The monotonic clock keeps steps of this host's wall clock out of it.
//
// The estimate is only ever a guess: the scripts compare it with their own TIME and write nothing
// when the two are too far apart (clockAhead, clockBehind), so a wrong estimate costs a round
// trip, never a wrong decision.

// How far Redis's TIME, when a script runs, may be from the estimate that a decision was made at:
// at most clockAhead earlier (the estimate ran ahead) and at most clockBehind later (it trailed).
// The fast paths write nothing outside that window. Within it, a record's times (created, lease
// end, expiry) and a new fence's clock floor are that close to Redis's clock at the write, and a
// fast decision is taken only when no time the rules compare against (lease end, expiry) lies in
// the window (see snapshot.steady), so it is the decision Redis's clock gives at the write.
//
// Ahead: the estimate is built to trail Redis (by about the shortest one-way trip), so running
// ahead takes a clock step or drift, which the next reply puts right. 1ms is ample, and keeps the
// times a fast path writes from running ahead of Redis's clock by more than that (the read path
// never wrote a time ahead of it: it decided at the read, before the write).
//
// Behind: a decision that trails the write is what the read path always made (it decided at the
// read's TIME and wrote a round trip later, however long that took), so this bound only chooses
// when to give the fast path up. It must cover the time from taking the estimate to the script's
// run: building the request, the client's queue, Redis's queue, and the goroutine being
// descheduled in between. Well under 1ms on a LAN as a rule, but with 2 busy cores (load 5, the
// race detector on) 5ms missed now and then; 25ms makes a miss rare and still keeps the times a
// fast path writes within a small fraction of any lease a client would ask for.
const (
	clockAhead  = time.Millisecond
	clockBehind = 25 * time.Millisecond
)

// noOffset marks an estimate that has not learned anything yet.
const noOffset = math.MinInt64

type redisClock struct {
	epoch time.Time // carries a monotonic reading: mono(t) is t.Sub(epoch)
	// offset is θ's estimate: Redis's Unix time in ns minus mono(now); noOffset until the first
	// reply.
	offset atomic.Int64
}

func newRedisClock() *redisClock {
	c := &redisClock{epoch: time.Now()}
	c.offset.Store(noOffset)
	return c
}

func (c *redisClock) mono(t time.Time) int64 { return int64(t.Sub(c.epoch)) }

// observe learns from a TIME that Redis took between sent and received (both from time.Now).
func (c *redisClock) observe(sent, received time.Time, redisTime time.Time) {
	r := redisTime.UnixNano()
	// TIME is truncated to the µs: Redis's clock read up to 1µs more.
	lo, hi := r-c.mono(received), r+int64(time.Microsecond)-c.mono(sent)
	for {
		cur := c.offset.Load()
		next := cur
		switch {
		case cur == noOffset || cur > hi:
			next = lo // first reply, or the estimate is ahead of Redis: start again
		case lo > cur:
			next = lo
		}
		if next == cur || c.offset.CompareAndSwap(cur, next) {
			return
		}
	}
}

// now returns the estimate of Redis's clock, truncated to the microsecond like TIME, and false
// when nothing is known yet.
func (c *redisClock) now() (time.Time, bool) {
	off := c.offset.Load()
	if off == noOffset {
		return time.Time{}, false
	}
	ns := c.mono(time.Now()) + off
	return time.Unix(0, ns-ns%1000).UTC(), true
}
