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

// TestRulesAndMemo: a replay shares the Memo of the record it replays (that is what a server
// keeps an encoding in), and every record a rule derives from another starts without one, so
// that nothing kept for the old record is taken for the new one.
func TestRulesAndMemo(t *testing.T) {
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	memo := new(Memo)
	memo.Store("the old record's")
	completed := &Record{Key: "k", State: StateCompleted, Fingerprint: "fp", Lease: Lease{Token: "t", Fence: 1},
		Response: &Response{Status: 200}, CreatedAt: now, CompletedAt: now, ExpiresAt: now.Add(time.Hour), Memo: memo}
	res, _, err := DecideBegin(completed, now, "k", BeginRequest{Fingerprint: "fp", Lease: time.Minute, TTL: time.Hour})
	if err != nil || res.Outcome != Replayed || res.Record.Memo != memo {
		t.Errorf("replay: %v, %v, Memo %p, want Replayed with Memo %p", res.Outcome, err, res.Record.Memo, memo)
	}
	if got, err := DecideGet(completed, now); err != nil || got.Memo != memo {
		t.Errorf("get: %v, Memo %p, want Memo %p", err, got.Memo, memo)
	}

	inProgress := &Record{Key: "k", State: StateInProgress, Fingerprint: "fp", Lease: Lease{Token: "t", Fence: 1, ExpiresAt: now.Add(time.Minute)},
		CreatedAt: now, ExpiresAt: now.Add(time.Hour), TTL: time.Hour, Memo: memo}
	done, w, err := DecideComplete(inProgress, now, CompleteRequest{Token: "t", Response: Response{Status: 201}})
	if err != nil || w != WritePut || done.Memo != nil {
		t.Errorf("complete: %v, %v, Memo %p, want a new record without a Memo", w, err, done.Memo)
	}
	renewed, w, err := DecideRenew(inProgress, now, RenewRequest{Token: "t", Lease: time.Minute})
	if err != nil || w != WritePut || renewed.Memo != nil {
		t.Errorf("renew: %v, %v, Memo %p, want a new record without a Memo", w, err, renewed.Memo)
	}
	expired := *completed
	expired.ExpiresAt = now
	taken, _, err := DecideBegin(&expired, now, "k", BeginRequest{Fingerprint: "fp", Lease: time.Minute, TTL: time.Hour})
	if err != nil || taken.Outcome != Acquired || taken.Record.Memo != nil {
		t.Errorf("begin after expiry: %v, %v, Memo %p, want Acquired without a Memo", taken.Outcome, err, taken.Record.Memo)
	}
	if (*Memo)(nil).Load() != nil {
		t.Error("a nil Memo holds something")
	}
	(*Memo)(nil).Store(1) // drops it, does not panic
}
