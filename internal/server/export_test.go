package server

import (
	"time"

	"go.uber.org/zap"
)

// ReadErrorForTest is readError, for the tests of package server_test.
var ReadErrorForTest = readError

// StoreHealthForTest exposes storeHealth to the tests of package server_test.
type StoreHealthForTest struct{ h *storeHealth }

func NewStoreHealthForTest(l *zap.Logger) StoreHealthForTest {
	return StoreHealthForTest{&storeHealth{logger: l}}
}
func (t StoreHealthForTest) Failure(err error, id string) { t.h.failure(err, id, opWrite) }
func (t StoreHealthForTest) Success()                     { t.h.success(opWrite) }

// Age moves the health's last logged line d into the past.
func (t StoreHealthForTest) Age(d time.Duration) {
	t.h.mu.Lock()
	t.h.lastLine = t.h.lastLine.Add(-d)
	t.h.since = t.h.since.Add(-d)
	t.h.mu.Unlock()
}

// NewRequestID is newRequestID, for TestRequestIDsAreDistinct.
var NewRequestID = newRequestID
