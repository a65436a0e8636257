package keys

import (
	"testing"
	"time"
)

// TestNextChange: the instant after which a decision on a record may differ is its expiry, or
// its live lease's expiry when that comes first; nothing for an absent or expired record.
func TestNextChange(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	inProgress := &Record{State: StateInProgress, Lease: Lease{ExpiresAt: t0.Add(time.Second)}, ExpiresAt: t0.Add(time.Hour)}
	completed := &Record{State: StateCompleted, Lease: Lease{ExpiresAt: t0.Add(time.Second)}, ExpiresAt: t0.Add(time.Hour)}
	for _, c := range []struct {
		name string
		r    *Record
		now  time.Time
		want time.Time
	}{
		{"absent", nil, t0, time.Time{}},
		{"lease first", inProgress, t0, t0.Add(time.Second)},
		{"lease gone", inProgress, t0.Add(time.Second), t0.Add(time.Hour)},
		{"completed: the lease does not count", completed, t0, t0.Add(time.Hour)},
		{"expired", completed, t0.Add(time.Hour), time.Time{}},
	} {
		if got := c.r.NextChange(c.now); !got.Equal(c.want) {
			t.Errorf("%s: NextChange = %v, want %v", c.name, got, c.want)
		}
	}
}
