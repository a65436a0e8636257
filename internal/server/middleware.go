package server

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
	"go.uber.org/zap"
)

// reqInfo is what the middleware learns about a request as it passes through the handlers; the
// access log and metrics read it at the end.
type reqInfo struct {
	id      string
	tenant  string
	key     string
	problem string
	outcome string
	start   time.Time // when the handler began: the drain's deadline for a body stays within ReadTimeout of it
}

type ctxKey struct{}

func info(ctx context.Context) *reqInfo {
	if ri, ok := ctx.Value(ctxKey{}).(*reqInfo); ok {
		return ri
	}
	return &reqInfo{}
}

func requestID(ctx context.Context) string { return info(ctx).id }

// tenant returns the authenticated tenant of the request.
func tenant(ctx context.Context) string { return info(ctx).tenant }

func setProblem(ctx context.Context, name string) { info(ctx).problem = name }

// statusWriter remembers the status a handler wrote.
type statusWriter struct {
	http.ResponseWriter
	status int
	// sendEarly: see the function sendEarly.
	sendEarly bool
}

// sendEarly, called by a handler once it has written the whole answer to a write, of a known
// length (encodeRecord), has observe flush that answer as soon as the request is logged, and
// yield, so that the other goroutines that are ready to run (those that a group commit woke with
// this one) send their answers before this one reads its connection again. A client on the same
// host sends its next request within microseconds of an answer, but not within the few it took
// net/http to get back to the read: that read found nothing, and the goroutine parked until the
// poller woke it to read again. Under pairs at 64 connections on bbolt, 2.98 read system calls
// a request became 2.20, and the server made 5 to 6% more pairs with 6 to 7% less CPU a request
// (docs/BENCHMARKS.md). Reads (replays) do not come in such bursts, and yielding cost them 5%:
// their answers are not marked. Only an answer of a known length may be flushed early: net/http
// sends one flushed before its length is set in chunks.
func sendEarly(w http.ResponseWriter) {
	if sw, ok := w.(*statusWriter); ok {
		sw.sendEarly = true
	}
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// infoContext is the request's context with its reqInfo as the value of ctxKey{}: what
// context.WithValue would make, without an allocation of its own.
type infoContext struct {
	context.Context
	ri *reqInfo
}

func (c *infoContext) Value(key any) any {
	if key == (ctxKey{}) {
		return c.ri
	}
	return c.Context.Value(key)
}

// exchange is everything observe keeps of one request, in one allocation: the request's
// facts, the writer that remembers the status, the context that carries the facts to the
// handlers, and the value of the X-Request-Id header. It is never reused: the response's
// header map keeps pointing to idHeader, and a handler may keep the context.
type exchange struct {
	info     reqInfo
	sw       statusWriter
	ctx      infoContext
	idHeader [1]string
}

// observe gives every request an id (echoed in X-Request-Id), recovers panics into a 500
// problem, and writes one access-log line and the request metrics.
func (s *Server) observe(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		x := &exchange{sw: statusWriter{ResponseWriter: w}}
		ri, sw := &x.info, &x.sw
		ri.start = start
		if id := r.Header["X-Request-Id"]; len(id) > 0 && saneRequestID(id[0]) { // Header.Get
			ri.id = id[0]
		} else {
			ri.id = newRequestID()
		}
		x.idHeader[0] = ri.id
		w.Header()["X-Request-Id"] = x.idHeader[:] // Header.Set, without its allocation
		x.ctx = infoContext{Context: r.Context(), ri: ri}
		r = r.WithContext(&x.ctx)
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				s.logger.Error("panic", zap.String("request_id", ri.id), zap.Any("panic", v), zap.Stack("stack"))
				if sw.status == 0 {
					s.writeError(sw, r, fmt.Errorf("panic: %v", v))
				}
			}
			end := time.Now()
			elapsed := end.Sub(start)
			route := chi.RouteContext(r.Context()).RoutePattern()
			if route == "" {
				route = "unmatched"
			}
			status := sw.status
			if status == 0 {
				status = http.StatusOK
			}
			s.metrics.observeRequest(r.Method, route, status, elapsed)
			defer flushEarly(w, sw) // after the access line: a client that has its answer finds it logged
			if s.accessOut != nil {
				s.writeAccessLine(end, &accessEntry{
					method: logMethod(r.Method), route: route, status: status, duration: elapsed,
					tenant: ri.tenant, key: ri.key, requestID: ri.id, problem: ri.problem, outcome: ri.outcome,
					remote: r.RemoteAddr,
				})
			} else if ce := s.accessLog.Check(zap.InfoLevel, "request"); ce != nil {
				ce.Write(
					zap.String("method", logMethod(r.Method)),
					zap.String("route", route),
					zap.Int("status", status),
					zap.Duration("duration", elapsed),
					zap.String("tenant", ri.tenant),
					zap.String("key", ri.key),
					zap.String("request_id", ri.id),
					zap.String("problem", ri.problem),
					zap.String("outcome", ri.outcome),
					zap.String("remote", r.RemoteAddr),
				)
			}
		}()
		next.ServeHTTP(sw, r)
	})
}

// flushEarly flushes sw's answer, and yields, when the handler asked for it (sendEarly).
func flushEarly(w http.ResponseWriter, sw *statusWriter) {
	if !sw.sendEarly {
		return
	}
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	runtime.Gosched()
}

// maxLoggedMethod bounds the method in an access line: net/http takes any token as a method, and
// 64 KiB ones made each unauthenticated request log 64 KiB (a security audit's find).
const maxLoggedMethod = 32

// logMethod is the method as an access line shows it: cut to maxLoggedMethod bytes, with "..."
// after a cut.
func logMethod(m string) string {
	if len(m) <= maxLoggedMethod {
		return m
	}
	return m[:maxLoggedMethod] + "..."
}

// saneRequestID accepts a client's request id of 1 to 128 visible ASCII bytes.
func saneRequestID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x21 || id[i] > 0x7e {
			return false
		}
	}
	return true
}

// newRequestID returns an id for a request that came without one: 24 hex digits, 96 bits drawn
// at random when the process starts, the last 64 of them XORed with a counter, so that no two
// requests of a process share an id and ids of different processes differ in all likelihood.
// Ids are not secrets; 12 random bytes for each request, as before, were 1.6% of a replay's CPU.
func newRequestID() string {
	var raw [12]byte
	binary.BigEndian.PutUint32(raw[:4], requestIDs.prefix)
	binary.BigEndian.PutUint64(raw[4:], requestIDs.key^requestIDs.next.Add(1))
	var h [24]byte
	hex.Encode(h[:], raw[:])
	return string(h[:])
}

var requestIDs struct {
	prefix uint32
	key    uint64
	next   atomic.Uint64
}

func init() {
	var b [12]byte
	_, _ = rand.Read(b[:])
	requestIDs.prefix, requestIDs.key = binary.BigEndian.Uint32(b[:4]), binary.BigEndian.Uint64(b[4:])
}

// authenticator maps bearer tokens to tenants. It keeps only SHA-256 hashes of the tokens and
// compares them in constant time, so neither memory nor timing gives a token away.
type authenticator struct {
	tenants []tenantToken // empty: open mode
}

type tenantToken struct {
	tenant string
	hash   [sha256.Size]byte
}

func newAuthenticator(tokens map[string]string) *authenticator {
	a := &authenticator{}
	for tenant, token := range tokens {
		a.tenants = append(a.tenants, tenantToken{tenant: tenant, hash: sha256.Sum256([]byte(token))})
	}
	return a
}

// tenantOf returns the tenant whose token the request bears, or false.
func (a *authenticator) tenantOf(r *http.Request) (string, bool) {
	if len(a.tenants) == 0 {
		return DefaultTenant, true
	}
	// Exactly one Authorization header: with two, which one a proxy in front checked or added
	// and which one the client sent cannot be told apart (a security audit's find: the first
	// one won).
	v := r.Header["Authorization"] // Header.Get, without canonicalizing
	if len(v) != 1 {
		return "", false
	}
	h := v[0]
	scheme, token, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	sum := sha256.Sum256([]byte(strings.TrimSpace(token)))
	found := ""
	for _, t := range a.tenants { // every entry is compared: the time does not say which matched
		if subtle.ConstantTimeCompare(sum[:], t.hash[:]) == 1 {
			found = t.tenant
		}
	}
	return found, found != ""
}

// authenticate resolves the tenant of /v1 requests; a missing or unknown token is 401.
func (s *Server) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t, ok := s.auth.tenantOf(r)
		if !ok {
			s.writeError(w, r, errUnauthorized)
			return
		}
		info(r.Context()).tenant = t
		next.ServeHTTP(w, r)
	})
}

// retryAfter is the Retry-After value for a holder whose lease ends at end: whole seconds,
// rounded up, at least 1.
func retryAfter(now, end time.Time) string {
	d := end.Sub(now)
	secs := int64((d + time.Second - 1) / time.Second)
	return strconv.FormatInt(max(secs, 1), 10)
}
