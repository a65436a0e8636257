package storagetest

import (
	"testing"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// The rows of CONTRACT.md's tables for begin, complete, renew, release, get and delete.

func (s *suite) beginTests() []subtest {
	return []subtest{
		{"Acquire", func(t *testing.T) {
			e := s.env(t)
			got := e.acquire("key-1", req)
			checkToken(t, got.Lease.Token)
			if got.Lease.Fence == 0 {
				t.Errorf("fence 0, want > 0")
			}
			want := inProgress("key-1", req, Start, got.Lease.Token, got.Lease.Fence)
			checkRecord(t, "acquired record", got, want)
			e.wantRecord("key-1", want.Public())

			// Another key: another token.
			other := e.acquire("key-2", req)
			if other.Lease.Token == got.Lease.Token {
				t.Errorf("two leases share the token %q", got.Lease.Token)
			}
		}},
		{"ReplayCompleted", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			e.clock.Advance(time.Second)
			resp := response("replay")
			want := completedFrom(held, resp, e.now(), 0)
			e.complete("key", held.Lease.Token, resp, 0)
			e.clock.Advance(time.Hour) // far past the lease: still replayed
			e.wantReplay("key", req, want)
			e.wantReplay("key", req, want)
			e.wantRecord("key", want)
		}},
		{"InProgress", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			e.clock.Advance(lease - time.Nanosecond) // the last instant of the lease
			res := e.wantBeginErr("key", req, keys.ErrInProgress)
			checkRecord(t, "in-progress result", res.Record, held.Public())
			e.wantRecord("key", held.Public())
		}},
		{"FingerprintMismatch", func(t *testing.T) {
			cases := []struct {
				name      string
				stored    string
				completed bool
				leaseOver bool
				asked     string
			}{
				{"InProgress", "fp-1", false, false, "fp-2"},
				{"InProgressEmptyAsked", "fp-1", false, false, ""},
				{"InProgressLeaseOver", "fp-1", false, true, "fp-2"},
				{"Completed", "fp-1", true, false, "fp-2"},
				{"CompletedEmptyAsked", "fp-1", true, false, ""},
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					t.Parallel()
					e := s.env(t)
					r := req
					r.Fingerprint = c.stored
					held := e.acquire("key", r)
					want := held.Public()
					if c.completed {
						want = e.complete("key", held.Lease.Token, response("secret"), 0)
					}
					if c.leaseOver {
						e.clock.Advance(lease)
					}
					r.Fingerprint = c.asked
					res := e.wantBeginErr("key", r, keys.ErrFingerprintMismatch)
					if res.Record.Response != nil || res.Record.Lease.Token != "" || res.Outcome == keys.Replayed {
						t.Errorf("a mismatch showed %v %s", res.Outcome, show(res.Record))
					}
					e.wantRecord("key", want)
				})
			}
		}},
		{"EmptyStoredFingerprintMatchesAny", func(t *testing.T) {
			e := s.env(t)
			r := req
			r.Fingerprint = ""
			held := e.acquire("key", r)
			for _, asked := range []string{"", "fp-x"} {
				r.Fingerprint = asked
				res := e.wantBeginErr("key", r, keys.ErrInProgress)
				checkRecord(t, "in-progress result", res.Record, held.Public())
			}
			want := e.complete("key", held.Lease.Token, response("any"), 0)
			for _, asked := range []string{"", "fp-x", "fp-y"} {
				r.Fingerprint = asked
				e.wantReplay("key", r, want)
			}
		}},
		{"TakeOver", func(t *testing.T) {
			e := s.env(t)
			first := e.acquire("key", req)
			e.advanceTo(first.Lease.ExpiresAt) // the lease ends at its expiry, exactly
			got := e.takeOver("key", req)
			checkToken(t, got.Lease.Token)
			if got.Lease.Token == first.Lease.Token {
				t.Errorf("takeover kept the token %q", got.Lease.Token)
			}
			checkFenceAbove(t, "takeover", got.Lease.Fence, first.Lease.Fence)
			want := inProgress("key", req, e.now(), got.Lease.Token, got.Lease.Fence)
			want.CreatedAt = first.CreatedAt // the record is the same one, under a new lease
			checkRecord(t, "taken-over record", got, want)
			e.wantRecord("key", want.Public())
		}},
		{"TakeOverAdoptsFingerprint", func(t *testing.T) {
			e := s.env(t)
			r := req
			r.Fingerprint = ""
			first := e.acquire("key", r)
			e.advanceTo(first.Lease.ExpiresAt)
			got := e.takeOver("key", req)
			if got.Fingerprint != req.Fingerprint {
				t.Errorf("fingerprint %q after takeover, want %q", got.Fingerprint, req.Fingerprint)
			}
			r.Fingerprint = "fp-other"
			e.wantBeginErr("key", r, keys.ErrFingerprintMismatch)
		}},
	}
}

func (s *suite) completeTests() []subtest {
	return []subtest{
		{"OK", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			e.clock.Advance(2 * time.Second)
			resp := response("ok")
			got := e.complete("key", held.Lease.Token, resp, 0)
			want := completedFrom(held, resp, e.now(), 0)
			checkRecord(t, "completed record", got, want)
			e.wantRecord("key", want)
		}},
		{"AfterLeaseRanOut", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			e.clock.Advance(lease + time.Hour) // nobody took over
			resp := response("late")
			got := e.complete("key", held.Lease.Token, resp, 0)
			checkRecord(t, "completed record", got, completedFrom(held, resp, e.now(), 0))
		}},
		{"Retry", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			first := e.complete("key", held.Lease.Token, response("once"), 0)
			e.clock.Advance(time.Minute)
			again := e.complete("key", held.Lease.Token, response("once"), 0) // an equal, separate value
			checkRecord(t, "retried complete", again, first)
			e.wantRecord("key", first)
		}},
		{"RetryOtherResponse", func(t *testing.T) {
			cases := []struct {
				name   string
				change func(r *keys.Response)
			}{
				{"Body", func(r *keys.Response) { r.Body = append(r.Body, '!') }},
				{"Status", func(r *keys.Response) { r.Status = 200 }},
				{"HeaderValue", func(r *keys.Response) { r.Headers["X-Multi"] = []string{"two", "one"} }},
				{"HeaderAdded", func(r *keys.Response) { r.Headers["X-More"] = []string{"1"} }},
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					t.Parallel()
					e := s.env(t)
					held := e.acquire("key", req)
					first := e.complete("key", held.Lease.Token, response("first"), 0)
					other := response("first")
					c.change(&other)
					_, err := e.s.Complete(e.ctx, tenant, "key", keys.CompleteRequest{Token: held.Lease.Token, Response: other})
					wantErr(t, "Complete with another response", err, keys.ErrAlreadyCompleted)
					e.wantRecord("key", first)
				})
			}
		}},
		{"OtherToken", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			first := e.complete("key", held.Lease.Token, response("first"), 0)
			_, err := e.s.Complete(e.ctx, tenant, "key", keys.CompleteRequest{Token: keys.NewToken(), Response: response("first")})
			wantErr(t, "Complete by another token", err, keys.ErrAlreadyCompleted)
			e.wantRecord("key", first)
		}},
		{"ErrLeaseLost", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			_, err := e.s.Complete(e.ctx, tenant, "key", keys.CompleteRequest{Token: keys.NewToken(), Response: response("x")})
			wantErr(t, "Complete with a wrong token", err, keys.ErrLeaseLost)
			e.wantRecord("key", held.Public())
		}},
		{"StaleHolder", func(t *testing.T) {
			e := s.env(t)
			stale := e.acquire("key", req)
			e.advanceTo(stale.Lease.ExpiresAt)
			cur := e.takeOver("key", req)
			_, err := e.s.Complete(e.ctx, tenant, "key", keys.CompleteRequest{Token: stale.Lease.Token, Response: response("stale")})
			wantErr(t, "Complete by the stale holder", err, keys.ErrLeaseLost)
			e.wantRecord("key", cur.Public())
			// The current holder completes; the stale one is then told it is completed.
			done := e.complete("key", cur.Lease.Token, response("current"), 0)
			_, err = e.s.Complete(e.ctx, tenant, "key", keys.CompleteRequest{Token: stale.Lease.Token, Response: response("current")})
			wantErr(t, "Complete by the stale holder after completion", err, keys.ErrAlreadyCompleted)
			e.wantRecord("key", done)
		}},
		{"NotFound", func(t *testing.T) {
			e := s.env(t)
			_, err := e.s.Complete(e.ctx, tenant, "key", keys.CompleteRequest{Token: keys.NewToken(), Response: response("x")})
			wantErr(t, "Complete of a missing key", err, keys.ErrNotFound)
			e.wantGone("key")
		}},
	}
}

func (s *suite) renewTests() []subtest {
	return []subtest{
		{"Extends", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			e.clock.Advance(10 * time.Second)
			got, err := e.s.Renew(e.ctx, tenant, "key", keys.RenewRequest{Token: held.Lease.Token, Lease: time.Minute})
			if err != nil {
				t.Fatalf("Renew: %v", err)
			}
			want := held
			want.Lease.ExpiresAt = e.now().Add(time.Minute)
			checkRecord(t, "renewed record", got, want) // the holder sees its token
			e.wantRecord("key", want.Public())
			// The old expiry no longer frees the key; the new one does.
			e.advanceTo(held.Lease.ExpiresAt)
			e.wantBeginErr("key", req, keys.ErrInProgress)
			e.advanceTo(want.Lease.ExpiresAt)
			e.takeOver("key", req)
		}},
		{"ExtendsRecordExpiry", func(t *testing.T) {
			e := s.env(t)
			r := keys.BeginRequest{Fingerprint: fp, Lease: 30 * time.Second, TTL: time.Minute}
			held := e.acquire("key", r)
			e.clock.Advance(50 * time.Second)
			got, err := e.s.Renew(e.ctx, tenant, "key", keys.RenewRequest{Token: held.Lease.Token, Lease: time.Minute})
			if err != nil {
				t.Fatalf("Renew: %v", err)
			}
			want := held
			want.Lease.ExpiresAt = e.now().Add(time.Minute)
			want.ExpiresAt = want.Lease.ExpiresAt // the record lives as long as its lease
			checkRecord(t, "renewed record", got, want)
			// Past the begin's expiry the record is still there, even for a sweep.
			e.advanceTo(held.ExpiresAt.Add(time.Second))
			e.wantSweep(0)
			e.wantRecord("key", want.Public())
			e.advanceTo(want.ExpiresAt)
			e.wantGone("key")
			e.wantSweep(1)
		}},
		{"AfterLeaseRanOut", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			e.clock.Advance(lease + time.Minute) // nobody took over
			got, err := e.s.Renew(e.ctx, tenant, "key", keys.RenewRequest{Token: held.Lease.Token, Lease: lease})
			if err != nil {
				t.Fatalf("Renew: %v", err)
			}
			want := held
			want.Lease.ExpiresAt = e.now().Add(lease)
			checkRecord(t, "renewed record", got, want)
		}},
		{"NotFound", func(t *testing.T) {
			e := s.env(t)
			_, err := e.s.Renew(e.ctx, tenant, "key", keys.RenewRequest{Token: keys.NewToken(), Lease: lease})
			wantErr(t, "Renew of a missing key", err, keys.ErrNotFound)
			e.wantGone("key")
		}},
		{"ErrLeaseLost", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			_, err := e.s.Renew(e.ctx, tenant, "key", keys.RenewRequest{Token: keys.NewToken(), Lease: time.Hour})
			wantErr(t, "Renew with a wrong token", err, keys.ErrLeaseLost)
			e.wantRecord("key", held.Public())
		}},
		{"StaleHolder", func(t *testing.T) {
			e := s.env(t)
			stale := e.acquire("key", req)
			e.advanceTo(stale.Lease.ExpiresAt)
			cur := e.takeOver("key", req)
			_, err := e.s.Renew(e.ctx, tenant, "key", keys.RenewRequest{Token: stale.Lease.Token, Lease: time.Hour})
			wantErr(t, "Renew by the stale holder", err, keys.ErrLeaseLost)
			e.wantRecord("key", cur.Public())
		}},
		{"Completed", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			done := e.complete("key", held.Lease.Token, response("x"), 0)
			_, err := e.s.Renew(e.ctx, tenant, "key", keys.RenewRequest{Token: held.Lease.Token, Lease: time.Hour})
			wantErr(t, "Renew of a completed record", err, keys.ErrLeaseLost)
			e.wantRecord("key", done)
		}},
	}
}

func (s *suite) releaseTests() []subtest {
	return []subtest{
		{"OK", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			wantErr(t, "Release", e.s.Release(e.ctx, tenant, "key", held.Lease.Token), nil)
			e.wantGone("key")
			next := e.acquire("key", req) // acquired, not taken over: the attempt is not cached
			checkFenceAbove(t, "begin after release", next.Lease.Fence, held.Lease.Fence)
			checkRecord(t, "acquired record", next, inProgress("key", req, e.now(), next.Lease.Token, next.Lease.Fence))
		}},
		{"NotFound", func(t *testing.T) {
			e := s.env(t)
			wantErr(t, "Release of a missing key", e.s.Release(e.ctx, tenant, "key", keys.NewToken()), nil)
			held := e.acquire("key", req)
			wantErr(t, "Release", e.s.Release(e.ctx, tenant, "key", held.Lease.Token), nil)
			wantErr(t, "Release again", e.s.Release(e.ctx, tenant, "key", held.Lease.Token), nil)
			e.wantGone("key")
		}},
		{"Completed", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			done := e.complete("key", held.Lease.Token, response("x"), 0)
			for _, token := range []string{held.Lease.Token, keys.NewToken()} {
				wantErr(t, "Release of a completed record", e.s.Release(e.ctx, tenant, "key", token), keys.ErrAlreadyCompleted)
			}
			e.wantRecord("key", done)
		}},
		{"ErrLeaseLost", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			wantErr(t, "Release with a wrong token", e.s.Release(e.ctx, tenant, "key", keys.NewToken()), keys.ErrLeaseLost)
			e.wantRecord("key", held.Public())
		}},
		{"StaleHolder", func(t *testing.T) {
			e := s.env(t)
			stale := e.acquire("key", req)
			e.advanceTo(stale.Lease.ExpiresAt)
			cur := e.takeOver("key", req)
			wantErr(t, "Release by the stale holder", e.s.Release(e.ctx, tenant, "key", stale.Lease.Token), keys.ErrLeaseLost)
			e.wantRecord("key", cur.Public())
		}},
	}
}

func (s *suite) getTests() []subtest {
	return []subtest{
		{"InProgress", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			got := e.get("key")
			if got.Lease.Token != "" {
				t.Errorf("Get showed the token %q", got.Lease.Token)
			}
			checkRecord(t, "Get", got, held.Public())
		}},
		{"Completed", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			resp := response("get")
			e.complete("key", held.Lease.Token, resp, 0)
			checkRecord(t, "Get", e.get("key"), completedFrom(held, resp, e.now(), 0))
		}},
		{"NotFound", func(t *testing.T) {
			e := s.env(t)
			e.wantGone("key")
		}},
	}
}

func (s *suite) deleteTests() []subtest {
	return []subtest{
		{"InProgress", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			wantErr(t, "Delete", e.s.Delete(e.ctx, tenant, "key"), nil)
			e.wantGone("key")
			_, err := e.s.Complete(e.ctx, tenant, "key", keys.CompleteRequest{Token: held.Lease.Token, Response: response("x")})
			wantErr(t, "Complete after delete", err, keys.ErrNotFound)
			next := e.acquire("key", req)
			checkFenceAbove(t, "begin after delete", next.Lease.Fence, held.Lease.Fence)
		}},
		{"Completed", func(t *testing.T) {
			e := s.env(t)
			held := e.acquire("key", req)
			e.complete("key", held.Lease.Token, response("x"), 0)
			wantErr(t, "Delete", e.s.Delete(e.ctx, tenant, "key"), nil)
			e.wantGone("key")
			next := e.acquire("key", req) // acquired, not replayed
			checkFenceAbove(t, "begin after delete", next.Lease.Fence, held.Lease.Fence)
		}},
		{"Missing", func(t *testing.T) {
			e := s.env(t)
			wantErr(t, "Delete of a missing key", e.s.Delete(e.ctx, tenant, "key"), nil)
			wantErr(t, "Delete again", e.s.Delete(e.ctx, tenant, "key"), nil)
			e.wantGone("key")
		}},
	}
}

func (s *suite) fenceTests() []subtest {
	return []subtest{
		{"GrowsAcrossReleaseDeleteTakeOverAndExpiry", func(t *testing.T) {
			e := s.env(t)
			var fences []uint64
			step := func(what string, rec keys.Record) {
				t.Helper()
				checkFenceAbove(t, what, rec.Lease.Fence, fences...)
				fences = append(fences, rec.Lease.Fence)
			}
			held := e.acquire("key", req)
			step("first", held)
			wantErr(t, "Release", e.s.Release(e.ctx, tenant, "key", held.Lease.Token), nil)
			held = e.acquire("key", req)
			step("after release", held)
			wantErr(t, "Delete", e.s.Delete(e.ctx, tenant, "key"), nil)
			held = e.acquire("key", req)
			step("after delete", held)
			e.advanceTo(held.Lease.ExpiresAt)
			held = e.takeOver("key", req)
			step("after takeover", held)
			e.complete("key", held.Lease.Token, response("x"), time.Minute)
			e.clock.Advance(time.Minute)
			held = e.acquire("key", req)
			step("after expiry", held)
			e.advanceTo(held.ExpiresAt)
			e.wantSweep(1)
			held = e.acquire("key", req)
			step("after sweep", held)
		}},
	}
}
