package bolt

import (
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/bbolt"
)

// committer is a group commit without a timer. A write joins the pending queue; when no commit
// is running, a committer goroutine starts and commits everything pending in one transaction
// (at most max writes), then everything that queued up meanwhile, and so on until the queue is
// empty. A lone writer therefore never waits for others, and under load each fsync is shared by
// all the writes that arrived during the previous one. bbolt's DB.Batch, by contrast, holds
// every batch open for MaxBatchDelay unless MaxBatchSize writes arrive first, which a closed
// loop of N writers rarely fills exactly (see BenchmarkBeginComplete).
//
// Its rules are DB.Batch's: a function may run more than once, so it must reset what it
// decides at its start; when one function fails, the transaction is rolled back, that function
// is run alone (its error is its caller's), and the others are committed again without it.
type committer struct {
	db     *bbolt.DB
	max    int
	damage *damage

	mu      sync.Mutex
	pending []*call
	running bool

	// foreground is how many of the running transaction's calls are not background ones; only
	// the committer goroutine touches it, and a background function reads it from inside the
	// transaction to size its share (see Store.Sweep).
	foreground int
	// lastForeground is when the committer last started a transaction with writers' calls.
	lastForeground time.Time

	// Cumulative counts of committed transactions, for CommitStats.
	commits, calls atomic.Uint64
	commitNanos    atomic.Int64
}

// quietAfter is how long after the last writer a transaction counts as idle for background
// work: a closed loop of writers resubmits within microseconds of its answer, so a background
// call that finds itself alone right after their commit must not take that for idleness.
const quietAfter = 10 * time.Millisecond

type call struct {
	fn         func(*bbolt.Tx) error
	done       chan error
	background bool
}

// do runs fn in a committed read-write transaction, shared with other writers, and returns
// fn's error or the commit's.
func (c *committer) do(fn func(*bbolt.Tx) error) error {
	return c.enqueue(&call{fn: fn, done: make(chan error, 1)})
}

// doBackground is do for housekeeping (the sweep): fn may ask busy() whether writers share its
// transaction, and then do less.
func (c *committer) doBackground(fn func(*bbolt.Tx) error) error {
	return c.enqueue(&call{fn: fn, done: make(chan error, 1), background: true})
}

// busy reports, from inside a function that the committer runs, whether the transaction also
// carries writers' calls, or writers committed within quietAfter.
func (c *committer) busy() bool {
	return c.foreground > 0 || time.Since(c.lastForeground) < quietAfter
}

func (c *committer) enqueue(cl *call) error {
	c.mu.Lock()
	c.pending = append(c.pending, cl)
	if !c.running {
		c.running = true
		go c.loop()
	}
	c.mu.Unlock()
	return <-cl.done
}

func (c *committer) loop() {
	for {
		c.mu.Lock()
		if len(c.pending) == 0 {
			c.running = false
			c.mu.Unlock()
			return
		}
		n := min(len(c.pending), c.max)
		batch := c.pending[:n:n]
		c.pending = append([]*call(nil), c.pending[n:]...)
		c.mu.Unlock()
		c.commit(batch)
	}
}

func (c *committer) commit(batch []*call) {
	for len(batch) > 0 {
		c.foreground = 0
		for _, cl := range batch {
			if !cl.background {
				c.foreground++
			}
		}
		if c.foreground > 0 {
			c.lastForeground = time.Now()
		}
		failed, current, ranAll := -1, -1, false
		start := time.Now()
		err := updateSafely(c.db, c.damage, func(tx *bbolt.Tx) error {
			for i, cl := range batch {
				current = i
				if err := cl.fn(tx); err != nil {
					failed = i
					return err
				}
			}
			ranAll = true
			return nil
		})
		if failed < 0 && err != nil && !ranAll && current >= 0 {
			failed = current // it panicked: like a failure, it runs alone and the others again
		}
		if failed < 0 { // committed, or the commit itself failed for everyone
			if err == nil {
				c.count(len(batch), start)
			}
			for _, cl := range batch {
				cl.done <- err
			}
			return
		}
		bad := batch[failed]
		c.foreground = 0
		if !bad.background {
			c.foreground = 1
		}
		start = time.Now()
		err = updateSafely(c.db, c.damage, bad.fn)
		if err == nil {
			c.count(1, start) // a background call that gave up partway commits what it did
		}
		bad.done <- err
		batch = append(batch[:failed:failed], batch[failed+1:]...)
	}
}

// count notes a committed transaction of n calls that started at start.
func (c *committer) count(n int, start time.Time) {
	c.commits.Add(1)
	c.calls.Add(uint64(n))
	c.commitNanos.Add(int64(time.Since(start)))
}
