// Package keys is the domain of idemsvc: the idempotency record, its lease, the rules that decide
// every outcome of begin, complete, renew, release, get and delete, the Store interface that every
// backend implements, and the closed set of errors those operations return.
//
// The rules live here once, as pure functions from the stored record, the request and the time to
// the outcome and the record to write (see rules.go). Backends load the current record, call the
// rule, and write what it returns, atomically; so every backend applies exactly the same rules.
//
// This package imports no storage, no HTTP and no logging.
package keys

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"sync/atomic"
	"time"
)

// State is the state of a record.
type State string

const (
	// StateInProgress means a lease holder is executing the operation.
	StateInProgress State = "in_progress"
	// StateCompleted means the holder's response is stored and will be replayed.
	StateCompleted State = "completed"
)

// Lease is the right to execute an operation, held by exactly one caller.
type Lease struct {
	// Token is the unguessable secret that proves the holder (128 random bits, base64url).
	Token string
	// Fence grows with every new lease on a key, across release and delete too.
	Fence uint64
	// ExpiresAt is when the lease runs out and another begin may take over.
	ExpiresAt time.Time
}

// Response is the stored response of a completed operation.
type Response struct {
	Status  int
	Headers map[string][]string
	Body    []byte
}

// Record is what a store keeps for one (tenant, key).
//
// A record past ExpiresAt does not exist: no operation ever serves it, even before the sweeper
// removes it.
type Record struct {
	Key         string
	State       State
	Fingerprint string
	// Lease is the current lease of an in-progress record, and the lease that completed a
	// completed record (so a retried complete with the same token can be recognised).
	Lease       Lease
	Response    *Response // set when State is StateCompleted
	CreatedAt   time.Time
	CompletedAt time.Time // zero unless completed
	ExpiresAt   time.Time
	// TTL is the retention asked for at begin; a complete without its own TTL uses it.
	TTL time.Duration
	// Memo, when set, is shared by this record and its copies and by no record with other
	// contents: a store sets it only on a record it keeps and never modifies (an entry of its
	// replay cache), and the rules clear it on every record they derive from another. A server
	// keeps there what it derives from the record (its encoding), so that each replay of a
	// cached record does not derive it again. It is not part of the record's contents.
	Memo *Memo
}

// Memo holds one value derived from a record that does not change; see Record.Memo. It is safe
// for concurrent use; a nil Memo holds nothing and drops what it is given.
type Memo struct{ v atomic.Pointer[any] }

// Load returns the value stored, or nil.
func (m *Memo) Load() any {
	if m == nil {
		return nil
	}
	if p := m.v.Load(); p != nil {
		return *p
	}
	return nil
}

// Store replaces the value held.
func (m *Memo) Store(v any) {
	if m != nil {
		m.v.Store(&v)
	}
}

// Live reports whether the record exists at now, that is, has not expired.
func (r *Record) Live(now time.Time) bool { return r != nil && now.Before(r.ExpiresAt) }

// NextChange returns the first instant after now at which a rule could decide differently on r:
// its expiry, or its lease's expiry while in progress, whichever comes first; the zero time when
// r is nil or has expired at now (then nothing about it changes by itself). A decision made at
// now holds until then: a store that writes it later must not write it at or after that instant.
func (r *Record) NextChange(now time.Time) time.Time {
	if !r.Live(now) {
		return time.Time{}
	}
	t := r.ExpiresAt
	if r.State == StateInProgress && r.Lease.ExpiresAt.After(now) && r.Lease.ExpiresAt.Before(t) {
		t = r.Lease.ExpiresAt
	}
	return t
}

// LeaseLive reports whether an in-progress record's lease still holds at now.
func (r *Record) LeaseLive(now time.Time) bool {
	return r.State == StateInProgress && now.Before(r.Lease.ExpiresAt)
}

// Public returns a copy fit to show to anyone who may read the record: the lease token is
// removed. Only the begin that acquires (and the renew of the holder) shows the token.
func (r Record) Public() Record {
	r.Lease.Token = ""
	return r
}

// Outcome says how a successful begin ended.
type Outcome int

const (
	// Acquired: there was no live record; the caller holds a new lease and must execute.
	Acquired Outcome = iota + 1
	// TakenOver: the previous holder's lease had expired; the caller holds a new lease (with a
	// larger fence) and must execute.
	TakenOver
	// Replayed: the operation had completed; the stored response is returned, nothing executes.
	Replayed
)

func (o Outcome) String() string {
	switch o {
	case Acquired:
		return "acquired"
	case TakenOver:
		return "takeover"
	case Replayed:
		return "replayed"
	}
	return "unknown"
}

// BeginRequest asks to reserve a key. Durations are already resolved (defaults applied, bounds
// checked) by the caller; see Limits.
type BeginRequest struct {
	Fingerprint string
	Lease       time.Duration
	TTL         time.Duration
}

// BeginResult is the result of a begin that did not fail.
type BeginResult struct {
	Outcome Outcome
	// Record is the record after the begin. For Acquired and TakenOver it carries the new
	// lease with its token; for Replayed it carries the stored response (and no token).
	Record Record
}

// CompleteRequest records the holder's response.
type CompleteRequest struct {
	Token    string
	Response Response
	// TTL is the retention from now; zero keeps the TTL given at begin.
	TTL time.Duration
}

// RenewRequest extends the holder's lease to now + Lease.
type RenewRequest struct {
	Token string
	Lease time.Duration
}

// Store keeps records per (tenant, key) and applies the rules of this package atomically.
//
// Every method is atomic: it reads the current record, applies the rule and writes the result
// as one indivisible step, so that among any number of concurrent begins on one key exactly one
// acquires. Every method may also return ErrUnavailable when the store cannot be reached, or
// another error, which means internal. Errors are wrapped with the operation and key; compare
// them with errors.Is.
type Store interface {
	// Begin reserves (tenant, key) or reports its state. It returns ErrFingerprintMismatch when
	// the live record has a non-empty fingerprint different from req.Fingerprint, and
	// ErrInProgress when a live lease holds the key; with ErrInProgress the returned result's
	// Record is the current record without its token (for its lease expiry). It never waits.
	Begin(ctx context.Context, tenant, key string, req BeginRequest) (BeginResult, error)

	// Complete stores the response of the current lease holder. It returns ErrNotFound when
	// there is no live record, ErrLeaseLost when req.Token is not the current lease, and
	// ErrAlreadyCompleted when the record is completed with another token or response. The
	// same complete again returns the completed record and no error. The returned record has
	// no token, the first time as on a retry (like Get's).
	Complete(ctx context.Context, tenant, key string, req CompleteRequest) (Record, error)

	// Renew extends the current lease. It returns ErrNotFound when there is no live record and
	// ErrLeaseLost when req.Token is not the current lease (a completed record has none).
	Renew(ctx context.Context, tenant, key string, req RenewRequest) (Record, error)

	// Release removes an in-progress record held by token, so the next begin acquires. It
	// returns nil when there is no live record, ErrAlreadyCompleted when the record is
	// completed, and ErrLeaseLost when another lease holds it.
	Release(ctx context.Context, tenant, key, token string) error

	// Get returns the live record, with its token removed, or ErrNotFound.
	Get(ctx context.Context, tenant, key string) (Record, error)

	// Delete removes the record whether or not it exists. It returns nil in both cases.
	Delete(ctx context.Context, tenant, key string) error

	// Watch returns a channel that is closed when (tenant, key) may have changed: completed,
	// released, deleted or taken over. Spurious wake-ups are allowed; lease expiry is not
	// signalled (callers time it themselves). stop must be called to free the watch.
	Watch(tenant, key string) (changed <-chan struct{}, stop func())

	// Sweep removes at most max expired records (in one transaction or in several) and returns
	// how many it removed. It never removes a live record. Backends whose records expire by themselves
	// return 0, nil.
	Sweep(ctx context.Context, max int) (int, error)

	// Ping returns nil when the store answers, else ErrUnavailable (wrapped).
	Ping(ctx context.Context) error

	// Close releases the store's resources. Pending operations finish first.
	Close() error
}

// NewToken returns a new unguessable lease token: 128 bits from crypto/rand, base64url.
func NewToken() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never returns an error (Go 1.24+)
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// MaxKeyLen is the longest key, in bytes.
const MaxKeyLen = 255

// MaxFingerprintLen is the longest fingerprint, in bytes.
const MaxFingerprintLen = 512

// ValidateKey returns ErrInvalidKey unless key is 1 to 255 bytes of visible ASCII (0x21 to
// 0x7E) and is neither "." nor "..".
func ValidateKey(key string) error {
	if len(key) == 0 || len(key) > MaxKeyLen || key == "." || key == ".." {
		return ErrInvalidKey
	}
	for i := 0; i < len(key); i++ {
		if c := key[i]; c < 0x21 || c > 0x7e {
			return ErrInvalidKey
		}
	}
	return nil
}
