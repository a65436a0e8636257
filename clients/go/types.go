package idemclient

import (
	"maps"
	"net/http"
	"time"
)

// State is the state of a record.
type State string

const (
	// StateInProgress means a lease holder is executing the operation.
	StateInProgress State = "in_progress"
	// StateCompleted means the operation's response is stored and is replayed to every later
	// begin with the same key and fingerprint.
	StateCompleted State = "completed"
)

// Lease is the right to execute the operation of a key, held by exactly one caller.
type Lease struct {
	// Token proves the holder. It is empty in records returned by Get: only the begin that
	// acquires and the holder's renew see it.
	Token string
	// Fence is larger for every new lease on a key than for every earlier one, so a downstream
	// system can refuse writes from a holder that has been replaced.
	Fence uint64
	// ExpiresAt is when the lease runs out and another begin may take over (the server's clock).
	ExpiresAt time.Time
}

// Response is the result of an operation, as stored by idemsvc and replayed to retries.
type Response struct {
	// Status is an HTTP status code (100 to 599).
	Status int
	// Header holds the response headers. idemsvc refuses to store the credential headers
	// Set-Cookie, Authorization and Proxy-Authorization, names that are not tokens, values with
	// control characters other than tab, more than 100 values or more than 16 KiB of names and
	// values (a name counted once per value). Header values are stored as UTF-8 text (the API
	// carries JSON): invalid bytes come back as U+FFFD.
	Header http.Header
	// Body is the response body.
	Body []byte
}

// Record is what idemsvc keeps for one key.
type Record struct {
	// Key is the record's key, as given to Begin.
	Key string
	// State is StateInProgress or StateCompleted.
	State State
	// Fingerprint is the fingerprint the key was begun with; empty when none was given.
	Fingerprint string
	// Lease is the current lease of an in-progress record; nil when the record is completed.
	Lease *Lease
	// Response is the stored response of a completed record; nil while in progress.
	Response *Response
	// CreatedAt is when the key was first begun.
	CreatedAt time.Time
	// CompletedAt is when the record was completed; zero while in progress.
	CompletedAt time.Time
	// ExpiresAt is when the record stops existing (its retention ends).
	ExpiresAt time.Time
}

// BeginOptions are the optional parameters of a begin. Zero durations are left to the server's
// defaults.
type BeginOptions struct {
	// Fingerprint identifies the request the key is used for (see Fingerprint). A later begin
	// with the same key and a different fingerprint fails with ErrFingerprintMismatch.
	Fingerprint string
	// Lease is how long the lease lasts before another begin may take over.
	Lease time.Duration
	// TTL is how long the record is kept.
	TTL time.Duration
	// Wait is how long the server waits for a running holder to finish before answering
	// ErrInProgress. Zero answers at once.
	Wait time.Duration
}

// BeginResult is the outcome of a begin that did not fail. Exactly one of Acquired and
// Replayed is true.
type BeginResult struct {
	// Acquired is true when the caller now holds the lease and must execute the operation,
	// then Complete (or Release on failure) with Lease.Token.
	Acquired bool
	// Replayed is true when the operation has already completed: Record.Response is its stored
	// response and nothing must be executed.
	Replayed bool
	// Lease is the caller's lease when Acquired, else nil.
	Lease *Lease
	// Record is the record after the begin.
	Record *Record
}

// CompleteRequest stores the response of the operation of a key.
type CompleteRequest struct {
	// Token is the lease token from the begin that acquired. Required.
	Token string
	// Response is the response to store. Its Status is required.
	Response Response
	// TTL is the retention from now; zero keeps the TTL given at begin.
	TTL time.Duration
}

// The wire shapes (docs/WIRE.md). They are separate from the exported types so that the Go API
// can use time.Duration, http.Header and pointers where the JSON uses milliseconds and maps.

type wireLease struct {
	Token     string    `json:"token,omitempty"`
	Fence     uint64    `json:"fence"`
	ExpiresAt time.Time `json:"expires_at"`
}

type wireResponse struct {
	Status  int                 `json:"status"`
	Headers map[string][]string `json:"headers,omitempty"`
	Body    []byte              `json:"body,omitempty"` // encoding/json uses standard base64 with padding
}

type wireRecord struct {
	Key         string        `json:"key"`
	State       State         `json:"state"`
	Fingerprint string        `json:"fingerprint"`
	Lease       *wireLease    `json:"lease,omitempty"`
	Response    *wireResponse `json:"response,omitempty"`
	CreatedAt   time.Time     `json:"created_at"`
	CompletedAt *time.Time    `json:"completed_at,omitempty"`
	ExpiresAt   time.Time     `json:"expires_at"`
}

type beginBody struct {
	Fingerprint string `json:"fingerprint,omitempty"`
	LeaseMS     *int64 `json:"lease_ms,omitempty"`
	TTLMS       *int64 `json:"ttl_ms,omitempty"`
	WaitMS      *int64 `json:"wait_ms,omitempty"`
}

type completeBody struct {
	Token    string       `json:"token"`
	Response wireResponse `json:"response"`
	TTLMS    *int64       `json:"ttl_ms,omitempty"`
}

type renewBody struct {
	Token   string `json:"token"`
	LeaseMS *int64 `json:"lease_ms,omitempty"`
}

type releaseBody struct {
	Token string `json:"token"`
}

func (w *wireRecord) record() *Record {
	r := &Record{
		Key:         w.Key,
		State:       w.State,
		Fingerprint: w.Fingerprint,
		CreatedAt:   w.CreatedAt,
		ExpiresAt:   w.ExpiresAt,
	}
	if w.CompletedAt != nil {
		r.CompletedAt = *w.CompletedAt
	}
	if w.Lease != nil {
		r.Lease = &Lease{Token: w.Lease.Token, Fence: w.Lease.Fence, ExpiresAt: w.Lease.ExpiresAt}
	}
	if w.Response != nil {
		header := http.Header(w.Response.Headers)
		if header == nil {
			header = http.Header{}
		}
		body := w.Response.Body
		if body == nil {
			body = []byte{}
		}
		r.Response = &Response{Status: w.Response.Status, Header: header, Body: body}
	}
	return r
}

func toWireResponse(r Response) wireResponse {
	h, cloned := r.Header, false
	for name, v := range r.Header {
		if len(v) == 0 { // nil or no values: nothing to store (idemsvc refuses null)
			if !cloned {
				h, cloned = maps.Clone(r.Header), true
			}
			delete(h, name)
		}
	}
	return wireResponse{Status: r.Status, Headers: h, Body: r.Body}
}

// millis converts an optional duration to the wire's optional integer milliseconds, rounding up
// so that a positive duration never becomes zero. Zero is absent.
func millis(d time.Duration) *int64 {
	if d <= 0 {
		return nil
	}
	ms := int64((d + time.Millisecond - 1) / time.Millisecond)
	return &ms
}
