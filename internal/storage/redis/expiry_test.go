package redis

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
	"github.com/idemsvc/idemsvc/internal/storage/redis/redistest"
)

// slowCAS delays the compare-and-set of a write decided on a read (ARGV[10] empty) until hook
// has run: a replica descheduled, or a slow network, between its read and its write.
// (TestWriteAfterExpiry* come from an audit, which found the holder's write landing after the
// record's expiry, seen as gone by another replica in between, in most tries.)
type slowCAS struct {
	driver
	hook func()
}

func (d *slowCAS) cas(ctx context.Context, k [2]string, args []string) (reply, error) {
	if d.hook != nil && args[9] == "" {
		d.hook()
	}
	return d.driver.cas(ctx, k, args)
}

// TestWriteAfterExpiryComplete: a holder's complete decided on a read just before the record
// expires, and sent after another replica answered that the record is gone, must not land.
func TestWriteAfterExpiryComplete(t *testing.T) { writeAfterExpiry(t, false) }

// TestWriteAfterExpiryRenew: the same for a renew.
func TestWriteAfterExpiryRenew(t *testing.T) { writeAfterExpiry(t, true) }

func writeAfterExpiry(t *testing.T, renew bool) {
	url := redistest.URL(t)
	prefix := redistest.Prefix(t)
	ctx := context.Background()
	a := openTest(t, url, prefix, nil) // the replica that began
	b := openTest(t, url, prefix, nil) // the replica the holder's complete reaches (no cached value)
	c := openTest(t, url, prefix, nil) // a reader
	slow := &slowCAS{driver: b.d}
	b.d = slow
	exercised := 0 // tries where the reader saw the record gone before the write was sent
	defer func() {
		if exercised == 0 && !t.Failed() {
			t.Error("in no try did the reader see the record gone before the holder's write: the race was not run")
		}
	}()
	for try := range 20 {
		key := fmt.Sprintf("k%d", try)
		res, err := a.Begin(ctx, "t", key, keys.BeginRequest{Fingerprint: "fp", Lease: 50 * time.Millisecond, TTL: time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		exp := res.Record.ExpiresAt
		var getErr error
		slow.hook = func() {
			for time.Now().Before(exp.Add(100 * time.Microsecond)) { // until the record has expired
			}
			_, getErr = c.Get(ctx, "t", key)
		}
		time.Sleep(time.Until(exp.Add(-3 * time.Millisecond))) // the read comes just before expiry
		var rec keys.Record
		var werr error
		if renew {
			rec, werr = b.Renew(ctx, "t", key, keys.RenewRequest{Token: res.Record.Lease.Token, Lease: time.Hour})
		} else {
			rec, werr = b.Complete(ctx, "t", key, keys.CompleteRequest{Token: res.Record.Lease.Token, Response: testResp, TTL: time.Hour})
		}
		slow.hook = nil
		after, aerr := c.Get(ctx, "t", key)
		if errors.Is(getErr, keys.ErrNotFound) {
			exercised++
		}
		if errors.Is(getErr, keys.ErrNotFound) && werr == nil && aerr == nil {
			t.Errorf("try %d: record expires_at %s; Get after that: %v; then the holder's write (renew=%v) returned state=%s, nil; Get now: state=%s expires_at=%s",
				try, exp.Format(time.RFC3339Nano), getErr, renew, rec.State, after.State, after.ExpiresAt.Format(time.RFC3339Nano))
			return
		}
	}
}
