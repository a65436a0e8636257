package idemclient

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"net/textproto"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// MiddlewareOption configures Middleware. Every DoOption (WithLease, WithTTL, WithWait,
// WithCleanupTimeout) is also a MiddlewareOption.
type MiddlewareOption interface {
	applyMiddleware(*middlewareConfig)
}

type middlewareConfig struct {
	methods         map[string]bool
	scope           func(*http.Request) string
	caller          func(*http.Request) string // WithCaller; nil: callers told apart by credentials
	requireKey      bool
	failOpen        bool
	storeIf         func(status int) bool
	maxRequestBody  int64
	maxResponseBody int
	logger          *slog.Logger
	doOpts          []DoOption
}

type middlewareOption func(*middlewareConfig)

func (o middlewareOption) applyMiddleware(c *middlewareConfig) { o(c) }

// DefaultMaxBody is the default limit of both the request body the middleware reads (to
// fingerprint it) and the response body it captures (to store it): idemsvc's default limit of a
// stored body.
const DefaultMaxBody = 1 << 20

// WithMethods sets the request methods the middleware protects (default POST and PATCH).
// Requests with other methods pass through untouched, whether or not they carry a key.
func WithMethods(methods ...string) MiddlewareOption {
	return middlewareOption(func(c *middlewareConfig) {
		c.methods = map[string]bool{}
		for _, m := range methods {
			c.methods[strings.ToUpper(m)] = true
		}
	})
}

// WithScope sets how the route of a request is named in its key's scope (default r.URL.Path):
// a key is scoped by method and route, so the same key on two endpoints names two records, and
// the same key on one endpoint one record.
//
// With r.URL.Path, /charges/1 and /charges/2 are two routes. To scope by the route pattern
// instead, return r.Pattern when the middleware wraps a handler registered on an
// http.ServeMux, or chi.RouteContext(r.Context()).RoutePattern() when it is attached to the
// route with chi's r.With (in a router-wide r.Use the pattern is not known yet). The scope is
// also the place to add a prefix, such as a service name, when services share an idemsvc tenant.
func WithScope(scope func(r *http.Request) string) MiddlewareOption {
	return middlewareOption(func(c *middlewareConfig) {
		if scope != nil {
			c.scope = scope
		}
	})
}

// WithCaller names the caller a request comes from: the authenticated user or account, as the
// authentication middleware that runs before this one established it (from r.Context(), say).
// Keys are then scoped by caller as well as by method and route, so that two callers who send
// the same Idempotency-Key (by chance, or an attacker who guesses or squats keys) name two
// records, and each gets its own response. Use it in any service with more than one caller.
//
// Without it, an Idempotency-Key is shared by every caller on the route, and the middleware
// keeps callers apart by their credentials only: the Authorization header is part of the
// fingerprint, so the same key with another Authorization gets 422 fingerprint-mismatch, never
// another caller's stored response. A caller whose token changes between a request and its retry
// (an OAuth token refreshed meanwhile) then gets 422 too; WithCaller avoids that, as the caller's
// name does not change with the token. The caller's name must not be empty for a request that
// has one: an empty name is the same as no caller.
func WithCaller(caller func(r *http.Request) string) MiddlewareOption {
	return middlewareOption(func(c *middlewareConfig) { c.caller = caller })
}

// WithRequireKey makes a protected request without an Idempotency-Key header fail with 400
// (problem type urn:idemsvc:problem:missing-key) instead of passing through unprotected.
func WithRequireKey() MiddlewareOption {
	return middlewareOption(func(c *middlewareConfig) { c.requireKey = true })
}

// WithFailOpen makes the middleware run the handler without protection when idemsvc cannot be
// reached or fails (ErrUnavailable, ErrInternal), instead of answering 503 (the default: fail
// closed). Choose it when availability matters more than at-most-once execution. Every 503 of
// idemsvc counts, "Server busy" included: when clients of the same tenant hold all of idemsvc's
// room for large answers (stored bodies of 64 KiB or more) for 5 s, a retry of a completed key
// then runs the handler again instead of getting its replay.
func WithFailOpen() MiddlewareOption {
	return middlewareOption(func(c *middlewareConfig) { c.failOpen = true })
}

// WithStoreIf decides by status which responses are stored and replayed to retries; for the
// others the key is released, so that a retry runs the handler again. The default stores
// 200 to 499 and releases on 5xx, which says "the server failed; try again". A status above 599
// is never stored, whatever store says: idemsvc stores 100 to 599.
func WithStoreIf(store func(status int) bool) MiddlewareOption {
	return middlewareOption(func(c *middlewareConfig) {
		if store != nil {
			c.storeIf = store
		}
	})
}

// WithMaxRequestBody sets the largest request body the middleware reads to fingerprint it
// (default DefaultMaxBody). A larger body is refused with 413.
func WithMaxRequestBody(n int64) MiddlewareOption {
	return middlewareOption(func(c *middlewareConfig) {
		if n > 0 {
			c.maxRequestBody = n
		}
	})
}

// WithMaxResponseBody sets the largest response body the middleware captures to store it
// (default DefaultMaxBody; keep it within idemsvc's IDEMSVC_MAX_BODY_BYTES). When a handler
// writes more, the middleware passes the response through as it is written, does not store it,
// and releases the key.
func WithMaxResponseBody(n int) MiddlewareOption {
	return middlewareOption(func(c *middlewareConfig) {
		if n > 0 {
			c.maxResponseBody = n
		}
	})
}

// WithLogger sets where the middleware logs what it cannot tell the client: a response it could
// not record, headers it left out of the stored copy, a refused begin (a misconfiguration), a
// failure of idemsvc it answered with 503 or ran the handler through. The default is
// slog.Default(); slog.New(slog.DiscardHandler) silences it.
func WithLogger(l *slog.Logger) MiddlewareOption {
	return middlewareOption(func(c *middlewareConfig) {
		if l != nil {
			c.logger = l
		}
	})
}

// Middleware returns net/http middleware (so chi middleware too) that makes a handler
// idempotent for requests carrying an Idempotency-Key header.
//
// For a request with a protected method (POST and PATCH unless WithMethods says otherwise) and
// a key, it reads the body (up to WithMaxRequestBody; 413 beyond), fingerprints the method,
// path with query and body (see Fingerprint), and runs the handler through c.Do under the key
// scoped by method and route (see WithScope and ScopedKey). So:
//
//   - The first request runs the handler, with its lease renewed however long it takes. The
//     handler's status, headers and body are captured (up to WithMaxResponseBody), stored when
//     WithStoreIf says so (default: 2xx to 4xx), and then sent. Set-Cookie, Authorization and
//     Proxy-Authorization, in any spelling, are sent to this client but never stored, nor are
//     Content-Length and the hop-by-hop headers (see "Stored headers" below). On a 5xx
//     the key is released, so that a retry runs the handler again; so it is on a status above
//     599 (WriteHeader takes up to 999, idemsvc stores 100 to 599), whatever WithStoreIf says,
//     with a warning in the log.
//   - A retry after completion gets the stored status, headers and body, byte for byte, with
//     Idempotent-Replayed: true, without running the handler (but see "Stored headers" below).
//   - A retry while the first is still running gets 409 (problem type
//     urn:idemsvc:problem:in-progress) with Retry-After: 1, or, with WithWait, waits for the
//     first to finish. (Not the holder's lease time: the lease is renewed while the handler
//     runs, so it says nothing about when the handler finishes.)
//   - Callers: without WithCaller, a key is shared by every caller on the route, and the
//     Authorization header is part of the fingerprint: another caller's request with the same key
//     gets 422 (below), never the first caller's stored response. With WithCaller, each caller's
//     keys are its own. Set WithCaller in any service with more than one caller.
//   - The same key with the same method and scope (see WithScope; by default the path) but a
//     different request (path, query, body or, without WithCaller, Authorization) gets 422
//     (urn:idemsvc:problem:fingerprint-mismatch). With the default scope only the query or the
//     body can differ: the same key with another method or in another scope (by default, on
//     another path) names another record, and the handler runs for it.
//   - A malformed key gets 400 (urn:idemsvc:problem:invalid-key); a missing one passes through
//     unprotected unless WithRequireKey is set (then 400, urn:idemsvc:problem:missing-key).
//   - When idemsvc cannot be reached, 503 (urn:idemsvc:problem:unavailable) unless
//     WithFailOpen is set.
//   - When idemsvc refuses the begin as invalid or unauthorized, a configuration error (WithLease,
//     WithTTL or WithWait beyond the server's IDEMSVC_MAX_LEASE, IDEMSVC_MAX_TTL or
//     IDEMSVC_MAX_WAIT, or a wrong token), every request with a key gets 500
//     (urn:idemsvc:problem:internal) whose detail names the cause, idemsvc's own detail included,
//     and the error is logged; the handler does not run.
//
// Stored headers. What is stored is what net/http sends (over HTTP/1.1), in the form idemsvc
// accepts, and a replay sends it again:
//
//   - Entries set to nil or to no values (w.Header()["Date"] = nil, net/http's way to suppress an
//     automatic header) send nothing and are not stored, so a replay gets net/http's automatic
//     Date again; a suppressed Content-Type is suppressed on the replay too.
//   - Names are stored canonicalized (http.CanonicalHeaderKey); the values of names that
//     canonicalize alike ("x-id" and "X-Id") are merged in the order net/http sends them (by
//     name, in byte order). Names that are not valid tokens ("X Foo") are not sent by net/http
//     and not stored.
//   - CR and LF in a value become spaces, and values are trimmed of surrounding spaces and tabs,
//     as net/http sends them.
//   - Header values are stored as UTF-8 text; invalid bytes come back as U+FFFD (idemsvc's API
//     carries JSON text).
//   - Content-Length and the hop-by-hop headers (Connection and every header it names,
//     Proxy-Connection, Keep-Alive, TE, Transfer-Encoding, Upgrade and Trailer; see RFC 9110
//     section 7.6.1), in any spelling, are sent to the first client as the handler set them but
//     not stored, without a warning: they describe the connection and framing of that one
//     response, not the response, and net/http gives a replay its own. Nor are they replayed
//     when a stored response has them (stored by a client in another language, or by an older
//     version of this one, as idemsvc accepts them): a Content-Length that does not match the
//     body would truncate the replay or leave its client waiting for bytes that never come, and
//     a Connection or Transfer-Encoding would close the connection or garble the framing.
//   - Headers the first client gets but that idemsvc cannot store are left out of the stored copy,
//     and a warning in the log names them, so that the response is still stored and a retry does
//     not run the handler again: a header with a value that holds a control character other than
//     tab (NUL, DEL, ...), and, while there are more than idemsvc's 100 header values, the header
//     with the most values, then, while the names and values (a name counted once per value) are
//     over its 16 KiB, the header with the most bytes (largest first; ties: the first name in
//     byte order).
//
// Headers set on the ResponseWriter before the middleware runs (by outer middleware) are sent
// but not stored; a replay sends the stored headers over them. A Content-Type of the outer
// middleware is not replaced by a sniffed one: the middleware sniffs (and stores) a Content-Type
// only when net/http would, when neither the handler nor the outer middleware set a
// Content-Type (nor Content-Encoding or Transfer-Encoding); a replay then sends the one the
// outer middleware sets again. Flush is a no-op while the response is captured; 1xx responses
// and trailers are not passed on. http.ResponseController reaches the connection's read and
// write deadlines, but its Hijack (and EnableFullDuplex) fail with http.ErrNotSupported: a
// hijacked connection would bypass the response that is stored and replayed. If the client goes
// away while the handler runs, the handler's context is cancelled and what it returns is stored
// as Do documents.
func Middleware(c *Client, opts ...MiddlewareOption) func(http.Handler) http.Handler {
	cfg := middlewareConfig{
		methods:         map[string]bool{http.MethodPost: true, http.MethodPatch: true},
		scope:           func(r *http.Request) string { return r.URL.Path },
		storeIf:         func(status int) bool { return status >= 200 && status < 500 },
		maxRequestBody:  DefaultMaxBody,
		maxResponseBody: DefaultMaxBody,
		logger:          slog.Default(),
	}
	for _, o := range opts {
		o.applyMiddleware(&cfg)
	}
	return func(next http.Handler) http.Handler {
		return &middleware{c: c, cfg: cfg, next: next}
	}
}

type middleware struct {
	c    *Client
	cfg  middlewareConfig
	next http.Handler
}

// errNotStored and errTooLarge make Do release the key after the handler ran.
var (
	errNotStored = errors.New("idemclient: response status not stored")
	errTooLarge  = errors.New("idemclient: response body over the capture limit")
)

func (m *middleware) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !m.cfg.methods[r.Method] {
		m.next.ServeHTTP(w, r)
		return
	}
	values := r.Header.Values(KeyHeader)
	if len(values) == 0 {
		if m.cfg.requireKey {
			writeProblem(w, r, http.StatusBadRequest, "missing-key", "Idempotency-Key required",
				"This request must carry an Idempotency-Key header.", 0)
			return
		}
		m.next.ServeHTTP(w, r)
		return
	}
	if len(values) > 1 {
		writeProblem(w, r, http.StatusBadRequest, "invalid-key", "Invalid Idempotency-Key",
			"The request carries more than one Idempotency-Key header.", 0)
		return
	}
	key, err := ParseKeyHeader(values[0])
	if err != nil {
		writeProblem(w, r, http.StatusBadRequest, "invalid-key", "Invalid Idempotency-Key",
			`The Idempotency-Key header must be a structured-field string ("...") or a bare key of visible ASCII, 1 to 255 bytes.`, 0)
		return
	}

	body, err := readBody(r, m.cfg.maxRequestBody)
	if err != nil {
		if errors.Is(err, errTooLarge) {
			writeProblem(w, r, http.StatusRequestEntityTooLarge, "payload-too-large", "Request body too large",
				"The request body is over "+strconv.FormatInt(m.cfg.maxRequestBody, 10)+" bytes.", 0)
			return
		}
		writeProblem(w, r, http.StatusBadRequest, "invalid-request", "Unreadable request body", "The request body could not be read.", 0)
		return
	}
	r = r.WithContext(r.Context()) // a shallow copy, so that the caller's request is not modified
	setBody(r, body)

	scope, credential := m.cfg.scope(r), ""
	if m.cfg.caller != nil {
		if who := m.cfg.caller(r); who != "" {
			scope = "caller:" + strconv.Itoa(len(who)) + ":" + who + ":" + scope
		}
	} else {
		credential = strings.Join(r.Header.Values("Authorization"), "\n")
	}
	scoped := ScopedKey(r.Method, scope, key)
	fp := fingerprint(r.Method, r.URL.RequestURI(), body, credential)
	var cw *captureWriter
	res, err := m.c.Do(r.Context(), scoped, fp, func(ctx context.Context) (Response, error) {
		cw = &captureWriter{w: w, header: http.Header{}, limit: m.cfg.maxResponseBody}
		m.next.ServeHTTP(cw, r.WithContext(ctx))
		cw.seal()
		if cw.passthrough {
			return Response{}, errTooLarge
		}
		if cw.status > 599 {
			// idemsvc stores 100 to 599 only (WriteHeader takes up to 999): like a 5xx, the
			// key is released and a retry runs the handler again.
			m.cfg.logger.Warn("idempotency: status outside 100-599 cannot be stored; key released, a retry runs the handler again",
				"key", scoped, "status", cw.status)
			return Response{}, errNotStored
		}
		if !m.cfg.storeIf(cw.status) {
			return Response{}, errNotStored
		}
		resp, dropped := cw.stored()
		if len(dropped) > 0 {
			m.cfg.logger.Warn("idempotency: response headers sent but not stored; a replay will not carry them",
				"key", scoped, "dropped", dropped)
		}
		return resp, nil
	}, m.cfg.doOpts...)

	if cw != nil { // the handler ran: its response is the answer, recorded or not
		if err != nil && !errors.Is(err, errNotStored) && !errors.Is(err, errTooLarge) {
			m.cfg.logger.Warn("idempotency: response not recorded; a retry may run the handler again",
				"key", scoped, "error", err)
		}
		cw.finish()
		return
	}
	switch {
	case err == nil && res.Replayed:
		writeReplay(w, res.Response)
	case errors.Is(err, ErrInProgress), errors.Is(err, ErrLeaseLost) && !errors.Is(err, ErrUnavailable):
		// Another request holds the key. (ErrLeaseLost: the begin's answer came late, and by then
		// another request had taken the key over, or it was deleted; Do did not run the handler.)
		// Not idemsvc's Retry-After: that is the time left on the holder's lease, which Do keeps
		// renewing, so it says nothing about when the handler finishes.
		writeProblem(w, r, http.StatusConflict, "in-progress", "Request in progress",
			"A request with this Idempotency-Key is still being processed. Retry later.", time.Second)
	case errors.Is(err, ErrFingerprintMismatch):
		writeProblem(w, r, http.StatusUnprocessableEntity, "fingerprint-mismatch", "Idempotency-Key reused",
			"This Idempotency-Key was used for a different request.", 0)
	case r.Context().Err() != nil:
		// The client went away before the handler ran; nobody reads an answer.
		w.WriteHeader(http.StatusServiceUnavailable)
	case errors.Is(err, ErrInvalidRequest), errors.Is(err, ErrUnauthorized):
		// A configuration error, not a failure that a retry can overcome: every keyed request
		// fails the same way until the middleware's options, token or idemsvc's limits change.
		m.cfg.logger.Error("idempotency: idemsvc refused the begin; check the middleware's options and token against the server's configuration",
			"key", scoped, "error", err)
		detail := "The idempotency middleware is misconfigured: idemsvc refused its request"
		var e *Error
		if errors.As(err, &e) && e.Detail != "" {
			detail += " (" + e.Type + ": " + e.Detail + ")"
		}
		if errors.Is(err, ErrUnauthorized) {
			detail += ". Its client's token is missing or unknown to idemsvc."
		} else {
			detail += ". WithLease, WithTTL and WithWait must be within idemsvc's IDEMSVC_MAX_LEASE, IDEMSVC_MAX_TTL and IDEMSVC_MAX_WAIT."
		}
		writeProblem(w, r, http.StatusInternalServerError, "internal", "Idempotency middleware misconfigured", detail, 0)
	case errors.Is(err, ErrUnavailable), errors.Is(err, ErrInternal):
		if m.cfg.failOpen {
			m.cfg.logger.Warn("idempotency: idemsvc unavailable; running the handler without protection",
				"key", scoped, "error", err)
			setBody(r, body)
			m.next.ServeHTTP(w, r)
			return
		}
		m.cfg.logger.Error("idempotency: idemsvc unavailable", "key", scoped, "error", err)
		writeProblem(w, r, http.StatusServiceUnavailable, "unavailable", "Idempotency service unavailable",
			"The request could not be checked for idempotency. Retry later with the same Idempotency-Key.", time.Second)
	default:
		m.cfg.logger.Error("idempotency: begin failed", "key", scoped, "error", err)
		writeProblem(w, r, http.StatusInternalServerError, "internal", "Internal error",
			"The request could not be checked for idempotency.", 0)
	}
}

func readBody(r *http.Request, limit int64) ([]byte, error) {
	if r.Body == nil || r.Body == http.NoBody {
		return []byte{}, nil
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(body)) > limit {
		return nil, errTooLarge
	}
	return body, nil
}

func setBody(r *http.Request, body []byte) {
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	r.ContentLength = int64(len(body))
}

// credentialHeaders are never stored: replaying them would hand one client's credentials to
// another. idemsvc refuses them too.
var credentialHeaders = []string{"Set-Cookie", "Authorization", "Proxy-Authorization"}

// captureWriter buffers a handler's response so that it can be recorded before it is sent.
// Past limit bytes it gives up and passes the response through.
type captureWriter struct {
	w           http.ResponseWriter
	header      http.Header
	sent        http.Header // the header as of WriteHeader
	status      int
	wroteHeader bool
	buf         bytes.Buffer
	limit       int
	passthrough bool
}

func (c *captureWriter) Header() http.Header {
	if c.passthrough {
		return c.w.Header()
	}
	return c.header
}

func (c *captureWriter) WriteHeader(code int) {
	if c.wroteHeader || c.passthrough {
		return
	}
	if code < 100 || code > 999 {
		panic("invalid WriteHeader code " + strconv.Itoa(code)) // as net/http does
	}
	if code < 200 {
		return // 1xx informational responses are not passed on
	}
	c.status, c.wroteHeader = code, true
	c.sent = c.header.Clone()
}

func (c *captureWriter) Write(p []byte) (int, error) {
	if !c.wroteHeader {
		c.WriteHeader(http.StatusOK)
	}
	if c.passthrough {
		return c.w.Write(p)
	}
	if !bodyAllowed(c.status) {
		return 0, http.ErrBodyNotAllowed
	}
	if c.buf.Len()+len(p) > c.limit {
		c.startPassthrough()
		return c.w.Write(p)
	}
	return c.buf.Write(p)
}

// Flush does nothing while the response is captured: it is sent whole once recorded.
func (c *captureWriter) Flush() {
	if c.passthrough {
		if f, ok := c.w.(http.Flusher); ok {
			f.Flush()
		}
	}
}

// Unwrap lets http.ResponseController reach what is safe while the response is captured: the
// connection's read and write deadlines. It does not expose the underlying writer itself, so
// ResponseController.Hijack (a hijacked connection would bypass the captured response, which is
// then stored and sent as something else) and EnableFullDuplex fail with http.ErrNotSupported,
// and ResponseController.Flush reaches captureWriter's own Flush.
func (c *captureWriter) Unwrap() http.ResponseWriter { return deadlineWriter{c} }

// deadlineWriter is what captureWriter.Unwrap returns: the captureWriter's ResponseWriter
// methods and the underlying writer's deadlines, and nothing else (no Unwrap, Hijack or Flush).
type deadlineWriter struct{ c *captureWriter }

func (d deadlineWriter) Header() http.Header         { return d.c.Header() }
func (d deadlineWriter) Write(p []byte) (int, error) { return d.c.Write(p) }
func (d deadlineWriter) WriteHeader(code int)        { d.c.WriteHeader(code) }

func (d deadlineWriter) SetReadDeadline(t time.Time) error {
	return http.NewResponseController(d.c.w).SetReadDeadline(t)
}

func (d deadlineWriter) SetWriteDeadline(t time.Time) error {
	return http.NewResponseController(d.c.w).SetWriteDeadline(t)
}

// seal fixes the response once the handler returned: the implicit 200 of a handler that wrote
// nothing, and the Content-Type net/http would sniff, so that the stored and the live response
// are the same. net/http sniffs only when the header it sends (the outer middleware's, with the
// handler's over it: see finish) has no Content-Type, Content-Encoding or Transfer-Encoding;
// a Content-Type of the outer middleware is not stored, and a replay sends the one the outer
// middleware sets again.
func (c *captureWriter) seal() {
	if c.passthrough {
		return
	}
	if !c.wroteHeader {
		c.WriteHeader(http.StatusOK)
	}
	if c.buf.Len() == 0 {
		return
	}
	get := func(name string) (string, bool) {
		if v, ok := c.sent[name]; ok {
			return strings.Join(v, ""), true
		}
		v, ok := c.w.Header()[name]
		return strings.Join(v, ""), ok
	}
	_, haveType := get("Content-Type")
	ce, _ := get("Content-Encoding")
	te, _ := get("Transfer-Encoding")
	if !haveType && ce == "" && te == "" {
		c.sent.Set("Content-Type", http.DetectContentType(c.buf.Bytes()))
	}
}

func (c *captureWriter) startPassthrough() {
	c.passthrough = true
	copyHeader(c.w.Header(), c.sent)
	c.w.WriteHeader(c.status)
	_, _ = c.w.Write(c.buf.Bytes())
	c.buf = bytes.Buffer{}
}

// stored returns the response to record: the live one as net/http sends it, without
// credential headers, Content-Length and hop-by-hop headers and within idemsvc's limits (see
// storedHeader), and the headers that were sent but are not stored and that a replay misses, for
// a warning.
func (c *captureWriter) stored() (Response, []string) {
	h, dropped := storedHeader(c.sent)
	return Response{Status: c.status, Header: h, Body: bytes.Clone(c.buf.Bytes())}, dropped
}

// idemsvc's limits on the headers of a stored response (not configurable): the number of values,
// and the bytes of the names and values, counting a name once per value.
const (
	maxStoredHeaderValues = 100
	maxStoredHeaderBytes  = 16 << 10
)

// newlineToSpace is what net/http does to CR and LF in a header value it sends.
var newlineToSpace = strings.NewReplacer("\n", " ", "\r", " ")

// storedHeader returns the headers of a response as net/http sends h over HTTP/1.1, in a form
// idemsvc stores, and describes the headers that it sends but that are not stored:
//
//   - names that are not valid tokens are dropped (net/http does not send them);
//   - nil or empty-valued entries are dropped (nothing is sent for them);
//   - names are canonicalized, the values of names that canonicalize alike merged in the order
//     net/http sends them (by sorted name);
//   - CR and LF in values become spaces and values are trimmed of surrounding whitespace, as
//     net/http does;
//   - the credential headers are dropped;
//   - Content-Length and the hop-by-hop headers (see connectionSpecific) are dropped, and not
//     reported: a replay gets its own from net/http, so it misses nothing. They are dropped
//     before the limits are applied, so that they never push another header out;
//   - a header with a value that still holds a control character other than tab (NUL, DEL, ...),
//     which idemsvc refuses, is dropped, and reported;
//   - while there are more than maxStoredHeaderValues values, the header with the most values is
//     dropped, and then while the names and values are over maxStoredHeaderBytes, the header
//     with the most bytes (ties: the first by name), and reported.
func storedHeader(h http.Header) (http.Header, []string) {
	out := http.Header{}
	for _, name := range slices.Sorted(maps.Keys(h)) {
		if !validHeaderName(name) {
			continue
		}
		canon := http.CanonicalHeaderKey(name)
		for _, v := range h[name] {
			out[canon] = append(out[canon], textproto.TrimString(newlineToSpace.Replace(v)))
		}
	}
	for _, name := range credentialHeaders {
		delete(out, name)
	}
	// After the names are canonicalized, so that the values of every spelling of Connection are
	// merged, and before the limits, so that a header that is not stored never pushes out one
	// that is.
	connSpecific := connectionSpecific(out)
	for name := range out {
		if connSpecific(name) {
			delete(out, name)
		}
	}
	var dropped []string
	for _, name := range slices.Sorted(maps.Keys(out)) {
		for _, v := range out[name] {
			if !validHeaderValue(v) {
				delete(out, name)
				dropped = append(dropped, name+" (a control character in a value)")
				break
			}
		}
	}
	size := func(name string) int {
		n := 0
		for _, v := range out[name] {
			n += len(name) + storedLen(v)
		}
		return n
	}
	for {
		values, total := 0, 0
		for name, vs := range out {
			values += len(vs)
			total += size(name)
		}
		var weigh func(name string) int
		var reason string
		switch {
		case values > maxStoredHeaderValues:
			weigh = func(name string) int { return len(out[name]) }
			reason = " (over idemsvc's " + strconv.Itoa(maxStoredHeaderValues) + " header values)"
		case total > maxStoredHeaderBytes:
			weigh = size
			reason = " (over idemsvc's " + strconv.Itoa(maxStoredHeaderBytes) + " bytes of headers)"
		default:
			return out, dropped
		}
		largest := ""
		for _, name := range slices.Sorted(maps.Keys(out)) {
			if largest == "" || weigh(name) > weigh(largest) {
				largest = name
			}
		}
		delete(out, largest)
		dropped = append(dropped, largest+reason)
	}
}

// validHeaderName reports whether name is an RFC 9110 token, as net/http requires of the header
// names it sends (httpguts.ValidHeaderFieldName) and idemsvc of those it stores.
func validHeaderName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// validHeaderValue reports whether v has no control character other than tab, as idemsvc
// requires of the header values it stores.
func validHeaderValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 0x20 && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// finish sends the captured response, unless it was passed through already.
func (c *captureWriter) finish() {
	if c.passthrough {
		return
	}
	copyHeader(c.w.Header(), c.sent)
	c.w.WriteHeader(c.status)
	if c.buf.Len() > 0 {
		_, _ = c.w.Write(c.buf.Bytes())
	}
}

func copyHeader(dst, src http.Header) {
	for name, values := range src {
		dst[name] = values
	}
}

func bodyAllowed(status int) bool {
	return status != http.StatusNoContent && status != http.StatusNotModified && (status < 100 || status >= 200)
}

// connectionHeaders are the canonical names of the headers that are never stored, nor replayed
// from a stored response that has them: the hop-by-hop headers, which belong to the connection
// one response went over (those RFC 9110 section 7.6.1 has a proxy remove, and Trailer, which
// announces trailers that neither the stored response nor a replay carries), and
// Content-Length, which net/http computes from the body it writes. See connectionSpecific for
// the headers a Connection header names.
var connectionHeaders = map[string]bool{
	"Connection":        true,
	"Proxy-Connection":  true,
	"Keep-Alive":        true,
	"Te":                true,
	"Transfer-Encoding": true,
	"Upgrade":           true,
	"Trailer":           true,
	"Content-Length":    true,
}

// connectionSpecific returns whether a header name is one of connectionHeaders or one that a
// Connection header of h names (RFC 9110 section 7.6.1: the named headers are hop-by-hop too).
// Names are compared without regard to ASCII case, as HTTP compares them, in h and in the
// Connection header's list alike: a stored response may come from a client that spells them
// in any case, and idemsvc keeps the spelling it was given.
func connectionSpecific(h http.Header) func(name string) bool {
	named := map[string]bool{}
	for name, values := range h {
		if http.CanonicalHeaderKey(name) != "Connection" {
			continue
		}
		for _, v := range values {
			for option := range strings.SplitSeq(v, ",") {
				if option = textproto.TrimString(option); option != "" {
					named[http.CanonicalHeaderKey(option)] = true
				}
			}
		}
	}
	return func(name string) bool {
		canon := http.CanonicalHeaderKey(name)
		return connectionHeaders[canon] || named[canon]
	}
}

// writeReplay sends a stored response, marked with Idempotent-Replayed, over the headers the
// outer middleware set. It leaves out Content-Length and the hop-by-hop headers, which this
// middleware does not store but a record stored by another client or an older version may have:
// net/http frames the replay itself, and a stored Content-Length that does not match the body,
// or a stored Connection or Transfer-Encoding, would break the replay's framing or connection.
func writeReplay(w http.ResponseWriter, resp Response) {
	connSpecific := connectionSpecific(resp.Header)
	for name, values := range resp.Header {
		if !connSpecific(name) {
			w.Header()[name] = values
		}
	}
	if _, ok := w.Header()["Content-Type"]; !ok {
		// None stored and none set by outer middleware: the first response had none either
		// (seal stores the one net/http sniffed), so do not let net/http sniff one now.
		w.Header()["Content-Type"] = nil
	}
	w.Header().Set(ReplayedHeader, "true")
	w.WriteHeader(resp.Status)
	if len(resp.Body) > 0 && bodyAllowed(resp.Status) {
		_, _ = w.Write(resp.Body)
	}
}

type problem struct {
	Type     string `json:"type"`
	Title    string `json:"title"`
	Status   int    `json:"status"`
	Detail   string `json:"detail"`
	Instance string `json:"instance,omitempty"`
}

func writeProblem(w http.ResponseWriter, r *http.Request, status int, name, title, detail string, retryAfter time.Duration) {
	h := w.Header()
	h.Set("Content-Type", "application/problem+json")
	h.Set("Cache-Control", "no-store")
	if retryAfter > 0 {
		secs := int64((retryAfter + time.Second - 1) / time.Second)
		h.Set("Retry-After", strconv.FormatInt(max(secs, 1), 10))
	}
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(problem{Type: ProblemTypePrefix + name, Title: title, Status: status, Detail: detail, Instance: r.URL.Path})
}

// storedLen is the length of v as idemsvc stores it: the JSON that carries it turns every byte
// that is not valid UTF-8 into U+FFFD, three bytes.
func storedLen(v string) int {
	n := 0
	for i := 0; i < len(v); {
		r, size := utf8.DecodeRuneInString(v[i:])
		if r == utf8.RuneError && size == 1 {
			n += 3
		} else {
			n += size
		}
		i += size
	}
	return n
}
