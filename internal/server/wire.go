package server

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/idemsvc/idemsvc/internal/keys"
)

// Request and response bodies of API v1 (docs/WIRE.md). They are separate from the domain
// structs so that the wire format is decided here, once. The unexported fields are where the
// fast decoder (fastjson.go) keeps what the pointers point to, so that it allocates neither;
// encoding/json ignores them.

type beginRequest struct {
	Fingerprint string `json:"fingerprint"`
	LeaseMS     *int64 `json:"lease_ms"`
	TTLMS       *int64 `json:"ttl_ms"`
	WaitMS      *int64 `json:"wait_ms"`

	ms [3]int64
}

type storedResponse struct {
	Status  *int                `json:"status"`
	Headers map[string][]string `json:"headers"`
	Body    []byte              `json:"body"` // standard base64 on the wire

	status int
}

type completeRequest struct {
	Token    string          `json:"token"`
	Response *storedResponse `json:"response"`
	TTLMS    *int64          `json:"ttl_ms"`

	ttlMS int64
	resp  storedResponse
}

type renewRequest struct {
	Token   string `json:"token"`
	LeaseMS *int64 `json:"lease_ms"`

	leaseMS int64
}

type releaseRequest struct {
	Token string `json:"token"`
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
// object. An empty body leaves v as it is when optional, else it is an error. v must point to a
// zero value.
//
// A body of a known length of at most maxFastBody bytes is read whole and, when v has a fast
// decoder that knows it, decoded without encoding/json; any other body, and every error, goes
// through decodeJSON as the same stream of bytes.
func decode(r *http.Request, maxBytes int64, v any, optional bool) error {
	// Header.Get, without canonicalizing a name that already is canonical.
	if ct := r.Header["Content-Type"]; len(ct) > 0 && ct[0] != "" && ct[0] != "application/json" {
		mt, _, err := mime.ParseMediaType(ct[0])
		if err != nil || !(mt == "application/json" || strings.HasSuffix(mt, "+json")) {
			return errUnsupportedMedia
		}
	}
	fd, ok := v.(fastDecoder)
	if !ok || r.Body == nil || r.ContentLength < 0 || r.ContentLength > maxFastBody || len(r.Header["Expect"]) > 0 {
		return decodeJSON(r.Body, maxBytes, v, optional)
	}
	bp := bufPool.Get().(*[]byte)
	defer func() {
		if cap(*bp) <= maxFastBody+1 {
			bufPool.Put(bp)
		}
	}()
	limit := int(min(maxFastBody, maxBytes))
	b, err := readBody(r.Body, (*bp)[:0], limit)
	*bp = b[:0]
	if err == io.EOF && len(b) <= limit { // the whole body, and not over maxBytes
		switch {
		case isJSONSpace(b): // what encoding/json reports as io.EOF
			if optional {
				return nil
			}
			return errBodyRequired
		case fd.decodeFast(b):
			return nil
		}
	}
	return decodeJSON(&replayReader{buf: b, err: err, r: r.Body}, maxBytes, v, optional)
}

// decodeJSON is decode by encoding/json, from body.
func decodeJSON(body io.Reader, maxBytes int64, v any, optional bool) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, io.NopCloser(body), maxBytes))
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

// appendRecord appends the JSON of r (docs/WIRE.md) to b: byte for byte what encoding/json
// writes for the reference struct in wire_test.go (the equivalence is tested), without
// reflection, since records are on every hot path. The token is shown only when withToken
// (begin's 201, renew's 200).
func appendRecord(b []byte, r keys.Record, withToken bool) []byte {
	b = append(b, `{"key":`...)
	b = appendJSONString(b, r.Key)
	b = append(b, `,"state":`...)
	b = appendJSONString(b, string(r.State))
	b = append(b, `,"fingerprint":`...)
	b = appendJSONString(b, r.Fingerprint)
	if r.State == keys.StateInProgress {
		b = append(b, `,"lease":{`...)
		if withToken && r.Lease.Token != "" {
			b = append(b, `"token":`...)
			b = appendJSONString(b, r.Lease.Token)
			b = append(b, ',')
		}
		b = append(b, `"fence":`...)
		b = strconv.AppendUint(b, r.Lease.Fence, 10)
		b = append(b, `,"expires_at":`...)
		b = appendJSONTime(b, r.Lease.ExpiresAt)
		b = append(b, '}')
	}
	if resp := r.Response; resp != nil {
		b = append(b, `,"response":{"status":`...)
		b = strconv.AppendInt(b, int64(resp.Status), 10)
		b = append(b, `,"headers":{`...)
		names := make([]string, 0, len(resp.Headers))
		for name := range resp.Headers {
			names = append(names, name)
		}
		slices.Sort(names)
		for i, name := range names {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSONString(b, name)
			b = append(b, ':', '[')
			for j, v := range resp.Headers[name] {
				if j > 0 {
					b = append(b, ',')
				}
				b = appendJSONString(b, v)
			}
			b = append(b, ']')
		}
		b = append(b, `},"body":"`...)
		b = base64.StdEncoding.AppendEncode(b, resp.Body)
		b = append(b, `"}`...)
	}
	b = append(b, `,"created_at":`...)
	b = appendJSONTime(b, r.CreatedAt)
	if !r.CompletedAt.IsZero() {
		b = append(b, `,"completed_at":`...)
		b = appendJSONTime(b, r.CompletedAt)
	}
	b = append(b, `,"expires_at":`...)
	b = appendJSONTime(b, r.ExpiresAt)
	return append(b, '}')
}

func appendJSONTime(b []byte, t time.Time) []byte {
	b = append(b, '"')
	b = t.UTC().AppendFormat(b, time.RFC3339Nano)
	return append(b, '"')
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string the way encoding/json does: HTML-sensitive
// characters, control characters, U+2028 and U+2029 escaped; invalid UTF-8 as U+FFFD.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	b = appendJSONStringContent(b, s)
	return append(b, '"')
}

// appendJSONStringContent is appendJSONString without the quotes.
func appendJSONStringContent(b []byte, s string) []byte {
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	return append(b, s[start:]...)
}

// encodeRecord writes r as the JSON body of a response with status.
func encodeRecord(w http.ResponseWriter, status int, r keys.Record, withToken bool) {
	bp := bufPool.Get().(*[]byte)
	buf := append(appendRecord((*bp)[:0], r, withToken), '\n')
	h := w.Header()
	h["Content-Type"] = jsonContentType
	h["Content-Length"] = []string{strconv.Itoa(len(buf))}
	w.WriteHeader(status)
	_, _ = w.Write(buf)
	if cap(buf) <= 64<<10 { // keep small buffers only: a 1 MiB body should not stay pinned
		*bp = buf
		bufPool.Put(bp)
	}
}

// Header values that never change, assigned to a header map instead of Header.Set, which
// allocates a slice for each. Safe to share: net/http only reads them, and since their cap is
// their len, a later Header.Add appends into a copy.
var (
	jsonContentType    = []string{"application/json"}
	problemContentType = []string{"application/problem+json"}
	bearerChallenge    = []string{"Bearer"}
	headerTrue         = []string{"true"}
)

// bufPool holds the buffers records are encoded into and request bodies are read into.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 1024); return &b }}
