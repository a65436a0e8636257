package server

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"os"
	"reflect"
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
	errRouteNotFound       = errors.New("No such path; the API is described at /openapi.yaml.")
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
func decode(r *http.Request, lim bodyLimit, v any, optional bool) error {
	maxBytes := lim.bytes
	if !jsonMediaType(r.Header["Content-Type"]) { // Header.Get, without canonicalizing
		return emptyOrUnsupported(r.Body, maxBytes, optional)
	}
	fd, ok := v.(fastDecoder)
	if !ok || r.Body == nil || r.ContentLength < 0 || r.ContentLength > maxFastBody || len(r.Header["Expect"]) > 0 {
		return decodeJSON(r.Body, lim, v, optional)
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
		case lim.tooManyValues(b):
			return lim.tooMany
		case fd.decodeFast(b):
			return nil
		}
	}
	return decodeJSON(&replayReader{buf: b, err: err, r: r.Body}, lim, v, optional)
}

// bodyLimit bounds a request body: its bytes, and, so that a body cannot make the server
// allocate many times its size, the JSON values it holds. A security audit's find: a complete
// of 1.5 MB holding 220,000 header names with no values ({"0":[],"1":[],...}) took 45 MB while
// encoding/json built them into a map, before the header limits refused them; 85 at once took
// 2.9 GB.
type bodyLimit struct {
	bytes int64
	// values, when above zero, bounds the commas outside strings (a JSON value or member follows
	// each) in a body longer than countedBody; more is tooMany, before anything is decoded.
	values  int
	tooMany error
}

// countedBody is the size from which decode counts a body's values: a shorter body cannot
// hold enough of them to matter, and a begin's is not scanned twice.
const countedBody = 1 << 10

// tooManyValues reports whether b, a JSON body, holds more than l.values commas outside its
// strings (when it is longer than countedBody). It scans strings with IndexByte, so a stored
// body of megabytes in base64 costs about what copying it does.
func (l bodyLimit) tooManyValues(b []byte) bool {
	if l.values <= 0 || len(b) <= countedBody {
		return false
	}
	n := 0
	for i := 0; i < len(b); i++ {
		switch b[i] {
		case ',':
			if n++; n > l.values {
				return true
			}
		case '"': // to the closing quote: one not escaped by an odd run of backslashes
			for {
				j := bytes.IndexByte(b[i+1:], '"')
				if j < 0 {
					return false // malformed: encoding/json says so
				}
				i += 1 + j
				k := i - 1
				for k >= 0 && b[k] == '\\' {
					k--
				}
				if (i-1-k)%2 == 0 {
					break
				}
			}
		}
	}
	return false
}

// jsonMediaType reports whether a request's Content-Type values name application/json, with
// parameters or without; a charset, if any, must be UTF-8, the only encoding of JSON (RFC 8259).
func jsonMediaType(ct []string) bool {
	if len(ct) == 0 {
		return false
	}
	if ct[0] == "application/json" {
		return true
	}
	mt, params, err := mime.ParseMediaType(ct[0])
	if err != nil || mt != "application/json" {
		return false
	}
	cs, ok := params["charset"]
	return !ok || strings.EqualFold(cs, "utf-8") || strings.EqualFold(cs, "utf8")
}

// emptyOrUnsupported decides a body that is not declared as JSON: an empty one (or only white
// space) is what it would be under any type, anything else is 415. It reads no further than
// the first byte that is not white space.
func emptyOrUnsupported(body io.Reader, maxBytes int64, optional bool) error {
	if body != nil {
		var buf [512]byte
		rd := http.MaxBytesReader(nil, io.NopCloser(body), maxBytes)
		for {
			n, err := rd.Read(buf[:])
			if !isJSONSpace(buf[:n]) {
				return errUnsupportedMedia
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				return readError(err)
			}
		}
	}
	if optional {
		return nil
	}
	return errBodyRequired
}

// errBodyTimeout is the error of a body that did not arrive by its read deadline.
var errBodyTimeout = fmt.Errorf("%w: the body did not arrive in time", keys.ErrInvalidRequest)

// readError is the error of a request body that failed to read: 413 past the limit, else 400.
// Its detail never quotes the read's error, which names the server's own address and port
// ("read tcp 10.0.3.7:8080->...: i/o timeout").
func readError(err error) error {
	var tooLarge *http.MaxBytesError
	if errors.As(err, &tooLarge) {
		return errPayloadTooLarge
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return errBodyTimeout
	}
	return fmt.Errorf("%w: the body was cut off before its end", keys.ErrInvalidRequest)
}

// decodeJSON is decode by encoding/json, from body, and then held to what encoding/json lets
// through but the API refuses (checkStrict): null, member names that differ from the field's
// only in case, members given twice, and text that is not Unicode. (The body is read as it
// comes, not into a buffer of its declared length: a client's word is not enough to allocate
// megabytes before the bytes arrive.)
func decodeJSON(body io.Reader, lim bodyLimit, v any, optional bool) error {
	raw, err := io.ReadAll(http.MaxBytesReader(nil, io.NopCloser(body), lim.bytes))
	if err != nil {
		return readError(err)
	}
	if lim.tooManyValues(raw) {
		return lim.tooMany
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var syntax *json.SyntaxError
		var typ *json.UnmarshalTypeError
		switch {
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
		return errTrailingData
	}
	return checkStrict(raw, reflect.TypeOf(v))
}

// checkStrict refuses, in a body that encoding/json decoded into a value of type t, what
// encoding/json accepts silently: text that is not UTF-8 or a \u escape of half a surrogate
// pair (both decoded as U+FFFD, so that two different fingerprints would compare equal), null
// (which leaves a field as it was), a member name that matches a field only without regard to
// case, a member given twice (the last would win), and line breaks in base64.
func checkStrict(raw []byte, t reflect.Type) error {
	if !utf8.Valid(raw) {
		return fmt.Errorf("%w: the body is not valid UTF-8", keys.ErrInvalidRequest)
	}
	if i := loneSurrogate(raw); i >= 0 {
		return fmt.Errorf("%w: %s at byte %d is half a UTF-16 surrogate pair", keys.ErrInvalidRequest, raw[i:i+6], i)
	}
	sc := strictScanner{b: raw}
	sc.space()
	return sc.value(t, "")
}

// strictScanner walks JSON that encoding/json has decoded without error (so well formed, and of
// the shape of the type it was decoded into), without copying it: a stored body of megabytes in
// base64 is skipped, not turned into a string.
type strictScanner struct {
	b []byte
	i int
}

func (s *strictScanner) space() {
	for s.i < len(s.b) && isJSONSpace(s.b[s.i:s.i+1]) {
		s.i++
	}
}

// str moves past the string at s.i and returns it, quotes included.
func (s *strictScanner) str() []byte {
	start := s.i
	for s.i++; s.i < len(s.b); s.i++ {
		switch s.b[s.i] {
		case '\\':
			s.i++
		case '"':
			s.i++
			return s.b[start:s.i]
		}
	}
	return s.b[start:]
}

// next moves to an object's next member or an array's next element, past the comma; done is
// true, and the closing byte passed, when there is none.
func (s *strictScanner) next(closing byte) (done bool, err error) {
	s.space()
	switch {
	case s.i >= len(s.b):
		return false, fmt.Errorf("%w: truncated JSON", keys.ErrInvalidRequest)
	case s.b[s.i] == closing:
		s.i++
		return true, nil
	case s.b[s.i] == ',':
		s.i++
		s.space()
	}
	return false, nil
}

// value checks the value at s.i, which encoding/json decoded into type t, and moves past it.
func (s *strictScanner) value(t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if s.i >= len(s.b) {
		return fmt.Errorf("%w: truncated JSON", keys.ErrInvalidRequest)
	}
	switch s.b[s.i] {
	case 'n':
		if path == "" {
			return fmt.Errorf("%w: the body must be a JSON object, not null", keys.ErrInvalidRequest)
		}
		return fmt.Errorf("%w: %s must not be null (leave it out instead)", keys.ErrInvalidRequest, path)
	case '{':
		if t.Kind() != reflect.Struct && t.Kind() != reflect.Map {
			return fmt.Errorf("%w: %s must not be an object", keys.ErrInvalidRequest, path)
		}
		s.i++
		// A set, so that the check stays linear: a linear search made a complete with 142,719
		// headers take 23 s of CPU before its header count was refused (an audit's find).
		seen := make(map[string]struct{})
		for {
			if done, err := s.next('}'); done || err != nil {
				return err
			}
			raw := s.str()
			name := string(raw[1 : len(raw)-1])
			if bytes.IndexByte(raw, '\\') >= 0 && json.Unmarshal(raw, &name) != nil {
				return fmt.Errorf("%w: malformed member name", keys.ErrInvalidRequest)
			}
			member := name
			if path != "" {
				member = path + "." + name
			}
			if _, dup := seen[name]; dup {
				return fmt.Errorf("%w: %s is given twice", keys.ErrInvalidRequest, member)
			}
			seen[name] = struct{}{}
			var ft reflect.Type
			if t.Kind() == reflect.Map {
				ft = t.Elem()
			} else if ft = jsonField(t, name); ft == nil {
				return fmt.Errorf("%w: unknown field %q", keys.ErrInvalidRequest, name)
			}
			s.space()
			s.i++ // the colon
			s.space()
			if err := s.value(ft, member); err != nil {
				return err
			}
		}
	case '[':
		if t.Kind() != reflect.Slice || t.Elem().Kind() == reflect.Uint8 {
			return fmt.Errorf("%w: %s must not be an array", keys.ErrInvalidRequest, path)
		}
		s.i++
		for n := 0; ; n++ {
			if done, err := s.next(']'); done || err != nil {
				return err
			}
			if err := s.value(t.Elem(), path+"["+strconv.Itoa(n)+"]"); err != nil {
				return err
			}
		}
	case '"':
		raw := s.str()
		// Base64 (a []byte): encoding/json skips line breaks in it; the spec's pattern has none.
		if t.Kind() == reflect.Slice && t.Elem().Kind() == reflect.Uint8 && escapedLineBreak(raw) {
			return fmt.Errorf("%w: %s must be base64 without line breaks", keys.ErrInvalidRequest, path)
		}
		return nil
	default: // a number, true or false
		for s.i < len(s.b) && strings.IndexByte(",}] \t\r\n", s.b[s.i]) < 0 {
			s.i++
		}
		return nil
	}
}

// escapedLineBreak reports whether the JSON string str (quotes included) holds an escaped CR or
// LF: \n, \r, \u000a or \u000d (a raw one is not valid JSON).
func escapedLineBreak(str []byte) bool {
	for i := bytes.IndexByte(str, '\\'); i >= 0 && i+1 < len(str); {
		switch str[i+1] {
		case 'n', 'r':
			return true
		case 'u':
			if i+6 <= len(str) {
				if h := strings.ToLower(string(str[i+2 : i+6])); h == "000a" || h == "000d" {
					return true
				}
			}
		}
		j := bytes.IndexByte(str[i+2:], '\\')
		if j < 0 {
			break
		}
		i += 2 + j
	}
	return false
}

// jsonField returns the type of t's field named name exactly in its json tag, or nil.
func jsonField(t reflect.Type, name string) reflect.Type {
	for i := range t.NumField() {
		f := t.Field(i)
		if tag, _, _ := strings.Cut(f.Tag.Get("json"), ","); f.IsExported() && tag == name {
			return f.Type
		}
	}
	return nil
}

// loneSurrogate returns the offset of the first \u escape in b that is half a surrogate pair
// without its other half, or -1. A backslash can only stand in a string of valid JSON, so no
// tracking of strings is needed: every backslash starts an escape.
func loneSurrogate(b []byte) int {
	hex4 := func(i int) (rune, bool) {
		if i+6 > len(b) || b[i] != '\\' || b[i+1] != 'u' {
			return 0, false
		}
		n, err := strconv.ParseUint(string(b[i+2:i+6]), 16, 16)
		return rune(n), err == nil
	}
	for i := bytes.IndexByte(b, '\\'); i >= 0 && i < len(b); i++ {
		if b[i] != '\\' {
			j := bytes.IndexByte(b[i:], '\\') // a stored body in base64 has none: one pass
			if j < 0 {
				break
			}
			i += j
		}
		r, ok := hex4(i)
		switch {
		case !ok:
			i++ // another escape: skip the escaped byte, which may be a backslash
		case r >= 0xD800 && r < 0xDC00: // high half: the low half must follow
			if lo, ok := hex4(i + 6); !ok || lo < 0xDC00 || lo >= 0xE000 {
				return i
			}
			i += 11
		case r >= 0xDC00 && r < 0xE000:
			return i
		default:
			i += 5
		}
	}
	return -1
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
func appendJSONStringContent(b []byte, s string) []byte { return appendEscaped(b, s, true) }

// appendEscaped appends s as the content of a JSON string: as encoding/json writes it when
// stdlib (HTML-sensitive characters, U+2028 and U+2029 escaped, and \b and \f in short form), as
// zap's JSON encoder writes it otherwise (none of those: \u0008 and \u000c). Both escape the quote,
// the backslash, \n, \r, \t and the other control bytes (\u00XX), and write each invalid UTF-8
// byte as \ufffd. FuzzAppendProblem and FuzzAccessLine hold the two modes to their references.
func appendEscaped(b []byte, s string, stdlib bool) []byte {
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && (!stdlib || c != '<' && c != '>' && c != '&') {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch {
			case c == '"' || c == '\\':
				b = append(b, '\\', c)
			case c == '\n':
				b = append(b, '\\', 'n')
			case c == '\r':
				b = append(b, '\\', 'r')
			case c == '\t':
				b = append(b, '\\', 't')
			case stdlib && c == '\b':
				b = append(b, '\\', 'b')
			case stdlib && c == '\f':
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
		case stdlib && (r == '\u2028' || r == '\u2029'):
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

// encodeRecord writes r as the JSON body of a response with status. A completed record that a
// store keeps in its replay cache carries a Memo (see keys.Record.Memo): its encoding is kept
// there the first time, and every later replay of it writes those bytes.
func encodeRecord(w http.ResponseWriter, status int, r keys.Record, withToken bool) {
	if !withToken && r.Memo != nil && r.State == keys.StateCompleted {
		e := memoEncoding(r)
		writeJSON(w, status, e.body, e.length)
		return
	}
	bp := bufPool.Get().(*[]byte)
	buf := append(appendRecord((*bp)[:0], r, withToken), '\n')
	writeJSON(w, status, buf, []string{strconv.Itoa(len(buf))})
	if cap(buf) <= 64<<10 { // keep small buffers only: a 1 MiB body should not stay pinned
		*bp = buf
		bufPool.Put(bp)
	}
}

// writeJSON writes body, of Content-Length length, as a JSON response with status.
func writeJSON(w http.ResponseWriter, status int, body []byte, length []string) {
	h := w.Header()
	h["Content-Type"] = jsonContentType
	h["Content-Length"] = length
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// encoded is a completed record's body as encodeRecord writes it without the token, kept in the
// record's Memo. It keeps the fields it was encoded from, and is used only for a record whose
// fields are the same: a memo copied by mistake into a record with other contents is encoded
// again, never served (the rules clear Memo on every record they derive, so this is a guard).
type encoded struct {
	of     keys.Record // Lease, TTL and Memo zeroed: not in the encoding without the token
	body   []byte      // with the newline
	length []string    // the Content-Length header's value, shared like jsonContentType
}

// encodes reports whether e is the encoding of the completed record r.
func (e *encoded) encodes(r *keys.Record) bool {
	o := &e.of
	return o.Response == r.Response && o.State == r.State && o.Key == r.Key && o.Fingerprint == r.Fingerprint &&
		o.CreatedAt.Equal(r.CreatedAt) && o.CompletedAt.Equal(r.CompletedAt) && o.ExpiresAt.Equal(r.ExpiresAt)
}

// memoEncoding returns r's encoding from its Memo, encoding it and keeping it there first when
// the Memo holds none for r.
func memoEncoding(r keys.Record) *encoded {
	if e, ok := r.Memo.Load().(*encoded); ok && e.encodes(&r) {
		return e
	}
	body := append(appendRecord(nil, r, false), '\n')
	of := r
	of.Lease, of.TTL, of.Memo = keys.Lease{}, 0, nil
	e := &encoded{of: of, body: body, length: []string{strconv.Itoa(len(body))}}
	r.Memo.Store(e)
	return e
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
