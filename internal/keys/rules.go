package keys

import (
	"bytes"
	"slices"
	"strings"
	"time"
)

// The rules of CONTRACT.md, written once. Each takes the current record (nil when there is none
// stored; an expired one counts as none), the time and the request, and returns what the store
// must do. A backend runs the rule and its write in one atomic step.

// Write says what a store must do after a rule ran.
type Write int

const (
	// WriteNone: leave the stored record as it is.
	WriteNone Write = iota
	// WritePut: store the returned record (for a new lease the store first sets its Fence).
	WritePut
	// WriteDelete: remove the stored record.
	WriteDelete
)

func live(cur *Record, now time.Time) *Record {
	if cur.Live(now) {
		return cur
	}
	return nil
}

// DecideBegin applies begin's rule. When the outcome is Acquired or TakenOver the returned
// record holds a new lease with a fresh token and Fence 0: the store must set Fence to a value
// larger than every earlier fence on the key before it writes. err is ErrFingerprintMismatch or
// ErrInProgress (then the result's Record is the current one, without its token).
func DecideBegin(cur *Record, now time.Time, key string, req BeginRequest) (BeginResult, Write, error) {
	cur = live(cur, now)
	if cur != nil && cur.Fingerprint != "" && cur.Fingerprint != req.Fingerprint {
		return BeginResult{}, WriteNone, ErrFingerprintMismatch
	}
	if cur != nil && cur.State == StateCompleted {
		return BeginResult{Outcome: Replayed, Record: cur.Public()}, WriteNone, nil
	}
	if cur != nil && cur.LeaseLive(now) {
		return BeginResult{Record: cur.Public()}, WriteNone, ErrInProgress
	}
	leaseEnd := now.Add(req.Lease)
	next := Record{
		Key:         key,
		State:       StateInProgress,
		Fingerprint: req.Fingerprint,
		Lease:       Lease{Token: NewToken(), ExpiresAt: leaseEnd},
		CreatedAt:   now,
		ExpiresAt:   later(now.Add(req.TTL), leaseEnd),
		TTL:         req.TTL,
	}
	outcome := Acquired
	if cur != nil { // an in-progress record whose lease ran out
		outcome = TakenOver
		next.CreatedAt = cur.CreatedAt // (the fingerprints agree: a mismatch returned above)
	}
	return BeginResult{Outcome: outcome, Record: next}, WritePut, nil
}

// DecideComplete applies complete's rule and returns the completed record. The request's
// response must already be valid (see Limits.CheckResponse). The record to write keeps the
// lease's token, so that a retried complete can be recognised; a store shows its Public().
func DecideComplete(cur *Record, now time.Time, req CompleteRequest) (Record, Write, error) {
	cur = live(cur, now)
	switch {
	case cur == nil:
		return Record{}, WriteNone, ErrNotFound
	case cur.State == StateCompleted:
		if cur.Lease.Token == req.Token && SameResponse(cur.Response, &req.Response) {
			return cur.Public(), WriteNone, nil // the same complete again
		}
		return Record{}, WriteNone, ErrAlreadyCompleted
	case cur.Lease.Token != req.Token:
		return Record{}, WriteNone, ErrLeaseLost
	}
	// The holder completes, even if its lease ran out, as long as nobody took over.
	ttl := req.TTL
	if ttl == 0 {
		ttl = cur.TTL
	}
	next := *cur
	next.Memo = nil // a new record (see Record.Memo)
	resp := req.Response
	next.State = StateCompleted
	next.Response = &resp
	next.CompletedAt = now
	next.ExpiresAt = now.Add(ttl)
	next.TTL = ttl
	return next, WritePut, nil
}

// DecideRenew applies renew's rule and returns the record with the extended lease.
func DecideRenew(cur *Record, now time.Time, req RenewRequest) (Record, Write, error) {
	cur = live(cur, now)
	switch {
	case cur == nil:
		return Record{}, WriteNone, ErrNotFound
	case cur.State != StateInProgress || cur.Lease.Token != req.Token:
		return Record{}, WriteNone, ErrLeaseLost
	}
	next := *cur
	next.Memo = nil // a new record (see Record.Memo)
	next.Lease.ExpiresAt = now.Add(req.Lease)
	next.ExpiresAt = later(next.ExpiresAt, next.Lease.ExpiresAt)
	return next, WritePut, nil
}

// DecideRelease applies release's rule.
func DecideRelease(cur *Record, now time.Time, token string) (Write, error) {
	cur = live(cur, now)
	switch {
	case cur == nil:
		return WriteNone, nil
	case cur.State == StateCompleted:
		return WriteNone, ErrAlreadyCompleted
	case cur.Lease.Token != token:
		return WriteNone, ErrLeaseLost
	}
	return WriteDelete, nil
}

// DecideGet applies get's rule.
func DecideGet(cur *Record, now time.Time) (Record, error) {
	cur = live(cur, now)
	if cur == nil {
		return Record{}, ErrNotFound
	}
	return cur.Public(), nil
}

// SameResponse reports whether two responses are equal in status, headers and body.
func SameResponse(a, b *Response) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Status == b.Status && bytes.Equal(a.Body, b.Body) && sameHeaders(a.Headers, b.Headers)
}

// sameHeaders reports whether a and b hold the same values under the same names, the names
// compared without regard to case, as HTTP compares them: a retried complete that spells
// "content-type" as "Content-Type" is the same response (CheckResponse refuses a name given
// twice in different case, so each name matches at most one).
func sameHeaders(a, b map[string][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for name, av := range a {
		bv, ok := b[name]
		if !ok {
			for other, v := range b {
				if strings.EqualFold(other, name) {
					bv, ok = v, true
					break
				}
			}
		}
		if !ok || !slices.Equal(av, bv) {
			return false
		}
	}
	return true
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
