package idemclient

import (
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// The sentinel errors. Every error that idemsvc answers is an [*Error]; compare it with these
// through errors.Is:
//
//	if errors.Is(err, idemclient.ErrInProgress) { ... }
//
// and read its details (status, Retry-After, request id) through errors.As.
var (
	// ErrInvalidKey: the key is not 1 to 255 bytes of visible ASCII, or is "." or "..".
	// The client checks keys itself before sending them.
	ErrInvalidKey = errors.New("idemclient: invalid key")
	// ErrInvalidRequest: a request field is malformed or out of the server's range.
	ErrInvalidRequest = errors.New("idemclient: invalid request")
	// ErrUnauthorized: the bearer token is missing or unknown.
	ErrUnauthorized = errors.New("idemclient: unauthorized")
	// ErrNotFound: there is no live record for the key.
	ErrNotFound = errors.New("idemclient: not found")
	// ErrInProgress: another caller holds a live lease on the key. The *Error's RetryAfter says
	// when that lease runs out.
	ErrInProgress = errors.New("idemclient: in progress")
	// ErrLeaseLost: the token is not the key's current lease (it expired and another caller
	// took over, or the record was deleted or completed).
	ErrLeaseLost = errors.New("idemclient: lease lost")
	// ErrAlreadyCompleted: the key is completed with another token or another response.
	ErrAlreadyCompleted = errors.New("idemclient: already completed")
	// ErrPayloadTooLarge: the request body is over the server's limit.
	ErrPayloadTooLarge = errors.New("idemclient: payload too large")
	// ErrFingerprintMismatch: the key was begun with a different fingerprint, that is, for a
	// different request. Nothing was executed and no stored response is shown.
	ErrFingerprintMismatch = errors.New("idemclient: fingerprint mismatch")
	// ErrInvalidResponse: the response may not be stored (status outside 100 to 599, a
	// credential header, too many or too large headers, a body over the limit).
	ErrInvalidResponse = errors.New("idemclient: invalid response")
	// ErrUnavailable: idemsvc could not be reached or cannot reach its store: a transport error,
	// a 503, or a 502 or 504 from a proxy in front of it, or a 429, after the retries the
	// RetryPolicy allows.
	ErrUnavailable = errors.New("idemclient: unavailable")
	// ErrInternal: idemsvc failed with an internal error (500), or a proxy in front of it
	// answered another 5xx than 502, 503 or 504.
	ErrInternal = errors.New("idemclient: internal server error")
	// ErrNotRecorded: Do ran the function and it returned a response, but idemsvc did not
	// record it (the lease was lost, the response could not be stored, or idemsvc could not be
	// reached), so a retry with the same key may run the function again. Do returns the
	// function's response together with an error that wraps both ErrNotRecorded and the cause.
	ErrNotRecorded = errors.New("idemclient: result not recorded")
)

// ProblemTypePrefix is the prefix of every problem type URI of idemsvc.
const ProblemTypePrefix = "urn:idemsvc:problem:"

// problemSentinels maps problem names (CONTRACT.md) to sentinels.
var problemSentinels = map[string]error{
	"invalid-key":          ErrInvalidKey,
	"invalid-request":      ErrInvalidRequest,
	"unauthorized":         ErrUnauthorized,
	"not-found":            ErrNotFound,
	"in-progress":          ErrInProgress,
	"lease-lost":           ErrLeaseLost,
	"already-completed":    ErrAlreadyCompleted,
	"payload-too-large":    ErrPayloadTooLarge,
	"fingerprint-mismatch": ErrFingerprintMismatch,
	"invalid-response":     ErrInvalidResponse,
	"unavailable":          ErrUnavailable,
	"internal":             ErrInternal,
}

// Error is an error answered by idemsvc (or by a proxy in front of it).
type Error struct {
	// Status is the HTTP status code.
	Status int
	// Type is the problem name, the last part of the problem type URI
	// "urn:idemsvc:problem:NAME", for example "in-progress". It is empty when the body was not
	// an idemsvc problem (a proxy's error page, say); it is the whole URI when the URI has
	// another prefix.
	Type string
	// Title and Detail are the problem's human-readable summary and explanation.
	Title  string
	Detail string
	// RetryAfter is the Retry-After header, when there was one: for ErrInProgress, the time
	// left on the holder's lease, rounded up to whole seconds.
	RetryAfter time.Duration
	// RequestID is the X-Request-Id of the response, for finding the request in idemsvc's logs.
	RequestID string
}

// Error returns a one-line description: status, problem name and detail.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("idemsvc: ")
	b.WriteString(strconv.Itoa(e.Status))
	if e.Type != "" {
		b.WriteString(" ")
		b.WriteString(e.Type)
	} else if t := http.StatusText(e.Status); t != "" {
		b.WriteString(" ")
		b.WriteString(t)
	}
	if e.Detail != "" {
		b.WriteString(": ")
		b.WriteString(e.Detail)
	} else if e.Title != "" && e.Type != "" {
		b.WriteString(": ")
		b.WriteString(e.Title)
	}
	if e.RequestID != "" {
		b.WriteString(" (request ")
		b.WriteString(e.RequestID)
		b.WriteString(")")
	}
	return b.String()
}

// Is reports whether target is the sentinel for e's problem type, so that
// errors.Is(err, ErrInProgress) holds for a 409 in-progress. A response that is not an idemsvc
// problem matches by status only where the status is unambiguous: 401 ErrUnauthorized, 413
// ErrPayloadTooLarge, and 502, 503 and 504 ErrUnavailable.
func (e *Error) Is(target error) bool {
	if s, ok := problemSentinels[e.Type]; ok {
		return s == target
	}
	switch e.Status {
	case http.StatusUnauthorized:
		return target == ErrUnauthorized
	case http.StatusRequestEntityTooLarge:
		return target == ErrPayloadTooLarge
	case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout,
		http.StatusTooManyRequests: // still refused after the retries: unavailable as far as the caller can tell
		return target == ErrUnavailable
	}
	// Any other 5xx, from idemsvc without its problem type or from a proxy in front of it, is a
	// failure of the service (WithFailOpen and the middleware's 503 depend on it matching).
	return e.Status >= 500 && e.Status <= 599 && target == ErrInternal
}

// transportError is a request that got no HTTP response. It matches ErrUnavailable and
// unwraps to the underlying error.
type transportError struct {
	op  string
	err error
}

func (e *transportError) Error() string { return "idemclient: " + e.op + ": " + e.err.Error() }
func (e *transportError) Unwrap() error { return e.err }
func (e *transportError) Is(target error) bool {
	return target == ErrUnavailable
}

// maxProblemBytes bounds how much of an error body is read.
const maxProblemBytes = 64 << 10

// decodeError builds the *Error of a non-2xx response.
func decodeError(status int, header http.Header, body []byte) *Error {
	e := &Error{
		Status:     status,
		RetryAfter: parseRetryAfter(header.Get("Retry-After"), time.Now()),
		RequestID:  header.Get("X-Request-Id"),
	}
	mt, _, _ := mime.ParseMediaType(header.Get("Content-Type"))
	var p struct {
		Type   string `json:"type"`
		Title  string `json:"title"`
		Detail string `json:"detail"`
	}
	if (mt == "application/problem+json" || mt == "application/json") && json.Unmarshal(body, &p) == nil {
		e.Type = strings.TrimPrefix(p.Type, ProblemTypePrefix)
		e.Title, e.Detail = p.Title, p.Detail
		return e
	}
	e.Title = http.StatusText(status)
	if s := strings.TrimSpace(string(body)); s != "" {
		if len(s) > 200 {
			s = s[:200] + "..."
		}
		e.Detail = s
	}
	return e
}

// parseRetryAfter reads a Retry-After value: delay-seconds or an HTTP date. It returns 0 when
// v is empty or malformed.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		if n < 0 || n > int64(24*time.Hour/time.Second) {
			return 0
		}
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		if d := t.Sub(now); d > 0 {
			return d
		}
	}
	return 0
}

func invalidKeyError(key string) error {
	return fmt.Errorf("%w %q: a key is 1 to 255 bytes of visible ASCII, and not \".\" or \"..\"", ErrInvalidKey, key)
}
