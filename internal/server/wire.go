package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// Request and response bodies of API v1 (docs/WIRE.md). They are separate from the domain
// structs so that the wire format is decided here, once.

type beginRequest struct {
	Fingerprint string `json:"fingerprint"`
	LeaseMS     *int64 `json:"lease_ms"`
	TTLMS       *int64 `json:"ttl_ms"`
	WaitMS      *int64 `json:"wait_ms"`
}

type storedResponse struct {
	Status  *int                `json:"status"`
	Headers map[string][]string `json:"headers"`
	Body    []byte              `json:"body"` // standard base64 on the wire
}

type completeRequest struct {
	Token    string          `json:"token"`
	Response *storedResponse `json:"response"`
	TTLMS    *int64          `json:"ttl_ms"`
}

type renewRequest struct {
	Token   string `json:"token"`
	LeaseMS *int64 `json:"lease_ms"`
}

type releaseRequest struct {
	Token string `json:"token"`
}

type leaseJSON struct {
	Token     string    `json:"token,omitempty"`
	Fence     uint64    `json:"fence"`
	ExpiresAt time.Time `json:"expires_at"`
}

type responseJSON struct {
	Status  int                 `json:"status"`
	Headers map[string][]string `json:"headers"`
	Body    []byte              `json:"body"`
}

type recordJSON struct {
	Key         string        `json:"key"`
	State       keys.State    `json:"state"`
	Fingerprint string        `json:"fingerprint"`
	Lease       *leaseJSON    `json:"lease,omitempty"`
	Response    *responseJSON `json:"response,omitempty"`
	CreatedAt   time.Time     `json:"created_at"`
	CompletedAt *time.Time    `json:"completed_at,omitempty"`
	ExpiresAt   time.Time     `json:"expires_at"`
}

// toJSON renders a record. The token is shown only when withToken (begin's 201, renew's 200).
func toJSON(r keys.Record, withToken bool) recordJSON {
	out := recordJSON{
		Key:         r.Key,
		State:       r.State,
		Fingerprint: r.Fingerprint,
		CreatedAt:   r.CreatedAt.UTC(),
		ExpiresAt:   r.ExpiresAt.UTC(),
	}
	if r.State == keys.StateInProgress {
		out.Lease = &leaseJSON{Fence: r.Lease.Fence, ExpiresAt: r.Lease.ExpiresAt.UTC()}
		if withToken {
			out.Lease.Token = r.Lease.Token
		}
	}
	if r.Response != nil {
		h := r.Response.Headers
		if h == nil {
			h = map[string][]string{}
		}
		body := r.Response.Body
		if body == nil {
			body = []byte{}
		}
		out.Response = &responseJSON{Status: r.Response.Status, Headers: h, Body: body}
	}
	if !r.CompletedAt.IsZero() {
		t := r.CompletedAt.UTC()
		out.CompletedAt = &t
	}
	return out
}

var (
	errPayloadTooLarge     = errors.New("payload too large")
	errUnsupportedMedia    = errors.New("unsupported media type")
	errUnauthorized        = errors.New("unauthorized")
	errMethodNotAllowed    = errors.New("method not allowed")
	errRouteNotFound       = errors.New("no such route")
	errBodyRequired        = fmt.Errorf("%w: a JSON body is required", keys.ErrInvalidRequest)
	errTrailingData        = fmt.Errorf("%w: unexpected data after the JSON object", keys.ErrInvalidRequest)
	errMissingToken        = fmt.Errorf("%w: token is required", keys.ErrInvalidRequest)
	errMissingResponse     = fmt.Errorf("%w: response is required", keys.ErrInvalidRequest)
	errMissingStatus       = fmt.Errorf("%w: response.status is required", keys.ErrInvalidRequest)
	errInvalidHeaderValues = fmt.Errorf("%w: response.headers must map names to arrays of strings", keys.ErrInvalidRequest)
)

// decode reads r's JSON body into v: at most maxBytes, no unknown fields, nothing after the
// object. An empty body leaves v as it is when optional, else it is an error.
func decode(r *http.Request, maxBytes int64, v any, optional bool) error {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || !(mt == "application/json" || strings.HasSuffix(mt, "+json")) {
			return errUnsupportedMedia
		}
	}
	body := http.MaxBytesReader(nil, r.Body, maxBytes)
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var tooLarge *http.MaxBytesError
		var syntax *json.SyntaxError
		var typ *json.UnmarshalTypeError
		switch {
		case errors.As(err, &tooLarge):
			return errPayloadTooLarge
		case errors.Is(err, io.EOF):
			if optional {
				return nil
			}
			return errBodyRequired
		case errors.As(err, &syntax):
			return fmt.Errorf("%w: malformed JSON at byte %d", keys.ErrInvalidRequest, syntax.Offset)
		case errors.As(err, &typ):
			if typ.Field != "" {
				return fmt.Errorf("%w: %s must be of type %s", keys.ErrInvalidRequest, typ.Field, typ.Type)
			}
			return fmt.Errorf("%w: the body must be a JSON object", keys.ErrInvalidRequest)
		case strings.HasPrefix(err.Error(), "json: unknown field"):
			return fmt.Errorf("%w: %s", keys.ErrInvalidRequest, strings.TrimPrefix(err.Error(), "json: "))
		case errors.Is(err, io.ErrUnexpectedEOF):
			return fmt.Errorf("%w: truncated JSON", keys.ErrInvalidRequest)
		}
		// base64 errors and the like: still the client's input.
		return fmt.Errorf("%w: %s", keys.ErrInvalidRequest, strings.TrimPrefix(err.Error(), "json: "))
	}
	if _, err := dec.Token(); err != io.EOF {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			return errPayloadTooLarge
		}
		return errTrailingData
	}
	return nil
}

// encode writes v as JSON with status.
func encode(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
