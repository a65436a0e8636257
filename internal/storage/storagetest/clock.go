package storagetest

import (
	"sync"
	"time"
)

// Start is the time every Clock of the suite starts at. It has nanoseconds, so that a backend
// that loses precision on the way to storage and back fails the suite's exact comparisons.
var Start = time.Date(2030, time.January, 2, 3, 4, 5, 123456789, time.UTC)

// Clock is a fake clock: its time moves only when Advance is called, so that lease and TTL
// tests never sleep. It is safe for concurrent use. Pass its Now to the store under test.
type Clock struct {
	mu  sync.Mutex
	now time.Time
}

// NewClock returns a Clock that reads start until it is advanced.
func NewClock(start time.Time) *Clock { return &Clock{now: start} }

// Now returns the clock's current time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves the clock forward by d (backward when d is negative).
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// advanceTo moves the clock to t.
func (c *Clock) advanceTo(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}
